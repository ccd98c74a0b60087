//! The RunnerJob phase machine: from what the cluster, EC2 and the runner report, and the time,
//! decide the next phase and the one step that gets there. Pure; the reconciler carries it out.
//!
//! ```text
//! Pending ──launch──► Launching ──instance seen──► Booting ──registered──► Running
//! Running ──completed──► Completing ──terminated──► Succeeded | Failed
//! any ──boot timeout / max runtime / instance gone / cancelled / deleted──► Completing or Failed
//! Launching | Booting | Running, no job taken ──instance ended, GitHub: still queued──► Pending
//! ```
//!
//! GitHub is the witness: before a registered runner is ended for anything but its own
//! completion, or a job whose instance ended is given up or tried again, the decision asks for
//! what GitHub says about the job and the runner ([`Step::Consult`]) and is made again with it.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::api::{BootStatus, JobPhase, RunnerJob, RunnerJobStatus, RunnerPool};

/// What EC2 says about the instance tagged with this job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// No instance carries the job's tag.
    Absent,
    /// Pending or running.
    Alive { id: String },
    /// Stopping, stopped, shutting down or terminated, with EC2's state reason.
    Gone { id: String, reason: String },
}

/// The job's instance as the shared EC2 listing shows it.
#[derive(Clone, Copy, Debug)]
pub struct Listed<'a> {
    pub id: &'a str,
    pub alive: bool,
    /// EC2's state reason, or the state when it gives none.
    pub reason: &'a str,
}

/// What EC2 says about the job's instance. `listed` is the instance tagged with the job in
/// the listing taken at `listed_at`; `known` the id this process launched or the status
/// recorded, whose launch was answered at `answered`. DescribeInstances lags launches: an
/// instance known but not listed is gone only from a listing taken at least `visibility` after
/// the answer.
pub fn instance_state(
    listed: Option<Listed<'_>>,
    known: Option<&str>,
    answered: Option<Timestamp>,
    listed_at: Timestamp,
    visibility: Duration,
) -> InstanceState {
    let settled = answered.is_none_or(|at| listed_at >= at + visibility);
    match (listed, known) {
        (Some(i), _) if i.alive => InstanceState::Alive { id: i.id.into() },
        (Some(i), _) => InstanceState::Gone {
            id: i.id.into(),
            reason: i.reason.into(),
        },
        (None, Some(id)) if !settled => InstanceState::Alive { id: id.into() },
        (None, Some(id)) => InstanceState::Gone {
            id: id.into(),
            reason: "EC2 no longer lists it".into(),
        },
        (None, None) => InstanceState::Absent,
    }
}

/// How the job ended, as the runner's callback or GitHub's webhook reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Cancelled on GitHub, before or while it ran.
    Cancelled,
}

/// What GitHub said about the workflow job, asked by its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitHubJob {
    /// Still waiting for a runner.
    Queued,
    /// This RunnerJob's runner took it (in progress or done).
    Ours,
    /// Taken by another runner, or over without one: what GitHub says, for a human.
    Elsewhere(String),
    /// GitHub could not be asked (an outage, a rate limit).
    Unknown,
}

/// What [`GitHubJob::Elsewhere`] says when there is no GitHub App to ask: an ended instance or
/// an idle runner is then let go.
pub const NO_APP_TO_ASK: &str = "no GitHub App is configured to ask";

/// How GitHub's report of a workflow job reads for the RunnerJob whose runner is `ours`:
/// still waiting for a runner, taken by ours, or taken elsewhere or over.
///
/// A job another of Pacer's runners took reads as queued: GitHub gives a queued job to any
/// runner whose labels fit, so that runner's own job is the one still waiting, and this
/// RunnerJob's instance is what it needs. `pacers` says whether a runner name is one of them.
pub fn github_job(
    status: &str,
    runner_id: Option<i64>,
    runner_name: Option<&str>,
    ours: Option<i64>,
    pacers: impl Fn(&str) -> bool,
) -> GitHubJob {
    let taken_by_ours = ours.is_some() && runner_id == ours;
    let swapped = status == "in_progress" && runner_name.is_some_and(&pacers);
    match status {
        _ if taken_by_ours => GitHubJob::Ours,
        // Not yet given to a runner (`waiting`: held for an environment's approval).
        "queued" | "waiting" | "pending" | "requested" => GitHubJob::Queued,
        _ if swapped => GitHubJob::Queued,
        _ => GitHubJob::Elsewhere(match runner_name.filter(|n| !n.is_empty()) {
            Some(runner) => format!("GitHub reports it {status}, taken by runner {runner}"),
            None => format!("GitHub reports it {status} with no runner"),
        }),
    }
}

/// GitHub's answer when the decision asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    pub job: GitHubJob,
    /// Whether the job's runner is running a job now; `None` when GitHub could not say.
    pub runner_busy: Option<bool>,
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Facts {
    pub phase: JobPhase,
    /// Time spent in the current phase.
    pub in_phase: Duration,
    pub instance: InstanceState,
    /// Whether the runner registered with GitHub.
    pub registered: bool,
    /// Whether GitHub says the runner took a job (`in_progress`).
    pub assigned: bool,
    pub outcome: Option<Outcome>,
    /// The RunnerJob is being deleted.
    pub deleting: bool,
    /// A launch call for the job went out and its answer is not in: EC2 may have launched an
    /// instance it does not list yet.
    pub launch_unsettled: bool,
    /// Whether the job's pool may launch for it now.
    pub pool: PoolAdmission,
    /// Time left before a capacity retry is due; zero when none is pending.
    pub backoff_left: Duration,
    /// Which instance this is for the job: 1, then 2 after one was replaced, ...
    pub attempt: u32,
    /// The boot script reported a failure.
    pub boot_failed: bool,
    /// The instance reported a spot interruption notice.
    pub interrupted: bool,
    /// What GitHub says, when this pass asked ([`Step::Consult`]).
    pub witness: Option<Witness>,
    /// GitHub's listing of the repository's queued jobs, read by the sweep, no longer shows
    /// the job: it may have been taken elsewhere or cancelled while it waited.
    pub doubted: bool,
    /// EC2's answer, when this pass sent the recorded launch ([`Step::Launch`]).
    pub launch: Option<LaunchAnswer>,
    /// Rounds of launches that found no capacity for any offering, so far.
    pub launch_rounds: i32,
    /// The job ended `InterruptedWhileRunning` and no re-run was asked for yet.
    pub rerun_due: bool,
    /// GitHub's answer, when this pass asked it to re-run the job ([`Step::Rerun`]).
    pub rerun: Option<RerunAnswer>,
    /// A listing of the job's warm instance was set aside as possibly older than its start
    /// ([`crate::domain::warm::taken_listing`]): one taken this much later counts, so no wait
    /// goes past it.
    pub set_aside: Option<Duration>,
}

/// How GitHub answered a request to re-run a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RerunAnswer {
    /// A new attempt of the job is queued (GitHub's 201).
    Requested,
    /// Not now: the workflow run has not completed yet, or GitHub is unavailable.
    NotYet,
    /// Never: GitHub refused for good (no permission, no such job); its words.
    Refused(String),
}

/// How EC2 answered a launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchAnswer {
    /// An instance: the facts show it alive.
    Launched,
    /// No capacity for what was asked (recorded, so it is skipped for a while); whether
    /// another offering of the pool is left to try now.
    NoCapacity { left: bool, why: String },
    /// EC2 says the pool's launch template is gone; the pool recreates it.
    TemplateMissing(String),
    /// Nothing to launch from: the pool is gone or has no launch template yet.
    PoolNotReady(String),
    /// Refused for good: invalid parameters, a missing resource, no permission.
    Refused(String),
    /// No answer, throttled, or EC2 failing: the launch may or may not have happened.
    Unanswered(String),
}

/// What the job's pool says to a launch for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolAdmission {
    /// Ready at its current generation, and a runner slot is reserved for this job.
    Admitted,
    /// Ready, but `maxRunners` runners are running or launching.
    Full,
    /// No such RunnerPool.
    Missing,
    /// The pool is being deleted: it launches nothing more.
    Deleting,
    /// The pool's launch template does not (yet) match its spec: why, for a human.
    NotReady(String),
}

/// Timeouts from the pool and the controller's settings.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub boot_timeout: Duration,
    pub max_runtime: Duration,
    pub ttl_after_finished: Duration,
    /// How long a launch may go unseen in EC2's (eventually consistent) answers.
    pub launch_visibility: Duration,
    /// How long a registered runner may wait for a job: GitHub gives a queued job to any
    /// runner whose labels fit, so the demand that launched this one may have gone elsewhere.
    pub idle_grace: Duration,
    /// How often a job waiting for room in its pool looks again. A job of the pool that
    /// finishes wakes the waiting ones sooner; this catches what that misses (a runner
    /// deleted before it finished).
    pub capacity_recheck: Duration,
    /// Instances a job may go through while its GitHub job stays queued.
    pub max_attempts: u32,
    /// How long a job waits for a pool that does not exist or is being deleted.
    pub pool_gone_deadline: Duration,
    /// A job that waited this long before its launch asks GitHub first whether it is still
    /// queued: while it waited (for room, capacity, a Ready pool) another runner may have
    /// taken it, or it was cancelled. A job launched at once rests on its fresh webhook.
    pub queue_recheck: Duration,
    /// Rounds without capacity before a job fails with `InsufficientCapacity`.
    pub max_launch_rounds: i32,
    /// The unit of retry backoff: 5 s in production, shorter in tests.
    pub backoff_unit: Duration,
    /// Ask GitHub to re-run a job lost to a spot interruption after its runner took it
    /// (`spec.rerunInterrupted`).
    pub rerun_interrupted: bool,
    /// How often such a job asks again while its workflow run is still going.
    pub rerun_retry: Duration,
    /// How often finished jobs near the end of their TTL are looked for ([`keeps_timer`]).
    pub expiry_scan: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            boot_timeout: Duration::from_secs(10 * 60),
            max_runtime: Duration::from_secs(6 * 3600),
            ttl_after_finished: Duration::from_secs(3600),
            launch_visibility: Duration::from_secs(60),
            idle_grace: Duration::from_secs(10 * 60),
            capacity_recheck: POLL,
            max_attempts: 3,
            pool_gone_deadline: Duration::from_secs(15 * 60),
            queue_recheck: Duration::from_secs(60),
            max_launch_rounds: super::launch::MAX_ATTEMPTS,
            backoff_unit: Duration::from_secs(5),
            rerun_interrupted: false,
            rerun_retry: Duration::from_secs(60),
            expiry_scan: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// These limits, with the pool's own where its spec sets them.
    pub fn for_pool(self, spec: &crate::api::RunnerPoolSpec) -> Self {
        let secs = |n: i32| Duration::from_secs(n.max(0) as u64);
        Self {
            max_runtime: secs(spec.max_runtime_minutes) * 60,
            ttl_after_finished: secs(spec.ttl_seconds_after_finished),
            boot_timeout: secs(spec.boot_timeout_seconds),
            idle_grace: secs(spec.idle_timeout_seconds),
            max_attempts: spec.max_attempts.max(1) as u32,
            rerun_interrupted: spec.rerun_interrupted,
            ..self
        }
    }
}

/// The one thing to do in this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing now; look again after this long.
    Wait(Duration),
    /// Launch the attempt's instance: record the launch in the status, then send it; a launch
    /// already recorded is sent again as it is, under its ClientToken.
    Launch,
    /// No capacity anywhere for now: wait this long before the next round.
    Backoff(Duration),
    /// Ask GitHub about the job and its runner, then decide again with the answer.
    Consult,
    /// Record the ended instance as a previous attempt and wait for a new one (Pending).
    Requeue { why: &'static str },
    /// Terminate the job's instance (tag-scoped), then look again.
    Terminate,
    /// Remove the finalizer: nothing of the job is left in EC2.
    Release,
    /// Delete the finished RunnerJob (its TTL ran out).
    Delete,
    /// Ask GitHub to re-run the job, then decide again with the answer.
    Rerun,
    /// A finished job with its TTL far off: no timer; the expiry scan wakes it (see
    /// [`keeps_timer`]).
    Kept,
}

/// The decision: the phase to record, the step, and why (a CamelCase reason and a message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub phase: JobPhase,
    pub step: Step,
    pub reason: Option<(&'static str, String)>,
}

fn go(phase: JobPhase, step: Step) -> Decision {
    Decision {
        phase,
        step,
        reason: None,
    }
}

fn because(
    phase: JobPhase,
    step: Step,
    reason: &'static str,
    message: impl Into<String>,
) -> Decision {
    Decision {
        phase,
        step,
        reason: Some((reason, message.into())),
    }
}

const POLL: Duration = Duration::from_secs(10);
/// How often a runner past its idle limit that GitHub reports busy is looked at again.
const IDLE_RECHECK: Duration = Duration::from_secs(60);

/// Whether a finished job that waits `wait` for its TTL to end keeps a timer of its own, when
/// the controller looks for jobs near their TTL's end every `scan` ([`Limits::expiry_scan`]).
/// One that waits longer holds none: the scan wakes it once its TTL ends within two scans
/// ([`expiring`]), and its pass then sets the timer. Finished jobs are kept by the thousand
/// for their TTL, an hour by default, and each timer is an entry in the controller's queue
/// with the job's reference (10,000 of them held more than a megabyte).
pub fn keeps_timer(wait: Duration, scan: Duration) -> bool {
    wait <= 2 * scan
}

