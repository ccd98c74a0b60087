//! Reconcilers and what they share: the context, the error type and its retry policy, status
//! conditions and Events.

mod batch;
pub mod conditions;
pub mod demand;
pub mod gc;
pub mod job;
pub mod lanes;
pub mod leader;
mod ledger;
mod listed;
pub mod metrics;
pub mod pool;
mod prefetch;
pub mod sweep;
pub(crate) mod warm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use tracing::warn;

use crate::api::{RunnerJob, RunnerPool};

use crate::cloud::{CloudError, Ec2, ErrorClass};

/// The field manager of every status Pacer writes.
pub const FIELD_MANAGER: &str = "pacer";

/// The JSON merge patch (RFC 7386) that turns `before` into `after`, or `None` when they are
/// equal. Objects are compared key by key; a key gone from `after` becomes `null`.
pub(crate) fn merge_patch(
    before: &serde_json::Value,
    after: &serde_json::Value,
) -> Option<serde_json::Value> {
    use serde_json::{Map, Value};
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let mut patch = Map::new();
            for (key, new) in a {
                let change = match b.get(key) {
                    Some(old) => merge_patch(old, new),
                    None => Some(new.clone()),
                };
                if let Some(change) = change {
                    patch.insert(key.clone(), change);
                }
            }
            for key in b.keys().filter(|k| !a.contains_key(*k)) {
                patch.insert(key.clone(), Value::Null);
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        _ if before == after => None,
        _ => Some(after.clone()),
    }
}

/// Requests to the API server in flight at once. Each holds an HTTP/1.1 connection with its TLS
/// state and buffers, so a burst of passes would otherwise open hundreds; beyond this they
/// wait in the client's queue. Watches hold a place only until their response starts.
pub const API_CONCURRENCY: usize = 32;

/// The Kubernetes client the controllers use: kube's default stack from `config`, with at
/// most [`API_CONCURRENCY`] requests in flight, a launch's records first (see [`lanes`]).
pub fn kube_client(config: kube::Config) -> kube::Result<kube::Client> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&lanes::LanesLayer::new(API_CONCURRENCY))
        .build())
}

