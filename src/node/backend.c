/* The backend (see backend.h): one panel session driving a supervised
 * core. Control operations (Start, Stop, user syncs) run one at a time
 * from a queue, so a sync never races a handover; reads (stats, health,
 * online) run at once against every live core generation.
 *
 * Users: the node's user set is the truth. A sync computes, per inbound of
 * the active generation's config, whether each user qualified before and
 * after and with which account, and sends only the differences to the core
 * (remove, then add). v2ray's single-user shadowsocks inbounds cannot take
 * users at runtime: a change there is applied by a handover to a new core
 * generation, which drops no connection.
 *
 * Counters: every bank interval, and before any generation is stopped on
 * purpose, all counters are read with reset into the ledger. Reads answer
 * ledger + core; reset reads answer from the ledger and take only what the
 * caller confirms was delivered. */
#include "node/backend.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <jansson.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <malloc.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/err.h"
#include "base/log.h"
#include "base/time.h"
#include "base/utf8.h"
#include "core/probe.h"
#include "core/supervisor.h"
#include "node/coreconf.h"
#include "node/ledger.h"

#define PROBE_TIMEOUT_MS 5000
#define CALL_TIMEOUT_MS 10000
#define TICK_MS 1000
#define SYSSTATS_EVERY_TICKS 2
#define MAX_INFLIGHT 512 /* core API calls one sync keeps in flight */
#define BIG_CHANGE 1000  /* syncs this large give freed memory back */

/* ---- types ------------------------------------------------------------------ */

struct pn_backend_wait {
    struct pn_backend *b;
    struct pn_backend_wait *prev, *next;
    pn_backend_version_cb cb;
    void *arg;
};

/* What a core generation is built from. */
struct spec {
    char *panel_json;
    size_t panel_len;
    char **exclude;
    size_t nexclude;
    struct pn_userset *users; /* owned */
};

/* Per-generation data: the config it runs (inbound descriptions). */
struct gen_data {
    struct pn_coreconf conf;
};

enum op_kind { OP_START, OP_STOP, OP_SYNC, OP_STATS, OP_SYS, OP_ONLINE, OP_LATENCY };

/* One user's change on one inbound, queued inside a sync. */
struct user_task {
    struct pn_backend_op *op;
    char *tag;
    char *email;
    bool remove, add;
    struct pn_core_account acct; /* points into scratch and into a user of op->newset */
    char scratch[128];
};

struct pn_backend_op {
    struct pn_backend *b;
    enum op_kind kind;
    bool detached, queued, running;
    struct pn_backend_op *prev, *next; /* b->ops (all) */
    struct pn_backend_op *qnext;       /* b->queue (control ops) */
    struct pn_backend_op *rnext;       /* b->retire_waiters */
    void *arg;
    pn_backend_done_cb done;
    pn_backend_stats_cb stats_cb;
    pn_backend_sys_cb sys_cb;
    pn_backend_online_cb online_cb;
    pn_backend_latency_cb latency_cb;

    /* start */
    struct spec spec;
    uint64_t keep_alive_s;
    /* sync */
    struct pn_userset *newset; /* the users to apply (owned; deduplicated) */
    bool replace_all;          /* SyncUsers: users absent from newset are removed */
    struct user_task **tasks;
    size_t ntasks, cap_tasks, next_task, done_tasks;
    int inflight;
    bool needs_handover;
    struct pn_buf add_errors;
    /* reads */
    int pending;        /* core calls outstanding */
    int rv, grpc_code;  /* first failure */
    char err[512];
    char *pattern;
    bool reset;
    struct pn_ledger *acc;        /* non-reset stats from several generations */
    struct pn_backend_stats *out; /* non-reset stats from one generation, merged as read */
    size_t out_cap;
    uint32_t mark;
    struct pn_coreapi *api; /* the one core a merged read asks */
    char *email;
    bool ip_list;
    bool pumping, completed;
    struct evhttp_connection *http; /* latency: the metrics endpoint */
    char **noise;                   /* latency: outbound tags left out */
    size_t nnoise;
    void (*shutdown_cb)(void *arg);
    struct event *ev_defer; /* completes reads that need no core call */
};

struct pn_backend {
    struct pn_backend_opts opts;
    struct event_base *base;

    /* identity */
    struct pn_core_probe *probe;
    bool version_known;
    struct pn_core_version core;
    char version[32];
    struct pn_backend_wait *waits;

    /* session */
    enum pn_backend_state state;
    struct pn_supervisor *sup;
    struct spec cur;            /* what the active generation runs */
    struct spec *spawn_spec;    /* set while a start spawns */
    uint64_t keep_alive_s;
    uint64_t last_activity_ms;
    int open_streams;
    bool idle_logged;

    struct pn_ledger *ledger;
    struct pn_logring *logs;
    struct pn_sysstats_sampler *sys;
    struct event *tick;
    unsigned ticks;
    bool banking;
    uint32_t next_mark; /* ledger marks of non-reset stats merges */
    struct pn_backend_listener *listeners;

    struct pn_backend_op *ops;      /* every op not yet finished */
    struct pn_backend_op *queue;    /* control ops, head runs */
    struct event *ev_kick;          /* runs the queue from the loop, never from a caller */
    int retire_pending;             /* RemoveInbound calls on a retiring core in flight */
    struct pn_backend_op *retire_waiters; /* answer once the old core stopped accepting */
    bool freeing;
    char **local_addrs;
    size_t naddrs;
    bool shutting_down;
};

static void queue_kick(struct pn_backend *b);
static void op_finish(struct pn_backend_op *op);

/* ---- small helpers -------------------------------------------------------------- */

/* A Start or sync of many users leaves megabytes of freed parse and build
 * buffers that glibc keeps; hand them back, since a node idles for days
 * after such a burst (BENCHMARKS.md: 105 MB held, 39 MB in use, at 100k). */
static void give_back_memory(void)
{
    malloc_trim(0);
}

static void spec_free(struct spec *s)
{
    free(s->panel_json);
    for (size_t i = 0; i < s->nexclude; i++)
        free(s->exclude[i]);
    free(s->exclude);
    pn_userset_free(s->users);
    memset(s, 0, sizeof *s);
}

static char **strv_dup(const char *const *v, size_t n)
{
    char **out = pn_calloc(n ? n : 1, sizeof *out);
    for (size_t i = 0; i < n; i++)
        out[i] = pn_strdup(v[i]);
    return out;
}

/* The addresses of every up interface: sources allowed on the API rule. */
static void collect_local_addrs(struct pn_backend *b)
{
    struct ifaddrs *ifa = NULL;
    if (getifaddrs(&ifa) < 0)
        return;
    size_t cap = 8;
    b->local_addrs = pn_calloc(cap, sizeof *b->local_addrs);
    for (struct ifaddrs *i = ifa; i; i = i->ifa_next) {
        if (!i->ifa_addr || !(i->ifa_flags & IFF_UP))
            continue;
        char ip[INET6_ADDRSTRLEN];
        int fam = i->ifa_addr->sa_family;
        if (fam == AF_INET) {
            inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, ip, sizeof ip);
        } else if (fam == AF_INET6) {
            const struct in6_addr *a = &((struct sockaddr_in6 *)i->ifa_addr)->sin6_addr;
            if (IN6_IS_ADDR_LINKLOCAL(a))
                continue;
            inet_ntop(AF_INET6, a, ip, sizeof ip);
        } else {
            continue;
        }
        if (!strcmp(ip, "127.0.0.1") || !strcmp(ip, "::1"))
            continue;
        bool dup = false;
        for (size_t k = 0; k < b->naddrs; k++)
            dup |= !strcmp(b->local_addrs[k], ip);
        if (dup)
            continue;
        if (b->naddrs == cap) {
            cap *= 2;
            b->local_addrs = pn_realloc(b->local_addrs, cap * sizeof *b->local_addrs);
        }
        b->local_addrs[b->naddrs++] = pn_strdup(ip);
    }
    freeifaddrs(ifa);
}

