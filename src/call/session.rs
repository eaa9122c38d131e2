//! A live call in one group (`call join`): find the group's running call or start one,
//! signal it inside MLS, send audio from a source, play every peer into a sink, follow the
//! group's epochs while the call runs (keys rotate on every commit), and leave cleanly.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mdk_storage_traits::MdkStorageProvider;
use nostr_sdk::prelude::{EventId, Kind, PublicKey, Tags, Timestamp, ToBech32};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use url::Url;

use super::signaling::{
    AnswerStatus, CallAnswer, CallOffer, CallState, Privacy, StateAction, TrackRef, KIND_ANSWER,
    KIND_OFFER, KIND_STATE,
};
use super::{random, CallError};
use crate::group::{GroupError, GroupEventOutcome, GroupMember, GroupRef, Resume};
use crate::media::audio::{AudioSink, AudioSource};
use crate::media::jitter::JitterStats;
use crate::media::keyring::{
    CounterStore, Decrypted, Received, ReceiverKeyring, RejectCounts, SenderKeyring,
};
use crate::media::keys::{CallSecret, KidLayout, MediaType};
use crate::media::opus::{CodecConfig, OpusEncoder};
use crate::media::playout::{PlayoutDecoder, SlotKind};
use crate::media::tone::dominant_frequency;
use crate::transport::{
    participant_namespace, CertVerification, ClientConfig, LocalTrack, MoqClient, RemoteTrack,
    TokenPolicy,
};

/// A call whose last signaling is older than this is not joined without `--call`: its
/// participants most likely crashed without saying `leave`.
pub const STALE_CALL: Duration = Duration::from_secs(12 * 3600);
/// PROTOCOL.md §2: a started call nobody answers ends after this long.
pub const RING_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-peer audio kept for the `heard_hz` analysis in the report (it looks at the last
/// half second).
const ANALYSIS_SECONDS: usize = 1;
/// Frames whose peak is below this are silence (a muted peer) and not analysed.
const SILENCE_PEAK: i16 = 64;
/// How long a leave/end message may take to reach a relay when the call ends.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);

/// Which call `call join` takes part in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallTarget {
    /// The newest running call of the group, or a new one if there is none.
    Auto,
    /// Always start a new call.
    New,
    /// The call whose id (hex) starts with this.
    Id(String),
}

#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub target: CallTarget,
    /// MoQ relay for a call we start (a joined call names its own).
    pub moq_relay: Option<Url>,
    pub verification: CertVerification,
    pub privacy: Privacy,
    pub frame_ms: u32,
    /// End the call after this long (headless bots); `None` runs until stopped.
    pub duration: Option<Duration>,
    /// A call we start ends (`end`) if nobody answers within this long; zero waits forever.
    pub ring_timeout: Duration,
    /// Where SFrame counter high-water marks are kept ($CALL_HOME/counters).
    pub counters: Option<PathBuf>,
    /// When the relay token is presented in SETUP (docs/protocol.md §4).
    pub relay_token: TokenPolicy,
}

/// A call as the group's signaling history tells it.
#[derive(Debug, Clone)]
pub struct KnownCall {
    pub offer: CallOffer,
    /// Who sent the offer (for a call learnt from `call_info`: the member at the offer's leaf).
    pub offered_by: Option<PublicKey>,
    pub offered_at: Timestamp,
    /// Newest signaling message of the call.
    pub last_activity: Timestamp,
    /// Current participants' tracks (offerer included), checked against their MLS leaves.
    pub participants: BTreeMap<PublicKey, TrackRef>,
    pub ended: bool,
}

impl KnownCall {
    pub fn id_hex(&self) -> String {
        hex::encode(self.offer.call_id)
    }

    /// Not ended, and someone is in it.
    pub fn running(&self) -> bool {
        !self.ended && !self.participants.is_empty()
    }

    /// Running, and signaled recently enough for `call join` to pick it by itself.
    pub fn joinable(&self, now: Timestamp) -> bool {
        self.running()
            && now.as_secs().saturating_sub(self.last_activity.as_secs()) < STALE_CALL.as_secs()
    }
}

/// One signaling message of the group's history, oldest first.
#[derive(Debug, Clone)]
pub struct SignalMessage {
    pub sender: PublicKey,
    pub kind: Kind,
    pub tags: Tags,
    pub created_at: Timestamp,
}

