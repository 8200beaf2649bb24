//! Transparent mode end to end (issue 4), with real iptables in a network namespace this test
//! creates: a veth pair joins the namespace (agent pod: sidecar + agent) to the host side
//! (upstreams). `tollgate-proxy iptables --apply` installs the redirect; a process running as
//! another UID, with no proxy settings at all, calls upstreams directly. Its calls are
//! intercepted, decided and audited, and it cannot reach a host that is no tool.
//!
//! Needs root (CI runs as root); without it the test fails rather than pretending.

use std::process::Command;
use tollgate_tests::harness::{bin, eventually, free_port, TestPki, TestProxy, Upstream};

fn sh(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run .ci/install-tools.sh)", args[0]));
    out
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to the host by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    fn new() -> Self {
        assert_eq!(
            unsafe_free_euid(),
            0,
            "the transparent-mode test needs root for network namespaces and iptables (CI runs as root)"
        );
        let id = std::process::id();
        let name = format!("tgt{id}");
        let (host_if, ns_if) = (format!("tgh{id}"), format!("tgn{id}"));
        let (a, b) = ((id >> 8) % 250 + 1, (id % 64) * 4);
        let host_ip = format!("10.{a}.{b}.1", b = b);
        let ns_ip = format!("10.{a}.{b}.2", b = b);
        let n = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
        };
        must(&["ip", "netns", "add", &name]);
        must(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        must(&["ip", "link", "set", &ns_if, "netns", &name]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ]);
        must(&["ip", "link", "set", &host_if, "up"]);
        must(&[
            "ip",
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        must(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", &ns_if, "up",
        ]);
        must(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ]);
        // `ip netns exec` bind-mounts /etc/netns/NAME/hosts over /etc/hosts.
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            format!("{etc}/hosts"),
            format!("127.0.0.1 localhost\n{host_ip} api.tollgate.test\n"),
        )
        .unwrap();
        n
    }

    /// Add another address on the host side, reachable from the namespace: a destination the
    /// agent can pick that is no tool host. Unique per namespace (third octet `b + 1` is never
    /// used by another namespace's /30).
    fn add_host_address(&self) -> String {
        let mut octets: Vec<u32> = self
            .host_ip
            .split('.')
            .map(|o| o.parse().unwrap())
            .collect();
        octets[2] += 1;
        let ip = format!("{}.{}.{}.1", octets[0], octets[1], octets[2]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            &self.host_if,
        ]);
        let ns_if = self.host_if.replacen("tgh", "tgn", 1);
        must(&self.exec(&["ip", "route", "add", &format!("{ip}/32"), "dev", &ns_if]));
        ip
    }

    /// Add names to the namespace's /etc/hosts, all resolving to the host side.
    fn add_hosts(&self, names: &[&str]) {
        let path = format!("/etc/netns/{}/hosts", self.name);
        let mut hosts = std::fs::read_to_string(&path).unwrap();
        for n in names {
            hosts.push_str(&format!("{} {n}\n", self.host_ip));
        }
        std::fs::write(&path, hosts).unwrap();
    }

    fn exec<'a>(&'a self, rest: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", self.name.as_str()];
        v.extend_from_slice(rest);
        v
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "delete", &self.name]);
        let _ = sh(&["ip", "link", "delete", &self.host_if]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// The effective UID, read from /proc (no unsafe code in the test suite).
fn unsafe_free_euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap()
}

