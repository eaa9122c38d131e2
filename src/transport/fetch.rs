//! Joining FETCH on the publisher side: each published track keeps its newest groups for a
//! short while, and a relay that subscribes after the first frames went out fetches them
//! (draft-18 §10.12.2) instead of losing them.
//!
//! A relay subscribes when its first subscriber asks, which can be after the publisher's
//! first frames. SUBSCRIBE_OK then names the largest group already sent and the relay asks
//! for the groups up to it with a joining FETCH. Audio older than about a second is past
//! any playout deadline, so the cache is small and bounded in both count and age.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use moq_transport::coding::Location;
use moq_transport::data::{ExtensionHeaders, FetchRecord, FetchRecordObject};
use moq_transport::message::{GroupOrder, RequestErrorCode};
use moq_transport::serve::FullTrackName;
use moq_transport::session::{FetchOkInfo, FetchRequested, Publisher};
use tokio::time::Instant;

use super::AUDIO_PRIORITY;

/// Groups kept per track for joining FETCH: 1.28 s of 20 ms frames.
pub const RECENT_GROUPS: usize = 64;
/// Groups older than this are not served: they are past any playout deadline.
pub const RECENT_AGE: Duration = Duration::from_secs(1);
/// Longest a FETCH may take from arrival to the end of its response. A joining FETCH
/// waits for its SUBSCRIBE to be accepted; a requester that stops reading must not hold
/// the response open.
const FETCH_DEADLINE: Duration = Duration::from_secs(2);

/// The newest groups of one track (one object each), oldest first.
#[derive(Default)]
pub(crate) struct RecentGroups {
    groups: VecDeque<(u64, Bytes, Instant)>,
}

impl RecentGroups {
    pub(crate) fn push(&mut self, group: u64, payload: Bytes) {
        self.push_at(group, payload, Instant::now());
    }

    fn push_at(&mut self, group: u64, payload: Bytes, now: Instant) {
        while self.groups.len() >= RECENT_GROUPS
            || self
                .groups
                .front()
                .is_some_and(|(_, _, at)| now.duration_since(*at) > RECENT_AGE)
        {
            self.groups.pop_front();
        }
        self.groups.push_back((group, payload, now));
    }

    /// Cached groups with ids in `first..=last` that are still fresh, ascending.
    fn range(&self, first: u64, last: u64) -> Vec<(u64, Bytes)> {
        self.range_at(first, last, Instant::now())
    }

    fn range_at(&self, first: u64, last: u64, now: Instant) -> Vec<(u64, Bytes)> {
        let mut out: Vec<(u64, Bytes)> = self
            .groups
            .iter()
            .filter(|(g, _, at)| {
                (first..=last).contains(g) && now.duration_since(*at) <= RECENT_AGE
            })
            .map(|(g, p, _)| (*g, p.clone()))
            .collect();
        // Groups are sent in sequence, but a caller may reuse or skip ids: sort and keep
        // one object per group, as a FETCH response must be ordered.
        out.sort_by_key(|(g, _)| *g);
        out.dedup_by_key(|(g, _)| *g);
        out
    }
}

/// The tracks one connection publishes, for answering FETCH; and what was refused.
#[derive(Default)]
pub(crate) struct FetchIndex {
    tracks: Mutex<HashMap<FullTrackName, TrackCache>>,
    refused: AtomicU64,
}

struct TrackCache {
    recent: Weak<Mutex<RecentGroups>>,
    served: Weak<AtomicU64>,
}

impl FetchIndex {
    pub(crate) fn register(
        &self,
        name: FullTrackName,
        recent: &Arc<Mutex<RecentGroups>>,
        served: &Arc<AtomicU64>,
    ) {
        let mut tracks = self.tracks.lock().expect("fetch index lock");
        // Tracks whose publisher is gone are dropped here, so the map stays as small as
        // the set of live tracks.
        tracks.retain(|_, t| t.recent.strong_count() > 0);
        tracks.insert(
            name,
            TrackCache {
                recent: Arc::downgrade(recent),
                served: Arc::downgrade(served),
            },
        );
    }

    /// FETCH requests refused on this connection (unknown track, groups no longer cached,
    /// unresolvable joining FETCH).
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn lookup(&self, name: &FullTrackName) -> Option<(Arc<Mutex<RecentGroups>>, Arc<AtomicU64>)> {
        let tracks = self.tracks.lock().expect("fetch index lock");
        let t = tracks.get(name)?;
        Some((t.recent.upgrade()?, t.served.upgrade()?))
    }

    fn refuse(&self, request: FetchRequested, code: RequestErrorCode, reason: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(id = request.id(), "FETCH refused: {reason}");
        let _ = request.reject(code, reason);
    }
}

