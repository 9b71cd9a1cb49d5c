/* The core supervisor (see supervisor.h). It owns every core process it
 * spawned, one `struct pn_core_gen` each: the process (always reaped), its
 * stdin pipe (the config, written through the event loop), its output pipe
 * (split into lines), its pidfd, its timers and its API client, plus the
 * owner's per-generation data. The supervisor itself owns the list of
 * generations, the crash-restart timer, the pending stop requests, and one
 * zero-timeout "defer" event: every step that frees a generation or hands a
 * result to the owner runs from it, never from inside a callback of the
 * generation's own API client or pipes.
 *
 * Life of a generation:
 *   STARTING  spawned; config being written; GetSysStats polled every 75 ms
 *   FAILED    the start failed; the process is already killed and reaped;
 *             the result waits for the defer event
 *   ACTIVE    ready and serving (at most one)
 *   DRAINING  retired by a newer generation; keeps its connections
 *   STOPPING  before_stop is running (the owner banks its counters)
 *   TERM      SIGTERM sent; SIGKILL after 5 s
 *   DEAD      reaped; freed by the defer event
 * At most one generation is STARTING at any time: a new start supersedes a
 * pending one (or a crash restart in flight).
 *
 * The node ignores SIGPIPE (the stdin pipe to a core that died mid-write
 * must not kill it). */
#include "core/supervisor.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"
#include "base/time.h"
#include "core/coreapi.h"


#define LINE_MAX_LEN 65536  /* longer lines go out in parts (marzban.md §4) */
#define POLL_MS 75          /* readiness poll period */
#define FAST_POLL_MS 2      /* first readiness poll; doubles up to POLL_MS */
#define POLL_TIMEOUT_MS 500 /* one GetSysStats */
#define MARKER_GRACE_MS 250 /* a marker line, then an exit within this, is an exit */
#define DRAIN_CHECK_MS 1000 /* how often a retired core's connections are counted */
#define TERM_GRACE_MS 5000  /* SIGTERM, then SIGKILL */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 10000
#define HEALTHY_MS 60000  /* uptime that resets the backoff */
#define EXIT_POLL_MS 20   /* exit polling when pidfd_open is missing */
#define LAST_LINE_MAX 512 /* kept for crash details */
#define DEFAULT_START_TIMEOUT_MS 60000
#define DEFAULT_TAIL 200

enum gen_state {
    GEN_STARTING,
    GEN_FAILED,
    GEN_ACTIVE,
    GEN_DRAINING,
    GEN_STOPPING,
    GEN_TERM,
    GEN_DEAD,
};

struct pn_core_gen {
    struct pn_supervisor *sup;
    struct pn_core_gen *next;
    uint64_t id;
    enum gen_state state;
    bool is_restart; /* spawned by the crash restart, not by a start */
    bool polling;    /* a GetSysStats is in flight */
    bool ready;      /* it answered; activation waits for the defer event */
    bool freeing;    /* its API client is being freed: ignore late answers */

    pid_t pid;
    bool alive; /* spawned and not yet reaped */
    int status;
    int pid_fd, in_fd, out_fd;
    struct event *ev_exit, *ev_in, *ev_out, *ev_tick, *ev_deadline, *ev_grace;
    struct event *ev_fast; /* the readiness ramp right after spawn */
    unsigned fast_ms;
    uint16_t api_port;
    struct pn_coreapi *api;
    uint64_t started_ms;

    pn_supervisor_start_cb cb; /* a start's result; NULL for restarts */
    void *cb_arg;
    int fail_rv;
    char *fail_err;

    char *config; /* what is left to write to stdin */
    size_t config_len, config_off;

    char *line; /* the line being assembled (LINE_MAX_LEN + 1) */
    size_t line_len;
    char **tail; /* ring of the last startup_tail lines while starting */
    size_t tail_n, tail_pos;
    char *marker; /* the first failure marker line seen while starting */
    char last_line[LAST_LINE_MAX];

    void *data;
    void (*free_data)(void *);
};

struct stop_req {
    struct stop_req *next;
    uint64_t max_id; /* done when no generation up to this id is left */
    void (*cb)(void *arg);
    void *arg;
};

struct pn_supervisor {
    struct pn_supervisor_opts o;
    char *exe, *assets;
    struct pn_core_gen *gens; /* oldest first */
    struct pn_core_gen *active;
    uint64_t last_id;
    bool restarting;
    unsigned next_delay_ms;
    struct event *ev_restart, *ev_defer;
    struct stop_req *stops;
};

static void on_defer(evutil_socket_t fd, short what, void *arg);

/* ---- small helpers ------------------------------------------------------ */

static struct timeval ms_tv(unsigned ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    return tv;
}

/* Schedules the defer event for the next loop iteration. */
static void kick(struct pn_supervisor *sup)
{
    struct timeval zero = {0, 0};
    evtimer_add(sup->ev_defer, &zero);
}

static void del_event(struct event *ev)
{
    if (ev)
        event_del(ev);
}

/* Signals the core and anything it started (it leads its own session). */
static void gen_signal(struct pn_core_gen *g, int sig)
{
    if (g->alive) {
        kill(-g->pid, sig);
        kill(g->pid, sig);
    }
}

