/*
 * native.c: the native engine of `wshub bench` (scenarios fanout, rate, chat and sink).
 *
 * Two readers: --reader peek (below) and --reader full, which reads every data
 * message whole and parses its JSON as a client would (see json_envelope and
 * full_message); --rooms N gives fanout one closed loop per room.
 *
 * One thread, one level-triggered epoll set, one 256 KiB read buffer shared by
 * every connection; --reader full reads its open connections with io_uring
 * instead where the kernel has it (see "io_uring" below). Receiving walks frame headers only: of each data frame it
 * looks at the first WIN bytes of the payload for the bench marker "~#" (a cost
 * per frame, not per byte) and skips the rest unread, across reads. A frame split
 * anywhere (inside its header, inside the looked-at window, inside the payload)
 * is carried over in the connection's state. Pings are answered with a masked
 * Pong. Probe connections also parse the send time carried after the marker
 * (CLOCK_MONOTONIC ns, the clock of Python's time.monotonic_ns) of the first and
 * the last counted message of each read.
 *
 * The scenarios mirror src/wshub/bench/runner.py step by step (connect with a
 * concurrency limit and per-connection timeouts, the closed loop of fanout with
 * its watchdog, the scheduled sender of rate, the measured window, the CPU of
 * both sides); the result is one JSON object on stdout with the Python engine's
 * keys (native.py adds the scenario/protocol/url/size header); progress, if any,
 * goes to stderr. libc and Linux epoll only. SHA-1 and base64 are written here
 * for the handshake's Sec-WebSocket-Accept check.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -o wshub-bench-native native.c
 * It is built and run by native.py (`wshub bench ... --engine native`).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define RDBUF (256 * 1024) /* one read */
#define WIN 160            /* payload bytes of a data frame looked at for the marker */
#define MAXT 64            /* --target at most */
#define HS_MAX 65536       /* a longer handshake response fails */
#define NS 1000000000LL

/* ------------------------------------------------------------------ small helpers */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A fatal error: the message on stderr, and as {"error": ...} on stdout (whatever
 * was buffered for stdout is dropped), exit status 2. */
static void die(const char *fmt, ...) {
    char msg[600], out[1400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "wshub-bench-native: %s\n", msg);
    size_t o = 0;
    o += (size_t)snprintf(out, sizeof out, "{\"error\": \"");
    for (const char *p = msg; *p && o < sizeof out - 8; p++) {
        if (*p == '"' || *p == '\\')
            out[o++] = '\\';
        out[o++] = (unsigned char)*p < 0x20 ? ' ' : *p;
    }
    o += (size_t)snprintf(out + o, sizeof out - o, "\"}\n");
    if (write(1, out, o) < 0)
        _exit(3);
    _exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q)
        die("out of memory");
    return q;
}

/* round half away from zero to d decimals (Python's round differs only on exact ties) */
static double rnd(double v, int d) {
    double m = 1;
    while (d-- > 0)
        m *= 10;
    double x = v * m;
    int64_t i = (int64_t)(x >= 0 ? x + 0.5 : x - 0.5);
    return (double)i / m;
}

typedef struct {
    int64_t *v;
    size_t n, cap;
} vec_t;

static void vec_push(vec_t *a, int64_t x) {
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 1024;
        a->v = xrealloc(a->v, a->cap * sizeof *a->v);
    }
    a->v[a->n++] = x;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* runner.pct: linear interpolation between closest ranks */
static double pct(const int64_t *s, size_t n, double p) {
    double k = (double)(n - 1) * p / 100.0;
    size_t f = (size_t)k;
    size_t c = f + 1 < n ? f + 1 : n - 1;
    return (double)s[f] + (double)(s[c] - s[f]) * (k - (double)f);
}

static uint64_t rng_state;

static uint32_t rng32(void) {
    uint64_t x = rng_state; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return (uint32_t)((x * 0x2545F4914F6CDD1DULL) >> 32);
}

static void random_bytes(void *p, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = getrandom((char *)p + got, n - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("getrandom: %s", strerror(errno));
        }
        got += (size_t)r;
    }
}

/* ------------------------------------------------------------------ SHA-1, base64 */

static uint32_t rol32(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = rol32(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol32(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1(const uint8_t *msg, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t full = len / 64 * 64;
    for (size_t i = 0; i < full; i += 64)
        sha1_block(h, msg + i);
    uint8_t tail[128];
    size_t r = len - full;
    memcpy(tail, msg + full, r);
    tail[r++] = 0x80;
    size_t tl = r + 8 <= 64 ? 64 : 128;
    memset(tail + r, 0, tl - r);
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        tail[tl - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t i = 0; i < tl; i += 64)
        sha1_block(h, tail + i);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8);
        out[4 * i + 3] = (uint8_t)h[i];
    }
}

static void base64(const uint8_t *in, size_t n, char *out) {
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = A[(v >> 18) & 63];
        out[o++] = A[(v >> 12) & 63];
        out[o++] = i + 1 < n ? A[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? A[v & 63] : '=';
    }
    out[o] = 0;
}

/* Sec-WebSocket-Accept for a key: base64(SHA-1(key + GUID)), 28 chars */
static void accept_for(const char *key, char out[29]) {
    char buf[128];
    int n = snprintf(buf, sizeof buf, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    uint8_t d[20];
    sha1((const uint8_t *)buf, (size_t)n, d);
    base64(d, 20, out);
}

/* ------------------------------------------------------------------ configuration */

typedef struct {
    char host[256];
    int port;
    char path[2048];
    char url[2400];
    struct sockaddr_in addr;
} target_t;

enum { SC_FANOUT, SC_RATE, SC_SINK, SC_CHAT };
#define MSG_MAX (64u << 20) /* --reader full: a longer message is dropped, counted as invalid */
#define MSG_SLACK 16        /* readable (zeroed) bytes past every buffer a message is parsed in: plain_run */

static struct {
    int scenario;
    int raw; /* --protocol raw */
    target_t t[MAXT];
    int nt;
    int sender_alone;
    int n;
    int inflight;
    double rate;
    int size;
    double duration, warmup;
    int source_ips;
    int concurrency;
    double connect_timeout;
    double open_deadline;
    int probes;
    int server_pid;
    double keepalive;
    int nap_us;
    int progress;
    size_t read_size; /* tests: read at most this many bytes at a time */
    int full;         /* --reader full: every data message read whole and parsed as JSON */
    int rooms;        /* --rooms N: connection i in room r<i % N>, path PATH/r<i % N> (0: none) */
} cfg = {
    .scenario = SC_FANOUT,
    .n = 1000,
    .inflight = 32,
    .rate = 50,
    .size = 100,
    .duration = 10,
    .warmup = 2,
    .concurrency = 64,
    .connect_timeout = 15,
    .probes = 32,
    .keepalive = 20,
    .read_size = RDBUF,
};

static int target_of(int i) {
    int n = cfg.nt;
    if (n == 1)
        return 0;
    if (cfg.sender_alone)
        return i == 0 ? 0 : 1 + (i - 1) % (n - 1);
    return i % n;
}

/* ------------------------------------------------------------------ connections */

enum { C_NONE, C_CONNECTING, C_HANDSHAKE, C_OPEN, C_DONE };

typedef struct {
    int fd;
    int idx, target;
    uint8_t state;
    uint8_t probe;
    uint8_t excluded;  /* fanout: never the slowest (the sender, failed or closed) */
    uint8_t recipient; /* fanout: counted in the window */
    uint8_t marked;    /* the fragmented message in progress carries the marker */
    uint8_t capturing; /* collecting the looked-at start of a payload */
    uint8_t op, fin, masked;
    uint8_t hdr_have;
    uint8_t want_out; /* EPOLLOUT wanted */
    uint8_t ep_on;    /* in the epoll set */
    uint8_t ring;     /* --reader full on io_uring: read by a multishot recv (see "io_uring") */
    uint8_t hdr[14];
    uint8_t mkey[4];
    uint16_t cap_have, cap_want;
    uint64_t plen;   /* payload length of the frame being captured */
    uint64_t skip;   /* payload bytes still to skip */
    int64_t count;   /* counted messages */
    int64_t frag_ts; /* send time of a fragmented marked message (or -1) */
    int64_t deadline;
    int64_t t_start, t_open;
    char key[25];
    char *hs; /* the handshake response so far */
    uint32_t hs_len;
    char *out; /* bytes the socket did not take yet */
    size_t out_len, out_off, out_cap;
    uint8_t win[WIN];
    /* --reader full: the message being assembled (a frame not whole in one read,
     * or a fragmented message) */
    int room;
    uint8_t in_msg;  /* a fragmented message is in progress */
    uint8_t msg_op;  /* its opcode (1 text, 2 binary) */
    uint8_t cfin;    /* the frame being collected is final */
    uint8_t cmasked; /* ... and masked (a server must not, but it is read anyway) */
    uint8_t *msg;
    size_t msg_len, msg_cap;
    uint64_t collect; /* payload bytes of the current frame still to collect */
    uint64_t cpos;    /* bytes of the current frame collected so far (for the mask) */
    uint8_t dropped;  /* the message is over MSG_MAX: read past, counted invalid */
} conn_t;

/* fanout: one closed loop per room (one room without --rooms) */
typedef struct {
    int sender;
    int *members; /* recipients of the room (connection indexes) */
    int nmembers;
    int64_t sent, offset, min_count, at_min, last_min, last_move;
    int wake;
} room_t;

/* --reader full: what was read over the whole run */
static struct {
    int64_t messages;   /* data messages read whole */
    int64_t counted;    /* of which counted: message/broadcast with the content size sent */
    int64_t other_type; /* valid envelopes of any other type (welcome, user_joined, ...) */
    int64_t wrong_size; /* message/broadcast whose content is not the size sent */
    int64_t misrouted;  /* --rooms: a message from another room's sender */
    int64_t invalid;    /* not a JSON object with a string type, or binary */
    int64_t bytes;      /* payload bytes read */
} RD;

static struct {
    int ep;
    uint8_t *buf;
    conn_t *c;
    int64_t t_begin;
    /* connecting */
    int next;     /* next connection to attempt */
    int *att;     /* attempts in progress */
    int natt;
    int nopen, nfail, skipped;
    char first_failure[512];
    int64_t open_deadline;
    int connecting;
    /* measurement */
    int measuring;
    int closing;
    int64_t closed_early;
    vec_t lat[MAXT];
    size_t hint; /* offset of the marker in the last data frame */
    /* per read, probes */
    int stamping;
    int rd_first;
    int64_t rd_last;
    int64_t rd_now;
    /* fanout */
    int fanout_on;
    int sending;
    int64_t min_count;
    int64_t at_min;
    int wake;
    int sender; /* index of the sending connection */
    int64_t sent, offset, last_min, stalls;
    int64_t last_move;
    /* rate */
    int rate_on;
    int64_t rate_t0, rate_stop, rate_next;
    double interval_ns;
    double late_ns;
    /* keepalive, nap */
    int64_t ka_next;  /* 0: off */
    int64_t nap_next; /* 0: off */
    /* progress */
    int show;
    int shown;
    const char *label;
    /* frame building */
    uint8_t *fbuf;
    size_t fcap;
    /* rooms (fanout) */
    room_t *room;
    int nrooms;
    /* chat/rate: the senders, round-robin */
    int *senders;
    int nsenders;
    /* rate: every delivery's arrival, per message (see "Arrivals" below) */
    int arrivals;
    /* WSHUB_NATIVE_STATS=1: reads, bytes and passes of the measured window on stderr */
    int64_t st_reads, st_bytes, st_waits, st_events, st_rearms;
} G;

static void progress(const char *fmt, ...) {
    if (!G.show)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\r\x1b[2K[%s] %s", G.label, line);
    fflush(stderr);
    G.shown = 1;
}

static void progress_done(void) {
    if (G.shown) {
        fputc('\n', stderr);
        fflush(stderr);
        G.shown = 0;
    }
}

/* c's place in the epoll set after a change of state: EPOLLIN unless io_uring
 * reads it, EPOLLOUT while it has bytes to write; out of the set with neither. */
static void ep_update(conn_t *c) {
    uint32_t events = (c->ring ? 0 : EPOLLIN) | (c->want_out ? EPOLLOUT : 0);
    int op = !events ? EPOLL_CTL_DEL : c->ep_on ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (!events && !c->ep_on)
        return;
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)c->idx};
    if (epoll_ctl(G.ep, op, c->fd, &ev) < 0 && op != EPOLL_CTL_DEL)
        die("epoll_ctl: %s", strerror(errno));
    c->ep_on = events != 0;
}

static void ring_forget(conn_t *c);

static void close_fd(conn_t *c) {
    if (c->fd >= 0) {
        if (c->ring)
            ring_forget(c); /* its recv holds the socket open until cancelled */
        close(c->fd); /* leaves the epoll set with it */
        c->fd = -1;
    }
    c->ring = 0;
    c->ep_on = 0;
    free(c->hs);
    c->hs = NULL;
    free(c->out);
    c->out = NULL;
    free(c->msg);
    c->msg = NULL;
    c->msg_len = c->msg_cap = 0;
    c->out_len = c->out_off = c->out_cap = 0;
    c->want_out = 0;
}

/* Write now what the socket takes, keep the rest for EPOLLOUT. */
static void conn_write(conn_t *c, const void *data, size_t n) {
    if (c->fd < 0 || n == 0)
        return;
    const uint8_t *p = data;
    if (c->out_len == c->out_off) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return; /* the read side sees the end */
            w = 0;
        }
        if ((size_t)w == n)
            return;
        p += w;
        n -= (size_t)w;
        c->out_len = c->out_off = 0;
    }
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2;
        c->out = xrealloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
    if (!c->want_out && c->state != C_CONNECTING) {
        c->want_out = 1;
        ep_update(c);
    }
}

