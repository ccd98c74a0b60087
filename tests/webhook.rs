//! `POST /api/webhook` against a real kube-apiserver, with GitHub's own example payloads
//! (npm `@octokit/webhooks-examples`, installed by `make tools`) signed as GitHub signs them.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt as _;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use pacer::api::{JobResult, RunnerJob, RunnerPool};
use pacer::cloud::fake::FakeEc2;
use pacer::config::Secret;
use pacer::controller::{Context, Settings};
use pacer::github::webhook::sign;
use pacer::github::{job_object_name, runner_name};
use pacer::http::{Web, router};
use serde_json::{Value, json};
use support::webhooks::examples;
use support::{Ground, Parts, ground, repo_root};
use tower::ServiceExt as _;

const SECRET: &[u8] = b"webhook secret for tests";
const CONTROLLER: &str = "hooks";

fn example(action: &str, status: &str) -> Value {
    examples()
        .into_iter()
        .find(|e| e["action"] == action && e["workflow_job"]["status"] == status)
        .unwrap_or_else(|| panic!("no {action}/{status} example"))
}

struct World {
    ground: &'static Ground,
    ns: String,
    jobs: Api<RunnerJob>,
    web: Arc<Web>,
    _pools: tokio::task::JoinHandle<()>,
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
        let ground = ground(Parts::Kube);
        let client = ground.kube_client().await;
        let ns = ground.namespace(&client, test).await;
        let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
        // Pools for the examples' repositories: Codertocat's jobs ask for ubuntu-latest,
        // lineville's for self-hosted and k8s.
        for (name, owner, labels) in [
            ("hello", "Codertocat", json!(["ubuntu-latest"])),
            (
                "elastic",
                "lineville",
                json!(["self-hosted", "k8s", "linux"]),
            ),
        ] {
            let text =
                std::fs::read_to_string(repo_root().join("examples/runnerpool-org-spot.yaml"))
                    .unwrap();
            let mut pool: Value = serde_saphyr::from_str(&text).unwrap();
            pool["metadata"] = json!({"name": name, "namespace": ns});
            pool["spec"]["github"] = json!({"scope": "org", "owner": owner});
            pool["spec"]["labels"] = labels;
            let pool: RunnerPool = serde_json::from_value(pool).unwrap();
            pools.create(&PostParams::default(), &pool).await.unwrap();
        }
        let settings = Settings {
            tenancy: tenants_of(&ns),
            ..Settings::new(CONTROLLER, "https://pacer.example.test")
        };
        let ctx = Arc::new(Context::new(
            client.clone(),
            Arc::new(FakeEc2::new()),
            settings,
        ));
        let (store, writer) = reflector::store();
        let web = Arc::new(Web::new(
            ctx,
            store.clone(),
            vec![
                Secret::new(b"next secret".to_vec()),
                Secret::new(SECRET.to_vec()),
            ],
            Some(ns.clone()),
        ));
        let watch = tokio::spawn(
            watcher(pools, watcher::Config::default())
                .reflect(writer)
                .for_each(|_| std::future::ready(())),
        );
        store.wait_until_ready().await.unwrap();
        while store.len() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        web.ready.store(true, Ordering::SeqCst);
        Self {
            ground,
            jobs: Api::namespaced(client, &ns),
            ns,
            web,
            _pools: watch,
        }
    }

    /// Posts `body` as GitHub would, signed with `secret` (unsigned when `None`).
    async fn post(
        &self,
        event: &str,
        delivery: &str,
        body: &[u8],
        secret: Option<&[u8]>,
    ) -> (StatusCode, String) {
        let mut request = Request::post("/api/webhook")
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery);
        if let Some(secret) = secret {
            request = request.header("x-hub-signature-256", sign(secret, body));
        }
        let response = router(self.web.clone())
            .oneshot(request.body(Body::from(body.to_vec())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Records the runner handed out for job `job_id`'s first attempt, as a bootstrap would.
    async fn record_runner(&self, job_id: i64, runner_id: i64) {
        let runner = json!({"id": runner_id, "name": runner_name(CONTROLLER, job_id, 1)});
        self.jobs
            .patch_status(
                &job_object_name(job_id),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"status": {"runner": runner}})),
            )
            .await
            .unwrap();
    }

    async fn deliver(&self, delivery: &str, payload: &Value) -> (StatusCode, String) {
        let body = serde_json::to_vec(payload).unwrap();
        self.post("workflow_job", delivery, &body, Some(SECRET))
            .await
    }

    async fn job_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .jobs
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|j| j.metadata.name)
            .collect();
        names.sort();
        names
    }
}

