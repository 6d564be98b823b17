//! HTTPS towards the endpoint: the platform's roots by default, a private CA, or a pinned
//! certificate. rustls with the ring provider only.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::{AgentConfig, EndpointTrust};

/// Why the HTTP client could not be built. Not recoverable without fixing the config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file is not usable PEM.
    #[error("http.ca_file: {0}")]
    Ca(String),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// reqwest refused the configuration.
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Accepts exactly the server certificates whose SHA-256 (of the DER) is pinned, and checks
/// the handshake signature with that certificate's key. Names and expiry are not checked:
/// the pin is the trust decision (rotate by listing the next certificate's pin beforehand).
#[derive(Debug)]
struct PinnedCert {
    pins: Vec<[u8; 32]>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = Sha256::digest(end_entity.as_ref());
        if self.pins.iter().any(|p| p[..] == digest[..]) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate sha256 {} is not pinned",
                hex::encode(digest)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The HTTP client the agent uploads with, trusting what the config says.
pub fn http_client(config: &AgentConfig) -> Result<reqwest::Client, TlsError> {
    let builder = reqwest::Client::builder().timeout(config.http_timeout);
    let builder = match &config.endpoint_trust {
        EndpointTrust::SystemRoots => builder,
        EndpointTrust::Ca(pem) => {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| TlsError::Ca(e.to_string()))?;
            if certs.is_empty() {
                return Err(TlsError::Ca("no certificate in the file".into()));
            }
            // A private CA replaces the public roots: nothing else may vouch for the endpoint.
            certs.into_iter().fold(builder.tls_built_in_root_certs(false), |b, c| b.add_root_certificate(c))
        }
        EndpointTrust::Pinned(pins) => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let algs = provider.signature_verification_algorithms;
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert { pins: pins.clone(), algs }))
                .with_no_client_auth();
            builder.use_preconfigured_tls(tls)
        }
    };
    Ok(builder.build()?)
}
