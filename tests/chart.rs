//! The Helm chart: `helm lint` and `helm template` with each `charts/pacer/ci/*-values.yaml`
//! (the least an install needs, every optional part on, manual TLS), every rendered object
//! accepted by the real API server in a server-side dry-run, the rendered Deployment's command
//! line and configuration accepted by `pacer run --check-config`, and `deploy/pacer.yaml` equal
//! to what the chart renders for users without Helm.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{Parts, ground, helm, kube_version, repo_root, run};

fn render(helm: &Path, namespace: &str, values: &Path) -> String {
    run(Command::new(helm)
        .args(["template", "pacer", "--kube-version", &kube_version()])
        .arg(repo_root().join("charts/pacer"))
        .args(["--namespace", namespace, "--include-crds", "-f"])
        .arg(values))
}

fn values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("charts/pacer/ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files
}

#[test]
fn the_chart_lints_renders_and_every_object_is_accepted_by_the_api_server() {
    let helm = helm();
    let ground = ground(Parts::Kube);
    let kubectl = |args: &[&str], input: Option<&Path>| {
        let mut command = Command::new(ground.var("KUBECTL"));
        command
            .arg("--kubeconfig")
            .arg(ground.var("KUBECONFIG"))
            .args(args);
        if let Some(file) = input {
            command.arg("-f").arg(file);
        }
        run(&mut command)
    };
    kubectl(
        &["apply", "--server-side"],
        Some(&repo_root().join("tests/fixtures/servicemonitor-crd.yaml")),
    );
    kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
        ],
        None,
    );
    let scratch = support::scratch("chart");
    for values in values_files() {
        let name = values.file_stem().unwrap().to_string_lossy().to_string();
        run(Command::new(&helm)
            .args(["lint", "--strict"])
            .arg(repo_root().join("charts/pacer"))
            .arg("-f")
            .arg(&values));
        let namespace = format!("pacer-{name}");
        let rendered = render(&helm, &namespace, &values);
        let objects: Vec<Value> = serde_saphyr::from_multiple(&rendered).unwrap();
        let objects: Vec<Value> = objects.into_iter().filter(|o| !o.is_null()).collect();
        // The namespaces the objects go into exist, as they would in a cluster.
        for ns in objects
            .iter()
            .filter_map(|o| o["metadata"]["namespace"].as_str())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let _ = Command::new(ground.var("KUBECTL"))
                .arg("--kubeconfig")
                .arg(ground.var("KUBECONFIG"))
                .args(["create", "namespace", ns])
                .output();
        }
        let file = scratch.join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let applied = kubectl(&["apply", "--dry-run=server", "--server-side"], Some(&file));
        assert_eq!(
            applied.lines().count(),
            objects.len(),
            "{name}: every object accepted:\n{applied}"
        );

        // The Deployment runs `pacer` with the ConfigMap's file, and that file is valid.
        let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = serde_json::from_value(container["args"].clone()).unwrap();
        assert_eq!(args[..2], ["run".to_string(), "--config".into()], "{name}");
        let config_path = Path::new(&args[2]);
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{name}: {} is mounted", config_path.display()));
        assert_eq!(mount["name"], "config");
        let config_map = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        let text = config_map["data"]["config.yaml"].as_str().unwrap();
        let config_file = scratch.join(format!("{name}-config.yaml"));
        std::fs::write(&config_file, text).unwrap();
        let mut check = Command::new(env!("CARGO_BIN_EXE_pacer"));
        check
            .args(args.iter().take(2))
            .arg(&config_file)
            .arg("--check-config");
        run(&mut check);

        // Hardened as the chart promises.
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"][0], "ALL");
        // Secrets arrive as files: RBAC reaches no Secret but ACME's own, by name.
        for role in objects
            .iter()
            .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
        {
            for rule in role["rules"].as_array().unwrap() {
                if rule["resources"].to_string().contains("secrets") {
                    assert_eq!(
                        rule["resourceNames"],
                        serde_json::json!(["pacer-acme"]),
                        "{name}: {rule}"
                    );
                    assert_eq!(
                        rule["verbs"],
                        serde_json::json!(["get", "update"]),
                        "{name}: {rule}"
                    );
                }
            }
        }
    }
}

