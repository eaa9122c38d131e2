//! The Nostr accept loop at the file-descriptor limit (issue 11): it backs off instead of
//! spinning, logs at most a line a second, and serves again once descriptors are free.
//! Alone in its test binary because the descriptor limit is per process.

#[path = "integration/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use call_relay::RelayConfig;
use common::TestRelay;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Log output captured for counting lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_descriptor_limit_the_nostr_accept_loop_backs_off_and_recovers() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();

    let relay = TestRelay::start_with(RelayConfig {
        nostr_handshake_timeout: 3,
        ..RelayConfig::ephemeral()
    })
    .await;
    let addr = format!(
        "{}:{}",
        relay.nostr_url.host_str().unwrap(),
        relay.nostr_url.port().unwrap()
    );
    let before = getrlimit(Resource::Nofile);
    // Room for a few connections: each takes two descriptors here (client and relay side).
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(open_fds() + 10),
            maximum: before.maximum,
        },
    )
    .unwrap();

    // Connect until this process has no descriptor left; the last connections wait in the
    // listener's backlog, where `accept` fails with EMFILE.
    let mut held = Vec::new();
    loop {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(s) => held.push(s),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(24), "EMFILE expected: {e}");
                break;
            }
        }
        assert!(held.len() < 100, "the descriptor limit was never reached");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let errors = relay.stats().nostr_accept_errors;
    let lines = String::from_utf8(log.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .filter(|l| l.contains("can't accept a Nostr connection"))
        .count();
    eprintln!("{errors} accept errors and {lines} log lines in 2 s at the limit");
    // With a 5 ms..1 s back-off, 2 s hold about ten failed accepts (not millions), and
    // one log line a second.
    assert!((1..=30).contains(&errors), "{errors} accept errors");
    assert!((1..=3).contains(&lines), "{lines} log lines");

    // Descriptors back: the relay accepts again and serves a real client.
    drop(held);
    setrlimit(Resource::Nofile, before).unwrap();
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(relay.nostr_url.as_str()),
    )
    .await
    .expect("relay accepts again")
    .expect("WebSocket");
    use futures::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"["REQ","s",{"limit":1}]"#.into(),
    ))
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(answer.to_text().unwrap().contains("EOSE"), "{answer:?}");
}
