//! The MoQ side: accepts sessions, binds namespaces to relay tokens, records which sessions
//! announced which namespaces, and fans each track out from one upstream subscription.
//!
//! Fan-out is done here rather than by handing one shared `TrackReader` to every
//! downstream `Subscribed::serve`: moq-transport 0.17 gives clones of a track's reader made
//! after the first one started reading a cursor at "now", so subscribers that attached
//! while the first object was in flight lost it. Each downstream subscriber gets its own
//! track, written by the upstream task, which also keeps the newest complete group so a
//! late subscriber starts from it at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use moq_transport::coding::TrackNamespace;
use moq_transport::data::ObjectStatus;
use moq_transport::message::RequestErrorCode;
use moq_transport::serve::{
    Datagram, DatagramsWriter, FullTrackName, ServeError, Subgroup, SubgroupReader, SubgroupWriter,
    SubgroupsWriter, Track, TrackReaderMode, TrackWriter,
};
use moq_transport::session::{PublishedNamespace, Publisher, Session, Subscribed, Subscriber};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::throttle::LogThrottle;
use crate::{AuthMode, RelayConfig};

type Upstream = watch::Receiver<Option<Result<Arc<Hub>, ServeError>>>;

/// QUIC close code for a session the relay refuses outright (limits, bad SETUP tokens).
const REFUSED_SESSION: u32 = 0x1;

struct TrackEntry {
    generation: u64,
    upstream: Upstream,
}

/// Limits and policy taken from [`RelayConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub auth: AuthMode,
    pub token_scope: usize,
    pub max_sessions: u64,
    pub max_tracks_per_session: usize,
    pub max_object_bytes: usize,
    pub max_unsent_groups: usize,
    pub setup_timeout: Duration,
    pub max_sessions_per_address: usize,
}

impl From<&RelayConfig> for Policy {
    fn from(c: &RelayConfig) -> Self {
        Self {
            auth: c.auth,
            token_scope: usize::from(c.token_scope),
            max_sessions: c.max_sessions,
            max_tracks_per_session: c.max_tracks_per_session,
            max_object_bytes: c.max_object_bytes,
            max_unsent_groups: c.max_unsent_groups,
            setup_timeout: Duration::from_secs(c.setup_timeout),
            max_sessions_per_address: usize::try_from(c.max_sessions_per_address)
                .unwrap_or(usize::MAX),
        }
    }
}

/// A token scope's binding: SHA-256 of the token that first used a namespace in it, and how
/// many live sessions use it (the binding is forgotten with the last one).
struct Binding {
    token_hash: [u8; 32],
    sessions: usize,
}

/// Routing state shared by every session.
pub(crate) struct Routes {
    policy: Policy,
    /// Sessions that announced each namespace, oldest first. Several participants of one
    /// call announce the same namespace, each with its own track in it.
    namespaces: Mutex<HashMap<TrackNamespace, Vec<(u64, Subscriber)>>>,
    /// Keyed by token scope: a namespace's first `Policy::token_scope` fields.
    bindings: Mutex<HashMap<TrackNamespace, Binding>>,
    tracks: Mutex<HashMap<FullTrackName, TrackEntry>>,
    /// Every live session's transport, so shutdown can close them all with a reason.
    live: Mutex<HashMap<u64, moq_transport::session::transport::Session>>,
    /// Sessions (admitted, with or without SETUP yet) per source address key
    /// ([`address_key`]); an entry goes with its last session.
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Refusals come in floods; one log line per second says how many.
    refusal_log: LogThrottle,
    next_id: AtomicU64,
    pub(crate) stats: Stats,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub sessions: AtomicU64,
    pub upstream_tracks: AtomicU64,
    pub downstream_subscriptions: AtomicU64,
    /// Objects received from publishers.
    pub objects_in: AtomicU64,
    /// Object copies handed to subscribers' sessions.
    pub objects_out: AtomicU64,
    /// Object copies not delivered: a subscriber's track was gone or an object too large.
    pub drops: AtomicU64,
    /// Object copies skipped because the subscriber had too many groups still unsent.
    pub behind: AtomicU64,
    /// Sessions, announces and subscribes refused (tokens, limits).
    pub refused: AtomicU64,
    /// Sessions closed because no SETUP arrived in time (not in `refused`).
    pub setup_timeouts: AtomicU64,
    /// Sessions refused because their source address had too many (also in `refused`).
    pub refused_per_address: AtomicU64,
    /// Objects received from publishers as OBJECT_DATAGRAMs (also in `objects_in`).
    pub datagrams_in: AtomicU64,
    /// Datagram copies not sent because they exceed what a path carries (also in `drops`).
    pub datagrams_too_large: AtomicU64,
}

/// What one session presented and holds.
struct SessionCtx {
    id: u64,
    /// SHA-256 of every AUTHORIZATION TOKEN the session presented in SETUP, in order.
    token_hashes: Vec<[u8; 32]>,
    /// Token scopes this session has used (so their bindings can be released).
    used: Mutex<HashSet<TrackNamespace>>,
    /// Announces plus downstream subscriptions currently open.
    tracks: AtomicUsize,
}

#[derive(Debug)]
enum Refusal {
    MissingToken,
    WrongToken,
    TooManyTracks(usize),
}

impl Refusal {
    fn code(&self) -> u64 {
        match self {
            Self::MissingToken | Self::WrongToken => RequestErrorCode::Unauthorized as u64,
            Self::TooManyTracks(_) => RequestErrorCode::ExcessiveLoad as u64,
        }
    }

    fn reason(&self) -> String {
        match self {
            Self::MissingToken => "no relay token presented in SETUP".into(),
            Self::WrongToken => "namespace is bound to another relay token".into(),
            Self::TooManyTracks(n) => format!("session already has {n} tracks (limit)"),
        }
    }
}

