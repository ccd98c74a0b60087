//! A fake GitHub at the HTTP boundary: the REST endpoints Pacer calls, with GitHub's status
//! codes and response shapes, state kept between calls, App JWTs checked (RS256 signature
//! against the App's public key, issued-at and expiry), and faults on request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine as _;
use serde_json::{Value, json};

/// A runner the fake knows, under its target (`orgs/ORG` or `repos/OWNER/REPO`).
#[derive(Clone, Debug)]
pub struct FakeRunner {
    pub id: i64,
    pub name: String,
    pub labels: Vec<String>,
    pub group: i64,
    pub status: &'static str,
    /// Running a job now.
    pub busy: bool,
}

#[derive(Default)]
pub struct FakeState {
    /// Target -> runners.
    pub runners: HashMap<String, Vec<FakeRunner>>,
    next_id: i64,
    /// Installation access tokens issued, per installation.
    pub tokens_issued: HashMap<i64, u32>,
    /// Seconds the next tokens are valid for (GitHub: one hour).
    pub token_lifetime: i64,
    /// Tokens issued and their installation.
    tokens: HashMap<String, i64>,
    /// Installation id -> repositories (`owner/name`).
    pub installations: HashMap<i64, Vec<String>>,
    /// Runner group name -> id, per organization.
    pub groups: HashMap<String, Vec<(i64, String)>>,
    /// The App's webhook deliveries.
    pub deliveries: Vec<Value>,
    /// Delivery ids asked to be redelivered.
    pub redelivered: Vec<i64>,
    /// Repository -> queued runs -> their jobs.
    pub queued: HashMap<String, Vec<(i64, Vec<Value>)>>,
    /// Releases of `actions/runner`, newest first, shaped as the releases API answers.
    pub runner_releases: Vec<Value>,
    /// Endpoint name -> (status to answer, times left).
    faults: HashMap<String, (u16, u32)>,
    /// How long each call of an endpoint takes to answer.
    delays: HashMap<String, std::time::Duration>,
    /// Endpoints whose calls wait until their gate is closed ([`FakeGitHub::hold`]).
    holds: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Workflow jobs by id, as `GET /repos/{owner}/{repo}/actions/jobs/{id}` answers them.
    pub jobs: HashMap<i64, Value>,
    /// Every call: (endpoint name, status answered).
    pub calls: Vec<(String, u16)>,
    /// Installation id -> (hourly limit, requests left), as GitHub counts its primary rate
    /// limit; an installation not here starts at 5,000.
    pub rate_limits: HashMap<i64, (u64, u64)>,
    /// Names of runners someone asked to delete while they ran a job (GitHub refuses: 422).
    pub busy_deletes: Vec<String>,
    /// Workflow runs still going: GitHub re-runs a job only once its run completed.
    pub runs_in_progress: std::collections::HashSet<i64>,
    /// Workflow runs past their first attempt: run id -> attempt.
    pub run_attempts: HashMap<i64, u32>,
    /// Jobs GitHub was asked to re-run, and did.
    pub reruns: Vec<i64>,
}

#[derive(Clone)]
pub struct FakeGitHub {
    pub url: String,
    pub state: Arc<Mutex<FakeState>>,
    /// The App's private key (PKCS#8 PEM), for the client under test.
    pub private_key_pem: Vec<u8>,
    pub app_id: u64,
    /// Every request that reached the fake, whatever its path or answer.
    requests: Arc<std::sync::atomic::AtomicU64>,
}

struct Shared {
    state: Arc<Mutex<FakeState>>,
    public_key: Vec<u8>,
    app_id: u64,
}

impl FakeGitHub {
    /// Starts the fake on a loopback port, with a fresh App key pair, shaped as github.com's
    /// API (releases of public repositories included).
    pub async fn start() -> Self {
        Self::start_shaped("", true).await
    }

