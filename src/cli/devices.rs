use std::io::Write;

use clap::Args;

use crate::media::audio;

#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// Print one JSON object (`{"devices": [...]}`) on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DevicesArgs) -> anyhow::Result<u8> {
    // Listing opens every PCM ALSA knows, and the libraries behind them (alsa-lib, libjack
    // for ALSA's `jack` PCM) report each failure on stderr themselves. Nothing else of ours
    // prints meanwhile, so the whole of stderr goes to the log for that time; what failed
    // still shows in the list (`unusable: …`).
    let devices = crate::media::hush::stderr_to_log(audio::list_devices)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &serde_json::json!({ "devices": devices }))?;
        writeln!(out)?;
        return Ok(super::exit::OK);
    }
    if devices.is_empty() {
        writeln!(
            out,
            "no audio devices (headless sources: tone, wav, silence)"
        )?;
    }
    for d in &devices {
        let dir = match (d.input, d.output) {
            (true, true) => "in/out",
            (true, false) => "in",
            (false, true) => "out",
            (false, false) => "-",
        };
        let mut marks = Vec::new();
        if d.default_input {
            marks.push("default input");
        }
        if d.default_output {
            marks.push("default output");
        }
        let config = match (d.sample_rate, d.channels, &d.error) {
            (Some(r), Some(c), _) => format!("{r} Hz, {c} ch"),
            (_, _, Some(e)) => format!("unusable: {e}"),
            _ => "no default config".into(),
        };
        writeln!(
            out,
            "{:<7} {:<24} {}  ({config}){}",
            dir,
            d.id,
            d.name,
            if marks.is_empty() {
                String::new()
            } else {
                format!("  [{}]", marks.join(", "))
            }
        )?;
    }
    Ok(super::exit::OK)
}
