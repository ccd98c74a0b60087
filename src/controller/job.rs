//! The RunnerJob reconciler: carries out what the phase machine decides — launch one tagged
//! instance, follow it through one shared DescribeInstances snapshot, terminate it when the job
//! is over or the object is deleted — and records each step in the status.

use std::collections::{BTreeMap, HashMap, HashSet};
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
use super::{Context, FIELD_MANAGER, Result, error_policy};
use crate::api::{
    AssignedJob, CostSnapshot, InstanceStatus, JobPhase, JobResult, RunnerJob, RunnerJobStatus,
    RunnerPool,
};
use crate::cloud::{ErrorClass, Instance, LaunchRequest};
use crate::domain::job::{
    Decision, Facts, GitHubJob, InstanceState, LaunchAnswer, Limits, Listed, Outcome,
    PoolAdmission, RERUN_REQUESTING, RerunAnswer, RunAttempt, SPOT_INTERRUPTION, Step, Witness,
    claims_batch_instance, decide, enter, expiring, holds_slot,
    instance_state as domain_instance_state, may_rerun, needs_no_pass, pool_readiness,
    record_reason, recorded_launch_unsettled, to_wake,
};
use crate::domain::launch::{self, CapacityCache, JobIdentity, Market};
use crate::domain::pool::PoolIdentity;
use crate::domain::warm::{TakenListing, taken_listing};

pub use crate::api::JOB_FINALIZER as FINALIZER;

/// Instances by the uid of the RunnerJob they were launched for.
pub type InstancesByJob = Arc<HashMap<String, Instance>>;

/// One DescribeInstances listing, shared by every pass, and when it was requested.
#[derive(Clone)]
pub struct Snapshot {
    pub instances: InstancesByJob,
    /// Instances of batched launches, by instance id, with their batch's token as their only
    /// tag: their tags name no job, the statuses of their jobs name them.
    pub batched: Arc<HashMap<String, Instance>>,
    /// Warm instances, by `namespace/pool`, with their pool's and their `gha:warm` tags only.
    pub warm: Arc<HashMap<String, Vec<Instance>>>,
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
    /// The job versions this process's own writes replaced, until the cache shows a later one.
    own_writes: OwnWrites,
    /// Jobs gathering for a batched launch, and batched launch calls in flight.
    batches: super::batch::Batches,
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
    /// Waiting RunnerJobs (by uid) the sweep no longer found among GitHub's queued jobs: each
    /// asks GitHub on its next pass.
    doubted: Mutex<HashSet<String>>,
    /// Warm instances this process took for jobs, by instance id, with the job's uid: no other
    /// job takes them, and the pool neither counts nor retires them, before the cache shows
    /// the job's record. Those the pool's pass terminated are here too, with an empty uid, so
    /// that no job takes them while the listing still shows them stopped.
    pub(super) warm_taken: Mutex<HashMap<String, String>>,
    /// Each warm pool's storage cost an hour at its last pass, by `namespace/pool`, and when:
    /// what the next pass adds to `pacer_warm_storage_cost_usd`.
    pub(super) warm_storage: Mutex<HashMap<String, (Instant, f64)>>,
}

impl Shared {
    pub(super) fn store(&self) -> Option<&Store<RunnerJob>> {
        self.store.get()
    }

    /// Forgets what this process knew of RunnerJob `uid`, whose status is `status`: it is
    /// gone, or going.
    fn forget(&self, uid: &str, status: &RunnerJobStatus) {
        self.ledger.forget(uid);
        self.own_writes.forget(uid);
        let earlier = status.previous_attempts.iter().map(|a| a.instance.as_str());
        let current = status.instance.iter().map(|i| i.id.as_str());
        self.ledger.forget_terminations(current.chain(earlier));
        self.doubted.lock().unwrap().remove(uid);
        self.let_go_of_warm(uid);
    }

    /// Remembers the zones of `subnets`, as a pool's check found them.
    pub(super) async fn learn_zones(&self, subnets: &[crate::cloud::Subnet]) {
        let mut known = self.zones.lock().await;
        let named = subnets.iter().filter(|s| !s.zone.is_empty());
        known.extend(named.map(|s| (s.id.clone(), s.zone.clone())));
    }

    /// Drops the warm instance this process took for job `uid`, if any.
    fn let_go_of_warm(&self, uid: &str) {
        self.warm_taken.lock().unwrap().retain(|_, job| job != uid);
    }

