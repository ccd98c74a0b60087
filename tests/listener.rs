//! The main listener on a real socket under hostile clients: request heads sent a byte at a
//! time, idle and stalled connections, slow uploads, bodies sent without a valid token. Each
//! time, a signed webhook sent meanwhile answers promptly. No ground: nothing here reaches the
//! API server.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kube::runtime::reflector;
use pacer::cloud::fake::FakeEc2;
use pacer::config::Secret;
use pacer::controller::{Context, Settings};
use pacer::http::runner::RunnerSide;
use pacer::http::serve::{Limits, Transport, serve};
use pacer::http::{Web, router};
use pacer::runner::identity::TrustRoots;
use pacer::runner::release::Releases;
use pacer::runner::token::Tokens;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

const SECRET: &[u8] = b"webhook secret for listener tests";

/// An identity signer, made once for this test binary.
fn signer() -> &'static support::identity::Signer {
    static SIGNER: std::sync::OnceLock<support::identity::Signer> = std::sync::OnceLock::new();
    SIGNER.get_or_init(|| {
        let dir = support::scratch("listener");
        support::identity::Signer::new(&dir)
    })
}

/// The listener's state, with an API server that is never reached.
fn web() -> Arc<Web> {
    let config = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
    let client = pacer::controller::kube_client(config).unwrap();
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(FakeEc2::new()),
        Settings::new("listener", "https://pacer.example.test"),
    ));
    let (pools, _) = reflector::store();
    let runners = RunnerSide {
        trust: TrustRoots::from_pem(&std::fs::read(signer().certificate()).unwrap()).unwrap(),
        tokens: Tokens::new(Secret::new(vec![7; 64])).unwrap(),
        region: "us-east-1".into(),
        releases: Arc::new(
            Releases::new(
                "https://127.0.0.1:9/releases",
                &std::env::temp_dir().join(format!("pacer-listener-{}", std::process::id())),
            )
            .unwrap(),
        ),
    };
    Arc::new(Web::new(ctx, pools, vec![Secret::new(SECRET.to_vec())], None).with_runners(runners))
}

/// Serves [`web`] on a loopback port within `limits`.
async fn listen(limits: Limits) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = router(web());
    tokio::spawn(serve(
        listener,
        Transport::Plain,
        app,
        limits,
        std::future::pending(),
    ));
    address
}

/// Posts GitHub's `waiting` example, signed: its status and how long it took.
async fn signed_webhook(address: SocketAddr) -> (u16, Duration) {
    let event = support::webhooks::examples()
        .into_iter()
        .find(|e| e["action"] == "waiting")
        .unwrap();
    let body = serde_json::to_vec(&event).unwrap();
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("http://{address}/api/webhook"))
        .header("content-type", "application/json")
        .header("x-github-event", "workflow_job")
        .header("x-github-delivery", "listener-1")
        .header(
            "x-hub-signature-256",
            pacer::github::webhook::sign(SECRET, &body),
        )
        .body(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), started.elapsed())
}

/// Open file descriptors of this process (client and server sides alike, every test's).
fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Reads until the server closes the connection or `until`; what was read, and whether it
/// closed.
async fn read_until_closed(stream: &mut TcpStream, until: Instant) -> (String, bool) {
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&read).into_owned(), false),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&read).into_owned(), true),
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends a request head one byte every `every`, never finishing it; how long after it connected
/// the server closed the connection, or `None` if it still held it at `give_up`.
async fn trickle_head(address: SocketAddr, every: Duration, give_up: Duration) -> Option<Duration> {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let started = Instant::now();
    let head = format!(
        "POST /api/webhook HTTP/1.1\r\nHost: pacer\r\nX-Padding: {}",
        "a".repeat(4096)
    );
    for byte in head.bytes() {
        if stream.write_all(&[byte]).await.is_err() {
            return Some(started.elapsed());
        }
        let (_, closed) = read_until_closed(&mut stream, Instant::now() + every).await;
        if closed {
            return Some(started.elapsed());
        }
        if started.elapsed() > give_up {
            return None;
        }
    }
    None
}

