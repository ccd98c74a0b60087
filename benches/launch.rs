//! `make bench`: creates many RunnerJobs at once and measures how fast the controller gets to
//! the launch call, how many EC2 calls a job costs, and the controller's memory.
//!
//! Runs against the in-memory fake EC2 with a per-call latency (`BENCH_LATENCY_MS`, default
//! 200) and then against moto (at most 200). `BENCH_JOBS` (default 500) jobs are timed;
//! the timed jobs are then deleted and their terminations counted with their launches (the
//! mutating EC2 calls of a whole life, per job), and `BENCH_STORED` (default 10000) RunnerJobs
//! are stored for the memory reading.
//!
//! Before that, `pacer run` alone as a process (see `process`): start to ready and memory, idle
//! and with `BENCH_STORED` RunnerJobs; after it, slot refill (see `refill`: `BENCH_REFILL_JOBS`
//! jobs of `BENCH_RUN_MS` each through `BENCH_REFILL_MAX` slots). `BENCH_ONLY` (a comma-separated
//! list of `process`, `launch`, `refill`, `waiting`, `webhooks`, `warm`, `moto`) runs only those
//! parts.
//! `warm` (see `warm`) times queue to runner for warm starts and launches on the simulator,
//! `BENCH_WARM` (3) jobs each. The figures are written to `bench/results/latest.md`.
//!
//! The launch part also reads the API server's own request counts (see `apiserver`): Pacer's
//! RunnerJob writes, Event writes and RunnerJob reads per job over the burst. Then it measures
//! the API server's floor (see `floor`): the same burst with each job's launch record written
//! as it is created and no controller running. `waiting` (see
//! `waiting`) fills a pool of `BENCH_WAITING_MAX` (10) slots, queues `BENCH_WAITING` (2000) jobs
//! behind it and, once settled, counts Pacer's writes over `BENCH_WINDOW_S` (60) seconds.

