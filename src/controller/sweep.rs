//! The GitHub sweep: what webhooks missed, caught from GitHub's side every few minutes.
//! Failed webhook deliveries of the last hour are redelivered; queued jobs of the App's
//! repositories that a pool serves and no RunnerJob records are recorded; runners Pacer named
//! that no live RunnerJob claims for their attempt and that are not busy are removed from
//! GitHub. One repository's or target's error skips it alone.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams};
use tracing::{info, warn};

use super::demand::{self, Queued, Recorded};
use super::{Context, Result};
use crate::api::{GitHubScope, RunnerJob, RunnerPool};
use crate::domain::matching::in_scope;
use crate::github::{GitHub, RunnerTarget, job_id_of_runner};

/// Most queued jobs recorded in one pass, and most redeliveries asked for: a backlog is worked
/// off over several passes rather than in one burst against GitHub's rate limits.
const MAX_RECORDED: usize = 100;
const MAX_REDELIVERED: usize = 50;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub redelivered: usize,
    pub recorded: usize,
    pub runners_removed: usize,
    /// Repositories or targets skipped for a GitHub error.
    pub errors: usize,
}

/// The part of the cluster the sweep compares GitHub with.
#[derive(Clone)]
pub struct Scope {
    pub pools: Api<RunnerPool>,
    pub jobs: Api<RunnerJob>,
}

/// Sweeps every `interval` until the task is dropped.
pub async fn run(ctx: Arc<Context>, github: Arc<dyn GitHub>, scope: Scope, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sweep(&ctx, github.as_ref(), &scope).await {
            Ok(s) if s == Swept::default() => {}
            Ok(s) => info!(
                redelivered = s.redelivered,
                recorded = s.recorded,
                runners_removed = s.runners_removed,
                "GitHub sweep caught up"
            ),
            Err(e) => warn!(error = %e, "GitHub sweep failed; trying again next round"),
        }
    }
}

/// One pass.
pub async fn sweep(ctx: &Context, github: &dyn GitHub, scope: &Scope) -> Result<Swept> {
    let mut swept = Swept::default();
    let since = Timestamp::now() - SignedDuration::from_hours(1);
    for delivery in github
        .failed_deliveries(since)
        .await?
        .into_iter()
        .take(MAX_REDELIVERED)
    {
        github.redeliver(delivery.id).await?;
        swept.redelivered += 1;
    }

    let pools = scope.pools.list(&ListParams::default()).await?.items;
    let pools: Vec<&RunnerPool> = pools
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let jobs = scope.jobs.list(&ListParams::default()).await?.items;
    let recorded: HashMap<i64, &RunnerJob> = jobs.iter().map(|j| (j.spec.job_id, j)).collect();

    'repos: for repository in github.installation_repositories().await? {
        let Some((owner, name)) = repository.split_once('/') else {
            continue;
        };
        if !pools.iter().any(|p| in_scope(p, owner, name)) {
            continue;
        }
        let queued = match github.queued_jobs(owner, name).await {
            Ok(queued) => queued,
            // One repository's trouble skips it alone this pass.
            Err(e) => {
                warn!(repository, error = %e, "could not list a repository's queued jobs; skipping it");
                swept.errors += 1;
                continue;
            }
        };
        for job in queued {
            if recorded.contains_key(&job.id) {
                continue;
            }
            let queued = Queued {
                job_id: job.id,
                run_id: job.run_id,
                repository: &repository,
                labels: &job.labels,
                installation_id: None,
            };
            if demand::record(&ctx.client, &pools, &ctx.settings.tenancy, &queued).await?
                == Recorded::Created
            {
                swept.recorded += 1;
                if swept.recorded >= MAX_RECORDED {
                    break 'repos;
                }
            }
        }
    }

    let controller = &ctx.settings.controller_id;
    for target in targets(&pools) {
        let runners = match github.list_runners(&target).await {
            Ok(runners) => runners,
            Err(e) => {
                warn!(owner = %target.owner, error = %e, "could not list runners; skipping them this pass");
                swept.errors += 1;
                continue;
            }
        };
        for runner in runners {
            let Some((job_id, attempt)) = job_id_of_runner(controller, &runner.name) else {
                continue;
            };
            let claimed = recorded
                .get(&job_id)
                .is_some_and(|j| crate::domain::gc::claims_runner(j, attempt));
            // A busy runner is running someone's job: never removed, whoever claims it.
            if claimed || runner.busy {
                continue;
            }
            if let Err(e) = github.delete_runner(&target, runner.id).await {
                warn!(runner = %runner.name, error = %e, "could not remove a runner; next pass");
                swept.errors += 1;
                continue;
            }
            info!(runner = %runner.name, status = %runner.status, "removed a runner of Pacer's that no live RunnerJob claims");
            swept.runners_removed += 1;
        }
    }
    Ok(swept)
}

/// Where the pools' runners register, each once: organizations, and each repository of
/// repository pools.
fn targets(pools: &[&RunnerPool]) -> Vec<RunnerTarget> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for pool in pools {
        let github = &pool.spec.github;
        let repos: Vec<Option<String>> = match github.scope {
            GitHubScope::Org => vec![None],
            GitHubScope::Repo => github.repositories.iter().cloned().map(Some).collect(),
        };
        for repo in repos {
            if seen.insert((github.owner.to_lowercase(), repo.clone())) {
                out.push(RunnerTarget {
                    owner: github.owner.clone(),
                    repo,
                    runner_group: github.runner_group.clone(),
                    installation: None,
                });
            }
        }
    }
    out
}
