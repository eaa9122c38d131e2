//! A MoQ client that survives losing its relay: it reconnects with backoff, re-announces
//! every local track and re-subscribes every remote track, while the caller keeps sending
//! and reading through handles that outlive any one connection.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use moq_transport::coding::TrackNamespace;
use moq_transport::serve::ServeError;
use moq_transport::session::{Publisher, Subscriber};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use url::Url;

use super::fetch::FetchIndex;
use super::{
    publish_on, subscribe_on, CertError, CertVerification, Delivery, MoqConnection, TokenPolicy,
    TrackPublisher, TransportError, UNAUTHORIZED,
};

/// First wait before reconnecting; doubles per failed attempt up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between reconnect attempts: audio calls want the relay back fast.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Longest one connection attempt may take (the first one, whose failure is final, and each
/// of the overlapping reconnect attempts).
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect attempts in flight at once. A QUIC Initial sent while the relay was down is
/// retransmitted only after its probe timeout, which doubles (about 1, 2, 4 s): waiting for
/// that attempt delayed the return by up to 2.5 s after the relay was back. A fresh attempt
/// every backoff interval, with the older ones still running, sends a fresh Initial within
/// [`MAX_BACKOFF`] of the relay's return, while a slow handshake (a far or loaded relay)
/// still has [`MAX_CONNECT_TIMEOUT`] to finish.
const MAX_OVERLAPPING_ATTEMPTS: usize = 4;
/// First wait before re-subscribing to a track the relay does not know (yet).
const MIN_RESUBSCRIBE: Duration = Duration::from_millis(20);
/// Frames buffered per remote track before the oldest arrivals are dropped.
const QUEUE_FRAMES: usize = 64;

/// Where and how to connect.
#[derive(Clone)]
pub struct ClientConfig {
    pub url: Url,
    pub verify: CertVerification,
    /// The call's relay token, presented in SETUP (see docs/protocol.md §4).
    pub token: Option<Vec<u8>>,
    /// When `token` is presented; [`TokenPolicy::Auto`] unless set.
    pub token_policy: TokenPolicy,
    /// A received frame not read within this long after its arrival is dropped as late.
    pub playout_deadline: Duration,
}

impl ClientConfig {
    pub fn new(url: Url, verify: CertVerification, token: Option<Vec<u8>>) -> Self {
        Self {
            url,
            verify,
            token,
            token_policy: TokenPolicy::default(),
            playout_deadline: Duration::from_millis(200),
        }
    }

    /// Sets when the relay token is presented.
    pub fn with_token_policy(mut self, policy: TokenPolicy) -> Self {
        self.token_policy = policy;
        self
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret of the call.
        f.debug_struct("ClientConfig")
            .field("url", &self.url.as_str())
            .field("verify", &self.verify)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_policy", &self.token_policy)
            .field("playout_deadline", &self.playout_deadline)
            .finish()
    }
}

/// Counters of one track (local or remote).
#[derive(Debug, Default)]
pub struct TrackStats {
    /// Objects handed to the connection (local tracks).
    pub sent: AtomicU64,
    /// Objects that arrived (remote tracks).
    pub received: AtomicU64,
    /// Frames dropped because they missed their playout deadline.
    pub late: AtomicU64,
    /// Frames dropped for other reasons: no connection, full queue, too large.
    pub dropped: AtomicU64,
    /// Frames of a datagram track not sent because they did not fit one datagram (also
    /// in `dropped`).
    pub too_large: AtomicU64,
    /// Objects of a local track answered to a relay's (joining) FETCH.
    fetched: Arc<AtomicU64>,
    /// Smoothed RTT of the connection carrying the track, in µs; 0 while disconnected.
    /// Shared by every track of one client (they ride one connection).
    rtt_us: Arc<AtomicU64>,
}

impl TrackStats {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    pub fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    pub fn too_large(&self) -> u64 {
        self.too_large.load(Ordering::Relaxed)
    }
    /// Objects of a local track sent again in answer to a relay's joining FETCH: a relay
    /// that subscribed after they went out got them this way.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
    /// The QUIC smoothed round-trip time to the relay, sampled every
    /// [`RTT_SAMPLE_INTERVAL`]; `None` while no connection is up.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn sharing_rtt(rtt_us: &Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            rtt_us: rtt_us.clone(),
            ..Self::default()
        })
    }
}

