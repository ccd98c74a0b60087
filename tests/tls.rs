//! `server.tls.mode` on loopback, each with a real TLS client that trusts the right root:
//! `self` (the generated certificate), `manual` (files, reloaded when rewritten) and `acme`
//! (Pebble, Let's Encrypt's ACME test server, built by `hack/build-pebble.sh`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use pacer::config::{AcmeConfig, ServerConfig, TlsConfig, TlsMode};
use pacer::http::serve::Limits;
use support::process::free_port;

fn scratch(test: &str) -> PathBuf {
    support::scratch(&format!("tls-{test}"))
}

/// Serves a one-route app as `pacer run` serves its listener; returns the port.
fn serve(tls: TlsConfig) -> u16 {
    serve_in(tls, None)
}

fn serve_in(tls: TlsConfig, cluster: Option<pacer::http::Cluster>) -> u16 {
    let port = free_port();
    let server = ServerConfig {
        public_url: format!("https://localhost:{port}"),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        tls,
    };
    let app = Router::new().route("/healthz", get(|| async { "ok" }));
    tokio::spawn(async move {
        pacer::http::serve_main(&server, app, cluster, Limits::MAIN, std::future::pending())
            .await
            .unwrap();
    });
    port
}

/// Returns once the listener on PORT accepts connections: it binds in its spawned task, and a
/// client that came first would be refused on a busy machine.
async fn listening(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener on {port} did not accept within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET https://localhost:PORT/healthz trusting only `root` (PEM).
async fn get_trusting(root: &[u8], port: u16) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(root).unwrap()])
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let response = client
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    response.text().await.map_err(|e| e.to_string())
}