/// Whether the expiry scan at `now` wakes a job that finished at `finished_at` and is kept
/// `ttl`: its TTL has ended or ends within two scans, so its pass keeps a timer for the rest
/// ([`keeps_timer`]). A job with no recorded finish time is never deleted by its pass either.
pub fn expiring(finished_at: Option<Timestamp>, limits: &Limits, now: Timestamp) -> bool {
    finished_at.is_some_and(|at| {
        let spent = now.duration_since(at).unsigned_abs();
        keeps_timer(
            limits.ttl_after_finished.saturating_sub(spent),
            limits.expiry_scan,
        )
    })
}

/// Whether a change to a finished job, which finished at `finished_at`, needs no pass: the
/// pass would only wait for the expiry scan ([`Step::Kept`]). EC2 has had its visibility window
/// to list the job's instance (one still listed is claimed by no job and goes with the garbage
/// collector), its TTL is not near, and no re-run is due. The caller leaves out jobs being
/// deleted. After a restart, thousands of finished jobs then cost no pass and no place in the
/// controller's queue.
pub fn needs_no_pass(
    status: &RunnerJobStatus,
    finished_at: Option<Timestamp>,
    limits: &Limits,
    now: Timestamp,
) -> bool {
    let settled = finished_at
        .is_some_and(|at| now.duration_since(at).unsigned_abs() >= limits.launch_visibility);
    status.phase.is_finished()
        && settled
        && !expiring(finished_at, limits, now)
        && !rerun_due(status, limits)
}

fn left(limit: Duration, spent: Duration) -> Duration {
    limit.saturating_sub(spent).max(Duration::from_secs(1))
}

/// Decides the next phase and step.
pub fn decide(f: &Facts, limits: &Limits) -> Decision {
    let mut decision = decide_now(f, limits);
    match (&mut decision.step, f.set_aside) {
        (Step::Wait(wait), Some(counts_in)) => *wait = (*wait).min(counts_in),
        (step @ Step::Kept, Some(counts_in)) => *step = Step::Wait(counts_in),
        _ => {}
    }
    decision
}

/// The decision, with no regard for a listing set aside.
fn decide_now(f: &Facts, limits: &Limits) -> Decision {
    use JobPhase::*;
    if f.deleting {
        return deleting(f);
    }
    if matches!(f.phase, Succeeded | Failed) {
        return finished(f, limits);
    }
    // A boot that failed before a runner took the job is replaced, not finished.
    let boot_lost = f.boot_failed && !f.assigned;
    if let Some(outcome) = f.outcome
        && f.phase != Completing
        && !boot_lost
    {
        return reported(f, outcome);
    }
    if let InstanceState::Gone { id, reason } = &f.instance
        && f.phase != Completing
    {
        return replace_or_end(f, limits, id, reason);
    }
    if boot_lost && f.phase != Completing {
        return match &f.instance {
            InstanceState::Alive { .. } => go(f.phase, Step::Terminate),
            _ if f.launch_unsettled => go(f.phase, Step::Wait(Duration::from_secs(2))),
            _ => replace_or_end(f, limits, "(none)", "the boot failed"),
        };
    }
    match f.phase {
        Pending => pending(f, limits),
        Launching => launching(f, limits),
        Booting => booting(f, limits),
        Running => running(f, limits),
        Completing => completing(f),
        Succeeded | Failed => unreachable!("finished jobs returned above"),
    }
}

/// A RunnerJob being deleted: its instance goes first.
fn deleting(f: &Facts) -> Decision {
    use JobPhase::*;
    let finished = matches!(f.phase, Succeeded | Failed);
    match &f.instance {
        InstanceState::Alive { .. } => because(
            Completing,
            Step::Terminate,
            "Deleted",
            "the RunnerJob is being deleted",
        ),
        // Its launch may have made an instance EC2 does not list yet: wait for the answer
        // or the listing rather than leave the instance to the garbage collector.
        InstanceState::Absent if f.launch_unsettled => {
            go(f.phase, Step::Wait(Duration::from_secs(2)))
        }
        _ => go(if finished { f.phase } else { Failed }, Step::Release),
    }
}

/// A finished job: late events change nothing; only the TTL matters, once EC2 has had time to
/// show an instance it was slow to list: until then the job keeps looking.
fn finished(f: &Facts, limits: &Limits) -> Decision {
    match &f.instance {
        InstanceState::Alive { .. } => go(f.phase, Step::Terminate),
        _ if f.in_phase >= limits.ttl_after_finished => go(f.phase, Step::Delete),
        _ if f.rerun_due => rerun(f, limits),
        _ if f.in_phase < limits.launch_visibility => go(
            f.phase,
            Step::Wait(left(limits.ttl_after_finished, f.in_phase).min(POLL)),
        ),
        _ => match left(limits.ttl_after_finished, f.in_phase) {
            wait if keeps_timer(wait, limits.expiry_scan) => go(f.phase, Step::Wait(wait)),
            _ => go(f.phase, Step::Kept),
        },
    }
}

/// The job's outcome is known (reported, or cancelled): its instance goes.
fn reported(f: &Facts, outcome: Outcome) -> Decision {
    use JobPhase::*;
    match (&f.instance, outcome) {
        (InstanceState::Absent, Outcome::Cancelled) if f.phase == Pending => because(
            Failed,
            Step::Wait(POLL),
            "Cancelled",
            "the job was cancelled before a runner started",
        ),
        // The job is over and the instance already went: a runner shuts its instance
        // down right after reporting, often before this pass sees the report.
        (InstanceState::Gone { .. }, Outcome::Cancelled) => because(
            Completing,
            Step::Wait(Duration::ZERO),
            "Cancelled",
            "the job was cancelled",
        ),
        (InstanceState::Gone { .. }, _) => go(Completing, Step::Wait(Duration::ZERO)),
        (_, Outcome::Cancelled) => because(
            Completing,
            Step::Terminate,
            "Cancelled",
            "the job was cancelled",
        ),
        _ => go(Completing, Step::Terminate),
    }
}

fn launching(f: &Facts, limits: &Limits) -> Decision {
    use JobPhase::*;
    match (&f.instance, &f.launch) {
        (InstanceState::Alive { .. }, _) => go(Booting, Step::Wait(POLL)),
        (_, Some(answer)) => after_launch(f, limits, answer),
        // Recorded, and its answer not recorded (lost, or a restart came between): the
        // same launch is sent again, and EC2 answers with the instance it made, if any.
        _ => go(Launching, Step::Launch),
    }
}

fn booting(f: &Facts, limits: &Limits) -> Decision {
    use JobPhase::*;
    if f.registered {
        return go(Running, Step::Wait(POLL));
    }
    if f.in_phase >= limits.boot_timeout {
        // Terminated first; once it is gone, the job is tried again or ends (see `decide`).
        return because(
            Booting,
            Step::Terminate,
            "BootTimeout",
            format!(
                "the runner did not register within {} s",
                limits.boot_timeout.as_secs()
            ),
        );
    }
    go(
        Booting,
        Step::Wait(left(limits.boot_timeout, f.in_phase).min(POLL)),
    )
}

fn running(f: &Facts, limits: &Limits) -> Decision {
    use JobPhase::*;
    if !f.assigned && f.in_phase >= limits.idle_grace {
        idle(f, limits)
    } else if f.in_phase >= limits.max_runtime {
        past_max_runtime(f, limits)
    } else {
        // EC2 reclaims an instance two minutes after its notice: look more often meanwhile.
        let every = if f.interrupted {
            POLL
        } else {
            Duration::from_secs(60)
        };
        go(
            Running,
            Step::Wait(left(limits.max_runtime, f.in_phase).min(every)),
        )
    }
}

/// A registered runner that took no job within the idle limit: GitHub says whether it is busy.
fn idle(f: &Facts, limits: &Limits) -> Decision {
    use JobPhase::*;
    match &f.witness {
        None => go(Running, Step::Consult),
        // Busy with a job whose `in_progress` never arrived: never cut it off.
        Some(w) if w.runner_busy == Some(true) || w.job == GitHubJob::Ours => {
            go(Running, Step::Wait(IDLE_RECHECK))
        }
        Some(Witness {
            runner_busy: None, ..
        }) => because(
            Running,
            Step::Wait(IDLE_RECHECK),
            "GitHubUnavailable",
            "the runner took no job yet and GitHub cannot say whether it is busy; asking again",
        ),
        Some(_) => because(
            Completing,
            Step::Terminate,
            "RunnerIdle",
            format!(
                "the runner took no job within {} s of registering and GitHub reports it idle; its job went to another runner",
                limits.idle_grace.as_secs()
            ),
        ),
    }
}

fn completing(f: &Facts) -> Decision {
    use JobPhase::*;
    match &f.instance {
        InstanceState::Alive { .. } => go(Completing, Step::Terminate),
        _ => {
            let phase = if f.outcome == Some(Outcome::Success) {
                Succeeded
            } else {
                Failed
            };
            go(phase, Step::Wait(POLL))
        }
    }
}

/// What follows a launch that gave no instance.
fn after_launch(f: &Facts, limits: &Limits, answer: &LaunchAnswer) -> Decision {
    use JobPhase::*;
    match answer {
        LaunchAnswer::Launched => go(Booting, Step::Wait(POLL)),
        LaunchAnswer::NoCapacity { left: true, why } => because(
            Pending,
            Step::Wait(Duration::ZERO),
            "InsufficientCapacity",
            format!("{why}; trying the pool's next offering"),
        ),
        LaunchAnswer::NoCapacity { left: false, .. } => out_of_offerings(f, limits),
        // The job keeps its slot and its place: the pool recreates the template (it is told
        // to look again), and the launch goes out from the new one. Each try is a launch call,
        // so a template that does not come back is asked for less and less often.
        LaunchAnswer::TemplateMissing(why) => because(
            Launching,
            Step::Wait(growing(f.in_phase, limits.backoff_unit)),
            "LaunchTemplateMissing",
            format!("{why}; waiting for the RunnerPool to recreate it"),
        ),
        LaunchAnswer::PoolNotReady(why) => because(
            Pending,
            Step::Wait(limits.capacity_recheck),
            "PoolNotReady",
            why.clone(),
        ),
        LaunchAnswer::Refused(why) => {
            because(Failed, Step::Wait(POLL), "LaunchFailed", why.clone())
        }
        LaunchAnswer::Unanswered(why) => because(
            Launching,
            Step::Wait(limits.backoff_unit),
            "LaunchUnanswered",
            format!("{why}; the recorded launch is sent again under the same ClientToken"),
        ),
    }
}

/// Longest wait between launch tries for a template that is missing.
const TEMPLATE_RETRY_MAX: Duration = Duration::from_secs(5 * 60);

/// A wait that grows with the time already spent (half of it), from `unit` up to
/// [`TEMPLATE_RETRY_MAX`]: each try waits longer than the one before.
fn growing(spent: Duration, unit: Duration) -> Duration {
    (spent / 2).clamp(unit, TEMPLATE_RETRY_MAX.max(unit))
}

/// No offering of the pool had capacity this round: back off and try another round, or fail
/// once the rounds are spent.
fn out_of_offerings(f: &Facts, limits: &Limits) -> Decision {
    use JobPhase::*;
    if f.launch_rounds >= limits.max_launch_rounds {
        return because(
            Failed,
            Step::Wait(POLL),
            "InsufficientCapacity",
            format!(
                "no capacity for any offering of the pool after {} attempts",
                f.launch_rounds
            ),
        );
    }
    let wait =
        super::launch::backoff(f.launch_rounds).mul_f64(limits.backoff_unit.as_secs_f64() / 5.0);
    because(
        Pending,
        Step::Backoff(wait),
        "InsufficientCapacity",
        format!(
            "no capacity for the pool's offerings; attempt {} of {}, retrying in {} s",
            f.launch_rounds,
            limits.max_launch_rounds,
            wait.as_secs()
        ),
    )
}

/// A job with no instance yet: launch, wait for room or a pool, or end when GitHub says the
/// job is no longer queued.
fn pending(f: &Facts, limits: &Limits) -> Decision {
    use JobPhase::*;
    if let InstanceState::Alive { .. } = f.instance {
        return go(Booting, Step::Wait(POLL));
    }
    // Whatever it waits for, a job GitHub no longer queues needs nothing launched.
    if let Some(Witness {
        job: GitHubJob::Elsewhere(what),
        ..
    }) = &f.witness
    {
        return because(
            Failed,
            Step::Wait(POLL),
            "NotQueued",
            format!("the job is no longer queued: {what}; nothing was launched"),
        );
    }
    if f.doubted && f.witness.is_none() {
        return go(Pending, Step::Consult);
    }
    admit(f, limits)
}

/// A queued job and its pool: launch when the pool admits it, else wait or end saying why.
fn admit(f: &Facts, limits: &Limits) -> Decision {
    use JobPhase::*;
    match &f.pool {
        PoolAdmission::Full => because(
            Pending,
            Step::Wait(limits.capacity_recheck),
            "PoolAtCapacity",
            "the pool has maxRunners runners already",
        ),
        PoolAdmission::Missing | PoolAdmission::Deleting
            if f.in_phase >= limits.pool_gone_deadline =>
        {
            because(
                Failed,
                Step::Wait(POLL),
                "PoolGone",
                format!(
                    "the RunnerPool was missing or being deleted for {} s; nothing was launched",
                    limits.pool_gone_deadline.as_secs()
                ),
            )
        }
        PoolAdmission::Missing => because(
            Pending,
            Step::Wait(limits.capacity_recheck),
            "PoolNotFound",
            "the RunnerPool does not exist in the job's namespace",
        ),
        PoolAdmission::Deleting => because(
            Pending,
            Step::Wait(limits.capacity_recheck),
            "PoolDeleting",
            "the RunnerPool is being deleted and launches nothing more",
        ),
        PoolAdmission::NotReady(why) => because(
            Pending,
            Step::Wait(limits.capacity_recheck),
            "PoolNotReady",
            why.clone(),
        ),
        _ if !f.backoff_left.is_zero() => go(Pending, Step::Wait(f.backoff_left)),
        PoolAdmission::Admitted => match &f.witness {
            None if f.in_phase >= limits.queue_recheck => go(Pending, Step::Consult),
            // Still queued, or GitHub cannot say: an outage must not hold launches.
            _ => go(Launching, Step::Launch),
        },
    }
}

