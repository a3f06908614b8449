/* wshub._directsend: one frame to many sockets in one call.
 *
 * Why: when a message goes to a thousand clients, each of them costs one
 * send(2) of ~9 us in the kernel, plus ~1.3 us for the Python loop and the
 * event loop's transport.write() around it (uvloop buffers the bytes, queues
 * the stream, and writes it later in the same pass). Here the loop is in C and
 * the bytes go straight to the socket.
 *
 * The transport stays the owner of the socket. A direct send is made only
 * while the transport would have written at once itself: it is not closing
 * (its file descriptor is still this connection's, not a newer one's that got
 * the same number) and nothing is queued in it (so bytes cannot overtake
 * earlier ones). Whatever could not be sent is handed back to the caller,
 * who gives the rest to transport.write(): partial sends, EAGAIN, and errors,
 * which the transport then meets and reports itself.
 *
 * In chunks of two phases: the transports of a chunk are asked first, then
 * the chunk's send(2)s follow one another with nothing in between. Measured
 * on a 2-vCPU VM against a load generator on the other vCPU, a tight run of
 * sends costs ~1 us less *per send* in the kernel than sends interleaved with
 * the checks (9.9 -> 8.8 us of server CPU per delivery, one frame to 999
 * clients): the kernel's send path stays in cache, and the reader is woken
 * fewer times from idle. Asking all thousand transports before the first
 * send held every delivery back by ~0.3 ms; a chunk's checks take ~20 us.
 *
 * send_ready() is the same walk over an audience's direct-ready recipients
 * (kept by wshub.fanout as they join and leave), which also skips, and
 * reports back, the ones Python must handle this pass: so that the Python
 * side of a pass runs per exception, not per recipient.
 *
 * The GIL is held across send(2): the socket is non-blocking (MSG_DONTWAIT),
 * and releasing and taking the GIL would cost more than the call.
 *
 * Where the kernel offers io_uring (--io-uring auto, the default), a chunk's
 * sends go to the kernel in ONE io_uring_enter instead of one send(2) each:
 * the same sends with the same flags, run inline by the kernel, their results
 * read back as send(2)'s would have been. Against main, same machine
 * (bench/run.py --reader full, three A/Bs, medians of 11 runs): fan-out
 * 0.269 -> 0.232 us of server CPU per delivery (-14 %), rooms (calls of at
 * most 9 sends) 0.466 -> 0.452 (-3 %, within the noise). A ring entry alone costs about what a syscall does
 * (sends that fail at once with EAGAIN: equal at 64 a call); the gain shows on
 * real sends (2.26 -> 2.05 us of CPU per TCP send, 64 a call), where one
 * entry into the kernel per chunk keeps its send path hot: our reading, not
 * proven. See "A chunk's sends in one io_uring_enter" below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifdef __linux__
#include <linux/io_uring.h>
#define HAVE_IO_URING 1
#else
#define HAVE_IO_URING 0
#endif

static PyObject *str_is_closing;
static PyObject *str_get_write_buffer_size;
static PyObject *str_transport;
static PyObject *str_direct_fd;
static PyObject *str_sealed;
static PyObject *str_is_recipient;

/* 1 if the transport may be bypassed now, 0 if not, -1 on an exception. */
static int
transport_is_idle(PyObject *transport)
{
    PyObject *closing = PyObject_CallMethodNoArgs(transport, str_is_closing);
    if (closing == NULL)
        return -1;
    int truth = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    if (truth != 0)
        return truth < 0 ? -1 : 0;
    PyObject *size = PyObject_CallMethodNoArgs(transport, str_get_write_buffer_size);
    if (size == NULL)
        return -1;
    truth = PyObject_IsTrue(size);
    Py_DECREF(size);
    if (truth < 0)
        return -1;
    return !truth;
}

PyDoc_STRVAR(send_each_doc,
"send_each(outs, data, /)\n--\n\n"
"Send the bytes *data* to every object of the list *outs* (each with a\n"
"``transport`` and a ``direct_fd``, its socket's descriptor) whose transport\n"
"is not closing and has nothing queued (a transport whose methods raise\n"
"counts as busy). Return None\n"
"when every one took all of *data*; otherwise a list of ``(index, sent)``\n"
"for the others, *sent* being how many leading bytes of *data* went out\n"
"(0 when nothing was attempted or the send failed).");

