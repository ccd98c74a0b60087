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

/// Runs `term()` while this replica holds the lease, a fresh one for each term, and drops it
/// the moment the lease is lost. Returns when a term ends on its own (shutdown).
pub async fn lead<F, Fut>(
    client: kube::Client,
    election: &Election,
    mut term: F,
) -> Result<(), LeaseManagerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let leases: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
    let manager = LeaseManagerBuilder::new(client, &election.lease)
        .with_namespace(&election.namespace)
        .with_identity(&election.identity)
        .with_duration(election.duration)
        .with_grace(election.grace)
        .build()
        .await?;
    let (mut leading, _renewing) = manager.watch().await;
    let deadline = SignedDuration::from_secs(election.duration as i64)
        - SignedDuration::from_millis(election.grace as i64 * 500);
    loop {
        while !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                warn!("leader election stopped");
                return Ok(());
            }
        }
        // The manager says this replica holds the lease; a term starts only once the Lease
        // itself confirms a renewal of ours fresh enough to lead on (after a step-down the
        // manager may still say so while the API server is out of reach).
        let mut renewed = match confirmed(&leases, election, &mut leading, deadline).await {
            Some(at) => at,
            None => continue,
        };
        info!(lease = %election.lease, identity = %election.identity, "leading: controllers start");
        let lost = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    changed = leading.changed() => {
                        if changed.is_err() || !*leading.borrow_and_update() {
                            return;
                        }
                    }
                    _ = tick.tick() => {
                        if let Some(at) = own_renewal(&leases, election).await {
                            renewed = renewed.max(at);
                        }
                        if Timestamp::now() >= renewed + deadline {
                            warn!(lease = %election.lease, "could not confirm the lease in time: stepping down");
                            return;
                        }
                    }
                }
            }
        };
        tokio::select! {
            () = term() => return Ok(()),
            () = lost => warn!(lease = %election.lease, "lost the lease: controllers stopped"),
        }
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
/// be read or another replica holds it.
async fn own_renewal(leases: &Api<Lease>, election: &Election) -> Option<Timestamp> {
    let lease = leases.get(&election.lease).await.ok()?;
    let spec = lease.spec?;
    if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
        return None;
    }
    spec.renew_time.or(spec.acquire_time).map(|t| t.0)
}
