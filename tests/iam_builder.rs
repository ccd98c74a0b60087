//! The IAM policy builder page builds, from a form's values, exactly what `pacer iam-policy`
//! prints for the same values: its own script is run by node on the committed page.

mod support;

use std::process::Command;

use serde_json::json;
use support::repo_root;

fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .arg("iam-policy")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn page(values: serde_json::Value) -> String {
    let out = Command::new("node")
        .arg(repo_root().join("tests/npm/iam-builder.mjs"))
        .arg(repo_root().join("docs/iam-policy-builder.html"))
        .arg(values.to_string())
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_page_builds_the_policy_the_cli_prints() {
    let cases = [
        (
            json!({"account": "123456789012", "region": "eu-west-1", "controllerId": "prod-eu", "runnerRole": "pacer-runner"}),
            vec![
                "--account",
                "123456789012",
                "--region",
                "eu-west-1",
                "--controller-id",
                "prod-eu",
                "--runner-role",
                "pacer-runner",
            ],
        ),
        (
            json!({"account": "210987654321", "region": "us-east-2", "controllerId": "ci"}),
            vec![
                "--account",
                "210987654321",
                "--region",
                "us-east-2",
                "--controller-id",
                "ci",
            ],
        ),
        (json!({}), vec![]),
    ];
    for (values, args) in cases {
        let built = page(values.clone());
        assert_eq!(built, cli(&args), "{values}");
        let policy: serde_json::Value = serde_json::from_str(&built).unwrap();
        assert!(policy["Statement"].as_array().unwrap().len() > 5);
    }
}
