//! Display names of members: their kind-0 metadata (`display_name`, else `name`) from the
//! relays, for screens. Untrusted: one bounded query, the newest valid event per author,
//! names cut to [`MAX_NAME_CHARS`] printable characters; a member without one keeps no name.

use std::collections::BTreeMap;
use std::time::Duration;

use mdk_storage_traits::MdkStorageProvider;
use nostr_sdk::prelude::*;

use super::member::{GroupError, GroupMember};

/// Longest name kept (characters); a screen row has room for about this much.
pub const MAX_NAME_CHARS: usize = 24;
/// Most authors asked about in one query.
pub const MAX_AUTHORS: usize = 256;

/// A name fit for one terminal cell row: control characters dropped, whitespace collapsed,
/// cut to [`MAX_NAME_CHARS`]; `None` if nothing is left.
pub fn clean_name(raw: &str) -> Option<String> {
    let words: Vec<&str> = raw.split_whitespace().collect();
    let joined = words.join(" ");
    let name: String = joined
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME_CHARS)
        .collect();
    let name = name.trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// The name a kind-0 event gives: `display_name`, else `name`.
pub fn name_of(event: &Event) -> Option<String> {
    let meta = Metadata::from_json(&event.content).ok()?;
    meta.display_name
        .as_deref()
        .and_then(clean_name)
        .or_else(|| meta.name.as_deref().and_then(clean_name))
}

impl<S: MdkStorageProvider> GroupMember<S> {
    /// Names of `authors` from their newest kind-0 event on the connected relays, waiting
    /// at most `timeout`.
    pub async fn fetch_names(
        &self,
        authors: &[PublicKey],
        timeout: Duration,
    ) -> Result<BTreeMap<PublicKey, String>, GroupError> {
        let authors: Vec<PublicKey> = authors.iter().take(MAX_AUTHORS).copied().collect();
        if authors.is_empty() {
            return Ok(BTreeMap::new());
        }
        let filter = Filter::new()
            .kind(Kind::Metadata)
            .authors(authors.iter().copied())
            .limit(authors.len() * 2);
        let events = self
            .client
            .fetch_events_from(self.connected_relays().await?, filter, timeout)
            .await?;
        let mut newest: BTreeMap<PublicKey, &Event> = BTreeMap::new();
        for e in events.iter() {
            if e.kind != Kind::Metadata || !authors.contains(&e.pubkey) {
                continue;
            }
            let slot = newest.entry(e.pubkey).or_insert(e);
            if e.created_at > slot.created_at {
                *slot = e;
            }
        }
        Ok(newest
            .into_iter()
            .filter_map(|(pk, e)| name_of(e).map(|n| (pk, n)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_bounded() {
        assert_eq!(clean_name("  Alice \n Smith "), Some("Alice Smith".into()));
        assert_eq!(clean_name("\u{1b}[31mred"), Some("[31mred".into()));
        assert_eq!(clean_name(" \t "), None);
        assert_eq!(
            clean_name(&"x".repeat(100)).unwrap().chars().count(),
            MAX_NAME_CHARS
        );
        let keys = Keys::generate();
        let e = EventBuilder::metadata(&Metadata::new().name("bob").display_name("Bob B"))
            .sign_with_keys(&keys)
            .unwrap();
        assert_eq!(name_of(&e).as_deref(), Some("Bob B"));
        let e = EventBuilder::metadata(&Metadata::new().name("bob"))
            .sign_with_keys(&keys)
            .unwrap();
        assert_eq!(name_of(&e).as_deref(), Some("bob"));
    }
}
