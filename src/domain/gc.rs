//! Which of our instances and launch templates nobody claims any more.

use std::collections::HashSet;
use std::time::Duration;

use crate::cloud::{Instance, LaunchTemplate, tags};
use crate::domain::launch::RUNNER_JOB_UID;

/// Instances to terminate: those that [`may_be_orphan`] and that no live RunnerJob claims.
pub fn orphans<'a>(
    instances: &'a [Instance],
    controller_id: &str,
    live_jobs: &HashSet<String>,
    now: i64,
    grace: Duration,
) -> Vec<&'a Instance> {
    instances
        .iter()
        .filter(|i| may_be_orphan(i, controller_id, now, grace))
        .filter(|i| {
            i.tags
                .get(RUNNER_JOB_UID)
                .is_none_or(|uid| !live_jobs.contains(uid))
        })
        .collect()
}

/// What makes an instance a candidate, whatever the RunnerJobs: tagged as this controller's,
/// not on its way out already, and older than `grace`. `now` is seconds since the Unix epoch.
pub fn may_be_orphan(i: &Instance, controller_id: &str, now: i64, grace: Duration) -> bool {
    tags::owned_by(&i.tags, controller_id)
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
    controller_id: &str,
    namespace: Option<&str>,
    live_pools: &HashSet<String>,
    now: i64,
    grace: Duration,
) -> Vec<&'a LaunchTemplate> {
    templates
        .iter()
        .filter(|t| tags::owned_by(&t.tags, controller_id))
        .filter(|t| t.created.is_some_and(|c| now - c >= grace.as_secs() as i64))
        .filter(|t| match t.tags.get(tags::POOL) {
            Some(pool) => {
                let in_scope = namespace.is_none_or(|ns| pool.split('/').next() == Some(ns));
                in_scope && !live_pools.contains(pool)
            }
            // Ours by its tags, yet for no pool: nothing will ever use it.
            None => namespace.is_none(),
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
        let tags = tags_of(controller, RUNNER_JOB_UID, uid);
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
        let live = HashSet::from(["live-job".to_string()]);
        let ids: Vec<&str> = orphans(&instances, "prod", &live, now, Duration::from_secs(120))
            .iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(ids, ["i-orphan", "i-stopped"]);
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
            orphan_templates(
                &templates,
                "prod",
                namespace,
                &live,
                now,
                Duration::from_secs(120),
            )
            .iter()
            .map(|t| t.name.as_str())
            .collect()
        };
        assert_eq!(names(None), ["gone", "other-namespace", "no-pool"]);
        // A controller confined to one namespace leaves the others' templates alone.
        assert_eq!(names(Some("ci")), ["gone"]);
    }
}
