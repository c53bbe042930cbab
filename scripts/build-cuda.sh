#!/usr/bin/env bash
# Builds the CUDA variant of gpo (llama.cpp's CUDA backend + candle CUDA) for Hopper (sm_90) on a
# machine without a GPU, with a CUDA 13.0 toolkit assembled from PyPI wheels (13.0 matches the
# device driver 580; newer nvcc emits PTX that driver may refuse). Output: target/cuda-dist/
# (gpo, gpod and the shared llama/ggml libraries; cuBLAS comes from the device's own install).
#
# Status: written for the device tool; no device was lent to the session that wrote it, so it
# has not been run end to end — see the README's GPU section.
set -euo pipefail
cd "$(dirname "$0")/.."
TK=${CUDA_TOOLKIT_DIR:-$HOME/.cache/gpo/cuda-13.0}
if [ ! -x "$TK/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$TK.wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 'nvidia-cublas==13.0.*'
  ln -sfn "$TK.wheels/nvidia/cu13" "$TK"
fi
export CUDA_PATH="$TK" CUDAToolkit_ROOT="$TK" PATH="$TK/bin:$PATH"
export CUDAARCHS=90 CUDA_COMPUTE_CAP=90             # llama.cpp (CMake) and candle kernels
export LIBRARY_PATH="$TK/lib:$TK/lib/stubs:${LIBRARY_PATH:-}"
# Shared llama/ggml libraries link cuBLAS dynamically; a static cuBLAS makes the binaries far
# larger than the 64 MiB the device tool carries.
export LLAMA_BUILD_SHARED_LIBS=1
cargo build --release --locked --features cuda --target-dir target/cuda --bin gpo --bin gpod
rm -rf target/cuda-dist && mkdir -p target/cuda-dist
cp target/cuda/release/gpo target/cuda/release/gpod target/cuda-dist/
find target/cuda/release/build -path '*llama-cpp-sys-2*' -name 'lib*.so*' -exec cp -P {} target/cuda-dist/ \;
ls -la target/cuda-dist
