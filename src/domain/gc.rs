//! Which of our instances and launch templates nobody claims any more.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::cloud::{Instance, LaunchTemplate, tags};
use crate::domain::launch::{BATCH, RUNNER_JOB_UID};

/// Who is asking: a controller id, confined to one namespace or serving all (`None`). Two
/// controllers sharing an id in different namespaces must leave each other's resources alone.
#[derive(Clone, Copy, Debug)]
pub struct Owner<'a> {
    pub controller_id: &'a str,
    pub namespace: Option<&'a str>,
}

impl Owner<'_> {
    /// Whether a resource with these tags is this owner's to collect: tagged with its
    /// controller id and, when it serves one namespace, for a pool (`namespace/name` in
    /// `gha:pool`) of that namespace. A resource of ours for no pool belongs to no namespace.
    pub fn owns(&self, tags: &std::collections::BTreeMap<String, String>) -> bool {
        tags::owned_by(tags, self.controller_id)
            && match (self.namespace, tags.get(tags::POOL)) {
                (None, _) => true,
                (Some(ns), Some(pool)) => pool.split('/').next() == Some(ns),
                (Some(_), None) => false,
            }
    }
}

/// Whether `job` claims the runner Pacer named for its `attempt`: the job is live (neither
/// finished nor being deleted) and at that attempt. Runners of earlier attempts, and of
/// finished jobs, are nobody's.
pub fn claims_runner(job: &crate::api::RunnerJob, attempt: u32) -> bool {
    let (finished, current) = job
        .status
        .as_ref()
        .map_or((false, 1), |s| (s.phase.is_finished(), s.attempt()));
    job.metadata.deletion_timestamp.is_none() && !finished && current == attempt
}

/// What live RunnerJobs claim of batched launches, whose instances name no job: the instances
/// their statuses name, and the batches (by token) a member still waits to hear from or that
/// fewer live jobs record than it has members (a member whose record failed keeps its place,
/// see [`crate::controller::batch`]). Unlike
/// [`super::job::claims_batch_instance`], which decides who may take or terminate an instance,
/// the collector takes any live status's word: a claim made up only keeps an instance a while
/// longer (until that job finishes), never ends another job's.
#[derive(Debug, Default)]
pub struct BatchClaims {
    pub instances: HashSet<String>,
    pub tokens: HashSet<String>,
}

impl BatchClaims {
    /// The claims of RunnerJobs with these statuses: those not finished.
    pub fn of<'a>(statuses: impl IntoIterator<Item = &'a crate::api::RunnerJobStatus>) -> Self {
        let mut claims = Self::default();
        // Per token: the batch's size and how many live statuses record it.
        let mut recorded: HashMap<&str, (u32, u32)> = HashMap::new();
        for status in statuses.into_iter().filter(|s| !s.phase.is_finished()) {
            if let Some(launch) = &status.launch
                && let Some(batch) = &launch.batch
            {
                let (size, count) = recorded.entry(&launch.client_token).or_default();
                (*size, *count) = ((*size).max(batch.size), *count + 1);
            }
            match (&status.instance, &status.launch) {
                (Some(instance), _) => {
                    claims.instances.insert(instance.id.clone());
                }
                (None, Some(launch)) if launch.batch.is_some() => {
                    claims.tokens.insert(launch.client_token.clone());
                }
                _ => {}
            }
        }
        let short = recorded
            .into_iter()
            .filter(|(_, (size, count))| count < size);
        claims
            .tokens
            .extend(short.map(|(token, _)| token.to_string()));
        claims
    }

    fn claim(&self, i: &Instance, token: &str) -> bool {
        self.instances.contains(&i.id) || self.tokens.contains(token)
    }
}

/// How old a batch's instance must be, at least, before it may be collected: the claims on it
/// are read from the watch cache, which may lag behind the statuses a little, and a member
/// whose record failed keeps its place for two minutes, retried with backoff.
pub const BATCH_GRACE: Duration = Duration::from_secs(180);

