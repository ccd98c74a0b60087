//! The EC2 instance identity document and its RSA-2048 signature: how an instance proves, with
//! no secret of its own, which instance it is.
//!
//! IMDS serves the document at `/latest/dynamic/instance-identity/document` and a PKCS#7
//! `SignedData` over it at `/latest/dynamic/instance-identity/rsa2048` (base64, BER-encoded,
//! SHA-256 with RSA). AWS signs with one key per region and publishes the certificate: Pacer
//! bundles them ([`super::aws_certificates`]) and trusts `aws.region`'s unless the operator
//! names the certificates to trust, as tests do to sign with their own.

use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use base64::Engine as _;
use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use der::asn1::{ObjectIdentifier, OctetString};
use der::{Decode as _, Encode as _, EncodingRules};
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use x509_cert::Certificate;

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

/// The fields of an instance identity document Pacer checks.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub account_id: String,
    pub region: String,
    pub instance_id: String,
    /// `x86_64` or `arm64`.
    pub architecture: String,
    /// When the instance entered `pending`.
    pub pending_time: Timestamp,
    #[serde(default)]
    pub instance_type: Option<String>,
    #[serde(default)]
    pub availability_zone: Option<String>,
}

/// Why a document was refused. The listener answers 401 with the message; nothing in it is
/// secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the signature is not base64-encoded PKCS#7 SignedData: {0}")]
    Malformed(String),
    #[error("the signature does not verify against any trusted certificate")]
    BadSignature,
    #[error("the signed content is not the document sent")]
    ContentMismatch,
    #[error("the identity document is not valid JSON with the expected fields: {0}")]
    Document(String),
}

/// Certificates whose keys may sign identity documents.
#[derive(Clone, Debug, Default)]
pub struct TrustRoots {
    /// Each certificate's public key (PKCS#1 `RSAPublicKey`).
    keys: Vec<Vec<u8>>,
}

impl TrustRoots {
    /// Every certificate in a PEM bundle. At least one is required.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut keys = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let der = cert.map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
            let cert = Certificate::from_der(&der)
                .map_err(|e| format!("a certificate does not parse: {e}"))?;
            let spki = cert.tbs_certificate().subject_public_key_info();
            if spki.algorithm.oid != RSA_ENCRYPTION {
                return Err(format!(
                    "a certificate's key is not RSA ({}): use the region's RSA-2048 certificate",
                    spki.algorithm.oid
                ));
            }
            keys.push(spki.subject_public_key.raw_bytes().to_vec());
        }
        if keys.is_empty() {
            return Err("no certificate in the bundle".into());
        }
        Ok(Self { keys })
    }

    /// AWS's bundled certificate for `region`, alone.
    pub fn aws(region: &str) -> Result<Self, String> {
        let bundled = super::aws_certificates::for_region(region).ok_or_else(|| {
            format!(
                "no certificate is bundled for {region}: name AWS's RSA-2048 certificate for it"
            )
        })?;
        Self::from_pem(bundled.pem.as_bytes())
    }

    /// The AWS regions whose bundled certificate is among these roots.
    pub fn aws_regions(&self) -> Vec<&'static str> {
        self.keys
            .iter()
            .flat_map(|key| super::aws_certificates::regions_of_key(key))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks `signature` (the base64 body of IMDS's `rsa2048`, with or without PEM armour)
    /// over `document` and returns the document's fields.
    pub fn verify(&self, document: &[u8], signature: &str) -> Result<Document, IdentityError> {
        let signed = signed_content(signature)?;
        let content = match &signed.content {
            // AWS attaches the document; it must be the one sent.
            Some(content) if content.as_slice() != document => {
                return Err(IdentityError::ContentMismatch);
            }
            _ => document,
        };
        let digest = Sha256::digest(content);
        let verified = signed.signers.iter().any(|signer| {
            let message = match &signer.signed_attributes {
                // With signed attributes, the signature covers them and they carry the digest.
                Some((attributes, message_digest)) => {
                    if message_digest.as_slice() != digest.as_slice() {
                        return false;
                    }
                    attributes.as_slice()
                }
                None => content,
            };
            self.keys.iter().any(|key| {
                UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
                    .verify(message, &signer.signature)
                    .is_ok()
            })
        });
        if !verified {
            return Err(IdentityError::BadSignature);
        }
        serde_json::from_slice(content).map_err(|e| IdentityError::Document(e.to_string()))
    }
}