    /// Starts the fake shaped as GitHub Enterprise Server's API: under `/api/v3`, and with no
    /// actions/runner releases (GHES does not have them).
    pub async fn start_enterprise() -> Self {
        Self::start_shaped("/api/v3", false).await
    }

    async fn start_shaped(prefix: &str, releases: bool) -> Self {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair as _;
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&key).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        );
        let state = Arc::new(Mutex::new(FakeState {
            token_lifetime: 3600,
            next_id: 100,
            ..Default::default()
        }));
        let shared = Arc::new(Shared {
            state: state.clone(),
            public_key: key.public_key().as_ref().to_vec(),
            app_id: 4242,
        });
        let app = Router::new()
            .route("/app/installations", get(list_installations))
            .route("/app/installations/{id}/access_tokens", post(create_token))
            .route("/repos/{owner}/{repo}/installation", get(repo_installation))
            .route("/orgs/{org}/installation", get(org_installation))
            .route("/installation/repositories", get(installation_repositories))
            .route("/orgs/{org}/actions/runner-groups", get(runner_groups))
            .route("/orgs/{org}/actions/runners", get(list_org_runners))
            .route(
                "/repos/{owner}/{repo}/actions/runners",
                get(list_repo_runners),
            )
            .route(
                "/orgs/{org}/actions/runners/generate-jitconfig",
                post(org_jit),
            )
            .route(
                "/repos/{owner}/{repo}/actions/runners/generate-jitconfig",
                post(repo_jit),
            )
            .route(
                "/orgs/{org}/actions/runners/{id}",
                delete(delete_org_runner).get(get_org_runner),
            )
            .route(
                "/repos/{owner}/{repo}/actions/runners/{id}",
                delete(delete_repo_runner).get(get_repo_runner),
            )
            .route("/repos/{owner}/{repo}/actions/jobs/{id}", get(workflow_job))
            .route(
                "/repos/{owner}/{repo}/actions/jobs/{id}/rerun",
                post(rerun_job),
            )
            .route(
                "/repos/{owner}/{repo}/actions/runs/{run}",
                get(workflow_run),
            )
            .route("/app/hook/deliveries", get(list_deliveries))
            .route("/app/hook/deliveries/{id}/attempts", post(redeliver))
            .route("/repos/{owner}/{repo}/actions/runs", get(queued_runs))
            .route(
                "/repos/{owner}/{repo}/actions/runs/{run}/jobs",
                get(run_jobs),
            );
        let app = if releases {
            app.route("/repos/{owner}/{repo}/releases/latest", get(latest_release))
                .route(
                    "/repos/{owner}/{repo}/releases/tags/{tag}",
                    get(release_by_tag),
                )
        } else {
            app
        };
        let app = app
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                rate_limit,
            ))
            .fallback(|| async { error(404, "Not Found") })
            .with_state(shared);
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = requests.clone();
        let app = app.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                next.run(request)
            },
        ));
        let app = if prefix.is_empty() {
            app
        } else {
            Router::new().nest(prefix, app)
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{prefix}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            state,
            private_key_pem: pem.into_bytes(),
            app_id: 4242,
            requests,
        }
    }

    /// Where this fake describes actions/runner releases (`runners.release_source`).
    pub fn release_source(&self) -> String {
        format!("{}/repos/actions/runner/releases", self.url)
    }

    /// How many requests reached the fake so far, on any path.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Installs the App as `id` on `repositories` (`owner/name`).
    pub fn install(&self, id: i64, repositories: &[&str]) {
        self.state
            .lock()
            .unwrap()
            .installations
            .insert(id, repositories.iter().map(|r| r.to_string()).collect());
    }

    /// Pacer's App client for this fake: retries 10 ms apart, calls not counted.
    pub fn client(&self) -> pacer::github::client::GitHubApp {
        pacer::github::client::GitHubApp::new(
            &self.url,
            self.app_id,
            &self.private_key_pem,
            Arc::new(|_: &'static str, _: &str| {}),
        )
        .unwrap()
        .with_backoff(std::time::Duration::from_millis(10))
    }

    /// Makes the next `times` calls of `endpoint` answer `status` (403 and 429 come as
    /// secondary rate limits, with `retry-after: 1`).
    pub fn fail(&self, endpoint: &str, status: u16, times: u32) {
        self.state
            .lock()
            .unwrap()
            .faults
            .insert(endpoint.into(), (status, times));
    }

    /// Makes every call of `endpoint` take `delay` to answer, as a slow GitHub does.
    pub fn slow(&self, endpoint: &str, delay: std::time::Duration) {
        let mut s = self.state.lock().unwrap();
        s.delays.insert(endpoint.into(), delay);
    }

    /// Makes every call of `endpoint` wait, once it has arrived, until the returned gate is
    /// closed (`Semaphore::close`).
    pub fn hold(&self, endpoint: &str) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut s = self.state.lock().unwrap();
        s.holds.insert(endpoint.into(), gate.clone());
        gate
    }

    /// Every call recorded so far, by endpoint.
    pub fn calls_by_endpoint(&self) -> std::collections::BTreeMap<String, usize> {
        let mut by = std::collections::BTreeMap::new();
        for (endpoint, _) in &self.state.lock().unwrap().calls {
            *by.entry(endpoint.clone()).or_default() += 1;
        }
        by
    }

    pub fn calls_of(&self, endpoint: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|(e, _)| e == endpoint)
            .count()
    }

    /// Adds a runner to a target (`orgs/ORG` or `repos/OWNER/REPO`).
    pub fn add_runner(&self, target: &str, name: &str, status: &'static str) -> i64 {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let id = s.next_id;
        s.runners
            .entry(target.into())
            .or_default()
            .push(FakeRunner {
                id,
                name: name.into(),
                labels: vec![],
                group: 1,
                status,
                busy: false,
            });
        id
    }

    /// Publishes actions/runner `version` (the newest so far) with one asset per
    /// (name, download URL, SHA-256 hex), as GitHub's releases API lists assets and digests.
    pub fn add_runner_release(&self, version: &str, assets: &[(String, String, String)]) {
        let assets: Vec<Value> = assets
            .iter()
            .enumerate()
            .map(|(n, (name, url, sha256))| {
                json!({
                    "id": 1000 + n, "name": name, "content_type": "application/gzip",
                    "state": "uploaded", "browser_download_url": url,
                    "digest": format!("sha256:{sha256}"),
                })
            })
            .collect();
        let release = json!({
            "tag_name": format!("v{version}"), "name": format!("v{version}"),
            "draft": false, "prerelease": false, "assets": assets,
        });
        self.state
            .lock()
            .unwrap()
            .runner_releases
            .insert(0, release);
    }

    /// Sets what GitHub says of workflow job `id` of `repository`: its status (`queued`,
    /// `in_progress`, `completed`) and the runner that took it.
    pub fn set_job(&self, repository: &str, id: i64, status: &str, runner: Option<(i64, &str)>) {
        let job = json!({
            "id": id, "run_id": id + 1_000_000, "run_attempt": 1, "status": status,
            "conclusion": if status == "completed" { json!("success") } else { Value::Null },
            "html_url": format!("https://github.com/{repository}/actions/runs/{}/job/{id}", id + 1_000_000),
            "labels": ["self-hosted", "linux"],
            "runner_id": runner.map(|r| r.0), "runner_name": runner.map(|r| r.1),
            "runner_group_id": runner.map(|_| 1), "runner_group_name": runner.map(|_| "Default"),
            "repository": repository,
        });
        self.state.lock().unwrap().jobs.insert(id, job);
    }

    /// Job `id` of `repository` ended with `conclusion` on `runner` (id, name).
    pub fn finish_job(&self, repository: &str, id: i64, conclusion: &str, runner: (i64, &str)) {
        self.set_job(repository, id, "completed", Some(runner));
        let mut s = self.state.lock().unwrap();
        s.jobs.get_mut(&id).unwrap()["conclusion"] = json!(conclusion);
    }

    /// Marks the runner named `name` of `target` busy (running a job) or idle.
    pub fn set_busy(&self, target: &str, name: &str, busy: bool) {
        let mut s = self.state.lock().unwrap();
        for r in s.runners.entry(target.into()).or_default() {
            if r.name == name {
                r.busy = busy;
                r.status = "online";
            }
        }
    }

    /// The runner named `name` of `target` lost its machine: GitHub shows it offline and no
    /// longer busy.
    pub fn runner_lost(&self, target: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        for r in s.runners.entry(target.into()).or_default() {
            if r.name == name {
                r.busy = false;
                r.status = "offline";
            }
        }
    }

    /// The runner of `target` named `name`: its id.
    pub fn runner_id(&self, target: &str, name: &str) -> Option<i64> {
        let s = self.state.lock().unwrap();
        s.runners
            .get(target)?
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.id)
    }

    /// The repository of workflow job `id`, when [`Self::set_job`] told of it.
    pub fn job_repository(&self, id: i64) -> Option<String> {
        let s = self.state.lock().unwrap();
        s.jobs.get(&id)?["repository"].as_str().map(String::from)
    }

    pub fn runner_names(&self, target: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .runners
            .get(target)
            .map(|r| r.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    }
}

