//! Sidecar injection: pods labelled `tollgate.dev/agent=<identity>` get the proxy as a native
//! sidecar (an init container with `restartPolicy: Always`, so it starts before the agent and
//! stops after it), proxy and CA-trust env in every app container, and the volumes only the
//! sidecar may see (projected token, audit `emptyDir`, upstream credentials, interception CA
//! key). With `tollgate.dev/interception: transparent`, an init container installs the
//! iptables redirect first. Injection is idempotent.

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, Pod, Probe, ProjectedVolumeSource, SecretVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

/// Pod label naming the agent identity.
pub const AGENT_LABEL: &str = "tollgate.dev/agent";
/// Pod annotation selecting the interception mode (`explicit` default, or `transparent`).
pub const INTERCEPTION_ANNOTATION: &str = "tollgate.dev/interception";
/// Name of the injected sidecar container.
pub const SIDECAR_NAME: &str = "tollgate-proxy";
/// Name of the transparent-mode init container.
pub const IPTABLES_INIT_NAME: &str = "tollgate-iptables";
/// Where the sidecar's secrets are mounted: `<dir>/<secret>/<key>`.
pub const SECRETS_DIR: &str = "/var/run/tollgate/secrets";
/// Where the interception CA certificate alone is mounted in every container (for
/// `NODE_EXTRA_CA_CERTS`, which adds to Node's own roots).
pub const CA_CERT_PATH: &str = "/var/run/tollgate/ca/ca.crt";
/// The trust bundle the app containers use (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`,
/// `CURL_CA_BUNDLE`): public roots plus the interception CA, so HTTPS to `NO_PROXY` hosts and
/// passthrough tools still verifies. Key [`CA_BUNDLE_KEY`] of the CA ConfigMap.
pub const CA_BUNDLE_PATH: &str = "/var/run/tollgate/ca/ca-bundle.crt";
/// The ConfigMap key of the trust bundle.
pub const CA_BUNDLE_KEY: &str = "ca-bundle.crt";

/// Public roots (Mozilla's, from `webpki-root-certs`) followed by `ca_pem`, as PEM.
pub fn trust_bundle(ca_pem: &str) -> String {
    use base64::Engine;
    let mut out = String::new();
    for der in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.push_str(ca_pem.trim_end());
    out.push('\n');
    out
}

/// Injection settings (from the chart's sidecar ConfigMap).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InjectConfig {
    /// Sidecar image.
    pub image: String,
    /// Image pull policy.
    #[serde(default = "default_pull")]
    pub image_pull_policy: String,
    /// Operator snapshot URL, e.g. `http://tollgate.tollgate-system.svc:15080`.
    pub operator_url: String,
    /// UID the proxy runs as (excluded from the transparent redirect).
    #[serde(default = "default_uid")]
    pub proxy_uid: i64,
    /// Proxy port in the pod.
    #[serde(default = "default_proxy_port")]
    pub proxy_port: i32,
    /// Admin (metrics) port.
    #[serde(default = "default_admin_port")]
    pub admin_port: i32,
    /// Transparent listener port.
    #[serde(default = "default_transparent_port")]
    pub transparent_port: i32,
    /// ConfigMap holding `ca.crt` (the interception CA's public certificate).
    #[serde(default = "default_ca_configmap")]
    pub ca_config_map: String,
    /// Secret holding the interception CA (`tls.crt`, `tls.key`), mounted only in the sidecar.
    #[serde(default = "default_ca_secret")]
    pub ca_secret: String,
    /// Extra `NO_PROXY` entries.
    #[serde(default)]
    pub no_proxy: Vec<String>,
    /// CPU/memory requests and limits of the sidecar.
    #[serde(default)]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

fn default_pull() -> String {
    "IfNotPresent".into()
}
fn default_uid() -> i64 {
    1337
}
fn default_proxy_port() -> i32 {
    15001
}
fn default_admin_port() -> i32 {
    15090
}
fn default_transparent_port() -> i32 {
    15006
}
fn default_ca_configmap() -> String {
    "tollgate-ca".into()
}
fn default_ca_secret() -> String {
    "tollgate-intercept-ca".into()
}

/// Why a pod could not be injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// The label value is not a valid identity name.
    #[error("label {AGENT_LABEL}={0:?} is not a valid AgentIdentity name")]
    BadIdentity(String),
    /// Unknown interception mode.
    #[error("annotation {INTERCEPTION_ANNOTATION}={0:?}: use explicit or transparent")]
    BadMode(String),
}

/// What the webhook knows about the pod's identity.
#[derive(Clone, Debug, Default)]
pub struct IdentityFacts {
    /// Secrets (name, key) holding the identity's tool credentials.
    pub secrets: Vec<String>,
}

/// Is this pod one to inject?
pub fn wants_injection(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get(AGENT_LABEL)
        .map(String::as_str)
}

/// Already injected?
pub fn is_injected(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == SIDECAR_NAME))
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with('-')
}

