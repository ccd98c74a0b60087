//! The instance's side of the boot protocol: `POST /api/runner/bootstrap` (the signed identity
//! document in, once, the JIT runner config and a callback token out), then `register`,
//! `complete` and `error`, each with that token, checked before the body is read.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};
use kube::runtime::events::EventType;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{ApiError, Web, patch_job_status as patch_status, read_body};
use crate::api::{BootStatus, JobResult, RunnerJob, RunnerJobStatus, RunnerPool, RunnerStatus};
use crate::domain::job::{
    BOOT_ANSWER_HOLD, CLAIM_GIVE_UP, Claimant, Refusal, batch_claim, claims_batch_instance,
    may_bootstrap, may_give_back, may_put_back, still_ours, unnamed_batch_instance,
};
use crate::domain::launch::{BATCH, RUNNER_JOB, RUNNER_JOB_UID};
use crate::runner::identity::TrustRoots;
use crate::runner::token::{self, Claims, Tokens};

/// Largest bootstrap, register and complete bodies.
pub const CALLBACK_BODY_LIMIT: usize = 64 * 1024;
/// Largest error report: the boot log's last 64 KiB, with room to spare.
pub const ERROR_BODY_LIMIT: usize = 256 * 1024;
/// How much of a failed boot's log a RunnerJob's status keeps.
pub const STATUS_LOG_BYTES: usize = 4096;
/// How much of it an Event carries (events.k8s.io caps a note at 1 KiB).
pub const EVENT_LOG_BYTES: usize = 900;
/// A callback token outlives the pool's maxRuntime by this much.
pub const TOKEN_GRACE: Duration = Duration::from_secs(30 * 60);

/// How long an instance EC2 did not list as Pacer's is refused without asking again.
pub const STRANGER_MEMORY: Duration = Duration::from_secs(60);
/// Most instances remembered as not Pacer's: past it the expired go, then all.
const STRANGERS_KEPT: usize = 4096;

/// What bootstraps learned about who is not Pacer's, so that a signed document that cannot be
/// one of its instances costs no EC2 call.
#[derive(Default)]
pub struct Strangers {
    /// The AWS account Pacer's instances run in: `aws.account_id`, or the owner EC2 gave for
    /// the first instance it listed as Pacer's.
    account: std::sync::OnceLock<String>,
    /// Instances EC2 did not list as Pacer's, or listed in another account, and when.
    refused: Mutex<HashMap<String, Instant>>,
}

impl Strangers {
    pub fn account(&self) -> Option<&str> {
        self.account.get().map(String::as_str)
    }

    /// Pacer's account, once known; the first one set stays.
    pub fn learn(&self, account: &str) {
        let _ = self.account.set(account.to_string());
    }

    pub fn refused_lately(&self, instance: &str, now: Instant) -> bool {
        self.refused
            .lock()
            .expect("not poisoned")
            .get(instance)
            .is_some_and(|at| now.duration_since(*at) < STRANGER_MEMORY)
    }

    pub fn refuse(&self, instance: &str, now: Instant) {
        let mut refused = self.refused.lock().expect("not poisoned");
        if refused.len() >= STRANGERS_KEPT {
            refused.retain(|_, at| now.duration_since(*at) < STRANGER_MEMORY);
            if refused.len() >= STRANGERS_KEPT {
                refused.clear();
            }
        }
        refused.insert(instance.to_string(), now);
    }
}

/// What the runner endpoints need beyond the rest of the listener.
pub struct RunnerSide {
    /// Certificates trusted to sign instance identity documents.
    pub trust: TrustRoots,
    pub tokens: Tokens,
    /// The one region Pacer launches in.
    pub region: String,
    /// The actions/runner releases served to the instances.
    pub releases: Arc<crate::runner::release::Releases>,
}

#[derive(Deserialize)]
struct BootstrapRequest {
    /// The identity document, byte for byte as IMDS served it.
    document: String,
    /// IMDS's `rsa2048`: base64 PKCS#7.
    signature: String,
    /// Sent by a warm instance that finished its preparation before: it boots again, started
    /// for a job (or it must not run).
    #[serde(default)]
    prepared: bool,
}

fn denied(why: impl Into<String>) -> ApiError {
    ApiError::Denied(why.into())
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    warn!(error = %e, "{what} failed while serving a runner");
    ApiError::Unavailable("a dependency of Pacer is unavailable; retry later")
}

fn side(web: &Web) -> Result<&RunnerSide, ApiError> {
    web.runners
        .as_ref()
        .ok_or(ApiError::Unavailable("runner callbacks are not configured"))
}

fn jobs(web: &Web, namespace: &str) -> Api<RunnerJob> {
    Api::namespaced(web.ctx.client.clone(), namespace)
}

