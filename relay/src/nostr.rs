//! The Nostr side: nostr-relay-builder behind a thin front of our own.
//!
//! nostr-relay-builder 0.44.1 accepts any WebSocket message up to tungstenite's default
//! 64 MiB, never times out a WebSocket handshake, logs and retries at once when `accept`
//! fails (at the descriptor limit: millions of lines a second), drops the connection on a
//! message it cannot parse, and stores events without a byte bound. So this module owns
//! the TCP listener and the client's WebSocket (handshake timeout, message-size limit,
//! back-off, NOTICE on malformed messages) and hands each connection to the library through
//! an in-process pipe (`LocalRelay::take_connection`), which then does all of NIP-01.
//! Stored bytes are bounded by [`Store`], a byte-counting wrapper around the event database
//! (LMDB in the state directory, or the library's memory database with `--ephemeral`), and
//! the matching [`QuotaPolicy`] that refuses with a reason.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use nostr_lmdb::NostrLMDB;
use nostr_relay_builder::prelude::{
    Backend, BoxedFuture, ClientMessage, DatabaseError, DatabaseEventStatus, Event, EventId,
    Events, Filter, JsonUtil, LocalRelay, MachineReadablePrefix, MemoryDatabase,
    MemoryDatabaseOptions, NostrDatabase, PolicyResult, RejectedReason, RelayMessage,
    SaveEventStatus, Timestamp, WritePolicy,
};
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::throttle::LogThrottle;

/// Room for the `["EVENT", …]` envelope around an event of the largest allowed size: a
/// message up to this much larger is parsed and an oversized event refused with `OK false`;
/// a larger message is cut off by the WebSocket layer before it is buffered.
const ENVELOPE_BYTES: usize = 1024;
/// Bytes in flight between the front and the library, each way.
const PIPE_BYTES: usize = 64 * 1024;
/// Messages waiting for a client's connection (replies and events for its subscriptions).
const OUT_QUEUE: usize = 64;
/// A client that takes longer than this to accept one message is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After refusing an oversized message, how long its rest is read and discarded so the
/// client (still sending) can read the close frame instead of a connection reset.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 64 << 20;
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The library's own bound on stored events (its `RelayBuilder` default).
const MAX_EVENTS: usize = 75_000;

/// Nostr limits taken from [`crate::RelayConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_event_bytes: usize,
    pub handshake_timeout: Duration,
}

/// Nostr counters, since start unless said otherwise.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Open WebSocket connections (now).
    pub connections: AtomicU64,
    /// Events or messages refused for their size.
    pub too_big: AtomicU64,
    /// Messages that are not NIP-01 client messages (answered with NOTICE).
    pub malformed: AtomicU64,
    /// Events whose id is not their hash or whose signature does not verify (`OK false`).
    pub invalid_signature: AtomicU64,
    /// Connections closed because the WebSocket handshake did not finish in time.
    pub handshake_timeouts: AtomicU64,
    /// Connections whose WebSocket handshake failed.
    pub handshake_failures: AtomicU64,
    /// Events refused because the stored-bytes quota was reached.
    pub quota_refused: AtomicU64,
    /// `accept` failures (e.g. EMFILE), each followed by a back-off pause.
    pub accept_errors: AtomicU64,
}

/// The front: accepts TCP connections, speaks WebSocket to clients and relays their
/// well-formed, bounded messages to the library.
pub(crate) struct Front {
    relay: LocalRelay,
    limits: Limits,
    stats: Arc<Stats>,
    accept_log: LogThrottle,
}

enum Verdict {
    Forward,
    Reply(String),
}

enum End {
    Client,
    Library,
    TooBig { size: usize },
    Broken,
}

impl Front {
    pub(crate) fn new(relay: LocalRelay, limits: Limits, stats: Arc<Stats>) -> Self {
        Self {
            relay,
            limits,
            stats,
            accept_log: LogThrottle::new(Duration::from_secs(1)),
        }
    }

    fn max_message_bytes(&self) -> usize {
        self.limits.max_event_bytes.saturating_add(ENVELOPE_BYTES)
    }

