//! The API server's floor under the burst: the writes that any design recording each job's
//! launch in the job's own status before the call must have stored, made with no controller
//! running. `count` RunnerJobs are created 64 at a time, as in the launch part, and as each
//! creation returns, its status is patched with a launch record taken from the launch part (a
//! real batch member's), through a client of Pacer's kind (at most 32 requests in flight) or one
//! without a limit.
//! Creation → record stored, per job, is what such a design spends before its call can go.

use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use kube::api::{Api, Patch, PatchParams, PostParams};
use pacer::api::RunnerJob;

use crate::support::Ground;

pub struct Floor {
    /// Creation returned → its record stored, sorted.
    pub latencies: Vec<Duration>,
    /// First creation sent → last record stored.
    pub all: Duration,
}

/// `limited`: the records go through a client of Pacer's kind (at most 32 requests in
/// flight); else through one without a limit.
pub async fn run(
    ground: &Ground,
    count: usize,
    record: &serde_json::Value,
    limited: bool,
) -> Floor {
    let config = ground.kube_config().await;
    let client = match limited {
        true => pacer::controller::kube_client(config.clone()).unwrap(),
        false => kube::Client::try_from(config.clone()).unwrap(),
    };
    let creator = kube::Client::try_from(config).unwrap();
    let ns = (ground.namespace(&client, &format!("bench-floor-{limited}"))).await;
    let jobs: Api<RunnerJob> = Api::namespaced(client, &ns);
    let creating: Api<RunnerJob> = Api::namespaced(creator, &ns);
    let patch = Patch::Merge(serde_json::json!({
        "status": {"phase": "Launching", "launch": record.clone()},
    }));
    let (created, mut stored) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let creations = tokio::spawn(async move {
        stream::iter(0..count)
            .for_each_concurrent(64, |i| {
                let (creating, created, ns) = (creating.clone(), created.clone(), ns.clone());
                async move {
                    let job = crate::job(&ns, i);
                    creating.create(&PostParams::default(), &job).await.unwrap();
                    created.send((format!("job-{i}"), Instant::now())).unwrap();
                }
            })
            .await;
    });
    let mut records = Vec::new();
    while let Some((name, at)) = stored.recv().await {
        let (jobs, patch) = (jobs.clone(), patch.clone());
        records.push(tokio::spawn(async move {
            let params = PatchParams::default();
            jobs.patch_status(&name, &params, &patch).await.unwrap();
            at.elapsed()
        }));
    }
    creations.await.unwrap();
    let mut latencies = Vec::with_capacity(count);
    for record in records {
        latencies.push(record.await.unwrap());
    }
    let all = started.elapsed();
    latencies.sort();
    Floor { latencies, all }
}