/* A free loopback TCP port (for the metrics listener). */
static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    uint16_t port = 0;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static void notify_session_end(struct pn_backend *b)
{
    /* Listeners unlisten themselves from the callback: detach the list. */
    struct pn_backend_listener *l = b->listeners;
    b->listeners = NULL;
    while (l) {
        struct pn_backend_listener *next = l->next;
        l->prev = l->next = NULL;
        l->on_session_end(l);
        l = next;
    }
}

/* ---- identity (version probe) -------------------------------------------------- */

static void on_probe(int rv, const struct pn_core_version *ver, const char *detail, void *arg)
{
    struct pn_backend *b = arg;
    b->probe = NULL;
    b->version_known = true;
    if (rv == PN_OK) {
        b->core = *ver;
        snprintf(b->version, sizeof b->version, "%s", ver->text);
        pn_log_info("core: %s at %s", detail, b->opts.core_path);
    } else {
        pn_log_warn("core version probe of %s failed: %s", b->opts.core_path, detail);
    }
    struct pn_backend_wait *w = b->waits;
    b->waits = NULL;
    while (w) {
        struct pn_backend_wait *next = w->next;
        w->cb(b->version, w->arg);
        free(w);
        w = next;
    }
    queue_kick(b); /* a Start may be waiting for the core's identity */
}

const char *pn_backend_core_version(const struct pn_backend *b)
{
    return b->version_known ? b->version : NULL;
}

struct pn_backend_wait *pn_backend_on_version(struct pn_backend *b, pn_backend_version_cb cb,
                                              void *arg)
{
    struct pn_backend_wait *w = pn_new(struct pn_backend_wait);
    w->b = b;
    w->cb = cb;
    w->arg = arg;
    w->next = b->waits;
    if (b->waits)
        b->waits->prev = w;
    b->waits = w;
    return w;
}

void pn_backend_wait_cancel(struct pn_backend_wait *w)
{
    if (!w)
        return;
    if (w->prev)
        w->prev->next = w->next;
    else
        w->b->waits = w->next;
    if (w->next)
        w->next->prev = w->prev;
    free(w);
}

/* ---- state ---------------------------------------------------------------------------- */

enum pn_backend_state pn_backend_state(const struct pn_backend *b)
{
    return b->state;
}

bool pn_backend_started(const struct pn_backend *b)
{
    return b->state == PN_BACKEND_RUNNING;
}

const char *pn_backend_guard(const struct pn_backend *b)
{
    switch (b->state) {
    case PN_BACKEND_RUNNING: return NULL;
    case PN_BACKEND_NONE: return "backend not initialized";
    case PN_BACKEND_STARTING:
    case PN_BACKEND_RESTARTING: break;
    }
    return "core is not started yet";
}

void pn_backend_touch(struct pn_backend *b)
{
    b->last_activity_ms = pn_now_ms();
    if (b->idle_logged) {
        pn_log_info("panel session active again");
        b->idle_logged = false;
    }
}

void pn_backend_stream_begin(struct pn_backend *b)
{
    b->open_streams++;
    pn_backend_touch(b);
}

void pn_backend_stream_end(struct pn_backend *b)
{
    if (b->open_streams > 0)
        b->open_streams--;
    pn_backend_touch(b);
}

size_t pn_backend_user_count(const struct pn_backend *b)
{
    return b->cur.users ? pn_userset_count(b->cur.users) : 0;
}

struct pn_logring *pn_backend_logs(struct pn_backend *b)
{
    return b->logs;
}

void pn_backend_listen(struct pn_backend *b, struct pn_backend_listener *l)
{
    l->prev = NULL;
    l->next = b->listeners;
    if (b->listeners)
        b->listeners->prev = l;
    b->listeners = l;
}

void pn_backend_unlisten(struct pn_backend *b, struct pn_backend_listener *l)
{
    if (l->prev)
        l->prev->next = l->next;
    else if (b->listeners == l)
        b->listeners = l->next;
    if (l->next)
        l->next->prev = l->prev;
    l->prev = l->next = NULL;
}

/* ---- ops ------------------------------------------------------------------------------------ */

static struct pn_backend_op *op_new(struct pn_backend *b, enum op_kind kind, void *arg)
{
    struct pn_backend_op *op = pn_new(struct pn_backend_op);
    op->b = b;
    op->kind = kind;
    op->arg = arg;
    pn_buf_init(&op->add_errors, 64 * 1024);
    op->next = b->ops;
    if (b->ops)
        b->ops->prev = op;
    b->ops = op;
    return op;
}

static void op_free(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    if (op->prev)
        op->prev->next = op->next;
    else
        b->ops = op->next;
    if (op->next)
        op->next->prev = op->prev;
    spec_free(&op->spec);
    pn_userset_free(op->newset);
    for (size_t i = 0; i < op->ntasks; i++) {
        free(op->tasks[i]->tag);
        free(op->tasks[i]->email);
        free(op->tasks[i]);
    }
    free(op->tasks);
    pn_buf_free(&op->add_errors);
    free(op->pattern);
    free(op->email);
    if (op->acc)
        pn_ledger_free(op->acc);
    pn_backend_stats_free(op->out);
    if (op->ev_defer)
        event_free(op->ev_defer);
    if (op->http)
        evhttp_connection_free(op->http);
    for (size_t i = 0; i < op->nnoise; i++)
        free(op->noise[i]);
    free(op->noise);
    free(op);
}

void pn_backend_op_detach(struct pn_backend_op *op)
{
    if (op)
        op->detached = true;
}

static void op_set_error(struct pn_backend_op *op, int rv, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void op_set_error(struct pn_backend_op *op, int rv, int code, const char *fmt, ...)
{
    if (op->rv < 0)
        return; /* the first failure is the one reported */
    op->rv = rv;
    op->grpc_code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(op->err, sizeof op->err, fmt, ap);
    va_end(ap);
}

static void enqueue(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    op->queued = true;
    struct pn_backend_op **p = &b->queue;
    while (*p)
        p = &(*p)->qnext;
    *p = op;
    event_active(b->ev_kick, EV_TIMEOUT, 1);
}

static void on_kick(evutil_socket_t fd, short what, void *arg)
{
    queue_kick(arg);
}

static void start_run(struct pn_backend_op *op);
static void stop_run(struct pn_backend_op *op);
static void sync_run(struct pn_backend_op *op);

/* Runs the head of the control queue when nothing else runs. */
static void queue_kick(struct pn_backend *b)
{
    struct pn_backend_op *op = b->queue;
    if (!op || op->running || b->shutting_down)
        return;
    if (op->kind == OP_START && !b->version_known)
        return; /* resumed by on_probe */
    op->running = true;
    switch (op->kind) {
    case OP_START: start_run(op); break;
    case OP_STOP: stop_run(op); break;
    case OP_SYNC: sync_run(op); break;
    default: break;
    }
}

/* Completes an op: calls back (unless detached), frees it, and runs the
 * next queued control op. */
static void op_finish(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    bool was_queued = op->queued;
    if (was_queued) {
        b->queue = op->qnext; /* a queued op always finishes at the head */
    }
    if (!op->detached) {
        switch (op->kind) {
        case OP_STATS:
        case OP_SYS:
        case OP_LATENCY:
        case OP_ONLINE: break; /* reported by their own paths */
        default:
            if (op->done)
                op->done(op->rv, op->rv < 0 ? op->err : NULL, op->arg);
            else if (op->shutdown_cb)
                op->shutdown_cb(op->arg);
        }
    }
    op_free(op);
    if (was_queued)
        queue_kick(b);
}

/* ---- core generations ---------------------------------------------------------------- */

static void gen_data_free(void *p)
{
    struct gen_data *d = p;
    pn_coreconf_free(&d->conf);
    free(d);
}

static const struct pn_coreconf *gen_conf(const struct pn_core_gen *gen)
{
    struct gen_data *d = gen ? pn_core_gen_data(gen) : NULL;
    return d ? &d->conf : NULL;
}

/* Writes the generated config for operators debugging with DEBUG=true. */
static void write_debug_config(struct pn_backend *b, const char *json, size_t len)
{
    const char *dir = b->opts.generated_config_path;
    if (!b->opts.debug || !dir || !*dir)
        return;
    mkdir(dir, 0700);
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s%sxray.json", dir, dir[strlen(dir) - 1] == '/' ? "" : "/");
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        pn_log_warn("cannot write %s: %s", tmp, strerror(errno));
        return;
    }
    bool ok = write(fd, json, len) == (ssize_t)len && fsync(fd) == 0;
    close(fd);
    if (!ok || rename(tmp, path) < 0) {
        pn_log_warn("cannot write %s", path);
        unlink(tmp);
    }
}

