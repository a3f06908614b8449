/* wshub._ingest: a read's simple frames, and the plain relays among them, in
 * one call.
 *
 * Why: per relayed message, the Python path costs a frame header check and an
 * unmask call (wshub.framescan), a UTF-8 decode to str, the plain relay's
 * string scan (wshub.protocol._plain_relay), the content checks, and the
 * envelope's escape and encode back to bytes: ~35 % of a message's
 * instructions in the rooms scenario (docs/rooms-perf.md). Here one call walks
 * the read, and a plain relay comes back as its content's bytes already in the
 * form the envelope writes them (json.encoder.encode_basestring's, without the
 * quotes), so the hub builds the envelope with one bytes format.
 *
 * scan(data, limit) walks *data* from its start while it holds whole, final,
 * masked text or binary frames of at most *limit* payload bytes (exactly the
 * frames wshub.framescan hands to the caller itself) and returns
 * (stop, items): *stop* is where the first other frame (or an incomplete one)
 * begins, and each item is (code, body, end) with *end* where that frame ends:
 *
 *   TEXT (0):      a text frame that is not a plain relay this code takes;
 *                  body is its unmasked payload, for the Python path as is
 *   BINARY (1):    a binary frame; body is its unmasked payload
 *   MESSAGE (2),
 *   BROADCAST (3): {"type":"message"|"broadcast","content":"..."} with
 *                  nothing else, valid UTF-8, and a content the protocol
 *                  accepts; body is the content, JSON-escaped.
 *
 * scan(data, limit, 1) groups the relays instead: each run of consecutive
 * MESSAGE and BROADCAST items becomes one item (RUN, kinds, contents, ends):
 * kinds a bytes object with one code per relay, contents a list of their
 * bodies, ends a bytes object with each relay's end as 8 bytes little-endian
 * (read only when a relay of the run is refused). Why: a read brings ~32
 * relays in the rooms scenario; a tuple and an end's int per relay, and the
 * connection's loop over them with a rate-limit call each, were the part of
 * the per-message cost that a run does not need (docs/rooms-perf.md
 * "Session 10").
 *
 * A plain relay is only taken when the Python path would accept it: anything
 * it refuses or that needs its judgement (empty or white-space-only content,
 * over MAX_CONTENT_CHARS characters, lone surrogates, invalid UTF-8, raw
 * control characters, bad escapes, anything before or after the string) comes
 * back as TEXT, so every refusal keeps its one implementation in Python.
 * Pure: no I/O, no state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

enum { TEXT = 0, BINARY = 1, MESSAGE = 2, BROADCAST = 3, RUN = 4 };

/* protocol.MAX_CONTENT_CHARS: checked against it in tests/unit/test_ingest.py. */
#define MAX_CONTENT_CHARS 1000

static const char HEAD_MESSAGE[] = "{\"type\":\"message\",\"content\":\"";
static const char HEAD_BROADCAST[] = "{\"type\":\"broadcast\",\"content\":\"";

/* str.isspace() of a code point (Python's Py_UNICODE_ISSPACE): the content's
 * "not content.strip()" check needs one character for which it is false. */
