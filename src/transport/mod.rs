//! MoQ client (moq-transport draft-18): one connection to a relay, publishing the local
//! track and subscribing to peers' tracks (PROTOCOL.md §4).

mod client;
mod delivery;
mod fetch;
mod impair;
mod quic;
mod tls;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use moq_transport::coding::TrackNamespace;
use moq_transport::serve::{Datagram, DatagramsReader, DatagramsWriter};
use moq_transport::serve::{
    ServeError, Subgroup, SubgroupsReader, SubgroupsWriter, Track, TrackReaderMode, Tracks,
};
use moq_transport::session::{
    transport as wt, PublishNamespace, Publisher, Session, SessionError, Subscribe, Subscriber,
};
use moq_transport::setup::AuthorizationToken;
use url::Url;

pub use client::{
    ClientConfig, LocalTrack, MoqClient, RemoteTrack, TrackStats, RTT_SAMPLE_INTERVAL,
};
use delivery::DatagramPath;
pub use delivery::{
    datagram_payload_limit, Delivery, DeliveryError, DATAGRAM_HEADER_MAX, MAX_DATAGRAM_OBJECT,
    MAX_DATAGRAM_PAYLOAD,
};
use fetch::{FetchIndex, RecentGroups};
pub use fetch::{RECENT_AGE, RECENT_GROUPS};
pub use impair::{ImpairedPath, Impairment, LossPattern, Offered};
pub use quic::{IDLE_TIMEOUT, KEEP_ALIVE};
pub use tls::{CertError, CertVerification};

/// Audio is the most urgent thing on the connection (lower value = more urgent).
pub const AUDIO_PRIORITY: u8 = 0;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("relay URL {0}: scheme must be moqt:// or https://")]
    Scheme(Url),
    #[error("connecting to {url}: {reason}")]
    Connect { url: Url, reason: String },
    #[error("moq session: {0}")]
    Session(#[from] SessionError),
    #[error("moq: {0}")]
    Serve(#[from] ServeError),
    #[error("invalid track namespace: {0}")]
    Namespace(String),
    #[error("tls: {0}")]
    Tls(String),
    /// The relay was reached but its certificate was refused; the message says what to do.
    #[error("connecting to {url}: {problem}")]
    Certificate { url: Url, problem: Box<CertError> },
    #[error("the relay refused the request: wrong or missing relay token")]
    Unauthorized,
    /// The relay closed the session itself as UNAUTHORIZED (at SETUP, typically because of
    /// the AUTHORIZATION TOKEN we presented, or because it wants one we lack). The relay
    /// was reachable; retrying the same way will not help.
    #[error("the relay refused our token/session: unauthorized ({0})")]
    SessionRefused(String),
    #[error("the relay refused the announce: {0}")]
    AnnounceRefused(String),
    #[error("relay unreachable, gave up: {0}")]
    Unreachable(String),
    #[error("the MoQ client was shut down")]
    Closed,
    #[error("track {0} was not found on the relay before the deadline")]
    NotFound(String),
    /// A frame of a datagram track does not fit one QUIC datagram on this path; it is
    /// not sent (docs/protocol.md §4: no fragmentation). `limit` 0: the relay takes no
    /// datagrams.
    #[error("a frame of {size} B does not fit a MoQ datagram here (at most {limit} B)")]
    DatagramTooLarge { size: usize, limit: usize },
}

impl TransportError {
    /// The certificate problem, if the relay's certificate was refused.
    pub fn certificate(&self) -> Option<&CertError> {
        match self {
            Self::Certificate { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// The namespace of a call: `call/<hex>`.
pub fn call_namespace(namespace_hex: &str) -> Result<TrackNamespace, TransportError> {
    TrackNamespace::try_from(vec!["call", namespace_hex])
        .map_err(|e| TransportError::Namespace(e.to_string()))
}

/// The namespace one participant announces: the call's namespace plus its track name,
/// `("call", <namespace hex>, <track hex>)`. Relays that allow only one announcer per
/// namespace (moq-relay-ietf) need it; see docs/protocol.md §4.
pub fn participant_namespace(
    namespace_hex: &str,
    track_hex: &str,
) -> Result<TrackNamespace, TransportError> {
    TrackNamespace::try_from(vec!["call", namespace_hex, track_hex])
        .map_err(|e| TransportError::Namespace(e.to_string()))
}

/// A session with a MoQ relay. The future returned beside it by [`MoqConnection::connect`]
/// drives the session and must be polled for anything to move.
pub struct MoqConnection {
    // Kept so the QUIC endpoint (and its socket) lives as long as the connection.
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    transport: wt::Session,
    kind: moq_transport::session::Transport,
    publisher: Publisher,
    subscriber: Subscriber,
    /// Tracks published on this connection, for answering FETCH.
    fetches: Arc<FetchIndex>,
}

/// Token type sent in SETUP's AUTHORIZATION TOKEN option. Type 0 is reserved for a type
/// agreed out of band (draft-18 §10.3.1.4): here, the call's 32 random relay-token bytes.
pub const RELAY_TOKEN_TYPE: u64 = 0;

/// Request error code a relay uses for a refused token (draft-18 UNAUTHORIZED).
pub(crate) const UNAUTHORIZED: u64 = 0x1;

/// Session termination code a relay closes with when it refuses the session
/// (draft-18 UNAUTHORIZED).
pub const SESSION_UNAUTHORIZED: u32 = 0x2;

/// When the client presents the call's relay token in SETUP (docs/protocol.md §4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenPolicy {
    /// Present it; if the relay closes the session as unauthorized at SETUP, connect once
    /// more without it, and keep going without it for the client's lifetime. Relays that
    /// bind namespaces to tokens (call-relay) get it; anonymous relays that refuse any token
    /// they cannot verify (moq-dev moq-relay `--auth-public`) work too.
    #[default]
    Auto,
    /// Always present it; a refused session is an error.
    Always,
    /// Never present it (anonymous relays; the relay operator never sees the token).
    Never,
}

impl TokenPolicy {
    pub const NAMES: [&'static str; 3] = ["auto", "always", "never"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Always => "always",
            Self::Never => "never",
        }
    }
}

impl std::fmt::Display for TokenPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("relay token policy {0:?}: expected auto, always or never")]
pub struct TokenPolicyError(String);

impl std::str::FromStr for TokenPolicy {
    type Err = TokenPolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(TokenPolicyError(s.to_string())),
        }
    }
}

