//! The call engine: everything a participant decides during a call, as a sans-IO state
//! machine in the style of str0m and quinn-proto. It takes inputs with the time they
//! happen at ([`CallEngine::handle`]: captured audio, a received frame, a rumor, an epoch
//! change, a user command, a timeout) and gives outputs ([`CallEngine::poll_output`]: a
//! frame to publish, a track to subscribe to or drop, a rumor to send, PCM to play, an
//! event to show, the end of the call with its reason) and the next time it wants to be
//! woken ([`CallEngine::poll_timeout`]). It never reads a clock and does no I/O: the
//! driver in [`super::session`] does that for `call join` and `call demo`, and tests drive
//! several engines on a simulated clock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use nostr_sdk::prelude::{EventBuilder, Kind, PublicKey, Tags, ToBech32};
use serde::Serialize;

use super::signaling::{
    AnswerStatus, CallAnswer, CallOffer, CallState, Privacy, StateAction, TrackRef, KIND_ANSWER,
    KIND_OFFER, KIND_STATE,
};
use super::timing::{ms, ms_between, FrameRecords, LatencySummary, Samples};
use crate::media::io::AudioIoReport;
use crate::media::jitter::{JitterStats, PlayoutRule};
use crate::media::keyring::{CounterStore, RejectCounts, SenderKeyring};
use crate::media::keys::{CallSecret, KidLayout, MediaType};
use crate::media::opus::CodecConfig;
use crate::media::pipeline::{Accepted, EncodedFrame, Inbound, Outbound, PipelineError};
use crate::media::playout::SlotKind;
use crate::media::tone::dominant_frequency;

/// Status events while the call runs (line mode; the live screen asks for them faster).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// Loss rates are measured over windows at least this long, so a fast status does not
/// turn one concealed frame into a 10 % spike.
const LOSS_WINDOW: Duration = Duration::from_secs(2);
/// A participant whose loudest frame since the last status has an RMS at or above this
/// (linear, full scale = 1; about −40 dBFS) is shown as speaking.
pub const SPEAKING_LEVEL: f32 = 0.01;
/// Without an RTT from the transport for this long the relay is shown as lost rather
/// than reconnecting.
pub const RELAY_LOST_AFTER: Duration = Duration::from_secs(10);
/// A participant whose track delivered nothing for this long is shown as lost (muted
/// participants keep sending silence, so silence on the wire means trouble).
pub const LOST_AFTER: Duration = Duration::from_secs(3);
/// A participant lost for this long is dropped from the call (`peer_left`, `lost`).
pub const DROP_AFTER: Duration = Duration::from_secs(10);
/// Per-peer audio kept for the `heard_hz` analysis (it looks at the last half second).
const ANALYSIS_SAMPLES: usize = 48_000;
/// A stretch of consecutive decoded frames shorter than this is not analysed if a longer
/// earlier one exists (a few frames' worth of tone pin the pitch well enough).
const MIN_ANALYSIS_RUN: usize = 12_000;
/// Frames whose peak is below this are silence (a muted peer) and not analysed.
const SILENCE_PEAK: u16 = 64;
/// The mixer passes samples below this unchanged and bends louder ones smoothly toward
/// full scale, so two loud peers do not hard-clip.
const LIMITER_KNEE: f64 = 24_576.0;

/// Why a call ended for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The user (or a signal, or the caller dropping the command channel) left.
    Stopped,
    /// The requested duration passed.
    Duration,
    /// The audio source ended (a WAV file).
    SourceEnded,
    /// Nobody answered a call we started within the ring timeout.
    NoAnswer,
    /// A participant ended the call for everyone (454 `end`).
    EndedByPeer,
    /// We are no longer a member of the group.
    RemovedFromGroup,
    /// Everyone else left (or was dropped as lost) and
    /// [`EngineConfig::leave_when_alone`] asked us to leave then (`call listen --answer`).
    Alone,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Duration => "duration",
            Self::SourceEnded => "source_ended",
            Self::NoAnswer => "no_answer",
            Self::EndedByPeer => "ended_by_peer",
            Self::RemovedFromGroup => "removed_from_group",
            Self::Alone => "alone",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the person (or script) in the call asks for while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserCommand {
    /// Send silence instead of the source (the stream keeps its pace) and tell the others.
    Mute(bool),
    /// Leave the call.
    Leave,
}

/// Something the caller may want to show while the call runs.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CallEvent {
    Started {
        call_id: String,
    },
    Joined {
        call_id: String,
        participants: usize,
    },
    PeerJoined {
        npub: String,
        leaf: u32,
    },
    PeerLeft {
        npub: String,
        why: String,
    },
    /// Nothing arrived from a participant for [`LOST_AFTER`].
    PeerLost {
        npub: String,
    },
    /// A lost participant's frames arrive again.
    PeerBack {
        npub: String,
    },
    /// A member said no (`decline` or `busy`).
    PeerDeclined {
        npub: String,
        status: String,
        reason: Option<String>,
    },
    /// A participant muted or unmuted (454 `mute_audio` / `unmute_audio`).
    PeerMuted {
        npub: String,
        muted: bool,
    },
    /// We muted or unmuted.
    Muted {
        muted: bool,
    },
    /// A commit was merged: every key of the call was replaced.
    Rekeyed {
        epoch: u64,
    },
    Status(CallStatus),
}