/* Kills a process the supervisor gave up on and reaps it right away, so a
 * failed or cancelled start leaves no process behind when its result is
 * reported. */
static void gen_kill_reap(struct pn_core_gen *g)
{
    if (!g->alive)
        return;
    gen_signal(g, SIGKILL);
    int st = 0;
    while (waitpid(g->pid, &st, 0) < 0 && errno == EINTR)
        ;
    g->status = st;
    g->alive = false;
}

/* Stops everything that could still call back into the generation, except
 * its API client (freed with it). */
static void gen_quiesce(struct pn_core_gen *g)
{
    del_event(g->ev_exit);
    del_event(g->ev_in);
    del_event(g->ev_out);
    del_event(g->ev_tick);
    del_event(g->ev_fast);
    del_event(g->ev_deadline);
    del_event(g->ev_grace);
    if (g->in_fd >= 0) {
        close(g->in_fd);
        g->in_fd = -1;
    }
    free(g->config);
    g->config = NULL;
}

static void tail_clear(struct pn_core_gen *g)
{
    size_t cap = g->sup->o.startup_tail;
    if (g->tail)
        for (size_t i = 0; i < cap; i++)
            free(g->tail[i]);
    free(g->tail);
    g->tail = NULL;
    g->tail_n = g->tail_pos = 0;
    free(g->marker);
    g->marker = NULL;
}

/* Frees a generation that is out of the list: its process (killed if still
 * there, which only pn_supervisor_free allows), events, API client (whose
 * pending calls fail with PN_ERR_CLOSED) and the owner's data. */
static void gen_free(struct pn_core_gen *g)
{
    g->freeing = true;
    gen_kill_reap(g);
    gen_quiesce(g);
    if (g->ev_exit)
        event_free(g->ev_exit);
    if (g->ev_in)
        event_free(g->ev_in);
    if (g->ev_out)
        event_free(g->ev_out);
    if (g->ev_tick)
        event_free(g->ev_tick);
    if (g->ev_fast)
        event_free(g->ev_fast);
    if (g->ev_deadline)
        event_free(g->ev_deadline);
    if (g->ev_grace)
        event_free(g->ev_grace);
    if (g->pid_fd >= 0)
        close(g->pid_fd);
    if (g->out_fd >= 0)
        close(g->out_fd);
    if (g->api)
        pn_coreapi_free(g->api);
    tail_clear(g);
    free(g->line);
    free(g->fail_err);
    if (g->free_data)
        g->free_data(g->data);
    free(g);
}

static void gen_unlink(struct pn_supervisor *sup, struct pn_core_gen *g)
{
    for (struct pn_core_gen **p = &sup->gens; *p; p = &(*p)->next) {
        if (*p == g) {
            *p = g->next;
            g->next = NULL;
            return;
        }
    }
}

static struct pn_core_gen *find_starting(const struct pn_supervisor *sup)
{
    for (struct pn_core_gen *g = sup->gens; g; g = g->next)
        if (g->state == GEN_STARTING)
            return g;
    return NULL;
}

static bool user_start_pending(const struct pn_supervisor *sup)
{
    const struct pn_core_gen *g = find_starting(sup);
    return g && !g->is_restart;
}

/* Ends a start: the process is killed and reaped now, the result (rv and
 * the owned text err) is delivered by the defer event. */
static void gen_fail(struct pn_core_gen *g, int rv, char *err)
{
    gen_kill_reap(g);
    gen_quiesce(g);
    g->state = GEN_FAILED;
    g->fail_rv = rv;
    free(g->fail_err);
    g->fail_err = err;
    kick(g->sup);
}

/* ---- output lines ------------------------------------------------------- */

static const char *const fail_markers[] = {
    "failed to start",           "panic",       "fatal",          "permission denied",
    "no such file or directory", "cannot find", "failed to open", "failed to load",
    "failed to listen",
};

/* A startup line that means the core cannot start (spec pasarguard.md
 * §14). Per-connection noise is ignored: rejected clients, and lines about
 * one connection ending (a new generation can take connections while it
 * starts, and their errors are not start failures). */
static bool is_failure_line(const char *line)
{
    if (strcasestr(line, "invalid request user id") || strcasestr(line, "rejected proxy/") ||
        strcasestr(line, "connection ends"))
        return false;
    for (size_t i = 0; i < sizeof fail_markers / sizeof fail_markers[0]; i++)
        if (strcasestr(line, fail_markers[i]))
            return true;
    return false;
}

static void on_grace(evutil_socket_t fd, short what, void *arg);

static void poll_ready(struct pn_core_gen *g);

/* One complete line: to the owner, to the last-line slot, and while
 * starting to the tail and the marker scan. */
static void emit_line(struct pn_core_gen *g)
{
    struct pn_supervisor *sup = g->sup;
    size_t len = g->line_len;
    g->line_len = 0;
    if (len > 0 && g->line[len - 1] == '\r')
        len--;
    g->line[len] = '\0';

    snprintf(g->last_line, sizeof g->last_line, "%s", g->line);
    if (g->state == GEN_STARTING && g->tail) {
        size_t cap = sup->o.startup_tail;
        free(g->tail[g->tail_pos]);
        g->tail[g->tail_pos] = pn_strndup(g->line, len);
        g->tail_pos = (g->tail_pos + 1) % cap;
        if (g->tail_n < cap)
            g->tail_n++;
        if (!g->marker && is_failure_line(g->line)) {
            g->marker = pn_strndup(g->line, len);
            struct timeval tv = ms_tv(MARKER_GRACE_MS);
            evtimer_add(g->ev_grace, &tv);
        }
        /* `V2Ray 4.34.0 started` / `Xray 26.7.28 started`: ask now. */
        if (strstr(g->line, " started"))
            poll_ready(g);
    }
    if (sup->o.on_line)
        sup->o.on_line(g, g->line, len, sup->o.arg);
}

