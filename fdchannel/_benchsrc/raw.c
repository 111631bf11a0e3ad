/* The raw C reference of `python -m fdchannel bench`: sendmsg/recvmsg with
 * SCM_RIGHTS and nothing else (no framing, no checks beyond the kernel's).
 *
 *   raw MODE COUNT     prints the seconds the workload took
 *
 * MODE: local1 (one process: send 1 byte + 1 fd, receive it, close the fd),
 * stream1 (the same, sender and receiver in two processes), fd200 (one
 * process, 200 fds per message), batch (one process, BATCH messages of
 * 1 byte + 1 fd sent with one sendmsg each, then received).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define MANY 200
#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void send_fds(int sock, const int *fds, int n) {
    char byte = 'x';
    struct iovec iov = {&byte, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int) * MANY)];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * n);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * n);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * n);
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != 1)
        die("sendmsg");
}

/* Receive one message and close every fd it brought; returns how many. */
static int recv_close(int sock) {
    char byte;
    struct iovec iov = {&byte, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int) * MANY)];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1)
        die("recvmsg");
    if (msg.msg_flags & MSG_CTRUNC) {
        fprintf(stderr, "MSG_CTRUNC\n");
        exit(1);
    }
    int got = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int fds[MANY];
        memcpy(fds, CMSG_DATA(c), sizeof(int) * n);
        for (int i = 0; i < n; i++)
            close(fds[i]);
        got += n;
    }
    return got;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: raw local1|stream1|fd200|batch COUNT\n");
        return 2;
    }
    const char *mode = argv[1];
    long count = atol(argv[2]);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
        die("socketpair");
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("open");
    int many[MANY];
    for (int i = 0; i < MANY; i++)
        many[i] = fd;
    double start, elapsed;
    if (!strcmp(mode, "local1")) {
        start = now();
        for (long i = 0; i < count; i++) {
            send_fds(sv[0], &fd, 1);
            recv_close(sv[1]);
        }
        elapsed = now() - start;
    } else if (!strcmp(mode, "fd200")) {
        start = now();
        for (long i = 0; i < count; i++) {
            send_fds(sv[0], many, MANY);
            if (recv_close(sv[1]) != MANY)
                die("fd200: fds missing");
        }
        elapsed = now() - start;
    } else if (!strcmp(mode, "batch")) {
        start = now();
        for (long i = 0; i < count; i += BATCH) {
            for (int j = 0; j < BATCH; j++)
                send_fds(sv[0], &fd, 1);
            for (int j = 0; j < BATCH; j++)
                recv_close(sv[1]);
        }
        elapsed = now() - start;
    } else if (!strcmp(mode, "stream1")) {
        int ready[2];
        if (pipe(ready))
            die("pipe");
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            close(sv[0]);
            if (write(ready[1], "r", 1) != 1)
                die("write");
            for (long i = 0; i < count; i++)
                recv_close(sv[1]);
            _exit(0);
        }
        close(sv[1]);
        char c;
        if (read(ready[0], &c, 1) != 1)
            die("read");
        start = now();
        for (long i = 0; i < count; i++)
            send_fds(sv[0], &fd, 1);
        int status;
        if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
            die("receiver");
        elapsed = now() - start;
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    printf("%.9f\n", elapsed);
    return 0;
}
