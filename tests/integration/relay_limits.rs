//! Bad input and limits: the relay refuses with a reason and keeps serving other sessions.

use std::sync::Arc;
use std::time::Duration;

use crate::common::TestRelay;
use bytes::Bytes;
use call::transport::{call_namespace, CertVerification, MoqConnection, TransportError};
use call_relay::RelayConfig;

const TOKEN: &[u8] = &[5; 32];

async fn connect(relay: &TestRelay) -> Result<MoqConnection, TransportError> {
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let (conn, driver) =
        MoqConnection::connect_with_token(&relay.moq_url, &verify, Some(TOKEN)).await?;
    tokio::spawn(driver);
    Ok(conn)
}

/// A QUIC connection speaking the MoQ ALPN that sends `garbage` as its control stream.
async fn send_garbage(relay: &TestRelay, garbage: &[u8]) -> quinn::Connection {
    let mut tls = CertVerification::Insecure.client_config().unwrap();
    tls.alpn_protocols = vec![b"moqt-18".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(relay.moq_addr(), "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake");
    let mut uni = conn.open_uni().await.unwrap();
    uni.write_all(garbage).await.unwrap();
    let _ = uni.finish();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_input_is_refused_and_other_sessions_keep_working() {
    let relay = TestRelay::start_with(RelayConfig {
        max_object_bytes: 1024,
        ..RelayConfig::ephemeral()
    })
    .await;
    let ns = call_namespace("0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f").unwrap();
    let mut publisher = connect(&relay).await.unwrap();
    let (mut track, serve) = publisher
        .publish(ns.clone(), "7777777777777777")
        .await
        .unwrap();
    tokio::spawn(serve);
    let mut subscriber = connect(&relay).await.unwrap();
    let mut sub = subscriber
        .subscribe(ns.clone(), "7777777777777777", Duration::from_secs(5))
        .await
        .unwrap();

    // Garbage where SETUP belongs: the relay closes that connection.
    let garbage = send_garbage(&relay, &[0xff; 300]).await;
    let closed = tokio::time::timeout(Duration::from_secs(3), garbage.closed())
        .await
        .expect("relay closed the malformed session");
    assert!(
        !matches!(closed, quinn::ConnectionError::LocallyClosed),
        "{closed}"
    );

    // An oversized object between normal ones is not forwarded; the rest all arrive.
    let reading = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(next) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            let (seq, payload) = next.unwrap().expect("track open");
            assert_eq!(payload, Bytes::from(format!("f{seq}")), "frame {seq}");
            seen.push(seq);
            if seq == 19 {
                break;
            }
        }
        seen
    });
    for seq in 0..20u64 {
        let payload = if seq == 10 {
            Bytes::from(vec![0xab; 4096])
        } else {
            Bytes::from(format!("f{seq}"))
        };
        track.send(seq, payload).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = reading.await.unwrap();
    let expected: Vec<u64> = (0..20).filter(|s| *s != 10).collect();
    assert_eq!(seen, expected);
    let stats = relay.stats();
    assert!(stats.drops >= 1, "{stats:?}");
    assert_eq!(stats.sessions, 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_track_limits_refuse_with_a_reason() {
    let relay = TestRelay::start_with(RelayConfig {
        max_sessions: 2,
        max_tracks_per_session: 1,
        ..RelayConfig::ephemeral()
    })
    .await;
    let ns = call_namespace("1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e").unwrap();
    let other = call_namespace("2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e").unwrap();
    let mut first = connect(&relay).await.unwrap();
    let (mut track, serve) = first.publish(ns.clone(), "8888888888888888").await.unwrap();
    tokio::spawn(serve);

    // A second track on the same session is over its limit.
    let err = first
        .publish(other, "9999999999999999")
        .await
        .err()
        .expect("over the track limit");
    assert!(matches!(err, TransportError::AnnounceRefused(_)), "{err}");

    let mut second = connect(&relay).await.unwrap();
    // A third session is over the relay's limit.
    assert!(connect(&relay).await.is_err(), "third session admitted");

    // The admitted sessions still work.
    let mut sub = second
        .subscribe(ns, "8888888888888888", Duration::from_secs(2))
        .await
        .unwrap();
    track.send(0, Bytes::from_static(b"f0")).unwrap();
    let (seq, _) = tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seq, 0);
    assert!(relay.stats().refused >= 2);
}
