//! Audio libraries that write to stderr by themselves. alsa-lib reports every PCM it fails
//! to open (`ALSA lib pcm_dmix.c:… unable to open slave`, `… PulseAudio: Unable to connect`)
//! and libjack, loaded by ALSA's `jack` plugin whenever that PCM is probed, reports a JACK
//! server that is not running. None of it is an error of ours (cpal's results say what
//! failed, and we report those), but on a terminal it buries our output and with `--json`
//! it breaks the promise of JSON-only stderr. Here it is moved to the log, at debug level
//! (`--log debug` or `--log audio_lib=debug` shows it).

use std::io::{Read, Write};
use std::os::fd::AsFd;

/// Log target of what the audio libraries printed.
pub const TARGET: &str = "audio_lib";
/// At most this much of what the libraries print during one call is kept for the log; the
/// rest is read and dropped (so a chatty library never blocks on a full pipe).
const MAX_CAPTURED: usize = 64 * 1024;

/// Runs `f` with alsa-lib's error messages of this thread sent to the log instead of
/// stderr. Per thread (alsa-lib's thread-local handler): safe beside threads that print.
pub fn alsa_to_log<T>(f: impl FnOnce() -> T) -> T {
    let (result, said) = alsa_gathered(f);
    log_lines(&said);
    result
}

/// Runs `f` with alsa-lib's error messages of this thread gathered; returns them.
fn alsa_gathered<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[cfg(target_os = "linux")]
    {
        let buffer = alsa::Output::local_error_handler();
        let result = f();
        let said = buffer.map_or_else(|_| String::new(), |b| b.borrow().to_string());
        // The handler stays installed on this thread; start it on an empty buffer so what
        // it gathers later (nothing we wait for) does not pile up behind this.
        let _ = alsa::Output::local_error_handler();
        (result, said)
    }
    #[cfg(not(target_os = "linux"))]
    (f(), String::new())
}

/// Runs `f` with the process's stderr (fd 2) sent to the log, for libraries that print
/// directly (libjack). Process-wide, so only for a command that prints nothing of its own
/// meanwhile (`call devices`): anything written to stderr during `f` ends up in the log.
/// If stderr cannot be redirected, `f` runs as it is.
pub fn stderr_to_log<T>(f: impl FnOnce() -> T) -> T {
    let Some(capture) = Capture::start() else {
        return f();
    };
    // Logged once stderr is back: a log line written meanwhile would be captured too.
    let (result, said) = alsa_gathered(f);
    let printed = capture.finish();
    log_lines(&said);
    log_lines(&printed);
    result
}

fn log_lines(text: &str) {
    for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        tracing::debug!(target: TARGET, "{line}");
    }
}

/// Stderr pointed into a pipe that a thread drains.
struct Capture {
    saved: std::os::fd::OwnedFd,
    reader: std::thread::JoinHandle<String>,
}

impl Capture {
    fn start() -> Option<Self> {
        let saved = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
        let (read, write) = rustix::pipe::pipe().ok()?;
        let reader = std::thread::Builder::new()
            .name("call-stderr".into())
            .spawn(move || drain(std::fs::File::from(read)))
            .ok()?;
        let _ = std::io::stderr().flush();
        if rustix::stdio::dup2_stderr(&write).is_err() {
            // The reader ends once `write` is dropped here.
            return None;
        }
        Some(Self { saved, reader })
    }

    /// Puts stderr back and returns what was written meanwhile.
    fn finish(self) -> String {
        let _ = std::io::stderr().flush();
        // Replacing fd 2 closes the pipe's last write end: the reader sees its end.
        if rustix::stdio::dup2_stderr(&self.saved).is_err() {
            return String::new();
        }
        self.reader.join().unwrap_or_default()
    }
}

fn drain(mut pipe: std::fs::File) -> String {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_CAPTURED.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}
