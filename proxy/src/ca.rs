//! The interception CA: `tollgate-proxy ca init` creates it; CONNECT and transparent mode
//! terminate the agent's TLS with a leaf for the requested host, minted on first use with
//! rcgen, signed by this CA and cached. Upstream TLS is re-originated separately, with real
//! verification (see [`crate::upstream`]).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use time::{Duration, OffsetDateTime};

/// Most leaves kept; the cache is cleared when it fills (hosts are a tool catalog, so small).
const LEAF_CACHE_MAX: usize = 1024;

/// ALPN protocols offered to the agent.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why the CA could not be created or loaded, or a leaf minted.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Certificate or key material.
    #[error("interception CA: {0}")]
    Cert(String),
}

fn cert_err(e: impl std::fmt::Display) -> CaError {
    CaError::Cert(e.to_string())
}

/// Files written by [`init`].
#[derive(Debug)]
pub struct CaFiles {
    /// `ca.crt` (PEM; give this to the agent's runtime as a trust anchor).
    pub cert: PathBuf,
    /// `ca.key` (PEM, mode 0600; only the sidecar reads it).
    pub key: PathBuf,
}

/// Create a new interception CA in `dir` (`ca.crt`, `ca.key`). Refuses to overwrite an
/// existing CA unless `force`.
pub fn init(dir: &Path, days: i64, force: bool) -> Result<CaFiles, CaError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files = CaFiles {
        cert: dir.join("ca.crt"),
        key: dir.join("ca.key"),
    };
    if !force && (files.cert.exists() || files.key.exists()) {
        return Err(CaError::Cert(format!(
            "{} already holds a CA; pass --force to replace it",
            dir.display()
        )));
    }
    let (cert_pem, key_pem) = new_ca("Tollgate interception CA", days)?;
    write_private(&files.key, key_pem.as_bytes()).map_err(io(&files.key))?;
    std::fs::write(&files.cert, cert_pem).map_err(io(&files.cert))?;
    Ok(files)
}

/// A new self-signed CA valid for `days`: `(certificate PEM, private key PEM)`. Also used by
/// the operator for its webhook CA.
pub fn new_ca(common_name: &str, days: i64) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
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
    p.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(days);
    let cert = p.self_signed(&key).map_err(cert_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// A loaded interception CA with its leaf cache.
pub struct InterceptCa {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl std::fmt::Debug for InterceptCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterceptCa").finish_non_exhaustive()
    }
}

impl InterceptCa {
    /// Load the CA from PEM files (`tls.intercept.caCert` / `caKey`).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// Load the CA from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        use rustls::pki_types::pem::PemObject;
        let key = KeyPair::from_pem(key_pem).map_err(cert_err)?;
        let ca_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .ok_or_else(|| CaError::Cert("no certificate in the CA file".into()))?
            .map_err(cert_err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_err)?;
        Ok(Self {
            issuer,
            ca_der,
            leaves: Mutex::default(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// The TLS server config presenting a leaf for `host` (minted and cached on first use).
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        if let Some(c) = self.leaves.lock().expect("leaf cache lock").get(host) {
            return Ok(c.clone());
        }
        let config = Arc::new(self.mint(host)?);
        let mut leaves = self.leaves.lock().expect("leaf cache lock");
        if leaves.len() >= LEAF_CACHE_MAX {
            leaves.clear();
        }
        leaves.insert(host.to_owned(), config.clone());
        Ok(config)
    }

    /// Number of cached leaves (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.leaves.lock().expect("leaf cache lock").len()
    }

    fn mint(&self, host: &str) -> Result<rustls::ServerConfig, CaError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        p.subject_alt_names = vec![match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(cert_err)?),
        }];
        p.distinguished_name.push(DnType::CommonName, host);
        p.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
        p.not_after = OffsetDateTime::now_utc() + Duration::days(7);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf = p.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let chain = vec![leaf.der().clone(), self.ca_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(cert_err)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(cert_err)?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_ca_that_loads_and_mints_cached_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), 30, false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key must be private");
        assert!(
            init(dir.path(), 30, false).is_err(),
            "must not overwrite silently"
        );
        let ca = InterceptCa::load(&files.cert, &files.key).unwrap();
        let a = ca.server_config("api.example.com").unwrap();
        let b = ca.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "leaves are cached");
        assert_eq!(ca.cached(), 1);
        ca.server_config("127.0.0.1").unwrap();
        assert_eq!(ca.cached(), 2);
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(InterceptCa::from_pem("nope", "nope").is_err());
    }
}
