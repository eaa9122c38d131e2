//! SFrame (RFC 9605) frame protection with the profile's KIDs: one [`SenderKeys`] per local
//! track, one [`ReceiverKeys`] per call holding every remote sender's keys.

use std::collections::HashMap;

use sframe::{
    frame::{EncryptedFrameView, MediaFrameView, SingleUseCounter},
    header::SframeHeader,
    key::{DecryptionKey, EncryptionKey},
    CipherSuite,
};

use super::keys::{BaseKey, CallSecret, KeyError, KidLayout, MediaType};

pub const CIPHER_SUITE: CipherSuite = CipherSuite::AesGcm128Sha256;
/// Frames larger than this are refused before any work is done on them.
pub const MAX_FRAME_BYTES: usize = 16 * 1024;
/// Receivers accept a counter at most this far behind the newest one seen.
pub const REPLAY_WINDOW: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    Oversize(usize),
    #[error("malformed SFrame header")]
    MalformedHeader,
    #[error("no key for KID {0}")]
    UnknownKid(u64),
    #[error("authentication failed")]
    AuthFailed,
    #[error("replayed or too old: KID {kid} CTR {ctr}")]
    Replay { kid: u64, ctr: u64 },
    #[error("counter exhausted for this key")]
    CounterExhausted,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("sframe: {0}")]
    Sframe(String),
}

impl FrameError {
    /// A short stable name for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Oversize(_) => "oversize",
            Self::MalformedHeader => "malformed_header",
            Self::UnknownKid(_) => "unknown_kid",
            Self::AuthFailed => "auth_failed",
            Self::Replay { .. } => "replay",
            Self::CounterExhausted => "counter_exhausted",
            Self::Key(_) => "key",
            Self::Sframe(_) => "other",
        }
    }
}

/// The local sender's key for one media type in the current epoch, and its frame counter.
pub struct SenderKeys {
    key: EncryptionKey,
    kid: u64,
    next_ctr: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for SenderKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKeys")
            .field("kid", &self.kid)
            .field("next_ctr", &self.next_ctr)
            .finish_non_exhaustive()
    }
}

impl SenderKeys {
    /// Keys for `leaf_index` sending `media` in `epoch`, starting at counter `first_ctr`
    /// (callers resuming a call in the same epoch pass their persisted high-water mark).
    pub fn new(
        secret: &CallSecret,
        layout: KidLayout,
        media: MediaType,
        leaf_index: u32,
        epoch: u64,
        first_ctr: u64,
    ) -> Result<Self, FrameError> {
        let kid = layout.kid(media, leaf_index, epoch)?;
        Self::with_base_key(&secret.base_key(media, leaf_index), kid, first_ctr)
    }

    /// Keys straight from a base key and KID (vectors, and callers with their own schedule).
    pub fn with_base_key(base: &BaseKey, kid: u64, first_ctr: u64) -> Result<Self, FrameError> {
        let key = EncryptionKey::derive_from(CIPHER_SUITE, kid, base.as_bytes())
            .map_err(|e| FrameError::Sframe(e.to_string()))?;
        Ok(Self {
            key,
            kid,
            next_ctr: first_ctr,
            buf: Vec::with_capacity(256),
        })
    }

    pub fn kid(&self) -> u64 {
        self.kid
    }

    /// The counter the next frame will carry.
    pub fn next_ctr(&self) -> u64 {
        self.next_ctr
    }

    /// Encrypts one media frame; the result is header || ciphertext || tag.
    pub fn encrypt(&mut self, payload: &[u8]) -> Result<&[u8], FrameError> {
        let ctr = self.next_ctr;
        self.next_ctr = ctr.checked_add(1).ok_or(FrameError::CounterExhausted)?;
        let mut counter = SingleUseCounter::new(ctr);
        let frame = MediaFrameView::try_new(&mut counter, payload)
            .map_err(|e| FrameError::Sframe(e.to_string()))?;
        let out = frame
            .encrypt_into(&self.key, &mut self.buf)
            .map_err(|e| FrameError::Sframe(e.to_string()))?;
        Ok(out.sframe_cipher_text())
    }
}

/// Sliding replay window over one key's counters.
#[derive(Debug, Default, Clone)]
struct ReplayWindow {
    highest: Option<u64>,
    /// Bit i set = counter `highest - i` was seen.
    seen: u128,
}

impl ReplayWindow {
    fn check(&self, ctr: u64) -> bool {
        match self.highest {
            None => true,
            Some(h) if ctr > h => true,
            Some(h) => {
                let back = h - ctr;
                back < REPLAY_WINDOW && self.seen & (1u128 << back) == 0
            }
        }
    }

    fn record(&mut self, ctr: u64) {
        match self.highest {
            Some(h) if ctr <= h => self.seen |= 1u128 << (h - ctr),
            Some(h) => {
                let shift = ctr - h;
                self.seen = if shift >= 128 { 0 } else { self.seen << shift };
                self.seen |= 1;
                self.highest = Some(ctr);
            }
            None => {
                self.seen = 1;
                self.highest = Some(ctr);
            }
        }
    }
}

