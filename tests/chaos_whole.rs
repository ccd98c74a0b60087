//! The whole flow under faults: `pacer run` processes behind one Service address (a balancer
//! that skips a dead replica, as kube-proxy does), GitHub's signed webhooks, and instances in
//! moto that boot the real user-data in the simulator, which also plays GitHub's side of each
//! job (runner busy, job in progress, the `in_progress` and `completed` webhooks, each delivered
//! twice, every third job's out of order) and stops an instance terminated under it.
//!
//! Scenarios: the leader SIGKILLed and restarted again and again mid-burst, with one replica and
//! with two; the kube-apiserver killed and restarted mid-burst; GitHub's JIT endpoint failing,
//! slow and clashing; every read between the replicas and the API server late; EC2 reclaiming
//! spot instances at random, before and after their runner took the job. Each ends with the
//! invariants of `support::invariants`. `make test` runs a short form; `make chaos` runs
//! `CHAOS_JOBS` jobs.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use pacer::api::{JobPhase, RunnerJob, RunnerPool};
use pacer::cloud::Ec2 as _;
use pacer::cloud::aws::AwsEc2;
use serde_json::json;
use support::github::FakeGitHub;
use support::identity::{self, Signer};
use support::invariants::{
    Counts, assert_invariants, count_endings, instances_by_job, job_count, report,
};
use support::process::{self, Pacer, WEBHOOK_SECRET};
use support::proxy::Proxy;
use support::relay::{Balancer, Relay};
use support::simulator::{Behaviour, Boot, Ec2Side, GitHubSide, Simulator};
use support::{Ground, Parts, ground, webhooks};

const REPO: &str = "example-org/api";
const TARGET: &str = "orgs/example-org";
const LABELS: [&str; 2] = ["self-hosted", "linux"];
const MAX_RUNNERS: usize = 4;

/// Restarting the API server touches every test of this binary: one scenario at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Default)]
struct Faults {
    replicas: usize,
    /// SIGKILL the leader (and start it again, as its pod restarts) this many times.
    kills: u32,
    /// Kill the kube-apiserver (it is started again at once) this many times.
    apiserver_restarts: u32,
    /// GitHub's JIT endpoint fails: 503s, then secondary rate limits, answers in 15 s for a
    /// while, and one job in four finds an offline runner of its name left from before (409).
    jit: bool,
    /// The replicas reach the API server through a relay that holds every read this long.
    api_latency: Option<Duration>,
    /// EC2 reclaims spot instances at random, some before their runner took the job (while
    /// booting, or registered and waiting), some after; the pool asks for a re-run of a job so
    /// lost (`rerunInterrupted`).
    reclaims: bool,
}

struct World {
    ground: &'static Ground,
    ns: String,
    id: String,
    dir: PathBuf,
    jobs: Api<RunnerJob>,
    leases: Api<Lease>,
    fake: FakeGitHub,
    service: Balancer,
    /// The relay the replicas reach the API server through, and its kubeconfig.
    api: Option<(Relay, PathBuf)>,
    replicas: Vec<Pacer>,
    sim: Simulator,
    ec2: AwsEc2,
    http: reqwest::Client,
}

impl World {
    async fn new(scenario: &str, faults: &Faults) -> Self {
        let ground = ground(Parts::Both);
        let client = ground.kube_client().await;
        let ns = ground
            .namespace(&client, &format!("whole-{scenario}"))
            .await;
        let id = format!("whole-{scenario}");
        let dir = support::scratch(&format!("whole-{ns}"));
        let fake = FakeGitHub::start().await;
        fake.install(1, &[REPO]);
        let service = Balancer::start().await;
        let aws = ground.aws_config().await;
        // The keys every replica shares (`process::start` keeps them): the instances' signer.
        Signer::new(&dir);
        identity::callback_key(&dir);
        let api = match faults.api_latency {
            Some(delay) => Some(slow_api_server(ground, &dir, delay).await),
            None => None,
        };
        let mut world = Self {
            api,
            ground,
            jobs: Api::namespaced(client.clone(), &ns),
            leases: Api::namespaced(client.clone(), &ns),
            replicas: Vec::new(),
            sim: Simulator::start(
                &aws,
                &fake,
                Signer::at(&dir),
                &id,
                &dir.join("instances"),
                Behaviour {
                    // Long enough for a reclaim to find the runner at work.
                    runner_seconds: Some(if faults.reclaims { 6.0 } else { 2.0 }),
                    github_side: Some(GitHubSide {
                        webhooks: Some((service.url(), WEBHOOK_SECRET.to_vec())),
                        labels: LABELS.map(String::from).to_vec(),
                        duplicate: true,
                        reorder: true,
                    }),
                    stop_when_terminated: true,
                    ..Default::default()
                },
            )
            .await,
            ec2: AwsEc2::new(&aws),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            fake,
            service,
            ns,
            id,
            dir,
        };
        for n in 0..faults.replicas {
            let replica = world.start(&format!("replica-{n}"));
            world.replicas.push(replica);
        }
        world.route();
        world.ready_pool(client, faults.reclaims).await;
        world
    }

