/* WebSocket server connections (see ws.h). A connection owns the
 * bufferevent it took over from the HTTP/1.1 server, one wslay event
 * context that frames our messages into the bufferevent's output and parses
 * the client's from its input, and three events: the ping timer, the close
 * timer (first a bound on flushing our close frame, then the ≤ 1 s wait for
 * the peer's), and a deferred event that runs input handling and on_close
 * outside library and caller stacks. It is linked in the listener's
 * connection set like an HTTP connection: shutdown closes with 1001,
 * destroy closes at once.
 *
 * The 101 answer: pn_ws_accept checks the request and computes the accept
 * key while the request is alive, takes the connection over
 * (pn_req_take_over; the HTTP layer must not have started an answer), and
 * then writes the 101 itself into the bufferevent, after whatever earlier
 * answers are still flushing and before any frame. Bytes the client sent
 * after its request head are already frames and stay in the input buffer.
 *
 * Closing: our close frame goes after what is queued; once it is flushed we
 * wait ≤ 1 s for the peer's close frame, then end with the lingering close
 * (FIN, drain, close). A peer that vanishes (EOF, reset, TLS error) ends the
 * connection at once. Either way on_close fires exactly once, from the
 * deferred event (or from destroy), and the connection is freed after it. */
#include "net/ws.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <wslay/wslay.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"
#include "base/utf8.h"

#define WS_WRITABLE_MARK (64 * 1024) /* on_writable fires under this */
#define WS_MAX_RECV (64 * 1024)      /* bigger client messages: close 1009 */
#define WS_FLUSH_MS 2000             /* our close frame must be out within */
#define WS_PEER_CLOSE_MS 1000        /* then the peer's close must come within */
#define WS_LINGER_MAX (64 * 1024)
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

/* Ping period; a static so the unit test (which includes this file) can
 * shorten it. */
static unsigned ws_ping_ms = 20000;

enum ws_state {
    WS_OPEN,    /* frames flow both ways */
    WS_CLOSING, /* a close frame is queued or out: no more messages */
    WS_DONE,    /* transport gone; on_close and free from the deferred event */
};

struct pn_ws {
    struct pn_conn base; /* first: the listener's set holds &base */
    struct bufferevent *bev;
    wslay_event_context_ptr ctx;
    struct pn_ws_cbs cbs;
    void *arg;
    struct event *ping_ev;
    struct event *close_ev;
    struct event *defer;
    enum ws_state state;
    bool waiting_peer;  /* our close is flushed; the close timer waits for the peer's */
    bool ping_out;      /* a ping went out since the last tick */
    bool rx_since_ping; /* the peer sent bytes since the last ping */
    bool in_wslay;      /* wslay_event_send/recv on the stack (a pair may call back) */
    bool want_writable; /* a write callback came while in_wslay */
    bool closed_fired;
    int depth; /* > 0 while a user callback runs */
};

static void ws_progress(struct pn_ws *ws);

/* ---- handshake ------------------------------------------------------------ */

static bool ws_is_space(char ch)
{
    return ch == ' ' || ch == '\t';
}

/* Whether a comma-separated header value holds token (case-insensitive). */
static bool ws_has_token(const char *value, const char *token)
{
    size_t tlen = strlen(token);
    const char *p = value;
    while (*p) {
        while (*p == ',' || ws_is_space(*p))
            p++;
        const char *start = p;
        while (*p && *p != ',')
            p++;
        const char *end = p;
        while (end > start && ws_is_space(end[-1]))
            end--;
        if ((size_t)(end - start) == tlen && strncasecmp(start, token, tlen) == 0)
            return true;
    }
    return false;
}

/* Whether any instance of header name holds token. */
static bool ws_header_has_token(const struct pn_req *req, const char *name, const char *token)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (strcasecmp(req->headers[i].name, name) == 0 &&
            ws_has_token(req->headers[i].value, token))
            return true;
    return false;
}

/* Copies a header value without surrounding blanks into out; false when
 * absent or longer than outlen - 1. */