/// How often the connection's RTT is copied into the track stats.
pub const RTT_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

struct LocalReg {
    namespace: TrackNamespace,
    name: String,
    delivery: Delivery,
    slot: Arc<Mutex<Option<TrackPublisher>>>,
    /// Shared with the track's stats, counted by every connection's FETCH answers.
    fetched: Arc<AtomicU64>,
    /// Counts successful announces (one per connection).
    announced: watch::Sender<u64>,
    refused: watch::Sender<Option<String>>,
}

struct RemoteReg {
    namespace: TrackNamespace,
    name: String,
    inbox: Arc<Inbox>,
}

enum Command {
    Publish(Arc<LocalReg>),
    Subscribe(Arc<RemoteReg>),
}

/// Frames of one remote track waiting to be read, with their arrival time.
struct Inbox {
    queue: Mutex<InboxState>,
    notify: Notify,
    stats: Arc<TrackStats>,
}

#[derive(Default)]
struct InboxState {
    frames: VecDeque<(u64, Bytes, Instant)>,
    error: Option<TransportError>,
}

impl Inbox {
    fn push(&self, seq: u64, payload: Bytes) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let mut q = self.queue.lock().expect("inbox lock");
        if q.frames.len() >= QUEUE_FRAMES {
            q.frames.pop_front();
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.frames.push_back((seq, payload, Instant::now()));
        drop(q);
        self.notify.notify_one();
    }

    fn fail(&self, error: TransportError) {
        self.queue.lock().expect("inbox lock").error = Some(error);
        self.notify.notify_one();
    }
}

/// Why a client gave up for good.
#[derive(Debug, Clone)]
enum Fatal {
    /// The very first connection failed: a configuration problem (address, certificate,
    /// ALPN), not an outage.
    Unreachable(String),
    /// The relay closed the session as UNAUTHORIZED, and the token policy leaves nothing
    /// else to try.
    Refused(String),
    /// The relay's certificate was refused, at the first connection or a reconnect (a relay
    /// back with another certificate): the relay is there, so this is no outage to wait out.
    Certificate(Url, CertError),
}

impl Fatal {
    fn error(&self) -> TransportError {
        match self {
            Self::Unreachable(reason) => TransportError::Unreachable(reason.clone()),
            Self::Refused(reason) => TransportError::SessionRefused(reason.clone()),
            Self::Certificate(url, problem) => TransportError::Certificate {
                url: url.clone(),
                problem: Box::new(problem.clone()),
            },
        }
    }
}

/// The connection state shared with handles.
struct Shared {
    connects: AtomicU64,
    /// The live connection's smoothed RTT in µs, 0 while disconnected.
    rtt_us: Arc<AtomicU64>,
    /// Whether connections present the relay token (see [`TokenPolicy`]).
    presents_token: AtomicBool,
    /// Set when the client gave up; it then says why to every handle.
    fatal: watch::Sender<Option<Fatal>>,
}

/// A reconnecting MoQ client. The future returned by [`MoqClient::new`] drives every
/// connection and must be polled; it ends when the client and all its handles are dropped.
pub struct MoqClient {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    playout_deadline: Duration,
}

