//! A pool's warm instances, kept by the pool's passes: launched from the pool's launch template
//! ahead of any job, tagged `gha:warm` with the template version, prepared by the boot script
//! (which reports `prepared`, and is stopped by whichever replica hears it), and retired when
//! stale, too old, surplus, or started without a job. The instances are the state: EC2's
//! listing is read every pass, nothing is kept between passes but the shared snapshot.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::{Context, Result};
use crate::api::{LaunchTemplateRef, RunnerPool, WarmCounts};
use crate::cloud::{ErrorClass, tags};
use crate::domain::pool::PoolIdentity;
use crate::domain::warm::{Failure, Retire, WarmFacts, WarmInstance, failed, launch_after, plan};

/// How long one warm launch token is used for the same listing.
const TOKEN_BUCKET_SECONDS: i64 = 600;

/// What one pass did to a pool's warm instances.
pub(super) struct Kept {
    pub counts: WarmCounts,
    pub events: Vec<(EventType, &'static str, String)>,
    /// Instances are on their way to ready or out: look again soon.
    pub moving: bool,
    /// Launches wait this long yet for the pool's failed preparations.
    pub held: Option<Duration>,
}

/// Brings the pool's warm instances to what [`plan`] says, for its current launch template;
/// launching none unless `may_launch` (a pool that is not Ready still retires what it no
/// longer keeps, as it was last valid). `None` while this process does not run the job
/// controller, whose cache says which warm instances jobs have taken.
pub(super) async fn keep(
    pool: &RunnerPool,
    ctx: &Context,
    template: &LaunchTemplateRef,
    may_launch: bool,
) -> Result<Option<Kept>> {
    // Until the job controller's cache has its first list, it shows no job holding any
    // instance: nothing is decided from it.
    let Some(store) = ctx.jobs.store() else {
        return Ok(None);
    };
    if futures::FutureExt::now_or_never(store.wait_until_ready()).is_none() {
        return Ok(None);
    }
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
            held: None,
        }));
    }
    let ids: HashSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    let named = named(ctx, &namespace, &pool.name_any(), &ids);
    let boot_timeout = (ctx.settings.job_limits.for_pool(&pool.spec)).boot_timeout;
    let mut decided = plan(&WarmFacts {
        spec: pool.spec.warm.as_ref(),
        template_id: &template.id,
        template_version: template.version,
        instances: &instances,
        claimed: &named.claimed,
        used: &named.used,
        prepare_timeout_secs: boot_timeout.as_secs() as i64,
        now: Timestamp::now().as_second(),
    });
    // After failed preparations, new launches wait (see `domain::warm::launch_after`), then
    // one goes first, alone, until one prepares.
    let current = tags::warm_value(&template.id, template.version);
    let failures = pool.status.as_ref().and_then(|s| s.warm_failures.as_ref());
    let now = Timestamp::now();
    let after = launch_after(failures, &current, ctx.settings.backoff_unit, now);
    let held = (after.filter(|at| *at > now)).map(|at| at.duration_since(now).unsigned_abs());
    if held.is_some() || !may_launch {
        decided.launch = 0;
    } else if after.is_some() {
        decided.launch = decided.launch.min(1);
    }
    // A preparation that timed out is counted before the instance goes (a failure not
    // counted leaves it for the next pass); one of an older template version counts nothing.
    let message = format!(
        "did not report prepared within {} s of its launch",
        boot_timeout.as_secs()
    );
    let mut uncounted = Vec::new();
    for (id, _) in (decided.terminate.iter()).filter(|(_, why)| *why == Retire::PreparationTimedOut)
    {
        let Some(from) = instances
            .iter()
            .find(|i| &i.id == id && i.template == current)
        else {
            continue;
        };
        let failure = Failure {
            template: &from.template,
            instance: id,
            launched: from.launched,
            message: &message,
        };
        if let Err(e) = record_failure(ctx, (&namespace, &pool.name_any()), failure).await {
            warn!(pool = %key, instance = %id, error = %e, "could not count a failed warm preparation; trying again");
            uncounted.push(id.clone());
        }
    }
    decided.terminate.retain(|(id, _)| !uncounted.contains(id));
    // A job may have taken one since `named` looked: it is the job's. The rest are marked
    // retired (no job's uid), so that no job takes them while the listing still shows them.
    let mut retire: Vec<(String, crate::domain::warm::Retire)> = {
        let mut taken = ctx.jobs.warm_taken.lock().unwrap();
        taken.retain(|id, job| !job.is_empty() || ids.contains(id.as_str()));
        // A job's pass terminated it already (the listing does not show it yet).
        let settle = ctx.settings.job_limits.launch_visibility;
        let terminating = |id: &str| (ctx.jobs.ledger).terminating(id, snapshot.taken, settle);
        let retire: Vec<_> = (decided.terminate.into_iter())
            .filter(|(id, _)| !taken.contains_key(id) && !terminating(id))
            .collect();
        for (id, _) in &retire {
            taken.insert(id.clone(), String::new());
        }
        retire
    };
    let mut events = Vec::new();
    if !retire.is_empty() {
        let ids: Vec<String> = retire.iter().map(|(id, _)| id.clone()).collect();
        let mut failed = Vec::new();
        let mut trouble = None;
        for (id, result) in crate::cloud::terminate_each(ctx.ec2(), &ids).await {
            let Err(e) = result else { continue };
            warn!(pool = %key, instance = %id, error = %e, "could not retire a warm instance; next pass");
            // One instance refused (protected, say): named, and the pass goes on to refill.
            if e.is(ErrorClass::Throttled) || e.is(ErrorClass::Other) {
                trouble = Some(e);
            } else {
                let note = format!("could not retire warm instance {id}: {e}");
                events.push((EventType::Warning, "WarmPoolFailed", note));
            }
            failed.push(id);
        }
        if !failed.is_empty() {
            // Not retired: decided again by the next pass.
            let mut taken = ctx.jobs.warm_taken.lock().unwrap();
            taken.retain(|id, job| !job.is_empty() || !failed.contains(id));
            retire.retain(|(id, _)| !failed.contains(id));
        }
        // EC2 itself in trouble and nothing retired: the pass's error, tried again with backoff.
        if let Some(e) = trouble.filter(|_| retire.is_empty()) {
            return Err(e.into());
        }
        for (id, why) in &retire {
            info!(pool = %key, instance = %id, reason = why.reason(), "retired a warm instance");
            let note = format!("warm instance {id} terminated: {}", why.reason());
            let kind = match why {
                Retire::PreparationTimedOut => EventType::Warning,
                _ => EventType::Normal,
            };
            events.push((kind, why.reason(), note));
        }
    }
    // A preparation that timed out in this pass: the next pass launches its replacement, as
    // long after it as the failures in a row say.
    if retire
        .iter()
        .any(|(_, why)| *why == Retire::PreparationTimedOut)
    {
        decided.launch = 0;
    }
    if decided.launch > 0 {
        events.push(launch(pool, ctx, template, &key, &instances, decided.launch).await?);
    }
    let counts = decided.counts;
    let moving =
        decided.launch > 0 || !retire.is_empty() || counts.preparing > 0 || counts.stopping > 0;
    Ok(Some(Kept {
        counts,
        events,
        moving,
        held,
    }))
}

