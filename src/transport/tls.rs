//! How the client checks the relay's certificate, and what it found wrong with one.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Why the relay's certificate was refused. The relay was reached: retrying cannot help,
/// and the user has to do something, which the message says (the flags are the same for
/// every command that connects to a MoQ relay).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Web PKI verification failed: typically a self-signed certificate (call-relay makes
    /// one), else an expired one or one for another name.
    #[error(
        "the relay's certificate is not trusted: {reason}. A relay with a self-signed \
         certificate, such as call-relay, is pinned instead: pass --moq-fingerprint <sha256> \
         (or set moq_fingerprint in config.toml) with the fingerprint the relay's operator \
         gives you (call-relay prints it as `fingerprint …` when it starts). This relay \
         presented {presented}: pin it only if it is that one. For local testing only, \
         --moq-insecure accepts any certificate"
    )]
    Untrusted {
        reason: String,
        /// SHA-256 of the certificate the relay presented, hex.
        presented: String,
    },
    /// The certificate is not the pinned one.
    #[error(
        "the relay's certificate fingerprint does not match --moq-fingerprint (or \
         moq_fingerprint in config.toml): pinned {pinned}, the relay presented {presented}. \
         A relay that made itself a new certificate (call-relay started with --ephemeral, or \
         without its state directory) prints the new fingerprint when it starts"
    )]
    Mismatch {
        /// SHA-256 pinned, hex.
        pinned: String,
        /// SHA-256 of the certificate the relay presented, hex.
        presented: String,
    },
}

/// Where one connection attempt's verifier leaves what it refused, for the dialler to turn
/// into a [`CertError`] (quinn only reports a TLS alert and a string).
pub(crate) type CertVerdict = Arc<Mutex<Option<CertError>>>;

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
        self.reporting_config(&CertVerdict::default())
    }

    /// As [`CertVerification::client_config`], the verifier leaving what it refused in
    /// `verdict`.
    pub(crate) fn reporting_config(
        &self,
        verdict: &CertVerdict,
    ) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?;
        let verifier: Arc<dyn ServerCertVerifier> = match self {
            Self::WebPki => {
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    // A platform store with a few unparsable entries is still usable.
                    let _ = roots.add(cert);
                }
                // An empty store cannot build a verifier; every certificate is then
                // untrusted, which the check below says as such.
                let webpki = match roots.is_empty() {
                    true => None,
                    false => Some(
                        WebPkiServerVerifier::builder_with_provider(
                            Arc::new(roots),
                            provider.clone(),
                        )
                        .build()
                        .map_err(|e| e.to_string())?,
                    ),
                };
                Arc::new(Checked {
                    check: Check::WebPki(webpki),
                    provider,
                    verdict: verdict.clone(),
                })
            }
            Self::Fingerprint(fp) => Arc::new(Checked {
                check: Check::Pinned(*fp),
                provider,
                verdict: verdict.clone(),
            }),
            Self::Insecure => Arc::new(Checked {
                check: Check::Nothing,
                provider,
                verdict: verdict.clone(),
            }),
        };
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }
}

/// What [`Checked`] checks of the leaf certificate.
#[derive(Debug)]
enum Check {
    /// The platform's web PKI roots (`None`: the platform has none).
    WebPki(Option<Arc<WebPkiServerVerifier>>),
    /// Its SHA-256.
    Pinned([u8; 32]),
    /// Nothing (development only).
    Nothing,
}

/// Why web PKI verification failed, in words (rustls names the common case `UnknownIssuer`).
fn untrusted_reason(err: &rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "it is not signed by an authority this system trusts (self-signed?)".into()
        }
        rustls::Error::InvalidCertificate(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// Checks the leaf as [`Check`] says, records a refusal in `verdict`, and always verifies
/// the handshake signatures, so the peer must hold the certificate's key.
#[derive(Debug)]
struct Checked {
    check: Check,
    provider: Arc<CryptoProvider>,
    verdict: CertVerdict,
}

impl Checked {
    fn refuse(&self, problem: CertError, err: rustls::Error) -> rustls::Error {
        *self.verdict.lock().expect("certificate verdict lock") = Some(problem);
        err
    }
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Sha256::digest(end_entity.as_ref());
        match &self.check {
            Check::Nothing => Ok(ServerCertVerified::assertion()),
            Check::Pinned(fp) if presented.as_slice() == fp => Ok(ServerCertVerified::assertion()),
            Check::Pinned(fp) => Err(self.refuse(
                CertError::Mismatch {
                    pinned: hex::encode(fp),
                    presented: hex::encode(presented),
                },
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
            )),
            Check::WebPki(Some(webpki)) => webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .map_err(|e| {
                    self.refuse(
                        CertError::Untrusted {
                            reason: untrusted_reason(&e),
                            presented: hex::encode(presented),
                        },
                        e,
                    )
                }),
            Check::WebPki(None) => Err(self.refuse(
                CertError::Untrusted {
                    reason: "this system has no trusted root certificates".into(),
                    presented: hex::encode(presented),
                },
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            )),
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
