//! Every example under `examples/`: the RunnerPools pass `pacer validate`, and every manifest
//! (the pools, the kustomize overlay as `kubectl kustomize` renders it, the Argo CD
//! Application) is accepted by the real API server in a server-side dry-run.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Parts, ground, repo_root, run};

/// Every YAML file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            all.push(path);
        }
    }
    all.sort();
    all
}

#[test]
fn every_example_validates_and_the_api_server_accepts_it() {
    let ground = ground(Parts::Kube);
    let examples = repo_root().join("examples");
    let scratch = support::scratch("examples");

    // What is applied: each top-level manifest, the overlay rendered, the Application.
    let overlay = run(ground
        .kubectl_command()
        .arg("kustomize")
        .arg(examples.join("kustomize/overlays/prod")));
    assert!(overlay.contains("namespace: ci-prod") && overlay.contains("maxRunners: 50"));
    let rendered = scratch.join("kustomize-prod.yaml");
    std::fs::write(&rendered, &overlay).unwrap();
    let mut manifests: Vec<PathBuf> = yaml_files(&examples)
        .into_iter()
        .filter(|p| !p.starts_with(examples.join("kustomize")))
        .collect();
    manifests.push(rendered);
    assert!(manifests.len() >= 5, "{manifests:?}");

    // `pacer validate` on all of them (it checks the RunnerPools and skips the rest).
    let validated = run(Command::new(env!("CARGO_BIN_EXE_pacer"))
        .arg("validate")
        .args(&manifests));
    assert_eq!(
        validated.lines().filter(|l| l.ends_with("): ok")).count(),
        5,
        "five RunnerPools:\n{validated}"
    );

    run(ground
        .kubectl_command()
        .args(["apply", "--server-side", "-f"])
        .arg(repo_root().join("tests/fixtures/argocd-application-crd.yaml")));
    run(ground.kubectl_command().args([
        "wait",
        "--for=condition=Established",
        "crd/applications.argoproj.io",
    ]));
    for ns in ["ci", "ci-prod", "argocd"] {
        let _ = ground
            .kubectl_command()
            .args(["create", "namespace", ns])
            .output();
    }
    for manifest in &manifests {
        let applied = run(ground
            .kubectl_command()
            .args(["apply", "--dry-run=server", "--server-side", "-f"])
            .arg(manifest));
        assert!(
            applied.contains("serverside-applied (server dry run)"),
            "{}: {applied}",
            manifest.display()
        );
    }
}
