//! The AWS side of the test ground through the production SDK clients: moto's fixtures, and the
//! proxy's fault injection, call recording and Pricing answers.

mod support;

use aws_sdk_ec2::types::{
    FleetLaunchTemplateConfigRequest, FleetLaunchTemplateOverridesRequest,
    FleetLaunchTemplateSpecificationRequest, FleetType, TargetCapacitySpecificationRequest,
};
use aws_sdk_pricing::types::{Filter, FilterType};
use pacer::cloud::aws::AwsEc2;
use pacer::cloud::{Ec2 as _, ErrorClass, Instance, LaunchRequest, LaunchTemplateData};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::{Parts, ground};

#[tokio::test]
async fn fixtures_exist_in_moto() {
    let ground = ground(Parts::Aws);
    let ec2 = aws_sdk_ec2::Client::new(&ground.aws_config().await);

    let subnets = ec2
        .describe_subnets()
        .subnet_ids(ground.fixture("SUBNET_A"))
        .subnet_ids(ground.fixture("SUBNET_B"))
        .send()
        .await
        .unwrap();
    let subnets = subnets.subnets();
    assert_eq!(subnets.len(), 2);
    assert!(
        subnets
            .iter()
            .all(|s| s.vpc_id() == Some(ground.fixture("VPC")))
    );
    let mut zones: Vec<_> = subnets
        .iter()
        .filter_map(|s| s.availability_zone())
        .collect();
    zones.sort();
    assert_eq!(zones, ["us-east-1a", "us-east-1b"]);

    let groups = ec2
        .describe_security_groups()
        .group_ids(ground.fixture("SECURITY_GROUP"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        groups.security_groups()[0].vpc_id(),
        Some(ground.fixture("VPC"))
    );

    let images = ec2
        .describe_images()
        .image_ids(ground.fixture("AMI_X86_64"))
        .image_ids(ground.fixture("AMI_ARM64"))
        .send()
        .await
        .unwrap();
    let mut arches: Vec<_> = images
        .images()
        .iter()
        .filter_map(|i| i.architecture())
        .map(|a| a.as_str())
        .collect();
    arches.sort();
    assert_eq!(arches, ["arm64", "x86_64"]);

    let iam = aws_sdk_iam::Client::new(&ground.aws_config().await);
    let profile = iam
        .get_instance_profile()
        .instance_profile_name(ground.fixture("INSTANCE_PROFILE"))
        .send()
        .await;
    let profile = profile.unwrap().instance_profile.unwrap();
    assert_eq!(profile.roles().len(), 1);
}

#[tokio::test]
async fn proxy_injects_throttling_then_lets_calls_through_and_records_them() {
    let ground = ground(Parts::Aws);
    let proxy = ground.proxy();
    let config = ground
        .aws_config()
        .await
        .into_builder()
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .build();
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let marker = "throttle-test-vpc";

    proxy
        .fail("DescribeVpcs", "RequestLimitExceeded", 503, 1)
        .await;
    let err = ec2
        .describe_vpcs()
        .filters(vpc_filter(marker))
        .send()
        .await
        .unwrap_err();
    let err = err.into_service_error();
    assert_eq!(
        aws_sdk_ec2::error::ProvideErrorMetadata::code(&err),
        Some("RequestLimitExceeded")
    );

    ec2.describe_vpcs()
        .filters(vpc_filter(marker))
        .send()
        .await
        .expect("the fault was used up");

    let calls = proxy.calls_of("DescribeVpcs", marker).await;
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        [503, 200]
    );
    assert_eq!(calls[0].service, "ec2");
    assert_eq!(calls[0].params["Filter.1.Value.1"], marker);
}

fn vpc_filter(value: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name("tag:Name")
        .values(value)
        .build()
}

