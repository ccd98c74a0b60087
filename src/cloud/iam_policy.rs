//! The IAM policy Pacer's role needs, statement by statement, scoped by our tags wherever AWS
//! allows: `gha:managed-by=pacer` as in the seed policy, and `gha:controller=<id>` so two
//! installations in one account cannot touch each other's resources. `docs/iam-role.json` is
//! printed from this table with placeholders (`pacer iam-policy`), a test checks the table
//! against the AWS calls `aws.rs` makes, and `make test` lints the policy and simulates every
//! call the integration tests recorded against it (`hack/iam-check.sh`).

use serde_json::{Value, json};

use super::tags::{CONTROLLER, MANAGED_BY, MANAGED_BY_VALUE, WARM};

/// One policy statement.
pub struct Statement {
    pub sid: &'static str,
    pub actions: &'static [&'static str],
    pub resources: &'static [&'static str],
    /// `StringEquals` conditions. In keys, `{managed}` and `{controller}` stand for our tag
    /// keys; in values, `{controller_id}` for the controller's id.
    pub condition: &'static [(&'static str, &'static [&'static str])],
    /// Keys whose tag the resources must carry, whatever its value (a `Null` condition).
    pub tagged: &'static [&'static str],
    /// Why an action is here that `aws.rs` never calls by name (EC2 authorizes it as part of
    /// another call).
    pub implied_by: Option<&'static str>,
    /// What the statement allows, for people reading the policy.
    pub why: &'static str,
}

/// What the placeholders of the policy become.
#[derive(Clone, Debug)]
pub struct Params {
    pub account: String,
    pub region: String,
    pub controller_id: String,
    /// The role in the runners' instance profile; `None` keeps the placeholder.
    pub runner_role: Option<String>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            account: "REPLACE_ACCOUNT_ID".into(),
            region: "REPLACE_AWS_REGION".into(),
            controller_id: "REPLACE_CONTROLLER_ID".into(),
            runner_role: None,
        }
    }
}

