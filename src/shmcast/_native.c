/* shmcast._native: the ring's hot paths in C, bit-compatible with src/shmcast/_ring.py.
 *
 * Same layout (offsets from _layout.h, generated from _layout.py), same protocol,
 * same counters: a native writer serves pure readers and the reverse. What C adds
 * is the memory ordering the pure path gets only from x86-64's TSO:
 *
 *   writer: seq = 2i+1 (relaxed); release fence; copy; seq = 2i+2 (release);
 *           w = i+1 (release)
 *   reader: w (acquire); seq (acquire); copy; acquire fence; seq again (relaxed)
 *
 * The release fence after the odd seq keeps the copy's stores from becoming
 * visible before it; the acquire fence keeps the copy's loads from moving after
 * the second seq load. Both are free on x86-64 and what aarch64 needs.
 *
 * Each object holds a buffer export of its ring (through a private memoryview,
 * so the segment's own memoryview can still be released) from construction to
 * release(): the mapping cannot be unmapped under it, whoever closes the segment.
 * Every call runs with the GIL held except RingReader.poll, whose spin releases it;
 * release() during that spin is deferred until the spin ends.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_ULONGLONG, READONLY: the names every CPython from 3.10 has */

#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "_layout.h"

typedef _Atomic uint64_t au64;

static inline au64 *
field(char *base, uint64_t off)
{
    return (au64 *)(base + off);
}

static inline uint64_t
load_acq(char *base, uint64_t off)
{
    return atomic_load_explicit(field(base, off), memory_order_acquire);
}

static inline void
store_rel(char *base, uint64_t off, uint64_t value)
{
    atomic_store_explicit(field(base, off), value, memory_order_release);
}

static PyObject *str_value, *str_release, *str_name;
static PyObject *str_type, *str_payload, *str_version, *str_timestamp, *str_data;
static PyObject *empty_args;

/* ------------------------------------------------------------------ the pinned buffer */

typedef struct {
    PyObject *view; /* our own memoryview of the caller's buffer */
    Py_buffer buf;  /* its export: keeps the mapping alive */
    char *base;     /* NULL once released */
    int busy;       /* calls running without the GIL */
    int release_pending;
} Pin;

static int
pin_take(Pin *pin, PyObject *obj, uint64_t need)
{
    pin->view = PyMemoryView_FromObject(obj);
    if (pin->view == NULL)
        return -1;
    if (PyObject_GetBuffer(pin->view, &pin->buf, PyBUF_WRITABLE) < 0) {
        Py_CLEAR(pin->view);
        return -1;
    }
    if ((uint64_t)pin->buf.len < need) {
        PyErr_Format(PyExc_ValueError, "ring buffer is %zd bytes; its geometry needs %llu",
                     pin->buf.len, (unsigned long long)need);
        goto fail;
    }
    if (((uintptr_t)pin->buf.buf & 7) != 0) {
        /* An unaligned 8-byte field is neither one store nor atomic. */
        PyErr_SetString(PyExc_ValueError, "ring buffer is not 8-byte aligned");
        goto fail;
    }
    pin->base = pin->buf.buf;
    return 0;
fail:
    PyBuffer_Release(&pin->buf);
    Py_CLEAR(pin->view);
    return -1;
}

static void
pin_drop(Pin *pin)
{
    if (pin->busy) {
        pin->release_pending = 1;
        return;
    }
    if (pin->view != NULL) {
        pin->base = NULL;
        PyBuffer_Release(&pin->buf);
        Py_CLEAR(pin->view);
    }
}

static inline int
pin_check(Pin *pin)
{
    if (pin->base == NULL || pin->release_pending) {
        PyErr_SetString(PyExc_ValueError, "operation on a released ring");
        return -1;
    }
    return 0;
}

#ifndef MADV_POPULATE_READ /* Linux 5.14 */
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Map in at most this much of a ring when an end is made: default rings (280 KiB)
 * whole, and no single adoption costs more than about a millisecond. */
#define PREFAULT_MAX (4ULL << 20)

/* Fault the ring's pages into our page table now, instead of one minor fault per
 * page during the first lap of the hot path (3 per publish at N=16, 100 B events:
 * each mapping of the segment faults on its own). */
static void
prefault(char *base, uint64_t len, int write)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), start, end, p;
    if (len > PREFAULT_MAX)
        len = PREFAULT_MAX;
    if (page == 0 || (page & (page - 1)) != 0 || len == 0)
        return;
    start = (uintptr_t)base & ~(page - 1);
    end = (uintptr_t)base + len;
    if (madvise((void *)start, end - start, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) == 0 ||
        errno != EINVAL)
        return; /* done, or a page that cannot be had: touching it would be a SIGBUS */
    /* A kernel before 5.14: touch one aligned word of each page (+0 keeps the bytes
     * as they are, atomically, whoever else writes them). */
    for (p = (uintptr_t)base; p < end; p = (p & ~(page - 1)) + page) {
        au64 *word = (au64 *)((p + 7) & ~(uintptr_t)7);
        if ((uintptr_t)word + 8 > end)
            break;
        if (write)
            atomic_fetch_add_explicit(word, 0, memory_order_relaxed);
        else
            (void)atomic_load_explicit(word, memory_order_relaxed);
    }
}

/* Geometry shared by both ends: the bytes the ring needs, or 0 (error set). */
static uint64_t
ring_bytes(Py_ssize_t slots, Py_ssize_t slot_size, uint64_t *stride)
{
    uint64_t total;
    if (slots < 1 || slot_size < 0) {
        PyErr_Format(PyExc_ValueError, "impossible ring geometry: %zd slots of %zd bytes",
                     slots, slot_size);
        return 0;
    }
    *stride = SHMCAST_SLOT_STRIDE(slot_size);
    if (__builtin_mul_overflow((uint64_t)slots, *stride, &total) ||
        __builtin_add_overflow(total, (uint64_t)SHMCAST_RING_HEADER_SIZE, &total)) {
        PyErr_SetString(PyExc_OverflowError, "ring geometry overflows");
        return 0;
    }
    return total;
}