/* A line reached LINE_MAX_LEN without its newline: send what we have as a
 * line of its own, cut on a UTF-8 character boundary, and keep the bytes of
 * a character split by the limit for the next part. */
static void emit_part(struct pn_core_gen *g)
{
    size_t len = g->line_len, start = len;
    while (start > 0 && len - start < 3 && ((unsigned char)g->line[start - 1] & 0xC0) == 0x80)
        start--;
    size_t cut = len;
    if (start > 0) {
        unsigned char lead = (unsigned char)g->line[start - 1];
        size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
        if (need > len - (start - 1))
            cut = start - 1; /* that character continues in the next read */
    }
    char tail[4];
    size_t tn = len - cut;
    memcpy(tail, g->line + cut, tn);
    g->line_len = cut;
    emit_line(g);
    memcpy(g->line, tail, tn);
    g->line_len = tn;
}

/* Splits output bytes into lines; a line longer than LINE_MAX_LEN goes out
 * in parts of at most LINE_MAX_LEN bytes, nothing dropped. */
static void feed_output(struct pn_core_gen *g, const char *p, size_t n)
{
    while (n > 0) {
        const char *nl = memchr(p, '\n', n);
        size_t seg = nl ? (size_t)(nl - p) : n;
        size_t room = LINE_MAX_LEN - g->line_len;
        if (seg > room) {
            memcpy(g->line + g->line_len, p, room);
            g->line_len += room;
            p += room;
            n -= room;
            emit_part(g);
            continue;
        }
        memcpy(g->line + g->line_len, p, seg);
        g->line_len += seg;
        if (!nl)
            return;
        emit_line(g);
        p = nl + 1;
        n -= seg + 1;
    }
}

/* Reads what the core wrote, at most max_reads chunks (so a chatty core
 * cannot starve the loop). At end of file the last partial line is
 * emitted and the pipe closed. */
static void read_output(struct pn_core_gen *g, int max_reads)
{
    char buf[16384];
    for (int i = 0; i < max_reads && g->out_fd >= 0; i++) {
        ssize_t n = read(g->out_fd, buf, sizeof buf);
        if (n > 0) {
            feed_output(g, buf, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (g->line_len > 0)
            emit_line(g);
        event_del(g->ev_out);
        close(g->out_fd);
        g->out_fd = -1;
    }
}

static void on_output(evutil_socket_t fd, short what, void *arg)
{
    read_output(arg, 16);
}

/* ---- stdin -------------------------------------------------------------- */

/* Writes the config as fast as the core reads it, then closes stdin (the
 * core reads to end of file before it starts). */
static void on_stdin(evutil_socket_t fd, short what, void *arg)
{
    struct pn_core_gen *g = arg;
    while (g->config_off < g->config_len) {
        ssize_t n = write(g->in_fd, g->config + g->config_off, g->config_len - g->config_off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0)
            break; /* EPIPE: the core is gone; its exit tells the rest */
        g->config_off += (size_t)n;
    }
    event_del(g->ev_in);
    close(g->in_fd);
    g->in_fd = -1;
    free(g->config);
    g->config = NULL;
}

/* ---- texts -------------------------------------------------------------- */

/* "exited with status 23" / "killed by signal 9 (Killed)". */
static void describe_status(int status, char *out, size_t len)
{
    if (WIFEXITED(status))
        snprintf(out, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(out, len, "killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(out, len, "ended (wait status %d)", status);
}

/* The error of a core that exited before its API answered: the fixed
 * text and the tail of what it printed, one line each. */
static char *exit_text(struct pn_core_gen *g)
{
    const char *head = "xray process stopped before API became ready; recent xray logs:\n";
    size_t cap = g->sup->o.startup_tail, len = strlen(head);
    size_t first = (g->tail_pos + cap - g->tail_n) % cap;
    for (size_t i = 0; i < g->tail_n; i++)
        len += strlen(g->tail[(first + i) % cap]) + 1;
    char *s = pn_malloc(len + 1), *p = s;
    p = stpcpy(p, head);
    for (size_t i = 0; i < g->tail_n; i++) {
        if (i > 0)
            *p++ = '\n';
        p = stpcpy(p, g->tail[(first + i) % cap]);
    }
    *p = '\0';
    return s;
}

/* ---- process ------------------------------------------------------------ */

/* A free loopback port for the new generation's API: bind port 0, read
 * it, close. The core binds it a moment later (small race, accepted). */
static int pick_port(uint16_t *port, char *err, size_t errlen)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return pn_seterr(err, errlen, PN_ERR_IO, "socket: %s", strerror(errno));
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof sa;
    int rv = PN_OK;
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) < 0)
        rv = pn_seterr(err, errlen, PN_ERR_IO, "cannot pick an API port: %s", strerror(errno));
    else
        *port = ntohs(sa.sin_port);
    close(fd);
    return rv;
}

/* The child between fork and exec: only async-signal-safe calls. Its own
 * session (no terminal or group SIGHUP reaches it), killed when the node
 * dies, stdin from the config pipe, stdout and stderr to the output pipe,
 * default signal handling, no other descriptors. On failure the errno goes
 * to the parent through err_w. */
static void __attribute__((noreturn))
child_exec(const char *exe, char *const argv[], char *const envp[], int in_r, int out_w, int err_w,
           pid_t parent)
{
    int e;
    setsid();
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP)
            sigaction(s, &sa, NULL);
    /* Move the pipe ends above 2 first so the dup2s cannot clobber them
     * (a node started with 0-2 closed gets pipes there). */
    int ew = fcntl(err_w, F_DUPFD_CLOEXEC, 3);
    if (ew >= 0)
        err_w = ew;
    int in = fcntl(in_r, F_DUPFD, 3);
    int out = fcntl(out_w, F_DUPFD, 3);
    if (ew < 0 || in < 0 || out < 0 || dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0)
        goto fail;
    if (err_w > 3)
        close_range(3, (unsigned)err_w - 1, 0);
    close_range((unsigned)err_w + 1, ~0U, 0);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(exe, argv, envp);
fail:
    e = errno;
    if (write(err_w, &e, sizeof e) < 0)
        _exit(127);
    _exit(127);
}

