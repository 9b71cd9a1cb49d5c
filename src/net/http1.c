/* HTTP/1.1 server connections (see http1.h). A connection owns its
 * bufferevent, one http-parser, the request being parsed and the request
 * being answered, and two events: a timer (idle, slow header block, stalled
 * body, stalled flush) and a deferred event that runs work and frees the
 * connection outside library callbacks.
 *
 * Requests are answered one at a time and in order: the parser pauses at the
 * end of each request, and the bytes of pipelined requests wait in the input
 * buffer until the answer is complete. A connection that ends with
 * `Connection: close` flushes its answer and hands the socket to the shared
 * lingering close (pn_net_linger_close: FIN, then reading for a short
 * while), so a peer still sending does not get a reset that would destroy
 * the answer in flight. A WebSocket upgrade takes the connection away
 * (h1_take_over): the bufferevent goes to ws.c, the rest is freed. */
#include "net/http1.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <http_parser.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/err.h"
#include "base/log.h"
#include "base/time.h"

#define H1_WRITABLE_MARK (64 * 1024)   /* on_writable fires under this */
#define H1_READ_AHEAD (256 * 1024)     /* input kept while an answer is pending */
#define H1_BODY_PREALLOC (1024 * 1024) /* trust a Content-Length this far */
/* Lingering close: until EOF, 2 s or 4 MiB. The listener's handshake-failure
 * drain stops at 64 KiB; here a client may be in the middle of writing a big
 * body piece when its 413 goes out, and closing on unread data would reset
 * the connection and could destroy the answer. */
#define H1_LINGER_MAX (4 * 1024 * 1024)

/* Where a connection is. Timers and input handling follow from it. */
enum h1_phase {
    H1_IDLE,    /* between requests: idle timeout */
    H1_HEADERS, /* a request started, header block incomplete: header timeout */
    H1_BODY,    /* reading a body: idle timeout re-armed on every read */
    H1_HANDLER, /* a request is with the handler (or streaming): no timeout */
    H1_CLOSING, /* flushing the last answer, input discarded */
    H1_DEAD,    /* freed by the deferred event */
};

struct h1_hdr {
    char *name;
    size_t nlen;
    char *value;
    size_t vlen;
};

struct h1_conn;

struct h1_req {
    struct pn_req req; /* first: handlers hold &req */
    struct h1_conn *conn;
    char *url;
    size_t url_len;
    struct h1_hdr *raw;
    size_t nraw, rawcap;
    bool in_value; /* the last header callback was a value */
    struct pn_http_header *hdrs;
    char *path, *query;
    struct pn_buf body;
    bool headers_done;
    bool head;       /* HEAD: answers carry no body */
    bool keep_alive; /* the peer allows another request after this one */
    bool http10;     /* HTTP/1.0 peer: no chunked encoding */
    bool has_body;   /* chunked, or a Content-Length above 0 */
    bool expect_100; /* `Expect: 100-continue` with a body */
    bool streaming;  /* stream_start was called */
    bool chunked;    /* the stream is chunk-encoded */
    bool aborted;    /* on_close fired; answers are dropped */
};

struct h1_conn {
    struct pn_conn base; /* first: the listener's set holds &base */
    const struct pn_http_server *srv;
    struct bufferevent *bev;
    struct event *timer;
    struct event *defer;
    http_parser parser;
    enum h1_phase phase;
    struct h1_req *cur;    /* being parsed */
    struct h1_req *active; /* with the handler */
    const char *exec_base; /* start of the bytes given to http_parser_execute */
    size_t hdr_bytes;      /* header-block bytes from earlier execute calls */
    uint64_t hdr_start_ms; /* first byte of the current request */
    int err_status;        /* 413/431 decided inside a parser callback */
    int depth;             /* > 0 while our code is on the stack */
    bool in_process;       /* h1_process is running */
    bool message_done;     /* the parser paused at the end of a request */
    bool head_done;        /* the parser paused after a head for srv->on_head */
    bool close_after;      /* the current answer is the last one */
    bool peer_eof;         /* the peer sent FIN */
    bool want_writable;    /* on_writable owed, to be fired from the deferred event */
};

