//! `call loopback`: the whole media path of one participant against itself, in real time:
//! source → Opus → SFrame → (simulated loss) → SFrame → jitter buffer → Opus → sink. With
//! device source and sink it is a microphone check; with tone/WAV it needs no sound card.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use super::CallError;
use crate::media::audio::{
    AudioSink, AudioSource, DeviceCapture, DevicePlayback, NullSink, Silence, WavSink, WavSource,
};
use crate::media::jitter::JitterStats;
use crate::media::keyring::{Received, ReceiverKeyring, RejectCounts, SenderKeyring};
use crate::media::keys::{CallSecret, KidLayout, MediaType};
use crate::media::opus::{CodecConfig, OpusEncoder};
use crate::media::playout::{PlayoutDecoder, SlotKind};
use crate::media::tone::{dominant_frequency, ToneSource};

/// Where audio comes from: `tone[:HZ]`, `silence`, `wav:PATH`, `device[:NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    Tone(f64),
    Silence,
    Wav(PathBuf),
    Device(Option<String>),
}

/// Where audio goes: `null`, `wav:PATH`, `device[:NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkSpec {
    Null,
    Wav(PathBuf),
    Device(Option<String>),
}

fn split(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once(':') {
        Some((k, v)) => (k, Some(v)),
        None => (spec, None),
    }
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match split(s) {
            ("tone", None) => Ok(Self::Tone(440.0)),
            ("tone", Some(hz)) => match hz.parse::<f64>() {
                Ok(f) if (20.0..=20_000.0).contains(&f) => Ok(Self::Tone(f)),
                _ => Err(format!(
                    "tone frequency `{hz}` is not a number of Hz in 20..=20000"
                )),
            },
            ("silence", None) => Ok(Self::Silence),
            ("wav", Some(p)) if !p.is_empty() => Ok(Self::Wav(PathBuf::from(p))),
            ("device", name) => Ok(Self::Device(
                name.filter(|n| !n.is_empty()).map(str::to_string),
            )),
            _ => Err(format!(
                "`{s}`: expected tone[:HZ], silence, wav:PATH or device[:NAME]"
            )),
        }
    }
}

impl std::str::FromStr for SinkSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match split(s) {
            ("null", None) => Ok(Self::Null),
            ("wav", Some(p)) if !p.is_empty() => Ok(Self::Wav(PathBuf::from(p))),
            ("device", name) => Ok(Self::Device(
                name.filter(|n| !n.is_empty()).map(str::to_string),
            )),
            _ => Err(format!("`{s}`: expected null, wav:PATH or device[:NAME]")),
        }
    }
}

impl SourceSpec {
    pub fn open(&self) -> Result<Box<dyn AudioSource>, CallError> {
        Ok(match self {
            Self::Tone(f) => Box::new(ToneSource::new(*f)),
            Self::Silence => Box::new(Silence),
            Self::Wav(p) => Box::new(WavSource::open(p)?),
            Self::Device(name) => Box::new(DeviceCapture::open(name.as_deref())?),
        })
    }
}

impl SinkSpec {
    pub fn open(&self) -> Result<Box<dyn AudioSink>, CallError> {
        Ok(match self {
            Self::Null => Box::new(NullSink),
            Self::Wav(p) => Box::new(WavSink::create(p)?),
            Self::Device(name) => Box::new(DevicePlayback::open(name.as_deref())?),
        })
    }
}

