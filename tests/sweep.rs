//! The GitHub sweep against a real API server and the fake GitHub: what webhooks missed is
//! caught from GitHub's side.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use pacer::api::{RunnerJob, RunnerJobSpec, RunnerPool};
use pacer::cloud::fake::FakeEc2;
use pacer::controller::sweep::{Scope, Swept, sweep};
use pacer::controller::{Context, Settings};
use pacer::github::{GitHub as _, job_object_name};
use serde_json::{Value, json};
use support::github::FakeGitHub;
use support::{Parts, ground, repo_root};

#[tokio::test]
async fn the_sweep_records_missed_jobs_redelivers_failures_and_removes_unclaimed_runners() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "sweep").await;
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
    pools
        .create(
            &PostParams::default(),
            &org_pool(&ns, "linux", "example-org"),
        )
        .await
        .unwrap();
    // A job whose webhook did arrive.
    create_job(&jobs, &ns, 9003, 900).await;

    let fake = FakeGitHub::start().await;
    let minutes_ago = |m: i64| {
        (k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_mins(m))
            .to_string()
    };
    {
        let mut s = fake.state.lock().unwrap();
        s.installations
            .insert(11, vec!["example-org/api".into(), "example-org/web".into()]);
        let job = |id: i64, labels: Value| json!({"id": id, "run_id": 900, "status": "queued", "labels": labels});
        s.queued.insert(
            "example-org/api".into(),
            vec![(
                900,
                vec![
                    job(9001, json!(["self-hosted", "linux"])),
                    job(9002, json!(["gpu"])),
                    job(9003, json!(["self-hosted"])),
                ],
            )],
        );
        // A multi-job workflow: its run is in progress, one of its jobs still queued.
        let mut started = job(9004, json!(["self-hosted", "linux"]));
        started["status"] = json!("in_progress");
        s.queued.insert(
            "example-org/web".into(),
            vec![(
                901,
                vec![started, job(9005, json!(["self-hosted", "linux"]))],
            )],
        );
        let delivery = |id: i64, guid: &str, minutes: i64, status: u16| {
            json!({"id": id, "guid": guid, "delivered_at": minutes_ago(minutes),
                "status_code": status, "event": "workflow_job", "action": "queued",
                "redelivery": false, "duration": 0.1, "status": "x", "installation_id": 11,
                "repository_id": 1})
        };
        s.deliveries = vec![
            delivery(1, "a", 10, 503),
            delivery(2, "b", 10, 202),
            delivery(3, "c", 120, 500),
            delivery(5, "d", 20, 500),
            delivery(6, "d", 15, 202),
        ];
        // A busy hour: 150 newer deliveries went through, so the failed ones are on the
        // second page.
        for n in 0..150 {
            s.deliveries
                .push(delivery(1000 + n, &format!("busy-{n}"), 5, 202));
        }
    }
    let org = "orgs/example-org";
    // Job 9003 is live at attempt 1: its runner (named before attempts were counted, or
    // now) is claimed; its attempt-2 runner is nobody's. Unclaimed runners go whether
    // online or offline, unless GitHub says they are busy.
    fake.add_runner(org, "pacer-sweep-9003", "offline");
    fake.add_runner(org, "pacer-sweep-9003-2", "offline");
    fake.add_runner(org, "pacer-sweep-9999-1", "offline");
    fake.add_runner(org, "pacer-sweep-9998-1", "online");
    fake.add_runner(org, "pacer-sweep-9997-1", "online");
    fake.set_busy(org, "pacer-sweep-9997-1", true);
    fake.add_runner(org, "someone-elses-runner", "offline");
    // The first repository's runs cannot be listed this pass (every retry fails): it is
    // skipped alone, and the next pass catches it up.
    fake.fail("list_queued_runs", 500, 4);

    let github = fake.client();
    let ctx = Context::new(
        client.clone(),
        Arc::new(FakeEc2::new()),
        Settings::new("sweep", "https://pacer.example.test"),
    );
    let scope = Scope::new(pools.clone(), jobs.clone());
    let swept = sweep(&ctx, &github, &scope).await.unwrap();
    assert_eq!(
        swept,
        Swept {
            redelivered: 1,
            recorded: 1,
            runners_removed: 3,
            errors: 1,
            ..Swept::default()
        }
    );
    assert!(
        jobs.get_opt(&job_object_name(9005))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        jobs.get_opt(&job_object_name(9001))
            .await
            .unwrap()
            .is_none()
    );
    let again = sweep(&ctx, &github, &scope).await.unwrap();
    assert_eq!((again.recorded, again.errors), (1, 0));
    let missed = jobs.get(&job_object_name(9001)).await.unwrap();
    assert_eq!(
        (
            missed.spec.pool_name.as_str(),
            missed.spec.repository.as_str()
        ),
        ("linux", "example-org/api")
    );
    assert!(
        jobs.get_opt(&job_object_name(9002))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(fake.state.lock().unwrap().redelivered, [1, 1]);
    let mut left = fake.runner_names(org);
    left.sort();
    assert_eq!(
        left,
        [
            "pacer-sweep-9003",
            "pacer-sweep-9997-1",
            "someone-elses-runner"
        ]
    );
    // Caught up: another pass finds nothing to do but the failed delivery still listed.
    let again = sweep(&ctx, &github, &scope).await.unwrap();
    assert_eq!((again.recorded, again.runners_removed), (0, 0));
}