/// One upstream track's fan-out: the downstream subscribers' track writers, the groups
/// being copied right now, and the newest complete group. A subscriber that attaches gets
/// the groups in flight (objects so far, then the rest live) or, when none is, the newest
/// complete group.
///
/// A track is delivered either as subgroups (a QUIC stream per group) or as
/// OBJECT_DATAGRAMs; which one is known only when the publisher's first object arrives, so
/// subscribers that attach before wait in `pending` with an undecided track. A datagram
/// track is forwarded datagram by datagram, with nothing cached: a late subscriber starts
/// with the next one (for audio, 20 ms later).
pub(crate) struct Hub {
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    mode: HubMode,
    pending: Vec<TrackWriter>,
    downstream: Vec<Downstream>,
    datagram_outs: Vec<DatagramsWriter>,
    inflight: Vec<Arc<Mutex<GroupCopy>>>,
    latest: Option<CachedGroup>,
    closed: bool,
}

/// How the upstream track delivers its objects.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum HubMode {
    /// No object yet.
    #[default]
    Unknown,
    Subgroups,
    Datagrams,
}

/// Worst-case bytes an OBJECT_DATAGRAM header adds to its payload and extension headers:
/// type (1), track alias, group and object id (8-byte varints at most) and priority (1).
const DATAGRAM_HEADER_MAX: usize = 26;

/// The largest encoded datagram forwarded: what one QUIC datagram carries on any path
/// (QUIC's 1200-byte minimum packet less the short header with the longest connection id,
/// packet number, AEAD tag, DATAGRAM frame header and WebTransport's session prefix).
///
/// Not each subscriber's own limit: moq-transport's session hides the QUIC connection, and
/// its `max_datagram_size` panics for a peer that takes no datagrams. A larger datagram
/// could end that subscriber's subscription (moq-transport ends it when QUIC refuses one),
/// so it is dropped and counted instead.
const PATH_DATAGRAM_MAX: usize = 1142;

/// The bytes `datagram` takes on the wire at most, QUIC framing aside.
fn datagram_size(datagram: &Datagram) -> usize {
    use moq_transport::coding::Encode;
    let extensions = if datagram.extension_headers.0.is_empty() {
        0
    } else {
        let mut buf = bytes::BytesMut::new();
        match datagram.extension_headers.encode(&mut buf) {
            Ok(()) => buf.len(),
            // Not encodable: as good as too large.
            Err(_) => usize::MAX / 2,
        }
    };
    DATAGRAM_HEADER_MAX + extensions + datagram.payload.len()
}

/// One subscriber's track, and the first object of each group handed to it that its
/// session has not yet written to QUIC.
///
/// moq-transport 0.17 does not say how far a subscriber's reader is behind, so the relay
/// gives every subscriber its own copy of a group's first object and keeps a handle to
/// it: moq-transport holds the copy until the group has been written to the connection,
/// so a copy that is no longer shared (`Bytes::is_unique`) marks a group that left.
///
/// Only every [`PROBE_EVERY`]th group is copied and measured, which keeps the cost to a
/// fraction of an allocation per object and subscriber.
struct Downstream {
    writer: SubgroupsWriter,
    unsent: Arc<Mutex<VecDeque<Bytes>>>,
    /// Set at the last probe group: the subscriber is too far behind for new groups.
    behind: bool,
}

/// One group in this many carries a backlog probe.
const PROBE_EVERY: u64 = 4;

fn is_probe(group_id: u64) -> bool {
    group_id.is_multiple_of(PROBE_EVERY)
}

impl Downstream {
    /// Probe groups handed to this subscriber and not yet written to its connection; each
    /// stands for [`PROBE_EVERY`] groups.
    fn unsent_probes(&self) -> usize {
        let mut unsent = self.unsent.lock().expect("unsent lock");
        unsent.retain(|b| !b.is_unique());
        unsent.len()
    }
}

/// A subscriber's subgroup for one group, and where to record its first object.
struct Out {
    writer: SubgroupWriter,
    unsent: Arc<Mutex<VecDeque<Bytes>>>,
}

struct CachedGroup {
    subgroup: Subgroup,
    objects: Vec<Bytes>,
}

/// One upstream subgroup being copied to every subscriber.
struct GroupCopy {
    subgroup: Subgroup,
    objects: Vec<Bytes>,
    outs: Vec<Out>,
    done: bool,
}

fn replay(
    writer: &mut SubgroupsWriter,
    group: &CachedGroup,
    stats: &Stats,
) -> Option<SubgroupWriter> {
    let mut out = writer.create(group.subgroup.clone()).ok()?;
    for object in &group.objects {
        out.write(object.clone()).ok()?;
        stats.objects_out.fetch_add(1, Ordering::Relaxed);
    }
    Some(out)
}

impl Hub {
    fn new() -> Self {
        Self {
            state: Mutex::new(HubState::default()),
        }
    }

    fn is_closed(&self) -> bool {
        self.state.lock().expect("hub lock").closed
    }

    /// Adds a subscriber; once the upstream's delivery is known its track takes the same
    /// (see [`Hub`]).
    fn attach(&self, writer: TrackWriter, stats: &Stats) -> bool {
        let mut state = self.state.lock().expect("hub lock");
        if state.closed {
            return false;
        }
        match state.mode {
            HubMode::Unknown => {
                state.pending.push(writer);
                true
            }
            HubMode::Subgroups => match writer.subgroups() {
                Ok(subgroups) => {
                    Self::attach_subgroups(&mut state, subgroups, stats);
                    true
                }
                Err(_) => false,
            },
            HubMode::Datagrams => match writer.datagrams() {
                Ok(datagrams) => {
                    state.datagram_outs.push(datagrams);
                    true
                }
                Err(_) => false,
            },
        }
    }

    /// The upstream's first object came: its delivery is now known, and the subscribers
    /// that attached before get their tracks in that mode.
    fn set_mode(&self, mode: HubMode, stats: &Stats) {
        let mut state = self.state.lock().expect("hub lock");
        state.mode = mode;
        for writer in std::mem::take(&mut state.pending) {
            // A writer that cannot switch has lost its reader: the subscriber is gone.
            match mode {
                HubMode::Subgroups => {
                    if let Ok(subgroups) = writer.subgroups() {
                        Self::attach_subgroups(&mut state, subgroups, stats);
                    }
                }
                HubMode::Datagrams => {
                    if let Ok(datagrams) = writer.datagrams() {
                        state.datagram_outs.push(datagrams);
                    }
                }
                HubMode::Unknown => state.pending.push(writer),
            }
        }
    }

