/* fdchannel._speedups: the compiled fast path of Channel.send, Channel.recv
 * and Channel.send_many.
 *
 * It covers the common case of the default transport (UnixRights without
 * acknowledgements, on Linux): one sendmsg of a whole frame with at most
 * SCM_MAX_FD fds and nothing queued, one sendmsg of a send_many() call
 * that fits one group, and one recvmsg that is exactly one plain data
 * frame or several whole ones (a group, queued in the decoder).  Every
 * check the Python path makes is made here first; anything unusual
 * returns "not handled" (False or None) *before* any state changed, or
 * hands what was already read or written to the Python helpers of
 * fdchannel._fastpath, which leave the channel as the Python path would.
 * The channel's own locks (threading.Lock objects) guard both paths alike.
 * The GIL is released around each system call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
/* The interpreter frame's link to its caller (record_for's walk of the live
 * frames): CPython's internal header, as greenlet includes it. */
#define Py_BUILD_CORE 1
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#endif

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/syscall.h>
/* membarrier's commands, the kernel's ABI: not from <linux/membarrier.h>,
 * which kernel headers before 4.14 lack or hold without these two. */
#define FDC_MEMBARRIER_PRIVATE_EXPEDITED (1 << 3)
#define FDC_MEMBARRIER_REGISTER_PRIVATE_EXPEDITED (1 << 4)
#endif

#define HEADER_SIZE 24
/* The decoder's read buffer while idle (fdchannel._codec.FIRST_BUFFER). */
#define FIRST_BUFFER (16 * 1024)
#define SCM_MAX_FD 253
#define FD_MAX 0x7fffffffL
#define GROUP_BIT (4ULL << 48) /* FLAG_GROUP in the header's first 8 bytes */

/* Set by setup(): the Message class and the offsets of its slots, and the
 * Python helpers that finish what this module hands over. */
static PyTypeObject *message_type;
static PyTypeObject *frame_type; /* fdchannel._codec.Frame, and its slots' offsets */
static Py_ssize_t off_f_control, off_f_aux, off_f_payload, off_f_fds, off_f_shared, off_f_nfds, off_f_start;
static Py_ssize_t off_payload, off_fds, off_raw;
static PyObject *send_rest, *send_interrupted, *recv_rest, *send_many_rest;
static PyObject *empty_tuple, *empty_bytes;

static PyObject *s_closed, *s_broken, *s_outbox, *s_pending, *s_send_lock, *s_recv_lock, *s_acquire,
    *s_release, *s_max_payload, *s_max_fds, *s_decoder, *s_frames, *s_error, *s_eof, *s_lone, *s_end,
    *s_big, *s_fds, *s_buf, *s_received, *s_drop_held, *s_push_back, *s_fileno,
    *s_popleft, *s_appendleft, *s_suspect, *s_unclaimed, *s_share_above,
    *s_delivering, *s_landed, *s_recv_interrupted, *s_ahead, *s_fast, *s_recv, *s_watch, *s_evicted,
    *s_max_held_fds, *s_extend, *s_messages_taken;

typedef struct {
    PyObject_HEAD
    int fd;                       /* the channel's socket */
    unsigned long long tag;       /* the header's first 8 bytes of a data frame */
    int send_flags;               /* MSG_NOSIGNAL */
    int blocking;                 /* the socket is in blocking mode (Channel.settimeout(None)) */
    Py_ssize_t fast_max_fds;      /* what a lone frame may carry (the decoder's bounds) */
    Py_ssize_t fast_max_payload;
    /* What the last call handed out, for Channel.send/recv to account for
     * when a signal handler raises as the call returns (CPython runs
     * handlers right after a C call): the bytes of a message that left
     * whole (else -1), the Message returned (Channel.recv clears it). */
    /* The channel's state as last read from its instance dict, so that a
     * call whose dict is unchanged (same version: PEP 509) reads none of it
     * again.  The pointers are borrowed from that dict: they are valid only
     * while its version is chan_version (a changed entry changes it). */
    PyObject *chan_dict;
    unsigned long long chan_version;
    unsigned int type_version; /* the class's, for class-level defaults (_unclaimed, _share_above) */
    int chan_ok;               /* OK_SEND | OK_RECV as last checked */
    long long max_payload, max_fds;
    PyObject *send_lock, *recv_lock, *outbox, *decoder;
    /* The decoder's, likewise (borrowed from its dict while dec_version holds). */
    PyObject *dec_dict;
    unsigned long long dec_version;
    PyObject *frames, *dec_fds, *landed, *buf;
    long long received;
    PyObject *received_obj; /* the int object of _received (borrowed likewise) */
} FastPath;

/* What a compiled call left for the Python frame that made it, read there
 * (Channel.send/send_many/recv) when the call ends in an exception: a signal
 * handler's error as the call returned.  Per thread, because another thread's
 * call on the same channel may run (the GIL is free at the signal check)
 * before that frame reads it; and per calling frame, because the handler
 * runs at that very point and may itself send or receive on a compiled
 * channel, from frames of its own, before it raises.  A few slots a thread:
 * calls nest only as deep as handlers run inside handlers. */
#define RECORDS 8
typedef struct {
    const void *frame;     /* the calling frame's address: a key, never read through (NULL: a free slot) */
    Py_ssize_t sent_whole; /* bytes of the message send() sent whole, else -1 */
    Py_ssize_t sent_many;  /* messages send_many() sent (or left pending), else -1 */
    PyObject *delivered;   /* the Message recv() returned, until Channel.recv forgets it */
} Record;
static _Thread_local Record tl_records[RECORDS];
static _Thread_local unsigned tl_last;  /* the slot found last: a loop's calls come from one frame */
static _Thread_local unsigned tl_evict; /* the slot a new frame takes (round robin) */

/* The Python frame this C code was called from, as a key (NULL if none).
 * CPython 3.11 and 3.12 keep it in the thread state (cpython/pystate.h);
 * elsewhere the frame object, which lives as long as its frame. */
static inline const void *calling_frame(void) {
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
    return PyThreadState_GET()->cframe->current_frame;
#else
    return PyEval_GetFrame();
#endif
}

/* The record of *frame*, or NULL if it has none. */
static inline Record *record_of(const void *frame) {
    Record *r = &tl_records[tl_last];
    if (r->frame == frame)
        return frame != NULL ? r : NULL;
    if (frame == NULL)
        return NULL;
    for (unsigned i = 0; i < RECORDS; i++)
        if (tl_records[i].frame == frame) {
            tl_last = i;
            return &tl_records[i];
        }
    return NULL;
}

/* Which slots' frames are still running in this thread (bit i: slot i):
 * their calls may yet read their records. */
