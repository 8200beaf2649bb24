//! The rotation's decisions (pure) and its certificates, with short lifetimes.

use super::*;

const G: Duration = Duration::from_secs(0);

fn ca(name: &str, secs: i64) -> Issued {
    issue_ca(name, time::Duration::seconds(secs)).unwrap()
}

fn at(c: &Issued, fraction: f64) -> i64 {
    c.not_before + ((c.not_after - c.not_before) as f64 * fraction) as i64
}

fn webhook(secs: i64) -> WebhookPki {
    let ca = ca("wh", secs);
    let serving = issue_serving(&ca, "svc", "ns", &[], time::Duration::seconds(secs / 2)).unwrap();
    WebhookPki {
        ca,
        next_ca: None,
        previous_ca: None,
        serving,
    }
}

/// Apply a decided step the way the loop does (certificates with the same lifetimes).
fn apply(p: &mut WebhookPki, step: &WebhookStep, published: &mut Vec<String>, now: i64) {
    // Certificates are issued now (real time) but their schedule is kept in simulated time.
    let sim = |mut c: Issued, secs: i64| {
        c.not_before = now;
        c.not_after = now + secs;
        c
    };
    match step {
        WebhookStep::PublishBundle => *published = vec![p.bundle(now)],
        WebhookStep::AddNextCa => p.next_ca = Some(sim(ca("wh-next", 3000), 3000)),
        WebhookStep::Promote => {
            let next = p.next_ca.take().unwrap();
            let s = issue_serving(&next, "svc", "ns", &[], time::Duration::seconds(1500)).unwrap();
            p.serving = sim(s, 1500);
            p.previous_ca = Some(std::mem::replace(&mut p.ca, next));
        }
        WebhookStep::ReissueServing => {
            let s = issue_serving(&p.ca, "svc", "ns", &[], time::Duration::seconds(1500)).unwrap();
            p.serving = sim(s, 1500)
        }
        WebhookStep::PrunePrevious => p.previous_ca = None,
        WebhookStep::Nothing => {}
    }
}

fn verifies(bundle: &str, serving: &Issued) -> bool {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    if roots.is_empty() {
        return false;
    }
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let leaf = rustls::pki_types::CertificateDer::from_pem_slice(serving.cert.as_bytes()).unwrap();
    let name = rustls::pki_types::ServerName::try_from("svc.ns.svc").unwrap();
    v.verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
        .is_ok()
}

#[test]
fn the_ca_bundle_trusts_the_next_ca_before_anything_is_signed_by_it() {
    let mut p = webhook(3000);
    let mut published = vec![String::new()];
    let mut now = p.ca.not_before;
    // First: publish the bundle.
    assert_eq!(
        webhook_step(&p, &published, G, now),
        WebhookStep::PublishBundle
    );
    apply(&mut p, &WebhookStep::PublishBundle, &mut published, now);
    assert_eq!(webhook_step(&p, &published, G, now), WebhookStep::Nothing);
    // Walk through a whole CA life: at every step the served certificate verifies against
    // the bundle the API server held *before* the step.
    let mut seen = Vec::new();
    let end = p.ca.not_after + 4000;
    while now < end {
        let step = webhook_step(&p, &published, G, now);
        let before = published.clone();
        apply(&mut p, &step, &mut published, now);
        assert!(
            before.iter().all(|b| verifies(b, &p.serving)),
            "after {step:?} the API server does not trust the served certificate"
        );
        if step == WebhookStep::Promote {
            assert!(
                before[0].contains(p.ca.cert.trim()),
                "promoted a CA not in the bundle"
            );
        }
        if step != WebhookStep::Nothing {
            seen.push(step);
        } else {
            now += 50;
        }
    }
    for s in [
        WebhookStep::AddNextCa,
        WebhookStep::PublishBundle,
        WebhookStep::Promote,
        WebhookStep::PrunePrevious,
    ] {
        assert!(seen.contains(&s), "{s:?} never happened: {seen:?}");
    }
    let add = seen
        .iter()
        .position(|s| *s == WebhookStep::AddNextCa)
        .unwrap();
    assert_eq!(seen[add + 1], WebhookStep::PublishBundle);
    assert_eq!(seen[add + 2], WebhookStep::Promote);
}

