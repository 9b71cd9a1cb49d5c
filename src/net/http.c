/* The transport-neutral side of the HTTP server: request helpers that
 * dispatch to the carrying transport (http1.c or h2.c), Go-style plain-text
 * error answers, reason phrases, the listener's connection list, and the
 * lingering close every transport (and the listener, after a failed TLS
 * handshake) ends a connection with when the peer may still be sending. */
#include "net/http.h"

#include <errno.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/time.h"

const char *pn_req_header(const struct pn_req *req, const char *name)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (strcasecmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    return NULL;
}

bool pn_req_query_param(const struct pn_req *req, const char *name, char *out, size_t outlen)
{
    size_t nlen = strlen(name);
    const char *p = req->query ? req->query : "";
    while (*p) {
        const char *end = strchr(p, '&');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len >= nlen && strncmp(p, name, nlen) == 0 && (len == nlen || p[nlen] == '=')) {
            const char *v = len == nlen ? p + nlen : p + nlen + 1;
            size_t vlen = len == nlen ? 0 : len - nlen - 1;
            if (outlen == 0)
                return true;
            if (vlen >= outlen)
                vlen = outlen - 1;
            memcpy(out, v, vlen);
            out[vlen] = '\0';
            return true;
        }
        if (!end)
            break;
        p = end + 1;
    }
    return false;
}

int pn_req_respond(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                   size_t nhdrs, const void *body, size_t len)
{
    return req->ops->respond(req, status, hdrs, nhdrs, body, len);
}

int pn_req_respond_text(struct pn_req *req, int status, const char *text)
{
    static const struct pn_http_header hdrs[] = {
        {"Content-Type", "text/plain; charset=utf-8"},
        {"X-Content-Type-Options", "nosniff"},
    };
    size_t n = strlen(text);
    char *body = pn_malloc(n + 1);
    memcpy(body, text, n);
    body[n] = '\n';
    int rv = pn_req_respond(req, status, hdrs, 2, body, n + 1);
    free(body);
    return rv;
}

int pn_req_stream_start(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                        size_t nhdrs)
{
    return req->ops->stream_start(req, status, hdrs, nhdrs);
}

int pn_req_stream_write(struct pn_req *req, const void *data, size_t len)
{
    return req->ops->stream_write(req, data, len);
}

int pn_req_stream_end(struct pn_req *req)
{
    return req->ops->stream_end(req);
}

struct bufferevent *pn_req_take_over(struct pn_req *req, struct pn_conn_set **set)
{
    if (!req->ops->take_over)
        return NULL;
    return req->ops->take_over(req, set);
}

size_t pn_req_stream_pending(const struct pn_req *req)
{
    return req->ops->stream_pending(req);
}

void pn_req_set_callbacks(struct pn_req *req, void (*on_close)(struct pn_req *, void *),
                          void (*on_writable)(struct pn_req *, void *), void *arg)
{
    req->on_close = on_close;
    req->on_writable = on_writable;
    req->cb_arg = arg;
}

const char *pn_http_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Request Entity Too Large";
    case 422: return "Unprocessable Entity";
    case 425: return "Too Early";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 499: return "Client Closed Request";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    }
    return "Unknown";
}

void pn_conn_link(struct pn_conn *c, struct pn_conn_set *set)
{
    c->set = set;
    c->prev = NULL;
    if (!set)
        return;
    c->next = set->head;
    if (set->head)
        set->head->prev = c;
    set->head = c;
    set->count++;
}

void pn_conn_unlink(struct pn_conn *c)
{
    struct pn_conn_set *set = c->set;
    if (!set)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        set->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    set->count--;
    c->set = NULL;
    c->prev = c->next = NULL;
}

/* ---- lingering close ------------------------------------------------------ */

#define LINGER_MS 2000
#define LINGER_MAX_SOCKETS 1024

/* One socket between our FIN and its close (see pn_net_linger_close). */
struct lingering {
    struct pn_conn conn; /* first: the set holds &conn */
    struct event *ev;    /* read, re-added with what is left of the 2 s */
    int fd;
    size_t bytes, max;
    uint64_t deadline_ms;
};

static size_t linger_count; /* the node runs one event loop */

/* Reads and drops what the peer sent so far. Returns true when the socket
 * is finished with: EOF, an error (a reset), or max bytes read. */
static bool linger_drain(int fd, size_t *bytes, size_t max)
{
    char buf[16384];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) {
            *bytes += (size_t)n;
            if (*bytes >= max)
                return true;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        return !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
    }
}

static void linger_free(struct lingering *l)
{
    pn_conn_unlink(&l->conn);
    event_free(l->ev);
    close(l->fd);
    linger_count--;
    free(l);
}

static void linger_cb(evutil_socket_t fd, short what, void *arg)
{
    struct lingering *l = arg;
    if (!(what & EV_TIMEOUT) && !linger_drain((int)fd, &l->bytes, l->max)) {
        uint64_t now = pn_now_ms();
        if (now < l->deadline_ms) {
            uint64_t left = l->deadline_ms - now;
            struct timeval tv = {(time_t)(left / 1000), (suseconds_t)(left % 1000) * 1000};
            event_add(l->ev, &tv);
            return;
        }
    }
    linger_free(l);
}

static void linger_shutdown(struct pn_conn *c)
{
    (void)c; /* it ends by itself within 2 s */
}

static void linger_destroy(struct pn_conn *c)
{
    linger_free((struct lingering *)c);
}

static const struct pn_conn_ops linger_ops = {
    .shutdown = linger_shutdown,
    .destroy = linger_destroy,
};

void pn_net_linger_close(struct bufferevent *bev, struct pn_conn_set *set, size_t max_bytes)
{
    evutil_socket_t fd = bufferevent_getfd(bev);
    if (fd < 0) {
        bufferevent_free(bev);
        return;
    }
    /* Stop watching fd before it is closed while its dup lives on: epoll
     * keys on the open file, not on the descriptor number. */
    bufferevent_disable(bev, EV_READ | EV_WRITE);
    bufferevent_setcb(bev, NULL, NULL, NULL, NULL);
    SSL *ssl = bufferevent_openssl_get_ssl(bev);
    if (ssl) {
        if (SSL_is_init_finished(ssl))
            SSL_shutdown(ssl); /* close_notify, written straight to the socket */
        ERR_clear_error();
    }
    struct event_base *base = bufferevent_get_base(bev);
    int dfd = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
    bufferevent_free(bev);
    if (dfd < 0)
        return; /* the free closed the only descriptor */
    /* The order of the spec (marzban 1.4): drop what is buffered, FIN at
     * once, then drain until EOF, 2 s or max_bytes. */
    size_t bytes = 0;
    bool done = linger_drain(dfd, &bytes, max_bytes);
    shutdown(dfd, SHUT_WR);
    if (done || linger_count >= LINGER_MAX_SOCKETS) {
        close(dfd);
        return;
    }
    struct lingering *l = pn_new(struct lingering);
    l->conn.ops = &linger_ops;
    l->conn.peer.alpn = "";
    l->fd = dfd;
    l->bytes = bytes;
    l->max = max_bytes;
    l->deadline_ms = pn_now_ms() + LINGER_MS;
    l->ev = event_new(base, dfd, EV_READ, linger_cb, l);
    struct timeval tv = {LINGER_MS / 1000, (LINGER_MS % 1000) * 1000};
    event_add(l->ev, &tv);
    linger_count++;
    pn_conn_link(&l->conn, set);
}
