//! Fuzz entry points: what a peer or a relay controls, fed through the code that receives
//! it, with the invariants that must hold for any input. `tests/fuzz` drives them under
//! AFL (`scripts/fuzz.sh`); the unit tests below run seeded mutations of valid inputs on
//! every `cargo test`, and replay `tests/fuzz/regressions/<target>/`.
//!
//! Each function must not panic for any input; a panic here is a failed invariant.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nostr_sdk::prelude::{Keys, Kind, Tag, Tags, Timestamp};

use crate::call::session::{calls_from_history, SignalMessage};
use crate::call::signaling::{
    CallAnswer, CallOffer, CallState, KIND_ANSWER, KIND_OFFER, KIND_STATE,
};
use crate::media::keyring::SenderKeyring;
use crate::media::keys::{CallSecret, KidLayout, MediaType};
use crate::media::opus::CodecConfig;
use crate::media::pipeline::{Accepted, Inbound, Outbound};

/// The sender's leaf in [`received_frames`]; another leaf's frames are "foreign".
const SENDER_LEAF: u32 = 2;
/// Frames one input can describe: bounds a run, as the relay bounds a track.
const MAX_FRAMES: usize = 512;

/// What [`received_frames`] saw: every frame fed is accounted for exactly once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrameOutcome {
    pub fed: u64,
    pub accepted: u64,
    pub held: u64,
    pub foreign: u64,
    pub refused: u64,
    pub slots_played: u64,
}

/// A remote track as a hostile relay or peer could deliver it. The input is a list of
/// records; each record's first byte picks what arrives:
/// - `0..=127`: the next genuine frame of the sender (encoded from a tone), delivered with
///   the transport sequence taken from the next two bytes (so out of order, repeated or far
///   ahead), and with one byte flipped at the position named by the third byte when the
///   first byte is odd;
/// - `128..=191`: a genuine frame of another member (leaf 3), at the next sequence;
/// - `192..=255`: raw bytes (length from the next byte, at most 255) as a frame.
///
/// Time moves one frame per record and the track is played each step. Panics if a frame
/// is neither accepted, held, foreign nor refused with a counted reason, or if playout
/// stops producing slots once it has started.
pub fn received_frames(data: &[u8]) -> FrameOutcome {
    let codec = CodecConfig::default();
    let layout = KidLayout::new(4).expect("layout");
    let secret = CallSecret::from_bytes([7; 32]);
    let sender = |leaf| {
        let keys = SenderKeyring::new(layout, MediaType::Audio, leaf, 1, &secret, None)
            .expect("sender keys");
        Outbound::new(codec, keys).expect("encoder")
    };
    let (mut ours, mut theirs) = (sender(SENDER_LEAF), sender(SENDER_LEAF + 1));
    let mut inbound = Inbound::new(codec, layout, SENDER_LEAF).expect("decoder");
    let t0 = Instant::now();
    inbound.install_epoch(1, &secret, t0).expect("epoch");
    let pcm: Vec<i16> = (0..codec.samples_per_frame())
        .map(|i| ((i as f32 * 0.06).sin() * 8000.0) as i16)
        .collect();

    let mut out = FrameOutcome::default();
    let mut rest = data;
    let mut started = false;
    for step in 0..MAX_FRAMES {
        let Some((&what, tail)) = rest.split_first() else {
            break;
        };
        rest = tail;
        let now = t0 + Duration::from_millis(20 * step as u64);
        let (seq, frame) = match what {
            0..=127 => {
                let f = ours.encode(&pcm).expect("encode");
                let mut take = |n: usize| {
                    let (head, tail) = rest.split_at(n.min(rest.len()));
                    rest = tail;
                    head.to_vec()
                };
                let seq_bytes = take(2);
                let seq = seq_bytes
                    .iter()
                    .fold(f.seq, |s, b| s.wrapping_add(u64::from(*b)) % (1 << 20));
                let mut payload = f.payload.to_vec();
                if what % 2 == 1 {
                    if let Some(&at) = take(1).first() {
                        let i = usize::from(at) % payload.len();
                        payload[i] ^= 0x5a;
                    }
                }
                (seq, payload)
            }
            128..=191 => {
                let f = theirs.encode(&pcm).expect("encode");
                (f.seq, f.payload.to_vec())
            }
            _ => {
                let len = rest.first().map_or(0, |n| usize::from(*n));
                let raw = rest.get(1..1 + len.min(rest.len().saturating_sub(1)));
                let raw = raw.unwrap_or_default().to_vec();
                rest = &rest[(1 + raw.len()).min(rest.len())..];
                (step as u64, raw)
            }
        };
        let refused_before = inbound.rejects().total();
        out.fed += 1;
        match inbound.receive(seq, &frame, now) {
            Ok(Accepted::Frame { .. }) => out.accepted += 1,
            Ok(Accepted::Held) => out.held += 1,
            Ok(Accepted::Foreign) => out.foreign += 1,
            Err(_) => {
                assert_eq!(
                    inbound.rejects().total(),
                    refused_before + 1,
                    "a refusal was not counted"
                );
                out.refused += 1;
            }
        }
        match inbound.next(now) {
            Some(slot) => {
                assert_eq!(slot.pcm.len(), codec.samples_per_frame(), "slot size");
                started = true;
                out.slots_played += 1;
            }
            // Before the first frame, or while the buffer fills, nothing plays; once it
            // played, a slot comes every frame (concealment fills the gaps).
            None => assert!(
                !started || out.accepted == 0,
                "playout stopped after it started"
            ),
        }
    }
    assert_eq!(
        out.accepted + out.held + out.foreign + out.refused,
        out.fed,
        "a frame went unaccounted"
    );
    assert_eq!(inbound.received(), out.accepted, "received count");
    out
}

