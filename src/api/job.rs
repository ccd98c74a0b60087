//! `RunnerJob`: one runner for one queued workflow job.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The finalizer that keeps a RunnerJob until its instance is terminated.
pub const FINALIZER: &str = "pacer.dev/instance";

impl RunnerJob {
    /// A RunnerJob as Pacer records it for a queued workflow job: born with its finalizer, so
    /// its launch costs the API server no extra write. (The controller adds the finalizer to
    /// RunnerJobs created any other way before it launches anything for them.)
    pub fn for_queued_job(namespace: &str, name: &str, spec: RunnerJobSpec) -> Self {
        let mut job = Self::new(name, spec);
        job.metadata.namespace = Some(namespace.into());
        job.metadata.finalizers = Some(vec![FINALIZER.into()]);
        job
    }
}

/// Demand for one ephemeral runner, recorded when GitHub queues a workflow job that a pool
/// can serve. Its spec never changes after creation.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pacer.dev",
    version = "v1alpha1",
    kind = "RunnerJob",
    doc = "One ephemeral runner for one queued GitHub Actions workflow job.",
    plural = "runnerjobs",
    shortname = "rj",
    category = "pacer",
    namespaced,
    status = "RunnerJobStatus",
    selectable = ".status.instance.id",
    selectable = ".status.launch.clientToken",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.poolName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Repository","type":"string","jsonPath":".spec.repository"}"#,
    printcolumn = r#"{"name":"Job","type":"integer","jsonPath":".spec.jobId"}"#,
    printcolumn = r#"{"name":"Instance","type":"string","jsonPath":".status.instance.id"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".status.instance.type","priority":1}"#,
    printcolumn = r#"{"name":"Zone","type":"string","jsonPath":".status.instance.zone","priority":1}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.attempts","priority":1}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.lastError.reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RunnerJobSpec {
    /// The RunnerPool (same namespace) whose runners serve this job.
    #[schemars(length(min = 1, max = 253))]
    pub pool_name: String,

    /// GitHub's id of the queued workflow job.
    #[schemars(range(min = 1))]
    pub job_id: i64,

    /// GitHub's id of the workflow run the job belongs to.
    #[schemars(range(min = 1))]
    pub run_id: i64,

    /// The repository as `owner/name`.
    #[schemars(
        length(min = 3, max = 140),
        regex(pattern = r"^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$")
    )]
    pub repository: String,

    /// Labels the job asked for.
    #[schemars(length(max = 100), inner(length(min = 1, max = 256)))]
    pub labels: Vec<String>,

    /// The GitHub App installation that delivered the job. Absent when the job came from a
    /// repository or organization webhook: the installation is then looked up from the
    /// repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub installation_id: Option<i64>,
}

/// Where a RunnerJob is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum JobPhase {
    /// Waiting for a launch (capacity, the pool's limit, or a retry backoff).
    #[default]
    Pending,
    /// A launch request is in flight or its instance is not yet seen.
    Launching,
    /// The instance exists; the runner has not registered yet.
    Booting,
    /// The runner registered with GitHub.
    Running,
    /// The job is over; the instance is being terminated and the runner removed.
    Completing,
    /// Finished and cleaned up; the job reported success.
    Succeeded,
    /// Finished and cleaned up; the job, the launch or the instance failed.
    Failed,
}

impl JobPhase {
    /// Succeeded or Failed: nothing more happens but the TTL.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

// The parts present only for part of a job's life are boxed: thousands of RunnerJobs are
// cached, each in one allocation of this struct's size, and most of them have finished (no
// launch, cost, boot or error kept; see `controller::job::slim`).
/// What Pacer observed for a RunnerJob.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerJobStatus {
    /// Where the job is in its life.
    #[serde(default)]
    pub phase: JobPhase,

    /// Launch attempts made so far.
    #[serde(default)]
    pub attempts: i32,

    /// The launch of this attempt, recorded before EC2 is asked: after a restart it is sent
    /// again as it is, under the same ClientToken, so one attempt never gets two instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Box<LaunchIntent>>,

    /// The EC2 instance serving the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceStatus>,

    /// The GitHub runner registered on the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerStatus>,

    /// Prices at launch time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Box<CostSnapshot>>,

    /// The instance's boot: when it proved its identity and took its runner config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Box<BootStatus>>,

    /// When each phase was entered.
    #[serde(default)]
    pub phase_times: PhaseTimes,

    /// Latest observations, such as `Launched` and `RunnerRegistered`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The last error, with a reason a human can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Box<LastError>>,

    /// How the job ended, as the runner's callback or GitHub's webhook reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<Completion>,

