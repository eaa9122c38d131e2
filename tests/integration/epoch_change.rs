//! A real MLS commit (MDK remove) in the middle of a media stream: the remaining receiver
//! keeps decoding across the epoch change, the removed member decrypts nothing after it.

use std::time::{Duration, Instant};

use crate::common::TestRelay;
use call::group::{GroupMember, GroupRef};
use call::media::keyring::SenderKeyring;
use call::media::keys::{KidLayout, MediaType};
use call::media::opus::CodecConfig;
use call::media::pipeline::{Inbound, Outbound};
use call::media::playout::SlotKind;
use call::media::tone::ToneSource;
use mdk_core::prelude::MessageProcessingResult;
use mdk_memory_storage::MdkMemoryStorage;
use nostr_sdk::prelude::RelayUrl;

type Member = GroupMember<MdkMemoryStorage>;

const FRAMES: u64 = 150;
const COMMIT_AT: u64 = 60;
/// The commit reaches the other members this long after the sender merged it.
const COMMIT_DELAY: Duration = Duration::from_millis(45);
const NETWORK_DELAY: Duration = Duration::from_millis(30);

use crate::common::memory_member as member;

struct Listener<'a> {
    member: &'a Member,
    inbound: Inbound,
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
    let codec = CodecConfig::default();
    let mut sender = Outbound::new(
        codec,
        SenderKeyring::new(
            layout,
            MediaType::Audio,
            a1.own_leaf,
            a1.epoch,
            &a1.secret,
            None,
        )
        .unwrap(),
    )
    .unwrap();
    let t0 = Instant::now();
    let mut listeners = Vec::new();
    for m in [&bob, &carol] {
        let e = m.export_call_secret(&group, &call_id).unwrap();
        assert_eq!((e.epoch, &e.secret), (a1.epoch, &a1.secret));
        let mut inbound = Inbound::new(codec, layout, a1.own_leaf).unwrap();
        inbound.install_epoch(e.epoch, &e.secret, t0).unwrap();
        listeners.push(Listener { member: m, inbound });
    }

    // Send: every frame is "on the wire" with its arrival time.
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
        let frame = sender.encode(&pcm).unwrap();
        assert_eq!(frame.seq, seq);
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
                    l.inbound
                        .install_epoch(e.epoch, &e.secret, t0 + now)
                        .unwrap();
                }
            }
        }
        while next < wire.len() && wire[next].0 <= now {
            for l in &mut listeners {
                let f = &wire[next].1;
                // Refusals are counted by reason in the inbound's rejects.
                let _ = l.inbound.receive(f.seq, &f.payload, t0 + now);
            }
            next += 1;
        }
        for (i, l) in listeners.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(kind) = l.inbound.next(t0 + now).map(|s| s.kind) {
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

    // Run past the end: anything still held for a key that never came has expired.
    for l in &mut listeners {
        l.inbound
            .next(t0 + Duration::from_millis(20 * (FRAMES + 120)));
    }
    let (bob_l, carol_l) = (&listeners[0], &listeners[1]);
    let bob_concealed = bob_l.inbound.jitter().concealed;
    eprintln!(
        "bob: {:?}, rejects {:?}; carol: received {}, rejects {:?}",
        bob_l.inbound.jitter(),
        bob_l.inbound.rejects(),
        carol_l.inbound.received(),
        carol_l.inbound.rejects()
    );
    // Every frame, before and after the commit (those that came before it were held).
    assert_eq!(bob_l.inbound.received(), FRAMES);
    assert!(bob_concealed <= 3, "bob concealed {bob_concealed} frames");
    assert_eq!(bob_l.inbound.rejects().total(), 0);
    let bob_last = played[0]
        .iter()
        .filter_map(|k| match k {
            SlotKind::Decoded { seq } => Some(*seq),
            _ => None,
        })
        .max();
    assert_eq!(bob_last, Some(FRAMES - 1), "bob played through to the end");

    // Carol decrypted nothing after the commit: everything she got after it waited for a
    // key that never came.
    assert_eq!(carol_l.inbound.received(), COMMIT_AT);
    assert_eq!(carol_l.inbound.rejects().unknown_kid, FRAMES - COMMIT_AT);
    // And the group no longer gives her the new epoch's secret.
    let carol_now = carol.export_call_secret(&group, &call_id);
    assert!(carol_now.map_or(true, |e| e.epoch == a1.epoch && e.secret == a1.secret));
}
