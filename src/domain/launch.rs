//! Launch planning: which offerings (market, instance type, subnet) to try, what to remember
//! when EC2 has no capacity, how long to back off, and the tags and idempotency token of a
//! launch.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use sha2::{Digest, Sha256};

use crate::api::{
    AllocationStrategy, Capacity, CapacityType, LaunchBatch, LaunchIntent, LaunchOffering,
    RunnerPoolSpec, WarmStart,
};
use crate::cloud::{Instance, LaunchRequest, tags};

/// EC2 market of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Market {
    Spot,
    OnDemand,
}

/// One (market, instance type, zone) that EC2 may or may not have capacity for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Offering {
    pub market: Market,
    pub instance_type: String,
    pub subnet: String,
    pub zone: String,
}

/// How long an offering that failed for capacity is skipped.
pub const UNAVAILABLE_FOR: Duration = Duration::from_secs(180);

/// Offerings recently refused for capacity, shared by every job of the controller. Time is
/// passed in, so tests need no clock.
#[derive(Debug, Default)]
pub struct CapacityCache {
    until: HashMap<(Market, String, String), Instant>,
}

impl CapacityCache {
    pub fn mark_unavailable(
        &mut self,
        market: Market,
        instance_type: &str,
        zone: &str,
        now: Instant,
    ) {
        self.until.insert(
            (market, instance_type.to_string(), zone.to_string()),
            now + UNAVAILABLE_FOR,
        );
    }

    pub fn is_available(
        &self,
        market: Market,
        instance_type: &str,
        zone: &str,
        now: Instant,
    ) -> bool {
        self.until
            .get(&(market, instance_type.to_string(), zone.to_string()))
            .is_none_or(|until| now >= *until)
    }

    /// Forgets expired entries, so the cache stays as small as the current shortage.
    pub fn prune(&mut self, now: Instant) {
        self.until.retain(|_, until| now < *until);
    }
}

/// The offerings to try now, most preferred first: the pool's market (then on-demand when a
/// spot pool may fall back), instance types in the pool's order, subnets in its order; minus
/// those the cache says are exhausted. Empty means: back off and retry. While the pool's
/// interruption breaker is open (`spot_paused`), a spot pool that may fall back launches
/// on-demand, and spot only when no on-demand offering is left.
pub fn offerings(
    spec: &RunnerPoolSpec,
    zones: &BTreeMap<String, String>,
    cache: &CapacityCache,
    now: Instant,
    spot_paused: bool,
) -> Vec<Offering> {
    let markets: &[Market] = match (
        spec.capacity.capacity_type,
        spec.capacity.fallback_to_on_demand,
    ) {
        (CapacityType::OnDemand, _) => &[Market::OnDemand],
        (CapacityType::Spot, false) => &[Market::Spot],
        // On-demand first; spot only when on-demand has no capacity left anywhere.
        (CapacityType::Spot, true) if spot_paused => &[Market::OnDemand, Market::Spot],
        (CapacityType::Spot, true) => &[Market::Spot, Market::OnDemand],
    };
    let mut out = Vec::new();
    for &market in markets {
        for instance_type in &spec.instance_types {
            for subnet in &spec.subnets {
                let zone = zones.get(subnet).cloned().unwrap_or_default();
                if cache.is_available(market, instance_type, &zone, now) {
                    out.push(Offering {
                        market,
                        instance_type: instance_type.clone(),
                        subnet: subnet.clone(),
                        zone,
                    });
                }
            }
        }
        // Fall back to on-demand only when no spot offering is left.
        if !out.is_empty() {
            break;
        }
    }
    out
}

/// Until when a spot pool launches on-demand: `notices` of its spot interruption notices (when
/// each came) within `windowMinutes` open the breaker for `onDemandMinutes` after the last of
/// them. `None` when it is closed at `now`, turned off, or the pool cannot launch on-demand.
pub fn on_demand_until(
    spec: &RunnerPoolSpec,
    mut notices: Vec<Timestamp>,
    now: Timestamp,
) -> Option<Timestamp> {
    let breaker = &spec.capacity.interruption_breaker;
    let spot_with_fallback =
        spec.capacity.capacity_type == CapacityType::Spot && spec.capacity.fallback_to_on_demand;
    let needed = usize::try_from(breaker.notices).ok().filter(|n| *n > 0)?;
    if !spot_with_fallback || notices.len() < needed {
        return None;
    }
    let minutes = |m: i32| SignedDuration::from_mins(i64::from(m.max(1)));
    notices.sort();
    let until = (notices.windows(needed))
        .filter(|w| w[0].duration_until(w[needed - 1]) <= minutes(breaker.window_minutes))
        .map(|w| w[needed - 1] + minutes(breaker.on_demand_minutes))
        .max()?;
    (until > now).then_some(until)
}

