/* The Marzban core session (see mzcore.h). This module owns the core
 * supervisor of the marzban profile, the 100-line log ring, the version
 * probe, the queue of control operations (/start, /restart, /stop), and the
 * panel configs the generations were built from (`struct spec`, shared by
 * reference between the queue, the supervisor's generations and the
 * "current" slot used for crash restarts).
 *
 * Control operations run one at a time from a queue, from the event loop
 * and never inside the caller: a callback never runs before the call that
 * registered it returned. A queued /restart that a newer /restart overtakes
 * is folded into the newer one and answered with its outcome (the latest
 * config wins). A start is a supervisor start: when a core already serves,
 * the supervisor brings the new generation up next to it and retires the
 * old one (hot handover), which removes the old one's inbounds through its
 * API so new connections land on the new core while open ones finish.
 *
 * When is a start answered? A fresh start (no core serving) as soon as the
 * core prints `(Xray|V2Ray) <version> started` or its API answers; a
 * handover once the supervisor made the new core active and the old one
 * stopped accepting (until then both accept on the same ports); either by
 * 3 s at the latest while the process lives, as the reference does; in
 * fixed mode (PROXYNODE_START_WAIT=fixed) after 3 s, if the core still
 * runs. A failure is answered at once with this process's last line.
 *
 * A launch (`struct launch`) is one supervisor start. It outlives the
 * operation that asked for it when the operation was answered early; it
 * then finishes on its own. If its core dies after having printed its
 * "started" line, before the supervisor took it over, that is a crash
 * like any other: this module brings it up again with backoff and tells
 * the owner (which invalidates the panel session). */
#include "node/mzcore.h"

#include <event2/event.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/env.h"
#include "base/err.h"
#include "base/log.h"
#include "base/utf8.h"
#include "core/coreapi.h"
#include "core/probe.h"
#include "core/supervisor.h"
#include "node/mzconf.h"

/* Lines kept for /logs readers. A new reader gets only the last 100 (the
 * backlog, spec marzban.md §4, chosen in api/marzban.c), but one read of
 * the core's output can bring hundreds of lines before any subscriber gets
 * to run, so the ring is deeper than the backlog: readers that keep up
 * lose nothing (as with the reference, which caches lines per reader). */
#define LOG_LINES 10000
#define PROBE_TIMEOUT_MS 5000
#define DRAIN_MS 60000      /* longest a retired core keeps its open connections */
#define RETIRE_CALL_MS 5000 /* one RemoveInbound on a retired core */
#define LAST_MAX 2048       /* the last output line kept for a 503 detail */
#define RING_PIECE 65536    /* longer lines go into the ring in pieces (spec §4) */
#define DEFAULT_CORE_PATH "/usr/local/bin/xray"

/* A start is answered by then at the latest, as the reference does (spec
 * marzban.md §3.2); a static so the unit test can shorten it. */
static unsigned start_cap_ms = 3000;

/* One panel config as the panel sent it, with the peer it is locked to.
 * ident is the rewrite with no internal API inbound (what "identical"
 * compares), computed on first need. */
struct spec {
    int refs;
    char *config;
    size_t len;
    char *peer;
    char *ident;
    size_t ident_len;
    bool ident_tried;
};

enum op_kind { OP_START, OP_RESTART, OP_STOP };

struct launch;

struct pn_mzcore_op {
    struct pn_mzcore *mz;
    enum op_kind kind;
    struct pn_mzcore_op *qnext;     /* the queue, then the done list */
    struct pn_mzcore_op *followers; /* overtaken restarts answered with this one */
    struct pn_mzcore_op *fnext;
    struct spec *spec;
    pn_mzcore_cb cb;
    void *arg;
    bool detached, running;
    int rv;
    char *detail;
    /* while running */
    struct pn_core_probe *probe;
    struct launch *launch;
    bool ready;      /* the new core answered (fixed mode waits for the cap) */
    uint64_t gen_id; /* the generation this operation spawned */
    char last[LAST_MAX];
    struct event *ev_cap;
};

struct launch {
    struct pn_mzcore *mz;
    struct launch *next;
    struct spec *spec;
    struct pn_mzcore_op *op; /* NULL once the operation answered */
    uint64_t gen_id;
    bool line_ready; /* the core printed its "started" line */
    bool relaunch;   /* brought up again after it died (no operation asked) */
    char last[LAST_MAX];
};

struct pn_mzcore {
    struct pn_mzcore_opts o;
    char *core_path, *assets, *api_host, *cert_file, *key_file;
    char **inbounds;
    struct pn_logring *logs;

    struct pn_core_probe *probe; /* the start-up probe */
    bool version_known;
    struct pn_core_version ver; /* kind UNKNOWN when not read */
    char version[32];

    struct pn_supervisor *sup;
    enum pn_core_kind sup_kind;
    struct spec *cur;        /* the last config that became active */
    struct spec *checked;    /* the last pn_mzcore_check_config, with its rewrite */
    struct launch *launches; /* supervisor starts not yet reported */
    struct launch *spawning; /* set around pn_supervisor_start */

    int retire_pending;                 /* RemoveInbound calls on a retired core */
    struct pn_mzcore_op *retire_waiter; /* answered once they are done */
    bool freeing;

    /* A core that died after its start was answered but before the
     * supervisor took it over is brought up again by this module. */
    struct spec *relaunch_spec;
    struct event *ev_relaunch;
    unsigned relaunch_delay_ms;
    bool crash_told; /* the owner heard of this crash; until a core serves again */

    struct pn_mzcore_op *queue; /* control operations; the head runs */
    struct pn_mzcore_op *done;  /* finished, callbacks pending */
    struct event *ev_kick;
    bool shutting_down, shutdown_fire;
    void (*shutdown_cb)(void *arg);
    void *shutdown_arg;
};

static void kick(struct pn_mzcore *mz);

/* ---- specs ---------------------------------------------------------------- */