static const struct pn_req_ops h1_req_ops;

/* ---- small helpers ------------------------------------------------------ */

static void h1_append(char **s, size_t *len, const char *at, size_t n)
{
    *s = pn_realloc(*s, *len + n + 1);
    memcpy(*s + *len, at, n);
    *len += n;
    (*s)[*len] = '\0';
}

static struct h1_req *h1_req_new(struct h1_conn *c)
{
    struct h1_req *r = pn_new(struct h1_req);
    r->conn = c;
    pn_buf_init(&r->body, c->srv->max_body);
    r->req.method = "";
    r->req.path = "";
    r->req.query = "";
    r->req.body = (const uint8_t *)"";
    r->req.http_version = 11;
    r->req.peer = &c->base.peer;
    r->req.srv = c->srv;
    r->req.ops = &h1_req_ops;
    r->req.transport = r;
    return r;
}

static void h1_req_free(struct h1_req *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->nraw; i++) {
        free(r->raw[i].name);
        free(r->raw[i].value);
    }
    free(r->raw);
    free(r->hdrs);
    free(r->url);
    free(r->path);
    free(r->query);
    pn_buf_free(&r->body);
    free(r);
}

/* Fills the pn_req fields handlers read from what the parser collected.
 * With the header block incomplete (an error answer), method, path and
 * headers stay empty. Called for the head (srv->on_head) and again with the
 * body. */
static void h1_req_finalize(struct h1_req *r, const http_parser *p)
{
    if (!r->headers_done)
        return;
    if (r->hdrs) /* the head was shown to srv->on_head: only the body is new */
        goto body;
    r->req.method = http_method_str((enum http_method)p->method);
    const char *url = r->url ? r->url : "";
    size_t plen, qoff = 0, qlen = 0;
    if (url[0] == '/' || url[0] == '*' || url[0] == '\0') {
        plen = strcspn(url, "?#");
        if (url[plen] == '?') {
            qoff = plen + 1;
            qlen = strcspn(url + qoff, "#");
        }
        r->path = pn_strndup(url, plen);
    } else {
        /* absolute-form (a proxy-style request line): keep path and query */
        struct http_parser_url u;
        http_parser_url_init(&u);
        if (http_parser_parse_url(url, r->url_len, p->method == HTTP_CONNECT, &u) == 0 &&
            (u.field_set & (1 << UF_PATH))) {
            r->path = pn_strndup(url + u.field_data[UF_PATH].off, u.field_data[UF_PATH].len);
        } else {
            r->path = pn_strdup("/");
        }
        if (u.field_set & (1 << UF_QUERY)) {
            qoff = u.field_data[UF_QUERY].off;
            qlen = u.field_data[UF_QUERY].len;
        }
    }
    r->query = pn_strndup(url + qoff, qlen);
    r->req.path = r->path;
    r->req.query = r->query;

    r->hdrs = pn_calloc(r->nraw ? r->nraw : 1, sizeof *r->hdrs);
    for (size_t i = 0; i < r->nraw; i++) {
        for (char *s = r->raw[i].name; s && *s; s++)
            if (*s >= 'A' && *s <= 'Z')
                *s = (char)(*s - 'A' + 'a');
        r->hdrs[i].name = r->raw[i].name ? r->raw[i].name : "";
        r->hdrs[i].value = r->raw[i].value ? r->raw[i].value : "";
    }
    r->req.headers = r->hdrs;
    r->req.nheaders = r->nraw;
body:
    if (r->body.len)
        r->req.body = r->body.data;
    r->req.body_len = r->body.len;
}

static bool h1_hdr_is(const struct h1_hdr *h, const char *name)
{
    return h->name && strcasecmp(h->name, name) == 0;
}

static void h1_arm_ms(struct h1_conn *c, unsigned ms)
{
    if (!ms) {
        evtimer_del(c->timer);
        return;
    }
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(c->timer, &tv);
}

