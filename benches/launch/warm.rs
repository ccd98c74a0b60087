//! Queue to runner, warm start against launch, on the simulator: `pacer run` as a process,
//! moto, the fake GitHub and the simulator booting each instance's real user-data (a warm one
//! prepares, is stopped, and at its start runs its boot script again). Pool `warm` keeps
//! `BENCH_WARM` (default 3) warm instances, pool `cold` none; once the warm ones are ready, as
//! many jobs are queued to each pool at once, and each job's time from its delivery accepted
//! (its RunnerJob stored) to its runner registered (phase Running) is measured.
//!
//! The simulator boots in about a second, so the figures show what Pacer adds (a start against
//! a launch, the bootstrap, the JIT config), not EC2's boot times.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use pacer::api::{JobPhase, RunnerJob, RunnerPool};
use serde_json::json;

use crate::support::github::FakeGitHub;
use crate::support::identity::{self, Signer};
use crate::support::process::{self, WEBHOOK_SECRET};
use crate::support::simulator::{Behaviour, Simulator};
use crate::support::{Parts, current_user, ground, wait_ready, webhooks};

const REPO: &str = "example-org/api";

/// Seconds from creation to the runner registered, per job, of each kind; and the calls the
/// fake GitHub answered from the first delivery until every job had finished, by endpoint.
pub struct Figures {
    pub warm: Vec<f64>,
    pub cold: Vec<f64>,
    pub github_calls: BTreeMap<String, usize>,
}

pub async fn run(size: usize) -> Figures {
    let g = ground(Parts::Both);
    let client = g.kube_client().await;
    let ns = g.namespace(&client, "bench-warm").await;
    let id = format!("bench-warm-{}", std::process::id());
    let dir = crate::support::scratch(&format!("bench-{ns}"));
    let fake = FakeGitHub::start().await;
    fake.install(1, &[REPO]);
    Signer::new(&dir);
    identity::callback_key(&dir);
    let behaviour = Behaviour {
        stop_when_terminated: true,
        ..Default::default()
    };
    let aws = g.aws_config().await;
    let instances = dir.join("instances");
    let _sim = Simulator::start(&aws, &fake, Signer::at(&dir), &id, &instances, behaviour).await;
    let github = (fake.url.clone(), fake.app_id, fake.private_key_pem.clone());
    let setup = process::Setup {
        name: "bench-warm",
        controller_id: &id,
        namespace: &ns,
        kubeconfig: None,
        github: Some(github),
        public_url: None,
    };
    let pacer = process::start(g, &dir, setup);

    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    for (name, warm) in [("warm", size), ("cold", 0)] {
        let mut pool = g.example_pool(&ns, name);
        let spec = &mut pool["spec"];
        spec["github"] = json!({"scope": "org", "owner": "example-org"});
        spec["labels"] = json!(["self-hosted", "linux", name]);
        spec["runnerUser"] = json!(current_user());
        spec["capacity"] = json!({"type": "onDemand"});
        spec["maxRunners"] = json!(size.max(1) * 2);
        if warm > 0 {
            spec["warm"] = json!({"size": warm});
        }
        let pool: RunnerPool = serde_json::from_value(pool).unwrap();
        pools.create(&PostParams::default(), &pool).await.unwrap();
        wait_ready(&pools, name, Duration::from_secs(120)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let pool = pools.get("warm").await.unwrap();
        let ready = pool.status.and_then(|s| s.warm).map_or(0, |w| w.ready);
        if ready as usize == size {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the warm pool never had {size} ready:\n{}",
            pacer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let http = reqwest::Client::new();
    let jobs: Vec<(i64, &str)> = (0..size as i64)
        .flat_map(|i| [(61_000 + i, "warm"), (62_000 + i, "cold")])
        .collect();
    // Each job's clock starts as its delivery is accepted (the RunnerJob stored); its runner
    // is seen registered by polling every 50 ms (the status's times are whole seconds).
    let mut queued = std::collections::HashMap::new();
    let calls_before = fake.calls_by_endpoint();
    for (job_id, pool) in &jobs {
        fake.set_job(REPO, *job_id, "queued", None);
        // Queued just now, as a live delivery is (GitHub's example is years old, and a delivery
        // that old looks replayed: Pacer would ask GitHub about the job first).
        let mut event: serde_json::Value =
            serde_json::from_slice(&webhooks::queued(*job_id, &["self-hosted", "linux", pool]))
                .unwrap();
        event["workflow_job"]["created_at"] = json!(
            k8s_openapi::jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        );
        let body = serde_json::to_vec(&event).unwrap();
        let delivery = format!("bench-{job_id}");
        let answer = webhooks::send(&http, &pacer.url(), WEBHOOK_SECRET, &delivery, body).await;
        assert!(
            answer.is_ok_and(|a| a.status().is_success()),
            "job {job_id}"
        );
        queued.insert(pacer::github::job_object_name(*job_id), Instant::now());
    }
    let api: Api<RunnerJob> = Api::namespaced(client, &ns);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut figures = Figures {
        warm: Vec::new(),
        cold: Vec::new(),
        github_calls: BTreeMap::new(),
    };
    let mut seen = std::collections::HashSet::new();
    while seen.len() < jobs.len() {
        for job in api.list(&Default::default()).await.unwrap().items {
            let name = job.metadata.name.clone().unwrap_or_default();
            let Some(status) = job
                .status
                .as_ref()
                .filter(|s| s.phase_times.running.is_some())
            else {
                assert!(
                    job.status
                        .as_ref()
                        .is_none_or(|s| s.phase != JobPhase::Failed),
                    "{name} failed:\n{}",
                    pacer.log_text()
                );
                continue;
            };
            if !seen.insert(name.clone()) {
                continue;
            }
            let seconds = queued[&name].elapsed().as_secs_f64();
            let warm = (status.launch.as_ref()).is_some_and(|l| l.warm.is_some());
            match (job.spec.pool_name.as_str(), warm) {
                ("warm", true) => figures.warm.push(seconds),
                ("cold", false) => figures.cold.push(seconds),
                (pool, warm) => panic!("{name} of pool {pool}: warm {warm}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} runners registered:\n{}",
            seen.len(),
            jobs.len(),
            pacer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each runner runs its job for a moment and exits; the job finishes (its instance
    // terminated, its runner removed).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let list = api.list(&Default::default()).await.unwrap().items;
        let finished = (list.iter())
            .filter(|j| (j.status.as_ref()).is_some_and(|s| s.phase.is_finished()))
            .count();
        if finished == jobs.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{finished} of {} jobs finished:\n{}",
            jobs.len(),
            pacer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (endpoint, n) in fake.calls_by_endpoint() {
        let before = calls_before.get(&endpoint).copied().unwrap_or(0);
        if n > before {
            figures.github_calls.insert(endpoint, n - before);
        }
    }
    figures
}
