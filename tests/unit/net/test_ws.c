/* WebSocket server tests: a real HTTP/1.1 connection over a socketpair
 * whose handler calls pn_ws_accept, driven by a client bufferevent on the
 * test's event_base. The client side decodes the server's (unmasked)
 * frames itself and sends masked frames. ws.c is included so the ping
 * interval can be shortened. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "../../../src/net/ws.c"
#include "base/time.h"
#include "net/http1.h"

enum mode {
    M_ACCEPT,      /* pn_ws_accept at once */
    M_STREAM_TAKE, /* starts a streamed answer, then tries to take over */
    M_HOLD,        /* holds the request; its on_close tries to take over */
};

static const char rfc_key[] = "dGhlIHNhbXBsZSBub25jZQ==";
static const char rfc_accept[] = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

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
    struct pn_ws *ws;
    int naccept_null;
    int nclose;
    int nwritable;
    int nerror;
    int last_error_status;
    bool take_over_null;
    struct pn_req *held;
};

struct frame {
    int opcode;
    bool fin;
    bool masked;
    const uint8_t *data;
    size_t len;
};

/* ---- the handler ------------------------------------------------------------ */

static void on_ws_close(struct pn_ws *ws, void *arg)
{
    struct fx *f = arg;
    assert_ptr_equal(ws, f->ws);
    f->nclose++;
    f->ws = NULL;
}

static void on_ws_writable(struct pn_ws *ws, void *arg)
{
    struct fx *f = arg;
    assert_ptr_equal(ws, f->ws);
    f->nwritable++;
}

static void on_held_close(struct pn_req *req, void *arg)
{
    struct fx *f = arg;
    struct pn_conn_set *set = NULL;
    f->take_over_null = pn_req_take_over(req, &set) == NULL;
    f->held = NULL;
    f->nclose++;
}

static void on_request(struct pn_req *req, void *arg)
{
    struct fx *f = arg;
    static const struct pn_ws_cbs cbs = {on_ws_close, on_ws_writable};
    f->nreq++;
    switch (f->mode) {
    case M_ACCEPT:
        f->ws = pn_ws_accept(req, &cbs, f);
        if (!f->ws)
            f->naccept_null++;
        break;
    case M_STREAM_TAKE: {
        struct pn_conn_set *set = NULL;
        assert_int_equal(pn_req_stream_start(req, 200, NULL, 0), PN_OK);
        f->take_over_null = pn_req_take_over(req, &set) == NULL;
        assert_null(pn_ws_accept(req, &cbs, f)); /* its 400 is refused too */
        assert_int_equal(pn_req_stream_write(req, "still http", 10), PN_OK);
        assert_int_equal(pn_req_stream_end(req), PN_OK);
        break;
    }
    case M_HOLD:
        f->held = req;
        pn_req_set_callbacks(req, on_held_close, NULL, f);
        break;
    }
}

static void custom_error(struct pn_req *req, int status, const char *text)
{
    struct fx *f = (struct fx *)req->srv->arg;
    f->nerror++;
    f->last_error_status = status;
    pn_req_respond_text(req, status, text);
}

/* ---- the client --------------------------------------------------------------- */

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

