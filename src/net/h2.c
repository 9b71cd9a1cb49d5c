/* HTTP/2 server connections on nghttp2 1.52 and libevent bufferevents. This
 * module owns one struct h2_conn per connection (the nghttp2 session, the
 * bufferevent it took over, its timers) and one struct pn__h2_stream per
 * open stream (the request headers, the REST body, the queued answer).
 * Streams whose content-type starts with application/grpc are handed to
 * grpc.c, which owns the call; every other stream is a REST request given
 * to srv->on_request as a struct pn_req answered through the pn_req_ops
 * below.
 *
 * Re-entrancy: handlers run inside nghttp2 callbacks and may answer at once,
 * later from a timer, or destroy the connection. c->depth counts the frames
 * of this module on the stack; while it is non-zero nothing calls
 * nghttp2_session_send or frees the connection: sending happens when the
 * outermost frame unwinds, and a close becomes c->dead plus a deferred
 * "kick" event that frees the connection from a clean stack. Streams are
 * freed only in nghttp2's stream-close callback or when the connection is
 * freed. */
#include "net/h2.h"

#include <ctype.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/err.h"
#include "base/log.h"
#include "net/grpc.h"
#include "net/h2_internal.h"

/* nghttp2 is fed only while the socket's output holds less than this. */
#define H2_OUT_HIGH ((size_t)256 * 1024)
/* The write callback fires when the output drains to this. */
#define H2_OUT_LOW ((size_t)64 * 1024)
/* A stream's on_writable fires when its queue drops under this. */
#define H2_WRITABLE_MARK ((size_t)64 * 1024)
#define H2_MAX_STREAMS 1000
#define H2_STREAM_WINDOW (16 << 20)
#define H2_CONN_WINDOW (64 << 20)
/* How long a closing connection may take to flush its last frames. */
#define H2_LINGER_MS 5000
/* After an early REST answer (413) the rest of the body is read and dropped
 * up to max(max_body, 1 MiB) + 1 MiB before RST_STREAM: curl 7.88 reports
 * error 92 instead of the answer when the stream is reset while it uploads.
 * gRPC clients handle the reset, as grpc-go sends it at once. */
#define H2_DISCARD_SLACK ((size_t)1 << 20)
static const uint8_t h2_drain_ping[8] = {'p', 'n', '-', 'd', 'r', 'a', 'i', 'n'};

struct h2_conn;

struct pn__h2_stream {
    struct h2_conn *conn;
    int32_t id;
    struct pn__h2_stream *prev, *next;
    /* request */
    struct pn_http_header *hdrs; /* regular headers, owned strings */
    size_t nhdrs, hcap;
    size_t hdr_bytes;
    char *method, *path, *authority;
    const char *content_type;
    bool hdr_too_big, headers_done, is_grpc;
    struct pn_grpc_call *call;
    /* REST */
    struct pn_req req;
    char *req_path, *req_query;
    struct pn_buf body;
    bool req_started; /* on_request was called */
    bool answered;    /* the handler's part is over (respond / stream_end / 413...) */
    bool body_rejected;
    size_t discarded; /* request bytes dropped after an early REST answer */
    struct event *body_ev; /* REST body progress (idle timeout), see body_cb */
    bool stop_upload;      /* reset the stream once our answer is out */
    bool streaming;
    /* answer */
    struct evbuffer *out;
    struct pn_http_header *trl; /* trailers after the last DATA, owned */
    size_t ntrl;
    bool resp_submitted, out_eof, deferred, want_writable, closed;
    bool local_done, rst_sent;
};

struct h2_conn {
    struct pn_conn base;
    const struct pn_http_server *srv;
    struct bufferevent *bev;
    nghttp2_session *ng;
    struct pn__h2_stream *streams;
    size_t nstreams;
    struct event *idle_ev; /* idle timeout; the linger limit once closing */
    struct event *hdr_ev;  /* header block timeout */
    struct event *kick_ev; /* deferred input processing and free */
    int32_t hdr_stream;    /* stream whose header block is being read, 0 none */
    int depth;
    bool draining; /* shutdown: GOAWAY sent, close when streams are done */
    bool goaway_final;
    bool closing; /* reads stopped; free once the output drained */
    bool dead;    /* free at the next clean point */
    bool freeing;
};

static const struct pn_req_ops h2_req_ops;
static void conn_flush(struct h2_conn *c);

/* ---- small helpers ------------------------------------------------------- */

static void ms_to_tv(unsigned ms, struct timeval *tv)
{
    tv->tv_sec = ms / 1000;
    tv->tv_usec = (long)(ms % 1000) * 1000;
}

/* Marks the connection for freeing from the kick event, off the current
 * stack. It leaves the listener's set at once, so a caller looping over the
 * set never sees it again. */
static void conn_kill(struct h2_conn *c)
{
    c->dead = true;
    pn_conn_unlink(&c->base);
    event_active(c->kick_ev, EV_TIMEOUT, 1);
}

static void conn_arm_idle(struct h2_conn *c)
{
    if (c->closing || c->dead || c->srv->idle_timeout_ms == 0)
        return;
    struct timeval tv;
    ms_to_tv(c->srv->idle_timeout_ms, &tv);
    evtimer_add(c->idle_ev, &tv);
}

