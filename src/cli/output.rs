//! Where diagnostics go: the tracing subscriber of the `call` binary and the JSON lines
//! of `--json`.
//!
//! Three ways, chosen once the command line is parsed and switched by `call join` while
//! its live screen is up:
//! - text: `LEVEL target: message` lines on stderr (people);
//! - JSON: with `--json`, every line on stderr is one JSON object with `"t"` (unix time in
//!   milliseconds) and `"event"`; library logs (ours, MDK's, openmls' through the `log`
//!   bridge) are `{"event":"log","level":…,"target":…,"message":…}`;
//! - screen: log lines are kept (bounded) for the live screen instead of being written over
//!   it.
//!
//! `--log-file PATH` sends logs to that file (text, with the time) instead, in every mode.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use serde_json::{json, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

const TEXT: u8 = 0;
const JSON: u8 = 1;
const SCREEN: u8 = 2;

/// Log lines kept for the live screen.
const KEPT_FOR_SCREEN: usize = 32;

static MODE: AtomicU8 = AtomicU8::new(TEXT);
static LOG_FILE: OnceLock<Mutex<std::fs::File>> = OnceLock::new();
static KEPT: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// Milliseconds since the Unix epoch: the `"t"` of every JSON line.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Installs the subscriber: `filter` (tracing syntax), JSON lines when `json`, logs to
/// `log_file` (appended, 0600) when given.
pub fn init(filter: &str, json: bool, log_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    if json {
        MODE.store(JSON, Ordering::Relaxed);
    }
    if let Some(path) = log_file {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| anyhow::anyhow!("--log-file {}: {e}", path.display()))?;
        let _ = LOG_FILE.set(Mutex::new(file));
    }
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // `try_init` also routes the `log` crate (openmls) into tracing.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(Route)
        .try_init();
    Ok(())
}

/// While the live screen is up, log lines are kept for it rather than written over it.
pub fn to_screen(on: bool) {
    if on {
        MODE.store(SCREEN, Ordering::Relaxed);
    } else if MODE.load(Ordering::Relaxed) == SCREEN {
        MODE.store(TEXT, Ordering::Relaxed);
    }
}

/// Log lines kept for the screen since the last call (oldest first).
pub fn take_kept() -> Vec<String> {
    KEPT.lock()
        .map(|mut k| k.drain(..).collect())
        .unwrap_or_default()
}

/// Writes `value` (an object) as one line on stderr with `"t"` added.
pub fn json_line(mut value: Value) {
    if let Value::Object(map) = &mut value {
        map.insert("t".into(), json!(unix_ms()));
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{value}");
}

/// An error that ends the command: a JSON line under `--json`, `error: …` otherwise.
pub fn error(message: &str) {
    if MODE.load(Ordering::Relaxed) == JSON {
        json_line(json!({ "event": "error", "message": message }));
    } else {
        eprintln!("error: {message}");
    }
}

/// Whether stderr takes JSON lines only.
pub fn is_json() -> bool {
    MODE.load(Ordering::Relaxed) == JSON
}

/// The tracing layer that sends each event where the mode says.
struct Route;

#[derive(Default)]
struct Fields {
    message: String,
    rest: serde_json::Map<String, Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.rest.insert(field.name().into(), json!(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else if !field.name().starts_with("log.") {
            // The `log` bridge's own fields (module path, file, line) are noise here.
            self.rest.insert(field.name().into(), json!(text));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.rest.insert(field.name().into(), json!(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.rest.insert(field.name().into(), json!(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.rest.insert(field.name().into(), json!(value));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Route {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        // Events bridged from the `log` crate carry their real target as a field.
        let target = fields
            .rest
            .remove("log.target")
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| meta.target().to_string());
        let level = meta.level().as_str().to_ascii_lowercase();
        let mut said = fields.message.clone();
        for (k, v) in &fields.rest {
            let _ = write!(
                said,
                " {k}={}",
                v.as_str().map_or(v.to_string(), String::from)
            );
        }
        let text = format!("{} {target}: {said}", meta.level());
        if let Some(file) = LOG_FILE.get() {
            if let Ok(mut f) = file.lock() {
                let _ = writeln!(f, "{} {text}", unix_ms());
            }
            return;
        }
        match MODE.load(Ordering::Relaxed) {
            JSON => {
                let mut obj = json!({
                    "event": "log",
                    "level": level,
                    "target": target,
                    "message": fields.message,
                });
                if !fields.rest.is_empty() {
                    obj["fields"] = Value::Object(fields.rest);
                }
                json_line(obj);
            }
            SCREEN => {
                if let Ok(mut kept) = KEPT.lock() {
                    if kept.len() >= KEPT_FOR_SCREEN {
                        kept.pop_front();
                    }
                    // 80 columns hold little: the module path goes, the message stays.
                    kept.push_back(format!("{} {said}", meta.level()));
                }
            }
            _ => eprintln!("{text}"),
        }
    }
}