/// Starts a `POST path` of `length` bytes with `headers`, sends its first KiB, then a KiB every
/// `every`; the server's answer and how long after connecting it came, if it came before
/// `give_up`. Counts itself in `sending` once its head and first KiB are sent.
async fn slow_upload(
    address: SocketAddr,
    sending: Arc<AtomicUsize>,
    path: &str,
    headers: &str,
    length: usize,
    every: Duration,
    give_up: Duration,
) -> Option<(String, Duration)> {
    let stream = TcpStream::connect(address).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: pacer\r\n{headers}Content-Length: {length}\r\n\r\n");
    let trickle = async move {
        if writer.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let mut sent = 0;
        while sent < length {
            let chunk = (length - sent).min(1024);
            if writer.write_all(&vec![b' '; chunk]).await.is_err() {
                return;
            }
            if sent == 0 {
                sending.fetch_add(1, Ordering::SeqCst);
            }
            sent += chunk;
            tokio::time::sleep(every).await;
        }
        std::future::pending::<()>().await
    };
    let answer = async move {
        let mut buf = [0u8; 4096];
        let n = reader.read(&mut buf).await.ok().filter(|n| *n > 0)?;
        let took = started.elapsed();
        let mut read = buf[..n].to_vec();
        // The rest of a small answer follows at once.
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), reader.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            read.extend_from_slice(&buf[..n]);
        }
        Some((String::from_utf8_lossy(&read).into_owned(), took))
    };
    tokio::select! {
        answer = answer => answer,
        () = trickle => None,
        () = tokio::time::sleep(give_up) => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_uploads_fill_one_bound_and_past_it_are_refused_while_a_signed_webhook_answers() {
    use pacer::http::{BUSY_RETRY_AFTER, CONCURRENCY};
    const UNDER: usize = 100;
    let address = listen(Limits::MAIN).await;
    let forged = format!(
        "X-GitHub-Event: workflow_job\r\nX-Hub-Signature-256: sha256={}\r\n",
        "0".repeat(64)
    );
    let sending = Arc::new(AtomicUsize::new(0));
    let all_sending = |count: usize| {
        let sending = sending.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(10);
            while sending.load(Ordering::SeqCst) < count {
                assert!(Instant::now() < until, "uploads did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Their heads reach the handlers.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let upload = |count: usize| {
        (0..count)
            .map(|_| {
                let (headers, sending) = (forged.clone(), sending.clone());
                tokio::spawn(async move {
                    // Held until every upload has started, on a loaded machine too, and
                    // inside the listener's 10 s request timeout.
                    let (every, give_up) = (Duration::from_millis(500), Duration::from_secs(8));
                    slow_upload(
                        address,
                        sending,
                        "/api/webhook",
                        &headers,
                        200 * 1024,
                        every,
                        give_up,
                    )
                    .await
                })
            })
            .collect::<Vec<_>>()
    };
    // Under the bound: the webhook is served.
    let under = upload(UNDER);
    all_sending(UNDER).await;
    let (status, took) = signed_webhook(address).await;
    println!(
        "{} slow uploads: a signed webhook answered {status} in {took:?}",
        under.len()
    );
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Past it (and past 256, a bound per route): the rest are refused at once, the webhook too,
    // once the uploads' heads have reached the handlers (which a loaded machine may take a
    // while to do): every answer comes at once, and a 503 within seconds.
    let over = upload(200);
    all_sending(UNDER + 200).await;
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, took) = signed_webhook(address).await;
        println!(
            "{} slow uploads: a signed webhook answered {status} in {took:?}",
            under.len() + over.len()
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the listener kept answering {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut refused = Vec::new();
    for task in under.into_iter().chain(over) {
        if let Some((answer, took)) = task.await.unwrap() {
            refused.push(took);
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            let lower = answer.to_ascii_lowercase();
            assert!(
                lower.contains(&format!("retry-after: {BUSY_RETRY_AFTER}\r\n")),
                "{answer}"
            );
            assert!(lower.contains("content-type: application/json"), "{answer}");
            assert!(answer.contains("{\"error\":"), "{answer}");
        }
    }
    let slowest = refused.iter().max().unwrap();
    println!(
        "{} refused 503, the slowest after {slowest:?}",
        refused.len()
    );
    assert_eq!(refused.len(), UNDER + 200 - CONCURRENCY);
    assert!(*slowest < Duration::from_secs(1), "{slowest:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_heads_sent_a_byte_at_a_time_are_cut_at_the_header_timeout() {
    let header_read_timeout = Duration::from_secs(1);
    let address = listen(Limits {
        header_read_timeout,
        ..Limits::MAIN
    })
    .await;
    let idle_files = open_files();
    let slow: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(trickle_head(
                address,
                Duration::from_millis(100),
                Duration::from_secs(6),
            ))
        })
        .collect();
    // A kept-alive connection that asked once and then says nothing.
    let kept = tokio::spawn(async move {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: pacer\r\n\r\n")
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_secs(6);
        let mut answered = String::new();
        let mut buf = [0u8; 1024];
        while !answered.ends_with("ok") {
            let n = tokio::time::timeout_at(until, stream.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed before answering");
            answered.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let answered_at = Instant::now();
        let (_, closed) = read_until_closed(&mut stream, until).await;
        closed.then(|| answered_at.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy_files = open_files();
    let (status, took) = signed_webhook(address).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "the webhook took {took:?}");

    let mut closed_after = Vec::new();
    for task in slow {
        closed_after.push(task.await.unwrap().expect("the server held a slow head"));
    }
    let slowest = closed_after.iter().max().unwrap();
    let idle = kept
        .await
        .unwrap()
        .expect("the server held an idle connection");
    println!(
        "200 slow heads closed after {:?} to {slowest:?}; an idle keep-alive after {idle:?}; \
         the webhook took {took:?}; open files {idle_files} idle, {busy_files} busy, {} after",
        closed_after.iter().min().unwrap(),
        open_files()
    );
    let bound = header_read_timeout + Duration::from_secs(1);
    assert!(*slowest < bound, "a slow head lived {slowest:?}");
    assert!(idle < bound, "an idle connection lived {idle:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_stops_sending_its_body_is_closed_at_the_idle_timeout() {
    let idle_timeout = Duration::from_secs(2);
    let address = listen(Limits {
        idle_timeout,
        ..Limits::MAIN
    })
    .await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    let signature = format!("sha256={}", "0".repeat(64));
    let head = format!(
        "POST /api/webhook HTTP/1.1\r\nHost: pacer\r\nX-GitHub-Event: workflow_job\r\n\
         X-Hub-Signature-256: {signature}\r\nContent-Length: 10000\r\n\r\n{}",
        "{".repeat(100)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut stream, started + Duration::from_secs(8)).await;
    let lived = started.elapsed();
    println!("a stalled body's connection closed after {lived:?}: {answer:?}");
    assert!(closed, "still open after {lived:?}: {answer:?}");
    assert!(lived < idle_timeout + Duration::from_secs(1), "{lived:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_tls_clients_are_closed_at_the_handshake_timeout() {
    use pacer::http::tls;
    let handshake_timeout = Duration::from_secs(1);
    let (certificate, _) = tls::self_signed(&["localhost".into()]).unwrap();
    let acceptor = tls::acceptor(tls::Certificates::new(certificate)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let limits = Limits {
        handshake_timeout,
        ..Limits::MAIN
    };
    tokio::spawn(serve(
        listener,
        Transport::Tls(acceptor),
        router(web()),
        limits,
        std::future::pending(),
    ));
    let silent: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(address).await.unwrap();
                let started = Instant::now();
                let until = started + Duration::from_secs(5);
                let (_, closed) = read_until_closed(&mut stream, until).await;
                closed.then(|| started.elapsed())
            })
        })
        .collect();
    let mut lived = Vec::new();
    for task in silent {
        lived.push(task.await.unwrap().expect("a silent client held on"));
    }
    let longest = lived.iter().max().unwrap();
    println!("100 silent TLS clients closed after at most {longest:?}");
    assert!(*longest < handshake_timeout + Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_connection_cap_a_client_waits_for_a_slot() {
    let header_read_timeout = Duration::from_secs(2);
    let address = listen(Limits {
        max_connections: 20,
        header_read_timeout,
        ..Limits::MAIN
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let health = reqwest::Client::new()
        .get(format!("http://{address}/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    println!("with 20 of 20 connections held, /healthz answered after {waited:?}");
    assert_eq!(health.status(), 200);
    assert!(
        waited > header_read_timeout / 2,
        "served past the cap: {waited:?}"
    );
    assert!(
        waited < header_read_timeout + Duration::from_secs(1),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn callbacks_without_a_valid_token_are_refused_before_their_body_is_read() {
    let address = listen(Limits::MAIN).await;
    let sending = Arc::new(AtomicUsize::new(0));
    let forged = "Authorization: Bearer v1.eyJuIjoieCJ9.forged\r\n";
    let cases = [
        ("/api/runner/register", ""),
        ("/api/runner/register", forged),
        ("/api/runner/complete", ""),
        ("/api/runner/complete", forged),
        ("/api/runner/error", ""),
        ("/api/runner/error", forged),
        // A webhook delivery with no signature at all.
        ("/api/webhook", "X-GitHub-Event: workflow_job\r\n"),
    ];
    for (path, headers) in cases {
        // 60 KiB, under every route's limit, of which 1 KiB is sent before the answer.
        let (every, give_up) = (Duration::from_millis(500), Duration::from_secs(3));
        let sent = sending.clone();
        let answer = slow_upload(address, sent, path, headers, 60 * 1024, every, give_up).await;
        let (answer, took) = answer.unwrap_or_else(|| panic!("{path} {headers:?}: no answer"));
        println!("{path} {headers:?}: {took:?}");
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        assert!(answer.contains("{\"error\":"), "{path}: {answer}");
        assert!(took < Duration::from_secs(1), "{path}: {took:?}");
    }
}
