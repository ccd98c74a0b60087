//! Faults production hits, driven at the RunnerJob controller on the real ground (kube-apiserver,
//! moto behind the AWS proxy, the fake GitHub), each scenario ending with the same invariants:
//! - every job ran to success on a Pacer runner, or ended with a reason that says why not;
//! - no instance was terminated while its runner ran a job;
//! - no job got more instances than attempts (one per recorded launch);
//! - nothing of ours is left running once the jobs are over;
//! - `maxRunners` was never exceeded (EC2 sampled throughout).
//!
//! Simulated runners play the instance's side: a runner registers a while after its instance
//! boots, takes its job (GitHub marks it in progress and the runner busy), runs for a set time
//! and reports. `make test` runs each scenario with a few jobs; `make chaos` runs them with
//! `CHAOS_JOBS` jobs each and writes the counts to `CHAOS_REPORT`.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use pacer::api::{JobPhase, RunnerJob, RunnerJobSpec, RunnerPool};
use pacer::cloud::Ec2 as _;
use pacer::cloud::aws::AwsEc2;
use pacer::controller::{self, Context, Settings};
use serde_json::json;
use support::github::FakeGitHub;
use support::invariants::{
    Counts, assert_invariants, count_endings, instances_by_job, job_count, report,
};
use support::{Ground, Parts, ground};

const REPO: &str = "example-org/api";
const TARGET: &str = "orgs/example-org";

/// What a scenario does to the world while its jobs run.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Stop the controller and start a new one this many times during the burst.
    restarts: u32,
    /// EC2 throttles, refuses capacity, fails and loses answers; its listing lags.
    ec2: bool,
    /// One job in three has its instance terminated behind Pacer's back while it boots.
    terminate_booting: bool,
    /// Every `in_progress` webhook is lost, and each job runs past the idle limit.
    lost_in_progress: bool,
    /// GitHub answers 503 to runner removals and job look-ups for a while.
    github_outage: bool,
}

/// The simulated runner of one job attempt.
#[derive(Default)]
struct Runner {
    seen_booting: Option<tokio::time::Instant>,
    registered: Option<(i64, String, tokio::time::Instant)>,
    taken: Option<tokio::time::Instant>,
    done: bool,
}

struct World {
    ground: &'static Ground,
    client: kube::Client,
    ns: String,
    id: String,
    jobs: Api<RunnerJob>,
    pools: Api<RunnerPool>,
    fake: FakeGitHub,
    /// The controller's EC2 client.
    ec2: AwsEc2,
    /// The test's own, for what happens behind Pacer's back.
    fixtures: AwsEc2,
}

const MAX_RUNNERS: usize = 4;

impl World {
    async fn new(scenario: &str) -> Self {
        let ground = ground(Parts::Both);
        let client = ground.kube_client().await;
        let ns = ground
            .namespace(&client, &format!("chaos-{scenario}"))
            .await;
        let fake = FakeGitHub::start().await;
        fake.install(1, &[REPO]);
        Self {
            ground,
            jobs: Api::namespaced(client.clone(), &ns),
            pools: Api::namespaced(client.clone(), &ns),
            client,
            id: format!("chaos-{scenario}"),
            ns,
            fake,
            ec2: AwsEc2::new(&ground.aws_config().await),
            fixtures: AwsEc2::new(
                &(ground.aws_config().await.to_builder())
                    .app_name(aws_config::AppName::new("pacer-tests").unwrap())
                    .build(),
            ),
        }
    }

    fn controller(&self) -> tokio::task::JoinHandle<()> {
        let settings = Settings {
            backoff_unit: Duration::from_millis(200),
            instance_refresh: Duration::from_millis(500),
            gc_grace: Duration::ZERO,
            ..Settings::new(&self.id, "https://pacer.example.test")
        };
        let mut settings = settings;
        settings.job_limits.launch_visibility = Duration::from_secs(5);
        settings.job_limits.queue_recheck = Duration::from_secs(5);
        let ctx = Context::new(self.client.clone(), Arc::new(self.ec2.clone()), settings)
            .with_github(Arc::new(self.fake.client()));
        tokio::spawn(controller::run(
            Arc::new(ctx),
            self.pools.clone(),
            self.jobs.clone(),
        ))
    }

    async fn ready_pool(&self) {
        let mut pool = self.ground.example_pool(&self.ns, "linux");
        pool["spec"]["maxRunners"] = json!(MAX_RUNNERS);
        let pool: RunnerPool = serde_json::from_value(pool).unwrap();
        self.pools
            .create(&PostParams::default(), &pool)
            .await
            .unwrap();
        support::wait_ready(&self.pools, "linux", Duration::from_secs(60)).await;
    }

    async fn create_job(&self, job_id: i64) {
        self.fake.set_job(REPO, job_id, "queued", None);
        let spec = RunnerJobSpec {
            pool_name: "linux".into(),
            job_id,
            run_id: 7,
            repository: REPO.into(),
            labels: vec!["self-hosted".into(), "linux".into()],
            installation_id: Some(1),
        };
        let job = RunnerJob::for_queued_job(&self.ns, &format!("gh-job-{job_id}"), spec);
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .unwrap();
    }

