/* The node's TLS port (see listener.h). Accepted sockets live here as
 * "pending" connections through the TLS handshake and the first-bytes
 * sniff, then are handed to http1.c or h2.c, which own them from there on.
 * The listener keeps every connection in one set so shutdown reaches all.
 *
 * A handshake that fails (a plaintext probe such as Marzban's
 * `HEAD / HTTP/1.0`, garbage, a wrong version) or times out must end in a
 * clean FIN, never a reset: the Marzban panel reads a reset as "this is an
 * RPyC node" (marzban spec 1.4). Closing a socket with unread bytes in its
 * receive buffer makes the kernel send RST, so those connections go through
 * the lingering close (discard, shutdown SHUT_WR at once, drain until EOF,
 * 2 s or 64 KiB, close). */
#include "net/listener.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"
#include "net/h2.h"
#include "net/http1.h"
#include "net/tls.h"

static const char h2_preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define H2_PREFACE_LEN (sizeof h2_preface - 1)
/* What a peer whose handshake failed may still send before we close. */
#define PENDING_LINGER_MAX (64 * 1024)

struct pn_listener {
    struct pn_listener_opts opts;
    struct event_base *base;
    struct evconnlistener *evl;
    struct event *ev_resume; /* re-enables accepting after EMFILE and friends */
    struct pn_conn_set conns;
    uint16_t port;
};

/* A connection in its handshake/sniff phase. */
struct pending {
    struct pn_conn conn; /* first: the set holds &conn */
    struct pn_listener *l;
    struct bufferevent *bev;
    struct event *ev_timeout;
};

static void pending_free(struct pending *p, bool free_bev)
{
    pn_conn_unlink(&p->conn);
    event_free(p->ev_timeout);
    if (free_bev && p->bev)
        bufferevent_free(p->bev);
    free(p);
}

static void pending_destroy(struct pn_conn *c)
{
    pending_free((struct pending *)c, true);
}

/* Ends a connection that never reached HTTP with a FIN the peer can read
 * (an empty read, or the TLS alert and then EOF), not a reset. */
static void pending_linger(struct pending *p)
{
    struct bufferevent *bev = p->bev;
    struct pn_conn_set *set = &p->l->conns;
    p->bev = NULL;
    pending_free(p, false);
    pn_net_linger_close(bev, set, PENDING_LINGER_MAX);
}

static void pending_shutdown(struct pn_conn *c)
{
    pending_linger((struct pending *)c); /* nothing to finish before a request exists */
}

static const struct pn_conn_ops pending_ops = {
    .shutdown = pending_shutdown,
    .destroy = pending_destroy,
};

/* Decides the protocol from the first bytes, writing nothing: the client
 * preface means HTTP/2, anything else HTTP/1.1 (which answers 400 to what
 * it cannot parse). Returns false while the bytes so far are still a prefix
 * of the preface. */
static bool sniff(struct pending *p, bool *is_h2)
{
    struct evbuffer *in = bufferevent_get_input(p->bev);
    size_t have = evbuffer_get_length(in);
    size_t n = have < H2_PREFACE_LEN ? have : H2_PREFACE_LEN;
    unsigned char buf[H2_PREFACE_LEN];
    evbuffer_copyout(in, buf, n);
    if (memcmp(buf, h2_preface, n) != 0) {
        *is_h2 = false;
        return true;
    }
    if (n < H2_PREFACE_LEN)
        return false;
    *is_h2 = true;
    return true;
}

static void pending_read(struct bufferevent *bev, void *arg)
{
    struct pending *p = arg;
    bool is_h2;
    if (!sniff(p, &is_h2))
        return;
    struct pn_listener *l = p->l;
    struct pn_peer peer = p->conn.peer;
    pending_free(p, false);
    if (is_h2 && l->opts.srv->allow_h2)
        pn_h2_conn_new(bev, l->opts.srv, &peer, &l->conns);
    else
        pn_http1_conn_new(bev, l->opts.srv, &peer, &l->conns);
}

static void pending_event(struct bufferevent *bev, short what, void *arg)
{
    struct pending *p = arg;
    if (what & BEV_EVENT_CONNECTED) {
        SSL *ssl = bufferevent_openssl_get_ssl(bev);
        const unsigned char *alpn = NULL;
        unsigned alpn_len = 0;
        SSL_get0_alpn_selected(ssl, &alpn, &alpn_len);
        p->conn.peer.alpn = !alpn_len                            ? ""
                            : alpn_len == 2 && !memcmp(alpn, "h2", 2) ? "h2"
                                                                  : "http/1.1";
        X509 *cert = SSL_get0_peer_certificate(ssl);
        p->conn.peer.client_cert_verified = cert && SSL_get_verify_result(ssl) == X509_V_OK;
        return;
    }
    if (what & BEV_EVENT_ERROR) {
        unsigned long e = bufferevent_get_openssl_error(bev);
        if (e) {
            char buf[160];
            ERR_error_string_n(e, buf, sizeof buf);
            pn_log_debug("tls handshake with %s:%u failed: %s", p->conn.peer.ip,
                         p->conn.peer.port, buf);
        }
    }
    pending_linger(p);
}

static void pending_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct pending *p = arg;
    pn_log_debug("connection from %s:%u: no request within the handshake timeout",
                 p->conn.peer.ip, p->conn.peer.port);
    pending_linger(p);
}

/* Formats the peer address, showing IPv4-mapped IPv6 addresses as IPv4
 * (handlers compare the caller's IP, e.g. the Gozargah session check). */
