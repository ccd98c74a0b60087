//! The EC2 boundary: the calls Pacer makes, in Pacer's own types. `aws` implements it with the
//! AWS SDK, `fake` (tests and the `testing` feature only) in memory for fast tests of the logic
//! above it.

pub mod aws;
mod error;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod iam_policy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};

pub use error::{CloudError, ErrorClass, classify};

pub type CloudResult<T> = Result<T, CloudError>;

/// A paginated listing: one item per page, each the answer of one call.
pub type Pages<'a, T> = BoxStream<'a, CloudResult<Vec<T>>>;

/// Tag keys Pacer writes. `gha:managed-by=pacer` is what the IAM policy keys on.
pub mod tags {
    pub const MANAGED_BY: &str = "gha:managed-by";
    pub const MANAGED_BY_VALUE: &str = "pacer";
    pub const CONTROLLER: &str = "gha:controller";
    pub const POOL: &str = "gha:pool";
    pub const SPEC_HASH: &str = "gha:spec-hash";
    /// On a pool's warm instance (one launched to be prepared and stopped, not for a job): the
    /// launch template and version it was launched from, `lt-…:7` (see `warm_value`). Like
    /// every tag, set in the launch request and never changed.
    pub const WARM: &str = "gha:warm";
    /// Every key Pacer writes starts with this; users may not use it (see the pool rules).
    pub const PREFIX: &str = "gha:";

    /// EC2's limits on one tag, in Unicode characters, and on the tags of one resource.
    pub const MAX_KEY_CHARS: usize = 128;
    pub const MAX_VALUE_CHARS: usize = 256;
    pub const MAX_TAGS: usize = 50;

    /// Checks tags against EC2's limits (key and value length, count, the reserved `aws:`
    /// prefix): the one place that knows them. The error names the offending tag.
    pub fn check(tags: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
        if tags.len() > MAX_TAGS {
            return Err(format!(
                "{} tags, over EC2's {MAX_TAGS} per resource",
                tags.len()
            ));
        }
        for (key, value) in tags {
            if key.is_empty() || key.chars().count() > MAX_KEY_CHARS {
                return Err(format!(
                    "tag key {key:?} must be 1 to {MAX_KEY_CHARS} characters"
                ));
            }
            if key.to_ascii_lowercase().starts_with("aws:") {
                return Err(format!(
                    "tag key {key:?} uses the prefix aws:, reserved by AWS"
                ));
            }
            let n = value.chars().count();
            if n > MAX_VALUE_CHARS {
                return Err(format!(
                    "tag {key} would be {n} characters, over EC2's {MAX_VALUE_CHARS}"
                ));
            }
        }
        Ok(())
    }

    /// The `gha:warm` value of an instance launched from this template version.
    pub fn warm_value(template_id: &str, version: i64) -> String {
        format!("{template_id}:{version}")
    }

    /// Whether `tags` mark a resource as created by the controller with this id: the only
    /// resources Pacer ever modifies or deletes.
    pub fn owned_by(
        tags: &std::collections::BTreeMap<String, String>,
        controller_id: &str,
    ) -> bool {
        tags.get(MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE)
            && tags.get(CONTROLLER).map(String::as_str) == Some(controller_id)
    }
}

/// Told of every call an adapter makes: the action as AWS names it, the outcome (the error's
/// class when it failed) and how long it took. The metrics implement it.
pub trait CallObserver: Send + Sync {
    fn called(&self, action: &'static str, outcome: Result<(), ErrorClass>, took: Duration);
}

/// Whom an adapter tells of its calls: no one until `observed_by`. Each adapter runs every
/// call through `observe`, so a new call is counted without touching the metrics.
#[derive(Clone, Default)]
pub struct Observer(Option<Arc<dyn CallObserver>>);

impl Observer {
    pub fn new(observer: Arc<dyn CallObserver>) -> Self {
        Self(Some(observer))
    }

    /// Runs `call`, then tells the observer of it.
    pub fn observe<'a, T: Send + 'a>(
        &self,
        action: &'static str,
        call: impl Future<Output = CloudResult<T>> + Send + 'a,
    ) -> BoxFuture<'a, CloudResult<T>> {
        let observer = self.0.clone();
        async move {
            let started = Instant::now();
            let result = call.await;
            tell(observer.as_deref(), action, &result, started);
            result
        }
        .boxed()
    }

