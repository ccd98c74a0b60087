//! The runner simulator: plays the instances Pacer launches in moto. For each new instance of a
//! controller it takes the user-data from the instance's launch template (the
//! `aws:ec2launchtemplate:*` tags EC2 puts on it) and runs it with bash in a sandbox folder,
//! with
//! - an IMDS stand-in serving an identity document for the instance, signed with the test key;
//! - a release server (github.com's downloads, which only Pacer reaches: instances are refused)
//!   serving a small fake actions/runner tarball, published in the fake GitHub's releases API
//!   with its SHA-256; its `run.sh` takes the JIT config as actions/runner
//!   does (`--jitconfig`, or `ACTIONS_RUNNER_INPUT_JITCONFIG`, which the runner removes from its
//!   environment before any job starts), records it and how it came, runs a "job" that records
//!   its environment and every process's command line, and exits with the status the test chose;
//! - `shutdown` replaced by a stub, after which the simulator terminates the instance, as the
//!   launch template's shutdown behaviour would;
//! - when a test asks, GitHub's side of the job: the runner's job marks it busy and the job in
//!   progress in the fake GitHub (the fake `run.sh` waits until it has), and GitHub's
//!   `in_progress` and `completed` webhooks go to Pacer; and an instance terminated while it
//!   boots or runs stops there, as a real one does; `sudo` by one that logs its command line as
//!   sudo logs it to the journal and runs the command (as the same user: a test cannot switch
//!   users), and `useradd` and `chown` by no-ops, so a pool's other `runnerUser` boots too;
//! - when a test asks ([`Ec2Side`]), EC2's side of a spot instance: an interruption notice in
//!   its IMDS, its runner left waiting for a job, and its reclaim, which stops it at once.
//!
//! Nothing in Pacer knows: the script talks to the real listener over HTTP.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use base64::Engine as _;
use sha2::Digest as _;

use super::github::FakeGitHub;
use super::identity::{self, Signer};

/// The actions/runner version the fake release is published as.
pub const RUNNER_VERSION: &str = "2.999.0";

/// What a test may change about the simulated world.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// The status the fake runner exits with.
    pub runner_exit: i32,
    /// How long the fake runner runs its job, in seconds (0.2 when unset).
    pub runner_seconds: Option<f64>,
    /// IMDS serves a spot interruption notice for every instance.
    pub spot_notice: bool,
    /// The release server answers 404 to downloads.
    pub release_missing: bool,
    /// The releases API gives a digest that does not match the tarball.
    pub wrong_digest: bool,
    /// GitHub's side of each job is played: runner busy, job in progress, webhooks.
    pub github_side: Option<GitHubSide>,
    /// An instance terminated behind the script's back stops: its processes are killed.
    pub stop_when_terminated: bool,
}

/// What GitHub does while a Pacer runner runs its job.
#[derive(Clone, Debug, Default)]
pub struct GitHubSide {
    /// Where GitHub delivers the job's `in_progress` and `completed` webhooks (Pacer's public
    /// URL) and the secret it signs them with; `None`: none are sent.
    pub webhooks: Option<(String, Vec<u8>)>,
    /// The job's labels, as the webhooks carry them.
    pub labels: Vec<String>,
    /// Each delivery comes twice, under the same delivery id.
    pub duplicate: bool,
    /// For every third job, `completed` comes before `in_progress`.
    pub reorder: bool,
}

/// What became of one instance's boot.
#[derive(Clone, Debug, Default)]
pub struct Boot {
    /// bash's exit status, once it ended.
    pub exit: Option<i32>,
    /// The script called `shutdown`.
    pub shut_down: bool,
    /// The JIT config the fake runner was started with.
    pub jit_config: Option<String>,
    /// How the fake runner got it: `argv` or `env`.
    pub jit_via: Option<String>,
    /// What `sudo` logged: one `COMMAND=` line per call.
    pub sudo_log: String,
    /// The job's environment, as `env` printed it.
    pub job_env: String,
    /// Every process's command line while the job ran, one a line.
    pub processes: String,
    /// The user-data the instance ran.
    pub user_data: String,
    /// The sandbox folder (boot log at `state/boot.log`).
    pub dir: PathBuf,
    /// The instance was terminated while its runner ran the job, by anyone but EC2's reclaim.
    pub killed_busy: bool,
    /// EC2 reclaimed the spot instance ([`Ec2Side::reclaim`]); its runner, if busy, lost its
    /// job to EC2, not to Pacer.
    pub reclaimed: bool,
    /// The GitHub job id the instance was launched for (its `gha:job_id` tag).
    pub job_id: Option<i64>,
    /// A spot instance.
    pub spot: bool,
    /// Webhooks sent for the job, and how many of them Pacer did not accept.
    pub webhooks_sent: u32,
    pub webhooks_refused: u32,
    /// Starts after the first boot: 1 for a warm instance started again (its boot script run
    /// again, as its systemd unit runs it), and this is that boot.
    pub starts: u32,
    /// A warm instance (tagged `gha:warm`): stopped, its processes stop, whatever the
    /// behaviour.
    pub warm: bool,
}

