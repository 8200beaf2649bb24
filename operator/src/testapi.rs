//! An in-process Kubernetes API server for tests, since no real one can run on CI machines
//! here. It stores any resource generically and implements the calls the operator makes:
//! get, list (cluster-wide or per namespace) with a `resourceVersion`, watch from a
//! `resourceVersion` (ADDED/MODIFIED/DELETED as newline-delimited JSON, held open until
//! `timeoutSeconds`), create, replace with optimistic concurrency (409 on a stale
//! `resourceVersion`), merge and apply patches (an apply naming a `resourceVersion` is
//! conditional on it), the `/status` subresource (status-only writes;
//! spec writes bump `generation`, status writes do not), delete, `TokenRequest` (tokens for
//! a ServiceAccount, optionally bound to a pod) and `TokenReview` against registered tokens
//! and audiences (a pod-bound token reports its pod in `extra`). Leases are ordinary objects, so leader election works.
//!
//! Like a real server it serves a custom resource only once its `CustomResourceDefinition` is
//! installed (404 before), and it refuses a CRD a real server refuses: a non-structural schema
//! or an `x-kubernetes-validations` rule that does not compile ([`crate::crd_check`]), with
//! `422 Invalid`. [`TestApiServer::start`] installs the generated CRDs through that check, so
//! a CRD a real server would reject fails every test that starts a server.
//!
//! Not modelled: label and field selectors (ignored), pagination (`limit` is ignored, no
//! `continue`), bookmarks, `410 Gone` for expired watch versions, strategic merge (treated as
//! a JSON merge patch), server-side apply field ownership and conflicts, admission, RBAC,
//! finalizers and garbage collection, validation of custom objects against their CRD's schema
//! and rules. The real-cluster suite
//! (`TOLLGATE_TEST_KUBECONFIG`) covers those.
//!
//! (One file, about 820 lines: test-only, behind the `test-api` feature; the store, watch
//! and server-side apply it emulates depend on one another's resourceVersion rules.)

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

type Key = (String, String, String, String); // (group/version, plural, namespace, name)

#[derive(Clone, Debug)]
struct Event {
    gv: String,
    plural: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<(u64, Event)>,
    tokens: HashMap<String, (String, Vec<String>)>,
    /// Tokens bound to a pod: token → pod name (reported as TokenReview `extra`).
    bound: HashMap<String, String>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// The test API server.
pub struct TestApiServer {
    /// Where it listens (plain HTTP).
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    tx: broadcast::Sender<(u64, Event)>,
    _rt: tokio::runtime::Runtime,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "message": message, "code": code}),
    )
}