/// Whether `connection` was closed by the relay as UNAUTHORIZED, with its reason. Raw QUIC
/// carries the MoQ code as the QUIC application close code; WebTransport carries it
/// HTTP/3-encoded, which the transport decodes into `err`.
fn refused_as_unauthorized(
    err: Option<&SessionError>,
    connection: &quinn::Connection,
    kind: moq_transport::session::Transport,
) -> Option<String> {
    if let Some(SessionError::WebTransport(e)) = err {
        if let Some((code, reason)) = e.session_error() {
            return (code == SESSION_UNAUTHORIZED).then(|| or_unnamed(reason));
        }
    }
    match connection.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let raw = close.error_code.into_inner();
            let code = match kind {
                moq_transport::session::Transport::RawQuic => u32::try_from(raw).ok(),
                _ => wt::quinn::proto::error_from_http3(raw),
            };
            (code == Some(SESSION_UNAUTHORIZED))
                .then(|| or_unnamed(String::from_utf8_lossy(&close.reason).into_owned()))
        }
        _ => None,
    }
}

fn or_unnamed(reason: String) -> String {
    match reason.trim() {
        "" => "no reason given".to_string(),
        r => r.to_string(),
    }
}

impl MoqConnection {
    /// Connects without presenting a relay token (for relays in open mode).
    pub async fn connect(
        url: &Url,
        verify: &CertVerification,
    ) -> Result<(Self, impl Future<Output = Result<(), SessionError>> + Send), TransportError> {
        Self::connect_with_token(url, verify, None).await
    }