/// `POST /api/runner/bootstrap`.
pub async fn bootstrap(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let side = side(&web)?;
    let body = read_body(&headers, body, CALLBACK_BODY_LIMIT).await?;
    let request: BootstrapRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be JSON {{\"document\", \"signature\"}}: {e}"
        ))
    })?;
    let doc = side
        .trust
        .verify(request.document.as_bytes(), &request.signature)
        .map_err(|e| denied(format!("identity document refused: {e}")))?;
    let instance_id = doc.instance_id.as_str();
    if doc.region != side.region {
        return Err(denied(format!(
            "the instance is in {}; Pacer launches in {}",
            doc.region, side.region
        )));
    }
    let now = Timestamp::now();
    // The longest boot timeout a pool may set bounds the window before the pool is known.
    let longest = Duration::from_secs(crate::api::MAX_BOOT_TIMEOUT_SECONDS as u64);
    if !crate::domain::job::boots_in_time(doc.pending_time, now, longest) {
        return Err(denied(format!(
            "the instance started at {}, outside the boot timeout any pool may set (2 h)",
            doc.pending_time,
        )));
    }
    // This instance asked before and its bootstrap started here: that answer, once (to a
    // document of the same start or a later one).
    if let Some(waited) = web.boots.wait(instance_id, doc.pending_time).await {
        return answer_from_here(&web, instance_id, waited).await;
    }
    // What cannot be Pacer's costs no EC2 call: another account's document, or an instance
    // EC2 said lately is not Pacer's.
    let strangers = &web.strangers;
    if strangers
        .account()
        .is_some_and(|ours| ours != doc.account_id)
    {
        return Err(denied(format!(
            "the document is from account {}, not Pacer's",
            doc.account_id
        )));
    }
    let not_ours = || denied(format!("instance {instance_id} is not one Pacer launched"));
    if strangers.refused_lately(instance_id, Instant::now()) {
        return Err(not_ours());
    }
    let controller_id = &web.ctx.settings.controller_id;
    let Some((instance, account)) = web
        .ctx
        .ec2()
        .managed_instance(controller_id, instance_id)
        .await
        .map_err(|e| unavailable("DescribeInstances", e))?
    else {
        strangers.refuse(instance_id, Instant::now());
        return Err(not_ours());
    };
    // EC2 listed it as Pacer's: its account is Pacer's, whatever the document says.
    strangers.learn(&account);
    if account != doc.account_id {
        return Err(denied(format!(
            "the document is from account {}; instance {instance_id} is in another",
            doc.account_id
        )));
    }
    if !instance.is_alive() {
        return Err(denied(format!(
            "instance {instance_id} is {}",
            instance.state
        )));
    }
    let job = match (
        instance.tags.get(RUNNER_JOB_UID),
        instance.tags.get(RUNNER_JOB),
    ) {
        (Some(uid), Some(job)) => {
            let Some((namespace, name)) = job.split_once('/') else {
                return Err(denied(format!(
                    "instance {instance_id} carries no RunnerJob tags"
                )));
            };
            jobs(&web, namespace)
                .get_opt(name)
                .await
                .map_err(|e| unavailable("reading the RunnerJob", e))?
                .filter(|job| job.uid().as_deref() == Some(uid.as_str()))
                .ok_or_else(|| {
                    denied(format!(
                        "instance {instance_id}'s RunnerJob {namespace}/{name} is gone"
                    ))
                })?
        }
        _ if instance.tags.contains_key(crate::cloud::tags::WARM) => {
            match warm_taker(&web, &instance).await? {
                Some(job) => {
                    started_for(&job, &doc)?;
                    job
                }
                None => {
                    return prepare_warm(&web, side, &doc, &instance, request.prepared, now).await;
                }
            }
        }
        _ => batch_member(&web, &instance).await?,
    };
    let (namespace, name) = (job.namespace().unwrap_or_default(), job.name_any());
    let (namespace, name) = (namespace.as_str(), name.as_str());
    let uid = &job.uid().unwrap_or_default();
    let claimant = Claimant {
        instance: instance_id,
        job_uid: uid,
    };
    // Refused now rather than after the calls below; the claim asks again of what it writes.
    let status = job.status.clone().unwrap_or_default();
    match may_bootstrap(job.uid().as_deref(), &status, &claimant, now) {
        Ok(()) => {}
        // Its bootstrap started on another replica (or on one that is gone): the answer, once
        // made, waits for it in the RunnerJob's status.
        Err(Refusal::Claimed(why)) => {
            let job = JobRef {
                namespace: namespace.into(),
                name: name.into(),
                uid: uid.clone(),
            };
            return collect(&web, instance_id, &job)
                .await?
                .ok_or_else(|| refused(name, Refusal::Claimed(why)));
        }
        Err(refusal) => return Err(refused(name, refusal)),
    }
    let pool = pool_of(&web, &job).await?;
    let (_, arch) = boot_checks(&web, &pool, &doc, now)?;
    let github = web
        .ctx
        .github
        .clone()
        .ok_or(ApiError::Unavailable("the GitHub App is not configured"))?;
    let target = crate::controller::job::runner_target(&job, &pool);
    let release = (side.releases)
        .release(pool.spec.runner_version.as_deref(), arch)
        .await
        .map_err(|e| unavailable("reading the actions/runner release", e))?;
    // Fetched while the runner is minted, so it is ready when the instance asks for it.
    side.releases.fetch(&release);

    let expires =
        now + Duration::from_secs(pool.spec.max_runtime_minutes as u64 * 60) + TOKEN_GRACE;
    let callback = side.tokens.mint(&Claims {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.clone(),
        instance: instance_id.into(),
        expires: expires.as_second(),
    });
    let boot = BootStatus {
        instance_id: instance_id.into(),
        bootstrapped_at: Time(now),
        token_sha256: token::fingerprint(callback.expose()),
        answer: None,
        runner: None,
        runner_version: Some(release.version.clone()),
        log_tail: None,
    };
    let sequence = hand_out(
        web.clone(),
        Handout {
            job,
            job_uid: uid.clone(),
            boot,
            labels: pool.spec.labels.clone(),
            target,
            github,
            release,
            callback,
        },
    );
    let job = JobRef {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.clone(),
    };
    web.boots
        .start(instance_id, job, doc.pending_time, sequence);
    match web.boots.wait(instance_id, doc.pending_time).await {
        Some(waited) => answer_from_here(&web, instance_id, waited).await,
        None => Err(ApiError::Unavailable("the bootstrap stopped; retry later")),
    }
}

/// The answer to a warm instance no job has taken. At its first boot: its preparation, with no
/// job and no JIT config, only the actions/runner release and a token for it and for the
/// `prepared` report; the pool must still keep warm instances of the launch template version
/// the instance was launched from. At a later boot (`prepared`): nothing, it was started
/// without a job, and its script ends it.
async fn prepare_warm(
    web: &Web,
    side: &RunnerSide,
    doc: &crate::runner::identity::Document,
    instance: &crate::cloud::Instance,
    prepared: bool,
    now: Timestamp,
) -> Result<Response, ApiError> {
    use crate::cloud::tags;
    let id = &instance.id;
    if prepared {
        return Err(denied(format!(
            "warm instance {id} was started, but no RunnerJob took it"
        )));
    }
    let Some((namespace, name)) = (instance.tags.get(tags::POOL)).and_then(|p| p.split_once('/'))
    else {
        return Err(denied(format!("warm instance {id} names no RunnerPool")));
    };
    let pool = pool_named(web, namespace, name).await?.ok_or_else(|| {
        denied(format!(
            "warm instance {id}'s RunnerPool {namespace}/{name} is gone"
        ))
    })?;
    let template = (pool.status.as_ref()).and_then(|s| s.launch_template.as_ref());
    let current = template.map(|t| (t.id.as_str(), t.version));
    let launched_from = instance.tags.get(tags::WARM).map(String::as_str);
    match crate::domain::warm::may_prepare(pool.spec.warm_size(), current, launched_from) {
        Ok(()) => {}
        Err(Refusal::NotYet(why)) => {
            return Err(ApiError::NotYet(
                format!("RunnerPool {namespace}/{name} {why}"),
                5,
            ));
        }
        Err(Refusal::Denied(why) | Refusal::Never(why) | Refusal::Claimed(why)) => {
            return Err(denied(format!("RunnerPool {namespace}/{name} {why}")));
        }
    }
    let (boot_timeout, arch) = boot_checks(web, &pool, doc, now)?;
    let release = (side.releases)
        .release(pool.spec.runner_version.as_deref(), arch)
        .await
        .map_err(|e| unavailable("reading the actions/runner release", e))?;
    side.releases.fetch(&release);
    let token = side.tokens.mint_warm(&crate::runner::token::WarmClaims {
        namespace: namespace.into(),
        pool: name.into(),
        instance: id.clone(),
        runner_version: release.version.clone(),
        expires: (now + boot_timeout + TOKEN_GRACE).as_second(),
    });
    info!(pool = %format!("{namespace}/{name}"), instance = %id, "preparing a warm instance");
    let answer = json!({
        "mode": "prepare",
        "callbackToken": String::from_utf8_lossy(token.expose()),
        "runner": {
            "version": release.version,
            "url": release_url(&web.ctx.settings.public_url, &release.asset),
            "sha256": release.sha256,
        },
    });
    Ok(axum::Json(answer).into_response())
}