/// Replays the group's signaling history into calls (offer order). Offers that reuse a
/// call id are rejected (PROTOCOL.md §2); tracks whose leaf is not their sender's current
/// MLS leaf are ignored; malformed messages are skipped with a debug log.
pub fn calls_from_history(
    messages: &[SignalMessage],
    leaves: &BTreeMap<u32, PublicKey>,
) -> Vec<KnownCall> {
    let owns = |pk: &PublicKey, t: &TrackRef| leaves.get(&t.leaf_index) == Some(pk);
    // Rumors carry whole seconds, and the order a store gives within one second is not
    // reliable (MDK moves our own message when a relay hands it back), so within a second
    // go by causality: offers, then answers, then states (leave, end, call_info).
    let rank = |k: Kind| match k {
        k if k == KIND_OFFER => 0,
        k if k == KIND_ANSWER => 1,
        _ => 2,
    };
    let mut ordered: Vec<&SignalMessage> = messages.iter().collect();
    ordered.sort_by_key(|m| (m.created_at, rank(m.kind)));
    let mut calls: Vec<KnownCall> = Vec::new();
    let find = |calls: &mut Vec<KnownCall>, id: &[u8; 32]| {
        calls.iter().position(|c| &c.offer.call_id == id)
    };
    for m in ordered {
        match m.kind {
            k if k == KIND_OFFER => match CallOffer::from_rumor(m.kind, &m.tags) {
                Ok(offer) if find(&mut calls, &offer.call_id).is_some() => {
                    tracing::warn!(call = %hex::encode(offer.call_id), "offer reuses a call id; rejected");
                }
                Ok(offer) => {
                    let mut participants = BTreeMap::new();
                    if owns(&m.sender, &offer.track) {
                        participants.insert(m.sender, offer.track.clone());
                    }
                    calls.push(KnownCall {
                        offer,
                        offered_by: Some(m.sender),
                        offered_at: m.created_at,
                        last_activity: m.created_at,
                        participants,
                        ended: false,
                    });
                }
                Err(e) => tracing::debug!("skipping an offer: {e}"),
            },
            k if k == KIND_ANSWER => match CallAnswer::from_rumor(m.kind, &m.tags) {
                Ok(answer) => {
                    let Some(i) = find(&mut calls, &answer.call_id) else {
                        continue;
                    };
                    let call = &mut calls[i];
                    call.last_activity = call.last_activity.max(m.created_at);
                    match (answer.status, answer.track) {
                        (AnswerStatus::Accept, Some(t)) if owns(&m.sender, &t) => {
                            call.participants.insert(m.sender, t);
                        }
                        _ => {}
                    }
                }
                Err(e) => tracing::debug!("skipping an answer: {e}"),
            },
            k if k == KIND_STATE => match CallState::from_rumor(m.kind, &m.tags) {
                Ok(state) => {
                    let i = match (find(&mut calls, &state.call_id), &state.action) {
                        (Some(i), _) => i,
                        // A member added mid-call learns of the call from `call_info` only.
                        (None, StateAction::CallInfo { offer, .. }) => {
                            calls.push(KnownCall {
                                offer: (**offer).clone(),
                                offered_by: leaves.get(&offer.track.leaf_index).copied(),
                                offered_at: m.created_at,
                                last_activity: m.created_at,
                                participants: BTreeMap::new(),
                                ended: false,
                            });
                            calls.len() - 1
                        }
                        (None, _) => continue,
                    };
                    let call = &mut calls[i];
                    call.last_activity = call.last_activity.max(m.created_at);
                    match state.action {
                        StateAction::Leave => {
                            call.participants.remove(&m.sender);
                        }
                        StateAction::End => call.ended = true,
                        StateAction::CallInfo { participants, .. } => {
                            for t in participants {
                                if let Some(pk) = leaves.get(&t.leaf_index) {
                                    call.participants.entry(*pk).or_insert(t);
                                }
                            }
                        }
                        StateAction::Other(_) => {}
                    }
                }
                Err(e) => tracing::debug!("skipping a call state: {e}"),
            },
            _ => {}
        }
    }
    calls
}

/// Picks the call to join, or `None` to start one.
pub fn choose_call<'a>(
    calls: &'a [KnownCall],
    target: &CallTarget,
    now: Timestamp,
) -> Result<Option<&'a KnownCall>, CallError> {
    match target {
        CallTarget::New => Ok(None),
        CallTarget::Auto => Ok(calls
            .iter()
            .filter(|c| c.joinable(now))
            .max_by_key(|c| c.offered_at)),
        CallTarget::Id(prefix) => {
            let prefix = prefix.to_ascii_lowercase();
            let matches: Vec<&KnownCall> = calls
                .iter()
                .filter(|c| !prefix.is_empty() && c.id_hex().starts_with(&prefix))
                .collect();
            match matches.as_slice() {
                [one] if one.ended => Err(CallError::Protocol(format!(
                    "call {} has ended",
                    one.id_hex()
                ))),
                [one] => Ok(Some(one)),
                [] => Err(CallError::Protocol(format!(
                    "no call with an id starting with `{prefix}` in this group"
                ))),
                _ => Err(CallError::Protocol(format!(
                    "`{prefix}` matches {} calls; use a longer prefix",
                    matches.len()
                ))),
            }
        }
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
    pub relay_rtt_ms: Option<f64>,
    pub peers: Vec<PeerReport>,
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
    /// Dominant frequency of the last audible half second heard from this peer (tone tests).
    pub heard_hz: Option<f64>,
    /// Still in the call when it ended for us.
    pub present: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    pub call_id: String,
    /// We sent the offer.
    pub started: bool,
    pub seconds: f64,
    /// Every epoch the call's keys came from, in order.
    pub epochs: Vec<u64>,
    pub sent: u64,
    /// Why the call ended for us: `stopped`, `duration`, `source_ended`, `no_answer`,
    /// `ended_by_peer`, `removed_from_group`.
    pub ended_by: String,
    pub relay_rtt_ms: Option<f64>,
    pub peers: Vec<PeerReport>,
}

fn npub(pk: &PublicKey) -> String {
    pk.to_bech32().unwrap_or_else(|_| pk.to_hex())
}

/// One remote participant as the media task sees it: track, keys, playout, what we heard.
struct Peer {
    pubkey: PublicKey,
    track: TrackRef,
    keys: ReceiverKeyring,
    player: PlayoutDecoder,
    forward: tokio::task::JoinHandle<()>,
    received: u64,
    /// Group ids of frames held for a not-yet-known epoch, in arrival order.
    held: VecDeque<u64>,
    heard: VecDeque<i16>,
    present: bool,
}

