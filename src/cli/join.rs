//! `call join <group>`: take part in the group's call (or start one) from this terminal.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::Args;
use serde_json::json;
use tokio::sync::mpsc;

use super::callargs::{MediaArgs, RelayArgs};
use super::config::CommonArgs;
use super::demo::{parse_frame_ms, parse_privacy};
use super::group::{connect_home, resolve_group, resume_of, save_cursor};
use super::output;
use super::screen::{Screen, SCREEN_STATUS_INTERVAL};
use crate::call::session::{
    self, CallEvent, CallReport, CallTarget, EndReason, JoinOptions, UserCommand,
};
use crate::call::signaling::Privacy;
use crate::group::{GroupRef, Home};

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// Group name or a unique prefix of its id (see `call group list`).
    pub group: String,
    /// Start a new call even if one is running.
    #[arg(long, conflicts_with = "call")]
    pub new: bool,
    /// Join the call whose id starts with this, however old.
    #[arg(long = "call", value_name = "ID_PREFIX")]
    pub call: Option<String>,
    #[command(flatten)]
    pub media: MediaArgs,
    /// Seconds a call we start waits for an answer before it ends (0 = forever).
    #[arg(long, env = "CALL_RING_TIMEOUT", default_value_t = session::RING_TIMEOUT.as_secs())]
    pub ring_timeout: u64,
    /// Opus frame duration in ms for a call we start (10 or 20).
    #[arg(long, env = "CALL_FRAME_MS", default_value_t = 20, value_parser = parse_frame_ms)]
    pub frame_ms: u32,
    /// Privacy of a call we start: `enhanced` = constant bit rate, one packet size.
    #[arg(long, env = "CALL_PRIVACY", default_value = "standard", value_parser = parse_privacy)]
    pub privacy: Privacy,
    /// Print a line per event and a status every 5 s instead of the live screen (which
    /// needs a terminal on stdin and stderr, and is never used with `--json`).
    #[arg(long, env = "CALL_NO_SCREEN", value_parser = BoolishValueParser::new())]
    pub no_screen: bool,
}

/// How long `call join` waits for members' names (kind 0) before the screen shows npubs;
/// names that come later still replace them.
const NAMES_TIMEOUT: Duration = Duration::from_secs(3);

fn print_event(event: &CallEvent) {
    match event {
        CallEvent::Started { call_id } => {
            eprintln!("started call {}…; waiting for the others", &call_id[..12]);
        }
        CallEvent::Joined {
            call_id,
            participants,
        } => eprintln!(
            "joined call {}… ({participants} other participant(s))",
            &call_id[..12]
        ),
        CallEvent::PeerJoined { npub, leaf } => eprintln!("+ {npub} (leaf {leaf})"),
        CallEvent::PeerLeft { npub, why } => eprintln!("- {npub}: {why}"),
        CallEvent::PeerLost { npub } => eprintln!("? {npub}: nothing heard for 3 s"),
        CallEvent::PeerBack { npub } => eprintln!("+ {npub} is back"),
        CallEvent::PeerDeclined {
            npub,
            status,
            reason,
        } => eprintln!(
            "{npub}: {status}{}",
            reason
                .as_deref()
                .map_or_else(String::new, |r| format!(" ({r})"))
        ),
        CallEvent::PeerMuted { npub, muted } => {
            eprintln!("{npub} {}", if *muted { "muted" } else { "unmuted" });
        }
        CallEvent::Muted { muted } => {
            eprintln!("you are {}", if *muted { "muted" } else { "unmuted" });
        }
        CallEvent::Rekeyed { epoch } => {
            eprintln!("group moved to epoch {epoch}: call keys replaced");
        }
        CallEvent::Status(s) => {
            let mut line = format!(
                "{:>5.0} s  epoch {}  sent {}{}  rtt {}",
                s.seconds,
                s.epoch,
                s.sent,
                if s.muted { " (muted)" } else { "" },
                s.relay_rtt_ms
                    .map_or_else(|| "-".into(), |r| format!("{r:.1} ms"))
            );
            for p in &s.peers {
                line.push_str(&format!(
                    "  | {}… {} rx, {} concealed, {:.0} ms buffer",
                    &p.npub[..14.min(p.npub.len())],
                    p.received,
                    p.jitter.concealed,
                    p.jitter.target_delay_ms
                ));
            }
            eprintln!("{line}");
        }
    }
}

