//! An in-memory EC2 that behaves: it keeps what it is told to create, records every call, and
//! can be told to fail the next calls of an action. For fast tests of the logic above it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use futures::future::BoxFuture;

use super::{
    CallObserver, CloudError, CloudResult, Ec2, Image, Instance, InstanceTypeInfo, LaunchFailure,
    LaunchOutcome, LaunchRequest, LaunchTemplate, LaunchTemplateData, Observer, Pages,
    SecurityGroup, Subnet, tags,
};

/// Instances per DescribeInstances page, EC2's largest.
const PAGE: usize = 1000;
/// The account the fake's instances belong to (moto's default too).
pub const ACCOUNT: &str = "123456789012";

#[derive(Default)]
struct State {
    images: Vec<Image>,
    subnets: Vec<Subnet>,
    security_groups: Vec<SecurityGroup>,
    instance_types: Vec<InstanceTypeInfo>,
    profiles: HashMap<String, Vec<String>>,
    instances: Vec<Instance>,
    /// Instance types with no capacity, in every market and zone.
    exhausted: Vec<String>,
    templates: BTreeMap<String, FakeTemplate>,
    next_id: u64,
    calls: Vec<String>,
    /// Action -> (error code, remaining count).
    failures: HashMap<String, (String, u32)>,
    /// Launch answers by ClientToken, as EC2 keeps them: a digest of the parameters they
    /// answered, the instances launched (by id) and the failures. Kept small: a bench keeps
    /// thousands.
    tokens: HashMap<String, Remembered>,
    /// Instances protected from termination (`DisableApiTermination`).
    protected: Vec<String>,
}

/// The answer to one ClientToken.
struct Remembered {
    parameters: [u8; 32],
    instance_ids: Vec<String>,
    failures: Vec<LaunchFailure>,
}

fn digest(parameters: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(parameters.as_bytes()).into()
}

/// A launch template as the fake stores it.
#[derive(Clone, Debug)]
pub struct FakeTemplate {
    pub template: LaunchTemplate,
    /// Version number -> (description, data); deleted versions are removed.
    pub versions: BTreeMap<i64, (String, LaunchTemplateData)>,
}

#[derive(Default)]
pub struct FakeEc2 {
    state: Mutex<State>,
    /// How long every call takes, like a round trip to EC2.
    latency: std::time::Duration,
    /// When the launch call of each instance returns, by the RunnerJob uid in its tags (by the
    /// batch's token for a batch's instances).
    launched_at: Mutex<HashMap<String, std::time::Instant>>,
    observer: Observer,
}