static struct spec *spec_new(const char *config, size_t len, const char *peer)
{
    struct spec *s = pn_new(struct spec);
    s->refs = 1;
    s->config = pn_malloc(len + 1);
    if (len)
        memcpy(s->config, config, len);
    s->config[len] = '\0';
    s->len = len;
    s->peer = pn_strdup(peer ? peer : "");
    return s;
}

static struct spec *spec_ref(struct spec *s)
{
    if (s)
        s->refs++;
    return s;
}

static void spec_unref(struct spec *s)
{
    if (!s || --s->refs > 0)
        return;
    free(s->config);
    free(s->peer);
    free(s->ident);
    free(s);
}

static void spec_unref_void(void *p)
{
    spec_unref(p);
}

/* The rewrite options for s; internal_api_port 0 leaves the node's own
 * API inbound out (the identity of a config). */
static struct pn_mzconf_opts rewrite_opts(const struct pn_mzcore *mz, const struct spec *s,
                                          uint16_t internal_api_port)
{
    struct pn_mzconf_opts co = {
        .config = s->config,
        .len = s->len,
        .api_host = mz->api_host,
        .api_port = mz->o.api_port,
        .cert_file = mz->cert_file,
        .key_file = mz->key_file,
        .peer_ip = s->peer,
        .inbounds = (const char *const *)mz->inbounds,
        .ninbounds = mz->o.ninbounds,
        .internal_api_port = internal_api_port,
    };
    return co;
}

static const char *spec_ident(const struct pn_mzcore *mz, struct spec *s, size_t *len)
{
    if (!s->ident_tried) {
        s->ident_tried = true;
        struct pn_mzconf_opts co = rewrite_opts(mz, s, 0);
        char err[512];
        if (pn_mzconf_rewrite(&co, &s->ident, &s->ident_len, err, sizeof err) != PN_OK)
            s->ident = NULL;
    }
    *len = s->ident_len;
    return s->ident;
}

/* Whether two configs make the same core config: the same bytes and peer,
 * or the same rewrite (panel config + peer + INBOUNDS filter). */
static bool spec_same(const struct pn_mzcore *mz, struct spec *a, struct spec *b)
{
    if (a == b)
        return true;
    if (a->len == b->len && !strcmp(a->peer, b->peer) && !memcmp(a->config, b->config, a->len))
        return true;
    size_t la, lb;
    const char *ia = spec_ident(mz, a, &la), *ib = spec_ident(mz, b, &lb);
    return ia && ib && la == lb && !memcmp(ia, ib, la);
}

/* ---- small helpers -------------------------------------------------------- */

static void copy_line(char *dst, const char *line, size_t len)
{
    if (len >= LAST_MAX)
        len = LAST_MAX - 1;
    memcpy(dst, line, len);
    dst[len] = '\0';
}

/* The configured path for the not-found text when no core was found. */
static const char *wanted_path(const struct pn_mzcore *mz)
{
    if (mz->core_path)
        return mz->core_path;
    const char *env = pn_env_get("XRAY_EXECUTABLE_PATH");
    return env ? env : DEFAULT_CORE_PATH;
}

/* The 503 detail of a failed supervisor start: this process's last
 * non-empty output line, else its exit status, else the supervisor's text
 * (spec marzban.md §3.2; never a line of an earlier process). */
static char *failure_detail(const struct pn_mzcore *mz, int rv, const char *err, const char *last)
{
    if (rv == PN_ERR_PROTO && last && *last)
        return pn_strdup(last);
    const char *e = err ? err : pn_strerror(rv);
    if (rv == PN_ERR_PROTO) {
        const char *st = strstr(e, "exited with status ");
        int code;
        if (st && sscanf(st, "exited with status %d", &code) == 1)
            return pn_asprintf("xray exited with status %d", code);
        st = strstr(e, "killed by signal ");
        if (st && sscanf(st, "killed by signal %d", &code) == 1)
            return pn_asprintf("xray was killed by signal %d", code);
        return pn_strdup("xray exited before it was ready");
    }
    if (rv == PN_ERR_IO && strstr(e, "No such file or directory"))
        return pn_asprintf("xray executable not found: %s", wanted_path(mz));
    return pn_strdup(e);
}

/* ---- operations ------------------------------------------------------------ */

static struct pn_mzcore_op *op_new(struct pn_mzcore *mz, enum op_kind kind, pn_mzcore_cb cb,
                                   void *arg)
{
    struct pn_mzcore_op *op = pn_new(struct pn_mzcore_op);
    op->mz = mz;
    op->kind = kind;
    op->cb = cb;
    op->arg = arg;
    return op;
}

static void op_free(struct pn_mzcore_op *op)
{
    while (op->followers) {
        struct pn_mzcore_op *f = op->followers;
        op->followers = f->fnext;
        op_free(f);
    }
    if (op->probe)
        pn_core_probe_cancel(op->probe);
    if (op->launch)
        op->launch->op = NULL;
    if (op->ev_cap)
        event_free(op->ev_cap);
    spec_unref(op->spec);
    free(op->detail);
    free(op);
}

static void enqueue(struct pn_mzcore_op *op)
{
    struct pn_mzcore_op **p = &op->mz->queue;
    while (*p)
        p = &(*p)->qnext;
    op->qnext = NULL;
    *p = op;
    kick(op->mz);
}

/* Moves an operation to the done list with its outcome (detail is
 * copied); its callbacks run from the loop. */
