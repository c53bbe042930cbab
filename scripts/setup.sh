#!/usr/bin/env bash
# Installs what gpo needs to build and run on a fresh Debian/Ubuntu machine: C/C++ toolchain,
# cmake and libclang (llama.cpp and bindgen), Rust (if missing), the Rust dependencies and the
# default model. Idempotent: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in cmake clang libclang-dev pkg-config git python3-pip socat; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
python3 -c "import pytest" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pytest
cargo fetch --locked --quiet
scripts/fetch-model.sh smollm2
