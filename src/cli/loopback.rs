use std::io::Write;

use anyhow::Context;
use clap::Args;

use crate::call::loopback::{self, LoopbackConfig, SinkSpec, SourceSpec};
use crate::media::opus::CodecConfig;

#[derive(Args, Debug)]
pub struct LoopbackArgs {
    /// Audio in: tone[:HZ], silence, wav:PATH, device[:NAME] (see `call devices`).
    #[arg(long, env = "CALL_SOURCE", default_value = "tone:440")]
    pub source: SourceSpec,
    /// Audio out: null, wav:PATH, device[:NAME].
    #[arg(long, env = "CALL_SINK", default_value = "null")]
    pub sink: SinkSpec,
    /// Seconds of audio to send through.
    #[arg(short, long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Percentage of frames to drop between sender and receiver (exercises FEC and PLC).
    #[arg(long, default_value_t = 0.0, value_parser = parse_pct)]
    pub loss: f64,
    /// Seed of the loss pattern.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Constant bit rate and one packet size (privacy enhanced).
    #[arg(long)]
    pub enhanced: bool,
    /// Opus frame duration in ms: 10 or 20.
    #[arg(long, env = "CALL_FRAME_MS", default_value_t = 20, value_parser = super::demo::parse_frame_ms)]
    pub frame_ms: u32,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_pct(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v / 100.0),
        _ => Err(format!("`{s}` is not a percentage in 0..=100")),
    }
}

pub async fn run(args: LoopbackArgs) -> anyhow::Result<u8> {
    let cfg = LoopbackConfig {
        source: args.source,
        sink: args.sink,
        seconds: args.seconds,
        codec: if args.enhanced {
            CodecConfig::enhanced(args.frame_ms)
        } else {
            CodecConfig {
                frame_ms: args.frame_ms,
                ..CodecConfig::default()
            }
        },
        loss: args.loss,
        seed: args.seed,
    };
    let report = loopback::run(&cfg).await.context("loopback failed")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        let j = &report.jitter;
        writeln!(
            out,
            "{} frames sent, {} lost, {} played ({} FEC-recovered, {} concealed), jitter buffer {:.0} ms, {} refused by SFrame",
            report.frames_sent,
            report.frames_lost,
            report.frames_played,
            j.fec_recovered,
            j.concealed,
            j.target_delay_ms,
            report.rejects.total()
        )?;
        writeln!(
            out,
            "heard {}; pipeline {:.0} µs per frame",
            report
                .heard_hz
                .map_or_else(|| "silence".into(), |f| format!("{f:.1} Hz")),
            report.pipeline_us_per_frame
        )?;
        if let Some(m) = report.mouth_to_ear_ms {
            writeln!(
                out,
                "mouth-to-ear p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms ({} frames)",
                m.p50, m.p95, m.p99, m.count
            )?;
        }
        let st = &report.stages_ms;
        let p50 = |s: Option<crate::call::timing::LatencySummary>| {
            s.map_or_else(|| "-".into(), |s| format!("{:.1}", s.p50))
        };
        writeln!(
            out,
            "of which (p50, ms): capture → encoder {}, jitter buffer {}, playout → played {}",
            p50(st.capture_to_encode),
            p50(st.arrival_to_playout),
            p50(st.playout_to_play)
        )?;
        for (what, dev) in [
            ("capture", &report.audio.capture),
            ("playback", &report.audio.playback),
        ] {
            if let Some(d) = dev {
                writeln!(
                    out,
                    "{what}: {} at {} Hz, {} channel(s), {}",
                    d.device,
                    d.sample_rate,
                    d.channels,
                    d.buffer_frames
                        .map_or_else(|| "default buffer".into(), |n| format!("{n}-frame buffer"))
                )?;
            }
        }
    }
    Ok(super::exit::OK)
}