    /// Forwards one upstream datagram to every subscriber whose path carries it, dropping
    /// subscribers that are gone.
    fn datagram(&self, mut datagram: Datagram, max_object_bytes: usize, stats: &Stats) {
        stats.objects_in.fetch_add(1, Ordering::Relaxed);
        stats.datagrams_in.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().expect("hub lock");
        let copies = state.datagram_outs.len() as u64;
        if datagram.payload.len() > max_object_bytes {
            tracing::debug!(
                size = datagram.payload.len(),
                limit = max_object_bytes,
                "datagram over the size limit dropped"
            );
            stats.drops.fetch_add(copies + 1, Ordering::Relaxed);
            return;
        }
        if datagram.status != ObjectStatus::NormalObject && !datagram.payload.is_empty() {
            // Not encodable; moq-transport would end each subscriber's subscription on it.
            stats.drops.fetch_add(copies + 1, Ordering::Relaxed);
            return;
        }
        if datagram.payload.is_empty() {
            // A zero-length object goes out as a status datagram, which has no end-of-group
            // form; with the flag set moq-transport would end the subscription instead.
            datagram.end_of_group = false;
        }
        if datagram_size(&datagram) > PATH_DATAGRAM_MAX {
            tracing::debug!(
                size = datagram.payload.len(),
                "datagram larger than a path carries dropped"
            );
            stats.drops.fetch_add(copies + 1, Ordering::Relaxed);
            stats
                .datagrams_too_large
                .fetch_add(copies, Ordering::Relaxed);
            return;
        }
        // A subscriber whose writer is gone (unsubscribed, session ended) is dropped.
        state
            .datagram_outs
            .retain_mut(|out| out.write(datagram.clone()).is_ok());
        let sent = state.datagram_outs.len() as u64;
        stats.objects_out.fetch_add(sent, Ordering::Relaxed);
        stats.drops.fetch_add(copies - sent, Ordering::Relaxed);
    }

    /// Adds a subscriber of a subgroup track, first handing it what is in flight or the
    /// newest complete group.
    fn attach_subgroups(state: &mut HubState, writer: SubgroupsWriter, stats: &Stats) {
        let mut down = Downstream {
            writer,
            unsent: Arc::default(),
            behind: false,
        };
        let writer = &mut down.writer;
        let mut joined_inflight = false;
        for group in &state.inflight {
            let mut group = group.lock().expect("group lock");
            if group.done {
                continue;
            }
            let so_far = CachedGroup {
                subgroup: group.subgroup.clone(),
                objects: group.objects.clone(),
            };
            if let Some(out) = replay(writer, &so_far, stats) {
                group.outs.push(Out {
                    writer: out,
                    unsent: down.unsent.clone(),
                });
                joined_inflight = true;
            }
        }
        if !joined_inflight {
            if let Some(out) = state
                .latest
                .as_ref()
                .and_then(|cached| replay(writer, cached, stats))
            {
                let _ = out.finish();
            }
        }
        state.downstream.push(down);
    }