    /// Starts replica `name` (again): its pod's container, restarted.
    fn start(&self, name: &str) -> Pacer {
        process::start(
            self.ground,
            &self.dir,
            process::Setup {
                name,
                controller_id: &self.id,
                namespace: &self.ns,
                kubeconfig: self.api.as_ref().map(|(_, kubeconfig)| kubeconfig.clone()),
                github: Some((
                    self.fake.url.clone(),
                    self.fake.app_id,
                    self.fake.private_key_pem.clone(),
                )),
                public_url: Some(self.service.url()),
            },
        )
    }

    /// The Service routes to every replica's listener.
    fn route(&self) {
        let listeners: Vec<SocketAddr> = (self.replicas.iter())
            .map(|r| SocketAddr::from(([127, 0, 0, 1], r.listen)))
            .collect();
        self.service.route_to(listeners);
    }

    async fn ready_pool(&self, client: kube::Client, rerun_interrupted: bool) {
        let mut pool = self.ground.example_pool(&self.ns, "linux");
        let spec = &mut pool["spec"];
        spec["maxRunners"] = json!(MAX_RUNNERS);
        spec["github"] = json!({"scope": "org", "owner": "example-org"});
        spec["labels"] = json!(LABELS);
        spec["runnerUser"] = json!(support::current_user());
        spec["ttlSecondsAfterFinished"] = json!(3600);
        spec["rerunInterrupted"] = json!(rerun_interrupted);
        if rerun_interrupted {
            // Reclaims go on all through the burst rather than turning the pool to on-demand
            // after the third notice (the breaker is tested in tests/job_controller.rs).
            spec["capacity"]["interruptionBreaker"] = json!({"notices": 0});
        }
        let pools: Api<RunnerPool> = Api::namespaced(client, &self.ns);
        let pool: RunnerPool = serde_json::from_value(pool).unwrap();
        pools.create(&PostParams::default(), &pool).await.unwrap();
        support::wait_ready(&pools, "linux", Duration::from_secs(90)).await;
    }

