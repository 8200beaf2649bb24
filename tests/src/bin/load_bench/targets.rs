//! The targets under test and how each is started: the upstream itself (direct), nginx, the
//! bare hyper proxy, and Tollgate in several configurations. Every process under test runs on
//! CPU 0, optionally under a wrapper command (valgrind for instruction counts).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to start.
#[derive(Clone, Debug)]
pub enum Kind {
    /// The upstream itself, no proxy.
    Direct,
    /// nginx-light, one worker, keep-alive upstream.
    Nginx,
    /// `bare-proxy`: hyper server plus pooled client, nothing else.
    Bare,
    /// Tollgate.
    Tollgate(TollgateConfig),
}

/// One Tollgate configuration.
#[derive(Clone, Debug, Default)]
pub struct TollgateConfig {
    /// YAML appended to the base config (policies, tenants).
    pub extra: String,
    /// Audit log on disk (fsync) rather than on tmpfs.
    pub audit_on_disk: bool,
    /// Tools in the catalog beside the one called (the catalog curve).
    pub extra_tools: usize,
    /// Generated policy modules instead of the shipped library (the modules curve).
    pub modules: Option<usize>,
}

/// A named target.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Name in the report.
    pub name: String,
    /// What to start.
    pub kind: Kind,
}

impl Spec {
    pub fn new(name: &str, kind: Kind) -> Self {
        Self {
            name: name.into(),
            kind,
        }
    }
}

/// Paths and addresses every target needs.
pub struct Env {
    /// The upstream's address.
    pub upstream: SocketAddr,
    /// `bare-proxy` binary.
    pub bare_bin: PathBuf,
    /// `tollgate-proxy` binary.
    pub proxy_bin: PathBuf,
}

/// A running target.
pub struct Target {
    pub name: String,
    pub url_path: String,
    pub addr: SocketAddr,
    pub headers: Vec<(String, String)>,
    pub pid: Option<u32>,
    _child: Option<ChildGuard>,
    _dir: Option<tempfile::TempDir>,
}

struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal fast upstream on its own runtime.
pub fn start_upstream() -> (SocketAddr, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = l.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"{\"ok\":true}"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, rt)
}

fn wait_port(addr: SocketAddr, child: &mut Child, limit: Duration) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the process for {addr} exited before listening: {status}");
        }
        assert!(t0.elapsed() < limit, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start `spec`, pinned to CPU 0, under `wrapper` (e.g. valgrind) when given.
pub fn start(spec: &Spec, env: &Env, wrapper: Option<&[OsString]>) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (program, args, url_path, headers): (PathBuf, Vec<OsString>, &str, Vec<(String, String)>) =
        match &spec.kind {
            Kind::Direct => {
                return Target {
                    name: spec.name.clone(),
                    url_path: "/v1/notes".into(),
                    addr: env.upstream,
                    headers: vec![],
                    pid: None,
                    _child: None,
                    _dir: None,
                }
            }
            Kind::Nginx => {
                let conf = nginx_conf(dir.path(), env.upstream, port);
                std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
                let args = vec![
                    "-p".into(),
                    dir.path().into(),
                    "-c".into(),
                    dir.path().join("nginx.conf").into(),
                ];
                (PathBuf::from("nginx"), args, "/v1/notes", vec![])
            }
            Kind::Bare => {
                let args = vec![
                    "--listen".into(),
                    addr.to_string().into(),
                    "--upstream".into(),
                    env.upstream.to_string().into(),
                ];
                (env.bare_bin.clone(), args, "/v1/notes", vec![])
            }
            Kind::Tollgate(cfg) => {
                let config = tollgate_conf(dir.path(), env.upstream, port, cfg);
                std::fs::write(dir.path().join("tollgate.yaml"), config).unwrap();
                let args = vec![
                    "run".into(),
                    "--config".into(),
                    dir.path().join("tollgate.yaml").into(),
                ];
                let headers = vec![
                    ("x-tollgate-tenant".into(), "acme".into()),
                    ("content-type".into(), "application/json".into()),
                ];
                (env.proxy_bin.clone(), args, "/u/up/v1/notes", headers)
            }
        };
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]);
    if let Some(w) = wrapper {
        cmd.args(w);
    }
    let mut child = cmd
        .arg(&program)
        .args(&args)
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (nginx-light and wrk are installed by .ci/install-tools.sh)",
                program.display()
            )
        });
    let limit = if wrapper.is_some() { 180 } else { 20 };
    wait_port(addr, &mut child, Duration::from_secs(limit));
    Target {
        name: spec.name.clone(),
        url_path: url_path.into(),
        addr,
        headers,
        pid: Some(child.id()),
        _child: Some(ChildGuard(child)),
        _dir: Some(dir),
    }
}

/// nginx as a plain reverse proxy. One process (`master_process off`), so the process we
/// measure is the one doing the work, with or without valgrind.
fn nginx_conf(dir: &Path, up: SocketAddr, port: u16) -> String {
    format!(
        "master_process off;\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  upstream up {{ server {up}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        d = dir.display()
    )
}

fn tollgate_conf(dir: &Path, up: SocketAddr, port: u16, cfg: &TollgateConfig) -> String {
    let audit = if cfg.audit_on_disk {
        dir.join("audit.jsonl")
    } else {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        base.join(format!(
            "tollgate-bench-{}-{port}.jsonl",
            std::process::id()
        ))
    };
    let admin = free_port();
    let mut config = format!(
        "listen: {{proxy: \"127.0.0.1:{port}\", admin: \"127.0.0.1:{admin}\"}}\nagent: {{name: bench, tenants: [acme]}}\nupstreams: {{up: \"http://{up}\"}}\ntools:\n  - name: notes\n    match: {{host: \"{up}\", methods: [POST], path: /v1/notes}}\n    cost: {{perCallUsd: 0.000001}}\n"
    );
    for i in 0..cfg.extra_tools {
        let _ = writeln!(
            config,
            "  - name: tool{i}\n    match: {{host: api{i}.example.com, methods: [POST], path: \"/v1/r{i}/{{id}}\"}}"
        );
    }
    let _ = writeln!(config, "audit: {{path: \"{}\"}}", audit.display());
    if let Some(n) = cfg.modules {
        let pdir = dir.join("policies");
        std::fs::create_dir_all(&pdir).unwrap();
        for i in 0..n {
            std::fs::write(pdir.join(format!("m{i}.rego")), generated_module(i)).unwrap();
        }
        let _ = writeln!(
            config,
            "policies: {{paths: [\"{}\"], timeout: 10s}}",
            pdir.display()
        );
    }
    config.push_str(&cfg.extra);
    config
}

/// One generated module of the modules curve: a deny on the tool name and an approval on a
/// body amount, the shapes most shipped rules have.
fn generated_module(i: usize) -> String {
    format!(
        "package tollgate\nimport rego.v1\n\ndeny contains msg if {{\n\tinput.tool.name == \"blocked_{i}\"\n\tmsg := \"tool blocked by module {i}\"\n}}\n\nrequire_approval contains msg if {{\n\tinput.request.body.amount > {limit}\n\tmsg := sprintf(\"amount %v over {limit}\", [input.request.body.amount])\n}}\n",
        limit = 1000 + i
    )
}
