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

/// Encoder settings that travel in the call offer's `codec` tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecConfig {
    pub frame_ms: u32,
    pub bitrate: i32,
    pub fec: bool,
    /// Expected loss in percent; steers how much in-band FEC the encoder spends.
    pub loss_hint_pct: i32,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            frame_ms: 20,
            bitrate: 28_000,
            fec: true,
            loss_hint_pct: 10,
        }
    }
}

impl CodecConfig {
    pub fn samples_per_frame(&self) -> usize {
        (SAMPLE_RATE / 1000 * self.frame_ms) as usize
    }
}

/// Opus encoder for one 48 kHz mono voice track.
pub struct OpusEncoder {
    inner: opus::Encoder,
    samples: usize,
    out: Vec<u8>,
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
        Ok(Self {
            inner,
            samples: cfg.samples_per_frame(),
            out: vec![0; MAX_PACKET],
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
        let n = self.inner.encode(pcm, &mut self.out)?;
        Ok(&self.out[..n])
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

    /// Conceals one missing frame: from `next`'s in-band FEC if given, else by PLC.
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