impl FakeEc2 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_image(self, id: &str, architecture: &str, root_snapshot_gib: i32) -> Self {
        self.state.lock().unwrap().images.push(Image {
            id: id.into(),
            architecture: architecture.into(),
            root_device_name: Some("/dev/sda1".into()),
            root_snapshot_gib: Some(root_snapshot_gib),
            ebs_backed: true,
        });
        self
    }

    pub fn with_subnet(self, id: &str, vpc_id: &str, zone: &str) -> Self {
        self.state.lock().unwrap().subnets.push(Subnet {
            id: id.into(),
            vpc_id: vpc_id.into(),
            zone: zone.into(),
        });
        self
    }

    pub fn with_security_group(self, id: &str, vpc_id: &str) -> Self {
        self.state
            .lock()
            .unwrap()
            .security_groups
            .push(SecurityGroup {
                id: id.into(),
                vpc_id: vpc_id.into(),
            });
        self
    }

    pub fn with_instance_type(self, name: &str, architecture: &str) -> Self {
        self.state
            .lock()
            .unwrap()
            .instance_types
            .push(InstanceTypeInfo {
                name: name.into(),
                architectures: vec![architecture.into()],
            });
        self
    }

    pub fn with_instance_profile(self, name: &str, roles: &[&str]) -> Self {
        self.state
            .lock()
            .unwrap()
            .profiles
            .insert(name.into(), roles.iter().map(|r| r.to_string()).collect());
        self
    }

    /// Tells `observer` of every call, as the AWS adapter does.
    pub fn observed_by(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Observer::new(observer);
        self
    }

    /// Makes every call take `latency`.
    pub fn with_latency(mut self, latency: std::time::Duration) -> Self {
        self.latency = latency;
        self
    }

    /// When the launch call of the RunnerJob with this uid (or of the batch with this token)
    /// returned (or will, while its latency runs), if there was one.
    pub fn launched_at(&self, uid_or_token: &str) -> Option<std::time::Instant> {
        self.launched_at.lock().unwrap().get(uid_or_token).copied()
    }

    /// How many instances it has launched.
    pub fn launched(&self) -> usize {
        self.state.lock().unwrap().instances.len()
    }

    /// Makes the next `times` calls of `action` fail with `code`.
    pub fn fail_next(&self, action: &str, code: &str, times: u32) {
        self.state
            .lock()
            .unwrap()
            .failures
            .insert(action.into(), (code.into(), times));
    }

    /// Protects instance `id` from termination, as an operator may (`DisableApiTermination`).
    pub fn protect(&self, id: &str) {
        self.state.lock().unwrap().protected.push(id.into());
    }

    /// Makes EC2 report no capacity for `instance_type` until told otherwise.
    pub fn exhaust(&self, instance_type: &str) {
        self.state
            .lock()
            .unwrap()
            .exhausted
            .push(instance_type.into());
    }

    /// Finishes every state change in progress, as EC2 does a little later: pending to
    /// running, stopping to stopped, shutting-down to terminated.
    pub fn settle(&self) {
        for instance in &mut self.state.lock().unwrap().instances {
            let settled = match instance.state.as_str() {
                "pending" => "running",
                "stopping" => "stopped",
                "shutting-down" => "terminated",
                _ => continue,
            };
            instance.state = settled.into();
        }
    }

    /// Every instance ever launched, terminated ones included.
    pub fn instances(&self) -> Vec<Instance> {
        self.state.lock().unwrap().instances.clone()
    }

    /// Every call so far, by action name.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn count(&self, action: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| *c == action)
            .count()
    }

    pub fn template(&self, name: &str) -> Option<FakeTemplate> {
        self.state.lock().unwrap().templates.get(name).cloned()
    }

    pub fn remove_template(&self, name: &str) {
        self.state.lock().unwrap().templates.remove(name);
    }

    /// Records the call and answers with an injected failure if one is due.
    fn call<T>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut State) -> CloudResult<T>,
    ) -> BoxFuture<'static, CloudResult<T>>
    where
        T: Send + 'static,
    {
        self.call_observed_as(action, action, f)
    }

    /// `call`, told to the observer as `observed_as` (a dry run is its action's call to EC2
    /// but not a launch).
    fn call_observed_as<T>(
        &self,
        action: &'static str,
        observed_as: &'static str,
        f: impl FnOnce(&mut State) -> CloudResult<T>,
    ) -> BoxFuture<'static, CloudResult<T>>
    where
        T: Send + 'static,
    {
        let mut state = self.state.lock().unwrap();
        state.calls.push(action.into());
        let result = match state.failures.get_mut(action) {
            Some((code, remaining)) if *remaining > 0 => {
                *remaining -= 1;
                Err(CloudError::new(
                    action,
                    code.clone(),
                    "injected by the fake",
                ))
            }
            _ => f(&mut state),
        };
        let latency = self.latency;
        self.observer.observe(observed_as, async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            result
        })
    }
}

fn not_found(action: &'static str, code: &str, id: &str) -> CloudError {
    CloudError::new(action, code, format!("The id '{id}' does not exist"))
}

fn find_template<'s>(
    state: &'s mut State,
    id: &str,
    action: &'static str,
) -> CloudResult<&'s mut FakeTemplate> {
    state
        .templates
        .values_mut()
        .find(|t| t.template.id == id)
        .ok_or_else(|| not_found(action, "InvalidLaunchTemplateId.NotFound", id))
}

