//! The call engine on a simulated clock: several `CallEngine`s wired to an in-memory relay
//! (frames forwarded to subscribers after a delay) and an in-memory group (rumors to every
//! other member, commits with fresh secrets), with real libopus and real SFrame. Seconds of
//! call time run in a fraction of that: nothing here sleeps or reads the clock but once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use call::call::engine::{
    CallEngine, CallEvent, CallReport, EndReason, EngineConfig, Input, Output, UserCommand,
};
use call::call::session::{calls_from_history, choose_call, CallTarget, SignalMessage};
use call::call::signaling::{
    CallOffer, CallState, Privacy, StateAction, TrackRef, KIND_OFFER, KIND_STATE,
};
use call::media::jitter::PlayoutRule;
use call::media::keys::{CallSecret, KidLayout};
use call::media::tone::{dominant_frequency, ToneSource};
use nostr_sdk::prelude::{Keys, PublicKey, Timestamp};
use rand::RngCore;

const FRAME: Duration = Duration::from_millis(20);
const STEP: Duration = Duration::from_millis(5);
/// Sender → relay → receiver.
const FRAME_DELAY: Duration = Duration::from_millis(30);
/// A rumor through MLS and the Nostr relay.
const RUMOR_DELAY: Duration = Duration::from_millis(60);

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn secret() -> CallSecret {
    CallSecret::from_bytes(random())
}

struct Node {
    keys: Keys,
    leaf: u32,
    tone: ToneSource,
    engine: Option<CallEngine>,
    /// Captures audio and plays (a crashed participant stops doing anything).
    alive: bool,
    events: Vec<(Duration, CallEvent)>,
    played: Vec<i16>,
    /// What the engine asked the sink to leave unplayed ([`Output::Trim`]).
    trims: Vec<Duration>,
    ended: Option<EndReason>,
    report: Option<CallReport>,
    /// Rumors this member can read (members added later cannot read earlier ones).
    history: Vec<SignalMessage>,
}

impl Node {
    fn pubkey(&self) -> PublicKey {
        self.keys.public_key()
    }
}

enum Pending {
    Frame {
        to: usize,
        track: [u8; 8],
        seq: u64,
        payload: Bytes,
    },
    Rumor {
        to: usize,
        message: SignalMessage,
    },
    Epoch {
        to: usize,
        epoch: u64,
        secret: CallSecret,
        leaves: BTreeMap<u32, PublicKey>,
    },
}

struct Sim {
    t0: Instant,
    now: Duration,
    nodes: Vec<Node>,
    epoch: u64,
    secret: CallSecret,
    leaves: BTreeMap<u32, PublicKey>,
    /// Relay: subscribers of each track.
    subscribers: HashMap<[u8; 8], Vec<usize>>,
    pending: Vec<(Duration, Pending)>,
    /// Every rumor sent, oldest first.
    rumors: Vec<(usize, SignalMessage)>,
}

impl Sim {
    /// A group of `n` members (leaves 0..n) and `extra` identities not in it yet.
    fn new(n: usize, extra: usize) -> Self {
        let nodes: Vec<Node> = (0..n + extra)
            .map(|i| Node {
                keys: Keys::generate(),
                leaf: i as u32,
                tone: ToneSource::new(330.0 + 110.0 * i as f64),
                engine: None,
                alive: true,
                events: Vec::new(),
                played: Vec::new(),
                trims: Vec::new(),
                ended: None,
                report: None,
                history: Vec::new(),
            })
            .collect();
        let leaves = nodes[..n].iter().map(|m| (m.leaf, m.pubkey())).collect();
        Self {
            t0: Instant::now(),
            now: Duration::ZERO,
            nodes,
            epoch: 1,
            secret: secret(),
            leaves,
            subscribers: HashMap::new(),
            pending: Vec::new(),
            rumors: Vec::new(),
        }
    }

    fn at(&self) -> Instant {
        self.t0 + self.now
    }

