//! Test harness: the real `tollgate-proxy` binary, a recording upstream (HTTP or HTTPS with a
//! test CA) on loopback, and clients that can send byte-exact requests.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of a workspace binary (built by `cargo build --workspace --bins`, which the README's
/// test command runs first).
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug").join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)", p.display());
    p
}

/// A free loopback port (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
}

impl Seen {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the upstream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with a JSON echo.
    Echo,
    /// Never answer.
    Hang,
    /// Close the connection without answering.
    Reset,
    /// Answer like `Echo`, after this many milliseconds.
    Delay(u64),
}

/// A recording upstream on loopback.
pub struct Upstream {
    /// Address.
    pub addr: SocketAddr,
    /// Requests received.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Behaviour switch.
    pub behaviour: Arc<Mutex<Behaviour>>,
    _rt: tokio::runtime::Runtime,
}

/// A test CA and a leaf for `localhost`/127.0.0.1 signed by it.
pub struct TestPki {
    /// CA certificate PEM.
    pub ca_pem: String,
    /// Leaf certificate PEM.
    pub leaf_pem: String,
    /// Leaf key PEM.
    pub leaf_key_pem: String,
}

impl TestPki {
    /// Generate a fresh CA and leaf for `localhost` and 127.0.0.1.
    pub fn new() -> Self {
        Self::with_names(&["localhost"])
    }

