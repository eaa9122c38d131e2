//! call-relay under floods (issue 11, item 4), on real relays on loopback: SETUP-less QUIC
//! sessions while a real call's track flows, and Nostr messages that are too big or not
//! messages at all.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::TestRelay;
use bytes::Bytes;
use call::transport::{call_namespace, CertVerification, MoqConnection};
use call_relay::RelayConfig;
use futures::{SinkExt, StreamExt};
use nostr_sdk::prelude::{EventBuilder, JsonUtil, Keys, RelayMessage};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &[u8] = &[11; 32];

/// SETUP-less sessions in the per-address flood test. Issue 11's attack used 4,100 (more
/// than the default `--max-sessions` of 4096), but a debug build on a loaded 2-core machine
/// completes only ~55 QUIC handshakes a second (client and relay in one process: 4,100
/// took 75 s), so the tests use about 20 s worth and scale the relay's limits with it.
/// `RELAY_FLOOD_SESSIONS=4100` runs the first test at full size.
fn flood_size(default: usize) -> usize {
    std::env::var("RELAY_FLOOD_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The flood tests each load both cores; run together they would measure each other.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn connect(relay: &TestRelay) -> MoqConnection {
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let (conn, driver) = MoqConnection::connect_with_token(&relay.moq_url, &verify, Some(TOKEN))
        .await
        .expect("real client connects");
    tokio::spawn(driver);
    conn
}

/// A QUIC client on `from` that completes handshakes with the MoQ ALPN and then says
/// nothing. It keeps its connections alive, so only the relay's SETUP timeout ends them.
fn idle_client(from: IpAddr) -> quinn::Endpoint {
    idle_client_with(from, b"moqt-18")
}

/// Like [`idle_client`], with another ALPN (`h3`: WebTransport that never sends CONNECT).
fn idle_client_with(from: IpAddr, alpn: &[u8]) -> quinn::Endpoint {
    let mut tls = CertVerification::Insecure.client_config().unwrap();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(SocketAddr::new(from, 0)).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// Opens `n` SETUP-less sessions (at most 32 handshakes at a time: more only queue up
/// behind the CPU and risk the handshake timeout on a busy debug build).
async fn flood(endpoint: &quinn::Endpoint, target: SocketAddr, n: usize) -> Vec<quinn::Connection> {
    futures::stream::iter(0..n)
        .map(|_| async move {
            endpoint
                .connect(target, "localhost")
                .unwrap()
                .await
                .expect("QUIC handshake")
        })
        .buffer_unordered(32)
        .collect()
        .await
}

/// How the relay ended each connection (its close reason), waiting at most `within`.
async fn close_reasons(conns: &[quinn::Connection], within: Duration) -> BTreeMap<String, usize> {
    let mut reasons = BTreeMap::new();
    let waits = conns.iter().map(|c| async move {
        match tokio::time::timeout(within, c.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
                String::from_utf8_lossy(&close.reason).into_owned()
            }
            Ok(other) => format!("other: {other}"),
            Err(_) => "still open".to_string(),
        }
    });
    for reason in futures::future::join_all(waits).await {
        *reasons.entry(reason).or_default() += 1;
    }
    reasons
}

/// A real publisher and subscriber on one track; frames go every 20 ms until `stop`
/// is set, then the subscriber must have every one of them.
struct RealCall {
    stop: tokio::sync::watch::Sender<bool>,
    sender: tokio::task::JoinHandle<u64>,
    reader: tokio::task::JoinHandle<std::collections::BTreeSet<u64>>,
    _conns: Vec<MoqConnection>,
}

impl RealCall {
    async fn start(relay: &TestRelay, ns_hex: &str) -> Self {
        let ns = call_namespace(ns_hex).unwrap();
        let mut publisher = connect(relay).await;
        let (mut track, serve) = publisher
            .publish(ns.clone(), "5555555555555555")
            .await
            .unwrap();
        tokio::spawn(serve);
        let mut subscriber = connect(relay).await;
        let mut sub = subscriber
            .subscribe(ns, "5555555555555555", Duration::from_secs(5))
            .await
            .unwrap();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (last_tx, mut last_rx) = tokio::sync::watch::channel(None::<u64>);
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                track.send(seq, Bytes::from(format!("f{seq}"))).unwrap();
                seq += 1;
            }
            let _ = last_tx.send(Some(seq - 1));
            // Keep the track open until the reader is done.
            tokio::time::sleep(Duration::from_secs(3)).await;
            seq
        });
        let reader = tokio::spawn(async move {
            // Each frame is its own MoQ group on its own QUIC stream, so under load they
            // may arrive out of order; what counts is that every one arrives.
            let mut seen = std::collections::BTreeSet::new();
            loop {
                let next = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
                let Ok(Ok(Some((seq, payload)))) = next else {
                    break;
                };
                assert_eq!(payload, Bytes::from(format!("f{seq}")));
                seen.insert(seq);
                let last = *last_rx.borrow_and_update();
                if last.is_some_and(|last| (0..=last).all(|s| seen.contains(&s))) {
                    break;
                }
            }
            seen
        });
        Self {
            stop,
            sender,
            reader,
            _conns: vec![publisher, subscriber],
        }
    }

    /// Stops sending; asserts that every frame sent arrived.
    async fn finish(self) -> u64 {
        self.stop.send(true).unwrap();
        let sent = self.sender.await.unwrap();
        let seen = self.reader.await.unwrap();
        let missing: Vec<u64> = (0..sent).filter(|s| !seen.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "real frames lost: {missing:?} of {sent}"
        );
        assert_eq!(seen.len() as u64, sent, "frames that were never sent");
        sent
    }
}