    /// Resolves once the RunnerJob controller's cache holds every RunnerJob: its first list
    /// is in.
    pub async fn synced(&self) {
        loop {
            if let Some(store) = self.store.get() {
                let _ = store.wait_until_ready().await;
                return;
            }
            // Set as the controllers start, in the same term.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The sweep's word that GitHub no longer lists the job of RunnerJob `uid` as queued.
    pub(super) fn doubt(&self, uid: &str) {
        self.doubted.lock().unwrap().insert(uid.to_string());
    }
}

/// Drops from a RunnerJob as watched or listed what no pass reads: its managed fields, its
/// labels, annotations (kubectl's copy of the applied object among them) and owner references,
/// the labels its spec asked for (matched to a pool when it was created, never read again) and,
/// once it has finished, what [`trim_finished`] drops. The watch cache holds thousands of
/// RunnerJobs and the sweep lists them all; managed fields alone are several kilobytes of each
/// as parsed. Passes write only the status (what they changed in it) and the finalizers, so
/// what the cache lacks stays as it is in the API server. The watch skips the same metadata
/// while it parses (`listed.rs`); a test there holds the two together.
pub(super) fn slim(job: &mut RunnerJob) {
    let meta = &mut job.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.annotations = None;
    meta.owner_references = None;
    job.spec.labels = Vec::new();
    trim_finished(job);
}

/// Drops from the cached copy of a finished job what no pass reads again: its launch, once it
/// made an instance (a finished job launches nothing and holds no slot, and a launch with an
/// instance is settled), its prices (the cost is estimated in the pass that finishes it), the
/// workflow job its runner took (asked of GitHub and read only before the job ends) and its
/// boot, when the runner it handed out registered (a finished job's pass reads the boot only
/// for that runner, through `current_runner`, and whether the boot failed only decides a job
/// that has not finished). Finished jobs stay cached by the thousand for their TTL, and the
/// launch's tags and offerings are the largest part of each. A pass writes only what it
/// changed, so what the cache lacks stays as it is in the API server.
fn trim_finished(job: &mut RunnerJob) {
    let Some(status) = (job.status.as_mut()).filter(|s| s.phase.is_finished()) else {
        return;
    };
    status.assigned_job = None;
    if status.runner.is_some() {
        status.boot = None;
    }
    if status.instance.is_some() {
        status.launch = None;
        status.cost = None;
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
    let expired = expiring_jobs(ctx.clone(), store.clone());
    let settled = ctx.clone();
    let changes = changes.filter(move |job| std::future::ready(!passless(&settled, job)));
    Controller::for_shared_stream(changes, store)
        .watches_shared_stream(finished, move |job| waiting_for_room(&wake, &job))
        .reconcile_on(expired)
        .with_config(config)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| std::future::ready(()))
        .await;
}

/// How soon a pass handed an object older than this process's own write looks again, should
/// the watch not bring the newer one first.
const BEHIND_RECHECK: Duration = Duration::from_secs(1);

async fn reconcile(job: Arc<RunnerJob>, ctx: Arc<Context>) -> Result<Action> {
    let ns = job.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", job.name_any());
    let span = info_span!("reconcile", job = %key, pool = %job.spec.pool_name, job_id = job.spec.job_id, run_id = job.spec.run_id, repository = %job.spec.repository);
    async move {
        let uid = job.uid().unwrap_or_default();
        if ctx
            .jobs
            .own_writes
            .behind(&uid, job.metadata.resource_version.as_deref())
        {
            // The watch brings this process's newer write, and a pass with it; the requeue
            // only guards against a watch that stalls.
            return Ok(Action::requeue(BEHIND_RECHECK));
        }
        let api: Api<RunnerJob> = Api::namespaced(ctx.client.clone(), &ns);
        let ours = job.finalizers().iter().any(|f| f == FINALIZER);
        let action = match (job.metadata.deletion_timestamp.is_some(), ours) {
            // Going away with nothing of ours to hold it.
            (true, false) => Action::await_change(),
            // The finalizer is on before any launch; the pass goes on with the patched object
            // rather than waiting for the watch to bring it back.
            (false, false) => {
                let written = set_finalizer(&api, &job, true).await?;
                let replaced = job.metadata.resource_version.as_deref();
                let version = written.metadata.resource_version.as_deref();
                ctx.jobs.own_writes.wrote(&uid, replaced, version);
                let job = written;
                looked(pass(&job, &ctx, false).await?)
            }
            (false, true) => looked(pass(&job, &ctx, false).await?),
            // The finalizer goes once the pass says nothing of the job is left in EC2.
            (true, true) => match pass(&job, &ctx, true).await? {
                Next::Look(action) => action,
                Next::Released => {
                    set_finalizer(&api, &job, false).await?;
                    Action::await_change()
                }
            },
        };
        ctx.succeeded(&key);
        Ok(action)
    }
    .instrument(span)
    .await
}

fn looked(next: Next) -> Action {
    match next {
        Next::Look(action) => action,
        Next::Released => Action::await_change(),
    }
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

/// The versions of each RunnerJob that this process's own writes replaced. The watch brings a
/// job's own write back after the write returned, and a pass queued meanwhile is handed the
/// object the write replaced: deciding on it would redo what the write recorded, and its write
/// would be refused (409) as made on an old version. Such a pass waits for the newer object
/// instead. An entry goes once a pass is handed a version it does not hold, since the cache only
/// moves forward (its relists are consistent lists, see [`super::run`]), or once it is
/// [`OWN_WRITES_KEPT`] old.
#[derive(Default)]
struct OwnWrites(Mutex<HashMap<String, (Instant, Vec<String>)>>);

/// How long a job's own writes hold back its passes handed an older version, at most. Past it,
/// a pass goes on as if they had not (a write on an old version is refused, and the pass
/// retried): no case unforeseen here holds a job longer.
const OWN_WRITES_KEPT: Duration = Duration::from_secs(30);

impl OwnWrites {
    /// This process wrote RunnerJob `uid` over `replaced`, the version its write named, and
    /// the API server answered with `written`. A write that left the version as it was (it
    /// changed nothing) replaced nothing.
    fn wrote(&self, uid: &str, replaced: Option<&str>, written: Option<&str>) {
        let Some(replaced) = replaced.filter(|r| Some(*r) != written) else {
            return;
        };
        let mut writes = self.0.lock().unwrap();
        let now = Instant::now();
        let (at, versions) = writes
            .entry(uid.into())
            .or_insert_with(|| (now, Vec::new()));
        *at = now;
        versions.push(replaced.into());
    }

    /// Whether `version` of RunnerJob `uid` is one this process's own writes replaced.
    fn behind(&self, uid: &str, version: Option<&str>) -> bool {
        let mut writes = self.0.lock().unwrap();
        let Some((at, replaced)) = writes.get(uid) else {
            return false;
        };
        if at.elapsed() < OWN_WRITES_KEPT
            && version.is_some_and(|v| replaced.iter().any(|r| r == v))
        {
            return true;
        }
        writes.remove(uid);
        false
    }

    fn forget(&self, uid: &str) {
        self.0.lock().unwrap().remove(uid);
    }
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
    let mut batched = HashMap::new();
    let mut warm: HashMap<String, Vec<Instance>> = HashMap::new();
    let mut pages = ec2.managed_instance_pages(&ctx.settings.controller_id);
    while let Some(page) = pages.try_next().await? {
        for mut instance in page {
            let Some(uid) = instance.tags.remove(launch::RUNNER_JOB_UID) else {
                if instance.tags.contains_key(crate::cloud::tags::WARM) {
                    let warm_tags = [crate::cloud::tags::WARM, crate::cloud::tags::POOL];
                    instance.tags.retain(|k, _| warm_tags.contains(&k.as_str()));
                    let pool = instance.tags.get(crate::cloud::tags::POOL).cloned();
                    warm.entry(pool.unwrap_or_default())
                        .or_default()
                        .push(instance);
                    continue;
                }
                // Only the batch's token is kept of its tags.
                instance.tags.retain(|k, _| k == launch::BATCH);
                if !instance.tags.is_empty() {
                    batched.insert(instance.id.clone(), instance);
                }
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
        batched: Arc::new(batched),
        warm: Arc::new(warm),
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
/// after the launch's answer. With it, how long until a listing of the job's warm instance
/// that was set aside (it may predate the start) would count.
fn instance_state(
    snapshot: &Snapshot,
    job: (&str, &str),
    status: &RunnerJobStatus,
    launched: Option<&(String, Timestamp)>,
    visibility: Duration,
) -> (InstanceState, Option<Duration>) {
    let (uid, pool) = job;
    // Instances of earlier attempts are history, not this attempt's instance.
    let earlier = |id: &str| status.previous_attempts.iter().any(|a| a.instance == id);
    let known = launched
        .map(|(id, _)| id.as_str())
        .or_else(|| status.instance.as_ref().map(|i| i.id.as_str()))
        .filter(|id| !earlier(id));
    let answered = answered(launched, status);
    // The warm instance the job took, unless its listing may predate the start.
    let taken = warm_instance(snapshot, pool, status);
    let launching = status.phase == JobPhase::Launching;
    let started_here = launched.is_some();
    let how = (taken.as_ref()).map(|i| {
        taken_listing(
            &i.state,
            launching,
            started_here,
            answered,
            snapshot.taken,
            visibility,
        )
    });
    let (warm, set_aside) = match how {
        Some(TakenListing::StartAgain) => return (InstanceState::Absent, None),
        Some(TakenListing::SetAside(left)) => (None, Some(left)),
        _ => (taken, None),
    };
    // A batch's or a warm instance by the id the status knows; a job's own by its tags.
    let by_id =
        (batch_instance(snapshot, status, uid).or(warm)).filter(|i| known == Some(i.id.as_str()));
    let listed = (by_id.or_else(|| snapshot.instances.get(uid)))
        .filter(|i| !earlier(&i.id))
        .map(|i| Listed {
            id: &i.id,
            alive: i.is_alive(),
            reason: i.state_reason.as_deref().unwrap_or(&i.state),
        });
    let state = domain_instance_state(listed, known, answered, snapshot.taken, visibility);
    (state, set_aside)
}

/// When the job's launch (or warm start) was answered at the latest: the Launching time is
/// set as it is recorded.
fn answered(launched: Option<&(String, Timestamp)>, status: &RunnerJobStatus) -> Option<Timestamp> {
    launched
        .map(|(_, at)| *at)
        .or_else(|| status.phase_times.launching.as_ref().map(|t| t.0))
        .or_else(|| {
            status
                .instance
                .as_ref()
                .and_then(|i| i.launch_time.as_ref())
                .map(|t| t.0)
        })
}

/// The warm instance of the job's pool (`namespace/name`) that its status says it took, as
/// listed.
fn warm_instance<'a>(
    snapshot: &'a Snapshot,
    pool: &str,
    status: &RunnerJobStatus,
) -> Option<&'a Instance> {
    let took = &status.launch.as_ref()?.warm.as_ref()?.instance;
    let id = &status.instance.as_ref()?.id;
    if id != took {
        return None;
    }
    snapshot.warm.get(pool)?.iter().find(|i| &i.id == id)
}

/// Whether a live job other than `uid` names warm instance `id` as the one it took.
fn warm_named_by_another(ctx: &Context, uid: &str, id: &str) -> bool {
    let Some(store) = ctx.jobs.store() else {
        return true;
    };
    let names = |j: &RunnerJob| {
        j.metadata.uid.as_deref() != Some(uid)
            && (j.status.as_ref()).is_some_and(|s| crate::domain::warm::holds(s, id))
    };
    store.find(names).is_some()
}

/// The instance of the job's batch that its status names, as listed: only when it carries the
/// batch token the status recorded, and that batch place is the job's. The status is writable
/// by others: it must not make another job's instance this one's.
fn batch_instance<'a>(
    snapshot: &'a Snapshot,
    status: &RunnerJobStatus,
    uid: &str,
) -> Option<&'a Instance> {
    let id = &status.instance.as_ref()?.id;
    (snapshot.batched.get(id)).filter(|i| claims_batch_instance(uid, status, id, token_of(i)))
}

fn token_of(instance: &Instance) -> Option<&str> {
    instance.tags.get(launch::BATCH).map(String::as_str)
}

/// Whether a job other than `uid` that has not finished claims batch instance `id`, made under
/// batch token `token` (as the cache shows the jobs, see [`claims_batch_instance`]). A member of
/// the same batch whose status was made to name another's instance does not get to terminate
/// it, and a replay that answered otherwise than the first time gives no member another's.
fn named_by_another(ctx: &Context, uid: &str, id: &str, token: Option<&str>) -> bool {
    let Some(store) = ctx.jobs.store() else {
        return true;
    };
    // The id first: only a job that names it is checked further (a digest each), so a burst
    // of thousands costs a pass over the cache, not a digest per job.
    let claims = |j: &RunnerJob| {
        let other = j.metadata.uid.as_deref().filter(|other| *other != uid);
        (other.zip(j.status.as_ref())).is_some_and(|(other, s)| {
            !s.phase.is_finished()
                && s.instance.as_ref().is_some_and(|i| i.id == id)
                && claims_batch_instance(other, s, id, token)
        })
    };
    store.find(claims).is_some()
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

/// Whether a job holds one of its pool's runner slots, as its status says.
fn holds_runner(job: &RunnerJob) -> bool {
    holds_slot(job.status.as_ref())
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

/// Whether a change to `job` can be left without a pass ([`needs_no_pass`]): finished long
/// enough ago, its TTL far, no re-run due, not being deleted and holding our finalizer. Only
/// with its pool cached: its TTL and re-runs are the pool's. (At a start, the few pools are
/// listed before the thousands of RunnerJobs.)
fn passless(ctx: &Context, job: &RunnerJob) -> bool {
    let (Some(status), Some(limits)) = (job.status.as_ref(), cached_limits(ctx, job)) else {
        return false;
    };
    job.metadata.deletion_timestamp.is_none()
        && job.finalizers().iter().any(|f| f == FINALIZER)
        && needs_no_pass(
            status,
            entered_time(status).map(|t| t.0),
            &limits,
            Timestamp::now(),
        )
}

/// The job limits of `job`'s pool, when the pool is cached.
fn cached_limits(ctx: &Context, job: &RunnerJob) -> Option<Limits> {
    cached_pool(ctx, job).map(|pool| ctx.settings.job_limits.for_pool(&pool.spec))
}

/// Every `expiry_scan` of the job limits, the cached finished RunnerJobs whose TTL ends within
/// two scans: they hold no timer until then ([`Step::Kept`]), and their pass sets one for the
/// rest.
fn expiring_jobs(
    ctx: Arc<Context>,
    store: Store<RunnerJob>,
) -> impl futures::Stream<Item = ObjectRef<RunnerJob>> + Send + 'static {
    futures::stream::unfold((ctx, store), |(ctx, store)| async move {
        tokio::time::sleep(ctx.settings.job_limits.expiry_scan).await;
        let now = Timestamp::now();
        let due: Vec<_> = (store.state().iter())
            .filter(|job| {
                let Some(status) = job.status.as_ref().filter(|s| s.phase.is_finished()) else {
                    return false;
                };
                let limits = cached_limits(&ctx, job).unwrap_or(ctx.settings.job_limits);
                expiring(entered_time(status).map(|t| t.0), &limits, now)
            })
            .map(|job| ObjectRef::from_obj(&**job))
            .collect();
        Some((futures::stream::iter(due), (ctx, store)))
    })
    .flatten()
}

fn outcome(status: &RunnerJobStatus) -> Option<Outcome> {
    status.completion.as_ref().map(|c| match c.result {
        JobResult::Success => Outcome::Success,
        JobResult::Failure => Outcome::Failure,
        JobResult::Cancelled => Outcome::Cancelled,
    })
}

/// How a pass ends: look again (after the action), or the finalizer may go.
enum Next {
    Look(Action),
    Released,
}

/// What a pass knows: the status it is writing, the pool, the limits, EC2's listing, and the
/// facts the decision is made from.
struct Seen {
    now: Timestamp,
    uid: String,
    /// The job's pool as `namespace/name`.
    pool_key: String,
    status: RunnerJobStatus,
    /// The status as the API server has it from this pass's writes: what the next write
    /// changes.
    written: RunnerJobStatus,
    /// The resourceVersion this pass read the job at, then its own last write's. A write made
    /// on an older one is refused (409): a callback changed the job meanwhile, and the pass
    /// starts over from what it wrote rather than decide on a stale status.
    version: Option<String>,
    pool: Option<Arc<RunnerPool>>,
    limits: Limits,
    snapshot: Snapshot,
    /// The instance this process launched for the job, and when EC2 answered.
    launched: Option<(String, Timestamp)>,
    /// The warm instance the job's status says it took, when another live job names it too
    /// (or the job cache cannot tell yet): neither job's to start or terminate.
    contested: Option<String>,
    facts: Facts,
}

/// One pass: observe, decide, carry out the one step, record the status.
async fn pass(job: &RunnerJob, ctx: &Context, deleting: bool) -> Result<Next> {
    let mut seen = observe(job, ctx, deleting).await?;
    let decision = decision(job, ctx, &mut seen).await?;
    let next = execute(job, ctx, &mut seen, &decision).await?;
    if let Next::Released = next {
        return Ok(next);
    }
    record(job, ctx, seen, decision).await?;
    Ok(next)
}

/// Gathers the facts: the pool, EC2's shared listing, what this process launched, the status.
async fn observe(job: &RunnerJob, ctx: &Context, deleting: bool) -> Result<Seen> {
    let now = Timestamp::now();
    let uid = job.uid().unwrap_or_default();
    let status = job.status.clone().unwrap_or_default();
    let pool = pool_of(ctx, job).await?;
    let limits = Limits {
        max_launch_rounds: ctx.settings.max_launch_attempts,
        backoff_unit: ctx.settings.backoff_unit,
        ..ctx.settings.job_limits
    };
    let limits = pool.as_ref().map_or(limits, |p| limits.for_pool(&p.spec));
    let snapshot = instances(ctx, ctx.settings.instance_refresh).await?;
    let launched = ctx.jobs.ledger.launched(&uid);
    let (mut instance, set_aside) = instance_state(
        &snapshot,
        (&uid, &pool_key(job)),
        &status,
        launched.as_ref(),
        limits.launch_visibility,
    );
    // A job that is over does not wait for the next listing once EC2 has accepted its
    // instance's termination (the instance is shutting down, never to run again): it finishes
    // now, and its slot goes to a job waiting for room.
    if let InstanceState::Alive { id } = &instance
        && status.phase == JobPhase::Completing
        && !deleting
        && (ctx.jobs.ledger).terminating(id, snapshot.taken, limits.launch_visibility)
    {
        let reason = "Client.UserInitiatedShutdown: terminated by Pacer".to_string();
        instance = InstanceState::Gone {
            id: id.clone(),
            reason,
        };
    }
    // A warm instance another live job names too is neither's: each lets go of it (its
    // bootstrap is refused to both), and the pool's pass terminates it as used.
    let contested = (status.launch.as_ref())
        .and_then(|l| Some(l.warm.as_ref()?.instance.clone()))
        .filter(|id| warm_named_by_another(ctx, &uid, id));
    if let InstanceState::Alive { id } = &instance
        && contested.as_ref() == Some(id)
    {
        let reason = "another RunnerJob names it as the warm instance it took".to_string();
        instance = InstanceState::Gone {
            id: id.clone(),
            reason,
        };
    }
    let facts = Facts {
        phase: status.phase,
        in_phase: since(entered(&status, job).as_ref(), now),
        instance,
        registered: status.runner.is_some(),
        assigned: status.assigned_job.is_some(),
        outcome: outcome(&status),
        deleting,
        launch_unsettled: launch_unsettled(ctx, &uid, &status, &snapshot, &limits, now),
        pool: if status.phase == JobPhase::Pending && !deleting {
            admit(ctx, job, pool.as_deref())
        } else {
            PoolAdmission::Admitted
        },
        backoff_left: until(status.next_attempt_at.as_ref(), now),
        attempt: status.attempt(),
        boot_failed: status.boot.as_ref().is_some_and(|b| b.log_tail.is_some()),
        interrupted: (status.interruption.as_ref()).is_some_and(|i| i.kind == SPOT_INTERRUPTION),
        witness: None,
        doubted: ctx.jobs.doubted.lock().unwrap().contains(&uid),
        launch: None,
        launch_rounds: status.attempts,
        rerun_due: crate::domain::job::rerun_due(&status, &limits),
        rerun: None,
        // The listing that counts is one taken after the moment: the shared one is refreshed
        // only once it is `instance_refresh` old, so no sooner than that.
        set_aside: set_aside.map(|left| left.max(ctx.settings.instance_refresh)),
    };
    Ok(Seen {
        now,
        uid,
        pool_key: pool_key(job),
        written: status.clone(),
        version: job.metadata.resource_version.clone(),
        status,
        pool,
        limits,
        snapshot,
        launched,
        contested,
        facts,
    })
}

/// The job's pool: the pool controller's cache when it has it, else the API server.
async fn pool_of(ctx: &Context, job: &RunnerJob) -> Result<Option<Arc<RunnerPool>>> {
    if let Some(pool) = cached_pool(ctx, job) {
        return Ok(Some(pool));
    }
    let ns = job.namespace().unwrap_or_default();
    let pools = Api::<RunnerPool>::namespaced(ctx.client.clone(), &ns);
    Ok(pools.get_opt(&job.spec.pool_name).await?.map(Arc::new))
}

/// How long until `t`; zero when it is past or unset.
fn until(t: Option<&Time>, now: Timestamp) -> Duration {
    t.map(|t| t.0.duration_since(now))
        .filter(|d| d.is_positive())
        .map(|d| d.unsigned_abs())
        .unwrap_or_default()
}

/// Whether EC2 may have launched for the job an instance nobody knows of yet: a launch call of
/// this process is unanswered, or a recorded launch has no instance and the listing is not a
/// visibility window past it.
fn launch_unsettled(
    ctx: &Context,
    uid: &str,
    status: &RunnerJobStatus,
    snapshot: &Snapshot,
    limits: &Limits,
    now: Timestamp,
) -> bool {
    let ledger = &ctx.jobs.ledger;
    let recent = |t: Timestamp| now.duration_since(t).unsigned_abs() < limits.launch_visibility;
    let refused = |token: &str| ledger.was_refused(uid, token);
    let visibility = limits.launch_visibility;
    ledger.unsettled_since(uid).is_some_and(recent)
        || recorded_launch_unsettled(status, refused, snapshot.taken, visibility)
}

/// Decides; when the decision needs GitHub's word or EC2's answer to a launch, gets it and
/// decides again with it.
async fn decision(job: &RunnerJob, ctx: &Context, seen: &mut Seen) -> Result<Decision> {
    let mut decision = decide(&seen.facts, &seen.limits);
    if decision.step == Step::Consult {
        // Asked now: a doubt the sweep raised is settled by this answer, and one it raises
        // while GitHub answers stays for the next pass.
        ctx.jobs.doubted.lock().unwrap().remove(&seen.uid);
        let witness = consult(ctx, job, seen.pool.as_deref(), &seen.status).await;
        if witness.job == GitHubJob::Ours && seen.status.assigned_job.is_none() {
            // Its `in_progress` delivery was lost: GitHub's word records the assignment.
            seen.status.assigned_job = Some(Box::new(AssignedJob {
                job_id: job.spec.job_id,
                run_id: job.spec.run_id,
                repository: job.spec.repository.clone(),
            }));
            seen.facts.assigned = true;
        }
        seen.facts.witness = Some(witness);
        decision = decide(&seen.facts, &seen.limits);
    }
    if decision.step == Step::Rerun {
        seen.facts.rerun = Some(rerun(job, ctx, seen).await?);
        decision = decide(&seen.facts, &seen.limits);
    }
    if decision.step == Step::Launch {
        let answer = launch(job, ctx, seen).await?;
        if let LaunchAnswer::NoCapacity { left: false, .. } = answer {
            // A round without capacity anywhere.
            seen.status.attempts += 1;
        }
        seen.facts.launch_rounds = seen.status.attempts;
        seen.facts.phase = JobPhase::Launching;
        seen.facts.launch = Some(answer);
        decision = decide(&seen.facts, &seen.limits);
    }
    Ok(decision)
}

/// Asks GitHub to re-run the job, at most once: GitHub is asked first whether the run has
/// completed and the job failed there on our runner; then the status records that the request
/// is going out; then it goes, never retried after an answer that leaves its fate unknown.
async fn rerun(job: &RunnerJob, ctx: &Context, seen: &mut Seen) -> Result<RerunAnswer> {
    let Some(github) = &ctx.github else {
        return Ok(RerunAnswer::Refused("no GitHub App is configured".into()));
    };
    let (repository, installation) = (&job.spec.repository, job.spec.installation_id);
    let unavailable = |e: crate::github::GitHubError| {
        warn!(error = %e, "reading the job before its re-run failed; asking again later");
        RerunAnswer::NotYet
    };
    let gone = || RerunAnswer::Refused("GitHub no longer has the job or its run".into());
    let github_job = match github
        .workflow_job(repository, installation, job.spec.job_id)
        .await
    {
        Ok(Some(j)) => j,
        Ok(None) => return Ok(gone()),
        Err(e) => return Ok(unavailable(e)),
    };
    let run = match github
        .workflow_run(repository, installation, github_job.run_id)
        .await
    {
        Ok(Some(run)) => run,
        Ok(None) => return Ok(gone()),
        Err(e) => return Ok(unavailable(e)),
    };
    let attempt = RunAttempt {
        run_status: &run.status,
        run_attempt: run.run_attempt,
        job_status: &github_job.status,
        job_attempt: github_job.run_attempt,
        conclusion: github_job.conclusion.as_deref(),
        runner: github_job.runner_name.as_deref(),
    };
    let ours = seen.status.runner.as_ref().map(|r| r.name.as_str());
    if let Err(answer) = may_rerun(&attempt, ours) {
        return Ok(answer);
    }
    let asking = "asking GitHub to re-run the job; should this reason stay, its answer was lost";
    record_reason(&mut seen.status, RERUN_REQUESTING, asking.into(), seen.now);
    seen.write(job, ctx, &[]).await?;
    match github
        .rerun_job(repository, installation, job.spec.job_id)
        .await
    {
        Ok(()) => {
            let note = format!(
                "asked GitHub to re-run job {} after its spot instance was reclaimed",
                job.spec.job_id
            );
            let normal = kube::runtime::events::EventType::Normal;
            ctx.event(job, normal, "RerunRequested", note).await;
            Ok(RerunAnswer::Requested)
        }
        Err(e) => Ok(RerunAnswer::Refused(format!("{e}; it is not asked again"))),
    }
}

/// Carries out the decision's step.
async fn execute(
    job: &RunnerJob,
    ctx: &Context,
    seen: &mut Seen,
    decision: &Decision,
) -> Result<Next> {
    let action = match &decision.step {
        Step::Wait(d) => Action::requeue(*d),
        Step::Kept => Action::await_change(),
        Step::Backoff(d) => {
            seen.status.next_attempt_at = Some(Time(seen.now + *d));
            Action::requeue(*d)
        }
        // Asked already, or launched already, in this pass: look again shortly.
        Step::Consult | Step::Launch | Step::Rerun => Action::requeue(Duration::from_secs(10)),
        Step::Requeue { why } => {
            // The history keeps why this attempt ended: the decision's own words.
            if let Some((reason, message)) = &decision.reason {
                record_reason(&mut seen.status, reason, message.clone(), seen.now);
            }
            // The ended attempt's runner, if it got one, took no job: it goes from GitHub with
            // its instance (should GitHub refuse, the sweep removes it later).
            deregister(ctx, job, seen.pool.as_deref(), &seen.status).await;
            retire_warm(ctx, seen).await?;
            requeue(ctx, job, &mut seen.status, why, seen.now);
            Action::requeue(Duration::ZERO)
        }
        Step::Terminate => {
            terminate(ctx, seen).await?;
            // The next snapshot shows whether it went; one DescribeInstances serves every job.
            Action::requeue(ctx.settings.instance_refresh)
        }
        Step::Release => {
            retire_warm(ctx, seen).await?;
            deregister(ctx, job, seen.pool.as_deref(), &seen.status).await;
            ctx.jobs.forget(&seen.uid, &seen.status);
            release_slot(ctx, job);
            return Ok(Next::Released);
        }
        Step::Delete => {
            retire_warm(ctx, seen).await?;
            // Only this object: one recreated under the same name is not this one's to delete.
            let params = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: Some(seen.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            Api::<RunnerJob>::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default())
                .delete(&job.name_any(), &params)
                .await?;
            ctx.jobs.forget(&seen.uid, &seen.status);
            return Ok(Next::Look(Action::await_change()));
        }
    };
    // A deleting job keeps its finalizer until its instance is gone: it looks again.
    Ok(Next::Look(action))
}

/// Terminates the warm instance of an attempt that ends: it may have run, and is never warm
/// again (one EC2 lists stopped after its start would otherwise look ready).
async fn retire_warm(ctx: &Context, seen: &Seen) -> Result<()> {
    // Once this attempt started it, no other job's claim keeps it.
    let started = seen.launched.is_some()
        || seen.status.boot.is_some()
        || !matches!(seen.status.phase, JobPhase::Pending | JobPhase::Launching);
    if let Some(instance) = warm_instance(&seen.snapshot, &seen.pool_key, &seen.status)
        && !matches!(instance.state.as_str(), "shutting-down" | "terminated")
        && (started || seen.contested.as_ref() != Some(&instance.id))
    {
        let settle = seen.limits.launch_visibility;
        (ctx.jobs.ledger)
            .terminate(ctx, &instance.id, seen.snapshot.taken, settle)
            .await?;
        info!(instance = %instance.id, "terminated the warm instance of an ended attempt");
    }
    ctx.jobs.let_go_of_warm(&seen.uid);
    Ok(())
}

/// Terminates the job's instance: only an id EC2 listed under this job's tag, one our own
/// launch returned, or the instance of the job's batch its status names, listed with the
/// batch's token it recorded. The status is writable by others and must not steer a
/// termination to another job's instance.
async fn terminate(ctx: &Context, seen: &Seen) -> Result<()> {
    // The job's by its tags, by this process's launch, or as the instance of the job's batch
    // that its status names.
    let batch = batch_instance(&seen.snapshot, &seen.status, &seen.uid);
    let warm = warm_instance(&seen.snapshot, &seen.pool_key, &seen.status)
        .filter(|i| seen.contested.as_ref() != Some(&i.id));
    let in_batch = seen
        .status
        .launch
        .as_ref()
        .is_some_and(|l| l.batch.is_some());
    let verified = |id: &String| {
        let claimed = (seen.snapshot.instances.get(&seen.uid)).is_some_and(|i| &i.id == id)
            || seen.launched.as_ref().is_some_and(|(mine, _)| mine == id)
            || batch.is_some_and(|i| &i.id == id)
            || warm.is_some_and(|i| &i.id == id);
        // The token the listing shows on it, else the one the job recorded.
        let token = (seen.snapshot.batched.get(id).and_then(token_of))
            .or_else(|| seen.status.launch.as_ref().map(|l| l.client_token.as_str()));
        claimed && !(in_batch && named_by_another(ctx, &seen.uid, id, token))
    };
    if let InstanceState::Alive { id } | InstanceState::Gone { id, .. } = &seen.facts.instance
        && verified(id)
        && (ctx.jobs.ledger)
            .terminate(ctx, id, seen.snapshot.taken, seen.limits.launch_visibility)
            .await?
    {
        info!(instance = %id, "terminated");
    }
    Ok(())
}

/// Records the decision in the status and writes it (only what changed), with the phase's
/// metrics and Event.
async fn record(job: &RunnerJob, ctx: &Context, mut seen: Seen, decision: Decision) -> Result<()> {
    let now = seen.now;
    let status = &mut seen.status;
    if let Some((reason, message)) = decision.reason {
        record_reason(status, reason, message, now);
    }
    let finishing = decision.phase.is_finished() && !status.phase.is_finished();
    let before = status.phase;
    let entered_before = entered_time(status).cloned();
    enter(status, decision.phase, now);
    let warm = (status.launch.as_ref()).is_some_and(|l| l.warm.is_some());
    observe_phase_metrics(
        ctx,
        job,
        (before, status.phase, warm),
        since(entered_before.as_ref(), now),
    );
    if status.phase.is_finished() {
        estimate_cost(ctx, job, status, now);
    }
    if let (InstanceState::Alive { id }, Some(listed)) =
        (&seen.facts.instance, seen.snapshot.instances.get(&seen.uid))
        && listed.id == *id
        && status.instance.as_ref().is_none_or(|i| &i.id != id)
    {
        // Adopted: launched before a crash, or seen before the status recorded it.
        status.instance = Some(instance_status(listed, None));
    }
    if !holds_slot(Some(status)) {
        release_slot(ctx, job);
    }
    status.observed_generation = job.metadata.generation;
    let cleared: &[&str] = match decision.step {
        Step::Requeue { .. } => &crate::domain::job::ATTEMPT_FIELDS,
        _ => &[],
    };
    // A warm instance it took that is left (EC2 lists it stopped) never runs again.
    if finishing {
        retire_warm(ctx, &seen).await?;
    }
    seen.write(job, ctx, cleared).await?;
    // A runner still registered on GitHub is removed once the job's end is recorded. During a
    // GitHub outage the job finishes anyway and frees its slot: the sweep removes the runner.
    if finishing {
        deregister(ctx, job, seen.pool.as_deref(), &seen.status).await;
    }
    let was = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if let Some(notice) = crate::domain::job::phase_notice(was, &seen.status) {
        let type_ = if notice.warning {
            kube::runtime::events::EventType::Warning
        } else {
            kube::runtime::events::EventType::Normal
        };
        ctx.event(job, type_, notice.reason, notice.note).await;
    }
    Ok(())
}

/// The boot, run and termination durations, observed as the job leaves each phase.
fn observe_phase_metrics(
    ctx: &Context,
    job: &RunnerJob,
    (from, to, warm): (JobPhase, JobPhase, bool),
    spent: Duration,
) {
    let histogram = match (from, to) {
        (JobPhase::Booting, JobPhase::Running) if warm => &ctx.metrics.warm_boot_duration,
        (JobPhase::Booting, JobPhase::Running) => &ctx.metrics.boot_duration,
        (JobPhase::Running, JobPhase::Completing) => &ctx.metrics.run_duration,
        (JobPhase::Completing, JobPhase::Succeeded | JobPhase::Failed) => {
            &ctx.metrics.terminate_duration
        }
        _ => return,
    };
    histogram
        .get_or_create(&pool_label(job))
        .observe(spent.as_secs_f64());
}

/// The run's estimated cost, once, as the job finishes.
fn estimate_cost(ctx: &Context, job: &RunnerJob, status: &mut RunnerJobStatus, now: Timestamp) {
    let launched = status
        .instance
        .as_ref()
        .and_then(|i| i.launch_time.as_ref());
    let ran = since(launched, now).as_secs();
    let Some(cost) = status.cost.as_mut().filter(|c| c.estimated_cost.is_none()) else {
        return;
    };
    let Some(hourly) = &cost.hourly_price else {
        return;
    };
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
        // A job waiting to launch launches; an ended instance or an idle runner is let go.
        let job = match status.phase {
            JobPhase::Pending => GitHubJob::Unknown,
            _ => GitHubJob::Elsewhere(crate::domain::job::NO_APP_TO_ASK.into()),
        };
        return Witness {
            job,
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
            let controller = &ctx.settings.controller_id;
            let pacers = |name: &str| crate::github::job_id_of_runner(controller, name).is_some();
            let runner = j.runner_name.as_deref();
            crate::domain::job::github_job(&j.status, j.runner_id, runner, ours, pacers)
        }
        // Before a launch, a job GitHub does not show (yet, or to this installation) launches.
        Ok(None) if status.phase == JobPhase::Pending => GitHubJob::Unknown,
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

impl Seen {
    /// Writes what this pass changed in the status (`cleared` fields removed) as a merge
    /// patch, on the condition that nobody else wrote the job since this pass read or last
    /// wrote it; nothing when it changed nothing, so a job that is only being watched costs
    /// the API server no writes. Fields the pass did not change are left to their writers.
    async fn write(&mut self, job: &RunnerJob, ctx: &Context, cleared: &[&str]) -> Result<()> {
        self.patch(job, ctx, cleared, false).await
    }

    /// [`Seen::write`], ahead of the client's queue: for a launch's record (or a warm
    /// instance's taking), which the EC2 call waits on (see [`super::lanes`]).
    async fn write_ahead(&mut self, job: &RunnerJob, ctx: &Context) -> Result<()> {
        self.patch(job, ctx, &[], true).await
    }

    async fn patch(
        &mut self,
        job: &RunnerJob,
        ctx: &Context,
        cleared: &[&str],
        ahead: bool,
    ) -> Result<()> {
        // A status is strings, numbers and maps with string keys: it always serializes.
        let json = |s: &RunnerJobStatus| serde_json::to_value(s).expect("a status serializes");
        let after = json(&self.status);
        let mut changes = super::merge_patch(&json(&self.written), &after);
        for field in cleared.iter().filter(|f| after.get(**f).is_none()) {
            let patch = changes.get_or_insert_with(|| serde_json::json!({}));
            patch[*field] = serde_json::Value::Null;
        }
        let Some(changes) = changes else {
            return Ok(());
        };
        let api: Api<RunnerJob> =
            Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": self.version},
            "status": changes,
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let mut request = kube::core::Request::new(api.resource_url())
            .patch_subresource("status", &job.name_any(), &params, &Patch::Merge(patch))
            .map_err(kube::Error::BuildRequest)?;
        request.extensions_mut().insert("patch_status");
        if ahead {
            request.extensions_mut().insert(super::lanes::Ahead);
        }
        let written: RunnerJob = ctx.client.request(request).await?;
        let version = written.metadata.resource_version.as_deref();
        (ctx.jobs.own_writes).wrote(&self.uid, self.version.as_deref(), version);
        self.version = written.metadata.resource_version;
        self.written = self.status.clone();
        Ok(())
    }
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

/// The attempt's launch: recorded in the status first (unless it is already), then sent. EC2's
/// answer is returned for the decision; an instance it gives is recorded in the status.
async fn launch(job: &RunnerJob, ctx: &Context, seen: &mut Seen) -> Result<LaunchAnswer> {
    let Some(pool) = seen.pool.clone() else {
        let why = format!("RunnerPool {} is gone", job.spec.pool_name);
        return Ok(LaunchAnswer::PoolNotReady(why));
    };
    let Some(template) = pool.status.as_ref().and_then(|s| s.launch_template.clone()) else {
        let why = format!("RunnerPool {} has no launch template yet", pool.name_any());
        return Ok(LaunchAnswer::PoolNotReady(why));
    };
    // A warm instance the job took, or one it takes now: started instead of a launch (unless a
    // batch went out with a place for this attempt that its record missed).
    let may_warm = match &seen.status.launch {
        Some(intent) => intent.warm.is_some(),
        None => (seen.snapshot.warm.get(&seen.pool_key)).is_some_and(|l| !l.is_empty()),
    };
    if may_warm
        && !has_batch_place(job, ctx, seen)
        && let Some(answer) = warm_start(job, ctx, seen, &pool, &template).await?
    {
        return Ok(answer);
    }
    let recorded = seen.status.launch.as_ref().map(|intent| {
        // A batch's instances carry the pool's tags and the batch's token, a job's its own.
        let tags = match intent.batch {
            Some(_) => launch::batch_tags(&pool_tags(job, &pool, ctx), &intent.client_token),
            None => job_tags(job, &pool, ctx),
        };
        launch::replay(intent, &pool.spec, &template, &tags, &seen.uid)
    });
    // Only a batch planned in this pass cannot have answered otherwise before: any other
    // member's answer is checked against the instances other jobs claim.
    let (request, fresh) = match recorded {
        Some(Ok(request)) => (request, false),
        // A launch that may have made an instance EC2 does not list yet is not replaced.
        Some(Err(why)) if seen.facts.launch_unsettled => {
            let why = format!("the recorded launch no longer fits the pool ({why})");
            return Ok(LaunchAnswer::Unanswered(why));
        }
        fresh => {
            if let Some(Err(why)) = fresh {
                warn!(
                    why,
                    "the recorded launch does not fit the pool; planning a new one"
                );
                // The new launch's visibility window starts now.
                seen.status.phase_times.launching = None;
            }
            match new_launch(job, ctx, seen, &pool, &template).await? {
                Ok(planned) => planned,
                Err(answer) => return Ok(answer),
            }
        }
    };
    send(job, ctx, seen, &pool, &request, fresh).await
}

/// Starts the warm instance the job took, or takes one of its pool's ready ones and starts
/// it: recorded in the status (the intent and the instance) before StartInstances, so that no
/// other job takes it and a pass after a restart starts the same one. `None` when the pool has
/// none ready, or EC2 cannot start it (no capacity for its type now, its state, no
/// permission): the job launches at once, as it would without a warm pool. A taken instance
/// let go of after a start may have run: it is terminated, never warm again.
async fn warm_start(
    job: &RunnerJob,
    ctx: &Context,
    seen: &mut Seen,
    pool: &RunnerPool,
    template: &crate::api::LaunchTemplateRef,
) -> Result<Option<LaunchAnswer>> {
    let recorded = (seen.status.launch.as_ref()).and_then(|l| l.warm.clone());
    let replay = recorded.is_some();
    // The status is writable by others: a recorded take is started again only when it names
    // a warm instance of the job's pool, as its instance, and no other live job names it.
    let listed = warm_instance(&seen.snapshot, &seen.pool_key, &seen.status)
        .filter(|i| seen.contested.as_ref() != Some(&i.id));
    if let Some(took) = &recorded
        && listed.is_none_or(|i| i.id != took.instance)
    {
        warn!(instance = %took.instance, "the recorded warm instance is not the pool's to start; launching instead");
        seen.status.launch = None;
        seen.status.instance = None;
        return Ok(None);
    }
    let Some(took) = recorded.or(take_warm(job, ctx, seen, pool, template).await?) else {
        return Ok(None);
    };
    let id = took.instance;
    let waited = since(job.metadata.creation_timestamp.as_ref(), Timestamp::now());
    match ctx.ec2().start_instances(std::slice::from_ref(&id)).await {
        Ok(()) => {
            let recorded = seen.status.instance.clone();
            let instance = Instance {
                id: id.clone(),
                instance_type: (recorded.as_ref())
                    .map_or(String::new(), |i| i.instance_type.clone()),
                zone: recorded.as_ref().map_or(String::new(), |i| i.zone.clone()),
                spot: false,
                state: "pending".into(),
                state_reason: None,
                // EC2 moves LaunchTime to the start: the job's instance runs from now.
                launch_time: Some(Timestamp::now().as_second()),
                tags: Default::default(),
            };
            info!(instance = %id, "started a warm instance for the job");
            let pool = pool_label(job);
            ctx.metrics.warm_starts.get_or_create(&pool).inc();
            (ctx.metrics.queue_duration.get_or_create(&pool)).observe(waited.as_secs_f64());
            launched(ctx, seen, instance, waited).await;
            Ok(Some(LaunchAnswer::Launched))
        }
        Err(e) if e.code == "Transport" => Ok(Some(LaunchAnswer::Unanswered(e.to_string()))),
        Err(e)
            if e.is(ErrorClass::InsufficientCapacity)
                || e.is(ErrorClass::IncorrectState)
                || e.is(ErrorClass::Unauthorized)
                || e.is(ErrorClass::NotFound) =>
        {
            warn!(instance = %id, error = %e, "the warm instance was not started; launching instead");
            if replay && !e.is(ErrorClass::NotFound) {
                // Started by an earlier process, perhaps, and stopped since: not clean.
                let settle = seen.limits.launch_visibility;
                (ctx.jobs.ledger)
                    .terminate(ctx, &id, seen.snapshot.taken, settle)
                    .await?;
            }
            ctx.jobs.let_go_of_warm(&seen.uid);
            seen.status.launch = None;
            seen.status.instance = None;
            let note = format!("warm instance {id} was not started ({e}); launching one instead");
            let warning = kube::runtime::events::EventType::Warning;
            ctx.event(job, warning, "WarmStartFailed", note).await;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Takes a ready warm instance of the job's pool ([`crate::domain::warm::take`]) and records
/// it in the job's status; `None` when there is none. Taken under one lock, so that no two
/// passes take the same.
async fn take_warm(
    job: &RunnerJob,
    ctx: &Context,
    seen: &mut Seen,
    pool: &RunnerPool,
    template: &crate::api::LaunchTemplateRef,
) -> Result<Option<crate::api::WarmStart>> {
    let Some(listed) = seen
        .snapshot
        .warm
        .get(&seen.pool_key)
        .filter(|l| !l.is_empty())
    else {
        return Ok(None);
    };
    let current = crate::cloud::tags::warm_value(&template.id, template.version);
    let ids = listed.iter().map(|i| i.id.as_str()).collect();
    let namespace = job.namespace().unwrap_or_default();
    let named = super::warm::named(ctx, &namespace, &pool.name_any(), &ids);
    let instance = {
        let mut taken = ctx.jobs.warm_taken.lock().unwrap();
        // This job's own take, from a pass whose record failed, is taken again first.
        let mine = |id: &str| taken.get(id) == Some(&seen.uid);
        let free = |id: &str| {
            mine(id)
                || !taken.contains_key(id)
                    && !named.claimed.contains(id)
                    && !named.used.contains(id)
        };
        let again = (listed.iter()).find(|i| mine(&i.id) && i.is_stopped());
        let chosen = again.or_else(|| crate::domain::warm::take(listed, &current, |id| !free(id)));
        let Some(instance) = chosen else {
            return Ok(None);
        };
        taken.insert(instance.id.clone(), seen.uid.clone());
        instance.clone()
    };
    let took = crate::api::WarmStart {
        instance: instance.id.clone(),
        taken_at: Time(Timestamp::now()),
    };
    seen.status.launch = Some(Box::new(launch::warm_intent(template, took.clone())));
    seen.status.instance = Some(instance_status(&instance, None));
    enter(&mut seen.status, JobPhase::Launching, Timestamp::now());
    // A write that failed may have landed (a timeout): the instance stays this job's, which
    // takes it again on its next pass, until the job lets go of it or goes. The start waits on
    // it, as a launch on its record.
    seen.write_ahead(job, ctx).await?;
    info!(instance = %instance.id, "took a warm instance");
    Ok(Some(took))
}

/// The job's name in a batch for its next launch: `uid/instance attempt/launch attempt`.
fn member_key(seen: &Seen) -> String {
    let (attempt, round) = (seen.status.attempt(), seen.status.attempts + 1);
    format!("{}/{attempt}/{round}", seen.uid)
}

/// Whether a batch went out with a place for the job's next launch that its record missed
/// (kept by this process, or recorded by the batch's other members): that place's instance is
/// the job's, and it takes no warm instance.
fn has_batch_place(job: &RunnerJob, ctx: &Context, seen: &Seen) -> bool {
    let member = member_key(seen);
    let batches = &ctx.jobs.batches;
    batches.has_kept(&member)
        || (job.metadata.creation_timestamp.as_ref()).is_some_and(|created| {
            let place = format!("{}/{member}", seen.pool_key);
            (batches.recorded_place(&place, created.0, || recorded_places(ctx))).is_some()
        })
}

/// A new launch for the job, recorded in its status before it goes out: the job's own, or a
/// batch's with the jobs of its pool that became launchable within the batch window. A batch
/// is sent once every member has recorded it (or failed to: a member whose record failed keeps
/// its place for its next pass; the instance of one that keeps none is nobody's, and the
/// garbage collector's).
async fn new_launch(
    job: &RunnerJob,
    ctx: &Context,
    seen: &mut Seen,
    pool: &RunnerPool,
    template: &crate::api::LaunchTemplateRef,
) -> Result<std::result::Result<(LaunchRequest, bool), LaunchAnswer>> {
    let settings = &ctx.settings;
    let (window, max) = (settings.launch_batch_window, settings.launch_batch_max);
    let batches = &ctx.jobs.batches;
    let member = member_key(seen);
    // A batch that went out without this job's record: its place in it, taken again; kept by
    // this process, or, after a restart, recorded by the batch's other members.
    let kept = batches.kept(&member).or_else(|| {
        let created = job.metadata.creation_timestamp.as_ref()?.0;
        let place = format!("{}/{member}", pool_key(job));
        let intent = batches.take_recorded_place(&place, created, || recorded_places(ctx))?;
        let tags = launch::batch_tags(&pool_tags(job, pool, ctx), &intent.client_token);
        let request = launch::replay(&intent, &pool.spec, template, &tags, &seen.uid).ok()?;
        info!(token = %intent.client_token, "taking the place its batch's other members recorded");
        Some((intent, request))
    });
    let mut joined = None;
    if kept.is_none() && !window.is_zero() && max > 1 {
        let pool = pool_key(job);
        joined = Some(
            batches
                .join(&pool, member.clone(), window, max as usize)
                .await,
        );
    }
    let fresh = kept.is_none();
    let planned = match (kept, joined.as_ref().filter(|j| j.members.len() > 1)) {
        (Some(kept), _) => Some(kept),
        (None, None) => plan(job, ctx, pool, template, &seen.status)
            .await?
            .map(|request| (launch::intent(&request), request)),
        (None, Some(j)) => (j.plan(plan_batch(ctx, job, pool, template, &j.members, j.nonce())))
            .await?
            .map(|request| {
                let intent = launch::batch_intent(&request, &j.members, j.member, j.nonce());
                (intent, request)
            }),
    };
    let Some((intent, request)) = planned else {
        let why = "no offering of the pool has capacity now".to_string();
        return Ok(Err(LaunchAnswer::NoCapacity { left: false, why }));
    };
    // The record comes first: whatever happens next, a later pass sends this again. The
    // launch's visibility window starts as it is recorded, past the batch's window.
    seen.status.launch = Some(Box::new(intent.clone()));
    enter(&mut seen.status, JobPhase::Launching, Timestamp::now());
    let written = seen.write_ahead(job, ctx).await;
    if let Some(j) = joined.as_mut().filter(|j| j.members.len() > 1) {
        j.recorded();
        if written.is_ok() {
            j.all_recorded().await;
        }
    }
    // A batch's place sent (or taken again) without this record: kept for the next pass.
    if written.is_err() && intent.batch.is_some() {
        batches.keep(&member, &intent, &request);
    }
    written?;
    Ok(Ok((request, fresh)))
}

/// Every place in the batches that live jobs of the cache record (see
/// [`super::batch::places_of`]): only a record of the job's own place counts, and only a job of
/// the same pool names the places a member may take.
fn recorded_places(ctx: &Context) -> super::batch::RecordedPlaces {
    let Some(store) = ctx.jobs.store() else {
        return HashMap::new();
    };
    let mut records = Vec::new();
    for job in store.state() {
        let (Some(uid), Some(status)) = (job.metadata.uid.as_deref(), job.status.as_ref()) else {
            continue;
        };
        let Some(intent) = status
            .launch
            .as_ref()
            .filter(|_| !status.phase.is_finished())
        else {
            continue;
        };
        if intent.batch.is_none() || launch::batch_place_of(intent, uid).is_err() {
            continue;
        }
        let at = status.phase_times.launching.as_ref().map(|t| t.0);
        records.push((pool_key(&job), (**intent).clone(), at));
    }
    super::batch::places_of(records)
}

/// The tags of every instance of the pool: the user's and Pacer's.
fn pool_tags(job: &RunnerJob, pool: &RunnerPool, ctx: &Context) -> BTreeMap<String, String> {
    let ns = job.namespace().unwrap_or_default();
    let pool_identity = PoolIdentity {
        controller_id: &ctx.settings.controller_id,
        namespace: &ns,
        name: &pool.name_any(),
    };
    pool_identity.instance_tags(&pool.spec)
}

/// The tags of the job's instance: the pool's and the job's.
fn job_tags(job: &RunnerJob, pool: &RunnerPool, ctx: &Context) -> BTreeMap<String, String> {
    let ns = job.namespace().unwrap_or_default();
    launch::instance_tags(
        &pool_tags(job, pool, ctx),
        &JobIdentity {
            namespace: &ns,
            name: &job.name_any(),
            uid: &job.uid().unwrap_or_default(),
            job_id: job.spec.job_id,
            repository: &job.spec.repository,
        },
    )
}

/// A new launch for the job alone, under a token of its job and attempt.
async fn plan(
    job: &RunnerJob,
    ctx: &Context,
    pool: &RunnerPool,
    template: &crate::api::LaunchTemplateRef,
    status: &RunnerJobStatus,
) -> Result<Option<LaunchRequest>> {
    let tags = job_tags(job, pool, ctx);
    let Some(mut request) = offer(ctx, pool, template, tags).await? else {
        return Ok(None);
    };
    let uid = job.uid().unwrap_or_default();
    let params = request.parameters();
    request.client_token = Some(launch::client_token(
        &uid,
        status.attempt(),
        status.attempts + 1,
        &params,
    ));
    Ok(Some(request))
}

/// A new launch of one instance per member of a batch, tagged with the pool's tags and the
/// batch's token.
async fn plan_batch(
    ctx: &Context,
    job: &RunnerJob,
    pool: &RunnerPool,
    template: &crate::api::LaunchTemplateRef,
    members: &[String],
    nonce: &[u8],
) -> Result<Option<LaunchRequest>> {
    let tags = pool_tags(job, pool, ctx);
    let Some(mut request) = offer(ctx, pool, template, tags.clone()).await? else {
        return Ok(None);
    };
    request.count = members.len() as u32;
    let token = launch::batch_token(members, &request.parameters(), nonce);
    request.tags = launch::batch_tags(&tags, &token);
    request.client_token = Some(token);
    Ok(Some(request))
}

/// One instance of the offerings EC2 has not recently refused (the cheapest zone first for a
/// single-offering spot launch), in the first one's market, without a token yet.
pub(super) async fn offer(
    ctx: &Context,
    pool: &RunnerPool,
    template: &crate::api::LaunchTemplateRef,
    tags: BTreeMap<String, String>,
) -> Result<Option<LaunchRequest>> {
    let zones = zones(ctx, &pool.spec.subnets).await?;
    let fleet = pool.spec.spawn_method == crate::api::SpawnMethod::Fleet;
    let mut offerings = {
        let capacity = ctx.jobs.capacity.lock().unwrap();
        let spot_paused = on_demand_until(ctx, pool).is_some();
        launch::offerings(&pool.spec, &zones, &capacity, Instant::now(), spot_paused)
    };
    if !fleet {
        cheapest_zone_first(ctx, &mut offerings).await;
    }
    let Some(market) = offerings.first().map(|o| o.market) else {
        return Ok(None);
    };
    Ok(Some(LaunchRequest {
        launch_template_id: template.id.clone(),
        version: template.version,
        offerings: (offerings.iter())
            .filter(|o| o.market == market)
            .take(if fleet { usize::MAX } else { 1 })
            .map(|o| (o.instance_type.clone(), o.subnet.clone()))
            .collect(),
        spot: market == Market::Spot,
        fleet,
        tags,
        allocation_strategy: fleet
            .then(|| launch::allocation_strategy(&pool.spec.capacity, market).to_string()),
        client_token: None,
        count: 1,
    }))
}

/// Sends the launch and reads EC2's answer: capacity refusals are remembered, an instance is
/// recorded in the status.
async fn send(
    job: &RunnerJob,
    ctx: &Context,
    seen: &mut Seen,
    pool: &RunnerPool,
    request: &LaunchRequest,
    fresh: bool,
) -> Result<LaunchAnswer> {
    let uid = seen.uid.clone();
    let ledger = &ctx.jobs.ledger;
    ledger.launch_sent(&uid, Timestamp::now());
    let waited = since(job.metadata.creation_timestamp.as_ref(), Timestamp::now());
    ctx.metrics
        .queue_duration
        .get_or_create(&pool_label(job))
        .observe(waited.as_secs_f64());
    let answer = match request.count {
        0 | 1 => ctx.ec2().launch(request).await,
        _ => ctx.jobs.batches.send(ctx.ec2(), request).await,
    };
    let zones = zones(ctx, &pool.spec.subnets).await?;
    let outcome = match answer {
        Ok(outcome) => outcome,
        // No answer (a transport failure): EC2 may have launched. The same request, sent
        // again under the same token, finds out.
        Err(e) if e.code == "Transport" => return Ok(LaunchAnswer::Unanswered(e.to_string())),
        Err(e) => return refused(ctx, seen, pool, request, &zones, e),
    };
    let short = (outcome.failures.iter()).filter(|f| f.error.is(ErrorClass::InsufficientCapacity));
    let mut marked = false;
    for failure in short {
        let offering = (failure.instance_type.as_deref(), failure.subnet.as_deref());
        mark_offerings(ctx, request, &zones, offering, &failure.error.to_string());
        marked = true;
    }
    let member = seen
        .status
        .launch
        .as_ref()
        .and_then(|l| l.batch.as_ref())
        .map(|b| b.member);
    let mine = match member {
        None => outcome.instances.first(),
        Some(member) => launch::member_instance(&outcome.instances, member),
    };
    // A replay answered otherwise than the first time gives no member another's instance.
    let replayed = member.is_some() && !fresh;
    let token = &request.client_token;
    let mine =
        mine.filter(|i| !replayed || !named_by_another(ctx, &seen.uid, &i.id, token.as_deref()));
    let Some(mut instance) = mine.cloned() else {
        ledger.launch_refused(&uid, request.client_token.as_deref().unwrap_or_default());
        let why = match (outcome.failures.first(), member) {
            (_, Some(member)) if !outcome.instances.is_empty() => format!(
                "EC2 launched {} of the batch's {} instances, none for member {member}",
                outcome.instances.len(),
                request.count
            ),
            (Some(f), _) => format!("EC2 launched nothing: {}", f.error),
            (None, _) => "EC2 launched nothing for the offerings asked".to_string(),
        };
        // Only a refusal that marked offerings leaves others to try at once; a batch EC2
        // filled in part (RunInstances launches what it can up to its MaxCount, and says
        // nothing of the rest) marks its offering, and its members left over go into the next
        // batch. Anything else is a round, and the next one waits its backoff.
        let part = member.is_some() && !outcome.instances.is_empty();
        if part
            && !marked
            && let Some((t, subnet)) = request.offerings.first()
        {
            // Filled in part without a word why: the offering is short for now.
            let offering = (Some(t.as_str()), Some(subnet.as_str()));
            let why = format!(
                "EC2 launched {} of {}",
                outcome.instances.len(),
                request.count
            );
            mark_offerings(ctx, request, &zones, offering, &why);
            marked = true;
        }
        let left = marked && offerings_left(ctx, pool, &zones);
        return Ok(LaunchAnswer::NoCapacity { left, why });
    };
    if instance.zone.is_empty() {
        instance.zone = zone_of(request, &zones, &instance.instance_type);
    }
    launched(ctx, seen, instance, waited).await;
    Ok(LaunchAnswer::Launched)
}

/// The zone of the subnet a launch offered `instance_type` in: CreateFleet does not always say.
fn zone_of(
    request: &LaunchRequest,
    zones: &BTreeMap<String, String>,
    instance_type: &str,
) -> String {
    let subnet = (request.offerings.iter())
        .find(|(t, _)| t == instance_type)
        .map(|(_, s)| s.as_str())
        .unwrap_or_default();
    zones.get(subnet).cloned().unwrap_or_default()
}

/// Records the instance a launch made: in the ledger, the metrics and the job's status.
async fn launched(
    ctx: &Context,
    seen: &mut Seen,
    instance: crate::cloud::Instance,
    waited: Duration,
) {
    ctx.jobs
        .ledger
        .launch_answered(&seen.uid, Some(&instance), Timestamp::now());
    seen.launched = Some((instance.id.clone(), Timestamp::now()));
    info!(instance = %instance.id, instance_type = %instance.instance_type, zone = %instance.zone, attempt = seen.status.attempt(), "launched");
    ctx.metrics.launch_latency.observe(waited.as_secs_f64());
    let status = &mut seen.status;
    status.attempts += 1;
    status.cost = cost_snapshot(ctx, &instance).await.map(Box::new);
    status.instance = Some(instance_status(&instance, Some(seen.now)));
    status.last_error = None;
    status.next_attempt_at = None;
    seen.facts.instance = InstanceState::Alive { id: instance.id };
}

/// What a launch EC2 refused means for the job. A definite no is remembered against the
/// launch's token; errors that say nothing of the launch (throttling, EC2 failing) are the
/// pass's error, retried with backoff, and the recorded launch is sent again.
fn refused(
    ctx: &Context,
    seen: &mut Seen,
    pool: &RunnerPool,
    request: &LaunchRequest,
    zones: &BTreeMap<String, String>,
    e: crate::cloud::CloudError,
) -> Result<LaunchAnswer> {
    let answer = if e.is(ErrorClass::InsufficientCapacity) {
        // A refusal of the whole request: its first offering is the one EC2 tried.
        if let Some((t, subnet)) = request.offerings.first() {
            let offering = (Some(t.as_str()), Some(subnet.as_str()));
            mark_offerings(ctx, request, zones, offering, &e.to_string());
        }
        let left = offerings_left(ctx, pool, zones);
        LaunchAnswer::NoCapacity {
            left,
            why: e.to_string(),
        }
    } else if e.is(ErrorClass::NotFound) && e.code.starts_with("InvalidLaunchTemplate") {
        // The pool's template was deleted behind our back: the job's new reason wakes the
        // pool, told to check EC2 afresh, which recreates it; the job waits for that.
        let ns = pool.namespace().unwrap_or_default();
        let identity = PoolIdentity {
            controller_id: &ctx.settings.controller_id,
            namespace: &ns,
            name: &pool.name_any(),
        };
        ctx.forget_pool_check(&identity.key());
        LaunchAnswer::TemplateMissing(e.to_string())
    } else if e.code == "IdempotentInstanceTerminated" {
        // The launch was made, and an instance it made is terminated: EC2 no longer answers
        // it. The job launches anew (a batch member in the next batch, under a new token; a
        // job alone in a new round, so under a new token too); an instance of the batch that
        // was its own is nobody's, and the garbage collector's.
        if request.count <= 1 {
            seen.status.attempts += 1;
        }
        LaunchAnswer::NoCapacity {
            left: true,
            why: format!("the recorded launch can no longer be answered: {e}"),
        }
    } else if matches!(
        e.class,
        ErrorClass::InvalidInput | ErrorClass::NotFound | ErrorClass::Unauthorized
    ) {
        seen.status.attempts += 1;
        LaunchAnswer::Refused(e.to_string())
    } else {
        ctx.jobs
            .ledger
            .launch_answered(&seen.uid, None, Timestamp::now());
        return Err(e.into());
    };
    let token = request.client_token.as_deref().unwrap_or_default();
    ctx.jobs.ledger.launch_refused(&seen.uid, token);
    Ok(answer)
}

/// Whether any offering of the pool is left that EC2 has not recently refused.
fn offerings_left(ctx: &Context, pool: &RunnerPool, zones: &BTreeMap<String, String>) -> bool {
    let spot_paused = on_demand_until(ctx, pool).is_some();
    let capacity = ctx.jobs.capacity.lock().unwrap();
    !launch::offerings(&pool.spec, zones, &capacity, Instant::now(), spot_paused).is_empty()
}

/// Until when the pool launches on-demand for the spot interruption notices its RunnerJobs
/// recorded (see `launch::on_demand_until`); `None` while its breaker is closed.
pub(super) fn on_demand_until(ctx: &Context, pool: &RunnerPool) -> Option<Timestamp> {
    let capacity = &pool.spec.capacity;
    let breaker_on = capacity.capacity_type == crate::api::CapacityType::Spot
        && capacity.fallback_to_on_demand
        && capacity.interruption_breaker.notices > 0;
    if !breaker_on {
        return None;
    }
    let store = ctx.jobs.store()?;
    let (ns, name) = (pool.namespace(), pool.name_any());
    let notices = (store.state().iter())
        .filter(|j| j.namespace() == ns && j.spec.pool_name == name)
        .flat_map(|j| {
            let status = j.status.as_ref();
            status.map(|s| crate::domain::job::spot_notices(s).collect::<Vec<_>>())
        })
        .flatten()
        .collect();
    launch::on_demand_until(&pool.spec, notices, Timestamp::now())
}

/// Marks the request's offerings of `instance_type` in `subnet` short of capacity; any type,
/// or any subnet, when the refusal does not say (fleet errors may not name the subnet).
fn mark_offerings(
    ctx: &Context,
    request: &LaunchRequest,
    zones: &BTreeMap<String, String>,
    (instance_type, subnet): (Option<&str>, Option<&str>),
    why: &str,
) {
    let market = if request.spot {
        Market::Spot
    } else {
        Market::OnDemand
    };
    let named = |name: Option<&str>, x: &str| name.is_none_or(|n| n == x);
    for (t, s) in &request.offerings {
        if named(instance_type, t) && named(subnet, s) {
            let zone = zones.get(s).map(String::as_str).unwrap_or_default();
            mark(ctx, market, t, zone, why);
        }
    }
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

/// The EBS price per GB-month of a volume type, cached as on-demand prices are.
pub(super) async fn volume_price(ctx: &Context, volume_type: &str) -> Option<String> {
    cached_price(
        ctx,
        format!("volume/{volume_type}"),
        ON_DEMAND_TTL,
        &ctx.jobs.warned_on_demand,
        "pricing:GetProducts",
        ctx.ec2().volume_price(volume_type),
    )
    .await
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(phase: &str) -> RunnerJob {
        serde_json::from_value(json!({
            "apiVersion": "pacer.dev/v1alpha1",
            "kind": "RunnerJob",
            "metadata": {
                "name": "job-1",
                "namespace": "ci",
                "uid": "0000-1",
                "resourceVersion": "42",
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "finalizers": [FINALIZER],
                "labels": {"team": "api"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "team": "api",
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                    "name": "owner", "uid": "0000-2"}],
                "managedFields": [{"manager": "pacer", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}}}],
            },
            "spec": {"poolName": "linux", "jobId": 7, "runId": 3,
                "repository": "example-org/api", "labels": ["self-hosted"],
                "installationId": 5},
            "status": {
                "phase": phase,
                "attempts": 1,
                "launch": {"clientToken": "pacer-1", "launchTemplateId": "lt-1",
                    "launchTemplateVersion": 1, "market": "spot", "offerings": [], "tags": {}},
                "instance": {"id": "i-1", "type": "m7i.large", "zone": "us-east-1a",
                    "market": "spot", "launchTime": "2026-01-01T00:01:00Z"},
                "runner": {"id": 9, "name": "pacer-ctl-7-1"},
                "cost": {"hourlyPrice": "0.04", "currency": "USD"},
                "boot": {"instanceId": "i-1", "bootstrappedAt": "2026-01-01T00:02:00Z",
                    "tokenSha256": "ab", "runner": {"id": 9, "name": "pacer-ctl-7-1"},
                    "runnerVersion": "2.330.0"},
                "phaseTimes": {"pending": "2026-01-01T00:00:00Z",
                    "finished": "2026-01-01T00:09:00Z"},
                "conditions": [{"type": "Launched", "status": "True",
                    "lastTransitionTime": "2026-01-01T00:01:00Z", "reason": "Launched",
                    "message": "i-1"}],
                "lastError": {"reason": "SpotInterrupted", "message": "reclaimed"},
                "completion": {"result": "success", "reportedAt": "2026-01-01T00:08:00Z"},
                "assignedJob": {"jobId": 7, "runId": 3, "repository": "example-org/api"},
                "interruption": {"kind": "spot-interruption",
                    "reportedAt": "2026-01-01T00:07:00Z"},
                "nextAttemptAt": "2026-01-01T00:00:30Z",
                "previousAttempts": [{"instance": "i-0", "reason": "SpotInterrupted",
                    "message": "reclaimed", "time": "2026-01-01T00:00:50Z"}],
                "observedGeneration": 1,
            },
        }))
        .unwrap()
    }

    /// `job` as the cache keeps any RunnerJob: without what `slim` drops from every job.
    fn slimmed_everywhere(mut job: RunnerJob) -> RunnerJob {
        job.metadata.managed_fields = None;
        job.metadata.labels = None;
        job.metadata.annotations = None;
        job.metadata.owner_references = None;
        job.spec.labels = Vec::new();
        job
    }

    #[test]
    fn a_version_this_process_wrote_over_is_behind_until_a_later_one_is_seen() {
        let writes = OwnWrites::default();
        // The finalizer over 1, then the status over 2 and over 3.
        for (replaced, written) in [("1", "2"), ("2", "3"), ("3", "4")] {
            writes.wrote("a", Some(replaced), Some(written));
        }
        writes.wrote("b", None, Some("1"));
        // A write that left the version as it was replaced nothing.
        writes.wrote("d", Some("7"), Some("7"));
        for replaced in ["1", "2", "3"] {
            assert!(writes.behind("a", Some(replaced)), "{replaced}");
        }
        // Another job's versions, and writes that named none or replaced none, hold nothing
        // back.
        for job in ["b", "c", "d"] {
            assert!(!writes.behind(job, Some("1")), "{job}");
        }
        assert!(!writes.behind("d", Some("7")));
        // The cache shows the last write: from then on nothing is held back, and the entry is
        // gone.
        assert!(!writes.behind("a", Some("4")));
        assert!(!writes.behind("a", Some("3")));
        assert!(writes.0.lock().unwrap().is_empty());
        writes.wrote("a", Some("4"), Some("5"));
        writes.forget("a");
        assert!(!writes.behind("a", Some("4")));
        // Held back no longer than OWN_WRITES_KEPT after the last write.
        writes.wrote("a", Some("5"), Some("6"));
        assert!(writes.behind("a", Some("5")));
        let long_ago = Instant::now().checked_sub(OWN_WRITES_KEPT + Duration::from_secs(1));
        writes.0.lock().unwrap().get_mut("a").unwrap().0 = long_ago.unwrap();
        assert!(!writes.behind("a", Some("5")));
    }

    #[test]
    fn a_slimmed_job_loses_what_no_pass_reads_and_keeps_the_rest() {
        // A live job loses only its metadata's labels, annotations, owner references and
        // managed fields and its spec's labels: what passes read of it is all there.
        for phase in ["Pending", "Launching", "Booting", "Running", "Completing"] {
            let mut live = job(phase);
            slim(&mut live);
            assert_eq!(
                serde_json::to_value(&live).unwrap(),
                serde_json::to_value(slimmed_everywhere(job(phase))).unwrap(),
                "a {phase} job keeps its whole status"
            );
            let meta = &live.metadata;
            assert_eq!(
                (meta.uid.as_deref(), meta.resource_version.as_deref()),
                (Some("0000-1"), Some("42"))
            );
            assert_eq!(live.finalizers(), [FINALIZER]);
            assert_eq!(
                (meta.generation, meta.creation_timestamp.is_some()),
                (Some(1), true)
            );
            assert_eq!(live.spec.installation_id, Some(5));
        }

        for phase in ["Succeeded", "Failed"] {
            let mut finished = job(phase);
            slim(&mut finished);
            let status = finished.status.clone().unwrap();
            // Dropped: the settled launch, the prices, the workflow job taken, and the boot,
            // whose runner registered.
            assert_eq!((status.launch, status.cost), (None, None));
            assert_eq!((status.assigned_job, status.boot), (None, None));
            // Kept, with everything else: what the pass, the breaker, the finalizer and the
            // TTL read.
            let mut expected = slimmed_everywhere(job(phase));
            let kept = expected.status.as_mut().unwrap();
            (kept.launch, kept.cost, kept.assigned_job, kept.boot) = (None, None, None, None);
            assert_eq!(
                serde_json::to_value(&finished).unwrap(),
                serde_json::to_value(&expected).unwrap(),
                "a {phase} job keeps the rest of its status"
            );
            let status = finished.status.unwrap();
            assert_eq!(status.current_runner().map(|r| r.id), Some(9));
            assert_eq!(status.instance.unwrap().id, "i-1");
            assert_eq!(status.previous_attempts.len(), 1);
            assert!(status.interruption.is_some() && status.completion.is_some());
        }

        // A finished job whose runner never registered keeps its boot, the runner's only
        // record, for the runner's removal from GitHub.
        let mut unregistered = job("Failed");
        unregistered.status.as_mut().unwrap().runner = None;
        slim(&mut unregistered);
        let status = unregistered.status.unwrap();
        assert_eq!(status.current_runner().map(|r| r.id), Some(9));
        assert!(status.boot.is_some());

        // A finished job without an instance keeps its launch: EC2 may still show one for it.
        let mut no_instance = job("Failed");
        no_instance.status.as_mut().unwrap().instance = None;
        slim(&mut no_instance);
        let status = no_instance.status.unwrap();
        assert!(status.launch.is_some() && status.cost.is_some());
    }
}
