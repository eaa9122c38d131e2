//! `call join`'s driver: finds the group's running call or starts one, then runs the
//! sans-IO [`CallEngine`] against the real world: MDK and the Nostr relays on the control
//! side (group events in, rumors out), MoQ and the audio devices on a media thread of its
//! own (MLS work, tens of milliseconds per commit, never holds up a frame). `call demo`
//! runs N of these drivers; nothing else takes part in calls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mdk_storage_traits::MdkStorageProvider;
use nostr_sdk::prelude::{EventId, Kind, PublicKey, Tags, Timestamp};
use tokio::sync::{mpsc, oneshot};
use url::Url;

pub use super::engine::{
    npub, CallEvent, CallReport, CallStatus, EndReason, GroupEventCounts, PeerReport, RelayState,
    UserCommand, STATUS_INTERVAL,
};
use super::engine::{CallEngine, EngineConfig, Input, Output};
use super::probe::{probe_calls, Liveness, ProbeOptions};
use super::signaling::{
    AnswerStatus, CallAnswer, CallOffer, CallState, Privacy, StateAction, TrackRef, KIND_ANSWER,
    KIND_OFFER, KIND_STATE,
};
use super::timing::{ms_between, FrameRecords};
use super::{random, CallError};
use crate::group::{GroupError, GroupEventOutcome, GroupEvents, GroupMember, GroupRef, Resume};
use crate::media::io::{AudioEvent, AudioIn, AudioIo, AudioIoReport, AudioOut};
use crate::media::keyring::CounterStore;
use crate::media::keys::{CallSecret, KidLayout};
use crate::transport::{
    participant_namespace, CertVerification, ClientConfig, Delivery, LocalTrack, MoqClient,
    TokenPolicy,
};

/// A call whose last signaling is older than this is not joined without `--call`: its
/// participants most likely crashed without saying `leave`.
pub const STALE_CALL: Duration = Duration::from_secs(12 * 3600);
/// PROTOCOL.md §2: a started call nobody answers ends after this long.
pub const RING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a rumor (an answer, a mute, a leave) may take to reach a relay.
const RUMOR_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the MoQ relay may take to accept our track.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Inputs from the control side waiting for the media thread.
const CONTROL_QUEUE: usize = 256;
/// Frames from every peer's track waiting for the engine.
const ARRIVAL_QUEUE: usize = 1024;
/// How often the relay's round-trip time is handed to the engine.
const RTT_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Reach the call's MoQ relay at this address instead of the offer's (a benchmark's
    /// impaired path in front of it). The relay's name is then not checked: use a
    /// fingerprint.
    pub moq_through: Option<Url>,
    /// Keep per-frame times in the report's `records` (runs that join them across
    /// participants in one process).
    pub record_frames: bool,
    /// Whether the relay token is presented (docs/protocol.md §4).
    pub relay_token: TokenPolicy,
    /// Leave once everyone else has left (`call listen --answer`: back to waiting).
    pub leave_when_alone: bool,
    /// How often a status event comes ([`STATUS_INTERVAL`]; a live screen wants more).
    pub status_interval: Duration,
    /// How our frames travel in a call we start ([`Delivery::Stream`] when `None`); a
    /// joined call uses the delivery its offer names.
    pub delivery: Option<Delivery>,
    /// Where offers of *other* calls in the group, arriving while we are in this one, are
    /// handed (`call listen` answers them `busy`); at most [`OTHER_OFFERS_QUEUE`] wait,
    /// later ones are logged and dropped. `None`: they are only logged.
    pub other_offers: Option<mpsc::Sender<crate::group::Rumor>>,
}

/// Offers of other calls waiting for whoever takes them ([`JoinOptions::other_offers`]).
pub const OTHER_OFFERS_QUEUE: usize = 64;

