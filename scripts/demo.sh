#!/usr/bin/env bash
# The demo: set up (idempotent), build, then generate and evaluate on the built-in arithmetic task
# with the default model. Extra arguments go to `gpo demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo run --release --locked --quiet --bin gpo -- demo "$@"
