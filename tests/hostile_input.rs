//! Hostile input against the three verifiers an unauthenticated caller reaches: the instance
//! identity document (BER mutations of a valid signature: bytes, lengths, indefinite forms,
//! truncation, insertion), the callback token, and the webhook signature and payload. Bounded
//! property tests (arbtest): `PACER_FUZZ_MS` per property, 2 s in `make test` and a minute in
//! `make fuzz`. No input may panic, and nothing but the genuine article may pass.

mod support;

use std::time::Duration;

use arbtest::arbitrary::{Result, Unstructured};
use base64::Engine as _;
use pacer::config::Secret;
use pacer::github::webhook::{WorkflowJobEvent, sign, verify};
use pacer::runner::identity::TrustRoots;
use pacer::runner::token::{Claims, Tokens};
use support::identity::{self, Signer};

fn budget() -> u64 {
    std::env::var("PACER_FUZZ_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Changes `bytes` the ways a hostile encoder would: a byte flipped or set, a length made
/// indefinite (0x80) or huge (0x84 ff ff ff ff), a cut, an insertion, a nesting duplicated.
fn mutate(u: &mut Unstructured<'_>, bytes: &mut Vec<u8>) -> Result<()> {
    for _ in 0..u.int_in_range(1..=4)? {
        if bytes.is_empty() {
            bytes.push(u.arbitrary()?);
            continue;
        }
        let at = u.choose_index(bytes.len())?;
        match u.int_in_range(0..=6)? {
            0 => bytes[at] ^= 1 << u.int_in_range(0..=7)?,
            1 => bytes[at] = u.arbitrary()?,
            2 => bytes[at] = 0x80,
            3 => {
                bytes.splice(at..=at, [0x84, 0xff, 0xff, 0xff, 0xff]);
            }
            4 => bytes.truncate(at),
            5 => {
                let inserted: Vec<u8> = u.arbitrary()?;
                bytes.splice(at..at, inserted.into_iter().take(16));
            }
            _ => {
                let end = (at + u.int_in_range(1..=64)?).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
        }
    }
    Ok(())
}

#[test]
fn mutated_identity_signatures_never_panic_and_never_vouch_for_another_document() {
    let dir = support::scratch("hostile-identity");
    let signer = Signer::new(&dir);
    let roots = TrustRoots::from_pem(&std::fs::read(signer.certificate()).unwrap()).unwrap();
    let document = identity::document(
        "123456789012",
        "us-east-1",
        "i-0123456789abcdef0",
        "x86_64",
        "2026-11-29T12:00:00Z",
    );
    let signature = signer.sign(&document);
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature.replace('\n', ""))
        .unwrap();
    assert!(roots.verify(document.as_bytes(), &signature).is_ok());
    arbtest::arbtest(|u| {
        let mut bytes = der.clone();
        mutate(u, &mut bytes)?;
        let mutated = base64::engine::general_purpose::STANDARD.encode(&bytes);
        if let Ok(doc) = roots.verify(document.as_bytes(), &mutated) {
            // Only a change the signature does not cover (such as an unsigned attribute) can
            // pass, and then only for the document that was signed.
            assert_eq!(doc.instance_id, "i-0123456789abcdef0");
        }
        let mut forged = document.clone().into_bytes();
        mutate(u, &mut forged)?;
        if forged != document.as_bytes() {
            assert!(roots.verify(&forged, &signature).is_err());
        }
        Ok(())
    })
    .budget(Duration::from_millis(budget()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn callback_tokens_other_than_the_minted_one_never_verify() {
    let tokens = Tokens::new(Secret::new(vec![7u8; 32])).unwrap();
    let claims = Claims {
        namespace: "ci".into(),
        name: "gh-job-1".into(),
        uid: "0b7e".into(),
        instance: "i-0123".into(),
        expires: i64::MAX,
    };
    let minted = String::from_utf8(tokens.mint(&claims).expose().to_vec()).unwrap();
    assert!(tokens.verify(&minted, 0).is_ok());
    arbtest::arbtest(|u| {
        let noise: String = u.arbitrary()?;
        assert!(tokens.verify(&noise, 0).is_err() || noise == minted);
        let mut bytes = minted.clone().into_bytes();
        mutate(u, &mut bytes)?;
        if let Ok(text) = String::from_utf8(bytes)
            && text != minted
        {
            assert!(tokens.verify(&text, 0).is_err(), "{text}");
        }
        Ok(())
    })
    .budget(Duration::from_millis(budget()));
}

#[test]
fn webhook_signatures_pass_only_over_the_signed_bytes_and_no_payload_panics() {
    let secret = b"a webhook secret of at least 32 chars";
    let body = support::webhooks::queued(1, &["self-hosted", "linux"]);
    let signature = sign(secret, &body);
    assert!(verify(&[secret], Some(signature.as_bytes()), &body));
    arbtest::arbtest(|u| {
        let header: Vec<u8> = u.arbitrary()?;
        assert!(!verify(&[secret], Some(&header), &body) || header == signature.as_bytes());
        let mut changed = body.clone();
        mutate(u, &mut changed)?;
        if changed != body {
            assert!(!verify(&[secret], Some(signature.as_bytes()), &changed));
        }
        // Parsing what a signed delivery might carry never panics.
        let _ = serde_json::from_slice::<WorkflowJobEvent>(&changed);
        let noise: Vec<u8> = u.arbitrary()?;
        let _ = serde_json::from_slice::<WorkflowJobEvent>(&noise);
        Ok(())
    })
    .budget(Duration::from_millis(budget()));
}
