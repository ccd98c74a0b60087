//! The RunnerPool reconciler against a real kube-apiserver and moto behind the AWS proxy.

mod support;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::{LaunchTemplateHttpTokensState, ShutdownBehavior};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use pacer::api::RunnerPool;
use pacer::cloud::aws::AwsEc2;
use pacer::controller::{self, Context, Settings};
use serde_json::{Value, json};
use support::{Ground, Parts, ground};

const CONTROLLER_ID: &str = "pool-tests";

/// One test's world: its namespace, a running pool controller scoped to it, and clients.
struct World {
    ground: &'static Ground,
    ns: String,
    pools: Api<RunnerPool>,
    client: kube::Client,
    ec2: aws_sdk_ec2::Client,
    _controller: tokio::task::JoinHandle<()>,
}

impl World {
    async fn new(test: &str) -> Self {
        Self::with_tenants(test, |_| Default::default()).await
    }

    /// A world whose Pacer has the `tenants` `tenants_of(namespace)` gives.
    async fn with_tenants(
        test: &str,
        tenants_of: impl FnOnce(&str) -> pacer::domain::tenancy::Tenancy,
    ) -> Self {
        let ground = ground(Parts::Both);
        let client = ground.kube_client().await;
        let ns = ground.namespace(&client, test).await;
        let aws = ground.aws_config().await;
        let settings = Settings {
            resync: Duration::from_secs(2),
            backoff_unit: Duration::from_millis(200),
            tenancy: tenants_of(&ns),
            ..Settings::new(CONTROLLER_ID, "https://pacer.example.test")
        };
        let ctx = Arc::new(Context::new(
            client.clone(),
            Arc::new(AwsEc2::new(&aws)),
            settings,
        ));
        let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
        let controller = tokio::spawn(controller::run(
            ctx,
            pools.clone(),
            Api::namespaced(client.clone(), &ns),
        ));
        Self {
            ground,
            ns,
            pools,
            client,
            ec2: aws_sdk_ec2::Client::new(&aws),
            _controller: controller,
        }
    }

    /// The example pool, pointed at the ground's fixtures.
    fn pool(&self, name: &str) -> Value {
        self.ground.example_pool(&self.ns, name)
    }

    async fn create(&self, pool: Value) -> String {
        let pool: RunnerPool = serde_json::from_value(pool).unwrap();
        self.pools
            .create(&PostParams::default(), &pool)
            .await
            .unwrap()
            .metadata
            .name
            .unwrap()
    }

    async fn patch_spec(&self, name: &str, spec: Value) {
        self.pools
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    /// Waits until condition `type_` has `status` and `reason` on the current generation.
    async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> RunnerPool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let pool = self.pools.get(name).await.unwrap();
            let current = pool.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == type_ && c.observed_generation == pool.metadata.generation)
            });
            if let Some(c) = current
                && c.status == status
                && c.reason == reason
            {
                return pool;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: {type_} never became {status}/{reason}; last: {current:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn template_name(&self, pool: &str) -> String {
        format!("pacer/{CONTROLLER_ID}/{}/{pool}", self.ns)
    }

    async fn template(&self, pool: &str) -> Option<aws_sdk_ec2::types::LaunchTemplate> {
        let out = self
            .ec2
            .describe_launch_templates()
            .launch_template_names(self.template_name(pool))
            .send()
            .await;
        out.ok().and_then(|o| o.launch_templates().first().cloned())
    }

    async fn events(&self, reason: &str) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }
}

