//! `call-relay`: a MoQ relay (moq-transport draft-18 over QUIC) and a Nostr relay in one
//! process. It knows nothing of calls: it forwards tracks and stores events.
#![forbid(unsafe_code)]

mod accept;
mod moq;
mod nostr;
pub mod state;
mod throttle;
pub mod tls;
pub mod turns;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::builder::BoolishValueParser;
use clap::Parser;
use nostr_relay_builder::prelude::{LocalRelay, RateLimit, RelayBuilder};
use serde::Deserialize;
use tokio::task::JoinHandle;
use url::Url;

pub use state::StateDir;
pub use tls::ServerCert;

/// Entry points for fuzzing (`relay/fuzz`, and the bounded loops in the tests); not an API.
#[doc(hidden)]
pub mod fuzz {
    pub use crate::moq::{fuzz_setup_and_namespace, FuzzOutcome};
}

/// Configuration of both relays. Every flag has a `CALL_RELAY_*` environment variable.
// (Not a doc comment: clap would print it in --help.) The binary's defaults keep state on
// disk (`--state-dir`); `RelayConfig::default()` and `RelayConfig::ephemeral()`, for tests
// and embedding, keep nothing (`ephemeral: true`).
#[derive(Parser, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, default)]
#[command(
    name = "call-relay",
    version,
    about = "MoQ + Nostr relay for `call`",
    after_help = "Examples:\n  call-relay                                   # loopback, self-signed, token auth\n  call-relay --moq-bind 0.0.0.0:4443 --tls-cert cert.pem --tls-key key.pem\n  CALL_RELAY_AUTH=open call-relay              # no tokens, for interop tests\n  call-relay --state-dir /var/lib/call-relay   # certificate and events kept there\n  call-relay --ephemeral                       # new certificate, events in memory only"
)]
pub struct RelayConfig {
    /// UDP address of the MoQ (QUIC) listener.
    #[arg(long, env = "CALL_RELAY_MOQ_BIND", default_value = "127.0.0.1:4443")]
    pub moq_bind: SocketAddr,
    /// TCP address of the Nostr (WebSocket) listener.
    #[arg(long, env = "CALL_RELAY_NOSTR_BIND", default_value = "127.0.0.1:7777")]
    pub nostr_bind: SocketAddr,
    /// Directory of the relay's state: its generated certificate and key, kept so the
    /// fingerprint clients pin survives restarts, and its Nostr events (LMDB). Created
    /// 0700. Default: the platform data directory, e.g. ~/.local/share/call-relay.
    #[arg(long, env = "CALL_RELAY_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Keep nothing on disk: a new self-signed certificate (and fingerprint) at every
    /// start, Nostr events in memory only. --state-dir is then ignored.
    #[arg(long, env = "CALL_RELAY_EPHEMERAL", value_parser = BoolishValueParser::new())]
    pub ephemeral: bool,
    /// TLS certificate chain (PEM). Without it a self-signed certificate is generated
    /// once and kept in the state directory (with --ephemeral: at every start).
    #[arg(long, env = "CALL_RELAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, env = "CALL_RELAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Names the generated certificate is valid for (comma-separated). Used when it is
    /// generated: a kept certificate keeps its names (delete it to change them).
    #[arg(
        long,
        env = "CALL_RELAY_TLS_NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,::1"
    )]
    pub tls_names: Vec<String>,
    /// Events each Nostr connection may publish per minute.
    #[arg(
        long,
        env = "CALL_RELAY_NOSTR_EVENTS_PER_MINUTE",
        default_value_t = 6000
    )]
    pub nostr_events_per_minute: u32,
    /// MoQ access control: `token` binds each namespace to the SHA-256 of the first
    /// AUTHORIZATION TOKEN used in it; `open` lets anyone publish and subscribe (interop).
    #[arg(long, env = "CALL_RELAY_AUTH", value_enum, default_value_t = AuthMode::Token)]
    pub auth: AuthMode,
    /// Leading namespace fields one token binding covers (`--auth token`): namespaces
    /// that share them share the binding. 2 covers everything under `("call", <id>)`,
    /// however many fields participants append.
    #[arg(long, env = "CALL_RELAY_TOKEN_SCOPE", default_value_t = 2,
          value_parser = clap::value_parser!(u8).range(1..=32))]
    pub token_scope: u8,
    /// Concurrent MoQ sessions; further connections are closed with a reason.
    #[arg(long, env = "CALL_RELAY_MAX_SESSIONS", default_value_t = 4096)]
    pub max_sessions: u64,
    /// Announced namespaces plus subscriptions one MoQ session may hold at once.
    #[arg(long, env = "CALL_RELAY_MAX_TRACKS_PER_SESSION", default_value_t = 256)]
    pub max_tracks_per_session: usize,
    /// Largest object forwarded, in bytes; larger objects are dropped and counted.
    #[arg(long, env = "CALL_RELAY_MAX_OBJECT_BYTES", default_value_t = 65536)]
    pub max_object_bytes: usize,
    /// Groups a subscriber may have waiting for its connection; while it has this many,
    /// new groups skip it (counted as `behind`) so a slow subscriber gets fresh objects,
    /// not a growing backlog of stale ones. 0 = no limit.
    #[arg(long, env = "CALL_RELAY_MAX_UNSENT_GROUPS", default_value_t = 32)]
    pub max_unsent_groups: usize,
    /// Seconds a MoQ connection may take, after its QUIC handshake, for its WebTransport
    /// CONNECT request (`connect_timeouts`), and then again to send SETUP
    /// (`setup_timeouts`); a late one is closed with a reason and counted.
    #[arg(long, env = "CALL_RELAY_SETUP_TIMEOUT", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub setup_timeout: u64,
    /// Concurrent MoQ sessions from one source address (IPv4 address or IPv6 /64);
    /// further sessions are closed with a reason and counted (`refused_per_address`).
    #[arg(long, env = "CALL_RELAY_MAX_SESSIONS_PER_ADDRESS", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sessions_per_address: u64,
    /// Largest Nostr event (its JSON) accepted, in bytes: a bigger event gets `OK false`,
    /// and a WebSocket message over this plus 1 KiB closes the connection (code 1009).
    #[arg(long, env = "CALL_RELAY_NOSTR_MAX_EVENT_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u64).range(1024..=(1 << 30)))]
    pub nostr_max_event_bytes: u64,
    /// Bytes of Nostr events (JSON size) the relay stores; events past it get `OK false`.
    /// Events already in the state directory at start count against it.
    #[arg(
        long,
        env = "CALL_RELAY_NOSTR_MAX_STORED_BYTES",
        default_value_t = 256 << 20
    )]
    pub nostr_max_stored_bytes: u64,
    /// Seconds a Nostr client may take for its WebSocket handshake before it is dropped.
    #[arg(long, env = "CALL_RELAY_NOSTR_HANDSHAKE_TIMEOUT", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub nostr_handshake_timeout: u64,
    /// Seconds between one-line stats logs (0 = never).
    #[arg(long, env = "CALL_RELAY_STATS_INTERVAL", default_value_t = 10)]
    pub stats_interval: u64,
}

