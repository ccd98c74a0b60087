//! The tests' stand-in for AWS's identity document signer: an RSA-2048 key and certificate made
//! by openssl, and PKCS#7 signatures made the way IMDS serves them (attached content, BER
//! streaming, SHA-256). Pacer is configured to trust the certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;

pub struct Signer {
    dir: PathBuf,
}

impl Signer {
    /// A fresh key and certificate under `dir`.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=test instance identity signer"])
            .arg("-keyout")
            .arg(dir.join("signer.key"))
            .arg("-out")
            .arg(dir.join("signer.pem"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir: dir.into() }
    }

    /// The signer already made under `dir`.
    pub fn at(dir: &Path) -> Self {
        assert!(
            dir.join("signer.pem").exists(),
            "no signer in {}",
            dir.display()
        );
        Self { dir: dir.into() }
    }

    /// The certificate to trust (`runners.identity_certificates_file`).
    pub fn certificate(&self) -> PathBuf {
        self.dir.join("signer.pem")
    }

    /// IMDS's `rsa2048` for `document`: base64 of the BER PKCS#7, 64-column lines.
    pub fn sign(&self, document: &str) -> String {
        let input = self.dir.join(format!("doc-{}.json", rand_suffix()));
        std::fs::write(&input, document).unwrap();
        let out = Command::new("openssl")
            .args(["smime", "-sign", "-md", "sha256", "-nocerts", "-binary"])
            .args(["-nodetach", "-stream", "-outform", "DER"])
            .arg("-in")
            .arg(&input)
            .arg("-signer")
            .arg(self.certificate())
            .arg("-inkey")
            .arg(self.dir.join("signer.key"))
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&input);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(out.stdout);
        b64.as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// An instance identity document as IMDS shows it.
pub fn document(account: &str, region: &str, instance: &str, arch: &str, pending: &str) -> String {
    format!(
        "{{\n  \"accountId\" : \"{account}\",\n  \"architecture\" : \"{arch}\",\n  \"availabilityZone\" : \"{region}a\",\n  \"billingProducts\" : null,\n  \"devpayProductCodes\" : null,\n  \"marketplaceProductCodes\" : null,\n  \"imageId\" : \"ami-12345678\",\n  \"instanceId\" : \"{instance}\",\n  \"instanceType\" : \"m7i.large\",\n  \"kernelId\" : null,\n  \"pendingTime\" : \"{pending}\",\n  \"privateIp\" : \"10.0.0.12\",\n  \"ramdiskId\" : null,\n  \"region\" : \"{region}\",\n  \"version\" : \"2017-09-30\"\n}}"
    )
}

/// A callback key for `runners.callback_key_file`, written under `dir`.
pub fn callback_key(dir: &Path) -> PathBuf {
    let path = dir.join("callback-key");
    std::fs::write(&path, "0123456789abcdef0123456789abcdef-test-key\n").unwrap();
    path
}
