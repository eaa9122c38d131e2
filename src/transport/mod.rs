//! MoQ client (moq-transport draft-18): one connection to a relay, publishing the local
//! track and subscribing to peers' tracks (PROTOCOL.md §4).

mod client;
mod impair;
mod quic;
mod tls;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use moq_transport::coding::TrackNamespace;
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
pub use impair::{ImpairedPath, Impairment};
pub use quic::{IDLE_TIMEOUT, KEEP_ALIVE};
pub use tls::CertVerification;

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
    #[error("the relay refused the request: wrong or missing relay token")]
    Unauthorized,
    #[error("the relay refused the announce: {0}")]
    AnnounceRefused(String),
    #[error("relay unreachable, gave up: {0}")]
    Unreachable(String),
    #[error("the MoQ client was shut down")]
    Closed,
    #[error("track {0} was not found on the relay before the deadline")]
    NotFound(String),
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
    publisher: Publisher,
    subscriber: Subscriber,
}

/// Token type sent in SETUP's AUTHORIZATION TOKEN option. Type 0 is reserved for a type
/// agreed out of band (draft-18 §10.3.1.4): here, the call's 32 random relay-token bytes.
pub const RELAY_TOKEN_TYPE: u64 = 0;

/// Request error code a relay uses for a refused token (draft-18 UNAUTHORIZED).
pub(crate) const UNAUTHORIZED: u64 = 0x1;

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
            Session::connect_with_tokens(transport.clone(), None, dialled.kind, tokens).await?;
        Ok((
            Self {
                _endpoint: dialled.endpoint,
                connection: dialled.connection,
                transport,
                publisher,
                subscriber,
            },
            session.run(),
        ))
    }

    /// Announces `namespace` and creates `track` in it. Returns once the relay accepted
    /// the announce; the returned future serves subscribers and must be polled.
    pub async fn publish(
        &mut self,
        namespace: TrackNamespace,
        track: &str,
    ) -> Result<(TrackPublisher, impl Future<Output = ()> + Send), TransportError> {
        publish_on(&mut self.publisher, namespace, track).await
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
    namespace: TrackNamespace,
    track: &str,
) -> Result<(TrackPublisher, impl Future<Output = ()> + Send), TransportError> {
    // The request half is dropped: subscribes for other names are answered NOT_FOUND.
    let (mut writer, _request, reader) = Tracks::new(namespace.clone()).produce();
    let track_writer = writer
        .create(track)
        .ok_or_else(|| TransportError::Namespace("track set already closed".into()))?;
    let subgroups = track_writer.subgroups()?;
    let announce = publisher.publish_namespace_start(namespace).await?;
    match announce.ok().await {
        Ok(()) => {}
        Err(ServeError::Closed(UNAUTHORIZED)) => return Err(TransportError::Unauthorized),
        Err(e) => return Err(TransportError::AnnounceRefused(e.to_string())),
    }
    let serve = serve_announce(announce, reader);
    Ok((
        TrackPublisher {
            subgroups,
            _tracks: writer,
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

/// The local track: one MoQ group per media frame, one subgroup, one object.
pub struct TrackPublisher {
    subgroups: SubgroupsWriter,
    // Dropping the writer of the track set would end the announce.
    _tracks: moq_transport::serve::TracksWriter,
}

impl TrackPublisher {
    /// Sends one frame as group `seq`.
    pub fn send(&mut self, seq: u64, payload: Bytes) -> Result<(), TransportError> {
        let mut group = self.subgroups.create(Subgroup {
            group_id: seq,
            subgroup_id: 0,
            priority: AUDIO_PRIORITY,
        })?;
        group.write(payload)?;
        group.finish()?;
        Ok(())
    }
}

enum PendingMode {
    Track(moq_transport::serve::TrackReader),
    Subgroups(SubgroupsReader),
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
                PendingMode::Track(track) => match track.mode().await? {
                    TrackReaderMode::Subgroups(s) => self.reader = PendingMode::Subgroups(s),
                    _ => return Err(ServeError::Mode.into()),
                },
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
