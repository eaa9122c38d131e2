//! The relay's state directory: its generated certificate and key (so the fingerprint that
//! clients pin survives restarts) and its Nostr event database.
//!
//! ```text
//! <state-dir>/        0700
//!   cert.pem          the self-signed certificate (not written with --tls-cert)
//!   key.pem           its private key, 0600
//!   nostr/            LMDB environment of the stored Nostr events (files 0600)
//! ```

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("this system has no data directory for the relay's state: pass --state-dir DIR (or --ephemeral to keep nothing)")]
    NoDataDir,
    #[error("state directory {}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("state directory {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
}

/// An existing state directory, private to this user.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The platform data directory's `call-relay` (e.g. `~/.local/share/call-relay`).
    pub fn default_path() -> Option<PathBuf> {
        dirs::data_dir().map(|d| d.join("call-relay"))
    }

    /// Opens `path`, creating it (and its parents) 0700 if missing. An existing directory
    /// that others may enter is narrowed to 0700: it holds the relay's private key.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let io = |err| StateError::Io {
            path: path.to_path_buf(),
            err,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io)?;
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_dir() {
            return Err(StateError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %path.display(),
                "state directory was mode {mode:03o}; narrowing it to 700"
            );
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let state = Self {
            root: path.to_path_buf(),
        };
        let nostr = state.nostr();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&nostr)
            .map_err(|err| StateError::Io { path: nostr, err })?;
        Ok(state)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn cert(&self) -> PathBuf {
        self.root.join("cert.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.root.join("key.pem")
    }

    /// The LMDB environment of the Nostr events.
    pub fn nostr(&self) -> PathBuf {
        self.root.join("nostr")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_state_dir_is_private_and_an_open_one_is_narrowed() {
        let base = std::env::temp_dir().join(format!("call-relay-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("a/b");
        let state = StateDir::open(&dir).unwrap();
        assert_eq!(mode(state.path()), 0o700);
        assert_eq!(mode(&state.nostr()), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        StateDir::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = base.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            StateDir::open(&file),
            Err(StateError::NotADirectory { .. }) | Err(StateError::Io { .. })
        ));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