/* _ring.drops(), with Python's unbounded integers where garbage counters need them. */
static PyObject *
drops_value(uint64_t w, uint64_t rejected, uint64_t r, uint64_t delivered, uint64_t slots,
            int overwrite)
{
    unsigned __int128 lost;
    if (r > w)
        r = w;
    if (delivered > r)
        delivered = r;
    lost = (unsigned __int128)rejected + (r - delivered);
    if (overwrite && w > slots && w - slots > r)
        lost += w - slots - r;
    if ((lost >> 64) == 0)
        return PyLong_FromUnsignedLongLong((unsigned long long)lost);
    {
        PyObject *hi = PyLong_FromUnsignedLongLong((unsigned long long)(lost >> 64));
        PyObject *lo = PyLong_FromUnsignedLongLong((unsigned long long)lost);
        PyObject *shift = PyLong_FromLong(64), *big = NULL, *out = NULL;
        if (hi && lo && shift && (big = PyNumber_Lshift(hi, shift)) != NULL)
            out = PyNumber_Add(big, lo);
        Py_XDECREF(hi);
        Py_XDECREF(lo);
        Py_XDECREF(shift);
        Py_XDECREF(big);
        return out;
    }
}

/* Bind fastcall arguments to the n parameter *names* (positional or keyword);
 * out[i] is NULL for one not given. */