/// What a boot must show of the pool: an instance started within the pool's boot timeout (which
/// is returned), and an architecture actions/runner is released for (its name there).
fn boot_checks(
    web: &Web,
    pool: &RunnerPool,
    doc: &crate::runner::identity::Document,
    now: Timestamp,
) -> Result<(Duration, &'static str), ApiError> {
    let boot_timeout = (web.ctx.settings.job_limits)
        .for_pool(&pool.spec)
        .boot_timeout;
    if !crate::domain::job::boots_in_time(doc.pending_time, now, boot_timeout) {
        return Err(denied(format!(
            "the instance started at {}, outside the pool's boot timeout of {} s",
            doc.pending_time,
            boot_timeout.as_secs()
        )));
    }
    let arch = crate::github::runner_arch(&doc.architecture).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "architecture {} has no actions/runner release",
            doc.architecture
        ))
    })?;
    Ok((boot_timeout, arch))
}

/// `POST /api/runner/prepared`: a warm instance finished its preparation (its token says which,
/// for which pool). It is stopped here, by whichever replica the report reaches: still listed
/// as the pool's warm instance, running, and named by no RunnerJob. The instance reports again
/// until it stops, so a stop that fails is tried again.
pub async fn prepared(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = warm_caller(&web, &headers)?;
    let id = &claims.instance;
    let instance = warm_instance(&web, &claims).await?;
    if !instance.is_alive() || instance.is_stopping() || instance.is_stopped() {
        return Ok(axum::Json(json!({ "stopping": true })).into_response());
    }
    if taken_by_a_job(&web, &claims).await? {
        return Err(ApiError::Conflict(format!(
            "warm instance {id} is taken by a RunnerJob; it is not stopped"
        )));
    }
    web.ctx
        .ec2()
        .stop_instances(std::slice::from_ref(id))
        .await
        .map_err(|e| unavailable("StopInstances", e))?;
    info!(pool = %format!("{}/{}", claims.namespace, claims.pool), instance = %id, "warm instance prepared; stopping it");
    // A preparation of the version the pool launches from now succeeded: the failures in a
    // row are over (those of an older version are history). A straggler of an older version
    // clears nothing.
    let pool = pool_named(&web, &claims.namespace, &claims.pool).await?;
    let status = pool.and_then(|p| p.status);
    let current = (status.as_ref())
        .and_then(|s| s.launch_template.as_ref())
        .map(|t| crate::cloud::tags::warm_value(&t.id, t.version));
    let failing = status.is_some_and(|s| s.warm_failures.is_some());
    if failing
        && current.is_some()
        && instance.tags.get(crate::cloud::tags::WARM) == current.as_ref()
    {
        let cleared =
            crate::controller::warm::clear_failures(&web.ctx, &claims.namespace, &claims.pool);
        if let Err(e) = cleared.await {
            warn!(instance = %id, error = %e, "could not clear the pool's failed warm preparations");
        }
    }
    Ok(axum::Json(json!({ "stopping": true })).into_response())
}

/// A warm instance's preparation failed: it is counted on the pool (`status.warmFailures`),
/// terminated (the pool launches another, later after each failure in a row) and the pool gets
/// an Event with the last line of its log.
async fn warm_failed(
    web: &Web,
    headers: &HeaderMap,
    body: Body,
    claims: &crate::runner::token::WarmClaims,
) -> Result<Response, ApiError> {
    let body = read_body(headers, body, ERROR_BODY_LIMIT).await?;
    let log = String::from_utf8_lossy(&body);
    let last_line = (log.lines().rev())
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let instance = warm_instance(web, claims).await?;
    // A job's instance is the job's: a warm token left on it reports nothing for the pool.
    if taken_by_a_job(web, claims).await? {
        return Err(ApiError::Conflict(format!(
            "warm instance {} is taken by a RunnerJob; its preparation is over",
            instance.id
        )));
    }
    let said = tail(last_line, 512);
    let pool = pool_named(web, &claims.namespace, &claims.pool).await?;
    // Counted on the pool first, whose next warm launch waits longer for it (a pool pass that
    // sees the instance go finds the failure there), when it is of the version the pool
    // launches from now.
    let template = (instance.tags.get(crate::cloud::tags::WARM)).map_or("", String::as_str);
    let current = (pool.as_ref())
        .and_then(|p| p.status.as_ref()?.launch_template.as_ref())
        .map(|t| crate::cloud::tags::warm_value(&t.id, t.version));
    if current.as_deref() == Some(template) {
        let failure = crate::domain::warm::Failure {
            template,
            instance: &instance.id,
            launched: instance.launch_time,
            message: said,
        };
        let pool_name = (claims.namespace.as_str(), claims.pool.as_str());
        (crate::controller::warm::record_failure(&web.ctx, pool_name, failure).await)
            .map_err(|e| unavailable("counting the failed preparation", e))?;
    }
    let id = std::slice::from_ref(&instance.id);
    (web.ctx.ec2().terminate_instances(id).await)
        .map_err(|e| unavailable("TerminateInstances", e))?;
    if let Some(pool) = pool {
        let note = format!(
            "warm instance {} failed its preparation and is terminated: {said}",
            instance.id,
        );
        (web.ctx)
            .event(&pool, EventType::Warning, "WarmPreparationFailed", note)
            .await;
    }
    Ok(axum::Json(json!({ "ok": true })).into_response())
}

/// Whether a live RunnerJob names the warm instance of `claims` as its instance.
async fn taken_by_a_job(
    web: &Web,
    claims: &crate::runner::token::WarmClaims,
) -> Result<bool, ApiError> {
    let id = &claims.instance;
    let named = select(
        &jobs(web, &claims.namespace),
        "status.instance.id",
        id,
        |s| s.instance.as_ref().is_some_and(|i| &i.id == id),
    )
    .await?;
    Ok(named
        .iter()
        .any(|j| j.status.as_ref().is_some_and(|s| !s.phase.is_finished())))
}

/// The claims of the warm preparation token the request carries.
fn warm_caller(
    web: &Web,
    headers: &HeaderMap,
) -> Result<crate::runner::token::WarmClaims, ApiError> {
    let bearer = bearer(headers)?;
    side(web)?
        .tokens
        .verify_warm(bearer, Timestamp::now().as_second())
        .map_err(|e| denied(e.to_string()))
}

/// The warm instance a preparation token names, as EC2 lists it: this controller's, warm, and
/// of the token's pool.
async fn warm_instance(
    web: &Web,
    claims: &crate::runner::token::WarmClaims,
) -> Result<crate::cloud::Instance, ApiError> {
    use crate::cloud::tags;
    let id = &claims.instance;
    let pool = format!("{}/{}", claims.namespace, claims.pool);
    let controller_id = &web.ctx.settings.controller_id;
    let (instance, _) = (web.ctx.ec2().managed_instance(controller_id, id).await)
        .map_err(|e| unavailable("DescribeInstances", e))?
        .ok_or_else(|| denied(format!("instance {id} is not one Pacer launched")))?;
    if instance.tags.get(tags::POOL) != Some(&pool) || !instance.tags.contains_key(tags::WARM) {
        return Err(denied(format!(
            "instance {id} is not a warm instance of {pool}"
        )));
    }
    Ok(instance)
}

