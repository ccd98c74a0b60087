//! Cross-field rules: each one CEL expression for the API server and the same rule in Rust for
//! `pacer validate`, side by side so the two cannot drift apart.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, ValidationRule,
};

use super::{AllocationStrategy, CapacityType, GitHubScope, RunnerPoolSpec, VolumeType};

/// A rule on a resource's spec, evaluated by the API server with `self` bound to the spec.
pub struct Rule<S: 'static> {
    /// The field reported when the rule fails, relative to the spec (`.capacity.type`).
    pub field: &'static str,
    /// The CEL expression the API server evaluates.
    pub cel: &'static str,
    /// Whether the rule compares against the previous object (`oldSelf`).
    pub transition: bool,
    /// What a human should do when the rule fails.
    pub message: &'static str,
    /// The same rule in Rust; `None` for transition rules, which need the stored object.
    pub holds: Option<fn(&S) -> bool>,
}

/// A problem found in a manifest, with the path of the field it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    /// Dotted path, such as `spec.subnets[0]`.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl FieldProblem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

const RESERVED_TAG_PREFIXES: [&str; 2] = ["gha:", "aws:"];

pub const POOL_RULES: &[Rule<RunnerPoolSpec>] = &[
    Rule {
        field: ".github.repositories",
        cel: "self.github.scope != 'repo' || (has(self.github.repositories) && size(self.github.repositories) > 0)",
        transition: false,
        message: "a repo-scoped pool must name at least one repository",
        holds: Some(|s| s.github.scope != GitHubScope::Repo || !s.github.repositories.is_empty()),
    },
    Rule {
        field: ".github.runnerGroup",
        cel: "self.github.scope == 'org' || !has(self.github.runnerGroup)",
        transition: false,
        message: "runner groups exist only for org-scoped pools",
        holds: Some(|s| s.github.scope == GitHubScope::Org || s.github.runner_group.is_none()),
    },
    Rule {
        field: ".capacity.fallbackToOnDemand",
        cel: "!has(self.capacity) || !has(self.capacity.fallbackToOnDemand) || !self.capacity.fallbackToOnDemand || self.capacity.type == 'spot'",
        transition: false,
        message: "fallbackToOnDemand applies only to capacity type spot",
        holds: Some(|s| {
            !s.capacity.fallback_to_on_demand || s.capacity.capacity_type == CapacityType::Spot
        }),
    },
    Rule {
        field: ".capacity.allocationStrategy",
        cel: "!has(self.capacity) || self.capacity.type == 'spot' || !has(self.capacity.allocationStrategy) || self.capacity.allocationStrategy in ['lowestPrice', 'prioritized']",
        transition: false,
        message: "on-demand capacity supports only the allocation strategies lowestPrice and prioritized",
        holds: Some(|s| {
            s.capacity.capacity_type == CapacityType::Spot
                || matches!(
                    s.capacity.allocation_strategy,
                    None | Some(AllocationStrategy::LowestPrice | AllocationStrategy::Prioritized)
                )
        }),
    },
    Rule {
        field: ".rootVolume.iops",
        cel: "!has(self.rootVolume) || !has(self.rootVolume.iops) || self.rootVolume.type != 'gp2'",
        transition: false,
        message: "iops can be set only for volume types gp3, io1 and io2",
        holds: Some(|s| {
            s.root_volume.iops.is_none() || s.root_volume.volume_type != VolumeType::Gp2
        }),
    },
    Rule {
        field: ".rootVolume.throughput",
        cel: "!has(self.rootVolume) || !has(self.rootVolume.throughput) || self.rootVolume.type == 'gp3'",
        transition: false,
        message: "throughput can be set only for volume type gp3",
        holds: Some(|s| {
            s.root_volume.throughput.is_none() || s.root_volume.volume_type == VolumeType::Gp3
        }),
    },
    Rule {
        field: ".warm",
        cel: "!has(self.warm) || !has(self.warm.size) || self.warm.size == 0 || !has(self.capacity) || self.capacity.type == 'onDemand'",
        transition: false,
        message: "a warm pool needs capacity type onDemand: EC2 cannot stop a spot instance launched by a one-time request",
        holds: Some(|s| s.warm_size() == 0 || s.capacity.capacity_type == CapacityType::OnDemand),
    },
    Rule {
        field: ".tags",
        // EC2 refuses `aws:` in any case; `gha:` is refused the same way so no pool can pass
        // a tag off as Pacer's to a reader who ignores case.
        cel: "!has(self.tags) || self.tags.all(k, !k.lowerAscii().startsWith('gha:') && !k.lowerAscii().startsWith('aws:'))",
        transition: false,
        message: "tag keys starting with gha: or aws:, in any case, are reserved",
        holds: Some(|s| {
            s.tags.keys().all(|k| {
                let k = k.to_ascii_lowercase();
                !RESERVED_TAG_PREFIXES.iter().any(|p| k.starts_with(p))
            })
        }),
    },
    Rule {
        field: ".tags",
        cel: "!has(self.tags) || self.tags.all(k, size(k) >= 1 && size(k) <= 128 && size(self.tags[k]) <= 256)",
        transition: false,
        message: "tag keys must be 1 to 128 characters and values at most 256",
        holds: Some(|s| {
            s.tags
                .iter()
                .all(|(k, v)| (1..=128).contains(&k.chars().count()) && v.chars().count() <= 256)
        }),
    },
];

