//! The chart's RBAC against the calls Pacer really makes. `pacer run` runs as the chart's
//! ServiceAccount (a token from the TokenRequest API, the chart's Roles and bindings applied to
//! the test ground), takes a job through its whole life (webhook, launch, the simulator's boot
//! and callbacks, TTL deletion), has its pool deleted, and is stopped with SIGTERM. The API
//! server's audit log (requests by service accounts, metadata only) then shows every call:
//! none may be forbidden, and every verb the chart grants must have been used.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, DeleteParams, PostParams};
use pacer::api::{JobPhase, RunnerJob, RunnerPool};
use serde_json::{Value, json};
use support::github::FakeGitHub;
use support::identity::Signer;
use support::process::{self, WEBHOOK_SECRET};
use support::simulator::{Behaviour, Simulator};
use support::{Ground, Parts, ground, helm, repo_root, run, webhooks};

/// Grants a short test cannot exercise, each with the code path that needs it.
const RARELY_CALLED: &[(&str, &str, &str, &str)] = &[
    (
        "pacer.dev",
        "runnerpools",
        "get",
        "a RunnerJob pass or a bootstrap whose pool is not in the watch cache yet",
    ),
    (
        "events.k8s.io",
        "events",
        "patch",
        "the event recorder's second occurrence of the same Event (a series)",
    ),
];

fn kubectl(ground: &Ground, args: &[&str]) -> String {
    run(ground.kubectl_command().args(args))
}

