use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::Args;
use url::Url;

use crate::call::demo::{self, DemoConfig, DemoReport};
use crate::call::signaling::Privacy;
use crate::transport::{CertVerification, Delivery, Impairment, TokenPolicy};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of participants (the first one creates the group and calls).
    #[arg(short = 'n', long, env = "CALL_DEMO_PARTICIPANTS", default_value_t = 3,
          value_parser = clap::value_parser!(u16).range(2..=64))]
    pub participants: u16,
    /// Seconds of audio each participant sends.
    #[arg(short, long, env = "CALL_DEMO_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Opus frame duration in milliseconds (10 or 20).
    #[arg(long, env = "CALL_FRAME_MS", default_value_t = 20,
          value_parser = parse_frame_ms)]
    pub frame_ms: u32,
    /// `enhanced`: constant bit rate and one packet size, so sizes leak no speech pattern.
    #[arg(long, env = "CALL_PRIVACY", default_value = "standard", value_parser = parse_privacy)]
    pub privacy: Privacy,
    /// Print exactly one JSON object on stdout instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// MoQ relay (moqt:// or https://). Without it and --nostr-relay, relays are embedded.
    #[arg(long, env = "CALL_MOQ_RELAY", value_parser = super::config::parse_moq_url)]
    pub moq_relay: Option<Url>,
    /// Nostr relay(s), comma-separated (ws:// or wss://).
    #[arg(long = "nostr-relay", env = "CALL_NOSTR_RELAYS", value_delimiter = ',',
          value_parser = super::config::parse_nostr_url)]
    pub nostr_relays: Vec<Url>,
    /// Pin the MoQ relay's certificate by its SHA-256 fingerprint (hex), as call-relay prints it.
    #[arg(long, env = "CALL_MOQ_FINGERPRINT", conflicts_with = "moq_insecure",
          value_parser = super::config::parse_fingerprint)]
    pub moq_fingerprint: Option<String>,
    /// Accept any MoQ relay certificate. For development only.
    #[arg(long, env = "CALL_MOQ_INSECURE", value_parser = BoolishValueParser::new())]
    pub moq_insecure: bool,
    /// When to present the call's relay token in SETUP: `auto` (present it; without it if
    /// the relay refuses the session), `always`, `never`.
    #[arg(long, env = "CALL_RELAY_TOKEN", default_value_t = TokenPolicy::Auto,
          value_name = "auto|always|never")]
    pub relay_token: TokenPolicy,
    /// Percentage of datagrams dropped on each participant's path to the MoQ relay, each way.
    #[arg(long, env = "CALL_DEMO_LOSS", default_value_t = 0.0, value_parser = parse_pct)]
    pub loss: f64,
    /// Milliseconds of one-way delay added on each participant's path to the MoQ relay.
    #[arg(long, env = "CALL_DEMO_DELAY", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=5000))]
    pub delay: u64,
    /// Milliseconds of extra one-way delay, uniform in 0..JITTER, per datagram.
    #[arg(long, env = "CALL_DEMO_JITTER", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=5000))]
    pub jitter: u64,
    /// How frames travel: `stream` (a QUIC stream per frame) or `datagram` (a MoQ datagram
    /// per frame, no retransmission). Example: --delivery datagram --loss 5
    #[arg(long, env = "CALL_DELIVERY", default_value_t = Delivery::Stream,
          value_name = "stream|datagram")]
    pub delivery: Delivery,
    /// Seed of the impairment (participant i uses SEED + i).
    #[arg(long, env = "CALL_DEMO_SEED", default_value_t = 1)]
    pub seed: u64,
}

fn parse_pct(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a percentage in 0..=100")),
    }
}

pub(super) fn parse_privacy(s: &str) -> Result<Privacy, String> {
    match s {
        "standard" => Ok(Privacy::Standard),
        "enhanced" => Ok(Privacy::Enhanced),
        _ => Err(format!("`{s}` is not standard or enhanced")),
    }
}

