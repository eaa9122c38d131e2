//! The measuring loop every transport runs through: the tone is captured on the audio
//! clock, encoded and encrypted by [`Outbound`], handed to the transport, and what arrives
//! goes through [`Inbound`] (SFrame → jitter buffer → Opus, FEC, concealment) and is played
//! on the same clock — the pipeline `call join` runs, only the transport differs.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{BenchError, RunReport, Transport};
use crate::call::timing::{ms_between, LatencySummary};
use crate::media::audio::NullSink;
use crate::media::io::{AudioEvent, AudioIn, AudioIo, AudioOut};
use crate::media::keyring::SenderKeyring;
use crate::media::keys::{CallSecret, KidLayout, MediaType};
use crate::media::opus::CodecConfig;
use crate::media::pipeline::{Inbound, Outbound};
use crate::media::playout::SlotKind;
use crate::media::tone::{dominant_frequency, ToneSource};
use crate::transport::ImpairedPath;

/// Frames waiting between the harness and a transport task, each way.
pub(crate) const LINK_QUEUE: usize = 256;
/// How long the first frame may take to come through (handshakes on a far path included).
const WARMUP_LIMIT: Duration = Duration::from_secs(20);
/// IPv4 + UDP headers, added to every datagram's payload for the bytes on the wire.
const IPV4_UDP_HEADERS: u64 = 28;
const IPV6_UDP_HEADERS: u64 = 48;

/// One frame as the receiving endpoint got it.
#[derive(Debug)]
pub(crate) struct Arrival {
    pub seq: u64,
    pub payload: Bytes,
    pub at: Instant,
}

/// A running transport between the two endpoints.
pub(crate) struct Link {
    /// Encrypted frames to send (sequence, SFrame ciphertext).
    pub frames: mpsc::Sender<(u64, Bytes)>,
    pub arrivals: mpsc::Receiver<Arrival>,
    /// The sender's access path (its bytes are the bytes on the wire).
    pub sender_path: Arc<ImpairedPath>,
    /// Frames the transport itself dropped as too late to play.
    pub transport_late: Arc<AtomicU64>,
    /// Everything the link runs (relay, clients, peers); dropping it stops them.
    pub tasks: JoinSet<()>,
    /// Transport set-up (connect, handshakes, subscribe), for the report.
    pub setup: Duration,
}

/// Keys and audio settings shared by every run.
#[derive(Debug, Clone)]
pub(crate) struct Media {
    pub codec: CodecConfig,
    pub secret: CallSecret,
    pub epoch: u64,
    pub leaf: u32,
    pub tone_hz: f64,
    /// Measured frames per run.
    pub frames: u64,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Decoded(Instant),
    Fec,
    Concealed,
}

fn cpu_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

struct Snapshot {
    at: Instant,
    cpu: Duration,
    up: crate::transport::Offered,
    down: crate::transport::Offered,
}

impl Snapshot {
    fn take(path: &ImpairedPath) -> Self {
        Self {
            at: Instant::now(),
            cpu: cpu_now(),
            up: path.offered_up(),
            down: path.offered_down(),
        }
    }
}