    /// Accepts connections until the listener is dropped with this future.
    pub(crate) async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut backoff = MIN_BACKOFF;
        loop {
            match listener.accept().await {
                Ok((tcp, addr)) => {
                    backoff = MIN_BACKOFF;
                    tokio::spawn(self.clone().connection(tcp, addr));
                }
                Err(e) => {
                    // At the descriptor limit `accept` fails at once, every time: without a
                    // pause this loop spins and logs each failure. Connections that are
                    // served meanwhile free descriptors; new ones wait in the backlog.
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = self.accept_log.allow() {
                        tracing::warn!(
                            suppressed,
                            pause_ms = backoff.as_millis() as u64,
                            "can't accept a Nostr connection: {e}"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let limit = self.max_message_bytes();
        let config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let handshake = tokio_tungstenite::accept_async_with_config(tcp, Some(config));
        let client = match tokio::time::timeout(self.limits.handshake_timeout, handshake).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                self.stats
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, "WebSocket handshake failed: {e}");
                return;
            }
            Err(_) => {
                self.stats
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, "WebSocket handshake timed out");
                return;
            }
        };
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let relay = self.relay.clone();
        let library = tokio::spawn(async move {
            if let Err(e) = relay.take_connection(theirs, addr).await {
                tracing::debug!(%addr, "nostr session ended: {e}");
            }
        });
        let inner = WebSocketStream::from_raw_socket(ours, Role::Client, None).await;
        self.pump(client, inner).await;
        library.abort();
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Relays messages both ways until either side ends, then closes the client's
    /// connection with a reason.
    async fn pump(&self, client: WebSocketStream<TcpStream>, inner: WebSocketStream<DuplexStream>) {
        let (client_tx, mut client_rx) = client.split();
        let (mut inner_tx, mut inner_rx) = inner.split();
        // One writer owns the client's sink; both directions queue to it. Separate readers
        // keep one full direction from stalling the other (the library may be writing a
        // large REQ answer while the client is still sending).
        let (out, out_rx) = mpsc::channel::<Message>(OUT_QUEUE);
        let writer = tokio::spawn(write_out(client_tx, out_rx));

        let from_client = async {
            loop {
                match client_rx.next().await {
                    Some(Ok(Message::Text(text))) => match self.check(text.as_str()) {
                        Verdict::Forward => {
                            if inner_tx.send(Message::Text(text)).await.is_err() {
                                return End::Library;
                            }
                        }
                        Verdict::Reply(reply) => {
                            if out.send(Message::Text(reply.into())).await.is_err() {
                                return End::Broken;
                            }
                        }
                    },
                    Some(Ok(Message::Binary(_))) => {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        let notice = notice("binary messages are not NIP-01 messages");
                        if out.send(Message::Text(notice.into())).await.is_err() {
                            return End::Broken;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => return End::Client,
                    // Pings are answered by the WebSocket layer itself.
                    Some(Ok(_)) => {}
                    Some(Err(WsError::Capacity(CapacityError::MessageTooLong {
                        size, ..
                    }))) => return End::TooBig { size },
                    Some(Err(e)) => {
                        tracing::debug!("nostr client connection failed: {e}");
                        return End::Broken;
                    }
                }
            }
        };
        let from_library = async {
            while let Some(Ok(msg)) = inner_rx.next().await {
                match msg {
                    Message::Text(_) if out.send(msg).await.is_err() => return,
                    Message::Close(_) => return,
                    _ => {}
                }
            }
        };
        let end = tokio::select! {
            end = from_client => end,
            () = from_library => End::Library,
        };
        let close = match end {
            End::Client | End::Broken => None,
            End::Library => Some(CloseFrame {
                code: CloseCode::Away,
                reason: "relay session ended".into(),
            }),
            End::TooBig { size } => {
                self.stats.too_big.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(size, limit = self.max_message_bytes(), "message too big");
                Some(CloseFrame {
                    code: CloseCode::Size,
                    reason: format!(
                        "message over the relay's limit of {} bytes",
                        self.max_message_bytes()
                    )
                    .into(),
                })
            }
        };
        let draining = matches!(end, End::TooBig { .. });
        if let Some(frame) = close {
            let _ =
                tokio::time::timeout(WRITE_TIMEOUT, out.send(Message::Close(Some(frame)))).await;
        }
        drop(out);
        drop((inner_tx, inner_rx));
        let Ok(Ok(client_tx)) = tokio::time::timeout(WRITE_TIMEOUT, writer).await else {
            return;
        };
        if draining {
            if let Ok(mut ws) = client_rx.reunite(client_tx) {
                drain(ws.get_mut()).await;
            }
        }
    }

    /// Parses one client message: malformed ones and oversized events are answered here
    /// and not passed on.
    fn check(&self, text: &str) -> Verdict {
        match ClientMessage::from_json(text.as_bytes()) {
            Err(e) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                Verdict::Reply(notice(&format!("malformed message: {e}")))
            }
            Ok(ClientMessage::Event(event)) => {
                let refuse = |why: String| {
                    Verdict::Reply(
                        RelayMessage::Ok {
                            event_id: event.id,
                            status: false,
                            message: Cow::Owned(format!(
                                "{}: {why}",
                                MachineReadablePrefix::Invalid
                            )),
                        }
                        .as_json(),
                    )
                };
                let size = event.as_json().len();
                if size > self.limits.max_event_bytes {
                    self.stats.too_big.fetch_add(1, Ordering::Relaxed);
                    return refuse(format!(
                        "event is {size} bytes, over the relay's limit of {} bytes",
                        self.limits.max_event_bytes
                    ));
                }
                // The library refuses these too, but uncounted; checking here (the library
                // checks again) makes forgery attempts visible in the stats.
                if let Err(e) = event.verify() {
                    self.stats.invalid_signature.fetch_add(1, Ordering::Relaxed);
                    return refuse(format!("id or signature does not verify: {e}"));
                }
                Verdict::Forward
            }
            Ok(_) => Verdict::Forward,
        }
    }
}

fn notice(text: &str) -> String {
    RelayMessage::Notice(Cow::Owned(format!(
        "{}: {text}",
        MachineReadablePrefix::Invalid
    )))
    .as_json()
}

type ClientSink = SplitSink<WebSocketStream<TcpStream>, Message>;

/// Writes queued messages to the client; returns its sink for the final drain.
async fn write_out(mut tx: ClientSink, mut queue: mpsc::Receiver<Message>) -> ClientSink {
    while let Some(msg) = queue.recv().await {
        let closing = msg.is_close();
        match tokio::time::timeout(WRITE_TIMEOUT, tx.send(msg)).await {
            Ok(Ok(())) if !closing => {}
            _ => return tx,
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, tx.close()).await;
    tx
}

/// Reads and discards what the client still sends, bounded in time and bytes.
async fn drain(tcp: &mut TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    while total < DRAIN_BYTES {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => return,
        }
    }
}

/// An event database with a bound on the bytes of stored events: their JSON size, whatever
/// the database spends on its own encoding and indexes (LMDB: roughly as much again on
/// disk; memory: some more in the process).
///
/// Events already on disk when the relay starts count against the quota exactly as if they
/// had just been saved: [`Store::persistent`] reads each one once and adds its JSON size.
/// So a restart neither forgets the bytes it holds nor lets the quota be filled again. If
/// they exceed the quota (it was lowered), nothing is deleted: the relay serves them and
/// refuses new events until replacements and deletions bring it under.
#[derive(Debug)]
pub(crate) struct Store {
    inner: Arc<dyn NostrDatabase>,
    quota: u64,
    usage: Mutex<Usage>,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
struct Usage {
    /// Size of each event this wrapper saved and has not seen go.
    sizes: HashMap<EventId, u64>,
    /// Sum of `sizes` plus bytes reserved by saves in progress.
    total: u64,
    /// When `sizes` was last checked against the inner store; `None`: check at once.
    reconciled: Option<Instant>,
}

impl Store {
    /// Events in memory only (`--ephemeral`): gone when the relay stops.
    pub(crate) fn memory(quota: u64, stats: Arc<Stats>) -> Self {
        let inner = MemoryDatabase::with_opts(MemoryDatabaseOptions {
            events: true,
            max_events: Some(MAX_EVENTS),
        });
        Self {
            inner: Arc::new(inner),
            quota,
            usage: Mutex::default(),
            stats,
        }
    }

    /// Events in the LMDB environment at `dir`, with those already there counted against
    /// the quota (see the type's documentation).
    pub(crate) async fn persistent(
        dir: &Path,
        quota: u64,
        stats: Arc<Stats>,
    ) -> Result<Self, DatabaseError> {
        let store = Self {
            inner: Arc::new(NostrLMDB::open(dir)?),
            quota,
            usage: Mutex::default(),
            stats,
        };
        // Ids first (cheap), then each event once for its size: memory for the ids, not
        // for every event at once.
        let ids = store.inner.negentropy_items(Filter::new()).await?;
        let mut usage = Usage::default();
        for (id, _) in ids {
            if let Some(event) = store.inner.event_by_id(&id).await? {
                let size = event.as_json().len() as u64;
                usage.sizes.insert(id, size);
                usage.total = usage.total.saturating_add(size);
            }
        }
        tracing::info!(
            events = usage.sizes.len(),
            bytes = usage.total,
            quota,
            "nostr events loaded from {}",
            dir.display()
        );
        if usage.total > quota {
            tracing::warn!(
                "stored nostr events ({} bytes) exceed --nostr-max-stored-bytes ({quota}): new events are refused until some are deleted or replaced",
                usage.total
            );
        }
        *store.usage.lock().expect("usage lock") = usage;
        Ok(store)
    }

    pub(crate) fn stored_bytes(&self) -> u64 {
        self.usage.lock().expect("usage lock").total
    }

    /// Reserves `size` bytes if they fit. When they do not, first forgets events the inner
    /// store no longer has (replaced, deleted or evicted by it), at most once a second: a
    /// flood against a full relay costs a lookup per event, not a scan per event.
    async fn reserve(&self, size: u64) -> bool {
        let ids = {
            let mut usage = self.usage.lock().expect("usage lock");
            if usage.total.saturating_add(size) <= self.quota {
                usage.total += size;
                return true;
            }
            let due = usage
                .reconciled
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if !due {
                return false;
            }
            usage.reconciled = Some(Instant::now());
            usage.sizes.keys().copied().collect::<Vec<_>>()
        };
        let mut gone = Vec::new();
        for id in ids {
            if !matches!(
                self.inner.check_id(&id).await,
                Ok(DatabaseEventStatus::Saved)
            ) {
                gone.push(id);
            }
        }
        let mut usage = self.usage.lock().expect("usage lock");
        for id in gone {
            if let Some(size) = usage.sizes.remove(&id) {
                usage.total = usage.total.saturating_sub(size);
            }
        }
        if usage.total.saturating_add(size) <= self.quota {
            usage.total += size;
            true
        } else {
            false
        }
    }

    fn release(&self, size: u64) {
        let mut usage = self.usage.lock().expect("usage lock");
        usage.total = usage.total.saturating_sub(size);
    }

    async fn fits(&self, size: u64) -> bool {
        let fits = self.reserve(size).await;
        if fits {
            self.release(size);
        }
        fits
    }
}

impl NostrDatabase for Store {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    fn save_event<'a>(
        &'a self,
        event: &'a Event,
    ) -> BoxedFuture<'a, Result<SaveEventStatus, DatabaseError>> {
        Box::pin(async move {
            if event.kind.is_ephemeral() {
                return self.inner.save_event(event).await;
            }
            let size = event.as_json().len() as u64;
            if !self.reserve(size).await {
                self.stats.quota_refused.fetch_add(1, Ordering::Relaxed);
                return Ok(SaveEventStatus::Rejected(RejectedReason::Other));
            }
            let status = self.inner.save_event(event).await;
            let mut usage = self.usage.lock().expect("usage lock");
            match status {
                Ok(SaveEventStatus::Success) => {
                    if usage.sizes.insert(event.id, size).is_some() {
                        usage.total = usage.total.saturating_sub(size);
                    }
                }
                _ => usage.total = usage.total.saturating_sub(size),
            }
            status
        })
    }

    fn check_id<'a>(
        &'a self,
        event_id: &'a EventId,
    ) -> BoxedFuture<'a, Result<DatabaseEventStatus, DatabaseError>> {
        self.inner.check_id(event_id)
    }

    fn event_by_id<'a>(
        &'a self,
        event_id: &'a EventId,
    ) -> BoxedFuture<'a, Result<Option<Event>, DatabaseError>> {
        self.inner.event_by_id(event_id)
    }

    fn count(&self, filter: Filter) -> BoxedFuture<'_, Result<usize, DatabaseError>> {
        self.inner.count(filter)
    }

    fn query(&self, filter: Filter) -> BoxedFuture<'_, Result<Events, DatabaseError>> {
        self.inner.query(filter)
    }

    fn negentropy_items(
        &self,
        filter: Filter,
    ) -> BoxedFuture<'_, Result<Vec<(EventId, Timestamp)>, DatabaseError>> {
        self.inner.negentropy_items(filter)
    }

    fn delete(&self, filter: Filter) -> BoxedFuture<'_, Result<(), DatabaseError>> {
        Box::pin(async move {
            let result = self.inner.delete(filter).await;
            // The next save that does not fit looks for what is gone first.
            self.usage.lock().expect("usage lock").reconciled = None;
            result
        })
    }

    fn wipe(&self) -> BoxedFuture<'_, Result<(), DatabaseError>> {
        Box::pin(async move {
            let result = self.inner.wipe().await;
            let mut usage = self.usage.lock().expect("usage lock");
            usage.sizes.clear();
            usage.total = 0;
            result
        })
    }
}

/// Refuses events that would take the store over its quota, with a reason (`OK false
/// blocked: …`); [`Store::save_event`] enforces the same bound for saves racing past it.
#[derive(Debug)]
pub(crate) struct QuotaPolicy(pub Arc<Store>);

impl WritePolicy for QuotaPolicy {
    fn admit_event<'a>(
        &'a self,
        event: &'a Event,
        _addr: &'a SocketAddr,
    ) -> BoxedFuture<'a, PolicyResult> {
        Box::pin(async move {
            if event.kind.is_ephemeral() {
                return PolicyResult::Accept;
            }
            let size = event.as_json().len() as u64;
            if self.0.fits(size).await {
                return PolicyResult::Accept;
            }
            self.0.stats.quota_refused.fetch_add(1, Ordering::Relaxed);
            PolicyResult::Reject(format!(
                "relay storage full ({} of {} bytes used)",
                self.0.stored_bytes(),
                self.0.quota
            ))
        })
    }
}
