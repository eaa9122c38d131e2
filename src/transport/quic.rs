//! Dialling the relay: the QUIC connection is built here rather than by moq-native so the
//! client keeps a handle on it (smoothed RTT for the track stats) and chooses its own
//! keep-alive and idle timeout (a relay that vanishes is noticed in seconds, not ten).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use moq_transport::session::transport as wt;
use moq_transport::session::Transport;
use url::Url;

use super::tls::CertVerdict;
use super::{CertVerification, TransportError};

/// A keep-alive every this long keeps an idle call's connection measurable and alive.
pub const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// No packet from the relay for this long ends the connection (the client then
/// reconnects). Six keep-alive intervals: a few lost packets do not end a call.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// An established QUIC connection carrying a MoQ session.
pub(crate) struct Dialled {
    /// Kept so the endpoint (and its socket) lives as long as the connection.
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub session: wt::Session,
    pub kind: Transport,
}

fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("3 s fits a QUIC varint"),
    ));
    transport
}

/// Resolves `url`'s host, preferring IPv4 on dual-stack names (the socket is bound to the
/// family of the address chosen).
async fn resolve(url: &Url, host: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{url}: {host} has no address"))
}

/// Connects to a `moqt://` (raw QUIC, ALPN `moqt-18`) or `https://` (WebTransport over
/// HTTP/3) relay URL and opens the transport session MoQ runs on.
pub(crate) async fn dial(url: &Url, verify: &CertVerification) -> Result<Dialled, TransportError> {
    let connect_err = |reason: String| TransportError::Connect {
        url: url.clone(),
        reason,
    };
    let (alpn, kind) = match url.scheme() {
        "moqt" => (
            moq_transport::setup::DraftVersion::Draft18
                .alpn_bytes()
                .to_vec(),
            Transport::RawQuic,
        ),
        "https" => (wt::quinn::ALPN.as_bytes().to_vec(), Transport::WebTransport),
        _ => return Err(TransportError::Scheme(url.clone())),
    };
    // `host_str` keeps IPv6 brackets; rustls and the parser want the bare address.
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(connect_err("the URL has no host".into())),
    };
    let addr = resolve(url, &host, url.port().unwrap_or(443))
        .await
        .map_err(connect_err)?;

    let verdict = CertVerdict::default();
    let mut tls = verify
        .reporting_config(&verdict)
        .map_err(TransportError::Tls)?;
    tls.alpn_protocols = vec![alpn];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));

    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
    let connection = endpoint
        .connect_with(config, addr, &host)
        .map_err(|e| connect_err(e.to_string()))?
        .await
        // A refused certificate says so, rather than as a failed handshake.
        .map_err(
            |e| match verdict.lock().expect("certificate verdict lock").take() {
                Some(problem) => TransportError::Certificate {
                    url: url.clone(),
                    problem: Box::new(problem),
                },
                None => connect_err(e.to_string()),
            },
        )?;

    let session = match kind {
        Transport::RawQuic => wt::quinn::Session::raw(
            connection.clone(),
            url.clone(),
            wt::quinn::proto::ConnectResponse::default(),
        ),
        Transport::WebTransport => {
            // Offer every MoQ version moq-transport speaks; the relay picks.
            let mut request = wt::quinn::proto::ConnectRequest::new(url.clone());
            for alpn in moq_transport::setup::SUPPORTED_ALPNS {
                request = request.with_protocol(alpn.to_string());
            }
            wt::quinn::Session::connect(connection.clone(), request)
                .await
                .map_err(|e| connect_err(format!("WebTransport CONNECT: {e}")))?
        }
    };
    let url = session.request().url.clone();
    Ok(Dialled {
        endpoint,
        connection,
        session: call_relay::turns::moq_session(session, url),
        kind,
    })
}