struct Shared {
    signer: Signer,
    region: String,
    /// Instance id -> its identity document.
    documents: Mutex<HashMap<String, String>>,
    tarball: Vec<u8>,
    /// Release asset → how many times Pacer downloaded it.
    downloads: Mutex<HashMap<String, u32>>,
    behaviour: Behaviour,
    github: FakeGitHub,
    controller_id: String,
    /// The instances EC2 last listed pending or running.
    alive: Mutex<HashSet<String>>,
    /// Instances whose IMDS serves a spot interruption notice.
    notices: Mutex<HashSet<String>>,
    /// Instances whose runner GitHub gives no job.
    held: Mutex<HashSet<String>>,
    /// Instances EC2 reclaimed: stopped at once.
    reclaimed: Mutex<HashSet<String>>,
}

/// What EC2 does to the simulated spot instances when a test says so.
#[derive(Clone)]
pub struct Ec2Side {
    shared: Arc<Shared>,
}

impl Ec2Side {
    /// From now on the instance's IMDS serves a spot interruption notice.
    pub fn give_notice(&self, instance: &str) {
        self.shared.notices.lock().unwrap().insert(instance.into());
    }

    /// GitHub gives the instance's runner no job: it stays registered and waiting.
    pub fn hold(&self, instance: &str) {
        self.shared.held.lock().unwrap().insert(instance.into());
    }

    /// EC2 takes the instance back: whatever runs on it stops at once. The test terminates it
    /// in EC2 and gives it EC2's state reason itself.
    pub fn reclaim(&self, instance: &str) {
        self.shared
            .reclaimed
            .lock()
            .unwrap()
            .insert(instance.into());
    }
}