/* Stops reading and gives the output H2_LINGER_MS to drain; the connection
 * is freed when it is empty (see conn_flush and write_cb). */
static void conn_start_closing(struct h2_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    bufferevent_disable(c->bev, EV_READ);
    bufferevent_setwatermark(c->bev, EV_WRITE, 0, 0);
    struct timeval tv;
    ms_to_tv(H2_LINGER_MS, &tv);
    evtimer_add(c->idle_ev, &tv);
    evtimer_del(c->hdr_ev);
}

/* Queues a GOAWAY naming the last stream we processed, then closes. */
static void conn_goaway(struct h2_conn *c, uint32_t code, const char *why)
{
    nghttp2_submit_goaway(c->ng, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(c->ng),
                          code, (const uint8_t *)why, strlen(why));
    conn_start_closing(c);
}

/* A complete frame (or a rejected one) means no header block is pending:
 * HTTP/2 allows nothing between a HEADERS frame and its last CONTINUATION. */
static void hdr_timer_clear(struct h2_conn *c)
{
    if (c->hdr_stream) {
        evtimer_del(c->hdr_ev);
        c->hdr_stream = 0;
    }
}

static char *lower_dup(const char *s)
{
    char *d = pn_strdup(s);
    for (char *p = d; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    return d;
}

/* Headers HTTP/2 forbids in answers (RFC 9113 §8.2.2) or that we set. */
static bool skip_response_header(const char *name, bool ours_cl)
{
    static const char *const hop[] = {"connection", "keep-alive",        "proxy-connection",
                                      "upgrade",    "transfer-encoding", "te"};
    if (name[0] == ':' || name[0] == '\0')
        return true;
    for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++)
        if (strcasecmp(name, hop[i]) == 0)
            return true;
    return ours_cl && strcasecmp(name, "content-length") == 0;
}

/* An nghttp2 header list: pseudo headers first (already lower-case), then
 * the caller's headers lower-cased and filtered. nghttp2 copies the list on
 * submit, so it is freed right after. */
struct nvlist {
    nghttp2_nv *nv;
    char **owned;
    size_t n, nowned;
};

static void nv_push(struct nvlist *l, const char *name, const char *value)
{
    l->nv[l->n++] = (nghttp2_nv){(uint8_t *)name, (uint8_t *)value, strlen(name), strlen(value),
                                 NGHTTP2_NV_FLAG_NONE};
}

static void nv_build(struct nvlist *l, const struct pn_http_header *pre, size_t npre,
                     const struct pn_http_header *hdrs, size_t nhdrs, bool ours_cl)
{
    l->nv = pn_calloc(npre + nhdrs + 1, sizeof *l->nv);
    l->owned = pn_calloc(nhdrs + 1, sizeof *l->owned);
    l->n = l->nowned = 0;
    for (size_t i = 0; i < npre; i++)
        nv_push(l, pre[i].name, pre[i].value);
    for (size_t i = 0; i < nhdrs; i++) {
        if (!hdrs[i].name || !hdrs[i].value || skip_response_header(hdrs[i].name, ours_cl))
            continue;
        char *name = lower_dup(hdrs[i].name);
        l->owned[l->nowned++] = name;
        nv_push(l, name, hdrs[i].value);
    }
}

static void nv_free(struct nvlist *l)
{
    for (size_t i = 0; i < l->nowned; i++)
        free(l->owned[i]);
    free(l->owned);
    free(l->nv);
}

/* ---- streams ------------------------------------------------------------- */

static struct pn__h2_stream *stream_get(struct h2_conn *c, int32_t id)
{
    return nghttp2_session_get_stream_user_data(c->ng, id);
}

static struct pn__h2_stream *stream_new(struct h2_conn *c, int32_t id)
{
    struct pn__h2_stream *s = pn_new(struct pn__h2_stream);
    s->conn = c;
    s->id = id;
    s->out = evbuffer_new();
    if (!s->out) {
        fprintf(stderr, "proxynode: out of memory (evbuffer)\n");
        abort();
    }
    pn_buf_init(&s->body, c->srv->max_body);
    s->next = c->streams;
    if (c->streams)
        c->streams->prev = s;
    c->streams = s;
    c->nstreams++;
    evtimer_del(c->idle_ev);
    return s;
}

static void free_headers(struct pn_http_header *h, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free((char *)h[i].name);
        free((char *)h[i].value);
    }
    free(h);
}

/* The stream is over (closed by nghttp2 or by the connection going away):
 * whoever still owns its request hears about it, then it is freed. */
static void stream_close(struct h2_conn *c, struct pn__h2_stream *s)
{
    s->closed = true;
    if (c->hdr_stream == s->id)
        hdr_timer_clear(c);
    if (s->call) {
        struct pn_grpc_call *call = s->call;
        s->call = NULL;
        pn__grpc_call_stream_closed(call);
    } else if (!s->is_grpc && s->req_started && !s->answered) {
        s->answered = true;
        if (s->req.on_close)
            s->req.on_close(&s->req, s->req.cb_arg);
    }
    if (s->prev)
        s->prev->next = s->next;
    else
        c->streams = s->next;
    if (s->next)
        s->next->prev = s->prev;
    c->nstreams--;
    free_headers(s->hdrs, s->nhdrs);
    free_headers(s->trl, s->ntrl);
    free(s->method);
    free(s->path);
    free(s->authority);
    free(s->req_path);
    free(s->req_query);
    pn_buf_free(&s->body);
    evbuffer_free(s->out);
    if (s->body_ev)
        event_free(s->body_ev);
    free(s);
    if (c->nstreams == 0 && !c->freeing)
        conn_arm_idle(c);
}