/// Runs the RunnerPool and RunnerJob controllers until shutdown. Both read one RunnerJob
/// watch: the job controller reconciles from it and wakes jobs waiting for room when one
/// finishes, the pool controller recounts its runners.
pub async fn run(ctx: Arc<Context>, pools: Api<RunnerPool>, jobs: Api<RunnerJob>) {
    // Room for a burst of changes before the watch waits for the slower subscriber.
    let (store, writer) = reflector::store_shared(1024);
    let for_jobs = writer.subscribe().expect("a shared store has subscribers");
    let for_pools = writer.subscribe().expect("a shared store has subscribers");
    let for_waiting_jobs = writer.subscribe().expect("a shared store has subscribers");
    let _ = ctx.jobs.store.set(store.clone());
    // The first list comes a page of 500 at a time with no resourceVersion: a consistent list,
    // which the API server serves from its watch cache. (kube's watcher drops `any_semantic`'s
    // resourceVersion 0 from a paged list, so asking for it changes no request.) Each page is
    // asked for while the one before is parsed, and what no pass reads of each job's metadata
    // is skipped as it is parsed.
    let client = prefetch::client(jobs.clone().into_client());
    let listed = match jobs.namespace() {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let events = watcher::<listed::Listed>(listed, watcher::Config::default())
        .map_ok(listed::into_job)
        .default_backoff()
        // Thousands of RunnerJobs are cached: only what passes read is kept.
        .modify(job::slim)
        .reflect_shared(writer)
        .for_each(|event| {
            if let Err(e) = event {
                warn!(error = %e, "watching RunnerJobs failed; retrying");
            }
            std::future::ready(())
        });
    let synced = {
        let store = store.clone();
        async move {
            if store.wait_until_ready().await.is_ok() {
                tracing::info!(jobs = store.len(), "RunnerJob cache synced");
            }
            std::future::pending::<()>().await
        }
    };
    let controllers = futures::future::join(
        pool::run(ctx.clone(), pools, for_pools),
        job::run(ctx, store, for_jobs, for_waiting_jobs),
    );
    tokio::select! {
        () = events => {}
        _ = controllers => {}
        () = synced => {}
    }
}

/// What reconcilers need, wired once by the app.
pub struct Context {
    pub client: kube::Client,
    /// The EC2 boundary; reach it through [`Context::ec2`], which counts every call.
    ec2: Arc<dyn Ec2>,
    /// Shared by every leadership term of this process, and by the HTTP side.
    pub metrics: Arc<metrics::Metrics>,
    /// Publishes the RunnerPools' Events, folding a repeat into a series; see [`Context::event`].
    recorder: Recorder,
    reporter: Reporter,
    pub settings: Settings,
    /// Consecutive failed passes per object, to tell a blip from a persistent problem.
    failures: Mutex<HashMap<String, u32>>,
    /// State the RunnerJob reconciler shares across jobs.
    pub jobs: job::Shared,
    /// The GitHub App, when configured: runners are removed through it.
    pub github: Option<Arc<dyn crate::github::GitHub>>,
    /// Shared by the terms of one process: a new term does not redo checks whose inputs
    /// have not changed.
    pool_checks: Arc<Mutex<PoolChecks>>,
}

/// When each pool (`namespace/name`) was last fully checked against EC2, at which generation.
type PoolChecks = HashMap<String, (Option<i64>, std::time::Instant)>;

/// Settings from the configuration that reconcilers use.
#[derive(Clone, Debug)]
pub struct Settings {
    pub controller_id: String,
    pub public_url: String,
    /// PEM the instances trust for `public_url` (`runners.ca_file`), if not the AMI's roots.
    pub runner_ca: Option<String>,
    /// How often a healthy object is looked at again, since its inputs can change under us.
    pub resync: Duration,
    /// The unit of retry backoff: 5 s in production, shorter in tests.
    pub backoff_unit: Duration,
    /// How old the shared DescribeInstances snapshot may be before a pass refreshes it.
    pub instance_refresh: Duration,
    /// Timeouts of a job's phases.
    pub job_limits: crate::domain::job::Limits,
    /// How often the garbage collector runs, and how old an unclaimed instance must be.
    pub gc_interval: Duration,
    pub gc_grace: Duration,
    /// Launch attempts before a job fails with `InsufficientCapacity`.
    pub max_launch_attempts: i32,
    /// RunnerJob passes running at once. Each holds at most one API server request, so this
    /// also bounds the connections (and their buffers) to the API server; a burst beyond it
    /// queues.
    pub job_concurrency: u16,
    /// Jobs of one pool that become launchable within this window are launched by one call
    /// (zero: each by its own), at most `launch_batch_max` at once.
    pub launch_batch_window: Duration,
    pub launch_batch_max: u32,
    /// Which owners and repositories each namespace's pools may serve (`tenants`).
    pub tenancy: crate::domain::tenancy::Tenancy,
}

impl Settings {
    pub fn new(controller_id: &str, public_url: &str) -> Self {
        Self {
            controller_id: controller_id.into(),
            public_url: public_url.into(),
            runner_ca: None,
            resync: Duration::from_secs(300),
            backoff_unit: Duration::from_secs(5),
            instance_refresh: Duration::from_secs(10),
            job_limits: Default::default(),
            gc_interval: Duration::from_secs(60),
            gc_grace: Duration::from_secs(120),
            max_launch_attempts: crate::domain::launch::MAX_ATTEMPTS,
            job_concurrency: 512,
            launch_batch_window: Duration::from_millis(100),
            launch_batch_max: 50,
            tenancy: Default::default(),
        }
    }
}

impl Context {
    pub fn new(client: kube::Client, ec2: Arc<dyn Ec2>, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: "pacer".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            ec2,
            settings,
            failures: Mutex::default(),
            jobs: job::Shared::default(),
            metrics: Arc::default(),
            pool_checks: Arc::default(),
            github: None,
        }
    }

    /// The same context, counting into `metrics` (shared with another context).
    pub fn with_metrics(mut self, metrics: Arc<metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// A context for a new leadership term of this process: it shares `previous`'s metrics,
    /// GitHub App and record of pool checks; caches, reservations and the ledger start afresh.
    pub fn next_term(&self) -> Self {
        let mut next = Self::new(self.client.clone(), self.ec2.clone(), self.settings.clone())
            .with_metrics(self.metrics.clone());
        next.github = self.github.clone();
        next.pool_checks = self.pool_checks.clone();
        next
    }

    /// The same context, talking to GitHub through `github`.
    pub fn with_github(mut self, github: Arc<dyn crate::github::GitHub>) -> Self {
        self.github = Some(github);
        self
    }

    /// Makes the pool's next pass check EC2 in full, as if its spec had changed.
    pub(crate) fn forget_pool_check(&self, pool_key: &str) {
        self.pool_checks.lock().unwrap().remove(pool_key);
    }

    /// The EC2 boundary. The adapter counts its own calls, into the metrics it was built
    /// `observed_by`.
    pub fn ec2(&self) -> &dyn Ec2 {
        self.ec2.as_ref()
    }

    /// Publishes an Event about `obj`; a failure to publish is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        // kube's recorder keeps every Event it published for six minutes, to fold a repeat
        // into a series, in a map that never shrinks. A RunnerJob's Events (one per phase
        // change) do not repeat, and a burst of thousands of jobs would leave that map sized
        // for tens of thousands of Events: theirs go out through a recorder of their own,
        // without the cache.
        let fresh;
        let recorder = if K::kind(&()) == RunnerJob::kind(&()) {
            fresh = Recorder::new(self.client.clone(), self.reporter.clone());
            &fresh
        } else {
            &self.recorder
        };
        if let Err(err) = recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "could not publish event");
        }
    }

    /// Counts a failed pass; returns how many in a row.
    fn failed(&self, key: &str) -> u32 {
        let mut failures = self.failures.lock().unwrap();
        let n = failures.entry(key.to_string()).or_default();
        *n += 1;
        *n
    }

    fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap().remove(key);
    }
}

