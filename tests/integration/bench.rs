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
    assert_eq!(report.runs.len(), 2 * Transport::ALL.len());
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
    // QUIC retransmits lost stream data; RTP without NACK does not, and neither does QUIC
    // for a datagram.
    let (moq, dgram, rtc) = (
        run("loss-10", Transport::MoqStream),
        run("loss-10", Transport::MoqDatagram),
        run("loss-10", Transport::Webrtc),
    );
    for unrepaired in [dgram, rtc] {
        assert!(
            unrepaired.lost > 0,
            "10 % loss reaches the {} receiver: {unrepaired:?}",
            unrepaired.transport
        );
        assert!(
            moq.lost < unrepaired.lost,
            "moq-stream lost {} vs {} {}",
            moq.lost,
            unrepaired.transport,
            unrepaired.lost
        );
    }
    // What reaches the ear: the stream plays (nearly) every frame from its own packet; the
    // datagram track rebuilds lost frames from FEC or conceals them. In-band FEC rebuilds
    // most single losses, so over a short run both may conceal none: the strict comparison
    // is of frames not played from their own packet.
    let unheard = |r: &bench::RunReport| r.concealed + r.fec_recovered;
    assert!(
        moq.concealed <= dgram.concealed && unheard(moq) < unheard(dgram),
        "moq-stream concealed {} (+{} FEC) vs moq-datagram {} (+{} FEC)",
        moq.concealed,
        moq.fec_recovered,
        dgram.concealed,
        dgram.fec_recovered
    );
}