static void flush_out(conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            c->out_off = c->out_len; /* broken: drop it, the read side sees the end */
            break;
        }
        c->out_off += (size_t)w;
    }
    c->out_len = c->out_off = 0;
    if (c->want_out) {
        c->want_out = 0;
        ep_update(c);
    }
}

/* ------------------------------------------------------------------ frames out */

static void mask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t key[4]) {
    for (size_t i = 0; i < n; i++)
        dst[i] = src[i] ^ key[i & 3];
}

/* a masked client frame; returns its length (dst holds 14 + n bytes) */
static size_t client_frame(uint8_t *dst, int opcode, const uint8_t *payload, size_t n) {
    size_t h = 0;
    dst[h++] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        dst[h++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        dst[h++] = 0x80 | 126;
        dst[h++] = (uint8_t)(n >> 8);
        dst[h++] = (uint8_t)n;
    } else {
        dst[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            dst[h++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    uint32_t k = rng32();
    uint8_t key[4] = {(uint8_t)k, (uint8_t)(k >> 8), (uint8_t)(k >> 16), (uint8_t)(k >> 24)};
    memcpy(dst + h, key, 4);
    h += 4;
    mask_copy(dst + h, payload, n, key);
    return h + n;
}

static uint8_t *payload_buf;
static size_t payload_cap;

/* The bench message of runner.Encoder: "~#<ns> s<seq> c<sender> " padded with x,
 * in the wshub envelope or raw; appended to G.fbuf at *len. */
static void message_frame(size_t *len, int sender, int64_t seq) {
    char head[96];
    int hn = snprintf(head, sizeof head, "~#%lld s%lld c%d ", (long long)now_ns(), (long long)seq, sender);
    size_t cn = (size_t)cfg.size > (size_t)hn ? (size_t)cfg.size : (size_t)hn;
    size_t need = cn + 64;
    if (need > payload_cap) {
        payload_cap = need;
        payload_buf = xrealloc(payload_buf, payload_cap);
    }
    size_t p = 0;
    static const char pre[] = "{\"type\":\"message\",\"content\":\"";
    /* --reader full sends the envelope to a raw relay too: it relays it verbatim,
     * and the reader counts what carries type message, from every server alike */
    int envelope = !cfg.raw || cfg.full;
    if (envelope) {
        memcpy(payload_buf, pre, sizeof pre - 1);
        p = sizeof pre - 1;
    }
    memcpy(payload_buf + p, head, (size_t)hn);
    memset(payload_buf + p + hn, 'x', cn - (size_t)hn);
    p += cn;
    if (envelope) {
        payload_buf[p++] = '"';
        payload_buf[p++] = '}';
    }
    if (*len + p + 14 > G.fcap) {
        G.fcap = (*len + p + 14) * 2;
        G.fbuf = xrealloc(G.fbuf, G.fcap);
    }
    *len += client_frame(G.fbuf + *len, 1, payload_buf, p);
}

static void send_control(conn_t *c, int opcode, const uint8_t *payload, size_t n) {
    uint8_t f[14 + 125];
    if (n > 125)
        n = 125;
    conn_write(c, f, client_frame(f, opcode, payload, n));
}

/* ------------------------------------------------------------------ frames in */

static void fanout_counted(conn_t *c, int64_t k);

/* the marker in the first len bytes of a payload: its offset, or -1 */
static long find_marker(const uint8_t *p, size_t len) {
    size_t h = G.hint;
    if (h + 1 < len && p[h] == '~' && p[h + 1] == '#')
        return (long)h;
    if (len < 2)
        return -1;
    const uint8_t *q = p, *e = p + len - 1;
    while (q < e) {
        q = memchr(q, '~', (size_t)(e - q));
        if (!q)
            return -1;
        if (q[1] == '#') {
            G.hint = (size_t)(q - p);
            return (long)(q - p);
        }
        q++;
    }
    return -1;
}

/* the send time after the marker at p[m], or -1 when it is not all there */
static int64_t stamp_at(const uint8_t *p, size_t len, long m) {
    size_t i = (size_t)m + 2;
    int64_t v = 0;
    size_t d0 = i;
    while (i < len && p[i] >= '0' && p[i] <= '9' && i - d0 < 19)
        v = v * 10 + (p[i++] - '0');
    if (i == d0 || i >= len || p[i] != ' ')
        return -1;
    return v;
}

static void stamp(conn_t *c, int64_t ts) {
    if (ts < 0)
        return;
    if (!G.rd_first) {
        G.rd_first = 1;
        vec_push(&G.lat[c->target], G.rd_now - ts);
    } else {
        G.rd_last = ts;
    }
}

/* One frame whose looked-at start (len bytes of payload) is at p; returns 1 when
 * it completes a counted message. */
static int frame_end(conn_t *c, int op, int fin, const uint8_t *p, size_t len) {
    switch (op) {
    case 1:
    case 2: {
        long m = find_marker(p, len);
        if (fin) {
            if (m < 0)
                return 0;
            if (G.stamping)
                stamp(c, stamp_at(p, len, m));
            return 1;
        }
        c->marked = m >= 0;
        c->frag_ts = m >= 0 && G.stamping ? stamp_at(p, len, m) : -1;
        return 0;
    }
    case 0:
        if (fin && c->marked) {
            c->marked = 0;
            if (G.stamping)
                stamp(c, c->frag_ts);
            return 1;
        }
        return 0;
    case 9: /* Ping: Pong with the same payload */
        send_control(c, 0xA, p, len);
        return 0;
    case 8: /* Close: answer it; the end of the stream follows */
        if (!G.closing)
            send_control(c, 0x8, p, len >= 2 ? 2 : 0);
        return 0;
    default:
        return 0;
    }
}

static size_t header_len(uint8_t b1) {
    size_t n = b1 & 0x7F;
    return 2 + (n == 126 ? 2 : n == 127 ? 8 : 0) + (b1 & 0x80 ? 4 : 0);
}

/* ------------------------------------------------------------------ --reader full: JSON */

/* The reading client of --reader full parses every data message as a client's
 * JSON.parse would: the whole object, every byte of every string checked
 * (escapes, control characters, UTF-8), every value skipped by the grammar, and
 * it keeps what a client acts on: the type and the content. */

typedef struct {
    const uint8_t *type;
    size_t type_len;
    const uint8_t *content; /* raw bytes between the quotes */
    size_t content_raw;
    size_t content_len; /* decoded length in UTF-8 bytes */
    int has_type, has_content;
} envelope_t;

static const uint8_t *json_ws(const uint8_t *q, const uint8_t *e) {
    if (q < e && *q > ' ') /* compact JSON: the common case, one compare */
        return q;
    while (q < e && (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r'))
        q++;
    return q;
}

static int hexval(uint8_t ch) {
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    ch |= 0x20;
    return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

static long hex4(const uint8_t *q, const uint8_t *e) {
    if (e - q < 4)
        return -1;
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(q[i]);
        if (h < 0)
            return -1;
        v = v << 4 | h;
    }
    return v;
}

/* The first byte at or after q that is not a plain string byte (printable
 * ASCII but '"' and '\\'), or e. The content of every frame goes through here,
 * and every key: it was the reader's hottest code (30 % of its CPU against
 * wshub, 2026-12-02, perf; 58 % of its instructions). With SSE2 (every x86-64)
 * sixteen bytes at a time, the exact offset from the mask. Every buffer a
 * message is parsed in has MSG_SLACK readable bytes past its end, so a string
 * that ends near the end of the message takes the same 16-byte load; the bytes
 * past e are never looked at: e itself is made the stop. Without SSE2 eight
 * bytes at a time (each test is exact for "some byte of the word is ..."),
 * then byte by byte. */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
static inline const uint8_t *plain_run(const uint8_t *q, const uint8_t *e) {
#ifdef __SSE2__
    const __m128i quote = _mm_set1_epi8('"'), slash = _mm_set1_epi8('\\'), space = _mm_set1_epi8(0x20);
    for (;;) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)q);
        /* compared as signed bytes, 0x80..0xFF are negative: one compare finds
         * both the control bytes (< 0x20) and every byte past ASCII */
        __m128i odd = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, slash)),
                                   _mm_cmplt_epi8(v, space));
        unsigned m = (unsigned)_mm_movemask_epi8(odd);
        if (e - q < 16)
            return q + __builtin_ctz(m | 1u << (e - q));
        if (m)
            return q + __builtin_ctz(m);
        q += 16;
    }
#else
    while (e - q >= 8) {
        uint64_t w, quote, slash;
        memcpy(&w, q, 8);
        quote = w ^ (ONES * '"');
        slash = w ^ (ONES * '\\');
        uint64_t odd = (w | /* >= 0x80 */
                        ((w - ONES * 0x20) & ~w) | /* < 0x20 */
                        ((quote - ONES) & ~quote) | ((slash - ONES) & ~slash)) &
                       HIGHS;
        if (odd)
            break;
        q += 8;
    }
    while (q < e && *q >= 0x20 && *q < 0x80 && *q != '"' && *q != '\\')
        q++;
    return q;
#endif
}

/* json_string past the first byte that is not plain: escapes and UTF-8, from
 * the opening quote again (a string with them is rare: no need to be quick) */
static __attribute__((noinline)) long json_string_escaped(const uint8_t **pq, const uint8_t *e) {
    const uint8_t *q = *pq + 1;
    long n = 0;
    for (;;) {
        const uint8_t *s = q;
        q = plain_run(q, e);
        n += q - s;
        if (q >= e)
            return -1;
        uint8_t ch = *q;
        if (ch == '"') {
            *pq = q + 1;
            return n;
        }
        if (ch < 0x20)
            return -1;
        if (ch == '\\') {
            if (q + 1 >= e)
                return -1;
            uint8_t x = q[1];
            if (x == 'u') {
                long cp = hex4(q + 2, e);
                if (cp < 0)
                    return -1;
                q += 6;
                if (cp >= 0xD800 && cp < 0xDC00 && e - q >= 6 && q[0] == '\\' && q[1] == 'u') {
                    long lo = hex4(q + 2, e);
                    if (lo >= 0xDC00 && lo < 0xE000) {
                        q += 6;
                        n += 4;
                        continue;
                    }
                }
                n += cp < 0x80 ? 1 : cp < 0x800 ? 2 : 3;
                continue;
            }
            if (!strchr("\"\\/bfnrt", x) || !x)
                return -1;
            q += 2;
            n += 1;
            continue;
        }
        /* UTF-8: a well-formed sequence, no overlong form, no surrogate */
        int k = ch >= 0xF0 ? 4 : ch >= 0xE0 ? 3 : ch >= 0xC2 ? 2 : 0;
        if (!k || ch > 0xF4 || e - q < k)
            return -1;
        for (int i = 1; i < k; i++)
            if ((q[i] & 0xC0) != 0x80)
                return -1;
        if ((ch == 0xE0 && q[1] < 0xA0) || (ch == 0xED && q[1] >= 0xA0) || (ch == 0xF0 && q[1] < 0x90) ||
            (ch == 0xF4 && q[1] >= 0x90))
            return -1;
        q += k;
        n += k;
    }
}