fn error(status: u16, message: &str) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap(),
        axum::Json(json!({
            "message": message,
            "documentation_url": "https://docs.github.com/rest",
        })),
    )
        .into_response();
    if status == 403 || status == 429 {
        response
            .headers_mut()
            .insert("retry-after", "1".parse().unwrap());
    }
    response
}

/// Records the call and answers an injected fault, if one is due.
fn enter(shared: &Shared, endpoint: &str) -> Option<Response> {
    let mut s = shared.state.lock().unwrap();
    let fault = s.faults.get_mut(endpoint).filter(|(_, n)| *n > 0).map(|f| {
        f.1 -= 1;
        f.0
    });
    s.calls.push((endpoint.into(), fault.unwrap_or(200)));
    fault.map(|status| match status {
        403 | 429 => error(status, "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."),
        409 => error(409, "Already exists - A runner with the name already exists."),
        _ => error(status, "Server Error"),
    })
}

fn b64url(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()
}

/// Checks an App JWT as GitHub does: RS256 by the App's key, `iss` the App id, issued in the
/// past, expiring in the future and at most 10 minutes after issue.
fn app_jwt_ok(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let parts: Vec<&str> = token.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return false;
    };
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        &shared.public_key,
    );
    let signed = format!("{header}.{claims}");
    let Some(signature) = b64url(signature) else {
        return false;
    };
    if key.verify(signed.as_bytes(), &signature).is_err() {
        return false;
    }
    let Some(claims) = b64url(claims).and_then(|c| serde_json::from_slice::<Value>(&c).ok()) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(i64::MAX),
        claims["exp"].as_i64().unwrap_or(0),
    );
    claims["iss"].as_str() == Some(&shared.app_id.to_string())
        && iat <= now
        && exp > now
        && exp - iat <= 600
}

