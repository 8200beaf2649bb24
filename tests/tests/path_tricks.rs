//! A table of path-normalisation and header tricks (issue 2, "where you try to break it").
//! Each row is a crafted request to the real proxy. The expected outcome is either a refusal
//! that never reaches the upstream, or a forward where the upstream sees exactly the path the
//! matcher matched — never a different tool, never a different upstream path.

use tollgate_tests::harness::{raw, TestProxy, Upstream};

#[derive(Debug)]
enum Want {
    /// Refused with this status; upstream untouched.
    Refused(u16),
    /// Forwarded as this tool with this upstream path.
    Forwarded(&'static str, &'static str),
}

fn config(up: &Upstream) -> String {
    let a = up.addr;
    format!(
        r#"
agent: {{name: a, tenants: [acme]}}
tools:
  - name: files.public
    match: {{host: "{a}", methods: [GET], path: "/public/{{name}}"}}
  - name: files.secret
    match: {{host: "{a}", methods: [GET], path: "/secret/{{name}}"}}
policies:
  modules:
    - name: secret.rego
      rego: |
        package tollgate
        import rego.v1
        deny contains "secret files are off limits" if input.tool.name == "files.secret"
"#
    )
}

#[test]
fn crafted_paths_never_reach_an_unintended_tool_or_path() {
    let up = Upstream::start();
    let p = TestProxy::start(&config(&up), &[]);
    let a = up.addr;
    let cases: &[(&str, Want)] = &[
        (
            "/public/readme",
            Want::Forwarded("files.public", "/public/readme"),
        ),
        (
            "//public///readme",
            Want::Forwarded("files.public", "/public/readme"),
        ),
        (
            "/public/./readme",
            Want::Forwarded("files.public", "/public/readme"),
        ),
        (
            "/public/%72eadme",
            Want::Forwarded("files.public", "/public/readme"),
        ),
        ("/Public/readme", Want::Refused(403)),
        ("/public/readme/", Want::Refused(403)),
        // A `;` parameter is a different path to Tomcat and Spring: refused unless the tool
        // opts in (`request.pathParams`).
        ("/public/readme;x=1", Want::Refused(400)),
        ("/public/..;/secret/key", Want::Refused(400)),
        // Dot segments resolve before matching, so the secret tool (and its deny) applies.
        ("/public/../secret/key", Want::Refused(403)),
        ("/public/%2e%2e/secret/key", Want::Refused(403)),
        ("/public/%2E%2e/secret/key", Want::Refused(403)),
        ("/public/.%2e/secret/key", Want::Refused(403)),
        // Encoded separators and double encoding are refused outright.
        ("/public/..%2fsecret%2fkey", Want::Refused(400)),
        ("/public/..%2Fsecret", Want::Refused(400)),
        ("/public/..%5csecret", Want::Refused(400)),
        ("/public/%252e%252e/secret/key", Want::Refused(400)),
        ("/public/%00", Want::Refused(400)),
        ("/../public/readme", Want::Refused(400)),
        ("/public/%zz", Want::Refused(400)),
        // Overlong UTF-8 for '.' stays an opaque escape: it cannot become a dot segment.
        (
            "/public/%c0%ae%c0%ae",
            Want::Forwarded("files.public", "/public/%C0%AE%C0%AE"),
        ),
        ("/public/%C0%AE%C0%AE/secret/key", Want::Refused(403)),
    ];
    let mut expected_forwards = 0;
    for (path, want) in cases {
        let before = up.count();
        let req = format!("GET http://{a}{path} HTTP/1.1\r\nHost: {a}\r\nX-Tollgate-Tenant: acme\r\nConnection: close\r\n\r\n");
        let r = raw(p.proxy, req.as_bytes()).unwrap();
        match want {
            Want::Refused(status) => {
                assert_eq!(r.status, *status, "{path}: {}", r.body_text());
                assert_eq!(up.count(), before, "{path} must not reach the upstream");
            }
            Want::Forwarded(tool, upstream_path) => {
                assert_eq!(r.status, 200, "{path}: {}", r.body_text());
                expected_forwards += 1;
                assert_eq!(up.count(), expected_forwards);
                assert_eq!(up.seen().last().unwrap().path, *upstream_path, "{path}");
                let rec = p
                    .audit()
                    .into_iter()
                    .rev()
                    .find(|r| r["phase"] == "decision")
                    .unwrap();
                assert_eq!(rec["tool"], *tool, "{path}");
                assert_eq!(
                    rec["path"], *upstream_path,
                    "{path}: the record shows what was sent"
                );
            }
        }
    }
}

