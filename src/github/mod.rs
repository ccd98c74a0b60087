//! GitHub: webhook signatures and payloads, the names Pacer gives runners, and the App client
//! behind the [`GitHub`] boundary.

pub mod client;
pub mod webhook;

use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::config::Secret;

/// Where a pool's runners register: an organization, or one repository.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunnerTarget {
    pub owner: String,
    /// `None` for organization runners.
    pub repo: Option<String>,
    /// The organization runner group, by name; `None` is the default group.
    pub runner_group: Option<String>,
    /// The installation, when a webhook said; else looked up from the owner or repository.
    pub installation: Option<i64>,
}

/// A just-in-time runner configuration: the runner's id and the encoded config the runner
/// binary takes with `--jitconfig`. A secret.
#[derive(Clone, Debug)]
pub struct JitConfig {
    pub runner_id: i64,
    pub encoded: Secret,
}

/// The runner architecture of an EC2 identity document's `architecture`: `x64` or `arm64`.
pub fn runner_arch(ec2_architecture: &str) -> Option<&'static str> {
    match ec2_architecture {
        "x86_64" => Some("x64"),
        "arm64" => Some("arm64"),
        _ => None,
    }
}

/// The Linux tarball of actions/runner `version` for `arch`, as the project names its assets.
pub fn runner_asset_name(version: &str, arch: &str) -> String {
    format!("actions-runner-linux-{arch}-{version}.tar.gz")
}

/// A self-hosted runner as GitHub lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Runner {
    pub id: i64,
    pub name: String,
    /// `online` or `offline`.
    pub status: String,
    #[serde(default)]
    pub busy: bool,
}

/// A workflow job as GitHub reports it by id: its status (`queued`, `in_progress`,
/// `completed`, ...), and the runner that took it, once one did.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct WorkflowJob {
    pub id: i64,
    pub status: String,
    #[serde(default)]
    pub conclusion: Option<String>,
    #[serde(default)]
    pub runner_id: Option<i64>,
    #[serde(default)]
    pub runner_name: Option<String>,
    #[serde(default)]
    pub run_id: i64,
    /// Which attempt of its workflow run the job belongs to (1, then 2 after a re-run, ...).
    #[serde(default)]
    pub run_attempt: Option<u32>,
}

/// A workflow run, as `GET /repos/{owner}/{repo}/actions/runs/{id}` answers it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct WorkflowRun {
    pub id: i64,
    pub status: String,
    #[serde(default)]
    pub run_attempt: Option<u32>,
}

/// A webhook delivery of the App, as `GET /app/hook/deliveries` lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub guid: String,
    pub delivered_at: String,
    pub status_code: u16,
    pub event: String,
    #[serde(default)]
    pub action: Option<String>,
}

/// A queued workflow job, as a run's jobs list it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct QueuedJob {
    pub id: i64,
    pub run_id: i64,
    pub status: String,
    #[serde(default)]
    pub labels: Vec<String>,
}

/// Why a GitHub call failed.
#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    #[error("GitHub {action} answered {status}: {message}")]
    Status {
        action: &'static str,
        status: u16,
        message: String,
    },
    #[error("GitHub is unreachable: {0}")]
    Transport(String),
    #[error("GitHub has no such {0}")]
    NotFound(&'static str),
    #[error("GitHub's answer to {0} is not what its documentation says")]
    Malformed(&'static str),
}

pub type GitHubResult<T> = Result<T, GitHubError>;

/// What GitHub's last answer for an installation said of its hourly request budget
/// (`x-ratelimit-limit`, `x-ratelimit-remaining`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
}

impl Quota {
    /// Whether less than a quarter of the budget is left: what is left is kept for the calls
    /// a booting instance waits on (runner configs) and for removing runners.
    pub fn low(&self) -> bool {
        self.remaining.saturating_mul(4) < self.limit
    }
}

