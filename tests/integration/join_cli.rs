//! `call join` between two real `call` processes: one starts the call, the other finds it in
//! the group and joins; each hears the other's tone through MoQ, SFrame and Opus.

use std::process::Stdio;
use std::time::Duration;

use crate::common::cli::{relay_flags, spawn_started};
use crate::common::users::{create_and_join, User};
use crate::common::TestRelay;
use serde_json::Value;

fn report(out: &std::process::Output, who: &str, stderr: &str) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{who}: stdout {stdout}\nstderr {stderr}"
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{who}: {e}: {stdout}"))
}

fn heard(report: &Value) -> f64 {
    report["peers"][0]["heard_hz"].as_f64().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_call_each_other_from_the_cli_and_hear_each_other() {
    let relay = TestRelay::start().await;
    let (a, b) = (
        User::new("join-a", &[&relay.nostr_url]),
        User::new("join-b", &[&relay.nostr_url]),
    );
    a.new_identity().await;
    let b_npub = b.new_identity().await;
    create_and_join("team", &a, &[(&b, &b_npub)]).await;
    let dir = tempfile::tempdir().unwrap();
    let a_wav = dir.path().join("a-heard.wav");

    // A starts the call (for at most 30 s; it is told to leave on stdin); its stderr says
    // when the offer is out.
    let mut a_cmd = a.command();
    a_cmd
        .args(["join", "team", "--source", "tone:440"])
        .arg("--sink")
        .arg(format!("wav:{}", a_wav.display()))
        .args(["--seconds", "30"])
        .args(relay_flags(&relay))
        .stdin(Stdio::piped());
    let (mut a_child, a_log) = spawn_started(&mut a_cmd, "A");

    // B finds A's call in the group's history and joins it for 4 s.
    let b_out = b
        .run(&[
            "join",
            "team",
            "--source",
            "tone:660",
            "--sink",
            "null",
            "--seconds",
            "4",
            "--moq-fingerprint",
            &relay.fingerprint,
        ])
        .await;
    let b_report = report(&b_out, "B", &String::from_utf8_lossy(&b_out.stderr));
    // A script drives A through stdin: mute, then leave.
    {
        use std::io::Write;
        let mut stdin = a_child.stdin.take().unwrap();
        writeln!(stdin, "m").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        writeln!(stdin, "q").unwrap();
    }
    let a_out = tokio::task::spawn_blocking(move || a_child.wait_with_output().unwrap())
        .await
        .unwrap();
    let a_log = a_log.join().unwrap();
    let a_report = report(&a_out, "A", &a_log);
    assert!(
        a_log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| e["event"] == "muted" && e["muted"] == true),
        "{a_log}"
    );

    println!("A: {a_report}\nB: {b_report}");
    assert_eq!(a_report["call_id"], b_report["call_id"], "one call");
    assert_eq!(a_report["started"], true);
    assert_eq!(b_report["started"], false);
    assert_eq!(a_report["ended_by"], "stopped", "left on `q`");
    // 4 s of 20 ms frames is 200; the first ones go out while A's subscription starts.
    let a_peer = &a_report["peers"][0];
    assert!(a_peer["received"].as_u64().unwrap() >= 150, "{a_report}");
    assert!((heard(&a_report) - 660.0).abs() <= 3.0, "{a_report}");
    assert_eq!(a_peer["rejects"]["auth_failed"], 0);
    assert_eq!(a_peer["present"], false, "A saw B leave: {a_report}");
    let b_peer = &b_report["peers"][0];
    assert!(b_peer["received"].as_u64().unwrap() >= 150, "{b_report}");
    assert!((heard(&b_report) - 440.0).abs() <= 3.0, "{b_report}");
    // What A heard is in its WAV, 48 kHz 16-bit mono, as long as A was in the call.
    let wav = hound::WavReader::open(&a_wav).unwrap();
    assert_eq!(wav.spec().sample_rate, 48_000);
    let in_call = a_report["seconds"].as_f64().unwrap();
    assert!(in_call >= 4.0, "{a_report}");
    assert!(
        f64::from(wav.duration()) >= (in_call - 0.5) * 48_000.0,
        "{} samples for {in_call} s",
        wav.duration()
    );

    // The call is over: a new `join` does not find it and starts another (nobody answers).
    let again = b
        .run(&[
            "join",
            "team",
            "--source",
            "silence",
            "--sink",
            "null",
            "--ring-timeout",
            "1",
            "--moq-relay",
            relay.moq_url.as_str(),
            "--moq-fingerprint",
            &relay.fingerprint,
        ])
        .await;
    assert_eq!(again.status.code(), Some(3), "no answer is exit 3");
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["ended_by"], "no_answer");
    assert_eq!(v["started"], true);
    assert_ne!(v["call_id"], a_report["call_id"]);

    // `call calls` lists both, newest first: the unanswered one ended by its caller, the
    // first one over (everyone left).
    let calls = a.ok(&["calls", "team"]).await;
    let list = calls["calls"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{calls}");
    assert_eq!(list[0]["id"], v["call_id"]);
    assert_eq!(list[0]["state"], "ended");
    assert_eq!(list[1]["id"], a_report["call_id"]);
    assert_eq!(list[1]["state"], "over");
    assert_eq!(list[1]["participants"].as_array().unwrap().len(), 0);

    // A bot stopped by its supervisor (SIGTERM) still leaves cleanly.
    let mut bot = a.command();
    bot.args([
        "join",
        "team",
        "--new",
        "--ring-timeout",
        "0",
        "--source",
        "silence",
    ])
    .args(["--sink", "null"])
    .args(relay_flags(&relay))
    .stdin(Stdio::null());
    let (bot, bot_log) = spawn_started(&mut bot, "the bot");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &bot.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || bot.wait_with_output().unwrap())
        .await
        .unwrap();
    let bot_log = bot_log.join().unwrap();
    let bot_report = report(&out, "bot", &bot_log);
    assert_eq!(bot_report["ended_by"], "stopped");
    let calls = a.ok(&["calls", "team"]).await;
    assert_eq!(calls["calls"][0]["id"], bot_report["call_id"]);
    assert_eq!(
        calls["calls"][0]["state"], "over",
        "its leave was sent: {calls}\n{bot_log}"
    );
}
