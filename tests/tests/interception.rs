//! HTTPS interception end to end (issue 4): `HTTPS_PROXY` clients (curl and a Rust client)
//! through CONNECT with TLS interception against a real HTTPS upstream, passthrough hosts, and
//! every bad tunnel we can think of: a disallowed port, an unknown host, no SNI, an SNI for
//! another host, plain bytes in a TLS tunnel, a handshake that never finishes, and a tunnel
//! reused for a second host.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tollgate_tests::harness::{bin, eventually, TestPki, TestProxy, Upstream};

const POLICY: &str = r#"
policies:
  modules:
    - name: refunds.rego
      rego: |
        package tollgate
        import rego.v1
        deny contains "refunds over 1000 are not allowed" if input.request.body.amount > 1000
"#;

fn ca_init(dir: &Path) -> (String, String) {
    let out = Command::new(bin("tollgate-proxy"))
        .args(["ca", "init", "--out"])
        .arg(dir.join("ca"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "CURL_CA_BUNDLE",
    ] {
        assert!(text.contains(var), "ca init explains {var}: {text}");
    }
    let ca = dir.join("ca");
    (
        ca.join("ca.crt").display().to_string(),
        ca.join("ca.key").display().to_string(),
    )
}

struct Setup {
    up: Upstream,
    proxy: TestProxy,
    ca_cert: String,
    upstream_ca: String,
}

fn setup(extra_tools: &str, extra: &str) -> Setup {
    setup_with_server(extra_tools, extra, "")
}

/// `server_extra` is appended inside the `server:` mapping (e.g. `, idleTimeout: 1s`).
fn setup_with_server(extra_tools: &str, extra: &str, server_extra: &str) -> Setup {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki);
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, ca_key) = ca_init(dir.path());
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
    let port = up.addr.port();
    let config = format!(
        r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: pay.refund
    match: {{host: "localhost:{port}", methods: [POST], path: /v1/refunds}}
{extra_tools}
tls:
  extraCaFile: {upstream_ca}
  intercept: {{caCert: {ca_cert}, caKey: {ca_key}}}
server: {{connectPorts: [{port}], headerReadTimeout: 1s{server_extra}}}
audit: {{path: audit.jsonl}}
{POLICY}
{extra}
"#,
        upstream_ca = upstream_ca.display()
    );
    let proxy = TestProxy::start_in(dir, &config, &[]);
    Setup {
        up,
        proxy,
        ca_cert,
        upstream_ca: upstream_ca.display().to_string(),
    }
}