static void stream_add_header(struct pn__h2_stream *s, const char *name, size_t nlen,
                              const char *value, size_t vlen)
{
    if (s->nhdrs == s->hcap) {
        s->hcap = s->hcap ? s->hcap * 2 : 16;
        s->hdrs = pn_realloc(s->hdrs, s->hcap * sizeof *s->hdrs);
    }
    s->hdrs[s->nhdrs++] = (struct pn_http_header){pn_strndup(name, nlen), pn_strndup(value, vlen)};
}

/* Data provider for every answer body: drains the stream's queue, defers
 * when it is empty and the answer is not over, and ends with trailers when
 * there are some (gRPC) or END_STREAM. */
static ssize_t data_read_cb(nghttp2_session *ng, int32_t id, uint8_t *buf, size_t length,
                            uint32_t *flags, nghttp2_data_source *src, void *user)
{
    struct pn__h2_stream *s = src->ptr;
    (void)user;
    size_t have = evbuffer_get_length(s->out);
    size_t n = have < length ? have : length;
    if (n > 0)
        evbuffer_remove(s->out, buf, n);
    if (n == have) {
        if (s->out_eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            if (s->ntrl > 0) {
                struct nvlist l;
                nv_build(&l, s->trl, s->ntrl, NULL, 0, false);
                int rv = nghttp2_submit_trailer(ng, id, l.nv, l.n);
                nv_free(&l);
                if (rv == 0)
                    *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
            }
        } else if (n == 0) {
            s->deferred = true;
            return NGHTTP2_ERR_DEFERRED;
        }
    }
    return (ssize_t)n;
}

static void stream_resume(struct pn__h2_stream *s)
{
    if (s->deferred) {
        s->deferred = false;
        nghttp2_session_resume_data(s->conn->ng, s->id);
    }
}

/* Submits response HEADERS; with a body to follow, the data provider above
 * is attached. */
static int stream_submit(struct pn__h2_stream *s, const struct pn_http_header *pre, size_t npre,
                         const struct pn_http_header *hdrs, size_t nhdrs, bool ours_cl,
                         bool end_stream)
{
    if (s->closed || s->resp_submitted)
        return s->closed ? PN_ERR_CLOSED : PN_ERR_STATE;
    struct nvlist l;
    nv_build(&l, pre, npre, hdrs, nhdrs, ours_cl);
    nghttp2_data_provider prd = {.source.ptr = s, .read_callback = data_read_cb};
    int rv = nghttp2_submit_response(s->conn->ng, s->id, l.nv, l.n, end_stream ? NULL : &prd);
    nv_free(&l);
    if (rv != 0)
        return PN_ERR_CLOSED;
    s->resp_submitted = true;
    return PN_OK;
}

static void stream_queue(struct pn__h2_stream *s, const void *data, size_t len)
{
    if (len > 0 && evbuffer_add(s->out, data, len) != 0) {
        fprintf(stderr, "proxynode: out of memory (evbuffer_add)\n");
        abort();
    }
    if (evbuffer_get_length(s->out) >= H2_WRITABLE_MARK)
        s->want_writable = true;
    stream_resume(s);
}

/* ---- the h2.c side of grpc.c --------------------------------------------- */

void pn__h2_stream_set_call(struct pn__h2_stream *s, struct pn_grpc_call *call)
{
    s->call = call;
}

struct event_base *pn__h2_stream_base(const struct pn__h2_stream *s)
{
    return bufferevent_get_base(s->conn->bev);
}

int pn__h2_stream_headers(struct pn__h2_stream *s, const struct pn_http_header *hdrs, size_t nhdrs,
                          bool end_stream)
{
    return stream_submit(s, hdrs, nhdrs, NULL, 0, false, end_stream);
}

int pn__h2_stream_write(struct pn__h2_stream *s, const void *data, size_t len)
{
    if (s->closed || !s->resp_submitted || s->out_eof)
        return s->closed ? PN_ERR_CLOSED : PN_ERR_STATE;
    stream_queue(s, data, len);
    return PN_OK;
}

int pn__h2_stream_end(struct pn__h2_stream *s, const struct pn_http_header *trailers,
                      size_t ntrailers)
{
    if (s->closed || !s->resp_submitted || s->out_eof)
        return s->closed ? PN_ERR_CLOSED : PN_ERR_STATE;
    if (ntrailers > 0) {
        s->trl = pn_calloc(ntrailers, sizeof *s->trl);
        for (size_t i = 0; i < ntrailers; i++)
            s->trl[i] =
                (struct pn_http_header){pn_strdup(trailers[i].name), pn_strdup(trailers[i].value)};
        s->ntrl = ntrailers;
    }
    s->out_eof = true;
    stream_resume(s);
    return PN_OK;
}

size_t pn__h2_stream_pending(const struct pn__h2_stream *s)
{
    return evbuffer_get_length(s->out);
}