static void on_exit_ev(evutil_socket_t fd, short what, void *arg);
static void on_tick(evutil_socket_t fd, short what, void *arg);
static void on_deadline(evutil_socket_t fd, short what, void *arg);
static void on_fast_poll(evutil_socket_t fd, short what, void *arg);

/* Builds the config and starts the process of a new generation, with its
 * pipes, pidfd, API client and start timers. Returns PN_OK, PN_ERR_INVAL
 * (build_config failed) or PN_ERR_IO (cannot spawn) with detail in err. */
static int gen_spawn(struct pn_core_gen *g, char *err, size_t errlen)
{
    struct pn_supervisor *sup = g->sup;
    int rv = pick_port(&g->api_port, err, errlen);
    if (rv != PN_OK)
        return rv;
    char cerr[512] = "";
    size_t clen = 0;
    g->config = sup->o.build_config(g, g->api_port, &clen, cerr, sizeof cerr, sup->o.arg);
    if (!g->config)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "%s",
                         cerr[0] ? cerr : "cannot build the core config");
    g->config_len = clen;

    /* Everything the child needs is allocated before fork. The core gets
     * only the asset locations (marzban.md §13 case 29): nothing of the
     * node's environment (API_KEY, paths) leaks into it. */
    char **envp = pn_calloc(3, sizeof *envp);
    size_t k = 0;
    char *xenv = NULL, *venv = NULL;
    if (sup->assets) {
        envp[k++] = xenv = pn_asprintf("XRAY_LOCATION_ASSET=%s", sup->assets);
        envp[k++] = venv = pn_asprintf("V2RAY_LOCATION_ASSET=%s", sup->assets);
    }
    envp[k] = NULL;
    char *argv[] = {sup->exe, "-config", "stdin:", NULL};

    int inp[2] = {-1, -1}, outp[2] = {-1, -1}, errp[2] = {-1, -1};
    if (pipe2(inp, O_CLOEXEC) < 0 || pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "pipe: %s", strerror(errno));
        goto out;
    }

    /* Block signals across fork so no handler of the node runs in the
     * child before it resets them. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0)
        child_exec(sup->exe, argv, envp, inp[0], outp[1], errp[1], parent);
    int fork_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(inp[0]);
    close(outp[1]);
    close(errp[1]);
    inp[0] = outp[1] = errp[1] = -1;
    if (pid < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "fork: %s", strerror(fork_errno));
        goto out;
    }

    /* The error pipe closes on a successful exec (microseconds away) or
     * carries exec's errno. */
    int child_errno = 0;
    ssize_t r;
    while ((r = read(errp[0], &child_errno, sizeof child_errno)) < 0 && errno == EINTR)
        ;
    if (r == (ssize_t)sizeof child_errno) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        rv =
            pn_seterr(err, errlen, PN_ERR_IO, "cannot run %s: %s", sup->exe, strerror(child_errno));
        goto out;
    }
    g->pid = pid;
    g->alive = true;

    g->pid_fd = pidfd_open(pid, 0);
    if (g->pid_fd < 0 && errno != ENOSYS) { /* ENOSYS (valgrind): the exit is polled */
        rv = pn_seterr(err, errlen, PN_ERR_IO, "pidfd_open: %s", strerror(errno));
        gen_kill_reap(g);
        goto out;
    }
    g->in_fd = inp[1];
    g->out_fd = outp[0];
    inp[1] = outp[0] = -1;
    fcntl(g->in_fd, F_SETFL, O_NONBLOCK);
    fcntl(g->out_fd, F_SETFL, O_NONBLOCK);

    struct event_base *base = sup->o.base;
    g->ev_exit = event_new(base, g->pid_fd, g->pid_fd >= 0 ? EV_READ : 0, on_exit_ev, g);
    g->ev_in = event_new(base, g->in_fd, EV_WRITE | EV_PERSIST, on_stdin, g);
    g->ev_out = event_new(base, g->out_fd, EV_READ | EV_PERSIST, on_output, g);
    g->ev_tick = event_new(base, -1, EV_PERSIST, on_tick, g);
    g->ev_fast = evtimer_new(base, on_fast_poll, g);
    g->fast_ms = FAST_POLL_MS;
    g->ev_deadline = evtimer_new(base, on_deadline, g);
    g->ev_grace = evtimer_new(base, on_grace, g);
    g->api = pn_coreapi_new(base, g->api_port, sup->o.kind);
    struct timeval poll = ms_tv(POLL_MS), deadline = ms_tv(sup->o.start_timeout_ms);
    struct timeval exit_poll = ms_tv(EXIT_POLL_MS);
    event_add(g->ev_exit, g->pid_fd >= 0 ? NULL : &exit_poll);
    event_add(g->ev_in, NULL);
    event_add(g->ev_out, NULL);
    event_add(g->ev_tick, &poll);
    struct timeval fast = ms_tv(g->fast_ms);
    evtimer_add(g->ev_fast, &fast);
    evtimer_add(g->ev_deadline, &deadline);
    pn_log_debug("core: generation %llu started as pid %d (api port %u)", (unsigned long long)g->id,
                 (int)pid, g->api_port);
    rv = PN_OK;