static void finish(struct pn_mzcore_op *op, int rv, const char *detail)
{
    struct pn_mzcore *mz = op->mz;
    for (struct pn_mzcore_op **p = &mz->queue; *p; p = &(*p)->qnext) {
        if (*p == op) {
            *p = op->qnext;
            break;
        }
    }
    if (op->probe) {
        pn_core_probe_cancel(op->probe);
        op->probe = NULL;
    }
    if (op->launch) {
        op->launch->op = NULL;
        op->launch = NULL;
    }
    if (op->ev_cap)
        event_del(op->ev_cap);
    if (mz->retire_waiter == op)
        mz->retire_waiter = NULL;
    op->running = false;
    op->rv = rv;
    free(op->detail);
    op->detail = rv < 0 ? pn_strdup(detail ? detail : pn_strerror(rv)) : NULL;
    struct pn_mzcore_op **p = &mz->done;
    while (*p)
        p = &(*p)->qnext;
    op->qnext = NULL;
    *p = op;
    kick(mz);
}

/* Calls back an operation and the restarts folded into it, then frees
 * them. */
static void deliver(struct pn_mzcore_op *op)
{
    for (struct pn_mzcore_op *f = op; f; f = f == op ? op->followers : f->fnext)
        if (!f->detached && f->cb)
            f->cb(op->rv, op->detail, f->arg);
    op_free(op);
}

void pn_mzcore_op_detach(struct pn_mzcore_op *op)
{
    if (op)
        op->detached = true;
}

/* ---- the supervisor's callbacks ------------------------------------------------ */

static struct launch *find_launch(struct pn_mzcore *mz, uint64_t id)
{
    for (struct launch *l = mz->launches; l; l = l->next)
        if (l->gen_id == id)
            return l;
    return NULL;
}

/* Builds a generation's config: the launch's spec for a start, the current
 * one for a crash restart, with the generation's loopback API port as the
 * node's own API inbound (readiness). */
static char *build_config(struct pn_core_gen *gen, uint16_t api_port, size_t *len, char *err,
                          size_t errlen, void *arg)
{
    struct pn_mzcore *mz = arg;
    struct spec *s = mz->spawning ? mz->spawning->spec : mz->cur;
    if (!s) {
        pn_seterr(err, errlen, PN_ERR_STATE, "no config to start the core with");
        return NULL;
    }
    if (mz->spawning) {
        mz->spawning->gen_id = pn_core_gen_id(gen);
        if (mz->spawning->op)
            mz->spawning->op->gen_id = pn_core_gen_id(gen);
    }
    struct pn_mzconf_opts co = rewrite_opts(mz, s, api_port);
    char *out = NULL;
    if (pn_mzconf_rewrite(&co, &out, len, err, errlen) != PN_OK)
        return NULL;
    pn_core_gen_set_data(gen, spec_ref(s), spec_unref_void);
    return out;
}

/* `(Xray|V2Ray) \S+ started` anywhere in the line. */
static bool is_started_line(const char *line, size_t len)
{
    static const char *const names[] = {"Xray ", "V2Ray "};
    for (size_t k = 0; k < 2; k++) {
        size_t nlen = strlen(names[k]);
        const char *p = line, *end = line + len;
        while ((p = memmem(p, (size_t)(end - p), names[k], nlen))) {
            const char *q = p + nlen;
            const char *word = q;
            while (q < end && *q != ' ' && *q != '\t')
                q++;
            if (q > word && (size_t)(end - q) >= 8 && !memcmp(q, " started", 8))
                return true;
            p++;
        }
    }
    return false;
}

static bool is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

/* Pushes a line into the ring in pieces of at most RING_PIECE bytes, cut
 * on UTF-8 character boundaries, so a long line (the supervisor hands
 * those over in parts) loses nothing (spec marzban.md §4). */
static void ring_push(struct pn_mzcore *mz, const char *line, size_t len)
{
    while (len > RING_PIECE) {
        size_t cut = RING_PIECE;
        while (cut > RING_PIECE - 3 && ((unsigned char)line[cut] & 0xC0) == 0x80)
            cut--;
        pn_logring_push(mz->logs, line, cut);
        line += cut;
        len -= cut;
    }
    pn_logring_push(mz->logs, line, len);
}

/* Every core output line (stdout and stderr): stripped on both sides like
 * the reference's line.strip(), made valid UTF-8, into the ring; kept as
 * the last line of its start; echoed with DEBUG. */
static void on_line(const struct pn_core_gen *gen, const char *line, size_t len, void *arg)
{
    struct pn_mzcore *mz = arg;
    while (len > 0 && is_blank(line[len - 1]))
        len--;
    while (len > 0 && is_blank(line[0])) {
        line++;
        len--;
    }
    char *clean = NULL;
    if (!pn_utf8_valid(line, len)) {
        clean = pn_malloc(3 * len + 1);
        len = pn_utf8_sanitize(line, len, clean);
        line = clean;
    }
    struct pn_mzcore_op *op = NULL;
    bool started = false;
    if (len > 0) {
        uint64_t id = pn_core_gen_id(gen);
        started = is_started_line(line, len);
        struct launch *l = find_launch(mz, id);
        if (l) {
            copy_line(l->last, line, len);
            l->line_ready |= started;
        }
        op = mz->queue;
        if (op && op->running && op->gen_id == id)
            copy_line(op->last, line, len);
        else
            op = NULL;
    }
    ring_push(mz, line, len);
    /* With no other core running, the core's own "started" line counts as
     * ready (DESIGN.md "Core process"): v2ray accepts on its inbounds before
     * its API outbound exists, so an API poll can lag the line by a second.
     * A handover waits for the supervisor instead: until the old core is
     * retired it still accepts on the same ports. */
    if (started && op && op->launch && !mz->o.start_wait_fixed && !pn_supervisor_active(mz->sup))
        finish(op, PN_OK, NULL);
    if (mz->o.debug)
        pn_log_debug("%.*s", (int)len, line);
    free(clean);
}

static void retire_reply(const struct pn_coreapi_result *r, void *arg)
{
    struct pn_mzcore *mz = arg;
    if (r->rv != PN_OK && r->rv != PN_ERR_CLOSED)
        pn_log_debug("handover: removing an inbound from the old core: %s", r->message);
    if (mz->freeing || --mz->retire_pending > 0)
        return;
    struct pn_mzcore_op *op = mz->retire_waiter;
    mz->retire_waiter = NULL;
    if (op)
        finish(op, PN_OK, NULL);
}

