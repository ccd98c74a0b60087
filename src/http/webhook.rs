//! `POST /api/webhook`: GitHub's `workflow_job` deliveries become RunnerJobs (queued), runner
//! assignments (in_progress) and completions (completed). Every effect is a write to the API
//! server; no AWS call happens here, and a GitHub call only for a `queued` delivery that looks
//! replayed (see [`looks_replayed`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};
use tracing::{info, warn};

use super::{ApiError, WEBHOOK_BODY_LIMIT, Web, read_body};
use crate::api::{JobResult, RunnerJob};
use crate::controller::demand::{self, Queued, Recorded};
use crate::controller::metrics::Delivery;
use crate::domain::job::{RunnerEvent, event_binds, to_withdraw, withdrawable};
use crate::github::webhook::{WorkflowJobEvent, verify};
use crate::github::{job_id_of_runner, job_object_name};
use kube::runtime::reflector::ObjectRef;

/// What a delivery came to, for the response and the `webhook_deliveries` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    Created,
    Found,
    NoPool,
    Assigned,
    Completed,
    Cancelled,
    Ignored,
    /// Names a runner of ours, but its ids or repository say it is not ours.
    Unbound,
    /// A `queued` delivery for a job that finished or that GitHub no longer reports queued:
    /// a replay or a stale redelivery; nothing is recorded or launched.
    NotQueued,
}

impl Effect {
    fn label(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Found => "exists",
            Self::NoPool => "no_pool",
            Self::Assigned => "assigned",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Ignored => "ignored",
            Self::Unbound => "unbound",
            Self::NotQueued => "not_queued",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::Created | Self::Found => StatusCode::ACCEPTED,
            _ => StatusCode::OK,
        }
    }
}

const KNOWN_ACTIONS: [&str; 4] = ["queued", "waiting", "in_progress", "completed"];

pub(super) async fn receive(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let event = header("x-github-event").unwrap_or_default().to_string();
    let delivery = header("x-github-delivery").unwrap_or_default().to_string();
    let count = |action: &str, result: &str| {
        let action = if event == "workflow_job" && !KNOWN_ACTIONS.contains(&action) {
            "other"
        } else {
            action
        };
        let event = match event.as_str() {
            "workflow_job" | "ping" => event.as_str(),
            _ => "other",
        };
        web.ctx
            .metrics
            .webhook_deliveries
            .get_or_create(&Delivery {
                event: event.into(),
                action: action.into(),
                result: result.into(),
            })
            .inc();
    };
    // Nothing is parsed before the signature is checked, over the raw bytes; and a delivery
    // without one is refused before its body is read.
    let unauthorized = || {
        count("-", "unauthorized");
        warn!("webhook delivery refused: missing or wrong X-Hub-Signature-256");
        ApiError::Unauthorized("missing or wrong X-Hub-Signature-256").into_response()
    };
    let Some(signature) = headers.get("x-hub-signature-256").map(|v| v.as_bytes()) else {
        return unauthorized();
    };
    let body = match read_body(&headers, body, WEBHOOK_BODY_LIMIT).await {
        Ok(body) => body,
        Err(e) => {
            count(
                "-",
                if matches!(e, ApiError::TooLarge(_)) {
                    "too_large"
                } else {
                    "bad_request"
                },
            );
            return e.into_response();
        }
    };
    let secrets: Vec<&[u8]> = web.webhook_secrets.iter().map(|s| s.expose()).collect();
    if !verify(&secrets, Some(signature), &body) {
        return unauthorized();
    }
    match event.as_str() {
        "ping" => {
            count("-", "pong");
            return (StatusCode::OK, "pong").into_response();
        }
        "workflow_job" => {}
        _ => {
            count("-", "ignored");
            return StatusCode::NO_CONTENT.into_response();
        }
    }
    let payload: WorkflowJobEvent = match serde_json::from_slice(&body) {
        Ok(payload) => payload,
        Err(e) => {
            count("-", "bad_request");
            return ApiError::BadRequest(format!("not a workflow_job payload: {e}"))
                .into_response();
        }
    };
    let action = payload.action.clone();
    if !delivery.is_empty() && web.deliveries.lock().unwrap().contains(&delivery) {
        count(&action, "duplicate");
        return (StatusCode::OK, "already handled").into_response();
    }
    match handle(&web, &payload).await {
        Ok(effect) => {
            if !delivery.is_empty() {
                web.deliveries.lock().unwrap().insert(delivery);
            }
            count(&action, effect.label());
            (effect.status(), effect.label()).into_response()
        }
        Err(e) => {
            count(&action, "error");
            e.into_response()
        }
    }
}