/* One socket of a call: its descriptor, or -1 when no send is attempted,
 * and then how many bytes went out. */
struct target {
    int fd;
    Py_ssize_t sent;
};

/* Sockets asked, then sent to, at a time: large enough that the sends run
 * back to back, small enough that the first send is not held back by a
 * thousand checks (each touches a cold transport). */
#define CHUNK 64

/* ---- A chunk's sends in one io_uring_enter (Linux) ----------------------
 *
 * Phase 2 of a chunk is up to CHUNK send(2)s back to back; each is a syscall
 * entry and exit of its own. With io_uring the chunk's sends are written as
 * IORING_OP_SEND entries into a ring shared with the kernel and submitted,
 * and waited for, in ONE io_uring_enter: the kernel runs each send inline
 * (the flags are send(2)'s own, MSG_DONTWAIT|MSG_NOSIGNAL, so a full socket
 * completes at once with -EAGAIN instead of being parked on a poll) and posts
 * its result, which fills `sent` exactly as send(2)'s return would have.
 *
 * The call returns only once every completion is reaped: the kernel reads
 * `data` while a send is in flight, and the caller may free it afterwards.
 *
 * One ring per process, made at the first use: a child made by fork() shares
 * the parent's ring (its memory and file), so a pid that changed means the
 * ring is the parent's and a new one is made. One thread owns it
 * (IORING_SETUP_SINGLE_ISSUER): a call from another thread uses send(2).
 * Wherever the ring cannot be made (no io_uring: old kernel, seccomp in a
 * container, kernel.io_uring_disabled; no IORING_OP_SEND), it is send(2), as
 * before, with no error to anyone; io_uring_state() says which path runs.
 */

static int uring_off;  /* io_uring("off"): send(2) whatever the kernel offers */

#if HAVE_IO_URING
struct uring {
    int fd;                     /* -1 when there is none */
    pid_t pid;                  /* the process that made it */
    pthread_t thread;           /* the thread that made it: its only submitter */
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_map_size, cq_map_size, sqes_size;
};

static struct uring ring = {.fd = -1};
static int ring_tried;          /* setup attempted in this process (ring.pid) */
static pid_t ring_tried_pid;
static char ring_reason[96] = "not tried yet";

static int
sys_io_uring_setup(unsigned entries, struct io_uring_params *params)
{
    return (int)syscall(__NR_io_uring_setup, entries, params);
}

static int
sys_io_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static int
sys_io_uring_register(int fd, unsigned opcode, void *arg, unsigned nr_args)
{
    return (int)syscall(__NR_io_uring_register, fd, opcode, arg, nr_args);
}

/* Forget the ring, unmapping and closing it (a forked child's copy of the
 * parent's ring too: the parent's own stays open). */
static void
ring_drop(void)
{
    if (ring.sqes != NULL && ring.sqes != MAP_FAILED)
        munmap(ring.sqes, ring.sqes_size);
    if (ring.cq_map != NULL && ring.cq_map != MAP_FAILED && ring.cq_map != ring.sq_map)
        munmap(ring.cq_map, ring.cq_map_size);
    if (ring.sq_map != NULL && ring.sq_map != MAP_FAILED)
        munmap(ring.sq_map, ring.sq_map_size);
    if (ring.fd >= 0)
        close(ring.fd);
    memset(&ring, 0, sizeof ring);
    ring.fd = -1;
}

static void
ring_fail(const char *what, int err)
{
    snprintf(ring_reason, sizeof ring_reason, "%s: %s", what, strerror(err));
    ring_drop();
}