    /// Connects, presenting `token` (the call's relay token) in SETUP as an
    /// AUTHORIZATION TOKEN; the bundled relay binds each namespace to its SHA-256.
    ///
    /// A relay that closes the session as UNAUTHORIZED during SETUP gives
    /// [`TransportError::SessionRefused`]. The returned future drives the session and
    /// answers FETCH for the tracks published on it (see [`RECENT_GROUPS`]).
    pub async fn connect_with_token(
        url: &Url,
        verify: &CertVerification,
        token: Option<&[u8]>,
    ) -> Result<(Self, impl Future<Output = Result<(), SessionError>> + Send), TransportError> {
        let dialled = quic::dial(url, verify).await?;
        let transport = dialled.session;
        let tokens = token
            .map(|t| vec![AuthorizationToken::new(RELAY_TOKEN_TYPE, t.to_vec())])
            .unwrap_or_default();
        let (session, publisher, subscriber) =
            match Session::connect_with_tokens(transport.clone(), None, dialled.kind, tokens).await
            {
                Ok(s) => s,
                Err(e) => {
                    return Err(
                        match refused_as_unauthorized(Some(&e), &dialled.connection, dialled.kind) {
                            Some(reason) => TransportError::SessionRefused(reason),
                            None => e.into(),
                        },
                    )
                }
            };
        // Before anything is announced: a FETCH that arrives first would be refused.
        publisher.accept_fetch();
        let fetches = Arc::new(FetchIndex::default());
        let serve = fetch::serve_fetches(publisher.clone(), fetches.clone());
        let run = async move {
            tokio::select! {
                res = session.run() => res,
                // Ends only with the session; then let run() report how.
                () = serve => std::future::pending().await,
            }
        };
        Ok((
            Self {
                _endpoint: dialled.endpoint,
                connection: dialled.connection,
                transport,
                kind: dialled.kind,
                publisher,
                subscriber,
                fetches,
            },
            run,
        ))
    }

    /// Why the relay refused this session, if it closed it as UNAUTHORIZED (`err` is what
    /// the session future ended with).
    pub fn refused(&self, err: Option<&SessionError>) -> Option<String> {
        refused_as_unauthorized(err, &self.connection, self.kind)
    }

    /// FETCH requests this connection refused (unknown track, groups no longer cached).
    pub fn fetches_refused(&self) -> u64 {
        self.fetches.refused()
    }

    /// Announces `namespace` and creates `track` in it. Returns once the relay accepted
    /// the announce; the returned future serves subscribers and must be polled.
    pub async fn publish(
        &mut self,
        namespace: TrackNamespace,
        track: &str,
    ) -> Result<(TrackPublisher, impl Future<Output = ()> + Send), TransportError> {
        self.publish_with(namespace, track, Delivery::Stream).await
    }

    /// [`MoqConnection::publish`] with the track's frames carried as `delivery` says.
    pub async fn publish_with(
        &mut self,
        namespace: TrackNamespace,
        track: &str,
        delivery: Delivery,
    ) -> Result<(TrackPublisher, impl Future<Output = ()> + Send), TransportError> {
        let fetched = Arc::new(AtomicU64::new(0));
        let path = self.datagram_path();
        publish_on(
            &mut self.publisher,
            &self.fetches,
            namespace,
            track,
            fetched,
            delivery,
            path,
        )
        .await
    }

