//! Ten thousand forged requests at a real `pacer run`, mixed across every unauthenticated
//! route of its listener: webhooks with no, wrong, malformed or mismatched signatures (a
//! signed body cut short, another event), oversized ones (declared, and chunked past the
//! limit) and bodies cut off in transit; bootstraps with no JSON, garbage or truncated
//! signatures, documents signed by an untrusted key, altered after signing, or genuinely
//! signed but from another account, another region or too long ago; and the four callback
//! routes with no token, another scheme, garbage, a token minted with another key, a genuine
//! one expired, and a genuine one altered. Each must be answered as designed (401, 400 or 413,
//! with a JSON reason; a body cut off in transit may instead just be closed).
//!
//! The process runs as a ServiceAccount the API server audits, as a follower replica (another
//! holds its Lease): every replica serves the listener alike, and a follower's own calls are
//! its listener's alone, where a leader's garbage collector and sweep would blur the record.
//! Proved afterwards: the audit log shows no write by it outside its Lease, over its whole
//! life, and no read during the flood beyond its watches' upkeep; the AWS proxy recorded no
//! call and the fake GitHub no request; no RunnerJob exists; and its resident memory, read from
//! /proc at idle after a warm-up of the same mix, came back to within [`RSS_MARGIN_KIB`] of
//! it after a settle period.
//!
//! ACME's HTTP-01 path is served only with `server.tls.mode: acme`, on a listener of its own
//! that answers from memory (tests/tls.rs); it is not part of this flood.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use pacer::api::{RunnerJob, RunnerPool};
use pacer::config::Secret;
use pacer::runner::token::{Claims, Tokens};
use serde_json::{Value, json};
use support::github::FakeGitHub;
use support::identity::{self, Signer};
use support::process::{self, WEBHOOK_SECRET};
use support::{Parts, ground, webhooks};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const FORGERIES: usize = 10_000;
/// Forgeries of the same mix sent first, so that idle memory is measured with every code path
/// warmed (allocator arenas, lazily built state, metric label sets).
const WARM_UP: usize = 1_000;
/// Connections at once.
const CONCURRENCY: usize = 32;
/// Pacer's AWS account (`aws.account_id`): documents from any other are refused unasked.
const ACCOUNT: &str = "123456789012";
/// How far above idle resident memory may stay once the flood is over: a leak of one KiB per
/// forgery (10,000 KiB) would pass it. The allocator keeps some of what the burst used
/// (bodies of up to 256 KiB on 32 connections at once) and hands it back lazily: measured, the
/// flood took RSS about 4 MiB over idle and 10 s later it was back under idle.
const RSS_MARGIN_KIB: u64 = 8 * 1024;

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Everything a forger might hold, made once: bodies, signatures and tokens.
struct Kit {
    url: String,
    address: String,
    /// A queued delivery Pacer would act on, were it signed.
    webhook: Vec<u8>,
    /// Signed with the true secret, as the body before it was cut short.
    webhook_signature: String,
    /// An untrusted key's signature of a document from Pacer's account.
    untrusted: Value,
    /// Genuinely signed documents Pacer must refuse unasked.
    other_account: Value,
    other_region: Value,
    stale: Value,
    /// A genuine document of Pacer's account, altered after it was signed.
    altered: Value,
    /// A genuine signature cut short.
    truncated_signature: Value,
    /// Minted with another key.
    foreign_token: String,
    /// Minted with Pacer's key, expired an hour ago.
    expired_token: String,
    /// Pacer's own token with one byte of its tag changed.
    altered_token: String,
}

