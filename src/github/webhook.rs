//! GitHub webhooks: the `X-Hub-Signature-256` check over the raw body, and the parts of the
//! `workflow_job` payload Pacer reads (GitHub documents the full payload; octokit's examples
//! are the test fixtures).

use hmac::{Hmac, KeyInit as _, Mac as _};
use serde::Deserialize;
use sha2::Sha256;

/// Whether `signature` (the `X-Hub-Signature-256` header: `sha256=` and the lowercase hex
/// HMAC-SHA256 of the body) was made over `body` with one of `secrets` (the current one and,
/// while it is rotated, the previous one). The comparison is constant-time.
pub fn verify(secrets: &[&[u8]], signature: Option<&[u8]>, body: &[u8]) -> bool {
    let Some(expected) = signature
        .and_then(|s| s.strip_prefix(b"sha256="))
        .and_then(decode_hex)
    else {
        return false;
    };
    secrets.iter().filter(|s| !s.is_empty()).any(|secret| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

/// The header value GitHub would send for `body` signed with `secret`: only the test ground
/// signs deliveries.
#[cfg(any(test, feature = "testing"))]
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn decode_hex(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    text.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// A `workflow_job` delivery.
#[derive(Clone, Debug, Deserialize)]
pub struct WorkflowJobEvent {
    /// `queued`, `waiting`, `in_progress` or `completed`.
    pub action: String,
    pub workflow_job: WorkflowJob,
    pub repository: Repository,
    /// Present when the App's webhook delivered it; absent for repository or organization
    /// webhooks.
    #[serde(default)]
    pub installation: Option<Installation>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct WorkflowJob {
    pub id: i64,
    pub run_id: i64,
    /// `queued`, `waiting`, `in_progress` or `completed`. A `queued` action may carry
    /// `waiting` while an environment's approval holds the job.
    pub status: String,
    #[serde(default)]
    pub labels: Vec<String>,
    /// The runner that took the job, once one did.
    #[serde(default)]
    pub runner_name: Option<String>,
    /// The id of that runner.
    #[serde(default)]
    pub runner_id: Option<i64>,
    /// `success`, `failure`, `cancelled`, `skipped`, `timed_out`, ... once completed.
    #[serde(default)]
    pub conclusion: Option<String>,
    /// When the job was created (RFC 3339): a `queued` delivery is sent then.
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Repository {
    pub name: String,
    /// `owner/name`.
    pub full_name: String,
    pub owner: Owner,
}

impl Repository {
    /// The owner as `full_name` spells it, the form RunnerJobs record.
    pub fn owner(&self) -> &str {
        self.full_name
            .split_once('/')
            .map_or(self.owner.login.as_str(), |(owner, _)| owner)
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Owner {
    pub login: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Installation {
    pub id: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_its_secret_over_the_same_bytes() {
        let body = br#"{"action":"queued"}"#;
        let header = sign(b"current", body);
        assert!(header.starts_with("sha256=") && header.len() == 71);
        let ok = |secrets: &[&[u8]], sig: Option<&str>, body: &[u8]| {
            verify(secrets, sig.map(str::as_bytes), body)
        };
        assert!(ok(&[b"current"], Some(&header), body));
        // While the secret is rotated, the previous one is still accepted.
        assert!(ok(&[b"next", b"current"], Some(&header), body));
        assert!(!ok(&[b"other"], Some(&header), body));
        assert!(!ok(
            &[b"current"],
            Some(&header),
            br#"{"action":"queued" }"#
        ));
        assert!(!ok(&[b"current"], None, body));
        assert!(!ok(&[b"current"], Some(&header.to_uppercase()), body));
        assert!(!ok(
            &[b"current"],
            Some(&header.replace("sha256=", "sha1=")),
            body
        ));
        assert!(!ok(&[b"current"], Some(&header[..70]), body));
        assert!(
            !ok(&[b""], Some(&sign(b"", body)), body),
            "an empty secret is no secret"
        );
    }

    #[test]
    fn github_documents_this_signature() {
        // The example from GitHub's "Validating webhook deliveries" page.
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }
}
