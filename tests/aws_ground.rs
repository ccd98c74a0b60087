//! The AWS side of the test ground through the production SDK clients: moto's fixtures, and the
//! proxy's fault injection, call recording and Pricing answers.

mod support;

use aws_sdk_ec2::types::{
    FleetLaunchTemplateConfigRequest, FleetLaunchTemplateOverridesRequest,
    FleetLaunchTemplateSpecificationRequest, FleetType, TargetCapacitySpecificationRequest,
};
use aws_sdk_pricing::types::{Filter, FilterType};
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
}