#[tokio::test]
async fn a_valid_pool_gets_a_tagged_launch_template_and_becomes_ready() {
    let w = World::new("valid-pool").await;
    let name = w.create(w.pool("linux")).await;
    w.wait_condition(&name, "Validated", "True", "Validated")
        .await;
    w.wait_condition(&name, "LaunchPermitted", "True", "DryRunSucceeded")
        .await;
    let pool = w.wait_condition(&name, "Ready", "True", "Ready").await;

    let template = w.template(&name).await.expect("launch template exists");
    let status = pool.status.unwrap();
    assert_eq!(
        status.launch_template.as_ref().unwrap().id,
        template.launch_template_id().unwrap()
    );
    assert!(status.spec_hash.is_some());
    let tags: std::collections::HashMap<_, _> = template
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect();
    assert_eq!(tags["gha:managed-by"], "pacer");
    assert_eq!(tags["gha:controller"], CONTROLLER_ID);
    assert_eq!(tags["gha:pool"], format!("{}/{name}", w.ns));

    let versions = w
        .ec2
        .describe_launch_template_versions()
        .launch_template_id(template.launch_template_id().unwrap())
        .versions("$Default")
        .send()
        .await
        .unwrap();
    let data = versions.launch_template_versions()[0]
        .launch_template_data()
        .unwrap();
    assert_eq!(data.image_id(), Some(w.ground.fixture("AMI_X86_64")));
    assert_eq!(
        data.security_group_ids(),
        [w.ground.fixture("SECURITY_GROUP")]
    );
    let metadata = data.metadata_options().unwrap();
    assert_eq!(
        metadata.http_tokens(),
        Some(&LaunchTemplateHttpTokensState::Required)
    );
    // Only the instance itself reaches its metadata: a job's containers cannot read the
    // instance profile's credentials.
    assert_eq!(metadata.http_put_response_hop_limit(), Some(1));
    assert_eq!(
        data.instance_initiated_shutdown_behavior(),
        Some(&ShutdownBehavior::Terminate)
    );
    let ebs = data.block_device_mappings()[0].ebs().unwrap();
    assert_eq!(
        (
            ebs.volume_size(),
            ebs.encrypted(),
            ebs.delete_on_termination()
        ),
        (Some(40), Some(true), Some(true))
    );
    assert_eq!(ebs.volume_type().map(|t| t.as_str()), Some("gp3"));
    assert_eq!(ebs.throughput(), Some(250));
    assert!(
        data.instance_market_options().is_none(),
        "fleet pools leave the market to CreateFleet"
    );
    // moto also lists the template's own tags here; real EC2 does not.
    let tag_specs: Vec<_> = data
        .tag_specifications()
        .iter()
        .filter(|t| {
            t.resource_type()
                .is_some_and(|r| ["instance", "volume"].contains(&r.as_str()))
        })
        .collect();
    assert_eq!(tag_specs.len(), 2);
    for spec in tag_specs {
        let tags: Vec<_> = spec
            .tags()
            .iter()
            .map(|t| (t.key().unwrap(), t.value().unwrap()))
            .collect();
        assert!(
            tags.contains(&("gha:managed-by", "pacer")) && tags.contains(&("team", "platform")),
            "{tags:?}"
        );
    }
    use base64::Engine as _;
    let user_data = base64::engine::general_purpose::STANDARD
        .decode(data.user_data().unwrap())
        .unwrap();
    let user_data = String::from_utf8(user_data).unwrap();
    assert!(
        user_data.starts_with("#!/bin/bash")
            && user_data.contains("PACER_URL='https://pacer.example.test'")
    );

    // Every mutating call carried our tag in the request or targeted a template carrying it.
    let calls = w.ground.proxy().calls().await;
    let ours: Vec<_> = calls
        .iter()
        .filter(|c| {
            c.params.to_string().contains(&w.template_name(&name))
                || c.params
                    .to_string()
                    .contains(template.launch_template_id().unwrap())
        })
        .collect();
    let mutating: Vec<_> = ours
        .iter()
        .filter(|c| {
            ["Create", "Modify", "Delete", "Run"]
                .iter()
                .any(|p| c.action.starts_with(p))
        })
        .collect();
    assert!(mutating.iter().any(|c| c.action == "CreateLaunchTemplate"));
    assert!(
        mutating
            .iter()
            .any(|c| c.action == "CreateFleet" && c.params["DryRun"] == "true")
    );
    for call in mutating {
        let text = call.params.to_string();
        let tagged = text.contains("\"gha:managed-by\"") && text.contains("\"pacer\"");
        let targets_ours =
            call.params["LaunchTemplateId"] == *template.launch_template_id().unwrap();
        assert!(
            tagged || targets_ours,
            "{} without our tag: {text}",
            call.action
        );
    }
}

