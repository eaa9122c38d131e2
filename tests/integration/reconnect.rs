//! The reconnecting MoQ client against a relay that is stopped and restarted mid-call.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::TestRelay;
use bytes::Bytes;
use call::transport::{call_namespace, CertVerification, ClientConfig, MoqClient};
use moq_transport::coding::TrackNamespace;
use tokio::time::Instant;

const TOKEN: &[u8] = &[9; 32];
const TRACK: &str = "6666666666666666";

/// When each frame reached a subscriber: (arrival, sequence).
pub(crate) type ArrivalLog = Arc<Mutex<Vec<(Instant, u64)>>>;

/// `n` subscribers of `track`, each on its own client from `client`, each recording every
/// frame it hears (and checking its payload is `f{seq}`).
pub(crate) fn recording_subscribers(
    n: usize,
    client: impl Fn() -> MoqClient,
    ns: &TrackNamespace,
    track: &str,
) -> (Vec<MoqClient>, Vec<ArrivalLog>) {
    let mut subscribers = Vec::new();
    let mut logs = Vec::new();
    for _ in 0..n {
        let sub_client = client();
        let mut remote = sub_client.subscribe(ns.clone(), track);
        let log = ArrivalLog::default();
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok((seq, payload)) = remote.next().await {
                assert_eq!(payload, Bytes::from(format!("f{seq}")));
                sink.lock().unwrap().push((Instant::now(), seq));
            }
        });
        subscribers.push(sub_client);
        logs.push(log);
    }
    (subscribers, logs)
}

fn client(relay: &TestRelay) -> MoqClient {
    // The restarted relay has a new self-signed certificate: pinning would refuse it.
    let _ = &relay.fingerprint;
    let (client, driver) = MoqClient::new(ClientConfig::new(
        relay.moq_url.clone(),
        CertVerification::Insecure,
        Some(TOKEN.to_vec()),
    ));
    tokio::spawn(driver);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_flow_again_to_every_subscriber_within_2s_of_a_relay_restart() {
    const DOWN: Duration = Duration::from_millis(1500);
    let relay = TestRelay::start().await;
    let addr = relay.moq_addr();
    let ns = call_namespace("5555aaaa5555aaaa5555aaaa5555aaaa").unwrap();

    let publisher = client(&relay);
    let mut local = publisher.publish(ns.clone(), TRACK);
    tokio::time::timeout(Duration::from_secs(5), local.announced())
        .await
        .expect("announced in time")
        .expect("announced");

    // Three subscribers record when each frame reached them.
    let (subscribers, logs) = recording_subscribers(3, || client(&relay), &ns, TRACK);

    // The call: a frame every 20 ms, whatever happens to the relay, until the checks are
    // done (60 s at most). In-process, the stopped relay's port is free again only once
    // quinn has drained its connections, which has taken up to ~8 s here.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let sending = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for seq in 0..3000 {
            tick.tick().await;
            local.send(seq, Bytes::from(format!("f{seq}")));
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
        }
        local
    });

    // Everyone hears the call first.
    let deadline = Instant::now() + Duration::from_secs(5);
    while logs.iter().any(|l| l.lock().unwrap().len() < 10) {
        assert!(Instant::now() < deadline, "no frames before the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Down long enough for the clients' attempts to back off: an attempt whose handshake
    // went out while the relay was down must not hold up the return (it used to: 2.5 s).
    relay.stop().await;
    let stopped = Instant::now();
    tokio::time::sleep(DOWN).await;
    let relay = TestRelay::start_on(addr).await;
    let restarted = Instant::now();

    for (i, log) in logs.iter().enumerate() {
        let resumed = loop {
            let first_after = log
                .lock()
                .unwrap()
                .iter()
                .find(|(t, _)| *t > stopped + DOWN)
                .copied();
            if let Some((at, seq)) = first_after {
                break (at, seq);
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(5),
                "subscriber {i} never heard frames again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let waited = resumed.0.saturating_duration_since(restarted);
        eprintln!(
            "subscriber {i} heard frame {} {waited:?} after the restart",
            resumed.1
        );
        assert!(
            waited <= Duration::from_secs(2),
            "subscriber {i} resumed {waited:?} after the restart"
        );
    }
    for s in &subscribers {
        assert_eq!(s.connects(), 2, "one reconnect per client");
    }
    assert_eq!(publisher.connects(), 2);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let local = sending.await.unwrap();
    // Frames sent while the relay was down were dropped, not queued for late delivery.
    assert!(local.stats().dropped() > 0);
    assert!(local.stats().sent() > 0);
    assert!(relay.stats().sessions >= 4);
}

/// A relay that disappears from the network without closing anything is noticed within the
/// client's idle timeout (not the ten seconds moq-native would use), and the client is back
/// once the network is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_vanishes_is_noticed_within_the_idle_timeout_and_rejoined() {
    let relay = TestRelay::start().await;
    let pipe = crate::common::udp_pipe(relay.moq_addr()).await;
    let url: url::Url = format!("moqt://{}", pipe.addr()).parse().unwrap();
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let (client, driver) = MoqClient::new(ClientConfig::new(url, verify, Some(TOKEN.to_vec())));
    tokio::spawn(driver);
    let ns = call_namespace("7777bbbb7777bbbb7777bbbb7777bbbb").unwrap();
    let mut local = client.publish(ns.clone(), TRACK);
    tokio::time::timeout(Duration::from_secs(5), local.announced())
        .await
        .expect("announced in time")
        .expect("announced");
    let mut remote = client.subscribe(ns, TRACK);

    // Frames flow through the pipe.
    let mut seq = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        local.send(seq, Bytes::from(format!("f{seq}")));
        seq += 1;
        if tokio::time::timeout(Duration::from_millis(20), remote.next())
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no frames through the pipe");
    }
    assert!(client.rtt().is_some(), "a live connection has an RTT");
    assert_eq!(client.connects(), 1);

    // The relay vanishes: nothing in either direction, no close.
    pipe.set_cut(true);
    let cut_at = Instant::now();
    while client.rtt().is_some() {
        assert!(
            cut_at.elapsed() < call::transport::IDLE_TIMEOUT + Duration::from_millis(1500),
            "the dead connection was not noticed within the idle timeout"
        );
        local.send(seq, Bytes::from(format!("f{seq}")));
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = cut_at.elapsed();
    assert!(
        noticed >= call::transport::IDLE_TIMEOUT - Duration::from_millis(500),
        "lost after {noticed:?}: the cut, not something else, ended it"
    );

    // The network is back: the client reconnects and frames flow again.
    pipe.set_cut(false);
    let back_at = Instant::now();
    loop {
        local.send(seq, Bytes::from(format!("f{seq}")));
        seq += 1;
        if let Ok(Ok((got, _))) =
            tokio::time::timeout(Duration::from_millis(20), remote.next()).await
        {
            if got > seq.saturating_sub(5) {
                break;
            }
        }
        assert!(
            back_at.elapsed() < Duration::from_secs(3),
            "no fresh frames within 3 s of the network coming back"
        );
    }
    assert_eq!(
        client.connects(),
        2,
        "a new connection, not the old one revived"
    );
    println!(
        "noticed the vanished relay after {noticed:?}, frames again {:?} after it came back",
        back_at.elapsed()
    );
}