/* Sets the one timer to what the phase calls for (see enum h1_phase). */
static void h1_arm_timer(struct h1_conn *c)
{
    const struct pn_http_server *srv = c->srv;
    switch (c->phase) {
    case H1_IDLE:
    case H1_BODY:
    case H1_CLOSING:
        h1_arm_ms(c, srv->idle_timeout_ms);
        break;
    case H1_HEADERS: {
        if (!srv->header_timeout_ms) {
            h1_arm_ms(c, 0);
            break;
        }
        uint64_t spent = pn_now_ms() - c->hdr_start_ms;
        uint64_t left = spent >= srv->header_timeout_ms ? 1 : srv->header_timeout_ms - spent;
        h1_arm_ms(c, (unsigned)left);
        break;
    }
    case H1_HANDLER:
    case H1_DEAD:
        h1_arm_ms(c, 0);
        break;
    }
}

static void h1_schedule(struct h1_conn *c)
{
    event_active(c->defer, EV_TIMEOUT, 1);
}

/* ---- closing ------------------------------------------------------------ */

/* Ends a request the handler never answered: on_close, then free. */
static void h1_abort_active(struct h1_conn *c)
{
    struct h1_req *r = c->active;
    if (!r)
        return;
    c->active = NULL;
    r->aborted = true;
    r->conn = NULL;
    if (r->req.on_close) {
        c->depth++;
        r->req.on_close(&r->req, r->req.cb_arg);
        c->depth--;
    }
    h1_req_free(r);
}

static void h1_free(struct h1_conn *c)
{
    h1_abort_active(c);
    h1_req_free(c->cur);
    if (c->bev)
        bufferevent_free(c->bev);
    event_free(c->timer);
    event_free(c->defer);
    pn_conn_unlink(&c->base);
    free(c);
}

/* Closes at once without answering; the memory goes in the deferred event
 * so that no caller up the stack holds a freed connection. */
static void h1_kill(struct h1_conn *c)
{
    if (c->phase == H1_DEAD)
        return;
    c->phase = H1_DEAD;
    h1_abort_active(c);
    if (c->bev) {
        bufferevent_disable(c->bev, EV_READ | EV_WRITE);
        bufferevent_setcb(c->bev, NULL, NULL, NULL, NULL);
    }
    evtimer_del(c->timer);
    h1_schedule(c);
}

/* After the last answer: stop parsing, let the output drain (the deferred
 * event or the write callback notices), then linger. */
static void h1_close_after_flush(struct h1_conn *c)
{
    c->phase = H1_CLOSING;
    evbuffer_drain(bufferevent_get_input(c->bev),
                   evbuffer_get_length(bufferevent_get_input(c->bev)));
    h1_arm_timer(c);
    h1_schedule(c);
}

/* The answer is out: hand the socket to the lingering close (close_notify,
 * FIN, then reading and dropping what the peer still sends until EOF, 2 s or
 * 4 MiB), so the close does not turn into a reset that could destroy the
 * answer before the peer read it. After the peer's FIN, close now. */
static void h1_linger_start(struct h1_conn *c)
{
    if (!c->peer_eof) {
        pn_net_linger_close(c->bev, c->base.set, H1_LINGER_MAX);
        c->bev = NULL;
    }
    h1_kill(c);
}

/* ---- answers ------------------------------------------------------------ */

static bool h1_hop_by_hop(const char *name)
{
    return strcasecmp(name, "content-length") == 0 || strcasecmp(name, "transfer-encoding") == 0 ||
           strcasecmp(name, "connection") == 0;
}

static bool h1_safe(const char *s)
{
    return strpbrk(s, "\r\n") == NULL;
}

/* Writes the status line and header block. len < 0: no Content-Length. */
static void h1_write_head(struct h1_conn *c, struct h1_req *r, int status,
                          const struct pn_http_header *hdrs, size_t nhdrs, long long len,
                          bool chunked)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    evbuffer_add_printf(out, "HTTP/1.1 %d %s\r\n", status, pn_http_reason(status));
    char date[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    evbuffer_add_printf(out, "Date: %s\r\n", date);
    for (size_t i = 0; i < nhdrs; i++) {
        if (h1_hop_by_hop(hdrs[i].name) || !h1_safe(hdrs[i].name) || !h1_safe(hdrs[i].value))
            continue;
        evbuffer_add_printf(out, "%s: %s\r\n", hdrs[i].name, hdrs[i].value);
    }
    if (len >= 0)
        evbuffer_add_printf(out, "Content-Length: %lld\r\n", len);
    if (chunked)
        evbuffer_add(out, "Transfer-Encoding: chunked\r\n", 28);
    if (c->close_after)
        evbuffer_add(out, "Connection: close\r\n", 19);
    else if (r->http10)
        evbuffer_add(out, "Connection: keep-alive\r\n", 24);
    evbuffer_add(out, "\r\n", 2);
}

