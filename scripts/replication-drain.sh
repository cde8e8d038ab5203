#!/usr/bin/env bash
# Times how long a POP takes to replicate a burst of small files into its local origin:
# starts BIN (`cin-edge serve` on a new data directory, built-in defaults), sends it
# 5,000 x 16 KiB through /api/store with `cin-bench small --target`, then polls
# /metrics until cin_replication_queue_depth is 0.
# Usage: scripts/replication-drain.sh [BIN] [PORT]   (run by hand; needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/cin-edge}
port=${2:-18101}
data=$(mktemp -d)
NO_COLOR=1 "$bin" serve --listen "127.0.0.1:$port" --data-dir "$data" >"$data.log" 2>&1 &
pop=$!
trap 'kill $pop 2>/dev/null || true; wait $pop 2>/dev/null || true; rm -rf "$data" "$data.log"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
target/release/cin-bench small --target "http://127.0.0.1:$port" --target-pid "$pop" \
  --small-paths store --count 5000 | grep -E '^\| small .*uploads/s'
began=$(date +%s.%N)
until curl -s "http://127.0.0.1:$port/metrics" | grep -qx 'cin_replication_queue_depth 0'; do
  sleep 0.1
done
ended=$(date +%s.%N)
echo "$bin: backlog drained $(echo "$ended - $began" | bc) s after the uploads;" \
  "files under origin/: $(find "$data/origin" -type f | wc -l)"
