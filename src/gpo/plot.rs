//! An SVG plot of held-out accuracy and mean reward per iteration, one line per run.

use super::report::{panel, Curve};
use super::run::{read_metrics, InitialEval};
use crate::{Error, Result};
use std::fmt::Write;
use std::path::Path;

use super::report::COLORS;

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

/// Writes `out` (SVG) for the given run directories.
pub fn plot(runs: &[&Path], out: &Path) -> Result<()> {
    let series: Vec<Series> = runs.iter().map(|d| load(d)).collect::<Result<_>>()?;
    let x_max = series.iter().flat_map(|s| s.reward.iter().chain(&s.acc)).map(|p| p.0).fold(1.0, f64::max);
    let height = 362.0 + 18.0 * series.len().div_ceil(3) as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="980" height="{height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#,
    );
    // One run per line: curves without a band.
    let curves = |f: fn(&Series) -> &[(f64, f64)]| -> Vec<Curve> {
        series.iter().map(|s| f(s).iter().map(|&(x, y)| (x, y, y, y)).collect()).collect()
    };
    panel(&mut svg, 0.0, "held-out greedy accuracy", &curves(|s| &s.acc), x_max);
    panel(&mut svg, 490.0, "mean reward of root samples", &curves(|s| &s.reward), x_max);
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