/// What [`signaling_tags`] made of its input, per kind: parsed or refused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SignalOutcome {
    pub offer: bool,
    pub answer: bool,
    pub state: bool,
}

/// Tags as they arrive in a call rumor from any group member: the input is split into
/// tags at `\n` and each tag into fields at `\t`. The tags are parsed as an offer, an
/// answer and a state message, and replayed as a call history with a valid offer before
/// them. Panics if a parsed message does not survive its own round trip (parse → rumor →
/// parse), or if the history replay gives a call that is not in the input.
pub fn signaling_tags(data: &[u8]) -> SignalOutcome {
    let text = String::from_utf8_lossy(data);
    let tags: Vec<Tag> = text
        .split('\n')
        .take(64)
        .filter_map(|line| Tag::parse(line.split('\t').take(16)).ok())
        .collect();
    let tags = Tags::from_list(tags);
    let mut out = SignalOutcome::default();
    let keys = Keys::parse(&"01".repeat(32)).expect("fixed key");
    let tags_of = |rumor: nostr_sdk::prelude::EventBuilder| rumor.build(keys.public_key()).tags;

    if let Ok(offer) = CallOffer::from_rumor(KIND_OFFER, &tags) {
        let again = CallOffer::from_rumor(KIND_OFFER, &tags_of(offer.to_rumor()));
        assert!(again.as_ref() == Ok(&offer), "offer round trip");
        out.offer = true;
    }
    if let Ok(answer) = CallAnswer::from_rumor(KIND_ANSWER, &tags) {
        let again = CallAnswer::from_rumor(KIND_ANSWER, &tags_of(answer.to_rumor()));
        assert_eq!(again, Ok(answer), "answer round trip");
        out.answer = true;
    }
    if let Ok(state) = CallState::from_rumor(KIND_STATE, &tags) {
        let again = CallState::from_rumor(KIND_STATE, &tags_of(state.to_rumor()));
        assert_eq!(again, Ok(state), "state round trip");
        out.state = true;
    }

    // The same tags under every kind, in one history, from one member at leaf 0.
    let message = |kind: Kind, tags: Tags, at: u64| SignalMessage {
        sender: keys.public_key(),
        kind,
        tags,
        created_at: Timestamp::from(at),
    };
    let history: Vec<SignalMessage> = [KIND_OFFER, KIND_ANSWER, KIND_STATE]
        .into_iter()
        .enumerate()
        .map(|(i, kind)| message(kind, tags.clone(), 1_000 + i as u64))
        .collect();
    let leaves = BTreeMap::from([(0u32, keys.public_key())]);
    let calls = calls_from_history(&history, &leaves);
    assert!(calls.len() <= usize::from(out.offer), "a call from nothing");
    out
}