/// Why a reconcile pass did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("AWS: {0}")]
    Cloud(#[from] CloudError),

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("{0}")]
    GitHub(#[from] crate::github::GitHubError),

    #[error(
        "launch template {0} exists but is not tagged as this controller's; rename or delete it"
    )]
    TemplateNotOurs(String),
}

impl Error {
    /// Unwraps what kube's finalizer helper reports: our own error, or the API call that failed.
    pub fn from_finalizer(err: kube::runtime::finalizer::Error<Error>) -> Self {
        use kube::runtime::finalizer::Error as F;
        match err {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(e) | F::RemoveFinalizer(e) => Error::Kube(e),
            other => Error::Kube(kube::Error::Service(other.to_string().into())),
        }
    }

    /// A static category for metrics, logs and Event reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Cloud(e) if e.is(ErrorClass::Throttled) => "AwsThrottled",
            Error::Cloud(e) if e.is(ErrorClass::Unauthorized) => "AwsUnauthorized",
            Error::Cloud(_) => "AwsError",
            Error::Kube(_) => "KubernetesError",
            Error::GitHub(_) => "GitHubError",
            Error::TemplateNotOurs(_) => "LaunchTemplateNameTaken",
        }
    }

    /// The API server refused a write made on an older version of the object: someone else
    /// wrote it meanwhile. Not a failure: the pass runs again on the newer object.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(e)) if e.code == 409)
    }

    /// How long to wait before attempt `attempt + 1`, in units of backoff: doubling from a
    /// base that is longer for throttling, capped at 60 units (5 minutes in production).
    pub fn retry_after(&self, attempt: u32, unit: Duration) -> Duration {
        let base: u32 = match self {
            Error::Cloud(e) if e.is(ErrorClass::Throttled) => 6,
            Error::TemplateNotOurs(_) => 60,
            _ => 1,
        };
        unit * (base << attempt.clamp(1, 6).saturating_sub(1)).min(60)
    }
}

/// Passes in a row that must fail before a Warning Event: one blip is not news.
const FAILURES_BEFORE_WARNING: u32 = 3;
/// Passes in a row whose write was refused because the job changed meanwhile, before they
/// count as failures: one is ordinary (a callback wrote), many mean something keeps writing.
const CONFLICTS_BEFORE_WARNING: u32 = 8;

