//! The CRDs on a real kube-apiserver: what it accepts, what it rejects and why, and how the
//! resources read back.

mod support;

use kube::api::{Api, Patch, PatchParams, PostParams};
use pacer::api::{JobPhase, RunnerJob, RunnerJobSpec, RunnerJobStatus, RunnerPool};
use serde_json::{Value, json};
use support::{Parts, ground, repo_root};

fn example(name: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join("examples").join(name)).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn pool_in(mut manifest: Value, namespace: &str) -> RunnerPool {
    manifest["metadata"]["namespace"] = json!(namespace);
    serde_json::from_value(manifest).unwrap()
}

/// An invalid pool: what is wrong, how to break the valid example so, and the field to name.
type Breakage = (&'static str, fn(&mut Value), &'static str);

fn invalid_pools() -> Vec<Breakage> {
    vec![
        (
            "bad AMI id",
            |p| p["spec"]["ami"] = json!("ubuntu-24.04"),
            "spec.ami",
        ),
        (
            "no instance types",
            |p| p["spec"]["instanceTypes"] = json!([]),
            "spec.instanceTypes",
        ),
        (
            "21 instance types",
            |p| {
                p["spec"]["instanceTypes"] =
                    json!((0..21).map(|i| format!("m{i}.large")).collect::<Vec<_>>())
            },
            "spec.instanceTypes",
        ),
        (
            "repo scope without repositories",
            |p| p["spec"]["github"] = json!({"scope": "repo", "owner": "example-org"}),
            "spec.github.repositories",
        ),
        (
            "reserved tag key",
            |p| p["spec"]["tags"]["gha:pool"] = json!("x"),
            "spec.tags",
        ),
        (
            "aws: tag key",
            |p| p["spec"]["tags"]["aws:cloudformation:stack"] = json!("x"),
            "spec.tags",
        ),
        (
            "reserved tag key in capitals",
            |p| p["spec"]["tags"]["GHA:managed-by"] = json!("x"),
            "spec.tags",
        ),
        (
            "aws: tag key in mixed case",
            |p| p["spec"]["tags"]["Aws:owner"] = json!("x"),
            "spec.tags",
        ),
        (
            "negative root volume",
            |p| p["spec"]["rootVolume"]["sizeGiB"] = json!(-1),
            "spec.rootVolume.sizeGiB",
        ),
        (
            "unknown spawn method",
            |p| p["spec"]["spawnMethod"] = json!("launchTemplate"),
            "spec.spawnMethod",
        ),
        (
            "unknown capacity type",
            |p| p["spec"]["capacity"]["type"] = json!("reserved"),
            "spec.capacity.type",
        ),
        (
            "fallback without spot",
            |p| p["spec"]["capacity"] = json!({"type": "onDemand", "fallbackToOnDemand": true}),
            "spec.capacity.fallbackToOnDemand",
        ),
        (
            "bad subnet id",
            |p| p["spec"]["subnets"][1] = json!("subnet-XYZ"),
            "spec.subnets[1]",
        ),
        (
            "bad security group id",
            |p| p["spec"]["securityGroups"][0] = json!("default"),
            "spec.securityGroups[0]",
        ),
        (
            "zero max runners",
            |p| p["spec"]["maxRunners"] = json!(0),
            "spec.maxRunners",
        ),
        (
            "no labels",
            |p| p["spec"]["labels"] = json!([]),
            "spec.labels",
        ),
        (
            "unknown scope",
            |p| p["spec"]["github"]["scope"] = json!("enterprise"),
            "spec.github.scope",
        ),
        (
            "max runtime over 7 days",
            |p| p["spec"]["maxRuntimeMinutes"] = json!(10081),
            "spec.maxRuntimeMinutes",
        ),
        (
            "throughput on gp2",
            |p| p["spec"]["rootVolume"] = json!({"type": "gp2", "throughput": 250}),
            "spec.rootVolume.throughput",
        ),
        (
            "a warm pool of spot instances",
            |p| p["spec"]["warm"] = json!({"size": 2}),
            "spec.warm",
        ),
        (
            "a warm pool over 100",
            |p| {
                p["spec"]["capacity"] = json!({"type": "onDemand"});
                p["spec"]["warm"] = json!({"size": 101});
            },
            "spec.warm.size",
        ),
        (
            "warm instances kept under 3 hours",
            |p| {
                p["spec"]["capacity"] = json!({"type": "onDemand"});
                p["spec"]["warm"] = json!({"size": 1, "maxAgeMinutes": 179});
            },
            "spec.warm.maxAgeMinutes",
        ),
    ]
}

