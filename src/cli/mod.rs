//! Command line: parses flags (each with a `CALL_*` environment variable) and runs commands.

mod bench;
mod callargs;
pub mod config;
mod demo;
mod devices;
pub mod group;
mod id;
mod join;
mod listen;
mod loopback;
mod output;
mod screen;

use std::process::ExitCode;

use clap::builder::BoolishValueParser;
use clap::{Parser, Subcommand};

/// Exit codes that scripts can rely on.
pub mod exit {
    /// Everything worked and every check passed.
    pub const OK: u8 = 0;
    /// The command could not run (network, relay, protocol or I/O error).
    pub const FAILURE: u8 = 1;
    /// Bad flags or arguments (clap's own code).
    pub const USAGE: u8 = 2;
    /// The command ran, but its checks failed (e.g. a peer heard too little).
    pub const CHECK_FAILED: u8 = 3;
    /// The MoQ relay's certificate was refused: not trusted (a self-signed relay needs
    /// `--moq-fingerprint`), or not the pinned one. Retrying will not help; the message
    /// says what to do.
    pub const CERTIFICATE: u8 = 4;

    /// The exit code of a command that failed with `err`.
    pub fn of_error(err: &anyhow::Error) -> u8 {
        use crate::call::CallError;
        use crate::transport::TransportError;
        let certificate = err.chain().any(|e| {
            let transport = match e.downcast_ref::<CallError>() {
                Some(CallError::Transport(t)) => Some(t),
                _ => e.downcast_ref::<TransportError>(),
            };
            transport.is_some_and(|t| t.certificate().is_some())
        });
        match certificate {
            true => CERTIFICATE,
            false => FAILURE,
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "call",
    version,
    about = "End-to-end encrypted group voice calls: Marmot (MLS over Nostr) + SFrame + MoQ",
    after_help = "Examples:\n  call id new && call keys publish --nostr-relay ws://127.0.0.1:7777\n  call group create friends --invite npub1…\n  call demo                      3 participants, 5 s, embedded relays\n  call demo -n 5 -s 10 --json    5 participants, JSON report on stdout\n  call demo --moq-relay moqt://127.0.0.1:4443 --moq-fingerprint <hex> \\\n            --nostr-relay ws://127.0.0.1:7777\n  call devices --json            audio devices for scripts"
)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `call=debug`. By default quiet about
    /// expected conditions that libraries log loudly: moq-transport warns about every
    /// NOT_FOUND (relays routing by track produce them as a matter of course); MDK and
    /// openmls log ERROR for a group message from an epoch whose keys are gone or our own
    /// message coming back, which `call` handles and counts itself; nostr-relay-pool logs
    /// ERROR for every attempt to reach a Nostr relay that is down (one a second: a
    /// command that needs the relay says so when it fails).
    #[arg(
        long,
        global = true,
        env = "CALL_LOG",
        default_value = "warn,moq_transport=error,mdk_core::messages=off,openmls=off,nostr_relay_pool::relay=off"
    )]
    pub log: String,
    /// Write logs to this file (appended) instead of stderr.
    #[arg(long, global = true, env = "CALL_LOG_FILE", value_name = "PATH")]
    pub log_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Take part in the group's running call, or start one: your microphone and speakers
    /// (or tone/WAV for bots), end-to-end encrypted, keys rotating with the group.
    #[command(
        after_help = "Examples:\n  call join friends                            join the running call or start one\n  call join friends --new --ring-timeout 60\n  call join 3fa2 --call 9c1e                   a particular call, by id prefix\n  call join friends --source wav:hello.wav --sink wav:heard.wav --json   a bot\n\nExit codes: 0 the call ran and we left, 1 error (or removed from the group),\n2 bad flags, 3 nobody answered a call we started, 4 the MoQ relay's certificate was\nrefused (pass --moq-fingerprint, as the message says)."
    )]
    Join {
        #[command(flatten)]
        common: config::CommonArgs,
        #[command(flatten)]
        args: join::JoinArgs,
    },
    /// The group's calls, newest first: running, dead (nobody's audio on the relay: its
    /// participants crashed), unknown (relay unreachable), over, ended, or stale (no
    /// signaling for 12 h); ids for `call join --call`.
    #[command(
        after_help = "Examples:\n  call calls friends\n  call calls friends --json\n  call calls friends --no-probe        signaling only, no relay connection"
    )]
    Calls {
        #[command(flatten)]
        common: config::CommonArgs,
        /// Group name or a unique prefix of its id.
        group: String,
        #[command(flatten)]
        relay: callargs::RelayArgs,
        /// Do not ask the MoQ relay who is alive (running calls are shown as `running`).
        #[arg(long, env = "CALL_NO_PROBE", value_parser = BoolishValueParser::new())]
        no_probe: bool,
    },
    /// Wait for calls in your groups: show who is calling (a bell on a terminal), or
    /// answer by yourself (a bot), decline, or say busy.
    #[command(after_help = listen::AFTER_HELP)]
    Listen {
        #[command(flatten)]
        common: config::CommonArgs,
        #[command(flatten)]
        args: listen::ListenArgs,
    },
    /// Run a complete encrypted group call between headless participants in this process.
    Demo(demo::DemoArgs),
    /// MoQ against WebRTC on the same audio, keys and impaired network: latency, loss,
    /// FEC, bytes on the wire and CPU per transport and scenario.
    #[command(
        after_help = "Examples:\n  call bench                                  default scenarios, every transport (about a minute)\n  call bench --scenario all --seconds 10\n  call bench --scenario loss-5,far-relay --transport moq-datagram,webrtc --json\n  call bench --scenario all --plot bench.svg    every scenario, drawn as latency CDFs and loss bars\n\nExit codes: 0 the bench ran, 1 a run could not be set up or carried no media, 2 bad flags."
    )]
    Bench(bench::BenchArgs),
    /// List audio input and output devices (ids usable as `device:ID`).
    Devices(devices::DevicesArgs),
    /// Send audio through the whole media path and back: a microphone check, or a
    /// headless self-test with tone/WAV.
    #[command(
        after_help = "Examples:\n  call loopback --source device --sink device      hear yourself through Opus+SFrame\n  call loopback --source wav:in.wav --sink wav:out.wav --loss 10\n  call loopback --source tone:523 --json"
    )]
    Loopback(loopback::LoopbackArgs),
    /// Your Nostr identity in $CALL_HOME.
    #[command(
        after_help = "Examples:\n  call id new\n  call id show --json\n  call id import - < my.nsec"
    )]
    Id {
        #[command(flatten)]
        common: config::CommonArgs,
        #[command(subcommand)]
        command: id::IdCommand,
    },
    /// Key packages that let others invite you.
    #[command(after_help = "Examples:\n  call keys publish --nostr-relay wss://relay.example")]
    Keys {
        #[command(flatten)]
        common: config::CommonArgs,
        #[command(subcommand)]
        command: group::KeysCommand,
    },
    /// Marmot groups: create, invite, accept, list, members, remove, leave.
    #[command(
        after_help = "Examples:\n  call group create friends --invite npub1…\n  call group pending\n  call group accept all\n  call group members friends\n  call group remove 3fa2 npub1…"
    )]
    Group {
        #[command(flatten)]
        common: config::CommonArgs,
        #[command(subcommand)]
        command: group::GroupCommand,
    },
    /// Fetch and process everything missed while offline: welcomes and group events.
    #[command(after_help = "Examples:\n  call sync\n  call sync --json")]
    Sync {
        #[command(flatten)]
        common: config::CommonArgs,
    },
}

