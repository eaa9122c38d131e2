//! A real MLS commit (MDK remove) in the middle of a media stream: the remaining receiver
//! keeps decoding across the epoch change, the removed member decrypts nothing after it.

mod common;

use std::time::{Duration, Instant};

use call::group::{GroupMember, GroupRef};
use call::media::keyring::{Received, ReceiverKeyring, SenderKeyring};
use call::media::keys::{KidLayout, MediaType};
use call::media::opus::{CodecConfig, OpusEncoder};
use call::media::playout::{PlayoutDecoder, SlotKind};
use call::media::tone::ToneSource;
use common::TestRelay;
use mdk_core::prelude::MessageProcessingResult;
use mdk_memory_storage::MdkMemoryStorage;
use nostr_sdk::prelude::RelayUrl;

type Member = GroupMember<MdkMemoryStorage>;

const FRAMES: u64 = 150;
const COMMIT_AT: u64 = 60;
/// The commit reaches the other members this long after the sender merged it.
const COMMIT_DELAY: Duration = Duration::from_millis(45);
const NETWORK_DELAY: Duration = Duration::from_millis(30);

use common::memory_member as member;

struct Listener<'a> {
    member: &'a Member,
    keys: ReceiverKeyring,
    player: PlayoutDecoder,
    decrypted_after_commit: u64,
}

