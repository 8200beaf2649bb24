//! The generated CRDs in `crds/` match the Rust types (regenerate with `make generate`), and
//! every one is structural, has printer columns, short names and a status subresource.

use std::path::Path;
use tollgate_operator::crd;

#[test]
fn crds_on_disk_match_the_types_and_are_structural() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let generated = crd::crds();
    assert_eq!(
        generated.len(),
        7,
        "six kinds and AuditCheckpoint (issue 17)"
    );
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

/// Every CEL rule of every CRD on disk (and of the chart's copies) compiles the way a real API
/// server compiles it: parsed by a CEL parser, field references resolved against the schema
/// with Kubernetes' escaping of reserved property names (`namespace` is `__namespace__`).
#[test]
fn every_cel_rule_of_every_crd_compiles_against_its_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut rules = 0;
    for dir in ["crds", "charts/tollgate/files/crds"] {
        for (file, _) in crd::crds() {
            let path = root.join(dir).join(&file);
            let text =
                std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{dir}/{file}: {e}"));
            let v: serde_json::Value = yaml_serde::from_str(&text).unwrap();
            let problems = tollgate_operator::crd_check::crd_violations(&v);
            assert!(
                problems.is_empty(),
                "{dir}/{file} would be refused: {problems:#?}"
            );
            rules += text.matches("- rule:").count();
        }
    }
    assert!(rules >= 8, "the CRDs carry CEL rules ({rules} found)");
}

/// The rule a real server refused (`has(self.namespace)`) is refused by the offline check and
/// by the in-process test server's CRD admission, over HTTP, with `422 Invalid`.
#[tokio::test]
async fn the_test_api_server_refuses_a_crd_a_real_server_refuses() {
    let mut bad = crd::crds()
        .into_iter()
        .find(|(f, _)| f == "killswitch.yaml")
        .unwrap()
        .1;
    let text = serde_json::to_string(&bad)
        .unwrap()
        .replace("self.__namespace__", "self.namespace");
    bad = serde_json::from_str(&text).unwrap();
    let problems = tollgate_operator::crd_check::crd_violations(&bad);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("undefined field 'namespace'")),
        "{problems:?}"
    );
    let api =
        tokio::task::spawn_blocking(tollgate_operator::testapi::TestApiServer::start_without_crds)
            .await
            .unwrap();
    let config = kube::Config::new(api.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let crds: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        kube::Api::all(client.clone());
    let typed = serde_json::from_value(bad.clone()).unwrap();
    match crds.create(&Default::default(), &typed).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            assert!(
                e.message.contains("undefined field 'namespace'"),
                "{}",
                e.message
            );
        }
        other => panic!("a CRD with an uncompilable rule was accepted: {other:?}"),
    }
    // A non-structural schema is refused too.
    let mut loose = bad.clone();
    loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["extra"] = serde_json::json!({});
    let text = serde_json::to_string(&loose)
        .unwrap()
        .replace("self.namespace", "self.__namespace__");
    let typed = serde_json::from_str(&text).unwrap();
    let err = crds.create(&Default::default(), &typed).await.unwrap_err();
    assert!(err.to_string().contains("no type"), "{err}");
    // Until its CRD is installed, a kind is not served; the fixed CRD is accepted and served.
    let kills: kube::Api<tollgate_operator::crd::KillSwitch> = kube::Api::all(client);
    let err = kills.list(&Default::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 404),
        "{err}"
    );
    let good = serde_json::from_value(
        crd::crds()
            .into_iter()
            .find(|(f, _)| f == "killswitch.yaml")
            .unwrap()
            .1,
    )
    .unwrap();
    let created = crds.create(&Default::default(), &good).await.unwrap();
    let established = created
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established);
    assert!(kills
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());
    tokio::task::spawn_blocking(move || drop(api))
        .await
        .unwrap();
}
