/* Shared parts of the libFuzzer targets (see common.h). This file owns the
 * test world (event_base, core-less backend, PasarGuard front), the REST
 * handler and gRPC echo service the transport targets serve, and the lists
 * of requests and calls those handlers hold between loop rounds. A request
 * or call still held after its connection was destroyed means a transport
 * broke its contract (on_close / on_cancel must fire): that aborts, so the
 * fuzzer reports it as a crash. */
#include "common.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/pasarguard.h"
#include "base/err.h"
#include "base/log.h"
#include "base/uuid.h"
#include "node/backend.h"

#define FZ_MAX_HELD 64

uint8_t fz_u8(struct fz_in *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

uint16_t fz_u16(struct fz_in *in)
{
    uint16_t hi = fz_u8(in);
    return (uint16_t)(hi << 8 | fz_u8(in));
}

/* ---- the world ------------------------------------------------------------ */

static struct fz_world world;
static struct event *later_ev; /* answers held requests and calls */

static void later_cb(evutil_socket_t fd, short what, void *arg);

struct fz_world *fz_world(void)
{
    if (world.base)
        return &world;
    pn_log_set_level(fz_verbose() ? PN_LOG_DEBUG : PN_LOG_ERROR);
    world.base = event_base_new();
    struct pn_backend_opts bo = {.base = world.base, .core_path = NULL, .log_buffer_size = 16};
    world.backend = pn_backend_new(&bo);
    struct pn_pasarguard_opts po = {
        .backend = world.backend, .node_version = "fuzz", .base = world.base};
    if (pn_uuid_parse(FZ_API_KEY, strlen(FZ_API_KEY), &po.api_key) != PN_OK)
        abort();
    world.pg = pn_pasarguard_new(&po);
    later_ev = event_new(world.base, -1, 0, later_cb, NULL);
    return &world;
}

bool fz_verbose(void)
{
    static int verbose = -1;
    if (verbose < 0)
        verbose = getenv("FUZZ_VERBOSE") != NULL;
    return verbose;
}

void fz_spin_until(struct event_base *base, const bool *stop)
{
    for (int i = 0; i < 1000 && !(stop && *stop); i++) {
        event_base_loop(base, EVLOOP_NONBLOCK);
        if (event_base_get_num_events(base, EVENT_BASE_COUNT_ACTIVE) == 0)
            break;
    }
}

void fz_spin(struct event_base *base)
{
    fz_spin_until(base, NULL);
}

/* ---- the HTTP/1.1 client end -------------------------------------------------- */

static const http_parser_settings syntax_only;

static void reader_take(struct fz_reader *r, struct evbuffer *in)
{
    while (evbuffer_get_length(in)) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        if (fz_verbose()) /* what the server wrote, for reading a crash input */
            fprintf(stderr, "server wrote %zu: %.*s\n", v.iov_len,
                    (int)(v.iov_len > 2000 ? 2000 : v.iov_len), (const char *)v.iov_base);
        if (r->check && HTTP_PARSER_ERRNO(&r->parser) == HPE_OK) {
            http_parser_execute(&r->parser, r->settings ? r->settings : &syntax_only, v.iov_base,
                                v.iov_len);
            enum http_errno e = HTTP_PARSER_ERRNO(&r->parser);
            if (e != HPE_OK) {
                fprintf(stderr, "%s: the server wrote a malformed response: %s\n", r->target,
                        http_errno_description(e));
                abort();
            }
            if (r->parser.upgrade)
                r->check = false;
        }
        evbuffer_drain(in, v.iov_len);
    }
}

static void reader_read(struct bufferevent *bev, void *arg)
{
    reader_take(arg, bufferevent_get_input(bev));
}

static void reader_event(struct bufferevent *bev, short what, void *arg)
{
    (void)what;
    reader_take(arg, bufferevent_get_input(bev));
}

void fz_reader_attach(struct fz_reader *r, struct bufferevent *bev, const char *target,
                      const http_parser_settings *settings, bool check, void *user)
{
    memset(r, 0, sizeof *r);
    http_parser_init(&r->parser, HTTP_RESPONSE);
    r->parser.data = r;
    r->settings = settings;
    r->target = target;
    r->check = check;
    r->user = user;
    bufferevent_setcb(bev, reader_read, NULL, reader_event, r);
}