/// Whether the identity document is from a start of the warm instance after `job` took it:
/// EC2 writes the document again at every start, so the one the instance had while it
/// prepared, however kept, is refused. Checked before anything of the job is answered.
fn started_for(job: &RunnerJob, doc: &crate::runner::identity::Document) -> Result<(), ApiError> {
    let status = job.status.as_ref();
    let took = status.and_then(|s| s.launch.as_ref()?.warm.as_ref());
    let Some(took) = took else {
        return Ok(());
    };
    let (pending, taken) = (doc.pending_time.as_second(), took.taken_at.0.as_second());
    crate::domain::warm::started_after(pending, taken).map_err(|early| {
        denied(format!(
            "warm instance {}'s identity document is from a start {early} s before RunnerJob {} \
             took it",
            doc.instance_id,
            job.name_any()
        ))
    })
}

/// The RunnerJob that took warm instance `instance`: a live job of the pool the instance's tag
/// names whose status records it as the warm instance it took. `None` when none did.
async fn warm_taker(
    web: &Web,
    instance: &crate::cloud::Instance,
) -> Result<Option<RunnerJob>, ApiError> {
    let id = &instance.id;
    let pool = (instance.tags.get(crate::cloud::tags::POOL)).and_then(|pool| pool.split_once('/'));
    let Some((namespace, pool)) = pool else {
        return Ok(None);
    };
    let named = select(&jobs(web, namespace), "status.instance.id", id, |s| {
        s.instance.as_ref().is_some_and(|i| &i.id == id)
    })
    .await?;
    let took = |job: &RunnerJob| {
        job.spec.pool_name == pool
            && (job.status.as_ref()).is_some_and(|s| crate::domain::warm::holds(s, id))
    };
    let mut took: Vec<RunnerJob> = named.into_iter().filter(took).collect();
    match took.len() {
        0 | 1 => Ok(took.pop()),
        _ => Err(denied(format!(
            "warm instance {id} is named by several RunnerJobs"
        ))),
    }
}

/// The RunnerJob a batch's instance is for: the one whose status names it (a member records
/// its instance as soon as EC2 answers, before the instance can have booted), of the pool the
/// instance's tags name, with a place in the batch its tag names ([`claims_batch_instance`]). While a
/// member of its batch still waits for EC2's answer, or the instance is young enough that a
/// member whose record failed may yet record it, the instance asks again; after that, an
/// instance no job names is nobody's.
async fn batch_member(web: &Web, instance: &crate::cloud::Instance) -> Result<RunnerJob, ApiError> {
    let id = &instance.id;
    let pool = (instance.tags.get(crate::cloud::tags::POOL)).and_then(|pool| pool.split_once('/'));
    let token = instance.tags.get(BATCH);
    let selectable = |v: &str| v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let (Some((namespace, pool)), Some(token)) = (pool, token.filter(|t| selectable(t))) else {
        return Err(denied(format!("instance {id} carries no RunnerJob tags")));
    };
    let api = jobs(web, namespace);
    let named = select(&api, "status.instance.id", id, |s| {
        s.instance.as_ref().is_some_and(|i| &i.id == id)
    })
    .await?;
    let uid = |job: &RunnerJob| job.uid().unwrap_or_default();
    let theirs = |job: &RunnerJob| {
        let status = job.status.as_ref();
        job.spec.pool_name == pool
            && status.is_some_and(|s| claims_batch_instance(&uid(job), s, id, Some(token)))
    };
    let named: Vec<RunnerJob> = named.into_iter().filter(theirs).collect();
    match <[RunnerJob; 1]>::try_from(named) {
        Ok([job]) => return Ok(job),
        Err(named) if !named.is_empty() => {
            return Err(denied(format!(
                "instance {id} is named by several RunnerJobs"
            )));
        }
        Err(_) => {}
    }
    let recorded = select(&api, "status.launch.clientToken", token, |s| {
        s.launch.as_ref().is_some_and(|l| &l.client_token == token)
    })
    .await?;
    let members: Vec<&RunnerJobStatus> = (recorded.iter())
        .filter(|job| job.spec.pool_name == pool)
        .filter_map(|job| {
            let status = job.status.as_ref()?;
            let (recorded, _) = batch_claim(&uid(job), status)?;
            (recorded == token).then_some(status)
        })
        .collect();
    match unnamed_batch_instance(id, &members, instance.launch_time, Timestamp::now()) {
        Refusal::NotYet(why) => Err(ApiError::NotYet(why, 5)),
        Refusal::Denied(why) | Refusal::Never(why) | Refusal::Claimed(why) => Err(denied(why)),
    }
}

/// The RunnerJobs whose `field` (a selectable field of the CRD) is `value`; with a CRD older
/// than its selectable fields, every RunnerJob of the namespace, read and kept when `keep`.
async fn select(
    api: &Api<RunnerJob>,
    field: &str,
    value: &str,
    keep: impl Fn(&crate::api::RunnerJobStatus) -> bool,
) -> Result<Vec<RunnerJob>, ApiError> {
    let selected = ListParams::default().fields(&format!("{field}={value}"));
    match api.list(&selected).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(e)) if e.code == 400 => Ok(api
            .list(&ListParams::default())
            .await
            .map_err(|e| unavailable("listing the RunnerJobs", e))?
            .items
            .into_iter()
            .filter(|j| j.status.as_ref().is_some_and(&keep))
            .collect()),
        Err(e) => Err(unavailable("listing the RunnerJobs", e)),
    }
}

/// The answer to a bootstrap started on this replica, as far as it went.
async fn answer_from_here(
    web: &Arc<Web>,
    instance: &str,
    waited: Waited,
) -> Result<Response, ApiError> {
    match waited {
        // Made here and not in the status: handed out by another replica, or being put back
        // after a request cut off by its timeout; the hold decides which.
        Waited::Answered(job) => collect(web, instance, &job).await?.ok_or(ApiError::NotYet(
            "the bootstrap's answer is not there now; ask again shortly".into(),
            2,
        )),
        Waited::Failed(e) => Err(e),
        Waited::Running => Err(ApiError::NotYet(
            "the bootstrap is in progress; ask again shortly".into(),
            2,
        )),
        Waited::Collected => Err(handed_out()),
    }
}

fn handed_out() -> ApiError {
    ApiError::Conflict(
        "the RunnerJob has already bootstrapped this instance; its answer was handed out".into(),
    )
}

/// The RunnerJob a bootstrap is for.
#[derive(Clone)]
struct JobRef {
    namespace: String,
    name: String,
    uid: String,
}

/// What a bootstrap's answer is sealed for: its RunnerJob and its instance.
fn sealed_for(job_uid: &str, instance: &str) -> String {
    format!("{job_uid}/{instance}")
}