#[test]
fn a_serving_certificate_is_reissued_from_the_same_ca_at_two_thirds() {
    let p = webhook(3000);
    let published = vec![p.bundle(p.ca.not_before)];
    assert_eq!(
        webhook_step(&p, &published, G, at(&p.serving, 0.6)),
        WebhookStep::Nothing
    );
    assert_eq!(
        webhook_step(&p, &published, G, at(&p.serving, 0.7)),
        WebhookStep::ReissueServing
    );
}

#[test]
fn a_serving_certificate_never_outlives_its_ca() {
    let c = ca("short", 100);
    let s = issue_serving(&c, "svc", "ns", &[], time::Duration::seconds(10_000)).unwrap();
    assert_eq!(s.not_after, c.not_after);
}

#[test]
fn an_interception_ca_signs_only_once_every_namespace_trusts_it_and_the_grace_passed() {
    let mut p = InterceptPki {
        ca: ca("ic", 900),
        next_ca: None,
        previous_ca: None,
    };
    let grace = Duration::from_secs(60);
    assert_eq!(
        intercept_step(&p, true, grace, at(&p.ca, 0.5)),
        InterceptStep::Nothing
    );
    let due = at(&p.ca, 0.7);
    assert_eq!(
        intercept_step(&p, true, grace, due),
        InterceptStep::AddNextCa
    );
    p.next_ca = Some(ca("ic-next", 900));
    let m = p.material(due);
    assert_eq!(pems(&m.trusted).len(), 2, "both CAs trusted");
    assert_eq!(m.cert, p.ca.cert, "the old CA still signs");
    assert!(m.bundle.contains(p.next_ca.as_ref().unwrap().cert.trim()));
    let next_born = p.next_ca.as_ref().unwrap().not_before;
    assert_eq!(
        intercept_step(&p, false, grace, next_born + 600),
        InterceptStep::Nothing,
        "not every namespace has it yet"
    );
    assert_eq!(
        intercept_step(&p, true, grace, next_born + 30),
        InterceptStep::Nothing,
        "within the grace"
    );
    assert_eq!(
        intercept_step(&p, true, grace, next_born + 61),
        InterceptStep::Promote
    );
    let next = p.next_ca.take().unwrap();
    p.previous_ca = Some(std::mem::replace(&mut p.ca, next));
    let m = p.material(next_born + 61);
    assert_eq!(m.cert, p.ca.cert, "the new CA signs");
    assert_eq!(pems(&m.trusted).len(), 2, "the old one stays trusted");
    let old_expiry = p.previous_ca.as_ref().unwrap().not_after;
    assert_eq!(pems(&p.material(old_expiry).trusted).len(), 1);
    assert_eq!(
        intercept_step(&p, true, grace, old_expiry),
        InterceptStep::PrunePrevious
    );
}

#[test]
fn the_serving_certificate_is_swapped_in_place() {
    let a = webhook(3000).serving;
    let b = webhook(3000).serving;
    let s = Arc::new(ServingCert::new(&a).unwrap());
    assert!(!s.set(&a).unwrap(), "same certificate: no change");
    assert!(s.set(&b).unwrap());
    assert_eq!(s.current.read().unwrap().0, b.cert);
    s.server_config().unwrap();
}

#[test]
fn bundles_compare_as_sets() {
    let (a, b) = (ca("a", 100).cert, ca("b", 100).cert);
    assert!(same_bundle(&format!("{a}\n{b}"), &format!("{b}{a}")));
    assert!(!same_bundle(&a, &format!("{a}{b}")));
    assert!(!same_bundle("", &a));
}
