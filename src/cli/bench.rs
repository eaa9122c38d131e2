use std::io::Write;

use anyhow::Context;
use clap::Args;

use crate::bench::{self, scenario, BenchConfig, BenchReport, Scenario, Transport};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenarios, comma-separated: clean, loss-1, loss-5, loss-10, delay-50, jitter-30,
    /// far-relay (80 ms per relay leg), or all. Default: clean,loss-5,jitter-30,far-relay.
    #[arg(long = "scenario", env = "CALL_BENCH_SCENARIOS", value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Transports, comma-separated: moq-stream, moq-datagram, webrtc. Default: all.
    #[arg(
        long = "transport",
        env = "CALL_BENCH_TRANSPORTS",
        value_delimiter = ','
    )]
    pub transports: Vec<Transport>,
    /// Measured seconds of audio per transport and scenario.
    #[arg(short, long, env = "CALL_BENCH_SECONDS", default_value_t = bench::DEFAULT_SECONDS,
          value_parser = parse_seconds)]
    pub seconds: f64,
    /// Opus frame duration in milliseconds (10 or 20).
    #[arg(long, env = "CALL_FRAME_MS", default_value_t = 20,
          value_parser = super::demo::parse_frame_ms)]
    pub frame_ms: u32,
    /// Frequency of the tone sent, in Hz.
    #[arg(long, env = "CALL_BENCH_TONE", default_value_t = 440.0)]
    pub tone: f64,
    /// Seed of the impairment (the same for every transport).
    #[arg(long, env = "CALL_BENCH_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Print exactly one JSON object on stdout instead of the table.
    #[arg(long, env = "CALL_BENCH_JSON")]
    pub json: bool,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds in 0.1..=3600")),
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<u8> {
    let json = args.json;
    let progress = |msg: &str| {
        if !json {
            eprintln!("· {msg}");
        }
    };
    let names: Vec<String> = if args.scenarios.is_empty() {
        scenario::DEFAULT.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    let scenarios = Scenario::parse_list(&names).map_err(anyhow::Error::msg)?;
    let transports = if args.transports.is_empty() {
        Transport::ALL.to_vec()
    } else {
        args.transports.clone()
    };
    let config = BenchConfig {
        scenarios,
        transports,
        seconds: args.seconds,
        frame_ms: args.frame_ms,
        tone_hz: args.tone,
        seed: args.seed,
    };
    let report = bench::run(&config, &progress)
        .await
        .context("bench failed")?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_table(&mut out, &report)?;
    }
    Ok(super::exit::OK)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn print_table(out: &mut impl Write, r: &BenchReport) -> std::io::Result<()> {
    writeln!(
        out,
        "{:.1} s per run, {} ms Opus frames at {} bit/s, in-band FEC {} (loss hint {} %), SFrame keys from MLS epoch {}, seed {}",
        r.seconds,
        r.frame_ms,
        r.bitrate,
        if r.fec { "on" } else { "off" },
        r.loss_hint_pct,
        r.mls_epoch,
        r.seed
    )?;
    writeln!(
        out,
        "{:<10} {:<10} {:>20} {:>20} {:>6} {:>5} {:>5} {:>6} {:>8} {:>7} {:>6} {:>6}",
        "scenario",
        "transport",
        "network p50/95/99",
        "mouth-ear p50/95/99",
        "lost",
        "late",
        "FEC",
        "resid%",
        "up B/s",
        "down B/s",
        "CPU µs",
        "Hz"
    )?;
    for run in &r.runs {
        let l = |s: Option<crate::call::timing::LatencySummary>| match s {
            Some(s) => format!("{:.1}/{:.1}/{:.1}", s.p50, s.p95, s.p99),
            None => "-".into(),
        };
        writeln!(
            out,
            "{:<10} {:<10} {:>20} {:>20} {:>6} {:>5} {:>5} {:>6.1} {:>8.0} {:>7.0} {:>6.0} {:>6}",
            run.scenario,
            run.transport.as_str(),
            l(run.network_ms),
            l(run.mouth_to_ear_ms),
            run.lost,
            run.late,
            run.fec_recovered,
            run.residual_loss_pct,
            run.wire_up_bytes_per_s,
            run.wire_down_bytes_per_s,
            run.cpu_us_per_frame,
            fmt_ms(run.heard_hz).trim_end_matches(".0"),
        )?;
    }
    writeln!(
        out,
        "latency in ms; lost = never arrived, late = after its playout slot, FEC = rebuilt from the next packet, resid% = not heard (concealed); bytes/s on the sender's link with IP/UDP/QUIC or SRTP headers; CPU = whole run (endpoints, relay, paths) per frame"
    )
}
