//! AWS's RSA-2048 certificates for instance identity documents, bundled: one per commercial
//! region (`aws-identity-rsa2048.pem`, each certificate after a `# region: NAME` line). Pacer
//! trusts `aws.region`'s when `runners.identity_certificates_file` is not set, and names the
//! region of a configured certificate that is AWS's.

use der::Decode as _;
use x509_cert::Certificate;

/// The bundle as shipped.
pub const BUNDLE: &str = include_str!("aws-identity-rsa2048.pem");

const REGION_LINE: &str = "# region: ";

/// One region's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bundled {
    pub region: &'static str,
    /// The PEM block, armour included.
    pub pem: &'static str,
}

/// Every bundled certificate, in the file's order (by region).
pub fn all() -> Vec<Bundled> {
    let mut found = Vec::new();
    let mut region = None;
    let mut offset = 0;
    let mut start = None;
    for line in BUNDLE.split_inclusive('\n') {
        let text = line.trim_end();
        if let Some(name) = text.strip_prefix(REGION_LINE) {
            region = Some(name.trim());
        } else if text == "-----BEGIN CERTIFICATE-----" {
            start = Some(offset);
        } else if text == "-----END CERTIFICATE-----"
            && let (Some(name), Some(begin)) = (region.take(), start.take())
        {
            found.push(Bundled {
                region: name,
                pem: &BUNDLE[begin..offset + line.len()],
            });
        }
        offset += line.len();
    }
    found
}

/// The bundled certificate of `region`, if it is one of AWS's commercial regions.
pub fn for_region(region: &str) -> Option<Bundled> {
    all().into_iter().find(|b| b.region == region)
}

/// The regions the bundle covers.
pub fn regions() -> Vec<&'static str> {
    all().iter().map(|b| b.region).collect()
}

/// The bundled regions whose certificate has this public key (PKCS#1 `RSAPublicKey`, as
/// [`super::identity::TrustRoots`] keeps them).
pub fn regions_of_key(key: &[u8]) -> Vec<&'static str> {
    all()
        .into_iter()
        .filter(|b| public_key(b.pem).is_some_and(|k| k == key))
        .map(|b| b.region)
        .collect()
}

fn certificate(pem: &str) -> Option<Certificate> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    Certificate::from_der(&der).ok()
}

fn public_key(pem: &str) -> Option<Vec<u8>> {
    let cert = certificate(pem)?;
    Some(
        cert.tbs_certificate()
            .subject_public_key_info()
            .subject_public_key
            .raw_bytes()
            .to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    use der::Encode as _;
    use der::asn1::ObjectIdentifier;
    use std::collections::BTreeSet;

    const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
    const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

    #[test]
    fn every_bundled_certificate_is_rsa_2048_and_signed_by_its_own_key() {
        let bundled = all();
        assert_eq!(
            bundled.len(),
            BUNDLE.matches("-----BEGIN CERTIFICATE-----").count(),
            "a certificate without its region line"
        );
        let mut keys = BTreeSet::new();
        for b in &bundled {
            let cert = certificate(b.pem).unwrap_or_else(|| panic!("{}: does not parse", b.region));
            let spki = cert.tbs_certificate().subject_public_key_info();
            assert_eq!(spki.algorithm.oid, RSA_ENCRYPTION, "{}", b.region);
            let bits = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&spki.to_der().unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", b.region))
                .key_size_bits();
            assert_eq!(bits, 2048, "{}", b.region);
            // Self-signed: the signature over the TBSCertificate verifies under its own key, so
            // no character of it was lost or changed.
            assert_eq!(
                cert.signature_algorithm().oid,
                SHA256_WITH_RSA,
                "{}",
                b.region
            );
            let key = spki.subject_public_key.raw_bytes();
            let signed = cert.tbs_certificate().to_der().unwrap();
            UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
                .verify(&signed, cert.signature().raw_bytes())
                .unwrap_or_else(|_| panic!("{}: the self-signature does not verify", b.region));
            assert!(keys.insert(key.to_vec()), "{}: a key seen before", b.region);
        }
    }

    #[test]
    fn the_bundle_covers_the_regions_the_docs_list_and_no_other() {
        let docs = include_str!("../../docs/instances.md");
        let heading = "### Regions with a bundled certificate";
        let section = docs
            .split_once(heading)
            .unwrap_or_else(|| panic!("docs/instances.md has no {heading:?}"))
            .1;
        let paragraph = section.trim_start().split("\n\n").next().unwrap();
        let listed: BTreeSet<&str> = paragraph
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.contains('-'))
            .collect();
        let bundled: BTreeSet<&str> = regions().into_iter().collect();
        assert!(listed.len() >= 30, "{listed:?}");
        assert_eq!(listed, bundled);
    }

    #[test]
    fn a_region_finds_its_certificate_and_a_key_its_region() {
        let eu = for_region("eu-west-1").unwrap();
        assert!(eu.pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(eu.pem.ends_with("-----END CERTIFICATE-----\n"));
        assert_eq!(
            regions_of_key(&public_key(eu.pem).unwrap()),
            vec!["eu-west-1"]
        );
        assert_eq!(for_region("us-gov-west-1"), None);
        assert_eq!(for_region("eu-west"), None);
        assert!(regions_of_key(b"not a key").is_empty());
    }
}
