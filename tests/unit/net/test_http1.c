/* HTTP/1.1 server connection tests: a real connection over a socketpair (or
 * a bufferevent pair) driven by a client bufferevent on a test event_base.
 * Responses are decoded with http-parser (HTTP_RESPONSE). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <http_parser.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "base/err.h"
#include "base/time.h"
#include "net/http1.h"

enum mode {
    M_ECHO,       /* answers at once with what it saw */
    M_ASYNC,      /* answers from a timer */
    M_STREAM,     /* chunked answer in three writes, two of them from a timer */
    M_BIGSTREAM,  /* 1 MiB streamed under back-pressure */
    M_HOLD,       /* never answers; counts on_close */
    M_TAKE,       /* /ws: takes the connection over at once; others: echo */
    M_TAKE_LATER, /* takes the connection over from a timer */
};

#define BIG_TOTAL (1024 * 1024)
#define BIG_PIECE (16 * 1024)

struct fx {
    struct event_base *base;
    struct event *tick;
    struct pn_http_server srv;
    struct pn_conn_set set;
    struct bufferevent *cli;
    struct evbuffer *got;
    bool cli_eof;
    enum mode mode;
    int nreq;
    int nclose;
    int nerror;
    int last_error_status;
    char last_error_text[64];
    bool overlap; /* a request came while another was unanswered */
    struct pn_req *held;
    struct event *async_ev;
    int stream_step;
    size_t streamed;
    size_t max_pending;
    int writable_calls;
    char peer_ip[64];
    int http_version;
    struct event *drip; /* slow client */
    int drip_left;
    struct bufferevent *taken; /* what pn_req_take_over returned */
    struct pn_conn_set *taken_set;
    int ntaken;
};

struct resp {
    int status;
    char hdrs[2048]; /* "name: value\n", names lower-cased */
    char *body;
    size_t blen;
    bool done;
};

struct rparse {
    struct resp *r;
    int max, n;
};

/* ---- the handler ---------------------------------------------------------- */

static void echo_answer(struct fx *f, struct pn_req *req)
{
    const char *v = "";
    for (size_t i = 0; i < req->nheaders; i++)
        if (strcmp(req->headers[i].name, "x-test") == 0) /* names arrive lower-cased */
            v = req->headers[i].value;
    char out[4096];
    int n = snprintf(out, sizeof out, "%s %s q=%s v=%s b=%.*s", req->method, req->path, req->query,
                     v, (int)req->body_len, (const char *)req->body);
    static const struct pn_http_header h[] = {{"Content-Type", "text/plain"}};
    assert_int_equal(pn_req_respond(req, 200, h, 1, out, (size_t)n), PN_OK);
    (void)f;
}

static void on_req_close(struct pn_req *req, void *arg)
{
    struct fx *f = arg;
    f->nclose++;
    if (f->held == req)
        f->held = NULL;
}

static void big_fill(struct fx *f, struct pn_req *req)
{
    static char piece[BIG_PIECE];
    memset(piece, 'z', sizeof piece);
    while (f->streamed < BIG_TOTAL && pn_req_stream_pending(req) < 64 * 1024) {
        assert_int_equal(pn_req_stream_write(req, piece, sizeof piece), PN_OK);
        f->streamed += sizeof piece;
        size_t p = pn_req_stream_pending(req);
        if (p > f->max_pending)
            f->max_pending = p;
    }
    if (f->streamed >= BIG_TOTAL) {
        f->held = NULL;
        assert_int_equal(pn_req_stream_end(req), PN_OK);
    }
}

static void on_req_writable(struct pn_req *req, void *arg)
{
    struct fx *f = arg;
    f->writable_calls++;
    if (f->held == req)
        big_fill(f, req);
}

static void async_fire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct fx *f = arg;
    struct pn_req *req = f->held;
    if (!req)
        return;
    if (f->mode == M_ASYNC) {
        f->held = NULL;
        echo_answer(f, req);
        return;
    }
    if (f->mode == M_TAKE_LATER) {
        f->held = NULL;
        f->taken = pn_req_take_over(req, &f->taken_set);
        assert_non_null(f->taken);
        f->ntaken++;
        return;
    }
    /* M_STREAM: second and third writes, then the end */
    assert_int_equal(pn_req_stream_write(req, "two", 3), PN_OK);
    assert_int_equal(pn_req_stream_write(req, "", 0), PN_OK); /* no early 0-chunk */
    assert_int_equal(pn_req_stream_write(req, "three", 5), PN_OK);
    f->held = NULL;
    assert_int_equal(pn_req_stream_end(req), PN_OK);
}

static void arm_async(struct fx *f, int ms)
{
    struct timeval tv = {0, ms * 1000};
    evtimer_add(f->async_ev, &tv);
}