/// Carries out one `workflow_job` delivery.
async fn handle(web: &Web, event: &WorkflowJobEvent) -> Result<Effect, ApiError> {
    let job = &event.workflow_job;
    match (event.action.as_str(), job.status.as_str()) {
        ("queued", "queued") => record(web, event).await,
        // Held for an environment's approval: a `queued` delivery follows when it is released.
        ("queued" | "waiting", _) => Ok(Effect::Ignored),
        ("in_progress", _) => assign(web, event).await,
        ("completed", _) => complete(web, event).await,
        (other, _) => {
            info!(
                action = other,
                job_id = job.id,
                "ignoring an unknown workflow_job action"
            );
            Ok(Effect::Ignored)
        }
    }
}

fn jobs_api(web: &Web, namespace: Option<&str>) -> Api<RunnerJob> {
    let client = web.ctx.client.clone();
    match namespace.or(web.namespace.as_deref()) {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

fn unavailable(e: kube::Error) -> ApiError {
    warn!(
        error = %e,
        "the API server failed a webhook's write; answered 503, and GitHub does not redeliver \
         by itself: the sweep redelivers failed deliveries within 5 minutes, or redeliver it \
         from the App's Advanced settings"
    );
    ApiError::Unavailable("the Kubernetes API server is unavailable; retry later")
}

/// A `queued` delivery is sent as its job is created; one for a job created longer ago than
/// this is a redelivery or a replay, and GitHub is asked whether the job is still queued before
/// anything is recorded.
pub const REPLAY_AGE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Whether a `queued` delivery for a job created at `created_at` looks replayed at `now`: old,
/// or without a creation time to tell.
fn looks_replayed(created_at: Option<&str>, now: Timestamp) -> bool {
    match created_at.and_then(|t| t.parse::<Timestamp>().ok()) {
        Some(created) => now.duration_since(created).unsigned_abs() > REPLAY_AGE,
        None => true,
    }
}

/// What GitHub says of a job whose `queued` delivery looks replayed: `Some(status)` when it
/// is no longer queued. Not found, an error or no GitHub App: `None`, and the job is recorded
/// as before (an outage must not hold launches; the job controller asks again later).
async fn no_longer_queued(web: &Web, event: &WorkflowJobEvent) -> Option<String> {
    let github = web.ctx.github.as_ref()?;
    let installation = event.installation.as_ref().map(|i| i.id);
    let job_id = event.workflow_job.id;
    match github
        .workflow_job(&event.repository.full_name, installation, job_id)
        .await
    {
        Ok(Some(job)) => {
            let queued = matches!(
                job.status.as_str(),
                "queued" | "waiting" | "pending" | "requested"
            );
            (!queued).then_some(job.status)
        }
        Ok(None) => None,
        Err(e) => {
            warn!(job_id, error = %e, "could not ask GitHub whether a replayed-looking job is queued");
            None
        }
    }
}

/// `queued`: one RunnerJob in the namespace of the pool that serves the job, named after the
/// job id, so duplicates and redeliveries find the first. A job known to have finished gets
/// nothing; one whose delivery looks replayed and has no RunnerJob is first checked with GitHub.
async fn record(web: &Web, event: &WorkflowJobEvent) -> Result<Effect, ApiError> {
    if !web.ready.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable(
            "RunnerPool cache not synced yet; retry later",
        ));
    }
    let job = &event.workflow_job;
    let id = job.id.to_string();
    if web.finished_jobs.lock().unwrap().contains(&id) {
        info!(
            job_id = job.id,
            "a queued delivery for a finished job; nothing recorded"
        );
        return Ok(Effect::NotQueued);
    }
    if looks_replayed(job.created_at.as_deref(), Timestamp::now())
        && find(web, job.id).await?.is_none()
        && let Some(status) = no_longer_queued(web, event).await
    {
        if status == "completed" {
            web.finished_jobs.lock().unwrap().insert(id);
        }
        info!(
            job_id = job.id,
            status, "a queued delivery for a job GitHub reports not queued; nothing recorded"
        );
        return Ok(Effect::NotQueued);
    }
    let pools = web.pools.state();
    let candidates: Vec<&crate::api::RunnerPool> = pools
        .iter()
        .map(|p| &**p)
        .filter(|p| {
            web.namespace
                .as_deref()
                .is_none_or(|ns| p.namespace().as_deref() == Some(ns))
        })
        .collect();
    let queued = Queued {
        job_id: job.id,
        run_id: job.run_id,
        repository: &event.repository.full_name,
        labels: &job.labels,
        installation_id: event.installation.as_ref().map(|i| i.id),
    };
    let tenancy = &web.ctx.settings.tenancy;
    match demand::record(&web.ctx.client, &candidates, tenancy, &queued).await {
        Ok(Recorded::Created) => Ok(Effect::Created),
        Ok(Recorded::Exists) => Ok(Effect::Found),
        Ok(Recorded::NoPool) => Ok(Effect::NoPool),
        Err(kube::Error::Api(e)) if e.code == 422 => Err(ApiError::BadRequest(format!(
            "the workflow job cannot be recorded: {}",
            e.message
        ))),
        Err(e) => Err(unavailable(e)),
    }
}

