//! Complete, bounded fetches from relays, and the clock rule for events from the network.
//!
//! A relay answers one REQ with at most `limit` events (nostr-relay-builder: 500 by default),
//! newest first. A single query therefore shows only the newest page, and anyone who can
//! publish to the relay can push a real commit or welcome out of that page with garbage. So
//! every fetch here pages backwards (`until` = oldest `created_at` seen, inclusive, because
//! more events may share that second) until a page brings nothing new, one relay at a time
//! (pages of different relays cannot be merged into one `until`), within a bound on work.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// Largest event (content plus tag values, in bytes) the client accepts from a relay. Below
/// nostr-sdk's own 5 MB message cap, so every event refused for size is refused here and
/// counted, not dropped inside the library with only a log line. 4 MiB leaves room for the
/// welcome of a large group (it carries the ratchet tree, twice encrypted).
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Ids of distinct events refused for their size (bounded: past this many ids, each
/// delivery counts).
const OVERSIZED_IDS_KEPT: usize = 100_000;

/// Shared state of an [`AdmitGate`]: its size limit, the distinct oversized events it
/// refused, and the deliveries it refused because their id or signature does not verify.
#[derive(Debug, Clone)]
pub struct GateCounters {
    max: Arc<AtomicUsize>,
    refused: Arc<Mutex<(HashSet<EventId>, usize)>>,
    forged: Arc<AtomicUsize>,
}

impl GateCounters {
    /// Distinct oversized events refused so far.
    pub fn oversized(&self) -> usize {
        self.refused.lock().map(|g| g.1).unwrap_or(0)
    }

    /// Deliveries refused so far because their id or signature does not verify. Each
    /// delivery counts: forged copies of one real event share its id, so ids cannot tell
    /// them apart.
    pub fn invalid_signature(&self) -> usize {
        self.forged.load(Ordering::Relaxed)
    }

    /// Changes the limit (bytes) for events received from now on.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    fn record_oversized(&self, id: EventId) {
        if let Ok(mut g) = self.refused.lock() {
            let (ids, n) = &mut *g;
            if ids.len() >= OVERSIZED_IDS_KEPT || ids.insert(id) {
                *n += 1;
            }
        }
    }
}

/// nostr-sdk admission hook, run on every event a relay delivers (fetches and live
/// subscriptions alike) before it is stored, notified or returned: refuses and counts
/// events larger than the limit, and events whose id or signature does not verify.
///
/// nostr-sdk 0.44 verifies events itself but caches the verdict by id alone, so a forged
/// copy of an event it verified before (same id and signature, other content) passes its
/// check; on a live subscription such a copy is then not even notified (its id counts as
/// seen), so it would be dropped without trace. Checked here, it is refused and counted
/// whatever path it came by. (An event whose id nostr-sdk never verified and which does
/// not verify is dropped inside nostr-sdk before this hook, with only its log line.)
#[derive(Debug)]
pub struct AdmitGate {
    state: GateCounters,
}

impl AdmitGate {
    pub fn new(max: usize) -> Self {
        Self {
            state: GateCounters {
                max: Arc::new(AtomicUsize::new(max)),
                refused: Arc::default(),
                forged: Arc::default(),
            },
        }
    }

    pub fn counters(&self) -> GateCounters {
        self.state.clone()
    }
}

/// Size of an event as counted against [`MAX_EVENT_BYTES`]: content and tag values (the
/// rest is fixed-size); cheaper than serializing every event.
pub fn event_size(event: &Event) -> usize {
    event.content.len()
        + event
            .tags
            .iter()
            .map(|t| t.as_slice().iter().map(|v| v.len() + 4).sum::<usize>())
            .sum::<usize>()
}

impl AdmitPolicy for AdmitGate {
    fn admit_event<'a>(
        &'a self,
        _relay_url: &'a RelayUrl,
        _subscription_id: &'a SubscriptionId,
        event: &'a Event,
    ) -> BoxedFuture<'a, Result<AdmitStatus, PolicyError>> {
        Box::pin(async move {
            let size = event_size(event);
            let max = self.state.max.load(Ordering::Relaxed);
            if size > max {
                self.state.record_oversized(event.id);
                tracing::warn!(id = %event.id, size, max, "refusing an oversized event");
                return Ok(AdmitStatus::rejected("oversized"));
            }
            if event.verify().is_err() {
                self.state.forged.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id = %event.id, "refusing an event whose id or signature does not verify");
                return Ok(AdmitStatus::rejected("invalid signature"));
            }
            Ok(AdmitStatus::success())
        })
    }
}

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
    /// Distinct events refused for their size during this fetch.
    pub oversized: usize,
    /// Deliveries whose id or signature does not verify: refused at the [`AdmitGate`]
    /// while this fetch ran (a live subscription's among them, if one is open), or by
    /// [`Fetched::add`].
    pub invalid_signature: usize,
}

impl Fetched {
    /// Takes one event of a page from one relay (`seen_here`: ids that relay already
    /// delivered in this fetch) into `all`; whether it was new from that relay.
    ///
    /// nostr-sdk 0.44 verifies events from relays, but its verification cache is keyed by
    /// id alone: an event that reuses the id of one it verified before passes unverified.
    /// From a second relay such a copy would replace the real event here (same id), so a
    /// hostile relay could swap a real commit for garbage. Every event is verified, and
    /// the first verified copy of an id is kept.
    pub fn add(
        &mut self,
        all: &mut HashMap<EventId, Event>,
        seen_here: &mut HashSet<EventId>,
        event: Event,
    ) -> bool {
        if !seen_here.insert(event.id) {
            self.duplicates += 1;
            return false;
        }
        if let Some(kept) = all.get(&event.id) {
            // The same event, or signed again (Schnorr signatures differ each time; the id
            // does not cover the signature); anything else under that id is forged.
            if *kept == event || event.verify().is_ok() {
                self.duplicates += 1;
            } else {
                tracing::warn!(id = %event.id, "refusing a forged copy of an event");
                self.invalid_signature += 1;
            }
            return true;
        }
        if event.verify().is_err() {
            tracing::warn!(id = %event.id, "refusing an event whose id or signature does not verify");
            self.invalid_signature += 1;
            return true;
        }
        all.insert(event.id, event);
        true
    }
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
        let oversized_before = self.gate.oversized();
        let forged_before = self.gate.invalid_signature();
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
                    if out.add(&mut all, &mut seen_here, event) {
                        new_here += 1;
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
        out.oversized = self.gate.oversized().saturating_sub(oversized_before);
        // Refused at the gate (see `AdmitGate`) while this fetch ran.
        out.invalid_signature += self.gate.invalid_signature().saturating_sub(forged_before);
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