/* The request is answered: free it and go on with the next one (from the
 * deferred event unless the parsing loop is running) or close. */
static void h1_req_done(struct h1_conn *c, struct h1_req *r)
{
    c->active = NULL;
    h1_req_free(r);
    if (c->phase == H1_DEAD)
        return;
    if (c->close_after || c->peer_eof) {
        h1_close_after_flush(c);
        return;
    }
    c->phase = H1_IDLE;
    h1_arm_timer(c);
    if (!c->in_process)
        h1_schedule(c);
}

/* Checks that r may still be answered; PN_ERR_CLOSED when its connection
 * is gone, PN_ERR_STATE when it is not the request being answered. */
static int h1_check(const struct pn_req *req, struct h1_conn **out)
{
    const struct h1_req *r = req->transport;
    if (r->aborted || !r->conn || r->conn->phase == H1_DEAD)
        return PN_ERR_CLOSED;
    if (r->conn->active != r)
        return PN_ERR_STATE;
    *out = r->conn;
    return PN_OK;
}

static void h1_decide_close(struct h1_conn *c, struct h1_req *r)
{
    if (!r->keep_alive)
        c->close_after = true;
}

static bool h1_status_has_body(int status)
{
    return !(status < 200 || status == 204 || status == 304);
}

static int h1_respond(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                      size_t nhdrs, const void *body, size_t len)
{
    struct h1_conn *c;
    int rv = h1_check(req, &c);
    if (rv < 0)
        return rv;
    struct h1_req *r = req->transport;
    if (r->streaming)
        return PN_ERR_STATE;
    h1_decide_close(c, r);
    bool has_body = h1_status_has_body(status);
    h1_write_head(c, r, status, hdrs, nhdrs, has_body ? (long long)len : -1, false);
    if (has_body && !r->head && len)
        evbuffer_add(bufferevent_get_output(c->bev), body, len);
    h1_req_done(c, r);
    return PN_OK;
}

static int h1_stream_start(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                           size_t nhdrs)
{
    struct h1_conn *c;
    int rv = h1_check(req, &c);
    if (rv < 0)
        return rv;
    struct h1_req *r = req->transport;
    if (r->streaming)
        return PN_ERR_STATE;
    h1_decide_close(c, r);
    /* HTTP/1.0 has no chunked encoding: the end of the body is the close. */
    if (r->http10)
        c->close_after = true;
    r->streaming = true;
    r->chunked = !r->http10 && !r->head && h1_status_has_body(status);
    h1_write_head(c, r, status, hdrs, nhdrs, -1, !r->http10 && h1_status_has_body(status));
    return PN_OK;
}

static int h1_stream_write(struct pn_req *req, const void *data, size_t len)
{
    struct h1_conn *c;
    int rv = h1_check(req, &c);
    if (rv < 0)
        return rv;
    struct h1_req *r = req->transport;
    if (!r->streaming)
        return PN_ERR_STATE;
    if (!len || r->head)
        return PN_OK; /* an empty chunk would end the body */
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (r->chunked)
        evbuffer_add_printf(out, "%zx\r\n", len);
    evbuffer_add(out, data, len);
    if (r->chunked)
        evbuffer_add(out, "\r\n", 2);
    return PN_OK;
}

static int h1_stream_end(struct pn_req *req)
{
    struct h1_conn *c;
    int rv = h1_check(req, &c);
    if (rv < 0)
        return rv;
    struct h1_req *r = req->transport;
    if (!r->streaming)
        return PN_ERR_STATE;
    if (r->chunked)
        evbuffer_add(bufferevent_get_output(c->bev), "0\r\n\r\n", 5);
    h1_req_done(c, r);
    return PN_OK;
}

