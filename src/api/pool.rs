//! `RunnerPool`: what a class of runners looks like and where it may run.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A class of ephemeral EC2 runners: which GitHub jobs they serve, what they boot from, where
/// they run and how many may run at once.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pacer.dev",
    version = "v1alpha1",
    kind = "RunnerPool",
    doc = "A class of ephemeral EC2 runners for GitHub Actions jobs.",
    plural = "runnerpools",
    shortname = "rp",
    category = "pacer",
    namespaced,
    status = "RunnerPoolStatus",
    printcolumn = r#"{"name":"Scope","type":"string","jsonPath":".spec.github.scope"}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.github.owner"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".spec.capacity.type"}"#,
    printcolumn = r#"{"name":"Max","type":"integer","jsonPath":".spec.maxRunners"}"#,
    printcolumn = r#"{"name":"Running","type":"integer","jsonPath":".status.runners.running"}"#,
    printcolumn = r#"{"name":"Warm","type":"integer","jsonPath":".status.warm.ready"}"#,
    printcolumn = r#"{"name":"Validated","type":"string","jsonPath":".status.conditions[?(@.type==\"Validated\")].status"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RunnerPoolSpec {
    /// Where the runners register on GitHub.
    pub github: GitHubTarget,

    /// Labels the runners advertise. A queued job is served by this pool when every label the
    /// job asks for is in this list (`self-hosted` and the OS/arch labels included).
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 256)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub labels: Vec<String>,

    /// EC2 instance types the runners may use, most preferred first. Every type must match the
    /// AMI's architecture.
    #[schemars(
        length(min = 1, max = 20),
        inner(regex(pattern = r"^[a-z][a-z0-9-]*\.[a-z0-9]+$"))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub instance_types: Vec<String>,

    /// VPC subnets the runners may launch in, all in one VPC. List subnets in several
    /// availability zones so capacity shortages in one zone can be routed around.
    #[schemars(
        length(min = 1, max = 16),
        inner(regex(pattern = r"^subnet-[0-9a-f]{8,17}$"))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub subnets: Vec<String>,

    /// Security groups attached to the runners, in the subnets' VPC. Runners need outbound
    /// HTTPS to GitHub and to Pacer's public URL; no inbound rule is needed.
    #[schemars(
        length(min = 1, max = 5),
        inner(regex(pattern = r"^sg-[0-9a-f]{8,17}$"))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub security_groups: Vec<String>,

    /// The AMI the runners boot. It needs bash, curl, jq, tar and sudo.
    #[schemars(regex(pattern = r"^ami-[0-9a-f]{8,17}$"))]
    pub ami: String,

    /// Name of the IAM instance profile the runners run under. Empty means none: workflows
    /// then have no AWS credentials of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[\w+=,.@-]+$"))]
    pub instance_profile: Option<String>,

    /// How many network hops the instance metadata service's (IMDSv2) answers may travel.
    /// Default 1: only processes on the instance itself reach it, so a job's containers on a
    /// bridge network cannot read the instance profile's credentials. 2 lets such containers
    /// reach it too (some container jobs need the instance's region or role); raise it only
    /// when the pool's instance profile is one every job may use.
    #[serde(default = "default_metadata_hop_limit")]
    #[schemars(range(min = 1, max = 64))]
    pub metadata_hop_limit: i32,

    /// The runners' root EBS volume.
    #[serde(default)]
    pub root_volume: RootVolume,

    /// Spot or on-demand capacity, and how EC2 picks among the offerings.
    #[serde(default)]
    pub capacity: Capacity,

    /// How instances are launched: `fleet` (CreateFleet, tries every instance type in every
    /// subnet) or `runInstances` (one instance type and subnet at a time).
    #[serde(default)]
    pub spawn_method: SpawnMethod,

    /// Release of actions/runner to install, such as `2.329.0`. Empty means the latest release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+\.[0-9]+\.[0-9]+$"))]
    pub runner_version: Option<String>,

    /// The user the runner runs as on the instance; created at boot when the AMI lacks it.
    /// `root` runs it as root (with `RUNNER_ALLOW_RUNASROOT=1`). Default `runner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_-]{0,31}$"))]
    pub runner_user: Option<String>,

    /// When several pools serve a queued job equally well (the same number of labels beyond
    /// the job's), the one with the highest priority gets it; then the first by
    /// namespace/name.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// Most runners of this pool that may exist at once; further jobs wait.
    #[serde(default = "default_max_runners")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_runners: i32,

    /// Longest a runner may live, in minutes, before it is terminated whatever it is doing.
    #[serde(default = "default_max_runtime_minutes")]
    #[schemars(range(min = 1, max = 10080))]
    pub max_runtime_minutes: i32,

    /// Seconds an instance has, from its launch, to boot and register its runner; past it the
    /// instance is terminated and the job tried again with a new one (see `maxAttempts`).
    #[serde(default = "default_boot_timeout_seconds")]
    #[schemars(range(min = 60, max = MAX_BOOT_TIMEOUT_SECONDS))]
    pub boot_timeout_seconds: i32,

    /// Seconds a registered runner may go without a job before it is removed. GitHub is asked
    /// first: a runner GitHub reports busy is never removed for idleness.
    #[serde(default = "default_idle_timeout_seconds")]
    #[schemars(range(min = 60, max = 86400))]
    pub idle_timeout_seconds: i32,

    /// Instances a RunnerJob may go through while its GitHub job stays queued: an instance
    /// lost, failing to boot, timing out or interrupted before its runner took the job is
    /// replaced until this many were tried.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: i32,

    /// When EC2 reclaims a spot instance whose runner had taken its job, the job fails on
    /// GitHub as it would on any runner. With this set, Pacer asks GitHub to re-run that job
    /// once, when its workflow run has completed (GitHub re-runs only completed runs). The
    /// GitHub App needs the Actions (write) repository permission.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rerun_interrupted: bool,

    /// Seconds a finished RunnerJob is kept before it is deleted.
    #[serde(default = "default_ttl_seconds_after_finished")]
    #[schemars(range(min = 0, max = 604800))]
    pub ttl_seconds_after_finished: i32,

    /// Extra tags put on every instance and volume of this pool. Keys starting with `gha:` or
    /// `aws:`, in any case, are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 30))]
    pub tags: BTreeMap<String, String>,

    /// Shell script run as root on the instance before the runner starts, such as installing
    /// packages. At most 8 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub user_data: Option<String>,

    /// Prepared, stopped instances kept ready for this pool's jobs. Absent or `size: 0` keeps
    /// none. Needs on-demand capacity and an EBS-backed AMI (EC2 stops nothing else). Pacer
    /// keeps them prepared and stopped; jobs do not start them yet (docs/warm-pools.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmPool>,
}

