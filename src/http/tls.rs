//! TLS in process (`server.tls.mode`): the acceptor the main listener terminates TLS with, and
//! a certificate that can change under it (files rewritten, ACME renewals).
//!
//! Handshakes run on their connections' own tasks, bounded in time and in number with the
//! connections (see `serve`), so a slow or silent client never holds up the next one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

/// How often certificate files are looked at for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// The certificate served now; replaced whole when a new one arrives.
#[derive(Debug)]
pub struct Certificates {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificates {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(key)),
        })
    }

    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().expect("not poisoned") = Arc::new(key);
    }

    /// SHA-256 of the leaf certificate served now, hex with colons, as browsers show it.
    pub fn fingerprint(&self) -> String {
        let current = self.current.read().expect("not poisoned").clone();
        current
            .cert
            .first()
            .map(|leaf| fingerprint(leaf))
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("not poisoned").clone())
    }
}

pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A certificate chain and its key, from PEM.
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file is not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key file holds no PEM private key: {e}"))?;
    let signing = aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| format!("the private key cannot sign: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("the key does not belong to the certificate: {e}"))?;
    Ok(certified)
}

/// A self-signed certificate for `hosts` (DNS names or IP addresses), and its PEM.
pub fn self_signed(hosts: &[String]) -> Result<(CertifiedKey, String), String> {
    let made = rcgen::generate_simple_self_signed(hosts.to_vec())
        .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
    let pem = made.cert.pem();
    let key = made.signing_key.serialize_pem();
    Ok((certified_key(pem.as_bytes(), key.as_bytes())?, pem))
}

/// Keeps `certificates` in step with a certificate and key file pair: both are read again
/// whenever either changes. A pair that does not load is logged and the old one kept.
pub async fn reload_on_change(
    certificates: Arc<Certificates>,
    cert_file: PathBuf,
    key_file: PathBuf,
    every: Duration,
) {
    let stamp = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen: (Option<SystemTime>, Option<SystemTime>) = (stamp(&cert_file), stamp(&key_file));
    loop {
        tokio::time::sleep(every).await;
        let now = (stamp(&cert_file), stamp(&key_file));
        if now == seen {
            continue;
        }
        seen = now;
        let loaded = std::fs::read(&cert_file)
            .and_then(|c| std::fs::read(&key_file).map(|k| (c, k)))
            .map_err(|e| e.to_string())
            .and_then(|(c, k)| certified_key(&c, &k));
        match loaded {
            Ok(key) => {
                certificates.replace(key);
                info!(cert = %cert_file.display(), fingerprint = %certificates.fingerprint(),
                    "TLS certificate reloaded");
            }
            Err(e) => warn!(cert = %cert_file.display(), error = %e,
                "the changed TLS certificate does not load; still serving the previous one"),
        }
    }
}

/// What terminates TLS on the main listener: HTTP/1.1 only, with whichever certificate
/// `certificates` holds at each handshake.
pub fn acceptor(certificates: Arc<Certificates>) -> io::Result<tokio_rustls::TlsAcceptor> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let a_key = a.signing_key.serialize_pem();
        assert!(certified_key(a.cert.pem().as_bytes(), a_key.as_bytes()).is_ok());
        let err = certified_key(
            a.cert.pem().as_bytes(),
            b.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap_err();
        assert!(err.contains("does not belong"), "{err}");
        assert!(certified_key(b"", a_key.as_bytes()).is_err());
        assert!(certified_key(a.cert.pem().as_bytes(), b"").is_err());
    }

    #[test]
    fn fingerprints_read_like_browsers_show_them() {
        let (key, _) = self_signed(&["localhost".into()]).unwrap();
        let certificates = Certificates::new(key);
        let print = certificates.fingerprint();
        assert_eq!(print.len(), 32 * 3 - 1);
        assert!(print.chars().all(|c| c.is_ascii_hexdigit() || c == ':'));
    }
}