static size_t h1_stream_pending(const struct pn_req *req)
{
    struct h1_conn *c;
    if (h1_check(req, &c) < 0)
        return 0;
    return evbuffer_get_length(bufferevent_get_output(c->bev));
}

/* Gives the connection to a WebSocket (pn_req_take_over): only for the
 * request being handled, before any answer was started, and while the peer
 * has not sent FIN. The bufferevent leaves with its callbacks, timeouts and
 * watermarks cleared and its input kept (bytes after the request head are
 * the new protocol's), after whatever earlier answers are still flushing;
 * the request and the connection are freed (now, or from the deferred event
 * when our code is on the stack). */
static struct bufferevent *h1_take_over(struct pn_req *req, struct pn_conn_set **set)
{
    struct h1_conn *c;
    if (h1_check(req, &c) < 0)
        return NULL;
    struct h1_req *r = req->transport;
    if (r->streaming || c->phase != H1_HANDLER || c->peer_eof || !c->bev)
        return NULL;
    struct bufferevent *bev = c->bev;
    c->bev = NULL;
    bufferevent_setcb(bev, NULL, NULL, NULL, NULL);
    bufferevent_set_timeouts(bev, NULL, NULL);
    bufferevent_setwatermark(bev, EV_READ | EV_WRITE, 0, 0);
    if (set)
        *set = c->base.set;
    pn_conn_unlink(&c->base);
    c->active = NULL;
    h1_req_free(r);
    if (c->depth > 0) {
        h1_kill(c);
    } else {
        c->phase = H1_DEAD;
        h1_free(c);
    }
    return bev;
}

static const struct pn_req_ops h1_req_ops = {
    .respond = h1_respond,
    .stream_start = h1_stream_start,
    .stream_write = h1_stream_write,
    .stream_end = h1_stream_end,
    .stream_pending = h1_stream_pending,
    .take_over = h1_take_over,
};

/* ---- requests to the handler -------------------------------------------- */

/* Hands the request to the API layer. It may answer before this returns. */
static void h1_dispatch(struct h1_conn *c, struct h1_req *r)
{
    c->active = r;
    c->phase = H1_HANDLER;
    h1_arm_timer(c);
    c->depth++;
    if (c->srv->on_request)
        c->srv->on_request(&r->req, c->srv->arg);
    else
        pn_req_respond_text(&r->req, 404, "404 page not found");
    c->depth--;
}

/* A client waiting for `100 Continue` before its body may send it now. */
static void h1_continue(struct h1_conn *c, const struct h1_req *r)
{
    if (r->expect_100)
        evbuffer_add(bufferevent_get_output(c->bev), "HTTP/1.1 100 Continue\r\n\r\n", 25);
}

/* Shows the head of a request with a body to srv->on_head before the body
 * is read. Returns false when it answered (a refusal): the connection then
 * closes after the answer, dropping the body. Otherwise the request goes
 * back to the parser, and a client expecting 100-continue gets it now. */
static bool h1_admit(struct h1_conn *c)
{
    struct h1_req *r = c->cur;
    bool close_after = c->close_after;
    h1_req_finalize(r, &c->parser);
    c->cur = NULL;
    c->active = r;
    c->phase = H1_HANDLER;
    c->close_after = true; /* the body is never read if it answers */
    c->depth++;
    c->srv->on_head(&r->req, c->srv->arg);
    c->depth--;
    if (!c->active) /* answered (r is freed), or the connection died */
        return false;
    c->active = NULL;
    c->cur = r;
    c->phase = H1_BODY;
    c->close_after = close_after;
    h1_continue(c, r);
    return true;
}

/* Answers a request the transport refused (400, 413, 431) and closes after
 * it. The request may be partial; method and path are then "". */
static void h1_fail(struct h1_conn *c, int status, const char *text)
{
    struct h1_req *r = c->cur ? c->cur : h1_req_new(c);
    c->cur = NULL;
    h1_req_finalize(r, &c->parser);
    c->close_after = true;
    c->active = r;
    c->phase = H1_HANDLER;
    h1_arm_timer(c);
    c->depth++;
    if (c->srv->respond_error)
        c->srv->respond_error(&r->req, status, text);
    else
        pn_req_respond_text(&r->req, status, text);
    c->depth--;
}

