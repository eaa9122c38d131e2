//! What a MoQ session runs on, shared by the relay and `call`'s client: both receive
//! OBJECT_DATAGRAMs through moq-transport, which loses bunched ones unless it is handed one
//! per scheduler turn (see [`OneDatagramPerTurn`]).

use moq_transport::reexports::web_transport_trait;
use moq_transport::session::transport::{quinn, Session};

/// A MoQ transport session over `session` whose datagrams reach their tracks one per turn.
pub fn moq_session(session: quinn::Session, url: url::Url) -> Session {
    Session::new(OneDatagramPerTurn(session), url)
}

/// The session MoQ runs on, handing its receive loop one datagram per scheduler turn.
///
/// moq-transport 0.17 keeps only the newest datagram of a track until its reader takes it,
/// and its receive loop does not yield between datagrams QUIC already holds: two datagrams
/// of one track that arrive together (jitter bunches packets) were written one over the
/// other before the reader ran, and the first was lost. Yielding before handing over a
/// datagram that was already waiting lets the woken reader take the previous one first
/// (`call`'s docs/protocol.md §4, Datagram delivery). Only then: a yield per idle wait
/// slowed the session's stream handling.
#[derive(Clone)]
pub struct OneDatagramPerTurn(quinn::Session);

impl web_transport_trait::Session for OneDatagramPerTurn {
    type SendStream = quinn::SendStream;
    type RecvStream = quinn::RecvStream;
    type Error = quinn::SessionError;

    async fn accept_uni(&self) -> Result<Self::RecvStream, Self::Error> {
        self.0.accept_uni().await
    }

    async fn accept_bi(&self) -> Result<(Self::SendStream, Self::RecvStream), Self::Error> {
        self.0.accept_bi().await
    }

    async fn open_bi(&self) -> Result<(Self::SendStream, Self::RecvStream), Self::Error> {
        self.0.open_bi().await
    }

    async fn open_uni(&self) -> Result<Self::SendStream, Self::Error> {
        self.0.open_uni().await
    }

    fn send_datagram(&self, payload: bytes::Bytes) -> Result<(), Self::Error> {
        self.0.send_datagram(payload)
    }

    async fn recv_datagram(&self) -> Result<bytes::Bytes, Self::Error> {
        let mut read = std::pin::pin!(self.0.read_datagram());
        match futures::poll!(&mut read) {
            // QUIC already held it: the previous one may still be in its track's cell.
            std::task::Poll::Ready(datagram) => {
                // Two turns: the track's reader may forward it on (the relay copies it
                // into each subscriber's cell, whose sender then needs its own turn).
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
                datagram
            }
            // It comes later, after this task slept and its readers ran.
            std::task::Poll::Pending => read.await,
        }
    }

    fn max_datagram_size(&self) -> usize {
        // web-transport-quinn panics when the relay takes no datagrams: say 0 instead, and
        // leave room for WebTransport's session prefix (up to 8 bytes) either way.
        ::quinn::Connection::max_datagram_size(&self.0).map_or(0, |m| m.saturating_sub(8))
    }

    fn protocol(&self) -> Option<&str> {
        web_transport_trait::Session::protocol(&self.0)
    }

    fn close(&self, code: u32, reason: &str) {
        self.0.close(code, reason.as_bytes());
    }

    async fn closed(&self) -> Self::Error {
        self.0.closed().await
    }
}
