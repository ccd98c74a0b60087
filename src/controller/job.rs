//! The RunnerJob reconciler: carries out what the phase machine decides — launch one tagged
//! instance, follow it through one shared DescribeInstances snapshot, terminate it when the job
//! is over or the object is deleted — and records each step in the status.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use tracing::{Instrument, info, info_span, warn};

use super::metrics::{Offering, Pool, PoolPhase};
use super::{Context, Error, FIELD_MANAGER, Result, error_policy};
use crate::api::{
    AssignedJob, CostSnapshot, InstanceStatus, JobPhase, JobResult, LastError, RunnerJob,
    RunnerJobStatus, RunnerPool,
};
use crate::cloud::{Ec2 as _, ErrorClass, Instance, LaunchRequest};
use crate::domain::job::{
    Decision, Facts, GitHubJob, InstanceState, Listed, Outcome, PoolAdmission, Step, Witness,
    decide, instance_state as domain_instance_state, pool_readiness, record_reason, to_wake,
};
use crate::domain::launch::{self, CapacityCache, JobIdentity, Market};
use crate::domain::pool::PoolIdentity;

pub use crate::api::JOB_FINALIZER as FINALIZER;

/// Instances by the uid of the RunnerJob they were launched for.
pub type InstancesByJob = Arc<HashMap<String, Instance>>;

/// One DescribeInstances listing, shared by every pass, and when it was requested.
#[derive(Clone)]
pub struct Snapshot {
    pub instances: InstancesByJob,
    pub taken: Timestamp,
}

/// What every job's pass shares.
#[derive(Default)]
pub struct Shared {
    /// Offerings EC2 recently had no capacity for.
    capacity: Mutex<CapacityCache>,
    /// Subnet -> availability zone.
    zones: tokio::sync::Mutex<HashMap<String, String>>,
    /// The last DescribeInstances answer, by RunnerJob uid, and when it was taken.
    snapshot: Mutex<Option<(Instant, Snapshot)>>,
    /// Held by the one pass refreshing the snapshot.
    refreshing: tokio::sync::Mutex<()>,
    /// Runner slots this process reserved, by `namespace/pool`: the jobs admitted to launch,
    /// their names by uid. With the cache's busy jobs they make admission exact (see `admit`).
    slots: Mutex<HashMap<String, HashMap<String, String>>>,
    /// Launches and terminations this process made that EC2's listings may not show yet.
    pub(super) ledger: super::ledger::Ledger,
    /// Prices by kind, instance type (and zone), with when they expire.
    /// One slot per price, each with its own lock: a burst of launches of one type makes one
    /// Pricing call, and a slow look-up of one price holds up no other.
    prices: Mutex<HashMap<String, Arc<PriceSlot>>>,
    /// Price look-ups that failed, warned about once each.
    warned_on_demand: AtomicBool,
    warned_spot: AtomicBool,
    /// Every RunnerJob, as the controller's watch sees them.
    pub(super) store: OnceLock<Store<RunnerJob>>,
    /// Every RunnerPool, as the pool controller's watch sees them.
    pub(super) pools: OnceLock<Store<RunnerPool>>,
}

impl Shared {
    pub(super) fn store(&self) -> Option<&Store<RunnerJob>> {
        self.store.get()
    }
}

/// Runs the RunnerJob controller on the shared RunnerJob watch until shutdown.
///
/// `finished` is a second subscription to the same watch: a job that finishes wakes the jobs
/// of its pool waiting for room.
pub(super) async fn run(
    ctx: Arc<Context>,
    store: Store<RunnerJob>,
    changes: impl futures::Stream<Item = Arc<RunnerJob>> + Send + 'static,
    finished: impl futures::Stream<Item = Arc<RunnerJob>> + Send + 'static,
) {
    let config =
        kube::runtime::controller::Config::default().concurrency(ctx.settings.job_concurrency);
    let wake = ctx.clone();
    Controller::for_shared_stream(changes, store)
        .watches_shared_stream(finished, move |job| waiting_for_room(&wake, &job))
        .with_config(config)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| std::future::ready(()))
        .await;
}

async fn reconcile(job: Arc<RunnerJob>, ctx: Arc<Context>) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", job.name_any());
    let span = info_span!("reconcile", job = %key, pool = %job.spec.pool_name, job_id = job.spec.job_id, run_id = job.spec.run_id, repository = %job.spec.repository);
    async move {
        let api: Api<RunnerJob> = Api::namespaced(ctx.client.clone(), &ns);
        let ours = job.finalizers().iter().any(|f| f == FINALIZER);
        let action = match (job.metadata.deletion_timestamp.is_some(), ours) {
            // Going away with nothing of ours to hold it.
            (true, false) => Action::await_change(),
            // The finalizer is on before any launch; the pass goes on with the patched object
            // rather than waiting for the watch to bring it back.
            (false, false) => {
                let job = set_finalizer(&api, &job, true).await?;
                pass(&job, &ctx, false).await?
            }
            (false, true) => pass(&job, &ctx, false).await?,
            // A deleting pass returns only once the instance is gone.
            (true, true) => {
                let action = pass(&job, &ctx, true).await?;
                set_finalizer(&api, &job, false).await?;
                action
            }
        };
        ctx.succeeded(&key);
        Ok(action)
    }
    .instrument(span)
    .await
}

/// Adds or removes our finalizer. The patch names the resourceVersion it was computed from,
/// so a concurrent change to the list fails it (and the pass is retried) instead of being lost.
async fn set_finalizer(api: &Api<RunnerJob>, job: &RunnerJob, on: bool) -> Result<RunnerJob> {
    let mut finalizers: Vec<&str> = job
        .finalizers()
        .iter()
        .map(String::as_str)
        .filter(|f| *f != FINALIZER)
        .collect();
    if on {
        finalizers.push(FINALIZER);
    }
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": job.resource_version()}
    });
    Ok(api
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}

