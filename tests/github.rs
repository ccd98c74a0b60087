//! The GitHub App client against the fake GitHub: App JWTs, installation tokens, JIT configs
//! for organization and repository runners, stale runner names, retries.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pacer::github::client::GitHubApp;
use pacer::github::{GitHub, RunnerTarget};
use support::github::FakeGitHub;

async fn fake() -> FakeGitHub {
    let fake = FakeGitHub::start().await;
    {
        let mut state = fake.state.lock().unwrap();
        state
            .installations
            .insert(11, vec!["example-org/api".into(), "example-org/web".into()]);
        state.installations.insert(22, vec!["someone/tool".into()]);
        state
            .groups
            .insert("example-org".into(), vec![(7, "ci-runners".into())]);
    }
    fake
}

fn client(fake: &FakeGitHub) -> (GitHubApp, Arc<AtomicUsize>) {
    let retries = Arc::new(AtomicUsize::new(0));
    let counted = retries.clone();
    let count = Arc::new(move |_action: &'static str, outcome: &str| {
        if outcome.ends_with("error") || outcome == "rate_limited" {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let app = GitHubApp::new(&fake.url, fake.app_id, &fake.private_key_pem, count)
        .unwrap()
        .with_backoff(Duration::from_millis(10));
    (app, retries)
}

fn org() -> RunnerTarget {
    RunnerTarget {
        owner: "example-org".into(),
        runner_group: Some("ci-runners".into()),
        ..Default::default()
    }
}

fn repo() -> RunnerTarget {
    RunnerTarget {
        owner: "someone".into(),
        repo: Some("tool".into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn jit_configs_for_organization_and_repository_runners() {
    let fake = fake().await;
    let (github, _) = client(&fake);
    let labels = vec!["self-hosted".to_string(), "linux".to_string()];
    let config = github
        .jit_config(&org(), "pacer-prod-1", &labels)
        .await
        .unwrap();
    assert!(!config.encoded.expose().is_empty());
    let runners = fake.state.lock().unwrap().runners["orgs/example-org"].clone();
    assert_eq!(runners.len(), 1);
    assert_eq!(
        (runners[0].id, runners[0].group),
        (config.runner_id, 7),
        "in its runner group"
    );
    assert_eq!(runners[0].labels, labels);

    github
        .jit_config(&repo(), "pacer-prod-2", &labels)
        .await
        .unwrap();
    assert_eq!(fake.runner_names("repos/someone/tool"), ["pacer-prod-2"]);
    // The installations were looked up from the owner and the repository, once each.
    assert_eq!(fake.calls_of("get_installation"), 2);
    github
        .jit_config(&org(), "pacer-prod-3", &labels)
        .await
        .unwrap();
    assert_eq!(fake.calls_of("get_installation"), 2);

    let listed = github.list_runners(&org()).await.unwrap();
    assert_eq!(listed.len(), 2);
    github.delete_runner(&org(), listed[0].id).await.unwrap();
    github
        .delete_runner(&org(), listed[0].id)
        .await
        .expect("a runner already gone is fine");
    assert_eq!(github.list_runners(&org()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_stale_runner_name_is_deleted_and_the_config_made_again() {
    let fake = fake().await;
    let (github, _) = client(&fake);
    let stale = fake.add_runner("orgs/example-org", "pacer-prod-9", "offline");
    let config = github
        .jit_config(&org(), "pacer-prod-9", &["self-hosted".to_string()])
        .await
        .unwrap();
    assert_ne!(config.runner_id, stale);
    assert_eq!(fake.runner_names("orgs/example-org"), ["pacer-prod-9"]);
    assert_eq!(fake.calls_of("generate_jitconfig"), 2);
    assert_eq!(fake.calls_of("delete_runner"), 1);
}

#[tokio::test]
async fn server_errors_and_secondary_rate_limits_are_retried_and_counted() {
    let fake = fake().await;
    let (github, retries) = client(&fake);
    fake.fail("generate_jitconfig", 503, 2);
    fake.fail("list_runners", 403, 1);
    github
        .jit_config(&org(), "pacer-prod-5", &["self-hosted".to_string()])
        .await
        .unwrap();
    github.list_runners(&org()).await.unwrap();
    assert_eq!(fake.calls_of("generate_jitconfig"), 3);
    assert_eq!(retries.load(Ordering::SeqCst), 3);
    // A failure that lasts is an error, not a hang.
    fake.fail("list_runners", 500, 10);
    assert!(github.list_runners(&org()).await.is_err());
}

#[tokio::test]
async fn installation_tokens_are_reused_until_near_expiry() {
    let fake = fake().await;
    let (github, _) = client(&fake);
    for _ in 0..3 {
        github.installation_token(11).await.unwrap();
    }
    assert_eq!(fake.state.lock().unwrap().tokens_issued[&11], 1);
    // A token with less than the safety margin left is replaced every time.
    fake.state.lock().unwrap().token_lifetime = 120;
    let first = github.installation_token(22).await.unwrap();
    let second = github.installation_token(22).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(fake.state.lock().unwrap().tokens_issued[&22], 2);
}

#[tokio::test]
async fn a_jwt_from_another_key_is_refused() {
    let fake = fake().await;
    let other = FakeGitHub::start().await;
    let count = Arc::new(|_: &'static str, _: &str| {});
    let github = GitHubApp::new(&fake.url, fake.app_id, &other.private_key_pem, count).unwrap();
    let err = github.installation_token(11).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}
