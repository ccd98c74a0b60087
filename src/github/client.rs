//! The GitHub App client: App JWTs, installation tokens cached until shortly before they
//! expire, just-in-time runner configs, runners, webhook deliveries and queued jobs. Plain REST
//! over reqwest (the same hyper/rustls stack as kube and the AWS SDK); GitHub Enterprise Server
//! through `github.api_url`. Secondary rate limits and 5xx answers are retried with backoff and
//! counted. Tokens and JIT configs are secrets: never logged, never stored in the cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::warn;

use super::{GitHub, GitHubError, GitHubResult, JitConfig, Quota, Runner, RunnerTarget};

/// How long before an installation token expires it is replaced.
const TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Attempts of one call when GitHub asks to slow down or fails on its side.
const ATTEMPTS: u32 = 4;
/// Most pages of 100 read from one listing in one call: a bound on one sweep's cost.
const MAX_PAGES: usize = 20;

/// Reads a listing of 100 a page, `page(n)` answering page `n`, until a short page or
/// `MAX_PAGES`.
async fn paged<T, F, Fut>(mut page: F) -> GitHubResult<Vec<T>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = GitHubResult<Vec<T>>>,
{
    let mut all = Vec::new();
    for n in 1..=MAX_PAGES {
        let found = page(n).await?;
        let last = found.len() < 100;
        all.extend(found);
        if last {
            break;
        }
    }
    Ok(all)
}
/// The URL of the next page in a `Link` header (`<url>; rel="next", <url>; rel="last"`).
fn next_page(link: &str) -> Option<&str> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let next = params.split(';').any(|p| p.trim() == "rel=\"next\"");
        next.then(|| url.trim().trim_start_matches('<').trim_end_matches('>'))
    })
}

/// Counts each call by action and outcome; the metrics live with the controller's.
pub type CallCounter = Arc<dyn Fn(&'static str, &str) + Send + Sync>;

pub struct GitHubApp {
    http: reqwest::Client,
    api: String,
    app_id: u64,
    key: aws_lc_rs::rsa::KeyPair,
    /// Installation id -> (token, expiry).
    tokens: tokio::sync::Mutex<HashMap<i64, (String, Timestamp)>>,
    /// `owner` or `owner/repo` -> installation id.
    installations: Mutex<HashMap<String, i64>>,
    /// Organization -> runner group name -> id.
    groups: Mutex<HashMap<(String, String), i64>>,
    count: CallCounter,
    /// The unit of retry backoff (1 s in production; shorter in tests).
    backoff: Duration,
    /// Requests sent, retries included.
    sent: AtomicU64,
    /// Installation id -> what GitHub's last answer said is left of its hourly budget.
    quotas: Mutex<HashMap<i64, Quota>>,
}

/// Reads the App's private key: PKCS#1 (`BEGIN RSA PRIVATE KEY`, as GitHub hands it out) or
/// PKCS#8 (`BEGIN PRIVATE KEY`) PEM.
pub fn parse_private_key(pem: &[u8]) -> Result<aws_lc_rs::rsa::KeyPair, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "the private key is not PEM text")?;
    let body = |label: &str| {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let start = text.find(&begin)? + begin.len();
        let stop = text[start..].find(&end)? + start;
        let b64: String = text[start..stop].split_whitespace().collect();
        base64::engine::general_purpose::STANDARD.decode(b64).ok()
    };
    if let Some(der) = body("RSA PRIVATE KEY") {
        return aws_lc_rs::rsa::KeyPair::from_der(&der).map_err(|e| format!("bad PKCS#1 key: {e}"));
    }
    if let Some(der) = body("PRIVATE KEY") {
        return aws_lc_rs::rsa::KeyPair::from_pkcs8(&der)
            .map_err(|e| format!("bad PKCS#8 key: {e}"));
    }
    Err("no RSA private key PEM block found".into())
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Deserialize)]
struct Token {
    token: String,
    expires_at: String,
}