#[tokio::test]
async fn generated_crds_are_established_and_served() {
    let ground = ground(Parts::Kube);
    let out = ground.kubectl(&["api-resources", "--api-group", "pacer.dev", "-o", "wide"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("runnerpools") && text.contains("rp"),
        "{text}"
    );
    assert!(text.contains("runnerjobs") && text.contains("rj"), "{text}");
}

#[tokio::test]
async fn example_pools_are_accepted_and_read_back_identically() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "examples").await;
    let pools: Api<RunnerPool> = Api::namespaced(client, &ns);
    for file in ["runnerpool-org-spot.yaml", "runnerpool-repo-arm.yaml"] {
        let pool = pool_in(example(file), &ns);
        let created = pools
            .create(&PostParams::default(), &pool)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let read = pools
            .get(&created.metadata.name.clone().unwrap())
            .await
            .unwrap();
        // Serde's defaults and the schema's defaults agree, so the typed specs are equal.
        assert_eq!(read.spec, pool.spec, "{file}");
    }
    // A warm pool, with maxAgeMinutes left to its default on both sides.
    let mut warm = example("runnerpool-org-spot.yaml");
    warm["metadata"]["name"] = json!("warm");
    warm["spec"]["capacity"] = json!({"type": "onDemand"});
    warm["spec"]["warm"] = json!({"size": 3});
    let pool = pool_in(warm, &ns);
    let created = pools.create(&PostParams::default(), &pool).await.unwrap();
    assert_eq!(created.spec, pool.spec);
    assert_eq!(created.spec.warm.unwrap().max_age_minutes, 1440);
}

#[tokio::test]
async fn invalid_pools_are_rejected_naming_the_field_online_and_offline() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "invalid").await;
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client,
        &ns,
        &kube::api::ApiResource::erase::<RunnerPool>(&()),
    );
    for (i, (what, break_it, field)) in invalid_pools().into_iter().enumerate() {
        let mut manifest = example("runnerpool-org-spot.yaml");
        manifest["metadata"]["name"] = json!(format!("invalid-{i}"));
        manifest["metadata"]["namespace"] = json!(ns);
        break_it(&mut manifest);

        let object: kube::api::DynamicObject = serde_json::from_value(manifest.clone()).unwrap();
        let err = raw
            .create(&PostParams::default(), &object)
            .await
            .expect_err(what);
        let message = match err {
            kube::Error::Api(status) => {
                assert_eq!(status.code, 422, "{what}: {status:?}");
                status.message
            }
            other => panic!("{what}: unexpected error {other}"),
        };
        assert!(
            message.contains(field),
            "{what}: the API server's message does not name {field}: {message}"
        );

        let offline = pacer::api::validate_pool_manifest(&manifest);
        assert!(
            offline.iter().any(|p| p.field.starts_with(field)),
            "{what}: pacer validate does not name {field}: {offline:?}"
        );
    }
    assert!(
        pools
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

fn job(ns: &str, name: &str) -> RunnerJob {
    let mut job = RunnerJob::new(
        name,
        RunnerJobSpec {
            pool_name: "linux-x64".into(),
            job_id: 29_679_449,
            run_id: 10_834_231_556,
            repository: "example-org/api".into(),
            labels: vec!["self-hosted".into(), "linux".into()],
            installation_id: Some(41_234_567),
        },
    );
    job.metadata.namespace = Some(ns.into());
    job
}

#[tokio::test]
async fn runner_job_spec_cannot_change_after_creation() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "immutable").await;
    let jobs: Api<RunnerJob> = Api::namespaced(client, &ns);
    jobs.create(&PostParams::default(), &job(&ns, "job-1"))
        .await
        .unwrap();

    let patch = json!({"spec": {"jobId": 1}});
    let err = jobs
        .patch("job-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("unexpected {err}")
    };
    assert_eq!(status.code, 422);
    assert!(status.message.contains("immutable"), "{}", status.message);
    assert_eq!(jobs.get("job-1").await.unwrap().spec.job_id, 29_679_449);
}