    /// Opens `subgroup` on every live subscriber that is not too far behind, dropping
    /// subscribers that are gone.
    fn open(&self, subgroup: &Subgroup, max_unsent: usize, stats: &Stats) -> Arc<Mutex<GroupCopy>> {
        let mut state = self.state.lock().expect("hub lock");
        let mut outs = Vec::with_capacity(state.downstream.len());
        let probe = is_probe(subgroup.group_id);
        let max_probes = max_unsent.div_ceil(PROBE_EVERY as usize);
        state.downstream.retain_mut(|down| {
            if max_unsent > 0 && probe {
                down.behind = down.unsent_probes() >= max_probes;
            }
            if down.behind {
                // For live media a stale group is worth less than a fresh one: skip this
                // group for it and send it fresh ones once its connection has caught up.
                stats.behind.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            match down.writer.create(subgroup.clone()) {
                Ok(writer) => {
                    outs.push(Out {
                        writer,
                        unsent: down.unsent.clone(),
                    });
                    true
                }
                // The subscriber's reader is gone (unsubscribed or session ended).
                Err(_) => false,
            }
        });
        let copy = Arc::new(Mutex::new(GroupCopy {
            subgroup: subgroup.clone(),
            objects: Vec::new(),
            outs,
            done: false,
        }));
        state.inflight.push(copy.clone());
        copy
    }

    /// Moves a finished group out of flight and keeps it if it is the newest.
    fn finished(&self, copy: &Arc<Mutex<GroupCopy>>) {
        let mut state = self.state.lock().expect("hub lock");
        state.inflight.retain(|g| !Arc::ptr_eq(g, copy));
        let mut group = copy.lock().expect("group lock");
        if group.objects.is_empty() {
            return;
        }
        let newer = state
            .latest
            .as_ref()
            .is_none_or(|l| group.subgroup.group_id >= l.subgroup.group_id);
        if newer {
            state.latest = Some(CachedGroup {
                subgroup: group.subgroup.clone(),
                objects: std::mem::take(&mut group.objects),
            });
        }
    }

    /// Ends every subscriber's track (they see the track end and may re-subscribe).
    fn close(&self) {
        let mut state = self.state.lock().expect("hub lock");
        state.closed = true;
        state.pending.clear();
        state.downstream.clear();
        state.datagram_outs.clear();
        state.inflight.clear();
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of each AUTHORIZATION TOKEN value in a SETUP's options, in order: all the relay
/// keeps of a token.
fn token_hashes(
    params: &moq_transport::coding::KeyValuePairs,
) -> Result<Vec<[u8; 32]>, moq_transport::setup::TokenError> {
    let tokens = moq_transport::setup::decode_setup_tokens(params)?;
    Ok(tokens.iter().map(|t| sha256(t.value)).collect())
}

impl Routes {
    pub(crate) fn new(policy: Policy) -> Self {
        Self {
            policy,
            namespaces: Mutex::default(),
            bindings: Mutex::default(),
            tracks: Mutex::default(),
            live: Mutex::default(),
            per_address: Mutex::default(),
            refusal_log: LogThrottle::new(Duration::from_secs(1)),
            next_id: AtomicU64::new(0),
            stats: Stats::default(),
        }
    }

    /// Closes every session (relay shutdown).
    pub(crate) fn close_all(&self, reason: &str) {
        for (_, transport) in self.live.lock().expect("live lock").drain() {
            transport.close(0, reason);
        }
    }

    fn announcers(&self, ns: &TrackNamespace) -> Vec<Subscriber> {
        let map = self.namespaces.lock().expect("routes lock");
        // Newest first: a re-joining participant is the likeliest owner of a fresh track.
        map.get(ns)
            .map(|v| v.iter().rev().map(|(_, s)| s.clone()).collect())
            .unwrap_or_default()
    }

    /// The part of `ns` a token binding covers: its first `token_scope` fields. Binding
    /// the scope rather than the exact namespace keeps a stranger from opening new
    /// namespaces under one that is taken.
    fn token_scope(&self, ns: &TrackNamespace) -> TrackNamespace {
        let mut scope = TrackNamespace::new();
        for field in ns.fields.iter().take(self.policy.token_scope) {
            scope.add(field.clone());
        }
        scope
    }

    /// Token check for one use of `ns` by `ctx`; binds the namespace's scope on first use.
    fn authorize(&self, ctx: &SessionCtx, ns: &TrackNamespace) -> Result<(), Refusal> {
        if self.policy.auth == AuthMode::Open {
            return Ok(());
        }
        let ns = &self.token_scope(ns);
        let mut bindings = self.bindings.lock().expect("bindings lock");
        let mut used = ctx.used.lock().expect("session lock");
        match bindings.get_mut(ns) {
            Some(binding) => {
                if !ctx.token_hashes.contains(&binding.token_hash) {
                    return Err(Refusal::WrongToken);
                }
                if used.insert(ns.clone()) {
                    binding.sessions += 1;
                }
            }
            None => {
                // First use: the namespace belongs to the session's first token from now on.
                let token_hash = *ctx.token_hashes.first().ok_or(Refusal::MissingToken)?;
                bindings.insert(
                    ns.clone(),
                    Binding {
                        token_hash,
                        sessions: 1,
                    },
                );
                used.insert(ns.clone());
            }
        }
        Ok(())
    }

    fn release_bindings(&self, ctx: &SessionCtx) {
        let mut bindings = self.bindings.lock().expect("bindings lock");
        for ns in ctx.used.lock().expect("session lock").drain() {
            if let Some(b) = bindings.get_mut(&ns) {
                b.sessions = b.sessions.saturating_sub(1);
                if b.sessions == 0 {
                    bindings.remove(&ns);
                }
            }
        }
    }

    fn take_track_slot(&self, ctx: &SessionCtx) -> Result<(), Refusal> {
        let max = self.policy.max_tracks_per_session;
        ctx.tracks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(Refusal::TooManyTracks)
    }

    /// The shared upstream for `key`, starting one if none is live.
    fn upstream(self: &Arc<Self>, key: &FullTrackName) -> Upstream {
        let mut tracks = self.tracks.lock().expect("routes lock");
        if let Some(entry) = tracks.get(key) {
            let alive = match &*entry.upstream.borrow() {
                None => true,
                Some(Ok(hub)) => !hub.is_closed(),
                Some(Err(_)) => false,
            };
            if alive {
                return entry.upstream.clone();
            }
        }
        let generation = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        tracks.insert(
            key.clone(),
            TrackEntry {
                generation,
                upstream: rx.clone(),
            },
        );
        drop(tracks);
        let routes = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            routes.run_upstream(key.clone(), tx).await;
            let mut tracks = routes.tracks.lock().expect("routes lock");
            if tracks.get(&key).is_some_and(|e| e.generation == generation) {
                tracks.remove(&key);
            }
        });
        rx
    }

    /// Asks each session that announced the namespace for the track until one has it, then
    /// forwards its objects to every attached subscriber until the publisher ends it.
    async fn run_upstream(
        &self,
        key: FullTrackName,
        tx: watch::Sender<Option<Result<Arc<Hub>, ServeError>>>,
    ) {
        for mut announcer in self.announcers(&key.namespace) {
            let (writer, reader) = Track::new(key.namespace.clone(), key.name.clone()).produce();
            match announcer.subscribe_open(writer).await {
                Ok(subscription) => {
                    self.stats.upstream_tracks.fetch_add(1, Ordering::Relaxed);
                    let hub = Arc::new(Hub::new());
                    let _ = tx.send(Some(Ok(hub.clone())));
                    tokio::select! {
                        () = self.forward(&key, &reader, &hub) => {}
                        _ = subscription.closed() => {}
                    }
                    hub.close();
                    self.stats.upstream_tracks.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                Err(ServeError::NotFound | ServeError::NotFoundWithId(..)) => continue,
                Err(e) => tracing::debug!(track = %key.name, "upstream subscribe failed: {e}"),
            }
        }
        let _ = tx.send(Some(Err(ServeError::NotFound)));
    }

    async fn forward(
        &self,
        key: &FullTrackName,
        reader: &moq_transport::serve::TrackReader,
        hub: &Hub,
    ) {
        let mut groups = match reader.mode().await {
            Ok(TrackReaderMode::Subgroups(groups)) => {
                hub.set_mode(HubMode::Subgroups, &self.stats);
                groups
            }
            Ok(TrackReaderMode::Datagrams(mut datagrams)) => {
                hub.set_mode(HubMode::Datagrams, &self.stats);
                // moq-transport hands over the newest datagram at each read; this loop does
                // nothing but copy, so it keeps up with one publisher's rate. Each
                // subscriber's writer keeps only the newest datagram too: a turn after each
                // copy lets their senders take it before the next one is written over it
                // (the session hands this loop one datagram per turn for the same reason).
                loop {
                    match datagrams.read().await {
                        Ok(Some(datagram)) => {
                            hub.datagram(datagram, self.policy.max_object_bytes, &self.stats);
                            tokio::task::yield_now().await;
                        }
                        Ok(None) => return,
                        Err(e) => {
                            tracing::debug!(track = %key.name, "upstream track failed: {e}");
                            return;
                        }
                    }
                }
            }
            Ok(TrackReaderMode::Stream(_)) => {
                tracing::debug!(track = %key.name, "upstream track is in stream mode");
                return;
            }
            Err(e) => {
                tracing::debug!(track = %key.name, "upstream track ended: {e}");
                return;
            }
        };
        let mut copies = FuturesUnordered::new();
        loop {
            tokio::select! {
                next = groups.next() => match next {
                    Ok(Some(group)) => {
                        let subgroup = Subgroup {
                            group_id: group.group_id,
                            subgroup_id: group.subgroup_id,
                            priority: group.priority,
                        };
                        let copy = hub.open(&subgroup, self.policy.max_unsent_groups, &self.stats);
                        copies.push(self.copy_group(group, copy, hub));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(track = %key.name, "upstream track failed: {e}");
                        break;
                    }
                },
                Some(()) = copies.next(), if !copies.is_empty() => {}
            }
        }
        while copies.next().await.is_some() {}
    }

    /// Copies one upstream subgroup's objects to the subscribers' subgroups as they arrive.
    async fn copy_group(
        &self,
        mut upstream: SubgroupReader,
        copy: Arc<Mutex<GroupCopy>>,
        hub: &Hub,
    ) {
        loop {
            match upstream.read_next().await {
                Ok(Some(object)) => {
                    self.stats.objects_in.fetch_add(1, Ordering::Relaxed);
                    let mut group = copy.lock().expect("group lock");
                    if object.len() > self.policy.max_object_bytes {
                        // Not forwarded: one oversized object would cost every subscriber.
                        tracing::debug!(
                            size = object.len(),
                            limit = self.policy.max_object_bytes,
                            "object over the size limit dropped"
                        );
                        self.stats
                            .drops
                            .fetch_add(group.outs.len() as u64 + 1, Ordering::Relaxed);
                        continue;
                    }
                    let before = group.outs.len();
                    if group.objects.is_empty() && is_probe(group.subgroup.group_id) {
                        // A probe group's first object: each subscriber gets its own copy,
                        // which tells when its session has written the group (`Downstream`).
                        group.outs.retain_mut(|out| {
                            let copy = Bytes::copy_from_slice(&object);
                            out.unsent
                                .lock()
                                .expect("unsent lock")
                                .push_back(copy.clone());
                            out.writer.write(copy).is_ok()
                        });
                    } else {
                        group
                            .outs
                            .retain_mut(|out| out.writer.write(object.clone()).is_ok());
                    }
                    let after = group.outs.len();
                    self.stats
                        .objects_out
                        .fetch_add(after as u64, Ordering::Relaxed);
                    self.stats
                        .drops
                        .fetch_add((before - after) as u64, Ordering::Relaxed);
                    group.objects.push(object);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("upstream group failed: {e}");
                    break;
                }
            }
        }
        {
            let mut group = copy.lock().expect("group lock");
            group.done = true;
            for out in group.outs.drain(..) {
                let _ = out.writer.finish();
            }
        }
        hub.finished(&copy);
    }

    async fn serve(self: Arc<Self>, ctx: Arc<SessionCtx>, subscribed: Subscribed) {
        let key = FullTrackName {
            namespace: subscribed.info.track_namespace.clone(),
            name: subscribed.info.track_name.clone(),
        };
        if let Err(refusal) = self
            .authorize(&ctx, &key.namespace)
            .and_then(|()| self.take_track_slot(&ctx))
        {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(session = ctx.id, "subscribe refused: {}", refusal.reason());
            let _ = subscribed.close(ServeError::Closed(refusal.code()));
            return;
        }
        let mut upstream = self.upstream(&key);
        let ready = upstream
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone());
        match ready {
            Some(Ok(hub)) => {
                let (writer, reader) =
                    Track::new(key.namespace.clone(), key.name.clone()).produce();
                match hub.attach(writer, &self.stats) {
                    true => {
                        self.stats
                            .downstream_subscriptions
                            .fetch_add(1, Ordering::Relaxed);
                        // No largest location: everything written to this subscriber's own
                        // track (starting with the newest cached group) is for it.
                        if let Err(e) = subscribed.serve_with_largest_location(reader, None).await {
                            tracing::debug!(track = %key.name, "downstream ended: {e}");
                        }
                        self.stats
                            .downstream_subscriptions
                            .fetch_sub(1, Ordering::Relaxed);
                    }
                    false => {
                        let _ = subscribed.close(ServeError::NotFound);
                    }
                }
            }
            Some(Err(e)) => {
                let _ = subscribed.close(e);
            }
            None => {
                let _ = subscribed.close(ServeError::Cancel);
            }
        }
        ctx.tracks.fetch_sub(1, Ordering::AcqRel);
    }

    /// Runs one client session until it ends.
    pub(crate) async fn session(
        self: Arc<Self>,
        transport: moq_transport::session::transport::Session,
        kind: moq_transport::session::Transport,
        remote: SocketAddr,
    ) {
        // Checked before the relay-wide limit, so one address's flood takes no more than
        // its share of `max_sessions`.
        let Some(_slot) = AddressSlot::take(&self, remote.ip()) else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            self.stats
                .refused_per_address
                .fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.refusal_log.allow() {
                tracing::warn!(
                    limit = self.policy.max_sessions_per_address,
                    suppressed,
                    "session refused: too many sessions from one address"
                );
            }
            transport.close(REFUSED_SESSION, "too many sessions from this address");
            return;
        };
        let sessions = self.stats.sessions.fetch_add(1, Ordering::AcqRel) + 1;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.live
            .lock()
            .expect("live lock")
            .insert(id, transport.clone());
        self.session_inner(id, transport, kind, sessions).await;
        self.live.lock().expect("live lock").remove(&id);
        self.stats.sessions.fetch_sub(1, Ordering::AcqRel);
    }

