//! `pacer run` alone, as a process of its own against the ground's API server and moto: how
//! long it takes from start to ready, and its resident memory idle with pools Ready and with
//! many RunnerJobs stored. The bench's own memory (its fakes and clients) is not in these
//! figures.

use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use pacer::api::{RunnerJob, RunnerJobSpec, RunnerPool};
use serde_json::json;

use crate::support::process::{self, Pacer};
use crate::support::{Parts, ground, wait_ready};

/// Pools the process serves, each made Ready against moto.
const POOLS: usize = 3;

/// A process's memory from `/proc/PID/status`, in MiB.
pub struct Memory {
    pub rss: f64,
    pub anon: f64,
    pub file: f64,
    /// The most resident it has been.
    pub peak: f64,
}

impl Memory {
    pub fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .map(|kib: f64| kib / 1024.0)
                .unwrap_or(0.0)
        };
        Self {
            rss: field("VmRSS:"),
            anon: field("RssAnon:"),
            file: field("RssFile:"),
            peak: field("VmHWM:"),
        }
    }
}

/// CPU seconds (user and system) process `pid` has spent so far, from `/proc/PID/stat`, whose
/// times are in Linux's USER_HZ, 100 per second.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis start with the state (field 3);
    // utime and stime are fields 14 and 15.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB (anonymous {:.1}, file {:.1}; peak {:.1})",
            self.rss, self.anon, self.file, self.peak
        )
    }
}

/// How long each part of becoming ready took, from the process's start.
pub struct Start {
    /// The listener accepts connections.
    pub listening: Duration,
    /// `/readyz` answers 200: the RunnerPool cache is synced.
    pub ready: Duration,
    /// The Lease names this process: the election was contested and won.
    pub leading: Duration,
    /// The RunnerJob cache is synced (the process logs it).
    pub synced: Duration,
}

impl Start {
    pub fn all(&self) -> Duration {
        self.listening
            .max(self.ready)
            .max(self.leading)
            .max(self.synced)
    }
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2?} (listening {:.2?}, /readyz {:.2?}, lease held {:.2?}, RunnerJob cache synced {:.2?})",
            self.all(),
            self.listening,
            self.ready,
            self.leading,
            self.synced
        )
    }
}

pub struct Figures {
    /// The API server serving the stored RunnerJobs as Pacer's watch asks for them, unparsed.
    pub listing: Duration,
    pub start_idle: Start,
    pub idle: Memory,
    pub stored: usize,
    pub start_stored: Start,
    /// CPU seconds the process spent from its start to ready, with the jobs stored.
    pub start_stored_cpu: f64,
    pub with_stored: Memory,
}