/// Whether a breaker found open now opens at `now`, rather than stays open: the status said it
/// was closed (`before`, its `onDemandUntil` as last written, is absent or past).
pub fn breaker_opened(before: Option<Timestamp>, now: Timestamp) -> bool {
    before.is_none_or(|until| until <= now)
}

/// For a single-offering launch (`runInstances`) on spot: puts the first instance type's
/// offerings in order of their zone's current spot price, cheapest first. Zones without a
/// known price go last; equal prices keep the pool's subnet order.
pub fn cheapest_zone_first(offerings: &mut [Offering], prices: &HashMap<String, f64>) {
    let Some(first) = offerings.first().cloned() else {
        return;
    };
    if first.market != Market::Spot {
        return;
    }
    let same = offerings
        .iter()
        .take_while(|o| o.market == first.market && o.instance_type == first.instance_type)
        .count();
    offerings[..same].sort_by(|a, b| {
        let price = |o: &Offering| prices.get(&o.zone).copied().unwrap_or(f64::INFINITY);
        price(a).total_cmp(&price(b))
    });
}

/// Launch attempts before a job fails with `InsufficientCapacity`.
pub const MAX_ATTEMPTS: i32 = 12;

/// Wait after the `attempt`-th failed launch: 30 s, doubling, at most 5 minutes.
pub fn backoff(attempt: i32) -> Duration {
    let doublings = attempt.clamp(1, 5) - 1;
    Duration::from_secs(30u64 << doublings).min(Duration::from_secs(300))
}

/// EC2's idempotency token for one launch request of one attempt of one job: the same
/// request again (a retry, or the same pass after a crash) is the same launch to EC2 and gets
/// its first answer back; another request (other offerings, another market, a new attempt)
/// is a new launch. EC2 refuses a token reused with other parameters, and replays the first
/// answer (even an empty fleet) for the same ones, so the parameters are part of the token.
/// Each instance attempt of the job (a new one after the last ended before its runner took
/// the job) launches under tokens of its own; the first keeps the job's uid alone, so a launch
/// in flight across an upgrade replays under the token it was sent with.
/// At most 64 ASCII characters.
pub fn client_token(
    job_uid: &str,
    instance_attempt: u32,
    attempt: i32,
    parameters: &str,
) -> String {
    let input = match instance_attempt {
        0 | 1 => format!("{job_uid}/{attempt}/{parameters}"),
        n => format!("{job_uid}/{n}/{attempt}/{parameters}"),
    };
    let digest = Sha256::digest(input.as_bytes());
    format!(
        "pacer-{}",
        digest
            .iter()
            .take(24)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// CreateFleet's allocation strategy for a launch in `market`, as EC2 spells it. A spot pool
/// falling back to on-demand keeps an on-demand strategy it names, else `lowest-price`.
pub fn allocation_strategy(capacity: &Capacity, market: Market) -> &'static str {
    use AllocationStrategy as S;
    let chosen = capacity.allocation_strategy;
    match (market, chosen) {
        (Market::Spot, None | Some(S::PriceCapacityOptimized)) => "price-capacity-optimized",
        (Market::Spot, Some(S::CapacityOptimized)) => "capacity-optimized",
        (Market::Spot, Some(S::LowestPrice)) => "lowest-price",
        (Market::Spot, Some(S::Diversified)) => "diversified",
        (Market::Spot, Some(S::Prioritized)) => "capacity-optimized-prioritized",
        (Market::OnDemand, Some(S::Prioritized)) => "prioritized",
        (Market::OnDemand, _) => "lowest-price",
    }
}

/// Who a launch is for.
#[derive(Clone, Debug)]
pub struct JobIdentity<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub job_id: i64,
    pub repository: &'a str,
}

/// Tag keys that tie an instance to its RunnerJob.
pub const RUNNER_JOB: &str = "gha:runner_job";
pub const RUNNER_JOB_UID: &str = "gha:runner_job_uid";
pub const JOB_ID: &str = "gha:job_id";
pub const REPO: &str = "gha:repo";
/// The tag of a batch's instances: the batch's ClientToken. They carry no job's tags; the
/// jobs' statuses say which instance is whose.
pub const BATCH: &str = "gha:batch";

/// Most jobs one batched launch serves.
pub const MAX_BATCH: u32 = 100;

