//! `server.tls.mode: acme`: certificates from an ACME CA (Let's Encrypt) over HTTP-01.
//!
//! What ACME needs to keep (the account, the certificate and its key, the HTTP-01 tokens being
//! validated) lives in a [`Store`]: a folder for one replica, or one named Secret shared by
//! every replica, so that whichever replica a challenge reaches can answer it and all serve the
//! same certificate. With a Secret, one replica orders at a time: it claims the order with a
//! conditional write of the Secret, which the others see and wait on.
//!
//! Until a certificate is issued the listener serves a self-signed one. A certificate is
//! renewed when less than [`RENEW_BEFORE`] of it is left.

use std::collections::{BTreeMap, HashMap};
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
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use super::tls::{self, Certificates};
use crate::config::AcmeConfig;

/// A certificate with less than this left is renewed.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a replica reads the HTTP-01 answers other replicas share in the Secret. A
/// challenge request never reads the Secret itself: answers come from memory.
pub const SHARED_REFRESH: Duration = Duration::from_secs(3);
/// How long a replica's claim on ordering holds before another may take over.
const ORDER_CLAIM: Duration = Duration::from_secs(10 * 60);
const ACCOUNT: &str = "account.json";
const CHAIN: &str = "tls.crt";
const KEY: &str = "tls.key";
const CHALLENGES: &str = "challenges.json";
const CLAIM: &str = "pacer.dev/acme-order";

/// HTTP-01 tokens this replica is waiting on, and their key authorizations.
pub type Challenges = Arc<RwLock<HashMap<String, String>>>;

/// Where ACME state is kept. One per process, behind an `Arc`: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Store {
    /// A folder of this replica's: `account.json`, `tls.crt`, `tls.key` (0600).
    Folder(PathBuf),
    /// One Secret every replica reads and writes (get and update, by name).
    Secret {
        api: Api<Secret>,
        name: String,
        /// This replica, in order claims.
        identity: String,
    },
}

/// The challenge listener: `GET /.well-known/acme-challenge/{token}` on plain HTTP, answered
/// from memory: this replica's own answers, and the ones other replicas share in the Secret,
/// read every [`SHARED_REFRESH`] for as long as the router lives. So an unauthenticated
/// request, whatever its token, costs no Kubernetes API call.
pub fn challenge_router(challenges: Challenges, store: Arc<Store>) -> Router {
    let shared = Challenges::default();
    if let Store::Secret { .. } = store.as_ref() {
        tokio::spawn(refresh_shared(store, Arc::downgrade(&shared)));
    }
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(answer))
        .with_state([challenges, shared])
}

/// Copies the Secret's shared answers into `shared` every [`SHARED_REFRESH`], until the router
/// is gone.
async fn refresh_shared(
    store: Arc<Store>,
    shared: std::sync::Weak<RwLock<HashMap<String, String>>>,
) {
    loop {
        let pending = store.shared_challenges().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match pending {
            Ok(pending) => *shared.write().expect("not poisoned") = pending,
            Err(e) => tracing::debug!(error = %e, "cannot read the shared HTTP-01 answers"),
        }
        drop(shared);
        tokio::time::sleep(SHARED_REFRESH).await;
    }
}

