//! Marmot groups: a Nostr identity, MLS state through MDK, and the Nostr relays that carry
//! key packages, welcomes and group messages (PROTOCOL.md §1).

mod fetch;
mod home;
mod manage;
mod member;
mod profiles;

pub use fetch::{
    event_size, horizon, is_future_dated, FetchError, Fetched, MAX_CLOCK_SKEW, MAX_EVENT_BYTES,
    MAX_FETCH_EVENTS, MAX_PAGES, PAGE_LIMIT,
};
pub use home::{parse_secret_key, Home, HomeError, OutboxWelcome, SyncCursor, SECRET_FILES};
pub use manage::{
    advance as advance_cursor, CommitOutcome, DropReason, Dropped, GroupEventOutcome,
    PreparedInvite, Refused, Resume, SyncOutcome, WelcomeFetch, DEFAULT_TIMEOUT,
};
pub use mdk_sqlite_storage::MdkSqliteStorage;
pub use mdk_storage_traits::groups::types::Group;
pub use mdk_storage_traits::welcomes::types::Welcome;
pub use member::{
    live_since, CallSecretExport, GroupError, GroupEvents, GroupMember, GroupRef, Rumor,
};
pub use profiles::{clean_name, MAX_NAME_CHARS};

/// MLS exporter label for call media keys (PROTOCOL.md §3).
pub use crate::media::keys::EXPORTER_LABEL;
