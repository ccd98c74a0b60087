//! The custom resources Pacer serves (`pacer.dev/v1alpha1`), their schema and its rules. No I/O.

mod job;
mod pool;
pub mod reference;
mod rules;
mod schema;

pub use job::{
    AssignedJob, BootStatus, Completion, CostSnapshot, FINALIZER as JOB_FINALIZER, InstanceStatus,
    Interruption, JobPhase, JobResult, LastError, LaunchBatch, LaunchIntent, LaunchOffering,
    PhaseTimes, PreviousAttempt, RunnerJob, RunnerJobSpec, RunnerJobStatus, RunnerStatus,
    WarmStart,
};
pub use pool::{
    AllocationStrategy, Capacity, CapacityType, GitHubScope, GitHubTarget, LaunchTemplateRef,
    MAX_BOOT_TIMEOUT_SECONDS, MAX_WARM_MAX_AGE_MINUTES, MAX_WARM_SIZE, MIN_WARM_MAX_AGE_MINUTES,
    RootVolume, RunnerCounts, RunnerPool, RunnerPoolSpec, RunnerPoolStatus, SpawnMethod,
    VolumeType, WarmCounts, WarmFailures, WarmPool, WarmStorage,
};
pub use rules::FieldProblem;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Pacer resource.
pub const GROUP: &str = "pacer.dev";

/// Both CRDs as the API server should see them: derived from the types, with the cross-field
/// CEL rules attached.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        pool_crd(),
        rules::attach(RunnerJob::crd(), rules::JOB_RULES),
    ]
}

/// The RunnerPool CRD. People write pools, and some write `field: null` for "not set": the
/// spec's optional fields are not `nullable`, so the API server drops such a null and the
/// field reads as unset, its default applied, the same to the schema, the CEL rules and the
/// controller.
fn pool_crd() -> CustomResourceDefinition {
    rules::null_means_unset(rules::attach(RunnerPool::crd(), rules::POOL_RULES))
}

/// The CRD as YAML, the form committed under `crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    serde_saphyr::to_string(crd).expect("a CRD always serializes")
}

/// The file a CRD is committed as under `crds/`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// Checks a RunnerPool manifest offline against the same schema and rules the API server
/// enforces. Returns every problem found, each with its field path.
pub fn validate_pool_manifest(manifest: &serde_json::Value) -> Vec<FieldProblem> {
    let crd = pool_crd();
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("derived CRDs carry a schema");
    let schema = serde_json::to_value(schema).expect("a schema always serializes");
    let mut problems = Vec::new();
    match (
        manifest.get("apiVersion").and_then(|v| v.as_str()),
        manifest.get("kind").and_then(|v| v.as_str()),
    ) {
        (Some(api), Some("RunnerPool")) if api == format!("{GROUP}/v1alpha1") => {}
        (api, kind) => problems.push(FieldProblem::new(
            "apiVersion",
            format!(
                "expected apiVersion {GROUP}/v1alpha1 and kind RunnerPool, found {} {}",
                api.unwrap_or("<none>"),
                kind.unwrap_or("<none>")
            ),
        )),
    }
    match manifest.pointer("/metadata/name").and_then(|v| v.as_str()) {
        None | Some("") => problems.push(FieldProblem::new("metadata.name", "Required value")),
        Some(name) if !is_dns_subdomain(name) => problems.push(FieldProblem::new(
            "metadata.name",
            format!(
                "invalid value {name:?}: a lowercase RFC 1123 subdomain of at most 253 \
                 characters (lower case letters, digits, '-' and '.', starting and ending with \
                 a letter or digit), as the API server requires of every custom resource"
            ),
        )),
        Some(_) => {}
    }
    let mut object = manifest.clone();
    if let Some(map) = object.as_object_mut() {
        // The API server checks these itself; the schema only describes spec and status.
        map.remove("apiVersion");
        map.remove("kind");
        map.remove("metadata");
    }
    schema::normalize(&schema, &mut object);
    schema::check(&schema, &object, "", &mut problems);
    rules::check(rules::POOL_RULES, &object, &mut problems);
    problems
}

