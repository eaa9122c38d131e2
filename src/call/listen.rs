//! `call listen`: wait for calls in the user's groups. One relay subscription covers every
//! group; each offer (kind 450) makes the call ring until it is answered, declined, ended
//! or its ring timeout passes (then it is a missed call). The [`Ringer`] decides, without
//! I/O; [`listen`] drives it against the group's relays and, for a bot that answers, runs
//! the call with [`session::run_session`] and then goes back to waiting.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use mdk_storage_traits::MdkStorageProvider;
use nostr_sdk::prelude::{Event, EventId, Kind, PublicKey, Tags, Timestamp};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::engine::{npub, CallEvent, CallReport, UserCommand};
use super::session::{self, CallTarget, JoinOptions};
use super::signaling::{
    AnswerStatus, CallAnswer, CallOffer, CallState, StateAction, KIND_ANSWER, KIND_OFFER,
    KIND_STATE,
};
use super::CallError;
use crate::group::{Group, GroupEventOutcome, GroupEvents, GroupMember, GroupRef, Resume, Rumor};
use crate::media::io::{SinkSpec, SourceSpec};

/// PROTOCOL.md §2: a call rings this long; an offer older than that is a missed call.
pub const RING_TIMEOUT: Duration = session::RING_TIMEOUT;
/// Calls ringing at once, at most; an offer beyond that is reported missed at once.
const MAX_RINGING: usize = 64;
/// Call ids remembered so that a re-sent offer does not ring again.
const MAX_SEEN: usize = 4096;
/// How long a decline/busy answer may take to reach a relay.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The reason sent with the `busy` a call in another group gets while we are in a call.
pub const IN_CALL_REASON: &str = "in another call";
/// Event ids remembered during one call to process an event delivered twice once.
const MAX_PROCESSED: usize = 10_000;

/// Something `call listen` reports.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ListenEvent {
    /// Waiting for calls in these groups.
    Listening { groups: Vec<String> },
    /// A call is ringing.
    Ringing {
        group: String,
        call_id: String,
        /// npub of the member who sent the offer.
        caller: String,
        /// The offer's `created_at` (sender's clock).
        offered_at: u64,
        /// Seconds it rings for from now.
        rings_for_s: u64,
    },
    /// We answered `decline` or `busy`.
    Answered {
        group: String,
        call_id: String,
        status: String,
        /// Offer received → our answer handed to a relay.
        after_ms: f64,
    },
    /// We are joining the call (`--answer`).
    Joining {
        group: String,
        call_id: String,
        /// Offer received → the session starts (it sends our accept once our track is
        /// announced on the relay).
        after_ms: f64,
    },
    /// Something happened in the call we joined.
    Call {
        group: String,
        call_id: String,
        call: CallEvent,
    },
    /// The call we joined is over for us.
    CallEnded {
        group: String,
        call_id: String,
        report: Box<CallReport>,
    },
    /// Joining the call failed; we keep listening.
    CallFailed {
        group: String,
        call_id: String,
        error: String,
    },
    /// A call stopped ringing without our answer.
    Missed {
        group: String,
        call_id: String,
        caller: String,
        /// `timeout` (rang for the whole ring timeout), `late` (the offer was already older
        /// than that when we got it), `ended` (the caller ended it), `left` (everyone in
        /// it left), `in_call` (we were in another call), `too_many` (more than 64 ringing).
        reason: String,
    },
    /// Another device of ours answered the call.
    AnsweredElsewhere {
        group: String,
        call_id: String,
        status: String,
    },
    /// Listening stopped (a signal or the relays closing).
    Stopped { reason: String },
}

/// One signaling rumor as the ringer needs it.
#[derive(Debug, Clone)]
pub struct Signal<'a> {
    pub group: &'a str,
    pub sender: PublicKey,
    pub kind: Kind,
    pub tags: &'a Tags,
    pub created_at: Timestamp,
}

impl<'a> Signal<'a> {
    /// A rumor of `group`, as the ringer sees it.
    fn of(group: &'a str, r: &'a Rumor) -> Self {
        Self {
            group,
            sender: r.sender,
            kind: r.kind,
            tags: &r.tags,
            created_at: r.created_at,
        }
    }
}

struct Ring {
    group: String,
    caller: PublicKey,
    /// Offer as received (kept to join it).
    offer: CallOffer,
    /// When it stops ringing.
    deadline: Instant,
    /// When we learnt of it.
    noticed: Instant,
    /// Members in the call: the caller and whoever accepted, minus whoever left.
    inside: BTreeSet<PublicKey>,
}

