//! The `call` binary as users and scripts run it.

use std::process::Command;

use crate::common::TestRelay;

fn call() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_call"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CALL_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn demo_json_prints_one_object_and_exits_zero() {
    let out = call()
        .args(["demo", "--participants", "2", "--seconds", "1", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "exactly one line: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["participants"], 2);
    assert_eq!(v["reports"].as_array().unwrap().len(), 2);
    assert!(v["latency_p50_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_against_a_separately_started_relay() {
    let relay = TestRelay::start().await;
    let args = [
        "demo".to_string(),
        "-n".into(),
        "2".into(),
        "-s".into(),
        "1".into(),
        "--json".into(),
        "--moq-relay".into(),
        relay.moq_url.to_string(),
        "--nostr-relay".into(),
        relay.nostr_url.to_string(),
        "--moq-fingerprint".into(),
        relay.fingerprint.clone(),
    ];
    let out = tokio::task::spawn_blocking(move || call().args(args).output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["moq_relay"], relay.moq_url.as_str());
}

#[test]
fn bad_flags_exit_with_usage_code() {
    let out = call()
        .args(["demo", "--participants", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("participants"));
    let out = call().args(["demo", "--frame-ms", "15"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Relay URLs and fingerprints are flag values like any other: exit 2, with a hint.
    for (args, hint) in [
        (
            &["join", "g", "--moq-relay", "http://127.0.0.1:4443"][..],
            "moqt://",
        ),
        (&["join", "g", "--moq-fingerprint", "zz"][..], "hex"),
        (&["demo", "--moq-relay", "ws://127.0.0.1:1"][..], "moqt://"),
        (
            &["group", "list", "--nostr-relay", "http://127.0.0.1:1"][..],
            "ws://",
        ),
    ] {
        let out = call().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(hint), "{args:?}: {stderr}");
    }
}

#[test]
fn reads_create_no_home() {
    let home = std::env::temp_dir().join(format!("call-nohome-{}", std::process::id()));
    for args in [&["group", "list"][..], &["id", "show"], &["calls", "g"]] {
        let out = call()
            .env("CALL_HOME", &home)
            .env("CALL_NOSTR_RELAYS", "ws://127.0.0.1:9")
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("call id new"), "{args:?}: {stderr}");
        assert!(!home.exists(), "{args:?} created {}", home.display());
    }
}

#[test]
fn join_checks_the_identity_before_opening_devices() {
    let home = std::env::temp_dir().join(format!("call-noid-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    // A WAV that does not exist: opened first, it would be the error shown.
    let out = call()
        .env("CALL_HOME", &home)
        .args([
            "join",
            "g",
            "--source",
            "wav:/nonexistent.wav",
            "--sink",
            "null",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no identity"), "{stderr}");
    let _ = std::fs::remove_dir_all(&home);
}

/// A boolean `CALL_*` variable takes what scripts set (1/0, true/false, yes/no, on/off);
/// anything else is a usage error, not a silent false.
#[test]
fn boolean_env_vars_take_1_and_0_and_refuse_junk() {
    let home = std::env::temp_dir().join(format!("call-boolenv-{}", std::process::id()));
    for (value, code) in [("1", 1), ("0", 1), ("yes", 1), ("off", 1), ("maybe", 2)] {
        let out = call()
            .env("CALL_HOME", &home)
            .env("CALL_NO_PROBE", value)
            .args(["calls", "g"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // 1: parsed, then no identity in an empty home; 2: refused by the parser.
        assert_eq!(
            out.status.code(),
            Some(code),
            "CALL_NO_PROBE={value}: {stderr}"
        );
        if code == 2 {
            assert!(
                stderr.contains("CALL_NO_PROBE") || stderr.contains("maybe"),
                "{stderr}"
            );
        }
    }
}

#[test]
fn help_shows_examples() {
    let out = call().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Examples:") && text.contains("call demo"));
}

#[test]
fn loopback_carries_a_tone_through_the_media_path_into_a_wav_file() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("out.wav");
    let out = call()
        .args([
            "loopback", "--source", "tone:523", "--loss", "10", "-s", "2", "--json",
        ])
        .arg("--sink")
        .arg(format!("wav:{}", wav.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["frames_sent"], 100);
    let lost = v["frames_lost"].as_u64().unwrap();
    assert!(lost > 0, "10 % loss with seed 1 drops something");
    let jitter = &v["jitter"];
    let recovered =
        jitter["fec_recovered"].as_u64().unwrap() + jitter["concealed"].as_u64().unwrap();
    assert!(
        recovered >= lost,
        "every lost frame is recovered or concealed: {v}"
    );
    assert!((v["heard_hz"].as_f64().unwrap() - 523.0).abs() < 2.0, "{v}");

    let reader = hound::WavReader::open(&wav).unwrap();
    assert_eq!(reader.spec().sample_rate, 48_000);
    assert_eq!(reader.spec().channels, 1);
    let samples: Vec<i16> = reader.into_samples::<i16>().map(Result::unwrap).collect();
    assert!(samples.len() >= 99 * 960, "{} samples", samples.len());
    let f = call::media::tone::dominant_frequency(&samples, 100.0, 2000.0).unwrap();
    assert!((f - 523.0).abs() < 2.0, "{f}");
}

#[test]
fn loopback_reports_a_missing_wav_with_its_path() {
    let out = call()
        .args(["loopback", "--source", "wav:/definitely/missing.wav"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/definitely/missing.wav"));
    let out = call()
        .args(["loopback", "--sink", "speaker"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_bad_relay_token_policy_is_refused_naming_the_choices() {
    for cmd in ["demo", "join"] {
        let out = call()
            .args([cmd, "--relay-token", "sometimes"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("sometimes") && err.contains("auto, always or never"),
            "{cmd}: {err}"
        );
    }
    let out = call()
        .args(["demo", "--relay-token", "sometimes"])
        .env("CALL_RELAY_TOKEN", "never")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "the flag wins over the environment"
    );
}

/// `call` with no sound server to reach: ALSA's pulse plugin then fails, and so do the
/// `jack`, `oss` and card plugins; each of these libraries reports it on stderr by itself.
fn call_without_sound_server() -> Command {
    let mut cmd = call();
    cmd.env("PULSE_SERVER", "unix:/nonexistent/pulse-socket")
        .env("JACK_NO_START_SERVER", "1");
    cmd
}

#[test]
fn devices_keeps_the_audio_libraries_noise_off_stderr() {
    let out = call_without_sound_server().arg("devices").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stderr.contains("ALSA lib"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("jack"), "{stderr}");
    assert_eq!(stderr, "", "nothing but the list, on stdout");
    // What failed still shows in the list, from cpal's results.
    assert!(stdout.contains("alsa:pulse"), "{stdout}");
    assert!(stdout.contains("unusable"), "{stdout}");

    // The noise was there and went to the log: with --json and the library target at
    // debug, it comes as `log` objects, and stderr stays JSON only.
    let out = call_without_sound_server()
        .args(["devices", "--json", "--log", "warn,audio_lib=debug"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let logged: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let from_libraries: Vec<&str> = logged
        .iter()
        .filter(|v| v["event"] == "log" && v["target"] == "audio_lib")
        .filter_map(|v| v["message"].as_str())
        .collect();
    assert!(
        from_libraries.iter().any(|m| m.contains("PulseAudio")),
        "alsa-lib's report of the missing server, logged: {stderr}"
    );
    let devices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!devices["devices"].as_array().unwrap().is_empty());
}

#[test]
fn opening_a_device_that_fails_shows_our_error_and_no_library_noise() {
    let out = call_without_sound_server()
        .args([
            "loopback", "--source", "device", "--sink", "null", "-s", "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("ALSA lib"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "our error, alone: {stderr}");
    assert!(lines[0].starts_with("error:"), "{stderr}");
    assert!(lines[0].contains("audio device"), "{stderr}");
}
