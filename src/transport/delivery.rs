//! How a published track carries its frames: one QUIC stream per group (`stream`), or one
//! MoQ OBJECT_DATAGRAM per frame (`datagram`, no retransmission). See docs/protocol.md §4.

/// The delivery of a local track. Remote tracks are read in whichever mode their publisher
/// chose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// One group, on a QUIC stream of its own, per frame: lost packets are retransmitted.
    #[default]
    Stream,
    /// One OBJECT_DATAGRAM per frame: a lost packet is a lost frame (FEC or concealment
    /// covers it), nothing waits for a retransmission.
    Datagram,
}

impl Delivery {
    pub const NAMES: [&'static str; 2] = ["stream", "datagram"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::Datagram => "datagram",
        }
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("delivery `{0}`: expected stream or datagram")]
pub struct DeliveryError(pub String);

impl std::str::FromStr for Delivery {
    type Err = DeliveryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "stream" => Ok(Self::Stream),
            "datagram" => Ok(Self::Datagram),
            _ => Err(DeliveryError(s.to_string())),
        }
    }
}

/// Worst-case bytes an OBJECT_DATAGRAM header adds to the payload: type (1), track alias,
/// group id and object id (8-byte varints at most) and publisher priority (1).
pub const DATAGRAM_HEADER_MAX: usize = 26;

/// The largest encoded OBJECT_DATAGRAM a call sends or a relay forwards: what one QUIC
/// datagram carries on any path, QUIC's 1200-byte minimum packet less a short header with
/// the longest connection id (1 + 20), the longest packet number (4), the AEAD tag (16), the
/// DATAGRAM frame's type and length (9) and WebTransport's session prefix (up to 8). A
/// larger path (after MTU discovery) is not used: the relay cannot learn each subscriber's
/// path (docs/protocol.md §4), and a frame the relay would drop is better not sent.
pub const MAX_DATAGRAM_OBJECT: usize = 1142;

/// The largest frame (SFrame ciphertext) a datagram track sends: [`MAX_DATAGRAM_OBJECT`]
/// less the header.
pub const MAX_DATAGRAM_PAYLOAD: usize = MAX_DATAGRAM_OBJECT - DATAGRAM_HEADER_MAX;

/// The largest frame a datagram track sends on a connection whose QUIC datagrams carry at
/// most `max_datagram_size` bytes (`None`: the peer takes no datagrams) with `prefix` bytes
/// of transport framing (WebTransport's session id) before the MoQ header.
pub fn datagram_payload_limit(max_datagram_size: Option<usize>, prefix: usize) -> usize {
    max_datagram_size
        .unwrap_or(0)
        .saturating_sub(prefix)
        .min(MAX_DATAGRAM_OBJECT)
        .saturating_sub(DATAGRAM_HEADER_MAX)
}

/// One connection's datagram room, checked per frame (QUIC's limit can change).
#[derive(Clone)]
pub(crate) struct DatagramPath {
    pub connection: quinn::Connection,
    /// Bytes of transport framing before the MoQ header (WebTransport: up to 8).
    pub prefix: usize,
}

impl DatagramPath {
    pub fn payload_limit(&self) -> usize {
        datagram_payload_limit(self.connection.max_datagram_size(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_parse_from_their_names_and_nothing_else() {
        for name in Delivery::NAMES {
            let d: Delivery = name.parse().unwrap();
            assert_eq!(d.to_string(), name);
        }
        assert_eq!(" Datagram ".parse::<Delivery>(), Ok(Delivery::Datagram));
        let err = "carrier-pigeon".parse::<Delivery>().unwrap_err();
        assert!(err.to_string().contains("carrier-pigeon"), "{err}");
        assert_eq!(Delivery::default(), Delivery::Stream);
    }

    #[test]
    fn the_payload_limit_leaves_room_for_the_header_and_stays_under_the_floor() {
        assert_eq!(
            datagram_payload_limit(Some(1000), 0),
            1000 - DATAGRAM_HEADER_MAX
        );
        assert_eq!(
            datagram_payload_limit(Some(1000), 8),
            1000 - 8 - DATAGRAM_HEADER_MAX
        );
        // A discovered path above QUIC's minimum is not used.
        assert_eq!(datagram_payload_limit(Some(1452), 0), MAX_DATAGRAM_PAYLOAD);
        // No datagrams at all, or no room: nothing fits.
        assert_eq!(datagram_payload_limit(None, 0), 0);
        assert_eq!(datagram_payload_limit(Some(10), 0), 0);
    }
}