    /// GitHub queues job `job_id` and delivers its `queued` webhook twice, as it may; a
    /// delivery that fails is redelivered, as an operator (or the sweep) would.
    async fn queue(&self, job_id: i64) {
        self.fake.set_job(REPO, job_id, "queued", None);
        let body = webhooks::queued(job_id, &LABELS);
        let delivery = format!("queued-{job_id}");
        for _ in 0..2 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let answer = webhooks::send(
                    &self.http,
                    &self.service.url(),
                    WEBHOOK_SECRET,
                    &delivery,
                    body.clone(),
                )
                .await;
                if answer.is_ok_and(|a| a.status().is_success()) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "job {job_id}: never accepted"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// The replica holding the Lease, if any does.
    async fn leader(&self) -> Option<usize> {
        let lease = self
            .leases
            .get_opt(&format!("pacer-{}", self.id))
            .await
            .ok()??;
        let holder = lease.spec?.holder_identity?;
        (0..self.replicas.len()).find(|n| holder == format!("replica-{n}"))
    }

    /// SIGKILL the leader and start its container again.
    /// Whether a replica led and was killed.
    async fn kill_leader(&mut self) -> bool {
        let Some(n) = self.leader().await else {
            return false;
        };
        let _ = self.replicas[n].child.kill();
        let _ = self.replicas[n].child.wait();
        self.route();
        self.replicas[n] = self.start(&format!("replica-{n}"));
        self.route();
        true
    }

    /// Kills the kube-apiserver; the ground starts it again at once.
    fn restart_apiserver(&self) {
        let pid = std::fs::read_to_string(self.ground.var("KUBE_APISERVER_PID_FILE")).unwrap();
        let killed = std::process::Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .unwrap();
        assert!(killed.success());
    }

    /// The JIT endpoint's faults, set before the burst: three 503s and then three secondary
    /// rate limits, every answer 15 s late until the run lifts it,
    /// and offline runners already named as one job in four's first attempt will be.
    fn jit_faults(&self, jobs: i64) {
        self.fake.fail("generate_jitconfig", 503, 3);
        let fake = self.fake.clone();
        tokio::spawn(async move {
            while fake.calls_of("generate_jitconfig") < 3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            fake.fail("generate_jitconfig", 429, 3);
        });
        self.fake
            .slow("generate_jitconfig", Duration::from_secs(15));
        for job_id in (1..=jobs).filter(|j| j % 4 == 0) {
            let name = pacer::github::runner_name(&self.id, job_id, 1);
            self.fake.add_runner(TARGET, &name, "offline");
        }
    }

    async fn all_jobs(&self) -> Option<Vec<RunnerJob>> {
        Some(self.jobs.list(&Default::default()).await.ok()?.items)
    }
}

/// A relay in front of the API server that holds every read `delay`, and a kubeconfig that
/// reaches the API server through it (its certificate names 127.0.0.1, whatever the port).
async fn slow_api_server(
    ground: &Ground,
    dir: &std::path::Path,
    delay: Duration,
) -> (Relay, PathBuf) {
    let config = ground.kube_config().await;
    let upstream = format!(
        "{}:{}",
        config.cluster_url.host().unwrap(),
        config.cluster_url.port_u16().unwrap()
    );
    let relay = Relay::start(upstream.parse().unwrap()).await;
    relay.slow(delay);
    let text = std::fs::read_to_string(ground.var("KUBECONFIG")).unwrap();
    let text = text.replace(
        &format!("https://{upstream}"),
        &format!("https://{}", relay.addr),
    );
    let path = dir.join("kubeconfig-slow");
    std::fs::write(&path, text).unwrap();
    (relay, path)
}

async fn run(scenario: &str, faults: Faults) -> Counts {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut w = World::new(scenario, &faults).await;
    let n = job_count();
    let mut counts = Counts::default();
    if faults.jit {
        w.jit_faults(n);
    }
    let mut reclaimer = match faults.reclaims {
        true => Some(Reclaimer::new(&w, n).await),
        false => None,
    };
    let started = tokio::time::Instant::now();
    // Every job GitHub queued: the burst's, then the re-runs it makes.
    let mut queued: Vec<i64> = (1..=n).collect();
    for job_id in 1..=n {
        w.queue(job_id).await;
        if let Some(reclaimer) = &mut reclaimer {
            let jobs = w.all_jobs().await.unwrap_or_default();
            let boots = w.sim.boots.lock().unwrap().clone();
            reclaimer.step(&boots, &jobs).await;
        }
    }
    let deadline = started + Duration::from_secs(120 + 8 * n as u64);
    let (mut kills, mut restarts) = (0, 0);
    let every = Duration::from_secs(if faults.replicas > 1 { 8 } else { 4 });
    loop {
        let jobs = w.all_jobs().await.unwrap_or_default();
        let instances = instances_by_job(&w.ec2, &w.id, &jobs).await;
        let alive: usize = instances.values().map(|(_, live)| live.len()).sum();
        counts.max_alive = counts.max_alive.max(alive);
        counts.over_max_runners += usize::from(alive > MAX_RUNNERS);
        let due = started.elapsed() > every * (kills + restarts + 1);
        if due && kills < faults.kills {
            kills += u32::from(w.kill_leader().await);
        } else if due && restarts < faults.apiserver_restarts {
            w.restart_apiserver();
            restarts += 1;
        }
        if faults.jit && started.elapsed() > Duration::from_secs(20) {
            w.fake.slow("generate_jitconfig", Duration::ZERO);
        }
        if let Some(reclaimer) = &mut reclaimer {
            let boots = w.sim.boots.lock().unwrap().clone();
            reclaimer.step(&boots, &jobs).await;
            // GitHub queues a job it re-runs as a new job.
            let reruns = w.fake.state.lock().unwrap().reruns.clone();
            for job_id in reruns.into_iter().map(|j| RERUN + j) {
                if !queued.contains(&job_id) {
                    w.queue(job_id).await;
                    queued.push(job_id);
                }
            }
        }
        // While the API server restarts, nothing answers: look again.
        if let Some(jobs) = w.all_jobs().await {
            let finished = (jobs.iter())
                .filter(|j| j.status.as_ref().is_some_and(|s| s.phase.is_finished()))
                .count();
            // A job lost while running ends at once; its re-run is asked for after.
            let rerun_due = jobs.iter().filter(|j| reason(j) == INTERRUPTED).count();
            let faults_done = kills == faults.kills && restarts == faults.apiserver_restarts;
            let settled = finished == queued.len() && rerun_due == 0;
            if (settled && faults_done) || tokio::time::Instant::now() > deadline {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Settle: the last terminations and runner removals land.
    tokio::time::sleep(Duration::from_secs(5)).await;
    counts.jobs = queued.len();
    let jobs = w.all_jobs().await.unwrap();
    let instances = instances_by_job(&w.ec2, &w.id, &jobs).await;
    count_endings(&mut counts, &jobs, &instances);
    for job_id in &queued {
        let name = format!("gh-job-{job_id}");
        if !jobs
            .iter()
            .any(|j| j.metadata.name.as_deref() == Some(name.as_str()))
        {
            counts.unexplained.push(format!("{name}: no RunnerJob"));
        }
    }
    let boots = w.sim.boots.lock().unwrap().clone();
    // A runner whose instance EC2 reclaimed lost its job to EC2: not counted as Pacer's kill.
    counts.busy_killed = boots.values().filter(|b| b.killed_busy).count()
        + w.fake.state.lock().unwrap().busy_deletes.len();
    counts.left_alive = instances.values().map(|(_, live)| live.len()).sum();
    counts.left_runners = w.fake.runner_names(TARGET).len();
    let jit_refused = (w.fake.state.lock().unwrap().calls.iter())
        .filter(|(endpoint, status)| endpoint.starts_with("generate_jitconfig") && *status >= 400)
        .count();
    let delayed = w.api.as_ref().map_or(0, |(relay, _)| relay.delayed()) as usize;
    let reclaimed = match &reclaimer {
        Some(reclaimer) => reclaimer.check(&jobs, &boots, &w.fake, &mut counts),
        None => 0,
    };
    let sent: u32 = boots.values().map(|b| b.webhooks_sent).sum();
    assert!(
        sent > 0,
        "no runner's webhooks were sent, duplicated or reordered"
    );
    // Every scenario duplicates and reorders webhooks; what fired counts its own faults only.
    counts.fired = (kills + restarts) as usize + jit_refused + delayed + reclaimed;
    let step_downs: usize = (w.replicas.iter())
        .map(|r| r.log_text().matches("stepping down").count())
        .sum();
    eprintln!("{scenario}: the replicas stepped down {step_downs} times");
    report(scenario, &counts, started.elapsed());
    counts
}

/// The reason a job lost to a reclaim while its runner ran it ends with, before its re-run.
const INTERRUPTED: &str = "InterruptedWhileRunning";
/// GitHub gives a job it re-runs this id plus the first's (in a new attempt of the run).
const RERUN: i64 = 100_000;

fn reason(job: &RunnerJob) -> String {
    (job.status.as_ref())
        .and_then(|s| s.last_error.as_ref())
        .map(|e| e.reason.clone())
        .unwrap_or_default()
}

/// When EC2 reclaims a job's first spot instance.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reclaim {
    /// At once, while it boots: before its runner exists.
    Booting,
    /// Its runner registered and waiting for a job (GitHub gives it none), once the instance
    /// reported the notice EC2 gave it.
    Registered,
    /// Its runner running the job, once the instance reported the notice EC2 gave it then.
    Running,
}

/// A reclaim chosen for an instance, not yet done.
struct Plan {
    instance: String,
    when: Reclaim,
    /// Since when the instance waits for its reclaim (notice given).
    since: Option<tokio::time::Instant>,
}

/// EC2 reclaiming spot instances at random as they appear, one instance of a job at most,
/// as EC2 does it: the notice in the instance's IMDS, then the instance terminated with the
/// state reason `Server.SpotInstanceTermination`, and GitHub failing a job whose runner went.
struct Reclaimer {
    side: Ec2Side,
    proxy: Proxy,
    /// EC2's own hand, behind Pacer's back.
    ec2: aws_sdk_ec2::Client,
    fake: FakeGitHub,
    /// Only the burst's jobs are chosen, not GitHub's re-runs.
    jobs: i64,
    /// The first three jobs get one of each, in a random order; later ones one at random, or
    /// none.
    order: Vec<Reclaim>,
    rng: u64,
    /// Job id -> its first instance's plan (`None`: not reclaimed).
    plans: HashMap<i64, Option<Plan>>,
    /// Job id -> when its instance was reclaimed, and the instance.
    done: BTreeMap<i64, (Reclaim, String)>,
}

impl Reclaimer {
    async fn new(w: &World, jobs: i64) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("reclaims: seed {seed}");
        let mut reclaimer = Self {
            side: w.sim.ec2_side(),
            proxy: w.ground.proxy(),
            ec2: aws_sdk_ec2::Client::new(
                &(w.ground.aws_config().await.to_builder())
                    .app_name(aws_config::AppName::new("ec2-reclaims").unwrap())
                    .build(),
            ),
            fake: w.fake.clone(),
            jobs,
            order: Vec::new(),
            rng: seed,
            plans: HashMap::new(),
            done: BTreeMap::new(),
        };
        let mut order = vec![Reclaim::Booting, Reclaim::Registered, Reclaim::Running];
        for i in (1..order.len()).rev() {
            order.swap(i, reclaimer.random() as usize % (i + 1));
        }
        reclaimer.order = order;
        reclaimer
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Plans a reclaim for each job's first spot instance as it appears; reclaims those whose
    /// moment came. An instance is its job's by its tag, or, launched in a batch (whose
    /// instances carry no job's tags), by the status of the job that took it (`jobs`): its
    /// first attempt's instance only, so a later attempt's is never planned as the first.
    async fn step(&mut self, boots: &HashMap<String, Boot>, jobs: &[RunnerJob]) {
        let taken: HashMap<&str, i64> = (jobs.iter())
            .filter_map(|j| {
                let status = j.status.as_ref()?;
                let first = match status.previous_attempts.first() {
                    Some(attempt) => attempt.instance.as_str(),
                    None => status.instance.as_ref()?.id.as_str(),
                };
                Some((first, j.spec.job_id))
            })
            .collect();
        for (instance, boot) in boots {
            let job_id = boot
                .job_id
                .or_else(|| taken.get(instance.as_str()).copied());
            let Some(job_id) = job_id.filter(|j| *j <= self.jobs) else {
                continue;
            };
            if !boot.spot || self.plans.contains_key(&job_id) {
                continue;
            }
            let mut when = match self.plans.len() {
                k if k < self.order.len() => Some(self.order[k]),
                _ => match self.random() % 6 {
                    0 => Some(Reclaim::Booting),
                    1 => Some(Reclaim::Registered),
                    2 => Some(Reclaim::Running),
                    _ => None,
                },
            };
            // An instance first seen with its runner started is too far along to be reclaimed
            // before it takes its job.
            if when.is_some() && boot.dir.join("runner/job.started").exists() {
                when = Some(Reclaim::Running);
            }
            if when == Some(Reclaim::Registered) {
                self.side.hold(instance);
                self.side.give_notice(instance);
            }
            let plan = when.map(|when| Plan {
                instance: instance.clone(),
                when,
                since: None,
            });
            self.plans.insert(job_id, plan);
        }
        let mut due = Vec::new();
        for (job_id, plan) in self.plans.iter_mut() {
            let Some(p) = plan else { continue };
            let boot = &boots[&p.instance];
            let marked = |path: &str| boot.dir.join(path).exists();
            let noticed = marked("state/noticed-spot-interruption");
            let waited = |since: Option<tokio::time::Instant>, limit: u64| {
                since.is_some_and(|t| t.elapsed() > Duration::from_secs(limit))
            };
            if boot.exit.is_some() || (p.when == Reclaim::Running && marked("runner/job.done")) {
                eprintln!("reclaims: {} of job {job_id} ended first", p.instance);
                *plan = None;
                continue;
            }
            let now = match p.when {
                Reclaim::Booting => true,
                Reclaim::Registered => {
                    if p.since.is_none() && marked("runner/job.started") {
                        p.since = Some(tokio::time::Instant::now());
                    }
                    noticed || waited(p.since, 5)
                }
                Reclaim::Running => {
                    if p.since.is_none() && marked("runner/job.taken") {
                        self.side.give_notice(&p.instance);
                        p.since = Some(tokio::time::Instant::now());
                    }
                    p.since.is_some() && (noticed || waited(p.since, 3))
                }
            };
            if now {
                due.push((*job_id, p.instance.clone(), p.when, boot.dir.clone()));
                *plan = None;
            }
        }
        for (job_id, instance, when, dir) in due {
            self.reclaim(job_id, &instance, when, &dir).await;
        }
    }

    /// EC2 takes the instance back: it stops at once; its listing gives the spot reason; a
    /// runner running the job goes offline and GitHub fails the job; the instance is
    /// terminated. What the runner had done when it stopped is what is recorded.
    async fn reclaim(&mut self, job_id: i64, instance: &str, planned: Reclaim, dir: &Path) {
        self.side.reclaim(instance);
        // The simulator stops the instance at its next look (every 50 ms): by then whether
        // its runner took the job, or even finished it, is settled.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (taken, finished) = (
            dir.join("runner/job.taken").exists(),
            dir.join("runner/job.released").exists(),
        );
        let when = if taken { Reclaim::Running } else { planned };
        eprintln!("reclaims: {instance} of job {job_id}, {when:?} (planned {planned:?})");
        self.proxy.spot_reclaimed(instance).await;
        if finished {
            eprintln!("reclaims: the runner on {instance} finished its job first");
        } else if when == Reclaim::Running {
            let runner = {
                let s = self.fake.state.lock().unwrap();
                let job = &s.jobs[&job_id];
                job["runner_id"]
                    .as_i64()
                    .zip(job["runner_name"].as_str().map(String::from))
            };
            if let Some((id, name)) = runner {
                self.fake.runner_lost(TARGET, &name);
                self.fake.finish_job(REPO, job_id, "failure", (id, &name));
            }
        }
        let mut tries = 0;
        while let Err(e) = self
            .ec2
            .terminate_instances()
            .instance_ids(instance)
            .send()
            .await
        {
            tries += 1;
            assert!(tries < 20, "terminating {instance}: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !finished {
            self.done.insert(job_id, (when, instance.to_string()));
        }
    }

    /// Each reclaimed job ended as its moment says, or is unexplained: reclaimed before its
    /// runner took it, requeued (`SpotInterrupted`) and run by the runner of its next
    /// instance; reclaimed while running, `InterruptedWhileRunning`, re-run at most once. Only
    /// those end so. Yields how many reclaims Pacer saw.
    fn check(
        &self,
        jobs: &[RunnerJob],
        boots: &HashMap<String, Boot>,
        fake: &FakeGitHub,
        counts: &mut Counts,
    ) -> usize {
        let state = fake.state.lock().unwrap();
        let mut seen = 0;
        for job in jobs {
            let name = job.metadata.name.clone().unwrap_or_default();
            let job_id: i64 = name
                .trim_start_matches("gh-job-")
                .parse()
                .unwrap_or_default();
            let status = job.status.clone().unwrap_or_default();
            let why = reason(job);
            let reruns = state.reruns.iter().filter(|j| **j == job_id).count();
            if reruns > 1 {
                counts
                    .unexplained
                    .push(format!("{name}: re-run {reruns} times"));
            }
            let first = status.previous_attempts.first().map(|a| a.reason.as_str());
            let ok = match self.done.get(&job_id).map(|(when, _)| when) {
                Some(Reclaim::Booting | Reclaim::Registered) => {
                    // The runner on the job's last instance took the job and ran it.
                    let last = (status.instance.as_ref()).and_then(|i| boots.get(&i.id));
                    let ran = last.is_some_and(|b| {
                        b.dir.join("runner/job.taken").exists()
                            && b.dir.join("runner/job.done").exists()
                    });
                    status.phase == JobPhase::Succeeded && first == Some("SpotInterrupted") && ran
                }
                Some(Reclaim::Running) => {
                    status.phase == JobPhase::Failed
                        && (why == INTERRUPTED || (why == "RerunRequested" && reruns == 1))
                }
                None => {
                    // Only a reclaim while running ends so.
                    if why == INTERRUPTED || why == "RerunRequested" {
                        counts
                            .unexplained
                            .push(format!("{name}: {why}, never reclaimed"));
                    }
                    continue;
                }
            };
            if ok {
                seen += 1;
            } else {
                counts.unexplained.push(format!(
                    "{name}: reclaimed {:?}, ended {:?} {why}, attempts {:?}",
                    self.done[&job_id].0, status.phase, status.previous_attempts
                ));
            }
        }
        let by_when = |when| self.done.values().filter(|(w, _)| *w == when).count();
        let noticed = (self.done.values())
            .filter(|(_, i)| {
                boots[i]
                    .dir
                    .join("state/noticed-spot-interruption")
                    .exists()
            })
            .count();
        eprintln!(
            "reclaims: {} booting, {} registered, {} running; {noticed} notices reported; {seen} seen by Pacer",
            by_when(Reclaim::Booting),
            by_when(Reclaim::Registered),
            by_when(Reclaim::Running)
        );
        seen
    }
}

fn assert_all_ran(c: &Counts) {
    assert_invariants(c);
    assert_eq!(c.succeeded, c.jobs, "{c:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_replica_killed_again_and_again_mid_burst_loses_and_doubles_nothing() {
    // The issue's scale: 20 kills during a 200-job burst.
    let kills = (job_count() / 4).clamp(2, 20) as u32;
    let c = run(
        "kill-one",
        Faults {
            replicas: 1,
            kills,
            ..Default::default()
        },
    )
    .await;
    assert_all_ran(&c);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_of_two_killed_mid_burst_loses_and_doubles_nothing() {
    let kills = (job_count() / 8).clamp(2, 20) as u32;
    let c = run(
        "kill-two",
        Faults {
            replicas: 2,
            kills,
            ..Default::default()
        },
    )
    .await;
    assert_all_ran(&c);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_restarted_mid_burst_loses_and_doubles_nothing() {
    let c = run(
        "apiserver",
        Faults {
            replicas: 2,
            apiserver_restarts: 2,
            ..Default::default()
        },
    )
    .await;
    assert_all_ran(&c);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_slow_and_clashing_jit_endpoint_loses_and_doubles_nothing() {
    let c = run(
        "jit",
        Faults {
            replicas: 2,
            jit: true,
            ..Default::default()
        },
    )
    .await;
    assert_all_ran(&c);
}

/// Every read between the replicas and the API server 150 ms late each way: renewals and the
/// step-down check have their own client and timeouts, so leadership holds through the burst.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_api_server_during_a_burst_loses_and_doubles_nothing() {
    let c = run(
        "api-latency",
        Faults {
            replicas: 2,
            api_latency: Some(Duration::from_millis(150)),
            ..Default::default()
        },
    )
    .await;
    assert_all_ran(&c);
}

/// EC2 reclaims spot instances at random, before and after their runners took their jobs: a
/// job reclaimed before is requeued and run by a later attempt's runner; one reclaimed after
/// ends `InterruptedWhileRunning` and is re-run once by GitHub, its re-run run by Pacer. No
/// busy runner is Pacer's doing.
#[tokio::test(flavor = "multi_thread")]
async fn spot_instances_reclaimed_before_and_after_their_job_was_taken_lose_and_double_nothing() {
    let c = run(
        "reclaims",
        Faults {
            replicas: 1,
            reclaims: true,
            ..Default::default()
        },
    )
    .await;
    assert_invariants(&c);
    let lost: usize = ["InterruptedWhileRunning", "RerunRequested"]
        .iter()
        .filter_map(|r| c.explained.get(*r))
        .sum();
    assert!(lost > 0, "no job was reclaimed while running: {c:?}");
    assert_eq!(c.succeeded + lost, c.jobs, "{c:?}");
}

/// A warm pool whose leader is SIGKILLed twice: while its warm instances prepare, and while jobs
/// take them. The preparations finish against the restarted replica, nothing is launched twice,
/// each job runs on a warm instance started for it (no job launches), the pool refills, and
/// deleting the pool leaves no instance behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_pool_whose_leader_is_killed_while_instances_prepare_and_start_leaks_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut w = World::new(
        "warm-kill",
        &Faults {
            replicas: 1,
            ..Default::default()
        },
    )
    .await;
    let pools: Api<RunnerPool> = Api::namespaced(w.ground.kube_client().await, &w.ns);
    let warm = json!({"spec": {
        "warm": {"size": 2},
        "capacity": {"type": "onDemand", "fallbackToOnDemand": false},
    }});
    let merge = kube::api::Patch::Merge(&warm);
    pools
        .patch("linux", &Default::default(), &merge)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    // Killed as soon as EC2 lists them and before any reported prepared.
    loop {
        let up = warm_instances(&w).await;
        if up.len() == 2 && up.iter().all(|i| i.is_alive()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no warm instance launched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(w.kill_leader().await, "nobody led");
    let ready = |size: i32| {
        let pools = pools.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let pool = pools.get("linux").await.unwrap();
                let counts = pool.status.and_then(|s| s.warm);
                if counts.is_some_and(|c| (c.ready, c.preparing, c.stopping) == (size, 0, 0)) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never {size} ready: {counts:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    ready(2).await;
    let listed = warm_instances(&w).await;
    assert_eq!(listed.len(), 2, "launched twice: {listed:?}");
    assert!(listed.iter().all(|i| i.is_stopped()), "{listed:?}");
    let prepared: Vec<String> = listed.iter().map(|i| i.id.clone()).collect();

    // Two jobs take them; the leader is killed again as they do. A kill between a bootstrap's
    // claim and its record leaves a claim nothing frees: the same instance makes it afresh
    // once it is CLAIM_ORPHANED (75 s) old, on the same attempt. The boot script's backoff
    // (1, 2, 4, 8, 16, then 30 s) puts its first try past that about 91 s after the kill, so
    // the jobs get 180 s.
    for job_id in [1, 2] {
        w.queue(job_id).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.kill_leader().await, "nobody led");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let jobs = loop {
        let jobs = w.all_jobs().await.unwrap_or_default();
        let finished = (jobs.iter())
            .filter(|j| j.status.as_ref().is_some_and(|s| s.phase.is_finished()))
            .count();
        if jobs.len() == 2 && finished == 2 {
            break jobs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the jobs never finished"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // A kill after a bootstrap's answer was collected and before it reached the instance
    // loses that answer: the instance is refused once the claim's hold is past and shuts
    // down, and the job runs again on the pool's next warm instance. Any other way, each job
    // runs on a prepared instance at its first attempt.
    for job in &jobs {
        let status = job.status.as_ref().unwrap();
        assert_eq!(status.phase, JobPhase::Succeeded, "{status:?}");
        let id = &status.instance.as_ref().unwrap().id;
        let first = (status.previous_attempts.first()).map_or(id, |a| &a.instance);
        if !prepared.contains(first) {
            let warm = warm_instances(&w).await;
            panic!("ran on {first}, not one of the prepared {prepared:?}; warm ones now: {warm:?}");
        }
        for lost in &status.previous_attempts {
            assert_eq!(lost.reason, "InstanceLost", "{status:?}");
            // Refused and gone by its own shutdown, never given a runner: not taken from a job.
            let boots = w.sim.boots.lock().unwrap();
            let boot = boots.get(&lost.instance);
            assert!(
                boot.is_some_and(|b| b.shut_down && b.jit_config.is_none()),
                "{}: {:?}",
                lost.instance,
                boot.map(|b| (b.shut_down, b.jit_config.is_some()))
            );
        }
        assert!(status.previous_attempts.len() <= 1, "{status:?}");
    }
    let ran_on: Vec<String> = (jobs.iter())
        .filter_map(|j| Some(j.status.as_ref()?.instance.as_ref()?.id.clone()))
        .collect();
    let launches = (w
        .ground
        .proxy()
        .calls_of("CreateFleet", "")
        .await
        .into_iter())
    .chain(w.ground.proxy().calls_of("RunInstances", "").await)
    .filter(|c| c.params.to_string().contains(&format!("\"{}\"", w.id)))
    .filter(|c| !c.params.to_string().contains(r#""DryRun":"true""#))
    .filter(|c| !c.params.to_string().contains("gha:warm"))
    .count();
    assert_eq!(
        launches, 0,
        "a job launched instead of starting a warm instance"
    );
    ready(2).await;
    let boots = w.sim.boots.lock().unwrap().clone();
    assert_eq!(
        boots.values().filter(|b| b.killed_busy).count(),
        0,
        "runners cut off while running a job"
    );
    let used = warm_instances(&w).await;
    for id in prepared.iter().chain(&ran_on) {
        let left = used
            .iter()
            .find(|i| &i.id == id && !i.is_alive() && !i.is_stopped());
        assert!(
            left.is_some(),
            "{id}, used by a job, is still there: {used:?}"
        );
    }

    pools.delete("linux", &Default::default()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<_> = (warm_instances(&w).await.into_iter())
            .filter(|i| !matches!(i.state.as_str(), "shutting-down" | "terminated"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The controller's warm instances EC2 lists, terminated ones too.
async fn warm_instances(w: &World) -> Vec<pacer::cloud::Instance> {
    let all = w.ec2.describe_managed_instances(&w.id).await.unwrap();
    (all.into_iter())
        .filter(|i| i.tags.contains_key("gha:warm"))
        .collect()
}