#[tokio::test]
async fn proxy_answers_create_fleet_with_capacity_errors() {
    let ground = ground(Parts::Aws);
    let proxy = ground.proxy();
    let ec2 = aws_sdk_ec2::Client::new(&ground.aws_config().await);
    proxy
        .add_fault(serde_json::json!({
            "action": "CreateFleet", "code": "InsufficientInstanceCapacity", "fleet_error": true,
            "match": {"InstanceType": "m7i.large"},
        }))
        .await;

    let out = ec2
        .create_fleet()
        .r#type(FleetType::Instant)
        .target_capacity_specification(
            TargetCapacitySpecificationRequest::builder()
                .total_target_capacity(1)
                .build(),
        )
        .launch_template_configs(
            FleetLaunchTemplateConfigRequest::builder()
                .launch_template_specification(
                    FleetLaunchTemplateSpecificationRequest::builder()
                        .launch_template_id("lt-0a1b2c3d4e5f60001")
                        .version("1")
                        .build(),
                )
                .overrides(
                    FleetLaunchTemplateOverridesRequest::builder()
                        .instance_type("m7i.large".into())
                        .subnet_id(ground.fixture("SUBNET_A"))
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(out.instances().is_empty());
    let errors = out.errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].error_code(), Some("InsufficientInstanceCapacity"));
    let overrides = errors[0]
        .launch_template_and_overrides()
        .and_then(|l| l.overrides())
        .unwrap();
    assert_eq!(
        overrides.instance_type().map(|t| t.as_str()),
        Some("m7i.large")
    );
}

/// EBS storage prices per GB-month, as the Pricing API lists them (productFamily `Storage`,
/// by `volumeApiName`), through the adapter.
#[tokio::test]
async fn the_adapter_reads_ebs_volume_prices() {
    let ground = ground(Parts::Aws);
    let ec2 = AwsEc2::new(&ground.aws_config().await);
    let price = |volume: &'static str| {
        let ec2 = &ec2;
        async move { ec2.volume_price(volume).await.unwrap() }
    };
    assert_eq!(price("gp3").await.as_deref(), Some("0.0800000000"));
    assert_eq!(price("gp2").await.as_deref(), Some("0.1000000000"));
    assert_eq!(price("tape").await, None);
}