    async fn session_inner(
        self: &Arc<Self>,
        id: u64,
        transport: moq_transport::session::transport::Session,
        kind: moq_transport::session::Transport,
        sessions: u64,
    ) {
        if sessions > self.policy.max_sessions {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.refusal_log.allow() {
                tracing::warn!(
                    limit = self.policy.max_sessions,
                    suppressed,
                    "session refused: relay full"
                );
            }
            transport.close(REFUSED_SESSION, "relay session limit reached");
            return;
        }
        // A session holds a slot from its QUIC handshake on; one that never sends SETUP
        // would hold it for as long as its peer keeps the connection alive.
        let accepted = tokio::time::timeout(
            self.policy.setup_timeout,
            Session::accept(transport.clone(), None, kind),
        )
        .await;
        let Ok(accepted) = accepted else {
            self.stats.setup_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(session = id, "no SETUP in time: session closed");
            transport.close(
                REFUSED_SESSION,
                &format!(
                    "no SETUP within {} s",
                    self.policy.setup_timeout.as_secs_f32()
                ),
            );
            return;
        };
        let (session, publisher, subscriber) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("moq setup failed: {e}");
                return;
            }
        };
        let token_hashes = match token_hashes(session.setup_params()) {
            Ok(hashes) => hashes,
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("session refused: bad AUTHORIZATION TOKEN: {e}");
                transport.close(REFUSED_SESSION, "malformed authorization token");
                return;
            }
        };
        let (Some(publisher), Some(subscriber)) = (publisher, subscriber) else {
            return;
        };
        let ctx = Arc::new(SessionCtx {
            id,
            token_hashes,
            used: Mutex::default(),
            tracks: AtomicUsize::new(0),
        });
        tokio::select! {
            res = session.run() => {
                if let Err(e) = res {
                    if !e.is_graceful_close() {
                        tracing::debug!(session = ctx.id, "session ended: {e}");
                    }
                }
            }
            () = self.clone().accept_announces(ctx.clone(), subscriber) => {}
            () = self.clone().accept_subscribes(ctx.clone(), publisher) => {}
        }
        self.namespaces.lock().expect("routes lock").retain(|_, v| {
            v.retain(|(sid, _)| *sid != ctx.id);
            !v.is_empty()
        });
        self.release_bindings(&ctx);
    }

    fn admit_announce(
        &self,
        ctx: &SessionCtx,
        announce: &PublishedNamespace,
    ) -> Result<(), Refusal> {
        self.authorize(ctx, &announce.namespace)?;
        self.take_track_slot(ctx)
    }

    async fn accept_announces(self: Arc<Self>, ctx: Arc<SessionCtx>, subscriber: Subscriber) {
        let mut incoming = subscriber.clone();
        while let Some(mut announce) = incoming.published_namespace().await {
            if let Err(refusal) = self.admit_announce(&ctx, &announce) {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(session = ctx.id, "announce refused: {}", refusal.reason());
                let _ = announce.reject(refusal.code(), &refusal.reason());
                continue;
            }
            let ns = announce.namespace.clone();
            self.namespaces
                .lock()
                .expect("routes lock")
                .entry(ns.clone())
                .or_default()
                .push((ctx.id, subscriber.clone()));
            if announce.ok().is_err() {
                ctx.tracks.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let routes = self.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let _ = announce.closed().await;
                ctx.tracks.fetch_sub(1, Ordering::AcqRel);
                let mut map = routes.namespaces.lock().expect("routes lock");
                if let Some(v) = map.get_mut(&ns) {
                    v.retain(|(sid, _)| *sid != ctx.id);
                    if v.is_empty() {
                        map.remove(&ns);
                    }
                }
            });
        }
    }

    async fn accept_subscribes(self: Arc<Self>, ctx: Arc<SessionCtx>, mut publisher: Publisher) {
        while let Some(subscribed) = publisher.subscribed().await {
            tokio::spawn(self.clone().serve(ctx.clone(), subscribed));
        }
    }
}

