//! The GitHub sweep: what webhooks missed, caught from GitHub's side every few minutes.
//! Failed webhook deliveries of the last hour are redelivered; queued jobs of the App's
//! repositories that a pool serves and no RunnerJob records are recorded; waiting RunnerJobs
//! whose job GitHub no longer lists as queued are asked about (and end if it is taken or
//! cancelled); runners Pacer named that no live RunnerJob claims for their attempt and that
//! are not busy are removed from GitHub. One repository's or target's error skips it alone.
//!
//! A pass stops reading repositories once it has spent [`MAX_REQUESTS`] GitHub requests, and
//! leaves alone an installation whose hourly budget is low ([`Quota::low`]): what is left
//! there is for the runner configs booting instances wait on. Repositories it did not reach
//! are the first of the next pass.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use super::demand::{self, Queued, Recorded};
use super::{Context, Result};
use crate::api::{GitHubScope, RunnerJob, RunnerPool};
use crate::domain::job::doubted_by_listing;
use crate::domain::matching::in_scope;
use crate::github::{GitHub, QueuedJob, Quota, RunnerTarget, job_id_of_runner};

/// Most queued jobs recorded in one pass, and most redeliveries asked for: a backlog is worked
/// off over several passes rather than in one burst against GitHub's rate limits.
const MAX_RECORDED: usize = 100;
const MAX_REDELIVERED: usize = 50;
/// Most waiting RunnerJobs sent to ask GitHub about their job in one pass (a request each).
const MAX_DOUBTED: usize = 100;
/// GitHub requests one pass may send, retries included. Twelve passes an hour at most spend
/// 3,600 of them, spread over every installation; the smallest installation budget is 5,000.
pub const MAX_REQUESTS: u64 = 300;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub redelivered: usize,
    pub recorded: usize,
    pub runners_removed: usize,
    /// Repositories or targets skipped for a GitHub error.
    pub errors: usize,
    /// Waiting RunnerJobs whose job GitHub's listing no longer shows as queued: each asks
    /// GitHub about it on its next pass.
    pub doubted: usize,
    /// Repositories left for the next pass: the pass's budget was spent, or their
    /// installation's hourly budget is low.
    pub deferred: usize,
}

/// The part of the cluster the sweep compares GitHub with.
#[derive(Clone)]
pub struct Scope {
    pub pools: Api<RunnerPool>,
    pub jobs: Api<RunnerJob>,
    /// Where the next pass starts among the repositories.
    next: Arc<AtomicUsize>,
}

impl Scope {
    pub fn new(pools: Api<RunnerPool>, jobs: Api<RunnerJob>) -> Self {
        Self {
            pools,
            jobs,
            next: Arc::default(),
        }
    }
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
                doubted = s.doubted,
                deferred = s.deferred,
                "GitHub sweep caught up"
            ),
            Err(e) => warn!(error = %e, "GitHub sweep failed; trying again next round"),
        }
    }
}

/// One pass.
pub async fn sweep(ctx: &Context, github: &dyn GitHub, scope: &Scope) -> Result<Swept> {
    let mut pass = Pass {
        ctx,
        github,
        first_request: github.requests_sent(),
        swept: Swept::default(),
    };
    pass.redeliver().await?;
    let pools = scope.pools.list(&ListParams::default()).await?.items;
    let pools: Vec<&RunnerPool> = pools
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let jobs = list_jobs(&scope.jobs).await?;
    let recorded: HashMap<i64, &RunnerJob> = jobs.iter().map(|j| (j.spec.job_id, j)).collect();
    pass.catch_up(scope, &pools, &recorded).await?;
    pass.remove_runners(scope, &pools, &recorded).await?;
    Ok(pass.swept)
}

/// Every RunnerJob, from the API server a page at a time, each page slimmed as the watch
/// cache's copies are before the next is read. Listed whole and kept as parsed, 10,000
/// RunnerJobs would take well over 100 MB for the pass, their managed fields most of it.
async fn list_jobs(api: &Api<RunnerJob>) -> Result<Vec<RunnerJob>> {
    let mut all = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        all.extend(page.items.into_iter().map(|mut job| {
            super::job::slim(&mut job);
            job
        }));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(all),
        }
    }
}