/// The bytes of an OCTET STRING's value. BER lets it be constructed from segments, each an
/// OCTET STRING of its own, and `der` keeps the segments' headers in the value: a value that
/// is wholly such segments is joined. (A primitive value that happened to look like segments
/// would be joined too and then fail to match the document: a refusal, never an acceptance.)
fn octets(value: &[u8]) -> Vec<u8> {
    fn segments(value: &[u8]) -> Option<Vec<u8>> {
        let mut reader =
            der::SliceReader::new_with_encoding_rules(value, EncodingRules::Ber).ok()?;
        let mut joined = Vec::new();
        while !der::Reader::is_finished(&reader) {
            let segment: OctetString = der::Decode::decode(&mut reader).ok()?;
            joined.extend_from_slice(segment.as_bytes());
        }
        Some(joined)
    }
    match value.first() {
        Some(0x04 | 0x24) => segments(value).unwrap_or_else(|| value.to_vec()),
        _ => value.to_vec(),
    }
}

/// What a SignedData says, reduced to what verification needs.
struct Signed {
    content: Option<Vec<u8>>,
    signers: Vec<Signer>,
}

struct Signer {
    /// The DER `SET OF` the signature covers, and the message digest inside it.
    signed_attributes: Option<(Vec<u8>, Vec<u8>)>,
    signature: Vec<u8>,
}