static void on_request(struct pn_req *req, void *arg)
{
    struct fx *f = arg;
    f->nreq++;
    if (f->held)
        f->overlap = true;
    snprintf(f->peer_ip, sizeof f->peer_ip, "%s", req->peer->ip);
    f->http_version = req->http_version;
    switch (f->mode) {
    case M_ECHO:
        echo_answer(f, req);
        break;
    case M_ASYNC:
        f->held = req;
        pn_req_set_callbacks(req, on_req_close, NULL, f);
        arm_async(f, 20);
        break;
    case M_STREAM: {
        static const struct pn_http_header h[] = {{"Content-Type", "text/event-stream"}};
        f->held = req;
        pn_req_set_callbacks(req, on_req_close, NULL, f);
        assert_int_equal(pn_req_stream_start(req, 200, h, 1), PN_OK);
        assert_int_equal(pn_req_stream_write(req, "one", 3), PN_OK);
        arm_async(f, 20);
        break;
    }
    case M_BIGSTREAM:
        f->held = req;
        f->streamed = 0;
        pn_req_set_callbacks(req, on_req_close, on_req_writable, f);
        assert_int_equal(pn_req_stream_start(req, 200, NULL, 0), PN_OK);
        big_fill(f, req);
        break;
    case M_HOLD:
        f->held = req;
        pn_req_set_callbacks(req, on_req_close, NULL, f);
        break;
    case M_TAKE:
        if (strcmp(req->path, "/ws") != 0) {
            echo_answer(f, req);
            break;
        }
        f->taken = pn_req_take_over(req, &f->taken_set);
        assert_non_null(f->taken);
        f->ntaken++;
        break;
    case M_TAKE_LATER:
        f->held = req;
        pn_req_set_callbacks(req, on_req_close, NULL, f);
        arm_async(f, 20);
        break;
    }
}

static void custom_error(struct pn_req *req, int status, const char *text)
{
    struct fx *f = (struct fx *)req->srv->arg;
    f->nerror++;
    f->last_error_status = status;
    snprintf(f->last_error_text, sizeof f->last_error_text, "%s", text);
    pn_req_respond_text(req, status, "custom");
}

/* ---- the client ------------------------------------------------------------ */

static void cli_read(struct bufferevent *bev, void *arg)
{
    struct fx *f = arg;
    evbuffer_add_buffer(f->got, bufferevent_get_input(bev));
}

static void cli_event(struct bufferevent *bev, short what, void *arg)
{
    struct fx *f = arg;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        evbuffer_add_buffer(f->got, bufferevent_get_input(bev));
        f->cli_eof = true;
    }
}

static void noop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

static struct fx *fx_new(enum mode mode)
{
    struct fx *f = calloc(1, sizeof *f);
    f->base = event_base_new();
    f->tick = event_new(f->base, -1, EV_PERSIST, noop, NULL);
    struct timeval tv = {0, 5000};
    event_add(f->tick, &tv);
    f->async_ev = evtimer_new(f->base, async_fire, f);
    f->got = evbuffer_new();
    f->mode = mode;
    f->srv.base = f->base;
    f->srv.on_request = on_request;
    f->srv.arg = f;
    f->srv.max_body = 1 << 20;
    f->srv.max_header = 8192;
    f->srv.idle_timeout_ms = 5000;
    f->srv.header_timeout_ms = 5000;
    return f;
}

/* Opens the connection; done separately so tests can change srv first. */
static void fx_connect(struct fx *f, bool use_pair)
{
    struct bufferevent *sb;
    if (use_pair) {
        struct bufferevent *pair[2];
        assert_int_equal(bufferevent_pair_new(f->base, BEV_OPT_CLOSE_ON_FREE, pair), 0);
        sb = pair[0];
        f->cli = pair[1];
    } else {
        int fds[2];
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
        evutil_make_socket_nonblocking(fds[0]);
        evutil_make_socket_nonblocking(fds[1]);
        sb = bufferevent_socket_new(f->base, fds[0], BEV_OPT_CLOSE_ON_FREE);
        f->cli = bufferevent_socket_new(f->base, fds[1], BEV_OPT_CLOSE_ON_FREE);
    }
    bufferevent_setcb(f->cli, cli_read, NULL, cli_event, f);
    bufferevent_enable(f->cli, EV_READ | EV_WRITE);
    struct pn_peer peer = {.ip = "127.0.0.1", .port = 40000, .alpn = "http/1.1"};
    struct pn_conn *c = pn_http1_conn_new(sb, &f->srv, &peer, &f->set);
    assert_non_null(c);
    assert_int_equal(f->set.count, 1);
}

static void fx_free(struct fx *f)
{
    if (f->taken)
        bufferevent_free(f->taken);
    if (f->cli)
        bufferevent_free(f->cli);
    while (f->set.head)
        f->set.head->ops->destroy(f->set.head);
    if (f->drip)
        event_free(f->drip);
    event_free(f->async_ev);
    event_free(f->tick);
    evbuffer_free(f->got);
    event_base_free(f->base);
    free(f);
}

