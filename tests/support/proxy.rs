//! The control side of the AWS proxy: inject faults, read what was called.

use serde_json::{Value, json};

pub struct Proxy {
    base: String,
    http: reqwest::Client,
}

/// One AWS call the proxy saw.
#[derive(Debug, serde::Deserialize)]
pub struct Call {
    pub seq: u64,
    pub service: String,
    pub action: String,
    pub params: Value,
    pub status: u16,
    /// Answered from the proxy's ClientToken record, as EC2 replays an idempotent launch.
    #[serde(default)]
    pub replayed: bool,
    /// The caller's app name (`app/<name>` in its User-Agent).
    #[serde(default)]
    pub agent: String,
    /// The tags, as created, of each instance or launch template the call names.
    #[serde(default)]
    pub resource_tags: std::collections::HashMap<String, std::collections::HashMap<String, String>>,
}

impl Proxy {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// Makes the next `count` calls of `action` fail with `code` and HTTP `status` (-1: all).
    pub async fn fail(&self, action: &str, code: &str, status: u16, count: i32) {
        self.add_fault(json!({"action": action, "code": code, "status": status, "count": count}))
            .await;
    }

    /// Adds a fault as the proxy takes it (see hack/aws-proxy.py).
    pub async fn add_fault(&self, fault: Value) {
        let resp = self
            .http
            .post(format!("{}/_proxy/faults", self.base))
            .json(&fault)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "proxy refused fault {fault}");
    }

    /// Makes the proxy answer spot price history for these types from `prices`:
    /// `{"instance type": {"zone": "price"}}`.
    pub async fn set_spot_prices(&self, prices: Value) {
        let resp = self
            .http
            .post(format!("{}/_proxy/spot-prices", self.base))
            .json(&prices)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "proxy refused {prices}");
    }

    /// Makes DescribeInstances leave out instances launched less than `seconds` ago whose tag
    /// values contain `matching`, as EC2's eventually consistent listing does (moto lists
    /// them at once).
    pub async fn describe_lag(&self, seconds: f64, matching: &str) {
        let resp = self
            .http
            .post(format!("{}/_proxy/describe-lag", self.base))
            .json(&json!({ "seconds": seconds, "match": matching }))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }

    /// From now on EC2's listing gives `instance` the state reason of a spot interruption.
    pub async fn spot_reclaimed(&self, instance: &str) {
        let resp = self
            .http
            .post(format!("{}/_proxy/spot-reclaimed", self.base))
            .json(&json!({ "instance": instance }))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }

    /// How many instances the describe lag has left out of listings so far.
    pub async fn hidden_by_lag(&self) -> u64 {
        let answer: serde_json::Value = self
            .http
            .get(format!("{}/_proxy/describe-lag", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["hidden"].as_u64().unwrap()
    }

    pub async fn clear_faults(&self) {
        self.http
            .delete(format!("{}/_proxy/faults", self.base))
            .send()
            .await
            .unwrap();
    }

    pub async fn calls(&self) -> Vec<Call> {
        self.http
            .get(format!("{}/_proxy/calls", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Calls of one action whose parameters contain `needle` somewhere.
    pub async fn calls_of(&self, action: &str, needle: &str) -> Vec<Call> {
        self.calls()
            .await
            .into_iter()
            .filter(|c| c.action == action && c.params.to_string().contains(needle))
            .collect()
    }
}
