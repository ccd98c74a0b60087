//! Which GitHub owners and repositories the pools of each namespace may serve (the
//! configuration's `tenants`). Without it every pool may serve any owner the App reaches; with
//! it, a namespace serves only what its entry names, and a namespace without an entry serves
//! nothing.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::api::{GitHubScope, RunnerPool};

/// What one namespace's pools may serve.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// GitHub owners (organizations or users), compared without case.
    pub owners: Vec<String>,
    /// `owner/name` repositories; empty allows every repository of `owners`.
    #[serde(default)]
    pub repositories: Vec<String>,
}

/// Namespace → what its pools may serve. Empty: no boundary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tenancy {
    pub tenants: BTreeMap<String, Tenant>,
}

impl Tenancy {
    pub fn new(tenants: BTreeMap<String, Tenant>) -> Self {
        Self { tenants }
    }

    /// Whether a pool in `namespace` may serve repository `owner`/`repository`.
    pub fn permits(&self, namespace: &str, owner: &str, repository: &str) -> bool {
        if self.tenants.is_empty() {
            return true;
        }
        let Some(tenant) = self.tenants.get(namespace) else {
            return false;
        };
        let full = format!("{owner}/{repository}");
        tenant.owners.iter().any(|o| o.eq_ignore_ascii_case(owner))
            && (tenant.repositories.is_empty()
                || tenant
                    .repositories
                    .iter()
                    .any(|r| r.eq_ignore_ascii_case(&full)))
    }

    /// Why `pool` may not serve what its spec names, naming the field; `None` when it may.
    pub fn refusal(&self, pool: &RunnerPool) -> Option<String> {
        if self.tenants.is_empty() {
            return None;
        }
        let namespace = pool.metadata.namespace.as_deref().unwrap_or_default();
        let github = &pool.spec.github;
        let Some(tenant) = self.tenants.get(namespace) else {
            return Some(format!(
                "spec.github.owner: namespace {namespace} may serve no GitHub owner (it has no \
                 entry in Pacer's tenants)"
            ));
        };
        if !tenant
            .owners
            .iter()
            .any(|o| o.eq_ignore_ascii_case(&github.owner))
        {
            return Some(format!(
                "spec.github.owner: namespace {namespace} may serve only {}, not {}",
                tenant.owners.join(", "),
                github.owner
            ));
        }
        if tenant.repositories.is_empty() {
            return None;
        }
        if github.scope == GitHubScope::Org && github.repositories.is_empty() {
            return Some(format!(
                "spec.github.repositories: namespace {namespace} may serve only {}: list them",
                tenant.repositories.join(", ")
            ));
        }
        let outside: Vec<&str> = github
            .repositories
            .iter()
            .filter(|r| !self.permits(namespace, &github.owner, r))
            .map(String::as_str)
            .collect();
        (!outside.is_empty()).then(|| {
            format!(
                "spec.github.repositories: namespace {namespace} may not serve {}",
                outside.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenancy() -> Tenancy {
        Tenancy::new(BTreeMap::from([
            (
                "team-a".to_string(),
                Tenant {
                    owners: vec!["Acme".into()],
                    repositories: vec![],
                },
            ),
            (
                "team-b".to_string(),
                Tenant {
                    owners: vec!["acme".into()],
                    repositories: vec!["acme/web".into()],
                },
            ),
        ]))
    }

    fn pool(ns: &str, owner: &str, scope: GitHubScope, repositories: &[&str]) -> RunnerPool {
        let text = include_str!("../../examples/runnerpool-org-spot.yaml");
        let mut pool: RunnerPool = serde_saphyr::from_str(text).unwrap();
        pool.metadata.namespace = Some(ns.into());
        pool.spec.github.owner = owner.into();
        pool.spec.github.scope = scope;
        pool.spec.github.repositories = repositories.iter().map(|r| r.to_string()).collect();
        pool
    }

    #[test]
    fn without_tenants_every_namespace_serves_every_owner() {
        let open = Tenancy::default();
        assert!(open.permits("any", "anyone", "anything"));
        assert_eq!(
            open.refusal(&pool("any", "anyone", GitHubScope::Org, &[])),
            None
        );
    }

    #[test]
    fn each_namespace_serves_only_its_owners_and_repositories() {
        let t = tenancy();
        for (ns, owner, repo, permitted) in [
            ("team-a", "acme", "api", true),
            ("team-a", "ACME", "web", true),
            ("team-a", "other", "api", false),
            ("team-b", "acme", "web", true),
            ("team-b", "acme", "api", false),
            ("team-c", "acme", "api", false),
        ] {
            assert_eq!(t.permits(ns, owner, repo), permitted, "{ns} {owner}/{repo}");
        }
    }

    #[test]
    fn a_pool_beyond_its_namespace_is_refused_naming_the_field() {
        let t = tenancy();
        let org = GitHubScope::Org;
        for (pool, field) in [
            (pool("team-a", "acme", org, &[]), None),
            (pool("team-a", "other", org, &[]), Some("spec.github.owner")),
            (pool("team-c", "acme", org, &[]), Some("spec.github.owner")),
            (pool("team-b", "acme", org, &["web"]), None),
            (
                pool("team-b", "acme", org, &[]),
                Some("spec.github.repositories"),
            ),
            (
                pool("team-b", "acme", GitHubScope::Repo, &["api"]),
                Some("spec.github.repositories"),
            ),
        ] {
            let refusal = t.refusal(&pool);
            assert_eq!(
                refusal.as_deref().map(|r| r.split(':').next().unwrap()),
                field,
                "{refusal:?}"
            );
        }
    }
}
