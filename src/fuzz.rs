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