/// The installation a `token …` header belongs to.
/// GitHub's primary rate limit for installation tokens: every answer says what is left of
/// the installation's hourly budget; past it, 403 with `x-ratelimit-remaining: 0`.
async fn rate_limit(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(id) = installation_of(&shared, request.headers()) else {
        return next.run(request).await;
    };
    let (limit, left) = {
        let mut state = shared.state.lock().unwrap();
        let (limit, left) = state.rate_limits.entry(id).or_insert((5000, 5000));
        let before = *left;
        *left = left.saturating_sub(1);
        (*limit, before)
    };
    let mut response = if left == 0 {
        error(
            403,
            &format!("API rate limit exceeded for installation ID {id}."),
        )
    } else {
        next.run(request).await
    };
    let reset = k8s_openapi::jiff::Timestamp::now().as_second() + 3600;
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-ratelimit-limit", limit),
        ("x-ratelimit-remaining", left.saturating_sub(1)),
        ("x-ratelimit-used", limit - left.saturating_sub(1)),
        ("x-ratelimit-reset", reset as u64),
    ] {
        headers.insert(name, value.into());
    }
    headers.insert("x-ratelimit-resource", "core".parse().unwrap());
    response
}

fn installation_of(shared: &Shared, headers: &HeaderMap) -> Option<i64> {
    let token = headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("token ")?;
    shared.state.lock().unwrap().tokens.get(token).copied()
}