/* a string at *pq (on its opening quote); *pq moves past the closing quote.
 * Returns the decoded length in UTF-8 bytes, or -1 when it is not a valid
 * string. The plain string (every key and value wshub and the relays send) is
 * done here inline; anything else is json_string_escaped's. */
static inline long json_string(const uint8_t **pq, const uint8_t *e) {
    const uint8_t *s = *pq + 1, *q = plain_run(s, e);
    if (q < e && *q == '"') {
        *pq = q + 1;
        return q - s;
    }
    return json_string_escaped(pq, e);
}

static const uint8_t *json_value(const uint8_t *q, const uint8_t *e, int depth);

static const uint8_t *json_number(const uint8_t *q, const uint8_t *e) {
    if (q < e && *q == '-')
        q++;
    if (q >= e)
        return NULL;
    if (*q == '0')
        q++;
    else if (*q >= '1' && *q <= '9')
        while (q < e && *q >= '0' && *q <= '9')
            q++;
    else
        return NULL;
    if (q < e && *q == '.') {
        const uint8_t *d = ++q;
        while (q < e && *q >= '0' && *q <= '9')
            q++;
        if (q == d)
            return NULL;
    }
    if (q < e && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < e && (*q == '+' || *q == '-'))
            q++;
        const uint8_t *d = q;
        while (q < e && *q >= '0' && *q <= '9')
            q++;
        if (q == d)
            return NULL;
    }
    return q;
}

/* the members of an object (q just past its '{'); env, when given, gets type and content */
static const uint8_t *json_members(const uint8_t *q, const uint8_t *e, int depth, envelope_t *env) {
    q = json_ws(q, e);
    if (q < e && *q == '}')
        return q + 1;
    for (;;) {
        if (q >= e || *q != '"')
            return NULL;
        const uint8_t *k = q + 1;
        if (json_string(&q, e) < 0)
            return NULL;
        size_t klen = (size_t)(q - k - 1);
        q = json_ws(q, e);
        if (q >= e || *q != ':')
            return NULL;
        q = json_ws(q + 1, e);
        if (env && q < e && *q == '"' && ((klen == 4 && !memcmp(k, "type", 4)) || (klen == 7 && !memcmp(k, "content", 7)))) {
            const uint8_t *v = q + 1;
            long n = json_string(&q, e);
            if (n < 0)
                return NULL;
            if (klen == 4) {
                env->type = v;
                env->type_len = (size_t)(q - v - 1);
                env->has_type = 1;
            } else {
                env->content = v;
                env->content_raw = (size_t)(q - v - 1);
                env->content_len = (size_t)n;
                env->has_content = 1;
            }
        } else {
            if (env && klen == 4 && !memcmp(k, "type", 4))
                env->has_type = 0; /* the last of duplicate keys counts */
            q = json_value(q, e, depth + 1);
            if (!q)
                return NULL;
        }
        q = json_ws(q, e);
        if (q >= e)
            return NULL;
        if (*q == '}')
            return q + 1;
        if (*q != ',')
            return NULL;
        q = json_ws(q + 1, e);
    }
}

static const uint8_t *json_value(const uint8_t *q, const uint8_t *e, int depth) {
    if (q >= e || depth > 64)
        return NULL;
    switch (*q) {
    case '"':
        return json_string(&q, e) < 0 ? NULL : q;
    case '{':
        return json_members(q + 1, e, depth, NULL);
    case '[': {
        q = json_ws(q + 1, e);
        if (q < e && *q == ']')
            return q + 1;
        for (;;) {
            q = json_value(q, e, depth + 1);
            if (!q)
                return NULL;
            q = json_ws(q, e);
            if (q >= e)
                return NULL;
            if (*q == ']')
                return q + 1;
            if (*q != ',')
                return NULL;
            q = json_ws(q + 1, e);
        }
    }
    case 't':
        return e - q >= 4 && !memcmp(q, "true", 4) ? q + 4 : NULL;
    case 'f':
        return e - q >= 5 && !memcmp(q, "false", 5) ? q + 5 : NULL;
    case 'n':
        return e - q >= 4 && !memcmp(q, "null", 4) ? q + 4 : NULL;
    default:
        return json_number(q, e);
    }
}

/* the whole payload as one JSON object: 0, with env filled, or -1 */
static int json_envelope(const uint8_t *p, size_t n, envelope_t *env) {
    const uint8_t *e = p + n, *q = json_ws(p, e);
    memset(env, 0, sizeof *env);
    if (q >= e || *q != '{')
        return -1;
    q = json_members(q + 1, e, 0, env);
    if (!q || json_ws(q, e) != e)
        return -1;
    return 0;
}

static int room_of(int i) { return cfg.rooms > 0 ? i % cfg.rooms : 0; }

/* "~#<ns> s<seq> c<sender> ": the sender's connection index, or -1 */
static long content_sender(const uint8_t *p, size_t len) {
    const uint8_t *e = p + len, *q = memchr(p, ' ', len);
    if (!q || e - q < 3 || q[1] != 's')
        return -1;
    q = memchr(q + 1, ' ', (size_t)(e - q - 1));
    if (!q || e - q < 3 || q[1] != 'c')
        return -1;
    long v = 0;
    const uint8_t *d = q += 2;
    while (q < e && *q >= '0' && *q <= '9' && q - d < 9)
        v = v * 10 + (*q++ - '0');
    return q == d ? -1 : v;
}

static void stamp(conn_t *c, int64_t ts);
static int64_t stamp_at(const uint8_t *p, size_t len, long m);

/* ------------------------------------------------------------------ arrivals
 *
 * The rate scenario with --reader full: when each of a message's deliveries
 * was read, on every connection (not only the probes), so that a latency can
 * be split into what each server does the same way and what it does not: the
 * time from the send stamp to the first delivery read (the sender's frame
 * through the server up to its first send(), plus one read), the spread from
 * the first delivery to the last (the server's pass as the reader sees it),
 * and the place of the probes in that order (a server that always writes the
 * probes last would show a worse p99 for the same pass). The same method for
 * every server: one clock read per read() of any connection while measuring.
 * The scenario's latency_ms_* are then over every delivery (ar_all): the
 * probes are fixed connections, and where a server writes them in its order
 * moved their figures (docs/latency.md). */
typedef struct {
    int64_t stamp, first, last;
    int32_t count;
} arrival_t;

static void jint(const char *k, long long v);
static void jfloat(const char *k, double v, int d);
static void latency_summary(vec_t *v);
static void latency_report(void);
static void jkey(const char *k);
static void jstr_raw(const char *s);
static int jn;

static arrival_t *AR;
static size_t ar_cap;
static vec_t ar_rank; /* per probe delivery: how many deliveries of its message were read before it */
static vec_t ar_all;  /* every delivery's latency, not the probes' only */

/* "~#<ns> s<seq> ...": the sequence number, or -1 */
static int64_t content_seq(const uint8_t *p, size_t len) {
    const uint8_t *e = p + len, *q = memchr(p, ' ', len);
    if (!q || e - q < 3 || q[1] != 's')
        return -1;
    int64_t v = 0;
    const uint8_t *d = q += 2;
    while (q < e && *q >= '0' && *q <= '9' && q - d < 18)
        v = v * 10 + (*q++ - '0');
    return q == d ? -1 : v;
}

static void arrival(conn_t *c, const uint8_t *content, size_t len) {
    if (len < 2 || content[0] != '~' || content[1] != '#')
        return;
    int64_t ts = stamp_at(content, len, 0), seq = content_seq(content, len);
    if (ts < 0 || seq < 0 || seq > (1 << 24))
        return;
    if ((size_t)seq >= ar_cap) {
        size_t cap = ar_cap ? ar_cap : 1024;
        while (cap <= (size_t)seq)
            cap *= 2;
        AR = xrealloc(AR, cap * sizeof *AR);
        memset(AR + ar_cap, 0, (cap - ar_cap) * sizeof *AR);
        ar_cap = cap;
    }
    arrival_t *a = &AR[seq];
    if (!a->count) {
        a->stamp = ts;
        a->first = a->last = G.rd_now;
    }
    if (G.rd_now > a->last)
        a->last = G.rd_now;
    if (c->probe)
        vec_push(&ar_rank, a->count);
    a->count++;
    vec_push(&ar_all, G.rd_now - ts);
}

static void arrivals_summary(const vec_t *v, const char *name) {
    char k[64];
    snprintf(k, sizeof k, "%s_ms_p50", name);
    jfloat(k, v->n ? pct(v->v, v->n, 50) / 1e6 : 0.0, 3);
    snprintf(k, sizeof k, "%s_ms_p99", name);
    jfloat(k, v->n ? pct(v->v, v->n, 99) / 1e6 : 0.0, 3);
    snprintf(k, sizeof k, "%s_ms_max", name);
    jfloat(k, v->n ? (double)v->v[v->n - 1] / 1e6 : 0.0, 3);
}

/* Over the messages whose every delivery was read while measuring (those
 * cut by the window's edges would show a part of their pass). */
static void arrivals_report(int64_t recips) {
    vec_t first = {0}, span = {0}, last = {0};
    int64_t whole = 0;
    for (size_t i = 0; i < ar_cap; i++) {
        arrival_t *a = &AR[i];
        if (a->count < recips)
            continue;
        whole++;
        vec_push(&first, a->first - a->stamp);
        vec_push(&span, a->last - a->first);
        vec_push(&last, a->last - a->stamp);
    }
    jint("arrival_messages", (long long)whole);
    if (!whole)
        return;
    qsort(first.v, first.n, sizeof *first.v, cmp_i64);
    qsort(span.v, span.n, sizeof *span.v, cmp_i64);
    qsort(last.v, last.n, sizeof *last.v, cmp_i64);
    arrivals_summary(&first, "arrival_first");
    arrivals_summary(&span, "arrival_span");
    arrivals_summary(&last, "arrival_last");
    double sum = 0;
    for (size_t i = 0; i < ar_rank.n; i++)
        sum += (double)ar_rank.v[i];
    /* 0.5 when the probes sit evenly in the order of the deliveries */
    jfloat("probe_rank_mean", ar_rank.n && recips > 1 ? sum / (double)ar_rank.n / (double)(recips - 1) : 0.0, 3);
    free(first.v);
    free(span.v);
    free(last.v);
}

/* One whole data message (op 1 or 2) read by --reader full: 1 when it counts. */
static int full_message(conn_t *c, int op, const uint8_t *p, size_t n) {
    RD.messages++;
    RD.bytes += (int64_t)n;
    envelope_t env;
    if (op != 1 || json_envelope(p, n, &env) < 0 || !env.has_type) {
        RD.invalid++;
        return 0;
    }
    int relay = (env.type_len == 7 && !memcmp(env.type, "message", 7)) ||
                (env.type_len == 9 && !memcmp(env.type, "broadcast", 9));
    if (!relay) {
        RD.other_type++;
        return 0;
    }
    if (!env.has_content || env.content_len != (size_t)cfg.size) {
        RD.wrong_size++;
        return 0;
    }
    if (cfg.rooms > 0) {
        long s = content_sender(env.content, env.content_raw);
        if (s < 0 || s >= cfg.n || room_of((int)s) != c->room) {
            RD.misrouted++;
            return 0;
        }
    }
    RD.counted++;
    if (G.stamping && env.content_raw >= 2 && env.content[0] == '~' && env.content[1] == '#')
        stamp(c, stamp_at(env.content, env.content_raw, 0));
    if (G.arrivals && G.measuring)
        arrival(c, env.content, env.content_raw);
    return 1;
}

