//! A real clocked sound card without a sound card: a user-space PulseAudio daemon with two
//! null sinks (`mic`, `spk`), which cpal's `alsa:default` reaches through ALSA's pulse
//! plugin. A known signal is played into `mic`, `call loopback --source device --sink
//! device` carries it through the whole media path, and `spk`'s monitor is recorded; the
//! recording must hold the signal. The delay is measured from the recording the same way
//! for a plain PulseAudio pass-through (`parec | pacat`), the baseline.
//!
//! `cargo test --release --test device_audio -- --ignored --nocapture` runs the benchmark
//! (several runs at 10 and 20 ms frames, and a long run): `scripts/device-bench.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// The probe signal: a 700 Hz tone keyed on and off every 40 ms by a seeded pattern, after
/// 0.4 s of silence. Its envelope has one sharp correlation peak.
const LEAD_MS: usize = 400;
const SIGNAL_MS: usize = 2400;
const KEY_MS: usize = 40;

/// A PulseAudio daemon of our own, stopped on drop.
struct PulseAudio {
    dir: tempfile::TempDir,
    daemon: Child,
    /// Streams of silence into both sinks: a null sink with no input gives its monitor no
    /// data, so a recording would start whenever sound first arrives, not when asked.
    keep_alive: Vec<Child>,
}

