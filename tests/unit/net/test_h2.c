/* A real pn_h2_conn driven over a libevent bufferevent pair by a client
 * nghttp2 session inside the test: REST requests and answers (whole,
 * streamed, 413, 431, client reset), gRPC unary / server-streaming /
 * client-streaming calls, unknown methods, intercept order, the message size
 * limit, deadlines, cancellation, many concurrent streams, large messages,
 * idle and header timeouts, graceful shutdown, and garbage input. Every wait
 * runs the event loop until a condition holds, with a time limit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/err.h"
#include "net/grpc.h"
#include "net/h2.h"
#include "net/http.h"

#define MAX_CS 256

/* ---- the client side ----------------------------------------------------- */

struct cstream {
    int32_t id;
    int hframes; /* HEADERS frames received */
    char hdr[16][2][256];
    int nhdr;
    char trl[8][2][256];
    int ntrl;
    bool trailers_only;
    struct pn_buf body;
    bool closed;
    uint32_t close_code;
    /* request body source */
    struct evbuffer *src;
    bool src_eof, src_deferred;
};

struct t {
    struct event_base *base;
    struct bufferevent *pair[2];
    nghttp2_session *ng;
    struct pn_conn *conn;
    struct pn_conn_set set;
    struct pn_http_server srv;
    struct pn_peer peer;
    struct cstream cs[MAX_CS];
    int ncs;
    bool eof;
    int goaways;
    uint32_t last_goaway_code;
    int32_t last_goaway_id;
};

static struct t *T;

static struct cstream *cs_find(int32_t id)
{
    for (int i = 0; i < T->ncs; i++)
        if (T->cs[i].id == id)
            return &T->cs[i];
    return NULL;
}

static ssize_t c_send(nghttp2_session *ng, const uint8_t *data, size_t len, int flags, void *u)
{
    (void)ng;
    (void)flags;
    (void)u;
    bufferevent_write(T->pair[1], data, len);
    return (ssize_t)len;
}

static int c_begin_headers(nghttp2_session *ng, const nghttp2_frame *f, void *u)
{
    (void)ng;
    (void)u;
    struct cstream *cs = cs_find(f->hd.stream_id);
    if (cs)
        cs->hframes++;
    return 0;
}

static int c_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name, size_t nl,
                    const uint8_t *value, size_t vl, uint8_t flags, void *u)
{
    (void)ng;
    (void)flags;
    (void)u;
    struct cstream *cs = cs_find(f->hd.stream_id);
    if (!cs)
        return 0;
    char(*slot)[2][256];
    if (cs->hframes <= 1) {
        assert_true(cs->nhdr < 16);
        slot = &cs->hdr[cs->nhdr++];
    } else {
        assert_true(cs->ntrl < 8);
        slot = &cs->trl[cs->ntrl++];
    }
    snprintf((*slot)[0], 256, "%.*s", (int)nl, name);
    snprintf((*slot)[1], 256, "%.*s", (int)vl, value);
    return 0;
}

static int c_frame_recv(nghttp2_session *ng, const nghttp2_frame *f, void *u)
{
    (void)ng;
    (void)u;
    if (f->hd.type == NGHTTP2_GOAWAY) {
        T->goaways++;
        T->last_goaway_code = f->goaway.error_code;
        T->last_goaway_id = f->goaway.last_stream_id;
    }
    if (f->hd.type == NGHTTP2_HEADERS && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        struct cstream *cs = cs_find(f->hd.stream_id);
        if (cs && cs->hframes == 1)
            cs->trailers_only = true;
    }
    return 0;
}

static int c_data(nghttp2_session *ng, uint8_t flags, int32_t id, const uint8_t *data, size_t len,
                  void *u)
{
    (void)ng;
    (void)flags;
    (void)u;
    struct cstream *cs = cs_find(id);
    if (cs)
        assert_int_equal(pn_buf_append(&cs->body, data, len), PN_OK);
    return 0;
}

static int c_close(nghttp2_session *ng, int32_t id, uint32_t code, void *u)
{
    (void)ng;
    (void)u;
    struct cstream *cs = cs_find(id);
    if (cs) {
        cs->closed = true;
        cs->close_code = code;
    }
    return 0;
}

static void c_flush(void)
{
    assert_int_equal(nghttp2_session_send(T->ng), 0);
}

static void c_read(struct bufferevent *bev, void *arg)
{
    (void)arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t n = evbuffer_get_length(in);
    if (n) {
        uint8_t *p = evbuffer_pullup(in, -1);
        ssize_t rv = nghttp2_session_mem_recv(T->ng, p, n);
        if (rv < 0)
            fail_msg("client mem_recv: %s", nghttp2_strerror((int)rv));
        evbuffer_drain(in, n);
    }
    c_flush();
}

static void c_event(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    (void)arg;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
        T->eof = true;
}

static ssize_t c_src_read(nghttp2_session *ng, int32_t id, uint8_t *buf, size_t len,
                          uint32_t *flags, nghttp2_data_source *src, void *u)
{
    (void)ng;
    (void)id;
    (void)u;
    struct cstream *cs = src->ptr;
    size_t have = evbuffer_get_length(cs->src);
    size_t n = have < len ? have : len;
    evbuffer_remove(cs->src, buf, n);
    if (n == have) {
        if (cs->src_eof)
            *flags |= NGHTTP2_DATA_FLAG_EOF;
        else if (n == 0) {
            cs->src_deferred = true;
            return NGHTTP2_ERR_DEFERRED;
        }
    }
    return (ssize_t)n;
}

/* ---- the event loop ------------------------------------------------------ */

static void tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

static bool run_until(bool (*cond)(void *), void *arg, int timeout_ms)
{
    struct event *ev = event_new(T->base, -1, EV_PERSIST, tick, NULL);
    struct timeval tv = {0, 5000};
    event_add(ev, &tv);
    struct timeval start, now;
    event_base_gettimeofday_cached(T->base, &start);
    gettimeofday(&start, NULL);
    bool ok;
    for (;;) {
        ok = cond(arg);
        if (ok)
            break;
        gettimeofday(&now, NULL);
        long el = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_usec - start.tv_usec) / 1000;
        if (el > timeout_ms)
            break;
        event_base_loop(T->base, EVLOOP_ONCE);
    }
    event_free(ev);
    return ok;
}

static bool cond_closed(void *arg)
{
    return ((struct cstream *)arg)->closed;
}

static bool cond_has_status(void *arg)
{
    struct cstream *cs = arg;
    return cs->nhdr > 0;
}

/* The server closed: a pair's end learns it from its partner vanishing. */
static bool cond_eof(void *arg)
{
    (void)arg;
    return T->eof || bufferevent_pair_get_partner(T->pair[1]) == NULL;
}

static bool cond_false(void *arg)
{
    (void)arg;
    return false;
}