impl RunnerPoolSpec {
    /// The user the runner runs as.
    pub fn runner_user(&self) -> &str {
        self.runner_user.as_deref().unwrap_or("runner")
    }

    /// How many warm instances the pool keeps: 0 when it has no warm pool.
    pub fn warm_size(&self) -> i32 {
        self.warm.as_ref().map_or(0, |w| w.size)
    }
}

/// The largest `warm.size` a pool may set. Each warm instance is a stopped instance with its
/// root volume billed by the hour; a hundred covers a busy pool's burst while a mistyped size
/// cannot create thousands of volumes.
pub const MAX_WARM_SIZE: i32 = 100;

/// The shortest `warm.maxAgeMinutes`: longer than the longest `bootTimeoutSeconds`, so an
/// instance is never too old before its preparation could have finished.
pub const MIN_WARM_MAX_AGE_MINUTES: i32 = 180;

/// The longest `warm.maxAgeMinutes` (30 days).
pub const MAX_WARM_MAX_AGE_MINUTES: i32 = 43200;

/// A pool's warm instances: launched from the pool's template, prepared (user-data run, the
/// runner unpacked), stopped, and started for one job each.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPool {
    /// Prepared, stopped instances to keep. They count against nothing but this number:
    /// `maxRunners` bounds only the instances running jobs.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_WARM_SIZE))]
    pub size: i32,

    /// Minutes from its launch after which an unused warm instance is replaced by a fresh
    /// one, so stopped instances do not grow old on outdated packages. Instances launched
    /// from an older launch template version are replaced at once.
    #[serde(default = "default_warm_max_age_minutes")]
    #[schemars(range(min = MIN_WARM_MAX_AGE_MINUTES, max = MAX_WARM_MAX_AGE_MINUTES))]
    pub max_age_minutes: i32,
}