#[tokio::test]
async fn status_patch_goes_through_the_subresource_without_bumping_generation() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "status").await;
    let jobs: Api<RunnerJob> = Api::namespaced(client, &ns);
    let created = jobs
        .create(&PostParams::default(), &job(&ns, "job-1"))
        .await
        .unwrap();
    let generation = created.metadata.generation;

    let status = RunnerJobStatus {
        phase: JobPhase::Launching,
        attempts: 1,
        ..Default::default()
    };
    let patch = json!({"apiVersion": "pacer.dev/v1alpha1", "kind": "RunnerJob", "status": status});
    let params = PatchParams::apply("pacer-tests").force();
    jobs.patch_status("job-1", &params, &Patch::Apply(&patch))
        .await
        .unwrap();

    let read = jobs.get("job-1").await.unwrap();
    assert_eq!(read.metadata.generation, generation);
    let status = read.status.unwrap();
    assert_eq!((status.phase, status.attempts), (JobPhase::Launching, 1));

    // Status sent through the main resource is ignored.
    let patch = json!({"status": {"phase": "Failed"}});
    jobs.patch("job-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(
        jobs.get("job-1").await.unwrap().status.unwrap().phase,
        JobPhase::Launching
    );
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "columns").await;
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    pools
        .create(
            &PostParams::default(),
            &pool_in(example("runnerpool-org-spot.yaml"), &ns),
        )
        .await
        .unwrap();
    Api::<RunnerJob>::namespaced(client, &ns)
        .create(&PostParams::default(), &job(&ns, "job-1"))
        .await
        .unwrap();

    let out = ground.kubectl(&["get", "runnerpools,runnerjobs", "-n", &ns]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for header in [
        "SCOPE",
        "OWNER",
        "CAPACITY",
        "MAX",
        "WARM",
        "VALIDATED",
        "READY",
        "POOL",
        "PHASE",
        "REPOSITORY",
        "JOB",
        "INSTANCE",
    ] {
        assert!(text.contains(header), "no {header} column in:\n{text}");
    }
    assert!(
        text.contains("linux-x64") && text.contains("example-org/api") && text.contains("spot"),
        "{text}"
    );
}

#[test]
fn pacer_validate_passes_the_examples_and_names_each_bad_field() {
    let pacer = env!("CARGO_BIN_EXE_pacer");
    let examples: Vec<_> = ["runnerpool-org-spot.yaml", "runnerpool-repo-arm.yaml"]
        .iter()
        .map(|f| repo_root().join("examples").join(f))
        .collect();
    let out = std::process::Command::new(pacer)
        .arg("validate")
        .args(&examples)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let mut bad = example("runnerpool-org-spot.yaml");
    bad["spec"]["ami"] = json!("ubuntu");
    bad["spec"]["tags"]["gha:job"] = json!("1");
    bad["spec"]["capacity"] = json!({"type": "onDemand", "fallbackToOnDemand": true});
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("invalid-pool.yaml");
    std::fs::write(&path, serde_saphyr::to_string(&bad).unwrap()).unwrap();
    let out = std::process::Command::new(pacer)
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for field in ["spec.ami", "spec.tags", "spec.capacity.fallbackToOnDemand"] {
        assert!(text.contains(field), "{field} not named in:\n{text}");
    }
}