static void spin(int ms)
{
    run_until(cond_false, NULL, ms);
}

/* ---- requests ------------------------------------------------------------ */

static struct cstream *cs_new(void)
{
    assert_true(T->ncs < MAX_CS);
    struct cstream *cs = &T->cs[T->ncs++];
    memset(cs, 0, sizeof *cs);
    pn_buf_init(&cs->body, 0);
    cs->src = evbuffer_new();
    return cs;
}

#define NV(n, v)                                                                                   \
    {                                                                                              \
        (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE             \
    }

/* Opens a stream; body bytes (may be NULL) are queued, end says whether the
 * request half-closes after them. extra: name/value pairs, NULL-ended. */
static struct cstream *c_request(const char *method, const char *path, const char *ctype,
                                 const void *body, size_t len, bool end, const char *const *extra)
{
    struct cstream *cs = cs_new();
    nghttp2_nv nv[16] = {
        NV(":method", method),
        NV(":path", path),
        NV(":scheme", "https"),
        NV(":authority", "localhost"),
    };
    size_t n = 4;
    if (ctype)
        nv[n++] = (nghttp2_nv)NV("content-type", ctype);
    if (ctype && strncmp(ctype, "application/grpc", 16) == 0)
        nv[n++] = (nghttp2_nv)NV("te", "trailers");
    for (size_t i = 0; extra && extra[i]; i += 2)
        nv[n++] = (nghttp2_nv){(uint8_t *)extra[i], (uint8_t *)extra[i + 1], strlen(extra[i]),
                               strlen(extra[i + 1]), NGHTTP2_NV_FLAG_NONE};
    if (len)
        evbuffer_add(cs->src, body, len);
    cs->src_eof = end;
    nghttp2_data_provider prd = {.source.ptr = cs, .read_callback = c_src_read};
    bool need_prd = len > 0 || !end;
    cs->id = nghttp2_submit_request(T->ng, NULL, nv, n, need_prd ? &prd : NULL, cs);
    assert_true(cs->id > 0);
    c_flush();
    return cs;
}

static void c_write(struct cstream *cs, const void *data, size_t len, bool end)
{
    if (len)
        evbuffer_add(cs->src, data, len);
    if (end)
        cs->src_eof = true;
    if (cs->src_deferred) {
        cs->src_deferred = false;
        assert_int_equal(nghttp2_session_resume_data(T->ng, cs->id), 0);
    }
    c_flush();
}

static struct cstream *c_grpc(const char *path, const char *const *msgs, size_t nmsgs, bool end,
                              const char *const *extra)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    for (size_t i = 0; i < nmsgs; i++) {
        uint8_t h[5];
        pn_grpc_frame_header(h, strlen(msgs[i]));
        pn_buf_append(&b, h, 5);
        pn_buf_append(&b, msgs[i], strlen(msgs[i]));
    }
    struct cstream *cs = c_request("POST", path, "application/grpc", b.data, b.len, end, extra);
    pn_buf_free(&b);
    return cs;
}

static const char *hget(char (*h)[2][256], int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(h[i][0], name) == 0)
            return h[i][1];
    return NULL;
}

static const char *rhdr(struct cstream *cs, const char *name)
{
    return hget(cs->hdr, cs->nhdr, name);
}

/* grpc-status / grpc-message, from the trailers or a trailers-only answer. */
static const char *gstat(struct cstream *cs, const char *name)
{
    return cs->trailers_only ? rhdr(cs, name) : hget(cs->trl, cs->ntrl, name);
}

/* Splits a gRPC response body into messages; returns the count. */
static size_t gmsgs(struct cstream *cs, char out[][64], size_t max)
{
    size_t off = 0, n = 0;
    while (off + 5 <= cs->body.len) {
        const uint8_t *p = cs->body.data + off;
        assert_int_equal(p[0], 0);
        size_t len = (size_t)p[1] << 24 | (size_t)p[2] << 16 | (size_t)p[3] << 8 | p[4];
        assert_true(off + 5 + len <= cs->body.len);
        if (n < max) {
            snprintf(out[n], 64, "%.*s", (int)(len < 63 ? len : 63), (const char *)p + 5);
        }
        n++;
        off += 5 + len;
    }
    assert_int_equal(off, cs->body.len);
    return n;
}

/* ---- server-side handlers ------------------------------------------------ */

static struct {
    int requests;
    char method[16], path[64], query[64], body[256], ctype[64], host[64];
    int version;
    bool peer_ok;
    int rest_mode; /* 0 answer at once, 1 hold, 2 stream */
    struct pn_req *held;
    int rest_closed;
    int rest_writable;
    int cancels;
    int messages, ends;
    struct pn_grpc_call *hung;
    struct pn_grpc_call *hung_list[128];
    int nhung;
    char seen_md[64];
    struct pn_buf collect;
    struct event *later;
    struct pn_grpc_call *later_call;
    int intercepts;
    int grpc_writable;
} g;

static void rest_on_close(struct pn_req *req, void *arg)
{
    (void)req;
    (void)arg;
    g.rest_closed++;
    g.held = NULL;
}

static void rest_on_writable(struct pn_req *req, void *arg)
{
    (void)arg;
    g.rest_writable++;
    assert_true(pn_req_stream_pending(req) < 64 * 1024);
    assert_int_equal(pn_req_stream_write(req, "tail\n", 5), PN_OK);
    assert_int_equal(pn_req_stream_end(req), PN_OK);
    g.held = NULL;
}

static void on_request(struct pn_req *req, void *arg)
{
    assert_ptr_equal(arg, &g);
    g.requests++;
    snprintf(g.method, sizeof g.method, "%s", req->method);
    snprintf(g.path, sizeof g.path, "%s", req->path);
    snprintf(g.query, sizeof g.query, "%s", req->query);
    snprintf(g.body, sizeof g.body, "%.*s", (int)req->body_len, (const char *)req->body);
    const char *ct = pn_req_header(req, "Content-Type");
    snprintf(g.ctype, sizeof g.ctype, "%s", ct ? ct : "");
    const char *host = pn_req_header(req, "host");
    snprintf(g.host, sizeof g.host, "%s", host ? host : "");
    g.version = req->http_version;
    g.peer_ok = req->peer && strcmp(req->peer->ip, "127.0.0.1") == 0 && req->peer->port == 4242;
    if (g.rest_mode == 1) {
        g.held = req;
        pn_req_set_callbacks(req, rest_on_close, NULL, NULL);
        return;
    }
    if (g.rest_mode == 2) {
        static const struct pn_http_header h[] = {{"Content-Type", "text/event-stream"},
                                                  {"Connection", "keep-alive"}};
        assert_int_equal(pn_req_stream_start(req, 200, h, 2), PN_OK);
        assert_int_equal(pn_req_stream_write(req, "line1\n", 6), PN_OK);
        char *big = malloc(200 * 1024);
        memset(big, 'b', 200 * 1024);
        assert_int_equal(pn_req_stream_write(req, big, 200 * 1024), PN_OK);
        free(big);
        assert_true(pn_req_stream_pending(req) >= 64 * 1024);
        g.held = req;
        pn_req_set_callbacks(req, rest_on_close, rest_on_writable, NULL);
        return;
    }
    static const struct pn_http_header h[] = {{"Content-Type", "text/plain"}, {"X-Custom", "Yes"}};
    char out[300];
    int n = snprintf(out, sizeof out, "hello %s", g.body);
    assert_int_equal(pn_req_respond(req, 200, h, 2, out, (size_t)n), PN_OK);
}

