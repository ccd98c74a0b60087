//! The invariants every fault scenario ends with (`tests/chaos*.rs`), and their report line.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pacer::api::{JobPhase, RunnerJob};
use pacer::cloud::Ec2 as _;
use pacer::cloud::aws::AwsEc2;

/// Reasons a job may end with other than success, each saying why it did not run here, or
/// why it did not finish: EC2 reclaimed its spot instance while its runner ran it (and GitHub
/// was asked to re-run it, when its pool says so).
pub const EXPLAINED: [&str; 6] = [
    "NotQueued",
    "AttemptsExhausted",
    "Cancelled",
    "PoolGone",
    "InterruptedWhileRunning",
    "RerunRequested",
];

/// Jobs per scenario: `CHAOS_JOBS` (`make chaos`), a few in `make test`.
pub fn job_count() -> i64 {
    std::env::var("CHAOS_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8)
}

/// Invariant counts: every one but `jobs`, `succeeded` and `max_alive` must be zero.
#[derive(Debug, Default)]
pub struct Counts {
    pub jobs: usize,
    pub succeeded: usize,
    pub explained: BTreeMap<String, usize>,
    pub unexplained: Vec<String>,
    pub busy_killed: usize,
    pub extra_instances: usize,
    pub left_alive: usize,
    pub left_runners: usize,
    pub max_alive: usize,
    pub over_max_runners: usize,
    /// How often the scenario's faults took effect: a scenario whose faults never fire proves
    /// nothing.
    pub fired: usize,
}

pub fn report(scenario: &str, c: &Counts, took: Duration) {
    let line = format!(
        "| {scenario} | {} | {} | {} | {:?} | {} | {} | {} | {} | {} | {} ({}) | {:.0} s |",
        c.jobs,
        c.fired,
        c.succeeded,
        c.explained,
        c.unexplained.len(),
        c.busy_killed,
        c.extra_instances,
        c.left_alive,
        c.left_runners,
        c.over_max_runners,
        c.max_alive,
        took.as_secs_f64()
    );
    eprintln!("{line}");
    if let Ok(path) = std::env::var("CHAOS_REPORT") {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(file, "{line}").unwrap();
    }
}

pub fn assert_invariants(c: &Counts) {
    assert!(
        c.unexplained.is_empty(),
        "jobs that ended without a reason: {:?}",
        c.unexplained
    );
    assert_eq!(c.busy_killed, 0, "runners cut off while running a job");
    assert_eq!(c.extra_instances, 0, "instances beyond one per attempt");
    assert_eq!(c.left_alive, 0, "instances left running");
    assert_eq!(c.left_runners, 0, "runners left on GitHub");
    assert_eq!(
        c.over_max_runners, 0,
        "samples with more than maxRunners alive"
    );
    assert!(c.succeeded > 0, "{c:?}");
    assert!(c.fired > 0, "the scenario's faults never fired: {c:?}");
}

/// Our instances in EC2 by RunnerJob uid (`""` for a batch's instance no job of `jobs` names):
/// how many were made, and the ids of the live ones. A listing that fails is asked again, and
/// never read as "nothing there".
pub async fn instances_by_job(
    ec2: &AwsEc2,
    controller_id: &str,
    jobs: &[RunnerJob],
) -> HashMap<String, (usize, Vec<String>)> {
    // A batch's instances carry no job's uid: the job whose status names one (as its
    // instance, or an earlier attempt's) is its job.
    let naming: Vec<(&str, &str)> = jobs
        .iter()
        .flat_map(|j| {
            let uid = j.metadata.uid.as_deref().unwrap_or_default();
            let status = j.status.as_ref();
            let current = status
                .and_then(|s| s.instance.as_ref())
                .map(|i| i.id.as_str());
            let earlier = status
                .into_iter()
                .flat_map(|s| s.previous_attempts.iter().map(|a| a.instance.as_str()));
            (current.into_iter().chain(earlier))
                .filter(|id| !id.is_empty())
                .map(move |id| (id, uid))
        })
        .collect();
    let mut named: HashMap<&str, &str> = HashMap::new();
    for (id, uid) in naming {
        let other = named.insert(id, uid).filter(|other| *other != uid);
        assert!(
            other.is_none(),
            "instance {id} is named by two jobs: {uid} and {other:?}"
        );
    }
    let mut by_uid: HashMap<String, (usize, Vec<String>)> = HashMap::new();
    let mut tries = 0;
    let all = loop {
        match ec2.describe_managed_instances(controller_id).await {
            Ok(all) => break all,
            Err(e) if tries < 5 => {
                tries += 1;
                eprintln!("listing our instances failed ({e}); again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("listing our instances failed: {e}"),
        }
    };
    for i in all {
        let uid = (i.tags.get("gha:runner_job_uid").cloned())
            .or_else(|| named.get(i.id.as_str()).map(|uid| uid.to_string()))
            .unwrap_or_default();
        let entry = by_uid.entry(uid).or_default();
        entry.0 += 1;
        if i.is_alive() {
            entry.1.push(i.id.clone());
        }
    }
    by_uid
}

/// How the jobs ended (succeeded, explained, unexplained), and instances beyond one per
/// recorded attempt.
pub fn count_endings(
    counts: &mut Counts,
    jobs: &[RunnerJob],
    instances: &HashMap<String, (usize, Vec<String>)>,
) {
    for job in jobs {
        let status = job.status.clone().unwrap_or_default();
        let reason = status
            .last_error
            .as_ref()
            .map(|e| e.reason.clone())
            .unwrap_or_default();
        match status.phase {
            JobPhase::Succeeded => counts.succeeded += 1,
            JobPhase::Failed if EXPLAINED.contains(&reason.as_str()) => {
                *counts.explained.entry(reason).or_default() += 1
            }
            phase => counts.unexplained.push(format!(
                "{}: {phase:?} {reason}",
                job.metadata.name.clone().unwrap_or_default()
            )),
        }
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let made = instances.get(&uid).map_or(0, |(all, _)| *all);
        if made > status.attempt() as usize {
            counts.extra_instances += made - status.attempt() as usize;
        }
    }
}
