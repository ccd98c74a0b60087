//! What this process asked of EC2 that EC2's listings may not show yet: launches (answered, or
//! still unsettled) and terminations. DescribeInstances is eventually consistent and shared
//! across passes, so a pass trusts the ledger for its own recent calls, and sends each
//! instance one TerminateInstances, batched with the other jobs' that finish together.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::sync::oneshot;

use super::Context;
use crate::cloud::{CloudError, CloudResult, Instance};

/// How long terminations wait for others to join their TerminateInstances call.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// The most instance ids EC2 takes in one TerminateInstances call.
const BATCH_MAX: usize = 1000;

type Waiter = oneshot::Sender<CloudResult<()>>;

#[derive(Default)]
pub struct Ledger {
    /// Instances launched by this process (their ids), by RunnerJob uid, and when the answer
    /// came.
    launched: Mutex<HashMap<String, (String, Timestamp)>>,
    /// Launch calls whose answer is not in (in flight, or lost to a transport error), by
    /// RunnerJob uid, and when they were sent: EC2 may have launched for them.
    unsettled: Mutex<HashMap<String, Timestamp>>,
    /// The ClientToken of the last launch for each RunnerJob uid that EC2 answered with a
    /// definite no (no capacity, a missing template, a refusal): it made no instance.
    refused: Mutex<HashMap<String, String>>,
    /// Terminations sent, by instance id, and when.
    terminated: Mutex<HashMap<String, Timestamp>>,
    /// Terminations waiting for the next TerminateInstances call.
    batch: Mutex<Vec<(String, Waiter)>>,
}

impl Ledger {
    pub fn launch_sent(&self, uid: &str, now: Timestamp) {
        self.unsettled.lock().unwrap().insert(uid.into(), now);
    }

    /// The launch call for `uid` was answered: with an instance, or with a definite no.
    pub fn launch_answered(&self, uid: &str, instance: Option<&Instance>, now: Timestamp) {
        self.unsettled.lock().unwrap().remove(uid);
        if let Some(instance) = instance {
            // Kept for every live job: the id is all a pass needs.
            self.launched
                .lock()
                .unwrap()
                .insert(uid.into(), (instance.id.clone(), now));
        }
    }

    /// The id of the instance this process launched for `uid`, and when the launch was
    /// answered.
    pub fn launched(&self, uid: &str) -> Option<(String, Timestamp)> {
        self.launched.lock().unwrap().get(uid).cloned()
    }

    /// EC2 answered the launch for `uid` under `token` with a definite no.
    pub fn launch_refused(&self, uid: &str, token: &str) {
        self.unsettled.lock().unwrap().remove(uid);
        self.refused
            .lock()
            .unwrap()
            .insert(uid.into(), token.into());
    }

    /// Whether EC2 refused the launch for `uid` under `token`, as this process heard.
    pub fn was_refused(&self, uid: &str, token: &str) -> bool {
        self.refused
            .lock()
            .unwrap()
            .get(uid)
            .is_some_and(|t| t == token)
    }

    /// When an unanswered launch call for `uid` was sent.
    pub fn unsettled_since(&self, uid: &str) -> Option<Timestamp> {
        self.unsettled.lock().unwrap().get(uid).copied()
    }

    /// Forgets a job whose instance is gone and whose object is going.
    pub fn forget(&self, uid: &str) {
        self.unsettled.lock().unwrap().remove(uid);
        self.refused.lock().unwrap().remove(uid);
        if let Some((id, _)) = self.launched.lock().unwrap().remove(uid) {
            self.terminated.lock().unwrap().remove(&id);
        }
    }

