//! The test ground's stand-ins for what cannot run here, as a process for `make demo`: the fake
//! GitHub (its REST API, state and faults) and the runner simulator (which boots every new
//! instance's real user-data with bash), the same code the integration tests use; and signed
//! webhook deliveries shaped like GitHub's.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[allow(dead_code)]
#[path = "../../tests/support/github.rs"]
mod github;
#[allow(dead_code)]
#[path = "../../tests/support/identity.rs"]
mod identity;
#[allow(dead_code)]
#[path = "../../tests/support/simulator.rs"]
mod simulator;
#[allow(dead_code)]
#[path = "../../tests/support/webhooks.rs"]
mod webhooks;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the fake GitHub and the runner simulator until interrupted. Writes into STATE:
    /// `github.env` (GITHUB_URL, GITHUB_APP_ID), `github-key.pem` (the App's key),
    /// `signer.pem` (the certificate to trust for identity documents), then `ready`.
    Serve {
        #[arg(long)]
        state: PathBuf,
        /// The controller whose instances are booted.
        #[arg(long)]
        controller_id: String,
        #[arg(long, env = "AWS_REGION")]
        region: String,
        #[arg(long, env = "AWS_ENDPOINT_URL")]
        endpoint: String,
        /// Repositories (`owner/name`) the App is installed on, as installation 1.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "example-org/api,example-org/web"
        )]
        repositories: Vec<String>,
        /// actions/runner versions to publish besides the simulator's own (pools may pin one).
        #[arg(long, value_delimiter = ',', default_value = "2.329.0")]
        runner_versions: Vec<String>,
    },
    /// Deliver one signed `workflow_job` webhook to `{url}/api/webhook`.
    Webhook {
        #[arg(long)]
        url: String,
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(long)]
        job_id: i64,
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// `completed` with conclusion `cancelled` and no runner, instead of `queued`.
        #[arg(long)]
        cancel: bool,
    },
}

async fn serve(
    state: &Path,
    controller_id: &str,
    region: String,
    endpoint: String,
    repositories: Vec<String>,
    runner_versions: Vec<String>,
) {
    std::fs::create_dir_all(state).unwrap();
    let github = github::FakeGitHub::start().await;
    github
        .state
        .lock()
        .unwrap()
        .installations
        .insert(1, repositories);
    std::fs::write(state.join("github-key.pem"), &github.private_key_pem).unwrap();
    std::fs::write(
        state.join("github.env"),
        format!(
            "GITHUB_URL={}\nGITHUB_APP_ID={}\n",
            github.url, github.app_id
        ),
    )
    .unwrap();
    let signer = identity::Signer::new(state);
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "testbed",
        ))
        .load()
        .await;
    let simulator = simulator::Simulator::start(
        &aws,
        &github,
        signer,
        controller_id,
        &state.join("instances"),
        simulator::Behaviour::default(),
    )
    .await;
    for version in &runner_versions {
        simulator.publish(&github, version);
    }
    std::fs::write(state.join("ready"), "").unwrap();
    eprintln!(
        "pacer-testbed: fake GitHub at {}, booting instances of controller {controller_id}",
        github.url
    );
    let _ = tokio::signal::ctrl_c().await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    match cli.command {
        Command::Serve {
            state,
            controller_id,
            region,
            endpoint,
            repositories,
            runner_versions,
        } => runtime.block_on(serve(
            &state,
            &controller_id,
            region,
            endpoint,
            repositories,
            runner_versions,
        )),
        Command::Webhook {
            url,
            secret_file,
            job_id,
            labels,
            cancel,
        } => {
            let secret = std::fs::read(&secret_file).unwrap();
            let secret = secret.trim_ascii_end();
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            let body = if cancel {
                webhooks::cancelled(job_id, &labels)
            } else {
                webhooks::queued(job_id, &labels)
            };
            let delivery = format!("demo-{job_id}-{}", if cancel { "cancel" } else { "queued" });
            runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    webhooks::deliver(&url, secret, &delivery, body),
                )
                .await
                .expect("delivered within 30 s")
            });
        }
    }
    ExitCode::SUCCESS
}