/// What [`group_events`] made of its input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupOutcome {
    /// Events handed to the catch-up collection (as pages of two relays).
    pub fed: usize,
    /// Events the catch-up processed: messages, commits, proposals.
    pub processed: usize,
    /// Refused or dropped in catch-up (collection and processing), by reason.
    pub dropped: crate::group::Dropped,
    /// Whether the catch-up cursor moved.
    pub cursor_moved: bool,
    /// Events of the live stream: processed, and refused (by reason).
    pub live_processed: usize,
    pub live_dropped: crate::group::Dropped,
    /// Gift wraps: welcomes stored, and refused (by reason).
    pub welcomes: usize,
    pub wraps_dropped: crate::group::Dropped,
}

/// Records one [`group_events`] input can hold (four bytes each).
const MAX_GROUP_RECORDS: usize = 48;
/// Largest content a mutation grows an event to.
const MAX_GROWN_CONTENT: usize = 64 * 1024;

/// The genuine events of a real two-member group (Alice, admin, made it and invited Bob),
/// built offline with MDK: Bob's view of the group and the events Alice published.
struct GroupFixture {
    bob: crate::group::GroupMember<mdk_memory_storage::MdkMemoryStorage>,
    group: crate::group::Group,
    /// Alice's message (epoch 1), her self-update commit, her message in epoch 2, each
    /// stamped 100 s after the one before (the last 100 s ago).
    events: Vec<nostr_sdk::prelude::Event>,
    /// A gift-wrapped welcome for Bob to another group, and a gift-wrapped rumor that is
    /// not a welcome.
    wraps: Vec<nostr_sdk::prelude::Event>,
}

/// Alice's and Bob's keys: fixed, so inputs replay alike (MLS itself still draws fresh
/// randomness, so AFL sees slightly unstable paths).
fn fixed_keys(byte: u8) -> Keys {
    Keys::parse(&hex::encode([byte; 32])).expect("fixed key")
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// `event` with other fields, signed by a fresh key as anyone on a relay could (kind-445
/// events are signed by throwaway keys, so a valid signature proves nothing).
fn resigned(
    event: &nostr_sdk::prelude::Event,
    kind: Kind,
    content: String,
    tags: Vec<Tag>,
    at: Timestamp,
) -> nostr_sdk::prelude::Event {
    nostr_sdk::prelude::EventBuilder::new(kind, content)
        .tags(tags)
        .custom_created_at(at)
        .sign_with_keys(&fixed_keys(0x33))
        .unwrap_or_else(|_| event.clone())
}

async fn group_fixture() -> GroupFixture {
    use crate::group::GroupMember;
    use mdk_core::prelude::NostrGroupConfigData;
    use mdk_memory_storage::MdkMemoryStorage;
    use nostr_sdk::prelude::{EventBuilder, RelayUrl, UnsignedEvent};

    let (alice_keys, bob_keys) = (fixed_keys(0xa1), fixed_keys(0xb0));
    let relay = RelayUrl::parse("wss://relay.invalid").expect("url");
    let alice = GroupMember::connect(alice_keys.clone(), MdkMemoryStorage::default(), &[])
        .await
        .expect("alice");
    let bob = GroupMember::connect(bob_keys.clone(), MdkMemoryStorage::default(), &[])
        .await
        .expect("bob");
    let key_package = |member: &GroupMember<MdkMemoryStorage>, keys: &Keys| {
        let kp = member
            .mdk()
            .create_key_package_for_event(&keys.public_key(), [relay.clone()])
            .expect("key package");
        EventBuilder::new(Kind::Custom(30443), kp.content)
            .tags(kp.tags_30443)
            .sign_with_keys(keys)
            .expect("signed key package")
    };
    let config = |name: &str| {
        NostrGroupConfigData::new(
            name.to_string(),
            String::new(),
            None,
            None,
            None,
            vec![relay.clone()],
            vec![alice_keys.public_key()],
        )
    };
    let made = alice
        .mdk()
        .create_group(
            &alice_keys.public_key(),
            vec![key_package(&bob, &bob_keys)],
            config("fuzz"),
        )
        .expect("group");
    let wrap = |rumor: UnsignedEvent| {
        let (alice_keys, bob) = (alice_keys.clone(), bob_keys.public_key());
        async move {
            EventBuilder::gift_wrap(&alice_keys, &bob, rumor, [])
                .await
                .expect("gift wrap")
        }
    };
    let welcome = wrap(made.welcome_rumors[0].clone()).await;
    bob.process_gift_wrap(&welcome).await.expect("welcome");
    let pending = bob.mdk().get_pending_welcomes(None).expect("pending");
    bob.accept(&pending[0]).expect("joined");
    let gid = made.group.mls_group_id.clone();
    let group = bob.mdk().get_group(&gid).expect("stored").expect("group");

    // A second group Bob is invited to: its welcome is a genuine gift wrap to mutate.
    let other = alice
        .mdk()
        .create_group(
            &alice_keys.public_key(),
            vec![key_package(&bob, &bob_keys)],
            config("other"),
        )
        .expect("other group");
    let not_welcome = EventBuilder::new(Kind::Custom(9), "hello").build(alice_keys.public_key());
    let wraps = vec![
        wrap(other.welcome_rumors[0].clone()).await,
        wrap(not_welcome).await,
    ];

    let message = |text: &str| {
        let rumor = EventBuilder::new(Kind::Custom(9), text).build(alice_keys.public_key());
        alice
            .mdk()
            .create_message(&gid, rumor, None)
            .expect("message")
    };
    let first = message("one");
    let update = alice.mdk().self_update(&gid).expect("self update");
    alice.mdk().merge_pending_commit(&gid).expect("merged");
    let second = message("two");
    let now = Timestamp::now().as_secs();
    let events = [first, update.evolution_event, second]
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let at = Timestamp::from(now - 300 + 100 * i as u64);
            resigned(
                e,
                e.kind,
                e.content.clone(),
                e.tags.iter().cloned().collect(),
                at,
            )
        })
        .collect();
    GroupFixture {
        bob,
        group,
        events,
        wraps,
    }
}