/// Instances to terminate: those that [`may_be_orphan`] and that no live RunnerJob claims: by
/// the job's uid in the instance's tags, or, for a batch's instance at least [`BATCH_GRACE`]
/// old, by `batches` (none is collected without them). A warm instance (`gha:warm`) is its
/// pool's while the pool is in `live_pools` (the pool's own pass decides its fate), and a
/// job's while a live job's status names it: it is collected only when neither holds, and
/// never without both listings.
pub fn orphans<'a>(
    instances: &'a [Instance],
    owner: Owner<'_>,
    live_jobs: &HashSet<String>,
    batches: Option<&BatchClaims>,
    live_pools: Option<&HashSet<String>>,
    now: i64,
    grace: Duration,
) -> Vec<&'a Instance> {
    instances
        .iter()
        .filter(|i| may_be_orphan(i, owner, now, grace))
        .filter(|i| match (i.tags.get(RUNNER_JOB_UID), i.tags.get(BATCH)) {
            (Some(uid), _) => !live_jobs.contains(uid),
            (None, Some(token)) => {
                may_be_orphan(i, owner, now, BATCH_GRACE)
                    && batches.is_some_and(|claims| !claims.claim(i, token))
            }
            (None, None) if i.tags.contains_key(tags::WARM) => {
                let pool_gone = live_pools.is_some_and(|pools| {
                    (i.tags.get(tags::POOL)).is_none_or(|pool| !pools.contains(pool))
                });
                pool_gone && batches.is_some_and(|claims| !claims.instances.contains(&i.id))
            }
            (None, None) => true,
        })
        .collect()
}

/// What makes an instance a candidate, whatever the RunnerJobs: the owner's, not on its way
/// out already, and older than `grace`. `now` is seconds since the Unix epoch.
pub fn may_be_orphan(i: &Instance, owner: Owner<'_>, now: i64, grace: Duration) -> bool {
    owner.owns(&i.tags)
        && matches!(
            i.state.as_str(),
            "pending" | "running" | "stopping" | "stopped"
        )
        && i.launch_time
            .is_some_and(|t| now - t >= grace.as_secs() as i64)
}