/// Counts `failure` on pool `namespace/name` ([`failed`]): a merge patch of
/// `status.warmFailures` conditional on the version read, read and tried again on a conflict.
/// The pool's own status apply never sets that field, so the two writers do not undo each
/// other's work. An error when it could not be written: the caller keeps the instance, so the
/// failure is counted on a later try.
pub(crate) async fn record_failure(
    ctx: &Context,
    (namespace, name): (&str, &str),
    failure: Failure<'_>,
) -> Result<()> {
    let api: Api<RunnerPool> = Api::namespaced(ctx.client.clone(), namespace);
    let mut conflict = None;
    for _ in 0..5 {
        let Some(pool) = api.get_opt(name).await? else {
            return Ok(());
        };
        let previous = pool.status.as_ref().and_then(|s| s.warm_failures.as_ref());
        let Some(failures) = failed(previous, failure, Timestamp::now()) else {
            return Ok(());
        };
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": pool.resource_version()},
            "status": {"warmFailures": failures},
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => conflict = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(kube::Error::Api(conflict.expect("five conflicts")).into())
}

/// A warm instance of pool `namespace/name` prepared: the failures in a row are over.
pub(crate) async fn clear_failures(ctx: &Context, namespace: &str, name: &str) -> Result<()> {
    let api: Api<RunnerPool> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({"status": {"warmFailures": null}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// What the pool's `ready` stopped warm instances, with root volumes of `gib` GiB, cost an
/// hour, at the EBS price of the pool's volume type; the hours since the last pass at the last
/// pass's rate go to `pacer_warm_storage_cost_usd` (a gap longer than ten minutes, as while
/// another replica led, counts as ten).
pub(super) async fn storage(
    pool: &RunnerPool,
    ctx: &Context,
    gib: i32,
    ready: i32,
) -> crate::api::WarmStorage {
    let volume_type = serde_json::to_value(pool.spec.root_volume.volume_type)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let price = super::job::volume_price(ctx, &volume_type).await;
    let hourly =
        (price.as_deref()).and_then(|p| crate::domain::cost::volumes_hourly(p, gib, ready));
    let key = format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    );
    let rate = hourly.as_deref().and_then(|h| h.parse::<f64>().ok());
    let before = {
        let mut seen = ctx.jobs.warm_storage.lock().unwrap();
        match rate {
            Some(rate) => seen.insert(key, (std::time::Instant::now(), rate)),
            None => seen.remove(&key),
        }
    };
    if let Some((at, rate)) = before {
        let hours = at
            .elapsed()
            .min(std::time::Duration::from_secs(600))
            .as_secs_f64()
            / 3600.0;
        let labels = super::metrics::Pool {
            namespace: pool.namespace().unwrap_or_default(),
            pool: pool.name_any(),
        };
        ctx.metrics
            .warm_storage_cost
            .get_or_create(&labels)
            .inc_by(rate * hours);
    }
    crate::api::WarmStorage {
        volume_gib: gib,
        price_per_gib_month: price,
        hourly_cost: hourly,
        currency: "USD".into(),
    }
}

/// Forgets the storage rate of a pool that keeps no warm instances any more: one that keeps
/// some again starts counting afresh.
pub(super) fn forget_storage(pool: &RunnerPool, ctx: &Context) {
    let key = format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    );
    ctx.jobs.warm_storage.lock().unwrap().remove(&key);
}

/// Which of a pool's warm instances `ids` RunnerJobs name.
#[derive(Default)]
pub(super) struct Named {
    /// Held by a live job ([`crate::domain::warm::holds`]), or taken by this process for a job
    /// whose record the cache does not show yet: the job's, not the pool's.
    pub claimed: BTreeSet<String>,
    /// Taken by a job once and not held by it now (an earlier attempt's, a finished job's): it
    /// may have run, and is never warm again, whoever else claims it.
    pub used: BTreeSet<String>,
}

/// Which of the warm instances `ids` of pool `namespace/pool` jobs name, from the cache and
/// this process's takes.
pub(super) fn named(ctx: &Context, namespace: &str, pool: &str, ids: &HashSet<&str>) -> Named {
    let mut named = Named::default();
    let note = |set: &mut BTreeSet<String>, id: &str| {
        if ids.contains(id) {
            set.insert(id.to_string());
        }
    };
    let jobs = ctx.jobs.store().map(|s| s.state()).unwrap_or_default();
    let of_pool = (jobs.iter())
        .filter(|j| j.metadata.namespace.as_deref() == Some(namespace) && j.spec.pool_name == pool);
    for status in of_pool.filter_map(|j| j.status.as_ref()) {
        let took = (status.launch.as_ref()).and_then(|l| l.warm.as_ref());
        if let Some(took) = took {
            let holding = crate::domain::warm::holds(status, &took.instance);
            let set = match holding {
                true => &mut named.claimed,
                false => &mut named.used,
            };
            note(set, &took.instance);
        }
        if let Some(current) = status
            .instance
            .as_ref()
            .filter(|_| status.phase.is_finished())
        {
            note(&mut named.used, &current.id);
        }
        for earlier in &status.previous_attempts {
            note(&mut named.used, &earlier.instance);
        }
    }
    for id in ctx.jobs.warm_taken.lock().unwrap().keys() {
        note(&mut named.claimed, id);
    }
    // Once a job has run on it, no claim keeps it warm.
    named.claimed.retain(|id| !named.used.contains(id));
    named
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
    // Each that can be goes, whatever one that cannot (protected, say) answers.
    let mut error = None;
    for (id, result) in crate::cloud::terminate_each(ctx.ec2(), &ids).await {
        match result {
            Ok(()) => {
                info!(pool = %key, instance = %id, "terminated a warm instance of a deleted pool")
            }
            Err(e) => {
                warn!(pool = %key, instance = %id, error = %e, "could not terminate a warm instance of a deleted pool; the pool waits for it");
                error = Some(e);
            }
        }
    }
    error.map_or(Ok(()), |e| Err(e.into()))
}