/// The shared instance snapshot, refreshed when older than `instance_refresh`: one
/// DescribeInstances serves every job's pass in that window.
///
/// While one pass refreshes it, the others go on with the previous snapshot: any snapshot this
/// process took shows every instance launched before the process started, and the process's
/// ledger remembers its own launches, with when they were answered, until their jobs go.
pub async fn instances(ctx: &Context, max_age: Duration) -> Result<Snapshot> {
    let current = || {
        ctx.jobs
            .snapshot
            .lock()
            .unwrap()
            .as_ref()
            .map(|(taken, snapshot)| (taken.elapsed() < max_age, snapshot.clone()))
    };
    let _refreshing = match current() {
        Some((true, instances)) => return Ok(instances),
        Some((false, instances)) => match ctx.jobs.refreshing.try_lock() {
            Ok(guard) => guard,
            Err(_) => return Ok(instances),
        },
        None => ctx.jobs.refreshing.lock().await,
    };
    // Someone else may have refreshed it while this pass waited.
    if let Some((true, instances)) = current() {
        return Ok(instances);
    }
    // Sized like the last one, and filled page by page: thousands of instances are kept here,
    // and only their state, not their tags.
    let mut by_uid: HashMap<String, Instance> = HashMap::with_capacity(
        ctx.jobs
            .snapshot
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |(_, s)| s.instances.len()),
    );
    // Anything launched before this moment shows in the listing, once EC2 has caught up.
    let taken = Timestamp::now();
    let ec2 = ctx.ec2();
    let mut pages = ec2.managed_instance_pages(&ctx.settings.controller_id);
    while let Some(page) = pages.try_next().await? {
        for mut instance in page {
            let Some(uid) = instance.tags.remove(launch::RUNNER_JOB_UID) else {
                continue;
            };
            instance.tags = Default::default();
            // A live instance wins over a terminated one of an earlier attempt.
            if by_uid.get(&uid).is_none_or(|seen| !seen.is_alive()) {
                by_uid.insert(uid, instance);
            }
        }
    }
    let snapshot = Snapshot {
        instances: Arc::new(by_uid),
        taken,
    };
    *ctx.jobs.snapshot.lock().unwrap() = Some((Instant::now(), snapshot.clone()));
    Ok(snapshot)
}

fn since(t: Option<&Time>, now: Timestamp) -> Duration {
    t.map(|t| now.duration_since(t.0).unsigned_abs())
        .unwrap_or_default()
}

/// When the job entered its current phase; a new job has been Pending since its creation.
fn entered(status: &RunnerJobStatus, job: &RunnerJob) -> Option<Time> {
    entered_time(status)
        .cloned()
        .or_else(|| match status.phase {
            JobPhase::Pending => job.metadata.creation_timestamp.clone(),
            _ => None,
        })
}

/// What EC2 says about the job's instance: the shared listing, and the id this process
/// launched or the status recorded, judged gone only from a listing taken a visibility window
/// after the launch's answer.
fn instance_state(
    snapshot: &Snapshot,
    uid: &str,
    status: &RunnerJobStatus,
    launched: Option<&(String, Timestamp)>,
    visibility: Duration,
) -> InstanceState {
    // Instances of earlier attempts are history, not this attempt's instance.
    let earlier = |id: &str| status.previous_attempts.iter().any(|a| a.instance == id);
    let listed = snapshot
        .instances
        .get(uid)
        .filter(|i| !earlier(&i.id))
        .map(|i| Listed {
            id: &i.id,
            alive: i.is_alive(),
            reason: i.state_reason.as_deref().unwrap_or(&i.state),
        });
    let known = launched
        .map(|(id, _)| id.as_str())
        .or_else(|| status.instance.as_ref().map(|i| i.id.as_str()))
        .filter(|id| !earlier(id));
    // The launch's answer came no later than this; the Launching time is set when it does.
    let answered = launched
        .map(|(_, at)| *at)
        .or_else(|| status.phase_times.launching.as_ref().map(|t| t.0))
        .or_else(|| {
            status
                .instance
                .as_ref()
                .and_then(|i| i.launch_time.as_ref())
                .map(|t| t.0)
        });
    domain_instance_state(listed, known, answered, snapshot.taken, visibility)
}

/// Whether `job` may launch from `pool` now. When the pool is ready, a runner slot is
/// reserved for the job under one lock, so concurrent passes never admit more than
/// `maxRunners`: the slots taken are the jobs the cache shows holding a runner plus those this
/// process admitted that the cache does not show yet. The job keeps its slot until
/// [`release_slot`].
fn admit(ctx: &Context, job: &RunnerJob, pool: Option<&RunnerPool>) -> PoolAdmission {
    if let Err(not_now) = pool_readiness(pool) {
        return not_now;
    }
    let (Some(pool), Some(store)) = (pool, ctx.jobs.store()) else {
        return PoolAdmission::Admitted;
    };
    let max = pool.spec.max_runners as usize;
    let uid = job.uid().unwrap_or_default();
    let mut slots = ctx.jobs.slots.lock().unwrap();
    let reserved = slots.entry(pool_key(job)).or_default();
    // Fewer RunnerJobs than slots: every one of them may hold a runner, no need to count.
    if reserved.contains_key(&uid) || store.len() <= max {
        reserved.insert(uid, job.name_any());
        return PoolAdmission::Admitted;
    }
    // Reservations of jobs the cache shows finished, or no longer has, are stale.
    let ns = job.namespace().unwrap_or_default();
    reserved.retain(|held, name| {
        store
            .get(&ObjectRef::new(name).within(&ns))
            .is_some_and(|j| {
                j.metadata.uid.as_deref() == Some(held.as_str())
                    && !j.status.as_ref().is_some_and(|s| s.phase.is_finished())
            })
    });
    // Taken: the reservations, and the jobs the cache shows holding a runner that this process
    // did not reserve (launched before it started). One scan, no allocation per job.
    let unreserved_busy = store
        .state()
        .iter()
        .filter(|other| in_pool(other, job) && holds_runner(other))
        .filter(|other| !reserved.contains_key(other.metadata.uid.as_deref().unwrap_or_default()))
        .count();
    if unreserved_busy + reserved.len() >= max {
        return PoolAdmission::Full;
    }
    reserved.insert(uid, job.name_any());
    PoolAdmission::Admitted
}