static bool ws_header_trimmed(const struct pn_req *req, const char *name, char *out, size_t outlen)
{
    const char *v = pn_req_header(req, name);
    if (!v)
        return false;
    while (ws_is_space(*v))
        v++;
    size_t len = strlen(v);
    while (len && ws_is_space(v[len - 1]))
        len--;
    if (len >= outlen)
        return false;
    memcpy(out, v, len);
    out[len] = '\0';
    return true;
}

/* A Sec-WebSocket-Key is base64 of 16 bytes: 22 alphabet characters and
 * "==". */
static bool ws_key_valid(const char *key)
{
    if (strlen(key) != 24 || strcmp(key + 22, "==") != 0)
        return false;
    for (int i = 0; i < 22; i++) {
        char ch = key[i];
        if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
              ch == '+' || ch == '/'))
            return false;
    }
    return true;
}

bool pn_ws_is_upgrade(const struct pn_req *req)
{
    char buf[64];
    if (req->http_version != 11 || strcmp(req->method, "GET") != 0)
        return false;
    if (!ws_header_has_token(req, "upgrade", "websocket") ||
        !ws_header_has_token(req, "connection", "upgrade"))
        return false;
    if (!ws_header_trimmed(req, "sec-websocket-version", buf, sizeof buf) || strcmp(buf, "13") != 0)
        return false;
    return ws_header_trimmed(req, "sec-websocket-key", buf, sizeof buf) && ws_key_valid(buf);
}

void pn_ws_accept_key(const char *key, char *out)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    size_t klen = strlen(key);
    char *in = pn_malloc(klen + sizeof WS_GUID);
    memcpy(in, key, klen);
    memcpy(in + klen, WS_GUID, sizeof WS_GUID);
    EVP_Digest(in, klen + sizeof WS_GUID - 1, md, &mdlen, EVP_sha1(), NULL);
    free(in);
    /* 20 bytes of SHA-1 encode to 28 characters plus the NUL. */
    EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen);
}

/* The answer to a request that cannot become a WebSocket. */
static void ws_reject(struct pn_req *req)
{
    static const char text[] = "bad websocket upgrade request";
    if (req->srv && req->srv->respond_error)
        req->srv->respond_error(req, 400, text);
    else
        pn_req_respond_text(req, 400, text);
}

/* ---- wslay callbacks ------------------------------------------------------- */