/// The RunnerJob recorded for a GitHub job id, in whichever namespace its pool is.
async fn find(web: &Web, job_id: i64) -> Result<Option<RunnerJob>, ApiError> {
    let params =
        ListParams::default().fields(&format!("metadata.name={}", job_object_name(job_id)));
    let found = jobs_api(web, None)
        .list(&params)
        .await
        .map_err(unavailable)?;
    Ok(found.items.into_iter().next())
}

/// The RunnerJob whose runner the delivery names, when Pacer named it and the delivery's
/// repository, installation and runner id bind it to that job (see `event_binds`); otherwise
/// what the delivery comes to: ignored (not a runner of ours), or unbound (named like ours but
/// not about it: logged and counted).
async fn by_runner(
    web: &Web,
    event: &WorkflowJobEvent,
) -> Result<Result<RunnerJob, Effect>, ApiError> {
    let controller_id = &web.ctx.settings.controller_id;
    let job = &event.workflow_job;
    let name = job.runner_name.as_deref().unwrap_or_default();
    let Some((job_id, attempt)) = job_id_of_runner(controller_id, name) else {
        return Ok(Err(Effect::Ignored));
    };
    let Some(ours) = find(web, job_id).await? else {
        return Ok(Err(Effect::Ignored));
    };
    let key = ObjectRef::<crate::api::RunnerPool>::new(&ours.spec.pool_name)
        .within(&ours.namespace().unwrap_or_default());
    let pool = web.pools.get(&key);
    // `full_name` is the repository's canonical `owner/name`.
    let (owner, repository) = event
        .repository
        .full_name
        .split_once('/')
        .unwrap_or_default();
    let bound = RunnerEvent {
        owner,
        repository,
        installation: event.installation.as_ref().map(|i| i.id),
        runner_id: job.runner_id,
        attempt,
    };
    match event_binds(&ours, pool.as_deref(), &bound) {
        Ok(()) => Ok(Ok(ours)),
        Err(why) => {
            warn!(job_id = job.id, runner = name, repository = %event.repository.full_name,
                runner_job = %ours.name_any(), why, "a delivery names a runner of ours but does not bind to it; ignored");
            Ok(Err(Effect::Unbound))
        }
    }
}

async fn patch_status(
    web: &Web,
    job: &RunnerJob,
    status: serde_json::Value,
) -> Result<(), ApiError> {
    match super::patch_job_status(web, job, None, status).await {
        Ok(_) => Ok(()),
        // Deleted meanwhile: nothing is left to record on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(unavailable(e)),
    }
}