    /// The workflow job the runner actually took, from GitHub's `in_progress` webhook. A
    /// just-in-time runner takes any queued job its labels satisfy, not necessarily the one
    /// this RunnerJob was recorded for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_job: Option<Box<AssignedJob>>,

    /// The notice EC2 gave the current instance, as it reported it: a spot interruption or a
    /// rebalance recommendation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interruption: Option<Box<Interruption>>,

    /// Earliest time of the next launch attempt, after a capacity failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Time>,

    /// The instances tried before the current one, oldest first, each ended before its runner
    /// took a job (lost, boot failure, boot timeout, interruption). At most 10 are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub previous_attempts: Vec<PreviousAttempt>,

    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A notice EC2 gave an instance.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Interruption {
    /// `spot-interruption` (the instance is reclaimed in two minutes) or `rebalance` (it is at
    /// elevated risk of interruption).
    pub kind: String,
    /// When the instance reported it.
    pub reported_at: Time,
    /// What IMDS said, as the instance read it (at most 512 characters).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 512))]
    pub notice: String,
}

/// An instance a RunnerJob went through and why it was replaced.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviousAttempt {
    /// The instance id; empty when the launch never produced one.
    pub instance: String,
    /// Why it ended: `InstanceLost`, `BootFailed`, `BootTimeout` or `SpotInterrupted`.
    pub reason: String,
    pub message: String,
    pub time: Time,
}

impl RunnerJobStatus {
    /// Which try this is: 1 for the first instance, 2 after one was replaced, ...
    pub fn attempt(&self) -> u32 {
        self.previous_attempts.len() as u32 + 1
    }

    /// The runner of this attempt: registered, or handed out at bootstrap.
    pub fn current_runner(&self) -> Option<&RunnerStatus> {
        self.runner
            .as_ref()
            .or_else(|| self.boot.as_ref().and_then(|b| b.runner.as_ref()))
    }
}

/// One launch as Pacer sends it to EC2 (CreateFleet or RunInstances).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LaunchIntent {
    /// EC2's idempotency token: the same token and parameters are the same launch.
    pub client_token: String,
    /// The pool's launch template (`lt-…`) and its version.
    pub launch_template_id: String,
    pub launch_template_version: i64,
    /// `spot` or `onDemand`.
    pub market: String,
    /// Sent as an instant CreateFleet (else RunInstances).
    #[serde(default)]
    pub fleet: bool,
    /// CreateFleet's allocation strategy, as EC2 spells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_strategy: Option<String>,
    /// The offerings EC2 may choose from, most preferred first.
    #[schemars(length(max = 200))]
    pub offerings: Vec<LaunchOffering>,
    /// The tags the request puts on the instance and its volumes.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Set when the launch is one batch for several jobs of the pool: how many instances it
    /// asks for, and which of them (in EC2's answer sorted by instance id) is this job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<LaunchBatch>,
    /// Set when the job takes one of its pool's prepared, stopped warm instances instead of
    /// launching one: that instance is started (StartInstances), never stopped again, and
    /// terminated when the job is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmStart>,
}

/// A warm instance a job took.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmStart {
    /// The instance id (`i-…`).
    #[schemars(length(min = 1, max = 64))]
    pub instance: String,
    /// When the job took it, before it was started: the identity document it bootstraps with
    /// must be from a start no earlier.
    pub taken_at: Time,
}

#[cfg(test)]
impl LaunchIntent {
    /// A single job's on-demand RunInstances under `token`, for tests.
    pub fn for_test(token: &str) -> Self {
        Self {
            client_token: token.into(),
            launch_template_id: "lt-1".into(),
            launch_template_version: 1,
            market: "onDemand".into(),
            fleet: false,
            allocation_strategy: None,
            offerings: Vec::new(),
            tags: Default::default(),
            batch: None,
            warm: None,
        }
    }
}

/// A job's place in a batched launch. The token is a digest of the members, the request and
/// the nonce, so a place can be checked against the job that records it: no other job's
/// status can claim it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LaunchBatch {
    /// Instances the batch asks for: one per member job.
    #[schemars(range(min = 2, max = 100))]
    pub size: u32,
    /// This job's member number, from 0: the instance at this place among the batch's
    /// instances sorted by id is this job's.
    #[schemars(range(max = 99))]
    pub member: u32,
    /// Every member, in order: `uid/instance attempt/launch attempt`.
    #[schemars(length(max = 100))]
    #[serde(default)]
    pub members: Vec<String>,
    /// The batch's nonce, hex.
    #[serde(default)]
    pub nonce: String,
}