/// With `tenants`, a queued job is matched only to pools whose namespace may serve its owner:
/// here the namespace may serve lineville, so Codertocat's job finds no pool even though the
/// namespace's `hello` pool names Codertocat and asks for its labels.
#[tokio::test]
async fn a_namespace_serves_only_the_owners_its_tenant_entry_names() {
    use pacer::domain::tenancy::{Tenancy, Tenant};
    let w = World::with_tenants("hook-tenants", |ns| {
        let tenant = Tenant {
            owners: vec!["lineville".into()],
            repositories: vec![],
        };
        Tenancy::new([(ns.to_string(), tenant)].into())
    })
    .await;
    let codertocat = example("queued", "queued");
    assert_eq!(
        w.deliver("t-1", &codertocat).await,
        (StatusCode::OK, "no_pool".into())
    );
    assert!(w.job_names().await.is_empty());
}

#[tokio::test]
async fn real_queued_examples_become_one_runner_job_each_and_waiting_ones_nothing() {
    let w = World::new("hook-queued").await;
    let queued = example("queued", "queued");
    let (status, body) = w.deliver("d-1", &queued).await;
    assert_eq!((status, body.as_str()), (StatusCode::ACCEPTED, "created"));
    let job = w.jobs.get(&job_object_name(289782451)).await.unwrap();
    assert_eq!(job.spec.pool_name, "hello");
    assert_eq!(job.spec.repository, "Codertocat/Hello-World");
    assert_eq!(job.spec.run_id, 2202229078);
    assert_eq!(job.spec.labels, ["ubuntu-latest"]);
    assert_eq!(
        job.spec.installation_id,
        queued["installation"]["id"].as_i64()
    );
    assert_eq!(
        job.metadata.finalizers.as_deref(),
        Some(&[pacer::api::JOB_FINALIZER.to_string()][..]),
        "born with its finalizer"
    );

    // The same delivery again, and another delivery of the same job: still one RunnerJob.
    assert_eq!(w.deliver("d-1", &queued).await.0, StatusCode::OK);
    assert_eq!(
        w.deliver("d-2", &queued).await,
        (StatusCode::ACCEPTED, "exists".into())
    );
    // Held for approval, in order or late: nothing is recorded, nothing blocked.
    for (delivery, action) in [("d-3", "queued"), ("d-4", "waiting")] {
        let held = example(action, "waiting");
        assert_eq!(
            w.deliver(delivery, &held).await,
            (StatusCode::OK, "ignored".into())
        );
    }
    assert_eq!(w.job_names().await, [job_object_name(289782451)]);

    // A job whose labels no pool has is answered 200, and counted.
    let mut hosted = queued.clone();
    hosted["workflow_job"]["id"] = json!(41);
    hosted["workflow_job"]["labels"] = json!(["macos-latest"]);
    assert_eq!(
        w.deliver("d-5", &hosted).await,
        (StatusCode::OK, "no_pool".into())
    );
    // A repository webhook has no installation: recorded all the same.
    let mut no_installation = queued.clone();
    no_installation["workflow_job"]["id"] = json!(42);
    no_installation
        .as_object_mut()
        .unwrap()
        .remove("installation");
    assert_eq!(
        w.deliver("d-6", &no_installation).await.0,
        StatusCode::ACCEPTED
    );
    let job = w.jobs.get(&job_object_name(42)).await.unwrap();
    assert_eq!(job.spec.installation_id, None);

    let metrics = w.web.ctx.metrics.encode();
    for line in [
        r#"pacer_webhook_deliveries_total{event="workflow_job",action="queued",result="created"} 2"#,
        r#"pacer_webhook_deliveries_total{event="workflow_job",action="queued",result="no_pool"} 1"#,
        r#"pacer_webhook_deliveries_total{event="workflow_job",action="queued",result="duplicate"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn in_progress_and_completed_land_on_the_runner_job_whose_runner_took_the_job() {
    let w = World::new("hook-progress").await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("pacer=info")
        .with_test_writer()
        .try_init();
    let queued = example("queued", "queued");
    w.deliver("q-1", &queued).await;
    let ours = runner_name(CONTROLLER, 289782451, 1);
    w.record_runner(289782451, 5555).await;

    // GitHub's own example ran on a hosted runner: not ours, nothing recorded.
    let hosted = example("in_progress", "in_progress");
    assert_eq!(
        w.deliver("p-0", &hosted).await,
        (StatusCode::OK, "ignored".into())
    );

    // Our runner took another queued job than the one it was launched for.
    let mut taken = hosted.clone();
    taken["workflow_job"]["id"] = json!(777);
    taken["workflow_job"]["runner_name"] = json!(ours);
    taken["workflow_job"]["runner_id"] = json!(5555);
    taken["repository"] = queued["repository"].clone();
    taken["installation"] = queued["installation"].clone();

    // Signed by GitHub, naming our runner, but not about it: a repository of another owner
    // the App is installed on (runner names are predictable), or another runner id.
    let mut evil = taken.clone();
    evil["workflow_job"]["runner_id"] = json!(999999);
    evil["repository"]["full_name"] = json!("evil-org/evil-repo");
    evil["repository"]["name"] = json!("evil-repo");
    evil["repository"]["owner"]["login"] = json!("evil-org");
    let mut wrong_id = taken.clone();
    wrong_id["workflow_job"]["runner_id"] = json!(999999);
    let mut other_owner = taken.clone();
    other_owner["repository"]["full_name"] = json!("evil-org/Hello-World");
    for (n, forged) in [evil, wrong_id, other_owner].iter().enumerate() {
        assert_eq!(
            w.deliver(&format!("p-evil-{n}"), forged).await,
            (StatusCode::OK, "unbound".into()),
            "{n}"
        );
        let mut done = forged.clone();
        done["action"] = json!("completed");
        done["workflow_job"]["status"] = json!("completed");
        done["workflow_job"]["conclusion"] = json!("failure");
        assert_eq!(
            w.deliver(&format!("c-evil-{n}"), &done).await,
            (StatusCode::OK, "unbound".into()),
            "{n}"
        );
    }
    let status = w
        .jobs
        .get(&job_object_name(289782451))
        .await
        .unwrap()
        .status
        .unwrap();
    assert!(
        status.assigned_job.is_none() && status.completion.is_none(),
        "{status:?}"
    );
    assert!(
        w.web
            .ctx
            .metrics
            .encode()
            .contains(r#"action="in_progress",result="unbound"} 3"#)
    );

    assert_eq!(
        w.deliver("p-1", &taken).await,
        (StatusCode::OK, "assigned".into())
    );
    let job = w.jobs.get(&job_object_name(289782451)).await.unwrap();
    let assigned = job.status.unwrap().assigned_job.unwrap();
    assert_eq!(
        (assigned.job_id, assigned.repository.as_str()),
        (777, taken["repository"]["full_name"].as_str().unwrap())
    );

    let mut done = example("completed", "completed");
    done["workflow_job"]["runner_name"] = json!(ours);
    done["workflow_job"]["runner_id"] = json!(5555);
    done["repository"] = queued["repository"].clone();
    done["installation"] = queued["installation"].clone();
    let conclusion = done["workflow_job"]["conclusion"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        w.deliver("c-1", &done).await,
        (StatusCode::OK, "completed".into())
    );
    let job = w.jobs.get(&job_object_name(289782451)).await.unwrap();
    let expected = if conclusion == "success" {
        JobResult::Success
    } else {
        JobResult::Failure
    };
    assert_eq!(job.status.unwrap().completion.unwrap().result, expected);
}

#[tokio::test]
async fn a_job_cancelled_while_queued_withdraws_an_idle_runner_job() {
    let w = World::new("hook-cancel").await;
    let mut queued = example("queued", "queued");
    for id in [501, 502, 503] {
        queued["workflow_job"]["id"] = json!(id);
        assert_eq!(
            w.deliver(&format!("q-{id}"), &queued).await.0,
            StatusCode::ACCEPTED
        );
    }
    // 501's runner took 502's job: when 501 is cancelled in the queue, a RunnerJob of the
    // pool that has no runner yet (502) is the one no longer wanted. 503, the newest, has a
    // registered runner that may have taken a job a moment ago: never withdrawn.
    w.record_runner(501, 6501).await;
    w.record_runner(503, 6503).await;
    let mut taken = example("in_progress", "in_progress");
    taken["workflow_job"]["id"] = json!(502);
    taken["workflow_job"]["runner_name"] = json!(runner_name(CONTROLLER, 501, 1));
    taken["workflow_job"]["runner_id"] = json!(6501);
    taken["repository"] = queued["repository"].clone();
    taken["installation"] = queued["installation"].clone();
    assert_eq!(w.deliver("p-502", &taken).await.1, "assigned");

    let mut cancelled = example("completed", "completed");
    cancelled["workflow_job"]["id"] = json!(501);
    cancelled["workflow_job"]["runner_name"] = Value::Null;
    cancelled["workflow_job"]["conclusion"] = json!("cancelled");
    assert_eq!(
        w.deliver("c-501", &cancelled).await,
        (StatusCode::OK, "cancelled".into())
    );
    let completion = |name: String| {
        let jobs = w.jobs.clone();
        async move {
            jobs.get(&name)
                .await
                .unwrap()
                .status
                .and_then(|s| s.completion)
        }
    };
    assert!(
        completion(job_object_name(501)).await.is_none(),
        "its runner is busy"
    );
    assert_eq!(
        completion(job_object_name(502)).await.unwrap().result,
        JobResult::Cancelled
    );
    assert!(
        completion(job_object_name(503)).await.is_none(),
        "a registered runner is left to the idle check, which asks GitHub"
    );
}

#[tokio::test]
async fn bad_deliveries_get_their_status_and_write_nothing() {
    let w = World::new("hook-bad").await;
    let body = serde_json::to_vec(&example("queued", "queued")).unwrap();
    /// What is wrong, the body, the secret it is signed with, and the answer.
    type Case<'a> = (&'a str, Vec<u8>, Option<&'a [u8]>, StatusCode);
    let cases: Vec<Case> = vec![
        ("no signature", body.clone(), None, StatusCode::UNAUTHORIZED),
        (
            "wrong secret",
            body.clone(),
            Some(b"not the secret"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "malformed JSON",
            b"{\"action\": \"queued\",".to_vec(),
            Some(SECRET),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a field missing",
            br#"{"action": "queued"}"#.to_vec(),
            Some(SECRET),
            StatusCode::BAD_REQUEST,
        ),
        (
            "over 256 KiB",
            vec![b' '; 256 * 1024 + 1],
            Some(SECRET),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (name, body, secret, expected) in cases {
        let (status, text) = w.post("workflow_job", name, &body, secret).await;
        assert_eq!(status, expected, "{name}: {text}");
        let error: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
        assert!(error["error"].is_string(), "{name}: {text}");
        assert!(
            !text.contains("kube") && !text.contains("at src/"),
            "{name}: {text}"
        );
    }
    // Signed, then cut short on the way: the signature no longer matches.
    let signed = sign(SECRET, &body);
    let response = router(w.web.clone())
        .oneshot(
            Request::post("/api/webhook")
                .header("x-github-event", "workflow_job")
                .header("x-hub-signature-256", signed)
                .body(Body::from(body[..body.len() / 2].to_vec()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(w.job_names().await.is_empty(), "nothing written");

    assert_eq!(
        w.post("ping", "p", b"{}", Some(SECRET)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        w.post("push", "x", b"{}", Some(SECRET)).await.0,
        StatusCode::NO_CONTENT
    );
    // The previous secret still verifies while it is rotated.
    let next = w.post("ping", "p2", b"{}", Some(b"next secret")).await;
    assert_eq!(next.0, StatusCode::OK);
}

#[tokio::test]
async fn an_api_server_failure_is_a_503_so_github_redelivers() {
    let w = World::new("hook-503").await;
    // The same state, with a client whose API server is gone.
    let mut config = w.ground.kube_config().await;
    config.cluster_url = "https://127.0.0.1:9".parse().unwrap();
    let dead = pacer::controller::kube_client(config).unwrap();
    let ctx = Arc::new(Context::new(
        dead,
        Arc::new(FakeEc2::new()),
        Settings::new(CONTROLLER, "https://pacer.example.test"),
    ));
    let broken = Arc::new(Web::new(
        ctx,
        w.web.pools.clone(),
        vec![Secret::new(SECRET.to_vec())],
        Some(w.ns.clone()),
    ));
    broken.ready.store(true, Ordering::SeqCst);
    let body = serde_json::to_vec(&example("queued", "queued")).unwrap();
    let response = router(broken)
        .oneshot(
            Request::post("/api/webhook")
                .header("x-github-event", "workflow_job")
                .header("x-github-delivery", "d-503")
                .header("x-hub-signature-256", sign(SECRET, &body))
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The working listener records it when GitHub redelivers.
    assert_eq!(
        w.deliver("d-503", &example("queued", "queued")).await.0,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn health_and_readiness_answer_on_a_real_socket() {
    let w = World::new("hook-health").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(w.web.clone())).await });
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{address}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let body = serde_json::to_vec(&example("queued", "queued")).unwrap();
    let response = http
        .post(format!("http://{address}/api/webhook"))
        .header("x-github-event", "workflow_job")
        .header("x-github-delivery", "socket-1")
        .header("x-hub-signature-256", sign(SECRET, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}
