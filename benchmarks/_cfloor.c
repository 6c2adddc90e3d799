/* The C floor of a publish (issue 12): what a native ring write cannot avoid.
 *
 * Rings(buffers, slots, slot_size) pins one writable buffer per ring;
 * rings.write(data, ts) stores, per ring, a slot header (odd seq, length,
 * timestamp), copies the payload, then makes two release stores: the even seq
 * and the ring's write count. No validation beyond the size check, no wake, no
 * bookkeeping: shmcast's native publish is set against this in the same run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define RING_HEAD 128 /* w at offset 64, slots from 128 */
#define SLOT_HEAD 24  /* seq u64, length u32, pad u32, timestamp f64 */

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;
    Py_buffer *views;
    uint64_t slots, slot_size, v;
} Rings;

static void
Rings_dealloc(Rings *self)
{
    for (Py_ssize_t i = 0; i < self->n; i++)
        PyBuffer_Release(&self->views[i]);
    PyMem_Free(self->views);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Rings_init(Rings *self, PyObject *args, PyObject *kwds)
{
    PyObject *seq;
    unsigned long long slots, slot_size;
    if (!PyArg_ParseTuple(args, "OKK", &seq, &slots, &slot_size))
        return -1;
    PyObject *fast = PySequence_Fast(seq, "buffers must be a sequence");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    self->views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (self->views == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &self->views[i],
                               PyBUF_WRITABLE) < 0) {
            Py_DECREF(fast);
            return -1;
        }
        self->n = i + 1;
        if ((uint64_t)self->views[i].len < RING_HEAD + slots * slot_size) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "buffer smaller than its ring");
            return -1;
        }
    }
    Py_DECREF(fast);
    self->slots = slots;
    self->slot_size = slot_size;
    return 0;
}

static PyObject *
Rings_write(Rings *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "write(data: bytes, ts: float)");
        return NULL;
    }
    double ts = PyFloat_AsDouble(args[1]);
    if (ts == -1.0 && PyErr_Occurred())
        return NULL;
    const char *data = PyBytes_AS_STRING(args[0]);
    uint64_t len = (uint64_t)PyBytes_GET_SIZE(args[0]);
    if (len + SLOT_HEAD > self->slot_size) {
        PyErr_SetString(PyExc_ValueError, "payload larger than a slot");
        return NULL;
    }
    uint64_t v = self->v++;
    uint64_t off = RING_HEAD + (v % self->slots) * self->slot_size;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        char *base = self->views[i].buf;
        char *slot = base + off;
        _Atomic uint64_t *seq = (_Atomic uint64_t *)slot;
        atomic_store_explicit(seq, 2 * v + 1, memory_order_relaxed);
        uint32_t len32 = (uint32_t)len;
        memcpy(slot + 8, &len32, 4);
        memcpy(slot + 16, &ts, 8);
        memcpy(slot + SLOT_HEAD, data, len);
        atomic_store_explicit(seq, 2 * v + 2, memory_order_release);
        atomic_store_explicit((_Atomic uint64_t *)(base + 64), v + 1, memory_order_release);
    }
    Py_RETURN_NONE;
}

static PyMethodDef Rings_methods[] = {
    {"write", (PyCFunction)(void (*)(void))Rings_write, METH_FASTCALL,
     "write(data, ts): one slot in every ring"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_cfloor.Rings",
    .tp_basicsize = sizeof(Rings),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Rings_init,
    .tp_dealloc = (destructor)Rings_dealloc,
    .tp_methods = Rings_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cfloor", "The C floor of a publish.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__cfloor(void)
{
    if (PyType_Ready(&RingsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingsType);
    if (PyModule_AddObject(m, "Rings", (PyObject *)&RingsType) < 0) {
        Py_DECREF(&RingsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