impl Peer {
    /// `analyze`: also find the dominant frequency of what we heard, a pass of Goertzel
    /// filters over half a second of audio; only the final report does it, never the media
    /// loop.
    fn report(&self, analyze: bool) -> PeerReport {
        let heard_hz = analyze
            .then(|| {
                let heard: Vec<i16> = self.heard.iter().copied().collect();
                dominant_frequency(&heard, 50.0, 4000.0)
            })
            .flatten();
        PeerReport {
            npub: npub(&self.pubkey),
            leaf: self.track.leaf_index,
            track: self.track.name_hex(),
            received: self.received,
            rejects: self.keys.rejects(),
            jitter: self.player.stats(),
            heard_hz,
            present: self.present,
        }
    }

    fn deliver(&mut self, seq: u64, d: Decrypted, now: Instant) {
        self.received += 1;
        self.player.push(seq, d.payload, now);
    }

    /// Frames released by a newly installed epoch: they were held in arrival order and the
    /// keyring evicts the oldest, so the released ones are the newest held.
    fn release(&mut self, released: Vec<Decrypted>, now: Instant) {
        let skip = self.held.len().saturating_sub(released.len());
        let seqs: Vec<u64> = self.held.drain(..).skip(skip).collect();
        for (seq, d) in seqs.into_iter().zip(released) {
            self.deliver(seq, d, now);
        }
    }
}

/// Frames of every peer's track, tagged with the track name.
type Arrival = ([u8; 8], u64, Bytes);

/// The call's secret in one epoch of the group.
#[derive(Clone)]
struct Epoch {
    epoch: u64,
    secret: CallSecret,
}

fn export<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    group: &GroupRef,
    call_id: &[u8; 32],
) -> Result<Epoch, GroupError> {
    let e = member.export_call_secret(group, call_id)?;
    Ok(Epoch {
        epoch: e.epoch,
        secret: e.secret,
    })
}

/// The group's signaling history from MDK's message store, oldest first.
pub fn history<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    group: &GroupRef,
) -> Result<Vec<SignalMessage>, CallError> {
    // The newest 10 000 messages (MDK's most; its default is 1 000): a group that chats a
    // lot must not hide a running call's offer.
    let newest = mdk_storage_traits::groups::Pagination::new(
        Some(mdk_storage_traits::groups::MAX_MESSAGE_LIMIT),
        None,
    );
    let mut messages = member
        .mdk()
        .get_messages(&group.mls_group_id, Some(newest))
        .map_err(GroupError::from)?;
    messages.sort_by_key(|m| (m.created_at, m.processed_at));
    Ok(messages
        .into_iter()
        .filter(|m| [KIND_OFFER, KIND_ANSWER, KIND_STATE].contains(&m.kind))
        .map(|m| SignalMessage {
            sender: m.pubkey,
            kind: m.kind,
            tags: m.tags,
            created_at: m.created_at,
        })
        .collect())
}

/// What the control side (group events, signaling) tells the media task.
enum MediaCommand {
    AddPeer {
        pubkey: PublicKey,
        track: TrackRef,
        remote: RemoteTrack,
    },
    DropMember {
        pubkey: PublicKey,
        why: String,
    },
    Rekey(Epoch),
    Mute(bool),
}

/// What the media task hands back when it ends.
struct MediaOutcome {
    sent: u64,
    peers: Vec<PeerReport>,
    source_ended: bool,
}

/// The audio side of a call, on a task of its own: MLS processing and relay round trips on
/// the control side never delay a frame.
struct Media {
    layout: KidLayout,
    codec: CodecConfig,
    epoch: Epoch,
    sender: SenderKeyring,
    local: LocalTrack,
    peers: HashMap<[u8; 8], Peer>,
    /// Peers that left, kept for the final report.
    gone: Vec<Peer>,
    arrivals: mpsc::UnboundedSender<Arrival>,
    events: mpsc::UnboundedSender<CallEvent>,
    muted: bool,
}