/// What the API server accepts as a custom resource's name: a lowercase RFC 1123 subdomain.
fn is_dns_subdomain(name: &str) -> bool {
    let label = |l: &str| {
        let bytes = l.as_bytes();
        !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    };
    name.len() <= 253 && name.split('.').all(label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid_pool() -> serde_json::Value {
        let text = include_str!("../../examples/runnerpool-org-spot.yaml");
        serde_saphyr::from_str(text).unwrap()
    }

    fn fields(problems: &[FieldProblem]) -> Vec<&str> {
        problems.iter().map(|p| p.field.as_str()).collect()
    }

    #[test]
    fn committed_crds_match_the_code() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        // The top-level copy, and the chart's (Helm installs what is in a chart's crds/).
        for (dir, crd) in ["crds", "charts/pacer/crds"]
            .iter()
            .flat_map(|dir| crds().into_iter().map(move |crd| (root.join(dir), crd)))
        {
            let path = dir.join(crd_file_name(&crd));
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == crd_yaml(&crd),
                "{} is out of date: run `make generate` and commit the result",
                path.display()
            );
        }
    }

    #[test]
    fn crd_yaml_round_trips() {
        for crd in crds() {
            let back: CustomResourceDefinition = serde_saphyr::from_str(&crd_yaml(&crd)).unwrap();
            assert_eq!(back, crd);
        }
    }

    #[test]
    fn the_example_pool_has_no_problems() {
        assert_eq!(validate_pool_manifest(&valid_pool()), vec![]);
    }

    #[test]
    fn every_schema_and_rule_problem_is_reported_at_once() {
        let mut pool = valid_pool();
        pool["spec"]["ami"] = json!("ami-nothex");
        pool["spec"]["subnets"] = json!(["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60001"]);
        pool["spec"]["tags"]["aws:owner"] = json!("me");
        pool["spec"]["capacity"] = json!({"type": "onDemand", "fallbackToOnDemand": true});
        pool["spec"]["bogus"] = json!(1);
        let problems = validate_pool_manifest(&pool);
        assert_eq!(
            fields(&problems),
            [
                "spec.ami",
                "spec.bogus",
                "spec.subnets[1]",
                "spec.capacity.fallbackToOnDemand",
                "spec.tags"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn missing_required_fields_and_wrong_kind_are_named() {
        let problems = validate_pool_manifest(
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}, "spec": {}}),
        );
        let fields = fields(&problems);
        for expected in [
            "apiVersion",
            "metadata.name",
            "spec.github",
            "spec.labels",
            "spec.ami",
            "spec.subnets",
        ] {
            assert!(
                fields.contains(&expected),
                "{expected} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn on_demand_pools_only_take_on_demand_allocation_strategies() {
        let mut pool = valid_pool();
        pool["spec"]["capacity"] =
            json!({"type": "onDemand", "allocationStrategy": "capacityOptimized"});
        assert_eq!(
            fields(&validate_pool_manifest(&pool)),
            ["spec.capacity.allocationStrategy"]
        );
        pool["spec"]["capacity"] = json!({"type": "onDemand", "allocationStrategy": "prioritized"});
        assert_eq!(validate_pool_manifest(&pool), vec![]);
    }

    #[test]
    fn org_pools_may_join_runner_groups_repo_pools_may_not() {
        let mut pool = valid_pool();
        pool["spec"]["github"] =
            json!({"scope": "repo", "owner": "o", "repositories": ["a"], "runnerGroup": "g"});
        assert_eq!(
            fields(&validate_pool_manifest(&pool)),
            ["spec.github.runnerGroup"]
        );
    }

    #[test]
    fn a_null_field_reads_as_unset_as_the_api_server_reads_it() {
        let mut pool = valid_pool();
        pool["spec"]["capacity"]["fallbackToOnDemand"] = json!(null);
        pool["spec"]["capacity"]["allocationStrategy"] = json!(null);
        pool["spec"]["instanceProfile"] = json!(null);
        assert_eq!(validate_pool_manifest(&pool), vec![]);
        pool["spec"]["ami"] = json!(null);
        let problems = validate_pool_manifest(&pool);
        assert_eq!(fields(&problems), ["spec.ami"], "{problems:?}");
        assert_eq!(problems[0].message, "Required value");
    }

    #[test]
    fn the_pool_crd_lets_no_spec_field_be_null() {
        let crd = serde_json::to_value(pool_crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert!(!spec.to_string().contains("\"nullable\""), "{spec}");
    }

    #[test]
    fn a_whole_float_in_an_integer_field_is_that_integer() {
        let mut pool = valid_pool();
        pool["spec"]["maxRunners"] = json!(3.0);
        assert_eq!(validate_pool_manifest(&pool), vec![]);
        pool["spec"]["maxRunners"] = json!(2.5);
        assert_eq!(fields(&validate_pool_manifest(&pool)), ["spec.maxRunners"]);
    }

    #[test]
    fn a_pool_name_must_be_a_dns_subdomain() {
        for (name, ok) in [
            ("linux-x64", true),
            ("a.b-c.9", true),
            ("Linux", false),
            ("-linux", false),
            ("linux.", false),
            ("1e9u.s@w9", false),
            ("a..b", false),
        ] {
            let mut pool = valid_pool();
            pool["metadata"]["name"] = json!(name);
            let problems = validate_pool_manifest(&pool);
            assert_eq!(problems.is_empty(), ok, "{name}: {problems:?}");
        }
        let mut pool = valid_pool();
        pool["metadata"]["name"] = json!("a".repeat(254));
        assert_eq!(fields(&validate_pool_manifest(&pool)), ["metadata.name"]);
    }

    #[test]
    fn runner_job_spec_is_immutable_by_a_transition_rule() {
        let crd = serde_json::to_value(&crds()[1]).unwrap();
        let rules = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["x-kubernetes-validations"];
        assert_eq!(rules[0]["rule"], "self == oldSelf");
    }
}