static char *build_config(struct pn_core_gen *gen, uint16_t api_port, size_t *len, char *err,
                          size_t errlen, void *arg)
{
    struct pn_backend *b = arg;
    const struct spec *s = b->spawn_spec ? b->spawn_spec : &b->cur;
    struct pn_coreconf_opts co = {
        .panel_json = s->panel_json,
        .panel_len = s->panel_len,
        .exclude = (const char *const *)s->exclude,
        .nexclude = s->nexclude,
        .core = b->core,
        .api_port = api_port,
        .metrics_port = b->core.kind == PN_CORE_XRAY ? free_port() : 0,
        .local_addrs = (const char *const *)b->local_addrs,
        .naddrs = b->naddrs,
        .users = s->users,
    };
    struct gen_data *d = pn_new(struct gen_data);
    if (pn_coreconf_build(&co, &d->conf, err, errlen) < 0) {
        free(d);
        return NULL;
    }
    write_debug_config(b, d->conf.json, d->conf.json_len);
    /* The text goes to the supervisor (it frees it once written to the
     * core); the generation keeps only the inbound descriptions. */
    char *json = d->conf.json;
    *len = d->conf.json_len;
    d->conf.json = NULL;
    d->conf.json_len = 0;
    pn_core_gen_set_data(gen, d, gen_data_free);
    return json;
}

static void on_line(const struct pn_core_gen *gen, const char *line, size_t len, void *arg)
{
    struct pn_backend *b = arg;
    if (!pn_utf8_valid(line, len)) {
        /* Log lines travel in protobuf strings, which must be UTF-8. */
        char *clean = pn_malloc(3 * len + 1);
        size_t n = pn_utf8_sanitize(line, len, clean);
        pn_logring_push(b->logs, clean, n);
        free(clean);
    } else {
        pn_logring_push(b->logs, line, len);
    }
    pn_log_debug("core[%llu]: %.*s", (unsigned long long)pn_core_gen_id(gen), (int)len, line);
}

static void retire_done(const struct pn_coreapi_result *r, void *arg)
{
    struct pn_backend *b = arg;
    if (r->rv < 0 && r->rv != PN_ERR_CLOSED)
        pn_log_warn("handover: removing an inbound from the old core: %s", r->message);
    if (--b->retire_pending > 0 || b->freeing)
        return;
    struct pn_backend_op *op = b->retire_waiters;
    b->retire_waiters = NULL;
    while (op) {
        struct pn_backend_op *next = op->rnext;
        op_finish(op);
        op = next;
    }
}

/* The old generation stops accepting: remove all its inbounds but the API
 * one, so new connections land on the new generation. */
static void on_retire(struct pn_core_gen *gen, void *arg)
{
    struct pn_backend *b = arg;
    const struct pn_coreconf *c = gen_conf(gen);
    if (!c)
        return;
    for (size_t i = 0; i < c->ninbounds; i++)
        if (pn_coreapi_remove_inbound(pn_core_gen_api(gen), c->inbounds[i].tag, CALL_TIMEOUT_MS,
                                      retire_done, b) == PN_OK)
            b->retire_pending++;
}

/* Finishes a Start or a sync that brought up a new generation only once
 * the old one stopped accepting, so a client that connects right after the
 * answer meets the new config. */
static void finish_after_retire(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    if (b->retire_pending == 0) {
        op_finish(op);
        return;
    }
    op->rnext = b->retire_waiters;
    b->retire_waiters = op;
}

struct bank_ctx {
    struct pn_backend *b;
    struct pn_core_gen *gen;
    void (*done)(struct pn_core_gen *gen);
    void (*after)(struct pn_backend *b, int rv, const char *err, int code, void *arg);
    void *arg;
};

static void bank_reply(const struct pn_coreapi_result *r, const struct pn_core_stat *stats,
                       size_t n, void *arg)
{
    struct bank_ctx *c = arg;
    if (r->rv == PN_OK) {
        for (size_t i = 0; i < n; i++)
            if (stats[i].value)
                pn_ledger_add(c->b->ledger, stats[i].name, stats[i].value);
    } else if (r->rv != PN_ERR_CLOSED) {
        pn_log_warn("banking counters: %s", r->message);
    }
    if (c->done)
        c->done(c->gen);
    if (c->after)
        c->after(c->b, r->rv, r->message, r->grpc_code, c->arg);
    free(c);
}

/* Reads every counter of gen with reset into the ledger. */
static int bank_gen(struct pn_backend *b, struct pn_core_gen *gen, const char *pattern,
                    void (*done)(struct pn_core_gen *),
                    void (*after)(struct pn_backend *, int, const char *, int, void *), void *arg)
{
    struct bank_ctx *c = pn_new(struct bank_ctx);
    c->b = b;
    c->gen = gen;
    c->done = done;
    c->after = after;
    c->arg = arg;
    int rv = pn_coreapi_query_stats(pn_core_gen_api(gen), pattern, true, CALL_TIMEOUT_MS,
                                    bank_reply, c);
    if (rv < 0)
        free(c);
    return rv;
}

static void before_stop(struct pn_core_gen *gen, void (*done)(struct pn_core_gen *), void *arg)
{
    struct pn_backend *b = arg;
    if (bank_gen(b, gen, "", done, NULL, NULL) < 0)
        done(gen);
}