impl Media {
    fn add_peer(
        &mut self,
        pubkey: PublicKey,
        track: TrackRef,
        mut remote: RemoteTrack,
    ) -> Result<(), CallError> {
        let tx = self.arrivals.clone();
        let name = track.name;
        let forward = tokio::spawn(async move {
            while let Ok((seq, payload)) = remote.next().await {
                if tx.send((name, seq, payload)).is_err() {
                    break;
                }
            }
        });
        let mut keys = ReceiverKeyring::new(self.layout, MediaType::Audio);
        keys.install_epoch(
            self.epoch.epoch,
            &self.epoch.secret,
            [track.leaf_index],
            Instant::now(),
        )?;
        let _ = self.events.send(CallEvent::PeerJoined {
            npub: npub(&pubkey),
            leaf: track.leaf_index,
        });
        let peer = Peer {
            pubkey,
            track,
            keys,
            player: PlayoutDecoder::new(self.codec)?,
            forward,
            received: 0,
            held: VecDeque::new(),
            heard: VecDeque::new(),
            present: true,
        };
        if let Some(old) = self.peers.insert(name, peer) {
            old.forward.abort();
        }
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
                peer.forward.abort();
                peer.present = false;
                let _ = self.events.send(CallEvent::PeerLeft {
                    npub: npub(&peer.pubkey),
                    why: why.to_string(),
                });
                self.gone.push(peer);
            }
        }
    }

    fn receive(&mut self, (track, seq, payload): Arrival) {
        let Some(peer) = self.peers.get_mut(&track) else {
            return;
        };
        let now = Instant::now();
        match peer.keys.decrypt(&payload, now) {
            Ok(Received::Frame(d)) if d.leaf_index == peer.track.leaf_index => {
                peer.deliver(seq, d, now);
            }
            // Authentic, but another member's key on this track: not this peer's audio.
            Ok(Received::Frame(_)) => {}
            Ok(Received::Held) => {
                peer.held.push_back(seq);
                if peer.held.len() > 512 {
                    peer.held.pop_front();
                }
            }
            Err(e) => tracing::debug!(track = %hex::encode(track), "frame {seq}: {e}"),
        }
    }

    /// A commit was merged: send with the new epoch's key from now on, and give every
    /// receiver the new epoch (frames held for it are released).
    fn rekey(&mut self, next: Epoch) -> Result<(), CallError> {
        self.sender
            .rekey(next.epoch, &next.secret)
            .map_err(|e| CallError::Protocol(format!("rekeying the sender: {e}")))?;
        let now = Instant::now();
        for peer in self.peers.values_mut() {
            match peer
                .keys
                .install_epoch(next.epoch, &next.secret, [peer.track.leaf_index], now)
            {
                Ok(released) => peer.release(released, now),
                Err(e) => tracing::warn!("installing epoch {}: {e}", next.epoch),
            }
        }
        self.epoch = next;
        Ok(())
    }

    fn status(&self, started: Instant, sent: u64) -> CallStatus {
        let mut peers: Vec<PeerReport> = self.peers.values().map(|p| p.report(false)).collect();
        peers.sort_by_key(|p| p.leaf);
        CallStatus {
            seconds: started.elapsed().as_secs_f64(),
            epoch: self.epoch.epoch,
            sent,
            muted: self.muted,
            relay_rtt_ms: self.local.stats().rtt().map(|d| d.as_secs_f64() * 1000.0),
            peers,
        }
    }

    /// Sends a frame from `source` and plays one mixed frame into `sink` every frame
    /// interval until told to stop or the source ends.
    async fn run(
        mut self,
        mut source: Box<dyn AudioSource>,
        mut sink: Box<dyn AudioSink>,
        mut commands: mpsc::UnboundedReceiver<MediaCommand>,
        mut arrivals: mpsc::UnboundedReceiver<Arrival>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<MediaOutcome, CallError> {
        let started = Instant::now();
        let codec = self.codec;
        let mut tick = tokio::time::interval(Duration::from_millis(u64::from(codec.frame_ms)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut status = tokio::time::interval(Duration::from_secs(5));
        status.tick().await;
        let mut encoder = OpusEncoder::new(codec)?;
        let spf = codec.samples_per_frame();
        let (mut pcm, mut mix, mut out) = (vec![0i16; spf], vec![0i32; spf], vec![0i16; spf]);
        let mut seq = 0u64;
        let mut source_ended = false;
        loop {
            // Arrivals before the clock: a frame that is here is pushed before its slot plays.
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                cmd = commands.recv() => match cmd {
                    Some(MediaCommand::AddPeer { pubkey, track, remote }) => {
                        self.add_peer(pubkey, track, remote)?;
                    }
                    Some(MediaCommand::DropMember { pubkey, why }) => self.drop_member(&pubkey, &why),
                    Some(MediaCommand::Rekey(next)) => self.rekey(next)?,
                    Some(MediaCommand::Mute(muted)) => self.muted = muted,
                    None => break,
                },
                Some(a) = arrivals.recv() => self.receive(a),
                scheduled = tick.tick() => {
                    let now = Instant::now();
                    // After a stall the clock catches up in a burst: keep sending at the
                    // stream's pace, but play nothing for slots whose time has passed (the
                    // jitter buffer drains what piled up), or playout would run ahead of
                    // the peers and every later frame would arrive "late".
                    let behind = scheduled.elapsed() > Duration::from_millis(u64::from(codec.frame_ms));
                    // Muted, the source is still read (a device's buffer must not fill up)
                    // but silence is sent, so the stream keeps its pace and, under enhanced
                    // privacy, its packet size.
                    let more = source.read_frame(&mut pcm)?;
                    if self.muted {
                        pcm.iter_mut().for_each(|s| *s = 0);
                    }
                    let packet = encoder.encode(&pcm)?;
                    let frame = self
                        .sender
                        .encrypt(packet)
                        .map_err(|e| CallError::Protocol(e.to_string()))?;
                    // Sent while the relay is unreachable, a frame is dropped and counted.
                    self.local.send(seq, Bytes::copy_from_slice(frame));
                    seq += 1;
                    mix.iter_mut().for_each(|m| *m = 0);
                    for peer in self.peers.values_mut().filter(|_| !behind) {
                        peer.keys.retire(now);
                        if let Some((kind, frame)) = peer.player.next(now) {
                            for (m, s) in mix.iter_mut().zip(frame) {
                                *m += i32::from(*s);
                            }
                            let audible = frame.iter().any(|s| s.unsigned_abs() >= SILENCE_PEAK as u16);
                            if audible && matches!(kind, SlotKind::Decoded { .. } | SlotKind::Fec { .. }) {
                                peer.heard.extend(frame.iter().copied());
                                let cap = ANALYSIS_SECONDS * 48_000;
                                if peer.heard.len() > cap {
                                    let excess = peer.heard.len() - cap;
                                    peer.heard.drain(..excess);
                                }
                            }
                        }
                    }
                    for (o, m) in out.iter_mut().zip(&mix) {
                        *o = (*m).clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16;
                    }
                    if !behind {
                        sink.write_frame(&out)?;
                    }
                    if !more {
                        source_ended = true;
                        break;
                    }
                }
                _ = status.tick() => {
                    let _ = self.events.send(CallEvent::Status(self.status(started, seq)));
                }
            }
        }
        sink.finish()?;
        let mut peers: Vec<PeerReport> = self.gone.iter().map(|p| p.report(true)).collect();
        for peer in self.peers.values() {
            peer.forward.abort();
            peers.push(peer.report(true));
        }
        peers.sort_by_key(|p| p.leaf);
        Ok(MediaOutcome {
            sent: seq,
            peers,
            source_ended,
        })
    }
}

/// The signaling side of a running call: who is in it, and which epoch its keys are from.
struct Control<'a, S: MdkStorageProvider> {
    member: &'a GroupMember<S>,
    group: &'a GroupRef,
    offer: CallOffer,
    me: TrackRef,
    client: MoqClient,
    media: mpsc::UnboundedSender<MediaCommand>,
    participants: HashMap<PublicKey, TrackRef>,
    epoch: u64,
    epochs: Vec<u64>,
    ever_answered: bool,
}