#[test]
fn deploy_manifests_are_what_the_chart_renders() {
    let rendered = render(
        &helm(),
        "pacer",
        &repo_root().join("charts/pacer/ci/minimal-values.yaml"),
    );
    let committed = std::fs::read_to_string(repo_root().join("deploy/pacer.yaml")).unwrap();
    assert!(
        rendered == committed,
        "deploy/pacer.yaml is out of date: run `make generate` and commit the result"
    );
}

#[test]
fn values_that_do_not_fit_the_schema_fail_at_template_time() {
    let helm = helm();
    let minimal = repo_root().join("charts/pacer/ci/minimal-values.yaml");
    for (set, why) in [
        ("github.appid=5", "additional properties"),
        ("server.tls.mode=letsencrypt", "server/tls/mode"),
        ("controller.id=Prod_EU", "controller/id"),
        ("github.appId=0", "github/appId"),
        (
            "secrets.existingSecret=,secrets.githubPrivateKey=k,secrets.callbackKey=0123456789abcdef0123456789abcdef,secrets.webhookSecret=short-secret",
            "secrets/webhookSecret",
        ),
    ] {
        let out = Command::new(&helm)
            .args(["template", "pacer", "--kube-version", &kube_version()])
            .arg(repo_root().join("charts/pacer"))
            .arg("-f")
            .arg(&minimal)
            .args(["--set", set])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(stderr.contains(why), "{set}: {stderr}");
    }
}