impl MoqClient {
    pub fn new(config: ClientConfig) -> (Self, impl Future<Output = ()> + Send) {
        let (commands, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            connects: AtomicU64::new(0),
            rtt_us: Arc::default(),
            presents_token: AtomicBool::new(
                config.token.is_some() && config.token_policy != TokenPolicy::Never,
            ),
            fatal: watch::channel(None).0,
        });
        let playout_deadline = config.playout_deadline;
        let driver = drive(config, rx, shared.clone());
        (
            Self {
                commands,
                shared,
                playout_deadline,
            },
            driver,
        )
    }

    /// How many times a connection to the relay was established.
    pub fn connects(&self) -> u64 {
        self.shared.connects.load(Ordering::Relaxed)
    }

    /// Whether the next connection presents the relay token: false under
    /// [`TokenPolicy::Never`], and under [`TokenPolicy::Auto`] once the relay refused it.
    pub fn presents_token(&self) -> bool {
        self.shared.presents_token.load(Ordering::Relaxed)
    }

    /// Why the client gave up for good, if it did (it then never connects again).
    pub fn failure(&self) -> Option<TransportError> {
        self.shared.fatal.borrow().as_ref().map(Fatal::error)
    }

    /// Waits until the client gives up for good, and says why.
    pub async fn failed(&self) -> TransportError {
        let mut fatal = self.shared.fatal.subscribe();
        let error = match fatal.wait_for(Option::is_some).await {
            Ok(f) => f.as_ref().map_or(TransportError::Closed, Fatal::error),
            Err(_) => TransportError::Closed,
        };
        error
    }

    /// The smoothed RTT to the relay (see [`TrackStats::rtt`]).
    pub fn rtt(&self) -> Option<Duration> {
        match self.shared.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Publishes `track` in `namespace` on every connection from now on, a QUIC stream per
    /// frame.
    pub fn publish(&self, namespace: TrackNamespace, track: &str) -> LocalTrack {
        self.publish_with(namespace, track, Delivery::Stream)
    }

    /// [`MoqClient::publish`], the frames carried as `delivery` says (on every connection).
    pub fn publish_with(
        &self,
        namespace: TrackNamespace,
        track: &str,
        delivery: Delivery,
    ) -> LocalTrack {
        let stats = TrackStats::sharing_rtt(&self.shared.rtt_us);
        let reg = Arc::new(LocalReg {
            namespace,
            name: track.to_string(),
            delivery,
            slot: Arc::default(),
            fetched: stats.fetched.clone(),
            announced: watch::channel(0).0,
            refused: watch::channel(None).0,
        });
        let _ = self.commands.send(Command::Publish(reg.clone()));
        LocalTrack {
            fatal: self.shared.fatal.subscribe(),
            announced: reg.announced.subscribe(),
            refused: reg.refused.subscribe(),
            reg,
            stats,
        }
    }

    /// Subscribes to `track` in `namespace` on every connection from now on, retrying
    /// while the relay does not know the track.
    pub fn subscribe(&self, namespace: TrackNamespace, track: &str) -> RemoteTrack {
        let stats = TrackStats::sharing_rtt(&self.shared.rtt_us);
        let inbox = Arc::new(Inbox {
            queue: Mutex::default(),
            notify: Notify::new(),
            stats: stats.clone(),
        });
        if let Some(fatal) = self.shared.fatal.borrow().clone() {
            inbox.fail(fatal.error());
        }
        let _ = self.commands.send(Command::Subscribe(Arc::new(RemoteReg {
            namespace,
            name: track.to_string(),
            inbox: inbox.clone(),
        })));
        RemoteTrack {
            inbox,
            stats,
            playout_deadline: self.playout_deadline,
        }
    }
}

/// A local track: frames sent while no connection is up are dropped (and counted).
pub struct LocalTrack {
    reg: Arc<LocalReg>,
    announced: watch::Receiver<u64>,
    refused: watch::Receiver<Option<String>>,
    fatal: watch::Receiver<Option<Fatal>>,
    stats: Arc<TrackStats>,
}

