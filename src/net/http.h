/* The HTTP server surface shared by both transports. A REST handler sees a
 * struct pn_req and answers through pn_req_* whether HTTP/1.1 (http1.c) or
 * HTTP/2 (h2.c) carried it. This module also owns the connection base that
 * the listener tracks (struct pn_conn) and the per-listener settings
 * (struct pn_http_server).
 *
 * Lifetime: a request belongs to its transport. The handler gets it with the
 * whole body read, may answer at once or later, and must not touch it after
 * answering (pn_req_respond or pn_req_stream_end) or after its on_close
 * callback returned. on_close fires only when the request ends without an
 * answer (peer reset, connection closed, node shutting down). */
#ifndef PN_NET_HTTP_H
#define PN_NET_HTTP_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct bufferevent;
struct pn_grpc_service;
struct pn_req;
struct pn_conn;
struct pn_conn_set;

struct pn_http_header {
    const char *name; /* lower-case on requests */
    const char *value;
};

/* Settings shared by every connection of one listener. Borrowed by the
 * connections; must outlive them. */
struct pn_http_server {
    struct event_base *base;
    /* REST: called once per request with the whole body read. */
    void (*on_request)(struct pn_req *req, void *arg);
    /* REST, optional: the head of a request that has a body, before the
     * body is read (body NULL, body_len 0), so a refusal (a missing key)
     * does not wait for a body a peer may trickle forever. It either
     * answers at once with pn_req_respond* (the transport then drops the
     * body: HTTP/1.1 closes after the answer, HTTP/2 resets the stream once
     * the answer is out) or leaves the request untouched, and on_request
     * follows with the body. */
    void (*on_head)(struct pn_req *req, void *arg);
    void *arg;
    /* gRPC over HTTP/2 (content-type application/grpc*); NULL = no gRPC. */
    const struct pn_grpc_service *grpc;
    bool allow_h2;           /* false: HTTP/1.1 only (marzban profile) */
    size_t max_body;         /* 413 `request body too large` past this */
    size_t max_header;       /* 431 `request header fields too large` past this */
    /* No open request or stream: close (60 s). Also how long a request
     * body may go without a byte (HTTP/1.1: the connection closes; HTTP/2:
     * the stream is reset). */
    unsigned idle_timeout_ms;
    unsigned header_timeout_ms; /* a header block must arrive within (10 s) */
    /* Builds the plain-text error answers the transports send by
     * themselves (400/404/405/413/431): NULL uses pn_req_respond_text. */
    void (*respond_error)(struct pn_req *req, int status, const char *text);
};

/* What the handler knows of the peer and the TLS session. */
struct pn_peer {
    char ip[INET6_ADDRSTRLEN]; /* textual address, IPv4-mapped shown as IPv4 */
    uint16_t port;
    bool client_cert_verified; /* mTLS: a client certificate passed verification */
    const char *alpn;          /* "h2", "http/1.1" or "" */
};

/* ---- requests ---------------------------------------------------------- */

struct pn_req_ops; /* transport vtable, private to http1.c / h2.c */

struct pn_req {
    const char *method;          /* "GET" */
    const char *path;            /* raw (undecoded) path without the query */
    const char *query;           /* raw query without '?', "" when none */
    const struct pn_http_header *headers;
    size_t nheaders;
    const uint8_t *body;
    size_t body_len;
    int http_version;            /* 10, 11 or 20 */
    const struct pn_peer *peer;
    const struct pn_http_server *srv;
    void *user;                  /* the handler's, untouched by transports */
    /* transport private */
    const struct pn_req_ops *ops;
    void *transport;
    void (*on_close)(struct pn_req *req, void *arg);
    void (*on_writable)(struct pn_req *req, void *arg);
    void *cb_arg;
};

struct pn_req_ops {
    int (*respond)(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                   size_t nhdrs, const void *body, size_t len);
    int (*stream_start)(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                        size_t nhdrs);
    int (*stream_write)(struct pn_req *req, const void *data, size_t len);
    int (*stream_end)(struct pn_req *req);
    size_t (*stream_pending)(const struct pn_req *req);
    /* Hands the connection over (WebSocket); NULL when not possible. */
    struct bufferevent *(*take_over)(struct pn_req *req, struct pn_conn_set **set);
};