#[derive(Deserialize)]
struct Id {
    id: i64,
}

/// Calls GitHub must not get twice: sent again only after GitHub said it did nothing (a rate
/// limit), never after an error that leaves it unknown.
const AT_MOST_ONCE: &[&str] = &["rerun_job"];

impl GitHubApp {
    pub fn new(
        api: &str,
        app_id: u64,
        private_key_pem: &[u8],
        count: CallCounter,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("pacer/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            http,
            api: api.trim_end_matches('/').to_string(),
            app_id,
            key: parse_private_key(private_key_pem)?,
            tokens: Default::default(),
            installations: Default::default(),
            groups: Default::default(),
            count,
            backoff: Duration::from_secs(1),
            sent: AtomicU64::new(0),
            quotas: Default::default(),
        })
    }

    /// Retries wait `unit`, doubling; tests make it short.
    pub fn with_backoff(mut self, unit: Duration) -> Self {
        self.backoff = unit;
        self
    }

    /// The App's JWT: RS256, issued 60 s in the past against clock drift, valid 9 minutes
    /// (GitHub allows at most 10).
    pub fn app_jwt(&self, now: Timestamp) -> String {
        let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
        let iat = now.as_second() - 60;
        let claims = json!({ "iat": iat, "exp": iat + 9 * 60, "iss": self.app_id.to_string() });
        let claims = b64url(claims.to_string().as_bytes());
        let signing_input = format!("{header}.{claims}");
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .expect("an RSA key signs");
        format!("{signing_input}.{}", b64url(&signature))
    }

    /// One call with retries: 5xx, 429 and secondary rate limits (403 with a `retry-after` or
    /// a message saying so) wait and try again, honouring `retry-after`.
    async fn call(
        &self,
        action: &'static str,
        method: Method,
        path: &str,
        auth: &str,
        body: Option<&Value>,
    ) -> GitHubResult<(StatusCode, Value)> {
        let (status, value, _) = (self.call_paged(action, method, path, auth, body, None)).await?;
        Ok((status, value))
    }

    /// [`Self::call`], with the path of the next page when the answer's `Link` header names
    /// one on this API. With an installation's token, what its answers say is left of the
    /// installation's hourly budget is kept.
    async fn call_paged(
        &self,
        action: &'static str,
        method: Method,
        path: &str,
        auth: &str,
        body: Option<&Value>,
        installation: Option<i64>,
    ) -> GitHubResult<(StatusCode, Value, Option<String>)> {
        let url = format!("{}{path}", self.api);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self
                .http
                .request(method.clone(), &url)
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", "2022-11-28")
                .header("authorization", auth);
            if let Some(body) = body {
                request = request.json(body);
            }
            self.sent.fetch_add(1, Ordering::Relaxed);
            let at_most_once = AT_MOST_ONCE.contains(&action);
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) if attempt < ATTEMPTS && !at_most_once => {
                    (self.count)(action, "transport_retry");
                    warn!(action, error = %e, "GitHub unreachable; retrying");
                    tokio::time::sleep(self.backoff * 2u32.pow(attempt - 1)).await;
                    continue;
                }
                Err(e) => {
                    (self.count)(action, "transport_error");
                    return Err(GitHubError::Transport(e.to_string()));
                }
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let header = |name: &str| {
                let value = response.headers().get(name)?.to_str().ok()?;
                value.parse::<u64>().ok()
            };
            let remaining = header("x-ratelimit-remaining");
            if let (Some(installation), Some(limit), Some(remaining)) =
                (installation, header("x-ratelimit-limit"), remaining)
            {
                let quota = Quota { limit, remaining };
                self.quotas.lock().unwrap().insert(installation, quota);
            }
            let next = (response.headers().get("link"))
                .and_then(|v| v.to_str().ok())
                .and_then(next_page)
                .and_then(|url| url.strip_prefix(&self.api).map(str::to_string));
            let text = response.text().await.unwrap_or_default();
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let message = value["message"].as_str().unwrap_or_default().to_string();
            let limited = (status == StatusCode::FORBIDDEN
                || status == StatusCode::TOO_MANY_REQUESTS)
                && (retry_after.is_some()
                    || remaining == Some(0)
                    || message.to_lowercase().contains("rate limit"));
            if (limited || (status.is_server_error() && !at_most_once)) && attempt < ATTEMPTS {
                (self.count)(
                    action,
                    if limited {
                        "rate_limited"
                    } else {
                        "server_error"
                    },
                );
                let wait = retry_after
                    .map(Duration::from_secs)
                    .unwrap_or(self.backoff * 2u32.pow(attempt - 1))
                    .min(Duration::from_secs(60));
                tokio::time::sleep(wait).await;
                continue;
            }
            let outcome = match status.as_u16() {
                200..=299 => "ok",
                404 => "not_found",
                409 => "conflict",
                _ if limited => "rate_limited",
                400..=499 => "client_error",
                _ => "server_error",
            };
            (self.count)(action, outcome);
            if status.is_success()
                || status == StatusCode::NOT_FOUND
                || status == StatusCode::CONFLICT
            {
                return Ok((status, value, next));
            }
            return Err(GitHubError::Status {
                action,
                status: status.as_u16(),
                message,
            });
        }
    }

    async fn app_call<T: DeserializeOwned>(
        &self,
        action: &'static str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> GitHubResult<Option<T>> {
        let auth = format!("Bearer {}", self.app_jwt(Timestamp::now()));
        let (status, value) = self.call(action, method, path, &auth, body).await?;
        decode(action, status, value)
    }

    async fn installation_call<T: DeserializeOwned>(
        &self,
        installation: i64,
        action: &'static str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> GitHubResult<(StatusCode, Option<T>)> {
        let auth = format!("token {}", self.installation_token(installation).await?);
        let (status, value, _) = self
            .call_paged(action, method, path, &auth, body, Some(installation))
            .await?;
        Ok((status, decode(action, status, value)?))
    }

    /// An installation access token, reused until a few minutes before it expires.
    pub async fn installation_token(&self, installation: i64) -> GitHubResult<String> {
        let mut tokens = self.tokens.lock().await;
        if let Some((token, expires)) = tokens.get(&installation)
            && Timestamp::now() + TOKEN_MARGIN < *expires
        {
            return Ok(token.clone());
        }
        let token: Token = self
            .app_call(
                "create_installation_token",
                Method::POST,
                &format!("/app/installations/{installation}/access_tokens"),
                None,
            )
            .await?
            .ok_or(GitHubError::NotFound("installation"))?;
        let expires: Timestamp = token
            .expires_at
            .parse()
            .map_err(|_| GitHubError::Malformed("create_installation_token"))?;
        tokens.insert(installation, (token.token.clone(), expires));
        Ok(token.token)
    }

    /// The App can act for `target`: its installation is found and a token minted for it (no
    /// write). The installation's id.
    pub async fn check_installation(&self, target: &RunnerTarget) -> GitHubResult<i64> {
        let installation = self.installation(target).await?;
        self.installation_token(installation).await?;
        Ok(installation)
    }

    /// The installation serving `repository` (`owner/name`): `installation` when known.
    async fn repository_installation(
        &self,
        repository: &str,
        installation: Option<i64>,
    ) -> GitHubResult<i64> {
        let (owner, repo) = repository
            .split_once('/')
            .ok_or(GitHubError::NotFound("repository"))?;
        let target = RunnerTarget {
            owner: owner.into(),
            repo: Some(repo.into()),
            installation,
            ..Default::default()
        };
        self.installation(&target).await
    }

    /// `GET path` with the token of the installation serving `repository`; `None` on 404.
    async fn repository_get<T: DeserializeOwned>(
        &self,
        repository: &str,
        installation: Option<i64>,
        action: &'static str,
        path: String,
    ) -> GitHubResult<Option<T>> {
        let installation = self
            .repository_installation(repository, installation)
            .await?;
        let (_, found) =
            (self.installation_call(installation, action, Method::GET, &path, None)).await?;
        Ok(found)
    }

    /// The installation serving a target: given, or looked up from the repository or
    /// organization (cached).
    async fn installation(&self, target: &RunnerTarget) -> GitHubResult<i64> {
        if let Some(id) = target.installation {
            return Ok(id);
        }
        let (key, path) = match &target.repo {
            Some(repo) => (
                format!("{}/{repo}", target.owner),
                format!("/repos/{}/{repo}/installation", target.owner),
            ),
            None => (
                target.owner.clone(),
                format!("/orgs/{}/installation", target.owner),
            ),
        };
        if let Some(id) = self.installations.lock().unwrap().get(&key) {
            return Ok(*id);
        }
        let found: Id = self
            .app_call("get_installation", Method::GET, &path, None)
            .await?
            .ok_or(GitHubError::NotFound("installation"))?;
        self.installations.lock().unwrap().insert(key, found.id);
        Ok(found.id)
    }

    /// Where a target's runners live: `/orgs/ORG` or `/repos/OWNER/REPO`.
    fn runners_base(target: &RunnerTarget) -> String {
        match &target.repo {
            Some(repo) => format!("/repos/{}/{repo}/actions/runners", target.owner),
            None => format!("/orgs/{}/actions/runners", target.owner),
        }
    }

    /// The id of the organization runner group named `name` (1, the default group, when none).
    async fn runner_group(&self, installation: i64, target: &RunnerTarget) -> GitHubResult<i64> {
        let (Some(name), None) = (&target.runner_group, &target.repo) else {
            return Ok(1);
        };
        let key = (target.owner.clone(), name.clone());
        if let Some(id) = self.groups.lock().unwrap().get(&key) {
            return Ok(*id);
        }
        #[derive(Deserialize)]
        struct Groups {
            runner_groups: Vec<Group>,
        }
        #[derive(Deserialize)]
        struct Group {
            id: i64,
            name: String,
        }
        let (_, groups) = self
            .installation_call::<Groups>(
                installation,
                "list_runner_groups",
                Method::GET,
                &format!("/orgs/{}/actions/runner-groups?per_page=100", target.owner),
                None,
            )
            .await?;
        let id = groups
            .into_iter()
            .flat_map(|g| g.runner_groups)
            .find(|g| g.name.eq_ignore_ascii_case(name))
            .map(|g| g.id)
            .ok_or(GitHubError::NotFound("runner group"))?;
        self.groups.lock().unwrap().insert(key, id);
        Ok(id)
    }

    async fn generate(
        &self,
        installation: i64,
        target: &RunnerTarget,
        body: &Value,
    ) -> GitHubResult<(StatusCode, Option<JitConfig>)> {
        #[derive(Deserialize)]
        struct Answer {
            runner: Id,
            encoded_jit_config: String,
        }
        let (status, answer) = self
            .installation_call::<Answer>(
                installation,
                "generate_jitconfig",
                Method::POST,
                &format!("{}/generate-jitconfig", Self::runners_base(target)),
                Some(body),
            )
            .await?;
        Ok((
            status,
            answer.map(|a| JitConfig {
                runner_id: a.runner.id,
                encoded: crate::config::Secret::new(a.encoded_jit_config.into_bytes()),
            }),
        ))
    }
}

