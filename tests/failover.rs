//! Two `pacer run` processes against the real API server and moto: only the leader reconciles;
//! when it is killed mid-burst the other takes over within the lease, and when it is told to stop
//! (SIGTERM) it finishes its launches and hands the lease over at once; either way every job
//! launches exactly once.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, PostParams};
use pacer::api::{RunnerJob, RunnerJobSpec, RunnerPool};
use pacer::cloud::aws::AwsEc2;
use support::process::{self, Pacer};
use support::{Ground, Parts, ground, invariants};

/// Starts `pacer run` as replica `name` of controller `id`, watching `ns`.
fn start(ground: &Ground, dir: &Path, name: &str, id: &str, ns: &str) -> Pacer {
    process::start(
        ground,
        dir,
        process::Setup {
            name,
            controller_id: id,
            namespace: ns,
            kubeconfig: None,
            github: None,
            public_url: None,
        },
    )
}

/// The AWS calls a replica made, from its metrics; `None` while it does not answer.
async fn ec2_calls(replica: &Pacer) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", replica.metrics))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("pacer_ec2_calls_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> Duration {
    let started = tokio::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

/// Two replicas of controller `id` watching a fresh namespace, a Ready pool, and which of them
/// leads (only its AWS calls move).
struct Pair {
    replicas: Vec<Pacer>,
    leader: usize,
    follower: usize,
    jobs: Api<RunnerJob>,
    ns: String,
}

async fn pair(ground: &'static Ground, id: &str) -> Pair {
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, id).await;
    let dir = support::scratch(&format!("failover-{ns}"));

    let mut replicas = vec![start(ground, &dir, "replica-a", id, &ns)];
    tokio::time::sleep(Duration::from_secs(3)).await;
    replicas.push(start(ground, &dir, "replica-b", id, &ns));

    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let mut pool = ground.example_pool(&ns, "linux");
    pool["spec"]["maxRunners"] = serde_json::json!(200);
    let pool: RunnerPool = serde_json::from_value(pool).unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    wait_for("the pool is Ready", Duration::from_secs(60), || async {
        pools.get("linux").await.unwrap().status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await;

    // Only the leader reconciles: only its AWS calls move.
    let (a, b) = (
        ec2_calls(&replicas[0]).await.unwrap_or(0.0),
        ec2_calls(&replicas[1]).await.unwrap_or(0.0),
    );
    assert!(
        (a > 0.0) != (b > 0.0),
        "exactly one replica reconciles: {a} and {b} AWS calls"
    );
    let (leader, follower) = if a > 0.0 { (0, 1) } else { (1, 0) };
    Pair {
        replicas,
        leader,
        follower,
        jobs: Api::namespaced(client, &ns),
        ns,
    }
}

impl Pair {
    /// Records `count` queued jobs and waits until the leader has launched some of them.
    async fn burst(&self, count: i64) {
        for i in 0..count {
            let spec = RunnerJobSpec {
                pool_name: "linux".into(),
                job_id: 70_000 + i,
                run_id: 7,
                repository: "example-org/api".into(),
                labels: vec!["self-hosted".into()],
                installation_id: Some(1),
            };
            let job = RunnerJob::for_queued_job(&self.ns, &format!("burst-{i}"), spec);
            self.jobs
                .create(&PostParams::default(), &job)
                .await
                .unwrap();
        }
        wait_for("the burst starts", Duration::from_secs(60), || async {
            self.launched().await >= 10
        })
        .await;
        assert_eq!(
            ec2_calls(&self.replicas[self.follower])
                .await
                .unwrap_or(0.0),
            0.0,
            "the follower made no AWS call while the leader led"
        );
    }

    async fn launched(&self) -> usize {
        self.jobs
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|j| j.status.as_ref().is_some_and(|s| s.instance.is_some()))
            .count()
    }

    /// Every job of the burst launched, each exactly once (instances per job: by its uid tag,
    /// or, for a batch's instance, by the status that names it), and no instance nobody's.
    async fn each_launched_once(&self, ground: &Ground, id: &str, count: usize) {
        wait_for("every job launched", Duration::from_secs(120), || async {
            self.launched().await == count
        })
        .await;
        let ec2 = AwsEc2::new(&ground.aws_config().await);
        let jobs = self.jobs.list(&Default::default()).await.unwrap().items;
        let per_job = invariants::instances_by_job(&ec2, id, &jobs).await;
        let per_job: HashMap<String, usize> = per_job
            .into_iter()
            .map(|(uid, (made, _))| (uid, made))
            .collect();
        assert_eq!(per_job.get(""), None, "instances no job names");
        assert_eq!(per_job.len(), count, "one instance per job");
        let twice: Vec<_> = per_job.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "launched twice: {twice:?}");
    }

    fn log(&self, replica: usize) -> String {
        self.replicas[replica].log_text()
    }
}

#[tokio::test]
async fn the_leader_killed_mid_burst_is_replaced_within_the_lease_and_no_job_launches_twice() {
    let ground = ground(Parts::Both);
    let id = "failover";
    let mut pair = pair(ground, id).await;
    pair.burst(100).await;

    // SIGKILL: the lease is not given back; the other replica takes it once it expires.
    let (leader, follower) = (pair.leader, pair.follower);
    pair.replicas[leader].child.kill().unwrap();
    let takeover = wait_for(
        "the other replica takes over",
        Duration::from_secs(25),
        || async {
            ec2_calls(&pair.replicas[follower])
                .await
                .is_some_and(|calls| calls > 0.0)
        },
    )
    .await;
    eprintln!("takeover after {takeover:?}");
    pair.each_launched_once(ground, id, 100).await;
}

#[tokio::test]
async fn sigterm_mid_burst_hands_the_lease_over_at_once_and_loses_nothing() {
    let ground = ground(Parts::Both);
    let id = "handover";
    let mut pair = pair(ground, id).await;
    pair.burst(100).await;

    let (leader, follower) = (pair.leader, pair.follower);
    let pid = pair.replicas[leader].child.id().to_string();
    let sent = tokio::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // At once it reports not ready, so the Service stops routing to it, and its listener
    // goes on answering while the endpoints catch up: no webhook is refused meanwhile.
    let url = pair.replicas[leader].url();
    let http = reqwest::Client::new();
    let readyz = || async {
        let answer = http.get(format!("{url}/readyz")).send().await;
        answer.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    wait_for(
        "not ready after SIGTERM",
        Duration::from_secs(1),
        || async { readyz().await == 503 },
    )
    .await;
    for _ in 0..10 {
        let health = http.get(format!("{url}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "the listener stopped while draining");
        assert_eq!(readyz().await, 503);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // It finishes its in-flight launches, releases the Lease and exits, well within a pod's
    // default 30 s grace period.
    let exited = wait_for("the leader exits", Duration::from_secs(30), || {
        let done = pair.replicas[leader].child.try_wait().unwrap().is_some();
        async move { done }
    })
    .await;
    let status = pair.replicas[leader].child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        pair.log(leader).contains("released the lease"),
        "{}",
        pair.log(leader)
    );
    // The successor starts within 2 s of the handover, not after the lease would have expired.
    let successor = wait_for("the successor starts", Duration::from_secs(2), || {
        let started = pair.log(follower).contains("leading: controllers start");
        async move { started }
    })
    .await;
    eprintln!("leader exited {exited:?} after SIGTERM; successor started {successor:?} later");
    assert!(sent.elapsed() < Duration::from_secs(30));
    pair.each_launched_once(ground, id, 100).await;
}
