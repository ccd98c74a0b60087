//! The RunnerJob reconciler and the garbage collector against a real kube-apiserver and moto
//! behind the AWS proxy.

mod support;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use pacer::api::{JobPhase, RunnerJob, RunnerJobSpec, RunnerPool};
use pacer::cloud::aws::AwsEc2;
use pacer::cloud::{Ec2, Instance};
use pacer::controller::{self, Context, Settings};
use serde_json::{Value, json};
use support::{Ground, Parts, ground};

struct World {
    ground: &'static Ground,
    ns: String,
    controller_id: String,
    client: kube::Client,
    pools: Api<RunnerPool>,
    jobs: Api<RunnerJob>,
    /// The controller's EC2 client.
    ec2: AwsEc2,
    /// The test's own: what it launches as fixtures is not Pacer's call (the proxy tells them
    /// apart by the User-Agent, for the IAM simulation).
    fixtures: AwsEc2,
}

impl World {
    async fn new(test: &str) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pacer=info")
            .with_test_writer()
            .try_init();
        let ground = ground(Parts::Both);
        let client = ground.kube_client().await;
        let ns = ground.namespace(&client, test).await;
        let ec2 = AwsEc2::new(&ground.aws_config().await);
        let fixtures = AwsEc2::new(
            &ground
                .aws_config()
                .await
                .to_builder()
                .app_name(aws_config::AppName::new("pacer-tests").unwrap())
                .build(),
        );
        Self {
            ground,
            controller_id: format!("jobs-{test}"),
            pools: Api::namespaced(client.clone(), &ns),
            jobs: Api::namespaced(client.clone(), &ns),
            ns,
            client,
            ec2,
            fixtures,
        }
    }

    fn context(&self) -> Arc<Context> {
        self.context_with(|_| {})
    }

    fn context_with(&self, change: impl FnOnce(&mut Settings)) -> Arc<Context> {
        let mut settings = Settings {
            resync: Duration::from_secs(2),
            backoff_unit: Duration::from_millis(200),
            instance_refresh: Duration::from_millis(500),
            gc_grace: Duration::ZERO,
            max_launch_attempts: 3,
            ..Settings::new(&self.controller_id, "https://pacer.example.test")
        };
        change(&mut settings);
        // As `pacer run` does: the adapter counts its calls into the context's metrics.
        let metrics = Arc::new(pacer::controller::metrics::Metrics::default());
        let ec2 = self.ec2.clone().observed_by(metrics.clone());
        Arc::new(Context::new(self.client.clone(), Arc::new(ec2), settings).with_metrics(metrics))
    }

    /// A context whose GitHub App is `fake`.
    fn context_with_github(&self, fake: &support::github::FakeGitHub) -> Arc<Context> {
        self.context_rechecking(fake, Settings::new("", "").job_limits.queue_recheck)
    }

    /// A context whose GitHub App is `fake`, where a job that waited `queue_recheck` asks
    /// GitHub before its launch.
    fn context_rechecking(
        &self,
        fake: &support::github::FakeGitHub,
        queue_recheck: Duration,
    ) -> Arc<Context> {
        let mut settings = Settings {
            backoff_unit: Duration::from_millis(200),
            instance_refresh: Duration::from_millis(500),
            ..Settings::new(&self.controller_id, "https://pacer.example.test")
        };
        settings.job_limits.queue_recheck = queue_recheck;
        let ctx = Context::new(self.client.clone(), Arc::new(self.ec2.clone()), settings)
            .with_github(Arc::new(fake.client()));
        Arc::new(ctx)
    }

    /// Patches the job's status as a callback or a test would.
    async fn patch_job_status(&self, name: &str, status: Value) {
        let patch = json!({ "status": status });
        self.jobs
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Records runner `id` for the job's current attempt, as the bootstrap and register
    /// callbacks do, and puts it on the fake GitHub.
    async fn register_runner(
        &self,
        fake: &support::github::FakeGitHub,
        name: &str,
        job_id: i64,
    ) -> (i64, String) {
        let runner = pacer::github::runner_name(&self.controller_id, job_id, 1);
        let id = fake.add_runner("orgs/example-org", &runner, "online");
        self.patch_job_status(name, json!({"runner": {"id": id, "name": runner}}))
            .await;
        self.wait_phase(name, JobPhase::Running).await;
        (id, runner)
    }

    /// Makes the job look as if it had been in its phase `minutes` longer.
    async fn age_phase(&self, name: &str, phase: &str, minutes: i64) {
        let then = k8s_openapi::jiff::Timestamp::now()
            - k8s_openapi::jiff::SignedDuration::from_mins(minutes);
        self.patch_job_status(name, json!({"phaseTimes": {phase: then.to_string()}}))
            .await;
    }

    /// Terminates an instance behind Pacer's back.
    async fn terminate_behind_our_back(&self, id: &str) {
        self.fixtures
            .terminate_instances(&[id.to_string()])
            .await
            .unwrap();
    }

    /// A fake GitHub with the App installed on example-org/api, and both controllers started
    /// with it; dropping the handle stops them.
    async fn start_with_github(
        &self,
    ) -> (support::github::FakeGitHub, tokio::task::JoinHandle<()>) {
        let fake = support::github::FakeGitHub::start().await;
        fake.install(1, &["example-org/api"]);
        let controllers = self.start(self.context_with_github(&fake));
        (fake, controllers)
    }

    /// Starts both controllers on `ctx`; dropping the handle stops them.
    fn start(&self, ctx: Arc<Context>) -> tokio::task::JoinHandle<()> {
        let (pools, jobs) = (self.pools.clone(), self.jobs.clone());
        tokio::spawn(async move {
            controller::run(ctx, pools, jobs).await;
        })
    }

    async fn ready_pool(&self, change: impl FnOnce(&mut Value)) {
        let mut pool = self.ground.example_pool(&self.ns, "linux");
        change(&mut pool);
        let pool: RunnerPool = serde_json::from_value(pool).unwrap();
        self.pools
            .create(&PostParams::default(), &pool)
            .await
            .unwrap();
        self.wait(|| async {
            let p = self.pools.get("linux").await.unwrap();
            p.status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .await;
    }

    /// Launches an instance without any tag, as someone else would; returns its id.
    async fn launch_untagged(&self) -> String {
        aws_sdk_ec2::Client::new(&self.ground.aws_config().await)
            .run_instances()
            .image_id(self.ground.fixture("AMI_X86_64"))
            .min_count(1)
            .max_count(1)
            .send()
            .await
            .unwrap()
            .instances()[0]
            .instance_id()
            .unwrap()
            .to_string()
    }

    /// The launch template pool `linux` holds now.
    async fn template(&self) -> pacer::api::LaunchTemplateRef {
        let pool = self.pools.get("linux").await.unwrap();
        pool.status.unwrap().launch_template.unwrap()
    }

    /// Creates a RunnerJob as `kubectl` would, without the finalizer.
    async fn create_job(&self, name: &str, job_id: i64) -> RunnerJob {
        let mut job = RunnerJob::for_queued_job(&self.ns, name, Self::spec(job_id));
        job.metadata.finalizers = None;
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .unwrap()
    }

    /// Creates a RunnerJob as Pacer records one for a queued job: finalizer on from birth.
    async fn create_queued_job(&self, name: &str, job_id: i64) -> RunnerJob {
        let job = RunnerJob::for_queued_job(&self.ns, name, Self::spec(job_id));
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .unwrap()
    }

    fn spec(job_id: i64) -> RunnerJobSpec {
        RunnerJobSpec {
            pool_name: "linux".into(),
            job_id,
            run_id: 7,
            repository: "example-org/api".into(),
            labels: vec!["self-hosted".into(), "linux".into()],
            installation_id: Some(1),
        }
    }

    async fn phase(&self, name: &str) -> Option<JobPhase> {
        self.jobs
            .get_opt(name)
            .await
            .unwrap()
            .map(|j| j.status.unwrap_or_default().phase)
    }

    async fn wait_phase(&self, name: &str, phase: JobPhase) -> RunnerJob {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
        loop {
            let job = self.jobs.get(name).await.unwrap();
            if job.status.as_ref().map(|s| s.phase) == Some(phase) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never reached {phase:?}: {:?}",
                job.status
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait<F: std::future::Future<Output = bool>>(&self, mut check: impl FnMut() -> F) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Instances in moto tagged with this RunnerJob's uid.
    async fn instances_of(&self, uid: &str) -> Vec<Instance> {
        let all = self
            .ec2
            .describe_managed_instances(&self.controller_id)
            .await
            .unwrap();
        all.into_iter()
            .filter(|i| i.tags.get("gha:runner_job_uid").map(String::as_str) == Some(uid))
            .collect()
    }

    async fn alive_of(&self, uid: &str) -> Vec<Instance> {
        self.instances_of(uid)
            .await
            .into_iter()
            .filter(|i| i.is_alive())
            .collect()
    }

    async fn report(&self, name: &str, result: &str) {
        let patch = json!({"status": {"completion": {"result": result}}});
        self.jobs
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_job_gets_exactly_one_tagged_instance_and_completion_terminates_it() {
    let w = World::new("one-instance").await;
    let ctx = w.context();
    let _controllers = w.start(ctx.clone());
    w.ready_pool(|_| {}).await;
    let job = w.create_job("job-1", 4242).await;
    let uid = job.metadata.uid.clone().unwrap();
    let job = w.wait_phase("job-1", JobPhase::Booting).await;
    assert!(
        job.metadata
            .finalizers
            .unwrap()
            .contains(&"pacer.dev/instance".to_string())
    );

    let alive = w.alive_of(&uid).await;
    assert_eq!(alive.len(), 1, "{alive:?}");
    let starting = || async {
        w.pools
            .get("linux")
            .await
            .unwrap()
            .status
            .unwrap()
            .runners
            .starting
    };
    w.wait(|| async { starting().await == 1 }).await;
    let tags = &alive[0].tags;
    assert_eq!(tags["gha:managed-by"], "pacer");
    assert_eq!(tags["gha:controller"], w.controller_id);
    assert_eq!(tags["gha:pool"], format!("{}/linux", w.ns));
    assert_eq!(tags["gha:runner_job"], format!("{}/job-1", w.ns));
    assert_eq!(tags["gha:job_id"], "4242");
    assert_eq!(tags["gha:repo"], "example-org/api");
    assert!(
        tags.keys().all(|k| k.starts_with("gha:")),
        "Pacer reads back only its own tags: {tags:?}"
    );
    // The pool's own tags reach the instance too.
    let described = aws_sdk_ec2::Client::new(&w.ground.aws_config().await)
        .describe_instances()
        .instance_ids(&alive[0].id)
        .send()
        .await
        .unwrap();
    let user_tags: Vec<(String, String)> = described.reservations()[0].instances()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().into(), t.value().unwrap().into()))
        .filter(|(k, _): &(String, String)| !k.starts_with("gha:"))
        .collect();
    assert!(
        user_tags.contains(&("team".to_string(), "platform".to_string())),
        "{user_tags:?}"
    );
    let status = job.status.unwrap();
    let instance = status.instance.unwrap();
    assert_eq!(instance.id, alive[0].id);
    assert_eq!((instance.market.as_str(), status.attempts), ("spot", 1));
    assert!(status.phase_times.launching.is_some() && status.phase_times.booting.is_some());

    let cost = status.cost.unwrap();
    assert_eq!(cost.currency, "USD");
    assert_eq!(
        cost.on_demand_hourly_price.as_deref(),
        Some("0.1008000000"),
        "the Pricing answer for m7i.large"
    );
    assert_eq!(
        cost.hourly_price.as_deref(),
        Some("0.00001"),
        "moto's spot price history"
    );

    w.report("job-1", "success").await;
    let done = w.wait_phase("job-1", JobPhase::Succeeded).await;
    assert!(done.status.unwrap().cost.unwrap().estimated_cost.is_some());
    w.wait(|| async { starting().await == 0 }).await;

    // The metrics listener, on a real socket.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, pacer::http::metrics_router(ctx)).into_future());
    let text = reqwest::get(format!("http://{address}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "pacer_launch_latency_seconds_count 1",
        r#"pacer_ec2_calls_total{action="CreateFleet",outcome="ok"} 1"#,
        r#"pacer_ec2_call_duration_seconds_count{action="CreateFleet"} 1"#,
        r#"pacer_runner_jobs{namespace=""#,
        "pacer_job_cost_usd_total{",
    ] {
        assert!(text.contains(expected), "{expected} not in:\n{text}");
    }
    // Subnets are looked up by the pool's checks alone (each with its security groups): the
    // launch took its subnets' zones from them. A check may be between the two calls as the
    // metrics are read, so they are read until the counts meet.
    let calls = |text: &str, action: &str| {
        let line = format!(r#"pacer_ec2_calls_total{{action="{action}",outcome="ok"}} "#);
        let count = text.lines().find_map(|l| l.strip_prefix(line.as_str()));
        count.map(|n| n.parse::<u64>().unwrap())
    };
    let metrics = format!("http://{address}/metrics");
    w.wait(|| async {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        let subnets = calls(&text, "DescribeSubnets");
        subnets.is_some() && subnets == calls(&text, "DescribeSecurityGroups")
    })
    .await;
    let describes = text
        .lines()
        .find(|l| {
            l.starts_with(r#"pacer_ec2_calls_total{action="DescribeInstances",outcome="ok"}"#)
        })
        .unwrap();
    eprintln!("{describes}");
    assert!(w.alive_of(&uid).await.is_empty());
    assert_eq!(
        w.instances_of(&uid).await.len(),
        1,
        "still exactly one instance, now terminated"
    );
}

#[tokio::test]
async fn deleting_a_running_job_terminates_its_instance_first() {
    let w = World::new("delete-job").await;
    let _controllers = w.start(w.context());
    w.ready_pool(|_| {}).await;
    let uid = w.create_job("job-1", 1).await.metadata.uid.unwrap();
    w.wait_phase("job-1", JobPhase::Booting).await;
    w.jobs
        .delete("job-1", &DeleteParams::default())
        .await
        .unwrap();
    w.wait(|| async { w.phase("job-1").await.is_none() }).await;
    assert!(
        w.alive_of(&uid).await.is_empty(),
        "the finalizer went only after the instance"
    );
}

#[tokio::test]
async fn a_launch_is_recorded_before_it_is_sent_and_replayed_under_its_token_after_a_crash() {
    let w = World::new("crash").await;
    let first = w.start(w.context());
    let proxy = w.ground.proxy();
    let prices = |a: &str, b: &str| json!({"m5.large": {"us-east-1a": a, "us-east-1b": b}});
    proxy.set_spot_prices(prices("0.041000", "0.029000")).await;
    w.ready_pool(|p| {
        p["spec"]["spawnMethod"] = json!("runInstances");
        p["spec"]["instanceTypes"] = json!(["m5.large"]);
        p["spec"]["capacity"] = json!({"type": "spot", "fallbackToOnDemand": false});
    })
    .await;
    // EC2 launches at once, but the answer is held back and the listing lags: the controller
    // dies before it hears of the instance. Only the launch recorded in the status says what
    // was asked.
    let ours = format!("{}/", w.ns);
    proxy.describe_lag(8.0, &ours).await;
    proxy
        .add_fault(
            json!({"action": "RunInstances", "code": "-", "delay_answer": 30,
            "match": {"Key": "gha:runner_job_uid", "Value": ours}}),
        )
        .await;
    let uid = w.create_job("job-1", 1).await.metadata.uid.unwrap();
    w.wait(|| async { w.phase("job-1").await == Some(JobPhase::Launching) })
        .await;
    // The held-back call reaches EC2 at once; give it a moment, then the controller dies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.abort();
    let recorded = w.jobs.get("job-1").await.unwrap().status.unwrap();
    assert!(recorded.instance.is_none(), "the answer never came");
    let intent = recorded
        .launch
        .expect("the launch is recorded before it is sent");
    assert_eq!(intent.offerings[0].subnet, w.ground.fixture("SUBNET_B"));

    // Spot prices moved meanwhile: a plan made afresh would pick the other zone, and so
    // another launch under another token.
    proxy.set_spot_prices(prices("0.021000", "0.049000")).await;
    let _second = w.start(w.context());
    let job = w.wait_phase("job-1", JobPhase::Booting).await;
    assert!(
        proxy.hidden_by_lag().await > 0,
        "the listing never hid the instance"
    );
    // The new controller sent the recorded launch again, and EC2 answered it with the first
    // launch's instance; every launch for the job went out under the recorded token.
    let launches: Vec<_> = (proxy.calls_of("RunInstances", &uid).await.into_iter())
        .filter(|c| c.params.get("DryRun").is_none())
        .collect();
    assert!(launches.iter().any(|c| c.replayed), "{launches:?}");
    for call in &launches {
        assert_eq!(
            call.params["ClientToken"].as_str(),
            Some(intent.client_token.as_str()),
            "{call:?}"
        );
    }
    // Once EC2's listing catches up: one instance, the one the replay answered with.
    w.wait(|| async { !w.instances_of(&uid).await.is_empty() })
        .await;
    let all = w.instances_of(&uid).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(job.status.unwrap().instance.unwrap().id, all[0].id);
}

#[tokio::test]
async fn capacity_errors_move_to_the_next_type_then_fall_back_then_give_up() {
    let w = World::new("capacity").await;
    let _controllers = w.start(w.context());
    w.ready_pool(|p| {
        p["spec"]["spawnMethod"] = json!("runInstances");
        p["spec"]["instanceTypes"] = json!(["m7i.large", "m6i.large"]);
    })
    .await;
    let proxy = w.ground.proxy();
    // Spot m7i.large is out for this namespace's jobs: the next type is used.
    proxy
        .add_fault(
            json!({"action": "RunInstances", "code": "InsufficientInstanceCapacity", "count": -1,
            "match": {"InstanceType": "m7i.large", "Value": format!("{}/", w.ns)}}),
        )
        .await;
    let uid = w.create_job("next-type", 1).await.metadata.uid.unwrap();
    let job = w.wait_phase("next-type", JobPhase::Booting).await;
    let instance = job.status.unwrap().instance.unwrap();
    assert_eq!(
        (instance.instance_type.as_str(), instance.market.as_str()),
        ("m6i.large", "spot")
    );
    assert_eq!(w.alive_of(&uid).await.len(), 1);

    // All spot is out: the pool may fall back to on-demand.
    proxy
        .add_fault(
            json!({"action": "RunInstances", "code": "InsufficientInstanceCapacity", "count": -1,
            "match": {"MarketType": "spot", "Value": format!("{}/", w.ns)}}),
        )
        .await;
    let job = w.create_job("fallback", 2).await;
    let done = w.wait_phase("fallback", JobPhase::Booting).await;
    assert_eq!(done.status.unwrap().instance.unwrap().market, "onDemand");
    assert_eq!(w.alive_of(&job.metadata.uid.unwrap()).await.len(), 1);

    // Nothing left at all: the job fails after its attempts and leaves nothing behind.
    proxy
        .add_fault(
            json!({"action": "RunInstances", "code": "InsufficientInstanceCapacity", "count": -1,
            "match": {"Value": format!("{}/", w.ns)}}),
        )
        .await;
    let job = w.create_job("no-capacity", 3).await;
    let failed = w.wait_phase("no-capacity", JobPhase::Failed).await;
    let status = failed.status.unwrap();
    assert_eq!(status.last_error.unwrap().reason, "InsufficientCapacity");
    assert_eq!(status.attempts, 3);
    assert!(w.instances_of(&job.metadata.uid.unwrap()).await.is_empty());
}

#[tokio::test]
async fn a_spot_fleet_out_of_capacity_falls_back_to_on_demand_under_its_own_token() {
    let w = World::new("fleet-fallback").await;
    let _controllers = w.start(w.context());
    w.ready_pool(|_| {}).await;
    let proxy = w.ground.proxy();
    // Every spot offering answers 200 with Errors[]; EC2 would replay that empty answer to
    // the same token, and refuse the token for the on-demand request that follows.
    proxy
        .add_fault(
            json!({"action": "CreateFleet", "code": "InsufficientInstanceCapacity",
            "fleet_error": true, "count": -1,
            "match": {"DefaultTargetCapacityType": "spot", "Value": format!("{}/", w.ns)}}),
        )
        .await;
    let uid = w
        .create_queued_job("fallback", 1)
        .await
        .metadata
        .uid
        .unwrap();
    let job = w.wait_phase("fallback", JobPhase::Booting).await;
    assert_eq!(job.status.unwrap().instance.unwrap().market, "onDemand");
    assert_eq!(w.alive_of(&uid).await.len(), 1);

    let calls = proxy.calls_of("CreateFleet", &uid).await;
    let param = |c: &support::proxy::Call, key: &str| c.params[key].as_str().map(String::from);
    assert!(calls.iter().all(|c| c.status == 200), "{calls:?}");
    let spot = &calls[0];
    let on_demand = calls.last().unwrap();
    assert_ne!(
        param(spot, "ClientToken"),
        param(on_demand, "ClientToken"),
        "another request needs another token"
    );
    // The pool's allocation strategy (the default for each market) is sent.
    assert_eq!(
        param(spot, "SpotOptions.AllocationStrategy").as_deref(),
        Some("price-capacity-optimized")
    );
    assert_eq!(
        param(on_demand, "OnDemandOptions.AllocationStrategy").as_deref(),
        Some("lowest-price")
    );
}

#[tokio::test]
async fn gc_removes_unclaimed_instances_and_templates_of_ours_only() {
    let w = World::new("gc").await;
    let ctx = w.context();
    let _controllers = w.start(ctx.clone());
    w.ready_pool(|_| {}).await;
    let claimed = w.create_job("claimed", 1).await.metadata.uid.unwrap();
    w.wait_phase("claimed", JobPhase::Booting).await;

    let template = w.template().await;
    let orphan = launch_unclaimed(&w, &w.controller_id, &w.ns).await;
    let foreign = launch_unclaimed(&w, "another-cluster", &w.ns).await;
    let untagged = w.launch_untagged().await;

    let sdk = aws_sdk_ec2::Client::new(&w.ground.aws_config().await);
    // Launch templates for a pool that is gone: one of ours, one of another controller.
    let ghost_pool = format!("{}/ghost", w.ns);
    for (name, controller) in [
        (format!("{}-ghost", w.ns), w.controller_id.as_str()),
        (format!("{}-foreign", w.ns), "another-cluster"),
    ] {
        use aws_sdk_ec2::types::{RequestLaunchTemplateData, ResourceType, Tag, TagSpecification};
        let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
        sdk.create_launch_template()
            .launch_template_name(name)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(w.ground.fixture("AMI_X86_64"))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::LaunchTemplate)
                    .tags(tag("gha:managed-by", "pacer"))
                    .tags(tag("gha:controller", controller))
                    .tags(tag("gha:pool", &ghost_pool))
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }

    let scope = controller::gc::Scope {
        pools: w.pools.clone(),
        jobs: w.jobs.clone(),
        namespace: Some(w.ns.clone()),
    };
    let collected = controller::gc::collect(&ctx, &scope).await.unwrap();
    assert_eq!(
        collected,
        controller::gc::Collected {
            instances: 1,
            templates: 1
        }
    );
    // Asked by name and id: the other tests' templates share moto, and its paging of a long
    // listing is not what is under test.
    let named = |name: String| {
        let sdk = sdk.clone();
        async move {
            let out = sdk
                .describe_launch_templates()
                .launch_template_names(name)
                .send()
                .await;
            out.is_ok_and(|o| !o.launch_templates().is_empty())
        }
    };
    assert!(!named(format!("{}-ghost", w.ns)).await);
    assert!(named(format!("{}-foreign", w.ns)).await);
    let live = sdk
        .describe_launch_templates()
        .launch_template_ids(template.id.clone())
        .send()
        .await;
    assert!(
        live.is_ok_and(|o| o.launch_templates().len() == 1),
        "the live pool's template stays"
    );
    assert_eq!(instance_state(&sdk, &orphan.id).await, "terminated");
    assert_eq!(instance_state(&sdk, &foreign.id).await, "running");
    assert_eq!(instance_state(&sdk, &untagged).await, "running");
    assert_eq!(
        w.alive_of(&claimed).await.len(),
        1,
        "a claimed instance stays"
    );
}

/// EC2's state name of instance `id`, asked of moto directly.
async fn instance_state(sdk: &aws_sdk_ec2::Client, id: &str) -> String {
    let out = sdk.describe_instances().instance_ids(id).send().await;
    let out = out.unwrap();
    let state = out.reservations()[0].instances()[0].state().unwrap();
    state.name().unwrap().as_str().to_string()
}

/// One TerminateInstances fails whole when one of its instances is protected from termination
/// (an operator debugging it, say): the collector then terminates the others each alone,
/// names the one left, and goes on to the launch templates.
#[tokio::test]
async fn gc_terminates_the_other_orphans_when_one_is_protected() {
    use aws_sdk_ec2::types::AttributeBooleanValue;
    let w = World::new("gc-protected").await;
    let ctx = w.context();
    let _controllers = w.start(ctx.clone());
    w.ready_pool(|_| {}).await;
    let protected = launch_unclaimed(&w, &w.controller_id, &w.ns).await;
    let orphan = launch_unclaimed(&w, &w.controller_id, &w.ns).await;
    let sdk = aws_sdk_ec2::Client::new(&w.ground.aws_config().await);
    let protect = |on: bool| {
        let sdk = sdk.clone();
        let id = protected.id.clone();
        async move {
            let value = AttributeBooleanValue::builder().value(on).build();
            let call = sdk.modify_instance_attribute().instance_id(id);
            call.disable_api_termination(value).send().await.unwrap();
        }
    };
    protect(true).await;
    let scope = controller::gc::Scope {
        pools: w.pools.clone(),
        jobs: w.jobs.clone(),
        namespace: Some(w.ns.clone()),
    };
    let collected = controller::gc::collect(&ctx, &scope).await.unwrap();
    assert_eq!(collected.instances, 1);
    assert_eq!(instance_state(&sdk, &orphan.id).await, "terminated");
    assert_eq!(instance_state(&sdk, &protected.id).await, "running");
    // Let go, it is the next round's.
    protect(false).await;
    let collected = controller::gc::collect(&ctx, &scope).await.unwrap();
    assert_eq!(collected.instances, 1);
    assert_eq!(instance_state(&sdk, &protected.id).await, "terminated");
}

#[tokio::test]
async fn denied_pricing_leaves_prices_empty_warns_once_and_launches_anyway() {
    let w = World::new("pricing-denied").await;
    let ctx = w.context();
    let _controllers = w.start(ctx.clone());
    w.ready_pool(|p| {
        p["spec"]["instanceTypes"] = json!(["c6i.large"]);
        p["spec"]["capacity"] = json!({"type": "onDemand"});
    })
    .await;
    w.ground
        .proxy()
        .add_fault(
            json!({"action": "GetProducts", "code": "AccessDeniedException", "count": -1,
            "match": {"Filters": "c6i.large"}}),
        )
        .await;
    for name in ["job-1", "job-2"] {
        w.create_job(name, 1).await;
        let job = w.wait_phase(name, JobPhase::Booting).await;
        let cost = job.status.unwrap().cost.unwrap();
        assert_eq!(
            (cost.hourly_price, cost.on_demand_hourly_price),
            (None, None)
        );
    }
    assert!(ctx.jobs.warned_about_prices());
}

#[tokio::test]
async fn a_spot_run_instances_launch_takes_the_cheapest_zone() {
    let w = World::new("cheapest-zone").await;
    let ctx = w.context();
    let _controllers = w.start(ctx.clone());
    // moto quotes one spot price everywhere; the proxy answers for m5.large from this table.
    w.ground
        .proxy()
        .set_spot_prices(json!({"m5.large": {"us-east-1a": "0.041000", "us-east-1b": "0.029000"}}))
        .await;
    w.ready_pool(|p| {
        p["spec"]["spawnMethod"] = json!("runInstances");
        p["spec"]["instanceTypes"] = json!(["m5.large"]);
        p["spec"]["capacity"] = json!({"type": "spot", "fallbackToOnDemand": false});
    })
    .await;
    w.create_job("job-1", 1).await;
    let status = w
        .wait_phase("job-1", JobPhase::Booting)
        .await
        .status
        .unwrap();
    let instance = status.instance.unwrap();
    assert_eq!(
        (instance.zone.as_str(), instance.market.as_str()),
        ("us-east-1b", "spot")
    );
    assert_eq!(
        status.cost.unwrap().hourly_price.as_deref(),
        Some("0.029000"),
        "the spot price history of the zone it launched in"
    );
    let launches: Vec<_> = w
        .ground
        .proxy()
        .calls()
        .await
        .into_iter()
        .filter(|c| c.action == "RunInstances" && c.params.get("DryRun").is_none())
        .filter(|c| c.params.to_string().contains(&w.ns))
        .collect();
    assert_eq!(launches.len(), 1, "{launches:?}");
    assert_eq!(
        launches[0].params["SubnetId"],
        json!(w.ground.fixture("SUBNET_B"))
    );
}

#[tokio::test]
async fn a_full_pool_holds_jobs_pending_until_one_finishes_and_finished_jobs_go_after_their_ttl() {
    let w = World::new("capacity-ttl").await;
    // A waiting job would look again only after an hour: the first job's finishing must wake it.
    let ctx = w.context_with(|s| s.job_limits.capacity_recheck = Duration::from_secs(3600));
    let _controllers = w.start(ctx.clone());
    w.ready_pool(|p| {
        p["spec"]["maxRunners"] = json!(1);
        p["spec"]["ttlSecondsAfterFinished"] = json!(2);
    })
    .await;
    let first = w.create_job("job-1", 1).await.metadata.uid.unwrap();
    w.wait_phase("job-1", JobPhase::Booting).await;
    let second = w.create_queued_job("job-2", 2).await.metadata.uid.unwrap();
    w.wait(|| async {
        let job = w.jobs.get("job-2").await.unwrap();
        job.status.is_some_and(|s| {
            s.phase == JobPhase::Pending
                && s.last_error.is_some_and(|e| e.reason == "PoolAtCapacity")
        })
    })
    .await;
    assert!(w.instances_of(&second).await.is_empty());

    w.report("job-1", "success").await;
    // Woken by job-1's finishing, not by a recheck.
    w.wait_phase("job-2", JobPhase::Booting).await;
    // The finished job is deleted once its TTL is over, and its instance is gone.
    w.wait(|| async { w.jobs.get_opt("job-1").await.unwrap().is_none() })
        .await;
    assert!(w.alive_of(&first).await.is_empty());
    assert_eq!(w.alive_of(&second).await.len(), 1);
}

#[tokio::test]
async fn a_finished_job_far_from_its_ttl_is_woken_for_it_by_the_expiry_scan() {
    let w = World::new("expiry-scan").await;
    // Past a 2 s visibility window, a finished job whose TTL ends more than two 1 s scans away
    // holds no timer of its own and changes to it take no pass: only the scan wakes it for its
    // TTL, and only its deletion otherwise.
    let ctx = w.context_with(|s| {
        s.job_limits.launch_visibility = Duration::from_secs(2);
        s.job_limits.expiry_scan = Duration::from_secs(1);
    });
    let _controllers = w.start(ctx.clone());
    w.ready_pool(|p| p["spec"]["ttlSecondsAfterFinished"] = json!(20))
        .await;
    w.create_job("job-1", 1).await;
    w.create_job("job-2", 2).await;
    w.wait_phase("job-1", JobPhase::Booting).await;
    w.wait_phase("job-2", JobPhase::Booting).await;
    w.report("job-1", "success").await;
    w.report("job-2", "success").await;
    w.wait_phase("job-1", JobPhase::Succeeded).await;
    let finished = tokio::time::Instant::now();
    w.wait_phase("job-2", JobPhase::Succeeded).await;

    // Deleted by hand once it waits without a timer (its last poll came within 10 s of its
    // end), it goes at once: its finalizer is released by the pass the deletion brings.
    tokio::time::sleep(Duration::from_secs(12)).await;
    w.jobs.delete("job-2", &Default::default()).await.unwrap();
    let deleting = tokio::time::Instant::now();
    w.wait(|| async { w.jobs.get_opt("job-2").await.unwrap().is_none() })
        .await;
    assert!(
        deleting.elapsed() < Duration::from_secs(5),
        "released {:?} after its deletion",
        deleting.elapsed()
    );

    w.wait(|| async { w.jobs.get_opt("job-1").await.unwrap().is_none() })
        .await;
    // Kept for its TTL (the phase was seen up to a poll after it was entered), not much longer.
    let kept = finished.elapsed();
    assert!(
        (Duration::from_secs(19)..Duration::from_secs(26)).contains(&kept),
        "deleted {kept:?} after it finished"
    );
}

#[tokio::test]
async fn a_freed_slot_goes_to_a_waiting_job_without_waiting_for_the_next_listing() {
    let w = World::new("refill").await;
    // Neither the waiting job's recheck nor a new DescribeInstances comes within the test: the
    // finished job's terminated instance frees its slot, and its finishing wakes the waiting job.
    let ctx = w.context_with(|s| {
        s.job_limits.capacity_recheck = Duration::from_secs(3600);
        s.instance_refresh = Duration::from_secs(300);
    });
    let _controllers = w.start(ctx.clone());
    w.ready_pool(|p| p["spec"]["maxRunners"] = json!(1)).await;
    let first = w.create_queued_job("first", 41).await.metadata.uid.unwrap();
    w.wait_phase("first", JobPhase::Booting).await;
    w.create_queued_job("second", 42).await;
    w.wait(|| async {
        let job = w.jobs.get("second").await.unwrap();
        (job.status.and_then(|s| s.last_error)).is_some_and(|e| e.reason == "PoolAtCapacity")
    })
    .await;

    let reported = tokio::time::Instant::now();
    w.report("first", "success").await;
    w.wait_phase("second", JobPhase::Booting).await;
    let waited = reported.elapsed();
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
    w.wait_phase("first", JobPhase::Succeeded).await;
    // The slot was given back only once EC2 had taken the instance's termination.
    assert!(w.alive_of(&first).await.is_empty());
}

/// Launches an instance tagged as `controller`'s, for a job of pool `linux` in `ns` that does
/// not exist: what a crash between launch and record, or another installation, leaves.
async fn launch_unclaimed(w: &World, controller: &str, ns: &str) -> Instance {
    let template = w.template().await;
    let pool = format!("{ns}/linux");
    let tags = [
        ("gha:managed-by", "pacer"),
        ("gha:controller", controller),
        ("gha:pool", pool.as_str()),
        ("gha:runner_job_uid", "no-such-job"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let request = pacer::cloud::LaunchRequest {
        launch_template_id: template.id,
        version: template.version,
        offerings: vec![("m6i.large".into(), w.ground.fixture("SUBNET_A").into())],
        spot: false,
        fleet: false,
        tags,
        allocation_strategy: None,
        client_token: None,
        count: 1,
    };
    w.fixtures
        .launch(&request)
        .await
        .unwrap()
        .instances
        .remove(0)
}

#[tokio::test]
async fn namespace_scoped_controllers_sharing_an_id_leave_each_others_runners_alone() {
    let a = World::new("gc-ns-a").await;
    let mut b = World::new("gc-ns-b").await;
    b.controller_id = a.controller_id.clone();
    let grace = Duration::from_secs(2);
    let (ctx_a, ctx_b) = (
        a.context_with(|s| s.gc_grace = grace),
        b.context_with(|s| s.gc_grace = grace),
    );
    let _a = a.start(ctx_a.clone());
    let _b = b.start(ctx_b.clone());
    a.ready_pool(|_| {}).await;
    b.ready_pool(|_| {}).await;
    let uid_a = a.create_queued_job("job", 1).await.metadata.uid.unwrap();
    let uid_b = b.create_queued_job("job", 2).await.metadata.uid.unwrap();
    a.wait_phase("job", JobPhase::Booting).await;
    b.wait_phase("job", JobPhase::Booting).await;
    let orphan = launch_unclaimed(&a, &a.controller_id, &a.ns).await;

    let scope = |w: &World| controller::gc::Scope {
        pools: w.pools.clone(),
        jobs: w.jobs.clone(),
        namespace: Some(w.ns.clone()),
    };
    // Within the grace period nothing is collected, not even the orphan.
    let none = controller::gc::collect(&ctx_a, &scope(&a)).await.unwrap();
    assert_eq!(none.instances, 0);
    tokio::time::sleep(grace + Duration::from_secs(1)).await;
    for (ctx, w) in [(&ctx_a, &a), (&ctx_b, &b)] {
        controller::gc::collect(ctx, &scope(w)).await.unwrap();
    }
    assert_eq!(a.alive_of(&uid_a).await.len(), 1, "a's runner lives");
    assert_eq!(b.alive_of(&uid_b).await.len(), 1, "b's runner lives");
    let left = a
        .ec2
        .describe_managed_instances(&a.controller_id)
        .await
        .unwrap();
    let orphan_now = left.iter().find(|i| i.id == orphan.id).unwrap();
    assert!(
        !orphan_now.is_alive(),
        "a's own orphan goes after the grace"
    );
}

#[tokio::test]
async fn a_burst_never_runs_more_than_max_runners_and_every_job_runs() {
    let w = World::new("burst").await;
    let _controllers = w.start(w.context());
    w.ready_pool(|p| p["spec"]["maxRunners"] = json!(10)).await;
    let names: Vec<String> = (0..100).map(|i| format!("burst-{i}")).collect();
    futures::future::join_all(
        names
            .iter()
            .enumerate()
            .map(|(i, name)| w.create_queued_job(name, 1000 + i as i64)),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut most = 0;
    loop {
        // Sampled from EC2 throughout: never more than maxRunners alive at once.
        let alive = w
            .ec2
            .describe_managed_instances(&w.controller_id)
            .await
            .unwrap()
            .into_iter()
            .filter(|i| i.is_alive())
            .count();
        most = most.max(alive);
        assert!(alive <= 10, "{alive} instances alive for maxRunners 10");
        let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
        let phase = |j: &RunnerJob| j.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if jobs.iter().all(|j| phase(j) == JobPhase::Succeeded) {
            break;
        }
        // Runners finish their jobs, making room for the next ones.
        for job in jobs.iter().filter(|j| phase(j) == JobPhase::Booting) {
            w.report(&job.metadata.name.clone().unwrap(), "success")
                .await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every job ran: {:?}",
            jobs.iter().map(phase).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(most > 0);
}

#[tokio::test]
async fn jobs_of_a_missing_deleting_or_unready_pool_are_not_launched() {
    let w = World::new("pool-gates").await;
    let _controllers = w.start(w.context());
    let reason = |w: &World, name: &'static str| {
        let jobs = w.jobs.clone();
        async move {
            let job = jobs.get(name).await.unwrap();
            let status = job.status.unwrap_or_default();
            (
                status.phase,
                status.last_error.map(|e| e.reason).unwrap_or_default(),
            )
        }
    };
    // No pool at all: PoolNotFound, not PoolAtCapacity.
    w.create_queued_job("orphan", 1).await;
    w.wait(|| async { reason(&w, "orphan").await == (JobPhase::Pending, "PoolNotFound".into()) })
        .await;

    // A pool whose spec turned invalid hands out no launch template.
    w.ready_pool(|_| {}).await;
    w.wait_phase("orphan", JobPhase::Booting).await;
    w.pools
        .patch(
            "linux",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"instanceTypes": ["m7i.huge"]}})),
        )
        .await
        .unwrap();
    w.wait(|| async {
        let pool = w.pools.get("linux").await.unwrap();
        let status = pool.status.unwrap_or_default();
        status.observed_generation == pool.metadata.generation
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False")
    })
    .await;
    let stale = w.create_queued_job("stale", 2).await.metadata.uid.unwrap();
    w.wait(|| async { reason(&w, "stale").await == (JobPhase::Pending, "PoolNotReady".into()) })
        .await;

    // A pool being deleted launches nothing more; its running job holds the deletion, its
    // finished jobs do not.
    w.pools
        .patch(
            "linux",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"instanceTypes": ["m6i.large"]}})),
        )
        .await
        .unwrap();
    w.wait_phase("stale", JobPhase::Booting).await;
    w.report("stale", "success").await;
    w.wait_phase("stale", JobPhase::Succeeded).await;
    w.pools
        .delete("linux", &DeleteParams::default())
        .await
        .unwrap();
    let late = w.create_queued_job("late", 3).await.metadata.uid.unwrap();
    w.wait(|| async { reason(&w, "late").await == (JobPhase::Pending, "PoolDeleting".into()) })
        .await;
    assert!(
        w.pools.get_opt("linux").await.unwrap().is_some(),
        "orphan's runner holds it"
    );
    w.report("orphan", "success").await;
    w.wait(|| async { w.pools.get_opt("linux").await.unwrap().is_none() })
        .await;
    w.wait(|| async { reason(&w, "late").await == (JobPhase::Pending, "PoolNotFound".into()) })
        .await;
    assert!(w.instances_of(&late).await.is_empty());
    assert_eq!(w.instances_of(&stale).await.len(), 1);
}

#[tokio::test]
async fn late_answers_and_a_lagging_listing_fail_no_job_and_each_instance_is_terminated_once() {
    let w = World::new("late-answers").await;
    let _controllers = w.start(w.context_with(|s| {
        s.job_limits.launch_visibility = Duration::from_secs(4);
    }));
    w.ready_pool(|_| {}).await;
    let proxy = w.ground.proxy();
    let ours = format!("{}/", w.ns);
    // EC2 lists new instances 2 s late, answers launches 6 s late (past the 4 s window), and
    // throttles DescribeInstances for a while.
    proxy.describe_lag(2.0, &ours).await;
    proxy
        .add_fault(
            json!({"action": "CreateFleet", "code": "-", "delay_answer": 6, "count": -1,
            "match": {"Value": ours}}),
        )
        .await;
    proxy
        .add_fault(
            json!({"action": "DescribeInstances", "code": "RequestLimitExceeded",
            "status": 503, "count": 12}),
        )
        .await;
    let names: Vec<String> = (0..5).map(|i| format!("late-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        w.create_queued_job(name, 100 + i as i64).await;
    }
    let phases = || async {
        let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
        jobs.into_iter()
            .map(|j| j.status.unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let statuses = phases().await;
        let failed: Vec<_> = statuses
            .iter()
            .filter(|s| s.phase == JobPhase::Failed)
            .collect();
        assert!(
            failed.is_empty(),
            "a job failed while its instance ran: {failed:?}"
        );
        if statuses.iter().all(|s| s.phase == JobPhase::Booting) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The lag fired: listings left out instances that had just been launched.
    assert!(
        proxy.hidden_by_lag().await > 0,
        "the describe lag never hid an instance"
    );
    proxy.clear_faults().await;
    // Every runner finishes at once: the terminations share calls, one per instance.
    futures::future::join_all(names.iter().map(|n| w.report(n, "success"))).await;
    for name in &names {
        w.wait_phase(name, JobPhase::Succeeded).await;
    }
    let instances: Vec<Instance> = w
        .ec2
        .describe_managed_instances(&w.controller_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.tags.get("gha:pool").is_some_and(|p| p.starts_with(&ours)))
        .collect();
    assert_eq!(instances.len(), 5, "one instance per job: {instances:?}");
    assert!(instances.iter().all(|i| !i.is_alive()), "{instances:?}");
    let terminations = proxy.calls_of("TerminateInstances", "").await;
    for instance in &instances {
        let sent = terminations
            .iter()
            .filter(|c| c.params.to_string().contains(&instance.id))
            .count();
        assert_eq!(sent, 1, "{} terminated {sent} times", instance.id);
    }
}

#[tokio::test]
async fn deleting_a_job_whose_launch_answer_was_lost_terminates_the_instance_first() {
    let w = World::new("lost-answer").await;
    let _controllers = w.start(w.context());
    w.ready_pool(|_| {}).await;
    let proxy = w.ground.proxy();
    let ours = format!("{}/", w.ns);
    // The launch goes through, but no answer ever comes back, and EC2 lists it late.
    proxy.describe_lag(4.0, &ours).await;
    proxy
        .add_fault(
            json!({"action": "CreateFleet", "code": "-", "lose_answer": true,
            "count": -1, "match": {"Key": "gha:runner_job_uid", "Value": ours}}),
        )
        .await;
    let uid = w.create_queued_job("lost", 1).await.metadata.uid.unwrap();
    w.wait(|| async { !w.instances_of(&uid).await.is_empty() })
        .await;
    w.jobs
        .delete("lost", &DeleteParams::default())
        .await
        .unwrap();
    w.wait(|| async { w.jobs.get_opt("lost").await.unwrap().is_none() })
        .await;
    assert!(
        w.alive_of(&uid).await.is_empty(),
        "the instance went before the RunnerJob"
    );
}

#[tokio::test]
async fn an_instance_id_written_into_a_status_is_never_terminated_unless_ec2_lists_it_as_ours() {
    let w = World::new("forged-status").await;
    let _controllers = w.start(w.context_with(|s| {
        s.job_limits.launch_visibility = Duration::from_secs(3);
    }));
    w.ready_pool(|_| {}).await;
    // Someone else's instance, untagged.
    let sdk = aws_sdk_ec2::Client::new(&w.ground.aws_config().await);
    let foreign = w.launch_untagged().await;
    // A RunnerJob whose status was written by someone who may write statuses: it claims that
    // instance, and says its job is over.
    // Of no pool, so nothing of its own is ever launched.
    let spec = RunnerJobSpec {
        pool_name: "nowhere".into(),
        ..World::spec(1)
    };
    let job = RunnerJob::for_queued_job(&w.ns, "forged", spec);
    w.jobs.create(&PostParams::default(), &job).await.unwrap();
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let forged = json!({"status": {"phase": "Running", "phaseTimes": {"running": now},
        "instance": {"id": foreign, "type": "m6i.large", "zone": "us-east-1a",
            "market": "onDemand", "launchTime": now},
        "completion": {"result": "success"}}});
    w.jobs
        .patch_status("forged", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .unwrap();
    w.wait(|| async {
        w.phase("forged")
            .await
            .is_some_and(|p| p == JobPhase::Succeeded || p == JobPhase::Failed)
    })
    .await;
    let out = sdk
        .describe_instances()
        .instance_ids(&foreign)
        .send()
        .await
        .unwrap();
    let state = out.reservations()[0].instances()[0]
        .state()
        .unwrap()
        .name()
        .unwrap()
        .as_str()
        .to_string();
    assert_eq!(
        state, "running",
        "an instance EC2 does not list as the job's is left alone"
    );
    let calls = w
        .ground
        .proxy()
        .calls_of("TerminateInstances", &foreign)
        .await;
    assert!(calls.is_empty(), "{calls:?}");
}

#[tokio::test]
async fn a_launch_template_deleted_behind_our_back_is_recreated_and_the_job_launches() {
    let w = World::new("template-gone").await;
    let _controllers = w.start(w.context());
    w.ready_pool(|_| {}).await;
    let template = w.template().await;
    aws_sdk_ec2::Client::new(&w.ground.aws_config().await)
        .delete_launch_template()
        .launch_template_id(&template.id)
        .send()
        .await
        .unwrap();
    let uid = w.create_queued_job("after", 1).await.metadata.uid.unwrap();
    let job = w.wait_phase("after", JobPhase::Booting).await;
    assert_eq!(
        job.status.unwrap().attempts,
        1,
        "one launch attempt, not a failure"
    );
    assert_eq!(w.alive_of(&uid).await.len(), 1);
    let pool = w.pools.get("linux").await.unwrap();
    assert_ne!(
        pool.status.unwrap().launch_template.unwrap().id,
        template.id,
        "the pool made a new template"
    );
}

#[tokio::test]
async fn a_runner_is_removed_from_github_but_a_github_outage_holds_no_slot() {
    let w = World::new("deregister").await;
    let (fake, controllers) = w.start_with_github().await;
    w.ready_pool(|_| {}).await;
    w.create_queued_job("registered", 1).await;
    w.wait_phase("registered", JobPhase::Booting).await;
    let (_, name) = w.register_runner(&fake, "registered", 1).await;
    // GitHub fails for a while: the job finishes anyway and frees its slot; the runner stays.
    fake.fail("delete_runner", 500, 1000);
    w.report("registered", "success").await;
    w.wait_phase("registered", JobPhase::Succeeded).await;
    assert_eq!(fake.runner_names("orgs/example-org"), [name]);
    // The controllers stop first: a removal still retrying its 500s would otherwise succeed
    // once GitHub is back, before the sweep looks.
    controllers.abort();
    let _ = controllers.await;
    // GitHub is back: the sweep removes the runner no live RunnerJob claims.
    fake.fail("delete_runner", 500, 0);
    let scope = controller::sweep::Scope::new(w.pools.clone(), w.jobs.clone());
    let ctx = w.context_with_github(&fake);
    let swept = controller::sweep::sweep(&ctx, &fake.client(), &scope)
        .await
        .unwrap();
    assert_eq!(swept.runners_removed, 1);
    assert!(fake.runner_names("orgs/example-org").is_empty());
}

#[tokio::test]
async fn a_busy_runner_whose_in_progress_was_lost_is_never_cut_off_at_the_idle_limit() {
    let w = World::new("busy-idle").await;
    let (fake, _controllers) = w.start_with_github().await;
    w.ready_pool(|_| {}).await;
    let mut runners = Vec::new();
    for (name, job_id) in [("busy", 11), ("idle", 12)] {
        w.create_queued_job(name, job_id).await;
        w.wait_phase(name, JobPhase::Booting).await;
        runners.push(w.register_runner(&fake, name, job_id).await);
    }
    // The busy runner runs its job; its `in_progress` delivery was lost. The idle one's job
    // went to someone else's runner, and GitHub reports it idle.
    let (busy_id, busy_name) = runners[0].clone();
    fake.set_busy("orgs/example-org", &busy_name, true);
    fake.set_job(
        "example-org/api",
        11,
        "in_progress",
        Some((busy_id, &busy_name)),
    );
    fake.set_job(
        "example-org/api",
        12,
        "in_progress",
        Some((999_999, "someone-else")),
    );
    // Both have been running for longer than the idle limit (10 minutes).
    w.age_phase("busy", "running", 12).await;
    w.age_phase("idle", "running", 12).await;
    w.wait(|| async {
        let job = w.jobs.get("idle").await.unwrap();
        job.status
            .and_then(|s| s.last_error)
            .is_some_and(|e| e.reason == "RunnerIdle")
    })
    .await;
    // The busy job's own pass past the limit asks GitHub too, and records what it says (or
    // cuts the runner off): passes of the two jobs come in either order.
    w.wait(|| async {
        let status = w.jobs.get("busy").await.unwrap().status.unwrap_or_default();
        status.assigned_job.is_some() || status.phase != JobPhase::Running
    })
    .await;
    let busy = w.jobs.get("busy").await.unwrap();
    let status = busy.status.clone().unwrap();
    assert_eq!(status.phase, JobPhase::Running, "{status:?}");
    let assigned = status.assigned_job.expect("the assignment, from GitHub");
    assert_eq!(assigned.job_id, 11);
    assert_eq!(w.alive_of(&busy.metadata.uid.unwrap()).await.len(), 1);
    assert!(fake.calls_of("get_workflow_job") >= 2);
}

#[tokio::test]
async fn an_instance_lost_before_its_runner_took_the_job_is_replaced_while_github_says_queued() {
    let w = World::new("requeue").await;
    let (fake, _controllers) = w.start_with_github().await;
    w.ready_pool(|_| {}).await;
    fake.set_job("example-org/api", 21, "queued", None);
    let job = w.create_queued_job("lost", 21).await;
    let uid = job.metadata.uid.clone().unwrap();
    let first = w.wait_phase("lost", JobPhase::Booting).await;
    let first = first.status.unwrap().instance.unwrap().id;
    w.terminate_behind_our_back(&first).await;
    // A new instance for attempt 2; the first is history.
    w.wait(|| async {
        let s = w.jobs.get("lost").await.unwrap().status.unwrap();
        s.phase == JobPhase::Booting && s.instance.is_some_and(|i| i.id != first)
    })
    .await;
    let status = w.jobs.get("lost").await.unwrap().status.unwrap();
    assert_eq!(status.previous_attempts.len(), 1, "{status:?}");
    assert_eq!(status.previous_attempts[0].instance, first);
    assert_eq!(status.previous_attempts[0].reason, "InstanceLost");
    assert_eq!(status.attempt(), 2);
    assert_eq!(w.alive_of(&uid).await.len(), 1);
    // Another runner takes the job and the second instance is lost too: the RunnerJob ends
    // saying so, and nothing more is launched.
    fake.set_job(
        "example-org/api",
        21,
        "in_progress",
        Some((999_999, "someone-else")),
    );
    w.terminate_behind_our_back(&status.instance.unwrap().id)
        .await;
    let ended = w.wait_phase("lost", JobPhase::Failed).await.status.unwrap();
    assert_eq!(ended.last_error.unwrap().reason, "NotQueued");
    assert_eq!(ended.previous_attempts.len(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(w.alive_of(&uid).await.is_empty());
    assert_eq!(w.instances_of(&uid).await.len(), 2);
}

#[tokio::test]
async fn a_job_waiting_for_room_costs_no_write_per_pass() {
    let w = World::new("quiet").await;
    let ctx = w.context_with(|s| s.job_limits.capacity_recheck = Duration::from_millis(300));
    let _controllers = w.start(ctx);
    w.ready_pool(|p| p["spec"]["maxRunners"] = json!(1)).await;
    w.create_queued_job("first", 31).await;
    w.wait_phase("first", JobPhase::Booting).await;
    w.create_queued_job("second", 32).await;
    w.wait(|| async {
        let job = w.jobs.get("second").await.unwrap();
        job.status
            .and_then(|s| s.last_error)
            .is_some_and(|e| e.reason == "PoolAtCapacity")
    })
    .await;
    let before = w
        .jobs
        .get("second")
        .await
        .unwrap()
        .metadata
        .resource_version;
    // About a dozen passes, each finding the pool still full.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = w.jobs.get("second").await.unwrap();
    assert_eq!(after.status.unwrap().phase, JobPhase::Pending);
    assert_eq!(
        after.metadata.resource_version, before,
        "a waiting pass wrote"
    );
}

#[tokio::test]
async fn demand_taken_elsewhere_while_waiting_for_room_is_never_launched() {
    let w = World::new("demand").await;
    let fake = support::github::FakeGitHub::start().await;
    fake.install(1, &["example-org/api"]);
    let _controllers = w.start(w.context_rechecking(&fake, Duration::from_secs(1)));
    w.ready_pool(|p| p["spec"]["maxRunners"] = json!(1)).await;
    fake.set_job("example-org/api", 31, "queued", None);
    fake.set_job("example-org/api", 32, "queued", None);
    w.create_queued_job("first", 31).await;
    w.wait_phase("first", JobPhase::Booting).await;
    let second = w
        .create_queued_job("second", 32)
        .await
        .metadata
        .uid
        .unwrap();
    w.wait(|| async {
        let job = w.jobs.get("second").await.unwrap();
        job.status
            .is_some_and(|s| s.last_error.is_some_and(|e| e.reason == "PoolAtCapacity"))
    })
    .await;
    // While it waits for room, a runner that is not ours takes its job.
    fake.set_job(
        "example-org/api",
        32,
        "in_progress",
        Some((999_999, "someone-else")),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.report("first", "success").await;
    let ended = w
        .wait_phase("second", JobPhase::Failed)
        .await
        .status
        .unwrap();
    let error = ended.last_error.unwrap();
    assert_eq!(error.reason, "NotQueued", "{error:?}");
    assert!(error.message.contains("someone-else"), "{error:?}");
    assert!(ended.launch.is_none());
    assert!(
        w.instances_of(&second).await.is_empty(),
        "nothing was launched for it"
    );
}

#[tokio::test]
async fn a_job_waiting_for_room_that_github_no_longer_queues_is_retired_by_the_sweep() {
    let w = World::new("retire").await;
    let fake = support::github::FakeGitHub::start().await;
    fake.install(1, &["example-org/api"]);
    let ctx = w.context_rechecking(&fake, Duration::from_secs(1));
    let _controllers = w.start(ctx.clone());
    w.ready_pool(|p| p["spec"]["maxRunners"] = json!(1)).await;
    fake.set_job("example-org/api", 41, "queued", None);
    fake.set_job("example-org/api", 42, "queued", None);
    w.create_queued_job("first", 41).await;
    w.wait_phase("first", JobPhase::Booting).await;
    let second = w.create_queued_job("second", 42).await;
    let second = second.metadata.uid.unwrap();
    w.wait(|| async {
        let job = w.jobs.get("second").await.unwrap();
        job.status
            .is_some_and(|s| s.last_error.is_some_and(|e| e.reason == "PoolAtCapacity"))
    })
    .await;
    // While it waits for room, the job is cancelled: GitHub's listing no longer shows it.
    fake.set_job("example-org/api", 42, "completed", None);
    fake.state.lock().unwrap().queued.insert(
        "example-org/api".into(),
        vec![(
            410,
            vec![json!({"id": 41, "run_id": 410, "status": "queued", "labels": ["self-hosted"]})],
        )],
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let scope = controller::sweep::Scope::new(w.pools.clone(), w.jobs.clone());
    let swept = controller::sweep::sweep(&ctx, &fake.client(), &scope)
        .await
        .unwrap();
    assert_eq!(swept.doubted, 1, "{swept:?}");
    // Retired while the first still holds the pool's one slot: nothing waits for room.
    let ended = w
        .wait_phase("second", JobPhase::Failed)
        .await
        .status
        .unwrap();
    let error = ended.last_error.unwrap();
    assert_eq!(error.reason, "NotQueued", "{error:?}");
    assert!(ended.launch.is_none());
    let first = w.jobs.get("first").await.unwrap().status.unwrap();
    assert_eq!(first.phase, JobPhase::Booting);
    assert!(w.instances_of(&second).await.is_empty());
    assert_eq!(
        fake.calls_of("get_workflow_job"),
        1,
        "one question, for the doubted job"
    );
}

#[tokio::test]
async fn spot_interruption_notices_past_the_breaker_turn_the_pool_on_demand_for_a_while() {
    let w = World::new("breaker").await;
    let (_fake, _controllers) = w.start_with_github().await;
    w.ready_pool(|p| {
        p["spec"]["capacity"] = json!({"type": "spot", "fallbackToOnDemand": true,
            "interruptionBreaker": {"notices": 2, "windowMinutes": 10, "onDemandMinutes": 20}});
    })
    .await;
    let market = |job: &RunnerJob| {
        let launch = job.status.as_ref().and_then(|s| s.launch.as_ref());
        launch.map(|l| l.market.clone()).unwrap_or_default()
    };
    // Two instances of the pool report spot interruption notices (as their callbacks write).
    for (name, id) in [("first", 51), ("second", 52)] {
        w.create_queued_job(name, id).await;
        let booting = w.wait_phase(name, JobPhase::Booting).await;
        assert_eq!(market(&booting), "spot");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let notice = json!({"interruption": {"kind": "spot-interruption", "reportedAt": now}});
        w.patch_job_status(name, notice).await;
    }
    w.create_queued_job("third", 53).await;
    let third = w.wait_phase("third", JobPhase::Booting).await;
    assert_eq!(market(&third), "onDemand", "the breaker is open");
    // The pool says so, until when, and an Event says why.
    w.wait(|| async {
        let pool = w.pools.get("linux").await.unwrap();
        pool.status.is_some_and(|s| s.on_demand_until.is_some())
    })
    .await;
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(w.client.clone(), &w.ns);
    w.wait(|| async {
        let all = events.list(&Default::default()).await.unwrap().items;
        all.iter().any(|e| {
            e.reason.as_deref() == Some("SpotInterruptionBreakerOpen")
                && e.message
                    .as_deref()
                    .is_some_and(|m| m.contains("on-demand until"))
        })
    })
    .await;
}

#[tokio::test]
async fn a_job_life_costs_one_status_write_per_phase_change() {
    use futures::StreamExt as _;
    use kube::runtime::watcher;
    let w = World::new("writes").await;
    let (fake, _controllers) = w.start_with_github().await;
    w.ready_pool(|_| {}).await;
    // Every version of the job the API server stores, from its creation on.
    let versions = Arc::new(std::sync::Mutex::new(
        Vec::<(String, Option<JobPhase>)>::new(),
    ));
    let seen = versions.clone();
    let config = watcher::Config::default().fields("metadata.name=life");
    let watch = tokio::spawn(watcher(w.jobs.clone(), config).for_each(move |event| {
        if let Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job)) = event {
            let version = job.metadata.resource_version.clone().unwrap_or_default();
            let phase = job.status.map(|s| s.phase);
            let mut seen = seen.lock().unwrap();
            if seen.last().is_none_or(|(v, _)| *v != version) {
                seen.push((version, phase));
            }
        }
        std::future::ready(())
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    fake.set_job("example-org/api", 4343, "queued", None);
    w.create_queued_job("life", 4343).await;
    w.wait_phase("life", JobPhase::Booting).await;
    // What the instance's callbacks write: its runner, then its completion (two writes).
    w.register_runner(&fake, "life", 4343).await;
    w.report("life", "success").await;
    w.wait_phase("life", JobPhase::Succeeded).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    watch.abort();
    let versions = versions.lock().unwrap().clone();
    // Created; then Launching (the launch recorded), Booting, Running, Completing,
    // Succeeded: one write each, and the two callbacks'.
    let phases: Vec<_> = versions.iter().map(|(_, p)| *p).collect();
    assert_eq!(versions.len(), 1 + 5 + 2, "{phases:?}");
}

/// A pass queued while the controller's own write was on its way back through the watch is
/// handed the object that write replaced. It waits for the newer one: no write of the
/// controller is refused as made on an old version, and the job's life costs no extra write.
#[tokio::test]
async fn a_pass_handed_the_version_its_own_write_replaced_writes_nothing_over_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let w = World::new("behind").await;
    // The controllers' watches through a relay that passes the API server's bytes late, as a
    // loaded API server does: each pass after a write is handed the job as it was before.
    let mut late = w.ground.kube_config().await;
    let url = &late.cluster_url;
    let upstream = format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap());
    let relay = support::relay::Relay::start(upstream.parse().unwrap()).await;
    relay.slow(Duration::from_millis(300));
    late.cluster_url = format!("https://{}", relay.addr).parse().unwrap();
    let late = kube::Client::try_from(late).unwrap();
    // The controllers' writes go straight to the API server, each refused one counted.
    let refused = Arc::new(AtomicUsize::new(0));
    fn counting<B>(
        refused: Arc<AtomicUsize>,
    ) -> impl Fn(axum::http::Response<B>) -> axum::http::Response<B> + Clone {
        move |response| {
            if response.status() == axum::http::StatusCode::CONFLICT {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            response
        }
    }
    let config = w.ground.kube_config().await;
    let client = (kube::client::ClientBuilder::try_from(config).unwrap())
        .with_layer(&tower::util::MapResponseLayer::new(counting(
            refused.clone(),
        )))
        .build();
    let settings = Settings {
        backoff_unit: Duration::from_millis(200),
        instance_refresh: Duration::from_millis(500),
        ..Settings::new(&w.controller_id, "https://pacer.example.test")
    };
    let ctx = Context::new(client, Arc::new(w.ec2.clone()), settings);
    let (pools, jobs) = (
        Api::namespaced(late.clone(), &w.ns),
        Api::namespaced(late, &w.ns),
    );
    let _controllers = tokio::spawn(controller::run(Arc::new(ctx), pools, jobs));
    w.ready_pool(|_| {}).await;
    // One created with the finalizer on, as the listener does; one without, which the first
    // pass puts on.
    w.create_queued_job("job-1", 4343).await;
    w.create_job("job-2", 4344).await;
    let mut booting = Vec::new();
    for name in ["job-1", "job-2"] {
        booting.push(w.wait_phase(name, JobPhase::Booting).await);
    }
    // Long enough for the passes the late watch brings.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(relay.delayed() > 0, "the watch went through the relay");
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "writes refused as conflicts"
    );
    for job in booting {
        let name = job.metadata.name.clone().unwrap();
        let now = w.jobs.get(&name).await.unwrap();
        let versions = (now.metadata.resource_version, job.metadata.resource_version);
        assert_eq!(
            versions.0, versions.1,
            "{name} written after Booting: {:?}",
            now.status
        );
    }
}

/// The launch's record, which the launch call waits on, is the one write marked to go ahead of
/// the client's queue; the job's Booting write and every other write wait their turn.
#[tokio::test]
async fn a_launch_record_goes_ahead_of_the_client_queue_and_nothing_else_does() {
    use axum::http::{Method, Request};
    use pacer::controller::lanes::Ahead;
    let w = World::new("ahead").await;
    // Every write of the controllers' client, with whether it was marked.
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = {
        let writes = writes.clone();
        move |request: Request<kube::client::Body>| {
            if request.method() != Method::GET {
                let ahead = request.extensions().get::<Ahead>().is_some();
                let what = format!("{} {}", request.method(), request.uri().path());
                writes.lock().unwrap().push((ahead, what));
            }
            request
        }
    };
    let config = w.ground.kube_config().await;
    let client = (kube::client::ClientBuilder::try_from(config).unwrap())
        .with_layer(&tower::util::MapRequestLayer::new(record))
        .build();
    let settings = Settings::new(&w.controller_id, "https://pacer.example.test");
    let ctx = Context::new(client, Arc::new(w.ec2.clone()), settings);
    let _controllers = w.start(Arc::new(ctx));
    w.ready_pool(|_| {}).await;
    w.create_queued_job("job-1", 4343).await;
    w.wait_phase("job-1", JobPhase::Booting).await;
    let writes = writes.lock().unwrap().clone();
    let status = format!("/namespaces/{}/runnerjobs/job-1/status", w.ns);
    // The job's status writes in order: the launch record, then Booting.
    let job: Vec<_> = (writes.iter())
        .filter(|(_, what)| what.starts_with("PATCH ") && what.ends_with(&status))
        .map(|(ahead, _)| *ahead)
        .collect();
    assert!(
        job.len() >= 2 && job[0],
        "the record first, marked: {writes:?}"
    );
    assert!(
        !job[1..].contains(&true),
        "nothing after it marked: {writes:?}"
    );
    let marked = writes.iter().filter(|(ahead, _)| *ahead).count();
    assert_eq!(
        marked, 1,
        "no other write of either controller marked: {writes:?}"
    );
}

/// A spot instance EC2 reclaimed while its runner ran the job: the job fails there as it would
/// on any runner, and a pool that asks for it has GitHub re-run the job, once, when its run
/// has completed and GitHub says the job failed on our runner. An instance that only says it
/// got a notice and shuts itself down gets nothing re-run: a workflow could say so.
#[tokio::test]
async fn a_job_lost_to_a_spot_interruption_is_rerun_once_when_its_run_completed() {
    let w = World::new("rerun").await;
    let fake = support::github::FakeGitHub::start().await;
    fake.install(1, &["example-org/api"]);
    let mut settings = Settings {
        backoff_unit: Duration::from_millis(200),
        instance_refresh: Duration::from_millis(500),
        ..Settings::new(&w.controller_id, "https://pacer.example.test")
    };
    settings.job_limits.rerun_retry = Duration::from_millis(500);
    let ctx = Context::new(w.client.clone(), Arc::new(w.ec2.clone()), settings)
        .with_github(Arc::new(fake.client()));
    let _controllers = w.start(Arc::new(ctx));
    w.ready_pool(|pool| pool["spec"]["rerunInterrupted"] = json!(true))
        .await;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut instances = Vec::new();
    for (name, job_id) in [("reclaimed", 31), ("claims-a-notice", 32)] {
        fake.set_job("example-org/api", job_id, "queued", None);
        w.create_queued_job(name, job_id).await;
        let booted = w.wait_phase(name, JobPhase::Booting).await;
        instances.push(booted.status.unwrap().instance.unwrap().id);
        let (runner_id, runner) = w.register_runner(&fake, name, job_id).await;
        // The runner takes the job; the run goes on. Both instances report a notice.
        let taken = Some((runner_id, runner.as_str()));
        fake.set_job("example-org/api", job_id, "in_progress", taken);
        fake.state
            .lock()
            .unwrap()
            .runs_in_progress
            .insert(job_id + 1_000_000);
        let assigned = json!({"jobId": job_id, "runId": 7, "repository": "example-org/api"});
        let notice = json!({"kind": "spot-interruption", "reportedAt": now});
        w.patch_job_status(
            name,
            json!({"assignedJob": assigned, "interruption": notice}),
        )
        .await;
        fake.finish_job("example-org/api", job_id, "failure", (runner_id, &runner));
    }
    // EC2 reclaims the first; the second shuts itself down.
    w.ground.proxy().spot_reclaimed(&instances[0]).await;
    for id in &instances {
        w.terminate_behind_our_back(id).await;
    }
    let jobs = w.jobs.clone();
    let reason = |name: &'static str| {
        let jobs = jobs.clone();
        async move {
            let job = jobs.get(name).await.unwrap();
            job.status.and_then(|s| s.last_error).map(|e| e.reason)
        }
    };
    w.wait_phase("reclaimed", JobPhase::Failed).await;
    assert_eq!(
        reason("reclaimed").await.as_deref(),
        Some("InterruptedWhileRunning")
    );
    w.wait_phase("claims-a-notice", JobPhase::Failed).await;
    assert_eq!(
        reason("claims-a-notice").await.as_deref(),
        Some("InstanceLost")
    );
    // While the run goes on, GitHub is asked about it, and not to re-run.
    w.wait(|| async { fake.calls_of("get_workflow_run") >= 2 })
        .await;
    assert_eq!(fake.calls_of("rerun_job"), 0);
    assert_eq!(
        reason("reclaimed").await.as_deref(),
        Some("InterruptedWhileRunning")
    );
    // The run completes: the job is re-run, once; a new attempt of the run starts.
    fake.state.lock().unwrap().runs_in_progress.clear();
    w.wait(|| async { reason("reclaimed").await.as_deref() == Some("RerunRequested") })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.calls_of("rerun_job"), 1, "asked once");
    assert_eq!(fake.state.lock().unwrap().reruns, vec![31]);
    assert_eq!(
        reason("claims-a-notice").await.as_deref(),
        Some("InstanceLost")
    );
}

/// Two controllers in one account and one cluster, each with its own controller id and
/// namespace (how docs/scaling.md shards Pacer), under a burst at once: each stays within its
/// own `maxRunners`, every job of each runs, and neither's reconciler nor garbage collector
/// (running every second, no grace) touches the other's instances.
#[tokio::test]
async fn two_controllers_in_one_account_keep_to_their_own_instances_under_a_burst() {
    let mut shards = [World::new("shard-a").await, World::new("shard-b").await];
    // Each controller's calls carry its own app name, so the proxy tells them apart.
    for w in &mut shards {
        let config = w.ground.aws_config().await.to_builder();
        let app = aws_config::AppName::new(w.controller_id.clone()).unwrap();
        w.ec2 = AwsEc2::new(&config.app_name(app).build());
    }
    let mut running = Vec::new();
    for w in &shards {
        let ctx = w.context_with(|s| s.gc_interval = Duration::from_secs(1));
        running.push(w.start(ctx.clone()));
        let scope = controller::gc::Scope {
            pools: w.pools.clone(),
            jobs: w.jobs.clone(),
            namespace: Some(w.ns.clone()),
        };
        running.push(tokio::spawn(controller::gc::run(ctx, scope)));
    }
    let limits = [3, 5];
    for (w, max) in shards.iter().zip(limits) {
        w.ready_pool(|p| p["spec"]["maxRunners"] = json!(max)).await;
    }
    let per_shard = 24;
    let names: Vec<String> = (0..per_shard).map(|i| format!("shard-{i}")).collect();
    futures::future::join_all(shards.iter().flat_map(|w| {
        (names.iter().enumerate()).map(move |(i, name)| w.create_queued_job(name, 3000 + i as i64))
    }))
    .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut most = [0; 2];
    let mut done = [false; 2];
    while done != [true; 2] {
        assert!(tokio::time::Instant::now() < deadline, "not every job ran");
        for (i, w) in shards.iter().enumerate() {
            // Sampled from EC2 throughout: each controller within its own maxRunners.
            let alive = (w.ec2.describe_managed_instances(&w.controller_id).await)
                .unwrap()
                .into_iter()
                .filter(|i| i.is_alive())
                .count();
            most[i] = most[i].max(alive);
            assert!(alive <= limits[i], "{}: {alive} alive", w.controller_id);
            let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
            let phase = |j: &RunnerJob| j.status.as_ref().map(|s| s.phase).unwrap_or_default();
            done[i] = jobs.iter().all(|j| phase(j) == JobPhase::Succeeded);
            for job in jobs.iter().filter(|j| phase(j) == JobPhase::Booting) {
                w.report(&job.metadata.name.clone().unwrap(), "success")
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(most.iter().all(|m| *m > 0), "{most:?}");

    // Every call either controller made that names an instance named only its own.
    let proxy = shards[0].ground.proxy();
    let mut touched = [0; 2];
    for call in proxy.calls().await {
        let Some(i) = shards.iter().position(|w| w.controller_id == call.agent) else {
            continue;
        };
        for (resource, tags) in &call.resource_tags {
            let owner = tags.get(pacer::cloud::tags::CONTROLLER);
            assert_eq!(
                owner,
                Some(&shards[i].controller_id),
                "{} called {} on {resource}, tagged {tags:?}",
                call.agent,
                call.action
            );
            touched[i] += usize::from(call.action == "TerminateInstances");
        }
    }
    assert!(touched.iter().all(|t| *t >= per_shard), "{touched:?}");
}

/// Creates queued RunnerJobs `names` at once, with job ids from `from`.
async fn create_together(w: &World, names: &[String], from: i64) {
    let creations =
        (names.iter().enumerate()).map(|(i, name)| w.create_queued_job(name, from + i as i64));
    futures::future::join_all(creations).await;
}

/// The instances EC2 made for the jobs of this test's pool, by id, with their tags.
async fn pool_instances(w: &World) -> Vec<Instance> {
    let ours = format!("{}/", w.ns);
    (w.ec2
        .describe_managed_instances(&w.controller_id)
        .await
        .unwrap()
        .into_iter())
    .filter(|i| i.tags.get("gha:pool").is_some_and(|p| p.starts_with(&ours)))
    .collect()
}

/// Every member records a batch before its call. Killed while the call is out, the
/// controller's successor sends the recorded batch again under its token: each member takes
/// its own instance, and nothing is launched twice.
#[tokio::test]
async fn a_recorded_batch_survives_a_restart_during_its_call() {
    let w = World::new("batch-restart").await;
    let settings = |s: &mut Settings| s.launch_batch_window = Duration::from_secs(2);
    let controllers = w.start(w.context_with(settings));
    w.ready_pool(|_| {}).await;
    let proxy = w.ground.proxy();
    let ours = format!("{}/", w.ns);
    // EC2 acts at once and answers 8 s later: the controller is gone before it hears.
    proxy
        .add_fault(
            json!({"action": "CreateFleet", "code": "-", "delay_answer": 8,
            "count": 1, "match": {"Key": "gha:batch", "Value": ours}}),
        )
        .await;
    let names: Vec<String> = (0..3).map(|i| format!("member-{i}")).collect();
    create_together(&w, &names, 300).await;
    w.wait(|| async { pool_instances(&w).await.len() == 3 })
        .await;
    controllers.abort();
    let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
    let recorded: Vec<_> = (jobs.iter())
        .filter_map(|j| j.status.as_ref()?.launch.as_ref()?.batch.as_ref())
        .collect();
    assert_eq!(
        recorded.len(),
        3,
        "every member's record before the call: {jobs:?}"
    );
    assert!(
        recorded.iter().all(|b| b.members.len() == 3),
        "naming every member"
    );

    let _controllers = w.start(w.context_with(settings));
    w.wait(|| async {
        let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
        (jobs.iter()).all(|j| j.status.as_ref().is_some_and(|s| s.instance.is_some()))
    })
    .await;
    let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
    let mut named: Vec<String> = (jobs.iter())
        .map(|j| j.status.clone().unwrap().instance.unwrap().id)
        .collect();
    named.sort();
    named.dedup();
    assert_eq!(named.len(), 3, "each member its own instance: {jobs:?}");
    let made = pool_instances(&w).await;
    assert_eq!(made.len(), 3, "nothing launched twice: {made:?}");
    let tokens: std::collections::BTreeSet<String> = (proxy.calls_of("CreateFleet", &ours).await)
        .into_iter()
        .filter(|c| c.params.get("DryRun").is_none())
        .map(|c| {
            c.params["ClientToken"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        tokens.len(),
        1,
        "the batch, replayed under its token: {tokens:?}"
    );
}

#[tokio::test]
async fn a_burst_launches_in_batches_and_each_job_takes_its_own_instance() {
    let w = World::new("batches").await;
    let settings = |s: &mut Settings| {
        // Wide enough that the jobs created together are launchable within it.
        s.launch_batch_window = Duration::from_secs(2);
        // An instance a status names and EC2 does not list as the job's is gone this soon.
        s.job_limits.launch_visibility = Duration::from_secs(4);
    };
    let controllers = w.start(w.context_with(settings));
    w.ready_pool(|_| {}).await;
    let proxy = w.ground.proxy();
    let ours = format!("{}/", w.ns);
    let launched = |names: Vec<String>| {
        let w = &w;
        async move {
            w.wait(|| async {
                let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
                names.iter().all(|n| {
                    jobs.iter().any(|j| {
                        j.metadata.name.as_ref() == Some(n)
                            && j.status.as_ref().is_some_and(|s| s.instance.is_some())
                    })
                })
            })
            .await;
        }
    };

    // First wave: EC2 has room for three of the five instances the batch asks for. The two
    // members left without one go into the next batch.
    proxy
        .add_fault(
            json!({"action": "CreateFleet", "code": "InsufficientInstanceCapacity",
            "capacity": 3, "count": 1, "match": {"Key": "gha:batch", "Value": ours}}),
        )
        .await;
    let first: Vec<String> = (0..5).map(|i| format!("first-{i}")).collect();
    create_together(&w, &first, 100).await;
    launched(first.clone()).await;
    let fleets = |calls: Vec<support::proxy::Call>| -> Vec<(String, String, bool)> {
        (calls.into_iter())
            .filter(|c| c.params.get("DryRun").is_none())
            .map(|c| {
                let capacity = c.params["TargetCapacitySpecification.TotalTargetCapacity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let token = c.params["ClientToken"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (capacity, token, c.replayed)
            })
            .collect()
    };
    let calls = fleets(proxy.calls_of("CreateFleet", &ours).await);
    assert_eq!(calls[0].0, "5", "one call for the five: {calls:?}");
    // Those left over do not send the batch EC2 answered again: they go into a new one.
    assert!(calls.iter().all(|c| !c.2), "{calls:?}");
    let sent: Vec<_> = calls.iter().filter(|c| !c.2).collect();
    assert!(
        sent.len() <= 3,
        "the two left over go out together or alone: {calls:?}"
    );
    assert_eq!(
        sent.iter()
            .map(|c| c.0.parse::<usize>().unwrap())
            .sum::<usize>(),
        7,
        "five, then the two EC2 had no room for: {calls:?}"
    );

    // Second wave: the batch's answer is lost on the way back. Its members send it again
    // under its token, and EC2 answers with the instances it made.
    let before = proxy.calls_of("CreateFleet", &ours).await.len();
    proxy
        .add_fault(
            json!({"action": "CreateFleet", "code": "-", "lose_answer": true,
            "count": 1, "match": {"Key": "gha:batch", "Value": ours}}),
        )
        .await;
    let second: Vec<String> = (0..4).map(|i| format!("second-{i}")).collect();
    create_together(&w, &second, 200).await;
    launched(second.clone()).await;
    let calls = fleets(proxy.calls_of("CreateFleet", &ours).await.split_off(before));
    assert!(
        calls.iter().any(|c| c.2),
        "the lost answer was replayed: {calls:?}"
    );
    assert!(
        calls.iter().all(|c| c.1 == calls[0].1 && c.0 == "4"),
        "{calls:?}"
    );

    // Nine jobs, nine instances, each job its own; the instances carry the pool's tags and
    // their batch's token, and no job's.
    let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
    let mut named: Vec<String> = (jobs.iter())
        .map(|j| {
            j.status
                .as_ref()
                .unwrap()
                .instance
                .as_ref()
                .unwrap()
                .id
                .clone()
        })
        .collect();
    named.sort();
    named.dedup();
    assert_eq!(named.len(), 9, "{jobs:?}");
    let made = pool_instances(&w).await;
    assert_eq!(made.len(), 9, "nothing launched twice: {made:?}");
    for i in &made {
        assert!(named.contains(&i.id), "{i:?} is nobody's");
        assert!(i.tags.contains_key("gha:batch") && !i.tags.contains_key("gha:runner_job_uid"));
    }
    for job in &jobs {
        let launch = job.status.as_ref().unwrap().launch.as_ref().unwrap();
        assert!(launch.batch.is_some(), "{launch:?}");
    }

    // As an attacker with write access to statuses: second-1's status is made to record
    // second-0's place and instance, and a new controller (which remembers no launch) takes
    // over. second-1 ends; second-0's instance is not its to terminate, and runs on.
    controllers.abort();
    let status_of = |job: &RunnerJob| job.status.clone().unwrap();
    let victim = status_of(&w.jobs.get("second-0").await.unwrap());
    let own = status_of(&w.jobs.get("second-1").await.unwrap())
        .instance
        .unwrap()
        .id;
    w.patch_job_status(
        "second-1",
        json!({"launch": victim.launch, "instance": victim.instance}),
    )
    .await;
    let _controllers = w.start(w.context_with(settings));
    w.report("second-1", "success").await;
    w.wait(|| async { w.phase("second-1").await.is_some_and(|p| p.is_finished()) })
        .await;
    let victim_id = victim.instance.unwrap().id;
    let alive = |i: &Instance| i.id == victim_id && i.is_alive();
    assert!(
        pool_instances(&w).await.iter().any(alive),
        "second-0's instance was terminated"
    );
    assert_eq!(w.phase("second-0").await, Some(JobPhase::Booting));

    // Every job ends, and its instance with it. second-1's own instance, named by no status
    // now, is the garbage collector's once it is three minutes old.
    for name in first.iter().chain(&second) {
        w.report(name, "success").await;
    }
    for name in first.iter().chain(&second).filter(|n| *n != "second-1") {
        w.wait_phase(name, JobPhase::Succeeded).await;
    }
    w.wait(|| async {
        (pool_instances(&w).await.iter())
            .filter(|i| i.id != own)
            .all(|i| !i.is_alive())
    })
    .await;
}