fn merge(target: &mut Value, patch: &Value) {
    if let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A parsed resource path.
struct Path {
    gv: String,
    namespace: String,
    plural: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(p: &str) -> Option<Path> {
    let segs: Vec<&str> = p.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        rest => (String::new(), rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (plural.to_string(), None, false),
        [plural, name] => (plural.to_string(), Some(name.to_string()), false),
        [plural, name, "status"] => (plural.to_string(), Some(name.to_string()), true),
        _ => return None,
    };
    Some(Path {
        gv,
        namespace,
        plural,
        name,
        status,
    })
}

impl TestApiServer {
    /// Start on a free loopback port with Tollgate's generated CRDs installed (through the
    /// same admission a real server applies: a CRD it would refuse panics here).
    pub fn start() -> Self {
        let api = Self::start_without_crds();
        for (file, crd) in crate::crd::crds() {
            if let Err(e) = api.install_crd(crd) {
                panic!("the generated CRD {file} is refused: {e}");
            }
        }
        api
    }

    /// Install a CRD through the CRD admission (structural schema, CEL rules compile).
    pub fn install_crd(&self, crd: Value) -> Result<(), String> {
        let name = crd["metadata"]["name"].as_str().unwrap_or("").to_string();
        let key = (CRDS.0.to_string(), CRDS.1.to_string(), String::new(), name);
        let obj = admit_crd(&key, crd)
            .map_err(|(_, v)| v["message"].as_str().unwrap_or("").to_string())?;
        let mut st = self.store.lock().expect("store");
        let mut obj = obj;
        obj["metadata"]["generation"] = json!(1);
        obj["metadata"]["uid"] = json!(format!("uid-{:x}", rand::random::<u64>()));
        obj["metadata"]["creationTimestamp"] = json!(now());
        commit(&mut st, &self.tx, key, "ADDED", obj);
        Ok(())
    }

    /// Start on a free loopback port with no CRDs: custom resources answer 404 until their
    /// CRD is created.
    pub fn start_without_crds() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store: Arc<Mutex<Store>> = Arc::default();
        let (tx, _) = broadcast::channel(4096);
        let (s2, t2) = (store.clone(), tx.clone());
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (store, tx) = (s2.clone(), t2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (store, tx) = (store.clone(), tx.clone());
                        async move { Ok::<_, std::convert::Infallible>(serve(store, tx, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            store,
            tx,
            _rt: rt,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{token: operator-token}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test, namespace: default}}\ncurrent-context: test\n",
            self.url()
        )
    }

    /// Accept `token` in TokenReviews as `username` for these audiences.
    pub fn add_token(&self, token: &str, username: &str, audiences: &[&str]) {
        self.store.lock().expect("store").tokens.insert(
            token.into(),
            (
                username.into(),
                audiences.iter().map(|a| a.to_string()).collect(),
            ),
        );
    }

    /// Like [`Self::add_token`], for a token bound to `pod` (a projected token): TokenReview
    /// reports the pod in `extra["authentication.kubernetes.io/pod-name"]`, as a real server
    /// does.
    pub fn add_pod_token(&self, token: &str, username: &str, audiences: &[&str], pod: &str) {
        self.add_token(token, username, audiences);
        self.store
            .lock()
            .expect("store")
            .bound
            .insert(token.into(), pod.into());
    }

    /// Create or replace an object (its `apiVersion`, `kind` and metadata say where); `plural`
    /// is its resource name.
    pub fn put(&self, plural: &str, obj: Value) -> Value {
        let gv = obj["apiVersion"].as_str().unwrap_or("v1").to_string();
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let mut st = self.store.lock().expect("store");
        if let Err((_, v)) = check_served(&st, &gv, plural) {
            panic!("test API server: {}", v["message"]);
        }
        let key = (gv.clone(), plural.to_string(), ns.clone(), name);
        let obj = admit_crd(&key, obj)
            .unwrap_or_else(|(_, v)| panic!("test API server: {}", v["message"]));
        let mut obj = obj;
        let kind = match st.objects.get(&key) {
            Some(old) => {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1)
                    + i64::from(old.get("spec") != obj.get("spec"));
                obj["metadata"]["generation"] = json!(generation);
                obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                if obj.get("status").is_none() {
                    if let Some(s) = old.get("status") {
                        obj["status"] = s.clone();
                    }
                }
                "MODIFIED"
            }
            None => {
                obj["metadata"]["generation"] = json!(1);
                obj["metadata"]["uid"] = json!(format!("uid-{:x}", rand::random::<u64>()));
                obj["metadata"]["creationTimestamp"] = json!(now());
                "ADDED"
            }
        };
        commit(&mut st, &self.tx, key, kind, obj)
    }

    /// Delete an object.
    pub fn delete(&self, gv: &str, plural: &str, namespace: &str, name: &str) {
        let mut st = self.store.lock().expect("store");
        let key = (gv.into(), plural.into(), namespace.into(), name.into());
        if let Some(obj) = st.objects.remove(&key) {
            st.rv += 1;
            let rv = st.rv;
            let mut obj = obj;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let ev = Event {
                gv: gv.into(),
                plural: plural.into(),
                namespace: namespace.into(),
                kind: "DELETED",
                object: obj,
            };
            st.history.push((rv, ev.clone()));
            let _ = self.tx.send((rv, ev));
        }
    }

    /// Every object of a resource, in any namespace.
    pub fn list(&self, gv: &str, plural: &str) -> Vec<Value> {
        self.store
            .lock()
            .expect("store")
            .objects
            .iter()
            .filter(|(k, _)| k.0 == gv && k.1 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Read an object.
    pub fn get(&self, gv: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .expect("store")
            .objects
            .get(&(gv.into(), plural.into(), namespace.into(), name.into()))
            .cloned()
    }
}

fn commit(
    st: &mut Store,
    tx: &broadcast::Sender<(u64, Event)>,
    key: Key,
    kind: &'static str,
    mut obj: Value,
) -> Value {
    // Like the API server: a Secret's stringData is stored base64-encoded under data.
    if obj["kind"] == "Secret" {
        if let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|o| o.remove("stringData")) {
            use base64::Engine;
            for (k, v) in sd {
                let enc = base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap_or("").as_bytes());
                obj["data"][k] = json!(enc);
            }
        }
    }
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if !key.2.is_empty() {
        obj["metadata"]["namespace"] = json!(key.2);
    }
    st.objects.insert(key.clone(), obj.clone());
    let ev = Event {
        gv: key.0,
        plural: key.1,
        namespace: key.2,
        kind,
        object: obj.clone(),
    };
    st.history.push((rv, ev.clone()));
    let _ = tx.send((rv, ev));
    obj
}

const CRDS: (&str, &str) = ("apiextensions.k8s.io/v1", "customresourcedefinitions");

/// Is `gv` a custom API group (served only through an installed CRD)?
fn is_custom_group(gv: &str) -> bool {
    match gv.split_once('/') {
        Some((group, _)) => group.contains('.') && !group.ends_with("k8s.io"),
        None => false,
    }
}

/// Refuse a custom resource whose CRD is not installed, as a real server does (404).
fn check_served(st: &Store, gv: &str, plural: &str) -> Result<(), (u16, Value)> {
    if !is_custom_group(gv) {
        return Ok(());
    }
    let (group, version) = gv.split_once('/').unwrap_or((gv, ""));
    let served = st.objects.iter().any(|(k, crd)| {
        (k.0.as_str(), k.1.as_str()) == CRDS
            && crd["spec"]["group"] == group
            && crd["spec"]["names"]["plural"] == plural
            && crd["spec"]["versions"].as_array().is_some_and(|vs| {
                vs.iter()
                    .any(|v| v["name"] == version && v["served"] == true)
            })
    });
    if served {
        Ok(())
    } else {
        Err(status(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({plural}.{group})"),
        ))
    }
}

/// Admission of a CRD write: refuse what a real server refuses, and mark an accepted one
/// `Established` (it is served at once).
fn admit_crd(key: &Key, mut obj: Value) -> Result<Value, (u16, Value)> {
    if (key.0.as_str(), key.1.as_str()) != CRDS {
        return Ok(obj);
    }
    let problems = crate::crd_check::crd_violations(&obj);
    if !problems.is_empty() {
        return Err(status(
            422,
            "Invalid",
            &format!(
                "CustomResourceDefinition.apiextensions.k8s.io \"{}\" is invalid: {}",
                key.3,
                problems.join("; ")
            ),
        ));
    }
    let now = now();
    obj["status"] = json!({
        "acceptedNames": obj["spec"]["names"].clone(),
        "storedVersions": obj["spec"]["versions"].as_array().map(|vs| vs.iter().filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect::<Vec<_>>()).unwrap_or_default(),
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "lastTransitionTime": now},
        ],
    });
    Ok(obj)
}