/// Takes the answer waiting for `instance` in the status of RunnerJob `job`, if any, opened.
/// Taken apart from the request: should the request be cut off (its timeout) once the answer
/// left the status, the answer is put back for the instance's next try.
async fn collect(
    web: &Arc<Web>,
    instance: &str,
    job: &JobRef,
) -> Result<Option<Response>, ApiError> {
    let (sender, taken) = tokio::sync::oneshot::channel();
    let (shared, owned_instance, owned_job) = (web.clone(), instance.to_string(), job.clone());
    tokio::spawn(async move {
        let outcome = take(&shared, &owned_job, &owned_instance).await;
        if let Err(Ok(Some(taken))) = sender.send(outcome) {
            put_back(&shared, &owned_job, &owned_instance, taken).await;
        }
    });
    let taken = taken
        .await
        .map_err(|_| ApiError::Unavailable("the bootstrap stopped; retry later"))??;
    Ok(taken.map(|taken| {
        web.boots.collected(instance);
        axum::Json(taken.answer).into_response()
    }))
}

/// An answer taken from a RunnerJob's status: opened, and as it was there.
struct Taken {
    answer: serde_json::Value,
    sealed: String,
    /// The claim it was made for (its callback token's fingerprint).
    token_sha256: String,
}

/// Removes the sealed answer for `instance` from `job`'s status, by a write conditional on the
/// version read, so of two replicas asked at once one has it; `None` when there is none (not
/// made yet, or taken). An answer that does not open under this replica's key stays.
async fn take(web: &Web, job: &JobRef, instance: &str) -> Result<Option<Taken>, ApiError> {
    let api = jobs(web, &job.namespace);
    let tokens = &side(web)?.tokens;
    for _ in 0..5 {
        let current = (api.get_opt(&job.name).await)
            .map_err(|e| unavailable("reading the RunnerJob", e))?
            .filter(|j| j.uid().as_deref() == Some(job.uid.as_str()));
        let boot = (current.as_ref())
            .and_then(|j| j.status.as_ref()?.boot.as_ref())
            .filter(|b| b.instance_id == instance);
        let (Some(current), Some(boot)) = (&current, boot) else {
            return Ok(None);
        };
        let Some(sealed) = boot.answer.clone() else {
            return Ok(None);
        };
        let answer = (tokens.open(&sealed_for(&job.uid, instance), &sealed))
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(ApiError::Unavailable(
                "the bootstrap's answer does not open under this replica's callback key",
            ))?;
        let version = current.resource_version();
        let taken = json!({ "boot": { "answer": null } });
        match patch_status(web, current, version.as_deref(), taken).await {
            Ok(_) => {
                let token_sha256 = boot.token_sha256.clone();
                return Ok(Some(Taken {
                    answer,
                    sealed,
                    token_sha256,
                }));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(unavailable("collecting the bootstrap answer", e)),
        }
    }
    Err(ApiError::Unavailable(
        "the RunnerJob kept changing; retry later",
    ))
}

/// Puts back an answer taken for a request that was cut off before it could answer, while the
/// job still waits for that very claim's runner.
async fn put_back(web: &Web, job: &JobRef, instance: &str, taken: Taken) {
    let api = jobs(web, &job.namespace);
    let Ok(Some(current)) = api.get_opt(&job.name).await else {
        return;
    };
    let waiting = may_put_back(current.status.as_ref(), instance, &taken.token_sha256);
    if current.uid().as_deref() != Some(job.uid.as_str()) || !waiting {
        return;
    }
    let version = current.resource_version();
    let back = json!({ "boot": { "answer": taken.sealed } });
    if let Err(e) = patch_status(web, &current, version.as_deref(), back).await {
        warn!(error = %e, runner_job = %job.name, "could not put back a bootstrap answer whose request was cut off");
    }
}

/// What a bootstrap hands out, once its claim holds.
struct Handout {
    job: RunnerJob,
    /// The RunnerJob uid the instance's tags name.
    job_uid: String,
    boot: BootStatus,
    labels: Vec<String>,
    target: crate::github::RunnerTarget,
    github: Arc<dyn crate::github::GitHub>,
    release: crate::runner::release::Release,
    callback: crate::config::Secret,
}

/// Claims the job for the instance, mints its runner's JIT config, and records the runner with
/// the answer, sealed, in the job's status: run apart from the request that started it, so a
/// client that gives up (a timeout, a dropped connection) cannot cut it in half; the answer
/// waits for the instance's next try, whichever replica that reaches.
async fn hand_out(web: Arc<Web>, h: Handout) -> Outcome {
    let job = &h.job;
    // Stamped as it is claimed: the claim's age counts from here on every replica.
    let boot = &BootStatus {
        bootstrapped_at: Time(Timestamp::now()),
        ..h.boot.clone()
    };
    let (name, instance_id) = (job.name_any(), boot.instance_id.as_str());
    let claimed = claim(&web, job, boot, &h.job_uid).await?;
    // Claimed: from here on a failure gives the claim back, so the instance may try again.
    let attempt = job.status.as_ref().map_or(1, |s| s.attempt());
    let controller_id = &web.ctx.settings.controller_id;
    let runner_name = crate::github::runner_name(controller_id, job.spec.job_id, attempt);
    // Given up well before the claim may be made afresh (`CLAIM_ORPHANED`), so a slow mint
    // never races the one that replaces it.
    let left = CLAIM_GIVE_UP.saturating_sub(since_claim(boot));
    let minted = h.github.jit_config(&h.target, &runner_name, &h.labels);
    let jit = match tokio::time::timeout(left, minted).await {
        Ok(Ok(jit)) => jit,
        Ok(Err(e)) => {
            give_back(&web, job, boot).await;
            return Err(unavailable("minting the JIT runner config", e));
        }
        Err(_) => {
            give_back(&web, job, boot).await;
            let why = "minting the runner took too long; the next try starts again";
            return Err(ApiError::NotYet(why.into(), 2));
        }
    };
    let runner = RunnerStatus {
        id: jit.runner_id,
        name: runner_name,
    };
    let answer = json!({
        "jitConfig": String::from_utf8_lossy(jit.encoded.expose()),
        "callbackToken": String::from_utf8_lossy(h.callback.expose()),
        "runner": {
            "version": h.release.version,
            "url": release_url(&web.ctx.settings.public_url, &h.release.asset),
            "sha256": h.release.sha256,
        },
    });
    let answer = serde_json::to_vec(&answer).expect("an answer serializes");
    // A failure below gives the claim back, so the instance may try again (its runner is
    // offline and unclaimed: the next JIT call for the name replaces it). So does a sequence
    // that took so long that its answer could hardly be collected within the hold.
    let context = sealed_for(&h.job_uid, instance_id);
    let Some(sealed) = (web.runners.as_ref()).and_then(|s| s.tokens.seal(&context, &answer)) else {
        give_back(&web, job, boot).await;
        warn!(runner_job = %name, "the bootstrap answer could not be sealed (no random nonce)");
        return Err(ApiError::Unavailable(
            "the bootstrap answer could not be sealed; retry",
        ));
    };
    // Past the give-up time the claim may soon be made afresh (`CLAIM_ORPHANED`): the next
    // try starts again rather than race it. An answer recorded sooner has most of the hold
    // left to be collected.
    if since_claim(boot) >= CLAIM_GIVE_UP {
        give_back(&web, job, boot).await;
        let why = "minting the runner took too long; the next try starts again";
        return Err(ApiError::NotYet(why.into(), 2));
    }
    let recorded = json!({ "boot": { "runner": runner, "answer": sealed } });
    let written = match record(&web, job, boot, claimed, recorded).await {
        Ok(written) => written,
        Err(e) => {
            give_back(&web, job, boot).await;
            return Err(e);
        }
    };
    // An API server whose RunnerJob schema predates the field drops it without a word.
    if (written.status.as_ref())
        .and_then(|s| s.boot.as_ref()?.answer.as_ref())
        .is_none()
    {
        give_back(&web, job, boot).await;
        warn!(runner_job = %name, "the RunnerJob CRD in the cluster drops status.boot.answer: apply `pacer crds`");
        return Err(ApiError::Unavailable(
            "the RunnerJob CRD in the cluster is older than Pacer; apply `pacer crds`",
        ));
    }
    let version = &h.release.version;
    info!(runner_job = %name, instance = instance_id, runner = %runner.name,
        runner_version = %version, "instance bootstrapped");
    let note = format!(
        "instance {instance_id} proved its identity and received runner {} (actions/runner {version})",
        runner.name
    );
    web.ctx
        .event(job, EventType::Normal, "Bootstrapped", note)
        .await;
    Ok(())
}

/// How long ago `boot` was claimed, by this replica's clock.
fn since_claim(boot: &BootStatus) -> Duration {
    Timestamp::now()
        .duration_since(boot.bootstrapped_at.0)
        .unsigned_abs()
}

/// Records the runner and the sealed answer (`recorded`) on the claim `ours`, written at
/// `version`: conditional on the job being as written, or, after a concurrent change, on the
/// claim still being ours and unanswered. The job as written.
async fn record(
    web: &Web,
    job: &RunnerJob,
    ours: &BootStatus,
    version: String,
    recorded: serde_json::Value,
) -> Result<RunnerJob, ApiError> {
    let mut version = version;
    for _ in 0..5 {
        match patch_status(web, job, Some(&version), recorded.clone()).await {
            Ok(written) => return Ok(written),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(unavailable("recording the runner", e)),
        }
        let current = (jobs(web, &job.namespace().unwrap_or_default()).get(&job.name_any()))
            .await
            .map_err(|e| unavailable("reading the RunnerJob", e))?;
        let boot = current.status.as_ref().and_then(|s| s.boot.as_deref());
        if current.uid() != job.uid() || !still_ours(boot, ours) {
            return Err(ApiError::NotYet(
                "the RunnerJob moved on while its runner was minted; ask again".into(),
                2,
            ));
        }
        version = current.resource_version().unwrap_or_default();
    }
    Err(ApiError::Unavailable(
        "the RunnerJob kept changing; retry later",
    ))
}

/// Gives the claim `ours` back, so the instance may try again: only while it is still ours and
/// its answer was not collected (no runner recorded, or the answer still there).
async fn give_back(web: &Web, job: &RunnerJob, ours: &BootStatus) {
    let api = jobs(web, &job.namespace().unwrap_or_default());
    for _ in 0..3 {
        let Ok(Some(current)) = api.get_opt(&job.name_any()).await else {
            return;
        };
        let boot = current.status.as_ref().and_then(|s| s.boot.as_deref());
        if current.uid() != job.uid() || !may_give_back(boot, ours) {
            return;
        }
        let version = current.resource_version();
        match patch_status(web, &current, version.as_deref(), json!({ "boot": null })).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => {
                warn!(error = %e, runner_job = %job.name_any(), "could not give back a bootstrap claim");
                return;
            }
        }
    }
}

