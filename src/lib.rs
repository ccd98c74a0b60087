//! Pacer runs GitHub Actions jobs on ephemeral EC2 instances, one instance per job, steered by
//! `RunnerPool` and `RunnerJob` resources in Kubernetes.

pub mod api;
pub mod app;
pub mod cloud;
pub mod config;
pub mod controller;
pub mod doctor;
pub mod domain;
pub mod github;
pub mod http;
pub mod runner;

/// Everything that can stop a Pacer command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),

    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    #[error("{0}")]
    CrdNotInstalled(String),

    #[error("cannot read {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