    /// Forgets the terminations of `ids`: their job is going. (An instance launched by an
    /// earlier process is not among this one's launches, so [`Ledger::forget`] cannot find it.)
    pub fn forget_terminations<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut terminated = self.terminated.lock().unwrap();
        for id in ids {
            terminated.remove(id);
        }
    }

    /// Whether EC2 accepted a TerminateInstances of `id` from this process that a listing
    /// taken at `listed_at` may not show yet: sent no more than `settle` before it. EC2 answers
    /// such a call with the instance shutting down, never to run again.
    pub fn terminating(&self, id: &str, listed_at: Timestamp, settle: Duration) -> bool {
        self.terminated.lock().unwrap().get(id).is_some_and(|sent| {
            listed_at.duration_since(*sent).unsigned_abs() <= settle || listed_at < *sent
        })
    }

    /// Whether a TerminateInstances for `id` should go out now: never sent, or sent before
    /// `listed_at` by more than `settle` (a listing taken that long after still shows the
    /// instance alive, so the first did not take).
    fn should_terminate(&self, id: &str, listed_at: Timestamp, settle: Duration) -> bool {
        self.terminated.lock().unwrap().get(id).is_none_or(|sent| {
            listed_at.duration_since(*sent).unsigned_abs() > settle && listed_at > *sent
        })
    }

    /// Terminates `id` once: a repeat only when a listing taken `settle` after the first call
    /// still shows it alive. Calls from passes that finish together share one
    /// TerminateInstances.
    pub async fn terminate(
        &self,
        ctx: &Context,
        id: &str,
        listed_at: Timestamp,
        settle: Duration,
    ) -> CloudResult<bool> {
        if !self.should_terminate(id, listed_at, settle) {
            return Ok(false);
        }
        let (tx, rx) = oneshot::channel();
        let leads = {
            let mut batch = self.batch.lock().unwrap();
            batch.push((id.to_string(), tx));
            batch.len() == 1
        };
        if leads {
            tokio::time::sleep(BATCH_WINDOW).await;
            let batch = std::mem::take(&mut *self.batch.lock().unwrap());
            self.send(ctx, batch).await;
        }
        let result = rx.await.unwrap_or_else(|_| {
            Err(CloudError::new(
                "TerminateInstances",
                "Abandoned",
                "the batch was dropped before its call",
            ))
        });
        result.map(|()| true)
    }

    async fn send(&self, ctx: &Context, batch: Vec<(String, Waiter)>) {
        let mut rest = batch;
        while !rest.is_empty() {
            let chunk: Vec<(String, Waiter)> = rest.drain(..rest.len().min(BATCH_MAX)).collect();
            let mut ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
            ids.sort();
            ids.dedup();
            let now = Timestamp::now();
            // One bad id fails the whole call: then each goes alone, so one job's problem is
            // not every job's.
            let results: HashMap<String, CloudResult<()>> =
                crate::cloud::terminate_each(ctx.ec2(), &ids)
                    .await
                    .into_iter()
                    .collect();
            {
                let mut sent = self.terminated.lock().unwrap();
                for (id, _) in results.iter().filter(|(_, r)| r.is_ok()) {
                    sent.insert(id.clone(), now);
                }
            }
            for (id, waiter) in chunk {
                let _ = waiter.send(results[&id].clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_termination_repeats_only_when_a_later_listing_still_shows_the_instance() {
        let ledger = Ledger::default();
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let settle = Duration::from_secs(30);
        let at = |s: i64| Timestamp::from_second(1_000_000 + s).unwrap();
        assert!(ledger.should_terminate("i-1", t0, settle));
        ledger.terminated.lock().unwrap().insert("i-1".into(), t0);
        assert!(
            !ledger.should_terminate("i-1", at(-5), settle),
            "listing from before"
        );
        assert!(
            !ledger.should_terminate("i-1", at(10), settle),
            "EC2 may not show it yet"
        );
        assert!(
            ledger.should_terminate("i-1", at(31), settle),
            "it did not take"
        );
    }

    #[test]
    fn launches_are_unsettled_until_answered_and_forgotten_with_their_job() {
        let ledger = Ledger::default();
        let now = Timestamp::from_second(1_000_000).unwrap();
        ledger.launch_sent("uid", now);
        assert_eq!(ledger.unsettled_since("uid"), Some(now));
        let instance = Instance {
            id: "i-1".into(),
            instance_type: "m6i.large".into(),
            zone: "us-east-1a".into(),
            spot: false,
            state: "pending".into(),
            state_reason: None,
            launch_time: None,
            tags: Default::default(),
        };
        ledger.launch_answered("uid", Some(&instance), now);
        assert_eq!(ledger.unsettled_since("uid"), None);
        assert_eq!(ledger.launched("uid").map(|(id, _)| id), Some("i-1".into()));
        ledger.forget("uid");
        assert!(ledger.launched("uid").is_none());
    }
}