/* Walk the frames of one read; returns the messages counted. */
/* --reader full: the frame collected into c->msg is complete */
static int collected(conn_t *c) {
    if (!c->cfin)
        return 0;
    c->in_msg = 0;
    size_t n = c->msg_len;
    c->msg_len = 0;
    if (c->dropped) {
        RD.messages++;
        RD.invalid++;
        c->dropped = 0;
        return 0;
    }
    return full_message(c, c->msg_op, c->msg, n);
}

static int64_t feed(conn_t *c, const uint8_t *p, size_t n) {
    const uint8_t *end = p + n;
    int64_t counted = 0;
    while (p < end) {
        size_t avail = (size_t)(end - p);
        if (c->collect) {
            size_t k = c->collect < avail ? (size_t)c->collect : avail;
            if (!c->dropped) {
                uint8_t *d = c->msg + c->msg_len;
                if (c->cmasked)
                    for (size_t i = 0; i < k; i++)
                        d[i] = p[i] ^ c->mkey[(c->cpos + i) & 3];
                else
                    memcpy(d, p, k);
                c->msg_len += k;
            }
            c->cpos += k;
            c->collect -= k;
            p += k;
            if (c->collect)
                return counted;
            counted += collected(c);
            continue;
        }
        if (c->skip) {
            if (c->skip >= avail) {
                c->skip -= avail;
                return counted;
            }
            p += c->skip;
            c->skip = 0;
            continue;
        }
        if (c->capturing) {
            size_t k = (size_t)(c->cap_want - c->cap_have);
            if (k > avail)
                k = avail;
            memcpy(c->win + c->cap_have, p, k);
            c->cap_have = (uint16_t)(c->cap_have + k);
            p += k;
            if (c->cap_have < c->cap_want)
                return counted;
            c->capturing = 0;
            if (c->masked)
                mask_copy(c->win, c->win, c->cap_want, c->mkey);
            counted += frame_end(c, c->op, c->fin, c->win, c->cap_want);
            c->skip = c->plen - c->cap_want;
            continue;
        }
        /* a frame header */
        const uint8_t *h;
        if (c->hdr_have) {
            while (c->hdr_have < 2 && p < end)
                c->hdr[c->hdr_have++] = *p++;
            if (c->hdr_have < 2)
                return counted;
            size_t hl = header_len(c->hdr[1]);
            size_t k = hl - c->hdr_have;
            if (k > (size_t)(end - p))
                k = (size_t)(end - p);
            memcpy(c->hdr + c->hdr_have, p, k);
            c->hdr_have = (uint8_t)(c->hdr_have + k);
            p += k;
            if (c->hdr_have < hl)
                return counted;
            h = c->hdr;
            c->hdr_have = 0;
        } else {
            if (avail < 2 || avail < header_len(p[1])) {
                memcpy(c->hdr, p, avail);
                c->hdr_have = (uint8_t)avail;
                return counted;
            }
            h = p;
            p += header_len(p[1]);
        }
        int fin = h[0] >> 7, op = h[0] & 0x0F, masked = h[1] >> 7;
        uint64_t plen = h[1] & 0x7F;
        size_t o = 2;
        if (plen == 126) {
            plen = (uint64_t)h[2] << 8 | h[3];
            o = 4;
        } else if (plen == 127) {
            plen = 0;
            for (int i = 0; i < 8; i++)
                plen = plen << 8 | h[2 + i];
            o = 10;
        }
        avail = (size_t)(end - p);
        if (cfg.full && op <= 2) {
            if (op == 0 ? !c->in_msg : c->in_msg) {
                /* a continuation out of place, or a new message inside one: not a
                 * message a client could read; what was assembled is dropped */
                RD.invalid++;
                c->in_msg = 0;
                c->msg_len = 0;
                c->dropped = 0;
            } else if (fin && op != 0 && !masked && avail >= plen) {
                counted += full_message(c, op, p, (size_t)plen); /* whole in this read */
                p += plen;
                continue;
            } else {
                if (op != 0) {
                    c->in_msg = 1;
                    c->msg_op = (uint8_t)op;
                    c->msg_len = 0;
                    c->dropped = 0;
                }
                c->cfin = (uint8_t)fin;
                c->cmasked = (uint8_t)masked;
                if (masked)
                    memcpy(c->mkey, h + o, 4);
                c->cpos = 0;
                if (!c->dropped && c->msg_len + plen > MSG_MAX)
                    c->dropped = 1;
                if (!c->dropped && c->msg_len + plen > c->msg_cap) {
                    c->msg_cap = (size_t)(c->msg_len + plen) * 2;
                    if (c->msg_cap < 4096)
                        c->msg_cap = 4096;
                    c->msg = xrealloc(c->msg, c->msg_cap + MSG_SLACK);
                    memset(c->msg + c->msg_len, 0, c->msg_cap + MSG_SLACK - c->msg_len);
                }
                c->collect = plen;
                if (!plen)
                    counted += collected(c);
                continue;
            }
            if (plen <= avail)
                p += plen;
            else {
                c->skip = plen - avail;
                return counted;
            }
            continue;
        }
        size_t want;
        if (op == 1 || op == 2)
            want = plen < WIN ? (size_t)plen : WIN;
        else if (op == 8 || op == 9)
            want = plen < 125 ? (size_t)plen : 125;
        else
            want = 0;
        avail = (size_t)(end - p);
        if (want == 0) {
            counted += frame_end(c, op, fin, p, 0);
        } else if (!masked && avail >= want) {
            counted += frame_end(c, op, fin, p, want);
        } else {
            c->op = (uint8_t)op;
            c->fin = (uint8_t)fin;
            c->masked = (uint8_t)masked;
            if (masked)
                memcpy(c->mkey, h + o, 4);
            c->plen = plen;
            c->cap_have = 0;
            c->cap_want = (uint16_t)want;
            c->capturing = 1;
            continue;
        }
        if (plen <= avail)
            p += plen;
        else {
            c->skip = plen - avail;
            return counted;
        }
    }
    return counted;
}

/* ------------------------------------------------------------------ connecting */

static void py_error(char *out, size_t n, int err, const char *what) {
    const char *kind = err == ECONNREFUSED ? "ConnectionRefusedError"
                       : err == ECONNRESET ? "ConnectionResetError"
                       : err == ETIMEDOUT  ? "TimeoutError"
                                           : "OSError";
    snprintf(out, n, "%s: [Errno %d] %s%s%s", kind, err, strerror(err), what ? ": " : "", what ? what : "");
}

static void attempt_end(conn_t *c, const char *failure) {
    for (int i = 0; i < G.natt; i++)
        if (G.att[i] == c->idx) {
            G.att[i] = G.att[--G.natt];
            break;
        }
    if (failure) {
        if (!G.nfail++)
            snprintf(G.first_failure, sizeof G.first_failure, "%s", failure);
        close_fd(c);
        c->state = C_DONE;
    } else {
        G.nopen++;
        c->state = C_OPEN;
    }
}

static void conn_connected(conn_t *c) {
    c->t_start = now_ns();
    c->deadline = c->t_start + (int64_t)(cfg.connect_timeout * 1e9);
    c->state = C_HANDSHAKE;
    c->want_out = 0;
    ep_update(c);
    target_t *t = &cfg.t[c->target];
    char path[2100];
    if (cfg.rooms > 0) { /* PATH/r<room>, before any query string */
        size_t base = strcspn(t->path, "?");
        while (base > 0 && t->path[base - 1] == '/')
            base--;
        snprintf(path, sizeof path, "%.*s/r%d%s", (int)base, t->path, c->room, t->path + strcspn(t->path, "?"));
    } else {
        snprintf(path, sizeof path, "%s", t->path);
    }
    char req[4096];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     path, t->host, t->port, c->key);
    conn_write(c, req, (size_t)n);
}

static void start_attempt(int i) {
    conn_t *c = &G.c[i];
    char why[512];
    if (G.open_deadline && now_ns() > G.open_deadline) {
        G.skipped++;
        c->state = C_DONE;
        return;
    }
    uint8_t k[16];
    random_bytes(k, sizeof k);
    base64(k, sizeof k, c->key);
    c->target = target_of(i);
    c->room = room_of(i);
    c->deadline = now_ns() + (int64_t)(cfg.connect_timeout * 1e9);
    G.att[G.natt++] = i;
    c->state = C_CONNECTING;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        py_error(why, sizeof why, errno, "socket");
        attempt_end(c, why);
        return;
    }
    c->fd = fd;
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl((127u << 24) | (uint32_t)(1 + i % cfg.source_ips));
    if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
        py_error(why, sizeof why, errno, "bind");
        attempt_end(c, why);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
    if (epoll_ctl(G.ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    c->ep_on = 1;
    if (connect(fd, (struct sockaddr *)&cfg.t[c->target].addr, sizeof cfg.t[c->target].addr) == 0) {
        conn_connected(c);
    } else if (errno != EINPROGRESS) {
        py_error(why, sizeof why, errno, NULL);
        attempt_end(c, why);
    }
}

static void on_connect_ready(conn_t *c) {
    int err = 0;
    socklen_t l = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
        err = errno;
    if (err) {
        char why[512];
        py_error(why, sizeof why, err, NULL);
        attempt_end(c, why);
        return;
    }
    conn_connected(c);
}

/* Returns the number of bytes of the response up to and with the blank line once
 * it is all there and valid, 0 while incomplete, -1 after failing the attempt. */
static long handshake_data(conn_t *c, const uint8_t *p, size_t n) {
    size_t old = c->hs_len;
    size_t take = n;
    if (old + take > HS_MAX)
        take = HS_MAX - old;
    c->hs = xrealloc(c->hs, old + take + 1);
    memcpy(c->hs + old, p, take);
    c->hs_len = (uint32_t)(old + take);
    c->hs[c->hs_len] = 0;
    char *e = memmem(c->hs + (old > 3 ? old - 3 : 0), c->hs_len - (old > 3 ? old - 3 : 0), "\r\n\r\n", 4);
    if (!e) {
        if (c->hs_len >= HS_MAX) {
            attempt_end(c, "ConnectionError: handshake response too long");
            return -1;
        }
        return 0;
    }
    *e = 0;
    char why[600];
    /* status line */
    char *eol = strstr(c->hs, "\r\n");
    if (eol)
        *eol = 0;
    const char *sp = strchr(c->hs, ' ');
    if (!sp || strncmp(sp + 1, "101", 3) != 0 || (sp[4] != ' ' && sp[4] != 0)) {
        snprintf(why, sizeof why, "ConnectionError: handshake refused: %.200s", c->hs);
        attempt_end(c, why);
        return -1;
    }
    char want[29];
    accept_for(c->key, want);
    int found = 0, good = 0;
    for (char *line = eol ? eol + 2 : NULL; line && *line;) {
        char *next = strstr(line, "\r\n");
        if (next)
            *next = 0;
        char *colon = strchr(line, ':');
        if (colon) {
            char *a = line, *b = colon;
            while (a < b && (*a == ' ' || *a == '\t'))
                a++;
            while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
                b--;
            if ((size_t)(b - a) == 20 && strncasecmp(a, "sec-websocket-accept", 20) == 0) {
                char *v = colon + 1, *ve = v + strlen(v);
                while (*v == ' ' || *v == '\t')
                    v++;
                while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                    ve--;
                found = 1;
                good = (size_t)(ve - v) == 28 && memcmp(v, want, 28) == 0;
                break;
            }
        }
        line = next ? next + 2 : NULL;
    }
    if (!found || !good) {
        attempt_end(c, found ? "ConnectionError: bad Sec-WebSocket-Accept"
                             : "ConnectionError: no Sec-WebSocket-Accept in the 101 response");
        return -1;
    }
    long used = (long)(e - c->hs) + 4 - (long)old; /* bytes of this read in the response */
    free(c->hs);
    c->hs = NULL;
    c->hs_len = 0;
    c->t_open = now_ns();
    attempt_end(c, NULL);
    return used;
}

/* ------------------------------------------------------------------ io_uring
 *
 * --reader full reads its open connections with io_uring when the kernel has
 * what it needs (5.19+: multishot recv, provided-buffer rings, and
 * IORING_SETUP_DEFER_TASKRUN, 6.1): one multishot recv per connection, armed
 * once, takes a buffer from a ring of provided buffers whenever data arrives,
 * and with DEFER_TASKRUN those recvs all run inside the next io_uring_enter, so
 * that one system call reads many sockets where epoll took one epoll_wait per
 * pass and one recv per socket. Each recv is the same tcp_recvmsg a recv()
 * makes (it drains what the socket holds, up to a buffer: the same reads, the
 * same ACKs to the server); the bytes go to got_data as a recv()'s do. The
 * epoll set stays for what is not a read of an open connection (connecting,
 * the handshake, EPOLLOUT); io_uring waits on it with a multishot poll.
 * Without io_uring (setup refused: an older kernel, a seccomp filter,
 * kernel.io_uring_disabled) or with WSHUB_NATIVE_IO=epoll, every read is
 * epoll's (on_readable). No liburing: the raw system calls and the ring
 * layout of <linux/io_uring.h>. */

#define RING_ENTRIES 4096u  /* submission queue (one recv per connection is armed at a time) */
#define RING_BUFS 64u /* provided buffers (a power of 2; a pass rarely reads more sockets, and a
                       * recv that finds none is armed again), few so that they stay in cache */
