//! A relay that keeps its state (issue 12, item 3): restarted with the binary's defaults
//! (a state directory) on the same ports, it has the same certificate fingerprint and the
//! same Nostr events, so a running call comes back by itself (pinned clients reconnect) and
//! group commands keep working (key packages, welcomes and group history are still there).

use std::time::{Duration, Instant};

use crate::call_session::{expect, npub, tone_session as participant};
use crate::common::{memory_member as member, TestRelay};
use call::call::session::UserCommand;
use call::call::session::{self, CallEvent, CallReport, CallTarget, EndReason, JoinOptions};
use call::group::{GroupMember, Resume};
use call::transport::{CertVerification, TokenPolicy};
use call_relay::RelayConfig;
use futures::{SinkExt, StreamExt};
use mdk_memory_storage::MdkMemoryStorage;
use nostr_sdk::prelude::{EventBuilder, JsonUtil, Keys, RelayMessage, RelayUrl};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

type Member = GroupMember<MdkMemoryStorage>;

/// How long the relay is down.
const DOWN: Duration = Duration::from_millis(300);

/// Retries `op` (a group command whose relay connection may still be coming back) until it
/// succeeds, for at most `within`; returns its value and how long it took.
async fn retry<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    within: Duration,
    what: &str,
    mut op: impl FnMut() -> F,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        match op().await {
            Ok(v) => return (v, started.elapsed()),
            Err(e) if started.elapsed() < within => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{what} still failing after {within:?}: {e:?}"),
        }
    }
}

/// For one track of a finished session: how long after `after` (the relay back) its first
/// frame arrived, and the silence around it (last frame before `after` to that first one:
/// the outage as the listener heard it).
fn resumption(
    session: &session::Session,
    track: &str,
    after: Instant,
) -> Option<(Duration, Duration)> {
    let records = session.records.as_ref().expect("frame records");
    let times: Vec<Instant> = records
        .arrived
        .iter()
        .filter(|(t, _, _)| hex::encode(t) == track)
        .map(|(_, _, at)| *at)
        .collect();
    let first_after = *times.iter().find(|t| **t > after)?;
    let last_before = times.iter().rev().find(|t| **t <= after)?;
    Some((
        first_after.duration_since(after),
        first_after.duration_since(*last_before),
    ))
}