/// The per-address limit refuses most of a flood from one address at once; the sessions
/// it admits are closed by the SETUP timeout; a real call on another address loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_less_flood_from_one_address_is_refused_and_timed_out_while_a_call_goes_on() {
    const PER_ADDRESS: usize = 64;
    let _alone = FLOODS.lock().await;
    let flood_n = flood_size(1000);
    let relay = TestRelay::start_with(RelayConfig {
        setup_timeout: 2,
        max_sessions_per_address: PER_ADDRESS as u64,
        ..RelayConfig::ephemeral()
    })
    .await;
    let call = RealCall::start(&relay, "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0").await;

    // The most sessions the relay held at once during the flood.
    let (done, mut finished) = tokio::sync::watch::channel(false);
    let stats = relay.stats_fn();
    let peak = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(stats().sessions);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = finished.changed() => return peak,
            }
        }
    });

    // Another loopback address, so the flood has its own per-address count.
    let started = Instant::now();
    let endpoint = idle_client("127.0.0.2".parse().unwrap());
    let conns = flood(&endpoint, relay.moq_addr(), flood_n).await;
    let handshakes = started.elapsed();
    let reasons = close_reasons(&conns, Duration::from_secs(15)).await;
    let all_closed = started.elapsed();
    done.send(true).unwrap();
    let peak = peak.await.unwrap();
    eprintln!(
        "{flood_n} handshakes in {handshakes:?}, all closed after {:?}, peak {peak} sessions: {reasons:?}",
        started.elapsed()
    );
    assert_eq!(reasons.get("still open"), None, "{reasons:?}");
    let refused = reasons
        .get("too many sessions from this address")
        .copied()
        .unwrap_or(0);
    let timed_out = reasons.get("no SETUP within 2 s").copied().unwrap_or(0);
    // A few close packets may be lost on a loaded loopback; the relay's counters are exact.
    assert!(refused + timed_out >= flood_n * 99 / 100, "{reasons:?}");
    assert!(peak <= (PER_ADDRESS + 2) as u64, "peak {peak}");

    let sent = call.finish().await;
    assert!(sent > 0);
    let stats = relay.stats();
    // Under load a handful of handshakes the client saw complete may fail on the relay's
    // side before they become sessions.
    let counted = stats.refused_per_address + stats.setup_timeouts;
    assert!(counted <= flood_n as u64, "{stats:?}");
    assert!(counted >= (flood_n * 99 / 100) as u64, "{stats:?}");
    assert!(stats.setup_timeouts >= PER_ADDRESS as u64, "{stats:?}");
    // One address gets at most its share of sessions per SETUP timeout.
    let periods = all_closed.as_secs() / 2 + 1;
    assert!(
        stats.setup_timeouts <= PER_ADDRESS as u64 * periods,
        "{stats:?} in {all_closed:?}"
    );
    assert!(stats.refused_per_address > 0, "{stats:?}");
    assert_eq!(stats.sessions, 2, "{stats:?}");
}

