#!/bin/sh
# Instructions per frame of the reading client's parse (native.c --reader full:
# feed() over reads of 32 frames, every frame read by the JSON grammar), for
# the three envelopes bench/run.py's fan-out reads: wshub with history on (as
# captured from wshub serve: connectionId, content, timestamp, offset), wshub
# with history off (no offset), and the one uWebSockets.js relays verbatim.
# callgrind over 1,000 and 2,000 reads; the difference over the 32,000 frames
# between them is per frame (the start-up is in both and cancels). Deterministic:
# the figure does not depend on the machine's load. No sockets: this is the
# user-space part of the reader's cost only (its recv and epoll are the kernel's).
#
#   bench/reader_instructions.sh [SRC_TREE]
#
# SRC_TREE: a tree's src/ to measure instead of this one (the base of a change:
# git archive main src | tar -x -C /tmp/base, then /tmp/base/src). ~10 s.
set -e
cd "$(dirname "$0")/.."
tree=$(cd "${1:-src}" && pwd)
tmp=$(mktemp -d /tmp/wshub-reader-cg.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/harness.c" <<C
/* native.c itself, its main renamed: the parse is measured as the engine runs it */
#define main native_main
#include "$tree/wshub/bench/native.c"
#undef main
int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    const char *env = argv[1];
    int reps = atoi(argv[2]), frames = 32;
    size_t plen = strlen(env), fl = 4 + plen;
    uint8_t *s = calloc(1, fl * (size_t)frames + 16); /* as the read buffer: 16 bytes of slack */
    for (int i = 0; i < frames; i++) { /* server frames: text, 16-bit length */
        uint8_t *f = s + (size_t)i * fl;
        f[0] = 0x81, f[1] = 126, f[2] = (uint8_t)(plen >> 8), f[3] = (uint8_t)plen;
        memcpy(f + 4, env, plen);
    }
    cfg.full = 1, cfg.size = 100, cfg.n = 1;
    conn_t c;
    memset(&c, 0, sizeof c);
    c.fd = -1;
    G.c = &c;
    int64_t n = 0;
    for (int r = 0; r < reps; r++)
        n += feed(&c, s, fl * (size_t)frames);
    if (n != (int64_t)reps * frames) {
        fprintf(stderr, "counted %lld of %lld\n", (long long)n, (long long)reps * frames);
        return 1;
    }
    return 0;
}
C
cc -O2 -w -o "$tmp/h" "$tmp/harness.c"
body="~#5254624768301 s1 c0 $(printf 'x%.0s' $(seq 78))"
for kind in wshub wshub-nohistory uws; do
  case $kind in
    wshub) env="{\"type\":\"message\",\"connectionId\":\"ws-1796217695980-q100ey2tr\",\"content\":\"$body\",\"timestamp\":\"2026-12-02T13:21:35.983Z\",\"offset\":1}" ;;
    wshub-nohistory) env="{\"type\":\"message\",\"connectionId\":\"ws-1796217696929-c34grfeuz\",\"content\":\"$body\",\"timestamp\":\"2026-12-02T13:21:36.931Z\"}" ;;
    uws) env="{\"type\":\"message\",\"content\":\"$body\"}" ;;
  esac
  for reps in 1000 2000; do
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$tmp/h" "$env" $reps 2>"$tmp/$reps.err"
    grep -o "Collected : [0-9]*" "$tmp/$reps.err" | awk '{print $3}' > "$tmp/$reps.ir"
  done
  python3 -c "
a=int(open('$tmp/1000.ir').read()); b=int(open('$tmp/2000.ir').read())
print(f'$kind (${#env}-byte envelope): {(b-a)/32000:,.0f} instructions per frame')"
done
