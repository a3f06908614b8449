#!/bin/bash
# The reading client's own CPU per delivery, main's generator against this
# tree's, interleaved run by run against the same server (this tree's
# `wshub serve`, or bench/servers/uws_relay.js with --protocol raw): fan-out,
# 1000 connections, 32 in flight, with or without 100 rooms. The server on
# core 0, the generator on core 1; touch /work/notes/QUIET-<branch> around it.
#
#   bench/reader_ab.sh [ROUNDS]        # 3 rounds by default, ~2 minutes each
#
# BASE_SRC: main's src tree (default: git archive main src into a temp dir,
# with this tree's built .so files, which the generator does not use).
# WSHUB_NATIVE_IO=epoll is run too for wshub fan-out (the fallback).
# One line per run: server scenario generator read_io deliveries/s, the
# generator's CPU (total, user, sys), waiting for its core, ns per delivery,
# the server's CPU.
set -e
cd "$(dirname "$0")/.."
rounds=${1:-3}
if [ -z "$BASE_SRC" ]; then
  tmp=$(mktemp -d /tmp/wshub-reader-ab.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  git archive main src | tar -x -C "$tmp"
  cp src/wshub/*.so "$tmp/src/wshub/" 2>/dev/null || true
  BASE_SRC=$tmp/src
fi
[ -d bench/servers/node_modules ] || (cd bench/servers && npm ci --no-audit --no-fund >/dev/null)
port=${PORT:-18931}
one() { # server scenario gen io
  if [ "$1" = uws ]; then
    taskset -c 0 node bench/servers/uws_relay.js $port >/dev/null 2>&1 &
    proto=raw
  else
    taskset -c 0 .venv/bin/wshub serve --host 127.0.0.1 --port $port --ip-connect-rate 0 \
      --max-connections-per-ip 0 --message-rate 0 --max-connections 20000 --log-level warning >/dev/null 2>&1 &
    proto=wshub
  fi
  local sp=$! extra="" gp=""
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.2; done
  [ "$2" = rooms ] && extra="--rooms 100"
  [ "$3" = base ] && gp=$BASE_SRC
  env ${4:+WSHUB_NATIVE_IO=$4} PYTHONPATH=$gp taskset -c 1 .venv/bin/python -m wshub.bench fanout \
    --engine native --reader full --content-size 100 -n 1000 --inflight 32 --warmup 2 --duration 6 \
    --protocol $proto --url ws://127.0.0.1:$port/websocket $extra --server-pid $sp --json 2>/dev/null |
    .venv/bin/python -c "
import json, sys
r = json.load(sys.stdin)
print('$1 $2 $3${4:+-$4}', r.get('read_io', '-'), round(r['deliveries_per_s']), 'gen', r['generator_cpu'],
      r['generator_cpu_user'], r['generator_cpu_sys'], 'wait', r.get('generator_cpu_waiting'),
      'ns/del', round(r['generator_cpu_us_per_delivery'] * 1000), 'srv', r['server_cpu'])"
  kill $sp
  wait $sp 2>/dev/null || true
}
for r in $(seq "$rounds"); do
  for cfg in "wshub fanout base" "wshub fanout branch" "wshub fanout branch epoll" "uws fanout base" \
    "uws fanout branch" "wshub rooms base" "wshub rooms branch" "uws rooms base" "uws rooms branch"; do
    set -- $cfg
    echo "$r $(one "$@")"
  done
done