/* ---- parsing ------------------------------------------------------------ */

static struct h1_conn *h1_of(http_parser *p)
{
    return p->data;
}

/* Header-block bytes so far, counting up to `end` in the current buffer. */
static bool h1_header_over(struct h1_conn *c, const char *end)
{
    size_t used = c->hdr_bytes + (size_t)(end - c->exec_base);
    if (c->srv->max_header && used > c->srv->max_header) {
        c->err_status = 431;
        return true;
    }
    return false;
}

static int h1_on_message_begin(http_parser *p)
{
    struct h1_conn *c = h1_of(p);
    h1_req_free(c->cur);
    c->cur = h1_req_new(c);
    c->hdr_bytes = 0;
    c->hdr_start_ms = pn_now_ms();
    c->phase = H1_HEADERS;
    return 0;
}

static int h1_on_url(http_parser *p, const char *at, size_t len)
{
    struct h1_conn *c = h1_of(p);
    if (h1_header_over(c, at + len))
        return -1;
    h1_append(&c->cur->url, &c->cur->url_len, at, len);
    return 0;
}

static int h1_on_header_field(http_parser *p, const char *at, size_t len)
{
    struct h1_conn *c = h1_of(p);
    struct h1_req *r = c->cur;
    if (h1_header_over(c, at + len))
        return -1;
    if (r->nraw == 0 || r->in_value) {
        if (r->nraw == r->rawcap) {
            r->rawcap = r->rawcap ? r->rawcap * 2 : 16;
            r->raw = pn_realloc(r->raw, r->rawcap * sizeof *r->raw);
        }
        memset(&r->raw[r->nraw++], 0, sizeof *r->raw);
        r->in_value = false;
    }
    struct h1_hdr *h = &r->raw[r->nraw - 1];
    h1_append(&h->name, &h->nlen, at, len);
    return 0;
}

static int h1_on_header_value(http_parser *p, const char *at, size_t len)
{
    struct h1_conn *c = h1_of(p);
    struct h1_req *r = c->cur;
    if (h1_header_over(c, at + len))
        return -1;
    r->in_value = true;
    struct h1_hdr *h = &r->raw[r->nraw - 1];
    h1_append(&h->value, &h->vlen, at, len);
    return 0;
}

/* The header block is complete: limits that are known now, then the head
 * check (srv->on_head) or 100-continue. */
static int h1_on_headers_complete(http_parser *p)
{
    struct h1_conn *c = h1_of(p);
    struct h1_req *r = c->cur;
    r->headers_done = true;
    r->head = p->method == HTTP_HEAD;
    r->http10 = p->http_major == 1 && p->http_minor == 0;
    r->req.http_version = r->http10 ? 10 : 11;
    c->phase = H1_BODY;
    size_t max = c->srv->max_body;
    bool chunked = p->flags & F_CHUNKED;
    bool has_len = p->flags & F_CONTENTLENGTH;
    if (has_len && max && p->content_length > max) {
        c->err_status = 413;
        return -1;
    }
    if (has_len && p->content_length)
        pn_buf_reserve(&r->body, p->content_length < H1_BODY_PREALLOC ? (size_t)p->content_length
                                                                      : H1_BODY_PREALLOC);
    r->has_body = chunked || (has_len && p->content_length);
    for (size_t i = 0; r->has_body && !r->http10 && i < r->nraw; i++)
        if (h1_hdr_is(&r->raw[i], "expect") && r->raw[i].value &&
            strcasecmp(r->raw[i].value, "100-continue") == 0)
            r->expect_100 = true;
    if (r->has_body && c->srv->on_head) {
        /* h1_process shows the head to srv->on_head, then goes on */
        c->head_done = true;
        http_parser_pause(p, 1);
        return 0;
    }
    h1_continue(c, r);
    return 0;
}

