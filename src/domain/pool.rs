//! Decisions about a RunnerPool: is it valid against what EC2 reports, and what its launch
//! template must say.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::api::{
    CapacityType, JobPhase, MAX_WARM_MAX_AGE_MINUTES, MAX_WARM_SIZE, MIN_WARM_MAX_AGE_MINUTES,
    RunnerCounts, RunnerPoolSpec, SpawnMethod,
};
use crate::cloud::{
    BlockDevice, Image, InstanceTypeInfo, LaunchRequest, LaunchTemplateData, SecurityGroup, Subnet,
    tags,
};

/// The answer to one EC2/IAM look-up: found, or missing with EC2's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    Missing(String),
}

/// What IAM said about the pool's instance profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileLookup {
    /// The pool sets none.
    NotSet,
    Roles(Vec<String>),
    NotFound,
    /// `iam:GetInstanceProfile` is optional in the policy; without it we cannot check.
    AccessDenied,
}

/// Everything validation needs to know about EC2, looked up by the reconciler.
#[derive(Clone, Debug)]
pub struct Observed {
    pub image: Lookup<Image>,
    pub instance_types: Lookup<Vec<InstanceTypeInfo>>,
    pub subnets: Lookup<Vec<Subnet>>,
    pub security_groups: Lookup<Vec<SecurityGroup>>,
    pub instance_profile: ProfileLookup,
}

/// The verdict on a pool's inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid; `notes` are things a human should know (a check we could not make).
    Valid { notes: Vec<String> },
    /// Invalid: a CamelCase reason and a message naming the field and value.
    Invalid {
        reason: &'static str,
        message: String,
    },
}

fn invalid(reason: &'static str, message: String) -> Verdict {
    Verdict::Invalid { reason, message }
}

/// Checks the pool against what EC2 reports. The first problem wins: fixing it may change the
/// others.
pub fn validate(spec: &RunnerPoolSpec, observed: &Observed) -> Verdict {
    let checked = found_image(spec, observed).and_then(|image| {
        check_instance_types(spec, observed, image)?;
        check_root_volume(spec, image)?;
        check_warm(spec, image)?;
        let vpc = check_subnets(spec, observed)?;
        check_security_groups(spec, observed, vpc)?;
        profile_notes(spec, observed)
    });
    match checked {
        Ok(notes) => Verdict::Valid { notes },
        Err(invalid) => invalid,
    }
}

fn found_image<'o>(spec: &RunnerPoolSpec, observed: &'o Observed) -> Result<&'o Image, Verdict> {
    match &observed.image {
        Lookup::Found(image) => Ok(image),
        Lookup::Missing(why) => Err(invalid(
            "AmiNotFound",
            format!("spec.ami: AMI {} not found in the region: {why}", spec.ami),
        )),
    }
}