void pn__h2_stream_want_writable(struct pn__h2_stream *s)
{
    s->want_writable = true;
    if (!s->conn->dead)
        event_active(s->conn->kick_ev, EV_TIMEOUT, 1);
}

void pn__h2_stream_flush(struct pn__h2_stream *s)
{
    conn_flush(s->conn);
}

/* ---- REST requests ------------------------------------------------------- */

static int req_respond(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                       size_t nhdrs, const void *body, size_t len)
{
    struct pn__h2_stream *s = req->transport;
    if (s->closed)
        return PN_ERR_CLOSED;
    if (s->answered || s->streaming)
        return PN_ERR_STATE;
    s->answered = true;
    bool head = s->method && strcmp(s->method, "HEAD") == 0;
    /* 1xx, 204 and 304 carry neither a body nor a Content-Length */
    bool bodyless = status < 200 || status == 204 || status == 304;
    bool has_body = len > 0 && !head && !bodyless;
    char st[16], cl[32];
    snprintf(st, sizeof st, "%d", status);
    snprintf(cl, sizeof cl, "%zu", bodyless ? (size_t)0 : len);
    struct pn_http_header pre[] = {{":status", st}, {"content-length", cl}};
    int rv = stream_submit(s, pre, bodyless ? 1 : 2, hdrs, nhdrs, true, !has_body);
    if (rv == PN_OK && has_body) {
        stream_queue(s, body, len);
        s->out_eof = true;
        s->want_writable = false;
    }
    conn_flush(s->conn);
    return rv == PN_OK ? PN_OK : PN_ERR_CLOSED;
}

static int req_stream_start(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                            size_t nhdrs)
{
    struct pn__h2_stream *s = req->transport;
    if (s->closed)
        return PN_ERR_CLOSED;
    if (s->answered || s->streaming)
        return PN_ERR_STATE;
    s->streaming = true;
    char st[16];
    snprintf(st, sizeof st, "%d", status);
    struct pn_http_header pre[] = {{":status", st}};
    int rv = stream_submit(s, pre, 1, hdrs, nhdrs, true, false);
    conn_flush(s->conn);
    return rv;
}

static int req_stream_write(struct pn_req *req, const void *data, size_t len)
{
    struct pn__h2_stream *s = req->transport;
    if (s->closed)
        return PN_ERR_CLOSED;
    if (!s->streaming || s->answered)
        return PN_ERR_STATE;
    int rv = pn__h2_stream_write(s, data, len);
    conn_flush(s->conn);
    return rv;
}

static int req_stream_end(struct pn_req *req)
{
    struct pn__h2_stream *s = req->transport;
    if (s->closed)
        return PN_ERR_CLOSED;
    if (!s->streaming || s->answered)
        return PN_ERR_STATE;
    s->answered = true;
    int rv = pn__h2_stream_end(s, NULL, 0);
    conn_flush(s->conn);
    return rv;
}

static size_t req_stream_pending(const struct pn_req *req)
{
    const struct pn__h2_stream *s = req->transport;
    return s->closed ? 0 : evbuffer_get_length(s->out);
}

static const struct pn_req_ops h2_req_ops = {
    .respond = req_respond,
    .stream_start = req_stream_start,
    .stream_write = req_stream_write,
    .stream_end = req_stream_end,
    .stream_pending = req_stream_pending,
};

/* Answers with one of the transport's own errors (413, 431, 404...). */
static void stream_error(struct pn__h2_stream *s, int status, const char *text)
{
    const struct pn_http_server *srv = s->conn->srv;
    if (srv->respond_error)
        srv->respond_error(&s->req, status, text);
    else
        pn_req_respond_text(&s->req, status, text);
    if (!s->answered) /* respond_error did not answer: do it plainly */
        pn_req_respond_text(&s->req, status, text);
}

static void stream_build_req(struct h2_conn *c, struct pn__h2_stream *s)
{
    const char *full = s->path ? s->path : "";
    const char *q = strchr(full, '?');
    s->req_path = q ? pn_strndup(full, (size_t)(q - full)) : pn_strdup(full);
    s->req_query = pn_strdup(q ? q + 1 : "");
    s->req.method = s->method ? s->method : "";
    s->req.path = s->req_path;
    s->req.query = s->req_query;
    s->req.headers = s->hdrs;
    s->req.nheaders = s->nhdrs;
    s->req.body = NULL;
    s->req.body_len = 0;
    s->req.http_version = 20;
    s->req.peer = &c->base.peer;
    s->req.srv = c->srv;
    s->req.ops = &h2_req_ops;
    s->req.transport = s;
}

static void body_cb(evutil_socket_t fd, short what, void *arg);

/* (Re)starts the wait for the next piece of a REST request body. */
static void stream_arm_body(struct h2_conn *c, struct pn__h2_stream *s)
{
    if (!c->srv->idle_timeout_ms)
        return;
    if (!s->body_ev) {
        s->body_ev = evtimer_new(bufferevent_get_base(c->bev), body_cb, s);
        if (!s->body_ev) {
            fprintf(stderr, "proxynode: out of memory (event)\n");
            abort();
        }
    }
    struct timeval tv;
    ms_to_tv(c->srv->idle_timeout_ms, &tv);
    evtimer_add(s->body_ev, &tv);
}