/// What [`fuzz_setup_and_namespace`] found an input to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FuzzOutcome {
    /// The SETUP message did not decode.
    BadSetup,
    /// SETUP decoded; its AUTHORIZATION TOKEN options did not.
    BadToken,
    /// The namespace did not decode.
    BadNamespace,
    /// The namespace was refused (no token).
    Refused,
    /// The namespace was bound to the session's token.
    Bound,
}

/// One fuzz input through what a client controls before any access decision: `data[0]`
/// picks the token scope (1..=32) and where SETUP ends; the SETUP bytes go through the
/// relay's token parsing ([`token_hashes`]), the rest decodes as a namespace that is then
/// bound, used by another session with the same and with a different token, and released.
///
/// Must not panic for any input. Panics (as a failed check) if the binding rules break:
/// the token's owner and a session with the same token are admitted, a different token
/// is refused, and releasing every session leaves no binding behind.
pub fn fuzz_setup_and_namespace(data: &[u8]) -> FuzzOutcome {
    use moq_transport::coding::Decode;
    let Some((&head, rest)) = data.split_first() else {
        return FuzzOutcome::BadSetup;
    };
    let scope = usize::from(head % 32) + 1;
    let split = (usize::from(head) * rest.len()) / 256;
    let (mut setup_bytes, mut ns_bytes) = rest.split_at(split);
    let Ok(setup) = moq_transport::setup::Setup::decode(&mut setup_bytes) else {
        return FuzzOutcome::BadSetup;
    };
    let Ok(hashes) = token_hashes(&setup.params) else {
        return FuzzOutcome::BadToken;
    };
    let Ok(ns) = TrackNamespace::decode(&mut ns_bytes) else {
        return FuzzOutcome::BadNamespace;
    };
    let routes = Routes::new(Policy {
        auth: AuthMode::Token,
        token_scope: scope,
        max_sessions: 4,
        max_tracks_per_session: 4,
        max_object_bytes: 1024,
        max_unsent_groups: 4,
        setup_timeout: Duration::from_secs(1),
        max_sessions_per_address: 4,
    });
    let session = |id: u64, token_hashes: Vec<[u8; 32]>| SessionCtx {
        id,
        token_hashes,
        used: Mutex::default(),
        tracks: AtomicUsize::new(0),
    };
    let owner = session(1, hashes.clone());
    let outcome = match routes.authorize(&owner, &ns) {
        Err(Refusal::MissingToken) if hashes.is_empty() => FuzzOutcome::Refused,
        Err(other) => panic!("first use refused with tokens present: {other:?}"),
        Ok(()) => {
            assert!(!hashes.is_empty(), "bound without a token");
            let same = session(2, hashes[..1].to_vec());
            assert!(routes.authorize(&same, &ns).is_ok(), "same token refused");
            let mut other_token = hashes[0];
            other_token[0] ^= 1;
            let stranger = session(3, vec![other_token]);
            assert!(
                matches!(routes.authorize(&stranger, &ns), Err(Refusal::WrongToken)),
                "different token admitted"
            );
            routes.release_bindings(&same);
            routes.release_bindings(&stranger);
            FuzzOutcome::Bound
        }
    };
    routes.release_bindings(&owner);
    assert!(
        routes.bindings.lock().expect("bindings lock").is_empty(),
        "a binding outlived its sessions"
    );
    outcome
}