/// A runner past the pool's `maxRuntimeMinutes` is ended whatever it does: the limit is the
/// pool's word. GitHub is asked first so the reason says what was cut off, and a job whose
/// `in_progress` was lost has its assignment recorded.
fn past_max_runtime(f: &Facts, limits: &Limits) -> Decision {
    let what = match &f.witness {
        None => return go(JobPhase::Running, Step::Consult),
        Some(w) if w.runner_busy == Some(true) => "still running its job",
        Some(Witness {
            job: GitHubJob::Elsewhere(why),
            ..
        }) if why == NO_APP_TO_ASK => {
            "running, and with no GitHub App configured nobody could say whether it was busy,"
        }
        Some(Witness {
            job: GitHubJob::Ours,
            runner_busy: Some(false),
        }) => "idle, its job over on GitHub though its completion was never reported",
        Some(Witness {
            runner_busy: Some(false),
            ..
        }) => "idle, having taken no job",
        Some(_) => "running, and GitHub could not say whether it was busy,",
    };
    because(
        JobPhase::Completing,
        Step::Terminate,
        "MaxRuntimeExceeded",
        format!(
            "the runner was {what} after {} minutes",
            limits.max_runtime.as_secs() / 60
        ),
    )
}

/// A job lost to a spot interruption after its runner took it, in a pool that asks for a
/// re-run: GitHub re-runs a job only once its whole workflow run has completed, so the request
/// is repeated until it is taken or refused; the reason it leaves is the record that it was
/// made.
fn rerun(f: &Facts, limits: &Limits) -> Decision {
    match &f.rerun {
        None => go(f.phase, Step::Rerun),
        Some(RerunAnswer::Requested) => because(
            f.phase,
            Step::Wait(Duration::ZERO),
            "RerunRequested",
            "its spot instance was reclaimed while the runner ran the job; GitHub was asked to re-run it, and queues it as a new job",
        ),
        Some(RerunAnswer::NotYet) => go(f.phase, Step::Wait(limits.rerun_retry)),
        Some(RerunAnswer::Refused(why)) => because(
            f.phase,
            Step::Wait(Duration::ZERO),
            "RerunRefused",
            format!(
                "its spot instance was reclaimed while the runner ran the job; GitHub refused to re-run it: {why}"
            ),
        ),
    }
}

/// The instance went while its runner ran the job, which goes with it: reclaimed by EC2 for a
/// spot interruption (the pool may have the job re-run), or lost otherwise. Only EC2's state
/// reason says it was reclaimed: the instance's own notice is the word of whatever runs on it.
fn lost_while_running(id: &str, reason: &str) -> Decision {
    if reason.starts_with("Server.SpotInstanceTermination") {
        return because(
            JobPhase::Failed,
            Step::Wait(Duration::ZERO),
            INTERRUPTED_WHILE_RUNNING,
            format!("spot instance {id} was reclaimed while its runner ran the job: {reason}"),
        );
    }
    because(
        JobPhase::Failed,
        Step::Wait(POLL),
        "InstanceLost",
        format!("instance {id} is gone while its runner ran the job: {reason}"),
    )
}

/// The job's instance ended (`id`, EC2's `reason`) while the job was not completing. If its
/// runner had taken the job, the job is lost with it. Otherwise GitHub decides: a job still
/// queued gets a new instance while attempts are left; one no longer queued ends, saying why.
fn replace_or_end(f: &Facts, limits: &Limits, id: &str, reason: &str) -> Decision {
    use JobPhase::*;
    let lost = || lost_while_running(id, reason);
    if f.assigned {
        return lost();
    }
    let why = why_ended(f, limits, reason);
    let Some(witness) = &f.witness else {
        return go(f.phase, Step::Consult);
    };
    match &witness.job {
        GitHubJob::Ours => lost(),
        GitHubJob::Unknown => because(
            f.phase,
            Step::Wait(POLL),
            "GitHubUnavailable",
            format!(
                "instance {id} ended ({why}: {reason}); waiting for GitHub to say whether the job is still queued"
            ),
        ),
        GitHubJob::Elsewhere(what) => because(
            Failed,
            Step::Wait(POLL),
            "NotQueued",
            format!(
                "instance {id} ended ({why}: {reason}) and the job is no longer queued: {what}"
            ),
        ),
        GitHubJob::Queued if f.attempt < limits.max_attempts => because(
            Pending,
            Step::Requeue { why },
            "Requeued",
            format!(
                "instance {id} ended before its runner took the job ({why}: {reason}); attempt {} of {} follows",
                f.attempt + 1,
                limits.max_attempts
            ),
        ),
        GitHubJob::Queued => because(
            Failed,
            Step::Wait(POLL),
            "AttemptsExhausted",
            format!(
                "instance {id} ended before its runner took the job ({why}: {reason}); all {} attempts are spent",
                limits.max_attempts
            ),
        ),
    }
}

/// Why an instance ended before its runner took the job, as the requeue's reason.
fn why_ended(f: &Facts, limits: &Limits, reason: &str) -> &'static str {
    if f.boot_failed {
        "BootFailed"
    } else if f.phase == JobPhase::Booting && f.in_phase >= limits.boot_timeout {
        "BootTimeout"
    } else if f.interrupted || reason.contains("Spot") {
        "SpotInterrupted"
    } else {
        "InstanceLost"
    }
}

/// The reason a job lost to a spot interruption after its runner took it ends with.
pub const INTERRUPTED_WHILE_RUNNING: &str = "InterruptedWhileRunning";

/// Whether GitHub's listing of `repository`'s queued jobs (`queued`, by id), read at
/// `listed_at`, casts doubt on RunnerJob `job`: it waits to launch, is of that repository, is
/// not in the listing, and was waiting `recheck` before the listing was read (a job queued
/// while the listing was read is not doubted). A doubted job asks GitHub before it launches.
pub fn doubted_by_listing(
    job: &RunnerJob,
    repository: &str,
    queued: &std::collections::HashSet<i64>,
    listed_at: Timestamp,
    recheck: Duration,
) -> bool {
    let pending = (job.status.as_ref()).is_none_or(|s| s.phase == JobPhase::Pending);
    let recheck = k8s_openapi::jiff::SignedDuration::try_from(recheck).unwrap_or_default();
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
    pending
        && job.metadata.deletion_timestamp.is_none()
        && job.spec.repository.eq_ignore_ascii_case(repository)
        && !queued.contains(&job.spec.job_id)
        && created.is_some_and(|c| c + recheck <= listed_at)
}

/// The reason a job carries while Pacer asks GitHub to re-run it, written before the request
/// goes out: the request is made at most once, and a job that keeps this reason lost the
/// answer.
pub const RERUN_REQUESTING: &str = "RerunRequesting";

/// What GitHub says of a job's last attempt and of its workflow run, when asked before a
/// re-run.
#[derive(Clone, Debug, Default)]
pub struct RunAttempt<'a> {
    pub run_status: &'a str,
    pub run_attempt: Option<u32>,
    pub job_status: &'a str,
    pub job_attempt: Option<u32>,
    pub conclusion: Option<&'a str>,
    pub runner: Option<&'a str>,
}

/// Whether GitHub may be asked to re-run a job that Pacer's runner `ours` ran when its spot
/// instance was reclaimed: GitHub re-runs a job only once its run completed (not yet before);
/// the job must have failed in the run's latest attempt, on our runner. A job that succeeded
/// before the instance went, or whose run was re-run since (by someone, or for another job of
/// the run), is left alone.
pub fn may_rerun(github: &RunAttempt<'_>, ours: Option<&str>) -> Result<(), RerunAnswer> {
    let refused = |why: String| Err(RerunAnswer::Refused(why));
    if github.run_status != "completed" || github.job_status != "completed" {
        return Err(RerunAnswer::NotYet);
    }
    if github.runner != ours {
        return refused(format!(
            "GitHub says runner {} ran the job, not Pacer's {}",
            github.runner.unwrap_or("(none)"),
            ours.unwrap_or("(none)")
        ));
    }
    if github.job_attempt != github.run_attempt {
        return refused(format!(
            "the run was re-run since (it is at attempt {})",
            github.run_attempt.unwrap_or_default()
        ));
    }
    match github.conclusion {
        Some("failure") => Ok(()),
        other => refused(format!(
            "the job ended {}: nothing to re-run",
            other.unwrap_or("without a conclusion")
        )),
    }
}

/// Whether GitHub is still to be asked to re-run the job: it was lost to a spot interruption
/// after its runner took it, its pool asks for re-runs, and no request was made yet (the
/// request replaces the reason before it goes out).
pub fn rerun_due(status: &RunnerJobStatus, limits: &Limits) -> bool {
    // A runner that reported its exit ended the job itself, before the instance went.
    limits.rerun_interrupted
        && status.completion.is_none()
        && status.phase == JobPhase::Failed
        && (status.last_error.as_ref()).is_some_and(|e| e.reason == INTERRUPTED_WHILE_RUNNING)
}

/// Records why the job waits or changed: a reason and message already recorded keep their
/// time, so a job that waits for the same reason pass after pass costs no write.
pub fn record_reason(
    status: &mut RunnerJobStatus,
    reason: &'static str,
    message: String,
    now: Timestamp,
) {
    if status
        .last_error
        .as_ref()
        .is_some_and(|e| e.reason == reason && e.message == message)
    {
        return;
    }
    status.last_error = Some(Box::new(crate::api::LastError {
        reason: reason.into(),
        message,
        time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
    }));
}

/// The status fields of one attempt, as the API server spells them: a new attempt clears
/// each of them ([`start_new_attempt`]).
pub const ATTEMPT_FIELDS: [&str; 9] = [
    "launch",
    "instance",
    "boot",
    "runner",
    "assignedJob",
    "completion",
    "cost",
    "interruption",
    "nextAttemptAt",
];

/// Most earlier attempts a status keeps.
pub const MAX_PREVIOUS_ATTEMPTS: usize = 10;

/// Ends the current attempt in `status`: its instance (gone) becomes history, with `why` and
/// the message recorded last, and what belonged to that attempt (the bootstrap, the runner,
/// the assignment, a failed boot's completion, the cost, the launch retries) is cleared, so the
/// job waits for a new instance under a new ClientToken and a new runner name. The history
/// keeps the latest [`MAX_PREVIOUS_ATTEMPTS`]. Returns the ended instance, if it had one.
pub fn start_new_attempt(
    status: &mut RunnerJobStatus,
    why: &str,
    now: Timestamp,
) -> Option<crate::api::InstanceStatus> {
    let instance = status.instance.take();
    status.previous_attempts.push(crate::api::PreviousAttempt {
        instance: instance.as_ref().map(|i| i.id.clone()).unwrap_or_default(),
        reason: why.into(),
        message: status
            .last_error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
        time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
    });
    let excess = status
        .previous_attempts
        .len()
        .saturating_sub(MAX_PREVIOUS_ATTEMPTS);
    status.previous_attempts.drain(..excess);
    status.launch = None;
    status.interruption = None;
    status.boot = None;
    status.runner = None;
    status.assigned_job = None;
    status.completion = None;
    status.cost = None;
    status.next_attempt_at = None;
    status.attempts = 0;
    instance
}

/// Whether `pool` may launch at all now, before counting its runners: it exists, is not being
/// deleted, and its `Ready` condition is True for its current generation, so its launch
/// template matches its spec (a template built for an older spec would pair new instance types
/// or subnets with old settings).
pub fn pool_readiness(pool: Option<&RunnerPool>) -> Result<(), PoolAdmission> {
    let Some(pool) = pool else {
        return Err(PoolAdmission::Missing);
    };
    if pool.metadata.deletion_timestamp.is_some() {
        return Err(PoolAdmission::Deleting);
    }
    let generation = pool.metadata.generation;
    let status = pool.status.as_ref();
    let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" && c.observed_generation == generation => {
            match status.and_then(|s| s.launch_template.as_ref()) {
                Some(_) => Ok(()),
                None => Err(PoolAdmission::NotReady(
                    "the RunnerPool has no launch template yet".into(),
                )),
            }
        }
        Some(c) if c.status == "True" => Err(PoolAdmission::NotReady(format!(
            "the RunnerPool's generation {} is not built yet (Ready describes {})",
            generation.unwrap_or_default(),
            c.observed_generation.unwrap_or_default()
        ))),
        Some(c) => Err(PoolAdmission::NotReady(format!(
            "the RunnerPool is not Ready: {}: {}",
            c.reason, c.message
        ))),
        None => Err(PoolAdmission::NotReady(
            "the RunnerPool has not been validated yet".into(),
        )),
    }
}

/// What a human is told, as an Event, when a RunnerJob changes phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    /// One of the reasons listed in docs/operations.md.
    pub reason: &'static str,
    pub note: String,
}

