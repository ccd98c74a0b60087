//! Wires configuration, clients and commands together; the one place that knows every part.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use tracing::{info, warn};

use crate::api::{self, RunnerJob, RunnerPool};
use crate::cloud::aws::{AwsEc2, AwsSettings};
use crate::cloud::{self, Ec2};
use crate::config::Config;
use crate::controller;
use crate::{Error, Result};

/// Logs to stderr: JSON lines when stderr is not a terminal (a pod's log), readable lines on
/// one; `PACER_LOG_FORMAT=json|text` decides otherwise. Text is coloured only on a terminal. `PACER_LOG`, else `RUST_LOG`, else the
/// config's `log_level` filters (default `info`).
pub fn init_tracing(config_level: Option<&str>) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PACER_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(config_level.unwrap_or("info"))
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        });
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    let json = match std::env::var("PACER_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !terminal,
    };
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `pacer run`: load the configuration, reach the cluster, check the CRDs, serve until told
/// to stop.
pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path, std::env::vars())?;
    let secrets = config.read_secrets()?;
    info!(
        config = %config_path.display(),
        region = %config.aws.region,
        controller_id = %config.controller.id,
        namespace = %if config.controller.namespace.is_empty() { "<all>" } else { &config.controller.namespace },
        "configuration loaded"
    );
    for key in config.insecure_http_keys() {
        warn!(
            key,
            "allow_insecure_http is set and {key} is plain http://: tokens and signatures cross \
             the network in the clear; use it only on a loopback test bed"
        );
    }
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| Error::Kube(kube::Error::InferConfig(e)))?;
    let lease_client =
        controller::leader::lease_client(kube_config.clone()).map_err(Error::Kube)?;
    let client = controller::kube_client(kube_config).map_err(Error::Kube)?;
    let batches = check_crds(&client).await?;
    if !batches {
        warn!(
            "the installed RunnerJob CRD predates batched launches: each job is launched by its own call until `pacer crds` is applied"
        );
    }

    let aws = cloud::aws::sdk_config(&AwsSettings {
        region: config.aws.region.clone(),
        profile: config.aws.profile.clone(),
        endpoint_url: config.aws.endpoint_url.clone(),
    })
    .await;
    // The adapter counts its calls into the metrics the controllers export.
    let metrics = Arc::new(controller::metrics::Metrics::default());
    let ec2: Arc<dyn Ec2> = Arc::new(AwsEc2::new(&aws).observed_by(metrics.clone()));
    // The replicas' own namespace: their Lease's.
    let home = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| {
        Some(config.controller.namespace.clone())
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".into())
    });
    let settings = controller::Settings {
        job_concurrency: config.controller.job_concurrency,
        launch_batch_window: std::time::Duration::from_millis(
            config.controller.launch_batch_window_ms * u64::from(batches),
        ),
        launch_batch_max: config.controller.launch_batch_max,
        gc_interval: std::time::Duration::from_secs(config.controller.gc_interval_seconds),
        gc_grace: std::time::Duration::from_secs(config.controller.gc_grace_seconds),
        runner_ca: match &config.runners.ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?),
            None => None,
        },
        tenancy: crate::domain::tenancy::Tenancy::new(config.tenants.clone()),
        ..controller::Settings::new(&config.controller.id, &config.server.public_url)
    };
    let ctx = controller::Context::new(client.clone(), ec2.clone(), settings.clone())
        .with_metrics(metrics);
    let calls = ctx.metrics.github_calls.clone();
    let count: crate::github::client::CallCounter = Arc::new(move |action, outcome| {
        calls
            .get_or_create(&controller::metrics::Call {
                action: action.into(),
                outcome: outcome.into(),
            })
            .inc();
    });
    let github: Arc<dyn crate::github::GitHub> = Arc::new(
        crate::github::client::GitHubApp::new(
            &config.github.api_url,
            config.github.app_id,
            secrets.github_private_key.expose(),
            count,
        )
        .map_err(|message| {
            Error::Config(crate::config::ConfigError::Invalid {
                path: config.github.private_key_file.clone(),
                key: "github.private_key_file".into(),
                message,
            })
        })?,
    );
    let ctx = Arc::new(ctx.with_github(github.clone()));
    let (pools, jobs): (Api<RunnerPool>, Api<RunnerJob>) = if config.controller.namespace.is_empty()
    {
        (Api::all(client.clone()), Api::all(client.clone()))
    } else {
        (
            Api::namespaced(client.clone(), &config.controller.namespace),
            Api::namespaced(client.clone(), &config.controller.namespace),
        )
    };
    let listener = tokio::net::TcpListener::bind(config.server.metrics_listen)
        .await
        .map_err(|source| Error::Io {
            path: PathBuf::from(config.server.metrics_listen.to_string()),
            source,
        })?;
    info!(address = %config.server.metrics_listen, "serving metrics at /metrics");
    let metrics = crate::http::serve::serve(
        listener,
        crate::http::serve::Transport::Plain,
        crate::http::metrics_router(ctx.clone()),
        crate::http::serve::Limits::SIDE,
        std::future::pending(),
    );

    let namespace = Some(config.controller.namespace.clone()).filter(|ns| !ns.is_empty());
    let (pool_cache, pool_writer) = kube::runtime::reflector::store();
    let web = Arc::new(
        crate::http::Web::new(
            ctx.clone(),
            pool_cache.clone(),
            secrets.webhook_secrets(),
            namespace.clone(),
        )
        .with_runners(runner_side(&config, &secrets)?)
        .with_aws_account(config.aws.account_id.as_deref()),
    );
    let pool_watch = {
        use futures::StreamExt as _;
        use kube::runtime::{WatchStreamExt as _, watcher};
        watcher(pools.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(pool_writer)
            .for_each(|event| {
                if let Err(e) = event {
                    warn!(error = %e, "watching RunnerPools for webhooks failed; retrying");
                }
                std::future::ready(())
            })
    };
    let ready = {
        let web = web.clone();
        async move {
            if pool_cache.wait_until_ready().await.is_ok() {
                web.ready.store(true, std::sync::atomic::Ordering::SeqCst);
                info!("RunnerPool cache synced; ready for webhooks");
            }
            std::future::pending::<()>().await
        }
    };
    let election = controller::leader::Election::new(
        &home,
        &config.controller.id,
        &std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("{}-{}", hostname(), std::process::id())),
    );
    // SIGTERM or Ctrl-C: readiness fails at once, and the listener stops taking connections
    // `DRAIN` later, once the Service's endpoints have dropped this pod, so no webhook arrives
    // at a closed port during a rollout; it finishes its requests. The leader's controllers
    // finish what they started (they watch for the signal themselves), then it releases the
    // Lease.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let shutting_down = web.clone();
    let draining = web.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        draining
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        info!(
            seconds = DRAIN.as_secs(),
            "shutting down: not ready, draining the listener"
        );
        tokio::time::sleep(DRAIN).await;
        let _ = stop.send(true);
    });
    let main = {
        let mut stopping = stopping.clone();
        let cluster = crate::http::Cluster {
            client: client.clone(),
            namespace: election.namespace.clone(),
            identity: election.identity.clone(),
        };
        crate::http::serve_main(
            &config.server,
            crate::http::router(web),
            Some(cluster),
            crate::http::serve::Limits::MAIN,
            async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            },
        )
    };
    info!("controllers starting");
    // The controllers stop on SIGTERM/Ctrl-C themselves; the collector stops with them.
    // Only the leader reconciles, collects and sweeps; each term starts from a fresh context
    // (caches, reservations, ledger) sharing the metrics and the GitHub client.
    let term = || {
        let ctx = Arc::new(ctx.next_term());
        let scope = controller::gc::Scope {
            pools: pools.clone(),
            jobs: jobs.clone(),
            namespace: namespace.clone(),
        };
        let sweep = controller::sweep::run(
            ctx.clone(),
            github.clone(),
            controller::sweep::Scope::new(pools.clone(), jobs.clone()),
            std::time::Duration::from_secs(5 * 60),
        );
        let controllers = controller::run(ctx.clone(), pools.clone(), jobs.clone());
        let gauges = {
            let ctx = ctx.clone();
            async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                    controller::job::count_jobs(&ctx);
                }
            }
        };
        // The collector and the sweep list the RunnerJobs themselves: they start once the
        // controllers' cache is in, so that a start with thousands of jobs lists them one
        // list at a time (ready sooner, and a lower peak of memory).
        let synced = ctx.clone();
        let collector = ctx.clone();
        let others = async move {
            synced.jobs.synced().await;
            tokio::join!(controller::gc::run(collector, scope), sweep);
        };
        async move {
            tokio::select! {
                _ = controllers => {}
                () = others => {}
                () = gauges => {}
            }
        }
    };
    let leading = controller::leader::lead(lease_client, &election, term, stopping);
    tokio::pin!(leading);
    tokio::pin!(main);
    tokio::select! {
        result = &mut leading => {
            if let Err(e) = result {
                tracing::error!(error = %e, "leader election failed");
            } else if shutting_down.draining.load(std::sync::atomic::Ordering::SeqCst) {
                // The leader's controllers are done and the Lease is handed over; the listener
                // still drains before the process goes.
                let grace = DRAIN + std::time::Duration::from_secs(5);
                if let Ok(Err(e)) = tokio::time::timeout(grace, &mut main).await {
                    tracing::error!(error = %e, "the listener stopped");
                }
            }
        }
        () = pool_watch => {}
        () = ready => {}
        result = &mut main => {
            if let Err(e) = result {
                tracing::error!(error = %e, "the listener stopped");
            }
            // Shutting down: the leader drains and hands the Lease over.
            let grace = controller::leader::DRAIN + std::time::Duration::from_secs(5);
            match tokio::time::timeout(grace, &mut leading).await {
                Ok(Err(e)) => tracing::error!(error = %e, "leader election failed"),
                Ok(Ok(())) => {}
                Err(_) => tracing::warn!("the controllers did not stop in time"),
            }
        }
        () = metrics => {
            tracing::error!("the metrics listener stopped");
        }
    }
    info!("shut down");
    Ok(())
}