/// The retry policy every controller shares: back off per object, and say so in an Event
/// once a problem persists.
pub fn error_policy<K>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let attempt = ctx.failed(&key);
    if err.is_conflict() && attempt < CONFLICTS_BEFORE_WARNING {
        // The watch brings the newer object (and a pass of its own) within moments; a job
        // written over and over waits longer each time, and is reported past a few.
        tracing::debug!(object = %key, attempt, "written meanwhile; looking again");
        return Action::requeue(Duration::from_millis(200) * 2u32.pow(attempt.min(6) - 1));
    }
    let wait = err.retry_after(attempt, ctx.settings.backoff_unit);
    tracing::warn!(object = %key, reason = err.reason(), attempt, error = %err, "reconcile failed");
    if attempt == FAILURES_BEFORE_WARNING || attempt == CONFLICTS_BEFORE_WARNING {
        let note = err.to_string();
        let reason = err.reason();
        tokio::spawn(async move { ctx.event(&*obj, EventType::Warning, reason, note).await });
    }
    Action::requeue(wait)
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod event_reasons {
    /// Every reason the code puts on an Event, a condition or `lastError`, read from the
    /// source, is in docs/operations.md.
    #[test]
    fn every_reason_is_documented() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
        let sources = [
            include_str!("mod.rs"),
            include_str!("job.rs"),
            include_str!("pool.rs"),
            include_str!("warm.rs"),
            include_str!("../domain/warm.rs"),
            include_str!("../domain/job.rs"),
            include_str!("../domain/pool.rs"),
            include_str!("../http/runner.rs"),
        ];
        let patterns = [
            // Events published directly, and the phase Events.
            r#"EventType::\w+,\s*"([A-Z][A-Za-z]+)""#,
            r#"notice\(\s*(?:true|false),\s*"([A-Z][A-Za-z]+)""#,
            // Pool conditions (an Event when they change) and validation verdicts.
            r#"condition\(\s*[A-Z_]+,\s*(?:true|false),\s*"([A-Z][A-Za-z]+)""#,
            r#"invalid\(\s*"([A-Z][A-Za-z]+)""#,
            r#"reason:\s*"([A-Z][A-Za-z]+)""#,
            // Job decisions and errors.
            r#"because\(\s*[\w.]+,\s*Step::\w+(?:\([^)]*\)|\s*\{[^}]*\})?,\s*"([A-Z][A-Za-z]+)""#,
            r#"=> "([A-Z][A-Za-z]+)",\n"#,
        ];
        let mut found = std::collections::BTreeSet::new();
        for pattern in patterns {
            let re = regex_lite::Regex::new(pattern).unwrap();
            for source in sources {
                for c in re.captures_iter(source) {
                    found.insert(c[1].to_string());
                }
            }
        }
        assert!(found.len() > 30, "{found:?}");
        // Never published: a test helper's name for a valid verdict, and a pass that waits
        // on EC2 (logged, not an error).
        let unpublished = ["Valid"];
        let missing: Vec<_> = found
            .iter()
            .filter(|r| !unpublished.contains(&r.as_str()))
            .filter(|r| !doc.contains(&format!("`{r}`")))
            .collect();
        assert!(missing.is_empty(), "not in docs/operations.md: {missing:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_backs_off_longer_and_everything_is_capped_at_five_minutes() {
        let unit = Duration::from_secs(5);
        let throttled = Error::Cloud(CloudError::new(
            "DescribeSubnets",
            "RequestLimitExceeded",
            "slow down",
        ));
        let other = Error::Cloud(CloudError::new("DescribeSubnets", "Weird", "?"));
        assert_eq!(throttled.retry_after(1, unit), Duration::from_secs(30));
        assert_eq!(throttled.retry_after(2, unit), Duration::from_secs(60));
        assert_eq!(other.retry_after(1, unit), Duration::from_secs(5));
        assert_eq!(other.retry_after(3, unit), Duration::from_secs(20));
        assert_eq!(throttled.retry_after(40, unit), Duration::from_secs(300));
    }

    #[test]
    fn a_merge_patch_holds_only_what_changed() {
        use serde_json::json;
        let before = json!({
            "phase": "Pending",
            "attempts": 1,
            "lastError": {"reason": "InsufficientCapacity", "message": "m7i.large"},
            "completion": {"result": "success"},
            "conditions": [{"type": "A"}]
        });
        let after = json!({
            "phase": "Launching",
            "attempts": 1,
            "instance": {"id": "i-1", "zone": "us-east-1a"},
            "completion": {"result": "success"},
            "conditions": [{"type": "A"}, {"type": "B"}]
        });
        assert_eq!(
            merge_patch(&before, &after),
            Some(json!({
                "phase": "Launching",
                "instance": {"id": "i-1", "zone": "us-east-1a"},
                "lastError": null,
                "conditions": [{"type": "A"}, {"type": "B"}]
            }))
        );
        assert_eq!(merge_patch(&after, &after), None);
        let nested = merge_patch(
            &json!({"cost": {"currency": "USD", "hourlyPrice": "0.1"}}),
            &json!({"cost": {"currency": "USD", "hourlyPrice": "0.1", "estimatedCost": "0.02"}}),
        );
        assert_eq!(nested, Some(json!({"cost": {"estimatedCost": "0.02"}})));
    }
}
