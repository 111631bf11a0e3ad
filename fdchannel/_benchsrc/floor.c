/* The "python-floor" reference of `python -m fdchannel bench`: the least a
 * Python API with one call per send, receive and close can cost.  Three
 * functions, each one system call with the GIL released around it (as the
 * compiled path and the stdlib release it) and nothing else: no framing,
 * no payload object, no object owning the fd, no lock, no checks.
 *
 *   send1(sock, fd)   one byte and one fd
 *   recv1(sock)       -> the fd received (an int)
 *   close1(fd)
 *
 * Built on the fly by the benchmark (cc -shared), loaded from its temporary
 * directory; never part of the package.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} control;

/* *msg* for one byte at *iov* and room for one fd in *ctl*. */
static void one_fd_message(struct msghdr *msg, struct iovec *iov, control *ctl) {
    memset(msg, 0, sizeof *msg);
    msg->msg_iov = iov;
    msg->msg_iovlen = 1;
    msg->msg_control = ctl->buf;
    msg->msg_controllen = sizeof ctl->buf;
}

static PyObject *send1(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send1(sock, fd)");
        return NULL;
    }
    int sock = (int)PyLong_AsLong(args[0]), fd = (int)PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    char byte = 'x';
    struct iovec iov = {&byte, 1};
    control ctl;
    struct msghdr msg;
    one_fd_message(&msg, &iov, &ctl);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    Py_END_ALLOW_THREADS
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *recv1(PyObject *Py_UNUSED(module), PyObject *arg) {
    int sock = (int)PyLong_AsLong(arg);
    if (PyErr_Occurred())
        return NULL;
    char byte;
    struct iovec iov = {&byte, 1};
    control ctl;
    struct msghdr msg;
    one_fd_message(&msg, &iov, &ctl);
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    Py_END_ALLOW_THREADS
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (n != 1 || c == NULL || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int))) {
        if (c != NULL && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int stray;
            memcpy(&stray, CMSG_DATA(c), sizeof stray);
            close(stray); /* what did come is not kept */
        }
        PyErr_SetString(PyExc_RuntimeError, "recv1: not one byte and one fd");
        return NULL;
    }
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return PyLong_FromLong(fd);
}

static PyObject *close1(PyObject *Py_UNUSED(module), PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg), r;
    if (PyErr_Occurred())
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = close(fd);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"send1", (PyCFunction)(void (*)(void))send1, METH_FASTCALL, "send1(sock, fd)"},
    {"recv1", recv1, METH_O, "recv1(sock) -> fd"},
    {"close1", close1, METH_O, "close1(fd)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_fdbench_floor", NULL, -1, methods,
                                        NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fdbench_floor(void) { return PyModule_Create(&module_def); }
