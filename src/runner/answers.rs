//! Bootstrap answers waiting for their instances. The replica that makes an instance's answer
//! (its runner's JIT config and callback token) leaves it in a Secret of the replicas' own
//! namespace, so the instance's next try collects it from whichever replica it reaches: a
//! Service may route every try to another replica, and the one that made it may be gone. The
//! Secret is deleted on the condition that it is still the one read, so of two replicas asked
//! at once one hands the answer out and the other finds none: once, as the protocol promises.
//! Answers left uncollected past [`BOOT_ANSWER_HOLD`] (their instance died, or gave up) are
//! removed by the garbage collector.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};

use crate::domain::job::BOOT_ANSWER_HOLD;

/// The label naming the controller whose bootstrap answer a Secret holds.
pub const ANSWER_OF: &str = "pacer.dev/bootstrap-answer-of";
/// The annotation naming the RunnerJob (by uid) the answer was made for.
const FOR_JOB: &str = "pacer.dev/runner-job-uid";
/// The Secret's key holding the answer, as the instance receives it.
const KEY: &str = "answer";

/// The answers of one controller, in the replicas' namespace.
pub struct Answers {
    api: Api<Secret>,
    controller_id: String,
}

impl Answers {
    pub fn new(client: kube::Client, namespace: &str, controller_id: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            controller_id: controller_id.into(),
        }
    }

    fn name(&self, instance: &str) -> String {
        format!("pacer-{}-boot-{instance}", self.controller_id)
    }

    /// Leaves `answer` for `instance`, made for the RunnerJob `job_uid`; an answer left
    /// before for the same instance is replaced.
    pub async fn leave(
        &self,
        instance: &str,
        job_uid: &str,
        answer: &serde_json::Value,
    ) -> kube::Result<()> {
        let name = self.name(instance);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (ANSWER_OF.into(), self.controller_id.clone()),
                    ("app.kubernetes.io/managed-by".into(), "pacer".into()),
                ])),
                annotations: Some(BTreeMap::from([(FOR_JOB.into(), job_uid.into())])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                KEY.into(),
                ByteString(serde_json::to_vec(answer).unwrap_or_default()),
            )])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let create = PostParams::default();
        match self.api.create(&create, &secret).await {
            // Left before for this instance and not collected: this one replaces it.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                match self.api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
                self.api.create(&create, &secret).await?;
            }
            created => {
                created?;
            }
        }
        Ok(())
    }

    /// The answer left for `instance` and the RunnerJob `job_uid`, removed as it is taken:
    /// `None` when there is none (not made yet, made for another job, or taken already).
    pub async fn take(
        &self,
        instance: &str,
        job_uid: &str,
    ) -> kube::Result<Option<serde_json::Value>> {
        let name = self.name(instance);
        let Some(secret) = self.api.get_opt(&name).await? else {
            return Ok(None);
        };
        let made_for = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FOR_JOB));
        if made_for.map(String::as_str) != Some(job_uid) {
            return Ok(None);
        }
        // Deleted only if it is still the Secret read: of two takers, one wins.
        let only_this = DeleteParams {
            preconditions: Some(Preconditions {
                uid: secret.metadata.uid.clone(),
                resource_version: secret.metadata.resource_version.clone(),
            }),
            ..Default::default()
        };
        match self.api.delete(&name, &only_this).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(None),
            Err(e) => return Err(e),
        }
        Ok(secret
            .data
            .as_ref()
            .and_then(|data| data.get(KEY))
            .and_then(|bytes| serde_json::from_slice(&bytes.0).ok()))
    }

    /// Removes the answers left longer than [`BOOT_ANSWER_HOLD`] ago, which no instance may
    /// collect any more; how many.
    pub async fn expire(&self, now: Timestamp) -> kube::Result<usize> {
        let mine = ListParams::default().labels(&format!("{ANSWER_OF}={}", self.controller_id));
        let mut removed = 0;
        for secret in self.api.list_metadata(&mine).await? {
            let expired = secret
                .metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|made| {
                    now.duration_since(made.0).as_secs() >= BOOT_ANSWER_HOLD.as_secs() as i64
                });
            let Some(name) = secret.metadata.name.as_deref() else {
                continue;
            };
            if !expired {
                continue;
            }
            match self.api.delete(name, &DeleteParams::default()).await {
                Ok(_) => removed += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }
}
