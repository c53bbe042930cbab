//! The experiment report: for each setting under a directory laid out as
//! `<setting>/<arm>/seed-<n>/{metrics.jsonl, eval-initial.json}`, a Markdown table of held-out
//! accuracy (mean ± 95% t-interval over seeds) at the iterations every run evaluated, with where
//! each arm's tokens went, and an SVG with a mean line and a band per arm. `gpo report` splices
//! the tables into the README between `<!-- report:<setting> -->` markers, so every number there
//! is regenerated from committed metrics.

use super::chart::{self, Curve, Panel, Series};
use super::run::{read_metrics, InitialEval, MetricsRow};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// One finished run of an arm.
#[derive(Debug, Clone)]
pub struct SeedRun {
    /// Seed.
    pub seed: u64,
    /// Held-out accuracy by iterations completed (0 = before training).
    pub heldout: BTreeMap<usize, f64>,
    /// The metrics rows.
    pub rows: Vec<MetricsRow>,
}

/// The runs of one arm.
#[derive(Debug, Clone)]
pub struct Arm {
    /// Arm name (its directory).
    pub name: String,
    /// Its seeds.
    pub runs: Vec<SeedRun>,
}

/// Where one arm's generated tokens went, summed over its runs.
#[derive(Debug, Clone, Copy, Default)]
struct Tokens {
    total: f64,
    probes: f64,
    trained: f64,
    with_signal: f64,
}

impl Tokens {
    fn of(a: &Arm) -> Self {
        let mut t = Tokens::default();
        for r in a.runs.iter().flat_map(|r| &r.rows) {
            t.total += r.collect.total_tokens() as f64;
            t.probes += r.collect.value_tokens as f64;
            t.trained += r.collect.trained_tokens() as f64;
            t.with_signal += (r.collect.total_tokens() - r.collect.zero_signal_tokens) as f64;
        }
        t
    }

    /// Probe (value-rollout) tokens as a share of all generated tokens.
    fn probe_share(&self) -> Option<f64> {
        (self.total > 0.0).then(|| self.probes / self.total)
    }

    /// Trained tokens as a share of the tokens outside zero-signal groups.
    fn trained_share(&self) -> Option<f64> {
        (self.with_signal > 0.0).then(|| self.trained / self.with_signal)
    }
}

/// Two-sided exact sign test: the probability, under "either arm ahead with chance ½ on each
/// seed", of a split at least as uneven as `ahead` : `behind` (ties are left out). 1 for no seeds.
pub fn sign_test(ahead: usize, behind: usize) -> f64 {
    let n = ahead + behind;
    let k = ahead.min(behind);
    // P(X ≤ k) for X ~ Binomial(n, ½), by the running binomial coefficient.
    let (mut c, mut tail) = (1.0f64, 0.0f64);
    for i in 0..=k {
        if i > 0 {
            c *= (n - i + 1) as f64 / i as f64;
        }
        tail += c;
    }
    (2.0 * tail / 2f64.powi(n as i32)).min(1.0)
}

/// Mean and sample standard deviation (NaN for no values; NaN deviation for one value).
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    (mean, (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt())
}

/// Mean and 95% half-width (Student t over the values; NaN half-width for one value).
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    let (mean, sd) = mean_sd(xs);
    if n < 2 {
        return (mean, f64::NAN);
    }
    // t quantiles (0.975) for 1 … 10 degrees of freedom; the normal one beyond.
    const T: [f64; 10] = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228];
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * sd / (n as f64).sqrt())
}

fn dirs(p: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(p).map_err(|e| Error::io(p, e))?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    v.sort();
    Ok(v)
}

