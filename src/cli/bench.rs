use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::Args;

use crate::bench::{self, scenario, BenchConfig, BenchReport, Scenario, Transport};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenarios, comma-separated, or all. clean; loss-1, loss-5, loss-10 (random loss, %);
    /// loss-5-rtt-40 (5 % loss, 20 ms each way); burst-5 (5 % loss in runs of 4 packets on
    /// average); delay-20, delay-50, delay-100 (one-way ms); jitter-10, jitter-30 (ms);
    /// far-relay (80 ms on each relay leg, 160 ms end to end). Default:
    /// clean,loss-5-rtt-40,jitter-30,far-relay.
    #[arg(long = "scenario", env = "CALL_BENCH_SCENARIOS", value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Transports, comma-separated: moq-stream, moq-datagram, webrtc, webrtc-nack (NACK/RTX
    /// on). Default: all.
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
    #[arg(long, env = "CALL_BENCH_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Also draw the results into this SVG file: per scenario, the mouth-to-ear latency
    /// distribution (CDF) of each transport and its residual loss (frames concealed).
    #[arg(long, env = "CALL_BENCH_PLOT", value_name = "FILE.svg", value_parser = parse_plot)]
    pub plot: Option<PathBuf>,
}

fn parse_plot(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(path),
        _ => Err(format!(
            "`{s}`: the plot is drawn as SVG, name the file FILE.svg (PNG would need a font \
             rasteriser in the build)"
        )),
    }
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
    if let Some(path) = &args.plot {
        bench::plot::write_svg(&report, path)
            .with_context(|| format!("drawing the plot into {}", path.display()))?;
        progress(&format!("plot written to {}", path.display()));
    }
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
        "{:<10} {:<12} {:>20} {:>20} {:>5} {:>5} {:>4} {:>5} {:>6} {:>7} {:>8} {:>6} {:>6}",
        "scenario",
        "transport",
        "network p50/95/99",
        "mouth-ear p50/95/99",
        "lost",
        "late",
        "FEC",
        "drop",
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
            "{:<10} {:<12} {:>20} {:>20} {:>5} {:>5} {:>4} {:>5} {:>6.1} {:>7.0} {:>8.0} {:>6.0} {:>6}",
            run.scenario,
            run.transport.as_str(),
            l(run.network_ms),
            l(run.mouth_to_ear_ms),
            run.lost,
            run.late,
            run.fec_recovered,
            run.drained,
            run.residual_loss_pct,
            run.wire_up_bytes_per_s,
            run.wire_down_bytes_per_s,
            run.cpu_us_per_frame,
            fmt_ms(run.heard_hz).trim_end_matches(".0"),
        )?;
    }
    writeln!(
        out,
        "latency in ms; lost = never arrived, late = after its playout slot, FEC = rebuilt from the next packet, drop = arrived but dropped by the jitter buffer shrinking after a spike, resid% = not heard (concealed or dropped); bytes/s on the sender's link with IP/UDP/QUIC or SRTP headers; CPU = whole run (endpoints, relay, paths) per frame"
    )
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use crate::bench::scenario;

    #[test]
    fn help_lists_every_scenario_and_the_plot_flag() {
        let mut cli = crate::cli::Cli::command();
        let bench = cli
            .find_subcommand_mut("bench")
            .expect("a bench subcommand");
        let help = bench.render_long_help().to_string();
        for name in scenario::NAMES.iter().chain(scenario::DEFAULT) {
            assert!(
                help.contains(name),
                "--help does not name `{name}`:\n{help}"
            );
        }
        for needle in ["--plot", "CALL_BENCH_PLOT", "CALL_BENCH_SCENARIOS"] {
            assert!(help.contains(needle), "--help lacks {needle}");
        }
    }

    #[test]
    fn the_plot_must_be_svg() {
        assert!(super::parse_plot("docs/bench.svg").is_ok());
        assert!(super::parse_plot("bench.SVG").is_ok());
        assert!(super::parse_plot("bench.png").is_err());
        assert!(super::parse_plot("bench").is_err());
    }
}
