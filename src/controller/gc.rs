//! The garbage collector: EC2 first, then the cluster; terminates our instances that no live
//! RunnerJob claims and deletes our launch templates whose RunnerPool is gone, once they are
//! past a grace period.

use std::collections::HashSet;
use std::sync::Arc;

use futures::TryStreamExt as _;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, ListParams, ObjectMeta};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::{Context, Result};
use crate::api::{RunnerJob, RunnerPool};
use crate::cloud::tags::{CONTROLLER, MANAGED_BY, POOL, WARM};
use crate::cloud::{ErrorClass, Instance};
use crate::domain::gc::{BatchClaims, Owner, may_be_orphan, orphan_templates, orphans};
use crate::domain::launch::{BATCH, RUNNER_JOB_UID};

/// The part of the cluster the collector compares EC2 with.
#[derive(Clone)]
pub struct Scope {
    pub pools: Api<RunnerPool>,
    pub jobs: Api<RunnerJob>,
    /// The one namespace this controller serves, or `None` for all.
    pub namespace: Option<String>,
}

/// What one round removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub instances: usize,
    pub templates: usize,
}

/// Runs a collection every `gc_interval` until the task is dropped.
pub async fn run(ctx: Arc<Context>, scope: Scope) {
    let mut tick = tokio::time::interval(ctx.settings.gc_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match collect(&ctx, &scope).await {
            Ok(c) if c == Collected::default() => {}
            Ok(c) => info!(
                instances = c.instances,
                launch_templates = c.templates,
                "garbage collector removed unclaimed resources"
            ),
            Err(e) => warn!(error = %e, "garbage collection failed; trying again next round"),
        }
    }
}

/// One round.
pub async fn collect(ctx: &Context, scope: &Scope) -> Result<Collected> {
    Ok(Collected {
        instances: collect_instances(ctx, scope).await?,
        templates: collect_templates(ctx, scope).await?,
    })
}

fn owner<'a>(ctx: &'a Context, scope: &'a Scope) -> Owner<'a> {
    Owner {
        controller_id: &ctx.settings.controller_id,
        namespace: scope.namespace.as_deref(),
    }
}

async fn collect_instances(ctx: &Context, scope: &Scope) -> Result<usize> {
    // EC2 first: an instance launched after this listing cannot be mistaken for an orphan by
    // a RunnerJob listing taken before its launch. There may be thousands of instances: only
    // the candidates are kept, page by page, with the tags the rule reads.
    let (owner, now, grace) = (
        owner(ctx, scope),
        Timestamp::now().as_second(),
        ctx.settings.gc_grace,
    );
    let instances: Vec<Instance> = ctx
        .ec2()
        .managed_instance_pages(owner.controller_id)
        .try_fold(Vec::new(), |mut kept, page| {
            let candidates = page
                .into_iter()
                .filter(|i| may_be_orphan(i, owner, now, grace));
            kept.extend(candidates.map(|mut i| {
                i.tags.retain(|k, _| {
                    [MANAGED_BY, CONTROLLER, POOL, RUNNER_JOB_UID, BATCH, WARM]
                        .contains(&k.as_str())
                });
                i
            }));
            std::future::ready(Ok(kept))
        })
        .await?;
    // A finished job claims no instance (its own pass terminates one it still holds; this
    // backs that up). Finished is final, so the watch cache is trusted for it.
    let cached = ctx
        .jobs
        .store()
        .map(|store| store.state())
        .unwrap_or_default();
    let finished: HashSet<String> = (cached.iter())
        .filter(|j| j.status.as_ref().is_some_and(|s| s.phase.is_finished()))
        .filter_map(|j| j.metadata.uid.clone())
        .collect();
    // A batch's instances are claimed through their jobs' statuses: a member records the
    // batch before the call and its instance after the answer, and the instances are older
    // than the grace period, so the watch cache has long seen both.
    let batches = (ctx.jobs.store().is_some())
        .then(|| BatchClaims::of(cached.iter().filter_map(|j| j.status.as_ref())));
    drop(cached);
    let live = list_metadata(&scope.jobs, |job| {
        job.uid.filter(|uid| !finished.contains(uid))
    })
    .await?;
    // Warm instances are their pools' while the pools exist: the pools are listed only when
    // there is one to judge.
    let pools = match instances.iter().any(|i| i.tags.contains_key(WARM)) {
        true => Some(live_pools(scope).await?),
        false => None,
    };
    let doomed: Vec<String> = orphans(
        &instances,
        owner,
        &live,
        batches.as_ref(),
        pools.as_ref(),
        now,
        grace,
    )
    .into_iter()
    .map(|i| i.id.clone())
    .collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    // An instance that cannot be terminated (protected by an operator, say) is named and tried
    // again next round; it keeps neither the others nor the templates from being collected.
    let mut terminated = 0;
    for (id, result) in crate::cloud::terminate_each(ctx.ec2(), &doomed).await {
        match result {
            Ok(()) => {
                terminated += 1;
                info!(instance = %id, "terminated an instance no RunnerJob claims");
            }
            Err(e) => {
                warn!(instance = %id, error = %e, "could not terminate an instance no RunnerJob claims; next round");
            }
        }
    }
    ctx.metrics.gc_terminated.inc_by(terminated as u64);
    Ok(terminated)
}

async fn collect_templates(ctx: &Context, scope: &Scope) -> Result<usize> {
    // EC2 first again: a pool created after this listing has no template in it yet.
    let templates = ctx
        .ec2()
        .describe_managed_launch_templates(&ctx.settings.controller_id)
        .await?;
    if templates.is_empty() {
        return Ok(0);
    }
    let live = live_pools(scope).await?;
    let doomed = orphan_templates(
        &templates,
        owner(ctx, scope),
        &live,
        Timestamp::now().as_second(),
        ctx.settings.gc_grace,
    );
    let mut deleted = 0;
    for template in doomed {
        match ctx.ec2().delete_launch_template(&template.id).await {
            Ok(()) => {}
            // Deleted meanwhile, by its pool's finalizer or by hand: that is the goal anyway.
            Err(e) if e.is(ErrorClass::NotFound) => continue,
            Err(e) => return Err(e.into()),
        }
        deleted += 1;
        ctx.metrics.gc_templates_deleted.inc();
        info!(launch_template = %template.name, id = %template.id,
            "deleted a launch template whose RunnerPool is gone");
    }
    Ok(deleted)
}

/// Every RunnerPool in scope, as `namespace/name` (the `gha:pool` tag's value).
async fn live_pools(scope: &Scope) -> Result<HashSet<String>> {
    list_metadata(&scope.pools, |pool| {
        Some(format!(
            "{}/{}",
            pool.namespace.as_deref().unwrap_or_default(),
            pool.name.as_deref().unwrap_or_default()
        ))
    })
    .await
}

/// What `keep` takes from the metadata of every object, read from the API server rather than a
/// cache that may lag: a page at a time, metadata only, and each page reduced to what `keep`
/// returns before the next is read. Metadata is mostly managed fields, kilobytes of each object
/// as parsed: holding all of it for 10,000 RunnerJobs took about 130 MB, every round.
async fn list_metadata<K>(
    api: &Api<K>,
    keep: impl Fn(ObjectMeta) -> Option<String>,
) -> Result<HashSet<String>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut all = HashSet::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list_metadata(&params).await?;
        all.extend(page.items.into_iter().filter_map(|o| keep(o.metadata)));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(all),
        }
    }
}