/// Tags of a job's instance and volumes, sent in the launch request itself: the pool's tags
/// (ours and the user's) plus the job's.
pub fn instance_tags(
    pool_tags: &BTreeMap<String, String>,
    job: &JobIdentity<'_>,
) -> BTreeMap<String, String> {
    let mut all = pool_tags.clone();
    all.insert(
        RUNNER_JOB.into(),
        fit_tag_value(format!("{}/{}", job.namespace, job.name)),
    );
    all.insert(RUNNER_JOB_UID.into(), job.uid.into());
    all.insert(JOB_ID.into(), job.job_id.to_string());
    all.insert(REPO.into(), job.repository.into());
    debug_assert_eq!(
        all.get(tags::MANAGED_BY).map(String::as_str),
        Some(tags::MANAGED_BY_VALUE)
    );
    all
}

/// The launch `request` as the status records it before EC2 is asked.
pub fn intent(request: &LaunchRequest) -> LaunchIntent {
    LaunchIntent {
        client_token: request.client_token.clone().unwrap_or_default(),
        launch_template_id: request.launch_template_id.clone(),
        launch_template_version: request.version,
        market: if request.spot { "spot" } else { "onDemand" }.into(),
        fleet: request.fleet,
        allocation_strategy: request.allocation_strategy.clone(),
        offerings: (request.offerings.iter())
            .map(|(instance_type, subnet)| LaunchOffering {
                instance_type: instance_type.clone(),
                subnet: subnet.clone(),
            })
            .collect(),
        tags: request.tags.clone(),
        batch: None,
        warm: None,
    }
}

/// The intent of a job that takes warm instance `took`, launched from the pool's `template`,
/// instead of launching: recorded like a launch's, its token naming the instance.
pub fn warm_intent(template: &crate::api::LaunchTemplateRef, took: WarmStart) -> LaunchIntent {
    LaunchIntent {
        client_token: format!("warm-{}", took.instance),
        launch_template_id: template.id.clone(),
        launch_template_version: template.version,
        market: "onDemand".into(),
        fleet: false,
        allocation_strategy: None,
        offerings: Vec::new(),
        tags: Default::default(),
        batch: None,
        warm: Some(took),
    }
}

/// The ClientToken of a batch: a digest of its members (each `uid/instance attempt/launch
/// attempt`, in their order), the parameters of the request without the batch's tag, and a
/// nonce, so that no later batch of the same jobs ever replays this one's answer (each member
/// records the token before the call; nothing derives it again). At most 64 ASCII characters.
pub fn batch_token(members: &[String], parameters: &str, nonce: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"batch\n");
    hash.update(nonce);
    for member in members {
        hash.update(member.as_bytes());
        hash.update(b"\n");
    }
    hash.update(parameters.as_bytes());
    let digest = hash.finalize();
    format!("pacer-b{}", crate::domain::pool::hex(&digest[..24]))
}

/// Tags of a batch's instances and volumes: the pool's tags and the batch's token. EC2 puts
/// one request's tags on every instance it launches.
pub fn batch_tags(pool_tags: &BTreeMap<String, String>, token: &str) -> BTreeMap<String, String> {
    let mut all = pool_tags.clone();
    all.insert(BATCH.into(), token.into());
    all
}

/// Member `member`'s record of a batched launch of `members` under `nonce`.
pub fn batch_intent(
    request: &LaunchRequest,
    members: &[String],
    member: u32,
    nonce: &[u8],
) -> LaunchIntent {
    LaunchIntent {
        batch: Some(LaunchBatch {
            size: request.count,
            member,
            members: members.to_vec(),
            nonce: crate::domain::pool::hex(nonce),
        }),
        ..intent(request)
    }
}

