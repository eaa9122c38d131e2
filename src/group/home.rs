//! A user's home directory: the Nostr identity, the MLS state (MDK on encrypted SQLite) and
//! the per-group sync cursors, guarded by an exclusive lock so two processes never change it
//! at once. Read-only commands ([`Home::open_read`]) may open it while another process holds
//! the lock (a running call): they then only read, and change nothing.
//!
//! Layout of `$CALL_HOME`:
//! - `lock`          advisory lock held for as long as a [`Home`] is open
//! - `nostr.key`     the Nostr secret key (nsec, bech32), mode 0600
//! - `storage.key`   the 32-byte SQLCipher key of `mdk.sqlite` (hex), mode 0600
//! - `mdk.sqlite`    MDK state (groups, MLS epochs, welcomes), encrypted
//! - `sync.json`     per group: `created_at` of the last group event processed (0600)
//! - `outbox.json`   welcomes made with a commit and not yet sent (0600); written before
//!   the commit is published, so a crash cannot leave an invitee unwelcomed

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mdk_sqlite_storage::{EncryptionConfig, MdkSqliteStorage};
use nostr_sdk::prelude::*;
use rand::RngCore;

const LOCK_FILE: &str = "lock";
const NOSTR_KEY_FILE: &str = "nostr.key";
const STORAGE_KEY_FILE: &str = "storage.key";
const DATABASE_FILE: &str = "mdk.sqlite";
const SYNC_FILE: &str = "sync.json";
const OUTBOX_FILE: &str = "outbox.json";

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("busy: another `call` process is using {0} (wait for it to finish)")]
    Busy(PathBuf),
    #[error("no home at {0}: run `call id new` or `call id import <nsec>` first")]
    NoHome(PathBuf),
    #[error("{0} is in use by another `call` process (a call?); this command only reads it")]
    ReadOnly(PathBuf),
    #[error("no identity in {0}: run `call id new` or `call id import <nsec>`")]
    NoIdentity(PathBuf),
    #[error("an identity already exists in {0} (its MLS state belongs to it); use another home")]
    IdentityExists(PathBuf),
    #[error("{path} is readable by others (mode {mode:o}); it holds a secret: chmod 600 it")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    BadSecret { path: PathBuf, reason: String },
    #[error("not a valid nsec or hex secret key: {0}")]
    BadKey(String),
    #[error("MLS storage {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
    #[error(
        "{0} is empty (0 bytes): the MLS state was lost (a crash while it was first written?); \
         move it away to start again without groups (you will need new invites)"
    )]
    EmptyDatabase(PathBuf),
    #[error(
        "{db} cannot be decrypted with the key in {key}: the key file was replaced, or the \
         database is damaged or from another home; restore the matching storage.key"
    )]
    WrongStorageKey { db: PathBuf, key: PathBuf },
    #[error("{0} is not encrypted, so it was not made by `call`; move it away")]
    UnencryptedDatabase(PathBuf),
    #[error("{path}: corrupt sync state: {reason}")]
    BadSyncState { path: PathBuf, reason: String },
    #[error("{path}: corrupt list of unsent welcomes: {reason}")]
    BadOutbox { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where catching up on one group resumes: `created_at` of the newest group event
/// processed, and the ids of the events processed at that second (fetched again, skipped).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncCursor {
    pub at: u64,
    pub seen: Vec<String>,
}

/// A welcome made with one of our commits and not yet delivered to a relay. It is kept
/// until sent: once the group is past `epoch` with the invitee in it, the next command that
/// catches up on the group sends it; if the group is past `epoch` without the invitee (our
/// commit lost, or the invitee was removed since), it is dropped.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutboxWelcome {
    /// MLS group id (hex).
    pub group: String,
    /// The group's epoch before the commit that adds the invitee.
    pub epoch: u64,
    /// The invitee's public key (hex).
    pub invitee: String,
    /// The kind-444 welcome rumor (unsigned event JSON); gift-wrapped when sent.
    pub rumor: serde_json::Value,
}

/// An open, locked home directory. The lock is released when this is dropped.
pub struct Home {
    dir: PathBuf,
    /// `None`: opened read-only while another process holds the lock.
    _lock: Option<File>,
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Home").field("dir", &self.dir).finish()
    }
}