const _: () = assert!(MIN_WARM_MAX_AGE_MINUTES * 60 > MAX_BOOT_TIMEOUT_SECONDS);

fn default_warm_max_age_minutes() -> i32 {
    1440
}

impl Default for WarmPool {
    fn default() -> Self {
        Self {
            size: 0,
            max_age_minutes: default_warm_max_age_minutes(),
        }
    }
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn default_metadata_hop_limit() -> i32 {
    1
}
fn default_max_runners() -> i32 {
    10
}
fn default_max_runtime_minutes() -> i32 {
    360
}
fn default_ttl_seconds_after_finished() -> i32 {
    3600
}
/// The longest `bootTimeoutSeconds` a pool may set.
pub const MAX_BOOT_TIMEOUT_SECONDS: i32 = 7200;

fn default_boot_timeout_seconds() -> i32 {
    600
}
fn default_idle_timeout_seconds() -> i32 {
    600
}
fn default_max_attempts() -> i32 {
    3
}

/// Where on GitHub the runners register.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitHubTarget {
    /// `org`: runners register with the organization; `repo`: with each listed repository.
    pub scope: GitHubScope,

    /// The organization or user that owns the repositories.
    #[schemars(
        length(min = 1, max = 39),
        regex(pattern = r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
    )]
    pub owner: String,

    /// Repository names (without the owner) whose jobs this pool serves. Required for `repo`
    /// scope; for `org` scope it narrows the pool to these repositories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(length(min = 1, max = 100), regex(pattern = r"^[A-Za-z0-9._-]+$"))
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub repositories: Vec<String>,

    /// Organization runner group the runners join. Only for `org` scope; empty means the
    /// default group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub runner_group: Option<String>,
}

/// Where runners register on GitHub.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GitHubScope {
    Org,
    Repo,
}

/// The root EBS volume of each runner.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootVolume {
    /// Size in GiB. 0 keeps the AMI's own size; otherwise at least the AMI's snapshot size.
    #[serde(default, rename = "sizeGiB")]
    #[schemars(range(min = 0, max = 16384))]
    pub size_gib: i32,

    /// EBS volume type.
    #[serde(default, rename = "type")]
    pub volume_type: VolumeType,

    /// Provisioned IOPS, for gp3, io1 and io2 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 256000))]
    pub iops: Option<i32>,

    /// Provisioned throughput in MiB/s, for gp3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 125, max = 2000))]
    pub throughput: Option<i32>,
}

impl Default for RootVolume {
    fn default() -> Self {
        Self {
            size_gib: 0,
            volume_type: VolumeType::Gp3,
            iops: None,
            throughput: None,
        }
    }
}

/// EBS volume types a runner's root volume may use.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    #[default]
    Gp3,
    Gp2,
    Io1,
    Io2,
}

/// Which EC2 market the runners come from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// `spot` (cheaper, may be reclaimed) or `onDemand`.
    #[serde(default, rename = "type")]
    pub capacity_type: CapacityType,

    /// When spot capacity is exhausted everywhere the pool may run, launch on-demand instead.
    /// Only with `type: spot`.
    #[serde(default)]
    pub fallback_to_on_demand: bool,

    /// How EC2 picks among the instance types and zones. Empty means `priceCapacityOptimized`
    /// for spot and `lowestPrice` for on-demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_strategy: Option<AllocationStrategy>,

    /// A circuit breaker for spot interruptions: after `notices` spot interruption notices
    /// from the pool's instances within `windowMinutes`, the pool launches on-demand for
    /// `onDemandMinutes` after the last of them. Only with `fallbackToOnDemand`.
    #[serde(default)]
    pub interruption_breaker: InterruptionBreaker,
}

/// When a spot pool turns to on-demand for a while.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterruptionBreaker {
    /// Spot interruption notices that open the breaker; 0 turns it off.
    #[serde(default = "default_breaker_notices")]
    #[schemars(range(min = 0, max = 1000))]
    pub notices: i32,
    /// The window the notices are counted in.
    #[serde(default = "default_breaker_minutes")]
    #[schemars(range(min = 1, max = 1440))]
    pub window_minutes: i32,
    /// How long the pool launches on-demand once the breaker opens.
    #[serde(default = "default_breaker_minutes")]
    #[schemars(range(min = 1, max = 1440))]
    pub on_demand_minutes: i32,
}