#[tokio::test]
async fn each_bad_input_has_its_reason_and_fixing_it_clears_it() {
    let w = World::new("bad-inputs").await;
    let name = w.create(w.pool("linux")).await;
    w.wait_condition(&name, "Ready", "True", "Ready").await;
    let g = w.ground;
    let cases = [
        ("AmiNotFound", json!({"ami": "ami-0000000000000dead"})),
        (
            "ArchitectureMismatch",
            json!({"ami": g.fixture("AMI_ARM64")}),
        ),
        ("RootVolumeTooSmall", json!({"rootVolume": {"sizeGiB": 4}})),
        (
            "InstanceTypeNotFound",
            json!({"instanceTypes": ["m7i.huge"]}),
        ),
        (
            "SubnetNotFound",
            json!({"subnets": ["subnet-0000000000000dead"]}),
        ),
        (
            "SubnetsSpanVpcs",
            json!({"subnets": [g.fixture("SUBNET_A"), g.fixture("OTHER_SUBNET")]}),
        ),
        (
            "SecurityGroupNotFound",
            json!({"securityGroups": ["sg-0000000000000dead"]}),
        ),
        (
            "SecurityGroupNotInVpc",
            json!({"securityGroups": [g.fixture("OTHER_SECURITY_GROUP")]}),
        ),
        (
            "InstanceProfileNotFound",
            json!({"instanceProfile": "no-such-profile"}),
        ),
        (
            "InstanceProfileHasNoRole",
            json!({"instanceProfile": g.fixture("EMPTY_INSTANCE_PROFILE")}),
        ),
    ];
    let good = w.pool("linux")["spec"].clone();
    for (reason, bad) in cases {
        w.patch_spec(&name, bad).await;
        let pool = w.wait_condition(&name, "Validated", "False", reason).await;
        let c = pool
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reason));
        let mut fix = good.clone();
        fix["instanceProfile"] = Value::Null; // a merge patch removes it
        w.patch_spec(&name, fix).await;
        w.wait_condition(&name, "Ready", "True", "Ready").await;
    }
    assert!(
        !w.events("AmiNotFound").await.is_empty(),
        "an Event says why the pool is invalid"
    );
}

/// A pool whose namespace may not serve the owner it names is not valid, and says which field.
#[tokio::test]
async fn a_pool_naming_an_owner_its_namespace_may_not_serve_is_not_validated() {
    use pacer::domain::tenancy::{Tenancy, Tenant};
    let w = World::with_tenants("tenants", |ns| {
        let tenant = Tenant {
            owners: vec!["another-org".into()],
            repositories: vec![],
        };
        Tenancy::new([(ns.to_string(), tenant)].into())
    })
    .await;
    let name = w.create(w.pool("linux")).await;
    let pool = w
        .wait_condition(&name, "Validated", "False", "TenantNotPermitted")
        .await;
    let conditions = pool.status.unwrap().conditions;
    let validated = conditions.iter().find(|c| c.type_ == "Validated").unwrap();
    assert!(
        validated.message.contains("spec.github.owner")
            && validated.message.contains("another-org"),
        "{}",
        validated.message
    );
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False")
    );
    assert!(w.template(&name).await.is_none(), "no launch template");
    // The namespace's own owner is served.
    w.patch_spec(&name, json!({"github": {"owner": "another-org"}}))
        .await;
    w.wait_condition(&name, "Ready", "True", "Ready").await;
}

#[tokio::test]
async fn only_launch_inputs_make_a_new_template_version() {
    let w = World::new("versions").await;
    let name = w.create(w.pool("linux")).await;
    w.wait_condition(&name, "Ready", "True", "Ready").await;
    let latest = |t: aws_sdk_ec2::types::LaunchTemplate| {
        (
            t.latest_version_number().unwrap(),
            t.default_version_number().unwrap(),
        )
    };
    assert_eq!(latest(w.template(&name).await.unwrap()), (1, 1));

    w.patch_spec(
        &name,
        json!({"labels": ["self-hosted", "linux", "gpu"], "maxRunners": 3}),
    )
    .await;
    w.wait_condition(&name, "Ready", "True", "Ready").await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a resync pass too
    assert_eq!(latest(w.template(&name).await.unwrap()), (1, 1));

    w.patch_spec(
        &name,
        json!({"instanceProfile": w.ground.fixture("INSTANCE_PROFILE")}),
    )
    .await;
    let pool = w.wait_condition(&name, "Ready", "True", "Ready").await;
    assert_eq!(latest(w.template(&name).await.unwrap()), (2, 2));
    assert_eq!(pool.status.unwrap().launch_template.unwrap().version, 2);

    w.patch_spec(
        &name,
        json!({"ami": w.ground.fixture("AMI_ARM64"), "instanceTypes": ["c7g.large"]}),
    )
    .await;
    w.wait_condition(&name, "Ready", "True", "Ready").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(latest(w.template(&name).await.unwrap()), (3, 3));

    // A pool whose container jobs need the metadata raises the hop limit: a launch input.
    w.patch_spec(&name, json!({"metadataHopLimit": 2})).await;
    w.wait_condition(&name, "Ready", "True", "Ready").await;
    let template = w.template(&name).await.unwrap();
    assert_eq!(latest(template.clone()), (4, 4));
    let versions = w
        .ec2
        .describe_launch_template_versions()
        .launch_template_id(template.launch_template_id().unwrap())
        .versions("$Default")
        .send()
        .await
        .unwrap();
    let metadata = versions.launch_template_versions()[0]
        .launch_template_data()
        .unwrap()
        .metadata_options()
        .unwrap();
    assert_eq!(metadata.http_put_response_hop_limit(), Some(2));
}

