//! `call bench`: Media over QUIC against WebRTC on the same audio, keys and network.
//!
//! Two endpoints in one process send a tone through the pipeline `call join` runs
//! ([`crate::media::pipeline`]: Opus with in-band FEC, SFrame under a key from a real MLS
//! exporter, the adaptive jitter buffer and playout) over each transport in turn, every
//! transport behind the same seeded impairment ([`crate::transport::ImpairedPath`]); for the
//! relay the end-to-end delay, jitter and loss are split over its two legs.
//!
//! Each run gets an OS thread and a single-threaded runtime of its own, holding everything
//! the run needs (relay, clients or peers, impaired paths), so that the thread's CPU time is
//! the run's CPU time.

mod harness;
mod moq;
pub mod plot;
pub mod scenario;
mod webrtc;

use std::time::Duration;

use mdk_memory_storage::MdkMemoryStorage;
use nostr_sdk::prelude::Keys;
use rand::RngCore;
use serde::Serialize;

pub use scenario::Scenario;

use crate::call::timing::LatencySummary;
use crate::group::GroupMember;
use crate::media::opus::CodecConfig;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("setting up the MLS group for the keys: {0}")]
    Keys(String),
    #[error("setting up {0}")]
    Setup(String),
    #[error("media pipeline: {0}")]
    Media(String),
    #[error("no media: {0}")]
    NoMedia(String),
    #[error("the run's thread failed: {0}")]
    Thread(String),
}

/// How the frames travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// MoQ through call-relay, one group (QUIC stream) per frame: today's delivery.
    MoqStream,
    /// MoQ through call-relay, one OBJECT_DATAGRAM per frame (`call join --delivery
    /// datagram`): no retransmission.
    MoqDatagram,
    /// WebRTC peer to peer (str0m): ICE, DTLS-SRTP, one Opus RTP stream carrying the SFrame
    /// ciphertext, NACK off.
    Webrtc,
    /// The same with NACK and RTX retransmission (RFC 4588) on.
    WebrtcNack,
}

impl Transport {
    pub const ALL: &'static [Transport] = &[
        Transport::MoqStream,
        Transport::MoqDatagram,
        Transport::Webrtc,
        Transport::WebrtcNack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::MoqStream => "moq-stream",
            Transport::MoqDatagram => "moq-datagram",
            Transport::Webrtc => "webrtc",
            Transport::WebrtcNack => "webrtc-nack",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|t| t.as_str()).collect();
                format!("`{s}` is not one of {}", known.join(", "))
            })
    }
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub scenarios: Vec<Scenario>,
    pub transports: Vec<Transport>,
    /// Measured seconds of audio per transport and scenario.
    pub seconds: f64,
    pub frame_ms: u32,
    pub tone_hz: f64,
    pub seed: u64,
}

/// One transport in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub transport: Transport,
    pub scenario: String,
    pub frame: u32,
    /// Frames measured (sent after the first one arrived).
    pub frames: u64,
    /// Of those, how many arrived (late ones included).
    pub received: u64,
    /// Never arrived.
    pub lost: u64,
    /// Arrived after their playout slot, or dropped by the transport as too late.
    pub late: u64,
    /// Lost or late frames rebuilt from the next packet's in-band FEC.
    pub fec_recovered: u64,
    /// Frames not heard: concealed (PLC), or no slot before the end.
    pub concealed: u64,
    /// Of `concealed`, frames that arrived but were never played: the jitter buffer dropped
    /// them to shrink back to its target after a delay spike.
    pub drained: u64,
    /// `concealed` as a share of `frames`.
    pub residual_loss_pct: f64,
    pub decrypt_failed: u64,
    /// Frames the transport task could not take (its queue was full).
    pub send_dropped: u64,
    pub tone_hz: f64,
    pub heard_hz: Option<f64>,
    /// Encrypted frame handed to the transport → arrived at the receiving endpoint.
    pub network_ms: Option<LatencySummary>,
    /// Captured → played, over frames played from their own packet.
    pub mouth_to_ear_ms: Option<LatencySummary>,
    #[serde(skip)]
    pub network_samples: Vec<f64>,
    #[serde(skip)]
    pub mouth_to_ear_samples: Vec<f64>,
    /// The jitter buffer's delay target at the end.
    pub jitter_target_ms: f64,
    /// The sender's access link: bytes per second sent, every header included (IP, UDP and
    /// QUIC or SRTP), lost datagrams included.
    pub wire_up_bytes_per_s: f64,
    pub wire_up_packets_per_s: f64,
    /// What the sender receives back (acknowledgements, RTCP).
    pub wire_down_bytes_per_s: f64,
    /// CPU time of the whole run (both endpoints, and relay and paths) per measured frame.
    pub cpu_us_per_frame: f64,
    pub setup_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub seconds: f64,
    pub frame_ms: u32,
    pub seed: u64,
    /// Opus settings used by every transport.
    pub bitrate: i32,
    pub fec: bool,
    pub loss_hint_pct: i32,
    /// MLS epoch the SFrame keys were exported from.
    pub mls_epoch: u64,
    pub scenarios: Vec<Scenario>,
    pub runs: Vec<RunReport>,
}