#[derive(Debug, Clone)]
pub struct LoopbackConfig {
    pub source: SourceSpec,
    pub sink: SinkSpec,
    pub seconds: u64,
    pub codec: CodecConfig,
    /// Share of frames dropped between encryption and decryption, 0.0..1.0.
    pub loss: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoopbackReport {
    pub frames_sent: u64,
    pub frames_lost: u64,
    /// Frames decoded from their own packet (lost ones are recovered or concealed instead).
    pub frames_played: u64,
    /// Dominant frequency of what reached the sink (null for silence).
    pub heard_hz: Option<f64>,
    pub rejects: RejectCounts,
    pub jitter: JitterStats,
    /// Encode + encrypt + decrypt + decode, per frame, mean.
    pub pipeline_us_per_frame: f64,
}

pub async fn run(cfg: &LoopbackConfig) -> Result<LoopbackReport, CallError> {
    let mut source = cfg.source.open()?;
    let mut sink = cfg.sink.open()?;
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let secret = CallSecret::from_bytes(secret);
    let layout = KidLayout::new(4).map_err(crate::media::sframe::FrameError::from)?;
    let mut tx = SenderKeyring::new(layout, MediaType::Audio, 0, 0, &secret, None)
        .map_err(|e| CallError::Protocol(e.to_string()))?;
    let mut rx = ReceiverKeyring::new(layout, MediaType::Audio);
    rx.install_epoch(0, &secret, [0], Instant::now())?;
    let mut encoder = OpusEncoder::new(cfg.codec)?;
    let mut player = PlayoutDecoder::new(cfg.codec)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);

    let frames = cfg.seconds * 1000 / u64::from(cfg.codec.frame_ms);
    let mut pcm = vec![0i16; cfg.codec.samples_per_frame()];
    let mut heard = Vec::new();
    let (mut lost, mut played) = (0, 0);
    let mut last_played_seq = None;
    let mut busy = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(u64::from(cfg.codec.frame_ms)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 0;
    // Keep ticking past the last frame until the jitter buffer has played its slot (bounded,
    // in case that slot never comes).
    let limit = frames + 100;
    for _ in 0..limit {
        tick.tick().await;
        let started = Instant::now();
        if seq < frames {
            let more = source.read_frame(&mut pcm)?;
            let frame = tx
                .encrypt(encoder.encode(&pcm)?)
                .map_err(|e| CallError::Protocol(e.to_string()))?;
            if rng.gen_bool(cfg.loss.clamp(0.0, 1.0)) {
                lost += 1;
            } else if let Ok(Received::Frame(d)) = rx.decrypt(frame, started) {
                player.push(seq, d.payload, started);
            }
            seq += 1;
            if !more {
                break;
            }
        }
        if let Some((kind, out)) = player.next(started) {
            sink.write_frame(out)?;
            heard.extend_from_slice(out);
            match kind {
                SlotKind::Decoded { seq } => {
                    played += 1;
                    last_played_seq = Some(seq);
                }
                SlotKind::Fec { seq } | SlotKind::Concealed { seq } => last_played_seq = Some(seq),
                SlotKind::Stretch => {}
            }
        }
        busy += started.elapsed();
        if seq >= frames && last_played_seq.is_some_and(|s| s + 1 >= seq) {
            break;
        }
    }
    sink.finish()?;
    Ok(LoopbackReport {
        frames_sent: seq,
        frames_lost: lost,
        frames_played: played,
        heard_hz: dominant_frequency(&heard, 50.0, 4000.0),
        rejects: rx.rejects(),
        jitter: player.stats(),
        pipeline_us_per_frame: busy.as_secs_f64() * 1e6 / seq.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        assert_eq!("tone".parse(), Ok(SourceSpec::Tone(440.0)));
        assert_eq!("tone:300".parse(), Ok(SourceSpec::Tone(300.0)));
        assert_eq!("device".parse(), Ok(SourceSpec::Device(None)));
        assert_eq!(
            "device:alsa:default".parse(),
            Ok(SourceSpec::Device(Some("alsa:default".into())))
        );
        assert_eq!("wav:a.wav".parse(), Ok(SinkSpec::Wav("a.wav".into())));
        assert!("tone:loud"
            .parse::<SourceSpec>()
            .unwrap_err()
            .contains("loud"));
        assert!("wav:".parse::<SourceSpec>().is_err());
        assert!("speaker"
            .parse::<SinkSpec>()
            .unwrap_err()
            .contains("null, wav:PATH"));
    }
}
