//! A throwaway PKI for TLS tests, made in-process with rcgen (ring): a CA, a server leaf for
//! `localhost` and 127.0.0.1, and a client leaf, written as PEM files. Knows nothing of who
//! serves or trusts them.
//!
//! Leaves are X.509 v3 with `CA:FALSE` (webpki refuses a CA as a server certificate and v1
//! leaves), the client leaf is for client authentication only, and keys are written mode
//! 0600 (the agent refuses key files others can read).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Why a PKI could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to make a key or certificate.
    #[error("cannot make {what}: {source}")]
    Generate {
        /// Which key or certificate.
        what: &'static str,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A CA, a server and a client certificate as PEM files in one directory: `ca.pem`,
/// `server.pem`, `server.key`, `client.pem`, `client.key`.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
    server_der: Vec<u8>,
}

impl TestPki {
    /// Makes a fresh PKI in `dir` (created if missing). Two calls make two unrelated CAs.
    pub fn create(dir: &Path) -> Result<TestPki, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_owned(), source })?;
        let gen = |what| move |source| PkiError::Generate { what, source };

        let ca_key = KeyPair::generate().map_err(gen("the CA key"))?;
        let mut ca = CertificateParams::new(Vec::new()).map_err(gen("the CA"))?;
        ca.distinguished_name.push(DnType::CommonName, "countersign test ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = ca.self_signed(&ca_key).map_err(gen("the CA"))?;
        write(&dir.join("ca.pem"), &ca.pem(), false)?;

        let sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let server = leaf(dir, "server", sans, None, &ca, &ca_key)?;
        leaf(dir, "client", Vec::new(), Some(ExtendedKeyUsagePurpose::ClientAuth), &ca, &ca_key)?;
        Ok(TestPki { dir: dir.to_owned(), server_der: server.der().to_vec() })
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate (PEM), for `localhost` and 127.0.0.1.
    pub fn server_cert_file(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key (PEM, PKCS#8, mode 0600).
    pub fn server_key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The client certificate (PEM), for client authentication.
    pub fn client_cert_file(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// The client's private key (PEM, PKCS#8, mode 0600).
    pub fn client_key_file(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// The server certificate's DER bytes (what a pin is the SHA-256 of).
    pub fn server_der(&self) -> &[u8] {
        &self.server_der
    }
}

/// A leaf `name` signed by the CA, written as `name.pem` and `name.key`.
fn leaf(
    dir: &Path,
    name: &'static str,
    sans: Vec<String>,
    usage: Option<ExtendedKeyUsagePurpose>,
    ca: &Certificate,
    ca_key: &KeyPair,
) -> Result<Certificate, PkiError> {
    let gen = |source| PkiError::Generate { what: name, source };
    let key = KeyPair::generate().map_err(gen)?;
    let mut params = CertificateParams::new(sans).map_err(gen)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = usage.into_iter().collect();
    let cert = params.signed_by(&key, ca, ca_key).map_err(gen)?;
    write(&dir.join(format!("{name}.pem")), &cert.pem(), false)?;
    write(&dir.join(format!("{name}.key")), &key.serialize_pem(), true)?;
    Ok(cert)
}

fn write(path: &Path, pem: &str, secret: bool) -> Result<(), PkiError> {
    let mode = if secret { 0o600 } else { 0o644 };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .map_err(|source| PkiError::Write { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn writes_pem_files_with_private_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::create(&dir.path().join("pki")).expect("pki");
        for cert in [pki.ca_file(), pki.server_cert_file(), pki.client_cert_file()] {
            let text = std::fs::read_to_string(&cert).expect("cert");
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{}", cert.display());
        }
        for key in [pki.server_key_file(), pki.client_key_file()] {
            assert!(std::fs::read_to_string(&key).expect("key").starts_with("-----BEGIN PRIVATE KEY-----"));
            assert_eq!(std::fs::metadata(&key).expect("key").permissions().mode() & 0o777, 0o600);
        }
        assert!(!pki.server_der().is_empty());
    }
}
