//! The bundled MoQ relay with our MoQ client: fan-out, routing among several publishers of
//! one namespace, and unknown tracks.

use std::time::Duration;

use crate::common::TestRelay;
use bytes::Bytes;
use call::transport::{call_namespace, CertVerification, MoqConnection, TransportError};

const TOKEN: &[u8] = &[7; 32];

async fn connect(relay: &TestRelay) -> MoqConnection {
    connect_with(relay, Some(TOKEN)).await
}

async fn connect_with(relay: &TestRelay, token: Option<&[u8]>) -> MoqConnection {
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let (conn, driver) = MoqConnection::connect_with_token(&relay.moq_url, &verify, token)
        .await
        .expect("connects");
    tokio::spawn(driver);
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_in_one_namespace_fan_out_to_four_subscribers() {
    let relay = TestRelay::start().await;
    let ns = call_namespace("00112233445566778899aabbccddeeff").unwrap();

    let mut pub_a = connect(&relay).await;
    let mut pub_b = connect(&relay).await;
    let (mut track_a, serve_a) = pub_a.publish(ns.clone(), "aaaaaaaaaaaaaaaa").await.unwrap();
    let (mut track_b, serve_b) = pub_b.publish(ns.clone(), "bbbbbbbbbbbbbbbb").await.unwrap();
    tokio::spawn(serve_a);
    tokio::spawn(serve_b);

    // Four subscribers, each reading both tracks as frames arrive.
    const FRAMES: u64 = 50;
    let mut readers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut conn = connect(&relay).await;
        for (name, prefix) in [("aaaaaaaaaaaaaaaa", "a"), ("bbbbbbbbbbbbbbbb", "b")] {
            let mut sub = conn
                .subscribe(ns.clone(), name, Duration::from_secs(5))
                .await
                .unwrap();
            readers.push(tokio::spawn(async move {
                let mut seen = std::collections::BTreeSet::new();
                while let Ok(next) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await
                {
                    let (seq, payload) = next.unwrap().expect("track open");
                    assert_eq!(payload, Bytes::from(format!("{prefix}{seq}")));
                    seen.insert(seq);
                    if seq == FRAMES - 1 {
                        break;
                    }
                }
                (prefix, seen)
            }));
        }
        conns.push(conn);
    }

    for seq in 0..FRAMES {
        track_a.send(seq, Bytes::from(format!("a{seq}"))).unwrap();
        track_b.send(seq, Bytes::from(format!("b{seq}"))).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    for r in readers {
        let (prefix, seen) = r.await.unwrap();
        let missing: Vec<u64> = (0..FRAMES).filter(|s| !seen.contains(s)).collect();
        assert!(missing.is_empty(), "{prefix}: missing {missing:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_nobody_publishes_is_not_found() {
    let relay = TestRelay::start().await;
    let ns = call_namespace("ffeeddccbbaa99887766554433221100").unwrap();
    let mut publisher = connect(&relay).await;
    let (_track, serve) = publisher
        .publish(ns.clone(), "0000000000000001")
        .await
        .unwrap();
    tokio::spawn(serve);

    let mut conn = connect(&relay).await;
    let err = conn
        .subscribe(ns, "0000000000000002", Duration::from_millis(300))
        .await
        .err()
        .expect("unknown track");
    assert!(matches!(err, TransportError::NotFound(_)), "{err}");
    // The relay still serves the session afterwards.
    let ns2 = call_namespace("ffeeddccbbaa99887766554433221100").unwrap();
    assert!(conn
        .subscribe(ns2, "0000000000000001", Duration::from_secs(2))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_other_than_moqt_or_https_are_refused() {
    let err = MoqConnection::connect(
        &url::Url::parse("http://127.0.0.1:1").unwrap(),
        &CertVerification::Insecure,
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, TransportError::Scheme(_)));
}

/// Reads `sub` until frame `last` or a 2 s silence; returns the sequence numbers seen.
async fn read_until(
    mut sub: call::transport::TrackSubscriber,
    last: u64,
) -> std::collections::BTreeSet<u64> {
    let mut seen = std::collections::BTreeSet::new();
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        let Some((seq, payload)) = next.expect("track readable") else {
            break;
        };
        assert_eq!(payload, Bytes::from(format!("f{seq}")));
        seen.insert(seq);
        if seq == last {
            break;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_fans_out_every_frame_to_ten_subscribers() {
    let relay = TestRelay::start().await;
    let ns = call_namespace("0123456789abcdef0123456789abcdef").unwrap();
    let mut publisher = connect(&relay).await;
    let (mut track, serve) = publisher
        .publish(ns.clone(), "1111111111111111")
        .await
        .unwrap();
    tokio::spawn(serve);

    const FRAMES: u64 = 100;
    let mut readers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut conn = connect(&relay).await;
        let sub = conn
            .subscribe(ns.clone(), "1111111111111111", Duration::from_secs(5))
            .await
            .unwrap();
        readers.push(tokio::spawn(read_until(sub, FRAMES - 1)));
        conns.push(conn);
    }
    // Audio pacing: one 20 ms frame at a time.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for seq in 0..FRAMES {
        tick.tick().await;
        track.send(seq, Bytes::from(format!("f{seq}"))).unwrap();
    }
    for (i, r) in readers.into_iter().enumerate() {
        let seen = r.await.unwrap();
        let missing: Vec<u64> = (0..FRAMES).filter(|s| !seen.contains(s)).collect();
        assert!(missing.is_empty(), "subscriber {i} missed {missing:?}");
    }
    // One upstream subscription serves all ten.
    let stats = relay.stats();
    assert_eq!(stats.upstream_tracks, 1, "{stats:?}");
    assert_eq!(stats.objects_in, FRAMES, "{stats:?}");
    assert_eq!(stats.objects_out, 10 * FRAMES, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_the_newest_frame_within_two_frame_intervals() {
    let relay = TestRelay::start().await;
    let ns = call_namespace("fedcba9876543210fedcba9876543210").unwrap();
    let mut publisher = connect(&relay).await;
    let (mut track, serve) = publisher
        .publish(ns.clone(), "2222222222222222")
        .await
        .unwrap();
    tokio::spawn(serve);
    // An early subscriber keeps the upstream track live, as in a call.
    let mut early = connect(&relay).await;
    let mut early_sub = early
        .subscribe(ns.clone(), "2222222222222222", Duration::from_secs(5))
        .await
        .unwrap();

    let sending = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for seq in 0..150u64 {
            tick.tick().await;
            track.send(seq, Bytes::from(format!("f{seq}"))).unwrap();
        }
        track
    });
    // Let the call run for a second, then join.
    let mut newest = 0;
    while newest < 50 {
        newest = early_sub.next().await.unwrap().unwrap().0;
    }
    let mut late = connect(&relay).await;
    let joined = tokio::time::Instant::now();
    let mut sub = late
        .subscribe(ns.clone(), "2222222222222222", Duration::from_secs(5))
        .await
        .unwrap();
    let (seq, payload) = sub.next().await.unwrap().unwrap();
    let waited = joined.elapsed();
    assert_eq!(payload, Bytes::from(format!("f{seq}")));
    assert!(
        waited <= Duration::from_millis(40),
        "first frame after {waited:?}"
    );
    // It starts at the newest frame, not at the start of the track.
    assert!(seq >= newest, "started at {seq}, newest was {newest}");
    let (next, _) = sub.next().await.unwrap().unwrap();
    assert!(next > seq);
    sending.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_relay_token_is_refused() {
    let relay = TestRelay::start().await;
    let ns = call_namespace("aaaabbbbccccddddeeeeffff00001111").unwrap();
    let mut owner = connect(&relay).await;
    let (mut track, serve) = owner.publish(ns.clone(), "3333333333333333").await.unwrap();
    tokio::spawn(serve);

    // Missing token: neither announce nor subscribe.
    let mut anonymous = connect_with(&relay, None).await;
    let err = anonymous
        .subscribe(ns.clone(), "3333333333333333", Duration::from_secs(1))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, TransportError::Unauthorized), "{err}");
    let err = anonymous
        .publish(ns.clone(), "4444444444444444")
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, TransportError::Unauthorized), "{err}");

    // Wrong token: same.
    let mut intruder = connect_with(&relay, Some(&[8; 32])).await;
    let err = intruder
        .subscribe(ns.clone(), "3333333333333333", Duration::from_secs(1))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, TransportError::Unauthorized), "{err}");
    let err = intruder
        .publish(ns.clone(), "5555555555555555")
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, TransportError::Unauthorized), "{err}");
    assert!(relay.stats().refused >= 4);

    // The right token works, and the refusals cost the owner nothing.
    let mut member = connect(&relay).await;
    let mut sub = member
        .subscribe(ns.clone(), "3333333333333333", Duration::from_secs(2))
        .await
        .unwrap();
    track.send(0, Bytes::from_static(b"f0")).unwrap();
    let (seq, payload) = tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((seq, payload), (0, Bytes::from_static(b"f0")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_urls_work_like_raw_quic() {
    let relay = TestRelay::start().await;
    let url = url::Url::parse(&format!("https://localhost:{}/", relay.moq_addr().port())).unwrap();
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let (mut publisher, driver) = MoqConnection::connect_with_token(&url, &verify, Some(TOKEN))
        .await
        .expect("WebTransport connect");
    tokio::spawn(driver);
    let ns = call_namespace("4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d").unwrap();
    let (mut track, serve) = publisher
        .publish(ns.clone(), "4d4d4d4d4d4d4d4d")
        .await
        .unwrap();
    tokio::spawn(serve);
    let (mut subscriber, driver) = MoqConnection::connect_with_token(&url, &verify, Some(TOKEN))
        .await
        .expect("WebTransport connect");
    tokio::spawn(driver);
    let sub = subscriber
        .subscribe(ns, "4d4d4d4d4d4d4d4d", Duration::from_secs(2))
        .await
        .unwrap();
    let reading = tokio::spawn(read_until(sub, 9));
    for seq in 0..10 {
        track.send(seq, Bytes::from(format!("f{seq}"))).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = reading.await.unwrap();
    assert_eq!(seen.len(), 10, "{seen:?}");
}

/// A token binds the call's ("call", <id>) scope, not just the exact namespace: a stranger
/// cannot open a namespace of their own inside a call someone else's token holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_binds_every_namespace_of_the_call() {
    use call::transport::participant_namespace;
    let relay = TestRelay::start().await;
    let call_id = "0101010101010101abababababababab";
    let mut owner = connect(&relay).await;
    let (_track, serve) = owner
        .publish(
            participant_namespace(call_id, "1111111111111111").unwrap(),
            "1111111111111111",
        )
        .await
        .unwrap();
    tokio::spawn(serve);

    let mut intruder = connect_with(&relay, Some(&[8; 32])).await;
    let err = intruder
        .publish(
            participant_namespace(call_id, "2222222222222222").unwrap(),
            "2222222222222222",
        )
        .await
        .err()
        .expect("a new namespace in a taken call is refused");
    assert!(matches!(err, TransportError::Unauthorized), "{err}");
    // Its own call is its own.
    let other = participant_namespace("0202020202020202cdcdcdcdcdcdcdcd", "2222222222222222");
    let (_track, _serve) = intruder
        .publish(other.unwrap(), "2222222222222222")
        .await
        .expect("another call is free");

    // A fellow participant with the call's token adds its namespace.
    let mut member = connect(&relay).await;
    let (_track, _serve) = member
        .publish(
            participant_namespace(call_id, "3333333333333333").unwrap(),
            "3333333333333333",
        )
        .await
        .expect("same token, same call");
}

/// A subscriber whose connection stalls (its network path is cut for 2 s) is not sent a
/// growing backlog: once it has a few groups waiting, new groups skip it (counted as
/// `behind`) and it gets fresh ones when it is back. Others lose nothing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_gets_fresh_frames_not_a_backlog() {
    let relay = TestRelay::start_with(call_relay::RelayConfig {
        // 160 ms of groups at 200 a second: a healthy reader that a loaded test machine
        // stalls for tens of ms is not judged behind; the cut one (2 s) still is.
        max_unsent_groups: 32,
        ..call_relay::RelayConfig::ephemeral()
    })
    .await;
    let pipe = crate::common::udp_pipe(relay.moq_addr()).await;
    let ns = call_namespace("5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a").unwrap();
    let track_name = "5a5a5a5a5a5a5a5a";
    let mut publisher = connect(&relay).await;
    let (mut track, serve) = publisher.publish(ns.clone(), track_name).await.unwrap();
    tokio::spawn(serve);

    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let piped_url: url::Url = format!("moqt://{}", pipe.addr()).parse().unwrap();
    let (mut slow, driver) = MoqConnection::connect_with_token(&piped_url, &verify, Some(TOKEN))
        .await
        .expect("connects through the pipe");
    tokio::spawn(driver);
    let mut healthy = connect(&relay).await;
    let wait = Duration::from_secs(5);
    let slow_sub = slow.subscribe(ns.clone(), track_name, wait).await.unwrap();
    let healthy_sub = healthy.subscribe(ns, track_name, wait).await.unwrap();
    // The slow subscriber's log: (arrival, seq).
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        let mut sub = slow_sub;
        while let Ok(Some((seq, _))) = sub.next().await {
            sink.lock()
                .unwrap()
                .push((tokio::time::Instant::now(), seq));
        }
    });

    // 200 frames/s: 0.5 s through, 2 s cut (the relay's stream credit for the slow session
    // runs out after about 100 groups), then 1 s through again.
    const FRAMES: u64 = 700;
    let reading = tokio::spawn(read_until(healthy_sub, FRAMES - 1));
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut restored = None;
    for seq in 0..FRAMES {
        tick.tick().await;
        if seq == 100 {
            pipe.set_cut(true);
        }
        if seq == 500 {
            pipe.set_cut(false);
            restored = Some((tokio::time::Instant::now(), seq));
        }
        track.send(seq, Bytes::from(format!("f{seq}"))).unwrap();
    }
    let seen = reading.await.unwrap();
    assert_eq!(
        seen.len() as u64,
        FRAMES,
        "the healthy subscriber lost nothing"
    );
    // QUIC on the slow path resumes at its next probe, which backs off during the cut: keep
    // sending (for 5 s at most) until the slow subscriber has a fresh frame.
    let restored_seq = restored.unwrap().1;
    let mut seq = FRAMES;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until
        && !log.lock().unwrap().iter().any(|(_, s)| *s >= restored_seq)
    {
        tick.tick().await;
        track.send(seq, Bytes::from(format!("f{seq}"))).unwrap();
        seq += 1;
    }

    let stats = relay.stats();
    assert!(stats.behind > 0, "{stats:?}");
    let log = log.lock().unwrap().clone();
    let (restored_at, restored_seq) = restored.unwrap();
    assert!(
        (log.len() as u64) < seq,
        "stale groups were skipped for the slow subscriber ({} of {seq})",
        log.len()
    );
    // Fresh audio again soon after its network is back.
    let fresh = log
        .iter()
        .find(|(_, seq)| *seq >= restored_seq)
        .expect("fresh frames after the cut");
    println!(
        "slow subscriber: {} of {seq} frames, {} skipped as behind, fresh again after {:?}",
        log.len(),
        stats.behind,
        fresh.0.duration_since(restored_at)
    );
}