#define RING_BUF RDBUF      /* ... of as many bytes as a recv() of epoll reads at most */
#define UD_EPOLL (1ULL << 40) /* user_data of the poll on the epoll set */
#define UD_CANCEL (1ULL << 41)

static struct {
    int fd; /* -1: reads are epoll's */
    unsigned *sq_head, *sq_tail, sq_mask, *sq_array;
    struct io_uring_sqe *sqes;
    unsigned *cq_head, *cq_tail, cq_mask;
    struct io_uring_cqe *cqes;
    unsigned queued; /* SQEs written, not submitted yet */
    struct io_uring_buf_ring *br;
    uint8_t *bufs;
    unsigned buf_len; /* bytes a recv may put in one buffer: cfg.read_size at most */
    int epoll_armed;
    /* the last epoll_wait reported something: ask again at once (level-triggered:
     * what was not read is still there, and the poll on the set only fires on a
     * new wakeup) */
    int epoll_again;
} U = {.fd = -1};

static int ring_enter(unsigned submit, unsigned wait, unsigned flags, void *arg, size_t argsz) {
    return (int)syscall(__NR_io_uring_enter, U.fd, submit, wait, flags, arg, argsz);
}

static struct io_uring_sqe *ring_sqe(void) {
    unsigned tail = *U.sq_tail;
    if (tail - __atomic_load_n(U.sq_head, __ATOMIC_ACQUIRE) >= RING_ENTRIES) {
        /* full: submit what is there first */
        if (ring_enter(U.queued, 0, 0, NULL, 0) < 0 && errno != EINTR && errno != EBUSY)
            die("io_uring_enter: %s", strerror(errno));
        U.queued = 0;
    }
    struct io_uring_sqe *sqe = &U.sqes[tail & U.sq_mask];
    memset(sqe, 0, sizeof *sqe);
    U.sq_array[tail & U.sq_mask] = tail & U.sq_mask;
    __atomic_store_n(U.sq_tail, tail + 1, __ATOMIC_RELEASE);
    U.queued++;
    return sqe;
}

static void ring_buf_give(unsigned bid) {
    unsigned short tail = U.br->tail;
    struct io_uring_buf *b = &U.br->bufs[tail & (RING_BUFS - 1)];
    b->addr = (uint64_t)(uintptr_t)(U.bufs + (size_t)bid * (RING_BUF + MSG_SLACK));
    b->len = U.buf_len;
    b->bid = (unsigned short)bid;
    __atomic_store_n(&U.br->tail, (unsigned short)(tail + 1), __ATOMIC_RELEASE);
}

static void ring_arm_recv(conn_t *c) {
    struct io_uring_sqe *sqe = ring_sqe();
    sqe->opcode = IORING_OP_RECV;
    sqe->fd = c->fd;
    sqe->ioprio = IORING_RECV_MULTISHOT;
    sqe->flags = IOSQE_BUFFER_SELECT;
    sqe->buf_group = 0;
    sqe->user_data = (uint64_t)c->idx;
}

static void ring_arm_epoll(void) {
    struct io_uring_sqe *sqe = ring_sqe();
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = G.ep;
    sqe->poll32_events = POLLIN;
    sqe->len = IORING_POLL_ADD_MULTI;
    sqe->user_data = UD_EPOLL;
    U.epoll_armed = 1;
}

/* io_uring for the reads, when the kernel gives it; else U.fd stays -1 */
static void ring_setup(void) {
    const char *io = getenv("WSHUB_NATIVE_IO");
    if (!cfg.full || (io && !strcmp(io, "epoll")))
        return;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE;
    p.cq_entries = 4 * RING_ENTRIES;
    int fd = (int)syscall(__NR_io_uring_setup, RING_ENTRIES, &p);
    if (fd < 0)
        return;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_EXT_ARG) || p.sq_entries != RING_ENTRIES) {
        close(fd);
        return;
    }
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    size_t ring_sz = sq_sz > cq_sz ? sq_sz : cq_sz;
    uint8_t *ring = mmap(NULL, ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    void *sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    size_t br_sz = RING_BUFS * sizeof(struct io_uring_buf);
    void *br = mmap(NULL, br_sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *bufs = calloc(RING_BUFS, RING_BUF + MSG_SLACK);
    if (ring == MAP_FAILED || sqes == MAP_FAILED || br == MAP_FAILED || !bufs) {
        close(fd);
        return; /* the mappings go with the process; there is epoll */
    }
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uint64_t)(uintptr_t)br;
    reg.ring_entries = RING_BUFS;
    reg.bgid = 0;
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0) {
        close(fd);
        free(bufs);
        return;
    }
    U.fd = fd;
    U.sq_head = (unsigned *)(ring + p.sq_off.head);
    U.sq_tail = (unsigned *)(ring + p.sq_off.tail);
    U.sq_mask = *(unsigned *)(ring + p.sq_off.ring_mask);
    U.sq_array = (unsigned *)(ring + p.sq_off.array);
    U.sqes = sqes;
    U.cq_head = (unsigned *)(ring + p.cq_off.head);
    U.cq_tail = (unsigned *)(ring + p.cq_off.tail);
    U.cq_mask = *(unsigned *)(ring + p.cq_off.ring_mask);
    U.cqes = (struct io_uring_cqe *)(ring + p.cq_off.cqes);
    U.br = br;
    U.bufs = bufs;
    U.buf_len = cfg.read_size < RING_BUF ? (unsigned)cfg.read_size : RING_BUF;
    for (unsigned i = 0; i < RING_BUFS; i++)
        ring_buf_give(i);
    ring_arm_epoll();
}

/* c is open: its reads are io_uring's from now on (when it is on) */
static void ring_start(conn_t *c) {
    if (U.fd < 0 || c->fd < 0 || c->state != C_OPEN)
        return;
    c->ring = 1;
    ep_update(c); /* out of the epoll set unless it has bytes to write */
    ring_arm_recv(c);
}

/* c is being closed: its recv is cancelled first (it holds a reference to the
 * socket, which a close() alone would leave open) */
static void ring_forget(conn_t *c) {
    struct io_uring_sqe *sqe = ring_sqe();
    sqe->opcode = IORING_OP_ASYNC_CANCEL;
    sqe->addr = (uint64_t)c->idx;
    sqe->user_data = UD_CANCEL;
    if (ring_enter(U.queued, 0, 0, NULL, 0) >= 0)
        U.queued = 0;
    c->ring = 0;
}

static void epoll_pass(int timeout);
static void got_data(conn_t *c, const uint8_t *p, size_t n);
static void conn_lost(conn_t *c, int err);

/* One pass: submit, wait at most timeout_ms for a completion, handle them all */
static void ring_pass(int timeout) {
    struct __kernel_timespec ts = {.tv_sec = timeout / 1000, .tv_nsec = (long)(timeout % 1000) * 1000000};
    struct io_uring_getevents_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.ts = (uint64_t)(uintptr_t)&ts;
    unsigned head = *U.cq_head;
    unsigned wait = head == __atomic_load_n(U.cq_tail, __ATOMIC_ACQUIRE) && !U.epoll_again ? 1 : 0;
    int r = ring_enter(U.queued, wait, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
    if (r < 0 && errno != ETIME && errno != EINTR && errno != EBUSY)
        die("io_uring_enter: %s", strerror(errno));
    if (r >= 0)
        U.queued -= (unsigned)r < U.queued ? (unsigned)r : U.queued;
    G.st_waits++;
    int epoll_ready = 0;
    for (;;) {
        unsigned tail = __atomic_load_n(U.cq_tail, __ATOMIC_ACQUIRE);
        if (head == tail)
            break;
        while (head != tail) {
            struct io_uring_cqe *cqe = &U.cqes[head & U.cq_mask];
            uint64_t ud = cqe->user_data;
            int res = cqe->res;
            unsigned flags = cqe->flags;
            head++;
            __atomic_store_n(U.cq_head, head, __ATOMIC_RELEASE); /* the CQE is copied: its slot is free */
            G.st_events++;
            if (ud == UD_EPOLL) {
                epoll_ready = 1;
                if (!(flags & IORING_CQE_F_MORE))
                    U.epoll_armed = 0;
                continue;
            }
            if (ud == UD_CANCEL)
                continue;
            conn_t *c = &G.c[ud];
            int live = c->ring && c->fd >= 0;
            if (flags & IORING_CQE_F_BUFFER) {
                unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
                if (live && res > 0)
                    got_data(c, U.bufs + (size_t)bid * (RING_BUF + MSG_SLACK), (size_t)res);
                ring_buf_give(bid);
            }
            if (!live || (res > 0 && (flags & IORING_CQE_F_MORE)))
                continue;
            if (res == 0 || (res < 0 && res != -ENOBUFS && res != -EINTR && res != -EAGAIN && res != -ECANCELED))
                conn_lost(c, res < 0 ? -res : 0);
            else if (!(flags & IORING_CQE_F_MORE) && c->fd >= 0 && c->ring) {
                ring_arm_recv(c); /* ended (buffers ran out, say): armed again */
                G.st_rearms++;
            }
        }
    }
    if (!U.epoll_armed)
        ring_arm_epoll();
    if (epoll_ready || U.epoll_again)
        epoll_pass(0);
}

/* ------------------------------------------------------------------ the loop */

static void conn_lost(conn_t *c, int err) {
    if (c->state == C_CONNECTING || c->state == C_HANDSHAKE) {
        char why[512];
        if (err)
            py_error(why, sizeof why, err, NULL);
        else
            snprintf(why, sizeof why, "ConnectionError: closed during handshake: None");
        attempt_end(c, why);
        return;
    }
    if (c->state == C_OPEN && !G.closing) {
        G.closed_early++;
        if (cfg.scenario == SC_FANOUT && !c->excluded) {
            /* a dead recipient must not hold the window */
            c->excluded = 1;
            if (G.room)
                G.room[c->room].wake = 1;
            G.wake = 1;
        }
    }
    close_fd(c);
    c->state = C_DONE;
}

static void got_data(conn_t *c, const uint8_t *p, size_t n);

/* One read of a socket epoll reported (level-triggered: one read per report) */
static void on_readable(conn_t *c) {
    ssize_t r = recv(c->fd, G.buf, cfg.read_size, MSG_DONTWAIT);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        conn_lost(c, r < 0 ? errno : 0);
        return;
    }
    got_data(c, G.buf, (size_t)r);
}

static void ring_start(conn_t *c);

/* What one read of c brought (the handshake's response first, then frames) */
static void got_data(conn_t *c, const uint8_t *p, size_t n) {
    G.st_reads++;
    G.st_bytes += (int64_t)n;
    if (c->state == C_HANDSHAKE) {
        long used = handshake_data(c, p, n);
        if (used <= 0)
            return;
        p += used;
        n -= (size_t)used;
        ring_start(c); /* open: io_uring reads what follows, when it is on */
        if (!n)
            return;
    }
    if (G.closing)
        return;
    G.stamping = c->probe && G.measuring;
    if (G.stamping) {
        G.rd_first = 0;
        G.rd_last = -1;
    }
    if (G.stamping || (G.arrivals && G.measuring))
        G.rd_now = now_ns();
    int64_t k = feed(c, p, n);
    if (G.stamping && G.rd_last >= 0)
        vec_push(&G.lat[c->target], G.rd_now - G.rd_last);
    if (k)
        fanout_counted(c, k);
}