/// QUIC connections with the WebTransport ALPN (`h3`) that never send the CONNECT request
/// are closed once `--setup-timeout` has passed, counted, and never become sessions; a
/// real call on the same relay loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_connections_without_connect_are_timed_out_while_a_call_goes_on() {
    let _alone = FLOODS.lock().await;
    let flood_n = flood_size(200).min(1000);
    let relay = TestRelay::start_with(RelayConfig {
        setup_timeout: 2,
        ..RelayConfig::ephemeral()
    })
    .await;
    let call = RealCall::start(&relay, "d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0").await;
    let started = Instant::now();
    let endpoint = idle_client_with("127.0.0.4".parse().unwrap(), b"h3");
    let conns = flood(&endpoint, relay.moq_addr(), flood_n).await;
    let handshakes = started.elapsed();
    let reasons = close_reasons(&conns, Duration::from_secs(15)).await;
    eprintln!(
        "{flood_n} h3 handshakes in {handshakes:?}, all closed after {:?}: {reasons:?}",
        started.elapsed()
    );
    assert_eq!(reasons.get("still open"), None, "{reasons:?}");
    let timed_out = reasons
        .get("no WebTransport CONNECT within 2 s")
        .copied()
        .unwrap_or(0);
    // A few close packets may be lost on a loaded loopback; the relay's counters are exact.
    assert!(timed_out >= flood_n * 99 / 100, "{reasons:?}");
    // None was held much past the timeout.
    assert!(
        started.elapsed() < handshakes + Duration::from_secs(2 + 5),
        "closing took {:?}",
        started.elapsed()
    );
    let sent = call.finish().await;
    assert!(sent > 0);
    let stats = relay.stats();
    assert_eq!(stats.connect_timeouts, flood_n as u64, "{stats:?}");
    // They never became sessions: no SETUP timeout, no refusal, only the call's two.
    assert_eq!(stats.setup_timeouts, 0, "{stats:?}");
    assert_eq!(stats.refused, 0, "{stats:?}");
    assert_eq!(stats.sessions, 2, "{stats:?}");
}

/// At most `--max-sessions` connections may be handshaking (QUIC, then CONNECT) at once:
/// the rest of a CONNECT-less flood is refused at once and counted; once the held ones time
/// out, real clients get in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_handshaking_are_capped_at_max_sessions() {
    const CAP: usize = 20;
    const FLOOD: usize = 60;
    let _alone = FLOODS.lock().await;
    let relay = TestRelay::start_with(RelayConfig {
        setup_timeout: 5,
        max_sessions: CAP as u64,
        ..RelayConfig::ephemeral()
    })
    .await;
    let endpoint = idle_client_with("127.0.0.5".parse().unwrap(), b"h3");
    let target = relay.moq_addr();
    let results: Vec<Result<quinn::Connection, quinn::ConnectionError>> =
        futures::future::join_all(
            (0..FLOOD).map(|_| async { endpoint.connect(target, "localhost").unwrap().await }),
        )
        .await;
    let held: Vec<quinn::Connection> = results.iter().filter_map(|r| r.clone().ok()).collect();
    let refused = FLOOD - held.len();
    eprintln!(
        "{} held, {refused} refused: {:?}",
        held.len(),
        relay.stats()
    );
    assert!(held.len() >= CAP && refused > 0, "{} held", held.len());
    let stats = relay.stats();
    assert_eq!(stats.refused_pending, refused as u64, "{stats:?}");
    let reasons = close_reasons(&held, Duration::from_secs(15)).await;
    assert_eq!(reasons.get("still open"), None, "{reasons:?}");
    // Free again: a real client gets a session.
    let mut real = connect(&relay).await;
    let ns = call_namespace("e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0").unwrap();
    let (_track, serve) = real.publish(ns, "5555555555555555").await.unwrap();
    tokio::spawn(serve);
    let stats = relay.stats();
    assert_eq!(stats.connect_timeouts, held.len() as u64, "{stats:?}");
    assert_eq!(stats.sessions, 1, "{stats:?}");
}