/// Another RunnerJob of `job`'s pool.
fn in_pool(other: &RunnerJob, job: &RunnerJob) -> bool {
    other.spec.pool_name == job.spec.pool_name
        && other.metadata.namespace == job.metadata.namespace
        && other.metadata.uid != job.metadata.uid
}

/// Whether a job holds (or is getting) a runner, as its status says.
fn holds_runner(job: &RunnerJob) -> bool {
    crate::domain::job::holds_runner(job.status.as_ref().map(|s| s.phase).unwrap_or_default())
}

/// Gives back the job's runner slot: it finished, or went back to waiting without an instance.
fn release_slot(ctx: &Context, job: &RunnerJob) {
    let uid = job.uid().unwrap_or_default();
    if let Some(reserved) = ctx.jobs.slots.lock().unwrap().get_mut(&pool_key(job)) {
        reserved.remove(&uid);
    }
}

/// The `namespace` and `pool` labels of a job's metrics.
fn pool_label(job: &RunnerJob) -> Pool {
    Pool {
        namespace: job.namespace().unwrap_or_default(),
        pool: job.spec.pool_name.clone(),
    }
}

fn pool_key(job: &RunnerJob) -> String {
    format!(
        "{}/{}",
        job.namespace().unwrap_or_default(),
        job.spec.pool_name
    )
}

/// `job`'s pool as the pool controller's cache holds it.
fn cached_pool(ctx: &Context, job: &RunnerJob) -> Option<Arc<RunnerPool>> {
    let key = ObjectRef::<RunnerPool>::new(&job.spec.pool_name)
        .within(&job.namespace().unwrap_or_default());
    ctx.jobs.pools.get()?.get(&key)
}

/// The other RunnerJobs of `job`'s pool: how many hold (or are getting) a runner, and those
/// still Pending.
fn pool_usage(store: &Store<RunnerJob>, job: &RunnerJob) -> (usize, Vec<Arc<RunnerJob>>) {
    let (mut busy, mut pending) = (0, Vec::new());
    for other in store.state().into_iter().filter(|o| in_pool(o, job)) {
        if holds_runner(&other) {
            busy += 1;
        } else if other.status.as_ref().map(|s| s.phase).unwrap_or_default() == JobPhase::Pending {
            pending.push(other);
        }
    }
    (busy, pending)
}

/// When a job finishes, the jobs of its pool to look again now: those `to_wake` picks from
/// its Pending ones.
///
/// Only for a job that finished within the last recheck interval: the watch brings every
/// finished job again on a relist, and those waiting have looked again since on their own.
fn waiting_for_room(ctx: &Context, job: &RunnerJob) -> Vec<ObjectRef<RunnerJob>> {
    let Some(status) = job.status.as_ref() else {
        return Vec::new();
    };
    let finished = matches!(status.phase, JobPhase::Succeeded | JobPhase::Failed);
    let recheck = ctx.settings.job_limits.capacity_recheck;
    if !finished || since(entered_time(status), Timestamp::now()) > recheck {
        return Vec::new();
    }
    let (Some(store), Some(pool)) = (ctx.jobs.store(), cached_pool(ctx, job)) else {
        return Vec::new();
    };
    let (busy, pending) = pool_usage(store, job);
    let pending = pending
        .iter()
        .map(|j| {
            let created = j.metadata.creation_timestamp.as_ref().map(|t| t.0);
            (created, ObjectRef::from_obj(&**j))
        })
        .collect();
    to_wake(pool.spec.max_runners as usize, busy, pending)
}

fn outcome(status: &RunnerJobStatus) -> Option<Outcome> {
    status.completion.as_ref().map(|c| match c.result {
        JobResult::Success => Outcome::Success,
        JobResult::Failure => Outcome::Failure,
        JobResult::Cancelled => Outcome::Cancelled,
    })
}

