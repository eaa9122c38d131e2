//! Complete, bounded fetches from relays, and the clock rule for events from the network.
//!
//! A relay answers one REQ with at most `limit` events (nostr-relay-builder: 500 by default),
//! newest first. A single query therefore shows only the newest page, and anyone who can
//! publish to the relay can push a real commit or welcome out of that page with garbage. So
//! every fetch here pages backwards (`until` = oldest `created_at` seen, inclusive, because
//! more events may share that second) until a page brings nothing new, one relay at a time
//! (pages of different relays cannot be merged into one `until`), within a bound on work.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use mdk_storage_traits::MdkStorageProvider;
use nostr_sdk::prelude::*;

use super::member::{GroupError, GroupMember};

/// How far ahead of our clock an event's `created_at` may be and still be processed.
/// Clocks of honest clients drift by seconds, not minutes; anything stamped later is held
/// back (not processed, cursor unmoved) and fetched again once it is due. Five minutes is
/// also what common relays accept for future-dated events.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Events asked for per page (the usual relay cap; a relay may return fewer).
pub const PAGE_LIMIT: usize = 500;

/// Most pages one fetch reads from one relay before giving up (bound on work: 40 × 500).
pub const MAX_PAGES: usize = 40;

/// Most distinct events one fetch collects over all relays before giving up.
pub const MAX_FETCH_EVENTS: usize = 20_000;

/// The newest `created_at` that may be processed now.
pub fn horizon() -> Timestamp {
    Timestamp::now() + MAX_CLOCK_SKEW
}

/// Whether an event is stamped too far ahead of our clock to be processed now.
pub fn is_future_dated(event: &Event) -> bool {
    event.created_at > horizon()
}

/// Why a fetch could not see everything in its window.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "{relay} has more {what} than one catch-up reads ({pages} pages, {events} events; \
         limits {MAX_PAGES} pages per relay, {MAX_FETCH_EVENTS} events): nothing was \
         processed and the cursor did not move; the relay is flooded, try another relay"
    )]
    TooMany {
        what: &'static str,
        relay: RelayUrl,
        pages: usize,
        events: usize,
    },
    #[error(
        "{relay} holds at least {count} {what} stamped in the same second ({at}); paging by \
         time cannot get past them, so the fetch is incomplete: nothing was processed and the \
         cursor did not move"
    )]
    SameSecond {
        what: &'static str,
        relay: RelayUrl,
        at: Timestamp,
        count: usize,
    },
}

/// What one complete fetch found.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Distinct events, in no particular order.
    pub events: Vec<Event>,
    /// Pages read, over all relays.
    pub pages: usize,
    /// Events delivered more than once (by several relays, or on overlapping pages).
    pub duplicates: usize,
}

impl<S: MdkStorageProvider> GroupMember<S> {
    /// Every event matching `filter` with `created_at` ≤ `until` on every connected relay,
    /// paged to completion. `filter` must not carry `until` or `limit` (they are set here).
    /// Fails rather than return a partial answer.
    pub(super) async fn fetch_all(
        &self,
        what: &'static str,
        filter: Filter,
        until: Timestamp,
    ) -> Result<Fetched, GroupError> {
        let mut all: HashMap<EventId, Event> = HashMap::new();
        let mut out = Fetched::default();
        for relay in self.connected_relays().await? {
            let mut seen_here: HashSet<EventId> = HashSet::new();
            let mut until = until;
            let mut pages = 0;
            loop {
                if pages >= MAX_PAGES || all.len() >= MAX_FETCH_EVENTS {
                    return Err(FetchError::TooMany {
                        what,
                        relay,
                        pages,
                        events: all.len(),
                    }
                    .into());
                }
                pages += 1;
                out.pages += 1;
                let page = self
                    .client
                    .fetch_events_from(
                        [relay.clone()],
                        filter.clone().until(until).limit(PAGE_LIMIT),
                        self.timeout,
                    )
                    .await?;
                let len = page.len();
                let mut new_here = 0;
                let mut oldest = until;
                let mut all_at_until = true;
                for event in page {
                    oldest = oldest.min(event.created_at);
                    all_at_until &= event.created_at == until;
                    if !seen_here.insert(event.id) {
                        out.duplicates += 1;
                        continue;
                    }
                    new_here += 1;
                    if all.insert(event.id, event).is_some() {
                        out.duplicates += 1;
                    }
                }
                if new_here == 0 {
                    // A full page of already seen events, all at `until`: more than a page
                    // share that second and the rest cannot be reached by time.
                    if len >= PAGE_LIMIT && all_at_until {
                        return Err(FetchError::SameSecond {
                            what,
                            relay,
                            at: until,
                            count: len,
                        }
                        .into());
                    }
                    break;
                }
                until = oldest;
            }
        }
        out.events = all.into_values().collect();
        Ok(out)
    }

    /// How many events matching `filter` are stamped beyond [`horizon`] (held back, not
    /// fetched by [`Self::fetch_all`]); counts at most one page per relay.
    pub(super) async fn count_future_dated(&self, filter: Filter) -> Result<usize, GroupError> {
        let filter = filter
            .since(horizon() + Duration::from_secs(1))
            .limit(PAGE_LIMIT);
        let mut ids = HashSet::new();
        for relay in self.connected_relays().await? {
            let page = self
                .client
                .fetch_events_from([relay], filter.clone(), self.timeout)
                .await?;
            ids.extend(page.into_iter().map(|e| e.id));
        }
        Ok(ids.len())
    }
}
