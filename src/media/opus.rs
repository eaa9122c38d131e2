//! Opus encode/decode with the profile's settings (PROTOCOL.md §5).

pub const SAMPLE_RATE: u32 = 48_000;
/// Largest Opus packet we ever produce or accept (RFC 6716 caps a frame at 1275 bytes).
pub const MAX_PACKET: usize = 1275;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
    #[error("frame duration {0} ms is not supported (10 or 20)")]
    FrameMs(u32),
    #[error("expected {expected} samples per frame, got {got}")]
    FrameSize { expected: usize, got: usize },
}

/// Bit rate of `privacy enhanced` calls (CBR).
pub const ENHANCED_BITRATE: i32 = 32_000;

/// Encoder settings; frame duration travels in the call offer's `codec` tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecConfig {
    pub frame_ms: u32,
    pub bitrate: i32,
    pub fec: bool,
    /// Expected loss in percent; steers how much in-band FEC the encoder spends.
    pub loss_hint_pct: i32,
    /// Constant bit rate and every packet padded to [`CodecConfig::padded_size`], so
    /// packet sizes say nothing about speech (`privacy enhanced`).
    pub constant_size: bool,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            frame_ms: 20,
            bitrate: 28_000,
            fec: true,
            loss_hint_pct: 10,
            constant_size: false,
        }
    }
}

impl CodecConfig {
    /// The profile's `privacy enhanced` settings for a frame duration.
    pub fn enhanced(frame_ms: u32) -> Self {
        Self {
            frame_ms,
            bitrate: ENHANCED_BITRATE,
            constant_size: true,
            ..Self::default()
        }
    }

    pub fn samples_per_frame(&self) -> usize {
        (SAMPLE_RATE / 1000 * self.frame_ms) as usize
    }

    /// The one packet size of a constant-size stream: the CBR payload plus headroom for
    /// the TOC and padding framing.
    pub fn padded_size(&self) -> usize {
        (self.bitrate as usize * self.frame_ms as usize).div_ceil(8000) + 20
    }
}

/// Whether `packet` carries in-band FEC (LBRR) data for the frame before it: only SILK
/// and hybrid packets can; the flag is the first SILK bit after the VAD flags.
pub fn has_lbrr(packet: &[u8]) -> bool {
    let Some(&toc) = packet.first() else {
        return false;
    };
    let config = toc >> 3;
    if config >= 16 {
        return false; // CELT-only
    }
    let Ok(parsed) = opus::packet::parse(packet) else {
        return false;
    };
    let Some(first) = parsed.frames.first().and_then(|f| f.first()) else {
        return false;
    };
    let samples = opus::packet::get_samples_per_frame(packet, SAMPLE_RATE).unwrap_or(0);
    // SILK frames of 40/60 ms hold 2/3 internal 20 ms frames, each with a VAD flag first.
    let internal = (samples / 960).max(1) as u32;
    let stereo = toc & 0x04 != 0;
    let mut lbrr = (first >> (7 - internal)) & 1 == 1;
    if stereo {
        lbrr |= (first >> (6 - 2 * internal)) & 1 == 1;
    }
    lbrr
}

/// Opus encoder for one 48 kHz mono voice track.
pub struct OpusEncoder {
    inner: opus::Encoder,
    samples: usize,
    out: Vec<u8>,
    pad_to: Option<usize>,
}

impl OpusEncoder {
    pub fn new(cfg: CodecConfig) -> Result<Self, CodecError> {
        if cfg.frame_ms != 10 && cfg.frame_ms != 20 {
            return Err(CodecError::FrameMs(cfg.frame_ms));
        }
        let mut inner =
            opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        inner.set_bitrate(opus::Bitrate::Bits(cfg.bitrate))?;
        inner.set_inband_fec(cfg.fec)?;
        inner.set_packet_loss_perc(cfg.loss_hint_pct)?;
        inner.set_dtx(false)?;
        if cfg.constant_size {
            inner.set_vbr(false)?;
        }
        Ok(Self {
            inner,
            samples: cfg.samples_per_frame(),
            out: vec![0; MAX_PACKET],
            pad_to: cfg.constant_size.then(|| cfg.padded_size()),
        })
    }

