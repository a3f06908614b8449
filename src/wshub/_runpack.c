/* wshub._runpack: a run of relays packed for the history in one call.
 *
 * Why: History.keep_run (src/wshub/history.py) keeps a read's relays as one
 * run: their payloads joined, where each ends, and a flag byte per entry
 * (message or broadcast). In Python that is b"".join(), an array built from
 * accumulate(map(len, ...)) and bytes(messages): three walks of the list, the
 * second with an int object per payload, ~4 us per run of 32 on the loaded
 * machine, most of what keeping a run cost (docs/rooms-perf.md "Session 10").
 * Here it is one walk. history.py has the same three lines for a build
 * without a compiler; tests/unit/test_history.py holds the two equal.
 *
 * pack(payloads, messages) -> (blob, ends, flags)
 *
 *   payloads: a list of bytes; messages: a list of as many bools (True or
 *   False themselves: no Python code runs while the lists are read).
 *   blob:  the payloads one after the other;
 *   ends:  len(payloads) + 1 native 32-bit unsigned ints, 0 then where each
 *          payload ends in blob (ValueError if blob would pass 4 GiB);
 *   flags: one byte per payload, 1 where messages is true, else 0.
 *
 * Pure: no I/O, no state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

static PyObject *
pack(PyObject *self, PyObject *args)
{
    PyObject *payloads, *messages;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!:pack", &PyList_Type, &payloads, &PyList_Type, &messages))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    if (PyList_GET_SIZE(messages) != count) {
        PyErr_SetString(PyExc_ValueError, "pack: as many messages as payloads");
        return NULL;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(payload)) {
            PyErr_SetString(PyExc_TypeError, "pack: payloads must be bytes");
            return NULL;
        }
        total += PyBytes_GET_SIZE(payload);
        if (total > (Py_ssize_t)UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "pack: a run of more than 4 GiB");
            return NULL;
        }
    }
    PyObject *blob = PyBytes_FromStringAndSize(NULL, total);
    PyObject *ends = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sizeof(uint32_t) * (count + 1));
    PyObject *flags = PyBytes_FromStringAndSize(NULL, count);
    if (blob == NULL || ends == NULL || flags == NULL)
        goto fail;
    char *out = PyBytes_AS_STRING(blob);
    char *end_at = PyBytes_AS_STRING(ends);
    char *flag_at = PyBytes_AS_STRING(flags);
    uint32_t position = 0;
    memcpy(end_at, &position, sizeof position);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyList_GET_ITEM(payloads, i);
        Py_ssize_t size = PyBytes_GET_SIZE(payload);
        memcpy(out + position, PyBytes_AS_STRING(payload), (size_t)size);
        position += (uint32_t)size;
        memcpy(end_at + sizeof position * (size_t)(i + 1), &position, sizeof position);
        PyObject *message = PyList_GET_ITEM(messages, i);
        if (message != Py_True && message != Py_False) {
            PyErr_SetString(PyExc_TypeError, "pack: messages must be bools");
            goto fail;
        }
        flag_at[i] = message == Py_True;
    }
    PyObject *run = PyTuple_New(3);
    if (run == NULL)
        goto fail;
    PyTuple_SET_ITEM(run, 0, blob);
    PyTuple_SET_ITEM(run, 1, ends);
    PyTuple_SET_ITEM(run, 2, flags);
    return run;
fail:
    Py_XDECREF(blob);
    Py_XDECREF(ends);
    Py_XDECREF(flags);
    return NULL;
}

static PyMethodDef methods[] = {
    {"pack", pack, METH_VARARGS,
     "pack(payloads, messages) -> (blob, ends, flags): a run for History.keep_run."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wshub._runpack", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__runpack(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* Every public module of wshub names what it exports (tests/unit/test_exports.py). */
    PyObject *all = Py_BuildValue("(s)", "pack");
    if (all == NULL || PyModule_AddObject(m, "__all__", all) < 0) {
        Py_XDECREF(all);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
