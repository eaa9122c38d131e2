//! The one media path every caller uses (`call join`, `call demo`, `call loopback`, the
//! benches and the tests): [`Outbound`] turns a frame of PCM into an SFrame-encrypted Opus
//! packet with its transport sequence; [`Inbound`] takes one remote track's packets, holds
//! those of an epoch whose key has not arrived yet, decrypts, reorders them in the jitter
//! buffer and decodes one playout slot at a time (frame, in-band FEC or concealment).
//!
//! Neither reads a clock: every call that depends on time takes `now`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use bytes::Bytes;

use super::jitter::{JitterStats, PlayoutRule};
use super::keyring::{Received, ReceiverKeyring, Reject, RejectCounts, SendError, SenderKeyring};
use super::keys::{CallSecret, KidLayout, MediaType};
use super::opus::{CodecConfig, CodecError, OpusEncoder};
use super::playout::{PlayoutDecoder, SlotKind};
use super::sframe::FrameError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("encrypting a frame: {0}")]
    Send(#[from] SendError),
    #[error("installing an epoch's keys: {0}")]
    Keys(#[from] FrameError),
}

/// One encrypted frame, ready for the transport.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// Transport sequence (MoQ group id): 0, 1, 2 … for this track.
    pub seq: u64,
    /// The SFrame ciphertext.
    pub payload: Bytes,
    /// Length of the Opus packet inside (the SFrame plaintext).
    pub plain_len: usize,
}

/// Source PCM → Opus → SFrame, one frame per call.
pub struct Outbound {
    codec: CodecConfig,
    encoder: OpusEncoder,
    keys: SenderKeyring,
    seq: u64,
    muted: bool,
    silence: Vec<i16>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("seq", &self.seq)
            .field("muted", &self.muted)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    pub fn new(codec: CodecConfig, keys: SenderKeyring) -> Result<Self, CodecError> {
        Ok(Self {
            codec,
            encoder: OpusEncoder::new(codec)?,
            keys,
            seq: 0,
            muted: false,
            silence: vec![0; codec.samples_per_frame()],
        })
    }

    pub fn codec(&self) -> CodecConfig {
        self.codec
    }

    /// Muted, silence is encoded instead of the source: the stream keeps its pace and,
    /// under enhanced privacy, its packet size.
    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    pub fn muted(&self) -> bool {
        self.muted
    }

    /// Frames encoded so far (the next frame's sequence).
    pub fn sent(&self) -> u64 {
        self.seq
    }

    pub fn epoch(&self) -> u64 {
        self.keys.epoch()
    }

    /// Switches to `epoch`'s key; call it as soon as the commit is merged.
    pub fn rekey(&mut self, epoch: u64, secret: &CallSecret) -> Result<(), SendError> {
        self.keys.rekey(epoch, secret)
    }

    /// Encodes and encrypts one frame of 48 kHz mono PCM (`samples_per_frame` long).
    pub fn encode(&mut self, pcm: &[i16]) -> Result<EncodedFrame, PipelineError> {
        let input = if self.muted { &self.silence[..] } else { pcm };
        let packet = self.encoder.encode(input)?;
        let plain_len = packet.len();
        let frame = self.keys.encrypt(packet)?;
        let seq = self.seq;
        self.seq += 1;
        Ok(EncodedFrame {
            seq,
            payload: Bytes::copy_from_slice(frame),
            plain_len,
        })
    }
}

/// What became of one arriving packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Authenticated and queued for playout; `plain_len` is the Opus packet's length.
    Frame { plain_len: usize },
    /// Authentic under another member's key: not this track's audio, dropped.
    Foreign,
    /// Waiting for the commit of a newer epoch (released by [`Inbound::install_epoch`]).
    Held,
}

/// One playout slot.
#[derive(Debug)]
pub struct Slot<'a> {
    pub kind: SlotKind,
    pub pcm: &'a [i16],
    /// When the frame this slot plays arrived (decoded frames only).
    pub arrived_at: Option<Instant>,
}

/// Distinct plaintext lengths remembered per track (enhanced privacy has exactly one).
const MAX_TRACKED_SIZES: usize = 64;
/// Arrival times kept for frames waiting in the jitter buffer; far more than it holds.
const MAX_ARRIVALS: usize = 1024;