/* The request's header block is complete: route it to gRPC or REST. A REST
 * request with a body is shown to srv->on_head first, and its body must keep
 * arriving (body_cb). */
static void stream_headers_done(struct h2_conn *c, struct pn__h2_stream *s, bool end_stream)
{
    s->headers_done = true;
    if (s->authority && !s->hdr_too_big) {
        bool has_host = false;
        for (size_t i = 0; i < s->nhdrs; i++)
            if (strcmp(s->hdrs[i].name, "host") == 0)
                has_host = true;
        if (!has_host)
            stream_add_header(s, "host", 4, s->authority, strlen(s->authority));
    }
    s->content_type = NULL;
    for (size_t i = 0; i < s->nhdrs; i++)
        if (strcmp(s->hdrs[i].name, "content-type") == 0) {
            s->content_type = s->hdrs[i].value;
            break;
        }
    stream_build_req(c, s);
    if (s->hdr_too_big) {
        stream_error(s, 431, "request header fields too large");
        if (!end_stream)
            stream_arm_body(c, s);
        return;
    }
    if (s->content_type && strncasecmp(s->content_type, "application/grpc", 16) == 0) {
        s->is_grpc = true;
        pn__grpc_call_begin(s, c->srv, s->method, s->path, s->hdrs, s->nhdrs, &c->base.peer);
        return;
    }
    if (!s->path) {
        stream_error(s, 405, "method not allowed");
        if (!end_stream)
            stream_arm_body(c, s);
        return;
    }
    const char *cl = pn_req_header(&s->req, "content-length");
    if (cl && c->srv->max_body) {
        char *end;
        unsigned long long n = strtoull(cl, &end, 10);
        if (end != cl && n > c->srv->max_body) {
            s->body_rejected = true;
            stream_error(s, 413, "request body too large");
        }
    }
    if (end_stream)
        return;
    stream_arm_body(c, s);
    if (!s->answered && c->srv->on_head)
        c->srv->on_head(&s->req, c->srv->arg);
}

/* The client half-closed: a REST request is complete and goes to the
 * handler; a gRPC call hears about it. */
static void stream_remote_end(struct h2_conn *c, struct pn__h2_stream *s)
{
    if (s->body_ev)
        evtimer_del(s->body_ev);
    if (s->call) {
        pn__grpc_call_half_close(s->call);
        return;
    }
    if (s->is_grpc || s->answered || s->req_started || !s->headers_done)
        return;
    s->req_started = true;
    s->req.body = s->body.data;
    s->req.body_len = s->body.len;
    if (c->srv->on_request)
        c->srv->on_request(&s->req, c->srv->arg);
    else
        stream_error(s, 404, "404 page not found");
}

/* ---- nghttp2 callbacks --------------------------------------------------- */

