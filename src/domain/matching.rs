//! Which RunnerPool serves a queued workflow job: every label the job asks for among the
//! pool's (case-insensitive), the repository within the pool's GitHub scope, and of those the
//! most specific, then the highest priority, then the first by namespace/name.

use crate::api::{GitHubScope, RunnerPool};

/// A queued job as matching sees it.
#[derive(Clone, Copy, Debug)]
pub struct QueuedJob<'a> {
    pub labels: &'a [String],
    /// The repository's owner (organization or user) and name.
    pub owner: &'a str,
    pub repository: &'a str,
}

/// Whether a repository (`owner`, `repository`) is within `pool`'s GitHub scope: the owner
/// matches and, for org pools, the repository list (when there is one) names it; repo pools
/// must name it.
pub fn in_scope(pool: &RunnerPool, owner: &str, repository: &str) -> bool {
    let github = &pool.spec.github;
    let listed = github
        .repositories
        .iter()
        .any(|r| r.eq_ignore_ascii_case(repository));
    github.owner.eq_ignore_ascii_case(owner)
        && match github.scope {
            GitHubScope::Org => github.repositories.is_empty() || listed,
            GitHubScope::Repo => listed,
        }
}

/// Whether `pool` can serve `job`.
pub fn serves(pool: &RunnerPool, job: &QueuedJob<'_>) -> bool {
    in_scope(pool, job.owner, job.repository)
        && job.labels.iter().all(|wanted| {
            pool.spec
                .labels
                .iter()
                .any(|have| have.eq_ignore_ascii_case(wanted))
        })
}

/// The pool to record `job` for, among `pools`, or `None` when no pool serves it. Deleted
/// pools (being deleted) take no new jobs.
pub fn choose<'p>(pools: &[&'p RunnerPool], job: &QueuedJob<'_>) -> Option<&'p RunnerPool> {
    pools
        .iter()
        .copied()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && serves(p, job))
        .min_by(|a, b| {
            let extra = |p: &RunnerPool| p.spec.labels.len().saturating_sub(job.labels.len());
            let key = |p: &'p RunnerPool| {
                (
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default(),
                )
            };
            extra(a)
                .cmp(&extra(b))
                .then(b.spec.priority.cmp(&a.spec.priority))
                .then(key(a).cmp(&key(b)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(
        ns: &str,
        name: &str,
        labels: &[&str],
        change: impl FnOnce(&mut RunnerPool),
    ) -> RunnerPool {
        let text = include_str!("../../examples/runnerpool-org-spot.yaml");
        let mut pool: RunnerPool = serde_saphyr::from_str(text).unwrap();
        pool.metadata.namespace = Some(ns.into());
        pool.metadata.name = Some(name.into());
        pool.spec.labels = labels.iter().map(|l| l.to_string()).collect();
        change(&mut pool);
        pool
    }

    fn job<'a>(labels: &'a [String], repository: &'a str) -> QueuedJob<'a> {
        QueuedJob {
            labels,
            owner: "example-org",
            repository,
        }
    }

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_pool_serves_a_job_when_it_has_every_label_and_the_repository_is_in_scope() {
        let linux = pool("ci", "linux", &["self-hosted", "Linux", "x64"], |_| {});
        let cases: [(&str, &[&str], &str, bool); 6] = [
            (
                "all labels, any case",
                &["self-hosted", "linux"],
                "api",
                true,
            ),
            ("no labels at all", &[], "api", true),
            (
                "a label the pool lacks",
                &["self-hosted", "gpu"],
                "api",
                false,
            ),
            ("GitHub-hosted label", &["ubuntu-latest"], "api", false),
            (
                "every label of the pool",
                &["self-hosted", "linux", "x64"],
                "api",
                true,
            ),
            (
                "one more than the pool",
                &["self-hosted", "linux", "x64", "arm"],
                "api",
                false,
            ),
        ];
        for (name, wanted, repo, expected) in cases {
            assert_eq!(
                serves(&linux, &job(&labels(wanted), repo)),
                expected,
                "{name}"
            );
        }
        let other_owner = QueuedJob {
            owner: "someone-else",
            ..job(&[], "api")
        };
        assert!(!serves(&linux, &other_owner));
    }

    #[test]
    fn repositories_narrow_an_org_pool_and_define_a_repo_pool() {
        let narrowed = pool("ci", "narrow", &["self-hosted"], |p| {
            p.spec.github.repositories = vec!["api".into()];
        });
        let by_repo = pool("ci", "repo", &["self-hosted"], |p| {
            p.spec.github.scope = GitHubScope::Repo;
            p.spec.github.repositories = vec!["web".into()];
        });
        let wanted = labels(&["self-hosted"]);
        assert!(serves(&narrowed, &job(&wanted, "api")));
        assert!(!serves(&narrowed, &job(&wanted, "web")));
        assert!(serves(&by_repo, &job(&wanted, "web")));
        assert!(!serves(&by_repo, &job(&wanted, "api")));
    }

    #[test]
    fn the_most_specific_pool_wins_then_priority_then_namespace_and_name() {
        let wanted = labels(&["self-hosted", "linux"]);
        let broad = pool(
            "ci",
            "broad",
            &["self-hosted", "linux", "x64", "pacer"],
            |_| {},
        );
        let exact = pool("ci", "exact", &["self-hosted", "linux"], |_| {});
        let exact_later = pool("ci", "exact-b", &["self-hosted", "linux"], |_| {});
        let exact_urgent = pool("zz", "exact-z", &["self-hosted", "linux"], |p| {
            p.spec.priority = 5
        });
        let name = |pools: &[&RunnerPool]| {
            choose(pools, &job(&wanted, "api")).map(|p| p.metadata.name.clone().unwrap())
        };
        assert_eq!(
            name(&[&broad, &exact_later, &exact]).as_deref(),
            Some("exact")
        );
        assert_eq!(
            name(&[&broad, &exact, &exact_urgent]).as_deref(),
            Some("exact-z")
        );
        assert_eq!(name(&[&broad]).as_deref(), Some("broad"));
        let mut deleting = exact.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(name(&[&broad, &deleting]).as_deref(), Some("broad"));
        assert_eq!(name(&[]), None);
    }
}