out:
    for (int i = 0; i < 2; i++) {
        if (inp[i] >= 0)
            close(inp[i]);
        if (outp[i] >= 0)
            close(outp[i]);
        if (errp[i] >= 0)
            close(errp[i]);
    }
    free(envp);
    free(xenv);
    free(venv);
    return rv;
}

static struct pn_core_gen *gen_new(struct pn_supervisor *sup, bool is_restart)
{
    struct pn_core_gen *g = pn_new(struct pn_core_gen);
    g->sup = sup;
    g->id = ++sup->last_id;
    g->state = GEN_STARTING;
    g->is_restart = is_restart;
    g->pid_fd = g->in_fd = g->out_fd = -1;
    g->line = pn_malloc(LINE_MAX_LEN + 1);
    g->tail = pn_calloc(sup->o.startup_tail, sizeof *g->tail);
    struct pn_core_gen **p = &sup->gens;
    while (*p)
        p = &(*p)->next;
    *p = g;
    return g;
}

/* Spawns a generation; a spawn error becomes a failed start reported
 * through the defer event like any other. */
static void gen_launch(struct pn_core_gen *g)
{
    char err[600];
    int rv = gen_spawn(g, err, sizeof err);
    if (rv != PN_OK)
        gen_fail(g, rv, pn_strdup(err));
}

/* ---- draining ----------------------------------------------------------- */

static int cmp_ulong(const void *a, const void *b)
{
    unsigned long x = *(const unsigned long *)a, y = *(const unsigned long *)b;
    return x < y ? -1 : x > y;
}

/* Counts the established TCP connections process pid holds, leaving out
 * those on skip_port (its API). Its socket inodes come from /proc/<pid>/fd
 * and are matched against /proc/<pid>/net/tcp and tcp6. Returns -1 when
 * /proc cannot tell. */
static int count_conns(pid_t pid, uint16_t skip_port)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    unsigned long *inodes = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        char link[64];
        ssize_t k = readlinkat(dirfd(d), de->d_name, link, sizeof link - 1);
        if (k <= 0)
            continue;
        link[k] = '\0';
        unsigned long ino;
        if (sscanf(link, "socket:[%lu]", &ino) != 1)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            inodes = pn_realloc(inodes, cap * sizeof *inodes);
        }
        inodes[n++] = ino;
    }
    closedir(d);
    if (n == 0)
        return 0;
    qsort(inodes, n, sizeof *inodes, cmp_ulong);

    int count = 0;
    bool any_table = false;
    static const char *const tables[] = {"tcp", "tcp6"};
    for (size_t t = 0; t < 2; t++) {
        snprintf(path, sizeof path, "/proc/%d/net/%s", (int)pid, tables[t]);
        FILE *fp = fopen(path, "re");
        if (!fp)
            continue;
        any_table = true;
        char line[512];
        if (!fgets(line, sizeof line, fp)) { /* the header */
            fclose(fp);
            continue;
        }
        while (fgets(line, sizeof line, fp)) {
            unsigned lport, rport, st;
            unsigned long ino;
            if (sscanf(line,
                       " %*u: %*[0-9A-Fa-f]:%x %*[0-9A-Fa-f]:%x %x %*x:%*x %*x:%*x %*x %*u %*u %lu",
                       &lport, &rport, &st, &ino) != 4)
                continue;
            if (st != 1 || lport == skip_port || rport == skip_port)
                continue;
            if (bsearch(&ino, inodes, n, sizeof *inodes, cmp_ulong))
                count++;
        }
        fclose(fp);
    }
    free(inodes);
    return any_table ? count : -1;
}

static void stop_done(struct pn_core_gen *g);

/* A live generation is to be stopped on purpose: the owner banks its
 * counters in before_stop, then stop_done sends SIGTERM. */
