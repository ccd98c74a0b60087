//! The configuration file, its `PACER_*` environment overrides, and the secrets it points at.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::runner::identity::TrustRoots;

/// Why a configuration could not be used. Every message names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// The instances' trust roots cannot be had: the file's message names the file.
    #[error("runners.identity_certificates_file: {0}")]
    IdentityCertificates(String),
    #[error("cannot read {key} from {path}: {source}")]
    Secret {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The whole configuration. Unknown keys are an error.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub aws: AwsConfig,
    pub server: ServerConfig,
    pub github: GitHubConfig,
    pub runners: RunnersConfig,
    #[serde(default)]
    pub controller: ControllerConfig,
    /// What is logged, as a tracing filter (`info`, `debug`, `pacer=debug,info`); the
    /// `PACER_LOG` and `RUST_LOG` environment variables win over it.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Accept `http://` for `server.public_url`, `github.api_url` and `runners.release_source`.
    /// Off: plain HTTP there carries webhook signatures, callback tokens, runner configs, the
    /// App's tokens and the runner release in the clear, so Pacer refuses it; tests and the
    /// demo on loopback set it, and Pacer warns at start while it is on.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Namespace → the GitHub owners (and `owner/name` repositories) its RunnerPools may
    /// serve. Empty: any pool may serve any owner the App reaches. Set: a namespace without an
    /// entry serves nothing (see docs/security.md).
    #[serde(default)]
    pub tenants: std::collections::BTreeMap<String, crate::domain::tenancy::Tenant>,
}

/// How launched instances prove who they are and call back.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunnersConfig {
    /// The key callback tokens are signed with (at least 32 bytes, such as `openssl rand -hex
    /// 32`), mounted from a Secret.
    pub callback_key_file: PathBuf,
    /// PEM certificates trusted to sign instance identity documents. Empty: AWS's RSA-2048
    /// certificate for `aws.region`, bundled for every commercial region (see
    /// docs/instances.md); set it for other partitions, newer regions, or a signer of your own.
    #[serde(default)]
    pub identity_certificates_file: Option<PathBuf>,
    /// PEM CA certificate(s) the instances trust for `server.public_url`, when its certificate
    /// is not from a public CA (a private CA with `tls.mode: manual`). Public data: it is put
    /// in the user-data. Empty: the AMI's trust store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Where Pacer reads actions/runner releases, which it downloads once, checks against
    /// their published SHA-256 and serves to its instances itself: a URL that answers
    /// `/latest` and `/tags/v{version}` as GitHub's releases API does, with each asset's
    /// `digest`. Empty: GitHub's releases of actions/runner, read without credentials (set a
    /// mirror for GitHub Enterprise Server without a route to api.github.com, or networks
    /// without internet access; see docs/instances.md).
    #[serde(default)]
    pub release_source: Option<String>,
    /// The folder the downloaded releases are kept in (a few at most, about 200 MB each).
    /// Empty: `pacer-runner-releases` in the system's temporary folder.
    #[serde(default)]
    pub release_cache_dir: Option<PathBuf>,
}

impl RunnersConfig {
    /// Where actions/runner releases are described.
    pub fn release_source(&self) -> &str {
        (self.release_source.as_deref()).unwrap_or(crate::runner::release::GITHUB_RELEASES)
    }

