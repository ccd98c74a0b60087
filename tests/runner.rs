//! The whole life of a job on the real ground: a signed `queued` webhook, the RunnerJob, an
//! instance in moto, the runner simulator running the real user-data against the real
//! listener (bootstrap, register, complete), the instance terminated, the job Succeeded. And
//! the ways a boot fails or an impostor calls.

mod support;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use pacer::api::{JobPhase, JobResult, RunnerJob, RunnerPool};
use pacer::cloud::aws::AwsEc2;
use pacer::config::Secret;
use pacer::controller::{self, Context, Settings};
use pacer::github::{job_object_name, runner_name};
use pacer::http::runner::RunnerSide;
use pacer::http::{Web, router};
use pacer::runner::identity::TrustRoots;
use pacer::runner::release::Releases;
use pacer::runner::token::{Claims, Tokens};
use serde_json::{Value, json};
use support::github::FakeGitHub;
use support::identity::{self, Signer};
use support::simulator::{Behaviour, RUNNER_VERSION, Simulator};
use support::{Ground, Parts, ground, webhooks};

const SECRET: &[u8] = b"webhook secret for runner tests";
const ACCOUNT: &str = "123456789012";

struct World {
    ground: &'static Ground,
    ns: String,
    controller_id: String,
    jobs: Api<RunnerJob>,
    github: FakeGitHub,
    /// The listener's base URL (`server.public_url`).
    url: String,
    /// A second replica's listener (plain HTTP), serving webhooks and instances only: what
    /// an instance's try reaches when the Service routes it elsewhere.
    other_replica: String,
    dir: PathBuf,
    tokens: Tokens,
    sim: Option<Simulator>,
    http: reqwest::Client,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl World {
    /// Two pools (`alpha`, `beta`), the controllers, the listener, the fake GitHub; and the
    /// simulator, unless `behaviour` is `None`.
    async fn new(test: &str, behaviour: Option<Behaviour>) -> Self {
        Self::serving(test, behaviour, false).await
    }

    /// With `tls`, the listener serves HTTPS with a certificate from a private CA, which the
    /// instances are told to trust (`runners.ca_file`).
    async fn serving(test: &str, behaviour: Option<Behaviour>, tls: bool) -> Self {
        Self::shaped(test, behaviour, tls, false).await
    }

    /// With `enterprise`, the App is on a GitHub Enterprise Server-shaped fake (its API under
    /// `/api/v3`, no actions/runner releases), and the releases come from github.com's.
    async fn shaped(test: &str, behaviour: Option<Behaviour>, tls: bool, enterprise: bool) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pacer=info")
            .with_test_writer()
            .try_init();
        let ground = ground(Parts::Both);
        let client = ground.kube_client().await;
        let ns = ground.namespace(&client, test).await;
        let controller_id: String = format!("run-{}", ns.replace('_', "-"))
            .chars()
            .take(40)
            .collect();
        let dir = support::scratch(&format!("runner-{ns}"));

        let (github, dotcom) = if enterprise {
            let dotcom = FakeGitHub::start().await;
            (FakeGitHub::start_enterprise().await, Some(dotcom))
        } else {
            (FakeGitHub::start().await, None)
        };
        let release_source = dotcom.as_ref().unwrap_or(&github).release_source();
        github.install(1, &["example-org/api"]);
        let signer = Signer::new(&dir.join("identity"));
        let key = Secret::new(std::fs::read(identity::callback_key(&dir)).unwrap());
        let tokens = Tokens::new(key).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let url = format!("{}://{address}", if tls { "https" } else { "http" });
        let private_ca = tls.then(|| private_ca(&dir));
        let http = match &private_ca {
            Some((ca, _, _)) => reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
                .build()
                .unwrap(),
            None => reqwest::Client::new(),
        };
        let aws = ground.aws_config().await;
        let settings = Settings {
            runner_ca: private_ca.as_ref().map(|(ca, _, _)| ca.clone()),
            resync: Duration::from_secs(2),
            backoff_unit: Duration::from_millis(200),
            instance_refresh: Duration::from_millis(500),
            ..Settings::new(&controller_id, &url)
        };
        let ctx = Arc::new(
            Context::new(client.clone(), Arc::new(AwsEc2::new(&aws)), settings)
                .with_github(Arc::new(github.client())),
        );
        let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
        let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
        for (name, labels) in [
            ("alpha", json!(["self-hosted", "linux", "alpha"])),
            ("beta", json!(["self-hosted", "linux", "beta"])),
        ] {
            let mut pool = ground.example_pool(&ns, name);
            pool["spec"]["github"] = json!({"scope": "org", "owner": "example-org"});
            pool["spec"]["labels"] = labels;
            pool["spec"]["runnerUser"] = json!(support::current_user());
            pool["spec"]["ttlSecondsAfterFinished"] = json!(3600);
            let pool: RunnerPool = serde_json::from_value(pool).unwrap();
            pools.create(&PostParams::default(), &pool).await.unwrap();
        }
        let mut tasks = Vec::new();
        {
            let (ctx, pools, jobs) = (ctx.clone(), pools.clone(), jobs.clone());
            tasks.push(tokio::spawn(async move {
                controller::run(ctx, pools, jobs).await;
            }));
        }
        let (store, writer) = reflector::store();
        tasks.push(tokio::spawn(
            watcher(pools, watcher::Config::default())
                .reflect(writer)
                .for_each(|_| std::future::ready(())),
        ));
        let replica = |ctx, name: &str| {
            let trust =
                TrustRoots::from_pem(&std::fs::read(signer.certificate()).unwrap()).unwrap();
            let releases = Releases::new(&release_source, &dir.join(name)).unwrap();
            let web = Web::new(
                ctx,
                store.clone(),
                vec![Secret::new(SECRET.to_vec())],
                Some(ns.clone()),
            )
            .with_runners(RunnerSide {
                trust,
                tokens: tokens.clone(),
                region: ground.var("AWS_REGION").to_string(),
                releases: Arc::new(releases),
            });
            Arc::new(web)
        };
        let (web, other) = (
            replica(ctx.clone(), "releases"),
            replica(ctx, "other-releases"),
        );
        store.wait_until_ready().await.unwrap();
        web.ready.store(true, Ordering::SeqCst);
        other.ready.store(true, Ordering::SeqCst);
        let other_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other_replica = format!("http://{}", other_listener.local_addr().unwrap());
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(other_listener, router(other))
                .into_future()
                .await;
        }));
        match private_ca {
            None => tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, router(web)).into_future().await;
            })),
            Some((_, cert_file, key_file)) => {
                drop(listener);
                let server = pacer::config::ServerConfig {
                    public_url: url.clone(),
                    listen: address,
                    metrics_listen: "127.0.0.1:0".parse().unwrap(),
                    tls: pacer::config::TlsConfig {
                        mode: pacer::config::TlsMode::Manual,
                        cert_file: Some(cert_file),
                        key_file: Some(key_file),
                        ..Default::default()
                    },
                };
                tasks.push(tokio::spawn(async move {
                    let shutdown = std::future::pending();
                    let limits = pacer::http::serve::Limits::MAIN;
                    let _ =
                        pacer::http::serve_main(&server, router(web), None, limits, shutdown).await;
                }));
                // The TLS listener binds the address again in its own time: a webhook posted
                // before it accepts is refused (seen on a loaded machine).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while tokio::net::TcpStream::connect(address).await.is_err() {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the TLS listener on {address} did not accept within 30 s"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let releases_at = dotcom.as_ref().unwrap_or(&github);
        let sim = match behaviour {
            Some(behaviour) => {
                let sim = Simulator::start(
                    &aws,
                    &github,
                    Signer::at(&dir.join("identity")),
                    &controller_id,
                    &dir.join("instances"),
                    behaviour,
                )
                .await;
                if let Some(dotcom) = &dotcom {
                    sim.publish(dotcom, RUNNER_VERSION);
                }
                Some(sim)
            }
            None => {
                let name = pacer::github::runner_asset_name(RUNNER_VERSION, "x64");
                let url = format!("http://127.0.0.1:9/{name}");
                releases_at.add_runner_release(RUNNER_VERSION, &[(name, url, "0".repeat(64))]);
                None
            }
        };
        let world = Self {
            ground,
            ns,
            controller_id,
            jobs,
            github,
            url,
            other_replica,
            dir,
            tokens,
            sim,
            http,
            _tasks: tasks,
        };
        for pool in ["alpha", "beta"] {
            world.wait_ready(pool).await;
        }
        world
    }

    async fn wait_ready(&self, pool: &str) {
        let pools: Api<RunnerPool> = Api::namespaced(self.jobs.clone().into_client(), &self.ns);
        support::wait_ready(&pools, pool, Duration::from_secs(120)).await;
    }

    async fn wait<F: std::future::Future<Output = bool>>(
        &self,
        seconds: u64,
        mut check: impl FnMut() -> F,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Posts a signed `queued` webhook (GitHub's example, given this job's id and labels).
    async fn queue(&self, job_id: i64, labels: &[&str]) {
        let body = webhooks::queued(job_id, labels);
        webhooks::deliver_with(
            &self.http,
            &self.url,
            SECRET,
            &format!("delivery-{job_id}"),
            body,
        )
        .await;
    }

    async fn wait_phase(&self, name: &str, phases: &[JobPhase], seconds: u64) -> RunnerJob {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        loop {
            if let Some(job) = self.jobs.get_opt(name).await.unwrap()
                && let Some(status) = &job.status
                && phases.contains(&status.phase)
            {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never reached {phases:?}: {:?}",
                self.jobs
                    .get_opt(name)
                    .await
                    .unwrap()
                    .and_then(|j| j.status)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The state EC2 shows for an instance.
    async fn instance_state(&self, id: &str) -> String {
        let ec2 = aws_sdk_ec2::Client::new(&self.ground.aws_config().await);
        let out = ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
        out.reservations()[0].instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap()
    }

    async fn events_of(&self, job: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.jobs.clone().into_client(), &self.ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job))
            .collect()
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.post_to(&self.url, path, token, body).await
    }

    async fn post_to(
        &self,
        url: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let mut request = self.http.post(format!("{url}{path}")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_job_runs_on_an_instance_that_boots_the_real_user_data() {
    let w = World::new("runner-e2e", Some(Behaviour::default())).await;
    w.queue(5001, &["self-hosted", "linux", "alpha"]).await;
    let name = job_object_name(5001);
    let job = w
        .wait_phase(&name, &[JobPhase::Succeeded, JobPhase::Failed], 90)
        .await;
    let status = job.status.clone().unwrap();
    assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
    assert_eq!(
        status.completion.as_ref().unwrap().result,
        JobResult::Success
    );
    let instance = status.instance.as_ref().unwrap();
    let runner = status.runner.as_ref().unwrap();
    assert_eq!(runner.name, runner_name(&w.controller_id, 5001, 1));
    assert!(
        status
            .cost
            .as_ref()
            .is_some_and(|c| c.estimated_cost.is_some()),
        "{status:?}"
    );
    let boot = status.boot.as_ref().unwrap();
    assert_eq!(boot.instance_id, instance.id);
    assert_eq!(boot.runner.as_ref(), Some(runner));

    // The instance ran the script to its end and shut down; EC2 terminated it.
    let sim = w.sim.as_ref().unwrap();
    let booted = sim.finished(&instance.id, Duration::from_secs(10)).await;
    assert_eq!(booted.exit, Some(0), "boot log: {}", log(&booted.dir));
    assert!(booted.shut_down);
    assert_eq!(w.instance_state(&instance.id).await, "terminated");
    // The runner got the JIT config GitHub minted for its name, and was removed afterwards.
    let jit = booted.jit_config.unwrap();
    let expected = base64_of(&format!("jit:orgs/example-org:{}", runner.name));
    assert_eq!(jit, expected);
    assert!(
        !w.github
            .runner_names("orgs/example-org")
            .contains(&runner.name)
    );

    // No secret in the user-data: not the callback token, the JIT config or the key.
    let auth = std::fs::read_to_string(booted.dir.join("state/callback.headers")).unwrap();
    let token = auth.trim().strip_prefix("Authorization: Bearer ").unwrap();
    let key = std::fs::read_to_string(w.dir.join("callback-key")).unwrap();
    for secret in [token, jit.as_str(), key.trim()] {
        assert!(!booted.user_data.contains(secret));
    }
    assert!(!token.is_empty() && booted.user_data.contains(&w.url));
    // A human following the job sees each step as an Event.
    let reasons: Vec<String> = w
        .events_of(&name)
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for reason in [
        "Launched",
        "Bootstrapped",
        "RunnerRegistered",
        "Completing",
        "Succeeded",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} not in {reasons:?}"
        );
    }
    // The job keeps the token's fingerprint only.
    let stored = serde_json::to_string(&status).unwrap();
    assert!(!stored.contains(token));
}

/// The JIT config reaches the runner through `ACTIONS_RUNNER_INPUT_JITCONFIG`, read from the
/// boot script's memory on standard input: never on a command line (`/proc/*/cmdline`, which
/// any local process reads), never in sudo's log, and never in the job's environment (the
/// runner drops its `ACTIONS_RUNNER_INPUT_*` variables before it starts a job). Pool `alpha`
/// runs its runner as the boot's own user, `beta` as another user through sudo.
#[tokio::test(flavor = "multi_thread")]
async fn the_jit_config_never_reaches_a_command_line_the_sudo_log_or_the_job() {
    let w = World::new("runner-jit-secret", Some(Behaviour::default())).await;
    let pools: Api<RunnerPool> = Api::namespaced(w.jobs.clone().into_client(), &w.ns);
    pools
        .patch(
            "beta",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runnerUser": "pacer-job"}})),
        )
        .await
        .unwrap();
    w.wait(120, || async {
        let pool = pools.get("beta").await.unwrap();
        pool.status.is_some_and(|s| {
            s.observed_generation == pool.metadata.generation
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await;
    for (job_id, pool, sudo) in [(5101, "alpha", false), (5102, "beta", true)] {
        w.queue(job_id, &["self-hosted", "linux", pool]).await;
        let job = w
            .wait_phase(
                &job_object_name(job_id),
                &[JobPhase::Succeeded, JobPhase::Failed],
                90,
            )
            .await;
        let status = job.status.unwrap();
        assert_eq!(status.phase, JobPhase::Succeeded, "{pool}: {status:?}");
        let booted = w
            .sim
            .as_ref()
            .unwrap()
            .finished(&status.instance.unwrap().id, Duration::from_secs(10))
            .await;
        let runner = status.runner.unwrap();
        let jit = base64_of(&format!("jit:orgs/example-org:{}", runner.name));
        assert_eq!(booted.jit_config.as_deref(), Some(jit.as_str()), "{pool}");
        assert_eq!(booted.jit_via.as_deref(), Some("env"), "{pool}");
        assert!(
            !booted.processes.is_empty() && !booted.processes.contains(&jit),
            "{pool}: the JIT config is on a command line:\n{}",
            booted.processes
        );
        assert!(
            !booted.job_env.is_empty() && !booted.job_env.contains(&jit),
            "{pool}: the job's environment holds the JIT config"
        );
        assert!(
            !booted.job_env.contains("ACTIONS_RUNNER_INPUT_"),
            "{pool}: {}",
            booted.job_env
        );
        assert_eq!(
            !booted.sudo_log.is_empty(),
            sudo,
            "{pool}: {}",
            booted.sudo_log
        );
        assert!(
            !booted.sudo_log.contains(&jit),
            "{pool}: sudo logged the JIT config: {}",
            booted.sudo_log
        );
        let log = log(&booted.dir);
        assert!(!log.contains(&jit), "{pool}: the boot log holds it");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_trust_a_private_ca_for_the_listener_when_told() {
    let w = World::serving("runner-tls", Some(Behaviour::default()), true).await;
    assert!(w.url.starts_with("https://"));
    w.queue(5501, &["self-hosted", "linux", "alpha"]).await;
    let name = job_object_name(5501);
    let job = w
        .wait_phase(&name, &[JobPhase::Succeeded, JobPhase::Failed], 90)
        .await;
    let status = job.status.unwrap();
    assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
    let booted = w
        .sim
        .as_ref()
        .unwrap()
        .finished(&status.instance.unwrap().id, Duration::from_secs(10))
        .await;
    assert!(
        booted
            .user_data
            .contains("PACER_CA_PEM='-----BEGIN CERTIFICATE-----")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_jobs_across_two_pools_all_succeed_and_leave_nothing_running() {
    let w = World::new("runner-twenty", Some(Behaviour::default())).await;
    for n in 0..20 {
        let pool = if n % 2 == 0 { "alpha" } else { "beta" };
        w.queue(6000 + n, &["self-hosted", "linux", pool]).await;
    }
    for n in 0..20 {
        let job = w
            .wait_phase(
                &job_object_name(6000 + n),
                &[JobPhase::Succeeded, JobPhase::Failed],
                180,
            )
            .await;
        let status = job.status.unwrap();
        assert_eq!(status.phase, JobPhase::Succeeded, "job {n}: {status:?}");
        let pool = if n % 2 == 0 { "alpha" } else { "beta" };
        assert_eq!(job.spec.pool_name, pool);
    }
    let ours = AwsEc2::new(&w.ground.aws_config().await);
    use pacer::cloud::Ec2 as _;
    let alive: Vec<_> = ours
        .describe_managed_instances(&w.controller_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.is_alive())
        .collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
    let sim = w.sim.as_ref().unwrap();
    assert_eq!(sim.boots.lock().unwrap().len(), 20);
    // Twenty instances took their runner from Pacer, which fetched it from github.com once.
    let asset = pacer::github::runner_asset_name(RUNNER_VERSION, "x64");
    assert_eq!(sim.release_downloads(), HashMap::from([(asset, 1)]));
}

/// On GitHub Enterprise Server, whose API has no actions/runner releases, an instance that
/// reaches nothing but Pacer (github.com refuses it) boots with the runner Pacer fetched from
/// its release source.
#[tokio::test(flavor = "multi_thread")]
async fn on_github_enterprise_server_an_instance_runs_its_job_with_the_runner_pacer_serves() {
    let w = World::shaped("runner-ghes", Some(Behaviour::default()), false, true).await;
    assert!(w.github.url.ends_with("/api/v3"), "{}", w.github.url);
    w.queue(5301, &["self-hosted", "linux", "alpha"]).await;
    let job = w
        .wait_phase(
            &job_object_name(5301),
            &[JobPhase::Succeeded, JobPhase::Failed],
            90,
        )
        .await;
    let status = job.status.unwrap();
    assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
    // The runner was minted on the Enterprise Server; its release came through Pacer.
    assert_eq!(w.github.calls_of("generate_jitconfig"), 1);
    let sim = w.sim.as_ref().unwrap();
    let booted = sim
        .finished(&status.instance.unwrap().id, Duration::from_secs(10))
        .await;
    let boot_log = log(&booted.dir);
    assert!(
        boot_log.contains(&format!("downloading {}/api/runner/release/", w.url)),
        "{boot_log}"
    );
    let asset = pacer::github::runner_asset_name(RUNNER_VERSION, "x64");
    assert_eq!(sim.release_downloads(), HashMap::from([(asset.clone(), 1)]));

    // Only an instance with a live job's callback token is served.
    let url = format!("{}/api/runner/release/{asset}", w.url);
    for auth in [None, Some("Bearer not-a-token")] {
        let mut get = w.http.get(&url);
        if let Some(auth) = auth {
            get = get.header("authorization", auth);
        }
        assert_eq!(get.send().await.unwrap().status(), 401, "{auth:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_boot_that_cannot_get_its_runner_fails_with_the_log_tail() {
    for (test, behaviour, expect) in [
        (
            "runner-404",
            Behaviour {
                release_missing: true,
                ..Default::default()
            },
            "answered 404",
        ),
        (
            "runner-digest",
            Behaviour {
                wrong_digest: true,
                ..Default::default()
            },
            "its source publishes; Pacer does not serve it",
        ),
    ] {
        let w = World::new(test, Some(behaviour)).await;
        w.queue(7001, &["self-hosted", "linux", "beta"]).await;
        let name = job_object_name(7001);
        let job = w
            .wait_phase(&name, &[JobPhase::Succeeded, JobPhase::Failed], 90)
            .await;
        let status = job.status.unwrap();
        assert_eq!(status.phase, JobPhase::Failed, "{test}: {status:?}");
        // The boot failed before a runner took the job, so GitHub is asked whether the job
        // is still queued: the fake GitHub has no such job, so it ends rather than retries.
        let error = status.last_error.as_ref().unwrap();
        assert_eq!(error.reason, "NotQueued", "{test}: {error:?}");
        assert!(error.message.contains("BootFailed"), "{test}: {error:?}");
        let tail = status.boot.as_ref().unwrap().log_tail.clone().unwrap();
        assert!(tail.contains(expect), "{test}: {tail}");
        let instance = status.instance.unwrap().id;
        assert_eq!(w.instance_state(&instance).await, "terminated");
        let events = w.events_of(&name).await;
        let boot_failed = events
            .iter()
            .find(|e| e.reason.as_deref() == Some("BootFailed"))
            .unwrap_or_else(|| panic!("{test}: no BootFailed event in {events:?}"));
        assert!(boot_failed.note.as_deref().unwrap().contains(expect));
        // The runner never ran.
        let booted = w
            .sim
            .as_ref()
            .unwrap()
            .finished(&instance, Duration::from_secs(10))
            .await;
        assert!(booted.jit_config.is_none() && booted.shut_down);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_github_slower_than_the_request_timeout_makes_no_instance_shut_itself_down() {
    let w = World::new("runner-slow-github", Some(Behaviour::default())).await;
    // Minting a runner config takes longer than the listener gives a request (10 s): the
    // instance is told to ask again, and collects the answer the bootstrap kept for it.
    w.github.slow("generate_jitconfig", Duration::from_secs(12));
    w.queue(5101, &["self-hosted", "linux", "alpha"]).await;
    let name = job_object_name(5101);
    let job = w
        .wait_phase(&name, &[JobPhase::Succeeded, JobPhase::Failed], 120)
        .await;
    let status = job.status.unwrap();
    assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
    assert!(status.previous_attempts.is_empty(), "{status:?}");
    assert_eq!(
        w.github.calls_of("generate_jitconfig"),
        1,
        "one runner minted"
    );
    let instance = status.instance.unwrap().id;
    let booted = w
        .sim
        .as_ref()
        .unwrap()
        .finished(&instance, Duration::from_secs(10))
        .await;
    assert_eq!(booted.exit, Some(0), "boot log: {}", log(&booted.dir));
}

/// Behind a Service, an instance's next try may reach another replica than the one that
/// started its bootstrap, or that replica may be gone: the answer waits, sealed, in the
/// RunnerJob's status, and whichever replica the instance reaches hands it out, once.
/// A replica killed between a bootstrap's claim and its record leaves a claim with nothing on
/// it (no runner, no answer) that no process will free. The same instance is told to ask again
/// while it is young, and makes the claim afresh once it is `CLAIM_ORPHANED` old, on the same
/// attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_left_by_a_replica_killed_before_its_record_is_made_afresh_by_its_instance() {
    let w = World::new("runner-orphan", None).await;
    w.queue(5301, &["self-hosted", "linux", "alpha"]).await;
    let name = job_object_name(5301);
    let job = w.wait_phase(&name, &[JobPhase::Booting], 60).await;
    let instance = job.status.unwrap().instance.unwrap().id;
    let signer = Signer::at(&w.dir.join("identity"));
    let now = k8s_openapi::jiff::Timestamp::now();
    let request = |id: &str| {
        let region = w.ground.var("AWS_REGION");
        let document = identity::document(ACCOUNT, region, id, "x86_64", &now.to_string());
        json!({ "signature": signer.sign(&document), "document": document })
    };
    let orphan = |age: Duration| {
        let at = now - age;
        Patch::Merge(json!({"status": {"boot": {
            "instanceId": instance,
            "bootstrappedAt": at.to_string(),
            "tokenSha256": "0".repeat(64),
        }}}))
    };
    let params = PatchParams::default();
    // Claimed a moment ago: its answer may still come, so the instance asks again.
    w.jobs
        .patch_status(&name, &params, &orphan(Duration::from_secs(1)))
        .await
        .unwrap();
    let (status, answer) = w
        .post("/api/runner/bootstrap", None, request(&instance))
        .await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.get("jitConfig").is_none(), "{answer}");
    // Nothing recorded on it past CLAIM_ORPHANED: the same instance bootstraps.
    let old = pacer::domain::job::CLAIM_ORPHANED + Duration::from_secs(2);
    w.jobs
        .patch_status(&name, &params, &orphan(old))
        .await
        .unwrap();
    let (status, answer) = w
        .post("/api/runner/bootstrap", None, request(&instance))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["jitConfig"].as_str().is_some_and(|c| !c.is_empty()),
        "{answer}"
    );
    assert_eq!(
        w.github.calls_of("generate_jitconfig"),
        1,
        "one runner minted"
    );
    let status = w.jobs.get(&name).await.unwrap().status.unwrap();
    assert!(status.previous_attempts.is_empty(), "{status:?}");
    assert_ne!(status.boot.unwrap().token_sha256, "0".repeat(64));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_collects_its_bootstrap_answer_from_another_replica_once() {
    let w = World::new("runner-handover", None).await;
    w.queue(5201, &["self-hosted", "linux", "alpha"]).await;
    let job = w
        .wait_phase(&job_object_name(5201), &[JobPhase::Booting], 60)
        .await;
    let instance = job.status.unwrap().instance.unwrap().id;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let signer = Signer::at(&w.dir.join("identity"));
    let document = identity::document(
        ACCOUNT,
        w.ground.var("AWS_REGION"),
        &instance,
        "x86_64",
        &now,
    );
    let request = json!({ "signature": signer.sign(&document), "document": document });
    let name = job_object_name(5201);
    let sealed = || async {
        let job = w.jobs.get(&name).await.unwrap();
        job.status.unwrap().boot.and_then(|b| b.answer)
    };

    // The first try reaches this replica, which starts the bootstrap; minting the runner
    // takes 3 s and the instance gives up after 1 s.
    w.github.slow("generate_jitconfig", Duration::from_secs(3));
    let gave_up = w
        .http
        .post(format!("{}/api/runner/bootstrap", w.url))
        .json(&request)
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    // Every later try reaches the other replica: told to ask again, then given the answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let (status, answer) = w
            .post_to(
                &w.other_replica,
                "/api/runner/bootstrap",
                None,
                request.clone(),
            )
            .await;
        match status {
            200 => break answer,
            503 => assert!(tokio::time::Instant::now() < deadline, "never answered"),
            _ => panic!("{status}: {answer}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        answer["jitConfig"].as_str().is_some_and(|c| !c.is_empty()),
        "{answer}"
    );
    assert!(
        answer["callbackToken"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{answer}"
    );
    assert_eq!(
        w.github.calls_of("generate_jitconfig"),
        1,
        "one runner minted"
    );
    assert_eq!(
        sealed().await,
        None,
        "the answer left the status as it was handed out"
    );
    // Handed out once: a replay gets nothing from either replica (told to ask again until
    // the hold is over, then refused for good).
    let (status, replay) = w.post("/api/runner/bootstrap", None, request.clone()).await;
    assert_eq!(status, 503, "{replay}");
    assert!(replay.get("jitConfig").is_none(), "{replay}");
    let (status, replay) = w
        .post_to(&w.other_replica, "/api/runner/bootstrap", None, request)
        .await;
    assert_eq!(status, 503, "{replay}");
    assert!(replay.get("jitConfig").is_none(), "{replay}");
    assert_eq!(
        w.github.calls_of("generate_jitconfig"),
        1,
        "no second runner"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_interruption_notice_is_reported_once_and_recorded_with_an_event() {
    let behaviour = Behaviour {
        spot_notice: true,
        runner_seconds: Some(3.0),
        ..Default::default()
    };
    let w = World::new("runner-notice", Some(behaviour)).await;
    w.queue(5201, &["self-hosted", "linux", "alpha"]).await;
    let name = job_object_name(5201);
    let job = w
        .wait_phase(&name, &[JobPhase::Succeeded, JobPhase::Failed], 90)
        .await;
    let status = job.status.unwrap();
    // EC2 did not reclaim it after all: the job ran to its end.
    assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
    let interruption = status.interruption.expect("the notice is recorded");
    assert_eq!(interruption.kind, "spot-interruption");
    assert!(
        interruption.notice.contains("terminate"),
        "{interruption:?}"
    );
    let notices: Vec<_> = (w.events_of(&name).await.into_iter())
        .filter(|e| e.reason.as_deref() == Some("SpotInterruptionNotice"))
        .collect();
    assert_eq!(notices.len(), 1, "reported once: {notices:?}");
    let instance = status.instance.unwrap();
    assert!(notices[0].note.as_deref().unwrap().contains(&instance.id));
    let booted = w
        .sim
        .as_ref()
        .unwrap()
        .finished(&instance.id, Duration::from_secs(10))
        .await;
    assert_eq!(booted.exit, Some(0), "boot log: {}", log(&booted.dir));
}

/// A captured `queued` delivery replayed under a new delivery id after its job finished and its
/// RunnerJob was deleted records and launches nothing: answered from memory when the job's
/// `completed` delivery came, from GitHub's word when it did not.
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_queued_delivery_for_a_finished_job_launches_nothing() {
    let w = World::new("runner-replay", Some(Behaviour::default())).await;
    let labels = ["self-hosted", "linux", "alpha"];
    for (job_id, completed_delivery) in [(9101, true), (9102, false)] {
        let name = job_object_name(job_id);
        let captured = webhooks::queued(job_id, &labels);
        w.queue(job_id, &labels).await;
        let job = w.wait_phase(&name, &[JobPhase::Succeeded], 90).await;
        let runner = job.status.unwrap().runner.unwrap();
        // What GitHub says once the job ran.
        w.github.set_job(
            "example-org/api",
            job_id,
            "completed",
            Some((runner.id, runner.name.as_str())),
        );
        if completed_delivery {
            let mut completed: Value = serde_json::from_slice(&captured).unwrap();
            completed["action"] = json!("completed");
            let j = &mut completed["workflow_job"];
            j["status"] = json!("completed");
            j["conclusion"] = json!("success");
            j["runner_id"] = json!(runner.id);
            j["runner_name"] = json!(runner.name);
            let body = serde_json::to_vec(&completed).unwrap();
            let delivery = format!("completed-{job_id}");
            webhooks::deliver_with(&w.http, &w.url, SECRET, &delivery, body).await;
        }
        w.jobs.delete(&name, &Default::default()).await.unwrap();
        w.wait(60, || async {
            w.jobs.get_opt(&name).await.unwrap().is_none()
        })
        .await;
        let tagged = format!("{}/{name}", w.ns);
        let proxy = w.ground.proxy();
        let fleets = proxy.calls_of("CreateFleet", &tagged).await.len();
        assert_eq!(fleets, 1);
        let lookups = w.github.calls_of("get_workflow_job");

        let replay = format!("replay-{job_id}");
        webhooks::deliver_with(&w.http, &w.url, SECRET, &replay, captured).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            w.jobs.get_opt(&name).await.unwrap().is_none(),
            "job {job_id}: the replay recorded a RunnerJob"
        );
        assert_eq!(
            proxy.calls_of("CreateFleet", &tagged).await.len(),
            fleets,
            "job {job_id}: the replay launched"
        );
        if completed_delivery {
            assert_eq!(
                w.github.calls_of("get_workflow_job"),
                lookups,
                "answered from memory"
            );
        }
    }
}

/// Once an instance of Pacer's has booted, Pacer knows its account: a signed document from any
/// other account is refused without asking EC2, and an instance EC2 said is not Pacer's is
/// refused again from memory for a while.
#[tokio::test(flavor = "multi_thread")]
async fn strangers_cost_no_describe_instances_call() {
    let w = World::new("runner-strangers", Some(Behaviour::default())).await;
    w.queue(8101, &["self-hosted", "linux", "alpha"]).await;
    let job = w
        .wait_phase(&job_object_name(8101), &[JobPhase::Succeeded], 90)
        .await;
    assert!(job.status.unwrap().boot.is_some());
    let region = w.ground.var("AWS_REGION");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let signer = Signer::at(&w.dir.join("identity"));
    let w = &w;
    let post = |account: &'static str, instance: &'static str| {
        let document = identity::document(account, region, instance, "x86_64", &now);
        let body = json!({ "signature": signer.sign(&document), "document": document });
        async move { w.post("/api/runner/bootstrap", None, body).await }
    };
    let describes = |instance: &'static str| async move {
        w.ground
            .proxy()
            .calls_of("DescribeInstances", instance)
            .await
            .len()
    };

    let foreign = "i-0f0e0d0c0b0a09080";
    for _ in 0..5 {
        let (status, answer) = post("210987654321", foreign).await;
        assert_eq!(status, 401, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("not Pacer's"),
            "{answer}"
        );
    }
    assert_eq!(describes(foreign).await, 0);

    let unknown = "i-0a1a2a3a4a5a6a7a8";
    for _ in 0..5 {
        let (status, answer) = post(ACCOUNT, unknown).await;
        assert_eq!(status, 401, "{answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("not one Pacer launched"),
            "{answer}"
        );
    }
    assert_eq!(describes(unknown).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn impostors_get_no_runner_config_and_no_callback() {
    let w = World::new("runner-security", None).await;
    w.queue(8001, &["self-hosted", "linux", "alpha"]).await;
    w.queue(8002, &["self-hosted", "linux", "alpha"]).await;
    let first = w
        .wait_phase(&job_object_name(8001), &[JobPhase::Booting], 60)
        .await;
    let second = w
        .wait_phase(&job_object_name(8002), &[JobPhase::Booting], 60)
        .await;
    let instance = first.status.as_ref().unwrap().instance.clone().unwrap();
    let other_instance = second.status.as_ref().unwrap().instance.clone().unwrap();
    let region = w.ground.var("AWS_REGION");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let signer = Signer::at(&w.dir.join("identity"));
    let stranger = Signer::new(&w.dir.join("stranger"));
    let request = |signer: &Signer, document: String| json!({ "signature": signer.sign(&document), "document": document });
    let jit_calls = || w.github.calls_of("generate_jitconfig");

    let refused = [
        (
            "another key",
            "does not verify",
            request(
                &stranger,
                identity::document(ACCOUNT, region, &instance.id, "x86_64", &now),
            ),
        ),
        (
            "an unknown instance",
            "not one Pacer launched",
            request(
                &signer,
                identity::document(ACCOUNT, region, "i-0abcdef0123456789", "x86_64", &now),
            ),
        ),
        (
            "another account",
            "from account 210987654321",
            request(
                &signer,
                identity::document("210987654321", region, &instance.id, "x86_64", &now),
            ),
        ),
        (
            "another region",
            "Pacer launches in",
            request(
                &signer,
                identity::document(ACCOUNT, "eu-north-1", &instance.id, "x86_64", &now),
            ),
        ),
        (
            "a stale document",
            "outside the boot timeout",
            request(
                &signer,
                identity::document(
                    ACCOUNT,
                    region,
                    &instance.id,
                    "x86_64",
                    "2020-01-01T00:00:00Z",
                ),
            ),
        ),
    ];
    for (what, why, body) in refused {
        let (status, answer) = w.post("/api/runner/bootstrap", None, body).await;
        assert_eq!(status, 401, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(why), "{what}: {error}");
    }
    // A document that is not the signed one.
    let mut swapped = request(
        &signer,
        identity::document(ACCOUNT, region, &instance.id, "x86_64", &now),
    );
    swapped["document"] = json!(identity::document(
        ACCOUNT,
        region,
        &other_instance.id,
        "x86_64",
        &now
    ));
    let (status, answer) = w.post("/api/runner/bootstrap", None, swapped).await;
    assert_eq!(status, 401);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not the document sent")
    );
    assert_eq!(
        w.post("/api/runner/bootstrap", None, json!({"nope": 1}))
            .await
            .0,
        400
    );
    // Another instance carrying the job's tags, as whoever may tag instances could make one.
    let copy = copy_of_instance(w.ground, &instance.id).await;
    let (status, answer) = w
        .post(
            "/api/runner/bootstrap",
            None,
            request(
                &signer,
                identity::document(ACCOUNT, region, &copy, "x86_64", &now),
            ),
        )
        .await;
    assert_eq!(status, 401, "a copy's bootstrap: {answer}");
    // The two jobs went out in one batch: its members name their own instances, not the copy.
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains(&instance.id) && error.contains(&format!("not {copy}")),
        "{answer}"
    );
    // Gone again before Pacer would clean it up with the job: the proxy never saw its tags.
    moto(w.ground)
        .await
        .terminate_instances()
        .instance_ids(&copy)
        .send()
        .await
        .unwrap();
    assert_eq!(jit_calls(), 0);

    // The real instance, once.
    let good = request(
        &signer,
        identity::document(ACCOUNT, region, &instance.id, "x86_64", &now),
    );
    let (status, answer) = w.post("/api/runner/bootstrap", None, good.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let token = answer["callbackToken"].as_str().unwrap().to_string();
    assert!(answer["jitConfig"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(answer["runner"]["version"], json!(RUNNER_VERSION));
    assert_eq!(jit_calls(), 1);
    // A replay once the answer was handed out is refused; it gets nothing.
    let (status, answer) = w.post("/api/runner/bootstrap", None, good).await;
    assert_eq!(status, 409, "a replay: {answer}");
    assert!(answer.get("callbackToken").is_none() && answer.get("jitConfig").is_none());
    assert_eq!(jit_calls(), 1);

    // Callbacks: forged, expired, another job's, none.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let claims = Claims {
        namespace: w.ns.clone(),
        name: job_object_name(8001),
        uid: first.metadata.uid.clone().unwrap(),
        instance: instance.id.clone(),
        expires: k8s_openapi::jiff::Timestamp::now().as_second() - 1,
    };
    let expired = String::from_utf8(w.tokens.mint(&claims).expose().to_vec()).unwrap();
    let others = String::from_utf8(
        w.tokens
            .mint(&Claims {
                instance: other_instance.id.clone(),
                expires: claims.expires + 3600,
                ..claims.clone()
            })
            .expose()
            .to_vec(),
    )
    .unwrap();
    for (what, bad) in [
        ("forged", Some(forged.as_str())),
        ("expired", Some(expired.as_str())),
        ("another instance's", Some(others.as_str())),
        ("missing", None),
    ] {
        for path in [
            "/api/runner/register",
            "/api/runner/complete",
            "/api/runner/error",
        ] {
            let (status, answer) = w.post(path, bad, json!({"exitCode": 0})).await;
            assert_eq!(status, 401, "{what} token on {path}: {answer}");
        }
    }
    let job = w.jobs.get(&job_object_name(8001)).await.unwrap();
    let status = job.status.unwrap();
    assert!(status.runner.is_none() && status.completion.is_none());

    // The real token registers, and the job runs.
    let (status, answer) = w
        .post("/api/runner/register", Some(&token), json!({}))
        .await;
    assert_eq!(status, 200, "{answer}");
    w.wait_phase(&job_object_name(8001), &[JobPhase::Running], 30)
        .await;

    // Once the job is over, its token is good for nothing.
    let exit = json!({"exitCode": 0});
    let (status, answer) = w.post("/api/runner/complete", Some(&token), exit).await;
    assert_eq!(status, 200, "{answer}");
    w.wait_phase(&job_object_name(8001), &[JobPhase::Succeeded], 60)
        .await;
    for path in [
        "/api/runner/register",
        "/api/runner/complete",
        "/api/runner/error",
    ] {
        let (status, answer) = w.post(path, Some(&token), json!({"exitCode": 1})).await;
        assert_eq!(status, 409, "{path} on a finished job: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("Succeeded"),
            "{answer}"
        );
    }
    let status = w
        .jobs
        .get(&job_object_name(8001))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.phase, JobPhase::Succeeded);
    assert_eq!(status.completion.unwrap().result, JobResult::Success);
    assert!(status.last_error.is_none(), "{:?}", status.last_error);
    assert!(status.boot.unwrap().log_tail.is_none());
}

/// An EC2 client straight to moto, not through the proxy that records Pacer's calls for the
/// IAM simulation: what the test itself does there is not Pacer's to be allowed.
async fn moto(ground: &Ground) -> aws_sdk_ec2::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(
            ground.var("AWS_REGION").to_string(),
        ))
        .endpoint_url(ground.var("MOTO_URL"))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "ground",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
}

/// Runs, straight in moto, another instance of `id`'s image with `id`'s tags; its id.
async fn copy_of_instance(ground: &Ground, id: &str) -> String {
    let ec2 = moto(ground).await;
    let described = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    let original = described.reservations()[0].instances()[0].clone();
    let tags = aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
        .set_tags(Some(original.tags().to_vec()))
        .build();
    let run = ec2
        .run_instances()
        .image_id(original.image_id().unwrap())
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .tag_specifications(tags)
        .send()
        .await
        .unwrap();
    run.instances()[0].instance_id().unwrap().to_string()
}

/// A private CA and a certificate it signed for 127.0.0.1, written under `dir`: (CA PEM, cert
/// file, key file).
fn private_ca(dir: &std::path::Path) -> (String, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test private CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (ca.pem(), cert_file, key_file)
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("state/boot.log")).unwrap_or_default()
}

/// A pool with `warm.size: 3` keeps three prepared, stopped instances: launched from its
/// template with the `gha:warm` tag and no job's, each runs the real boot script's preparation
/// against the listener (the pool's release downloaded and unpacked, no JIT config, no job
/// taken), reports `prepared`, and is stopped by the replica it reached. The pool's status
/// counts them. A change of the pool's template replaces them; a deleted pool leaves none.
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_pool_keeps_its_instances_prepared_and_stopped() {
    let (w, pools) = warm_world("warm-keep", 3, None, json!({})).await;
    let first = warm_ready(&w, &pools, None).await;
    // What the three stopped volumes cost: the pool's root volume size, at EBS's gp3 price
    // per GB-month as the Pricing API gives it, by the hour.
    let storage = (pools.get("alpha").await.unwrap().status)
        .and_then(|s| s.warm_storage)
        .unwrap();
    assert!(storage.volume_gib > 0, "{storage:?}");
    assert_eq!(storage.price_per_gib_month.as_deref(), Some("0.0800000000"));
    let hourly = 0.08 * f64::from(storage.volume_gib) * 3.0 / 730.0;
    assert_eq!(
        storage.hourly_cost,
        Some(format!("{hourly:.6}")),
        "{storage:?}"
    );
    let sim = w.sim.as_ref().unwrap();
    for (id, _) in &first {
        let booted = sim.finished(id, Duration::from_secs(10)).await;
        let boot_log = log(&booted.dir);
        assert!(booted.dir.join("state/prepared").exists(), "{boot_log}");
        assert!(booted.dir.join("state/boot.sh").exists(), "{boot_log}");
        let unit = std::fs::read_to_string(booted.dir.join("systemd/pacer-runner.service"));
        assert!(unit.unwrap().contains("state/boot.sh"), "{boot_log}");
        let enabled = std::fs::read_to_string(booted.dir.join("systemctl.log")).unwrap();
        assert_eq!(enabled.trim(), "enable pacer-runner.service");
        assert!(booted.dir.join("runner/run.sh").exists(), "{boot_log}");
        assert!(booted.jit_config.is_none(), "a warm instance takes no job");
        assert!(
            !booted.shut_down,
            "stopped by Pacer, not shut down: {boot_log}"
        );
        assert!(
            boot_log.contains("prepared; waiting to be stopped"),
            "{boot_log}"
        );
    }
    // No RunnerJob was made or taken for them.
    assert!(
        w.jobs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        sim.release_downloads().values().sum::<u32>(),
        1,
        "Pacer fetched the release once for the three"
    );

    // Three jobs take them: each warm instance is started (no launch for any job), runs its
    // job from where it was prepared, and is terminated; the pool makes three new ones.
    let launches = || async {
        let proxy = w.ground.proxy();
        let mut calls = proxy.calls_of("CreateFleet", "").await;
        calls.extend(proxy.calls_of("RunInstances", "").await);
        // This test's (other tests share the proxy), and not the pools' launch checks (dry runs).
        let ours = format!("\"{}\"", w.controller_id);
        calls.retain(|c| {
            let params = c.params.to_string();
            params.contains(&ours) && !params.contains(r#""DryRun":"true""#)
        });
        calls
    };
    let warm_launches = launches().await.len();
    let names: Vec<String> = (7101..7104).map(job_object_name).collect();
    for job_id in 7101..7104 {
        w.queue(job_id, &["self-hosted", "linux", "alpha"]).await;
    }
    let mut taken = Vec::new();
    for name in &names {
        let job = (w.wait_phase(name, &[JobPhase::Succeeded, JobPhase::Failed], 90)).await;
        let status = job.status.unwrap();
        assert_eq!(status.phase, JobPhase::Succeeded, "{name}: {status:?}");
        let id = status.instance.as_ref().unwrap().id.clone();
        assert!(
            first.iter().any(|(warm, _)| *warm == id),
            "{name} took {id}"
        );
        let took = status.launch.as_ref().and_then(|l| l.warm.as_ref());
        assert_eq!(took.map(|t| t.instance.as_str()), Some(id.as_str()));
        let booted = sim.finished(&id, Duration::from_secs(10)).await;
        let boot_log = log(&booted.dir);
        assert_eq!(booted.starts, 1, "{id} booted again: {boot_log}");
        assert_eq!(booted.exit, Some(0), "{boot_log}");
        assert!(
            booted.jit_config.is_some() && booted.shut_down,
            "{boot_log}"
        );
        assert_eq!(
            boot_log.matches("pacer: downloading").count(),
            1,
            "the runner came with the preparation only: {boot_log}"
        );
        assert_eq!(w.instance_state(&id).await, "terminated", "{id}");
        taken.push(id);
    }
    taken.sort();
    taken.dedup();
    assert_eq!(taken.len(), 3, "one warm instance per job: {taken:?}");
    let started = w.ground.proxy().calls_of("StartInstances", "").await;
    for id in &taken {
        assert!(
            started
                .iter()
                .any(|c| c.params.to_string().contains(id.as_str())),
            "{id} was not started"
        );
    }
    let refilled = warm_ready(&w, &pools, None).await;
    assert!(refilled.iter().all(|(id, _)| !taken.contains(id)));
    let since_jobs = &launches().await[warm_launches..];
    assert!(
        !since_jobs.is_empty(),
        "the pool launched its new warm instances"
    );
    for call in since_jobs {
        let params = call.params.to_string();
        assert!(params.contains("gha:warm"), "a launch for a job: {params}");
    }
    let events: Vec<String> = (w.events_of(&names[0]).await.into_iter())
        .filter_map(|e| e.reason)
        .collect();
    assert!(events.iter().any(|r| r == "Launched"), "{events:?}");

    // A new template version (the pool's script changed): three new ones, the old ones gone.
    let first = refilled;
    let template = &first[0].1;
    let script = json!({"spec": {"userData": "echo prepared by the second version"}});
    pools
        .patch("alpha", &PatchParams::default(), &Patch::Merge(&script))
        .await
        .unwrap();
    let second = warm_ready(&w, &pools, Some(template)).await;
    for (id, _) in &first {
        assert_eq!(w.instance_state(id).await, "terminated", "{id}");
    }
    let events: Vec<String> = (w.events_of("alpha").await.into_iter())
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        events.iter().any(|r| r == "WarmInstanceStale"),
        "{events:?}"
    );
    assert!(events.iter().any(|r| r == "WarmLaunched"), "{events:?}");

    // A deleted pool leaves no warm instance behind.
    pools.delete("alpha", &Default::default()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (id, _) in &second {
        loop {
            let state = w.instance_state(id).await;
            if state == "terminated" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} is {state} after its pool was deleted"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A world whose pool `alpha` keeps `size` warm instances (on-demand), with `extra` merged into
/// its spec; the simulated instances stop as EC2 stops or terminates them, and a runner runs its
/// job `runner_seconds` (0.2 when `None`).
async fn warm_world(
    test: &str,
    size: i32,
    runner_seconds: Option<f64>,
    extra: Value,
) -> (World, Api<RunnerPool>) {
    let behaviour = Behaviour {
        stop_when_terminated: true,
        runner_seconds,
        ..Default::default()
    };
    let w = World::new(test, Some(behaviour)).await;
    let pools: Api<RunnerPool> = Api::namespaced(w.jobs.clone().into_client(), &w.ns);
    let mut spec = json!({
        "warm": {"size": size},
        "capacity": {"type": "onDemand", "fallbackToOnDemand": false},
    });
    for (key, value) in extra.as_object().into_iter().flatten() {
        spec[key] = value.clone();
    }
    let patch = Patch::Merge(json!({ "spec": spec }));
    pools
        .patch("alpha", &PatchParams::default(), &patch)
        .await
        .unwrap();
    (w, pools)
}

/// Waits for pool `alpha` of `w` to count three ready warm instances, and returns the three
/// instances EC2 lists alive (id and `gha:warm` tag): stopped, of the pool, naming no job, and
/// launched from a template other than `not_from`.
async fn warm_ready(
    w: &World,
    pools: &Api<RunnerPool>,
    not_from: Option<&str>,
) -> Vec<(String, String)> {
    settled_warm(w, pools, 3, not_from).await
}

/// Waits for pool `alpha` of `w` to count `size` ready warm instances, as [`warm_ready`].
async fn wait_warm(w: &World, pools: &Api<RunnerPool>, size: i32) -> Vec<(String, String)> {
    settled_warm(w, pools, size, None).await
}

async fn settled_warm(
    w: &World,
    pools: &Api<RunnerPool>,
    size: i32,
    not_from: Option<&str>,
) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let pool = pools.get("alpha").await.unwrap();
        let counts = pool.status.as_ref().and_then(|s| s.warm);
        let listed = controller_instances(w).await;
        let alive: Vec<_> = (listed.iter())
            .filter(|i| {
                let state = i.state().and_then(|s| s.name()).map(|n| n.as_str());
                !matches!(state, Some("terminated" | "shutting-down"))
            })
            .collect();
        let tag = |i: &aws_sdk_ec2::types::Instance, key: &str| {
            (i.tags().iter())
                .find(|t| t.key() == Some(key))
                .and_then(|t| t.value())
                .map(String::from)
        };
        let settled = counts.is_some_and(|c| (c.ready, c.preparing, c.stopping) == (size, 0, 0))
            && alive.len() == size as usize
            && alive.iter().all(|i| {
                i.state().and_then(|s| s.name()).map(|n| n.as_str()) == Some("stopped")
                    && tag(i, "gha:warm").is_some_and(|t| Some(t.as_str()) != not_from)
            });
        if settled {
            return alive
                .iter()
                .map(|i| {
                    let id = i.instance_id().unwrap().to_string();
                    assert_eq!(tag(i, "gha:pool"), Some(format!("{}/alpha", w.ns)), "{id}");
                    let job = tag(i, pacer::domain::launch::RUNNER_JOB_UID);
                    assert_eq!(job, None, "{id} names no job");
                    let template = tag(i, "gha:warm").unwrap();
                    assert!(template.starts_with("lt-"), "{id}: {template}");
                    (id, template)
                })
                .collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the warm pool never settled at {size} ready: {counts:?}, {} alive",
            alive.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A warm instance whose preparation fails (the pool's script exits non-zero) reports it with
/// its preparation token: Pacer terminates it and tells the pool, with the log's last line.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_warm_preparation_is_terminated_with_an_event() {
    let (w, pools) = warm_world(
        "warm-fail",
        1,
        None,
        json!({"userData": "echo the preparation broke; exit 3"}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let note = loop {
        let failed = (w.events_of("alpha").await.into_iter())
            .find(|e| e.reason.as_deref() == Some("WarmPreparationFailed"));
        if let Some(event) = failed {
            break event.note.unwrap_or_default();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no WarmPreparationFailed Event"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let id = note
        .split_whitespace()
        .find(|word| word.starts_with("i-"))
        .unwrap()
        .to_string();
    assert!(
        note.contains("failed at line"),
        "the log's last line: {note}"
    );
    assert_eq!(w.instance_state(&id).await, "terminated", "{note}");
    let booted = w
        .sim
        .as_ref()
        .unwrap()
        .finished(&id, Duration::from_secs(10))
        .await;
    let boot_log = log(&booted.dir);
    assert!(boot_log.contains("the preparation broke"), "{boot_log}");
    assert!(!booted.dir.join("state/prepared").exists(), "{boot_log}");

    // They keep failing: the pool counts them in a row, says so in a False condition, and
    // waits twice as long before each new warm launch. The test's backoff unit is 200 ms: the
    // seventh failure holds launches for 12.8 s, well past the 5 s between the pool's passes
    // while an instance prepares (without the hold, the next launch comes within those 5 s).
    let (failures, condition) = warm_failing(&pools, 7).await;
    assert_eq!(condition.reason, "WarmPreparationFailing", "{condition:?}");
    for said in ["failed at line", failures.instance.as_str(), "warm launch"] {
        assert!(condition.message.contains(said), "{said}: {condition:?}");
    }
    let hold = Duration::from_millis(200) * (1 << (failures.count - 1));
    let failed_at = failures.at.0.as_second();
    let deadline = tokio::time::Instant::now() + hold + Duration::from_secs(30);
    let next = loop {
        let launched = warm_launch_times(&w).await;
        let after = (launched.iter())
            .filter(|(id, t)| *id != failures.instance && *t >= failed_at)
            .map(|(_, t)| *t)
            .min();
        if let Some(t) = after {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing launched after the hold: {launched:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // EC2's LaunchTime is in whole seconds.
    assert!(
        next - failed_at >= hold.as_secs() as i64 - 1,
        "launched {} s after {failures:?}, inside its hold of {hold:?}",
        next - failed_at
    );

    // A fix of the spec is a new template version: launched at once, prepared, and the pool
    // says it is kept again.
    let patch = Patch::Merge(json!({ "spec": { "userData": "echo prepared fine" } }));
    (pools.patch("alpha", &PatchParams::default(), &patch).await).unwrap();
    wait_warm(&w, &pools, 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = pools.get("alpha").await.unwrap().status.unwrap_or_default();
        let kept = (status.conditions.iter())
            .any(|c| c.type_ == "WarmPool" && c.status == "True" && c.reason == "WarmPoolKept");
        if kept && status.warm_failures.is_none() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A pool that turns invalid (its AMI gone) launches no warm instance, yet still retires the
/// ones it no longer keeps: stopped volumes are not left to bill until someone fixes the spec.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_that_is_not_ready_still_retires_the_warm_instances_it_no_longer_keeps() {
    let (w, pools) = warm_world("warm-invalid", 1, None, json!({})).await;
    let warm_id = wait_warm(&w, &pools, 1).await.remove(0).0;
    let patch = Patch::Merge(json!({ "spec": {
        "ami": "ami-0123456789abcdef0",
        "warm": {"size": 0},
    }}));
    (pools.patch("alpha", &PatchParams::default(), &patch).await).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let status = pools.get("alpha").await.unwrap().status.unwrap_or_default();
        let not_ready =
            (status.conditions.iter()).any(|c| c.type_ == "Ready" && c.status == "False");
        let state = w.instance_state(&warm_id).await;
        if not_ready && matches!(state.as_str(), "terminated" | "shutting-down") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{warm_id} is {state}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let warm: Vec<_> = (controller_instances(&w).await.into_iter())
        .filter(|i| i.tags().iter().any(|t| t.key() == Some("gha:warm")))
        .map(|i| i.instance_id().unwrap_or_default().to_string())
        .collect();
    assert_eq!(warm, vec![warm_id], "launched while not ready");
}

/// Waits for pool `alpha` to count at least `count` failed warm preparations in a row and
/// its `WarmPool` condition to be `False`.
async fn warm_failing(
    pools: &Api<RunnerPool>,
    count: i32,
) -> (
    pacer::api::WarmFailures,
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    loop {
        let status = pools.get("alpha").await.unwrap().status.unwrap_or_default();
        let condition = (status.conditions.iter())
            .find(|c| c.type_ == "WarmPool" && c.status == "False")
            .cloned();
        // The pool's pass writes the condition after the failure is counted.
        if let (Some(f), Some(c)) = (status.warm_failures.clone(), condition)
            && f.count >= count
            && c.message.contains(&f.instance)
        {
            return (f, c);
        }
        assert!(tokio::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every instance of `w`'s controller EC2 lists (moto, unproxied), terminated ones too.
async fn controller_instances(w: &World) -> Vec<aws_sdk_ec2::types::Instance> {
    let listed = moto(w.ground)
        .await
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:gha:controller")
                .values(&w.controller_id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    (listed.reservations().iter())
        .flat_map(|r| r.instances().iter().cloned())
        .collect()
}

/// Every warm instance of `w`'s controller EC2 lists, terminated ones too, with its
/// LaunchTime (seconds).
async fn warm_launch_times(w: &World) -> Vec<(String, i64)> {
    (controller_instances(w).await.iter())
        .filter(|i| i.tags().iter().any(|t| t.key() == Some("gha:warm")))
        .map(|i| {
            let at = i.launch_time().map_or(0, |t| t.secs());
            (i.instance_id().unwrap_or_default().to_string(), at)
        })
        .collect()
}

/// A warm instance EC2 cannot start for want of capacity is left as it was (stopped, never
/// run, still warm) and the job launches an instance at once, with a `WarmStartFailed` Event.
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_start_without_capacity_falls_back_to_a_launch_at_once() {
    let (w, pools) = warm_world("warm-short", 1, None, json!({})).await;
    let ready = wait_warm(&w, &pools, 1).await;
    let warm_id = &ready[0].0;
    // EC2 sends it as a server error, which the SDK retries first; the adapter classifies it
    // by its code either way.
    let fault = json!({"action": "StartInstances", "code": "InsufficientInstanceCapacity",
        "status": 400, "count": 1, "match": {"InstanceId.1": warm_id}});
    w.ground.proxy().add_fault(fault).await;
    w.queue(7201, &["self-hosted", "linux", "alpha"]).await;
    let name = job_object_name(7201);
    let job = (w.wait_phase(&name, &[JobPhase::Succeeded, JobPhase::Failed], 90)).await;
    let status = job.status.unwrap();
    assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
    let id = &status.instance.as_ref().unwrap().id;
    assert_ne!(id, warm_id, "the job ran on a launched instance");
    assert!(status.launch.is_none_or(|l| l.warm.is_none()));
    let reasons: Vec<String> = (w.events_of(&name).await.into_iter())
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "WarmStartFailed"),
        "{reasons:?}"
    );
    // Never started: still the pool's, stopped and counted ready.
    assert_eq!(w.instance_state(warm_id).await, "stopped");
    let again = wait_warm(&w, &pools, 1).await;
    assert_eq!(&again[0].0, warm_id);
}

/// StartInstances throttled past the SDK's retries right after a job took a warm instance: the
/// take is recorded, so the next pass sends the start again for the same instance, and the job
/// runs on it; nothing is launched for it and the instance is not given up.
#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_warm_start_is_sent_again_for_the_same_instance() {
    let (w, pools) = warm_world("warm-throttle", 1, None, json!({})).await;
    let warm_id = wait_warm(&w, &pools, 1).await.remove(0).0;
    // Every try the SDK makes of the first call.
    let fault = json!({"action": "StartInstances", "code": "RequestLimitExceeded",
        "status": 503, "count": 5, "match": {"InstanceId.1": &warm_id}});
    w.ground.proxy().add_fault(fault).await;
    w.queue(7301, &["self-hosted", "linux", "alpha"]).await;
    let name = job_object_name(7301);
    let job = (w.wait_phase(&name, &[JobPhase::Succeeded, JobPhase::Failed], 120)).await;
    let status = job.status.unwrap();
    assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
    assert_eq!(status.instance.as_ref().unwrap().id, warm_id);
    assert!(status.previous_attempts.is_empty(), "{status:?}");
    let starts = w.ground.proxy().calls_of("StartInstances", &warm_id).await;
    let refused = starts.iter().filter(|c| c.status == 503).count();
    assert_eq!(refused, 5, "the fault fired: {starts:?}");
    assert!(starts.iter().any(|c| c.status == 200), "{starts:?}");
    let tagged = format!("{}/{name}", w.ns);
    assert!(
        w.ground
            .proxy()
            .calls_of("CreateFleet", &tagged)
            .await
            .is_empty()
    );
}

/// A warm instance stopped under its job (as EC2's scheduled retirement or an operator would)
/// is never warm again: the job's attempt ends, the instance is terminated, and no job starts
/// it a second time; the job runs on another instance.
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_warm_instance_stopped_under_its_job_is_terminated_never_taken_again() {
    let (w, pools) = warm_world("warm-stopped", 1, Some(8.0), json!({})).await;
    let warm_id = wait_warm(&w, &pools, 1).await.remove(0).0;
    // Still queued on GitHub when the attempt ends: the job gets another instance.
    w.github.set_job("example-org/api", 7401, "queued", None);
    w.queue(7401, &["self-hosted", "linux", "alpha"]).await;
    let name = job_object_name(7401);
    let job = (w.wait_phase(&name, &[JobPhase::Running], 60)).await;
    assert_eq!(job.status.unwrap().instance.unwrap().id, warm_id);
    let ec2 = moto(w.ground).await;
    ec2.stop_instances()
        .instance_ids(&warm_id)
        .send()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let state = w.instance_state(&warm_id).await;
        if state == "terminated" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{warm_id} is {state}: a stopped warm instance a job took was left"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let job = (w.wait_phase(&name, &[JobPhase::Succeeded, JobPhase::Failed], 120)).await;
    let status = job.status.unwrap();
    assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
    assert_ne!(status.instance.as_ref().unwrap().id, warm_id);
    assert_eq!(status.previous_attempts[0].instance, warm_id, "{status:?}");
    let starts = w.ground.proxy().calls_of("StartInstances", &warm_id).await;
    assert_eq!(starts.len(), 1, "started once only: {starts:?}");
}