static void fx_connect(struct fx *f)
{
    int fds[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    evutil_make_socket_nonblocking(fds[0]);
    evutil_make_socket_nonblocking(fds[1]);
    struct bufferevent *sb = bufferevent_socket_new(f->base, fds[0], BEV_OPT_CLOSE_ON_FREE);
    f->cli = bufferevent_socket_new(f->base, fds[1], BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(f->cli, cli_read, NULL, cli_event, f);
    bufferevent_enable(f->cli, EV_READ | EV_WRITE);
    struct pn_peer peer = {.ip = "127.0.0.1", .port = 40001, .alpn = "http/1.1"};
    assert_non_null(pn_http1_conn_new(sb, &f->srv, &peer, &f->set));
}

static void fx_free(struct fx *f)
{
    if (f->cli)
        bufferevent_free(f->cli);
    while (f->set.head)
        f->set.head->ops->destroy(f->set.head);
    event_free(f->tick);
    evbuffer_free(f->got);
    event_base_free(f->base);
    free(f);
    ws_ping_ms = 20000;
}

static void close_client(struct fx *f)
{
    bufferevent_free(f->cli);
    f->cli = NULL;
}

typedef bool (*pred_fn)(struct fx *f, int arg);

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

static void run_for(struct fx *f, int ms)
{
    uint64_t end = pn_now_ms() + (uint64_t)ms;
    while (pn_now_ms() < end)
        event_base_loop(f->base, EVLOOP_ONCE);
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

static bool nclose_is(struct fx *f, int n)
{
    return f->nclose >= n;
}

static bool nwritable_pos(struct fx *f, int unused)
{
    (void)unused;
    return f->nwritable > 0;
}

/* ---- frames --------------------------------------------------------------------- */

static void send_str(struct fx *f, const char *s)
{
    bufferevent_write(f->cli, s, strlen(s));
}

static void send_upgrade(struct fx *f, const char *extra)
{
    char req[1024];
    snprintf(req, sizeof req,
             "GET /logs?session_id=x HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\n"
             "Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: %s\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n%s",
             rfc_key, extra ? extra : "");
    send_str(f, req);
}

/* A client frame (masked unless told otherwise). */
static void send_frame(struct fx *f, int opcode, const void *data, size_t len, bool mask)
{
    uint8_t hdr[14];
    size_t n = 0;
    uint8_t mbit = mask ? 0x80 : 0;
    hdr[n++] = (uint8_t)(0x80 | opcode);
    if (len < 126) {
        hdr[n++] = (uint8_t)(mbit | len);
    } else if (len < 65536) {
        hdr[n++] = mbit | 126;
        hdr[n++] = (uint8_t)(len >> 8);
        hdr[n++] = (uint8_t)len;
    } else {
        hdr[n++] = mbit | 127;
        for (int i = 7; i >= 0; i--)
            hdr[n++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    static const uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};
    if (mask) {
        memcpy(hdr + n, key, 4);
        n += 4;
    }
    bufferevent_write(f->cli, hdr, n);
    uint8_t *p = malloc(len ? len : 1);
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)(((const uint8_t *)data)[i] ^ (mask ? key[i % 4] : 0));
    bufferevent_write(f->cli, p, len);
    free(p);
}

static void send_close(struct fx *f, uint16_t code)
{
    uint8_t b[2] = {(uint8_t)(code >> 8), (uint8_t)code};
    send_frame(f, WSLAY_CONNECTION_CLOSE, b, 2, true);
}

/* Length of the 101 head in what the client got; 0 while incomplete. */
static size_t head_len(struct fx *f)
{
    size_t len = evbuffer_get_length(f->got);
    const char *d = (const char *)evbuffer_pullup(f->got, -1);
    if (!d)
        return 0;
    const char *e = memmem(d, len, "\r\n\r\n", 4);
    return e ? (size_t)(e + 4 - d) : 0;
}

/* Decodes the complete frames after the head (only counts them when out
 * is NULL); returns how many. The data pointers stay valid until f->got
 * changes. */
static int frames(struct fx *f, struct frame *out, int max)
{
    size_t off = head_len(f);
    if (!off)
        return 0;
    size_t len = evbuffer_get_length(f->got);
    const uint8_t *d = evbuffer_pullup(f->got, -1);
    int n = 0;
    while (n < max && len - off >= 2) {
        const uint8_t *p = d + off;
        size_t avail = len - off;
        size_t hl = 2;
        uint64_t plen = p[1] & 0x7f;
        if (plen == 126) {
            if (avail < 4)
                break;
            plen = (uint64_t)p[2] << 8 | p[3];
            hl = 4;
        } else if (plen == 127) {
            if (avail < 10)
                break;
            plen = 0;
            for (int i = 0; i < 8; i++)
                plen = plen << 8 | p[2 + i];
            hl = 10;
        }
        bool masked = p[1] & 0x80;
        if (masked)
            hl += 4;
        if (avail < hl + plen)
            break;
        if (out) {
            out[n].opcode = p[0] & 0x0f;
            out[n].fin = p[0] & 0x80;
            out[n].masked = masked;
            out[n].data = p + hl;
            out[n].len = (size_t)plen;
        }
        n++;
        off += hl + (size_t)plen;
    }
    return n;
}

static bool nframes_is(struct fx *f, int n)
{
    return frames(f, NULL, 1 << 30) >= n;
}

static bool has_head(struct fx *f, int unused)
{
    (void)unused;
    return head_len(f) > 0;
}

static uint16_t close_code(const struct frame *fr)
{
    assert_int_equal(fr->opcode, WSLAY_CONNECTION_CLOSE);
    assert_true(fr->len >= 2);
    return (uint16_t)(fr->data[0] << 8 | fr->data[1]);
}

/* Upgrades and checks the 101. */
static void fx_open(struct fx *f, const char *extra)
{
    fx_connect(f);
    send_upgrade(f, extra);
    assert_true(run_until(f, has_head, 0, 2000));
    assert_non_null(f->ws);
    size_t hl = head_len(f);
    char *head = calloc(1, hl + 1);
    evbuffer_copyout(f->got, head, hl);
    assert_memory_equal(head, "HTTP/1.1 101 Switching Protocols\r\n", 34);
    assert_non_null(strstr(head, "\r\nUpgrade: websocket\r\n"));
    assert_non_null(strstr(head, "\r\nConnection: Upgrade\r\n"));
    char want[64];
    snprintf(want, sizeof want, "\r\nSec-WebSocket-Accept: %s\r\n", rfc_accept);
    assert_non_null(strstr(head, want));
    assert_null(strstr(head, "Sec-WebSocket-Protocol"));
    assert_null(strstr(head, "Sec-WebSocket-Extensions"));
    free(head);
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_accept_key_rfc_example(void **state)
{
    (void)state;
    char out[29];
    pn_ws_accept_key(rfc_key, out);
    assert_string_equal(out, rfc_accept);
}

static void test_upgrade_and_text_frames(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    assert_int_equal(f->set.count, 1); /* the ws replaced the HTTP connection */
    assert_string_equal(pn_ws_peer(f->ws)->ip, "127.0.0.1");
    assert_int_equal(pn_ws_peer(f->ws)->port, 40001);
    assert_int_equal(pn_ws_send_text(f->ws, "hello", 5), PN_OK);
    assert_int_equal(pn_ws_send_text(f->ws, "w\xc3\xb6rld", 6), PN_OK);
    assert_int_equal(pn_ws_send_text(f->ws, "", 0), PN_OK);
    char big[300];
    memset(big, 'b', sizeof big);
    assert_int_equal(pn_ws_send_text(f->ws, big, sizeof big), PN_OK);
    assert_int_equal(pn_ws_send_text(f->ws, "\xff", 1), PN_ERR_INVAL);
    assert_true(run_until(f, nframes_is, 4, 2000));
    struct frame fr[8];
    assert_int_equal(frames(f, fr, 8), 4);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(fr[i].opcode, WSLAY_TEXT_FRAME);
        assert_true(fr[i].fin);
        assert_false(fr[i].masked);
    }
    assert_int_equal(fr[0].len, 5);
    assert_memory_equal(fr[0].data, "hello", 5);
    assert_int_equal(fr[1].len, 6);
    assert_memory_equal(fr[1].data, "w\xc3\xb6rld", 6);
    assert_int_equal(fr[2].len, 0);
    assert_int_equal(fr[3].len, sizeof big);
    assert_memory_equal(fr[3].data, big, sizeof big);
    assert_int_equal(f->nreq, 1);
    assert_int_equal(f->nclose, 0);
    assert_false(f->cli_eof);
    fx_free(f);
}

static void test_client_frames_ignored(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_connect(f);
    /* frames in the same write as the request head belong to the ws */
    send_upgrade(f, NULL);
    send_frame(f, WSLAY_TEXT_FRAME, "ignored", 7, true);
    send_frame(f, WSLAY_PING, "p1", 2, true);
    assert_true(run_until(f, nframes_is, 1, 2000));
    struct frame fr[8];
    assert_int_equal(frames(f, fr, 8), 1);
    assert_int_equal(fr[0].opcode, WSLAY_PONG); /* wslay answers pings */
    assert_int_equal(fr[0].len, 2);
    assert_memory_equal(fr[0].data, "p1", 2);
    assert_int_equal(pn_ws_send_text(f->ws, "a", 1), PN_OK);
    send_frame(f, WSLAY_BINARY_FRAME, "\x01\x02", 2, true);
    send_frame(f, WSLAY_TEXT_FRAME, "more", 4, true);
    run_for(f, 50);
    assert_int_equal(pn_ws_send_text(f->ws, "b", 1), PN_OK);
    assert_true(run_until(f, nframes_is, 3, 2000));
    run_for(f, 50);
    assert_int_equal(frames(f, fr, 8), 3);
    assert_int_equal(fr[1].opcode, WSLAY_TEXT_FRAME);
    assert_memory_equal(fr[1].data, "a", 1);
    assert_int_equal(fr[2].opcode, WSLAY_TEXT_FRAME);
    assert_memory_equal(fr[2].data, "b", 1);
    assert_int_equal(f->nclose, 0);
    assert_non_null(f->ws);
    fx_free(f);
}

static void test_client_close(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    send_close(f, 1000);
    assert_true(run_until(f, nclose_is, 1, 2000));
    assert_true(run_until(f, is_eof, 0, 2000));
    struct frame fr[4];
    assert_int_equal(frames(f, fr, 4), 1);
    assert_int_equal(close_code(&fr[0]), 1000); /* the echo */
    /* the lingering close ends when the client closes too */
    close_client(f);
    assert_true(run_until(f, conns_gone, 0, 1000));
    assert_int_equal(f->nclose, 1);
    fx_free(f);
}

static void test_server_close(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    assert_int_equal(pn_ws_send_text(f->ws, "last", 4), PN_OK);
    uint64_t t0 = pn_now_ms();
    pn_ws_close(f->ws, 1000, "bye");
    assert_int_equal(pn_ws_send_text(f->ws, "late", 4), PN_ERR_CLOSED);
    assert_true(run_until(f, nframes_is, 2, 2000));
    assert_true(pn_now_ms() - t0 < 300);
    struct frame fr[4];
    assert_int_equal(frames(f, fr, 4), 2);
    assert_int_equal(fr[0].opcode, WSLAY_TEXT_FRAME);
    assert_int_equal(close_code(&fr[1]), 1000);
    assert_int_equal(fr[1].len, 5);
    assert_memory_equal(fr[1].data + 2, "bye", 3);
    assert_int_equal(f->nclose, 0);
    send_close(f, 1000);
    assert_true(run_until(f, nclose_is, 1, 2000));
    assert_true(pn_now_ms() - t0 < 500); /* no 1 s wait: the peer answered */
    assert_true(run_until(f, is_eof, 0, 2000));
    close_client(f);
    assert_true(run_until(f, conns_gone, 0, 1000));
    fx_free(f);
}

static void test_server_close_peer_silent(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    uint64_t t0 = pn_now_ms();
    pn_ws_close(f->ws, 4000, NULL);
    assert_true(run_until(f, nframes_is, 1, 2000));
    struct frame fr[2];
    frames(f, fr, 2);
    assert_int_equal(close_code(&fr[0]), 4000);
    assert_true(run_until(f, nclose_is, 1, 3000));
    uint64_t dt = pn_now_ms() - t0;
    assert_true(dt >= 900 && dt < 1500);
    assert_true(run_until(f, is_eof, 0, 1000)); /* FIN right after */
    fx_free(f);
}

static void test_ping_and_timeout(void **state)
{
    (void)state;
    ws_ping_ms = 60;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    assert_true(run_until(f, nframes_is, 1, 1000));
    struct frame fr[8];
    assert_int_equal(frames(f, fr, 8), 1);
    assert_int_equal(fr[0].opcode, WSLAY_PING);
    /* answered pings keep it open */
    send_frame(f, WSLAY_PONG, fr[0].data, fr[0].len, true);
    assert_true(run_until(f, nframes_is, 2, 1000));
    assert_int_equal(frames(f, fr, 8), 2);
    assert_int_equal(fr[1].opcode, WSLAY_PING);
    assert_int_equal(f->nclose, 0);
    /* this one is not: the next tick closes with 1011 */
    assert_true(run_until(f, nframes_is, 3, 1000));
    assert_int_equal(frames(f, fr, 8), 3);
    assert_int_equal(close_code(&fr[2]), 1011);
    send_close(f, 1011);
    assert_true(run_until(f, nclose_is, 1, 2000));
    fx_free(f);
}

static void test_too_big_closes_1009(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    size_t n = 64 * 1024 + 1;
    char *big = malloc(n);
    memset(big, 'x', n);
    send_frame(f, WSLAY_TEXT_FRAME, big, n, true);
    free(big);
    assert_true(run_until(f, nframes_is, 1, 2000));
    struct frame fr[2];
    assert_int_equal(frames(f, fr, 2), 1);
    assert_int_equal(close_code(&fr[0]), 1009);
    assert_true(run_until(f, nclose_is, 1, 2000));
    assert_true(run_until(f, is_eof, 0, 2000));
    fx_free(f);
}

static void test_exactly_64k_is_fine(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    size_t n = 64 * 1024;
    char *big = malloc(n);
    memset(big, 'x', n);
    send_frame(f, WSLAY_TEXT_FRAME, big, n, true);
    free(big);
    run_for(f, 100);
    assert_int_equal(frames(f, NULL, 100), 0);
    assert_int_equal(evbuffer_get_length(f->got), head_len(f)); /* nothing after the 101 */
    assert_int_equal(f->nclose, 0);
    fx_free(f);
}

static void test_unmasked_client_frame_1002(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    send_frame(f, WSLAY_TEXT_FRAME, "plain", 5, false);
    assert_true(run_until(f, nframes_is, 1, 2000));
    struct frame fr[2];
    frames(f, fr, 2);
    assert_int_equal(close_code(&fr[0]), 1002);
    assert_true(run_until(f, nclose_is, 1, 2000));
    fx_free(f);
}

static void test_client_vanishes(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    assert_int_equal(pn_ws_send_text(f->ws, "x", 1), PN_OK);
    close_client(f);
    assert_true(run_until(f, nclose_is, 1, 2000));
    assert_true(run_until(f, conns_gone, 0, 1000));
    run_for(f, 50);
    assert_int_equal(f->nclose, 1);
    fx_free(f);
}

static void test_shutdown_sends_1001(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    f->set.head->ops->shutdown(f->set.head);
    assert_true(run_until(f, nframes_is, 1, 2000));
    struct frame fr[2];
    frames(f, fr, 2);
    assert_int_equal(close_code(&fr[0]), 1001);
    send_close(f, 1001);
    assert_true(run_until(f, nclose_is, 1, 2000));
    fx_free(f);
}

static void test_destroy_fires_on_close(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    f->set.head->ops->destroy(f->set.head);
    assert_int_equal(f->nclose, 1);
    assert_int_equal(f->set.count, 0);
    assert_true(run_until(f, is_eof, 0, 2000));
    fx_free(f);
    /* no second on_close (on_ws_close asserts the pointer) */
}

static void test_backpressure_and_writable(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_ACCEPT);
    fx_open(f, NULL);
    bufferevent_disable(f->cli, EV_READ);
    char piece[16 * 1024];
    memset(piece, 'p', sizeof piece);
    int sent = 0;
    while (pn_ws_pending(f->ws) < 2 * 1024 * 1024) {
        assert_int_equal(pn_ws_send_text(f->ws, piece, sizeof piece), PN_OK);
        sent++;
    }
    f->nwritable = 0;
    run_for(f, 100);
    assert_true(pn_ws_pending(f->ws) >= 64 * 1024); /* the client does not read */
    assert_int_equal(f->nwritable, 0);
    bufferevent_enable(f->cli, EV_READ);
    assert_true(run_until(f, nwritable_pos, 0, 3000));
    assert_true(pn_ws_pending(f->ws) < 64 * 1024);
    assert_true(run_until(f, nframes_is, sent, 3000));
    run_for(f, 50);
    assert_int_equal(frames(f, NULL, 1 << 30), sent);
    struct frame last;
    assert_int_equal(frames(f, &last, 1), 1);
    assert_int_equal(last.opcode, WSLAY_TEXT_FRAME);
    assert_int_equal(last.len, sizeof piece);
    fx_free(f);
}

static bool has_status(struct fx *f, int status)
{
    char want[32];
    snprintf(want, sizeof want, "HTTP/1.1 %d ", status);
    size_t len = evbuffer_get_length(f->got);
    const char *d = (const char *)evbuffer_pullup(f->got, -1);
    return d && memmem(d, len, want, strlen(want)) && memmem(d, len, "\r\n\r\n", 4);
}

static void check_rejected(const char *req, bool with_hook)
{
    struct fx *f = fx_new(M_ACCEPT);
    if (with_hook)
        f->srv.respond_error = custom_error;
    fx_connect(f);
    send_str(f, req);
    assert_true(run_until(f, has_status, 400, 2000));
    assert_int_equal(f->naccept_null, 1);
    assert_null(f->ws);
    assert_int_equal(f->nerror, with_hook ? 1 : 0);
    if (with_hook)
        assert_int_equal(f->last_error_status, 400);
    fx_free(f);
}

static void test_invalid_upgrades_400(void **state)
{
    (void)state;
    const char *ok_rest = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    char req[512];
    /* no Upgrade at all */
    check_rejected("GET /logs HTTP/1.1\r\nHost: h\r\n\r\n", false);
    /* wrong version */
    snprintf(req, sizeof req,
             "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Version: 12\r\n%s",
             ok_rest);
    check_rejected(req, true);
    /* Connection without the upgrade token */
    snprintf(req, sizeof req,
             "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, upgraded\r\n"
             "Sec-WebSocket-Version: 13\r\n%s",
             ok_rest);
    check_rejected(req, false);
    /* a key that is not base64 of 16 bytes */
    check_rejected("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n",
                   false);
    /* not GET */
    snprintf(req, sizeof req,
             "POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n%s",
             ok_rest);
    check_rejected(req, false);
    /* HTTP/1.0 (RFC 6455 §4.1 needs 1.1; found by fuzz_ws) */
    snprintf(req, sizeof req,
             "GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Version: 13\r\n%s",
             ok_rest);
    check_rejected(req, false);
}

static void test_is_upgrade_variants(void **state)
{
    (void)state;
    struct pn_http_header h[] = {
        {"upgrade", "foo, WebSocket"},
        {"connection", "keep-alive"},
        {"connection", " Upgrade "},
        {"sec-websocket-version", " 13"},
        {"sec-websocket-key", " dGhlIHNhbXBsZSBub25jZQ== "},
    };
    struct pn_req req = {.method = "GET", .headers = h, .nheaders = 5, .http_version = 11};
    assert_true(pn_ws_is_upgrade(&req));
    req.http_version = 20;
    assert_false(pn_ws_is_upgrade(&req));
    req.http_version = 11;
    h[4].value = "dGhlIHNhbXBsZSBub25jZQ=";
    assert_false(pn_ws_is_upgrade(&req));
    h[4].value = "dGhlIHNhbXBsZSBub25jZ!==";
    assert_false(pn_ws_is_upgrade(&req));
}

/* A transport without take_over (HTTP/2): NULL and a 400. */
static int fake_status;
static int fake_respond(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                        size_t nhdrs, const void *body, size_t len)
{
    (void)req;
    (void)hdrs;
    (void)nhdrs;
    (void)body;
    (void)len;
    fake_status = status;
    return PN_OK;
}

static void test_no_take_over_transport(void **state)
{
    (void)state;
    static const struct pn_req_ops ops = {.respond = fake_respond};
    struct pn_http_header h[] = {
        {"upgrade", "websocket"},
        {"connection", "Upgrade"},
        {"sec-websocket-version", "13"},
        {"sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="},
    };
    struct pn_http_server srv = {0};
    struct pn_peer peer = {.ip = "127.0.0.1"};
    struct pn_req req = {.method = "GET",
                         .headers = h,
                         .nheaders = 4,
                         .http_version = 11,
                         .ops = &ops,
                         .srv = &srv,
                         .peer = &peer};
    struct pn_ws_cbs cbs = {0};
    assert_null(pn_req_take_over(&req, NULL));
    assert_null(pn_ws_accept(&req, &cbs, NULL));
    assert_int_equal(fake_status, 400);
}

static void test_take_over_refused_while_streaming(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_STREAM_TAKE);
    fx_connect(f);
    send_upgrade(f, NULL);
    assert_true(run_until(f, has_status, 200, 2000));
    assert_true(f->take_over_null);
    assert_null(f->ws);
    fx_free(f);
}

static bool held_set(struct fx *f, int unused)
{
    (void)unused;
    return f->held != NULL;
}

static void test_take_over_refused_after_close(void **state)
{
    (void)state;
    struct fx *f = fx_new(M_HOLD);
    fx_connect(f);
    send_upgrade(f, NULL);
    assert_true(run_until(f, held_set, 0, 2000));
    close_client(f);
    assert_true(run_until(f, nclose_is, 1, 2000));
    assert_true(f->take_over_null);
    fx_free(f);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accept_key_rfc_example),
        cmocka_unit_test(test_upgrade_and_text_frames),
        cmocka_unit_test(test_client_frames_ignored),
        cmocka_unit_test(test_client_close),
        cmocka_unit_test(test_server_close),
        cmocka_unit_test(test_server_close_peer_silent),
        cmocka_unit_test(test_ping_and_timeout),
        cmocka_unit_test(test_too_big_closes_1009),
        cmocka_unit_test(test_exactly_64k_is_fine),
        cmocka_unit_test(test_unmasked_client_frame_1002),
        cmocka_unit_test(test_client_vanishes),
        cmocka_unit_test(test_shutdown_sends_1001),
        cmocka_unit_test(test_destroy_fires_on_close),
        cmocka_unit_test(test_backpressure_and_writable),
        cmocka_unit_test(test_invalid_upgrades_400),
        cmocka_unit_test(test_is_upgrade_variants),
        cmocka_unit_test(test_no_take_over_transport),
        cmocka_unit_test(test_take_over_refused_while_streaming),
        cmocka_unit_test(test_take_over_refused_after_close),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