const REQUEST_OURS: &[(&str, &[&str])] = &[
    ("aws:RequestTag/{managed}", &[MANAGED_BY_VALUE]),
    ("aws:RequestTag/{controller}", &["{controller_id}"]),
];
const RESOURCE_OURS: &[(&str, &[&str])] = &[
    ("aws:ResourceTag/{managed}", &[MANAGED_BY_VALUE]),
    ("aws:ResourceTag/{controller}", &["{controller_id}"]),
];
const LAUNCH_TEMPLATES: &[&str] = &["arn:aws:ec2:{region}:{account}:launch-template/*"];

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
        tagged: &[],
        implied_by: None,
        why: "Validate pools (AMI, types, subnets, security groups), find launch templates, and \
              follow instances. EC2's Describe calls take no resource or tag scoping.",
    },
    Statement {
        sid: "ReadPricesForCostSnapshots",
        actions: &["ec2:DescribeSpotPriceHistory", "pricing:GetProducts"],
        resources: &["*"],
        condition: &[],
        tagged: &[],
        implied_by: None,
        why: "Optional: prices for the cost snapshot of each job. Without it prices stay empty \
              and Pacer warns once.",
    },
    Statement {
        sid: "ValidateInstanceProfile",
        actions: &["iam:GetInstanceProfile"],
        resources: &["arn:aws:iam::{account}:instance-profile/*"],
        condition: &[],
        tagged: &[],
        implied_by: None,
        why: "Optional: check that a pool's instance profile exists and has a role.",
    },
    Statement {
        sid: "CreateTaggedLaunchTemplate",
        actions: &["ec2:CreateLaunchTemplate"],
        resources: LAUNCH_TEMPLATES,
        condition: REQUEST_OURS,
        tagged: &[],
        implied_by: None,
        why: "Create a pool's launch template, only when the request tags it as this \
              controller's.",
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
        condition: RESOURCE_OURS,
        tagged: &[],
        implied_by: None,
        why: "New versions, the default version, and deletion, only of launch templates tagged \
              as this controller's.",
    },
    Statement {
        sid: "LaunchReadOnlyResources",
        actions: &["ec2:RunInstances", "ec2:CreateFleet"],
        resources: &[
            "arn:aws:ec2:{region}::image/*",
            "arn:aws:ec2:{region}:{account}:subnet/*",
            "arn:aws:ec2:{region}:{account}:security-group/*",
            "arn:aws:ec2:{region}:{account}:network-interface/*",
            "arn:aws:ec2:{region}:{account}:spot-instances-request/*",
        ],
        condition: &[],
        tagged: &[],
        implied_by: None,
        why: "Launch with the AMI, subnets and security groups the pool names, creating the \
              network interface and, for spot, the spot request that come with an instance. \
              Not Pacer's to tag; the instance itself must carry our tags.",
    },
    Statement {
        sid: "LaunchFromOurLaunchTemplate",
        actions: &["ec2:RunInstances", "ec2:CreateFleet"],
        resources: LAUNCH_TEMPLATES,
        condition: RESOURCE_OURS,
        tagged: &[],
        implied_by: None,
        why: "Launch only from launch templates tagged as this controller's.",
    },
    Statement {
        sid: "LaunchTaggedInstancesVolumesAndFleets",
        actions: &["ec2:RunInstances", "ec2:CreateFleet"],
        resources: &[
            "arn:aws:ec2:{region}:{account}:instance/*",
            "arn:aws:ec2:{region}:{account}:volume/*",
            "arn:aws:ec2:{region}:{account}:fleet/*",
        ],
        condition: REQUEST_OURS,
        tagged: &[],
        implied_by: None,
        why: "Create instances, their volumes and instant fleets only when the launch request \
              tags them as this controller's.",
    },
    Statement {
        sid: "TagOnCreate",
        actions: &["ec2:CreateTags"],
        resources: &["arn:aws:ec2:{region}:{account}:*"],
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
            ("aws:RequestTag/{managed}", &[MANAGED_BY_VALUE]),
            ("aws:RequestTag/{controller}", &["{controller_id}"]),
        ],
        tagged: &[],
        implied_by: Some(
            "tag specifications in CreateLaunchTemplate, CreateFleet and RunInstances",
        ),
        why: "Tags only as part of the creating call, and only this controller's tags: no tag \
              is ever changed afterwards.",
    },
    Statement {
        sid: "TerminateOnlyOurInstances",
        actions: &["ec2:TerminateInstances"],
        resources: &["arn:aws:ec2:{region}:{account}:instance/*"],
        condition: RESOURCE_OURS,
        tagged: &[],
        implied_by: None,
        why: "Terminate only instances tagged as this controller's.",
    },
    Statement {
        sid: "StopAndStartOnlyOurWarmInstances",
        actions: &["ec2:StartInstances", "ec2:StopInstances"],
        resources: &["arn:aws:ec2:{region}:{account}:instance/*"],
        condition: RESOURCE_OURS,
        tagged: &["{warm}"],
        implied_by: None,
        why: "Warm pools: stop a warm instance once it is prepared, and start it again for a \
              job, only for instances tagged as this controller's and launched warm (they carry \
              gha:warm, whatever its value); a job's own instance is never stopped or started. \
              Nothing is tagged: a warm instance's state is the one EC2 lists.",
    },
    Statement {
        sid: "PassRunnerInstanceProfile",
        actions: &["iam:PassRole"],
        resources: &["arn:aws:iam::{account}:role/{runner_role}"],
        condition: &[("iam:PassedToService", &["ec2.amazonaws.com"])],
        tagged: &[],
        implied_by: Some("launching from a template that names an instance profile"),
        why: "Pass exactly the runners' role to EC2, for pools with an instance profile.",
    },
];

fn fill(text: &str, params: &Params) -> String {
    text.replace("{managed}", MANAGED_BY)
        .replace("{warm}", WARM)
        .replace("{controller_id}", &params.controller_id)
        .replace("{controller}", CONTROLLER)
        .replace("{region}", &params.region)
        .replace("{account}", &params.account)
        .replace(
            "{runner_role}",
            params
                .runner_role
                .as_deref()
                .unwrap_or("REPLACE_RUNNER_INSTANCE_ROLE"),
        )
}