#[tokio::test]
async fn proxy_serves_on_demand_prices() {
    let ground = ground(Parts::Aws);
    let pricing = aws_sdk_pricing::Client::new(&ground.aws_config().await);
    let filter = |field: &str, value: &str| {
        Filter::builder()
            .r#type(FilterType::TermMatch)
            .field(field)
            .value(value)
            .build()
            .unwrap()
    };
    let out = pricing
        .get_products()
        .service_code("AmazonEC2")
        .filters(filter("instanceType", "m6i.large"))
        .filters(filter("regionCode", "us-east-1"))
        .filters(filter("operatingSystem", "Linux"))
        .send()
        .await
        .unwrap();
    let product: serde_json::Value = serde_json::from_str(&out.price_list()[0]).unwrap();
    let on_demand = product["terms"]["OnDemand"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    let dimension = on_demand["priceDimensions"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    assert_eq!(dimension["pricePerUnit"]["USD"], "0.0960000000");

    let denied = ground.proxy();
    denied
        .fail("GetProducts", "AccessDeniedException", 400, 1)
        .await;
    let err = pricing
        .get_products()
        .service_code("AmazonEC2")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        aws_sdk_pricing::error::ProvideErrorMetadata::code(&err.into_service_error()),
        Some("AccessDeniedException")
    );
}

#[tokio::test]
async fn ec2_adapter_launches_tagged_instances_finds_them_and_terminates_them() {
    use pacer::cloud::{Ec2, ErrorClass, LaunchRequest, LaunchTemplateData, aws::AwsEc2};
    use std::collections::BTreeMap;

    let ground = ground(Parts::Aws);
    let ec2 = AwsEc2::new(&ground.aws_config().await);
    let controller = "adapter-test";
    let ours = BTreeMap::from([
        ("gha:managed-by".to_string(), "pacer".to_string()),
        ("gha:controller".to_string(), controller.to_string()),
    ]);
    let data = LaunchTemplateData {
        image_id: ground.fixture("AMI_X86_64").into(),
        security_group_ids: vec![ground.fixture("SECURITY_GROUP").into()],
        instance_profile: None,
        root_volume: None,
        spot: false,
        user_data: String::new(),
        tags: ours.clone(),
        metadata_hop_limit: 1,
    };
    let template = ec2
        .create_launch_template("pacer/adapter-test/ns/pool", "test", &data, &ours)
        .await
        .unwrap();
    let request = |fleet: bool, uid: &str| {
        let mut tags = ours.clone();
        tags.insert("gha:runner_job_uid".into(), uid.into());
        LaunchRequest {
            launch_template_id: template.id.clone(),
            version: 1,
            offerings: vec![("m6i.large".into(), ground.fixture("SUBNET_B").into())],
            spot: false,
            fleet,
            tags,
            allocation_strategy: None,
            client_token: Some(format!("token-{uid}")),
            count: 1,
        }
    };
    let by_fleet = ec2.launch(&request(true, "uid-fleet")).await.unwrap();
    let by_run = ec2.launch(&request(false, "uid-run")).await.unwrap();
    assert_eq!(
        (by_fleet.instances.len(), by_run.instances.len()),
        (1, 1),
        "{by_fleet:?} {by_run:?}"
    );

    let found: Vec<_> = ec2
        .describe_managed_instances(controller)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.is_alive())
        .collect();
    let mut uids: Vec<_> = found
        .iter()
        .map(|i| i.tags["gha:runner_job_uid"].as_str())
        .collect();
    uids.sort();
    assert_eq!(uids, ["uid-fleet", "uid-run"]);
    assert!(
        found
            .iter()
            .all(|i| i.zone == "us-east-1b" && i.instance_type == "m6i.large"),
        "{found:?}"
    );
    assert!(
        ec2.describe_managed_instances("another-controller")
            .await
            .unwrap()
            .is_empty()
    );

    // The tags were in the launch requests themselves.
    for (action, uid) in [("CreateFleet", "uid-fleet"), ("RunInstances", "uid-run")] {
        let calls = ground.proxy().calls_of(action, uid).await;
        assert!(
            calls[0].params.to_string().contains("gha:managed-by"),
            "{action}: {:?}",
            calls[0].params
        );
    }

    let ids: Vec<String> = found.iter().map(|i| i.id.clone()).collect();
    ec2.terminate_instances(&ids).await.unwrap();
    let after = ec2.describe_managed_instances(controller).await.unwrap();
    assert_eq!(
        after.len(),
        2,
        "terminated instances stay listed for a while"
    );
    assert!(after.iter().all(|i| !i.is_alive()), "{after:?}");
    ec2.terminate_instances(&ids)
        .await
        .expect("terminating twice is fine");

    // A fleet without capacity answers with errors, not an instance.
    ground
        .proxy()
        .add_fault(
            serde_json::json!({"action": "CreateFleet", "code": "InsufficientInstanceCapacity",
            "fleet_error": true, "match": {"ClientToken": "token-no-capacity"}}),
        )
        .await;
    let none = ec2.launch(&request(true, "no-capacity")).await.unwrap();
    assert!(none.instances.is_empty());
    assert_eq!(
        none.failures[0].error.class,
        ErrorClass::InsufficientCapacity
    );
    assert_eq!(none.failures[0].instance_type.as_deref(), Some("m6i.large"));

    // The proxy keeps ClientTokens as EC2 does. The fault is spent, yet the same request
    // under the same token gets the first (empty) answer back.
    let again = ec2.launch(&request(true, "no-capacity")).await.unwrap();
    assert_eq!(again, none);
    // The same launch again returns the same instance and launches nothing new.
    let replay = ec2.launch(&request(true, "uid-fleet")).await.unwrap();
    assert_eq!(replay.instances[0].id, by_fleet.instances[0].id);
    let replay = ec2.launch(&request(false, "uid-run")).await.unwrap();
    assert_eq!(replay.instances[0].id, by_run.instances[0].id);
    assert_eq!(
        ec2.describe_managed_instances(controller)
            .await
            .unwrap()
            .len(),
        2
    );
    let calls = ground.proxy().calls_of("RunInstances", "uid-run").await;
    assert_eq!(
        calls.iter().map(|c| c.replayed).collect::<Vec<_>>(),
        [false, true]
    );
    // The same token with other parameters is refused, and classified.
    let mut other = request(true, "no-capacity");
    other.spot = true;
    let err = ec2.launch(&other).await.unwrap_err();
    assert_eq!(
        (err.code.as_str(), err.class),
        ("IdempotentParameterMismatch", ErrorClass::InvalidInput)
    );

    // A batch: one call, several instances, all with the request's tags. CreateFleet asks for
    // a total target capacity, RunInstances for at most that many (at least one).
    for (fleet, count) in [(true, 3), (false, 2)] {
        let mut batch = request(fleet, &format!("batch-{fleet}"));
        batch.count = count;
        let made = ec2.launch(&batch).await.unwrap();
        assert_eq!(made.instances.len(), count as usize, "{made:?}");
        let mut ids: Vec<_> = made.instances.iter().map(|i| i.id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), count as usize);
        let listed = ec2.describe_managed_instances(controller).await.unwrap();
        for id in &ids {
            let tags = &listed.iter().find(|i| &i.id == id).unwrap().tags;
            assert_eq!(
                tags.get("gha:runner_job_uid"),
                batch.tags.get("gha:runner_job_uid")
            );
        }
        // Sent again under its token: the same instances, none new.
        let again = ec2.launch(&batch).await.unwrap();
        assert_eq!(again.instances.len(), count as usize);
        assert!(
            again.instances.iter().all(|i| ids.contains(&i.id)),
            "{again:?}"
        );
    }
    let capacity = |c: &support::proxy::Call| {
        c.params["TargetCapacitySpecification.TotalTargetCapacity"].clone()
    };
    let fleet = ground.proxy().calls_of("CreateFleet", "batch-true").await;
    assert_eq!(capacity(&fleet[0]), "3");
    let run = ground.proxy().calls_of("RunInstances", "batch-false").await;
    assert_eq!(
        (
            run[0].params["MinCount"].clone(),
            run[0].params["MaxCount"].clone()
        ),
        ("1".into(), "2".into())
    );

    // Short of capacity, an instant fleet launches what it can and says why not the rest.
    ground
        .proxy()
        .add_fault(
            serde_json::json!({"action": "CreateFleet", "code": "InsufficientInstanceCapacity",
            "capacity": 2, "match": {"ClientToken": "token-short"}}),
        )
        .await;
    let mut short = request(true, "short");
    short.count = 4;
    let part = ec2.launch(&short).await.unwrap();
    assert_eq!(part.instances.len(), 2, "{part:?}");
    assert_eq!(
        part.failures[0].error.class,
        ErrorClass::InsufficientCapacity
    );
    assert_eq!(ec2.launch(&short).await.unwrap(), part, "replayed whole");
}