static void peer_from_sockaddr(const struct sockaddr *sa, struct pn_peer *peer)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, peer->ip, sizeof peer->ip);
        peer->port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr))
            inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], peer->ip, sizeof peer->ip);
        else
            inet_ntop(AF_INET6, &in6->sin6_addr, peer->ip, sizeof peer->ip);
        peer->port = ntohs(in6->sin6_port);
    } else {
        strcpy(peer->ip, "unknown");
    }
}

static void on_accept(struct evconnlistener *evl, evutil_socket_t fd, struct sockaddr *sa,
                      int salen, void *arg)
{
    struct pn_listener *l = arg;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    SSL *ssl = pn_tls_ssl_new(l->opts.tls);
    if (!ssl) {
        pn_log_error("cannot create a TLS session for a new connection");
        close(fd);
        return;
    }
    struct bufferevent *bev = bufferevent_openssl_socket_new(
        l->base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING, BEV_OPT_CLOSE_ON_FREE);
    if (!bev) {
        SSL_free(ssl);
        close(fd);
        return;
    }
    /* Peers that drop the TCP connection without close_notify are normal. */
    bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);

    struct pending *p = pn_new(struct pending);
    p->conn.ops = &pending_ops;
    peer_from_sockaddr(sa, &p->conn.peer);
    p->conn.peer.alpn = "";
    p->l = l;
    p->bev = bev;
    p->ev_timeout = evtimer_new(l->base, pending_timeout, p);
    unsigned ms = l->opts.handshake_timeout_ms ? l->opts.handshake_timeout_ms : 10000;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_add(p->ev_timeout, &tv);
    pn_conn_link(&p->conn, &l->conns);
    bufferevent_setcb(bev, pending_read, NULL, pending_event, p);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

static void resume_accepting(evutil_socket_t fd, short what, void *arg)
{
    struct pn_listener *l = arg;
    if (l->evl)
        evconnlistener_enable(l->evl);
}

/* accept() failed (out of descriptors, typically): pause 100 ms instead of
 * spinning on a listener that stays readable. */
static void on_accept_error(struct evconnlistener *evl, void *arg)
{
    struct pn_listener *l = arg;
    int e = EVUTIL_SOCKET_ERROR();
    pn_log_warn("accept failed: %s; pausing 100 ms", evutil_socket_error_to_string(e));
    evconnlistener_disable(evl);
    struct timeval tv = {0, 100000};
    event_add(l->ev_resume, &tv);
}

int pn_listener_new(const struct pn_listener_opts *opts, struct pn_listener **out, char *err,
                    size_t errlen)
{
    union {
        struct sockaddr sa;
        struct sockaddr_in in;
        struct sockaddr_in6 in6;
        struct sockaddr_storage ss;
    } addr;
    memset(&addr, 0, sizeof addr);
    socklen_t alen;
    if (inet_pton(AF_INET, opts->host, &addr.in.sin_addr) == 1) {
        addr.in.sin_family = AF_INET;
        addr.in.sin_port = htons(opts->port);
        alen = sizeof addr.in;
    } else if (inet_pton(AF_INET6, opts->host, &addr.in6.sin6_addr) == 1) {
        addr.in6.sin6_family = AF_INET6;
        addr.in6.sin6_port = htons(opts->port);
        alen = sizeof addr.in6;
    } else {
        return pn_seterr(err, errlen, PN_ERR_INVAL, "%s is not an IP address", opts->host);
    }

    int fd = socket(addr.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return pn_seterr(err, errlen, PN_ERR_IO, "socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, &addr.sa, alen) < 0 || listen(fd, 1024) < 0) {
        int e = errno;
        close(fd);
        return pn_seterr(err, errlen, PN_ERR_IO, "cannot listen on %s port %u: %s", opts->host,
                         opts->port, strerror(e));
    }
    alen = sizeof addr;
    getsockname(fd, &addr.sa, &alen);

    struct pn_listener *l = pn_new(struct pn_listener);
    l->opts = *opts;
    l->base = opts->srv->base;
    l->port = ntohs(addr.sa.sa_family == AF_INET ? addr.in.sin_port : addr.in6.sin6_port);
    l->ev_resume = evtimer_new(l->base, resume_accepting, l);
    /* Backlog 0: the socket already listens with 1024; libevent's -1 would
     * call listen() again with 128 and drop connect bursts. */
    l->evl = evconnlistener_new(l->base, on_accept, l, LEV_OPT_CLOSE_ON_FREE, 0, fd);
    if (!l->evl) {
        close(fd);
        event_free(l->ev_resume);
        free(l);
        return pn_seterr(err, errlen, PN_ERR_IO, "cannot watch the listening socket");
    }
    evconnlistener_set_error_cb(l->evl, on_accept_error);
    *out = l;
    return PN_OK;
}

uint16_t pn_listener_port(const struct pn_listener *l)
{
    return l->port;
}

void pn_listener_shutdown(struct pn_listener *l)
{
    if (l->evl) {
        evconnlistener_free(l->evl);
        l->evl = NULL;
    }
    /* shutdown may unlink (and free) the connection it is given. */
    struct pn_conn *c = l->conns.head;
    while (c) {
        struct pn_conn *next = c->next;
        c->ops->shutdown(c);
        c = next;
    }
}

size_t pn_listener_conn_count(const struct pn_listener *l)
{
    return l->conns.count;
}

void pn_listener_free(struct pn_listener *l)
{
    if (!l)
        return;
    if (l->evl)
        evconnlistener_free(l->evl);
    while (l->conns.head) {
        struct pn_conn *c = l->conns.head;
        c->ops->destroy(c);
        if (l->conns.head == c) /* a transport that did not unlink itself */
            pn_conn_unlink(c);
    }
    event_free(l->ev_resume);
    free(l);
}