    /// Node `i` starts a call.
    fn start(&mut self, i: usize, ring_timeout: Option<Duration>) {
        let me = TrackRef {
            name: random(),
            leaf_index: self.nodes[i].leaf,
        };
        let max_leaf = self.leaves.keys().copied().max().unwrap_or(0) + 4;
        let offer = CallOffer {
            call_id: random(),
            moq_url: "moqt://relay.invalid:4443".parse().unwrap(),
            namespace: random(),
            token: random(),
            track: me.clone(),
            frame_ms: 20,
            sender_bits: KidLayout::for_max_leaf(max_leaf).sender_bits(),
            privacy: Privacy::Standard,
            delivery: Default::default(),
        };
        self.create(i, offer, me, true, BTreeMap::new(), ring_timeout);
    }

    /// Node `i` joins the call its readable history shows.
    fn join(&mut self, i: usize) {
        let messages: Vec<SignalMessage> = self.nodes[i].history.clone();
        let calls = calls_from_history(&messages, &self.leaves);
        let now = Timestamp::from(1_000_000 + self.now.as_secs());
        let call = choose_call(&calls, &CallTarget::Auto, now)
            .unwrap()
            .expect("a running call in the history")
            .clone();
        let me = TrackRef {
            name: random(),
            leaf_index: self.nodes[i].leaf,
        };
        self.create(i, call.offer, me, false, call.participants, None);
    }

    fn create(
        &mut self,
        i: usize,
        offer: CallOffer,
        me: TrackRef,
        started: bool,
        participants: BTreeMap<PublicKey, TrackRef>,
        ring_timeout: Option<Duration>,
    ) {
        let engine = CallEngine::new(
            EngineConfig {
                offer,
                me,
                my_pubkey: self.nodes[i].pubkey(),
                started,
                participants,
                epoch: self.epoch,
                secret: self.secret.clone(),
                leaves: self.leaves.clone(),
                ring_timeout,
                duration: None,
                counters: None,
                record_frames: false,
                leave_when_alone: false,
                status_interval: call::call::engine::STATUS_INTERVAL,
            },
            self.at(),
        )
        .unwrap();
        self.nodes[i].engine = Some(engine);
        self.drain(i);
    }

    fn handle(&mut self, i: usize, input: Input<'_>) {
        let at = self.at();
        let node = &mut self.nodes[i];
        if !node.alive {
            return;
        }
        if let Some(e) = &mut node.engine {
            e.handle(input, at).unwrap();
        }
        self.drain(i);
    }

    /// Carries out everything node `i`'s engine asked for.
    fn drain(&mut self, i: usize) {
        loop {
            let Some(out) = self.nodes[i].engine.as_mut().and_then(|e| e.poll_output()) else {
                break;
            };
            match out {
                Output::Publish(f) => {
                    let track = self.nodes[i].engine.as_ref().unwrap().track();
                    for &to in self.subscribers.get(&track).into_iter().flatten() {
                        self.pending.push((
                            self.now + FRAME_DELAY,
                            Pending::Frame {
                                to,
                                track,
                                seq: f.seq,
                                payload: f.payload.clone(),
                            },
                        ));
                    }
                }
                Output::Subscribe { track, .. } => {
                    self.subscribers.entry(track.name).or_default().push(i);
                }
                Output::Unsubscribe { track } => {
                    if let Some(s) = self.subscribers.get_mut(&track) {
                        s.retain(|&n| n != i);
                    }
                }
                Output::Rumor(builder) => {
                    let r = builder.build(self.nodes[i].pubkey());
                    let message = SignalMessage {
                        sender: r.pubkey,
                        kind: r.kind,
                        tags: r.tags,
                        created_at: Timestamp::from(1_000_000 + self.now.as_secs()),
                    };
                    self.rumors.push((i, message.clone()));
                    // MLS: every other current member reads it, in order.
                    for (to, n) in self.nodes.iter().enumerate() {
                        if to != i && self.leaves.get(&n.leaf) == Some(&n.pubkey()) {
                            self.pending.push((
                                self.now + RUMOR_DELAY,
                                Pending::Rumor {
                                    to,
                                    message: message.clone(),
                                },
                            ));
                        }
                    }
                }
                Output::Play(pcm) => self.nodes[i].played.extend_from_slice(&pcm),
                // Recorded, not acted on: the simulated sink plays on a fixed grid.
                Output::Trim(by) => self.nodes[i].trims.push(by),
                Output::Event(e) => self.nodes[i].events.push((self.now, e)),
                Output::Ended(reason) => {
                    // The driver ends its subscriptions with the call.
                    for subs in self.subscribers.values_mut() {
                        subs.retain(|&n| n != i);
                    }
                    let node = &mut self.nodes[i];
                    node.ended = Some(reason);
                    node.report = node.engine.as_ref().map(|e| e.report(self.t0 + self.now));
                }
            }
        }
    }