/// One mutation of a genuine event, as a relay or anyone publishing to it could make it.
/// `op` picks the mutation and `arg` parameterises it.
fn mutated(
    base: &nostr_sdk::prelude::Event,
    op: u8,
    arg: [u8; 2],
    now: Timestamp,
) -> nostr_sdk::prelude::Event {
    use nostr_sdk::prelude::{EventId, Signature};
    let n = u16::from_be_bytes(arg);
    let tags = || base.tags.iter().cloned().collect::<Vec<Tag>>();
    let content = || base.content.clone();
    let h = || {
        base.tags
            .find(nostr_sdk::prelude::TagKind::h())
            .and_then(|t| t.content())
            .unwrap_or_default()
            .to_string()
    };
    let again = |content: String, tags: Vec<Tag>, at: Timestamp| {
        resigned(base, base.kind, content, tags, at)
    };
    match op % 14 {
        // As it was sent.
        0 => base.clone(),
        // Restamped: minutes either way (up to ~22 days), re-signed.
        1 => {
            let delta = i64::from(n as i16) * 60;
            let at = now.as_secs().saturating_add_signed(delta);
            again(content(), tags(), Timestamp::from(at))
        }
        // Restamped into the future: just past the allowed skew, far, or absurdly far.
        2 => {
            let skew = crate::group::MAX_CLOCK_SKEW.as_secs();
            let at = match n % 4 {
                0 => now.as_secs() + skew + 60 + u64::from(n),
                1 => 4_102_444_800,
                2 => u64::from(u32::MAX) + u64::from(n),
                _ => u64::MAX / 2,
            };
            again(content(), tags(), Timestamp::from(at))
        }
        // One character of the content changed.
        3 => {
            let mut chars: Vec<char> = base.content.chars().collect();
            if !chars.is_empty() {
                let i = usize::from(arg[0]) % chars.len();
                chars[i] = char::from(arg[1]);
            }
            again(chars.into_iter().collect(), tags(), base.created_at)
        }
        // Content cut short.
        4 => {
            let cut: String = base.content.chars().take(usize::from(n)).collect();
            again(cut, tags(), base.created_at)
        }
        // Another group's (or no valid) `h` value.
        5 => {
            let mut t: Vec<Tag> = tags()
                .into_iter()
                .filter(|t| t.kind() != nostr_sdk::prelude::TagKind::h())
                .collect();
            let value = match arg[0] % 3 {
                0 => hex::encode([arg[1]; 32]),
                1 => h()[..h().len().min(usize::from(arg[1]))].to_string(),
                _ => h().to_uppercase(),
            };
            t.push(Tag::parse(["h", value.as_str()]).expect("tag"));
            again(content(), t, base.created_at)
        }
        // No `h` tag, or a second one.
        6 => {
            let mut t = tags();
            if arg[0].is_multiple_of(2) {
                t.retain(|t| t.kind() != nostr_sdk::prelude::TagKind::h());
            } else {
                let value = hex::encode([arg[1]; 32]);
                t.push(Tag::parse(["h", value.as_str()]).expect("tag"));
            }
            again(content(), t, base.created_at)
        }
        // Junk tags added.
        7 => {
            let mut t = tags();
            for i in 0..usize::from(arg[0] % 64) {
                let name = char::from(b'a' + (i as u8 % 26)).to_string();
                t.push(Tag::parse([name, "x".repeat(usize::from(arg[1]))]).expect("tag"));
            }
            again(content(), t, base.created_at)
        }
        // The original id and signature over changed content (a forged copy).
        8 => {
            let mut e = base.clone();
            e.content = format!("{}{}", base.content, char::from(arg[0]));
            e
        }
        // A signature with a byte flipped.
        9 => {
            let mut sig = base.sig.serialize();
            sig[usize::from(arg[0]) % 64] ^= arg[1] | 1;
            let mut e = base.clone();
            e.sig = Signature::from_slice(&sig).unwrap_or(base.sig);
            e
        }
        // An id that is not the hash of the event.
        10 => {
            let mut e = base.clone();
            e.id = EventId::from_byte_array([arg[0]; 32]);
            e
        }
        // Another kind.
        11 => {
            let kind = Kind::from(n);
            resigned(base, kind, content(), tags(), base.created_at)
        }
        // Content that is not even base64.
        12 => {
            let junk: String = (0..usize::from(arg[0]))
                .map(|i| char::from(arg[1].wrapping_add(i as u8)))
                .collect();
            again(junk, tags(), base.created_at)
        }
        // Content grown (repeated) up to 64 KiB.
        _ => {
            let times = usize::from(arg[0]).max(2);
            let grown: String = base
                .content
                .repeat(times)
                .chars()
                .take(MAX_GROWN_CONTENT)
                .collect();
            again(grown, tags(), base.created_at)
        }
    }
}