macro_rules! guard {
    ($shared:expr, $endpoint:expr) => {
        let delay = $shared.state.lock().unwrap().delays.get($endpoint).copied();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let hold = $shared.state.lock().unwrap().holds.get($endpoint).cloned();
        if let Some(gate) = hold {
            let _ = gate.acquire().await;
        }
        if let Some(fault) = enter(&$shared, $endpoint) {
            return fault;
        }
    };
}

macro_rules! app_only {
    ($shared:expr, $headers:expr) => {
        if !app_jwt_ok(&$shared, &$headers) {
            return error(401, "A JSON web token could not be decoded");
        }
    };
}

macro_rules! installation_only {
    ($shared:expr, $headers:expr) => {
        match installation_of(&$shared, &$headers) {
            Some(id) => id,
            None => return error(401, "Bad credentials"),
        }
    };
}

async fn list_installations(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    guard!(shared, "list_installations");
    app_only!(shared, headers);
    let ids: Vec<Value> = shared
        .state
        .lock()
        .unwrap()
        .installations
        .keys()
        .map(|id| json!({"id": id, "app_id": shared.app_id}))
        .collect();
    axum::Json(ids).into_response()
}

async fn create_token(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "create_installation_token");
    app_only!(shared, headers);
    let mut s = shared.state.lock().unwrap();
    if !s.installations.contains_key(&id) {
        return error(404, "Not Found");
    }
    let n = s.tokens_issued.entry(id).or_default();
    *n += 1;
    let token = format!("ghs_fake{id}x{n}");
    let expires = k8s_openapi::jiff::Timestamp::now()
        + k8s_openapi::jiff::SignedDuration::from_secs(s.token_lifetime);
    s.tokens.insert(token.clone(), id);
    (
        StatusCode::CREATED,
        axum::Json(json!({"token": token, "expires_at": expires.to_string(), "permissions": {}})),
    )
        .into_response()
}

fn installation_for(shared: &Shared, owner: &str, repo: Option<&str>) -> Option<i64> {
    let s = shared.state.lock().unwrap();
    s.installations
        .iter()
        .find(|(_, repos)| {
            repos.iter().any(|r| match repo {
                Some(repo) => r.eq_ignore_ascii_case(&format!("{owner}/{repo}")),
                None => r.split('/').next() == Some(owner),
            })
        })
        .map(|(id, _)| *id)
}

async fn repo_installation(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "get_installation");
    app_only!(shared, headers);
    match installation_for(&shared, &owner, Some(&repo)) {
        Some(id) => axum::Json(json!({"id": id})).into_response(),
        None => error(404, "Not Found"),
    }
}

async fn org_installation(
    State(shared): State<Arc<Shared>>,
    Path(org): Path<String>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "get_installation");
    app_only!(shared, headers);
    match installation_for(&shared, &org, None) {
        Some(id) => axum::Json(json!({"id": id})).into_response(),
        None => error(404, "Not Found"),
    }
}

async fn installation_repositories(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "list_installation_repositories");
    let id = installation_only!(shared, headers);
    let query = query.unwrap_or_default();
    let param = |key: &str| {
        (query.split('&'))
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let (page, per_page) = (param("page").unwrap_or(1), param("per_page").unwrap_or(30));
    let all = shared.state.lock().unwrap().installations[&id].clone();
    let repos: Vec<Value> = (all.iter())
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|r| json!({"full_name": r}))
        .collect();
    axum::Json(json!({"total_count": all.len(), "repositories": repos})).into_response()
}

