//! The API server's own count of the requests it served: `apiserver_request_total` from its
//! `/metrics`, by resource, subresource, verb, scope and code, and the difference between two
//! readings.
//!
//! The metric names no client. What tells them apart in these benches: the bench's clients
//! only create RunnerJobs (POST) and read them, when they do, outside the measured windows;
//! kube-controller-manager lists and watches every resource cluster-wide (scope `cluster`),
//! while Pacer's clients are scoped to the bench's namespace. So Pacer's RunnerJob writes are
//! the PATCH, APPLY, PUT and DELETE requests, and its reads the namespaced GET, LIST and WATCH.
//! A WATCH is counted when it ends, not when it starts.

use std::collections::BTreeMap;

/// The verbs that change an object, as the metric spells them; POST is left out, being the
/// bench's creation of RunnerJobs.
pub const CHANGES: &[&str] = &["PATCH", "APPLY", "PUT", "DELETE", "DELETECOLLECTION"];
pub const READS: &[&str] = &["GET", "LIST", "WATCH", "WATCHLIST"];

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub resource: String,
    pub subresource: String,
    pub verb: String,
    pub scope: String,
    pub code: String,
}

/// Requests served, by [`Key`], and watches the API server closed on a client that kept up
/// too slowly (`apiserver_terminated_watchers_total`), by resource.
#[derive(Clone, Debug, Default)]
pub struct Requests {
    served: BTreeMap<Key, u64>,
    watches_closed: BTreeMap<String, u64>,
}

/// The labels of one sample line of `metric`, and its value.
fn sample<'a>(line: &'a str, metric: &str) -> Option<(&'a str, u64)> {
    let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    Some((labels, value.trim().parse::<f64>().ok()? as u64))
}

/// The value of label `name` in `labels` (`a="x",b="y"`).
fn label(labels: &str, name: &str) -> String {
    let start = format!("{name}=\"");
    (labels.split("\","))
        .find_map(|pair| pair.strip_prefix(&start))
        .map(|v| v.trim_end_matches('"').to_string())
        .unwrap_or_default()
}

impl Requests {
    /// Reads the API server's `/metrics` through `client`, which must be allowed to.
    pub async fn read(client: &kube::Client) -> Self {
        let request = axum::http::Request::get("/metrics").body(vec![]).unwrap();
        Self::parse(&client.request_text(request).await.unwrap())
    }

    pub fn parse(text: &str) -> Self {
        let mut requests = Self::default();
        for line in text.lines() {
            if let Some((labels, n)) = sample(line, "apiserver_request_total") {
                let key = Key {
                    resource: label(labels, "resource"),
                    subresource: label(labels, "subresource"),
                    verb: label(labels, "verb"),
                    scope: label(labels, "scope"),
                    code: label(labels, "code"),
                };
                *requests.served.entry(key).or_insert(0) += n;
            } else if let Some((labels, n)) = sample(line, "apiserver_terminated_watchers_total") {
                *(requests.watches_closed)
                    .entry(label(labels, "resource"))
                    .or_insert(0) += n;
            }
        }
        requests
    }

    /// What was served between `before` and this reading.
    pub fn since(&self, before: &Requests) -> Requests {
        fn less<K: Ord + Clone>(
            after: &BTreeMap<K, u64>,
            before: &BTreeMap<K, u64>,
        ) -> BTreeMap<K, u64> {
            (after.iter())
                .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect()
        }
        Self {
            served: less(&self.served, &before.served),
            watches_closed: less(&self.watches_closed, &before.watches_closed),
        }
    }

    /// Watches on `resource` the API server closed because their client fell behind.
    pub fn watches_closed(&self, resource: &str) -> u64 {
        self.watches_closed.get(resource).copied().unwrap_or(0)
    }

    /// Requests on `resource` (any subresource) with one of `verbs`; reads only in a namespace,
    /// which leaves out kube-controller-manager's cluster-wide lists and watches.
    pub fn count(&self, resource: &str, verbs: &[&str]) -> u64 {
        (self.served.iter())
            .filter(|(k, _)| k.resource == resource && verbs.contains(&k.verb.as_str()))
            .filter(|(k, _)| !READS.contains(&k.verb.as_str()) || k.scope != "cluster")
            .map(|(_, n)| n)
            .sum()
    }

    /// Pacer's writes to `resource`: see the module's note.
    pub fn changes(&self, resource: &str) -> u64 {
        self.count(resource, CHANGES)
    }

    /// Those of [`Requests::changes`] refused with 409 Conflict: written from an object older
    /// than the stored one, so nothing was stored.
    pub fn conflicts(&self, resource: &str) -> u64 {
        (self.served.iter())
            .filter(|(k, _)| k.resource == resource && k.code == "409")
            .filter(|(k, _)| CHANGES.contains(&k.verb.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn reads(&self, resource: &str) -> u64 {
        self.count(resource, READS)
    }

    /// Every write to Events, POST included: the bench writes none.
    pub fn event_writes(&self) -> u64 {
        self.count("events", &["POST"]) + self.changes("events")
    }

    /// One line per resource, subresource, verb, scope and code for `resources`, e.g.
    /// `runnerjobs/status PATCH (resource, 200): 500`.
    pub fn lines(&self, resources: &[&str]) -> Vec<String> {
        (self.served.iter())
            .filter(|(k, _)| resources.contains(&k.resource.as_str()))
            .map(|(k, n)| {
                let sub = if k.subresource.is_empty() {
                    String::new()
                } else {
                    format!("/{}", k.subresource)
                };
                format!(
                    "{}{sub} {} ({}, {}): {n}",
                    k.resource, k.verb, k.scope, k.code
                )
            })
            .collect()
    }

    /// The writes to `resources` by verb and subresource, e.g.
    /// `runnerjobs/status PATCH 500, events POST 1000`; "none" when there were none.
    pub fn writes_by_kind(&self, resources: &[&str]) -> String {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        for (k, n) in &self.served {
            let write =
                CHANGES.contains(&k.verb.as_str()) || (k.verb == "POST" && k.resource == "events");
            if write && resources.contains(&k.resource.as_str()) {
                let sub = if k.subresource.is_empty() {
                    String::new()
                } else {
                    format!("/{}", k.subresource)
                };
                *by.entry(format!("{}{sub} {}", k.resource, k.verb))
                    .or_default() += n;
            }
        }
        if by.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = by.iter().map(|(k, n)| format!("{k} {n}")).collect();
        parts.join(", ")
    }
}