struct RemoteKey {
    key: DecryptionKey,
    window: ReplayWindow,
}

/// A decrypted frame and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub kid: u64,
    pub ctr: u64,
}

/// Every remote sender's decryption keys for one call, by KID.
pub struct ReceiverKeys {
    keys: HashMap<u64, RemoteKey>,
    buf: Vec<u8>,
}

impl Default for ReceiverKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReceiverKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<_> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("ReceiverKeys").field("kids", &kids).finish()
    }
}

impl ReceiverKeys {
    pub fn new() -> Self {
        Self {
            keys: HashMap::new(),
            buf: Vec::with_capacity(256),
        }
    }

    /// Installs the key of sender `leaf_index` for `media` in `epoch`.
    pub fn add_sender(
        &mut self,
        secret: &CallSecret,
        layout: KidLayout,
        media: MediaType,
        leaf_index: u32,
        epoch: u64,
    ) -> Result<u64, FrameError> {
        let kid = layout.kid(media, leaf_index, epoch)?;
        self.add_key(&secret.base_key(media, leaf_index), kid)?;
        Ok(kid)
    }

    /// Installs a key straight from a base key and KID.
    pub fn add_key(&mut self, base: &BaseKey, kid: u64) -> Result<(), FrameError> {
        let key = DecryptionKey::derive_from(CIPHER_SUITE, kid, base.as_bytes())
            .map_err(|e| FrameError::Sframe(e.to_string()))?;
        self.keys.insert(
            kid,
            RemoteKey {
                key,
                window: ReplayWindow::default(),
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, kid: u64) {
        self.keys.remove(&kid);
    }

    /// Authenticates and decrypts one frame; a frame is only recorded as seen once it
    /// authenticated, so a forged copy cannot block the real one.
    pub fn decrypt(&mut self, frame: &[u8]) -> Result<(FrameInfo, &[u8]), FrameError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(FrameError::Oversize(frame.len()));
        }
        let header = SframeHeader::deserialize(frame).map_err(|_| FrameError::MalformedHeader)?;
        let (kid, ctr) = (header.key_id(), header.counter());
        let remote = self.keys.get_mut(&kid).ok_or(FrameError::UnknownKid(kid))?;
        if !remote.window.check(ctr) {
            return Err(FrameError::Replay { kid, ctr });
        }
        let view = EncryptedFrameView::try_new(frame).map_err(|_| FrameError::MalformedHeader)?;
        let plain = view
            .decrypt_into(&remote.key, &mut self.buf)
            .map_err(|_| FrameError::AuthFailed)?;
        remote.window.record(ctr);
        Ok((FrameInfo { kid, ctr }, plain.payload()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SenderKeys, ReceiverKeys) {
        let secret = CallSecret::from_bytes([7; 32]);
        let layout = KidLayout::new(4).unwrap();
        let tx = SenderKeys::new(&secret, layout, MediaType::Audio, 2, 1, 0).unwrap();
        let mut rx = ReceiverKeys::new();
        rx.add_sender(&secret, layout, MediaType::Audio, 2, 1)
            .unwrap();
        (tx, rx)
    }

    #[test]
    fn round_trip_and_replay_rejected() {
        let (mut tx, mut rx) = pair();
        let f0 = tx.encrypt(b"frame zero").unwrap().to_vec();
        let f1 = tx.encrypt(b"frame one").unwrap().to_vec();
        assert_eq!(rx.decrypt(&f1).unwrap().1, b"frame one");
        assert_eq!(rx.decrypt(&f0).unwrap().1, b"frame zero");
        assert!(matches!(rx.decrypt(&f0), Err(FrameError::Replay { .. })));
    }

    #[test]
    fn tampering_and_garbage_are_rejected_by_reason() {
        let (mut tx, mut rx) = pair();
        let mut f = tx.encrypt(b"hello").unwrap().to_vec();
        let last = f.len() - 1;
        f[last] ^= 1;
        assert_eq!(rx.decrypt(&f).unwrap_err().reason(), "auth_failed");
        f[last] ^= 1;
        // The tampered copy was not recorded, so the genuine frame still decrypts.
        assert!(rx.decrypt(&f).is_ok());
        assert_eq!(rx.decrypt(&[]).unwrap_err().reason(), "malformed_header");
        assert_eq!(
            rx.decrypt(&[0x80]).unwrap_err().reason(),
            "malformed_header"
        );
        assert_eq!(
            rx.decrypt(&vec![0; MAX_FRAME_BYTES + 1])
                .unwrap_err()
                .reason(),
            "oversize"
        );
        let mut forged = f.clone();
        forged[1] ^= 0x01; // another KID
        assert_eq!(rx.decrypt(&forged).unwrap_err().reason(), "unknown_kid");
    }

    #[test]
    fn window_drops_frames_older_than_128() {
        let mut w = ReplayWindow::default();
        w.record(1000);
        assert!(w.check(1000 - 127));
        assert!(!w.check(1000 - 128));
        assert!(!w.check(1000));
        w.record(1000 + 300);
        assert!(w.check(1000 + 299));
        assert!(!w.check(1000));
    }
}