/// Whether `token` can be an ACME HTTP-01 token (RFC 8555: base64url, at least 128 bits): what
/// is not is refused before any lookup.
pub fn is_challenge_token(token: &str) -> bool {
    (22..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn answer(
    State(answers): State<[Challenges; 2]>,
    UrlPath(token): UrlPath<String>,
) -> Response {
    if !is_challenge_token(&token) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let found = answers
        .iter()
        .find_map(|a| a.read().expect("not poisoned").get(&token).cloned());
    match found {
        Some(key_authorization) => key_authorization.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(partial, path)
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|v| !v.is_empty())
}

impl Store {
    /// The values kept under `keys`, read at once (one GET of the Secret).
    async fn read_all<const N: usize>(
        &self,
        keys: [&str; N],
    ) -> Result<[Option<String>; N], String> {
        match self {
            Self::Folder(dir) => Ok(keys.map(|key| std::fs::read_to_string(dir.join(key)).ok())),
            Self::Secret { api, name, .. } => {
                let secret = api
                    .get(name)
                    .await
                    .map_err(|e| format!("reading Secret {name}: {e}"))?;
                let data = secret.data.unwrap_or_default();
                Ok(keys.map(|key| text(&data, key)))
            }
        }
    }

    /// A value kept under `key`.
    async fn read(&self, key: &str) -> Result<Option<String>, String> {
        let [value] = self.read_all([key]).await?;
        Ok(value)
    }

    /// Changes the Secret with `change` (its data and annotations) and writes it back if still
    /// at the version read; a concurrent change makes it read and try again. `change` returns
    /// false to leave the Secret as it is.
    async fn update(
        &self,
        mut change: impl FnMut(&mut BTreeMap<String, ByteString>, &mut BTreeMap<String, String>) -> bool,
    ) -> Result<bool, String> {
        let Self::Secret { api, name, .. } = self else {
            unreachable!("only a Secret is updated")
        };
        for _ in 0..5 {
            let mut secret = api
                .get(name)
                .await
                .map_err(|e| format!("reading Secret {name}: {e}"))?;
            let mut data = secret.data.take().unwrap_or_default();
            let mut annotations = secret.metadata.annotations.take().unwrap_or_default();
            if !change(&mut data, &mut annotations) {
                return Ok(false);
            }
            secret.data = Some(data);
            secret.metadata.annotations = Some(annotations);
            match api.replace(name, &PostParams::default(), &secret).await {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(format!("writing Secret {name}: {e}")),
            }
        }
        Err(format!("Secret {name} kept changing"))
    }

    async fn write(&self, entries: &[(&str, &str)]) -> Result<(), String> {
        match self {
            Self::Folder(dir) => {
                for (key, value) in entries {
                    write_private(&dir.join(key), value.as_bytes())
                        .map_err(|e| format!("writing {}: {e}", dir.join(key).display()))?;
                }
                Ok(())
            }
            Self::Secret { .. } => self
                .update(|data, _| {
                    for (key, value) in entries {
                        data.insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
                    }
                    true
                })
                .await
                .map(|_| ()),
        }
    }

    /// The certificate chain and key kept, if any.
    async fn certificate(&self) -> Result<Option<(String, String)>, String> {
        let [chain, key] = self.read_all([CHAIN, KEY]).await?;
        Ok(chain.zip(key))
    }

    /// Whether this replica may order now: always with a folder; with a Secret, when no other
    /// replica's claim holds, after writing its own.
    async fn claim_order(&self) -> Result<bool, String> {
        let Self::Secret { identity, .. } = self else {
            return Ok(true);
        };
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        self.update(|_, annotations| {
            let held_by_other = annotations.get(CLAIM).is_some_and(|claim| {
                let mut parts = claim.rsplitn(2, ' ');
                let until = parts
                    .next()
                    .and_then(|u| u.parse::<i64>().ok())
                    .unwrap_or(0);
                let holder = parts.next().unwrap_or_default();
                holder != identity && until > now
            });
            if held_by_other {
                return false;
            }
            let until = now + ORDER_CLAIM.as_secs() as i64;
            annotations.insert(CLAIM.into(), format!("{identity} {until}"));
            true
        })
        .await
    }

    /// Publishes HTTP-01 answers so that any replica can give them, or withdraws them.
    async fn share_challenges(&self, changes: &[(String, Option<String>)]) -> Result<(), String> {
        if let Self::Folder(_) = self {
            return Ok(());
        }
        self.update(|data, annotations| {
            let mut pending: BTreeMap<String, String> = text(data, CHALLENGES)
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            for (token, answer) in changes {
                match answer {
                    Some(answer) => pending.insert(token.clone(), answer.clone()),
                    None => pending.remove(token),
                };
            }
            let json = serde_json::to_vec(&pending).expect("a map serializes");
            data.insert(CHALLENGES.into(), ByteString(json));
            if changes.iter().all(|(_, answer)| answer.is_none()) {
                annotations.remove(CLAIM);
            }
            true
        })
        .await
        .map(|_| ())
    }

    /// The HTTP-01 answers replicas share (one GET of the Secret).
    async fn shared_challenges(&self) -> Result<HashMap<String, String>, String> {
        Ok(self
            .read(CHALLENGES)
            .await?
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default())
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

/// Keeps `certificates` issued, renewed, and the same as the store's; runs for the life of
/// the process. Looks again every `check_every`, and a minute after a failure.
pub async fn run(
    config: AcmeConfig,
    store: Arc<Store>,
    certificates: Arc<Certificates>,
    challenges: Challenges,
    check_every: Duration,
) {
    if let Store::Folder(dir) = store.as_ref()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        warn!(dir = %dir.display(), error = %e, "cannot create the ACME cache folder");
    }
    let mut serving: Option<String> = None;
    loop {
        let wait = match store.certificate().await {
            Err(e) => {
                warn!(error = %e, "cannot read the ACME state; retrying in a minute");
                Duration::from_secs(60)
            }
            Ok(Some((chain, key))) if time_left(&chain).is_some_and(|left| left > RENEW_BEFORE) => {
                if serving.as_deref() != Some(chain.as_str()) {
                    match tls::certified_key(chain.as_bytes(), key.as_bytes()) {
                        Ok(certified) => {
                            certificates.replace(certified);
                            serving = Some(chain);
                            info!(domains = ?config.domains,
                                fingerprint = %certificates.fingerprint(), "serving the ACME certificate");
                        }
                        Err(e) => warn!(error = %e, "the kept ACME certificate does not load"),
                    }
                }
                check_every
            }
            Ok(_) => match store.claim_order().await {
                Ok(true) => match obtain(&config, &store, &challenges).await {
                    Ok(()) => Duration::ZERO,
                    Err(e) => {
                        warn!(domains = ?config.domains, directory = %config.directory_url, error = %e,
                            "could not obtain a certificate from the ACME CA; retrying in a minute");
                        Duration::from_secs(60)
                    }
                },
                // Another replica is ordering: look again soon for its certificate.
                Ok(false) => Duration::from_secs(2),
                Err(e) => {
                    warn!(error = %e, "cannot claim the ACME order; retrying in a minute");
                    Duration::from_secs(60)
                }
            },
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

async fn account(config: &AcmeConfig, store: &Store) -> Result<Account, String> {
    let builder = match &config.directory_ca_file {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    }
    .map_err(|e| format!("ACME client: {e}"))?;
    if let Some(text) = store.read(ACCOUNT).await? {
        let credentials: AccountCredentials =
            serde_json::from_str(&text).map_err(|e| format!("kept ACME account: {e}"))?;
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
    store.write(&[(ACCOUNT, &text)]).await?;
    info!(directory = %config.directory_url, "ACME account created");
    Ok(account)
}

/// One order: answer each HTTP-01 challenge (here and in the store), finalize, keep the
/// certificate.
async fn obtain(config: &AcmeConfig, store: &Store, challenges: &Challenges) -> Result<(), String> {
    let account = account(config, store).await?;
    let identifiers: Vec<Identifier> = config
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    let mut answers = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(|e| format!("authorization: {e}"))?;
        if authorization.status == AuthorizationStatus::Valid {
            continue;
        }
        let challenge = authorization
            .challenge(ChallengeType::Http01)
            .ok_or("the CA offers no HTTP-01 challenge")?;
        answers.push((
            challenge.token.clone(),
            challenge.key_authorization().as_str().to_string(),
        ));
    }
    challenges
        .write()
        .expect("not poisoned")
        .extend(answers.iter().cloned());
    let shared: Vec<(String, Option<String>)> = answers
        .iter()
        .map(|(t, a)| (t.clone(), Some(a.clone())))
        .collect();
    let outcome = async {
        store.share_challenges(&shared).await?;
        if let Store::Secret { .. } = store {
            // Every replica reads the shared answers on a timer: let them all have them before
            // the CA asks whichever one its request reaches.
            tokio::time::sleep(SHARED_REFRESH * 2).await;
        }
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(|e| format!("authorization: {e}"))?;
            if authorization.status == AuthorizationStatus::Valid {
                continue;
            }
            if let Some(mut challenge) = authorization.challenge(ChallengeType::Http01) {
                challenge
                    .set_ready()
                    .await
                    .map_err(|e| format!("challenge: {e}"))?;
            }
        }
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
        tls::certified_key(chain.as_bytes(), key.as_bytes())?;
        store.write(&[(KEY, &key), (CHAIN, &chain)]).await?;
        Ok(())
    }
    .await;
    {
        let mut pending = challenges.write().expect("not poisoned");
        for (token, _) in &answers {
            pending.remove(token);
        }
    }
    let withdrawn: Vec<(String, Option<String>)> =
        answers.iter().map(|(t, _)| (t.clone(), None)).collect();
    if let Err(e) = store.share_challenges(&withdrawn).await {
        warn!(error = %e, "could not withdraw the HTTP-01 answers");
    }
    outcome?;
    info!(domains = ?config.domains, "ACME certificate issued");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt as _;

    const SHARED_TOKEN: &str = "shared-token-0123456789abcdefghijklmnop";

    /// A Secret store on an API server stand-in that counts the requests it gets.
    fn counted_secret_store() -> (Arc<Store>, Arc<AtomicUsize>) {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let service = tower::service_fn(move |_: Request<kube::client::Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let challenges = serde_json::to_vec(&json_map(SHARED_TOKEN, "the-answer")).unwrap();
            let secret = serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "pacer-acme", "namespace": "pacer"},
                "data": {CHALLENGES: base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD, challenges)},
            });
            async move {
                Ok::<_, std::convert::Infallible>(axum::http::Response::new(
                    kube::client::Body::from(serde_json::to_vec(&secret).unwrap()),
                ))
            }
        });
        let client = kube::Client::new(service, "pacer");
        let store = Store::Secret {
            api: Api::namespaced(client, "pacer"),
            name: "pacer-acme".into(),
            identity: "pacer-0".into(),
        };
        (Arc::new(store), requests)
    }

    fn json_map(token: &str, answer: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(token.to_string(), answer.to_string())])
    }

    async fn get(router: &Router, token: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(
                Request::get(format!("/.well-known/acme-challenge/{token}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn challenge_requests_are_answered_from_memory_without_reading_the_secret() {
        let (store, requests) = counted_secret_store();
        let router = challenge_router(Challenges::default(), store);
        // Another replica's answer, shared through the Secret, is served once read.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while get(&router, SHARED_TOKEN).await.0 != StatusCode::OK {
            assert!(tokio::time::Instant::now() < deadline, "never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get(&router, SHARED_TOKEN).await.1, "the-answer");
        let before = requests.load(Ordering::SeqCst);
        for n in 0..200 {
            let unknown = format!("unknown-token-{n:08}-abcdefghijklmnop");
            assert_eq!(get(&router, &unknown).await.0, StatusCode::NOT_FOUND);
        }
        for malformed in ["short", "has.dots.in.it.0123456789abcdef", &"a".repeat(200)] {
            assert_eq!(get(&router, malformed).await.0, StatusCode::NOT_FOUND);
        }
        // At most the timer's own read happened meanwhile.
        let after = requests.load(Ordering::SeqCst);
        assert!(
            after - before <= 1,
            "{} reads of the Secret",
            after - before
        );
    }

    #[test]
    fn challenge_tokens_are_base64url_of_sane_length() {
        assert!(is_challenge_token(
            "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
        ));
        assert!(!is_challenge_token("short"));
        assert!(!is_challenge_token(&"a".repeat(129)));
        assert!(!is_challenge_token(
            "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0="
        ));
        assert!(!is_challenge_token(
            "../../LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDf"
        ));
    }
}