impl Home {
    /// Opens (creating it with mode 0700 if needed) and locks `dir`. Fails with
    /// [`HomeError::Busy`] at once if another process holds the lock.
    pub fn open(dir: &Path) -> Result<Self, HomeError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode_0700()
                .create(dir)
                .map_err(io_err(dir))?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(HomeError::Busy(dir.into())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: Some(lock),
        })
    }

    /// Opens `dir` for a command that may only read: never creates it ([`HomeError::NoHome`]),
    /// takes the lock if it is free (the command may then catch up and save as usual), and
    /// otherwise opens it read-only ([`Home::is_read_only`]): another process (a call) is
    /// changing it, so this one must not. SQLite keeps the reads consistent.
    pub fn open_read(dir: &Path) -> Result<Self, HomeError> {
        if !dir.is_dir() {
            return Err(HomeError::NoHome(dir.into()));
        }
        match Self::open(dir) {
            Err(HomeError::Busy(_)) => Ok(Self {
                dir: dir.to_path_buf(),
                _lock: None,
            }),
            other => other,
        }
    }

    /// Opened without the lock: writes are refused.
    pub fn is_read_only(&self) -> bool {
        self._lock.is_none()
    }

    fn writable(&self) -> Result<(), HomeError> {
        if self.is_read_only() {
            return Err(HomeError::ReadOnly(self.dir.clone()));
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn has_identity(&self) -> bool {
        self.dir.join(NOSTR_KEY_FILE).exists()
    }

    /// Stores `keys` as this home's identity. Refuses to replace an existing one: the MLS
    /// state in this home belongs to that identity.
    pub fn set_identity(&self, keys: &Keys) -> Result<(), HomeError> {
        self.writable()?;
        if self.has_identity() {
            return Err(HomeError::IdentityExists(self.dir.clone()));
        }
        let nsec = keys
            .secret_key()
            .to_bech32()
            .map_err(|e| HomeError::BadKey(e.to_string()))?;
        write_secret(&self.dir.join(NOSTR_KEY_FILE), nsec.as_bytes())
    }

    /// The stored identity.
    pub fn keys(&self) -> Result<Keys, HomeError> {
        let path = self.dir.join(NOSTR_KEY_FILE);
        if !path.exists() {
            return Err(HomeError::NoIdentity(self.dir.clone()));
        }
        let text = read_secret(&path)?;
        parse_secret_key(text.trim()).map_err(|_| HomeError::BadSecret {
            path,
            reason: "not a Nostr secret key".into(),
        })
    }

    /// MDK storage in `mdk.sqlite`, encrypted with the key in `storage.key` (made on first
    /// use, 32 random bytes).
    pub fn storage(&self) -> Result<MdkSqliteStorage, HomeError> {
        let key_path = self.dir.join(STORAGE_KEY_FILE);
        let db_path = self.dir.join(DATABASE_FILE);
        if !key_path.exists() {
            if db_path.exists() {
                return Err(HomeError::BadSecret {
                    path: key_path,
                    reason: format!("missing, but {} exists", db_path.display()),
                });
            }
            self.writable()?;
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            write_secret(&key_path, hex::encode(key).as_bytes())?;
        }
        let text = read_secret(&key_path)?;
        let key: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| HomeError::BadSecret {
                path: key_path.clone(),
                reason: "not 32 bytes of hex".into(),
            })?;
        if fs::metadata(&db_path).is_ok_and(|m| m.len() == 0) {
            return Err(HomeError::EmptyDatabase(db_path));
        }
        quiet_sqlcipher();
        use mdk_sqlite_storage::error::Error as E;
        MdkSqliteStorage::new_with_key(&db_path, EncryptionConfig::new(key)).map_err(|e| match e {
            E::WrongEncryptionKey => HomeError::WrongStorageKey {
                db: db_path.clone(),
                key: key_path.clone(),
            },
            E::UnencryptedDatabaseWithEncryption => HomeError::UnencryptedDatabase(db_path.clone()),
            other => HomeError::Storage {
                path: db_path.clone(),
                reason: other.to_string(),
            },
        })
    }

    /// Per group (MLS group id hex): where catching up resumes.
    pub fn sync_cursors(&self) -> Result<BTreeMap<String, SyncCursor>, HomeError> {
        let path = self.dir.join(SYNC_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| HomeError::BadSyncState {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Replaces the sync cursors atomically (write to a temporary file, then rename).
    pub fn save_sync_cursors(
        &self,
        cursors: &BTreeMap<String, SyncCursor>,
    ) -> Result<(), HomeError> {
        self.writable()?;
        let bytes = serde_json::to_vec_pretty(cursors).expect("cursors serialize");
        write_private_atomic(&self.dir, SYNC_FILE, &bytes)
    }
}

impl Home {
    /// Welcomes not yet sent (see [`OutboxWelcome`]).
    pub fn outbox(&self) -> Result<Vec<OutboxWelcome>, HomeError> {
        let path = self.dir.join(OUTBOX_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| HomeError::BadOutbox {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Replaces the unsent welcomes atomically (fsynced before it returns: the caller
    /// publishes a commit next and relies on these surviving a crash).
    pub fn save_outbox(&self, outbox: &[OutboxWelcome]) -> Result<(), HomeError> {
        self.writable()?;
        let bytes = serde_json::to_vec_pretty(outbox).expect("outbox serializes");
        write_private_atomic(&self.dir, OUTBOX_FILE, &bytes)?;
        // The rename itself must be durable too.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }
}

/// SQLCipher writes its own log lines to stderr (e.g. "ERROR CORE sqlcipher_page_cipher:
/// hmac check failed") when a key does not fit; `call` reports that case in one sentence.
/// The log filter is global to the library, so one throwaway connection sets it (the source
/// filter, because the level is reset to WARN when SQLCipher is first activated).
fn quiet_sqlcipher() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(conn) = rusqlite::Connection::open_in_memory() {
            let _ = conn.execute_batch("PRAGMA cipher_log_source = NONE;");
        }
    });
}

/// Accepts `nsec1…` or 64 hex digits.
pub fn parse_secret_key(text: &str) -> Result<Keys, HomeError> {
    Keys::parse(text).map_err(|_| HomeError::BadKey("expected nsec1… or 64 hex digits".into()))
}

trait DirBuilderExt2 {
    fn mode_0700(&mut self) -> &mut Self;
}

impl DirBuilderExt2 for fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

/// Creates `path` with mode 0600 from the start (never briefly world-readable).
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), HomeError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// Replaces `dir/name` atomically with `bytes`, mode 0600 from the start: the file says
/// which groups we are in and when we last heard from them (metadata worth keeping private).
fn write_private_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), HomeError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    // A leftover temporary file (a crash mid-write) may have any mode: start afresh.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads a secret file, refusing it if group or others may read it.
fn read_secret(path: &Path) -> Result<String, HomeError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(HomeError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io_err(path))
}

/// Names of the files in a home that hold secrets (for checks and tests).
pub const SECRET_FILES: [&str; 3] = [NOSTR_KEY_FILE, STORAGE_KEY_FILE, DATABASE_FILE];