    /// A commit: a fresh epoch secret, the members it leaves, delivered to member `i` after
    /// `delay(i)` (the committer's own client merges at once).
    fn commit(
        &mut self,
        add: &[usize],
        remove: &[usize],
        delay: impl Fn(usize) -> Duration,
    ) -> Vec<usize> {
        let before: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.leaves.contains_key(&self.nodes[i].leaf))
            .collect();
        for &r in remove {
            self.leaves.remove(&self.nodes[r].leaf);
        }
        for &a in add {
            self.leaves
                .insert(self.nodes[a].leaf, self.nodes[a].pubkey());
        }
        self.epoch += 1;
        self.secret = secret();
        for &to in &before {
            self.pending.push((
                self.now + delay(to),
                Pending::Epoch {
                    to,
                    epoch: self.epoch,
                    secret: self.secret.clone(),
                    leaves: self.leaves.clone(),
                },
            ));
        }
        before
    }

    /// Runs the clock for `d`: due deliveries, timeouts, and every 20 ms a captured frame and
    /// a playout slot for every live participant.
    fn run(&mut self, d: Duration) {
        let until = self.now + d;
        while self.now < until {
            self.now += STEP;
            let now = self.now;
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|(t, _)| *t <= now);
            self.pending = later;
            for (_, p) in due {
                match p {
                    Pending::Frame {
                        to,
                        track,
                        seq,
                        payload,
                    } => self.handle(
                        to,
                        Input::Frame {
                            track,
                            seq,
                            payload: &payload,
                        },
                    ),
                    Pending::Rumor { to, message } => {
                        self.nodes[to].history.push(message.clone());
                        self.handle(
                            to,
                            Input::Rumor {
                                sender: message.sender,
                                kind: message.kind,
                                tags: &message.tags,
                            },
                        );
                    }
                    Pending::Epoch {
                        to,
                        epoch,
                        secret,
                        leaves,
                    } => self.handle(
                        to,
                        Input::Epoch {
                            epoch,
                            secret,
                            leaves,
                        },
                    ),
                }
            }
            for i in 0..self.nodes.len() {
                let due = self.nodes[i]
                    .engine
                    .as_ref()
                    .and_then(|e| e.poll_timeout())
                    .is_some_and(|t| t <= self.at());
                if due {
                    self.handle(i, Input::Timeout);
                }
            }
            if now.as_millis().is_multiple_of(FRAME.as_millis()) {
                for i in 0..self.nodes.len() {
                    if self.nodes[i].engine.is_none() || self.nodes[i].ended.is_some() {
                        continue;
                    }
                    let mut pcm = vec![0i16; 960];
                    self.nodes[i].tone.fill(&mut pcm);
                    let at = self.at();
                    self.handle(
                        i,
                        Input::Captured {
                            pcm: &pcm,
                            captured_at: at,
                        },
                    );
                    self.handle(i, Input::PlayoutDue { play_at: at });
                }
            }
        }
    }

    /// Jumps straight to node `i`'s next timeouts until `d` has passed (no audio at all).
    fn idle(&mut self, i: usize, d: Duration) {
        let until = self.at() + d;
        while let Some(t) = self.nodes[i].engine.as_ref().and_then(|e| e.poll_timeout()) {
            if t > until {
                break;
            }
            self.now = t - self.t0;
            self.handle(i, Input::Timeout);
        }
        self.now = until - self.t0;
    }

    fn report(&self, i: usize) -> CallReport {
        self.nodes[i]
            .report
            .clone()
            .unwrap_or_else(|| self.nodes[i].engine.as_ref().unwrap().report(self.at()))
    }

    fn events(&self, i: usize) -> impl Iterator<Item = &CallEvent> {
        self.nodes[i].events.iter().map(|(_, e)| e)
    }

    /// Peers node `i` has in its call, by public key.
    fn joined_peers(&self, i: usize) -> usize {
        self.events(i)
            .filter(|e| matches!(e, CallEvent::PeerJoined { .. }))
            .count()
    }

    /// Pitch of what node `i` played over the last `secs` seconds.
    fn heard_hz(&self, i: usize, secs: f64) -> Option<f64> {
        let p = &self.nodes[i].played;
        let n = ((48_000.0 * secs) as usize).min(p.len());
        dominant_frequency(&p[p.len() - n..], 100.0, 2000.0)
    }

    fn npub(&self, i: usize) -> String {
        call::call::engine::npub(&self.nodes[i].pubkey())
    }

    /// Node 0 starts, the others join once the offer has reached them.
    fn three_in_a_call() -> Self {
        let mut sim = Sim::new(3, 0);
        sim.start(0, None);
        sim.run(Duration::from_millis(100));
        sim.join(1);
        sim.join(2);
        sim.run(Duration::from_millis(500));
        for i in 0..3 {
            assert_eq!(
                sim.joined_peers(i),
                2,
                "node {i}: {:?}",
                sim.nodes[i].events
            );
        }
        sim
    }
}

