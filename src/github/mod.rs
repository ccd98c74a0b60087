//! GitHub: webhook signatures and payloads, and the names Pacer gives runners.

pub mod webhook;

/// The name Pacer gives the RunnerJob recorded for a GitHub workflow job: derived from the job
/// id alone, so a redelivered or duplicated webhook finds the first one.
pub fn job_object_name(job_id: i64) -> String {
    format!("gh-job-{job_id}")
}

/// The name of the GitHub runner Pacer registers for a RunnerJob (at most 64 characters, as
/// GitHub allows): the controller id keeps two installations on one organization apart.
pub fn runner_name(controller_id: &str, job_id: i64) -> String {
    let name = format!("pacer-{controller_id}-{job_id}");
    name.chars().take(64).collect()
}

/// The workflow job id a runner named by [`runner_name`] was recorded for; `None` for runners
/// Pacer did not name (GitHub-hosted, other installations, people's own).
pub fn job_id_of_runner(controller_id: &str, runner: &str) -> Option<i64> {
    let rest = runner.strip_prefix("pacer-")?.strip_prefix(controller_id)?;
    rest.strip_prefix('-')?.parse().ok().filter(|id| *id > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_names_lead_back_to_their_job_and_nothing_else_does() {
        let name = runner_name("prod-eu", 289782451);
        assert_eq!(name, "pacer-prod-eu-289782451");
        assert_eq!(job_id_of_runner("prod-eu", &name), Some(289782451));
        assert_eq!(job_id_of_runner("prod", &name), None);
        assert_eq!(job_id_of_runner("prod-eu", "GitHub Actions 5"), None);
        assert_eq!(job_id_of_runner("prod-eu", "pacer-prod-eu-x"), None);
        assert_eq!(job_object_name(289782451), "gh-job-289782451");
    }
}
