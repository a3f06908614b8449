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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/types.h>

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
        for (Py_ssize_t i = first; i < last; i++) {
            if (targets[i].fd < 0)
                continue;
            ssize_t w;
            do {
                w = send(targets[i].fd, data, (size_t)length, MSG_DONTWAIT | MSG_NOSIGNAL);
            } while (w < 0 && errno == EINTR);
            targets[i].sent = w > 0 ? (Py_ssize_t)w : 0;
        }
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
        for (Py_ssize_t i = first; i < last; i++) {
            struct target *t = &targets[i - start];
            if (t->fd < 0)
                continue;
            ssize_t w;
            do {
                w = send(t->fd, data, (size_t)length, MSG_DONTWAIT | MSG_NOSIGNAL);
            } while (w < 0 && errno == EINTR);
            t->sent = w > 0 ? (Py_ssize_t)w : 0;
        }
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

static PyMethodDef methods[] = {
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
    PyObject *all = Py_BuildValue("(ss)", "send_each", "send_ready");
    if (all == NULL || PyModule_AddObject(m, "__all__", all) < 0) {
        Py_XDECREF(all);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