static void send_str(struct fx *f, const char *s)
{
    bufferevent_write(f->cli, s, strlen(s));
}

static void close_client(struct fx *f)
{
    bufferevent_free(f->cli);
    f->cli = NULL;
}

typedef bool (*pred_fn)(struct fx *f, int arg);

/* Runs the loop until pred holds or ms pass; returns whether it held. */
static bool run_until(struct fx *f, pred_fn pred, int arg, int ms)
{
    uint64_t end = pn_now_ms() + (uint64_t)ms;
    while (!pred(f, arg)) {
        if (pn_now_ms() >= end)
            return false;
        event_base_loop(f->base, EVLOOP_ONCE);
    }
    return true;
}

/* ---- response decoding ------------------------------------------------------ */

static int rp_begin(http_parser *p)
{
    struct rparse *rp = p->data;
    if (rp->n >= rp->max)
        return -1;
    memset(&rp->r[rp->n++], 0, sizeof rp->r[0]);
    return 0;
}

static int rp_field(http_parser *p, const char *at, size_t len)
{
    struct rparse *rp = p->data;
    struct resp *r = &rp->r[rp->n - 1];
    size_t o = strlen(r->hdrs);
    for (size_t i = 0; i < len && o + 3 < sizeof r->hdrs; i++)
        r->hdrs[o++] = (char)((at[i] >= 'A' && at[i] <= 'Z') ? at[i] - 'A' + 'a' : at[i]);
    if (o + 3 < sizeof r->hdrs) {
        r->hdrs[o++] = ':';
        r->hdrs[o++] = ' ';
    }
    r->hdrs[o] = '\0';
    return 0;
}

static int rp_value(http_parser *p, const char *at, size_t len)
{
    struct rparse *rp = p->data;
    struct resp *r = &rp->r[rp->n - 1];
    size_t o = strlen(r->hdrs);
    snprintf(r->hdrs + o, sizeof r->hdrs - o, "%.*s\n", (int)len, at);
    return 0;
}

static int rp_body(http_parser *p, const char *at, size_t len)
{
    struct rparse *rp = p->data;
    struct resp *r = &rp->r[rp->n - 1];
    r->body = realloc(r->body, r->blen + len + 1);
    memcpy(r->body + r->blen, at, len);
    r->blen += len;
    r->body[r->blen] = '\0';
    return 0;
}

static int rp_done(http_parser *p)
{
    struct rparse *rp = p->data;
    struct resp *r = &rp->r[rp->n - 1];
    r->status = (int)p->status_code;
    r->done = true;
    if (!r->body)
        r->body = calloc(1, 1);
    return 0;
}

/* Decodes what the client got so far; returns the number of complete
 * responses (1xx ones included). */
static int responses(struct fx *f, struct resp *out, int max)
{
    http_parser_settings s;
    http_parser_settings_init(&s);
    s.on_message_begin = rp_begin;
    s.on_header_field = rp_field;
    s.on_header_value = rp_value;
    s.on_body = rp_body;
    s.on_message_complete = rp_done;
    memset(out, 0, sizeof *out * (size_t)max);
    struct rparse rp = {out, max, 0};
    http_parser p;
    http_parser_init(&p, HTTP_RESPONSE);
    p.data = &rp;
    size_t len = evbuffer_get_length(f->got);
    const char *data = (const char *)evbuffer_pullup(f->got, -1);
    http_parser_execute(&p, &s, data ? data : "", len);
    int done = 0;
    for (int i = 0; i < rp.n; i++)
        if (out[i].done)
            done++;
    return done;
}

static void resp_free(struct resp *r, int n)
{
    for (int i = 0; i < n; i++) {
        free(r[i].body);
        r[i].body = NULL;
    }
}

static bool has_responses(struct fx *f, int n)
{
    struct resp r[8];
    int got = responses(f, r, 8);
    resp_free(r, 8);
    return got >= n;
}

static bool is_eof(struct fx *f, int unused)
{
    (void)unused;
    return f->cli_eof;
}

static bool conns_gone(struct fx *f, int unused)
{
    (void)unused;
    return f->set.count == 0;
}

static bool nreq_is(struct fx *f, int n)
{
    return f->nreq >= n;
}

static bool got_contains_100(struct fx *f, int unused)
{
    (void)unused;
    size_t len = evbuffer_get_length(f->got);
    const char *d = (const char *)evbuffer_pullup(f->got, -1);
    return d && memmem(d, len, "100 Continue\r\n\r\n", 16) != NULL;
}

static bool has_resp_pred(struct fx *f, int n)
{
    return has_responses(f, n);
}

/* Collects exactly n responses (within 2 s) into r. */
static void want_responses(struct fx *f, struct resp *r, int n)
{
    assert_true(run_until(f, has_resp_pred, n, 2000));
    assert_int_equal(responses(f, r, n), n);
}

/* ---- tests -------------------------------------------------------------------- */

