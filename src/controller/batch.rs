//! Batched launches: the jobs of one pool that become launchable within a short window are
//! launched by one call. Each member records the batch's launch (its token, request and every
//! member) in its own status before the call goes out; the call goes once, and every member
//! takes the instance at its place in EC2's answer sorted by id (see
//! [`crate::domain::launch::member_instance`]). A member that asks again (after a restart, or
//! when the answer was lost) sends the recorded batch again under its token: EC2 answers with
//! the same instances, and concurrent askers share one call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OnceCell, watch};
use tokio::time::Instant;

use crate::api::LaunchIntent;
use crate::cloud::{CloudResult, Ec2, LaunchOutcome, LaunchRequest};

/// How long an answer stays shared with members that ask after it came.
const ANSWER_KEPT: Duration = Duration::from_secs(60);

/// How long a member's place in a sent batch is kept for its next pass when its record failed:
/// a minute less than the garbage collector leaves a batch's instance unclaimed
/// ([`crate::domain::gc::BATCH_GRACE`]), for the write and the call that take it again.
const PLACE_KEPT: Duration = Duration::from_secs(120);

/// Longest a member waits for the others to record the batch before it is sent anyway: a
/// member that recorded nothing and keeps no place does not claim its instance, which the
/// garbage collector terminates.
const RECORD_WAIT: Duration = Duration::from_secs(30);

/// Open batches by pool, and launch calls by token.
#[derive(Default)]
pub struct Batches {
    open: Mutex<HashMap<String, Arc<Batch>>>,
    flights: Mutex<HashMap<String, (Instant, Flight)>>,
    /// Places in sent batches whose member failed to record them, by member: its next pass
    /// records the same place and takes the instance made for it, rather than launching
    /// another.
    kept: Mutex<HashMap<String, (Instant, LaunchIntent, LaunchRequest)>>,
    /// Places in batches that their members recorded, by `namespace/pool/member`: the record
    /// and the place in it, as the cache showed them when first asked, and when that was. What
    /// a member whose own record was lost with the process that sent its batch (killed between
    /// the call and the record) takes again.
    recorded: std::sync::OnceLock<(k8s_openapi::jiff::Timestamp, RecordedPlaces)>,
    /// Members given their recorded place already: each is given once.
    given: Mutex<std::collections::HashSet<String>>,
}

/// Batch records by `namespace/pool/member`, with the member's place in each.
pub type RecordedPlaces = HashMap<String, (Arc<LaunchIntent>, u32)>;

/// The places that batch records name, by `pool/member` (`pool` as `namespace/name`): each
/// record given as its job's pool, the record and when it was recorded. A member found in two
/// records (left without an instance by one batch, it went into the next) takes its place in
/// the one recorded last.
pub fn places_of(
    records: impl IntoIterator<Item = (String, LaunchIntent, Option<k8s_openapi::jiff::Timestamp>)>,
) -> RecordedPlaces {
    let mut places: HashMap<String, (Arc<LaunchIntent>, u32, _)> = HashMap::new();
    for (pool, intent, at) in records {
        let record = Arc::new(intent);
        let Some(batch) = record.batch.as_ref() else {
            continue;
        };
        for (place, member) in batch.members.iter().enumerate() {
            let key = format!("{pool}/{member}");
            if places.get(&key).is_none_or(|(_, _, then)| *then < at) {
                places.insert(key, (record.clone(), place as u32, at));
            }
        }
    }
    (places.into_iter())
        .map(|(key, (record, place, _))| (key, (record, place)))
        .collect()
}

/// One launch call and its answer, shared by the members that ask for it.
type Flight = Arc<OnceCell<CloudResult<LaunchOutcome>>>;

/// Jobs of one pool gathering for one launch.
pub struct Batch {
    closes: Instant,
    max: usize,
    members: Mutex<Members>,
    full: tokio::sync::Notify,
    /// Part of the batch's token: no later batch of the same jobs has the same one.
    nonce: [u8; 16],
    /// The request, planned once for every member; `None` when no offering had capacity.
    plan: OnceCell<Option<LaunchRequest>>,
    /// Members done recording (or failing to).
    recorded: watch::Sender<usize>,
}

#[derive(Default)]
struct Members {
    list: Vec<String>,
    /// Set by the first member to read the list once the batch is full or its window past.
    closed: bool,
}