static void gen_stop(struct pn_core_gen *g)
{
    struct pn_supervisor *sup = g->sup;
    del_event(g->ev_tick);
    del_event(g->ev_deadline);
    g->state = GEN_STOPPING;
    if (sup->active == g)
        sup->active = NULL;
    if (sup->o.before_stop)
        sup->o.before_stop(g, stop_done, sup->o.arg);
    else
        stop_done(g);
}

/* before_stop finished (possibly from inside a call on the generation's
 * own API client, so nothing is freed here). */
static void stop_done(struct pn_core_gen *g)
{
    if (g->state != GEN_STOPPING)
        return;
    if (!g->alive) { /* it exited meanwhile */
        g->state = GEN_DEAD;
        kick(g->sup);
        return;
    }
    g->state = GEN_TERM;
    gen_signal(g, SIGTERM);
    struct timeval tv = ms_tv(TERM_GRACE_MS);
    evtimer_add(g->ev_deadline, &tv);
}

/* Retires the previous active generation after a handover: it drains
 * until it holds no client connection or drain_ms passed. */
static void gen_retire(struct pn_core_gen *g)
{
    struct pn_supervisor *sup = g->sup;
    g->state = GEN_DRAINING;
    struct timeval check = ms_tv(DRAIN_CHECK_MS), drain = ms_tv(sup->o.drain_ms);
    event_del(g->ev_tick);
    event_add(g->ev_tick, &check);
    evtimer_add(g->ev_deadline, &drain);
    if (sup->o.on_retire)
        sup->o.on_retire(g, sup->o.arg);
}

/* ---- events ------------------------------------------------------------- */

static void on_sys(const struct pn_coreapi_result *r, const struct pn_core_sys_stats *s, void *arg)
{
    struct pn_core_gen *g = arg;
    g->polling = false;
    if (g->freeing || r->rv != PN_OK || g->state != GEN_STARTING || g->ready)
        return;
    g->ready = true;
    event_del(g->ev_tick);
    kick(g->sup);
}

/* Readiness poll while starting (one call in flight at a time); the
 * connection check while draining. */
/* Asks the API whether the core is ready (one question at a time). */
static void poll_ready(struct pn_core_gen *g)
{
    if (g->state != GEN_STARTING || g->polling || g->ready)
        return;
    g->polling = true;
    if (pn_coreapi_sys_stats(g->api, POLL_TIMEOUT_MS, on_sys, g) != PN_OK)
        g->polling = false;
}

/* A core is usually ready within milliseconds: poll at 2, 4, 8 ... ms
 * after spawn until the regular period takes over, so Start does not pay
 * a whole period of waiting. */
static void on_fast_poll(evutil_socket_t fd, short what, void *arg)
{
    struct pn_core_gen *g = arg;
    poll_ready(g);
    g->fast_ms *= 2;
    if (g->state == GEN_STARTING && g->fast_ms < POLL_MS) {
        struct timeval tv = ms_tv(g->fast_ms);
        evtimer_add(g->ev_fast, &tv);
    }
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct pn_core_gen *g = arg;
    if (g->state == GEN_STARTING) {
        poll_ready(g);
    } else if (g->state == GEN_DRAINING) {
        int n = count_conns(g->pid, g->api_port);
        if (n == 0)
            gen_stop(g);
    }
}

static void on_grace(evutil_socket_t fd, short what, void *arg)
{
    struct pn_core_gen *g = arg;
    if (g->state == GEN_STARTING && !g->ready)
        gen_fail(g, PN_ERR_PROTO, pn_asprintf("failed to start xray: %s", g->marker));
}

/* The start deadline, the drain deadline, or the SIGTERM grace. */
static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    struct pn_core_gen *g = arg;
    switch (g->state) {
    case GEN_STARTING:
        if (!g->ready)
            gen_fail(g, PN_ERR_TIMEOUT,
                     pn_asprintf("xray did not become ready within %g s",
                                 g->sup->o.start_timeout_ms / 1000.0));
        break;
    case GEN_DRAINING:
        gen_stop(g);
        break;
    case GEN_TERM:
        pn_log_warn("core: pid %d ignored SIGTERM for %d s; killing it", (int)g->pid,
                    TERM_GRACE_MS / 1000);
        gen_signal(g, SIGKILL);
        break;
    default:
        break;
    }
}

/* The active generation died on its own: restart it after the backoff
 * delay (unless a start is already bringing up a new one). */
static void gen_crashed(struct pn_core_gen *g)
{
    struct pn_supervisor *sup = g->sup;
    sup->active = NULL;
    g->state = GEN_DEAD;
    if (pn_now_ms() - g->started_ms >= HEALTHY_MS)
        sup->next_delay_ms = BACKOFF_MIN_MS;
    unsigned delay = sup->next_delay_ms;
    sup->next_delay_ms = delay * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : delay * 2;
    sup->restarting = true;
    if (!user_start_pending(sup)) {
        struct timeval tv = ms_tv(delay);
        evtimer_add(sup->ev_restart, &tv);
    }
    char how[96], detail[LAST_LINE_MAX + 160];
    describe_status(g->status, how, sizeof how);
    snprintf(detail, sizeof detail, "core process %d %s%s%s", (int)g->pid, how,
             g->last_line[0] ? "; last line: " : "", g->last_line);
    kick(sup);
    if (sup->o.on_crash)
        sup->o.on_crash(detail, delay, sup->o.arg);
}

