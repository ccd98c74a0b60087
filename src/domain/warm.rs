//! A pool's warm instances: which to launch and terminate, and how many are in each state,
//! decided from EC2's listing. Pure: the clock is passed in.
//!
//! A warm instance's state is never written on it (tags do not change after launch): EC2's
//! state says where it is (pending or running: up and preparing; stopping; stopped: ready). Its
//! `prepared` report stops it where it is heard (`http::runner::prepared`). Instances a job
//! claims belong to the job: this module neither counts nor touches them.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::api::{WarmCounts, WarmFailures, WarmPool};
use crate::cloud::{Instance, tags};

/// One of the pool's instances carrying `gha:warm`, as EC2 lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmInstance {
    pub id: String,
    /// EC2's state name: `pending`, `running`, `stopping`, `stopped`, `shutting-down`, ...
    pub state: String,
    /// EC2's `LaunchTime`, seconds since the Unix epoch. EC2 moves it to the latest start, so
    /// for an instance that was started again it is that start, not the first launch.
    pub launched: Option<i64>,
    /// The `gha:warm` tag: the template version the instance was launched from.
    pub template: String,
}

impl WarmInstance {
    /// The instance as a warm one, when it carries `gha:warm`.
    pub fn from_instance(instance: &Instance) -> Option<Self> {
        Some(Self {
            id: instance.id.clone(),
            state: instance.state.clone(),
            launched: instance.launch_time,
            template: instance.tags.get(tags::WARM)?.clone(),
        })
    }
}

/// Everything the plan depends on.
#[derive(Clone, Debug)]
pub struct WarmFacts<'a> {
    /// The pool's `spec.warm`; `None` keeps no warm instance.
    pub spec: Option<&'a WarmPool>,
    /// The pool's launch template and the version in force (`status.launchTemplate`).
    pub template_id: &'a str,
    pub template_version: i64,
    /// The pool's instances carrying `gha:warm`.
    pub instances: &'a [WarmInstance],
    /// Instances a live RunnerJob names: the job's now, not the pool's.
    pub claimed: &'a BTreeSet<String>,
    /// Instances a RunnerJob took once and no live one names now: started for a job, they
    /// are never warm again.
    pub used: &'a BTreeSet<String>,
    /// Seconds an instance has from its launch to report `prepared`.
    pub prepare_timeout_secs: i64,
    /// Seconds since the Unix epoch.
    pub now: i64,
}

/// Why a warm instance is terminated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Retire {
    /// Launched from another template or version than the pool's current one.
    StaleTemplate,
    /// Older than `spec.warm.maxAgeMinutes`.
    TooOld,
    /// Up past the preparation timeout (it did not report `prepared` and stop in time).
    PreparationTimedOut,
    /// A job took it once and no live job names it now: whatever ran on it since, it is not
    /// clean any more.
    StartedWithoutJob,
    /// More than `spec.warm.size` (or the pool keeps none).
    Surplus,
}

impl Retire {
    /// The reason, in CamelCase, for Events and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Retire::StaleTemplate => "WarmInstanceStale",
            Retire::TooOld => "WarmInstanceTooOld",
            Retire::PreparationTimedOut => "WarmPreparationTimedOut",
            Retire::StartedWithoutJob => "WarmInstanceStartedWithoutJob",
            Retire::Surplus => "WarmInstanceSurplus",
        }
    }
}

/// What to do with a pool's warm instances in one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WarmPlan {
    /// New warm instances to launch from the current template version.
    pub launch: u32,
    /// Instances to terminate, each with why.
    pub terminate: Vec<(String, Retire)>,
    /// The pool's warm instances by state once the plan is carried out (launches aside: they
    /// are counted when EC2 lists them).
    pub counts: WarmCounts,
}

/// Where a warm instance is in its life, from EC2's state and its report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Up: preparing, or prepared and about to be stopped.
    Preparing,
    Stopping,
    /// Stopped: ready for a job.
    Ready,
}

