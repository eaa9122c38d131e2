//! Server certificate for the MoQ listener: loaded from PEM files or generated at start.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// A certificate chain, its key, and the leaf's SHA-256 fingerprint (hex) that clients pin.
pub struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub fingerprint: String,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {err}")]
    Pem {
        path: String,
        err: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// SHA-256 over the DER of a certificate, lowercase hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

impl ServerCert {
    /// A fresh self-signed certificate valid for `names` (DNS names or IP literals).
    pub fn self_signed(names: &[String]) -> Result<Self, TlsError> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(names.to_vec())?;
        let der = cert.der().clone();
        Ok(Self {
            fingerprint: fingerprint(&der),
            chain: vec![der],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der())),
        })
    }

    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_err = |p: &Path| {
            let path = p.display().to_string();
            move |err| TlsError::Pem { path, err }
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(pem_err(cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err(cert))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate(cert.display().to_string()))?;
        Ok(Self {
            fingerprint: fingerprint(leaf),
            key: PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?,
            chain,
        })
    }

    /// The rustls server side; moq-native-ietf sets the ALPN list itself.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?)
    }
}
