//! The RunnerJob as the controllers' watch reads it: the metadata no pass reads (what
//! [`super::job::slim`] drops) is skipped while the API server's answer is parsed, rather than
//! parsed and then dropped. A start with thousands of RunnerJobs parses every one of them, and
//! their managed fields alone are several kilobytes each.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::Event;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};

use crate::api::{RunnerJob, RunnerJobSpec, RunnerJobStatus};

/// Metadata fields no pass reads: skipped unparsed.
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
    use super::*;

    #[test]
    fn a_listed_job_is_the_job_without_what_no_pass_reads() {
        let json = serde_json::json!({
            "apiVersion": "pacer.dev/v1alpha1",
            "kind": "RunnerJob",
            "metadata": {
                "name": "job-1", "namespace": "ci", "uid": "u-1", "resourceVersion": "7",
                "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z",
                "finalizers": ["pacer.dev/instance"],
                "labels": {"a": "b"}, "annotations": {"c": "d"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "x"}],
                "managedFields": [{"manager": "pacer", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}}}],
            },
            "spec": {"poolName": "linux", "jobId": 1, "runId": 2,
                "repository": "example-org/api", "labels": ["self-hosted"]},
            "status": {"phase": "Booting"},
        });
        let listed: Listed = serde_json::from_value(json.clone()).unwrap();
        let mut whole: RunnerJob = serde_json::from_value(json).unwrap();
        let meta = &mut whole.metadata;
        (meta.managed_fields, meta.labels) = (None, None);
        (meta.annotations, meta.owner_references) = (None, None);
        assert_eq!(
            serde_json::to_value(&listed.0).unwrap(),
            serde_json::to_value(&whole).unwrap()
        );
        assert_eq!(listed.meta().resource_version.as_deref(), Some("7"));
        assert_eq!(
            Listed::url_path(&(), Some("ci")),
            RunnerJob::url_path(&(), Some("ci"))
        );
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