/// Decides the pool's warm instances. The rules, in order, for each unclaimed instance EC2
/// still lists as alive: a job used it once, then a stale template version, then an age past
/// `maxAge`, then up past the preparation timeout, each terminate it; instances beyond `size`
/// are terminated, the least prepared (then the youngest) first, keeping the ready ones,
/// oldest last; launches make up the rest.
pub fn plan(facts: &WarmFacts<'_>) -> WarmPlan {
    let current = tags::warm_value(facts.template_id, facts.template_version);
    let max_age = facts.spec.map_or(0, |w| i64::from(w.max_age_minutes) * 60);
    let size = facts.spec.map_or(0, |w| w.size.max(0)) as usize;
    let mut plan = WarmPlan::default();
    let mut kept: Vec<(Stage, &WarmInstance)> = Vec::new();

    for instance in facts.instances {
        if facts.claimed.contains(&instance.id) {
            continue;
        }
        let up = matches!(instance.state.as_str(), "pending" | "running");
        let stage = match instance.state.as_str() {
            "stopped" => Stage::Ready,
            "stopping" => Stage::Stopping,
            _ if up => Stage::Preparing,
            // Shutting down or terminated: already on its way out.
            _ => continue,
        };
        let age = instance.launched.map(|t| facts.now - t);
        let retire = if facts.used.contains(&instance.id) {
            Some(Retire::StartedWithoutJob)
        } else if instance.template != current {
            Some(Retire::StaleTemplate)
        } else if age.is_some_and(|a| a > max_age) && facts.spec.is_some() {
            Some(Retire::TooOld)
        } else if up && age.is_some_and(|a| a > facts.prepare_timeout_secs) {
            Some(Retire::PreparationTimedOut)
        } else {
            None
        };
        match retire {
            Some(why) => plan.terminate.push((instance.id.clone(), why)),
            None => kept.push((stage, instance)),
        }
    }

    // The least prepared go first; among equals the youngest, except that of the ready ones
    // the oldest go first (they are the nearest to their maximum age).
    kept.sort_by_key(|(stage, i)| {
        let launched = i.launched.unwrap_or(i64::MAX);
        (
            *stage,
            if *stage == Stage::Ready {
                launched
            } else {
                -launched
            },
        )
    });
    let surplus = kept.len().saturating_sub(size);
    for (_, instance) in kept.drain(..surplus) {
        plan.terminate.push((instance.id.clone(), Retire::Surplus));
    }
    for (stage, _) in &kept {
        match stage {
            Stage::Preparing => plan.counts.preparing += 1,
            Stage::Stopping => plan.counts.stopping += 1,
            Stage::Ready => plan.counts.ready += 1,
        }
    }
    plan.launch = (size - kept.len()) as u32;
    plan
}

/// Whether a warm instance launched from `launched_from` (its `gha:warm` tag) may prepare for a
/// pool keeping `size` warm instances of launch template `current` (id and version): for that
/// version, yes; for a newer one the pool's status does not show yet, not yet (its pass writes
/// it next); otherwise never.
pub fn may_prepare(
    size: i32,
    current: Option<(&str, i64)>,
    launched_from: Option<&str>,
) -> Result<(), crate::domain::job::Refusal> {
    use crate::domain::job::Refusal;
    let from = launched_from.and_then(|v| v.rsplit_once(':'));
    let from = from.map(|(id, version)| (id, version.parse::<i64>().ok()));
    match (from, current) {
        (Some((id, Some(v))), Some((current_id, version))) if id == current_id && v > version => {
            Err(Refusal::NotYet(
                "does not show its new launch template version yet".into(),
            ))
        }
        (Some((id, Some(v))), Some(current)) if size > 0 && (id, v) == current => Ok(()),
        _ => Err(Refusal::Denied(format!(
            "keeps no warm instances of launch template {}",
            launched_from.unwrap_or_default()
        ))),
    }
}

