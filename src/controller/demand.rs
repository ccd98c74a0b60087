//! Demand: a queued GitHub job recorded as a RunnerJob, by the webhook or by the sweep that
//! catches what webhooks missed. One RunnerJob per GitHub job id, in the namespace of the pool
//! that serves it.

use kube::ResourceExt as _;
use kube::api::{Api, PostParams};
use tracing::info;

use super::FIELD_MANAGER;
use crate::api::{RunnerJob, RunnerJobSpec, RunnerPool};
use crate::domain::matching::{self, QueuedJob};
use crate::domain::tenancy::Tenancy;
use crate::github::job_object_name;

/// A queued workflow job, as a webhook or GitHub's API reports it.
pub struct Queued<'a> {
    pub job_id: i64,
    pub run_id: i64,
    /// `owner/name`.
    pub repository: &'a str,
    pub labels: &'a [String],
    pub installation_id: Option<i64>,
}

/// What recording a queued job came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Created,
    /// A RunnerJob for this GitHub job exists already (a redelivery, a duplicate).
    Exists,
    /// No pool serves the job.
    NoPool,
}

/// The pool among `pools` that serves `job` best, among those whose namespace `tenancy` lets
/// serve its repository.
fn serving<'p>(
    pools: &[&'p RunnerPool],
    tenancy: &Tenancy,
    job: &Queued<'_>,
) -> Option<&'p RunnerPool> {
    let (owner, name) = job
        .repository
        .split_once('/')
        .unwrap_or(("", job.repository));
    let wanted = QueuedJob {
        labels: job.labels,
        owner,
        repository: name,
    };
    let permitted: Vec<&RunnerPool> = pools
        .iter()
        .copied()
        .filter(|p| {
            tenancy.permits(
                p.metadata.namespace.as_deref().unwrap_or_default(),
                owner,
                name,
            )
        })
        .collect();
    matching::choose(&permitted, &wanted)
}

/// Records `job` for the pool among `pools` that serves it best, among those whose namespace
/// `tenancy` lets serve its repository.
pub async fn record(
    client: &kube::Client,
    pools: &[&RunnerPool],
    tenancy: &Tenancy,
    job: &Queued<'_>,
) -> Result<Recorded, kube::Error> {
    let Some(pool) = serving(pools, tenancy, job) else {
        info!(job_id = job.job_id, run_id = job.run_id, repository = job.repository,
            labels = ?job.labels, "no RunnerPool serves this queued job");
        return Ok(Recorded::NoPool);
    };
    let ns = pool.namespace().unwrap_or_default();
    let object = job_object_name(job.job_id);
    let record = RunnerJob::for_queued_job(
        &ns,
        &object,
        RunnerJobSpec {
            pool_name: pool.name_any(),
            job_id: job.job_id,
            run_id: job.run_id,
            repository: job.repository.into(),
            labels: job.labels.to_vec(),
            installation_id: job.installation_id,
        },
    );
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match Api::<RunnerJob>::namespaced(client.clone(), &ns)
        .create(&params, &record)
        .await
    {
        Ok(_) => {
            info!(job_id = job.job_id, run_id = job.run_id, repository = job.repository,
                runner_job = %format!("{ns}/{object}"), "recorded a queued job");
            Ok(Recorded::Created)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Recorded::Exists),
        Err(e) => Err(e),
    }
}
