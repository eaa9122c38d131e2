//! `call bench --plot FILE.svg`: one row per scenario, on the left the mouth-to-ear latency
//! distribution (CDF) of every transport in the report, on the right its residual loss
//! (frames not heard, as a share of the frames sent). Drawn from the report alone, so a
//! transport added to the bench appears without changes here.
//!
//! SVG only: text in SVG is left to the viewer's fonts, while a PNG would need a font
//! rasteriser (and system font libraries) in the build.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{BenchReport, RunReport, Transport};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("the report has no runs to draw")]
    Empty,
    #[error("drawing: {0}")]
    Draw(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

const WIDTH: u32 = 1000;
const ROW_HEIGHT: u32 = 250;
const TITLE_HEIGHT: u32 = 40;
/// Points per CDF line at most (long runs would otherwise write every frame).
const CDF_POINTS: usize = 400;
const FONT: &str = "sans-serif";

/// A colour per transport, by its place in [`Transport::ALL`], so a transport keeps its
/// colour from one plot to the next whatever subset was run.
fn colour(t: Transport) -> RGBColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
    ];
    let i = Transport::ALL.iter().position(|x| *x == t).unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

/// The empirical CDF of `samples` as (value, share ≤ value), thinned to `CDF_POINTS`.
fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(CDF_POINTS).max(1);
    let mut points: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], (i + 1) as f64 / n as f64))
        .collect();
    if points.last().is_some_and(|p| p.1 < 1.0) {
        points.push((v[n - 1], 1.0));
    }
    points
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// The plot as SVG text.
pub fn render_svg(report: &BenchReport) -> Result<String, PlotError> {
    if report.runs.is_empty() {
        return Err(PlotError::Empty);
    }
    // Scenarios in the report's order; a run of a scenario the list lacks still gets a row.
    let mut scenarios: Vec<(String, String)> = report
        .scenarios
        .iter()
        .map(|s| (s.name.clone(), s.describe()))
        .collect();
    for r in &report.runs {
        if !scenarios.iter().any(|(n, _)| *n == r.scenario) {
            scenarios.push((r.scenario.clone(), String::new()));
        }
    }
    scenarios.retain(|(n, _)| report.runs.iter().any(|r| r.scenario == *n));
    let height = TITLE_HEIGHT + ROW_HEIGHT * scenarios.len() as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root
            .titled(
                &format!(
                    "call bench: {} s per run, {} ms Opus frames, seed {}; mouth-to-ear latency and residual loss",
                    report.seconds, report.frame_ms, report.seed
                ),
                (FONT, 18),
            )
            .map_err(draw_err)?;
        let rows = root.split_evenly((scenarios.len(), 1));
        for ((name, describe), row) in scenarios.iter().zip(rows.iter()) {
            let runs: Vec<&RunReport> =
                report.runs.iter().filter(|r| r.scenario == *name).collect();
            let (left, right) = row.split_horizontally(WIDTH * 64 / 100);
            latency_panel(&left, name, describe, &runs)?;
            loss_panel(&right, name, &runs)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn latency_panel(
    area: &Area<'_>,
    name: &str,
    describe: &str,
    runs: &[&RunReport],
) -> Result<(), PlotError> {
    let lines: Vec<(Transport, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| (r.transport, cdf(&r.mouth_to_ear_samples)))
        .collect();
    let all = lines.iter().flat_map(|(_, p)| p.iter().map(|p| p.0));
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    // Zoom on where the lines are, with a little room on each side.
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        let pad = ((hi - lo) * 0.05).max(2.0);
        ((lo - pad).max(0.0).floor(), (hi + pad).ceil())
    } else {
        (0.0, 1.0)
    };
    let caption = if describe.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {describe}")
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 14))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(44)
        .build_cartesian_2d(lo..hi, 0f64..1.0f64)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("mouth-to-ear latency, ms")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("share of frames")
        .y_labels(5)
        .draw()
        .map_err(draw_err)?;
    for (transport, points) in lines {
        if points.is_empty() {
            continue;
        }
        let c = colour(transport);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(draw_err)?
            .label(transport.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 12))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