    /// Generate a fresh CA and a leaf for these DNS names (and 127.0.0.1).
    pub fn with_names(names: &[&str]) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tollgate test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut leaf_params = rcgen::CertificateParams::new(names).unwrap();
        leaf_params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        Self {
            ca_pem: ca.pem(),
            leaf_pem: leaf.pem(),
            leaf_key_pem: leaf_key.serialize_pem(),
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    /// Plain HTTP upstream.
    pub fn start() -> Self {
        Self::start_inner(None, "127.0.0.1:0")
    }

    /// Upstream bound to `addr` (e.g. a veth address), HTTPS if `pki` is given.
    pub fn start_on(addr: &str, pki: Option<&TestPki>) -> Self {
        Self::start_inner(pki, addr)
    }

    /// HTTPS upstream with a leaf from `pki`.
    pub fn start_tls(pki: &TestPki) -> Self {
        Self::start_inner(Some(pki), "127.0.0.1:0")
    }

    fn start_inner(pki: Option<&TestPki>, bind: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let behaviour = Arc::new(Mutex::new(Behaviour::Echo));
        let listener = rt.block_on(tokio::net::TcpListener::bind(bind)).unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = pki.map(|p| {
            let certs = rustls_pemfile::certs(&mut p.leaf_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pemfile::private_key(&mut p.leaf_key_pem.as_bytes())
                .unwrap()
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let (s2, b2) = (seen.clone(), behaviour.clone());
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, behaviour, acceptor) = (s2.clone(), b2.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (seen, behaviour) = (seen.clone(), behaviour.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let rec = Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                                headers: parts.headers.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect(),
                                body: body.clone(),
                            };
                            seen.lock().unwrap().push(rec);
                            let b = *behaviour.lock().unwrap();
                            match b {
                                Behaviour::Hang => {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                }
                                Behaviour::Reset => return Err("reset"),
                                Behaviour::Delay(ms) => {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                Behaviour::Echo => {}
                            }
                            let reply = serde_json::json!({"ok": true, "method": parts.method.as_str(), "path": parts.uri.path(), "body": String::from_utf8_lossy(&body)});
                            let mut res = hyper::Response::new(Full::new(Bytes::from(reply.to_string())));
                            res.headers_mut().insert("content-type", "application/json".parse().unwrap());
                            res.headers_mut().insert("x-upstream", "yes".parse().unwrap());
                            Ok::<_, &'static str>(res)
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acc) => {
                            if let Ok(tls) = acc.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            behaviour,
            _rt: rt,
        }
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Number of requests seen.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Change behaviour.
    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }
}

/// A running `tollgate-proxy run` process.
pub struct TestProxy {
    /// Proxy listener.
    pub proxy: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Working directory (config, audit, policies).
    pub dir: tempfile::TempDir,
    /// Child process.
    pub child: Child,
}

impl TestProxy {
    /// Write `config` (with `listen` filled in) into a temp dir and start the proxy.
    /// `envs` are extra environment variables for the process.
    pub fn start(config: &str, envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, config, envs)
    }

    /// Start in an existing directory (which may already hold policy files).
    pub fn start_in(dir: tempfile::TempDir, config: &str, envs: &[(&str, &str)]) -> Self {
        Self::start_wrapped(dir, config, envs, None)
    }

    /// Start under a wrapper script: `sh -c '<wrapper>; exec "$@"'` runs first, e.g. to mount
    /// a tmpfs inside a private mount namespace (`unshare -m`).
    pub fn start_wrapped(
        dir: tempfile::TempDir,
        config: &str,
        envs: &[(&str, &str)],
        wrapper: Option<&str>,
    ) -> Self {
        let (pp, ap) = (free_port(), free_port());
        let full =
            format!("listen: {{proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\"}}\n{config}");
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, full).unwrap();
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let mut cmd = match wrapper {
            None => Command::new(bin("tollgate-proxy")),
            Some(w) => {
                let mut c = Command::new("unshare");
                c.arg("-m")
                    .arg("sh")
                    .arg("-c")
                    .arg(format!("{w}; exec \"$@\""))
                    .arg("sh")
                    .arg(bin("tollgate-proxy"));
                c
            }
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .env("TOLLGATE_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut p = Self {
            proxy: format!("127.0.0.1:{pp}").parse().unwrap(),
            admin: format!("127.0.0.1:{ap}").parse().unwrap(),
            dir,
            child,
        };
        p.wait_ready();
        p
    }

    /// Start `prefix… tollgate-proxy run --config` with a complete config (including its own
    /// `listen:` block), e.g. under `ip netns exec NAME`. `proxy` and `admin` are where the
    /// test reaches the listeners.
    pub fn start_custom(
        dir: tempfile::TempDir,
        full_config: &str,
        proxy: SocketAddr,
        admin: SocketAddr,
        prefix: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, full_config).unwrap();
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let mut cmd = match prefix.split_first() {
            None => Command::new(bin("tollgate-proxy")),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("tollgate-proxy"));
                c
            }
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .env("TOLLGATE_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut p = Self {
            proxy,
            admin,
            dir,
            child,
        };
        p.wait_ready();
        p
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("proxy exited early with {status}: {}", self.log());
            }
            if let Ok(r) = get(self.admin, "/readyz") {
                if r.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("proxy not ready within 30s: {}", self.log());
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Path of the config file (rewrite it to test reloads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.yaml")
    }

    /// Rewrite the config (keeping the listen line).
    pub fn rewrite_config(&self, config: &str) {
        let listen = format!(
            "listen: {{proxy: \"{}\", admin: \"{}\"}}\n",
            self.proxy, self.admin
        );
        let tmp = self.dir.path().join("tollgate.yaml.tmp");
        std::fs::write(&tmp, format!("{listen}{config}")).unwrap();
        std::fs::rename(tmp, self.config_path()).unwrap();
    }

    /// Audit records, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Scrape `/metrics`.
    pub fn metrics(&self) -> String {
        get(self.admin, "/metrics").unwrap().body_text()
    }

    /// Start a run: `POST /runs` on the admin port answers a fresh run id signed by the
    /// sidecar (agents get one by omitting `X-Tollgate-Run`).
    pub fn new_run(&self) -> String {
        let r = raw(
            self.admin,
            format!(
                "POST /runs HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.admin
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body_text());
        r.json()["run"].as_str().unwrap().to_string()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code (0 if the connection closed without a response).
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Body as JSON (Null if not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Send raw bytes and read one response (the request should carry `Connection: close`).
pub fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(request)?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    Ok(parse_response(&buf))
}

/// Parse a response (status line, headers, body with content-length or to EOF; chunked bodies
/// are de-chunked).
pub fn parse_response(buf: &[u8]) -> RawResponse {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return RawResponse {
            status: 0,
            headers: vec![],
            body: buf.to_vec(),
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let n =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16).unwrap_or(0);
            if n == 0 || rest.len() < i + 2 + n {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + n]);
            rest = &rest[i + 2 + n + 2..];
        }
        body = out;
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

/// GET a path on a server.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<RawResponse> {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Send a call through the proxy in forward-proxy (absolute) form.
pub fn call(
    proxy: SocketAddr,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> RawResponse {
    let authority = url.split('/').nth(2).unwrap_or("");
    let mut req = format!("{method} {url} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    raw(proxy, req.as_bytes()).expect("proxy reachable")
}

/// Poll until `f` is true or the deadline passes (a liveness bound, not a performance check).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

/// Build a hyper client request through the proxy using hyper's own HTTP/1 client.
pub async fn hyper_call(
    proxy: SocketAddr,
    req: hyper::Request<Full<Bytes>>,
) -> anyhow::Result<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(proxy).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Infallible helper type alias for services.
pub type Never = Infallible;

/// A private `redis-server` on a free loopback port (Debian's redis-server, installed by
/// `.ci/install-tools.sh`), killed on drop.
pub struct RedisServer {
    /// Port.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Start and wait until it answers PING.
    pub fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kill the server (simulating an outage); [`RedisServer::restart`] brings it back on the
    /// same port.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)start on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed by .ci/install-tools.sh");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        eventually("redis-server answers PING", || {
            std::net::TcpStream::connect(addr)
                .and_then(|mut s| {
                    use std::io::{Read, Write};
                    s.write_all(b"PING\r\n")?;
                    let mut b = [0u8; 7];
                    s.read_exact(&mut b)?;
                    Ok(&b == b"+PONG\r\n")
                })
                .unwrap_or(false)
        });
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
