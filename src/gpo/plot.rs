//! An SVG plot of held-out accuracy and mean reward per iteration, one line per run.

use super::chart::{self, Panel};
use super::run::{read_metrics, InitialEval};
use crate::{Error, Result};
use std::path::Path;

struct Run {
    label: String,
    acc: Vec<(f64, f64)>,
    reward: Vec<(f64, f64)>,
}

fn load(dir: &Path) -> Result<Run> {
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
    Ok(Run { label, acc, reward })
}

/// Writes `out` (SVG) for the given run directories.
pub fn plot(runs: &[&Path], out: &Path) -> Result<()> {
    let runs: Vec<Run> = runs.iter().map(|d| load(d)).collect::<Result<_>>()?;
    // One run per line: no band.
    let panel = |title: &str, f: fn(&Run) -> &[(f64, f64)]| Panel {
        title: title.into(),
        series: runs
            .iter()
            .map(|r| chart::Series {
                label: r.label.clone(),
                points: f(r).iter().map(|&(x, y)| (x, y, y, y)).collect(),
            })
            .collect(),
    };
    let svg = chart::svg(
        &[panel("held-out greedy accuracy", |r| &r.acc), panel("mean reward of root samples", |r| &r.reward)],
        None,
    )?;
    std::fs::write(out, svg).map_err(|e| Error::io(out, e))
}