/// `in_progress`: which job the runner actually took.
async fn assign(web: &Web, event: &WorkflowJobEvent) -> Result<Effect, ApiError> {
    let job = &event.workflow_job;
    let ours = match by_runner(web, event).await? {
        Ok(ours) => ours,
        Err(effect) => return Ok(effect),
    };
    let assigned = serde_json::json!({
        "jobId": job.id, "runId": job.run_id, "repository": event.repository.full_name,
    });
    patch_status(web, &ours, serde_json::json!({ "assignedJob": assigned })).await?;
    info!(job_id = job.id, runner = job.runner_name.as_deref().unwrap_or_default(),
        runner_job = %ours.name_any(), "a runner of ours took a job");
    Ok(Effect::Assigned)
}

/// How GitHub's conclusion reads as a result: only success succeeds.
fn result_of(conclusion: Option<&str>) -> JobResult {
    match conclusion {
        Some("success") => JobResult::Success,
        Some("cancelled") => JobResult::Cancelled,
        _ => JobResult::Failure,
    }
}

/// `completed`: the completion of the job our runner ran, or, for a job cancelled before any
/// runner took it, one less runner wanted.
async fn complete(web: &Web, event: &WorkflowJobEvent) -> Result<Effect, ApiError> {
    let job = &event.workflow_job;
    web.finished_jobs.lock().unwrap().insert(job.id.to_string());
    let now = Time(Timestamp::now());
    let runner = job.runner_name.as_deref().filter(|r| !r.is_empty());
    if runner.is_some() {
        let ours = match by_runner(web, event).await? {
            Ok(ours) => ours,
            Err(effect) => return Ok(effect),
        };
        if ours.status.as_ref().is_some_and(|s| s.completion.is_some()) {
            return Ok(Effect::Completed);
        }
        let completion = crate::api::Completion {
            result: result_of(job.conclusion.as_deref()),
            reported_at: Some(now),
        };
        patch_status(web, &ours, serde_json::json!({ "completion": completion })).await?;
        return Ok(Effect::Completed);
    }
    // No runner took it: the demand it created is gone. Its own RunnerJob gives up its runner
    // if that runner has not taken a job; else the newest of its pool that has not.
    let Some(recorded) = find(web, job.id).await? else {
        return Ok(Effect::Ignored);
    };
    // The pool's other jobs are listed only when the recorded one cannot give up its runner.
    let others = if withdrawable(&recorded) {
        Vec::new()
    } else {
        let api = jobs_api(web, recorded.namespace().as_deref());
        api.list(&ListParams::default())
            .await
            .map_err(unavailable)?
            .items
    };
    let Some(victim) = to_withdraw(&recorded, &others) else {
        return Ok(Effect::Ignored);
    };
    let completion = crate::api::Completion {
        result: JobResult::Cancelled,
        reported_at: Some(now),
    };
    // Only if the victim is as read: a bootstrap since then handed its instance a runner.
    let patch = serde_json::json!({ "completion": completion });
    match super::patch_job_status(web, victim, victim.resource_version().as_deref(), patch).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(Effect::Ignored),
        Err(e) => return Err(unavailable(e)),
    }
    info!(job_id = job.id, runner_job = %victim.name_any(),
        "a queued job was cancelled; its runner is no longer wanted");
    Ok(Effect::Cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_delivery_looks_replayed_when_its_job_is_old_or_undated() {
        let now: Timestamp = "2026-12-05T12:00:00Z".parse().unwrap();
        for (created_at, replayed) in [
            (Some("2026-12-05T11:59:58Z"), false),
            (Some("2026-12-05T06:58:00-05:00"), false),
            (Some("2026-12-05T11:54:00Z"), true),
            (Some("2021-08-19T12:16:32.000-04:00"), true),
            (Some("yesterday"), true),
            (None, true),
        ] {
            assert_eq!(looks_replayed(created_at, now), replayed, "{created_at:?}");
        }
    }

    #[test]
    fn only_success_succeeds() {
        assert_eq!(result_of(Some("success")), JobResult::Success);
        assert_eq!(result_of(Some("cancelled")), JobResult::Cancelled);
        for other in [Some("failure"), Some("timed_out"), Some("skipped"), None] {
            assert_eq!(result_of(other), JobResult::Failure, "{other:?}");
        }
    }
}