static void retire_one(struct pn_mzcore *mz, struct pn_coreapi *api, const char *tag)
{
    if (pn_coreapi_remove_inbound(api, tag, RETIRE_CALL_MS, retire_reply, mz) == PN_OK)
        mz->retire_pending++;
}

/* ---- inbound tags without a full parse ---------------------------------------- */

/* The handover needs the tags of the old core's inbounds. A panel config
 * can be tens of MB (every user inline), which jansson takes over a second
 * to load; this walker only skips values, so it finds the few tags in a
 * fraction of that. Input it cannot walk yields the tags found so far. */

struct jwalk {
    const char *p, *end;
};

static void jw_ws(struct jwalk *w)
{
    while (w->p < w->end && is_blank(*w->p))
        w->p++;
}

/* Skips a string at w->p (its opening quote); *escaped tells whether it
 * holds escapes. Returns false at the end of input. */
static bool jw_string(struct jwalk *w, const char **start, size_t *len, bool *escaped)
{
    w->p++;
    *start = w->p;
    *escaped = false;
    while (w->p < w->end && *w->p != '"') {
        if (*w->p == '\\') {
            *escaped = true;
            w->p++;
        }
        w->p++;
    }
    if (w->p >= w->end)
        return false;
    *len = (size_t)(w->p - *start);
    w->p++;
    return true;
}

/* Skips one value of any kind (no recursion: a depth count). */
static bool jw_skip(struct jwalk *w)
{
    jw_ws(w);
    if (w->p >= w->end)
        return false;
    const char *st;
    size_t n;
    bool esc;
    if (*w->p == '"')
        return jw_string(w, &st, &n, &esc);
    if (*w->p != '{' && *w->p != '[') {
        while (w->p < w->end && !strchr(",}] \t\r\n", *w->p))
            w->p++;
        return true;
    }
    size_t depth = 0;
    while (w->p < w->end) {
        char c = *w->p;
        if (c == '"') {
            if (!jw_string(w, &st, &n, &esc))
                return false;
            continue;
        }
        if (c == '{' || c == '[')
            depth++;
        else if ((c == '}' || c == ']') && --depth == 0) {
            w->p++;
            return true;
        }
        w->p++;
    }
    return false;
}

/* Calls fn for the value of every key of the object at w->p; fn must
 * consume the value. */
static bool jw_object(struct jwalk *w,
                      bool (*fn)(struct jwalk *w, const char *key, size_t klen, void *arg),
                      void *arg)
{
    jw_ws(w);
    if (w->p >= w->end || *w->p != '{')
        return jw_skip(w);
    w->p++;
    for (;;) {
        jw_ws(w);
        if (w->p < w->end && *w->p == '}') {
            w->p++;
            return true;
        }
        const char *key;
        size_t klen;
        bool esc;
        if (w->p >= w->end || *w->p != '"' || !jw_string(w, &key, &klen, &esc))
            return false;
        jw_ws(w);
        if (w->p >= w->end || *w->p != ':')
            return false;
        w->p++;
        if (!fn(w, esc ? "" : key, esc ? 0 : klen, arg))
            return false;
        jw_ws(w);
        if (w->p < w->end && *w->p == ',')
            w->p++;
    }
}

struct tag_list {
    char **v;
    size_t n;
};

static bool jw_inbound_key(struct jwalk *w, const char *key, size_t klen, void *arg)
{
    struct tag_list *tl = arg;
    jw_ws(w);
    if (klen != 3 || memcmp(key, "tag", 3) || w->p >= w->end || *w->p != '"')
        return jw_skip(w);
    const char *start = w->p;
    const char *st;
    size_t n;
    bool esc;
    if (!jw_string(w, &st, &n, &esc))
        return false;
    char *tag;
    if (esc) { /* rare: let jansson decode the token */
        json_t *j = json_loadb(start, (size_t)(w->p - start), JSON_DECODE_ANY, NULL);
        tag = json_is_string(j) ? pn_strdup(json_string_value(j)) : NULL;
        json_decref(j);
    } else {
        tag = pn_strndup(st, n);
    }
    if (tag) {
        tl->v = pn_realloc(tl->v, (tl->n + 1) * sizeof *tl->v);
        tl->v[tl->n++] = tag;
    }
    return true;
}

static bool jw_top_key(struct jwalk *w, const char *key, size_t klen, void *arg)
{
    jw_ws(w);
    if (klen != 8 || memcmp(key, "inbounds", 8) || w->p >= w->end || *w->p != '[')
        return jw_skip(w);
    w->p++;
    for (;;) {
        jw_ws(w);
        if (w->p >= w->end)
            return false;
        if (*w->p == ']') {
            w->p++;
            return true;
        }
        if (!(*w->p == '{' ? jw_object(w, jw_inbound_key, arg) : jw_skip(w)))
            return false;
        jw_ws(w);
        if (w->p < w->end && *w->p == ',')
            w->p++;
    }
}

/* The string tags of the top-level `inbounds` array of a config text. */
static void inbound_tags(const char *config, size_t len, struct tag_list *out)
{
    struct jwalk w = {config, config + len};
    out->v = NULL;
    out->n = 0;
    jw_object(&w, jw_top_key, out);
}

static void tag_list_free(struct tag_list *tl)
{
    for (size_t i = 0; i < tl->n; i++)
        free(tl->v[i]);
    free(tl->v);
}

/* A handover retired gen: it stops accepting on every inbound but the
 * node's own API one (the panel's API inbound included, so the panel's
 * next connection meets the new core); its open connections go on. */