/* The process ended (pidfd readable): read what it wrote last, reap it,
 * and move on according to what it was doing. */
static void on_exit_ev(evutil_socket_t fd, short what, void *arg)
{
    struct pn_core_gen *g = arg;
    if (!g->alive)
        return;
    read_output(g, 256);
    int st = 0;
    pid_t r;
    while ((r = waitpid(g->pid, &st, WNOHANG)) < 0 && errno == EINTR)
        ;
    if (r == 0) { /* not yet reapable: wait for the next wake-up */
        struct timeval exit_poll = ms_tv(EXIT_POLL_MS);
        event_add(g->ev_exit, g->pid_fd >= 0 ? NULL : &exit_poll);
        return;
    }
    g->alive = false;
    g->status = st;
    if (g->line_len > 0) /* a last line without newline (a child keeps the pipe open) */
        emit_line(g);
    gen_quiesce(g);

    switch (g->state) {
    case GEN_STARTING:
        gen_fail(g, PN_ERR_PROTO, exit_text(g));
        break;
    case GEN_ACTIVE:
        gen_crashed(g);
        break;
    case GEN_DRAINING:
    case GEN_TERM:
        g->state = GEN_DEAD;
        kick(g->sup);
        break;
    default: /* STOPPING: stop_done finishes it */
        break;
    }
}

/* Brings up a crash restart unless a start is already doing so. */
static void on_restart(evutil_socket_t fd, short what, void *arg)
{
    struct pn_supervisor *sup = arg;
    if (!sup->restarting || find_starting(sup))
        return;
    gen_launch(gen_new(sup, true));
}

/* ---- the defer event ---------------------------------------------------- */

/* A generation answered while starting: it becomes active, the previous
 * active one is retired, and the owner hears about it. */
static void activate(struct pn_supervisor *sup, struct pn_core_gen *g)
{
    del_event(g->ev_tick);
    del_event(g->ev_deadline);
    del_event(g->ev_grace);
    g->state = GEN_ACTIVE;
    g->started_ms = pn_now_ms();
    tail_clear(g);
    struct pn_core_gen *old = sup->active;
    sup->active = g;
    if (sup->restarting) {
        sup->restarting = false;
        event_del(sup->ev_restart);
    }
    pn_supervisor_start_cb cb = g->cb;
    void *cb_arg = g->cb_arg;
    g->cb = NULL;
    bool was_restart = g->is_restart;
    kick(sup); /* more work may be queued; run it after the callbacks */
    if (old)
        gen_retire(old);
    if (was_restart) {
        if (sup->o.on_restarted)
            sup->o.on_restarted(g, sup->o.arg);
    } else if (cb) {
        cb(PN_OK, NULL, g, cb_arg);
    }
}

/* A failed start leaves the list and is freed, then its result goes out:
 * to the start's callback, or for a crash restart to on_crash with the
 * next, longer delay. */
static void report_failure(struct pn_supervisor *sup, struct pn_core_gen *g)
{
    gen_unlink(sup, g);
    int rv = g->fail_rv;
    char *err = g->fail_err;
    g->fail_err = NULL;
    bool was_restart = g->is_restart;
    pn_supervisor_start_cb cb = g->cb;
    void *cb_arg = g->cb_arg;
    gen_free(g);
    kick(sup);

    /* After a crash with nothing else bringing a core up: try again later. */
    unsigned delay = sup->next_delay_ms;
    bool retry = sup->restarting && !find_starting(sup) && !evtimer_pending(sup->ev_restart, NULL);
    if (retry) {
        sup->next_delay_ms = delay * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : delay * 2;
        struct timeval tv = ms_tv(delay);
        evtimer_add(sup->ev_restart, &tv);
    }
    if (was_restart) {
        pn_log_warn("core: restart failed: %s", err);
        if (retry && sup->o.on_crash) {
            char *detail = pn_asprintf("restart failed: %s", err);
            free(err);
            sup->o.on_crash(detail, delay, sup->o.arg);
            free(detail);
            return;
        }
    } else if (cb) {
        cb(rv, err, NULL, cb_arg);
    }
    free(err);
}

/* Runs queued work one owner-visible step at a time: each step that calls
 * the owner re-arms the event first and returns right after, so an owner
 * that frees the supervisor in its callback is safe. */
static void on_defer(evutil_socket_t fd, short what, void *arg)
{
    struct pn_supervisor *sup = arg;
    for (struct pn_core_gen **p = &sup->gens; *p;) {
        struct pn_core_gen *g = *p;
        if (g->state == GEN_DEAD) {
            *p = g->next;
            gen_free(g);
        } else {
            p = &g->next;
        }
    }
    for (struct pn_core_gen *g = sup->gens; g; g = g->next) {
        if (g->state == GEN_FAILED) {
            report_failure(sup, g);
            return;
        }
        if (g->state == GEN_STARTING && g->ready) {
            activate(sup, g);
            return;
        }
    }
    for (struct stop_req **p = &sup->stops; *p; p = &(*p)->next) {
        struct stop_req *req = *p;
        bool left = false;
        for (struct pn_core_gen *g = sup->gens; g && !left; g = g->next)
            left = g->id <= req->max_id;
        if (left)
            continue;
        *p = req->next;
        void (*cb)(void *) = req->cb;
        void *cb_arg = req->arg;
        free(req);
        kick(sup);
        cb(cb_arg);
        return;
    }
}