/* First value of a header, case-insensitive name; NULL when absent. */
const char *pn_req_header(const struct pn_req *req, const char *name);
/* Value of a query parameter (undecoded, first occurrence) copied into out;
 * returns false when absent. */
bool pn_req_query_param(const struct pn_req *req, const char *name, char *out, size_t outlen);

/* A complete answer. Content-Length is added by the transport. The request
 * is finished (and may be freed) when this returns. Returns PN_OK or
 * PN_ERR_CLOSED when the peer is already gone (the answer is dropped). */
int pn_req_respond(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                   size_t nhdrs, const void *body, size_t len);
/* Go http.Error style: `text/plain; charset=utf-8`, `X-Content-Type-Options:
 * nosniff`, body = text + "\n". */
int pn_req_respond_text(struct pn_req *req, int status, const char *text);

/* Streamed answers (chunked on HTTP/1.1, DATA frames on HTTP/2). Writes are
 * queued without limit: callers check pn_req_stream_pending and wait for
 * on_writable, which fires when the queue drops under 64 KiB. */
int pn_req_stream_start(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                        size_t nhdrs);
int pn_req_stream_write(struct pn_req *req, const void *data, size_t len);
int pn_req_stream_end(struct pn_req *req);
size_t pn_req_stream_pending(const struct pn_req *req);

/* Takes the connection away from the HTTP server for another protocol
 * (WebSocket: pn_ws_accept takes over, then writes its 101 itself): allowed
 * for the request being handled before any answer started. Returns the
 * bufferevent (callbacks and timeouts cleared; unread input, i.e. what
 * followed the request head, stays in it) and the listener's connection
 * set the new owner must link into. The request and the HTTP connection
 * are gone afterwards. NULL for transports that cannot (HTTP/2), while an
 * answer is in progress, or after the peer's FIN. */
struct bufferevent *pn_req_take_over(struct pn_req *req, struct pn_conn_set **set);

/* Registers the handler's callbacks for an answer it gives later. */
void pn_req_set_callbacks(struct pn_req *req, void (*on_close)(struct pn_req *, void *),
                          void (*on_writable)(struct pn_req *, void *), void *arg);

/* The reason phrase for a status code ("Not Found"). */
const char *pn_http_reason(int status);

/* ---- connections (tracked by the listener for timeouts and shutdown) --- */

struct pn_conn_ops {
    /* Graceful stop: HTTP/2 sends GOAWAY and lets open streams finish,
     * HTTP/1.1 closes when idle or after the current answer. */
    void (*shutdown)(struct pn_conn *c);
    /* Immediate close and free. */
    void (*destroy)(struct pn_conn *c);
};

/* The listener's list of live connections. */
struct pn_conn_set {
    struct pn_conn *head;
    size_t count;
};

struct pn_conn {
    const struct pn_conn_ops *ops;
    struct pn_conn_set *set;
    struct pn_conn *prev, *next;
    struct pn_peer peer;
};

/* Transports link a new connection into the listener's set (set may be
 * NULL, as in unit tests) and unlink it when it closes. Unlink is safe to
 * call twice. */
void pn_conn_link(struct pn_conn *c, struct pn_conn_set *set);
void pn_conn_unlink(struct pn_conn *c);

/* Closes a connection without a reset (lingering close): sends TLS
 * close_notify when a handshake completed, discards what the peer already
 * sent, sends FIN at once (shutdown SHUT_WR on a dup of the socket, so
 * freeing bev does not close it with unread data), then keeps reading and
 * dropping the peer's bytes until EOF, 2 s or max_bytes, and closes. Steals
 * bev (BEV_OPT_CLOSE_ON_FREE); its unsent output is dropped, so callers
 * flush first. The lingering socket is tracked in set as a connection
 * (destroy closes it at once; shutdown lets it finish); with set NULL the
 * caller must keep the loop running for 2 s. Without a socket (a
 * bufferevent pair), or beyond 1024 lingering sockets, it closes at once. */
void pn_net_linger_close(struct bufferevent *bev, struct pn_conn_set *set, size_t max_bytes);

#endif