/// Runs the measured call over `link`: warm-up until the first frame arrives, then
/// `media.frames` frames, then a drain until the last of them had its playout slot.
/// Runs on a thread of its own (its CPU time is the run's CPU time).
pub(crate) async fn run(
    transport: Transport,
    scenario: &super::Scenario,
    media: &Media,
    mut link: Link,
) -> Result<RunReport, BenchError> {
    let codec = media.codec;
    let layout = KidLayout::new(4).map_err(|e| BenchError::Media(e.to_string()))?;
    let keys = SenderKeyring::new(
        layout,
        MediaType::Audio,
        media.leaf,
        media.epoch,
        &media.secret,
        None,
    )
    .map_err(|e| BenchError::Media(e.to_string()))?;
    let mut out = Outbound::new(codec, keys).map_err(|e| BenchError::Media(e.to_string()))?;
    let mut inb =
        Inbound::new(codec, layout, media.leaf).map_err(|e| BenchError::Media(e.to_string()))?;
    inb.install_epoch(media.epoch, &media.secret, Instant::now())
        .map_err(|e| BenchError::Media(e.to_string()))?;
    let mut io = AudioIo::new(
        AudioIn::Timer(Box::new(ToneSource::new(media.tone_hz))),
        AudioOut::Timer(Box::new(NullSink)),
        codec.frame_ms,
    );
    let frame = Duration::from_millis(u64::from(codec.frame_ms));
    // Time for the last frames to arrive and play: the path, the jitter buffer's most, and
    // a margin for retransmissions.
    let drain_limit = 2 * (scenario.delay + scenario.jitter) + Duration::from_millis(1500);

    let mut sent: HashMap<u64, (Instant, Instant)> = HashMap::new();
    let mut arrived: HashMap<u64, Instant> = HashMap::new();
    let mut outcome: BTreeMap<u64, Outcome> = BTreeMap::new();
    let mut window: Option<(u64, u64)> = None;
    let mut sending = true;
    let mut late = 0u64;
    let mut send_dropped = 0u64;
    let mut heard: Vec<i16> = Vec::new();
    let started = Instant::now();
    let mut start_snap: Option<Snapshot> = None;
    let mut end_snap: Option<Snapshot> = None;
    let mut drain_until: Option<Instant> = None;

    loop {
        if let Some(d) = drain_until {
            let (_, until) = window.expect("draining after the window is set");
            let done = outcome.keys().next_back().is_some_and(|&s| s + 1 >= until);
            if done || Instant::now() >= d {
                break;
            }
        } else if window.is_none() && started.elapsed() > WARMUP_LIMIT {
            return Err(BenchError::NoMedia(format!(
                "{transport}: no frame arrived within {WARMUP_LIMIT:?}"
            )));
        }
        tokio::select! {
            ev = io.next() => match ev.map_err(|e| BenchError::Media(e.to_string()))? {
                AudioEvent::Captured(f) if sending => {
                    let encoded = out.encode(&f.pcm).map_err(|e| BenchError::Media(e.to_string()))?;
                    let now = Instant::now();
                    if sent.len() < 1_000_000 {
                        sent.insert(encoded.seq, (f.captured_at, now));
                    }
                    if link.frames.try_send((encoded.seq, encoded.payload)).is_err() {
                        send_dropped += 1;
                    }
                    if let Some((_, until)) = window {
                        if out.sent() >= until {
                            sending = false;
                            end_snap = Some(Snapshot::take(&link.sender_path));
                            drain_until = Some(Instant::now() + drain_limit);
                        }
                    }
                }
                AudioEvent::Captured(_) | AudioEvent::SourceEnded => {}
                AudioEvent::PlayoutDue { play_at } => {
                    if let Some(slot) = inb.next(Instant::now()) {
                        let in_window =
                            |s: u64| window.is_some_and(|(from, until)| s >= from && s < until);
                        match slot.kind {
                            SlotKind::Decoded { seq } => {
                                outcome.insert(seq, Outcome::Decoded(play_at));
                                if in_window(seq) {
                                    heard.extend_from_slice(slot.pcm);
                                }
                            }
                            SlotKind::Fec { seq } => {
                                outcome.insert(seq, Outcome::Fec);
                                if in_window(seq) {
                                    heard.extend_from_slice(slot.pcm);
                                }
                            }
                            SlotKind::Concealed { seq } => {
                                outcome.insert(seq, Outcome::Concealed);
                            }
                            SlotKind::Stretch => {}
                        }
                        io.play(slot.pcm).map_err(|e| BenchError::Media(e.to_string()))?;
                    }
                }
            },
            a = link.arrivals.recv() => {
                let Some(a) = a else {
                    return Err(BenchError::NoMedia(format!("{transport}: the link closed")));
                };
                if outcome.contains_key(&a.seq) {
                    late += 1;
                }
                arrived.entry(a.seq).or_insert(a.at);
                // Refusals are counted by the inbound (and reported).
                let _ = inb.receive(a.seq, &a.payload, a.at);
                if window.is_none() {
                    let from = out.sent();
                    window = Some((from, from + media.frames));
                    start_snap = Some(Snapshot::take(&link.sender_path));
                }
            }
        }
    }
    let (from, until) = window.expect("the loop ends only after the window is set");
    let start = start_snap.expect("taken with the window");
    let end = end_snap.unwrap_or_else(|| Snapshot::take(&link.sender_path));
    let frames = until - from;
    let in_window = |s: &u64| (from..until).contains(s);
    let mut network = Vec::new();
    let mut m2e = Vec::new();
    let (mut fec, mut concealed, mut received, mut drained) = (0u64, 0u64, 0u64, 0u64);
    for seq in from..until {
        let Some(&(captured, sent_at)) = sent.get(&seq) else {
            continue;
        };
        if let Some(&at) = arrived.get(&seq) {
            received += 1;
            network.push(ms_between(sent_at, at));
        }
        match outcome.get(&seq) {
            Some(Outcome::Decoded(played)) => m2e.push(ms_between(captured, *played)),
            Some(Outcome::Fec) => fec += 1,
            Some(Outcome::Concealed) => concealed += 1,
            // Never given a slot: dropped unplayed by the jitter buffer (it arrived in
            // time but the buffer shrank to its target), or nothing came before the end.
            None => {
                concealed += 1;
                if arrived.contains_key(&seq) {
                    drained += 1;
                }
            }
        }
    }
    let late_in_window = late.min(arrived.keys().filter(|s| in_window(s)).count() as u64);
    let secs = (end.at - start.at).as_secs_f64().max(1e-3);
    let headers = if link.sender_path.addr().is_ipv4() {
        IPV4_UDP_HEADERS
    } else {
        IPV6_UDP_HEADERS
    };
    let wire = |a: crate::transport::Offered, b: crate::transport::Offered| {
        let datagrams = a.datagrams.saturating_sub(b.datagrams);
        let bytes = a.bytes.saturating_sub(b.bytes) + datagrams * headers;
        (bytes as f64 / secs, datagrams as f64 / secs)
    };
    let (up_bps, up_pps) = wire(end.up, start.up);
    let (down_bps, _) = wire(end.down, start.down);
    let cpu = end.cpu.saturating_sub(start.cpu);
    let heard_hz = dominant_frequency(&heard, 100.0, 2000.0);
    let jitter = inb.jitter();
    let rejects = inb.rejects().total();
    link.tasks.shutdown().await;
    Ok(RunReport {
        transport,
        scenario: scenario.name.clone(),
        frames,
        received,
        lost: frames - received,
        late: late_in_window + link.transport_late.load(Ordering::Relaxed),
        fec_recovered: fec,
        concealed,
        drained,
        residual_loss_pct: 100.0 * concealed as f64 / frames.max(1) as f64,
        decrypt_failed: rejects,
        send_dropped,
        tone_hz: media.tone_hz,
        heard_hz,
        network_ms: LatencySummary::of(&network),
        mouth_to_ear_ms: LatencySummary::of(&m2e),
        network_samples: network,
        mouth_to_ear_samples: m2e,
        jitter_target_ms: jitter.target_delay_ms,
        wire_up_bytes_per_s: up_bps,
        wire_up_packets_per_s: up_pps,
        wire_down_bytes_per_s: down_bps,
        cpu_us_per_frame: cpu.as_secs_f64() * 1e6 / frames.max(1) as f64,
        setup_ms: link.setup.as_secs_f64() * 1e3,
        frame: frame.as_millis() as u32,
    })
}
