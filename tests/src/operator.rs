//! The operator binary against the in-process test API server, its sidecars, and
//! `kubectl tollgate`, shared by the end-to-end tests that run a cluster's control plane.

use crate::harness::{bin, eventually, free_port, get, TestProxy};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use tollgate_operator::testapi::TestApiServer;

/// A running `tollgate-operator` (killed on drop). It writes `dir/kubeconfig` for the API
/// server, which [`kubectl_tollgate`] then uses, and logs to `dir/operator-<port>.log`.
pub struct Operator {
    pub child: Child,
    pub port: u16,
}

impl Operator {
    /// One replica without leader election, on a free port.
    pub fn start(api: &TestApiServer, dir: &Path) -> Self {
        Self::start_as(api, dir, free_port(), None)
    }

    /// On `port`; with `identity`, the replica takes part in leader election under that name.
    pub fn start_as(api: &TestApiServer, dir: &Path, port: u16, identity: Option<&str>) -> Self {
        let kc = dir.join("kubeconfig");
        std::fs::write(&kc, api.kubeconfig()).unwrap();
        let log = std::fs::File::create(dir.join(format!("operator-{port}.log"))).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["run", "--listen", listen.as_str()];
        match identity {
            Some(id) => args.extend(["--identity", id, "--lease-namespace", "tollgate-system"]),
            None => args.push("--no-leader-elect"),
        }
        let child = Command::new(bin("tollgate-operator"))
            .args(&args)
            .env("KUBECONFIG", &kc)
            .env("TOLLGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr = listen.parse().unwrap();
        eventually("operator ready", || {
            get(addr, "/readyz")
                .map(|r| r.status == 200)
                .unwrap_or(false)
        });
        Self { child, port }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sidecar in operator mode for `agents/billing`, authenticating with `token`.
pub fn sidecar(op_port: u16, token: &str) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), token).unwrap();
    let (pp, ap) = (free_port(), free_port());
    let local = format!("listen: {{proxy: \"127.0.0.1:{pp}\", admin: \"127.0.0.1:{ap}\"}}\nagent: {{name: local, tenants: []}}\naudit: {{path: audit.jsonl}}\n");
    let token_file = dir.path().join("token").display().to_string();
    let url = format!("http://127.0.0.1:{op_port}");
    TestProxy::start_custom(
        dir,
        &local,
        format!("127.0.0.1:{pp}").parse().unwrap(),
        format!("127.0.0.1:{ap}").parse().unwrap(),
        &[],
        &[
            ("TOLLGATE_OPERATOR", url.as_str()),
            ("TOLLGATE_AGENT", "agents/billing"),
            ("TOLLGATE_TOKEN_FILE", token_file.as_str()),
        ],
    )
}

/// Run `kubectl tollgate` against the API server of the operator started in `dir`: whether it
/// succeeded, and its stdout then stderr.
pub fn kubectl_tollgate(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("kubectl-tollgate"))
        .args(args)
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}