/// The warm instance a job of the pool takes: a stopped one of the pool's current launch
/// template version (`current`, as `gha:warm` spells it) that no job has taken, the oldest
/// first (the nearest to its maximum age).
pub fn take<'a>(
    listed: &'a [Instance],
    current: &str,
    taken: impl Fn(&str) -> bool,
) -> Option<&'a Instance> {
    (listed.iter())
        .filter(|i| i.is_stopped() && i.tags.get(tags::WARM).map(String::as_str) == Some(current))
        .filter(|i| !taken(&i.id))
        .min_by_key(|i| (i.launch_time.unwrap_or(i64::MAX), i.id.clone()))
}

/// Whether a RunnerJob whose status is `status` holds warm instance `id` as the one it took: it
/// has not finished, `id` is its instance, and its launch records taking `id`.
pub fn holds(status: &crate::api::RunnerJobStatus, id: &str) -> bool {
    !status.phase.is_finished()
        && status.instance.as_ref().is_some_and(|i| i.id == id)
        && (status.launch.as_ref())
            .is_some_and(|l| l.warm.as_ref().is_some_and(|w| w.instance == id))
}

/// How far EC2's clock may be behind Pacer's when a taken warm instance starts.
pub const START_SKEW_SECONDS: i64 = 10;

/// Whether an identity document whose `pendingTime` is `pending` (seconds since the epoch) is
/// from a start no earlier than `since` (a warm instance's take, or the start a bootstrap began
/// with): EC2 writes the document again at every start, so the one a warm instance had while it
/// prepared, however kept, is older. How many seconds earlier it is, otherwise.
pub fn started_after(pending: i64, since: i64) -> Result<(), i64> {
    if pending + START_SKEW_SECONDS >= since {
        Ok(())
    } else {
        Err(since - pending)
    }
}

/// How a listing shows the warm instance a job took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakenListing {
    /// Stopped while the job launches, and this process did not start it: a crash or an error
    /// came between the take and the start, which is sent again (as if no instance were there).
    StartAgain,
    /// Stopped or stopping in a listing that may predate the start: set aside, as if not
    /// listed, until a listing taken this much later.
    SetAside(Duration),
    /// What the listing shows is the instance's state.
    Counts,
}

/// How the listing taken at `listed_at` shows the warm instance a job took, in `state`.
/// `launching` says the job is still launching, `started_here` whether this process sent the
/// start, `answered` when a start (or the launch before it) was answered at the latest.
/// DescribeInstances lags StartInstances as it lags launches: a stopped listing counts only
/// once it is `visibility` past the answer.
pub fn taken_listing(
    state: &str,
    launching: bool,
    started_here: bool,
    answered: Option<Timestamp>,
    listed_at: Timestamp,
    visibility: Duration,
) -> TakenListing {
    let stopped = state == "stopped";
    if launching && !started_here && stopped {
        return TakenListing::StartAgain;
    }
    let counts_at = answered.map(|at| at + visibility);
    match counts_at {
        Some(at) if (stopped || state == "stopping") && listed_at < at => {
            TakenListing::SetAside(at.duration_since(listed_at).unsigned_abs())
        }
        _ => TakenListing::Counts,
    }
}

/// The longest a pool waits between warm launches after failed preparations.
pub const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(30 * 60);

/// One warm instance's failed preparation.
#[derive(Clone, Copy, Debug)]
pub struct Failure<'a> {
    /// The instance's `gha:warm`: the launch template version it was launched from.
    pub template: &'a str,
    pub instance: &'a str,
    /// Its LaunchTime, seconds since the Unix epoch.
    pub launched: Option<i64>,
    pub message: &'a str,
}

