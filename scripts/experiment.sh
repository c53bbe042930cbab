#!/usr/bin/env bash
# The README's experiment: every arm of configs/experiment/<setting>/ for each seed, at the same
# generated-token budget per iteration. Runs what is missing, in order of importance (all arms of
# a seed before the next seed), resumes an interrupted run, and copies each finished run's small
# outputs (config, metrics, initial evaluation) to docs/experiment/<setting>/<arm>/seed-<n>/, where
# they are committed. Then regenerates the README's tables and docs/experiment-*.svg from what is
# committed there (no hand-copied numbers).
#
#   scripts/experiment.sh              # everything missing, then the report
#   scripts/experiment.sh --report     # only the report
#   SETTINGS="one-step" SEEDS="1 2" ARMS="gpo grpo" scripts/experiment.sh   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
gpo=${GPO_BIN:-target/release/gpo}   # GPO_BIN: a fixed binary for runs that span rebuilds
if [ -z "${GPO_BIN:-}" ]; then
  echo "experiment: building gpo (the first build takes ~15 minutes on 2 cores)" >&2
  cargo build --release --locked --bin gpo
fi

plan() { # setting|seeds|arms, in order of importance: every arm of a seed before the next seed
  echo "one-step|${SEEDS:-1 2 3 4 5 6 7 8 9 10 11 12 13}|gpo grpo random-reset gpo-uncapped"
  echo "one-step|${SEEDS:-1 2 3}|gpo-paper"
  echo "one-step|${SEEDS:-1}|gpo-root-term"
  echo "two-step|${SEEDS_HARD:-1 2 3 4 5 6 7 8 9 10 11}|gpo grpo random-reset gpo-uncapped"
}

if [ "${1:-}" != "--report" ]; then
  plan | while IFS='|' read -r setting seeds arms; do
    case " ${SETTINGS:-one-step two-step} " in *" $setting "*) ;; *) continue ;; esac
    for seed in $seeds; do
      for arm in $arms; do
        case " ${ARMS:-$arms} " in *" $arm "*) ;; *) continue ;; esac
        cfg="configs/experiment/$setting/$arm.toml"
        done_dir="docs/experiment/$setting/$arm/seed-$seed"
        want=$(sed -n 's/^iterations *= *\([0-9]*\).*/\1/p' "$cfg")
        if [ -f "$done_dir/metrics.jsonl" ] && [ "$(wc -l < "$done_dir/metrics.jsonl")" -ge "$want" ]; then
          continue
        fi
        out="runs/experiment/$setting/$arm/seed-$seed"
        echo "experiment: $setting / $arm / seed $seed → $out" >&2
        # The base model's greedy held-out evaluation is the same for every run of a setting
        # (same model, tasks and batching): reuse a finished run's instead of recomputing it.
        base=$(ls docs/experiment/"$setting"/*/seed-*/eval-initial.json 2>/dev/null | head -1 || true)
        if [ -n "$base" ] && [ ! -f "$out/eval-initial.json" ]; then
          mkdir -p "$out" && cp "$base" "$out/eval-initial.json"
        fi
        "$gpo" train --config "$cfg" --seed "$seed" --output "$out"
        mkdir -p "$done_dir"
        cp "$out/config.toml" "$out/metrics.jsonl" "$out/eval-initial.json" "$done_dir/"
      done
    done
  done
fi
# The report is always this tree's own build: a GPO_BIN kept for the runs' numerics may format it
# differently, and the test suite checks the README against this tree's report.
if [ -n "${GPO_BIN:-}" ]; then
  cargo build --release --locked --bin gpo
fi
target/release/gpo report --dir docs/experiment --readme README.md --plots docs
