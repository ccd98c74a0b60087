//! Pacer's HTTP listeners: the main one (GitHub's webhooks, health) built by [`router`], and
//! Prometheus metrics on their own port.

pub mod acme;
pub mod runner;
pub mod serve;
pub mod tls;
mod webhook;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kube::runtime::reflector::Store;
use tokio::sync::Semaphore;

use crate::api::RunnerPool;
use crate::config::Secret;
use crate::controller::{Context, job};

/// Largest webhook body accepted. GitHub caps deliveries at 25 MB, but its `workflow_job`
/// examples are 7 to 12 KiB; see docs/security.md for the margin.
pub const WEBHOOK_BODY_LIMIT: usize = 256 * 1024;
/// Longest a request may take before it is answered 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests the `/api/` routes handle at once, all of them together; one more is answered 503
/// with `Retry-After` at once rather than queued.
pub const CONCURRENCY: usize = 128;
/// What a client refused for [`CONCURRENCY`] is told to wait, in seconds.
pub const BUSY_RETRY_AFTER: u64 = 2;

/// What the main listener's handlers share.
pub struct Web {
    /// The API server client, the controller id and the metrics.
    pub ctx: Arc<Context>,
    /// Every RunnerPool the controller watches, for matching queued jobs.
    pub pools: Store<RunnerPool>,
    /// Webhook secrets: the current one and, while rotating, the previous one.
    pub webhook_secrets: Vec<Secret>,
    /// The one namespace served, or `None` for all.
    pub namespace: Option<String>,
    /// Identity trust roots and the callback key; `None` answers the runner endpoints 503.
    pub runners: Option<runner::RunnerSide>,
    /// Set once the pool cache has synced: until then a queued job could miss its pool.
    pub ready: AtomicBool,
    /// Set on SIGTERM: readiness fails so the Service stops routing here, while the listener
    /// still serves what arrives until it stops.
    pub draining: AtomicBool,
    /// Deliveries handled recently: a fast path for GitHub's redeliveries; correctness
    /// never depends on it (RunnerJob names do that).
    deliveries: Mutex<Recent>,
    /// GitHub job ids a signed `completed` delivery or GitHub itself said are finished: a
    /// replayed `queued` delivery for one of them is answered without a lookup or a launch.
    /// After a restart, a finished job's RunnerJob (kept `ttlSecondsAfterFinished`) and GitHub
    /// (asked for any `queued` delivery that looks replayed) stand in for it.
    finished_jobs: Mutex<Recent>,
    /// Bootstraps running or answered here, until their instances collect the answer.
    boots: runner::Boots,
    /// Pacer's AWS account and the instances lately found not to be Pacer's.
    strangers: runner::Strangers,
}

impl Web {
    pub fn new(
        ctx: Arc<Context>,
        pools: Store<RunnerPool>,
        webhook_secrets: Vec<Secret>,
        namespace: Option<String>,
    ) -> Self {
        Self {
            ctx,
            pools,
            webhook_secrets,
            namespace,
            runners: None,
            draining: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            deliveries: Mutex::new(Recent::up_to(4096)),
            finished_jobs: Mutex::new(Recent::up_to(16384)),
            boots: Default::default(),
            strangers: Default::default(),
        }
    }
}

impl Web {
    /// Serves the runner endpoints with these trust roots and this callback key.
    pub fn with_runners(mut self, runners: runner::RunnerSide) -> Self {
        self.runners = Some(runners);
        self
    }

    /// The AWS account Pacer's instances run in (`aws.account_id`); unset, the first instance
    /// EC2 lists as Pacer's tells it.
    pub fn with_aws_account(self, account: Option<&str>) -> Self {
        if let Some(account) = account {
            self.strangers.learn(account);
        }
        self
    }
}

/// A bounded set of recent delivery ids: the oldest goes when it is full.
struct Recent {
    order: VecDeque<String>,
    seen: HashSet<String>,
    capacity: usize,
}

impl Recent {
    /// Grows as ids come, up to `capacity`: the sets are sized for a busy day (16,384 finished
    /// jobs), which an idle controller should not hold in memory from its start.
    fn up_to(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            seen: HashSet::new(),
            capacity,
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    fn insert(&mut self, id: String) {
        if !self.seen.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
    }
}

/// The main listener: `POST /api/webhook`, the runner endpoints under `/api/runner/`,
/// `GET /healthz`, `GET /readyz`.
pub fn router(state: Arc<Web>) -> Router {
    use tower_http::trace::TraceLayer;
    let delivery = HeaderName::from_static("x-github-delivery");
    let span = move |request: &Request<_>| {
        let delivery = request
            .headers()
            .get(&delivery)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), delivery)
    };
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let api = Router::new()
        .route("/api/webhook", post(webhook::receive))
        .route("/api/runner/bootstrap", post(runner::bootstrap))
        .route("/api/runner/register", post(runner::register))
        .route("/api/runner/complete", post(runner::complete))
        .route("/api/runner/interrupted", post(runner::interrupted))
        .route("/api/runner/error", post(runner::error))
        .route("/api/runner/prepared", post(runner::prepared))
        .route("/api/runner/release/{asset}", get(runner::release))
        .route_layer(axum::middleware::from_fn_with_state(permits, bounded));
    // The probes stay outside the bound: a listener busy with requests is still alive.
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .layer(TraceLayer::new_for_http().make_span_with(span))
        .with_state(state)
}

