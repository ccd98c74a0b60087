//! Prometheus metrics: what the controllers did and how long it took. Served as text on
//! `server.metrics_listen` at `/metrics`.

use std::sync::atomic::AtomicU64;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cloud::{
    CloudResult, Ec2, Image, Instance, InstanceTypeInfo, LaunchOutcome, LaunchRequest,
    LaunchTemplate, LaunchTemplateData, Pages, SecurityGroup, Subnet,
};

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

/// Every metric Pacer exports.
pub struct Metrics {
    registry: Registry,
    pub jobs: Family<PoolPhase, Gauge>,
    pub launch_latency: Histogram,
    pub queue_duration: PerPool,
    pub boot_duration: PerPool,
    pub run_duration: PerPool,
    pub terminate_duration: PerPool,
    pub ec2_calls: Family<Call, Counter>,
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
        let mut registry = Registry::with_prefix("pacer");
        let jobs = Family::<PoolPhase, Gauge>::default();
        let launch_latency = seconds_histogram();
        let per_pool = || PerPool::new_with_constructor(seconds_histogram);
        let queue_duration = per_pool();
        let boot_duration = per_pool();
        let run_duration = per_pool();
        let terminate_duration = per_pool();
        let ec2_calls = Family::<Call, Counter>::default();
        let capacity_errors = Family::<Offering, Counter>::default();
        let gc_terminated = Counter::default();
        let gc_templates_deleted = Counter::default();
        let job_cost = Family::<Pool, Counter<f64, AtomicU64>>::default();
        let requeues = Family::<Pool, Counter>::default();
        let interruptions = Family::<Notice, Counter>::default();
        let webhook_deliveries = Family::<Delivery, Counter>::default();
        let github_calls = Family::<Call, Counter>::default();
        registry.register("runner_jobs", "RunnerJobs by pool and phase", jobs.clone());
        registry.register(
            "launch_latency_seconds",
            "From RunnerJob creation to the launch call's return",
            launch_latency.clone(),
        );
        registry.register(
            "queue_duration_seconds",
            "From the webhook (RunnerJob created) to the launch call, per pool",
            queue_duration.clone(),
        );
        registry.register(
            "boot_duration_seconds",
            "From the instance launched to its runner registered, per pool",
            boot_duration.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "From the runner registered to the job over, per pool",
            run_duration.clone(),
        );
        registry.register(
            "terminate_duration_seconds",
            "From the job over to its instance gone and its runner removed, per pool",
            terminate_duration.clone(),
        );
        registry.register(
            "ec2_calls",
            "AWS calls by action and outcome (ok or the error class)",
            ec2_calls.clone(),
        );
        registry.register(
            "capacity_errors",
            "Insufficient-capacity answers by instance type and zone",
            capacity_errors.clone(),
        );
        registry.register(
            "gc_terminated_instances",
            "Instances the garbage collector terminated",
            gc_terminated.clone(),
        );
        registry.register(
            "gc_deleted_launch_templates",
            "Launch templates the garbage collector deleted",
            gc_templates_deleted.clone(),
        );
        registry.register(
            "job_cost_usd",
            "Estimated cost of finished jobs",
            job_cost.clone(),
        );
        registry.register(
            "job_requeues",
            "Instances replaced because they ended before their runner took the job, per pool",
            requeues.clone(),
        );
        registry.register(
            "interruption_notices",
            "Spot interruption notices and rebalance recommendations instances reported, per \
             pool, zone and kind",
            interruptions.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "GitHub webhook deliveries by event, action and result",
            webhook_deliveries.clone(),
        );
        registry.register(
            "github_calls",
            "GitHub API calls by action and outcome (ok, not_found, conflict, rate_limited, \
             server_error, client_error, transport_error; retries counted as they happen)",
            github_calls.clone(),
        );
        Self {
            registry,
            jobs,
            launch_latency,
            queue_duration,
            boot_duration,
            run_duration,
            terminate_duration,
            ec2_calls,
            capacity_errors,
            gc_terminated,
            gc_templates_deleted,
            job_cost,
            requeues,
            interruptions,
            webhook_deliveries,
            github_calls,
        }
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

    fn call<T>(&self, action: &str, result: &CloudResult<T>) {
        let outcome = match result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{:?}", e.class),
        };
        self.ec2_calls
            .get_or_create(&Call {
                action: action.into(),
                outcome,
            })
            .inc();
    }
}

/// The EC2 boundary with every call counted by action and outcome.
pub struct Metered<'m, E: ?Sized> {
    pub inner: &'m E,
    pub metrics: &'m Metrics,
}

macro_rules! metered {
    ($self:ident, $action:literal, $call:expr) => {{
        let metrics = $self.metrics;
        $call
            .map(move |result| {
                metrics.call($action, &result);
                result
            })
            .boxed()
    }};
}