#[test]
fn an_unanswered_call_rings_out_and_is_ended_for_everyone() {
    let mut sim = Sim::new(2, 0);
    sim.start(0, Some(Duration::from_secs(30)));
    sim.idle(0, Duration::from_secs(29));
    assert_eq!(sim.nodes[0].ended, None, "still ringing at 29 s");
    sim.idle(0, Duration::from_secs(2));
    assert_eq!(sim.nodes[0].ended, Some(EndReason::NoAnswer));
    let (from, last) = sim.rumors.last().unwrap();
    assert_eq!(*from, 0);
    assert_eq!(last.kind, KIND_STATE);
    assert_eq!(
        CallState::from_rumor(last.kind, &last.tags).unwrap().action,
        StateAction::End,
        "a call nobody answered is ended, not left"
    );
    // Status while ringing: one every 5 s (at 30 s the call ends instead).
    let statuses = sim
        .events(0)
        .filter(|e| matches!(e, CallEvent::Status(_)))
        .count();
    assert_eq!(statuses, 5);

    // Answered in time, the same call does not ring out.
    let mut sim = Sim::new(2, 0);
    sim.start(0, Some(Duration::from_secs(30)));
    sim.run(Duration::from_millis(200));
    sim.join(1);
    sim.run(Duration::from_millis(200));
    sim.idle(0, Duration::from_secs(40));
    assert_eq!(sim.nodes[0].ended, None);
}

#[test]
fn a_rekey_holds_the_new_epochs_frames_until_the_commit_arrives_and_loses_none() {
    let mut sim = Sim::three_in_a_call();
    sim.run(Duration::from_millis(500));
    // Node 0 merges at once and sends under the new key; the others get the commit 200 ms
    // later, so ten of its frames arrive before their key.
    sim.commit(&[], &[], |i| {
        if i == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(200)
        }
    });
    sim.run(Duration::from_secs(1));
    let npubs: Vec<String> = (0..3).map(|i| sim.npub(i)).collect();
    for i in 0..3 {
        let r = sim.report(i);
        assert_eq!(r.epochs, vec![1, 2], "node {i}");
        for p in &r.peers {
            let from = npubs.iter().position(|n| *n == p.npub).unwrap();
            let sent = sim.report(from).sent;
            assert_eq!(p.rejects.total(), 0, "node {i} from {from}: {p:?}");
            // Every frame since the subscription, the held ones too (at most a few were
            // sent before it reached the relay, and two are in flight at the end).
            assert!(
                p.received + 8 >= sent,
                "node {i} from {from}: {p:?}, sent {sent}"
            );
            // The held frames came 200 ms late, so up to that much was concealed, and the
            // playout point was held back so that the frames after them were not late.
            assert!(p.jitter.concealed <= 10, "node {i}: {:?}", p.jitter);
        }
    }
    assert!(sim.heard_hz(1, 0.3).is_some());
}