/// A ringing call, as [`Ringer::ringing`] gives it.
#[derive(Debug, Clone)]
pub struct Ringing {
    pub group: String,
    pub offer: CallOffer,
    pub noticed: Instant,
}

/// Which calls ring: a sans-IO state machine fed with the groups' signaling and the time.
pub struct Ringer {
    me: PublicKey,
    ring_timeout: Duration,
    ringing: HashMap<[u8; 32], Ring>,
    seen: HashSet<[u8; 32]>,
    seen_order: VecDeque<[u8; 32]>,
    events: VecDeque<ListenEvent>,
    /// We are in a call: offers do not ring but are answered `busy`.
    in_call: bool,
    /// Offers that came while in a call, to be answered `busy` ([`Ringer::take_busy`]).
    busy: VecDeque<Ringing>,
}

impl Ringer {
    pub fn new(me: PublicKey, ring_timeout: Duration) -> Self {
        Self {
            me,
            ring_timeout,
            ringing: HashMap::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            events: VecDeque::new(),
            in_call: false,
            busy: VecDeque::new(),
        }
    }

    /// Whether we are in a call now. While we are, an offer does not ring: it is reported
    /// missed (`in_call`) and queued for a `busy` answer.
    pub fn set_in_call(&mut self, in_call: bool) {
        self.in_call = in_call;
    }

    /// The next offer that came while we were in a call, to answer `busy`.
    pub fn take_busy(&mut self) -> Option<Ringing> {
        self.busy.pop_front()
    }

    /// A signaling rumor of `group`, processed at `now` (`wall` = the same moment as a Unix
    /// timestamp, to age the offer).
    pub fn on_signal(&mut self, s: &Signal<'_>, now: Instant, wall: Timestamp) {
        if s.kind == KIND_OFFER {
            let offer = match CallOffer::from_rumor(s.kind, s.tags) {
                Ok(o) => o,
                Err(e) => return tracing::debug!("listen: skipping an offer: {e}"),
            };
            if !self.remember(offer.call_id) || s.sender == self.me {
                return;
            }
            let call_id = hex::encode(offer.call_id);
            // A sender's clock ahead of ours makes the offer new, never older than new.
            let age = Duration::from_secs(wall.as_secs().saturating_sub(s.created_at.as_secs()));
            let reason = if age >= self.ring_timeout {
                Some("late")
            } else if self.in_call {
                // Answered busy unless too many are waiting for it (they stay unanswered).
                if self.busy.len() < MAX_RINGING {
                    self.busy.push_back(Ringing {
                        group: s.group.to_string(),
                        offer: offer.clone(),
                        noticed: now,
                    });
                }
                Some("in_call")
            } else if self.ringing.len() >= MAX_RINGING {
                Some("too_many")
            } else {
                None
            };
            if let Some(reason) = reason {
                self.events.push_back(ListenEvent::Missed {
                    group: s.group.to_string(),
                    call_id,
                    caller: npub(&s.sender),
                    reason: reason.into(),
                });
                return;
            }
            let rings_for = self.ring_timeout - age;
            self.events.push_back(ListenEvent::Ringing {
                group: s.group.to_string(),
                call_id,
                caller: npub(&s.sender),
                offered_at: s.created_at.as_secs(),
                rings_for_s: rings_for.as_secs(),
            });
            self.ringing.insert(
                offer.call_id,
                Ring {
                    group: s.group.to_string(),
                    caller: s.sender,
                    offer,
                    deadline: now + rings_for,
                    noticed: now,
                    inside: [s.sender].into(),
                },
            );
        } else if s.kind == KIND_ANSWER {
            let Ok(a) = CallAnswer::from_rumor(s.kind, s.tags) else {
                return;
            };
            let Some(ring) = self.ringing.get_mut(&a.call_id) else {
                return;
            };
            if s.sender == self.me {
                let ring = self.ringing.remove(&a.call_id).expect("present");
                self.events.push_back(ListenEvent::AnsweredElsewhere {
                    group: ring.group,
                    call_id: hex::encode(a.call_id),
                    status: status_name(a.status).into(),
                });
            } else if a.status == AnswerStatus::Accept {
                ring.inside.insert(s.sender);
            }
        } else if s.kind == KIND_STATE {
            let Ok(state) = CallState::from_rumor(s.kind, s.tags) else {
                return;
            };
            let Some(ring) = self.ringing.get_mut(&state.call_id) else {
                return;
            };
            let reason = match state.action {
                StateAction::End => "ended",
                StateAction::Leave => {
                    ring.inside.remove(&s.sender);
                    if !ring.inside.is_empty() {
                        return;
                    }
                    "left"
                }
                _ => return,
            };
            self.miss(state.call_id, reason);
        }
    }