#[derive(Debug, Clone, Serialize)]
pub struct CallStatus {
    pub seconds: f64,
    pub epoch: u64,
    pub sent: u64,
    pub muted: bool,
    /// RMS (linear, full scale = 1) of our loudest captured frame since the last status;
    /// 0 while muted.
    pub level: f32,
    pub relay: RelayState,
    pub relay_rtt_ms: Option<f64>,
    pub peers: Vec<PeerReport>,
    /// The group's events so far (set by the driver; the engine sees only rumors).
    pub group_events: GroupEventCounts,
}

/// The group's kind-445 events a session took in, from its catch-up at the start on:
/// processed, or refused by reason (the counters of `call sync`'s `dropped`). Refused
/// events are also logged; these are for scripts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GroupEventCounts {
    /// Processed: a message, commit or proposal.
    pub processed: usize,
    pub dropped: crate::group::Dropped,
}

/// The MoQ relay as the transport's round-trip time shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    /// No connection yet.
    Connecting,
    Connected,
    /// The connection dropped; the transport is reconnecting.
    Reconnecting,
    /// No connection for [`RELAY_LOST_AFTER`] (the transport keeps trying).
    Lost,
}

impl RelayState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Reconnecting => "reconnecting",
            Self::Lost => "lost",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    pub npub: String,
    pub leaf: u32,
    pub track: String,
    /// Frames that authenticated.
    pub received: u64,
    pub rejects: RejectCounts,
    pub jitter: JitterStats,
    /// Different Opus packet lengths received (1 under `privacy enhanced`).
    pub distinct_payload_sizes: usize,
    /// Dominant frequency of the last audible half second heard from this peer (tone tests).
    pub heard_hz: Option<f64>,
    /// Arrival of a frame → the moment its first sample is played (jitter buffer, mixing,
    /// and the sound card's queue when playing to a device).
    pub receive_to_play_ms: Option<LatencySummary>,
    /// Capture → playout. Within one process (`call demo`) it is measured frame by frame;
    /// across machines it is estimated: our capture → send, plus the relay round trip (two
    /// legs of half a round trip each), plus the measured receive → play.
    pub mouth_to_ear_ms: Option<LatencySummary>,
    /// Still in the call when it ended for us.
    pub present: bool,
    /// Nothing has arrived from this participant for a while ([`LOST_AFTER`]).
    pub lost: bool,
    /// The participant said it muted (454 `mute_audio`).
    pub muted: bool,
    /// RMS (linear, full scale = 1) of the loudest frame played from this participant
    /// since the last status (the final report: 0).
    pub level: f32,
    /// `level` is at least [`SPEAKING_LEVEL`].
    pub speaking: bool,
    /// Slots that had to be concealed or rebuilt from FEC, in percent of those played,
    /// over the last complete window of at least two seconds (the final report: the whole
    /// call).
    pub loss_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    pub call_id: String,
    /// We sent the offer.
    pub started: bool,
    /// Our MLS leaf and track.
    pub leaf_index: u32,
    pub track: String,
    /// How our frames travelled (the offer's `delivery`).
    pub delivery: crate::transport::Delivery,
    pub seconds: f64,
    /// Every epoch the call's keys came from, in order.
    pub epochs: Vec<u64>,
    pub sent: u64,
    pub ended_by: EndReason,
    pub relay_rtt_ms: Option<f64>,
    /// First sample captured → its frame handed to the transport.
    pub capture_to_send_ms: Option<LatencySummary>,
    /// Start of the session → first peer audio played (set by the driver).
    pub first_audio_ms: Option<f64>,
    /// How the sound devices were opened and behaved (set by the driver).
    pub audio: AudioIoReport,
    pub peers: Vec<PeerReport>,
    /// The group's events during the call (set by the driver).
    pub group_events: GroupEventCounts,
}

pub fn npub(pk: &PublicKey) -> String {
    pk.to_bech32().unwrap_or_else(|_| pk.to_hex())
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("our leaf {leaf} does not fit the call's {bits} sender bits; start a new call")]
    LeafTooLarge { leaf: u32, bits: u32 },
    #[error("the offer's sender bits: {0}")]
    Layout(#[from] crate::media::keys::KeyError),
}

/// Everything the engine needs to take part in one call.
pub struct EngineConfig {
    pub offer: CallOffer,
    /// Our track (fresh name, our MLS leaf).
    pub me: TrackRef,
    pub my_pubkey: PublicKey,
    /// We send the offer (a new call) rather than an answer.
    pub started: bool,
    /// Participants the group's history names (joining a running call).
    pub participants: BTreeMap<PublicKey, TrackRef>,
    pub epoch: u64,
    pub secret: CallSecret,
    /// The group's members by MLS leaf.
    pub leaves: BTreeMap<u32, PublicKey>,
    /// A call we start ends if nobody answers within this long.
    pub ring_timeout: Option<Duration>,
    /// End the call after this long.
    pub duration: Option<Duration>,
    /// SFrame counter high-water marks, so a re-join never reuses a counter.
    pub counters: Option<CounterStore>,
    /// Keep per-frame times ([`CallEngine::take_records`]), for runs that join them across
    /// participants in one process.
    pub record_frames: bool,
    /// Leave once every other participant is gone (after at least one was there): a bot
    /// that answered a call goes back to waiting when the call is over.
    pub leave_when_alone: bool,
    /// How often [`CallEvent::Status`] comes ([`STATUS_INTERVAL`] for a log; faster for a
    /// live screen).
    pub status_interval: Duration,
}

