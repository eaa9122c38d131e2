//! Marmot groups: a Nostr identity, MLS state through MDK, and the Nostr relays that carry
//! key packages, welcomes and group messages (PROTOCOL.md §1).

mod home;
mod manage;
mod member;

pub use home::{parse_secret_key, Home, HomeError, SyncCursor, SECRET_FILES};
pub use manage::{
    advance as advance_cursor, CommitOutcome, GroupEventOutcome, Resume, SyncOutcome,
    DEFAULT_TIMEOUT,
};
pub use mdk_sqlite_storage::MdkSqliteStorage;
pub use mdk_storage_traits::groups::types::Group;
pub use mdk_storage_traits::welcomes::types::Welcome;
pub use member::{CallSecretExport, GroupError, GroupEvents, GroupMember, GroupRef, Rumor};

/// MLS exporter label for call media keys (PROTOCOL.md §3).
pub use crate::media::keys::EXPORTER_LABEL;
