/* A thread that Python did not start (test_gil.py): it waits until a given
 * thread of this process is inside recvmsg(), then calls back into Python,
 * which registers it with the interpreter (ctypes' callbacks take the GIL
 * through PyGILState_Ensure) only then. */
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>

typedef void (*callback)(int found);

static callback cb;
static int target;

static int in_recvmsg(void) {
    char path[64];
    long nr = -1;
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", target);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    if (fscanf(f, "%ld", &nr) != 1) /* "running" */
        nr = -1;
    fclose(f);
    return nr == SYS_recvmsg;
}

static void *run(void *arg) {
    (void)arg;
    /* /proc tells no event: read it every millisecond, for at most 20 s. */
    struct timespec tick = {0, 1000000};
    int found = 0;
    for (int i = 0; i < 20000 && !(found = in_recvmsg()); i++)
        nanosleep(&tick, NULL);
    cb(found);
    return NULL;
}

int start_when_in_recvmsg(int tid, callback f) {
    pthread_t t;
    cb = f;
    target = tid;
    if (pthread_create(&t, NULL, run, NULL) != 0)
        return -1;
    return pthread_detach(t);
}