/* Make this process's ring; 0 when there is none (ring_reason says why). */
static int
ring_setup(void)
{
    /* The tests' way to a kernel without io_uring (the setup fails as it
     * does under seccomp), for the server they start. */
    const char *fail = getenv("WSHUB_TEST_IO_URING_SETUP_FAILS");
    if (fail != NULL && fail[0] != '\0') {
        snprintf(ring_reason, sizeof ring_reason, "io_uring_setup: %s (forced by a test)",
                 strerror(ENOSYS));
        return 0;
    }
    /* The newest flags first: SINGLE_ISSUER and DEFER_TASKRUN (6.1) let the
     * kernel skip the locking and task-work signalling of a shared ring;
     * SUBMIT_ALL (5.18) goes on past a bad entry, so every entry has a
     * completion to wait for. An older kernel refuses them with EINVAL; with
     * none (5.6-5.17), a bad entry stops the submission there, and the loop
     * of send_chunk submits the rest in its next enter. */
    static const unsigned attempts[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL,
        IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL,
        IORING_SETUP_SUBMIT_ALL,
        0,
    };
    struct io_uring_params params;
    int fd = -1;
    for (size_t a = 0; a < sizeof attempts / sizeof attempts[0]; a++) {
        memset(&params, 0, sizeof params);
        params.flags = attempts[a];
        fd = sys_io_uring_setup(CHUNK, &params);
        if (fd >= 0 || errno != EINVAL)
            break;
    }
    if (fd < 0) {
        ring_fail("io_uring_setup", errno);
        return 0;
    }
    ring.fd = fd;
    ring.pid = getpid();
    ring.thread = pthread_self();

    ring.sq_map_size = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    ring.cq_map_size = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    int single = (params.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && ring.cq_map_size > ring.sq_map_size)
        ring.sq_map_size = ring.cq_map_size;
    ring.sq_map = mmap(NULL, ring.sq_map_size, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (ring.sq_map == MAP_FAILED) {
        ring_fail("mmap", errno);
        return 0;
    }
    if (single) {
        ring.cq_map = ring.sq_map;
    } else {
        ring.cq_map = mmap(NULL, ring.cq_map_size, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
        if (ring.cq_map == MAP_FAILED) {
            ring_fail("mmap", errno);
            return 0;
        }
    }
    ring.sqes_size = params.sq_entries * sizeof(struct io_uring_sqe);
    ring.sqes = mmap(NULL, ring.sqes_size, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (ring.sqes == MAP_FAILED) {
        ring_fail("mmap", errno);
        return 0;
    }
    char *sq = ring.sq_map, *cq = ring.cq_map;
    ring.sq_head = (unsigned *)(sq + params.sq_off.head);
    ring.sq_tail = (unsigned *)(sq + params.sq_off.tail);
    ring.sq_mask = (unsigned *)(sq + params.sq_off.ring_mask);
    ring.sq_array = (unsigned *)(sq + params.sq_off.array);
    ring.cq_head = (unsigned *)(cq + params.cq_off.head);
    ring.cq_tail = (unsigned *)(cq + params.cq_off.tail);
    ring.cq_mask = (unsigned *)(cq + params.cq_off.ring_mask);
    ring.cqes = (struct io_uring_cqe *)(cq + params.cq_off.cqes);

    /* IORING_OP_SEND is 5.6; a kernel may also have it turned off. */
    size_t probe_size = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = calloc(1, probe_size);
    if (probe == NULL) {
        ring_fail("probe", ENOMEM);
        return 0;
    }
    if (sys_io_uring_register(fd, IORING_REGISTER_PROBE, probe, 256) < 0) {
        int err = errno;
        free(probe);
        ring_fail("IORING_REGISTER_PROBE", err);
        return 0;
    }
    int supported = probe->last_op >= IORING_OP_SEND
                    && (probe->ops[IORING_OP_SEND].flags & IO_URING_OP_SUPPORTED);
    free(probe);
    if (!supported) {
        ring_fail("IORING_OP_SEND", EOPNOTSUPP);
        return 0;
    }
    snprintf(ring_reason, sizeof ring_reason, "setup flags 0x%x", params.flags);
    return 1;
}

/* 1 if this call may use the ring (made now if need be), 0 for send(2). */
static int
ring_ready(void)
{
    if (uring_off)
        return 0;
    pid_t pid = getpid();
    if (ring_tried && ring_tried_pid != pid) {
        /* Forked: what we hold is the parent's ring. */
        ring_drop();
        ring_tried = 0;
    }
    if (!ring_tried) {
        ring_tried = 1;
        ring_tried_pid = pid;
        ring_setup();
    }
    return ring.fd >= 0 && pthread_equal(ring.thread, pthread_self());
}
#endif /* HAVE_IO_URING */

/* Phase 2 by send(2): the sends of targets[0:count], back to back. */
static void
send_loop(struct target *targets, Py_ssize_t count, const char *data, Py_ssize_t length)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        if (targets[i].fd < 0)
            continue;
        ssize_t w;
        do {
            w = send(targets[i].fd, data, (size_t)length, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (w < 0 && errno == EINTR);
        targets[i].sent = w > 0 ? (Py_ssize_t)w : 0;
    }
}

/* Fewer sends than this in a chunk go by send(2) (see send_chunk). */
#define RING_MIN_SENDS 4

/* A target's `sent` while its entry waits for its completion. */
#define IN_FLIGHT (-3)

/* Phase 2: the sends of targets[0:count] (count <= CHUNK), through the ring
 * when there is one, and every one of them completed on return. */
static void
send_chunk(struct target *targets, Py_ssize_t count, const char *data, Py_ssize_t length)
{
#if HAVE_IO_URING
    Py_ssize_t wanted = 0;
    for (Py_ssize_t i = 0; i < count; i++)
        wanted += targets[i].fd >= 0;
    /* The ring's entry costs about what a syscall does, and an enter ~1 us
     * more: a few sends are cheaper by send(2) (3 measured worse through the
     * ring, 5 better). A frame longer than an entry's 32-bit length never
     * happens, but is send(2)'s. */
    if (wanted < RING_MIN_SENDS || length > INT_MAX || !ring_ready()) {
        send_loop(targets, count, data, length);
        return;
    }
    unsigned mask = *ring.sq_mask;
    unsigned tail = *ring.sq_tail;  /* ours alone: only the kernel's head moves */
    for (Py_ssize_t i = 0; i < count; i++) {
        if (targets[i].fd < 0)
            continue;
        unsigned slot = tail & mask;
        struct io_uring_sqe *sqe = &ring.sqes[slot];
        memset(sqe, 0, sizeof *sqe);
        sqe->opcode = IORING_OP_SEND;
        sqe->fd = targets[i].fd;
        sqe->addr = (uint64_t)(uintptr_t)data;
        sqe->len = (uint32_t)length;
        sqe->msg_flags = MSG_DONTWAIT | MSG_NOSIGNAL;
        sqe->user_data = (uint64_t)i;
        targets[i].sent = IN_FLIGHT;
        ring.sq_array[slot] = slot;
        tail++;
    }
    __atomic_store_n(ring.sq_tail, tail, __ATOMIC_RELEASE);

    unsigned remaining = (unsigned)wanted;
    while (remaining > 0) {
        unsigned unsubmitted = tail - __atomic_load_n(ring.sq_head, __ATOMIC_ACQUIRE);
        int r = sys_io_uring_enter(ring.fd, unsubmitted, remaining, IORING_ENTER_GETEVENTS);
        int err = r < 0 ? errno : 0;
        /* Whatever completed, even when the wait was cut short. */
        unsigned head = *ring.cq_head;
        unsigned ctail = __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE);
        unsigned cmask = *ring.cq_mask;
        while (head != ctail) {
            struct io_uring_cqe *cqe = &ring.cqes[head & cmask];
            uint64_t i = cqe->user_data;
            /* send(2)'s answer: the bytes that went out, an error none
             * (EAGAIN, EPIPE, ECONNRESET: the transport meets it later). */
            if (i < (uint64_t)count && targets[i].sent == IN_FLIGHT) {
                targets[i].sent = cqe->res > 0 ? (Py_ssize_t)cqe->res : 0;
                remaining--;
            }
            head++;
        }
        __atomic_store_n(ring.cq_head, head, __ATOMIC_RELEASE);
        if (r >= 0 || err == EINTR || err == EAGAIN || err == EBUSY)
            continue;  /* a signal, or the kernel short of memory for now */
        unsubmitted = tail - __atomic_load_n(ring.sq_head, __ATOMIC_ACQUIRE);
        if (unsubmitted == remaining) {
            /* The ring itself refuses (nothing of ours is in flight): take
             * the entries back, send the rest by send(2), and use send(2)
             * from now on. */
            __atomic_store_n(ring.sq_tail, tail - unsubmitted, __ATOMIC_RELEASE);
            ring_fail("io_uring_enter", err);
            for (Py_ssize_t i = 0; i < count; i++)
                if (targets[i].fd >= 0 && targets[i].sent == IN_FLIGHT)
                    send_loop(&targets[i], 1, data, length);
            return;
        }
        /* Sends of ours are in flight: `data` must outlive them, so wait on. */
    }
#else
    send_loop(targets, count, data, length);
#endif
}

static PyObject *
send_each(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "send_each() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *outs = args[0];
    if (!PyList_Check(outs)) {
        PyErr_SetString(PyExc_TypeError, "send_each(): outs must be a list");
        return NULL;
    }
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "send_each(): data must be bytes");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[1]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[1]);
    Py_ssize_t n = PyList_GET_SIZE(outs);
    if (n == 0)
        Py_RETURN_NONE;
    struct target *targets = PyMem_New(struct target, n);
    if (targets == NULL)
        return PyErr_NoMemory();
    PyObject *left = NULL;

    for (Py_ssize_t first = 0; first < n; first += CHUNK) {
        Py_ssize_t last = first + CHUNK < n ? first + CHUNK : n;

        /* Phase 1: which sockets of this chunk may be written now. */
        for (Py_ssize_t i = first; i < last; i++) {
            if (PyList_GET_SIZE(outs) != n) {
                /* Only a foreign is_closing() could do this; never a transport. */
                PyErr_SetString(PyExc_RuntimeError, "send_each(): outs changed size");
                goto error;
            }
            PyObject *item = PyList_GET_ITEM(outs, i);
            /* The recipient itself, not a tuple made for it: a tuple per
             * connection was 64 bytes of every idle connection
             * (docs/memory.md). Two slot reads cost a few ns beside the
             * transport's two method calls. */
            Py_INCREF(item);  /* keep it alive while its transport's methods run */
            PyObject *number = PyObject_GetAttr(item, str_direct_fd);
            if (number == NULL) {
                Py_DECREF(item);
                goto error;
            }
            long fd = PyLong_AsLong(number);
            Py_DECREF(number);
            if (fd < 0 || fd > INT_MAX) {
                Py_DECREF(item);
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError,
                                    "send_each(): a file descriptor is out of range");
                goto error;
            }
            PyObject *transport = PyObject_GetAttr(item, str_transport);
            Py_DECREF(item);
            if (transport == NULL)
                goto error;
            int idle = transport_is_idle(transport);
            Py_DECREF(transport);
            if (idle < 0) {
                /* A transport that cannot answer is left to the caller, whose
                 * transport.write() meets the same fault and reports it: one
                 * broken transport must not cost the others their frame. */
                if (!PyErr_ExceptionMatches(PyExc_Exception))
                    goto error;
                PyErr_Clear();
                idle = 0;
            }
            targets[i].fd = idle ? (int)fd : -1;
            targets[i].sent = 0;
        }

        /* Phase 2: the chunk's sends, back to back. */
        send_chunk(&targets[first], last - first, data, length);
    }

    /* Phase 3: what the caller must still write through the transport. */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (targets[i].sent == length)
            continue;
        if (left == NULL && (left = PyList_New(0)) == NULL)
            goto error;
        PyObject *pair = Py_BuildValue("(nn)", i, targets[i].sent);
        if (pair == NULL)
            goto error;
        int appended = PyList_Append(left, pair);
        Py_DECREF(pair);
        if (appended < 0)
            goto error;
    }
    PyMem_Free(targets);
    if (left == NULL)
        Py_RETURN_NONE;
    return left;