fn default_breaker_notices() -> i32 {
    3
}

fn default_breaker_minutes() -> i32 {
    30
}

impl Default for InterruptionBreaker {
    fn default() -> Self {
        Self {
            notices: default_breaker_notices(),
            window_minutes: default_breaker_minutes(),
            on_demand_minutes: default_breaker_minutes(),
        }
    }
}

/// EC2 market of a pool's runners.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CapacityType {
    Spot,
    #[default]
    OnDemand,
}

/// EC2 Fleet allocation strategies. `lowestPrice` and `prioritized` are the only ones EC2
/// accepts for on-demand capacity.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AllocationStrategy {
    PriceCapacityOptimized,
    CapacityOptimized,
    LowestPrice,
    Diversified,
    Prioritized,
}

/// How instances are launched.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SpawnMethod {
    /// CreateFleet of type `instant` over every instance type and subnet.
    #[default]
    Fleet,
    /// RunInstances with one instance type in one subnet.
    RunInstances,
}

/// What Pacer observed and built for a pool.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerPoolStatus {
    /// `Validated`: the AMI, subnets, security groups and instance profile exist and fit
    /// together. `Ready`: the pool can launch runners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The launch template runners are launched from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_template: Option<LaunchTemplateRef>,

    /// Hash of the spec fields the launch template was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,

    /// Runners of this pool by phase.
    #[serde(default)]
    pub runners: RunnerCounts,

    /// What the pool's ready (stopped) warm instances cost while they wait: their root
    /// volumes, which EBS bills whether the instance runs or not. Set while it keeps any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_storage: Option<WarmStorage>,
    /// The pool's warm instances by state, when it keeps any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmCounts>,
    /// Warm preparations that failed in a row (reported by the instance, or timed out), since
    /// the last that succeeded: each makes the next warm launch wait longer. Written by
    /// whichever replica hears of a failure, cleared by the next success; a new launch template
    /// version starts afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_failures: Option<WarmFailures>,

    /// Set while the spot interruption breaker is open: the pool launches on-demand until
    /// then (`spec.capacity.interruptionBreaker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_until: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,

    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A launch template and the version in force.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LaunchTemplateRef {
    /// Launch template id (`lt-…`).
    pub id: String,
    /// Version made default for new launches.
    pub version: i64,
}

/// Counts of a pool's runners by phase.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerCounts {
    /// Waiting for a launch.
    #[serde(default)]
    pub pending: i32,
    /// Launch requested, or instance booting.
    #[serde(default)]
    pub starting: i32,
    /// Runner registered and running a job.
    #[serde(default)]
    pub running: i32,
    /// Being terminated.
    #[serde(default)]
    pub completing: i32,
}

/// The price of keeping a pool's warm instances stopped.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmStorage {
    /// Root volume size of each warm instance, GiB (the AMI's when `spec.rootVolume.sizeGiB`
    /// is 0).
    #[serde(default, rename = "volumeGiB")]
    pub volume_gib: i32,
    /// EBS price of the pool's volume type per GB-month, from the Pricing API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_gib_month: Option<String>,
    /// What the ready warm instances' volumes cost an hour now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly_cost: Option<String>,
    /// ISO 4217 code of the prices.
    #[serde(default)]
    pub currency: String,
}

/// Warm preparations that failed in a row, and the last of them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmFailures {
    /// How many failed in a row.
    pub count: i32,
    /// The launch template version they were launched from, as `gha:warm` spells it
    /// (`lt-…:N`).
    pub template: String,
    /// The last failed instance.
    pub instance: String,
    /// When the last failed.
    pub at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// What the last said: its log's last line, or the timeout.
    pub message: String,
}

/// Counts of a pool's warm instances, jobs' instances aside.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmCounts {
    /// Prepared and stopped: a job can start one.
    #[serde(default)]
    pub ready: i32,
    /// Launched and not yet reported prepared.
    #[serde(default)]
    pub preparing: i32,
    /// Prepared and being stopped.
    #[serde(default)]
    pub stopping: i32,
}