/// The runner endpoints' trust roots (the configured certificates, else AWS's bundled one for
/// the region) and callback key.
fn runner_side(
    config: &Config,
    secrets: &crate::config::Secrets,
) -> Result<crate::http::runner::RunnerSide> {
    let invalid = |path: &Path, key: &str, message: String| {
        Error::Config(crate::config::ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        })
    };
    let trust = config.identity_trust_roots()?;
    let tokens = crate::runner::token::Tokens::new(secrets.callback_key.clone()).map_err(|m| {
        invalid(
            &config.runners.callback_key_file,
            "runners.callback_key_file",
            m,
        )
    })?;
    match &config.runners.identity_certificates_file {
        Some(path) => info!(
            certificates = trust.len(),
            file = %path.display(),
            aws_regions = ?trust.aws_regions(),
            "instance identity trust roots loaded"
        ),
        None => info!(
            region = %config.aws.region,
            "instance identity trust root: AWS's certificate for the region, bundled"
        ),
    }
    let (source, dir) = (
        config.runners.release_source(),
        config.runners.release_cache_dir(),
    );
    let releases = crate::runner::release::Releases::new(source, &dir).map_err(|e| {
        invalid(
            &dir,
            "runners.release_cache_dir",
            format!("cannot keep actions/runner releases there: {e}"),
        )
    })?;
    info!(source, dir = %dir.display(), "actions/runner releases are served from Pacer");
    Ok(crate::http::runner::RunnerSide {
        trust,
        tokens,
        region: config.aws.region.clone(),
        releases: Arc::new(releases),
    })
}