pub(super) fn parse_frame_ms(s: &str) -> Result<u32, String> {
    match s {
        "10" => Ok(10),
        "20" => Ok(20),
        _ => Err(format!("`{s}` is not 10 or 20")),
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<u8> {
    let json = args.json;
    let progress = |msg: &str| {
        if !json {
            eprintln!("· {msg}");
        }
    };
    let mut verification = match (&args.moq_fingerprint, args.moq_insecure) {
        (Some(fp), _) => CertVerification::fingerprint(fp).map_err(anyhow::Error::msg)?,
        (None, true) => CertVerification::Insecure,
        (None, false) => CertVerification::WebPki,
    };

    // Start the embedded relays for whatever was not given.
    let embedded = if args.moq_relay.is_none() || args.nostr_relays.is_empty() {
        let relay = call_relay::Relay::bind(&call_relay::RelayConfig::ephemeral())
            .await
            .context("starting the embedded relay")?;
        progress(&format!(
            "embedded relay: {} and {}",
            relay.moq_url(),
            relay.nostr_url()
        ));
        Some(relay)
    } else {
        None
    };
    let moq_relay = match (&args.moq_relay, &embedded) {
        (Some(u), _) => u.clone(),
        (None, Some(r)) => {
            verification =
                CertVerification::fingerprint(r.fingerprint()).map_err(anyhow::Error::msg)?;
            r.moq_url()
        }
        (None, None) => unreachable!("embedded relay starts when no MoQ relay is given"),
    };
    let nostr_relays = match (&embedded, args.nostr_relays.is_empty()) {
        (Some(r), true) => vec![r.nostr_url()],
        _ => args.nostr_relays.clone(),
    };
    let relay_task = embedded.map(|r| tokio::spawn(r.run()));

    let impaired = args.loss > 0.0 || args.delay > 0 || args.jitter > 0;
    if impaired && verification == CertVerification::WebPki {
        anyhow::bail!(
            "--loss/--delay/--jitter put a local path in front of the relay, whose name then no \
             longer matches its certificate: pass --moq-fingerprint (or --moq-insecure)"
        );
    }
    let config = DemoConfig {
        participants: usize::from(args.participants),
        seconds: args.seconds,
        frame_ms: args.frame_ms,
        moq_relay,
        nostr_relays,
        verification,
        privacy: args.privacy,
        impairment: impaired.then_some(Impairment {
            loss: args.loss / 100.0,
            pattern: crate::transport::LossPattern::Random,
            delay: Duration::from_millis(args.delay),
            jitter: Duration::from_millis(args.jitter),
            seed: args.seed,
        }),
        relay_token: args.relay_token,
        delivery: args.delivery,
    };
    let result = demo::run(config, &progress).await;
    if let Some(t) = relay_task {
        t.abort();
    }
    let report = result.context("demo call failed")?;

    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_human(&mut out, &report)?;
    }
    Ok(if report.ok {
        super::exit::OK
    } else {
        super::exit::CHECK_FAILED
    })
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn print_human(out: &mut impl Write, r: &DemoReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{} participants, {} s of {} ms Opus frames ({} delivery), MLS epoch {}, relay {}",
        r.participants, r.seconds, r.frame_ms, r.delivery, r.mls_epoch, r.moq_relay
    )?;
    if let Some(i) = &r.impairment {
        writeln!(
            out,
            "each path to the relay: {:.1} % loss, {:.0} ms delay, {:.0} ms jitter (seed {})",
            i.loss_pct, i.delay_ms, i.jitter_ms, i.seed
        )?;
    }
    for p in &r.reports {
        writeln!(
            out,
            "participant {} (leaf {}, {:.0} Hz, sent {} frames, relay RTT {} ms, {}…)",
            p.index,
            p.leaf_index,
            p.tone_hz,
            p.sent,
            fmt_ms(p.relay_rtt_ms),
            &p.pubkey[..12]
        )?;
        for peer in &p.peers {
            writeln!(
                out,
                "  from {}: {}/{} frames ({:.1}%), {} failed to decrypt, heard {} Hz (sent {:.0}), network p50 {} ms p99 {} ms, mouth-to-ear p50 {} ms p99 {} ms, jitter buffer {:.0} ms with {} concealed / {} FEC  {}",
                peer.from,
                peer.received,
                peer.expected,
                peer.received_pct,
                peer.decrypt_failed,
                peer.heard_hz.map_or_else(|| "nothing".into(), |f| format!("{f:.1}")),
                peer.tone_hz,
                fmt_ms(peer.latency_p50_ms),
                fmt_ms(peer.latency_p99_ms),
                fmt_ms(peer.mouth_to_ear_ms.map(|l| l.p50)),
                fmt_ms(peer.mouth_to_ear_ms.map(|l| l.p99)),
                peer.jitter.target_delay_ms,
                peer.jitter.concealed,
                peer.jitter.fec_recovered,
                if peer.ok { "ok" } else { "FAIL" }
            )?;
        }
    }
    let m2e = r.mouth_to_ear_ms;
    writeln!(
        out,
        "setup {:.0} ms, wall {:.0} ms, join to first audio p50 {} ms, network p50 {} ms p99 {} ms, mouth-to-ear p50 {} p95 {} p99 {} ms: {}",
        r.setup_ms,
        r.wall_ms,
        fmt_ms(r.join_to_first_audio_ms.map(|l| l.p50)),
        fmt_ms(r.latency_p50_ms),
        fmt_ms(r.latency_p99_ms),
        fmt_ms(m2e.map(|l| l.p50)),
        fmt_ms(m2e.map(|l| l.p95)),
        fmt_ms(m2e.map(|l| l.p99)),
        if r.ok {
            "every peer heard every other"
        } else {
            "FAILED"
        }
    )
}