static int h1_on_chunk_header(http_parser *p)
{
    struct h1_conn *c = h1_of(p);
    size_t max = c->srv->max_body;
    if (max && (p->content_length > max || c->cur->body.len > max - p->content_length)) {
        c->err_status = 413;
        return -1;
    }
    return 0;
}

static int h1_on_body(http_parser *p, const char *at, size_t len)
{
    struct h1_conn *c = h1_of(p);
    if (pn_buf_append(&c->cur->body, at, len) < 0) {
        c->err_status = 413;
        return -1;
    }
    return 0;
}

static int h1_on_message_complete(http_parser *p)
{
    struct h1_conn *c = h1_of(p);
    c->cur->keep_alive = http_should_keep_alive(p) && !p->upgrade;
    c->message_done = true;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings h1_settings = {
    .on_message_begin = h1_on_message_begin,
    .on_url = h1_on_url,
    .on_header_field = h1_on_header_field,
    .on_header_value = h1_on_header_value,
    .on_headers_complete = h1_on_headers_complete,
    .on_body = h1_on_body,
    .on_message_complete = h1_on_message_complete,
    .on_chunk_header = h1_on_chunk_header,
};

static bool h1_parsing(const struct h1_conn *c)
{
    return c->phase == H1_IDLE || c->phase == H1_HEADERS || c->phase == H1_BODY;
}

/* Feeds buffered input to the parser and hands out each complete request,
 * one at a time; stops while a request waits for its answer. */
static void h1_process(struct h1_conn *c)
{
    if (c->in_process)
        return;
    c->in_process = true;
    c->depth++;
    while (h1_parsing(c)) {
        struct evbuffer *in = bufferevent_get_input(c->bev);
        if (evbuffer_get_length(in) == 0)
            break;
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1 || v.iov_len == 0)
            break;
        c->exec_base = v.iov_base;
        c->err_status = 0;
        c->message_done = false;
        size_t n = http_parser_execute(&c->parser, &h1_settings, v.iov_base, v.iov_len);
        enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
        evbuffer_drain(in, n);
        if (e == HPE_PAUSED && c->head_done) {
            c->head_done = false;
            http_parser_pause(&c->parser, 0);
            if (!h1_admit(c))
                break;
            continue;
        }
        if (e == HPE_PAUSED && c->message_done) {
            http_parser_pause(&c->parser, 0);
            struct h1_req *r = c->cur;
            c->cur = NULL;
            if (c->parser.upgrade)
                c->close_after = true; /* the rest is another protocol */
            h1_req_finalize(r, &c->parser);
            h1_dispatch(c, r);
            continue;
        }
        if (e != HPE_OK) {
            if (c->err_status == 413)
                h1_fail(c, 413, "request body too large");
            else if (c->err_status == 431 || e == HPE_HEADER_OVERFLOW)
                h1_fail(c, 431, "request header fields too large");
            else
                h1_fail(c, 400, "bad request");
            break;
        }
        if (c->phase == H1_HEADERS) {
            c->hdr_bytes += n;
            if (c->srv->max_header && c->hdr_bytes > c->srv->max_header) {
                h1_fail(c, 431, "request header fields too large");
                break;
            }
        }
    }
    if (c->peer_eof && (c->phase == H1_HEADERS || c->phase == H1_BODY))
        h1_kill(c); /* a request cut short: nobody to answer */
    else if (c->peer_eof && c->phase == H1_IDLE)
        h1_close_after_flush(c);
    else
        h1_arm_timer(c);
    c->depth--;
    c->in_process = false;
}

/* ---- libevent callbacks ------------------------------------------------- */

static void h1_fire_writable(struct h1_conn *c)
{
    struct h1_req *r = c->active;
    if (!r || !r->streaming || !r->req.on_writable)
        return;
    if (evbuffer_get_length(bufferevent_get_output(c->bev)) >= H1_WRITABLE_MARK)
        return;
    c->depth++;
    r->req.on_writable(&r->req, r->req.cb_arg);
    c->depth--;
}

static void h1_read_cb(struct bufferevent *bev, void *arg)
{
    struct h1_conn *c = arg;
    if (c->phase == H1_CLOSING) {
        struct evbuffer *in = bufferevent_get_input(bev);
        evbuffer_drain(in, evbuffer_get_length(in));
        return;
    }
    if (h1_parsing(c))
        h1_process(c);
    /* H1_HANDLER: pipelined bytes wait in the input (bounded by the watermark) */
}