/// This machine's name, for the lease holder's identity outside a pod.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "pacer".into())
}

/// How long the listener keeps serving after SIGTERM with readiness failing: longer than the
/// readiness probe's period (5 s) plus the endpoint controller's propagation, and within the
/// chart's termination grace period (30 s).
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Resolves on SIGTERM or Ctrl-C, the signals the controllers stop on too.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// Fails with instructions when a CRD is missing; warns when the installed one differs from
/// the one this binary was built with. Says whether the installed RunnerJob CRD knows batched
/// launches: an older one would drop a batch's record from the status (the API server prunes
/// fields its schema lacks) and cannot select a RunnerJob by its instance.
pub async fn check_crds(client: &kube::Client) -> Result<bool> {
    let mut batches = true;
    let installed: Api<CustomResourceDefinition> = Api::all(client.clone());
    for wanted in api::crds() {
        let name = wanted.metadata.name.clone().unwrap_or_default();
        let Some(found) = installed.get_opt(&name).await.map_err(Error::Kube)? else {
            return Err(Error::CrdNotInstalled(format!(
                "CRD {name} is not installed. Install the CRDs with `pacer crds | kubectl apply --server-side -f -` \
                 (or `kubectl apply --server-side -f crds/` from the source tree, or the Helm chart), then start pacer again"
            )));
        };
        let established = found
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if !established {
            return Err(Error::CrdNotInstalled(format!(
                "CRD {name} exists but is not Established yet; check `kubectl describe crd {name}`"
            )));
        }
        if found.spec.versions != wanted.spec.versions {
            warn!(crd = %name, "installed CRD differs from this pacer's; apply `pacer crds` to update it");
        }
        if found.spec.names.kind == "RunnerJob" {
            let selectable = |path: &str| {
                (found.spec.versions.iter())
                    .flat_map(|v| v.selectable_fields.iter().flatten())
                    .any(|f| f.json_path == path)
            };
            batches = selectable(".status.instance.id") && selectable(".status.launch.clientToken");
        }
    }
    Ok(batches)
}

