//! Prometheus metrics: what the controllers did and how long it took. Served as text on
//! `server.metrics_listen` at `/metrics`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cloud::{CallObserver, ErrorClass};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolPhase {
    pub namespace: String,
    pub pool: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Pool {
    pub namespace: String,
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Action {
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Call {
    pub action: String,
    pub outcome: String,
}

/// One webhook delivery: GitHub's event and action (`-` when there is none, `other` for
/// actions Pacer does not know, so the label stays bounded) and what Pacer made of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Delivery {
    pub event: String,
    pub action: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Offering {
    pub instance_type: String,
    pub zone: String,
}

/// A notice EC2 gave an instance of a pool, in a zone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Notice {
    pub namespace: String,
    pub pool: String,
    pub zone: String,
    pub kind: String,
}

/// Histograms of one pool's jobs.
pub type PerPool = Family<Pool, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 50 ms to ~3.4 h.
    Histogram::new(exponential_buckets(0.05, 2.0, 18))
}

fn call_histogram() -> Histogram {
    // 5 ms to ~82 s: a call's SDK retries included.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Every metric Pacer exports.
pub struct Metrics {
    registry: Registry,
    pub jobs: Family<PoolPhase, Gauge>,
    /// Warm instances by pool and state (`ready`, `preparing`, `stopping`).
    pub warm: Family<PoolPhase, Gauge>,
    pub launch_latency: Histogram,
    pub queue_duration: PerPool,
    pub boot_duration: PerPool,
    /// Boots of warm instances, from their start: beside `boot_duration`'s launched ones.
    pub warm_boot_duration: PerPool,
    pub warm_starts: Family<Pool, Counter>,
    pub warm_storage_cost: Family<Pool, Counter<f64, AtomicU64>>,
    pub run_duration: PerPool,
    pub terminate_duration: PerPool,
    pub ec2_calls: Family<Call, Counter>,
    pub ec2_call_duration: Family<Action, Histogram, fn() -> Histogram>,
    pub capacity_errors: Family<Offering, Counter>,
    pub gc_terminated: Counter,
    pub gc_templates_deleted: Counter,
    pub job_cost: Family<Pool, Counter<f64, AtomicU64>>,
    pub requeues: Family<Pool, Counter>,
    pub interruptions: Family<Notice, Counter>,
    pub webhook_deliveries: Family<Delivery, Counter>,
    pub github_calls: Family<Call, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let per_pool = || PerPool::new_with_constructor(seconds_histogram);
        let mut metrics = Self {
            registry: Registry::with_prefix("pacer"),
            jobs: Family::default(),
            warm: Family::default(),
            launch_latency: seconds_histogram(),
            queue_duration: per_pool(),
            boot_duration: per_pool(),
            warm_boot_duration: per_pool(),
            warm_starts: Family::default(),
            warm_storage_cost: Family::default(),
            run_duration: per_pool(),
            terminate_duration: per_pool(),
            ec2_calls: Family::default(),
            ec2_call_duration: Family::new_with_constructor(call_histogram),
            capacity_errors: Family::default(),
            gc_terminated: Counter::default(),
            gc_templates_deleted: Counter::default(),
            job_cost: Family::default(),
            requeues: Family::default(),
            interruptions: Family::default(),
            webhook_deliveries: Family::default(),
            github_calls: Family::default(),
        };
        metrics.register_jobs();
        metrics.register_calls();
        metrics
    }
}