fn loss_panel(area: &Area<'_>, name: &str, runs: &[&RunReport]) -> Result<(), PlotError> {
    let n = runs.len() as i32;
    let top = runs
        .iter()
        .map(|r| r.residual_loss_pct)
        .fold(0.0f64, f64::max);
    // At least 1 %, so that a clean path's empty bars do not fill the panel.
    let top = (top * 1.25).max(1.0);
    let names: Vec<&'static str> = runs.iter().map(|r| r.transport.as_str()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{name}: residual loss"), (FONT, 14))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(44)
        // A segmented axis over the integers 0..=k has k + 1 segments, one per bar (with a
        // single bar, one empty segment after it).
        .build_cartesian_2d((0..(n - 1).max(1)).into_segmented(), 0f64..top)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(runs.len() + 1)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names
                .get(usize::try_from(*i).unwrap_or(usize::MAX))
                .map_or_else(String::new, |s| s.to_string()),
            _ => String::new(),
        })
        .y_desc("% of frames concealed")
        .y_labels(5)
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(runs.iter().zip(0..).map(|(r, i)| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), r.residual_loss_pct),
                ],
                colour(r.transport).filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(draw_err)?;
    chart
        .draw_series(runs.iter().zip(0..).map(|(r, i)| {
            Text::new(
                format!("{:.1} % ({})", r.residual_loss_pct, r.concealed),
                (SegmentValue::CenterOf(i), r.residual_loss_pct + top * 0.02),
                (FONT, 11)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))
        .map_err(draw_err)?;
    Ok(())
}

/// Draws the plot into `path` (written whole, then renamed, so a reader never sees half).
pub fn write_svg(report: &BenchReport, path: &Path) -> Result<(), PlotError> {
    let svg = render_svg(report)?;
    let write_err = |source| PlotError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("svg.tmp");
    std::fs::write(&tmp, svg).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_is_sorted_ends_at_one_and_is_thinned() {
        let samples: Vec<f64> = (0..10_000).rev().map(f64::from).collect();
        let c = cdf(&samples);
        assert!(c.len() <= CDF_POINTS + 1, "{}", c.len());
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(c.last().copied(), Some((9999.0, 1.0)));
        assert_eq!(c[0].0, 0.0);
        assert!(cdf(&[]).is_empty());
        assert_eq!(cdf(&[5.0, f64::NAN]), vec![(5.0, 1.0)]);
    }

    fn run(transport: Transport, scenario: &str, base: f64, concealed: u64) -> RunReport {
        let m2e: Vec<f64> = (0..150).map(|i| base + f64::from(i % 7)).collect();
        RunReport {
            transport,
            scenario: scenario.into(),
            frame: 20,
            frames: 150,
            received: 150 - concealed,
            lost: concealed,
            late: 0,
            fec_recovered: 0,
            concealed,
            drained: 0,
            residual_loss_pct: 100.0 * concealed as f64 / 150.0,
            decrypt_failed: 0,
            send_dropped: 0,
            tone_hz: 440.0,
            heard_hz: Some(440.0),
            network_ms: None,
            mouth_to_ear_ms: crate::call::timing::LatencySummary::of(&m2e),
            network_samples: Vec::new(),
            mouth_to_ear_samples: m2e,
            jitter_target_ms: 40.0,
            wire_up_bytes_per_s: 8000.0,
            wire_up_packets_per_s: 50.0,
            wire_down_bytes_per_s: 1500.0,
            cpu_us_per_frame: 400.0,
            setup_ms: 10.0,
        }
    }

    #[test]
    fn every_scenario_gets_a_row_and_every_transport_a_line_and_a_bar() {
        let scenarios = super::super::Scenario::parse_list(&["clean".into(), "burst-5".into()])
            .expect("known scenarios");
        let mut report = BenchReport {
            seconds: 3.0,
            frame_ms: 20,
            seed: 1,
            bitrate: 28_000,
            fec: true,
            loss_hint_pct: 10,
            mls_epoch: 0,
            scenarios,
            runs: Vec::new(),
        };
        assert!(matches!(render_svg(&report), Err(PlotError::Empty)));
        for (s, extra) in [("clean", 0.0), ("burst-5", 30.0)] {
            for (i, t) in Transport::ALL.iter().enumerate() {
                report
                    .runs
                    .push(run(*t, s, 40.0 + extra + i as f64, 3 * i as u64));
            }
        }
        let svg = render_svg(&report).expect("drawn");
        assert!(svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for t in Transport::ALL {
            // A legend entry per scenario row.
            let n = svg.matches(t.as_str()).count();
            assert!(n >= 4, "{t} named {n} times");
        }
        assert!(svg.contains("clean: no loss") && svg.contains("burst-5: 5 % loss in runs of 4"));
        assert!(svg.contains("burst-5: residual loss"));
        // One CDF line per run (legend samples are paths of two points, also polylines).
        let lines = svg.matches("<polyline").count();
        assert!(lines >= report.runs.len(), "{lines} polylines");
        // One transport alone still draws (a segmented axis of one bar).
        let mut one = report.clone();
        one.runs.retain(|r| r.transport == Transport::Webrtc);
        let svg_one = render_svg(&one).expect("one transport drawn");
        assert!(!svg_one.contains(Transport::MoqStream.as_str()));
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("bench.svg");
        write_svg(&report, &path).expect("written");
        assert_eq!(std::fs::read_to_string(&path).expect("read back"), svg);
    }
}