    /// Where downloaded releases are kept.
    pub fn release_cache_dir(&self) -> PathBuf {
        (self.release_cache_dir.clone())
            .unwrap_or_else(|| std::env::temp_dir().join("pacer-runner-releases"))
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// The one region every pool runs in.
    pub region: String,
    /// A named profile from the shared AWS config files; empty uses the default chain.
    #[serde(default)]
    pub profile: Option<String>,
    /// Endpoint for every AWS service, for emulators; empty uses AWS's own endpoints.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The AWS account Pacer launches in (12 digits). Identity documents from other accounts
    /// are refused without an EC2 call; empty learns it from the first instance EC2 lists as
    /// Pacer's.
    #[serde(default)]
    pub account_id: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The URL runners and GitHub reach Pacer at: webhooks and runner callbacks.
    pub public_url: String,
    /// Address the HTTP listener binds.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address the Prometheus metrics listener binds.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    #[serde(default)]
    pub tls: TlsConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM certificate chain, for `manual`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key, for `manual`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Host names on the generated certificate, for `self`.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub acme: Option<AcmeConfig>,
}

/// Where TLS is terminated.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain HTTP; a load balancer or ingress terminates TLS.
    #[default]
    None,
    /// Certificate and key from files.
    Manual,
    /// A self-signed certificate generated at start.
    #[serde(rename = "self")]
    SelfSigned,
    /// Certificates from an ACME CA (Let's Encrypt) over HTTP-01.
    Acme,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    pub domains: Vec<String>,
    pub email: String,
    #[serde(default = "default_acme_directory")]
    pub directory_url: String,
    /// Where the account, certificate and key are kept between restarts.
    #[serde(default = "default_acme_cache")]
    pub cache_dir: PathBuf,
    /// The plain-HTTP listener that answers the CA's HTTP-01 challenges: port 80 of every
    /// domain must reach it.
    #[serde(default = "default_acme_http_listen")]
    pub http_listen: SocketAddr,
    /// A PEM CA certificate to trust for the directory itself (private or test CAs); empty
    /// trusts the usual web roots.
    #[serde(default)]
    pub directory_ca_file: Option<PathBuf>,
    /// A Secret (in `$POD_NAMESPACE`) holding the account, the certificate and pending
    /// HTTP-01 answers for every replica; empty keeps them in `cache_dir`, for one replica.
    #[serde(default)]
    pub secret: Option<String>,
}

fn default_acme_http_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}

fn default_acme_directory() -> String {
    "https://acme-v02.api.letsencrypt.org/directory".into()
}
fn default_acme_cache() -> PathBuf {
    PathBuf::from("/var/lib/pacer/acme")
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    /// The GitHub App's numeric id.
    pub app_id: u64,
    /// REST API base; GitHub Enterprise Server uses `https://HOST/api/v3`.
    #[serde(default = "default_github_api")]
    pub api_url: String,
    /// The App's PEM private key, mounted from a Secret.
    pub private_key_file: PathBuf,
    /// The webhook secret, mounted from a Secret.
    pub webhook_secret_file: PathBuf,
    /// While the webhook secret is rotated: the previous one, still accepted.
    #[serde(default)]
    pub previous_webhook_secret_file: Option<PathBuf>,
}

fn default_github_api() -> String {
    "https://api.github.com".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Goes into the `gha:controller` tag on everything Pacer creates; two controllers with
    /// different ids share an AWS account without touching each other's resources.
    #[serde(default = "default_controller_id")]
    pub id: String,
    /// Namespace to watch; empty watches all.
    #[serde(default)]
    pub namespace: String,
    /// RunnerJob passes at once. A burst of queued jobs launches about this many in parallel;
    /// the API server still sees at most 32 requests in flight.
    #[serde(default = "default_job_concurrency")]
    pub job_concurrency: u16,
    /// Milliseconds during which the jobs of one pool that become launchable are gathered
    /// into one launch call; 0 launches each job by its own call.
    #[serde(default = "default_launch_batch_window_ms")]
    pub launch_batch_window_ms: u64,
    /// Most instances one batched launch asks for (1 to 100).
    #[serde(default = "default_launch_batch_max")]
    pub launch_batch_max: u32,
    /// Seconds between garbage collections of unclaimed instances and launch templates.
    #[serde(default = "default_gc_interval_seconds")]
    pub gc_interval_seconds: u64,
    /// Seconds an instance or launch template must have existed before the garbage collector
    /// may remove it: longer than a launch takes to be recorded.
    #[serde(default = "default_gc_grace_seconds")]
    pub gc_grace_seconds: u64,
}

fn default_gc_interval_seconds() -> u64 {
    60
}

fn default_gc_grace_seconds() -> u64 {
    120
}

fn default_launch_batch_window_ms() -> u64 {
    100
}

fn default_launch_batch_max() -> u32 {
    50
}

fn default_job_concurrency() -> u16 {
    512
}

