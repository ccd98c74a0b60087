//! The RunnerPool reconciler: validates a pool against EC2, keeps its launch template in line,
//! proves by DryRun that the IAM policy lets it launch, and reports all of it in conditions.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use tracing::{Instrument, info, info_span, warn};

use super::{Context, Error, FIELD_MANAGER, Result, conditions, error_policy};
use crate::api::{
    LaunchTemplateRef, RunnerCounts, RunnerJob, RunnerPool, RunnerPoolSpec, RunnerPoolStatus,
};
use crate::cloud::{CloudError, Ec2, ErrorClass, LaunchTemplateData, tags};
use crate::domain::job::holds_slot;
use crate::domain::pool::{self as decide, Lookup, Observed, PoolIdentity, ProfileLookup, Verdict};
use crate::domain::userdata::{self, BootParams};

pub const FINALIZER: &str = "pacer.dev/launch-template";

pub const VALIDATED: &str = "Validated";
pub const LAUNCH_PERMITTED: &str = "LaunchPermitted";
pub const READY: &str = "Ready";
/// Set while the pool keeps warm instances: `False` while their preparations keep failing.
pub const WARM: &str = "WarmPool";

/// Runs the RunnerPool controller until the stream ends (shutdown).
pub(super) async fn run(
    ctx: Arc<Context>,
    pools: Api<RunnerPool>,
    jobs: impl futures::Stream<Item = Arc<RunnerJob>> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let _ = ctx.jobs.pools.set(reader.clone());
    // Only spec changes, finalizers and deletion wake the reconciler: its own status writes
    // must not. Inputs that change in EC2 are caught by the periodic resync.
    let relevant = |pool: &RunnerPool| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            pool.metadata.generation,
            &pool.metadata.finalizers,
            pool.metadata.deletion_timestamp.is_some(),
        )
            .hash(&mut h);
        Some(h.finish())
    };
    let stream = watcher(pools.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(relevant, Default::default());
    // A RunnerJob's change wakes its pool to recount its runners (cheaply: see `apply`).
    let pool_of = |job: Arc<RunnerJob>| {
        let ns = job.namespace().unwrap_or_default();
        Some(ObjectRef::<RunnerPool>::new(&job.spec.pool_name).within(&ns))
    };
    Controller::for_stream(stream, reader)
        .watches_shared_stream(jobs, pool_of)
        .with_config(
            kube::runtime::controller::Config::default()
                .debounce(Duration::from_secs(1))
                .concurrency(8),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| std::future::ready(()))
        .await;
}

async fn reconcile(pool: Arc<RunnerPool>, ctx: Arc<Context>) -> Result<Action> {
    let ns = pool.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", pool.name_any());
    let span = info_span!("reconcile", pool = %key, generation = pool.metadata.generation);
    async move {
        let api: Api<RunnerPool> = Api::namespaced(ctx.client.clone(), &ns);
        if let Some(action) = wait_for_jobs(&pool, &ctx).await? {
            ctx.succeeded(&key);
            return Ok(action);
        }
        let action = finalizer(&api, FINALIZER, pool, |event| async {
            match event {
                Finalizer::Apply(pool) => apply(&pool, &ctx).await,
                Finalizer::Cleanup(pool) => cleanup(&pool, &ctx).await,
            }
        })
        .await
        .map_err(Error::from_finalizer)?;
        ctx.succeeded(&key);
        Ok(action)
    }
    .instrument(span)
    .await
}

fn identity<'a>(pool: &'a RunnerPool, ctx: &'a Context) -> PoolIdentity<'a> {
    PoolIdentity {
        controller_id: &ctx.settings.controller_id,
        namespace: pool.metadata.namespace.as_deref().unwrap_or_default(),
        name: pool.metadata.name.as_deref().unwrap_or_default(),
    }
}