/// One pass: gather the facts, decide, carry out the step, write the status.
async fn pass(job: &RunnerJob, ctx: &Context, deleting: bool) -> Result<Action> {
    let now = Timestamp::now();
    let uid = job.uid().unwrap_or_default();
    let ns = job.namespace().unwrap_or_default();
    let mut status = job.status.clone().unwrap_or_default();
    let pools: Api<RunnerPool> = Api::namespaced(ctx.client.clone(), &ns);
    // The pool controller's cache when it has the pool, else the API server.
    let pool = match cached_pool(ctx, job) {
        Some(pool) => Some(pool),
        None => pools.get_opt(&job.spec.pool_name).await?.map(Arc::new),
    };
    let defaults = ctx.settings.job_limits;
    let limits = pool
        .as_ref()
        .map_or(defaults, |p| defaults.for_pool(&p.spec));
    let snapshot = instances(ctx, ctx.settings.instance_refresh).await?;
    let launched = ctx.jobs.ledger.launched(&uid);
    let in_phase = since(entered(&status, job).as_ref(), now);
    let instance = instance_state(
        &snapshot,
        &uid,
        &status,
        launched.as_ref(),
        limits.launch_visibility,
    );
    let launch_unsettled = ctx
        .jobs
        .ledger
        .unsettled_since(&uid)
        .is_some_and(|sent| now.duration_since(sent).unsigned_abs() < limits.launch_visibility);
    let mut facts = Facts {
        phase: status.phase,
        in_phase,
        instance: instance.clone(),
        registered: status.runner.is_some(),
        assigned: status.assigned_job.is_some(),
        outcome: outcome(&status),
        deleting,
        launch_unsettled,
        pool: if status.phase == JobPhase::Pending && !deleting {
            admit(ctx, job, pool.as_deref())
        } else {
            PoolAdmission::Admitted
        },
        backoff_left: status
            .next_attempt_at
            .as_ref()
            .map(|t| t.0.duration_since(now))
            .filter(|d| d.is_positive())
            .map(|d| d.unsigned_abs())
            .unwrap_or_default(),
        attempt: status.attempt(),
        boot_failed: status.boot.as_ref().is_some_and(|b| b.log_tail.is_some()),
        witness: None,
    };
    let mut decision = decide(&facts, &limits);
    if decision.step == Step::Consult {
        let witness = consult(ctx, job, pool.as_deref(), &status).await;
        if witness.job == GitHubJob::Ours && status.assigned_job.is_none() {
            // Its `in_progress` delivery was lost: GitHub's word records the assignment.
            status.assigned_job = Some(AssignedJob {
                job_id: job.spec.job_id,
                run_id: job.spec.run_id,
                repository: job.spec.repository.clone(),
            });
            facts.assigned = true;
        }
        facts.witness = Some(witness);
        decision = decide(&facts, &limits);
    }
    let Decision {
        phase,
        step,
        reason,
    } = decision;
    if let Some((reason, message)) = reason {
        record_reason(&mut status, reason, message, now);
    }
    let next = match step {
        Step::Wait(d) => Action::requeue(d),
        // Not after a decision made with GitHub's answer; should it come, ask again later.
        Step::Consult => Action::requeue(Duration::from_secs(10)),
        Step::Requeue { why } => {
            requeue(ctx, job, &mut status, why, now);
            Action::requeue(Duration::ZERO)
        }
        Step::Launch => match &pool {
            Some(pool) => {
                let next = launch_step(job, pool, ctx, &mut status, now).await?;
                match (status.phase, &status.instance) {
                    // The launch call returned the instance, so it exists: the machine takes
                    // its next step in this pass and the status is written once.
                    (JobPhase::Launching, Some(launched)) => {
                        let facts = Facts {
                            phase: JobPhase::Launching,
                            in_phase: Duration::ZERO,
                            instance: InstanceState::Alive {
                                id: launched.id.clone(),
                            },
                            ..facts
                        };
                        match decide(&facts, &limits) {
                            Decision {
                                phase,
                                step: Step::Wait(d),
                                ..
                            } => {
                                enter(&mut status, phase, now);
                                Action::requeue(d)
                            }
                            _ => next,
                        }
                    }
                    _ => next,
                }
            }
            None => {
                let message = format!(
                    "RunnerPool {} does not exist in namespace {ns}",
                    job.spec.pool_name
                );
                record_reason(&mut status, "PoolNotFound", message, now);
                Action::requeue(Duration::from_secs(30))
            }
        },
        Step::Terminate => {
            // Only an id EC2 listed under this job's tag, or our own launch returned: the status
            // is writable by others and must not steer a termination.
            let verified = |id: &String| {
                snapshot.instances.get(&uid).is_some_and(|i| &i.id == id)
                    || launched.as_ref().is_some_and(|(mine, _)| mine == id)
            };
            if let InstanceState::Alive { id } | InstanceState::Gone { id, .. } = &instance
                && verified(id)
                && ctx
                    .jobs
                    .ledger
                    .terminate(ctx, id, snapshot.taken, limits.launch_visibility)
                    .await?
            {
                info!(instance = %id, "terminated");
            }
            // The next snapshot shows whether it went; one DescribeInstances serves every job.
            Action::requeue(ctx.settings.instance_refresh)
        }
        Step::Release => {
            deregister(ctx, job, pool.as_deref(), &status).await;
            ctx.jobs.ledger.forget(&uid);
            release_slot(ctx, job);
            return Ok(Action::await_change());
        }
        Step::Delete => {
            // Only this object: one recreated under the same name is not this one's to delete.
            let params = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            Api::<RunnerJob>::namespaced(ctx.client.clone(), &ns)
                .delete(&job.name_any(), &params)
                .await?;
            ctx.jobs.ledger.forget(&uid);
            return Ok(Action::await_change());
        }
    };
    // A runner still registered on GitHub is removed as the job finishes. During a GitHub
    // outage the job finishes anyway and frees its slot: the sweep removes the runner later.
    if phase.is_finished() && !status.phase.is_finished() {
        deregister(ctx, job, pool.as_deref(), &status).await;
    }
    // The launch step sets the phase itself; otherwise take the decision's.
    if step != Step::Launch {
        let before = status.phase;
        let entered_before = entered_time(&status).cloned();
        enter(&mut status, phase, now);
        let spent = since(entered_before.as_ref(), now).as_secs_f64();
        let histogram = match (before, status.phase) {
            (JobPhase::Booting, JobPhase::Running) => Some(&ctx.metrics.boot_duration),
            (JobPhase::Running, JobPhase::Completing) => Some(&ctx.metrics.run_duration),
            (JobPhase::Completing, JobPhase::Succeeded | JobPhase::Failed) => {
                Some(&ctx.metrics.terminate_duration)
            }
            _ => None,
        };
        if let Some(histogram) = histogram {
            histogram.get_or_create(&pool_label(job)).observe(spent);
        }
    }
    if matches!(status.phase, JobPhase::Succeeded | JobPhase::Failed) {
        let ran = since(
            status
                .instance
                .as_ref()
                .and_then(|i| i.launch_time.as_ref()),
            now,
        )
        .as_secs();
        if let Some(cost) = status.cost.as_mut().filter(|c| c.estimated_cost.is_none())
            && let Some(hourly) = &cost.hourly_price
        {
            cost.estimated_cost = crate::domain::cost::estimate(hourly, ran);
            if let Some(usd) = cost
                .estimated_cost
                .as_deref()
                .and_then(|c| c.parse::<f64>().ok())
            {
                ctx.metrics
                    .job_cost
                    .get_or_create(&pool_label(job))
                    .inc_by(usd);
            }
        }
    }
    if let (InstanceState::Alive { id }, Some(record)) = (&instance, snapshot.instances.get(&uid))
        && status.instance.as_ref().is_none_or(|i| &i.id != id)
    {
        // Adopted: launched before a crash, or seen before the status recorded it.
        status.instance = Some(instance_status(record, None));
    }
    if status.phase.is_finished()
        || (status.phase == JobPhase::Pending && status.instance.is_none())
    {
        release_slot(ctx, job);
    }
    status.observed_generation = job.metadata.generation;
    write_status(job, ctx, &status).await?;
    let was = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if let Some(notice) = crate::domain::job::phase_notice(was, &status) {
        let type_ = if notice.warning {
            kube::runtime::events::EventType::Warning
        } else {
            kube::runtime::events::EventType::Normal
        };
        ctx.event(job, type_, notice.reason, notice.note).await;
    }
    if deleting {
        // Release returned above; anything else keeps the finalizer until the instance is gone.
        return Err(Error::Waiting(
            "terminating the instance before removing the finalizer".into(),
        ));
    }
    Ok(next)
}