/// A bootstrap's outcome: its answer left, sealed, in the RunnerJob's status, or why not.
type Outcome = Result<(), ApiError>;

/// Longest a bootstrap request waits for its answer before it is told to ask again: well
/// inside the listener's request timeout.
const BOOT_WAIT: Duration = Duration::from_secs(5);

/// The bootstraps started on this replica, by instance id: running, or answered (the answer
/// left in the RunnerJob's status) and remembered until the instance collects it, at most
/// [`BOOT_ANSWER_HOLD`], so a replay of the document here is refused at once.
#[derive(Default)]
pub struct Boots(Mutex<HashMap<String, Boot>>);

/// One bootstrap started here: when, for which RunnerJob, where its outcome appears, and
/// whether its answer was collected.
struct Boot {
    started: Instant,
    /// The `pendingTime` of the document it started with.
    pending: Timestamp,
    job: JobRef,
    outcome: watch::Receiver<Option<Outcome>>,
    collected: bool,
}

/// What a bootstrap started here came to, waited for up to [`BOOT_WAIT`].
enum Waited {
    /// Its answer waits for the instance in this RunnerJob's status.
    Answered(JobRef),
    Failed(ApiError),
    /// Still running: the instance asks again.
    Running,
    /// Its answer was handed out.
    Collected,
}

impl Boots {
    /// Runs `sequence` for `instance` (launched for RunnerJob `job`) in a task of its own,
    /// unless one runs or waits already.
    fn start(
        &self,
        instance: &str,
        job: JobRef,
        pending: Timestamp,
        sequence: impl Future<Output = Outcome> + Send + 'static,
    ) {
        let mut boots = self.0.lock().unwrap();
        boots.retain(|_, boot| boot.started.elapsed() < BOOT_ANSWER_HOLD);
        if boots.contains_key(instance) {
            return;
        }
        let (sender, outcome) = watch::channel(None);
        let boot = Boot {
            started: Instant::now(),
            pending,
            job,
            outcome,
            collected: false,
        };
        boots.insert(instance.into(), boot);
        tokio::spawn(async move {
            let _ = sender.send(Some(sequence.await));
        });
    }

    /// What the bootstrap of `instance` started here came to, for a document from a start at
    /// `pending`; `None` when none was started here. A document of an earlier start than the
    /// bootstrap's (a warm instance's, kept from its preparation) is refused. A failure frees
    /// the way for a new bootstrap.
    async fn wait(&self, instance: &str, pending: Timestamp) -> Option<Waited> {
        let (mut outcome, job) = {
            let mut boots = self.0.lock().unwrap();
            boots.retain(|_, boot| boot.started.elapsed() < BOOT_ANSWER_HOLD);
            let boot = boots.get(instance)?;
            let (pending, started) = (pending.as_second(), boot.pending.as_second());
            if let Err(early) = crate::domain::warm::started_after(pending, started) {
                return Some(Waited::Failed(denied(format!(
                    "instance {instance}'s identity document is from a start {early} s before \
                     the one its bootstrap began with"
                ))));
            }
            if boot.collected {
                return Some(Waited::Collected);
            }
            (boot.outcome.clone(), boot.job.clone())
        };
        let failed = match tokio::time::timeout(BOOT_WAIT, outcome.wait_for(Option::is_some)).await
        {
            Ok(Ok(done)) => match done.clone() {
                Some(Ok(())) => return Some(Waited::Answered(job)),
                Some(Err(e)) => e,
                None => ApiError::Unavailable("no answer"),
            },
            Ok(Err(_)) => ApiError::Unavailable("the bootstrap stopped; retry later"),
            Err(_) => return Some(Waited::Running),
        };
        self.0.lock().unwrap().remove(instance);
        Some(Waited::Failed(failed))
    }