static void echo_msg(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    g.messages++;
    const char *md = pn_grpc_call_metadata(call, "x-api-key");
    snprintf(g.seen_md, sizeof g.seen_md, "%s", md ? md : "");
    assert_ptr_equal(pn_grpc_call_service_arg(call), &g);
    assert_string_equal(pn_grpc_call_peer(call)->ip, "127.0.0.1");
    assert_int_equal(pn_grpc_call_send(call, msg, len), PN_OK);
    pn_grpc_call_finish(call, PN_GRPC_OK, NULL);
}

static void three_msg(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    (void)msg;
    (void)len;
    g.messages++;
    assert_int_equal(pn_grpc_call_send(call, (const uint8_t *)"one", 3), PN_OK);
    assert_int_equal(pn_grpc_call_send(call, (const uint8_t *)"two", 3), PN_OK);
    assert_int_equal(pn_grpc_call_send(call, (const uint8_t *)"three", 5), PN_OK);
    pn_grpc_call_finish(call, PN_GRPC_OK, NULL);
}

static void collect_msg(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    (void)call;
    g.messages++;
    pn_buf_append(&g.collect, msg, len);
    pn_buf_append(&g.collect, "|", 1);
}

static void collect_end(struct pn_grpc_call *call)
{
    g.ends++;
    assert_int_equal(pn_grpc_call_send(call, g.collect.data, g.collect.len), PN_OK);
    pn_grpc_call_finish(call, PN_GRPC_OK, "done");
}

static void hang_msg(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    (void)msg;
    (void)len;
    g.messages++;
    g.hung = call;
    assert_true(g.nhung < 128);
    g.hung_list[g.nhung++] = call;
    pn_grpc_call_set_data(call, &g);
}

static void on_cancel(struct pn_grpc_call *call)
{
    g.cancels++;
    if (call == g.hung)
        g.hung = NULL;
    for (int i = 0; i < g.nhung; i++)
        if (g.hung_list[i] == call)
            g.hung_list[i] = NULL;
    /* a finish from inside on_cancel is ignored, not a double answer */
    pn_grpc_call_finish(call, PN_GRPC_INTERNAL, "ignored");
}

static void later_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    struct pn_grpc_call *call = g.later_call;
    g.later_call = NULL;
    assert_ptr_equal(pn_grpc_call_data(call), &g);
    assert_int_equal(pn_grpc_call_send(call, (const uint8_t *)"late", 4), PN_OK);
    pn_grpc_call_finish(call, PN_GRPC_NOT_FOUND, "user>>>1>>>online not found.\n100%");
}

static void later_msg(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    (void)msg;
    (void)len;
    g.messages++;
    pn_grpc_call_set_data(call, &g);
    g.later_call = call;
    struct timeval tv = {0, 20000};
    evtimer_add(g.later, &tv);
}

static void finish_empty(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    (void)msg;
    g.messages++;
    /* an empty request arrives as an empty message */
    assert_int_equal(len, 0);
    pn_grpc_call_finish(call, PN_GRPC_UNAVAILABLE, "core is not started yet");
}

static void flood_writable(struct pn_grpc_call *call)
{
    g.grpc_writable++;
    assert_true(pn_grpc_call_pending(call) < 64 * 1024);
    pn_grpc_call_set_on_writable(call, NULL);
    assert_int_equal(pn_grpc_call_send(call, (const uint8_t *)"end", 3), PN_OK);
    pn_grpc_call_finish(call, PN_GRPC_OK, NULL);
}

static void flood_msg(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    (void)msg;
    (void)len;
    g.messages++;
    uint8_t *big = malloc(100 * 1024);
    memset(big, 'f', 100 * 1024);
    for (int i = 0; i < 3; i++)
        assert_int_equal(pn_grpc_call_send(call, big, 100 * 1024), PN_OK);
    free(big);
    assert_true(pn_grpc_call_pending(call) >= 64 * 1024);
    pn_grpc_call_set_on_writable(call, flood_writable);
}

static const struct pn_grpc_method methods[] = {
    {"/test.Svc/Flood", PN_GRPC_SERVER_STREAM, flood_msg, NULL, on_cancel},
    {"/test.Svc/Echo", PN_GRPC_UNARY, echo_msg, NULL, on_cancel},
    {"/test.Svc/Three", PN_GRPC_SERVER_STREAM, three_msg, NULL, on_cancel},
    {"/test.Svc/Collect", PN_GRPC_CLIENT_STREAM, collect_msg, collect_end, on_cancel},
    {"/test.Svc/Hang", PN_GRPC_UNARY, hang_msg, NULL, on_cancel},
    {"/test.Svc/Later", PN_GRPC_UNARY, later_msg, NULL, on_cancel},
    {"/test.Svc/Empty", PN_GRPC_UNARY, finish_empty, NULL, NULL},
};

static bool intercept(struct pn_grpc_call *call, const struct pn_grpc_method *m)
{
    (void)m;
    g.intercepts++;
    if (pn_grpc_call_metadata(call, "x-deny")) {
        pn_grpc_call_finish(call, PN_GRPC_UNAUTHENTICATED, "missing x-api-key header");
        return false;
    }
    return true;
}

static struct pn_grpc_service svc = {
    .methods = methods,
    .nmethods = sizeof methods / sizeof methods[0],
    .intercept = intercept,
    .arg = &g,
    .max_message = 67108864,
};

/* ---- fixture -------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    T = calloc(1, sizeof *T);
    memset(&g, 0, sizeof g);
    pn_buf_init(&g.collect, 0);
    T->base = event_base_new();
    g.later = evtimer_new(T->base, later_cb, NULL);
    T->srv = (struct pn_http_server){
        .base = T->base,
        .on_request = on_request,
        .arg = &g,
        .grpc = &svc,
        .allow_h2 = true,
        .max_body = 1 << 20,
        .max_header = 8192,
        .idle_timeout_ms = 0,
        .header_timeout_ms = 10000,
    };
    snprintf(T->peer.ip, sizeof T->peer.ip, "127.0.0.1");
    T->peer.port = 4242;
    T->peer.alpn = "h2";
    assert_int_equal(
        bufferevent_pair_new(T->base, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS, T->pair), 0);
    bufferevent_setcb(T->pair[1], c_read, NULL, c_event, NULL);
    bufferevent_enable(T->pair[1], EV_READ | EV_WRITE);
    bufferevent_enable(T->pair[0], EV_READ);
    return 0;
}

/* Starts the client session: preface + SETTINGS, then the server takes the
 * pair's end with the preface already in its input, as the listener does. */