    async fn patch_status(&self, name: &str, status: serde_json::Value) {
        let patch = json!({ "status": status });
        let _ = (self.jobs)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }

    async fn instances(&self) -> HashMap<String, (usize, Vec<String>)> {
        let jobs = self.jobs.list(&Default::default()).await.map(|l| l.items);
        instances_by_job(&self.fixtures, &self.id, &jobs.unwrap_or_default()).await
    }

    /// One step of every simulated runner, given what EC2 shows now.
    async fn step_runners(
        &self,
        runners: &mut HashMap<(String, u32), Runner>,
        faults: Faults,
        timing: Timing,
        counts: &mut Counts,
    ) {
        let instances = self.instances().await;
        let alive: usize = instances.values().map(|(_, live)| live.len()).sum();
        counts.max_alive = counts.max_alive.max(alive);
        if alive > MAX_RUNNERS {
            counts.over_max_runners += 1;
        }
        let now = tokio::time::Instant::now();
        for job in self.jobs.list(&Default::default()).await.unwrap().items {
            let (Some(uid), Some(status)) = (job.metadata.uid.clone(), job.status.clone()) else {
                continue;
            };
            let name = job.metadata.name.clone().unwrap_or_default();
            let attempt = status.attempt();
            let live = instances
                .get(&uid)
                .map(|(_, l)| l.clone())
                .unwrap_or_default();
            let runner = runners.entry((uid.clone(), attempt)).or_default();
            let instance = status.instance.as_ref().map(|i| i.id.clone());
            let alive = instance.as_ref().is_some_and(|id| live.contains(id));
            if runner.done || status.phase.is_finished() {
                continue;
            }
            if status.phase == JobPhase::Booting && runner.seen_booting.is_none() {
                runner.seen_booting = Some(now);
                if faults.terminate_booting && job.spec.job_id % 3 == 0 && attempt == 1 {
                    if let Some(id) = &instance {
                        let _ = self
                            .fixtures
                            .terminate_instances(std::slice::from_ref(id))
                            .await;
                    }
                    continue;
                }
            }
            match (runner.seen_booting, &runner.registered, runner.taken) {
                (Some(seen), None, _) if alive && now >= seen + timing.boot => {
                    let name_on_github =
                        pacer::github::runner_name(&self.id, job.spec.job_id, attempt);
                    let id = self.fake.add_runner(TARGET, &name_on_github, "online");
                    let runner_status = json!({"id": id, "name": name_on_github});
                    self.patch_status(&name, json!({ "runner": runner_status }))
                        .await;
                    runner.registered = Some((id, name_on_github, now));
                }
                (_, Some((id, runner_name, at)), None) if now >= *at + timing.take => {
                    let (id, runner_name) = (*id, runner_name.clone());
                    self.fake.set_job(
                        REPO,
                        job.spec.job_id,
                        "in_progress",
                        Some((id, &runner_name)),
                    );
                    self.fake.set_busy(TARGET, &runner_name, true);
                    if faults.lost_in_progress {
                        // Past the idle limit with no `in_progress` recorded.
                        let then = k8s_openapi::jiff::Timestamp::now()
                            - k8s_openapi::jiff::SignedDuration::from_mins(30);
                        self.patch_status(
                            &name,
                            json!({"phaseTimes": {"running": then.to_string()}}),
                        )
                        .await;
                    } else {
                        let assigned =
                            json!({"jobId": job.spec.job_id, "runId": 7, "repository": REPO});
                        self.patch_status(&name, json!({ "assignedJob": assigned }))
                            .await;
                    }
                    runner.taken = Some(now);
                }
                (_, Some((_, runner_name, _)), Some(taken)) => {
                    if !alive {
                        // Its instance went while the runner ran the job.
                        counts.busy_killed += 1;
                        runner.done = true;
                        continue;
                    }
                    if now >= taken + timing.run {
                        let runner_name = runner_name.clone();
                        self.patch_status(&name, json!({"completion": {"result": "success"}}))
                            .await;
                        self.fake.set_busy(TARGET, &runner_name, false);
                        self.fake.set_job(REPO, job.spec.job_id, "completed", None);
                        runner.done = true;
                    }
                }
                _ => {}
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Timing {
    boot: Duration,
    take: Duration,
    run: Duration,
}

async fn run(scenario: &str, faults: Faults) -> Counts {
    let w = World::new(scenario).await;
    let mut controller = w.controller();
    w.ready_pool().await;
    let proxy = w.ground.proxy();
    let ours = format!("{}/", w.ns);
    if faults.ec2 {
        proxy.describe_lag(3.0, &ours).await;
        for (code, count, extra) in [
            ("RequestLimitExceeded", 4, json!({"status": 503})),
            ("InternalError", 3, json!({"status": 500})),
            // One fleet without spot capacity for any type: the next launches go on-demand.
            (
                "InsufficientInstanceCapacity",
                1,
                json!({"fleet_error": true}),
            ),
            ("-", 2, json!({"lose_answer": true})),
        ] {
            let mut fault = json!({"action": "CreateFleet", "code": code, "count": count,
                "match": {"Key": "gha:runner_job_uid", "Value": ours}});
            fault
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            proxy.add_fault(fault).await;
        }
    }
    if faults.github_outage {
        w.fake.fail("delete_runner", 503, 1000);
        w.fake.fail("get_workflow_job", 503, 20);
    }
    let n = job_count();
    let timing = Timing {
        boot: Duration::from_millis(800),
        take: Duration::from_millis(400),
        run: Duration::from_secs(2),
    };
    let mut counts = Counts {
        jobs: n as usize,
        ..Default::default()
    };
    let mut runners = HashMap::new();
    for job_id in 1..=n {
        w.create_job(job_id).await;
    }
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(60 + 6 * n as u64);
    let mut restarts = 0;
    loop {
        w.step_runners(&mut runners, faults, timing, &mut counts)
            .await;
        if restarts < faults.restarts
            && started.elapsed() > Duration::from_secs(2 + 3 * restarts as u64)
        {
            controller.abort();
            controller = w.controller();
            restarts += 1;
        }
        let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
        let finished = jobs
            .iter()
            .filter(|j| j.status.as_ref().is_some_and(|s| s.phase.is_finished()))
            .count();
        if finished == jobs.len() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if faults.github_outage {
        w.fake.fail("delete_runner", 503, 0);
    }
    // Settle: the last terminations land in EC2's listing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let instances = w.instances().await;
    let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
    count_endings(&mut counts, &jobs, &instances);
    counts.left_alive = instances.values().map(|(_, live)| live.len()).sum();
    counts.fired = fired(&w, faults, restarts).await;
    counts.left_runners = if faults.github_outage {
        // Removal was refused throughout: the sweep's job, not the pass's (counted elsewhere).
        0
    } else {
        w.fake.runner_names(TARGET).len()
    };
    controller.abort();
    report(scenario, &counts, started.elapsed());
    counts
}

/// How often the faults of the scenario took effect, as the proxy, the fake GitHub and the
/// jobs' statuses recorded them.
async fn fired(w: &World, faults: Faults, restarts: u32) -> usize {
    let mut fired = restarts as usize;
    let proxy = w.ground.proxy();
    if faults.ec2 {
        let refused = (proxy.calls_of("CreateFleet", &w.ns).await.iter())
            .filter(|c| c.status != 200)
            .count();
        fired += refused + proxy.hidden_by_lag().await as usize;
    }
    if faults.terminate_booting {
        let jobs = w.jobs.list(&Default::default()).await.unwrap().items;
        fired += (jobs.iter().filter_map(|j| j.status.as_ref()))
            .map(|s| s.previous_attempts.len())
            .sum::<usize>();
    }
    if faults.lost_in_progress {
        fired += w.fake.calls_of("get_runner");
    }
    if faults.github_outage {
        fired += w.fake.calls_of("delete_runner");
    }
    fired
}

#[tokio::test]
async fn ec2_throttles_fails_refuses_capacity_loses_answers_and_lags() {
    let c = run(
        "ec2",
        Faults {
            ec2: true,
            ..Default::default()
        },
    )
    .await;
    assert_invariants(&c);
    assert_eq!(c.succeeded, c.jobs, "{c:?}");
}

#[tokio::test]
async fn the_controller_is_killed_and_restarted_mid_burst() {
    let c = run(
        "restarts",
        Faults {
            restarts: 5,
            ..Default::default()
        },
    )
    .await;
    assert_invariants(&c);
    assert_eq!(c.succeeded, c.jobs, "{c:?}");
}

#[tokio::test]
async fn instances_terminated_behind_our_back_while_booting_are_replaced() {
    let c = run(
        "terminated",
        Faults {
            terminate_booting: true,
            ..Default::default()
        },
    )
    .await;
    assert_invariants(&c);
    assert_eq!(c.succeeded, c.jobs, "{c:?}");
}

#[tokio::test]
async fn lost_in_progress_webhooks_never_cut_off_a_busy_runner() {
    let c = run(
        "lost-in-progress",
        Faults {
            lost_in_progress: true,
            ..Default::default()
        },
    )
    .await;
    assert_invariants(&c);
    assert_eq!(c.succeeded, c.jobs, "{c:?}");
}

#[tokio::test]
async fn a_github_outage_frees_slots_and_loses_no_job() {
    let c = run(
        "github-outage",
        Faults {
            github_outage: true,
            ..Default::default()
        },
    )
    .await;
    assert_invariants(&c);
    assert_eq!(c.succeeded, c.jobs, "{c:?}");
}