static void h1_write_cb(struct bufferevent *bev, void *arg)
{
    struct h1_conn *c = arg;
    if (c->phase == H1_CLOSING) {
        if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
            h1_schedule(c);
        return;
    }
    if (c->phase != H1_HANDLER)
        return;
    if (c->depth > 0) {
        /* called back from inside our own write (a bufferevent pair) */
        c->want_writable = true;
        h1_schedule(c);
        return;
    }
    h1_fire_writable(c);
}

static void h1_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct h1_conn *c = arg;
    if (what == BEV_EVENT_CONNECTED)
        return;
    if (!(what & BEV_EVENT_EOF) || (what & (BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT))) {
        h1_kill(c);
        return;
    }
    c->peer_eof = true;
    switch (c->phase) {
    case H1_IDLE:
        if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
            h1_kill(c);
        else
            h1_close_after_flush(c);
        break;
    case H1_CLOSING:
        break; /* keep flushing; no lingering after the peer's FIN */
    default:
        h1_kill(c); /* an unanswered request gets its on_close */
        break;
    }
}

static void h1_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct h1_conn *c = arg;
    if (c->phase == H1_HEADERS)
        pn_log_debug("http1 %s:%u: header block not complete in %u ms", c->base.peer.ip,
                     c->base.peer.port, c->srv->header_timeout_ms);
    h1_kill(c);
}

/* Work that must not run inside a library callback: freeing, going on with
 * pipelined requests after an asynchronous answer, closing after the flush. */
static void h1_defer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct h1_conn *c = arg;
    if (c->phase == H1_DEAD) {
        h1_free(c);
        return;
    }
    if (c->want_writable) {
        c->want_writable = false;
        h1_fire_writable(c);
    }
    if (c->phase == H1_CLOSING && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
        h1_linger_start(c);
    else if (h1_parsing(c))
        h1_process(c);
}

/* ---- connection operations ---------------------------------------------- */

static void h1_shutdown(struct pn_conn *base)
{
    struct h1_conn *c = (struct h1_conn *)base;
    switch (c->phase) {
    case H1_IDLE:
        if (evbuffer_get_length(bufferevent_get_input(c->bev)) > 0)
            c->close_after = true; /* a pipelined request waits: answer it last */
        else if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            h1_kill(c);
        else
            h1_close_after_flush(c);
        break;
    case H1_HEADERS:
    case H1_BODY:
    case H1_HANDLER:
        c->close_after = true;
        break;
    case H1_CLOSING:
    case H1_DEAD:
        break;
    }
}

static void h1_destroy(struct pn_conn *base)
{
    struct h1_conn *c = (struct h1_conn *)base;
    if (c->depth > 0) {
        h1_kill(c);
        return;
    }
    c->phase = H1_DEAD;
    h1_free(c);
}

static const struct pn_conn_ops h1_conn_ops = {
    .shutdown = h1_shutdown,
    .destroy = h1_destroy,
};

struct pn_conn *pn_http1_conn_new(struct bufferevent *bev, const struct pn_http_server *srv,
                                  const struct pn_peer *peer, struct pn_conn_set *set)
{
    struct h1_conn *c = pn_new(struct h1_conn);
    c->base.ops = &h1_conn_ops;
    c->base.peer = *peer;
    c->srv = srv;
    c->bev = bev;
    c->phase = H1_IDLE;
    c->timer = evtimer_new(srv->base, h1_timer_cb, c);
    c->defer = event_new(srv->base, -1, 0, h1_defer_cb, c);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    pn_conn_link(&c->base, set);

    bufferevent_setcb(bev, h1_read_cb, h1_write_cb, h1_event_cb, c);
    bufferevent_setwatermark(bev, EV_READ, 0, H1_READ_AHEAD);
    bufferevent_setwatermark(bev, EV_WRITE, H1_WRITABLE_MARK - 1, 0);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    h1_process(c);
    return &c->base;
}