pub struct Simulator {
    pub boots: Arc<Mutex<HashMap<String, Boot>>>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// The release server's base URL, and the digest the releases API gives.
    base: String,
    published: String,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Simulator {
    /// Starts simulating the instances tagged `gha:controller=controller_id`.
    pub async fn start(
        aws: &aws_config::SdkConfig,
        github: &FakeGitHub,
        signer: Signer,
        controller_id: &str,
        dir: &Path,
        behaviour: Behaviour,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let tarball = fake_runner_tarball(dir);
        let digest = hex(&sha2::Sha256::digest(&tarball));
        let region = aws.region().unwrap().to_string();
        let shared = Arc::new(Shared {
            signer,
            region,
            documents: Mutex::default(),
            tarball,
            downloads: Mutex::default(),
            behaviour: behaviour.clone(),
            github: github.clone(),
            controller_id: controller_id.to_string(),
            alive: Mutex::default(),
            notices: Mutex::default(),
            held: Mutex::default(),
            reclaimed: Mutex::default(),
        });
        let app = Router::new()
            .route("/imds/{instance}/latest/api/token", put(imds_token))
            .route(
                "/imds/{instance}/latest/dynamic/instance-identity/{what}",
                get(imds_identity),
            )
            .route(
                "/imds/{instance}/latest/meta-data/{*path}",
                get(imds_metadata),
            )
            .route("/releases/{name}", get(download))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let published = if behaviour.wrong_digest {
            hex(&sha2::Sha256::digest(b"something else"))
        } else {
            digest
        };
        publish(github, &base, &published, RUNNER_VERSION);

        let ec2 = aws_sdk_ec2::Client::new(
            &aws.to_builder()
                .app_name(aws_config::AppName::new("pacer-simulator").unwrap())
                .build(),
        );
        let boots: Arc<Mutex<HashMap<String, Boot>>> = Arc::default();
        let task = tokio::spawn(watch(
            ec2,
            controller_id.to_string(),
            dir.to_path_buf(),
            base.clone(),
            shared.clone(),
            boots.clone(),
        ));
        Self {
            boots,
            shared,
            task,
            base,
            published,
        }
    }

    /// EC2's side of the instances: notices, held runners, reclaims.
    pub fn ec2_side(&self) -> Ec2Side {
        Ec2Side {
            shared: self.shared.clone(),
        }
    }

    /// Publishes the fake runner as actions/runner `version` too (for pools that pin one).
    pub fn publish(&self, github: &FakeGitHub, version: &str) {
        publish(github, &self.base, &self.published, version);
    }

    /// Release asset → how many times it was downloaded from github.com (by Pacer: the
    /// instances cannot reach it).
    pub fn release_downloads(&self) -> HashMap<String, u32> {
        self.shared.downloads.lock().unwrap().clone()
    }

    /// The boot of `instance`, once bash has ended.
    pub async fn finished(&self, instance: &str, within: Duration) -> Boot {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(boot) = self.boots.lock().unwrap().get(instance)
                && boot.exit.is_some()
            {
                return boot.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {instance} did not finish booting"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The fake runner's x64 and arm64 tarballs as release `version` in the fake GitHub.
fn publish(github: &FakeGitHub, base: &str, digest: &str, version: &str) {
    let assets: Vec<(String, String, String)> = ["x64", "arm64"]
        .iter()
        .map(|arch| {
            let name = pacer::github::runner_asset_name(version, arch);
            let url = format!("{base}/releases/{name}");
            (name, url, digest.to_string())
        })
        .collect();
    github.add_runner_release(version, &assets);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A tarball shaped like actions/runner's: `run.sh` and `bin/Runner.Listener`.
fn fake_runner_tarball(dir: &Path) -> Vec<u8> {
    let root = dir.join("fake-runner");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(
        root.join("run.sh"),
        r#"#!/bin/bash
# A stand-in for actions/runner's run.sh: takes the JIT config as the runner does, records it,
# runs a job that records what it can see, exits as told.
set -euo pipefail
if [ "${1:-}" = --jitconfig ] && [ -n "${2:-}" ]; then
  config=$2 via=argv
elif [ -n "${ACTIONS_RUNNER_INPUT_JITCONFIG:-}" ]; then
  # Runner.Listener reads ACTIONS_RUNNER_INPUT_* and removes them from its environment.
  config=$ACTIONS_RUNNER_INPUT_JITCONFIG via=env
  unset ACTIONS_RUNNER_INPUT_JITCONFIG
else
  echo "usage: run.sh --jitconfig CONFIG, or ACTIONS_RUNNER_INPUT_JITCONFIG set" >&2
  exit 2
fi
printf '%s' "$config" >jitconfig.received
printf '%s' "$via" >jitconfig.via
echo "fake runner: running one job as $(id -un) with a JIT config of ${#config} bytes"
# The job: what its environment holds, and every command line on the machine while it runs.
env >job.env
for cmdline in /proc/[0-9]*/cmdline; do
  tr '\0' ' ' <"$cmdline" 2>/dev/null || true
  echo
done >processes.seen
# With GitHub's side played, the job starts once GitHub marked it taken, and the runner exits
# once GitHub marked it done, as the real runner reports to GitHub before it exits.
handshake() {
  touch "$1"
  if [ -n "${FAKE_RUNNER_HANDSHAKE:-}" ]; then
    for _ in $(seq 1 200); do [ -e "$2" ] && return; sleep 0.05; done
  fi
}
handshake job.started job.taken
sleep "${FAKE_RUNNER_SECONDS:-0.2}"
handshake job.done job.released
exit "${FAKE_RUNNER_EXIT:-0}"
"#,
    )
    .unwrap();
    std::fs::write(
        root.join("bin/Runner.Listener"),
        format!("#!/bin/bash\n[ \"${{1:-}}\" = --version ] && echo {RUNNER_VERSION}\n"),
    )
    .unwrap();
    for file in ["run.sh", "bin/Runner.Listener"] {
        let status = std::process::Command::new("chmod")
            .arg("+x")
            .arg(root.join(file))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let out = std::process::Command::new("tar")
        .arg("-czf")
        .arg("-")
        .arg("-C")
        .arg(&root)
        .args(["run.sh", "bin"])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

async fn imds_token(headers: HeaderMap) -> Response {
    if headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .is_none()
    {
        return StatusCode::BAD_REQUEST.into_response();
    }
    "imds-session-token".into_response()
}

/// IMDSv2 only: no session token, no answer.
fn imds_session(headers: &HeaderMap) -> bool {
    headers
        .get("x-aws-ec2-metadata-token")
        .map(|v| v.as_bytes())
        == Some(b"imds-session-token")
}

async fn imds_identity(
    State(shared): State<Arc<Shared>>,
    UrlPath((instance, what)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !imds_session(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(document) = shared.documents.lock().unwrap().get(&instance).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match what.as_str() {
        "document" => document.into_response(),
        "rsa2048" => shared.signer.sign(&document).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Instance metadata: a spot interruption notice when the behaviour or the test says so,
/// nothing else.
async fn imds_metadata(
    State(shared): State<Arc<Shared>>,
    UrlPath((instance, path)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !imds_session(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let noticed =
        shared.behaviour.spot_notice || shared.notices.lock().unwrap().contains(&instance);
    if path == "spot/instance-action" && noticed {
        let at =
            k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_mins(2);
        let notice = serde_json::json!({"action": "terminate", "time": at.to_string()});
        return notice.to_string().into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}

/// github.com's release downloads, reachable from Pacer only: an instance (curl) is refused,
/// as one in a private subnet without a route to github.com would be.
async fn download(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let agent = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !agent.starts_with("pacer/") {
        return (
            StatusCode::FORBIDDEN,
            "github.com is not reachable from here",
        )
            .into_response();
    }
    if shared.behaviour.release_missing || !name.ends_with(".tar.gz") {
        return StatusCode::NOT_FOUND.into_response();
    }
    *shared.downloads.lock().unwrap().entry(name).or_default() += 1;
    shared.tarball.clone().into_response()
}

/// Looks for new instances of the controller and boots each once.
async fn watch(
    ec2: aws_sdk_ec2::Client,
    controller_id: String,
    dir: PathBuf,
    base: String,
    shared: Arc<Shared>,
    boots: Arc<Mutex<HashMap<String, Boot>>>,
) {
    let mut seen = HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(out) = ec2
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:gha:controller")
                    .values(&controller_id)
                    .build(),
            )
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .build(),
            )
            .send()
            .await
        else {
            continue;
        };
        *shared.alive.lock().unwrap() = (out.reservations().iter())
            .flat_map(|r| r.instances())
            .filter_map(|i| i.instance_id().map(String::from))
            .collect();
        for instance in out.reservations().iter().flat_map(|r| r.instances()) {
            let id = instance.instance_id().unwrap_or_default().to_string();
            if !seen.insert(id.clone()) {
                // A prepared warm instance whose boot ended when it was stopped, up again:
                // started, it runs its boot script again (systemd's unit on a real one).
                let restarted = {
                    let boots = boots.lock().unwrap();
                    (boots.get(&id))
                        .filter(|b| b.exit.is_some() && b.starts == 0)
                        .map(|b| {
                            let state = b.dir.join("state");
                            (state.join("prepared").exists() && state.join("boot.sh").exists())
                                .then(|| b.dir.clone())
                        })
                };
                if let Some(Some(sandbox)) = restarted {
                    // EC2 writes the identity document again at every start.
                    let pending = k8s_openapi::jiff::Timestamp::now().to_string();
                    let arch = match instance.architecture().map(|a| a.as_str()) {
                        Some("arm64") => "arm64",
                        _ => "x86_64",
                    };
                    let document =
                        identity::document("123456789012", &shared.region, &id, arch, &pending);
                    shared
                        .documents
                        .lock()
                        .unwrap()
                        .insert(id.clone(), document);
                    if let Some(boot) = boots.lock().unwrap().get_mut(&id) {
                        *boot = Boot {
                            user_data: boot.user_data.clone(),
                            dir: boot.dir.clone(),
                            spot: boot.spot,
                            warm: boot.warm,
                            starts: 1,
                            ..Default::default()
                        };
                    }
                    let script = sandbox.join("state/boot.sh");
                    tokio::spawn(run_boot(
                        ec2.clone(),
                        id,
                        (sandbox, script),
                        base.clone(),
                        shared.clone(),
                        boots.clone(),
                    ));
                }
                continue;
            }
            let tag = |key: &str| {
                instance
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some(key))
                    .and_then(|t| t.value())
                    .map(String::from)
            };
            let template =
                tag("aws:ec2launchtemplate:id").zip(tag("aws:ec2launchtemplate:version"));
            let pending = instance
                .launch_time()
                .and_then(|t| k8s_openapi::jiff::Timestamp::from_second(t.secs()).ok())
                .unwrap_or_else(k8s_openapi::jiff::Timestamp::now)
                .to_string();
            let arch = match instance.architecture().map(|a| a.as_str()) {
                Some("arm64") => "arm64",
                _ => "x86_64",
            };
            let document = identity::document("123456789012", &shared.region, &id, arch, &pending);
            shared
                .documents
                .lock()
                .unwrap()
                .insert(id.clone(), document);
            let launched = Launched {
                warm: tag("gha:warm").is_some(),
                job_id: tag("gha:job_id").and_then(|j| j.parse().ok()),
                spot: instance.instance_lifecycle()
                    == Some(&aws_sdk_ec2::types::InstanceLifecycleType::Spot),
                template,
            };
            tokio::spawn(boot(
                ec2.clone(),
                id,
                launched,
                dir.clone(),
                base.clone(),
                shared.clone(),
                boots.clone(),
            ));
        }
    }
}

/// What EC2 says of an instance at its launch.
struct Launched {
    warm: bool,
    job_id: Option<i64>,
    spot: bool,
    /// Its launch template's id and version.
    template: Option<(String, String)>,
}

#[allow(clippy::too_many_arguments)]
async fn boot(
    ec2: aws_sdk_ec2::Client,
    id: String,
    launched: Launched,
    dir: PathBuf,
    base: String,
    shared: Arc<Shared>,
    boots: Arc<Mutex<HashMap<String, Boot>>>,
) {
    // EC2 tags instances launched from a template with it; moto does so for RunInstances but
    // not for CreateFleet, where the instance's own userData attribute is the template's.
    let encoded = match launched.template {
        Some((template, version)) => ec2
            .describe_launch_template_versions()
            .launch_template_id(&template)
            .versions(&version)
            .send()
            .await
            .unwrap()
            .launch_template_versions()[0]
            .launch_template_data()
            .and_then(|d| d.user_data())
            .unwrap_or_default()
            .to_string(),
        None => ec2
            .describe_instance_attribute()
            .instance_id(&id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap()
            .user_data()
            .and_then(|v| v.value())
            .unwrap_or_default()
            .to_string(),
    };
    let user_data = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap();
    let sandbox = dir.join(&id);
    let stubs = sandbox.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    std::fs::write(sandbox.join("user-data.sh"), &user_data).unwrap();
    std::fs::write(
        stubs.join("shutdown"),
        format!(
            "#!/bin/bash\necho \"$*\" >>'{}'\n",
            sandbox.join("shutdown.called").display()
        ),
    )
    .unwrap();
    std::fs::write(
        stubs.join("sudo"),
        format!(
            "#!/bin/bash\n# sudo logs each command line to the journal: COMMAND=...\n\
             echo \"sudo: root : COMMAND=$*\" >>'{}'\n\
             while [ $# -gt 0 ] && [ \"$1\" != -- ]; do shift; done\nshift\nexec \"$@\"\n",
            sandbox.join("sudo.log").display()
        ),
    )
    .unwrap();
    std::fs::write(stubs.join("useradd"), "#!/bin/bash\n").unwrap();
    // A warm instance installs a unit to run its boot script again at its next start.
    std::fs::create_dir_all(sandbox.join("systemd")).unwrap();
    std::fs::write(
        stubs.join("systemctl"),
        format!(
            "#!/bin/bash\necho \"$*\" >>'{}'\n",
            sandbox.join("systemctl.log").display()
        ),
    )
    .unwrap();
    std::fs::write(stubs.join("chown"), "#!/bin/bash\n").unwrap();
    for stub in ["shutdown", "sudo", "useradd", "chown", "systemctl"] {
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(stubs.join(stub))
            .status()
            .unwrap();
    }
    boots.lock().unwrap().insert(
        id.clone(),
        Boot {
            user_data,
            dir: sandbox.clone(),
            job_id: launched.job_id,
            spot: launched.spot,
            warm: launched.warm,
            ..Default::default()
        },
    );
    let script = sandbox.join("user-data.sh");
    run_boot(ec2, id, (sandbox, script), base, shared, boots).await;
}

/// Runs a boot script of the instance in its sandbox, as the instance, to its end, and records
/// what became of it.
async fn run_boot(
    ec2: aws_sdk_ec2::Client,
    id: String,
    (sandbox, script): (PathBuf, PathBuf),
    base: String,
    shared: Arc<Shared>,
    boots: Arc<Mutex<HashMap<String, Boot>>>,
) {
    let behaviour = &shared.behaviour;
    let stubs = sandbox.join("stubs");
    let path = format!(
        "{}:{}",
        stubs.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bash = tokio::process::Command::new("bash");
    bash.arg(&script)
        .current_dir(&sandbox)
        .env("PATH", path)
        .env("PACER_IMDS_URL", format!("{base}/imds/{id}"))
        .env("PACER_STATE_DIR", sandbox.join("state"))
        .env("PACER_RUNNER_DIR", sandbox.join("runner"))
        .env("PACER_SYSTEMD_DIR", sandbox.join("systemd"))
        .env("FAKE_RUNNER_EXIT", behaviour.runner_exit.to_string())
        .env(
            "FAKE_RUNNER_SECONDS",
            behaviour.runner_seconds.unwrap_or(0.2).to_string(),
        )
        .env("PACER_NOTICE_POLL", "0.5")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let warm = boots.lock().unwrap().get(&id).is_some_and(|b| b.warm);
    if behaviour.stop_when_terminated {
        // Its own process group, so that termination stops the whole instance. Otherwise the
        // scripts share the simulator's group and end with it (`make demo`'s Ctrl-C).
        bash.process_group(0);
    }
    if behaviour.github_side.is_some() {
        bash.env("FAKE_RUNNER_HANDSHAKE", "1");
    }
    let child = bash.spawn().unwrap();
    let (status, played) = run_instance(child, &id, &sandbox, &shared, warm).await;
    let shut_down = sandbox.join("shutdown.called").exists();
    if shut_down {
        // The launch template terminates the instance on shutdown.
        let _ = ec2.terminate_instances().instance_ids(&id).send().await;
    }
    let jit_config = std::fs::read_to_string(sandbox.join("runner/jitconfig.received")).ok();
    let read = |name: &str| std::fs::read_to_string(sandbox.join(name)).unwrap_or_default();
    let mut boots = boots.lock().unwrap();
    let boot = boots.get_mut(&id).unwrap();
    boot.jit_via = std::fs::read_to_string(sandbox.join("runner/jitconfig.via")).ok();
    boot.sudo_log = read("sudo.log");
    boot.job_env = read("runner/job.env");
    boot.processes = read("runner/processes.seen");
    boot.exit = Some(status.code().unwrap_or(-1));
    boot.shut_down = shut_down;
    boot.jit_config = jit_config;
    boot.killed_busy = played.killed_busy;
    boot.reclaimed = played.reclaimed;
    boot.webhooks_sent = played.webhooks_sent;
    boot.webhooks_refused = played.webhooks_refused;
}

/// What happened around one instance's script while it ran.
#[derive(Default)]
struct Played {
    killed_busy: bool,
    reclaimed: bool,
    webhooks_sent: u32,
    webhooks_refused: u32,
}

/// Runs the instance's script to its end, playing GitHub's side of its job, and stopping it if
/// the instance is terminated meanwhile (when the behaviour says so).
async fn run_instance(
    mut bash: tokio::process::Child,
    id: &str,
    sandbox: &Path,
    shared: &Shared,
    warm: bool,
) -> (std::process::ExitStatus, Played) {
    let runner = sandbox.join("runner");
    let mut played = Played::default();
    let mut job = None;
    let mut deliveries = Vec::new();
    let status = loop {
        tokio::select! {
            status = bash.wait() => break status.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        let marked = |name: &str| runner.join(name).exists();
        let held = shared.held.lock().unwrap().contains(id);
        if marked("job.started") && !marked("job.taken") && !held {
            job = take_job(shared, &runner);
            if let Some(job) = &job {
                deliveries.extend(job.deliveries(shared, "in_progress"));
            }
            std::fs::write(runner.join("job.taken"), "").unwrap();
        }
        if marked("job.done") && !marked("job.released") {
            if let Some(job) = &job {
                job.release(shared);
                deliveries.extend(job.deliveries(shared, "completed"));
            }
            std::fs::write(runner.join("job.released"), "").unwrap();
        }
        // EC2's reclaim stops the instance at once, whatever the behaviour.
        played.reclaimed = shared.reclaimed.lock().unwrap().contains(id);
        if played.reclaimed || !shared.alive.lock().unwrap().contains(id) {
            played.killed_busy |= !played.reclaimed && marked("job.started") && !marked("job.done");
            if (played.reclaimed || shared.behaviour.stop_when_terminated || warm)
                && let Some(pid) = bash.id()
            {
                if shared.behaviour.stop_when_terminated {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", "--", &format!("-{pid}")])
                        .status();
                } else {
                    kill_tree(pid);
                }
                break bash.wait().await.unwrap();
            }
        }
    };
    for delivery in deliveries {
        let (sent, refused) = delivery.await.unwrap_or_default();
        played.webhooks_sent += sent;
        played.webhooks_refused += refused;
    }
    (status, played)
}

/// Kills process `pid` and every process under it, as an instance that stops stops, when they
/// share the simulator's process group.
fn kill_tree(pid: u32) {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (command) state ppid ...": the parent is the second field after the command.
        let parent = (stat.rsplit_once(')'))
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(parent) = parent {
            children.entry(parent).or_default().push(child);
        }
    }
    // Parents first, so that none starts another child meanwhile.
    let mut left = vec![pid];
    while let Some(p) = left.pop() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
        left.extend(children.get(&p).into_iter().flatten());
    }
}

/// The job a runner took, as GitHub knows it.
struct TakenJob {
    target: String,
    runner: (i64, String),
    job_id: i64,
    repository: String,
}

/// GitHub marks the runner whose JIT config the fake runner received busy, and its job in
/// progress with it.
fn take_job(shared: &Shared, runner_dir: &Path) -> Option<TakenJob> {
    shared.behaviour.github_side.as_ref()?;
    let config = std::fs::read_to_string(runner_dir.join("jitconfig.received")).ok()?;
    let config = base64::engine::general_purpose::STANDARD
        .decode(config.trim())
        .ok()?;
    let config = String::from_utf8(config).ok()?;
    let (target, name) = config.strip_prefix("jit:")?.rsplit_once(':')?;
    let (job_id, _) = pacer::github::job_id_of_runner(&shared.controller_id, name)?;
    let runner_id = shared.github.runner_id(target, name)?;
    let repository = shared.github.job_repository(job_id)?;
    shared.github.set_busy(target, name, true);
    let runner = Some((runner_id, name));
    (shared.github).set_job(&repository, job_id, "in_progress", runner);
    Some(TakenJob {
        target: target.to_string(),
        runner: (runner_id, name.to_string()),
        job_id,
        repository,
    })
}

impl TakenJob {
    /// The job ended: the runner is idle and the job completed.
    fn release(&self, shared: &Shared) {
        shared.github.set_busy(&self.target, &self.runner.1, false);
        (shared.github).set_job(&self.repository, self.job_id, "completed", None);
    }

    /// Delivers GitHub's `action` webhook for the job in the background: twice when
    /// duplicated; for every third job, when reordered, `in_progress` goes out only after
    /// `completed`. Yields (sent, refused).
    fn deliveries(
        &self,
        shared: &Shared,
        action: &str,
    ) -> Option<tokio::task::JoinHandle<(u32, u32)>> {
        let side = shared.behaviour.github_side.clone()?;
        let (url, secret) = side.webhooks.clone()?;
        let labels: Vec<&str> = side.labels.iter().map(String::as_str).collect();
        let runner = (self.runner.0, self.runner.1.as_str());
        let in_progress = super::webhooks::in_progress(self.job_id, &labels, runner);
        let completed = super::webhooks::completed(self.job_id, &labels, runner, "success");
        let held = side.reorder && self.job_id % 3 == 0;
        let bodies = match (action, held) {
            ("in_progress", true) => vec![],
            ("in_progress", false) => vec![("in_progress", in_progress)],
            (_, true) => vec![("completed", completed), ("in_progress", in_progress)],
            _ => vec![("completed", completed)],
        };
        let times = if side.duplicate { 2 } else { 1 };
        let job_id = self.job_id;
        Some(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let (mut sent, mut refused) = (0, 0);
            for (action, body) in bodies {
                let delivery = format!("{action}-{job_id}");
                for _ in 0..times {
                    let answer =
                        super::webhooks::send(&client, &url, &secret, &delivery, body.clone())
                            .await;
                    sent += 1;
                    if !answer.is_ok_and(|a| a.status().is_success()) {
                        refused += 1;
                    }
                }
            }
            (sent, refused)
        }))
    }
}