/// Launch templates to delete: tagged as this controller's, for a pool (`namespace/name`)
/// within `namespace` (all when `None`) that no longer exists, and older than `grace`. A pool
/// being deleted still exists, and its own finalizer deletes its template.
pub fn orphan_templates<'a>(
    templates: &'a [LaunchTemplate],
    owner: Owner<'_>,
    live_pools: &HashSet<String>,
    now: i64,
    grace: Duration,
) -> Vec<&'a LaunchTemplate> {
    templates
        .iter()
        .filter(|t| owner.owns(&t.tags))
        .filter(|t| t.created.is_some_and(|c| now - c >= grace.as_secs() as i64))
        // Ours by its tags, yet for no pool: nothing will ever use it.
        .filter(|t| {
            t.tags
                .get(tags::POOL)
                .is_none_or(|pool| !live_pools.contains(pool))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Our ownership tags when `controller` is set, and `key` when `value` is.
    fn tags_of(
        controller: Option<&str>,
        key: &str,
        value: Option<&str>,
    ) -> BTreeMap<String, String> {
        let mut tags = BTreeMap::new();
        if let Some(c) = controller {
            tags.insert(
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            );
            tags.insert(tags::CONTROLLER.to_string(), c.to_string());
        }
        if let Some(v) = value {
            tags.insert(key.to_string(), v.to_string());
        }
        tags
    }

    fn instance(
        id: &str,
        controller: Option<&str>,
        uid: Option<&str>,
        state: &str,
        launched: i64,
    ) -> Instance {
        let mut tags = tags_of(controller, RUNNER_JOB_UID, uid);
        if controller.is_some() {
            tags.insert(tags::POOL.into(), "ci/linux".into());
        }
        Instance {
            id: id.into(),
            instance_type: "m6i.large".into(),
            zone: "us-east-1a".into(),
            spot: false,
            state: state.into(),
            state_reason: None,
            launch_time: Some(launched),
            tags,
        }
    }

    #[test]
    fn only_old_unclaimed_live_instances_of_ours_are_orphans() {
        let now = 10_000;
        let instances = vec![
            instance(
                "i-orphan",
                Some("prod"),
                Some("gone-job"),
                "running",
                now - 300,
            ),
            instance(
                "i-claimed",
                Some("prod"),
                Some("live-job"),
                "running",
                now - 300,
            ),
            instance(
                "i-young",
                Some("prod"),
                Some("gone-job"),
                "pending",
                now - 30,
            ),
            instance(
                "i-other-controller",
                Some("staging"),
                Some("gone-job"),
                "running",
                now - 300,
            ),
            instance("i-not-ours", None, None, "running", now - 300),
            instance(
                "i-terminated",
                Some("prod"),
                Some("gone-job"),
                "terminated",
                now - 300,
            ),
            instance("i-stopped", Some("prod"), None, "stopped", now - 300),
        ];
        let mut other_namespace = instance("i-web", Some("prod"), Some("gone"), "running", 0);
        other_namespace
            .tags
            .insert(tags::POOL.into(), "web/linux".into());
        let instances = [instances, vec![other_namespace]].concat();
        let live = HashSet::from(["live-job".to_string()]);
        let ids = |namespace| -> Vec<&str> {
            let owner = Owner {
                controller_id: "prod",
                namespace,
            };
            let claims = BatchClaims::default();
            orphans(
                &instances,
                owner,
                &live,
                Some(&claims),
                Some(&HashSet::new()),
                now,
                Duration::from_secs(120),
            )
            .iter()
            .map(|i| i.id.as_str())
            .collect()
        };
        assert_eq!(ids(None), ["i-orphan", "i-stopped", "i-web"]);
        // A controller confined to one namespace leaves the others' instances alone, even
        // under the same controller id: it cannot see their RunnerJobs.
        assert_eq!(ids(Some("ci")), ["i-orphan", "i-stopped"]);
    }

    #[test]
    fn a_batchs_instance_is_claimed_by_the_job_that_names_it_or_by_a_member_still_waiting() {
        use crate::api::{InstanceStatus, JobPhase, LaunchBatch, LaunchIntent, RunnerJobStatus};
        let now = 10_000;
        let batch_instance = |id: &str, token: &str| {
            let mut i = instance(id, Some("prod"), None, "running", now - 300);
            i.tags.insert(BATCH.into(), token.into());
            i
        };
        let instances = [
            batch_instance("i-named", "pacer-b1"),
            batch_instance("i-named-too", "pacer-b1"),
            batch_instance("i-waited-for", "pacer-b2"),
            batch_instance("i-extra", "pacer-b1"),
            batch_instance("i-of-a-finished-job", "pacer-b3"),
            batch_instance("i-first", "pacer-b4"),
            batch_instance("i-not-recorded-yet", "pacer-b4"),
        ];
        let status = |phase, instance: Option<&str>, token: &str| RunnerJobStatus {
            phase,
            instance: instance.map(|id| InstanceStatus {
                id: id.into(),
                instance_type: "m7i.large".into(),
                zone: "us-east-1a".into(),
                market: "onDemand".into(),
                launch_time: None,
            }),
            launch: Some(Box::new(LaunchIntent {
                batch: Some(LaunchBatch {
                    size: 2,
                    member: 0,
                    members: vec!["a/1/1".into(), "b/1/1".into()],
                    nonce: "00".into(),
                }),
                ..LaunchIntent::for_test(token)
            })),
            ..Default::default()
        };
        let statuses = [
            status(JobPhase::Booting, Some("i-named"), "pacer-b1"),
            status(JobPhase::Booting, Some("i-named-too"), "pacer-b1"),
            status(JobPhase::Launching, None, "pacer-b2"),
            status(JobPhase::Launching, None, "pacer-b2"),
            status(JobPhase::Succeeded, Some("i-of-a-finished-job"), "pacer-b3"),
            status(JobPhase::Succeeded, Some("i-b3-other"), "pacer-b3"),
            // Recorded by one member only: the other's record failed, and it keeps its place.
            status(JobPhase::Booting, Some("i-first"), "pacer-b4"),
        ];
        let claims = BatchClaims::of(&statuses);
        let owner = Owner {
            controller_id: "prod",
            namespace: None,
        };
        let live = HashSet::new();
        let grace = Duration::from_secs(120);
        let doomed: Vec<&str> = orphans(&instances, owner, &live, Some(&claims), None, now, grace)
            .iter()
            .map(|i| i.id.as_str())
            .collect();
        // An instance of a batch every member recorded that none names, and a finished job's.
        assert_eq!(doomed, ["i-extra", "i-of-a-finished-job"]);
        // Once b4's other member has recorded another instance, the one left is nobody's.
        let statuses = [
            status(JobPhase::Booting, Some("i-first"), "pacer-b4"),
            status(JobPhase::Booting, Some("i-second"), "pacer-b4"),
        ];
        let claims = BatchClaims::of(&statuses);
        let doomed = orphans(&instances, owner, &live, Some(&claims), None, now, grace);
        assert!(doomed.iter().any(|i| i.id == "i-not-recorded-yet"));
        // Without the statuses, no batch's instance is collected.
        assert!(orphans(&instances, owner, &live, None, None, now, grace).is_empty());
    }

    #[test]
    fn a_warm_instance_is_its_pools_while_the_pool_lives_and_a_jobs_while_one_names_it() {
        use crate::api::{InstanceStatus, JobPhase, RunnerJobStatus};
        let now = 10_000;
        let warm = |id: &str, pool: &str| {
            let mut i = instance(id, Some("prod"), None, "stopped", now - 3600);
            i.tags.insert(tags::POOL.into(), pool.into());
            (i.tags).insert(tags::WARM.into(), tags::warm_value("lt-1", 1));
            i
        };
        let instances = [
            warm("i-of-a-live-pool", "ci/linux"),
            warm("i-of-a-deleted-pool", "ci/gone"),
            warm("i-started-for-a-job", "ci/gone"),
        ];
        let running = RunnerJobStatus {
            phase: JobPhase::Running,
            instance: Some(InstanceStatus {
                id: "i-started-for-a-job".into(),
                instance_type: "m7i.large".into(),
                zone: "us-east-1a".into(),
                market: "onDemand".into(),
                launch_time: None,
            }),
            ..Default::default()
        };
        let claims = BatchClaims::of([&running]);
        let owner = Owner {
            controller_id: "prod",
            namespace: None,
        };
        let (live, grace) = (HashSet::new(), Duration::from_secs(120));
        let pools = HashSet::from(["ci/linux".to_string()]);
        let doomed = |pools: Option<&HashSet<String>>, claims: Option<&BatchClaims>| {
            orphans(&instances, owner, &live, claims, pools, now, grace)
                .iter()
                .map(|i| i.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(doomed(Some(&pools), Some(&claims)), ["i-of-a-deleted-pool"]);
        // Without either listing, no warm instance is collected.
        assert!(doomed(None, Some(&claims)).is_empty());
        assert!(doomed(Some(&pools), None).is_empty());
    }

    fn template(
        name: &str,
        controller: Option<&str>,
        pool: Option<&str>,
        created: i64,
    ) -> LaunchTemplate {
        let tags = tags_of(controller, tags::POOL, pool);
        LaunchTemplate {
            id: format!("lt-{name}"),
            name: name.into(),
            default_version: 1,
            latest_version: 1,
            tags,
            created: Some(created),
        }
    }

    #[test]
    fn only_old_templates_of_ours_whose_pool_is_gone_are_orphans() {
        let now = 10_000;
        let templates = vec![
            template("gone", Some("prod"), Some("ci/gone"), now - 300),
            template("live", Some("prod"), Some("ci/live"), now - 300),
            template("young", Some("prod"), Some("ci/gone"), now - 30),
            template(
                "other-controller",
                Some("staging"),
                Some("ci/gone"),
                now - 300,
            ),
            template("not-ours", None, Some("ci/gone"), now - 300),
            template("other-namespace", Some("prod"), Some("web/gone"), now - 300),
            template("no-pool", Some("prod"), None, now - 300),
        ];
        let live = HashSet::from(["ci/live".to_string()]);
        let names = |namespace| -> Vec<&str> {
            let owner = Owner {
                controller_id: "prod",
                namespace,
            };
            orphan_templates(&templates, owner, &live, now, Duration::from_secs(120))
                .iter()
                .map(|t| t.name.as_str())
                .collect()
        };
        assert_eq!(names(None), ["gone", "other-namespace", "no-pool"]);
        // A controller confined to one namespace leaves the others' templates alone.
        assert_eq!(names(Some("ci")), ["gone"]);
    }
}