fn default_controller_id() -> String {
    "default".into()
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            id: default_controller_id(),
            namespace: String::new(),
            job_concurrency: default_job_concurrency(),
            launch_batch_window_ms: default_launch_batch_window_ms(),
            launch_batch_max: default_launch_batch_max(),
            gc_interval_seconds: default_gc_interval_seconds(),
            gc_grace_seconds: default_gc_grace_seconds(),
        }
    }
}

/// A value that must never be printed. `Debug` shows only that it is there.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The secrets the configuration points at, read from their files.
#[derive(Clone, Debug)]
pub struct Secrets {
    pub github_private_key: Secret,
    pub webhook_secret: Secret,
    pub previous_webhook_secret: Option<Secret>,
    pub callback_key: Secret,
}

impl Secrets {
    /// The webhook secrets a delivery may be signed with: the current one, then the previous.
    pub fn webhook_secrets(&self) -> Vec<Secret> {
        std::iter::once(self.webhook_secret.clone())
            .chain(self.previous_webhook_secret.clone())
            .collect()
    }
}

/// One `PACER_*` environment override: the variable, the key it sets, and how.
struct Override {
    key: &'static str,
    set: fn(&mut Config, &str) -> Result<(), String>,
}

const OVERRIDES: &[Override] = &[
    Override {
        key: "log_level",
        set: |c, v| set_optional(&mut c.log_level, v),
    },
    Override {
        key: "allow_insecure_http",
        set: |c, v| set_parsed(&mut c.allow_insecure_http, v),
    },
    Override {
        key: "aws.region",
        set: |c, v| set_string(&mut c.aws.region, v),
    },
    Override {
        key: "aws.profile",
        set: |c, v| set_optional(&mut c.aws.profile, v),
    },
    Override {
        key: "aws.endpoint_url",
        set: |c, v| set_optional(&mut c.aws.endpoint_url, v),
    },
    Override {
        key: "aws.account_id",
        set: |c, v| set_optional(&mut c.aws.account_id, v),
    },
    Override {
        key: "server.public_url",
        set: |c, v| set_string(&mut c.server.public_url, v),
    },
    Override {
        key: "server.listen",
        set: |c, v| set_parsed(&mut c.server.listen, v),
    },
    Override {
        key: "server.metrics_listen",
        set: |c, v| set_parsed(&mut c.server.metrics_listen, v),
    },
    Override {
        key: "server.tls.mode",
        set: |c, v| {
            c.server.tls.mode = serde_saphyr::from_str(v)
                .map_err(|_| "expected one of none, manual, self, acme".to_string())?;
            Ok(())
        },
    },
    Override {
        key: "server.tls.cert_file",
        set: |c, v| set_optional(&mut c.server.tls.cert_file, v),
    },
    Override {
        key: "server.tls.key_file",
        set: |c, v| set_optional(&mut c.server.tls.key_file, v),
    },
    Override {
        key: "github.app_id",
        set: |c, v| set_parsed(&mut c.github.app_id, v),
    },
    Override {
        key: "github.api_url",
        set: |c, v| set_string(&mut c.github.api_url, v),
    },
    Override {
        key: "github.private_key_file",
        set: |c, v| set_parsed(&mut c.github.private_key_file, v),
    },
    Override {
        key: "github.webhook_secret_file",
        set: |c, v| set_parsed(&mut c.github.webhook_secret_file, v),
    },
    Override {
        key: "github.previous_webhook_secret_file",
        set: |c, v| set_optional(&mut c.github.previous_webhook_secret_file, v),
    },
    Override {
        key: "runners.callback_key_file",
        set: |c, v| set_parsed(&mut c.runners.callback_key_file, v),
    },
    Override {
        key: "runners.identity_certificates_file",
        set: |c, v| set_optional(&mut c.runners.identity_certificates_file, v),
    },
    Override {
        key: "runners.ca_file",
        set: |c, v| set_optional(&mut c.runners.ca_file, v),
    },
    Override {
        key: "runners.release_source",
        set: |c, v| set_optional(&mut c.runners.release_source, v),
    },
    Override {
        key: "runners.release_cache_dir",
        set: |c, v| set_optional(&mut c.runners.release_cache_dir, v),
    },
    Override {
        key: "controller.id",
        set: |c, v| set_string(&mut c.controller.id, v),
    },
    Override {
        key: "controller.namespace",
        set: |c, v| set_string(&mut c.controller.namespace, v),
    },
    Override {
        key: "controller.job_concurrency",
        set: |c, v| set_parsed(&mut c.controller.job_concurrency, v),
    },
    Override {
        key: "controller.launch_batch_window_ms",
        set: |c, v| set_parsed(&mut c.controller.launch_batch_window_ms, v),
    },
    Override {
        key: "controller.launch_batch_max",
        set: |c, v| set_parsed(&mut c.controller.launch_batch_max, v),
    },
    Override {
        key: "controller.gc_interval_seconds",
        set: |c, v| set_parsed(&mut c.controller.gc_interval_seconds, v),
    },
    Override {
        key: "controller.gc_grace_seconds",
        set: |c, v| set_parsed(&mut c.controller.gc_grace_seconds, v),
    },
];