    /// Remembers that the answer for `instance` was handed out.
    fn collected(&self, instance: &str) {
        if let Some(boot) = self.0.lock().unwrap().get_mut(instance) {
            boot.collected = true;
        }
    }
}

async fn pool_of(web: &Web, job: &RunnerJob) -> Result<RunnerPool, ApiError> {
    let namespace = job.namespace().unwrap_or_default();
    pool_named(web, &namespace, &job.spec.pool_name)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "RunnerPool {namespace}/{} is gone",
                job.spec.pool_name
            ))
        })
}

async fn pool_named(
    web: &Web,
    namespace: &str,
    name: &str,
) -> Result<Option<RunnerPool>, ApiError> {
    let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
    if let Some(pool) = web.pools.get(&key) {
        return Ok(Some((*pool).clone()));
    }
    Api::<RunnerPool>::namespaced(web.ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| unavailable("reading the RunnerPool", e))
}

/// Records the bootstrap on the job, once: a job already bootstrapped, or past booting, is a
/// 409. The write is conditional on the version read, so of two racing calls one wins; the
/// job read again after losing must still be the one the instance's tags name.
async fn claim(
    web: &Web,
    job: &RunnerJob,
    boot: &BootStatus,
    job_uid: &str,
) -> Result<String, ApiError> {
    let name = job.name_any();
    let mut job = job.clone();
    let claimant = Claimant {
        instance: &boot.instance_id,
        job_uid,
    };
    for _ in 0..5 {
        let status = job.status.clone().unwrap_or_default();
        may_bootstrap(job.uid().as_deref(), &status, &claimant, Timestamp::now())
            .map_err(|refusal| refused(&name, refusal))?;
        let version = job.resource_version();
        match patch_status(web, &job, version.as_deref(), json!({ "boot": boot })).await {
            Ok(written) => return Ok(written.resource_version().unwrap_or_default()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                job = jobs(web, &job.namespace().unwrap_or_default())
                    .get(&name)
                    .await
                    .map_err(|e| unavailable("reading the RunnerJob", e))?;
            }
            Err(e) => return Err(unavailable("recording the bootstrap", e)),
        }
    }
    Err(ApiError::Unavailable(
        "the RunnerJob kept changing; retry later",
    ))
}

/// What the instance is told when RunnerJob `name` refuses its bootstrap.
fn refused(name: &str, refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::Denied(why) => denied(format!("RunnerJob {name} {why}")),
        Refusal::Never(why) => ApiError::Conflict(format!("RunnerJob {name} {why}")),
        Refusal::NotYet(why) => ApiError::NotYet(format!("RunnerJob {name} {why}"), 5),
        Refusal::Claimed(why) => ApiError::NotYet(format!("RunnerJob {name} {why}"), 2),
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| denied("a callback token is required (Authorization: Bearer)"))
}

/// The RunnerJob a callback's bearer token was minted for, checked against what the job
/// kept: its uid, the instance that bootstrapped, and the token's fingerprint; a finished job
/// is a 409.
async fn caller(web: &Web, headers: &HeaderMap) -> Result<(RunnerJob, BootStatus), ApiError> {
    let side = side(web)?;
    let bearer = bearer(headers)?;
    let claims = side
        .tokens
        .verify(bearer, Timestamp::now().as_second())
        .map_err(|e| denied(e.to_string()))?;
    let job = jobs(web, &claims.namespace)
        .get_opt(&claims.name)
        .await
        .map_err(|e| unavailable("reading the RunnerJob", e))?
        .filter(|job| job.uid().as_deref() == Some(claims.uid.as_str()))
        .ok_or_else(|| denied("the callback token's RunnerJob is gone"))?;
    let boot = job
        .status
        .as_ref()
        .and_then(|s| s.boot.as_deref().cloned())
        .filter(|b| b.instance_id == claims.instance)
        .filter(|b| token::matches(bearer.as_bytes(), &b.token_sha256))
        .ok_or_else(|| denied("the callback token is not this RunnerJob's"))?;
    // Its instance is gone: nothing it says can change the outcome any more.
    if let Some(phase) = job.status.as_ref().map(|s| s.phase)
        && phase.is_finished()
    {
        return Err(ApiError::Conflict(format!(
            "RunnerJob {} is {phase:?} and takes no more callbacks",
            job.name_any()
        )));
    }
    Ok((job, boot))
}

/// `POST /api/runner/register`: the runner is about to start.
pub async fn register(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (job, boot) = caller(&web, &headers).await?;
    let runner = boot
        .runner
        .ok_or_else(|| ApiError::Conflict("the bootstrap has not finished".into()))?;
    if job.status.as_ref().and_then(|s| s.runner.as_ref()) != Some(&runner) {
        patch_status(&web, &job, None, json!({ "runner": runner }))
            .await
            .map_err(|e| unavailable("recording the registration", e))?;
        info!(runner_job = %job.name_any(), runner = %runner.name, "runner registered");
    }
    Ok(axum::Json(json!({ "ok": true })).into_response())
}

/// Where an instance downloads release asset `asset` from Pacer.
fn release_url(public_url: &str, asset: &str) -> String {
    format!(
        "{}/api/runner/release/{asset}",
        public_url.trim_end_matches('/')
    )
}