impl Ec2 for FakeEc2 {
    fn describe_images<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<Vec<Image>>> {
        self.call("DescribeImages", |s| {
            ids.iter()
                .map(|id| {
                    s.images
                        .iter()
                        .find(|i| &i.id == id)
                        .cloned()
                        .ok_or_else(|| not_found("DescribeImages", "InvalidAMIID.NotFound", id))
                })
                .collect()
        })
    }

    fn describe_subnets<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<Subnet>>> {
        self.call("DescribeSubnets", |s| {
            ids.iter()
                .map(|id| {
                    s.subnets
                        .iter()
                        .find(|x| &x.id == id)
                        .cloned()
                        .ok_or_else(|| not_found("DescribeSubnets", "InvalidSubnetID.NotFound", id))
                })
                .collect()
        })
    }

    fn describe_security_groups<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<SecurityGroup>>> {
        self.call("DescribeSecurityGroups", |s| {
            ids.iter()
                .map(|id| {
                    s.security_groups
                        .iter()
                        .find(|x| &x.id == id)
                        .cloned()
                        .ok_or_else(|| {
                            not_found("DescribeSecurityGroups", "InvalidGroup.NotFound", id)
                        })
                })
                .collect()
        })
    }

    fn describe_instance_types<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<InstanceTypeInfo>>> {
        self.call("DescribeInstanceTypes", |s| {
            names
                .iter()
                .map(|n| {
                    s.instance_types
                        .iter()
                        .find(|t| &t.name == n)
                        .cloned()
                        .ok_or_else(|| {
                            CloudError::new(
                                "DescribeInstanceTypes",
                                "InvalidInstanceType",
                                format!("The instance type '{n}' does not exist"),
                            )
                        })
                })
                .collect()
        })
    }

    fn instance_profile_roles<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<Vec<String>>>> {
        self.call("GetInstanceProfile", |s| Ok(s.profiles.get(name).cloned()))
    }

    fn find_launch_template<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<LaunchTemplate>>> {
        self.call("DescribeLaunchTemplates", |s| {
            Ok(s.templates.get(name).map(|t| t.template.clone()))
        })
    }

    fn describe_managed_launch_templates<'a>(
        &'a self,
        controller_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Vec<LaunchTemplate>>> {
        self.call("DescribeLaunchTemplates", |s| {
            Ok(s.templates
                .values()
                .map(|t| t.template.clone())
                .filter(|t| tags::owned_by(&t.tags, controller_id))
                .collect())
        })
    }