/// One pass under way.
struct Pass<'a> {
    ctx: &'a Context,
    github: &'a dyn GitHub,
    /// `requests_sent` when the pass began.
    first_request: u64,
    swept: Swept,
}

impl Pass<'_> {
    fn budget_spent(&self) -> bool {
        self.github
            .requests_sent()
            .saturating_sub(self.first_request)
            >= MAX_REQUESTS
    }

    /// Asks GitHub to redeliver the last hour's failed deliveries.
    async fn redeliver(&mut self) -> Result<()> {
        let since = Timestamp::now() - SignedDuration::from_hours(1);
        let failed = self.github.failed_deliveries(since).await?;
        for delivery in failed.into_iter().take(MAX_REDELIVERED) {
            self.github.redeliver(delivery.id).await?;
            self.swept.redelivered += 1;
        }
        Ok(())
    }

    /// Reads the queued jobs of each repository a pool serves, from where the last pass
    /// stopped: records those no RunnerJob records and doubts the waiting RunnerJobs whose job
    /// is not among them.
    async fn catch_up(
        &mut self,
        scope: &Scope,
        pools: &[&RunnerPool],
        recorded: &HashMap<i64, &RunnerJob>,
    ) -> Result<()> {
        let repositories = self.served_repositories(pools).await?;
        // The budget counts from here: listing what to read is not reading it, and every pass
        // reads at least one repository, whatever else the process sent meanwhile.
        self.first_request = self.github.requests_sent();
        let count = repositories.len();
        let start = scope.next.load(Ordering::Relaxed) % count.max(1);
        for (done, repository) in repositories
            .iter()
            .cycle()
            .skip(start)
            .take(count)
            .enumerate()
        {
            if done > 0 && (self.budget_spent() || self.swept.recorded >= MAX_RECORDED) {
                // A repository cut short by the recording cap is read again first.
                let resume = if self.swept.recorded >= MAX_RECORDED {
                    done - 1
                } else {
                    done
                };
                scope
                    .next
                    .store((start + resume) % count, Ordering::Relaxed);
                self.swept.deferred += count - done;
                return Ok(());
            }
            self.read_repository(pools, recorded, repository).await?;
        }
        scope.next.store(start, Ordering::Relaxed);
        Ok(())
    }

    /// The repositories the App is installed on that some pool serves.
    async fn served_repositories(&self, pools: &[&RunnerPool]) -> Result<Vec<String>> {
        Ok((self.github.installation_repositories().await?)
            .into_iter()
            .filter(|r| {
                let (owner, name) = r.split_once('/').unwrap_or((r, ""));
                pools.iter().any(|p| in_scope(p, owner, name))
            })
            .collect())
    }

    /// Reads one repository's queued jobs, unless its rate limit runs low: records and doubts
    /// as `catch_up` says.
    async fn read_repository(
        &mut self,
        pools: &[&RunnerPool],
        recorded: &HashMap<i64, &RunnerJob>,
        repository: &str,
    ) -> Result<()> {
        if self
            .github
            .quota(repository)
            .is_some_and(|q: Quota| q.low())
        {
            self.swept.deferred += 1;
            return Ok(());
        }
        let (owner, name) = repository.split_once('/').unwrap_or_default();
        let listed_at = Timestamp::now();
        match self.github.queued_jobs(owner, name).await {
            Ok(queued) => {
                self.record(pools, recorded, repository, &queued).await?;
                self.doubt(recorded, repository, &queued, listed_at);
            }
            // One repository's trouble skips it alone this pass.
            Err(e) => {
                warn!(repository, error = %e, "could not list a repository's queued jobs; skipping it");
                self.swept.errors += 1;
            }
        }
        Ok(())
    }

    /// Records the queued jobs no RunnerJob records.
    async fn record(
        &mut self,
        pools: &[&RunnerPool],
        recorded: &HashMap<i64, &RunnerJob>,
        repository: &str,
        queued: &[QueuedJob],
    ) -> Result<()> {
        for job in queued.iter().filter(|j| !recorded.contains_key(&j.id)) {
            let queued = Queued {
                job_id: job.id,
                run_id: job.run_id,
                repository,
                labels: &job.labels,
                installation_id: None,
            };
            let tenancy = &self.ctx.settings.tenancy;
            if demand::record(&self.ctx.client, pools, tenancy, &queued).await? == Recorded::Created
            {
                self.swept.recorded += 1;
                if self.swept.recorded >= MAX_RECORDED {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Marks the waiting RunnerJobs of `repository` whose job GitHub's listing, read at
    /// `listed_at`, did not show as queued; only those that were waiting a recheck interval
    /// before it, so a job queued while the listing was read is not doubted.
    fn doubt(
        &mut self,
        recorded: &HashMap<i64, &RunnerJob>,
        repository: &str,
        queued: &[QueuedJob],
        listed_at: Timestamp,
    ) {
        let queued: HashSet<i64> = queued.iter().map(|j| j.id).collect();
        let recheck = self.ctx.settings.job_limits.queue_recheck;
        let waiting = (recorded.values())
            .filter(|j| doubted_by_listing(j, repository, &queued, listed_at, recheck));
        // Only jobs the controller still has: one released since the listing is not doubted.
        let store = self.ctx.jobs.store();
        let known =
            |job: &RunnerJob| store.is_some_and(|s| s.get(&ObjectRef::from_obj(job)).is_some());
        for job in waiting.filter(|j| known(j)) {
            if self.swept.doubted >= MAX_DOUBTED {
                return;
            }
            self.ctx.jobs.doubt(&job.uid().unwrap_or_default());
            self.swept.doubted += 1;
        }
    }

    /// Removes from GitHub the runners Pacer named that no live RunnerJob claims and that
    /// are not busy. The runners are listed first and the RunnerJobs read again after: a
    /// runner is registered only once its job's claim is written (the bootstrap's status write
    /// comes before the JIT config is minted), so a job listed after its runner shows the
    /// claim, while `recorded`, listed before the pass read GitHub, may predate the job.
    async fn remove_runners(
        &mut self,
        scope: &Scope,
        pools: &[&RunnerPool],
        recorded: &HashMap<i64, &RunnerJob>,
    ) -> Result<()> {
        let controller = &self.ctx.settings.controller_id;
        let claims = |jobs: &HashMap<i64, &RunnerJob>, job_id: i64, attempt: u32| {
            (jobs.get(&job_id)).is_some_and(|j| crate::domain::gc::claims_runner(j, attempt))
        };
        let mut unclaimed = Vec::new();
        for target in targets(pools) {
            let runners = match self.github.list_runners(&target).await {
                Ok(runners) => runners,
                Err(e) => {
                    warn!(owner = %target.owner, error = %e, "could not list runners; skipping them this pass");
                    self.swept.errors += 1;
                    continue;
                }
            };
            for runner in runners {
                let Some((job_id, attempt)) = job_id_of_runner(controller, &runner.name) else {
                    continue;
                };
                // A busy runner is running someone's job: never removed, whoever claims it.
                if !runner.busy && !claims(recorded, job_id, attempt) {
                    unclaimed.push((target.clone(), runner, job_id, attempt));
                }
            }
        }
        if unclaimed.is_empty() {
            return Ok(());
        }
        let jobs = list_jobs(&scope.jobs).await?;
        let now: HashMap<i64, &RunnerJob> = jobs.iter().map(|j| (j.spec.job_id, j)).collect();
        for (target, runner, job_id, attempt) in unclaimed {
            if claims(&now, job_id, attempt) {
                continue;
            }
            if let Err(e) = self.github.delete_runner(&target, runner.id).await {
                warn!(runner = %runner.name, error = %e, "could not remove a runner; next pass");
                self.swept.errors += 1;
                continue;
            }
            info!(runner = %runner.name, status = %runner.status, "removed a runner of Pacer's that no live RunnerJob claims");
            self.swept.runners_removed += 1;
        }
        Ok(())
    }
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