#[test]
fn removal_ends_the_removed_members_call_and_drops_it_for_the_others() {
    let mut sim = Sim::three_in_a_call();
    sim.run(Duration::from_millis(300));
    let rumors_before = sim.rumors.len();
    sim.commit(&[], &[2], |_| Duration::from_millis(50));
    sim.run(Duration::from_millis(500));
    assert_eq!(sim.nodes[2].ended, Some(EndReason::RemovedFromGroup));
    assert!(
        sim.rumors[rumors_before..]
            .iter()
            .all(|(from, _)| *from != 2),
        "a removed member says nothing to the group"
    );
    let gone = sim.npub(2);
    for i in 0..2 {
        assert!(
            sim.events(i).any(|e| matches!(
                e,
                CallEvent::PeerLeft { npub, why } if *npub == gone && why == "removed from the group"
            )),
            "node {i}: {:?}",
            sim.nodes[i].events
        );
        let r = sim.report(i);
        let p = r.peers.iter().find(|p| p.npub == gone).unwrap();
        assert!(!p.present);
        assert_eq!(r.epochs, vec![1, 2]);
    }
    // Nobody takes the removed member's track any more, and it takes nobody's.
    let track = sim.nodes[2].engine.as_ref().unwrap().track();
    assert!(sim.subscribers.get(&track).is_none_or(|s| s.is_empty()));
    assert!(sim.subscribers.values().all(|s| !s.contains(&2)));
    assert!(sim.heard_hz(0, 0.3).is_some(), "0 still hears 1");
}

#[test]
fn after_an_add_the_lowest_leaf_re_announces_the_call_and_the_new_member_joins_from_it() {
    let mut sim = Sim::new(2, 1);
    sim.start(0, None);
    sim.run(Duration::from_millis(100));
    sim.join(1);
    sim.run(Duration::from_millis(300));
    let rumors_before = sim.rumors.len();
    // Node 2 is added: it can read nothing sent before (MLS).
    sim.commit(&[2], &[], |_| Duration::from_millis(40));
    sim.run(Duration::from_millis(300));
    let infos: Vec<usize> = sim.rumors[rumors_before..]
        .iter()
        .filter(|(_, m)| {
            m.kind == KIND_STATE
                && matches!(
                    CallState::from_rumor(m.kind, &m.tags).map(|s| s.action),
                    Ok(StateAction::CallInfo { .. })
                )
        })
        .map(|(from, _)| *from)
        .collect();
    assert_eq!(infos, vec![0], "one call_info, from the lowest leaf");
    assert!(sim.nodes[2].history.iter().all(|m| m.kind != KIND_OFFER));
    sim.join(2);
    sim.run(Duration::from_secs(1));
    for i in 0..3 {
        assert_eq!(
            sim.joined_peers(i),
            2,
            "node {i}: {:?}",
            sim.nodes[i].events
        );
    }
    let r = sim.report(2);
    assert_eq!(r.peers.len(), 2);
    for p in &r.peers {
        assert!(p.received > 30, "{p:?}");
        assert_eq!(p.rejects.total(), 0, "{p:?}");
    }
}

