//! The garbage collector: EC2 first, then the cluster; terminates our instances that no live
//! RunnerJob claims once they are past a grace period.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tracing::{info, warn};

use super::{Context, Result};
use crate::api::RunnerJob;
use crate::cloud::Ec2 as _;
use crate::domain::gc::orphans;

/// Runs a collection every `gc_interval` until the task is dropped.
pub async fn run(ctx: Arc<Context>, jobs: Api<RunnerJob>) {
    let mut tick = tokio::time::interval(ctx.settings.gc_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match collect(&ctx, &jobs).await {
            Ok(0) => {}
            Ok(n) => info!(
                terminated = n,
                "garbage collector terminated unclaimed instances"
            ),
            Err(e) => warn!(error = %e, "garbage collection failed; trying again next round"),
        }
    }
}

/// One round; returns how many instances it terminated.
pub async fn collect(ctx: &Context, jobs: &Api<RunnerJob>) -> Result<usize> {
    // EC2 first: an instance launched after this listing cannot be mistaken for an orphan by
    // a RunnerJob listing taken before its launch.
    let instances = ctx
        .ec2()
        .describe_managed_instances(&ctx.settings.controller_id)
        .await?;
    let live: HashSet<String> = jobs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|j| j.uid())
        .collect();
    let doomed: Vec<String> = orphans(
        &instances,
        &ctx.settings.controller_id,
        &live,
        Timestamp::now().as_second(),
        ctx.settings.gc_grace,
    )
    .into_iter()
    .map(|i| i.id.clone())
    .collect();
    if !doomed.is_empty() {
        ctx.ec2().terminate_instances(&doomed).await?;
        ctx.metrics.gc_terminated.inc_by(doomed.len() as u64);
        for id in &doomed {
            info!(instance = %id, "terminated an instance no RunnerJob claims");
        }
    }
    Ok(doomed.len())
}