/// The GitHub calls Pacer makes, and nothing else.
pub trait GitHub: Send + Sync {
    /// A JIT config for a runner named `name` with `labels`; a stale runner of that name is
    /// deleted and the call made once more.
    fn jit_config<'a>(
        &'a self,
        target: &'a RunnerTarget,
        name: &'a str,
        labels: &'a [String],
    ) -> BoxFuture<'a, GitHubResult<JitConfig>>;
    /// Removes a runner; one already gone is fine.
    fn delete_runner<'a>(
        &'a self,
        target: &'a RunnerTarget,
        runner_id: i64,
    ) -> BoxFuture<'a, GitHubResult<()>>;
    fn list_runners<'a>(
        &'a self,
        target: &'a RunnerTarget,
    ) -> BoxFuture<'a, GitHubResult<Vec<Runner>>>;
    /// One runner by id; `None` when GitHub has no such runner (any more).
    fn runner<'a>(
        &'a self,
        target: &'a RunnerTarget,
        runner_id: i64,
    ) -> BoxFuture<'a, GitHubResult<Option<Runner>>>;
    /// A workflow job of `repository` (`owner/name`) by id; `None` when GitHub has none.
    fn workflow_job<'a>(
        &'a self,
        repository: &'a str,
        installation: Option<i64>,
        job_id: i64,
    ) -> BoxFuture<'a, GitHubResult<Option<WorkflowJob>>>;
    /// A workflow run of `repository` (`owner/name`) by id; `None` when GitHub has none.
    fn workflow_run<'a>(
        &'a self,
        repository: &'a str,
        installation: Option<i64>,
        run_id: i64,
    ) -> BoxFuture<'a, GitHubResult<Option<WorkflowRun>>>;
    /// Asks GitHub to re-run a workflow job of `repository` (`owner/name`): a new attempt of
    /// its run is made, where the job is queued again as a new job. GitHub answers 403 until
    /// the run completed. Sent at most once (see `AT_MOST_ONCE`).
    fn rerun_job<'a>(
        &'a self,
        repository: &'a str,
        installation: Option<i64>,
        job_id: i64,
    ) -> BoxFuture<'a, GitHubResult<()>>;
    /// The App's webhook deliveries since `since` that failed and were not redelivered since.
    fn failed_deliveries<'a>(
        &'a self,
        since: Timestamp,
    ) -> BoxFuture<'a, GitHubResult<Vec<Delivery>>>;
    fn redeliver<'a>(&'a self, delivery_id: i64) -> BoxFuture<'a, GitHubResult<()>>;
    /// Every repository (`owner/name`) the App is installed on.
    fn installation_repositories<'a>(&'a self) -> BoxFuture<'a, GitHubResult<Vec<String>>>;
    /// The queued jobs of a repository's queued workflow runs.
    fn queued_jobs<'a>(
        &'a self,
        owner: &'a str,
        repo: &'a str,
    ) -> BoxFuture<'a, GitHubResult<Vec<QueuedJob>>>;
    /// Requests sent so far, retries included: what a caller's budget counts.
    fn requests_sent(&self) -> u64 {
        0
    }
    /// The hourly budget of the installation serving `repository` (`owner/name`), as GitHub's
    /// last answer for it said; `None` before any answer.
    fn quota(&self, _repository: &str) -> Option<Quota> {
        None
    }
}

/// The name Pacer gives the RunnerJob recorded for a GitHub workflow job: derived from the job
/// id alone, so a redelivered or duplicated webhook finds the first one.
pub fn job_object_name(job_id: i64) -> String {
    format!("gh-job-{job_id}")
}

/// Longest `controller.id`: with it, every runner name fits GitHub's 64 characters whole.
pub const MAX_CONTROLLER_ID: usize = 32;

/// The name of the GitHub runner Pacer registers for attempt `attempt` of a RunnerJob:
/// `pacer-<controller id>-<job id>-<attempt>`. The controller id keeps two installations on one
/// organization apart; the job id and the attempt are always whole (at most 6 + 32 + 1 + 19 +
/// 1 + 2 = 61 characters), so no two jobs or attempts share a name.
pub fn runner_name(controller_id: &str, job_id: i64, attempt: u32) -> String {
    format!("pacer-{controller_id}-{job_id}-{attempt}")
}

/// The workflow job id and attempt a runner named by [`runner_name`] was registered for;
/// `None` for runners Pacer did not name (GitHub-hosted, other installations, people's own).
/// Names from before attempts were counted (`pacer-<id>-<job id>`) read as attempt 1.
pub fn job_id_of_runner(controller_id: &str, runner: &str) -> Option<(i64, u32)> {
    let rest = runner.strip_prefix("pacer-")?.strip_prefix(controller_id)?;
    let rest = rest.strip_prefix('-')?;
    let number = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
            .filter(|n| *n > 0)
    };
    match rest.split_once('-') {
        Some((job, attempt)) => Some((number(job)?, u32::try_from(number(attempt)?).ok()?)),
        None => Some((number(rest)?, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_names_lead_back_to_their_job_and_nothing_else_does() {
        let name = runner_name("prod-eu", 289782451, 2);
        assert_eq!(name, "pacer-prod-eu-289782451-2");
        assert_eq!(job_id_of_runner("prod-eu", &name), Some((289782451, 2)));
        assert_eq!(job_id_of_runner("prod", &name), None);
        assert_eq!(job_id_of_runner("prod-eu", "GitHub Actions 5"), None);
        assert_eq!(job_id_of_runner("prod-eu", "pacer-prod-eu-x"), None);
        assert_eq!(job_id_of_runner("prod-eu", "pacer-prod-eu-5-x"), None);
        assert_eq!(job_id_of_runner("prod-eu", "pacer-prod-eu-5-+1"), None);
        assert_eq!(job_id_of_runner("prod-eu", "pacer-prod-eu-7"), Some((7, 1)));
        assert_eq!(job_object_name(289782451), "gh-job-289782451");
    }

    #[test]
    fn the_longest_ids_keep_every_name_whole_and_distinct() {
        let id = "a".repeat(MAX_CONTROLLER_ID);
        let (a, b) = (
            runner_name(&id, i64::MAX, 10),
            runner_name(&id, i64::MAX - 1, 10),
        );
        assert!(a.len() <= 64 && b.len() <= 64, "{a}");
        assert_ne!(a, b);
        assert_eq!(job_id_of_runner(&id, &a), Some((i64::MAX, 10)));
    }
}