static ssize_t send_cb(nghttp2_session *ng, const uint8_t *data, size_t len, int flags, void *user)
{
    struct h2_conn *c = user;
    (void)ng;
    (void)flags;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (evbuffer_get_length(out) >= H2_OUT_HIGH)
        return NGHTTP2_ERR_WOULDBLOCK;
    if (evbuffer_add(out, data, len) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    return (ssize_t)len;
}

/* Once our answer ended the stream while the client is still sending (an
 * early error, a refused body), RST_STREAM(NO_ERROR) tells it to stop, as
 * RFC 9113 §8.1 allows; for REST only past H2_DISCARD_SLACK (see above) or
 * once the body timer ran out (stop_upload). */
static void stream_maybe_stop_upload(struct h2_conn *c, struct pn__h2_stream *s)
{
    size_t limit = c->srv->max_body > H2_DISCARD_SLACK ? c->srv->max_body : H2_DISCARD_SLACK;
    if (!s->local_done || s->rst_sent ||
        (!s->stop_upload && s->discarded <= limit + H2_DISCARD_SLACK))
        return;
    s->rst_sent = true;
    nghttp2_submit_rst_stream(c->ng, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_NO_ERROR);
}

static int on_begin_headers_cb(nghttp2_session *ng, const nghttp2_frame *frame, void *user)
{
    struct h2_conn *c = user;
    if (frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    if (frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        struct pn__h2_stream *s = stream_new(c, frame->hd.stream_id);
        nghttp2_session_set_stream_user_data(ng, frame->hd.stream_id, s);
    }
    if (c->srv->header_timeout_ms) {
        struct timeval tv;
        ms_to_tv(c->srv->header_timeout_ms, &tv);
        c->hdr_stream = frame->hd.stream_id;
        evtimer_add(c->hdr_ev, &tv);
    }
    return 0;
}

static int on_header_cb(nghttp2_session *ng, const nghttp2_frame *frame, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *user)
{
    struct h2_conn *c = user;
    (void)flags;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0; /* trailers carry nothing we use */
    struct pn__h2_stream *s = nghttp2_session_get_stream_user_data(ng, frame->hd.stream_id);
    if (!s || s->headers_done)
        return 0;
    s->hdr_bytes += namelen + valuelen + 32;
    if (c->srv->max_header && s->hdr_bytes > c->srv->max_header)
        s->hdr_too_big = true;
    if (s->hdr_too_big)
        return 0;
    const char *n = (const char *)name, *v = (const char *)value;
    if (n[0] == ':') {
        char **slot = NULL;
        if (namelen == 7 && memcmp(n, ":method", 7) == 0)
            slot = &s->method;
        else if (namelen == 5 && memcmp(n, ":path", 5) == 0)
            slot = &s->path;
        else if (namelen == 10 && memcmp(n, ":authority", 10) == 0)
            slot = &s->authority;
        if (slot && !*slot)
            *slot = pn_strndup(v, valuelen);
        return 0;
    }
    stream_add_header(s, n, namelen, v, valuelen);
    return 0;
}

static int on_invalid_frame_recv_cb(nghttp2_session *ng, const nghttp2_frame *frame, int lib_error,
                                    void *user)
{
    (void)ng;
    (void)frame;
    (void)lib_error;
    hdr_timer_clear(user);
    return 0;
}

static int on_frame_recv_cb(nghttp2_session *ng, const nghttp2_frame *frame, void *user)
{
    struct h2_conn *c = user;
    int32_t id = frame->hd.stream_id;
    hdr_timer_clear(c);
    switch (frame->hd.type) {
    case NGHTTP2_HEADERS: {
        struct pn__h2_stream *s = stream_get(c, id);
        if (!s)
            return 0;
        if (frame->headers.cat == NGHTTP2_HCAT_REQUEST)
            stream_headers_done(c, s, frame->hd.flags & NGHTTP2_FLAG_END_STREAM);
        if ((frame->hd.flags & NGHTTP2_FLAG_END_STREAM) && (s = stream_get(c, id)) != NULL)
            stream_remote_end(c, s);
        break;
    }
    case NGHTTP2_DATA: {
        struct pn__h2_stream *s = stream_get(c, id);
        if (s && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
            stream_remote_end(c, s);
        break;
    }
    case NGHTTP2_PING:
        /* The client answered the PING sent with the shutdown notice: every
         * stream it opened before seeing the notice has reached us, so the
         * final GOAWAY can name the last one. */
        if ((frame->hd.flags & NGHTTP2_FLAG_ACK) && c->draining && !c->goaway_final &&
            memcmp(frame->ping.opaque_data, h2_drain_ping, 8) == 0) {
            c->goaway_final = true;
            nghttp2_submit_goaway(ng, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(ng), NGHTTP2_NO_ERROR,
                                  NULL, 0);
        }
        break;
    default:
        break;
    }
    return 0;
}

static int on_data_chunk_recv_cb(nghttp2_session *ng, uint8_t flags, int32_t id,
                                 const uint8_t *data, size_t len, void *user)
{
    struct h2_conn *c = user;
    (void)flags;
    hdr_timer_clear(c);
    struct pn__h2_stream *s = nghttp2_session_get_stream_user_data(ng, id);
    if (!s)
        return 0;
    if (s->call) {
        pn__grpc_call_data(s->call, data, len);
        return 0;
    }
    if (s->is_grpc || s->req_started)
        return 0;
    if (s->answered || s->body_rejected) {
        s->discarded += len;
        stream_maybe_stop_upload(c, s);
        return 0;
    }
    if (pn_buf_append(&s->body, data, len) != PN_OK) {
        s->body_rejected = true;
        pn_buf_free(&s->body);
        stream_error(s, 413, "request body too large");
        return 0;
    }
    stream_arm_body(c, s);
    return 0;
}

static int on_stream_close_cb(nghttp2_session *ng, int32_t id, uint32_t error_code, void *user)
{
    struct h2_conn *c = user;
    (void)error_code;
    struct pn__h2_stream *s = nghttp2_session_get_stream_user_data(ng, id);
    if (s)
        stream_close(c, s);
    return 0;
}

/* Notes when our answer ended a stream; a gRPC client still sending gets
 * RST_STREAM(NO_ERROR) at once, as grpc-go does. */
static int on_frame_send_cb(nghttp2_session *ng, const nghttp2_frame *frame, void *user)
{
    struct h2_conn *c = user;
    int32_t id = frame->hd.stream_id;
    if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
        !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    struct pn__h2_stream *s = stream_get(c, id);
    if (!s)
        return 0;
    s->local_done = true;
    if (nghttp2_session_get_stream_remote_close(ng, id) != 0)
        return 0;
    if (s->is_grpc) {
        s->rst_sent = true;
        nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, id, NGHTTP2_NO_ERROR);
    } else {
        stream_maybe_stop_upload(c, s);
    }
    return 0;
}

static int on_error_cb(nghttp2_session *ng, int code, const char *msg, size_t len, void *user)
{
    struct h2_conn *c = user;
    (void)ng;
    pn_log_debug("h2 %s:%u: %.*s (%d)", c->base.peer.ip, c->base.peer.port, (int)len, msg, code);
    return 0;
}

/* ---- the connection ------------------------------------------------------ */

static void conn_free(struct h2_conn *c)
{
    if (c->freeing)
        return;
    c->freeing = true;
    c->dead = true;
    pn_conn_unlink(&c->base);
    c->depth++;
    while (c->streams) {
        nghttp2_session_set_stream_user_data(c->ng, c->streams->id, NULL);
        stream_close(c, c->streams);
    }
    c->depth--;
    nghttp2_session_del(c->ng);
    event_free(c->idle_ev);
    event_free(c->hdr_ev);
    event_free(c->kick_ev);
    bufferevent_free(c->bev);
    free(c);
}

/* Hands nghttp2 what is queued when the socket can take it, then decides
 * whether the connection is done. A no-op while this module is on the stack:
 * the outermost frame flushes. */
static void conn_flush(struct h2_conn *c)
{
    if (c->depth > 0 || c->dead)
        return;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (evbuffer_get_length(out) < H2_OUT_HIGH) {
        c->depth++;
        int rv = nghttp2_session_send(c->ng);
        c->depth--;
        if (rv != 0) {
            pn_log_debug("h2 %s:%u: send: %s", c->base.peer.ip, c->base.peer.port,
                         nghttp2_strerror(rv));
            conn_kill(c);
            return;
        }
    }
    if (!c->closing) {
        if (!nghttp2_session_want_read(c->ng) && !nghttp2_session_want_write(c->ng)) {
            conn_start_closing(c);
        } else if (c->draining && c->nstreams == 0) {
            /* nothing left to finish: the final GOAWAY need not wait for
             * the PING round trip (a request racing it is refused, and
             * safe for the client to retry) */
            if (!c->goaway_final) {
                c->goaway_final = true;
                conn_goaway(c, NGHTTP2_NO_ERROR, "");
                conn_flush(c);
                return;
            }
            conn_start_closing(c);
        }
    }
    if (c->closing && evbuffer_get_length(out) == 0)
        conn_kill(c);
}

/* Feeds the socket's input to nghttp2. A protocol error answers GOAWAY and
 * closes. */
static void conn_read(struct h2_conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    while (!c->closing && !c->dead && evbuffer_get_length(in) > 0) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        c->depth++;
        ssize_t n = nghttp2_session_mem_recv(c->ng, v.iov_base, v.iov_len);
        c->depth--;
        if (n < 0) {
            pn_log_debug("h2 %s:%u: %s", c->base.peer.ip, c->base.peer.port,
                         nghttp2_strerror((int)n));
            evbuffer_drain(in, evbuffer_get_length(in));
            if (nghttp2_session_terminate_session(c->ng, NGHTTP2_PROTOCOL_ERROR) != 0)
                conn_kill(c);
            conn_start_closing(c);
            break;
        }
        evbuffer_drain(in, (size_t)n);
    }
}

/* Tells handlers whose queue went over the mark that it drained. */
static void conn_notify_writable(struct h2_conn *c)
{
    c->depth++;
    for (struct pn__h2_stream *s = c->streams; s && !c->dead; s = s->next) {
        if (!s->want_writable || evbuffer_get_length(s->out) >= H2_WRITABLE_MARK)
            continue;
        s->want_writable = false;
        if (s->call)
            pn__grpc_call_writable(s->call);
        else if (!s->is_grpc && s->streaming && !s->answered && s->req.on_writable)
            s->req.on_writable(&s->req, s->req.cb_arg);
    }
    c->depth--;
}

/* Everything a libevent callback does after the input was read. */
static void conn_pump(struct h2_conn *c)
{
    conn_flush(c);
    if (c->dead)
        return;
    conn_notify_writable(c);
    conn_flush(c);
}

static void read_cb(struct bufferevent *bev, void *arg)
{
    struct h2_conn *c = arg;
    (void)bev;
    if (c->depth > 0) { /* a bufferevent pair delivering synchronously */
        event_active(c->kick_ev, EV_TIMEOUT, 1);
        return;
    }
    conn_read(c);
    conn_pump(c);
    if (c->dead)
        conn_free(c);
}

static void write_cb(struct bufferevent *bev, void *arg)
{
    struct h2_conn *c = arg;
    (void)bev;
    if (c->depth > 0) {
        event_active(c->kick_ev, EV_TIMEOUT, 1);
        return;
    }
    conn_pump(c);
    if (c->dead)
        conn_free(c);
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct h2_conn *c = arg;
    (void)bev;
    if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)))
        return;
    if (c->depth > 0)
        conn_kill(c);
    else
        conn_free(c);
}

