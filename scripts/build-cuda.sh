#!/usr/bin/env bash
# Builds the CUDA variant of gpo (llama.cpp's CUDA backend + candle CUDA) for Hopper (sm_90) on a
# machine without a GPU, with a CUDA 13.0 toolkit assembled from PyPI wheels (13.0 matches the
# device driver 580; newer nvcc emits PTX that driver may refuse; nvvm is pinned too, or pip pulls
# the newest cicc, whose PTX 13.0's ptxas rejects). Output: target/cuda-dist/
# (gpo, gpod and the shared llama/ggml libraries, stripped) and target/cuda-dist.tar.xz (gpo and
# the libraries, what the device tool carries); cuBLAS, cudart, cuRAND and the driver come from
# the device's own install (its PyTorch cu130 wheels).
#
# Status: runs to the end on this project's 2-core CPU machine (a clean clone: 44 min, most of it
# nvcc); no device was lent yet, so what it builds has not run on a GPU — see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
TK=${CUDA_TOOLKIT_DIR:-$HOME/.cache/gpo/cuda-13.0}
if [ ! -x "$TK/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$TK.wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 'nvidia-cublas==13.0.*'
  ln -sfn "$TK.wheels/nvidia/cu13" "$TK"
fi
# The wheels ship versioned libraries only; linkers and CMake look for the unversioned names.
for lib in "$TK"/lib/lib*.so.*; do
  base=${lib%%.so.*}.so
  [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done
# No wheel ships the driver (libcuda), which only a GPU machine has: link against a stub that
# defines every driver entry point (names from cuda.h, versioned _v2/_v3 targets of its
# #defines, and cudarc's bindings) under the driver's soname, so the real one loads at run time.
if [ ! -e "$TK/lib/stubs/libcuda.so" ]; then
  mkdir -p "$TK/lib/stubs"
  cargo fetch --locked --quiet   # cudarc's sources, for its list of driver entry points
  cudarc=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1 || true)
  {
    grep -oE 'CUDAAPI cu[A-Za-z0-9_]+' "$TK/include/cuda.h" | awk '{print $2}'
    grep -oE '^#define cu[A-Za-z0-9_]+ +cu[A-Za-z0-9_]+' "$TK/include/cuda.h" | awk '{print $3}'
    [ -z "$cudarc" ] || grep -ohE '^ +fn cu[A-Za-z0-9_]+\(' "$cudarc"/src/driver/sys/*.rs | tr -d ' (' | sed 's/^fn//'
  } | sort -u | sed 's/.*/void &(void) {}/' > "$TK/lib/stubs/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$TK/lib/stubs/cuda_stub.c"
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
# Debug info is most of the size (measured: 480 MB with it, 181 MB without). The device tool
# carries 64 MiB, so gpo and the shared libraries also go into one xz tarball (measured 45 MiB)
# that scripts/device-bench.sh unpacks there; gpod stays out of it (the benchmarks need gpo only).
strip --strip-unneeded target/cuda-dist/gpo target/cuda-dist/gpod target/cuda-dist/lib*.so.*.*
libs=$(cd target/cuda-dist && ls lib*.so*)
# shellcheck disable=SC2086  # one word per library
tar -C target/cuda-dist -cf - gpo $libs | xz -T2 -6 > target/cuda-dist.tar.xz
ls -la target/cuda-dist
du -sh target/cuda-dist target/cuda-dist.tar.xz