/// An input, with the time it happened given beside it to [`CallEngine::handle`].
#[derive(Debug)]
pub enum Input<'a> {
    /// One frame of 48 kHz mono PCM; `captured_at` is when its first sample was captured.
    Captured {
        pcm: &'a [i16],
        captured_at: Instant,
    },
    /// The audio source has no more.
    SourceEnded,
    /// The sink wants one frame of audio whose first sample plays at `play_at`.
    PlayoutDue {
        play_at: Instant,
    },
    /// A packet from a peer's track.
    Frame {
        track: [u8; 8],
        seq: u64,
        payload: &'a [u8],
    },
    /// A signaling rumor from the group (already authenticated by MLS).
    Rumor {
        sender: PublicKey,
        kind: Kind,
        tags: &'a Tags,
    },
    /// The group's epoch (a commit was merged): the call's secret in it and the members.
    Epoch {
        epoch: u64,
        secret: CallSecret,
        leaves: BTreeMap<u32, PublicKey>,
    },
    /// We are no longer in the group.
    Removed,
    Command(UserCommand),
    /// The transport's round-trip time to the relay, for status and estimates.
    RelayRtt(Option<Duration>),
    /// [`CallEngine::poll_timeout`] passed.
    Timeout,
}

/// What the driver must do.
#[derive(Debug)]
pub enum Output {
    Publish(EncodedFrame),
    Subscribe {
        pubkey: PublicKey,
        track: TrackRef,
    },
    Unsubscribe {
        track: [u8; 8],
    },
    /// Send this rumor to the group.
    Rumor(EventBuilder),
    /// One frame of mixed PCM for the sink (answer to [`Input::PlayoutDue`]).
    Play(Vec<i16>),
    /// Every stream could play this much (less than a frame) sooner and keep its margin:
    /// a sink clocked by a device plays that much less of what it holds (one seam); a
    /// timer's sink ignores it. Only comes under [`PlayoutRule::Slack`].
    Trim(Duration),
    Event(CallEvent),
    /// The call is over for us; everything to send was output before this.
    Ended(EndReason),
}

/// One remote participant.
struct Peer {
    pubkey: PublicKey,
    track: TrackRef,
    inbound: Inbound,
    /// What we heard since the last break in the stream (a concealed, stretched or
    /// skipped slot): audio of continuous phase, so the pitch analysis sees the tone as
    /// sent and not the seams between frames that were not.
    heard: VecDeque<i16>,
    /// The previous such stretch, kept while the current one is short.
    heard_before: Vec<i16>,
    /// Sequence of the last decoded (or FEC-recovered) slot.
    last_decoded: Option<u64>,
    receive_to_play: Samples,
    /// What its jitter buffer last said it has to spare (under the slack rule), until the
    /// sink acts on it.
    spare: Option<Duration>,
    present: bool,
    /// The last frame that arrived (or when we subscribed).
    last_heard: Instant,
    lost: bool,
    muted: bool,
    /// Loudest RMS played since the last status.
    level: f32,
    /// Loss measurement: (window start, played, lost) at the start of the current window,
    /// and the rate of the last complete window.
    loss_window: (Instant, u64, u64),
    loss_pct: f64,
}

impl Peer {
    /// `analyze`: also find the dominant frequency of what we heard (a pass of Goertzel
    /// filters; only the final report does it).
    fn report(&self, analyze: bool, estimate_ms: Option<f64>) -> PeerReport {
        let heard_hz = analyze
            .then(|| {
                let current: Vec<i16> = self.heard.iter().copied().collect();
                let run = if current.len() >= MIN_ANALYSIS_RUN
                    || current.len() >= self.heard_before.len()
                {
                    current
                } else {
                    self.heard_before.clone()
                };
                dominant_frequency(&run, 50.0, 4000.0)
            })
            .flatten();
        let receive_to_play_ms = self.receive_to_play.summary();
        let jitter = self.inbound.jitter();
        // The final report gives the whole call's rate.
        let loss_pct = if analyze {
            percent(jitter.concealed + jitter.fec_recovered, jitter.played)
        } else {
            self.loss_pct
        };
        PeerReport {
            npub: npub(&self.pubkey),
            leaf: self.track.leaf_index,
            track: self.track.name_hex(),
            received: self.inbound.received(),
            rejects: self.inbound.rejects(),
            jitter: self.inbound.jitter(),
            distinct_payload_sizes: self.inbound.distinct_plain_sizes(),
            heard_hz,
            mouth_to_ear_ms: receive_to_play_ms.zip(estimate_ms).map(|(s, e)| s.plus(e)),
            receive_to_play_ms,
            present: self.present,
            lost: self.lost,
            muted: self.muted,
            level: if analyze { 0.0 } else { self.level },
            speaking: !analyze && self.level >= SPEAKING_LEVEL,
            loss_pct,
        }
    }

