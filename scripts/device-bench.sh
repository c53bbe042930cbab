#!/usr/bin/env bash
# Runs on the device machine (H100/H200; no cargo there) from the repository root, with
# target/cuda-dist.tar.xz carried (scripts/build-cuda.sh; 45 MiB of the tool's 64) and
# ../shared/anchors copied to ./shared/.
# Measures the GPU rows of the README: rollout vs the raw C-API loop on a 7B-shaped F16 qwen2
# (64 sequences, 256 + 256 tokens) and the LoRA training step against PEFT (8 × 1,024 tokens, r = 16).
#
# Status: not yet run (no device was lent to the session that wrote it).
set -euo pipefail
OUT=${OUT:-/tmp/gpo-device}
mkdir -p "$OUT" /tmp/models
if [ ! -x target/cuda-dist/gpo ]; then
  mkdir -p target/cuda-dist
  tar -C target/cuda-dist -xJf target/cuda-dist.tar.xz 2>/dev/null ||
    python3 -c 'import tarfile; tarfile.open("target/cuda-dist.tar.xz").extractall("target/cuda-dist")'
fi
# cuBLAS and cudart from the device's PyTorch install.
TORCH_LIBS=$(python3 - <<'PY'
import os, glob, nvidia
print(":".join(sorted({os.path.dirname(p) for p in glob.glob(os.path.join(os.path.dirname(nvidia.__file__), "*", "lib", "*.so*"))})))
PY
)
export LD_LIBRARY_PATH="$PWD/target/cuda-dist:$TORCH_LIBS:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for shape in q7b q1.5b; do
  [ -f "/tmp/models/$shape.gguf" ] || python3 shared/anchors/mkgguf.py "$shape" "/tmp/models/$shape.gguf"
done
target/cuda-dist/gpo bench rollout --model /tmp/models/q7b.gguf -b 64 -p 256 -g 256 -k 16 \
  --gpu-layers 99 --kv per-sequence --kv unified --rounds 3 2>&1 | tee "$OUT/rollout-7b.txt"
for shape in q1.5b q7b; do
  target/cuda-dist/gpo bench train --device cuda --model "/tmp/models/$shape.gguf" -b 8 -t 1024 -r 16 --steps 3 --no-baseline 2>&1 | tee "$OUT/train-$shape.txt"
  python3 shared/anchors/hfbench.py train "/tmp/models/$shape.gguf" 2>&1 | tee "$OUT/peft-$shape.txt" || true
done
