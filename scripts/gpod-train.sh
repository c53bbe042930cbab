#!/usr/bin/env bash
# Drives a GPO run through gpod from the shell (socat): queues the run configuration, then streams
# the job's progress events until it ends. The run writes to the daemon's runs root (gpod
# --runs-dir), in a directory named after the last component of the configuration's `output`;
# model and task files, if named, are looked up in the daemon's models root.
#   scripts/gpod-train.sh configs/quick.toml [/tmp/gpo.sock]
set -euo pipefail
config=${1:?usage: scripts/gpod-train.sh run.toml [socket]}
sock=${2:-/tmp/gpo.sock}
request=$(python3 - "$config" <<'PY'
import json, os, sys, tomllib
text = open(sys.argv[1]).read()
name = os.path.basename(os.path.normpath(tomllib.loads(text)["output"]))
print(json.dumps({"v": 1, "id": 1, "op": "train", "config": text, "output": name}))
PY
)
reply=$(printf '%s\n' "$request" | socat -t 30 - "UNIX-CONNECT:$sock")
job=$(printf '%s' "$reply" | python3 -c '
import json, sys
r = json.load(sys.stdin)
if not r.get("ok"):
    sys.exit("gpod: " + r["error"]["message"])
print(r["result"]["id"])')
echo "job $job queued" >&2
# One JSON line per event ({"event": "progress", "data": {...}}), then the final job state.
printf '{"v":1,"id":2,"op":"subscribe","job":%s}\n' "$job" | socat -t 86400 - "UNIX-CONNECT:$sock"