/// Return the injected pod (unchanged if not labelled or already injected).
pub fn inject(mut pod: Pod, cfg: &InjectConfig, facts: &IdentityFacts) -> Result<Pod, InjectError> {
    let Some(agent) = wants_injection(&pod).map(str::to_owned) else {
        return Ok(pod);
    };
    if is_injected(&pod) {
        return Ok(pod);
    }
    if !valid_name(&agent) {
        return Err(InjectError::BadIdentity(agent));
    }
    let mode = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INTERCEPTION_ANNOTATION))
        .map(String::as_str)
        .unwrap_or("explicit")
        .to_string();
    let transparent = match mode.as_str() {
        "explicit" => false,
        "transparent" => true,
        other => return Err(InjectError::BadMode(other.into())),
    };
    let spec = pod.spec.get_or_insert_with(Default::default);
    let proxy_url = format!("http://127.0.0.1:{}", cfg.proxy_port);
    let mut no_proxy = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    no_proxy.extend(cfg.no_proxy.iter().cloned());
    let no_proxy = no_proxy.join(",");
    // App containers: proxy env and CA trust, nothing secret.
    for c in &mut spec.containers {
        let e = c.env.get_or_insert_with(Vec::new);
        for (k, v) in [
            ("HTTP_PROXY", proxy_url.as_str()),
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("http_proxy", proxy_url.as_str()),
            ("https_proxy", proxy_url.as_str()),
            ("NO_PROXY", no_proxy.as_str()),
            ("no_proxy", no_proxy.as_str()),
            ("SSL_CERT_FILE", CA_BUNDLE_PATH),
            ("REQUESTS_CA_BUNDLE", CA_BUNDLE_PATH),
            ("NODE_EXTRA_CA_CERTS", CA_CERT_PATH),
            ("CURL_CA_BUNDLE", CA_BUNDLE_PATH),
            ("TOLLGATE_AGENT", agent.as_str()),
        ] {
            e.retain(|x| x.name != k);
            e.push(env(k, v));
        }
        c.volume_mounts.get_or_insert_with(Vec::new).push(mount(
            "tollgate-ca",
            "/var/run/tollgate/ca",
            true,
        ));
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: "tollgate-ca".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: cfg.ca_config_map.clone(),
            optional: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "tollgate-intercept-ca".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(cfg.ca_secret.clone()),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "tollgate-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some("tollgate".into()),
                    expiration_seconds: Some(3600),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "tollgate-audit".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    let mut sidecar_mounts = vec![
        mount("tollgate-ca", "/var/run/tollgate/ca", true),
        mount(
            "tollgate-intercept-ca",
            "/var/run/tollgate/intercept-ca",
            true,
        ),
        mount("tollgate-token", "/var/run/secrets/tollgate", true),
        mount("tollgate-audit", "/var/run/tollgate/audit", false),
    ];
    let mut secrets = facts.secrets.clone();
    secrets.sort();
    secrets.dedup();
    for (i, s) in secrets.iter().enumerate() {
        let vol = format!("tollgate-secret-{i}");
        volumes.push(Volume {
            name: vol.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(s.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
        sidecar_mounts.push(mount(&vol, &format!("{SECRETS_DIR}/{s}"), true));
    }
    let mut args = vec![
        "run".to_string(),
        "--operator".into(),
        cfg.operator_url.clone(),
        "--agent".into(),
        format!("$(POD_NAMESPACE)/{agent}"),
        "--token-file".into(),
        "/var/run/secrets/tollgate/token".into(),
        "--listen-proxy".into(),
        format!("127.0.0.1:{}", cfg.proxy_port),
        "--listen-admin".into(),
        format!("0.0.0.0:{}", cfg.admin_port),
        "--audit-path".into(),
        "/var/run/tollgate/audit/audit.jsonl".into(),
        "--intercept-ca-dir".into(),
        "/var/run/tollgate/intercept-ca".into(),
    ];
    if transparent {
        args.push("--listen-transparent".into());
        args.push(format!("127.0.0.1:{}", cfg.transparent_port));
    }
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(cfg.admin_port),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    };
    let sidecar = Container {
        name: SIDECAR_NAME.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(args),
        restart_policy: Some("Always".into()),
        env: Some(vec![
            env("TOLLGATE_LOG_JSON", "true"),
            EnvVar {
                name: "POD_NAMESPACE".into(),
                value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                    field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                        field_path: "metadata.namespace".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            // Names the pod's audit checkpoint chain at the operator (issue 17).
            EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                    field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("tollgate-admin".into()),
            container_port: cfg.admin_port,
            ..Default::default()
        }]),
        volume_mounts: Some(sidecar_mounts),
        startup_probe: Some(Probe {
            failure_threshold: Some(60),
            period_seconds: Some(1),
            ..probe("/readyz")
        }),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/healthz")),
        resources: cfg.resources.clone(),
        security_context: Some(SecurityContext {
            run_as_user: Some(cfg.proxy_uid),
            run_as_group: Some(cfg.proxy_uid),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let init = spec.init_containers.get_or_insert_with(Vec::new);
    let mut front = Vec::new();
    if transparent {
        front.push(Container {
            name: IPTABLES_INIT_NAME.into(),
            image: Some(cfg.image.clone()),
            image_pull_policy: Some(cfg.image_pull_policy.clone()),
            args: Some(vec![
                "iptables".into(),
                "--apply".into(),
                "--proxy-uid".into(),
                cfg.proxy_uid.to_string(),
                "--to-port".into(),
                cfg.transparent_port.to_string(),
                "--admin-port".into(),
                cfg.admin_port.to_string(),
            ]),
            security_context: Some(SecurityContext {
                run_as_user: Some(0),
                run_as_non_root: Some(false),
                capabilities: Some(Capabilities {
                    add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                    drop: Some(vec!["ALL".into()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    front.push(sidecar);
    // The proxy must be up before any other init container that might call out.
    init.splice(0..0, front);
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InjectConfig {
        serde_json::from_value(serde_json::json!({"image": "ghcr.io/tollgate-dev/tollgate-proxy:0.1.0", "operatorUrl": "http://tollgate.tollgate-system.svc:15080"})).unwrap()
    }

    fn pod(labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent", "namespace": "billing", "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "agent", "image": "python:3.12", "env": [{"name": "HTTP_PROXY", "value": "http://evil:1"}]}]}
        }))
        .unwrap()
    }

    #[test]
    fn unlabelled_pods_are_untouched() {
        let p = pod(serde_json::json!({"app": "x"}), serde_json::json!({}));
        assert_eq!(
            inject(p.clone(), &cfg(), &IdentityFacts::default()).unwrap(),
            p
        );
    }

    #[test]
    fn labelled_pods_get_a_native_sidecar_and_env() {
        let p = pod(
            serde_json::json!({AGENT_LABEL: "billing-dispute-v3"}),
            serde_json::json!({}),
        );
        let out = inject(
            p,
            &cfg(),
            &IdentityFacts {
                secrets: vec!["stripe-key".into()],
            },
        )
        .unwrap();
        let spec = out.spec.as_ref().unwrap();
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init[0].name, SIDECAR_NAME);
        assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
        let app = &spec.containers[0];
        let envs: Vec<_> = app
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("")))
            .collect();
        assert!(envs.contains(&("HTTP_PROXY", "http://127.0.0.1:15001")));
        assert_eq!(
            envs.iter().filter(|(k, _)| *k == "HTTP_PROXY").count(),
            1,
            "the agent's own proxy setting is replaced"
        );
        // Node adds NODE_EXTRA_CA_CERTS to its roots; the others replace the trust store, so
        // they get public roots plus the interception CA.
        assert!(envs.contains(&("NODE_EXTRA_CA_CERTS", CA_CERT_PATH)));
        for k in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"] {
            assert!(envs.contains(&(k, CA_BUNDLE_PATH)), "{k}");
        }
        // Secrets and the token are mounted only in the sidecar.
        let app_mounts: Vec<_> = app
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(app_mounts, vec!["tollgate-ca"]);
        let side_mounts: Vec<_> = init[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(side_mounts.contains(&"/var/run/tollgate/secrets/stripe-key"));
        assert!(side_mounts.contains(&"/var/run/secrets/tollgate"));
        let token = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tollgate-token")
            .unwrap();
        assert_eq!(
            token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
                .service_account_token
                .as_ref()
                .unwrap()
                .audience
                .as_deref(),
            Some("tollgate")
        );
    }

    #[test]
    fn injection_is_idempotent() {
        let p = pod(serde_json::json!({AGENT_LABEL: "a"}), serde_json::json!({}));
        let once = inject(p, &cfg(), &IdentityFacts::default()).unwrap();
        let twice = inject(once.clone(), &cfg(), &IdentityFacts::default()).unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn transparent_mode_adds_the_iptables_init_container_first() {
        let p = pod(
            serde_json::json!({AGENT_LABEL: "a"}),
            serde_json::json!({INTERCEPTION_ANNOTATION: "transparent"}),
        );
        let out = inject(p, &cfg(), &IdentityFacts::default()).unwrap();
        let init = out.spec.unwrap().init_containers.unwrap();
        assert_eq!(init[0].name, IPTABLES_INIT_NAME);
        assert_eq!(init[1].name, SIDECAR_NAME);
        let caps = init[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(
            caps.add.as_ref().unwrap(),
            &vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]
        );
        let bad = pod(
            serde_json::json!({AGENT_LABEL: "a"}),
            serde_json::json!({INTERCEPTION_ANNOTATION: "yolo"}),
        );
        assert!(inject(bad, &cfg(), &IdentityFacts::default()).is_err());
    }

    #[test]
    fn the_trust_bundle_holds_public_roots_and_the_interception_ca() {
        let (ca, _) = tollgate_proxy::ca::new_ca("test interception CA", 1).unwrap();
        let bundle = trust_bundle(&ca);
        let certs: Vec<_> = rustls_pemfile_certs(&bundle);
        assert!(certs.len() > 100, "public roots: {}", certs.len());
        assert!(
            bundle.trim_end().ends_with(ca.trim_end()),
            "the interception CA is in it"
        );
        // Every block is a certificate a TLS stack can load.
        let mut roots = rustls::RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(certs);
        assert_eq!(ignored, 0);
        assert!(added > 100);
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.unwrap())
            .collect()
    }
}