/// Whether a recorded batch is the place of the job with `uid`: its token is the digest of
/// its members, request and nonce, and the member at its place is that job. A status is
/// writable by others: a place copied from another job's status, or a batch made up, does
/// not pass. Why not, otherwise.
pub fn batch_place_of(intent: &LaunchIntent, uid: &str) -> Result<(), String> {
    let Some(batch) = &intent.batch else {
        return Err("it records no batch".into());
    };
    let size = batch.members.len();
    if !(2..=MAX_BATCH as usize).contains(&size) || batch.size as usize != size {
        return Err(format!("its batch is not within 2 to {MAX_BATCH} members"));
    }
    let at_place = batch.members.get(batch.member as usize);
    if at_place.and_then(|m| m.split('/').next()) != Some(uid) {
        return Err("its place in the batch is another job's".into());
    }
    let nonce = (0..batch.nonce.len())
        .step_by(2)
        .map(|i| {
            batch
                .nonce
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or("its nonce is not hex")?;
    let mut tags = intent.tags.clone();
    tags.remove(BATCH);
    let request = LaunchRequest {
        tags,
        count: batch.size,
        client_token: None,
        ..request_of(intent)
    };
    if batch_token(&batch.members, &request.parameters(), &nonce) != intent.client_token {
        return Err("its token is not its batch's".into());
    }
    Ok(())
}

/// The request `intent` records, its token and count aside.
fn request_of(intent: &LaunchIntent) -> LaunchRequest {
    LaunchRequest {
        launch_template_id: intent.launch_template_id.clone(),
        version: intent.launch_template_version,
        offerings: (intent.offerings.iter())
            .map(|o| (o.instance_type.clone(), o.subnet.clone()))
            .collect(),
        spot: intent.market == "spot",
        fleet: intent.fleet,
        tags: intent.tags.clone(),
        allocation_strategy: intent.allocation_strategy.clone(),
        client_token: Some(intent.client_token.clone()),
        count: intent.batch.as_ref().map_or(1, |b| b.size),
    }
}

/// The instance of a batch's member `member`: the one at that place in EC2's answer sorted by
/// instance id. A replay of the launch gets the same answer, so a member finds the same
/// instance however often it asks; a member past the instances EC2 launched has none.
pub fn member_instance(instances: &[Instance], member: u32) -> Option<&Instance> {
    let mut sorted: Vec<&Instance> = instances.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    sorted.get(member as usize).copied()
}

/// The request a recorded launch sends again, token and all, when it still fits: the pool's
/// launch template at its current version, offerings and a market the pool allows, and the
/// job's tags exactly (a batch's: the pool's and the batch's token), and a batch place that is
/// this job's ([`batch_place_of`]). A status is writable by others; what it records must not steer a launch
/// elsewhere, and a launch recorded before the pool changed is not the pool's any more. Why
/// not, otherwise.
pub fn replay(
    intent: &LaunchIntent,
    spec: &RunnerPoolSpec,
    template: &crate::api::LaunchTemplateRef,
    job_tags: &BTreeMap<String, String>,
    uid: &str,
) -> Result<LaunchRequest, String> {
    if (&intent.launch_template_id, intent.launch_template_version)
        != (&template.id, template.version)
    {
        return Err(format!(
            "it names launch template {} version {}, not the pool's {} version {}",
            intent.launch_template_id,
            intent.launch_template_version,
            template.id,
            template.version
        ));
    }
    let market_allowed = match (spec.capacity.capacity_type, intent.market.as_str()) {
        (CapacityType::Spot, "spot") => true,
        (CapacityType::Spot, "onDemand") => spec.capacity.fallback_to_on_demand,
        (CapacityType::OnDemand, "onDemand") => true,
        _ => false,
    };
    let offered = |o: &LaunchOffering| {
        spec.instance_types.contains(&o.instance_type) && spec.subnets.contains(&o.subnet)
    };
    if !market_allowed || intent.offerings.is_empty() || !intent.offerings.iter().all(offered) {
        return Err("its market or offerings are not the pool's".into());
    }
    if &intent.tags != job_tags || intent.client_token.is_empty() {
        return Err("it does not carry this job's tags and a token".into());
    }
    if intent.batch.is_some() {
        batch_place_of(intent, uid)?;
    }
    Ok(request_of(intent))
}

/// A tag value within EC2's limit: unchanged when it fits, else cut and ended with a digest
/// of the whole, so distinct values stay distinct. For values people read (`gha:runner_job`);
/// values Pacer matches on are refused by validation instead.
pub fn fit_tag_value(value: String) -> String {
    if value.chars().count() <= tags::MAX_VALUE_CHARS {
        return value;
    }
    let digest = Sha256::digest(value.as_bytes());
    let suffix: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let kept: String = value
        .chars()
        .take(tags::MAX_VALUE_CHARS - suffix.len() - 1)
        .collect();
    format!("{kept}-{suffix}")
}

/// The records of one valid batch, for tests: one per uid, in order, under a nonce of `seed`.
#[cfg(test)]
pub fn test_batch(uids: &[&str], seed: &[u8]) -> Vec<LaunchIntent> {
    let members: Vec<String> = uids.iter().map(|uid| format!("{uid}/1/1")).collect();
    let mut request = LaunchRequest {
        launch_template_id: "lt-1".into(),
        version: 1,
        offerings: vec![("m7g.large".into(), "subnet-a".into())],
        spot: false,
        fleet: true,
        tags: BTreeMap::new(),
        allocation_strategy: None,
        client_token: None,
        count: uids.len() as u32,
    };
    let token = batch_token(&members, &request.parameters(), seed);
    request.tags = batch_tags(&request.tags, &token);
    request.client_token = Some(token);
    (0..uids.len() as u32)
        .map(|member| batch_intent(&request, &members, member, seed))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(capacity: CapacityType, fallback: bool) -> RunnerPoolSpec {
        let text = include_str!("../../examples/runnerpool-org-spot.yaml");
        let mut spec = serde_saphyr::from_str::<crate::api::RunnerPool>(text)
            .unwrap()
            .spec;
        spec.capacity.capacity_type = capacity;
        spec.capacity.fallback_to_on_demand = fallback;
        spec.instance_types = vec!["m7i.large".into(), "m6i.large".into()];
        spec
    }

    #[test]
    fn spot_interruptions_open_the_breaker_for_a_while_and_only_where_on_demand_is_allowed() {
        let now: Timestamp = "2026-12-05T12:00:00Z".parse().unwrap();
        let ago = |m: i64| now - SignedDuration::from_mins(m);
        let s = spec(CapacityType::Spot, true);
        // The default breaker: 3 notices within 30 minutes, on-demand for 30 after the last.
        assert_eq!(on_demand_until(&s, vec![ago(5), ago(10)], now), None);
        let until = on_demand_until(&s, vec![ago(20), ago(5), ago(10)], now);
        assert_eq!(until, Some(ago(5) + SignedDuration::from_mins(30)));
        // Too far apart to count together, or long enough ago to be closed again.
        assert_eq!(
            on_demand_until(&s, vec![ago(70), ago(5), ago(10)], now),
            None
        );
        assert_eq!(
            on_demand_until(&s, vec![ago(50), ago(45), ago(40)], now),
            None
        );
        // Off, a pool that may not launch on-demand, and an on-demand pool: never open.
        let mut off = s.clone();
        off.capacity.interruption_breaker.notices = 0;
        let three = || vec![ago(3), ago(2), ago(1)];
        assert_eq!(on_demand_until(&off, three(), now), None);
        assert_eq!(
            on_demand_until(&spec(CapacityType::Spot, false), three(), now),
            None
        );
        assert_eq!(
            on_demand_until(&spec(CapacityType::OnDemand, false), three(), now),
            None
        );
        // It opens once, while the status still says it was closed; then it stays open.
        assert!(breaker_opened(None, now));
        assert!(breaker_opened(Some(ago(1)), now));
        assert!(!breaker_opened(until, now));
        // Open, a spot pool that may fall back launches on-demand only.
        let cache = CapacityCache::default();
        let paused = offerings(&s, &zones(), &cache, Instant::now(), true);
        assert!(!paused.is_empty() && paused.iter().all(|o| o.market == Market::OnDemand));
        let spot_only = spec(CapacityType::Spot, false);
        let kept = offerings(&spot_only, &zones(), &cache, Instant::now(), true);
        assert!(!kept.is_empty() && kept.iter().all(|o| o.market == Market::Spot));
        // With no on-demand capacity anywhere, spot is still tried rather than nothing.
        let mut short = CapacityCache::default();
        for t in ["m7i.large", "m6i.large"] {
            for zone in ["us-east-1a", "us-east-1b"] {
                short.mark_unavailable(Market::OnDemand, t, zone, Instant::now());
            }
        }
        let spot = offerings(&s, &zones(), &short, Instant::now(), true);
        assert!(!spot.is_empty() && spot.iter().all(|o| o.market == Market::Spot));
    }

    fn zones() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("subnet-0a1b2c3d4e5f60001".into(), "us-east-1a".into()),
            ("subnet-0a1b2c3d4e5f60002".into(), "us-east-1b".into()),
        ])
    }

    fn names(offerings: &[Offering]) -> Vec<String> {
        offerings
            .iter()
            .map(|o| format!("{:?}/{}/{}", o.market, o.instance_type, o.zone))
            .collect()
    }

    #[test]
    fn offerings_follow_the_pools_preference() {
        let now = Instant::now();
        let all = offerings(
            &spec(CapacityType::OnDemand, false),
            &zones(),
            &CapacityCache::default(),
            now,
            false,
        );
        assert_eq!(
            names(&all),
            [
                "OnDemand/m7i.large/us-east-1a",
                "OnDemand/m7i.large/us-east-1b",
                "OnDemand/m6i.large/us-east-1a",
                "OnDemand/m6i.large/us-east-1b"
            ]
        );
    }

    #[test]
    fn an_exhausted_type_is_skipped_for_three_minutes() {
        let now = Instant::now();
        let mut cache = CapacityCache::default();
        for zone in ["us-east-1a", "us-east-1b"] {
            cache.mark_unavailable(Market::Spot, "m7i.large", zone, now);
        }
        let s = spec(CapacityType::Spot, false);
        assert_eq!(
            names(&offerings(&s, &zones(), &cache, now, false)),
            ["Spot/m6i.large/us-east-1a", "Spot/m6i.large/us-east-1b"]
        );
        let later = now + UNAVAILABLE_FOR;
        assert_eq!(offerings(&s, &zones(), &cache, later, false).len(), 4);
        cache.prune(later);
        assert!(cache.until.is_empty());
    }

    #[test]
    fn spot_falls_back_to_on_demand_only_when_allowed_and_exhausted() {
        let now = Instant::now();
        let mut cache = CapacityCache::default();
        for t in ["m7i.large", "m6i.large"] {
            for zone in ["us-east-1a", "us-east-1b"] {
                cache.mark_unavailable(Market::Spot, t, zone, now);
            }
        }
        assert!(
            offerings(
                &spec(CapacityType::Spot, false),
                &zones(),
                &cache,
                now,
                false
            )
            .is_empty()
        );
        let fallback = offerings(
            &spec(CapacityType::Spot, true),
            &zones(),
            &cache,
            now,
            false,
        );
        assert!(fallback.iter().all(|o| o.market == Market::OnDemand) && fallback.len() == 4);
        // With spot left, no on-demand offering is tried.
        let fresh = offerings(
            &spec(CapacityType::Spot, true),
            &zones(),
            &CapacityCache::default(),
            now,
            false,
        );
        assert!(fresh.iter().all(|o| o.market == Market::Spot));
    }

    #[test]
    fn a_single_spot_launch_goes_to_the_cheapest_zone_of_the_first_type() {
        let now = Instant::now();
        let s = spec(CapacityType::Spot, false);
        let mut all = offerings(&s, &zones(), &CapacityCache::default(), now, false);
        let prices = HashMap::from([
            ("us-east-1a".to_string(), 0.041),
            ("us-east-1b".to_string(), 0.029),
        ]);
        cheapest_zone_first(&mut all, &prices);
        assert_eq!(
            names(&all),
            [
                "Spot/m7i.large/us-east-1b",
                "Spot/m7i.large/us-east-1a",
                "Spot/m6i.large/us-east-1a",
                "Spot/m6i.large/us-east-1b"
            ]
        );
        // An unknown price goes last; no prices at all keep the pool's order.
        let mut all = offerings(&s, &zones(), &CapacityCache::default(), now, false);
        cheapest_zone_first(&mut all, &HashMap::from([("us-east-1b".to_string(), 0.05)]));
        assert_eq!(all[0].zone, "us-east-1b");
        let mut all = offerings(&s, &zones(), &CapacityCache::default(), now, false);
        cheapest_zone_first(&mut all, &HashMap::new());
        assert_eq!(all[0].zone, "us-east-1a");
        // On-demand has no spot price to follow.
        let mut on_demand = offerings(
            &spec(CapacityType::OnDemand, false),
            &zones(),
            &CapacityCache::default(),
            now,
            false,
        );
        cheapest_zone_first(&mut on_demand, &prices);
        assert_eq!(on_demand[0].zone, "us-east-1a");
    }

    #[test]
    fn backoff_doubles_from_30_seconds_to_5_minutes() {
        let secs: Vec<u64> = (1..=7).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 300, 300, 300]);
    }

    #[test]
    fn a_recorded_launch_is_sent_again_as_it_was_and_only_for_its_job() {
        let job_tags = BTreeMap::from([
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
            (tags::CONTROLLER.to_string(), "prod".to_string()),
            (tags::POOL.to_string(), "ci/linux".to_string()),
            (RUNNER_JOB_UID.to_string(), "uid-1".to_string()),
            (JOB_ID.to_string(), "42".to_string()),
            ("team".to_string(), "build".to_string()),
        ]);
        let request = LaunchRequest {
            launch_template_id: "lt-1".into(),
            version: 3,
            offerings: vec![("m7g.large".into(), "subnet-a".into())],
            spot: true,
            fleet: true,
            tags: job_tags.clone(),
            allocation_strategy: Some("price-capacity-optimized".into()),
            client_token: Some("pacer-abc".into()),
            count: 1,
        };
        let intent = intent(&request);
        let mut pool = spec(CapacityType::Spot, false);
        pool.instance_types = vec!["m7g.large".into()];
        pool.subnets = vec!["subnet-a".into()];
        let template = |id: &str, version| crate::api::LaunchTemplateRef {
            id: id.into(),
            version,
        };
        let current = template("lt-1", 3);
        // The same request, token and all: EC2 answers it with the instance it made.
        assert_eq!(
            replay(&intent, &pool, &current, &job_tags, "uid-1"),
            Ok(request)
        );
        // What no longer fits is not sent: another template or version, other tags (the
        // pool's or another job's), an offering or a market the pool does not allow, no token.
        for template in [template("lt-2", 3), template("lt-1", 4)] {
            assert!(replay(&intent, &pool, &template, &job_tags, "uid-1").is_err());
        }
        for (key, value) in [("team", "infra"), (RUNNER_JOB_UID, "uid-2")] {
            let mut other = job_tags.clone();
            other.insert(key.into(), value.into());
            assert!(replay(&intent, &pool, &current, &other, "uid-1").is_err());
        }
        let mut bigger = intent.clone();
        bigger.offerings[0].instance_type = "p5.48xlarge".into();
        assert!(replay(&bigger, &pool, &current, &job_tags, "uid-1").is_err());
        let mut elsewhere = intent.clone();
        elsewhere.offerings[0].subnet = "subnet-z".into();
        assert!(replay(&elsewhere, &pool, &current, &job_tags, "uid-1").is_err());
        let mut on_demand = intent.clone();
        on_demand.market = "onDemand".into();
        assert!(replay(&on_demand, &pool, &current, &job_tags, "uid-1").is_err());
        let mut tokenless = intent.clone();
        tokenless.client_token.clear();
        assert!(replay(&tokenless, &pool, &current, &job_tags, "uid-1").is_err());
    }

    #[test]
    fn a_batch_is_replayed_whole_and_each_member_finds_the_same_instance() {
        let pool_tags = BTreeMap::from([
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
            (tags::CONTROLLER.to_string(), "prod".to_string()),
            (tags::POOL.to_string(), "ci/linux".to_string()),
        ]);
        let members: Vec<String> = ["uid-1/1/1", "uid-2/1/1", "uid-3/2/1"]
            .map(Into::into)
            .into();
        let mut request = LaunchRequest {
            launch_template_id: "lt-1".into(),
            version: 3,
            offerings: vec![("m7g.large".into(), "subnet-a".into())],
            spot: false,
            fleet: false,
            tags: pool_tags.clone(),
            allocation_strategy: None,
            client_token: None,
            count: 3,
        };
        let nonce = b"n1";
        let token = batch_token(&members, &request.parameters(), nonce);
        assert!(token.len() <= 64 && token.is_ascii());
        // Other members, the same ones asking for something else, or again: another launch.
        assert_ne!(
            token,
            batch_token(&members[..2], &request.parameters(), nonce)
        );
        let mut fewer = request.clone();
        fewer.count = 2;
        assert_ne!(token, batch_token(&members, &fewer.parameters(), nonce));
        assert_ne!(token, batch_token(&members, &request.parameters(), b"n2"));
        request.tags = batch_tags(&pool_tags, &token);
        request.client_token = Some(token.clone());
        let mut pool = spec(CapacityType::OnDemand, false);
        pool.instance_types = vec!["m7g.large".into()];
        pool.subnets = vec!["subnet-a".into()];
        let template = crate::api::LaunchTemplateRef {
            id: "lt-1".into(),
            version: 3,
        };
        let tags = batch_tags(&pool_tags, &token);
        for (member, uid) in ["uid-1", "uid-2", "uid-3"].into_iter().enumerate() {
            let intent = batch_intent(&request, &members, member as u32, nonce);
            // Every member sends the whole batch again, under its token.
            assert_eq!(
                replay(&intent, &pool, &template, &tags, uid),
                Ok(request.clone())
            );
            // Not another job: a place copied from a member's status is that member's.
            assert!(replay(&intent, &pool, &template, &tags, "uid-9").is_err());
            // Not with a job's tags or another batch's token.
            assert!(replay(&intent, &pool, &template, &pool_tags, uid).is_err());
            let other = batch_tags(&pool_tags, "pacer-bother");
            assert!(replay(&intent, &pool, &template, &other, uid).is_err());
        }
        // A recorded batch made up or changed does not pass: another job written in at a
        // place (the token no longer its digest), a size other than its members, a place
        // outside it, more than the bound.
        let forged = |uid: &str, change: &dyn Fn(&mut LaunchBatch)| {
            let mut intent = batch_intent(&request, &members, 0, nonce);
            change(intent.batch.as_mut().unwrap());
            batch_place_of(&intent, uid)
        };
        assert_eq!(forged("uid-1", &|_| {}), Ok(()));
        assert!(forged("uid-9", &|b| b.members[0] = "uid-9/1/1".into()).is_err());
        assert!(forged("uid-1", &|b| b.size = 4).is_err());
        assert!(forged("uid-1", &|b| b.nonce = "zz".into()).is_err());
        assert!(forged("uid-1", &|b| b.nonce = "6e32".into()).is_err());
        let many: Vec<String> = (0..=MAX_BATCH).map(|i| format!("uid-{i}/1/1")).collect();
        let too_many = |b: &mut LaunchBatch| {
            b.members = many.clone();
            b.size = many.len() as u32;
            b.member = 1;
        };
        assert!(forged("uid-1", &too_many).is_err());
        // The answer sorted by id: the same instance for a member however EC2 ordered it, none
        // past what it launched.
        let instance = |id: &str| Instance {
            id: id.into(),
            instance_type: "m7g.large".into(),
            zone: "us-east-1a".into(),
            spot: false,
            state: "pending".into(),
            state_reason: None,
            launch_time: None,
            tags: request.tags.clone(),
        };
        let answer = [instance("i-3"), instance("i-1"), instance("i-2")];
        let mut again = answer.clone();
        again.reverse();
        for member in 0..3 {
            let id = member_instance(&answer, member).map(|i| i.id.clone());
            assert_eq!(id, Some(format!("i-{}", member + 1)));
            assert_eq!(id, member_instance(&again, member).map(|i| i.id.clone()));
        }
        assert_eq!(member_instance(&answer[..2], 2), None);
    }

    #[test]
    fn client_tokens_are_stable_per_attempt_and_fit_ec2() {
        let a = client_token("5f1c-uid", 1, 1, "offering=m7i.large@subnet-1");
        assert_eq!(
            a,
            client_token("5f1c-uid", 1, 1, "offering=m7i.large@subnet-1")
        );
        assert_ne!(
            a,
            client_token("5f1c-uid", 1, 2, "offering=m7i.large@subnet-1")
        );
        assert_ne!(
            a,
            client_token("other-uid", 1, 1, "offering=m7i.large@subnet-1")
        );
        // Another request in the same attempt (the next offering, on-demand) is another launch.
        assert_ne!(
            a,
            client_token("5f1c-uid", 1, 1, "offering=m6i.large@subnet-1")
        );
        // A new instance attempt of the job never replays an earlier attempt's launch.
        assert_ne!(
            a,
            client_token("5f1c-uid", 2, 1, "offering=m7i.large@subnet-1")
        );
        assert!(a.len() <= 64 && a.is_ascii());
    }

    #[test]
    fn allocation_strategies_are_spelled_as_ec2_takes_them_per_market() {
        use AllocationStrategy as S;
        let cases = [
            (None, Market::Spot, "price-capacity-optimized"),
            (
                Some(S::CapacityOptimized),
                Market::Spot,
                "capacity-optimized",
            ),
            (Some(S::LowestPrice), Market::Spot, "lowest-price"),
            (
                Some(S::Prioritized),
                Market::Spot,
                "capacity-optimized-prioritized",
            ),
            (None, Market::OnDemand, "lowest-price"),
            (Some(S::Prioritized), Market::OnDemand, "prioritized"),
            // A spot pool falling back to on-demand cannot send a spot-only strategy.
            (Some(S::CapacityOptimized), Market::OnDemand, "lowest-price"),
        ];
        for (chosen, market, expected) in cases {
            let capacity = Capacity {
                allocation_strategy: chosen,
                ..Capacity::default()
            };
            assert_eq!(
                allocation_strategy(&capacity, market),
                expected,
                "{chosen:?} {market:?}"
            );
        }
    }

    #[test]
    fn every_instance_tag_fits_ec2_even_for_the_longest_names() {
        fn job<'a>(namespace: &'a str, name: &'a str) -> JobIdentity<'a> {
            JobIdentity {
                namespace,
                name,
                uid: "uid",
                job_id: 1,
                repository: "example-org/api",
            }
        }
        let pool = BTreeMap::from([(tags::MANAGED_BY.into(), tags::MANAGED_BY_VALUE.into())]);
        let (ns, name, other) = ("n".repeat(63), "j".repeat(253), "k".repeat(253));
        let long = instance_tags(&pool, &job(&ns, &name));
        assert_eq!(tags::check(&long), Ok(()));
        let other = instance_tags(&pool, &job(&ns, &other));
        assert_ne!(long[RUNNER_JOB], other[RUNNER_JOB]);
        // Short values are left as they are.
        assert_eq!(
            instance_tags(&pool, &job(&ns, "job-1"))[RUNNER_JOB],
            format!("{ns}/job-1")
        );
    }

    #[test]
    fn instance_tags_tie_the_instance_to_its_job() {
        let pool = BTreeMap::from([
            ("gha:managed-by".to_string(), "pacer".to_string()),
            ("gha:controller".to_string(), "prod".to_string()),
            ("team".to_string(), "platform".to_string()),
        ]);
        let job = JobIdentity {
            namespace: "ci",
            name: "job-1",
            uid: "uid-1",
            job_id: 42,
            repository: "o/r",
        };
        let tags = instance_tags(&pool, &job);
        assert_eq!(tags[RUNNER_JOB], "ci/job-1");
        assert_eq!(tags[RUNNER_JOB_UID], "uid-1");
        assert_eq!(tags[JOB_ID], "42");
        assert_eq!(tags[REPO], "o/r");
        assert_eq!(tags["team"], "platform");
    }
}