static void on_retire(struct pn_core_gen *gen, void *arg)
{
    struct pn_mzcore *mz = arg;
    struct spec *s = pn_core_gen_data(gen);
    if (!s)
        return;
    struct pn_coreapi *api = pn_core_gen_api(gen);
    retire_one(mz, api, "API_INBOUND");
    struct tag_list tl;
    inbound_tags(s->config, s->len, &tl);
    for (size_t i = 0; i < tl.n; i++) {
        const char *tag = tl.v[i];
        bool seen = !strcmp(tag, "API_INBOUND") || !strcmp(tag, PN_MZ_INTERNAL_API_TAG);
        for (size_t k = 0; k < i && !seen; k++)
            seen = !strcmp(tl.v[k], tag);
        if (!seen)
            retire_one(mz, api, tag);
    }
    tag_list_free(&tl);
}

/* Tells the owner once per crash: failed restart attempts that follow do
 * not invalidate the panel's new session again. */
static void tell_crash(struct pn_mzcore *mz)
{
    if (mz->crash_told)
        return;
    mz->crash_told = true;
    if (mz->o.on_crash)
        mz->o.on_crash(mz->o.arg);
}

static void on_crash(const char *detail, unsigned delay_ms, void *arg)
{
    struct pn_mzcore *mz = arg;
    if (!mz->o.supervise) {
        pn_log_warn("Xray core exited unexpectedly (%s); not restarting it "
                    "(PROXYNODE_SUPERVISE=false)",
                    detail);
        /* A start in flight brings a core up by itself; otherwise cancel the
         * supervisor's restart. */
        if (!mz->launches)
            pn_supervisor_stop(mz->sup, NULL, NULL);
        return;
    }
    pn_log_warn("Xray core exited unexpectedly (%s); restarting it in %u ms", detail, delay_ms);
    tell_crash(mz);
}

static void on_restarted(struct pn_core_gen *gen, void *arg)
{
    struct pn_mzcore *mz = arg;
    mz->crash_told = false;
    pn_log_info("Xray core restarted (pid %d)", (int)pn_core_gen_pid(gen));
}

/* ---- start ------------------------------------------------------------------- */

static void launch_free(struct launch *l)
{
    struct pn_mzcore *mz = l->mz;
    for (struct launch **p = &mz->launches; *p; p = &(*p)->next) {
        if (*p == l) {
            *p = l->next;
            break;
        }
    }
    if (l->op)
        l->op->launch = NULL;
    spec_unref(l->spec);
    free(l);
}

static void core_died(struct pn_mzcore *mz, struct spec *spec, const char *detail);

/* A supervisor start ended: the new core serves (its config becomes the
 * current one) or it failed (the process is gone already). A core that
 * failed after its start was answered and after it printed its "started"
 * line did start: that is a crash. */
static void launch_done(int rv, const char *err, struct pn_core_gen *gen, void *arg)
{
    struct launch *l = arg;
    struct pn_mzcore *mz = l->mz;
    struct pn_mzcore_op *op = l->op;
    if (rv == PN_OK) {
        spec_unref(mz->cur);
        mz->cur = spec_ref(l->spec);
        mz->relaunch_delay_ms = 0;
        mz->crash_told = false;
        pn_log_info("Xray core %s (pid %d)", l->relaunch ? "restarted" : "started",
                    (int)pn_core_gen_pid(gen));
        launch_free(l);
        if (!op)
            return;
        if (mz->o.start_wait_fixed && evtimer_pending(op->ev_cap, NULL))
            op->ready = true; /* answered when the 3 s are up */
        else if (mz->retire_pending > 0)
            mz->retire_waiter = op; /* once the old core stopped accepting */
        else
            finish(op, PN_OK, NULL);
        return;
    }
    char *detail = failure_detail(mz, rv, err, l->last);
    bool crashed = rv != PN_ERR_STATE && !op && (l->line_ready || l->relaunch);
    if (rv != PN_ERR_STATE && !crashed) /* superseded or stopped on purpose: not a failure */
        pn_log_error("Failed to start core: %s", detail);
    struct spec *spec = spec_ref(l->spec);
    launch_free(l);
    /* Without supervision a failed start must not leave a crash restart
     * of an earlier core scheduled. */
    if (!mz->o.supervise && mz->sup && !mz->launches && pn_supervisor_restarting(mz->sup))
        pn_supervisor_stop(mz->sup, NULL, NULL);
    if (op)
        finish(op, rv, detail);
    else if (crashed)
        core_died(mz, spec, detail);
    spec_unref(spec);
    free(detail);
}

/* 3 s after the spawn (spec marzban.md §3.2): a core that is still
 * starting is answered as started, like the reference; in fixed mode a
 * ready core is answered now, if it still runs. */
static void on_cap(evutil_socket_t fd, short what, void *arg)
{
    struct pn_mzcore_op *op = arg;
    struct pn_mzcore *mz = op->mz;
    if (op->launch) { /* still starting and alive */
        if (!mz->o.start_wait_fixed)
            pn_log_info("Xray core not ready after %u ms; answering as started (the start "
                        "goes on)",
                        start_cap_ms);
        finish(op, PN_OK, NULL);
        return;
    }
    if (op->ready) { /* it was ready: does it still run? */
        struct pn_core_gen *active = pn_supervisor_active(mz->sup);
        if (active && pn_core_gen_id(active) == op->gen_id) {
            finish(op, PN_OK, NULL);
        } else {
            char *detail = failure_detail(mz, PN_ERR_PROTO, NULL, op->last);
            finish(op, PN_ERR_PROTO, detail);
            free(detail);
        }
    }
}