/// Environment variables with the `PACER_` prefix that are not configuration keys.
const NOT_KEYS: &[&str] = &[
    "PACER_LOG",
    "PACER_LOG_FORMAT",
    "PACER_CONFIG",
    "PACER_CACHE",
    // The project's own tooling, which a test run passes on to the Pacer it starts.
    "PACER_ADVISORY_DB",
    "PACER_FUZZ_MS",
];

fn set_string(field: &mut String, v: &str) -> Result<(), String> {
    *field = v.to_string();
    Ok(())
}
/// Empty unsets the key.
fn set_optional<T: for<'a> From<&'a str>>(field: &mut Option<T>, v: &str) -> Result<(), String> {
    *field = (!v.is_empty()).then(|| v.into());
    Ok(())
}
fn set_parsed<T: std::str::FromStr>(field: &mut T, v: &str) -> Result<(), String>
where
    T::Err: fmt::Display,
{
    *field = v.parse().map_err(|e: T::Err| e.to_string())?;
    Ok(())
}

fn env_var_for(key: &str) -> String {
    format!("PACER_{}", key.replace('.', "_").to_uppercase())
}

impl Config {
    /// Reads the file, applies `PACER_*` overrides from `env`, and checks the result.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config: Config = serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        for (var, value) in env.into_iter().filter(|(k, _)| k.starts_with("PACER_")) {
            if NOT_KEYS.contains(&var.as_str()) {
                continue;
            }
            let Some(o) = OVERRIDES.iter().find(|o| env_var_for(o.key) == var) else {
                let known: Vec<String> = OVERRIDES.iter().map(|o| env_var_for(o.key)).collect();
                return Err(ConfigError::Env {
                    var,
                    message: format!("not a configuration key; known: {}", known.join(", ")),
                });
            };
            (o.set)(&mut config, &value).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
        }
        config
            .check()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.into(),
                key: key.into(),
                message,
            })?;
        Ok(config)
    }

    /// Checks what the types alone cannot; returns the offending key and what is expected.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(level) = &self.log_level {
            // A bare word is a target at every level to tracing: `warning` would log nearly
            // nothing. A bare word must be a level.
            const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
            let not_level = (level.split(',').map(str::trim))
                .filter(|d| !d.is_empty() && !d.contains('='))
                .find(|d| !LEVELS.contains(&d.to_lowercase().as_str()));
            let problem = match (not_level, tracing_subscriber::EnvFilter::try_new(level)) {
                (Some(word), _) => Some(format!(
                    "{word:?} is no level (trace, debug, info, warn, error, off)"
                )),
                (None, Err(e)) => Some(e.to_string()),
                (None, Ok(_)) => None,
            };
            if let Some(problem) = problem {
                let why = format!(
                    "expected a tracing filter such as info or pacer=debug,info: {problem}"
                );
                return Err(("log_level", why));
            }
        }
        if self.aws.region.is_empty() {
            return Err((
                "aws.region",
                "must name an AWS region, such as eu-west-1".into(),
            ));
        }
        let url = &self.server.public_url;
        if !(url.starts_with("https://") || url.starts_with("http://"))
            || url.len() < "http://x".len()
        {
            return Err((
                "server.public_url",
                format!("expected an http(s) URL that runners can reach, got {url:?}"),
            ));
        }
        if url.starts_with("http://") && !self.allow_insecure_http {
            return Err(("server.public_url", insecure_http(url)));
        }
        if let Some(endpoint) = &self.aws.endpoint_url
            && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        {
            return Err((
                "aws.endpoint_url",
                format!("expected an http(s) URL, got {endpoint:?}"),
            ));
        }
        if let Some(account) = &self.aws.account_id
            && !(account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err((
                "aws.account_id",
                format!("expected a 12-digit AWS account id, got {account:?}"),
            ));
        }
        if self.runners.identity_certificates_file.is_none()
            && crate::runner::aws_certificates::for_region(&self.aws.region).is_none()
        {
            return Err((
                "runners.identity_certificates_file",
                format!(
                    "required: no certificate is bundled for aws.region {:?} (AWS's commercial \
                     regions are); set it to AWS's RSA-2048 certificate for that region",
                    self.aws.region
                ),
            ));
        }
        if !(self.github.api_url.starts_with("https://")
            || self.github.api_url.starts_with("http://"))
        {
            return Err((
                "github.api_url",
                format!("expected an http(s) URL, got {:?}", self.github.api_url),
            ));
        }
        if self.github.api_url.starts_with("http://") && !self.allow_insecure_http {
            return Err(("github.api_url", insecure_http(&self.github.api_url)));
        }
        let source = self.runners.release_source();
        if !(source.starts_with("https://") || source.starts_with("http://")) {
            return Err((
                "runners.release_source",
                format!("expected an http(s) URL, got {source:?}"),
            ));
        }
        if source.starts_with("http://") && !self.allow_insecure_http {
            return Err(("runners.release_source", insecure_http(source)));
        }
        if self.github.app_id == 0 {
            return Err((
                "github.app_id",
                "expected the GitHub App's numeric id".into(),
            ));
        }
        if !is_tag_safe_id(&self.controller.id) {
            return Err((
                "controller.id",
                format!(
                    "expected 1-32 lowercase letters, digits and '-', starting and ending with a letter or digit, got {:?}",
                    self.controller.id
                ),
            ));
        }
        if self.controller.job_concurrency == 0 {
            return Err((
                "controller.job_concurrency",
                "expected at least 1 RunnerJob pass at once".into(),
            ));
        }
        let max = crate::domain::launch::MAX_BATCH;
        if !(1..=max).contains(&self.controller.launch_batch_max) {
            return Err((
                "controller.launch_batch_max",
                format!("expected 1 to {max} instances in one launch call"),
            ));
        }
        if self.controller.launch_batch_window_ms > 10_000 {
            return Err((
                "controller.launch_batch_window_ms",
                "expected at most 10000 ms: a job waits this long for others to launch with".into(),
            ));
        }
        if self.controller.gc_interval_seconds == 0 {
            return Err((
                "controller.gc_interval_seconds",
                "expected at least 1 second between garbage collections".into(),
            ));
        }
        let tls = &self.server.tls;
        match tls.mode {
            TlsMode::Manual if tls.cert_file.is_none() => {
                return Err((
                    "server.tls.cert_file",
                    "required when server.tls.mode is manual".into(),
                ));
            }
            TlsMode::Manual if tls.key_file.is_none() => {
                return Err((
                    "server.tls.key_file",
                    "required when server.tls.mode is manual".into(),
                ));
            }
            TlsMode::Acme => match &tls.acme {
                None => {
                    return Err((
                        "server.tls.acme",
                        "required when server.tls.mode is acme".into(),
                    ));
                }
                Some(acme) if acme.domains.is_empty() => {
                    return Err(("server.tls.acme.domains", "name at least one domain".into()));
                }
                Some(acme) if !acme.email.contains('@') => {
                    return Err((
                        "server.tls.acme.email",
                        format!("expected an email address, got {:?}", acme.email),
                    ));
                }
                Some(_) => {}
            },
            _ => {}
        }
        Ok(())
    }

    /// The certificates instance identity documents must verify against: every one in
    /// `runners.identity_certificates_file`, else AWS's bundled certificate for `aws.region`.
    pub fn identity_trust_roots(&self) -> Result<TrustRoots, ConfigError> {
        let failed = ConfigError::IdentityCertificates;
        match &self.runners.identity_certificates_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
                TrustRoots::from_pem(&pem).map_err(|e| failed(format!("{}: {e}", path.display())))
            }
            None => TrustRoots::aws(&self.aws.region).map_err(failed),
        }
    }

    /// Reads the secret files the configuration points at.
    pub fn read_secrets(&self) -> Result<Secrets, ConfigError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path)
                .map(|bytes| Secret::new(trim_trailing_newline(bytes)))
                .map_err(|source| ConfigError::Secret {
                    key,
                    path: path.into(),
                    source,
                })
        };
        Ok(Secrets {
            github_private_key: read("github.private_key_file", &self.github.private_key_file)?,
            webhook_secret: read(
                "github.webhook_secret_file",
                &self.github.webhook_secret_file,
            )?,
            previous_webhook_secret: self
                .github
                .previous_webhook_secret_file
                .as_deref()
                .map(|path| read("github.previous_webhook_secret_file", path))
                .transpose()?,
            callback_key: read("runners.callback_key_file", &self.runners.callback_key_file)?,
        })
    }
}

