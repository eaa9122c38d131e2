//! Marmot groups managed with the `call` binary alone: one home per user, real relays.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::users::{create_and_join, group_ref, User};
use crate::common::TestRelay;
use call::group::SECRET_FILES;
use nostr_sdk::prelude::*;
use serde_json::Value;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_files_are_private_state_survives_restarts_and_a_second_process_is_busy() {
    let relay = TestRelay::start().await;
    let alice = User::new("id", &[&relay.nostr_url]);
    let npub = alice.new_identity().await;
    assert!(npub.starts_with("npub1"));
    // A second process sees the same identity (state survives restarts).
    let shown = alice.ok(&["id", "show"]).await;
    assert_eq!(shown["npub"], npub);
    assert_eq!(shown["hex"].as_str().unwrap().len(), 64);
    // `id new` refuses to replace it.
    let again = alice.run(&["id", "new"]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // Key packages need the MLS database: it and both secret files are 0600.
    alice.ok(&["keys", "publish"]).await;
    for f in SECRET_FILES {
        assert_eq!(mode(&alice.home.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&alice.home), 0o700);
    // Nothing secret on stdout/stderr of any command.
    let secret = std::fs::read_to_string(alice.home.join("nostr.key")).unwrap();
    let out = alice.run(&["id", "show"]).await;
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret.trim()));

    // While another holder has the home locked, commands that change it fail at once
    // with "busy"; those that only read it work.
    let lock = std::fs::File::open(alice.home.join("lock")).unwrap();
    lock.try_lock().unwrap();
    let busy = alice.run(&["keys", "publish"]).await;
    assert_eq!(busy.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(stderr.contains("busy"), "{stderr}");
    alice.ok(&["id", "show"]).await;
    drop(lock);
    alice.ok(&["id", "show"]).await;

    // A secret file others can read is refused, not used.
    let key = alice.home.join("nostr.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = alice.run(&["id", "show"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("chmod 600"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Import: the npub matches the key, and bad keys are rejected with a reason.
    let bob = User::new("import", &[&relay.nostr_url]);
    let keys = Keys::generate();
    let nsec = keys.secret_key().to_bech32().unwrap();
    let imported = bob.ok(&["id", "import", &nsec]).await;
    assert_eq!(imported["hex"], keys.public_key().to_hex());
    // From stdin, so the key stays out of the process list.
    let dave = User::new("stdin", &[&relay.nostr_url]);
    let dave_keys = Keys::generate();
    let mut cmd = dave.command();
    cmd.args(["id", "import", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", dave_keys.secret_key().to_bech32().unwrap()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hex"], dave_keys.public_key().to_hex());
    let carol = User::new("badimport", &[&relay.nostr_url]);
    let bad = carol.run(&["id", "import", "nsec1notakey"]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid"));
    assert!(!carol.home.join("nostr.key").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_users_create_invite_accept_and_agree_on_members() {
    let relay = TestRelay::start().await;
    let (a, b, c) = (
        User::new("a", &[&relay.nostr_url]),
        User::new("b", &[&relay.nostr_url]),
        User::new("c", &[&relay.nostr_url]),
    );
    let _a_npub = a.new_identity().await;
    let b_npub = b.new_identity().await;
    let c_npub = c.new_identity().await;
    create_and_join("friends", &a, &[(&b, &b_npub), (&c, &c_npub)]).await;

    let (ma, ea) = a.members("friends").await;
    let (mb, eb) = b.members("friends").await;
    let (mc, ec) = c.members("friends").await;
    assert_eq!(ma.len(), 3);
    assert_eq!(ma, mb);
    assert_eq!(ma, mc);
    assert_eq!((ea, ea), (eb, ec));

    // list shows the group; resolution by id prefix works; an unknown name is an error.
    let list = b.ok(&["group", "list"]).await;
    let id = list["groups"][0]["id"].as_str().unwrap().to_string();
    let by_prefix = b.ok(&["group", "members", &id[..8]]).await;
    assert_eq!(by_prefix["group"]["name"], "friends");
    let missing = b.run(&["group", "members", "nope"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no group named"));

    // A second group with the same name is refused (it would make the name ambiguous),
    // naming the group that has it; nothing is created.
    let again = a.run(&["group", "create", "friends"]).await;
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already have a group named") && stderr.contains(&id),
        "{stderr}"
    );
    assert_eq!(
        a.ok(&["group", "list"]).await["groups"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_reads_nothing_later_and_the_rest_agree_on_secrets() {
    let relay = TestRelay::start().await;
    let (a, b, c) = (
        User::new("ra", &[&relay.nostr_url]),
        User::new("rb", &[&relay.nostr_url]),
        User::new("rc", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    let c_npub = c.new_identity().await;
    create_and_join("team", &a, &[(&b, &b_npub), (&c, &c_npub)]).await;

    let removed = a.ok(&["group", "remove", "team", &c_npub]).await;
    let epoch_after = removed["epoch"].as_u64().unwrap();
    let b_sync = b.ok(&["sync"]).await;
    assert_eq!(b_sync["groups"][0]["commits"], 1, "{b_sync}");
    c.ok(&["sync"]).await;

    // A message after the removal (a later second, so it sorts after the commit).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    {
        let (_home, admin) = a.open_member(&relay.nostr_url).await;
        let group = group_ref(&admin, "team");
        admin
            .send_rumor(&group, EventBuilder::new(Kind::Custom(9), "after removal"))
            .await
            .unwrap();
        admin.disconnect().await;
    }
    let b_sync = b.ok(&["sync"]).await;
    let msgs = b_sync["groups"][0]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{b_sync}");
    assert_eq!(msgs[0]["content"], "after removal");
    let c_sync = c.ok(&["sync"]).await;
    assert!(
        !c_sync.to_string().contains("after removal"),
        "removed member decrypted: {c_sync}"
    );

    let (ma, _) = a.members("team").await;
    let (mb, eb) = b.members("team").await;
    assert_eq!(ma, mb);
    assert_eq!(ma.len(), 2);
    assert_eq!(eb, epoch_after);

    // Exporter secrets: equal for A and B at the new epoch; C's state knows it was evicted
    // and exports nothing.
    let sa = a.call_secret(&relay.nostr_url, "team").await.unwrap();
    let sb = b.call_secret(&relay.nostr_url, "team").await.unwrap();
    assert_eq!(sa.epoch, epoch_after);
    assert_eq!(sb.epoch, epoch_after);
    assert_eq!(sa.secret, sb.secret);
    let sc = c.call_secret(&relay.nostr_url, "team").await;
    assert!(sc.is_err(), "an evicted member exported a call secret");
    let c_list = c.ok(&["group", "list"]).await;
    assert_ne!(c_list["groups"][0]["state"], "active", "{c_list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_member_catches_up_on_two_commits_with_sync() {
    let relay = TestRelay::start().await;
    let (a, b, c) = (
        User::new("oa", &[&relay.nostr_url]),
        User::new("ob", &[&relay.nostr_url]),
        User::new("oc", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    let c_npub = c.new_identity().await;
    create_and_join("club", &a, &[(&b, &b_npub)]).await;
    // B is offline (no process runs) while A adds C and then removes C: two commits.
    c.ok(&["keys", "publish"]).await;
    a.ok(&["group", "invite", "club", &c_npub]).await;
    let after = a.ok(&["group", "remove", "club", &c_npub]).await;
    let b_sync = b.ok(&["sync"]).await;
    assert_eq!(b_sync["groups"][0]["commits"], 2, "{b_sync}");
    let (ma, ea) = a.members("club").await;
    let (mb, eb) = b.members("club").await;
    assert_eq!(ma, mb);
    assert_eq!(ea, eb);
    assert_eq!(ea, after["epoch"].as_u64().unwrap());
    // Syncing again finds nothing new (the cursor was persisted).
    let again = b.ok(&["sync"]).await;
    assert_eq!(again["groups"][0]["fetched"], 0, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_group_events_are_logged_and_skipped() {
    let relay = TestRelay::start().await;
    let (a, b) = (
        User::new("ma", &[&relay.nostr_url]),
        User::new("mb", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("noisy", &a, &[(&b, &b_npub)]).await;
    a.ok(&["group", "create", "other"]).await;

    let (_home, admin) = a.open_member(&relay.nostr_url).await;
    let group = group_ref(&admin, "noisy");
    let other = group_ref(&admin, "other");
    let h = group.h_tag();
    // A real message of another group, re-tagged with this group's `h`.
    admin
        .send_rumor(&other, EventBuilder::new(Kind::Custom(9), "wrong group"))
        .await
        .unwrap();
    let junk_keys = Keys::generate();
    let client = Client::new(junk_keys.clone());
    client.add_relay(relay.nostr_url.as_str()).await.unwrap();
    client.connect().await;
    let h_tag = Tag::custom(TagKind::h(), [h.clone()]);
    let bad = [
        EventBuilder::new(Kind::MlsGroupMessage, "%%% not base64 %%%"),
        EventBuilder::new(
            Kind::MlsGroupMessage,
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ),
        EventBuilder::new(Kind::MlsGroupMessage, ""),
    ];
    for builder in bad {
        let ev = builder
            .tag(h_tag.clone())
            .sign_with_keys(&junk_keys)
            .unwrap();
        client.send_event(&ev).await.unwrap();
    }
    // Another group's ciphertext under this group's h tag.
    let other_events = client
        .fetch_events(
            Filter::new()
                .kind(Kind::MlsGroupMessage)
                .custom_tag(SingleLetterTag::lowercase(Alphabet::H), other.h_tag()),
            std::time::Duration::from_secs(3),
        )
        .await
        .unwrap();
    let stolen = other_events.into_iter().next().unwrap();
    let retagged = EventBuilder::new(Kind::MlsGroupMessage, stolen.content.clone())
        .tag(h_tag.clone())
        .sign_with_keys(&junk_keys)
        .unwrap();
    client.send_event(&retagged).await.unwrap();

    // Wrong kind and wrong h are refused before MDK sees them (the relay filter would not
    // deliver them, so they are handed in directly).
    let wrong_kind = EventBuilder::new(Kind::TextNote, "hi")
        .tag(h_tag.clone())
        .sign_with_keys(&junk_keys)
        .unwrap();
    match admin.process_group_event(&h, &wrong_kind).await {
        call::group::GroupEventOutcome::Ignored(why) => {
            assert!(why.detail.contains("kind"), "{why}")
        }
        other => panic!("accepted a wrong kind: {other:?}"),
    }
    match admin.process_group_event(&h, &stolen).await {
        call::group::GroupEventOutcome::Ignored(why) => {
            assert!(why.detail.contains("h tag"), "{why}")
        }
        other => panic!("accepted a wrong h tag: {other:?}"),
    }
    // And a good message after the junk.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    admin
        .send_rumor(&group, EventBuilder::new(Kind::Custom(9), "still here"))
        .await
        .unwrap();
    admin.disconnect().await;
    drop(_home);
    client.disconnect().await;

    let out = b.run(&["sync"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let g = &v["groups"][0];
    assert_eq!(g["ignored"], 4, "{v}\n{stderr}");
    assert_eq!(g["messages"][0]["content"], "still here", "{v}");
    assert_eq!(
        stderr.matches("ignoring group event").count(),
        4,
        "{stderr}"
    );
    assert!(!stderr.contains("panick"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaves_and_an_admin_commits_it_on_sync() {
    let relay = TestRelay::start().await;
    let (a, b, c) = (
        User::new("la", &[&relay.nostr_url]),
        User::new("lb", &[&relay.nostr_url]),
        User::new("lc", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    let c_npub = c.new_identity().await;
    create_and_join("band", &a, &[(&b, &b_npub), (&c, &c_npub)]).await;
    let left = b.ok(&["group", "leave", "band"]).await;
    assert_eq!(left["was_admin"], false);
    let a_sync = a.ok(&["sync"]).await;
    assert_eq!(a_sync["groups"][0]["committed_proposals"], 1, "{a_sync}");
    // A's own commit is not fetched and processed again.
    let a_again = a.ok(&["sync"]).await;
    assert_eq!(a_again["groups"][0]["fetched"], 0, "{a_again}");
    let c_sync = c.ok(&["sync"]).await;
    assert_eq!(c_sync["groups"][0]["pending_proposals"], 1, "{c_sync}");
    assert_eq!(c_sync["groups"][0]["commits"], 1, "{c_sync}");
    let (ma, ea) = a.members("band").await;
    let (mc, ec) = c.members("band").await;
    assert_eq!(ma, mc);
    assert_eq!(ea, ec);
    assert_eq!(ma.len(), 2);
    let b_hex = b.ok(&["id", "show"]).await["hex"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!ma.contains(&b_hex));
    b.ok(&["sync"]).await;
    let b_list = b.ok(&["group", "list"]).await;
    assert_ne!(b_list["groups"][0]["state"], "active", "{b_list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_work_when_one_of_two_relays_is_down() {
    let relay = TestRelay::start().await;
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        url::Url::parse(&format!("ws://{}", l.local_addr().unwrap())).unwrap()
    };
    let (a, b, c) = (
        User::new("da", &[&dead, &relay.nostr_url]),
        User::new("db", &[&relay.nostr_url, &dead]),
        User::new("dc", &[&dead, &relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    let c_npub = c.new_identity().await;
    let started = std::time::Instant::now();
    create_and_join("split", &a, &[(&b, &b_npub)]).await;
    c.ok(&["keys", "publish"]).await;
    a.ok(&["group", "invite", "split", &c_npub]).await;
    c.ok(&["group", "accept", "all"]).await;
    let b_sync = b.ok(&["sync"]).await;
    assert_eq!(b_sync["groups"][0]["commits"], 1, "{b_sync}");
    let (ma, ea) = a.members("split").await;
    let (mb, eb) = b.members("split").await;
    let (mc, ec) = c.members("split").await;
    assert_eq!(ma.len(), 3);
    assert_eq!((&ma, ea), (&mb, eb));
    assert_eq!((&ma, ea), (&mc, ec));
    eprintln!("flow with a dead relay took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admins_committing_in_one_epoch_converge() {
    let relay = TestRelay::start().await;
    let users: Vec<User> = ["ca", "cb", "cc", "cd", "ce"]
        .iter()
        .map(|t| User::new(t, &[&relay.nostr_url]))
        .collect();
    let mut npubs = Vec::new();
    for u in &users {
        npubs.push(u.new_identity().await);
    }
    let (a, b, e) = (&users[0], &users[1], &users[4]);
    for u in &users[1..] {
        u.ok(&["keys", "publish"]).await;
    }
    let created = a
        .ok(&[
            "group", "create", "race", "--invite", &npubs[1], "--invite", &npubs[2], "--invite",
            &npubs[3], "--invite", &npubs[4], "--admin", &npubs[1],
        ])
        .await;
    for u in &users[1..] {
        u.ok(&["group", "accept", "all"]).await;
    }
    let epoch0 = created["epoch"].as_u64().unwrap();

    // At the same time, A (the binary) removes C and B (through the library, which does
    // not catch up first) removes D: two commits for one epoch.
    let a_args = ["group", "remove", "race", &npubs[2]];
    let a_remove = a.run(&a_args);
    let b_remove = async {
        let (_home, bm) = b.open_member(&relay.nostr_url).await;
        let g = group_ref(&bm, "race");
        let d = PublicKey::parse(&npubs[3]).unwrap();
        let outcome = bm.remove(&g.mls_group_id, &[d], None).await.unwrap();
        bm.disconnect().await;
        outcome.merged
    };
    let (a_out, b_merged) = tokio::join!(a_remove, b_remove);
    let a_merged = a_out.status.code() == Some(0);
    if !a_merged {
        let stderr = String::from_utf8_lossy(&a_out.stderr);
        assert!(stderr.contains("came first"), "{stderr}");
    }
    assert!(a_merged || b_merged, "one of the commits must win");
    eprintln!("A's commit merged: {a_merged}, B's: {b_merged}");
    for _ in 0..2 {
        for u in [a, b, e] {
            u.ok(&["sync"]).await;
        }
    }
    let (ma, ea) = a.members("race").await;
    let (mb, eb) = b.members("race").await;
    let (me, ee) = e.members("race").await;
    // Both apply only if one committer saw the other's commit before making its own.
    let applied = u64::from(a_merged) + u64::from(b_merged);
    assert_eq!(ea, epoch0 + applied);
    assert_eq!((ea, &ma), (eb, &mb));
    assert_eq!((ea, &ma), (ee, &me));
    assert_eq!(ma.len() as u64, 5 - applied);
    let sa = a.call_secret(&relay.nostr_url, "race").await.unwrap();
    let sb = b.call_secret(&relay.nostr_url, "race").await.unwrap();
    let se = e.call_secret(&relay.nostr_url, "race").await.unwrap();
    assert_eq!(sa.secret, sb.secret);
    assert_eq!(sa.secret, se.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_no_relay_accepts_is_cleared_and_the_epoch_stays() {
    let relay = TestRelay::start().await;
    let (a, b) = (
        User::new("na", &[&relay.nostr_url]),
        User::new("nb", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("lonely", &a, &[(&b, &b_npub)]).await;
    let (_home, admin) = a.open_member(&relay.nostr_url).await;
    let group = group_ref(&admin, "lonely");
    let epoch = admin.groups().unwrap()[0].epoch;
    drop(relay);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let b_pk = PublicKey::parse(&b_npub).unwrap();
    let err = admin
        .remove(&group.mls_group_id, &[b_pk], None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, call::group::GroupError::CommitNotAccepted(_)),
        "{err}"
    );
    assert!(err.to_string().contains("pending commit cleared"), "{err}");
    // Nothing was merged, and no commit is left pending: the group can commit again.
    assert_eq!(admin.groups().unwrap()[0].epoch, epoch);
    assert_eq!(admin.leaf_map(&group).unwrap().len(), 2);
    assert!(admin
        .mdk()
        .remove_members(&group.mls_group_id, &[b_pk])
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_way_leaves_the_home_usable_and_blocks_others_while_alive() {
    let relay = TestRelay::start().await;
    let a = User::new("kill", &[&relay.nostr_url]);
    a.new_identity().await;
    let created = a.ok(&["group", "create", "kept"]).await;

    // A relay that accepts TCP but never answers keeps `call sync` busy connecting.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("ws://{}", silent.local_addr().unwrap());
    let mut stuck = a.command();
    stuck
        .env("CALL_NOSTR_RELAYS", &silent_url)
        .env("CALL_LOG", "nostr_relay_pool=debug")
        .arg("sync");
    stuck.stdout(std::process::Stdio::null());
    stuck.stderr(std::process::Stdio::piped());
    let mut child = stuck.spawn().unwrap();
    // It connects to relays only after it locked the home.
    let stderr = child.stderr.take().unwrap();
    tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        while let Some(Ok(line)) = lines.next() {
            if line.contains("Connecting to") {
                // Keep draining so the child never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return;
            }
        }
        panic!("the stuck process never tried to connect");
    })
    .await
    .unwrap();
    let busy = a.run(&["sync"]).await;
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("busy"));
    // Reading works beside it.
    a.ok(&["group", "list"]).await;
    child.kill().unwrap();
    child.wait().unwrap();

    // The lock died with the process; the state is intact.
    let list = a.ok(&["group", "list"]).await;
    assert_eq!(list["groups"][0]["id"], created["id"]);
    assert_eq!(list["groups"][0]["epoch"], created["epoch"]);
    a.ok(&["sync"]).await;
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_leaves_by_giving_up_admin_rights_first() {
    let relay = TestRelay::start().await;
    let (a, b, c) = (
        User::new("xa", &[&relay.nostr_url]),
        User::new("xb", &[&relay.nostr_url]),
        User::new("xc", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    let c_npub = c.new_identity().await;
    for u in [&b, &c] {
        u.ok(&["keys", "publish"]).await;
    }
    a.ok(&[
        "group", "create", "duo", "--invite", &b_npub, "--invite", &c_npub, "--admin", &b_npub,
    ])
    .await;
    b.ok(&["group", "accept", "all"]).await;
    c.ok(&["group", "accept", "all"]).await;
    let left = a.ok(&["group", "leave", "duo"]).await;
    assert_eq!(left["was_admin"], true);
    let b_sync = b.ok(&["sync"]).await;
    let g = &b_sync["groups"][0];
    assert_eq!(
        (&g["commits"], &g["committed_proposals"]),
        (&1.into(), &1.into()),
        "{b_sync}"
    );
    c.ok(&["sync"]).await;
    let (mb, eb) = b.members("duo").await;
    let (mc, ec) = c.members("duo").await;
    assert_eq!((&mb, eb), (&mc, ec));
    let a_hex = a.ok(&["id", "show"]).await["hex"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(mb.len(), 2);
    assert!(!mb.contains(&a_hex));
    let b_view = b.ok(&["group", "list"]).await;
    assert_eq!(
        b_view["groups"][0]["admins"].as_array().unwrap().len(),
        1,
        "{b_view}"
    );
}