    /// Calls whose ring timeout passed by `now` become missed.
    pub fn on_tick(&mut self, now: Instant) {
        let due: Vec<[u8; 32]> = self
            .ringing
            .iter()
            .filter(|(_, r)| now >= r.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.miss(id, "timeout");
        }
    }

    /// When [`Ringer::on_tick`] has something to do next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.ringing.values().map(|r| r.deadline).min()
    }

    /// Calls ringing now, the first noticed first.
    pub fn ringing(&self) -> Vec<Ringing> {
        let mut list: Vec<Ringing> = self
            .ringing
            .values()
            .map(|r| Ringing {
                group: r.group.clone(),
                offer: r.offer.clone(),
                noticed: r.noticed,
            })
            .collect();
        list.sort_by_key(|r| r.noticed);
        list
    }

    /// We answered `call_id` (joined, declined or busy): it stops ringing, silently.
    pub fn answered(&mut self, call_id: &[u8; 32]) {
        self.ringing.remove(call_id);
    }

    /// Every call still ringing is missed for `reason` (we are going into a call).
    pub fn miss_all(&mut self, reason: &str) {
        let ids: Vec<[u8; 32]> = self.ringing.keys().copied().collect();
        for id in ids {
            self.miss(id, reason);
        }
    }

    pub fn poll_event(&mut self) -> Option<ListenEvent> {
        self.events.pop_front()
    }

    fn miss(&mut self, call_id: [u8; 32], reason: &str) {
        if let Some(ring) = self.ringing.remove(&call_id) {
            self.events.push_back(ListenEvent::Missed {
                group: ring.group,
                call_id: hex::encode(call_id),
                caller: npub(&ring.caller),
                reason: reason.into(),
            });
        }
    }

    /// Records a call id; false if it was seen before (a reused id is rejected, §2).
    fn remember(&mut self, call_id: [u8; 32]) -> bool {
        if !self.seen.insert(call_id) {
            return false;
        }
        self.seen_order.push_back(call_id);
        if self.seen_order.len() > MAX_SEEN {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

fn status_name(s: AnswerStatus) -> &'static str {
    match s {
        AnswerStatus::Accept => "accept",
        AnswerStatus::Decline => "decline",
        AnswerStatus::Busy => "busy",
    }
}

/// What the listener does by itself with a call that rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoResponse {
    /// Report it and let it ring; the person answers with a [`ListenCommand`].
    Ring,
    /// Join it (one call at a time).
    Answer,
    /// Answer `decline`.
    Decline,
    /// Answer `busy`.
    Busy,
}

/// What a person (or a script on stdin) tells the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenCommand {
    /// Join the newest ringing call.
    Answer,
    /// Decline the newest ringing call.
    Decline,
    /// Answer `busy` to the newest ringing call.
    Busy,
    /// In a call: mute or unmute.
    ToggleMute,
    /// In a call: leave it (and go back to listening).
    Leave,
}

/// How the listener answers and joins calls.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub ring_timeout: Duration,
    pub auto: AutoResponse,
    /// Sent with `decline`/`busy`.
    pub reason: Option<String>,
    /// Options of the calls we join (`target` is set per call).
    pub join: JoinOptions,
    pub source: SourceSpec,
    pub sink: SinkSpec,
}

/// One group the listener watches, with where catching up on it stands.
#[derive(Debug, Clone)]
pub struct Watched {
    pub group: Group,
    pub resume: Resume,
}

impl Watched {
    fn group_ref(&self) -> GroupRef {
        GroupRef {
            mls_group_id: self.group.mls_group_id.clone(),
            nostr_group_id: self.group.nostr_group_id,
        }
    }
}

/// Answers `ring` with `decline` or `busy`.
async fn refuse<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    groups: &[Watched],
    ring: &Ringing,
    status: AnswerStatus,
    reason: Option<String>,
) -> Option<ListenEvent> {
    let w = groups.iter().find(|w| w.group.name == ring.group)?;
    refuse_in(member, w.group_ref(), ring.clone(), status, reason).await
}