impl<S: MdkStorageProvider> Control<'_, S> {
    fn add_peer(&mut self, pubkey: PublicKey, track: TrackRef) -> Result<(), CallError> {
        if pubkey == self.member.public_key() {
            return Ok(());
        }
        match self.participants.get(&pubkey) {
            Some(t) if *t == track => return Ok(()),
            // A member re-joining with a fresh track replaces its old one.
            Some(_) => self.drop_member(pubkey, "re-joined with a new track"),
            None => {}
        }
        let namespace = participant_namespace(&self.offer.namespace_hex(), &track.name_hex())?;
        let remote = self.client.subscribe(namespace, &track.name_hex());
        self.participants.insert(pubkey, track.clone());
        let _ = self.media.send(MediaCommand::AddPeer {
            pubkey,
            track,
            remote,
        });
        Ok(())
    }

    fn drop_member(&mut self, pubkey: PublicKey, why: &str) {
        if self.participants.remove(&pubkey).is_some() {
            let _ = self.media.send(MediaCommand::DropMember {
                pubkey,
                why: why.to_string(),
            });
        }
    }

    /// After a commit (or in case one was merged elsewhere): re-export the call secret,
    /// drop participants no longer in the group, and rekey the media. `Err` ends the call.
    fn follow_epoch(&mut self, on_event: &mut impl FnMut(&CallEvent)) -> Result<(), String> {
        let me = self.member.public_key();
        let leaves = self
            .member
            .leaf_map(self.group)
            .map_err(|e| format!("reading the group: {e}"))?;
        if !leaves.values().any(|pk| *pk == me) {
            return Err("removed_from_group".into());
        }
        let next = export(self.member, self.group, &self.offer.call_id)
            .map_err(|_| "removed_from_group".to_string())?;
        if next.epoch == self.epoch {
            return Ok(());
        }
        let gone: Vec<PublicKey> = self
            .participants
            .iter()
            .filter(|(pk, t)| leaves.get(&t.leaf_index) != Some(*pk))
            .map(|(pk, _)| *pk)
            .collect();
        for pk in gone {
            self.drop_member(pk, "removed from the group");
        }
        self.epoch = next.epoch;
        self.epochs.push(next.epoch);
        let _ = self.media.send(MediaCommand::Rekey(next));
        on_event(&CallEvent::Rekeyed { epoch: self.epoch });
        Ok(())
    }

    /// A signaling message that arrived during the call. Returns why the call ends, if it
    /// does.
    fn on_rumor(
        &mut self,
        sender: PublicKey,
        kind: Kind,
        tags: &Tags,
        on_event: &mut impl FnMut(&CallEvent),
    ) -> Option<String> {
        let leaves = self.member.leaf_map(self.group).unwrap_or_default();
        let owns = |t: &TrackRef| leaves.get(&t.leaf_index) == Some(&sender);
        if kind == KIND_ANSWER {
            match CallAnswer::from_rumor(kind, tags) {
                Ok(a) if a.call_id == self.offer.call_id => {
                    if a.status != AnswerStatus::Accept {
                        on_event(&CallEvent::PeerDeclined {
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
                        if !owns(&t) {
                            tracing::warn!(
                                "{} answered with a leaf that is not theirs",
                                npub(&sender)
                            );
                        } else {
                            self.ever_answered = true;
                            if let Err(e) = self.add_peer(sender, t) {
                                tracing::warn!("adding {}: {e}", npub(&sender));
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("malformed answer from {}: {e}", npub(&sender)),
            }
        } else if kind == KIND_STATE {
            match CallState::from_rumor(kind, tags) {
                Ok(s) if s.call_id == self.offer.call_id => match s.action {
                    StateAction::Leave => self.drop_member(sender, "left"),
                    StateAction::End => return Some("ended_by_peer".into()),
                    StateAction::Other(action) if self.participants.contains_key(&sender) => {
                        let muted = match action.as_str() {
                            "mute_audio" => Some(true),
                            "unmute_audio" => Some(false),
                            _ => None,
                        };
                        if let Some(muted) = muted {
                            on_event(&CallEvent::PeerMuted {
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
                if o.call_id == self.offer.call_id && sender != self.member.public_key() {
                    tracing::warn!(
                        "{} re-sent this call's offer; a reused call id is rejected",
                        npub(&sender)
                    );
                }
            }
        }
        None
    }

    /// After a commit that added members: the participant with the lowest leaf re-announces
    /// the call (`call_info`), with every participant's track, so they can join it.
    async fn announce_call_info(&self, before: &BTreeMap<u32, PublicKey>) {
        let Ok(now) = self.member.leaf_map(self.group) else {
            return;
        };
        if !now.keys().any(|leaf| !before.contains_key(leaf)) {
            return;
        }
        let lowest = self
            .participants
            .values()
            .map(|t| t.leaf_index)
            .chain([self.me.leaf_index])
            .min();
        if lowest != Some(self.me.leaf_index) {
            return;
        }
        let mut participants: Vec<TrackRef> = self.participants.values().cloned().collect();
        participants.push(self.me.clone());
        let state = CallState {
            call_id: self.offer.call_id,
            action: StateAction::CallInfo {
                offer: Box::new(self.offer.clone()),
                participants,
            },
        };
        if let Err(e) = self.member.send_rumor(self.group, state.to_rumor()).await {
            tracing::warn!("re-announcing the call: {e}");
        }
    }
}

/// Takes part in a call of `group` until [`UserCommand::Leave`] (or the sender of
/// `commands` is dropped), the duration passes, the source ends, or the call ends.
/// `resume` is where catching up on the group stands; the returned one covers every group
/// event processed during the call.
#[allow(clippy::too_many_arguments)]
pub async fn run<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    group: &GroupRef,
    resume: Resume,
    opts: &JoinOptions,
    source: Box<dyn AudioSource>,
    sink: Box<dyn AudioSink>,
    mut commands: mpsc::UnboundedReceiver<UserCommand>,
    mut on_event: impl FnMut(&CallEvent),
) -> Result<(CallReport, Resume), CallError> {
    // Listen before catching up, so nothing published in between is missed; events seen
    // both ways are processed once.
    let mut events = member.group_events(group, Timestamp::now()).await?;
    let mls_group = member
        .mdk()
        .get_group(&group.mls_group_id)
        .map_err(GroupError::from)?
        .ok_or(GroupError::GroupNotFound)?;
    let (since, seen) = resume.unzip();
    let sync = member
        .sync_group(&mls_group, since, &seen.unwrap_or_default())
        .await?;
    let mut cursor = sync.cursor.clone();
    let mut processed: HashSet<EventId> = sync.seen_ids.iter().copied().collect();

    let leaves = member.leaf_map(group)?;
    let own_leaf = member
        .mdk()
        .own_leaf_index(&group.mls_group_id)
        .map_err(GroupError::from)?;
    let calls = calls_from_history(&history(member, group)?, &leaves);
    let chosen = choose_call(&calls, &opts.target, Timestamp::now())?.cloned();
    let me = TrackRef {
        name: random(),
        leaf_index: own_leaf,
    };
    let started_call = chosen.is_none();
    let (offer, participants) = match chosen {
        Some(call) => (call.offer, call.participants),
        None => {
            let moq_url = opts.moq_relay.clone().ok_or_else(|| {
                CallError::Protocol(
                    "starting a call needs a MoQ relay: pass --moq-relay or set moq_relay in \
                     config.toml"
                        .into(),
                )
            })?;
            let max_leaf = leaves.keys().copied().max().unwrap_or(0);
            let offer = CallOffer {
                call_id: random(),
                moq_url,
                namespace: random(),
                token: random(),
                track: me.clone(),
                frame_ms: opts.frame_ms,
                sender_bits: KidLayout::for_max_leaf(max_leaf).sender_bits(),
                privacy: opts.privacy,
            };
            (offer, BTreeMap::new())
        }
    };
    let layout =
        KidLayout::new(offer.sender_bits).map_err(crate::media::sframe::FrameError::from)?;
    layout.kid(MediaType::Audio, own_leaf, 0).map_err(|_| {
        CallError::Protocol(format!(
            "our leaf {own_leaf} does not fit the call's {} sender bits; start a new call",
            offer.sender_bits
        ))
    })?;
    let epoch = export(member, group, &offer.call_id)?;
    let store = match &opts.counters {
        Some(dir) => Some((
            CounterStore::open(dir)
                .map_err(|e| CallError::Protocol(format!("counter store: {e}")))?,
            offer.call_id,
        )),
        None => None,
    };
    let sender = SenderKeyring::new(
        layout,
        MediaType::Audio,
        own_leaf,
        epoch.epoch,
        &epoch.secret,
        store,
    )
    .map_err(|e| CallError::Protocol(e.to_string()))?;
    let codec = match offer.privacy {
        Privacy::Enhanced => CodecConfig::enhanced(offer.frame_ms),
        Privacy::Standard => CodecConfig {
            frame_ms: offer.frame_ms,
            ..CodecConfig::default()
        },
    };

    // Media first, then signaling: peers that hear of us can subscribe at once.
    let (client, driver) = MoqClient::new(
        ClientConfig::new(
            offer.moq_url.clone(),
            opts.verification.clone(),
            Some(offer.token.to_vec()),
        )
        .with_token_policy(opts.relay_token),
    );
    let driver = tokio::spawn(driver);
    let mut local = client.publish(
        participant_namespace(&offer.namespace_hex(), &me.name_hex())?,
        &me.name_hex(),
    );
    tokio::time::timeout(Duration::from_secs(10), local.announced())
        .await
        .map_err(|_| {
            CallError::Protocol("the MoQ relay did not accept our track within 10 s".into())
        })??;
    if started_call {
        member.send_rumor(group, offer.to_rumor()).await?;
        on_event(&CallEvent::Started {
            call_id: hex::encode(offer.call_id),
        });
    } else {
        member
            .send_rumor(
                group,
                CallAnswer::accept(offer.call_id, me.clone()).to_rumor(),
            )
            .await?;
        on_event(&CallEvent::Joined {
            call_id: hex::encode(offer.call_id),
            participants: participants.len(),
        });
    }

    let (media_commands, command_rx) = mpsc::unbounded_channel();
    let (arrivals, arrival_rx) = mpsc::unbounded_channel();
    let (media_events, mut media_event_rx) = mpsc::unbounded_channel();
    let (stop_media, stop_media_rx) = watch::channel(false);
    let media = Media {
        layout,
        codec,
        epoch: epoch.clone(),
        sender,
        local,
        peers: HashMap::new(),
        gone: Vec::new(),
        arrivals,
        events: media_events,
        muted: false,
    };
    let mut control = Control {
        member,
        group,
        offer,
        me,
        client,
        media: media_commands,
        participants: HashMap::new(),
        epoch: epoch.epoch,
        epochs: vec![epoch.epoch],
        ever_answered: false,
    };
    // Queued for the media task before it starts, so a failure here leaves no thread.
    for (pk, track) in participants {
        control.add_peer(pk, track)?;
    }
    // Audio gets a thread of its own: MLS work on the caller's runtime (synchronous, tens of
    // milliseconds for a commit) must never hold up a frame.
    let (media_done, mut media_task) = oneshot::channel();
    let media_future = media.run(source, sink, command_rx, arrival_rx, stop_media_rx);
    std::thread::Builder::new()
        .name("call-media".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(media_future),
                Err(e) => Err(CallError::Protocol(format!(
                    "starting the media runtime: {e}"
                ))),
            };
            let _ = media_done.send(result);
        })
        .map_err(|e| CallError::Protocol(format!("starting the media thread: {e}")))?;

    let started = Instant::now();
    let until = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let ring_until = (started_call && !opts.ring_timeout.is_zero())
        .then(|| tokio::time::Instant::now() + opts.ring_timeout);
    let mut epoch_check = tokio::time::interval(Duration::from_secs(5));
    epoch_check.tick().await;
    let mut media_result = None;
    let ended_by = loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(UserCommand::Mute(muted)) => {
                    let _ = control.media.send(MediaCommand::Mute(muted));
                    on_event(&CallEvent::Muted { muted });
                    let state = CallState {
                        call_id: control.offer.call_id,
                        action: StateAction::Other(
                            if muted { "mute_audio" } else { "unmute_audio" }.into(),
                        ),
                    };
                    if let Err(e) = member.send_rumor(group, state.to_rumor()).await {
                        tracing::warn!("telling the group about the mute: {e}");
                    }
                }
                Some(UserCommand::Leave) | None => break "stopped".to_string(),
            },
            () = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => break "duration".to_string(),
            () = async {
                match ring_until {
                    Some(t) if !control.ever_answered => tokio::time::sleep_until(t).await,
                    _ => std::future::pending().await,
                }
            } => break "no_answer".to_string(),
            Some(e) = media_event_rx.recv() => on_event(&e),
            res = &mut media_task => {
                let ended = match &res {
                    Ok(Ok(o)) if o.source_ended => "source_ended".to_string(),
                    Ok(Ok(_)) => "stopped".to_string(),
                    Ok(Err(e)) => format!("media failed: {e}"),
                    Err(_) => "media thread failed".to_string(),
                };
                media_result = Some(res);
                break ended;
            }
            event = events.next() => {
                let Some(event) = event else {
                    break "stopped".to_string();
                };
                if !processed.insert(event.id) {
                    continue;
                }
                let before = member.leaf_map(group).unwrap_or_default();
                let outcome = member.process_group_event(events.h_tag(), &event).await;
                crate::group::advance_cursor(&mut cursor, event.created_at, event.id);
                match outcome {
                    GroupEventOutcome::Message(r) => {
                        if let Some(why) = control.on_rumor(r.sender, r.kind, &r.tags, &mut on_event) {
                            break why;
                        }
                    }
                    GroupEventOutcome::Commit | GroupEventOutcome::CommittedProposal(..) => {
                        if let GroupEventOutcome::CommittedProposal(id, at) = outcome {
                            processed.insert(id);
                            crate::group::advance_cursor(&mut cursor, at, id);
                        }
                        if let Err(why) = control.follow_epoch(&mut on_event) {
                            break why;
                        }
                        control.announce_call_info(&before).await;
                    }
                    GroupEventOutcome::PendingProposal => {}
                    GroupEventOutcome::Ignored(why) => {
                        tracing::debug!(id = %event.id, "group event ignored: {why}");
                    }
                }
            }
            _ = epoch_check.tick() => {
                // A commit merged outside this session (another command of the same user)
                // produces no group event here; catch the new epoch this way.
                if let Err(why) = control.follow_epoch(&mut on_event) {
                    break why;
                }
            }
        }
    };

    let _ = stop_media.send(true);
    let media_result = match media_result {
        Some(r) => r,
        None => media_task.await,
    };
    while let Ok(e) = media_event_rx.try_recv() {
        on_event(&e);
    }
    // Say goodbye (best effort: the call is over for us either way).
    if ended_by != "removed_from_group" {
        let action = if ended_by == "no_answer" {
            StateAction::End
        } else {
            StateAction::Leave
        };
        let bye = CallState {
            call_id: control.offer.call_id,
            action,
        };
        match tokio::time::timeout(FAREWELL_TIMEOUT, member.send_rumor(group, bye.to_rumor())).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("telling the group we left: {e}"),
            Err(_) => tracing::warn!("telling the group we left: no relay answered in time"),
        }
    }
    let media = media_result
        .map_err(|_| CallError::Protocol("the media thread ended without a result".into()))??;
    let relay_rtt_ms = control.client.rtt().map(|d| d.as_secs_f64() * 1000.0);
    let report = CallReport {
        call_id: hex::encode(control.offer.call_id),
        started: started_call,
        seconds: started.elapsed().as_secs_f64(),
        epochs: control.epochs.clone(),
        sent: media.sent,
        ended_by,
        relay_rtt_ms,
        peers: media.peers,
    };
    drop(control);
    let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
    Ok((report, cursor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr_sdk::prelude::Keys;

    fn offer(call_id: u8, leaf: u32) -> CallOffer {
        CallOffer {
            call_id: [call_id; 32],
            moq_url: Url::parse("moqt://127.0.0.1:4443").unwrap(),
            namespace: [2; 16],
            token: [3; 32],
            track: TrackRef {
                name: [leaf as u8; 8],
                leaf_index: leaf,
            },
            frame_ms: 20,
            sender_bits: 4,
            privacy: Privacy::Standard,
        }
    }

    fn msg(sender: &Keys, rumor: nostr_sdk::prelude::EventBuilder, at: u64) -> SignalMessage {
        let r = rumor.build(sender.public_key());
        SignalMessage {
            sender: sender.public_key(),
            kind: r.kind,
            tags: r.tags,
            created_at: Timestamp::from(at),
        }
    }

    fn track(leaf: u32) -> TrackRef {
        TrackRef {
            name: [leaf as u8 + 100; 8],
            leaf_index: leaf,
        }
    }

    #[test]
    fn history_gives_running_calls_their_participants_and_rejects_reused_ids() {
        let (a, b, c) = (Keys::generate(), Keys::generate(), Keys::generate());
        let leaves: BTreeMap<u32, PublicKey> = [
            (0, a.public_key()),
            (1, b.public_key()),
            (2, c.public_key()),
        ]
        .into();
        let history = vec![
            msg(&a, offer(1, 0).to_rumor(), 100),
            msg(&b, CallAnswer::accept([1; 32], track(1)).to_rumor(), 101),
            // c claims a's leaf: ignored.
            msg(&c, CallAnswer::accept([1; 32], track(0)).to_rumor(), 102),
            // A second offer with the same call id, from c: rejected.
            msg(&c, offer(1, 2).to_rumor(), 103),
            msg(
                &a,
                CallState {
                    call_id: [1; 32],
                    action: StateAction::Leave,
                }
                .to_rumor(),
                104,
            ),
            // Another call, ended.
            msg(&c, offer(9, 2).to_rumor(), 105),
            msg(
                &c,
                CallState {
                    call_id: [9; 32],
                    action: StateAction::End,
                }
                .to_rumor(),
                106,
            ),
        ];
        let calls = calls_from_history(&history, &leaves);
        assert_eq!(calls.len(), 2);
        let first = &calls[0];
        assert_eq!(first.offer.track.leaf_index, 0, "the first offer stands");
        assert_eq!(
            first.participants.keys().copied().collect::<Vec<_>>(),
            vec![b.public_key()],
            "a left, c's forged leaf was ignored"
        );
        assert_eq!(first.last_activity, Timestamp::from(104));
        assert!(calls[1].ended);

        let now = Timestamp::from(200);
        let chosen = choose_call(&calls, &CallTarget::Auto, now)
            .unwrap()
            .unwrap();
        assert_eq!(chosen.offer.call_id, [1; 32]);
        assert!(choose_call(&calls, &CallTarget::New, now)
            .unwrap()
            .is_none());
        assert!(
            choose_call(&calls, &CallTarget::Id("0909".into()), now).is_err(),
            "ended"
        );
        assert!(choose_call(&calls, &CallTarget::Id("ffff".into()), now).is_err());
        let stale = Timestamp::from(104 + STALE_CALL.as_secs());
        assert!(choose_call(&calls, &CallTarget::Auto, stale)
            .unwrap()
            .is_none());
        assert!(choose_call(&calls, &CallTarget::Id("01".into()), stale)
            .unwrap()
            .is_some());
    }

    #[test]
    fn within_one_second_a_leave_counts_after_its_offer_whatever_the_store_order() {
        let a = Keys::generate();
        let leaves: BTreeMap<u32, PublicKey> = [(0, a.public_key())].into();
        let leave = CallState {
            call_id: [1; 32],
            action: StateAction::Leave,
        };
        // The store returned the leave first (same second).
        let calls = calls_from_history(
            &[
                msg(&a, leave.to_rumor(), 100),
                msg(&a, offer(1, 0).to_rumor(), 100),
            ],
            &leaves,
        );
        assert_eq!(calls.len(), 1);
        assert!(!calls[0].running(), "the caller left: {:?}", calls[0]);
    }

    #[test]
    fn call_info_lets_a_member_added_mid_call_find_it() {
        let (a, b, d) = (Keys::generate(), Keys::generate(), Keys::generate());
        let leaves: BTreeMap<u32, PublicKey> = [
            (0, a.public_key()),
            (1, b.public_key()),
            (3, d.public_key()),
        ]
        .into();
        let info = CallState {
            call_id: [5; 32],
            action: StateAction::CallInfo {
                offer: Box::new(offer(5, 0)),
                participants: vec![track(0), track(1), track(7)],
            },
        };
        let calls = calls_from_history(&[msg(&a, info.to_rumor(), 50)], &leaves);
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].participants.len(),
            2,
            "leaf 7 is nobody's: skipped"
        );
        assert!(choose_call(&calls, &CallTarget::Auto, Timestamp::from(60))
            .unwrap()
            .is_some());
    }
}