/* ---- API ---------------------------------------------------------------- */

struct pn_coreapi *pn_core_gen_api(const struct pn_core_gen *gen)
{
    return gen->api;
}

uint16_t pn_core_gen_api_port(const struct pn_core_gen *gen)
{
    return gen->api_port;
}

pid_t pn_core_gen_pid(const struct pn_core_gen *gen)
{
    return gen->pid;
}

uint64_t pn_core_gen_id(const struct pn_core_gen *gen)
{
    return gen->id;
}

uint64_t pn_core_gen_started_ms(const struct pn_core_gen *gen)
{
    return gen->started_ms;
}

void pn_core_gen_set_data(struct pn_core_gen *gen, void *data, void (*free_data)(void *))
{
    if (gen->free_data && gen->data != data)
        gen->free_data(gen->data);
    gen->data = data;
    gen->free_data = free_data;
}

void *pn_core_gen_data(const struct pn_core_gen *gen)
{
    return gen->data;
}

struct pn_supervisor *pn_supervisor_new(const struct pn_supervisor_opts *opts)
{
    struct pn_supervisor *sup = pn_new(struct pn_supervisor);
    sup->o = *opts;
    sup->exe = pn_strdup(opts->exe);
    sup->assets = opts->assets ? pn_strdup(opts->assets) : NULL;
    sup->o.exe = sup->exe;
    sup->o.assets = sup->assets;
    if (sup->o.start_timeout_ms == 0)
        sup->o.start_timeout_ms = DEFAULT_START_TIMEOUT_MS;
    if (sup->o.startup_tail == 0)
        sup->o.startup_tail = DEFAULT_TAIL;
    sup->next_delay_ms = BACKOFF_MIN_MS;
    sup->ev_restart = evtimer_new(opts->base, on_restart, sup);
    sup->ev_defer = evtimer_new(opts->base, on_defer, sup);
    return sup;
}

void pn_supervisor_free(struct pn_supervisor *sup)
{
    if (!sup)
        return;
    while (sup->gens) {
        struct pn_core_gen *g = sup->gens;
        sup->gens = g->next;
        gen_free(g);
    }
    while (sup->stops) {
        struct stop_req *req = sup->stops;
        sup->stops = req->next;
        free(req);
    }
    event_free(sup->ev_restart);
    event_free(sup->ev_defer);
    free(sup->exe);
    free(sup->assets);
    free(sup);
}

int pn_supervisor_start(struct pn_supervisor *sup, pn_supervisor_start_cb cb, void *arg)
{
    struct pn_core_gen *pending = find_starting(sup);
    if (pending) {
        if (pending->is_restart) {
            gen_kill_reap(pending);
            gen_quiesce(pending);
            pending->state = GEN_DEAD;
            kick(sup);
        } else {
            gen_fail(pending, PN_ERR_STATE, pn_strdup("start superseded"));
        }
    }
    /* A restart waiting for its delay is replaced by this start; if the
     * start fails, report_failure schedules it again. */
    event_del(sup->ev_restart);
    struct pn_core_gen *g = gen_new(sup, false);
    g->cb = cb;
    g->cb_arg = arg;
    gen_launch(g);
    return PN_OK;
}

void pn_supervisor_stop(struct pn_supervisor *sup, void (*cb)(void *arg), void *arg)
{
    sup->restarting = false;
    sup->next_delay_ms = BACKOFF_MIN_MS;
    event_del(sup->ev_restart);
    uint64_t max_id = sup->last_id;
    if (cb) {
        struct stop_req *req = pn_new(struct stop_req);
        req->max_id = max_id;
        req->cb = cb;
        req->arg = arg;
        struct stop_req **p = &sup->stops;
        while (*p)
            p = &(*p)->next;
        *p = req;
    }
    kick(sup);
    /* before_stop may call back into the supervisor; walk by id so a
     * generation it starts is not stopped with these. */
    for (uint64_t id = 1; id <= max_id; id++) {
        struct pn_core_gen *g = sup->gens;
        while (g && g->id != id)
            g = g->next;
        if (!g)
            continue;
        switch (g->state) {
        case GEN_STARTING:
            if (g->is_restart) {
                gen_kill_reap(g);
                gen_quiesce(g);
                g->state = GEN_DEAD;
            } else {
                gen_fail(g, PN_ERR_STATE, pn_strdup("core stopped"));
            }
            break;
        case GEN_ACTIVE:
        case GEN_DRAINING:
            gen_stop(g);
            break;
        default:
            break;
        }
    }
}

struct pn_core_gen *pn_supervisor_active(const struct pn_supervisor *sup)
{
    return sup->active;
}

bool pn_supervisor_restarting(const struct pn_supervisor *sup)
{
    return sup->restarting;
}

size_t pn_supervisor_gens(const struct pn_supervisor *sup, struct pn_core_gen **out, size_t max)
{
    size_t n = 0;
    for (struct pn_core_gen *g = sup->gens; g; g = g->next) {
        if (g->state != GEN_ACTIVE && g->state != GEN_DRAINING && g->state != GEN_STOPPING)
            continue;
        if (n == max)
            break;
        out[n++] = g;
    }
    return n;
}