/// Answers `ring`, a call of `group`, with `decline` or `busy`.
async fn refuse_in<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    group: GroupRef,
    ring: Ringing,
    status: AnswerStatus,
    reason: Option<String>,
) -> Option<ListenEvent> {
    let answer = CallAnswer {
        call_id: ring.offer.call_id,
        status,
        reason,
        track: None,
    };
    let sent =
        tokio::time::timeout(ANSWER_TIMEOUT, member.send_rumor(&group, answer.to_rumor())).await;
    match sent {
        Ok(Ok(_)) => Some(ListenEvent::Answered {
            group: ring.group.clone(),
            call_id: hex::encode(ring.offer.call_id),
            status: status_name(status).into(),
            after_ms: super::timing::ms(ring.noticed.elapsed()),
        }),
        Ok(Err(e)) => {
            tracing::warn!("answering a call: {e}");
            None
        }
        Err(_) => {
            tracing::warn!("answering a call: no relay answered in time");
            None
        }
    }
}

/// Waits for calls in `groups` until `stop` turns true, answering them as `config.auto`
/// and `commands` say. `on_event` gets every [`ListenEvent`]; `on_cursor` is called whenever
/// a group's catch-up cursor moved (so the caller can persist it). Ends with
/// [`ListenEvent::Stopped`].
#[allow(clippy::too_many_arguments)]
pub async fn listen<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    groups: &mut [Watched],
    config: &ListenConfig,
    mut commands: mpsc::UnboundedReceiver<ListenCommand>,
    mut stop: watch::Receiver<bool>,
    mut on_event: impl FnMut(&ListenEvent),
    mut on_cursor: impl FnMut(&Watched),
) -> Result<(), CallError> {
    let mut ringer = Ringer::new(member.public_key(), config.ring_timeout);
    let mut commands_open = true;
    let mut listening = false;
    // The subscription in use: kept open through a call (the other groups are watched on
    // it), replaced by a new one before the next catch-up.
    let mut current: Option<GroupEvents> = None;
    let stopped = loop {
        if *stop.borrow() {
            break "stopped";
        }
        // Listen first, from the catch-up's cursors, then catch up: nothing published in
        // between is missed, even if stamped before now; events seen both ways are
        // processed once (docs/protocol.md §1). The new subscription opens before the old
        // one closes, so there is no gap between them either.
        let refs: Vec<GroupRef> = groups.iter().map(Watched::group_ref).collect();
        let fresh = member
            .groups_events(
                &refs,
                crate::group::live_since(groups.iter().map(|w| &w.resume)),
            )
            .await?;
        if let Some(old) = current.replace(fresh) {
            member.close_events(old).await;
        }
        let events = current.as_mut().expect("just set");
        let mut processed: HashSet<EventId> = HashSet::new();
        for w in groups.iter_mut() {
            let (since, seen) = w.resume.clone().unzip();
            let sync = member
                .sync_group(&w.group, since, &seen.unwrap_or_default())
                .await?;
            processed.extend(sync.seen_ids.iter().copied());
            let (now, wall) = (Instant::now(), Timestamp::now());
            for r in &sync.messages {
                ringer.on_signal(&Signal::of(&w.group.name, r), now, wall);
            }
            if sync.cursor != w.resume {
                w.resume = sync.cursor;
                on_cursor(w);
            }
        }
        if !listening {
            // Subscribed and caught up: from now on every offer rings at once.
            listening = true;
            on_event(&ListenEvent::Listening {
                groups: groups.iter().map(|w| w.group.name.clone()).collect(),
            });
        }
        // Wait for a call to join (or a stop).
        let next: Result<Ringing, &str> = loop {
            ringer.on_tick(Instant::now());
            while let Some(e) = ringer.poll_event() {
                on_event(&e);
            }
            let mut to_answer = None;
            for ring in ringer.ringing() {
                let status = match config.auto {
                    AutoResponse::Ring => continue,
                    AutoResponse::Answer => {
                        to_answer = Some(ring);
                        break;
                    }
                    AutoResponse::Decline => AnswerStatus::Decline,
                    AutoResponse::Busy => AnswerStatus::Busy,
                };
                ringer.answered(&ring.offer.call_id);
                if let Some(e) = refuse(member, groups, &ring, status, config.reason.clone()).await
                {
                    on_event(&e);
                }
            }
            if let Some(ring) = to_answer {
                break Ok(ring);
            }
            let deadline = ringer.next_deadline();
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break Err("stopped");
                    }
                }
                () = async {
                    match deadline {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
                command = commands.recv(), if commands_open => {
                    let Some(command) = command else {
                        commands_open = false;
                        continue;
                    };
                    // Commands answer the call that rang last.
                    let Some(ring) = ringer.ringing().pop() else {
                        continue;
                    };
                    let status = match command {
                        ListenCommand::Answer => break Ok(ring),
                        ListenCommand::Decline => AnswerStatus::Decline,
                        ListenCommand::Busy => AnswerStatus::Busy,
                        ListenCommand::ToggleMute | ListenCommand::Leave => continue,
                    };
                    ringer.answered(&ring.offer.call_id);
                    if let Some(e) = refuse(member, groups, &ring, status, config.reason.clone()).await {
                        on_event(&e);
                    }
                }
                event = events.next_tagged() => {
                    let Some((h, event)) = event else {
                        break Err("relays_closed");
                    };
                    let Some(w) = groups.iter_mut().find(|w| w.group_ref().h_tag() == h) else {
                        continue;
                    };
                    live_event(member, &mut ringer, w, &h, &event, &mut processed, &mut on_cursor)
                        .await;
                }
            }
        };
        let ring = match next {
            Ok(ring) => ring,
            Err(why) => break why,
        };
        ringer.answered(&ring.offer.call_id);
        // One call at a time: the others ringing now are missed.
        ringer.miss_all("in_call");
        while let Some(e) = ringer.poll_event() {
            on_event(&e);
        }
        let Some(i) = groups.iter().position(|w| w.group.name == ring.group) else {
            continue;
        };
        let (before, rest) = groups.split_at_mut(i);
        let (w, after) = rest.split_first_mut().expect("index from position");
        let mut others: Vec<&mut Watched> = before.iter_mut().chain(after.iter_mut()).collect();
        ringer.set_in_call(true);
        let ended = answer_call(
            member,
            w,
            &mut others,
            events,
            &mut processed,
            &mut ringer,
            &ring,
            config,
            &mut commands,
            &mut commands_open,
            &mut stop,
            &mut on_event,
            &mut on_cursor,
        )
        .await;
        ringer.set_in_call(false);
        on_event(&ended);
        on_cursor(w);
    };
    if let Some(events) = current {
        member.close_events(events).await;
    }
    on_event(&ListenEvent::Stopped {
        reason: stopped.into(),
    });
    Ok(())
}

