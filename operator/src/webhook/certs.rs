//! Certificates the operator manages itself, so no cert-manager is needed: a webhook serving
//! certificate for `<service>.<namespace>.svc` signed by an operator CA (whose PEM goes into the
//! webhook configurations' `caBundle`), and the interception CA the sidecars mint leaves from.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// A PEM certificate and key.
#[derive(Clone, Debug)]
pub struct PemPair {
    /// Certificate (PEM).
    pub cert: String,
    /// Private key (PEM).
    pub key: String,
}

/// A CA with a serving certificate signed by it.
#[derive(Clone, Debug)]
pub struct WebhookCerts {
    /// The CA (its cert goes into `caBundle`).
    pub ca: PemPair,
    /// The serving certificate.
    pub serving: PemPair,
    /// When the serving certificate expires.
    pub not_after: OffsetDateTime,
}

/// Why certificate generation failed.
#[derive(Debug, thiserror::Error)]
#[error("certificate generation failed: {0}")]
pub struct CertError(String);

fn e(err: impl std::fmt::Display) -> CertError {
    CertError(err.to_string())
}

/// Create a CA certificate valid for `days`.
pub fn new_ca(common_name: &str, days: i64) -> Result<PemPair, CertError> {
    let (cert, key) = tollgate_proxy::ca::new_ca(common_name, days).map_err(e)?;
    Ok(PemPair { cert, key })
}

/// Create webhook certificates for a Service (`svc`, `svc.ns`, `svc.ns.svc`, plus extra names).
pub fn webhook_certs(
    service: &str,
    namespace: &str,
    extra_names: &[String],
    days: i64,
) -> Result<WebhookCerts, CertError> {
    let ca = new_ca("tollgate-webhook-ca", days * 2)?;
    let ca_key = KeyPair::from_pem(&ca.key).map_err(e)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(e)?;
    let mut names = vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    names.extend(extra_names.iter().cloned());
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(names).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("{service}.{namespace}.svc"));
    let not_after = OffsetDateTime::now_utc() + Duration::days(days);
    p.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
    p.not_after = not_after;
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &issuer).map_err(e)?;
    Ok(WebhookCerts {
        ca,
        serving: PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        },
        not_after,
    })
}

/// A certificate with its key and validity, as the rotation keeps it (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    /// Certificate (PEM).
    pub cert: String,
    /// Private key (PEM).
    pub key: String,
    /// Valid from (Unix seconds).
    pub not_before: i64,
    /// Valid until (Unix seconds).
    pub not_after: i64,
}

impl Issued {
    /// Past two thirds of its life at `now` (Unix seconds)?
    pub fn due(&self, now: i64) -> bool {
        now >= self.not_before + (self.not_after - self.not_before) * 2 / 3
    }

    /// Expired at `now`?
    pub fn expired(&self, now: i64) -> bool {
        now >= self.not_after
    }
}

fn validity(p: &mut CertificateParams, lifetime: Duration) -> (i64, i64) {
    // Issued a little in the past so clocks slightly behind still accept it; the rotation
    // schedule counts from the real issue time.
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::seconds(60);
    p.not_after = now + lifetime;
    (now.unix_timestamp(), p.not_after.unix_timestamp())
}

/// A new CA valid for `lifetime`.
pub fn issue_ca(common_name: &str, lifetime: Duration) -> Result<Issued, CertError> {
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Tollgate");
    p.distinguished_name = dn;
    let (not_before, not_after) = validity(&mut p, lifetime);
    let cert = p.self_signed(&key).map_err(e)?;
    Ok(Issued {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_before,
        not_after,
    })
}

/// A serving certificate for a Service (`svc`, `svc.ns`, `svc.ns.svc`,
/// `svc.ns.svc.cluster.local`, plus `extra_names`), signed by `ca`, valid for `lifetime`
/// (never past the CA's own expiry).
pub fn issue_serving(
    ca: &Issued,
    service: &str,
    namespace: &str,
    extra_names: &[String],
    lifetime: Duration,
) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(e)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(e)?;
    let mut names = vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    names.extend(extra_names.iter().cloned());
    let key = KeyPair::generate().map_err(e)?;
    let mut p = CertificateParams::new(names).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("{service}.{namespace}.svc"));
    let (not_before, mut not_after) = validity(&mut p, lifetime);
    if not_after > ca.not_after {
        not_after = ca.not_after;
        p.not_after = OffsetDateTime::from_unix_timestamp(not_after).map_err(e)?;
    }
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &issuer).map_err(e)?;
    Ok(Issued {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_before,
        not_after,
    })
}

/// Should a certificate expiring at `not_after` be rotated now? (At two thirds of its life,
/// like cert-manager's default.)
pub fn needs_rotation(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    let life = not_after - not_before;
    now >= not_before + life * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_certs_chain_to_their_ca() {
        let c = webhook_certs("tollgate", "tollgate-system", &[], 90).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&c.ca.cert) {
            roots.add(cert).unwrap();
        }
        use rustls::client::danger::ServerCertVerifier;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = rustls_pemfile_certs(&c.serving.cert).remove(0);
        let name = rustls::pki_types::ServerName::try_from("tollgate.tollgate-system.svc").unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .unwrap();
        let wrong = rustls::pki_types::ServerName::try_from("evil.tollgate-system.svc").unwrap();
        assert!(verifier
            .verify_server_cert(&leaf, &[], &wrong, &[], rustls::pki_types::UnixTime::now())
            .is_err());
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn rotation_happens_at_two_thirds() {
        let nb = OffsetDateTime::now_utc();
        let na = nb + Duration::days(90);
        assert!(!needs_rotation(nb, na, nb + Duration::days(59)));
        assert!(needs_rotation(nb, na, nb + Duration::days(61)));
    }
}
