#!/usr/bin/env bash
# Run a command while the local sample mirror serves real photographs on 127.0.0.1.
# The command gets the mirror's address in $CLEAR_MIRROR_BASE_URL, and the mirror stops
# when the command ends.
set -euo pipefail
python=${PYTHON:-python}
port_file=$(mktemp)
"$python" -m tasks.sample_mirror --port 0 --port-file "$port_file" &
mirror_pid=$!
trap 'kill "$mirror_pid" 2>/dev/null || true; rm -f "$port_file"' EXIT
for _ in $(seq 100); do
    [[ -s $port_file ]] && break
    kill -0 "$mirror_pid" 2>/dev/null || { echo "error: the sample mirror did not start" >&2; exit 1; }
    sleep 0.1
done
[[ -s $port_file ]] || { echo "error: the sample mirror did not report its port in 10 s" >&2; exit 1; }
export CLEAR_MIRROR_BASE_URL="http://127.0.0.1:$(cat "$port_file")"
echo "sample mirror serving at $CLEAR_MIRROR_BASE_URL (pid $mirror_pid)" >&2
"$@"
