//! The receive side of one remote track after decryption: jitter buffer + Opus decoder,
//! producing one frame of PCM per playout slot (decoded, FEC-recovered or concealed).

use std::time::Instant;

use super::jitter::{JitterBuffer, JitterConfig, JitterStats, Playout, PlayoutRule};
use super::opus::{CodecConfig, CodecError, OpusDecoder};

/// What a playout slot was filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    Decoded { seq: u64 },
    Fec { seq: u64 },
    Concealed { seq: u64 },
    Stretch,
}

pub struct PlayoutDecoder {
    jitter: JitterBuffer,
    decoder: OpusDecoder,
    pcm: Vec<i16>,
    decode_errors: u64,
}

impl PlayoutDecoder {
    pub fn new(codec: CodecConfig) -> Result<Self, CodecError> {
        Ok(Self {
            jitter: JitterBuffer::new(JitterConfig::for_frame_ms(codec.frame_ms)),
            decoder: OpusDecoder::new(codec)?,
            pcm: Vec::with_capacity(codec.samples_per_frame()),
            decode_errors: 0,
        })
    }

    pub fn push(&mut self, seq: u64, packet: Vec<u8>, now: Instant) {
        self.jitter.push(seq, packet, now);
    }

    pub fn stats(&self) -> JitterStats {
        self.jitter.stats()
    }

    /// How the jitter buffer keeps its playout point (see [`PlayoutRule`]).
    pub fn set_rule(&mut self, rule: PlayoutRule) {
        self.jitter.set_rule(rule);
    }

    /// See [`JitterBuffer::take_spare`].
    pub fn take_spare(&mut self) -> Option<std::time::Duration> {
        self.jitter.take_spare()
    }

    /// Packets that authenticated but did not decode (concealed instead).
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors
    }

    /// Fills the next playout slot; `None` while the buffer is still filling.
    pub fn next(&mut self, now: Instant) -> Option<(SlotKind, &[i16])> {
        let kind = match self.jitter.pop(now) {
            Playout::Idle => return None,
            Playout::Frame { seq, packet } => {
                if self.decoder.decode(&packet, &mut self.pcm).is_ok() {
                    SlotKind::Decoded { seq }
                } else {
                    self.decode_errors += 1;
                    self.conceal();
                    SlotKind::Concealed { seq }
                }
            }
            Playout::Fec { seq, next_packet } => {
                if self
                    .decoder
                    .conceal(Some(&next_packet), &mut self.pcm)
                    .is_ok()
                {
                    SlotKind::Fec { seq }
                } else {
                    self.decode_errors += 1;
                    self.conceal();
                    SlotKind::Concealed { seq }
                }
            }
            Playout::Conceal { seq } => {
                self.conceal();
                SlotKind::Concealed { seq }
            }
            Playout::Stretch => {
                self.conceal();
                SlotKind::Stretch
            }
        };
        Some((kind, &self.pcm))
    }

    fn conceal(&mut self) {
        if self.decoder.conceal(None, &mut self.pcm).is_err() {
            // PLC of a fresh decoder cannot fail in libopus; keep the slot length anyway.
            let n = self.pcm.capacity();
            self.pcm.clear();
            self.pcm.resize(n, 0);
        }
    }
}