/// Run curl in the namespace as UID/GID 65534 with no proxy environment.
fn agent_curl(ns: &Netns, args: &[&str]) -> (u16, String) {
    let mut full = ns.exec(&[
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "15",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--noproxy",
        "*",
    ]);
    full.extend_from_slice(args);
    let out = Command::new(full[0])
        .args(&full[1..])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn redirected_calls_from_another_uid_are_intercepted_decided_and_audited() {
    let ns = Netns::new();
    let pki = TestPki::with_names(&["api.tollgate.test"]);
    let plain = Upstream::start_on(&format!("{}:0", ns.host_ip), None);
    let secure = Upstream::start_on(&format!("{}:0", ns.host_ip), Some(&pki));
    let stranger = Upstream::start_on(&format!("{}:0", ns.host_ip), None);
    let (p1, p2, p3) = (plain.addr.port(), secure.addr.port(), stranger.addr.port());

    let dir = tempfile::tempdir().unwrap();
    let ca = Command::new(bin("tollgate-proxy"))
        .args(["ca", "init", "--out"])
        .arg(dir.path().join("ca"))
        .output()
        .unwrap();
    assert!(ca.status.success());
    let agent_ca = dir.path().join("ca/ca.crt");
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
    // The agent (UID 65534) must be able to read the CA it trusts.
    let _ = std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );
    let _ = std::fs::set_permissions(
        dir.path().join("ca"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );

    let (admin_port, tport) = (free_port(), free_port());
    let host_ip = &ns.host_ip;
    let config = format!(
        r#"
listen: {{proxy: "127.0.0.1:{pp}", admin: "{ns_ip}:{admin_port}", transparent: "0.0.0.0:{tport}"}}
agent: {{name: support, tenants: [acme]}}
tools:
  - name: crm.note
    match: {{host: "{host_ip}:{p1}", methods: [POST], path: /v1/notes}}
  - name: pay.charge
    match: {{host: "api.tollgate.test:{p2}", methods: [POST], path: /v1/charges}}
tls:
  extraCaFile: {up_ca}
  intercept: {{caCert: ca/ca.crt, caKey: ca/ca.key}}
audit: {{path: audit.jsonl}}
policies:
  modules:
    - name: charges.rego
      rego: |
        package tollgate
        import rego.v1
        deny contains "charges over 100 need a human" if input.request.body.amount > 100
"#,
        pp = free_port(),
        ns_ip = ns.ns_ip,
        up_ca = upstream_ca.display(),
    );
    let proxy_addr = format!("{}:{tport}", ns.ns_ip).parse().unwrap();
    let admin = format!("{}:{admin_port}", ns.ns_ip).parse().unwrap();
    let exe = ns.exec(&[]);
    let proxy = TestProxy::start_custom(dir, &config, proxy_addr, admin, &exe, &[]);

    // The printed rules are the applied ones.
    let exe_path = bin("tollgate-proxy").display().to_string();
    let (tp, ap, ports) = (
        tport.to_string(),
        admin_port.to_string(),
        format!("{p1},{p2},{p3}"),
    );
    let rule_args = [
        "--proxy-uid",
        "0",
        "--to-port",
        &tp,
        "--admin-port",
        &ap,
        "--ports",
        &ports,
        "--no-ipv6",
    ];
    let mut print_cmd = ns.exec(&[&exe_path, "iptables"]);
    print_cmd.extend_from_slice(&rule_args);
    let printed = sh(&print_cmd);
    let script = String::from_utf8_lossy(&printed.stdout);
    assert!(
        script.contains(&format!("--dport {p1} -j REDIRECT --to-ports {tport}")),
        "{script}"
    );
    let mut apply = ns.exec(&[&exe_path, "iptables", "--apply"]);
    apply.extend_from_slice(&rule_args);
    must(&apply);
    // Idempotent: applying twice leaves one set of rules.
    must(&apply);
    let rules = sh(&ns.exec(&["iptables", "-w", "-t", "nat", "-S"]));
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(
        rules.matches("-A OUTPUT -p tcp -j TOLLGATE_OUTPUT").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules.matches(&format!("--dport {p1} ")).count(),
        1,
        "{rules}"
    );

    // Plain HTTP, straight at the upstream's IP: intercepted and allowed.
    let (code, body) = agent_curl(
        &ns,
        &[
            "-X",
            "POST",
            "-H",
            "X-Tollgate-Tenant: acme",
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"text":"hi"}"#,
            &format!("http://{host_ip}:{p1}/v1/notes"),
        ],
    );
    assert_eq!(code, 200, "{body}\n{}", proxy.log());
    assert_eq!(plain.count(), 1);
    assert!(plain.seen()[0].header("x-tollgate-tenant").is_none());
    // Without the tenant header the pipeline refuses: proof the call went through Tollgate.
    let (code, body) = agent_curl(
        &ns,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data",
            "{}",
            &format!("http://{host_ip}:{p1}/v1/notes"),
        ],
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("X-Tollgate-Tenant"), "{body}");

    // HTTPS by name: the SNI names the host, the leaf is minted by the interception CA.
    let url = format!("https://api.tollgate.test:{p2}/v1/charges");
    let ca_arg = agent_ca.display().to_string();
    let (code, body) = agent_curl(
        &ns,
        &[
            "--cacert",
            &ca_arg,
            "-X",
            "POST",
            "-H",
            "X-Tollgate-Tenant: acme",
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"amount":50}"#,
            &url,
        ],
    );
    assert_eq!(code, 200, "{body}\n{}", proxy.log());
    let (code, body) = agent_curl(
        &ns,
        &[
            "--cacert",
            &ca_arg,
            "-X",
            "POST",
            "-H",
            "X-Tollgate-Tenant: acme",
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"amount":500}"#,
            &url,
        ],
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("charges over 100"), "{body}");
    assert_eq!(secure.count(), 1);

    // A host that is no tool cannot be reached, by plain HTTP or by TLS.
    let (code, body) = agent_curl(
        &ns,
        &[
            "-H",
            "X-Tollgate-Tenant: acme",
            &format!("http://{host_ip}:{p3}/"),
        ],
    );
    assert_eq!(code, 403, "{body}");
    let (code, _) = agent_curl(
        &ns,
        &[
            "--cacert",
            &ca_arg,
            "--resolve",
            &format!("evil.example.com:{p3}:{host_ip}"),
            &format!("https://evil.example.com:{p3}/"),
        ],
    );
    assert_eq!(
        code, 0,
        "TLS to a non-tool host is cut before the handshake completes"
    );
    // A forged Host on a redirected connection does not choose another tool's host and port.
    let (code, body) = agent_curl(
        &ns,
        &[
            "-X",
            "POST",
            "-H",
            &format!("Host: api.tollgate.test:{p2}"),
            "-H",
            "X-Tollgate-Tenant: acme",
            "-H",
            "Content-Type: application/json",
            "--data",
            "{}",
            &format!("http://{host_ip}:{p3}/v1/charges"),
        ],
    );
    assert_ne!(code, 200, "{body}");
    assert_eq!(stranger.count(), 0, "the non-tool upstream saw nothing");
    assert_eq!(secure.count(), 1);

    eventually("transparent records", || {
        let recs = proxy.audit();
        recs.iter().any(|r| {
            r["via"] == "transparent" && r["tool"] == "crm.note" && r["decision"] == "allow"
        }) && recs.iter().any(|r| {
            r["via"] == "transparent"
                && r["tool"] == "pay.charge"
                && r["decision"] == "deny"
                && r["scheme"] == "https"
        })
    });
}