impl JoinOptions {
    /// Options for a call through `moq_relay`, with every other setting at its default.
    pub fn new(moq_relay: Option<Url>, verification: CertVerification) -> Self {
        Self {
            target: CallTarget::Auto,
            moq_relay,
            verification,
            privacy: Privacy::Standard,
            frame_ms: 20,
            duration: None,
            ring_timeout: RING_TIMEOUT,
            counters: None,
            moq_through: None,
            record_frames: false,
            relay_token: TokenPolicy::Auto,
            leave_when_alone: false,
            status_interval: STATUS_INTERVAL,
            delivery: None,
            other_offers: None,
        }
    }
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
                [one] if one.ended => Err(CallError::CallEnded(one.id_hex())),
                [one] => Ok(Some(one)),
                [] => Err(CallError::NoSuchCall(prefix)),
                _ => Err(CallError::AmbiguousCall {
                    prefix,
                    count: matches.len(),
                }),
            }
        }
    }
}

/// The call `call join` without `--call` takes: the newest joinable call (signaled in the
/// last 12 h, not ended, someone in it) in which somebody is alive on the relay
/// ([`super::probe`]); `None` (start one) if there is none. Calls whose relay cannot be
/// reached are not joined either: nobody could be heard there.
pub async fn live_call(calls: &[KnownCall], opts: &JoinOptions) -> Option<KnownCall> {
    let candidates: Vec<&KnownCall> = calls
        .iter()
        .filter(|c| c.joinable(Timestamp::now()))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let probe = ProbeOptions {
        verification: opts.verification.clone(),
        relay_token: opts.relay_token,
        through: opts.moq_through.clone(),
    };
    let found = probe_calls(&candidates, &probe).await;
    let mut alive: Vec<&KnownCall> = Vec::new();
    for (call, liveness) in candidates.iter().zip(&found) {
        match liveness {
            Liveness::Alive => alive.push(call),
            other => tracing::info!(
                call = %call.id_hex(),
                "not joining: nobody alive in it ({})",
                match other {
                    Liveness::Unreachable(why) => format!("relay: {why}"),
                    _ => "no frames on its participants' tracks".into(),
                }
            ),
        }
    }
    alive.into_iter().max_by_key(|c| c.offered_at).cloned()
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

/// What the control side (group events, the user) tells the media thread.
enum ControlInput {
    Rumor {
        sender: PublicKey,
        kind: Kind,
        tags: Tags,
    },
    Epoch {
        epoch: u64,
        secret: CallSecret,
        leaves: BTreeMap<u32, PublicKey>,
    },
    Removed,
    Command(UserCommand),
}

impl ControlInput {
    fn as_input(&self) -> Input<'_> {
        match self {
            Self::Rumor { sender, kind, tags } => Input::Rumor {
                sender: *sender,
                kind: *kind,
                tags,
            },
            Self::Epoch {
                epoch,
                secret,
                leaves,
            } => Input::Epoch {
                epoch: *epoch,
                secret: secret.clone(),
                leaves: leaves.clone(),
            },
            Self::Removed => Input::Removed,
            Self::Command(c) => Input::Command(*c),
        }
    }
}

/// What the media thread hands the control side. Every message answers an input from the
/// control side, a status tick or the end of the call, so the engine bounds their rate.
enum MediaMessage {
    Rumor(nostr_sdk::prelude::EventBuilder),
    Event(CallEvent),
    /// The farewell, if any, was sent before this.
    Ended,
}

/// What the media thread leaves behind.
struct MediaResult {
    report: CallReport,
    records: Option<FrameRecords>,
    audio: AudioIoReport,
    first_audio_at: Option<Instant>,
}

/// A frame from one peer's track: (track name, sequence, payload).
type Arrival = ([u8; 8], u64, Bytes);