static void test_simple_get(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "GET /a/b?x=1&y=2#frag HTTP/1.1\r\nHost: h\r\nX-Test: hello\r\n\r\n");
    struct resp r[1];
    want_responses(f, r, 1);
    assert_int_equal(r[0].status, 200);
    assert_string_equal(r[0].body, "GET /a/b q=x=1&y=2 v=hello b=");
    assert_non_null(strstr(r[0].hdrs, "content-length: 29\n"));
    assert_non_null(strstr(r[0].hdrs, "content-type: text/plain\n"));
    assert_non_null(strstr(r[0].hdrs, "date: "));
    assert_null(strstr(r[0].hdrs, "connection:"));
    assert_string_equal(f->peer_ip, "127.0.0.1");
    assert_int_equal(f->http_version, 11);
    assert_false(f->cli_eof);
    assert_int_equal(f->set.count, 1);
    resp_free(r, 1);
    fx_free(f);
}

static void test_get_with_body(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "GET /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    struct resp r[1];
    want_responses(f, r, 1);
    assert_string_equal(r[0].body, "GET /p q= v= b=hello");
    resp_free(r, 1);
    fx_free(f);
}

static void test_chunked_body(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                "3;name=val\r\nabc\r\n4\r\ndefg\r\n1;x\r\nh\r\n0\r\n\r\n");
    struct resp r[1];
    want_responses(f, r, 1);
    assert_string_equal(r[0].body, "PUT /c q= v= b=abcdefgh");
    resp_free(r, 1);
    fx_free(f);
}

static void test_split_one_byte_at_a_time(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    const char *req =
        "POST /slow?k=v HTTP/1.1\r\nX-Test: split\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        "GET /two HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz";
    for (const char *p = req; *p; p++) {
        bufferevent_write(f->cli, p, 1);
        event_base_loop(f->base, EVLOOP_NONBLOCK);
        event_base_loop(f->base, EVLOOP_NONBLOCK);
    }
    struct resp r[2];
    want_responses(f, r, 2);
    assert_string_equal(r[0].body, "POST /slow q=k=v v=split b=hello world");
    assert_string_equal(r[1].body, "GET /two q= v= b=xyz");
    resp_free(r, 2);
    fx_free(f);
}

static void test_pipelined_sync(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /3 "
                "HTTP/1.1\r\n\r\n");
    struct resp r[3];
    want_responses(f, r, 3);
    assert_string_equal(r[0].body, "GET /1 q= v= b=");
    assert_string_equal(r[1].body, "POST /2 q= v= b=hi");
    assert_string_equal(r[2].body, "GET /3 q= v= b=");
    resp_free(r, 3);
    fx_free(f);
}

static void test_pipelined_async_in_order(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ASYNC);
    fx_connect(f, false);
    send_str(f, "GET /first HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n");
    struct resp r[2];
    want_responses(f, r, 2);
    assert_string_equal(r[0].body, "GET /first q= v= b=");
    assert_string_equal(r[1].body, "GET /second q= v= b=");
    assert_false(f->overlap); /* the second waited for the first answer */
    assert_int_equal(f->nclose, 0);
    resp_free(r, 2);
    fx_free(f);
}

static void test_keepalive_second_request(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "GET /one HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, has_resp_pred, 1, 2000));
    send_str(f, "GET /two HTTP/1.1\r\nConnection: keep-alive\r\n\r\n");
    struct resp r[2];
    want_responses(f, r, 2);
    assert_string_equal(r[1].body, "GET /two q= v= b=");
    assert_int_equal(f->nreq, 2);
    assert_int_equal(f->set.count, 1);
    assert_false(f->cli_eof);
    resp_free(r, 2);
    fx_free(f);
}

static void test_http10_closes(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "GET /old HTTP/1.0\r\n\r\n");
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    assert_string_equal(r[0].body, "GET /old q= v= b=");
    assert_non_null(strstr(r[0].hdrs, "connection: close\n"));
    resp_free(r, 1);
    /* the server lingers until the client closes too */
    close_client(f);
    assert_true(run_until(f, conns_gone, 0, 1000));
    fx_free(f);
}

static void test_http10_keepalive(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    struct resp r[1];
    want_responses(f, r, 1);
    assert_non_null(strstr(r[0].hdrs, "connection: keep-alive\n"));
    assert_false(f->cli_eof);
    resp_free(r, 1);
    fx_free(f);
}

static void check_error(struct resp *r, int status, const char *body)
{
    assert_int_equal(r->status, status);
    assert_string_equal(r->body, body);
    assert_non_null(strstr(r->hdrs, "content-type: text/plain; charset=utf-8\n"));
    assert_non_null(strstr(r->hdrs, "x-content-type-options: nosniff\n"));
    assert_non_null(strstr(r->hdrs, "connection: close\n"));
}