/// The notice a phase change deserves, if any: the instance on launch, the runner on
/// registration, why the job is completing or failed.
pub fn phase_notice(was: JobPhase, status: &RunnerJobStatus) -> Option<Notice> {
    if status.phase == was {
        return None;
    }
    let error = status.last_error.as_ref();
    let because = error.map(|e| format!("{}: {}", e.reason, e.message));
    // An error recorded in this very pass explains the change; an older one may not.
    let fresh = error
        .filter(|e| e.time.is_some() && e.time.as_ref() == status.phase_times.of(status.phase))
        .map(|e| format!("{}: {}", e.reason, e.message));
    let notice = |warning, reason, note| Notice {
        warning,
        reason,
        note,
    };
    Some(match status.phase {
        JobPhase::Pending | JobPhase::Launching => return None,
        JobPhase::Booting => {
            let i = status.instance.as_ref()?;
            notice(
                false,
                "Launched",
                format!(
                    "instance {} ({} {} in {})",
                    i.id, i.market, i.instance_type, i.zone
                ),
            )
        }
        JobPhase::Running => {
            let runner = status.runner.as_ref()?;
            notice(
                false,
                "RunnerRegistered",
                format!("runner {} (id {}) registered", runner.name, runner.id),
            )
        }
        JobPhase::Completing => notice(
            false,
            "Completing",
            fresh.unwrap_or_else(|| "the job is over: terminating the instance".into()),
        ),
        JobPhase::Succeeded => notice(
            false,
            "Succeeded",
            "the job succeeded; the instance is gone".into(),
        ),
        JobPhase::Failed => notice(
            true,
            "Failed",
            because.unwrap_or_else(|| "the job failed; the instance is gone".into()),
        ),
    })
}

/// How long after its claim a bootstrap's answer may be collected by its instance (from the
/// RunnerJob's status, through any replica); past it, the instance is refused for good.
pub const BOOT_ANSWER_HOLD: Duration = Duration::from_secs(120);

/// How long after its claim a bootstrap may go on minting the runner and recording it: past
/// it, the claimant gives the claim back (its GitHub call is cut off) and the instance's next
/// try starts again.
pub const CLAIM_GIVE_UP: Duration = Duration::from_secs(45);

/// How long a claim with nothing recorded on it (no runner, no answer) stands before the same
/// instance may claim the job afresh: the replica that claimed it died between the claim and
/// the record, and nothing else would free it before [`BOOT_ANSWER_HOLD`]. It is
/// [`CLAIM_GIVE_UP`] and 30 s more, for the clocks of two replicas to disagree: a live
/// claimant has given up by then, so two replicas never mint for one claim at once.
pub const CLAIM_ORPHANED: Duration = Duration::from_secs(75);

/// Who asks to bootstrap: an instance whose identity verified, and the RunnerJob uid its tags
/// name.
#[derive(Clone, Copy, Debug)]
pub struct Claimant<'a> {
    pub instance: &'a str,
    pub job_uid: &'a str,
}

/// What RunnerJob `uid`'s status claims of a batched launch, when the batch place it records is
/// its own (see [`super::launch::batch_place_of`]): the batch's token, and the instance the
/// status names, once it knows it. Statuses are writable by others: a place copied from another
/// job's status claims nothing.
pub fn batch_claim<'a>(
    uid: &str,
    status: &'a RunnerJobStatus,
) -> Option<(&'a str, Option<&'a str>)> {
    let launch = status.launch.as_ref()?;
    super::launch::batch_place_of(launch, uid).ok()?;
    let instance = status.instance.as_ref().map(|i| i.id.as_str());
    Some((launch.client_token.as_str(), instance))
}

/// Whether RunnerJob `uid` (finished or not) claims batch instance `id`, listed carrying batch
/// token `token`: its status names the instance, from a batch place of its own, under that
/// token. The one rule the bootstrap, the termination, the launch's answer and the garbage
/// collector apply to a batch's instances, whose tags name no job.
pub fn claims_batch_instance(
    uid: &str,
    status: &RunnerJobStatus,
    id: &str,
    token: Option<&str>,
) -> bool {
    batch_claim(uid, status)
        .is_some_and(|(recorded, named)| Some(recorded) == token && named == Some(id))
}

/// Why batch instance `id`, launched at `launch_time` (seconds) under a token that no RunnerJob
/// names it under, gets no bootstrap, from the statuses of the jobs that record its batch with
/// a place of their own (`members`): not yet while a live member still waits for the batch's
/// answer, or while the instance is younger than [`super::gc::BATCH_GRACE`] and fewer jobs
/// record the batch than it has members (one whose record failed keeps its place, and records
/// it again); denied otherwise, naming the instances the batch's jobs did take.
pub fn unnamed_batch_instance(
    id: &str,
    members: &[&RunnerJobStatus],
    launch_time: Option<i64>,
    now: Timestamp,
) -> Refusal {
    let young =
        launch_time.is_some_and(|t| now.as_second() - t < super::gc::BATCH_GRACE.as_secs() as i64);
    let size = (members.iter())
        .filter_map(|s| s.launch.as_ref()?.batch.as_ref())
        .map(|b| b.size as usize)
        .max();
    let short = size.is_some_and(|size| members.len() < size);
    let waiting = (members.iter()).any(|s| !s.phase.is_finished() && s.instance.is_none());
    if (young && short) || waiting {
        return Refusal::NotYet(
            "no RunnerJob has recorded this instance of its batch yet; ask again shortly".into(),
        );
    }
    let taken: Vec<&str> = (members.iter())
        .filter_map(|s| s.instance.as_ref().map(|i| i.id.as_str()))
        .collect();
    Refusal::Denied(format!(
        "the RunnerJobs of its batch launched instances {}, not {id}",
        taken.join(", ")
    ))
}

/// Whether a RunnerJob (its uid and status, as read now) may take an instance's bootstrap at
/// `now`: it is the RunnerJob the instance was launched for, it waits for one to boot, the
/// instance is the one it launched (once it knows which), and none has bootstrapped yet. Why
/// not, otherwise: denied (401) when the instance is not this RunnerJob's, never (409), not
/// yet (503, its launch not recorded yet), or claimed by this very instance (its answer is
/// being made, or waits to be collected).
pub fn may_bootstrap(
    job_uid: Option<&str>,
    status: &RunnerJobStatus,
    claimant: &Claimant<'_>,
    now: Timestamp,
) -> Result<(), Refusal> {
    let instance = claimant.instance;
    // A RunnerJob deleted and made again under the same name is another job.
    if job_uid != Some(claimant.job_uid) {
        return Err(Refusal::Denied(format!(
            "is not the RunnerJob instance {instance} was launched for (uid {})",
            claimant.job_uid
        )));
    }
    if status
        .previous_attempts
        .iter()
        .any(|a| a.instance == instance)
    {
        return Err(Refusal::Never(format!(
            "replaced instance {instance} by a newer attempt"
        )));
    }
    // Tags can be copied onto another instance; the one the launch made is recorded.
    if let Some(launched) = status.instance.as_ref().map(|i| i.id.as_str())
        && launched != instance
    {
        return Err(Refusal::Denied(format!(
            "launched instance {launched}, not {instance}"
        )));
    }
    if let Some(boot) = &status.boot
        && !orphaned(boot, status, instance, now)
    {
        return Err(already_bootstrapped(boot, status, instance, now));
    }
    // Launched, but the controller has not recorded it yet (its pass is still running, or a
    // new leader is adopting it): the instance asks again shortly.
    if status.phase == JobPhase::Pending {
        return Err(Refusal::NotYet(
            "has not recorded its launch yet; ask again shortly".into(),
        ));
    }
    if !matches!(status.phase, JobPhase::Launching | JobPhase::Booting) {
        return Err(Refusal::Never(format!(
            "is {:?}, not waiting for an instance to boot",
            status.phase
        )));
    }
    Ok(())
}

/// Why a RunnerJob that has bootstrapped an instance refuses another bootstrap: claimed by
/// this very instance a moment ago, its runner not started, its answer is being made or waits
/// for the instance to collect it; any other is refused for good.
fn already_bootstrapped(
    boot: &BootStatus,
    status: &RunnerJobStatus,
    instance: &str,
    now: Timestamp,
) -> Refusal {
    let claimed = now.duration_since(boot.bootstrapped_at.0);
    if boot.instance_id == instance
        && status.runner.is_none()
        && claimed.unsigned_abs() < BOOT_ANSWER_HOLD
    {
        return Refusal::Claimed("is bootstrapping this instance; ask again shortly".into());
    }
    Refusal::Never("has already bootstrapped an instance".into())
}

/// Whether `boot` is a claim of this very instance left with nothing recorded on it for
/// [`CLAIM_ORPHANED`]: the instance may claim the job again.
fn orphaned(boot: &BootStatus, status: &RunnerJobStatus, instance: &str, now: Timestamp) -> bool {
    let age = now.duration_since(boot.bootstrapped_at.0);
    boot.instance_id == instance
        && boot.runner.is_none()
        && boot.answer.is_none()
        && status.runner.is_none()
        && age.as_secs() >= CLAIM_ORPHANED.as_secs() as i64
}

/// Whether `boot`, as read now, is still the claim `ours` made: the same instance, holding the
/// same callback token.
pub fn still_ours(boot: Option<&BootStatus>, ours: &BootStatus) -> bool {
    boot.is_some_and(|b| b.instance_id == ours.instance_id && b.token_sha256 == ours.token_sha256)
}

/// Whether the claim `ours` may be given back (so its instance may try again): it is still
/// ours and its answer was not collected (no runner recorded yet, or the answer still there).
pub fn may_give_back(boot: Option<&BootStatus>, ours: &BootStatus) -> bool {
    still_ours(boot, ours) && boot.is_some_and(|b| b.runner.is_none() || b.answer.is_some())
}

/// Whether an answer taken for a request that was cut off may be put back: the job (its status
/// as read now) still waits for the runner of that very claim (`instance`, holding the token
/// whose digest is `token_sha256`), and no answer is there.
pub fn may_put_back(status: Option<&RunnerJobStatus>, instance: &str, token_sha256: &str) -> bool {
    status.is_some_and(|s| {
        s.runner.is_none()
            && s.boot.as_ref().is_some_and(|b| {
                b.instance_id == instance && b.token_sha256 == token_sha256 && b.answer.is_none()
            })
    })
}

/// Why a bootstrap is refused: for good, or for now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The instance is not this RunnerJob's.
    Denied(String),
    Never(String),
    NotYet(String),
    /// Claimed by this very instance, within [`BOOT_ANSWER_HOLD`]: its answer, once made,
    /// waits for it.
    Claimed(String),
}

/// What a signed `in_progress` or `completed` delivery says about a runner: which repository
/// the job belongs to, through which installation, the runner's id, and the attempt its name
/// carries.
#[derive(Clone, Copy, Debug)]
pub struct RunnerEvent<'a> {
    pub owner: &'a str,
    pub repository: &'a str,
    pub installation: Option<i64>,
    pub runner_id: Option<i64>,
    pub attempt: u32,
}

/// Whether a delivery naming `job`'s runner is about that runner: the name is of the job's
/// current attempt, the repository is within the job's pool (its owner and scope), the
/// installation is the job's, and the runner id is the one recorded at bootstrap. Runner names
/// are predictable; ids are not. Why not, otherwise.
pub fn event_binds(
    job: &RunnerJob,
    pool: Option<&RunnerPool>,
    event: &RunnerEvent<'_>,
) -> Result<(), String> {
    let status = job.status.as_ref();
    let current = status.map_or(1, |s| s.attempt());
    if event.attempt != current {
        return Err(format!(
            "the runner is of attempt {}, the job is at {current}",
            event.attempt
        ));
    }
    let Some(ours) = status.and_then(|s| s.current_runner()) else {
        return Err("the RunnerJob has no runner recorded".into());
    };
    if event.runner_id != Some(ours.id) {
        return Err(format!(
            "runner id {:?} is not the recorded {}",
            event.runner_id, ours.id
        ));
    }
    if let (Some(theirs), Some(mine)) = (event.installation, job.spec.installation_id)
        && theirs != mine
    {
        return Err(format!("installation {theirs} is not the job's {mine}"));
    }
    let in_scope = match pool {
        Some(pool) => super::matching::in_scope(pool, event.owner, event.repository),
        // Without the pool, only the job's own repository is known to be in scope.
        None => job
            .spec
            .repository
            .eq_ignore_ascii_case(&format!("{}/{}", event.owner, event.repository)),
    };
    if !in_scope {
        return Err(format!(
            "repository {}/{} is outside the pool's scope",
            event.owner, event.repository
        ));
    }
    Ok(())
}

/// Clock skew tolerated between an instance's `pendingTime` and ours.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Whether an instance that entered `pending` at `pending` may still bootstrap at `now`:
/// within the boot timeout, and not from the future beyond clock skew.
pub fn boots_in_time(pending: Timestamp, now: Timestamp, boot_timeout: Duration) -> bool {
    let age = now.duration_since(pending);
    if age.is_negative() {
        age.unsigned_abs() <= CLOCK_SKEW
    } else {
        age.unsigned_abs() <= boot_timeout
    }
}

