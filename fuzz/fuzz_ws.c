/* fuzz_ws: the WebSocket path (net/ws.c on wslay) behind a real HTTP/1.1
 * connection over a bufferevent pair: an upgrade request that the handler
 * accepts (pn_ws_accept takes the connection over from http1.c), then the
 * client frames from the input. The server may send text frames on open and
 * from a later loop round and may close with a code of its own; on_close
 * must fire exactly once for every WebSocket by the time its connection is
 * destroyed.
 *
 * Input: two option bytes, then the bytes the client sends.
 *   opt[0] bit  0    raw: the input holds the HTTP request too (else a valid
 *                    upgrade request goes first)
 *          bits 1-2  write size: all at once, 1, 5 or 100 bytes per round
 *          bit  3    BEV_OPT_DEFER_CALLBACKS on the pair
 *          bit  4    the server sends text frames on open and later
 *          bit  5    the server closes once the input is in (code: opt[1])
 *          bit  6    graceful shutdown at the end
 *          bit  7    client gone (EOF) at the end
 *   opt[1] bits 0-2  the server's close code (some invalid on the wire) */
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "net/http1.h"
#include "net/ws.h"

#define MAX_WS 8

static const char upgrade[] = "GET /logs/ws HTTP/1.1\r\n"
                              "Host: localhost\r\n"
                              "Upgrade: websocket\r\n"
                              "Connection: keep-alive, Upgrade\r\n"
                              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              "Sec-WebSocket-Version: 13\r\n"
                              "\r\n";

static struct pn_ws *open_ws[MAX_WS];
static size_t nopen;
static bool talk;
static struct event *later_ev;

static void ws_closed(struct pn_ws *ws, void *arg)
{
    (void)arg;
    for (size_t i = 0; i < nopen; i++) {
        if (open_ws[i] == ws) {
            open_ws[i] = open_ws[--nopen];
            return;
        }
    }
    fprintf(stderr, "fuzz_ws: on_close for a WebSocket that was not open (twice?)\n");
    abort();
}

static void ws_writable(struct pn_ws *ws, void *arg)
{
    (void)arg;
    (void)pn_ws_pending(ws);
}

static const struct pn_ws_cbs ws_cbs = {ws_closed, ws_writable};

static void later_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    for (size_t i = 0; i < nopen; i++) {
        pn_ws_send_text(open_ws[i], "later line", 10);
        pn_ws_send_text(open_ws[i], "\xff not utf-8", 11); /* refused */
    }
}

static void on_request(struct pn_req *req, void *arg)
{
    (void)arg;
    if (!pn_ws_is_upgrade(req) && strcmp(req->path, "/ws") != 0) {
        pn_req_respond_text(req, 404, "404 page not found");
        return;
    }
    /* a path of /ws tries even requests that are not upgrades: the 400 */
    if (nopen == MAX_WS) {
        pn_req_respond_text(req, 503, "busy");
        return;
    }
    struct pn_ws *ws = pn_ws_accept(req, &ws_cbs, NULL);
    if (!ws)
        return;
    open_ws[nopen++] = ws;
    (void)pn_ws_peer(ws);
    if (talk) {
        pn_ws_send_text(ws, "first line", 10);
        event_active(later_ev, EV_TIMEOUT, 1);
    }
}

static void cli_read(struct bufferevent *bev, void *arg)
{
    (void)arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    evbuffer_drain(in, evbuffer_get_length(in));
}

static void cli_event(struct bufferevent *bev, short what, void *arg)
{
    (void)what;
    cli_read(bev, arg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t pieces[4] = {SIZE_MAX, 1, 5, 100};
    static const uint16_t codes[8] = {1000, 1001, 1009, 4000, 0, 999, 1005, 65535};
    struct fz_world *w = fz_world();
    if (!later_ev)
        later_ev = event_new(w->base, -1, 0, later_cb, NULL);
    struct fz_in in = {data, size};
    uint8_t o0 = fz_u8(&in), o1 = fz_u8(&in);
    bool raw = o0 & 1;
    size_t piece = pieces[(o0 >> 1) & 3];
    int opts = BEV_OPT_CLOSE_ON_FREE | ((o0 & 8) ? BEV_OPT_DEFER_CALLBACKS : 0);
    talk = o0 & 0x10;

    struct pn_http_server srv;
    fz_server_init(&srv, FZ_ECHO, true, false);
    srv.on_request = on_request;

    struct bufferevent *pair[2];
    if (bufferevent_pair_new(w->base, opts, pair) < 0)
        abort();
    struct bufferevent *cli = pair[1];
    bufferevent_setcb(cli, cli_read, NULL, cli_event, NULL);
    bufferevent_enable(cli, EV_READ | EV_WRITE);
    struct pn_conn_set set = {0};
    struct pn_peer peer = {.ip = "127.0.0.1", .port = 40000, .alpn = "http/1.1"};
    bufferevent_enable(pair[0], EV_READ);
    if (!raw)
        bufferevent_write(cli, upgrade, sizeof upgrade - 1);
    pn_http1_conn_new(pair[0], &srv, &peer, &set);
    fz_spin(w->base);

    fz_feed(w->base, cli, &in, piece, NULL);
    if (o0 & 0x20) {
        for (size_t i = nopen; i > 0; i--)
            pn_ws_close(open_ws[i - 1], codes[o1 & 7], "bye \xc3\xa9");
        fz_spin(w->base);
    }
    if ((o0 & 0x40) && set.head) {
        set.head->ops->shutdown(set.head);
        fz_spin(w->base);
    }
    if (o0 & 0x80) {
        bufferevent_free(cli);
        cli = NULL;
        fz_spin(w->base);
    }
    fz_teardown(&set);
    if (nopen) {
        fprintf(stderr, "fuzz_ws: %zu WebSockets outlived their connection\n", nopen);
        abort();
    }
    event_del(later_ev);
    if (cli)
        bufferevent_free(cli);
    return 0;
}
