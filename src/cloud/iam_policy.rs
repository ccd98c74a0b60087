//! The IAM policy Pacer's role needs, statement by statement, scoped by our tag wherever AWS
//! allows. `docs/iam-role.json` is printed from this table (`pacer iam-policy`), and a test
//! checks the table against the AWS calls `aws.rs` makes, so the two cannot drift apart.

use serde_json::{Value, json};

use super::tags::{MANAGED_BY, MANAGED_BY_VALUE};

/// One policy statement.
pub struct Statement {
    pub sid: &'static str,
    pub actions: &'static [&'static str],
    pub resources: &'static [&'static str],
    /// `StringEquals` conditions; `{tag}` stands for the managed-by tag key.
    pub condition: &'static [(&'static str, &'static [&'static str])],
    /// Why an action is here that `aws.rs` never calls by name (EC2 authorizes it as part of
    /// another call).
    pub implied_by: Option<&'static str>,
}

const REQUEST_TAG: &str = "aws:RequestTag/{tag}";
const RESOURCE_TAG: &str = "aws:ResourceTag/{tag}";
const OURS: &[&str] = &[MANAGED_BY_VALUE];
const LAUNCH_TEMPLATES: &[&str] = &["arn:aws:ec2:REPLACE_AWS_REGION:*:launch-template/*"];

pub const STATEMENTS: &[Statement] = &[
    Statement {
        sid: "DescribeReadOnly",
        actions: &[
            "ec2:DescribeImages",
            "ec2:DescribeInstances",
            "ec2:DescribeInstanceTypes",
            "ec2:DescribeLaunchTemplateVersions",
            "ec2:DescribeLaunchTemplates",
            "ec2:DescribeSecurityGroups",
            "ec2:DescribeSubnets",
        ],
        resources: &["*"],
        condition: &[],
        implied_by: None,
    },
    Statement {
        sid: "ReadPricesForCostSnapshots",
        actions: &["ec2:DescribeSpotPriceHistory", "pricing:GetProducts"],
        resources: &["*"],
        condition: &[],
        implied_by: None,
    },
    Statement {
        sid: "ValidateInstanceProfile",
        actions: &["iam:GetInstanceProfile"],
        resources: &["arn:aws:iam::REPLACE_ACCOUNT_ID:instance-profile/*"],
        condition: &[],
        implied_by: None,
    },
    Statement {
        sid: "CreateTaggedLaunchTemplate",
        actions: &["ec2:CreateLaunchTemplate"],
        resources: LAUNCH_TEMPLATES,
        condition: &[(REQUEST_TAG, OURS)],
        implied_by: None,
    },
    Statement {
        sid: "ModifyOnlyOurLaunchTemplates",
        actions: &[
            "ec2:CreateLaunchTemplateVersion",
            "ec2:DeleteLaunchTemplate",
            "ec2:DeleteLaunchTemplateVersions",
            "ec2:ModifyLaunchTemplate",
        ],
        resources: LAUNCH_TEMPLATES,
        condition: &[(RESOURCE_TAG, OURS)],
        implied_by: None,
    },
    Statement {
        sid: "RunInstancesReadOnlyResources",
        actions: &["ec2:RunInstances"],
        resources: &[
            "arn:aws:ec2:REPLACE_AWS_REGION::image/*",
            "arn:aws:ec2:REPLACE_AWS_REGION:*:subnet/*",
            "arn:aws:ec2:REPLACE_AWS_REGION:*:security-group/*",
            "arn:aws:ec2:REPLACE_AWS_REGION:*:network-interface/*",
            "arn:aws:ec2:REPLACE_AWS_REGION:*:key-pair/*",
            "arn:aws:ec2:REPLACE_AWS_REGION:*:placement-group/*",
        ],
        condition: &[],
        implied_by: None,
    },
    Statement {
        sid: "RunInstancesFromOurLaunchTemplate",
        actions: &["ec2:RunInstances"],
        resources: LAUNCH_TEMPLATES,
        condition: &[(RESOURCE_TAG, OURS)],
        implied_by: None,
    },
    Statement {
        sid: "RunInstancesTaggedInstanceAndVolume",
        actions: &["ec2:RunInstances"],
        resources: &[
            "arn:aws:ec2:REPLACE_AWS_REGION:*:instance/*",
            "arn:aws:ec2:REPLACE_AWS_REGION:*:volume/*",
        ],
        condition: &[(REQUEST_TAG, OURS)],
        implied_by: None,
    },
    Statement {
        sid: "CreateFleetFromOurLaunchTemplate",
        actions: &["ec2:CreateFleet"],
        resources: &["*"],
        condition: &[(REQUEST_TAG, OURS)],
        implied_by: None,
    },
    Statement {
        sid: "TagOnCreate",
        actions: &["ec2:CreateTags"],
        resources: &["arn:aws:ec2:REPLACE_AWS_REGION:*:*"],
        condition: &[
            (
                "ec2:CreateAction",
                &[
                    "CreateFleet",
                    "CreateLaunchTemplate",
                    "CreateLaunchTemplateVersion",
                    "RunInstances",
                ],
            ),
            (REQUEST_TAG, OURS),
        ],
        implied_by: Some(
            "tag specifications in CreateLaunchTemplate, CreateFleet and RunInstances",
        ),
    },
    Statement {
        sid: "TerminateOnlyOurInstances",
        actions: &["ec2:TerminateInstances"],
        resources: &["arn:aws:ec2:REPLACE_AWS_REGION:*:instance/*"],
        condition: &[(RESOURCE_TAG, OURS)],
        implied_by: None,
    },
    Statement {
        sid: "PassRunnerInstanceProfile",
        actions: &["iam:PassRole"],
        resources: &["arn:aws:iam::REPLACE_ACCOUNT_ID:role/REPLACE_RUNNER_INSTANCE_ROLE"],
        condition: &[("iam:PassedToService", &["ec2.amazonaws.com"])],
        implied_by: Some("launching from a template that names an instance profile"),
    },
];