static int
is_space(uint32_t c)
{
    if (c < 0x80)
        return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20);
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* The bytes a JSON string holds as they are and encode_basestring writes as
 * they are: printable ASCII but the quote and the backslash. A run of them
 * is copied in one step (most of a chat message's characters). */
static int
copied_as_is(unsigned char b)
{
    return b >= 0x20 && b < 0x80 && b != '"' && b != '\\';
}

/* copied_as_is() of all eight bytes of v (any byte order), in a few word
 * operations: (x - 0x01..) & ~x & 0x80.. is nonzero exactly when a byte of x
 * is zero (a borrow only crosses into the next byte from a zero byte, which
 * is then flagged itself); with 0x20.. in place of 0x01.. when a byte is
 * below 0x20, given that no byte has its top bit set (checked first). */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

static int
all_copied_as_is(uint64_t v)
{
    uint64_t quote = v ^ (ONES * '"'), backslash = v ^ (ONES * '\\');
    uint64_t other = (v & HIGHS) | ((v - ONES * 0x20) & ~v & HIGHS) |
                     ((quote - ONES) & ~quote & HIGHS) |
                     ((backslash - ONES) & ~backslash & HIGHS);
    return other == 0;
}

/* dst[i] = src[i] ^ mask[i % 4], eight bytes a step: the unmask of a frame
 * was a step per byte (docs/rooms-perf.md "Session 10"). Both halves of the
 * 8-byte mask are the 4 mask bytes in memory order, so the byte order of the
 * machine does not matter. */
static void
unmask(unsigned char *dst, const unsigned char *src, Py_ssize_t n, const unsigned char *mask)
{
    uint32_t m4;
    memcpy(&m4, mask, 4);
    uint64_t m8 = ((uint64_t)m4 << 32) | m4;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, src + i, 8);
        v ^= m8;
        memcpy(dst + i, &v, 8);
    }
    for (; i < n; i++)
        dst[i] = src[i] ^ mask[i & 3];
}