/// Group events as a hostile relay (or anyone who can publish to it) could deliver them to
/// a member of a real group. The member (Bob) is built fresh for each input: Alice made a
/// group with him; her genuine events are a message, a commit and a message of the next
/// epoch, and two gift wraps (a welcome and a non-welcome).
///
/// Input: byte 0 picks where the catch-up resumes (odd: after Alice's first message, with
/// its id seen). Then records of four bytes `[what, op, arg, arg]`: `what & 3` picks the
/// genuine event (0..=2 group events, 3 a gift wrap by `op` parity), `what & 4` delivers it
/// on the live stream instead of the catch-up, `what & 8` through the second relay; `op`
/// and `arg` mutate it (see [`mutated`]: restamped, future-dated, content changed, cut or
/// grown, `h` tag changed or doubled, junk tags, forged id/signature, other kind).
///
/// The catch-up runs first (collection as `fetch_all` does over two relays, then
/// `process_fetched`), then the live events one by one (`process_group_event`, as `call
/// join` does), then the gift wraps (`process_gift_wrap`). Panics if an event goes
/// uncounted, if a refused event moved the cursor, if the cursor ends past the newest
/// processed event or ahead of our clock, if a future-dated event was processed, or if an
/// event whose id or signature does not verify was not refused as such.
pub fn group_events(data: &[u8]) -> GroupOutcome {
    runtime().block_on(group_events_async(data))
}