fn reply(code: u16, v: Value) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    r
}

async fn serve(
    store: Arc<Mutex<Store>>,
    tx: broadcast::Sender<(u64, Event)>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let q: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body)
        .or_else(|_| yaml_serde::from_slice(&body))
        .unwrap_or(Value::Null);
    if path == "/version" {
        return reply(
            200,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-tollgate-test", "platform": "linux/amd64"}),
        );
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && method == hyper::Method::POST {
        let token = body["spec"]["token"].as_str().unwrap_or("");
        let wanted: Vec<String> = body["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let st = store.lock().expect("store");
        let status = match st.tokens.get(token) {
            Some((user, auds)) if wanted.iter().all(|w| auds.contains(w)) => {
                let mut user = json!({"username": user});
                if let Some(pod) = st.bound.get(token) {
                    user["extra"] = json!({"authentication.kubernetes.io/pod-name": [pod]});
                }
                json!({"authenticated": true, "user": user, "audiences": wanted})
            }
            _ => json!({"authenticated": false, "error": "invalid token or audience"}),
        };
        return reply(
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": body["spec"], "status": status}),
        );
    }
    // TokenRequest (`serviceaccounts/NAME/token`): a fresh token for the ServiceAccount, for
    // the audiences asked, bound to the pod in `boundObjectRef` if any.
    if let ["api", "v1", "namespaces", ns, "serviceaccounts", sa, "token"] = path
        .trim_matches('/')
        .split('/')
        .collect::<Vec<_>>()
        .as_slice()
    {
        if method == hyper::Method::POST {
            let mut st = store.lock().expect("store");
            let key = (
                "v1".to_string(),
                "serviceaccounts".to_string(),
                ns.to_string(),
                sa.to_string(),
            );
            if !st.objects.contains_key(&key) {
                let (c, v) = status(404, "NotFound", &format!("serviceaccounts {sa} not found"));
                return reply(c, v);
            }
            let token = format!("tok-{:032x}", rand::random::<u128>());
            let audiences: Vec<String> = body["spec"]["audiences"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            st.tokens.insert(
                token.clone(),
                (format!("system:serviceaccount:{ns}:{sa}"), audiences),
            );
            if body["spec"]["boundObjectRef"]["kind"] == "Pod" {
                if let Some(pod) = body["spec"]["boundObjectRef"]["name"].as_str() {
                    st.bound.insert(token.clone(), pod.to_string());
                }
            }
            let exp = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
            let exp = exp
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            return reply(
                201,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": body["spec"], "status": {"token": token, "expirationTimestamp": exp}}),
            );
        }
    }
    let Some(p) = parse_path(&path) else {
        let (c, v) = status(404, "NotFound", &format!("no route {path}"));
        return reply(c, v);
    };
    if let Err((c, v)) = check_served(&store.lock().expect("store"), &p.gv, &p.plural) {
        return reply(c, v);
    }
    let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    match (method.clone(), &p.name) {
        (hyper::Method::GET, None) if watch => {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout: u64 = q
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(60)
                .min(300);
            let rx = tx.subscribe();
            let backlog: Vec<(u64, Event)> = {
                let st = store.lock().expect("store");
                if from == 0 {
                    st.objects
                        .iter()
                        .filter(|(k, _)| {
                            k.0 == p.gv
                                && k.1 == p.plural
                                && (p.namespace.is_empty() || k.2 == p.namespace)
                        })
                        .map(|(k, o)| {
                            (
                                st.rv,
                                Event {
                                    gv: k.0.clone(),
                                    plural: k.1.clone(),
                                    namespace: k.2.clone(),
                                    kind: "ADDED",
                                    object: o.clone(),
                                },
                            )
                        })
                        .collect()
                } else {
                    st.history
                        .iter()
                        .filter(|(rv, _)| *rv > from)
                        .cloned()
                        .collect()
                }
            };
            let (gv, plural, ns) = (p.gv.clone(), p.plural.clone(), p.namespace.clone());
            let matches = move |e: &Event| {
                e.gv == gv && e.plural == plural && (ns.is_empty() || e.namespace == ns)
            };
            let stream = async_stream(backlog, matches, rx, timeout);
            let mut r = hyper::Response::new(StreamBody::new(stream).boxed());
            r.headers_mut()
                .insert("content-type", "application/json".parse().expect("static"));
            r
        }
        (hyper::Method::GET, None) => {
            let st = store.lock().expect("store");
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| {
                    k.0 == p.gv && k.1 == p.plural && (p.namespace.is_empty() || k.2 == p.namespace)
                })
                .map(|(_, o)| o.clone())
                .collect();
            reply(
                200,
                json!({"apiVersion": p.gv, "kind": "List", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        (hyper::Method::GET, Some(name)) => {
            let st = store.lock().expect("store");
            match st.objects.get(&(
                p.gv.clone(),
                p.plural.clone(),
                p.namespace.clone(),
                name.clone(),
            )) {
                Some(o) => reply(200, o.clone()),
                None => {
                    let (c, v) = status(404, "NotFound", &format!("{} {name} not found", p.plural));
                    reply(c, v)
                }
            }
        }
        (hyper::Method::POST, None) => {
            let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
            let mut st = store.lock().expect("store");
            let key = (
                p.gv.clone(),
                p.plural.clone(),
                p.namespace.clone(),
                name.clone(),
            );
            if name.is_empty() || st.objects.contains_key(&key) {
                let (c, v) = status(
                    409,
                    "AlreadyExists",
                    &format!("{} {name} already exists", p.plural),
                );
                return reply(c, v);
            }
            let mut obj = body;
            obj["metadata"]["generation"] = json!(1);
            obj["metadata"]["uid"] = json!(format!("uid-{:x}", rand::random::<u64>()));
            obj["metadata"]["creationTimestamp"] = json!(now());
            match admit_crd(&key, obj) {
                Ok(obj) => reply(201, commit(&mut st, &tx, key, "ADDED", obj)),
                Err((c, v)) => reply(c, v),
            }
        }
        (hyper::Method::PUT | hyper::Method::PATCH, Some(name)) => {
            let mut st = store.lock().expect("store");
            let key = (
                p.gv.clone(),
                p.plural.clone(),
                p.namespace.clone(),
                name.clone(),
            );
            let apply = q.contains_key("fieldManager")
                && method == hyper::Method::PATCH
                && body.get("apiVersion").is_some();
            let old = match st.objects.get(&key) {
                Some(o) => o.clone(),
                None if apply && !p.status => {
                    let mut obj = body;
                    obj["metadata"]["generation"] = json!(1);
                    obj["metadata"]["uid"] = json!(format!("uid-{:x}", rand::random::<u64>()));
                    obj["metadata"]["creationTimestamp"] = json!(now());
                    return match admit_crd(&key, obj) {
                        Ok(obj) => reply(201, commit(&mut st, &tx, key, "ADDED", obj)),
                        Err((c, v)) => reply(c, v),
                    };
                }
                None => {
                    let (c, v) = status(404, "NotFound", &format!("{} {name} not found", p.plural));
                    return reply(c, v);
                }
            };
            let mut new = old.clone();
            // A server-side apply naming a resourceVersion is conditional on it, as on a
            // real server.
            if apply {
                if let Some(rv) = body["metadata"]["resourceVersion"].as_str() {
                    if rv != old["metadata"]["resourceVersion"].as_str().unwrap_or("") {
                        let (c, v) = status(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again");
                        return reply(c, v);
                    }
                }
            }
            if method == hyper::Method::PUT {
                if let Some(rv) = body["metadata"]["resourceVersion"].as_str() {
                    if rv != old["metadata"]["resourceVersion"].as_str().unwrap_or("") {
                        let (c, v) = status(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again");
                        return reply(c, v);
                    }
                }
                if p.status {
                    new["status"] = body["status"].clone();
                } else {
                    new = body;
                    if let Some(s) = old.get("status") {
                        new["status"] = s.clone();
                    }
                }
            } else if p.status {
                let mut s = new.get("status").cloned().unwrap_or(json!({}));
                merge(&mut s, &body["status"]);
                new["status"] = s;
            } else {
                let mut patch = body;
                if let Some(o) = patch.as_object_mut() {
                    o.remove("status");
                }
                merge(&mut new, &patch);
            }
            for k in ["uid", "creationTimestamp", "generation"] {
                new["metadata"][k] = old["metadata"][k].clone();
            }
            if !p.status && new.get("spec") != old.get("spec") {
                new["metadata"]["generation"] =
                    json!(old["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
            }
            if p.status {
                return reply(200, commit(&mut st, &tx, key, "MODIFIED", new));
            }
            match admit_crd(&key, new) {
                Ok(new) => reply(200, commit(&mut st, &tx, key, "MODIFIED", new)),
                Err((c, v)) => reply(c, v),
            }
        }
        (hyper::Method::DELETE, Some(name)) => {
            let existing = store
                .lock()
                .expect("store")
                .objects
                .get(&(
                    p.gv.clone(),
                    p.plural.clone(),
                    p.namespace.clone(),
                    name.clone(),
                ))
                .cloned();
            match existing {
                Some(o) => {
                    let mut st = store.lock().expect("store");
                    st.objects.remove(&(
                        p.gv.clone(),
                        p.plural.clone(),
                        p.namespace.clone(),
                        name.clone(),
                    ));
                    st.rv += 1;
                    let rv = st.rv;
                    let ev = Event {
                        gv: p.gv.clone(),
                        plural: p.plural.clone(),
                        namespace: p.namespace.clone(),
                        kind: "DELETED",
                        object: o.clone(),
                    };
                    st.history.push((rv, ev.clone()));
                    let _ = tx.send((rv, ev));
                    reply(200, o)
                }
                None => {
                    let (c, v) = status(404, "NotFound", &format!("{} {name} not found", p.plural));
                    reply(c, v)
                }
            }
        }
        _ => {
            let (c, v) = status(
                405,
                "MethodNotAllowed",
                "not supported by the test API server",
            );
            reply(c, v)
        }
    }
}

/// The watch body: the backlog, then live matching events, until `timeout` seconds.
fn async_stream<F>(
    backlog: Vec<(u64, Event)>,
    matches: F,
    rx: broadcast::Receiver<(u64, Event)>,
    timeout: u64,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>>
where
    F: Fn(&Event) -> bool + Send + 'static,
{
    let line =
        |e: &Event| Bytes::from(format!("{}\n", json!({"type": e.kind, "object": e.object})));
    let first: Vec<Bytes> = backlog
        .iter()
        .filter(|(_, e)| matches(e))
        .map(|(_, e)| line(e))
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let seen = backlog.iter().map(|(rv, _)| *rv).max().unwrap_or(0);
    futures::stream::unfold(
        (first.into_iter(), matches, rx, seen),
        move |(mut first, matches, mut rx, seen)| async move {
            if let Some(b) = first.next() {
                return Some((Ok(Frame::data(b)), (first, matches, rx, seen)));
            }
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Ok((rv, e))) if rv > seen && matches(&e) => {
                        let b = line(&e);
                        return Some((Ok(Frame::data(b)), (first, matches, rx, rv)));
                    }
                    Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    _ => return None,
                }
            }
        },
    )
}