static void ensure_supervisor(struct pn_mzcore *mz)
{
    enum pn_core_kind kind = mz->ver.kind != PN_CORE_UNKNOWN ? mz->ver.kind : PN_CORE_V2RAY;
    if (mz->sup && mz->sup_kind != kind && !pn_supervisor_active(mz->sup) &&
        !pn_supervisor_restarting(mz->sup) && !mz->launches) {
        struct pn_core_gen *g;
        if (pn_supervisor_gens(mz->sup, &g, 1) == 0) {
            pn_supervisor_free(mz->sup); /* the binary changed kind: new API dialect */
            mz->sup = NULL;
        }
    }
    if (mz->sup)
        return;
    struct pn_supervisor_opts so = {
        .base = mz->o.base,
        .exe = mz->core_path,
        .assets = mz->assets,
        .kind = kind,
        .start_timeout_ms = mz->o.start_timeout_ms,
        .drain_ms = DRAIN_MS,
        .build_config = build_config,
        .on_line = on_line,
        .on_retire = on_retire,
        .on_crash = on_crash,
        .on_restarted = on_restarted,
        .arg = mz,
    };
    mz->sup = pn_supervisor_new(&so);
    mz->sup_kind = kind;
}

static void cancel_relaunch(struct pn_mzcore *mz)
{
    event_del(mz->ev_relaunch);
    spec_unref(mz->relaunch_spec);
    mz->relaunch_spec = NULL;
}

/* Starts a supervisor start of spec for op (NULL: a relaunch). Returns
 * the launch, or NULL when the supervisor refused. */
static struct launch *launch_spawn(struct pn_mzcore *mz, struct spec *spec, struct pn_mzcore_op *op)
{
    ensure_supervisor(mz);
    cancel_relaunch(mz); /* this start brings a core up */
    struct launch *l = pn_new(struct launch);
    l->mz = mz;
    l->spec = spec_ref(spec);
    l->op = op;
    l->relaunch = !op;
    l->next = mz->launches;
    mz->launches = l;
    if (op)
        op->launch = l;
    mz->spawning = l;
    int rv = pn_supervisor_start(mz->sup, launch_done, l);
    mz->spawning = NULL;
    if (rv != PN_OK) {
        launch_free(l);
        return NULL;
    }
    return l;
}

static void arm_cap(struct pn_mzcore_op *op)
{
    struct timeval cap = {start_cap_ms / 1000, (start_cap_ms % 1000) * 1000};
    if (!op->ev_cap)
        op->ev_cap = evtimer_new(op->mz->o.base, on_cap, op);
    evtimer_add(op->ev_cap, &cap);
}

static void spawn(struct pn_mzcore_op *op)
{
    struct pn_mzcore *mz = op->mz;
    if (op->kind == OP_RESTART && mz->sup && pn_supervisor_active(mz->sup))
        pn_log_warn("Restarting Xray core...");
    arm_cap(op);
    if (!launch_spawn(mz, op->spec, op))
        finish(op, PN_ERR_IO, "cannot start xray");
}

/* ---- a core that died before the supervisor took it over --------------------- */

static bool start_pending(const struct pn_mzcore *mz);

static void on_relaunch(evutil_socket_t fd, short what, void *arg)
{
    struct pn_mzcore *mz = arg;
    struct spec *spec = mz->relaunch_spec;
    mz->relaunch_spec = NULL;
    if (spec && !mz->shutting_down && !start_pending(mz) && !mz->launches)
        launch_spawn(mz, spec, NULL);
    spec_unref(spec);
}

/* A core whose start was answered died before the supervisor made it the
 * active one (it printed its "started" line, so it ran): like a crash, it
 * is brought up again with backoff (100 ms doubling to 10 s) and the owner
 * is told once, unless supervision is off or an operation will start a
 * core anyway. */
static void core_died(struct pn_mzcore *mz, struct spec *spec, const char *detail)
{
    if (!mz->o.supervise) {
        pn_log_warn("Xray core exited unexpectedly (%s); not restarting it "
                    "(PROXYNODE_SUPERVISE=false)",
                    detail);
        return;
    }
    if (mz->shutting_down || start_pending(mz) || mz->launches)
        return;
    unsigned delay = mz->relaunch_delay_ms ? mz->relaunch_delay_ms : 100;
    mz->relaunch_delay_ms = delay * 2 > 10000 ? 10000 : delay * 2;
    pn_log_warn("Xray core exited unexpectedly (%s); restarting it in %u ms", detail, delay);
    spec_unref(mz->relaunch_spec);
    mz->relaunch_spec = spec_ref(spec);
    struct timeval tv = {delay / 1000, (delay % 1000) * 1000};
    evtimer_add(mz->ev_relaunch, &tv);
    tell_crash(mz);
}

static void set_version(struct pn_mzcore *mz, int rv, const struct pn_core_version *ver)
{
    mz->version_known = true;
    if (rv == PN_OK) {
        mz->ver = *ver;
        snprintf(mz->version, sizeof mz->version, "%s", ver->text);
    } else {
        memset(&mz->ver, 0, sizeof mz->ver);
        mz->version[0] = '\0';
    }
}

static void on_start_probe(int rv, const struct pn_core_version *ver, const char *detail, void *arg)
{
    struct pn_mzcore_op *op = arg;
    op->probe = NULL;
    if (rv != PN_OK)
        pn_log_warn("core version probe of %s failed: %s", op->mz->core_path, detail);
    set_version(op->mz, rv, ver);
    spawn(op);
}

/* Runs a /start or /restart at the head of the queue: an identical
 * /restart of a running core is answered at once; otherwise the version is
 * read again (spec marzban.md §8) and a new core generation started. */
