//! The reconnecting client's playout deadline and per-track counters, on a real relay.

use std::time::Duration;

use crate::common::TestRelay;
use bytes::Bytes;
use call::transport::{call_namespace, CertVerification, ClientConfig, MoqClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_past_their_playout_deadline_are_dropped_and_counted() {
    let relay = TestRelay::start().await;
    let ns = call_namespace("7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a").unwrap();
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let mut config = ClientConfig::new(relay.moq_url.clone(), verify, Some(vec![1; 32]));
    config.playout_deadline = Duration::from_millis(100);
    let (client, driver) = MoqClient::new(config);
    tokio::spawn(driver);

    let mut local = client.publish(ns.clone(), "abababababababab");
    local.announced().await.unwrap();
    let mut remote = client.subscribe(ns, "abababababababab");
    // Wait for the subscription: the first frame that arrives while we read is delivered.
    let mut seq = 0;
    let first = loop {
        local.send(seq, Bytes::from(format!("f{seq}")));
        seq += 1;
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(50), remote.next()).await {
            break got.unwrap();
        }
    };
    assert_eq!(first.1, Bytes::from(format!("f{}", first.0)));

    // Ten frames nobody reads for longer than the deadline: all late, none delivered.
    let before = remote.stats().received();
    for _ in 0..10 {
        local.send(seq, Bytes::from(format!("f{seq}")));
        seq += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(remote.stats().received() - before >= 10);
    local.send(seq, Bytes::from(format!("f{seq}")));
    let (got, _) = tokio::time::timeout(Duration::from_secs(2), remote.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, seq, "the fresh frame, not a stale one");
    assert!(remote.stats().late() >= 10, "{}", remote.stats().late());
    assert_eq!(local.stats().sent(), seq + 1);
    assert_eq!(local.stats().dropped(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_stats_carry_the_connection_rtt_and_lose_it_with_the_relay() {
    let relay = TestRelay::start().await;
    let ns = call_namespace("7b7b7b7b7b7b7b7b7b7b7b7b7b7b7b7b").unwrap();
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let (client, driver) = MoqClient::new(ClientConfig::new(
        relay.moq_url.clone(),
        verify,
        Some(vec![2; 32]),
    ));
    tokio::spawn(driver);
    let mut local = client.publish(ns.clone(), "cdcdcdcdcdcdcdcd");
    let remote = client.subscribe(ns, "cdcdcdcdcdcdcdcd");
    assert_eq!(
        local.stats().rtt(),
        None,
        "nothing measured before a connection"
    );
    local.announced().await.unwrap();
    tokio::time::sleep(call::transport::RTT_SAMPLE_INTERVAL * 2).await;
    let rtt = local.stats().rtt().expect("RTT sampled while connected");
    // Loopback: far below quinn's 333 ms initial guess, so this is a measurement.
    assert!(rtt < Duration::from_millis(50), "{rtt:?}");
    // Every track of the client rides the one connection (the value may be resampled
    // between reads, so only its presence is compared).
    assert!(remote.stats().rtt().is_some());
    assert!(client.rtt().is_some());

    relay.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while local.stats().rtt().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "RTT kept after the relay left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