impl Listener<'_> {
    fn receive(&mut self, frame: &[u8], now: Instant) {
        if let Ok(Received::Frame(d)) = self.keys.decrypt(frame, now) {
            self.deliver(d.ctr, d.payload, d.epoch, now);
        }
    }

    fn deliver(&mut self, ctr: u64, payload: Vec<u8>, epoch: u64, now: Instant) {
        if epoch > 1 {
            self.decrypted_after_commit += 1;
        }
        // The sender's CTR restarts with every key, so the sequence is the frame index the
        // test keeps beside it; here every epoch-2 frame continues after COMMIT_AT.
        let seq = if epoch > 1 { COMMIT_AT + ctr } else { ctr };
        self.player.push(seq, payload, now);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_follow_a_commit_and_the_removed_member_hears_nothing_after_it() {
    let relay = TestRelay::start().await;
    let url = RelayUrl::parse(relay.nostr_url.as_str()).unwrap();
    let (alice, bob, carol) = (member(&url).await, member(&url).await, member(&url).await);
    bob.publish_key_package().await.unwrap();
    carol.publish_key_package().await.unwrap();
    let group: GroupRef = alice
        .create_group("epochs", &[bob.public_key(), carol.public_key()])
        .await
        .unwrap();
    bob.accept_welcomes().await.unwrap();
    carol.accept_welcomes().await.unwrap();

    let call_id = [0x33; 32];
    let layout = KidLayout::new(4).unwrap();
    let a1 = alice.export_call_secret(&group, &call_id).unwrap();
    let mut sender = SenderKeyring::new(
        layout,
        MediaType::Audio,
        a1.own_leaf,
        a1.epoch,
        &a1.secret,
        None,
    )
    .unwrap();
    let t0 = Instant::now();
    let leaves: Vec<u32> = alice.leaf_map(&group).unwrap().into_keys().collect();
    let codec = CodecConfig::default();
    let mut listeners = Vec::new();
    for m in [&bob, &carol] {
        let e = m.export_call_secret(&group, &call_id).unwrap();
        assert_eq!((e.epoch, &e.secret), (a1.epoch, &a1.secret));
        let mut keys = ReceiverKeyring::new(layout, MediaType::Audio);
        keys.install_epoch(e.epoch, &e.secret, leaves.iter().copied(), t0)
            .unwrap();
        listeners.push(Listener {
            member: m,
            keys,
            player: PlayoutDecoder::new(codec).unwrap(),
            decrypted_after_commit: 0,
        });
    }

    // Send: every frame is "on the wire" with its arrival time.
    let mut encoder = OpusEncoder::new(codec).unwrap();
    let mut tone = ToneSource::new(440.0);
    let mut pcm = vec![0i16; codec.samples_per_frame()];
    let mut wire = Vec::new();
    let mut commit = None;
    for seq in 0..FRAMES {
        if seq == COMMIT_AT {
            let update = alice
                .mdk()
                .remove_members(&group.mls_group_id, &[carol.public_key()])
                .unwrap();
            alice
                .mdk()
                .merge_pending_commit(&group.mls_group_id)
                .unwrap();
            let a2 = alice.export_call_secret(&group, &call_id).unwrap();
            assert_eq!(a2.epoch, a1.epoch + 1);
            sender.rekey(a2.epoch, &a2.secret).unwrap();
            commit = Some((
                Duration::from_millis(20 * seq) + COMMIT_DELAY,
                update.evolution_event,
            ));
        }
        tone.fill(&mut pcm);
        let frame = sender
            .encrypt(encoder.encode(&pcm).unwrap())
            .unwrap()
            .to_vec();
        wire.push((Duration::from_millis(20 * seq) + NETWORK_DELAY, frame));
    }
    let (commit_at, commit_event) = commit.unwrap();

    // Receive on a simulated clock, processing the commit when it "arrives".
    let mut committed = false;
    let mut next = 0;
    let mut played: Vec<Vec<SlotKind>> = vec![Vec::new(), Vec::new()];
    let mut done = [false, false];
    // Run a second past the last frame so that frames held for a key that never comes expire.
    for slot in 0..FRAMES + 60 {
        let now = Duration::from_millis(20 * slot);
        if !committed && commit_at <= now {
            committed = true;
            for l in &mut listeners {
                let result = l.member.mdk().process_message(&commit_event);
                let Ok(MessageProcessingResult::Commit { .. }) = result else {
                    // The removed member may be told it is out; it gets no new epoch.
                    continue;
                };
                // A removed member processes the commit too, but MLS then refuses it any
                // secret of the group.
                let Ok(e) = l.member.export_call_secret(&group, &call_id) else {
                    continue;
                };
                if e.epoch == a1.epoch + 1 {
                    let leaves: Vec<u32> = l.member.leaf_map(&group).unwrap().into_keys().collect();
                    let released = l
                        .keys
                        .install_epoch(e.epoch, &e.secret, leaves, t0 + now)
                        .unwrap();
                    for d in released {
                        l.deliver(d.ctr, d.payload, d.epoch, t0 + now);
                    }
                }
            }
        }
        while next < wire.len() && wire[next].0 <= now {
            for l in &mut listeners {
                l.receive(&wire[next].1, t0 + now);
            }
            next += 1;
        }
        for (i, l) in listeners.iter_mut().enumerate() {
            l.keys.retire(t0 + now);
            if done[i] {
                continue;
            }
            if let Some((kind, _)) = l.player.next(t0 + now) {
                // Playout ends with the stream's last frame.
                done[i] = matches!(
                    kind,
                    SlotKind::Decoded { seq } | SlotKind::Concealed { seq } | SlotKind::Fec { seq }
                        if seq == FRAMES - 1
                );
                played[i].push(kind);
            }
        }
    }

    let bob_l = &listeners[0];
    let carol_l = &listeners[1];
    let bob_concealed = bob_l.player.stats().concealed;
    eprintln!(
        "bob: {:?}, rejects {:?}; carol: decrypted after commit {}, rejects {:?}",
        bob_l.player.stats(),
        bob_l.keys.rejects(),
        carol_l.decrypted_after_commit,
        carol_l.keys.rejects()
    );
    assert_eq!(bob_l.keys.current_epoch(), Some(a1.epoch + 1));
    assert_eq!(bob_l.decrypted_after_commit, FRAMES - COMMIT_AT);
    assert!(bob_concealed <= 3, "bob concealed {bob_concealed} frames");
    assert_eq!(bob_l.keys.rejects().total(), 0);
    let bob_last = played[0]
        .iter()
        .filter_map(|k| match k {
            SlotKind::Decoded { seq } => Some(*seq),
            _ => None,
        })
        .max();
    assert_eq!(bob_last, Some(FRAMES - 1), "bob played through to the end");

    assert_eq!(carol_l.decrypted_after_commit, 0);
    assert_eq!(carol_l.keys.current_epoch(), Some(a1.epoch));
    // Everything Carol got after the commit waited for a key that never came.
    assert_eq!(carol_l.keys.rejects().unknown_kid, FRAMES - COMMIT_AT);
    // And the group no longer gives her the new epoch's secret.
    let carol_now = carol.export_call_secret(&group, &call_id);
    assert!(carol_now.map_or(true, |e| e.epoch == a1.epoch && e.secret == a1.secret));
}