// Each proxy fault, driven through the production EC2 adapter: every test below fails when its
// fault stops firing. The faults are scoped by `match` to the test's own requests, since the
// tests of this binary share one proxy.

/// One test's launches: a launch template of its own, and RunInstances requests tagged with
/// the test's controller id, so that no other test's listing sees its instances.
struct Launcher {
    ec2: AwsEc2,
    controller: String,
    template: String,
    subnet: String,
}

impl Launcher {
    /// Launches through `ec2` (the adapter under test, as its SDK configuration makes it).
    async fn new(ec2: AwsEc2, controller: &str) -> Self {
        let ground = ground(Parts::Aws);
        let ours = Self::ours(controller);
        let data = LaunchTemplateData {
            image_id: ground.fixture("AMI_X86_64").into(),
            security_group_ids: vec![ground.fixture("SECURITY_GROUP").into()],
            instance_profile: None,
            root_volume: None,
            spot: false,
            user_data: String::new(),
            tags: ours.clone(),
            metadata_hop_limit: 1,
        };
        let setup = AwsEc2::new(&ground.aws_config().await);
        let template = setup
            .create_launch_template(&format!("pacer/{controller}/ns/pool"), "test", &data, &ours)
            .await
            .unwrap();
        Self {
            ec2,
            controller: controller.into(),
            template: template.id,
            subnet: ground.fixture("SUBNET_A").into(),
        }
    }

    fn ours(controller: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("gha:managed-by".to_string(), "pacer".to_string()),
            ("gha:controller".to_string(), controller.to_string()),
        ])
    }

    /// A RunInstances launch for the job of `uid` (a value unique to the test), under the
    /// token `token-{uid}`.
    fn request(&self, uid: &str) -> LaunchRequest {
        let mut tags = Self::ours(&self.controller);
        tags.insert("gha:runner_job_uid".into(), uid.into());
        LaunchRequest {
            launch_template_id: self.template.clone(),
            version: 1,
            offerings: vec![("m6i.large".into(), self.subnet.clone())],
            spot: false,
            fleet: false,
            tags,
            allocation_strategy: None,
            client_token: Some(format!("token-{uid}")),
            count: 1,
        }
    }

    /// The test's instances as the adapter lists them, terminated ones included.
    async fn listed(&self) -> Vec<Instance> {
        self.ec2
            .describe_managed_instances(&self.controller)
            .await
            .unwrap()
    }

    /// The listed instances launched for `uid`.
    async fn listed_for(&self, uid: &str) -> Vec<Instance> {
        let mut all = self.listed().await;
        all.retain(|i| i.tags.get("gha:runner_job_uid").map(String::as_str) == Some(uid));
        all
    }
}

