//! The MoQ listener: QUIC handshakes and, for WebTransport, the HTTP/3 CONNECT, each bounded
//! in time and in number before a connection becomes a session of [`moq::Routes`].
//!
//! moq-native-ietf 0.11's server waits for a WebTransport CONNECT without a time limit, in a
//! queue of its own that the relay never sees: a QUIC connection with ALPN `h3` that never
//! sent CONNECT was held for as long as its peer answered keep-alives (the server sends one
//! every 4 s itself), outside `--max-sessions`, the per-address limit and the SETUP timeout.
//! So the relay accepts connections here: the QUIC handshake must finish within
//! [`HANDSHAKE_TIMEOUT`], the CONNECT within `--setup-timeout` after it (the same few seconds
//! a session then has for SETUP), and at most `--max-sessions` connections may be at those
//! stages at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moq_transport::session::transport::quinn as web_transport_quinn;
use moq_transport::session::Transport;
use web_transport_quinn::proto::ConnectResponse;

use crate::moq;
use crate::throttle::LogThrottle;

/// HTTP/3 `H3_REQUEST_INCOMPLETE` (RFC 9114 §8.1): the connection ends because no complete
/// CONNECT request arrived in time.
const H3_REQUEST_INCOMPLETE: u32 = 0x10d;
/// HTTP/3 `H3_NO_ERROR`: the CONNECT was answered (refused), nothing went wrong.
const H3_NO_ERROR: u32 = 0x100;
/// Longest QUIC handshake: the connections' idle timeout, which bounded it before. Not
/// `--setup-timeout`: on a loaded machine an honest handshake can take seconds.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused CONNECT's 406 may take to reach the peer before the connection closes.
const REJECT_FLUSH: Duration = Duration::from_millis(250);

/// Counters of the listener, since start unless said otherwise.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Connections whose QUIC handshake or WebTransport CONNECT did not finish in time.
    pub connect_timeouts: AtomicU64,
    /// Connections refused because too many were still handshaking.
    pub refused_pending: AtomicU64,
    /// Connections handshaking now.
    pub pending: AtomicU64,
}

/// The bound UDP socket and its limits.
pub(crate) struct Listener {
    endpoint: quinn::Endpoint,
    timeout: Duration,
    max_pending: u64,
    stats: Arc<Stats>,
    log: LogThrottle,
}

/// See [`Listener::closer`]. Connections still handshaking or waiting for CONNECT are in no
/// session list, and quinn keeps the socket open for as long as any connection lives, so
/// closing the sessions alone left the port taken for up to the idle timeout after a stop.
pub(crate) struct EndpointCloser(quinn::Endpoint);

impl Drop for EndpointCloser {
    fn drop(&mut self) {
        self.0
            .close(quinn::VarInt::from_u32(0), b"relay shutting down");
    }
}

/// QUIC transport settings of every connection: as moq-native-ietf's server had them (idle
/// timeout 10 s, keep-alive 4 s, BBR, fixed MTU).
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("in range"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(4)));
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t.mtu_discovery_config(None);
    t
}

impl Listener {
    /// Binds `addr` with `tls` (ALPNs are set here: `h3` for WebTransport and every MoQT
    /// version for raw QUIC).
    pub(crate) fn bind(
        addr: SocketAddr,
        mut tls: rustls::ServerConfig,
        timeout: Duration,
        max_pending: u64,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Self> {
        tls.alpn_protocols = std::iter::once(web_transport_quinn::ALPN)
            .chain(moq_transport::setup::SUPPORTED_ALPNS.iter().copied())
            .map(|a| a.as_bytes().to_vec())
            .collect();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport_config()));
        let endpoint = quinn::Endpoint::server(server, addr)?;
        Ok(Self {
            endpoint,
            timeout,
            max_pending,
            stats,
            log: LogThrottle::new(Duration::from_secs(1)),
        })
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Closes every connection of the endpoint when dropped, so that the UDP socket is freed
    /// as soon as they have drained, not when the last one times out.
    pub(crate) fn closer(&self) -> EndpointCloser {
        EndpointCloser(self.endpoint.clone())
    }