/// One group event delivered live on a subscription: processed once (several relays may
/// deliver it), `w`'s cursor advanced, and a signaling message fed to `ringer`.
async fn live_event<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    ringer: &mut Ringer,
    w: &mut Watched,
    h: &str,
    event: &Event,
    processed: &mut HashSet<EventId>,
    on_cursor: &mut impl FnMut(&Watched),
) {
    if !processed.insert(event.id) {
        return;
    }
    let outcome = member.process_group_event(h, event).await;
    if !matches!(outcome, GroupEventOutcome::Ignored(_)) {
        crate::group::advance_cursor(&mut w.resume, event.created_at, event.id);
        on_cursor(w);
    }
    match outcome {
        GroupEventOutcome::Message(r) => ringer.on_signal(
            &Signal::of(&w.group.name, &r),
            Instant::now(),
            Timestamp::now(),
        ),
        GroupEventOutcome::CommittedProposal(id, at) => {
            processed.insert(id);
            crate::group::advance_cursor(&mut w.resume, at, id);
            on_cursor(w);
        }
        GroupEventOutcome::Ignored(why) => {
            tracing::debug!(id = %event.id, "group event ignored: {why}");
        }
        GroupEventOutcome::Commit | GroupEventOutcome::PendingProposal => {}
    }
}