static void test_header_too_large(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.max_header = 1024;
    fx_connect(f, false);
    char big[2100];
    memset(big, 'a', 2000);
    big[2000] = '\0';
    char req[2200];
    snprintf(req, sizeof req, "GET / HTTP/1.1\r\nX-Big: %s\r\n\r\n", big);
    send_str(f, req);
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    check_error(&r[0], 431, "request header fields too large\n");
    assert_int_equal(f->nreq, 0);
    resp_free(r, 1);
    fx_free(f);
}

static void test_header_too_large_across_reads(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.max_header = 1024;
    fx_connect(f, false);
    send_str(f, "GET / HTTP/1.1\r\n");
    for (int i = 0; i < 40 && !f->cli_eof; i++) {
        send_str(f, "X-Filler: 0123456789012345678901234567890123456789\r\n");
        event_base_loop(f->base, EVLOOP_NONBLOCK);
        event_base_loop(f->base, EVLOOP_NONBLOCK);
    }
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    check_error(&r[0], 431, "request header fields too large\n");
    resp_free(r, 1);
    fx_free(f);
}

static void test_body_too_large_content_length(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.max_body = 100;
    fx_connect(f, false);
    /* rejected from the header alone: no body byte is sent */
    send_str(f, "POST /big HTTP/1.1\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n");
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    check_error(&r[0], 413, "request body too large\n");
    assert_int_equal(f->nreq, 0);
    resp_free(r, 1);
    fx_free(f);
}

static void test_body_too_large_chunked(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.max_body = 100;
    fx_connect(f, false);
    char c60[61];
    memset(c60, 'c', 60);
    c60[60] = '\0';
    char req[512];
    snprintf(req, sizeof req,
             "POST /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3c\r\n%s\r\n3c\r\n%s\r\n",
             c60, c60);
    send_str(f, req);
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    check_error(&r[0], 413, "request body too large\n");
    assert_int_equal(f->nreq, 0);
    resp_free(r, 1);
    fx_free(f);
}

static void test_garbage_400(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "\x16\x03\x01 not http at all\r\n\r\n");
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    check_error(&r[0], 400, "bad request\n");
    resp_free(r, 1);
    close_client(f);
    assert_true(run_until(f, conns_gone, 0, 1000));
    fx_free(f);
}

static void test_bad_request_after_good_one(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "GET /ok HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\nBad Header\r\n\r\n");
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[2];
    assert_int_equal(responses(f, r, 2), 2);
    assert_int_equal(r[0].status, 200);
    check_error(&r[1], 400, "bad request\n");
    resp_free(r, 2);
    fx_free(f);
}

static void test_respond_error_hook(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.respond_error = custom_error;
    f->srv.max_body = 10;
    fx_connect(f, false);
    send_str(f, "POST /x HTTP/1.1\r\nContent-Length: 11\r\n\r\n");
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    assert_int_equal(r[0].status, 413);
    assert_string_equal(r[0].body, "custom\n");
    assert_int_equal(f->nerror, 1);
    assert_int_equal(f->last_error_status, 413);
    assert_string_equal(f->last_error_text, "request body too large");
    resp_free(r, 1);
    fx_free(f);
}

static void test_expect_continue(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "PUT /e HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    assert_true(run_until(f, got_contains_100, 0, 2000));
    assert_int_equal(f->nreq, 0);
    send_str(f, "hello");
    struct resp r[2];
    want_responses(f, r, 2);
    assert_int_equal(r[0].status, 100);
    assert_int_equal(r[1].status, 200);
    assert_string_equal(r[1].body, "PUT /e q= v= b=hello");
    resp_free(r, 2);
    fx_free(f);
}

/* on_head for the tests below: refuses heads whose path is /deny (the
 * API's missing-key answer), lets the others through to on_request. */
static int nhead;
static void head_check(struct pn_req *req, void *arg)
{
    (void)arg;
    nhead++;
    assert_int_equal(req->body_len, 0);
    if (strcmp(req->path, "/deny") == 0)
        assert_int_equal(pn_req_respond_text(req, 401, "missing x-api-key"), PN_OK);
}

/* A refused head is answered before the body arrives (a peer trickling it
 * holds nothing), no 100 Continue goes out, and the connection closes. */
static void test_head_refused_before_body(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.on_head = head_check;
    nhead = 0;
    fx_connect(f, false);
    send_str(f, "PUT /deny HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhe");
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[2];
    assert_int_equal(responses(f, r, 2), 1);
    assert_int_equal(r[0].status, 401);
    assert_string_equal(r[0].body, "missing x-api-key\n");
    assert_non_null(strstr(r[0].hdrs, "connection: close\n"));
    assert_int_equal(nhead, 1);
    assert_int_equal(f->nreq, 0);
    resp_free(r, 1);
    fx_free(f);
}

/* An admitted head goes on: 100 Continue after the check, the body, then
 * on_request; requests without a body skip the check; keep-alive holds. */