/// Holds one of the listener's [`CONCURRENCY`] permits for the request, or refuses it at once
/// when none is free; and answers 408 when the request, its body included, takes longer than
/// [`REQUEST_TIMEOUT`].
async fn bounded(
    State(permits): State<Arc<Semaphore>>,
    request: Request<Body>,
    next: Next,
) -> Response {
    let Ok(_permit) = permits.try_acquire_owned() else {
        let why = "Pacer is handling as many requests as it takes; retry shortly";
        return ApiError::NotYet(why.into(), BUSY_RETRY_AFTER).into_response();
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut.into_response(),
    }
}

/// A request's body, at most `limit` bytes: a larger one is refused 413 as soon as its
/// `Content-Length`, or the bytes read so far, say so.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use futures::StreamExt as _;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    let mut read = Vec::with_capacity(declared.map_or(0, |length| length as usize));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::BadRequest("the request body could not be read".into()))?;
        if read.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        read.extend_from_slice(&chunk);
    }
    Ok(read.into())
}

async fn readyz(State(web): State<Arc<Web>>) -> Response {
    if web.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if web.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "RunnerPool cache not synced yet",
        )
            .into_response()
    }
}

/// Why a request failed, as the client is told: a status and a reason, never internals
/// (those are logged where they happen).
#[derive(Clone, Debug)]
pub enum ApiError {
    Unauthorized(&'static str),
    /// 401 with a reason that names what did not match.
    Denied(String),
    Conflict(String),
    NotFound(String),
    BadRequest(String),
    Unavailable(&'static str),
    /// 503 with `Retry-After`: nothing is wrong, the answer is not ready yet.
    NotYet(String, u64),
    /// 413: the body is over this many bytes.
    TooLarge(usize),
    /// 408: the request took longer than [`REQUEST_TIMEOUT`].
    TimedOut,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, reason) = match self {
            Self::Unauthorized(why) => (StatusCode::UNAUTHORIZED, why.to_string()),
            Self::Denied(why) => (StatusCode::UNAUTHORIZED, why),
            Self::Conflict(why) => (StatusCode::CONFLICT, why),
            Self::NotFound(why) => (StatusCode::NOT_FOUND, why),
            Self::BadRequest(why) => (StatusCode::BAD_REQUEST, why),
            Self::Unavailable(why) => (StatusCode::SERVICE_UNAVAILABLE, why.to_string()),
            Self::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {} KiB", limit / 1024),
            ),
            Self::TimedOut => (
                StatusCode::REQUEST_TIMEOUT,
                format!("the request took over {} s", REQUEST_TIMEOUT.as_secs()),
            ),
            Self::NotYet(why, seconds) => {
                let body = axum::Json(serde_json::json!({ "error": why }));
                let retry = [(axum::http::header::RETRY_AFTER, seconds.to_string())];
                return (StatusCode::SERVICE_UNAVAILABLE, retry, body).into_response();
            }
        };
        (status, axum::Json(serde_json::json!({ "error": reason }))).into_response()
    }
}

/// Where this replica runs, for what replicas share through the API server.
pub struct Cluster {
    pub client: kube::Client,
    /// The replica's own namespace (`$POD_NAMESPACE`).
    pub namespace: String,
    /// The replica's name (`$POD_NAME`).
    pub identity: String,
}