/// `pacer crds`: both CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> String {
    api::crds()
        .iter()
        .map(|crd| format!("---\n{}", api::crd_yaml(crd)))
        .collect()
}

/// `pacer crds --dir DIR`: one file per CRD, named after it, as committed under `crds/`.
pub fn write_crds(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.into(),
        source,
    })?;
    for crd in api::crds() {
        let path = dir.join(api::crd_file_name(&crd));
        std::fs::write(&path, api::crd_yaml(&crd)).map_err(|source| Error::Io { path, source })?;
    }
    Ok(())
}

/// `pacer validate`: prints every problem in every RunnerPool of `files` (other kinds, as in a
/// GitOps folder, are skipped); returns how many.
pub fn validate_files(files: &[PathBuf]) -> Result<usize> {
    let mut total = 0;
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let documents: Vec<serde_json::Value> = match serde_saphyr::from_multiple(&text) {
            Ok(docs) => docs,
            Err(err) => {
                println!("{}: not valid YAML: {err}", path.display());
                total += 1;
                continue;
            }
        };
        for (index, doc) in documents.iter().enumerate().filter(|(_, d)| !d.is_null()) {
            let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
            let group = doc
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            if !kind.is_empty() && (kind != "RunnerPool" || !group.starts_with("pacer.dev/")) {
                println!(
                    "{} (document {}, {kind}): skipped, not a RunnerPool",
                    path.display(),
                    index + 1
                );
                continue;
            }
            let name = doc
                .pointer("/metadata/name")
                .and_then(|v| v.as_str())
                .unwrap_or("<unnamed>");
            let problems = api::validate_pool_manifest(doc);
            for problem in &problems {
                println!(
                    "{} (document {}, RunnerPool {name}): {problem}",
                    path.display(),
                    index + 1
                );
            }
            if problems.is_empty() {
                println!(
                    "{} (document {}, RunnerPool {name}): ok",
                    path.display(),
                    index + 1
                );
            }
            total += problems.len();
        }
    }
    Ok(total)
}