static void fanout_counted(conn_t *c, int64_t k) {
    int64_t old = c->count;
    c->count = old + k;
    if (!G.room || c->excluded)
        return;
    room_t *r = &G.room[c->room];
    if (old == r->min_count && --r->at_min <= 0) {
        r->wake = 1;
        G.wake = 1;
    }
}

static void release(void);
static void rate_tick(void);

static void keepalive_tick(int64_t now) {
    if (!G.ka_next || now < G.ka_next)
        return;
    G.ka_next = now + (int64_t)(cfg.keepalive * 1e9);
    for (int i = 0; i < cfg.n; i++)
        if (G.c[i].state == C_OPEN && G.c[i].fd >= 0)
            send_control(&G.c[i], 0xA, (const uint8_t *)"bench", 5);
}

static void pump_connects(void) {
    if (!G.connecting)
        return;
    int64_t now = now_ns();
    for (int i = 0; i < G.natt;) {
        conn_t *c = &G.c[G.att[i]];
        if (now > c->deadline) {
            attempt_end(c, "TimeoutError: "); /* removes att[i] */
            continue;
        }
        i++;
    }
    while (G.natt < cfg.concurrency && G.next < cfg.n)
        start_attempt(G.next++);
}

static int timeout_ms(int64_t until) {
    int64_t t = until;
    if (G.rate_on && G.rate_next < t)
        t = G.rate_next;
    if (G.ka_next && G.ka_next < t)
        t = G.ka_next;
    if (G.nap_next && G.nap_next < t)
        t = G.nap_next;
    if (G.connecting)
        for (int i = 0; i < G.natt; i++)
            if (G.c[G.att[i]].deadline + 1000000 < t)
                t = G.c[G.att[i]].deadline + 1000000;
    int64_t d = t - now_ns();
    if (d <= 0)
        return 0;
    return (int)((d + 999999) / 1000000);
}

/* one epoll_wait and what it reported */
static void epoll_pass(int timeout) {
    static struct epoll_event ev[1024];
    int n = epoll_wait(G.ep, ev, 1024, timeout);
    if (n < 0 && errno != EINTR)
        die("epoll_wait: %s", strerror(errno));
    if (U.fd < 0) {
        G.st_waits++;
        G.st_events += n > 0 ? n : 0;
    }
    U.epoll_again = n > 0;
    for (int i = 0; i < n; i++) {
        conn_t *c = &G.c[ev[i].data.u32];
        if (c->fd < 0)
            continue;
        uint32_t e = ev[i].events;
        if (c->state == C_CONNECTING) {
            on_connect_ready(c);
            continue;
        }
        if (e & EPOLLOUT)
            flush_out(c);
        if (c->fd >= 0 && !c->ring && (e & (EPOLLIN | EPOLLHUP | EPOLLERR)))
            on_readable(c);
    }
}

static void loop_once(int64_t until) {
    if (U.fd >= 0)
        ring_pass(timeout_ms(until));
    else
        epoll_pass(timeout_ms(until));
    if (G.wake) {
        G.wake = 0;
        release();
    }
    int64_t now = now_ns();
    if (G.rate_on && now >= G.rate_next)
        rate_tick();
    keepalive_tick(now);
    if (G.nap_next && now >= G.nap_next) {
        struct timespec ts = {0, (long)cfg.nap_us * 1000};
        nanosleep(&ts, NULL);
        G.nap_next = now_ns() + 1000000;
    }
    pump_connects();
}

static void run_until(int64_t t) {
    while (now_ns() < t)
        loop_once(t);
}

/* ------------------------------------------------------------------ measurement */

static int64_t total(void) {
    int64_t s = 0;
    for (int i = 0; i < cfg.n; i++) {
        conn_t *c = &G.c[i];
        if (cfg.scenario == SC_FANOUT ? (c->recipient && !c->excluded) : 1)
            s += c->count;
    }
    return s;
}

static int open_now(void) {
    int k = 0;
    for (int i = 0; i < cfg.n; i++)
        k += G.c[i].state == C_OPEN && G.c[i].fd >= 0;
    return k;
}

