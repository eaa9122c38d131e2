//! `call listen [GROUP…]`: wait for calls; ring, answer, decline or say busy.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::Args;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::callargs::MediaArgs;
use super::config::CommonArgs;
use super::group::{connect, resolve_group, resume_of, save_cursor};
use crate::call::listen::{self, AutoResponse, ListenCommand, ListenConfig, ListenEvent, Watched};
use crate::call::session::{CallEvent, CallTarget, JoinOptions};

pub const AFTER_HELP: &str = "\
Examples:
  call listen                                   every group; a bell when a call rings
  call listen friends --json                    events for scripts, one JSON object a line
  call listen --answer --source wav:greeting.wav --sink wav:heard.wav   an answering bot
  call listen work --busy --reason \"in a meeting\"
On a terminal, while a call rings: a⏎ answers (with --source/--sink), d⏎ declines,
b⏎ says busy; in a call m⏎ mutes or unmutes and q⏎ leaves (back to listening).
A call rings for --ring-timeout seconds, then it is reported as missed. One call at a time:
calls that were ringing when we went into one are reported as missed (`in_call`); a call
offered in another group while we are in one is answered busy (\"in another call\") and
reported as missed (`in_call`) and answered (busy).

--json events (stdout, each with `ts`, Unix seconds): listening, ringing, answered
(status accept/decline/busy, after_ms since it rang), joining, call (an event of the call
we are in), call_ended (with the call's report), call_failed, missed (reason timeout, late,
ended, left, in_call, too_many), answered_elsewhere, stopped.

Exit codes: 0 stopped by Ctrl-C/SIGTERM, 1 error (relays, identity, groups), 2 bad flags.
A call that cannot be joined (e.g. its relay's certificate refused) is a call_failed event;
listening goes on.";

#[derive(Args, Debug)]
pub struct ListenArgs {
    /// Groups to listen in (names or unique id prefixes); every active group when none.
    pub groups: Vec<String>,
    /// Join every call that rings (one at a time) with --source/--sink, and listen again
    /// once it is over (everyone else left, or --seconds passed).
    #[arg(long, env = "CALL_ANSWER", conflicts_with_all = ["decline", "busy"], value_parser = BoolishValueParser::new())]
    pub answer: bool,
    /// Answer every call that rings with `decline`.
    #[arg(long, env = "CALL_DECLINE", conflicts_with = "busy", value_parser = BoolishValueParser::new())]
    pub decline: bool,
    /// Answer every call that rings with `busy`.
    #[arg(long, env = "CALL_BUSY", value_parser = BoolishValueParser::new())]
    pub busy: bool,
    /// Reason sent with a decline or busy answer.
    #[arg(long, env = "CALL_ANSWER_REASON", value_name = "TEXT")]
    pub reason: Option<String>,
    /// Seconds a call rings (counted from its offer) before it is a missed call.
    #[arg(long, env = "CALL_RING_TIMEOUT", default_value_t = listen::RING_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ring_timeout: u64,
    #[command(flatten)]
    pub media: MediaArgs,
}

fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

/// One line for a person; `None` for events not worth a line.
fn human(e: &ListenEvent) -> Option<String> {
    Some(match e {
        ListenEvent::Listening { groups } => format!(
            "listening for calls in {} (Ctrl-C to stop)",
            groups.join(", ")
        ),
        ListenEvent::Ringing {
            group,
            call_id,
            caller,
            rings_for_s,
            ..
        } => format!(
            "call from {caller} in {group} (call {}…), ringing {rings_for_s} s",
            short(call_id)
        ),
        ListenEvent::Answered {
            status, call_id, ..
        } => format!("answered {}…: {status}", short(call_id)),
        ListenEvent::Joining { group, call_id, .. } => {
            format!("joining call {}… in {group}", short(call_id))
        }
        ListenEvent::Call { call, .. } => match call {
            CallEvent::PeerJoined { npub, .. } => format!("  + {npub}"),
            CallEvent::PeerLeft { npub, why } => format!("  - {npub}: {why}"),
            CallEvent::PeerLost { npub } => format!("  ? {npub}: nothing heard for 3 s"),
            CallEvent::Muted { muted } => {
                format!("  you are {}", if *muted { "muted" } else { "unmuted" })
            }
            _ => return None,
        },
        ListenEvent::CallEnded {
            call_id, report, ..
        } => format!(
            "call {}… over for us after {:.0} s ({}); listening again",
            short(call_id),
            report.seconds,
            report.ended_by
        ),
        ListenEvent::CallFailed { call_id, error, .. } => {
            format!("could not join call {}…: {error}", short(call_id))
        }
        ListenEvent::Missed {
            group,
            call_id,
            caller,
            reason,
        } => format!(
            "missed call from {caller} in {group} (call {}…, {reason})",
            short(call_id)
        ),
        ListenEvent::AnsweredElsewhere {
            call_id, status, ..
        } => format!("call {}… answered elsewhere: {status}", short(call_id)),
        ListenEvent::Stopped { reason } => format!("stopped listening ({reason})"),
    })
}

/// Lines on stdin while listening (a terminal, or a script's pipe); end of file changes
/// nothing.
fn stdin_commands() -> mpsc::UnboundedReceiver<ListenCommand> {
    let (tx, rx) = mpsc::unbounded_channel();
    // A thread, because reading stdin blocks; it dies with the process.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            let cmd = match line.trim() {
                "a" | "answer" => ListenCommand::Answer,
                "d" | "decline" => ListenCommand::Decline,
                "b" | "busy" => ListenCommand::Busy,
                "m" | "mute" | "unmute" => ListenCommand::ToggleMute,
                "q" | "leave" => ListenCommand::Leave,
                "" => continue,
                other => {
                    eprintln!("`{other}`: a answer, d decline, b busy; in a call m mute, q leave");
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

pub async fn run(common: &CommonArgs, args: &ListenArgs) -> anyhow::Result<u8> {
    let settings = common.resolve()?;
    let verification = args.media.relay.verification(&settings)?;
    let mut join = JoinOptions::new(settings.moq_relay.clone(), verification);
    join.target = CallTarget::New; // replaced per call
    join.duration = args.media.seconds.map(Duration::from_secs);
    join.relay_token = args.media.relay.token_policy(&settings);
    // Answered calls use their offer's delivery; this only says so if it differs.
    join.delivery = args.media.delivery(&settings);
    let config = ListenConfig {
        ring_timeout: Duration::from_secs(args.ring_timeout),
        auto: match (args.answer, args.decline, args.busy) {
            (true, _, _) => AutoResponse::Answer,
            (_, true, _) => AutoResponse::Decline,
            (_, _, true) => AutoResponse::Busy,
            _ => AutoResponse::Ring,
        },
        reason: args.reason.clone(),
        join,
        source: args.media.source.clone(),
        sink: args.media.sink.clone(),
    };
    if config.auto == AutoResponse::Answer {
        // A bot's audio is checked before it waits for hours; each call opens it anew.
        drop(config.source.open().context("opening the audio source")?);
        drop(config.sink.open().context("opening the audio sink")?);
    }

    let (home, member) = connect(&settings).await?;
    let result = async {
        let all = member.groups()?;
        let chosen = if args.groups.is_empty() {
            all.iter()
                .filter(|g| g.state.as_str() == "active")
                .cloned()
                .collect()
        } else {
            let mut chosen = Vec::new();
            for q in &args.groups {
                let g = resolve_group(&all, q)?;
                anyhow::ensure!(
                    g.state.as_str() == "active",
                    "group {} is not active (you left or were removed)",
                    g.name
                );
                chosen.push(g);
            }
            chosen
        };
        anyhow::ensure!(!chosen.is_empty(), "no active groups to listen in");
        let mut groups = chosen
            .into_iter()
            .map(|group| {
                let resume = resume_of(&home, &group)?;
                anyhow::Ok(Watched { group, resume })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            call_relay::stop_signal().await;
            let _ = stop_tx.send(true);
        });
        let tty = std::io::stdout().is_terminal();
        let ask = tty && config.auto == AutoResponse::Ring;
        let json = settings.json;
        listen::listen(
            &member,
            &mut groups,
            &config,
            stdin_commands(),
            stop,
            |e: &ListenEvent| {
                let mut out = std::io::stdout().lock();
                if json {
                    let mut v = json!(e);
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    v["ts"] = json!((ts * 1000.0).round() / 1000.0);
                    let _ = writeln!(out, "{v}");
                } else if let Some(line) = human(e) {
                    // The terminal bell: a call rings.
                    let bell = if tty && matches!(e, ListenEvent::Ringing { .. }) {
                        "\x07"
                    } else {
                        ""
                    };
                    let _ = writeln!(out, "{bell}{line}");
                    if ask && matches!(e, ListenEvent::Ringing { .. }) {
                        let _ = writeln!(out, "  a⏎ answer, d⏎ decline, b⏎ busy");
                    }
                }
                let _ = out.flush();
            },
            |w: &Watched| {
                if let Err(e) = save_cursor(&home, &w.group, &w.resume) {
                    tracing::warn!("saving the sync cursor of {}: {e:#}", w.group.name);
                }
            },
        )
        .await
        .context("listening for calls")
    }
    .await;
    member.disconnect().await;
    result?;
    Ok(super::exit::OK)
}