/// The adapter as production builds it, pointed at the proxy, with the SDK's retries off so
/// that each injected answer reaches it rather than a retry's.
async fn adapter_without_retries() -> AwsEc2 {
    let config = ground(Parts::Aws).aws_config().await.into_builder();
    AwsEc2::new(
        &config
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .build(),
    )
}

/// Polls the listing until the instance of `uid` is in `state`; returns it.
async fn until_state(launcher: &Launcher, uid: &str, state: &str) -> Instance {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = launcher.listed_for(uid).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        if listed[0].state == state {
            return listed.into_iter().next().unwrap();
        }
        assert!(Instant::now() < deadline, "never {state}: {:?}", listed[0]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn ec2_adapter_stops_a_warm_instance_lists_it_stopped_and_starts_it_again() {
    let ground = ground(Parts::Aws);
    let launcher = Launcher::new(adapter_without_retries().await, "warm-adapter-test").await;
    let mut request = launcher.request("uid-warm");
    let warm = pacer::cloud::tags::warm_value(&launcher.template, 1);
    (request.tags).insert(pacer::cloud::tags::WARM.into(), warm.clone());
    let launched = launcher.ec2.launch(&request).await.unwrap();
    assert_eq!(launched.instances.len(), 1, "{launched:?}");
    let ids = [launched.instances[0].id.clone()];
    let running = until_state(&launcher, "uid-warm", "running").await;
    assert_eq!(running.tags[pacer::cloud::tags::WARM], warm);

    launcher.ec2.stop_instances(&ids).await.unwrap();
    let stopped = until_state(&launcher, "uid-warm", "stopped").await;
    assert!(stopped.is_stopped() && !stopped.is_alive());
    // Stopping a stopped instance changes nothing and is no error, as on EC2.
    launcher.ec2.stop_instances(&ids).await.unwrap();

    launcher.ec2.start_instances(&ids).await.unwrap();
    let started = until_state(&launcher, "uid-warm", "running").await;
    assert_eq!(started.tags, stopped.tags, "no tag changed on the way");

    // Both calls went out as Pacer's, naming an instance the proxy knows our tags of: what
    // the IAM simulation replays against StopAndStartOnlyOurWarmInstances, which asks for
    // gha:warm too.
    for action in ["StopInstances", "StartInstances"] {
        let calls = ground.proxy().calls_of(action, &ids[0]).await;
        assert!(!calls.is_empty(), "{action} not recorded");
        let tags = &calls[0].resource_tags[&ids[0]];
        assert_eq!(
            (
                tags["gha:managed-by"].as_str(),
                tags["gha:controller"].as_str()
            ),
            ("pacer", "warm-adapter-test"),
            "{action}: {calls:?}"
        );
        assert_eq!(tags["gha:warm"].as_str(), warm.as_str(), "{action}");
        assert!(calls.iter().all(|c| c.agent == "pacer" && c.status == 200));
    }

    launcher.ec2.terminate_instances(&ids).await.unwrap();
}

#[tokio::test]
async fn error_faults_reach_the_adapter_for_their_count_with_their_code_and_status_then_stop() {
    let ground = ground(Parts::Aws);
    let proxy = ground.proxy();
    let controller = "fault-errors";
    let l = Launcher::new(adapter_without_retries().await, controller).await;
    let cases = [
        (
            "RunInstances",
            "InsufficientInstanceCapacity",
            400,
            ErrorClass::InsufficientCapacity,
        ),
        (
            "RunInstances",
            "RequestLimitExceeded",
            503,
            ErrorClass::Throttled,
        ),
        (
            "DescribeInstances",
            "InternalError",
            500,
            ErrorClass::Throttled,
        ),
    ];
    for (n, (action, code, status, class)) in cases.into_iter().enumerate() {
        // A launch of its own per case: a token EC2 answered once is replayed, not faulted.
        let uid = format!("{controller}-{n}");
        // A launch's tag values, or a listing's filter values (`Filter.N.Value.1`).
        let (key, wanted) = if action == "RunInstances" {
            ("Value", uid.as_str())
        } else {
            ("Value.1", controller)
        };
        proxy
            .add_fault(
                serde_json::json!({"action": action, "code": code, "status": status,
                "count": 2, "match": {key: wanted}}),
            )
            .await;
        let call = || async {
            if action == "RunInstances" {
                l.ec2.launch(&l.request(&uid)).await.map(|_| ())
            } else {
                l.ec2
                    .describe_managed_instances(controller)
                    .await
                    .map(|_| ())
            }
        };
        for _ in 0..2 {
            let err = call().await.expect_err(code);
            assert_eq!((err.code.as_str(), err.class), (code, class), "{err:?}");
        }
        call().await.expect("the fault is spent after its count");
        // The proxy records a call once its answer is sent: the last may land a moment later.
        let mut calls = proxy.calls_of(action, wanted).await;
        for _ in 0..40 {
            if calls.last().is_some_and(|c| c.status == 200) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            calls = proxy.calls_of(action, wanted).await;
        }
        let statuses: Vec<u16> = calls.iter().rev().take(3).rev().map(|c| c.status).collect();
        assert_eq!(statuses, [status, status, 200], "{action} {code}");
    }
    assert_eq!(
        l.listed().await.len(),
        2,
        "one instance per launch that got through"
    );
}

#[tokio::test]
async fn a_matched_fault_fails_only_the_requests_it_matches() {
    let l = Launcher::new(adapter_without_retries().await, "fault-match").await;
    let proxy = ground(Parts::Aws).proxy();
    proxy
        .add_fault(serde_json::json!({"action": "RunInstances",
            "code": "InsufficientInstanceCapacity", "count": -1,
            "match": {"Value": "fault-match-chosen"}}))
        .await;
    let other = l.ec2.launch(&l.request("fault-match-other")).await;
    assert_eq!(other.expect("not matched").instances.len(), 1);
    for _ in 0..2 {
        let err = l
            .ec2
            .launch(&l.request("fault-match-chosen"))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::InsufficientCapacity, "{err:?}");
    }
    assert!(l.listed_for("fault-match-chosen").await.is_empty());
    let statuses =
        |calls: Vec<support::proxy::Call>| -> Vec<u16> { calls.iter().map(|c| c.status).collect() };
    assert_eq!(
        statuses(proxy.calls_of("RunInstances", "fault-match-other").await),
        [200]
    );
    assert_eq!(
        statuses(proxy.calls_of("RunInstances", "fault-match-chosen").await),
        [400, 400]
    );
}

#[tokio::test]
async fn a_late_launch_answer_takes_its_delay_and_its_token_replays_the_instance() {
    let ground = ground(Parts::Aws);
    let proxy = ground.proxy();
    let l = Launcher::new(AwsEc2::new(&ground.aws_config().await), "fault-late").await;
    let late = |uid: &str, seconds: u64| {
        serde_json::json!({"action": "RunInstances", "code": "-", "delay_answer": seconds,
            "match": {"Value": uid}})
    };

    // A caller that waits hears of the instance, the delay later.
    proxy.add_fault(late("fault-late-waited", 3)).await;
    let started = Instant::now();
    let waited = l.ec2.launch(&l.request("fault-late-waited")).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "answered in {:?}",
        started.elapsed()
    );
    assert_eq!(waited.instances.len(), 1);

    // A caller that gives up first hears nothing, yet EC2 launched, and kept the token: the
    // same request again is answered with that instance, and launches no other.
    let config = ground.aws_config().await.into_builder();
    let impatient = AwsEc2::new(
        &config
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(Duration::from_secs(1))
                    .build(),
            )
            .build(),
    );
    proxy.add_fault(late("fault-late-gave-up", 5)).await;
    let request = l.request("fault-late-gave-up");
    let err = impatient.launch(&request).await.unwrap_err();
    assert_eq!(err.code, "Transport", "{err:?}");
    let launched = l.listed_for("fault-late-gave-up").await;
    assert_eq!(launched.len(), 1, "EC2 acted before it answered");
    let replay = l.ec2.launch(&request).await.unwrap();
    assert_eq!(replay.instances[0].id, launched[0].id);
    assert_eq!(l.listed_for("fault-late-gave-up").await.len(), 1);
    let calls = proxy.calls_of("RunInstances", "fault-late-gave-up").await;
    assert!(calls.iter().any(|c| c.replayed), "{calls:?}");
}