static int
bind_args(const char *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
          const char *const *names, Py_ssize_t n, PyObject **out)
{
    Py_ssize_t i, k, nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments", fn, n);
        return -1;
    }
    for (i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    for (k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        for (i = 0; i < n; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0)
                break;
        }
        if (i == n || out[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument %R", fn,
                         key);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    return 0;
}

static int
limit_arg(PyObject *arg, int *have, uint64_t *limit)
{
    *have = 0;
    if (arg == NULL || arg == Py_None)
        return 0;
    *limit = PyLong_AsUnsignedLongLong(arg);
    if (*limit == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    *have = 1;
    return 0;
}

/* ------------------------------------------------------------------ RingWriter */

typedef struct {
    PyObject_HEAD
    Pin pin;
    PyObject *buf;   /* what the caller gave us, for .buf */
    PyObject *sem;   /* a posix_ipc.Semaphore, or None */
    sem_t *csem;     /* our own handle on the same semaphore, or NULL */
    uint64_t slots, stride, w, rejected;
    int overwrite;
} Writer;

static PyTypeObject WriterType;

static int
Writer_init(Writer *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", "slots", "slot_size", "overwrite", "sem", "resume", NULL};
    PyObject *buf, *sem = Py_None;
    Py_ssize_t slots, slot_size;
    int overwrite, resume = 0;
    uint64_t need;
    if (self->pin.view != NULL || self->buf != NULL) {
        PyErr_SetString(PyExc_TypeError, "RingWriter is already initialized");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onnp|O$p:RingWriter", kwlist, &buf, &slots,
                                     &slot_size, &overwrite, &sem, &resume))
        return -1;
    need = ring_bytes(slots, slot_size, &self->stride);
    if (need == 0 || pin_take(&self->pin, buf, need) < 0)
        return -1;
    prefault(self->pin.base, need, 1);
    self->slots = (uint64_t)slots;
    self->overwrite = overwrite;
    Py_INCREF(buf);
    self->buf = buf;
    Py_INCREF(sem);
    self->sem = sem;
    self->csem = NULL;
    if (sem != Py_None) {
        /* Our own sem_open of the same name: glibc hands back the mapping posix_ipc
         * already has (refcounted), and we post it without a Python call. If the
         * name is gone already, the wake goes through the Python object instead. */
        PyObject *name = PyObject_GetAttr(sem, str_name);
        PyObject *encoded = NULL;
        if (name != NULL && PyUnicode_Check(name) &&
            (encoded = PyUnicode_EncodeFSDefault(name)) != NULL) {
            sem_t *h = sem_open(PyBytes_AS_STRING(encoded), 0);
            if (h != SEM_FAILED)
                self->csem = h;
        }
        Py_XDECREF(encoded);
        Py_XDECREF(name);
        PyErr_Clear();
    }
    if (resume) {
        /* A ring that outlives its writers (a publisher place's inbox): go on from
         * the counters the last one left. */
        self->w = load_acq(self->pin.base, SHMCAST_W_OFF);
        self->rejected = load_acq(self->pin.base, SHMCAST_REJECTED_OFF);
        return 0;
    }
    /* The writer owns these: a fresh ring starts at zero whatever its bytes say. */
    self->w = self->rejected = 0;
    store_rel(self->pin.base, SHMCAST_W_OFF, 0);
    store_rel(self->pin.base, SHMCAST_REJECTED_OFF, 0);
    return 0;
}

static void
writer_close_sem(Writer *self)
{
    if (self->csem != NULL) {
        sem_close(self->csem);
        self->csem = NULL;
    }
}

static void
Writer_dealloc(Writer *self)
{
    self->pin.busy = 0;
    pin_drop(&self->pin);
    writer_close_sem(self);
    Py_XDECREF(self->buf);
    Py_XDECREF(self->sem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* One event into one ring; 1 if drop_new rejected it. */
static inline int
writer_put(Writer *self, const char *head, uint64_t n, const char *tail, uint64_t m)
{
    char *base = self->pin.base;
    uint64_t i = self->w, off;
    au64 *seq;
    if (!self->overwrite) {
        uint64_t r = load_acq(base, SHMCAST_R_OFF);
        /* Python's ints: a reader's r beyond w (garbage) never makes the ring full. */
        if (r <= i && i - r >= self->slots) {
            self->rejected += 1;
            store_rel(base, SHMCAST_REJECTED_OFF, self->rejected);
            return 1;
        }
    }
    off = SHMCAST_RING_HEADER_SIZE + (i % self->slots) * self->stride;
    seq = field(base, off + SHMCAST_SLOT_SEQ_OFF);
    atomic_store_explicit(seq, 2 * i + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    memcpy(base + off + SHMCAST_SLOT_BODY_OFF, head, n);
    if (m)
        memcpy(base + off + SHMCAST_SLOT_BODY_OFF + n, tail, m);
    atomic_store_explicit(seq, 2 * i + 2, memory_order_release);
    self->w = i + 1;
    store_rel(base, SHMCAST_W_OFF, i + 1);
    return 0;
}

/* Post the reader's semaphore if no wake-up is pending there (docs/design.md, "Waking"). */
static int
writer_wake(Writer *self)
{
    PyObject *v;
    long value;
    if (self->csem != NULL) {
        int cvalue;
        if (sem_getvalue(self->csem, &cvalue) == 0 && cvalue > 0)
            return 0;
        if (sem_post(self->csem) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        return 0;
    }
    if (self->sem == Py_None)
        return 0;
    v = PyObject_GetAttr(self->sem, str_value);
    if (v == NULL)
        return -1;
    value = PyLong_AsLong(v);
    Py_DECREF(v);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value == 0) {
        v = PyObject_CallMethodNoArgs(self->sem, str_release);
        if (v == NULL)
            return -1;
        Py_DECREF(v);
    }
    return 0;
}

static int
frame_args(PyObject *head, PyObject *tail, Py_buffer *hb, Py_buffer *tb)
{
    if (PyObject_GetBuffer(head, hb, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(tail, tb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(hb);
        return -1;
    }
    return 0;
}

static int
writer_fits(Writer *self, Py_ssize_t n, Py_ssize_t m)
{
    if (pin_check(&self->pin) < 0)
        return -1;
    if ((uint64_t)n + (uint64_t)m + SHMCAST_SLOT_BODY_OFF > self->stride) {
        PyErr_Format(PyExc_ValueError, "a framed event of %zd bytes does not fit a %llu-byte slot",
                     n + m, (unsigned long long)self->stride);
        return -1;
    }
    return 0;
}

static PyObject *
write_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *seq, **items;
    Py_buffer hb, tb;
    Py_ssize_t count, k;
    int wake = 1;
    (void)module;
    if (nargs < 3 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "write_all(writers, head, tail, wake=True)");
        return NULL;
    }
    if (nargs == 4 && (wake = PyObject_IsTrue(args[3])) < 0)
        return NULL;
    seq = PySequence_Fast(args[0], "writers must be a list of RingWriter");
    if (seq == NULL)
        return NULL;
    if (frame_args(args[1], args[2], &hb, &tb) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    count = PySequence_Fast_GET_SIZE(seq);
    items = PySequence_Fast_ITEMS(seq);
    for (k = 0; k < count; k++) {
        Writer *ring = (Writer *)items[k];
        if (Py_TYPE(ring) != &WriterType) {
            PyErr_Format(PyExc_TypeError, "writers[%zd] is %.100s, not a native RingWriter", k,
                         Py_TYPE(ring)->tp_name);
            goto fail;
        }
        if (writer_fits(ring, hb.len, tb.len) < 0)
            goto fail;
        writer_put(ring, hb.buf, (uint64_t)hb.len, tb.buf, (uint64_t)tb.len);
    }
    PyBuffer_Release(&hb);
    PyBuffer_Release(&tb);
    /* Wake only once every ring has the event: a woken reader may preempt us, and
     * must not delay the others' copies. */
    if (wake) {
        for (k = 0; k < count; k++) {
            if (writer_wake((Writer *)items[k]) < 0) {
                Py_DECREF(seq);
                return NULL;
            }
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&hb);
    PyBuffer_Release(&tb);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
Writer_write(Writer *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer hb, tb;
    int rejected;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write(head, tail)");
        return NULL;
    }
    if (frame_args(args[0], args[1], &hb, &tb) < 0)
        return NULL;
    if (writer_fits(self, hb.len, tb.len) < 0) {
        PyBuffer_Release(&hb);
        PyBuffer_Release(&tb);
        return NULL;
    }
    rejected = writer_put(self, hb.buf, (uint64_t)hb.len, tb.buf, (uint64_t)tb.len);
    PyBuffer_Release(&hb);
    PyBuffer_Release(&tb);
    if (writer_wake(self) < 0)
        return NULL;
    return PyBool_FromLong(!rejected);
}

static PyObject *
Writer_release(Writer *self, PyObject *Py_UNUSED(ignored))
{
    pin_drop(&self->pin);
    writer_close_sem(self);
    Py_RETURN_NONE;
}

static PyObject *
Writer_end(Writer *self, PyObject *arg)
{
    uint64_t reason = PyLong_AsUnsignedLongLong(arg);
    if (reason == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (pin_check(&self->pin) < 0)
        return NULL;
    /* After the last w: a reader that acquires the end mark sees every event before it. */
    store_rel(self->pin.base, SHMCAST_END_OFF, reason);
    Py_RETURN_NONE;
}

static PyObject *
Writer_drops(Writer *self, PyObject *Py_UNUSED(ignored))
{
    char *base = self->pin.base;
    if (pin_check(&self->pin) < 0)
        return NULL;
    return drops_value(self->w, self->rejected, load_acq(base, SHMCAST_R_OFF),
                       load_acq(base, SHMCAST_DELIVERED_OFF), self->slots, self->overwrite);
}

static PyObject *
Writer_get_overwrite(Writer *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->overwrite);
}

static PyObject *
Writer_get_native_wake(Writer *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->csem != NULL);
}

static PyMethodDef Writer_methods[] = {
    {"write", (PyCFunction)(void (*)(void))Writer_write, METH_FASTCALL,
     "Put one framed event in this ring alone; False if it was rejected (drop_new)."},
    {"release", (PyCFunction)Writer_release, METH_NOARGS,
     "Drop our export of the ring so its segment can be unmapped."},
    {"end", (PyCFunction)Writer_end, METH_O,
     "Mark the stream's end after the last event written (the sentinel)."},
    {"drops", (PyCFunction)Writer_drops, METH_NOARGS, "What the reader lost so far."},
    {NULL, NULL, 0, NULL},
};

/* Plain fields are members; the getters are for what needs a conversion. */
_Static_assert(sizeof(uint64_t) == sizeof(unsigned long long), "T_ULONGLONG reads our u64s");
static PyMemberDef Writer_members[] = {
    {"w", T_ULONGLONG, offsetof(Writer, w), READONLY, "Events written so far."},
    {"rejected", T_ULONGLONG, offsetof(Writer, rejected), READONLY, "drop_new drops so far."},
    {"slots", T_ULONGLONG, offsetof(Writer, slots), READONLY, "Slots of the ring."},
    {"stride", T_ULONGLONG, offsetof(Writer, stride), READONLY, "Bytes per slot."},
    {"buf", T_OBJECT, offsetof(Writer, buf), READONLY, "The ring's buffer as given."},
    {"sem", T_OBJECT, offsetof(Writer, sem), READONLY, "The reader's wake semaphore, or None."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Writer_getset[] = {
    {"overwrite", (getter)Writer_get_overwrite, NULL, "Whether a full ring overwrites.", NULL},
    {"native_wake", (getter)Writer_get_native_wake, NULL,
     "Whether the wake is posted from C (our own sem_open handle).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.RingWriter",
    .tp_doc = "The publisher's end of one ring, with the semaphore that wakes its reader.",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Writer_init,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_methods = Writer_methods,
    .tp_members = Writer_members,
    .tp_getset = Writer_getset,
};

/* ------------------------------------------------------------------ RingReader */

/* Most streams carry a handful of event types: their str objects are kept here,
 * found by a compare of the raw bytes (no bytes object, no hash). */
#define TYPE_CACHE 32

typedef struct {
    PyObject_HEAD
    Pin pin;
    PyObject *buf;
    uint64_t slots, slot_size, stride, r, delivered, corrupt;
    int overwrite;
    /* get() and get_many(): the Event class, the codec's loads, and the factory of
     * the error an undecodable event becomes; NULL for a reader that only read()s. */
    PyObject *event, *loads, *undecodable;
    PyObject *type_keys[TYPE_CACHE]; /* bytes */
    PyObject *type_strs[TYPE_CACHE]; /* their str, decoded with "replace" */
    int ntypes, last_type;
} Reader;

static PyTypeObject ReaderType;

static int
Reader_init(Reader *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", "slots", "slot_size", "overwrite", "event", "loads",
                             "undecodable", NULL};
    PyObject *buf, *event = Py_None, *loads = Py_None, *undecodable = Py_None;
    Py_ssize_t slots, slot_size;
    int overwrite;
    uint64_t need;
    if (self->pin.view != NULL || self->buf != NULL) {
        PyErr_SetString(PyExc_TypeError, "RingReader is already initialized");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onnp|$OOO:RingReader", kwlist, &buf, &slots,
                                     &slot_size, &overwrite, &event, &loads, &undecodable))
        return -1;
    if ((event == Py_None) != (loads == Py_None) || (event == Py_None) != (undecodable == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "event, loads and undecodable go together");
        return -1;
    }
    if (event != Py_None) {
        PyTypeObject *tp = (PyTypeObject *)event;
        /* Built as object.__new__(event) with its fields set: a plain class only. */
        if (!PyType_Check(event) || tp->tp_new != PyBaseObject_Type.tp_new ||
            tp->tp_dictoffset == 0) {
            PyErr_SetString(PyExc_TypeError, "event must be a class with a __dict__ and "
                            "object's __new__");
            return -1;
        }
        if (!PyCallable_Check(loads) || !PyCallable_Check(undecodable)) {
            PyErr_SetString(PyExc_TypeError, "loads and undecodable must be callable");
            return -1;
        }
        self->event = Py_NewRef(event);
        self->loads = Py_NewRef(loads);
        self->undecodable = Py_NewRef(undecodable);
    }
    need = ring_bytes(slots, slot_size, &self->stride);
    if (need == 0 || pin_take(&self->pin, buf, need) < 0)
        return -1;
    prefault(self->pin.base, need, 0);
    Py_INCREF(buf);
    self->buf = buf;
    self->slots = (uint64_t)slots;
    self->slot_size = (uint64_t)slot_size;
    self->overwrite = overwrite;
    /* The reader owns these: a fresh ring starts at zero whatever its bytes say. */
    self->r = self->delivered = self->corrupt = 0;
    store_rel(self->pin.base, SHMCAST_R_OFF, 0);
    store_rel(self->pin.base, SHMCAST_DELIVERED_OFF, 0);
    return 0;
}

static void
Reader_dealloc(Reader *self)
{
    int i;
    self->pin.busy = 0;
    pin_drop(&self->pin);
    Py_XDECREF(self->buf);
    Py_XDECREF(self->event);
    Py_XDECREF(self->loads);
    Py_XDECREF(self->undecodable);
    for (i = 0; i < self->ntypes; i++) {
        Py_DECREF(self->type_keys[i]);
        Py_DECREF(self->type_strs[i]);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* One event copied out of its slot and taken. */
typedef struct {
    uint64_t version;
    double timestamp;
    uint16_t lt;
    char type[SHMCAST_MAX_TYPE_BYTES];
    PyObject *data; /* a new reference */
} Taken;

/* One step of the read protocol, over lapped, torn and impossible slots alike
 * (docs/design.md, "Reading"). Without dst, the event taken goes to *out, its data as
 * a new bytes object: 1, or -1 when that object cannot be made (nothing taken). With
 * dst (body_max() bytes: the inbox drain), the event is copied as it lies after its
 * seq (header, type, data) and its length returned. 0: nothing is ready. Inlined into
 * both callers, so neither pays for the other's branch. */
static inline int64_t
ring_take(Reader *self, int have_limit, uint64_t limit, char *dst, Taken *out)
{
    char *base = self->pin.base;
    uint64_t slots = self->slots;
    for (;;) {
        uint64_t w = load_acq(base, SHMCAST_W_OFF), r = self->r, off, want, seq;
        if (have_limit && w > limit)
            w = limit;
        if (r >= w)
            return 0;
        if (w - r > slots) /* lapped: the oldest unread were overwritten */
            r = w - slots;
        off = SHMCAST_RING_HEADER_SIZE + (r % slots) * self->stride;
        if (r > (UINT64_MAX - 2) / 2) {
            /* 2r+2 is past any u64 seq (a garbage w): Python's ints call it garbage too. */
            self->corrupt += 1;
            self->r = r + 1;
            store_rel(base, SHMCAST_R_OFF, r + 1);
            continue;
        }
        want = 2 * r + 2;
        seq = load_acq(base, off + SHMCAST_SLOT_SEQ_OFF);
        if (seq == want) {
            uint16_t lt;
            uint32_t ld;
            memcpy(&lt, base + off + SHMCAST_SLOT_TYPE_LEN_OFF, 2);
            memcpy(&ld, base + off + SHMCAST_SLOT_DATA_LEN_OFF, 4);
            if (lt <= SHMCAST_MAX_TYPE_BYTES && ld <= self->slot_size) {
                uint64_t len = SHMCAST_SLOT_HEADER_SIZE - SHMCAST_SLOT_BODY_OFF + lt + ld;
                PyObject *data = NULL;
                if (dst != NULL) {
                    memcpy(dst, base + off + SHMCAST_SLOT_BODY_OFF, len);
                } else {
                    const char *p = base + off + SHMCAST_SLOT_HEADER_SIZE;
                    memcpy(&out->version, base + off + SHMCAST_SLOT_VERSION_OFF, 8);
                    memcpy(&out->timestamp, base + off + SHMCAST_SLOT_TIMESTAMP_OFF, 8);
                    memcpy(out->type, p, lt);
                    data = PyBytes_FromStringAndSize(p + lt, ld);
                    if (data == NULL)
                        return -1;
                }
                atomic_thread_fence(memory_order_acquire);
                if (atomic_load_explicit(field(base, off), memory_order_relaxed) == want) {
                    /* Taken: say so at once. Until r moves, the writer's count of drops
                     * includes this event if it laps the slot now (docs/design.md,
                     * "Counting drops"), so the window is kept to two stores.
                     * r first: killed between the two, the event counts as lost. */
                    self->r = r + 1;
                    store_rel(base, SHMCAST_R_OFF, r + 1);
                    self->delivered += 1;
                    store_rel(base, SHMCAST_DELIVERED_OFF, self->delivered);
                    if (dst != NULL)
                        return (int64_t)len;
                    out->lt = lt;
                    out->data = data;
                    return 1;
                }
                Py_XDECREF(data);
            } else {
                atomic_thread_fence(memory_order_acquire);
                if (atomic_load_explicit(field(base, off), memory_order_relaxed) == want)
                    self->corrupt += 1; /* impossible lengths in a slot nobody is writing */
            }
        } else if (seq < want) {
            self->corrupt += 1; /* the writer publishes seq before w, so this is garbage */
        }
        /* Lapped mid-copy, or garbage: step over it, which counts it as dropped. */
        self->r = r + 1;
        store_rel(base, SHMCAST_R_OFF, r + 1);
    }
}

/* The next event into *out: 1, 0 if none is ready, -1 with an exception set. */
static int
reader_take(Reader *self, int have_limit, uint64_t limit, Taken *out)
{
    return (int)ring_take(self, have_limit, limit, NULL, out);
}

/* Count *n* events taken but never handed on as dropped (discard()). */
static void
reader_untake(Reader *self, uint64_t n)
{
    self->delivered -= n;
    store_rel(self->pin.base, SHMCAST_DELIVERED_OFF, self->delivered);
}

/* RingReader.read of _ring.py: a new (version, timestamp, type, data) tuple, or
 * NULL with no error set when nothing is ready, or NULL with an error. */
static PyObject *
reader_next(Reader *self, int have_limit, uint64_t limit)
{
    Taken t;
    PyObject *out, *v, *ts, *type_;
    int got = reader_take(self, have_limit, limit, &t);
    if (got <= 0)
        return NULL;
    out = PyTuple_New(4);
    v = out ? PyLong_FromUnsignedLongLong(t.version) : NULL;
    ts = v ? PyFloat_FromDouble(t.timestamp) : NULL;
    type_ = ts ? PyBytes_FromStringAndSize(t.type, t.lt) : NULL;
    if (type_ == NULL) {
        /* Out of memory: the event is lost after all, and counted so. */
        reader_untake(self, 1);
        Py_XDECREF(v);
        Py_XDECREF(ts);
        Py_XDECREF(out);
        Py_DECREF(t.data);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, v);
    PyTuple_SET_ITEM(out, 1, ts);
    PyTuple_SET_ITEM(out, 2, type_);
    PyTuple_SET_ITEM(out, 3, t.data);
    return out;
}

/* The str of an event type (a new reference), from the cache or decoded into it. */
static PyObject *
reader_type(Reader *self, const char *p, uint16_t lt)
{
    int i, n = self->ntypes, k = self->last_type;
    PyObject *str, *key;
    for (i = 0; i < n; i++, k = k + 1 == n ? 0 : k + 1) {
        key = self->type_keys[k];
        if (PyBytes_GET_SIZE(key) == lt && memcmp(PyBytes_AS_STRING(key), p, lt) == 0) {
            self->last_type = k;
            return Py_NewRef(self->type_strs[k]);
        }
    }
    str = PyUnicode_DecodeUTF8(p, lt, "replace");
    if (str == NULL || n == TYPE_CACHE)
        return str; /* past the cache's size: decoded each time, as correct and slower */
    key = PyBytes_FromStringAndSize(p, lt);
    if (key == NULL) {
        Py_DECREF(str);
        return NULL;
    }
    self->type_keys[n] = key;
    self->type_strs[n] = Py_NewRef(str);
    self->last_type = n;
    self->ntypes = n + 1;
    return str;
}

/* event.__new__, then its five fields set as object.__setattr__ would (the frozen
 * dataclass refuses its own): stored straight into the instance's attribute values
 * where the interpreter keeps them inline, no dict built. */
static PyObject *
reader_event(Reader *self, PyObject *type_, PyObject *payload, const Taken *t)
{
    PyTypeObject *tp = (PyTypeObject *)self->event;
    PyObject *v = PyLong_FromUnsignedLongLong(t->version);
    PyObject *ts = v ? PyFloat_FromDouble(t->timestamp) : NULL;
    PyObject *ev = ts ? tp->tp_new(tp, empty_args, NULL) : NULL;
    if (ev != NULL && (PyObject_GenericSetAttr(ev, str_type, type_) < 0 ||
                       PyObject_GenericSetAttr(ev, str_payload, payload) < 0 ||
                       PyObject_GenericSetAttr(ev, str_version, v) < 0 ||
                       PyObject_GenericSetAttr(ev, str_timestamp, ts) < 0 ||
                       PyObject_GenericSetAttr(ev, str_data, t->data) < 0))
        Py_CLEAR(ev);
    Py_XDECREF(v);
    Py_XDECREF(ts);
    return ev;
}

/* The codec's exception (set) as undecodable(version, type, data, exc), with the
 * codec's as its cause (raise ... from exc); the event counts as dropped. NULL if
 * the factory itself failed. */
static PyObject *
reader_undecodable(Reader *self, PyObject *type_, const Taken *t)
{
    PyObject *v, *err = NULL;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *etype, *exc, *tb;
    PyErr_Fetch(&etype, &exc, &tb);
    PyErr_NormalizeException(&etype, &exc, &tb);
    if (tb != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(etype);
    Py_XDECREF(tb);
#endif
    reader_untake(self, 1);
    v = PyLong_FromUnsignedLongLong(t->version);
    if (v != NULL) {
        PyObject *args[4] = {v, type_, t->data, exc};
        err = PyObject_Vectorcall(self->undecodable, args, 4, NULL);
        Py_DECREF(v);
    }
    if (err != NULL && !PyExceptionInstance_Check(err)) {
        PyErr_Format(PyExc_TypeError, "undecodable() returned %.100s, not an exception",
                     Py_TYPE(err)->tp_name);
        Py_CLEAR(err);
    }
    if (err != NULL) {
        PyException_SetCause(err, Py_NewRef(exc));
        PyException_SetContext(err, Py_NewRef(exc));
    }
    Py_XDECREF(exc);
    return err;
}

/* The next event decoded: an Event; or, for one the codec cannot read, the error
 * undecodable() made (*failed set); NULL with no error when nothing is ready; NULL
 * with an error (nothing taken, or the codec raised a BaseException that is not an
 * Exception: it propagates as it would from Python, the event counted delivered). */
static PyObject *
reader_get(Reader *self, int have_limit, uint64_t limit, int *failed)
{
    Taken t;
    PyObject *type_, *payload, *out;
    int got = reader_take(self, have_limit, limit, &t);
    if (got <= 0)
        return NULL;
    type_ = reader_type(self, t.type, t.lt);
    if (type_ == NULL) {
        reader_untake(self, 1);
        Py_DECREF(t.data);
        return NULL;
    }
    payload = PyObject_CallOneArg(self->loads, t.data);
    if (payload == NULL) {
        out = PyErr_ExceptionMatches(PyExc_Exception) ? reader_undecodable(self, type_, &t)
                                                      : NULL;
        *failed = out != NULL;
    } else {
        out = reader_event(self, type_, payload, &t);
        Py_DECREF(payload);
        if (out == NULL)
            reader_untake(self, 1); /* out of memory: lost after all, and counted so */
    }
    Py_DECREF(type_);
    Py_DECREF(t.data);
    return out;
}

/* get() and get_many() call the codec, which may run any Python code: the ring stays
 * mapped meanwhile, and a release() waits for the call's end. */
static int
reader_enter(Reader *self)
{
    if (pin_check(&self->pin) < 0)
        return -1;
    if (self->event == NULL) {
        PyErr_SetString(PyExc_TypeError, "this RingReader was made without event, loads and "
                        "undecodable");
        return -1;
    }
    self->pin.busy += 1;
    return 0;
}

static void
reader_leave(Reader *self)
{
    self->pin.busy -= 1;
    if (self->pin.release_pending && self->pin.busy == 0) {
        self->pin.release_pending = 0;
        pin_drop(&self->pin);
    }
}

static const char *const limit_names[] = {"limit"};
static const char *const many_names[] = {"max", "limit"};

/* read_many()'s and get_many()'s arguments: max, and limit (optional). */
static int
many_args(const char *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
          Py_ssize_t *max, int *have, uint64_t *limit)
{
    PyObject *a[2];
    if (bind_args(fn, args, nargs, kwnames, many_names, 2, a) < 0)
        return -1;
    if (a[0] == NULL) {
        PyErr_Format(PyExc_TypeError, "%s() needs max", fn);
        return -1;
    }
    *max = PyLong_AsSsize_t(a[0]);
    if (*max == -1 && PyErr_Occurred())
        return -1;
    return limit_arg(a[1], have, limit);
}

static PyObject *
Reader_read(Reader *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int have;
    uint64_t limit = 0;
    PyObject *out, *a[1];
    if (bind_args("read", args, nargs, kwnames, limit_names, 1, a) < 0 ||
        limit_arg(a[0], &have, &limit) < 0 || pin_check(&self->pin) < 0)
        return NULL;
    out = reader_next(self, have, limit);
    if (out == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return out;
}

static PyObject *
Reader_read_many(Reader *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int have;
    uint64_t limit = 0;
    Py_ssize_t max, k;
    PyObject *out;
    if (many_args("read_many", args, nargs, kwnames, &max, &have, &limit) < 0 ||
        pin_check(&self->pin) < 0)
        return NULL;
    out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (k = 0; k < max; k++) {
        PyObject *item = reader_next(self, have, limit);
        if (item == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(out);
                return NULL;
            }
            break;
        }
        if (PyList_Append(out, item) < 0) {
            Py_DECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *
Reader_get(Reader *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int have, failed = 0;
    uint64_t limit = 0;
    PyObject *out, *a[1];
    if (bind_args("get", args, nargs, kwnames, limit_names, 1, a) < 0 ||
        limit_arg(a[0], &have, &limit) < 0 || reader_enter(self) < 0)
        return NULL;
    out = reader_get(self, have, limit, &failed);
    reader_leave(self);
    if (failed) {
        /* Raised with the codec's error as its context too, whatever the caller is
         * handling (PyErr_SetObject would put that there). */
        PyObject *cause = PyException_GetCause(out);
        PyErr_SetObject((PyObject *)Py_TYPE(out), out);
        if (cause != NULL)
            PyException_SetContext(out, cause);
        Py_DECREF(out);
        return NULL;
    }
    if (out == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return out;
}

static PyObject *
Reader_get_many(Reader *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int have;
    uint64_t limit = 0;
    Py_ssize_t max, k;
    PyObject *out;
    if (many_args("get_many", args, nargs, kwnames, &max, &have, &limit) < 0 ||
        (out = PyList_New(0)) == NULL)
        return NULL;
    if (reader_enter(self) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    /* A release() asked for by the codec's code ends the batch. */
    for (k = 0; k < max && !self->pin.release_pending; k++) {
        int failed = 0;
        PyObject *item = reader_get(self, have, limit, &failed);
        if (item == NULL)
            break;
        if (PyList_Append(out, item) < 0) {
            Py_DECREF(item);
            if (!failed)
                reader_untake(self, 1);
            break;
        }
        Py_DECREF(item);
    }
    if (PyErr_Occurred()) {
        /* The batch cannot be handed on: its events count as dropped. */
        Py_ssize_t i, events = 0;
        for (i = 0; i < PyList_GET_SIZE(out); i++)
            events += !PyExceptionInstance_Check(PyList_GET_ITEM(out, i));
        if (self->pin.base != NULL)
            reader_untake(self, (uint64_t)events);
        Py_CLEAR(out);
    }
    reader_leave(self);
    return out;
}

static inline double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *
Reader_poll(Reader *self, PyObject *arg)
{
    double seconds = PyFloat_AsDouble(arg), deadline;
    uint64_t r = self->r;
    char *base = self->pin.base;
    int found = 0;
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    if (pin_check(&self->pin) < 0)
        return NULL;
    if (load_acq(base, SHMCAST_W_OFF) != r)
        Py_RETURN_TRUE;
    /* The spin lets other threads run; a release() meanwhile waits for its end. */
    self->pin.busy += 1;
    Py_BEGIN_ALLOW_THREADS
    deadline = monotonic() + seconds;
    do {
        if (load_acq(base, SHMCAST_W_OFF) != r) {
            found = 1;
            break;
        }
    } while (monotonic() < deadline);
    Py_END_ALLOW_THREADS
    reader_leave(self);
    return PyBool_FromLong(found);
}

static PyObject *
Reader_written(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (pin_check(&self->pin) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(load_acq(self->pin.base, SHMCAST_W_OFF));
}

static PyObject *
Reader_ended(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (pin_check(&self->pin) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(load_acq(self->pin.base, SHMCAST_END_OFF) & 0xFFFFFFFFu);
}

static PyObject *
Reader_discard(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (pin_check(&self->pin) < 0)
        return NULL;
    if (self->delivered == 0) {
        PyErr_SetString(PyExc_ValueError, "no delivered event to discard");
        return NULL;
    }
    self->delivered -= 1;
    store_rel(self->pin.base, SHMCAST_DELIVERED_OFF, self->delivered);
    Py_RETURN_NONE;
}

static PyObject *
Reader_unread(Reader *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int have;
    uint64_t limit = 0, w;
    PyObject *a[1];
    if (bind_args("unread", args, nargs, kwnames, limit_names, 1, a) < 0 ||
        limit_arg(a[0], &have, &limit) < 0 || pin_check(&self->pin) < 0)
        return NULL;
    w = load_acq(self->pin.base, SHMCAST_W_OFF);
    if (have && w > limit)
        w = limit;
    return PyBool_FromLong(w > self->r);
}

static PyObject *
Reader_drops(Reader *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int have;
    uint64_t limit = 0, w;
    char *base = self->pin.base;
    PyObject *a[1];
    if (bind_args("drops", args, nargs, kwnames, limit_names, 1, a) < 0 ||
        limit_arg(a[0], &have, &limit) < 0 || pin_check(&self->pin) < 0)
        return NULL;
    w = load_acq(base, SHMCAST_W_OFF);
    if (have && w > limit)
        w = limit;
    return drops_value(w, load_acq(base, SHMCAST_REJECTED_OFF), self->r, self->delivered,
                       self->slots, self->overwrite);
}

static PyObject *
Reader_release(Reader *self, PyObject *Py_UNUSED(ignored))
{
    pin_drop(&self->pin);
    Py_RETURN_NONE;
}

static PyObject *
Reader_get_overwrite(Reader *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->overwrite);
}

static PyMethodDef Reader_methods[] = {
    {"read", (PyCFunction)(void (*)(void))Reader_read, METH_FASTCALL | METH_KEYWORDS,
     "The next event as (version, timestamp, type, data), or None if none is ready."},
    {"read_many", (PyCFunction)(void (*)(void))Reader_read_many, METH_FASTCALL | METH_KEYWORDS,
     "Up to max events that are ready, as a list of read()'s tuples."},
    {"get", (PyCFunction)(void (*)(void))Reader_get, METH_FASTCALL | METH_KEYWORDS,
     "The next event decoded, as an Event; None if none is ready; raises what "
     "undecodable(version, type, data, exc) returns for one the codec cannot read (counted "
     "as dropped)."},
    {"get_many", (PyCFunction)(void (*)(void))Reader_get_many, METH_FASTCALL | METH_KEYWORDS,
     "Up to max events that are ready, decoded: Events, and undecodable()'s errors in "
     "their place for those the codec cannot read."},
    {"poll", (PyCFunction)Reader_poll, METH_O,
     "Watch w for up to seconds without sleeping (GIL released); whether an event arrived."},
    {"written", (PyCFunction)Reader_written, METH_NOARGS, "The writer's count of events written."},
    {"ended", (PyCFunction)Reader_ended, METH_NOARGS, "The end mark (0 while open)."},
    {"discard", (PyCFunction)Reader_discard, METH_NOARGS,
     "Count the event last returned by read() as dropped (it would not decode)."},
    {"unread", (PyCFunction)(void (*)(void))Reader_unread, METH_FASTCALL | METH_KEYWORDS,
     "Whether an event may be ready (cheap: one load)."},
    {"drops", (PyCFunction)(void (*)(void))Reader_drops, METH_FASTCALL | METH_KEYWORDS,
     "What this reader lost so far, counting overwritten events it has not reached yet."},
    {"release", (PyCFunction)Reader_release, METH_NOARGS,
     "Drop our export of the ring so its segment can be unmapped."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Reader_members[] = {
    {"r", T_ULONGLONG, offsetof(Reader, r), READONLY, "Events consumed so far."},
    {"delivered", T_ULONGLONG, offsetof(Reader, delivered), READONLY, "Events delivered so far."},
    {"corrupt", T_ULONGLONG, offsetof(Reader, corrupt), READONLY, "Slots skipped as impossible."},
    {"slots", T_ULONGLONG, offsetof(Reader, slots), READONLY, "Slots of the ring."},
    {"slot_size", T_ULONGLONG, offsetof(Reader, slot_size), READONLY, "Largest payload."},
    {"stride", T_ULONGLONG, offsetof(Reader, stride), READONLY, "Bytes per slot."},
    {"buf", T_OBJECT, offsetof(Reader, buf), READONLY, "The ring's buffer as given."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Reader_getset[] = {
    {"overwrite", (getter)Reader_get_overwrite, NULL, "Whether a full ring overwrites.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcast._native.RingReader",
    .tp_doc = "The subscriber's end of one ring.",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
    .tp_members = Reader_members,
    .tp_getset = Reader_getset,
};

/* ------------------------------------------------------------------ the drain */

/* Bytes of a slot after its seq that the largest event of a reader's ring takes. */
static inline uint64_t
body_max(const Reader *reader)
{
    return SHMCAST_SLOT_HEADER_SIZE - SHMCAST_SLOT_BODY_OFF + SHMCAST_MAX_TYPE_BYTES +
           reader->slot_size;
}

/* forward(reader, writers, version, max, limit, ctrl, epoch): the bus's drain of one
 * inbox without a Python object per event. Up to max ready events of reader (none
 * at ring index limit or beyond, unless limit is None) are each given the next
 * version (version + 1, + 2...), written into every ring of writers as write_all
 * writes (the publisher's type, data and timestamp as they are; the header's pad
 * zeroed, as frame() packs it), and stored as the last version at ctrl's version
 * field, one event at a time. It stops before an event when ctrl's registry epoch
 * is no longer epoch (the caller rescans and calls again: a subscriber that
 * activated meanwhile gets every later version). It wakes nobody (wake_all does,
 * once per batch). Returns how many events it forwarded. */
static PyObject *
forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Reader *reader;
    PyObject *seq, **items;
    Py_buffer cb;
    Py_ssize_t count, k;
    uint64_t version, epoch, limit = 0, done = 0;
    long long max;
    int have;
    char *scratch = NULL, *ctrl;
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "forward(reader, writers, version, max, limit, ctrl, epoch)");
        return NULL;
    }
    reader = (Reader *)args[0];
    if (Py_TYPE(reader) != &ReaderType) {
        PyErr_Format(PyExc_TypeError, "reader is %.100s, not a native RingReader",
                     Py_TYPE(reader)->tp_name);
        return NULL;
    }
    version = PyLong_AsUnsignedLongLong(args[2]);
    if (version == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    max = PyLong_AsLongLong(args[3]);
    if (max == -1 && PyErr_Occurred())
        return NULL;
    epoch = PyLong_AsUnsignedLongLong(args[6]);
    if ((epoch == (uint64_t)-1 && PyErr_Occurred()) || limit_arg(args[4], &have, &limit) < 0 ||
        pin_check(&reader->pin) < 0)
        return NULL;
    seq = PySequence_Fast(args[1], "writers must be a list of RingWriter");
    if (seq == NULL)
        return NULL;
    if (PyObject_GetBuffer(args[5], &cb, PyBUF_WRITABLE) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    count = PySequence_Fast_GET_SIZE(seq);
    items = PySequence_Fast_ITEMS(seq);
    /* Every check before the first event: an error must leave no event half-forwarded. */
    if ((uint64_t)cb.len < SHMCAST_CTRL_EPOCH_OFF + 8 ||
        (uint64_t)cb.len < SHMCAST_CTRL_VERSION_OFF + 8 || ((uintptr_t)cb.buf & 7) != 0) {
        PyErr_SetString(PyExc_ValueError, "ctrl is not an 8-byte aligned control header");
        goto done;
    }
    for (k = 0; k < count; k++) {
        Writer *ring = (Writer *)items[k];
        if (Py_TYPE(ring) != &WriterType) {
            PyErr_Format(PyExc_TypeError, "writers[%zd] is %.100s, not a native RingWriter", k,
                         Py_TYPE(ring)->tp_name);
            goto done;
        }
        if (writer_fits(ring, (Py_ssize_t)body_max(reader), 0) < 0)
            goto done;
    }
    if (max <= 0)
        goto done;
    scratch = PyMem_Malloc(body_max(reader));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    ctrl = cb.buf;
    while (done < (uint64_t)max) {
        uint64_t len;
        if (load_acq(ctrl, SHMCAST_CTRL_EPOCH_OFF) != epoch)
            break;
        len = (uint64_t)ring_take(reader, have, limit, scratch, NULL);
        if (len == 0)
            break;
        version += 1;
        memcpy(scratch + SHMCAST_SLOT_VERSION_OFF - SHMCAST_SLOT_BODY_OFF, &version, 8);
        memset(scratch + SHMCAST_SLOT_TYPE_LEN_OFF - SHMCAST_SLOT_BODY_OFF + 2, 0,
               SHMCAST_SLOT_DATA_LEN_OFF - SHMCAST_SLOT_TYPE_LEN_OFF - 2);
        for (k = 0; k < count; k++)
            writer_put((Writer *)items[k], scratch, len, NULL, 0);
        store_rel(ctrl, SHMCAST_CTRL_VERSION_OFF, version);
        done += 1;
    }
done:
    PyMem_Free(scratch);
    PyBuffer_Release(&cb);
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(done);
}

/* wake_all(writers): write_all's wake-up alone, for what forward() wrote. */
static PyObject *
wake_all(PyObject *module, PyObject *writers)
{
    PyObject *seq = PySequence_Fast(writers, "writers must be a list of RingWriter");
    Py_ssize_t count, k;
    (void)module;
    if (seq == NULL)
        return NULL;
    count = PySequence_Fast_GET_SIZE(seq);
    for (k = 0; k < count; k++) {
        Writer *ring = (Writer *)PySequence_Fast_GET_ITEM(seq, k);
        if (Py_TYPE(ring) != &WriterType) {
            PyErr_Format(PyExc_TypeError, "writers[%zd] is %.100s, not a native RingWriter", k,
                         Py_TYPE(ring)->tp_name);
            Py_DECREF(seq);
            return NULL;
        }
        if (pin_check(&ring->pin) < 0 || writer_wake(ring) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ the module */

static PyObject *
slot_stride(PyObject *module, PyObject *arg)
{
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    (void)module;
    if (size == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(SHMCAST_SLOT_STRIDE(size));
}

static PyMethodDef module_methods[] = {
    {"write_all", (PyCFunction)(void (*)(void))write_all, METH_FASTCALL,
     "write_all(writers, head, tail, wake=True): write one framed event into every ring, "
     "then post each reader's semaphore whose value is 0 (unless wake is false)."},
    {"slot_stride", slot_stride, METH_O, "Bytes one slot takes, as the C code computes it."},
    {"forward", (PyCFunction)(void (*)(void))forward, METH_FASTCALL,
     "forward(reader, writers, version, max, limit, ctrl, epoch): give up to max ready "
     "events of an inbox the next versions and write them into every ring; how many."},
    {"wake_all", wake_all, METH_O,
     "wake_all(writers): post each reader's semaphore whose value is 0."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *m)
{
    PyObject *layout;
    if (str_value == NULL) {
        str_value = PyUnicode_InternFromString("value");
        str_release = PyUnicode_InternFromString("release");
        str_name = PyUnicode_InternFromString("name");
        str_type = PyUnicode_InternFromString("type");
        str_payload = PyUnicode_InternFromString("payload");
        str_version = PyUnicode_InternFromString("version");
        str_timestamp = PyUnicode_InternFromString("timestamp");
        str_data = PyUnicode_InternFromString("_data");
        if (str_value == NULL || str_release == NULL || str_name == NULL || str_type == NULL ||
            str_payload == NULL || str_version == NULL || str_timestamp == NULL ||
            str_data == NULL)
            return -1;
        empty_args = PyTuple_New(0);
        if (empty_args == NULL)
            return -1;
    }
    if (PyType_Ready(&WriterType) < 0 || PyType_Ready(&ReaderType) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "RingWriter", (PyObject *)&WriterType) < 0 ||
        PyModule_AddObjectRef(m, "RingReader", (PyObject *)&ReaderType) < 0)
        return -1;
    layout = PyDict_New();
    if (layout == NULL)
        return -1;
#define ADD_FIELD(name)                                                                       \
    {                                                                                         \
        PyObject *v = PyLong_FromUnsignedLongLong(SHMCAST_##name);                            \
        if (v == NULL || PyDict_SetItemString(layout, #name, v) < 0) {                        \
            Py_XDECREF(v);                                                                    \
            Py_DECREF(layout);                                                                \
            return -1;                                                                        \
        }                                                                                     \
        Py_DECREF(v);                                                                         \
    }
    SHMCAST_LAYOUT_FIELDS(ADD_FIELD)
#undef ADD_FIELD
    if (PyModule_AddObjectRef(m, "LAYOUT", layout) < 0) {
        Py_DECREF(layout);
        return -1;
    }
    Py_DECREF(layout);
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters
    /* Static types and module-level interned strings: one interpreter only. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    /* Each ring end keeps plain counters that two threads could race on. */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmcast._native",
    .m_doc = "The ring's hot paths in C, bit-compatible with shmcast._ring.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&module_def);
}