/// One forgery: what is sent, and what it must be answered.
enum Forgery {
    /// Sent as an HTTP client would; must be answered `status` with a JSON reason.
    Request {
        path: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
        status: u16,
    },
    /// A head declaring a body over the route's limit, no body: 413.
    DeclaredTooLarge { path: &'static str, length: usize },
    /// A signed-looking webhook sent chunked past the limit: 413.
    ChunkedTooLarge,
    /// A body shorter than declared, then the write side closed: closed, or a 4xx.
    CutOff,
}

const CALLBACKS: [&str; 4] = [
    "/api/runner/register",
    "/api/runner/complete",
    "/api/runner/interrupted",
    "/api/runner/error",
];

fn forgery(kit: &Kit, i: usize) -> Forgery {
    use Forgery::*;
    let webhook = |headers: Vec<(&'static str, String)>, body: Vec<u8>| Request {
        path: "/api/webhook",
        headers: [
            vec![
                ("x-github-event", "workflow_job".to_string()),
                ("x-github-delivery", format!("forged-{i}")),
            ],
            headers,
        ]
        .concat(),
        body,
        status: 401,
    };
    let bootstrap = |body: Vec<u8>, status: u16| Request {
        path: "/api/runner/bootstrap",
        headers: vec![],
        body,
        status,
    };
    let document = |v: &Value| serde_json::to_vec(v).unwrap();
    let callback = |authorization: Option<String>| Request {
        path: CALLBACKS[(i / 100) % CALLBACKS.len()],
        headers: authorization
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default(),
        body: br#"{"exitCode": 0, "kind": "spot-interruption", "log": "x"}"#.to_vec(),
        status: 401,
    };
    match i % 100 {
        0 => DeclaredTooLarge {
            path: "/api/webhook",
            length: pacer::http::WEBHOOK_BODY_LIMIT + 1,
        },
        1 => DeclaredTooLarge {
            path: "/api/runner/bootstrap",
            length: pacer::http::runner::CALLBACK_BODY_LIMIT + 1,
        },
        2 => ChunkedTooLarge,
        3 => CutOff,
        n => match n % 22 {
            0 => webhook(vec![], kit.webhook.clone()),
            1 => webhook(
                vec![(
                    "x-hub-signature-256",
                    pacer::github::webhook::sign(
                        b"not the webhook secret at all, no",
                        &kit.webhook,
                    ),
                )],
                kit.webhook.clone(),
            ),
            2 => webhook(
                vec![("x-hub-signature-256", kit.webhook_signature.clone())],
                kit.webhook[..kit.webhook.len() / 2].to_vec(),
            ),
            3 => webhook(
                vec![(
                    "x-hub-signature-256",
                    ["sha1=00", "sha256=zz", "", "sha256="][i % 4].to_string(),
                )],
                kit.webhook.clone(),
            ),
            4 => {
                let mut forged = webhook(
                    vec![("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))],
                    b"{\"zen\": \"forged\"}".to_vec(),
                );
                if let Request { headers, .. } = &mut forged {
                    headers[0].1 = "ping".into();
                }
                forged
            }
            5 => bootstrap(b"not json".to_vec(), 400),
            6 => bootstrap(Vec::new(), 400),
            7 => bootstrap(
                document(&json!({"document": "{}", "signature": "AAAA"})),
                401,
            ),
            8 => bootstrap(document(&kit.truncated_signature), 401),
            9 => bootstrap(document(&kit.untrusted), 401),
            10 => bootstrap(document(&kit.altered), 401),
            11 => bootstrap(document(&kit.other_account), 401),
            12 => bootstrap(document(&kit.other_region), 401),
            13 => bootstrap(document(&kit.stale), 401),
            14 => callback(None),
            15 => callback(Some("Basic cGFjZXI6cGFjZXI=".into())),
            16 => callback(Some("Bearer v1.garbage.garbage".into())),
            17 => callback(Some(format!("Bearer {}", kit.foreign_token))),
            18 => callback(Some(format!("Bearer {}", kit.expired_token))),
            19 => callback(Some(format!("Bearer {}", kit.altered_token))),
            20 => callback(Some("Bearer ".into())),
            _ => callback(Some(format!(
                "Bearer {}",
                &kit.altered_token[..kit.altered_token.len() / 2]
            ))),
        },
    }
}

/// What came back: the status and body, or `None` when the connection was closed unanswered.
type Answer = Option<(u16, String)>;

/// Reads a whole HTTP/1.1 answer from `reader` until the server closes.
async fn read_answer(mut reader: impl tokio::io::AsyncRead + Unpin) -> Answer {
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), reader.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
        }
        if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&read[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|l| l.trim().parse::<usize>().ok());
            if length.is_some_and(|length| read.len() >= end + 4 + length) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&read).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

async fn send(http: &reqwest::Client, kit: &Kit, forgery: Forgery) -> (String, Answer) {
    match forgery {
        Forgery::Request {
            path,
            headers,
            body,
            status: _,
        } => {
            let mut request = http.post(format!("{}{path}", kit.url)).body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (path.into(), Some((status, response.text().await.unwrap())))
        }
        Forgery::DeclaredTooLarge { path, length } => {
            let mut stream = tokio::net::TcpStream::connect(&kit.address).await.unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: pacer\r\nX-GitHub-Event: workflow_job\r\n\
                 X-Hub-Signature-256: sha256={}\r\nContent-Length: {length}\r\n\r\n",
                "0".repeat(64)
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            (
                format!("{path} (declared too large)"),
                read_answer(stream).await,
            )
        }
        Forgery::ChunkedTooLarge => {
            let stream = tokio::net::TcpStream::connect(&kit.address).await.unwrap();
            let (reader, mut writer) = stream.into_split();
            let head = format!(
                "POST /api/webhook HTTP/1.1\r\nHost: pacer\r\nX-GitHub-Event: workflow_job\r\n\
                 X-Hub-Signature-256: sha256={}\r\nTransfer-Encoding: chunked\r\n\r\n",
                "0".repeat(64)
            );
            let write = async move {
                writer.write_all(head.as_bytes()).await?;
                let chunk = format!("4000\r\n{}\r\n", " ".repeat(0x4000));
                let over = pacer::http::WEBHOOK_BODY_LIMIT / 0x4000 + 2;
                for _ in 0..over {
                    writer.write_all(chunk.as_bytes()).await?;
                }
                std::future::pending::<std::io::Result<()>>().await
            };
            let answer = tokio::select! {
                answer = read_answer(reader) => answer,
                _ = write => None,
            };
            ("/api/webhook (chunked too large)".into(), answer)
        }
        Forgery::CutOff => {
            let mut stream = tokio::net::TcpStream::connect(&kit.address).await.unwrap();
            let head = format!(
                "POST /api/webhook HTTP/1.1\r\nHost: pacer\r\nX-GitHub-Event: workflow_job\r\n\
                 X-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n",
                kit.webhook_signature,
                kit.webhook.len()
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream
                .write_all(&kit.webhook[..kit.webhook.len() / 3])
                .await
                .unwrap();
            stream.shutdown().await.unwrap();
            ("/api/webhook (cut off)".into(), read_answer(stream).await)
        }
    }
}

/// Checks one answer against what the forgery must get; a description of what is wrong.
fn judge(expected: Option<u16>, what: &str, answer: &Answer) -> Result<(), String> {
    let Some((status, body)) = answer else {
        return match expected {
            None => Ok(()),
            Some(status) => Err(format!("{what}: closed unanswered, expected {status}")),
        };
    };
    let reason = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .filter(|r| !r.is_empty());
    match (expected, reason) {
        (Some(want), Some(_)) if want == *status => Ok(()),
        (None, Some(_)) if (400..500).contains(status) => Ok(()),
        _ => Err(format!(
            "{what}: answered {status} {body:?}, expected {} with a JSON reason",
            expected.map_or("a 4xx".to_string(), |s| s.to_string())
        )),
    }
}

/// Sends forgeries `from..to` with [`CONCURRENCY`] connections; panics on a wrong answer.
/// Returns how many were answered by status (0: closed unanswered).
async fn flood(
    http: &reqwest::Client,
    kit: &Kit,
    from: usize,
    to: usize,
) -> std::collections::BTreeMap<u16, usize> {
    let answers: Vec<Result<u16, String>> = futures::stream::iter(from..to)
        .map(|i| async move {
            let forgery = forgery(kit, i);
            let expected = match &forgery {
                Forgery::Request { status, .. } => Some(*status),
                Forgery::DeclaredTooLarge { .. } | Forgery::ChunkedTooLarge => Some(413),
                Forgery::CutOff => None,
            };
            let (what, answer) = send(http, kit, forgery).await;
            judge(expected, &format!("forgery {i} to {what}"), &answer)
                .map(|()| answer.map_or(0, |(status, _)| status))
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut by_status = std::collections::BTreeMap::new();
    let mut wrong = Vec::new();
    for answer in answers {
        match answer {
            Ok(status) => *by_status.entry(status).or_insert(0) += 1,
            Err(why) => wrong.push(why),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} forgeries answered wrongly, first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    by_status
}

/// A ServiceAccount bound to cluster-admin (so that nothing it does is refused, and all of it
/// is audited) and a kubeconfig with its token.
fn audited_kubeconfig(ground: &support::Ground, ns: &str, dir: &std::path::Path) -> PathBuf {
    let account = "forgeries";
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": account, "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": format!("{ns}-{account}")},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "cluster-admin"},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}]},
    ]});
    let file = dir.join("account.json");
    std::fs::write(&file, objects.to_string()).unwrap();
    support::run(
        ground
            .kubectl_command()
            .args(["apply", "-f", file.to_str().unwrap()]),
    );
    let token = support::run(ground.kubectl_command().args([
        "create",
        "token",
        account,
        "-n",
        ns,
        "--duration",
        "2h",
    ]));
    let text = std::fs::read_to_string(ground.var("KUBECONFIG")).unwrap();
    let admin = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, text.replace(admin, token.trim())).unwrap();
    kubeconfig
}

/// The audited calls of `user` in the audit log's bytes `range`: (verb, resource).
fn audited(path: &str, range: std::ops::Range<usize>, user: &str) -> Vec<(String, String)> {
    let text = std::fs::read(path).unwrap();
    let range = range.start.min(text.len())..range.end.min(text.len());
    String::from_utf8_lossy(&text[range])
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == user && e["stage"] == "ResponseComplete")
        .map(|e| {
            (
                e["verb"].as_str().unwrap_or_default().to_string(),
                e["objectRef"]["resource"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

fn audit_length(path: &str) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_forgeries_write_nothing_call_no_one_and_leave_memory_at_idle() {
    let ground = ground(Parts::Both);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "forgeries").await;
    let id = "forgeries";
    let dir = support::scratch(&format!("forgeries-{ns}"));
    let kubeconfig = audited_kubeconfig(ground, &ns, &dir);
    let user = format!("system:serviceaccount:{ns}:forgeries");

    // Another replica leads for the whole test.
    let now = k8s_openapi::jiff::Timestamp::now();
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": format!("pacer-{id}"), "namespace": ns},
        "spec": {"holderIdentity": "another-replica", "leaseDurationSeconds": 3600,
                 "acquireTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
                 "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now)},
    }))
    .unwrap();
    Api::<Lease>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();
    // A pool a forged queued delivery would match, were it believed.
    let mut pool = ground.example_pool(&ns, "linux");
    pool["spec"]["github"] = json!({"scope": "org", "owner": "example-org"});
    pool["spec"]["labels"] = json!(["self-hosted", "linux"]);
    let pool: RunnerPool = serde_json::from_value(pool).unwrap();
    Api::<RunnerPool>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();

    let github = FakeGitHub::start().await;
    github.install(1, &["example-org/api"]);
    let proxy = ground.proxy();
    let aws_before = proxy.calls().await.len();
    let audit = ground.var("AUDIT_LOG").to_string();
    let audit_from = audit_length(&audit);
    let mut pacer = process::start_with_env(
        ground,
        &dir,
        process::Setup {
            name: "forgeries",
            controller_id: id,
            namespace: &ns,
            kubeconfig: Some(kubeconfig),
            github: Some((
                github.url.clone(),
                github.app_id,
                github.private_key_pem.clone(),
            )),
            public_url: None,
        },
        &[("PACER_AWS_ACCOUNT_ID", ACCOUNT)],
    );
    let pid = pacer.child.id();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("{}/readyz", pacer.url()))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "never ready:\n{}",
            pacer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // What a forger can hold: true bodies, other keys, genuine documents that must not pass.
    let signer = Signer::at(&dir);
    let stranger = Signer::new(&dir.join("stranger"));
    let aws_time = |t: k8s_openapi::jiff::Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let recent = aws_time(now - Duration::from_secs(60));
    let region = ground.var("AWS_REGION");
    let signed = |signer: &Signer, account: &str, region: &str, pending: &str| {
        let doc = identity::document(account, region, "i-0f0f0f0f0f0f0f0f0", "x86_64", pending);
        let signature = signer.sign(&doc);
        json!({"document": doc, "signature": signature})
    };
    let mut altered = signed(&signer, ACCOUNT, region, &recent);
    altered["document"] = json!(
        altered["document"]
            .as_str()
            .unwrap()
            .replace("i-0f0f0f0f0f0f0f0f0", "i-0e0e0e0e0e0e0e0e0")
    );
    let mut truncated_signature = signed(&signer, ACCOUNT, region, &recent);
    let cut = truncated_signature["signature"].as_str().unwrap().len() / 2;
    truncated_signature["signature"] =
        json!(truncated_signature["signature"].as_str().unwrap()[..cut].to_string());
    let claims = Claims {
        namespace: ns.clone(),
        name: "gh-job-1".into(),
        uid: "0b7e".into(),
        instance: "i-0f0f0f0f0f0f0f0f0".into(),
        expires: now.as_second() + 3600,
    };
    let ours = Tokens::new(Secret::new(
        b"0123456789abcdef0123456789abcdef-test-key".to_vec(),
    ))
    .unwrap();
    let theirs = Tokens::new(Secret::new(vec![9u8; 48])).unwrap();
    let token = |tokens: &Tokens, claims: &Claims| {
        String::from_utf8(tokens.mint(claims).expose().to_vec()).unwrap()
    };
    let mut altered_token = token(&ours, &claims).into_bytes();
    let last = altered_token.len() - 2;
    altered_token[last] = if altered_token[last] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let webhook = webhooks::queued(4242, &["self-hosted", "linux"]);
    let kit = Arc::new(Kit {
        url: pacer.url(),
        address: format!("127.0.0.1:{}", pacer.listen),
        webhook_signature: pacer::github::webhook::sign(WEBHOOK_SECRET, &webhook),
        webhook,
        untrusted: signed(&stranger, ACCOUNT, region, &recent),
        other_account: signed(&signer, "210987654321", region, &recent),
        other_region: signed(&signer, ACCOUNT, "ap-southeast-7", &recent),
        stale: signed(
            &signer,
            ACCOUNT,
            region,
            &aws_time(now - Duration::from_secs(3 * 3600)),
        ),
        altered,
        truncated_signature,
        foreign_token: token(&theirs, &claims),
        expired_token: token(
            &ours,
            &Claims {
                expires: now.as_second() - 3600,
                ..claims.clone()
            },
        ),
        altered_token: String::from_utf8(altered_token).unwrap(),
    });

    flood(&http, &kit, 0, WARM_UP).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_kib(pid);
    let flood_from = audit_length(&audit);
    let started = Instant::now();
    let by_status = flood(&http, &kit, WARM_UP, WARM_UP + FORGERIES).await;
    let took = started.elapsed();
    let after = rss_kib(pid);
    let flood_to = audit_length(&audit);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let settled = rss_kib(pid);
    println!(
        "{FORGERIES} forgeries in {took:.1?} ({:.0}/s) over {CONCURRENCY} connections, answered \
         {by_status:?} (0: closed unanswered); RSS {idle} KiB idle, {after} KiB after, \
         {settled} KiB 10 s later",
        FORGERIES as f64 / took.as_secs_f64()
    );
    assert!(
        pacer.child.try_wait().unwrap().is_none(),
        "pacer exited:\n{}",
        pacer.log_text()
    );

    // Nothing written, no one called.
    let calls = audited(&audit, audit_from..usize::MAX, &user);
    assert!(!calls.is_empty(), "nothing audited for {user}");
    let writes: Vec<_> = calls
        .iter()
        .filter(|(verb, resource)| {
            !matches!(verb.as_str(), "get" | "list" | "watch") && resource != "leases"
        })
        .collect();
    assert!(writes.is_empty(), "pacer wrote to the cluster: {writes:?}");
    let during = audited(&audit, flood_from..flood_to, &user);
    let during_reads: Vec<_> = during
        .iter()
        .filter(|(_, resource)| resource != "leases")
        .collect();
    println!(
        "audited calls by pacer: {} in its life, {} during the flood, of which not on its \
         Lease: {during_reads:?}",
        calls.len(),
        during.len(),
    );
    assert!(
        during_reads.len() <= 4,
        "the flood cost API calls: {during_reads:?}"
    );
    assert!(
        !pacer.log_text().contains("leading: controllers start"),
        "the process led: its calls are not its listener's alone"
    );
    let aws = proxy.calls().await;
    assert_eq!(
        aws.len(),
        aws_before,
        "AWS calls: {:?}",
        aws[aws_before..]
            .iter()
            .map(|c| &c.action)
            .collect::<Vec<_>>()
    );
    assert_eq!(github.requests(), 0, "GitHub was called");
    let jobs = Api::<RunnerJob>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(jobs.items.is_empty());

    // Memory back to idle.
    assert!(
        settled <= idle + RSS_MARGIN_KIB,
        "RSS {idle} KiB idle, {after} KiB after {FORGERIES} forgeries, {settled} KiB settled: \
         over idle by more than {RSS_MARGIN_KIB} KiB"
    );
}
