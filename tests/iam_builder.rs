//! The IAM policy builder page builds, from a form's values, exactly what `pacer iam-policy`
//! prints for the same values: its own script is run by node on the committed page.

mod support;

use std::process::Command;

use serde_json::json;
use support::repo_root;

fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pacer"))
        .arg("iam-policy")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn page(values: serde_json::Value) -> String {
    let out = Command::new("node")
        .arg(repo_root().join("tests/npm/iam-builder.mjs"))
        .arg(repo_root().join("docs/iam-policy-builder.html"))
        .arg(values.to_string())
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_page_builds_the_policy_the_cli_prints() {
    let cases = [
        (
            json!({"account": "123456789012", "region": "eu-west-1", "controllerId": "prod-eu", "runnerRole": "pacer-runner"}),
            vec![
                "--account",
                "123456789012",
                "--region",
                "eu-west-1",
                "--controller-id",
                "prod-eu",
                "--runner-role",
                "pacer-runner",
            ],
        ),
        (
            json!({"account": "210987654321", "region": "us-east-2", "controllerId": "ci"}),
            vec![
                "--account",
                "210987654321",
                "--region",
                "us-east-2",
                "--controller-id",
                "ci",
            ],
        ),
        (json!({}), vec![]),
    ];
    for (values, args) in cases {
        let built = page(values.clone());
        assert_eq!(built, cli(&args), "{values}");
        let policy: serde_json::Value = serde_json::from_str(&built).unwrap();
        assert!(policy["Statement"].as_array().unwrap().len() > 5);
    }
}

/// A WebDriver session on chromedriver, spoken over plain HTTP.
struct Browser {
    http: reqwest::Client,
    base: String,
    driver: std::process::Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start(chromedriver: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{url}/status")).send().await
                && r.status().is_success()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let session = http
            .post(format!("{url}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400"]},
            }}}))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap();
        let id = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"));
        Self {
            base: format!("{url}/session/{id}"),
            http,
            driver,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if !body.is_null() {
            request = request.json(&body);
        }
        let answer: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
        assert!(answer["value"]["error"].is_null(), "{path}: {answer}");
        answer["value"].clone()
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        let id = self.element(css).await;
        let text = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{id}/text"),
                json!(null),
            )
            .await;
        text.as_str().unwrap().to_string()
    }
}

/// The page in headless Chromium, driven over WebDriver: the form filled in, the policy shown
/// equals the CLI's, and a screenshot for people. Needs Debian's chromium and chromium-driver
/// (`hack/chromium.sh`, part of `make tools`).
#[tokio::test]
async fn the_page_in_a_browser_shows_the_policy_the_cli_prints() {
    let Some(chromedriver) = which("chromedriver") else {
        eprintln!("SKIPPED: chromedriver is not installed; run hack/chromium.sh");
        return;
    };
    let browser = Browser::start(&chromedriver).await;
    let page = format!(
        "file://{}",
        repo_root().join("docs/iam-policy-builder.html").display()
    );
    browser
        .call(reqwest::Method::POST, "/url", json!({"url": page}))
        .await;
    browser.type_into("#account", "123456789012").await;
    browser.type_into("#region", "eu-central-1").await;
    browser.type_into("#controller", "prod-eu").await;
    browser.type_into("#role", "pacer-runner").await;
    let shown = browser.text("#policy").await;
    let expected = cli(&[
        "--account",
        "123456789012",
        "--region",
        "eu-central-1",
        "--controller-id",
        "prod-eu",
        "--runner-role",
        "pacer-runner",
    ]);
    assert_eq!(shown.trim_end(), expected.trim_end());
    let rows = browser.text("#statements").await;
    assert!(rows.contains("TerminateOnlyOurInstances"), "{rows}");
    let png = browser
        .call(reqwest::Method::GET, "/screenshot", json!(null))
        .await;
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("iam-policy-builder.png");
    std::fs::write(&path, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    eprintln!("screenshot: {}", path.display());
    browser.call(reqwest::Method::DELETE, "", json!(null)).await;
}

fn which(program: &str) -> Option<String> {
    let out = Command::new("bash")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!path.is_empty()).then_some(path)
}