/// The whole policy document for `params`.
pub fn policy(params: &Params) -> Value {
    let one_or_many = |items: Vec<String>| {
        if items.len() == 1 {
            json!(items[0])
        } else {
            json!(items)
        }
    };
    let statements: Vec<Value> = STATEMENTS
        .iter()
        .map(|s| {
            let mut statement = json!({
                "Sid": s.sid,
                "Effect": "Allow",
                "Action": s.actions,
                "Resource": one_or_many(s.resources.iter().map(|r| fill(r, params)).collect()),
            });
            if !s.condition.is_empty() {
                let equals: serde_json::Map<String, Value> = s
                    .condition
                    .iter()
                    .map(|(k, v)| {
                        (
                            fill(k, params),
                            one_or_many(v.iter().map(|v| fill(v, params)).collect()),
                        )
                    })
                    .collect();
                statement["Condition"] = json!({ "StringEquals": equals });
            }
            if !s.tagged.is_empty() {
                let present: serde_json::Map<String, Value> = (s.tagged.iter())
                    .map(|k| {
                        (
                            format!("aws:ResourceTag/{}", fill(k, params)),
                            json!("false"),
                        )
                    })
                    .collect();
                statement["Condition"]["Null"] = Value::Object(present);
            }
            statement
        })
        .collect();
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// The policy as committed in `docs/iam-role.json`: placeholders for every value.
pub fn policy_json() -> String {
    policy_json_for(&Params::default())
}

/// The policy for `params`, pretty-printed.
pub fn policy_json_for(params: &Params) -> String {
    serde_json::to_string_pretty(&policy(params)).expect("a policy serializes") + "\n"
}

/// Each statement with what it allows, as Markdown (`docs/iam-policy.md`).
pub fn explained() -> String {
    let mut out = String::from(
        "# What each statement of Pacer's IAM policy allows\n\n\
         Generated from `src/cloud/iam_policy.rs` (`pacer iam-policy --explain`).\n\n\
         | Sid | Actions | What it allows |\n| --- | --- | --- |\n",
    );
    for s in STATEMENTS {
        let why = s.why.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            s.sid,
            s.actions.join(", "),
            why
        ));
    }
    out
}

/// `docs/iam-policy-builder.html`: a page that builds the same policy from a form, in the
/// browser only (no network, nothing sent anywhere). It holds the policy with its placeholders
/// and replaces each with the value typed, as `pacer iam-policy` does; and the statements with
/// what each allows.
pub fn builder_page() -> String {
    let template = policy_json();
    let explanations: Vec<Value> = STATEMENTS
        .iter()
        .map(|s| {
            json!({
                "sid": s.sid,
                "actions": s.actions,
                "why": s.why.split_whitespace().collect::<Vec<_>>().join(" "),
            })
        })
        .collect();
    // Inside <script>, `</` would end the element; JSON allows `<\/`.
    let embed = |v: &Value| v.to_string().replace("</", "<\\/");
    BUILDER_PAGE
        .replace("__TEMPLATE__", &embed(&Value::String(template)))
        .replace("__STATEMENTS__", &embed(&Value::Array(explanations)))
}

const BUILDER_PAGE: &str = include_str!("iam_policy_builder.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_builder_page_matches_the_code() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/iam-policy-builder.html");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == builder_page(),
            "{} is out of date: run `make generate` and commit the result",
            path.display()
        );
        // Nothing leaves the browser: no script, style or request from elsewhere.
        for forbidden in [
            "fetch(",
            "XMLHttpRequest",
            "src=\"http",
            "href=\"http",
            "WebSocket",
            "sendBeacon",
        ] {
            assert!(!committed.contains(forbidden), "{forbidden}");
        }
    }

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
    fn only_instances_launched_warm_are_stopped_or_started() {
        let policy = policy(&Params::default());
        let statements = policy["Statement"].as_array().unwrap();
        let starting: Vec<_> = (statements.iter())
            .filter(|s| {
                let actions = s["Action"].as_array().unwrap();
                actions
                    .iter()
                    .any(|a| a == "ec2:StartInstances" || a == "ec2:StopInstances")
            })
            .collect();
        assert_eq!(starting.len(), 1, "{starting:?}");
        let condition = &starting[0]["Condition"];
        assert_eq!(condition["Null"]["aws:ResourceTag/gha:warm"], "false");
        assert_eq!(
            condition["StringEquals"]["aws:ResourceTag/gha:managed-by"],
            "pacer"
        );
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
                .any(|(k, _)| k.contains("{controller}") || k.starts_with("iam:"))
                || s.sid == "LaunchReadOnlyResources";
            assert!(
                !mutating || scoped,
                "{} mutates without a tag condition",
                s.sid
            );
        }
    }

    #[test]
    fn values_fill_every_placeholder() {
        let text = policy_json_for(&Params {
            account: "123456789012".into(),
            region: "eu-west-1".into(),
            controller_id: "prod-eu".into(),
            runner_role: Some("ci-runner".into()),
        });
        for left in [
            "REPLACE_",
            "{managed}",
            "{controller",
            "{region}",
            "{account}",
            "{runner",
        ] {
            assert!(!text.contains(left), "{left} in {text}");
        }
        assert!(text.contains(r#""aws:ResourceTag/gha:controller": "prod-eu""#));
        assert!(text.contains("arn:aws:iam::123456789012:role/ci-runner"));
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
        let path = path.with_file_name("iam-policy.md");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == explained(),
            "{} is out of date: run `make generate`",
            path.display()
        );
    }
}