static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                          void *user)
{
    (void)flags;
    struct pn_ws *ws = user;
    int n = evbuffer_remove(bufferevent_get_input(ws->bev), buf, len);
    if (n <= 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    ws->rx_since_ping = true;
    return n;
}

/* Everything goes to the output buffer at once; pn_ws_pending counts what
 * wslay still holds plus what the socket has not taken. */
static ssize_t ws_send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                          void *user)
{
    (void)flags;
    struct pn_ws *ws = user;
    if (evbuffer_add(bufferevent_get_output(ws->bev), data, len) < 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

/* Client messages are ignored; wslay itself answers pings and close
 * frames. */
static void ws_msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                      void *user)
{
    (void)ctx;
    (void)arg;
    (void)user;
}

static const struct wslay_event_callbacks ws_wslay_cbs = {
    .recv_callback = ws_recv_cb,
    .send_callback = ws_send_cb,
    .on_msg_recv_callback = ws_msg_cb,
};

/* ---- ending ---------------------------------------------------------------- */

static void ws_schedule(struct pn_ws *ws)
{
    event_active(ws->defer, EV_TIMEOUT, 1);
}

static void ws_arm_close_timer(struct pn_ws *ws, unsigned ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(ws->close_ev, &tv);
}

/* Ends the transport: with the lingering close after a close handshake (or
 * its time-out), at once when the peer is gone or on destroy. on_close
 * follows from the deferred event. */
static void ws_end(struct pn_ws *ws, bool linger)
{
    if (ws->state == WS_DONE)
        return;
    ws->state = WS_DONE;
    event_del(ws->ping_ev);
    event_del(ws->close_ev);
    if (ws->bev) {
        bufferevent_setcb(ws->bev, NULL, NULL, NULL, NULL);
        if (linger) {
            pn_net_linger_close(ws->bev, ws->base.set, WS_LINGER_MAX);
        } else {
            bufferevent_disable(ws->bev, EV_READ | EV_WRITE);
            bufferevent_free(ws->bev);
        }
        ws->bev = NULL;
    }
    ws_schedule(ws);
}

static void ws_free(struct pn_ws *ws)
{
    pn_conn_unlink(&ws->base);
    wslay_event_context_free(ws->ctx);
    event_free(ws->ping_ev);
    event_free(ws->close_ev);
    event_free(ws->defer);
    free(ws);
}

/* The last step of an ended connection: on_close once, then free. */
static void ws_finish(struct pn_ws *ws)
{
    pn_conn_unlink(&ws->base);
    if (!ws->closed_fired) {
        ws->closed_fired = true;
        if (ws->cbs.on_close) {
            ws->depth++;
            ws->cbs.on_close(ws, ws->arg);
            ws->depth--;
        }
    }
    ws_free(ws);
}

/* No more messages: a close frame is queued (ours or wslay's answer to the
 * peer's, or its 1002/1007/1009). The close timer bounds the flush. */
static void ws_enter_closing(struct pn_ws *ws)
{
    if (ws->state != WS_OPEN)
        return;
    ws->state = WS_CLOSING;
    event_del(ws->ping_ev);
    ws_arm_close_timer(ws, WS_FLUSH_MS);
}

/* ---- moving data ----------------------------------------------------------- */

/* Hands queued frames to the output buffer and moves the close handshake
 * on: once our close frame has left the output buffer, end when the peer's
 * close came (or wslay stopped reading after a protocol error), else wait
 * for it ≤ 1 s. */
static void ws_progress(struct pn_ws *ws)
{
    if (ws->state == WS_DONE || ws->in_wslay)
        return;
    if (wslay_event_want_write(ws->ctx)) {
        ws->in_wslay = true;
        int rv = wslay_event_send(ws->ctx);
        ws->in_wslay = false;
        if (rv != 0) {
            ws_end(ws, false);
            return;
        }
    }
    if (!wslay_event_get_close_sent(ws->ctx))
        return;
    ws_enter_closing(ws);
    if (evbuffer_get_length(bufferevent_get_output(ws->bev)) > 0)
        return; /* the write callback comes back here */
    if (wslay_event_get_close_received(ws->ctx) || !wslay_event_get_read_enabled(ws->ctx)) {
        ws_end(ws, true);
        return;
    }
    if (!ws->waiting_peer) {
        ws->waiting_peer = true;
        ws_arm_close_timer(ws, WS_PEER_CLOSE_MS);
    }
}

/* Feeds the input to wslay (which answers pings and close frames and
 * enforces the 64 KiB limit), then sends what that queued. */
static void ws_process_input(struct pn_ws *ws)
{
    if (ws->state == WS_DONE || ws->in_wslay)
        return;
    struct evbuffer *in = bufferevent_get_input(ws->bev);
    if (wslay_event_get_read_enabled(ws->ctx)) {
        ws->in_wslay = true;
        int rv = wslay_event_recv(ws->ctx);
        ws->in_wslay = false;
        if (rv != 0) {
            ws_end(ws, false);
            return;
        }
    }
    /* wslay stops reading exactly when it queued a close: an answer to the
     * peer's, or 1002/1007/1009. Nothing more is read then. */
    if (!wslay_event_get_read_enabled(ws->ctx)) {
        evbuffer_drain(in, evbuffer_get_length(in));
        ws_enter_closing(ws);
    }
    ws_progress(ws);
}

/* ---- libevent callbacks ---------------------------------------------------- */

static void ws_read_cb(struct bufferevent *bev, void *arg)
{
    (void)bev;
    struct pn_ws *ws = arg;
    if (ws->in_wslay) {
        ws_schedule(ws); /* a bufferevent pair calling back from our own write */
        return;
    }
    ws_process_input(ws);
}

static void ws_fire_writable(struct pn_ws *ws)
{
    if (ws->state == WS_OPEN && ws->cbs.on_writable && pn_ws_pending(ws) < WS_WRITABLE_MARK) {
        ws->depth++;
        ws->cbs.on_writable(ws, ws->arg);
        ws->depth--;
    }
}

static void ws_write_cb(struct bufferevent *bev, void *arg)
{
    (void)bev;
    struct pn_ws *ws = arg;
    if (ws->in_wslay) {
        ws->want_writable = true;
        ws_schedule(ws);
        return;
    }
    ws_progress(ws);
    ws_fire_writable(ws);
}

/* EOF, a reset or a TLS error: the peer is gone, close now. */
static void ws_event_cb(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    struct pn_ws *ws = arg;
    if (what == BEV_EVENT_CONNECTED)
        return;
    pn_log_debug("websocket %s:%u: connection ended (%s)", ws->base.peer.ip, ws->base.peer.port,
                 (what & BEV_EVENT_EOF) ? "eof" : "error");
    ws_end(ws, false);
}

/* Every ws_ping_ms: a ping. A peer that sent nothing since the previous
 * ping is taken as gone (uvicorn's default ping timeout equals its
 * interval) and gets a 1011 close. */
static void ws_ping_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct pn_ws *ws = arg;
    if (ws->state != WS_OPEN)
        return;
    if (ws->ping_out && !ws->rx_since_ping) {
        pn_log_debug("websocket %s:%u: no answer to ping", ws->base.peer.ip, ws->base.peer.port);
        pn_ws_close(ws, WSLAY_CODE_INTERNAL_SERVER_ERROR, "keepalive ping timeout");
        return;
    }
    struct wslay_event_msg m = {WSLAY_PING, NULL, 0};
    if (wslay_event_queue_msg(ws->ctx, &m) != 0)
        return;
    ws->ping_out = true;
    ws->rx_since_ping = false;
    ws_progress(ws);
}