impl<E: Ec2 + ?Sized> Ec2 for Metered<'_, E> {
    fn describe_images<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<Vec<Image>>> {
        metered!(self, "DescribeImages", self.inner.describe_images(ids))
    }
    fn describe_subnets<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<Subnet>>> {
        metered!(self, "DescribeSubnets", self.inner.describe_subnets(ids))
    }
    fn describe_security_groups<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<SecurityGroup>>> {
        metered!(
            self,
            "DescribeSecurityGroups",
            self.inner.describe_security_groups(ids)
        )
    }
    fn describe_instance_types<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, CloudResult<Vec<InstanceTypeInfo>>> {
        metered!(
            self,
            "DescribeInstanceTypes",
            self.inner.describe_instance_types(names)
        )
    }
    fn instance_profile_roles<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<Vec<String>>>> {
        metered!(
            self,
            "GetInstanceProfile",
            self.inner.instance_profile_roles(name)
        )
    }
    fn find_launch_template<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<LaunchTemplate>>> {
        metered!(
            self,
            "DescribeLaunchTemplates",
            self.inner.find_launch_template(name)
        )
    }
    fn describe_managed_launch_templates<'a>(
        &'a self,
        controller_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Vec<LaunchTemplate>>> {
        metered!(
            self,
            "DescribeLaunchTemplates",
            self.inner.describe_managed_launch_templates(controller_id)
        )
    }
    fn default_version_description<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        metered!(
            self,
            "DescribeLaunchTemplateVersions",
            self.inner.default_version_description(id)
        )
    }
    fn create_launch_template<'a>(
        &'a self,
        name: &'a str,
        description: &'a str,
        data: &'a LaunchTemplateData,
        tags: &'a std::collections::BTreeMap<String, String>,
    ) -> BoxFuture<'a, CloudResult<LaunchTemplate>> {
        metered!(
            self,
            "CreateLaunchTemplate",
            self.inner
                .create_launch_template(name, description, data, tags)
        )
    }
    fn create_launch_template_version<'a>(
        &'a self,
        id: &'a str,
        description: &'a str,
        data: &'a LaunchTemplateData,
    ) -> BoxFuture<'a, CloudResult<i64>> {
        metered!(
            self,
            "CreateLaunchTemplateVersion",
            self.inner
                .create_launch_template_version(id, description, data)
        )
    }
    fn set_default_launch_template_version<'a>(
        &'a self,
        id: &'a str,
        version: i64,
    ) -> BoxFuture<'a, CloudResult<()>> {
        metered!(
            self,
            "ModifyLaunchTemplate",
            self.inner.set_default_launch_template_version(id, version)
        )
    }
    fn delete_launch_template_versions<'a>(
        &'a self,
        id: &'a str,
        versions: &'a [i64],
    ) -> BoxFuture<'a, CloudResult<()>> {
        metered!(
            self,
            "DeleteLaunchTemplateVersions",
            self.inner.delete_launch_template_versions(id, versions)
        )
    }
    fn delete_launch_template<'a>(&'a self, id: &'a str) -> BoxFuture<'a, CloudResult<()>> {
        metered!(
            self,
            "DeleteLaunchTemplate",
            self.inner.delete_launch_template(id)
        )
    }
    fn dry_run_launch<'a>(&'a self, request: &'a LaunchRequest) -> BoxFuture<'a, CloudResult<()>> {
        metered!(self, "DryRunLaunch", self.inner.dry_run_launch(request))
    }
    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, CloudResult<LaunchOutcome>> {
        metered!(self, "Launch", self.inner.launch(request))
    }
    fn managed_instance_pages<'a>(&'a self, controller_id: &'a str) -> Pages<'a, Instance> {
        // Each page is a call of its own.
        let metrics = self.metrics;
        self.inner
            .managed_instance_pages(controller_id)
            .map(move |page| {
                metrics.call("DescribeInstances", &page);
                page
            })
            .boxed()
    }
    fn managed_instance<'a>(
        &'a self,
        controller_id: &'a str,
        instance_id: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<(Instance, String)>>> {
        metered!(
            self,
            "DescribeInstances",
            self.inner.managed_instance(controller_id, instance_id)
        )
    }
    fn on_demand_price<'a>(
        &'a self,
        instance_type: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        metered!(
            self,
            "GetProducts",
            self.inner.on_demand_price(instance_type)
        )
    }
    fn spot_price<'a>(
        &'a self,
        instance_type: &'a str,
        zone: &'a str,
    ) -> BoxFuture<'a, CloudResult<Option<String>>> {
        metered!(
            self,
            "DescribeSpotPriceHistory",
            self.inner.spot_price(instance_type, zone)
        )
    }
    fn terminate_instances<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, CloudResult<()>> {
        metered!(
            self,
            "TerminateInstances",
            self.inner.terminate_instances(ids)
        )
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
    use crate::cloud::fake::FakeEc2;

    #[tokio::test]
    async fn calls_are_counted_by_action_and_outcome_and_exported() {
        let metrics = Metrics::default();
        let fake = FakeEc2::new().with_subnet("subnet-1", "vpc-1", "us-east-1a");
        let ec2 = Metered {
            inner: &fake,
            metrics: &metrics,
        };
        ec2.describe_subnets(&["subnet-1".to_string()])
            .await
            .unwrap();
        fake.fail_next("DescribeSubnets", "RequestLimitExceeded", 1);
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
        let text = metrics.encode();
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
            text.contains("pacer_launch_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"pacer_runner_jobs{namespace="ci",pool="linux",phase="Running"} 3"#),
            "{text}"
        );
    }
}