static void kick_cb(evutil_socket_t fd, short what, void *arg)
{
    struct h2_conn *c = arg;
    (void)fd;
    (void)what;
    if (!c->dead) {
        conn_read(c);
        conn_pump(c);
    }
    if (c->dead)
        conn_free(c);
}

static void idle_cb(evutil_socket_t fd, short what, void *arg)
{
    struct h2_conn *c = arg;
    (void)fd;
    (void)what;
    if (c->closing) { /* the linger time ran out */
        conn_free(c);
        return;
    }
    if (c->nstreams > 0)
        return;
    conn_goaway(c, NGHTTP2_NO_ERROR, "idle");
    conn_flush(c);
    if (c->dead)
        conn_free(c);
}

/* A header block must complete in time; while it is incomplete nothing else
 * can move on the connection, so the whole connection goes. */
static void hdr_cb(evutil_socket_t fd, short what, void *arg)
{
    struct h2_conn *c = arg;
    (void)fd;
    (void)what;
    c->hdr_stream = 0;
    pn_log_debug("h2 %s:%u: header block timeout", c->base.peer.ip, c->base.peer.port);
    conn_goaway(c, NGHTTP2_CANCEL, "header timeout");
    conn_flush(c);
    if (c->dead)
        conn_free(c);
}

/* A REST body stopped arriving for the idle timeout, or what was dropped
 * after an early answer (bytes that do not re-arm the timer) went on that
 * long: an unanswered request is reset (CANCEL), an answered one gets
 * RST_STREAM(NO_ERROR) once its answer is out. Either way a peer cannot
 * hold a stream, and with it the connection, by trickling a body. */