/// Serves `router` on `server.listen` until `shutdown`, TLS-terminated as `server.tls.mode`
/// says: plain, certificate files (reloaded when they change), a self-signed certificate, or
/// ACME (which also answers HTTP-01 challenges on `server.tls.acme.http_listen`).
pub async fn serve_main(
    server: &crate::config::ServerConfig,
    router: Router,
    cluster: Option<Cluster>,
    limits: serve::Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    use crate::config::TlsMode;
    let bind = |address: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| crate::Error::Io {
                path: address.to_string().into(),
                source,
            })
    };
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| crate::Error::Io { path, source }
    };
    let invalid = |key: &str, message: String| {
        crate::Error::Config(crate::config::ConfigError::Invalid {
            path: "<config>".into(),
            key: key.into(),
            message,
        })
    };
    let listener = bind(server.listen).await?;
    let tls_config = &server.tls;
    let certificates = match tls_config.mode {
        TlsMode::None => {
            tracing::info!(address = %server.listen, "serving HTTP");
            serve::serve(listener, serve::Transport::Plain, router, limits, shutdown).await;
            return Ok(());
        }
        TlsMode::Manual => {
            let (Some(cert), Some(key)) = (&tls_config.cert_file, &tls_config.key_file) else {
                return Err(invalid(
                    "server.tls.cert_file",
                    "manual TLS needs cert_file and key_file".into(),
                ));
            };
            let chain = std::fs::read(cert).map_err(io(cert))?;
            let key_pem = std::fs::read(key).map_err(io(key))?;
            let certified = tls::certified_key(&chain, &key_pem)
                .map_err(|m| invalid("server.tls.cert_file", m))?;
            let certificates = tls::Certificates::new(certified);
            tokio::spawn(tls::reload_on_change(
                certificates.clone(),
                cert.clone(),
                key.clone(),
                tls::RELOAD_CHECK,
            ));
            certificates
        }
        TlsMode::SelfSigned => {
            let hosts = if tls_config.hosts.is_empty() {
                let host = server
                    .public_url
                    .split("://")
                    .nth(1)
                    .and_then(|rest| rest.split(['/', ':']).next())
                    .filter(|h| !h.is_empty())
                    .unwrap_or("localhost");
                vec![host.to_string()]
            } else {
                tls_config.hosts.clone()
            };
            let (certified, _) =
                tls::self_signed(&hosts).map_err(|m| invalid("server.tls.hosts", m))?;
            let certificates = tls::Certificates::new(certified);
            tracing::info!(?hosts, fingerprint = %certificates.fingerprint(),
                "serving a self-signed certificate: clients must trust this fingerprint");
            certificates
        }
        TlsMode::Acme => {
            let Some(acme_config) = tls_config.acme.clone() else {
                return Err(invalid(
                    "server.tls.acme",
                    "required when server.tls.mode is acme".into(),
                ));
            };
            // Served until the CA issues the real one.
            let (placeholder, _) = tls::self_signed(&acme_config.domains)
                .map_err(|m| invalid("server.tls.acme.domains", m))?;
            let certificates = tls::Certificates::new(placeholder);
            let store = Arc::new(match (&acme_config.secret, cluster) {
                (Some(name), Some(cluster)) => acme::Store::Secret {
                    api: kube::Api::namespaced(cluster.client, &cluster.namespace),
                    name: name.clone(),
                    identity: cluster.identity,
                },
                (Some(_), None) => {
                    return Err(invalid(
                        "server.tls.acme.secret",
                        "a Secret needs the Kubernetes API".into(),
                    ));
                }
                (None, _) => acme::Store::Folder(acme_config.cache_dir.clone()),
            });
            let challenges = acme::Challenges::default();
            let http = bind(acme_config.http_listen).await?;
            tracing::info!(address = %acme_config.http_listen, "answering ACME HTTP-01 challenges");
            let challenge_router = acme::challenge_router(challenges.clone(), store.clone());
            tokio::spawn(serve::serve(
                http,
                serve::Transport::Plain,
                challenge_router,
                serve::Limits::SIDE,
                std::future::pending(),
            ));
            tokio::spawn(acme::run(
                acme_config,
                store,
                certificates.clone(),
                challenges,
                Duration::from_secs(60),
            ));
            certificates
        }
    };
    tracing::info!(address = %server.listen, "serving HTTPS");
    let acceptor = tls::acceptor(certificates).map_err(io(std::path::Path::new("TLS")))?;
    serve::serve(
        listener,
        serve::Transport::Tls(acceptor),
        router,
        limits,
        shutdown,
    )
    .await;
    Ok(())
}

/// Merge-patches a RunnerJob's status, as Pacer's field manager; with `resource_version`, only
/// if the object is still at that version (409 otherwise). The job as written. Shared by the
/// webhook and the runner endpoints.
async fn patch_job_status(
    web: &Web,
    job: &crate::api::RunnerJob,
    resource_version: Option<&str>,
    status: serde_json::Value,
) -> Result<crate::api::RunnerJob, kube::Error> {
    use kube::ResourceExt as _;
    let mut patch = serde_json::json!({ "status": status });
    if let Some(rv) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
    }
    let params = kube::api::PatchParams {
        field_manager: Some(crate::controller::FIELD_MANAGER.into()),
        ..Default::default()
    };
    kube::Api::<crate::api::RunnerJob>::namespaced(
        web.ctx.client.clone(),
        &job.namespace().unwrap_or_default(),
    )
    .patch_status(&job.name_any(), &params, &kube::api::Patch::Merge(patch))
    .await
}

/// `GET /metrics`: the Prometheus text exposition.
pub fn metrics_router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    job::count_jobs(&ctx);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_deliveries_forget_the_oldest_when_full() {
        let mut recent = Recent::up_to(2);
        for id in ["a", "b", "a", "c"] {
            recent.insert(id.into());
        }
        assert!(!recent.contains("a"));
        assert!(recent.contains("b") && recent.contains("c"));
    }
}