/// `GET /api/runner/release/{asset}`: the actions/runner release the caller's bootstrap named,
/// checked against its published digest, from Pacer's own copy. A copy still being fetched is
/// a 503 with `Retry-After` (the fetch goes on without the request); so is a transfer past the
/// [`MAX_SERVING`](crate::runner::release::MAX_SERVING) under way.
pub async fn release(
    State(web): State<Arc<Web>>,
    axum::extract::Path(asset): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use crate::runner::release::Fetch;
    use futures::StreamExt as _;
    let version = match warm_caller(&web, &headers) {
        Ok(warm) => warm.runner_version,
        Err(_) => caller(&web, &headers)
            .await?
            .1
            .runner_version
            .unwrap_or_default(),
    };
    let arch = ["x64", "arm64"]
        .into_iter()
        .find(|arch| crate::github::runner_asset_name(&version, arch) == asset)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "{asset} is not a release asset of actions/runner {version}, which this instance was given"
            ))
        })?;
    let releases = side(&web)?.releases.clone();
    let release = (releases.release(Some(&version), arch).await).map_err(release_refused)?;
    let deadline = Instant::now() + BOOT_WAIT;
    let path = loop {
        match releases.fetch(&release) {
            Fetch::Ready(path) => break path,
            Fetch::Failed(e) => return Err(release_refused(e)),
            Fetch::Pending if Instant::now() >= deadline => {
                let why = "Pacer is fetching this actions/runner release; ask again shortly";
                return Err(ApiError::NotYet(why.into(), 5));
            }
            Fetch::Pending => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let Ok(serving) = releases.serving.clone().try_acquire_owned() else {
        let why = "Pacer is serving as many runner releases as it takes at once; ask again shortly";
        return Err(ApiError::NotYet(why.into(), 5));
    };
    let opened = async {
        let file = tokio::fs::File::open(&path).await?;
        let length = file.metadata().await?.len();
        std::io::Result::Ok((file, length))
    };
    let (file, length) = opened
        .await
        .map_err(|e| unavailable("opening the actions/runner release", e))?;
    // The permit goes with the body, until its last byte is sent or the client goes.
    let body = tokio_util::io::ReaderStream::new(file).map(move |chunk| {
        let _serving = &serving;
        chunk
    });
    let headers = [
        (
            axum::http::header::CONTENT_TYPE,
            "application/gzip".to_string(),
        ),
        (axum::http::header::CONTENT_LENGTH, length.to_string()),
    ];
    Ok((headers, Body::from_stream(body)).into_response())
}

/// How an instance is told its release cannot be served: for now (503), not at the source
/// (404), or not the bytes the source published (409).
fn release_refused(e: crate::runner::release::ReleaseError) -> ApiError {
    use crate::runner::release::ReleaseError;
    match e {
        ReleaseError::Unavailable(_) => unavailable("fetching the actions/runner release", e),
        ReleaseError::Missing(why) => ApiError::NotFound(why),
        ReleaseError::Refused(why) => ApiError::Conflict(why),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompleteRequest {
    exit_code: i32,
}

/// `POST /api/runner/complete`: the runner exited; the job reconciler terminates the instance.
/// A completion GitHub reported first stands.
pub async fn complete(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (job, _) = caller(&web, &headers).await?;
    let body = read_body(&headers, body, CALLBACK_BODY_LIMIT).await?;
    let request: CompleteRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!("the body must be JSON {{\"exitCode\": N}}: {e}"))
    })?;
    if job.status.as_ref().is_some_and(|s| s.completion.is_some()) {
        return Ok(axum::Json(json!({ "ok": true })).into_response());
    }
    let result = if request.exit_code == 0 {
        JobResult::Success
    } else {
        JobResult::Failure
    };
    let completion = crate::api::Completion {
        result,
        reported_at: Some(Time(Timestamp::now())),
    };
    patch_status(&web, &job, None, json!({ "completion": completion }))
        .await
        .map_err(|e| unavailable("recording the completion", e))?;
    info!(runner_job = %job.name_any(), exit_code = request.exit_code, "runner exited");
    if request.exit_code != 0 {
        web.ctx
            .event(
                &job,
                EventType::Warning,
                "RunnerFailed",
                format!("the runner exited with status {}", request.exit_code),
            )
            .await;
    }
    Ok(axum::Json(json!({ "ok": true })).into_response())
}

#[derive(Deserialize)]
struct InterruptedRequest {
    /// `spot-interruption` or `rebalance`.
    kind: String,
    /// What IMDS said.
    #[serde(default)]
    notice: String,
}

/// `POST /api/runner/interrupted`: EC2 gave the instance notice, a spot interruption (it is
/// reclaimed in two minutes) or a rebalance recommendation. Recorded on the job once per
/// kind, with an Event and a metric per pool and zone; when the instance then goes before
/// its runner took the job, the job is tried again (`SpotInterrupted`) on another offering.
pub async fn interrupted(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (job, boot) = caller(&web, &headers).await?;
    let body = read_body(&headers, body, CALLBACK_BODY_LIMIT).await?;
    let request: InterruptedRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be JSON {{\"kind\", \"notice\"}}: {e}"
        ))
    })?;
    let (reason, what) = crate::domain::job::notice_kind(&request.kind).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "kind must be spot-interruption or rebalance, not {:?}",
            request.kind
        ))
    })?;
    let status = job.status.clone().unwrap_or_default();
    let ok = || Ok(axum::Json(json!({ "ok": true })).into_response());
    let recorded = status.interruption.as_ref().map(|i| i.kind.as_str());
    if !crate::domain::job::records_notice(recorded, &request.kind) {
        return ok();
    }
    let interruption = crate::api::Interruption {
        kind: request.kind.clone(),
        reported_at: Time(Timestamp::now()),
        notice: tail(&request.notice, 512).to_string(),
    };
    patch_status(&web, &job, None, json!({ "interruption": interruption }))
        .await
        .map_err(|e| unavailable("recording the interruption notice", e))?;
    let zone = (status.instance.as_ref()).map_or(String::new(), |i| i.zone.clone());
    let notice = crate::controller::metrics::Notice {
        namespace: job.namespace().unwrap_or_default(),
        pool: job.spec.pool_name.clone(),
        zone: zone.clone(),
        kind: request.kind.clone(),
    };
    web.ctx.metrics.interruptions.get_or_create(&notice).inc();
    let taken = status.assigned_job.is_some();
    warn!(runner_job = %job.name_any(), instance = %boot.instance_id, zone, kind = %request.kind,
        taken, "the instance reported an interruption notice");
    let then = if taken {
        "its runner has the job, which fails on GitHub if the instance goes"
    } else {
        "should it go before its runner takes the job, the job is tried again elsewhere"
    };
    let note = format!("instance {} in {zone} got {what}; {then}", boot.instance_id);
    web.ctx.event(&job, EventType::Warning, reason, note).await;
    ok()
}

/// The last `max` bytes of `log`, cut at a character boundary.
fn tail(log: &str, max: usize) -> &str {
    let mut start = log.len().saturating_sub(max);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

/// `POST /api/runner/error`: the boot failed; the body is the end of the boot log.
pub async fn error(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Ok(warm) = warm_caller(&web, &headers) {
        return warm_failed(&web, &headers, body, &warm).await;
    }
    let (job, boot) = caller(&web, &headers).await?;
    let body = read_body(&headers, body, ERROR_BODY_LIMIT).await?;
    let log = String::from_utf8_lossy(&body);
    let kept = tail(&log, STATUS_LOG_BYTES);
    let last_line = log
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let mut status = json!({
        "boot": { "logTail": kept },
        "lastError": {
            "reason": "BootFailed",
            "message": format!(
                "the instance's boot failed: {}; the end of its log is in status.boot.logTail",
                tail(last_line, 512)
            ),
            "time": Time(Timestamp::now()),
        },
    });
    if job.status.as_ref().is_none_or(|s| s.completion.is_none()) {
        status["completion"] = json!(crate::api::Completion {
            result: JobResult::Failure,
            reported_at: Some(Time(Timestamp::now())),
        });
    }
    // A runner the boot registered is removed with the job.
    if let Some(runner) = &boot.runner {
        status["runner"] = json!(runner);
    }
    patch_status(&web, &job, None, status)
        .await
        .map_err(|e| unavailable("recording the boot failure", e))?;
    warn!(runner_job = %job.name_any(), instance = %boot.instance_id, last_line, "boot failed");
    web.ctx
        .event(
            &job,
            EventType::Warning,
            "BootFailed",
            format!(
                "instance {} failed to boot; its log ends:\n{}",
                boot.instance_id,
                tail(&log, EVENT_LOG_BYTES)
            ),
        )
        .await;
    Ok(axum::Json(json!({ "ok": true })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_cut_at_character_boundaries() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
        // 'é' is two bytes: a cut inside it moves past it.
        assert_eq!(tail("aéb", 2), "b");
    }
}