/// Whether the launch recorded in `status` may have made an instance EC2 does not list yet:
/// no instance is recorded, EC2 did not answer it with a definite no (`refused`, by its
/// token), and the listing taken at `listed_at` is not a visibility window past its record.
pub fn recorded_launch_unsettled(
    status: &RunnerJobStatus,
    refused: impl Fn(&str) -> bool,
    listed_at: Timestamp,
    visibility: Duration,
) -> bool {
    (status.launch.as_ref())
        .filter(|intent| status.instance.is_none() && !refused(&intent.client_token))
        .and(status.phase_times.launching.as_ref())
        .is_some_and(|at| listed_at < at.0 + visibility)
}

/// The notice that EC2 reclaims the instance in two minutes.
pub const SPOT_INTERRUPTION: &str = "spot-interruption";

/// When the job's instances got spot interruption notices: the current one's, and those of
/// the attempts replaced for one.
pub fn spot_notices(status: &RunnerJobStatus) -> impl Iterator<Item = Timestamp> + '_ {
    let current = (status.interruption.as_ref())
        .filter(|i| i.kind == SPOT_INTERRUPTION)
        .map(|i| i.reported_at.0);
    let replaced = (status.previous_attempts.iter())
        .filter(|a| a.reason == "SpotInterrupted")
        .map(|a| a.time.0);
    current.into_iter().chain(replaced)
}

/// A notice an instance may report (`spot-interruption` or `rebalance`): its Event reason and
/// how a human reads it; `None` for anything else.
pub fn notice_kind(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        SPOT_INTERRUPTION => Some(("SpotInterruptionNotice", "a spot interruption notice")),
        "rebalance" => Some(("RebalanceRecommendation", "a rebalance recommendation")),
        _ => None,
    }
}

/// Whether a notice of `kind` is recorded over the one the status holds: once per kind, and
/// a rebalance recommendation never hides a spot interruption notice.
pub fn records_notice(recorded: Option<&str>, kind: &str) -> bool {
    recorded != Some(kind) && recorded != Some(SPOT_INTERRUPTION)
}

/// Whether a RunnerJob can give up its runner when the demand it stands for goes (a queued job
/// cancelled before any runner took it): no runner was handed out for it yet, and it is neither
/// over nor going. A runner that exists may have taken another job a moment ago, before its
/// `in_progress` arrived: it is left to the idle check, which asks GitHub first.
pub fn withdrawable(job: &RunnerJob) -> bool {
    job.metadata.deletion_timestamp.is_none()
        && job.status.as_ref().is_none_or(|s| {
            s.current_runner().is_none()
                && s.assigned_job.is_none()
                && s.completion.is_none()
                && !s.phase.is_finished()
        })
}

/// The RunnerJob to withdraw when `cancelled`'s job left the queue without a runner: itself if
/// it can, else the newest of its pool among `others` that can.
pub fn to_withdraw<'a>(
    cancelled: &'a RunnerJob,
    others: impl IntoIterator<Item = &'a RunnerJob>,
) -> Option<&'a RunnerJob> {
    if withdrawable(cancelled) {
        return Some(cancelled);
    }
    others
        .into_iter()
        .filter(|j| j.spec.pool_name == cancelled.spec.pool_name && withdrawable(j))
        .max_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// Whether a job holds one of its pool's `maxRunners` slots: it has not finished, and it has
/// recorded a launch, has an instance, or is past launching. The one definition admission,
/// the pool's clean-up and the wake-ups count by.
pub fn holds_slot(status: Option<&RunnerJobStatus>) -> bool {
    status.is_some_and(|s| {
        !s.phase.is_finished()
            && (s.phase != JobPhase::Pending || s.launch.is_some() || s.instance.is_some())
    })
}

/// Moves `status` into `phase` at `now` (kept when already there). A job back to waiting
/// has no launch in flight: its recorded launch either made no instance or is history.
pub fn enter(status: &mut RunnerJobStatus, phase: JobPhase, now: Timestamp) {
    if status.phase == phase && status.phase_times.of(phase).is_some() {
        return;
    }
    if phase == JobPhase::Pending {
        status.launch = None;
    }
    status.phase = phase;
    *status.phase_times.of_mut(phase) =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
}