fn signed_content(signature: &str) -> Result<Signed, IdentityError> {
    let malformed = |what: &str| IdentityError::Malformed(what.to_string());
    let body: String = signature
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .flat_map(|line| line.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    let ber = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| malformed(&format!("base64: {e}")))?;
    let info = ContentInfo::from_ber(&ber).map_err(|e| malformed(&e.to_string()))?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(malformed("the content type is not SignedData"));
    }
    let data = info
        .content
        .decode_as_encoding::<SignedData>(EncodingRules::Ber)
        .map_err(|e: der::Error| malformed(&e.to_string()))?;
    let content = data
        .encap_content_info
        .econtent
        .as_ref()
        .map(|any| octets(any.value()));
    let mut signers = Vec::new();
    for info in data.signer_infos.0.iter() {
        let algorithm = &info.signature_algorithm.oid;
        if info.digest_alg.oid != ID_SHA256
            || (*algorithm != RSA_ENCRYPTION && *algorithm != SHA256_WITH_RSA)
        {
            continue;
        }
        let signed_attributes = match &info.signed_attrs {
            Some(attributes) => {
                let digest = attributes
                    .iter()
                    .find(|a| a.oid == ID_MESSAGE_DIGEST)
                    .and_then(|a| a.values.iter().next())
                    .and_then(|v| v.decode_as::<OctetString>().ok())
                    .ok_or_else(|| malformed("signed attributes without a message digest"))?;
                let der = attributes.to_der().map_err(|e| malformed(&e.to_string()))?;
                Some((der, digest.into_bytes().into_vec()))
            }
            None => None,
        };
        signers.push(Signer {
            signed_attributes,
            signature: info.signature.as_bytes().to_vec(),
        });
    }
    if signers.is_empty() {
        return Err(malformed("no SHA-256 RSA signer"));
    }
    Ok(Signed { content, signers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const DOCUMENT: &str = r#"{
  "accountId" : "123456789012",
  "architecture" : "x86_64",
  "availabilityZone" : "us-east-1a",
  "imageId" : "ami-12345678",
  "instanceId" : "i-0123456789abcdef0",
  "instanceType" : "m7i.large",
  "pendingTime" : "2026-11-29T12:00:00Z",
  "privateIp" : "10.0.0.12",
  "region" : "us-east-1",
  "version" : "2017-09-30"
}"#;

    /// A key and self-signed certificate made by openssl, and the signature openssl makes the
    /// way AWS does (attached content, BER streaming, SHA-256).
    struct Signer {
        dir: std::path::PathBuf,
    }

    impl Signer {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("pacer-identity-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let ok = Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=test identity signer"])
                .arg("-keyout")
                .arg(dir.join("key.pem"))
                .arg("-out")
                .arg(dir.join("cert.pem"))
                .output()
                .unwrap();
            assert!(
                ok.status.success(),
                "{}",
                String::from_utf8_lossy(&ok.stderr)
            );
            Self { dir }
        }

        fn cert(&self) -> Vec<u8> {
            std::fs::read(self.dir.join("cert.pem")).unwrap()
        }

        fn sign(&self, document: &str, extra: &[&str]) -> String {
            std::fs::write(self.dir.join("doc.json"), document).unwrap();
            let out = Command::new("openssl")
                .args(["smime", "-sign", "-md", "sha256", "-nocerts", "-binary"])
                .args(extra)
                .arg("-in")
                .arg(self.dir.join("doc.json"))
                .arg("-signer")
                .arg(self.dir.join("cert.pem"))
                .arg("-inkey")
                .arg(self.dir.join("key.pem"))
                .args(["-outform", "DER"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            base64::engine::general_purpose::STANDARD.encode(out.stdout)
        }
    }

    impl Drop for Signer {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_document_signed_like_aws_signs_verifies_and_anything_else_does_not() {
        let signer = Signer::new("good");
        let other = Signer::new("other");
        let roots = TrustRoots::from_pem(&signer.cert()).unwrap();
        // BER with indefinite lengths, as IMDS serves it.
        let signature = signer.sign(DOCUMENT, &["-nodetach", "-stream"]);
        let doc = roots.verify(DOCUMENT.as_bytes(), &signature).unwrap();
        assert_eq!(doc.instance_id, "i-0123456789abcdef0");
        assert_eq!(doc.account_id, "123456789012");
        assert_eq!(doc.region, "us-east-1");
        assert_eq!(doc.architecture, "x86_64");
        assert_eq!(doc.pending_time.to_string(), "2026-11-29T12:00:00Z");
        // PEM armour, as AWS's own instructions add it, is fine.
        let armoured = format!("-----BEGIN PKCS7-----\n{signature}\n-----END PKCS7-----\n");
        assert!(roots.verify(DOCUMENT.as_bytes(), &armoured).is_ok());
        // A detached signature verifies over the document sent.
        let detached = signer.sign(DOCUMENT, &[]);
        assert!(roots.verify(DOCUMENT.as_bytes(), &detached).is_ok());

        // Another document under the attached signature.
        let forged = DOCUMENT.replace("i-0123456789abcdef0", "i-0fffffffffffffff0");
        assert_eq!(
            roots.verify(forged.as_bytes(), &signature),
            Err(IdentityError::ContentMismatch)
        );
        // Another document under a detached signature.
        assert_eq!(
            roots.verify(forged.as_bytes(), &detached),
            Err(IdentityError::BadSignature)
        );
        // Another key.
        let stranger = other.sign(DOCUMENT, &["-nodetach", "-stream"]);
        assert_eq!(
            roots.verify(DOCUMENT.as_bytes(), &stranger),
            Err(IdentityError::BadSignature)
        );
        // Noise.
        assert!(matches!(
            roots.verify(DOCUMENT.as_bytes(), "bm90IHBrY3M3"),
            Err(IdentityError::Malformed(_))
        ));
        // A bundle trusts each of its certificates.
        let both = [signer.cert(), other.cert()].concat();
        let roots = TrustRoots::from_pem(&both).unwrap();
        assert_eq!(roots.len(), 2);
        assert!(roots.verify(DOCUMENT.as_bytes(), &stranger).is_ok());
    }

    #[test]
    fn trust_roots_refuse_what_is_not_an_rsa_certificate() {
        assert!(TrustRoots::from_pem(b"").is_err());
        assert!(
            TrustRoots::from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }
}