async fn eventually_trusting(root: &[u8], port: u16, seconds: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        match get_trusting(root, port).await {
            Ok(body) => return assert_eq!(body, "ok"),
            Err(e) if tokio::time::Instant::now() > deadline => panic!("no handshake: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A CA and a `localhost` leaf it signed: (CA PEM, leaf PEM, leaf key PEM).
fn ca_and_leaf(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// The certificate the server at PORT presents, as openssl's client sees it.
fn presented_certificate(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    format!("{}\n", &text[start..end])
}

#[tokio::test(flavor = "multi_thread")]
async fn self_mode_serves_a_generated_certificate_for_its_hosts() {
    let port = serve(TlsConfig {
        mode: TlsMode::SelfSigned,
        hosts: vec!["localhost".into()],
        ..Default::default()
    });
    listening(port).await;
    let (other_ca, _, _) = ca_and_leaf("not this server's");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let presented = tokio::task::spawn_blocking(move || presented_certificate(port))
        .await
        .unwrap();
    eventually_trusting(presented.as_bytes(), port, 10).await;
    let refused = get_trusting(other_ca.as_bytes(), port).await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_mode_serves_its_files_and_follows_them_when_rewritten() {
    let dir = scratch("manual");
    let (ca, leaf, key) = ca_and_leaf("first CA");
    std::fs::write(dir.join("tls.crt"), &leaf).unwrap();
    std::fs::write(dir.join("tls.key"), &key).unwrap();
    let port = serve(TlsConfig {
        mode: TlsMode::Manual,
        cert_file: Some(dir.join("tls.crt")),
        key_file: Some(dir.join("tls.key")),
        ..Default::default()
    });
    eventually_trusting(ca.as_bytes(), port, 10).await;

    // A rotation, as a Secret update rewrites the mounted files.
    let (new_ca, new_leaf, new_key) = ca_and_leaf("second CA");
    std::fs::write(dir.join("tls.key"), &new_key).unwrap();
    std::fs::write(dir.join("tls.crt"), &new_leaf).unwrap();
    eventually_trusting(new_ca.as_bytes(), port, 30).await;
    assert!(get_trusting(ca.as_bytes(), port).await.is_err());
}

struct Pebble {
    child: Child,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pebble_dir() -> PathBuf {
    let out = Command::new("bash")
        .arg(support::repo_root().join("hack/build-pebble.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn start_pebble(tools: &Path, dir: &Path, api: u16, management: u16, http: u16) -> Pebble {
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": tools.join("api-cert.pem"),
            "privateKey": tools.join("api-key.pem"),
            "httpPort": http,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }
    });
    std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
    let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
    let child = Command::new(tools.join("pebble"))
        .arg("-config")
        .arg(dir.join("pebble.json"))
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .env("PEBBLE_AUTHZREUSE", "0")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Pebble { child }
}

/// Pebble's issuing root, from its management API, once it is up.
async fn pebble_root(tools: &Path, management: u16) -> Vec<u8> {
    let pebble_api_ca = std::fs::read(tools.join("api-ca.pem")).unwrap();
    let management_client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pebble_api_ca).unwrap()])
        .build()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match management_client
            .get(format!("https://localhost:{management}/roots/0"))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return r.bytes().await.unwrap().to_vec(),
            _ if tokio::time::Instant::now() > deadline => panic!("pebble did not start"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn acme_config(
    api: u16,
    http_listen: u16,
    tools: &Path,
    cache: PathBuf,
    secret: Option<&str>,
) -> TlsConfig {
    TlsConfig {
        mode: TlsMode::Acme,
        acme: Some(AcmeConfig {
            domains: vec!["localhost".into()],
            email: "ops@example.com".into(),
            directory_url: format!("https://localhost:{api}/dir"),
            cache_dir: cache,
            http_listen: format!("127.0.0.1:{http_listen}").parse().unwrap(),
            directory_ca_file: Some(tools.join("api-ca.pem")),
            secret: secret.map(String::from),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acme_mode_gets_its_certificate_from_pebble_over_http_01() {
    let tools = tokio::task::spawn_blocking(pebble_dir).await.unwrap();
    let dir = scratch("acme");
    let (api, management, http) = (free_port(), free_port(), free_port());
    let _pebble = start_pebble(&tools, &dir, api, management, http);
    let root = pebble_root(&tools, management).await;
    let port = serve(acme_config(api, http, &tools, dir.join("acme"), None));
    eventually_trusting(&root, port, 60).await;
    // The certificate, its key and the account are cached for the next start.
    for file in ["account.json", "tls.crt", "tls.key"] {
        assert!(dir.join("acme").join(file).exists(), "{file}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acme_replicas_share_one_secret_and_answer_each_others_challenges() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    use pacer::http::acme::{Challenges, Store, challenge_router};
    use std::sync::Arc;

    let tools = tokio::task::spawn_blocking(pebble_dir).await.unwrap();
    let dir = scratch("acme-shared");
    let ground = support::ground(support::Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "acme-shared").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let empty: Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "acme-state"}})).unwrap();
    secrets
        .create(&PostParams::default(), &empty)
        .await
        .unwrap();
    let (api, management, http) = (free_port(), free_port(), free_port());
    let _pebble = start_pebble(&tools, &dir, api, management, http);
    let root = pebble_root(&tools, management).await;
    let cluster = |identity: &str| pacer::http::Cluster {
        client: client.clone(),
        namespace: ns.clone(),
        identity: identity.into(),
    };

    // Where Pebble validates is another replica's challenge listener: it knows the answers
    // only through the Secret.
    let other = Arc::new(Store::Secret {
        api: secrets.clone(),
        name: "acme-state".into(),
        identity: "replica-b".into(),
    });
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{http}"))
        .await
        .unwrap();
    tokio::spawn(async move {
        axum::serve(listener, challenge_router(Challenges::default(), other)).await
    });
    // Replica A orders; its own challenge listener is where Pebble never looks.
    let a = serve_in(
        acme_config(api, free_port(), &tools, dir.join("a"), Some("acme-state")),
        Some(cluster("replica-a")),
    );
    eventually_trusting(&root, a, 60).await;

    // Replica B starts later and serves the same certificate, from the Secret.
    let b = serve_in(
        acme_config(api, free_port(), &tools, dir.join("b"), Some("acme-state")),
        Some(cluster("replica-b")),
    );
    eventually_trusting(&root, b, 20).await;
    let (a_cert, b_cert) =
        tokio::task::spawn_blocking(move || (presented_certificate(a), presented_certificate(b)))
            .await
            .unwrap();
    assert_eq!(a_cert, b_cert);
    let kept = secrets.get("acme-state").await.unwrap();
    let data = kept.data.unwrap();
    for key in ["account.json", "tls.crt", "tls.key"] {
        assert!(data.contains_key(key), "{key}");
    }
    assert_eq!(data["challenges.json"].0, b"{}", "answers withdrawn");
    let annotations = kept.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key("pacer.dev/acme-order"),
        "claim released"
    );
}