void fz_wait_2ms(struct event_base *base)
{
    struct timeval tv = {0, 2000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
}

static void kick_later(void)
{
    event_active(later_ev, EV_TIMEOUT, 1);
}

/* ---- REST ---------------------------------------------------------------- */

struct held_req {
    struct pn_req *req;
    enum fz_mode mode;
};
static struct held_req held_reqs[FZ_MAX_HELD];
static size_t nheld_reqs;

static void unhold_req(const struct pn_req *req)
{
    for (size_t i = 0; i < nheld_reqs; i++) {
        if (held_reqs[i].req == req) {
            held_reqs[i] = held_reqs[--nheld_reqs];
            return;
        }
    }
}

static bool is_held_req(const struct pn_req *req)
{
    for (size_t i = 0; i < nheld_reqs; i++)
        if (held_reqs[i].req == req)
            return true;
    return false;
}

/* Answers with what the handler saw (method, path, query, a header, a
 * query parameter and the body), so the accessors run on peer data. */
static void echo(struct pn_req *req)
{
    char q[64] = "";
    pn_req_query_param(req, "a", q, sizeof q);
    const char *v = pn_req_header(req, "x-test");
    char out[512];
    int n = snprintf(out, sizeof out, "%s %s q=%s a=%s v=%s b=%.*s", req->method, req->path,
                     req->query, q, v ? v : "", (int)(req->body_len > 128 ? 128 : req->body_len),
                     (const char *)req->body);
    static const struct pn_http_header h[] = {{"Content-Type", "text/plain"}};
    size_t len = n < 0 ? 0 : (size_t)n < sizeof out ? (size_t)n : sizeof out - 1;
    pn_req_respond(req, 200, h, 1, out, len);
}

static void req_closed(struct pn_req *req, void *arg)
{
    (void)arg;
    unhold_req(req);
}

static void req_writable(struct pn_req *req, void *arg)
{
    (void)arg;
    (void)pn_req_stream_pending(req);
}

static enum fz_mode mixed_mode(const struct pn_req *req)
{
    const char *p = req->path;
    unsigned c = p[0] && p[1] ? (unsigned char)p[1] : 0;
    return (enum fz_mode)(c % FZ_MIXED);
}

/* The head check the app installs (srv->on_head): PasarGuard requests are
 * refused at their headers when the key is wrong; the others go on. */
static void on_head(struct pn_req *req, void *arg)
{
    enum fz_mode mode = (enum fz_mode)(uintptr_t)arg;
    if (mode == FZ_MIXED)
        mode = mixed_mode(req);
    if (mode == FZ_PG)
        pn_pasarguard_rest_head(req, fz_world()->pg);
}

static void on_request(struct pn_req *req, void *arg)
{
    enum fz_mode mode = (enum fz_mode)(uintptr_t)arg;
    if (mode == FZ_MIXED)
        mode = mixed_mode(req);
    if (mode != FZ_ECHO && mode != FZ_PG && nheld_reqs == FZ_MAX_HELD)
        mode = FZ_ECHO;
    switch (mode) {
    case FZ_ECHO:
        echo(req);
        break;
    case FZ_PG:
        pn_pasarguard_rest(req, fz_world()->pg);
        break;
    case FZ_STREAM: {
        static const struct pn_http_header h[] = {{"Content-Type", "text/event-stream"}};
        pn_req_set_callbacks(req, req_closed, req_writable, NULL);
        if (pn_req_stream_start(req, 200, h, 1) != PN_OK)
            return;
        pn_req_stream_write(req, req->path, strlen(req->path));
        held_reqs[nheld_reqs++] = (struct held_req){req, mode};
        kick_later();
        break;
    }
    case FZ_LATER:
        kick_later();
        /* fall through */
    case FZ_HOLD:
        pn_req_set_callbacks(req, req_closed, NULL, NULL);
        held_reqs[nheld_reqs++] = (struct held_req){req, mode};
        break;
    case FZ_MIXED:
    case FZ_NMODES:
        abort();
    }
}

static void custom_error(struct pn_req *req, int status, const char *text)
{
    char body[128];
    snprintf(body, sizeof body, "custom %d %s %s", status, req->method, text);
    pn_req_respond_text(req, status, body);
}

/* ---- gRPC echo service ------------------------------------------------------ */

enum call_plan { PLAN_NOW, PLAN_LATER, PLAN_ERROR, PLAN_NEVER };

struct held_call {
    struct pn_grpc_call *call;
    int kind; /* 0 unary answered later, 1 server stream, 2 never */
};
static struct held_call held_calls[FZ_MAX_HELD];
static size_t nheld_calls;

static void unhold_call(const struct pn_grpc_call *call)
{
    for (size_t i = 0; i < nheld_calls; i++) {
        if (held_calls[i].call == call) {
            held_calls[i] = held_calls[--nheld_calls];
            return;
        }
    }
}

static bool hold_call(struct pn_grpc_call *call, int kind)
{
    if (nheld_calls == FZ_MAX_HELD)
        return false;
    held_calls[nheld_calls++] = (struct held_call){call, kind};
    if (kind != 2)
        kick_later();
    return true;
}

static void g_cancel(struct pn_grpc_call *call)
{
    unhold_call(call);
}

static void g_writable(struct pn_grpc_call *call)
{
    (void)pn_grpc_call_pending(call);
}

static void g_unary(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    enum call_plan plan = len ? (enum call_plan)(msg[0] % 4) : PLAN_NOW;
    switch (plan) {
    case PLAN_NOW:
        pn_grpc_call_send(call, msg, len);
        pn_grpc_call_finish(call, PN_GRPC_OK, NULL);
        break;
    case PLAN_LATER:
    case PLAN_NEVER:
        if (hold_call(call, plan == PLAN_LATER ? 0 : 2))
            break;
        pn_grpc_call_finish(call, PN_GRPC_RESOURCE_EXHAUSTED, "too many held calls");
        break;
    case PLAN_ERROR: {
        /* the message text comes from the peer: it must be percent-encoded */
        char text[256];
        size_t n = len - 1 < sizeof text - 1 ? len - 1 : sizeof text - 1;
        memcpy(text, msg + 1, n);
        text[n] = '\0';
        enum pn_grpc_code code = (enum pn_grpc_code)(len > 1 ? msg[1] % 17 : 2);
        pn_grpc_call_finish(call, code, text);
        break;
    }
    }
}

static void g_server(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    pn_grpc_call_set_on_writable(call, g_writable);
    pn_grpc_call_send(call, msg, len);
    pn_grpc_call_send(call, msg, len);
    if (!hold_call(call, 1))
        pn_grpc_call_finish(call, PN_GRPC_OK, NULL);
}

static void g_client_msg(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    uintptr_t count = (uintptr_t)pn_grpc_call_data(call) + 1;
    pn_grpc_call_set_data(call, (void *)count);
    if (len && msg[0] == 0xff) /* finished while the client still sends */
        pn_grpc_call_finish(call, PN_GRPC_INVALID_ARGUMENT, "refused");
}

static void g_client_end(struct pn_grpc_call *call)
{
    uint8_t out[8];
    uintptr_t count = (uintptr_t)pn_grpc_call_data(call);
    for (int i = 0; i < 8; i++)
        out[i] = (uint8_t)(count >> (8 * i));
    pn_grpc_call_send(call, out, sizeof out);
    pn_grpc_call_finish(call, PN_GRPC_OK, NULL);
}

static bool g_intercept(struct pn_grpc_call *call, const struct pn_grpc_method *m)
{
    (void)m;
    (void)pn_grpc_call_path(call);
    (void)pn_grpc_call_peer(call);
    if (pn_grpc_call_metadata(call, "x-deny")) {
        pn_grpc_call_finish(call, PN_GRPC_PERMISSION_DENIED, "denied");
        return false;
    }
    return true;
}

static const struct pn_grpc_method echo_methods[] = {
    {"/fuzz.Echo/Unary", PN_GRPC_UNARY, g_unary, NULL, g_cancel},
    {"/fuzz.Echo/Server", PN_GRPC_SERVER_STREAM, g_server, NULL, g_cancel},
    {"/fuzz.Echo/Client", PN_GRPC_CLIENT_STREAM, g_client_msg, g_client_end, g_cancel},
};

/* 64 KiB like the body limit, so the size check is reachable. */
static const struct pn_grpc_service echo_service = {
    .methods = echo_methods,
    .nmethods = sizeof echo_methods / sizeof echo_methods[0],
    .intercept = g_intercept,
    .max_message = 64 * 1024,
};

/* ---- later ------------------------------------------------------------------ */

/* Answers what was held for "later". Answering may dispatch the next
 * pipelined request, which may be held again: work on a snapshot and skip
 * entries that left the lists meanwhile. */
static void later_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    struct held_req reqs[FZ_MAX_HELD];
    size_t nr = nheld_reqs;
    memcpy(reqs, held_reqs, nr * sizeof *reqs);
    for (size_t i = 0; i < nr; i++) {
        if (!is_held_req(reqs[i].req))
            continue;
        struct pn_req *req = reqs[i].req;
        if (reqs[i].mode == FZ_LATER) {
            unhold_req(req);
            echo(req);
        } else if (reqs[i].mode == FZ_STREAM) {
            unhold_req(req);
            pn_req_stream_write(req, "two", 3);
            pn_req_stream_write(req, "", 0);
            pn_req_stream_end(req);
        }
    }
    struct held_call calls[FZ_MAX_HELD];
    size_t nc = nheld_calls;
    memcpy(calls, held_calls, nc * sizeof *calls);
    for (size_t i = 0; i < nc; i++) {
        bool still = false;
        for (size_t j = 0; j < nheld_calls; j++)
            still |= held_calls[j].call == calls[i].call;
        if (!still || calls[i].kind == 2)
            continue;
        unhold_call(calls[i].call);
        if (calls[i].kind == 1)
            pn_grpc_call_send(calls[i].call, (const uint8_t *)"end", 3);
        pn_grpc_call_finish(calls[i].call, PN_GRPC_OK, NULL);
    }
}