/// curl through the proxy; returns (exit code, http code, body, http version).
fn curl(
    s: &Setup,
    cacert: &str,
    url: &str,
    body: &str,
    extra: &[&str],
) -> (i32, u16, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(["--cacert", cacert])
        .args(["-x", &format!("http://{}", s.proxy.proxy)])
        .args([
            "-H",
            "X-Tollgate-Tenant: acme",
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-X", "POST", "--data", body])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is installed by .ci/install-tools.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut it = tail.split(' ');
    let code = it.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let version = it.next().unwrap_or("").to_string();
    (
        out.status.code().unwrap_or(-1),
        code,
        body.to_string(),
        version,
    )
}

#[test]
fn curl_through_connect_is_intercepted_decided_and_audited() {
    let s = setup("", "");
    let port = s.up.addr.port();
    let url = format!("https://localhost:{port}/v1/refunds");
    // Allowed: curl trusts only the interception CA, so this proves the minted leaf.
    let (code, status, body, _) = curl(&s, &s.ca_cert, &url, r#"{"amount":10}"#, &[]);
    assert_eq!((code, status), (0, 200), "{body}\n{}", s.proxy.log());
    assert!(body.contains("\"ok\":true"), "{body}");
    let seen = s.up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/refunds");
    assert!(
        seen[0].header("x-tollgate-tenant").is_none(),
        "tollgate headers are stripped"
    );
    // Denied by policy inside the tunnel: nothing reaches the upstream.
    let (_, status, body, _) = curl(&s, &s.ca_cert, &url, r#"{"amount":5000}"#, &[]);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("policy_denied") && body.contains("refunds over 1000"),
        "{body}"
    );
    // A path that is no tool.
    let other = format!("https://localhost:{port}/v1/payouts");
    let (_, status, body, _) = curl(&s, &s.ca_cert, &other, "{}", &[]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("unknown_tool"), "{body}");
    // HTTP/2 inside the tunnel (ALPN h2).
    let (code, status, body, version) =
        curl(&s, &s.ca_cert, &url, r#"{"amount":20}"#, &["--http2"]);
    assert_eq!((code, status, version.as_str()), (0, 200, "2"), "{body}");
    assert_eq!(s.up.count(), 2);
    // The interception CA is not the upstream's: a client that only trusts the real CA fails,
    // because the sidecar, not the upstream, terminated its TLS.
    let (code, _, _, _) = curl(&s, &s.upstream_ca, &url, r#"{"amount":10}"#, &[]);
    assert_eq!(
        code, 60,
        "certificate verification must fail against the wrong CA"
    );
    assert_eq!(s.up.count(), 2);
    eventually("records", || s.proxy.audit().len() >= 6);
    let recs = s.proxy.audit();
    let decisions: Vec<_> = recs
        .iter()
        .filter(|r| r["phase"] == "decision" && r["method"] == "POST")
        .map(|r| {
            (
                r["via"].as_str().unwrap().to_string(),
                r["decision"].as_str().unwrap().to_string(),
                r["scheme"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        decisions.contains(&("connect".into(), "allow".into(), "https".into())),
        "{decisions:?}"
    );
    assert!(
        decisions.contains(&("connect".into(), "deny".into(), "https".into())),
        "{decisions:?}"
    );
}

#[test]
fn connect_to_unknown_hosts_and_ports_is_refused_before_tls() {
    let s = setup("", "");
    let port = s.up.addr.port();
    // Unknown host (127.0.0.1 is not "localhost" in the catalog).
    let (code, _, _, _) = curl(
        &s,
        &s.ca_cert,
        &format!("https://127.0.0.1:{port}/v1/refunds"),
        "{}",
        &[],
    );
    assert_ne!(code, 0);
    let res = connect(s.proxy.proxy, &format!("127.0.0.1:{port}"));
    assert!(res.starts_with("HTTP/1.1 403"), "{res}");
    assert!(res.contains("connect_not_allowed"), "{res}");
    // A port outside connectPorts, even on a tool host.
    let res = connect(s.proxy.proxy, "localhost:22");
    assert!(
        res.starts_with("HTTP/1.1 403") && res.contains("not allowed"),
        "{res}"
    );
    // Userinfo and garbage authorities.
    let res = connect(s.proxy.proxy, &format!("user@localhost:{port}"));
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert_eq!(s.up.count(), 0);
    eventually("refusals are recorded", || {
        s.proxy
            .audit()
            .iter()
            .filter(|r| r["method"] == "CONNECT" && r["decision"] == "deny")
            .count()
            >= 2
    });
}

/// Send CONNECT and read the head of the answer.
fn connect(proxy: SocketAddr, authority: &str) -> String {
    let mut t = TcpStream::connect(proxy).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        t,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nX-Tollgate-Tenant: acme\r\n\r\n"
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = t.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Open a CONNECT tunnel and return the stream after the 200.
fn tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let mut t = TcpStream::connect(proxy).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        t,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(t.read(&mut b).unwrap(), 1, "proxy closed during CONNECT");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    t
}

fn tls_client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Drive a TLS handshake over `t` as `name`; returns the stream or the error.
fn handshake(
    t: TcpStream,
    ca_pem: &str,
    name: rustls::pki_types::ServerName<'static>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let conn = rustls::ClientConnection::new(tls_client(ca_pem), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, t);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

fn read_all(s: &mut impl Read) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn bad_tunnels_are_refused_and_recorded() {
    let s = setup("", "");
    let port = s.up.addr.port();
    let authority = format!("localhost:{port}");
    let ca = std::fs::read_to_string(&s.ca_cert).unwrap();

    // A well-behaved Rust client works (and proves the leaf names the CONNECT host).
    let mut ok = handshake(
        tunnel(s.proxy.proxy, &authority),
        &ca,
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    write!(ok, "POST /v1/refunds HTTP/1.1\r\nHost: {authority}\r\nX-Tollgate-Tenant: acme\r\nContent-Type: application/json\r\nContent-Length: 13\r\nConnection: close\r\n\r\n{{\"amount\":10}}").unwrap();
    let res = read_all(&mut ok);
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(s.up.count(), 1);

    // The same tunnel used for a second host: 421, nothing forwarded.
    let mut second = handshake(
        tunnel(s.proxy.proxy, &authority),
        &ca,
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    write!(second, "POST /v1/refunds HTTP/1.1\r\nHost: evil.example.com:{port}\r\nX-Tollgate-Tenant: acme\r\nContent-Type: application/json\r\nContent-Length: 13\r\nConnection: close\r\n\r\n{{\"amount\":10}}").unwrap();
    let res = read_all(&mut second);
    assert!(res.starts_with("HTTP/1.1 421"), "{res}");
    assert!(res.contains("misdirected_request"), "{res}");

    // An SNI that differs from the CONNECT host: the handshake is refused.
    let err = handshake(
        tunnel(s.proxy.proxy, &authority),
        &ca,
        "evil.example.com".try_into().unwrap(),
    );
    assert!(
        err.is_err(),
        "an SNI for another host must not get a certificate"
    );

    // A ClientHello without SNI (rustls sends none for an IP name) to a named host.
    let ip: rustls::pki_types::ServerName<'static> = rustls::pki_types::ServerName::IpAddress(
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap().into(),
    );
    assert!(handshake(tunnel(s.proxy.proxy, &authority), &ca, ip).is_err());

    // Plain HTTP inside a TLS tunnel: answered with a 400 and closed.
    let mut plain = tunnel(s.proxy.proxy, &authority);
    write!(
        plain,
        "POST /v1/refunds HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    .unwrap();
    let res = read_all(&mut plain);
    assert!(
        res.starts_with("HTTP/1.1 400") && res.contains("not TLS"),
        "{res}"
    );

    // Garbage that starts like TLS but is not a ClientHello.
    let mut junk = tunnel(s.proxy.proxy, &authority);
    junk.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    let res = read_all(&mut junk);
    assert!(!res.contains("HTTP/1.1 200"), "{res}");

    // A client that never sends its ClientHello is cut off (headerReadTimeout 1s).
    let mut idle = tunnel(s.proxy.proxy, &authority);
    let mut b = [0u8; 1];
    assert_eq!(
        idle.read(&mut b).unwrap_or(0),
        0,
        "the idle tunnel must be closed"
    );

    assert_eq!(s.up.count(), 1, "no refused tunnel reached the upstream");
    eventually("tunnel refusals recorded", || {
        let recs = s.proxy.audit();
        let reasons: String = recs.iter().map(|r| r["reasons"].to_string()).collect();
        reasons.contains("differs from the CONNECT host")
            && reasons.contains("without SNI")
            && reasons.contains("not TLS")
            && reasons.contains("no TLS ClientHello within")
            && reasons.contains("must open its own")
    });
    let m = s.proxy.metrics();
    assert!(m.contains("tollgate_tunnels_refused_total{"), "{m}");
}

#[test]
fn passthrough_hosts_are_tunnelled_untouched_and_marked() {
    let pki = TestPki::new();
    let other = Upstream::start_tls(&pki);
    let p2 = other.addr.port();
    let tools = format!(
        "  - name: vault.read\n    match: {{host: \"localhost:{p2}\"}}\n    passthrough: true\n"
    );
    let s = setup(&tools, "");
    // connectPorts must allow p2 too.
    let cfg = std::fs::read_to_string(s.proxy.config_path()).unwrap();
    let port = s.up.addr.port();
    s.proxy.rewrite_config(
        &cfg.lines()
            .filter(|l| !l.starts_with("listen:"))
            .map(|l| {
                l.replace(
                    &format!("connectPorts: [{port}]"),
                    &format!("connectPorts: [{port}, {p2}]"),
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let ca_path = s.proxy.dir.path().join("other-ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{p2}/anything");
    // The client verifies the upstream's own certificate: nothing was intercepted.
    let mut last = None;
    eventually_or("reload allows the passthrough port", &s, || {
        let r = curl(
            &s,
            ca_path.to_str().unwrap(),
            &url,
            "{}",
            &["--proxy-header", "X-Tollgate-Tenant: acme"],
        );
        let ok = r.1 == 200;
        last = Some(r);
        ok
    });
    assert!(
        last.is_some_and(|r| r.2.contains("\"ok\":true")),
        "{}",
        s.proxy.log()
    );
    assert!(other.count() >= 1);
    let recs = s.proxy.audit();
    let pt = recs
        .iter()
        .find(|r| r["passthrough"] == true)
        .expect("passthrough record");
    assert_eq!(pt["tool"], "vault.read");
    assert_eq!(pt["via"], "connect");
    assert_eq!(pt["tenant"], "acme");
}

fn eventually_or(what: &str, s: &Setup, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}: {}", s.proxy.log());
}

/// Issue 13, class 9: a request-line `CONNECT` inside an intercepted tunnel was decided as one
/// path and sent upstream as `CONNECT host:port`. It is refused with a JSON 400, recorded and
/// counted, and the upstream sees nothing.
#[test]
fn connect_inside_an_intercepted_tunnel_is_refused_recorded_and_counted() {
    let s = setup("", "");
    let port = s.up.addr.port();
    let authority = format!("localhost:{port}");
    let ca = std::fs::read_to_string(&s.ca_cert).unwrap();
    for target in [authority.clone(), "evil.example.com:443".to_string()] {
        let mut t = handshake(
            tunnel(s.proxy.proxy, &authority),
            &ca,
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        write!(
            t,
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nX-Tollgate-Tenant: acme\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let res = read_all(&mut t);
        assert!(res.starts_with("HTTP/1.1 400"), "{res}");
        let body = &res[res.find("\r\n\r\n").unwrap() + 4..];
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {res}"));
        assert_eq!(json["error"], "bad_request", "{json}");
        assert!(
            json["reason"].as_str().unwrap().contains("inside a tunnel"),
            "{json}"
        );
    }
    // The tunnel still serves ordinary requests after a refused CONNECT on another one.
    let mut ok = handshake(
        tunnel(s.proxy.proxy, &authority),
        &ca,
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    write!(ok, "POST /v1/refunds HTTP/1.1\r\nHost: {authority}\r\nX-Tollgate-Tenant: acme\r\nContent-Type: application/json\r\nContent-Length: 13\r\nConnection: close\r\n\r\n{{\"amount\":10}}").unwrap();
    assert!(read_all(&mut ok).starts_with("HTTP/1.1 200"));
    let seen = s.up.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the ordinary request reached the upstream"
    );
    assert_eq!(seen[0].method, "POST");
    let refused_connects = || {
        s.proxy
            .audit()
            .into_iter()
            .filter(|r| {
                r["method"] == "CONNECT" && r["reasons"].to_string().contains("inside a tunnel")
            })
            .collect::<Vec<_>>()
    };
    eventually("the refused CONNECTs are recorded", || {
        refused_connects().len() == 2
    });
    for r in refused_connects() {
        assert_eq!(r["decision"], "error", "{r}");
        assert_eq!(r["tenant"], "acme", "{r}");
        assert_eq!(r["via"], "connect", "{r}");
        assert_eq!(r["status"], 400, "{r}");
    }
    let m = s.proxy.metrics();
    assert!(
        m.contains(r#"tollgate_tunnels_refused_total{reason="bad_request",via="connect"} 2"#),
        "{m}"
    );
}

/// The value of one series in a Prometheus text scrape (0 when absent).
fn series(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Wait (bounded) for the peer to close `t`; true when it did.
fn closed_by_peer(t: &mut TcpStream) -> bool {
    t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut b = [0u8; 256];
    loop {
        match t.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Issue 13, class 10: a connection that sends nothing, or only the start of the HTTP/2
/// preface (which the version sniffing waits on), is cut `headerReadTimeout` after accept.
#[test]
fn a_silent_connection_is_closed_at_the_header_read_timeout_from_accept() {
    let s = setup("", "");
    let mut silent = TcpStream::connect(s.proxy.proxy).unwrap();
    let mut preface = TcpStream::connect(s.proxy.proxy).unwrap();
    preface.write_all(b"PRI * HTTP/2").unwrap();
    let mut head = TcpStream::connect(s.proxy.proxy).unwrap();
    head.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(
        closed_by_peer(&mut silent),
        "a silent connection stays open"
    );
    assert!(closed_by_peer(&mut preface), "a half preface stays open");
    assert!(closed_by_peer(&mut head), "a half request head stays open");
    let m = s.proxy.metrics();
    assert!(
        series(
            &m,
            r#"tollgate_connections_closed_total{reason="header_timeout"}"#
        ) >= 2.0,
        "{m}"
    );
}

/// HTTP/2 client: send one request on `io`, then wait (bounded) for the server to end the
/// connection. Returns the response status and whether the connection ended.
async fn h2_one_call_then_wait<IO>(io: IO, uri: &str) -> (u16, bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::post(uri)
        .header("x-tollgate-tenant", "acme")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"{\"amount\":10}",
        )))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let _ = http_body_util::BodyExt::collect(res.into_body()).await;
    // Keep the sender (the connection is only idle, not abandoned by the client).
    let ended = tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .is_ok();
    drop(sender);
    (status, ended)
}

/// Issue 13, class 10: an idle HTTP/2 connection is reaped after `server.idleTimeout`, both
/// h2c (prior knowledge) on the proxy listener and HTTP/2 inside an intercepted tunnel.
#[test]
fn idle_http2_connections_are_reaped() {
    let s = setup_with_server("", "", ", idleTimeout: 1s");
    let port = s.up.addr.port();
    let authority = format!("localhost:{port}");
    let ca = std::fs::read_to_string(&s.ca_cert).unwrap();
    let proxy = s.proxy.proxy;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // h2c with prior knowledge, forward-proxy form.
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (status, ended) =
            h2_one_call_then_wait(tcp, &format!("http://{authority}/v1/payouts")).await;
        assert_eq!(status, 403, "h2c call answered by the pipeline");
        assert!(ended, "an idle h2c connection must be reaped");

        // HTTP/2 (ALPN h2) inside a CONNECT tunnel.
        let t = tunnel(proxy, &authority);
        t.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(t).unwrap();
        let mut cfg = (*tls_client(&ca)).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (status, ended) =
            h2_one_call_then_wait(tls, &format!("https://{authority}/v1/refunds")).await;
        assert_eq!(status, 200, "h2 call in the tunnel allowed");
        assert!(
            ended,
            "an idle HTTP/2 connection in a tunnel must be reaped"
        );
    });
    assert_eq!(s.up.count(), 1);
    let m = s.proxy.metrics();
    assert!(
        series(&m, r#"tollgate_connections_closed_total{reason="idle"}"#) >= 2.0,
        "{m}"
    );
}
