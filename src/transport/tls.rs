//! How the client checks the relay's certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Certificate policy for MoQ connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertVerification {
    /// Web PKI roots of the platform.
    WebPki,
    /// Accept exactly the certificate whose DER has this SHA-256.
    Fingerprint([u8; 32]),
    /// Accept any certificate (development only).
    Insecure,
}

impl CertVerification {
    /// Parses a hex SHA-256 fingerprint, with or without `:` separators.
    pub fn fingerprint(hex_fp: &str) -> Result<Self, String> {
        let clean: String = hex_fp.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&clean).map_err(|e| format!("fingerprint is not hex: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "fingerprint must be 32 bytes (SHA-256)".to_string())?;
        Ok(Self::Fingerprint(arr))
    }

    /// The rustls client configuration for this policy (TLS 1.3, no ALPN set).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?;
        let config = match self {
            Self::WebPki => {
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    // A platform store with a few unparsable entries is still usable.
                    let _ = roots.add(cert);
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Self::Fingerprint(fp) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    fingerprint: Some(*fp),
                    provider,
                }))
                .with_no_client_auth(),
            Self::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    fingerprint: None,
                    provider,
                }))
                .with_no_client_auth(),
        };
        Ok(config)
    }
}

/// Checks the leaf's SHA-256 against a pin (or nothing, when insecure), and still verifies
/// the handshake signatures so the peer must hold the certificate's key.
#[derive(Debug)]
struct Pinned {
    fingerprint: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.fingerprint {
            Some(fp) if Sha256::digest(end_entity.as_ref()).as_slice() != fp => {
                Err(rustls::Error::General(
                    "relay certificate does not match the pinned fingerprint".into(),
                ))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
