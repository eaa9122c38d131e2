//! Driving the `call` binary from tests: the flags that point it at a [`TestRelay`], and
//! spawning a `call join` that has started its call.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use super::TestRelay;

/// The flags every call command needs against `relay`: its MoQ URL and certificate pin,
/// and `--json` (events as JSON lines on stderr, the report on stdout).
pub fn relay_flags(relay: &TestRelay) -> Vec<String> {
    vec![
        "--moq-relay".into(),
        relay.moq_url.to_string(),
        "--moq-fingerprint".into(),
        relay.fingerprint.clone(),
        "--json".into(),
    ]
}

/// Spawns `cmd` (a `call join … --json`) and returns once its call has started: the child
/// (stdout still piped) and a thread collecting its stderr. Panics, naming `who`, if no
/// call starts within 20 s.
pub fn spawn_started(cmd: &mut Command, who: &str) -> (Child, JoinHandle<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(r#""event":"started""#) {
                let _ = started_tx.send(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    if started_rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let log = log.join().unwrap_or_default();
        panic!("{who} started no call:\n{log}");
    }
    (child, log)
}
