#!/usr/bin/env bash
# The test suite: set up (idempotent), then formatting, lints and every test on the real model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh gemma3-270m   # the trainer's gemma3 parity test
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo fmt --check
cargo clippy --release --locked --all-targets -- -D warnings
cargo build --release --locked            # libgpo.so for the C, C++ and Python tests
cargo test --release --locked
python3 -m pytest -q bindings/python/tests
scripts/fuzz.sh 60                        # gpod's parser under libFuzzer + ASan