impl Command {
    /// `--json`: stderr then carries JSON lines only.
    fn json(&self) -> bool {
        match self {
            Self::Join { common, .. }
            | Self::Calls { common, .. }
            | Self::Listen { common, .. }
            | Self::Id { common, .. }
            | Self::Keys { common, .. }
            | Self::Group { common, .. }
            | Self::Sync { common } => common.json,
            Self::Demo(a) => a.json,
            Self::Bench(a) => a.json,
            Self::Devices(a) => a.json,
            Self::Loopback(a) => a.json,
        }
    }
}

/// Entry point of the `call` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = output::init(&cli.log, cli.command.json(), cli.log_file.as_deref()) {
        eprintln!("error: {e:#}");
        return ExitCode::from(exit::USAGE);
    }
    // Both ring and aws-lc-rs end up in the build; rustls needs to be told which to use.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            output::error(&format!("starting the async runtime: {e}"));
            return ExitCode::from(exit::FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Devices(args) => devices::run(args),
            Command::Loopback(args) => loopback::run(args).await,
            Command::Id { common, command } => id::run(&common.resolve()?, &command),
            Command::Keys { common, command } => {
                group::run_keys(&common.resolve()?, &command).await
            }
            Command::Group { common, command } => {
                group::run_group(&common.resolve()?, &command).await
            }
            Command::Sync { common } => group::run_sync(&common.resolve()?).await,
            Command::Join { common, args } => join::run(&common, &args).await,
            Command::Calls {
                common,
                group,
                relay,
                no_probe,
            } => join::run_calls(&common, &group, &relay, !no_probe).await,
            Command::Listen { common, args } => listen::run(&common, &args).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            output::error(&format!("{e:#}"));
            ExitCode::from(exit::of_error(&e))
        }
    }
}
