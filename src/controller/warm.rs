//! A pool's warm instances, kept by the pool's passes: launched from the pool's launch template
//! ahead of any job, tagged `gha:warm` with the template version, prepared by the boot script
//! (which reports `prepared`, and is stopped by whichever replica hears it), and retired when
//! stale, too old, surplus, or started without a job. The instances are the state: EC2's
//! listing is read every pass, nothing is kept between passes but the shared snapshot.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::{Context, Result};
use crate::api::{LaunchTemplateRef, RunnerPool, WarmCounts};
use crate::cloud::tags;
use crate::domain::pool::PoolIdentity;
use crate::domain::warm::{WarmFacts, WarmInstance, plan};

/// How long one warm launch token is used for the same listing.
const TOKEN_BUCKET_SECONDS: i64 = 600;

/// What one pass did to a pool's warm instances.
pub(super) struct Kept {
    pub counts: WarmCounts,
    pub events: Vec<(EventType, &'static str, String)>,
    /// Instances are on their way to ready or out: look again soon.
    pub moving: bool,
}

/// Brings the pool's warm instances to what [`plan`] says, for its current launch template.
/// `None` while this process does not run the job controller, whose cache says which warm
/// instances jobs have taken.
pub(super) async fn keep(
    pool: &RunnerPool,
    ctx: &Context,
    template: &LaunchTemplateRef,
) -> Result<Option<Kept>> {
    let Some(store) = ctx.jobs.store() else {
        return Ok(None);
    };
    let namespace = pool.namespace().unwrap_or_default();
    let key = format!("{namespace}/{}", pool.name_any());
    let snapshot = super::job::instances(ctx, ctx.settings.instance_refresh).await?;
    let listed = snapshot
        .warm
        .get(&key)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let instances: Vec<WarmInstance> = listed
        .iter()
        .filter_map(WarmInstance::from_instance)
        .collect();
    if pool.spec.warm_size() == 0 && instances.is_empty() {
        return Ok(Some(Kept {
            counts: WarmCounts::default(),
            events: Vec::new(),
            moving: false,
        }));
    }
    // A warm instance a live job of the pool names is the job's.
    let ids: HashSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    let name = pool.name_any();
    let claimed: BTreeSet<String> = (store.state().iter())
        .filter(|j| j.metadata.namespace.as_deref() == Some(&namespace) && j.spec.pool_name == name)
        .filter_map(|j| j.status.as_ref())
        .filter(|s| !s.phase.is_finished())
        .filter_map(|s| s.instance.as_ref().map(|i| i.id.as_str()))
        .filter(|id| ids.contains(id))
        .map(String::from)
        .collect();
    let boot_timeout = (ctx.settings.job_limits.for_pool(&pool.spec)).boot_timeout;
    let decided = plan(&WarmFacts {
        spec: pool.spec.warm.as_ref(),
        template_id: &template.id,
        template_version: template.version,
        instances: &instances,
        claimed: &claimed,
        // Prepared instances are stopped as they report it (see `http::runner::prepared`).
        prepared: &BTreeMap::new(),
        prepare_timeout_secs: boot_timeout.as_secs() as i64,
        now: Timestamp::now().as_second(),
    });
    let mut events = Vec::new();
    if !decided.terminate.is_empty() {
        let ids: Vec<String> = decided.terminate.iter().map(|(id, _)| id.clone()).collect();
        ctx.ec2().terminate_instances(&ids).await?;
        for (id, why) in &decided.terminate {
            info!(pool = %key, instance = %id, reason = why.reason(), "retired a warm instance");
            let note = format!("warm instance {id} terminated: {}", why.reason());
            events.push((EventType::Normal, why.reason(), note));
        }
    }
    if !decided.stop.is_empty() {
        ctx.ec2().stop_instances(&decided.stop).await?;
    }
    if decided.launch > 0 {
        events.push(launch(pool, ctx, template, &key, &instances, decided.launch).await?);
    }
    let counts = decided.counts;
    let moving = decided.launch > 0 || counts.preparing > 0 || counts.stopping > 0;
    Ok(Some(Kept {
        counts,
        events,
        moving,
    }))
}

/// Launches `count` warm instances of the pool, under a token of the pool, the template, the
/// warm instances listed (terminated ones too, while EC2 lists them) and the ten minutes it is
/// in: a pass that comes again before EC2's listing shows them sends the same launch, and EC2
/// answers with the same instances; a listing that is empty again later is another launch.
async fn launch(
    pool: &RunnerPool,
    ctx: &Context,
    template: &LaunchTemplateRef,
    key: &str,
    listed: &[WarmInstance],
    count: u32,
) -> Result<(EventType, &'static str, String)> {
    let namespace = pool.namespace().unwrap_or_default();
    let identity = PoolIdentity {
        controller_id: &ctx.settings.controller_id,
        namespace: &namespace,
        name: &pool.name_any(),
    };
    let mut tags = identity.instance_tags(&pool.spec);
    tags.insert(
        tags::WARM.into(),
        tags::warm_value(&template.id, template.version),
    );
    let Some(mut request) = super::job::offer(ctx, pool, template, tags).await? else {
        let why = "no offering of the pool has capacity now".to_string();
        return Ok((EventType::Warning, "WarmLaunchFailed", why));
    };
    request.count = count;
    let mut seen: Vec<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    seen.sort_unstable();
    let uid = pool.metadata.uid.as_deref().unwrap_or_default();
    let bucket = Timestamp::now().as_second() / TOKEN_BUCKET_SECONDS;
    let params = format!("{}/{}/{bucket}", request.parameters(), seen.join(","));
    request.client_token = Some(crate::domain::launch::client_token(
        &format!("warm/{uid}"),
        0,
        0,
        &params,
    ));
    match ctx.ec2().launch(&request).await {
        Ok(outcome) if !outcome.instances.is_empty() => {
            let ids: Vec<&str> = outcome.instances.iter().map(|i| i.id.as_str()).collect();
            info!(pool = %key, instances = ?ids, "launched warm instances");
            let note = format!("launched warm instances {}", ids.join(", "));
            Ok((EventType::Normal, "WarmLaunched", note))
        }
        Ok(outcome) => {
            let why = (outcome.failures.first()).map_or("EC2 launched nothing".to_string(), |f| {
                format!("EC2 launched nothing: {}", f.error)
            });
            warn!(pool = %key, why, "no warm instance launched");
            Ok((EventType::Warning, "WarmLaunchFailed", why))
        }
        Err(e) => {
            warn!(pool = %key, error = %e, "no warm instance launched");
            Ok((EventType::Warning, "WarmLaunchFailed", e.to_string()))
        }
    }
}

/// Terminates every warm instance of a pool being deleted (its jobs that held a slot have
/// finished: none is taken). Listed afresh: what an older snapshot missed would be left to the
/// garbage collector.
pub(super) async fn retire_all(pool: &RunnerPool, ctx: &Context) -> Result<()> {
    let key = format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    );
    let snapshot = super::job::instances(ctx, std::time::Duration::ZERO).await?;
    let ids: Vec<String> = (snapshot.warm.get(&key).into_iter().flatten())
        .filter(|i| !matches!(i.state.as_str(), "shutting-down" | "terminated"))
        .map(|i| i.id.clone())
        .collect();
    if !ids.is_empty() {
        ctx.ec2().terminate_instances(&ids).await?;
        info!(pool = %key, instances = ?ids, "terminated the warm instances of a deleted pool");
    }
    Ok(())
}