static void start_run(struct pn_mzcore_op *op)
{
    struct pn_mzcore *mz = op->mz;
    struct pn_core_gen *active = mz->sup ? pn_supervisor_active(mz->sup) : NULL;
    if (op->kind == OP_RESTART && !mz->o.restart_identical && active &&
        !pn_supervisor_restarting(mz->sup) && !mz->launches) {
        struct spec *running = pn_core_gen_data(active);
        if (running && spec_same(mz, running, op->spec)) {
            pn_log_info("restart: the config is unchanged; the running core keeps serving");
            finish(op, PN_OK, NULL);
            return;
        }
    }
    /* The same config is still being started (its start was answered
     * early): the same outcome, without a new process. */
    struct launch *pending = mz->launches;
    if (op->kind == OP_RESTART && !mz->o.restart_identical && pending && !pending->op &&
        spec_same(mz, pending->spec, op->spec)) {
        pn_log_info("restart: the config is unchanged; the core starting with it is kept");
        if (pending->line_ready) {
            finish(op, PN_OK, NULL);
            return;
        }
        pending->op = op;
        op->launch = pending;
        op->gen_id = pending->gen_id;
        arm_cap(op);
        return;
    }
    if (!mz->core_path || access(mz->core_path, X_OK) != 0) {
        char *detail = pn_asprintf("xray executable not found: %s", wanted_path(mz));
        pn_log_error("Failed to start core: %s", detail);
        finish(op, PN_ERR_NOTFOUND, detail);
        free(detail);
        return;
    }
    char err[512];
    if (pn_core_probe_start(mz->o.base, mz->core_path, PROBE_TIMEOUT_MS, on_start_probe, op,
                            &op->probe, err, sizeof err) != PN_OK) {
        pn_log_warn("core version probe: %s", err);
        spawn(op);
    }
}

/* ---- stop ---------------------------------------------------------------------- */

static void stop_done(void *arg)
{
    struct pn_mzcore_op *op = arg;
    struct pn_mzcore *mz = op->mz;
    spec_unref(mz->cur);
    mz->cur = NULL;
    finish(op, PN_OK, NULL);
}

static void stop_run(struct pn_mzcore_op *op)
{
    struct pn_mzcore *mz = op->mz;
    cancel_relaunch(mz);
    mz->relaunch_delay_ms = 0;
    mz->crash_told = false;
    if (!mz->sup) {
        finish(op, PN_OK, NULL);
        return;
    }
    if (pn_mzcore_started(mz))
        pn_log_warn("Xray core stopped");
    pn_supervisor_stop(mz->sup, stop_done, op);
}

/* ---- the loop ---------------------------------------------------------------------- */

static void run_queue(struct pn_mzcore *mz)
{
    struct pn_mzcore_op *op = mz->queue;
    if (!op || op->running || mz->shutting_down)
        return;
    op->running = true;
    if (op->kind == OP_STOP)
        stop_run(op);
    else
        start_run(op);
}

/* Delivers finished operations, then runs the next one; the node's
 * shutdown callback goes last. */
static void on_kick(evutil_socket_t fd, short what, void *arg)
{
    struct pn_mzcore *mz = arg;
    struct pn_mzcore_op *op;
    while ((op = mz->done)) {
        mz->done = op->qnext;
        deliver(op);
    }
    run_queue(mz);
    if (mz->shutdown_fire) {
        mz->shutdown_fire = false;
        void (*cb)(void *) = mz->shutdown_cb;
        mz->shutdown_cb = NULL;
        if (cb)
            cb(mz->shutdown_arg);
    }
}

static void kick(struct pn_mzcore *mz)
{
    event_active(mz->ev_kick, EV_TIMEOUT, 1);
}

/* ---- public ---------------------------------------------------------------------------- */

static void on_first_probe(int rv, const struct pn_core_version *ver, const char *detail, void *arg)
{
    struct pn_mzcore *mz = arg;
    mz->probe = NULL;
    if (rv == PN_OK)
        pn_log_info("core: %s at %s", detail, mz->core_path);
    else
        pn_log_warn("core version probe of %s failed: %s", mz->core_path, detail);
    set_version(mz, rv, ver);
}

struct pn_mzcore *pn_mzcore_new(const struct pn_mzcore_opts *opts)
{
    struct pn_mzcore *mz = pn_new(struct pn_mzcore);
    mz->o = *opts;
    mz->core_path = opts->core_path ? pn_strdup(opts->core_path) : NULL;
    mz->assets = pn_strdup(opts->assets ? opts->assets : "");
    mz->api_host = pn_strdup(opts->api_host ? opts->api_host : "0.0.0.0");
    mz->cert_file = pn_strdup(opts->cert_file ? opts->cert_file : "");
    mz->key_file = pn_strdup(opts->key_file ? opts->key_file : "");
    mz->inbounds = pn_calloc(opts->ninbounds + 1, sizeof *mz->inbounds);
    for (size_t i = 0; i < opts->ninbounds; i++)
        mz->inbounds[i] = pn_strdup(opts->inbounds[i]);
    mz->o.core_path = mz->core_path;
    mz->o.assets = mz->assets;
    mz->o.api_host = mz->api_host;
    mz->o.cert_file = mz->cert_file;
    mz->o.key_file = mz->key_file;
    mz->o.inbounds = (const char *const *)mz->inbounds;
    mz->logs = pn_logring_new(LOG_LINES);
    mz->ev_kick = event_new(opts->base, -1, 0, on_kick, mz);
    mz->ev_relaunch = evtimer_new(opts->base, on_relaunch, mz);

    if (!mz->core_path) {
        mz->version_known = true;
        pn_log_warn("no core found: /start answers `xray executable not found: %s`",
                    wanted_path(mz));
        return mz;
    }
    char err[512];
    if (pn_core_probe_start(opts->base, mz->core_path, PROBE_TIMEOUT_MS, on_first_probe, mz,
                            &mz->probe, err, sizeof err) != PN_OK) {
        pn_log_warn("core version probe: %s", err);
        mz->version_known = true;
    }
    return mz;
}

static void free_op_list(struct pn_mzcore_op *op)
{
    while (op) {
        struct pn_mzcore_op *next = op->qnext;
        op_free(op);
        op = next;
    }
}