/// MoQ access control mode.
#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Namespaces are bound to SHA-256(token) on first use.
    Token,
    /// No token checks (for interop with clients that send none).
    Open,
}

impl Default for RelayConfig {
    /// The binary's defaults, except that nothing is kept on disk: a library user or a
    /// test must ask for a state directory (`ephemeral: false`), never get one by surprise.
    fn default() -> Self {
        Self {
            ephemeral: true,
            ..Self::parse_from(["call-relay"])
        }
    }
}

impl RelayConfig {
    /// Both listeners on ephemeral loopback ports: for tests and `call demo`.
    pub fn ephemeral() -> Self {
        Self {
            moq_bind: "127.0.0.1:0".parse().expect("valid"),
            nostr_bind: "127.0.0.1:0".parse().expect("valid"),
            ..Self::default()
        }
    }
}

/// The relays, bound and ready; [`Relay::run`] serves MoQ until the future is dropped.
pub struct Relay {
    listener: accept::Listener,
    moq_addr: SocketAddr,
    nostr: NostrGuard,
    nostr_url: Url,
    fingerprint: String,
    state: Option<StateDir>,
    routes: Arc<moq::Routes>,
    accept_stats: Arc<accept::Stats>,
    nostr_stats: Arc<nostr::Stats>,
    store: Arc<nostr::Store>,
    stats_interval: std::time::Duration,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("moq_url", &self.moq_url().as_str())
            .field("nostr_url", &self.nostr_url.as_str())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Relay {
    /// Binds both listeners. The Nostr relay starts serving at once (its crate runs its own
    /// accept task); MoQ sessions are served by [`Relay::run`].
    pub async fn bind(config: &RelayConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let state = if config.ephemeral {
            None
        } else {
            let dir = match &config.state_dir {
                Some(dir) => dir.clone(),
                None => StateDir::default_path().ok_or(state::StateError::NoDataDir)?,
            };
            Some(StateDir::open(&dir)?)
        };
        let cert = match (&config.tls_cert, &config.tls_key, &state) {
            (Some(c), Some(k), _) => ServerCert::load(c, k)?,
            (_, _, Some(state)) => {
                ServerCert::load_or_generate(&state.cert(), &state.key(), &config.tls_names)?
            }
            _ => ServerCert::self_signed(&config.tls_names)?,
        };
        let accept_stats = Arc::new(accept::Stats::default());
        let moq_listener = accept::Listener::bind(
            config.moq_bind,
            cert.server_config()?,
            std::time::Duration::from_secs(config.setup_timeout),
            config.max_sessions,
            accept_stats.clone(),
        )
        .context("binding the MoQ socket")?;
        let moq_addr = moq_listener.local_addr()?;

        // Our own listener and WebSocket front (see `nostr.rs`); the library serves the
        // connections it hands over and never listens itself.
        let listener = tokio::net::TcpListener::bind(config.nostr_bind)
            .await
            .with_context(|| format!("binding the Nostr listener on {}", config.nostr_bind))?;
        let nostr_addr = listener.local_addr()?;
        let nostr_stats = Arc::new(nostr::Stats::default());
        let store = Arc::new(match &state {
            Some(state) => nostr::Store::persistent(
                &state.nostr(),
                config.nostr_max_stored_bytes,
                nostr_stats.clone(),
            )
            .await
            .with_context(|| {
                format!(
                    "opening the Nostr event database in {} (if it is damaged, move it away to \
                     start with no stored events)",
                    state.nostr().display()
                )
            })?,
            None => nostr::Store::memory(config.nostr_max_stored_bytes, nostr_stats.clone()),
        });
        let relay = LocalRelay::new(
            RelayBuilder::default()
                .addr(nostr_addr.ip())
                .port(nostr_addr.port())
                .database(store.clone())
                .write_policy(nostr::QuotaPolicy(store.clone()))
                .rate_limit(RateLimit {
                    max_reqs: 500,
                    notes_per_minute: config.nostr_events_per_minute,
                }),
        );
        let limits = nostr::Limits {
            max_event_bytes: usize::try_from(config.nostr_max_event_bytes)
                .context("--nostr-max-event-bytes")?,
            handshake_timeout: std::time::Duration::from_secs(config.nostr_handshake_timeout),
        };
        let front = Arc::new(nostr::Front::new(
            relay.clone(),
            limits,
            nostr_stats.clone(),
        ));
        let accept = tokio::spawn(front.accept_loop(listener));
        let nostr_url = Url::parse(&format!("ws://{nostr_addr}"))?;
        Ok(Self {
            listener: moq_listener,
            moq_addr,
            nostr: NostrGuard { relay, accept },
            nostr_url,
            fingerprint: cert.fingerprint,
            state,
            routes: Arc::new(moq::Routes::new(moq::Policy::from(config))),
            accept_stats,
            nostr_stats,
            store,
            stats_interval: std::time::Duration::from_secs(config.stats_interval),
        })
    }

    pub fn moq_url(&self) -> Url {
        Url::parse(&format!("moqt://{}", self.moq_addr)).expect("valid url")
    }

    pub fn nostr_url(&self) -> Url {
        self.nostr_url.clone()
    }

    /// SHA-256 of the MoQ certificate (hex), for clients that pin it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Where the relay keeps its certificate and events; `None` when ephemeral.
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.state.as_ref().map(StateDir::path)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RelayStats {
        self.stats_handle().get()
    }

    /// A handle reading the counters while [`Relay::run`] owns the relay.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            routes: self.routes.clone(),
            accept: self.accept_stats.clone(),
            nostr: self.nostr_stats.clone(),
            store: self.store.clone(),
        }
    }

    /// Serves MoQ sessions until dropped; the Nostr relay stops with it.
    pub async fn run(self) {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `shutdown` resolves (or this future is dropped), then closes every MoQ
    /// session with a reason and stops the Nostr relay.
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) {
        let stats_log = log_stats(self.stats_handle(), self.stats_interval);
        let _nostr = self.nostr;
        // Dropped in reverse order: sessions are closed with a reason first, then whatever
        // else the endpoint still holds.
        let _endpoint = self.listener.closer();
        let _sessions = SessionsGuard(self.routes.clone());
        tokio::select! {
            () = self.listener.run(self.routes.clone()) => {}
            () = shutdown => tracing::info!("shutting down"),
            () = stats_log => {}
        }
    }
}

