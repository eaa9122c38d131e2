//! `call join` as bots and scripts see it (issue 12): with `--json` every line on stderr
//! is a JSON object with a time, and read-only commands of the same identity work while a
//! call holds its home.

use std::process::Stdio;

use crate::common::cli::{relay_flags, spawn_started};
use crate::common::users::{create_and_join, User};
use crate::common::TestRelay;
use serde_json::Value;

/// Every line of `stderr` is a JSON object with a numeric `"t"` (unix ms, within the last
/// hour) and a string `"event"`; returns them.
fn json_lines(stderr: &str, who: &str) -> Vec<Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    stderr
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: not JSON ({e}): {line:?}\n{stderr}"));
            let t = v["t"]
                .as_u64()
                .unwrap_or_else(|| panic!("{who}: no t: {line}"));
            assert!(
                t <= now + 1000 && t + 3_600_000 > now,
                "{who}: t {t}: {line}"
            );
            assert!(v["event"].is_string(), "{who}: no event: {line}");
            v
        })
        .collect()
}

/// Spawns A's `call join --json` (tone, 12 s at most, leaves on `q`); returns once the
/// call has started, with a thread collecting its stderr.
fn start_call(
    a: &User,
    relay: &TestRelay,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    let mut cmd = a.command();
    // The default log filter, as a bot would run it: library logs must come as JSON too.
    cmd.env_remove("CALL_LOG")
        .args(["join", "team", "--source", "tone:440", "--sink", "null"])
        .args(["--seconds", "12", "--ring-timeout", "0"])
        .args(relay_flags(relay))
        .stdin(Stdio::piped());
    spawn_started(&mut cmd, "A")
}

fn leave(mut child: std::process::Child) -> std::process::Output {
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "q").unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_stderr_of_a_whole_call_parses_line_by_line() {
    let relay = TestRelay::start().await;
    let (a, b) = (
        User::new("jsonout-a", &[&relay.nostr_url]),
        User::new("jsonout-b", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("team", &a, &[(&b, &b_npub)]).await;

    let (a_child, a_log) = start_call(&a, &relay);
    let mut b_cmd = b.command();
    // B also logs at debug: those lines must be JSON as well.
    b_cmd
        .env("CALL_LOG", "warn,call=debug")
        .args(["join", "team", "--source", "tone:660", "--sink", "null"])
        .args([
            "--seconds",
            "6",
            "--moq-fingerprint",
            &relay.fingerprint,
            "--json",
        ]);
    let b_out = tokio::task::spawn_blocking(move || b_cmd.output().unwrap())
        .await
        .unwrap();
    let a_out = tokio::task::spawn_blocking(move || leave(a_child))
        .await
        .unwrap();
    let a_log = a_log.join().unwrap();
    let b_log = String::from_utf8_lossy(&b_out.stderr).to_string();
    assert_eq!(b_out.status.code(), Some(0), "{b_log}");
    assert_eq!(a_out.status.code(), Some(0), "{a_log}");

    let a_events = json_lines(&a_log, "A");
    let b_events = json_lines(&b_log, "B");
    let kinds = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_string())
            .collect()
    };
    let (ak, bk) = (kinds(&a_events), kinds(&b_events));
    println!("A: {ak:?}\nB: {bk:?}");
    assert!(
        ak.contains(&"started".into()) && ak.contains(&"peer_joined".into()),
        "{a_log}"
    );
    assert!(
        bk.contains(&"joined".into()) && bk.contains(&"status".into()),
        "{b_log}"
    );
    assert!(ak.contains(&"peer_left".into()), "A saw B leave: {a_log}");
    // A status names per-peer level, speaking and loss, and the relay's state.
    let status = b_events.iter().find(|e| e["event"] == "status").unwrap();
    assert_eq!(status["relay"], "connected", "{status}");
    let peer = &status["peers"][0];
    assert!(
        peer["level"].as_f64().unwrap() > 0.01,
        "A's tone is loud: {status}"
    );
    assert_eq!(peer["speaking"], true, "{status}");
    assert!(peer["loss_pct"].as_f64().unwrap() < 5.0, "{status}");
    // Logs, if any, are JSON objects of their own kind; none is an error on a clean call.
    for e in a_events.iter().chain(&b_events) {
        if e["event"] == "log" {
            assert!(e["message"].is_string() && e["target"].is_string(), "{e}");
            assert_ne!(
                e["level"], "error",
                "an expected condition logged as error: {e}"
            );
        }
    }
    assert!(
        bk.contains(&"log".into()),
        "B's debug logs came as JSON: {b_log}"
    );
    // stdout is the one report object.
    let report: Value = serde_json::from_slice(&b_out.stdout).unwrap();
    assert_eq!(report["started"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_work_during_a_call() {
    let relay = TestRelay::start().await;
    let (a, b) = (
        User::new("duringcall-a", &[&relay.nostr_url]),
        User::new("duringcall-b", &[&relay.nostr_url]),
    );
    let a_npub = a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("team", &a, &[(&b, &b_npub)]).await;

    let (a_child, a_log) = start_call(&a, &relay);
    // The call holds A's home; these only read it.
    let list = a.ok(&["group", "list"]).await;
    assert_eq!(list["groups"][0]["name"], "team", "{list}");
    let id = a.ok(&["id", "show"]).await;
    assert_eq!(id["npub"], a_npub.as_str());
    let members = a.ok(&["group", "members", "team"]).await;
    assert_eq!(members["members"].as_array().unwrap().len(), 2, "{members}");
    assert_eq!(members["caught_up"], false, "{members}");
    // Signaling only: asking the relay who is alive is `listen`'s test.
    let calls = a.ok(&["calls", "team", "--no-probe"]).await;
    assert_eq!(calls["calls"][0]["state"], "running", "{calls}");
    // A command that changes the home still waits its turn.
    let busy = a.run(&["keys", "publish"]).await;
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("busy"));

    let a_out = tokio::task::spawn_blocking(move || leave(a_child))
        .await
        .unwrap();
    let a_log = a_log.join().unwrap();
    assert_eq!(a_out.status.code(), Some(0), "{a_log}");
    // After the call, the same commands catch up again.
    let members = a.ok(&["group", "members", "team"]).await;
    assert_eq!(members["caught_up"], true, "{members}");
    // B catches up: A's offer and leave are shown as call signaling, not as empty chat.
    let sync = b.ok(&["sync"]).await;
    let signals: Vec<String> = sync["groups"][0]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["call_signal"].as_str().map(String::from))
        .collect();
    assert!(
        signals.iter().any(|s| s.contains("offered on moqt://"))
            && signals.iter().any(|s| s.ends_with(": left")),
        "{sync}"
    );
}
