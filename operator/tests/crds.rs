//! The generated CRDs in `crds/` match the Rust types (regenerate with `make generate`), and
//! every one is structural, has printer columns, short names and a status subresource.

use std::path::Path;
use tollgate_operator::crd;

#[test]
fn crds_on_disk_match_the_types_and_are_structural() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let generated = crd::crds();
    assert_eq!(generated.len(), 6);
    for (file, v) in &generated {
        let on_disk = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("crds/{file}: {e}; run `make generate`"));
        assert_eq!(
            on_disk,
            crd::to_yaml(v),
            "crds/{file} is stale; run `make generate`"
        );
        let version = &v["spec"]["versions"][0];
        let mut problems = Vec::new();
        crd::structural_violations(&version["schema"]["openAPIV3Schema"], file, &mut problems);
        assert!(
            problems.is_empty(),
            "{file} is not structural: {problems:#?}"
        );
        assert_eq!(v["spec"]["group"], "tollgate.dev");
        assert_eq!(version["name"], "v1alpha1");
        assert!(
            version["subresources"]["status"].is_object(),
            "{file}: status subresource"
        );
        assert!(
            version["additionalPrinterColumns"]
                .as_array()
                .is_some_and(|c| c.len() >= 3),
            "{file}: printer columns"
        );
        assert!(
            v["spec"]["names"]["shortNames"]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
            "{file}: short names"
        );
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        assert!(
            status["conditions"].is_object() || file == "approvalrequest.yaml",
            "{file}: status.conditions"
        );
    }
    // Free-form JSON is preserved only where meant.
    let tool = &generated.iter().find(|(f, _)| f == "tool.yaml").unwrap().1;
    let spec = &tool["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    assert_eq!(
        spec["inputSchema"]["x-kubernetes-preserve-unknown-fields"],
        true
    );
    assert!(spec["match"]["x-kubernetes-preserve-unknown-fields"].is_null());
    // CEL rules.
    let ks = &generated
        .iter()
        .find(|(f, _)| f == "killswitch.yaml")
        .unwrap()
        .1;
    let rules = &ks["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["scope"]["x-kubernetes-validations"];
    assert!(rules[0]["rule"].as_str().unwrap().contains("self.all"));
    // Cluster-scoped kinds.
    for (file, scope) in [
        ("tenant.yaml", "Cluster"),
        ("killswitch.yaml", "Cluster"),
        ("agentidentity.yaml", "Namespaced"),
    ] {
        let v = &generated.iter().find(|(f, _)| f == file).unwrap().1;
        assert_eq!(v["spec"]["scope"], scope, "{file}");
    }
}

#[test]
fn the_structural_checker_catches_what_the_api_server_rejects() {
    let mut p = Vec::new();
    crd::structural_violations(
        &serde_json::json!({"type": "object", "properties": {"a": {}, "b": {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "c": {"type": "object", "additionalProperties": false, "properties": {}}}}),
        "x",
        &mut p,
    );
    assert!(p.iter().any(|e| e.contains("x.a: no type")), "{p:?}");
    assert!(p.iter().any(|e| e.contains("anyOf")), "{p:?}");
    assert!(
        p.iter().any(|e| e.contains("additionalProperties: false")),
        "{p:?}"
    );
}