/// Whether `p`'s tone was heard at `hz`, within the 3 Hz the other call tests allow: the
/// estimate looks at the last half second only, where a frame concealed on a loaded
/// machine moves it by a fraction of a hertz.
fn heard(p: &session::PeerReport, hz: f64) -> bool {
    p.heard_hz.is_some_and(|h| (h - hz).abs() <= 3.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_comes_back_after_a_relay_restart_and_a_member_invited_after_it_joins() {
    let state = tempfile::tempdir().unwrap();
    let relay = TestRelay::start_persistent(state.path()).await;
    let fingerprint = relay.fingerprint.clone();
    let url = RelayUrl::parse(relay.nostr_url.as_str()).unwrap();
    // Alice administers the group from outside the call; Bob and Carol talk; Dave's key
    // package is published before the restart and used after it.
    let (alice, bob, carol, dave) = (
        member(&url).await,
        member(&url).await,
        member(&url).await,
        member(&url).await,
    );
    for m in [&bob, &carol, &dave] {
        m.publish_key_package().await.unwrap();
    }
    let group = alice
        .create_group("kept", &[bob.public_key(), carol.public_key()])
        .await
        .unwrap();
    bob.accept_welcomes().await.unwrap();
    carol.accept_welcomes().await.unwrap();

    // Pinned to the first start's certificate: only a kept certificate lets them back in.
    let opts = JoinOptions {
        target: CallTarget::Auto,
        ring_timeout: Duration::ZERO,
        relay_token: TokenPolicy::Auto,
        record_frames: true,
        ..JoinOptions::new(
            Some(relay.moq_url.clone()),
            CertVerification::fingerprint(&fingerprint).unwrap(),
        )
    };
    let (b_cmd, b_cmds) = mpsc::unbounded_channel();
    let (c_cmd, c_cmds) = mpsc::unbounded_channel();
    let (d_cmd, d_cmds) = mpsc::unbounded_channel();
    let (b_tx, mut b_rx) = mpsc::unbounded_channel();
    let (c_tx, mut c_rx) = mpsc::unbounded_channel();
    let (d_tx, mut d_rx) = mpsc::unbounded_channel();
    let (c_go, c_wait) = oneshot::channel::<()>();
    let (d_go, d_wait) = oneshot::channel::<Resume>();
    let bob_call = participant(&bob, &group, None, &opts, 440.0, b_cmds, b_tx);
    let carol_call = async {
        c_wait.await.unwrap();
        participant(&carol, &group, None, &opts, 660.0, c_cmds, c_tx).await
    };
    let dave_call = async {
        let resume = d_wait.await.unwrap();
        participant(&dave, &group, resume, &opts, 880.0, d_cmds, d_tx).await
    };
    let script = async {
        let long = Duration::from_secs(40);
        expect(&mut b_rx, long, "Bob's call", |e| {
            matches!(e, CallEvent::Started { .. })
        })
        .await;
        c_go.send(()).unwrap();
        let carol_id = npub(carol.public_key());
        expect(
            &mut b_rx,
            long,
            "Carol in Bob's call",
            |e| matches!(e, CallEvent::PeerJoined { npub, .. } if *npub == carol_id),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;

        let stored_before = relay.stats().nostr_stored_bytes;
        let stopping = Instant::now();
        let relay = relay.restart(DOWN).await;
        let restarted = Instant::now();
        println!(
            "relay stopped, down {} ms, and bound again: {} ms in all",
            DOWN.as_millis(),
            restarted.duration_since(stopping).as_millis()
        );
        assert_eq!(relay.fingerprint, fingerprint, "the certificate was kept");
        assert_eq!(
            relay.stats().nostr_stored_bytes,
            stored_before,
            "the stored events were kept and counted"
        );

        // A member invited after the restart: Alice's invite needs Dave's key package from
        // before it, and her client's Nostr connection back.
        let ((), invited_after) = retry(long, "Alice's invite", || async {
            alice
                .invite(&group.mls_group_id, &[dave.public_key()], None)
                .await
                .map(|_| ())
        })
        .await;
        println!("Alice's invite went through {invited_after:?} after the restart");
        retry(long, "Dave's welcome", || async {
            match dave.accept_welcomes().await {
                Ok(groups) if !groups.is_empty() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        for rx in [&mut b_rx, &mut c_rx] {
            expect(rx, long, "the rekey for Dave's epoch", |e| {
                matches!(e, CallEvent::Rekeyed { epoch: 2 })
            })
            .await;
        }
        // Dave finds the call through the `call_info` a participant re-announced.
        let mls = dave.mdk().get_group(&group.mls_group_id).unwrap().unwrap();
        let deadline = Instant::now() + long;
        let resume = loop {
            if let Ok(synced) = dave.sync_group(&mls, None, &[]).await {
                let infos = synced
                    .messages
                    .iter()
                    .filter(|r| r.kind == call::call::signaling::KIND_STATE)
                    .count();
                if infos > 0 {
                    break synced.cursor;
                }
            }
            assert!(Instant::now() < deadline, "no call_info for Dave");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        d_go.send(resume).unwrap();
        match expect(&mut d_rx, long, "Dave joining", |e| {
            matches!(e, CallEvent::Joined { .. })
        })
        .await
        {
            CallEvent::Joined { participants, .. } => assert_eq!(participants, 2),
            _ => unreachable!(),
        }
        let dave_id = npub(dave.public_key());
        for rx in [&mut b_rx, &mut c_rx] {
            expect(
                rx,
                long,
                "Dave in the call",
                |e| matches!(e, CallEvent::PeerJoined { npub, .. } if *npub == dave_id),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for cmd in [&b_cmd, &c_cmd, &d_cmd] {
            cmd.send(UserCommand::Leave).unwrap();
        }
        // Drain the status events so the channels do not grow.
        while b_rx.try_recv().is_ok() {}
        while c_rx.try_recv().is_ok() {}
        while d_rx.try_recv().is_ok() {}
        (relay, restarted)
    };
    let (bob_session, carol_session, dave_session, (relay, restarted)) =
        tokio::join!(bob_call, carol_call, dave_call, script);
    let dave_report = &dave_session.report;

    let peer = |r: &CallReport, who: &Member| {
        let id = npub(who.public_key());
        r.peers
            .iter()
            .find(|p| p.npub == id)
            .unwrap_or_else(|| panic!("{id} missing from {r:?}"))
            .clone()
    };
    for (name, session, other, other_hz) in [
        ("Bob", &bob_session, &carol, 660.0),
        ("Carol", &carol_session, &bob, 440.0),
    ] {
        let report = &session.report;
        assert_eq!(report.ended_by, EndReason::Stopped, "{name}");
        assert_eq!(report.epochs, vec![1, 2], "{name}");
        let p = peer(report, other);
        // Both talked throughout: 2 s before the restart, then until 2 s after Dave joined,
        // less the outage: about 6 s at 50 frames/s now that the group's signaling is back
        // about a second after the relay (it took ~10 s with nostr-sdk's default reconnect
        // interval, which made this call, and this count, longer); 4 s of frames leaves
        // room for a loaded machine.
        assert!(p.received >= 200, "{p:?}");
        assert!(heard(&p, other_hz), "{p:?}");
        assert_eq!(p.rejects.auth_failed, 0, "{p:?}");
        let (back_after, silence) = resumption(session, &p.track, restarted)
            .unwrap_or_else(|| panic!("{name} heard nothing after the restart"));
        println!(
            "{name} heard the other talker again {} ms after the relay was back \
             (silence {} ms, relay down {} ms)",
            back_after.as_millis(),
            silence.as_millis(),
            DOWN.as_millis()
        );
        // The issue's target is 2 s; the bound here leaves room for a loaded CI machine,
        // the printed figure is what counts.
        assert!(
            back_after <= Duration::from_secs(5),
            "{name}: {back_after:?}"
        );
        // And Dave, who joined after the restart, was heard.
        let d = peer(report, &dave);
        assert!(heard(&d, 880.0), "{name}: {d:?}");
    }
    assert_eq!(dave_report.ended_by, EndReason::Stopped);
    assert!(heard(&peer(dave_report, &bob), 440.0), "{dave_report:?}");
    assert!(heard(&peer(dave_report, &carol), 660.0), "{dave_report:?}");
    // Every track went through the restarted relay: about 4 s of three talkers to two
    // listeners each.
    assert!(relay.stats().objects_out >= 600, "{:?}", relay.stats());
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn nostr_ws(relay: &TestRelay) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(relay.nostr_url.as_str())
        .await
        .expect("WebSocket to the Nostr relay");
    ws
}

async fn next_relay_message(ws: &mut Ws) -> RelayMessage<'static> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("relay answers")
            .expect("connection open")
            .expect("readable");
        if let Message::Text(text) = msg {
            return RelayMessage::from_json(text.as_str()).expect("a NIP-01 relay message");
        }
    }
}

/// Publishes a note of `content`; its id and whether the relay took it.
async fn publish(ws: &mut Ws, content: String) -> (String, bool) {
    let event = EventBuilder::text_note(content)
        .sign_with_keys(&Keys::generate())
        .unwrap();
    let msg = format!(r#"["EVENT",{}]"#, event.as_json());
    ws.send(Message::Text(msg.into())).await.unwrap();
    match next_relay_message(ws).await {
        RelayMessage::Ok { status, .. } => (event.id.to_hex(), status),
        other => panic!("{other:?}"),
    }
}

/// The ids of every stored note, from a new connection.
async fn stored_ids(relay: &TestRelay) -> Vec<String> {
    let mut ws = nostr_ws(relay).await;
    ws.send(Message::Text(r#"["REQ","all",{"kinds":[1]}]"#.into()))
        .await
        .unwrap();
    let mut ids = Vec::new();
    loop {
        match next_relay_message(&mut ws).await {
            RelayMessage::Event { event, .. } => ids.push(event.id.to_hex()),
            RelayMessage::EndOfStoredEvents(_) => break,
            other => panic!("unexpected answer to REQ: {other:?}"),
        }
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_serves_the_events_from_before_and_counts_them_against_its_quota() {
    const QUOTA: u64 = 21_000;
    let state = tempfile::tempdir().unwrap();
    let relay = TestRelay::start_with(RelayConfig {
        ephemeral: false,
        state_dir: Some(state.path().to_path_buf()),
        nostr_max_stored_bytes: QUOTA,
        ..RelayConfig::ephemeral()
    })
    .await;
    let fingerprint = relay.fingerprint.clone();
    let mut ws = nostr_ws(&relay).await;
    let mut accepted = Vec::new();
    for i in 0..4 {
        let (id, ok) = publish(&mut ws, format!("{i}{}", "k".repeat(3000))).await;
        assert!(ok);
        accepted.push(id);
    }
    accepted.sort();
    let bytes = relay.stats().nostr_stored_bytes;
    assert!(bytes > 12_000, "{:?}", relay.stats());
    drop(ws);

    let relay = relay.restart(DOWN).await;
    assert_eq!(relay.fingerprint, fingerprint);
    assert_eq!(
        stored_ids(&relay).await,
        accepted,
        "events from before the restart"
    );
    assert_eq!(relay.stats().nostr_stored_bytes, bytes, "counted at start");
    // The quota counts them: two more 3.3 kB notes fit in 21 kB, the third does not.
    let mut ws = nostr_ws(&relay).await;
    let mut taken = 0;
    loop {
        let (_, ok) = publish(&mut ws, format!("after {taken} {}", "k".repeat(3000))).await;
        if !ok {
            break;
        }
        taken += 1;
        assert!(taken < 10, "quota never reached");
    }
    assert_eq!(taken, 2, "{:?}", relay.stats());
    assert_eq!(relay.stats().nostr_quota_refused, 1);

    // And once more, with the refused one absent: a restart does not lose what the quota
    // let in.
    let relay = relay.restart(DOWN).await;
    assert_eq!(stored_ids(&relay).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_relay_keeps_nothing_across_a_restart() {
    let relay = TestRelay::start().await;
    let fingerprint = relay.fingerprint.clone();
    let mut ws = nostr_ws(&relay).await;
    assert!(publish(&mut ws, "gone".into()).await.1);
    drop(ws);
    let relay = relay.restart(DOWN).await;
    assert_ne!(relay.fingerprint, fingerprint);
    assert!(stored_ids(&relay).await.is_empty());
}