/// One remote track: SFrame → jitter buffer → Opus, with every refusal counted.
pub struct Inbound {
    leaf_index: u32,
    keys: ReceiverKeyring,
    player: PlayoutDecoder,
    arrivals: BTreeMap<u64, Instant>,
    received: u64,
    foreign: u64,
    plain_sizes: BTreeSet<usize>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("leaf_index", &self.leaf_index)
            .field("received", &self.received)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// The track of the member at `leaf_index`; no key until [`Self::install_epoch`].
    pub fn new(codec: CodecConfig, layout: KidLayout, leaf_index: u32) -> Result<Self, CodecError> {
        Ok(Self {
            leaf_index,
            keys: ReceiverKeyring::new(layout, MediaType::Audio),
            player: PlayoutDecoder::new(codec)?,
            arrivals: BTreeMap::new(),
            received: 0,
            foreign: 0,
            plain_sizes: BTreeSet::new(),
        })
    }

    pub fn leaf_index(&self) -> u32 {
        self.leaf_index
    }

    /// Installs `epoch`'s key for this track's sender; frames held for it are decrypted and
    /// queued. Returns how many were released.
    pub fn install_epoch(
        &mut self,
        epoch: u64,
        secret: &CallSecret,
        now: Instant,
    ) -> Result<usize, FrameError> {
        let released = self
            .keys
            .install_epoch(epoch, secret, [self.leaf_index], now)?;
        let n = released.len();
        for d in released {
            // The frame waited for its key: it counts as arriving now.
            self.accept(d.seq, d.leaf_index, d.payload, now);
        }
        Ok(n)
    }

    /// One packet as it arrived with transport sequence `seq`.
    pub fn receive(&mut self, seq: u64, frame: &[u8], now: Instant) -> Result<Accepted, Reject> {
        match self.keys.decrypt_seq(seq, frame, now)? {
            Received::Frame(d) => Ok(self.accept(d.seq, d.leaf_index, d.payload, now)),
            Received::Held => Ok(Accepted::Held),
        }
    }

    fn accept(&mut self, seq: u64, leaf: u32, payload: Vec<u8>, now: Instant) -> Accepted {
        if leaf != self.leaf_index {
            self.foreign += 1;
            return Accepted::Foreign;
        }
        let plain_len = payload.len();
        self.received += 1;
        if self.plain_sizes.len() < MAX_TRACKED_SIZES {
            self.plain_sizes.insert(plain_len);
        }
        if self.arrivals.len() >= MAX_ARRIVALS {
            self.arrivals.pop_first();
        }
        self.arrivals.insert(seq, now);
        self.player.push(seq, payload, now);
        Accepted::Frame { plain_len }
    }

