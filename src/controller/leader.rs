//! Leader election on a `coordination.k8s.io/v1` Lease, with kube-lease-manager (maintained,
//! on kube 5 and k8s-openapi 0.29, server-side apply on the Lease, leadership as a watch
//! channel). Only the leader runs the reconcilers, the garbage collector and the GitHub sweep;
//! every replica serves HTTP, whose handlers are idempotent writes to the API server.
//!
//! Renewal rules: the lease lasts `duration`; the holder renews it `grace` before it expires;
//! another replica may take it only once it has expired. kube-lease-manager reports a lost
//! lease when it sees one, but while the API server is unreachable it sees nothing: so the
//! leader also reads the Lease every second and steps down (drops its work at once) when the
//! newest renewal it has seen of its own is `duration - grace / 2` old, before the lease can
//! expire and be taken. No moment has two leaders, given clocks within `grace / 2`.
//!
//! The Lease is read and renewed on a client of its own ([`lease_client`]), never queued
//! behind the reconcilers' and the listener's requests, and every read has a deadline: a
//! check that cannot be answered in time counts as a renewal not seen, so a leader whose API
//! server is slow or out of reach steps down before another replica may take the lease.

use std::future::Future;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tracing::{info, warn};

/// Where and how replicas elect their leader.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    /// The Lease's name: one per controller id.
    pub lease: String,
    /// This replica, as the Lease's holder shows it.
    pub identity: String,
    /// Seconds a lease lasts without renewal (15 by default).
    pub duration: u64,
    /// Seconds before expiry the holder renews (5 by default).
    pub grace: u64,
}

impl Election {
    pub fn new(namespace: &str, controller_id: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            lease: format!("pacer-{controller_id}"),
            identity: identity.into(),
            duration: 15,
            grace: 5,
        }
    }
}

/// Longest one read of the Lease may take: the step-down check runs every second.
const READ_TIMEOUT: Duration = Duration::from_millis(800);

/// The client leader election uses: its own connections, no queue shared with the
/// controllers, and deadlines on connecting and reading.
pub fn lease_client(mut config: kube::Config) -> kube::Result<kube::Client> {
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(2));
    config.write_timeout = Some(Duration::from_secs(2));
    kube::Client::try_from(config)
}

/// Longest a term may take to finish its in-flight work after shutdown is asked for.
pub const DRAIN: Duration = Duration::from_secs(20);

/// Runs `term()` while this replica holds the lease, a fresh one for each term, and drops it
/// the moment the lease is lost.
///
/// When `shutdown` turns true: a follower gives up at once; a leader lets its term finish (the
/// controllers stop taking work on SIGTERM and finish what they started) for at most [`DRAIN`],
/// then releases the lease, so that another replica takes over without waiting for it to
/// expire. A follower takes a released lease within half a second (the manager alone would
/// look again only when the old lease would have expired).
pub async fn lead<F, Fut>(
    client: kube::Client,
    election: &Election,
    mut term: F,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), LeaseManagerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let leases: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
    let deadline = election.step_down_after();
    let mut manager = Manager::start(&client, election).await?;
    loop {
        manager = match follow(manager, &client, election, &leases, &mut shutdown).await? {
            Some(manager) => manager,
            None => return Ok(()),
        };
        // The manager says this replica holds the lease; a term starts only once the Lease
        // itself confirms a renewal of ours fresh enough to lead on (after a step-down the
        // manager may still say so while the API server is out of reach).
        let Some(renewed) = confirmed(&leases, election, &mut manager.leading, deadline).await
        else {
            continue;
        };
        info!(lease = %election.lease, identity = %election.identity, "leading: controllers start");
        tokio::select! {
            () = term() => {}
            () = drained(&mut shutdown) => {}
            () = held(&leases, election, &mut manager.leading, renewed, deadline) => {
                warn!(lease = %election.lease, "lost the lease: controllers stopped");
                continue;
            }
        }
        // Shutting down: hand the lease over now rather than let it expire.
        manager.release(election).await;
        return Ok(());
    }
}

impl Election {
    /// How old the newest renewal of ours seen may be before the leader steps down:
    /// `duration - grace / 2`.
    fn step_down_after(&self) -> SignedDuration {
        SignedDuration::from_secs(self.duration as i64)
            - SignedDuration::from_millis(self.grace as i64 * 500)
    }
}

