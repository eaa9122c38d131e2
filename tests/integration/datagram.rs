//! Datagram delivery (`--delivery datagram`): call-relay fans an OBJECT_DATAGRAM track out
//! under the same tokens and limits as a stream track, the reconnecting client keeps a
//! datagram track going across a relay restart, and two `call join` sessions hear each
//! other over datagrams, the joiner taking the delivery from the caller's offer.

use std::time::Duration;

use crate::call_session::{expect, npub, participant};
use crate::common::{memory_member as member, TestRelay};
use crate::reconnect::recording_subscribers;
use bytes::Bytes;
use call::call::session::{CallEvent, CallTarget, JoinOptions, UserCommand};
use call::transport::{
    call_namespace, CertVerification, ClientConfig, Delivery, MoqClient, MoqConnection,
    TokenPolicy, TransportError, MAX_DATAGRAM_PAYLOAD,
};
use call_relay::RelayConfig;
use nostr_sdk::prelude::RelayUrl;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

const TOKEN: &[u8] = &[7; 32];
const TRACK: &str = "d4d4d4d4d4d4d4d4";

async fn connect(relay: &TestRelay, token: &[u8]) -> MoqConnection {
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let (conn, driver) = MoqConnection::connect_with_token(&relay.moq_url, &verify, Some(token))
        .await
        .expect("connects");
    tokio::spawn(driver);
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_fans_a_datagram_track_out_under_tokens_and_size_limits() {
    let relay = TestRelay::start_with(RelayConfig {
        max_object_bytes: 200,
        ..RelayConfig::ephemeral()
    })
    .await;
    let ns = call_namespace("d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1").unwrap();
    let mut publisher = connect(&relay, TOKEN).await;
    let (mut track, serve) = publisher
        .publish_with(ns.clone(), TRACK, Delivery::Datagram)
        .await
        .unwrap();
    tokio::spawn(serve);

    // A session with another token may not read the call's datagram track either.
    let mut stranger = connect(&relay, &[8; 32]).await;
    match stranger
        .subscribe(ns.clone(), TRACK, Duration::from_secs(2))
        .await
    {
        Err(TransportError::Unauthorized) => {}
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("a wrong token read a datagram track"),
    }

    // Three subscribers of the one track.
    let mut readers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut conn = connect(&relay, TOKEN).await;
        let mut sub = conn
            .subscribe(ns.clone(), TRACK, Duration::from_secs(5))
            .await
            .unwrap();
        readers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(next) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
                let (seq, payload) = next.unwrap().expect("track open");
                assert_eq!(payload, Bytes::from(format!("f{seq}")), "frame {seq}");
                seen.push(seq);
                if seq == 29 {
                    break;
                }
            }
            seen
        }));
        conns.push(conn);
    }

    // Frame 10 fits a datagram but not the relay's object limit: the relay drops it.
    // Frame 20 fits no datagram: the publisher refuses it and the track goes on.
    for seq in 0..30u64 {
        let payload = match seq {
            10 => Bytes::from(vec![0xab; 500]),
            20 => Bytes::from(vec![0xcd; 3000]),
            _ => Bytes::from(format!("f{seq}")),
        };
        match track.send(seq, payload) {
            Err(TransportError::DatagramTooLarge { size, limit }) => {
                assert_eq!(seq, 20);
                assert_eq!(size, 3000);
                assert!((1000..=MAX_DATAGRAM_PAYLOAD).contains(&limit), "{limit}");
            }
            Err(e) => panic!("frame {seq}: {e}"),
            Ok(()) => assert_ne!(seq, 20, "a frame no datagram holds was sent"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for reader in readers {
        let seen = reader.await.unwrap();
        assert!(
            !seen.contains(&10) && !seen.contains(&20),
            "an oversized frame arrived: {seen:?}"
        );
        // Datagrams are not retransmitted; on loopback nearly all arrive, in order.
        assert!(seen.len() >= 25, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }
    let stats = relay.stats();
    println!("{stats:?}");
    // 28 normal frames and the one over the relay's limit reached it, all as datagrams.
    assert!(stats.datagrams_in >= 27, "{stats:?}");
    assert_eq!(stats.datagrams_in, stats.objects_in, "{stats:?}");
    assert!(stats.objects_out >= 3 * 25, "{stats:?}");
    // The oversized one: one drop per subscriber plus the object itself.
    assert!(stats.drops >= 4, "{stats:?}");
    assert!(stats.refused >= 1, "{stats:?}");
}

fn client(relay: &TestRelay) -> MoqClient {
    // The restarted relay has a new self-signed certificate: pinning would refuse it.
    let (client, driver) = MoqClient::new(
        ClientConfig::new(
            relay.moq_url.clone(),
            CertVerification::Insecure,
            Some(TOKEN.to_vec()),
        )
        .with_token_policy(TokenPolicy::Always),
    );
    tokio::spawn(driver);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_track_reaches_every_subscriber_again_after_a_relay_restart() {
    let relay = TestRelay::start().await;
    let addr = relay.moq_addr();
    let ns = call_namespace("d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2").unwrap();
    let publisher = client(&relay);
    let mut local = publisher.publish_with(ns.clone(), TRACK, Delivery::Datagram);
    tokio::time::timeout(Duration::from_secs(5), local.announced())
        .await
        .expect("announced in time")
        .expect("announced");

    let (subscribers, logs) = recording_subscribers(2, || client(&relay), &ns, TRACK);
    let sending = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for seq in 0..=300 {
            tick.tick().await;
            local.send(seq, Bytes::from(format!("f{seq}")));
        }
        local
    });

    let deadline = Instant::now() + Duration::from_secs(5);
    while logs.iter().any(|l| l.lock().unwrap().len() < 10) {
        assert!(Instant::now() < deadline, "no datagrams before the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.stop().await;
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay = TestRelay::start_on(addr).await;
    let restarted = Instant::now();
    for (i, log) in logs.iter().enumerate() {
        loop {
            let after = log
                .lock()
                .unwrap()
                .iter()
                .filter(|(t, _)| *t > stopped + Duration::from_millis(300))
                .count();
            if after >= 10 {
                break;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(5),
                "subscriber {i} did not hear the datagram track again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for s in &subscribers {
        assert_eq!(s.connects(), 2, "one reconnect per client");
    }
    assert_eq!(publisher.connects(), 2);
    let stats = relay.stats();
    assert!(stats.datagrams_in >= 10, "{stats:?}");
    assert_eq!(stats.datagrams_in, stats.objects_in, "{stats:?}");
    let local = sending.await.unwrap();
    assert!(local.stats().sent() > 0 && local.stats().dropped() > 0);
    assert_eq!(local.stats().too_large(), 0);
}

/// Which leg of the call a jittery path sits on.
#[derive(Clone, Copy, Debug)]
enum JitteryLeg {
    /// Relay -> subscriber: the client's receive loop gets the bunches.
    Subscriber,
    /// Publisher -> relay: the relay's receive loop gets them.
    Publisher,
}

/// A client of `relay` reaching it through `path` when given.
fn client_via(relay: &TestRelay, path: Option<&call::transport::ImpairedPath>) -> MoqClient {
    let mut url = relay.moq_url.clone();
    if let Some(path) = path {
        url.set_port(Some(path.addr().port())).unwrap();
    }
    let (client, driver) = MoqClient::new(
        ClientConfig::new(url, CertVerification::Insecure, Some(TOKEN.to_vec()))
            .with_token_policy(TokenPolicy::Always),
    );
    tokio::spawn(driver);
    client
}

/// 60 ms of jitter on `leg` holds datagrams back and releases them together; of 100 sent
/// after the subscription is up, how many reached the subscriber's reader.
async fn datagrams_heard_through_jitter_on(leg: JitteryLeg, seed: u64) -> usize {
    let relay = TestRelay::start().await;
    let ns = call_namespace("d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3").unwrap();
    let path = call::transport::ImpairedPath::start(
        relay.moq_addr(),
        call::transport::Impairment {
            jitter: Duration::from_millis(60),
            seed,
            ..call::transport::Impairment::none()
        },
    )
    .await
    .unwrap();
    let (publisher_path, subscriber_path) = match leg {
        JitteryLeg::Subscriber => (None, Some(&path)),
        JitteryLeg::Publisher => (Some(&path), None),
    };
    let publisher = client_via(&relay, publisher_path);
    let mut local = publisher.publish_with(ns.clone(), TRACK, Delivery::Datagram);
    tokio::time::timeout(Duration::from_secs(5), local.announced())
        .await
        .expect("announced in time")
        .expect("announced");
    let subscriber = client_via(&relay, subscriber_path);
    let mut remote = subscriber.subscribe(ns.clone(), TRACK);
    // Frames until the subscription is up, then 100 counted ones.
    let sending = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for seq in 0..400u64 {
            tick.tick().await;
            local.send(seq, Bytes::from(format!("f{seq}")));
        }
    });
    let (first, _) = tokio::time::timeout(Duration::from_secs(10), remote.next())
        .await
        .expect("a first datagram")
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let until = first + 101;
    while let Ok(Ok((seq, _))) = tokio::time::timeout(Duration::from_secs(2), remote.next()).await {
        if seq > first && seq < until {
            seen.insert(seq);
        }
        if seq >= until {
            break;
        }
    }
    sending.abort();
    println!(
        "{leg:?}: {} of 100; {:?} {:?}",
        seen.len(),
        remote.stats(),
        relay.stats()
    );
    assert_eq!(remote.stats().late(), 0);
    seen.len()
}

/// Jitter on the subscriber's path: each datagram still reaches the reader (moq-transport
/// keeps only a track's newest datagram, so the client hands its receive loop one datagram
/// per turn). Without that, about a quarter were lost here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_released_together_by_a_jittery_path_all_reach_the_reader() {
    let heard = datagrams_heard_through_jitter_on(JitteryLeg::Subscriber, 5).await;
    assert!(heard >= 95, "{heard} of 100 arrived");
}

/// The same bunching on the publisher's path reaches the relay, which copies each datagram
/// through two such cells (its upstream track's, then each subscriber's). Without turns
/// there, 71-74 of 100 arrived; with them 95-100 (a yield is a hint to the scheduler, not a
/// guarantee, hence the margin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_bunched_on_the_way_to_the_relay_are_forwarded() {
    let heard = datagrams_heard_through_jitter_on(JitteryLeg::Publisher, 5).await;
    assert!(heard >= 90, "{heard} of 100 arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_call_sessions_hear_each_other_over_datagrams_through_call_relay() {
    let relay = TestRelay::start().await;
    let url = RelayUrl::parse(relay.nostr_url.as_str()).unwrap();
    let (bob, carol) = (member(&url).await, member(&url).await);
    carol.publish_key_package().await.unwrap();
    let group = bob
        .create_group("datagrams", &[carol.public_key()])
        .await
        .unwrap();
    carol.accept_welcomes().await.unwrap();

    let base = JoinOptions {
        target: CallTarget::Auto,
        ring_timeout: Duration::ZERO,
        ..JoinOptions::new(
            Some(relay.moq_url.clone()),
            CertVerification::fingerprint(&relay.fingerprint).unwrap(),
        )
    };
    // Bob starts the call with datagrams; Carol asks for nothing and follows the offer.
    let bob_opts = JoinOptions {
        delivery: Some(Delivery::Datagram),
        ..base.clone()
    };
    let (b_cmd, b_cmds) = mpsc::unbounded_channel();
    let (c_cmd, c_cmds) = mpsc::unbounded_channel();
    let (b_tx, mut b_rx) = mpsc::unbounded_channel();
    let (c_tx, mut c_rx) = mpsc::unbounded_channel();
    let (c_go, c_wait) = oneshot::channel::<()>();
    let bob_call = participant(&bob, &group, None, &bob_opts, 440.0, b_cmds, b_tx);
    let carol_call = async {
        c_wait.await.unwrap();
        participant(&carol, &group, None, &base, 660.0, c_cmds, c_tx).await
    };
    let script = async {
        let long = Duration::from_secs(20);
        expect(&mut b_rx, long, "Bob's call", |e| {
            matches!(e, CallEvent::Started { .. })
        })
        .await;
        c_go.send(()).unwrap();
        expect(&mut c_rx, long, "Carol joining", |e| {
            matches!(e, CallEvent::Joined { .. })
        })
        .await;
        let carol_id = npub(carol.public_key());
        expect(
            &mut b_rx,
            long,
            "Carol in Bob's call",
            |e| matches!(e, CallEvent::PeerJoined { npub, .. } if *npub == carol_id),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        b_cmd.send(UserCommand::Leave).unwrap();
        c_cmd.send(UserCommand::Leave).unwrap();
        while b_rx.try_recv().is_ok() {}
        while c_rx.try_recv().is_ok() {}
    };
    let (bob_report, carol_report, ()) = tokio::join!(bob_call, carol_call, script);
    println!("Bob: {bob_report:?}\nCarol: {carol_report:?}");
    for (report, other_hz) in [(&bob_report, 660.0), (&carol_report, 440.0)] {
        assert_eq!(report.delivery, Delivery::Datagram, "{report:?}");
        let peer = &report.peers[0];
        assert_eq!(peer.heard_hz, Some(other_hz), "{peer:?}");
        // Three seconds of 20 ms frames, less the join.
        assert!(peer.received >= 100, "{peer:?}");
        assert_eq!(peer.rejects.total(), 0, "{peer:?}");
    }
    // Every object either of them sent reached the relay as a datagram.
    let stats = relay.stats();
    println!("{stats:?}");
    assert!(stats.datagrams_in >= 200, "{stats:?}");
    assert_eq!(stats.datagrams_in, stats.objects_in, "{stats:?}");
}
