//! `pacer doctor`: checks a live installation from where it runs and says, one line per check,
//! OK or what to fix. It reads; the only things it asks to do are DryRuns.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};

use crate::api::RunnerPool;
use crate::cloud::Ec2 as _;
use crate::cloud::aws::{AwsEc2, AwsSettings};
use crate::config::Config;
use crate::domain::pool::{PoolIdentity, dry_run_request};
use crate::github::RunnerTarget;

/// One check's verdict: what was checked, and OK or what to fix.
pub struct Check {
    pub what: String,
    pub outcome: Result<String, String>,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Ok(detail) => write!(f, "OK    {}: {detail}", self.what),
            Err(fix) => write!(f, "FAIL  {}: {fix}", self.what),
        }
    }
}

fn check(what: impl Into<String>, outcome: Result<String, String>) -> Check {
    Check {
        what: what.into(),
        outcome,
    }
}

/// Which certificates instances' identity documents must verify against, and whose they are.
fn identity_certificates(config: &Config) -> Result<String, String> {
    let region = &config.aws.region;
    let roots = config.identity_trust_roots().map_err(|e| match &config.runners.identity_certificates_file {
        Some(_) => format!("{e}; put AWS's RSA-2048 certificate for {region} there, or unset it to use the bundled one"),
        None => e.to_string(),
    })?;
    let Some(path) = &config.runners.identity_certificates_file else {
        return Ok(format!(
            "AWS's certificate for {region}, bundled (runners.identity_certificates_file not set)"
        ));
    };
    let aws = roots.aws_regions();
    let file = format!("{}: {} certificate(s)", path.display(), roots.len());
    if aws.is_empty() {
        Ok(format!(
            "{file}, none of them AWS's: instances on EC2 verify only if their documents are signed by one of them"
        ))
    } else if aws.iter().any(|r| r == region) {
        Ok(format!("{file}, AWS's for {}", aws.join(", ")))
    } else {
        Err(format!(
            "{file}, AWS's for {}, not for aws.region {region}: instances there will be refused; add {region}'s, or unset the key to use the bundled one",
            aws.join(", ")
        ))
    }
}