/// A job's place in a batch that has closed.
pub struct Joined {
    pub batch: Arc<Batch>,
    /// Every member, in order: `uid/instance attempt/launch attempt` each.
    pub members: Vec<String>,
    pub member: u32,
    reported: bool,
}

impl Batches {
    /// Joins `member` (`uid/instance attempt/launch attempt`) to the open batch of `pool`, or
    /// opens one; returns once the batch has closed: `window` after it opened, or when it has
    /// `max` members.
    pub async fn join(&self, pool: &str, member: String, window: Duration, max: usize) -> Joined {
        let mut joined = {
            let mut open = self.open.lock().unwrap();
            let now = Instant::now();
            let fresh = || {
                let mut nonce = [0u8; 16];
                if aws_lc_rs::rand::fill(&mut nonce).is_err() {
                    let now = k8s_openapi::jiff::Timestamp::now();
                    nonce = now.as_nanosecond().to_le_bytes();
                }
                Arc::new(Batch {
                    closes: now + window,
                    max: max.max(1),
                    members: Mutex::default(),
                    full: Default::default(),
                    nonce,
                    plan: OnceCell::new(),
                    recorded: watch::Sender::new(0),
                })
            };
            let mut batch = open.get(pool).cloned().unwrap_or_else(fresh);
            // Checked and joined under one lock: a batch closed meanwhile takes no one.
            let mut members = batch.members.lock().unwrap();
            if members.closed || batch.closes <= now || members.list.len() >= batch.max {
                drop(members);
                batch = fresh();
                members = batch.members.lock().unwrap();
            }
            members.list.push(member);
            let index = members.list.len() - 1;
            if members.list.len() >= batch.max {
                members.closed = true;
                batch.full.notify_waiters();
            }
            drop(members);
            open.insert(pool.to_string(), batch.clone());
            // From here on, a pass that ends (or is cancelled) tells the others it is done.
            Joined {
                batch,
                members: Vec::new(),
                member: index as u32,
                reported: false,
            }
        };
        let batch = joined.batch.clone();
        {
            let full = batch.full.notified();
            tokio::pin!(full);
            full.as_mut().enable();
            if !batch.members.lock().unwrap().closed {
                tokio::select! {
                    _ = tokio::time::sleep_until(batch.closes) => {}
                    _ = full => {}
                }
            }
        }
        // Closed by whoever reads it first: no one joins it after that, so every member reads
        // the same list.
        joined.members = {
            let mut m = batch.members.lock().unwrap();
            m.closed = true;
            m.list.clone()
        };
        joined
    }

    /// Sends `request` (a batch's, under its token) once for every member asking now or
    /// within a minute of the answer. An error is shared only with those who asked with it:
    /// the next to ask sends again.
    pub async fn send(&self, ec2: &dyn Ec2, request: &LaunchRequest) -> CloudResult<LaunchOutcome> {
        // EC2 answers a token again only for the same parameters: so does this.
        let token = format!(
            "{}\n{}",
            request.client_token.as_deref().unwrap_or_default(),
            request.parameters()
        );
        let cell = {
            let mut flights = self.flights.lock().unwrap();
            let now = Instant::now();
            flights.retain(|_, (at, cell)| {
                !cell.initialized() || now.duration_since(*at) < ANSWER_KEPT
            });
            flights
                .entry(token.clone())
                .or_insert_with(|| (now, Arc::default()))
                .1
                .clone()
        };
        let answer = cell.get_or_init(|| ec2.launch(request)).await.clone();
        let mut flights = self.flights.lock().unwrap();
        match &answer {
            Err(_) => {
                if flights
                    .get(&token)
                    .is_some_and(|(_, c)| Arc::ptr_eq(c, &cell))
                {
                    flights.remove(&token);
                }
            }
            Ok(_) => {
                if let Some((at, c)) = flights.get_mut(&token)
                    && Arc::ptr_eq(c, &cell)
                {
                    *at = Instant::now();
                }
            }
        }
        answer
    }
}

impl Batches {
    /// Keeps `member`'s place (its record `intent` of `request`) for its next pass.
    pub fn keep(&self, member: &str, intent: &LaunchIntent, request: &LaunchRequest) {
        let mut kept = self.kept.lock().unwrap();
        let now = Instant::now();
        kept.retain(|_, (at, _, _)| now.duration_since(*at) < PLACE_KEPT);
        kept.insert(member.to_string(), (now, intent.clone(), request.clone()));
    }

