//! GitHub's own `workflow_job` example payloads (npm `@octokit/webhooks-examples`), shaped for
//! a test's job and signed the way GitHub signs.

use serde_json::{Value, json};

use super::repo_root;

/// Every `workflow_job` example GitHub documents.
pub fn examples() -> Vec<Value> {
    let path = repo_root()
        .join("tests/npm/node_modules/@octokit/webhooks-examples/api.github.com/index.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make tools`", path.display()));
    let all: Vec<Value> = serde_json::from_str(&text).unwrap();
    let events = all
        .into_iter()
        .find(|e| e["name"] == "workflow_job")
        .unwrap();
    events["examples"].as_array().unwrap().clone()
}

/// GitHub's `queued` example, as job `job_id` of `example-org/api` (installation 1) asking for
/// `labels`.
pub fn queued(job_id: i64, labels: &[&str]) -> Vec<u8> {
    let mut event = examples()
        .into_iter()
        .find(|e| e["action"] == "queued")
        .unwrap();
    event["workflow_job"]["id"] = json!(job_id);
    event["workflow_job"]["run_id"] = json!(job_id * 10);
    event["workflow_job"]["labels"] = json!(labels);
    event["repository"]["name"] = json!("api");
    event["repository"]["full_name"] = json!("example-org/api");
    event["repository"]["owner"]["login"] = json!("example-org");
    event["installation"] = json!({"id": 1});
    serde_json::to_vec(&event).unwrap()
}

/// GitHub's `completed` example for a job cancelled while queued: no runner took it.
pub fn cancelled(job_id: i64, labels: &[&str]) -> Vec<u8> {
    let mut event: Value = serde_json::from_slice(&queued(job_id, labels)).unwrap();
    event["action"] = json!("completed");
    let job = &mut event["workflow_job"];
    job["status"] = json!("completed");
    job["conclusion"] = json!("cancelled");
    job["completed_at"] = job["created_at"].clone();
    for field in [
        "runner_id",
        "runner_name",
        "runner_group_id",
        "runner_group_name",
    ] {
        job[field] = Value::Null;
    }
    serde_json::to_vec(&event).unwrap()
}

/// GitHub's `in_progress` delivery for job `job_id` taken by runner `runner` (id, name).
pub fn in_progress(job_id: i64, labels: &[&str], runner: (i64, &str)) -> Vec<u8> {
    taken(job_id, labels, runner, "in_progress", None)
}

/// GitHub's `completed` delivery for job `job_id` that runner `runner` (id, name) ran.
pub fn completed(job_id: i64, labels: &[&str], runner: (i64, &str), conclusion: &str) -> Vec<u8> {
    taken(job_id, labels, runner, "completed", Some(conclusion))
}

fn taken(
    job_id: i64,
    labels: &[&str],
    (runner_id, runner_name): (i64, &str),
    action: &str,
    conclusion: Option<&str>,
) -> Vec<u8> {
    let mut event: Value = serde_json::from_slice(&queued(job_id, labels)).unwrap();
    event["action"] = json!(action);
    let job = &mut event["workflow_job"];
    job["status"] = json!(action);
    job["conclusion"] = json!(conclusion);
    job["runner_id"] = json!(runner_id);
    job["runner_name"] = json!(runner_name);
    job["runner_group_id"] = json!(1);
    job["runner_group_name"] = json!("Default");
    serde_json::to_vec(&event).unwrap()
}

/// Delivers `body` to `{url}/api/webhook` as GitHub would; panics unless it is accepted.
pub async fn deliver(url: &str, secret: &[u8], delivery: &str, body: Vec<u8>) {
    deliver_with(&reqwest::Client::new(), url, secret, delivery, body).await
}

/// [`deliver`] with a client of the caller's (one that trusts a private CA, say).
pub async fn deliver_with(
    client: &reqwest::Client,
    url: &str,
    secret: &[u8],
    delivery: &str,
    body: Vec<u8>,
) {
    let response = send(client, url, secret, delivery, body).await.unwrap();
    let status = response.status();
    assert!(
        status.is_success(),
        "{status}: {}",
        response.text().await.unwrap()
    );
}

/// Posts one delivery as GitHub does, once: GitHub does not retry a delivery that failed.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    secret: &[u8],
    delivery: &str,
    body: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{url}/api/webhook"))
        .header("content-type", "application/json")
        .header("x-github-event", "workflow_job")
        .header("x-github-delivery", delivery)
        .header(
            "x-hub-signature-256",
            pacer::github::webhook::sign(secret, &body),
        )
        .body(body)
        .send()
        .await
}
