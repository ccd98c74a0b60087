//! Callback tokens: what a bootstrapped instance shows on `register`, `complete` and `error`.
//!
//! A token names its RunnerJob (namespace and name, to find it) and is an HMAC-SHA256, under a
//! key only Pacer holds, over the job's uid, the instance id, the purpose and the expiry. The
//! RunnerJob keeps only the token's SHA-256, so the status leaks nothing that would pass.
//!
//! The same key, through a key of its own derived from it, seals a bootstrap's answer (the
//! runner's JIT config and the callback token) while it waits in the RunnerJob's status for its
//! instance: AES-256-GCM, bound to the RunnerJob's uid and the instance, so only Pacer can open
//! it and only for that job and instance.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::Secret;

/// What every callback token is for.
pub const PURPOSE: &str = "runner-callback";
/// The shortest callback key accepted.
pub const MIN_KEY_BYTES: usize = 32;
const VERSION: &str = "v1";
/// What the key sealing bootstrap answers is derived for.
const SEALING: &[u8] = b"bootstrap-answer\n";

/// What a warm instance's preparation token is for.
pub const WARM_PURPOSE: &str = "warm-preparation";
const WARM_VERSION: &str = "w1";

/// What a warm instance's preparation token says: the pool it prepares for, the instance, and
/// the actions/runner release it was given. Only its MAC makes it true.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmClaims {
    pub namespace: String,
    pub pool: String,
    pub instance: String,
    pub runner_version: String,
    /// Seconds since the Unix epoch.
    pub expires: i64,
}

/// What a token says. Only its MAC makes it true.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub instance: String,
    /// Seconds since the Unix epoch.
    pub expires: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the callback token is malformed")]
    Malformed,
    #[error("the callback token is not ours")]
    Forged,
    #[error("the callback token has expired")]
    Expired,
}

/// Mints and checks callback tokens under one key.
#[derive(Clone)]
pub struct Tokens {
    key: Secret,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens([redacted])")
    }
}

impl Tokens {
    pub fn new(key: Secret) -> Result<Self, String> {
        if key.expose().len() < MIN_KEY_BYTES {
            return Err(format!(
                "the callback key has {} bytes; at least {MIN_KEY_BYTES} are required (for example `openssl rand -hex 32`)",
                key.expose().len()
            ));
        }
        Ok(Self { key })
    }

    fn mac(&self, purpose: &str, claims: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.key.expose()).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        mac.update(b"\n");
        mac.update(claims);
        mac
    }

    /// A token for `claims`: `v1.<claims>.<mac>`, base64url.
    pub fn mint(&self, claims: &Claims) -> Secret {
        self.mint_as(VERSION, PURPOSE, claims)
    }

    /// The claims of a token this key minted and that has not expired at `now`. The MAC is
    /// compared in constant time.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let claims: Claims = self.verify_as(VERSION, PURPOSE, token)?;
        if claims.expires <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// A warm instance's token for its preparation: `w1.<claims>.<mac>`, under a purpose of its
    /// own, so it never passes as a job's token, nor a job's as it.
    pub fn mint_warm(&self, claims: &WarmClaims) -> Secret {
        self.mint_as(WARM_VERSION, WARM_PURPOSE, claims)
    }

    /// The claims of a warm instance's token this key minted and that has not expired at `now`.
    pub fn verify_warm(&self, token: &str, now: i64) -> Result<WarmClaims, TokenError> {
        let claims: WarmClaims = self.verify_as(WARM_VERSION, WARM_PURPOSE, token)?;
        if claims.expires <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    fn mint_as(&self, version: &str, purpose: &str, claims: &impl Serialize) -> Secret {
        let body = serde_json::to_vec(claims).expect("claims serialize");
        let tag = self.mac(purpose, &body).finalize().into_bytes();
        Secret::new(format!(
            "{version}.{}.{}",
            B64.encode(&body),
            B64.encode(tag)
        ))
    }

    fn verify_as<T: serde::de::DeserializeOwned>(
        &self,
        version: &str,
        purpose: &str,
        token: &str,
    ) -> Result<T, TokenError> {
        let mut parts = token.split('.');
        let (Some(v), Some(body), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if v != version {
            return Err(TokenError::Malformed);
        }
        let body = B64.decode(body).map_err(|_| TokenError::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
        self.mac(purpose, &body)
            .verify_slice(&tag)
            .map_err(|_| TokenError::Forged)?;
        serde_json::from_slice(&body).map_err(|_| TokenError::Malformed)
    }
}

impl Tokens {
    fn sealing_key(&self) -> aws_lc_rs::aead::LessSafeKey {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.key.expose()).expect("HMAC takes any key length");
        mac.update(SEALING);
        let key = mac.finalize().into_bytes();
        let key = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &key)
            .expect("a 32-byte key");
        aws_lc_rs::aead::LessSafeKey::new(key)
    }

    /// `secret` sealed for `context` (what it is bound to): `v1.<nonce and ciphertext>`,
    /// base64url; `None` when the system's random source gives no nonce.
    pub fn seal(&self, context: &str, secret: &[u8]) -> Option<String> {
        use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut sealed = secret.to_vec();
        (self.sealing_key())
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut sealed,
            )
            .expect("AES-GCM seals any length Pacer sends");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Some(format!("{VERSION}.{}", B64.encode(out)))
    }

    /// What [`Tokens::seal`] sealed for `context` under this key; `None` for anything else.
    pub fn open(&self, context: &str, sealed: &str) -> Option<Vec<u8>> {
        use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
        let bytes = B64
            .decode(sealed.strip_prefix(VERSION)?.strip_prefix('.')?)
            .ok()?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = ciphertext.to_vec();
        let opened = (self.sealing_key())
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buffer)
            .ok()?;
        Some(opened.to_vec())
    }
}