pub const JOB_RULES: &[Rule<super::RunnerJobSpec>] = &[Rule {
    field: "",
    cel: "self == oldSelf",
    transition: true,
    message: "spec is immutable: a RunnerJob records one queued job; delete it and create another instead",
    holds: None,
}];

/// Puts the rules on the CRD's `spec` schema as `x-kubernetes-validations`.
pub fn attach<S>(mut crd: CustomResourceDefinition, rules: &[Rule<S>]) -> CustomResourceDefinition {
    for spec in spec_schemas(&mut crd) {
        spec.x_kubernetes_validations = Some(rules.iter().map(validation_rule).collect());
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD always serializes");
    drop_null_from_enums(&mut value);
    serde_json::from_value(value).expect("dropping enum nulls keeps a CRD a CRD")
}

/// The `spec` schema of each of the CRD's versions.
fn spec_schemas(crd: &mut CustomResourceDefinition) -> impl Iterator<Item = &mut JSONSchemaProps> {
    crd.spec.versions.iter_mut().map(|version| {
        version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|root| root.properties.as_mut())
            .and_then(|props| props.get_mut("spec"))
            .expect("derived CRDs have a spec schema")
    })
}

/// Optional enums come out of the derive with `null` among their values; the API server wants
/// enum values of the declared type.
fn drop_null_from_enums(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(drop_null_from_enums);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_null_from_enums),
        _ => {}
    }
}

/// Takes `nullable` off every field of the spec: a `null` there is then dropped by the API
/// server before it validates, as if the field were not written.
pub fn null_means_unset(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                map.remove("nullable");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    for spec in spec_schemas(&mut crd) {
        let mut value = serde_json::to_value(&*spec).expect("a schema always serializes");
        strip(&mut value);
        *spec = serde_json::from_value(value).expect("a schema without nullable is a schema");
    }
    crd
}

fn validation_rule<S>(rule: &Rule<S>) -> ValidationRule {
    ValidationRule {
        rule: rule.cel.to_string(),
        message: Some(rule.message.to_string()),
        field_path: (!rule.field.is_empty()).then(|| rule.field.to_string()),
        reason: Some(
            if rule.transition {
                "FieldValueForbidden"
            } else {
                "FieldValueInvalid"
            }
            .to_string(),
        ),
        ..ValidationRule::default()
    }
}

/// Evaluates the Rust side of each rule against a manifest whose spec parses.
pub fn check(
    rules: &[Rule<RunnerPoolSpec>],
    object: &serde_json::Value,
    problems: &mut Vec<FieldProblem>,
) {
    let Some(spec) = object.get("spec") else {
        return;
    };
    let spec: RunnerPoolSpec = match serde_json::from_value(spec.clone()) {
        Ok(spec) => spec,
        Err(err) => {
            // The schema check has usually said why already; say it here only if it has not.
            if problems.is_empty() {
                problems.push(FieldProblem::new("spec", err.to_string()));
            }
            return;
        }
    };
    for rule in rules {
        if let Some(holds) = rule.holds
            && !holds(&spec)
        {
            problems.push(FieldProblem::new(
                format!("spec{}", rule.field),
                rule.message,
            ));
        }
    }
}