#[tokio::test]
async fn the_sweep_keeps_to_its_budget_resumes_where_it_stopped_and_spares_a_low_installation() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "sweep-budget").await;
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
    for (name, owner) in [("busy", "busy-org"), ("low", "low-org")] {
        let pool = org_pool(&ns, name, owner);
        pools.create(&PostParams::default(), &pool).await.unwrap();
    }
    let fake = FakeGitHub::start().await;
    let repositories: Vec<String> = (0..120).map(|n| format!("busy-org/r{n:03}")).collect();
    {
        let mut s = fake.state.lock().unwrap();
        s.installations.insert(11, repositories.clone());
        s.installations.insert(12, vec!["low-org/app".into()]);
        let job = |id: i64, run: i64, labels: Value| json!({"id": id, "run_id": run, "status": "queued", "labels": labels});
        // Each repository costs four requests: its queued runs, its runs in progress, and
        // the jobs of each of its two runs; one job of each is one a pool serves.
        for (n, repository) in repositories.iter().enumerate() {
            let (a, b) = (10_000 + 2 * n as i64, 10_001 + 2 * n as i64);
            s.queued.insert(
                repository.clone(),
                vec![
                    (a, vec![job(a, a, json!(["self-hosted", "linux"]))]),
                    (b, vec![job(b, b, json!(["gpu"]))]),
                ],
            );
        }
        s.queued.insert(
            "low-org/app".into(),
            vec![(8001, vec![job(8001, 8001, json!(["self-hosted", "linux"]))])],
        );
        // Installation 12 has a quarter of its hour's budget left or less.
        s.rate_limits.insert(12, (5000, 1000));
    }
    let github = fake.client();
    let ctx = Context::new(
        client.clone(),
        Arc::new(FakeEc2::new()),
        Settings::new("sweep", "https://pacer.example.test"),
    );
    let scope = Scope::new(pools.clone(), jobs.clone());
    let recorded = || async {
        let all = jobs.list(&Default::default()).await.unwrap().items;
        all.iter().map(|j| j.spec.job_id).collect::<Vec<i64>>()
    };
    let pass = || async {
        let before = github.requests_sent();
        let swept = sweep(&ctx, &github, &scope).await.unwrap();
        (swept, github.requests_sent() - before)
    };

    let (first, sent) = pass().await;
    // A repository begun under the budget is finished (at most four requests past it). On
    // top: listing what to read (deliveries, installations, their repositories and tokens)
    // and one runner listing per organization.
    let most = pacer::controller::sweep::MAX_REQUESTS + 4 + 12;
    assert!(sent <= most, "{sent} requests");
    assert!((60..=76).contains(&first.recorded), "{first:?}");
    assert_eq!(first.deferred, 121 - first.recorded, "{first:?}");
    assert_eq!(first.errors, 0);
    assert!(
        !recorded().await.contains(&8001),
        "the low installation was left alone"
    );

    // The next pass begins where this one stopped and records the rest.
    let (second, sent) = pass().await;
    assert!(sent <= most, "{sent} requests");
    assert_eq!(first.recorded + second.recorded, 120, "{second:?}");
    assert!(!recorded().await.contains(&8001));

    // Its budget renewed, the installation's repositories are read again.
    fake.state
        .lock()
        .unwrap()
        .rate_limits
        .insert(12, (5000, 5000));
    let (_, _) = pass().await;
    let (third, _) = pass().await;
    assert!(recorded().await.contains(&8001), "{third:?}");
    assert_eq!(recorded().await.len(), 121);
}