/// An instance type in a subnet.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LaunchOffering {
    #[serde(rename = "type")]
    pub instance_type: String,
    pub subnet: String,
}

/// What the instance did at boot. Set once, by `POST /api/runner/bootstrap`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootStatus {
    /// The instance that bootstrapped; only it may call back.
    pub instance_id: String,
    /// When it proved its identity and received its runner config.
    pub bootstrapped_at: Time,
    /// SHA-256 (hex) of the callback token it received. The token itself is kept only sealed
    /// in `answer`, until the instance collects it.
    pub token_sha256: String,
    /// The answer the instance collects (its JIT runner config and callback token), sealed
    /// under Pacer's callback key for this RunnerJob and instance: kept from when it is made
    /// until the instance collects it, from whichever replica it asks (one never collected
    /// stays until a new attempt clears it or the RunnerJob goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub answer: Option<String>,
    /// The runner its just-in-time config registers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerStatus>,
    /// actions/runner release it was told to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_version: Option<String>,
    /// The end of the boot log (at most 4 KiB), when the boot failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub log_tail: Option<String>,
}

/// A report that the job is over.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Completion {
    /// How it ended.
    pub result: JobResult,
    /// When it was reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<Time>,
}

/// A workflow job a runner took.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssignedJob {
    /// GitHub's id of the workflow job.
    pub job_id: i64,
    /// GitHub's id of its workflow run.
    pub run_id: i64,
    /// The repository as `owner/name`.
    pub repository: String,
}

/// How a job ended.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum JobResult {
    Success,
    Failure,
    Cancelled,
}

/// The EC2 instance of a RunnerJob.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Instance id (`i-…`).
    pub id: String,
    /// Instance type.
    #[serde(rename = "type")]
    pub instance_type: String,
    /// Availability zone.
    pub zone: String,
    /// `spot` or `onDemand`.
    pub market: String,
    /// When EC2 launched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_time: Option<Time>,
}

/// The GitHub runner of a RunnerJob.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerStatus {
    /// GitHub's runner id.
    pub id: i64,
    /// Runner name as GitHub shows it.
    pub name: String,
}

/// Prices captured when the instance launched. Decimal strings, to keep them exact.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CostSnapshot {
    /// Hourly price paid: the spot price for spot instances, else the on-demand price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly_price: Option<String>,
    /// On-demand hourly price of the same type, for comparison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_hourly_price: Option<String>,
    /// Estimated cost of the whole run, set when the job finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<String>,
    /// ISO 4217 currency code of the prices.
    pub currency: String,
}

/// When each phase was entered.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTimes {
    /// Entered Pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Time>,
    /// Entered Launching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launching: Option<Time>,
    /// Entered Booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booting: Option<Time>,
    /// Entered Running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Time>,
    /// Entered Completing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completing: Option<Time>,
    /// Entered Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Time>,
}

impl PhaseTimes {
    /// When `phase` was entered; Succeeded and Failed share `finished`.
    pub fn of(&self, phase: JobPhase) -> Option<&Time> {
        match phase {
            JobPhase::Pending => self.pending.as_ref(),
            JobPhase::Launching => self.launching.as_ref(),
            JobPhase::Booting => self.booting.as_ref(),
            JobPhase::Running => self.running.as_ref(),
            JobPhase::Completing => self.completing.as_ref(),
            JobPhase::Succeeded | JobPhase::Failed => self.finished.as_ref(),
        }
    }

    /// The field recording when `phase` was entered.
    pub fn of_mut(&mut self, phase: JobPhase) -> &mut Option<Time> {
        match phase {
            JobPhase::Pending => &mut self.pending,
            JobPhase::Launching => &mut self.launching,
            JobPhase::Booting => &mut self.booting,
            JobPhase::Running => &mut self.running,
            JobPhase::Completing => &mut self.completing,
            JobPhase::Succeeded | JobPhase::Failed => &mut self.finished,
        }
    }
}

/// An error with a machine-readable reason.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// CamelCase reason, such as `InsufficientCapacity` or `InstanceLost`.
    pub reason: String,
    /// What happened, for humans.
    pub message: String,
    /// When it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RunnerJob cache holds each job in one allocation of this size (with the `Arc`'s two
    /// counters), by the ten thousand: the parts a finished job no longer has are boxed so
    /// that it fits the allocator's 1 KiB class (it was 1,600 bytes before).
    #[test]
    fn a_cached_runner_job_fits_in_one_kibibyte() {
        let cached = std::mem::size_of::<RunnerJob>() + 2 * std::mem::size_of::<usize>();
        assert!(cached <= 1024, "{cached} bytes");
    }
}