/// Closes every MoQ session when the relay stops, however it stops.
struct SessionsGuard(Arc<moq::Routes>);

impl Drop for SessionsGuard {
    fn drop(&mut self) {
        self.0.close_all("relay shutting down");
    }
}

async fn log_stats(stats: StatsHandle, every: std::time::Duration) {
    if every.is_zero() {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last = stats.get();
    loop {
        tick.tick().await;
        let now = stats.get();
        let secs = every.as_secs_f64();
        tracing::info!(
            "moq sessions={} tracks={} subscriptions={} objects_in/s={:.0} objects_out/s={:.0} drops={} behind={} refused={}",
            now.sessions,
            now.upstream_tracks,
            now.downstream_subscriptions,
            (now.objects_in - last.objects_in) as f64 / secs,
            (now.objects_out - last.objects_out) as f64 / secs,
            now.drops - last.drops,
            now.behind - last.behind,
            now.refused - last.refused,
        );
        if now.setup_timeouts != last.setup_timeouts
            || now.refused_per_address != last.refused_per_address
            || now.datagrams_too_large != last.datagrams_too_large
            || now.connect_timeouts != last.connect_timeouts
            || now.refused_pending != last.refused_pending
        {
            tracing::info!(
                "moq setup_timeouts={} refused_per_address={} datagrams_too_large={} \
                 connect_timeouts={} refused_pending={}",
                now.setup_timeouts - last.setup_timeouts,
                now.refused_per_address - last.refused_per_address,
                now.datagrams_too_large - last.datagrams_too_large,
                now.connect_timeouts - last.connect_timeouts,
                now.refused_pending - last.refused_pending,
            );
        }
        tracing::info!(
            "nostr connections={} stored_bytes={} too_big={} malformed={} invalid_signature={} handshake_timeouts={} quota_refused={} accept_errors={}",
            now.nostr_connections,
            now.nostr_stored_bytes,
            now.nostr_too_big - last.nostr_too_big,
            now.nostr_malformed - last.nostr_malformed,
            now.nostr_invalid_signature - last.nostr_invalid_signature,
            now.nostr_handshake_timeouts - last.nostr_handshake_timeouts,
            now.nostr_quota_refused - last.nostr_quota_refused,
            now.nostr_accept_errors - last.nostr_accept_errors,
        );
        last = now;
    }
}

/// The Nostr relay and our accept loop in front of it; both stop when the relay is dropped,
/// whether or not it ever ran.
struct NostrGuard {
    relay: LocalRelay,
    accept: JoinHandle<()>,
}

impl Drop for NostrGuard {
    fn drop(&mut self) {
        self.accept.abort();
        self.relay.shutdown();
    }
}

/// Reads the counters of a running relay.
#[derive(Clone)]
pub struct StatsHandle {
    routes: Arc<moq::Routes>,
    accept: Arc<accept::Stats>,
    nostr: Arc<nostr::Stats>,
    store: Arc<nostr::Store>,
}

impl StatsHandle {
    pub fn get(&self) -> RelayStats {
        let n = &self.nostr;
        let a = &self.accept;
        RelayStats {
            connect_timeouts: a.connect_timeouts.load(Ordering::Relaxed),
            refused_pending: a.refused_pending.load(Ordering::Relaxed),
            nostr_connections: n.connections.load(Ordering::Relaxed),
            nostr_stored_bytes: self.store.stored_bytes(),
            nostr_too_big: n.too_big.load(Ordering::Relaxed),
            nostr_malformed: n.malformed.load(Ordering::Relaxed),
            nostr_invalid_signature: n.invalid_signature.load(Ordering::Relaxed),
            nostr_handshake_timeouts: n.handshake_timeouts.load(Ordering::Relaxed),
            nostr_handshake_failures: n.handshake_failures.load(Ordering::Relaxed),
            nostr_quota_refused: n.quota_refused.load(Ordering::Relaxed),
            nostr_accept_errors: n.accept_errors.load(Ordering::Relaxed),
            ..self.routes.stats()
        }
    }
}

/// Relay counters (MoQ, then Nostr), since start unless said otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub sessions: u64,
    pub upstream_tracks: u64,
    pub downstream_subscriptions: u64,
    /// Objects received from publishers since start.
    pub objects_in: u64,
    /// Object copies handed to subscribers since start.
    pub objects_out: u64,
    /// Object copies not delivered (subscriber gone, object too large) since start.
    pub drops: u64,
    /// Object copies skipped because their subscriber was too far behind, since start.
    pub behind: u64,
    /// Sessions, announces and subscribes refused (token, limits) since start.
    pub refused: u64,
    /// MoQ sessions closed because SETUP did not arrive within `--setup-timeout`.
    pub setup_timeouts: u64,
    /// MoQ sessions refused by `--max-sessions-per-address` (also in `refused`).
    pub refused_per_address: u64,
    /// Objects received as OBJECT_DATAGRAMs (also in `objects_in`) since start.
    pub datagrams_in: u64,
    /// Datagram copies not sent because they exceed what the subscriber's path carries
    /// (also in `drops`).
    pub datagrams_too_large: u64,
    /// QUIC connections closed because their handshake did not finish within 10 s or,
    /// for WebTransport, their CONNECT request within `--setup-timeout` after it.
    pub connect_timeouts: u64,
    /// QUIC connections refused because `--max-sessions` connections were still
    /// handshaking.
    pub refused_pending: u64,
    /// Open Nostr WebSocket connections (now).
    pub nostr_connections: u64,
    /// Bytes of stored Nostr events (JSON size, now).
    pub nostr_stored_bytes: u64,
    /// Nostr events or messages refused for their size.
    pub nostr_too_big: u64,
    /// Nostr messages that were not NIP-01 client messages (answered with NOTICE).
    pub nostr_malformed: u64,
    /// Nostr events refused because their id or signature does not verify.
    pub nostr_invalid_signature: u64,
    /// Nostr connections dropped because the WebSocket handshake took too long.
    pub nostr_handshake_timeouts: u64,
    /// Nostr connections whose WebSocket handshake failed.
    pub nostr_handshake_failures: u64,
    /// Nostr events refused because the stored-bytes quota was reached.
    pub nostr_quota_refused: u64,
    /// Failed `accept` calls on the Nostr listener (each followed by a back-off pause).
    pub nostr_accept_errors: u64,
}

impl moq::Routes {
    fn stats(&self) -> RelayStats {
        RelayStats {
            sessions: self.stats.sessions.load(Ordering::Relaxed),
            upstream_tracks: self.stats.upstream_tracks.load(Ordering::Relaxed),
            downstream_subscriptions: self.stats.downstream_subscriptions.load(Ordering::Relaxed),
            objects_in: self.stats.objects_in.load(Ordering::Relaxed),
            objects_out: self.stats.objects_out.load(Ordering::Relaxed),
            drops: self.stats.drops.load(Ordering::Relaxed),
            behind: self.stats.behind.load(Ordering::Relaxed),
            refused: self.stats.refused.load(Ordering::Relaxed),
            setup_timeouts: self.stats.setup_timeouts.load(Ordering::Relaxed),
            refused_per_address: self.stats.refused_per_address.load(Ordering::Relaxed),
            datagrams_in: self.stats.datagrams_in.load(Ordering::Relaxed),
            datagrams_too_large: self.stats.datagrams_too_large.load(Ordering::Relaxed),
            ..RelayStats::default()
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM: what a service manager (systemd, docker) or a person
/// sends to stop a process cleanly.
pub async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