async fn group_events_async(data: &[u8]) -> GroupOutcome {
    use crate::group::{horizon, DropReason, Fetched, GroupEventOutcome};
    use nostr_sdk::prelude::{Event, EventId, TagKind};
    use std::collections::{HashMap, HashSet};

    let fx = group_fixture().await;
    let h = hex::encode(fx.group.nostr_group_id);
    let now = Timestamp::now();
    let (resume, records) = data.split_first().map_or((0, data), |(r, d)| (*r, d));
    let (since, seen) = if resume % 2 == 1 {
        let first = &fx.events[0];
        (Some(first.created_at), vec![first.id])
    } else {
        (None, Vec::new())
    };

    let mut catch_up: Vec<(bool, Event)> = Vec::new();
    let mut live: Vec<Event> = Vec::new();
    let mut wraps: Vec<Event> = Vec::new();
    for rec in records.chunks_exact(4).take(MAX_GROUP_RECORDS) {
        let (what, op, arg) = (rec[0], rec[1], [rec[2], rec[3]]);
        let base = match what & 3 {
            3 => {
                wraps.push(mutated(&fx.wraps[usize::from(op & 1)], op >> 1, arg, now));
                continue;
            }
            i => &fx.events[usize::from(i)],
        };
        let event = mutated(base, op, arg, now);
        if what & 4 != 0 {
            live.push(event);
        } else {
            catch_up.push((what & 8 != 0, event));
        }
    }

    let mut out = GroupOutcome {
        fed: catch_up.len(),
        ..Default::default()
    };
    // Collection, as `fetch_all` pages two relays.
    let mut fetched = Fetched::default();
    let mut all: HashMap<EventId, Event> = HashMap::new();
    let mut seen_at: [HashSet<EventId>; 2] = Default::default();
    let mut invalid_fed = 0;
    for (second, event) in &catch_up {
        invalid_fed += usize::from(event.verify().is_err());
        fetched.add(&mut all, &mut seen_at[usize::from(*second)], event.clone());
    }
    assert_eq!(
        fetched.duplicates + fetched.invalid_signature + all.len(),
        out.fed,
        "a collected event went uncounted"
    );
    assert!(
        all.values().all(|e| e.verify().is_ok()),
        "an event that does not verify was kept"
    );
    assert!(
        fetched.invalid_signature <= invalid_fed,
        "a valid event was refused as invalid"
    );
    assert!(
        invalid_fed <= fetched.invalid_signature + fetched.duplicates,
        "an event that does not verify was neither refused nor a repeat"
    );
    let events: Vec<Event> = all.into_values().collect();
    let sync = fx
        .bob
        .process_fetched(&fx.group, events.clone(), since, &seen)
        .await;
    let after = horizon();
    let processed =
        sync.messages.len() + sync.commits + sync.committed_proposals + sync.pending_proposals;
    assert_eq!(
        processed + sync.dropped.total(),
        sync.fetched,
        "a processed event went uncounted: {sync:?}"
    );
    assert_eq!(
        sync.fetched,
        events.iter().filter(|e| !seen.contains(&e.id)).count(),
        "events skipped"
    );
    // What could have been processed: verifies, is a group message of this group, due.
    let due = |e: &Event| {
        e.verify().is_ok()
            && e.kind == Kind::MlsGroupMessage
            && e.tags.find(TagKind::h()).and_then(|t| t.content()) == Some(h.as_str())
            && e.created_at <= after
    };
    let since_cursor = since.map(|t| (t, seen.clone()));
    match &sync.cursor {
        // Nothing processed: the cursor keeps its second. Refused events of that second join
        // its ids (settled, as at any processed second: not fetched again).
        c if processed == 0 => {
            assert_eq!(
                c.as_ref().map(|(t, _)| *t),
                since,
                "a refused event moved the cursor"
            );
            if let Some((at, ids)) = c {
                for id in ids {
                    assert!(
                        seen.contains(id)
                            || events.iter().any(|e| e.id == *id && e.created_at == *at),
                        "cursor id that is neither seen nor of its second"
                    );
                }
            }
        }
        None => panic!("events processed but no cursor"),
        Some((at, ids)) => {
            let newest = events
                .iter()
                .filter(|e| due(e))
                .map(|e| e.created_at)
                .chain(since)
                .max();
            assert!(Some(*at) <= newest, "cursor {at} past every due event");
            assert!(*at <= after, "cursor {at} ahead of our clock");
            for id in ids {
                let stamp = events.iter().find(|e| e.id == *id).map(|e| e.created_at);
                assert!(
                    stamp.is_none_or(|t| t == *at) || seen.contains(id),
                    "cursor id of another second"
                );
            }
        }
    }
    for id in &sync.commit_ids {
        let e = events.iter().find(|e| e.id == *id).expect("commit fetched");
        assert!(due(e), "a commit that was not due was applied");
    }
    out.processed = processed;
    out.cursor_moved = sync.cursor != since_cursor;
    out.dropped = sync.dropped;
    out.dropped.duplicate += fetched.duplicates;
    out.dropped.invalid_signature += fetched.invalid_signature;

    // The live stream: every event on its own, as `call join` feeds them.
    for event in &live {
        let outcome = fx.bob.process_group_event(&h, event).await;
        let after = horizon();
        match outcome {
            GroupEventOutcome::Ignored(why) => {
                if event.verify().is_err() {
                    assert_eq!(why.reason, DropReason::InvalidSignature, "{why}");
                }
                out.live_dropped.count(why.reason);
            }
            _ => {
                assert!(
                    event.verify().is_ok(),
                    "an event that does not verify was processed"
                );
                assert!(
                    event.created_at <= after,
                    "a future-dated event was processed"
                );
                out.live_processed += 1;
            }
        }
    }
    assert_eq!(out.live_processed + out.live_dropped.total(), live.len());

    for wrap in &wraps {
        match fx.bob.process_gift_wrap(wrap).await {
            Ok(()) => {
                assert!(
                    wrap.verify().is_ok(),
                    "a wrap that does not verify was taken"
                );
                out.welcomes += 1;
            }
            Err(why) => {
                if wrap.verify().is_err() {
                    assert_eq!(why.reason, DropReason::InvalidSignature, "{why}");
                }
                out.wraps_dropped.count(why.reason);
            }
        }
    }
    out
}