fn insecure_http(url: &str) -> String {
    format!(
        "expected an https:// URL, got {url:?}: plain HTTP carries tokens and signatures in the \
         clear (set allow_insecure_http: true only for a loopback test bed)"
    )
}

impl Config {
    /// The keys that use plain HTTP while `allow_insecure_http` lets them: warned about at start.
    pub fn insecure_http_keys(&self) -> Vec<&'static str> {
        [
            ("server.public_url", self.server.public_url.as_str()),
            ("github.api_url", &self.github.api_url),
            ("runners.release_source", self.runners.release_source()),
        ]
        .into_iter()
        .filter(|(_, url)| url.starts_with("http://"))
        .map(|(key, _)| key)
        .collect()
    }
}

/// Secrets mounted from Kubernetes Secrets often end in a newline the author did not mean.
fn trim_trailing_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    bytes
}

fn is_tag_safe_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= crate::github::MAX_CONTROLLER_ID
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
aws:
  region: eu-west-1
server:
  public_url: https://pacer.example.com
github:
  app_id: 12345
  private_key_file: /secrets/github/private-key.pem
  webhook_secret_file: /secrets/github/webhook-secret
runners:
  callback_key_file: /secrets/runners/callback-key
  identity_certificates_file: /etc/pacer/aws-identity-rsa2048.pem