static void body_cb(evutil_socket_t fd, short what, void *arg)
{
    struct pn__h2_stream *s = arg;
    struct h2_conn *c = s->conn;
    (void)fd;
    (void)what;
    if (c->dead || c->closing || s->rst_sent)
        return;
    pn_log_debug("h2 %s:%u: stream %d: request body stalled", c->base.peer.ip, c->base.peer.port,
                 s->id);
    s->stop_upload = true;
    if (!s->answered) {
        s->rst_sent = true;
        nghttp2_submit_rst_stream(c->ng, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_CANCEL);
    } else {
        stream_maybe_stop_upload(c, s);
    }
    conn_pump(c);
    if (c->dead)
        conn_free(c);
}

static void h2_shutdown(struct pn_conn *base)
{
    struct h2_conn *c = (struct h2_conn *)base;
    if (c->draining || c->closing || c->dead)
        return;
    c->draining = true;
    nghttp2_submit_shutdown_notice(c->ng);
    nghttp2_submit_ping(c->ng, NGHTTP2_FLAG_NONE, h2_drain_ping);
    conn_flush(c);
}

static void h2_destroy(struct pn_conn *base)
{
    struct h2_conn *c = (struct h2_conn *)base;
    if (c->freeing)
        return;
    if (c->depth > 0)
        conn_kill(c);
    else
        conn_free(c);
}

static const struct pn_conn_ops h2_conn_ops = {
    .shutdown = h2_shutdown,
    .destroy = h2_destroy,
};

static nghttp2_session *new_session(struct h2_conn *c)
{
    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    nghttp2_session *ng = NULL;
    if (nghttp2_session_callbacks_new(&cbs) != 0 || nghttp2_option_new(&opt) != 0) {
        fprintf(stderr, "proxynode: out of memory (nghttp2)\n");
        abort();
    }
    nghttp2_session_callbacks_set_send_callback(cbs, send_cb);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers_cb);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header_cb);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv_cb);
    nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, on_invalid_frame_recv_cb);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk_recv_cb);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close_cb);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send_cb);
    nghttp2_session_callbacks_set_error_callback2(cbs, on_error_cb);
    /* grpc-go keepalive defaults allow a ping every 5 min without streams;
     * nghttp2 answers pings itself and bounds queued acks on its own. */
    int rv = nghttp2_session_server_new2(&ng, cbs, c, opt);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_option_del(opt);
    if (rv != 0) {
        fprintf(stderr, "proxynode: nghttp2_session_server_new2: %s\n", nghttp2_strerror(rv));
        abort();
    }
    return ng;
}

struct pn_conn *pn_h2_conn_new(struct bufferevent *bev, const struct pn_http_server *srv,
                               const struct pn_peer *peer, struct pn_conn_set *set)
{
    struct h2_conn *c = pn_new(struct h2_conn);
    c->base.ops = &h2_conn_ops;
    if (peer)
        c->base.peer = *peer;
    else
        c->base.peer.alpn = "";
    c->srv = srv;
    c->bev = bev;
    c->ng = new_session(c);
    struct event_base *base = bufferevent_get_base(bev);
    c->idle_ev = evtimer_new(base, idle_cb, c);
    c->hdr_ev = evtimer_new(base, hdr_cb, c);
    c->kick_ev = event_new(base, -1, 0, kick_cb, c);
    if (!c->idle_ev || !c->hdr_ev || !c->kick_ev) {
        fprintf(stderr, "proxynode: out of memory (event)\n");
        abort();
    }

    /* The client's preface is in; our SETTINGS may go now. */
    nghttp2_settings_entry iv[3] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, H2_MAX_STREAMS},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, H2_STREAM_WINDOW},
    };
    size_t niv = 2;
    if (srv->max_header)
        iv[niv++] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE,
                                             (uint32_t)srv->max_header};
    nghttp2_submit_settings(c->ng, NGHTTP2_FLAG_NONE, iv, niv);
    nghttp2_session_set_local_window_size(c->ng, NGHTTP2_FLAG_NONE, 0, H2_CONN_WINDOW);

    pn_conn_link(&c->base, set);
    /* our timers and watermarks replace whatever the listener used while
     * it sniffed the preface */
    bufferevent_set_timeouts(bev, NULL, NULL);
    bufferevent_setcb(bev, read_cb, write_cb, event_cb, c);
    bufferevent_setwatermark(bev, EV_READ, 0, 0);
    bufferevent_setwatermark(bev, EV_WRITE, H2_OUT_LOW, 0);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    conn_arm_idle(c);

    /* The preface bytes already read by the listener are processed now; a
     * close decided here is carried out by the kick event, since the caller
     * holds the pointer we return. */
    conn_read(c);
    conn_pump(c);
    return &c->base;
}
