//! Leader election against a real API server: one replica leads at a time, and when it goes
//! another takes over.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pacer::controller::leader::{Election, lead, lease_client};
use support::{Parts, ground};

/// Counts leaders while a term runs.
struct Leading(Arc<AtomicUsize>);

/// Who led, in order, how many lead now, and the most that ever led at once.
#[derive(Clone, Default)]
struct Terms {
    leaders: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    who: Arc<Mutex<Vec<String>>>,
}

impl Terms {
    /// Runs replica `name` of the election on `lease` in `ns` (4 s leases, renewed 2 s
    /// ahead); each of its terms counts as leading until the lease is lost.
    fn replica(
        &self,
        client: kube::Client,
        ns: &str,
        lease: &str,
        name: &str,
    ) -> tokio::task::JoinHandle<()> {
        let mut election = Election::new(ns, lease, name);
        (election.duration, election.grace) = (4, 2);
        let (terms, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let (_keep, running) = tokio::sync::watch::channel(false);
            let term = || {
                let now = terms.leaders.fetch_add(1, Ordering::SeqCst) + 1;
                terms.most.fetch_max(now, Ordering::SeqCst);
                terms.who.lock().unwrap().push(name.clone());
                let guard = Leading(terms.leaders.clone());
                async move {
                    let _guard = guard;
                    std::future::pending::<()>().await
                }
            };
            let _ = lead(client, &election, term, running).await;
        })
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn one_replica_leads_at_a_time_and_another_takes_over_when_it_goes() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "leader").await;
    let terms = Terms::default();
    let (leaders, most, who) = (&terms.leaders, &terms.most, &terms.who);
    let a = terms.replica(client.clone(), &ns, "leader-test", "replica-a");
    let b = terms.replica(client.clone(), &ns, "leader-test", "replica-b");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while leaders.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // For a few lease periods, never more than one leads.
    for _ in 0..40 {
        assert!(leaders.load(Ordering::SeqCst) <= 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The one leading now goes (on a loaded machine it may have stepped down and led again
    // meanwhile: a new term of its own, never two leaders).
    let current = who.lock().unwrap().last().unwrap().clone();
    let (leader, other) = if current == "replica-a" {
        (a, b)
    } else {
        (b, a)
    };
    leader.abort();
    let started = tokio::time::Instant::now();
    while who.lock().unwrap().last() == Some(&current) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no takeover within the lease duration"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two leaders at once");
    other.abort();
}

/// Replica A reaches the API server through `relay`; replica B directly. Once A leads, the
/// relay stops passing bytes: A's reads and renewals hang unanswered.
#[tokio::test]
async fn a_leader_whose_api_server_stops_answering_steps_down_before_another_takes_over() {
    let ground = ground(Parts::Kube);
    let client = ground.kube_client().await;
    let ns = ground.namespace(&client, "stalled-leader").await;
    let config = ground.kube_config().await;
    let upstream = format!(
        "{}:{}",
        config.cluster_url.host().unwrap(),
        config.cluster_url.port_u16().unwrap()
    );
    let relay = support::relay::Relay::start(upstream.parse().unwrap()).await;
    let mut through_relay = config.clone();
    through_relay.cluster_url = format!("https://{}", relay.addr).parse().unwrap();
    let terms = Terms::default();
    let (leaders, most, who) = (&terms.leaders, &terms.most, &terms.who);
    let lease = "stalled-test";
    let a = terms.replica(
        lease_client(through_relay).unwrap(),
        &ns,
        lease,
        "replica-a",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while leaders.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica-a never led"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = terms.replica(lease_client(config).unwrap(), &ns, lease, "replica-b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(*who.lock().unwrap(), ["replica-a"]);

    relay.freeze();
    let frozen = tokio::time::Instant::now();
    while who.lock().unwrap().len() < 2 {
        assert!(
            frozen.elapsed() < Duration::from_secs(20),
            "replica-b never took over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(who.lock().unwrap()[1], "replica-b");
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "replica-a still led when replica-b took the lease"
    );
    a.abort();
    b.abort();
}