/// Every instance type is offered in the region and runs the AMI's architecture.
fn check_instance_types(
    spec: &RunnerPoolSpec,
    observed: &Observed,
    image: &Image,
) -> Result<(), Verdict> {
    let types = match &observed.instance_types {
        Lookup::Found(types) => types,
        Lookup::Missing(why) => {
            return Err(invalid(
                "InstanceTypeNotFound",
                format!("spec.instanceTypes: {why}"),
            ));
        }
    };
    for (i, name) in spec.instance_types.iter().enumerate() {
        match types.iter().find(|t| &t.name == name) {
            None => {
                return Err(invalid(
                    "InstanceTypeNotFound",
                    format!(
                        "spec.instanceTypes[{i}]: instance type {name} is not offered in the region"
                    ),
                ));
            }
            Some(t) if !t.architectures.contains(&image.architecture) => {
                return Err(invalid(
                    "ArchitectureMismatch",
                    format!(
                        "spec.instanceTypes[{i}]: {name} runs {}, but AMI {} is {}",
                        t.architectures.join("/"),
                        image.id,
                        image.architecture
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_root_volume(spec: &RunnerPoolSpec, image: &Image) -> Result<(), Verdict> {
    let size = spec.root_volume.size_gib;
    if let Some(snapshot) = image.root_snapshot_gib
        && size > 0
        && size < snapshot
    {
        return Err(invalid(
            "RootVolumeTooSmall",
            format!(
                "spec.rootVolume.sizeGiB: {size} GiB is smaller than AMI {}'s {snapshot} GiB root snapshot; use 0 to keep the AMI's size or at least {snapshot}",
                image.id
            ),
        ));
    }
    Ok(())
}

/// A warm pool's instances can be stopped: EC2 stops only EBS-backed, non-spot instances. The
/// schema and its rule say the same of the spec; this catches the AMI, and a pool stored
/// before the rule existed.
fn check_warm(spec: &RunnerPoolSpec, image: &Image) -> Result<(), Verdict> {
    let Some(warm) = spec.warm.as_ref().filter(|w| w.size != 0) else {
        return Ok(());
    };
    if !(0..=MAX_WARM_SIZE).contains(&warm.size) {
        return Err(invalid(
            "WarmPoolInvalid",
            format!(
                "spec.warm.size: {} is outside 0 to {MAX_WARM_SIZE}",
                warm.size
            ),
        ));
    }
    if !(MIN_WARM_MAX_AGE_MINUTES..=MAX_WARM_MAX_AGE_MINUTES).contains(&warm.max_age_minutes) {
        return Err(invalid(
            "WarmPoolInvalid",
            format!(
                "spec.warm.maxAgeMinutes: {} is outside {MIN_WARM_MAX_AGE_MINUTES} to {MAX_WARM_MAX_AGE_MINUTES}",
                warm.max_age_minutes
            ),
        ));
    }
    if spec.capacity.capacity_type != CapacityType::OnDemand {
        return Err(invalid(
            "WarmPoolNeedsOnDemand",
            "spec.warm: a warm pool needs spec.capacity.type onDemand; EC2 cannot stop a spot \
             instance launched by a one-time request"
                .to_string(),
        ));
    }
    if !image.ebs_backed {
        return Err(invalid(
            "WarmPoolNeedsEbsAmi",
            format!(
                "spec.warm: AMI {} has an instance-store root device; EC2 stops only EBS-backed instances",
                image.id
            ),
        ));
    }
    Ok(())
}

/// Every subnet exists, all in one VPC, which is returned.
fn check_subnets<'o>(spec: &RunnerPoolSpec, observed: &'o Observed) -> Result<&'o str, Verdict> {
    let subnets = match &observed.subnets {
        Lookup::Found(subnets) => subnets,
        Lookup::Missing(why) => {
            return Err(invalid("SubnetNotFound", format!("spec.subnets: {why}")));
        }
    };
    for (i, id) in spec.subnets.iter().enumerate() {
        if !subnets.iter().any(|s| &s.id == id) {
            return Err(invalid(
                "SubnetNotFound",
                format!("spec.subnets[{i}]: subnet {id} not found"),
            ));
        }
    }
    let vpc = &subnets[0].vpc_id;
    if let Some(other) = subnets.iter().find(|s| &s.vpc_id != vpc) {
        return Err(invalid(
            "SubnetsSpanVpcs",
            format!(
                "spec.subnets: all subnets must be in one VPC; {} is in {vpc} but {} is in {}",
                subnets[0].id, other.id, other.vpc_id
            ),
        ));
    }
    Ok(vpc)
}

/// Every security group exists, in the subnets' VPC.
fn check_security_groups(
    spec: &RunnerPoolSpec,
    observed: &Observed,
    vpc: &str,
) -> Result<(), Verdict> {
    let groups = match &observed.security_groups {
        Lookup::Found(groups) => groups,
        Lookup::Missing(why) => {
            return Err(invalid(
                "SecurityGroupNotFound",
                format!("spec.securityGroups: {why}"),
            ));
        }
    };
    for (i, id) in spec.security_groups.iter().enumerate() {
        match groups.iter().find(|g| &g.id == id) {
            None => {
                return Err(invalid(
                    "SecurityGroupNotFound",
                    format!("spec.securityGroups[{i}]: security group {id} not found"),
                ));
            }
            Some(g) if g.vpc_id != vpc => {
                return Err(invalid(
                    "SecurityGroupNotInVpc",
                    format!(
                        "spec.securityGroups[{i}]: security group {id} is in {}, not in the subnets' VPC {vpc}",
                        g.vpc_id
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The instance profile, when the pool names one, exists and holds a role; the notes say what
/// could not be checked.
fn profile_notes(spec: &RunnerPoolSpec, observed: &Observed) -> Result<Vec<String>, Verdict> {
    let mut notes = Vec::new();
    let Some(profile) = &spec.instance_profile else {
        return Ok(notes);
    };
    match &observed.instance_profile {
        ProfileLookup::NotFound => {
            return Err(invalid(
                "InstanceProfileNotFound",
                format!(
                    "spec.instanceProfile: instance profile {profile} does not exist; create it with \
                     `aws iam create-instance-profile --instance-profile-name {profile}` and \
                     `aws iam add-role-to-instance-profile --instance-profile-name {profile} --role-name ROLE`"
                ),
            ));
        }
        ProfileLookup::Roles(roles) if roles.is_empty() => {
            return Err(invalid(
                "InstanceProfileHasNoRole",
                format!(
                    "spec.instanceProfile: instance profile {profile} holds no role; add one with \
                     `aws iam add-role-to-instance-profile --instance-profile-name {profile} --role-name ROLE`"
                ),
            ));
        }
        ProfileLookup::AccessDenied => notes.push(format!(
            "instance profile {profile} not checked: iam:GetInstanceProfile is denied (optional permission)"
        )),
        ProfileLookup::Roles(_) | ProfileLookup::NotSet => {}
    }
    Ok(notes)
}

/// Counts runners by phase: waiting, starting (launching or booting), running, completing.
/// Finished jobs are not runners any more.
pub fn runner_counts(phases: impl IntoIterator<Item = JobPhase>) -> RunnerCounts {
    let mut counts = RunnerCounts::default();
    for phase in phases {
        match phase {
            JobPhase::Pending => counts.pending += 1,
            JobPhase::Launching | JobPhase::Booting => counts.starting += 1,
            JobPhase::Running => counts.running += 1,
            JobPhase::Completing => counts.completing += 1,
            JobPhase::Succeeded | JobPhase::Failed => {}
        }
    }
    counts
}

/// Identity of a pool as Pacer names and tags its AWS resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolIdentity<'a> {
    pub controller_id: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl PoolIdentity<'_> {
    /// `namespace/name`, the value of the `gha:pool` tag.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pool's launch template name: unique per controller, namespace and pool, within
    /// EC2's 128 characters. Kubernetes names hold no `/`, so the parts cannot run together.
    pub fn template_name(&self) -> String {
        let full = format!(
            "pacer/{}/{}/{}",
            self.controller_id, self.namespace, self.name
        );
        if full.len() <= 128 {
            return full;
        }
        let digest = hex(&Sha256::digest(full.as_bytes()))[..12].to_string();
        format!("{}~{digest}", &full[..128 - 13])
    }

    /// Tags on the launch template itself.
    pub fn template_tags(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
            (tags::CONTROLLER.to_string(), self.controller_id.to_string()),
            (tags::POOL.to_string(), self.key()),
        ])
    }

    /// Tags on every instance and volume of the pool: the user's tags, then ours over them.
    pub fn instance_tags(&self, spec: &RunnerPoolSpec) -> BTreeMap<String, String> {
        let mut all = spec.tags.clone();
        all.extend(self.template_tags());
        all
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the launch template must say for this pool.
pub fn template_data(
    spec: &RunnerPoolSpec,
    identity: &PoolIdentity<'_>,
    image: &Image,
    user_data: &str,
) -> LaunchTemplateData {
    use base64::Engine as _;
    let volume = &spec.root_volume;
    LaunchTemplateData {
        image_id: spec.ami.clone(),
        security_group_ids: spec.security_groups.clone(),
        instance_profile: spec.instance_profile.clone(),
        root_volume: Some(BlockDevice {
            device_name: image
                .root_device_name
                .clone()
                .unwrap_or_else(|| "/dev/xvda".into()),
            size_gib: (volume.size_gib > 0).then_some(volume.size_gib),
            volume_type: serde_json::to_value(volume.volume_type)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            iops: volume.iops,
            throughput: volume.throughput,
        }),
        // CreateFleet picks the market itself and refuses templates that name one; only
        // spot-only pools launched with RunInstances carry it in the template.
        spot: spec.capacity.capacity_type == CapacityType::Spot
            && !spec.capacity.fallback_to_on_demand
            && spec.spawn_method == SpawnMethod::RunInstances,
        user_data: base64::engine::general_purpose::STANDARD.encode(user_data),
        tags: identity.instance_tags(spec),
        metadata_hop_limit: spec.metadata_hop_limit,
    }
}

/// A short, stable digest of the template data: a new template version exactly when it changes.
pub fn spec_hash(data: &LaunchTemplateData) -> String {
    // JSON of a struct of strings, numbers and sorted maps: the same bytes for the same data,
    // whatever `Debug` prints in another compiler or crate version.
    let canonical = serde_json::to_vec(data).expect("template data serializes");
    hex(&Sha256::digest(&canonical))[..16].to_string()
}

const DESCRIPTION_PREFIX: &str = "pacer spec-hash ";

/// The version description that records which spec hash a template version was built from.
pub fn version_description(hash: &str) -> String {
    format!("{DESCRIPTION_PREFIX}{hash}")
}

pub fn hash_in_description(description: &str) -> Option<&str> {
    description.strip_prefix(DESCRIPTION_PREFIX)
}

/// How many template versions to keep, the default included.
pub const VERSIONS_KEPT: i64 = 3;

/// Old versions to delete once `latest` is the default: the ten below the kept window, so a
/// delete missed once is retried next time.
pub fn versions_to_delete(latest: i64) -> Vec<i64> {
    let newest_old = latest - VERSIONS_KEPT;
    (newest_old - 9..=newest_old).filter(|v| *v >= 1).collect()
}

/// The launch a DryRun checks: the pool's real template, offerings and tags.
pub fn dry_run_request(
    spec: &RunnerPoolSpec,
    identity: &PoolIdentity<'_>,
    template_id: &str,
    version: i64,
) -> LaunchRequest {
    LaunchRequest {
        launch_template_id: template_id.to_string(),
        version,
        offerings: spec
            .instance_types
            .iter()
            .flat_map(|t| spec.subnets.iter().map(move |s| (t.clone(), s.clone())))
            .collect(),
        spot: spec.capacity.capacity_type == CapacityType::Spot,
        fleet: spec.spawn_method == SpawnMethod::Fleet,
        tags: identity.instance_tags(spec),
        allocation_strategy: crate::domain::launch::allocation_strategy(
            &spec.capacity,
            match spec.capacity.capacity_type {
                CapacityType::Spot => crate::domain::launch::Market::Spot,
                CapacityType::OnDemand => crate::domain::launch::Market::OnDemand,
            },
        )
        .to_string()
        .into(),
        client_token: None,
        count: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunnerPoolSpec {
        let text = include_str!("../../examples/runnerpool-org-spot.yaml");
        let pool: crate::api::RunnerPool = serde_saphyr::from_str(text).unwrap();
        pool.spec
    }

    fn image(arch: &str, snapshot: i32) -> Image {
        Image {
            id: "ami-0a1b2c3d4e5f60001".into(),
            architecture: arch.into(),
            root_device_name: Some("/dev/sda1".into()),
            root_snapshot_gib: Some(snapshot),
            ebs_backed: true,
        }
    }

    fn observed() -> Observed {
        let s = spec();
        Observed {
            image: Lookup::Found(image("x86_64", 8)),
            instance_types: Lookup::Found(
                s.instance_types
                    .iter()
                    .map(|n| InstanceTypeInfo {
                        name: n.clone(),
                        architectures: vec!["x86_64".into()],
                    })
                    .collect(),
            ),
            subnets: Lookup::Found(
                s.subnets
                    .iter()
                    .map(|id| Subnet {
                        id: id.clone(),
                        vpc_id: "vpc-1".into(),
                        zone: "us-east-1a".into(),
                    })
                    .collect(),
            ),
            security_groups: Lookup::Found(
                s.security_groups
                    .iter()
                    .map(|id| SecurityGroup {
                        id: id.clone(),
                        vpc_id: "vpc-1".into(),
                    })
                    .collect(),
            ),
            instance_profile: ProfileLookup::NotSet,
        }
    }

    fn warm(size: i32, max_age_minutes: i32) -> crate::api::WarmPool {
        crate::api::WarmPool {
            size,
            max_age_minutes,
        }
    }

    fn on_demand(s: &mut RunnerPoolSpec) {
        s.capacity.capacity_type = CapacityType::OnDemand;
        s.capacity.fallback_to_on_demand = false;
        s.capacity.allocation_strategy = None;
    }

    #[test]
    fn warm_messages_name_the_field() {
        let mut s = spec();
        s.warm = Some(warm(3, 1440));
        let Verdict::Invalid { message, .. } = validate(&s, &observed()) else {
            panic!()
        };
        assert!(message.starts_with("spec.warm: "), "{message}");
        on_demand(&mut s);
        s.warm = Some(warm(-1, 1440));
        let Verdict::Invalid { message, .. } = validate(&s, &observed()) else {
            panic!()
        };
        assert!(message.starts_with("spec.warm.size: -1"), "{message}");
    }

    fn reason(spec: &RunnerPoolSpec, observed: &Observed) -> &'static str {
        match validate(spec, observed) {
            Verdict::Valid { .. } => "Valid",
            Verdict::Invalid { reason, .. } => reason,
        }
    }

    #[test]
    fn each_bad_input_has_its_reason() {
        let s = spec();
        type Case = (&'static str, fn(&mut RunnerPoolSpec, &mut Observed));
        let cases: Vec<Case> = vec![
            ("Valid", |_, _| {}),
            ("AmiNotFound", |_, o| {
                o.image = Lookup::Missing("InvalidAMIID.NotFound".into())
            }),
            ("ArchitectureMismatch", |_, o| {
                o.image = Lookup::Found(image("arm64", 8))
            }),
            ("InstanceTypeNotFound", |_, o| {
                o.instance_types = Lookup::Missing("no such type".into())
            }),
            ("RootVolumeTooSmall", |s, _| s.root_volume.size_gib = 4),
            ("Valid", |s, _| s.warm = Some(warm(0, 1440))),
            ("WarmPoolNeedsOnDemand", |s, _| s.warm = Some(warm(3, 1440))),
            ("Valid", |s, _| {
                s.warm = Some(warm(3, 1440));
                on_demand(s);
            }),
            ("WarmPoolInvalid", |s, _| {
                s.warm = Some(warm(MAX_WARM_SIZE + 1, 1440));
                on_demand(s);
            }),
            ("WarmPoolInvalid", |s, _| {
                s.warm = Some(warm(3, MIN_WARM_MAX_AGE_MINUTES - 1));
                on_demand(s);
            }),
            ("WarmPoolNeedsEbsAmi", |s, o| {
                s.warm = Some(warm(3, 1440));
                on_demand(s);
                if let Lookup::Found(image) = &mut o.image {
                    image.ebs_backed = false;
                }
            }),
            ("Valid", |_, o| {
                if let Lookup::Found(image) = &mut o.image {
                    image.ebs_backed = false;
                }
            }),
            ("Valid", |s, _| s.root_volume.size_gib = 0),
            ("Valid", |s, _| s.root_volume.size_gib = 8),
            ("SubnetNotFound", |_, o| {
                o.subnets = Lookup::Missing("InvalidSubnetID.NotFound".into())
            }),
            ("SubnetsSpanVpcs", |_, o| {
                if let Lookup::Found(subnets) = &mut o.subnets {
                    subnets[1].vpc_id = "vpc-2".into();
                }
            }),
            ("SecurityGroupNotFound", |_, o| {
                o.security_groups = Lookup::Found(vec![])
            }),
            ("SecurityGroupNotInVpc", |_, o| {
                if let Lookup::Found(groups) = &mut o.security_groups {
                    groups[0].vpc_id = "vpc-2".into();
                }
            }),
            ("InstanceProfileNotFound", |s, o| {
                s.instance_profile = Some("runner".into());
                o.instance_profile = ProfileLookup::NotFound;
            }),
            ("InstanceProfileHasNoRole", |s, o| {
                s.instance_profile = Some("runner".into());
                o.instance_profile = ProfileLookup::Roles(vec![]);
            }),
            ("Valid", |s, o| {
                s.instance_profile = Some("runner".into());
                o.instance_profile = ProfileLookup::AccessDenied;
            }),
        ];
        for (i, (expected, change)) in cases.into_iter().enumerate() {
            let (mut s, mut o) = (s.clone(), observed());
            change(&mut s, &mut o);
            assert_eq!(reason(&s, &o), expected, "case {i}");
        }
    }

    #[test]
    fn messages_name_the_field_and_value() {
        let mut o = observed();
        if let Lookup::Found(groups) = &mut o.security_groups {
            groups[0].vpc_id = "vpc-2".into();
        }
        let Verdict::Invalid { message, .. } = validate(&spec(), &o) else {
            panic!()
        };
        assert!(
            message.starts_with("spec.securityGroups[0]: security group sg-0a1b2c3d4e5f60001"),
            "{message}"
        );
    }

    #[test]
    fn a_denied_profile_check_is_a_note_not_a_failure() {
        let mut s = spec();
        s.instance_profile = Some("runner".into());
        let mut o = observed();
        o.instance_profile = ProfileLookup::AccessDenied;
        let Verdict::Valid { notes } = validate(&s, &o) else {
            panic!()
        };
        assert!(notes[0].contains("iam:GetInstanceProfile"));
    }

    fn identity() -> PoolIdentity<'static> {
        PoolIdentity {
            controller_id: "prod",
            namespace: "ci",
            name: "linux",
        }
    }

    #[test]
    fn template_names_are_unique_and_fit_ec2() {
        assert_eq!(identity().template_name(), "pacer/prod/ci/linux");
        let long = "x".repeat(200);
        let a = PoolIdentity {
            name: &long,
            ..identity()
        }
        .template_name();
        let long2 = format!("{}y", "x".repeat(199));
        let b = PoolIdentity {
            name: &long2,
            ..identity()
        }
        .template_name();
        assert!(a.len() <= 128 && b.len() <= 128);
        assert_ne!(a, b);
    }

    #[test]
    fn our_tags_win_over_user_tags_and_user_tags_reach_instances() {
        let mut s = spec();
        s.tags.insert("team".into(), "platform".into());
        let tags = identity().instance_tags(&s);
        assert_eq!(tags["gha:managed-by"], "pacer");
        assert_eq!(tags["gha:controller"], "prod");
        assert_eq!(tags["gha:pool"], "ci/linux");
        assert_eq!(tags["team"], "platform");
    }

    #[test]
    fn the_spec_hash_is_pinned_to_a_stable_serialization() {
        let data = LaunchTemplateData {
            image_id: "ami-1".into(),
            security_group_ids: vec!["sg-1".into()],
            instance_profile: None,
            root_volume: None,
            spot: true,
            user_data: "IyEvYmluL2Jhc2gK".into(),
            tags: BTreeMap::from([("gha:managed-by".into(), "pacer".into())]),
            metadata_hop_limit: 1,
        };
        // Changing this value makes every pool's template take a new version: do it knowingly.
        assert_eq!(spec_hash(&data), "4fcfa09eff23b9d8");
    }

    #[test]
    fn only_launch_inputs_change_the_hash() {
        let img = image("x86_64", 8);
        let base = spec();
        let hash =
            |s: &RunnerPoolSpec| spec_hash(&template_data(s, &identity(), &img, "#!/bin/bash\n"));
        let mut labels = base.clone();
        labels.labels.push("gpu".into());
        labels.max_runners = 99;
        // Resizing a warm pool keeps its template version, and so its warm instances.
        labels.warm = Some(warm(5, 600));
        assert_eq!(hash(&base), hash(&labels));
        let mut ami = base.clone();
        ami.ami = "ami-0a1b2c3d4e5f60009".into();
        assert_ne!(hash(&base), hash(&ami));
        let mut profile = base.clone();
        profile.instance_profile = Some("runner".into());
        assert_ne!(hash(&base), hash(&profile));
    }

    #[test]
    fn market_options_only_for_spot_only_run_instances_pools() {
        let img = image("x86_64", 8);
        let mut s = spec();
        assert!(
            !template_data(&s, &identity(), &img, "").spot,
            "fleet pools leave the market to CreateFleet"
        );
        s.spawn_method = SpawnMethod::RunInstances;
        assert!(
            !template_data(&s, &identity(), &img, "").spot,
            "with fallback the market is chosen per launch"
        );
        s.capacity.fallback_to_on_demand = false;
        assert!(template_data(&s, &identity(), &img, "").spot);
    }

    #[test]
    fn runners_are_counted_by_phase_and_finished_jobs_are_not_runners() {
        use JobPhase::*;
        let counts = runner_counts([
            Pending, Launching, Booting, Running, Running, Completing, Succeeded, Failed,
        ]);
        assert_eq!(
            (
                counts.pending,
                counts.starting,
                counts.running,
                counts.completing
            ),
            (1, 2, 2, 1)
        );
    }

    #[test]
    fn three_versions_are_kept() {
        assert_eq!(versions_to_delete(3), Vec::<i64>::new());
        assert_eq!(versions_to_delete(4), vec![1]);
        assert_eq!(versions_to_delete(20), (8..=17).collect::<Vec<_>>());
        assert_eq!(
            hash_in_description(&version_description("abc")),
            Some("abc")
        );
    }
}