impl LocalTrack {
    /// Sends one frame as group `seq`. Returns whether a connection took it.
    pub fn send(&self, seq: u64, payload: Bytes) -> bool {
        let mut slot = self.reg.slot.lock().expect("slot lock");
        let sent = match slot.as_mut() {
            Some(publisher) => match publisher.send(seq, payload) {
                Ok(()) => true,
                // This frame only: the track and its connection are fine.
                Err(e @ TransportError::DatagramTooLarge { .. }) => {
                    tracing::debug!("frame {seq} not sent: {e}");
                    self.stats.too_large.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(e) => {
                    tracing::debug!("publishing frame {seq} failed: {e}");
                    *slot = None;
                    false
                }
            },
            None => false,
        };
        let counter = if sent {
            &self.stats.sent
        } else {
            &self.stats.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
        sent
    }

    /// Waits until the track is announced on some connection, or the relay refused it.
    pub async fn announced(&mut self) -> Result<(), TransportError> {
        tokio::select! {
            res = self.announced.wait_for(|n| *n > 0) => {
                res.map(|_| ()).map_err(|_| TransportError::Closed)
            }
            res = self.refused.wait_for(Option::is_some) => match res {
                Ok(reason) if reason.as_deref() == Some("unauthorized") => {
                    Err(TransportError::Unauthorized)
                }
                Ok(reason) => Err(TransportError::AnnounceRefused(
                    reason.clone().unwrap_or_default(),
                )),
                Err(_) => Err(TransportError::Closed),
            },
            res = self.fatal.wait_for(Option::is_some) => match res {
                Ok(fatal) => Err(fatal
                    .as_ref()
                    .map_or(TransportError::Closed, Fatal::error)),
                Err(_) => Err(TransportError::Closed),
            },
        }
    }

    pub fn stats(&self) -> &TrackStats {
        &self.stats
    }
}

/// A remote track across reconnects: frames in arrival order with their group id.
pub struct RemoteTrack {
    inbox: Arc<Inbox>,
    stats: Arc<TrackStats>,
    playout_deadline: Duration,
}

impl RemoteTrack {
    /// The next frame still worth playing, in arrival order. Frames that waited past the
    /// playout deadline are dropped and counted as late; reordering is left to the jitter
    /// buffer, which knows whether a frame's slot has been played. Fails only when the relay
    /// refused the subscription.
    pub async fn next(&mut self) -> Result<(u64, Bytes), TransportError> {
        loop {
            let notified = self.inbox.notify.notified();
            {
                let mut q = self.inbox.queue.lock().expect("inbox lock");
                if let Some(error) = q.error.take() {
                    return Err(error);
                }
                while let Some((seq, payload, arrived)) = q.frames.pop_front() {
                    if arrived.elapsed() > self.playout_deadline {
                        self.stats.late.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    return Ok((seq, payload));
                }
            }
            notified.await;
        }
    }

    pub fn stats(&self) -> &TrackStats {
        &self.stats
    }
}

async fn drive(
    config: ClientConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
) {
    let mut locals: Vec<Arc<LocalReg>> = Vec::new();
    let mut remotes: Vec<Arc<RemoteReg>> = Vec::new();
    loop {
        while let Ok(cmd) = commands.try_recv() {
            register(cmd, &mut locals, &mut remotes);
        }
        let token = match shared.presents_token.load(Ordering::Relaxed) {
            true => config.token.as_deref(),
            false => None,
        };
        // The first connection is one attempt, and failing it is final; later ones overlap
        // and go on until one succeeds or the relay refuses us.
        let attempt = match shared.connects.load(Ordering::Relaxed) {
            0 => connect_once(&config, token).boxed(),
            _ => reconnect(&config, token).boxed(),
        };
        let connected = {
            let mut attempt = pin!(attempt);
            loop {
                tokio::select! {
                    res = &mut attempt => break res,
                    cmd = commands.recv() => match cmd {
                        Some(cmd) => register(cmd, &mut locals, &mut remotes),
                        None => return,
                    },
                }
            }
        };
        match connected {
            Ok((conn, session)) => {
                shared.connects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(url = %config.url, "connected to the relay");
                let ended = run_connection(
                    conn,
                    session,
                    &mut commands,
                    &mut locals,
                    &mut remotes,
                    &shared.rtt_us,
                )
                .await;
                shared.rtt_us.store(0, Ordering::Relaxed);
                match ended {
                    Ended::Dropped => return,
                    Ended::Lost => {
                        tracing::info!(url = %config.url, "lost the relay; reconnecting")
                    }
                    Ended::Refused(reason) => {
                        if !refused(&config, &shared, &remotes, reason) {
                            return;
                        }
                    }
                }
            }
            Err(TransportError::SessionRefused(reason)) => {
                if !refused(&config, &shared, &remotes, reason) {
                    return;
                }
            }
            // Logged at debug only: every handle gets the error, and the caller reports it.
            Err(TransportError::Certificate { url, problem }) => {
                tracing::debug!(%url, "certificate refused: {problem}");
                give_up(&shared, &remotes, Fatal::Certificate(url, *problem));
                return;
            }
            Err(e) if shared.connects.load(Ordering::Relaxed) == 0 => {
                tracing::debug!(url = %config.url, "could not connect: {e}");
                give_up(&shared, &remotes, Fatal::Unreachable(e.to_string()));
                return;
            }
            // `reconnect` returns only refusals; kept for completeness of the match.
            Err(e) => tracing::debug!(url = %config.url, "reconnect failed: {e}"),
        }
    }
}

/// A connection and the future that drives its MoQ session.
type Connected = (
    MoqConnection,
    BoxFuture<'static, Result<(), moq_transport::session::SessionError>>,
);

/// One connection attempt within [`MAX_CONNECT_TIMEOUT`].
async fn connect_once(
    config: &ClientConfig,
    token: Option<&[u8]>,
) -> Result<Connected, TransportError> {
    let connect = MoqConnection::connect_with_token(&config.url, &config.verify, token);
    match tokio::time::timeout(MAX_CONNECT_TIMEOUT, connect).await {
        Ok(res) => res.map(|(conn, session)| (conn, session.boxed())),
        Err(_) => Err(TransportError::Connect {
            url: config.url.clone(),
            reason: format!("no handshake within {MAX_CONNECT_TIMEOUT:?}"),
        }),
    }
}

/// Reconnects: a new attempt after [`MIN_BACKOFF`], doubling up to [`MAX_BACKOFF`], with at
/// most [`MAX_OVERLAPPING_ATTEMPTS`] in flight, until one connects. Returns an error only
/// when the relay refuses the session or its certificate (retrying cannot help).
async fn reconnect(
    config: &ClientConfig,
    token: Option<&[u8]>,
) -> Result<Connected, TransportError> {
    let mut attempts = FuturesUnordered::new();
    let mut gap = MIN_BACKOFF;
    let mut next = Instant::now();
    loop {
        if attempts.len() < MAX_OVERLAPPING_ATTEMPTS && Instant::now() >= next {
            attempts.push(connect_once(config, token));
            next = Instant::now() + gap;
            gap = (gap * 2).min(MAX_BACKOFF);
        }
        tokio::select! {
            Some(res) = attempts.next() => match res {
                Ok(connected) => return Ok(connected),
                Err(e @ (TransportError::SessionRefused(_) | TransportError::Certificate { .. })) => {
                    return Err(e)
                }
                Err(e) => tracing::debug!(url = %config.url, "reconnect attempt failed: {e}"),
            },
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

/// The relay closed a session as UNAUTHORIZED. Under [`TokenPolicy::Auto`], while the token
/// is still presented, that is read as "this relay does not take our token": connect again
/// at once without it, and keep it back for the client's lifetime. Otherwise there is
/// nothing left to try: give up and say so. Returns whether to keep connecting.
fn refused(
    config: &ClientConfig,
    shared: &Shared,
    remotes: &[Arc<RemoteReg>],
    reason: String,
) -> bool {
    if config.token_policy == TokenPolicy::Auto && shared.presents_token.load(Ordering::Relaxed) {
        tracing::info!(url = %config.url, "the relay refused our token ({reason}); connecting without it");
        shared.presents_token.store(false, Ordering::Relaxed);
        return true;
    }
    // Every handle gets the error; the caller reports it.
    tracing::debug!(url = %config.url, "the relay refused the session: unauthorized ({reason})");
    give_up(shared, remotes, Fatal::Refused(reason));
    false
}

fn give_up(shared: &Shared, remotes: &[Arc<RemoteReg>], fatal: Fatal) {
    for reg in remotes {
        reg.inbox.fail(fatal.error());
    }
    shared.fatal.send_replace(Some(fatal));
}

/// How one connection ended.
enum Ended {
    /// The client and its handles were dropped.
    Dropped,
    /// The connection was lost (relay gone, network, idle timeout): reconnect.
    Lost,
    /// The relay closed the session as UNAUTHORIZED.
    Refused(String),
}

fn register(cmd: Command, locals: &mut Vec<Arc<LocalReg>>, remotes: &mut Vec<Arc<RemoteReg>>) {
    match cmd {
        Command::Publish(reg) => locals.push(reg),
        Command::Subscribe(reg) => remotes.push(reg),
    }
}

/// Serves one connection until it ends.
async fn run_connection(
    conn: MoqConnection,
    session: impl Future<Output = Result<(), moq_transport::session::SessionError>>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    locals: &mut Vec<Arc<LocalReg>>,
    remotes: &mut Vec<Arc<RemoteReg>>,
    rtt_us: &AtomicU64,
) -> Ended {
    let mut session = pin!(session);
    let mut rtt_timer = tokio::time::interval(RTT_SAMPLE_INTERVAL);
    rtt_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    for reg in locals.iter() {
        tasks.push(
            publish_task(
                conn.publisher.clone(),
                conn.fetches.clone(),
                conn.datagram_path(),
                reg.clone(),
            )
            .boxed(),
        );
    }
    for reg in remotes.iter() {
        tasks.push(subscribe_task(conn.subscriber.clone(), reg.clone()).boxed());
    }
    let ended = loop {
        tokio::select! {
            // The tracks' readers before the session: a datagram track keeps only its newest
            // datagram, so its reader takes each one before the session hands over the next
            // (see `quic::OneDatagramPerTurn`).
            biased;
            Some(()) = tasks.next(), if !tasks.is_empty() => {}
            res = &mut session => {
                if let Err(e) = &res {
                    tracing::debug!("relay session ended: {e}");
                }
                break match conn.refused(res.as_ref().err()) {
                    Some(reason) => Ended::Refused(reason),
                    None => Ended::Lost,
                };
            }
            cmd = commands.recv() => match cmd {
                Some(Command::Publish(reg)) => {
                    let path = conn.datagram_path();
                    let (publisher, fetches) = (conn.publisher.clone(), conn.fetches.clone());
                    tasks.push(publish_task(publisher, fetches, path, reg.clone()).boxed());
                    locals.push(reg);
                }
                Some(Command::Subscribe(reg)) => {
                    tasks.push(subscribe_task(conn.subscriber.clone(), reg.clone()).boxed());
                    remotes.push(reg);
                }
                None => {
                    conn.close();
                    break Ended::Dropped;
                }
            },
            _ = rtt_timer.tick() => {
                // At least 1 µs: 0 means "not connected".
                let us = u64::try_from(conn.rtt().as_micros()).unwrap_or(u64::MAX).max(1);
                rtt_us.store(us, Ordering::Relaxed);
            }
        }
    };
    for reg in locals.iter() {
        reg.slot.lock().expect("slot lock").take();
    }
    ended
}

async fn publish_task(
    mut publisher: Publisher,
    fetches: Arc<FetchIndex>,
    path: super::delivery::DatagramPath,
    reg: Arc<LocalReg>,
) {
    let announced = publish_on(
        &mut publisher,
        &fetches,
        reg.namespace.clone(),
        &reg.name,
        reg.fetched.clone(),
        reg.delivery,
        path,
    )
    .await;
    match announced {
        Ok((track, serve)) => {
            *reg.slot.lock().expect("slot lock") = Some(track);
            reg.announced.send_modify(|n| *n += 1);
            serve.await;
        }
        Err(TransportError::Unauthorized) => {
            tracing::warn!(track = %reg.name, "relay refused the announce: wrong or missing token");
            reg.refused.send_replace(Some("unauthorized".into()));
        }
        Err(e) => {
            tracing::warn!(track = %reg.name, "announce failed: {e}");
            reg.refused.send_replace(Some(e.to_string()));
        }
    }
}

async fn subscribe_task(mut subscriber: Subscriber, reg: Arc<RemoteReg>) {
    let mut backoff = MIN_RESUBSCRIBE;
    loop {
        match subscribe_on(&mut subscriber, reg.namespace.clone(), &reg.name).await {
            Ok(mut track) => {
                backoff = MIN_RESUBSCRIBE;
                loop {
                    match track.next().await {
                        Ok(Some((seq, payload))) => reg.inbox.push(seq, payload),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(track = %reg.name, "track ended: {e}");
                            break;
                        }
                    }
                }
            }
            Err(ServeError::NotFound | ServeError::NotFoundWithId(..)) => {}
            Err(ServeError::Closed(UNAUTHORIZED)) => {
                tracing::warn!(track = %reg.name, "relay refused the subscribe: wrong or missing token");
                reg.inbox.fail(TransportError::Unauthorized);
                return;
            }
            Err(e) => tracing::debug!(track = %reg.name, "subscribe failed: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