static int
hex4(const unsigned char *p, uint32_t *out)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char h = p[i];
        v <<= 4;
        if (h >= '0' && h <= '9')
            v |= (uint32_t)(h - '0');
        else if (h >= 'a' && h <= 'f')
            v |= (uint32_t)(h - 'a' + 10);
        else if (h >= 'A' && h <= 'F')
            v |= (uint32_t)(h - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

/* One decoded code point, written as encode_basestring writes it. */
static unsigned char *
put_escaped(unsigned char *o, uint32_t c)
{
    static const char hexdigits[] = "0123456789abcdef";
    if (c == '"' || c == '\\') {
        *o++ = '\\';
        *o++ = (unsigned char)c;
    } else if (c < 0x20) {
        *o++ = '\\';
        switch (c) {
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = (unsigned char)hexdigits[c >> 4];
            *o++ = (unsigned char)hexdigits[c & 0xF];
        }
    } else if (c < 0x80) {
        *o++ = (unsigned char)c;
    } else if (c < 0x800) {
        *o++ = (unsigned char)(0xC0 | (c >> 6));
        *o++ = (unsigned char)(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        *o++ = (unsigned char)(0xE0 | (c >> 12));
        *o++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
        *o++ = (unsigned char)(0x80 | (c & 0x3F));
    } else {
        *o++ = (unsigned char)(0xF0 | (c >> 18));
        *o++ = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
        *o++ = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
        *o++ = (unsigned char)(0x80 | (c & 0x3F));
    }
    return o;
}

/* The content of a plain relay in p[0:n] (the unmasked payload), escaped into
 * out (room for n bytes: the escaped form is never longer than the input).
 * Returns the kind, or TEXT for anything the Python path must judge; sets
 * *out_len. */
static int
plain_relay(const unsigned char *p, Py_ssize_t n, unsigned char *out, Py_ssize_t *out_len)
{
    Py_ssize_t pos;
    int kind;
    if (n >= (Py_ssize_t)sizeof(HEAD_MESSAGE) - 1 + 2 &&
        memcmp(p, HEAD_MESSAGE, sizeof(HEAD_MESSAGE) - 1) == 0) {
        kind = MESSAGE;
        pos = sizeof(HEAD_MESSAGE) - 1;
    } else if (n >= (Py_ssize_t)sizeof(HEAD_BROADCAST) - 1 + 2 &&
               memcmp(p, HEAD_BROADCAST, sizeof(HEAD_BROADCAST) - 1) == 0) {
        kind = BROADCAST;
        pos = sizeof(HEAD_BROADCAST) - 1;
    } else {
        return TEXT;
    }
    /* The string must close exactly before the final brace. */
    if (p[n - 1] != '}' || p[n - 2] != '"')
        return TEXT;
    Py_ssize_t stop = n - 2;
    unsigned char *o = out;
    Py_ssize_t chars = 0;
    int visible = 0; /* a character str.strip() keeps */
    while (pos < stop) {
        unsigned char b = p[pos];
        uint32_t c;
        if (copied_as_is(b)) {
            /* The same steps as one character at a time below: each is one
             * character, copied, and not white space unless a space. */
            Py_ssize_t start = pos;
            while (stop - pos >= 8) {
                uint64_t v;
                memcpy(&v, p + pos, 8);
                if (!all_copied_as_is(v))
                    break;
                visible |= v != ONES * ' ';
                pos += 8;
            }
            while (pos < stop && copied_as_is(b = p[pos])) {
                visible |= b != ' ';
                pos++;
            }
            memcpy(o, p + start, (size_t)(pos - start));
            o += pos - start;
            chars += pos - start;
            if (chars > MAX_CONTENT_CHARS)
                return TEXT;
            continue;
        }
        if (b == '"') {
            return TEXT; /* the string ends early: something follows it */
        } else if (b == '\\') {
            if (pos + 1 >= stop)
                return TEXT;
            unsigned char e = p[pos + 1];
            pos += 2;
            switch (e) {
            case '"': c = '"'; break;
            case '\\': c = '\\'; break;
            case '/': c = '/'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case 'u':
                if (pos + 4 > stop || !hex4(p + pos, &c))
                    return TEXT;
                pos += 4;
                if (c >= 0xD800 && c <= 0xDBFF) {
                    uint32_t low;
                    if (pos + 6 > stop || p[pos] != '\\' || p[pos + 1] != 'u' ||
                        !hex4(p + pos + 2, &low) || low < 0xDC00 || low > 0xDFFF)
                        return TEXT; /* a lone surrogate: refused in Python */
                    pos += 6;
                    c = 0x10000 + ((c - 0xD800) << 10) + (low - 0xDC00);
                } else if (c >= 0xDC00 && c <= 0xDFFF) {
                    return TEXT;
                }
                break;
            default:
                return TEXT; /* not a JSON escape */
            }
            o = put_escaped(o, c);
        } else if (b < 0x20) {
            return TEXT; /* a raw control character: not a JSON string */
        } else if (b < 0x80) {
            c = b;
            *o++ = b;
            pos++;
        } else {
            /* Strict UTF-8, as bytes.decode("utf-8") has it: no overlong
             * forms, no surrogates, nothing past U+10FFFF. */
            Py_ssize_t len;
            unsigned char lo = 0x80, hi = 0xBF;
            if (b >= 0xC2 && b <= 0xDF) {
                len = 2;
                c = b & 0x1F;
            } else if (b >= 0xE0 && b <= 0xEF) {
                len = 3;
                c = b & 0x0F;
                if (b == 0xE0)
                    lo = 0xA0;
                else if (b == 0xED)
                    hi = 0x9F;
            } else if (b >= 0xF0 && b <= 0xF4) {
                len = 4;
                c = b & 0x07;
                if (b == 0xF0)
                    lo = 0x90;
                else if (b == 0xF4)
                    hi = 0x8F;
            } else {
                return TEXT;
            }
            if (pos + len > stop)
                return TEXT;
            unsigned char b1 = p[pos + 1];
            if (b1 < lo || b1 > hi)
                return TEXT;
            c = (c << 6) | (b1 & 0x3F);
            for (Py_ssize_t k = 2; k < len; k++) {
                unsigned char bk = p[pos + k];
                if (bk < 0x80 || bk > 0xBF)
                    return TEXT;
                c = (c << 6) | (bk & 0x3F);
            }
            memcpy(o, p + pos, (size_t)len);
            o += len;
            pos += len;
        }
        if (++chars > MAX_CONTENT_CHARS)
            return TEXT;
        if (!visible && !is_space(c))
            visible = 1;
    }
    if (!visible)
        return TEXT; /* empty or white space only: refused in Python */
    *out_len = o - out;
    return kind;
}

static PyObject *
item(int code, PyObject *body, Py_ssize_t end)
{
    if (body == NULL)
        return NULL;
    PyObject *t = PyTuple_New(3);
    PyObject *c = PyLong_FromLong(code);
    PyObject *e = PyLong_FromSsize_t(end);
    if (t == NULL || c == NULL || e == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(c);
        Py_XDECREF(e);
        Py_DECREF(body);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, c);
    PyTuple_SET_ITEM(t, 1, body);
    PyTuple_SET_ITEM(t, 2, e);
    return t;
}

/* The relays in a row being gathered by scan(..., 1): their codes and ends
 * in C arrays, their contents in a list, made into one RUN item when a frame
 * of another kind (or the end of the walk) closes the run. */
struct run {
    PyObject *contents; /* NULL while no run is open */
    char *kinds;
    unsigned char *ends;
    Py_ssize_t count, room;
};

static void
run_free(struct run *r)
{
    Py_CLEAR(r->contents);
    PyMem_Free(r->kinds);
    PyMem_Free(r->ends);
    r->kinds = NULL;
    r->ends = NULL;
    r->count = r->room = 0;
}

static int
run_add(struct run *r, int code, const char *content, Py_ssize_t len, Py_ssize_t end)
{
    if (r->contents == NULL && (r->contents = PyList_New(0)) == NULL)
        return -1;
    if (r->count == r->room) {
        Py_ssize_t room = r->room ? 2 * r->room : 64;
        char *kinds = PyMem_Realloc(r->kinds, (size_t)room);
        if (kinds == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->kinds = kinds;
        unsigned char *ends = PyMem_Realloc(r->ends, (size_t)room * 8);
        if (ends == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->ends = ends;
        r->room = room;
    }
    PyObject *body = PyBytes_FromStringAndSize(content, len);
    if (body == NULL)
        return -1;
    int appended = PyList_Append(r->contents, body);
    Py_DECREF(body);
    if (appended < 0)
        return -1;
    r->kinds[r->count] = (char)code;
    uint64_t e = (uint64_t)end;
    for (int i = 0; i < 8; i++)
        r->ends[8 * r->count + i] = (unsigned char)(e >> (8 * i));
    r->count++;
    return 0;
}

/* The open run, if any, as a (RUN, kinds, contents, ends) item of items. */
static int
run_close(struct run *r, PyObject *items)
{
    if (r->contents == NULL)
        return 0;
    PyObject *it = Py_BuildValue("(iy#Oy#)", RUN, r->kinds, r->count, r->contents,
                                 (const char *)r->ends, 8 * r->count);
    if (it == NULL)
        return -1;
    int appended = PyList_Append(items, it);
    Py_DECREF(it);
    Py_CLEAR(r->contents);
    r->count = 0; /* the arrays are kept for the next run of this walk */
    return appended;
}

static PyObject *
scan(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t limit;
    int runs = 0;
    if (!PyArg_ParseTuple(args, "y*n|p:scan", &view, &limit, &runs))
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t end = view.len, pos = 0;
    PyObject *items = PyList_New(0);
    unsigned char *scratch = NULL; /* the unmasked payload of a text frame */
    Py_ssize_t scratch_size = 0;
    struct run run = {0};
    if (items == NULL)
        goto fail;
    while (end - pos >= 2) {
        unsigned char b0 = data[pos], b1 = data[pos + 1];
        if ((b0 != 0x81 && b0 != 0x82) || !(b1 & 0x80))
            break; /* not a simple frame: the Python path's */
        Py_ssize_t header = 6;
        uint64_t length = b1 & 0x7F;
        if (length == 126) {
            header = 8;
            if (end - pos < header)
                break;
            length = ((uint64_t)data[pos + 2] << 8) | data[pos + 3];
        } else if (length == 127) {
            header = 14;
            if (end - pos < header)
                break;
            length = 0;
            for (int i = 2; i < 10; i++)
                length = (length << 8) | data[pos + i];
        }
        if (end - pos < header || length > (uint64_t)limit ||
            length > (uint64_t)(end - pos - header))
            break; /* incomplete or too big: the Python path's */
        Py_ssize_t n = (Py_ssize_t)length;
        const unsigned char *mask = data + pos + header - 4;
        const unsigned char *src = data + pos + header;
        Py_ssize_t frame_end = pos + header + n;
        PyObject *it;
        if (b0 == 0x82) {
            PyObject *body = PyBytes_FromStringAndSize(NULL, n);
            if (body != NULL) {
                unmask((unsigned char *)PyBytes_AS_STRING(body), src, n, mask);
            }
            it = item(BINARY, body, frame_end);
        } else {
            if (scratch_size < 2 * n + 1) {
                PyMem_Free(scratch);
                scratch_size = 2 * n + 1;
                scratch = PyMem_Malloc((size_t)scratch_size);
                if (scratch == NULL) {
                    PyErr_NoMemory();
                    goto fail;
                }
            }
            unsigned char *plain = scratch, *escaped = scratch + n;
            unmask(plain, src, n, mask);
            Py_ssize_t escaped_len = 0;
            int code = plain_relay(plain, n, escaped, &escaped_len);
            if (code == TEXT) {
                it = item(TEXT, PyBytes_FromStringAndSize((char *)plain, n), frame_end);
            } else if (runs) {
                if (run_add(&run, code, (char *)escaped, escaped_len, frame_end) < 0)
                    goto fail;
                pos = frame_end;
                continue;
            } else {
                it = item(code, PyBytes_FromStringAndSize((char *)escaped, escaped_len),
                          frame_end);
            }
        }
        if (it == NULL)
            goto fail;
        if (run_close(&run, items) < 0) {
            Py_DECREF(it);
            goto fail;
        }
        int appended = PyList_Append(items, it);
        Py_DECREF(it);
        if (appended < 0)
            goto fail;
        pos = frame_end;
    }
    if (run_close(&run, items) < 0)
        goto fail;
    run_free(&run);
    PyMem_Free(scratch);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nN)", pos, items);
fail:
    run_free(&run);
    PyMem_Free(scratch);
    Py_XDECREF(items);
    PyBuffer_Release(&view);
    return NULL;
}

/* stamp(kinds, contents, head_message, head_broadcast, tail, first_offset,
 * sender): the envelopes of a run of plain relays from scan(..., 1) (its
 * kinds and contents), one sender's, published together
 * (wshub.hub.Hub.on_plain_relays).
 *
 * Why: per message, the hub's encode_plain_relay() and the fan-out's
 * text_frame() were two Python calls and three bytes objects; a read brings
 * ~32 relays at once, with one sender, one timestamp and consecutive offsets.
 *
 * Each relay's payload is its kind's head, its content, *tail* (the
 * timestamp's field: '","timestamp":"..."'), then ',"offset":N' when
 * *first_offset* >= 0 (N counting up from it), then '}': the bytes
 * protocol.encode_plain_relay writes (tests/unit/test_publish_run.py holds
 * the two to each other). Returns (frames, excluded, message_count, blob,
 * ends, flags): the frames are wire.text_frame() of the payloads, excluded[i]
 * is *sender* for a message (it does not get its own) and None for a
 * broadcast, and message_count counts the messages.
 *
 * With offsets (*first_offset* >= 0: history on) the payloads come as the
 * history keeps a run (wshub._runpack.pack's form, History.keep_packed):
 * *blob* the payloads one after the other, *ends* len + 1 native 32-bit
 * ints (0, then where each payload ends in blob), *flags* a byte per relay,
 * 1 for a message; without, the three are None. Why: the payloads as bytes
 * objects of their own were made only to be copied into the history's blob
 * (and for the fan-out's compression and the peers, which take them from the
 * frames now): an allocation, a free and a copy of ~200 bytes per message
 * (docs/rooms-perf.md "Session 12"). */
static PyObject *
append_frame(PyObject *frames, const char *payload, Py_ssize_t n)
{
    Py_ssize_t header = n < 126 ? 2 : n < 65536 ? 4 : 10;
    PyObject *frame = PyBytes_FromStringAndSize(NULL, header + n);
    if (frame == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(frame);
    out[0] = 0x81;
    if (n < 126) {
        out[1] = (unsigned char)n;
    } else if (n < 65536) {
        out[1] = 126;
        out[2] = (unsigned char)(n >> 8);
        out[3] = (unsigned char)n;
    } else {
        out[1] = 127;
        for (int i = 0; i < 8; i++)
            out[2 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
    }
    memcpy(out + header, payload, (size_t)n);
    int appended = PyList_Append(frames, frame);
    Py_DECREF(frame);
    return appended < 0 ? NULL : frames;
}

#define OFFSET_PREFIX_LEN 10 /* ',"offset":' */

/* How many digits offset_field() writes for *value*. */
static int
decimal_digits(unsigned long long value)
{
    int count = 1;
    while (value >= 10) {
        value /= 10;
        count++;
    }
    return count;
}

/* ',"offset":N' into *out* (at least 31 bytes), its length returned. By
 * hand rather than snprintf, which parses its format on every relay
 * (bench/message_instructions.sh: 7,596 -> 7,511 instructions per message). */
static int
offset_field(char *out, unsigned long long value)
{
    static const char prefix[OFFSET_PREFIX_LEN + 1] = ",\"offset\":";
    char digits[20];
    int count = 0;
    do {
        digits[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    memcpy(out, prefix, OFFSET_PREFIX_LEN);
    int n = OFFSET_PREFIX_LEN;
    while (count > 0)
        out[n++] = digits[--count];
    return n;
}

/* One relay's payload into *out* (room for it: payload_size()). */
static char *
write_payload(char *out, const char *head, Py_ssize_t head_len, PyObject *content,
              const char *tail, Py_ssize_t tail_len, const char *number, int number_len)
{
    Py_ssize_t content_len = PyBytes_GET_SIZE(content);
    memcpy(out, head, (size_t)head_len);
    out += head_len;
    memcpy(out, PyBytes_AS_STRING(content), (size_t)content_len);
    out += content_len;
    memcpy(out, tail, (size_t)tail_len);
    out += tail_len;
    memcpy(out, number, (size_t)number_len);
    out[number_len] = '}';
    return out + number_len + 1;
}

static PyObject *
stamp(PyObject *Py_UNUSED(self), PyObject *args)
{
    const char *kinds, *head_m, *head_b, *tail;
    Py_ssize_t count, head_m_len, head_b_len, tail_len;
    PyObject *contents, *sender;
    long long offset;
    if (!PyArg_ParseTuple(args, "y#O!y#y#y#LO:stamp", &kinds, &count, &PyList_Type, &contents,
                          &head_m, &head_m_len, &head_b, &head_b_len, &tail, &tail_len,
                          &offset, &sender))
        return NULL;
    if (PyList_GET_SIZE(contents) != count) {
        PyErr_SetString(PyExc_ValueError, "stamp: one kind per content");
        return NULL;
    }
    /* The checks, and with offsets the blob's size, before anything is made. */
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *content = PyList_GET_ITEM(contents, i);
        int code = (unsigned char)kinds[i];
        if (!PyBytes_Check(content)) {
            PyErr_SetString(PyExc_TypeError, "stamp: a relay's content is bytes");
            return NULL;
        }
        if (code != MESSAGE && code != BROADCAST) {
            PyErr_SetString(PyExc_ValueError, "stamp: a relay's code is MESSAGE or BROADCAST");
            return NULL;
        }
        if (offset >= 0)
            total += (uint64_t)(code == MESSAGE ? head_m_len : head_b_len) +
                     (uint64_t)PyBytes_GET_SIZE(content) + (uint64_t)tail_len + 1 +
                     OFFSET_PREFIX_LEN + decimal_digits((unsigned long long)(offset + i));
    }
    if (total > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "stamp: a run of more than 4 GiB");
        return NULL;
    }
    Py_ssize_t message_count = 0;
    PyObject *frames = PyList_New(0), *excluded = PyList_New(0);
    PyObject *blob = NULL, *ends = NULL, *flags = NULL;
    char *scratch = NULL; /* without offsets: one payload at a time */
    Py_ssize_t scratch_size = 0;
    char *out = NULL, *end_at = NULL, *flag_at = NULL;
    if (frames == NULL || excluded == NULL)
        goto fail;
    if (offset >= 0) {
        blob = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
        ends = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sizeof(uint32_t) * (count + 1));
        flags = PyBytes_FromStringAndSize(NULL, count);
        if (blob == NULL || ends == NULL || flags == NULL)
            goto fail;
        out = PyBytes_AS_STRING(blob);
        end_at = PyBytes_AS_STRING(ends);
        flag_at = PyBytes_AS_STRING(flags);
        uint32_t zero = 0;
        memcpy(end_at, &zero, sizeof zero);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *content = PyList_GET_ITEM(contents, i);
        int code = (unsigned char)kinds[i];
        const char *head = code == MESSAGE ? head_m : head_b;
        Py_ssize_t head_len = code == MESSAGE ? head_m_len : head_b_len;
        char number[32];
        int number_len = offset >= 0 ? offset_field(number, (unsigned long long)(offset + i)) : 0;
        Py_ssize_t n = head_len + PyBytes_GET_SIZE(content) + tail_len + number_len + 1;
        char *payload;
        if (blob != NULL) {
            payload = out;
            out = write_payload(out, head, head_len, content, tail, tail_len, number, number_len);
            uint32_t position = (uint32_t)(out - PyBytes_AS_STRING(blob));
            memcpy(end_at + sizeof position * (size_t)(i + 1), &position, sizeof position);
            flag_at[i] = code == MESSAGE;
        } else {
            if (scratch_size < n) {
                PyMem_Free(scratch);
                scratch_size = n < 1024 ? 1024 : n;
                scratch = PyMem_Malloc((size_t)scratch_size);
                if (scratch == NULL) {
                    PyErr_NoMemory();
                    goto fail;
                }
            }
            payload = scratch;
            write_payload(scratch, head, head_len, content, tail, tail_len, number, number_len);
        }
        if (append_frame(frames, payload, n) == NULL)
            goto fail;
        message_count += code == MESSAGE;
        if (PyList_Append(excluded, code == MESSAGE ? sender : Py_None) < 0)
            goto fail;
    }
    PyMem_Free(scratch);
    if (blob == NULL) {
        blob = Py_NewRef(Py_None);
        ends = Py_NewRef(Py_None);
        flags = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(NNnNNN)", frames, excluded, message_count, blob, ends, flags);
fail:
    PyMem_Free(scratch);
    Py_XDECREF(frames);
    Py_XDECREF(excluded);
    Py_XDECREF(blob);
    Py_XDECREF(ends);
    Py_XDECREF(flags);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(data, limit, runs=False) -> (stop, [(code, body, end) or (RUN, kinds, contents, "
     "ends), ...]): see the module's source."},
    {"stamp", stamp, METH_VARARGS,
     "stamp(kinds, contents, head_message, head_broadcast, tail, first_offset, sender) -> "
     "(frames, excluded, message_count, blob, ends, flags): see the module's source."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wshub._ingest", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__ingest(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "TEXT", TEXT) < 0 ||
        PyModule_AddIntConstant(m, "BINARY", BINARY) < 0 ||
        PyModule_AddIntConstant(m, "MESSAGE", MESSAGE) < 0 ||
        PyModule_AddIntConstant(m, "BROADCAST", BROADCAST) < 0 ||
        PyModule_AddIntConstant(m, "RUN", RUN) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CONTENT_CHARS", MAX_CONTENT_CHARS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *all = Py_BuildValue("(ssssssss)", "BINARY", "BROADCAST", "MAX_CONTENT_CHARS",
                                  "MESSAGE", "RUN", "TEXT", "scan", "stamp");
    if (all == NULL || PyModule_AddObject(m, "__all__", all) < 0) {
        Py_XDECREF(all);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