fn name(p: &Path) -> String {
    p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Order of arms in tables and plots: gpo first, then the rest by name.
fn arm_order(n: &str) -> (u8, String) {
    let rank = match n {
        "gpo" => 0,
        "gpo-paper" => 1,
        "grpo" => 2,
        "random-reset" => 3,
        _ => 4,
    };
    (rank, n.to_string())
}

/// Reads every setting (directory) under `dir`: settings → arms → seeds. Runs that have not
/// finished (fewer metrics rows than their config's iterations) are left out.
pub fn load(dir: &Path) -> Result<BTreeMap<String, Vec<Arm>>> {
    let mut out = BTreeMap::new();
    for setting in dirs(dir)? {
        let mut arms = Vec::new();
        for arm in dirs(&setting)? {
            let mut runs = Vec::new();
            for run in dirs(&arm)? {
                let Some(seed) = name(&run).strip_prefix("seed-").and_then(|s| s.parse().ok()) else { continue };
                let rows = read_metrics(&run)?;
                let want = std::fs::read_to_string(run.join("config.toml"))
                    .ok()
                    .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
                    .and_then(|v| v.get("iterations").and_then(|i| i.as_integer()))
                    .unwrap_or(rows.len() as i64) as usize;
                if rows.is_empty() || rows.len() < want {
                    continue;
                }
                let mut heldout = BTreeMap::new();
                if let Some(e) = std::fs::read_to_string(run.join("eval-initial.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<InitialEval>(&t).ok())
                {
                    heldout.insert(0, e.heldout_accuracy);
                }
                for r in &rows {
                    if let Some(a) = r.heldout_accuracy {
                        heldout.insert(r.iteration + 1, a);
                    }
                }
                runs.push(SeedRun { seed, heldout, rows });
            }
            if !runs.is_empty() {
                runs.sort_by_key(|r| r.seed);
                arms.push(Arm { name: name(&arm), runs });
            }
        }
        arms.sort_by_key(|a| arm_order(&a.name));
        if !arms.is_empty() {
            out.insert(name(&setting), arms);
        }
    }
    Ok(out)
}

fn pct((m, h): (f64, f64)) -> String {
    if h.is_nan() {
        format!("{:.0}%", 100.0 * m)
    } else {
        format!("{:.0} ± {:.0}%", 100.0 * m, 100.0 * h)
    }
}

/// Iterations at which every run of the setting was evaluated.
fn common_evals(arms: &[Arm]) -> Vec<usize> {
    let mut its: Option<Vec<usize>> = None;
    for r in arms.iter().flat_map(|a| &a.runs) {
        let k: Vec<usize> = r.heldout.keys().copied().collect();
        its = Some(match its {
            None => k,
            Some(v) => v.into_iter().filter(|i| k.contains(i)).collect(),
        });
    }
    its.unwrap_or_default()
}

/// The Markdown table (and a verdict line) of one setting.
pub fn table(arms: &[Arm]) -> String {
    let evals = common_evals(arms);
    let mut s = String::from("| arm | seeds |");
    for it in &evals {
        let _ = write!(s, " {} |", if *it == 0 { "held-out before".to_string() } else { format!("after {it}") });
    }
    s.push_str(
        " tokens generated per run | prompts per run | probe share | trained / tokens with a signal | sequences trained | probes per analysis | minutes per run |\n|---|---|",
    );
    s.push_str(&"---|".repeat(evals.len() + 7));
    s.push('\n');
    for a in arms {
        let sum = |f: &dyn Fn(&MetricsRow) -> f64| -> Vec<f64> {
            a.runs.iter().map(|r| r.rows.iter().map(f).sum::<f64>()).collect()
        };
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let total = sum(&|r| r.collect.total_tokens() as f64);
        let probes = sum(&|r| r.collect.probes as f64);
        let analysed = sum(&|r| r.collect.analysed as f64);
        let seqs = sum(&|r| r.train_sequences as f64);
        let prompts = sum(&|r| r.collect.prompts as f64);
        let minutes = sum(&|r| r.seconds / 60.0);
        let seeds: Vec<String> = a.runs.iter().map(|r| r.seed.to_string()).collect();
        let _ = write!(s, "| `{}` | {} |", a.name, seeds.join(", "));
        for it in &evals {
            let v: Vec<f64> = a.runs.iter().map(|r| r.heldout[it]).collect();
            // With few seeds the t-interval is wide (t = 12.7 for two): show each seed too.
            let each = if *it > 0 && v.len() > 1 && v.len() <= 5 {
                let per: Vec<String> = v.iter().map(|x| format!("{:.0}", 100.0 * x)).collect();
                format!(" ({})", per.join(", "))
            } else {
                String::new()
            };
            let _ = write!(s, " {}{each} |", pct(mean_ci(&v)));
        }
        let share = |x: Option<f64>| x.map_or("–".into(), |x| format!("{:.0}%", 100.0 * x));
        let tokens = Tokens::of(a);
        let _ = writeln!(
            s,
            " {:.0} | {:.0} | {} | {} | {:.0} | {} | {:.0} |",
            mean(total),
            mean(prompts),
            share(tokens.probe_share()),
            share(tokens.trained_share()),
            mean(seqs),
            if analysed.iter().sum::<f64>() > 0.0 {
                format!("{:.1}", probes.iter().sum::<f64>() / analysed.iter().sum::<f64>())
            } else {
                "–".into()
            },
            mean(minutes),
        );
    }
    if let Some(&last) = evals.last().filter(|&&l| l > 0) {
        let finals = finals(arms, last);
        if let Some(best) = finals.iter().max_by(|x, y| x.1 .0.total_cmp(&y.1 .0)) {
            let overlap: Vec<&str> = finals
                .iter()
                .filter(|f| f.0 != best.0 && (f.1 .0 + f.1 .1.max(0.0)) >= (best.1 .0 - best.1 .1.max(0.0)))
                .map(|f| f.0)
                .collect();
            let _ =
                write!(s, "\nHighest mean held-out accuracy after {last} iterations: `{}` ({}).", best.0, pct(best.1));
            if best.1 .1.is_nan() {
                s.push_str(" One seed per arm so far: no interval.");
            } else if overlap.is_empty() {
                s.push_str(" Its 95% interval overlaps no other arm's.");
            } else {
                let _ = write!(s, " Its 95% interval overlaps those of: `{}`.", overlap.join("`, `"));
            }
            s.push('\n');
        }
        if let Some(line) = paired(arms, last) {
            s.push_str(&line);
        }
    }
    s
}

/// Each arm's mean held-out accuracy after `last` iterations with its 95% half-width.
fn finals(arms: &[Arm], last: usize) -> Vec<(&str, (f64, f64))> {
    arms.iter()
        .map(|a| (a.name.as_str(), mean_ci(&a.runs.iter().map(|r| r.heldout[&last]).collect::<Vec<_>>())))
        .collect()
}

/// `gpo` against every other arm on the seeds both ran, after `last` iterations: the mean of
/// the per-seed differences (`gpo` − arm, in points) with its 95% t-interval, and how many seeds
/// each side won. A run's seed fixes its tasks and sampling, so pairing by seed removes the
/// spread between seeds that the per-arm intervals carry, and compares arms with different seed
/// sets on the same seeds only. None without a `gpo` arm or another arm.
pub fn paired(arms: &[Arm], last: usize) -> Option<String> {
    let gpo = arms.iter().find(|a| a.name == "gpo")?;
    let mut parts = Vec::new();
    for a in arms.iter().filter(|a| a.name != "gpo") {
        let diffs = paired_diffs(gpo, a, last);
        if diffs.is_empty() {
            continue;
        }
        let (m, h) = mean_ci(&diffs);
        let (ahead, behind) = wins(&diffs);
        let interval = if h.is_nan() { String::new() } else { format!(" ± {:.0}", 100.0 * h) };
        parts.push(format!(
            "`{}` {:+.0}{interval} points ({} seed{}: ahead on {ahead}, behind on {behind}; sign test p = {:.2})",
            a.name,
            100.0 * m,
            diffs.len(),
            if diffs.len() == 1 { "" } else { "s" },
            sign_test(ahead, behind)
        ));
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!(
        "\n`gpo` minus each arm on the seeds both ran, after {last} iterations (paired by seed, 95% interval): {}.\n",
        parts.join("; ")
    ))
}

/// `gpo`'s held-out accuracy minus `other`'s after `last` iterations, on each seed both ran.
fn paired_diffs(gpo: &Arm, other: &Arm, last: usize) -> Vec<f64> {
    gpo.runs
        .iter()
        .filter_map(|g| {
            let o = other.runs.iter().find(|r| r.seed == g.seed)?;
            Some(g.heldout.get(&last)? - o.heldout.get(&last)?)
        })
        .collect()
}

/// Seeds on which `gpo` finished ahead and behind (ties count as neither).
fn wins(diffs: &[f64]) -> (usize, usize) {
    (diffs.iter().filter(|&&d| d > 0.0).count(), diffs.iter().filter(|&&d| d < 0.0).count())
}

/// The target, checked from the runs: per setting, the arm with the highest mean
/// held-out accuracy at the last common evaluation, `gpo`'s share of trained tokens (≥ 90% of
/// those with a signal) and of probe tokens (≤ 35% of all), and which arms a 95% interval
/// separates from `gpo` (unpaired and paired). Then, for each arm that ran on every setting, the
/// paired seeds of all settings pooled into one sign test, and what each paired comparison can
/// resolve at its spread so far. None without a `gpo` arm anywhere.
pub fn target(settings: &BTreeMap<String, Vec<Arm>>) -> Option<String> {
    let mut s = String::from(
        "| setting | highest mean after the last evaluation | `gpo` trained / tokens with a signal (target ≥ 90%) | `gpo` probe share (target ≤ 35%) | separated from `gpo` by a 95% interval |\n|---|---|---|---|---|\n",
    );
    let mut pooled: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    let mut resolution = Vec::new();
    for (setting, arms) in settings {
        let Some(gpo) = arms.iter().find(|a| a.name == "gpo") else { continue };
        let Some(&last) = common_evals(arms).last().filter(|&&l| l > 0) else { continue };
        let finals = finals(arms, last);
        let Some(best) = finals.iter().max_by(|x, y| x.1 .0.total_cmp(&y.1 .0)) else { continue };
        let g = mean_ci(&gpo.runs.iter().map(|r| r.heldout[&last]).collect::<Vec<_>>());
        let mut separated = Vec::new();
        for (a, f) in arms.iter().zip(&finals).filter(|(a, _)| a.name != "gpo") {
            let apart =
                !g.1.is_nan() && !f.1 .1.is_nan() && (g.0 - g.1 > f.1 .0 + f.1 .1 || f.1 .0 - f.1 .1 > g.0 + g.1);
            let diffs = paired_diffs(gpo, a, last);
            let (m, h) = mean_ci(&diffs);
            let paired_apart = !h.is_nan() && (m - h > 0.0 || m + h < 0.0);
            match (apart, paired_apart) {
                (true, _) => separated.push(format!("`{}`", a.name)),
                (false, true) => separated.push(format!("`{}` (paired only)", a.name)),
                _ => {}
            }
            let (ahead, behind) = wins(&diffs);
            let e = pooled.entry(a.name.as_str()).or_default();
            *e = (e.0 + ahead, e.1 + behind, e.2 + 1);
            if let Some(r) = Resolution::of(&diffs) {
                resolution.push(format!(
                    "| {setting} | `{}` | {} | {:.0} | {:.0} | {:.0} |",
                    a.name,
                    diffs.len(),
                    100.0 * r.sd,
                    100.0 * r.detectable(),
                    r.seeds_for(0.05)
                ));
            }
        }
        let t = Tokens::of(gpo);
        let check = |x: Option<f64>, ok: fn(f64) -> bool| {
            x.map_or("–".into(), |x| format!("{:.0}% ({})", 100.0 * x, if ok(x) { "met" } else { "not met" }))
        };
        let _ = writeln!(
            s,
            "| {setting} | `{}` {}{} after {last} | {} | {} | {} |",
            best.0,
            pct(best.1),
            if best.0 == "gpo" { String::new() } else { format!(" (`gpo` {})", pct(g)) },
            check(t.trained_share(), |x| x >= 0.90),
            check(t.probe_share(), |x| x <= 0.35),
            if separated.is_empty() { "none".to_string() } else { separated.join(", ") },
        );
    }
    let reported = settings.values().filter(|arms| arms.iter().any(|a| a.name == "gpo")).count();
    if reported == 0 {
        return None;
    }
    let all: Vec<String> = pooled
        .iter()
        .filter(|(_, &(_, _, n))| n == reported && reported > 1)
        .map(|(name, &(ahead, behind, _))| {
            format!("`{name}` ahead on {ahead}, behind on {behind} (sign test p = {:.2})", sign_test(ahead, behind))
        })
        .collect();
    if !all.is_empty() {
        let _ = writeln!(
            s,
            "\n{} pooled, paired by seed at each setting's last evaluation, `gpo` against: {}.",
            if reported == 2 { "Both settings".to_string() } else { format!("All {reported} settings") },
            all.join("; ")
        );
    }
    if !resolution.is_empty() {
        let _ = writeln!(
            s,
            "\nWhat the paired comparisons can resolve (80% power, two-sided 5%, normal approximation, at \
             the spread of `gpo` − arm over the seeds run so far; in points):\n\n\
             | setting | arm | paired seeds | SD of the differences | smallest difference detectable now | seeds to detect 5 points |\n\
             |---|---|---|---|---|---|\n{}",
            resolution.join("\n")
        );
    }
    Some(s)
}

/// What a paired comparison can tell apart, from the spread of its per-seed differences: the
/// smallest mean difference its seeds detect with 80% power in a two-sided test at 5%, and the
/// seeds another difference would need (normal approximation).
#[derive(Debug, Clone, Copy)]
struct Resolution {
    /// Standard deviation of the per-seed differences.
    sd: f64,
    /// Paired seeds.
    n: usize,
}

/// z₀.₉₇₅ + z₀.₈₀.
const Z_POWER: f64 = 1.959_964 + 0.841_621;

impl Resolution {
    /// None for fewer than three differences (no useful spread).
    fn of(diffs: &[f64]) -> Option<Self> {
        (diffs.len() >= 3).then(|| Self { sd: mean_sd(diffs).1, n: diffs.len() })
    }

    /// The smallest mean difference these seeds detect: (z₀.₉₇₅ + z₀.₈) · SD / √n.
    fn detectable(&self) -> f64 {
        Z_POWER * self.sd / (self.n as f64).sqrt()
    }

    /// Paired seeds needed to detect a mean difference of `delta` at the same spread.
    fn seeds_for(&self, delta: f64) -> f64 {
        (Z_POWER * self.sd / delta).powi(2).ceil()
    }
}

/// The paper's framing for one setting: every other arm compared with `gpo` at (about) equal
/// numbers of trained sequences rather than equal tokens. For each arm, the first evaluation at
/// which its runs had trained at least as many sequences as `gpo` did in its whole run (else its
/// last), with the tokens it had generated by then, so `gpo`'s extra Monte-Carlo tokens show as a
/// ratio. None when the setting has no `gpo` arm.
pub fn paper_table(arms: &[Arm]) -> Option<String> {
    let gpo = arms.iter().find(|a| a.name == "gpo")?;
    let evals: Vec<usize> = common_evals(arms).into_iter().filter(|&i| i > 0).collect();
    let last = *evals.last()?;
    // Mean over runs of the sequences and tokens through `it` iterations, and the held-out there.
    let at = |a: &Arm, it: usize| -> (f64, f64, Vec<f64>) {
        let n = a.runs.len().max(1) as f64;
        let upto = |r: &SeedRun, f: &dyn Fn(&MetricsRow) -> f64| r.rows.iter().take(it).map(f).sum::<f64>();
        let seqs = a.runs.iter().map(|r| upto(r, &|m| m.train_sequences as f64)).sum::<f64>() / n;
        let tokens = a.runs.iter().map(|r| upto(r, &|m| m.collect.total_tokens() as f64)).sum::<f64>() / n;
        (seqs, tokens, a.runs.iter().map(|r| r.heldout[&it]).collect())
    };
    let (g_seqs, g_tokens, g_held) = at(gpo, last);
    let mut s = String::from(
        "| arm | compared after | sequences trained | tokens generated | held-out | `gpo`'s tokens ÷ arm's |
|---|---|---|---|---|---|
",
    );
    let per_seed = |v: &[f64]| {
        let each: Vec<String> = v.iter().map(|x| format!("{:.0}", 100.0 * x)).collect();
        format!("{} ({})", pct(mean_ci(v)), each.join(", "))
    };
    let _ = writeln!(s, "| `gpo` | {last} | {g_seqs:.0} | {g_tokens:.0} | {} | 1.00 |", per_seed(&g_held));
    for a in arms.iter().filter(|a| a.name != "gpo") {
        let it = evals.iter().copied().find(|&e| at(a, e).0 >= g_seqs).unwrap_or(last);
        let (seqs, tokens, held) = at(a, it);
        let ratio = if tokens > 0.0 { format!("{:.2}", g_tokens / tokens) } else { "–".into() };
        let _ = writeln!(s, "| `{}` | {it} | {seqs:.0} | {tokens:.0} | {} | {ratio} |", a.name, per_seed(&held));
    }
    let _ = write!(
        s,
        "\nEach arm at its first evaluation with at least `gpo`'s {g_seqs:.0} trained sequences (or its last); \
         evaluations are every {} iterations, so the match is coarse.\n",
        evals.first().copied().unwrap_or(last)
    );
    Some(s)
}

/// Replaces the text between `<!-- report:NAME -->` and `<!-- /report:NAME -->` (the markers
/// stay). None when the markers are missing.
pub fn splice(doc: &str, name: &str, content: &str) -> Option<String> {
    let (open, close) = (format!("<!-- report:{name} -->"), format!("<!-- /report:{name} -->"));
    let a = doc.find(&open)? + open.len();
    let b = a + doc[a..].find(&close)?;
    Some(format!("{}\n{}\n{}", &doc[..a], content.trim_end(), &doc[b..]))
}

/// Mean and range over seeds at every x all runs share. In the report the band is the range over
/// seeds (a t-interval over two or three seeds would cover the whole plot; the tables give the
/// intervals).
fn curve(points: &[Vec<(f64, f64)>]) -> Curve {
    let mut by_x: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for run in points {
        for &(x, y) in run {
            by_x.entry(x as i64).or_default().push(y);
        }
    }
    by_x.into_iter()
        .filter(|(_, ys)| ys.len() == points.len())
        .map(|(x, ys)| {
            let m = ys.iter().sum::<f64>() / ys.len() as f64;
            let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (x as f64, m, lo, hi)
        })
        .collect()
}

/// The SVG of one setting: held-out accuracy and the root samples' accuracy per iteration, mean
/// line and the range over seeds per arm.
pub fn plot(setting: &str, arms: &[Arm]) -> Result<String> {
    let label = |a: &Arm| format!("{} ({} seed{})", a.name, a.runs.len(), if a.runs.len() == 1 { "" } else { "s" });
    let held = arms
        .iter()
        .map(|a| {
            let pts: Vec<Vec<(f64, f64)>> =
                a.runs.iter().map(|r| r.heldout.iter().map(|(&i, &v)| (i as f64, v)).collect()).collect();
            Series { label: label(a), points: curve(&pts) }
        })
        .collect();
    let train = arms
        .iter()
        .map(|a| {
            let pts: Vec<Vec<(f64, f64)>> = a
                .runs
                .iter()
                .map(|r| r.rows.iter().map(|m| ((m.iteration + 1) as f64, m.accuracy)).collect())
                .collect();
            Series { label: label(a), points: curve(&pts) }
        })
        .collect();
    chart::svg(
        &[
            Panel { title: format!("{setting}: held-out greedy accuracy"), series: held },
            Panel { title: format!("{setting}: accuracy of root samples"), series: train },
        ],
        Some("line: mean over seeds; band: range over seeds"),
    )
}

/// Writes `<plots>/experiment-<setting>.svg` for every setting under `dir` and, when `readme`
/// is given, splices each setting's table into it. Returns the settings reported.
pub fn report(dir: &Path, readme: Option<&Path>, plots: &Path) -> Result<Vec<String>> {
    let settings = load(dir)?;
    let mut doc = match readme {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?),
        None => None,
    };
    let mut parts = Vec::new();
    for (setting, arms) in &settings {
        let out = plots.join(format!("experiment-{setting}.svg"));
        std::fs::write(&out, plot(setting, arms)?).map_err(|e| Error::io(&out, e))?;
        parts.push((setting.clone(), table(arms)));
        if let Some(p) = paper_table(arms) {
            parts.push((format!("{setting}-paper"), p));
        }
    }
    if let Some(t) = target(&settings) {
        parts.push(("target".into(), t));
    }
    for (name, t) in parts {
        match doc.as_mut() {
            Some(d) => {
                *d = splice(d, &name, &t).ok_or_else(|| {
                    Error::invalid("readme", format!("no <!-- report:{name} --> … <!-- /report:{name} --> markers"))
                })?;
            }
            None => println!("## {name}\n\n{t}"),
        }
    }
    if let (Some(p), Some(d)) = (readme, doc) {
        std::fs::write(p, d).map_err(|e| Error::io(p, e))?;
    }
    Ok(settings.into_keys().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_splicing() {
        let (m, h) = mean_ci(&[0.2, 0.4, 0.6]);
        assert!((m - 0.4).abs() < 1e-12);
        // s = 0.2, t(2) = 4.303: 4.303 · 0.2 / √3.
        assert!((h - 4.303 * 0.2 / 3f64.sqrt()).abs() < 1e-9, "{h}");
        assert!(mean_ci(&[0.5]).1.is_nan());
        let doc = "a\n<!-- report:x -->\nold\n<!-- /report:x -->\nb";
        assert_eq!(splice(doc, "x", "new").unwrap(), "a\n<!-- report:x -->\nnew\n<!-- /report:x -->\nb");
        assert!(splice(doc, "y", "new").is_none());
    }

    /// An arm whose runs train `seqs` sequences and generate `tokens` tokens per iteration, with
    /// held-out `held[k]` after iteration k + 1.
    fn arm(name: &str, seqs: usize, tokens: u64, held: &[&[f64]]) -> Arm {
        let runs = held
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let rows = (0..h.len())
                    .map(|it| {
                        let mut r = MetricsRow { iteration: it, train_sequences: seqs, ..Default::default() };
                        r.collect.root_tokens = tokens;
                        r.heldout_accuracy = Some(h[it]);
                        r
                    })
                    .collect();
                let heldout = h.iter().enumerate().map(|(k, &v)| (k + 1, v)).collect();
                SeedRun { seed: i as u64 + 1, heldout, rows }
            })
            .collect();
        Arm { name: name.into(), runs }
    }

    #[test]
    fn the_paper_framing_compares_at_equal_trained_sequences() {
        // gpo: 10 sequences per iteration (20 in all); grpo reaches 20 after one iteration, so it
        // is compared there, having generated half of gpo's tokens.
        let arms = [
            arm("gpo", 10, 100, &[&[0.1, 0.3], &[0.2, 0.5]]),
            arm("grpo", 20, 100, &[&[0.6, 0.7], &[0.4, 0.9]]),
            arm("slow", 1, 100, &[&[0.1, 0.1]]),
        ];
        let t = paper_table(&arms).unwrap();
        assert!(t.contains("| `gpo` | 2 | 20 | 200 | 40 ± 127% (30, 50) | 1.00 |"), "{t}");
        assert!(t.contains("| `grpo` | 1 | 20 | 100 | 50 ± 127% (60, 40) | 2.00 |"), "{t}");
        assert!(t.contains("| `slow` | 2 | 2 | 200 | 10% (10) | 1.00 |"), "never reaches 20: its last: {t}");
        assert!(paper_table(&arms[1..]).is_none(), "no gpo arm");
    }

    #[test]
    fn paired_differences_use_only_the_seeds_both_arms_ran() {
        // gpo − grpo per seed after 2 iterations: −0.2, −0.4, +0.3 → mean −0.1, s = 0.3606,
        // t(2) = 4.303: ± 0.8958. `short` ran seed 1 only: one difference, no interval.
        let arms = [
            arm("gpo", 1, 1, &[&[0.0, 0.5], &[0.0, 0.5], &[0.0, 0.6]]),
            arm("grpo", 1, 1, &[&[0.0, 0.7], &[0.0, 0.9], &[0.0, 0.3]]),
            arm("short", 1, 1, &[&[0.0, 0.25]]),
        ];
        let line = paired(&arms, 2).unwrap();
        assert!(
            line.contains("`grpo` -10 ± 90 points (3 seeds: ahead on 1, behind on 2; sign test p = 1.00)"),
            "{line}"
        );
        assert!(line.contains("`short` +25 points (1 seed: ahead on 1, behind on 0; sign test p = 1.00)"), "{line}");
        assert!(table(&arms).contains(&line), "the table carries the paired line");
        assert!(paired(&arms[1..], 2).is_none(), "no gpo arm");
    }

    #[test]
    fn sign_test_matches_the_binomial_tail() {
        // 6 : 2 → 2 · (1 + 8 + 28) / 2⁸; 10 : 3 → 2 · (1 + 13 + 78 + 286) / 2¹³; 4 : 4 → capped at 1.
        assert!((sign_test(6, 2) - 74.0 / 256.0).abs() < 1e-12);
        assert!((sign_test(3, 10) - 756.0 / 8192.0).abs() < 1e-12, "symmetric");
        assert_eq!(sign_test(4, 4), 1.0);
        assert_eq!(sign_test(0, 0), 1.0);
        assert!((sign_test(5, 0) - 2.0 / 32.0).abs() < 1e-12);
    }

    #[test]
    fn resolution_is_the_normal_power_formula() {
        // Differences 0.1, 0.3, 0.2, 0.4: SD = √(0.05 / 3) = 0.12910; detectable with 4 seeds:
        // 2.80159 · 0.12910 / 2 = 0.18084; for 0.05: (2.80159 · 0.12910 / 0.05)² = 52.3 → 53.
        let r = Resolution::of(&[0.1, 0.3, 0.2, 0.4]).unwrap();
        assert!((r.sd - (0.05f64 / 3.0).sqrt()).abs() < 1e-12, "{r:?}");
        assert!((r.detectable() - 0.18084).abs() < 1e-4, "{r:?}");
        assert_eq!(r.seeds_for(0.05), 53.0);
        assert!(Resolution::of(&[0.1, 0.2]).is_none(), "two differences: no useful spread");
    }

    #[test]
    fn the_target_block_checks_every_setting_and_pools_the_seeds() {
        // Setting a: gpo 0.8, 0.9, 0.85 vs grpo 0.1, 0.2, 0.15 (separated); setting b: gpo 0.2,
        // 0.3 vs grpo 0.5, 0.6 (grpo highest, gpo behind on both). `other` ran on a only, so it is
        // not pooled. Every row generates 100 root tokens and trains them all: 100%, 0% probes.
        let a = vec![
            arm("gpo", 1, 100, &[&[0.8], &[0.9], &[0.85]]),
            arm("grpo", 1, 100, &[&[0.1], &[0.2], &[0.15]]),
            arm("other", 1, 100, &[&[0.5]]),
        ];
        let b = vec![arm("gpo", 1, 100, &[&[0.2], &[0.3]]), arm("grpo", 1, 100, &[&[0.5], &[0.6]])];
        let mut settings = BTreeMap::from([("a".to_string(), a), ("b".to_string(), b)]);
        for r in settings.values_mut().flatten().flat_map(|a| a.runs.iter_mut()).flat_map(|r| r.rows.iter_mut()) {
            r.collect.trained_root_tokens = r.collect.root_tokens;
        }
        let t = target(&settings).unwrap();
        assert!(t.contains("| a | `gpo` 85 ± 12% after 1 | 100% (met) | 0% (met) | `grpo` |"), "{t}");
        assert!(
            t.contains(
                "| b | `grpo` 55 ± 64% (`gpo` 25 ± 64%) after 1 | 100% (met) | 0% (met) | `grpo` (paired only) |"
            ),
            "{t}"
        );
        assert!(t.contains("`grpo` ahead on 3, behind on 2 (sign test p = 1.00)"), "{t}");
        assert!(!t.contains("`other` ahead"), "an arm missing from a setting is not pooled: {t}");
        assert!(t.contains("What the paired comparisons can resolve"), "{t}");
        assert!(t.contains("| a | `grpo` | 3 | 0 | 0 |"), "three equal differences: {t}");
        assert!(!t.contains("| b | `grpo` |"), "two seeds give no resolution: {t}");
        settings.values_mut().for_each(|arms| arms.retain(|a| a.name != "gpo"));
        assert!(target(&settings).is_none(), "no gpo arm");
    }
}