static void test_head_admitted(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.on_head = head_check;
    nhead = 0;
    fx_connect(f, false);
    send_str(f, "PUT /e HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    assert_true(run_until(f, got_contains_100, 0, 2000));
    assert_int_equal(nhead, 1);
    send_str(f, "hello");
    send_str(f, "GET /deny HTTP/1.1\r\n\r\n");
    send_str(f, "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    struct resp r[4];
    want_responses(f, r, 4);
    assert_int_equal(r[0].status, 100);
    assert_string_equal(r[1].body, "PUT /e q= v= b=hello");
    assert_string_equal(r[2].body, "GET /deny q= v= b=");
    assert_string_equal(r[3].body, "POST /c q= v= b=abc");
    assert_int_equal(nhead, 2);
    assert_false(f->cli_eof);
    resp_free(r, 4);
    fx_free(f);
}

static bool got_two_status_lines(struct fx *f, int unused)
{
    (void)unused;
    size_t len = evbuffer_get_length(f->got);
    const char *d = (const char *)evbuffer_pullup(f->got, -1);
    if (!d)
        return false;
    const char *a = memmem(d, len, "HTTP/1.1 200", 12);
    return a && memmem(a + 1, len - (size_t)(a + 1 - d), "b=", 2);
}

static void test_head_has_no_body(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    send_str(f, "HEAD /h HTTP/1.1\r\n\r\nGET /g HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, got_two_status_lines, 0, 2000));
    size_t len = evbuffer_get_length(f->got);
    char *d = calloc(1, len + 1);
    evbuffer_copyout(f->got, d, len);
    char *end = strstr(d, "\r\n\r\n");
    assert_non_null(end);
    assert_non_null(strstr(d, "Content-Length: 16\r\n")); /* as the GET would have */
    assert_memory_equal(end + 4, "HTTP/1.1 200 OK\r\n", 17);
    assert_non_null(strstr(end, "GET /g q= v= b="));
    free(d);
    fx_free(f);
}

static void test_async_answer(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ASYNC);
    fx_connect(f, false);
    send_str(f, "GET /later HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, nreq_is, 1, 2000));
    assert_int_equal(evbuffer_get_length(f->got), 0);
    struct resp r[1];
    want_responses(f, r, 1);
    assert_string_equal(r[0].body, "GET /later q= v= b=");
    resp_free(r, 1);
    fx_free(f);
}

static void test_stream_three_writes(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_STREAM);
    fx_connect(f, false);
    send_str(f, "GET /logs HTTP/1.1\r\n\r\n");
    struct resp r[1];
    want_responses(f, r, 1);
    assert_int_equal(r[0].status, 200);
    assert_string_equal(r[0].body, "onetwothree");
    assert_non_null(strstr(r[0].hdrs, "transfer-encoding: chunked\n"));
    assert_non_null(strstr(r[0].hdrs, "content-type: text/event-stream\n"));
    assert_null(strstr(r[0].hdrs, "content-length"));
    resp_free(r, 1);
    /* the connection stays usable after the stream */
    f->mode = M_ECHO;
    send_str(f, "GET /next HTTP/1.1\r\n\r\n");
    struct resp r2[2];
    want_responses(f, r2, 2);
    assert_string_equal(r2[1].body, "GET /next q= v= b=");
    resp_free(r2, 2);
    fx_free(f);
}

static bool big_done(struct fx *f, int unused)
{
    (void)unused;
    /* decode only once the final 0-chunk may be there */
    size_t len = evbuffer_get_length(f->got);
    char tail[5];
    if (len < 5)
        return false;
    struct evbuffer_ptr pos;
    evbuffer_ptr_set(f->got, &pos, len - 5, EVBUFFER_PTR_SET);
    evbuffer_copyout_from(f->got, &pos, tail, 5);
    if (memcmp(tail, "0\r\n\r\n", 5) != 0)
        return false;
    struct resp r[1];
    int n = responses(f, r, 1);
    bool ok = n == 1;
    resp_free(r, 1);
    return ok;
}

static void test_stream_backpressure(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_BIGSTREAM);
    fx_connect(f, false);
    send_str(f, "GET /big HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, big_done, 0, 5000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    assert_int_equal(r[0].blen, BIG_TOTAL);
    assert_true(f->max_pending >= 64 * 1024);
    assert_true(f->writable_calls > 0);
    resp_free(r, 1);
    fx_free(f);
}

static void test_peer_closes_before_answer(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_HOLD);
    fx_connect(f, false);
    send_str(f, "GET /never HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, nreq_is, 1, 2000));
    close_client(f);
    assert_true(run_until(f, conns_gone, 0, 2000));
    assert_int_equal(f->nclose, 1);
    assert_null(f->held);
    fx_free(f);
    /* fx_free destroyed nothing more, so on_close fired exactly once */
}

static void test_destroy_fires_on_close(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_HOLD);
    fx_connect(f, false);
    send_str(f, "GET /never HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, nreq_is, 1, 2000));
    f->set.head->ops->destroy(f->set.head);
    assert_int_equal(f->set.count, 0);
    assert_int_equal(f->nclose, 1);
    assert_true(run_until(f, is_eof, 0, 2000));
    fx_free(f);
    /* no second on_close */
}

static void test_shutdown_idle_and_busy(void **state)
{
    (void)state;
    /* idle: closes at once */
    struct fx *f = fx_new(M_ECHO);
    fx_connect(f, false);
    f->set.head->ops->shutdown(f->set.head);
    assert_true(run_until(f, is_eof, 0, 2000));
    assert_true(run_until(f, conns_gone, 0, 2000));
    fx_free(f);

    /* a request being answered: answered with Connection: close, then closed */
    f = fx_new(M_ASYNC);
    fx_connect(f, false);
    send_str(f, "GET /busy HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, nreq_is, 1, 2000));
    f->set.head->ops->shutdown(f->set.head);
    assert_true(run_until(f, is_eof, 0, 2000));
    struct resp r[1];
    assert_int_equal(responses(f, r, 1), 1);
    assert_string_equal(r[0].body, "GET /busy q= v= b=");
    assert_non_null(strstr(r[0].hdrs, "connection: close\n"));
    resp_free(r, 1);
    fx_free(f);
}

static void test_idle_timeout(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.idle_timeout_ms = 100;
    fx_connect(f, false);
    send_str(f, "GET / HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, has_resp_pred, 1, 2000));
    uint64_t t0 = pn_now_ms();
    assert_true(run_until(f, is_eof, 0, 2000));
    uint64_t dt = pn_now_ms() - t0;
    assert_true(dt >= 80);
    assert_true(dt < 1000);
    assert_true(run_until(f, conns_gone, 0, 1000));
    fx_free(f);
}

static void test_no_idle_timeout_while_answering(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_HOLD);
    f->srv.idle_timeout_ms = 50;
    fx_connect(f, false);
    send_str(f, "GET /slow-handler HTTP/1.1\r\n\r\n");
    assert_true(run_until(f, nreq_is, 1, 2000));
    assert_false(run_until(f, is_eof, 0, 300));
    assert_non_null(f->held);
    assert_int_equal(pn_req_respond_text(f->held, 200, "late"), PN_OK);
    f->held = NULL;
    struct resp r[1];
    want_responses(f, r, 1);
    assert_string_equal(r[0].body, "late\n");
    resp_free(r, 1);
    /* idle again: the timeout applies once more */
    assert_true(run_until(f, is_eof, 0, 2000));
    assert_int_equal(f->nclose, 0);
    fx_free(f);
}

static void drip_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct fx *f = arg;
    if (f->drip_left-- > 0 && f->cli)
        send_str(f, "X: y\r\n");
    else
        event_del(f->drip);
}

static void test_header_timeout_slow_client(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.header_timeout_ms = 150;
    f->srv.idle_timeout_ms = 5000;
    fx_connect(f, false);
    send_str(f, "GET / HTTP/1.1\r\n");
    f->drip = event_new(f->base, -1, EV_PERSIST, drip_cb, f);
    f->drip_left = 100;
    struct timeval tv = {0, 30000};
    event_add(f->drip, &tv);
    uint64_t t0 = pn_now_ms();
    assert_true(run_until(f, is_eof, 0, 2000));
    uint64_t dt = pn_now_ms() - t0;
    assert_true(dt >= 130);
    assert_true(dt < 1000);
    assert_int_equal(evbuffer_get_length(f->got), 0);
    assert_int_equal(f->nreq, 0);
    assert_true(run_until(f, conns_gone, 0, 1000));
    fx_free(f);
}

static void test_body_stall_times_out(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ECHO);
    f->srv.idle_timeout_ms = 120;
    fx_connect(f, false);
    send_str(f, "POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
    uint64_t t0 = pn_now_ms();
    assert_true(run_until(f, is_eof, 0, 2000));
    assert_true(pn_now_ms() - t0 >= 100);
    assert_int_equal(f->nreq, 0);
    assert_int_equal(evbuffer_get_length(f->got), 0);
    fx_free(f);
}

static void test_over_bufferevent_pair(void **state)
{
    (void)state;
    /* A pair runs callbacks synchronously inside writes: re-entrancy check. */
    struct fx *f = fx_new(M_STREAM);
    fx_connect(f, true);
    send_str(f, "GET /s HTTP/1.1\r\n\r\n");
    struct resp r[1];
    want_responses(f, r, 1);
    assert_string_equal(r[0].body, "onetwothree");
    resp_free(r, 1);
    f->mode = M_ECHO;
    send_str(f, "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.0\r\n\r\n");
    struct resp r2[3];
    want_responses(f, r2, 3);
    assert_string_equal(r2[1].body, "GET /a q= v= b=");
    assert_string_equal(r2[2].body, "GET /b q= v= b=");
    assert_non_null(strstr(r2[2].hdrs, "connection: close\n"));
    resp_free(r2, 3);
    /* no socket to linger on: the server side goes at once */
    assert_true(run_until(f, conns_gone, 0, 1000));
    fx_free(f);
}

static bool taken_pred(struct fx *f, int unused)
{
    (void)unused;
    return f->ntaken > 0;
}

static bool got_raw_tail(struct fx *f, int unused)
{
    (void)unused;
    size_t len = evbuffer_get_length(f->got);
    const char *d = (const char *)evbuffer_pullup(f->got, -1);
    return d && memmem(d, len, "raw from the new owner", 22);
}

/* After take-over: the bufferevent keeps the bytes after the request head,
 * carries the new owner's bytes after the earlier answer, and the HTTP
 * connection is gone from the set without closing the socket. */
static void check_taken(struct fx *f)
{
    assert_non_null(f->taken);
    assert_ptr_equal(f->taken_set, &f->set);
    struct evbuffer *in = bufferevent_get_input(f->taken);
    size_t n = evbuffer_get_length(in);
    assert_int_equal(n, 9);
    assert_memory_equal(evbuffer_pullup(in, -1), "\x81\x03\x61\x62\x63\x88\x02\x03\xe8", 9);
    assert_true(run_until(f, conns_gone, 0, 1000));
    bufferevent_write(f->taken, "raw from the new owner", 22);
    assert_true(run_until(f, got_raw_tail, 0, 2000));
    assert_false(f->cli_eof);
    assert_int_equal(f->nclose, 0);
}

static const char upgrade_req[] = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n"
                                  "Connection: Upgrade\r\n\r\n"
                                  "\x81\x03\x61\x62\x63\x88\x02\x03\xe8";

static void test_take_over_in_handler(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_TAKE);
    fx_connect(f, false);
    char req[256];
    int n = snprintf(req, sizeof req, "GET /before HTTP/1.1\r\n\r\n");
    memcpy(req + n, upgrade_req, sizeof upgrade_req - 1);
    bufferevent_write(f->cli, req, (size_t)n + sizeof upgrade_req - 1);
    assert_true(run_until(f, taken_pred, 0, 2000));
    assert_int_equal(f->nreq, 2);
    check_taken(f);
    /* the earlier answer came first, nothing from HTTP after it */
    size_t len = evbuffer_get_length(f->got);
    char *d = calloc(1, len + 1);
    evbuffer_copyout(f->got, d, len);
    assert_non_null(strstr(d, "GET /before q= v= b="));
    assert_non_null(strstr(d, "GET /before q= v= b=raw from the new owner"));
    assert_int_equal(strstr(d, "HTTP/1.1") - d, 0);
    assert_null(strstr(d + 1, "HTTP/1.1"));
    free(d);
    fx_free(f);
}

static void test_take_over_later(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_TAKE_LATER);
    fx_connect(f, false);
    bufferevent_write(f->cli, upgrade_req, sizeof upgrade_req - 1);
    assert_true(run_until(f, taken_pred, 0, 2000));
    assert_int_equal(f->set.count, 0); /* freed at once: no HTTP code on the stack */
    check_taken(f);
    fx_free(f);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_simple_get),
        cmocka_unit_test(test_get_with_body),
        cmocka_unit_test(test_chunked_body),
        cmocka_unit_test(test_split_one_byte_at_a_time),
        cmocka_unit_test(test_pipelined_sync),
        cmocka_unit_test(test_pipelined_async_in_order),
        cmocka_unit_test(test_keepalive_second_request),
        cmocka_unit_test(test_http10_closes),
        cmocka_unit_test(test_http10_keepalive),
        cmocka_unit_test(test_header_too_large),
        cmocka_unit_test(test_header_too_large_across_reads),
        cmocka_unit_test(test_body_too_large_content_length),
        cmocka_unit_test(test_body_too_large_chunked),
        cmocka_unit_test(test_garbage_400),
        cmocka_unit_test(test_bad_request_after_good_one),
        cmocka_unit_test(test_respond_error_hook),
        cmocka_unit_test(test_expect_continue),
        cmocka_unit_test(test_head_refused_before_body),
        cmocka_unit_test(test_head_admitted),
        cmocka_unit_test(test_head_has_no_body),
        cmocka_unit_test(test_async_answer),
        cmocka_unit_test(test_stream_three_writes),
        cmocka_unit_test(test_stream_backpressure),
        cmocka_unit_test(test_peer_closes_before_answer),
        cmocka_unit_test(test_destroy_fires_on_close),
        cmocka_unit_test(test_shutdown_idle_and_busy),
        cmocka_unit_test(test_idle_timeout),
        cmocka_unit_test(test_no_idle_timeout_while_answering),
        cmocka_unit_test(test_header_timeout_slow_client),
        cmocka_unit_test(test_body_stall_times_out),
        cmocka_unit_test(test_over_bufferevent_pair),
        cmocka_unit_test(test_take_over_in_handler),
        cmocka_unit_test(test_take_over_later),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