";

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("pacer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A file of its own per call: tests loading the same text run at once, and one must
        // never read another's file while it is being written.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{:x}-{n}.yaml", sha_of(text, env)));
        std::fs::write(&path, text).unwrap();
        Config::load(
            &path,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn sha_of(text: &str, env: &[(&str, &str)]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        env.hash(&mut h);
        h.finish()
    }

    #[test]
    fn minimal_file_loads_with_defaults() {
        let config = load(MINIMAL, &[]).unwrap();
        assert_eq!(config.controller.id, "default");
        assert_eq!(config.server.listen, default_listen());
        assert_eq!(config.server.tls.mode, TlsMode::None);
        assert_eq!(config.github.api_url, "https://api.github.com");
    }

    #[test]
    fn plain_http_urls_are_refused_unless_explicitly_allowed() {
        for (key, text) in [
            (
                "server.public_url",
                MINIMAL.replace("https://pacer.example.com", "http://pacer.example.com"),
            ),
            (
                "github.api_url",
                MINIMAL.replace(
                    "  app_id: 12345\n",
                    "  app_id: 12345\n  api_url: http://github.example.com/api/v3\n",
                ),
            ),
        ] {
            let err = load(&text, &[]).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("https://"), "{err}");
            let allowed = load(&format!("{text}allow_insecure_http: true\n"), &[]).unwrap();
            assert_eq!(allowed.insecure_http_keys(), vec![key]);
            let by_env = load(&text, &[("PACER_ALLOW_INSECURE_HTTP", "true")]).unwrap();
            assert!(by_env.allow_insecure_http);
        }
        assert!(load(MINIMAL, &[]).unwrap().insecure_http_keys().is_empty());
    }

    #[test]
    fn tenants_map_namespaces_to_owners_and_repositories() {
        let text = format!(
            "{MINIMAL}tenants:\n  team-a:\n    owners: [acme]\n  team-b:\n    owners: [acme]\n    repositories: [acme/web]\n"
        );
        let config = load(&text, &[]).unwrap();
        assert_eq!(config.tenants["team-a"].owners, ["acme"]);
        assert_eq!(config.tenants["team-b"].repositories, ["acme/web"]);
        assert!(load(MINIMAL, &[]).unwrap().tenants.is_empty());
        let typo = format!("{MINIMAL}tenants:\n  team-a:\n    owner: [acme]\n");
        assert!(load(&typo, &[]).unwrap_err().to_string().contains("owner"));
    }

    #[test]
    fn an_account_id_is_twelve_digits() {
        let text = MINIMAL.replace(
            "  region: eu-west-1\n",
            "  region: eu-west-1\n  account_id: \"123456789012\"\n",
        );
        let config = load(&text, &[]).unwrap();
        assert_eq!(config.aws.account_id.as_deref(), Some("123456789012"));
        let err = load(&text, &[("PACER_AWS_ACCOUNT_ID", "12345")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("aws.account_id"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it_and_the_file() {
        let text = MINIMAL.replace("  region: eu-west-1", "  region: eu-west-1\n  regoin: x");
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("regoin"), "{err}");
        assert!(err.contains(".yaml"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let text = MINIMAL.replace("  app_id: 12345\n", "");
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("app_id"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load(
            MINIMAL,
            &[
                ("PACER_AWS_REGION", "us-east-2"),
                ("PACER_GITHUB_APP_ID", "99"),
                ("PACER_AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
            ],
        )
        .unwrap();
        assert_eq!(config.aws.region, "us-east-2");
        assert_eq!(config.github.app_id, 99);
        assert_eq!(config.controller.job_concurrency, 512);
        assert_eq!(
            config.aws.endpoint_url.as_deref(),
            Some("http://127.0.0.1:5000")
        );
    }

    #[test]
    fn file_keys_are_set_and_unset_by_environment() {
        let set = [
            ("PACER_LOG_LEVEL", "pacer=debug,info"),
            ("PACER_SERVER_TLS_MODE", "manual"),
            ("PACER_SERVER_TLS_CERT_FILE", "/tls/tls.crt"),
            ("PACER_SERVER_TLS_KEY_FILE", "/tls/tls.key"),
            ("PACER_RUNNERS_CA_FILE", "/etc/pacer/runner-ca.pem"),
        ];
        let config = load(MINIMAL, &set).unwrap();
        assert_eq!(config.log_level.as_deref(), Some("pacer=debug,info"));
        let tls = &config.server.tls;
        assert_eq!(tls.cert_file.as_deref(), Some(Path::new("/tls/tls.crt")));
        assert_eq!(tls.key_file.as_deref(), Some(Path::new("/tls/tls.key")));
        let ca = config.runners.ca_file.as_deref();
        assert_eq!(ca, Some(Path::new("/etc/pacer/runner-ca.pem")));
        // Empty unsets what the file set.
        let file = format!("{MINIMAL}log_level: debug\n");
        let config = load(&file, &[("PACER_LOG_LEVEL", "")]).unwrap();
        assert_eq!(config.log_level, None);
        // A filter that does not parse is named, not silently taken for info.
        for wrong in ["pacer=loud", "warning", "info,verbose"] {
            let err = load(MINIMAL, &[("PACER_LOG_LEVEL", wrong)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("log_level"), "{wrong}: {err}");
        }
        let levels = [("PACER_LOG_LEVEL", "WARN,pacer=debug")];
        assert!(load(MINIMAL, &levels).is_ok());
        // The project's tooling variables are not configuration keys, and not errors.
        let tooling = [("PACER_ADVISORY_DB", "/db"), ("PACER_FUZZ_MS", "2000")];
        assert!(load(MINIMAL, &tooling).is_ok());
    }

    #[test]
    fn unknown_or_malformed_environment_override_is_named() {
        let err = load(MINIMAL, &[("PACER_AWS_REGOIN", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PACER_AWS_REGOIN"), "{err}");
        let err = load(MINIMAL, &[("PACER_GITHUB_APP_ID", "twelve")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PACER_GITHUB_APP_ID"), "{err}");
    }

    #[test]
    fn identity_certificates_default_to_the_bundled_one_of_the_region() {
        let unset = ("PACER_RUNNERS_IDENTITY_CERTIFICATES_FILE", "");
        let config = load(MINIMAL, &[unset]).unwrap();
        assert_eq!(config.runners.identity_certificates_file, None);
        let roots = config.identity_trust_roots().unwrap();
        assert_eq!((roots.len(), roots.aws_regions()), (1, vec!["eu-west-1"]));
        // Another partition's region has none bundled: the key is then required.
        let err = load(MINIMAL, &[unset, ("PACER_AWS_REGION", "us-gov-west-1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("runners.identity_certificates_file") && err.contains("us-gov-west-1"),
            "{err}"
        );
        // Set, the file is read, and what fails names it.
        let err = load(MINIMAL, &[])
            .unwrap()
            .identity_trust_roots()
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/pacer/aws-identity-rsa2048.pem"), "{err}");
    }

    #[test]
    fn the_documented_example_loads_as_written() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.example.yaml");
        let config = Config::load(&path, []).unwrap();
        assert_eq!(config.controller.id, "prod-eu");
        assert_eq!(config.controller.job_concurrency, 512);
    }

    #[test]
    fn job_concurrency_is_set_by_environment_and_never_zero() {
        let config = load(MINIMAL, &[("PACER_CONTROLLER_JOB_CONCURRENCY", "64")]).unwrap();
        assert_eq!(config.controller.job_concurrency, 64);
        let err = load(MINIMAL, &[("PACER_CONTROLLER_JOB_CONCURRENCY", "0")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("controller.job_concurrency"), "{err}");
    }

    #[test]
    fn controller_id_must_be_tag_safe() {
        let err = load(MINIMAL, &[("PACER_CONTROLLER_ID", "Prod Cluster")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("controller.id"), "{err}");
        // Longer ids would cut the job id out of runner names (GitHub allows 64 characters).
        let long = "a".repeat(33);
        let err = load(MINIMAL, &[("PACER_CONTROLLER_ID", long.as_str())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("controller.id"), "{err}");
        assert!(load(MINIMAL, &[("PACER_CONTROLLER_ID", &long[..32])]).is_ok());
    }

    #[test]
    fn manual_tls_needs_its_files() {
        let text = format!("{MINIMAL}  \n");
        let text = text.replace(
            "server:\n",
            "server:\n  tls:\n    mode: manual\n    key_file: /k.pem\n",
        );
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("server.tls.cert_file"), "{err}");
    }

    #[test]
    fn unknown_tls_mode_is_rejected() {
        let text = MINIMAL.replace("server:\n", "server:\n  tls:\n    mode: letsencrypt\n");
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("letsencrypt") || err.contains("mode"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let secret = Secret::new(b"hunter2".to_vec());
        let secrets = Secrets {
            github_private_key: secret.clone(),
            webhook_secret: secret.clone(),
            previous_webhook_secret: None,
            callback_key: secret,
        };
        assert!(!format!("{secrets:?}").contains("hunter2"));
    }

    #[test]
    fn secret_files_are_read_without_their_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("pacer-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("key.pem"), "PEM\n").unwrap();
        std::fs::write(dir.join("hook"), "s3cret\n").unwrap();
        std::fs::write(dir.join("callback"), "k".repeat(32)).unwrap();
        let mut config = load(MINIMAL, &[]).unwrap();
        config.runners.callback_key_file = dir.join("callback");
        config.github.private_key_file = dir.join("key.pem");
        config.github.webhook_secret_file = dir.join("hook");
        let secrets = config.read_secrets().unwrap();
        assert_eq!(secrets.webhook_secret.expose(), b"s3cret");
        config.github.webhook_secret_file = dir.join("missing");
        let err = config.read_secrets().unwrap_err().to_string();
        assert!(err.contains("github.webhook_secret_file"), "{err}");
    }
}