    /// The place in a batch that its other members recorded for `member` (as
    /// `namespace/pool/member`), a job created at `created`: only for a job older than the first
    /// ask (`recorded` reads the cache's statuses, once), since this process keeps the places
    /// of the jobs it saw itself.
    pub fn recorded_place(
        &self,
        member: &str,
        created: k8s_openapi::jiff::Timestamp,
        recorded: impl FnOnce() -> RecordedPlaces,
    ) -> Option<LaunchIntent> {
        let (read_at, places) = self
            .recorded
            .get_or_init(|| (k8s_openapi::jiff::Timestamp::now(), recorded()));
        let (intent, place) = places.get(member).filter(|_| created < *read_at)?;
        if self.given.lock().unwrap().contains(member) {
            return None;
        }
        let mut theirs = LaunchIntent::clone(intent);
        if let Some(batch) = theirs.batch.as_mut() {
            batch.member = *place;
        }
        Some(theirs)
    }

    /// [`Batches::recorded_place`], given to `member` once: asked again (EC2 made it no
    /// instance, say), it finds none; a record of it that fails is kept ([`Batches::keep`]).
    pub fn take_recorded_place(
        &self,
        member: &str,
        created: k8s_openapi::jiff::Timestamp,
        recorded: impl FnOnce() -> RecordedPlaces,
    ) -> Option<LaunchIntent> {
        let place = self.recorded_place(member, created, recorded)?;
        self.given.lock().unwrap().insert(member.to_string());
        Some(place)
    }

    /// Whether this process keeps a place for `member` (see [`Batches::kept`]), left in place.
    pub fn has_kept(&self, member: &str) -> bool {
        let kept = self.kept.lock().unwrap();
        kept.get(member)
            .is_some_and(|(at, _, _)| at.elapsed() < PLACE_KEPT)
    }

    /// The place kept for `member` within [`PLACE_KEPT`], given up to it.
    pub fn kept(&self, member: &str) -> Option<(LaunchIntent, LaunchRequest)> {
        let (at, intent, request) = self.kept.lock().unwrap().remove(member)?;
        (at.elapsed() < PLACE_KEPT).then_some((intent, request))
    }
}

impl Joined {
    /// The batch's nonce, part of its token.
    pub fn nonce(&self) -> &[u8] {
        &self.batch.nonce
    }

    /// The batch's request, planned by the first member to ask (by the next, when planning
    /// failed).
    pub async fn plan<F, E>(&self, plan: F) -> Result<Option<LaunchRequest>, E>
    where
        F: Future<Output = Result<Option<LaunchRequest>, E>>,
    {
        self.batch.plan.get_or_try_init(|| plan).await.cloned()
    }

    /// Says this member is done recording the batch, whether its write went through or not.
    pub fn recorded(&mut self) {
        if !self.reported {
            self.reported = true;
            self.batch.recorded.send_modify(|n| *n += 1);
        }
    }

    /// Waits until every member has recorded the batch (or failed to), at most [`RECORD_WAIT`].
    pub async fn all_recorded(&self) {
        let size = self.members.len();
        let mut seen = self.batch.recorded.subscribe();
        let _ = tokio::time::timeout(RECORD_WAIT, seen.wait_for(|n| *n >= size)).await;
    }
}

