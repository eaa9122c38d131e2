//! Marmot groups: a Nostr identity, MLS state through MDK, and the Nostr relays that carry
//! key packages, welcomes and group messages (PROTOCOL.md §1).

mod member;

pub use member::{CallSecretExport, GroupError, GroupInbox, GroupMember, GroupRef, Rumor};

/// MLS exporter label for call media keys (PROTOCOL.md §3).
pub use crate::media::keys::EXPORTER_LABEL;
