//! The operator's certificate material in the cluster: Secrets shared by every replica, and
//! the interception CA copies in each identity's namespace.

use crate::controller::Error;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::PostParams;
use kube::{Api, Client};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A Secret's string data.
pub type SecretData = BTreeMap<String, String>;

/// Read a Secret's data as strings.
pub fn secret_data(s: Secret) -> SecretData {
    s.data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

/// The interception CA material injected pods see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaMaterial {
    /// The certificates sidecars and agents trust: the signing CA, and during a rotation the
    /// other CA too (PEM, concatenated).
    pub trusted: String,
    /// The certificate leaves are signed with (PEM).
    pub cert: String,
    /// Its key (PEM).
    pub key: String,
    /// Public roots plus `trusted`, for the app containers' trust store.
    pub bundle: String,
}

/// How long a namespace whose copies were checked is not checked again (someone may delete
/// them; the identity's periodic resync puts them back).
const RECHECK: Duration = Duration::from_secs(240);

/// Where injected pods find the interception CA: a Secret (sidecar only: `tls.crt`,
/// `tls.key`, `ca.crt`) and a ConfigMap (`ca.crt` and the trust bundle, for the agent) in
/// every namespace that has an identity.
pub struct CaDistribution {
    material: Mutex<Arc<CaMaterial>>,
    /// Secret name in each namespace.
    pub secret: String,
    /// ConfigMap name in each namespace.
    pub config_map: String,
    checked: Mutex<HashMap<String, (Instant, Arc<CaMaterial>)>>,
}

impl CaDistribution {
    /// Distribute `material` under these names.
    pub fn new(material: CaMaterial, secret: String, config_map: String) -> Self {
        Self {
            material: Mutex::new(Arc::new(material)),
            secret,
            config_map,
            checked: Mutex::default(),
        }
    }

    /// The material being distributed.
    pub fn material(&self) -> Arc<CaMaterial> {
        self.material.lock().expect("ca").clone()
    }

    /// Distribute new material (a rotation step); every namespace is brought up to date at
    /// its identities' next reconcile.
    pub fn set_material(&self, material: CaMaterial) {
        *self.material.lock().expect("ca") = Arc::new(material);
    }

    /// Namespaces whose copies hold the current material.
    pub fn up_to_date(&self) -> Vec<String> {
        let cur = self.material();
        let mut v: Vec<String> = self
            .checked
            .lock()
            .expect("ca")
            .iter()
            .filter(|(_, (_, m))| **m == *cur)
            .map(|(ns, _)| ns.clone())
            .collect();
        v.sort();
        v
    }

    /// Forget what was checked (leadership gained: check every namespace again).
    pub fn forget(&self) {
        self.checked.lock().expect("ca").clear();
    }

    /// Make `namespace`'s Secret and ConfigMap hold the current material.
    pub async fn ensure_namespace(&self, client: &Client, namespace: &str) -> Result<(), Error> {
        let material = self.material();
        if let Some((at, m)) = self.checked.lock().expect("ca").get(namespace) {
            if *m == material && at.elapsed() < RECHECK {
                return Ok(());
            }
        }
        let apply = |action: String| move |source| Error::Apply { action, source };
        let want: BTreeMap<String, String> = [
            ("tls.crt".to_string(), material.cert.clone()),
            ("tls.key".to_string(), material.key.clone()),
            ("ca.crt".to_string(), material.trusted.clone()),
        ]
        .into();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        match secrets
            .get_opt(&self.secret)
            .await
            .map_err(apply(format!("read Secret {namespace}/{}", self.secret)))?
        {
            None => {
                let s = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(self.secret.clone()),
                        namespace: Some(namespace.into()),
                        ..Default::default()
                    },
                    string_data: Some(want),
                    ..Default::default()
                };
                secrets
                    .create(&PostParams::default(), &s)
                    .await
                    .map_err(apply(format!("create Secret {namespace}/{}", self.secret)))?;
            }
            Some(mut s) if secret_data(s.clone()) != want => {
                s.data = None;
                s.string_data = Some(want);
                secrets
                    .replace(&self.secret, &PostParams::default(), &s)
                    .await
                    .map_err(apply(format!("update Secret {namespace}/{}", self.secret)))?;
            }
            Some(_) => {}
        }
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let data: BTreeMap<String, String> = [
            ("ca.crt".to_string(), material.trusted.clone()),
            (
                crate::webhook::inject::CA_BUNDLE_KEY.to_string(),
                material.bundle.clone(),
            ),
        ]
        .into();
        match cms.get_opt(&self.config_map).await.map_err(apply(format!(
            "read ConfigMap {namespace}/{}",
            self.config_map
        )))? {
            None => {
                let c = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(self.config_map.clone()),
                        namespace: Some(namespace.into()),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                cms.create(&PostParams::default(), &c)
                    .await
                    .map_err(apply(format!(
                        "create ConfigMap {namespace}/{}",
                        self.config_map
                    )))?;
            }
            // Made by an older operator (no trust bundle) or stale: bring it up to date.
            Some(mut c) if c.data.as_ref() != Some(&data) => {
                c.data = Some(data);
                cms.replace(&self.config_map, &PostParams::default(), &c)
                    .await
                    .map_err(apply(format!(
                        "update ConfigMap {namespace}/{}",
                        self.config_map
                    )))?;
            }
            Some(_) => {}
        }
        self.checked
            .lock()
            .expect("ca")
            .insert(namespace.to_owned(), (Instant::now(), material));
        Ok(())
    }
}
