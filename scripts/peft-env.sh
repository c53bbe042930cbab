#!/usr/bin/env bash
# Creates the Python environment of the PyTorch + PEFT comparison that `gpo bench train` runs
# beside gpo's own trainer (scripts/peft_train.py): torch, transformers, peft, gguf.
#   scripts/peft-env.sh [venv-dir]     (default: ${XDG_CACHE_HOME:-~/.cache}/gpo/peft-venv)
# Downloads ~1 GB (torch's CPU wheel) or, where only PyPI is reachable, torch's default wheel with
# its CUDA libraries (~4 GB). WITH_TRL=1 adds TRL (scripts/trl-compare.sh). Idempotent.
set -euo pipefail
venv=${1:-${GPO_PEFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gpo/peft-venv}}
mods="torch, peft, transformers, gguf${WITH_TRL:+, trl, datasets}"
if "$venv/bin/python" -c "import $mods" 2>/dev/null; then
  echo "peft-env: $venv is ready"; exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null || "${pip[@]}" torch
"${pip[@]}" transformers peft gguf accelerate
# The versions ../shared/anchors/trl_grpo_baseline.py was measured with.
if [ -n "${WITH_TRL:-}" ]; then "${pip[@]}" trl==1.16.0 datasets; fi
"$venv/bin/python" -c "import torch, peft, transformers; print('peft-env:', '$venv', 'torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