/// With the NetworkPolicy on, metrics are reachable only from the configured peers and egress
/// is the cluster's DNS, the API server's ports and 443: nothing else, to anywhere.
#[test]
fn the_network_policy_admits_metrics_from_its_peers_only_and_narrows_egress() {
    let helm = helm();
    let minimal = repo_root().join("charts/pacer/ci/minimal-values.yaml");
    let rendered = run(Command::new(&helm)
        .args(["template", "pacer", "--kube-version", &kube_version()])
        .arg(repo_root().join("charts/pacer"))
        .arg("-f")
        .arg(&minimal)
        .args(["--set", "networkPolicy.enabled=true"]));
    let policy: Value = rendered
        .split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
        .find(|doc| doc["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy");
    let spec = &policy["spec"];
    let ports = |rule: &Value| -> Vec<String> {
        rule["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].to_string().trim_matches('"').to_string())
            .collect()
    };
    let metrics: Vec<&Value> = spec["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| ports(r).contains(&"metrics".to_string()))
        .collect();
    assert_eq!(metrics.len(), 1, "{spec}");
    assert_eq!(
        metrics[0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring",
        "{spec}"
    );
    let egress = spec["egress"].as_array().unwrap();
    let mut allowed: Vec<String> = egress.iter().flat_map(ports).collect();
    allowed.sort();
    allowed.dedup();
    assert_eq!(allowed, ["443", "53", "6443"], "{spec}");
    let dns = egress
        .iter()
        .find(|r| ports(r).contains(&"53".to_string()))
        .unwrap();
    assert_eq!(
        dns["to"][0]["podSelector"]["matchLabels"]["k8s-app"], "kube-dns",
        "{spec}"
    );
}

/// Every `sh` block of the docs that holds a `helm install`, run as written by bash against the
/// test ground: `kubectl` is the ground's, `helm install` renders (`helm template`) instead of
/// installing, and every object it renders must be accepted by the API server in a server-side
/// dry-run. What a reader pastes must render and apply.
#[test]
fn the_documented_helm_commands_render_and_every_object_is_accepted() {
    let helm = helm();
    let ground = ground(Parts::Kube);
    let scratch = support::scratch("documented");
    std::fs::write(
        scratch.join("app.private-key.pem"),
        "-----BEGIN RSA PRIVATE KEY-----\nnot a real key\n-----END RSA PRIVATE KEY-----\n",
    )
    .unwrap();
    // `helm install RELEASE CHART ARGS...` renders into $RENDERED; `kubectl` is the ground's,
    // and what already exists (a namespace both docs create) is no failure.
    let preamble = format!(
        r#"set -euo pipefail
helm() {{
  [ "$1" = install ] || {{ echo "only helm install is run here: $*" >&2; return 1; }}
  local release=$2 chart=$3; shift 3
  {helm} template "$release" "{root}/$chart" --kube-version {version} "$@" >"$RENDERED"
}}
kubectl() {{
  local out
  out=$({kubectl} --kubeconfig {kubeconfig} "$@" 2>&1) || grep -qi "already exists" <<<"$out" || {{ echo "$out" >&2; return 1; }}
}}
export WEBHOOK_SECRET=documented-webhook-secret
"#,
        helm = helm.display(),
        root = repo_root().display(),
        version = kube_version(),
        kubectl = ground.var("KUBECTL"),
        kubeconfig = ground.var("KUBECONFIG"),
    );
    let mut blocks = 0;
    for doc in ["docs/install.md", "charts/pacer/README.md"] {
        let text = std::fs::read_to_string(repo_root().join(doc)).unwrap();
        for (i, block) in text.split("```sh\n").skip(1).enumerate() {
            let block = block.split("\n```").next().unwrap();
            if !block.lines().any(|l| l.starts_with("helm install ")) {
                continue;
            }
            blocks += 1;
            let rendered = scratch.join(format!("{}-{i}.yaml", doc.replace('/', "-")));
            let out = Command::new("bash")
                .args(["-c", &format!("{preamble}{block}\n")])
                .current_dir(&scratch)
                .env("RENDERED", &rendered)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{doc}, block {i}:\n{block}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let objects: Vec<Value> =
                serde_saphyr::from_multiple(&std::fs::read_to_string(&rendered).unwrap()).unwrap();
            let objects: Vec<Value> = objects.into_iter().filter(|o| !o.is_null()).collect();
            assert!(
                objects.iter().any(|o| o["kind"] == "Deployment"),
                "{doc}, block {i}"
            );
            let applied = run(Command::new(ground.var("KUBECTL"))
                .arg("--kubeconfig")
                .arg(ground.var("KUBECONFIG"))
                .args(["apply", "--dry-run=server", "--server-side", "-f"])
                .arg(&rendered));
            assert_eq!(
                applied.lines().count(),
                objects.len(),
                "{doc}, block {i}: every object accepted:\n{applied}"
            );
            // The EKS ways in render what the AWS Load Balancer Controller reads.
            let find = |kind: &str| {
                objects
                    .iter()
                    .find(|o| o["kind"] == kind && o["metadata"]["name"] == "pacer")
            };
            if block.contains("className: alb") {
                let ingress = find("Ingress").expect("an Ingress");
                assert_eq!(ingress["spec"]["ingressClassName"], "alb");
                let annotations = &ingress["metadata"]["annotations"];
                for key in [
                    "scheme",
                    "target-type",
                    "certificate-arn",
                    "healthcheck-path",
                ] {
                    assert!(
                        annotations[format!("alb.ingress.kubernetes.io/{key}")].is_string(),
                        "{key}: {annotations}"
                    );
                }
            }
            if block.contains("type: LoadBalancer") {
                let service = find("Service").expect("a Service");
                assert_eq!(service["spec"]["type"], "LoadBalancer");
                assert_eq!(service["spec"]["ports"][0]["port"], 443);
                assert_eq!(
                    service["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"],
                    "ip"
                );
                let config = find("ConfigMap").expect("a ConfigMap")["data"]["config.yaml"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert!(config.contains("mode: acme"), "{config}");
            }
        }
    }
    assert!(blocks >= 4, "{blocks} documented helm installs");
}