/// Where the job's runner is registered on GitHub: the pool's organization, or the job's
/// repository for repository pools.
pub fn runner_target(job: &RunnerJob, pool: &RunnerPool) -> crate::github::RunnerTarget {
    let github = &pool.spec.github;
    crate::github::RunnerTarget {
        owner: github.owner.clone(),
        repo: match github.scope {
            crate::api::GitHubScope::Org => None,
            crate::api::GitHubScope::Repo => job
                .spec
                .repository
                .split_once('/')
                .map(|(_, name)| name.to_string()),
        },
        runner_group: github.runner_group.clone(),
        installation: job.spec.installation_id,
    }
}

/// Removes the job's runner from GitHub, if it registered one (404: already gone). Without
/// the pool, nothing says where the runner lives: GitHub removes an ephemeral runner itself
/// once its job is done, and the sweep removes offline ones of Pacer's that nothing claims.
async fn deregister(
    ctx: &Context,
    job: &RunnerJob,
    pool: Option<&RunnerPool>,
    status: &RunnerJobStatus,
) {
    let (Some(github), Some(runner), Some(pool)) = (&ctx.github, status.current_runner(), pool)
    else {
        return;
    };
    match github
        .delete_runner(&runner_target(job, pool), runner.id)
        .await
    {
        Ok(()) => {
            info!(runner = %runner.name, runner_id = runner.id, "removed the runner from GitHub")
        }
        Err(e) => {
            warn!(runner = %runner.name, error = %e, "could not remove the runner from GitHub; the sweep will");
            let note = format!(
                "runner {} stays registered on GitHub for now ({e}); the GitHub sweep removes it",
                runner.name
            );
            ctx.event(
                job,
                kube::runtime::events::EventType::Warning,
                "RunnerNotRemoved",
                note,
            )
            .await;
        }
    }
}

/// Asks GitHub about the job and its runner: whether the job is still queued, and whether the
/// runner is busy. Without a GitHub App (some tests), nothing can vouch for the job or the
/// runner: the job is taken as gone elsewhere and the runner as idle, as before GitHub was asked.
async fn consult(
    ctx: &Context,
    job: &RunnerJob,
    pool: Option<&RunnerPool>,
    status: &RunnerJobStatus,
) -> Witness {
    let Some(github) = &ctx.github else {
        return Witness {
            job: GitHubJob::Elsewhere("no GitHub App is configured to ask".into()),
            runner_busy: Some(false),
        };
    };
    let ours = status.current_runner().map(|r| r.id);
    let spec = &job.spec;
    let answer = github
        .workflow_job(&spec.repository, spec.installation_id, spec.job_id)
        .await;
    let github_job = match answer {
        Ok(Some(j)) => {
            crate::domain::job::github_job(&j.status, j.runner_id, j.runner_name.as_deref(), ours)
        }
        Ok(None) => GitHubJob::Elsewhere("GitHub has no such job".into()),
        Err(e) => {
            warn!(error = %e, "could not ask GitHub about the job");
            GitHubJob::Unknown
        }
    };
    let runner_busy = match (ours, pool) {
        (None, _) => Some(false),
        (Some(_), None) => None,
        (Some(id), Some(pool)) => match github.runner(&runner_target(job, pool), id).await {
            Ok(runner) => Some(runner.is_some_and(|r| r.busy)),
            Err(e) => {
                warn!(error = %e, "could not ask GitHub about the runner");
                None
            }
        },
    };
    Witness {
        job: github_job,
        runner_busy,
    }
}

