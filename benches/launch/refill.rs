//! Slots refilled at once: a pool of `maxRunners` slots and many more queued jobs, each job
//! "running" a few seconds once its instance is up (the bench reports its completion, as the
//! runner's callback would). Sampled from the API server while jobs wait for room: how many of
//! the pool's slots are held (a job launching, booting, running or terminating its instance)
//! and how many hold a runner at work (Booting or Running).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams, PostParams};
use pacer::api::{JobPhase, RunnerJob, RunnerJobSpec};
use pacer::domain::job::holds_slot;
use serde_json::json;

pub struct Figures {
    pub jobs: usize,
    pub max: usize,
    pub run_for: Duration,
    pub samples: usize,
    /// Mean slots held, and samples with every slot held, while jobs waited.
    pub held: f64,
    pub all_held: usize,
    /// Mean slots whose runner was at work (Booting or Running) while jobs waited.
    pub working: f64,
    /// From creation to the launch being recorded (Launching), mean and max.
    pub wait_mean: Duration,
    pub wait_max: Duration,
    pub took: Duration,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "slots held while jobs waited: mean {:.1} of {} (all {} held in {} of {} samples)",
            self.held, self.max, self.max, self.all_held, self.samples
        )?;
        writeln!(
            f,
            "slots with a runner at work (Booting/Running) while jobs waited: mean {:.1} of {}",
            self.working, self.max
        )?;
        write!(
            f,
            "queue wait (creation -> launch recorded): mean {:.1?}, max {:.1?}; all {} jobs of {:.1?} done in {:.1?}",
            self.wait_mean, self.wait_max, self.jobs, self.run_for, self.took
        )
    }
}

fn phase(job: &RunnerJob) -> JobPhase {
    job.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// Runs `jobs` jobs of `run_for` each through a pool of `max` slots, with the production
/// settings and the fake EC2 at `latency` per call.
pub async fn run(jobs: usize, max: usize, run_for: Duration, latency: Duration) -> Figures {
    let crate::SmallPool {
        ns,
        jobs: api,
        controllers,
        ..
    } = crate::small_pool("bench-refill", max, latency).await;

    let started = Instant::now();
    futures::future::join_all((0..jobs).map(|i| {
        let job = RunnerJob::for_queued_job(
            &ns,
            &format!("job-{i}"),
            RunnerJobSpec {
                pool_name: "bench".into(),
                job_id: 5_000_000 + i as i64,
                run_id: 1,
                repository: "example-org/api".into(),
                labels: vec!["self-hosted".into()],
                installation_id: Some(1),
            },
        );
        let api = api.clone();
        async move { api.create(&PostParams::default(), &job).await.unwrap() }
    }))
    .await;

    // When the bench first saw each job's runner at work, and the jobs it reported done.
    let mut at_work: HashMap<String, Instant> = HashMap::new();
    let (mut samples, mut held_sum, mut working_sum, mut all_held) = (0usize, 0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(900);
    let list = loop {
        let list = api.list(&Default::default()).await.unwrap().items;
        if list.iter().all(|j| phase(j).is_finished()) {
            break list;
        }
        assert!(Instant::now() < deadline, "the jobs did not all finish");
        let held = list
            .iter()
            .filter(|j| holds_slot(j.status.as_ref()))
            .count();
        let working = list
            .iter()
            .filter(|j| matches!(phase(j), JobPhase::Booting | JobPhase::Running))
            .count();
        let waiting = list
            .iter()
            .any(|j| phase(j) == JobPhase::Pending && !holds_slot(j.status.as_ref()));
        if waiting {
            samples += 1;
            held_sum += held;
            working_sum += working;
            all_held += usize::from(held >= max);
        }
        // The runner reports its job done `run_for` after the bench saw it at work.
        for job in list.iter().filter(|j| phase(j) == JobPhase::Booting) {
            let name = job.metadata.name.clone().unwrap();
            let seen = *at_work.entry(name.clone()).or_insert_with(Instant::now);
            let reported = job.status.as_ref().is_some_and(|s| s.completion.is_some());
            if !reported && seen.elapsed() >= run_for {
                let patch = json!({"status": {"completion": {"result": "success"}}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = started.elapsed();
    let waits: Vec<Duration> = list
        .iter()
        .filter_map(|j| {
            let created = j.metadata.creation_timestamp.as_ref()?.0;
            let launched = j.status.as_ref()?.phase_times.launching.as_ref()?.0;
            Some(launched.duration_since(created).unsigned_abs())
        })
        .collect();
    controllers.abort();
    let _ = controllers.await;
    let per_sample = |sum: usize| sum as f64 / samples.max(1) as f64;
    Figures {
        jobs,
        max,
        run_for,
        samples,
        held: per_sample(held_sum),
        all_held,
        working: per_sample(working_sum),
        wait_mean: waits.iter().sum::<Duration>() / waits.len().max(1) as u32,
        wait_max: waits.iter().max().copied().unwrap_or_default(),
        took,
    }
}