/// The key sessions are counted under for the per-address limit: an IPv4 address (also
/// when it arrives IPv4-mapped on a dual-stack socket), or an IPv6 address's /64 prefix,
/// which is what one IPv6 host is usually given.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// One session's place in its address's count; released on drop.
struct AddressSlot<'a> {
    routes: &'a Routes,
    key: IpAddr,
}

impl<'a> AddressSlot<'a> {
    fn take(routes: &'a Routes, ip: IpAddr) -> Option<Self> {
        let key = address_key(ip);
        let mut map = routes.per_address.lock().expect("address lock");
        let count = map.entry(key).or_default();
        if *count >= routes.policy.max_sessions_per_address {
            if *count == 0 {
                map.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(Self { routes, key })
    }
}

impl Drop for AddressSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.routes.per_address.lock().expect("address lock");
        if let Some(count) = map.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{address_key, fuzz_setup_and_namespace, FuzzOutcome};
    use moq_transport::coding::{Encode, KeyValuePair, KeyValuePairs, TrackNamespace, VarInt};
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use std::net::IpAddr;

    /// Valid inputs for [`fuzz_setup_and_namespace`]: SETUPs with 0..=3 tokens (USE_VALUE
    /// and REGISTER forms), then a namespace; mutations start from these.
    fn seeds() -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        let namespaces = [
            "call/00112233445566778899aabbccddeeff",
            "call/ab/cd/ef",
            "x",
        ];
        for tokens in 0..=3usize {
            for (n, path) in namespaces.iter().enumerate() {
                let mut params = KeyValuePairs::new();
                for t in 0..tokens {
                    let mut value = Vec::new();
                    if (t + n) % 2 == 0 {
                        VarInt::from(3u64).encode(&mut value).unwrap(); // USE_VALUE
                    } else {
                        VarInt::from(1u64).encode(&mut value).unwrap(); // REGISTER
                        VarInt::from(7u64).encode(&mut value).unwrap(); // its alias
                    }
                    VarInt::from(t as u64).encode(&mut value).unwrap(); // token type
                    value.extend_from_slice(&[t as u8 + 1; 32]);
                    params.0.push(KeyValuePair::new_bytes(3, value));
                }
                let mut setup = Vec::new();
                moq_transport::setup::Setup { params }
                    .encode(&mut setup)
                    .unwrap();
                let mut ns = Vec::new();
                TrackNamespace::from_utf8_path(path)
                    .encode(&mut ns)
                    .unwrap();
                // data[0] decides where SETUP ends: pick the byte that splits right here.
                let rest = setup.len() + ns.len();
                let head = (0..=255u8)
                    .find(|h| (usize::from(*h) * rest) / 256 == setup.len())
                    .unwrap_or(128);
                let mut input = vec![head];
                input.extend_from_slice(&setup);
                input.extend_from_slice(&ns);
                seeds.push(input);
            }
        }
        seeds
    }

    fn mutate(rng: &mut impl Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
        const INTERESTING: [u8; 8] = [0, 1, 0x3f, 0x40, 0x7f, 0x80, 0xc0, 0xff];
        for _ in 0..rng.gen_range(1..=4) {
            let len = input.len();
            match rng.gen_range(0..7) {
                0 if len > 0 => input[rng.gen_range(0..len)] ^= 1 << rng.gen_range(0..8),
                1 if len > 0 => {
                    input[rng.gen_range(0..len)] = INTERESTING[rng.gen_range(0..INTERESTING.len())]
                }
                2 => {
                    let at = rng.gen_range(0..=len);
                    let n = rng.gen_range(1..=16);
                    let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                    input.splice(at..at, bytes);
                }
                3 if len > 1 => {
                    let a = rng.gen_range(0..len);
                    let b = rng.gen_range(a..=len.min(a + 16));
                    input.drain(a..b);
                }
                4 if len > 0 => input.truncate(rng.gen_range(0..len)),
                5 if len > 1 => {
                    let a = rng.gen_range(0..len);
                    let b = rng.gen_range(a..=len.min(a + 32));
                    let chunk = input[a..b].to_vec();
                    let at = rng.gen_range(0..=len);
                    input.splice(at..at, chunk);
                }
                6 => {
                    let other = &seeds[rng.gen_range(0..seeds.len())];
                    let cut = rng.gen_range(0..=len);
                    let from = rng.gen_range(0..=other.len());
                    input.truncate(cut);
                    input.extend_from_slice(&other[from..]);
                }
                _ if len > 0 => input[0] = rng.gen(),
                _ => input.push(rng.gen()),
            }
        }
    }

