//! Server certificate for the MoQ listener: loaded from PEM files, or generated once and
//! kept in the state directory so its fingerprint (what clients pin) survives restarts.

use std::io::Write;
use std::path::{Path, PathBuf};
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
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A stored certificate or key that cannot be used. It is never replaced silently:
    /// a new certificate changes the fingerprint every client has pinned.
    #[error(
        "{}: {reason}. Restore the relay's certificate and key from a backup, or delete \
         both {} and {} to generate a new certificate (clients pinned to the old \
         fingerprint will then need the new one)",
        path.display(), cert.display(), key.display()
    )]
    Damaged {
        path: PathBuf,
        reason: String,
        cert: PathBuf,
        key: PathBuf,
    },
    /// The stored key can be read by other users.
    #[error("{} is readable by other users (mode {mode:03o}); run `chmod 600 {}`", path.display(), path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
}

/// SHA-256 over the DER of a certificate, lowercase hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

impl ServerCert {
    /// A fresh self-signed certificate valid for `names` (DNS names or IP literals).
    pub fn self_signed(names: &[String]) -> Result<Self, TlsError> {
        Ok(Self::generate(names)?.cert)
    }

    /// The certificate stored at `cert`/`key`, or, when neither file exists, a fresh
    /// self-signed one for `names`, written there first (key file 0600). A pair that is
    /// half missing, unreadable, or whose key does not match is an error, not replaced.
    /// `names` only matter when the certificate is generated.
    pub fn load_or_generate(cert: &Path, key: &Path, names: &[String]) -> Result<Self, TlsError> {
        let damaged = |path: &Path, reason: String| TlsError::Damaged {
            path: path.to_path_buf(),
            reason,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        };
        match (exists(cert)?, exists(key)?) {
            (false, false) => {
                let generated = Self::generate(names)?;
                // Key first: a crash between the two writes leaves a key without a
                // certificate, reported as damaged, never a certificate without its key.
                write_new(key, generated.key_pem.as_bytes(), 0o600)?;
                write_new(cert, generated.cert_pem.as_bytes(), 0o644)?;
                tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
                Ok(generated.cert)
            }
            (true, false) => Err(damaged(key, "missing (the certificate is there)".into())),
            (false, true) => Err(damaged(cert, "missing (the key is there)".into())),
            (true, true) => {
                check_private(key)?;
                let loaded = Self::load(cert, key).map_err(|e| match e {
                    TlsError::Pem { path, err } => {
                        damaged(Path::new(&path), format!("not usable PEM ({err})"))
                    }
                    TlsError::NoCertificate(_) => damaged(cert, "holds no certificate".into()),
                    other => other,
                })?;
                // rustls checks that the key belongs to the certificate.
                loaded
                    .server_config()
                    .map_err(|e| damaged(key, format!("does not fit the certificate: {e}")))?;
                Ok(loaded)
            }
        }
    }

    fn generate(names: &[String]) -> Result<Generated, TlsError> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(names.to_vec())?;
        let der = cert.der().clone();
        Ok(Generated {
            cert_pem: cert.pem(),
            key_pem: signing_key.serialize_pem(),
            cert: Self {
                fingerprint: fingerprint(&der),
                chain: vec![der],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der())),
            },
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

struct Generated {
    cert: ServerCert,
    cert_pem: String,
    key_pem: String,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |err| TlsError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(io_err(path))
}

/// Writes a new file with `mode` from its creation on (never briefly wider), through a
/// temporary name so a crash leaves either the whole file or none.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A temporary file left by a crash holds nothing anybody relies on.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Refuses a key file that other users can read: it may have been copied already.
fn check_private(key: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key)
        .map_err(io_err(key))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: key.to_path_buf(),
            mode,
        });
    }
    Ok(())
}
