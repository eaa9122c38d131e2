//! Certificate errors of `call join` against call-relay's self-signed certificate say what
//! to do, once, with exit code 4: unpinned, the message names `--moq-fingerprint` (and the
//! fingerprint the relay presented); a wrong pin is a mismatch, not "unreachable"; and a
//! relay that comes back mid-call with another certificate ends the call the same way
//! instead of being retried forever as an outage.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use crate::common::users::User;
use crate::common::TestRelay;
use serde_json::Value;

/// `call exit::CERTIFICATE`.
const EXIT_CERTIFICATE: i32 = 4;

/// A user with an identity and a group of its own (`solo`), on `relay`.
async fn solo_user(relay: &TestRelay, tag: &str) -> User {
    let user = User::new(tag, &[&relay.nostr_url]);
    user.new_identity().await;
    user.ok(&["group", "create", "solo"]).await;
    user
}

/// Runs `call join solo --new` for a moment against `relay` with `extra` flags; returns the
/// exit code and stderr.
async fn join(user: &User, relay: &TestRelay, extra: &[&str]) -> (Option<i32>, String) {
    let mut cmd = user.command();
    cmd.args(["join", "solo", "--new", "--ring-timeout", "0"])
        .args(["--source", "silence", "--sink", "null", "--seconds", "2"])
        .args(["--moq-relay", relay.moq_url.as_str()])
        .args(extra)
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_self_signed_relay_names_the_fingerprint_flag_once_and_exits_4() {
    let relay = TestRelay::start().await;
    let user = solo_user(&relay, "cert-unpinned").await;
    let (code, stderr) = join(&user, &relay, &[]).await;
    println!("stderr of an unpinned join:\n{stderr}");
    assert_eq!(code, Some(EXIT_CERTIFICATE), "{stderr}");
    assert!(stderr.contains("not trusted"), "{stderr}");
    assert!(stderr.contains("--moq-fingerprint"), "{stderr}");
    assert!(stderr.contains("--moq-insecure"), "{stderr}");
    // The fingerprint it presented, to compare with what the relay printed.
    assert!(stderr.contains(&relay.fingerprint), "{stderr}");
    assert!(!stderr.contains("UnknownIssuer"), "said in words: {stderr}");
    assert!(!stderr.contains("unreachable"), "{stderr}");
    // Said once: one error line, one mention.
    assert_eq!(stderr.matches("not trusted").count(), 1, "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_a_mismatch_not_unreachable_said_once_in_json() {
    let relay = TestRelay::start().await;
    let user = solo_user(&relay, "cert-wrong-pin").await;
    let wrong = "42".repeat(32);
    let (code, stderr) = join(&user, &relay, &["--moq-fingerprint", &wrong, "--json"]).await;
    println!("stderr of a join with a wrong pin:\n{stderr}");
    assert_eq!(code, Some(EXIT_CERTIFICATE), "{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let mentions: Vec<&Value> = lines
        .iter()
        .filter(|v| v.to_string().contains("does not match"))
        .collect();
    assert_eq!(mentions.len(), 1, "said once: {stderr}");
    assert_eq!(mentions[0]["event"], "error", "{stderr}");
    let message = mentions[0]["message"].as_str().unwrap();
    assert!(
        message.contains("certificate fingerprint does not match --moq-fingerprint"),
        "{message}"
    );
    assert!(message.contains(&wrong), "the pin: {message}");
    assert!(message.contains(&relay.fingerprint), "presented: {message}");
    assert!(!stderr.contains("unreachable"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_back_with_another_certificate_ends_the_call_with_exit_4() {
    // Ephemeral: a restart makes a new certificate on the same ports.
    let relay = TestRelay::start().await;
    let user = solo_user(&relay, "cert-changed").await;
    let old = relay.fingerprint.clone();
    let mut cmd = user.command();
    cmd.args(["join", "solo", "--new", "--ring-timeout", "0"])
        .args(["--source", "silence", "--sink", "null", "--seconds", "60"])
        .args(["--moq-relay", relay.moq_url.as_str()])
        .args(["--moq-fingerprint", &old, "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(r#""event":"started""#) {
                let _ = started_tx.send(());
            }
            log.push(line);
        }
        log
    });
    tokio::task::spawn_blocking(move || started_rx.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("the call started");
    let relay = relay.restart(Duration::from_millis(300)).await;
    assert_ne!(relay.fingerprint, old, "a new certificate");
    let restarted = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let log = log.join().unwrap();
    let status = status.unwrap_or_else(|| panic!("still running 20 s on: {log:#?}"));
    println!(
        "the call ended {} ms after the relay came back with another certificate",
        restarted.elapsed().as_millis()
    );
    assert_eq!(status.code(), Some(EXIT_CERTIFICATE), "{log:#?}");
    let errors: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("does not match --moq-fingerprint"))
        .collect();
    assert_eq!(errors.len(), 1, "said once: {log:#?}");
    assert!(errors[0].contains(r#""event":"error""#), "{log:#?}");
    assert!(errors[0].contains(&relay.fingerprint), "{log:#?}");
}
