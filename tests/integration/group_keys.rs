//! Media keys come from the MLS exporter of one group: another group's keys open nothing.

use crate::common::TestRelay;
use call::group::{GroupMember, GroupRef};
use call::media::keys::{KidLayout, MediaType};
use call::media::sframe::{ReceiverKeys, SenderKeys};
use mdk_memory_storage::MdkMemoryStorage;
use nostr_sdk::prelude::RelayUrl;

type Member = GroupMember<MdkMemoryStorage>;

async fn two_member_group(relay: &RelayUrl) -> (Member, Member, GroupRef) {
    let admin = crate::common::memory_member(relay).await;
    let guest = crate::common::memory_member(relay).await;
    guest.publish_key_package().await.unwrap();
    let group = admin
        .create_group("keys test", &[guest.public_key()])
        .await
        .unwrap();
    let joined = guest.accept_welcomes().await.unwrap();
    assert_eq!(joined[0].mls_group_id, group.mls_group_id);
    (admin, guest, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_does_not_decrypt_under_another_groups_exporter() {
    let relay = TestRelay::start().await;
    let url = RelayUrl::parse(relay.nostr_url.as_str()).unwrap();
    let (a_admin, a_guest, group_a) = two_member_group(&url).await;
    let (_b_admin, b_guest, group_b) = two_member_group(&url).await;

    let call_id = [7u8; 32];
    let sender = a_admin.export_call_secret(&group_a, &call_id).unwrap();
    let same_group = a_guest.export_call_secret(&group_a, &call_id).unwrap();
    let other_group = b_guest.export_call_secret(&group_b, &call_id).unwrap();
    // Both groups are at the same epoch with the admin on leaf 0, so the KIDs coincide and
    // only the keys differ.
    assert_eq!(sender.epoch, other_group.epoch);
    assert_eq!(sender.own_leaf, 0);

    let layout = KidLayout::new(4).unwrap();
    let mut tx = SenderKeys::new(
        &sender.secret,
        layout,
        MediaType::Audio,
        sender.own_leaf,
        sender.epoch,
        0,
    )
    .unwrap();
    let frame = tx.encrypt(b"opus frame").unwrap().to_vec();

    let mut right = ReceiverKeys::new();
    right
        .add_sender(
            &same_group.secret,
            layout,
            MediaType::Audio,
            0,
            same_group.epoch,
        )
        .unwrap();
    assert_eq!(right.decrypt(&frame).unwrap().1, b"opus frame");

    let mut wrong = ReceiverKeys::new();
    wrong
        .add_sender(
            &other_group.secret,
            layout,
            MediaType::Audio,
            0,
            other_group.epoch,
        )
        .unwrap();
    let err = wrong.decrypt(&frame).unwrap_err();
    assert_eq!(err.reason(), "auth_failed", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_one_group_export_equal_secrets_and_distinct_per_call() {
    let relay = TestRelay::start().await;
    let url = RelayUrl::parse(relay.nostr_url.as_str()).unwrap();
    let (admin, guest, group) = two_member_group(&url).await;
    let a1 = admin.export_call_secret(&group, &[1; 32]).unwrap();
    let g1 = guest.export_call_secret(&group, &[1; 32]).unwrap();
    let a2 = admin.export_call_secret(&group, &[2; 32]).unwrap();
    assert_eq!(a1.secret, g1.secret);
    assert_ne!(a1.secret, a2.secret);
    assert_ne!(a1.own_leaf, g1.own_leaf);
}
