//! An SVG plot of held-out accuracy and mean reward per iteration, one line per run.

use super::run::{read_metrics, InitialEval};
use crate::{Error, Result};
use std::fmt::Write;
use std::path::Path;

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

struct Series {
    label: String,
    acc: Vec<(f64, f64)>,
    reward: Vec<(f64, f64)>,
}

fn load(dir: &Path) -> Result<Series> {
    let rows = read_metrics(dir)?;
    let label = rows.first().map_or_else(
        || dir.display().to_string(),
        |r| format!("{} ({})", r.mode, dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()),
    );
    let mut acc = Vec::new();
    if let Ok(t) = std::fs::read_to_string(dir.join("eval-initial.json")) {
        if let Ok(e) = serde_json::from_str::<InitialEval>(&t) {
            acc.push((0.0, e.heldout_accuracy));
        }
    }
    acc.extend(rows.iter().filter_map(|r| r.heldout_accuracy.map(|a| ((r.iteration + 1) as f64, a))));
    let reward = rows.iter().map(|r| ((r.iteration + 1) as f64, r.reward_mean)).collect();
    Ok(Series { label, acc, reward })
}

fn panel(svg: &mut String, x0: f64, title: &str, series: &[(&str, &[(f64, f64)])], x_max: f64) {
    let (w, h, left, top) = (420.0, 260.0, x0 + 50.0, 40.0);
    let _ = write!(
        svg,
        r#"<text x="{}" y="24" font-size="14" font-weight="bold">{}</text>"#,
        left,
        super::report::escape(title)
    );
    let _ = write!(svg, r##"<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##);
    for k in 0..=4 {
        let y = top + h - h * k as f64 / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" font-size="10" text-anchor="end">{:.2}</text>"##,
            left + w,
            left - 4.0,
            y + 3.0,
            k as f64 / 4.0
        );
    }
    let xm = x_max.max(1.0);
    for k in 0..=4 {
        let it = (xm * k as f64 / 4.0).round();
        let x = left + w * it / xm;
        let _ = write!(svg, r#"<text x="{x}" y="{}" font-size="10" text-anchor="middle">{it}</text>"#, top + h + 14.0);
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">iteration</text>"#,
        left + w / 2.0,
        top + h + 30.0
    );
    for (i, (_, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let coords: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", left + w * x / xm, top + h - h * y.clamp(0.0, 1.0)))
            .collect();
        if coords.len() > 1 {
            let _ =
                write!(svg, r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#, coords.join(" "));
        }
        for p in &coords {
            let (x, y) = p.split_once(',').expect("coord");
            let _ = write!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
        }
    }
}

/// Writes `out` (SVG) for the given run directories.
pub fn plot(runs: &[&Path], out: &Path) -> Result<()> {
    let series: Vec<Series> = runs.iter().map(|d| load(d)).collect::<Result<_>>()?;
    let x_max = series.iter().flat_map(|s| s.reward.iter().chain(&s.acc)).map(|p| p.0).fold(1.0, f64::max);
    let height = 362.0 + 18.0 * series.len().div_ceil(3) as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="980" height="{height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#,
    );
    let acc: Vec<(&str, &[(f64, f64)])> = series.iter().map(|s| (s.label.as_str(), s.acc.as_slice())).collect();
    let rew: Vec<(&str, &[(f64, f64)])> = series.iter().map(|s| (s.label.as_str(), s.reward.as_slice())).collect();
    panel(&mut svg, 0.0, "held-out greedy accuracy", &acc, x_max);
    panel(&mut svg, 490.0, "mean reward of root samples", &rew, x_max);
    // Legend: three entries a row, inside the canvas however many runs there are.
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let y = 350.0 + 18.0 * (i / 3) as f64;
        let x = 60.0 + 300.0 * (i % 3) as f64;
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{c}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            y - 10.0,
            x + 16.0,
            y,
            super::report::escape(&s.label)
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(out, svg).map_err(|e| Error::io(out, e))
}