/// Joins the ringing call `ring` of `w` until it is over for us (everyone else left, the
/// caller ended it, the duration passed, a `Leave` command, or `stop`); returns the
/// closing event. Meanwhile another call offered in `w` (the session hands its offer over)
/// or in one of the `others` groups (watched here) is answered `busy`: the ringer is in
/// call mode and reports it missed, `in_call` (docs/protocol.md, Ringing).
#[allow(clippy::too_many_arguments)]
async fn answer_call<S: MdkStorageProvider>(
    member: &GroupMember<S>,
    w: &mut Watched,
    others: &mut [&mut Watched],
    events: &mut GroupEvents,
    processed: &mut HashSet<EventId>,
    ringer: &mut Ringer,
    ring: &Ringing,
    config: &ListenConfig,
    commands: &mut mpsc::UnboundedReceiver<ListenCommand>,
    commands_open: &mut bool,
    stop: &mut watch::Receiver<bool>,
    on_event: &mut impl FnMut(&ListenEvent),
    on_cursor: &mut impl FnMut(&Watched),
) -> ListenEvent {
    let call_id = hex::encode(ring.offer.call_id);
    let group_name = w.group.name.clone();
    let failed = |error: String| ListenEvent::CallFailed {
        group: group_name.clone(),
        call_id: call_id.clone(),
        error,
    };
    let (input, output) = match (config.source.open(), config.sink.open()) {
        (Ok(i), Ok(o)) => (i, o),
        (Err(e), _) | (_, Err(e)) => return failed(format!("audio: {e}")),
    };
    // Offers of other calls in the call's own group, from the session.
    let (offers_tx, mut offers) = mpsc::channel(session::OTHER_OFFERS_QUEUE);
    let opts = JoinOptions {
        target: CallTarget::Id(call_id.clone()),
        leave_when_alone: true,
        other_offers: Some(offers_tx),
        ..config.join.clone()
    };
    on_event(&ListenEvent::Joining {
        group: group_name.clone(),
        call_id: call_id.clone(),
        after_ms: super::timing::ms(ring.noticed.elapsed()),
    });
    // The other groups are watched on the listener's subscription, open since before its
    // last catch-up: nothing offered there in between is missed. (It carries the call's
    // own group too; that is the session's, and skipped here.)
    let mut events_open = true;
    // Busy answers on their way, sent beside the call rather than holding it up.
    let mut refusals = futures::stream::FuturesUnordered::new();
    let busy = |group, ringing| {
        refuse_in(
            member,
            group,
            ringing,
            AnswerStatus::Busy,
            Some(IN_CALL_REASON.into()),
        )
    };
    // Shared with the session's event callback; never borrowed across an await.
    let on_event = std::cell::RefCell::new(on_event);
    // Kept open until the session ends: a closed channel means "leave".
    let (to_session, from_listener) = mpsc::unbounded_channel();
    let noticed = ring.noticed;
    let group_ref = w.group_ref();
    let session = session::run_session(
        member,
        &group_ref,
        w.resume.clone(),
        &opts,
        input,
        output,
        from_listener,
        |e: &CallEvent| {
            let mut on_event = on_event.borrow_mut();
            if matches!(e, CallEvent::Joined { .. }) {
                // The engine has just queued our accept: this is when we answered.
                on_event(&ListenEvent::Answered {
                    group: group_name.clone(),
                    call_id: call_id.clone(),
                    status: "accept".into(),
                    after_ms: super::timing::ms(noticed.elapsed()),
                });
            }
            on_event(&ListenEvent::Call {
                group: group_name.clone(),
                call_id: call_id.clone(),
                call: e.clone(),
            })
        },
    );
    tokio::pin!(session);
    let mut muted = false;
    let mut stop_open = true;
    let result = loop {
        tokio::select! {
            result = &mut session => break result,
            changed = stop.changed(), if stop_open => {
                if changed.is_err() {
                    stop_open = false;
                } else if *stop.borrow() {
                    let _ = to_session.send(UserCommand::Leave);
                }
            }
            command = commands.recv(), if *commands_open => match command {
                Some(ListenCommand::ToggleMute) => {
                    muted = !muted;
                    let _ = to_session.send(UserCommand::Mute(muted));
                }
                Some(ListenCommand::Leave) => {
                    let _ = to_session.send(UserCommand::Leave);
                }
                Some(_) => {}
                None => *commands_open = false,
            },
            event = events.next_tagged(), if events_open => {
                let Some((h, event)) = event else {
                    events_open = false;
                    continue;
                };
                if processed.len() >= MAX_PROCESSED {
                    processed.clear();
                }
                if let Some(o) = others.iter_mut().find(|o| o.group_ref().h_tag() == h) {
                    live_event(member, ringer, o, &h, &event, processed, &mut *on_cursor)
                        .await;
                }
                let emit = &mut |e: &ListenEvent| (on_event.borrow_mut())(e);
                let answers = busy_answers(ringer, emit, &group_ref, &group_name, others);
                refusals.extend(answers.into_iter().map(|(g, ringing)| busy(g, ringing)));
            }
            Some(offer) = offers.recv() => {
                // Another call in this very group: we cannot be in two calls, so busy,
                // as for a call in another group. (The session keeps an offer of our own
                // call, re-sent, to itself: we are in that one already.)
                ringer.on_signal(
                    &Signal::of(&group_name, &offer),
                    Instant::now(),
                    Timestamp::now(),
                );
                let emit = &mut |e: &ListenEvent| (on_event.borrow_mut())(e);
                let answers = busy_answers(ringer, emit, &group_ref, &group_name, others);
                refusals.extend(answers.into_iter().map(|(g, ringing)| busy(g, ringing)));
            }
            Some(answered) = futures::StreamExt::next(&mut refusals), if !refusals.is_empty() => {
                if let Some(e) = answered {
                    (on_event.borrow_mut())(&e);
                }
            }
        }
    };
    while let Some(answered) = futures::StreamExt::next(&mut refusals).await {
        if let Some(e) = answered {
            (on_event.borrow_mut())(&e);
        }
    }
    match result {
        Ok(s) => {
            w.resume = s.cursor;
            ListenEvent::CallEnded {
                group: group_name.clone(),
                call_id: call_id.clone(),
                report: Box::new(s.report),
            }
        }
        Err(e) => failed(e.to_string()),
    }
}