/* Our close frame could not be flushed in time, or the peer's close did not
 * come within 1 s of ours. */
static void ws_close_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    ws_end(arg, true);
}

/* Work kept off library and caller stacks: input that arrived with the
 * upgrade or during a bufferevent pair's synchronous callback, and the
 * final on_close. */
static void ws_defer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct pn_ws *ws = arg;
    if (ws->state == WS_DONE) {
        ws_finish(ws);
        return;
    }
    ws_process_input(ws);
    if (ws->want_writable) {
        ws->want_writable = false;
        ws_fire_writable(ws);
    }
}

/* ---- connection operations ------------------------------------------------- */

static void ws_conn_shutdown(struct pn_conn *c)
{
    pn_ws_close((struct pn_ws *)c, WSLAY_CODE_GOING_AWAY, "");
}

static void ws_conn_destroy(struct pn_conn *c)
{
    struct pn_ws *ws = (struct pn_ws *)c;
    ws_end(ws, false);
    if (ws->depth > 0) {
        pn_conn_unlink(&ws->base); /* freed by the deferred event */
        return;
    }
    event_del(ws->defer);
    ws_finish(ws);
}

static const struct pn_conn_ops ws_conn_ops = {
    .shutdown = ws_conn_shutdown,
    .destroy = ws_conn_destroy,
};

/* ---- public ---------------------------------------------------------------- */

struct pn_ws *pn_ws_accept(struct pn_req *req, const struct pn_ws_cbs *cbs, void *arg)
{
    char key[64], accept[29];
    if (!pn_ws_is_upgrade(req) || !ws_header_trimmed(req, "sec-websocket-key", key, sizeof key)) {
        ws_reject(req);
        return NULL;
    }
    pn_ws_accept_key(key, accept);
    struct pn_peer peer = *req->peer;
    struct pn_conn_set *set = NULL;
    struct bufferevent *bev = pn_req_take_over(req, &set);
    if (!bev) {
        ws_reject(req);
        return NULL;
    }

