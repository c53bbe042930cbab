#!/usr/bin/env bash
# The demo: set up (idempotent), build, then generate and evaluate on the built-in arithmetic task
# with the default model. Extra arguments go to `gpo demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
echo "demo: building gpo (the first build compiles llama.cpp and candle: ~15 minutes on 2 cores)" >&2
cargo build --release --locked --bin gpo
target/release/gpo demo "$@"
