#!/usr/bin/env bash
# The README's experiment: grpo, random-reset, gpo and gpo with the adaptive value budget on the
# built-in arithmetic task with the default model, same seed and the same per-iteration token
# budget (configs/experiment/*.toml). Each run resumes if interrupted. Writes
# runs/experiment/<arm>/ and the combined plot runs/experiment/plot.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --locked --quiet --bin gpo
for mode in grpo random-reset gpo gpo-adaptive; do
  /usr/bin/time -f "$mode: %e s wall" target/release/gpo train --config "configs/experiment/$mode.toml"
done
target/release/gpo plot --run runs/experiment/grpo --run runs/experiment/random-reset --run runs/experiment/gpo --run runs/experiment/gpo-adaptive --out runs/experiment/plot.svg