/// With no per-address limit in the way, a flood fills `--max-sessions` and locks real
/// clients out (the issue's finding), and the SETUP timeout alone frees every slot; the
/// running call loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_setup_timeout_alone_frees_a_relay_filled_by_setup_less_sessions() {
    const TIMEOUT: u64 = 15;
    const EXTRA: usize = 50;
    let _alone = FLOODS.lock().await;
    let max_sessions = 200;
    let relay = TestRelay::start_with(RelayConfig {
        setup_timeout: TIMEOUT,
        max_sessions: max_sessions as u64,
        max_sessions_per_address: 1_000_000,
        ..RelayConfig::ephemeral()
    })
    .await;
    let call = RealCall::start(&relay, "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0").await;

    let started = Instant::now();
    let endpoint = idle_client("127.0.0.3".parse().unwrap());
    let mut conns = flood(&endpoint, relay.moq_addr(), max_sessions - 2).await;
    // The client's handshakes are done a moment before the relay has counted them all.
    let full = async {
        while relay.stats().sessions < max_sessions as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), full)
        .await
        .unwrap_or_else(|_| panic!("relay never full: {:?}", relay.stats()));
    // The relay is full: the issue's lock-out, until the timeout.
    let verify = CertVerification::fingerprint(&relay.fingerprint).unwrap();
    let locked_out = MoqConnection::connect_with_token(&relay.moq_url, &verify, Some(TOKEN)).await;
    assert!(
        locked_out.is_err(),
        "a real client got in while the relay was full"
    );
    conns.extend(flood(&endpoint, relay.moq_addr(), EXTRA).await);
    let handshakes = started.elapsed();
    assert!(
        handshakes < Duration::from_secs(TIMEOUT),
        "the flood took {handshakes:?}, longer than the SETUP timeout: raise TIMEOUT"
    );

    let reasons = close_reasons(&conns, Duration::from_secs(TIMEOUT + 10)).await;
    let freed_after = started.elapsed();
    eprintln!(
        "{} handshakes in {handshakes:?}, all closed after {freed_after:?}: {reasons:?}",
        conns.len()
    );
    assert_eq!(reasons.get("still open"), None, "{reasons:?}");
    let admitted = max_sessions - 2;
    let timed_out = reasons
        .get(&format!("no SETUP within {TIMEOUT} s"))
        .copied()
        .unwrap_or(0);
    assert!(timed_out >= admitted * 99 / 100, "{reasons:?}");
    assert!(
        freed_after >= Duration::from_secs(TIMEOUT),
        "{freed_after:?}"
    );

    // Every slot is free again: a new real client gets in and receives the call.
    let mut late = connect(&relay).await;
    let mut late_sub = late
        .subscribe(
            call_namespace("c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0").unwrap(),
            "5555555555555555",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let (_, payload) = tokio::time::timeout(Duration::from_secs(5), late_sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(payload.starts_with(b"f"));
    call.finish().await;
    let stats = relay.stats();
    assert_eq!(stats.setup_timeouts, admitted as u64, "{stats:?}");
    // The locked-out client and the extra flood sessions.
    assert_eq!(stats.refused, (EXTRA + 1) as u64, "{stats:?}");
    assert_eq!(stats.refused_per_address, 0, "{stats:?}");
}

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn nostr_ws(relay: &TestRelay) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(relay.nostr_url.as_str())
        .await
        .expect("WebSocket to the Nostr relay");
    ws
}

/// The next relay message (text), within 5 s.
pub(crate) async fn next_relay_message(ws: &mut Ws) -> RelayMessage<'static> {
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