    struct pn_ws *ws = pn_new(struct pn_ws);
    ws->base.ops = &ws_conn_ops;
    ws->base.peer = peer;
    ws->bev = bev;
    if (cbs)
        ws->cbs = *cbs;
    ws->arg = arg;
    ws->state = WS_OPEN;
    if (wslay_event_context_server_init(&ws->ctx, &ws_wslay_cbs, ws) != 0) {
        fprintf(stderr, "proxynode: out of memory (wslay context)\n");
        abort();
    }
    wslay_event_config_set_max_recv_msg_length(ws->ctx, WS_MAX_RECV);
    struct event_base *base = bufferevent_get_base(bev);
    ws->ping_ev = event_new(base, -1, EV_PERSIST, ws_ping_cb, ws);
    ws->close_ev = evtimer_new(base, ws_close_timer_cb, ws);
    ws->defer = event_new(base, -1, 0, ws_defer_cb, ws);
    struct timeval tv = {ws_ping_ms / 1000, (ws_ping_ms % 1000) * 1000};
    event_add(ws->ping_ev, &tv);
    pn_conn_link(&ws->base, set);

    evbuffer_add_printf(bufferevent_get_output(bev),
                        "HTTP/1.1 101 Switching Protocols\r\n"
                        "Upgrade: websocket\r\n"
                        "Connection: Upgrade\r\n"
                        "Sec-WebSocket-Accept: %s\r\n"
                        "\r\n",
                        accept);
    bufferevent_setcb(bev, ws_read_cb, ws_write_cb, ws_event_cb, ws);
    bufferevent_setwatermark(bev, EV_WRITE, WS_WRITABLE_MARK - 1, 0);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    if (evbuffer_get_length(bufferevent_get_input(bev)) > 0)
        ws_schedule(ws); /* frames that came with the request head */
    pn_log_debug("websocket %s:%u: open", peer.ip, peer.port);
    return ws;
}

int pn_ws_send_text(struct pn_ws *ws, const char *data, size_t len)
{
    if (ws->state != WS_OPEN)
        return PN_ERR_CLOSED;
    if (!pn_utf8_valid(data, len))
        return PN_ERR_INVAL; /* the client would fail the connection with 1007 */
    struct wslay_event_msg m = {WSLAY_TEXT_FRAME, (const uint8_t *)data, len};
    int rv = wslay_event_queue_msg(ws->ctx, &m);
    if (rv == WSLAY_ERR_NO_MORE_MSG)
        return PN_ERR_CLOSED;
    if (rv != 0)
        return PN_ERR_INVAL;
    ws_progress(ws);
    return PN_OK;
}

size_t pn_ws_pending(const struct pn_ws *ws)
{
    size_t n = wslay_event_get_queued_msg_length(ws->ctx);
    if (ws->bev)
        n += evbuffer_get_length(bufferevent_get_output(ws->bev));
    return n;
}

void pn_ws_close(struct pn_ws *ws, uint16_t code, const char *reason)
{
    if (ws->state != WS_OPEN)
        return;
    /* A close reason is at most 123 bytes; cut on a UTF-8 boundary. */
    size_t rlen = reason ? strlen(reason) : 0;
    if (rlen > 123) {
        rlen = 123;
        while (rlen > 0 && ((unsigned char)reason[rlen] & 0xC0) == 0x80)
            rlen--;
    }
    if (wslay_event_queue_close(ws->ctx, code, (const uint8_t *)reason, rlen) ==
        WSLAY_ERR_INVALID_ARGUMENT) /* a code not allowed on the wire */
        wslay_event_queue_close(ws->ctx, WSLAY_CODE_NORMAL_CLOSURE, NULL, 0);
    ws_enter_closing(ws);
    ws_progress(ws);
}

const struct pn_peer *pn_ws_peer(const struct pn_ws *ws)
{
    return &ws->base.peer;
}