/// The whole policy document.
pub fn policy() -> Value {
    let statements: Vec<Value> = STATEMENTS
        .iter()
        .map(|s| {
            let mut statement = json!({
                "Sid": s.sid,
                "Effect": "Allow",
                "Action": s.actions,
                "Resource": if s.resources.len() == 1 { json!(s.resources[0]) } else { json!(s.resources) },
            });
            if !s.condition.is_empty() {
                let equals: serde_json::Map<String, Value> = s
                    .condition
                    .iter()
                    .map(|(k, v)| (k.replace("{tag}", MANAGED_BY), if v.len() == 1 { json!(v[0]) } else { json!(v) }))
                    .collect();
                statement["Condition"] = json!({ "StringEquals": equals });
            }
            statement
        })
        .collect();
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// The policy as committed in `docs/iam-role.json`.
pub fn policy_json() -> String {
    serde_json::to_string_pretty(&policy()).expect("a policy serializes") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AWS actions `aws.rs` calls, read from its source: `self.ec2.describe_images()` is
    /// `ec2:DescribeImages`.
    fn actions_called() -> Vec<String> {
        let source = include_str!("aws.rs");
        let call =
            regex_lite::Regex::new(r"self\s*\.\s*(ec2|iam|pricing)\s*\.\s*([a-z_]+)\s*\(").unwrap();
        let mut actions: Vec<String> = call
            .captures_iter(source)
            .map(|c| {
                let pascal: String = c[2]
                    .split('_')
                    .map(|w| w[..1].to_uppercase() + &w[1..])
                    .collect();
                format!("{}:{pascal}", &c[1])
            })
            .collect();
        actions.sort();
        actions.dedup();
        actions
    }

    #[test]
    fn every_call_the_code_makes_is_allowed_and_nothing_else_is() {
        let called = actions_called();
        assert!(
            called.len() >= 12,
            "the source scan found too little: {called:?}"
        );
        let allowed: Vec<&str> = STATEMENTS
            .iter()
            .flat_map(|s| s.actions.iter().copied())
            .collect();
        for action in &called {
            assert!(
                allowed.contains(&action.as_str()),
                "{action} is called but not in the policy"
            );
        }
        for s in STATEMENTS.iter().filter(|s| s.implied_by.is_none()) {
            for action in s.actions {
                assert!(
                    called.iter().any(|c| c == action),
                    "{} allows {action}, which the code never calls",
                    s.sid
                );
            }
        }
    }

    #[test]
    fn every_mutating_statement_is_scoped_by_our_tag() {
        for s in STATEMENTS {
            let mutating = s
                .actions
                .iter()
                .any(|a| !a.contains(":Describe") && !a.contains(":Get"));
            let scoped = s
                .condition
                .iter()
                .any(|(k, _)| k.contains("{tag}") || k.starts_with("iam:"))
                || s.sid == "RunInstancesReadOnlyResources";
            assert!(
                !mutating || scoped,
                "{} mutates without a tag condition",
                s.sid
            );
        }
    }

    #[test]
    fn committed_policy_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/iam-role.json");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == policy_json(),
            "{} is out of date: run `make generate`",
            path.display()
        );
    }
}