/// NotFound becomes a `Missing` answer; anything else (throttling, outages) is an error to
/// retry, never a verdict on the pool.
fn lookup<T>(result: Result<T, CloudError>) -> Result<Lookup<T>> {
    match result {
        Ok(found) => Ok(Lookup::Found(found)),
        Err(e) if e.is(ErrorClass::NotFound) => Ok(Lookup::Missing(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

async fn observe(spec: &RunnerPoolSpec, ctx: &Context) -> Result<Observed> {
    let ec2 = ctx.ec2();
    let image = match lookup(ec2.describe_images(std::slice::from_ref(&spec.ami)).await)? {
        Lookup::Found(images) => match images.into_iter().next() {
            Some(image) => Lookup::Found(image),
            None => Lookup::Missing("no such image is visible to this account".into()),
        },
        Lookup::Missing(why) => Lookup::Missing(why),
    };
    let instance_types = lookup(ec2.describe_instance_types(&spec.instance_types).await)?;
    let subnets = lookup(ec2.describe_subnets(&spec.subnets).await)?;
    if let Lookup::Found(found) = &subnets {
        // The zones the pool's first launches look up: known before its first job comes.
        ctx.jobs.learn_zones(found).await;
    }
    let security_groups = lookup(ec2.describe_security_groups(&spec.security_groups).await)?;
    let instance_profile = match &spec.instance_profile {
        None => ProfileLookup::NotSet,
        Some(name) => match ec2.instance_profile_roles(name).await {
            Ok(Some(roles)) => ProfileLookup::Roles(roles),
            Ok(None) => ProfileLookup::NotFound,
            Err(e) if e.is(ErrorClass::Unauthorized) => ProfileLookup::AccessDenied,
            Err(e) => return Err(e.into()),
        },
    };
    Ok(Observed {
        image,
        instance_types,
        subnets,
        security_groups,
        instance_profile,
    })
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The status under construction in one pass, and the Events its changes deserve.
struct Pass {
    status: RunnerPoolStatus,
    generation: Option<i64>,
    events: Vec<(EventType, &'static str, String)>,
    /// The size of the pool's root volumes, GiB, when this pass read the AMI.
    root_gib: Option<i32>,
}

impl Pass {
    /// The spot interruption breaker's state, from the RunnerJobs' notices, with an Event as it
    /// opens. While the job controller runs elsewhere, the status keeps what it said.
    fn breaker(&mut self, pool: &RunnerPool, ctx: &Context) {
        if ctx.jobs.store().is_none() {
            return;
        }
        let until = super::job::on_demand_until(ctx, pool);
        let before = self.status.on_demand_until.as_ref().map(|t| t.0);
        if let Some(until) =
            until.filter(|_| crate::domain::launch::breaker_opened(before, now().0))
        {
            let b = &pool.spec.capacity.interruption_breaker;
            let message = format!(
                "{} or more spot interruption notices within {} minutes: launching on-demand until {until}",
                b.notices, b.window_minutes
            );
            (self.events).push((EventType::Warning, "SpotInterruptionBreakerOpen", message));
        }
        self.status.on_demand_until = until.map(Time);
    }

    /// The pool's warm instances kept, from the launch template it last had: their counts in
    /// the status, the pass's Events. Launched only while it may launch; retired whatever it is.
    /// How soon to look again, when sooner than usual.
    async fn warm(&mut self, pool: &RunnerPool, ctx: &Context) -> Result<Option<Duration>> {
        let ready = conditions::is_true(&self.status.conditions, LAUNCH_PERMITTED)
            && conditions::is_true(&self.status.conditions, READY);
        let Some(template) = self.status.launch_template.clone() else {
            return Ok(None);
        };
        if pool.spec.warm_size() == 0 && self.status.warm.is_none() {
            self.status.conditions.retain(|c| c.type_ != WARM);
            return Ok(None);
        }
        // Best effort: a failed EC2 call leaves the pool's own status to be written, and the
        // next pass (soon) tries again.
        let kept = match super::warm::keep(pool, ctx, &template, ready).await {
            Ok(Some(kept)) => kept,
            Ok(None) => return Ok(None),
            Err(e) => {
                warn!(error = %e, "keeping the warm instances failed; trying again");
                let note = format!("keeping the warm instances failed: {e}");
                self.events
                    .push((EventType::Warning, "WarmPoolFailed", note));
                return Ok(Some(WARM_LOOK_AGAIN));
            }
        };
        self.warm_condition(pool, &template, kept.counts, ctx.settings.backoff_unit);
        let (namespace, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
        let counts = &kept.counts;
        for (state, n) in [
            ("ready", counts.ready),
            ("preparing", counts.preparing),
            ("stopping", counts.stopping),
        ] {
            let labels = super::metrics::PoolPhase {
                namespace: namespace.clone(),
                pool: name.clone(),
                phase: state.into(),
            };
            ctx.metrics.warm.get_or_create(&labels).set(n.into());
        }
        let keeps = pool.spec.warm_size() > 0 || kept.counts != Default::default();
        self.status.warm = keeps.then_some(kept.counts);
        let known = (self.status.warm_storage.as_ref()).map(|s| s.volume_gib);
        let gib = self
            .root_gib
            .or(known.filter(|g| *g > 0))
            .unwrap_or_default();
        self.status.warm_storage = match keeps {
            true => Some(super::warm::storage(pool, ctx, gib, kept.counts.ready).await),
            false => {
                super::warm::forget_storage(pool, ctx);
                None
            }
        };
        self.events.extend(kept.events);
        let moving = kept.moving.then_some(WARM_LOOK_AGAIN);
        Ok(match (moving, kept.held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// `WarmPool`: `False` while the pool's warm preparations keep failing, naming the last
    /// failure and when the next launch is due; `True` otherwise, with the counts. Gone when
    /// the pool keeps no warm instances.
    fn warm_condition(
        &mut self,
        pool: &RunnerPool,
        template: &LaunchTemplateRef,
        counts: crate::api::WarmCounts,
        unit: Duration,
    ) {
        let size = pool.spec.warm_size();
        if size == 0 {
            self.status.conditions.retain(|c| c.type_ != WARM);
            return;
        }
        let current = tags::warm_value(&template.id, template.version);
        let failures = (pool.status.as_ref()).and_then(|s| s.warm_failures.as_ref());
        let at = now().0;
        let next = crate::domain::warm::launch_after(failures, &current, unit, at);
        let second =
            |t: k8s_openapi::jiff::Timestamp| t.round(k8s_openapi::jiff::Unit::Second).unwrap_or(t);
        match failures.zip(next) {
            Some((f, next)) => {
                let then = match next > at {
                    true => format!("no warm launch before {}", second(next)),
                    false => format!(
                        "warm launches resumed at {}, one at a time until one prepares",
                        second(next)
                    ),
                };
                let message = format!(
                    "{} warm preparation(s) in a row failed; the last, of {} at {}: {}; {then}",
                    f.count,
                    f.instance,
                    second(f.at.0),
                    f.message,
                );
                self.condition(WARM, false, "WarmPreparationFailing", message);
            }
            None => {
                let message = format!(
                    "{} of {size} warm instances ready, {} preparing, {} stopping",
                    counts.ready, counts.preparing, counts.stopping
                );
                self.condition(WARM, true, "WarmPoolKept", message);
            }
        }
    }

    /// Validated, with the caveats found (an Event the first time they are seen).
    fn validated(&mut self, notes: &[String]) {
        let message = if notes.is_empty() {
            "AMI, instance types, subnets, security groups and instance profile exist and fit together"
                .to_string()
        } else {
            format!("valid, with a caveat: {}", notes.join("; "))
        };
        let caveat = !notes.is_empty()
            && !(self.status.conditions.iter())
                .any(|c| c.type_ == VALIDATED && c.message == message);
        self.condition(VALIDATED, true, "Validated", message.clone());
        if caveat {
            self.events
                .push((EventType::Warning, "ValidationIncomplete", message));
        }
    }

    /// Not valid: nor permitted to launch, nor ready, for the validation's reason.
    fn invalid(&mut self, reason: &'static str, message: String) {
        self.condition(VALIDATED, false, reason, message.clone());
        self.condition(
            LAUNCH_PERMITTED,
            false,
            "NotValidated",
            "the pool is not valid; see Validated".into(),
        );
        self.condition(READY, false, reason, message);
    }

    fn condition(&mut self, type_: &str, ok: bool, reason: &'static str, message: String) {
        let changed = conditions::set(
            &mut self.status.conditions,
            type_,
            ok,
            reason,
            message.clone(),
            self.generation,
            now(),
        );
        if changed && (type_ != READY || ok) {
            let kind = if ok {
                EventType::Normal
            } else {
                EventType::Warning
            };
            self.events.push((kind, reason, message));
        }
    }
}

async fn apply(pool: &RunnerPool, ctx: &Context) -> Result<Action> {
    let id = identity(pool, ctx);
    let mut pass = Pass {
        status: pool.status.clone().unwrap_or_default(),
        generation: pool.metadata.generation,
        events: Vec::new(),
        root_gib: None,
    };
    pass.status.runners = count_runners(pool, ctx);
    pass.breaker(pool, ctx);

    // Checked this generation in the last resync period: only the counts can have changed.
    if let Some(left) = recently_checked(pool, ctx, &id, &pass) {
        let moving = pass.warm(pool, ctx).await?;
        let counted = |s: &RunnerPoolStatus| {
            let warm = (s.warm, s.warm_storage.clone(), s.conditions.clone());
            (s.runners.clone(), s.on_demand_until.clone(), warm)
        };
        if pool.status.as_ref().map(counted) != Some(counted(&pass.status))
            || !pass.events.is_empty()
        {
            finish(pool, ctx, pass).await?;
        }
        return Ok(Action::requeue(moving.map_or(left, |soon| left.min(soon))));
    }
    pass.status.observed_generation = pool.metadata.generation;

    let observed = observe(&pool.spec, ctx).await?;
    let (verdict, rendered) = verdict(pool, ctx, &id, &observed);
    let (Verdict::Valid { notes }, Lookup::Found(image), Ok(user_data)) =
        (&verdict, &observed.image, rendered)
    else {
        let Verdict::Invalid { reason, message } = verdict else {
            unreachable!("valid verdicts have an image and user-data")
        };
        pass.invalid(reason, message);
        // Its warm instances are still retired as they go stale, old or surplus.
        let moving = pass.warm(pool, ctx).await?;
        let action = finish(pool, ctx, pass).await?;
        return Ok(moving.map_or(action, |soon| {
            Action::requeue(soon.min(ctx.settings.resync))
        }));
    };
    pass.validated(notes);
    let size = pool.spec.root_volume.size_gib;
    pass.root_gib = Some(if size > 0 {
        size
    } else {
        image.root_snapshot_gib.unwrap_or_default()
    });
    let data = decide::template_data(&pool.spec, &id, image, &user_data);
    let hash = decide::spec_hash(&data);
    let template = ensure_template(ctx.ec2(), &id, &data, &hash, &mut pass.events).await?;
    pass.status.spec_hash = Some(hash);

    permit(pool, ctx, &id, &template, &mut pass).await?;
    pass.status.launch_template = Some(template);
    let moving = pass.warm(pool, ctx).await?;
    // Recorded before the status is written: a pass that follows at once (a new term) finds
    // it. Should the write fail, the status's observedGeneration still sends it to EC2.
    ctx.pool_checks
        .lock()
        .unwrap()
        .insert(id.key(), (pool.metadata.generation, Instant::now()));
    let action = finish(pool, ctx, pass).await?;
    Ok(moving.map_or(action, |soon| {
        Action::requeue(soon.min(ctx.settings.resync))
    }))
}

/// How soon a pool whose warm instances are launching, preparing or stopping is looked at
/// again.
const WARM_LOOK_AGAIN: Duration = Duration::from_secs(5);

/// How long until the next check when this generation of the pool was checked against EC2
/// within the last resync period (and the status says so); `None` when it is due.
fn recently_checked(
    pool: &RunnerPool,
    ctx: &Context,
    id: &PoolIdentity<'_>,
    pass: &Pass,
) -> Option<Duration> {
    let (generation, at) = ctx.pool_checks.lock().unwrap().get(&id.key()).copied()?;
    (generation == pool.metadata.generation
        && pass.status.observed_generation == generation
        && at.elapsed() < ctx.settings.resync)
        .then(|| ctx.settings.resync.saturating_sub(at.elapsed()))
}

/// What the pool's spec and what EC2 shows add up to, with the user-data rendered for it.
fn verdict(
    pool: &RunnerPool,
    ctx: &Context,
    id: &PoolIdentity<'_>,
    observed: &Observed,
) -> (Verdict, Result<String, String>) {
    let verdict = match decide::validate(&pool.spec, observed) {
        Verdict::Valid { .. } if let Some(why) = ctx.settings.tenancy.refusal(pool) => {
            Verdict::Invalid {
                reason: "TenantNotPermitted",
                message: why,
            }
        }
        Verdict::Valid { .. } if let Err(why) = tags::check(&id.instance_tags(&pool.spec)) => {
            Verdict::Invalid {
                reason: "TagInvalid",
                message: format!(
                    "metadata.namespace/metadata.name and spec.tags: the instances' tags: {why}"
                ),
            }
        }
        verdict => verdict,
    };
    let rendered = userdata::render(&BootParams {
        public_url: &ctx.settings.public_url,
        ca_pem: ctx.settings.runner_ca.as_deref(),
        pool: &id.key(),
        runner_user: pool.spec.runner_user(),
        extra: pool.spec.user_data.as_deref(),
    });
    match (verdict, rendered) {
        (Verdict::Valid { .. }, Err(too_large)) => {
            let message = format!("spec.userData: {too_large}");
            let invalid = Verdict::Invalid {
                reason: "UserDataTooLarge",
                message: message.clone(),
            };
            (invalid, Err(message))
        }
        (verdict, rendered) => (verdict, rendered.map_err(|e| e.to_string())),
    }
}

/// Whether EC2 lets the pool launch: a DryRun with the pool's real tags, and the pool Ready
/// when it is permitted.
async fn permit(
    pool: &RunnerPool,
    ctx: &Context,
    id: &PoolIdentity<'_>,
    template: &crate::api::LaunchTemplateRef,
    pass: &mut Pass,
) -> Result<()> {
    let request = decide::dry_run_request(&pool.spec, id, &template.id, template.version);
    match ctx.ec2().dry_run_launch(&request).await {
        Ok(()) => pass.condition(
            LAUNCH_PERMITTED,
            true,
            "DryRunSucceeded",
            format!(
                "a DryRun {} with the pool's tags was permitted",
                if request.fleet {
                    "CreateFleet"
                } else {
                    "RunInstances"
                }
            ),
        ),
        Err(e) if e.is(ErrorClass::Unauthorized) => pass.condition(
            LAUNCH_PERMITTED,
            false,
            "LaunchNotPermitted",
            format!("{e}; grant the statements of docs/iam-role.json to Pacer's role"),
        ),
        Err(e) if matches!(e.class, ErrorClass::InvalidInput | ErrorClass::NotFound) => {
            pass.condition(LAUNCH_PERMITTED, false, "LaunchRejected", e.to_string())
        }
        Err(e) => return Err(e.into()),
    }

    let permitted = conditions::is_true(&pass.status.conditions, LAUNCH_PERMITTED);
    if permitted {
        pass.condition(READY, true, "Ready", "the pool can launch runners".into());
    } else {
        pass.condition(
            READY,
            false,
            "LaunchNotPermitted",
            "see LaunchPermitted".into(),
        );
    }
    Ok(())
}

/// The pool's runners by phase, from the RunnerJob controller's cache when it runs here.
fn count_runners(pool: &RunnerPool, ctx: &Context) -> RunnerCounts {
    let Some(store) = ctx.jobs.store() else {
        return pool.status.clone().unwrap_or_default().runners;
    };
    let (ns, name) = (pool.namespace(), pool.name_any());
    decide::runner_counts(
        store
            .state()
            .iter()
            .filter(|j| j.namespace() == ns && j.spec.pool_name == name)
            .map(|j| j.status.as_ref().map(|s| s.phase).unwrap_or_default()),
    )
}

/// Writes the status in one server-side apply and publishes the pass's Events.
async fn finish(pool: &RunnerPool, ctx: &Context, pass: Pass) -> Result<Action> {
    let api: Api<RunnerPool> = Api::namespaced(
        ctx.client.clone(),
        pool.metadata.namespace.as_deref().unwrap_or_default(),
    );
    // `warmFailures` is written by merge patches only (`warm::record_failure`): owning it
    // here would undo a failure recorded since this pass read the pool.
    let status = RunnerPoolStatus {
        warm_failures: None,
        ..pass.status
    };
    let patch = serde_json::json!({
        "apiVersion": RunnerPool::api_version(&()),
        "kind": RunnerPool::kind(&()),
        "status": status,
    });
    api.patch_status(
        &pool.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    for (kind, reason, note) in pass.events {
        ctx.event(pool, kind, reason, note).await;
    }
    Ok(Action::requeue(ctx.settings.resync))
}

/// Makes the pool's launch template say `data`: creates it, or adds a version made default
/// when the spec hash recorded on the default version differs. Keeps the last few versions.
async fn ensure_template(
    ec2: &dyn Ec2,
    id: &PoolIdentity<'_>,
    data: &LaunchTemplateData,
    hash: &str,
    events: &mut Vec<(EventType, &'static str, String)>,
) -> Result<LaunchTemplateRef> {
    let name = id.template_name();
    let description = decide::version_description(hash);
    let Some(existing) = ec2.find_launch_template(&name).await? else {
        let created = ec2
            .create_launch_template(&name, &description, data, &id.template_tags())
            .await?;
        info!(template = %created.id, "created launch template");
        events.push((
            EventType::Normal,
            "LaunchTemplateCreated",
            format!("created launch template {name} ({})", created.id),
        ));
        return Ok(LaunchTemplateRef {
            id: created.id,
            version: created.default_version.max(1),
        });
    };
    if !tags::owned_by(&existing.tags, id.controller_id) {
        return Err(Error::TemplateNotOurs(name));
    }
    let current = ec2.default_version_description(&existing.id).await?;
    if current.as_deref().and_then(decide::hash_in_description) == Some(hash) {
        return Ok(LaunchTemplateRef {
            id: existing.id,
            version: existing.default_version,
        });
    }
    let version = ec2
        .create_launch_template_version(&existing.id, &description, data)
        .await?;
    ec2.set_default_launch_template_version(&existing.id, version)
        .await?;
    info!(template = %existing.id, version, "new launch template version is the default");
    events.push((
        EventType::Normal,
        "LaunchTemplateUpdated",
        format!("launch template {name} version {version} is now the default"),
    ));
    let old = decide::versions_to_delete(version);
    if !old.is_empty()
        && let Err(e) = ec2
            .delete_launch_template_versions(&existing.id, &old)
            .await
    {
        // Old versions only cost clutter; never fail a pass over them.
        warn!(template = %existing.id, error = %e, "could not delete old launch template versions");
    }
    Ok(LaunchTemplateRef {
        id: existing.id,
        version,
    })
}

/// A pool being deleted keeps its launch template while RunnerJobs of it hold a slot (they may
/// hold an instance; finished jobs and jobs that never launched do not, and the pool launches
/// nothing more): it says so in its Ready condition and looks again. `None` once none does.
async fn wait_for_jobs(pool: &RunnerPool, ctx: &Context) -> Result<Option<Action>> {
    let ours = pool.finalizers().iter().any(|f| f == FINALIZER);
    if pool.metadata.deletion_timestamp.is_none() || !ours {
        return Ok(None);
    }
    let ns = pool.metadata.namespace.as_deref().unwrap_or_default();
    let of_pool = |j: &RunnerJob| {
        j.metadata.namespace.as_deref() == Some(ns)
            && j.spec.pool_name == pool.name_any()
            && holds_slot(j.status.as_ref())
    };
    // Counted from the job cache while it shows any, so waiting costs no listing; the API
    // server has the last word before the template goes.
    let cached =
        (ctx.jobs.store()).map(|store| store.state().iter().filter(|j| of_pool(j)).count());
    let holding = match cached {
        Some(holding) if holding > 0 => holding,
        _ => {
            let jobs: Api<RunnerJob> = Api::namespaced(ctx.client.clone(), ns);
            (jobs.list(&ListParams::default()).await?.items.iter())
                .filter(|j| of_pool(j))
                .count()
        }
    };
    if holding == 0 {
        return Ok(None);
    }
    let mut pass = Pass {
        status: pool.status.clone().unwrap_or_default(),
        generation: pool.metadata.generation,
        events: Vec::new(),
        root_gib: None,
    };
    let message = format!(
        "being deleted: waiting for {holding} RunnerJobs of the pool that may hold an instance to finish before deleting its launch template"
    );
    pass.condition(READY, false, "Deleting", message);
    finish(pool, ctx, pass).await?;
    Ok(Some(Action::requeue(ctx.settings.backoff_unit)))
}

/// Deletes the launch template (NotFound is success); [`wait_for_jobs`] found no RunnerJob of
/// the pool holding a slot.
async fn cleanup(pool: &RunnerPool, ctx: &Context) -> Result<Action> {
    let id = identity(pool, ctx);
    super::warm::retire_all(pool, ctx).await?;
    if let Some(template) = ctx.ec2().find_launch_template(&id.template_name()).await?
        && tags::owned_by(&template.tags, id.controller_id)
    {
        ctx.ec2().delete_launch_template(&template.id).await?;
        info!(template = %template.id, "deleted launch template");
    }
    ctx.forget_pool_check(&id.key());
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::fake::FakeEc2;

    fn data(image: &str) -> LaunchTemplateData {
        LaunchTemplateData {
            image_id: image.into(),
            security_group_ids: vec!["sg-0a1b2c3d4e5f60001".into()],
            instance_profile: None,
            root_volume: None,
            spot: false,
            user_data: String::new(),
            tags: Default::default(),
            metadata_hop_limit: 1,
        }
    }

    const ID: PoolIdentity<'static> = PoolIdentity {
        controller_id: "test",
        namespace: "ci",
        name: "linux",
    };

    async fn ensure(ec2: &FakeEc2, image: &str) -> LaunchTemplateRef {
        let data = data(image);
        let hash = decide::spec_hash(&data);
        ensure_template(ec2, &ID, &data, &hash, &mut Vec::new())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_template_is_created_once_and_versioned_only_when_its_data_changes() {
        let ec2 = FakeEc2::new();
        let first = ensure(&ec2, "ami-1").await;
        assert_eq!(first.version, 1);
        assert_eq!(ensure(&ec2, "ami-1").await, first);
        assert_eq!(
            ec2.count("CreateLaunchTemplate") + ec2.count("CreateLaunchTemplateVersion"),
            1
        );
        let second = ensure(&ec2, "ami-2").await;
        assert_eq!((second.id.as_str(), second.version), (first.id.as_str(), 2));
        let template = ec2.template(&ID.template_name()).unwrap();
        assert_eq!(template.template.default_version, 2);
        assert_eq!(template.template.tags["gha:managed-by"], "pacer");
    }

    #[tokio::test]
    async fn only_the_last_three_versions_are_kept() {
        let ec2 = FakeEc2::new();
        for i in 1..=6 {
            ensure(&ec2, &format!("ami-{i}")).await;
        }
        let versions: Vec<i64> = ec2
            .template(&ID.template_name())
            .unwrap()
            .versions
            .keys()
            .copied()
            .collect();
        assert_eq!(versions, [4, 5, 6]);
    }

    #[tokio::test]
    async fn a_failed_version_cleanup_does_not_fail_the_pass() {
        let ec2 = FakeEc2::new();
        for i in 1..=3 {
            ensure(&ec2, &format!("ami-{i}")).await;
        }
        ec2.fail_next("DeleteLaunchTemplateVersions", "NotImplemented", 1);
        assert_eq!(ensure(&ec2, "ami-4").await.version, 4);
    }

    #[tokio::test]
    async fn a_template_with_our_name_but_not_our_tags_is_left_alone() {
        let ec2 = FakeEc2::new();
        let foreign = Default::default();
        ec2.create_launch_template(&ID.template_name(), "theirs", &data("ami-1"), &foreign)
            .await
            .unwrap();
        let data = data("ami-2");
        let err = ensure_template(&ec2, &ID, &data, &decide::spec_hash(&data), &mut Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TemplateNotOurs(_)));
        assert_eq!(ec2.count("CreateLaunchTemplateVersion"), 0);
    }

    #[tokio::test]
    async fn throttling_is_an_error_to_retry_not_a_verdict() {
        let ec2 = FakeEc2::new();
        ec2.fail_next("DescribeLaunchTemplates", "RequestLimitExceeded", 1);
        let data = data("ami-1");
        let err = ensure_template(&ec2, &ID, &data, &decide::spec_hash(&data), &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "AwsThrottled");
        assert_eq!(ensure(&ec2, "ami-1").await.version, 1);
    }
}