#[tokio::test]
async fn a_lost_launch_answer_is_a_transport_error_and_its_replay_makes_no_second_instance() {
    let ground = ground(Parts::Aws);
    let proxy = ground.proxy();
    let l = Launcher::new(adapter_without_retries().await, "fault-lost").await;
    proxy
        .add_fault(serde_json::json!({"action": "RunInstances", "code": "-",
            "lose_answer": true, "match": {"Value": "fault-lost-one"}}))
        .await;
    let request = l.request("fault-lost-one");
    let err = l.ec2.launch(&request).await.unwrap_err();
    assert_eq!(err.code, "Transport", "{err:?}");
    let launched = l.listed_for("fault-lost-one").await;
    assert_eq!(launched.len(), 1, "the call went through");

    let replay = l.ec2.launch(&request).await.unwrap();
    assert_eq!(replay.instances[0].id, launched[0].id);
    assert_eq!(l.listed_for("fault-lost-one").await.len(), 1);
    let calls = proxy.calls_of("RunInstances", "fault-lost-one").await;
    assert_eq!(
        calls
            .iter()
            .map(|c| (c.status, c.replayed))
            .collect::<Vec<_>>(),
        [(0, false), (200, true)]
    );
}

#[tokio::test]
async fn describe_lag_hides_a_new_instance_from_the_adapter_then_lists_it() {
    let ground = ground(Parts::Aws);
    let proxy = ground.proxy();
    let l = Launcher::new(AwsEc2::new(&ground.aws_config().await), "fault-lag").await;
    proxy.describe_lag(4.0, "fault-lag-one").await;
    let hidden_before = proxy.hidden_by_lag().await;
    let started = Instant::now();
    let launched = l.ec2.launch(&l.request("fault-lag-one")).await.unwrap();
    assert_eq!(
        launched.instances.len(),
        1,
        "the launch answer is not lagged"
    );
    assert!(
        l.listed_for("fault-lag-one").await.is_empty(),
        "listed at once"
    );
    assert!(proxy.hidden_by_lag().await > hidden_before);
    loop {
        if !l.listed_for("fault-lag-one").await.is_empty() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Launch times have whole seconds: a 4 s lag hides an instance 3 s at least.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "listed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_spot_reclaim_reaches_the_adapter_as_the_instance_state_reason() {
    let ground = ground(Parts::Aws);
    let controller = "fault-reclaim";
    let l = Launcher::new(AwsEc2::new(&ground.aws_config().await), controller).await;
    let mut ids = Vec::new();
    for uid in ["fault-reclaim-reclaimed", "fault-reclaim-terminated"] {
        let out = l.ec2.launch(&l.request(uid)).await.unwrap();
        ids.push(out.instances[0].id.clone());
    }
    l.ec2.terminate_instances(&ids).await.unwrap();
    ground.proxy().spot_reclaimed(&ids[0]).await;
    let reason = |id: &str, listed: &[Instance]| {
        let instance = listed.iter().find(|i| i.id == id).unwrap();
        assert!(!instance.is_alive(), "{instance:?}");
        instance.state_reason.clone().unwrap_or_default()
    };
    let listed = l.listed().await;
    assert!(
        reason(&ids[0], &listed).starts_with("Server.SpotInstanceTermination"),
        "{listed:?}"
    );
    assert!(
        !reason(&ids[1], &listed).contains("Spot"),
        "only the instance EC2 reclaimed: {listed:?}"
    );
    let (one, _) = l
        .ec2
        .managed_instance(controller, &ids[0])
        .await
        .unwrap()
        .unwrap();
    assert!(
        (one.state_reason.as_deref())
            .is_some_and(|r| r.starts_with("Server.SpotInstanceTermination")),
        "{one:?}"
    );
}

#[tokio::test]
async fn the_adapter_reads_spot_prices_from_the_proxy_table() {
    let ground = ground(Parts::Aws);
    let ec2 = AwsEc2::new(&ground.aws_config().await);
    let before = ec2.spot_price("c6g.large", "us-east-1b").await.unwrap();
    assert_ne!(before.as_deref(), Some("0.012345"));
    ground
        .proxy()
        .set_spot_prices(serde_json::json!({"c6g.large": {"us-east-1b": "0.012345"}}))
        .await;
    let price = ec2.spot_price("c6g.large", "us-east-1b").await.unwrap();
    assert_eq!(price.as_deref(), Some("0.012345"));
}