/// A job recorded, claimed and given its runner while a pass reads GitHub is not taken for one
/// whose runner nobody claims: the pass reads the RunnerJobs again after listing the runners.
#[tokio::test]
async fn a_runner_registered_while_the_sweep_reads_github_is_kept() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "sweep-late").await;
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
    pools
        .create(
            &PostParams::default(),
            &org_pool(&ns, "linux", "example-org"),
        )
        .await
        .unwrap();
    let fake = FakeGitHub::start().await;
    {
        let mut s = fake.state.lock().unwrap();
        s.installations.insert(11, vec!["example-org/api".into()]);
        s.queued.insert("example-org/api".into(), vec![]);
    }
    let org = "orgs/example-org";
    fake.add_runner(org, "pacer-sweep-9999-1", "offline");
    // The pass's read of the App's repositories waits: time for a job to come and boot.
    let gate = fake.hold("list_installation_repositories");
    let github = fake.client();
    let ctx = Context::new(
        client.clone(),
        Arc::new(FakeEc2::new()),
        Settings::new("sweep", "https://pacer.example.test"),
    );
    let scope = Scope::new(pools.clone(), jobs.clone());
    let pass = tokio::spawn(async move { sweep(&ctx, &github, &scope).await.unwrap() });
    // Past its deliveries, the next request GitHub sees comes after the pass listed the jobs.
    while fake.calls_of("list_deliveries") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = fake.requests();
    while fake.requests() == seen {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    create_job(&jobs, &ns, 9100, 910).await;
    fake.add_runner(org, "pacer-sweep-9100-1", "offline");
    gate.close();

    let swept = pass.await.unwrap();
    assert_eq!(swept.runners_removed, 1, "{swept:?}");
    assert_eq!(fake.runner_names(org), ["pacer-sweep-9100-1"]);
}

/// Records GitHub job `job_id` of run `run_id` in example-org/api, for the pool `linux`, as
/// its webhook would.
async fn create_job(jobs: &Api<RunnerJob>, ns: &str, job_id: i64, run_id: i64) {
    let spec = RunnerJobSpec {
        pool_name: "linux".into(),
        job_id,
        run_id,
        repository: "example-org/api".into(),
        labels: vec!["self-hosted".into()],
        installation_id: Some(11),
    };
    let job = RunnerJob::for_queued_job(ns, &job_object_name(job_id), spec);
    jobs.create(&PostParams::default(), &job).await.unwrap();
}

/// An organization pool named `name` in `ns` for `owner`'s jobs labelled `self-hosted, linux`.
fn org_pool(ns: &str, name: &str, owner: &str) -> RunnerPool {
    let text =
        std::fs::read_to_string(repo_root().join("examples/runnerpool-org-spot.yaml")).unwrap();
    let mut pool: Value = serde_saphyr::from_str(&text).unwrap();
    pool["metadata"] = json!({"name": name, "namespace": ns});
    pool["spec"]["github"] = json!({"scope": "org", "owner": owner});
    pool["spec"]["labels"] = json!(["self-hosted", "linux"]);
    serde_json::from_value(pool).unwrap()
}