    /// Subscribes to `track` in `namespace`, retrying while the relay does not know it yet
    /// (its publisher may not have announced) until `wait` has passed.
    pub async fn subscribe(
        &mut self,
        namespace: TrackNamespace,
        track: &str,
        wait: Duration,
    ) -> Result<TrackSubscriber, TransportError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut backoff = Duration::from_millis(20);
        loop {
            match subscribe_on(&mut self.subscriber, namespace.clone(), track).await {
                Ok(subscriber) => return Ok(subscriber),
                Err(ServeError::NotFound | ServeError::NotFoundWithId(..))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(ServeError::NotFound | ServeError::NotFoundWithId(..)) => {
                    return Err(TransportError::NotFound(track.to_string()))
                }
                Err(ServeError::Closed(UNAUTHORIZED)) => return Err(TransportError::Unauthorized),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// What a datagram track on this connection can send.
    pub(crate) fn datagram_path(&self) -> DatagramPath {
        DatagramPath {
            connection: self.connection.clone(),
            // WebTransport puts the session's quarter stream id (a varint) before each
            // datagram.
            prefix: match self.kind {
                moq_transport::session::Transport::WebTransport => 8,
                _ => 0,
            },
        }
    }

    /// The QUIC connection's smoothed round-trip time to the relay.
    pub fn rtt(&self) -> Duration {
        self.connection.rtt()
    }

    /// Closes the QUIC connection with code 0.
    pub fn close(&self) {
        self.transport.close(0, "bye");
    }
}

/// Announces `namespace` on `publisher` with one track in it (see [`MoqConnection::publish`]).
pub(crate) async fn publish_on(
    publisher: &mut Publisher,
    fetches: &FetchIndex,
    namespace: TrackNamespace,
    track: &str,
    fetched: Arc<AtomicU64>,
    delivery: Delivery,
    path: DatagramPath,
) -> Result<(TrackPublisher, impl Future<Output = ()> + Send), TransportError> {
    // The request half is dropped: subscribes for other names are answered NOT_FOUND.
    let (mut writer, _request, reader) = Tracks::new(namespace.clone()).produce();
    let track_writer = writer
        .create(track)
        .ok_or_else(|| TransportError::Namespace("track set already closed".into()))?;
    let out = match delivery {
        Delivery::Stream => Outgoing::Subgroups(track_writer.subgroups()?),
        Delivery::Datagram => Outgoing::Datagrams {
            writer: track_writer.datagrams()?,
            path,
        },
    };
    let announce = publisher.publish_namespace_start(namespace.clone()).await?;
    match announce.ok().await {
        Ok(()) => {}
        Err(ServeError::Closed(UNAUTHORIZED)) => return Err(TransportError::Unauthorized),
        Err(e) => return Err(TransportError::AnnounceRefused(e.to_string())),
    }
    let serve = serve_announce(announce, reader);
    let recent = Arc::new(Mutex::new(RecentGroups::default()));
    fetches.register(
        moq_transport::serve::FullTrackName {
            namespace,
            name: track.to_string().into(),
        },
        &recent,
        &fetched,
    );
    Ok((
        TrackPublisher {
            out,
            _tracks: writer,
            recent,
            fetched,
        },
        serve,
    ))
}

/// One SUBSCRIBE attempt on `subscriber`.
pub(crate) async fn subscribe_on(
    subscriber: &mut Subscriber,
    namespace: TrackNamespace,
    track: &str,
) -> Result<TrackSubscriber, ServeError> {
    let (writer, reader) = Track::new(namespace, track).produce();
    let subscription = subscriber.subscribe_open(writer).await?;
    Ok(TrackSubscriber {
        _subscription: subscription,
        reader: PendingMode::Track(reader),
    })
}

async fn serve_announce(announce: PublishNamespace, tracks: moq_transport::serve::TracksReader) {
    let mut serving = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = announce.subscribed() => match next {
                Ok(Some(subscribed)) => {
                    let tracks = tracks.clone();
                    serving.push(async move {
                        if let Err(e) = Publisher::serve_subscribe(subscribed, tracks).await {
                            tracing::debug!("serving a subscriber ended: {e}");
                        }
                    });
                }
                Ok(None) | Err(_) => break,
            },
            Some(()) = serving.next() => {}
        }
    }
    while serving.next().await.is_some() {}
}

/// How a local track's frames leave.
enum Outgoing {
    Subgroups(SubgroupsWriter),
    /// With the connection, whose datagram size limit each frame is checked against.
    Datagrams {
        writer: DatagramsWriter,
        path: DatagramPath,
    },
}

/// The local track: one MoQ group per media frame, one object in it, on a stream (one
/// subgroup) or in a datagram ([`Delivery`]).
pub struct TrackPublisher {
    out: Outgoing,
    // Dropping the writer of the track set would end the announce.
    _tracks: moq_transport::serve::TracksWriter,
    /// The newest groups sent on this connection, for a relay's joining FETCH. Per
    /// connection: a relay after a reconnect is told only of groups sent to it.
    recent: Arc<Mutex<RecentGroups>>,
    /// Objects answered to FETCH requests.
    fetched: Arc<AtomicU64>,
}