/// Ends the current attempt (see `start_new_attempt`) and forgets what this process knew of
/// its launch. A spot instance that was interrupted marks its offering short of capacity, so
/// the next launch picks another (or on-demand, when the pool allows it).
fn requeue(
    ctx: &Context,
    job: &RunnerJob,
    status: &mut RunnerJobStatus,
    why: &str,
    now: Timestamp,
) {
    let ended = crate::domain::job::start_new_attempt(status, why, now);
    if let Some(i) = ended.filter(|i| i.market == "spot" && why == "SpotInterrupted") {
        mark(
            ctx,
            Market::Spot,
            &i.instance_type,
            &i.zone,
            "spot interruption during boot",
        );
    }
    ctx.jobs.ledger.forget(&job.uid().unwrap_or_default());
    release_slot(ctx, job);
    ctx.metrics.requeues.get_or_create(&pool_label(job)).inc();
    info!(
        why,
        attempt = status.attempt(),
        "the instance ended before its runner took the job; trying again"
    );
}

fn enter(status: &mut RunnerJobStatus, phase: JobPhase, now: Timestamp) {
    if status.phase == phase && entered_time(status).is_some() {
        return;
    }
    status.phase = phase;
    *status.phase_times.of_mut(phase) = Some(Time(now));
}

fn entered_time(status: &RunnerJobStatus) -> Option<&Time> {
    status.phase_times.of(status.phase)
}

fn instance_status(i: &Instance, launched_at: Option<Timestamp>) -> InstanceStatus {
    InstanceStatus {
        id: i.id.clone(),
        instance_type: i.instance_type.clone(),
        zone: i.zone.clone(),
        market: if i.spot { "spot" } else { "onDemand" }.into(),
        launch_time: i
            .launch_time
            .and_then(|s| Timestamp::from_second(s).ok())
            .or(launched_at)
            .map(Time),
    }
}

/// Writes what the pass changed in the status, as a merge patch; nothing when it changed
/// nothing, so a job that is only being watched costs the API server no writes. Fields the
/// pass did not change (the completion the HTTP side reports) are left to their writers.
async fn write_status(job: &RunnerJob, ctx: &Context, status: &RunnerJobStatus) -> Result<()> {
    // A status is strings, numbers and maps with string keys: it always serializes.
    let json = |s: &RunnerJobStatus| serde_json::to_value(s).expect("a status serializes");
    let before = json(job.status.as_ref().unwrap_or(&RunnerJobStatus::default()));
    let Some(changes) = super::merge_patch(&before, &json(status)) else {
        return Ok(());
    };
    let api: Api<RunnerJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    api.patch_status(
        &job.name_any(),
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(serde_json::json!({ "status": changes })),
    )
    .await?;
    Ok(())
}

/// Availability zones of the pool's subnets, looked up once per subnet. The lock is held
/// across the look-up so concurrent launches wait for one call instead of each making it.
async fn zones(ctx: &Context, subnets: &[String]) -> Result<BTreeMap<String, String>> {
    let mut known = ctx.jobs.zones.lock().await;
    let missing: Vec<String> = subnets
        .iter()
        .filter(|s| !known.contains_key(*s))
        .cloned()
        .collect();
    if !missing.is_empty() {
        for subnet in ctx.ec2().describe_subnets(&missing).await? {
            known.insert(subnet.id, subnet.zone);
        }
    }
    Ok(subnets
        .iter()
        .filter_map(|s| known.get(s).map(|z| (s.clone(), z.clone())))
        .collect())
}

