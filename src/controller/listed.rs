//! The RunnerJob as the controllers' watch reads it: the metadata no pass reads (what
//! [`super::job::slim`] drops from the metadata) is skipped while the API server's answer is
//! parsed, rather than parsed and then dropped. A start with thousands of RunnerJobs parses
//! every one of them, and their managed fields alone are several kilobytes each.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::Event;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};

use crate::api::{RunnerJob, RunnerJobSpec, RunnerJobStatus};

/// Metadata fields no pass reads: skipped unparsed. [`super::job::slim`] drops the same from a
/// job (a test holds the two together).
const SKIPPED: [&str; 4] = ["managedFields", "annotations", "labels", "ownerReferences"];

/// A RunnerJob read without the metadata in [`SKIPPED`].
#[derive(Clone, Debug)]
pub(super) struct Listed(RunnerJob);

/// The watch's event, with the RunnerJob it carries.
pub(super) fn into_job(event: Event<Listed>) -> Event<RunnerJob> {
    match event {
        Event::Apply(Listed(job)) => Event::Apply(job),
        Event::Delete(Listed(job)) => Event::Delete(job),
        Event::Init => Event::Init,
        Event::InitApply(Listed(job)) => Event::InitApply(job),
        Event::InitDone => Event::InitDone,
    }
}

impl Resource for Listed {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        RunnerJob::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        RunnerJob::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        RunnerJob::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        RunnerJob::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

impl<'de> Deserialize<'de> for Listed {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Object {
            metadata: Meta,
            spec: RunnerJobSpec,
            #[serde(default)]
            status: Option<RunnerJobStatus>,
        }
        let Object {
            metadata,
            spec,
            status,
        } = Object::deserialize(d)?;
        Ok(Self(RunnerJob {
            metadata: metadata.0,
            spec,
            status,
        }))
    }
}

/// Object metadata without [`SKIPPED`]: what is kept is small, and parsed as `ObjectMeta`.
struct Meta(ObjectMeta);

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Meta;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("object metadata")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Meta, A::Error> {
                let mut kept = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if SKIPPED.contains(&key.as_str()) {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        kept.insert(key, map.next_value()?);
                    }
                }
                ObjectMeta::deserialize(serde_json::Value::Object(kept))
                    .map(Meta)
                    .map_err(de::Error::custom)
            }
        }
        d.deserialize_map(Fields)
    }
}

#[cfg(test)]
mod tests {
    use kube::core::{ObjectList, WatchEvent};

    use super::*;

    /// A RunnerJob as the API server sends it, with every metadata field Pacer's objects carry.
    fn sent() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "pacer.dev/v1alpha1",
            "kind": "RunnerJob",
            "metadata": {
                "name": "job-1", "namespace": "ci", "uid": "u-1", "resourceVersion": "7",
                "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z",
                "deletionTimestamp": "2026-01-01T00:01:00Z", "deletionGracePeriodSeconds": 0,
                "finalizers": ["pacer.dev/instance"],
                "labels": {"a": "b"}, "annotations": {"c": "d"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "x"}],
                "managedFields": [{"manager": "pacer", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}}}],
            },
            "spec": {"poolName": "linux", "jobId": 1, "runId": 2,
                "repository": "example-org/api", "labels": ["self-hosted"]},
            "status": {"phase": "Booting"},
        })
    }

    /// `job` as the cache keeps it.
    fn slimmed(mut job: RunnerJob) -> serde_json::Value {
        super::super::job::slim(&mut job);
        serde_json::to_value(job).unwrap()
    }

    #[test]
    fn a_listed_job_is_cached_as_the_whole_job_is() {
        let listed: Listed = serde_json::from_value(sent()).unwrap();
        let whole: RunnerJob = serde_json::from_value(sent()).unwrap();
        assert_eq!(slimmed(listed.0.clone()), slimmed(whole));
        // What is skipped is what the cache never holds.
        let meta = &listed.0.metadata;
        assert!(meta.managed_fields.is_none() && meta.labels.is_none());
        assert!(meta.annotations.is_none() && meta.owner_references.is_none());
        assert_eq!(listed.meta().resource_version.as_deref(), Some("7"));
        assert!(meta.deletion_timestamp.is_some());
        assert_eq!(
            Listed::url_path(&(), Some("ci")),
            RunnerJob::url_path(&(), Some("ci"))
        );
    }

    #[test]
    fn lists_and_watch_events_read_as_kube_parses_them() {
        let list = serde_json::json!({
            "apiVersion": "pacer.dev/v1alpha1", "kind": "RunnerJobList",
            "items": [sent(), sent()],
            "metadata": {"continue": "", "resourceVersion": "9"},
        });
        let list: ObjectList<Listed> = serde_json::from_str(&list.to_string()).unwrap();
        assert_eq!(list.items.len(), 2);
        assert_eq!(list.metadata.resource_version.as_deref(), Some("9"));

        // The object may come before the type: serde buffers it then.
        let added = format!(r#"{{"object":{},"type":"ADDED"}}"#, sent());
        let added: WatchEvent<Listed> = serde_json::from_str(&added).unwrap();
        assert!(matches!(added, WatchEvent::Added(job) if job.0.metadata.labels.is_none()));
        let deleted = format!(r#"{{"type":"DELETED","object":{}}}"#, sent());
        let deleted: WatchEvent<Listed> = serde_json::from_str(&deleted).unwrap();
        assert!(matches!(deleted, WatchEvent::Deleted(_)));
        let bookmark = r#"{"type":"BOOKMARK","object":{"kind":"RunnerJob",
            "apiVersion":"pacer.dev/v1alpha1","metadata":{"resourceVersion":"12"}}}"#;
        let bookmark: WatchEvent<Listed> = serde_json::from_str(bookmark).unwrap();
        assert!(matches!(bookmark, WatchEvent::Bookmark(b) if b.metadata.resource_version == "12"));
    }

    #[test]
    fn a_job_without_status_or_metadata_fields_reads() {
        let listed: Listed = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "job-2"},
            "spec": {"poolName": "linux", "jobId": 1, "runId": 2, "repository": "o/r",
                "labels": []},
        }))
        .unwrap();
        assert!(listed.0.status.is_none());
        assert_eq!(listed.0.metadata.name.as_deref(), Some("job-2"));
    }
}