impl TrackPublisher {
    /// Sends one frame as group `seq`. On a datagram track a frame that does not fit one
    /// datagram is refused ([`TransportError::DatagramTooLarge`]) and the track goes on.
    pub fn send(&mut self, seq: u64, payload: Bytes) -> Result<(), TransportError> {
        match &mut self.out {
            Outgoing::Subgroups(subgroups) => {
                let mut group = subgroups.create(Subgroup {
                    group_id: seq,
                    subgroup_id: 0,
                    priority: AUDIO_PRIORITY,
                })?;
                group.write(payload.clone())?;
                group.finish()?;
            }
            Outgoing::Datagrams { writer, path } => {
                // Checked here: moq-transport would end the subscription on a datagram
                // QUIC refuses to send.
                let limit = path.payload_limit();
                if payload.len() > limit {
                    return Err(TransportError::DatagramTooLarge {
                        size: payload.len(),
                        limit,
                    });
                }
                writer.write(Datagram {
                    group_id: seq,
                    object_id: 0,
                    priority: AUDIO_PRIORITY,
                    status: moq_transport::data::ObjectStatus::NormalObject,
                    // The group has only this object, but a zero-length object cannot
                    // carry the end-of-group flag; leaving it off is always encodable.
                    end_of_group: false,
                    payload: payload.clone(),
                    extension_headers: Default::default(),
                })?;
            }
        }
        self.recent
            .lock()
            .expect("recent groups lock")
            .push(seq, payload);
        Ok(())
    }

    /// Objects this track answered to FETCH requests (a relay that subscribed late).
    pub fn fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }
}

enum PendingMode {
    Track(moq_transport::serve::TrackReader),
    Subgroups(SubgroupsReader),
    Datagrams(DatagramsReader),
}

/// A remote track: frames in arrival order with their group id (= frame sequence).
///
/// Read it continuously from the moment it is created: until its first read, moq-transport
/// keeps only the newest 8 groups for it. [`MoqClient`] does that for its callers.
pub struct TrackSubscriber {
    // Dropping the subscription sends UNSUBSCRIBE.
    _subscription: Subscribe,
    reader: PendingMode,
}

impl TrackSubscriber {
    /// The next frame, or `None` when the track ended.
    pub async fn next(&mut self) -> Result<Option<(u64, Bytes)>, TransportError> {
        loop {
            match &mut self.reader {
                // Whichever delivery the publisher chose (docs/protocol.md §4).
                PendingMode::Track(track) => match track.mode().await? {
                    TrackReaderMode::Subgroups(s) => self.reader = PendingMode::Subgroups(s),
                    TrackReaderMode::Datagrams(d) => self.reader = PendingMode::Datagrams(d),
                    TrackReaderMode::Stream(_) => return Err(ServeError::Mode.into()),
                },
                PendingMode::Datagrams(datagrams) => {
                    let Some(datagram) = datagrams.read().await? else {
                        return Ok(None);
                    };
                    // Status-only datagrams (end of track, …) carry no frame.
                    if datagram.status == moq_transport::data::ObjectStatus::NormalObject {
                        return Ok(Some((datagram.group_id, datagram.payload)));
                    }
                }
                PendingMode::Subgroups(groups) => {
                    let Some(mut group) = groups.next().await? else {
                        return Ok(None);
                    };
                    let id = group.group_id;
                    match group.read_next().await? {
                        Some(payload) => return Ok(Some((id, payload))),
                        None => continue,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TokenPolicy;

    #[test]
    fn token_policies_parse_from_their_names_and_nothing_else() {
        for name in TokenPolicy::NAMES {
            let policy: TokenPolicy = name.parse().unwrap();
            assert_eq!(policy.to_string(), name);
        }
        assert_eq!(
            " Never ".parse::<TokenPolicy>().unwrap(),
            TokenPolicy::Never
        );
        let err = "sometimes".parse::<TokenPolicy>().unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        assert_eq!(TokenPolicy::default(), TokenPolicy::Auto);
    }
}