async fn runner_groups(
    State(shared): State<Arc<Shared>>,
    Path(org): Path<String>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "list_runner_groups");
    installation_only!(shared, headers);
    let mut groups = vec![json!({"id": 1, "name": "Default", "default": true})];
    for (id, name) in shared
        .state
        .lock()
        .unwrap()
        .groups
        .get(&org)
        .cloned()
        .unwrap_or_default()
    {
        groups.push(json!({"id": id, "name": name, "default": false}));
    }
    axum::Json(json!({"total_count": groups.len(), "runner_groups": groups})).into_response()
}

fn list_runners(shared: &Shared, target: &str, query: Option<String>) -> Response {
    let query: HashMap<String, String> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let page: usize = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let per_page: usize = query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(30);
    let s = shared.state.lock().unwrap();
    let all = s.runners.get(target).cloned().unwrap_or_default();
    let runners: Vec<Value> = all
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(runner_json)
        .collect();
    axum::Json(json!({"total_count": all.len(), "runners": runners})).into_response()
}

fn runner_json(r: &FakeRunner) -> Value {
    json!({"id": r.id, "name": r.name, "os": "Linux", "status": r.status, "busy": r.busy,
        "labels": r.labels.iter().map(|l| json!({"name": l, "type": "custom"})).collect::<Vec<_>>()})
}

fn one_runner(shared: &Shared, target: &str, id: i64) -> Response {
    let s = shared.state.lock().unwrap();
    match s
        .runners
        .get(target)
        .and_then(|all| all.iter().find(|r| r.id == id))
    {
        Some(r) => axum::Json(runner_json(r)).into_response(),
        None => error(404, "Not Found"),
    }
}

async fn get_org_runner(
    State(shared): State<Arc<Shared>>,
    Path((org, id)): Path<(String, i64)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "get_runner");
    installation_only!(shared, headers);
    one_runner(&shared, &format!("orgs/{org}"), id)
}

async fn get_repo_runner(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, i64)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "get_runner");
    installation_only!(shared, headers);
    one_runner(&shared, &format!("repos/{owner}/{repo}"), id)
}

async fn workflow_job(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, i64)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "get_workflow_job");
    installation_only!(shared, headers);
    let s = shared.state.lock().unwrap();
    match s
        .jobs
        .get(&id)
        .filter(|j| j["repository"] == format!("{owner}/{repo}"))
    {
        Some(job) => axum::Json(job.clone()).into_response(),
        None => error(404, "Not Found"),
    }
}

async fn list_org_runners(
    State(shared): State<Arc<Shared>>,
    Path(org): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "list_runners");
    installation_only!(shared, headers);
    list_runners(&shared, &format!("orgs/{org}"), query)
}

async fn list_repo_runners(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "list_runners");
    installation_only!(shared, headers);
    list_runners(&shared, &format!("repos/{owner}/{repo}"), query)
}

fn release(shared: &Shared, owner: &str, repo: &str, tag: Option<&str>) -> Response {
    let state = shared.state.lock().unwrap();
    let found = state
        .runner_releases
        .iter()
        .filter(|_| (owner, repo) == ("actions", "runner"))
        .find(|r| tag.is_none_or(|t| r["tag_name"] == t));
    match found {
        Some(release) => axum::Json(release.clone()).into_response(),
        None => error(404, "Not Found"),
    }
}

async fn latest_release(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
) -> Response {
    guard!(shared, "get_runner_release");
    release(&shared, &owner, &repo, None)
}

async fn release_by_tag(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, tag)): Path<(String, String, String)>,
) -> Response {
    guard!(shared, "get_runner_release");
    release(&shared, &owner, &repo, Some(&tag))
}