/// (apiGroup, resource or resource/subresource, verb) of every grant in the rendered roles.
fn grants(objects: &[Value]) -> BTreeSet<(String, String, String)> {
    let mut all = BTreeSet::new();
    for role in objects
        .iter()
        .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
    {
        for rule in role["rules"].as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        all.insert((
                            group.as_str().unwrap().to_string(),
                            resource.as_str().unwrap().to_string(),
                            verb.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_grants_exactly_the_calls_pacer_makes() {
    let ground = ground(Parts::Both);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "rbac").await;
    let id = "rbac";
    let release = format!("rbac-{}", std::process::id());
    let dir = support::scratch(&format!("rbac-{ns}"));

    // The chart's ServiceAccount and RBAC, for real, watching every namespace (the default).
    let rendered = Command::new(helm())
        .args([
            "template",
            &release,
            "--kube-version",
            &support::kube_version(),
        ])
        .arg(repo_root().join("charts/pacer"))
        .args(["--namespace", &ns, "-f"])
        .arg(repo_root().join("charts/pacer/ci/minimal-values.yaml"))
        .args(["--set", &format!("controller.id={id}")])
        .output()
        .unwrap();
    assert!(rendered.status.success());
    let objects: Vec<Value> =
        serde_saphyr::from_multiple(&String::from_utf8(rendered.stdout).unwrap()).unwrap();
    let rbac: Vec<Value> = objects
        .into_iter()
        .filter(|o| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .iter()
            .any(|k| o["kind"] == *k)
        })
        .collect();
    let file = dir.join("rbac.yaml");
    std::fs::write(
        &file,
        serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": rbac})).unwrap(),
    )
    .unwrap();
    kubectl(ground, &["apply", "-f", file.to_str().unwrap()]);
    let account = rbac.iter().find(|o| o["kind"] == "ServiceAccount").unwrap()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let token = kubectl(
        ground,
        &["create", "token", &account, "-n", &ns, "--duration", "2h"],
    );
    let kubeconfig_text = std::fs::read_to_string(ground.var("KUBECONFIG")).unwrap();
    let admin_token = kubeconfig_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        kubeconfig_text.replace(admin_token, token.trim()),
    )
    .unwrap();

    // Pacer as that ServiceAccount, with the fake GitHub and the runner simulator.
    let github = FakeGitHub::start().await;
    github.install(1, &["example-org/api"]);
    let mut pacer = process::start(
        ground,
        &dir,
        process::Setup {
            name: "rbac",
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
    );
    let _simulator = Simulator::start(
        &ground.aws_config().await,
        &github,
        Signer::at(&dir),
        id,
        &dir.join("instances"),
        Behaviour::default(),
    )
    .await;

    let pools: Api<RunnerPool> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<RunnerJob> = Api::namespaced(client.clone(), &ns);
    let mut pool = ground.example_pool(&ns, "linux");
    pool["spec"]["github"] = json!({"scope": "org", "owner": "example-org"});
    pool["spec"]["labels"] = json!(["self-hosted", "linux"]);
    // Long enough for the poll below to see Succeeded before the job goes.
    pool["spec"]["ttlSecondsAfterFinished"] = json!(5);
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    pool["spec"]["runnerUser"] = json!(user.trim());
    let pool: RunnerPool = serde_json::from_value(pool).unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let wait = |what: &'static str, seconds: u64| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        move |done: bool, log: &dyn Fn() -> String| {
            assert!(
                done || tokio::time::Instant::now() < deadline,
                "{what}; pacer's log:\n{}",
                log()
            );
            done
        }
    };
    let log_file = pacer.log.clone();
    let log = move || std::fs::read_to_string(&log_file).unwrap_or_default();
    let ready = wait("the pool is Ready", 60);
    while !ready(
        pools.get("linux").await.unwrap().status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        }),
        &log,
    ) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A job's whole life: queued, launched, booted, run, finished, and deleted after its TTL.
    webhooks::deliver(
        &pacer.url(),
        WEBHOOK_SECRET,
        "rbac-1",
        webhooks::queued(9101, &["self-hosted", "linux"]),
    )
    .await;
    let name = pacer::github::job_object_name(9101);
    let mut succeeded = false;
    let done = wait("the job succeeds and is deleted after its TTL", 90);
    loop {
        match jobs.get_opt(&name).await.unwrap() {
            Some(job) => {
                let phase = job.status.map(|s| s.phase);
                assert_ne!(phase, Some(JobPhase::Failed), "{}", log());
                succeeded |= phase == Some(JobPhase::Succeeded);
            }
            None if succeeded => break,
            None => {}
        }
        done(false, &log);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The pool goes: its launch template is deleted and its finalizer removed.
    pools
        .delete("linux", &DeleteParams::default())
        .await
        .unwrap();
    let gone = wait("the pool is deleted", 60);
    while !gone(pools.get_opt("linux").await.unwrap().is_none(), &log) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM: the Lease is released.
    let pid = pacer.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exited = wait("pacer exits", 30);
    while !exited(pacer.child.try_wait().unwrap().is_some(), &log) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What the API server saw.
    let who = format!("system:serviceaccount:{ns}:{account}");
    let audit = std::fs::read_to_string(ground.var("AUDIT_LOG")).unwrap();
    let mut forbidden = Vec::new();
    let mut used = BTreeSet::new();
    for event in audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        if event["user"]["username"] != who.as_str() {
            continue;
        }
        let object = &event["objectRef"];
        let resource = match object["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", object["resource"].as_str().unwrap_or_default()),
            None => object["resource"].as_str().unwrap_or_default().to_string(),
        };
        let call = (
            object["apiGroup"].as_str().unwrap_or_default().to_string(),
            resource,
            event["verb"].as_str().unwrap_or_default().to_string(),
        );
        if event["responseStatus"]["code"] == 403 {
            forbidden.push(call);
        } else {
            used.insert(call);
        }
    }
    assert!(!used.is_empty(), "no audited call by {who}");
    assert!(forbidden.is_empty(), "forbidden calls: {forbidden:?}");
    let granted = grants(&rbac);
    let unused: Vec<_> = granted
        .iter()
        .filter(|grant| !used.contains(*grant))
        .filter(|(group, resource, verb)| {
            !RARELY_CALLED.iter().any(|(g, r, v, _)| {
                (g, r, v) == (&group.as_str(), &resource.as_str(), &verb.as_str())
            })
        })
        .collect();
    assert!(
        unused.is_empty(),
        "granted but never called: {unused:?}\ncalled: {used:?}"
    );
    // Every call was granted (nothing succeeded through another grant, such as discovery).
    let outside: Vec<_> = used
        .iter()
        .filter(|call| !call.1.is_empty() && !granted.contains(*call))
        .collect();
    assert!(
        outside.is_empty(),
        "called without a grant of ours: {outside:?}"
    );
    eprintln!(
        "{} grants, {} distinct calls: {used:?}",
        granted.len(),
        used.len()
    );
}