    /// A paginated listing with each page told as the call it is.
    pub fn observe_pages<'a, T: Send + 'a>(
        &self,
        action: &'static str,
        pages: Pages<'a, T>,
    ) -> Pages<'a, T> {
        let observer = self.0.clone();
        futures::stream::unfold(pages, move |mut pages| {
            let observer = observer.clone();
            async move {
                let started = Instant::now();
                let page = pages.next().await?;
                tell(observer.as_deref(), action, &page, started);
                Some((page, pages))
            }
        })
        .boxed()
    }
}

fn tell<T>(
    observer: Option<&dyn CallObserver>,
    action: &'static str,
    result: &CloudResult<T>,
    started: Instant,
) {
    if let Some(observer) = observer {
        let outcome = result.as_ref().map(drop).map_err(|e| e.class);
        observer.called(action, outcome, started.elapsed());
    }
}

/// An AMI, as far as validation needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    /// `x86_64`, `arm64`, ...
    pub architecture: String,
    pub root_device_name: Option<String>,
    /// Size of the root device's snapshot, when the AMI is EBS-backed.
    pub root_snapshot_gib: Option<i32>,
    /// The root device is an EBS volume (not instance store): only such instances can be
    /// stopped and started again.
    pub ebs_backed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub id: String,
    pub vpc_id: String,
    pub zone: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroup {
    pub id: String,
    pub vpc_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceTypeInfo {
    pub name: String,
    /// Architectures the type runs: `x86_64`, `arm64`, `i386`, ...
    pub architectures: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchTemplate {
    pub id: String,
    pub name: String,
    pub default_version: i64,
    pub latest_version: i64,
    pub tags: BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub created: Option<i64>,
}

/// The root volume of a launch template.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BlockDevice {
    pub device_name: String,
    /// `None` keeps the AMI's size.
    pub size_gib: Option<i32>,
    pub volume_type: String,
    pub iops: Option<i32>,
    pub throughput: Option<i32>,
}

/// What a launch template says, in Pacer's terms. Serialized (fields in this order, tags
/// sorted) for the spec hash: keep new fields at the end.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LaunchTemplateData {
    pub image_id: String,
    pub security_group_ids: Vec<String>,
    pub instance_profile: Option<String>,
    pub root_volume: Option<BlockDevice>,
    /// Spot market options, for spot-only pools.
    pub spot: bool,
    /// Base64 of the user-data script.
    pub user_data: String,
    /// Tags for the instances and volumes launched from the template.
    pub tags: BTreeMap<String, String>,
    /// IMDSv2's PUT response hop limit: 1 keeps the metadata (and the instance profile's
    /// credentials) on the instance, away from containers on a bridge network.
    pub metadata_hop_limit: i32,
}

/// One instance launch, as CreateFleet or RunInstances would make it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchRequest {
    pub launch_template_id: String,
    pub version: i64,
    /// (instance type, subnet) pairs EC2 may choose from, most preferred first.
    pub offerings: Vec<(String, String)>,
    pub spot: bool,
    pub fleet: bool,
    /// Tags for the instance and its volumes, sent in the launch request itself.
    pub tags: BTreeMap<String, String>,
    /// CreateFleet's allocation strategy for the request's market, as EC2 spells it
    /// (`price-capacity-optimized`, `lowest-price`, ...); `None` leaves EC2's default.
    pub allocation_strategy: Option<String>,
    /// EC2's idempotency token; the same token is the same launch.
    pub client_token: Option<String>,
    /// Instances asked for: 1 for one job, more for a batch of one pool's jobs (CreateFleet's
    /// total target capacity; RunInstances' MaxCount, with MinCount 1).
    pub count: u32,
}