impl PulseAudio {
    /// `Err` says why PulseAudio cannot run here.
    fn start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let runtime = dir.path().join("runtime");
        std::fs::create_dir(&runtime).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        let mut pa = Self {
            daemon: Command::new("pulseaudio")
                .args([
                    "-n",
                    "--daemonize=no",
                    "--exit-idle-time=-1",
                    "--system=false",
                    "--load=module-null-sink sink_name=spk",
                    "--load=module-null-sink sink_name=mic",
                    "--load=module-native-protocol-unix",
                ])
                .envs(Self::env_of(dir.path()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("pulseaudio: {e} (scripts/setup.sh installs it)"))?,
            dir,
            keep_alive: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pa.ctl(&["info"]) {
            if Instant::now() > deadline {
                return Err("pulseaudio did not answer within 10 s".into());
            }
            if let Ok(Some(status)) = pa.daemon.try_wait() {
                return Err(format!("pulseaudio exited: {status}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !(pa.ctl(&["set-default-sink", "spk"]) && pa.ctl(&["set-default-source", "mic.monitor"]))
        {
            return Err("pactl could not set the default devices".into());
        }
        for sink in ["spk", "mic"] {
            let zeros = std::fs::File::open("/dev/zero").map_err(|e| e.to_string())?;
            let child = pa
                .command("pacat")
                .args(["-d", sink, "--latency-msec=20"])
                .stdin(zeros)
                .spawn()
                .map_err(|e| format!("pacat: {e}"))?;
            pa.keep_alive.push(child);
        }
        // A fresh daemon's first recording starts more than a second late: take it now.
        let warm = pa.path("warm-up.wav");
        let mut rec = pa
            .command("parecord")
            .args(["-d", "spk.monitor", "--file-format=wav"])
            .arg(&warm)
            .spawn()
            .map_err(|e| format!("parecord: {e}"))?;
        std::thread::sleep(Duration::from_millis(2000));
        let _ = Command::new("kill")
            .args(["-INT", &rec.id().to_string()])
            .status();
        let _ = rec.wait();
        Ok(pa)
    }

    fn env_of(dir: &Path) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("XDG_RUNTIME_DIR", dir.join("runtime")),
            ("HOME", dir.to_path_buf()),
        ]
    }

    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        Self::env_of(self.dir.path())
    }

    fn ctl(&self, args: &[&str]) -> bool {
        Command::new("pactl")
            .args(args)
            .envs(self.env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for PulseAudio {
    fn drop(&mut self) {
        for c in &mut self.keep_alive {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

fn write_signal(path: &Path) -> Vec<f64> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let keys: Vec<bool> = (0..SIGNAL_MS / KEY_MS).map(|_| rng.gen_bool(0.5)).collect();
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let mut envelope = vec![0.0; LEAD_MS];
    for ms in 0..SIGNAL_MS {
        let on = keys[ms / KEY_MS];
        envelope.push(if on { 1.0 } else { 0.0 });
        for i in 0..48 {
            let t = (ms * 48 + i) as f64 / 48_000.0;
            let v = if on {
                0.5 * (std::f64::consts::TAU * 700.0 * t).sin()
            } else {
                0.0
            };
            w.write_sample((v * 32767.0) as i16).unwrap();
        }
    }
    w.finalize().unwrap();
    // The file starts with the silence too.
    let lead = vec![0i16; LEAD_MS * 48];
    let body: Vec<i16> = hound::WavReader::open(path)
        .unwrap()
        .into_samples::<i16>()
        .map(Result::unwrap)
        .collect();
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for s in lead.into_iter().chain(body) {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
    envelope
}

/// Mean absolute level per millisecond of a WAV file (any rate, channels averaged).
fn envelope_of(path: &Path) -> Vec<f64> {
    let mut r = hound::WavReader::open(path).expect("a recording");
    let spec = r.spec();
    let per_ms = (spec.sample_rate / 1000) as usize * usize::from(spec.channels);
    let samples: Vec<f64> = r
        .samples::<i16>()
        .map(|s| f64::from(s.unwrap_or(0)).abs())
        .collect();
    samples
        .chunks(per_ms.max(1))
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect()
}

/// Lag (ms) of `reference` in `recording` with the highest normalised correlation.
fn best_lag(reference: &[f64], recording: &[f64]) -> (usize, f64) {
    let norm = |v: &[f64]| -> Vec<f64> {
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        v.iter().map(|x| x - mean).collect()
    };
    let r = norm(reference);
    let r_energy = r.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut best = (0, f64::MIN);
    for lag in 0..recording.len().saturating_sub(r.len()) {
        let window = norm(&recording[lag..lag + r.len()]);
        let w_energy = window.iter().map(|x| x * x).sum::<f64>().sqrt();
        if w_energy == 0.0 {
            continue;
        }
        let c = r.iter().zip(&window).map(|(a, b)| a * b).sum::<f64>() / (r_energy * w_energy);
        if c > best.1 {
            best = (lag, c);
        }
    }
    best
}

/// The `call` binary measured: this build's, or `CALL_DEVICE_BENCH_BIN` (another build's,
/// to compare two versions on the same daemon and machine state).
fn call_binary() -> std::ffi::OsString {
    std::env::var_os("CALL_DEVICE_BENCH_BIN")
        .unwrap_or_else(|| std::ffi::OsString::from(env!("CARGO_BIN_EXE_call")))
}

/// What one measurement found.
#[derive(Debug)]
struct Measured {
    /// Signal played into `mic` → heard on `spk`, as the recording shows it.
    delay_ms: f64,
    correlation: f64,
    /// `call loopback --json`, for the call path.
    report: Option<serde_json::Value>,
}

/// Plays the signal into `mic` while `path` (the call, or the pass-through) runs, and finds
/// it in the recording of `spk`.
fn measure(pa: &PulseAudio, frame_ms: u32, through_call: bool, seconds: u64) -> Measured {
    let signal = pa.path("signal.wav");
    let reference = write_signal(&signal);
    let out = pa.path("out.wav");
    let _ = std::fs::remove_file(&out);
    let mut recorder = pa
        .command("parecord")
        .args([
            "-d",
            "spk.monitor",
            "--file-format=wav",
            "--latency-msec=10",
        ])
        .arg(&out)
        .spawn()
        .expect("parecord");
    let recording_from = Instant::now();
    let mut path: Vec<Child> = if through_call {
        vec![pa
            .command(call_binary())
            .args([
                "loopback", "--source", "device", "--sink", "device", "--json",
            ])
            .args(["--frame-ms", &frame_ms.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("call loopback")]
    } else {
        let mut parec = pa
            .command("parec")
            .args(["-d", "mic.monitor", "--latency-msec=20"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("parec");
        let pacat = pa
            .command("pacat")
            .args(["-d", "spk", "--latency-msec=20"])
            .stdin(parec.stdout.take().expect("piped"))
            .spawn()
            .expect("pacat");
        vec![parec, pacat]
    };
    // Both device probes (300 ms each) and the stream start-ups.
    std::thread::sleep(Duration::from_millis(1500));
    let played_at = Instant::now();
    let status = pa
        .command("paplay")
        .args(["-d", "mic"])
        .arg(&signal)
        .status()
        .expect("paplay");
    assert!(status.success());
    let report = if through_call {
        let out = path
            .remove(0)
            .wait_with_output()
            .expect("call loopback ends");
        assert!(out.status.success(), "call loopback failed");
        Some(serde_json::from_slice(&out.stdout).expect("one JSON report"))
    } else {
        std::thread::sleep(Duration::from_millis(500));
        for mut p in path {
            let _ = p.kill();
            let _ = p.wait();
        }
        None
    };
    let _ = Command::new("kill")
        .args(["-INT", &recorder.id().to_string()])
        .status();
    let _ = recorder.wait();
    let recording = envelope_of(&out);
    let (lag, correlation) = best_lag(&reference, &recording);
    let offset_ms = (played_at - recording_from).as_secs_f64() * 1e3;
    Measured {
        delay_ms: lag as f64 - offset_ms,
        correlation,
        report,
    }
}

fn mouth_to_ear(m: &Measured) -> String {
    m.report
        .as_ref()
        .and_then(|r| r.get("mouth_to_ear_ms"))
        .map_or_else(|| "-".into(), |v| v.to_string())
}

/// Where the call's part goes, per frame (p50s, ms) and per device, from its report.
fn stages(m: &Measured) -> String {
    let Some(r) = &m.report else {
        return "-".into();
    };
    let num = |v: &serde_json::Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |x| format!("{x:.1}"))
    };
    let p50 = |v: &serde_json::Value| num(&v["p50"]);
    let st = &r["stages_ms"];
    let a = &r["audio"];
    format!(
        "capture→encoder {}, jitter buffer {} (headroom {}), playout→played {}; \
         capture device {}, playback device {}, queue {}, pull wait {}, missed pulls {}, \
         underrun samples {}, periods {}/{}; jitter {}",
        p50(&st["capture_to_encode"]),
        p50(&st["arrival_to_playout"]),
        num(&r["jitter"]["headroom_ms"]),
        p50(&st["playout_to_play"]),
        num(&a["capture_device_delay_ms"]),
        num(&a["playback_device_delay_ms"]),
        num(&a["playback_queue_ms"]),
        num(&a["playback_pull_wait_ms"]),
        a["playback_missed_pulls"],
        a["playback_underrun_samples"],
        a["capture"]["buffer_frames"],
        a["playback"]["buffer_frames"],
        r["jitter"],
    )
}

#[test]
fn a_signal_goes_through_call_loopback_on_a_real_clocked_device() {
    let pa = match PulseAudio::start() {
        Ok(pa) => pa,
        Err(why) => {
            println!("skipped: PulseAudio cannot start here: {why}");
            return;
        }
    };
    let baseline = measure(&pa, 20, false, 0);
    let call = measure(&pa, 20, true, 5);
    println!(
        "pass-through: {:.0} ms (correlation {:.2}); call loopback: {:.0} ms (correlation {:.2}), \
         {:.0} ms over the pass-through; mouth-to-ear from device timestamps {}; {}",
        baseline.delay_ms,
        baseline.correlation,
        call.delay_ms,
        call.correlation,
        call.delay_ms - baseline.delay_ms,
        mouth_to_ear(&call),
        stages(&call)
    );
    assert!(
        baseline.correlation > 0.8,
        "the pass-through carries the signal: {baseline:?}"
    );
    assert!(
        call.correlation > 0.6,
        "the call path carries the signal: {call:?}"
    );
    let report = call.report.unwrap();
    assert_eq!(report["rejects"]["auth_failed"], 0);
    assert!(report["frames_played"].as_u64().unwrap() >= 150, "{report}");
    assert!(report["audio"]["capture"]["device"].is_string(), "{report}");
    assert!(
        report["mouth_to_ear_ms"]["p50"].as_f64().is_some(),
        "{report}"
    );
    // A device sink takes each slot when the sound card needs it, and the jitter buffer
    // judges by slack; every stage of the frames' way was timed.
    assert_eq!(report["playout_rule"], "slack", "{report}");
    for stage in ["capture_to_encode", "arrival_to_playout", "playout_to_play"] {
        assert!(
            report["stages_ms"][stage]["count"].as_u64().unwrap_or(0) >= 100,
            "{stage}: {report}"
        );
    }
}

/// The device benchmark (not a test of speed: it only reports). Five runs each at 20 and
/// 10 ms frames against the pass-through, then one long run (CALL_DEVICE_BENCH_SECONDS,
/// default 600; 0 skips it) whose mouth-to-ear spread shows any creep.
/// `CALL_DEVICE_BENCH_BIN` measures another `call` binary (e.g. the previous version's).
#[test]
#[ignore = "benchmark: scripts/device-bench.sh"]
fn device_to_device_benchmark() {
    let pa = PulseAudio::start().expect("PulseAudio");
    for frame_ms in [20, 10] {
        let mut over = Vec::new();
        for run in 0..5 {
            let baseline = measure(&pa, frame_ms, false, 0);
            let call = measure(&pa, frame_ms, true, 5);
            println!(
                "{frame_ms} ms frames, run {run}: pass-through {:.0} ms, call {:.0} ms \
                 (correlation {:.2}), over {:.0} ms; mouth-to-ear {}; {}",
                baseline.delay_ms,
                call.delay_ms,
                call.correlation,
                call.delay_ms - baseline.delay_ms,
                mouth_to_ear(&call),
                stages(&call)
            );
            over.push(call.delay_ms - baseline.delay_ms);
        }
        over.sort_by(f64::total_cmp);
        println!(
            "{frame_ms} ms frames: over the pass-through, median {:.0} ms, runs {over:?}",
            over[2]
        );
    }
    let seconds: u64 = std::env::var("CALL_DEVICE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    if seconds == 0 {
        println!("long run skipped (CALL_DEVICE_BENCH_SECONDS=0)");
        return;
    }
    let long = measure(&pa, 20, true, seconds);
    let m2e = &long.report.as_ref().unwrap()["mouth_to_ear_ms"];
    println!(
        "{seconds} s run at 20 ms frames: mouth-to-ear {m2e}; p99 - p50 = {:.1} ms; {}",
        m2e["p99"].as_f64().unwrap_or(f64::NAN) - m2e["p50"].as_f64().unwrap_or(f64::NAN),
        stages(&long)
    );
}