error:
    PyMem_Free(targets);
    Py_XDECREF(left);
    return NULL;
}


/* send_ready() reads four attributes of each of a thousand recipients; through
 * PyObject_GetAttr that is ~180 instructions each (callgrind). A connection
 * keeps them in __slots__, so for a type whose attributes are plain slot
 * descriptors (and the generic getattr) they are read at their offsets. The
 * offsets are looked up once per type and kept while the type's version tag
 * says nothing on it changed; anything else takes PyObject_GetAttr. */
enum { SLOT_IS_RECIPIENT, SLOT_SEALED, SLOT_DIRECT_FD, SLOT_TRANSPORT, N_SLOTS };

static PyTypeObject *slots_type;  /* borrowed: compared by identity only */
static unsigned int slots_version;
static Py_ssize_t slot_offsets[N_SLOTS];
static PyObject **slot_names[N_SLOTS] = {
    &str_is_recipient, &str_sealed, &str_direct_fd, &str_transport,
};

/* 1 if *type*'s offsets are known now, 0 if it must go through getattr. */
static int
slots_known(PyTypeObject *type)
{
    if (!PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG))
        return 0;
    if (type == slots_type && type->tp_version_tag == slots_version)
        return 1;
    if (type->tp_getattro != PyObject_GenericGetAttr)
        return 0;
    Py_ssize_t offsets[N_SLOTS];
    for (int i = 0; i < N_SLOTS; i++) {
        PyObject *descr = _PyType_Lookup(type, *slot_names[i]);  /* borrowed, no error set */
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type))
            return 0;
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READ_RESTRICTED))
            return 0;
        offsets[i] = member->offset;
    }
    if (!PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG))
        return 0;  /* the lookups may have made it valid; not known to still be */
    memcpy(slot_offsets, offsets, sizeof offsets);
    slots_type = type;
    slots_version = type->tp_version_tag;
    return 1;
}

