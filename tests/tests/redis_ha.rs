//! Limits and budgets on highly available Redis (issue 17, item 5), against real topologies
//! started from Debian's `redis-server` and `redis-sentinel` on loopback
//! (`.ci/install-ha.sh`):
//!
//! - Sentinel: a primary, two replicas and three sentinels; the primary is killed while calls
//!   are in flight. Calls are refused (`onUnavailable: deny`, counted) until the sentinels
//!   promote a replica, then the sidecar re-resolves the primary and carries on. The cap is
//!   never overspent (`minReplicas: 1` makes every reservation durable before forwarding).
//! - Cluster: three primaries with a replica each. The reservation scripts run on the primary
//!   of the hash tag's slot; a manual failover during traffic is followed (`MOVED`), and while
//!   the slot has no primary at all the `local` fallback applies and is counted.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_tests::harness::{call, eventually, free_port, TestProxy, Upstream};

/// One `redis-server` or `redis-sentinel` process on a loopback port, killed on drop.
struct Node {
    port: u16,
    bin: &'static str,
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn server(extra: &[&str]) -> Self {
        let mut n = Self {
            port: free_port(),
            bin: "redis-server",
            args: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.start();
        n
    }

    /// A sentinel monitoring `master` at `primary` (quorum 2, fast failure detection).
    fn sentinel(primary: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor tg 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds tg 1000\n\
                 sentinel failover-timeout tg 4000\n\
                 sentinel parallel-syncs tg 1\n",
                dir = dir.path().display()
            ),
        )
        .unwrap();
        let mut n = Self {
            port,
            bin: "redis-sentinel",
            args: vec![conf.display().to_string()],
            dir,
            child: None,
        };
        n.start();
        n
    }

    fn start(&mut self) {
        let mut cmd = Command::new(self.bin);
        if self.bin == "redis-sentinel" {
            cmd.args(&self.args);
        } else {
            cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(&self.args);
        }
        let child = cmd
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run .ci/install-ha.sh)", self.bin));
        self.child = Some(child);
        let port = self.port;
        eventually("redis node answers PING", || {
            cli(port, &["PING"]).trim() == "PONG"
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli -p PORT ARGS…`, stdout.
fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn config(up: &Upstream, limits: &str) -> String {
    let a = up.addr;
    format!(
        r#"
agent: {{name: billing, tenants: [acme]}}
tools:
  - name: pay.charge
    match: {{host: "{a}", methods: [POST], path: /v1/charges}}
    cost: {{perCallUsd: 1.0}}
tenants:
  acme: {{budgets: {{dayUsd: 300}}}}
limits: {limits}
audit: {{path: audit.jsonl}}
"#
    )
}

fn charge(proxy: SocketAddr, up: SocketAddr) -> (u16, String) {
    let r = call(
        proxy,
        "POST",
        &format!("http://{up}/v1/charges"),
        &[
            ("X-Tollgate-Tenant", "acme"),
            ("Content-Type", "application/json"),
        ],
        Some("{}"),
    );
    (r.status, r.body_text())
}

/// Statuses of the calls `threads` clients made until `stop`.
fn traffic(
    proxy: SocketAddr,
    up: SocketAddr,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<(u16, String)>>> {
    (0..threads)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) && out.len() < 2000 {
                    out.push(charge(proxy, up));
                    std::thread::sleep(Duration::from_millis(50));
                }
                out
            })
        })
        .collect()
}

fn series(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The `spent` and `reserved` of the tenant's day counter, read on the node at `port`.
fn tenant_day(port: u16) -> (i64, i64) {
    let keys = cli(
        port,
        &["--scan", "--pattern", "tollgate:{tg}:tenant:acme:*"],
    );
    let key = keys
        .lines()
        .find(|k| !k.ends_with(":res") && !k.ends_with(":amt"))
        .unwrap_or_else(|| panic!("no tenant day counter on {port}: {keys:?}"))
        .to_string();
    let v = cli(port, &["HMGET", &key, "spent", "reserved"]);
    let mut it = v.lines().map(|l| l.trim().parse::<i64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[test]
fn sentinel_failover_during_traffic_never_overspends_and_denies_while_no_primary() {
    let primary = Node::server(&[]);
    let p0 = primary.port.to_string();
    let r1 = Node::server(&["--replicaof", "127.0.0.1", &p0]);
    let r2 = Node::server(&["--replicaof", "127.0.0.1", &p0]);
    let mut primary = primary;
    let sentinels: Vec<Node> = (0..3).map(|_| Node::sentinel(primary.port)).collect();
    eventually("sentinels see both replicas and each other", || {
        let info = cli(sentinels[0].port, &["SENTINEL", "MASTER", "tg"]);
        let mut lines = info.lines();
        let mut ok = (false, false);
        while let Some(k) = lines.next() {
            let v = lines.next().unwrap_or("");
            if k == "num-slaves" {
                ok.0 = v == "2";
            }
            if k == "num-other-sentinels" {
                ok.1 = v == "2";
            }
        }
        ok == (true, true)
    });
    let up = Upstream::start();
    let urls: Vec<String> = sentinels
        .iter()
        .map(|s| format!("\"{}\"", s.url()))
        .collect();
    let limits = format!(
        "{{backend: redis, sentinel: {{masterName: tg, urls: [{}]}}, minReplicas: 1, onUnavailable: deny}}",
        urls.join(", ")
    );
    let proxy = TestProxy::start(&config(&up, &limits), &[]);
    eventually("the first call reaches Redis", || {
        charge(proxy.proxy, up.addr).0 == 200
    });

    let stop = Arc::new(AtomicBool::new(false));
    let workers = traffic(proxy.proxy, up.addr, 3, stop.clone());
    // Let some calls through, then kill the primary mid-traffic.
    eventually("calls flow before the failover", || up.count() >= 8);
    primary.kill();
    let killed_at = Instant::now();
    // The sentinels promote a replica; the sidecar finds it and calls succeed again.
    let promoted = {
        let mut found = None;
        while found.is_none() && killed_at.elapsed() < Duration::from_secs(60) {
            let addr = cli(
                sentinels[1].port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "tg"],
            );
            let port: u16 = addr
                .lines()
                .nth(1)
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            if port == r1.port || port == r2.port {
                found = Some(port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        found.expect("the sentinels promoted a replica")
    };
    // Bring the old primary back: the sentinels turn it into a replica of the new one, so the
    // promoted primary has replicas to acknowledge reservations again.
    primary.start();
    let after = up.count();
    eventually("calls are allowed again after the failover", || {
        up.count() > after + 5 || proxy.audit().iter().any(|r| r["decision"] == "over_budget")
    });
    // Drive the budget to its cap.
    eventually("the cap is reached", || {
        charge(proxy.proxy, up.addr).0 == 402
    });
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u16, String)> = workers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();

    let allowed = results.iter().filter(|(s, _)| *s == 200).count() + 1;
    let unavailable = results
        .iter()
        .filter(|(s, b)| *s == 503 && b.contains("limits_unavailable"))
        .count();
    let unexpected: Vec<_> = results
        .iter()
        .filter(|(s, b)| {
            !(*s == 200 || *s == 402 || (*s == 503 && b.contains("limits_unavailable")))
        })
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    // $1 a call against a $300 day cap: never more than 300 forwarded, and the cap was
    // reached. Every forwarded call is on the promoted primary, settled or (a call in flight
    // when its primary died) still held by its durable reservation.
    let forwarded = up.count() as i64;
    assert!(forwarded <= 300, "overspent: {forwarded} calls forwarded");
    assert!(allowed as i64 <= forwarded);
    let (spent, reserved) = tenant_day(promoted);
    assert!(
        spent + reserved <= 300_000_000,
        "spent {spent} + reserved {reserved} µ$ over the cap"
    );
    assert!(
        spent + reserved >= forwarded * 1_000_000,
        "the promoted primary lost calls: spent {spent} + reserved {reserved} for {forwarded} forwarded"
    );
    // While no primary was reachable, calls were refused as configured, and counted.
    assert!(unavailable > 0, "no call saw the outage: {results:?}");
    let m = proxy.metrics();
    assert!(
        series(
            &m,
            r#"tollgate_limits_unavailable_total{on_unavailable="deny"}"#
        ) >= unavailable as f64,
        "{m}"
    );
    assert_eq!(
        series(&m, r#"tollgate_fail_open_total{reason="limits_redis"}"#),
        0.0
    );
    drop(r1);
    drop(r2);
}

/// Six `redis-server --cluster-enabled yes` nodes joined with `redis-cli --cluster create`
/// (three primaries, one replica each).
fn cluster() -> Vec<Node> {
    let nodes: Vec<Node> = (0..6)
        .map(|_| {
            Node::server(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
                "--cluster-config-file",
                "nodes.conf",
            ])
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .expect("redis-cli (redis-tools)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the cluster is ok", || {
        nodes
            .iter()
            .all(|n| cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    });
    // `cluster_state:ok` comes before gossip has told every node who replicates whom.
    eventually("every node knows the three replicas", || {
        nodes.iter().all(|n| {
            cli(n.port, &["CLUSTER", "NODES"])
                .lines()
                .filter(|l| {
                    l.split_whitespace()
                        .nth(2)
                        .is_some_and(|f| f.contains("slave"))
                })
                .count()
                == 3
        })
    });
    nodes
}

/// Index of the node whose `CLUSTER NODES` line says it serves `slot` as primary, and of its
/// replica.
fn slot_owner(nodes: &[Node], slot: u16) -> (usize, usize) {
    let (primary, table) = slot_primary(nodes, slot).expect("slot has a primary");
    let id = table
        .lines()
        .find(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|a| a.split(['@', ':']).nth(1))
                == Some(nodes[primary].port.to_string().as_str())
        })
        .and_then(|l| l.split_whitespace().next())
        .expect("the primary is listed")
        .to_string();
    let replica = table
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some(id.as_str()))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|a| a.split(['@', ':']).nth(1))
        .and_then(|p| p.parse::<u16>().ok())
        .and_then(|port| nodes.iter().position(|n| n.port == port))
        .expect("slot primary has a replica");
    (primary, replica)
}

/// Index of the node serving `slot` as primary, per node 0's `CLUSTER NODES`, with the table.
fn slot_primary(nodes: &[Node], slot: u16) -> Option<(usize, String)> {
    let table = cli(nodes[0].port, &["CLUSTER", "NODES"]);
    let mut primary_id = None;
    let mut primary = None;
    for l in table.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
            continue;
        }
        let serves = f[8..].iter().any(|r| match r.split_once('-') {
            Some((a, b)) => {
                a.parse::<u16>().is_ok_and(|a| a <= slot)
                    && b.parse::<u16>().is_ok_and(|b| slot <= b)
            }
            None => r.parse::<u16>() == Ok(slot),
        });
        if serves {
            primary_id = Some(f[0].to_string());
            let port: u16 = f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
            primary = nodes.iter().position(|n| n.port == port);
        }
    }
    let _ = primary_id?;
    Some((primary?, table))
}

#[test]
fn cluster_runs_reservations_in_one_slot_follows_a_failover_and_falls_back_when_no_primary() {
    let mut nodes = cluster();
    let slot: u16 = cli(nodes[0].port, &["CLUSTER", "KEYSLOT", "tollgate:{tg}:x"])
        .trim()
        .parse()
        .unwrap();
    let up = Upstream::start();
    let seeds: Vec<String> = nodes
        .iter()
        .take(3)
        .map(|n| format!("\"{}\"", n.url()))
        .collect();
    let limits = |on: &str| {
        format!(
            "{{backend: redis, cluster: {{urls: [{}]}}, minReplicas: 1, onUnavailable: {on}}}",
            seeds.join(", ")
        )
    };
    let proxy = TestProxy::start(&config(&up, &limits("deny")), &[]);
    eventually("the first call reaches Redis", || {
        charge(proxy.proxy, up.addr).0 == 200
    });
    let (primary, replica) = slot_owner(&nodes, slot);
    eventually("the call settled on the slot's primary", || {
        tenant_day(nodes[primary].port) == (1_000_000, 0)
    });

    // A manual failover during traffic: the replica takes the slot, the client follows MOVED.
    let stop = Arc::new(AtomicBool::new(false));
    let workers = traffic(proxy.proxy, up.addr, 3, stop.clone());
    eventually("calls flow", || up.count() >= 6);
    assert!(cli(nodes[replica].port, &["CLUSTER", "FAILOVER"]).contains("OK"));
    // Mid-failover the demoted primary is not yet listed as the new one's replica: only the
    // primary is asked for here.
    eventually("the replica took over the slot", || {
        slot_primary(&nodes, slot).is_some_and(|(p, _)| p == replica)
    });
    let after = up.count();
    eventually("calls continue after the failover", || {
        up.count() > after + 5
    });
    eventually("the cap is reached", || {
        charge(proxy.proxy, up.addr).0 == 402
    });
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u16, String)> = workers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let unexpected: Vec<_> = results
        .iter()
        .filter(|(s, b)| {
            !(*s == 200 || *s == 402 || (*s == 503 && b.contains("limits_unavailable")))
        })
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    let forwarded = up.count() as i64;
    assert!(forwarded <= 300, "overspent: {forwarded} calls forwarded");
    let (spent, reserved) = tenant_day(nodes[replica].port);
    assert!(spent + reserved <= 300_000_000);
    assert!(
        spent + reserved >= forwarded * 1_000_000,
        "the new primary lost calls: spent {spent} + reserved {reserved} for {forwarded} forwarded"
    );

    // No primary for the slot at all (both of its nodes down): a sidecar with
    // `onUnavailable: local` falls back and counts it, one with `deny` refuses and counts it.
    let local = TestProxy::start(&config(&up, &limits("local")), &[]);
    nodes[replica].kill();
    nodes[primary].kill();
    let before = up.count();
    eventually("the local fallback serves calls", || {
        charge(local.proxy, up.addr).0 == 200
    });
    assert!(up.count() > before);
    let (status, body) = charge(proxy.proxy, up.addr);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("limits_unavailable"), "{body}");
    let m = local.metrics();
    assert!(
        series(&m, r#"tollgate_fail_open_total{reason="limits_redis"}"#) >= 1.0,
        "{m}"
    );
    assert!(
        series(
            &m,
            r#"tollgate_limits_unavailable_total{on_unavailable="local"}"#
        ) >= 1.0,
        "{m}"
    );
    let m = proxy.metrics();
    assert!(
        series(
            &m,
            r#"tollgate_limits_unavailable_total{on_unavailable="deny"}"#
        ) >= 1.0,
        "{m}"
    );
}
