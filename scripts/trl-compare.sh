#!/usr/bin/env bash
# One GRPO iteration, gpo vs Hugging Face TRL + PEFT, on the workload of
# ../shared/anchors/trl_grpo_baseline.py (8 prompts x 4 generations x up to 64 tokens, LoRA r = 16 on
# all seven projections, f32), back to back on this machine: configs/trl-workload/grpo.toml is
# gpo's side. Prints each side's median step (generation + training) and the ratio.
#   scripts/trl-compare.sh [steps]        (default 3 TRL steps; gpo runs steps + 1 iterations)
# Needs the Python environment of scripts/peft-env.sh with TRL: WITH_TRL=1 scripts/peft-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}
gpo=${GPO_BIN:-target/release/gpo}
py=${GPO_PEFT_PYTHON:-${GPO_PEFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gpo/peft-venv}/bin/python}
anchor=${TRL_ANCHOR:-../shared/anchors/trl_grpo_baseline.py}
model=${GPO_MODEL:-${GPO_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpo/models}/SmolLM2-135M-Instruct.Q4_1.gguf}
if ! "$py" -c "import trl, peft, gguf" 2>/dev/null; then
  echo "trl-compare: $py lacks trl/peft/gguf; create it with: WITH_TRL=1 scripts/peft-env.sh" >&2; exit 2
fi
[ -f "$anchor" ] || { echo "trl-compare: no TRL anchor at $anchor (set TRL_ANCHOR)" >&2; exit 2; }
[ -f "$model" ] || { echo "trl-compare: no model at $model (scripts/fetch-model.sh)" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "trl-compare: TRL + PEFT, $steps GRPO steps ..." >&2
HF_HUB_OFFLINE=1 "$py" "$anchor" --gguf "$model" --steps "$steps" --out-dir "$out/trl" > "$out/trl.log" 2>&1 \
  || { tail -20 "$out/trl.log" >&2; exit 1; }
echo "trl-compare: gpo, $((steps + 1)) iterations ..." >&2
cfg="$out/grpo.toml"
sed -e "s|^iterations = .*|iterations = $((steps + 1))\nmodel = \"$model\"|" \
    -e "s|\"tasks.jsonl\"|\"$PWD/configs/trl-workload/tasks.jsonl\"|" configs/trl-workload/grpo.toml > "$cfg"
"$gpo" train --config "$cfg" --output "$out/gpo" > "$out/gpo.log" 2>&1 || { tail -20 "$out/gpo.log" >&2; exit 1; }

python3 - "$out/trl.log" "$out/gpo/metrics.jsonl" <<'PY'
import json, statistics, sys
trl = json.loads([l for l in open(sys.argv[1]) if l.startswith("RESULT ")][-1][7:])
rows = [json.loads(l) for l in open(sys.argv[2])]
# The last iteration also runs the held-out evaluation; compare the iterations without one.
its = [r for r in rows if r.get("heldout_accuracy") is None] or rows
med = lambda xs: statistics.median(xs)
g_step = med([r["seconds"] for r in its])
g_gen = med([r["collect"]["rollout_seconds"] for r in its])
g_train = med([r["seconds"] - r["collect"]["rollout_seconds"] for r in its])
g_seqs = med([r["train_sequences"] for r in its])
print(f"| side | median step s | generation s | training s | sequences trained per step |")
print(f"|---|---|---|---|---|")
print(f"| TRL {trl['versions']['trl']} + PEFT {trl['versions']['peft']} (torch {trl['versions']['torch']}, {trl['threads']} threads) "
      f"| {trl['median_step_s']:.1f} | {trl['median_gen_s']:.1f} | {trl['median_train_s']:.1f} | {trl['prompts_per_step'] * trl['num_generations']} |")
print(f"| gpo (`configs/trl-workload/grpo.toml`) | {g_step:.1f} | {g_gen:.1f} | {g_train:.1f} | {g_seqs:g} |")
print(f"\ngpo / TRL step time: {g_step / trl['median_step_s']:.2f}x (target <= 0.5x); "
      f"training only: {g_train / trl['median_train_s']:.2f}x; generation: {g_gen / trl['median_gen_s']:.2f}x")
PY
