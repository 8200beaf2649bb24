//! The Helm chart (issue 7) checked with the real tools: `helm lint --strict` and
//! `helm template` with default values and with every optional feature on, the rendered
//! manifests validated against the Kubernetes schemas (`kubernetes-validate`), the Tollgate
//! objects it renders validated against the generated CRD schemas, the PrometheusRule checked
//! by `promtool`, and the chart's copies of the CRDs and policies kept in sync. Tools come
//! from `.ci/install-tools.sh`; a missing tool fails the test.

use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("charts/tollgate")
}

fn tool(name: &str) -> Command {
    let probe = Command::new(name).arg("--help").output();
    assert!(
        probe.is_ok(),
        "{name} is not installed: run .ci/install-tools.sh"
    );
    Command::new(name)
}

/// The Prometheus Operator's kinds, as a cluster that has its CRDs advertises them.
const PROMETHEUS_OPERATOR: &[&str] = &[
    "--api-versions",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PodMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
];

const ALL_ON: &[&str] = &[
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "defaultPolicies.enabled=true",
    "--set",
    "observability.prometheusRule.enabled=true",
    "--set",
    "operator.leaderElection=false",
    "--set",
    "operator.podDisruptionBudget.enabled=true",
];

fn template(extra: &[&str]) -> (bool, String, String) {
    let out = tool("helm")
        .args([
            "template",
            "tg",
            chart().to_str().unwrap(),
            "--namespace",
            "tollgate-system",
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn docs(yaml: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(yaml)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn helm_lint_passes_strict_with_defaults_and_everything_on() {
    // `helm lint` cannot be told the cluster has the Prometheus Operator CRDs (no
    // --api-versions), so it lints everything else on; the rendering test covers the rest.
    let lint_all: Vec<&str> = ALL_ON
        .chunks(2)
        .filter(|kv| !kv[1].starts_with("observability.prometheusRule"))
        .flatten()
        .copied()
        .collect();
    for extra in [&[][..], &lint_all[..]] {
        let out = tool("helm")
            .args(["lint", "--strict", chart().to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm lint {extra:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn rendered_manifests_validate_against_the_kubernetes_schemas() {
    for extra in [&[][..], ALL_ON] {
        let (ok, yaml, err) = template(&[extra, PROMETHEUS_OPERATOR].concat());
        assert!(ok, "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let out = tool("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", "1.33.0"])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {text}");
        assert!(!text.contains("ERROR"), "{text}");
        // Kinds kubernetes-validate has no schema for are checked here.
        for d in docs(&yaml) {
            let api = d["apiVersion"].as_str().unwrap_or("");
            if api.starts_with("tollgate.dev/") {
                validate_against_crd(&d);
            }
            if d["kind"] == "ServiceMonitor" || d["kind"] == "PodMonitor" {
                let eps = if d["kind"] == "ServiceMonitor" {
                    &d["spec"]["endpoints"]
                } else {
                    &d["spec"]["podMetricsEndpoints"]
                };
                assert_eq!(eps[0]["path"], "/metrics", "{d}");
            }
            if d["kind"] == "PrometheusRule" {
                let rules = dir.path().join("rule.yaml");
                std::fs::write(&rules, yaml_serde::to_string(&d["spec"]).unwrap()).unwrap();
                let out = tool("promtool")
                    .args(["check", "rules"])
                    .arg(&rules)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
    }
}

fn validate_against_crd(obj: &Value) {
    let kind = obj["kind"].as_str().unwrap().to_lowercase();
    let crd: Value = yaml_serde::from_str(
        &std::fs::read_to_string(root().join(format!("crds/{kind}.yaml"))).unwrap(),
    )
    .unwrap();
    let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let v = jsonschema_validator(&schema);
    let errors: Vec<String> = v.iter_errors(obj).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{kind} {}: {errors:?}",
        obj["metadata"]["name"]
    );
}

fn jsonschema_validator(schema: &Value) -> jsonschema::Validator {
    // OpenAPI v3 schemas use `nullable`; strip the Kubernetes extensions jsonschema ignores anyway.
    jsonschema::validator_for(schema).expect("CRD schema compiles")
}

#[test]
fn the_deployment_is_hardened_and_sized() {
    let (ok, yaml, err) = template(&[]);
    assert!(ok, "{err}");
    let all = docs(&yaml);
    let dep = all
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("operator Deployment");
    assert_eq!(dep["spec"]["replicas"], 2);
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"run") && args.iter().any(|a| a.starts_with("--webhook-listen=")));
    assert!(all.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
    // CRDs are kept on uninstall.
    let crds: Vec<_> = all
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), 7);
    assert!(crds
        .iter()
        .all(|c| c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"));
    // Least privilege: no wildcards, no secrets access.
    let role = all.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let text = role.to_string();
    assert!(!text.contains("\"*\""), "no wildcard rules: {text}");
    for rule in role["rules"].as_array().unwrap() {
        if rule["resources"].to_string().contains("secrets") {
            // Update: the certificates rotate (the operator's Secrets and each namespace's
            // interception CA copy).
            assert_eq!(
                rule["verbs"],
                serde_json::json!(["get", "create", "update"]),
                "Secrets: get, create and update only, never list or watch: {rule}"
            );
        }
    }
    // The helm test pod checks operator health.
    let test = all
        .iter()
        .find(|d| d["metadata"]["annotations"]["helm.sh/hook"] == "test")
        .expect("helm test pod");
    assert!(test.to_string().contains("/readyz"));
    // The dashboard ships with the Grafana sidecar label.
    let cm = all
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("dashboard ConfigMap");
    let dash: Value = serde_json::from_str(cm["data"]["tollgate.json"].as_str().unwrap()).unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 10);
}

#[test]
fn values_schema_rejects_typos_and_bad_values() {
    for bad in [
        &["--set", "operater.replicas=3"][..],
        &["--set", "operator.replicas=0"],
        &["--set", "webhooks.failurePolicy=Sometimes"],
        &["--set", "networkPolicy.enable=true"],
    ] {
        let (ok, _, err) = template(bad);
        assert!(!ok, "{bad:?} must be rejected");
        assert!(err.contains("schema") || err.contains("values"), "{err}");
    }
    let (ok, _, err) = template(&["--set", "operator.replicas=3"]);
    assert!(ok, "{err}");
}

#[test]
fn chart_copies_of_crds_and_policies_are_current() {
    for entry in std::fs::read_dir(root().join("crds")).unwrap() {
        let p = entry.unwrap().path();
        let copy = chart().join("files/crds").join(p.file_name().unwrap());
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            std::fs::read_to_string(&copy).unwrap_or_default(),
            "{} is stale: run `make generate`",
            copy.display()
        );
    }
    for entry in std::fs::read_dir(root().join("policies")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !name.ends_with(".rego") || name.ends_with("_test.rego") {
            continue;
        }
        let copy = chart().join("files/policies").join(&name);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            std::fs::read_to_string(&copy).unwrap_or_default(),
            "{} is stale: run `make generate`",
            copy.display()
        );
    }
}

/// A pod injected by the webhook (plain and transparent mode) validates against the
/// Kubernetes schema.
#[test]
fn injected_pods_validate_against_the_kubernetes_schema() {
    use tollgate_operator::webhook::inject::{inject, IdentityFacts, InjectConfig};
    let cfg: InjectConfig = serde_json::from_value(serde_json::json!({"image": "ghcr.io/tollgate-dev/tollgate-proxy:0.1.0", "operatorUrl": "http://tollgate-operator.tollgate-system.svc:8080"})).unwrap();
    let facts = IdentityFacts {
        secrets: vec!["stripe".into()],
    };
    let dir = tempfile::tempdir().unwrap();
    for (i, annotations) in [
        serde_json::json!({}),
        serde_json::json!({"tollgate.dev/interception": "transparent"}),
    ]
    .into_iter()
    .enumerate()
    {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent", "namespace": "billing-agents", "labels": {"tollgate.dev/agent": "billing-dispute"}, "annotations": annotations},
            "spec": {"serviceAccountName": "billing-dispute", "containers": [{"name": "agent", "image": "example/agent:1"}]}
        }))
        .unwrap();
        let injected = inject(pod, &cfg, &facts).unwrap();
        let mut v = serde_json::to_value(&injected).unwrap();
        v["apiVersion"] = "v1".into();
        v["kind"] = "Pod".into();
        let sidecar = &v["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "tollgate-proxy")
            .cloned()
            .unwrap();
        assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
        let args: Vec<String> = sidecar["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        // The injected command line parses with the real binary's flags.
        let help = std::process::Command::new(tollgate_tests::harness::bin("tollgate-proxy"))
            .args(["run", "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(flag.as_str()),
                "{flag} is not a tollgate-proxy run flag"
            );
        }
        let file = dir.path().join(format!("pod-{i}.yaml"));
        std::fs::write(&file, yaml_serde::to_string(&v).unwrap()).unwrap();
        let out = tool("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", "1.33.0"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Issue 18: the Prometheus Operator options fail the install with a clear message when the
/// cluster lacks its CRDs (checked with `.Capabilities`), instead of an API error mid-install;
/// with the CRDs present they render. The chart states the oldest supported Kubernetes.
#[test]
fn prometheus_operator_kinds_need_their_crds_and_the_minimum_version_is_enforced() {
    for (flag, kind) in [
        (
            "observability.serviceMonitor.enabled=true",
            "ServiceMonitor",
        ),
        (
            "observability.prometheusRule.enabled=true",
            "PrometheusRule",
        ),
    ] {
        let (ok, _, err) = template(&["--set", flag]);
        assert!(!ok, "{flag} rendered without the Prometheus Operator CRDs");
        assert!(
            err.contains("Prometheus Operator CRDs") && err.contains(kind),
            "{err}"
        );
        let (ok, yaml, err) = template(&[&["--set", flag][..], PROMETHEUS_OPERATOR].concat());
        assert!(ok, "{err}");
        assert!(
            docs(&yaml).iter().any(|d| d["kind"] == kind),
            "{kind} rendered"
        );
    }
    let chart_yaml: Value =
        yaml_serde::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart_yaml["kubeVersion"],
        format!(">=1.{}.0-0", tollgate_operator::run::MIN_KUBERNETES_MINOR)
    );
    let (ok, _, err) = template(&["--kube-version", "1.28.3"]);
    assert!(!ok && err.contains("kubeVersion"), "1.28 is refused: {err}");
    assert!(template(&["--kube-version", "1.33.0"]).0);
}

/// Issue 18: ClusterRoles for the people who use Tollgate: approvers (read approval requests,
/// patch their status) and SREs (kill switches).
#[test]
fn the_chart_ships_roles_for_approvers_and_sres() {
    let (ok, yaml, err) = template(&[]);
    assert!(ok, "{err}");
    let roles = docs(&yaml);
    let role = |suffix: &str| {
        roles
            .iter()
            .find(|d| {
                d["kind"] == "ClusterRole"
                    && d["metadata"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .ends_with(suffix)
            })
            .unwrap_or_else(|| panic!("no ClusterRole *{suffix}"))
            .clone()
    };
    let verbs = |r: &Value, res: &str| -> Vec<String> {
        r["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["resources"].as_array().unwrap().iter().any(|y| y == res))
            .flat_map(|x| {
                x["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
            })
            .collect()
    };
    let approver = role("-approver");
    for v in ["get", "list", "watch"] {
        assert!(verbs(&approver, "approvalrequests").contains(&v.to_string()));
    }
    assert_eq!(verbs(&approver, "approvalrequests/status"), ["patch"]);
    assert!(
        verbs(&approver, "killswitches").is_empty(),
        "approvers cannot kill"
    );
    let sre = role("-sre");
    for v in ["create", "patch", "delete"] {
        assert!(verbs(&sre, "killswitches").contains(&v.to_string()));
    }
    assert!(
        verbs(&sre, "approvalrequests/status").is_empty(),
        "SREs do not approve"
    );
}

/// Issue 18: an emergency stop does not depend on the operator. KillSwitch writes go through
/// a webhook that is ignored when unreachable; approval decisions still fail closed.
#[test]
fn kill_switch_writes_do_not_depend_on_the_operator() {
    let (ok, yaml, err) = template(&[]);
    assert!(ok, "{err}");
    let mutating = docs(&yaml)
        .into_iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let hooks = mutating["webhooks"].as_array().unwrap();
    let covering = |res: &str| {
        hooks
            .iter()
            .filter(|h| {
                h["rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["resources"].as_array().unwrap().iter().any(|x| x == res))
            })
            .map(|h| h["failurePolicy"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(covering("killswitches"), ["Ignore"]);
    assert_eq!(covering("approvalrequests/status"), ["Fail"]);
    let validating = docs(&yaml)
        .into_iter()
        .find(|d| d["kind"] == "ValidatingWebhookConfiguration")
        .unwrap();
    assert!(
        !validating.to_string().contains("killswitches"),
        "no Fail-closed validating webhook on KillSwitches"
    );
}