fn jit(shared: &Shared, target: &str, body: &Value) -> Response {
    let Some(name) = body["name"].as_str() else {
        return error(422, "Invalid request. \"name\" wasn't supplied.");
    };
    let Some(group) = body["runner_group_id"].as_i64() else {
        return error(422, "Invalid request. \"runner_group_id\" wasn't supplied.");
    };
    let labels: Vec<String> = body["labels"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|l| l.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if labels.is_empty() {
        return error(422, "Invalid request. \"labels\" wasn't supplied.");
    }
    let mut s = shared.state.lock().unwrap();
    let runners = s.runners.entry(target.into()).or_default();
    if runners.iter().any(|r| r.name == name) {
        s.calls.push(("generate_jitconfig_clash".into(), 409));
        return error(
            409,
            "Already exists - A runner with the name already exists.",
        );
    }
    s.next_id += 1;
    let id = s.next_id;
    s.runners.get_mut(target).unwrap().push(FakeRunner {
        id,
        name: name.into(),
        labels: labels.clone(),
        group,
        status: "offline",
        busy: false,
    });
    let config = base64::engine::general_purpose::STANDARD.encode(format!("jit:{target}:{name}"));
    (
        StatusCode::CREATED,
        axum::Json(json!({
            "runner": {"id": id, "name": name, "os": "unknown", "status": "offline", "busy": false,
                "labels": labels.iter().map(|l| json!({"name": l, "type": "custom"})).collect::<Vec<_>>()},
            "encoded_jit_config": config,
        })),
    )
        .into_response()
}

async fn org_jit(
    State(shared): State<Arc<Shared>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    guard!(shared, "generate_jitconfig");
    installation_only!(shared, headers);
    jit(&shared, &format!("orgs/{org}"), &body)
}

async fn repo_jit(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    guard!(shared, "generate_jitconfig");
    installation_only!(shared, headers);
    jit(&shared, &format!("repos/{owner}/{repo}"), &body)
}

fn remove_runner(shared: &Shared, target: &str, id: i64) -> Response {
    let mut s = shared.state.lock().unwrap();
    let runners = s.runners.entry(target.into()).or_default();
    if let Some(busy) = runners.iter().find(|r| r.id == id && r.busy) {
        let name = busy.name.clone();
        s.busy_deletes.push(name.clone());
        return error(
            422,
            &format!("Bad request - Runner \"{name}\" is still running a job\""),
        );
    }
    let runners = s.runners.entry(target.into()).or_default();
    let before = runners.len();
    runners.retain(|r| r.id != id);
    if runners.len() == before {
        return error(404, "Not Found");
    }
    StatusCode::NO_CONTENT.into_response()
}

/// A workflow run of a job the fake knows: completed unless a test said it goes on.
async fn workflow_run(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, run)): Path<(String, String, i64)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "get_workflow_run");
    installation_only!(shared, headers);
    let s = shared.state.lock().unwrap();
    let known = (s.jobs.values())
        .any(|j| j["run_id"] == run && j["repository"] == format!("{owner}/{repo}"));
    if !known {
        return error(404, "Not Found");
    }
    let status = if s.runs_in_progress.contains(&run) {
        "in_progress"
    } else {
        "completed"
    };
    let attempt = s.run_attempts.get(&run).copied().unwrap_or(1);
    axum::Json(json!({"id": run, "status": status, "run_attempt": attempt})).into_response()
}

/// Re-runs a job, as GitHub does once the job's workflow run completed (201, else 403): a new
/// attempt of the run starts.
async fn rerun_job(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, i64)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "rerun_job");
    installation_only!(shared, headers);
    let mut s = shared.state.lock().unwrap();
    let run = match s.jobs.get(&id) {
        Some(job) if job["repository"] == format!("{owner}/{repo}") => job["run_id"].as_i64(),
        _ => return error(404, "Not Found"),
    };
    let Some(run) = run else {
        return error(404, "Not Found");
    };
    if s.runs_in_progress.contains(&run) {
        return error(403, "This workflow run is not completed");
    }
    *s.run_attempts.entry(run).or_insert(1) += 1;
    s.runs_in_progress.insert(run);
    s.reruns.push(id);
    (StatusCode::CREATED, axum::Json(json!({}))).into_response()
}