/// kube-lease-manager at work: whether it holds the lease, and its task, which stops (and
/// releases the lease if it holds it) once `leading` is dropped.
struct Manager {
    leading: tokio::sync::watch::Receiver<bool>,
    renewing: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

impl Manager {
    async fn start(client: &kube::Client, election: &Election) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client.clone(), &election.lease)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(election.duration)
            .with_grace(election.grace)
            .build()
            .await?;
        let (leading, renewing) = manager.watch().await;
        Ok(Self { leading, renewing })
    }

    /// Stops the manager and waits for it.
    async fn stop(self) {
        drop(self.leading);
        let _ = self.renewing.await;
    }

    /// Stops the manager, which releases the lease, waiting for it a few seconds at most.
    async fn release(self, election: &Election) {
        drop(self.leading);
        match tokio::time::timeout(Duration::from_secs(5), self.renewing).await {
            Ok(Ok(Ok(_))) => info!(lease = %election.lease, "released the lease"),
            _ => {
                warn!(lease = %election.lease, "could not release the lease; it expires on its own")
            }
        }
    }
}

/// Waits while another replica holds the lease, and returns the manager once the manager says
/// it is this replica's; `None` when election stops or shutdown is asked for. A lease its
/// holder released is taken at once, by a manager started afresh.
async fn follow(
    mut manager: Manager,
    client: &kube::Client,
    election: &Election,
    leases: &Api<Lease>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<Manager>, LeaseManagerError> {
    while !*manager.leading.borrow_and_update() {
        tokio::select! {
            changed = manager.leading.changed() => {
                if changed.is_err() {
                    warn!("leader election stopped");
                    return Ok(None);
                }
            }
            () = stopped(shutdown) => {
                manager.stop().await;
                return Ok(None);
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                if released(leases, election).await {
                    manager.stop().await;
                    manager = Manager::start(client, election).await?;
                }
            }
        }
    }
    Ok(Some(manager))
}

/// Returns when the lease may no longer be this replica's: the manager says so, or no renewal
/// of ours younger than `deadline` could be read in time. The step-down comes on time whatever
/// the API server does: no read outlasts it.
async fn held(
    leases: &Api<Lease>,
    election: &Election,
    leading: &mut tokio::sync::watch::Receiver<bool>,
    mut renewed: Timestamp,
    deadline: SignedDuration,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let left = Duration::try_from(Timestamp::now().duration_until(renewed + deadline))
            .unwrap_or_default();
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() || !*leading.borrow_and_update() {
                    return;
                }
            }
            () = tokio::time::sleep(left) => {
                warn!(lease = %election.lease, "could not confirm the lease in time: stepping down");
                return;
            }
            _ = tick.tick() => {
                let read = tokio::time::timeout(left, own_renewal(leases, election));
                if let Ok(Some(at)) = read.await {
                    renewed = renewed.max(at);
                }
            }
        }
    }
}

/// Returns [`DRAIN`] after shutdown is asked for: the term had that long to finish.
async fn drained(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    stopped(shutdown).await;
    tokio::time::sleep(DRAIN).await;
    warn!(drain = ?DRAIN, "the controllers did not finish in time; leaving anyway");
}

/// Returns once shutdown is asked for (never, if the sender is gone without asking).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Whether the Lease has no holder: its holder released it.
async fn released(leases: &Api<Lease>, election: &Election) -> bool {
    match tokio::time::timeout(READ_TIMEOUT, leases.get_opt(&election.lease)).await {
        Ok(Ok(Some(lease))) => lease
            .spec
            .and_then(|s| s.holder_identity)
            .is_none_or(|holder| holder.is_empty()),
        _ => false,
    }
}

/// Waits until the Lease shows a renewal of ours younger than `deadline`, and returns it;
/// `None` as soon as the manager says the lease is not ours.
async fn confirmed(
    leases: &Api<Lease>,
    election: &Election,
    leading: &mut tokio::sync::watch::Receiver<bool>,
    deadline: SignedDuration,
) -> Option<Timestamp> {
    loop {
        if !*leading.borrow_and_update() {
            return None;
        }
        if let Some(at) = own_renewal(leases, election).await
            && Timestamp::now() < at + deadline
        {
            return Some(at);
        }
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// When this replica last renewed the lease, as the API server has it; `None` when it cannot
/// be read within [`READ_TIMEOUT`] or another replica holds it.
async fn own_renewal(leases: &Api<Lease>, election: &Election) -> Option<Timestamp> {
    let read = tokio::time::timeout(READ_TIMEOUT, leases.get(&election.lease));
    let lease = read.await.ok()?.ok()?;
    let spec = lease.spec?;
    if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
        return None;
    }
    spec.renew_time.or(spec.acquire_time).map(|t| t.0)
}