    /// Stable-toolchain fuzzing of the relay's SETUP token parsing and namespace binding:
    /// seeded mutations of valid inputs and pure random bytes, a bounded number of cases
    /// (`CALL_RELAY_FUZZ_CASES`, default 100,000), no panics, and every outcome reached.
    #[test]
    fn fuzz_setup_tokens_and_namespace_bindings() {
        let cases: u64 = std::env::var("CALL_RELAY_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let seed: u64 = std::env::var("CALL_RELAY_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(11);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let seeds = seeds();
        for input in &seeds {
            assert_ne!(
                fuzz_setup_and_namespace(input),
                FuzzOutcome::BadSetup,
                "{input:x?}"
            );
        }
        // `scripts/fuzz.sh` starts AFL from these.
        if let Ok(dir) = std::env::var("CALL_RELAY_FUZZ_WRITE_SEEDS") {
            std::fs::create_dir_all(&dir).unwrap();
            for (i, input) in seeds.iter().enumerate() {
                std::fs::write(format!("{dir}/seed-{i:02}"), input).unwrap();
            }
        }
        // Inputs that once failed (crashes AFL found go here) stay tests.
        let regressions = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/regressions");
        if let Ok(dir) = std::fs::read_dir(regressions) {
            for entry in dir {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "md") {
                    let input = std::fs::read(&path).unwrap();
                    let replay = std::panic::catch_unwind(|| fuzz_setup_and_namespace(&input));
                    assert!(replay.is_ok(), "regression {}", path.display());
                }
            }
        }
        let mut outcomes: HashMap<FuzzOutcome, u64> = HashMap::new();
        let started = std::time::Instant::now();
        for case in 0..cases {
            let input = if case % 10 == 0 {
                let n = rng.gen_range(0..128);
                (0..n).map(|_| rng.gen()).collect()
            } else {
                let mut input = seeds[rng.gen_range(0..seeds.len())].clone();
                mutate(&mut rng, &mut input, &seeds);
                input
            };
            let outcome = std::panic::catch_unwind(|| fuzz_setup_and_namespace(&input))
                .unwrap_or_else(|_| panic!("seed {seed}, case {case}: input {input:x?}"));
            *outcomes.entry(outcome).or_default() += 1;
        }
        eprintln!("{cases} cases in {:?}: {outcomes:?}", started.elapsed());
        // Too few cases (as when only writing seeds) need not reach every outcome.
        let outcomes_expected = if cases >= 10_000 {
            &[
                FuzzOutcome::BadSetup,
                FuzzOutcome::BadToken,
                FuzzOutcome::BadNamespace,
                FuzzOutcome::Refused,
                FuzzOutcome::Bound,
            ][..]
        } else {
            &[]
        };
        for outcome in outcomes_expected {
            assert!(outcomes.contains_key(outcome), "{outcome:?} never reached");
        }
    }

    #[test]
    fn address_keys_group_ipv6_by_64_and_unmap_ipv4() {
        let k = |s: &str| address_key(s.parse::<IpAddr>().unwrap());
        assert_eq!(k("192.0.2.7"), k("::ffff:192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::2"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(
            k("2001:db8:1:2:aaaa::1"),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
    }

    /// A datagram track's hub: subscribers attached before and after the first datagram
    /// get every datagram; one over the object limit, one larger than a path carries and a
    /// malformed status datagram reach nobody and are counted; a gone subscriber is dropped.
    #[tokio::test]
    async fn a_datagram_hub_forwards_to_every_subscriber_and_counts_what_it_drops() {
        use super::{Hub, HubMode, Stats, PATH_DATAGRAM_MAX};
        use moq_transport::data::ObjectStatus;
        use moq_transport::serve::{Datagram, Track, TrackReaderMode};
        use std::sync::atomic::Ordering;

        let datagram = |group_id: u64, payload: Vec<u8>| Datagram {
            group_id,
            object_id: 0,
            priority: 0,
            status: ObjectStatus::NormalObject,
            end_of_group: false,
            payload: payload.into(),
            extension_headers: Default::default(),
        };
        let hub = Hub::new();
        let stats = Stats::default();
        let subscriber = || Track::new(TrackNamespace::from_utf8_path("call/ns"), "t").produce();
        let (early, early_reader) = subscriber();
        assert!(hub.attach(early, &stats));
        hub.set_mode(HubMode::Datagrams, &stats);
        let (late, late_reader) = subscriber();
        assert!(hub.attach(late, &stats));
        let (gone, gone_reader) = subscriber();
        assert!(hub.attach(gone, &stats));
        drop(gone_reader);

        let mut readers = Vec::new();
        for reader in [early_reader, late_reader] {
            match reader.mode().await.unwrap() {
                TrackReaderMode::Datagrams(d) => readers.push(d),
                _ => panic!("a subscriber of a datagram track is not in datagram mode"),
            }
        }
        hub.datagram(datagram(1, b"one".to_vec()), 200, &stats);
        for r in &mut readers {
            assert_eq!(r.read().await.unwrap().unwrap().payload, &b"one"[..]);
        }
        assert_eq!(stats.objects_out.load(Ordering::Relaxed), 2);
        assert_eq!(
            stats.drops.load(Ordering::Relaxed),
            1,
            "the gone subscriber"
        );

        // Over the object limit, over what a path carries, and a status with a payload.
        hub.datagram(datagram(2, vec![0; 201]), 200, &stats);
        hub.datagram(datagram(3, vec![0; PATH_DATAGRAM_MAX]), usize::MAX, &stats);
        let mut bad = datagram(4, b"x".to_vec());
        bad.status = ObjectStatus::EndOfTrack;
        hub.datagram(bad, 200, &stats);
        assert_eq!(stats.drops.load(Ordering::Relaxed), 1 + 3 * 3);
        assert_eq!(stats.datagrams_too_large.load(Ordering::Relaxed), 2);
        // A zero-length object loses its (unencodable) end-of-group flag and goes out.
        let mut empty = datagram(5, Vec::new());
        empty.end_of_group = true;
        hub.datagram(empty, 200, &stats);
        for r in &mut readers {
            let got = r.read().await.unwrap().unwrap();
            assert_eq!(got.group_id, 5, "nothing between 1 and 5 was forwarded");
            assert!(!got.end_of_group);
        }
        assert_eq!(stats.datagrams_in.load(Ordering::Relaxed), 5);
        assert_eq!(stats.objects_in.load(Ordering::Relaxed), 5);
        assert_eq!(stats.objects_out.load(Ordering::Relaxed), 4);
    }
}