    /// Encodes exactly one frame of PCM.
    pub fn encode(&mut self, pcm: &[i16]) -> Result<&[u8], CodecError> {
        if pcm.len() != self.samples {
            return Err(CodecError::FrameSize {
                expected: self.samples,
                got: pcm.len(),
            });
        }
        match self.pad_to {
            None => {
                let n = self.inner.encode(pcm, &mut self.out)?;
                Ok(&self.out[..n])
            }
            Some(size) => {
                // The encoder is bounded to `size`, then Opus' own padding fills the rest:
                // decoders drop it, and no length field of ours is needed.
                let n = self.inner.encode(pcm, &mut self.out[..size])?;
                // opus_packet_pad fills the whole buffer it is given (and returns 0).
                opus::packet::pad(&mut self.out[..size], n)?;
                Ok(&self.out[..size])
            }
        }
    }
}

/// Opus decoder for one remote track.
pub struct OpusDecoder {
    inner: opus::Decoder,
    samples: usize,
}

impl OpusDecoder {
    pub fn new(cfg: CodecConfig) -> Result<Self, CodecError> {
        Ok(Self {
            inner: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)?,
            samples: cfg.samples_per_frame(),
        })
    }

    /// Decodes one packet into `out` (resized to one frame).
    pub fn decode(&mut self, packet: &[u8], out: &mut Vec<i16>) -> Result<(), CodecError> {
        out.resize(self.samples, 0);
        let n = self.inner.decode(packet, out, false)?;
        out.truncate(n);
        Ok(())
    }

    /// Conceals one missing frame: from `next`'s in-band FEC if given (see [`has_lbrr`]),
    /// else by packet loss concealment.
    pub fn conceal(&mut self, next: Option<&[u8]>, out: &mut Vec<i16>) -> Result<(), CodecError> {
        out.resize(self.samples, 0);
        let n = match next {
            Some(p) => self.inner.decode(p, out, true)?,
            None => self.inner.decode(&[], out, false)?,
        };
        out.truncate(n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::tone::ToneSource;

    fn encode_tone(cfg: CodecConfig, frames: usize) -> Vec<Vec<u8>> {
        let mut enc = OpusEncoder::new(cfg).unwrap();
        let mut tone = ToneSource::new(440.0);
        let mut pcm = vec![0i16; cfg.samples_per_frame()];
        (0..frames)
            .map(|_| {
                tone.fill(&mut pcm);
                enc.encode(&pcm).unwrap().to_vec()
            })
            .collect()
    }

    #[test]
    fn enhanced_privacy_packets_all_have_one_size_and_decode() {
        for ms in [10, 20] {
            let cfg = CodecConfig::enhanced(ms);
            let packets = encode_tone(cfg, 50);
            assert!(
                packets.iter().all(|p| p.len() == cfg.padded_size()),
                "{ms} ms"
            );
            let mut dec = OpusDecoder::new(cfg).unwrap();
            let mut out = Vec::new();
            dec.decode(&packets[10], &mut out).unwrap();
            assert_eq!(out.len(), cfg.samples_per_frame());
        }
    }

    #[test]
    fn variable_rate_packets_vary_in_size() {
        let packets = encode_tone(CodecConfig::default(), 50);
        let sizes: std::collections::BTreeSet<usize> = packets.iter().map(Vec::len).collect();
        assert!(sizes.len() > 1, "{sizes:?}");
    }

    #[test]
    fn fec_flag_follows_the_encoder_setting() {
        let with = encode_tone(CodecConfig::default(), 50);
        let without = encode_tone(
            CodecConfig {
                fec: false,
                ..CodecConfig::default()
            },
            50,
        );
        assert!(with[5..].iter().filter(|p| has_lbrr(p)).count() > 40);
        assert_eq!(without.iter().filter(|p| has_lbrr(p)).count(), 0);
        assert!(!has_lbrr(&[]));
    }

    #[test]
    fn wrong_frame_sizes_are_errors() {
        let mut enc = OpusEncoder::new(CodecConfig::default()).unwrap();
        assert!(matches!(
            enc.encode(&[0; 100]),
            Err(CodecError::FrameSize {
                expected: 960,
                got: 100
            })
        ));
        assert!(OpusEncoder::new(CodecConfig {
            frame_ms: 15,
            ..CodecConfig::default()
        })
        .is_err());
        let mut dec = OpusDecoder::new(CodecConfig::default()).unwrap();
        let mut out = Vec::new();
        assert!(dec.decode(&[0xff, 0xff, 0xff], &mut out).is_err());
    }
}