/// Starts `pacer run` for `ns` and measures how long it takes to be ready.
async fn start(dir: &std::path::Path, ns: &str, name: &str) -> (Pacer, Start) {
    let g = ground(Parts::Both);
    let client = g.kube_client().await;
    let leases: Api<Lease> = Api::namespaced(client, ns);
    let started = Instant::now();
    // Returns once the listener accepts connections.
    let pacer = process::start(
        g,
        dir,
        process::Setup {
            name,
            controller_id: "bench-process",
            namespace: ns,
            kubeconfig: None,
            github: None,
            public_url: None,
        },
    );
    let listening = started.elapsed();
    let http = reqwest::Client::new();
    let (mut ready, mut leading, mut synced) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready.is_none() || leading.is_none() || synced.is_none() {
        assert!(
            Instant::now() < deadline,
            "not ready:\n{}",
            pacer.log_text()
        );
        if ready.is_none()
            && http
                .get(format!("{}/readyz", pacer.url()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        {
            ready = Some(started.elapsed());
        }
        if leading.is_none()
            && let Ok(Some(lease)) = leases.get_opt("pacer-bench-process").await
            && lease.spec.and_then(|s| s.holder_identity).as_deref() == Some(name)
        {
            leading = Some(started.elapsed());
        }
        if synced.is_none() && pacer.log_text().contains("RunnerJob cache synced") {
            synced = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Start {
        listening,
        ready: ready.unwrap(),
        leading: leading.unwrap(),
        synced: synced.unwrap(),
    };
    (pacer, start)
}

/// The process's memory once it has settled: the largest of readings a second apart over
/// `window`, after `settle`.
async fn settled(pacer: &Pacer, settle: Duration, window: Duration) -> Memory {
    tokio::time::sleep(settle).await;
    let pid = pacer.child.id();
    let mut most = Memory::of(pid);
    let until = Instant::now() + window;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Memory::of(pid);
        if now.rss > most.rss {
            most = now;
        }
    }
    most.peak = Memory::of(pid).peak;
    most
}

/// A RunnerJob of pool `pool` that ran and succeeded `minutes` ago, with the status a job's
/// life leaves: the heaviest kind of RunnerJob a controller holds by the thousand (finished
/// jobs stay for `ttlSecondsAfterFinished`, an hour by default).
fn finished_job(ns: &str, pool: &str, i: usize) -> (RunnerJob, serde_json::Value) {
    let job = RunnerJob::for_queued_job(
        ns,
        &format!("job-{i}"),
        RunnerJobSpec {
            pool_name: pool.into(),
            job_id: 10_000_000 + i as i64,
            run_id: 1_000_000 + i as i64 / 4,
            repository: "example-org/api".into(),
            labels: vec!["self-hosted".into(), "linux".into(), "x64".into()],
            installation_id: Some(1),
        },
    );
    let at = |minutes: i64| {
        (k8s_openapi::jiff::Timestamp::now()
            - k8s_openapi::jiff::SignedDuration::from_mins(minutes))
        .to_string()
    };
    let instance = format!("i-0{:016x}", i);
    let status = json!({
        "phase": "Succeeded",
        "attempts": 1,
        "launch": {
            "clientToken": format!("pacer-{i:032x}"),
            "launchTemplateId": "lt-0a1b2c3d4e5f60001",
            "launchTemplateVersion": 1,
            "market": "spot",
            "fleet": true,
            "allocationStrategy": "price-capacity-optimized",
            "offerings": [
                {"type": "m7i.large", "subnet": "subnet-0a1b2c3d4e5f60001"},
                {"type": "m6i.large", "subnet": "subnet-0a1b2c3d4e5f60002"},
            ],
            "tags": {
                "gha:managed-by": "pacer", "gha:controller": "bench-process",
                "gha:pool": format!("{ns}/{pool}"), "gha:runner_job": format!("{ns}/job-{i}"),
                "gha:runner_job_uid": format!("{i:08x}-0000-4000-8000-000000000000"),
                "gha:job_id": (10_000_000 + i).to_string(), "gha:repository": "example-org/api",
                "Name": format!("pacer-{pool}-{i}"),
            },
        },
        "instance": {"id": instance, "type": "m7i.large", "zone": "us-east-1a",
            "market": "spot", "launchTime": at(12)},
        "runner": {"id": 100_000 + i, "name": format!("pacer-bench-process-{}-1", 10_000_000 + i)},
        "cost": {"hourlyPrice": "0.0401", "onDemandHourlyPrice": "0.1008",
            "estimatedCost": "0.0080", "currency": "USD"},
        "boot": {"instanceId": instance, "bootstrappedAt": at(11), "runnerVersion": "2.330.0",
            "tokenSha256": format!("{:064x}", i)},
        "phaseTimes": {"pending": at(13), "launching": at(12), "booting": at(12),
            "running": at(11), "completing": at(2), "finished": at(2)},
        "completion": {"result": "success", "reportedAt": at(2)},
        "assignedJob": {"jobId": 10_000_000 + i, "runId": 1_000_000 + i / 4,
            "repository": "example-org/api"},
        "observedGeneration": 1,
    });
    (job, status)
}

/// Stores `count` finished RunnerJobs in `ns`, 64 requests at a time.
async fn store_finished(ns: &str, pool: &str, count: usize) {
    let g = ground(Parts::Both);
    let client = kube::Client::try_from(g.kube_config().await).unwrap();
    let jobs: Api<RunnerJob> = Api::namespaced(client, ns);
    stream::iter(0..count)
        .map(|i| {
            let jobs = jobs.clone();
            let (job, status) = finished_job(ns, pool, i);
            async move {
                jobs.create(&PostParams::default(), &job).await.unwrap();
                let patch = json!({ "status": status });
                jobs.patch_status(
                    &format!("job-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}

/// How long the API server takes to serve the RunnerJobs of `ns` as Pacer's watch asks for them
/// (pages of 500 and no resourceVersion: a consistent list, which Kubernetes serves from its
/// watch cache), read to the last byte and not parsed: what no client syncs faster here.
async fn list_time(ns: &str) -> Duration {
    use kube::Resource as _;
    let g = ground(Parts::Both);
    let client = kube::Client::try_from(g.kube_config().await).unwrap();
    let path = RunnerJob::url_path(&(), Some(ns));
    let started = Instant::now();
    let mut next = String::new();
    loop {
        let uri = format!("{path}?limit=500{next}");
        let request = axum::http::Request::get(uri).body(vec![]).unwrap();
        let page = client.request_text(request).await.unwrap();
        // The list's metadata comes after its items; a scan finds the token without parsing.
        let token = page.rfind(r#""continue":""#).map(|at| {
            let rest = &page[at + r#""continue":""#.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        });
        match token.filter(|t| !t.is_empty()) {
            Some(t) => next = format!("&continue={t}"),
            None => break,
        }
    }
    started.elapsed()
}

/// `pacer run` ready and serving one pool (the example's, Ready against moto) in a namespace
/// of its own, returned with that namespace: the listener the webhook part posts to.
pub async fn serving(name: &str) -> (Pacer, String) {
    let g = ground(Parts::Both);
    let client = g.kube_client().await;
    let ns = g.namespace(&client, name).await;
    let dir = crate::support::scratch(&format!("bench-{ns}"));
    let pools: Api<RunnerPool> = Api::namespaced(client, &ns);
    let pool: RunnerPool = serde_json::from_value(g.example_pool(&ns, "linux")).unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let (pacer, _) = start(&dir, &ns, name).await;
    wait_ready(&pools, "linux", Duration::from_secs(120)).await;
    (pacer, ns)
}

/// Measures `pacer run`: start to ready and memory with pools Ready and no RunnerJob, then the
/// same with `stored` finished RunnerJobs.
pub async fn run(stored: usize) -> Figures {
    let g = ground(Parts::Both);
    let client = g.kube_client().await;
    let ns = g.namespace(&client, "bench-process").await;
    let dir = crate::support::scratch(&format!("bench-{ns}"));
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    for i in 0..POOLS {
        let pool: RunnerPool =
            serde_json::from_value(g.example_pool(&ns, &format!("linux-{i}"))).unwrap();
        pools.create(&PostParams::default(), &pool).await.unwrap();
    }
    let (pacer, start_idle) = start(&dir, &ns, "idle").await;
    for i in 0..POOLS {
        wait_ready(&pools, &format!("linux-{i}"), Duration::from_secs(120)).await;
    }
    let idle = settled(&pacer, Duration::from_secs(10), Duration::from_secs(10)).await;
    drop(pacer);

    // The RunnerJobs are stored while no process runs, so the next one starts with all of them.
    let storing = Instant::now();
    store_finished(&ns, "linux-0", stored).await;
    println!(
        "stored {stored} finished RunnerJobs for pacer run in {:.1?}",
        storing.elapsed()
    );
    let listing = list_time(&ns).await;
    println!(
        "the API server serving them as the watch asks (pages of 500), not parsed: {listing:.2?}"
    );
    // The first process's Lease must expire, or the second waits its 15 s out.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let _ = leases
        .delete("pacer-bench-process", &Default::default())
        .await;
    let (pacer, start_stored) = start(&dir, &ns, "stored").await;
    let start_stored_cpu = cpu_seconds(pacer.child.id());
    // Every job's first pass is done and the heap has settled.
    let with_stored = settled(&pacer, Duration::from_secs(30), Duration::from_secs(10)).await;
    drop(pacer);
    Figures {
        listing,
        start_idle,
        idle,
        stored,
        start_stored,
        start_stored_cpu,
        with_stored,
    }
}
