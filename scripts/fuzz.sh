#!/usr/bin/env bash
# Fuzzes gpod's message parser with cargo-fuzz (libFuzzer + AddressSanitizer, nightly toolchain)
# for a bounded time, starting from the valid requests in fuzz/seeds/protocol. A crash leaves its
# input in fuzz/artifacts/protocol and fails the script.
#   scripts/fuzz.sh [seconds]        (default 60; CI runs it after the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
mkdir -p fuzz/corpus/protocol
cargo +nightly fuzz run protocol fuzz/corpus/protocol fuzz/seeds/protocol -- \
  -max_total_time="${1:-60}" -max_len=4096 -print_final_stats=1
