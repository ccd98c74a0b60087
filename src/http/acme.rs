//! `server.tls.mode: acme`: certificates from an ACME CA (Let's Encrypt) over HTTP-01.
//!
//! The account, the certificate and its key are cached in `cache_dir`, so a restart serves
//! the cached certificate at once. Until a certificate is issued the listener serves a
//! self-signed one. A certificate is renewed when less than [`RENEW_BEFORE`] of it is left.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use der::Decode as _;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tracing::{info, warn};

use super::tls::{self, Certificates};
use crate::config::AcmeConfig;

/// A certificate with less than this left is renewed.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// HTTP-01 tokens waiting for the CA, and their key authorizations.
pub type Challenges = Arc<RwLock<HashMap<String, String>>>;

/// `GET /.well-known/acme-challenge/{token}` on the plain-HTTP listener.
pub fn challenge_router(challenges: Challenges) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(answer))
        .with_state(challenges)
}

async fn answer(State(challenges): State<Challenges>, UrlPath(token): UrlPath<String>) -> Response {
    match challenges.read().expect("not poisoned").get(&token) {
        Some(key_authorization) => key_authorization.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

struct Cache {
    dir: PathBuf,
}

impl Cache {
    fn account(&self) -> PathBuf {
        self.dir.join("account.json")
    }
    fn chain(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// The cached certificate and key, and how long the certificate has left.
    fn certificate(&self) -> Option<(String, String, Duration)> {
        let chain = std::fs::read_to_string(self.chain()).ok()?;
        let key = std::fs::read_to_string(self.key()).ok()?;
        Some((chain.clone(), key, time_left(&chain)?))
    }

    fn write(&self, path: &Path, contents: &str) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let partial = path.with_extension("partial");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(partial, path)
    }
}

/// How long the leaf of a PEM chain has before it expires; `None` if it does not parse.
fn time_left(chain_pem: &str) -> Option<Duration> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()?;
    let cert = x509_cert::Certificate::from_der(&leaf).ok()?;
    let not_after = cert
        .tbs_certificate()
        .validity()
        .not_after
        .to_unix_duration();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(not_after.saturating_sub(now))
}

/// Keeps `certificates` issued and renewed; runs for the life of the process. Looks again
/// every `check_every`, and a minute after a failure.
pub async fn run(
    config: AcmeConfig,
    certificates: Arc<Certificates>,
    challenges: Challenges,
    check_every: Duration,
) {
    let cache = Cache {
        dir: config.cache_dir.clone(),
    };
    if let Err(e) = std::fs::create_dir_all(&cache.dir) {
        warn!(dir = %cache.dir.display(), error = %e, "cannot create the ACME cache folder");
    }
    let mut serving_cached = false;
    loop {
        let wait = match cache.certificate() {
            Some((chain, key, left)) if left > RENEW_BEFORE => {
                if !serving_cached {
                    match tls::certified_key(chain.as_bytes(), key.as_bytes()) {
                        Ok(certified) => {
                            certificates.replace(certified);
                            serving_cached = true;
                            info!(domains = ?config.domains, days_left = left.as_secs() / 86400,
                                fingerprint = %certificates.fingerprint(), "serving the ACME certificate");
                        }
                        Err(e) => warn!(error = %e, "the cached ACME certificate does not load"),
                    }
                }
                if serving_cached {
                    check_every
                } else {
                    Duration::ZERO
                }
            }
            _ => match obtain(&config, &cache, &challenges).await {
                Ok(()) => {
                    serving_cached = false;
                    Duration::ZERO
                }
                Err(e) => {
                    warn!(domains = ?config.domains, directory = %config.directory_url, error = %e,
                        "could not obtain a certificate from the ACME CA; retrying in a minute");
                    Duration::from_secs(60)
                }
            },
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

async fn account(config: &AcmeConfig, cache: &Cache) -> Result<Account, String> {
    let builder = || match &config.directory_ca_file {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let builder = builder().map_err(|e| format!("ACME client: {e}"))?;
    if let Ok(text) = std::fs::read_to_string(cache.account()) {
        let credentials: AccountCredentials =
            serde_json::from_str(&text).map_err(|e| format!("cached ACME account: {e}"))?;
        return builder
            .from_credentials(credentials)
            .await
            .map_err(|e| format!("restoring the ACME account: {e}"));
    }
    let contact = format!("mailto:{}", config.email);
    let (account, credentials) = builder
        .create(
            &NewAccount {
                contact: &[&contact],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory_url.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating the ACME account: {e}"))?;
    let text = serde_json::to_string(&credentials).map_err(|e| e.to_string())?;
    cache
        .write(&cache.account(), &text)
        .map_err(|e| format!("caching the ACME account: {e}"))?;
    info!(directory = %config.directory_url, "ACME account created");
    Ok(account)
}

/// One order: answer each HTTP-01 challenge, finalize, and cache the certificate.
async fn obtain(config: &AcmeConfig, cache: &Cache, challenges: &Challenges) -> Result<(), String> {
    let account = account(config, cache).await?;
    let identifiers: Vec<Identifier> = config
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    let mut tokens = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(|e| format!("authorization: {e}"))?;
        if authorization.status == AuthorizationStatus::Valid {
            continue;
        }
        let mut challenge = authorization
            .challenge(ChallengeType::Http01)
            .ok_or("the CA offers no HTTP-01 challenge")?;
        let token = challenge.token.clone();
        challenges.write().expect("not poisoned").insert(
            token.clone(),
            challenge.key_authorization().as_str().to_string(),
        );
        tokens.push(token);
        challenge
            .set_ready()
            .await
            .map_err(|e| format!("challenge: {e}"))?;
    }
    let outcome = async {
        let status = order
            .poll_ready(&RetryPolicy::default())
            .await
            .map_err(|e| format!("waiting for validation: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!("the order is {status:?}, not ready"));
        }
        let key = order
            .finalize()
            .await
            .map_err(|e| format!("finalize: {e}"))?;
        let chain = order
            .poll_certificate(&RetryPolicy::default())
            .await
            .map_err(|e| format!("certificate: {e}"))?;
        Ok((chain, key))
    }
    .await;
    let mut pending = challenges.write().expect("not poisoned");
    for token in tokens {
        pending.remove(&token);
    }
    drop(pending);
    let (chain, key) = outcome?;
    tls::certified_key(chain.as_bytes(), key.as_bytes())?;
    cache
        .write(&cache.key(), &key)
        .and_then(|()| cache.write(&cache.chain(), &chain))
        .map_err(|e| format!("caching the certificate: {e}"))?;
    info!(domains = ?config.domains, "ACME certificate issued");
    Ok(())
}