impl LaunchRequest {
    /// Every parameter EC2 sees, the token aside, in a stable text form: two requests with the
    /// same parameters are the same launch to EC2, and a token reused for other parameters is
    /// refused (`IdempotentParameterMismatch`).
    pub fn parameters(&self) -> String {
        let mut out = format!(
            "template={}:{}\nspot={}\nfleet={}\nstrategy={}\n",
            self.launch_template_id,
            self.version,
            self.spot,
            self.fleet,
            self.allocation_strategy.as_deref().unwrap_or_default()
        );
        for (instance_type, subnet) in &self.offerings {
            out.push_str(&format!("offering={instance_type}@{subnet}\n"));
        }
        for (key, value) in &self.tags {
            out.push_str(&format!("tag={key}={value}\n"));
        }
        // A single launch's parameters, and so its token, are as they were before batches.
        if self.count > 1 {
            out.push_str(&format!("count={}\n", self.count));
        }
        out
    }
}

/// An instance Pacer launched, as EC2 describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub zone: String,
    pub spot: bool,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down` or `terminated`.
    pub state: String,
    /// EC2's reason for the last state change, such as a spot interruption.
    pub state_reason: Option<String>,
    /// Seconds since the Unix epoch.
    pub launch_time: Option<i64>,
    pub tags: BTreeMap<String, String>,
}

impl Instance {
    /// Pending or running: not on its way out.
    pub fn is_alive(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "running")
    }

    /// Stopped: only its volumes are billed, and StartInstances can bring it back.
    pub fn is_stopped(&self) -> bool {
        self.state == "stopped"
    }

    /// Being stopped: neither startable nor running yet.
    pub fn is_stopping(&self) -> bool {
        self.state == "stopping"
    }
}

/// An offering EC2 refused in a launch, with its error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchFailure {
    pub instance_type: Option<String>,
    pub subnet: Option<String>,
    pub spot: bool,
    pub error: CloudError,
}

/// What a launch produced: instances, and the offerings that failed on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchOutcome {
    pub instances: Vec<Instance>,
    pub failures: Vec<LaunchFailure>,
}

/// Terminates `ids` in one call, or each alone when EC2 refuses that call: a
/// TerminateInstances fails whole when one id is unknown, protected or not Pacer's, and one
/// instance's trouble must not keep the others running. Throttling is not fanned out into more
/// calls: once EC2 throttles, every id left gets that answer.
pub async fn terminate_each(ec2: &dyn Ec2, ids: &[String]) -> Vec<(String, CloudResult<()>)> {
    if ids.is_empty() {
        return Vec::new();
    }
    let all = ec2.terminate_instances(ids).await;
    match all {
        Err(e) if ids.len() > 1 && !e.is(ErrorClass::Throttled) => {
            let mut each = Vec::with_capacity(ids.len());
            let mut throttled: Option<CloudError> = None;
            for id in ids {
                let alone = match &throttled {
                    Some(e) => Err(e.clone()),
                    None => ec2.terminate_instances(std::slice::from_ref(id)).await,
                };
                if let Err(e) = &alone
                    && e.is(ErrorClass::Throttled)
                {
                    throttled = Some(e.clone());
                }
                each.push((id.clone(), alone));
            }
            each
        }
        all => ids.iter().map(|id| (id.clone(), all.clone())).collect(),
    }
}

/// The EC2 and IAM calls Pacer makes, and nothing else.
pub trait Ec2: Send + Sync {
    fn describe_images<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<Vec<Image>>>;
    fn describe_subnets<'a>(&'a self, ids: &'a [String])
    -> BoxFuture<'a, CloudResult<Vec<Subnet>>>;
    fn describe_security_groups<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<SecurityGroup>>>;
    fn describe_instance_types<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<InstanceTypeInfo>>>;
    /// The roles in an instance profile; `None` when the profile does not exist.
    fn instance_profile_roles<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<Vec<String>>>>;
    fn find_launch_template<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<LaunchTemplate>>>;
    /// Every launch template tagged as this controller's, in one paginated call.
    fn describe_managed_launch_templates<'a>(
        &'a self,
        controller_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Vec<LaunchTemplate>>>;
    /// The description of a template's default version, where Pacer records the spec hash.
    fn default_version_description<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>>;
    /// Creates a template, tagged with `tags` in the same request; its first version carries
    /// `description`.
    fn create_launch_template<'a>(
        &'a self,
        name: &'a str,
        description: &'a str,
        data: &'a LaunchTemplateData,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, CloudResult<LaunchTemplate>>;
    /// Adds a version and returns its number.
    fn create_launch_template_version<'a>(
        &'a self,
        id: &'a str,
        description: &'a str,
        data: &'a LaunchTemplateData,
    ) -> BoxFuture<'a, CloudResult<i64>>;
    fn set_default_launch_template_version<'a>(
        &'a self,
        id: &'a str,
        version: i64,
    ) -> BoxFuture<'a, CloudResult<()>>;
    fn delete_launch_template_versions<'a>(
        &'a self,
        id: &'a str,
        versions: &'a [i64],
    ) -> BoxFuture<'a, CloudResult<()>>;
    fn delete_launch_template<'a>(&'a self, id: &'a str) -> BoxFuture<'a, CloudResult<()>>;
    /// Asks EC2 whether the launch would be permitted (`DryRun=true`); `Ok` when it would.
    fn dry_run_launch<'a>(&'a self, request: &'a LaunchRequest) -> BoxFuture<'a, CloudResult<()>>;
    /// Launches one instance: CreateFleet (instant) or RunInstances per the request.
    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, CloudResult<LaunchOutcome>>;
    /// Every instance tagged as this controller's, terminated ones included while EC2 still
    /// lists them (their state reason says why they went), a page per call of one paginated
    /// listing, whatever the number of jobs. Only Pacer's own (`gha:`) tags are kept:
    /// thousands of instances are listed every few seconds, and the users' tags are not
    /// Pacer's business. Callers that keep only part of each instance fold the pages as they
    /// come rather than holding the whole listing.
    fn managed_instance_pages<'a>(&'a self, controller_id: &'a str) -> Pages<'a, Instance>;
    /// One instance of this controller's, with the account that owns it; `None` when EC2
    /// lists no such instance under this controller's tags.
    fn managed_instance<'a>(
        &'a self,
        controller_id: &'a str,
        instance_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<(Instance, String)>>>;
    /// All of `managed_instance_pages` at once.
    fn describe_managed_instances<'a>(
        &'a self,
        controller_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Vec<Instance>>> {
        self.managed_instance_pages(controller_id)
            .try_concat()
            .boxed()
    }
    /// On-demand Linux hourly price in USD of an instance type in the configured region, from
    /// the Pricing API; `None` when it lists none.
    fn on_demand_price<'a>(
        &'a self,
        instance_type: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>>;
    /// EBS storage price in USD per GB-month of a volume type (`gp3`, ...) in the configured
    /// region, from the Pricing API; `None` when it lists none.
    fn volume_price<'a>(
        &'a self,
        volume_type: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>>;
    /// The latest Linux spot price in USD of an instance type in a zone.
    fn spot_price<'a>(
        &'a self,
        instance_type: &'a str,
        zone: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>>;
    /// Terminates instances; the IAM policy allows it only for instances carrying our tag.
    /// Fails whole, nothing terminated, when one of several ids is unknown (`NotFound`; one
    /// unknown id alone is gone already, and fine), one is protected from termination
    /// (`IncorrectState`) or not Pacer's to terminate (`Unauthorized`): see [`terminate_each`].
    fn terminate_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>>;
    /// Stops EBS-backed instances (StopInstances; the root volume stays, the instance is no
    /// longer billed); already stopping or stopped ones are left as they are. The IAM policy
    /// allows it only for instances carrying our tag. Fails whole, nothing stopped, when EC2
    /// knows one of the ids not (`NotFound`), or one cannot be stopped: a terminated instance
    /// (`IncorrectState`), a spot instance of a one-time request (`InvalidInput`).
    fn stop_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>>;
    /// Starts stopped instances (StartInstances); running or pending ones are left as they
    /// are. EC2 moves an instance's launch time to its start. Fails whole, nothing started,
    /// when EC2 has no capacity for one (`InsufficientCapacity`: launch another instead), one
    /// is still stopping or is gone (`IncorrectState`), or an id is unknown (`NotFound`). The
    /// IAM policy allows it only for instances carrying our tag.
    fn start_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>>;
}
