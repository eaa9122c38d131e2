//! The walking skeleton end to end: Marmot group over a real Nostr relay, signaling in MLS,
//! SFrame-encrypted Opus over a real MoQ relay.

use crate::common::TestRelay;
use call::call::demo::{self, pitch_tolerance, DemoConfig, MIN_RECEIVED};
use call::call::signaling::Privacy;
use call::transport::{CertVerification, TokenPolicy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_party_call_every_peer_hears_every_other() {
    let relay = TestRelay::start().await;
    let config = DemoConfig {
        participants: 3,
        seconds: 2,
        ..demo_config(&relay)
    };
    let report = demo::run(config, &|_| {}).await.expect("demo runs");

    assert_eq!(report.reports.len(), 3);
    for p in &report.reports {
        // 2 s of 20 ms frames once everyone hears everyone; the caller sent while the
        // others joined too.
        assert!(p.sent >= 100, "{} sent {}", p.index, p.sent);
        assert!(p.first_audio_ms.is_some(), "{} heard nothing", p.index);
        assert_eq!(
            p.peers.len(),
            2,
            "participant {} hears both others",
            p.index
        );
        for peer in &p.peers {
            assert_ne!(peer.from, p.index);
            // From its first frame that reached us to the end, less the last 300 ms that
            // may still be on their way.
            assert!(
                peer.expected >= 80,
                "{} expected {}",
                p.index,
                peer.expected
            );
            assert!(
                peer.received as f64 >= MIN_RECEIVED * peer.expected as f64,
                "{} heard only {} of {} from {}",
                p.index,
                peer.received,
                peer.expected,
                peer.from
            );
            assert_eq!(peer.decrypt_failed, 0);
            assert_eq!(peer.rejects.total(), 0);
            // What arrived went through the jitter buffer: played, or dropped to catch up
            // after the receiver's thread was held up (a loaded machine); the call ends for
            // everyone at once, so the last few frames may still be in it.
            let through = peer.jitter.played + peer.jitter.drained;
            assert!(
                through as f64 >= MIN_RECEIVED * peer.expected as f64,
                "{:?}",
                peer.jitter
            );
            // Loopback loses nothing; the odd late frame under CI load is concealed.
            assert!(
                peer.jitter.concealed * 10 < peer.expected,
                "{:?}",
                peer.jitter
            );
            let heard = peer.heard_hz.expect("some audio decoded");
            assert!(
                (heard - demo::tone_of(peer.from)).abs()
                    <= pitch_tolerance(demo::tone_of(peer.from)),
                "{} heard {heard} Hz from {}, sent {}",
                p.index,
                peer.from,
                demo::tone_of(peer.from)
            );
            assert!(peer.latency_p50_ms.is_some() && peer.latency_p99_ms.is_some());
            // Mouth-to-ear covers the network part and the jitter buffer, so it is longer.
            let m2e = peer.mouth_to_ear_ms.expect("mouth-to-ear measured");
            assert!(m2e.p50 > peer.latency_p50_ms.unwrap(), "{m2e:?}");
            assert!(m2e.p50 < 200.0, "{m2e:?} on loopback");
        }
    }
    // Every participant sits on its own leaf.
    let mut leaves: Vec<u32> = report.reports.iter().map(|r| r.leaf_index).collect();
    leaves.sort();
    leaves.dedup();
    assert_eq!(leaves.len(), 3);
    assert!(report.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_certificate_that_does_not_match_the_pin_is_refused() {
    let relay = TestRelay::start().await;
    let config = DemoConfig {
        verification: CertVerification::Fingerprint([0x42; 32]),
        ..demo_config(&relay)
    };
    let err = demo::run(config, &|_| {}).await.expect_err("pin mismatch");
    let err = err.to_string();
    assert!(err.contains("connecting to"), "{err}");
    assert!(
        err.contains("certificate fingerprint does not match --moq-fingerprint"),
        "{err}"
    );
    assert!(err.contains(&relay.fingerprint), "the presented one: {err}");
    assert!(!err.contains("unreachable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_privacy_sends_payloads_of_one_size() {
    let relay = TestRelay::start().await;
    let config = DemoConfig {
        privacy: Privacy::Enhanced,
        ..demo_config(&relay)
    };
    let report = demo::run(config, &|_| {}).await.expect("demo runs");
    assert!(report.ok);
    for p in &report.reports {
        assert_eq!(
            p.peers[0].distinct_payload_sizes, 1,
            "participant {}",
            p.index
        );
    }
    // The same call in standard mode varies its sizes (VBR).
    let config = DemoConfig {
        privacy: Privacy::Standard,
        ..demo_config(&relay)
    };
    let report = demo::run(config, &|_| {}).await.expect("demo runs");
    assert!(report.reports[0].peers[0].distinct_payload_sizes > 1);
}

/// Every participant behind its own lossy, slow, jittery path to the relay: QUIC repairs the
/// loss, the jitter buffer absorbs the jitter, and the added delay shows in the latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_impaired_paths_still_hears_everyone() {
    let relay = TestRelay::start().await;
    let config = DemoConfig {
        seconds: 3,
        impairment: Some(call::transport::Impairment {
            loss: 0.05,
            pattern: call::transport::LossPattern::Random,
            delay: std::time::Duration::from_millis(30),
            jitter: std::time::Duration::from_millis(20),
            seed: 3,
        }),
        ..demo_config(&relay)
    };
    let report = demo::run(config, &|_| {}).await.expect("demo runs");
    println!("{}", serde_json::to_string(&report).unwrap());
    assert!(report.ok, "{report:?}");
    // Sender's path, then receiver's path: at least 2 × 30 ms one way.
    let p50 = report.latency_p50_ms.unwrap();
    assert!(p50 >= 60.0, "p50 {p50} ms");
    for p in &report.reports {
        for peer in &p.peers {
            assert!(peer.jitter.target_delay_ms > 20.0, "{:?}", peer.jitter);
        }
    }
}

/// Two participants for one second against `relay`, pinned to its certificate.
fn demo_config(relay: &TestRelay) -> DemoConfig {
    DemoConfig {
        participants: 2,
        seconds: 1,
        frame_ms: 20,
        moq_relay: relay.moq_url.clone(),
        nostr_relays: vec![relay.nostr_url.clone()],
        verification: CertVerification::fingerprint(&relay.fingerprint).unwrap(),
        privacy: Privacy::Standard,
        impairment: None,
        relay_token: TokenPolicy::Auto,
        delivery: Default::default(),
    }
}