/// The SFrame key: a one-member Marmot group (real MDK/OpenMLS state, no relay needed) and
/// its exporter secret for a fresh call id.
async fn exporter_secret() -> Result<(crate::group::CallSecretExport, [u8; 32]), BenchError> {
    let member = GroupMember::connect(Keys::generate(), MdkMemoryStorage::default(), &[])
        .await
        .map_err(|e| BenchError::Keys(e.to_string()))?;
    let group = member
        .create_group("call bench", &[])
        .await
        .map_err(|e| BenchError::Keys(e.to_string()))?;
    let mut call_id = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut call_id);
    let export = member
        .export_call_secret(&group, &call_id)
        .map_err(|e| BenchError::Keys(e.to_string()))?;
    member.disconnect().await;
    Ok((export, call_id))
}

/// Runs one transport in one scenario on a thread and runtime of its own.
async fn run_one(
    transport: Transport,
    scenario: Scenario,
    media: harness::Media,
    seed: u64,
) -> Result<RunReport, BenchError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("bench-{transport}"))
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(async {
                    let link = match transport {
                        Transport::MoqStream => moq::stream(&scenario, seed).await?,
                        Transport::MoqDatagram => moq::datagram(&scenario, seed).await?,
                        Transport::Webrtc => webrtc::peer_to_peer(&scenario, seed, &media).await?,
                        Transport::WebrtcNack => {
                            webrtc::peer_to_peer_nack(&scenario, seed, &media).await?
                        }
                    };
                    harness::run(transport, &scenario, &media, link).await
                }),
                Err(e) => Err(BenchError::Thread(e.to_string())),
            };
            let _ = tx.send(result);
        })
        .map_err(|e| BenchError::Thread(e.to_string()))?;
    rx.await
        .map_err(|_| BenchError::Thread(format!("{transport} run panicked")))?
}

pub async fn run(
    config: &BenchConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<BenchReport, BenchError> {
    let codec = CodecConfig {
        frame_ms: config.frame_ms,
        ..CodecConfig::default()
    };
    progress("exporting the SFrame key from a one-member MLS group");
    let (export, _call_id) = exporter_secret().await?;
    let frames = (config.seconds * 1000.0 / f64::from(config.frame_ms)).ceil() as u64;
    let media = harness::Media {
        codec,
        secret: export.secret.clone(),
        epoch: export.epoch,
        leaf: export.own_leaf,
        tone_hz: config.tone_hz,
        frames: frames.max(1),
    };
    let mut runs = Vec::new();
    for scenario in &config.scenarios {
        for &transport in &config.transports {
            progress(&format!("{}: {transport}", scenario.name));
            runs.push(run_one(transport, scenario.clone(), media.clone(), config.seed).await?);
        }
    }
    Ok(BenchReport {
        seconds: config.seconds,
        frame_ms: config.frame_ms,
        seed: config.seed,
        bitrate: codec.bitrate,
        fec: codec.fec,
        loss_hint_pct: codec.loss_hint_pct,
        mls_epoch: export.epoch,
        scenarios: config.scenarios.clone(),
        runs,
    })
}

/// Default measured seconds per run (keeps the default set under a minute).
pub const DEFAULT_SECONDS: f64 = 3.0;
/// Seconds a run may take at most for set-up (far paths need several round trips).
pub const SETUP_LIMIT: Duration = Duration::from_secs(20);