    /// Closes the loss window if it is long enough (called at each status).
    fn measure_loss(&mut self, now: Instant) {
        let j = self.inbound.jitter();
        let lost = j.concealed + j.fec_recovered;
        let (start, played0, lost0) = self.loss_window;
        if now.saturating_duration_since(start) >= LOSS_WINDOW {
            self.loss_pct = percent(lost - lost0, j.played - played0);
            self.loss_window = (now, j.played, lost);
        }
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// RMS of a frame, linear, full scale = 1.
fn rms(pcm: &[i16]) -> f32 {
    if pcm.is_empty() {
        return 0.0;
    }
    let sum: f64 = pcm.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    ((sum / pcm.len() as f64).sqrt() / 32768.0) as f32
}

/// A participant's view of one call. See the module documentation.
pub struct CallEngine {
    offer: CallOffer,
    me: TrackRef,
    my_pubkey: PublicKey,
    started: bool,
    layout: KidLayout,
    codec: CodecConfig,
    epoch: u64,
    secret: CallSecret,
    epochs: Vec<u64>,
    leaves: BTreeMap<u32, PublicKey>,
    outbound: Outbound,
    peers: HashMap<[u8; 8], Peer>,
    /// Peers that left, kept for the final report.
    gone: Vec<Peer>,
    ever_answered: bool,
    /// See [`EngineConfig::leave_when_alone`].
    leave_when_alone: bool,
    /// Some other participant was in the call at some point.
    had_peers: bool,
    began: Instant,
    ring_deadline: Option<Instant>,
    end_deadline: Option<Instant>,
    next_status: Instant,
    status_interval: Duration,
    relay_rtt: Option<Duration>,
    /// Last time the transport had a connection (an RTT), if ever.
    relay_seen: Option<Instant>,
    /// Loudest RMS captured since the last status.
    level: f32,
    capture_to_send: Samples,
    first_audio_at: Option<Instant>,
    records: Option<FrameRecords>,
    mix: Vec<i32>,
    /// How every peer's jitter buffer keeps its playout point (see
    /// [`CallEngine::set_playout_rule`]).
    playout_rule: PlayoutRule,
    outputs: VecDeque<Output>,
    ended: Option<EndReason>,
}

impl std::fmt::Debug for CallEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallEngine")
            .field("call_id", &hex::encode(self.offer.call_id))
            .field("epoch", &self.epoch)
            .field("peers", &self.peers.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl CallEngine {
    /// Starts taking part at `now`: the offer (or our answer) is the first output, then a
    /// subscription to every known participant.
    pub fn new(cfg: EngineConfig, now: Instant) -> Result<Self, EngineError> {
        let layout = KidLayout::new(cfg.offer.sender_bits)?;
        layout
            .kid(MediaType::Audio, cfg.me.leaf_index, 0)
            .map_err(|_| EngineError::LeafTooLarge {
                leaf: cfg.me.leaf_index,
                bits: cfg.offer.sender_bits,
            })?;
        let codec = codec_of(&cfg.offer);
        let store = cfg.counters.map(|s| (s, cfg.offer.call_id));
        let keys = SenderKeyring::new(
            layout,
            MediaType::Audio,
            cfg.me.leaf_index,
            cfg.epoch,
            &cfg.secret,
            store,
        )
        .map_err(PipelineError::from)?;
        let outbound = Outbound::new(codec, keys).map_err(PipelineError::from)?;
        let mut engine = Self {
            started: cfg.started,
            layout,
            codec,
            epoch: cfg.epoch,
            secret: cfg.secret,
            epochs: vec![cfg.epoch],
            leaves: cfg.leaves,
            outbound,
            peers: HashMap::new(),
            gone: Vec::new(),
            ever_answered: false,
            leave_when_alone: cfg.leave_when_alone,
            had_peers: false,
            began: now,
            ring_deadline: cfg
                .ring_timeout
                .filter(|t| cfg.started && !t.is_zero())
                .map(|t| now + t),
            end_deadline: cfg.duration.map(|d| now + d),
            next_status: now + cfg.status_interval,
            status_interval: cfg.status_interval,
            relay_rtt: None,
            relay_seen: None,
            level: 0.0,
            capture_to_send: Samples::default(),
            first_audio_at: None,
            records: cfg.record_frames.then(FrameRecords::default),
            mix: vec![0; codec.samples_per_frame()],
            playout_rule: PlayoutRule::default(),
            outputs: VecDeque::new(),
            ended: None,
            offer: cfg.offer,
            me: cfg.me,
            my_pubkey: cfg.my_pubkey,
        };
        let call_id = hex::encode(engine.offer.call_id);
        if engine.started {
            engine
                .outputs
                .push_back(Output::Rumor(engine.offer.to_rumor()));
            engine.event(CallEvent::Started { call_id });
        } else {
            let answer = CallAnswer::accept(engine.offer.call_id, engine.me.clone());
            engine.outputs.push_back(Output::Rumor(answer.to_rumor()));
            engine.event(CallEvent::Joined {
                call_id,
                participants: cfg.participants.len(),
            });
        }
        for (pk, track) in cfg.participants {
            engine.add_peer(pk, track, now)?;
        }
        Ok(engine)
    }

    pub fn offer(&self) -> &CallOffer {
        &self.offer
    }

    pub fn codec(&self) -> CodecConfig {
        self.codec
    }

    /// Tells the engine how its sink takes audio: [`PlayoutRule::Slack`] when a sound card
    /// asks for each slot as it needs it, so the jitter buffers may run with less than a
    /// frame of slack; [`PlayoutRule::Frames`] (the default) for a timer's ticks. Applies
    /// to the peers there are and to those that come.
    pub fn set_playout_rule(&mut self, rule: PlayoutRule) {
        self.playout_rule = rule;
        for peer in self.peers.values_mut() {
            peer.inbound.set_playout_rule(rule);
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn is_ended(&self) -> Option<EndReason> {
        self.ended
    }

    /// When the first peer audio (a decoded frame) was played.
    pub fn first_audio_at(&self) -> Option<Instant> {
        self.first_audio_at
    }

    /// The per-frame records, when [`EngineConfig::record_frames`] asked for them.
    pub fn take_records(&mut self) -> Option<FrameRecords> {
        self.records.take()
    }

    /// Our track's name.
    pub fn track(&self) -> [u8; 8] {
        self.me.name
    }

    pub fn handle(&mut self, input: Input<'_>, now: Instant) -> Result<(), EngineError> {
        if self.ended.is_some() {
            return Ok(());
        }
        match input {
            Input::Captured { pcm, captured_at } => {
                let frame = self.outbound.encode(pcm)?;
                if !self.outbound.muted() {
                    self.level = self.level.max(rms(pcm));
                }
                self.capture_to_send.push(ms_between(captured_at, now));
                if let Some(r) = &mut self.records {
                    r.sent(frame.seq, captured_at, now);
                }
                self.outputs.push_back(Output::Publish(frame));
            }
            Input::SourceEnded => self.end(EndReason::SourceEnded),
            Input::PlayoutDue { play_at } => self.play(now, play_at),
            Input::Frame {
                track,
                seq,
                payload,
            } => self.receive(track, seq, payload, now),
            Input::Rumor { sender, kind, tags } => self.on_rumor(sender, kind, tags, now)?,
            Input::Epoch {
                epoch,
                secret,
                leaves,
            } => self.on_epoch(epoch, secret, leaves, now)?,
            Input::Removed => self.end(EndReason::RemovedFromGroup),
            Input::Command(UserCommand::Mute(muted)) => {
                if self.outbound.muted() != muted {
                    self.outbound.set_muted(muted);
                    self.event(CallEvent::Muted { muted });
                    let state = CallState {
                        call_id: self.offer.call_id,
                        action: StateAction::Other(
                            if muted { "mute_audio" } else { "unmute_audio" }.into(),
                        ),
                    };
                    self.outputs.push_back(Output::Rumor(state.to_rumor()));
                }
            }
            Input::Command(UserCommand::Leave) => self.end(EndReason::Stopped),
            Input::RelayRtt(rtt) => {
                self.relay_rtt = rtt;
                if rtt.is_some() {
                    self.relay_seen = Some(now);
                }
            }
            Input::Timeout => self.on_timeout(now),
        }
        // Checked here, after the input is handled, not where a member is dropped: a
        // member that re-joins is dropped and added back within one input.
        if self.leave_when_alone && self.had_peers && self.peers.is_empty() {
            self.end(EndReason::Alone);
        }
        Ok(())
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next time [`Input::Timeout`] is due; `None` once the call has ended.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        let ring = self.ring_deadline.filter(|_| !self.ever_answered);
        let liveness = self
            .peers
            .values()
            .map(|p| p.last_heard + if p.lost { DROP_AFTER } else { LOST_AFTER })
            .min();
        [Some(self.next_status), ring, self.end_deadline, liveness]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_timeout(&mut self, now: Instant) {
        if self.end_deadline.is_some_and(|t| now >= t) {
            return self.end(EndReason::Duration);
        }
        if !self.ever_answered && self.ring_deadline.is_some_and(|t| now >= t) {
            return self.end(EndReason::NoAnswer);
        }
        let mut lost_now = Vec::new();
        let mut gone = Vec::new();
        for p in self.peers.values_mut() {
            let silent = now.saturating_duration_since(p.last_heard);
            if p.lost && silent >= DROP_AFTER {
                gone.push(p.pubkey);
            } else if !p.lost && silent >= LOST_AFTER {
                p.lost = true;
                lost_now.push(p.pubkey);
            }
        }
        for pk in lost_now {
            self.event(CallEvent::PeerLost { npub: npub(&pk) });
        }
        for pk in gone {
            self.drop_member(&pk, "lost");
        }
        if now >= self.next_status {
            self.next_status = now + self.status_interval;
            let status = self.status(now);
            self.event(CallEvent::Status(status));
        }
    }

    fn event(&mut self, e: CallEvent) {
        self.outputs.push_back(Output::Event(e));
    }

    /// Ends the call: a farewell rumor (unless we were removed), then [`Output::Ended`].
    fn end(&mut self, reason: EndReason) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(reason);
        let action = match reason {
            EndReason::RemovedFromGroup => None,
            // Nobody came: end the call for everyone rather than leave it ringing.
            EndReason::NoAnswer => Some(StateAction::End),
            _ => Some(StateAction::Leave),
        };
        if let Some(action) = action {
            let bye = CallState {
                call_id: self.offer.call_id,
                action,
            };
            self.outputs.push_back(Output::Rumor(bye.to_rumor()));
        }
        self.outputs.push_back(Output::Ended(reason));
    }

    fn add_peer(
        &mut self,
        pubkey: PublicKey,
        track: TrackRef,
        now: Instant,
    ) -> Result<(), EngineError> {
        if pubkey == self.my_pubkey {
            return Ok(());
        }
        if let Some(old) = self.peers.values().find(|p| p.pubkey == pubkey) {
            if old.track == track {
                return Ok(());
            }
            // A member re-joining with a fresh track replaces its old one.
            self.drop_member(&pubkey, "re-joined with a new track");
        }
        let mut inbound =
            Inbound::new(self.codec, self.layout, track.leaf_index).map_err(PipelineError::from)?;
        inbound.set_playout_rule(self.playout_rule);
        inbound
            .install_epoch(self.epoch, &self.secret, now)
            .map_err(PipelineError::from)?;
        self.outputs.push_back(Output::Subscribe {
            pubkey,
            track: track.clone(),
        });
        self.event(CallEvent::PeerJoined {
            npub: npub(&pubkey),
            leaf: track.leaf_index,
        });
        self.had_peers = true;
        self.peers.insert(
            track.name,
            Peer {
                pubkey,
                track,
                inbound,
                heard: VecDeque::new(),
                heard_before: Vec::new(),
                last_decoded: None,
                receive_to_play: Samples::default(),
                spare: None,
                present: true,
                last_heard: now,
                lost: false,
                muted: false,
                level: 0.0,
                loss_window: (now, 0, 0),
                loss_pct: 0.0,
            },
        );
        Ok(())
    }

    fn drop_member(&mut self, pubkey: &PublicKey, why: &str) {
        let tracks: Vec<[u8; 8]> = self
            .peers
            .iter()
            .filter(|(_, p)| &p.pubkey == pubkey)
            .map(|(k, _)| *k)
            .collect();
        for track in tracks {
            if let Some(mut peer) = self.peers.remove(&track) {
                peer.present = false;
                self.outputs.push_back(Output::Unsubscribe { track });
                self.event(CallEvent::PeerLeft {
                    npub: npub(&peer.pubkey),
                    why: why.to_string(),
                });
                self.gone.push(peer);
            }
        }
    }

    fn receive(&mut self, track: [u8; 8], seq: u64, payload: &[u8], now: Instant) {
        let Some(peer) = self.peers.get_mut(&track) else {
            return;
        };
        match peer.inbound.receive(seq, payload, now) {
            Ok(Accepted::Frame { .. }) => {
                if let Some(r) = &mut self.records {
                    r.arrived(track, seq, now);
                }
                peer.last_heard = now;
                if peer.lost {
                    // Lost for less than DROP_AFTER: back in the call as it was.
                    peer.lost = false;
                    let back = CallEvent::PeerBack {
                        npub: npub(&peer.pubkey),
                    };
                    self.event(back);
                }
            }
            Ok(Accepted::Held | Accepted::Foreign) => {}
            // Counted by reason in the peer's rejects.
            Err(e) => tracing::debug!(track = %hex::encode(track), "frame {seq}: {e}"),
        }
    }

    /// Mixes one slot of every peer for the sink.
    fn play(&mut self, now: Instant, play_at: Instant) {
        self.mix.iter_mut().for_each(|m| *m = 0);
        let (mut playing, mut all_spare, mut least_spare) = (0usize, true, None);
        for (name, peer) in &mut self.peers {
            let Some(slot) = peer.inbound.next(now) else {
                continue;
            };
            for (m, s) in self.mix.iter_mut().zip(slot.pcm) {
                *m += i32::from(*s);
            }
            peer.level = peer.level.max(rms(slot.pcm));
            let seq = match slot.kind {
                SlotKind::Decoded { seq } | SlotKind::Fec { seq } => Some(seq),
                _ => None,
            };
            let audible = slot.pcm.iter().any(|s| s.unsigned_abs() >= SILENCE_PEAK);
            let continues =
                seq.is_some() && seq.map(|s| s.checked_sub(1)) == Some(peer.last_decoded);
            if !continues && !peer.heard.is_empty() {
                // A seam: start a new stretch, keeping the last one while this one is short.
                if peer.heard.len() >= MIN_ANALYSIS_RUN.min(peer.heard_before.len().max(1)) {
                    peer.heard_before = peer.heard.drain(..).collect();
                } else {
                    peer.heard.clear();
                }
            }
            peer.last_decoded = seq;
            if seq.is_some() && audible {
                peer.heard.extend(slot.pcm.iter().copied());
                let excess = peer.heard.len().saturating_sub(ANALYSIS_SAMPLES);
                peer.heard.drain(..excess);
            }
            if let (SlotKind::Decoded { seq }, Some(arrived)) = (slot.kind, slot.arrived_at) {
                peer.receive_to_play.push(ms_between(arrived, play_at));
                self.first_audio_at.get_or_insert(play_at);
                if let Some(r) = &mut self.records {
                    r.played(*name, seq, play_at);
                }
            }
            if let Some(s) = peer.inbound.take_spare() {
                peer.spare = Some(s);
            }
            playing += 1;
            match peer.spare {
                Some(s) => least_spare = Some(least_spare.map_or(s, |l: Duration| l.min(s))),
                None => all_spare = false,
            }
        }
        let pcm = self.mix.iter().map(|&m| soft_limit(m)).collect();
        self.outputs.push_back(Output::Play(pcm));
        // Every stream that plays could play sooner: the sink plays the least of that less
        // of what it holds, and all of them then play that much sooner.
        if let (true, true, Some(by)) = (playing > 0, all_spare, least_spare) {
            for peer in self.peers.values_mut() {
                peer.spare = None;
            }
            self.outputs.push_back(Output::Trim(by));
        }
    }

    fn owns(&self, sender: &PublicKey, t: &TrackRef) -> bool {
        self.leaves.get(&t.leaf_index) == Some(sender)
    }

    fn on_rumor(
        &mut self,
        sender: PublicKey,
        kind: Kind,
        tags: &Tags,
        now: Instant,
    ) -> Result<(), EngineError> {
        if kind == KIND_ANSWER {
            match CallAnswer::from_rumor(kind, tags) {
                Ok(a) if a.call_id == self.offer.call_id => {
                    if a.status != AnswerStatus::Accept {
                        self.event(CallEvent::PeerDeclined {
                            npub: npub(&sender),
                            status: match a.status {
                                AnswerStatus::Busy => "busy",
                                _ => "decline",
                            }
                            .into(),
                            reason: a.reason.clone(),
                        });
                    }
                    if let (AnswerStatus::Accept, Some(t)) = (a.status, a.track) {
                        if self.owns(&sender, &t) {
                            self.ever_answered = true;
                            self.add_peer(sender, t, now)?;
                        } else {
                            tracing::warn!(
                                "{} answered with a leaf that is not theirs",
                                npub(&sender)
                            );
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("malformed answer from {}: {e}", npub(&sender)),
            }
        } else if kind == KIND_STATE {
            match CallState::from_rumor(kind, tags) {
                Ok(s) if s.call_id == self.offer.call_id => match s.action {
                    StateAction::Leave => self.drop_member(&sender, "left"),
                    StateAction::End => self.end(EndReason::EndedByPeer),
                    StateAction::Other(action)
                        if self.peers.values().any(|p| p.pubkey == sender) =>
                    {
                        let muted = match action.as_str() {
                            "mute_audio" => Some(true),
                            "unmute_audio" => Some(false),
                            _ => None,
                        };
                        if let Some(muted) = muted {
                            for p in self.peers.values_mut().filter(|p| p.pubkey == sender) {
                                p.muted = muted;
                            }
                            self.event(CallEvent::PeerMuted {
                                npub: npub(&sender),
                                muted,
                            });
                        }
                    }
                    _ => {}
                },
                Ok(_) => {}
                Err(e) => tracing::warn!("malformed call state from {}: {e}", npub(&sender)),
            }
        } else if kind == KIND_OFFER {
            if let Ok(o) = CallOffer::from_rumor(kind, tags) {
                if o.call_id == self.offer.call_id && sender != self.my_pubkey {
                    tracing::warn!(
                        "{} re-sent this call's offer; a reused call id is rejected",
                        npub(&sender)
                    );
                }
            }
        }
        Ok(())
    }

    /// A commit was merged (or the driver checks in case one was merged elsewhere): send
    /// with the new epoch's key from now on, give every receiver the new epoch (frames
    /// held for it are released), drop participants no longer in the group, and after a
    /// commit that added members re-announce the call if it is our duty.
    fn on_epoch(
        &mut self,
        epoch: u64,
        secret: CallSecret,
        leaves: BTreeMap<u32, PublicKey>,
        now: Instant,
    ) -> Result<(), EngineError> {
        if !leaves.values().any(|pk| *pk == self.my_pubkey) {
            self.end(EndReason::RemovedFromGroup);
            return Ok(());
        }
        let added = leaves.keys().any(|leaf| !self.leaves.contains_key(leaf));
        self.leaves = leaves;
        if epoch == self.epoch {
            return Ok(());
        }
        let gone: Vec<PublicKey> = self
            .peers
            .values()
            .filter(|p| self.leaves.get(&p.track.leaf_index) != Some(&p.pubkey))
            .map(|p| p.pubkey)
            .collect();
        for pk in gone {
            self.drop_member(&pk, "removed from the group");
        }
        self.outbound
            .rekey(epoch, &secret)
            .map_err(PipelineError::from)?;
        for peer in self.peers.values_mut() {
            if let Err(e) = peer.inbound.install_epoch(epoch, &secret, now) {
                tracing::warn!("installing epoch {epoch}: {e}");
            }
        }
        self.epoch = epoch;
        self.secret = secret;
        self.epochs.push(epoch);
        self.event(CallEvent::Rekeyed { epoch });
        if added {
            self.announce_call_info();
        }
        Ok(())
    }

    /// After a commit that added members, the participant with the lowest leaf
    /// re-announces the call (`call_info`) with every participant's track: a member added
    /// mid-call can read neither the offer nor the answers (docs/protocol.md §2).
    fn announce_call_info(&mut self) {
        let lowest = self
            .peers
            .values()
            .map(|p| p.track.leaf_index)
            .chain([self.me.leaf_index])
            .min();
        if lowest != Some(self.me.leaf_index) {
            return;
        }
        let mut participants: Vec<TrackRef> =
            self.peers.values().map(|p| p.track.clone()).collect();
        participants.sort_by_key(|t| t.leaf_index);
        participants.push(self.me.clone());
        let state = CallState {
            call_id: self.offer.call_id,
            action: StateAction::CallInfo {
                offer: Box::new(self.offer.clone()),
                participants,
            },
        };
        self.outputs.push_back(Output::Rumor(state.to_rumor()));
    }

    /// The estimated part of mouth-to-ear that this side cannot measure: the sender's
    /// capture → send (ours stands in for theirs) and the network (the relay round trip:
    /// two legs of half a round trip each).
    fn estimated_ms(&self) -> Option<f64> {
        let capture = self.capture_to_send.summary().map_or(0.0, |s| s.p50);
        self.relay_rtt.map(|rtt| capture + ms(rtt))
    }

    /// The status now; levels start again from silence for the next one.
    fn status(&mut self, now: Instant) -> CallStatus {
        let estimate = self.estimated_ms();
        let mut peers: Vec<PeerReport> = self
            .peers
            .values_mut()
            .map(|p| {
                p.measure_loss(now);
                let report = p.report(false, estimate);
                p.level = 0.0;
                report
            })
            .collect();
        peers.sort_by_key(|p| p.leaf);
        let level = std::mem::take(&mut self.level);
        CallStatus {
            seconds: ms_between(self.began, now) / 1e3,
            epoch: self.epoch,
            sent: self.outbound.sent(),
            muted: self.outbound.muted(),
            level,
            relay: self.relay_state(now),
            relay_rtt_ms: self.relay_rtt.map(ms),
            peers,
            group_events: GroupEventCounts::default(),
        }
    }

    fn relay_state(&self, now: Instant) -> RelayState {
        match (self.relay_rtt, self.relay_seen) {
            (Some(_), _) => RelayState::Connected,
            (None, None) if now.saturating_duration_since(self.began) < RELAY_LOST_AFTER => {
                RelayState::Connecting
            }
            (None, Some(seen)) if now.saturating_duration_since(seen) < RELAY_LOST_AFTER => {
                RelayState::Reconnecting
            }
            (None, _) => RelayState::Lost,
        }
    }

    /// The call as it went, for the final report (runs the pitch analysis).
    pub fn report(&self, now: Instant) -> CallReport {
        let estimate = self.estimated_ms();
        let mut peers: Vec<PeerReport> = self
            .gone
            .iter()
            .chain(self.peers.values())
            .map(|p| p.report(true, estimate))
            .collect();
        peers.sort_by_key(|p| p.leaf);
        CallReport {
            call_id: hex::encode(self.offer.call_id),
            started: self.started,
            leaf_index: self.me.leaf_index,
            track: self.me.name_hex(),
            delivery: self.offer.delivery,
            seconds: ms_between(self.began, now) / 1e3,
            epochs: self.epochs.clone(),
            sent: self.outbound.sent(),
            ended_by: self.ended.unwrap_or(EndReason::Stopped),
            relay_rtt_ms: self.relay_rtt.map(ms),
            capture_to_send_ms: self.capture_to_send.summary(),
            first_audio_ms: None,
            audio: AudioIoReport::default(),
            peers,
            group_events: GroupEventCounts::default(),
        }
    }
}

/// The codec a call's offer asks for.
pub fn codec_of(offer: &CallOffer) -> CodecConfig {
    match offer.privacy {
        Privacy::Enhanced => CodecConfig::enhanced(offer.frame_ms),
        Privacy::Standard => CodecConfig {
            frame_ms: offer.frame_ms,
            ..CodecConfig::default()
        },
    }
}

/// Samples under the knee pass unchanged; louder ones approach full scale smoothly.
fn soft_limit(x: i32) -> i16 {
    let v = f64::from(x);
    let a = v.abs();
    if a <= LIMITER_KNEE {
        return x as i16;
    }
    let room = f64::from(i16::MAX) - LIMITER_KNEE;
    let bent = LIMITER_KNEE + room * ((a - LIMITER_KNEE) / room).tanh();
    (bent.min(f64::from(i16::MAX)) * v.signum()) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_is_transparent_below_the_knee_and_never_wraps() {
        assert_eq!(soft_limit(1000), 1000);
        assert_eq!(soft_limit(-24_000), -24_000);
        assert!(soft_limit(60_000) > 30_000);
        assert!(soft_limit(-60_000) >= -i16::MAX);
        // Monotonic: louder in, never quieter out.
        let mut last = i16::MIN;
        for x in (0..100_000).step_by(997) {
            let y = soft_limit(x);
            assert!(y >= last, "{x}");
            last = y;
        }
    }
}