#[test]
fn host_and_header_tricks_are_refused() {
    let up = Upstream::start();
    let p = TestProxy::start(&config(&up), &[]);
    let a = up.addr;
    let port = a.port();
    let send = |req: String| raw(p.proxy, req.as_bytes()).unwrap();
    let ok = |extra: &str, host_line: &str, target: &str| {
        format!("GET {target} HTTP/1.1\r\n{host_line}X-Tollgate-Tenant: acme\r\n{extra}Connection: close\r\n\r\n")
    };
    let cases: Vec<(&str, String, u16)> = vec![
        ("absolute-form vs Host mismatch", ok("", "Host: evil.example\r\n", &format!("http://{a}/public/x")), 400),
        ("duplicate Host", ok("Host: evil.example\r\n", &format!("Host: {a}\r\n"), &format!("http://{a}/public/x")), 400),
        ("userinfo in authority", ok("", &format!("Host: {a}\r\n"), &format!("http://user@{a}/public/x")), 400),
        ("decimal IP for 127.0.0.1", ok("", "", &format!("http://2130706433:{port}/public/x")), 403),
        ("localhost instead of the IP the tool names", ok("", "", &format!("http://localhost:{port}/public/x")), 403),
        ("punycode homograph", ok("", "", &format!("http://xn--27-0ba.0.0.1:{port}/public/x")), 403),
        ("wrong port", ok("", "", &format!("http://127.0.0.1:{}/public/x", port.wrapping_add(1))), 403),
        ("duplicate tenant header", ok("X-Tollgate-Tenant: acme\r\n", &format!("Host: {a}\r\n"), &format!("http://{a}/public/x")), 400),
        ("tenant header list", format!("GET http://{a}/public/x HTTP/1.1\r\nHost: {a}\r\nX-Tollgate-Tenant: acme, other\r\nConnection: close\r\n\r\n"), 400),
        ("run id with bad characters", ok("X-Tollgate-Run: a b<script>\r\n", &format!("Host: {a}\r\n"), &format!("http://{a}/public/x")), 400),
        ("TE chunked, identity", format!("POST http://{a}/public/x HTTP/1.1\r\nHost: {a}\r\nX-Tollgate-Tenant: acme\r\nTransfer-Encoding: chunked, identity\r\nConnection: close\r\n\r\n0\r\n\r\n"), 400),
        ("duplicate Content-Length", format!("POST http://{a}/public/x HTTP/1.1\r\nHost: {a}\r\nX-Tollgate-Tenant: acme\r\nContent-Length: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab"), 400),
        ("origin-form without /u/ prefix", format!("GET /public/x HTTP/1.1\r\nHost: {a}\r\nX-Tollgate-Tenant: acme\r\nConnection: close\r\n\r\n"), 400),
        ("ftp scheme", ok("", "", &format!("ftp://{a}/public/x")), 400),
    ];
    for (name, req, status) in cases {
        let r = send(req);
        // hyper itself may close the connection on framing it refuses to parse (status 0);
        // either way nothing may be forwarded.
        assert!(
            r.status == status || (r.status == 0 || r.status == 400) && status == 400,
            "{name}: got {} {}",
            r.status,
            r.body_text()
        );
        assert_eq!(up.count(), 0, "{name} reached the upstream");
    }
}

/// CL.TE smuggling: hyper lets Transfer-Encoding win (RFC 9112 §6.3), drops Content-Length and
/// closes the connection after the response, and the proxy re-frames the upstream request from
/// the buffered body. So a request hidden behind the chunked terminator is never processed.
#[test]
fn a_request_smuggled_behind_cl_te_is_never_forwarded() {
    let up = Upstream::start();
    let p = TestProxy::start(&config(&up), &[]);
    let a = up.addr;
    let smuggled = format!(
        "GET http://{a}/public/smuggled HTTP/1.1\r\nHost: {a}\r\nX-Tollgate-Tenant: acme\r\n\r\n"
    );
    let body = format!("0\r\n\r\n{smuggled}");
    let req = format!(
        "GET http://{a}/public/first HTTP/1.1\r\nHost: {a}\r\nX-Tollgate-Tenant: acme\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let r = raw(p.proxy, req.as_bytes()).unwrap();
    assert!(r.status == 200 || r.status == 400, "{}", r.status);
    assert!(
        up.seen().iter().all(|s| !s.path.contains("smuggled")),
        "smuggled request reached the upstream"
    );
    // The upstream request was framed by the proxy: at most one request, with its own length.
    assert!(up.count() <= 1);
    if let Some(s) = up.seen().first() {
        assert!(s.header("transfer-encoding").is_none());
        assert_eq!(s.body.len(), 0);
    }
}