/// The pool's failures once `failure` happened at `at`: one more in a row for the same
/// template version, the first for another. An instance launched before the last failure
/// failed with it (the pool launches what it misses at once: one incident, say a mirror that
/// is down, fails them together) and counts once; its failure is the last now. `None` when
/// this instance's failure is recorded already (a report sent again, or a timeout after it).
pub fn failed(
    previous: Option<&WarmFailures>,
    failure: Failure<'_>,
    at: Timestamp,
) -> Option<WarmFailures> {
    if previous.is_some_and(|p| p.instance == failure.instance) {
        return None;
    }
    let same = previous.filter(|p| p.template == failure.template);
    let together = same.is_some_and(|p| failure.launched.is_some_and(|l| l < p.at.0.as_second()));
    let before = same.map_or(0, |p| p.count);
    let count = if together {
        before
    } else {
        before.saturating_add(1)
    };
    let Failure {
        template,
        instance,
        message,
        ..
    } = failure;
    Some(WarmFailures {
        count: count.max(1),
        template: template.into(),
        instance: instance.into(),
        at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at),
        message: message.into(),
    })
}

/// When a pool keeping warm instances of `current` (as `gha:warm` spells it) may launch one
/// again after `failures`, as of `now`: `unit` after the first failure, twice as long after
/// each more, at most [`FAILURE_BACKOFF_MAX`] (from `now` at the latest: a time recorded ahead
/// of the clock holds no longer). `None` when nothing holds it back (no failure, or only of an
/// older template version, which a fix of the spec replaced).
pub fn launch_after(
    failures: Option<&WarmFailures>,
    current: &str,
    unit: Duration,
    now: Timestamp,
) -> Option<Timestamp> {
    let f = failures.filter(|f| f.template == current && f.count > 0)?;
    let doublings = u32::try_from(f.count - 1).unwrap_or(0).min(20);
    let wait = unit.saturating_mul(1 << doublings).min(FAILURE_BACKOFF_MAX);
    Some(f.at.0.min(now) + wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const HOUR: i64 = 3600;

    fn warm(id: &str, state: &str, age: i64) -> WarmInstance {
        WarmInstance {
            id: id.into(),
            state: state.into(),
            launched: Some(NOW - age),
            template: "lt-1:3".into(),
        }
    }

    struct Case {
        size: i32,
        instances: Vec<WarmInstance>,
        claimed: Vec<&'static str>,
        used: Vec<&'static str>,
    }

    fn run(case: Case) -> WarmPlan {
        let spec = WarmPool {
            size: case.size,
            max_age_minutes: 1440,
        };
        let claimed = case.claimed.iter().map(|s| s.to_string()).collect();
        let used = case.used.iter().map(|s| s.to_string()).collect();
        plan(&WarmFacts {
            spec: Some(&spec),
            template_id: "lt-1",
            template_version: 3,
            instances: &case.instances,
            claimed: &claimed,
            used: &used,
            prepare_timeout_secs: 600,
            now: NOW,
        })
    }

    #[test]
    fn an_instance_prepares_for_the_pools_current_template_only() {
        use crate::domain::job::Refusal;
        let current = Some(("lt-1", 3));
        assert_eq!(may_prepare(2, current, Some("lt-1:3")), Ok(()));
        assert!(matches!(
            may_prepare(2, current, Some("lt-1:4")),
            Err(Refusal::NotYet(_))
        ));
        for stale in [Some("lt-1:2"), Some("lt-2:3"), Some("lt-1:x"), None] {
            assert!(matches!(
                may_prepare(2, current, stale),
                Err(Refusal::Denied(_))
            ));
        }
        assert!(matches!(
            may_prepare(0, current, Some("lt-1:3")),
            Err(Refusal::Denied(_))
        ));
        assert!(matches!(
            may_prepare(2, None, Some("lt-1:3")),
            Err(Refusal::Denied(_))
        ));
    }

    fn counts(ready: i32, preparing: i32, stopping: i32) -> WarmCounts {
        WarmCounts {
            ready,
            preparing,
            stopping,
        }
    }

    fn terminated(plan: &WarmPlan) -> Vec<(&str, Retire)> {
        plan.terminate
            .iter()
            .map(|(i, r)| (i.as_str(), *r))
            .collect()
    }

    #[test]
    fn an_empty_pool_launches_its_size() {
        let plan = run(Case {
            size: 3,
            instances: vec![],
            claimed: vec![],
            used: vec![],
        });
        assert_eq!(plan.launch, 3);
        assert_eq!(plan.counts, counts(0, 0, 0));
        assert!(plan.terminate.is_empty());
    }

    #[test]
    fn instances_are_counted_by_state_and_only_the_missing_are_launched() {
        let plan = run(Case {
            size: 4,
            instances: vec![
                warm("i-ready", "stopped", HOUR),
                warm("i-prep", "pending", 10),
                warm("i-stopping", "stopping", HOUR),
            ],
            claimed: vec![],
            used: vec![],
        });
        assert_eq!(plan.counts, counts(1, 1, 1));
        assert_eq!(plan.launch, 1);
        assert!(plan.terminate.is_empty());
    }

    #[test]
    fn a_template_change_terminates_every_unclaimed_warm_instance_of_the_old_version() {
        let mut old = vec![
            warm("i-ready", "stopped", HOUR),
            warm("i-prep", "running", 60),
            warm("i-stopping", "stopping", HOUR),
        ];
        for i in &mut old {
            i.template = "lt-1:2".into();
        }
        old.push(warm("i-job", "running", HOUR));
        old[3].template = "lt-1:2".into();
        let plan = run(Case {
            size: 3,
            instances: old,
            claimed: vec!["i-job"],
            used: vec![],
        });
        assert_eq!(
            terminated(&plan),
            vec![
                ("i-ready", Retire::StaleTemplate),
                ("i-prep", Retire::StaleTemplate),
                ("i-stopping", Retire::StaleTemplate),
            ]
        );
        assert_eq!(plan.launch, 3);
        assert_eq!(plan.counts, counts(0, 0, 0));
    }

    #[test]
    fn another_template_id_is_stale_too() {
        let mut other = warm("i-a", "stopped", HOUR);
        other.template = "lt-9:3".into();
        let plan = run(Case {
            size: 1,
            instances: vec![other],
            claimed: vec![],
            used: vec![],
        });
        assert_eq!(terminated(&plan), vec![("i-a", Retire::StaleTemplate)]);
        assert_eq!(plan.launch, 1);
    }

    #[test]
    fn an_instance_a_job_claims_is_neither_counted_nor_touched() {
        let plan = run(Case {
            size: 1,
            instances: vec![
                // Started for a job: running, long past every timeout, once prepared.
                warm("i-job", "running", 2 * 24 * HOUR),
                warm("i-ready", "stopped", HOUR),
            ],
            claimed: vec!["i-job"],
            used: vec![],
        });
        assert!(plan.terminate.is_empty());
        assert_eq!(plan.counts, counts(1, 0, 0));
        assert_eq!(plan.launch, 0);
    }

    #[test]
    fn instances_older_than_max_age_are_replaced() {
        let plan = run(Case {
            size: 2,
            instances: vec![
                warm("i-old", "stopped", 25 * HOUR),
                warm("i-young", "stopped", 23 * HOUR),
            ],
            claimed: vec![],
            used: vec![],
        });
        assert_eq!(terminated(&plan), vec![("i-old", Retire::TooOld)]);
        assert_eq!(plan.counts, counts(1, 0, 0));
        assert_eq!(plan.launch, 1);
    }

    #[test]
    fn a_preparation_past_its_timeout_without_a_report_is_terminated() {
        let plan = run(Case {
            size: 3,
            instances: vec![
                warm("i-late", "running", 601),
                warm("i-in-time", "running", 599),
            ],
            claimed: vec![],
            used: vec![],
        });
        assert_eq!(
            terminated(&plan),
            vec![("i-late", Retire::PreparationTimedOut)]
        );
        assert_eq!(plan.counts, counts(0, 1, 0));
        assert_eq!(plan.launch, 2);
    }

    #[test]
    fn beyond_size_the_least_prepared_go_first_and_the_oldest_ready_before_younger() {
        let plan = run(Case {
            size: 2,
            instances: vec![
                warm("i-ready-old", "stopped", 5 * HOUR),
                warm("i-ready-young", "stopped", HOUR),
                warm("i-stopping", "stopping", HOUR),
                warm("i-prep-old", "running", 300),
                warm("i-prep-young", "pending", 10),
            ],
            claimed: vec![],
            used: vec![],
        });
        assert_eq!(
            terminated(&plan),
            vec![
                ("i-prep-young", Retire::Surplus),
                ("i-prep-old", Retire::Surplus),
                ("i-stopping", Retire::Surplus),
            ]
        );
        let plan = run(Case {
            size: 1,
            instances: vec![
                warm("i-ready-young", "stopped", HOUR),
                warm("i-ready-old", "stopped", 5 * HOUR),
            ],
            claimed: vec![],
            used: vec![],
        });
        assert_eq!(terminated(&plan), vec![("i-ready-old", Retire::Surplus)]);
        assert_eq!(plan.counts, counts(1, 0, 0));
    }

    #[test]
    fn size_zero_or_no_warm_spec_terminates_every_unclaimed_warm_instance() {
        let plan = run(Case {
            size: 0,
            instances: vec![warm("i-a", "stopped", HOUR), warm("i-job", "running", HOUR)],
            claimed: vec!["i-job"],
            used: vec![],
        });
        assert_eq!(terminated(&plan), vec![("i-a", Retire::Surplus)]);
        assert_eq!(plan.launch, 0);
        let instances = [warm("i-a", "stopped", 30 * 24 * HOUR)];
        let none = plan_without_spec(&instances);
        assert_eq!(terminated(&none), vec![("i-a", Retire::Surplus)]);
        assert_eq!(none.launch, 0);
    }

    fn plan_without_spec(instances: &[WarmInstance]) -> WarmPlan {
        plan(&WarmFacts {
            spec: None,
            template_id: "lt-1",
            template_version: 3,
            instances,
            claimed: &BTreeSet::new(),
            used: &BTreeSet::new(),
            prepare_timeout_secs: 600,
            now: NOW,
        })
    }

    #[test]
    fn instances_on_their_way_out_are_left_alone() {
        let plan = run(Case {
            size: 1,
            instances: vec![
                warm("i-gone", "terminated", HOUR),
                warm("i-going", "shutting-down", HOUR),
            ],
            claimed: vec![],
            used: vec![],
        });
        assert!(plan.terminate.is_empty());
        assert_eq!(plan.launch, 1);
    }

    #[test]
    fn only_instances_carrying_the_warm_tag_are_warm() {
        let mut instance = Instance {
            id: "i-1".into(),
            instance_type: "m7i.large".into(),
            zone: "us-east-1a".into(),
            spot: false,
            state: "stopped".into(),
            state_reason: None,
            launch_time: Some(NOW),
            tags: std::collections::BTreeMap::new(),
        };
        assert_eq!(WarmInstance::from_instance(&instance), None);
        instance
            .tags
            .insert(tags::WARM.into(), tags::warm_value("lt-1", 3));
        let warm = WarmInstance::from_instance(&instance).unwrap();
        assert_eq!(warm.template, "lt-1:3");
        assert_eq!(warm.launched, Some(NOW));
    }

    fn listed(id: &str, state: &str, template: &str, launched: i64) -> Instance {
        let tags =
            std::collections::BTreeMap::from([(tags::WARM.to_string(), template.to_string())]);
        Instance {
            id: id.into(),
            instance_type: "m7i.large".into(),
            zone: "us-east-1a".into(),
            spot: false,
            state: state.into(),
            state_reason: None,
            launch_time: Some(launched),
            tags,
        }
    }

    #[test]
    fn a_job_takes_the_oldest_stopped_instance_of_the_current_version_nobody_took() {
        let listed = [
            listed("i-young", "stopped", "lt-1:3", NOW - HOUR),
            listed("i-old", "stopped", "lt-1:3", NOW - 5 * HOUR),
            listed("i-older-stale", "stopped", "lt-1:2", NOW - 9 * HOUR),
            listed("i-oldest-running", "running", "lt-1:3", NOW - 10 * HOUR),
            listed("i-stopping", "stopping", "lt-1:3", NOW - 10 * HOUR),
        ];
        let id = |i: Option<&Instance>| i.map(|i| i.id.clone());
        assert_eq!(id(take(&listed, "lt-1:3", |_| false)), Some("i-old".into()));
        let taken = |id: &str| id == "i-old";
        assert_eq!(id(take(&listed, "lt-1:3", taken)), Some("i-young".into()));
        let all = |_: &str| true;
        assert_eq!(id(take(&listed, "lt-1:3", all)), None);
        assert_eq!(id(take(&listed, "lt-1:4", |_| false)), None);
    }

    #[test]
    fn a_used_instance_is_never_warm_again_whatever_its_state() {
        let plan = run(Case {
            size: 3,
            instances: vec![
                warm("i-used-stopped", "stopped", HOUR),
                warm("i-used-running", "running", HOUR),
                warm("i-taken", "running", HOUR),
                warm("i-ready", "stopped", HOUR),
            ],
            claimed: vec!["i-taken"],
            used: vec!["i-used-stopped", "i-used-running", "i-taken"],
        });
        assert_eq!(
            terminated(&plan),
            vec![
                ("i-used-stopped", Retire::StartedWithoutJob),
                ("i-used-running", Retire::StartedWithoutJob),
            ],
            "a job's claim wins over an earlier use"
        );
        assert_eq!(plan.counts, counts(1, 0, 0));
        assert_eq!(plan.launch, 2);
    }

    #[test]
    fn a_taken_instance_bootstraps_only_with_a_document_of_a_later_start() {
        let taken = NOW;
        assert_eq!(started_after(NOW + 40, taken), Ok(()));
        assert_eq!(started_after(NOW - START_SKEW_SECONDS, taken), Ok(()));
        let prepared_at = NOW - 300;
        assert_eq!(started_after(prepared_at, taken), Err(300));
    }

    #[test]
    fn a_job_holds_a_warm_instance_only_while_live_naming_it_and_recording_its_take() {
        use crate::api::{InstanceStatus, JobPhase, LaunchIntent, RunnerJobStatus, WarmStart};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let status = |phase, instance: &str, took: Option<&str>| RunnerJobStatus {
            phase,
            instance: Some(InstanceStatus {
                id: instance.into(),
                instance_type: "m7i.large".into(),
                zone: "us-east-1a".into(),
                market: "onDemand".into(),
                launch_time: None,
            }),
            launch: Some(Box::new(LaunchIntent {
                warm: took.map(|id| WarmStart {
                    instance: id.into(),
                    taken_at: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                }),
                ..LaunchIntent::for_test("warm-i-1")
            })),
            ..Default::default()
        };
        assert!(holds(&status(JobPhase::Booting, "i-1", Some("i-1")), "i-1"));
        assert!(!holds(
            &status(JobPhase::Booting, "i-1", Some("i-1")),
            "i-2"
        ));
        assert!(!holds(
            &status(JobPhase::Succeeded, "i-1", Some("i-1")),
            "i-1"
        ));
        assert!(
            !holds(&status(JobPhase::Booting, "i-1", None), "i-1"),
            "launched, not taken"
        );
        assert!(
            !holds(&status(JobPhase::Booting, "i-2", Some("i-1")), "i-1"),
            "named, not its"
        );
    }

    #[test]
    fn a_stopped_listing_of_a_taken_instance_counts_a_visibility_window_after_its_start() {
        let start = Timestamp::from_second(NOW).unwrap();
        let window = Duration::from_secs(60);
        let at = |secs: i64| Timestamp::from_second(NOW + secs).unwrap();
        let how = |state, launching, here, listed| {
            taken_listing(state, launching, here, Some(start), at(listed), window)
        };
        // Taken and not started by this process (a crash between take and start): sent again.
        assert_eq!(how("stopped", true, false, 5), TakenListing::StartAgain);
        assert_eq!(how("stopped", true, false, 300), TakenListing::StartAgain);
        // Started here: a stopped listing may be from before the start, until the window ends;
        // the time left is what the job's pass waits at most.
        assert_eq!(
            how("stopped", true, true, 5),
            TakenListing::SetAside(Duration::from_secs(55))
        );
        assert_eq!(
            how("stopping", false, true, 59),
            TakenListing::SetAside(Duration::from_secs(1))
        );
        assert_eq!(how("stopped", false, true, 60), TakenListing::Counts);
        assert_eq!(how("stopped", false, false, 61), TakenListing::Counts);
        // Running or pending always counts, as does any state with no start answered.
        assert_eq!(how("running", false, true, 1), TakenListing::Counts);
        assert_eq!(how("pending", true, true, 0), TakenListing::Counts);
        assert_eq!(
            taken_listing("stopped", false, false, None, at(0), window),
            TakenListing::Counts
        );
    }

    #[test]
    fn failed_preparations_count_in_a_row_per_template_version_once_each() {
        let at = |secs: i64| Timestamp::from_second(NOW + secs).unwrap();
        let failure = |template, instance, launched: i64, message| Failure {
            template,
            instance,
            launched: Some(NOW + launched),
            message,
        };
        let first = failed(None, failure("lt-1:3", "i-1", -60, "exit 3"), at(0)).unwrap();
        assert_eq!((first.count, first.instance.as_str()), (1, "i-1"));
        let second = failed(Some(&first), failure("lt-1:3", "i-2", 1, "exit 4"), at(5)).unwrap();
        assert_eq!((second.count, second.message.as_str()), (2, "exit 4"));
        // The same instance again (a report retried, a timeout after its report): no change.
        let again = failure("lt-1:3", "i-2", 1, "again");
        assert_eq!(failed(Some(&second), again, at(9)), None);
        // Launched before the last failure: it failed with it, and counts once.
        let along = failed(Some(&second), failure("lt-1:3", "i-9", 2, "exit 5"), at(9)).unwrap();
        assert_eq!((along.count, along.instance.as_str()), (2, "i-9"));
        // A new template version starts afresh.
        let fresh = failed(Some(&second), failure("lt-1:4", "i-3", 8, "exit 3"), at(9)).unwrap();
        assert_eq!((fresh.count, fresh.template.as_str()), (1, "lt-1:4"));
    }

    #[test]
    fn warm_launches_wait_longer_after_each_failure_up_to_a_bound() {
        let unit = Duration::from_secs(5);
        let last = Timestamp::from_second(NOW).unwrap();
        let failures = |count| WarmFailures {
            count,
            template: "lt-1:3".into(),
            instance: "i-1".into(),
            at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(last),
            message: String::new(),
        };
        let now = last + Duration::from_secs(1);
        let wait = |count| {
            let after = launch_after(Some(&failures(count)), "lt-1:3", unit, now).unwrap();
            after.duration_since(last).as_secs()
        };
        assert_eq!([wait(1), wait(2), wait(3), wait(4)], [5, 10, 20, 40]);
        assert_eq!(wait(10), 1800);
        assert_eq!(wait(i32::MAX), 1800);
        assert_eq!(launch_after(None, "lt-1:3", unit, now), None);
        // Failures of an older version hold nothing back: the spec was changed since.
        assert_eq!(launch_after(Some(&failures(7)), "lt-1:4", unit, now), None);
        // A failure recorded ahead of the clock holds from now at the latest.
        let early = now - Duration::from_secs(100);
        let after = launch_after(Some(&failures(1)), "lt-1:3", unit, early).unwrap();
        assert_eq!(after, early + unit);
    }
}