    fn default_version_description<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        self.call("DescribeLaunchTemplateVersions", |s| {
            let t = find_template(s, id, "DescribeLaunchTemplateVersions")?;
            Ok(t.versions
                .get(&t.template.default_version)
                .map(|(d, _)| d.clone()))
        })
    }

    fn create_launch_template<'a>(
        &'a self,
        name: &'a str,
        description: &'a str,
        data: &'a LaunchTemplateData,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, CloudResult<LaunchTemplate>> {
        self.call("CreateLaunchTemplate", |s| {
            if s.templates.contains_key(name) {
                return Err(CloudError::new(
                    "CreateLaunchTemplate",
                    "InvalidLaunchTemplateName.AlreadyExistsException",
                    format!("Launch template name already in use: {name}"),
                ));
            }
            s.next_id += 1;
            let template = LaunchTemplate {
                id: format!("lt-{:017x}", s.next_id),
                name: name.into(),
                default_version: 1,
                latest_version: 1,
                tags: tags.clone(),
                created: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs() as i64),
            };
            let versions = BTreeMap::from([(1, (description.to_string(), data.clone()))]);
            s.templates.insert(
                name.into(),
                FakeTemplate {
                    template: template.clone(),
                    versions,
                },
            );
            Ok(template)
        })
    }

    fn create_launch_template_version<'a>(
        &'a self,
        id: &'a str,
        description: &'a str,
        data: &'a LaunchTemplateData,
    ) -> BoxFuture<'a, CloudResult<i64>> {
        self.call("CreateLaunchTemplateVersion", |s| {
            let t = find_template(s, id, "CreateLaunchTemplateVersion")?;
            t.template.latest_version += 1;
            let version = t.template.latest_version;
            t.versions
                .insert(version, (description.to_string(), data.clone()));
            Ok(version)
        })
    }

    fn set_default_launch_template_version<'a>(
        &'a self,
        id: &'a str,
        version: i64,
    ) -> BoxFuture<'a, CloudResult<()>> {
        self.call("ModifyLaunchTemplate", |s| {
            let t = find_template(s, id, "ModifyLaunchTemplate")?;
            if !t.versions.contains_key(&version) {
                return Err(not_found(
                    "ModifyLaunchTemplate",
                    "InvalidLaunchTemplateId.VersionNotFound",
                    &version.to_string(),
                ));
            }
            t.template.default_version = version;
            Ok(())
        })
    }

    fn delete_launch_template_versions<'a>(
        &'a self,
        id: &'a str,
        versions: &'a [i64],
    ) -> BoxFuture<'a, CloudResult<()>> {
        self.call("DeleteLaunchTemplateVersions", |s| {
            let t = find_template(s, id, "DeleteLaunchTemplateVersions")?;
            for v in versions
                .iter()
                .filter(|v| **v != t.template.default_version)
            {
                t.versions.remove(v);
            }
            Ok(())
        })
    }

    fn delete_launch_template<'a>(&'a self, id: &'a str) -> BoxFuture<'a, CloudResult<()>> {
        self.call("DeleteLaunchTemplate", |s| {
            s.templates.retain(|_, t| t.template.id != id);
            Ok(())
        })
    }

    fn dry_run_launch<'a>(&'a self, request: &'a LaunchRequest) -> BoxFuture<'a, CloudResult<()>> {
        let (action, observed_as) = if request.fleet {
            ("CreateFleet", "DryRunCreateFleet")
        } else {
            ("RunInstances", "DryRunRunInstances")
        };
        self.call_observed_as(action, observed_as, |s| {
            if s.templates
                .values()
                .any(|t| t.template.id == request.launch_template_id)
            {
                Ok(())
            } else {
                Err(not_found(
                    action,
                    "InvalidLaunchTemplateId.NotFound",
                    &request.launch_template_id,
                ))
            }
        })
    }

    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, CloudResult<LaunchOutcome>> {
        let action = if request.fleet {
            "CreateFleet"
        } else {
            "RunInstances"
        };
        self.call(action, |s| {
            if !s
                .templates
                .values()
                .any(|t| t.template.id == request.launch_template_id)
            {
                return Err(not_found(
                    action,
                    "InvalidLaunchTemplateId.NotFound",
                    &request.launch_template_id,
                ));
            }
            // EC2 replays the first answer to a token with the same parameters, and refuses
            // the token with other ones.
            if let Some(token) = &request.client_token
                && let Some(first) = s.tokens.get(token)
            {
                if first.parameters != digest(&request.parameters()) {
                    return Err(CloudError::new(
                        action,
                        "IdempotentParameterMismatch",
                        format!("client token {token} was used with other parameters"),
                    ));
                }
                let instances = s
                    .instances
                    .iter()
                    .filter(|i| first.instance_ids.contains(&i.id))
                    .cloned()
                    .collect();
                return Ok(LaunchOutcome {
                    instances,
                    failures: first.failures.clone(),
                });
            }
            let tried = if request.fleet {
                &request.offerings[..]
            } else {
                &request.offerings[..request.offerings.len().min(1)]
            };
            let mut outcome = LaunchOutcome::default();
            for (instance_type, subnet) in tried {
                if s.exhausted.contains(instance_type) {
                    let error = CloudError::new(
                        action,
                        "InsufficientInstanceCapacity",
                        format!("no {instance_type} capacity"),
                    );
                    if !request.fleet {
                        return Err(error);
                    }
                    outcome.failures.push(LaunchFailure {
                        instance_type: Some(instance_type.clone()),
                        subnet: Some(subnet.clone()),
                        spot: request.spot,
                        error,
                    });
                    continue;
                }
                // As many as asked, all of this offering: the fake has capacity or none.
                let zone = s
                    .subnets
                    .iter()
                    .find(|x| &x.id == subnet)
                    .map(|x| x.zone.clone())
                    .unwrap_or_else(|| "us-east-1a".into());
                let returns = std::time::Instant::now() + self.latency;
                for _ in 0..request.count.max(1) {
                    s.next_id += 1;
                    let instance = Instance {
                        id: format!("i-{:017x}", s.next_id),
                        instance_type: instance_type.clone(),
                        zone: zone.clone(),
                        spot: request.spot,
                        state: "pending".into(),
                        state_reason: None,
                        launch_time: None,
                        tags: request.tags.clone(),
                    };
                    s.instances.push(instance.clone());
                    outcome.instances.push(instance);
                }
                // By the job's uid, or by the batch's token for a batch of jobs.
                let key = (request.tags.get(crate::domain::launch::RUNNER_JOB_UID))
                    .or(request.tags.get(crate::domain::launch::BATCH));
                if let Some(key) = key {
                    self.launched_at
                        .lock()
                        .unwrap()
                        .insert(key.clone(), returns);
                }
                break;
            }
            if let Some(token) = &request.client_token {
                let remembered = Remembered {
                    parameters: digest(&request.parameters()),
                    instance_ids: outcome.instances.iter().map(|i| i.id.clone()).collect(),
                    failures: outcome.failures.clone(),
                };
                s.tokens.insert(token.clone(), remembered);
            }
            Ok(outcome)
        })
    }

    fn managed_instance_pages<'a>(&'a self, controller_id: &'a str) -> Pages<'a, Instance> {
        // Pages of PAGE instances, each fetched (and counted, and delayed) as its own call.
        futures::stream::try_unfold(Some(0), move |from| async move {
            let Some(from) = from else { return Ok(None) };
            let page = self
                .call("DescribeInstances", |s| {
                    Ok(s.instances
                        .iter()
                        .filter(|i| tags::owned_by(&i.tags, controller_id))
                        .skip(from)
                        .take(PAGE)
                        .map(listed)
                        .collect::<Vec<_>>())
                })
                .await?;
            let next = (page.len() == PAGE).then_some(from + PAGE);
            Ok(Some((page, next)))
        })
        .boxed()
    }

    fn managed_instance<'a>(
        &'a self,
        controller_id: &'a str,
        instance_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<(Instance, String)>>> {
        self.call("DescribeInstances", |s| {
            Ok(s.instances
                .iter()
                .find(|i| i.id == instance_id && tags::owned_by(&i.tags, controller_id))
                .map(|i| (listed(i), ACCOUNT.to_string())))
        })
    }

    fn on_demand_price<'a>(
        &'a self,
        instance_type: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        self.call("GetProducts", |_| {
            Ok((!instance_type.is_empty()).then(|| "0.0960000000".to_string()))
        })
    }

    fn volume_price<'a>(
        &'a self,
        volume_type: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        self.call("GetProducts", |_| {
            Ok((!volume_type.is_empty()).then(|| "0.0800000000".to_string()))
        })
    }

    fn spot_price<'a>(
        &'a self,
        instance_type: &'a str,
        _zone: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        self.call("DescribeSpotPriceHistory", |_| {
            Ok((!instance_type.is_empty()).then(|| "0.031200".to_string()))
        })
    }

    fn terminate_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>> {
        self.call("TerminateInstances", |s| {
            // One protected instance fails the call whole, nothing terminated, as in EC2.
            if let Some(id) = ids.iter().find(|id| s.protected.contains(id)) {
                return Err(CloudError::new(
                    "TerminateInstances",
                    "OperationNotPermitted",
                    format!("The instance '{id}' may not be terminated. Modify its 'disableApiTermination' instance attribute and try again."),
                ));
            }
            for instance in s.instances.iter_mut().filter(|i| ids.contains(&i.id)) {
                instance.state = "terminated".into();
                instance.state_reason =
                    Some("Client.UserInitiatedShutdown: User initiated shutdown".into());
            }
            Ok(())
        })
    }

    fn stop_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>> {
        self.call("StopInstances", |s| {
            change_state(s, "StopInstances", ids, unix_now())
        })
    }

    fn start_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>> {
        self.call("StartInstances", |s| {
            change_state(s, "StartInstances", ids, unix_now())
        })
    }
}