#[tokio::test]
async fn deleting_a_pool_deletes_its_template_even_if_it_is_already_gone() {
    let w = World::new("delete").await;
    let a = w.create(w.pool("a")).await;
    let b = w.create(w.pool("b")).await;
    w.wait_condition(&a, "Ready", "True", "Ready").await;
    w.wait_condition(&b, "Ready", "True", "Ready").await;

    w.pools.delete(&a, &DeleteParams::default()).await.unwrap();
    // b's template was deleted by hand: deleting b still completes.
    let b_template = w.template(&b).await.unwrap();
    w.ec2
        .delete_launch_template()
        .launch_template_id(b_template.launch_template_id().unwrap())
        .send()
        .await
        .unwrap();
    w.pools.delete(&b, &DeleteParams::default()).await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while w.pools.get_opt(&a).await.unwrap().is_some()
        || w.pools.get_opt(&b).await.unwrap().is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pools were not deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(w.template(&a).await.is_none());
}

#[tokio::test]
async fn throttling_never_flips_a_valid_pool_and_persisting_throttling_is_an_event() {
    let w = World::new("throttled").await;
    let mut pool = w.pool("linux");
    // Subnets in an order no other test uses, so the fault below hits only this pool.
    pool["spec"]["subnets"] = json!([w.ground.fixture("SUBNET_B"), w.ground.fixture("SUBNET_A")]);
    let name = w.create(pool).await;
    w.wait_condition(&name, "Ready", "True", "Ready").await;

    let proxy = w.ground.proxy();
    let marker = w.ground.fixture("SUBNET_B");
    proxy.add_fault(json!({"action": "DescribeSubnets", "code": "RequestLimitExceeded", "status": 503, "count": -1,
        "match": {"SubnetId.1": marker}})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while w.events("AwsThrottled").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no AwsThrottled event"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    proxy.clear_faults().await;
    let pool = w.pools.get(&name).await.unwrap();
    let validated = pool
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Validated")
        .unwrap();
    assert_eq!(
        validated.status, "True",
        "throttling must not make a pool invalid"
    );
}

#[tokio::test]
async fn a_new_leadership_term_does_not_check_an_unchanged_pool_again() {
    let ground = ground(Parts::Both);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "next-term").await;
    let settings = Settings {
        resync: Duration::from_secs(600),
        backoff_unit: Duration::from_millis(200),
        ..Settings::new("next-term", "https://pacer.example.test")
    };
    let ec2 = Arc::new(AwsEc2::new(&ground.aws_config().await));
    let first = Arc::new(Context::new(client.clone(), ec2, settings));
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let run = |ctx: Arc<Context>| {
        tokio::spawn(controller::run(
            ctx,
            pools.clone(),
            Api::namespaced(client.clone(), &ns),
        ))
    };
    let term = run(first.clone());
    let pool: RunnerPool = serde_json::from_value(ground.example_pool(&ns, "linux")).unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pool = pools.get("linux").await.unwrap();
        let ready = (pool.status.iter().flat_map(|s| &s.conditions))
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never Ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What checking the pool costs in EC2: its DryRun launches.
    let dry_runs = || async {
        (ground.proxy().calls().await.into_iter())
            .filter(|c| c.params.get("DryRun").is_some() && c.params.to_string().contains(&ns))
            .count()
    };
    let checked = dry_runs().await;
    assert!(checked > 0);
    // The lease is lost and won again: a new term of the same process.
    term.abort();
    let _second = run(Arc::new(first.next_term()));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        dry_runs().await,
        checked,
        "the new term checked the pool again"
    );
}