/// What a RunnerJob keeps of its token: the SHA-256, hex.
pub fn fingerprint(token: &[u8]) -> String {
    Sha256::digest(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `token` is the one whose fingerprint was kept, compared in constant time.
pub fn matches(token: &[u8], kept: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let ours = fingerprint(token);
    ours.len() == kept.len() && bool::from(ours.as_bytes().ct_eq(kept.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(key: &str) -> Tokens {
        Tokens::new(Secret::new(key.repeat(32))).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            namespace: "ci".into(),
            name: "gh-job-1".into(),
            uid: "0b7e".into(),
            instance: "i-0123".into(),
            expires: 1_000,
        }
    }

    #[test]
    fn a_token_verifies_under_its_key_until_it_expires() {
        let t = tokens("k");
        let token = t.mint(&claims());
        let text = std::str::from_utf8(token.expose()).unwrap();
        assert_eq!(t.verify(text, 999), Ok(claims()));
        assert_eq!(t.verify(text, 1_000), Err(TokenError::Expired));
        assert_eq!(tokens("j").verify(text, 0), Err(TokenError::Forged));
        assert!(matches(token.expose(), &fingerprint(token.expose())));
        assert!(!matches(b"v1.x.y", &fingerprint(token.expose())));
    }

    #[test]
    fn a_warm_token_and_a_jobs_never_pass_for_each_other() {
        let tokens = tokens("0123456789abcdef0123456789abcdef");
        let warm = WarmClaims {
            namespace: "ci".into(),
            pool: "linux".into(),
            instance: "i-1".into(),
            runner_version: "2.330.0".into(),
            expires: 2_000,
        };
        let minted = tokens.mint_warm(&warm);
        let minted = std::str::from_utf8(minted.expose()).unwrap();
        assert_eq!(tokens.verify_warm(minted, 1_000), Ok(warm));
        assert_eq!(tokens.verify_warm(minted, 2_000), Err(TokenError::Expired));
        assert!(tokens.verify(minted, 1_000).is_err());
        let job = tokens.mint(&claims());
        let job = std::str::from_utf8(job.expose()).unwrap();
        assert!(tokens.verify_warm(job, 1_000).is_err());
        // The same body under the other version's prefix: the MAC is over another purpose.
        let relabelled = minted.replacen("w1.", "v1.", 1);
        assert!(tokens.verify(&relabelled, 1_000).is_err());
    }

    #[test]
    fn changed_claims_or_a_changed_mac_are_refused() {
        let t = tokens("k");
        let token = t.mint(&claims());
        let text = std::str::from_utf8(token.expose()).unwrap();
        let parts: Vec<&str> = text.split('.').collect();
        let other = Claims {
            instance: "i-9999".into(),
            ..claims()
        };
        let body = B64.encode(serde_json::to_vec(&other).unwrap());
        let swapped = format!("v1.{body}.{}", parts[2]);
        assert_eq!(t.verify(&swapped, 0), Err(TokenError::Forged));
        let flipped = format!("v1.{}.{}A", parts[1], &parts[2][..parts[2].len() - 1]);
        assert_eq!(t.verify(&flipped, 0), Err(TokenError::Forged));
        for bad in ["", "v1", "v1.a", "v2.a.b", "v1.a.b.c", "v1.!!.b"] {
            assert_eq!(t.verify(bad, 0), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn a_sealed_answer_opens_only_under_its_key_and_for_its_context() {
        let t = tokens("k");
        let sealed = t.seal("uid-1/i-1", b"jit config").unwrap();
        assert_eq!(
            t.open("uid-1/i-1", &sealed).as_deref(),
            Some(&b"jit config"[..])
        );
        assert_ne!(
            sealed,
            t.seal("uid-1/i-1", b"jit config").unwrap(),
            "a fresh nonce each time"
        );
        assert_eq!(t.open("uid-1/i-2", &sealed), None);
        assert_eq!(tokens("j").open("uid-1/i-1", &sealed), None);
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            t.open("uid-1/i-1", std::str::from_utf8(&tampered).unwrap()),
            None
        );
        for bad in ["", "v1.", "v2.AAAA", "v1.!!", "v1.AAAA"] {
            assert_eq!(t.open("uid-1/i-1", bad), None, "{bad}");
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Tokens::new(Secret::new(vec![7u8; 31])).is_err());
        assert!(format!("{:?}", tokens("k")).contains("redacted"));
    }
}