/// StopInstances or StartInstances as EC2 judges them: every id must exist and allow the
/// change, or nothing changes; instances already where the call would take them stay as they
/// are.
fn change_state(s: &mut State, action: &'static str, ids: &[String], now: i64) -> CloudResult<()> {
    let stopping = action == "StopInstances";
    let mut changes = Vec::new();
    for id in ids {
        let Some(index) = s.instances.iter().position(|i| &i.id == id) else {
            return Err(not_found(action, "InvalidInstanceID.NotFound", id));
        };
        let instance = &s.instances[index];
        let incorrect = || {
            CloudError::new(
                action,
                "IncorrectInstanceState",
                format!(
                    "The instance '{id}' is not in a state from which it can be {}.",
                    if stopping { "stopped" } else { "started" }
                ),
            )
        };
        match (stopping, instance.state.as_str()) {
            (true, _) if instance.spot => {
                return Err(CloudError::new(
                    action,
                    "UnsupportedOperation",
                    format!(
                        "You can't stop the Spot Instance '{id}' because it is associated with a one-time Spot Instance request."
                    ),
                ));
            }
            (true, "running") => changes.push(index),
            (true, "stopping" | "stopped") | (false, "pending" | "running") => {}
            (false, "stopped") if s.exhausted.contains(&instance.instance_type) => {
                return Err(CloudError::new(
                    action,
                    "InsufficientInstanceCapacity",
                    format!(
                        "Insufficient capacity to start {id}: no {} capacity in {}",
                        instance.instance_type, instance.zone
                    ),
                ));
            }
            (false, "stopped") => changes.push(index),
            _ => return Err(incorrect()),
        }
    }
    for index in changes {
        let instance = &mut s.instances[index];
        if stopping {
            instance.state = "stopping".into();
            instance.state_reason =
                Some("Client.UserInitiatedShutdown: User initiated shutdown".into());
        } else {
            instance.state = "pending".into();
            instance.state_reason = None;
            instance.launch_time = Some(now);
        }
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// An instance as a tag-filtered listing shows it: Pacer's own tags only.
fn listed(i: &Instance) -> Instance {
    Instance {
        id: i.id.clone(),
        instance_type: i.instance_type.clone(),
        zone: i.zone.clone(),
        spot: i.spot,
        state: i.state.clone(),
        state_reason: i.state_reason.clone(),
        launch_time: i.launch_time,
        tags: i
            .tags
            .iter()
            .filter(|(k, _)| k.starts_with(tags::PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use futures::TryStreamExt as _;

    fn template_data() -> LaunchTemplateData {
        LaunchTemplateData {
            image_id: "ami-1".into(),
            security_group_ids: vec![],
            instance_profile: None,
            root_volume: None,
            spot: false,
            user_data: String::new(),
            tags: BTreeMap::new(),
            metadata_hop_limit: 1,
        }
    }

    /// A fake with one subnet and a launch template, and a fleet request for two types
    /// tagged as controller `controller`'s.
    pub(crate) async fn fleet_of(controller: &str) -> (FakeEc2, LaunchRequest) {
        let ec2 = FakeEc2::new().with_subnet("subnet-1", "vpc-1", "us-east-1b");
        let ours = BTreeMap::from([
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
            (tags::CONTROLLER.to_string(), controller.to_string()),
            ("team".to_string(), "ci".to_string()),
        ]);
        let lt = ec2
            .create_launch_template("lt", "d", &template_data(), &ours)
            .await
            .unwrap();
        let request = LaunchRequest {
            launch_template_id: lt.id,
            version: 1,
            offerings: vec![
                ("m7i.large".into(), "subnet-1".into()),
                ("m6i.large".into(), "subnet-1".into()),
            ],
            spot: true,
            fleet: true,
            tags: ours,
            allocation_strategy: None,
            client_token: None,
            count: 1,
        };
        (ec2, request)
    }

    #[tokio::test]
    async fn a_protected_instance_fails_a_termination_whole_and_terminate_each_isolates_it() {
        use crate::cloud::ErrorClass;
        let (ec2, mut request) = fleet_of("c").await;
        request.count = 3;
        let launched = ec2.launch(&request).await.unwrap().instances;
        let ids: Vec<String> = launched.into_iter().map(|i| i.id).collect();
        assert_eq!(ids.len(), 3);
        ec2.protect(&ids[1]);
        let terminated = || {
            let all = ec2.instances();
            all.iter().filter(|i| i.state == "terminated").count()
        };
        // As EC2 does: the call fails whole, nothing terminated.
        let err = ec2.terminate_instances(&ids).await.unwrap_err();
        assert!(err.is(ErrorClass::IncorrectState), "{err}");
        assert_eq!(terminated(), 0);
        // Each alone then: the protected one stays, the others go.
        let each = crate::cloud::terminate_each(&ec2, &ids).await;
        let failed: Vec<&String> = (each.iter())
            .filter(|(_, r)| r.is_err())
            .map(|(id, _)| id)
            .collect();
        assert_eq!(failed, [&ids[1]]);
        assert_eq!(terminated(), 2);
        // Throttled, the call is not fanned out into more: every id gets that answer.
        ec2.fail_next("TerminateInstances", "RequestLimitExceeded", 1);
        let before = ec2.count("TerminateInstances");
        let each = crate::cloud::terminate_each(&ec2, &ids).await;
        assert_eq!(ec2.count("TerminateInstances") - before, 1);
        let throttled =
            |r: &CloudResult<()>| r.as_ref().is_err_and(|e| e.is(ErrorClass::Throttled));
        assert!(each.iter().all(|(_, r)| throttled(r)), "{each:?}");
    }

    #[tokio::test]
    async fn a_fleet_skips_exhausted_types_and_run_instances_fails_on_them() {
        let (ec2, mut request) = fleet_of("c").await;
        ec2.exhaust("m7i.large");
        let out = ec2.launch(&request).await.unwrap();
        assert_eq!(out.failures.len(), 1);
        assert_eq!(
            (
                out.instances[0].instance_type.as_str(),
                out.instances[0].zone.as_str()
            ),
            ("m6i.large", "us-east-1b")
        );

        request.fleet = false;
        let err = ec2.launch(&request).await.unwrap_err();
        assert!(err.is(crate::cloud::ErrorClass::InsufficientCapacity));

        let live = ec2.describe_managed_instances("c").await.unwrap();
        assert_eq!(live.len(), 1);
        ec2.terminate_instances(&[live[0].id.clone()])
            .await
            .unwrap();
        assert!(!ec2.describe_managed_instances("c").await.unwrap()[0].is_alive());
        assert_eq!(ec2.count("CreateFleet") + ec2.count("RunInstances"), 2);
    }

    #[tokio::test]
    async fn a_client_token_replays_its_first_answer_and_refuses_other_parameters() {
        let (ec2, mut request) = fleet_of("c").await;
        ec2.exhaust("m7i.large");
        ec2.exhaust("m6i.large");
        request.client_token = Some("token-1".into());
        let empty = ec2.launch(&request).await.unwrap();
        assert!(empty.instances.is_empty());
        // Capacity is back, but the same request under the same token is the same launch.
        ec2.state.lock().unwrap().exhausted.clear();
        assert_eq!(ec2.launch(&request).await.unwrap(), empty);

        request.client_token = Some("token-2".into());
        let first = ec2.launch(&request).await.unwrap();
        assert_eq!(first.instances.len(), 1);
        assert_eq!(ec2.launch(&request).await.unwrap(), first);
        assert_eq!(ec2.describe_managed_instances("c").await.unwrap().len(), 1);

        request.spot = false;
        let err = ec2.launch(&request).await.unwrap_err();
        assert_eq!(err.code, "IdempotentParameterMismatch");
        assert!(err.is(crate::cloud::ErrorClass::InvalidInput));
    }

    #[tokio::test]
    async fn managed_instances_come_a_page_per_call_with_only_our_tags() {
        let (ec2, mut request) = fleet_of("c").await;
        for _ in 0..=PAGE {
            ec2.launch(&request).await.unwrap();
        }
        request.tags.insert(tags::CONTROLLER.into(), "other".into());
        ec2.launch(&request).await.unwrap();

        let pages: Vec<Vec<Instance>> =
            ec2.managed_instance_pages("c").try_collect().await.unwrap();
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [PAGE, 1]);
        assert_eq!(ec2.count("DescribeInstances"), 2);
        let all = ec2.describe_managed_instances("c").await.unwrap();
        assert_eq!(all.len(), PAGE + 1);
        assert!(all.iter().all(|i| !i.tags.contains_key("team")));
    }

    #[tokio::test]
    async fn instances_stop_and_start_as_ec2_moves_them() {
        use crate::cloud::ErrorClass;
        let (ec2, mut request) = fleet_of("c").await;
        request.spot = false;
        let id = ec2.launch(&request).await.unwrap().instances[0].id.clone();
        let ids = [id.clone()];
        let state = || ec2.instances()[0].state.clone();

        let early = ec2.stop_instances(&ids).await.unwrap_err();
        assert!(early.is(ErrorClass::IncorrectState), "pending: {early}");
        ec2.settle();
        ec2.stop_instances(&ids).await.unwrap();
        assert!(ec2.instances()[0].is_stopping());
        let too_soon = ec2.start_instances(&ids).await.unwrap_err();
        assert!(too_soon.is(ErrorClass::IncorrectState), "{too_soon}");
        ec2.stop_instances(&ids).await.unwrap();
        ec2.settle();
        assert!(ec2.instances()[0].is_stopped());
        ec2.stop_instances(&ids).await.unwrap();
        assert_eq!(
            state(),
            "stopped",
            "stopping a stopped instance changes nothing"
        );

        ec2.exhaust("m7i.large");
        let none = ec2.start_instances(&ids).await.unwrap_err();
        assert!(none.is(ErrorClass::InsufficientCapacity), "{none}");
        assert_eq!(state(), "stopped");
        ec2.state.lock().unwrap().exhausted.clear();
        ec2.start_instances(&ids).await.unwrap();
        assert_eq!(state(), "pending");
        assert!(
            ec2.instances()[0].launch_time.is_some(),
            "a start is a launch time"
        );
        ec2.settle();
        assert_eq!(state(), "running");

        let unknown = ec2
            .start_instances(&[id.clone(), "i-0000000000000dead".into()])
            .await
            .unwrap_err();
        assert!(unknown.is(ErrorClass::NotFound), "{unknown}");
        ec2.terminate_instances(&ids).await.unwrap();
        let gone = ec2.start_instances(&ids).await.unwrap_err();
        assert!(gone.is(ErrorClass::IncorrectState), "{gone}");
        assert_eq!(ec2.count("StopInstances") + ec2.count("StartInstances"), 9);
    }

    #[tokio::test]
    async fn a_spot_instance_cannot_be_stopped() {
        let (ec2, request) = fleet_of("c").await;
        let id = ec2.launch(&request).await.unwrap().instances[0].id.clone();
        ec2.settle();
        let err = ec2.stop_instances(&[id]).await.unwrap_err();
        assert_eq!(err.code, "UnsupportedOperation");
        assert!(err.is(crate::cloud::ErrorClass::InvalidInput));
        assert_eq!(ec2.instances()[0].state, "running");
    }
}