/// Kinds a rumor can carry, for callers that build inputs.
pub const SIGNAL_KINDS: [Kind; 3] = [KIND_OFFER, KIND_ANSWER, KIND_STATE];

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Mutations per target per `cargo test`: enough to walk the refusal paths, cheap in a
    /// debug build.
    const CASES: usize = 400;

    fn mutate(rng: &mut rand::rngs::StdRng, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..rng.gen_range(1..8) {
            match rng.gen_range(0..4) {
                0 if !v.is_empty() => {
                    let i = rng.gen_range(0..v.len());
                    v[i] = rng.gen();
                }
                1 => {
                    let i = rng.gen_range(0..=v.len());
                    v.insert(i, rng.gen());
                }
                2 if !v.is_empty() => {
                    let i = rng.gen_range(0..v.len());
                    v.remove(i);
                }
                _ => {
                    let i = rng.gen_range(0..=v.len());
                    let j = rng.gen_range(i..=v.len());
                    let copy = v[i..j].to_vec();
                    v.extend_from_slice(&copy);
                }
            }
        }
        v
    }

    /// Valid offer/answer/state tags, as our own signaling writes them.
    pub(super) fn signal_seeds() -> Vec<Vec<u8>> {
        use crate::call::signaling::{Privacy, StateAction, TrackRef};
        let keys = Keys::parse(&"01".repeat(32)).unwrap();
        let track = TrackRef {
            leaf_index: 0,
            name: [3; 8],
        };
        let offer = CallOffer {
            call_id: [9; 32],
            moq_url: "moqt://127.0.0.1:4443".parse().unwrap(),
            namespace: [5; 16],
            token: [6; 32],
            track: track.clone(),
            frame_ms: 20,
            sender_bits: 4,
            privacy: Privacy::Standard,
            delivery: Default::default(),
        };
        let answer = CallAnswer::accept([9; 32], track.clone());
        let state = CallState {
            call_id: [9; 32],
            action: StateAction::Leave,
        };
        let info = CallState {
            call_id: [9; 32],
            action: StateAction::CallInfo {
                offer: Box::new(offer.clone()),
                participants: vec![track],
            },
        };
        [
            offer.to_rumor(),
            answer.to_rumor(),
            state.to_rumor(),
            info.to_rumor(),
        ]
        .into_iter()
        .map(|r| {
            let lines: Vec<String> = r
                .build(keys.public_key())
                .tags
                .iter()
                .map(|t| t.as_slice().join("\t"))
                .collect();
            lines.join("\n").into_bytes()
        })
        .collect()
    }

    fn frame_seeds() -> Vec<Vec<u8>> {
        vec![
            // In order, then a flipped frame, a foreign one, raw junk, a reordered pair.
            [0u8, 0, 0].repeat(20),
            vec![
                0, 0, 0, 1, 0, 0, 7, 128, 200, 5, 1, 2, 3, 4, 5, 2, 3, 0, 2, 0, 0,
            ],
            vec![4, 200, 0, 4, 0, 0, 4, 1, 0, 4, 0, 0],
        ]
    }

    fn regressions(target: &str) -> Vec<Vec<u8>> {
        let dir = format!(
            "{}/tests/fuzz/regressions/{target}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Writes the seeds where `scripts/fuzz.sh` starts AFL from.
    fn write_seeds(target: &str, seeds: &[Vec<u8>]) {
        if let Ok(dir) = std::env::var("CALL_FUZZ_WRITE_SEEDS") {
            let dir = std::path::Path::new(&dir).join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
            }
        }
    }

    /// Inputs for [`group_events`]: genuine events in catch-up; a commit copy stamped in
    /// 2100 among them; forged copies and bad signatures on both relays and live; gift
    /// wraps genuine and with a bad signature; a mix of the other mutations.
    fn group_seeds() -> Vec<Vec<u8>> {
        vec![
            vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0],
            vec![0, 1, 2, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0],
            vec![
                1, 1, 8, 65, 0, 9, 0, 0, 0, 0, 9, 3, 7, 6, 10, 5, 0, 2, 0, 0, 0,
            ],
            vec![0, 3, 0, 0, 0, 3, 1, 0, 0, 3, 18, 1, 1],
            vec![
                0, 0, 5, 0, 9, 0, 6, 1, 4, 1, 7, 3, 20, 1, 4, 0, 40, 1, 3, 10, 200, 1, 13, 3, 0, 2,
                12, 30, 65, 2, 11, 0, 1, 4, 0, 0, 0, 5, 1, 255, 255, 1, 0, 0, 0, 2, 0, 0, 0,
            ],
        ]
    }

    #[test]
    fn fuzz_group_events() {
        let seeds = group_seeds();
        write_seeds("group_events", &seeds);
        let clean = group_events(&seeds[0]);
        assert_eq!(
            (clean.processed, clean.dropped.total()),
            (3, 0),
            "{clean:?}"
        );
        assert!(clean.cursor_moved, "{clean:?}");
        let future = group_events(&seeds[1]);
        assert_eq!(future.processed, 3, "{future:?}");
        assert_eq!(future.dropped.future_dated, 1, "{future:?}");
        let forged = group_events(&seeds[2]);
        assert_eq!(forged.processed, 2, "{forged:?}");
        assert_eq!(forged.dropped.invalid_signature, 2, "{forged:?}");
        assert_eq!(forged.live_dropped.invalid_signature, 1, "{forged:?}");
        let wraps = group_events(&seeds[3]);
        assert_eq!(wraps.welcomes, 1, "{wraps:?}");
        assert_eq!(wraps.wraps_dropped.unsupported, 1, "{wraps:?}");
        assert_eq!(wraps.wraps_dropped.invalid_signature, 1, "{wraps:?}");
        // Each case builds a real MLS group (slow in a debug build): fewer cases here,
        // `CALL_FUZZ_GROUP_CASES` for a long run.
        let cases = std::env::var("CALL_FUZZ_GROUP_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CASES / 10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (mut processed, mut refused) = (0, 0);
        for i in 0..cases {
            let input = mutate(&mut rng, &seeds[i % seeds.len()]);
            let o = group_events(&input);
            processed += o.processed + o.live_processed;
            refused += o.dropped.total() + o.live_dropped.total() + o.wraps_dropped.total();
        }
        assert!(
            cases == 0 || (processed > 0 && refused > 0),
            "{processed} processed, {refused} refused"
        );
        for input in regressions("group_events") {
            group_events(&input);
        }
    }

    #[test]
    fn fuzz_received_frames() {
        let seeds = frame_seeds();
        write_seeds("received_frames", &seeds);
        let clean = received_frames(&seeds[0]);
        assert_eq!(clean.accepted, 20, "{clean:?}");
        assert!(clean.slots_played > 0, "{clean:?}");
        let mixed = received_frames(&seeds[1]);
        // The flipped frame, the other member's (no key for its leaf here) and the junk.
        assert_eq!((mixed.accepted, mixed.refused), (3, 3), "{mixed:?}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut refused = 0;
        for i in 0..CASES {
            let input = mutate(&mut rng, &seeds[i % seeds.len()]);
            refused += received_frames(&input).refused;
        }
        assert!(refused > 0, "mutations never reached a refusal");
        for input in regressions("received_frames") {
            received_frames(&input);
        }
    }

    #[test]
    fn fuzz_signaling_tags() {
        let seeds = signal_seeds();
        write_seeds("signaling_tags", &seeds);
        assert!(signaling_tags(&seeds[0]).offer);
        assert!(signaling_tags(&seeds[1]).answer);
        assert!(signaling_tags(&seeds[2]).state);
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (mut parsed, mut refused) = (0, 0);
        for i in 0..CASES * 5 {
            let input = mutate(&mut rng, &seeds[i % seeds.len()]);
            let o = signaling_tags(&input);
            if o.offer || o.answer || o.state {
                parsed += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            parsed > 0 && refused > 0,
            "{parsed} parsed, {refused} refused"
        );
        for input in regressions("signaling_tags") {
            signaling_tags(&input);
        }
    }
}
