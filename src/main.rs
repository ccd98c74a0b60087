use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// A controller caching thousands of objects and churning through small allocations keeps a
// smaller resident set on mimalloc than on the system allocator (see docs/testing.md), the
// more so with arena eager commit off, which .cargo/config.toml compiles in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (include/mimalloc.h).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Has mimalloc give freed pages back to the system as soon as they are free, not a second
/// later. Its delayed purges run only from a later call into the allocator that frees a page,
/// so a process that goes quiet after a burst (the first list and passes over 10,000 cached
/// RunnerJobs) kept what the burst freed: with 10,000 finished RunnerJobs stored, the bench
/// read 77–92 MiB settled (anonymous 53–67) with the delay, 64–65 MiB (anonymous 38–39,
/// close to the live heap) without it (docs/testing.md). The option has no compile-time default to set (its
/// 1,000 ms is a literal in mimalloc's options.c), so it is set here, before the runtime
/// starts; `MIMALLOC_PURGE_DELAY` in the environment still overrides it.
fn purge_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, which it reads atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

/// Runs GitHub Actions jobs on ephemeral EC2 instances, steered from Kubernetes.
#[derive(Parser)]
#[command(name = "pacer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller and its HTTP listener.
    Run {
        /// The YAML configuration file.
        #[arg(long, env = "PACER_CONFIG")]
        config: PathBuf,
        /// Only check that the configuration file parses and its values are valid (with the
        /// PACER_* overrides applied), then exit: 0 when it does. Secret files are not read.
        #[arg(long)]
        check_config: bool,
    },
    /// Check a live installation: one line per check, OK or what to fix; exit 1 on any failure.
    Doctor {
        /// The configuration file Pacer runs with.
        #[arg(long, env = "PACER_CONFIG")]
        config: PathBuf,
        /// The namespace of the replicas' Lease ($POD_NAMESPACE of the pods); default: the
        /// watched namespace, else `default`.
        #[arg(long)]
        lease_namespace: Option<String>,
    },
    /// Print the RunnerPool and RunnerJob field reference (Markdown), from the CRDs' schemas.
    Reference,
    /// Print the CustomResourceDefinitions as YAML (`pacer crds | kubectl apply -f -`).
    Crds {
        /// Write one file per CRD into this directory instead of printing them.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the IAM policy Pacer's role needs; values left out stay REPLACE_* placeholders.
    IamPolicy {
        /// The AWS account id (12 digits).
        #[arg(long)]
        account: Option<String>,
        /// The region Pacer runs in (`aws.region`).
        #[arg(long)]
        region: Option<String>,
        /// The controller id (`controller.id`), tagged as gha:controller on everything.
        #[arg(long)]
        controller_id: Option<String>,
        /// The role in the runners' instance profile, if pools use one.
        #[arg(long)]
        runner_role: Option<String>,
        /// Print what each statement allows (Markdown) instead of the policy.
        #[arg(long)]
        explain: bool,
        /// Print the policy builder page (HTML, no network) instead of the policy.
        #[arg(long, conflicts_with = "explain")]
        html: bool,
    },
    /// Check RunnerPool manifests offline against the API server's rules; exit 1 on any problem.
    Validate {
        /// YAML files, each holding one or more documents.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    purge_freed_memory_at_once();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            check_config: true,
        } => match pacer::config::Config::load(&config, std::env::vars()) {
            Ok(loaded) => {
                println!(
                    "{}: OK (region {}, controller {}, TLS {:?})",
                    config.display(),
                    loaded.aws.region,
                    loaded.controller.id,
                    loaded.server.tls.mode
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, .. } => {
            // The config's log level, when it loads; `run` reports a config that does not.
            let level = pacer::config::Config::load(&config, std::env::vars())
                .ok()
                .and_then(|c| c.log_level);
            pacer::app::init_tracing(level.as_deref());
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
            match runtime.block_on(pacer::app::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %err, "pacer stopped");
                    eprintln!("error: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Doctor {
            config,
            lease_namespace,
        } => {
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
            let checks = runtime.block_on(pacer::doctor::run(&config, lease_namespace.as_deref()));
            for check in &checks {
                println!("{check}");
            }
            if checks.iter().all(|c| c.outcome.is_ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Reference => {
            print!("{}", pacer::api::reference::markdown());
            ExitCode::SUCCESS
        }
        Command::Crds { dir: None } => {
            print!("{}", pacer::app::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Crds { dir: Some(dir) } => match pacer::app::write_crds(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Command::IamPolicy { html: true, .. } => {
            print!("{}", pacer::cloud::iam_policy::builder_page());
            ExitCode::SUCCESS
        }
        Command::IamPolicy { explain: true, .. } => {
            print!("{}", pacer::cloud::iam_policy::explained());
            ExitCode::SUCCESS
        }
        Command::IamPolicy {
            account,
            region,
            controller_id,
            runner_role,
            explain: false,
            html: false,
        } => {
            use pacer::cloud::iam_policy::{Params, policy_json_for};
            let defaults = Params::default();
            print!(
                "{}",
                policy_json_for(&Params {
                    account: account.unwrap_or(defaults.account),
                    region: region.unwrap_or(defaults.region),
                    controller_id: controller_id.unwrap_or(defaults.controller_id),
                    runner_role,
                })
            );
            ExitCode::SUCCESS
        }
        Command::Validate { files } => match pacer::app::validate_files(&files) {
            Ok(0) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{c_int, c_long};

    unsafe extern "C" {
        fn mi_version() -> c_int;
        fn mi_option_get(option: c_int) -> c_long;
    }

    /// `mi_option_arena_eager_commit` in mimalloc 3's `mi_option_e` (include/mimalloc.h).
    const ARENA_EAGER_COMMIT: c_int = 4;

    #[test]
    fn freed_memory_is_purged_at_once() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("MIMALLOC_PURGE_DELAY is set: it overrides what main sets");
            return;
        }
        let _ = &super::ALLOCATOR;
        assert_eq!(
            unsafe { mi_version() } / 10_000,
            3,
            "check the option's number"
        );
        let before = unsafe { mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            before, 1_000,
            "mimalloc's own purge delay, in ms: is the number right?"
        );
        super::purge_freed_memory_at_once();
        assert_eq!(unsafe { mi_option_get(super::MI_OPTION_PURGE_DELAY) }, 0);
    }

    #[test]
    fn the_allocator_is_built_to_commit_arenas_lazily() {
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some() {
            eprintln!("MIMALLOC_ARENA_EAGER_COMMIT is set: the compiled-in default is not visible");
            return;
        }
        // The static is what links mimalloc into this test binary.
        let _ = &super::ALLOCATOR;
        let (version, eager) = unsafe { (mi_version(), mi_option_get(ARENA_EAGER_COMMIT)) };
        assert!(
            (30_000..40_000).contains(&version),
            "mimalloc {version}: check the option's number in its mimalloc.h"
        );
        assert_eq!(
            eager, 0,
            "arena eager commit is {eager}: .cargo/config.toml's CFLAGS for this target did not \
             reach mimalloc's build"
        );
    }
}