impl Metrics {
    /// What happened to the jobs, per pool.
    fn register_jobs(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "runner_jobs",
            "RunnerJobs by pool and phase",
            self.jobs.clone(),
        );
        registry.register(
            "warm_instances",
            "Warm instances by pool and state (ready, preparing, stopping)",
            self.warm.clone(),
        );
        registry.register(
            "launch_latency_seconds",
            "From RunnerJob creation to the launch call's return",
            self.launch_latency.clone(),
        );
        registry.register(
            "queue_duration_seconds",
            "From the webhook (RunnerJob created) to the launch call, per pool",
            self.queue_duration.clone(),
        );
        registry.register(
            "boot_duration_seconds",
            "From the instance launched to its runner registered, per pool (launched instances only)",
            self.boot_duration.clone(),
        );
        registry.register(
            "warm_boot_duration_seconds",
            "From a warm instance started for a job to its runner registered, per pool",
            self.warm_boot_duration.clone(),
        );
        registry.register(
            "warm_storage_cost_usd",
            "Estimated cost of the root volumes of stopped warm instances, per pool",
            self.warm_storage_cost.clone(),
        );
        registry.register(
            "warm_starts",
            "Warm instances started for jobs instead of launches, per pool",
            self.warm_starts.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "From the runner registered to the job over, per pool",
            self.run_duration.clone(),
        );
        registry.register(
            "terminate_duration_seconds",
            "From the job over to its instance gone and its runner removed, per pool",
            self.terminate_duration.clone(),
        );
        registry.register(
            "job_cost_usd",
            "Estimated cost of finished jobs",
            self.job_cost.clone(),
        );
        registry.register(
            "job_requeues",
            "Instances replaced because they ended before their runner took the job, per pool",
            self.requeues.clone(),
        );
        registry.register(
            "interruption_notices",
            "Spot interruption notices and rebalance recommendations instances reported, per \
             pool, zone and kind",
            self.interruptions.clone(),
        );
    }

    /// What Pacer asked of AWS and GitHub, what GitHub sent, and what the collector removed.
    fn register_calls(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "ec2_calls",
            "AWS calls by action and outcome (ok or the error class)",
            self.ec2_calls.clone(),
        );
        registry.register(
            "ec2_call_duration_seconds",
            "How long AWS calls took, by action, retries included",
            self.ec2_call_duration.clone(),
        );
        registry.register(
            "capacity_errors",
            "Insufficient-capacity answers by instance type and zone",
            self.capacity_errors.clone(),
        );
        registry.register(
            "gc_terminated_instances",
            "Instances the garbage collector terminated",
            self.gc_terminated.clone(),
        );
        registry.register(
            "gc_deleted_launch_templates",
            "Launch templates the garbage collector deleted",
            self.gc_templates_deleted.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "GitHub webhook deliveries by event, action and result",
            self.webhook_deliveries.clone(),
        );
        registry.register(
            "github_calls",
            "GitHub API calls by action and outcome (ok, not_found, conflict, rate_limited, \
             server_error, client_error, transport_error; retries counted as they happen)",
            self.github_calls.clone(),
        );
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The cloud adapters tell the metrics of each call they make.
impl CallObserver for Metrics {
    fn called(&self, action: &'static str, outcome: Result<(), ErrorClass>, took: Duration) {
        let outcome = match outcome {
            Ok(()) => "ok".to_string(),
            Err(class) => format!("{class:?}"),
        };
        self.ec2_calls
            .get_or_create(&Call {
                action: action.into(),
                outcome,
            })
            .inc();
        self.ec2_call_duration
            .get_or_create(&Action {
                action: action.into(),
            })
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_is_documented_and_every_documented_metric_exists() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        // Read from this file rather than from an exposition, which leaves out families that
        // have no sample yet.
        let register = regex_lite::Regex::new(r#"registry\.register\(\s*"([a-z0-9_]+)""#).unwrap();
        let registered: Vec<String> = register
            .captures_iter(include_str!("metrics.rs"))
            .map(|c| format!("pacer_{}", &c[1]))
            .collect();
        assert!(registered.len() >= 11, "{registered:?}");
        for name in &registered {
            assert!(
                doc.contains(&format!("`{name}`")) || doc.contains(&format!("`{name}_total`")),
                "{name} is registered but not in {}",
                path.display()
            );
        }
        let documented = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next());
        for name in documented {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(
                registered.iter().any(|r| r == family),
                "{name} is in {} but not registered",
                path.display()
            );
        }
    }

    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("charts/pacer/dashboards/pacer.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        // The sample names each metric exposes, from docs/metrics.md (which the test above
        // keeps equal to what is registered): families without samples are not in an
        // exposition.
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"),
        )
        .unwrap();
        let mut names = std::collections::BTreeSet::new();
        for row in doc.lines().filter_map(|l| l.strip_prefix("| `")) {
            let mut cells = row.split('|');
            let name = cells.next().unwrap().trim().trim_end_matches('`');
            let suffixes: &[&str] = match cells.next().unwrap().trim() {
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        let metric = regex_lite::Regex::new(r"pacer_[a-z0-9_]+").unwrap();
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(panels.len() >= 8);
        for panel in panels {
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{}", panel["title"]);
            for target in targets {
                let expr = target["expr"].as_str().unwrap();
                let used: Vec<&str> = metric.find_iter(expr).map(|m| m.as_str()).collect();
                assert!(!used.is_empty(), "{expr}");
                for name in used {
                    assert!(
                        names.contains(name),
                        "{}: {name} is not a metric Pacer exports ({names:?})",
                        panel["title"]
                    );
                }
            }
        }
    }

    use super::*;
    use crate::cloud::Ec2 as _;
    use crate::cloud::fake::FakeEc2;

    #[tokio::test]
    async fn calls_are_counted_by_action_and_outcome_and_exported() {
        let metrics = std::sync::Arc::new(Metrics::default());
        let ec2 = FakeEc2::new()
            .with_subnet("subnet-1", "vpc-1", "us-east-1a")
            .observed_by(metrics.clone());
        ec2.describe_subnets(&["subnet-1".to_string()])
            .await
            .unwrap();
        ec2.fail_next("DescribeSubnets", "RequestLimitExceeded", 1);
        ec2.describe_subnets(&["subnet-1".to_string()])
            .await
            .unwrap_err();
        metrics.launch_latency.observe(0.4);
        metrics
            .jobs
            .get_or_create(&PoolPhase {
                namespace: "ci".into(),
                pool: "linux".into(),
                phase: "Running".into(),
            })
            .set(3);
        metrics
            .warm
            .get_or_create(&PoolPhase {
                namespace: "ci".into(),
                pool: "linux".into(),
                phase: "ready".into(),
            })
            .set(2);
        let text = metrics.encode();
        assert!(
            text.contains(r#"pacer_warm_instances{namespace="ci",pool="linux",phase="ready"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pacer_ec2_calls_total{action="DescribeSubnets",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"pacer_ec2_calls_total{action="DescribeSubnets",outcome="Throttled"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"pacer_ec2_call_duration_seconds_count{action="DescribeSubnets"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("pacer_launch_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"pacer_runner_jobs{namespace="ci",pool="linux",phase="Running"} 3"#),
            "{text}"
        );
    }
}