/* A new reference to attribute *slot* of *item*, or NULL with an exception. */
static PyObject *
read_slot(PyObject *item, int slot, int known)
{
    if (known) {
        PyObject *value = *(PyObject **)((char *)item + slot_offsets[slot]);
        if (value != NULL) {
            Py_INCREF(value);
            return value;
        }  /* unset: getattr raises the AttributeError */
    }
    return PyObject_GetAttr(item, *slot_names[slot]);
}

PyDoc_STRVAR(send_ready_doc,
"send_ready(ready, data, start, stop, /)\n--\n\n"
"Send the bytes *data* to the recipients ``ready[start:stop]`` (an\n"
"audience's direct-ready recipients: uncompressed, with a ``direct_fd``)\n"
"that need nothing of Python this pass. Return None when every one of them\n"
"took all of *data*; otherwise a list of ``(index, sent)`` for the\n"
"exceptions: *sent* is -2 for one that is no longer a recipient\n"
"(``is_recipient`` false: skipped), -1 for one with a share of its own\n"
"(``sealed`` not None: nothing attempted), else how many leading bytes of\n"
"*data* went out (0 when its socket is gone (``direct_fd`` -1), its\n"
"transport is closing or busy, or the send failed).");

/* What send_ready() hands back for a recipient it did not send to. */
#define NOT_A_RECIPIENT (-2)
#define OWN_SHARE (-1)