/// Every check, in order; a check that others need stops the run when it fails. `lease_ns` is
/// where the replicas' Lease lives (`$POD_NAMESPACE` of the pods).
pub async fn run(config_path: &Path, lease_ns: Option<&str>) -> Vec<Check> {
    let mut checks = Vec::new();
    let config = match Config::load(config_path, std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            checks.push(check("config", Err(e.to_string())));
            return checks;
        }
    };
    checks.push(check(
        "config",
        Ok(format!("{} parses and is valid", config_path.display())),
    ));
    let secrets = config.read_secrets();
    checks.push(check(
        "secrets",
        match &secrets {
            Ok(s) if s.webhook_secret.expose().is_empty() => Err(format!(
                "the webhook secret ({}) is empty; put the secret the GitHub App signs with there",
                config.github.webhook_secret_file.display()
            )),
            Ok(_) => Ok("GitHub App key, webhook secret and callback key are readable".into()),
            Err(e) => Err(e.to_string()),
        },
    ));
    checks.push(check(
        "identity certificates",
        identity_certificates(&config),
    ));

    // AWS: the credentials work in the region, on Pacer's own tag-scoped listing.
    let aws = crate::cloud::aws::sdk_config(&AwsSettings {
        region: config.aws.region.clone(),
        profile: config.aws.profile.clone(),
        endpoint_url: config.aws.endpoint_url.clone(),
    })
    .await;
    let ec2 = AwsEc2::new(&aws);
    let aws_ok = match tokio::time::timeout(
        Duration::from_secs(20),
        ec2.describe_managed_instances(&config.controller.id),
    )
    .await
    {
        Ok(Ok(instances)) => {
            let alive = instances.iter().filter(|i| i.is_alive()).count();
            checks.push(check(
                "aws",
                Ok(format!(
                    "credentials work in {}; {alive} instance(s) of controller {} alive",
                    config.aws.region, config.controller.id
                )),
            ));
            true
        }
        Ok(Err(e)) => {
            checks.push(check(
                "aws",
                Err(format!(
                    "{e}; check the credentials (IRSA / Pod Identity / profile) and aws.region"
                )),
            ));
            false
        }
        Err(_) => {
            checks.push(check(
                "aws",
                Err("EC2 did not answer in 20 s; check the network and aws.endpoint_url".into()),
            ));
            false
        }
    };

    // Kubernetes: reachable, the CRDs this binary serves, the pools, the Lease.
    let client = match kube::Config::infer().await {
        Ok(kube_config) => crate::controller::kube_client(kube_config).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let client = match client {
        Ok(client) => client,
        Err(e) => {
            checks.push(check(
                "kubernetes",
                Err(format!("{e}; check the kubeconfig")),
            ));
            return checks;
        }
    };
    match crate::app::check_crds(&client).await {
        Ok(true) => checks.push(check(
            "crds",
            Ok("RunnerPool and RunnerJob are installed and Established".into()),
        )),
        Ok(false) => checks.push(check(
            "crds",
            Err("the RunnerJob CRD predates batched launches (no selectable fields); apply `pacer crds` to update it".into()),
        )),
        Err(e) => {
            checks.push(check("crds", Err(e.to_string())));
            return checks;
        }
    }
    let pools: Api<RunnerPool> = if config.controller.namespace.is_empty() {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), &config.controller.namespace)
    };
    let pools = match pools.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            checks.push(check("pools", Err(format!("cannot list RunnerPools: {e}"))));
            Vec::new()
        }
    };
    if pools.is_empty() {
        checks.push(check("pools", Ok("no RunnerPool yet".into())));
    }
    for pool in &pools {
        let ns = pool.namespace().unwrap_or_default();
        let name = pool.name_any();
        let what = format!("pool {ns}/{name}");
        let Some(template) = pool.status.as_ref().and_then(|s| s.launch_template.clone()) else {
            checks.push(check(
                what,
                Err(format!(
                    "no launch template yet; see `kubectl describe runnerpool -n {ns} {name}`"
                )),
            ));
            continue;
        };
        if !aws_ok {
            checks.push(check(what, Err("skipped: AWS is not reachable".into())));
            continue;
        }
        let identity = PoolIdentity {
            controller_id: &config.controller.id,
            namespace: &ns,
            name: &name,
        };
        let request = dry_run_request(&pool.spec, &identity, &template.id, template.version);
        checks.push(check(
            what,
            match ec2.dry_run_launch(&request).await {
                Ok(()) => Ok(format!(
                    "a DryRun {} from {} with the real tags is permitted{}",
                    if request.fleet {
                        "CreateFleet"
                    } else {
                        "RunInstances"
                    },
                    template.id,
                    match &pool.spec.instance_profile {
                        Some(profile) => {
                            format!(" (instance profile {profile} and iam:PassRole included)")
                        }
                        None => String::new(),
                    }
                )),
                Err(e) if e.wants_spot_service_linked_role() => Err(format!(
                    "{e}; the account has no EC2 Spot service-linked role \
                     (AWSServiceRoleForEC2Spot) and Pacer's role may not create it: create it \
                     once per account with `aws iam create-service-linked-role \
                     --aws-service-name spot.amazonaws.com` (docs/install.md)"
                )),
                Err(e) => Err(format!(
                    "{e}; compare Pacer's role with `pacer iam-policy` (docs/iam-policy.md)"
                )),
            },
        ));
    }

    // GitHub: the App's key and id, and an installation token for each pool's owner.
    if let Ok(secrets) = &secrets {
        match crate::github::client::GitHubApp::new(
            &config.github.api_url,
            config.github.app_id,
            secrets.github_private_key.expose(),
            Arc::new(|_: &'static str, _: &str| {}),
        ) {
            Err(e) => checks.push(check("github", Err(format!("the App's private key: {e}")))),
            Ok(app) => {
                let mut targets: Vec<RunnerTarget> = pools
                    .iter()
                    .map(|pool| RunnerTarget {
                        owner: pool.spec.github.owner.clone(),
                        repo: match pool.spec.github.scope {
                            crate::api::GitHubScope::Org => None,
                            crate::api::GitHubScope::Repo => {
                                pool.spec.github.repositories.first().cloned()
                            }
                        },
                        ..Default::default()
                    })
                    .collect();
                targets.sort_by(|a, b| (&a.owner, &a.repo).cmp(&(&b.owner, &b.repo)));
                targets.dedup();
                if targets.is_empty() {
                    checks.push(check(
                        "github",
                        Ok("no pool names an owner to check".into()),
                    ));
                }
                for target in targets {
                    let name = match &target.repo {
                        Some(repo) => format!("{}/{repo}", target.owner),
                        None => target.owner.clone(),
                    };
                    checks.push(check(
                        format!("github {name}"),
                        match app.check_installation(&target).await {
                            Ok(id) => Ok(format!(
                                "App {} is installed (installation {id}) and minted a token",
                                config.github.app_id
                            )),
                            Err(e) => Err(format!(
                                "{e}; check github.app_id, the private key, and that the App is installed on {name}"
                            )),
                        },
                    ));
                }
            }
        }
    }

    // The Lease: who leads.
    let lease_ns = lease_ns
        .map(String::from)
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| Some(config.controller.namespace.clone()).filter(|n| !n.is_empty()))
        .unwrap_or_else(|| "default".into());
    let lease_name = format!("pacer-{}", config.controller.id);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &lease_ns);
    checks.push(check(
        "leader",
        match leases.get_opt(&lease_name).await {
            Ok(Some(lease)) => {
                let spec = lease.spec.unwrap_or_default();
                match spec.holder_identity.filter(|h| !h.is_empty()) {
                    Some(holder) => {
                        let age = spec
                            .renew_time
                            .map(|t| Timestamp::now().duration_since(t.0).as_secs())
                            .unwrap_or(-1);
                        let lasts = spec.lease_duration_seconds.unwrap_or(15) as i64;
                        if age <= lasts {
                            Ok(format!("{holder} holds Lease {lease_ns}/{lease_name}, renewed {age} s ago"))
                        } else {
                            Err(format!("Lease {lease_ns}/{lease_name} was last renewed by {holder} {age} s ago: no replica is leading; check the pods"))
                        }
                    }
                    None => Err(format!("nobody holds Lease {lease_ns}/{lease_name}: is pacer running?")),
                }
            }
            Ok(None) => Err(format!(
                "no Lease {lease_ns}/{lease_name}: pacer has never run with controller.id {} here (or pass --lease-namespace)",
                config.controller.id
            )),
            Err(e) => Err(format!("cannot read Lease {lease_ns}/{lease_name}: {e}")),
        },
    ));

    // Where the runner release comes from: instances take it from Pacer, Pacer from here.
    let source = config.runners.release_source();
    checks.push(check(
        "runner_release",
        match crate::runner::release::latest_version(source).await {
            Ok(version) => Ok(format!("{source} names actions/runner {version} the latest")),
            Err(e) => Err(format!(
                "{e}; Pacer serves the runner to its instances from runners.release_source (docs/instances.md)"
            )),
        },
    ));

    // The listener, as runners and GitHub reach it.
    let url = format!("{}/healthz", config.server.public_url.trim_end_matches('/'));
    let answer = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let response = client.get(&url).send().await.map_err(|e| format!("{e}"))?;
        if response.status().is_success() {
            Ok(format!("{url} answered {}", response.status()))
        } else {
            Err(format!("{url} answered {}", response.status()))
        }
    }
    .await;
    checks.push(check(
        "public_url",
        answer.map_err(|e| {
            format!("{e}; runners and GitHub must reach server.public_url (ingress, DNS, TLS)")
        }),
    ));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::aws_certificates;

    fn config(region: &str, file: Option<&Path>) -> Config {
        let file = file.map_or(String::new(), |f| {
            format!("  identity_certificates_file: {}\n", f.display())
        });
        serde_saphyr::from_str(&format!(
            "aws:\n  region: {region}\nserver:\n  public_url: https://pacer.example.com\n\
             github:\n  app_id: 1\n  private_key_file: /k\n  webhook_secret_file: /w\n\
             runners:\n  callback_key_file: /c\n{file}"
        ))
        .unwrap()
    }

    #[test]
    fn identity_certificates_name_the_aws_region_they_belong_to() {
        let dir = std::env::temp_dir().join(format!("pacer-doctor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let us_east_1 = dir.join("us-east-1.pem");
        let pem = aws_certificates::for_region("us-east-1").unwrap().pem;
        std::fs::write(&us_east_1, pem).unwrap();
        let own = dir.join("own.pem");
        let made = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=test signer", "-keyout"])
            .arg(dir.join("own-key.pem"))
            .arg("-out")
            .arg(&own)
            .output()
            .unwrap();
        assert!(made.status.success());

        let bundled = identity_certificates(&config("eu-west-1", None)).unwrap();
        assert!(
            bundled.contains("AWS's certificate for eu-west-1, bundled"),
            "{bundled}"
        );
        let aws = identity_certificates(&config("us-east-1", Some(&us_east_1))).unwrap();
        assert!(
            aws.ends_with("1 certificate(s), AWS's for us-east-1"),
            "{aws}"
        );
        let wrong = identity_certificates(&config("eu-west-1", Some(&us_east_1))).unwrap_err();
        assert!(wrong.contains("not for aws.region eu-west-1"), "{wrong}");
        let signer = identity_certificates(&config("eu-west-1", Some(&own))).unwrap();
        assert!(signer.contains("none of them AWS's"), "{signer}");
        let missing = identity_certificates(&config("eu-west-1", Some(&dir.join("no.pem"))));
        let missing = missing.unwrap_err();
        assert!(
            missing.contains("no.pem") && missing.contains("unset it"),
            "{missing}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