// The allocator the pacer binary uses, so memory readings match production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "launch/apiserver.rs"]
mod apiserver;
#[path = "launch/floor.rs"]
mod floor;
#[path = "launch/process.rs"]
mod process;
#[path = "launch/refill.rs"]
mod refill;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "launch/waiting.rs"]
mod waiting;
#[path = "launch/warm.rs"]
mod warm;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use kube::api::{Api, PostParams};
use pacer::api::{JobPhase, RunnerJob, RunnerJobSpec, RunnerPool};
use pacer::cloud::Ec2;
use pacer::cloud::aws::AwsEc2;
use pacer::cloud::fake::FakeEc2;
use pacer::controller::metrics::Metrics;
use pacer::controller::{self, Context, Settings};
use serde_json::json;
use support::{Parts, ground, repo_root};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This process's resident memory: all of it, and the anonymous part (heap and stacks,
/// without the executable's pages).
fn rss() -> String {
    let memory = process::Memory::of(std::process::id());
    format!("{:.0} MiB (anonymous {:.0} MiB)", memory.rss, memory.anon)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn pool(ns: &str, subnets: [&str; 2], sg: &str, ami: &str) -> RunnerPool {
    let text =
        std::fs::read_to_string(repo_root().join("examples/runnerpool-org-spot.yaml")).unwrap();
    let mut pool: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    pool["metadata"] = json!({"name": "bench", "namespace": ns});
    pool["spec"]["subnets"] = json!(subnets);
    pool["spec"]["securityGroups"] = json!([sg]);
    pool["spec"]["ami"] = json!(ami);
    pool["spec"]["maxRunners"] = json!(10000);
    serde_json::from_value(pool).unwrap()
}

fn job(ns: &str, i: usize) -> RunnerJob {
    RunnerJob::for_queued_job(
        ns,
        &format!("job-{i}"),
        RunnerJobSpec {
            pool_name: "bench".into(),
            job_id: i as i64 + 1,
            run_id: 1,
            repository: "example-org/api".into(),
            labels: vec!["self-hosted".into()],
            installation_id: Some(1),
        },
    )
}

/// Creates `n` jobs, 64 at a time; returns when each creation returned, by name.
async fn create_jobs(
    jobs: &Api<RunnerJob>,
    ns: &str,
    range: std::ops::Range<usize>,
) -> HashMap<String, Instant> {
    stream::iter(range)
        .map(|i| {
            let jobs = jobs.clone();
            let job = job(ns, i);
            async move {
                let created = jobs.create(&PostParams::default(), &job).await.unwrap();
                (created.metadata.uid.unwrap(), Instant::now())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// A pool named `bench` of `max` slots in a fresh namespace, its launch template made, and the
/// controllers running with the production settings on a fake EC2 answering in `latency`: the
/// ground of the refill and waiting parts.
struct SmallPool {
    ground: &'static support::Ground,
    client: kube::Client,
    ns: String,
    fake: Arc<FakeEc2>,
    jobs: Api<RunnerJob>,
    controllers: tokio::task::JoinHandle<()>,
}

async fn small_pool(name: &str, max: usize, latency: Duration) -> SmallPool {
    let ground = ground(Parts::Both);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, name).await;
    let (subnets, sg, ami) = (
        ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002"],
        "sg-0a1b2c3d4e5f60001",
        "ami-0a1b2c3d4e5f60001",
    );
    let mut fake = FakeEc2::new()
        .with_image(ami, "x86_64", 8)
        .with_subnet(subnets[0], "vpc-1", "us-east-1a")
        .with_subnet(subnets[1], "vpc-1", "us-east-1b")
        .with_security_group(sg, "vpc-1");
    for t in ["m7i.large", "m6i.large", "c6i.large"] {
        fake = fake.with_instance_type(t, "x86_64");
    }
    let fake = Arc::new(fake.with_latency(latency));
    let ctx = Arc::new(Context::new(
        client.clone(),
        fake.clone(),
        Settings::new(name, "https://pacer.example.test"),
    ));
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
    let controllers = tokio::spawn(controller::run(ctx, pools.clone(), jobs.clone()));
    let mut pool = pool(&ns, subnets, sg, ami);
    pool.spec.max_runners = max as i32;
    pools.create(&PostParams::default(), &pool).await.unwrap();
    while (pools.get("bench").await.unwrap().status).is_none_or(|s| s.launch_template.is_none()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    SmallPool {
        ground,
        client,
        ns,
        fake,
        jobs,
        controllers,
    }
}

/// When the fake answered the launch call of `job`: its own, or its batch's.
fn launch_time(fake: &FakeEc2, job: &RunnerJob) -> Option<Instant> {
    let launch = job.status.as_ref()?.launch.as_ref();
    match launch.filter(|l| l.batch.is_some()) {
        Some(batch) => fake.launched_at(&batch.client_token),
        None => fake.launched_at(job.metadata.uid.as_deref()?),
    }
}

struct Run {
    name: &'static str,
    /// Observed by `metrics`, as `pacer run` builds it.
    ec2: Arc<dyn Ec2>,
    metrics: Arc<Metrics>,
    fake: Option<Arc<FakeEc2>>,
    ami: String,
    subnets: [String; 2],
    sg: String,
}

/// Runs the burst; returns a launch record of a batch member that it made, as the API server
/// stored it.
async fn bench(
    run: Run,
    count: usize,
    stored: usize,
    report: &mut Report,
) -> Option<serde_json::Value> {
    let ground = ground(Parts::Both);
    let client = ground.kube_client().await;
    let ns = ground
        .namespace(&client, &format!("bench-{}", run.name))
        .await;
    // The bench creates its RunnerJobs through a client of its own, so they do not queue
    // behind the controller's requests.
    let creator = kube::Client::try_from(ground.kube_config().await).unwrap();
    // The production settings.
    let settings = Settings::new(&format!("bench-{}", run.name), "https://pacer.example.test");
    let ctx =
        Arc::new(Context::new(client.clone(), run.ec2.clone(), settings).with_metrics(run.metrics));
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
    let creating_jobs: Api<RunnerJob> = Api::namespaced(creator, &ns);
    let c = ctx.clone();
    let (p, j) = (pools.clone(), jobs.clone());
    let controllers = tokio::spawn(controller::run(c, p, j));
    pools
        .create(
            &PostParams::default(),
            &pool(&ns, [&run.subnets[0], &run.subnets[1]], &run.sg, &run.ami),
        )
        .await
        .unwrap();
    loop {
        let p = pools.get("bench").await.unwrap();
        if p.status.is_some_and(|s| s.launch_template.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls_before = ctx.metrics.encode();
    let requests_before = apiserver::Requests::read(&client).await;
    // RunnerJob lists the bench itself makes between the two readings, taken off Pacer's reads.
    let mut own_lists = 0;

    let cpu_before = process::cpu_seconds(std::process::id());
    let started = Instant::now();
    let created = create_jobs(&creating_jobs, &ns, 0..count).await;
    let creating = started.elapsed();
    let mut latencies = Vec::with_capacity(count);
    let mut seen = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        latencies.clear();
        match &run.fake {
            // Once the fake has launched as many instances, each job's launch call: its own,
            // or its batch's (the statuses say which).
            Some(fake) if fake.launched() >= count => {
                let list = jobs.list(&Default::default()).await.unwrap();
                own_lists += 1;
                for job in &list.items {
                    let uid = job.metadata.uid.clone().unwrap_or_default();
                    if let (Some(at), Some(launched)) = (created.get(&uid), launch_time(fake, job))
                    {
                        latencies.push(launched.saturating_duration_since(*at));
                    }
                }
            }
            Some(_) => {}
            // Against EC2 itself, when each job's status is first seen naming its instance.
            None => {
                let list = jobs.list(&Default::default()).await.unwrap();
                own_lists += 1;
                for job in &list.items {
                    let uid = job.metadata.uid.clone().unwrap_or_default();
                    if job.status.as_ref().is_some_and(|s| s.instance.is_some())
                        && let Some(at) = created.get(&uid)
                    {
                        seen.entry(uid).or_insert_with(|| at.elapsed());
                    }
                }
                latencies.extend(seen.values().copied());
            }
        }
        if latencies.len() == count || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_launched = started.elapsed();
    latencies.sort();
    // A batch member's launch record, for the floor.
    let listed = jobs.list(&Default::default()).await.unwrap();
    own_lists += 1;
    let record = (listed.items.into_iter())
        .filter_map(|j| j.status?.launch.filter(|l| l.batch.is_some()))
        .map(|l| serde_json::to_value(l).unwrap())
        .next();
    // Let every job reach Booting so the steady-state reads are counted too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = ctx.metrics.encode();
    let (mutating, reads) = count_calls(&calls_before, &calls);
    // The API server's counts once every job is Booting: read, then looked at, so the bench's
    // look falls outside the reading that is kept.
    let (requests, booting) = loop {
        let requests = apiserver::Requests::read(&client)
            .await
            .since(&requests_before);
        let list = jobs.list(&Default::default()).await.unwrap().items;
        let booting = (list.iter())
            .filter(|j| {
                j.status
                    .as_ref()
                    .is_some_and(|s| s.phase == JobPhase::Booting)
            })
            .count();
        if booting >= count || Instant::now() > deadline {
            break (requests, booting);
        }
        own_lists += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let cpu = process::cpu_seconds(std::process::id()) - cpu_before;
    println!("== {} ({count} RunnerJobs)", run.name);
    println!(
        "launched {} of {count} in {:.2?}",
        latencies.len(),
        all_launched
    );
    println!("creating the {count} RunnerJobs took {creating:.2?}");
    if !latencies.is_empty() {
        let figure = format!(
            "p50 {:.2?}  p95 {:.2?}  p99 {:.2?}",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.95),
            percentile(&latencies, 0.99)
        );
        // The fake says when each call went; against EC2 itself, the status says when its
        // answer was recorded.
        let (what, target) = match run.fake {
            Some(_) => ("launch call", "p99 ≤ EC2's call + 100 ms"),
            None => (
                "its instance in its status (the launch call, its answer and the status \
                 write, seen by listing every 20 ms)",
                "",
            ),
        };
        println!("creation -> {what}: {figure}");
        let row = report.add(
            &format!("RunnerJob created → {what}, {count} at once ({})", run.name),
            figure,
            target,
        );
        report.anchor(ANCHOR_LAUNCH);
        if run.fake.is_some() {
            report.launch = Some((row, percentile(&latencies, 0.99)));
        }
    }
    println!(
        "EC2 calls per job: mutating {:.2}, read {:.3}",
        mutating as f64 / count as f64,
        reads as f64 / count as f64
    );
    println!("controller RSS with {count} RunnerJobs: {}", rss());
    let row = report.add(
        &format!("EC2 calls per job, mutating / read ({})", run.name),
        format!(
            "{:.2} / {:.3}",
            mutating as f64 / count as f64,
            reads as f64 / count as f64
        ),
        "read ≤ 0.1",
    );
    report.anchor(ANCHOR_EC2);
    report.verdict(
        row,
        reads as f64 / count as f64 <= 0.1,
        "more reads than jobs allow",
    );
    report.add(
        &format!(
            "CPU per 1,000 jobs, creation → Booting, {count} at once ({}; the whole bench \
             process: the controllers, the bench's own clients and any fake EC2)",
            run.name
        ),
        format!("{:.2} s", cpu * 1000.0 / count as f64),
        "",
    );
    if std::env::var("BENCH_VERBOSE").is_ok() {
        calls
            .lines()
            .filter(|l| l.starts_with("pacer_ec2_calls_total{"))
            .for_each(|l| println!("  {l}"));
    }
    api_economy(run.name, count, booting, &requests, own_lists, report);
    // Before the stored jobs, so that nothing else is launching and the listing is the burst's.
    terminations(&ctx, &creating_jobs, count, mutating, run.name, report).await;
    if stored > 0 {
        create_jobs(&creating_jobs, &ns, count..count + stored).await;
        // Read memory once the controller is done with them: every job launched and the
        // snapshot refreshed, not in the middle of the burst.
        let deadline = Instant::now() + Duration::from_secs(600);
        while let Some(fake) = &run.fake
            && fake.launched() < count + stored
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(ctx.settings.instance_refresh * 3).await;
        println!("controller RSS with {stored} RunnerJobs stored: {}", rss());
        report.add(
            &format!("bench process RSS (controllers, fake EC2, clients) with {stored} RunnerJobs"),
            rss(),
            "",
        );
    }
    // Stop the controllers before the runtime goes, so their tasks end cleanly.
    controllers.abort();
    let _ = controllers.await;
    record
}

/// Deletes the burst's `count` jobs (each Booting, its instance alive) and waits until they are
/// gone, which each is once Pacer has terminated its instance; reports the mutating EC2 calls
/// per job of the whole life: the burst's `launched` and the TerminateInstances calls since.
async fn terminations(
    ctx: &Context,
    jobs: &Api<RunnerJob>,
    count: usize,
    launched: u64,
    name: &str,
    report: &mut Report,
) {
    let before = ctx.metrics.encode();
    stream::iter(0..count)
        .map(|i| async move {
            jobs.delete(&format!("job-{i}"), &Default::default())
                .await
                .unwrap();
        })
        .buffer_unordered(64)
        .collect::<()>()
        .await;
    let deadline = Instant::now() + Duration::from_secs(300);
    // The burst's jobs are the namespace's only ones until the stored jobs are made.
    let gone = loop {
        let left = jobs.list(&Default::default()).await.unwrap().items.len();
        if left == 0 || Instant::now() > deadline {
            break count - left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let terminating = calls_of(&before, &ctx.metrics.encode(), "TerminateInstances");
    let per_job = |n: u64| n as f64 / count as f64;
    let figure = format!(
        "{:.3} (launch {:.3}, terminate {:.3}; {gone} of {count} gone)",
        per_job(launched + terminating),
        per_job(launched),
        per_job(terminating)
    );
    println!("EC2 mutating calls per job, launch and terminate: {figure}");
    let row = report.add(
        &format!(
            "EC2 mutating calls per job, launch and terminate, {count} at once ({name}; the \
             burst deleted once Booting, each job gone once its instance is terminated)"
        ),
        figure,
        "≤ 0.25",
    );
    report.anchor(ANCHOR_EC2);
    report.verdict(
        row,
        gone == count && per_job(launched + terminating) <= 0.25,
        "more calls than the target, or a job not gone",
    );
}

/// The API server's requests over the burst, from before the creations until every job was
/// Booting: Pacer's RunnerJob writes, Event writes and RunnerJob reads per job.
fn api_economy(
    name: &str,
    count: usize,
    booting: usize,
    requests: &apiserver::Requests,
    own_lists: u64,
    report: &mut Report,
) {
    let per_job = |n: u64| n as f64 / count as f64;
    let writes = requests.changes("runnerjobs");
    let events = requests.event_writes();
    let reads = requests.reads("runnerjobs").saturating_sub(own_lists);
    let created = requests.count("runnerjobs", &["POST"]);
    println!(
        "API server, creation -> Booting ({booting} of {count} Booting; {created} RunnerJobs \
         created by the bench): RunnerJob writes per job {:.2}, Event writes per job {:.2}, \
         RunnerJob reads per job {:.3}",
        per_job(writes),
        per_job(events),
        per_job(reads)
    );
    let kinds = requests.writes_by_kind(waiting::WRITTEN);
    let conflicts = requests.conflicts("runnerjobs");
    println!("  writes: {kinds}; of the RunnerJob writes, {conflicts} refused as conflicts (409)");
    println!(
        "  RunnerJob watches ended: {} (closed by the API server for falling behind: {})",
        requests.count("runnerjobs", &["WATCH"]),
        requests.watches_closed("runnerjobs")
    );
    if std::env::var("BENCH_VERBOSE").is_ok() {
        for line in requests.lines(&["runnerjobs", "runnerpools", "events"]) {
            println!("  {line}");
        }
    }
    let row = report.add(
        &format!(
            "API server writes per RunnerJob, Pending → Launching → Booting, {count} at once \
             ({name}; Pacer's PATCH/APPLY/PUT/DELETE, the bench's creations left out)"
        ),
        format!(
            "{:.2} ({:.2} stored, {:.2} refused as conflicts)",
            per_job(writes),
            per_job(writes - conflicts),
            per_job(conflicts)
        ),
        "≤ 2 (one per phase change at most)",
    );
    report.verdict(
        row,
        writes <= 2 * count as u64,
        "more than one write per phase change",
    );
    report.add(
        "Event writes per job, same burst",
        format!("{:.2}", per_job(events)),
        "",
    );
    report.add(
        "RunnerJob reads per job, same burst (Pacer's namespaced GET/LIST/WATCH)",
        format!("{:.3}", per_job(reads)),
        "",
    );
    report.add("writes over that burst, by kind", kinds, "");
}

/// EC2 calls by series (`pacer_ec2_calls_total{...}`) in one reading of the metrics.
fn ec2_call_totals(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter(|l| l.starts_with("pacer_ec2_calls_total{"))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
        })
        .collect()
}

/// The calls of `operation` between two readings of the EC2 call metrics.
fn calls_of(before: &str, after: &str, operation: &str) -> u64 {
    let total = |text: &str| -> u64 {
        (ec2_call_totals(text).into_iter())
            .filter(|(series, _)| series.contains(operation))
            .map(|(_, n)| n)
            .sum()
    };
    total(after).saturating_sub(total(before))
}

/// Calls made between two metric readings, split into mutating and read actions.
fn count_calls(before: &str, after: &str) -> (u64, u64) {
    let (before, after) = (ec2_call_totals(before), ec2_call_totals(after));
    let (mut mutating, mut reads) = (0, 0);
    for (key, n) in &after {
        let n = n - before.get(key).copied().unwrap_or(0);
        let read = ["Describe", "GetProducts", "GetInstanceProfile", "DryRun"]
            .iter()
            .any(|r| key.contains(r));
        if read { reads += n } else { mutating += n }
    }
    (mutating, reads)
}

/// The figures of one run: what, the figure measured, its target and whether it is met.
#[derive(Default)]
struct Report {
    /// Figure, measured, target, anchor, verdict.
    rows: Vec<[String; 5]>,
    /// The row of creation → launch call against the fake EC2, and its p99: judged once the
    /// floor under it is measured.
    launch: Option<(usize, Duration)>,
}

/// What the anchors publish, or a polling controller does, beside the figures they bear on.
const ANCHOR_LAUNCH: &str = "terraform-aws-github-runner holds each webhook 30 s \
    (`delay_webhook_event`) before it scales up; a controller polling on a 5 s tick waits 2.5 s \
    on average, 5 s at worst";
const ANCHOR_EC2: &str = "EC2 (documented): launches draw on a resource bucket of 1,000 \
    instances refilled at 2 a second, whatever the number of calls; each API has a request \
    bucket of its own; all per account and Region, shared by every tool in it";
const ANCHOR_REFILL: &str = "a controller polling on a 5 s tick leaves a freed slot empty \
    2.5 s on average";
const ANCHOR_WEBHOOK: &str = "terraform-aws-github-runner answers at once and starts scaling \
    up 30 s later by default (`delay_webhook_event`)";
const ANCHOR_GITHUB: &str = "GitHub (documented): 5,000 requests an hour per App \
    installation (up to 12,500 for large organisations), every call of the App counted; \
    `generate-jitconfig` has no limit of its own published";

impl Report {
    /// Adds a row; returns its index, for [`Report::verdict`].
    fn add(&mut self, what: &str, figure: impl std::fmt::Display, target: &str) -> usize {
        (self.rows).push([
            what.into(),
            figure.to_string(),
            target.into(),
            String::new(),
            String::new(),
        ]);
        self.rows.len() - 1
    }

    /// Whether the row's target is met; if not, why, from what this run measured.
    fn verdict(&mut self, row: usize, met: bool, why_not: &str) {
        self.rows[row][4] = match met {
            true => "met".into(),
            false => format!("not met: {why_not}"),
        };
    }

    /// Sets the anchor of the row added last.
    fn anchor(&mut self, anchor: &str) {
        if let Some(row) = self.rows.last_mut() {
            row[3] = anchor.into();
        }
    }

    /// Writes `bench/results/latest.md` and its JSON twin, `latest.json`.
    fn write(&self, command: &str) {
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let profile = if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        };
        let time = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%MZ");
        let table: Vec<String> = (self.rows.iter())
            .map(|[what, figure, target, anchor, verdict]| {
                format!("| {what} | {figure} | {target} | {verdict} | {anchor} |")
            })
            .collect();
        let text = format!(
            "# Bench run\n\n{time}, commit {commit}, {profile} profile, `{command}`, on this machine \
             (the API server, etcd and the bench share its cores).\n\n\
             | figure | measured | target | met? | anchors (published behaviour) |\n\
             | --- | --- | --- | --- | --- |\n{}\n",
            table.join("\n")
        );
        let json = serde_json::json!({
            "time": time.to_string(),
            "commit": commit,
            "profile": profile,
            "command": command,
            "figures": (self.rows.iter())
                .map(|[what, figure, target, anchor, verdict]| {
                    serde_json::json!({"figure": what, "measured": figure, "target": target,
                        "met": verdict, "anchor": anchor})
                })
                .collect::<Vec<_>>(),
        });
        let dir = repo_root().join("bench/results");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("latest.md"), text).unwrap();
        let json = serde_json::to_string_pretty(&json).unwrap() + "\n";
        std::fs::write(dir.join("latest.json"), json).unwrap();
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs benches without it, and a
    // bench that creates 10,000 objects has no place in the test run.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only.split(',').any(|p| p.trim() == name);
    let count = env("BENCH_JOBS", 500) as usize;
    let stored = env("BENCH_STORED", 10_000) as usize;
    let latency = Duration::from_millis(env("BENCH_LATENCY_MS", 200));
    let mut report = Report::default();

    if part("process") {
        let p = process::run(stored).await;
        println!("== pacer run alone (3 pools Ready)");
        println!("start -> ready, no RunnerJob: {}", p.start_idle);
        println!("RSS idle: {}", p.idle);
        println!(
            "start -> ready with {} RunnerJobs stored: {}",
            p.stored, p.start_stored
        );
        println!("RSS with {} RunnerJobs stored: {}", p.stored, p.with_stored);
        let why = "see docs/testing.md for where it goes";
        let row = report.add("`pacer run` RSS idle, pools Ready", &p.idle, "≤ 30 MiB");
        report.verdict(row, p.idle.rss <= 30.0, why);
        let row = report.add(
            &format!("`pacer run` RSS with {} RunnerJobs stored", p.stored),
            &p.with_stored,
            "≤ 50 MiB",
        );
        report.verdict(row, p.with_stored.rss <= 50.0, why);
        let row = report.add(
            &format!("`pacer run` start → ready with {} RunnerJobs", p.stored),
            &p.start_stored,
            "< 2 s",
        );
        let ready = p.start_stored.all();
        let why = format!(
            "the API server alone served the list in {:.2?} (the next row); Pacer's share \
             after it {:.2?}; an API server with cores of its own lowers the first",
            p.listing,
            ready.saturating_sub(p.listing)
        );
        report.verdict(row, ready < Duration::from_secs(2), &why);
        report.add(
            &format!(
                "the API server serving those {} RunnerJobs as Pacer's watch asks (pages of 500), \
                 read but not parsed: the floor under start → ready",
                p.stored
            ),
            format!("{:.2?}", p.listing),
            "",
        );
        report.add(
            &format!(
                "CPU `pacer run` spent from start to ready with {} RunnerJobs",
                p.stored
            ),
            format!("{:.2} s", p.start_stored_cpu),
            "",
        );
        report.add("`pacer run` start → ready, no RunnerJob", &p.start_idle, "");
    }

    if part("launch") {
        let (subnets, sg, ami) = (
            [
                "subnet-0a1b2c3d4e5f60001".to_string(),
                "subnet-0a1b2c3d4e5f60002".to_string(),
            ],
            "sg-0a1b2c3d4e5f60001".to_string(),
            "ami-0a1b2c3d4e5f60001".to_string(),
        );
        let mut fake = FakeEc2::new()
            .with_image(&ami, "x86_64", 8)
            .with_subnet(&subnets[0], "vpc-1", "us-east-1a")
            .with_subnet(&subnets[1], "vpc-1", "us-east-1b")
            .with_security_group(&sg, "vpc-1");
        for t in ["m7i.large", "m6i.large", "c6i.large"] {
            fake = fake.with_instance_type(t, "x86_64");
        }
        let metrics = Arc::new(Metrics::default());
        let fake = Arc::new(fake.with_latency(latency).observed_by(metrics.clone()));
        println!("fake EC2 latency per call: {latency:?}");
        let record = bench(
            Run {
                name: "fake",
                ec2: fake.clone(),
                metrics,
                fake: Some(fake),
                ami,
                subnets,
                sg,
            },
            count,
            stored,
            &mut report,
        )
        .await;
        // A burst launched one by one leaves no batch record to write: no floor then.
        if let Some(record) = &record {
            let mut floor_p99 = Vec::new();
            for limited in [true, false] {
                let f = floor::run(ground(Parts::Both), count, record, limited).await;
                floor_p99.push(percentile(&f.latencies, 0.99));
                let client = match limited {
                    true => "at most 32 in flight, as Pacer's client",
                    false => "no client-side limit",
                };
                let figure = format!(
                    "p50 {:.2?}  p95 {:.2?}  p99 {:.2?}; the last stored {:.2?} after the first \
                     creation",
                    percentile(&f.latencies, 0.50),
                    percentile(&f.latencies, 0.95),
                    percentile(&f.latencies, 0.99),
                    f.all
                );
                println!("floor ({client}): creation -> own launch record stored: {figure}");
                report.add(
                    &format!(
                        "floor, no controller: RunnerJob created → a launch record of its own \
                         stored, {count} at once ({client}): what recording each job before its \
                         call costs the API server here, the EC2 call not counted"
                    ),
                    figure,
                    "",
                );
            }
            if let Some((row, p99)) = report.launch {
                let floor = floor_p99.iter().min().unwrap();
                let why = format!(
                    "with no controller, the API server alone stores each job's launch record \
                     at p99 {floor:.2?} here (the floor rows below), before any EC2 call, against \
                     a target of {:.2?} with the call; what would close it: an API server with \
                     cores of its own, or one record per batch",
                    latency + Duration::from_millis(100)
                );
                let met = p99 <= latency + Duration::from_millis(100);
                report.verdict(row, met, &why);
            }
        }
    }

    if part("refill") {
        let r = refill::run(
            env("BENCH_REFILL_JOBS", 100) as usize,
            env("BENCH_REFILL_MAX", 10) as usize,
            Duration::from_millis(env("BENCH_RUN_MS", 3000)),
            latency,
        )
        .await;
        println!("== slot refill: {} jobs through {} slots", r.jobs, r.max);
        println!("{r}");
        let row = report.add(
            &format!(
                "slots held while jobs waited ({} jobs of {:.0?} through maxRunners {})",
                r.jobs, r.run_for, r.max
            ),
            format!(
                "mean {:.1} (all held in {} of {} samples); a runner at work in {:.1}",
                r.held, r.all_held, r.samples, r.working
            ),
            &format!("≥ {} of {}", r.max * 9 / 10, r.max),
        );
        report.anchor(ANCHOR_REFILL);
        let met = r.held >= (r.max * 9 / 10) as f64;
        report.verdict(row, met, "freed slots stayed empty while jobs waited");
        report.add(
            "queue wait, mean / max, on that run",
            format!("{:.1?} / {:.1?}", r.wait_mean, r.wait_max),
            "",
        );
    }

    if part("waiting") {
        let w = waiting::run(
            env("BENCH_WAITING", 2000) as usize,
            env("BENCH_WAITING_MAX", 10) as usize,
            Duration::from_secs(env("BENCH_WINDOW_S", 60)),
            latency,
        )
        .await;
        let steady = waiting::Figures::writes(&w.steady);
        let settling = waiting::Figures::writes(&w.settling);
        println!(
            "== full pool: {} jobs waiting behind maxRunners {} ({} Booting, {} Pending without \
             a slot once settled, {:.1?} after the first creation)",
            w.waiting, w.max, w.booting, w.pending, w.settle
        );
        println!(
            "Pacer's API server writes over {:.1?}: {steady} ({:.2}/s): {}",
            w.window,
            w.per_second(steady),
            w.steady.writes_by_kind(waiting::WRITTEN)
        );
        println!(
            "RunnerJob reads over it: {} ({:.2}/s)",
            w.steady.reads("runnerjobs"),
            w.per_second(w.steady.reads("runnerjobs"))
        );
        println!(
            "writes until settled: {settling}: {}",
            w.settling.writes_by_kind(waiting::WRITTEN)
        );
        if std::env::var("BENCH_VERBOSE").is_ok() {
            println!("  until settled:");
            for line in w.settling.lines(waiting::WRITTEN) {
                println!("    {line}");
            }
            println!("  over the window:");
            for line in w.steady.lines(waiting::WRITTEN) {
                println!("    {line}");
            }
        }
        let row = report.add(
            &format!(
                "Pacer's API server writes/s (RunnerJobs, RunnerPools, Events), {} jobs waiting \
                 on a full pool (maxRunners {}), settled, over {:.0?}",
                w.waiting, w.max, w.window
            ),
            format!(
                "{:.2}/s ({steady} writes: {})",
                w.per_second(steady),
                w.steady.writes_by_kind(waiting::WRITTEN)
            ),
            "≈ 0 (under 0.1/s)",
        );
        let met = w.per_second(steady) < 0.1;
        report.verdict(row, met, "waiting jobs write while they wait");
        report.add(
            "RunnerJob reads/s over that window (Pacer's namespaced GET/LIST/WATCH)",
            format!("{:.2}/s", w.per_second(w.steady.reads("runnerjobs"))),
            "",
        );
        report.add(
            "writes from the first creation until settled, that run",
            format!(
                "{settling} in {:.0?}: {}",
                w.settle,
                w.settling.writes_by_kind(waiting::WRITTEN)
            ),
            "",
        );
    }

    if part("webhooks") {
        webhooks(
            env("BENCH_WEBHOOKS", 1000) as usize,
            env("BENCH_WEBHOOK_RATE", 100),
            &mut report,
        )
        .await;
    }

    if part("warm") {
        let size = env("BENCH_WARM", 3) as usize;
        let w = warm::run(size).await;
        let summary = |v: &[f64]| {
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            let max = v.iter().copied().fold(0.0, f64::max);
            format!("mean {mean:.2} s, max {max:.2} s over {} jobs", v.len())
        };
        println!("== queue to runner on the simulator ({size} jobs each)");
        println!("warm start: {}", summary(&w.warm));
        println!("launched: {}", summary(&w.cold));
        report.add(
            "RunnerJob created → runner registered, warm start (simulator: no EC2 boot time)",
            summary(&w.warm),
            "",
        );
        report.add(
            "RunnerJob created → runner registered, launched (simulator: no EC2 boot time)",
            summary(&w.cold),
            "",
        );
        let jobs = w.warm.len() + w.cold.len();
        let calls: usize = w.github_calls.values().sum();
        let by: Vec<String> = (w.github_calls.iter())
            .map(|(endpoint, n)| format!("{endpoint} {n}"))
            .collect();
        println!(
            "GitHub calls, first delivery to every job finished: {calls} ({})",
            by.join(", ")
        );
        report.add(
            &format!(
                "GitHub calls per job, delivery → finished, those {jobs} jobs (the warm pool's \
                 refill included; the fake GitHub's count)"
            ),
            format!("{:.1} ({})", calls as f64 / jobs as f64, by.join(", ")),
            "",
        );
        report.anchor(ANCHOR_GITHUB);
    }

    if part("moto") {
        let g = ground(Parts::Both);
        let metrics = Arc::new(Metrics::default());
        let ec2 = AwsEc2::new(&g.aws_config().await).observed_by(metrics.clone());
        let run = Run {
            name: "moto",
            ec2: Arc::new(ec2),
            metrics,
            fake: None,
            ami: g.fixture("AMI_X86_64").into(),
            subnets: [g.fixture("SUBNET_A").into(), g.fixture("SUBNET_B").into()],
            sg: g.fixture("SECURITY_GROUP").into(),
        };
        bench(run, count.min(200), 0, &mut report).await;
    }
    let vars: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("BENCH_") || k == "PACER_BIN")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    report.write(format!("{} make bench", vars.join(" ")).trim());
}

/// Posts `count` signed `workflow_job` `queued` webhooks at `rate` per second to `pacer run`'s
/// listener (`PACER_BIN`'s when set: the binary shipped) serving a Ready pool, and reports the
/// time from sending each to its 2xx (the RunnerJob stored). The pool is first filled to its
/// `maxRunners` by as many deliveries, launched against moto: the measured ones wait behind
/// them, as on a busy day, and moto (an emulator spending this machine's cores, as EC2 does
/// not) launches nothing while they are timed.
async fn webhooks(count: usize, rate: u64, report: &mut Report) {
    if count == 0 {
        return;
    }
    let ground = ground(Parts::Both);
    let client = ground.kube_client().await;
    let (pacer, ns) = process::serving("bench-webhooks").await;
    let url = format!("{}/api/webhook", pacer.url());
    let http = reqwest::Client::new();
    let deliver = |id: usize| {
        // As GitHub sends it: queued just now (a delivery without `created_at` looks replayed,
        // and Pacer looks for the job before recording it).
        let created_at = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let body = serde_json::to_vec(&json!({
            "action": "queued",
            "workflow_job": {"id": id, "run_id": 7, "status": "queued",
                "created_at": created_at, "labels": ["self-hosted", "linux", "x64"],
                "runner_name": null, "conclusion": null},
            "repository": {"name": "api", "full_name": "example-org/api",
                "owner": {"login": "example-org"}},
            "installation": {"id": 1},
        }))
        .unwrap();
        let signature = pacer::github::webhook::sign(support::process::WEBHOOK_SECRET, &body);
        let request = (http.post(&url))
            .header("x-github-event", "workflow_job")
            .header("x-github-delivery", format!("bench-{id}"))
            .header("x-hub-signature-256", signature)
            .body(body);
        async move {
            let status = request.send().await.unwrap().status();
            assert!(status.is_success(), "{status}");
        }
    };
    let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
    let max = serde_json::from_value::<RunnerPool>(ground.example_pool(&ns, "linux"))
        .unwrap()
        .spec
        .max_runners as usize;
    paced(max, rate, |i| deliver(400_000 + i)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = jobs.list(&Default::default()).await.unwrap();
        let booting = (list.items.iter())
            .filter(|j| {
                j.status
                    .as_ref()
                    .is_some_and(|s| s.phase == JobPhase::Booting)
            })
            .count();
        if booting == max {
            break;
        }
        assert!(Instant::now() < deadline, "{booting} of {max} Booting");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu_before = process::cpu_seconds(pacer.child.id());
    let requests_before = apiserver::Requests::read(&client).await;
    let started = Instant::now();
    let times = paced(count, rate, |i| deliver(500_000 + i)).await;
    // Each job's first pass (it waits for room) is done.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = process::cpu_seconds(pacer.child.id()) - cpu_before;
    // What else the API server wrote while it stored the deliveries' RunnerJobs.
    let besides = (apiserver::Requests::read(&client).await)
        .since(&requests_before)
        .writes_by_kind(waiting::WRITTEN);
    println!(
        "== webhooks: {count} signed queued deliveries at {rate}/s in {:.1?}",
        started.elapsed()
    );
    let figure = |times: &[Duration]| {
        format!(
            "p50 {:.1?}  p99 {:.1?}  max {:.1?}",
            percentile(times, 0.50),
            percentile(times, 0.99),
            times.last().unwrap()
        )
    };
    println!(
        "delivery -> 2xx with the RunnerJob stored: {}",
        figure(&times)
    );
    drop(pacer);
    // The floor: as many RunnerJobs created at the same pace straight through a client of
    // Pacer's kind, into a namespace no controller watches: no listener, signature or parsing.
    let ns = ground.namespace(&client, "bench-webhooks-floor").await;
    let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
    let floor = paced(count, rate, |i| {
        let job = job(&ns, i);
        let jobs = jobs.clone();
        async move {
            jobs.create(&PostParams::default(), &job).await.unwrap();
        }
    })
    .await;
    println!("floor, creations alone at that pace: {}", figure(&floor));
    let row = report.add(
        &format!("webhook delivery → 2xx with the RunnerJob stored, {count} at {rate}/s"),
        figure(&times),
        "p99 ≤ 10 ms",
    );
    report.anchor(ANCHOR_WEBHOOK);
    let why = format!(
        "the API server alone stores the same creations at p99 {:.1?} here (the floor row \
         below), and over the deliveries Pacer wrote {besides} besides (the row after next: \
         each waiting job's first pass records why it waits); what would close it: an API \
         server whose own p99 for a creation is well under 10 ms, and fewer writes while \
         deliveries arrive",
        percentile(&floor, 0.99)
    );
    report.verdict(
        row,
        percentile(&times, 0.99) <= Duration::from_millis(10),
        &why,
    );
    println!(
        "writes besides the creations, over those deliveries and the jobs' first passes: {besides}"
    );
    report.add(
        &format!(
            "Pacer's API server writes besides the {count} creations, over those deliveries and \
             each job's first pass"
        ),
        besides,
        "",
    );
    report.add(
        &format!(
            "CPU per 1,000 jobs `pacer run` spent on those {count} deliveries: each verified, \
             recorded and its job held waiting"
        ),
        format!("{:.2} s", cpu * 1000.0 / count as f64),
        "",
    );
    report.add(
        &format!(
            "floor, no listener: the same RunnerJobs created straight through a client of \
             Pacer's kind, {count} at {rate}/s: what the API server takes to store each here"
        ),
        figure(&floor),
        "",
    );
}

/// Starts `send(i)` for `i` in `0..count`, `rate` per second whatever the answers' pace, and
/// returns the time each took, sorted.
async fn paced<F, Fut>(count: usize, rate: u64, send: F) -> Vec<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        tick.tick().await;
        let request = send(i);
        sent.push(tokio::spawn(async move {
            let at = Instant::now();
            request.await;
            at.elapsed()
        }));
    }
    let mut times = Vec::with_capacity(count);
    for handle in sent {
        times.push(handle.await.unwrap());
    }
    times.sort();
    times
}