/// Runs the engine with the audio devices and the MoQ tracks until the call ends.
async fn media_loop(
    mut engine: CallEngine,
    mut audio: AudioIo,
    client: MoqClient,
    local: LocalTrack,
    mut from_control: mpsc::Receiver<ControlInput>,
    to_control: mpsc::UnboundedSender<MediaMessage>,
) -> Result<MediaResult, CallError> {
    let namespace = engine.offer().namespace_hex();
    let (arrival_tx, mut arrivals) = mpsc::channel::<Arrival>(ARRIVAL_QUEUE);
    let mut forwards: HashMap<[u8; 8], tokio::task::JoinHandle<()>> = HashMap::new();
    let mut rtt = tokio::time::interval(RTT_INTERVAL);
    let result = loop {
        let mut ended = None;
        while let Some(out) = engine.poll_output() {
            match out {
                // Sent while the relay is unreachable, a frame is dropped and counted.
                Output::Publish(f) => {
                    local.send(f.seq, f.payload);
                }
                Output::Subscribe { track, .. } => {
                    let name = track.name_hex();
                    let mut remote =
                        client.subscribe(participant_namespace(&namespace, &name)?, &name);
                    let tx = arrival_tx.clone();
                    let key = track.name;
                    let forward = tokio::spawn(async move {
                        while let Ok((seq, payload)) = remote.next().await {
                            if tx.send((key, seq, payload)).await.is_err() {
                                break;
                            }
                        }
                    });
                    if let Some(old) = forwards.insert(track.name, forward) {
                        old.abort();
                    }
                }
                Output::Unsubscribe { track } => {
                    if let Some(f) = forwards.remove(&track) {
                        f.abort();
                    }
                }
                Output::Rumor(r) => {
                    let _ = to_control.send(MediaMessage::Rumor(r));
                }
                Output::Play(pcm) => audio.play(&pcm)?,
                Output::Trim(by) => audio.trim(by),
                Output::Event(e) => {
                    let _ = to_control.send(MediaMessage::Event(e));
                }
                Output::Ended(reason) => ended = Some(reason),
            }
        }
        if let Some(reason) = ended {
            tracing::debug!("call ended: {reason}");
            let _ = to_control.send(MediaMessage::Ended);
            break Ok(());
        }
        let timeout = engine.poll_timeout();
        let handled = tokio::select! {
            biased;
            input = from_control.recv() => match input {
                Some(input) => engine.handle(input.as_input(), Instant::now()),
                None => engine.handle(Input::Command(UserCommand::Leave), Instant::now()),
            },
            // Arrivals before the clock: a frame that is here is pushed before its slot plays.
            Some((track, seq, payload)) = arrivals.recv() => engine.handle(
                Input::Frame { track, seq, payload: &payload },
                Instant::now(),
            ),
            event = audio.next() => match event {
                Ok(AudioEvent::Captured(f)) => engine.handle(
                    Input::Captured { pcm: &f.pcm, captured_at: f.captured_at },
                    Instant::now(),
                ),
                Ok(AudioEvent::PlayoutDue { play_at }) => {
                    engine.handle(Input::PlayoutDue { play_at }, Instant::now())
                }
                Ok(AudioEvent::SourceEnded) => engine.handle(Input::SourceEnded, Instant::now()),
                Err(e) => break Err(CallError::from(e)),
            },
            () = async {
                match timeout {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => engine.handle(Input::Timeout, Instant::now()),
            _ = rtt.tick() => engine.handle(Input::RelayRtt(client.rtt()), Instant::now()),
            // The client gave up (e.g. the relay came back with another certificate): it
            // will never connect again, so the call cannot go on. Say why.
            e = client.failed() => break Err(CallError::from(e)),
        };
        if let Err(e) = handled {
            break Err(CallError::from(e));
        }
    };
    for f in forwards.into_values() {
        f.abort();
    }
    let audio_report = audio.finish();
    result?;
    let now = Instant::now();
    let mut report = engine.report(now);
    report.relay_rtt_ms = client.rtt().map(super::timing::ms);
    Ok(MediaResult {
        first_audio_at: engine.first_audio_at(),
        records: engine.take_records(),
        audio: audio_report?,
        report,
    })
}

/// An offer that arrived during the call: one of another call goes to
/// [`JoinOptions::other_offers`] (ours is the engine's: a re-sent offer of this call).
fn hand_over_offer(opts: &JoinOptions, call_id: &[u8; 32], rumor: &crate::group::Rumor) {
    let Some(to) = &opts.other_offers else {
        return;
    };
    match CallOffer::from_rumor(rumor.kind, &rumor.tags) {
        Ok(o) if o.call_id == *call_id => {}
        Ok(o) => {
            if to.try_send(rumor.clone()).is_err() {
                tracing::warn!(
                    call = %hex::encode(o.call_id),
                    "another call's offer during this call not handed over (queue full or closed)"
                );
            }
        }
        Err(e) => tracing::debug!("skipping an offer: {e}"),
    }
}

/// The call secret and members of the group's current epoch, as the engine takes them.
fn epoch_input<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    group: &GroupRef,
    call_id: &[u8; 32],
) -> ControlInput {
    let leaves = match member.leaf_map(group) {
        Ok(l) => l,
        Err(_) => return ControlInput::Removed,
    };
    match member.export_call_secret(group, call_id) {
        Ok(e) => ControlInput::Epoch {
            epoch: e.epoch,
            secret: e.secret,
            leaves,
        },
        // No exporter secret for us: we are not in the group any more.
        Err(_) => ControlInput::Removed,
    }
}

/// A finished call: the report, and where catching up on the group stands.
pub struct Session {
    pub report: CallReport,
    /// Covers every group event processed during the call.
    pub cursor: Resume,
    /// Per-frame times, when [`JoinOptions::record_frames`] asked for them.
    pub records: Option<FrameRecords>,
    /// Our track's name.
    pub track: [u8; 8],
}

/// Takes part in a call of `group` until [`UserCommand::Leave`] (or the sender of
/// `commands` is dropped), the duration passes, the source ends, or the call ends.
/// `resume` is where catching up on the group stands.
#[allow(clippy::too_many_arguments)]
pub async fn run<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    group: &GroupRef,
    resume: Resume,
    opts: &JoinOptions,
    input: AudioIn,
    output: AudioOut,
    commands: mpsc::UnboundedReceiver<UserCommand>,
    on_event: impl FnMut(&CallEvent),
) -> Result<(CallReport, Resume), CallError> {
    let s = run_session(
        member, group, resume, opts, input, output, commands, on_event,
    )
    .await?;
    Ok((s.report, s.cursor))
}