static PyObject *
send_ready(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "send_ready() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *ready = args[0];
    if (!PyList_Check(ready)) {
        PyErr_SetString(PyExc_TypeError, "send_ready(): ready must be a list");
        return NULL;
    }
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "send_ready(): data must be bytes");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    Py_ssize_t stop = PyLong_AsSsize_t(args[3]);
    if ((start == -1 || stop == -1) && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ready);
    if (start < 0 || stop > n || start > stop) {
        PyErr_SetString(PyExc_IndexError, "send_ready(): start:stop out of range");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(args[1]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[1]);
    if (start == stop)
        Py_RETURN_NONE;
    struct target *targets = PyMem_New(struct target, stop - start);
    if (targets == NULL)
        return PyErr_NoMemory();
    PyObject *left = NULL;

    for (Py_ssize_t first = start; first < stop; first += CHUNK) {
        Py_ssize_t last = first + CHUNK < stop ? first + CHUNK : stop;

        /* Phase 1: which recipients of this chunk Python must see, and
         * which sockets may be written now. */
        for (Py_ssize_t i = first; i < last; i++) {
            struct target *t = &targets[i - start];
            t->fd = -1;
            t->sent = 0;
            if (PyList_GET_SIZE(ready) != n) {
                PyErr_SetString(PyExc_RuntimeError, "send_ready(): ready changed size");
                goto error;
            }
            PyObject *item = PyList_GET_ITEM(ready, i);
            Py_INCREF(item);
            int known = slots_known(Py_TYPE(item));
            PyObject *value = read_slot(item, SLOT_IS_RECIPIENT, known);
            int truth = value == NULL ? -1 : PyObject_IsTrue(value);
            Py_XDECREF(value);
            if (truth <= 0) {
                Py_DECREF(item);
                if (truth < 0)
                    goto error;
                t->sent = NOT_A_RECIPIENT;  /* closing: its share was taken */
                continue;
            }
            value = read_slot(item, SLOT_SEALED, known);
            if (value == NULL) {
                Py_DECREF(item);
                goto error;
            }
            int own_share = value != Py_None;
            Py_DECREF(value);
            if (own_share) {
                Py_DECREF(item);
                t->sent = OWN_SHARE;  /* excluded, private frames, or joined mid-pass */
                continue;
            }
            value = read_slot(item, SLOT_DIRECT_FD, known);
            if (value == NULL) {
                Py_DECREF(item);
                goto error;
            }
            long fd = PyLong_AsLong(value);
            Py_DECREF(value);
            if (fd == -1 && PyErr_Occurred()) {
                Py_DECREF(item);
                goto error;
            }
            if (fd < 0 || fd > INT_MAX) {
                Py_DECREF(item);  /* its socket is gone: the writer decides */
                continue;
            }
            PyObject *transport = read_slot(item, SLOT_TRANSPORT, known);
            Py_DECREF(item);
            if (transport == NULL)
                goto error;
            int idle = transport_is_idle(transport);
            Py_DECREF(transport);
            if (idle < 0) {
                /* As in send_each(): the writer meets the fault and reports it. */
                if (!PyErr_ExceptionMatches(PyExc_Exception))
                    goto error;
                PyErr_Clear();
                idle = 0;
            }
            if (idle)
                t->fd = (int)fd;
        }

        /* Phase 2: the chunk's sends, back to back. */
        send_chunk(&targets[first - start], last - first, data, length);
    }

    /* Phase 3: the exceptions, for Python. */
    for (Py_ssize_t i = start; i < stop; i++) {
        if (targets[i - start].sent == length)
            continue;
        if (left == NULL && (left = PyList_New(0)) == NULL)
            goto error;
        PyObject *pair = Py_BuildValue("(nn)", i, targets[i - start].sent);
        if (pair == NULL)
            goto error;
        int appended = PyList_Append(left, pair);
        Py_DECREF(pair);
        if (appended < 0)
            goto error;
    }
    PyMem_Free(targets);
    if (left == NULL)
        Py_RETURN_NONE;
    return left;

error:
    PyMem_Free(targets);
    Py_XDECREF(left);
    return NULL;
}