/// The report for a person: lines that fit 80 columns (the call id cut to the 16 hex
/// digits `call calls` shows; each peer's npub on a line of its own).
fn print_human(r: &CallReport) {
    println!(
        "call {}… ({}): {:.1} s, {} frames sent, epochs {:?}, ended: {}",
        &r.call_id[..16.min(r.call_id.len())],
        if r.started { "started" } else { "joined" },
        r.seconds,
        r.sent,
        r.epochs,
        r.ended_by
    );
    if let Some(ms) = r.first_audio_ms {
        println!("  first peer audio {ms:.0} ms after start");
    }
    // Forged or unreadable group events are refused and logged; the count says so too.
    println!(
        "  group events: {} processed, refused: {}",
        r.group_events.processed,
        r.group_events.dropped.summary()
    );
    let ms = |l: Option<crate::call::timing::LatencySummary>| {
        l.map_or_else(
            || "-".into(),
            |l| format!("{:.0}/{:.0}/{:.0} ms", l.p50, l.p95, l.p99),
        )
    };
    for p in &r.peers {
        println!("  {} (leaf {})", p.npub, p.leaf);
        println!(
            "    {} frames, {} refused, {} concealed, heard {}\n    receive→play {}, mouth-to-ear ≈ {} (p50/p95/p99)",
            p.received,
            p.rejects.total(),
            p.jitter.concealed,
            p.heard_hz
                .map_or_else(|| "nothing".into(), |f| format!("{f:.0} Hz")),
            ms(p.receive_to_play_ms),
            ms(p.mouth_to_ear_ms),
        );
    }
}

/// Ctrl-C or SIGTERM leaves; so does a line `q` on stdin, and `m` toggles mute. Scripts can drive a
/// bot the same way through a pipe; stdin at end of file changes nothing.
fn user_commands() -> mpsc::UnboundedReceiver<UserCommand> {
    let (tx, rx) = mpsc::unbounded_channel();
    let on_signal = tx.clone();
    // SIGTERM too: a bot stopped by its supervisor (kill, systemd, docker) says goodbye.
    tokio::spawn(async move {
        call_relay::stop_signal().await;
        let _ = on_signal.send(UserCommand::Leave);
    });
    if std::io::stdin().is_terminal() && !output::is_json() {
        eprintln!("type m⏎ to mute or unmute, q⏎ (or Ctrl-C) to leave");
    }
    // A thread, because reading stdin blocks; it dies with the process.
    std::thread::spawn(move || {
        let mut muted = false;
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            let cmd = match line.trim() {
                "m" | "mute" | "unmute" => {
                    muted = !muted;
                    UserCommand::Mute(muted)
                }
                "q" | "quit" | "leave" => UserCommand::Leave,
                "" => continue,
                other => {
                    eprintln!("`{other}`: type m to mute or unmute, q to leave");
                    continue;
                }
            };
            if tx.send(cmd).is_err() {
                break;
            }
        }
    });
    rx
}

pub async fn run(common: &CommonArgs, args: &JoinArgs) -> anyhow::Result<u8> {
    let settings = common.resolve()?;
    let verification = args.media.relay.verification(&settings)?;
    // The identity first (a missing one must not hide behind audio library noise), then
    // devices and files: a missing microphone should not cost a relay connection.
    let home = Home::open(&settings.home)?;
    home.keys()?;
    let source = args
        .media
        .source
        .open()
        .context("opening the audio source")?;
    let sink = args.media.sink.open().context("opening the audio sink")?;

    let (home, member) = connect_home(&settings, home).await?;
    let live = !settings.json
        && !args.no_screen
        && std::io::stdin().is_terminal()
        && std::io::stderr().is_terminal();
    let result = async {
        let group = resolve_group(&member.groups()?, &args.group)?;
        anyhow::ensure!(
            group.state.as_str() == "active",
            "group {} is not active (you left or were removed)",
            group.name
        );
        let group_ref = GroupRef {
            mls_group_id: group.mls_group_id.clone(),
            nostr_group_id: group.nostr_group_id,
        };
        let opts = JoinOptions {
            target: match (&args.call, args.new) {
                (Some(prefix), _) => CallTarget::Id(prefix.clone()),
                (None, true) => CallTarget::New,
                (None, false) => CallTarget::Auto,
            },
            moq_relay: settings.moq_relay.clone(),
            verification,
            privacy: args.privacy,
            frame_ms: args.frame_ms,
            duration: args.media.seconds.map(Duration::from_secs),
            ring_timeout: Duration::from_secs(args.ring_timeout),
            counters: Some(home.dir().join("counters")),
            moq_through: None,
            record_frames: false,
            relay_token: args.media.relay.token_policy(&settings),
            delivery: args.media.delivery(&settings),
            leave_when_alone: false,
            status_interval: if live {
                SCREEN_STATUS_INTERVAL
            } else {
                session::STATUS_INTERVAL
            },
            // A person in a call decides about a second call themselves.
            other_offers: None,
        };
        let names = Arc::new(Mutex::new(BTreeMap::new()));
        let (mut screen, commands) = if live {
            let (screen, commands) = Screen::start(&group.name, names.clone())?;
            (Some(screen), commands)
        } else {
            (None, user_commands())
        };
        let call = session::run(
            &member,
            &group_ref,
            resume_of(&home, &group)?,
            &opts,
            source,
            sink,
            commands,
            |e: &CallEvent| match &mut screen {
                Some(screen) => screen.on_event(e),
                // Scripts get the events too, one JSON object per line on stderr.
                None if settings.json => output::json_line(json!(e)),
                None => print_event(e),
            },
        );
        // Names for the screen, fetched while the call starts; the call does not wait.
        let fetch_names = async {
            if !live {
                return;
            }
            let members: Vec<_> = member
                .leaf_map(&group_ref)
                .map(|l| l.into_values().collect())
                .unwrap_or_default();
            match member.fetch_names(&members, NAMES_TIMEOUT).await {
                Ok(found) => {
                    if let Ok(mut names) = names.lock() {
                        names.extend(found.into_iter().map(|(pk, n)| (session::npub(&pk), n)));
                    }
                }
                Err(e) => tracing::info!("fetching members' names: {e}"),
            }
        };
        let (call, ()) = futures::join!(call, fetch_names);
        drop(screen);
        let (report, cursor) = call.with_context(|| format!("call in group {}", group.name))?;
        save_cursor(&home, &group, &cursor)?;
        Ok(report)
    }
    .await;
    member.disconnect().await;
    let report = result?;
    if settings.json {
        println!("{}", json!(report));
    } else {
        print_human(&report);
    }
    Ok(match report.ended_by {
        EndReason::NoAnswer => super::exit::CHECK_FAILED,
        EndReason::RemovedFromGroup => super::exit::FAILURE,
        _ => super::exit::OK,
    })
}