async fn delete_org_runner(
    State(shared): State<Arc<Shared>>,
    Path((org, id)): Path<(String, i64)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "delete_runner");
    installation_only!(shared, headers);
    remove_runner(&shared, &format!("orgs/{org}"), id)
}

async fn delete_repo_runner(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, i64)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "delete_runner");
    installation_only!(shared, headers);
    remove_runner(&shared, &format!("repos/{owner}/{repo}"), id)
}

/// Newest first, `per_page` at a time, the next page named by a cursor in the `Link` header,
/// as GitHub pages an App's webhook deliveries.
async fn list_deliveries(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "list_deliveries");
    app_only!(shared, headers);
    let query = query.unwrap_or_default();
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let per_page = param("per_page").unwrap_or(30).min(100);
    let from = param("cursor").unwrap_or(0);
    let mut all = shared.state.lock().unwrap().deliveries.clone();
    all.sort_by(|a, b| b["delivered_at"].as_str().cmp(&a["delivered_at"].as_str()));
    let page: Vec<Value> = all.iter().skip(from).take(per_page).cloned().collect();
    let mut response = axum::Json(page).into_response();
    if from + per_page < all.len() {
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let next = format!(
            "<http://{host}/app/hook/deliveries?per_page={per_page}&cursor={}>; rel=\"next\"",
            from + per_page
        );
        response.headers_mut().insert("link", next.parse().unwrap());
    }
    response
}

async fn redeliver(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "redeliver");
    app_only!(shared, headers);
    let mut s = shared.state.lock().unwrap();
    if !s.deliveries.iter().any(|d| d["id"] == id) {
        return error(404, "Not Found");
    }
    s.redelivered.push(id);
    (StatusCode::ACCEPTED, axum::Json(json!({}))).into_response()
}

/// Runs by `status` (a run is in progress once one of its jobs is), a page at a time.
async fn queued_runs(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "list_queued_runs");
    installation_only!(shared, headers);
    let query = query.unwrap_or_default();
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    let wanted = param("status");
    let page: usize = param("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let per_page: usize = param("per_page").and_then(|p| p.parse().ok()).unwrap_or(30);
    let runs: Vec<Value> = shared
        .state
        .lock()
        .unwrap()
        .queued
        .get(&format!("{owner}/{repo}"))
        .map(|runs| {
            runs.iter()
                .map(|(id, jobs)| {
                    let started = jobs.iter().any(|j| j["status"] != "queued");
                    let status = if started { "in_progress" } else { "queued" };
                    json!({"id": id, "status": status})
                })
                .filter(|run| wanted.as_ref().is_none_or(|w| run["status"] == w.as_str()))
                .skip((page - 1) * per_page)
                .take(per_page)
                .collect()
        })
        .unwrap_or_default();
    axum::Json(json!({"total_count": runs.len(), "workflow_runs": runs})).into_response()
}

async fn run_jobs(
    State(shared): State<Arc<Shared>>,
    Path((owner, repo, run)): Path<(String, String, i64)>,
    headers: HeaderMap,
) -> Response {
    guard!(shared, "list_run_jobs");
    installation_only!(shared, headers);
    let jobs: Vec<Value> = shared
        .state
        .lock()
        .unwrap()
        .queued
        .get(&format!("{owner}/{repo}"))
        .and_then(|runs| runs.iter().find(|(id, _)| *id == run))
        .map(|(_, jobs)| jobs.clone())
        .unwrap_or_default();
    axum::Json(json!({"total_count": jobs.len(), "jobs": jobs})).into_response()
}
