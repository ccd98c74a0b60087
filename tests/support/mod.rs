//! The real test ground for integration tests: kube-apiserver + etcd + kube-controller-manager
//! and moto behind the AWS proxy, started once per test binary by `hack/ground.sh` and torn
//! down when the binary exits (the script waits on a pipe this process holds open).

#![allow(dead_code)] // each test binary uses its own part of the ground

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};

pub mod github;
pub mod identity;
pub mod invariants;
pub mod process;
pub mod proxy;
pub mod relay;
pub mod simulator;
pub mod webhooks;

/// Waits until the RunnerPool `name` is Ready; panics past `within`.
pub async fn wait_ready(pools: &Api<pacer::api::RunnerPool>, name: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let pool = pools.get(name).await.unwrap();
        if (pool.status.iter().flat_map(|s| &s.conditions))
            .any(|c| c.type_ == "Ready" && c.status == "True")
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool {name} never got Ready: {:?}",
            pool.status.map(|s| s.conditions)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The user this test runs as: a pool's `runnerUser` that the simulator can boot as.
pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs `command` and returns its standard output; panics, with both outputs, if it fails.
pub fn run(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// helm, built and cached by `hack/build-helm.sh`.
pub fn helm() -> PathBuf {
    PathBuf::from(run(Command::new("bash").arg(repo_root().join("hack/build-helm.sh"))).trim())
}

/// The Kubernetes version of the test ground (`hack/build-kube.sh`'s default), for
/// `helm template --kube-version`: the chart's `kubeVersion` is checked against it.
pub fn kube_version() -> String {
    let script = std::fs::read_to_string(repo_root().join("hack/build-kube.sh")).unwrap();
    script
        .lines()
        .find_map(|l| l.strip_prefix("KUBE_VERSION=\"${KUBE_VERSION:-"))
        .and_then(|rest| rest.strip_suffix("}\""))
        .expect("hack/build-kube.sh pins KUBE_VERSION")
        .to_string()
}

/// What parts of the ground a test binary needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    Kube,
    Aws,
    Both,
}

pub struct Ground {
    env: HashMap<String, String>,
    _script: Child,
}

static GROUND: OnceLock<Ground> = OnceLock::new();

/// The ground of this test binary, started on first use.
pub fn ground(parts: Parts) -> &'static Ground {
    GROUND.get_or_init(|| Ground::start(parts))
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An empty folder of this process for `name`, under the target's scratch folder. That folder
/// outlives the run (CI keeps the target in a cache), and process ids come round again on a
/// fresh machine (or are shared by two containers on one cache): the name carries the process's
/// start time too, and a folder of the same name is emptied all the same.
pub fn scratch(name: &str) -> PathBuf {
    static STARTED: OnceLock<u128> = OnceLock::new();
    let started = STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    });
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{:x}",
        std::process::id(),
        started % (1 << 32)
    ));
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot empty {}: {e}", dir.display()),
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Ground {
    fn start(parts: Parts) -> Self {
        let binary = std::env::current_exe().unwrap();
        let binary = binary.file_name().unwrap().to_string_lossy().to_string();
        // Emptied first: an earlier run's `env` there would be read as this ground's.
        let state = scratch(&format!("ground-{binary}"));
        let log_path = state.with_extension("log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut args = vec!["--until-stdin-closes".to_string()];
        match parts {
            Parts::Kube => args.push("--kube".into()),
            Parts::Aws => args.push("--aws".into()),
            Parts::Both => {}
        }
        args.push(state.display().to_string());
        let started = Instant::now();
        let mut script = Command::new("bash")
            .arg(repo_root().join("hack/ground.sh"))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("bash runs hack/ground.sh");
        let env_path = state.join("env");
        // The first run may build kube-apiserver from source; that takes minutes.
        let deadline = Instant::now() + Duration::from_secs(40 * 60);
        while !env_path.exists() {
            if let Some(status) = script.try_wait().unwrap() {
                let mut text = String::new();
                std::fs::File::open(&log_path)
                    .unwrap()
                    .read_to_string(&mut text)
                    .unwrap();
                panic!("hack/ground.sh exited with {status} before the ground was ready:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "the ground was not ready in time; see {}",
                log_path.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let env = std::fs::read_to_string(&env_path)
            .unwrap()
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        eprintln!(
            "test ground up in {:.1?} ({})",
            started.elapsed(),
            state.display()
        );
        let ground = Ground {
            env,
            _script: script,
        };
        if parts != Parts::Aws {
            ground.install_crds();
        }
        ground
    }

    /// A value from the ground's environment (`KUBECONFIG`, `AWS_PROXY_URL`, `FIXTURE_*`, ...).
    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("the ground has no {key}"))
    }

    pub fn fixture(&self, name: &str) -> &str {
        self.var(&format!("FIXTURE_{name}"))
    }

    /// The example RunnerPool `namespace/name`, pointed at the ground's AMI, subnets and
    /// security group.
    pub fn example_pool(&self, namespace: &str, name: &str) -> serde_json::Value {
        let text =
            std::fs::read_to_string(repo_root().join("examples/runnerpool-org-spot.yaml")).unwrap();
        let mut pool: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        pool["metadata"] = serde_json::json!({"name": name, "namespace": namespace});
        let spec = &mut pool["spec"];
        spec["ami"] = serde_json::json!(self.fixture("AMI_X86_64"));
        spec["subnets"] = serde_json::json!([self.fixture("SUBNET_A"), self.fixture("SUBNET_B")]);
        spec["securityGroups"] = serde_json::json!([self.fixture("SECURITY_GROUP")]);
        pool
    }

    /// A client for the ground's API server, built as the controller builds its own. Each test
    /// makes its own: clients belong to the runtime that built them.
    pub async fn kube_client(&self) -> kube::Client {
        pacer::controller::kube_client(self.kube_config().await).unwrap()
    }

    pub async fn kube_config(&self) -> kube::Config {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.var("KUBECONFIG")).unwrap();
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap()
    }

    /// A fresh namespace for one test.
    pub async fn namespace(&self, client: &kube::Client, test: &str) -> String {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!(
            "{}-{n}",
            test.replace('_', "-").chars().take(50).collect::<String>()
        );
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        name
    }

    /// The AWS SDK configuration the production clients would get, pointed at the proxy.
    pub async fn aws_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(self.var("AWS_REGION").to_string()))
            .endpoint_url(self.var("AWS_ENDPOINT_URL"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "ground",
            ))
            .load()
            .await
    }

    pub fn proxy(&self) -> proxy::Proxy {
        proxy::Proxy::new(self.var("AWS_PROXY_URL"))
    }

    /// Runs the ground's kubectl against its API server.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        self.kubectl_command()
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// The ground's kubectl, pointed at its API server, for more arguments.
    pub fn kubectl_command(&self) -> Command {
        let mut command = Command::new(self.var("KUBECTL"));
        command.arg("--kubeconfig").arg(self.var("KUBECONFIG"));
        command
    }

    /// Installs the CRDs this build generates, as `pacer crds | kubectl apply` would.
    fn install_crds(&self) {
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Runtime::new().unwrap().block_on(async {
                    let client = self.kube_client().await;
                    let api: Api<CustomResourceDefinition> = Api::all(client);
                    let params = PatchParams::apply("pacer-tests").force();
                    for crd in pacer::api::crds() {
                        let name = crd.metadata.name.clone().unwrap();
                        api.patch(&name, &params, &Patch::Apply(&crd))
                            .await
                            .unwrap();
                        let established = kube::runtime::conditions::is_crd_established();
                        tokio::time::timeout(
                            Duration::from_secs(30),
                            kube::runtime::wait::await_condition(api.clone(), &name, established),
                        )
                        .await
                        .expect("CRD established in 30 s")
                        .unwrap();
                    }
                })
            });
        });
    }
}