/// `call calls <group>`: the group's calls as its signaling tells them, and for calls the
/// signaling says are running, whether anybody is alive in them on the relay.
pub async fn run_calls(
    common: &CommonArgs,
    group: &str,
    relay: &RelayArgs,
    probe: bool,
) -> anyhow::Result<u8> {
    let settings = common.resolve()?;
    let probe_opts = crate::call::probe::ProbeOptions {
        verification: relay.verification(&settings)?,
        relay_token: relay.token_policy(&settings),
        through: None,
    };
    // Only reads: works during a call (which keeps the group current) and creates nothing.
    let (home, member) = connect_home(&settings, Home::open_read(&settings.home)?).await?;
    let result = async {
        let group = resolve_group(&member.groups()?, group)?;
        let group_ref = GroupRef {
            mls_group_id: group.mls_group_id.clone(),
            nostr_group_id: group.nostr_group_id,
        };
        // Catch up first: the newest offers and leaves are what matter.
        if !home.is_read_only() {
            let (since, seen) = resume_of(&home, &group)?.unzip();
            let synced = member
                .sync_group(&group, since, &seen.unwrap_or_default())
                .await?;
            save_cursor(&home, &group, &synced.cursor)?;
        }
        super::group::note_not_caught_up(&settings, &home);
        let leaves = member.leaf_map(&group_ref)?;
        let calls = session::calls_from_history(&session::history(&member, &group_ref)?, &leaves);
        anyhow::Ok((group, calls))
    }
    .await;
    member.disconnect().await;
    let (group, calls) = result?;
    let now = nostr_sdk::prelude::Timestamp::now();
    // Participants who crash never say `leave`: ask the relay (docs/protocol.md §2).
    let running: Vec<&session::KnownCall> = calls.iter().filter(|c| c.joinable(now)).collect();
    let liveness: std::collections::HashMap<[u8; 32], crate::call::probe::Liveness> = if probe {
        let found = crate::call::probe::probe_calls(&running, &probe_opts).await;
        running.iter().map(|c| c.offer.call_id).zip(found).collect()
    } else {
        Default::default()
    };
    let npub = |pk: &nostr_sdk::prelude::PublicKey| {
        nostr_sdk::prelude::ToBech32::to_bech32(pk).unwrap_or_else(|_| pk.to_hex())
    };
    let state = |c: &session::KnownCall| {
        use crate::call::probe::Liveness;
        if c.ended {
            "ended"
        } else if c.joinable(now) {
            match liveness.get(&c.offer.call_id) {
                None | Some(Liveness::Alive) => "running",
                Some(Liveness::Silent) => "dead",
                Some(Liveness::Unreachable(_)) => "unknown",
            }
        } else if c.running() {
            "stale"
        } else {
            "over"
        }
    };
    if settings.json {
        let list: Vec<serde_json::Value> = calls
            .iter()
            .rev()
            .map(|c| {
                json!({
                    "id": c.id_hex(),
                    "state": state(c),
                    "offered_at": c.offered_at.as_secs(),
                    "offered_by": c.offered_by.as_ref().map(npub),
                    "last_activity": c.last_activity.as_secs(),
                    "participants": c.participants.keys().map(npub).collect::<Vec<_>>(),
                    "privacy": match c.offer.privacy {
                        Privacy::Standard => "standard",
                        Privacy::Enhanced => "enhanced",
                    },
                    "delivery": c.offer.delivery.as_str(),
                })
            })
            .collect();
        println!("{}", json!({ "group": group.name, "calls": list }));
    } else if calls.is_empty() {
        println!("no calls in {}", group.name);
    } else {
        for c in calls.iter().rev() {
            println!(
                "{}  {:<7}  {} s ago by {}, {} in it",
                &c.id_hex()[..16],
                state(c),
                now.as_secs().saturating_sub(c.offered_at.as_secs()),
                c.offered_by.as_ref().map_or_else(|| "?".to_string(), npub),
                c.participants.len()
            );
        }
    }
    Ok(super::exit::OK)
}