    /// Fills the next playout slot (call once per frame duration, when the sink wants
    /// audio); `None` while the buffer is still filling. Also retires expired keys.
    pub fn next(&mut self, now: Instant) -> Option<Slot<'_>> {
        self.keys.retire(now);
        let (kind, pcm) = self.player.next(now)?;
        let arrived_at = match kind {
            SlotKind::Decoded { seq } => {
                // Everything older was played or given up on.
                let at = self.arrivals.remove(&seq);
                while self
                    .arrivals
                    .first_key_value()
                    .is_some_and(|(s, _)| *s < seq)
                {
                    self.arrivals.pop_first();
                }
                at
            }
            _ => None,
        };
        Some(Slot {
            kind,
            pcm,
            arrived_at,
        })
    }

    /// Frames that authenticated under this track's sender key.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Authentic frames under another member's key (a track that is not its sender's).
    pub fn foreign(&self) -> u64 {
        self.foreign
    }

    pub fn rejects(&self) -> RejectCounts {
        self.keys.rejects()
    }

    pub fn jitter(&self) -> JitterStats {
        self.player.stats()
    }

    /// [`PlayoutRule::Slack`] when the sink takes a slot the moment the sound card needs
    /// it (a device sink), [`PlayoutRule::Frames`] (the default) for a timer's ticks.
    pub fn set_playout_rule(&mut self, rule: PlayoutRule) {
        self.player.set_rule(rule);
    }

    /// Once per settling window under [`PlayoutRule::Slack`]: how much sooner (less than a
    /// frame) this track could play and keep its margin; a device sink plays that much
    /// less of what it holds (see [`crate::media::jitter::JitterBuffer::take_spare`]).
    pub fn take_spare(&mut self) -> Option<std::time::Duration> {
        self.player.take_spare()
    }

    /// How many different plaintext lengths arrived (capped at 64).
    pub fn distinct_plain_sizes(&self) -> usize {
        self.plain_sizes.len()
    }

    pub fn decode_errors(&self) -> u64 {
        self.player.decode_errors()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::tone::{dominant_frequency, ToneSource};
    use std::time::Duration;

    fn pair(codec: CodecConfig) -> (Outbound, Inbound) {
        let layout = KidLayout::new(4).unwrap();
        let secret = CallSecret::from_bytes([7; 32]);
        let keys = SenderKeyring::new(layout, MediaType::Audio, 2, 1, &secret, None).unwrap();
        let out = Outbound::new(codec, keys).unwrap();
        let mut inb = Inbound::new(codec, layout, 2).unwrap();
        inb.install_epoch(1, &secret, Instant::now()).unwrap();
        (out, inb)
    }

    #[test]
    fn a_tone_goes_through_and_comes_out_at_its_pitch() {
        let codec = CodecConfig::default();
        let (mut out, mut inb) = pair(codec);
        let mut tone = ToneSource::new(440.0);
        let mut pcm = vec![0i16; codec.samples_per_frame()];
        let mut heard = Vec::new();
        let t0 = Instant::now();
        for i in 0..50u64 {
            let now = t0 + Duration::from_millis(20 * i);
            tone.fill(&mut pcm);
            let f = out.encode(&pcm).unwrap();
            assert_eq!(f.seq, i);
            assert!(matches!(
                inb.receive(f.seq, &f.payload, now),
                Ok(Accepted::Frame { .. })
            ));
            if let Some(slot) = inb.next(now) {
                if matches!(slot.kind, SlotKind::Decoded { .. }) {
                    assert!(slot.arrived_at.is_some());
                }
                heard.extend_from_slice(slot.pcm);
            }
        }
        assert_eq!(inb.received(), 50);
        let f = dominant_frequency(&heard, 100.0, 2000.0).unwrap();
        assert!((f - 440.0).abs() < 3.0, "{f}");
    }

    #[test]
    fn muted_frames_are_silence_of_the_same_pace_and_replays_are_refused() {
        let codec = CodecConfig::default();
        let (mut out, mut inb) = pair(codec);
        out.set_muted(true);
        let loud = vec![12_000i16; codec.samples_per_frame()];
        let t0 = Instant::now();
        let f = out.encode(&loud).unwrap();
        inb.receive(f.seq, &f.payload, t0).unwrap();
        assert_eq!(inb.receive(f.seq, &f.payload, t0), Err(Reject::Replay));
        assert_eq!(inb.rejects().replay, 1);
        assert_eq!(out.sent(), 1);
    }

    #[test]
    fn frames_of_a_coming_epoch_are_held_then_played_in_order() {
        let codec = CodecConfig::default();
        let layout = KidLayout::new(4).unwrap();
        let (s1, s2) = (
            CallSecret::from_bytes([1; 32]),
            CallSecret::from_bytes([2; 32]),
        );
        let keys = SenderKeyring::new(layout, MediaType::Audio, 0, 1, &s1, None).unwrap();
        let mut out = Outbound::new(codec, keys).unwrap();
        let mut inb = Inbound::new(codec, layout, 0).unwrap();
        let t0 = Instant::now();
        inb.install_epoch(1, &s1, t0).unwrap();
        let pcm = vec![0i16; codec.samples_per_frame()];
        let first = out.encode(&pcm).unwrap();
        out.rekey(2, &s2).unwrap();
        let second = out.encode(&pcm).unwrap();
        assert_eq!(
            inb.receive(second.seq, &second.payload, t0),
            Ok(Accepted::Held)
        );
        assert!(matches!(
            inb.receive(first.seq, &first.payload, t0),
            Ok(Accepted::Frame { .. })
        ));
        assert_eq!(inb.install_epoch(2, &s2, t0).unwrap(), 1);
        assert_eq!(inb.received(), 2);
        // Both frames play, in sequence order.
        let later = t0 + Duration::from_millis(100);
        let mut played = Vec::new();
        for _ in 0..6 {
            if let Some(slot) = inb.next(later) {
                if let SlotKind::Decoded { seq } = slot.kind {
                    played.push(seq);
                }
            }
        }
        assert_eq!(played, vec![0, 1]);
    }
}
