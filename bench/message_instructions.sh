#!/bin/sh
# Instructions per relayed message (in and out of a room of 10), steady on a
# loaded machine: callgrind on bench/message_path.py at 30 and 230 rounds of
# 32 messages, the difference over the 6,400 messages between them (the
# start-up, imports and compiles included, is the same in both and cancels).
# PYTHONHASHSEED=0: with a random seed the start-up's ~2.9G instructions
# moved by several million between runs, +-300 and more per message at 130
# rounds; with it fixed, two runs of one tree differ by ~56k in all.
#
#   bench/message_instructions.sh LABEL [SRC_TREE] [message_path.py options]
#
# SRC_TREE: a tree's src/ to run instead of this one (e.g. the base of a
# change: git archive main src | tar -x -C /tmp/base, then /tmp/base/src).
# Takes ~3 minutes on an idle 2-core machine, much longer under load.
set -e
label=$1; tree=${2:-src}; shift; [ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
for r in 30 230; do
  PYTHONHASHSEED=0 PYTHONPATH=$tree valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    .venv/bin/python bench/message_path.py --rounds $r "$@" >/dev/null 2>/tmp/wshub-cg.$label.$r.err
  grep -o "Collected : [0-9]*" /tmp/wshub-cg.$label.$r.err | awk '{print $3}' > /tmp/wshub-cg.$label.$r.ir
done
python3 -c "
a=int(open('/tmp/wshub-cg.$label.30.ir').read()); b=int(open('/tmp/wshub-cg.$label.230.ir').read())
print(f'$label: {(b-a)/(200*32):,.0f} instructions per message (in and out, room of 10)')"