/// The jobs to wake when a runner of their pool finishes: the oldest waiting ones, as many as
/// the pool has room for. `waiting` pairs each job with when it was created.
pub fn to_wake<T, C: Ord>(max_runners: usize, busy: usize, mut waiting: Vec<(C, T)>) -> Vec<T> {
    let room = max_runners.saturating_sub(busy);
    waiting.sort_by(|a, b| a.0.cmp(&b.0));
    waiting.into_iter().take(room).map(|(_, job)| job).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobPhase::*;

    #[test]
    fn an_instance_not_listed_is_gone_only_from_a_settled_listing() {
        let listed = |alive| {
            Some(Listed {
                id: "i-1",
                alive,
                reason: "Server.SpotInstanceTermination",
            })
        };
        // Listed one visibility window after the answer (settled), or a moment after it.
        let instance_state = |listed, known, settled: bool| {
            let answered = Timestamp::from_second(1_000_000).unwrap();
            let window = Duration::from_secs(60);
            let listed_at = answered
                + if settled {
                    window
                } else {
                    Duration::from_secs(1)
                };
            super::instance_state(listed, known, Some(answered), listed_at, window)
        };
        assert_eq!(instance_state(listed(true), None, false), alive());
        assert_eq!(instance_state(listed(false), Some("i-1"), false), gone());
        // Launched, answered, but not listed yet: alive until the listing has settled.
        assert_eq!(instance_state(None, Some("i-1"), false), alive());
        assert!(matches!(
            instance_state(None, Some("i-1"), true),
            InstanceState::Gone { .. }
        ));
        assert_eq!(instance_state(None, None, true), InstanceState::Absent);
    }

    #[test]
    fn only_a_pool_ready_at_its_generation_admits_launches() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let pool = |generation: i64, ready: &str, observed: i64, template: bool| {
            let text = include_str!("../../examples/runnerpool-org-spot.yaml");
            let mut pool: RunnerPool = serde_saphyr::from_str(text).unwrap();
            pool.metadata.generation = Some(generation);
            let status = pool.status.get_or_insert_default();
            status.conditions.push(Condition {
                type_: "Ready".into(),
                status: ready.into(),
                observed_generation: Some(observed),
                reason: "TemplateFailed".into(),
                message: "spec.instanceTypes: no such type".into(),
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            });
            if template {
                status.launch_template = Some(crate::api::LaunchTemplateRef {
                    id: "lt-1".into(),
                    version: 1,
                });
            }
            pool
        };
        assert_eq!(pool_readiness(Some(&pool(2, "True", 2, true))), Ok(()));
        assert_eq!(pool_readiness(None), Err(PoolAdmission::Missing));
        let mut deleting = pool(2, "True", 2, true);
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(
            pool_readiness(Some(&deleting)),
            Err(PoolAdmission::Deleting)
        );
        for (stale, why) in [
            (pool(3, "True", 2, true), "generation 3 is not built yet"),
            (
                pool(2, "False", 2, true),
                "spec.instanceTypes: no such type",
            ),
            (pool(2, "True", 2, false), "no launch template yet"),
        ] {
            match pool_readiness(Some(&stale)) {
                Err(PoolAdmission::NotReady(message)) => {
                    assert!(message.contains(why), "{message}")
                }
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_instance_that_reported_a_spot_notice_and_went_is_replaced_as_interrupted() {
        let mut f = facts(Booting);
        f.instance = InstanceState::Gone {
            id: "i-1".into(),
            reason: "Client.UserInitiatedShutdown".into(),
        };
        f.interrupted = true;
        f.witness = witness(GitHubJob::Queued, None);
        let d = decide(&f, &Limits::default());
        assert_eq!(
            d.step,
            Step::Requeue {
                why: "SpotInterrupted"
            },
            "{d:?}"
        );
        f.interrupted = false;
        let d = decide(&f, &Limits::default());
        assert_eq!(
            d.step,
            Step::Requeue {
                why: "InstanceLost"
            },
            "{d:?}"
        );
    }

    #[test]
    fn github_is_asked_to_rerun_only_a_failed_job_of_a_completed_run_it_has_not_rerun() {
        let ours = Some("pacer-x-31-1");
        let done = RunAttempt {
            run_status: "completed",
            run_attempt: Some(1),
            job_status: "completed",
            job_attempt: Some(1),
            conclusion: Some("failure"),
            runner: ours,
        };
        assert_eq!(may_rerun(&done, ours), Ok(()));
        let not_yet = RunAttempt {
            run_status: "in_progress",
            ..done.clone()
        };
        assert_eq!(may_rerun(&not_yet, ours), Err(RerunAnswer::NotYet));
        let refused = |github: RunAttempt<'_>, why: &str| match may_rerun(&github, ours) {
            Err(RerunAnswer::Refused(message)) => assert!(message.contains(why), "{message}"),
            other => panic!("{why}: {other:?}"),
        };
        let succeeded = RunAttempt {
            conclusion: Some("success"),
            ..done.clone()
        };
        refused(succeeded, "ended success");
        let rerun_since = RunAttempt {
            run_attempt: Some(2),
            ..done.clone()
        };
        refused(rerun_since, "re-run since");
        let theirs = RunAttempt {
            runner: Some("someone-else"),
            ..done
        };
        refused(theirs, "someone-else");
    }

    #[test]
    fn a_pass_never_waits_past_the_moment_a_set_aside_listing_counts() {
        let mut f = facts(Running);
        f.registered = true;
        f.instance = alive();
        let unbounded = decide(&f, &Limits::default());
        assert_eq!(unbounded.step, Step::Wait(Duration::from_secs(60)));
        f.set_aside = Some(Duration::from_secs(7));
        let d = decide(&f, &Limits::default());
        assert_eq!(
            (d.phase, d.step),
            (Running, Step::Wait(Duration::from_secs(7)))
        );
        // Only waits are bounded; a step is a step.
        f.instance = InstanceState::Gone {
            id: "i-1".into(),
            reason: "stopped".into(),
        };
        assert_eq!(decide(&f, &Limits::default()).step, Step::Consult);
    }

    #[test]
    fn a_job_lost_to_a_spot_interruption_after_it_was_taken_is_rerun_when_its_pool_asks() {
        let mut f = facts(Running);
        f.assigned = true;
        f.interrupted = true;
        f.instance = InstanceState::Gone {
            id: "i-1".into(),
            reason: "Server.SpotInstanceTermination".into(),
        };
        let d = decide(&f, &Limits::default());
        assert_eq!(
            (d.phase, d.reason.unwrap().0),
            (Failed, INTERRUPTED_WHILE_RUNNING)
        );
        // The instance's own notice is not EC2's word: a shutdown it made is an ordinary loss.
        f.instance = InstanceState::Gone {
            id: "i-1".into(),
            reason: "Client.UserInitiatedShutdown".into(),
        };
        assert_eq!(
            decide(&f, &Limits::default()).reason.unwrap().0,
            "InstanceLost"
        );

        let limits = Limits {
            rerun_interrupted: true,
            ..Limits::default()
        };
        let mut status = RunnerJobStatus {
            phase: Failed,
            ..Default::default()
        };
        record_reason(
            &mut status,
            INTERRUPTED_WHILE_RUNNING,
            "lost".into(),
            Timestamp::UNIX_EPOCH,
        );
        assert!(rerun_due(&status, &limits));
        let mut reported = status.clone();
        reported.completion = Some(crate::api::Completion {
            result: crate::api::JobResult::Failure,
            reported_at: None,
        });
        assert!(
            !rerun_due(&reported, &limits),
            "the runner ended the job itself"
        );
        assert!(
            !rerun_due(&status, &Limits::default()),
            "the pool did not ask"
        );
        record_reason(
            &mut status,
            "RerunRequested",
            "asked".into(),
            Timestamp::UNIX_EPOCH,
        );
        assert!(!rerun_due(&status, &limits), "asked once only");

        let mut f = facts(Failed);
        f.instance = InstanceState::Absent;
        f.rerun_due = true;
        assert_eq!(decide(&f, &limits).step, Step::Rerun);
        f.rerun = Some(RerunAnswer::NotYet);
        let d = decide(&f, &limits);
        assert_eq!((d.step, d.reason), (Step::Wait(limits.rerun_retry), None));
        f.rerun = Some(RerunAnswer::Requested);
        assert_eq!(decide(&f, &limits).reason.unwrap().0, "RerunRequested");
        f.rerun = Some(RerunAnswer::Refused(
            "Resource not accessible by integration".into(),
        ));
        let (reason, message) = decide(&f, &limits).reason.unwrap();
        assert_eq!(reason, "RerunRefused");
        assert!(message.contains("not accessible"), "{message}");
        // Past the TTL the job goes, asked or not.
        f.rerun = None;
        f.in_phase = limits.ttl_after_finished;
        assert_eq!(decide(&f, &limits).step, Step::Delete);
    }

    #[test]
    fn a_finished_job_holds_a_timer_only_once_its_ttl_is_near() {
        let limits = Limits::default();
        let (ttl, scan) = (limits.ttl_after_finished, limits.expiry_scan);
        let mut f = facts(JobPhase::Succeeded);
        f.instance = InstanceState::Absent;
        // Its TTL far off: no timer; the expiry scan will wake it.
        f.in_phase = limits.launch_visibility;
        assert_eq!(decide(&f, &limits).step, Step::Kept);
        // A listing set aside is looked at again when it counts, TTL far off or not.
        f.set_aside = Some(Duration::from_secs(7));
        assert_eq!(decide(&f, &limits).step, Step::Wait(Duration::from_secs(7)));
        f.set_aside = None;
        // Within two scans of its end: the rest is a timer of its own.
        f.in_phase = ttl - 2 * scan;
        assert_eq!(decide(&f, &limits).step, Step::Wait(2 * scan));
        f.in_phase = ttl - 2 * scan - Duration::from_secs(1);
        assert_eq!(decide(&f, &limits).step, Step::Kept);

        // The scan wakes it no later than the pass would set that timer, and never a job whose
        // finish is not recorded (its pass never deletes it either).
        let now = Timestamp::now();
        let finished = |ago: Duration| Some(now - ago);
        assert!(!expiring(finished(limits.launch_visibility), &limits, now));
        let far = ttl - 2 * scan - Duration::from_secs(1);
        assert!(!expiring(finished(far), &limits, now));
        assert!(expiring(finished(ttl - 2 * scan), &limits, now));
        assert!(expiring(
            finished(ttl + Duration::from_secs(3600)),
            &limits,
            now
        ));
        assert!(!expiring(None, &limits, now));
        // Changes to it need no pass while its TTL is far, once EC2 has had time to list its
        // instance, unless a re-run is due.
        let status = RunnerJobStatus {
            phase: JobPhase::Succeeded,
            ..Default::default()
        };
        assert!(needs_no_pass(
            &status,
            finished(limits.launch_visibility),
            &limits,
            now
        ));
        assert!(!needs_no_pass(
            &status,
            finished(Duration::ZERO),
            &limits,
            now
        ));
        assert!(!needs_no_pass(
            &status,
            finished(ttl - 2 * scan),
            &limits,
            now
        ));
        assert!(!needs_no_pass(&status, None, &limits, now));
        let mut failed = RunnerJobStatus {
            phase: JobPhase::Failed,
            ..Default::default()
        };
        record_reason(&mut failed, INTERRUPTED_WHILE_RUNNING, String::new(), now);
        let far = finished(limits.launch_visibility);
        assert!(needs_no_pass(&failed, far, &limits, now));
        let rerunning = Limits {
            rerun_interrupted: true,
            ..limits
        };
        assert!(!needs_no_pass(&failed, far, &rerunning, now));
        let running = RunnerJobStatus {
            phase: JobPhase::Running,
            ..Default::default()
        };
        assert!(!needs_no_pass(&running, far, &limits, now));
        // However the scans fall, the first to wake it comes a scan or more before its TTL ends.
        for offset in (0..scan.as_secs()).step_by(7) {
            let first = (0u32..)
                .map(|k| now + Duration::from_secs(offset) + scan * k)
                .find(|at| expiring(Some(now), &limits, *at))
                .unwrap();
            assert!(first <= now + ttl - scan, "offset {offset}");
        }
    }

    #[test]
    fn each_notice_is_recorded_once_and_a_spot_notice_is_never_hidden() {
        assert!(notice_kind("spot-interruption").is_some() && notice_kind("rebalance").is_some());
        assert_eq!(notice_kind("reboot"), None);
        assert!(records_notice(None, "rebalance"));
        assert!(records_notice(Some("rebalance"), SPOT_INTERRUPTION));
        assert!(!records_notice(Some("rebalance"), "rebalance"));
        assert!(!records_notice(Some(SPOT_INTERRUPTION), "rebalance"));
        assert!(!records_notice(Some(SPOT_INTERRUPTION), SPOT_INTERRUPTION));
    }

    #[test]
    fn a_recorded_launch_is_unsettled_until_refused_answered_or_a_window_past() {
        let at = Timestamp::UNIX_EPOCH + Duration::from_secs(1000);
        let window = Duration::from_secs(60);
        let mut status = RunnerJobStatus::default();
        enter(&mut status, Launching, at);
        let never = |_: &str| false;
        assert!(
            !recorded_launch_unsettled(&status, never, at, window),
            "nothing recorded"
        );
        status.launch = Some(Box::new(crate::api::LaunchIntent::for_test("t")));
        assert!(recorded_launch_unsettled(
            &status,
            never,
            at + Duration::from_secs(59),
            window
        ));
        assert!(!recorded_launch_unsettled(
            &status,
            never,
            at + window,
            window
        ));
        assert!(
            !recorded_launch_unsettled(&status, |t| t == "t", at, window),
            "refused"
        );
    }

    #[test]
    fn a_slot_is_held_from_the_recorded_launch_until_the_job_finishes() {
        let status = |phase, launch: bool, instance: bool| RunnerJobStatus {
            phase,
            launch: (launch.then(|| crate::api::LaunchIntent::for_test("t"))).map(Box::new),
            instance: instance.then(|| crate::api::InstanceStatus {
                id: "i-1".into(),
                instance_type: "m7g.large".into(),
                zone: "z".into(),
                market: "onDemand".into(),
                launch_time: None,
            }),
            ..Default::default()
        };
        assert!(!holds_slot(None));
        assert!(!holds_slot(Some(&status(Pending, false, false))));
        assert!(holds_slot(Some(&status(Pending, true, false))));
        assert!(holds_slot(Some(&status(Pending, false, true))));
        for phase in [Launching, Booting, Running, Completing] {
            assert!(holds_slot(Some(&status(phase, false, false))));
        }
        assert!(!holds_slot(Some(&status(Succeeded, true, true))));
        assert!(!holds_slot(Some(&status(Failed, true, true))));
    }

    #[test]
    fn a_batch_instance_is_claimed_only_from_a_place_of_the_jobs_own() {
        let batch = super::super::launch::test_batch(&["a", "b", "c"], b"n");
        let token = batch[0].client_token.as_str();
        let status = |intent: &crate::api::LaunchIntent, phase, id: Option<&str>| RunnerJobStatus {
            phase,
            launch: Some(Box::new(intent.clone())),
            instance: id.map(|id| crate::api::InstanceStatus {
                id: id.into(),
                instance_type: "m7g.large".into(),
                zone: "z".into(),
                market: "onDemand".into(),
                launch_time: None,
            }),
            ..Default::default()
        };
        let a = status(&batch[0], Booting, Some("i-a"));
        assert_eq!(batch_claim("a", &a), Some((token, Some("i-a"))));
        assert!(claims_batch_instance("a", &a, "i-a", Some(token)));
        assert!(
            !claims_batch_instance("a", &a, "i-b", Some(token)),
            "another id"
        );
        assert!(
            !claims_batch_instance("a", &a, "i-a", Some("pacer-bx")),
            "another token"
        );
        assert!(!claims_batch_instance("a", &a, "i-a", None), "no token");
        // b's status given a's place claims nothing; nor does a record of no batch.
        assert_eq!(batch_claim("b", &a), None);
        assert!(!claims_batch_instance("b", &a, "i-a", Some(token)));
        let single = status(
            &crate::api::LaunchIntent::for_test(token),
            Booting,
            Some("i-a"),
        );
        assert_eq!(batch_claim("a", &single), None);

        // An instance of the batch that no job names.
        let now = Timestamp::UNIX_EPOCH + Duration::from_secs(10_000);
        let launched = now.as_second() - 10;
        let b_waiting = status(&batch[1], Launching, None);
        let b_done = status(&batch[1], Booting, Some("i-b"));
        let c_done = status(&batch[2], Booting, Some("i-c"));
        let not_yet = |r: Refusal| matches!(r, Refusal::NotYet(_));
        assert!(
            not_yet(unnamed_batch_instance(
                "i-x",
                &[&a, &b_waiting, &c_done],
                Some(launched),
                now
            )),
            "a member waits for the answer"
        );
        assert!(
            not_yet(unnamed_batch_instance(
                "i-x",
                &[&a, &b_done],
                Some(launched),
                now
            )),
            "young, and a member has not recorded the batch"
        );
        let old = now.as_second() - super::super::gc::BATCH_GRACE.as_secs() as i64;
        let denied = unnamed_batch_instance("i-x", &[&a, &b_done], Some(old), now);
        assert!(
            matches!(&denied, Refusal::Denied(why) if why.contains("i-a, i-b, not i-x")),
            "{denied:?}"
        );
        assert!(matches!(
            unnamed_batch_instance("i-x", &[&a, &b_done, &c_done], Some(launched), now),
            Refusal::Denied(_)
        ));
        // A finished member waits for nothing.
        let b_failed = status(&batch[1], Failed, None);
        assert!(matches!(
            unnamed_batch_instance("i-x", &[&a, &b_failed, &c_done], Some(launched), now),
            Refusal::Denied(_)
        ));
    }

    #[test]
    fn going_back_to_waiting_drops_the_recorded_launch() {
        let mut s = RunnerJobStatus::default();
        let now = Timestamp::UNIX_EPOCH;
        enter(&mut s, Launching, now);
        s.launch = Some(Box::new(crate::api::LaunchIntent::for_test("t")));
        enter(&mut s, Launching, now + Duration::from_secs(5));
        assert_eq!(s.phase_times.launching.as_ref().map(|t| t.0), Some(now));
        assert!(s.launch.is_some());
        enter(&mut s, Pending, now);
        assert!(s.launch.is_none());
    }

    #[test]
    fn the_oldest_waiting_jobs_are_woken_as_many_as_there_is_room() {
        let waiting = || vec![(4, "d"), (1, "a"), (3, "c"), (2, "b")];
        assert_eq!(to_wake(3, 1, waiting()), ["a", "b"]);
        assert_eq!(to_wake(9, 0, waiting()), ["a", "b", "c", "d"]);
        assert!(to_wake(3, 3, waiting()).is_empty());
        assert!(to_wake(3, 5, waiting()).is_empty());
    }

    fn facts(phase: JobPhase) -> Facts {
        Facts {
            phase,
            in_phase: Duration::from_secs(5),
            instance: InstanceState::Absent,
            registered: false,
            assigned: false,
            outcome: None,
            deleting: false,
            launch_unsettled: false,
            pool: PoolAdmission::Admitted,
            backoff_left: Duration::ZERO,
            attempt: 1,
            boot_failed: false,
            interrupted: false,
            witness: None,
            doubted: false,
            launch: None,
            launch_rounds: 0,
            rerun_due: false,
            rerun: None,
            set_aside: None,
        }
    }

    fn witness(job: GitHubJob, runner_busy: Option<bool>) -> Option<Witness> {
        Some(Witness { job, runner_busy })
    }

    fn alive() -> InstanceState {
        InstanceState::Alive { id: "i-1".into() }
    }

    fn gone() -> InstanceState {
        InstanceState::Gone {
            id: "i-1".into(),
            reason: "Server.SpotInstanceTermination".into(),
        }
    }

    fn mins(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    #[test]
    fn a_reason_recorded_again_keeps_its_time() {
        let at = |s| Timestamp::from_second(s).unwrap();
        let mut status = RunnerJobStatus::default();
        record_reason(&mut status, "PoolAtCapacity", "full".into(), at(1));
        record_reason(&mut status, "PoolAtCapacity", "full".into(), at(2));
        let time = |s: &RunnerJobStatus| s.last_error.as_ref().unwrap().time.clone().unwrap().0;
        assert_eq!(time(&status), at(1));
        record_reason(&mut status, "PoolAtCapacity", "still full".into(), at(3));
        assert_eq!(time(&status), at(3));
    }

    #[test]
    fn a_new_attempt_keeps_the_ended_instance_as_history_and_clears_the_rest() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let mut status = RunnerJobStatus {
            phase: Booting,
            attempts: 2,
            instance: Some(crate::api::InstanceStatus {
                id: "i-1".into(),
                instance_type: "m7i.large".into(),
                zone: "us-east-1a".into(),
                market: "spot".into(),
                launch_time: None,
            }),
            runner: Some(crate::api::RunnerStatus {
                id: 7,
                name: "pacer-x-1-1".into(),
            }),
            last_error: Some(Box::new(crate::api::LastError {
                reason: "Requeued".into(),
                message: "instance i-1 ended".into(),
                time: None,
            })),
            ..Default::default()
        };
        let ended = start_new_attempt(&mut status, "SpotInterrupted", now);
        assert_eq!(ended.map(|i| i.id).as_deref(), Some("i-1"));
        assert_eq!(status.attempt(), 2);
        let kept = &status.previous_attempts[0];
        assert_eq!(
            (kept.instance.as_str(), kept.reason.as_str()),
            ("i-1", "SpotInterrupted")
        );
        assert_eq!(kept.message, "instance i-1 ended");
        assert!(status.instance.is_none() && status.current_runner().is_none());
        assert_eq!(status.attempts, 0);
        // Every field of the attempt is gone, as the requeue's write clears it on the server.
        let written = serde_json::to_value(&status).unwrap();
        for field in ATTEMPT_FIELDS {
            assert!(written.get(field).is_none(), "{field} survived: {written}");
        }
        for _ in 0..20 {
            start_new_attempt(&mut status, "InstanceLost", now);
        }
        assert_eq!(status.previous_attempts.len(), MAX_PREVIOUS_ATTEMPTS);
        assert_eq!(status.previous_attempts[0].reason, "InstanceLost");
    }

    #[test]
    fn github_decides_whose_job_it_is() {
        let pacers = |name: &str| name.starts_with("pacer-");
        let job = |status, id, name, ours| github_job(status, id, name, ours, pacers);
        assert_eq!(job("queued", None, None, Some(7)), GitHubJob::Queued);
        assert_eq!(job("waiting", None, None, None), GitHubJob::Queued);
        assert_eq!(
            job("in_progress", Some(7), Some("r"), Some(7)),
            GitHubJob::Ours
        );
        assert_eq!(
            job("completed", Some(7), Some("r"), Some(7)),
            GitHubJob::Ours
        );
        assert!(matches!(
            job("in_progress", Some(8), Some("other"), Some(7)),
            GitHubJob::Elsewhere(why) if why.contains("other")
        ));
        // No runner of ours yet: a runner id on the job is someone else's.
        assert!(matches!(
            job("in_progress", Some(8), None, None),
            GitHubJob::Elsewhere(_)
        ));
        assert!(matches!(
            job("completed", None, None, Some(7)),
            GitHubJob::Elsewhere(_)
        ));
        // Another of Pacer's runners took it: its own job waits for this one's instance.
        assert_eq!(
            job("in_progress", Some(9), Some("pacer-prod-41-1"), None),
            GitHubJob::Queued
        );
    }

    #[test]
    fn every_transition() {
        /// Name, phase, how the facts differ, and the expected phase, step and reason.
        type Case = (
            &'static str,
            JobPhase,
            fn(&mut Facts),
            JobPhase,
            Step,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "pending launches",
                Pending,
                |_| {},
                Launching,
                Step::Launch,
                None,
            ),
            (
                "pending that waited asks GitHub before it launches",
                Pending,
                |f| f.in_phase = mins(2),
                Pending,
                Step::Consult,
                None,
            ),
            (
                "pending launches while GitHub says queued",
                Pending,
                |f| {
                    f.in_phase = mins(2);
                    f.witness = witness(GitHubJob::Queued, Some(false));
                },
                Launching,
                Step::Launch,
                None,
            ),
            (
                "pending launches when GitHub cannot say",
                Pending,
                |f| {
                    f.in_phase = mins(2);
                    f.witness = witness(GitHubJob::Unknown, None);
                },
                Launching,
                Step::Launch,
                None,
            ),
            (
                "pending whose job was taken elsewhere ends without a launch",
                Pending,
                |f| {
                    f.in_phase = mins(2);
                    f.witness = witness(GitHubJob::Elsewhere("taken by x".into()), None);
                },
                Failed,
                Step::Wait(POLL),
                Some("NotQueued"),
            ),
            (
                "pending waits for room",
                Pending,
                |f| f.pool = PoolAdmission::Full,
                Pending,
                Step::Wait(POLL),
                Some("PoolAtCapacity"),
            ),
            (
                "pending waits for a missing pool",
                Pending,
                |f| f.pool = PoolAdmission::Missing,
                Pending,
                Step::Wait(POLL),
                Some("PoolNotFound"),
            ),
            (
                "a pool being deleted launches nothing",
                Pending,
                |f| f.pool = PoolAdmission::Deleting,
                Pending,
                Step::Wait(POLL),
                Some("PoolDeleting"),
            ),
            (
                "a pool whose template lags its spec launches nothing",
                Pending,
                |f| f.pool = PoolAdmission::NotReady("generation 2 not built yet".into()),
                Pending,
                Step::Wait(POLL),
                Some("PoolNotReady"),
            ),
            (
                "pending waiting for room that the sweep doubts asks GitHub",
                Pending,
                |f| {
                    f.pool = PoolAdmission::Full;
                    f.doubted = true;
                },
                Pending,
                Step::Consult,
                None,
            ),
            (
                "pending waiting for room whose job GitHub took elsewhere ends",
                Pending,
                |f| {
                    f.pool = PoolAdmission::Full;
                    f.doubted = true;
                    f.witness = witness(GitHubJob::Elsewhere("cancelled".into()), None);
                },
                Failed,
                Step::Wait(POLL),
                Some("NotQueued"),
            ),
            (
                "pending waiting for room whose job GitHub still queues waits on",
                Pending,
                |f| {
                    f.pool = PoolAdmission::Full;
                    f.doubted = true;
                    f.witness = witness(GitHubJob::Queued, Some(false));
                },
                Pending,
                Step::Wait(POLL),
                Some("PoolAtCapacity"),
            ),
            (
                "pending for a missing pool whose job GitHub says is over ends",
                Pending,
                |f| {
                    f.pool = PoolAdmission::Missing;
                    f.doubted = true;
                    f.witness = witness(GitHubJob::Elsewhere("completed".into()), None);
                },
                Failed,
                Step::Wait(POLL),
                Some("NotQueued"),
            ),
            (
                "pending waits out a backoff",
                Pending,
                |f| f.backoff_left = Duration::from_secs(30),
                Pending,
                Step::Wait(Duration::from_secs(30)),
                None,
            ),
            (
                "pending adopts an instance launched before a crash",
                Pending,
                |f| f.instance = alive(),
                Booting,
                Step::Wait(POLL),
                None,
            ),
            (
                "launching sees its instance",
                Launching,
                |f| f.instance = alive(),
                Booting,
                Step::Wait(POLL),
                None,
            ),
            (
                "launching sends the recorded launch again when its answer is not recorded",
                Launching,
                |_| {},
                Launching,
                Step::Launch,
                None,
            ),
            (
                "a launch EC2 did not answer is sent again later",
                Launching,
                |f| f.launch = Some(LaunchAnswer::Unanswered("throttled".into())),
                Launching,
                Step::Wait(Duration::from_secs(5)),
                Some("LaunchUnanswered"),
            ),
            (
                "no capacity for one offering tries the next at once",
                Launching,
                |f| {
                    f.launch = Some(LaunchAnswer::NoCapacity {
                        left: true,
                        why: "no m7g.large in a".into(),
                    })
                },
                Pending,
                Step::Wait(Duration::ZERO),
                Some("InsufficientCapacity"),
            ),
            (
                "no capacity anywhere backs off",
                Launching,
                |f| {
                    f.launch_rounds = 1;
                    f.launch = Some(LaunchAnswer::NoCapacity {
                        left: false,
                        why: String::new(),
                    })
                },
                Pending,
                Step::Backoff(super::super::launch::backoff(1)),
                Some("InsufficientCapacity"),
            ),
            (
                "no capacity after the last round fails",
                Launching,
                |f| {
                    f.launch_rounds = 12;
                    f.launch = Some(LaunchAnswer::NoCapacity {
                        left: false,
                        why: String::new(),
                    })
                },
                Failed,
                Step::Wait(POLL),
                Some("InsufficientCapacity"),
            ),
            (
                "a refused launch fails the job",
                Launching,
                |f| f.launch = Some(LaunchAnswer::Refused("UnauthorizedOperation".into())),
                Failed,
                Step::Wait(POLL),
                Some("LaunchFailed"),
            ),
            (
                "a missing template waits for the pool to recreate it, keeping the slot",
                Launching,
                |f| f.launch = Some(LaunchAnswer::TemplateMissing("gone".into())),
                Launching,
                Step::Wait(Duration::from_secs(5)),
                Some("LaunchTemplateMissing"),
            ),
            (
                "a pool gone while launching sends the job back to wait",
                Launching,
                |f| f.launch = Some(LaunchAnswer::PoolNotReady("gone".into())),
                Pending,
                Step::Wait(POLL),
                Some("PoolNotReady"),
            ),
            (
                "booting runner registers",
                Booting,
                |f| {
                    f.instance = alive();
                    f.registered = true
                },
                Running,
                Step::Wait(POLL),
                None,
            ),
            (
                "booting times out: the instance goes first",
                Booting,
                |f| {
                    f.instance = alive();
                    f.in_phase = mins(10)
                },
                Booting,
                Step::Terminate,
                Some("BootTimeout"),
            ),
            (
                "a timed-out boot whose job is still queued is tried again",
                Booting,
                |f| {
                    f.instance = gone();
                    f.in_phase = mins(11);
                    f.witness = witness(GitHubJob::Queued, Some(false))
                },
                Pending,
                Step::Requeue { why: "BootTimeout" },
                Some("Requeued"),
            ),
            (
                "instance gone while booting: GitHub is asked first",
                Booting,
                |f| f.instance = gone(),
                Booting,
                Step::Consult,
                None,
            ),
            (
                "instance gone while booting, the job still queued: a new attempt",
                Booting,
                |f| {
                    f.instance = gone();
                    f.witness = witness(GitHubJob::Queued, None)
                },
                Pending,
                Step::Requeue {
                    why: "SpotInterrupted",
                },
                Some("Requeued"),
            ),
            (
                "instance gone while launching, the job still queued: a new attempt",
                Launching,
                |f| {
                    f.instance = InstanceState::Gone {
                        id: "i-1".into(),
                        reason: "Client.UserInitiatedShutdown".into(),
                    };
                    f.witness = witness(GitHubJob::Queued, None)
                },
                Pending,
                Step::Requeue {
                    why: "InstanceLost",
                },
                Some("Requeued"),
            ),
            (
                "instance gone, the job queued, but no attempts left",
                Booting,
                |f| {
                    f.instance = gone();
                    f.attempt = 3;
                    f.witness = witness(GitHubJob::Queued, None)
                },
                Failed,
                Step::Wait(POLL),
                Some("AttemptsExhausted"),
            ),
            (
                "instance gone and the job taken by another runner: demand retires",
                Booting,
                |f| {
                    f.instance = gone();
                    f.witness = witness(GitHubJob::Elsewhere("taken by runner x".into()), None)
                },
                Failed,
                Step::Wait(POLL),
                Some("NotQueued"),
            ),
            (
                "instance gone and GitHub unreachable: wait, decide nothing",
                Booting,
                |f| {
                    f.instance = gone();
                    f.witness = witness(GitHubJob::Unknown, None)
                },
                Booting,
                Step::Wait(POLL),
                Some("GitHubUnavailable"),
            ),
            (
                "spot instance reclaimed while its runner ran the job (webhook seen)",
                Running,
                |f| {
                    f.instance = gone();
                    f.assigned = true
                },
                Failed,
                Step::Wait(Duration::ZERO),
                Some(INTERRUPTED_WHILE_RUNNING),
            ),
            (
                "spot instance reclaimed while its runner ran the job (GitHub says so)",
                Running,
                |f| {
                    f.instance = gone();
                    f.witness = witness(GitHubJob::Ours, Some(false))
                },
                Failed,
                Step::Wait(Duration::ZERO),
                Some(INTERRUPTED_WHILE_RUNNING),
            ),
            (
                "a failed boot is terminated, then replaced",
                Booting,
                |f| {
                    f.instance = alive();
                    f.boot_failed = true;
                    f.outcome = Some(Outcome::Failure)
                },
                Booting,
                Step::Terminate,
                None,
            ),
            (
                "a failed boot whose instance is gone is tried again",
                Booting,
                |f| {
                    f.instance = gone();
                    f.boot_failed = true;
                    f.outcome = Some(Outcome::Failure);
                    f.witness = witness(GitHubJob::Queued, None)
                },
                Pending,
                Step::Requeue { why: "BootFailed" },
                Some("Requeued"),
            ),
            (
                "a job of a missing pool ends after the deadline",
                Pending,
                |f| {
                    f.pool = PoolAdmission::Missing;
                    f.in_phase = mins(15)
                },
                Failed,
                Step::Wait(POLL),
                Some("PoolGone"),
            ),
            (
                "the runner reported and its instance already shut down",
                Running,
                |f| {
                    f.instance = gone();
                    f.outcome = Some(Outcome::Success)
                },
                Completing,
                Step::Wait(Duration::ZERO),
                None,
            ),
            (
                "running completes",
                Running,
                |f| {
                    f.instance = alive();
                    f.outcome = Some(Outcome::Success)
                },
                Completing,
                Step::Terminate,
                None,
            ),
            (
                "a runner past the idle limit: GitHub is asked first",
                Running,
                |f| {
                    f.instance = alive();
                    f.in_phase = mins(10)
                },
                Running,
                Step::Consult,
                None,
            ),
            (
                "a runner GitHub reports idle goes after the idle limit",
                Running,
                |f| {
                    f.instance = alive();
                    f.in_phase = mins(10);
                    f.witness = witness(GitHubJob::Elsewhere("taken".into()), Some(false))
                },
                Completing,
                Step::Terminate,
                Some("RunnerIdle"),
            ),
            (
                "a busy runner whose in_progress was lost is never cut off",
                Running,
                |f| {
                    f.instance = alive();
                    f.in_phase = mins(12);
                    f.witness = witness(GitHubJob::Elsewhere("taken".into()), Some(true))
                },
                Running,
                Step::Wait(IDLE_RECHECK),
                None,
            ),
            (
                "a runner GitHub cannot vouch for is kept and asked about again",
                Running,
                |f| {
                    f.instance = alive();
                    f.in_phase = mins(12);
                    f.witness = witness(GitHubJob::Unknown, None)
                },
                Running,
                Step::Wait(IDLE_RECHECK),
                Some("GitHubUnavailable"),
            ),
            (
                "running past max runtime asks GitHub first",
                Running,
                |f| {
                    f.instance = alive();
                    f.assigned = true;
                    f.in_phase = mins(360)
                },
                Running,
                Step::Consult,
                None,
            ),
            (
                "running past max runtime ends even a busy runner",
                Running,
                |f| {
                    f.instance = alive();
                    f.assigned = true;
                    f.in_phase = mins(360);
                    f.witness = witness(GitHubJob::Ours, Some(true))
                },
                Completing,
                Step::Terminate,
                Some("MaxRuntimeExceeded"),
            ),
            (
                "running past max runtime ends when GitHub cannot say",
                Running,
                |f| {
                    f.instance = alive();
                    f.assigned = true;
                    f.in_phase = mins(360);
                    f.witness = witness(GitHubJob::Unknown, None)
                },
                Completing,
                Step::Terminate,
                Some("MaxRuntimeExceeded"),
            ),
            (
                "cancelled while launching",
                Launching,
                |f| f.outcome = Some(Outcome::Cancelled),
                Completing,
                Step::Terminate,
                Some("Cancelled"),
            ),
            (
                "cancelled before launch",
                Pending,
                |f| f.outcome = Some(Outcome::Cancelled),
                Failed,
                Step::Wait(POLL),
                Some("Cancelled"),
            ),
            (
                "completing terminates",
                Completing,
                |f| {
                    f.instance = alive();
                    f.outcome = Some(Outcome::Success)
                },
                Completing,
                Step::Terminate,
                None,
            ),
            (
                "completing ends in success",
                Completing,
                |f| {
                    f.instance = gone();
                    f.outcome = Some(Outcome::Success)
                },
                Succeeded,
                Step::Wait(POLL),
                None,
            ),
            (
                "completing ends in failure",
                Completing,
                |f| {
                    f.instance = InstanceState::Absent;
                    f.outcome = Some(Outcome::Failure)
                },
                Failed,
                Step::Wait(POLL),
                None,
            ),
            (
                "completion reported twice changes nothing",
                Completing,
                |f| {
                    f.instance = alive();
                    f.outcome = Some(Outcome::Success)
                },
                Completing,
                Step::Terminate,
                None,
            ),
            (
                "a just-finished job keeps looking while EC2 may not list its instance yet",
                Succeeded,
                |_| {},
                Succeeded,
                Step::Wait(POLL),
                None,
            ),
            (
                "late events for a finished job are ignored",
                Succeeded,
                |f| {
                    f.in_phase = mins(2);
                    f.outcome = Some(Outcome::Failure);
                    f.registered = true
                },
                Succeeded,
                Step::Kept,
                None,
            ),
            (
                "a finished job is deleted after its TTL",
                Failed,
                |f| f.in_phase = mins(60),
                Failed,
                Step::Delete,
                None,
            ),
            (
                "a finished job with a live instance terminates it",
                Succeeded,
                |f| f.instance = alive(),
                Succeeded,
                Step::Terminate,
                None,
            ),
            (
                "deleting terminates first",
                Running,
                |f| {
                    f.deleting = true;
                    f.instance = alive()
                },
                Completing,
                Step::Terminate,
                Some("Deleted"),
            ),
            (
                "deleting releases once nothing is left",
                Completing,
                |f| {
                    f.deleting = true;
                    f.instance = gone()
                },
                Failed,
                Step::Release,
                None,
            ),
            (
                "deleting waits for a launch whose answer is not in",
                Pending,
                |f| {
                    f.deleting = true;
                    f.launch_unsettled = true
                },
                Pending,
                Step::Wait(Duration::from_secs(2)),
                None,
            ),
            (
                "deleting a finished job keeps its phase",
                Succeeded,
                |f| f.deleting = true,
                Succeeded,
                Step::Release,
                None,
            ),
        ];
        for (name, phase, change, want_phase, want_step, want_reason) in cases {
            let mut f = facts(phase);
            change(&mut f);
            let d = decide(&f, &Limits::default());
            assert_eq!((d.phase, &d.step), (want_phase, &want_step), "{name}");
            assert_eq!(d.reason.as_ref().map(|r| r.0), want_reason, "{name}");
        }
    }

    #[test]
    fn an_instance_bootstraps_only_within_the_boot_timeout_and_the_clock_skew() {
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let timeout = Duration::from_secs(600);
        let at = |offset: i64| now + k8s_openapi::jiff::SignedDuration::from_secs(offset);
        assert!(boots_in_time(at(-600), now, timeout));
        assert!(!boots_in_time(at(-601), now, timeout));
        assert!(boots_in_time(at(300), now, timeout));
        assert!(!boots_in_time(at(301), now, timeout));
    }

    #[test]
    fn a_job_takes_one_bootstrap_while_it_waits_for_its_instance() {
        let ask = |status: &RunnerJobStatus, instance: &str, now| {
            let claimant = Claimant {
                instance,
                job_uid: "uid-1",
            };
            may_bootstrap(Some("uid-1"), status, &claimant, now)
        };
        let mut status = RunnerJobStatus {
            phase: JobPhase::Booting,
            ..Default::default()
        };
        assert_eq!(ask(&status, "i-2", Timestamp::now()), Ok(()));
        status.phase = JobPhase::Launching;
        assert_eq!(ask(&status, "i-2", Timestamp::now()), Ok(()));
        status.phase = JobPhase::Pending;
        assert!(matches!(
            ask(&status, "i-2", Timestamp::now()),
            Err(Refusal::NotYet(_))
        ));
        status.phase = JobPhase::Running;
        assert!(
            matches!(ask(&status, "i-2", Timestamp::now()), Err(Refusal::Never(w)) if w.contains("Running"))
        );
        status.phase = JobPhase::Booting;
        status.previous_attempts.push(crate::api::PreviousAttempt {
            instance: "i-1".into(),
            reason: "InstanceLost".into(),
            message: String::new(),
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        });
        assert!(
            matches!(ask(&status, "i-1", Timestamp::now()), Err(Refusal::Never(w)) if w.contains("replaced"))
        );
        status.boot = Some(Box::new(crate::api::BootStatus {
            instance_id: "i-2".into(),
            bootstrapped_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
            token_sha256: String::new(),
            answer: None,
            runner: None,
            runner_version: None,
            log_tail: None,
        }));
        // The same instance asking again at once may collect its answer; another, or later,
        // never.
        assert!(matches!(
            ask(&status, "i-2", Timestamp::now()),
            Err(Refusal::Claimed(_))
        ));
        assert!(
            matches!(ask(&status, "i-3", Timestamp::now()), Err(Refusal::Never(w)) if w.contains("already"))
        );
        // A claim left with nothing recorded (its replica died before minting the runner) is
        // the same instance's to make again once it is CLAIM_ORPHANED old; never another's.
        let orphan_age = Timestamp::now() + CLAIM_ORPHANED + Duration::from_secs(1);
        assert_eq!(ask(&status, "i-2", orphan_age), Ok(()));
        assert!(
            matches!(ask(&status, "i-3", orphan_age), Err(Refusal::Never(w)) if w.contains("already"))
        );
        // With its runner recorded, the claim stands: collected, or never.
        (status.boot.as_mut().unwrap()).runner = Some(crate::api::RunnerStatus {
            id: 7,
            name: "pacer-run-1".into(),
        });
        assert!(matches!(
            ask(&status, "i-2", orphan_age),
            Err(Refusal::Claimed(_))
        ));
        let later = Timestamp::now() + BOOT_ANSWER_HOLD;
        assert!(
            matches!(ask(&status, "i-2", later), Err(Refusal::Never(w)) if w.contains("already"))
        );
    }

    #[test]
    fn a_claim_is_given_back_or_its_answer_put_back_only_while_it_is_that_claim_uncollected() {
        let claim = |instance: &str, token: &str| crate::api::BootStatus {
            instance_id: instance.into(),
            bootstrapped_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
            token_sha256: token.into(),
            answer: None,
            runner: None,
            runner_version: None,
            log_tail: None,
        };
        let ours = claim("i-1", "t1");
        assert!(still_ours(Some(&ours), &ours));
        assert!(!still_ours(None, &ours));
        // Another instance, or the same one under a newer claim (another token), is not ours.
        assert!(!still_ours(Some(&claim("i-2", "t1")), &ours));
        assert!(!still_ours(Some(&claim("i-1", "t2")), &ours));

        // Given back while nothing was recorded, or while the answer waits; not once collected.
        assert!(may_give_back(Some(&ours), &ours));
        let runner = crate::api::RunnerStatus {
            id: 7,
            name: "r".into(),
        };
        let answered = crate::api::BootStatus {
            runner: Some(runner.clone()),
            answer: Some("sealed".into()),
            ..ours.clone()
        };
        assert!(may_give_back(Some(&answered), &ours));
        let collected = crate::api::BootStatus {
            answer: None,
            ..answered.clone()
        };
        assert!(!may_give_back(Some(&collected), &ours));
        assert!(!may_give_back(Some(&claim("i-1", "t2")), &ours));
        assert!(!may_give_back(None, &ours));

        // Put back only onto the same claim, taken (no answer there) and its runner not started.
        let status = |boot: Option<crate::api::BootStatus>| RunnerJobStatus {
            boot: boot.map(Box::new),
            ..Default::default()
        };
        assert!(may_put_back(
            Some(&status(Some(collected.clone()))),
            "i-1",
            "t1"
        ));
        assert!(!may_put_back(
            Some(&status(Some(collected.clone()))),
            "i-1",
            "t2"
        ));
        assert!(!may_put_back(
            Some(&status(Some(collected.clone()))),
            "i-2",
            "t1"
        ));
        assert!(!may_put_back(Some(&status(Some(answered))), "i-1", "t1"));
        assert!(!may_put_back(Some(&status(None)), "i-1", "t1"));
        assert!(!may_put_back(None, "i-1", "t1"));
        let started = RunnerJobStatus {
            runner: Some(runner),
            ..status(Some(collected))
        };
        assert!(!may_put_back(Some(&started), "i-1", "t1"));
    }

    #[test]
    fn a_listing_doubts_only_jobs_that_waited_before_it_and_are_missing_from_it() {
        let listed_at = Timestamp::now();
        let recheck = mins(1);
        let job = |id: i64, repository: &str, age: Duration, phase: JobPhase| {
            let spec = crate::api::RunnerJobSpec {
                pool_name: "linux".into(),
                job_id: id,
                run_id: 1,
                repository: repository.into(),
                labels: vec![],
                installation_id: None,
            };
            let mut job = RunnerJob::for_queued_job("ns", &format!("gh-job-{id}"), spec);
            let created = listed_at - k8s_openapi::jiff::SignedDuration::try_from(age).unwrap();
            job.metadata.creation_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created),
            );
            job.status = Some(RunnerJobStatus {
                phase,
                ..Default::default()
            });
            job
        };
        let queued = std::collections::HashSet::from([7]);
        let doubted = |j: &RunnerJob| doubted_by_listing(j, "org/api", &queued, listed_at, recheck);
        assert!(doubted(&job(1, "Org/API", mins(2), JobPhase::Pending)));
        // Listed as queued, another repository, too young, or past waiting: no doubt.
        assert!(!doubted(&job(7, "org/api", mins(2), JobPhase::Pending)));
        assert!(!doubted(&job(1, "org/web", mins(2), JobPhase::Pending)));
        assert!(!doubted(&job(
            1,
            "org/api",
            Duration::from_secs(30),
            JobPhase::Pending
        )));
        assert!(!doubted(&job(1, "org/api", mins(2), JobPhase::Booting)));
    }

    #[test]
    fn a_missing_template_is_tried_less_and_less_often() {
        let limits = Limits::default();
        let wait = |spent: Duration| {
            let mut f = facts(JobPhase::Launching);
            f.in_phase = spent;
            f.launch = Some(LaunchAnswer::TemplateMissing("gone".into()));
            decide(&f, &limits).step
        };
        let unit = limits.backoff_unit;
        assert_eq!(wait(Duration::ZERO), Step::Wait(unit));
        assert_eq!(wait(mins(2)), Step::Wait(mins(1)));
        assert_eq!(wait(mins(60)), Step::Wait(TEMPLATE_RETRY_MAX));
    }

    #[test]
    fn past_max_runtime_the_reason_says_what_github_saw_was_cut_off() {
        let limits = Limits::default();
        let message = |job: GitHubJob, busy: Option<bool>| {
            let mut f = facts(JobPhase::Running);
            f.instance = alive();
            f.assigned = true;
            f.in_phase = mins(361);
            f.witness = witness(job, busy);
            decide(&f, &limits).reason.unwrap().1
        };
        assert!(message(GitHubJob::Ours, Some(true)).contains("still running its job"));
        assert!(message(GitHubJob::Ours, Some(false)).contains("completion was never reported"));
        let idle = message(GitHubJob::Elsewhere("taken".into()), Some(false));
        assert!(idle.contains("having taken no job"), "{idle}");
        assert!(message(GitHubJob::Unknown, None).contains("could not say"));
        let unasked = message(GitHubJob::Elsewhere(NO_APP_TO_ASK.into()), Some(false));
        assert!(unasked.contains("no GitHub App"), "{unasked}");
    }

    #[test]
    fn only_the_instance_a_job_launched_bootstraps_it() {
        let mut status = RunnerJobStatus {
            phase: JobPhase::Booting,
            ..Default::default()
        };
        let now = Timestamp::now();
        let ours = Claimant {
            instance: "i-1",
            job_uid: "uid-1",
        };
        // Its launch not seen yet: the tags decide.
        assert_eq!(may_bootstrap(Some("uid-1"), &status, &ours, now), Ok(()));
        status.instance = Some(crate::api::InstanceStatus {
            id: "i-1".into(),
            instance_type: "m7i.large".into(),
            zone: "us-east-1a".into(),
            market: "spot".into(),
            launch_time: None,
        });
        assert_eq!(may_bootstrap(Some("uid-1"), &status, &ours, now), Ok(()));
        // Another instance carrying the job's tags.
        let copied = Claimant {
            instance: "i-2",
            ..ours
        };
        assert!(matches!(
            may_bootstrap(Some("uid-1"), &status, &copied, now),
            Err(Refusal::Denied(w)) if w.contains("launched instance i-1, not i-2")
        ));
        // The RunnerJob was deleted and made again under its name: not the instance's job.
        for uid in [Some("uid-2"), None] {
            assert!(matches!(
                may_bootstrap(uid, &status, &ours, now),
                Err(Refusal::Denied(w)) if w.contains("uid-1")
            ));
        }
    }
}