static void on_crash(const char *detail, unsigned delay_ms, void *arg)
{
    struct pn_backend *b = arg;
    pn_log_warn("core exited unexpectedly (%s); restarting in %u ms", detail, delay_ms);
    char line[600];
    int n = snprintf(line, sizeof line, "xray process exited unexpectedly: %s", detail);
    pn_logring_push(b->logs, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    if (b->state == PN_BACKEND_RUNNING)
        b->state = PN_BACKEND_RESTARTING;
}

static void on_restarted(struct pn_core_gen *gen, void *arg)
{
    struct pn_backend *b = arg;
    pn_log_info("core restarted (pid %d) with %zu users", (int)pn_core_gen_pid(gen),
                pn_backend_user_count(b));
    if (b->state == PN_BACKEND_RESTARTING)
        b->state = PN_BACKEND_RUNNING;
}

static int ensure_supervisor(struct pn_backend *b)
{
    if (b->sup)
        return PN_OK;
    if (!b->opts.core_path || b->core.kind == PN_CORE_UNKNOWN)
        return PN_ERR_STATE;
    struct pn_supervisor_opts so = {
        .base = b->base,
        .exe = b->opts.core_path,
        .assets = b->opts.assets ? b->opts.assets : "",
        .kind = b->core.kind,
        .start_timeout_ms = b->opts.start_timeout_ms,
        .drain_ms = b->opts.drain_ms,
        .startup_tail = b->opts.startup_tail,
        .build_config = build_config,
        .on_line = on_line,
        .on_retire = on_retire,
        .before_stop = before_stop,
        .on_crash = on_crash,
        .on_restarted = on_restarted,
        .arg = b,
    };
    b->sup = pn_supervisor_new(&so);
    return PN_OK;
}

/* ---- Start -------------------------------------------------------------------------------- */

static void start_done(int rv, const char *err, struct pn_core_gen *gen, void *arg)
{
    struct pn_backend_op *op = arg;
    struct pn_backend *b = op->b;
    b->spawn_spec = NULL;
    if (rv < 0) {
        op_set_error(op, rv, 2, "%s", err ? err : pn_strerror(rv));
        pn_log_warn("start failed: %s", op->err);
        if (b->state == PN_BACKEND_STARTING)
            b->state = pn_supervisor_active(b->sup) ? PN_BACKEND_RUNNING : PN_BACKEND_NONE;
        op_finish(op);
        return;
    }
    /* The new generation serves: its spec becomes the current one. */
    bool took_over = b->cur.panel_json != NULL;
    spec_free(&b->cur);
    b->cur = op->spec;
    memset(&op->spec, 0, sizeof op->spec);
    b->keep_alive_s = op->keep_alive_s;
    b->state = PN_BACKEND_RUNNING;
    b->idle_logged = false;
    pn_backend_touch(b);
    notify_session_end(b);
    pn_log_info("core started (pid %d, %zu users)%s", (int)pn_core_gen_pid(gen),
                pn_backend_user_count(b),
                took_over ? "; core control was taken away from the previous client" : "");
    give_back_memory();
    finish_after_retire(op);
}

static void start_run(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    if (ensure_supervisor(b) < 0) {
        op_set_error(op, PN_ERR_STATE, 2,
                     "failed to start xray: no usable core binary (%s)",
                     b->opts.core_path ? b->opts.core_path : "none found");
        op_finish(op);
        return;
    }
    if (b->state == PN_BACKEND_NONE)
        b->state = PN_BACKEND_STARTING;
    /* Spawns for this start (and a crash restart while it is pending)
     * build from the new spec, until start_done. */
    b->spawn_spec = &op->spec;
    int rv = pn_supervisor_start(b->sup, start_done, op);
    if (rv < 0) {
        b->spawn_spec = NULL;
        op_set_error(op, rv, 2, "failed to start xray: %s", pn_strerror(rv));
        if (b->state == PN_BACKEND_STARTING)
            b->state = PN_BACKEND_NONE;
        op_finish(op);
    }
}

int pn_backend_start(struct pn_backend *b, const struct pn_backend_start_req *req,
                     pn_backend_done_cb cb, void *arg, struct pn_backend_op **opp, char *err,
                     size_t errlen)
{
    if (!b->opts.core_path) {
        pn_userset_free(req->users);
        return pn_seterr(err, errlen, PN_ERR_STATE,
                         "failed to start xray: no core binary found (set XRAY_EXECUTABLE_PATH)");
    }
    /* Validate the JSON now so a bad push is refused at once, before any
     * process is touched (the real build happens at spawn, with ports). */
    if (b->version_known) {
        struct pn_coreconf probe_conf;
        struct pn_coreconf_opts co = {
            .panel_json = req->config,
            .panel_len = req->config_len,
            .exclude = req->exclude,
            .nexclude = req->nexclude,
            .core = b->core,
            .api_port = 1,
        };
        if (pn_coreconf_build(&co, &probe_conf, err, errlen) < 0) {
            pn_userset_free(req->users);
            return PN_ERR_INVAL;
        }
        pn_coreconf_free(&probe_conf);
    }
    struct pn_backend_op *op = op_new(b, OP_START, arg);
    op->done = cb;
    op->spec.panel_json = pn_strndup(req->config, req->config_len);
    op->spec.panel_len = req->config_len;
    op->spec.exclude = strv_dup(req->exclude, req->nexclude);
    op->spec.nexclude = req->nexclude;
    op->spec.users = req->users ? req->users : pn_userset_new();
    op->keep_alive_s = req->keep_alive_s;
    if (opp)
        *opp = op;
    enqueue(op);
    return PN_OK;
}

/* ---- Stop --------------------------------------------------------------------------------- */

static void stop_done(void *arg)
{
    struct pn_backend_op *op = arg;
    struct pn_backend *b = op->b;
    spec_free(&b->cur);
    b->state = PN_BACKEND_NONE;
    b->keep_alive_s = 0;
    notify_session_end(b);
    pn_log_info("core stopped");
    op_finish(op);
}

static void stop_run(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    if (!b->sup) {
        stop_done(op);
        return;
    }
    pn_supervisor_stop(b->sup, stop_done, op);
}

int pn_backend_stop(struct pn_backend *b, pn_backend_done_cb cb, void *arg,
                    struct pn_backend_op **opp)
{
    struct pn_backend_op *op = op_new(b, OP_STOP, arg);
    op->done = cb;
    if (opp)
        *opp = op;
    enqueue(op);
    return PN_OK;
}

/* ---- user sync ------------------------------------------------------------------------------ */

static bool account_equal(const struct pn_core_account *a, const struct pn_core_account *b)
{
#define SAME(f) ((!a->f && !b->f) || (a->f && b->f && !strcmp(a->f, b->f)))
    return a->proto == b->proto && SAME(id) && SAME(flow) && SAME(password) && SAME(method) &&
           SAME(key) && SAME(auth);
#undef SAME
}

static struct user_task *task_new(struct pn_backend_op *op, const char *tag, const char *email)
{
    if (op->ntasks == op->cap_tasks) {
        op->cap_tasks = op->cap_tasks ? op->cap_tasks * 2 : 64;
        op->tasks = pn_realloc(op->tasks, op->cap_tasks * sizeof *op->tasks);
    }
    struct user_task *t = pn_new(struct user_task);
    t->op = op;
    t->tag = pn_strdup(tag);
    t->email = pn_strdup(email);
    op->tasks[op->ntasks++] = t;
    return t;
}

static void task_drop_last(struct pn_backend_op *op)
{
    struct user_task *t = op->tasks[--op->ntasks];
    free(t->tag);
    free(t->email);
    free(t);
}

/* Plans one user's change over the active generation's inbounds: core API
 * tasks where the user's account appears, changes or disappears, and a
 * handover when a single-user shadowsocks inbound is affected. old or nu
 * may be NULL (added / removed user). */
static void plan_user(struct pn_backend_op *op, const struct pn_coreconf *c,
                      const struct pn_user *old, const struct pn_user *nu)
{
    const struct pn_core_version *core = &op->b->core;
    const char *email = nu ? nu->email : old->email;
    for (size_t i = 0; i < c->ninbounds; i++) {
        const struct pn_inbound_info *in = &c->inbounds[i];
        if (in->excluded || in->kind == PN_IN_OTHER)
            continue;
        struct pn_core_account oa;
        char oscratch[128];
        bool oq = old && pn_coreconf_account(in, old, core, &oa, oscratch, sizeof oscratch);
        struct user_task *t = task_new(op, in->tag, email);
        bool nq = nu && pn_coreconf_account(in, nu, core, &t->acct, t->scratch, sizeof t->scratch);
        if ((!oq && !nq) || (oq && nq && account_equal(&oa, &t->acct))) {
            task_drop_last(op);
            continue;
        }
        if (in->kind == PN_IN_SS_SINGLE) {
            /* Only the user placed in the inbound (or the first to qualify
             * when it is empty) matters; the core takes no runtime users. */
            if (!in->single_email || !strcmp(in->single_email, email))
                op->needs_handover = true;
            task_drop_last(op);
            continue;
        }
        t->remove = oq;
        t->add = nq;
    }
}

static void tasks_pump(struct pn_backend_op *op);

static void task_finished(struct user_task *t)
{
    struct pn_backend_op *op = t->op;
    op->inflight--;
    op->done_tasks++;
    tasks_pump(op);
}

static void task_added(const struct pn_coreapi_result *r, void *arg)
{
    struct user_task *t = arg;
    /* PN_ERR_CLOSED: the core went away mid-sync; its restart is built from
     * the node's user set, which already holds this change. */
    if (r->rv < 0 && r->rv != PN_ERR_CLOSED) {
        if (!t->op->add_errors.len)
            pn_buf_append_str(&t->op->add_errors, "failed to add user:");
        pn_buf_printf(&t->op->add_errors, "\n%s (%s): %s", t->email, t->tag, r->message);
    }
    task_finished(t);
}

static void task_add(struct user_task *t)
{
    struct pn_backend *b = t->op->b;
    struct pn_core_gen *gen = b->sup ? pn_supervisor_active(b->sup) : NULL;
    if (!gen) {
        task_finished(t);
        return;
    }
    if (pn_coreapi_add_user(pn_core_gen_api(gen), t->tag, t->email, 0, &t->acct, CALL_TIMEOUT_MS,
                            task_added, t) < 0) {
        struct pn_coreapi_result r = {.rv = PN_ERR_INVAL,
                                      .message = "the account cannot be encoded for this core"};
        task_added(&r, t);
    }
}

static void task_removed(const struct pn_coreapi_result *r, void *arg)
{
    struct user_task *t = arg;
    /* Remove errors are not reported (the reference ignores them too): an
     * absent user is the state we want. */
    if (r->rv < 0 && r->rv != PN_ERR_CLOSED && !strstr(r->message, "not found"))
        pn_log_warn("removing %s from %s: %s", t->email, t->tag, r->message);
    if (t->add && r->rv != PN_ERR_CLOSED)
        task_add(t);
    else
        task_finished(t);
}

static void task_start(struct user_task *t)
{
    struct pn_backend *b = t->op->b;
    struct pn_core_gen *gen = b->sup ? pn_supervisor_active(b->sup) : NULL;
    t->op->inflight++;
    if (!gen) {
        task_finished(t);
        return;
    }
    if (t->remove) {
        if (pn_coreapi_remove_user(pn_core_gen_api(gen), t->tag, t->email, CALL_TIMEOUT_MS,
                                   task_removed, t) < 0)
            task_finished(t);
    } else {
        task_add(t);
    }
}

static void sync_handover_done(int rv, const char *err, struct pn_core_gen *gen, void *arg)
{
    struct pn_backend_op *op = arg;
    if (rv < 0) {
        op_set_error(op, rv, 13, "failed to update user: the handover to a new core failed: %s",
                     err ? err : pn_strerror(rv));
        pn_log_error("%s; the old core keeps serving", op->err);
        op_finish(op);
        return;
    }
    pn_log_info("handover done: core pid %d serves the changed users", (int)pn_core_gen_pid(gen));
    finish_after_retire(op);
}

/* The sync answers once its changes are in effect: after the core calls,
 * and for single-user shadowsocks changes (v2ray), after the handover to
 * a core built from the updated user set. */
static void sync_complete(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    if (op->ntasks >= BIG_CHANGE)
        give_back_memory();
    if (op->add_errors.len)
        op_set_error(op, PN_ERR_PROTO, 13, "%s", (const char *)op->add_errors.data);
    if (op->needs_handover && b->sup && b->state == PN_BACKEND_RUNNING &&
        pn_supervisor_start(b->sup, sync_handover_done, op) == PN_OK)
        return;
    op_finish(op);
}

/* Keeps up to MAX_INFLIGHT core calls running and finishes the sync once
 * after the last task. Tasks that end synchronously call back in here:
 * the pumping flag makes those calls return at once, and the loop below
 * picks up where they left off. */
static void tasks_pump(struct pn_backend_op *op)
{
    if (op->pumping || op->completed)
        return;
    op->pumping = true;
    while (op->inflight < MAX_INFLIGHT && op->next_task < op->ntasks)
        task_start(op->tasks[op->next_task++]);
    op->pumping = false;
    if (op->done_tasks == op->ntasks && op->inflight == 0) {
        op->completed = true;
        sync_complete(op);
    }
}

struct plan_ctx {
    struct pn_backend_op *op;
    const struct pn_coreconf *c;
    struct pn_userset *cur;
};

static void plan_removed_user(const struct pn_user *old, void *arg)
{
    struct plan_ctx *p = arg;
    if (!pn_userset_get(p->op->newset, old->email))
        plan_user(p->op, p->c, old, NULL);
}

static void plan_new_user(const struct pn_user *nu, void *arg)
{
    struct plan_ctx *p = arg;
    const struct pn_user *old = pn_userset_get(p->cur, nu->email);
    if (old && pn_user_equal(old, nu))
        return; /* unchanged users cost nothing */
    plan_user(p->op, p->c, old, nu->ninbounds ? nu : NULL);
}

static void apply_partial(const struct pn_user *nu, void *arg)
{
    struct pn_userset *cur = arg;
    if (nu->ninbounds)
        pn_userset_put(cur, pn_user_clone(nu));
    else
        pn_userset_remove(cur, nu->email);
}

/* Runs a sync: plan against the active config, update the node's user set
 * (the truth a restart is built from), then drive the core calls. */
static void sync_run(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    if (!b->cur.users)
        b->cur.users = pn_userset_new();
    struct pn_core_gen *gen = b->sup ? pn_supervisor_active(b->sup) : NULL;
    const struct pn_coreconf *c = gen_conf(gen);
    if (c) {
        struct plan_ctx p = {op, c, b->cur.users};
        if (op->replace_all)
            pn_userset_foreach(b->cur.users, plan_removed_user, &p);
        pn_userset_foreach(op->newset, plan_new_user, &p);
    }
    if (op->replace_all) {
        /* newset becomes the node's set (tasks point into its users, which
         * stay alive there); the old set is freed with the op. */
        struct pn_userset *old = b->cur.users;
        b->cur.users = op->newset;
        op->newset = old;
    } else {
        pn_userset_foreach(op->newset, apply_partial, b->cur.users);
    }
    pn_log_debug("sync: %zu core operations, %zu users now", op->ntasks,
                 pn_userset_count(b->cur.users));
    tasks_pump(op);
}

static int sync_enqueue(struct pn_backend *b, struct pn_userset *set, bool replace_all,
                        pn_backend_done_cb cb, void *arg, struct pn_backend_op **opp)
{
    struct pn_backend_op *op = op_new(b, OP_SYNC, arg);
    op->done = cb;
    op->newset = set;
    op->replace_all = replace_all;
    if (opp)
        *opp = op;
    enqueue(op);
    return PN_OK;
}

int pn_backend_sync_user(struct pn_backend *b, struct pn_user *u, pn_backend_done_cb cb,
                         void *arg, struct pn_backend_op **op)
{
    struct pn_userset *set = pn_userset_new();
    pn_userset_put(set, u);
    return sync_enqueue(b, set, false, cb, arg, op);
}

int pn_backend_sync_users(struct pn_backend *b, struct pn_userset *all, pn_backend_done_cb cb,
                          void *arg, struct pn_backend_op **op)
{
    return sync_enqueue(b, all, true, cb, arg, op);
}

int pn_backend_sync_some(struct pn_backend *b, struct pn_user **users, size_t n,
                         pn_backend_done_cb cb, void *arg, struct pn_backend_op **op)
{
    struct pn_userset *set = pn_userset_new();
    for (size_t i = 0; i < n; i++)
        pn_userset_put(set, users[i]); /* a later duplicate replaces an earlier one */
    free(users);
    return sync_enqueue(b, set, false, cb, arg, op);
}

/* ---- deferred completion --------------------------------------------------------------- */

/* Callbacks never run inside the call that started them: reads that need
 * no core call complete on the next loop turn. */
static void op_defer(struct pn_backend_op *op, void (*fn)(evutil_socket_t, short, void *))
{
    op->ev_defer = evtimer_new(op->b->base, fn, op);
    event_add(op->ev_defer, &(struct timeval){0, 0});
}

/* ---- stats ---------------------------------------------------------------------------------- */

/* Item names are copied into blocks of this size (a name longer than a
 * block gets a block of its own): 200k names cost ~30 allocations, not
 * 200k. */
#define NAMES_BLOCK (256 * 1024)

/* An answer as the backend makes it: the public part and the blocks its
 * item names live in (copies, or a core reply taken whole). */
struct stats_box {
    struct pn_backend_stats pub;
    void **blocks;
    size_t nblocks, cap_blocks;
    char *cur; /* free space in the newest copy block */
    size_t left;
};

void pn_backend_stats_free(struct pn_backend_stats *s)
{
    if (!s)
        return;
    struct stats_box *box = (struct stats_box *)s;
    for (size_t i = 0; i < box->nblocks; i++)
        free(box->blocks[i]);
    free(box->blocks);
    free(s->items);
    free(box);
}

/* The answer takes block (freed with it). */
static void stats_hold(struct pn_backend_stats *s, void *block)
{
    struct stats_box *box = (struct stats_box *)s;
    if (box->nblocks == box->cap_blocks) {
        box->cap_blocks = box->cap_blocks ? box->cap_blocks * 2 : 8;
        box->blocks = pn_realloc(box->blocks, box->cap_blocks * sizeof *box->blocks);
    }
    box->blocks[box->nblocks++] = block;
}

static struct pn_backend_stats *stats_new(void)
{
    struct stats_box *box = pn_calloc(1, sizeof *box);
    return &box->pub;
}

/* A NUL-terminated copy of name[0..len) in s's name blocks. */
static char *names_copy(struct pn_backend_stats *s, const char *name, size_t len)
{
    struct stats_box *a = (struct stats_box *)s;
    if (a->left < len + 1) {
        size_t size = len + 1 > NAMES_BLOCK ? len + 1 : NAMES_BLOCK;
        a->cur = pn_malloc(size);
        a->left = size;
        stats_hold(s, a->cur);
    }
    char *p = a->cur;
    memcpy(p, name, len);
    p[len] = '\0';
    a->cur += len + 1;
    a->left -= len + 1;
    return p;
}

/* Makes room for extra more items. */
static void stats_reserve(struct pn_backend_stats *s, size_t *cap, size_t extra)
{
    if (*cap - s->n >= extra)
        return;
    size_t want = *cap ? *cap * 2 : 64;
    if (want < s->n + extra)
        want = s->n + extra;
    s->items = pn_realloc(s->items, want * sizeof *s->items);
    *cap = want;
}

/* Appends an item; its name is copied unless it already lives in a block
 * the answer holds (kept). */
static void stats_push(struct pn_backend_stats *s, size_t *cap, const char *name, size_t len,
                       int64_t value, bool kept)
{
    stats_reserve(s, cap, 1);
    s->items[s->n].name = kept ? (char *)(uintptr_t)name : names_copy(s, name, len);
    s->items[s->n].value = value;
    s->n++;
}

struct collect_ctx {
    struct pn_backend_stats *out;
    size_t cap;
};

static void collect_stat(const char *name, int64_t value, void *arg)
{
    struct collect_ctx *c = arg;
    stats_push(c->out, &c->cap, name, strlen(name), value, false);
}

static void add_to_acc(const char *name, int64_t value, void *arg)
{
    pn_ledger_add(arg, name, value);
}

static void stats_complete(struct pn_backend_op *op)
{
    struct pn_backend *b = op->b;
    if (op->rv < 0 && !op->reset) {
        if (!op->detached)
            op->stats_cb(op->rv, op->grpc_code, op->err, NULL, op->arg);
        op_finish(op);
        return;
    }
    /* With reset, a failed core read still banked what it could: answer
     * from the ledger either way, nothing was lost. Without reset, the sum
     * of the ledger and what the cores reported. */
    struct pn_backend_stats *s;
    struct collect_ctx c;
    if (op->out) {
        /* One generation, merged while reading: add the banked counters the
         * core no longer has (it restarted since they were banked). */
        s = op->out;
        op->out = NULL;
        c = (struct collect_ctx){s, op->out_cap};
        pn_ledger_foreach_unmarked(b->ledger, op->pattern, op->mark, collect_stat, &c);
    } else {
        s = stats_new();
        c = (struct collect_ctx){s, 0};
        if (op->reset) {
            s->reset = true;
            pn_ledger_foreach(b->ledger, op->pattern, collect_stat, &c);
        } else {
            pn_ledger_foreach(b->ledger, op->pattern, add_to_acc, op->acc);
            pn_ledger_foreach(op->acc, "", collect_stat, &c);
        }
    }
    if (!op->detached)
        op->stats_cb(PN_OK, 0, NULL, s, op->arg);
    else
        pn_backend_stats_free(s);
    op_finish(op);
}

static void stats_bank_after(struct pn_backend *b, int rv, const char *err, int code, void *arg)
{
    struct pn_backend_op *op = arg;
    if (rv < 0 && rv != PN_ERR_CLOSED)
        op_set_error(op, rv, code ? code : 14, "%s", err);
    if (--op->pending == 0)
        stats_complete(op);
}

static void stats_read_reply(const struct pn_coreapi_result *r, const struct pn_core_stat *st,
                             size_t n, void *arg)
{
    struct pn_backend_op *op = arg;
    if (r->rv == PN_OK && op->out) {
        /* The names stay where the core's reply put them: the answer
         * takes the reply. */
        void *reply = pn_coreapi_take_reply(op->api);
        if (reply)
            stats_hold(op->out, reply);
        stats_reserve(op->out, &op->out_cap, n);
        for (size_t i = 0; i < n; i++)
            stats_push(op->out, &op->out_cap, st[i].name, st[i].len,
                       st[i].value +
                           pn_ledger_get_mark(op->b->ledger, st[i].name, st[i].len, op->mark),
                       reply != NULL);
    } else if (r->rv == PN_OK) {
        for (size_t i = 0; i < n; i++)
            pn_ledger_add(op->acc, st[i].name, st[i].value);
    } else if (r->rv != PN_ERR_CLOSED) {
        op_set_error(op, r->rv, r->grpc_code ? r->grpc_code : 14, "%s", r->message);
    }
    if (--op->pending == 0)
        stats_complete(op);
}

static void stats_deferred(evutil_socket_t fd, short what, void *arg)
{
    stats_complete(arg);
}

int pn_backend_query_stats(struct pn_backend *b, const char *pattern, bool reset,
                           pn_backend_stats_cb cb, void *arg, struct pn_backend_op **opp)
{
    struct pn_backend_op *op = op_new(b, OP_STATS, arg);
    op->stats_cb = cb;
    op->pattern = pn_strdup(pattern);
    op->reset = reset;
    if (opp)
        *opp = op;
    struct pn_core_gen *gens[8];
    size_t n = b->sup ? pn_supervisor_gens(b->sup, gens, 8) : 0;
    if (!reset && n == 1) {
        /* The common case merges the reply straight into the answer. */
        op->out = stats_new();
        op->api = pn_core_gen_api(gens[0]);
        if (++b->next_mark == 0)
            b->next_mark = 1;
        op->mark = b->next_mark;
    } else if (!reset) {
        op->acc = pn_ledger_new();
    }
    op->pending = 1; /* held until every call is issued */
    for (size_t i = 0; i < n; i++) {
        op->pending++;
        int rv = reset ? bank_gen(b, gens[i], pattern, NULL, stats_bank_after, op)
                       : pn_coreapi_query_stats(pn_core_gen_api(gens[i]), pattern, false,
                                                CALL_TIMEOUT_MS, stats_read_reply, op);
        if (rv < 0)
            op->pending--;
    }
    if (--op->pending == 0)
        op_defer(op, stats_deferred);
    return PN_OK;
}

void pn_backend_stats_delivered(struct pn_backend *b, const struct pn_backend_stats *s)
{
    if (!s || !s->reset)
        return;
    for (size_t i = 0; i < s->n; i++)
        pn_ledger_take(b->ledger, s->items[i].name, s->items[i].value);
}

/* ---- health: core GetSysStats ----------------------------------------------------------- */

static void sys_reply(const struct pn_coreapi_result *r, const struct pn_core_sys_stats *st,
                      void *arg)
{
    struct pn_backend_op *op = arg;
    if (!op->detached) {
        if (r->rv == PN_OK) {
            op->sys_cb(PN_OK, 0, NULL, st, op->arg);
        } else {
            char err[600];
            snprintf(err, sizeof err, "failed to get sys stats: %s", r->message);
            op->sys_cb(r->rv, r->grpc_code ? r->grpc_code : 14, err, NULL, op->arg);
        }
    }
    op_finish(op);
}

int pn_backend_core_sys_stats(struct pn_backend *b, pn_backend_sys_cb cb, void *arg,
                              struct pn_backend_op **opp)
{
    struct pn_core_gen *gen = b->sup ? pn_supervisor_active(b->sup) : NULL;
    if (!gen)
        return PN_ERR_STATE;
    struct pn_backend_op *op = op_new(b, OP_SYS, arg);
    op->sys_cb = cb;
    if (pn_coreapi_sys_stats(pn_core_gen_api(gen), CALL_TIMEOUT_MS, sys_reply, op) < 0) {
        op_free(op);
        return PN_ERR_INVAL;
    }
    if (opp)
        *opp = op;
    return PN_OK;
}

/* ---- online stats (Xray) ------------------------------------------------------------------ */

static void online_not_found(struct pn_backend_op *op)
{
    if (!op->detached) {
        char err[600];
        snprintf(err, sizeof err, "user>>>%s>>>online not found.", op->email);
        op->online_cb(PN_ERR_NOTFOUND, 5, err, 0, NULL, 0, op->arg);
    }
    op_finish(op);
}

static void online_deferred(evutil_socket_t fd, short what, void *arg)
{
    online_not_found(arg);
}

/* A core text ending in "not found." means NotFound whatever code the core
 * used (spec pasarguard.md §7.1). */
static int online_code(const struct pn_coreapi_result *r)
{
    size_t n = strlen(r->message);
    if (n >= 10 && !strcmp(r->message + n - 10, "not found."))
        return 5;
    return r->grpc_code ? r->grpc_code : 14;
}

/* Both online calls end here: success, NotFound, or the core's error. */
static void online_reply(struct pn_backend_op *op, const struct pn_coreapi_result *r,
                         int64_t value, const struct pn_core_online_ip *ips, size_t n)
{
    if (r->rv != PN_OK && online_code(r) == 5) {
        online_not_found(op);
        return;
    }
    if (!op->detached) {
        if (r->rv == PN_OK)
            op->online_cb(PN_OK, 0, NULL, value, ips, n, op->arg);
        else
            op->online_cb(r->rv, online_code(r), r->message, 0, NULL, 0, op->arg);
    }
    op_finish(op);
}

static void online_count_reply(const struct pn_coreapi_result *r, int64_t value, void *arg)
{
    online_reply(arg, r, value, NULL, 0);
}

static void online_ips_reply(const struct pn_coreapi_result *r,
                             const struct pn_core_online_ip *ips, size_t n, void *arg)
{
    online_reply(arg, r, (int64_t)n, ips, n);
}

int pn_backend_online(struct pn_backend *b, const char *email, bool ip_list,
                      pn_backend_online_cb cb, void *arg, struct pn_backend_op **opp)
{
    struct pn_core_gen *gen = b->sup ? pn_supervisor_active(b->sup) : NULL;
    if (!gen)
        return PN_ERR_STATE;
    struct pn_backend_op *op = op_new(b, OP_ONLINE, arg);
    op->online_cb = cb;
    op->email = pn_strdup(email);
    op->ip_list = ip_list;
    if (opp)
        *opp = op;
    const struct pn_coreconf *c = gen_conf(gen);
    bool supported = ip_list ? pn_dialect_has_online_iplist(&b->core)
                             : pn_dialect_has_online_stats(&b->core);
    if (!supported || !c || !c->stats_user_online) {
        op_defer(op, online_deferred);
        return PN_OK;
    }
    char *name = pn_asprintf("user>>>%s>>>online", email);
    int rv = ip_list ? pn_coreapi_stats_online_iplist(pn_core_gen_api(gen), name, CALL_TIMEOUT_MS,
                                                      online_ips_reply, op)
                     : pn_coreapi_stats_online(pn_core_gen_api(gen), name, CALL_TIMEOUT_MS,
                                               online_count_reply, op);
    free(name);
    if (rv < 0)
        op_defer(op, online_deferred);
    return PN_OK;
}

/* ---- outbound latency (Xray observatory) ------------------------------------------- */

static int latency_cmp(const void *a, const void *b)
{
    return strcmp(((const struct pn_backend_latency *)a)->tag,
                  ((const struct pn_backend_latency *)b)->tag);
}

static bool latency_is_noise(const struct pn_backend_op *op, const char *tag)
{
    for (size_t i = 0; i < op->nnoise; i++)
        if (!strcmp(op->noise[i], tag))
            return true;
    return false;
}

/* Answers from the /debug/vars JSON (NULL: empty): its "observatory"
 * object maps outbound tags to {alive, delay, last_seen_time,
 * last_try_time}. */
static void latency_answer(struct pn_backend_op *op, json_t *vars)
{
    json_t *obs = vars ? json_object_get(vars, "observatory") : NULL;
    size_t n = json_is_object(obs) ? json_object_size(obs) : 0, k = 0;
    struct pn_backend_latency *items = pn_calloc(n ? n : 1, sizeof *items);
    const char *tag;
    json_t *v;
    if (n) {
        json_object_foreach(obs, tag, v)
        {
            if (!json_is_object(v) || latency_is_noise(op, tag) ||
                (*op->pattern && strcmp(op->pattern, tag)))
                continue;
            items[k].tag = tag;
            items[k].alive = json_is_true(json_object_get(v, "alive"));
            items[k].delay = json_integer_value(json_object_get(v, "delay"));
            items[k].last_seen_time = json_integer_value(json_object_get(v, "last_seen_time"));
            items[k].last_try_time = json_integer_value(json_object_get(v, "last_try_time"));
            k++;
        }
        qsort(items, k, sizeof *items, latency_cmp);
    }
    if (!op->detached)
        op->latency_cb(items, k, op->arg);
    free(items);
}

static void latency_finish(evutil_socket_t fd, short what, void *arg)
{
    op_finish(arg);
}

static void latency_reply(struct evhttp_request *req, void *arg)
{
    struct pn_backend_op *op = arg;
    json_t *vars = NULL;
    if (req && evhttp_request_get_response_code(req) == 200) {
        struct evbuffer *in = evhttp_request_get_input_buffer(req);
        size_t len = evbuffer_get_length(in);
        json_error_t jerr;
        vars = json_loadb((const char *)evbuffer_pullup(in, -1), len, 0, &jerr);
        if (!vars)
            pn_log_warn("outbound latency: the core's metrics are not JSON: %s", jerr.text);
    } else {
        pn_log_warn("outbound latency: the core's metrics endpoint did not answer (%d)",
                    req ? evhttp_request_get_response_code(req) : 0);
    }
    latency_answer(op, vars);
    json_decref(vars);
    /* The connection cannot be freed inside its own callback. */
    op->latency_cb = NULL;
    op_defer(op, latency_finish);
}

static void latency_empty(evutil_socket_t fd, short what, void *arg)
{
    struct pn_backend_op *op = arg;
    latency_answer(op, NULL);
    op_finish(op);
}

int pn_backend_latency(struct pn_backend *b, const char *name, pn_backend_latency_cb cb,
                       void *arg, struct pn_backend_op **opp)
{
    struct pn_backend_op *op = op_new(b, OP_LATENCY, arg);
    op->latency_cb = cb;
    op->pattern = pn_strdup(name ? name : ""); /* the tag filter */
    if (opp)
        *opp = op;
    struct pn_core_gen *gen = b->sup ? pn_supervisor_active(b->sup) : NULL;
    const struct pn_coreconf *c = gen_conf(gen);
    if (!c || !c->metrics_port || !c->has_observatory) {
        op_defer(op, latency_empty);
        return PN_OK;
    }
    op->noise = strv_dup((const char *const *)c->noise_outbounds, c->nnoise_outbounds);
    op->nnoise = c->nnoise_outbounds;
    op->http = evhttp_connection_base_new(b->base, NULL, "127.0.0.1", c->metrics_port);
    evhttp_connection_set_timeout(op->http, 5);
    struct evhttp_request *req = evhttp_request_new(latency_reply, op);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Host", "127.0.0.1");
    if (evhttp_make_request(op->http, req, EVHTTP_REQ_GET, "/debug/vars") < 0)
        op_defer(op, latency_empty); /* libevent freed req */
    return PN_OK;
}

/* ---- system stats ----------------------------------------------------------------------- */

void pn_backend_system_stats(const struct pn_backend *b, struct pn_sysstats *out,
                             uint64_t *core_uptime_s)
{
    pn_sysstats_get(b->sys, out);
    struct pn_core_gen *gen = b->sup ? pn_supervisor_active(b->sup) : NULL;
    *core_uptime_s = gen ? (pn_now_ms() - pn_core_gen_started_ms(gen)) / 1000 : 0;
}

/* ---- the periodic tick ---------------------------------------------------------------------- */

static void bank_tick_after(struct pn_backend *b, int rv, const char *err, int code, void *arg)
{
    b->banking = false;
}

/* Banks the active generation's counters (retiring ones are banked by
 * before_stop when they stop). */
static void bank_now(struct pn_backend *b)
{
    struct pn_core_gen *gen = b->sup ? pn_supervisor_active(b->sup) : NULL;
    if (!gen || b->banking)
        return;
    b->banking = true;
    if (bank_gen(b, gen, "", NULL, bank_tick_after, NULL) < 0)
        b->banking = false;
}

static void check_keepalive(struct pn_backend *b)
{
    if (!b->keep_alive_s || b->state == PN_BACKEND_NONE || b->open_streams > 0 || b->idle_logged)
        return;
    if (pn_now_ms() - b->last_activity_ms < b->keep_alive_s * 1000)
        return;
    if (b->opts.keepalive_stops_core) {
        pn_log_warn("keep-alive expired (%llu s without the panel): stopping the core "
                    "(PROXYNODE_KEEPALIVE_STOPS_CORE=true)",
                    (unsigned long long)b->keep_alive_s);
        b->idle_logged = true;
        pn_backend_stop(b, NULL, NULL, NULL);
        return;
    }
    pn_log_warn("keep-alive expired (%llu s without the panel): the session is idle; the core "
                "keeps serving users",
                (unsigned long long)b->keep_alive_s);
    b->idle_logged = true;
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct pn_backend *b = arg;
    b->ticks++;
    if (b->ticks % SYSSTATS_EVERY_TICKS == 0)
        pn_sysstats_sample(b->sys);
    unsigned bank_ticks = b->opts.bank_interval_ms / TICK_MS;
    if (bank_ticks == 0)
        bank_ticks = 1;
    if (b->ticks % bank_ticks == 0)
        bank_now(b);
    check_keepalive(b);
}

/* ---- lifecycle ---------------------------------------------------------------------------- */

struct pn_backend *pn_backend_new(const struct pn_backend_opts *opts)
{
    struct pn_backend *b = pn_new(struct pn_backend);
    b->opts = *opts;
    b->opts.core_path = opts->core_path ? pn_strdup(opts->core_path) : NULL;
    b->opts.assets = pn_strdup(opts->assets ? opts->assets : "");
    b->opts.generated_config_path =
        opts->generated_config_path ? pn_strdup(opts->generated_config_path) : NULL;
    if (!b->opts.start_timeout_ms)
        b->opts.start_timeout_ms = 60000;
    if (!b->opts.bank_interval_ms)
        b->opts.bank_interval_ms = 10000;
    if (!b->opts.log_buffer_size)
        b->opts.log_buffer_size = 10000;
    if (!b->opts.startup_tail)
        b->opts.startup_tail = 200;
    if (!b->opts.drain_ms)
        b->opts.drain_ms = 60000;
    b->base = opts->base;
    b->ledger = pn_ledger_new();
    b->logs = pn_logring_new(b->opts.log_buffer_size);
    b->sys = pn_sysstats_new();
    pn_sysstats_sample(b->sys);
    collect_local_addrs(b);
    b->tick = event_new(b->base, -1, EV_PERSIST, on_tick, b);
    b->ev_kick = event_new(b->base, -1, 0, on_kick, b);
    event_add(b->tick, &(struct timeval){TICK_MS / 1000, (TICK_MS % 1000) * 1000});

    b->version_known = !b->opts.core_path;
    if (b->opts.core_path) {
        char err[256];
        if (pn_core_probe_start(b->base, b->opts.core_path, PROBE_TIMEOUT_MS, on_probe, b,
                                &b->probe, err, sizeof err) < 0) {
            pn_log_warn("core version probe: %s", err);
            b->version_known = true;
        }
    }
    return b;
}

static void shutdown_done(void *arg)
{
    struct pn_backend_op *op = arg;
    op->b->state = PN_BACKEND_NONE;
    op_finish(op);
}

static void shutdown_deferred(evutil_socket_t fd, short what, void *arg)
{
    shutdown_done(arg);
}

void pn_backend_shutdown(struct pn_backend *b, void (*cb)(void *arg), void *arg)
{
    b->shutting_down = true;
    struct pn_backend_op *op = op_new(b, OP_STOP, arg);
    op->shutdown_cb = cb;
    if (b->sup)
        pn_supervisor_stop(b->sup, shutdown_done, op);
    else
        op_defer(op, shutdown_deferred);
}

void pn_backend_free(struct pn_backend *b)
{
    if (!b)
        return;
    b->freeing = true;
    pn_supervisor_free(b->sup); /* kills the cores; no callbacks */
    pn_core_probe_cancel(b->probe);
    while (b->ops)
        op_free(b->ops);
    while (b->waits) {
        struct pn_backend_wait *w = b->waits;
        b->waits = w->next;
        free(w);
    }
    spec_free(&b->cur);
    event_free(b->tick);
    event_free(b->ev_kick);
    pn_ledger_free(b->ledger);
    pn_logring_free(b->logs);
    pn_sysstats_free(b->sys);
    for (size_t i = 0; i < b->naddrs; i++)
        free(b->local_addrs[i]);
    free(b->local_addrs);
    free((char *)b->opts.core_path);
    free((char *)b->opts.assets);
    free((char *)b->opts.generated_config_path);
    free(b);
}
