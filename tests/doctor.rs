//! `pacer doctor` against a running installation on the test ground (pacer as a process, the
//! fake GitHub, a Ready pool): every check OK, then one thing broken at a time, each named by
//! its own failing line while the rest stay OK.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, PostParams};
use pacer::api::RunnerPool;
use serde_json::json;
use support::github::FakeGitHub;
use support::process::{self, Pacer};
use support::{Parts, ground};

struct Report {
    ok: bool,
    lines: Vec<String>,
}

impl Report {
    /// The lines that failed, by what they check.
    fn failed(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("FAIL  "))
            .map(|l| l.split(':').next().unwrap().to_string())
            .collect()
    }
}

fn doctor(config: &Path, ns: &str, env: &[(&str, &str)]) -> Report {
    let out = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .args(["doctor", "--config"])
        .arg(config)
        .args(["--lease-namespace", ns])
        .env("KUBECONFIG", ground(Parts::Both).var("KUBECONFIG"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<String> = text.lines().map(String::from).collect();
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("OK    ") || l.starts_with("FAIL  ")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Report {
        ok: out.status.success(),
        lines,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_says_ok_then_names_each_broken_part() {
    let ground = ground(Parts::Both);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "doctor").await;
    let dir = support::scratch(&format!("doctor-{ns}"));
    let github = FakeGitHub::start().await;
    github.install(1, &["example-org/api"]);
    let asset = pacer::github::runner_asset_name("2.999.0", "x64");
    let url = format!("http://127.0.0.1:9/{asset}");
    github.add_runner_release("2.999.0", &[(asset, url, "0".repeat(64))]);
    let mut pacer: Pacer = process::start(
        ground,
        &dir,
        process::Setup {
            name: "doctor",
            controller_id: "doctor",
            namespace: &ns,
            kubeconfig: None,
            github: Some((
                github.url.clone(),
                github.app_id,
                github.private_key_pem.clone(),
            )),
            public_url: None,
        },
    );
    let config = dir.join("doctor.yaml");
    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let mut pool = ground.example_pool(&ns, "linux");
    pool["spec"]["github"] = json!({"scope": "org", "owner": "example-org"});
    let pool: RunnerPool = serde_json::from_value(pool).unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    // Healthy: every line OK, once the pool is reconciled and a replica leads.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let healthy = loop {
        let report = doctor(&config, &ns, &[]);
        if report.ok {
            break report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never healthy:\n{}\npacer:\n{}",
            report.lines.join("\n"),
            pacer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("{}", healthy.lines.join("\n"));
    let names: Vec<&str> = healthy
        .lines
        .iter()
        .map(|l| l[6..].split(':').next().unwrap())
        .collect();
    for expected in [
        "config",
        "secrets",
        "identity certificates",
        "aws",
        "crds",
        &format!("pool {ns}/linux"),
        "github example-org",
        "leader",
        "runner_release",
        "public_url",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} not checked: {names:?}"
        );
    }
    let token_calls = github.calls_of("create_installation_token");
    assert!(token_calls > 0);

    // One thing broken at a time, through the PACER_* overrides of the same config.
    let other_key = dir.join("other-key.pem");
    let made = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&other_key)
        .arg("2048")
        .output()
        .unwrap();
    assert!(made.status.success());
    let other_key = other_key.to_str().unwrap().to_string();
    for (env, broken) in [
        (
            ("PACER_SERVER_PUBLIC_URL", "http://127.0.0.1:1"),
            vec!["public_url".to_string()],
        ),
        (
            ("PACER_GITHUB_PRIVATE_KEY_FILE", other_key.as_str()),
            vec!["github example-org".into()],
        ),
        (
            (
                "PACER_RUNNERS_IDENTITY_CERTIFICATES_FILE",
                "/nonexistent/certs.pem",
            ),
            vec!["identity certificates".into()],
        ),
        (
            ("PACER_AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            vec!["aws".into(), format!("pool {ns}/linux")],
        ),
        (
            (
                "PACER_RUNNERS_RELEASE_SOURCE",
                "http://127.0.0.1:1/releases",
            ),
            vec!["runner_release".into()],
        ),
    ] {
        let report = doctor(&config, &ns, &[env]);
        assert!(!report.ok, "{env:?}: {}", report.lines.join("\n"));
        assert_eq!(
            report.failed(),
            broken,
            "{env:?}:\n{}",
            report.lines.join("\n")
        );
    }

    // Without a certificate file, AWS's bundled certificate for the region is the one trusted.
    let report = doctor(
        &config,
        &ns,
        &[("PACER_RUNNERS_IDENTITY_CERTIFICATES_FILE", "")],
    );
    let identity = report
        .lines
        .iter()
        .find(|l| l[6..].starts_with("identity certificates:"))
        .unwrap();
    assert!(
        identity.starts_with("OK") && identity.contains("AWS's certificate for us-east-1, bundled"),
        "{identity}"
    );

    // EC2 refuses the pool's launch (as a missing IAM statement would).
    ground
        .proxy()
        .add_fault(json!({
            "action": "CreateFleet", "code": "UnauthorizedOperation", "status": 403,
            "message": "You are not authorized to perform this operation.", "count": 1,
            "match": {"DryRun": "true"},
        }))
        .await;
    let report = doctor(&config, &ns, &[]);
    assert_eq!(
        report.failed(),
        vec![format!("pool {ns}/linux")],
        "{}",
        report.lines.join("\n")
    );

    // The account has no EC2 Spot service-linked role, and Pacer's role may not create it.
    ground
        .proxy()
        .add_fault(json!({
            "action": "CreateFleet", "code": "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
            "status": 403, "count": 1, "match": {"DryRun": "true"},
            "message": "The provided credentials do not have permission to create the service-linked role for EC2 Spot Instances.",
        }))
        .await;
    let report = doctor(&config, &ns, &[]);
    assert_eq!(
        report.failed(),
        vec![format!("pool {ns}/linux")],
        "{}",
        report.lines.join("\n")
    );
    let line = report.lines.iter().find(|l| l.starts_with("FAIL")).unwrap();
    assert!(
        line.contains("AWSServiceRoleForEC2Spot")
            && line.contains(
                "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com"
            ),
        "{line}"
    );

    // Pacer stops: nobody leads and nothing listens.
    let pid = pacer.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    pacer.child.wait().unwrap();
    let report = doctor(&config, &ns, &[]);
    assert_eq!(
        report.failed(),
        vec!["leader".to_string(), "public_url".into()],
        "{}",
        report.lines.join("\n")
    );
}