#[test]
fn mute_is_told_to_the_others_and_keeps_the_stream_going_in_silence() {
    let mut sim = Sim::new(2, 0);
    sim.start(0, None);
    sim.run(Duration::from_millis(100));
    sim.join(1);
    sim.run(Duration::from_secs(1));
    let loud = sim.heard_hz(1, 0.3);
    assert!(loud.is_some_and(|f| (f - 330.0).abs() < 3.0), "{loud:?}");
    let received_before = sim.report(1).peers[0].received;
    sim.handle(0, Input::Command(UserCommand::Mute(true)));
    sim.run(Duration::from_secs(1));
    let muter = sim.npub(0);
    assert!(sim
        .events(1)
        .any(|e| matches!(e, CallEvent::PeerMuted { npub, muted: true } if *npub == muter)));
    assert!(sim
        .events(0)
        .any(|e| matches!(e, CallEvent::Muted { muted: true })));
    // Frames keep coming at the stream's pace, and they are silence.
    let received_after = sim.report(1).peers[0].received;
    assert!(received_after >= received_before + 45, "{received_after}");
    let tail = &sim.nodes[1].played[sim.nodes[1].played.len() - 9600..];
    let peak = tail.iter().map(|s| s.unsigned_abs()).max().unwrap();
    assert!(peak < 200, "muted audio peaks at {peak}");
}

#[test]
fn on_a_device_sink_the_engine_offers_the_sink_what_every_stream_can_spare() {
    let mut sim = Sim::three_in_a_call();
    sim.nodes[0]
        .engine
        .as_mut()
        .unwrap()
        .set_playout_rule(PlayoutRule::Slack);
    sim.run(Duration::from_secs(4));
    // Frames arrive 30 ms after capture and are taken at the next 20 ms slot: 10 ms of
    // slack, 6 of them beyond the 4 ms margin, for both streams.
    let trims = &sim.nodes[0].trims;
    assert!(trims.len() >= 2, "{trims:?}");
    for t in trims {
        assert!(
            (Duration::from_millis(5)..=Duration::from_millis(7)).contains(t),
            "{trims:?}"
        );
    }
    for peer in &sim.report(0).peers {
        assert_eq!(peer.jitter.concealed, 0, "{:?}", peer.jitter);
        assert!(peer.jitter.headroom_ms.is_some(), "{:?}", peer.jitter);
    }
    // Timer sinks keep the frame rule and are offered nothing.
    assert!(sim.nodes[1].trims.is_empty() && sim.nodes[2].trims.is_empty());
    assert!(sim.report(1).peers[0].jitter.headroom_ms.is_none());
}

#[test]
fn a_peer_that_stops_sending_is_shown_lost_then_dropped_while_the_others_talk_on() {
    let mut sim = Sim::three_in_a_call();
    sim.run(Duration::from_millis(500));
    // Node 1 crashes: no frames, no leave.
    sim.nodes[1].alive = false;
    let crashed = sim.npub(1);
    sim.run(Duration::from_millis(2_800));
    for i in [0, 2] {
        assert!(
            !sim.events(i)
                .any(|e| matches!(e, CallEvent::PeerLost { .. })),
            "lost too early"
        );
    }
    sim.run(Duration::from_millis(400));
    for i in [0, 2] {
        assert!(sim
            .events(i)
            .any(|e| matches!(e, CallEvent::PeerLost { npub } if *npub == crashed)));
        let r = sim.report(i);
        assert!(r.peers.iter().any(|p| p.npub == crashed && p.lost));
    }
    sim.run(Duration::from_secs(10));
    for i in [0, 2] {
        let left = sim.nodes[i].events.iter().find_map(|(t, e)| match e {
            CallEvent::PeerLeft { npub, why } if *npub == crashed => Some((*t, why.clone())),
            _ => None,
        });
        let (at, why) = left.expect("dropped");
        assert_eq!(why, "lost");
        assert!(at <= Duration::from_millis(600 + 500 + 13_300), "{at:?}");
    }
    // The two that are left still hear each other.
    assert!(sim
        .heard_hz(0, 0.3)
        .is_some_and(|f| (f - 550.0).abs() < 3.0));
    assert!(sim
        .heard_hz(2, 0.3)
        .is_some_and(|f| (f - 330.0).abs() < 3.0));
}