/// Answers every FETCH of one session from the index, until the session ends.
/// moq-transport caps the FETCHes in flight per session (EXCESSIVE_LOAD beyond), so the
/// set of responses being written is bounded.
pub(crate) async fn serve_fetches(mut publisher: Publisher, index: Arc<FetchIndex>) {
    let mut serving = FuturesUnordered::new();
    loop {
        tokio::select! {
            request = publisher.fetch_requested() => match request {
                Some(request) => {
                    let index = index.clone();
                    serving.push(async move {
                        let id = request.id();
                        if tokio::time::timeout(FETCH_DEADLINE, answer(request, &index)).await.is_err() {
                            // The response (or its resolution) was dropped: the requester
                            // gets INTERNAL_ERROR or a reset stream, never a hang.
                            index.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(id, "FETCH not answered within {FETCH_DEADLINE:?}");
                        }
                    });
                }
                None => break,
            },
            Some(()) = serving.next(), if !serving.is_empty() => {}
        }
    }
}

async fn answer(request: FetchRequested, index: &FetchIndex) {
    let range = match request.resolve().await {
        Ok(Some(range)) => range,
        // resolve() already sent REQUEST_ERROR (unknown subscription, empty range).
        Ok(None) => {
            index.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(e) => {
            return index.refuse(
                request,
                RequestErrorCode::InternalError,
                &format!("resolving: {e}"),
            )
        }
    };
    let name = FullTrackName {
        namespace: range.track_namespace.clone(),
        name: range.track_name.clone(),
    };
    let Some((recent, served)) = index.lookup(&name) else {
        return index.refuse(request, RequestErrorCode::DoesNotExist, "no such track");
    };
    // End Location is exclusive ("last object plus one", or {g, 0} for all of group g):
    // either way our one object per group, object 0, of group `end.group_id` is inside.
    let end = range.end_location;
    let mut groups = recent
        .lock()
        .expect("recent groups lock")
        .range(range.start_location.group_id, end.group_id);
    // A start at {g, 1} or later excludes group g: it has no object past 0.
    groups.retain(|(g, _)| Location::new(*g, 0) >= range.start_location);
    let Some(&(newest, _)) = groups.last() else {
        return index.refuse(
            request,
            RequestErrorCode::InvalidRange,
            "those groups are no longer cached",
        );
    };
    if request.group_order() == Some(GroupOrder::Descending) {
        groups.reverse();
    }
    let info = FetchOkInfo {
        end_of_track: false,
        // What we can give ends at our newest cached group in the range.
        end_location: Location::new(newest, 1).min(end_or_max(end)),
        params: Default::default(),
        track_extensions: Default::default(),
    };
    let mut writer = match request.respond(info).await {
        Ok(writer) => writer,
        Err(e) => {
            tracing::debug!("FETCH_OK failed: {e}");
            return;
        }
    };
    for (group, payload) in groups {
        let record = FetchRecord::Object(FetchRecordObject {
            group_id: group,
            subgroup_id: Some(0),
            object_id: 0,
            publisher_priority: AUDIO_PRIORITY,
            extension_headers: ExtensionHeaders::default(),
            payload_length: payload.len() as u64,
        });
        if let Err(e) = writer.write_record(&record).await {
            tracing::debug!("FETCH response ended: {e}");
            return;
        }
        if let Err(e) = writer.write_payload(&payload).await {
            tracing::debug!("FETCH response ended: {e}");
            return;
        }
        served.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(e) = writer.finish().await {
        tracing::debug!("finishing a FETCH response: {e}");
    }
}

/// The exclusive end as a comparable location: {g, 0} ("all of group g") sorts after
/// every object of group g.
fn end_or_max(end: Location) -> Location {
    match end.object_id {
        0 => Location::new(end.group_id, u64::MAX),
        _ => end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_groups_keep_the_newest_64() {
        let mut recent = RecentGroups::default();
        for g in 0..100u64 {
            recent.push(g, Bytes::from(vec![g as u8]));
        }
        let kept = recent.range(0, u64::MAX);
        assert_eq!(kept.len(), RECENT_GROUPS);
        assert_eq!(kept.first().map(|(g, _)| *g), Some(36));
        assert_eq!(kept.last().map(|(g, _)| *g), Some(99));
        assert_eq!(recent.range(40, 42).len(), 3);
    }

    #[test]
    fn recent_groups_forget_what_is_older_than_a_second() {
        let t0 = Instant::now();
        let later = t0 + RECENT_AGE + Duration::from_millis(1);
        let mut recent = RecentGroups::default();
        recent.push_at(0, Bytes::from_static(b"a"), t0);
        recent.push_at(1, Bytes::from_static(b"b"), t0 + Duration::from_millis(500));
        // Not yet evicted (no push since), but no longer served.
        let kept = recent.range_at(0, 10, later);
        assert_eq!(kept.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![1]);
        recent.push_at(2, Bytes::from_static(b"c"), later);
        assert_eq!(recent.groups.len(), 2, "group 0 evicted on push");
    }

    #[test]
    fn an_end_at_object_zero_covers_the_whole_group() {
        assert!(Location::new(5, 1) <= end_or_max(Location::new(5, 0)));
        assert_eq!(end_or_max(Location::new(5, 1)), Location::new(5, 1));
    }
}
