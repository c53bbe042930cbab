#!/usr/bin/env bash
# The test suite: set up (idempotent), then formatting, lints and every test on the real model.
# Every stage runs even when an earlier one failed (so one failure never hides the rest). Each
# stage's output goes to the terminal and to target/test-logs/<stage>.log; the script ends with a
# digest of what failed (failing tests and their panic messages), then a line per stage with its
# time, and exits non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
logs=target/test-logs
mkdir -p "$logs"

summary=()
failed_stages=()
stage() { # name, command...
  local name=$1 start rc
  shift
  echo "=== $name: $*" >&2
  start=$(date +%s)
  "$@" 2>&1 | tee "$logs/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - start ))
  if [ "$rc" -eq 0 ]; then
    summary+=("$(printf '%-8s ok     %4d s' "$name" "$took")")
  else
    summary+=("$(printf '%-8s FAILED %4d s (exit %d)' "$name" "$took" "$rc")")
    failed_stages+=("$name")
  fi
  return 0
}

# What failed, in a few lines per failure, so that a log's tail says why (CI shows only the tail).
digest() { # stage name
  local log="$logs/$1.log"
  echo "--- $1 failed; from $log:"
  case $1 in
    tests)
      # Failing tests, their captured output and panic messages, and which binaries failed.
      grep -E -A25 '^---- .* stdout ----$' "$log" | head -200
      grep -E '^test .* FAILED$|^error: test failed|^    [a-z_]+(::[a-z_0-9]+)*$' "$log" | head -40 ;;
    fuzz)
      grep -v '# Uses:' "$logs/fuzz.out" | grep -E -B2 -A30 'ERROR|SUMMARY|panicked|artifact' | head -120 ;;
    *)
      grep -v '# Uses:' "$log" | tail -40 ;;
  esac
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
# gpod's parser under libFuzzer + ASan; its long dictionary dump stays in the log file.
stage fuzz bash -c 'echo "fuzz: nightly toolchain + ASan build (minutes the first time), then 60 s of fuzzing; output in target/test-logs/fuzz.out"
  scripts/fuzz.sh 60 > target/test-logs/fuzz.out 2>&1; rc=$?
  grep -v "# Uses:" target/test-logs/fuzz.out | tail -15; exit $rc'

echo "=== summary" >&2
for name in "${failed_stages[@]}"; do digest "$name"; done
for line in "${summary[@]}"; do echo "$line"; done
passed=$(( ${#summary[@]} - ${#failed_stages[@]} ))
echo "stages: $passed passed, ${#failed_stages[@]} failed"
[ "${#failed_stages[@]}" -eq 0 ]