/// Tries the offerings left, recording capacity failures, until one instance is launched or
/// none is left; then backs off, or gives up after `MAX_ATTEMPTS`.
async fn launch_step(
    job: &RunnerJob,
    pool: &RunnerPool,
    ctx: &Context,
    status: &mut RunnerJobStatus,
    now: Timestamp,
) -> Result<Action> {
    let Some(template) = pool.status.as_ref().and_then(|s| s.launch_template.clone()) else {
        status.last_error = Some(LastError {
            reason: "PoolNotReady".into(),
            message: format!(
                "RunnerPool {} has no launch template yet; see its conditions",
                pool.name_any()
            ),
            time: Some(Time(now)),
        });
        enter(status, JobPhase::Pending, now);
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    let uid = job.uid().unwrap_or_default();
    let ns = job.namespace().unwrap_or_default();
    let pool_identity = PoolIdentity {
        controller_id: &ctx.settings.controller_id,
        namespace: &ns,
        name: &pool.name_any(),
    };
    let tags = launch::instance_tags(
        &pool_identity.instance_tags(&pool.spec),
        &JobIdentity {
            namespace: &ns,
            name: &job.name_any(),
            uid: &uid,
            job_id: job.spec.job_id,
            repository: &job.spec.repository,
        },
    );
    let zones = zones(ctx, &pool.spec.subnets).await?;
    let attempt = status.attempts + 1;
    let fleet = pool.spec.spawn_method == crate::api::SpawnMethod::Fleet;
    for _ in 0..3 {
        let mut offerings = launch::offerings(
            &pool.spec,
            &zones,
            &ctx.jobs.capacity.lock().unwrap(),
            Instant::now(),
        );
        if !fleet {
            cheapest_zone_first(ctx, &mut offerings).await;
        }
        let Some(first) = offerings.first() else {
            break;
        };
        let market = first.market;
        let chosen: Vec<(String, String)> = offerings
            .iter()
            .filter(|o| o.market == market)
            .take(if fleet { usize::MAX } else { 1 })
            .map(|o| (o.instance_type.clone(), o.subnet.clone()))
            .collect();
        let mut request = LaunchRequest {
            launch_template_id: template.id.clone(),
            version: template.version,
            offerings: chosen.clone(),
            spot: market == Market::Spot,
            fleet,
            tags: tags.clone(),
            allocation_strategy: fleet
                .then(|| launch::allocation_strategy(&pool.spec.capacity, market).to_string()),
            client_token: None,
        };
        request.client_token = Some(launch::client_token(
            &uid,
            status.attempt(),
            attempt,
            &request.parameters(),
        ));
        ctx.jobs.ledger.launch_sent(&uid, Timestamp::now());
        ctx.metrics
            .queue_duration
            .get_or_create(&pool_label(job))
            .observe(
                since(job.metadata.creation_timestamp.as_ref(), Timestamp::now()).as_secs_f64(),
            );
        let answer = ctx.ec2().launch(&request).await;
        match &answer {
            // No answer (a transport failure): EC2 may have launched. The same request,
            // retried under the same token, finds out.
            Err(e) if e.code == "Transport" => {}
            Ok(outcome) => {
                let first = outcome.instances.first();
                ctx.jobs
                    .ledger
                    .launch_answered(&uid, first, Timestamp::now());
            }
            Err(_) => ctx
                .jobs
                .ledger
                .launch_answered(&uid, None, Timestamp::now()),
        }
        let outcome = match answer {
            Ok(outcome) => outcome,
            Err(e) if e.is(ErrorClass::InsufficientCapacity) => {
                let (t, subnet) = &chosen[0];
                mark(
                    ctx,
                    market,
                    t,
                    zones.get(subnet).map(String::as_str).unwrap_or_default(),
                    &e.to_string(),
                );
                continue;
            }
            // The pool's template was deleted behind our back: the job's status change wakes
            // the pool, which checks EC2 afresh and recreates it; the job waits for that.
            Err(e) if e.is(ErrorClass::NotFound) && e.code.starts_with("InvalidLaunchTemplate") => {
                ctx.forget_pool_check(&pool_identity.key());
                status.last_error = Some(LastError {
                    reason: "LaunchTemplateMissing".into(),
                    message: format!("{e}; waiting for the RunnerPool to recreate it"),
                    time: Some(Time(now)),
                });
                enter(status, JobPhase::Pending, now);
                return Ok(Action::requeue(ctx.settings.backoff_unit));
            }
            Err(e)
                if matches!(
                    e.class,
                    ErrorClass::InvalidInput | ErrorClass::NotFound | ErrorClass::Unauthorized
                ) =>
            {
                status.attempts = attempt;
                status.last_error = Some(LastError {
                    reason: "LaunchFailed".into(),
                    message: e.to_string(),
                    time: Some(Time(now)),
                });
                enter(status, JobPhase::Failed, now);
                return Ok(Action::requeue(Duration::from_secs(10)));
            }
            Err(e) => return Err(e.into()),
        };
        for failure in &outcome.failures {
            if failure.error.is(ErrorClass::InsufficientCapacity) {
                let t = failure.instance_type.clone().unwrap_or_default();
                let zone = failure
                    .subnet
                    .as_ref()
                    .and_then(|s| zones.get(s))
                    .cloned()
                    .unwrap_or_default();
                if zone.is_empty() {
                    // Fleet errors may not say which subnet; the type is out everywhere we asked.
                    for (ty, subnet) in chosen.iter().filter(|(ty, _)| *ty == t) {
                        mark(
                            ctx,
                            market,
                            ty,
                            zones.get(subnet).map(String::as_str).unwrap_or_default(),
                            &failure.error.to_string(),
                        );
                    }
                } else {
                    mark(ctx, market, &t, &zone, &failure.error.to_string());
                }
            }
        }
        let Some(mut instance) = outcome.instances.into_iter().next() else {
            continue;
        };
        if instance.zone.is_empty() {
            let subnet = chosen
                .iter()
                .find(|(t, _)| *t == instance.instance_type)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            instance.zone = zones.get(&subnet).cloned().unwrap_or_default();
        }
        // Recorded with the zone filled in.
        ctx.jobs
            .ledger
            .launch_answered(&uid, Some(&instance), Timestamp::now());
        info!(instance = %instance.id, instance_type = %instance.instance_type, zone = %instance.zone, attempt, "launched");
        let waited = since(job.metadata.creation_timestamp.as_ref(), Timestamp::now());
        ctx.metrics.launch_latency.observe(waited.as_secs_f64());
        status.attempts = attempt;
        status.cost = cost_snapshot(ctx, &instance).await;
        status.instance = Some(instance_status(&instance, Some(now)));
        status.last_error = None;
        status.next_attempt_at = None;
        enter(status, JobPhase::Launching, now);
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    status.attempts = attempt;
    if attempt >= ctx.settings.max_launch_attempts {
        status.last_error = Some(LastError {
            reason: "InsufficientCapacity".into(),
            message: format!("no capacity for any offering of the pool after {attempt} attempts"),
            time: Some(Time(now)),
        });
        enter(status, JobPhase::Failed, now);
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    let wait = launch::backoff(attempt).mul_f64(ctx.settings.backoff_unit.as_secs_f64() / 5.0);
    status.next_attempt_at = Some(Time(now + wait));
    status.last_error = Some(LastError {
        reason: "InsufficientCapacity".into(),
        message: format!(
            "no capacity for the pool's offerings; attempt {attempt} of {}, retrying in {} s",
            ctx.settings.max_launch_attempts,
            wait.as_secs()
        ),
        time: Some(Time(now)),
    });
    enter(status, JobPhase::Pending, now);
    Ok(Action::requeue(wait))
}

/// How long prices are reused: on-demand prices change rarely, spot prices slowly.
const ON_DEMAND_TTL: Duration = Duration::from_secs(24 * 3600);
const SPOT_TTL: Duration = Duration::from_secs(10 * 60);
/// How long a failed look-up is remembered before it is tried again.
const FAILED_PRICE_TTL: Duration = Duration::from_secs(10 * 60);

/// A price from the cache, or looked up and cached. The lock is held across the look-up so
/// that a burst of launches makes one call. A failure is warned about once and remembered for a
/// while, so a missing permission does not cost a call per job.
async fn cached_price(
    ctx: &Context,
    key: String,
    ttl: Duration,
    warned: &AtomicBool,
    permission: &str,
    lookup: impl std::future::Future<Output = crate::cloud::CloudResult<Option<String>>>,
) -> Option<String> {
    let slot = ctx
        .jobs
        .prices
        .lock()
        .unwrap()
        .entry(key)
        .or_default()
        .clone();
    let mut cached = slot.lock().await;
    if let Some((expires, price)) = cached.as_ref()
        && Instant::now() < *expires
    {
        return price.clone();
    }
    let (price, ttl) = match lookup.await {
        Ok(price) => (price, ttl),
        Err(e) => {
            if !warned.swap(true, Ordering::SeqCst) {
                warn!(error = %e, permission, "cannot read prices; cost snapshots go without them");
            }
            (None, FAILED_PRICE_TTL)
        }
    };
    *cached = Some((Instant::now() + ttl, price.clone()));
    price
}

/// A cached price and when it expires; `None` until first looked up.
type PriceSlot = tokio::sync::Mutex<Option<(Instant, Option<String>)>>;

/// The current spot price of a type in a zone, cached.
async fn spot_price(ctx: &Context, instance_type: &str, zone: &str) -> Option<String> {
    cached_price(
        ctx,
        format!("spot/{instance_type}/{zone}"),
        SPOT_TTL,
        &ctx.jobs.warned_spot,
        "ec2:DescribeSpotPriceHistory",
        ctx.ec2().spot_price(instance_type, zone),
    )
    .await
}

/// A single-offering launch on spot goes to the zone where the first type is cheapest now.
async fn cheapest_zone_first(ctx: &Context, offerings: &mut [launch::Offering]) {
    let Some(first) = offerings.first().cloned() else {
        return;
    };
    if first.market != Market::Spot {
        return;
    }
    let mut prices = HashMap::new();
    for o in offerings
        .iter()
        .filter(|o| o.instance_type == first.instance_type)
    {
        let price = spot_price(ctx, &o.instance_type, &o.zone).await;
        if let Some(price) = price.and_then(|p| p.parse::<f64>().ok()) {
            prices.insert(o.zone.clone(), price);
        }
    }
    launch::cheapest_zone_first(offerings, &prices);
}

/// Prices at launch. A denied or failing look-up leaves its price empty; the launch goes on.
async fn cost_snapshot(ctx: &Context, instance: &Instance) -> Option<CostSnapshot> {
    let shared = &ctx.jobs;
    let ec2 = ctx.ec2();
    let on_demand = cached_price(
        ctx,
        format!("on-demand/{}", instance.instance_type),
        ON_DEMAND_TTL,
        &shared.warned_on_demand,
        "pricing:GetProducts",
        ec2.on_demand_price(&instance.instance_type),
    )
    .await;
    let spot = if instance.spot {
        spot_price(ctx, &instance.instance_type, &instance.zone).await
    } else {
        None
    };
    let hourly = if instance.spot {
        spot
    } else {
        on_demand.clone()
    };
    Some(CostSnapshot {
        hourly_price: hourly,
        on_demand_hourly_price: on_demand,
        estimated_cost: None,
        currency: "USD".into(),
    })
}

impl Shared {
    /// Whether a failed on-demand price look-up was warned about (once).
    pub fn warned_about_prices(&self) -> bool {
        self.warned_on_demand.load(Ordering::SeqCst)
    }
}

fn mark(ctx: &Context, market: Market, instance_type: &str, zone: &str, why: &str) {
    ctx.metrics
        .capacity_errors
        .get_or_create(&Offering {
            instance_type: instance_type.into(),
            zone: zone.into(),
        })
        .inc();
    warn!(
        ?market,
        instance_type,
        zone,
        error = why,
        "no capacity; skipping this offering for a while"
    );
    let mut capacity = ctx.jobs.capacity.lock().unwrap();
    capacity.prune(Instant::now());
    capacity.mark_unavailable(market, instance_type, zone, Instant::now());
}

/// Sets the RunnerJobs-by-phase gauges from the controller's view of the cluster.
pub fn count_jobs(ctx: &Context) {
    let Some(store) = ctx.jobs.store() else {
        return;
    };
    let mut counts: HashMap<PoolPhase, i64> = HashMap::new();
    for job in store.state() {
        let key = PoolPhase {
            namespace: job.namespace().unwrap_or_default(),
            pool: job.spec.pool_name.clone(),
            phase: format!(
                "{:?}",
                job.status.as_ref().map(|s| s.phase).unwrap_or_default()
            ),
        };
        *counts.entry(key).or_default() += 1;
    }
    ctx.metrics.jobs.clear();
    for (key, n) in counts {
        ctx.metrics.jobs.get_or_create(&key).set(n);
    }
}
