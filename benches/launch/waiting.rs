//! A full pool with many jobs waiting for room: `maxRunners` jobs launched and Booting (the
//! fake EC2 never boots a runner, so they stay there, well within the boot timeout) and
//! `waiting` more Pending. Once the controller has settled, the API server's own request
//! counts over a window say what Pacer writes while nothing changes: the waiting jobs are
//! looked at again every 10 s (the capacity recheck) and the Booting ones polled as often,
//! so a window of a minute holds about six passes over each job.

use std::time::{Duration, Instant};

use kube::api::Api;
use pacer::api::{JobPhase, RunnerJob};
use pacer::domain::job::holds_slot;

use crate::apiserver::Requests;

/// The resources whose writes are counted as Pacer's.
pub const WRITTEN: &[&str] = &["runnerjobs", "runnerpools", "events"];

pub struct Figures {
    pub waiting: usize,
    pub max: usize,
    /// From the first creation until no write was seen for a while (or the cap).
    pub settle: Duration,
    /// Requests from before the creations until settled: the launches, and whatever a job
    /// writes on learning that it has to wait.
    pub settling: Requests,
    /// What the list taken once settled showed.
    pub booting: usize,
    pub pending: usize,
    pub window: Duration,
    /// Requests over the window.
    pub steady: Requests,
}

impl Figures {
    pub fn writes(requests: &Requests) -> u64 {
        WRITTEN.iter().map(|r| requests.changes(r)).sum::<u64>()
            + requests.count("events", &["POST"])
    }

    pub fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.window.as_secs_f64()
    }
}

/// Fills a pool of `max` slots and queues `waiting` more jobs behind it, waits for the
/// controller to settle, then counts the API server's requests over `window`.
pub async fn run(waiting: usize, max: usize, window: Duration, latency: Duration) -> Figures {
    let crate::SmallPool {
        ground: g,
        client,
        ns,
        fake,
        jobs: api,
        controllers,
    } = crate::small_pool("bench-waiting", max, latency).await;

    let before = Requests::read(&client).await;
    let started = Instant::now();
    let creator = kube::Client::try_from(g.kube_config().await).unwrap();
    crate::create_jobs(&Api::namespaced(creator, &ns), &ns, 0..max + waiting).await;
    // Settled: the pool's slots launched, then no write for 10 s (readings 2 s apart).
    let cap = Instant::now() + Duration::from_secs(300);
    while fake.launched() < max && Instant::now() < cap {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut last, mut quiet) = (Figures::writes(&Requests::read(&client).await), 0);
    while quiet < 5 && Instant::now() < cap {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = Figures::writes(&Requests::read(&client).await);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    let settle = started.elapsed();
    // The bench's own look, before the window opens.
    let list = api.list(&Default::default()).await.unwrap().items;
    let phase = |j: &RunnerJob| j.status.as_ref().map(|s| s.phase).unwrap_or_default();
    let booting = list
        .iter()
        .filter(|j| phase(j) == JobPhase::Booting)
        .count();
    let pending = (list.iter())
        .filter(|j| phase(j) == JobPhase::Pending && !holds_slot(j.status.as_ref()))
        .count();
    let settled = Requests::read(&client).await;
    let opened = Instant::now();
    tokio::time::sleep(window).await;
    let after = Requests::read(&client).await;
    let window = opened.elapsed();
    controllers.abort();
    let _ = controllers.await;
    Figures {
        waiting,
        max,
        settle,
        settling: settled.since(&before),
        booting,
        pending,
        window,
        steady: after.since(&settled),
    }
}