void pn_mzcore_free(struct pn_mzcore *mz)
{
    if (!mz)
        return;
    mz->freeing = true;
    pn_supervisor_free(mz->sup); /* kills and reaps; only API calls fail back */
    pn_core_probe_cancel(mz->probe);
    free_op_list(mz->queue);
    free_op_list(mz->done);
    while (mz->launches)
        launch_free(mz->launches);
    spec_unref(mz->cur);
    spec_unref(mz->checked);
    spec_unref(mz->relaunch_spec);
    pn_logring_free(mz->logs);
    event_free(mz->ev_kick);
    event_free(mz->ev_relaunch);
    for (size_t i = 0; i < mz->o.ninbounds; i++)
        free(mz->inbounds[i]);
    free(mz->inbounds);
    free(mz->core_path);
    free(mz->assets);
    free(mz->api_host);
    free(mz->cert_file);
    free(mz->key_file);
    free(mz);
}

static void shutdown_done(void *arg)
{
    struct pn_mzcore *mz = arg;
    mz->shutdown_fire = true;
    kick(mz);
}

void pn_mzcore_shutdown(struct pn_mzcore *mz, void (*cb)(void *arg), void *arg)
{
    mz->shutting_down = true;
    cancel_relaunch(mz);
    mz->shutdown_cb = cb;
    mz->shutdown_arg = arg;
    if (mz->probe) {
        pn_core_probe_cancel(mz->probe);
        mz->probe = NULL;
        mz->version_known = true;
    }
    /* Queued operations will not run; the running one ends with the core
     * (a start fails with `core stopped`). */
    struct pn_mzcore_op *op = mz->queue;
    while (op) {
        struct pn_mzcore_op *next = op->qnext;
        if (!op->running || op->probe || (op->kind != OP_STOP && !op->launch))
            finish(op, op->kind == OP_STOP ? PN_OK : PN_ERR_STATE, "the node is shutting down");
        op = next;
    }
    if (mz->sup)
        pn_supervisor_stop(mz->sup, shutdown_done, mz);
    else
        shutdown_done(mz);
}

const char *pn_mzcore_version(const struct pn_mzcore *mz)
{
    return mz->version_known ? mz->version : NULL;
}

bool pn_mzcore_started(const struct pn_mzcore *mz)
{
    if (!mz->sup)
        return false;
    return pn_supervisor_active(mz->sup) || pn_supervisor_restarting(mz->sup) || mz->launches ||
           mz->relaunch_spec;
}

struct pn_logring *pn_mzcore_logs(struct pn_mzcore *mz)
{
    return mz->logs;
}

/* A start or restart waits in the queue or runs. */
static bool start_pending(const struct pn_mzcore *mz)
{
    for (const struct pn_mzcore_op *op = mz->queue; op; op = op->qnext)
        if (op->kind != OP_STOP)
            return true;
    return false;
}

int pn_mzcore_check_config(struct pn_mzcore *mz, const char *config, size_t len,
                           const char *peer_ip, char *err, size_t errlen)
{
    struct spec *s = spec_new(config, len, peer_ip);
    struct pn_mzconf_opts co = rewrite_opts(mz, s, 0);
    s->ident_tried = true;
    int rv = pn_mzconf_rewrite(&co, &s->ident, &s->ident_len, err, errlen);
    if (rv != PN_OK) {
        spec_unref(s);
        return rv;
    }
    spec_unref(mz->checked);
    mz->checked = s;
    return PN_OK;
}

/* The spec of a config: the one just checked (with its rewrite) when it is
 * the same config and peer, else a new copy. */
static struct spec *take_spec(struct pn_mzcore *mz, const char *config, size_t len,
                              const char *peer_ip)
{
    struct spec *c = mz->checked;
    mz->checked = NULL;
    if (c && c->len == len && !strcmp(c->peer, peer_ip ? peer_ip : "") &&
        !memcmp(c->config, config, len))
        return c;
    spec_unref(c);
    return spec_new(config, len, peer_ip);
}

int pn_mzcore_start(struct pn_mzcore *mz, const char *config, size_t len, const char *peer_ip,
                    pn_mzcore_cb cb, void *arg, struct pn_mzcore_op **opp, char *err, size_t errlen)
{
    if (mz->shutting_down)
        return pn_seterr(err, errlen, PN_ERR_STATE, "the node is shutting down");
    if (pn_mzcore_started(mz) || start_pending(mz))
        return pn_seterr(err, errlen, PN_ERR_STATE, "Xray is started already");
    struct pn_mzcore_op *op = op_new(mz, OP_START, cb, arg);
    op->spec = take_spec(mz, config, len, peer_ip);
    if (opp)
        *opp = op;
    enqueue(op);
    return PN_OK;
}

int pn_mzcore_restart(struct pn_mzcore *mz, const char *config, size_t len, const char *peer_ip,
                      pn_mzcore_cb cb, void *arg, struct pn_mzcore_op **opp)
{
    struct pn_mzcore_op *op = op_new(mz, OP_RESTART, cb, arg);
    op->spec = take_spec(mz, config, len, peer_ip);
    if (opp)
        *opp = op;
    if (mz->shutting_down) {
        enqueue(op); /* never runs: finished right away */
        finish(op, PN_ERR_STATE, "the node is shutting down");
        return PN_OK;
    }
    /* Restarts still waiting are overtaken: they get this one's outcome. */
    for (struct pn_mzcore_op **p = &mz->queue; *p;) {
        struct pn_mzcore_op *q = *p;
        if (q->kind != OP_RESTART || q->running) {
            p = &q->qnext;
            continue;
        }
        *p = q->qnext;
        struct pn_mzcore_op **tail = &op->followers;
        while (*tail)
            tail = &(*tail)->fnext;
        *tail = q;
        /* q's own followers move up behind it */
        q->fnext = q->followers;
        q->followers = NULL;
    }
    enqueue(op);
    return PN_OK;
}

int pn_mzcore_stop(struct pn_mzcore *mz, pn_mzcore_cb cb, void *arg, struct pn_mzcore_op **opp)
{
    struct pn_mzcore_op *op = op_new(mz, OP_STOP, cb, arg);
    if (opp)
        *opp = op;
    enqueue(op);
    if (mz->shutting_down)
        finish(op, PN_OK, NULL);
    return PN_OK;
}