impl Drop for Joined {
    /// A member whose pass ends before it recorded the batch does not hold the others up.
    fn drop(&mut self) {
        self.recorded();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_of_a_pool_within_the_window_join_one_batch_and_the_next_open_another() {
        let batches = Arc::new(Batches::default());
        let join = |pool: &'static str, member: &'static str| {
            let batches = batches.clone();
            tokio::spawn(async move {
                let j = batches
                    .join(pool, member.into(), Duration::from_secs(1), 3)
                    .await;
                (j.members.clone(), j.member)
            })
        };
        let a = join("ns/linux", "a");
        let other = join("ns/arm", "x");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = join("ns/linux", "b");
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Full at three: it closes at once, and the fourth opens the next batch.
        let c = join("ns/linux", "c");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let d = join("ns/linux", "d");
        let abc: Vec<String> = ["a", "b", "c"].map(Into::into).into();
        assert_eq!(a.await.unwrap(), (abc.clone(), 0));
        assert_eq!(b.await.unwrap(), (abc.clone(), 1));
        assert_eq!(c.await.unwrap(), (abc, 2));
        assert_eq!(other.await.unwrap(), (vec!["x".to_string()], 0));
        assert_eq!(d.await.unwrap(), (vec!["d".to_string()], 0));
        // Past its window, a batch takes no one: a new one opens.
        let e = join("ns/linux", "e");
        assert_eq!(e.await.unwrap(), (vec!["e".to_string()], 0));
    }

    #[test]
    fn a_place_recorded_by_the_other_members_goes_to_a_job_older_than_the_first_ask() {
        use k8s_openapi::jiff::Timestamp;
        let batches = Batches::default();
        let before = Timestamp::now() - std::time::Duration::from_secs(60);
        let mut reads = 0;
        let intent = crate::domain::launch::test_batch(&["uid-1", "uid-2"], b"n")[0].clone();
        let mut read = || {
            reads += 1;
            let record = Arc::new(intent.clone());
            HashMap::from([("ci/linux/uid-2/1/1".to_string(), (record, 1))])
        };
        let place = batches.recorded_place("ci/linux/uid-2/1/1", before, &mut read);
        let place = place.and_then(|p| p.batch).map(|b| b.member);
        assert_eq!(place, Some(1), "the member's own place in the record");
        assert_eq!(
            batches.recorded_place("ci/linux/uid-3/1/1", before, &mut read),
            None
        );
        assert_eq!(
            batches.recorded_place("ci/other/uid-2/1/1", before, &mut read),
            None
        );
        // A job made since is this process's own: the places it keeps are its.
        let later = Timestamp::now() + std::time::Duration::from_secs(1);
        assert_eq!(
            batches.recorded_place("ci/linux/uid-2/1/1", later, &mut read),
            None
        );
        // Given once: asked again, the member has no recorded place left.
        assert!((batches.take_recorded_place("ci/linux/uid-2/1/1", before, &mut read)).is_some());
        assert_eq!(
            batches.recorded_place("ci/linux/uid-2/1/1", before, &mut read),
            None
        );
        assert_eq!(reads, 1, "the cache is read once");
    }

    #[test]
    fn a_member_in_two_batch_records_takes_its_place_in_the_later_one() {
        use k8s_openapi::jiff::Timestamp;
        let first = crate::domain::launch::test_batch(&["uid-1", "uid-2"], b"one")[0].clone();
        let next = crate::domain::launch::test_batch(&["uid-3", "uid-2"], b"two")[0].clone();
        let (then, now) = (Timestamp::UNIX_EPOCH, Timestamp::now());
        for records in [
            vec![(first.clone(), then), (next.clone(), now)],
            vec![(next.clone(), now), (first.clone(), then)],
        ] {
            let records =
                (records.into_iter()).map(|(r, at)| ("ci/linux".to_string(), r, Some(at)));
            let places = places_of(records);
            let (record, place) =
                &places[&format!("ci/linux/{}", next.batch.as_ref().unwrap().members[1])];
            assert_eq!(
                (record.client_token.as_str(), *place),
                (next.client_token.as_str(), 1)
            );
            assert_eq!(places.len(), 3, "{places:?}");
        }
    }

    #[tokio::test]
    async fn members_asking_together_share_one_launch_call() {
        let (ec2, mut request) = crate::cloud::fake::tests::fleet_of("c").await;
        let ec2 = Arc::new(ec2.with_latency(Duration::from_millis(50)));
        let batches = Arc::new(Batches::default());
        request.client_token = Some("pacer-b1".into());
        request.count = 3;
        let asks = (0..3).map(|_| {
            let (ec2, batches, request) = (ec2.clone(), batches.clone(), request.clone());
            tokio::spawn(async move { batches.send(ec2.as_ref(), &request).await.unwrap() })
        });
        let answers = futures::future::join_all(asks).await;
        let first = answers[0].as_ref().unwrap().instances.clone();
        assert_eq!(first.len(), 3);
        for answer in &answers {
            assert_eq!(answer.as_ref().unwrap().instances, first);
        }
        assert_eq!(ec2.count("CreateFleet"), 1);
        // Asked again later: the kept answer.
        let again = batches.send(ec2.as_ref(), &request).await.unwrap();
        assert_eq!(again.instances, first);
        assert_eq!(ec2.count("CreateFleet"), 1);
    }
}
