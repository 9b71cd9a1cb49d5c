/* Runs a core binary's version command off the event loop (see probe.h).
 * Owns the child process, its output pipe and its pidfd until the child is
 * reaped; the result is delivered once. */
#include "core/probe.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/err.h"

struct pn_core_probe {
    pid_t pid;
    int out_fd, pid_fd;
    struct event *ev_out, *ev_exit, *ev_timeout;
    char out[4096];
    size_t out_len;
    pn_core_probe_cb cb;
    void *arg;
};

/* Reads what the child wrote so far (keeping the first 4 KiB); returns true
 * at end of file. */
static bool drain_output(struct pn_core_probe *p)
{
    for (;;) {
        char sink[512];
        bool keep = p->out_len < sizeof p->out - 1;
        ssize_t n = keep ? read(p->out_fd, p->out + p->out_len, sizeof p->out - 1 - p->out_len)
                         : read(p->out_fd, sink, sizeof sink);
        if (n == 0)
            return true;
        if (n < 0)
            return errno != EAGAIN && errno != EINTR;
        if (keep)
            p->out_len += (size_t)n;
        p->out[p->out_len] = '\0';
    }
}

static void probe_free(struct pn_core_probe *p)
{
    if (p->pid > 0) {
        kill(p->pid, SIGKILL);
        waitpid(p->pid, NULL, 0);
    }
    event_free(p->ev_out);
    event_free(p->ev_exit);
    event_free(p->ev_timeout);
    close(p->out_fd);
    if (p->pid_fd >= 0)
        close(p->pid_fd);
    free(p);
}

/* The child exited (or the deadline passed): reap it, parse, report. */
static void finish(struct pn_core_probe *p, bool timed_out)
{
    int status = 0;
    if (timed_out)
        kill(p->pid, SIGKILL);
    waitpid(p->pid, &status, 0);
    p->pid = 0;
    drain_output(p);

    struct pn_core_version ver;
    char detail[160];
    int rv;
    if (timed_out) {
        rv = PN_ERR_TIMEOUT;
        snprintf(detail, sizeof detail, "the version command did not finish in time");
    } else if (pn_core_parse_version(p->out, &ver) == PN_OK) {
        rv = PN_OK;
        snprintf(detail, sizeof detail, "%s %s", pn_core_kind_name(ver.kind), ver.text);
    } else {
        rv = PN_ERR_INVAL;
        char first[100];
        size_t n = strcspn(p->out, "\r\n");
        if (n >= sizeof first)
            n = sizeof first - 1;
        memcpy(first, p->out, n);
        first[n] = '\0';
        snprintf(detail, sizeof detail, "no version line (exit status %d, output \"%s\")",
                 WIFEXITED(status) ? WEXITSTATUS(status) : -1, first);
    }
    pn_core_probe_cb cb = p->cb;
    void *arg = p->arg;
    probe_free(p);
    cb(rv, rv == PN_OK ? &ver : NULL, detail, arg);
}

static void on_output(evutil_socket_t fd, short what, void *arg)
{
    struct pn_core_probe *p = arg;
    if (drain_output(p))
        event_del(p->ev_out); /* the exit event ends the probe */
}

static void on_exit_ev(evutil_socket_t fd, short what, void *arg)
{
    struct pn_core_probe *p = arg;
    if (p->pid_fd < 0) { /* no pidfd (ENOSYS: valgrind, Linux < 5.3): polled */
        siginfo_t si = {0};
        if (waitid(P_PID, (id_t)p->pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == 0)
            return;
    }
    finish(arg, false);
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
    finish(arg, true);
}

int pn_core_probe_start(struct event_base *base, const char *exe, unsigned timeout_ms,
                        pn_core_probe_cb cb, void *arg, struct pn_core_probe **out, char *err,
                        size_t errlen)
{
    int pipefd[2] = {-1, -1};
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return pn_seterr(err, errlen, PN_ERR_IO, "pipe: %s", strerror(errno));

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
    posix_spawn_file_actions_adddup2(&fa, pipefd[1], 2);
    char *const argv[] = {(char *)exe, "-version", NULL};
    /* Nothing of the node's environment (API_KEY) reaches the core. */
    char *const envp[] = {NULL};
    pid_t pid;
    int rc = posix_spawn(&pid, exe, &fa, NULL, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    close(pipefd[1]);
    if (rc != 0) {
        close(pipefd[0]);
        return pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", exe, strerror(rc));
    }
    int pid_fd = pidfd_open(pid, 0);
    if (pid_fd < 0 && errno != ENOSYS) {
        int e = errno;
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        close(pipefd[0]);
        return pn_seterr(err, errlen, PN_ERR_IO, "pidfd_open: %s", strerror(e));
    }
    fcntl(pipefd[0], F_SETFL, O_NONBLOCK);

    struct pn_core_probe *p = pn_new(struct pn_core_probe);
    p->pid = pid;
    p->out_fd = pipefd[0];
    p->pid_fd = pid_fd;
    p->cb = cb;
    p->arg = arg;
    p->ev_out = event_new(base, p->out_fd, EV_READ | EV_PERSIST, on_output, p);
    p->ev_exit = p->pid_fd >= 0 ? event_new(base, p->pid_fd, EV_READ, on_exit_ev, p)
                                : event_new(base, -1, EV_PERSIST, on_exit_ev, p);
    p->ev_timeout = evtimer_new(base, on_timeout, p);
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    event_add(p->ev_out, NULL);
    struct timeval poll_tv = {0, 20 * 1000};
    event_add(p->ev_exit, p->pid_fd >= 0 ? NULL : &poll_tv);
    event_add(p->ev_timeout, &tv);
    if (out)
        *out = p;
    return PN_OK;
}

void pn_core_probe_cancel(struct pn_core_probe *p)
{
    if (p)
        probe_free(p);
}
