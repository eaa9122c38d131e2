//! `call loopback`: the whole media path of one participant against itself, in real time,
//! through the same pipeline and audio clocking as a call: source → Opus → SFrame →
//! (simulated loss) → SFrame → jitter buffer → Opus → sink. With device source and sink it
//! is a microphone check clocked by the sound card; with tone/WAV it needs no sound card.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use super::timing::{ms_between, LatencySummary, Samples};
use super::CallError;
use crate::media::io::{AudioEvent, AudioIo, AudioIoReport};
use crate::media::jitter::{JitterStats, PlayoutRule};
use crate::media::keyring::{RejectCounts, SenderKeyring};
use crate::media::keys::{CallSecret, KidLayout, MediaType};
use crate::media::opus::CodecConfig;
use crate::media::pipeline::{Inbound, Outbound};
use crate::media::playout::SlotKind;
use crate::media::tone::dominant_frequency;

pub use crate::media::io::{SinkSpec, SourceSpec};

/// Decoded audio kept for the pitch analysis (it looks at the last half second).
const HEARD_SAMPLES: usize = 48_000;
/// Capture times kept for frames on their way to playout.
const MAX_IN_FLIGHT: usize = 1024;
/// Playout slots after the last frame was sent before giving up on it being played.
const DRAIN_SLOTS: u64 = 100;

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
    pub frame_ms: u32,
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
    /// First sample captured (device timestamp, or the tick) → that sample played (device
    /// timestamp, or the tick).
    pub mouth_to_ear_ms: Option<LatencySummary>,
    /// Where mouth-to-ear goes, per frame.
    pub stages_ms: LoopbackStages,
    /// How the jitter buffer kept its playout point: `slack` on a device sink, `frames`
    /// on a timer.
    pub playout_rule: PlayoutRule,
    /// How the devices were opened and behaved.
    pub audio: AudioIoReport,
}

/// The parts of each frame's mouth-to-ear, in ms (they add up to it, but for the
/// microseconds of encryption).
#[derive(Debug, Clone, Serialize)]
pub struct LoopbackStages {
    /// First sample captured → the frame handed to the encoder: the frame's own length,
    /// what the capture device and sound server hold, and our wait for the frame.
    pub capture_to_encode: Option<LatencySummary>,
    /// Arrival (here: right after encryption) → taken from the jitter buffer for playout:
    /// its slack.
    pub arrival_to_playout: Option<LatencySummary>,
    /// Taken for playout → its first sample played: our playback queue, the playback
    /// device and sound server.
    pub playout_to_play: Option<LatencySummary>,
}

pub async fn run(cfg: &LoopbackConfig) -> Result<LoopbackReport, CallError> {
    let input = cfg.source.open()?;
    let output = cfg.sink.open()?;
    let mut io = AudioIo::new(input, output, cfg.codec.frame_ms);
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let secret = CallSecret::from_bytes(secret);
    let layout = KidLayout::new(4).map_err(crate::media::sframe::FrameError::from)?;
    let keys = SenderKeyring::new(layout, MediaType::Audio, 0, 0, &secret, None)
        .map_err(crate::media::pipeline::PipelineError::from)?;
    let mut outbound = Outbound::new(cfg.codec, keys)?;
    let mut inbound = Inbound::new(cfg.codec, layout, 0)?;
    let playout_rule = io.playout_rule();
    inbound.set_playout_rule(playout_rule);
    inbound.install_epoch(0, &secret, Instant::now())?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let silence = vec![0i16; io.frame_samples()];

    let frames = cfg.seconds * 1000 / u64::from(cfg.codec.frame_ms);
    let mut captured_at: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut heard: VecDeque<i16> = VecDeque::new();
    let mut mouth_to_ear = Samples::default();
    let (mut capture_to_encode, mut arrival_to_playout, mut playout_to_play) =
        (Samples::default(), Samples::default(), Samples::default());
    let (mut lost, mut played) = (0, 0);
    let mut last_played_seq: Option<u64> = None;
    let mut slots_since_last_send = 0u64;
    let mut busy = Duration::ZERO;
    let mut sending = true;
    loop {
        match io.next().await? {
            AudioEvent::Captured(f) if sending => {
                let started = Instant::now();
                capture_to_encode.push(ms_between(f.captured_at, started));
                let frame = outbound.encode(&f.pcm)?;
                if rng.gen_bool(cfg.loss.clamp(0.0, 1.0)) {
                    lost += 1;
                } else {
                    if captured_at.len() >= MAX_IN_FLIGHT {
                        captured_at.pop_first();
                    }
                    captured_at.insert(frame.seq, f.captured_at);
                    // Refusals are counted in the inbound's rejects.
                    let _ = inbound.receive(frame.seq, &frame.payload, started);
                }
                busy += started.elapsed();
                sending = outbound.sent() < frames;
            }
            AudioEvent::Captured(_) => {}
            AudioEvent::SourceEnded => sending = false,
            AudioEvent::PlayoutDue { play_at } => {
                let started = Instant::now();
                let slot = inbound.next(started);
                let pcm = slot.as_ref().map_or(&silence[..], |s| s.pcm);
                io.play(pcm)?;
                if let Some(s) = &slot {
                    heard.extend(s.pcm.iter().copied());
                    let excess = heard.len().saturating_sub(HEARD_SAMPLES);
                    heard.drain(..excess);
                    match s.kind {
                        SlotKind::Decoded { seq } => {
                            played += 1;
                            if let Some(arrived) = s.arrived_at {
                                arrival_to_playout.push(ms_between(arrived, started));
                            }
                            playout_to_play.push(ms_between(started, play_at));
                            last_played_seq = Some(seq);
                            if let Some(at) = captured_at.remove(&seq) {
                                mouth_to_ear.push(ms_between(at, play_at));
                            }
                        }
                        SlotKind::Fec { seq } | SlotKind::Concealed { seq } => {
                            last_played_seq = Some(seq);
                        }
                        SlotKind::Stretch => {}
                    }
                }
                // The slot is done with: the stream could play sooner (a device sink).
                if let Some(by) = inbound.take_spare() {
                    io.trim(by);
                }
                busy += started.elapsed();
                if !sending {
                    slots_since_last_send += 1;
                    let sent = outbound.sent();
                    let caught_up = last_played_seq.is_some_and(|s| s + 1 >= sent);
                    if caught_up || slots_since_last_send > DRAIN_SLOTS {
                        break;
                    }
                }
            }
        }
    }
    let audio = io.finish()?;
    let heard: Vec<i16> = heard.into_iter().collect();
    Ok(LoopbackReport {
        frame_ms: cfg.codec.frame_ms,
        frames_sent: outbound.sent(),
        frames_lost: lost,
        frames_played: played,
        heard_hz: dominant_frequency(&heard, 50.0, 4000.0),
        rejects: inbound.rejects(),
        jitter: inbound.jitter(),
        pipeline_us_per_frame: busy.as_secs_f64() * 1e6 / outbound.sent().max(1) as f64,
        mouth_to_ear_ms: mouth_to_ear.summary(),
        stages_ms: LoopbackStages {
            capture_to_encode: capture_to_encode.summary(),
            arrival_to_playout: arrival_to_playout.summary(),
            playout_to_play: playout_to_play.summary(),
        },
        playout_rule,
        audio,
    })
}