    /// Accepts connections until the endpoint closes; each that completes its handshake
    /// (and CONNECT) in time is served as a session of `routes`.
    pub(crate) async fn run(self, routes: Arc<moq::Routes>) {
        let this = Arc::new(self);
        while let Some(incoming) = this.endpoint.accept().await {
            if this.stats.pending.load(Ordering::Relaxed) >= this.max_pending {
                this.stats.refused_pending.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = this.log.allow() {
                    tracing::warn!(
                        limit = this.max_pending,
                        suppressed,
                        "connection refused: too many handshakes in progress"
                    );
                }
                incoming.refuse();
                continue;
            }
            this.stats.pending.fetch_add(1, Ordering::Relaxed);
            let (this, routes) = (this.clone(), routes.clone());
            tokio::spawn(async move {
                let established = this.establish(incoming).await;
                this.stats.pending.fetch_sub(1, Ordering::Relaxed);
                if let Some((session, kind, remote)) = established {
                    routes.session(session, kind, remote).await;
                }
            });
        }
    }

    /// The QUIC handshake and, for `h3`, the WebTransport CONNECT, each within its timeout.
    async fn establish(
        &self,
        incoming: quinn::Incoming,
    ) -> Option<(
        moq_transport::session::transport::Session,
        Transport,
        SocketAddr,
    )> {
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("QUIC connection not accepted: {e}");
                return None;
            }
        };
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!("QUIC handshake failed: {e}");
                return None;
            }
            Err(_) => {
                // Dropping the handshake abandons the connection.
                self.stats.connect_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("QUIC handshake not finished in time");
                return None;
            }
        };
        let remote = conn.remote_address();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .unwrap_or_default();
        if alpn != web_transport_quinn::ALPN.as_bytes() {
            // rustls only completes a handshake with one of our ALPNs: a MoQT version.
            let url = url::Url::parse("moqt://localhost").expect("valid url");
            let session =
                web_transport_quinn::Session::raw(conn, url.clone(), ConnectResponse::default());
            return Some((
                crate::turns::moq_session(session, url),
                Transport::RawQuic,
                remote,
            ));
        }
        let request = match tokio::time::timeout_at(
            deadline,
            web_transport_quinn::Request::accept(conn.clone()),
        )
        .await
        {
            Ok(Ok(request)) => request,
            Ok(Err(e)) => {
                tracing::debug!(%remote, "WebTransport CONNECT failed: {e}");
                return None;
            }
            Err(_) => {
                self.stats.connect_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%remote, "no WebTransport CONNECT in time: closed");
                conn.close(
                    quinn::VarInt::from_u32(H3_REQUEST_INCOMPLETE),
                    format!(
                        "no WebTransport CONNECT within {} s",
                        self.timeout.as_secs_f32()
                    )
                    .as_bytes(),
                );
                return None;
            }
        };
        let Some(version) = moq_transport::setup::negotiate_version(&request.protocols) else {
            // 406 rather than a bare close, so the peer learns why.
            tracing::debug!(%remote, "WebTransport CONNECT offers no MoQT version we speak");
            let _ = request
                .reject(web_transport_quinn::http::StatusCode::NOT_ACCEPTABLE)
                .await;
            if tokio::time::timeout(REJECT_FLUSH, conn.closed())
                .await
                .is_err()
            {
                conn.close(
                    quinn::VarInt::from_u32(H3_NO_ERROR),
                    b"no MoQT version in common",
                );
            }
            return None;
        };
        let response = ConnectResponse::OK.with_protocol(version.alpn_str().to_string());
        match tokio::time::timeout_at(deadline, request.respond(response)).await {
            Ok(Ok(session)) => {
                let url = session.request().url.clone();
                Some((
                    crate::turns::moq_session(session, url),
                    Transport::WebTransport,
                    remote,
                ))
            }
            Ok(Err(e)) => {
                tracing::debug!(%remote, "WebTransport CONNECT answer failed: {e}");
                None
            }
            Err(_) => {
                self.stats.connect_timeouts.fetch_add(1, Ordering::Relaxed);
                conn.close(
                    quinn::VarInt::from_u32(H3_REQUEST_INCOMPLETE),
                    b"WebTransport CONNECT not answered in time",
                );
                None
            }
        }
    }
}