/// The body of a 2xx answer, `None` for 404 (and 409, which callers handle), else an error.
fn decode<T: DeserializeOwned>(
    action: &'static str,
    status: StatusCode,
    value: Value,
) -> GitHubResult<Option<T>> {
    if !status.is_success() {
        return Ok(None);
    }
    if status == StatusCode::NO_CONTENT {
        return serde_json::from_value(Value::Null).map(Some).or(Ok(None));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|_| GitHubError::Malformed(action))
}

impl GitHub for GitHubApp {
    fn requests_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn quota(&self, repository: &str) -> Option<Quota> {
        let installations = self.installations.lock().unwrap();
        let owner = repository.split_once('/').map_or(repository, |(o, _)| o);
        let id = installations.get(repository).or(installations.get(owner))?;
        self.quotas.lock().unwrap().get(id).copied()
    }

    fn jit_config<'a>(
        &'a self,
        target: &'a RunnerTarget,
        name: &'a str,
        labels: &'a [String],
    ) -> BoxFuture<'a, GitHubResult<JitConfig>> {
        async move {
            let installation = self.installation(target).await?;
            let group = self.runner_group(installation, target).await?;
            let body = json!({
                "name": name, "runner_group_id": group, "labels": labels, "work_folder": "_work",
            });
            match self.generate(installation, target, &body).await? {
                (_, Some(config)) => Ok(config),
                // A runner of that name is left from an earlier try of this very bootstrap
                // (names carry the job and the attempt): delete it if it is offline, then once
                // more. One online is running; it is never touched.
                (StatusCode::CONFLICT, None) => {
                    if let Some(stale) = self
                        .list_runners(target)
                        .await?
                        .into_iter()
                        .find(|r| r.name == name && r.status == "offline" && !r.busy)
                    {
                        self.delete_runner(target, stale.id).await?;
                    }
                    match self.generate(installation, target, &body).await? {
                        (_, Some(config)) => Ok(config),
                        (status, None) => Err(GitHubError::Status {
                            action: "generate_jitconfig",
                            status: status.as_u16(),
                            message: "the runner name is still taken".into(),
                        }),
                    }
                }
                (status, None) => Err(GitHubError::Status {
                    action: "generate_jitconfig",
                    status: status.as_u16(),
                    message: "no such organization or repository".into(),
                }),
            }
        }
        .boxed()
    }

    fn delete_runner<'a>(
        &'a self,
        target: &'a RunnerTarget,
        runner_id: i64,
    ) -> BoxFuture<'a, GitHubResult<()>> {
        async move {
            let installation = self.installation(target).await?;
            // 404: already gone, which is the goal.
            self.installation_call::<Value>(
                installation,
                "delete_runner",
                Method::DELETE,
                &format!("{}/{runner_id}", Self::runners_base(target)),
                None,
            )
            .await?;
            Ok(())
        }
        .boxed()
    }

    fn list_runners<'a>(
        &'a self,
        target: &'a RunnerTarget,
    ) -> BoxFuture<'a, GitHubResult<Vec<Runner>>> {
        async move {
            #[derive(Deserialize)]
            struct Page {
                total_count: usize,
                runners: Vec<Runner>,
            }
            let installation = self.installation(target).await?;
            let mut all = Vec::new();
            for page in 1.. {
                let path = format!("{}?per_page=100&page={page}", Self::runners_base(target));
                let (_, found) = self
                    .installation_call::<Page>(
                        installation,
                        "list_runners",
                        Method::GET,
                        &path,
                        None,
                    )
                    .await?;
                let Some(found) = found else { break };
                let done = found.runners.len() < 100
                    || all.len() + found.runners.len() >= found.total_count;
                all.extend(found.runners);
                if done {
                    break;
                }
            }
            Ok(all)
        }
        .boxed()
    }

    fn runner<'a>(
        &'a self,
        target: &'a RunnerTarget,
        runner_id: i64,
    ) -> BoxFuture<'a, GitHubResult<Option<Runner>>> {
        async move {
            let installation = self.installation(target).await?;
            let path = format!("{}/{runner_id}", Self::runners_base(target));
            let (_, runner) = self
                .installation_call::<Runner>(installation, "get_runner", Method::GET, &path, None)
                .await?;
            Ok(runner)
        }
        .boxed()
    }

    fn workflow_job<'a>(
        &'a self,
        repository: &'a str,
        installation: Option<i64>,
        job_id: i64,
    ) -> BoxFuture<'a, GitHubResult<Option<super::WorkflowJob>>> {
        let path = format!("/repos/{repository}/actions/jobs/{job_id}");
        (self.repository_get(repository, installation, "get_workflow_job", path)).boxed()
    }

    fn rerun_job<'a>(
        &'a self,
        repository: &'a str,
        installation: Option<i64>,
        job_id: i64,
    ) -> BoxFuture<'a, GitHubResult<()>> {
        async move {
            let installation = self
                .repository_installation(repository, installation)
                .await?;
            let path = format!("/repos/{repository}/actions/jobs/{job_id}/rerun");
            let (status, _) = (self.installation_call::<Value>(
                installation,
                "rerun_job",
                Method::POST,
                &path,
                None,
            ))
            .await?;
            match status {
                StatusCode::CREATED => Ok(()),
                StatusCode::NOT_FOUND => Err(GitHubError::NotFound("workflow job")),
                other => Err(GitHubError::Status {
                    action: "rerun_job",
                    status: other.as_u16(),
                    message: "not re-run".into(),
                }),
            }
        }
        .boxed()
    }

    fn workflow_run<'a>(
        &'a self,
        repository: &'a str,
        installation: Option<i64>,
        run_id: i64,
    ) -> BoxFuture<'a, GitHubResult<Option<super::WorkflowRun>>> {
        let path = format!("/repos/{repository}/actions/runs/{run_id}");
        (self.repository_get(repository, installation, "get_workflow_run", path)).boxed()
    }

    fn failed_deliveries<'a>(
        &'a self,
        since: Timestamp,
    ) -> BoxFuture<'a, GitHubResult<Vec<super::Delivery>>> {
        async move {
            let mut failed = Vec::new();
            let mut succeeded = std::collections::HashSet::new();
            // Newest first, a cursor per page: read back until a page reaches `since`.
            let mut deliveries: Vec<super::Delivery> = Vec::new();
            let mut path = "/app/hook/deliveries?per_page=100".to_string();
            let mut read_back = false;
            for _ in 0..MAX_PAGES {
                let auth = format!("Bearer {}", self.app_jwt(Timestamp::now()));
                let (status, value, next) =
                    (self.call_paged("list_deliveries", Method::GET, &path, &auth, None, None))
                        .await?;
                let page: Vec<super::Delivery> =
                    decode("list_deliveries", status, value)?.unwrap_or_default();
                let reached = (page.last())
                    .and_then(|d| d.delivered_at.parse::<Timestamp>().ok())
                    .is_some_and(|at| at < since);
                deliveries.extend(page);
                match next {
                    Some(next) if !reached => path = next,
                    _ => {
                        read_back = true;
                        break;
                    }
                }
            }
            if !read_back {
                warn!(
                    pages = MAX_PAGES,
                    "the App's webhook deliveries of the last hour fill more pages than a pass \
                     reads; older failed deliveries are not redelivered (the sweep of queued \
                     jobs still finds their jobs)"
                );
            }
            for d in deliveries {
                let at: Option<Timestamp> = d.delivered_at.parse().ok();
                if at.is_some_and(|at| at < since) {
                    continue;
                }
                if (200..300).contains(&d.status_code) {
                    succeeded.insert(d.guid.clone());
                } else {
                    failed.push(d);
                }
            }
            // A delivery that later went through (redelivered) needs nothing more.
            failed.retain(|d| !succeeded.contains(&d.guid));
            Ok(failed)
        }
        .boxed()
    }

    fn redeliver<'a>(&'a self, delivery_id: i64) -> BoxFuture<'a, GitHubResult<()>> {
        async move {
            self.app_call::<Value>(
                "redeliver",
                Method::POST,
                &format!("/app/hook/deliveries/{delivery_id}/attempts"),
                None,
            )
            .await?;
            Ok(())
        }
        .boxed()
    }

    fn queued_jobs<'a>(
        &'a self,
        owner: &'a str,
        repo: &'a str,
    ) -> BoxFuture<'a, GitHubResult<Vec<super::QueuedJob>>> {
        async move {
            #[derive(Deserialize)]
            struct Runs {
                workflow_runs: Vec<Id>,
            }
            #[derive(Deserialize)]
            struct Jobs {
                jobs: Vec<super::QueuedJob>,
            }
            let target = RunnerTarget {
                owner: owner.into(),
                repo: Some(repo.into()),
                ..Default::default()
            };
            let installation = self.installation(&target).await?;
            // A multi-job workflow's run is in progress while some of its jobs still queue.
            let mut runs = Vec::new();
            for status in ["queued", "in_progress"] {
                runs.extend(
                    paged(|page| async move {
                        let path = format!(
                            "/repos/{owner}/{repo}/actions/runs?status={status}&per_page=100&page={page}"
                        );
                        let (_, found) = self
                            .installation_call::<Runs>(
                                installation,
                                "list_queued_runs",
                                Method::GET,
                                &path,
                                None,
                            )
                            .await?;
                        Ok(found.map(|r| r.workflow_runs).unwrap_or_default())
                    })
                    .await?,
                );
            }
            let mut queued = Vec::new();
            for run in runs {
                let (_, jobs) = self
                    .installation_call::<Jobs>(
                        installation,
                        "list_run_jobs",
                        Method::GET,
                        &format!(
                            "/repos/{owner}/{repo}/actions/runs/{}/jobs?filter=latest&per_page=100",
                            run.id
                        ),
                        None,
                    )
                    .await?;
                queued.extend(
                    jobs.map(|j| j.jobs)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|j| j.status == "queued"),
                );
            }
            Ok(queued)
        }
        .boxed()
    }

    fn installation_repositories<'a>(&'a self) -> BoxFuture<'a, GitHubResult<Vec<String>>> {
        async move {
            #[derive(Deserialize)]
            struct Repos {
                repositories: Vec<Repo>,
            }
            #[derive(Deserialize)]
            struct Repo {
                full_name: String,
            }
            let installations: Vec<Id> = paged(|page| async move {
                let path = format!("/app/installations?per_page=100&page={page}");
                let found = self
                    .app_call("list_installations", Method::GET, &path, None)
                    .await?;
                Ok(found.unwrap_or_default())
            })
            .await?;
            let mut all = Vec::new();
            for installation in installations {
                let id = installation.id;
                let repos = paged(|page| async move {
                    let path = format!("/installation/repositories?per_page=100&page={page}");
                    let (_, found) = self
                        .installation_call::<Repos>(
                            id,
                            "list_installation_repositories",
                            Method::GET,
                            &path,
                            None,
                        )
                        .await?;
                    Ok(found.map(|r| r.repositories).unwrap_or_default())
                })
                .await;
                // One installation's trouble (suspended, rate-limited) skips it alone.
                let repos = repos.unwrap_or_else(|e| {
                    warn!(installation = id, error = %e, "could not list an installation's repositories; skipping it this pass");
                    Vec::new()
                });
                for repo in repos {
                    if let Some((owner, _)) = repo.full_name.split_once('/') {
                        let mut known = self.installations.lock().unwrap();
                        known.insert(repo.full_name.clone(), installation.id);
                        known.entry(owner.to_string()).or_insert(installation.id);
                    }
                    all.push(repo.full_name);
                }
            }
            Ok(all)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::next_page;

    #[test]
    fn the_next_page_is_read_from_the_link_header() {
        let link = r#"<https://api.github.com/app/hook/deliveries?per_page=100&cursor=v1_7>; rel="next", <https://api.github.com/app/hook/deliveries?per_page=100>; rel="first""#;
        assert_eq!(
            next_page(link),
            Some("https://api.github.com/app/hook/deliveries?per_page=100&cursor=v1_7")
        );
        let last = r#"<https://api.github.com/app/hook/deliveries?per_page=100>; rel="first""#;
        assert_eq!(next_page(last), None);
        assert_eq!(next_page(""), None);
    }
}
