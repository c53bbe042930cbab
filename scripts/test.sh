#!/usr/bin/env bash
# The test suite: set up (idempotent), then formatting, lints and every test on the real model.
# Every stage runs even when an earlier one failed (so one failure never hides the rest); the
# script ends with a line per stage and its time, and exits non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

summary=()
failed=0
stage() { # name, command...
  local name=$1 start rc
  shift
  echo "=== $name: $*" >&2
  start=$(date +%s)
  "$@"
  rc=$?
  local took=$(( $(date +%s) - start ))
  if [ "$rc" -eq 0 ]; then
    summary+=("$(printf '%-8s ok     %4d s' "$name" "$took")")
  else
    summary+=("$(printf '%-8s FAILED %4d s (exit %d)' "$name" "$took" "$rc")")
    failed=$((failed + 1))
  fi
  return 0
}

stage setup bash -c 'scripts/setup.sh && scripts/fetch-model.sh gemma3-270m'   # gemma3: trainer parity
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
stage fmt cargo fmt --check
stage clippy cargo clippy --release --locked --all-targets -- -D warnings
stage build cargo build --release --locked            # libgpo.so for the C, C++ and Python tests
# --no-fail-fast: a failing test binary does not stop the ones after it (C ABI, daemon, ...).
stage tests cargo test --release --locked --no-fail-fast
stage python python3 -m pytest -q bindings/python/tests
# What a Python user does: pip install into a fresh virtual environment, then use it from
# elsewhere (the package ships its own libgpo.so; the tests check that it is the one loaded).
stage pip bash -c 'set -e; repo=$PWD; venv=$(mktemp -d)/venv; python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check ./bindings/python pytest
  cd "$(dirname "$venv")"; "$venv/bin/python" -c "import gpo; print(\"gpo\", gpo.version(), gpo.LIB_PATH)"
  GPO_EXPECT_INSTALLED=1 "$venv/bin/python" -m pytest -q "$repo/bindings/python/tests"
  "$venv/bin/python" "$repo/bindings/python/example.py"'
stage fuzz scripts/fuzz.sh 60                          # gpod's parser under libFuzzer + ASan

echo "=== summary" >&2
for line in "${summary[@]}"; do echo "$line"; done
passed=$(( ${#summary[@]} - failed ))
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