static double server_cpu_s(void) {
    if (cfg.server_pid <= 0)
        return -1;
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", cfg.server_pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t r = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (r <= 0)
        return -1;
    buf[r] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    p++;
    /* fields after ")": state(0) ... utime(11) stime(12) */
    unsigned long long ut = 0, st = 0;
    int f = -1;
    char *save = NULL;
    for (char *tok = strtok_r(p, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
        f++;
        if (f == 11)
            ut = strtoull(tok, NULL, 10);
        else if (f == 12) {
            st = strtoull(tok, NULL, 10);
            break;
        }
    }
    if (f < 12)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* The server's CPU time from the scheduler (/proc/PID/task/TID/schedstat, the time
 * on a CPU in ns, every thread): exact, where utime/stime are sampled at the
 * tick and miss a server that runs in bursts shorter than one when the machine
 * is busy. -1: unknown. */
static double server_sched_s(void) {
    if (cfg.server_pid <= 0)
        return -1;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", cfg.server_pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    double total = 0;
    int found = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        char f[128], buf[128];
        snprintf(f, sizeof f, "/proc/%d/task/%.20s/schedstat", cfg.server_pid, e->d_name);
        int fd = open(f, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t r = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (r <= 0)
            continue;
        buf[r] = 0;
        total += strtod(buf, NULL) / 1e9;
        found = 1;
    }
    closedir(d);
    return found ? total : -1;
}

static const char *fmt_rate(double v, char *b, size_t n) {
    if (v >= 1e6)
        snprintf(b, n, "%.2fM", v / 1e6);
    else if (v >= 1e3)
        snprintf(b, n, "%.1fk", v / 1e3);
    else
        snprintf(b, n, "%.0f", v);
    return b;
}

static void watchdog(void);

/* runner.tick_loop: seconds in 1 s steps, the watchdog (fanout) and the progress line */
static void tick_loop(double seconds) {
    int64_t end = now_ns() + (int64_t)(seconds * 1e9);
    int64_t last_n = total(), last_t = now_ns();
    for (;;) {
        int64_t left = end - now_ns();
        if (left <= 0)
            break;
        run_until(now_ns() + (left < NS ? left : NS));
        if (G.fanout_on)
            watchdog();
        if (G.show) {
            int64_t now = now_ns(), n = total();
            double rate = now > last_t ? (double)(n - last_n) * 1e9 / (double)(now - last_t) : 0;
            last_n = n;
            last_t = now;
            char rb[32];
            double l = (double)(end - now) / 1e9;
            progress("%s %5.1fs left  conns=%d  deliveries/s=%s  total=%lld", G.measuring ? "measuring" : "warmup",
                     l > 0 ? l : 0.0, open_now(), fmt_rate(rate, rb, sizeof rb), (long long)n);
        }
    }
}

static struct {
    int64_t t0, n0;
    double cpu0, scpu0;
    double user0, sys0;
    int64_t rd_msgs0, rd_bytes0;
    /* results */
    double t;
    int64_t n;
    double cpu;
    double user, sys; /* of the generator: getrusage, every thread of the process */
    int64_t rd_msgs, rd_bytes;
    double scpu; /* -1: unknown */
    double sched0, sched; /* the same from the scheduler (-1: unknown) */
    double wait0, wait;   /* the generator's time runnable but off its CPU (-1: unknown) */
} W;

/* The generator's own time waiting for a CPU while runnable (the run delay of
 * /proc/self/schedstat, ns; one thread), in s, or -1. Its CPU time alone cannot
 * tell a generator that had its core to spare from one that wanted more than
 * the machine gave it: on a shared machine both can show 0.6 of a core. */
static double self_wait_s(void) {
    char buf[128];
    int fd = open("/proc/self/schedstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t r = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (r <= 0)
        return -1;
    buf[r] = 0;
    char *q;
    strtod(buf, &q); /* time on a CPU */
    if (q == buf)
        return -1;
    char *z;
    double w = strtod(q, &z);
    return z == q ? -1 : w / 1e9;
}

static void rusage_s(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int64_t st0[5];

static void win_start(void) {
    st0[0] = G.st_reads;
    st0[1] = G.st_bytes;
    st0[2] = G.st_waits;
    st0[3] = G.st_events;
    st0[4] = G.st_rearms;
    W.t0 = now_ns();
    W.n0 = total();
    W.cpu0 = cpu_s();
    rusage_s(&W.user0, &W.sys0);
    W.rd_msgs0 = RD.messages;
    W.rd_bytes0 = RD.bytes;
    W.scpu0 = server_cpu_s();
    W.sched0 = server_sched_s();
    W.wait0 = self_wait_s();
    G.measuring = 1;
}

static void win_stop(void) {
    G.measuring = 0;
    W.t = (double)(now_ns() - W.t0) / 1e9;
    W.n = total() - W.n0;
    W.cpu = cpu_s() - W.cpu0;
    rusage_s(&W.user, &W.sys);
    W.user -= W.user0;
    W.sys -= W.sys0;
    W.rd_msgs = RD.messages - W.rd_msgs0;
    W.rd_bytes = RD.bytes - W.rd_bytes0;
    double s1 = server_cpu_s();
    W.scpu = W.scpu0 >= 0 && s1 >= 0 ? s1 - W.scpu0 : -1;
    double q1 = server_sched_s();
    W.sched = W.sched0 >= 0 && q1 >= 0 ? q1 - W.sched0 : -1;
    double w1 = self_wait_s();
    W.wait = W.wait0 >= 0 && w1 >= 0 ? w1 - W.wait0 : -1;
    const char *st = getenv("WSHUB_NATIVE_STATS");
    if (st && *st && *st != '0') {
        double r = (double)(G.st_reads - st0[0]), w = (double)(G.st_waits - st0[2]);
        fprintf(stderr, "[native] window: %.0f reads/s, %.0f bytes/read, %.2f frames/read, %.0f waits/s (epoll_wait or io_uring_enter), "
                "%.1f events/wait, %.3f us CPU/frame, %.2f us CPU/read, %s, %.0f recv re-arms/s\n", r / W.t,
                r ? (double)(G.st_bytes - st0[1]) / r : 0.0, r ? (double)W.n / r : 0.0, w / W.t,
                w ? (double)(G.st_events - st0[3]) / w : 0.0, W.n ? W.cpu / (double)W.n * 1e6 : 0.0,
                r ? W.cpu / r * 1e6 : 0.0, U.fd >= 0 ? "io_uring" : "epoll",
                (double)(G.st_rearms - st0[4]) / W.t);
    }
}

/* ------------------------------------------------------------------ JSON out */

static int jn; /* members written in the current object */

static void obj_begin(void) {
    printf("{");
    jn = 0;
}

static void jkey(const char *k) {
    printf("%s\"%s\": ", jn++ ? ", " : "", k);
}

static void jstr_raw(const char *s) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if (*p < 0x20)
            printf("\\u%04x", *p);
        else
            putchar(*p);
    }
    putchar('"');
}

static void jint(const char *k, long long v) {
    jkey(k);
    printf("%lld", v);
}

static void jfloat(const char *k, double v, int d) {
    jkey(k);
    printf("%.*f", d > 0 ? d : 1, rnd(v, d));
}

static void jnull(const char *k) {
    jkey(k);
    printf("null");
}

static void jbool(const char *k, int v) {
    jkey(k);
    fputs(v ? "true" : "false", stdout);
}

static void latency_summary(vec_t *v) {
    jint("latency_samples", (long long)v->n);
    if (!v->n)
        return;
    qsort(v->v, v->n, sizeof *v->v, cmp_i64);
    jfloat("latency_ms_p50", pct(v->v, v->n, 50) / 1e6, 3);
    jfloat("latency_ms_p90", pct(v->v, v->n, 90) / 1e6, 3);
    jfloat("latency_ms_p99", pct(v->v, v->n, 99) / 1e6, 3);
    jfloat("latency_ms_max", (double)v->v[v->n - 1] / 1e6, 3);
}

static void latency_report(void) {
    vec_t all = {0};
    for (int t = 0; t < cfg.nt; t++)
        for (size_t i = 0; i < G.lat[t].n; i++)
            vec_push(&all, G.lat[t].v[i]);
    latency_summary(&all);
    free(all.v);
    if (cfg.nt > 1) {
        jkey("latency_by_url");
        putchar('{');
        for (int t = 0; t < cfg.nt; t++) {
            if (t)
                printf(", ");
            jstr_raw(cfg.t[t].url);
            printf(": {");
            int save = jn;
            jn = 0;
            latency_summary(&G.lat[t]);
            jn = save;
            putchar('}');
        }
        putchar('}');
    }
}

static void window_report(void) {
    jfloat("measured_s", W.t, 3);
    jint("deliveries", (long long)W.n);
    jfloat("deliveries_per_s", W.t > 0 ? (double)W.n / W.t : 0.0, 1);
    if (W.t > 0) {
        /* the generator's own CPU, as a fraction of one core: near 1.0 means the
         * figure may be the generator's ceiling, not the server's */
        jfloat("generator_cpu", W.cpu / W.t, 3);
        jfloat("generator_cpu_user", W.user / W.t, 3);
        jfloat("generator_cpu_sys", W.sys / W.t, 3);
        if (W.n)
            jfloat("generator_cpu_us_per_delivery", W.cpu / (double)W.n * 1e6, 3);
        /* runnable but not running: cpu + waiting near 1.0 is a generator that
         * was never idle, at its limit whether or not it got the whole core */
        if (W.wait >= 0)
            jfloat("generator_cpu_waiting", W.wait / W.t, 3);
    } else {
        jnull("generator_cpu");
    }
    if (cfg.full && W.t > 0) {
        jfloat("messages_read_per_s", (double)W.rd_msgs / W.t, 1);
        if (W.rd_msgs)
            jfloat("bytes_read_per_message", (double)W.rd_bytes / (double)W.rd_msgs, 1);
    }
    if (W.scpu >= 0) {
        jfloat("server_cpu", W.scpu / W.t, 3);
        if (W.n)
            jfloat("server_cpu_us_per_delivery", W.scpu / (double)W.n * 1e6, 3);
    }
    if (W.sched >= 0 && W.t > 0) {
        jfloat("server_cpu_sched", W.sched / W.t, 3);
        if (W.n)
            jfloat("server_cpu_sched_us_per_delivery", W.sched / (double)W.n * 1e6, 3);
    }
}

/* ------------------------------------------------------------------ scenarios */

static struct {
    double elapsed;
} CI;

static void open_connections(int probe_every) {
    G.t_begin = now_ns();
    for (int i = 0; i < cfg.n; i++)
        G.c[i].probe = probe_every > 0 && i % probe_every == 0;
    G.open_deadline = cfg.open_deadline > 0 ? now_ns() + (int64_t)(cfg.open_deadline * 1e9) : 0;
    G.connecting = 1;
    int64_t t0 = now_ns(), shown_at = t0;
    pump_connects();
    while (G.next < cfg.n || G.natt > 0) {
        loop_once(now_ns() + 250000000);
        if (G.show && now_ns() - shown_at >= NS) {
            shown_at = now_ns();
            progress("connecting  open=%d/%d  failed=%d  %.0fs", G.nopen, cfg.n, G.nfail,
                     (double)(shown_at - t0) / 1e9);
        }
    }
    G.connecting = 0;
    CI.elapsed = (double)(now_ns() - t0) / 1e9;
}

static void conn_info(void) {
    jint("connections_requested", cfg.n);
    jint("connections_open", G.nopen);
    jint("connect_failures", G.nfail);
    jfloat("connect_time_s", CI.elapsed, 3);
    if (CI.elapsed > 0)
        jfloat("connects_per_s", G.nopen / CI.elapsed, 1);
    else
        jnull("connects_per_s");
    vec_t hs = {0};
    for (int i = 0; i < cfg.n; i++)
        if (G.c[i].t_open)
            vec_push(&hs, G.c[i].t_open - G.c[i].t_start);
    if (hs.n) {
        qsort(hs.v, hs.n, sizeof *hs.v, cmp_i64);
        jfloat("handshake_ms_p50", pct(hs.v, hs.n, 50) / 1e6, 2);
        jfloat("handshake_ms_p99", pct(hs.v, hs.n, 99) / 1e6, 2);
    } else {
        jnull("handshake_ms_p50");
        jnull("handshake_ms_p99");
    }
    free(hs.v);
    jint("source_ips", cfg.source_ips);
    if (G.skipped)
        jint("connections_not_attempted", G.skipped);
    if (cfg.nt > 1) {
        jkey("connections_by_url");
        putchar('[');
        for (int t = 0; t < cfg.nt; t++) {
            int k = 0;
            for (int i = 0; i < cfg.n; i++)
                k += G.c[i].t_open && G.c[i].target == t;
            printf(t ? ", %d" : "%d", k);
        }
        putchar(']');
    }
}

static int probe_spacing(int n, int probes) {
    if (probes <= 0)
        return 0;
    return n / probes > 1 ? n / probes : 1;
}

static int first_open(void) {
    for (int i = 0; i < cfg.n; i++)
        if (G.c[i].t_open)
            return i;
    return -1;
}

static void fail_run(const char *why) {
    /* native.py raises this as RuntimeError; it says why the connections failed */
    char msg[900];
    if (G.nfail)
        snprintf(msg, sizeof msg, "%s (%d of %d connections failed, first: %s)", why, G.nfail, cfg.n,
                 G.first_failure);
    else
        snprintf(msg, sizeof msg, "%s", why);
    progress_done();
    obj_begin();
    jkey("error");
    jstr_raw(msg);
    printf("}\n");
    fflush(stdout);
}

/* the slowest recipient of a room (INT64_MAX: none left) */
static int64_t slowest(room_t *r) {
    int64_t m = INT64_MAX, k = 0;
    for (int i = 0; i < r->nmembers; i++) {
        conn_t *c = &G.c[r->members[i]];
        if (c->excluded)
            continue;
        if (c->count < m) {
            m = c->count;
            k = 1;
        } else if (c->count == m) {
            k++;
        }
    }
    r->at_min = k;
    r->min_count = m;
    return m;
}

/* the closed loop of a room: keep --inflight messages ahead of its slowest recipient */
static void release_room(room_t *r) {
    r->wake = 0;
    if (!G.sending || r->sender < 0)
        return;
    int64_t m = slowest(r);
    if (m == INT64_MAX)
        return; /* no recipient left */
    if (m != r->last_min) {
        r->last_min = m;
        r->last_move = now_ns();
    }
    int64_t space = cfg.inflight - (r->sent - r->offset - m);
    if (space > 0) {
        size_t len = 0;
        for (int64_t j = 0; j < space; j++)
            message_frame(&len, r->sender, r->sent + j);
        conn_write(&G.c[r->sender], G.fbuf, len);
        r->sent += space;
    }
}

static void release(void) {
    for (int i = 0; i < G.nrooms; i++)
        if (G.room[i].wake)
            release_room(&G.room[i]);
}

static void watchdog(void) {
    /* a message lost by the server (e.g. a rate limit) would stall the window */
    for (int i = 0; G.sending && i < G.nrooms; i++) {
        room_t *r = &G.room[i];
        if (r->sender >= 0 && now_ns() - r->last_move > 2 * NS) {
            int64_t m = slowest(r);
            G.stalls++;
            r->offset = r->sent - (m == INT64_MAX ? 0 : m);
            r->last_move = now_ns();
            release_room(r);
        }
    }
}

static int64_t sent_total(void) {
    int64_t s = 0;
    for (int i = 0; i < G.nrooms; i++)
        s += G.room[i].sent;
    return s;
}

static void start_keepalive(void) {
    if (cfg.keepalive > 0)
        G.ka_next = now_ns() + (int64_t)(cfg.keepalive * 1e9);
}

static int scenario_fanout(void) {
    open_connections(probe_spacing(cfg.n, cfg.probes));
    if (G.nopen < 2) {
        fail_run("fan-out needs at least 2 open connections");
        return 1;
    }
    /* one closed loop per room: its first open connection sends, the others receive */
    G.nrooms = cfg.rooms > 0 ? cfg.rooms : 1;
    G.room = calloc((size_t)G.nrooms, sizeof *G.room);
    if (!G.room)
        die("out of memory");
    for (int r = 0; r < G.nrooms; r++) {
        G.room[r].sender = -1;
        G.room[r].members = xrealloc(NULL, (size_t)(cfg.n / G.nrooms + 1) * sizeof(int));
        G.room[r].min_count = G.room[r].last_min = -1;
        G.room[r].last_move = now_ns();
    }
    int recipients = 0, senders = 0;
    for (int i = 0; i < cfg.n; i++) {
        conn_t *c = &G.c[i];
        room_t *r = &G.room[c->room];
        if (!c->t_open) {
            c->excluded = 1;
            continue;
        }
        if (r->sender < 0) {
            r->sender = i;
            senders++;
            c->excluded = 1; /* the sender is never the slowest */
            continue;
        }
        c->recipient = 1;
        /* already closed connections are never the slowest */
        c->excluded = c->state != C_OPEN;
        r->members[r->nmembers++] = i;
        recipients++;
    }
    for (int r = 0; r < G.nrooms; r++)
        if (G.room[r].sender >= 0 && !G.room[r].nmembers)
            G.room[r].sender = -1, senders--; /* a room of one: nobody to send to */
    G.sender = first_open();
    run_until(now_ns() + NS / 2); /* let join notifications drain */
    start_keepalive();
    G.fanout_on = 1;
    G.sending = 1;
    if (cfg.nap_us > 0)
        G.nap_next = now_ns() + 1000000;
    for (int r = 0; r < G.nrooms; r++)
        release_room(&G.room[r]);
    tick_loop(cfg.warmup);
    int64_t sent0 = sent_total();
    win_start();
    tick_loop(cfg.duration);
    win_stop();
    int64_t sent_in = sent_total() - sent0;
    G.sending = 0;
    G.fanout_on = 0;
    G.nap_next = 0;
    G.ka_next = 0;
    progress_done();
    obj_begin();
    conn_info();
    jint("inflight", cfg.inflight);
    if (cfg.rooms > 0) {
        jint("rooms", cfg.rooms);
        jint("senders", senders);
    }
    jint("recipients", recipients);
    window_report();
    double ms = rnd(W.t, 3);
    jfloat("messages_sent_per_s", ms > 0 ? (double)sent_in / ms : 0.0, 1);
    jint("stalls", G.stalls);
    latency_report();
    return 0;
}

static int64_t rate_sent;
static int64_t rate_k;

static void rate_tick(void) {
    int64_t now = now_ns();
    if (now >= G.rate_stop) {
        G.rate_on = 0;
        return;
    }
    int64_t due = (int64_t)((double)(now - G.rate_t0) / G.interval_ns) + 1;
    if (due - rate_k > 1) {
        double late = (double)(now - G.rate_t0) - (double)(rate_k + 1) * G.interval_ns;
        if (late > G.late_ns)
            G.late_ns = late;
    }
    /* message k from sender k % nsenders (runner._scheduled_sender); the frames
     * of one sender in a row leave in one write */
    size_t len = 0;
    int from = -1;
    for (; rate_k < due; rate_k++) {
        int s = G.senders[rate_k % G.nsenders];
        if (s != from && len) {
            conn_write(&G.c[from], G.fbuf, len);
            len = 0;
        }
        from = s;
        message_frame(&len, s, rate_k);
    }
    if (len)
        conn_write(&G.c[from], G.fbuf, len);
    rate_sent = rate_k;
    G.rate_next = G.rate_t0 + (int64_t)((double)rate_k * G.interval_ns);
}

/* rate: one sender at --rate; chat: every connection at --rate (runner._rate_like) */
static int scenario_rate(void) {
    int n = cfg.n;
    int chat = cfg.scenario == SC_CHAT;
    open_connections(probe_spacing(n, cfg.probes));
    if (G.nopen < 2) {
        fail_run("needs at least 2 open connections");
        return 1;
    }
    G.sender = first_open();
    G.senders = xrealloc(NULL, (size_t)n * sizeof(int));
    for (int i = 0; i < n; i++)
        if (G.c[i].t_open && (chat || i == G.sender))
            G.senders[G.nsenders++] = i;
    double total_rate = chat ? cfg.rate * n : cfg.rate;
    int64_t recips = G.nopen - 1; /* every message goes to everyone but its sender */
    /* one server (the cross-node run keeps its per-URL probes) */
    G.arrivals = !chat && cfg.full && cfg.nt == 1;
    run_until(now_ns() + NS / 2);
    start_keepalive();
    G.rate_t0 = now_ns();
    G.rate_stop = G.rate_t0 + (int64_t)((cfg.warmup + cfg.duration) * 1e9);
    G.interval_ns = 1e9 / total_rate;
    G.rate_next = G.rate_t0;
    G.rate_on = 1;
    rate_tick();
    tick_loop(cfg.warmup);
    int64_t sent0 = rate_sent;
    win_start();
    tick_loop(cfg.duration);
    win_stop();
    int64_t sent_in = rate_sent - sent0;
    int64_t expected_total = rate_sent * recips;
    int64_t backlog = expected_total - total();
    double offered = total_rate * (double)recips;
    run_until(G.rate_stop); /* the sender's end */
    G.rate_on = 0;
    run_until(now_ns() + NS / 5); /* stragglers: do not tear the server down mid-burst */
    G.ka_next = 0;
    progress_done();
    obj_begin();
    jkey(chat ? "rate_per_connection" : "rate_msgs_per_s");
    if (cfg.rate < 1e15 && cfg.rate == (double)(int64_t)cfg.rate)
        printf("%lld.0", (long long)cfg.rate);
    else
        printf("%.17g", cfg.rate);
    conn_info();
    jint("senders", G.nsenders);
    window_report();
    double ms = rnd(W.t, 3);
    jfloat("messages_sent_per_s", ms > 0 ? (double)sent_in / ms : 0.0, 1);
    jfloat("offered_deliveries_per_s", offered, 1);
    double dps = rnd(W.t > 0 ? (double)W.n / W.t : 0.0, 1);
    double achieved = offered > 0 ? rnd(dps / offered, 3) : -1;
    if (offered > 0)
        jfloat("achieved_ratio", achieved, 3);
    else
        jnull("achieved_ratio");
    jint("backlog_at_end", (long long)backlog);
    double backlog_s = offered > 0 ? rnd((double)backlog / offered, 3) : -1;
    if (offered > 0)
        jfloat("backlog_s", backlog_s, 3);
    else
        jnull("backlog_s");
    jfloat("sender_late_max_ms", G.late_ns / 1e6, 2);
    if (G.arrivals) {
        /* Every delivery's latency, whatever the order in which the server
         * writes its recipients; the probes' alone depend on it (see "Arrivals") */
        jkey("latency_of");
        jstr_raw("every delivery");
        latency_summary(&ar_all);
        jkey("probe_latency");
        putchar('{');
        int save = jn;
        jn = 0;
        latency_report();
        jn = save;
        putchar('}');
        arrivals_report(recips);
    } else {
        jkey("latency_of");
        jstr_raw("probes");
        latency_report();
    }
    jbool("fell_behind", (offered > 0 && achieved < 0.95) || (offered > 0 && backlog_s > 1.0) || G.closed_early);
    return 0;
}

static int scenario_sink(void) {
    open_connections(probe_spacing(cfg.n, cfg.probes));
    tick_loop(cfg.warmup);
    win_start();
    tick_loop(cfg.duration);
    win_stop();
    progress_done();
    obj_begin();
    conn_info();
    window_report();
    latency_report();
    return 0;
}

/* runner.close_all: a Close frame on every open connection, then up to 0.2 s for
 * the servers to close their side (reading and dropping what still comes). */
static void close_all(void) {
    G.closing = 1;
    G.rate_on = 0;
    G.ka_next = 0;
    G.nap_next = 0;
    static const uint8_t bye[2] = {0x03, 0xE8};
    for (int i = 0; i < cfg.n; i++) {
        conn_t *c = &G.c[i];
        if (c->fd >= 0 && c->state == C_OPEN)
            send_control(c, 0x8, bye, 2);
    }
    int64_t end = now_ns() + NS / 5;
    while (now_ns() < end && open_now() > 0)
        loop_once(end);
    for (int i = 0; i < cfg.n; i++)
        close_fd(&G.c[i]);
}

/* ------------------------------------------------------------------ main */

static const char *arg(int argc, char **argv, int *i) {
    if (*i + 1 >= argc)
        die("%s needs a value", argv[*i]);
    return argv[++*i];
}

static void add_target(const char *host, const char *port, const char *path, const char *url) {
    if (cfg.nt >= MAXT)
        die("at most %d targets", MAXT);
    target_t *t = &cfg.t[cfg.nt++];
    snprintf(t->host, sizeof t->host, "%s", host);
    t->port = atoi(port);
    snprintf(t->path, sizeof t->path, "%s", path);
    snprintf(t->url, sizeof t->url, "%s", url);
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int e = getaddrinfo(host, port, &hints, &res);
    if (e || !res)
        die("cannot resolve %s: %s", host, gai_strerror(e));
    memcpy(&t->addr, res->ai_addr, sizeof t->addr);
    freeaddrinfo(res);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--accept")) { /* tests: print Sec-WebSocket-Accept for a key */
            char out[29];
            accept_for(arg(argc, argv, &i), out);
            printf("%s\n", out);
            return 0;
        } else if (!strcmp(a, "--scenario")) {
            const char *s = arg(argc, argv, &i);
            if (!strcmp(s, "fanout"))
                cfg.scenario = SC_FANOUT;
            else if (!strcmp(s, "rate"))
                cfg.scenario = SC_RATE;
            else if (!strcmp(s, "sink"))
                cfg.scenario = SC_SINK;
            else if (!strcmp(s, "chat"))
                cfg.scenario = SC_CHAT;
            else
                die("unknown scenario %s (fanout, rate, chat or sink)", s);
        } else if (!strcmp(a, "--protocol")) {
            cfg.raw = !strcmp(arg(argc, argv, &i), "raw");
        } else if (!strcmp(a, "--target")) {
            if (i + 4 >= argc)
                die("--target HOST PORT PATH URL");
            add_target(argv[i + 1], argv[i + 2], argv[i + 3], argv[i + 4]);
            i += 4;
        } else if (!strcmp(a, "--placement")) {
            cfg.sender_alone = !strcmp(arg(argc, argv, &i), "sender-alone");
        } else if (!strcmp(a, "-n")) {
            cfg.n = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--inflight")) {
            cfg.inflight = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--rate")) {
            cfg.rate = atof(arg(argc, argv, &i));
        } else if (!strcmp(a, "--size")) {
            cfg.size = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--duration")) {
            cfg.duration = atof(arg(argc, argv, &i));
        } else if (!strcmp(a, "--warmup")) {
            cfg.warmup = atof(arg(argc, argv, &i));
        } else if (!strcmp(a, "--source-ips")) {
            cfg.source_ips = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--connect-concurrency")) {
            cfg.concurrency = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--connect-timeout")) {
            cfg.connect_timeout = atof(arg(argc, argv, &i));
        } else if (!strcmp(a, "--open-deadline")) {
            cfg.open_deadline = atof(arg(argc, argv, &i));
        } else if (!strcmp(a, "--probes")) {
            cfg.probes = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--server-pid")) {
            cfg.server_pid = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--keepalive")) {
            cfg.keepalive = atof(arg(argc, argv, &i));
        } else if (!strcmp(a, "--nap-us")) {
            cfg.nap_us = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--progress")) {
            cfg.progress = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--reader")) {
            const char *r = arg(argc, argv, &i);
            if (strcmp(r, "full") && strcmp(r, "peek"))
                die("--reader is full or peek, not %s", r);
            cfg.full = !strcmp(r, "full");
        } else if (!strcmp(a, "--rooms")) {
            cfg.rooms = atoi(arg(argc, argv, &i));
        } else if (!strcmp(a, "--read-size")) {
            long v = atol(arg(argc, argv, &i));
            cfg.read_size = v > 0 && v < RDBUF ? (size_t)v : RDBUF;
        } else {
            die("unknown argument %s", a);
        }
    }
    if (!cfg.nt)
        die("no --target");
    if (cfg.n < 1 || cfg.inflight < 1 || cfg.duration <= 0 || cfg.warmup < 0 || cfg.concurrency < 1)
        die("bad -n, --inflight, --duration, --warmup or --connect-concurrency");
    if ((cfg.scenario == SC_RATE || cfg.scenario == SC_CHAT) && cfg.rate <= 0)
        die("--rate must be positive");
    if (cfg.rooms < 0 || (cfg.rooms > 0 && cfg.scenario != SC_FANOUT))
        die("--rooms N (N > 0) is for the fanout scenario");
    if (cfg.full && cfg.size < 48)
        die("--reader full needs --content-size of at least 48 (the send time, sequence and sender fit)");
    if (cfg.source_ips <= 0)
        cfg.source_ips = cfg.n / 200 + (cfg.n % 200 != 0);
    if (cfg.source_ips < 1)
        cfg.source_ips = 1;
    if (cfg.source_ips > 254)
        cfg.source_ips = 254;

    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    random_bytes(&rng_state, sizeof rng_state);
    rng_state |= 1;
    int64_t t_main = now_ns();
    G.ep = epoll_create1(EPOLL_CLOEXEC);
    if (G.ep < 0)
        die("epoll_create1: %s", strerror(errno));
    ring_setup();
    G.buf = calloc(1, RDBUF + MSG_SLACK);
    if (!G.buf)
        die("out of memory");
    G.c = calloc((size_t)cfg.n, sizeof *G.c);
    G.att = calloc((size_t)cfg.concurrency, sizeof *G.att);
    if (!G.c || !G.att)
        die("out of memory");
    for (int i = 0; i < cfg.n; i++) {
        G.c[i].fd = -1;
        G.c[i].idx = i;
        G.c[i].frag_ts = -1;
    }
    G.min_count = -1;
    G.show = cfg.progress || isatty(2);
    G.label = cfg.scenario == SC_FANOUT ? "fanout" : cfg.scenario == SC_RATE ? "rate" : cfg.scenario == SC_CHAT ? "chat" : "sink";

    /* the result object is written as the scenario goes; the connection
     * figures come first, so stdout is buffered until the end */
    static char obuf[1 << 16];
    setvbuf(stdout, obuf, _IOFBF, sizeof obuf);
    int64_t wall_mark = t_main;
    int rc;
    if (cfg.scenario == SC_FANOUT)
        rc = scenario_fanout();
    else if (cfg.scenario == SC_RATE || cfg.scenario == SC_CHAT)
        rc = scenario_rate();
    else
        rc = scenario_sink();
    progress_done();
    close_all();
    if (rc) {
        fflush(stdout);
        return 1;
    }
    /* what the reader read over the whole run (the window's share is above) */
    jkey("reader");
    jstr_raw(cfg.full ? "full" : "peek");
    jkey("read_io"); /* how the open connections were read */
    jstr_raw(U.fd >= 0 ? "io_uring" : "epoll");
    if (cfg.full) {
        jint("content_size", cfg.size);
        jint("read_messages", RD.messages);
        jint("read_counted", RD.counted);
        jint("read_other_type", RD.other_type);
        jint("read_wrong_size", RD.wrong_size);
        jint("read_misrouted", RD.misrouted);
        jint("read_invalid", RD.invalid);
        jint("read_bytes", RD.bytes);
    }
    jint("closed_early", G.closed_early);
    jfloat("wall_s", (double)(now_ns() - wall_mark) / 1e9, 2);
    if (G.nfail) {
        char msg[700];
        snprintf(msg, sizeof msg, "%d connections failed, first: %s", G.nfail, G.first_failure);
        jkey("errors");
        putchar('[');
        jstr_raw(msg);
        putchar(']');
    }
    printf("}\n");
    fflush(stdout);
    return 0;
}