PyDoc_STRVAR(use_io_uring_doc,
"use_io_uring(on, /)\n--\n\n"
"True (the default): a chunk's sends go through io_uring where the kernel\n"
"offers it (made at the first use in each process). False: send(2) only.");

static PyObject *
use_io_uring(PyObject *Py_UNUSED(module), PyObject *on)
{
    int truth = PyObject_IsTrue(on);
    if (truth < 0)
        return NULL;
    uring_off = !truth;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(send_path_doc,
"send_path()\n--\n\n"
"Which way this thread's direct sends go, as ``(path, detail)``: path\n"
"``\"io_uring\"`` or ``\"send\"``, detail why (the setup flags, \"off\", or\n"
"what failed). Makes the ring now when it is to be used and not made yet.");

static PyObject *
send_path(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
#if HAVE_IO_URING
    if (uring_off)
        return Py_BuildValue("(ss)", "send", "off");
    if (ring_ready())
        return Py_BuildValue("(ss)", "io_uring", ring_reason);
    if (ring.fd >= 0)
        return Py_BuildValue("(ss)", "send", "io_uring is another thread's");
    return Py_BuildValue("(ss)", "send", ring_reason);
#else
    return Py_BuildValue("(ss)", "send", uring_off ? "off" : "no io_uring on this system");
#endif
}

static PyMethodDef methods[] = {
    {"use_io_uring", (PyCFunction)use_io_uring, METH_O, use_io_uring_doc},
    {"send_path", (PyCFunction)send_path, METH_NOARGS, send_path_doc},
    {"send_each", (PyCFunction)(void (*)(void))send_each, METH_FASTCALL, send_each_doc},
    {"send_ready", (PyCFunction)(void (*)(void))send_ready, METH_FASTCALL, send_ready_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wshub._directsend",
    .m_doc = "One frame to many sockets in one call (see wshub.fanout).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__directsend(void)
{
    str_is_closing = PyUnicode_InternFromString("is_closing");
    str_get_write_buffer_size = PyUnicode_InternFromString("get_write_buffer_size");
    str_transport = PyUnicode_InternFromString("transport");
    str_direct_fd = PyUnicode_InternFromString("direct_fd");
    str_sealed = PyUnicode_InternFromString("sealed");
    str_is_recipient = PyUnicode_InternFromString("is_recipient");
    if (str_is_closing == NULL || str_get_write_buffer_size == NULL || str_transport == NULL
        || str_direct_fd == NULL || str_sealed == NULL || str_is_recipient == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *all = Py_BuildValue("(ssss)", "send_each", "send_ready", "use_io_uring", "send_path");
    if (all == NULL || PyModule_AddObject(m, "__all__", all) < 0) {
        Py_XDECREF(all);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