static unsigned live_slots(void) {
    unsigned live = 0;
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
    for (_PyInterpreterFrame *f = PyThreadState_GET()->cframe->current_frame; f != NULL; f = f->previous)
        for (unsigned i = 0; i < RECORDS; i++)
            if (tl_records[i].frame == (const void *)f)
                live |= 1u << i;
#else
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    while (f != NULL) {
        for (unsigned i = 0; i < RECORDS; i++)
            if (tl_records[i].frame == (const void *)f)
                live |= 1u << i;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
#endif
    return live;
}

/* The record of *frame*, made (blank) if it has none; NULL for no frame.
 * *drop*: a message the slot held for an earlier frame, for the caller to
 * release once it is done with the record (releasing it may run code that
 * makes calls of its own). */
static Record *record_for(const void *frame, PyObject **drop) {
    Record *r = record_of(frame);
    if (r != NULL || frame == NULL)
        return r;
    /* A slot of a frame that has returned, first: a frame still running
     * (the one a signal handler interrupted, below the handler's own calls)
     * may yet read its record.  Only with every slot live (calls nested
     * deeper than RECORDS) does one go round robin. */
    unsigned live = live_slots(), i = tl_evict;
    for (unsigned n = 0; n < RECORDS; n++) {
        unsigned j = (tl_evict + n) % RECORDS;
        if (!(live & (1u << j))) {
            i = j;
            break;
        }
    }
    tl_evict = (i + 1) % RECORDS;
    tl_last = i;
    r = &tl_records[i];
    *drop = r->delivered;
    r->frame = frame;
    r->sent_whole = -1;
    r->sent_many = -1;
    r->delivered = NULL;
    return r;
}

/* Releases what record_for dropped, keeping a pending exception. */
static void release_dropped(PyObject *drop) {
    if (drop == NULL)
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Py_DECREF(drop);
    PyErr_Restore(type, value, tb);
}

static PyTypeObject FastPath_Type;

#define OK_SEND 1
#define OK_RECV 2

/* -- small helpers ------------------------------------------------------------ */

/* obj's instance dict, borrowed, or NULL without an error when it has none.
 * The channel's and the decoder's state are plain instance attributes. */
#if defined(Py_TPFLAGS_MANAGED_DICT) && PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
/* CPython 3.11 keeps an instance's attributes as inline values until its
 * dict is asked for, in the word four pointers before the object (NULL once
 * the dict is made: Include/internal/pycore_object.h).  setup() checks that
 * layout on a probe object and sets this only if it holds. */
static int values_layout_ok = 0;
#define VALUES_OF(obj) (((void **)(obj))[-4])
#define MANAGED_DICT_OF(obj) (((PyObject **)(obj))[-3])
#endif
/* CPython 3.11's int layout (a digit array of PyLong_SHIFT == 30 bits,
 * Py_SIZE digits): add_received_fast may change the decoder's stream offset
 * in place (see there). */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
#define IN_PLACE_INTS 1
#endif

static PyObject *dict_made(PyObject *obj);

/* Inline: a dict made already is the common case (seven reads a message). */
static inline PyObject *dict_of(PyObject *obj) {
#ifdef VALUES_OF
    if (values_layout_ok && PyType_HasFeature(Py_TYPE(obj), Py_TPFLAGS_MANAGED_DICT) && VALUES_OF(obj) == NULL)
        return MANAGED_DICT_OF(obj); /* made already: nothing to allocate */
#endif
    return dict_made(obj);
}

static PyObject *dict_made(PyObject *obj) {
    PyObject **dp;
#ifdef Py_TPFLAGS_MANAGED_DICT
    if (PyType_HasFeature(Py_TYPE(obj), Py_TPFLAGS_MANAGED_DICT)) {
        /* The first call makes the dict from the object's inline values, and
         * that allocation may collect.  A finalizer that then reads the same
         * object's __dict__ makes a second dict over the same values, and both
         * later free them (CPython 3.11: a crash at a later collection).  So
         * no collection runs while it is made. */
        int was = PyGC_Disable();
        dp = _PyObject_GetDictPtr(obj);
        if (was)
            PyGC_Enable();
    } else
#endif
        dp = _PyObject_GetDictPtr(obj);
    return dp != NULL ? *dp : NULL;
}

#ifdef VALUES_OF
/* Whether VALUES_OF and MANAGED_DICT_OF read this interpreter right: on a
 * plain class's instance, values before its dict is made, then none, and the
 * dict where _PyObject_GetDictPtr says. */
static void check_values_layout(void) {
    PyObject *probe = NULL, *ns = PyDict_New();
    PyObject *cls = ns ? PyObject_CallFunction((PyObject *)&PyType_Type, "s()O", "_probe", ns) : NULL;
    if (cls != NULL && PyType_HasFeature((PyTypeObject *)cls, Py_TPFLAGS_MANAGED_DICT))
        probe = PyObject_CallNoArgs(cls);
    if (probe != NULL && PyObject_SetAttrString(probe, "x", Py_None) == 0 && VALUES_OF(probe) != NULL &&
        MANAGED_DICT_OF(probe) == NULL) {
        int was = PyGC_Disable();
        PyObject **dp = _PyObject_GetDictPtr(probe);
        if (was)
            PyGC_Enable();
        values_layout_ok = dp != NULL && *dp != NULL && VALUES_OF(probe) == NULL && MANAGED_DICT_OF(probe) == *dp;
    }
    PyErr_Clear();
    Py_XDECREF(probe);
    Py_XDECREF(cls);
    Py_XDECREF(ns);
}
#endif

/* Nothing is cached across a release of the GIL any more: each check below
 * compares dict versions instead (see FastPath). */
static void forget_dicts(void) {}

/* getattr(obj, name), new reference: the instance's own dict first (the
 * channel's and decoder's state are plain instance attributes), so the
 * common case is one dict lookup; anything else the generic way. */
static PyObject *lookup(PyObject *obj, PyObject *name) {
    PyObject *dict = dict_of(obj);
    if (dict == NULL)
        return PyObject_GetAttr(obj, name);
    PyObject *v = PyDict_GetItemWithError(dict, name);
    if (v != NULL) {
        Py_INCREF(v);
        return v;
    }
    if (PyErr_Occurred())
        return NULL;
    return PyObject_GetAttr(obj, name);
}

/* setattr(obj, name, value) into the instance's dict, as plain assignment does. */
static int store(PyObject *obj, PyObject *name, PyObject *value) {
    PyObject *dict = dict_of(obj);
    if (dict == NULL)
        return PyObject_SetAttr(obj, name, value);
    return PyDict_SetItem(dict, name, value);
}

/* 1 if getattr(obj, name) is true, 0 if false, -1 on error. */
static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = lookup(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* 1 if getattr(obj, name) is None, 0 if not, -1 on error. */
static int attr_none(PyObject *obj, PyObject *name) {
    PyObject *v = lookup(obj, name);
    if (v == NULL)
        return -1;
    int r = v == Py_None;
    Py_DECREF(v);
    return r;
}

/* len(getattr(obj, name)), -1 on error. */
static Py_ssize_t attr_len(PyObject *obj, PyObject *name) {
    PyObject *v = lookup(obj, name);
    if (v == NULL)
        return -1;
    Py_ssize_t n = PyObject_Length(v);
    Py_DECREF(v);
    return n;
}


/* threading.Lock's object in CPython 3.11 and 3.12 (Modules/_threadmodule.c).
 * Its acquire() parses keyword arguments on every call, which costs more
 * than the rest of a send: where the type is the one this layout
 * describes (checked in setup(): name and size), the lock is taken as its
 * own methods take it, with the GIL held.  Elsewhere, the methods. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#define DIRECT_LOCKS 1
typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock_lock;
    PyObject *in_weakreflist;
    char locked;
} lockobject;
#endif
static PyTypeObject *lock_type; /* set when the layout matches */
#if defined(DIRECT_LOCKS) && defined(__linux__)
#include <semaphore.h>
/* Set when sys.thread_info.lock is "semaphore": a lock's lock_lock is then
 * a sem_t (thread_pthread.h, USE_SEMAPHORES), taken at once with
 * sem_trywait.  PyThread_acquire_lock_timed(lock, 0, 0) reads the clock to
 * compute a deadline even for a zero timeout: about 150 instructions a
 * call, a call per send and per recv. */
static int sem_locks = 0;
#endif

/* Take *lock* (a threading.Lock, a new reference that *out* keeps on
 * success) if it is free at once: 1 taken, 0 busy, -1 error.  *direct* says
 * whether it was taken without running any Python code (no other thread
 * can have run meanwhile). */
static int try_lock(PyObject *lock, PyObject **out, int *direct) {
#ifdef DIRECT_LOCKS
    if (Py_TYPE(lock) == lock_type) {
        lockobject *l = (lockobject *)lock;
        int taken;
#ifdef __linux__
        if (sem_locks) {
            /* EINTR: taken as busy, as the Python path's acquire(False)
             * never retries either; the caller then takes that path. */
            taken = sem_trywait((sem_t *)l->lock_lock) == 0;
        } else
#endif
            taken = PyThread_acquire_lock_timed(l->lock_lock, 0, 0) == PY_LOCK_ACQUIRED;
        if (!taken) {
            Py_DECREF(lock);
            return 0;
        }
        l->locked = 1;
        *out = lock;
        *direct = 1;
        return 1;
    }
#endif
    *direct = 0;
    PyObject *r = PyObject_CallMethodOneArg(lock, s_acquire, Py_False);
    if (r == NULL) {
        Py_DECREF(lock);
        return -1;
    }
    int got = r == Py_True;
    Py_DECREF(r);
    if (!got) {
        Py_DECREF(lock);
        return 0;
    }
    *out = lock;
    return 1;
}

/* -- the channel's state, read once per change ------------------------------------
 *
 * A channel's flags (_closed, _broken, _suspect, ...) change rarely and
 * only by assignment to its instance dict, which changes the dict's
 * version tag (PEP 509; deprecated in 3.12, still maintained up to 3.13).
 * So the state is read in full only when the version moved since the last
 * read; reading a dozen attributes on every call cost more than the
 * system call's own user-space work. */

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
#define HAVE_VERSIONS 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
static inline unsigned long long dict_version(PyObject *d) { return ((PyDictObject *)d)->ma_version_tag; }
#pragma GCC diagnostic pop
#else
static inline unsigned long long dict_version(PyObject *d) {
    (void)d;
    return 0;
}
#endif

static PyTypeObject *channel_type; /* fdchannel.Channel: its instances' state is cached, a subclass's is not */
static PyTypeObject *deque_type;
static PyTypeObject *outbox_type; /* the type off_pending was read from */
static Py_ssize_t off_pending = -1;

static Py_ssize_t slot_offset(PyObject *cls, const char *name);

/* 1 if the value is true, 0 if false, -1 on error; *v* is a new reference (consumed). */
static int truth(PyObject *v) {
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* Read the channel's state afresh into fp: OK_SEND | OK_RECV, or -1 on error. */
static int chan_recheck(FastPath *fp, PyObject *ch, PyObject *d) {
    fp->chan_dict = NULL;
    fp->chan_ok = 0;
    if (d == NULL)
        return 0;
    unsigned long long v0 = dict_version(d);
    PyObject *sl = PyDict_GetItemWithError(d, s_send_lock);
    PyObject *rl = sl ? PyDict_GetItemWithError(d, s_recv_lock) : NULL;
    PyObject *ob = rl ? PyDict_GetItemWithError(d, s_outbox) : NULL;
    PyObject *dec = ob ? PyDict_GetItemWithError(d, s_decoder) : NULL;
    PyObject *mp = dec ? PyDict_GetItemWithError(d, s_max_payload) : NULL;
    PyObject *mf = mp ? PyDict_GetItemWithError(d, s_max_fds) : NULL;
    if (mf == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyLong_CheckExact(mp) || !PyLong_CheckExact(mf))
        return 0;
    long long max_payload = PyLong_AsLongLong(mp), max_fds = PyLong_AsLongLong(mf);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    /* Class-level defaults (_unclaimed, _share_above) are read the generic way. */
    int closed = truth(lookup(ch, s_closed));
    int broken = 1;
    if (closed == 0) {
        PyObject *bv = lookup(ch, s_broken);
        broken = bv == NULL ? -1 : bv != Py_None;
        Py_XDECREF(bv);
    }
    int unclaimed = broken == 0 ? truth(lookup(ch, s_unclaimed)) : 1;
    int ok = 0;
    if (closed < 0 || broken < 0 || unclaimed < 0)
        return -1;
    if (!closed && !broken && !unclaimed) {
        int suspect = truth(lookup(ch, s_suspect));
        PyObject *share = lookup(ch, s_share_above);
        int delivering = truth(lookup(ch, s_delivering));
        if (suspect < 0 || share == NULL || delivering < 0) {
            Py_XDECREF(share);
            return -1;
        }
        /* The lookups above may run code: use ob only if the dict still holds it. */
        PyObject *still = PyDict_GetItemWithError(d, s_outbox);
        if (still != ob) {
            Py_DECREF(share);
            return PyErr_Occurred() ? -1 : 0;
        }
        if (!suspect && share == Py_None) {
            if (Py_TYPE(ob) != outbox_type) {
                Py_ssize_t off = slot_offset((PyObject *)Py_TYPE(ob), "pending");
                if (off < 0)
                    PyErr_Clear();
                else {
                    outbox_type = Py_TYPE(ob); /* a static type or the module's class: it stays alive */
                    off_pending = off;
                }
            }
            if (Py_TYPE(ob) == outbox_type)
                ok |= OK_SEND;
        }
        Py_DECREF(share);
        if (!delivering)
            ok |= OK_RECV;
    }
    if (dict_version(d) != v0)
        return 0; /* changed while being read: this call goes the Python way */
    /* Without version tags (other CPythons), each kept pointer is checked instead. */
    if (PyDict_GetItemWithError(d, s_send_lock) != sl || PyDict_GetItemWithError(d, s_recv_lock) != rl ||
        PyDict_GetItemWithError(d, s_outbox) != ob || PyDict_GetItemWithError(d, s_decoder) != dec)
        return PyErr_Occurred() ? -1 : 0;
    fp->max_payload = max_payload;
    fp->max_fds = max_fds;
    fp->send_lock = sl;
    fp->recv_lock = rl;
    fp->outbox = ob;
    fp->decoder = dec;
    fp->chan_ok = ok;
#ifdef HAVE_VERSIONS
    PyTypeObject *tp = Py_TYPE(ch);
    if (tp == channel_type && PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG) && tp->tp_version_tag != 0) {
        fp->chan_dict = d;
        fp->chan_version = v0;
        fp->type_version = tp->tp_version_tag;
    }
#endif
    fp->dec_dict = NULL;
    return ok;
}

/* The channel's state (OK_SEND | OK_RECV), read again only if it may have changed. */
static inline int chan_check(FastPath *fp, PyObject *ch) {
    PyObject *d = dict_of(ch);
#ifdef HAVE_VERSIONS
    if (d != NULL && d == fp->chan_dict && dict_version(d) == fp->chan_version &&
        Py_TYPE(ch)->tp_version_tag == fp->type_version)
        return fp->chan_ok;
#endif
    return chan_recheck(fp, ch, d);
}

/* Read the decoder's state afresh: 1 when it is as the lone-frame path
 * needs it (no error, no EOF, lone frames on, nothing buffered, no group
 * pending), 0 when not, -1 on error.  fp->decoder must be fresh. */
static int dec_recheck(FastPath *fp, PyObject *d) {
    fp->dec_dict = NULL;
    if (d == NULL)
        return 0;
    unsigned long long v0 = dict_version(d);
    PyObject *v[10];
    PyObject *names[10] = {s_error, s_eof, s_lone, s_end, s_big, s_ahead, s_frames, s_fds, s_buf, s_received};
    for (int i = 0; i < 10; i++) {
        v[i] = PyDict_GetItemWithError(d, names[i]);
        if (v[i] == NULL)
            return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *landed = PyDict_GetItemWithError(d, s_landed);
    if (landed == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (v[0] != Py_None || v[1] != Py_False || v[2] != Py_True || !PyLong_CheckExact(v[3]) || PyLong_AsLong(v[3]) != 0 ||
        v[4] != Py_None || v[5] != Py_False || Py_TYPE(v[6]) != deque_type || Py_TYPE(v[7]) != deque_type ||
        !PyByteArray_CheckExact(v[8]) || !PyLong_CheckExact(v[9]) || !PyList_CheckExact(landed))
        return PyErr_Occurred() ? -1 : 0;
    long long received = PyLong_AsLongLong(v[9]);
    if (received == -1 && PyErr_Occurred())
        return -1;
    if (dict_version(d) != v0)
        return 0;
    fp->frames = v[6];
    fp->dec_fds = v[7];
    fp->buf = v[8];
    fp->landed = landed;
    fp->received = received;
    fp->received_obj = v[9];
#ifdef HAVE_VERSIONS
    fp->dec_dict = d;
    fp->dec_version = v0;
#endif
    return 1;
}

static inline int dec_check(FastPath *fp) {
    PyObject *d = dict_of(fp->decoder);
#ifdef HAVE_VERSIONS
    if (d != NULL && d == fp->dec_dict && dict_version(d) == fp->dec_version)
        return 1;
#endif
    return dec_recheck(fp, d);
}

/* Release *lock* and drop our reference; an exception already set stays
 * the one raised.  Then, as the Python path's `finally`, drop what the
 * channel holds if another thread closed it meanwhile.  Returns -1 when a
 * new error was raised here and none was set before. */
static int leave(FastPath *fp, PyObject *channel, PyObject *lock) {
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (PyErr_Occurred())
        PyErr_Fetch(&type, &value, &tb);
    int failed = 0;
    PyObject *r = NULL;
#ifdef DIRECT_LOCKS
    if (Py_TYPE(lock) == lock_type) {
        lockobject *l = (lockobject *)lock;
        l->locked = 0;
#ifdef __linux__
        if (sem_locks)
            sem_post((sem_t *)l->lock_lock); /* (PyThread_release_lock's own call, less its checks) */
        else
#endif
            PyThread_release_lock(l->lock_lock);
        Py_DECREF(lock);
    } else
#endif
    {
        r = PyObject_CallMethodNoArgs(lock, s_release);
        Py_DECREF(lock);
        if (r == NULL)
            failed = 1;
        else
            Py_DECREF(r);
    }
    if (!failed) {
        /* Unchanged state: not closed (a closed channel is never OK). */
        int ok = 0;
#ifdef HAVE_VERSIONS
        PyObject *d = dict_of(channel);
        ok = d != NULL && d == fp->chan_dict && dict_version(d) == fp->chan_version && fp->chan_ok;
#endif
        int closed = ok ? 0 : attr_true(channel, s_closed);
        if (closed < 0)
            failed = 1;
        else if (closed) {
            r = PyObject_CallMethodNoArgs(channel, s_drop_held);
            if (r == NULL)
                failed = 1;
            else
                Py_DECREF(r);
        }
    }
    if (type != NULL) {
        if (failed)
            PyErr_Clear();
        PyErr_Restore(type, value, tb);
        return 0;
    }
    return failed ? -1 : 0;
}

/* An exception that means "let the Python path do it" (it raises the clear
 * error itself): anything but BaseException-only ones such as
 * KeyboardInterrupt, which must not be swallowed. */
static int clear_if_ordinary(void) {
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        return 1;
    }
    return 0;
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
static inline void put_le(unsigned char *p, unsigned long long v, int n) { memcpy(p, &v, (size_t)n); }
static inline unsigned long long get_le(const unsigned char *p, int n) {
    unsigned long long v = 0;
    memcpy(&v, p, (size_t)n);
    return v;
}
#else
static void put_le(unsigned char *p, unsigned long long v, int n) {
    for (int i = 0; i < n; i++) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

static unsigned long long get_le(const unsigned char *p, int n) {
    unsigned long long v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}
#endif

/* -- the GIL around system calls ------------------------------------------------ */

/* 1 when no other thread could take the GIL while this one is in a system
 * call: this thread's is the only thread state of the only interpreter (one
 * being started by threading counts: its state is made before it runs).
 * Releasing the GIL and taking it back costs about 350 instructions a call
 * (about 1,050 of the 5,460 of a 1-fd send+recv+close); with no
 * other thread to run meanwhile it buys nothing, so a lone thread keeps it
 * (numpy does the same below a size).  Whenever another thread exists the
 * GIL is released around every call, as before.
 *
 * A call made with the GIL held must not wait: sendmsg and recvmsg go with
 * MSG_DONTWAIT and, should they find they would wait on a blocking socket,
 * are made again with the GIL released.  close() can wait too (a socket
 * lingering on unsent data, a tty draining), and with nobody else to run
 * that only delays this thread, as it would without the GIL.
 *
 * The lists are read without the runtime's lock: a thread that Python did
 * not start registering itself meanwhile (PyGILState_Ensure) waits for this
 * one call, which cannot block (close aside, as said). */
static int alone(void) {
#ifdef Py_GIL_DISABLED
    return 0; /* no GIL: the thread state is detached around a call that may wait */
#else
    PyThreadState *ts = PyThreadState_GET();
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
    /* The thread states of an interpreter are a list with the newest at its
     * head (cpython/pystate.h: prev and next): the fields read as
     * PyThreadState_Next and PyInterpreterState_ThreadHead would (four
     * calls fewer, about 15 instructions a call of this). */
    PyInterpreterState *interp = ts->interp;
    return ts->next == NULL && ts->prev == NULL && PyInterpreterState_Head() == interp &&
           PyInterpreterState_Next(interp) == NULL;
#else
    return PyThreadState_Next(ts) == NULL && PyInterpreterState_ThreadHead(PyThreadState_GetInterpreter(ts)) == ts &&
           PyInterpreterState_Next(PyInterpreterState_Head()) == NULL;
#endif
#endif
}

/* A payload above this goes with the GIL released whatever alone() says:
 * a partial write of it (MSG_DONTWAIT on a full socket) would go through
 * the Python path's send_rest, and the release is nothing beside its copy. */
#define KEEP_GIL_MAX (64 * 1024)

/* sendmsg() (*receive* 0) or recvmsg() on the channel's socket, the GIL
 * released unless *keep* and alone() (see there); *err*: its errno. */
static ssize_t msg_gil(FastPath *self, struct msghdr *msg, int flags, int receive, int keep, int *err) {
    ssize_t r;
    if (keep && alone()) {
        r = receive ? recvmsg(self->fd, msg, flags | MSG_DONTWAIT) : sendmsg(self->fd, msg, flags | MSG_DONTWAIT);
        *err = errno;
        if (r >= 0 || !self->blocking || (*err != EAGAIN && *err != EWOULDBLOCK))
            return r;
    }
    Py_BEGIN_ALLOW_THREADS
    r = receive ? recvmsg(self->fd, msg, flags) : sendmsg(self->fd, msg, flags);
    *err = errno;
    Py_END_ALLOW_THREADS
    return r;
}

/* The fds that close_fds() calls, each in some thread with the GIL
 * released, have yet to close.  No object owns them any more (the caller let
 * go of them first), so a fork in another thread meanwhile would copy them
 * into a child where nothing ever closes them: the child closes them as it
 * starts (close_pending_in_child, a pthread_atfork handler).  The one being
 * closed as the fork came is left alone: it may have left the fd table
 * already, its number free for another open.
 *
 * fork_lock keeps the list and each index still for the whole fork (taken
 * by the prepare handler, released after it on both sides): Linux copies
 * the fd table before the memory, and a close that went on in between
 * would leave the child an index past fds its table still holds.  A spin
 * lock: it is held for a store or two, and a pthread mutex cost about 470
 * instructions a message more. */
typedef struct pending_close {
    const int *fds;
    Py_ssize_t n;
    Py_ssize_t at; /* the index being closed: -1 before the first */
    struct pending_close *next;
} pending_close;
static pending_close *pending_closes;
static int fork_lock; /* 1 while held */

static void lock_forks(void) {
    while (__atomic_exchange_n(&fork_lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&fork_lock, __ATOMIC_RELAXED))
            sched_yield(); /* (its holder may be descheduled) */
}

static void unlock_forks(void) { __atomic_store_n(&fork_lock, 0, __ATOMIC_RELEASE); }

/* Taking fork_lock for each index cost a closing thread an atomic exchange
 * per fd, a full barrier right after each close() (about 25 ns an fd, 10%
 * of a 200-fd message).  With asymmetric fences the closing thread only
 * reads forks_pending before it stores an index: a fork raises it, then
 * makes every thread of the process run a full barrier (membarrier), then
 * takes fork_lock.  A closing thread reading it afterwards sees it and takes
 * fork_lock for its next index, so it waits for the fork; one that read it
 * just before may still store one index and close that fd meanwhile, which
 * the child then leaves alone, as the one being closed.  Without
 * membarrier (a kernel before 4.14, a seccomp policy) every index takes
 * fork_lock, as before. */
static int fences;         /* 1: closing threads rely on the forks' membarrier */
static int fences_usable;  /* 1: membarrier's private expedited command is registered */
static int forks_pending;  /* forks between their prepare handler and their parent or child one */

static void register_fences(void) {
#if defined(__linux__) && defined(__NR_membarrier)
    fences_usable = syscall(__NR_membarrier, FDC_MEMBARRIER_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
    fences = fences_usable;
#endif
}

static void fork_prepare(void) {
    __atomic_add_fetch(&forks_pending, 1, __ATOMIC_SEQ_CST);
#if defined(__linux__) && defined(__NR_membarrier)
    if (__atomic_load_n(&fences, __ATOMIC_RELAXED) &&
        syscall(__NR_membarrier, FDC_MEMBARRIER_PRIVATE_EXPEDITED, 0, 0) != 0)
        /* Every index takes the lock from now on.  (Late for a close that
         * passed the count just now, during this fork: only where the
         * command registers and then fails, as a filter could make it.) */
        __atomic_store_n(&fences, 0, __ATOMIC_SEQ_CST);
#endif
    lock_forks();
}

static void fork_parent(void) {
    __atomic_sub_fetch(&forks_pending, 1, __ATOMIC_SEQ_CST);
    unlock_forks();
}

/* Index *i* of *me* is the one being closed from now on: a fork leaves
 * fds[i] to this close, and the child closes those after it. */
static inline void closing_index(pending_close *me, Py_ssize_t i) {
    if (__atomic_load_n(&fences, __ATOMIC_RELAXED) && !__atomic_load_n(&forks_pending, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&me->at, i, __ATOMIC_RELAXED); /* (the fork's fence orders it for the child) */
        return;
    }
    lock_forks();
    me->at = i; /* a fork from here on leaves fds[i] to this close */
    unlock_forks();
}

static void close_pending_in_child(void) {
    for (pending_close *p = pending_closes; p != NULL; p = p->next)
        for (Py_ssize_t i = p->at + 1; i < p->n; i++)
            close(p->fds[i]);
    pending_closes = NULL;
    forks_pending = 0; /* (the child's one thread is past its fork) */
    unlock_forks();
}

/* close() each of *fds*, the GIL released once around them all, as os.close
 * releases it: a close can block (a socket lingering on unsent data, a tty
 * draining its output), and no other thread may wait on that.  Returns the
 * errno of the first that failed, 0 if none did. */
static int close_fds(const int *fds, Py_ssize_t n) {
    int first = 0;
    pending_close me = {fds, n, -1, NULL};
    /* Linked with the GIL held, so that no Python thread forks between the
     * caller letting go of the fds and this.  No deadlock: a thread that
     * forks from Python holds the GIL as it takes fork_lock, and a thread
     * holds fork_lock without the GIL only for a store. */
    lock_forks();
    me.next = pending_closes;
    pending_closes = &me;
    unlock_forks();
    PyThreadState *save = alone() ? NULL : PyEval_SaveThread();
    for (Py_ssize_t i = 0; i < n; i++) {
        closing_index(&me, i);
        if (close(fds[i]) < 0 && first == 0)
            first = errno;
    }
    if (save != NULL)
        PyEval_RestoreThread(save);
    lock_forks();
    pending_close **link = &pending_closes; /* others may have linked theirs in front */
    while (*link != &me)
        link = &(*link)->next;
    *link = me.next;
    unlock_forks();
    return first;
}

/* close_fds() on the numbers in items[0:n] (ints; a negative one, or one no
 * fd can have, is skipped: taken out already), all in one release of the
 * GIL: a fork during it finds every one not yet closed in pending_closes.
 * Returns the errno of the first close that failed, 0 if none did. */
static int close_numbers(PyObject *const *items, Py_ssize_t n) {
    int stack[256], first = 0;
    int *fds = n <= (Py_ssize_t)(sizeof stack / sizeof stack[0]) ? stack : PyMem_Malloc((size_t)n * sizeof(int));
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(items[i]);
        if (fd == -1 && PyErr_Occurred())
            PyErr_Clear();
        else if (fd >= 0 && fd <= INT_MAX) { /* -1: taken out by the channel after an interrupt (adopt_all) */
            if (fds != NULL)
                fds[k++] = (int)fd;
            else if (close((int)fd) < 0 && first == 0) /* out of memory: each closed at once, the GIL held */
                first = errno;
        }
    }
    if (fds != NULL)
        first = close_fds(fds, k);
    if (fds != stack)
        PyMem_Free(fds);
    return first;
}

/* (fd,) for each fd number below ONE_TUPLES, made on first use and kept: a
 * message of one fd (the common case) then makes and frees no tuple, about
 * 250 instructions a message.  Messages may share one: a tuple never changes,
 * and a message's _raw is only ever replaced (never changed in place), so
 * identity tests on one message's _raw still tell whether it was replaced;
 * and while a message holds (fd,) unclosed, no other message can get fd. */
#define ONE_TUPLES 256
static PyObject *one_tuples[ONE_TUPLES];

static PyObject *int_tuple(const int *fds, Py_ssize_t n) {
    PyObject **kept = n == 1 && fds[0] >= 0 && fds[0] < ONE_TUPLES ? &one_tuples[fds[0]] : NULL;
    if (kept != NULL && *kept != NULL) {
        Py_INCREF(*kept);
        return *kept;
    }
    PyObject *t = PyTuple_New(n);
    if (t == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLong(fds[i]);
        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    if (kept != NULL) {
        Py_INCREF(t);
        *kept = t;
    }
    return t;
}

static PyObject *int_list(const int *fds, Py_ssize_t n) {
    PyObject *t = PyList_New(n);
    if (t == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLong(fds[i]);
        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyList_SET_ITEM(t, i, v);
    }
    return t;
}

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* Messages let go with nothing left to close, kept for the next recv():
 * allocating one and freeing it (with the generic dealloc of a class with
 * slots) cost about 400 instructions of a receiver's 3,400 per message. */
#define MESSAGE_SPARE 16
static PyObject *spare_messages[MESSAGE_SPARE]; /* each holds a reference to message_type */
static int n_spare;

/* A Message owning the numbers in *raw* (as Message._owning makes it). */
static PyObject *make_message(PyObject *payload, PyObject *raw) {
    PyObject *m;
    if (n_spare > 0) {
        m = spare_messages[--n_spare];
        _Py_NewReference(m);
        PyObject_GC_Track(m);
    } else if ((m = message_type->tp_alloc(message_type, 0)) == NULL)
        return NULL;
    Py_INCREF(payload);
    SLOT(m, off_payload) = payload;
    Py_INCREF(empty_tuple);
    SLOT(m, off_fds) = empty_tuple;
    Py_INCREF(raw);
    SLOT(m, off_raw) = raw;
    return m;
}

/* -- send ------------------------------------------------------------------------ */

/* Where collect_fds() got to in a list of fds. */
typedef struct {
    PyObject *seq;     /* the snapshot read once fileno() could run (owned), else NULL */
    Py_ssize_t stop;   /* items before it are in fds[] */
    int called;        /* a fileno() ran: the Python path must not call it again */
} FdScan;

/* One exact int item into *fd*: 1, 0 when fileno_of() must decide, -1 on error. */
static int int_fd(PyObject *item, int *fd) {
    long v = PyLong_AsLong(item);
    if (v == -1 && PyErr_Occurred())
        return clear_if_ordinary() ? 0 : -1;
    if (v < 0 || v > FD_MAX)
        return 0;
    *fd = (int)v;
    return 1;
}

/* The fd of an object with fileno(), as fileno_of() reads it and with its
 * errors (even the lookup of fileno runs once): 1, or -1 on error. */
static int object_fd(PyObject *item, int *fd, FdScan *scan) {
    PyObject *get = PyObject_GetAttr(item, s_fileno);
    if (get == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyObject *name = PyType_GetName(Py_TYPE(item));
            if (name != NULL) {
                PyErr_Format(PyExc_TypeError, "expected an int fd or an object with fileno(), got %U", name);
                Py_DECREF(name);
            }
        }
        return -1;
    }
    scan->called = 1;
    PyObject *r = PyObject_CallNoArgs(get);
    Py_DECREF(get);
    if (r == NULL)
        return -1; /* fileno()'s own error, as fileno_of lets it through */
    int overflow = 0;
    long v = PyLong_Check(r) ? PyLong_AsLongAndOverflow(r, &overflow) : 0;
    if (!PyLong_Check(r)) {
        PyObject *name = PyType_GetName(Py_TYPE(item)), *rname = PyType_GetName(Py_TYPE(r));
        if (name != NULL && rname != NULL)
            PyErr_Format(PyExc_TypeError, "%U.fileno() returned %U", name, rname);
        Py_XDECREF(name);
        Py_XDECREF(rname);
    } else if (!(v == -1 && PyErr_Occurred()) && (overflow || v < 0 || v > FD_MAX))
        PyErr_Format(PyExc_ValueError, "invalid file descriptor %S%s", r,
                     overflow < 0 || (!overflow && v < 0) ? " (closed?)" : "");
    Py_DECREF(r);
    if (PyErr_Occurred())
        return -1;
    *fd = (int)v;
    return 1;
}

/* The fd numbers of *fdsobj* (a list or tuple of ints or objects with
 * fileno()) into fds: the count, -2 for "let Python do it", -1 on error.
 * *scan* says how far it got (release scan->seq): on -2 after a fileno()
 * ran, `resolved_fds` gives the Python path the numbers read, so that no
 * fileno() runs twice. */
static Py_ssize_t collect_fds(PyObject *fdsobj, int *fds, FdScan *scan) {
    scan->seq = NULL;
    scan->stop = 0;
    scan->called = 0;
    int is_list = PyList_CheckExact(fdsobj);
    if (!is_list && !PyTuple_CheckExact(fdsobj))
        return -2;
    Py_ssize_t n = Py_SIZE(fdsobj);
    if (n > SCM_MAX_FD)
        return -2;
    PyObject **items = is_list ? ((PyListObject *)fdsobj)->ob_item : ((PyTupleObject *)fdsobj)->ob_item;
    Py_ssize_t i = 0;
    /* Exact ints run no code: read in place. */
    for (; i < n && PyLong_CheckExact(items[i]); i++) {
        int r = int_fd(items[i], fds + i);
        if (r <= 0) {
            scan->stop = i;
            return r < 0 ? -1 : -2;
        }
    }
    if (i < n) {
        /* fileno() may run any code, even change the list: read a snapshot
         * of it, as the Python path does (list(fds)).  PySequence_List
         * allocates before it reads the items (PySequence_Tuple does not:
         * a collection in between could free what it then copies). */
        PyObject *snap = is_list ? PySequence_List(fdsobj) : Py_NewRef(fdsobj);
        if (snap == NULL)
            return -1;
        scan->seq = snap;
        if (Py_SIZE(snap) != n) {
            scan->stop = 0;
            return -2;
        }
        for (; i < n; i++) {
            PyObject *item = is_list ? PyList_GET_ITEM(snap, i) : PyTuple_GET_ITEM(snap, i);
            scan->stop = i;
            int r;
            if (PyLong_CheckExact(item))
                r = int_fd(item, fds + i);
            else if (PyLong_Check(item))
                r = 0; /* bool (refused) or an int subclass: fileno_of decides */
            else
                r = object_fd(item, fds + i, scan);
            if (r <= 0)
                return r < 0 ? -1 : -2;
        }
    }
    scan->stop = n;
    return n;
}

/* What the Python path reads after collect_fds() stopped: a list of the
 * numbers read, then the items not reached (fds it did not read at all,
 * such as a generator, as they are). */
static PyObject *resolved_fds(PyObject *fdsobj, const int *fds, const FdScan *scan) {
    PyObject *seq = scan->seq != NULL ? scan->seq : fdsobj;
    int is_list = PyList_CheckExact(seq);
    if (!is_list && !PyTuple_CheckExact(seq))
        return Py_NewRef(seq);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    /* An allocation may run a finalizer that changes a list: its size and
     * items are read afresh each time, and each item held before the next. */
    for (Py_ssize_t i = 0; i < Py_SIZE(seq); i++) {
        PyObject *v;
        if (i < scan->stop)
            v = PyLong_FromLong(fds[i]);
        else
            v = Py_NewRef(is_list ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i));
        if (v == NULL || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

/* The frame's rest after a write that took *sent* bytes (maybe 0): the
 * Python path queues and pushes it (the send lock is held). */
/* Set attribute *name* of the exception being raised to *n* (messages_taken),
 * leaving it raised; a failure to set it loses only the attribute. */
static void set_on_error(PyObject *name, Py_ssize_t n) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *number = PyLong_FromSsize_t(n);
    if (value == NULL || number == NULL || PyObject_SetAttr(value, name, number) < 0)
        PyErr_Clear();
    Py_XDECREF(number);
    PyErr_Restore(type, value, tb);
}

static PyObject *hand_over_send(PyObject *channel, const unsigned char *hdr, PyObject *payload,
                                const int *fds, Py_ssize_t nfds, Py_ssize_t sent) {
    PyObject *header = PyBytes_FromStringAndSize((const char *)hdr, HEADER_SIZE);
    PyObject *nums = int_list(fds, nfds);
    PyObject *bufs = NULL, *r = NULL;
    if (header != NULL && nums != NULL)
        bufs = PyList_New(2);
    if (bufs != NULL) {
        Py_INCREF(header);
        PyList_SET_ITEM(bufs, 0, header);
        Py_INCREF(payload);
        PyList_SET_ITEM(bufs, 1, payload);
        PyObject *n = PyLong_FromSsize_t(sent);
        if (n != NULL) {
            r = PyObject_CallFunctionObjArgs(send_rest, channel, bufs, nums, n, NULL);
            Py_DECREF(n);
        }
    }
    if (r == NULL && !PyErr_Occurred())
        PyErr_NoMemory();
    if (r == NULL && bufs == NULL) {
        /* Could not even hand it over: how much left is known, but
         * not kept; the stream is unusable, as after an interruption. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyObject *b = PyObject_CallFunctionObjArgs(send_interrupted, channel, value, NULL);
        Py_XDECREF(b);
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(header);
    Py_XDECREF(nums);
    Py_XDECREF(bufs);
    return r;
}

/* A signal handler raised inside the write: the Python path's rule (the
 * stream is unusable) for the exception now set. */
static void send_was_interrupted(PyObject *channel) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *r = PyObject_CallFunctionObjArgs(send_interrupted, channel, value, NULL);
    if (r == NULL)
        PyErr_Clear();
    else
        Py_DECREF(r);
    PyErr_Restore(type, value, tb);
}

/* After EINTR, with nothing written: 1 to write again.  A handler that
 * returned (or another thread, while the GIL was released) may have closed
 * the channel, and its fd number may name another file now, so the state is
 * read again, as socket methods read their fd afresh; when it is no longer
 * for this path, the send lock is left and 0 says the Python path takes the
 * call (-1: an error is set). */
static int may_send_again(FastPath *self, PyObject *channel, PyObject *lock) {
    int ok = chan_check(self, channel);
    if (ok > 0 && (ok & OK_SEND))
        return 1;
    int left = leave(self, channel, lock);
    return ok < 0 || left < 0 ? -1 : 0;
}

/* send(channel, payload, fds) -> True when the whole message left, False
 * when nothing was done (the Python path takes it from the start), or a
 * list: nothing was sent and the Python path takes it with these fds (the
 * numbers that fileno() gave here, which must not run twice). */
static PyObject *send_impl(FastPath *self, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t *whole) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "send(channel, payload, fds)");
        return NULL;
    }
    PyObject *channel = args[0], *payload = args[1], *fdsobj = args[2];
    int fds[SCM_MAX_FD];
    FdScan scan;
    Py_buffer view;
    int have_view = 0;
    PyObject *result = NULL, *lock = NULL;
    Py_ssize_t nfds = collect_fds(fdsobj, fds, &scan);
    if (nfds == -1)
        goto done;
    if (nfds == -2)
        goto not_handled;

    const char *data;
    Py_ssize_t size;
    if (PyBytes_CheckExact(payload)) {
        data = PyBytes_AS_STRING(payload);
        size = PyBytes_GET_SIZE(payload);
    } else {
        if (PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE) < 0) {
            if (clear_if_ordinary())
                goto not_handled;
            goto done;
        }
        have_view = 1;
        data = view.buf;
        size = view.len;
    }

    int direct = 0;
    /* What the Python path checks or does first: a closed or broken
     * channel, an earlier send cut twice (_suspect), a forked child's end
     * not yet claimed, payloads that may go as sealed shared memory, older
     * data queued (all in chan_check). */
    for (int again = 0;; again = 1) {
        int ok = chan_check(self, channel);
        if (ok < 0)
            goto release;
        if (!(ok & OK_SEND) || size > self->max_payload || nfds > self->max_fds)
            goto release_not_handled;
        PyObject *pending = SLOT(self->outbox, off_pending);
        if (pending == NULL || Py_TYPE(pending) != deque_type || Py_SIZE(pending) != 0)
            goto release_not_handled;
        if (again)
            break; /* still so with the lock taken */
        Py_INCREF(self->send_lock);
        int got = try_lock(self->send_lock, &lock, &direct);
        if (got < 0)
            goto done;
        if (got == 0)
            goto not_handled;
        if (direct)
            break; /* no Python code ran: nothing changed */
    }
    for (Py_ssize_t i = 0; i < nfds; i++)
        if (fds[i] == self->fd)
            goto release_not_handled;
    if (0) {
    release:
        if (lock != NULL)
            leave(self, channel, lock);
        goto done;
    release_not_handled:
        if (lock != NULL && leave(self, channel, lock) < 0)
            goto done;
        goto not_handled;
    }

    unsigned char hdr[HEADER_SIZE];
    put_le(hdr, self->tag, 8);
    put_le(hdr + 8, (unsigned long long)nfds, 4);
    put_le(hdr + 12, 0, 4);
    put_le(hdr + 16, (unsigned long long)size, 8);
    struct iovec iov[2] = {{hdr, HEADER_SIZE}, {(void *)data, (size_t)size}};
    union {
        char buf[CMSG_SPACE(sizeof(int) * SCM_MAX_FD)];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = size ? 2 : 1;
    if (nfds) {
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t sent;
    int err = 0;
    for (;;) {
        forget_dicts();
        sent = msg_gil(self, &msg, self->send_flags, 0, HEADER_SIZE + size <= KEEP_GIL_MAX, &err);
        if (sent >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            send_was_interrupted(channel);
            leave(self, channel, lock);
            goto done;
        }
        int again = may_send_again(self, channel, lock);
        if (again < 0)
            goto done;
        if (again == 0)
            goto not_handled;
    }
    if (sent == HEADER_SIZE + size) {
        result = Py_True;
        Py_INCREF(result);
    } else if (sent >= 0 || err == EAGAIN || err == EWOULDBLOCK) {
        /* A partial write, or a full socket: the Python path queues the
         * rest and waits as the timeout says. */
        if (PyErr_CheckSignals() < 0)
            send_was_interrupted(channel);
        else {
            PyObject *r = hand_over_send(channel, hdr, payload, fds, nfds, sent < 0 ? 0 : sent);
            if (r != NULL) {
                /* The rest went too (or is pending, as its exception says). */
                Py_DECREF(r);
                result = Py_True;
                Py_INCREF(result);
            }
        }
    } else {
        /* The kernel refused it and nothing left: the Python path writes it
         * again and raises its own way (naming a closed fd, EPERM for a peer
         * that takes only data, a close from another thread). */
        if (leave(self, channel, lock) < 0)
            goto done;
        goto not_handled;
    }
    /* A signal handler with an error to raise runs as this call returns,
     * in Channel.send's frame: it reads sent_whole (the message left
     * whole).  Not checked here as well: that costs 50 instructions. */
    if (leave(self, channel, lock) < 0)
        Py_CLEAR(result);
    if (result == Py_True)
        *whole = HEADER_SIZE + size;
    goto done;

not_handled:
    if (scan.called)
        result = resolved_fds(fdsobj, fds, &scan);
    else {
        result = Py_False;
        Py_INCREF(result);
    }
done:
    if (have_view)
        PyBuffer_Release(&view);
    Py_XDECREF(scan.seq);
    return result;
}

/* -- send_many -------------------------------------------------------------------- */

/* Frames of one compiled send_many() call (more: the Python path, which
 * groups up to fdchannel._batch._MAX_FRAMES): its arrays live on the C
 * stack, which a thread may have made small (threading.stack_size). */
#define MANY_MAX_FRAMES 64
#define MANY_MAX_BYTES (256 * 1024)    /* fdchannel._batch._MAX_BYTES */

/* The messages as the Python path should read them after send_many_impl
 * read fds of some (so that no fileno() runs twice): those before *at* with
 * the numbers read, message *at* with its fds as *scan* left them when
 * *partial* (its fds) is set, then the rest of *messages* as it is now. */
static PyObject *resolved_messages(PyObject *messages, PyObject *const *payloads, const int *fds, const int *nums,
                                   Py_ssize_t at, PyObject *partial, const int *mine, const FdScan *scan) {
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t from = 0;
    for (Py_ssize_t j = 0; j <= at; j++) {
        PyObject *nums_j;
        if (j < at) {
            nums_j = int_list(fds + from, nums[j]);
            from += nums[j];
        } else if (partial != NULL)
            nums_j = resolved_fds(partial, mine, scan);
        else
            break;
        PyObject *pair = nums_j != NULL ? PyTuple_Pack(2, payloads[j], nums_j) : NULL;
        Py_XDECREF(nums_j);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(pair);
    }
    for (Py_ssize_t j = partial != NULL ? at + 1 : at; j < Py_SIZE(messages); j++) {
        PyObject *item = PyList_CheckExact(messages) ? PyList_GET_ITEM(messages, j) : PyTuple_GET_ITEM(messages, j);
        if (PyList_Append(out, item) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* send_many(channel, messages) -> True when every message left in one
 * write (or the rest was handed to the Python path, which pushed it),
 * False when nothing was done: the Python path takes the call from the
 * start; or a list, when nothing was sent and a fileno() ran: the
 * Python path takes these messages instead (`resolved_messages`).
 * Handled: a list or tuple of (payload, list or tuple of fds) pairs, each
 * payload bytes or another C-contiguous buffer, that fit one group of
 * fdchannel._batch (at most SCM_MAX_FD fds, MANY_MAX_FRAMES frames, 256
 * KiB), each within the channel's limits. */
static PyObject *send_many_impl(FastPath *self, PyObject *channel, PyObject *messages, Py_ssize_t *taken) {
    int is_list = PyList_CheckExact(messages);
    if (!is_list && !PyTuple_CheckExact(messages))
        Py_RETURN_FALSE;
    Py_ssize_t count = Py_SIZE(messages);
    if (count < 1 || count > MANY_MAX_FRAMES)
        Py_RETURN_FALSE;
    /* The payloads are held here: fileno() below may change the list.  A
     * payload other than bytes is read through a memoryview (mvs[i], else
     * NULL), which pins its buffer until the write is done. */
    PyObject *payloads[MANY_MAX_FRAMES], *mvs[MANY_MAX_FRAMES];
    const char *datas[MANY_MAX_FRAMES];
    Py_ssize_t sizes[MANY_MAX_FRAMES];
    int nums[MANY_MAX_FRAMES]; /* fds per message */
    int fds[SCM_MAX_FD];
    int mine[SCM_MAX_FD];      /* message at's */
    Py_ssize_t nfds = 0, total = 0, got = 0, at = 0;
    PyObject *result = NULL, *partial = NULL; /* message at's fds, once read */
    FdScan scan = {NULL, 0, 0};
    int called = 0;
    /* The limits as they are now: the Python path refuses a message before
     * it reads the next one's fds (read again below, with the lock). */
    int state = chan_check(self, channel);
    if (state < 0)
        return NULL;
    if (!(state & OK_SEND))
        Py_RETURN_FALSE;
    for (; at < count; at++) {
        if (at >= Py_SIZE(messages))
            goto not_handled_early;
        PyObject *item = is_list ? PyList_GET_ITEM(messages, at) : PyTuple_GET_ITEM(messages, at);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
            goto not_handled_early;
        PyObject *payload = PyTuple_GET_ITEM(item, 0), *fdsobj = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(payload) && !PyObject_CheckBuffer(payload))
            goto not_handled_early; /* a SealedMemory, or the Python path's TypeError */
        /* Both held before anything can run code. */
        Py_INCREF(payload);
        mvs[got] = NULL;
        payloads[got++] = payload;
        Py_INCREF(fdsobj);
        partial = fdsobj;
        Py_ssize_t k = collect_fds(fdsobj, mine, &scan);
        called |= scan.called;
        if (k == -1)
            goto done;
        if (scan.called) {
            /* A fileno() may have changed the limits: read them again. */
            state = chan_check(self, channel);
            if (state < 0)
                goto done;
            if (!(state & OK_SEND))
                goto not_handled_early;
        }
        if (k == -2)
            goto not_handled_early;
        /* The buffer after the fds, as the Python path's _message reads them. */
        if (PyBytes_CheckExact(payload)) {
            datas[at] = PyBytes_AS_STRING(payload);
            sizes[at] = PyBytes_GET_SIZE(payload);
        } else {
            PyObject *mv = PyMemoryView_FromObject(payload);
            if (mv == NULL) {
                if (clear_if_ordinary())
                    goto not_handled_early; /* the Python path raises its own error */
                goto done;
            }
            mvs[at] = mv;
            Py_buffer *b = PyMemoryView_GET_BUFFER(mv);
            if (!PyBuffer_IsContiguous(b, 'C'))
                goto not_handled_early; /* its BufferError, or its way with a Fortran-ordered one */
            datas[at] = b->buf;
            sizes[at] = b->len;
        }
        if (k > SCM_MAX_FD - nfds || k > self->max_fds || sizes[at] > self->max_payload)
            goto not_handled_early;
        for (Py_ssize_t j = 0; j < k; j++)
            if (mine[j] == self->fd)
                goto not_handled_early;
        memcpy(fds + nfds, mine, sizeof(int) * (size_t)k);
        nums[at] = (int)k;
        nfds += k;
        total += HEADER_SIZE + sizes[at];
        if (total > MANY_MAX_BYTES)
            goto not_handled_early;
        /* Let go of this message's snapshot before the next is read, as the
         * Python path does (a finalizer it runs may change the list). */
        Py_CLEAR(scan.seq);
        Py_CLEAR(partial);
    }
    if (Py_SIZE(messages) != count)
        goto not_handled_early;

    PyObject *lock = NULL;
    int direct = 0;
    for (int again = 0;; again = 1) {
        int ok = chan_check(self, channel);
        if (ok < 0)
            goto release;
        if (!(ok & OK_SEND))
            goto release_not_handled;
        PyObject *pending = SLOT(self->outbox, off_pending);
        if (pending == NULL || Py_TYPE(pending) != deque_type || Py_SIZE(pending) != 0)
            goto release_not_handled;
        if (again)
            break;
        Py_INCREF(self->send_lock);
        int taken = try_lock(self->send_lock, &lock, &direct);
        if (taken < 0)
            goto done;
        if (taken == 0)
            goto not_handled_early;
        if (direct)
            break;
    }
    /* send()'s checks were made message by message as their fds were read,
     * each against the limits of that moment, as the Python path's prepare()
     * makes them: a limit a later fileno() lowers does not refuse an earlier
     * message. */
    if (0) {
    release:
        if (lock != NULL)
            leave(self, channel, lock);
        goto done;
    release_not_handled:
        if (lock != NULL && leave(self, channel, lock) < 0)
            goto done;
        goto not_handled_early;
    }

    /* The group: every frame but the last with fds after it flagged FLAG_GROUP. */
    unsigned char hdrs[MANY_MAX_FRAMES][HEADER_SIZE];
    struct iovec iov[2 * MANY_MAX_FRAMES];
    int niov = 0;
    Py_ssize_t after = nfds;
    for (Py_ssize_t i = 0; i < count; i++) {
        after -= nums[i];
        Py_ssize_t size = sizes[i];
        put_le(hdrs[i], self->tag | (after > 0 ? GROUP_BIT : 0), 8);
        put_le(hdrs[i] + 8, (unsigned long long)nums[i], 4);
        put_le(hdrs[i] + 12, 0, 4);
        put_le(hdrs[i] + 16, (unsigned long long)size, 8);
        iov[niov].iov_base = hdrs[i];
        iov[niov++].iov_len = HEADER_SIZE;
        if (size) {
            iov[niov].iov_base = (void *)datas[i];
            iov[niov++].iov_len = (size_t)size;
        }
    }
    union {
        char buf[CMSG_SPACE(sizeof(int) * SCM_MAX_FD)];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)niov;
    if (nfds) {
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t sent;
    int err = 0;
    for (;;) {
        sent = msg_gil(self, &msg, self->send_flags, 0, total <= KEEP_GIL_MAX, &err);
        if (sent >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            /* As _batch's first write: the stream is unusable, none counted taken. */
            send_was_interrupted(channel);
            set_on_error(s_messages_taken, 0);
            leave(self, channel, lock);
            goto done;
        }
        int again = may_send_again(self, channel, lock);
        if (again < 0)
            goto done;
        if (again == 0)
            goto not_handled_early;
    }
    if (sent == total) {
        result = Py_True;
        Py_INCREF(result);
    } else if (sent >= 0 || err == EAGAIN || err == EWOULDBLOCK) {
        /* A partial write, or a full socket: the Python path queues the
         * group's rest and pushes it as send_many() does. */
        if (PyErr_CheckSignals() < 0) {
            /* The stream is unusable, and, as _batch.record_taken says for
             * an error without characters_written, none counts as taken. */
            send_was_interrupted(channel);
            set_on_error(s_messages_taken, 0);
        } else {
            PyObject *bufs = PyList_New(0), *numl = int_list(fds, nfds), *pn = PyLong_FromSsize_t(sent < 0 ? 0 : sent);
            PyObject *pc = PyLong_FromSsize_t(count);
            int bad = bufs == NULL || numl == NULL || pn == NULL || pc == NULL;
            for (Py_ssize_t i = 0; !bad && i < count; i++) {
                PyObject *h = PyBytes_FromStringAndSize((const char *)hdrs[i], HEADER_SIZE);
                bad = h == NULL || PyList_Append(bufs, h) < 0 || PyList_Append(bufs, payloads[i]) < 0;
                Py_XDECREF(h);
            }
            PyObject *r = NULL;
            if (!bad)
                r = PyObject_CallFunctionObjArgs(send_many_rest, channel, bufs, numl, pn, pc, NULL);
            else {
                send_was_interrupted(channel); /* how much left is known, but not kept */
                set_on_error(s_messages_taken, 0); /* as for the signal above */
            }
            Py_XDECREF(bufs);
            Py_XDECREF(numl);
            Py_XDECREF(pn);
            Py_XDECREF(pc);
            if (r != NULL) {
                Py_DECREF(r);
                result = Py_True;
                Py_INCREF(result);
            }
        }
    } else {
        /* The kernel refused it and nothing left: the Python path writes it
         * again and raises its own way. */
        if (leave(self, channel, lock) < 0)
            goto done;
        goto not_handled_early;
    }
    if (result == Py_True && PyErr_CheckSignals() < 0) {
        /* A handler raised as the call ends: every message had left (or is pending). */
        Py_CLEAR(result);
        set_on_error(s_messages_taken, count);
    }
    if (leave(self, channel, lock) < 0)
        Py_CLEAR(result);
    if (result == Py_True)
        *taken = count;
    goto done;

not_handled_early:
    if (called)
        result = resolved_messages(messages, payloads, fds, nums, at, partial, mine, &scan);
    else {
        result = Py_False;
        Py_INCREF(result);
    }
done:
    for (Py_ssize_t i = 0; i < got; i++) {
        Py_XDECREF(mvs[i]);
        Py_DECREF(payloads[i]);
    }
    Py_XDECREF(partial);
    Py_XDECREF(scan.seq);
    return result;
}

/* -- recv ------------------------------------------------------------------------ */

/* 1 when the decoder holds nothing and would take a lone frame, 0 when
 * the Python path must look, -1 on error. */
static int decoder_idle(PyObject *decoder) {
    Py_ssize_t n = attr_len(decoder, s_frames);
    if (n != 0)
        return n < 0 ? -1 : 0;
    int r = attr_none(decoder, s_error);
    if (r != 1)
        return r;
    r = attr_true(decoder, s_eof);
    if (r != 0)
        return r < 0 ? -1 : 0;
    r = attr_true(decoder, s_lone);
    if (r != 1)
        return r;
    r = attr_true(decoder, s_end);
    if (r != 0)
        return r < 0 ? -1 : 0;
    r = attr_none(decoder, s_big);
    if (r != 1)
        return r;
    n = attr_len(decoder, s_fds);
    if (n != 0)
        return n < 0 ? -1 : 0;
    return 1;
}

static int add_received(PyObject *decoder, Py_ssize_t n) {
    PyObject *old = lookup(decoder, s_received);
    if (old == NULL)
        return -1;
    PyObject *delta = PyLong_FromSsize_t(n);
    PyObject *sum = delta ? PyNumber_Add(old, delta) : NULL;
    Py_DECREF(old);
    Py_XDECREF(delta);
    if (sum == NULL)
        return -1;
    int r = store(decoder, s_received, sum);
    Py_DECREF(sum);
    return r;
}

/* add_received, through the decoder's cached state when it is still valid. */
static int add_received_fast(FastPath *fp, PyObject *decoder, Py_ssize_t n) {
    if (decoder != fp->decoder || dec_check(fp) != 1)
        return add_received(decoder, n);
    PyObject *d = dict_of(decoder);
    long long v = fp->received + n;
#if defined(IN_PLACE_INTS) && defined(HAVE_VERSIONS)
    /* The dict's int, changed in place when nothing but the dict refers to
     * it (so nobody can see it change) and it has room for the new value:
     * a new int and a dict store per message cost about 400 instructions.
     * The dict is as checked (dec_check), so received_obj is its value. */
    PyObject *old = fp->received_obj;
    if (d == fp->dec_dict && Py_REFCNT(old) == 1 && Py_TYPE(old) == &PyLong_Type && v > 256 && v < (1LL << 60)) {
        Py_ssize_t want = v < (1LL << PyLong_SHIFT) ? 1 : 2;
        if (Py_SIZE(old) == want) {
            PyLongObject *o = (PyLongObject *)old;
            o->ob_digit[0] = (digit)(v & PyLong_MASK);
            if (want == 2)
                o->ob_digit[1] = (digit)(v >> PyLong_SHIFT);
            fp->received = v;
            return 0;
        }
    }
#endif
    PyObject *pv = PyLong_FromLongLong(v);
    if (pv == NULL)
        return -1;
    int r = PyDict_SetItem(d, s_received, pv);
    Py_DECREF(pv);
    if (r < 0)
        return -1;
    fp->received = v;
#ifdef HAVE_VERSIONS
    /* Our own change: the rest of the state is as checked. */
    if (fp->dec_dict == d) {
        fp->dec_version = dict_version(d);
        fp->received_obj = pv; /* (the dict's reference keeps it) */
    }
#endif
    return 0;
}

/* The exception set struck after the kernel handed over bytes or fds that
 * were then lost: the stream has a gap, and the channel says so from now on.
 * First a mark no handler can cut and that needs no memory (a store to a key
 * the dict has): should _recv_interrupted itself fail (another interrupt,
 * out of memory again), the next recv() still finds it (_check_leftovers),
 * never a silent gap.  The exception stays the one raised. */
static void recv_cut(PyObject *channel) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (store(channel, s_delivering, Py_True) < 0)
        PyErr_Clear();
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodOneArg(channel, s_recv_interrupted, value ? value : Py_None);
    Py_XDECREF(r);
    PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

/* The decoder's next queued frame as a Message, if it is a plain data frame
 * (no transport data): NULL without an exception when there is none. */
static PyObject *next_queued_from(PyObject *channel, PyObject *frames);

static PyObject *next_queued(PyObject *channel, PyObject *decoder) {
    PyObject *frames = lookup(decoder, s_frames);
    if (frames == NULL)
        return NULL;
    PyObject *m = next_queued_from(channel, frames);
    Py_DECREF(frames);
    return m;
}

/* next_queued, from the decoder's queue itself (borrowed). */
static PyObject *next_queued_from(PyObject *channel, PyObject *frames) {
    PyObject *result = NULL;
    Py_ssize_t n = PyObject_Length(frames);
    PyObject *f = n > 0 ? PySequence_GetItem(frames, 0) : NULL;
    if (f != NULL && Py_TYPE(f) == frame_type) {
        PyObject *control = SLOT(f, off_f_control), *aux = SLOT(f, off_f_aux);
        PyObject *payload = SLOT(f, off_f_payload), *fds = SLOT(f, off_f_fds);
        PyObject *shared = SLOT(f, off_f_shared);
        /* A shared-memory frame's payload is a memfd to check: the Python path's. */
        if (control == Py_False && shared == Py_False && aux != NULL && PyBytes_CheckExact(aux) && PyBytes_GET_SIZE(aux) == 0 &&
            payload != NULL && fds != NULL && PyList_CheckExact(fds)) {
            PyObject *popped = PyObject_CallMethodNoArgs(frames, s_popleft);
            if (popped != NULL) {
                Py_DECREF(popped);
                result = make_message(payload, fds);
                if (result == NULL) {
                    /* Back where it was: its fds stay the decoder's. */
                    PyObject *type, *value, *tb;
                    PyErr_Fetch(&type, &value, &tb);
                    PyObject *r = PyObject_CallMethodOneArg(frames, s_appendleft, f);
                    if (r != NULL) {
                        Py_DECREF(r);
                        PyErr_Restore(type, value, tb);
                    } else {
                        /* Out of memory twice: the frame is lost, its fds with it,
                         * and the stream has a gap the channel must report. */
                        PyErr_Clear();
                        Py_ssize_t k = PyList_GET_SIZE(fds);
                        for (Py_ssize_t i = 0; i < k; i++) {
                            long v = PyLong_AsLong(PyList_GET_ITEM(fds, i));
                            if (v >= 0 && v <= FD_MAX)
                                close((int)v);
                        }
                        PyErr_Clear();
                        PyList_SetSlice(fds, 0, k, NULL); /* shrinking: no allocation */
                        PyErr_Restore(type, value, tb);
                        recv_cut(channel);
                    }
                } else {
                    /* The message owns them now; the frame keeps nothing. */
                    PyObject *empty = PyList_New(0);
                    if (empty != NULL)
                        Py_SETREF(SLOT(f, off_f_fds), empty);
                    else
                        PyErr_Clear();
                }
            }
        }
    }
    Py_XDECREF(f);
    return result;
}

/* -- a read of several whole plain frames ---------------------------------------
 *
 * A read that holds several whole plain data frames and nothing else (a
 * group that send_many() wrote, or coalesced sends without fds) is queued
 * in the decoder here, exactly as Decoder._parse and _take_inband queue
 * it: each frame's fds taken in order from the read's, FLAG_GROUP on
 * every frame with fds after it (as send_many() flags them).  Anything
 * else (a partial frame, transport data, another flag pattern, more fds
 * than max_held_fds, a decoder with a budget or a frame timeout) goes to
 * the Python decoder. */

/* The frames (at least 2) when b[0:n] is such a read carrying nfds fds, else 0. */
static Py_ssize_t scan_plain_frames(FastPath *fp, const unsigned char *b, Py_ssize_t n, Py_ssize_t nfds) {
    Py_ssize_t off = 0, k = 0, taken = 0;
    unsigned long long group_tag = fp->tag | GROUP_BIT;
    while (off < n) {
        if (n - off < HEADER_SIZE)
            return 0;
        const unsigned char *h = b + off;
        unsigned long long tag = get_le(h, 8), dn = get_le(h + 8, 4), aux = get_le(h + 12, 4),
                           plen = get_le(h + 16, 8);
        int grp;
        if (tag == fp->tag)
            grp = 0;
        else if (tag == group_tag)
            grp = 1;
        else
            return 0;
        if (aux != 0 || dn > (unsigned long long)fp->fast_max_fds || plen > (unsigned long long)fp->fast_max_payload ||
            dn > (unsigned long long)(nfds - taken))
            return 0;
        if ((unsigned long long)(n - off - HEADER_SIZE) < plen)
            return 0;
        taken += (Py_ssize_t)dn;
        if (grp != (taken < nfds))
            return 0;
        off += HEADER_SIZE + (Py_ssize_t)plen;
        k++;
    }
    return taken == nfds && k >= 2 ? k : 0;
}

/* 1 when the decoder takes such a read without its Python code (no budget,
 * no frame timeout, not evicted, nfds within max_held_fds), else 0. */
static int decoder_takes_plain(PyObject *decoder, Py_ssize_t nfds) {
    PyObject *d = dict_of(decoder);
    if (d == NULL)
        return 0;
    PyObject *w = PyDict_GetItemWithError(d, s_watch);
    PyObject *ev = w ? PyDict_GetItemWithError(d, s_evicted) : NULL;
    PyObject *mh = ev ? PyDict_GetItemWithError(d, s_max_held_fds) : NULL;
    if (mh == NULL || w != Py_False || ev != Py_None || !PyLong_CheckExact(mh)) {
        PyErr_Clear();
        return 0;
    }
    if (nfds == 0)
        return 1;
    int overflow = 0;
    long long m = PyLong_AsLongLongAndOverflow(mh, &overflow);
    if (m == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return overflow > 0 || (overflow == 0 && m >= (long long)nfds);
}

/* Queue the k frames of b[0:n] (as scan_plain_frames found them) on
 * *frames*, the first at stream offset *received*: 0 done, -1 on error
 * with nothing queued (the fds are still the caller's). */
static int queue_plain_frames(PyObject *frames, const unsigned char *b, Py_ssize_t k, const int *fds,
                              long long received) {
    PyObject *list = PyList_New(k);
    if (list == NULL)
        return -1;
    Py_ssize_t off = 0, at = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        const unsigned char *h = b + off;
        Py_ssize_t dn = (Py_ssize_t)get_le(h + 8, 4), plen = (Py_ssize_t)get_le(h + 16, 8);
        PyObject *payload = PyBytes_FromStringAndSize((const char *)h + HEADER_SIZE, plen);
        PyObject *nums = payload ? int_list(fds + at, dn) : NULL;
        PyObject *count = nums ? PyLong_FromSsize_t(dn) : NULL;
        PyObject *start = count ? PyLong_FromLongLong(received + off) : NULL;
        PyObject *f = start ? frame_type->tp_alloc(frame_type, 0) : NULL;
        if (f == NULL) {
            Py_XDECREF(payload);
            Py_XDECREF(nums);
            Py_XDECREF(count);
            Py_XDECREF(start);
            Py_DECREF(list);
            return -1;
        }
        Py_INCREF(Py_False);
        SLOT(f, off_f_control) = Py_False;
        Py_INCREF(Py_False);
        SLOT(f, off_f_shared) = Py_False;
        Py_INCREF(empty_bytes);
        SLOT(f, off_f_aux) = empty_bytes;
        SLOT(f, off_f_nfds) = count;
        SLOT(f, off_f_payload) = payload;
        SLOT(f, off_f_fds) = nums;
        SLOT(f, off_f_start) = start;
        PyList_SET_ITEM(list, i, f);
        off += HEADER_SIZE + plen;
        at += dn;
    }
    PyObject *r = PyObject_CallMethodOneArg(frames, s_extend, list);
    Py_DECREF(list);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) and PyBuffer_Release: for
 * the decoder's bytearray, its export count kept as bytearray's own
 * getbuffer keeps it (no resize while held; the buffer is read into with
 * the GIL released) without the generic calls, about 70 instructions. */
#if PY_VERSION_HEX < 0x030E0000
#define DIRECT_BYTEARRAY 1
#endif

static int get_writable(PyObject *obj, Py_buffer *view) {
#ifdef DIRECT_BYTEARRAY
    if (PyByteArray_CheckExact(obj)) {
        ((PyByteArrayObject *)obj)->ob_exports++;
        Py_INCREF(obj);
        view->obj = obj;
        view->buf = PyByteArray_AS_STRING(obj);
        view->len = PyByteArray_GET_SIZE(obj);
        return 0;
    }
#endif
    return PyObject_GetBuffer(obj, view, PyBUF_WRITABLE);
}

static void release_writable(Py_buffer *view) {
#ifdef DIRECT_BYTEARRAY
    PyObject *obj = view->obj;
    if (obj != NULL && PyByteArray_CheckExact(obj)) {
        ((PyByteArrayObject *)obj)->ob_exports--;
        view->obj = NULL;
        Py_DECREF(obj);
        return;
    }
#endif
    PyBuffer_Release(view);
}

/* recv(channel) -> the Message when one read was exactly one plain frame,
 * None when the Python path must go on (what was read is in the decoder). */
static PyObject *recv_impl(FastPath *self, PyObject *channel) {
    PyObject *lock = NULL, *decoder = NULL, *bufobj = NULL, *result = NULL;
    int direct = 0, idle = 0; /* idle: the decoder's state was as cached (dec_check) */
    /* What the Python path checks first: a closed or broken channel, a
     * message an earlier recv() had in hand when cut twice (_delivering,
     * the decoder's landed list), a forked child's end not yet claimed. */
    int ok = chan_check(self, channel);
    if (ok < 0)
        return NULL;
    if (!(ok & OK_RECV))
        Py_RETURN_NONE;
    Py_INCREF(self->recv_lock);
    int got = try_lock(self->recv_lock, &lock, &direct);
    if (got <= 0) {
        if (got < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (!direct) {
        ok = chan_check(self, channel);
        if (ok < 0)
            goto fail;
        if (!(ok & OK_RECV))
            goto not_handled;
    }
    decoder = self->decoder;
    Py_INCREF(decoder);
    int dok = dec_check(self);
    if (dok < 0)
        goto fail;
    if (dok) {
        if (Py_SIZE(self->landed) != 0)
            goto not_handled;
        if (Py_SIZE(self->frames) != 0 && frame_type != NULL) {
            /* A frame the decoder already holds (a read brought several): hand
             * out the next, as ChannelCore._next_message does for a plain one. */
            result = next_queued_from(channel, self->frames);
            if (result != NULL)
                goto out;
            if (PyErr_Occurred())
                goto fail;
            goto not_handled;
        }
        if (Py_SIZE(self->frames) != 0 || Py_SIZE(self->dec_fds) != 0)
            goto not_handled;
        idle = 1;
        bufobj = self->buf;
        Py_INCREF(bufobj);
        if (PyByteArray_Check(bufobj) && PyByteArray_GET_SIZE(bufobj) > FIRST_BUFFER)
            goto not_handled; /* grown: the Python path reads without blocking first, and shrinks it when idle */
    } else {
        /* Not idle: queued frames may still go out here, whatever else holds. */
        Py_ssize_t landed = attr_len(decoder, s_landed);
        if (landed != 0) {
            if (landed < 0)
                goto fail;
            goto not_handled;
        }
        if (frame_type != NULL) {
            PyObject *m = next_queued(channel, decoder);
            if (m != NULL) {
                result = m;
                goto out;
            }
            if (PyErr_Occurred())
                goto fail;
        }
        if (decoder_idle(decoder) == 1)
            bufobj = lookup(decoder, s_buf);
        if (PyErr_Occurred())
            goto fail;
        if (bufobj == NULL || (PyByteArray_Check(bufobj) && PyByteArray_GET_SIZE(bufobj) > FIRST_BUFFER))
            goto not_handled;
    }

    Py_buffer view;
    if (get_writable(bufobj, &view) < 0)
        goto fail;
    struct iovec iov = {view.buf, (size_t)view.len};
    union {
        char buf[CMSG_SPACE(sizeof(int) * SCM_MAX_FD)];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg;
    ssize_t n;
    int err = 0;
    for (;;) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        forget_dicts();
        n = msg_gil(self, &msg, MSG_CMSG_CLOEXEC, 1, 1, &err);
        if (n >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            /* Nothing was read: the channel is intact, as on the Python path. */
            release_writable(&view);
            goto fail;
        }
        /* Nothing was read.  A handler that returned (or another thread,
         * while the GIL was released) may have closed the channel, and its
         * fd number may name another file now: the Python path, as socket
         * methods read the fd afresh after EINTR. */
        int still = chan_check(self, channel);
        if (still < 0 || !(still & OK_RECV)) {
            release_writable(&view);
            if (still < 0)
                goto fail;
            goto not_handled;
        }
    }
    if (n < 0) {
        release_writable(&view);
        if (err == EAGAIN || err == EWOULDBLOCK)
            goto not_handled; /* the Python path waits */
        if (err != ECONNRESET)
            goto not_handled; /* nothing was read: the Python path reads again and raises its way */
        n = 0; /* a reset after the peer's data: its end of stream */
        msg.msg_controllen = 0;
        msg.msg_flags = 0;
    }

    int fds[SCM_MAX_FD + 1];
    Py_ssize_t nfds = 0;
    int odd = 0; /* ancillary data the lone path does not take */
    for (struct cmsghdr *c = msg.msg_controllen ? CMSG_FIRSTHDR(&msg) : NULL; c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0)) {
            odd = 1;
            continue;
        }
        Py_ssize_t k = (Py_ssize_t)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (Py_ssize_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (nfds <= SCM_MAX_FD) {
                fds[nfds++] = fd;
            } else {
                close(fd); /* more than any frame of one write carries: never kept */
                odd = 1;
            }
        }
    }
    int ctrunc = (msg.msg_flags & MSG_CTRUNC) != 0;
    const unsigned char *b = view.buf;
    if (n > 0 && !ctrunc && !odd && n >= HEADER_SIZE && nfds <= SCM_MAX_FD) {
        unsigned long long tag = get_le(b, 8), dnfds = get_le(b + 8, 4), aux = get_le(b + 12, 4),
                           plen = get_le(b + 16, 8);
        if (tag == self->tag && dnfds == (unsigned long long)nfds && (Py_ssize_t)dnfds <= self->fast_max_fds &&
            plen <= (unsigned long long)self->fast_max_payload && aux == 0 &&
            (unsigned long long)n == HEADER_SIZE + plen) {
            PyObject *payload = PyBytes_FromStringAndSize((const char *)b + HEADER_SIZE, (Py_ssize_t)plen);
            release_writable(&view);
            PyObject *raw = payload ? int_tuple(fds, nfds) : NULL;
            PyObject *m = raw ? make_message(payload, raw) : NULL;
            if (m == NULL || add_received_fast(self, decoder, n) < 0) {
                /* Read but not delivered: lost, as the Python path would lose it. */
                if (m == NULL)
                    close_fds(fds, nfds);
                Py_XDECREF(m);
                Py_XDECREF(payload);
                Py_XDECREF(raw);
                recv_cut(channel);
                goto fail;
            }
            /* A signal handler with an error to raise runs as this call
             * returns, in Channel.recv's frame: it finds the message in
             * its delivered record, closes it and says it was lost (_recv_lost).
             * Not checked here as well: that costs 50 instructions. */
            Py_DECREF(payload);
            Py_DECREF(raw);
            result = m;
            goto out;
        }
    }
    if (n > 0 && !ctrunc && !odd && idle && frame_type != NULL && dec_check(self) == 1 && Py_SIZE(self->frames) == 0 &&
        Py_SIZE(self->dec_fds) == 0 && Py_SIZE(self->landed) == 0) {
        /* Several whole plain frames (a send_many() group): queued here, as the decoder would. */
        Py_ssize_t k = scan_plain_frames(self, b, n, nfds);
        PyObject *frames = self->frames; /* held: a finalizer run by an allocation may change the dict */
        Py_INCREF(frames);
        if (k && decoder_takes_plain(decoder, nfds) && queue_plain_frames(frames, b, k, fds, self->received) == 0) {
            release_writable(&view);
            if (add_received_fast(self, decoder, n) < 0) {
                Py_DECREF(frames);
                recv_cut(channel); /* queued, but the stream offset is not: unusable */
                goto fail;
            }
            if (PyErr_CheckSignals() < 0) {
                /* As on the Python path: a handler's error right after a read
                 * that brought something makes the stream unusable (the frames
                 * are the decoder's, which the channel drops). */
                recv_cut(channel);
                Py_DECREF(frames);
                goto fail;
            }
            result = next_queued_from(channel, frames);
            Py_DECREF(frames);
            if (result != NULL)
                goto out;
            if (PyErr_Occurred())
                goto fail;
            goto not_handled;
        }
        Py_DECREF(frames);
        PyErr_Clear(); /* (out of memory) not queued: the Python decoder takes it all below */
    }
    release_writable(&view);
    {
        /* Not one lone frame: the decoder takes it all, as the Python path's read does. */
        PyObject *type = NULL, *value = NULL, *tb = NULL;
        if (PyErr_CheckSignals() < 0)
            PyErr_Fetch(&type, &value, &tb); /* raised once what was read is recorded */
        /* Everything allocated before the fds are listed: once in the list
         * they are the decoder's to close, never closed here as well. */
        PyObject *pn = PyLong_FromSsize_t(n);
        PyObject *list = pn != NULL ? int_list(fds, nfds) : NULL;
        PyObject *r = NULL;
        PyObject *landed = list != NULL ? lookup(decoder, s_landed) : NULL;
        /* Listed where a handler's error finds them (Decoder.landed), as the
         * Python path's read leaves them; _recv_rest clears the list. */
        if (landed == NULL || !PyList_CheckExact(landed) || PyList_Append(landed, list) < 0) {
            Py_CLEAR(list);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "Decoder.landed must be a list");
        }
        Py_XDECREF(landed);
        if (list == NULL) {
            close_fds(fds, nfds);
            if (type == NULL && (n > 0 || nfds > 0))
                recv_cut(channel); /* read, then lost (out of memory): the stream has a gap */
        } else {
            r = PyObject_CallFunctionObjArgs(recv_rest, channel, pn, list, ctrunc ? Py_True : Py_False, NULL);
            Py_DECREF(list);
        }
        Py_XDECREF(pn);
        if (type != NULL) {
            /* As on the Python path: a handler's error right after a read
             * that brought something makes the stream unusable. */
            Py_XDECREF(r);
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
            if (n > 0 || nfds > 0)
                recv_cut(channel);
            goto fail;
        }
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }

not_handled:
    result = Py_None;
    Py_INCREF(result);
    goto out;
fail:
    result = NULL;
out:
    Py_XDECREF(bufobj);
    Py_XDECREF(decoder);
    if (leave(self, channel, lock) < 0)
        Py_CLEAR(result);
    return result;
}

static PyObject *FastPath_send(FastPath *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t whole = -1;
    PyObject *r = send_impl(self, args, nargs, &whole);
    forget_dicts();
    /* After the call: code it ran (a fileno(), the Python path it handed
     * over to) may have made records of its own meanwhile. */
    PyObject *drop = NULL;
    Record *rec = record_for(calling_frame(), &drop);
    if (rec != NULL)
        rec->sent_whole = r == Py_True ? whole : -1;
    release_dropped(drop);
    return r;
}

static PyObject *FastPath_send_many(FastPath *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send_many(channel, messages)");
        return NULL;
    }
    PyObject *channel = args[0], *messages = args[1];
    Py_INCREF(channel);
    Py_INCREF(messages);
    Py_ssize_t taken = -1;
    PyObject *r = send_many_impl(self, channel, messages, &taken);
    Py_DECREF(messages);
    Py_DECREF(channel);
    PyObject *drop = NULL;
    Record *rec = record_for(calling_frame(), &drop);
    if (rec != NULL)
        rec->sent_many = r == Py_True ? taken : -1;
    release_dropped(drop);
    return r;
}

static PyObject *FastPath_recv(FastPath *self, PyObject *channel) {
    Py_INCREF(channel);
    PyObject *r = recv_impl(self, channel);
    forget_dicts();
    Py_DECREF(channel);
    PyObject *drop = NULL;
    Record *rec = record_for(calling_frame(), &drop);
    if (rec != NULL) {
        /* Not this frame's any more if it had one: this call's, or none. */
        PyObject *old = rec->delivered;
        if (r != NULL && r != Py_None) {
            Py_INCREF(r);
            rec->delivered = r;
        } else
            rec->delivered = NULL;
        if (old != NULL)
            drop = old; /* (a record found: nothing else dropped) */
    }
    release_dropped(drop);
    return r;
}


/* -- Message.close and Message.__del__ ------------------------------------------------
 *
 * setup() puts these on the Message class in place of its Python methods
 * (same behaviour, no Python frame per message): a message closed without
 * reading .fds closes its numbers here. */

static PyObject *closed_fd; /* the OwnedFd that owns nothing, shown for numbers closed unread */
static PyObject *closed_one; /* (closed_fd,) */

/* The raw numbers out of the message (it owns none afterwards); NULL if none. */
static PyObject *take_raw(PyObject *self) {
    PyObject *raw = SLOT(self, off_raw);
    if (raw == NULL || !(PyTuple_CheckExact(raw) || PyList_CheckExact(raw)) || Py_SIZE(raw) == 0)
        return NULL;
    Py_INCREF(empty_tuple);
    SLOT(self, off_raw) = empty_tuple;
    return raw; /* the slot's reference, now ours */
}

static PyObject *Message_close(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *first = NULL; /* the first OSError: (type, value, tb) as fetched */
    PyObject *ft = NULL, *fv = NULL, *ftb = NULL;
    PyObject *raw = SLOT(self, off_raw);
    if (raw != NULL && !(PyTuple_CheckExact(raw) || PyList_CheckExact(raw)) && PyObject_IsTrue(raw)) {
        /* Not what this module or Message._owning makes. */
        PyErr_SetString(PyExc_TypeError, "Message._raw must be a tuple or a list");
        return NULL;
    }
    raw = take_raw(self);
    if (raw != NULL) {
        Py_ssize_t n = Py_SIZE(raw);
        PyObject **items = PySequence_Fast_ITEMS(raw);
        /* Read afterwards, fds shows closed OwnedFds, as the Python close leaves it. */
        PyObject *shown;
        if (n == 1 && closed_one != NULL) {
            shown = closed_one; /* immutable: one serves every message of one fd */
            Py_INCREF(shown);
        } else
            shown = PyTuple_New(n);
        if (shown == NULL) {
            PyErr_Clear(); /* out of memory: closing matters more than what fds shows afterwards */
            shown = Py_NewRef(empty_tuple);
        } else if (shown != closed_one)
            for (Py_ssize_t i = 0; i < n; i++) {
                Py_INCREF(closed_fd);
                PyTuple_SET_ITEM(shown, i, closed_fd);
            }
        /* A move into OwnedFds that was cut short (Message._own_raw) left
         * some numbers in them: closed below, as the Python close does. */
        PyObject *moving = SLOT(self, off_fds);
        SLOT(self, off_fds) = shown;
        int err = close_numbers(items, n);
        if (err != 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            PyErr_Fetch(&ft, &fv, &ftb);
            first = ft;
        }
        Py_DECREF(raw);
        if (moving != NULL && PyTuple_CheckExact(moving)) {
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(moving); i++) {
                PyObject *r = PyObject_CallMethod(PyTuple_GET_ITEM(moving, i), "close", NULL);
                if (r != NULL) {
                    Py_DECREF(r);
                } else if (!PyErr_ExceptionMatches(PyExc_OSError)) {
                    /* Not the close's own error (a signal handler's): raised at
                     * once, as the loop over read fds does; the rest still own theirs. */
                    Py_XDECREF(ft);
                    Py_XDECREF(fv);
                    Py_XDECREF(ftb);
                    Py_DECREF(moving);
                    return NULL;
                } else if (first == NULL) {
                    PyErr_Fetch(&ft, &fv, &ftb);
                    first = ft;
                } else {
                    PyErr_Clear();
                }
            }
        }
        Py_XDECREF(moving);
        if (first != NULL) {
            PyErr_Restore(ft, fv, ftb);
            return NULL;
        }
        Py_RETURN_NONE;
    }
    /* fds that were read (or given): each OwnedFd closes its own; keep going on OSError. */
    PyObject *fds = SLOT(self, off_fds);
    if (fds == NULL)
        Py_RETURN_NONE;
    PyObject *seq = PySequence_Fast(fds, "Message.fds must be a sequence");
    if (seq == NULL)
        return NULL;
    /* As the Python close's for loop: a close() may change a list of fds,
     * so its size is read afresh and each item held while it closes. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *item = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
        PyObject *r = PyObject_CallMethod(item, "close", NULL);
        Py_DECREF(item);
        if (r != NULL) {
            Py_DECREF(r);
            continue;
        }
        if (!PyErr_ExceptionMatches(PyExc_OSError)) {
            Py_XDECREF(ft);
            Py_XDECREF(fv);
            Py_XDECREF(ftb);
            Py_DECREF(seq);
            return NULL;
        }
        if (first == NULL) {
            PyErr_Fetch(&ft, &fv, &ftb);
            first = ft;
        } else {
            PyErr_Clear();
        }
    }
    Py_DECREF(seq);
    if (first != NULL) {
        PyErr_Restore(ft, fv, ftb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Message_del(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *raw = take_raw(self);
    if (raw == NULL)
        Py_RETURN_NONE;
    Py_ssize_t n = Py_SIZE(raw);
    PyObject **items = PySequence_Fast_ITEMS(raw);
    /* Close them all first: with -W error::ResourceWarning the warning raises. */
    close_numbers(items, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(items[i]);
        if (fd < 0) {
            PyErr_Clear();
            continue;
        }
        if (PyErr_ResourceWarning(self, 1, "unclosed <OwnedFd fd=%ld>", fd) < 0) {
            Py_DECREF(raw);
            return NULL;
        }
    }
    Py_DECREF(raw);
    Py_RETURN_NONE;
}

/* A tp_finalize that runs *del* (a C __del__) as slot_tp_finalize runs a
 * __del__, without looking the method up and calling it per object. */
static void finalize_with(PyObject *self, PyObject *(*del)(PyObject *, PyObject *)) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = del(self, NULL);
    if (r == NULL)
        PyErr_WriteUnraisable(self);
    else
        Py_DECREF(r);
    PyErr_Restore(type, value, tb);
}

static void Message_finalize(PyObject *self) {
    PyObject *raw = SLOT(self, off_raw);
    if (raw == empty_tuple)
        return; /* closed, or its fds read: nothing to do (most messages) */
    finalize_with(self, Message_del);
}

/* Message's tp_dealloc: what subtype_dealloc does for it, without the
 * finalizer's call when nothing is left to close, and into spare_messages
 * where there is room.  Also the base dealloc of a subclass's instances
 * (subtype_dealloc has then untracked it and run its finalizer, cleared
 * the subclass's own slots and left the weakrefs and the type to us). */
static Py_ssize_t off_weaklist;
static void Message_dealloc(PyObject *self) {
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    /* As subtype_dealloc: a long chain of objects freed one by another
     * (a message whose payload is a message...) does not overflow the stack. */
    Py_TRASHCAN_BEGIN(self, Message_dealloc)
    if (type == message_type && type->tp_finalize != NULL &&
        (type->tp_finalize != Message_finalize || SLOT(self, off_raw) != empty_tuple)) {
        PyObject_GC_Track(self); /* as subtype_dealloc: tracked while the finalizer runs */
        if (PyObject_CallFinalizerFromDealloc(self) < 0)
            goto done; /* resurrected */
        PyObject_GC_UnTrack(self);
    }
    if (off_weaklist > 0 && SLOT(self, off_weaklist) != NULL)
        PyObject_ClearWeakRefs(self);
    Py_CLEAR(SLOT(self, off_payload));
    Py_CLEAR(SLOT(self, off_fds));
    Py_CLEAR(SLOT(self, off_raw));
    if (type == message_type && n_spare < MESSAGE_SPARE && !PyObject_GC_IsFinalized(self) &&
        (off_weaklist <= 0 || SLOT(self, off_weaklist) == NULL)) {
        spare_messages[n_spare++] = self; /* keeps its reference to the type */
        goto done;
    }
    type->tp_free(self);
    Py_DECREF(type);
done:;
    Py_TRASHCAN_END
}

/* drop_spare_messages() -> how many: frees the kept Messages, so that the
 * next recv() allocates its own (the out-of-memory sweeps reach it then). */
static PyObject *drop_spare_messages(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    int n = n_spare;
    while (n_spare > 0) {
        PyObject *m = spare_messages[--n_spare];
        PyTypeObject *type = Py_TYPE(m);
        type->tp_free(m);
        Py_DECREF(type);
    }
    return PyLong_FromLong(n);
}

static PyMethodDef message_close_def = {
    "close", Message_close, METH_NOARGS,
    "Close every fd of this message still owned here.  Idempotent.\n\n"
    "Closes them all even when one fails, then raises the first `OSError`."};
static PyMethodDef message_del_def = {"__del__", Message_del, METH_NOARGS, NULL};

/* -- the type and the module ---------------------------------------------------------- */

static int FastPath_init(FastPath *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", "tag", "send_flags", "fast_max_fds", "fast_max_payload", "blocking", NULL};
    self->blocking = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKinn|p", kwlist, &self->fd, &self->tag, &self->send_flags,
                                     &self->fast_max_fds, &self->fast_max_payload, &self->blocking))
        return -1;
    return 0;
}

static PyMethodDef FastPath_methods[] = {
    {"send", (PyCFunction)(void (*)(void))FastPath_send, METH_FASTCALL,
     "send(channel, payload, fds) -> True if the whole message left, False if not handled"},
    {"send_many", (PyCFunction)(void (*)(void))FastPath_send_many, METH_FASTCALL,
     "send_many(channel, messages) -> True if the messages left (or were handed over), False if not handled"},
    {"recv", (PyCFunction)FastPath_recv, METH_O,
     "recv(channel) -> Message, or None when the Python path must go on"},
    {NULL, NULL, 0, NULL},
};

/* The getters and `del fast[msg]` read the record of the frame that reads
 * them: the one that made the call. */
static PyObject *get_sent_whole(PyObject *Py_UNUSED(self), void *Py_UNUSED(closure)) {
    Record *rec = record_of(calling_frame());
    return PyLong_FromSsize_t(rec != NULL ? rec->sent_whole : -1);
}

static PyObject *get_sent_many(PyObject *Py_UNUSED(self), void *Py_UNUSED(closure)) {
    Record *rec = record_of(calling_frame());
    return PyLong_FromSsize_t(rec != NULL ? rec->sent_many : -1);
}

static PyObject *get_delivered(PyObject *Py_UNUSED(self), void *Py_UNUSED(closure)) {
    Record *rec = record_of(calling_frame());
    PyObject *d = rec != NULL && rec->delivered != NULL ? rec->delivered : Py_None;
    Py_INCREF(d);
    return d;
}

static int set_delivered(PyObject *Py_UNUSED(self), PyObject *value, void *Py_UNUSED(closure)) {
    PyObject *drop = NULL;
    Record *rec = value == NULL || value == Py_None ? record_of(calling_frame()) : record_for(calling_frame(), &drop);
    if (rec != NULL) {
        PyObject *old = rec->delivered;
        rec->delivered = value == Py_None ? NULL : value;
        Py_XINCREF(rec->delivered);
        Py_XDECREF(old);
    }
    release_dropped(drop);
    return 0;
}

/* `del fast[msg]`: Channel.recv's word that *msg* reached it, so it is no
 * longer its frame's delivered message (only if it still is).  A subscript,
 * not a call or the `delivered` setter: no signal handler can run at it, and
 * it costs about 40 instructions where an assignment through the getset
 * costs about 200. */
static int FastPath_forget(PyObject *Py_UNUSED(self), PyObject *key, PyObject *value) {
    if (value != NULL) {
        PyErr_SetString(PyExc_TypeError, "only `del fast[message]` is supported");
        return -1;
    }
    Record *rec = record_of(calling_frame());
    if (rec != NULL && rec->delivered == key)
        Py_CLEAR(rec->delivered);
    return 0;
}

static PyMappingMethods FastPath_mapping = {
    .mp_ass_subscript = FastPath_forget,
};

static PyMemberDef FastPath_members[] = {
    {"blocking", T_INT, offsetof(FastPath, blocking), 0,
     "the socket is in blocking mode: a call alone() makes without waiting is made again, waiting"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef FastPath_getset[] = {
    {"sent_whole", get_sent_whole, NULL, "bytes of the message the last send() made from the reading frame sent whole, else -1",
     NULL},
    {"sent_many", get_sent_many, NULL, "messages the last send_many() made from the reading frame sent (or left pending), else -1",
     NULL},
    {"delivered", get_delivered, set_delivered,
     "the Message the last recv() made from the reading frame returned, until Channel.recv clears it", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static void FastPath_dealloc(FastPath *self) {
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject FastPath_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fdchannel._speedups.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled send/recv of one Channel (fdchannel._fastpath makes it).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastPath_init,
    .tp_methods = FastPath_methods,
    .tp_getset = FastPath_getset,
    .tp_members = FastPath_members,
    .tp_as_mapping = &FastPath_mapping,
    .tp_dealloc = (destructor)FastPath_dealloc,
};

static Py_ssize_t slot_offset(PyObject *cls, const char *name) {
    PyObject *d = PyObject_GetAttrString(cls, name);
    if (d == NULL)
        return -1;
    if (!PyObject_TypeCheck(d, &PyMemberDescr_Type)) {
        Py_DECREF(d);
        PyErr_Format(PyExc_TypeError, "%s is not a slot", name);
        return -1;
    }
    PyMemberDef *def = ((PyMemberDescrObject *)d)->d_member;
    Py_ssize_t off = def->type == T_OBJECT_EX ? def->offset : -1;
    Py_DECREF(d);
    if (off < 0)
        PyErr_Format(PyExc_TypeError, "%s is not an object slot", name);
    return off;
}

/* setup(Message, closed_fd, Frame, send_rest, send_interrupted, recv_rest, send_many_rest) */
static PyObject *values_layout(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
#ifdef VALUES_OF
    return PyBool_FromLong(values_layout_ok);
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *alone_(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(alone());
}

/* For the tests: each close's index under fork_lock (False), as without
 * membarrier, or the fences again where they are registered (True). */
static PyObject *use_fences(PyObject *Py_UNUSED(module), PyObject *flag) {
    int on = PyObject_IsTrue(flag);
    if (on < 0)
        return NULL;
    __atomic_store_n(&fences, on && fences_usable, __ATOMIC_SEQ_CST);
    return PyBool_FromLong(fences);
}

static PyObject *setup(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *cls, *closed, *fcls, *a, *b, *c, *e;
    if (!PyArg_ParseTuple(args, "O!OO!OOOO", &PyType_Type, &cls, &closed, &PyType_Type, &fcls, &a, &b, &c, &e))
        return NULL;
#ifdef VALUES_OF
    check_values_layout();
#endif
    Py_ssize_t fc = slot_offset(fcls, "control"), fa = slot_offset(fcls, "aux"),
               fp = slot_offset(fcls, "payload"), ff = slot_offset(fcls, "fds"),
               fs = slot_offset(fcls, "shared"), fn = slot_offset(fcls, "nfds"),
               ft = slot_offset(fcls, "start");
    if (fc < 0 || fa < 0 || fp < 0 || ff < 0 || fs < 0 || fn < 0 || ft < 0)
        return NULL;
    off_f_nfds = fn;
    off_f_start = ft;
    off_f_shared = fs;
    off_f_control = fc;
    off_f_aux = fa;
    off_f_payload = fp;
    off_f_fds = ff;
    Py_INCREF(fcls);
    Py_XSETREF(frame_type, (PyTypeObject *)fcls);
    Py_ssize_t p = slot_offset(cls, "payload"), f = slot_offset(cls, "_fds"), r = slot_offset(cls, "_raw");
    if (p < 0 || f < 0 || r < 0)
        return NULL;
    Py_INCREF(cls);
    Py_XSETREF(message_type, (PyTypeObject *)cls);
    off_payload = p;
    off_fds = f;
    off_raw = r;
    Py_INCREF(a);
    Py_XSETREF(send_rest, a);
    Py_INCREF(b);
    Py_XSETREF(send_interrupted, b);
    Py_INCREF(c);
    Py_XSETREF(recv_rest, c);
    Py_INCREF(e);
    Py_XSETREF(send_many_rest, e);
    Py_INCREF(closed);
    Py_XSETREF(closed_fd, closed);
    Py_XSETREF(closed_one, PyTuple_Pack(1, closed));
    if (closed_one == NULL)
        return NULL;
    PyObject *close_m = PyDescr_NewMethod((PyTypeObject *)cls, &message_close_def);
    PyObject *del_m = PyDescr_NewMethod((PyTypeObject *)cls, &message_del_def);
    int bad = close_m == NULL || del_m == NULL || PyObject_SetAttrString(cls, "close", close_m) < 0 ||
              PyObject_SetAttrString(cls, "__del__", del_m) < 0;
    Py_XDECREF(close_m);
    Py_XDECREF(del_m);
    if (bad)
        return NULL;
    /* Assigning __del__ above made it slot_tp_finalize; a later assignment
     * of __del__ (or close) puts the generic slot back. */
    ((PyTypeObject *)cls)->tp_finalize = Message_finalize;
    if (((PyTypeObject *)cls)->tp_dealloc != Message_dealloc) {
        /* Its own slots and the weakref list are all it holds (no dict). */
        PyTypeObject *t = (PyTypeObject *)cls;
        if (t->tp_dictoffset != 0 || t->tp_base != &PyBaseObject_Type || t->tp_free != PyObject_GC_Del) {
            PyErr_SetString(PyExc_TypeError, "Message: not the layout the compiled path knows");
            return NULL;
        }
        off_weaklist = t->tp_weaklistoffset;
        t->tp_dealloc = Message_dealloc;
    }
#ifdef DIRECT_LOCKS
    PyObject *threading = PyImport_ImportModule("_thread");
    PyObject *lt = threading ? PyObject_GetAttrString(threading, "LockType") : NULL;
    Py_XDECREF(threading);
    if (lt == NULL)
        return NULL;
    if (PyType_Check(lt) && !strcmp(((PyTypeObject *)lt)->tp_name, "_thread.lock") &&
        ((PyTypeObject *)lt)->tp_basicsize == sizeof(lockobject))
        Py_XSETREF(lock_type, (PyTypeObject *)lt);
    else
        Py_DECREF(lt);
#ifdef __linux__
    PyObject *info = PyThread_GetInfo();
    PyObject *kind = info != NULL && PyTuple_Check(info) && PyTuple_GET_SIZE(info) >= 2 ? PyTuple_GET_ITEM(info, 1) : NULL;
    sem_locks = kind != NULL && PyUnicode_Check(kind) && PyUnicode_CompareWithASCIIString(kind, "semaphore") == 0;
    Py_XDECREF(info);
    PyErr_Clear();
#endif
#endif
    Py_RETURN_NONE;
}

/* channel_class(Channel): the class whose exact instances' state is cached
 * between calls (their dicts' versions say when to read it again). */
static PyObject *channel_class(PyObject *Py_UNUSED(module), PyObject *cls) {
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "channel_class() takes a class");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(channel_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

/* lock_kind() -> how the channel locks are taken: "semaphore" (sem_trywait
 * on the lock's own semaphore), "direct" (PyThread_acquire_lock_timed) or
 * "methods" (their acquire and release methods). */
static PyObject *lock_kind(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
#if defined(DIRECT_LOCKS) && defined(__linux__)
    if (lock_type != NULL && sem_locks)
        return PyUnicode_FromString("semaphore");
#endif
#ifdef DIRECT_LOCKS
    if (lock_type != NULL)
        return PyUnicode_FromString("direct");
#endif
    return PyUnicode_FromString("methods");
}

/* -- OwnedFd.__del__ and SealedMemory.__del__ ------------------------------------------
 *
 * finalizers(OwnedFd, SealedMemory) puts these on the two classes in place of
 * their Python __del__: a Python finalizer can be cut short at its first
 * instruction by a signal handler's error (CPython runs handlers on entry
 * to every Python function), leaving the fd of an unclosed object open for
 * good.  A C one has no such point: the fd is struck and closed before
 * anything can run.  Same behaviour otherwise: closed, then ResourceWarning
 * (SealedMemory: unless made quiet). */

typedef struct {
    Py_ssize_t off_fd, off_quiet; /* slot offsets; off_quiet -1: always warns */
    const char *name;
    int report_close; /* a failing close() is reported (unraisable), as OwnedFd's close_fd raises */
    PyTypeObject *type;   /* the class */
    PyObject *fd_member;  /* its _fd slot's descriptor: a subclass that declares its own is not read here */
    PyObject *python_del; /* the class's own __del__, for whatever is not read here */
} FdOwner;
static PyObject *s_fd_slot; /* "_fd" */
static FdOwner owned_fd_kind = {-1, -1, "OwnedFd", 1, NULL, NULL, NULL},
               sealed_kind = {-1, -1, "SealedMemory", 0, NULL, NULL, NULL};

static PyObject *owner_del(FdOwner *kind, PyObject *self) {
    if (Py_TYPE(self) != kind->type && _PyType_Lookup(Py_TYPE(self), s_fd_slot) != kind->fd_member)
        return PyObject_CallOneArg(kind->python_del, self); /* a subclass with an _fd slot of its own */
    PyObject *v = SLOT(self, kind->off_fd);
    if (v == NULL) /* __init__ never ran */
        Py_RETURN_NONE;
    int overflow = 0;
    long fd = PyLong_CheckExact(v) ? PyLong_AsLongAndOverflow(v, &overflow) : -1;
    if (!PyLong_CheckExact(v) || overflow || fd > INT_MAX)
        /* Not a number close() takes (a Windows SOCKET, a bad OwnedFd(2**32 + n)):
         * the Python finalizer's own way, which never closes a truncated number. */
        return PyObject_CallOneArg(kind->python_del, self);
    if (fd < 0)
        Py_RETURN_NONE;
    /* Struck first (-1 is a cached int: no allocation), then closed. */
    SLOT(self, kind->off_fd) = PyLong_FromLong(-1);
    Py_DECREF(v);
    int one = (int)fd, err = close_fds(&one, 1), closed = err == 0 || err == EINTR;
    int quiet = 0;
    if (kind->off_quiet >= 0) {
        PyObject *q = SLOT(self, kind->off_quiet);
        quiet = q != NULL && PyObject_IsTrue(q) == 1;
        PyErr_Clear();
    }
    if (!quiet && PyErr_ResourceWarning(self, 1, "unclosed <%s fd=%ld>", kind->name, fd) < 0)
        return NULL;
    if (!closed && kind->report_close) {
        errno = err; /* (EBADF: a sign of a double close elsewhere, as the Python finalizer says) */
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *OwnedFd_del(PyObject *self, PyObject *Py_UNUSED(ignored)) { return owner_del(&owned_fd_kind, self); }
static PyObject *Sealed_del(PyObject *self, PyObject *Py_UNUSED(ignored)) { return owner_del(&sealed_kind, self); }
static void OwnedFd_finalize(PyObject *self) { finalize_with(self, OwnedFd_del); }
static void Sealed_finalize(PyObject *self) { finalize_with(self, Sealed_del); }
static PyMethodDef owned_fd_del_def = {"__del__", OwnedFd_del, METH_NOARGS, NULL};
static PyMethodDef sealed_del_def = {"__del__", Sealed_del, METH_NOARGS, NULL};

static int install_finalizer(PyObject *cls, FdOwner *kind, PyMethodDef *def, destructor finalize, int quiet) {
    Py_ssize_t f = slot_offset(cls, "_fd"), q = quiet ? slot_offset(cls, "_quiet") : -1;
    if (f < 0 || (quiet && q < 0))
        return -1;
    PyObject *member = _PyType_Lookup((PyTypeObject *)cls, s_fd_slot);
    if (member == NULL) {
        PyErr_SetString(PyExc_TypeError, "no _fd slot");
        return -1;
    }
    PyObject *old = PyObject_GetAttrString(cls, "__del__");
    if (old == NULL)
        return -1;
    if (PyCFunction_Check(old) || Py_TYPE(old) == &PyMethodDescr_Type) {
        Py_DECREF(old); /* installed already (another setup of this module) */
        return 0;
    }
    PyObject *m = PyDescr_NewMethod((PyTypeObject *)cls, def);
    if (m == NULL || PyObject_SetAttrString(cls, "__del__", m) < 0) {
        Py_XDECREF(m);
        Py_DECREF(old);
        return -1;
    }
    Py_DECREF(m);
    kind->off_fd = f;
    kind->off_quiet = q;
    Py_INCREF(cls);
    Py_XSETREF(kind->type, (PyTypeObject *)cls);
    Py_INCREF(member);
    Py_XSETREF(kind->fd_member, member);
    Py_XSETREF(kind->python_del, old);
    /* As for Message: the assignment made it slot_tp_finalize; this one
     * needs no lookup of __del__ per object. */
    ((PyTypeObject *)cls)->tp_finalize = finalize;
    return 0;
}

/* finalizers(OwnedFd, SealedMemory) */
static PyObject *finalizers(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *owned, *sealed;
    if (s_fd_slot == NULL && (s_fd_slot = PyUnicode_InternFromString("_fd")) == NULL)
        return NULL;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &owned, &PyType_Type, &sealed))
        return NULL;
    if (install_finalizer(owned, &owned_fd_kind, &owned_fd_del_def, OwnedFd_finalize, 0) < 0 ||
        install_finalizer(sealed, &sealed_kind, &sealed_del_def, Sealed_finalize, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"finalizers", finalizers, METH_VARARGS, "finalizers(OwnedFd, SealedMemory): C versions of their __del__"},
    {"drop_spare_messages", drop_spare_messages, METH_NOARGS,
     "drop_spare_messages() -> int: free the Messages kept for reuse"},
    {"lock_kind", lock_kind, METH_NOARGS, "lock_kind() -> 'semaphore', 'direct' or 'methods'"},
    {"channel_class", channel_class, METH_O, "channel_class(Channel): the class whose instances' state is cached"},
    {"alone", alone_, METH_NOARGS, "alone() -> whether the system calls made now keep the GIL (no other thread could run)"},
    {"use_fences", use_fences, METH_O, "use_fences(flag) -> whether closes now rely on a fork's membarrier (for the tests)"},
    {"values_layout", values_layout, METH_NOARGS, "values_layout() -> whether instance dicts are read without a guard once made (CPython 3.11)"},
    {"setup", setup, METH_VARARGS, "setup(Message, closed_fd, Frame, send_rest, send_interrupted, recv_rest, send_many_rest)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "fdchannel._speedups", "The compiled fast path of fdchannel.Channel.", -1,
    module_methods,
};

#define INTERN(var, text)                                                                                    \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                                \
        return NULL;

PyMODINIT_FUNC PyInit__speedups(void) {
    static int at_fork;
    if (!at_fork) {
        register_fences();
        if (pthread_atfork(fork_prepare, fork_parent, close_pending_in_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
        at_fork = 1;
    }
    INTERN(s_closed, "_closed");
    INTERN(s_broken, "_broken");
    INTERN(s_outbox, "_outbox");
    INTERN(s_pending, "pending");
    INTERN(s_send_lock, "_send_lock");
    INTERN(s_recv_lock, "_recv_lock");
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_max_payload, "max_payload");
    INTERN(s_max_fds, "max_fds");
    INTERN(s_decoder, "_decoder");
    INTERN(s_frames, "frames");
    INTERN(s_error, "error");
    INTERN(s_eof, "eof");
    INTERN(s_lone, "_lone");
    INTERN(s_end, "_end");
    INTERN(s_big, "_big");
    INTERN(s_fds, "_fds");
    INTERN(s_buf, "_buf");
    INTERN(s_received, "_received");
    INTERN(s_drop_held, "_drop_held");
    INTERN(s_push_back, "push_back");
    INTERN(s_fileno, "fileno");
    INTERN(s_popleft, "popleft");
    INTERN(s_appendleft, "appendleft");
    INTERN(s_suspect, "_suspect");
    INTERN(s_unclaimed, "_unclaimed");
    INTERN(s_share_above, "_share_above");
    INTERN(s_delivering, "_delivering");
    INTERN(s_landed, "landed");
    INTERN(s_recv_interrupted, "_recv_interrupted");
    INTERN(s_ahead, "_ahead");
    INTERN(s_fast, "_fast");
    INTERN(s_recv, "_recv");
    INTERN(s_watch, "_watch");
    INTERN(s_evicted, "evicted");
    INTERN(s_max_held_fds, "max_held_fds");
    INTERN(s_extend, "extend");
    INTERN(s_messages_taken, "messages_taken");
    if ((empty_tuple = PyTuple_New(0)) == NULL || (empty_bytes = PyBytes_FromStringAndSize(NULL, 0)) == NULL)
        return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    PyObject *dq = collections ? PyObject_GetAttrString(collections, "deque") : NULL;
    Py_XDECREF(collections);
    if (dq == NULL)
        return NULL;
    if (!PyType_Check(dq)) {
        Py_DECREF(dq);
        PyErr_SetString(PyExc_TypeError, "collections.deque is not a type");
        return NULL;
    }
    deque_type = (PyTypeObject *)dq; /* kept for the module's life */
    if (PyType_Ready(&FastPath_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    /* fdchannel._fastpath compares them with the codec's before using this module. */
    if (PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "FIRST_BUFFER", FIRST_BUFFER) < 0 ||
        PyModule_AddIntConstant(m, "SCM_MAX_FD", SCM_MAX_FD) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&FastPath_Type);
    if (PyModule_AddObject(m, "FastPath", (PyObject *)&FastPath_Type) < 0) {
        Py_DECREF(&FastPath_Type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
