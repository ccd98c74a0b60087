//! Which of our instances nobody claims any more.

use std::collections::HashSet;
use std::time::Duration;

use crate::cloud::{Instance, tags};
use crate::domain::launch::RUNNER_JOB_UID;

/// Instances to terminate: tagged as this controller's, not on their way out already, older
/// than `grace`, and claimed by no live RunnerJob. `now` is seconds since the Unix epoch.
pub fn orphans<'a>(
    instances: &'a [Instance],
    controller_id: &str,
    live_jobs: &HashSet<String>,
    now: i64,
    grace: Duration,
) -> Vec<&'a Instance> {
    instances
        .iter()
        .filter(|i| tags::owned_by(&i.tags, controller_id))
        .filter(|i| {
            matches!(
                i.state.as_str(),
                "pending" | "running" | "stopping" | "stopped"
            )
        })
        .filter(|i| {
            i.launch_time
                .is_some_and(|t| now - t >= grace.as_secs() as i64)
        })
        .filter(|i| {
            i.tags
                .get(RUNNER_JOB_UID)
                .is_none_or(|uid| !live_jobs.contains(uid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn instance(
        id: &str,
        controller: Option<&str>,
        uid: Option<&str>,
        state: &str,
        launched: i64,
    ) -> Instance {
        let mut tags = BTreeMap::new();
        if let Some(c) = controller {
            tags.insert(
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            );
            tags.insert(tags::CONTROLLER.to_string(), c.to_string());
        }
        if let Some(u) = uid {
            tags.insert(RUNNER_JOB_UID.to_string(), u.to_string());
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
        let live = HashSet::from(["live-job".to_string()]);
        let ids: Vec<&str> = orphans(&instances, "prod", &live, now, Duration::from_secs(120))
            .iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(ids, ["i-orphan", "i-stopped"]);
    }
}