static void start(void)
{
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_send_callback(cb, c_send);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, c_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, c_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, c_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, c_data);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, c_close);
    assert_int_equal(nghttp2_session_client_new(&T->ng, cb, NULL), 0);
    nghttp2_session_callbacks_del(cb);
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
    nghttp2_submit_settings(T->ng, NGHTTP2_FLAG_NONE, iv, 1);
    nghttp2_session_set_local_window_size(T->ng, NGHTTP2_FLAG_NONE, 0, 16 << 20);
    c_flush();
    assert_true(evbuffer_get_length(bufferevent_get_input(T->pair[0])) >= 24);
    T->conn = pn_h2_conn_new(T->pair[0], &T->srv, &T->peer, &T->set);
    assert_non_null(T->conn);
    assert_int_equal(T->set.count, 1);
}

static int teardown(void **state)
{
    (void)state;
    spin(1);
    if (T->set.count > 0)
        T->set.head->ops->destroy(T->set.head);
    assert_int_equal(T->set.count, 0);
    spin(1);
    if (T->ng)
        nghttp2_session_del(T->ng);
    for (int i = 0; i < T->ncs; i++) {
        pn_buf_free(&T->cs[i].body);
        evbuffer_free(T->cs[i].src);
    }
    if (T->pair[1])
        bufferevent_free(T->pair[1]);
    event_free(g.later);
    pn_buf_free(&g.collect);
    event_base_free(T->base);
    free(T);
    return 0;
}

/* ---- REST ------------------------------------------------------------------ */