/// Hands the ringer's events to `emit` and returns the `busy` answers it wants sent during
/// a call, each with the group it goes to.
fn busy_answers(
    ringer: &mut Ringer,
    emit: &mut dyn FnMut(&ListenEvent),
    call_group: &GroupRef,
    call_name: &str,
    others: &[&mut Watched],
) -> Vec<(GroupRef, Ringing)> {
    while let Some(e) = ringer.poll_event() {
        emit(&e);
    }
    let mut answers = Vec::new();
    while let Some(busy) = ringer.take_busy() {
        if let Some(g) = busy_group(&busy, call_group, call_name, others) {
            answers.push((g, busy));
        }
    }
    answers
}

/// The group a `busy` answer goes to: the call's own (`call_group`, named `call_name`) or
/// one of the `others`.
fn busy_group(
    busy: &Ringing,
    call_group: &GroupRef,
    call_name: &str,
    others: &[&mut Watched],
) -> Option<GroupRef> {
    if busy.group == call_name {
        return Some(call_group.clone());
    }
    others
        .iter()
        .find(|o| o.group.name == busy.group)
        .map(|o| o.group_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::signaling::TrackRef;
    use nostr_sdk::prelude::Keys;

    fn offer(id: u8) -> CallOffer {
        CallOffer::sample(id)
    }

    struct Fixture {
        ringer: Ringer,
        t0: Instant,
        wall: u64,
    }

    impl Fixture {
        fn new(me: &Keys) -> Self {
            Self {
                ringer: Ringer::new(me.public_key(), Duration::from_secs(30)),
                t0: Instant::now(),
                wall: 1_000_000,
            }
        }

        fn feed(
            &mut self,
            from: &Keys,
            rumor: nostr_sdk::prelude::EventBuilder,
            at: u64,
            now_s: u64,
        ) {
            let r = rumor.build(from.public_key());
            self.ringer.on_signal(
                &Signal {
                    group: "team",
                    sender: from.public_key(),
                    kind: r.kind,
                    tags: &r.tags,
                    created_at: Timestamp::from(self.wall + at),
                },
                self.t0 + Duration::from_secs(now_s),
                Timestamp::from(self.wall + now_s),
            );
        }

        fn events(&mut self) -> Vec<ListenEvent> {
            std::iter::from_fn(|| self.ringer.poll_event()).collect()
        }
    }

    fn kinds(events: &[ListenEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let v = serde_json::to_value(e).unwrap();
                match v.get("reason").and_then(|r| r.as_str()) {
                    Some(r) => format!("{}:{r}", v["event"].as_str().unwrap()),
                    None => v["event"].as_str().unwrap().to_string(),
                }
            })
            .collect()
    }

    #[test]
    fn an_offer_rings_until_its_timeout_then_is_missed() {
        let (me, a) = (Keys::generate(), Keys::generate());
        let mut f = Fixture::new(&me);
        f.feed(&a, offer(1).to_rumor(), 0, 2);
        let ev = f.events();
        assert_eq!(kinds(&ev), ["ringing"]);
        let v = serde_json::to_value(&ev[0]).unwrap();
        assert_eq!(v["rings_for_s"], 28, "aged by the 2 s it took to arrive");
        assert_eq!(f.ringer.ringing().len(), 1);
        // A re-sent offer with the same id does not ring again.
        f.feed(&a, offer(1).to_rumor(), 0, 3);
        assert!(f.events().is_empty());
        f.ringer.on_tick(f.t0 + Duration::from_secs(29));
        assert!(f.events().is_empty(), "still ringing");
        f.ringer.on_tick(f.t0 + Duration::from_secs(30));
        assert_eq!(kinds(&f.events()), ["missed:timeout"]);
        assert!(f.ringer.ringing().is_empty());
        assert_eq!(f.ringer.next_deadline(), None);
    }

    #[test]
    fn ended_left_late_and_own_calls_are_told_apart() {
        let (me, a, b) = (Keys::generate(), Keys::generate(), Keys::generate());
        let mut f = Fixture::new(&me);
        // Ended by its caller.
        f.feed(&a, offer(1).to_rumor(), 0, 0);
        let end = CallState {
            call_id: [1; 32],
            action: StateAction::End,
        };
        f.feed(&a, end.to_rumor(), 5, 5);
        // Everyone left: the caller and the member who accepted.
        f.feed(&a, offer(2).to_rumor(), 0, 0);
        let accept = CallAnswer::accept(
            [2; 32],
            TrackRef {
                name: [9; 8],
                leaf_index: 1,
            },
        );
        f.feed(&b, accept.to_rumor(), 1, 1);
        let leave = CallState {
            call_id: [2; 32],
            action: StateAction::Leave,
        };
        f.feed(&a, leave.to_rumor(), 2, 2);
        assert_eq!(f.ringer.ringing().len(), 1, "b is still in call 2");
        f.feed(&b, leave.to_rumor(), 3, 3);
        // An offer that is already 40 s old when it arrives (we were offline).
        f.feed(&a, offer(3).to_rumor(), 0, 40);
        // Our own call (another terminal of ours) does not ring.
        f.feed(&me, offer(4).to_rumor(), 40, 40);
        assert_eq!(
            kinds(&f.events()),
            [
                "ringing",
                "missed:ended",
                "ringing",
                "missed:left",
                "missed:late"
            ]
        );
    }

    #[test]
    fn our_answer_from_elsewhere_stops_the_ringing_and_in_call_misses_the_rest() {
        let (me, a) = (Keys::generate(), Keys::generate());
        let mut f = Fixture::new(&me);
        f.feed(&a, offer(1).to_rumor(), 0, 0);
        f.feed(&a, offer(2).to_rumor(), 0, 0);
        f.feed(&a, offer(3).to_rumor(), 0, 0);
        let decline = CallAnswer {
            call_id: [1; 32],
            status: AnswerStatus::Decline,
            reason: None,
            track: None,
        };
        f.feed(&me, decline.to_rumor(), 1, 1);
        f.ringer.answered(&[2; 32]);
        f.ringer.miss_all("in_call");
        assert_eq!(
            kinds(&f.events()),
            [
                "ringing",
                "ringing",
                "ringing",
                "answered_elsewhere",
                "missed:in_call"
            ]
        );
        assert!(f.ringer.ringing().is_empty());
    }

    #[test]
    fn in_a_call_an_offer_is_missed_and_queued_for_busy_not_rung() {
        let (me, a) = (Keys::generate(), Keys::generate());
        let mut f = Fixture::new(&me);
        f.ringer.set_in_call(true);
        f.feed(&a, offer(1).to_rumor(), 0, 1);
        // Too old to answer at all: missed as late, nobody told busy.
        f.feed(&a, offer(2).to_rumor(), 0, 40);
        assert_eq!(kinds(&f.events()), ["missed:in_call", "missed:late"]);
        assert!(f.ringer.ringing().is_empty(), "nothing rings in a call");
        let busy = f.ringer.take_busy().expect("one to answer busy");
        assert_eq!(busy.offer.call_id, [1; 32]);
        assert_eq!(busy.group, "team");
        assert!(f.ringer.take_busy().is_none());
        // Out of the call, offers ring again; a re-sent one does not.
        f.ringer.set_in_call(false);
        f.feed(&a, offer(1).to_rumor(), 0, 2);
        f.feed(&a, offer(3).to_rumor(), 0, 2);
        assert_eq!(kinds(&f.events()), ["ringing"]);
        // The busy queue is bounded like the ringing set.
        f.ringer.set_in_call(true);
        for i in 0..(MAX_RINGING + 5) {
            let mut o = offer(0);
            o.call_id[..8].copy_from_slice(&(i as u64 + 100).to_be_bytes());
            f.feed(&a, o.to_rumor(), 0, 3);
        }
        assert_eq!(
            std::iter::from_fn(|| f.ringer.take_busy()).count(),
            MAX_RINGING
        );
    }

    #[test]
    fn ringing_calls_and_remembered_ids_are_bounded() {
        let (me, a) = (Keys::generate(), Keys::generate());
        let mut f = Fixture::new(&me);
        for i in 0..(MAX_RINGING + 3) {
            let mut o = offer(0);
            o.call_id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            f.feed(&a, o.to_rumor(), 0, 0);
        }
        let ev = kinds(&f.events());
        assert_eq!(ev.iter().filter(|e| *e == "ringing").count(), MAX_RINGING);
        assert_eq!(ev.iter().filter(|e| *e == "missed:too_many").count(), 3);
        for i in 0..(MAX_SEEN as u64 + 10) {
            f.ringer.remember({
                let mut id = [7u8; 32];
                id[..8].copy_from_slice(&i.to_be_bytes());
                id
            });
        }
        assert!(f.ringer.seen.len() <= MAX_SEEN);
    }
}
