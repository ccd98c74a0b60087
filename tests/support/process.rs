//! `pacer run` as a process, configured for the test ground: moto behind the proxy, a
//! kubeconfig, and either the fake GitHub or an unreachable one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::Ground;

/// The webhook secret every process started here checks deliveries against.
pub const WEBHOOK_SECRET: &[u8] = b"pacer process webhook secret";

/// A loopback port nothing listens on, for a server started later. It is drawn below Linux's
/// ephemeral range (32768 and up), where a busy machine's outgoing connections take their local
/// ports, so only another listener can take it before the server binds; and no port is handed
/// out twice in one test binary.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_usize(given.len());
        let port = 20_000 + (hasher.finish() % 12_768) as u16;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// How to start one process.
pub struct Setup<'a> {
    /// The replica's name (`POD_NAME`), its config and log file names.
    pub name: &'a str,
    pub controller_id: &'a str,
    /// The namespace watched, and the Lease's.
    pub namespace: &'a str,
    /// Defaults to the ground's (an administrator).
    pub kubeconfig: Option<PathBuf>,
    /// The fake GitHub's URL, App id and private key; `None` for an unreachable GitHub.
    pub github: Option<(String, u64, Vec<u8>)>,
    /// The URL instances are told to call (a Service's, in front of every replica); `None`:
    /// this process's own listener.
    pub public_url: Option<String>,
}

pub struct Pacer {
    pub child: Child,
    pub listen: u16,
    pub metrics: u16,
    pub log: PathBuf,
}

impl Pacer {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listen)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `pacer run`; its files (config, keys, log) go into `dir`. Instances it launches may
/// bootstrap with documents signed by `support::identity::Signer::at(dir)`.
pub fn start(ground: &Ground, dir: &Path, setup: Setup<'_>) -> Pacer {
    start_with_env(ground, dir, setup, &[])
}

/// [`start`], with `PACER_*` overrides (or other variables) in the process's environment.
pub fn start_with_env(
    ground: &Ground,
    dir: &Path,
    setup: Setup<'_>,
    env: &[(&str, &str)],
) -> Pacer {
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join("github-key.pem");
    let (github_url, app_id) = match &setup.github {
        Some((url, app_id, pem)) => {
            std::fs::write(&key, pem).unwrap();
            (url.clone(), *app_id)
        }
        None => {
            if !key.exists() {
                let made = Command::new("openssl")
                    .args(["genrsa", "-out"])
                    .arg(&key)
                    .arg("2048")
                    .stderr(Stdio::null())
                    .status()
                    .unwrap();
                assert!(made.success());
            }
            ("http://127.0.0.1:9".to_string(), 1)
        }
    };
    std::fs::write(dir.join("webhook-secret"), WEBHOOK_SECRET).unwrap();
    if !dir.join("signer.pem").exists() {
        super::identity::Signer::new(dir);
        super::identity::callback_key(dir);
    }
    let (listen, metrics) = (free_port(), free_port());
    let public_url =
        (setup.public_url.clone()).unwrap_or_else(|| format!("http://127.0.0.1:{listen}"));
    let config = dir.join(format!("{}.yaml", setup.name));
    std::fs::write(
        &config,
        format!(
            "allow_insecure_http: true\naws:\n  region: {region}\n  endpoint_url: {endpoint}\n\
             server:\n  public_url: {public_url}\n  listen: 127.0.0.1:{listen}\n  metrics_listen: 127.0.0.1:{metrics}\n\
             github:\n  app_id: {app_id}\n  api_url: {github_url}\n  private_key_file: {key}\n  webhook_secret_file: {secret}\n\
             runners:\n  callback_key_file: {callback}\n  identity_certificates_file: {certs}\n\
             \x20 release_source: {github_url}/repos/actions/runner/releases\n  release_cache_dir: {releases}\n\
             controller:\n  id: {id}\n  namespace: {ns}\n",
            region = ground.var("AWS_REGION"),
            endpoint = ground.var("AWS_ENDPOINT_URL"),
            key = key.display(),
            secret = dir.join("webhook-secret").display(),
            callback = dir.join("callback-key").display(),
            certs = dir.join("signer.pem").display(),
            releases = dir.join(format!("{}-releases", setup.name)).display(),
            id = setup.controller_id,
            ns = setup.namespace,
        ),
    )
    .unwrap();
    let log = dir.join(format!("{}.log", setup.name));
    let out = std::fs::File::create(&log).unwrap();
    let kubeconfig = setup
        .kubeconfig
        .unwrap_or_else(|| PathBuf::from(ground.var("KUBECONFIG")));
    // `PACER_BIN` runs another build (a release binary, say) in place of this crate's own; it is
    // kept from the child, which refuses `PACER_*` variables that are not configuration keys.
    let bin = std::env::var_os("PACER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_pacer").into());
    let child = Command::new(bin)
        .env_remove("PACER_BIN")
        .args(["run", "--config"])
        .arg(&config)
        .env("KUBECONFIG", kubeconfig)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("POD_NAME", setup.name)
        .env("POD_NAMESPACE", setup.namespace)
        .envs(env.iter().copied())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut pacer = Pacer {
        child,
        listen,
        metrics,
        log,
    };
    pacer.wait_listening();
    pacer
}

impl Pacer {
    /// Returns once the listener accepts connections: a test that posts at once must not race
    /// the bind, which comes after the API server answered, on a busy machine seconds later.
    fn wait_listening(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.listen)).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "pacer exited ({status}) before listening:\n{}",
                    self.log_text()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pacer did not listen on {} within 60 s:\n{}",
                self.listen,
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