static void test_rest_get_with_body(void **state)
{
    (void)state;
    start();
    struct cstream *cs =
        c_request("GET", "/stats?reset=true&x=1", "application/x-protobuf", "abc", 3, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(g.requests, 1);
    assert_string_equal(g.method, "GET");
    assert_string_equal(g.path, "/stats");
    assert_string_equal(g.query, "reset=true&x=1");
    assert_string_equal(g.body, "abc");
    assert_string_equal(g.ctype, "application/x-protobuf");
    assert_string_equal(g.host, "localhost");
    assert_int_equal(g.version, 20);
    assert_true(g.peer_ok);
    assert_int_equal(cs->close_code, 0);
    assert_string_equal(rhdr(cs, ":status"), "200");
    assert_string_equal(rhdr(cs, "content-type"), "text/plain");
    assert_string_equal(rhdr(cs, "x-custom"), "Yes");
    assert_string_equal(rhdr(cs, "content-length"), "9");
    assert_int_equal(cs->body.len, 9);
    assert_memory_equal(cs->body.data, "hello abc", 9);

    /* the connection carries further requests */
    struct cstream *cs2 = c_request("POST", "/x", NULL, NULL, 0, true, NULL);
    assert_true(run_until(cond_closed, cs2, 2000));
    assert_int_equal(g.requests, 2);
    assert_string_equal(g.query, "");
    assert_memory_equal(cs2->body.data, "hello ", 6);
}

static void test_rest_413(void **state)
{
    (void)state;
    T->srv.max_body = 10;
    start();
    char body[100];
    memset(body, 'x', sizeof body);
    struct cstream *cs =
        c_request("POST", "/user/sync", "application/x-protobuf", body, sizeof body, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(g.requests, 0);
    assert_string_equal(rhdr(cs, ":status"), "413");
    assert_string_equal(rhdr(cs, "content-type"), "text/plain; charset=utf-8");
    assert_string_equal(rhdr(cs, "x-content-type-options"), "nosniff");
    assert_int_equal(cs->body.len, strlen("request body too large\n"));
    assert_memory_equal(cs->body.data, "request body too large\n", cs->body.len);

    /* a declared content-length over the limit is refused before the body */
    static const char *const cl[] = {"content-length", "50", NULL};
    struct cstream *cs2 = c_request("POST", "/y", NULL, NULL, 0, false, cl);
    assert_true(run_until(cond_has_status, cs2, 2000));
    assert_string_equal(rhdr(cs2, ":status"), "413");
    /* the client may finish its upload and still gets the answer (curl) */
    spin(20);
    assert_false(cs2->closed);
    c_write(cs2, body, 50, true);
    assert_true(run_until(cond_closed, cs2, 2000));
    assert_int_equal(cs2->close_code, 0);
    assert_memory_equal(cs2->body.data, "request body too large\n", cs2->body.len);

    /* an upload that goes on well past the limit is reset */
    size_t big = 3u << 20;
    char *huge = calloc(1, big);
    struct cstream *cs3 = c_request("POST", "/z", NULL, huge, 1u << 20, false, NULL);
    assert_true(run_until(cond_has_status, cs3, 2000));
    spin(20);
    assert_false(cs3->closed); /* 1 MiB over: still read and dropped */
    c_write(cs3, huge, big, false);
    free(huge);
    /* the client never half-closes; the server resets the stream */
    assert_true(run_until(cond_closed, cs3, 3000));
    assert_string_equal(rhdr(cs3, ":status"), "413");
    assert_int_equal(cs3->close_code, NGHTTP2_NO_ERROR);
    assert_int_equal(g.requests, 0);
}

static int h2_nhead;
static void h2_head_check(struct pn_req *req, void *arg)
{
    (void)arg;
    h2_nhead++;
    assert_int_equal(req->body_len, 0);
    if (strcmp(req->path, "/deny") == 0)
        pn_req_respond_text(req, 401, "missing x-api-key");
}

/* on_head refuses before the body (the client may go on uploading and still
 * reads the answer); an admitted head gets its body to on_request; a
 * request without a body is not shown to on_head. */
static void test_rest_head_check(void **state)
{
    (void)state;
    T->srv.on_head = h2_head_check;
    h2_nhead = 0;
    start();
    struct cstream *cs = c_request("PUT", "/deny", NULL, NULL, 0, false, NULL);
    assert_true(run_until(cond_has_status, cs, 2000));
    assert_string_equal(rhdr(cs, ":status"), "401");
    assert_int_equal(g.requests, 0);
    c_write(cs, "abc", 3, true);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(cs->close_code, 0);
    assert_memory_equal(cs->body.data, "missing x-api-key\n", cs->body.len);

    struct cstream *cs2 = c_request("PUT", "/ok", NULL, "abc", 3, true, NULL);
    assert_true(run_until(cond_closed, cs2, 2000));
    assert_string_equal(g.body, "abc");
    struct cstream *cs3 = c_request("GET", "/deny", NULL, NULL, 0, true, NULL);
    assert_true(run_until(cond_closed, cs3, 2000));
    assert_string_equal(rhdr(cs3, ":status"), "200");
    assert_int_equal(g.requests, 2);
    assert_int_equal(h2_nhead, 2);
}

/* A REST body that stops arriving is reset (CANCEL) after the idle
 * timeout; one that keeps arriving is not; after an early answer, dropped
 * bytes do not keep the stream open. The connection carries on. */
static void test_rest_body_stall_resets_stream(void **state)
{
    (void)state;
    T->srv.idle_timeout_ms = 100;
    T->srv.on_head = h2_head_check;
    start();
    struct cstream *stalled = c_request("PUT", "/ok", NULL, "a", 1, false, NULL);
    struct cstream *refused = c_request("PUT", "/deny", NULL, "a", 1, false, NULL);
    struct cstream *moving = c_request("PUT", "/ok", NULL, "a", 1, false, NULL);
    for (int i = 0; i < 6; i++) {
        spin(40);
        c_write(moving, "b", 1, false);
        if (!refused->closed)
            c_write(refused, "b", 1, false);
    }
    assert_true(stalled->closed);
    assert_int_equal(stalled->close_code, NGHTTP2_CANCEL);
    assert_true(refused->closed);
    assert_string_equal(rhdr(refused, ":status"), "401");
    assert_int_equal(refused->close_code, NGHTTP2_NO_ERROR);
    assert_false(moving->closed);
    c_write(moving, "c", 1, true);
    assert_true(run_until(cond_closed, moving, 2000));
    assert_string_equal(g.body, "abbbbbbc");
    assert_int_equal(g.requests, 1);
    assert_int_equal(g.cancels, 0);
}

static void respond_error_hook(struct pn_req *req, int status, const char *text)
{
    static const struct pn_http_header h[] = {{"X-Error-Hook", "1"}};
    pn_req_respond(req, status, h, 1, text, strlen(text));
}

static void test_rest_431_and_error_hook(void **state)
{
    (void)state;
    T->srv.max_header = 300;
    T->srv.respond_error = respond_error_hook;
    start();
    char big[400];
    memset(big, 'v', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    const char *const extra[] = {"x-big", big, NULL};
    struct cstream *cs = c_request("GET", "/", NULL, NULL, 0, true, extra);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(g.requests, 0);
    assert_string_equal(rhdr(cs, ":status"), "431");
    assert_string_equal(rhdr(cs, "x-error-hook"), "1");
    assert_memory_equal(cs->body.data, "request header fields too large", cs->body.len);
}

static void test_rest_streamed_with_writable(void **state)
{
    (void)state;
    g.rest_mode = 2;
    start();
    struct cstream *cs = c_request("GET", "/logs", NULL, NULL, 0, true, NULL);
    assert_true(run_until(cond_closed, cs, 3000));
    assert_int_equal(g.rest_writable, 1);
    assert_int_equal(g.rest_closed, 0);
    assert_string_equal(rhdr(cs, ":status"), "200");
    assert_string_equal(rhdr(cs, "content-type"), "text/event-stream");
    assert_null(rhdr(cs, "connection")); /* forbidden in HTTP/2 */
    assert_null(rhdr(cs, "content-length"));
    assert_int_equal(cs->body.len, 6 + 200 * 1024 + 5);
    assert_memory_equal(cs->body.data, "line1\n", 6);
    assert_memory_equal(cs->body.data + cs->body.len - 5, "tail\n", 5);
    assert_int_equal(cs->close_code, 0);
}

static bool cond_rest_closed(void *arg)
{
    (void)arg;
    return g.rest_closed > 0;
}

static void test_rest_client_reset_calls_on_close(void **state)
{
    (void)state;
    g.rest_mode = 1;
    start();
    struct cstream *cs = c_request("GET", "/logs", NULL, NULL, 0, true, NULL);
    spin(30);
    assert_non_null(g.held);
    nghttp2_submit_rst_stream(T->ng, NGHTTP2_FLAG_NONE, cs->id, NGHTTP2_CANCEL);
    c_flush();
    assert_true(run_until(cond_rest_closed, NULL, 2000));
    assert_null(g.held);

    /* a held request is told when the connection is destroyed */
    struct cstream *cs2 = c_request("GET", "/logs", NULL, NULL, 0, true, NULL);
    (void)cs2;
    spin(30);
    assert_non_null(g.held);
    T->conn->ops->destroy(T->conn);
    assert_int_equal(g.rest_closed, 2);
    assert_int_equal(T->set.count, 0);
    assert_true(run_until(cond_eof, NULL, 2000));
}

/* ---- gRPC ------------------------------------------------------------------ */

static void test_grpc_unary_echo(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"ping"};
    static const char *const md[] = {"x-api-key", "K-123", NULL};
    struct cstream *cs = c_grpc("/test.Svc/Echo", msgs, 1, true, md);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(g.messages, 1);
    assert_int_equal(g.intercepts, 1);
    assert_string_equal(g.seen_md, "K-123");
    assert_false(cs->trailers_only);
    assert_string_equal(rhdr(cs, ":status"), "200");
    assert_string_equal(rhdr(cs, "content-type"), "application/grpc");
    char out[4][64];
    assert_int_equal(gmsgs(cs, out, 4), 1);
    assert_string_equal(out[0], "ping");
    assert_string_equal(gstat(cs, "grpc-status"), "0");
    assert_null(gstat(cs, "grpc-message"));
    assert_int_equal(cs->close_code, 0);
    assert_int_equal(g.cancels, 0);
}

static void test_grpc_server_stream_without_half_close(void **state)
{
    (void)state;
    start();
    /* the handler starts on the complete message; the client never
     * half-closes, and the server ends the stream with RST(NO_ERROR) after
     * its trailers */
    static const char *const msgs[] = {"req"};
    struct cstream *cs = c_grpc("/test.Svc/Three", msgs, 1, false, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(g.messages, 1);
    char out[4][64];
    assert_int_equal(gmsgs(cs, out, 4), 3);
    assert_string_equal(out[0], "one");
    assert_string_equal(out[1], "two");
    assert_string_equal(out[2], "three");
    assert_string_equal(gstat(cs, "grpc-status"), "0");
    assert_int_equal(cs->close_code, 0);
}

static void test_grpc_client_stream(void **state)
{
    (void)state;
    start();
    static const char *const first[] = {"a"};
    struct cstream *cs = c_grpc("/test.Svc/Collect", first, 1, false, NULL);
    spin(20);
    assert_int_equal(g.messages, 1);
    /* the next message split across two writes */
    uint8_t m[5 + 2];
    pn_grpc_frame_header(m, 2);
    memcpy(m + 5, "bb", 2);
    c_write(cs, m, 3, false);
    spin(20);
    assert_int_equal(g.messages, 1);
    c_write(cs, m + 3, 4, false);
    spin(20);
    assert_int_equal(g.messages, 2);
    uint8_t e[5];
    pn_grpc_frame_header(e, 0);
    c_write(cs, e, 5, true);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(g.messages, 3);
    assert_int_equal(g.ends, 1);
    char out[4][64];
    assert_int_equal(gmsgs(cs, out, 4), 1);
    assert_string_equal(out[0], "a|bb||");
    assert_string_equal(gstat(cs, "grpc-status"), "0");
    assert_string_equal(gstat(cs, "grpc-message"), "done");
}

static void test_grpc_empty_request(void **state)
{
    (void)state;
    start();
    /* half-closed with no message at all: the handler gets an empty one */
    struct cstream *cs =
        c_request("POST", "/test.Svc/Empty", "application/grpc+proto", NULL, 0, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(g.messages, 1);
    assert_true(cs->trailers_only);
    assert_string_equal(rhdr(cs, ":status"), "200");
    assert_string_equal(rhdr(cs, "content-type"), "application/grpc");
    assert_string_equal(gstat(cs, "grpc-status"), "14");
    assert_string_equal(gstat(cs, "grpc-message"), "core is not started yet");
}

static void test_grpc_unknown_method(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"x"};
    struct cstream *cs = c_grpc("/test.Svc/Nope", msgs, 1, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_true(cs->trailers_only);
    assert_int_equal(cs->body.len, 0);
    assert_string_equal(rhdr(cs, ":status"), "200");
    assert_string_equal(rhdr(cs, "content-type"), "application/grpc");
    assert_string_equal(gstat(cs, "grpc-status"), "12");
    assert_string_equal(gstat(cs, "grpc-message"), "unknown method Nope for service test.Svc");

    struct cstream *cs2 = c_grpc("/other.Svc/X", msgs, 1, true, NULL);
    assert_true(run_until(cond_closed, cs2, 2000));
    assert_string_equal(gstat(cs2, "grpc-status"), "12");
    assert_string_equal(gstat(cs2, "grpc-message"), "unknown service other.Svc");
    assert_int_equal(g.messages, 0);
    assert_int_equal(g.cancels, 0);
}

static void test_grpc_intercept_runs_first(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"x"};
    static const char *const deny[] = {"x-deny", "1", NULL};
    /* auth errors come before UNIMPLEMENTED, and before known handlers */
    struct cstream *cs = c_grpc("/test.Svc/Nope", msgs, 1, true, deny);
    struct cstream *cs2 = c_grpc("/test.Svc/Echo", msgs, 1, true, deny);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_true(run_until(cond_closed, cs2, 2000));
    assert_int_equal(g.intercepts, 2);
    assert_true(cs->trailers_only);
    assert_string_equal(gstat(cs, "grpc-status"), "16");
    assert_string_equal(gstat(cs, "grpc-message"), "missing x-api-key header");
    assert_string_equal(gstat(cs2, "grpc-status"), "16");
    assert_int_equal(g.messages, 0);
}

static void test_grpc_message_too_big(void **state)
{
    (void)state;
    start();
    uint8_t h[5];
    pn_grpc_frame_header(h, 67108865);
    struct cstream *cs = c_request("POST", "/test.Svc/Echo", "application/grpc", h, 5, false, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_true(cs->trailers_only);
    assert_string_equal(gstat(cs, "grpc-status"), "8");
    assert_string_equal(gstat(cs, "grpc-message"),
                        "grpc: received message larger than max (67108865 vs. 67108864)");
    assert_int_equal(g.messages, 0);
    /* the client had not half-closed: the server stopped it with RST(NO_ERROR) */
    assert_int_equal(cs->close_code, NGHTTP2_NO_ERROR);

    /* the connection still works */
    static const char *const msgs[] = {"ok"};
    struct cstream *cs2 = c_grpc("/test.Svc/Echo", msgs, 1, true, NULL);
    assert_true(run_until(cond_closed, cs2, 2000));
    assert_string_equal(gstat(cs2, "grpc-status"), "0");
}

static void test_grpc_max_message_exact(void **state)
{
    (void)state;
    svc.max_message = 1024;
    start();
    char *m = malloc(1026);
    memset(m, 'm', 1024);
    m[1024] = '\0';
    const char *ok[] = {m};
    struct cstream *cs = c_grpc("/test.Svc/Echo", ok, 1, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_string_equal(gstat(cs, "grpc-status"), "0");
    assert_int_equal(cs->body.len, 1029);
    m[1024] = 'm';
    m[1025] = '\0';
    struct cstream *cs2 = c_grpc("/test.Svc/Echo", ok, 1, true, NULL);
    assert_true(run_until(cond_closed, cs2, 2000));
    svc.max_message = 67108864;
    free(m);
    assert_string_equal(gstat(cs2, "grpc-status"), "8");
    assert_string_equal(gstat(cs2, "grpc-message"),
                        "grpc: received message larger than max (1025 vs. 1024)");
    assert_int_equal(g.messages, 1);
}

static void test_grpc_writable(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"go"};
    struct cstream *cs = c_grpc("/test.Svc/Flood", msgs, 1, true, NULL);
    assert_true(run_until(cond_closed, cs, 3000));
    assert_int_equal(g.grpc_writable, 1);
    assert_int_equal(cs->body.len, 3 * (5 + 100 * 1024) + 5 + 3);
    assert_string_equal(gstat(cs, "grpc-status"), "0");
}

static void test_grpc_compressed_rejected(void **state)
{
    (void)state;
    start();
    const uint8_t m[6] = {1, 0, 0, 0, 1, 'z'};
    struct cstream *cs = c_request("POST", "/test.Svc/Echo", "application/grpc", m, 6, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_string_equal(gstat(cs, "grpc-status"), "13");
    assert_int_equal(g.messages, 0);
}

static void test_grpc_deadline(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"x"};
    static const char *const tmo[] = {"grpc-timeout", "50m", NULL};
    struct cstream *cs = c_grpc("/test.Svc/Hang", msgs, 1, true, tmo);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(g.messages, 1);
    assert_int_equal(g.cancels, 1);
    assert_null(g.hung);
    assert_true(cs->trailers_only);
    assert_string_equal(gstat(cs, "grpc-status"), "4");

    static const char *const bad[] = {"grpc-timeout", "soon", NULL};
    struct cstream *cs2 = c_grpc("/test.Svc/Hang", msgs, 1, true, bad);
    assert_true(run_until(cond_closed, cs2, 2000));
    assert_string_equal(gstat(cs2, "grpc-status"), "13");
    assert_int_equal(g.messages, 1);
}

static bool cond_cancels(void *arg)
{
    return g.cancels >= *(int *)arg;
}

static void test_grpc_client_reset_and_conn_close_cancel(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"x"};
    struct cstream *cs = c_grpc("/test.Svc/Hang", msgs, 1, true, NULL);
    spin(30);
    assert_non_null(g.hung);
    assert_ptr_equal(pn_grpc_call_data(g.hung), &g);
    nghttp2_submit_rst_stream(T->ng, NGHTTP2_FLAG_NONE, cs->id, NGHTTP2_CANCEL);
    c_flush();
    int want = 1;
    assert_true(run_until(cond_cancels, &want, 2000));
    assert_null(g.hung);

    /* the connection going away cancels what is open */
    c_grpc("/test.Svc/Hang", msgs, 1, true, NULL);
    spin(30);
    assert_non_null(g.hung);
    T->conn->ops->destroy(T->conn);
    assert_int_equal(g.cancels, 2);
    assert_null(g.hung);
    assert_true(run_until(cond_eof, NULL, 2000));
}

static void test_grpc_async_finish(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"x"};
    struct cstream *cs = c_grpc("/test.Svc/Later", msgs, 1, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    char out[2][64];
    assert_int_equal(gmsgs(cs, out, 2), 1);
    assert_string_equal(out[0], "late");
    assert_string_equal(gstat(cs, "grpc-status"), "5");
    assert_string_equal(gstat(cs, "grpc-message"), "user>>>1>>>online not found.%0A100%25");
}

static bool cond_all_closed(void *arg)
{
    struct cstream **v = arg;
    for (int i = 0; i < 100; i++)
        if (!v[i]->closed)
            return false;
    return true;
}

static void test_grpc_100_concurrent(void **state)
{
    (void)state;
    start();
    spin(10); /* let the server's SETTINGS arrive */
    struct cstream *v[100];
    char bufs[100][16];
    for (int i = 0; i < 100; i++) {
        snprintf(bufs[i], sizeof bufs[i], "m%d", i);
        const char *msgs[] = {bufs[i]};
        v[i] = c_grpc("/test.Svc/Echo", msgs, 1, true, NULL);
    }
    assert_true(run_until(cond_all_closed, v, 3000));
    for (int i = 0; i < 100; i++) {
        char out[2][64];
        assert_int_equal(gmsgs(v[i], out, 2), 1);
        assert_string_equal(out[0], bufs[i]);
        assert_string_equal(gstat(v[i], "grpc-status"), "0");
    }
    assert_int_equal(g.messages, 100);
}

static bool cond_nhung(void *arg)
{
    return g.nhung >= *(int *)arg;
}

static void test_grpc_100_concurrent_open(void **state)
{
    (void)state;
    start();
    spin(10);
    /* 100 streams open at once, all held by the handler, then all finished */
    static const char *const msgs[] = {"x"};
    struct cstream *v[100];
    for (int i = 0; i < 100; i++)
        v[i] = c_grpc("/test.Svc/Hang", msgs, 1, true, NULL);
    int want = 100;
    assert_true(run_until(cond_nhung, &want, 3000));
    spin(10);
    for (int i = 0; i < 100; i++)
        assert_false(v[i]->closed);
    assert_int_equal(g.cancels, 0);
    for (int i = 0; i < g.nhung; i++) {
        char m[16];
        int n = snprintf(m, sizeof m, "r%d", i);
        assert_int_equal(pn_grpc_call_send(g.hung_list[i], (const uint8_t *)m, (size_t)n), PN_OK);
        pn_grpc_call_finish(g.hung_list[i], PN_GRPC_OK, NULL);
    }
    assert_true(run_until(cond_all_closed, v, 3000));
    for (int i = 0; i < 100; i++) {
        char out[2][64];
        assert_int_equal(gmsgs(v[i], out, 2), 1);
        assert_string_equal(gstat(v[i], "grpc-status"), "0");
    }
}

static void test_grpc_large_message(void **state)
{
    (void)state;
    start();
    size_t len = 8u << 20;
    uint8_t *wire = malloc(len + 5);
    pn_grpc_frame_header(wire, len);
    for (size_t i = 0; i < len; i++)
        wire[5 + i] = (uint8_t)(i * 13 + 1);
    struct cstream *cs =
        c_request("POST", "/test.Svc/Echo", "application/grpc", wire, len + 5, true, NULL);
    assert_true(run_until(cond_closed, cs, 8000));
    assert_string_equal(gstat(cs, "grpc-status"), "0");
    assert_int_equal(cs->body.len, len + 5);
    assert_memory_equal(cs->body.data, wire, len + 5);
    free(wire);
}

/* ---- connection behaviour -------------------------------------------------- */

static void test_idle_timeout(void **state)
{
    (void)state;
    T->srv.idle_timeout_ms = 100;
    start();
    static const char *const msgs[] = {"x"};
    struct cstream *cs = c_grpc("/test.Svc/Echo", msgs, 1, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    assert_int_equal(T->set.count, 1);
    assert_true(run_until(cond_eof, NULL, 2000));
    assert_int_equal(T->goaways, 1);
    assert_int_equal(T->last_goaway_code, NGHTTP2_NO_ERROR);
    assert_int_equal(T->last_goaway_id, cs->id);
    assert_int_equal(T->set.count, 0);
}

static void test_idle_timeout_spares_open_streams(void **state)
{
    (void)state;
    T->srv.idle_timeout_ms = 50;
    start();
    static const char *const msgs[] = {"x"};
    c_grpc("/test.Svc/Hang", msgs, 1, true, NULL);
    spin(200);
    assert_false(T->eof);
    assert_non_null(g.hung);
    pn_grpc_call_finish(g.hung, PN_GRPC_OK, NULL);
    g.hung = NULL;
    assert_true(run_until(cond_eof, NULL, 2000));
    assert_int_equal(g.cancels, 0);
}

static void raw_start(const void *extra, size_t len)
{
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    static const uint8_t settings[9] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
    bufferevent_write(T->pair[1], preface, 24);
    bufferevent_write(T->pair[1], settings, 9);
    if (len)
        bufferevent_write(T->pair[1], extra, len);
    bufferevent_setcb(T->pair[1], NULL, NULL, c_event, NULL);
    spin(1);
    T->conn = pn_h2_conn_new(T->pair[0], &T->srv, &T->peer, &T->set);
}

static void test_header_timeout(void **state)
{
    (void)state;
    T->srv.header_timeout_ms = 150;
    /* HEADERS announcing 100 bytes, without END_HEADERS, then only 3 */
    static const uint8_t hdr[12] = {0, 0, 100, 1, 0, 0, 0, 0, 1, 0x82, 0x87, 0x84};
    raw_start(hdr, sizeof hdr);
    spin(30);
    assert_false(T->eof);
    assert_true(run_until(cond_eof, NULL, 2000));
    assert_int_equal(T->set.count, 0);
}

static void test_garbage_after_preface(void **state)
{
    (void)state;
    uint8_t junk[4096];
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof junk; i++) {
        x = x * 1103515245 + 12345;
        junk[i] = (uint8_t)(x >> 16);
    }
    raw_start(junk, sizeof junk);
    assert_true(run_until(cond_eof, NULL, 2000));
    assert_int_equal(T->set.count, 0);
}

static void test_bad_preface(void **state)
{
    (void)state;
    static const char bad[] = "PRI * HTTP/2.0\r\n\r\nXX\r\n\r\nmore junk";
    bufferevent_write(T->pair[1], bad, sizeof bad - 1);
    bufferevent_setcb(T->pair[1], NULL, NULL, c_event, NULL);
    spin(1);
    T->conn = pn_h2_conn_new(T->pair[0], &T->srv, &T->peer, &T->set);
    assert_true(run_until(cond_eof, NULL, 2000));
    assert_int_equal(T->set.count, 0);
}

static bool cond_two_goaways(void *arg)
{
    (void)arg;
    return T->goaways >= 2;
}

static void test_graceful_shutdown(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"x"};
    struct cstream *cs = c_grpc("/test.Svc/Hang", msgs, 1, true, NULL);
    spin(30);
    assert_non_null(g.hung);
    T->conn->ops->shutdown(T->conn);
    /* the notice and, after the PING round trip, the final GOAWAY went out;
     * the open call continues */
    assert_true(run_until(cond_two_goaways, NULL, 2000));
    spin(20);
    assert_int_equal(T->goaways, 2);
    assert_int_equal(T->last_goaway_id, cs->id);
    assert_false(T->eof);
    assert_false(cs->closed);
    assert_int_equal(pn_grpc_call_send(g.hung, (const uint8_t *)"bye", 3), PN_OK);
    pn_grpc_call_finish(g.hung, PN_GRPC_OK, NULL);
    g.hung = NULL;
    assert_true(run_until(cond_eof, NULL, 2000));
    assert_true(cs->closed);
    char out[2][64];
    assert_int_equal(gmsgs(cs, out, 2), 1);
    assert_string_equal(gstat(cs, "grpc-status"), "0");
    assert_int_equal(g.cancels, 0);
    assert_int_equal(T->set.count, 0);
}

static void test_shutdown_without_streams(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"x"};
    struct cstream *cs = c_grpc("/test.Svc/Echo", msgs, 1, true, NULL);
    assert_true(run_until(cond_closed, cs, 2000));
    T->conn->ops->shutdown(T->conn);
    assert_true(run_until(cond_eof, NULL, 2000));
    assert_int_equal(T->goaways, 2);
    assert_int_equal(T->last_goaway_id, cs->id);
    assert_int_equal(T->set.count, 0);
}

static uint32_t rnd_state;

static uint32_t rnd(void)
{
    rnd_state = rnd_state * 1664525u + 1013904223u;
    return rnd_state >> 8;
}

/* Random client behaviour with a fixed seed: requests of every kind,
 * resets, partial messages, half-closes, handlers finishing late, and the
 * connection destroyed in the middle. ASan/UBSan do the checking; the
 * assertions check that every call was either finished or cancelled. */
static void test_random_client(void **state)
{
    (void)state;
    rnd_state = 0x9e3779b9;
    start();
    spin(5);
    static const char *const paths[] = {"/test.Svc/Echo",  "/test.Svc/Hang", "/test.Svc/Collect",
                                        "/test.Svc/Three", "/test.Svc/Nope", "/test.Svc/Flood"};
    int opened = 0;
    for (int step = 0; step < 400 && T->ncs < MAX_CS - 1; step++) {
        uint32_t op = rnd() % 10;
        struct cstream *any = T->ncs ? &T->cs[rnd() % (uint32_t)T->ncs] : NULL;
        if (op < 3) {
            static const char *const msgs[] = {"abc", "defgh"};
            const char *path = paths[rnd() % 6];
            size_t nmsgs = rnd() % 3;
            bool end = rnd() % 2;
            c_grpc(path, msgs, nmsgs, end, NULL);
            opened++;
        } else if (op == 3) {
            c_request("POST", "/r", NULL, "body", 4, rnd() % 2, NULL);
        } else if (op == 4 && any && !any->closed) {
            nghttp2_submit_rst_stream(T->ng, NGHTTP2_FLAG_NONE, any->id, NGHTTP2_CANCEL);
            c_flush();
        } else if (op == 5 && any && !any->closed && !any->src_eof) {
            uint8_t part[7];
            pn_grpc_frame_header(part, 2);
            part[5] = 'x';
            part[6] = 'y';
            size_t n = 1 + rnd() % 7;
            c_write(any, part, n, rnd() % 2);
        } else if (op == 6) {
            for (int i = 0; i < g.nhung; i++)
                if (g.hung_list[i] && rnd() % 2) {
                    struct pn_grpc_call *call = g.hung_list[i];
                    g.hung_list[i] = NULL;
                    if (call == g.hung)
                        g.hung = NULL;
                    pn_grpc_call_finish(call, PN_GRPC_OK, "late");
                }
        } else {
            spin((int)(rnd() % 3));
        }
    }
    spin(20);
    assert_true(opened > 50);
    T->conn->ops->destroy(T->conn);
    for (int i = 0; i < g.nhung; i++)
        assert_null(g.hung_list[i]); /* every held call was finished or cancelled */
}

static void test_client_eof_frees(void **state)
{
    (void)state;
    start();
    static const char *const msgs[] = {"x"};
    c_grpc("/test.Svc/Hang", msgs, 1, true, NULL);
    spin(30);
    assert_non_null(g.hung);
    /* the peer disappears: EOF on the server's end */
    bufferevent_flush(T->pair[1], EV_WRITE, BEV_FINISHED);
    int want = 1;
    assert_true(run_until(cond_cancels, &want, 2000));
    assert_int_equal(T->set.count, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_rest_get_with_body, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rest_413, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rest_431_and_error_hook, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rest_streamed_with_writable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rest_client_reset_calls_on_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_unary_echo, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_server_stream_without_half_close, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_grpc_client_stream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_empty_request, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_unknown_method, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_intercept_runs_first, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_message_too_big, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_max_message_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_writable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_compressed_rejected, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_deadline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_client_reset_and_conn_close_cancel, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_grpc_async_finish, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_100_concurrent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_100_concurrent_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grpc_large_message, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rest_head_check, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rest_body_stall_resets_stream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_timeout_spares_open_streams, setup, teardown),
        cmocka_unit_test_setup_teardown(test_header_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_after_preface, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_preface, setup, teardown),
        cmocka_unit_test_setup_teardown(test_graceful_shutdown, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shutdown_without_streams, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_eof_frees, setup, teardown),
        cmocka_unit_test_setup_teardown(test_random_client, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
