//! `call bench` end to end: each transport carries the tone through the real pipeline
//! (Opus, SFrame under an MLS exporter key, jitter buffer), behind a real impaired path, and
//! the report hangs together. Short runs; no timing thresholds.

use call::bench::{self, BenchConfig, Scenario, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_carries_the_tone_clean_and_lossy() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = BenchConfig {
        scenarios: Scenario::parse_list(&["clean".into(), "loss-10".into()]).unwrap(),
        transports: Transport::ALL.to_vec(),
        seconds: 1.5,
        frame_ms: 20,
        tone_hz: 440.0,
        seed: 3,
    };
    let report = bench::run(&config, &|_| {}).await.expect("bench runs");
    assert_eq!(report.runs.len(), 4);
    let run = |s: &str, t: Transport| {
        report
            .runs
            .iter()
            .find(|r| r.scenario == s && r.transport == t)
            .unwrap_or_else(|| panic!("no {s} {t} run"))
    };
    for r in &report.runs {
        assert!(r.frames >= 70, "{r:?}");
        assert!(r.received * 10 >= r.frames * 8, "most frames arrive: {r:?}");
        let hz = r.heard_hz.expect("something was heard");
        assert!(
            (hz - 440.0).abs() < 5.0,
            "{} {}: heard {hz}",
            r.scenario,
            r.transport
        );
        let net = r.network_ms.expect("network latency");
        let m2e = r.mouth_to_ear_ms.expect("mouth-to-ear latency");
        assert!(net.p50 <= net.p95 && net.p95 <= net.p99);
        assert!(m2e.p50 >= net.p50, "playout comes after arrival: {r:?}");
        assert!(r.wire_up_bytes_per_s > 0.0 && r.wire_up_packets_per_s > 0.0);
        assert!(
            r.wire_down_bytes_per_s > 0.0,
            "acks or RTCP come back: {r:?}"
        );
        assert_eq!(r.decrypt_failed, 0);
    }
    for t in Transport::ALL {
        let (clean, lossy) = (run("clean", *t), run("loss-10", *t));
        assert_eq!(clean.lost, 0, "{t}: nothing lost on a clean path");
        // Retransmission costs QUIC time; WebRTC conceals or rebuilds from FEC at the same
        // playout delay, so its lossy tail can sit a hair under the clean median.
        if *t == Transport::MoqStream {
            assert!(
                lossy.mouth_to_ear_ms.unwrap().p99 >= clean.mouth_to_ear_ms.unwrap().p50,
                "{t}"
            );
        }
    }
    // QUIC retransmits lost packets; RTP without NACK does not.
    let (moq, rtc) = (
        run("loss-10", Transport::MoqStream),
        run("loss-10", Transport::Webrtc),
    );
    assert!(
        rtc.lost > 0,
        "10 % loss reaches the WebRTC receiver: {rtc:?}"
    );
    assert!(
        moq.lost < rtc.lost,
        "moq {} vs webrtc {}",
        moq.lost,
        rtc.lost
    );
}