/// [`run`], giving back everything the session measured.
#[allow(clippy::too_many_arguments)]
pub async fn run_session<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    group: &GroupRef,
    resume: Resume,
    opts: &JoinOptions,
    input: AudioIn,
    output: AudioOut,
    mut commands: mpsc::UnboundedReceiver<UserCommand>,
    mut on_event: impl FnMut(&CallEvent),
) -> Result<Session, CallError> {
    let began = Instant::now();
    // Listen before catching up, from the catch-up's cursor, so nothing published in
    // between is missed (an event stamped before now may reach the relay after the
    // catch-up's fetch); events seen both ways are processed once.
    let mut events = member
        .group_events(group, crate::group::live_since([&resume]))
        .await?;
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
    // Counted for the status and the report: the catch-up's, then each live event's. The
    // gate's counters (forged and oversized events refused before they reach us) cover
    // the whole client; only what it refuses from now on is this session's (the catch-up's
    // own share is in `sync.dropped` already).
    let mut counted = GroupEventCounts {
        processed: sync.messages.len()
            + sync.commits
            + sync.committed_proposals
            + sync.pending_proposals,
        dropped: sync.dropped,
    };
    let gate_before = member.refused_at_gate();
    let counts = |counted: &GroupEventCounts, events: &GroupEvents| {
        let mut c = *counted;
        c.dropped.add(&member.refused_at_gate().since(&gate_before));
        c.dropped.future_dated += events.held_back();
        c
    };

    let leaves = member.leaf_map(group)?;
    let own_leaf = member
        .mdk()
        .own_leaf_index(&group.mls_group_id)
        .map_err(GroupError::from)?;
    let calls = calls_from_history(&history(member, group)?, &leaves);
    let chosen = match &opts.target {
        CallTarget::Auto => live_call(&calls, opts).await,
        target => choose_call(&calls, target, Timestamp::now())?.cloned(),
    };
    let me = TrackRef {
        name: random(),
        leaf_index: own_leaf,
    };
    let started_call = chosen.is_none();
    let (offer, participants) = match chosen {
        Some(call) => {
            // A running call keeps the relay its offer names; say so rather than ignore
            // the one asked for in silence.
            if let Some(asked) = opts
                .moq_relay
                .as_ref()
                .filter(|u| **u != call.offer.moq_url)
            {
                tracing::warn!(
                    "joining the running call on {}; the MoQ relay {asked} is not used (use --new to start a call there)",
                    call.offer.moq_url
                );
            }
            if let Some(asked) = opts.delivery.filter(|d| *d != call.offer.delivery) {
                tracing::warn!(
                    "joining the running call with its {} delivery; {asked} is for a call we start (--new)",
                    call.offer.delivery
                );
            }
            (call.offer, call.participants)
        }
        None => {
            let moq_url = opts.moq_relay.clone().ok_or(CallError::NoMoqRelay)?;
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
                delivery: opts.delivery.unwrap_or_default(),
            };
            (offer, BTreeMap::new())
        }
    };
    let epoch = member.export_call_secret(group, &offer.call_id)?;
    let counters = match &opts.counters {
        Some(dir) => Some(CounterStore::open(dir).map_err(CallError::CounterStore)?),
        None => None,
    };

    // Media first, then signaling: peers that hear of us can subscribe at once.
    let relay = opts.moq_through.clone().unwrap_or(offer.moq_url.clone());
    let (client, driver) = MoqClient::new(
        ClientConfig::new(relay, opts.verification.clone(), Some(offer.token.to_vec()))
            .with_token_policy(opts.relay_token),
    );
    let driver = tokio::spawn(driver);
    let mut local = client.publish_with(
        participant_namespace(&offer.namespace_hex(), &me.name_hex())?,
        &me.name_hex(),
        offer.delivery,
    );
    tokio::time::timeout(ANNOUNCE_TIMEOUT, local.announced())
        .await
        .map_err(|_| CallError::AnnounceTimeout(ANNOUNCE_TIMEOUT))??;

    let frame_ms = offer.frame_ms;
    let call_id = offer.call_id;
    let mut engine = CallEngine::new(
        EngineConfig {
            offer,
            me: me.clone(),
            my_pubkey: member.public_key(),
            started: started_call,
            participants,
            epoch: epoch.epoch,
            secret: epoch.secret,
            leaves,
            ring_timeout: Some(opts.ring_timeout),
            duration: opts.duration,
            counters,
            record_frames: opts.record_frames,
            leave_when_alone: opts.leave_when_alone,
            status_interval: opts.status_interval,
        },
        Instant::now(),
    )?;
    let audio = AudioIo::new(input, output, frame_ms);
    engine.set_playout_rule(audio.playout_rule());

    let (to_media, from_control) = mpsc::channel(CONTROL_QUEUE);
    let (to_control, mut from_media) = mpsc::unbounded_channel();
    let (media_done, media_result) = oneshot::channel();
    std::thread::Builder::new()
        .name("call-media".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(media_loop(
                    engine,
                    audio,
                    client,
                    local,
                    from_control,
                    to_control,
                )),
                Err(e) => Err(CallError::MediaThread(e.to_string())),
            };
            let _ = media_done.send(result);
        })
        .map_err(|e| CallError::MediaThread(e.to_string()))?;

    let mut last_epoch = epoch.epoch;
    let mut epoch_check = tokio::time::interval(Duration::from_secs(5));
    epoch_check.tick().await;
    let mut commands_open = true;
    loop {
        let input = tokio::select! {
            message = from_media.recv() => match message {
                Some(MediaMessage::Rumor(rumor)) => {
                    match tokio::time::timeout(RUMOR_TIMEOUT, member.send_rumor(group, rumor)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!("sending a call message: {e}"),
                        Err(_) => tracing::warn!("sending a call message: no relay answered in time"),
                    }
                    continue;
                }
                Some(MediaMessage::Event(mut e)) => {
                    if let CallEvent::Status(s) = &mut e {
                        s.group_events = counts(&counted, &events);
                    }
                    on_event(&e);
                    continue;
                }
                // Over (or the media thread is gone): its result says which.
                Some(MediaMessage::Ended) | None => break,
            },
            cmd = commands.recv(), if commands_open => match cmd {
                Some(c) => ControlInput::Command(c),
                None => {
                    commands_open = false;
                    ControlInput::Command(UserCommand::Leave)
                }
            },
            event = events.next() => {
                let Some(event) = event else {
                    // The relays closed on us: leave.
                    let _ = to_media.send(ControlInput::Command(UserCommand::Leave)).await;
                    continue;
                };
                if !processed.insert(event.id) {
                    // The catch-up has it: the subscription starts at its cursor on purpose.
                    continue;
                }
                let outcome = member.process_group_event(events.h_tag(), &event).await;
                match &outcome {
                    GroupEventOutcome::Ignored(why) => counted.dropped.count(why.reason),
                    _ => counted.processed += 1,
                }
                // The cursor moves only over events that were processed (issue 11).
                if !matches!(outcome, GroupEventOutcome::Ignored(_)) {
                    crate::group::advance_cursor(&mut cursor, event.created_at, event.id);
                }
                match outcome {
                    GroupEventOutcome::Message(r) if r.kind == KIND_OFFER => {
                        hand_over_offer(opts, &call_id, &r);
                        ControlInput::Rumor {
                            sender: r.sender,
                            kind: r.kind,
                            tags: r.tags,
                        }
                    }
                    GroupEventOutcome::Message(r) => ControlInput::Rumor {
                        sender: r.sender,
                        kind: r.kind,
                        tags: r.tags,
                    },
                    GroupEventOutcome::Commit | GroupEventOutcome::CommittedProposal(..) => {
                        if let GroupEventOutcome::CommittedProposal(id, at) = outcome {
                            processed.insert(id);
                            crate::group::advance_cursor(&mut cursor, at, id);
                        }
                        let input = epoch_input(member, group, &call_id);
                        if let ControlInput::Epoch { epoch, .. } = &input {
                            last_epoch = *epoch;
                        }
                        input
                    }
                    GroupEventOutcome::PendingProposal => continue,
                    GroupEventOutcome::Ignored(why) => {
                        tracing::debug!(id = %event.id, "group event ignored: {why}");
                        continue;
                    }
                }
            }
            _ = epoch_check.tick() => {
                // A commit merged outside this session (another command of the same user)
                // produces no group event here; catch the new epoch this way.
                let input = epoch_input(member, group, &call_id);
                match &input {
                    ControlInput::Epoch { epoch, .. } if *epoch == last_epoch => continue,
                    ControlInput::Epoch { epoch, .. } => last_epoch = *epoch,
                    _ => {}
                }
                input
            }
        };
        if to_media.send(input).await.is_err() {
            break;
        }
    }
    drop(to_media);
    let media = media_result
        .await
        .map_err(|_| CallError::MediaThread("ended without a result".into()))??;
    let group_events = counts(&counted, &events);
    while let Ok(message) = from_media.try_recv() {
        if let MediaMessage::Event(mut e) = message {
            if let CallEvent::Status(s) = &mut e {
                s.group_events = group_events;
            }
            on_event(&e);
        }
    }
    let mut report = media.report;
    report.group_events = group_events;
    report.first_audio_ms = media.first_audio_at.map(|t| ms_between(began, t));
    report.audio = media.audio;
    // The media thread dropped the client: its driver winds down.
    let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
    // A listener runs many sessions on one connection: give the relays their slot back.
    member.close_events(events).await;
    Ok(Session {
        report,
        cursor,
        records: media.records,
        track: me.name,
    })
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
            delivery: Default::default(),
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