/// Whether the relay stores `id`: a REQ for it answers with the event or only EOSE.
async fn stored(relay: &TestRelay, id: &str) -> bool {
    let mut ws = nostr_ws(relay).await;
    let req = format!(r#"["REQ","q",{{"ids":["{id}"]}}]"#);
    ws.send(Message::Text(req.into())).await.unwrap();
    match next_relay_message(&mut ws).await {
        RelayMessage::Event { .. } => true,
        RelayMessage::EndOfStoredEvents(_) => false,
        other => panic!("unexpected answer to REQ: {other:?}"),
    }
}

async fn publish(ws: &mut Ws, content: String) -> (String, RelayMessage<'static>) {
    let event = EventBuilder::text_note(content)
        .sign_with_keys(&Keys::generate())
        .unwrap();
    let msg = format!(r#"["EVENT",{}]"#, event.as_json());
    ws.send(Message::Text(msg.into())).await.unwrap();
    (event.id.to_hex(), next_relay_message(ws).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mb_event_is_refused_with_a_reason_and_not_stored() {
    let relay = TestRelay::start().await;
    let event = EventBuilder::text_note("x".repeat(16 << 20))
        .sign_with_keys(&Keys::generate())
        .unwrap();
    let id = event.id.to_hex();
    let msg = format!(r#"["EVENT",{}]"#, event.as_json());
    let (mut tx, mut rx) = nostr_ws(&relay).await.split();
    // Sent from its own task: the relay answers before the client has finished sending.
    let sending = tokio::spawn(async move {
        let _ = tx.send(Message::Text(msg.into())).await;
    });
    let next = tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .expect("relay answers the 16 MB event");
    let close = match next {
        Some(Ok(Message::Close(frame))) => frame.expect("close frame with a reason"),
        other => panic!("expected a close frame, got {other:?}"),
    };
    assert_eq!(close.code, CloseCode::Size, "{close:?}");
    assert!(close.reason.contains("limit of 66560 bytes"), "{close:?}");
    sending.abort();
    assert!(!stored(&relay, &id).await, "the 16 MB event was stored");
    let stats = relay.stats();
    assert_eq!(stats.nostr_too_big, 1, "{stats:?}");
    assert_eq!(stats.nostr_stored_bytes, 0, "{stats:?}");

    // Just over the event limit but within one message: OK false, and the connection
    // stays usable for an event within the limit.
    let mut ws = nostr_ws(&relay).await;
    let (big, answer) = publish(&mut ws, "y".repeat(65_600)).await;
    match answer {
        RelayMessage::Ok {
            status: false,
            message,
            ..
        } => assert!(
            message.starts_with("invalid: event is") && message.contains("limit of 65536 bytes"),
            "{message}"
        ),
        other => panic!("expected OK false, got {other:?}"),
    }
    let (small, answer) = publish(&mut ws, "z".repeat(60_000)).await;
    assert!(
        matches!(answer, RelayMessage::Ok { status: true, .. }),
        "{answer:?}"
    );
    assert!(!stored(&relay, &big).await);
    assert!(stored(&relay, &small).await);
    assert_eq!(relay.stats().nostr_too_big, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_a_notice_and_the_connection_keeps_working() {
    let relay = TestRelay::start().await;
    let mut ws = nostr_ws(&relay).await;
    for bad in [
        "{not json",
        r#"["EVENT"]"#,
        r#"["NOPE","x"]"#,
        r#"["REQ",42]"#,
    ] {
        ws.send(Message::Text(bad.into())).await.unwrap();
        match next_relay_message(&mut ws).await {
            RelayMessage::Notice(text) => {
                assert!(
                    text.starts_with("invalid: malformed message"),
                    "{bad}: {text}"
                )
            }
            other => panic!("{bad}: expected NOTICE, got {other:?}"),
        }
    }
    ws.send(Message::Binary(Bytes::from_static(b"\x00\x01")))
        .await
        .unwrap();
    assert!(matches!(
        next_relay_message(&mut ws).await,
        RelayMessage::Notice(_)
    ));
    // Still a working Nostr connection.
    let (id, answer) = publish(&mut ws, "hello".into()).await;
    assert!(
        matches!(answer, RelayMessage::Ok { status: true, .. }),
        "{answer:?}"
    );
    assert!(stored(&relay, &id).await);
    assert_eq!(relay.stats().nostr_malformed, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tcp_connection_is_dropped_after_the_handshake_timeout() {
    let relay = TestRelay::start_with(RelayConfig {
        nostr_handshake_timeout: 1,
        ..RelayConfig::ephemeral()
    })
    .await;
    let addr = format!(
        "{}:{}",
        relay.nostr_url.host_str().unwrap(),
        relay.nostr_url.port().unwrap()
    );
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    for conn in [&mut silent, &mut half] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(conn, &mut buf),
        )
        .await
        .expect("relay closes the connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    // The relay counts just after the connection is dropped.
    let counted = async {
        while relay.stats().nostr_handshake_timeouts < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), counted)
        .await
        .unwrap_or_else(|_| panic!("{:?}", relay.stats()));
    assert_eq!(relay.stats().nostr_handshake_timeouts, 2);
    // Real clients are still served.
    let mut ws = nostr_ws(&relay).await;
    let (_, answer) = publish(&mut ws, "after".into()).await;
    assert!(
        matches!(answer, RelayMessage::Ok { status: true, .. }),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_the_stored_bytes_quota_are_refused_with_a_reason() {
    const QUOTA: u64 = 21_000;
    let relay = TestRelay::start_with(RelayConfig {
        nostr_max_stored_bytes: QUOTA,
        ..RelayConfig::ephemeral()
    })
    .await;
    let mut ws = nostr_ws(&relay).await;
    let mut accepted = Vec::new();
    let refusal = loop {
        let (id, answer) = publish(&mut ws, "q".repeat(3000)).await;
        match answer {
            RelayMessage::Ok { status: true, .. } => accepted.push(id),
            RelayMessage::Ok {
                status: false,
                message,
                ..
            } => break (id, message),
            other => panic!("{other:?}"),
        }
        assert!(accepted.len() < 10, "quota never reached");
    };
    assert!(
        refusal.1.starts_with("blocked: relay storage full"),
        "{}",
        refusal.1
    );
    assert_eq!(accepted.len(), 6, "3.3 kB events in a 21 kB quota");
    assert!(!stored(&relay, &refusal.0).await);
    for id in &accepted {
        assert!(stored(&relay, id).await);
    }
    let stats = relay.stats();
    assert!(stats.nostr_stored_bytes <= QUOTA, "{stats:?}");
    assert!(stats.nostr_stored_bytes > QUOTA - 4000, "{stats:?}");
    assert_eq!(stats.nostr_quota_refused, 1, "{stats:?}");
}