/// Issue 13, class 8: transparent-mode TLS passthrough used to splice the agent's bytes to the
/// packet's original destination, so an agent could name a passthrough tool in the SNI and
/// send the connection anywhere; and it checked neither kill switch nor tenant. Now the
/// upstream is the tool host the SNI named, dialled by name, after the same host-level gate as
/// a CONNECT passthrough.
#[test]
fn transparent_passthrough_reaches_the_sni_host_after_the_host_level_gate() {
    let ns = Netns::new();
    ns.add_hosts(&["vault.tollgate.test", "frozen.tollgate.test"]);
    let decoy_ip = ns.add_host_address();
    let pki = TestPki::with_names(&["vault.tollgate.test", "frozen.tollgate.test"]);
    let vault = Upstream::start_on(&format!("{}:0", ns.host_ip), Some(&pki));
    let pv = vault.addr.port();
    // Same port, another address: where the agent points its packets.
    let decoy = Upstream::start_on(&format!("{decoy_ip}:{pv}"), Some(&pki));
    let frozen = Upstream::start_on(&format!("{}:0", ns.host_ip), Some(&pki));
    let pf = frozen.addr.port();

    let dir = tempfile::tempdir().unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
    let _ = std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );
    let (admin_port, tport) = (free_port(), free_port());
    let config = format!(
        r#"
listen: {{proxy: "127.0.0.1:{pp}", admin: "{ns_ip}:{admin_port}", transparent: "0.0.0.0:{tport}"}}
agent: {{name: support, tenants: [acme]}}
tools:
  - name: vault.read
    match: {{host: "vault.tollgate.test:{pv}"}}
    passthrough: true
  - name: frozen.read
    match: {{host: "frozen.tollgate.test:{pf}"}}
    passthrough: true
killSwitches:
  - {{name: freeze, scope: {{tool: frozen.read}}, engaged: true, reason: INC-7}}
audit: {{path: audit.jsonl}}
"#,
        pp = free_port(),
        ns_ip = ns.ns_ip,
    );
    let proxy_addr = format!("{}:{tport}", ns.ns_ip).parse().unwrap();
    let admin = format!("{}:{admin_port}", ns.ns_ip).parse().unwrap();
    let exe = ns.exec(&[]);
    let proxy = TestProxy::start_custom(dir, &config, proxy_addr, admin, &exe, &[]);
    let exe_path = bin("tollgate-proxy").display().to_string();
    let (tp, ap, ports) = (
        tport.to_string(),
        admin_port.to_string(),
        format!("{pv},{pf}"),
    );
    let mut apply = ns.exec(&[&exe_path, "iptables", "--apply"]);
    apply.extend_from_slice(&[
        "--proxy-uid",
        "0",
        "--to-port",
        &tp,
        "--admin-port",
        &ap,
        "--ports",
        &ports,
        "--no-ipv6",
    ]);
    must(&apply);
    let ca_arg = upstream_ca.display().to_string();

    // By name: passed through untouched (the agent verifies the upstream's own certificate).
    let vault_url = format!("https://vault.tollgate.test:{pv}/secret");
    let (code, body) = agent_curl(&ns, &["--cacert", &ca_arg, &vault_url]);
    assert_eq!(code, 200, "{body}\n{}", proxy.log());
    assert_eq!(vault.count(), 1);

    // The SNI names the passthrough host, the packets go to another address: the sidecar
    // dials the tool host, so the decoy sees nothing.
    let resolve = format!("vault.tollgate.test:{pv}:{decoy_ip}");
    let (code, body) = agent_curl(
        &ns,
        &["--cacert", &ca_arg, "--resolve", &resolve, &vault_url],
    );
    assert_eq!(code, 200, "{body}\n{}", proxy.log());
    assert_eq!(
        decoy.count(),
        0,
        "the agent-chosen destination received the tunnel"
    );
    assert_eq!(vault.count(), 2);

    // A kill switch covering a passthrough tool stops its tunnel before any byte is forwarded.
    let frozen_url = format!("https://frozen.tollgate.test:{pf}/secret");
    let (code, _) = agent_curl(&ns, &["--cacert", &ca_arg, &frozen_url]);
    assert_eq!(code, 0, "a killed passthrough tunnel is cut");
    assert_eq!(frozen.count(), 0);

    let records_hold = || {
        let recs = proxy.audit();
        let passed = recs
            .iter()
            .filter(|r| {
                r["passthrough"] == true
                    && r["via"] == "transparent"
                    && r["tool"] == "vault.read"
                    && r["tenant"] == "acme"
                    && r["host"] == "vault.tollgate.test"
            })
            .count();
        let killed = recs.iter().any(|r| {
            r["via"] == "transparent"
                && r["decision"] == "killed"
                && r["tenant"] == "acme"
                && r["reasons"].to_string().contains("freeze")
                && r["host"] == "frozen.tollgate.test"
        });
        passed == 2 && killed
    };
    for _ in 0..200 {
        if records_hold() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(records_hold(), "{:#?}", proxy.audit());
    let m = proxy.metrics();
    assert!(
        m.contains(r#"tollgate_tunnels_refused_total{reason="killed",via="transparent"} 1"#),
        "{m}"
    );

    // An agent with several tenants: an opaque tunnel cannot say which, so it is refused.
    let version = |p: &TestProxy| {
        tollgate_tests::harness::get(p.admin, "/config")
            .map(|r| r.json()["version"].clone())
            .unwrap_or_default()
    };
    let before = version(&proxy);
    let tmp = proxy.dir.path().join("tollgate.yaml.tmp");
    std::fs::write(
        &tmp,
        config.replace("tenants: [acme]", "tenants: [acme, globex]"),
    )
    .unwrap();
    std::fs::rename(&tmp, proxy.config_path()).unwrap();
    eventually("the two-tenant config is loaded", || {
        version(&proxy) != before
    });
    let (code, _) = agent_curl(&ns, &["--cacert", &ca_arg, &vault_url]);
    assert_eq!(code, 0, "an ambiguous tenant is refused");
    assert_eq!(vault.count(), 2);
    eventually("the tenant refusal is recorded", || {
        proxy.audit().iter().any(|r| {
            r["via"] == "transparent"
                && r["decision"] != "allow"
                && r["reasons"]
                    .to_string()
                    .contains("carries no X-Tollgate-Tenant")
        })
    });
}
