#!/bin/sh
# Idle connections in rooms of 10, wshub and uWebSockets.js side by side
# (issue 17 item 1; docs/memory.md). Each run: a fresh server pinned to core 0,
# the generator (wshub bench idle, Python engine) on core 1, held DURATION s,
# then one message in every room. One JSON line per run in OUT.
#   bench/idle_rooms.sh N RUNS [DURATION] [OUT]
set -eu
N=${1:-10000}
RUNS=${2:-3}
DURATION=${3:-60}
OUT=${4:-bench/results/idle-rooms.jsonl}
ROOMS=$((N / 10))
PY=.venv/bin/python
mkdir -p "$(dirname "$OUT")"
[ -d bench/servers/node_modules/uwebsockets ] || (cd bench/servers && npm ci --no-audit --no-fund)
free_port() { $PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Until the server accepts on $1 (at most 30 s), not a fixed sleep.
wait_listening() {
  $PY -c 'import socket, sys, time
end = time.monotonic() + 30
while time.monotonic() < end:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)' "$1"
}
for run in $(seq 1 "$RUNS"); do
  for server in wshub uws; do
    port=$(free_port)
    if [ "$server" = wshub ]; then
      taskset -c 0 .venv/bin/wshub serve --port $port --log-level error \
        --message-rate 0 --ip-connect-rate 0 --max-connections-per-ip 0 \
        --max-connections 0 --max-rooms 0 & pid=$!
      proto=wshub
    else
      (cd bench/servers && exec taskset -c 0 node uws_relay.js $port) & pid=$!
      proto=raw
    fi
    wait_listening $port || echo "run $run $server: not listening on $port" >&2
    taskset -c 1 $PY -m wshub.bench idle -n "$N" --rooms "$ROOMS" --duration "$DURATION" \
      --protocol $proto --url "ws://127.0.0.1:$port/websocket" --server-pid $pid \
      --connect-timeout 60 --json \
      | $PY -c "import json,sys; r=json.load(sys.stdin); r['server']='$server'; r['run']=$run; print(json.dumps(r))" \
      >> "$OUT" || echo "run $run $server failed" >&2
    kill $pid; wait $pid 2>/dev/null || true
  done
done