/* ---- servers ---------------------------------------------------------------- */

void fz_server_init(struct pn_http_server *srv, enum fz_mode mode, bool echo_grpc,
                    bool custom_errors)
{
    struct fz_world *w = fz_world();
    memset(srv, 0, sizeof *srv);
    srv->base = w->base;
    srv->on_request = on_request;
    srv->on_head = on_head;
    srv->arg = (void *)(uintptr_t)mode;
    srv->grpc = echo_grpc ? &echo_service : pn_pasarguard_grpc(w->pg);
    srv->allow_h2 = true;
    srv->max_body = 64 * 1024;
    srv->max_header = 8 * 1024;
    srv->idle_timeout_ms = 60000;
    srv->header_timeout_ms = 10000;
    srv->respond_error = custom_errors ? custom_error : NULL;
}

void fz_feed(struct event_base *base, struct bufferevent *cli, struct fz_in *in, size_t piece,
             const bool *stop)
{
    for (int rounds = 0; in->n && !(stop && *stop); rounds++) {
        size_t n = rounds < 512 && piece < in->n ? piece : in->n;
        bufferevent_write(cli, in->p, n);
        in->p += n;
        in->n -= n;
        fz_spin_until(base, stop);
    }
}

void fz_end(struct event_base *base, struct pn_conn_set *set, struct bufferevent **cli,
            unsigned how)
{
    switch (how & 3) {
    case 0:
        break;
    case 1:
        bufferevent_free(*cli);
        *cli = NULL;
        fz_spin(base);
        break;
    case 2:
        if (set->head)
            set->head->ops->shutdown(set->head);
        fz_spin(base);
        break;
    case 3:
        fz_wait_2ms(base);
        fz_spin(base);
        break;
    }
    fz_teardown(set);
}

void fz_teardown(struct pn_conn_set *set)
{
    struct fz_world *w = fz_world();
    while (set->head)
        set->head->ops->destroy(set->head);
    fz_spin(w->base);
    if (nheld_reqs || nheld_calls) {
        fprintf(stderr, "fuzz: %zu requests and %zu calls outlived their connection\n", nheld_reqs,
                nheld_calls);
        abort();
    }
    event_del(later_ev);
}
