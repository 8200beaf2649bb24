//! `examples/kubernetes/` is a working example: every Tollgate object parses into its CRD
//! type, validates against the generated schema's required fields, and the identity builds
//! into a sidecar snapshot with the kill switch applied.

use serde::Deserialize;
use std::path::Path;
use tollgate_operator::build::{build_agent, World};

#[test]
fn the_kubernetes_example_builds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    let mut world = World::default();
    let mut kinds = Vec::new();
    let mut secrets = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc).unwrap();
            let kind = v["kind"].as_str().unwrap().to_string();
            let ctx = format!("{}: {kind}", f.display());
            match kind.as_str() {
                "AgentIdentity" => world
                    .identities
                    .push(serde_json::from_value(v).expect(&ctx)),
                "Tool" => world.tools.push(serde_json::from_value(v).expect(&ctx)),
                "AgentPolicy" => world.policies.push(serde_json::from_value(v).expect(&ctx)),
                "Tenant" => world.tenants.push(serde_json::from_value(v).expect(&ctx)),
                "KillSwitch" => world
                    .kill_switches
                    .push(serde_json::from_value(v).expect(&ctx)),
                "Secret" => {
                    let name = v["metadata"]["name"].as_str().unwrap();
                    for key in v["stringData"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, _)| k)
                    {
                        secrets.push(format!("{name}/{key}"));
                    }
                }
                _ => {}
            }
            kinds.push(kind);
        }
    }
    for k in [
        "Namespace",
        "Tenant",
        "Tool",
        "AgentPolicy",
        "AgentIdentity",
        "Deployment",
        "KillSwitch",
    ] {
        assert!(kinds.iter().any(|x| x == k), "example lacks a {k}");
    }
    for p in &world.policies {
        tollgate_operator::build::validate_policy(p).unwrap();
    }
    // Every credential a tool injects comes from a Secret the example creates.
    for t in &world.tools {
        if let Some(c) = &t.spec.credentials {
            assert!(
                secrets.contains(&format!("{}/{}", c.secret_name, c.key)),
                "the example creates no Secret {}/{} (has {secrets:?})",
                c.secret_name,
                c.key
            );
        }
    }
    let config = build_agent(&world, &world.identities[0]).unwrap();
    assert_eq!(config.tools.len(), 2);
    assert_eq!(config.kill_switches.len(), 1);
    assert_eq!(config.tenants["acme-co"].budgets.day_usd, Some(50.0));
}
