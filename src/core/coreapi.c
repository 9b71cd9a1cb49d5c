/* The gRPC client of one core's API port (see coreapi.h). It owns one
 * cleartext HTTP/2 connection to 127.0.0.1:<port> (prior knowledge, no
 * upgrade), opened lazily when a call is waiting, and every call object from
 * its start until its callback has run and its stream is closed.
 *
 * A call lives on one of two lists: `queue` (waiting for a connection or a
 * free stream slot) or `inflight` (submitted to the current nghttp2 session).
 * Both are doubly linked, and a stream finds its call through nghttp2's
 * stream user data, so no step walks the pending calls. Work that must not
 * run inside an nghttp2 callback (sending, connecting, tearing the session
 * down) is done by pump(), which runs from libevent callbacks only; code in
 * nghttp2 callbacks and in pn_coreapi_call() merely schedules it with the
 * `kick` event. Call memory is freed in the stream-close callback, or after
 * the session is deleted when the connection goes away. */
#include "core/coreapi.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/err.h"
#include "base/log.h"
#include "base/text.h"
#include "base/time.h"
#include "xray/core_api.pb-c.h"

/* cores.md "Data-loss trap": a reset=true QueryStats reply must never be
 * refused for its size, so the limit sits far above the ~8 MB of 100k users. */
#define COREAPI_MAX_REPLY ((size_t)512 << 20)
/* Flow-control windows we advertise: a multi-megabyte reply streams without
 * waiting for WINDOW_UPDATE round trips. */
#define COREAPI_STREAM_WINDOW (32 << 20)
#define COREAPI_CONN_WINDOW (1 << 30)
/* Stop serializing frames while this much is still unsent in the socket
 * buffer; the write callback resumes. */
#define COREAPI_OUT_HIGH ((size_t)4 << 20)

/* gRPC status codes used for errors the client detects itself. */
enum {
    GRPC_OK = 0,
    GRPC_CANCELLED = 1,
    GRPC_UNKNOWN = 2,
    GRPC_DEADLINE_EXCEEDED = 4,
    GRPC_RESOURCE_EXHAUSTED = 8,
    GRPC_INTERNAL = 13,
    GRPC_UNAVAILABLE = 14,
};

enum reply_kind { REPLY_RAW, REPLY_STATS, REPLY_SYS, REPLY_ONLINE, REPLY_IPLIST };
enum call_where { ON_NONE, ON_QUEUE, ON_INFLIGHT };

struct call {
    struct pn_coreapi *api;
    struct call *prev, *next;
    enum call_where where;
    int32_t stream_id;
    bool done; /* the callback has run */

    char path[160];
    uint8_t *req; /* 5-byte gRPC prefix + message */
    size_t req_len, req_off;
    uint64_t deadline_ms; /* 0 = none */
    struct event *timer;

    enum reply_kind kind;
    union {
        pn_coreapi_cb raw;
        pn_coreapi_stats_cb stats;
        pn_coreapi_sys_cb sys;
        pn_coreapi_online_cb online;
        pn_coreapi_iplist_cb iplist;
    } cb;
    void *arg;

    /* The response as it arrives. */
    struct pn_buf body;
    int http_status;    /* 0 = no response HEADERS yet */
    int grpc_status;    /* -1 = not seen */
    char *grpc_message; /* percent-decoded, or NULL */
};

struct call_list {
    struct call *head, *tail;
    size_t n;
};

struct pn_coreapi {
    struct event_base *base;
    uint16_t port;
    enum pn_core_kind kind;
    char authority[24];
    size_t max_reply; /* a field so the unit test can lower it */

    struct call_list queue, inflight;
    size_t npending; /* calls whose callback has not run */
    struct event *kick;
    bool closing;

    /* The connection; sess != NULL iff bev != NULL. */
    struct bufferevent *bev;
    nghttp2_session *sess;
    bool connected; /* TCP connect completed */
    bool draining;  /* GOAWAY seen or stream ids exhausted: submit nothing more */
    /* The QueryStats call whose callback runs (pn_coreapi_take_reply). */
    struct call *delivering;
};

/* ---- lists --------------------------------------------------------------- */

static void list_push_back(struct call_list *l, struct call *c)
{
    c->prev = l->tail;
    c->next = NULL;
    if (l->tail)
        l->tail->next = c;
    else
        l->head = c;
    l->tail = c;
    l->n++;
}

static void list_push_front(struct call_list *l, struct call *c)
{
    c->prev = NULL;
    c->next = l->head;
    if (l->head)
        l->head->prev = c;
    else
        l->tail = c;
    l->head = c;
    l->n++;
}

static void list_remove(struct call_list *l, struct call *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        l->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        l->tail = c->prev;
    c->prev = c->next = NULL;
    l->n--;
}

/* Takes the whole list, leaving it empty (for teardown loops that run user
 * callbacks, which may add new calls to the original list). */
static struct call_list list_take(struct call_list *l)
{
    struct call_list taken = *l;
    memset(l, 0, sizeof *l);
    return taken;
}

/* ---- delivering results ------------------------------------------------------ */

static void call_free(struct call *c)
{
    if (c->timer)
        event_free(c->timer);
    free(c->req);
    pn_buf_free(&c->body);
    free(c->grpc_message);
    free(c);
}

static void call_reset_response(struct call *c)
{
    pn_buf_free(&c->body);
    pn_buf_init(&c->body, c->api->max_reply + 5);
    c->http_status = 0;
    c->grpc_status = -1;
    free(c->grpc_message);
    c->grpc_message = NULL;
}

/* ---- QueryStatsResponse without protobuf-c ------------------------------------ */

/* A QueryStats reply with 200k counters is ~9 MB; protobuf-c's unpack makes
 * two allocations per counter (the Stat and its name) and the caller then
 * frees them all. This decoder reads the reply where it lies instead: the
 * names are NUL-terminated in place in the reply buffer and the stats point
 * at them. It accepts and rejects exactly what protobuf-c 1.4 does for
 * QueryStatsResponse{repeated Stat stat = 1} / Stat{string name = 1; int64
 * value = 2} (tests/unit/core/test_statsdec.c compares the two): unknown
 * fields are skipped, a known field with another wire type fails, the last
 * name and value of a Stat win, and a name is cut at an embedded NUL as a
 * C string would be. */

/* A field key: 1-5 bytes, tag 0 invalid. Returns the bytes used, 0 on error. */
static size_t pb_key(const uint8_t *p, size_t rem, uint32_t *field, unsigned *wt)
{
    if ((p[0] & 0xf8) == 0)
        return 0;
    *wt = p[0] & 7;
    uint32_t f = (p[0] & 0x7f) >> 3;
    if (!(p[0] & 0x80)) {
        *field = f;
        return 1;
    }
    size_t max = rem < 5 ? rem : 5;
    unsigned shift = 4;
    for (size_t i = 1; i < max; i++) {
        f |= (uint32_t)(p[i] & 0x7f) << shift;
        if (!(p[i] & 0x80)) {
            *field = f;
            return i + 1;
        }
        shift += 7;
    }
    return 0;
}

/* The extent of a field's value after its key: *len bytes, of which *pre
 * are a length prefix (wire type 2). false when the value is truncated,
 * unterminated, or of a wire type protobuf-c rejects (groups, 6, 7). */
static bool pb_value(const uint8_t *p, size_t rem, unsigned wt, size_t *len, size_t *pre)
{
    *pre = 0;
    switch (wt) {
    case 0: {
        size_t max = rem < 10 ? rem : 10;
        for (size_t i = 0; i < max; i++)
            if (!(p[i] & 0x80)) {
                *len = i + 1;
                return true;
            }
        return false;
    }
    case 1:
        *len = 8;
        return rem >= 8;
    case 5:
        *len = 4;
        return rem >= 4;
    case 2: {
        size_t max = rem < 5 ? rem : 5;
        uint32_t v = 0; /* 32 bits, as protobuf-c reads it */
        for (size_t i = 0; i < max; i++) {
            v |= (uint32_t)(p[i] & 0x7f) << (7 * i);
            if (!(p[i] & 0x80)) {
                if (v > rem - (i + 1))
                    return false;
                *pre = i + 1;
                *len = i + 1 + (size_t)v;
                return true;
            }
        }
        return false;
    }
    default:
        return false;
    }
}

static uint64_t pb_varint(const uint8_t *p, size_t len)
{
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++)
        v |= (uint64_t)(p[i] & 0x7f) << (7 * i);
    return v;
}

/* One Stat message: name (pointer and length in the reply, or "") and value. */
static bool decode_stat(const uint8_t *p, size_t len, struct pn_core_stat *st)
{
    st->name = "";
    st->len = 0;
    st->value = 0;
    size_t off = 0;
    while (off < len) {
        /* The shapes the cores write, read at once: a name shorter than
         * 128 bytes and a varint value, each behind a one-byte key. */
        if (p[off] == 0x0a && len - off >= 2 && p[off + 1] < 0x80) {
            size_t l = p[off + 1];
            if (l > len - off - 2)
                return false;
            st->len = l;
            st->name = l ? (const char *)p + off + 2 : "";
            off += 2 + l;
            continue;
        }
        if (p[off] == 0x10) {
            size_t max = len - off - 1 < 10 ? len - off - 1 : 10;
            uint64_t v = 0;
            size_t i = 0;
            for (; i < max; i++) {
                v |= (uint64_t)(p[off + 1 + i] & 0x7f) << (7 * i);
                if (!(p[off + 1 + i] & 0x80))
                    break;
            }
            if (i == max)
                return false;
            st->value = (int64_t)v;
            off += 2 + i;
            continue;
        }
        uint32_t field;
        unsigned wt;
        size_t k = pb_key(p + off, len - off, &field, &wt);
        if (!k)
            return false;
        off += k;
        size_t vlen, pre;
        if (!pb_value(p + off, len - off, wt, &vlen, &pre))
            return false;
        if (field == 1) {
            if (wt != 2)
                return false;
            st->len = vlen - pre;
            st->name = st->len ? (const char *)p + off + pre : "";
        } else if (field == 2) {
            if (wt != 0)
                return false;
            st->value = (int64_t)pb_varint(p + off, vlen);
        }
        off += vlen;
    }
    return true;
}

/* NUL-terminates a decoded name where it lies, as protobuf-c's copy would
 * be: a name with a NUL inside ends at that NUL. */
static void cut_name(struct pn_core_stat *st)
{
    if (!st->len)
        return;
    char *name = (char *)(uintptr_t)st->name;
    size_t l = st->len;
    st->len = strnlen(name, l);
    name[l] = '\0';
}

/* Decodes the QueryStatsResponse in msg[0..len) in one pass (msg[len]
 * must be writable: the last name may end there). On success *out (caller
 * frees) holds *n stats whose names point into msg, NUL-terminated there.
 * On failure msg may have been changed (some names cut). */
static bool decode_query_stats(uint8_t *msg, size_t len, struct pn_core_stat **out, size_t *n)
{
    size_t cap = len / 32 + 16, count = 0, cut = 0, off = 0;
    struct pn_core_stat *st = pn_malloc(cap * sizeof *st);
    while (off < len) {
        uint32_t field;
        unsigned wt;
        size_t vlen, pre;
        if (msg[off] == 0x0a && len - off >= 2 && msg[off + 1] < 0x80) {
            /* a Stat shorter than 128 bytes: the usual shape */
            field = 1;
            wt = 2;
            off++;
            pre = 1;
            vlen = 1 + (size_t)msg[off];
            if (vlen > len - off)
                goto fail;
        } else {
            size_t k = pb_key(msg + off, len - off, &field, &wt);
            if (!k)
                goto fail;
            off += k;
            if (!pb_value(msg + off, len - off, wt, &vlen, &pre))
                goto fail;
        }
        /* Everything before this field has been read: the previous Stat's
         * name (which ends at the latest where this field's key began)
         * can be cut now. */
        while (cut < count)
            cut_name(&st[cut++]);
        if (field == 1) {
            if (wt != 2)
                goto fail;
            if (count == cap) {
                cap *= 2;
                st = pn_realloc(st, cap * sizeof *st);
            }
            if (!decode_stat(msg + off + pre, vlen - pre, &st[count]))
                goto fail;
            count++;
        }
        off += vlen;
    }
    while (cut < count)
        cut_name(&st[cut++]);
    *out = st;
    *n = count;
    return true;
fail:
    free(st);
    return false;
}

/* Decodes a successful reply for the typed helpers and runs the caller's
 * callback; a reply that does not decode becomes PN_ERR_PROTO. */
static void deliver_typed(struct call *c, struct pn_coreapi_result *r)
{
    bool ok = r->rv == PN_OK;
    switch (c->kind) {
    case REPLY_RAW:
        c->cb.raw(r, c->arg);
        return;
    case REPLY_STATS: {
        struct pn_core_stat *st = NULL;
        size_t n = 0;
        if (ok) {
            /* Room for the NUL after a name that ends the reply; the
             * reply is complete, so its size limit no longer applies. */
            c->body.max = 0;
            pn_buf_reserve(&c->body, 1);
            r->body = c->body.data + 5;
            if (!decode_query_stats(c->body.data + 5, r->len, &st, &n)) {
                *r = (struct pn_coreapi_result){PN_ERR_PROTO, GRPC_INTERNAL,
                                                "cannot decode QueryStatsResponse", NULL, 0};
                ok = false;
            }
        }
        if (!ok) {
            c->cb.stats(r, NULL, 0, c->arg);
            return;
        }
        c->api->delivering = c;
        c->cb.stats(r, st, n, c->arg);
        c->api->delivering = NULL;
        free(st);
        return;
    }
    case REPLY_SYS: {
        Pncore__SysStatsResponse *m =
            ok ? pncore__sys_stats_response__unpack(NULL, r->len, r->body) : NULL;
        if (!m) {
            if (ok)
                *r = (struct pn_coreapi_result){PN_ERR_PROTO, GRPC_INTERNAL,
                                                "cannot decode SysStatsResponse", NULL, 0};
            c->cb.sys(r, NULL, c->arg);
            return;
        }
        struct pn_core_sys_stats s = {
            .num_goroutine = m->numgoroutine,
            .num_gc = m->numgc,
            .alloc = m->alloc,
            .total_alloc = m->totalalloc,
            .sys = m->sys,
            .mallocs = m->mallocs,
            .frees = m->frees,
            .live_objects = m->liveobjects,
            .pause_total_ns = m->pausetotalns,
            .uptime = m->uptime,
        };
        c->cb.sys(r, &s, c->arg);
        pncore__sys_stats_response__free_unpacked(m, NULL);
        return;
    }
    case REPLY_ONLINE: {
        Pncore__GetStatsResponse *m =
            ok ? pncore__get_stats_response__unpack(NULL, r->len, r->body) : NULL;
        if (!m) {
            if (ok)
                *r = (struct pn_coreapi_result){PN_ERR_PROTO, GRPC_INTERNAL,
                                                "cannot decode GetStatsResponse", NULL, 0};
            c->cb.online(r, 0, c->arg);
            return;
        }
        c->cb.online(r, m->stat ? m->stat->value : 0, c->arg);
        pncore__get_stats_response__free_unpacked(m, NULL);
        return;
    }
    case REPLY_IPLIST: {
        Pncore__GetStatsOnlineIpListResponse *m =
            ok ? pncore__get_stats_online_ip_list_response__unpack(NULL, r->len, r->body) : NULL;
        if (!m) {
            if (ok)
                *r = (struct pn_coreapi_result){PN_ERR_PROTO, GRPC_INTERNAL,
                                                "cannot decode GetStatsOnlineIpListResponse", NULL,
                                                0};
            c->cb.iplist(r, NULL, 0, c->arg);
            return;
        }
        struct pn_core_online_ip *ips = pn_calloc(m->n_ips ? m->n_ips : 1, sizeof *ips);
        for (size_t i = 0; i < m->n_ips; i++) {
            ips[i].ip = m->ips[i]->key;
            ips[i].last_seen = m->ips[i]->value;
        }
        c->cb.iplist(r, ips, m->n_ips, c->arg);
        free(ips);
        pncore__get_stats_online_ip_list_response__free_unpacked(m, NULL);
        return;
    }
    }
}

/* Runs the call's callback exactly once. The call itself stays where it is
 * (an in-flight call is freed when its stream closes). */
static void deliver(struct call *c, int rv, int grpc_code, const char *message, const uint8_t *body,
                    size_t len)
{
    if (c->done)
        return;
    c->done = true;
    c->api->npending--;
    if (c->timer)
        event_del(c->timer);
    struct pn_coreapi_result r = {rv, grpc_code, message, body, len};
    deliver_typed(c, &r);
}

/* deliver() with a formatted message. */
static void deliver_err(struct call *c, int rv, int grpc_code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void deliver_err(struct call *c, int rv, int grpc_code, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    deliver(c, rv, grpc_code, msg, NULL, 0);
}

/* Judges a finished stream: HTTP status, grpc-status, then the one framed
 * message of a unary reply. */
static void finish_stream(struct call *c, uint32_t h2_error)
{
    if (c->http_status == 0) {
        if (h2_error)
            deliver_err(c, PN_ERR_IO, GRPC_UNAVAILABLE, "stream reset by core: %s",
                        nghttp2_http2_strerror(h2_error));
        else
            deliver_err(c, PN_ERR_PROTO, GRPC_INTERNAL, "no response headers from core");
        return;
    }
    if (c->http_status != 200) {
        deliver_err(c, PN_ERR_PROTO, c->grpc_status > 0 ? c->grpc_status : GRPC_UNKNOWN,
                    "HTTP status %d from core", c->http_status);
        return;
    }
    if (c->grpc_status < 0) {
        if (h2_error)
            deliver_err(c, PN_ERR_IO, GRPC_UNAVAILABLE, "stream reset by core: %s",
                        nghttp2_http2_strerror(h2_error));
        else
            deliver_err(c, PN_ERR_PROTO, GRPC_INTERNAL, "missing grpc-status");
        return;
    }
    if (c->grpc_status != GRPC_OK) {
        if (c->grpc_message && c->grpc_message[0])
            deliver(c, PN_ERR_PROTO, c->grpc_status, c->grpc_message, NULL, 0);
        else
            deliver_err(c, PN_ERR_PROTO, c->grpc_status, "gRPC status %d", c->grpc_status);
        return;
    }
    const uint8_t *b = c->body.data;
    size_t n = c->body.len;
    if (n < 5) {
        deliver_err(c, PN_ERR_PROTO, GRPC_INTERNAL, "reply without a message");
        return;
    }
    if (b[0] != 0) {
        deliver_err(c, PN_ERR_PROTO, GRPC_INTERNAL, "compressed reply (not requested)");
        return;
    }
    size_t mlen = (size_t)b[1] << 24 | (size_t)b[2] << 16 | (size_t)b[3] << 8 | b[4];
    if (mlen != n - 5) {
        deliver_err(c, PN_ERR_PROTO, GRPC_INTERNAL,
                    "reply framing: %zu bytes for a %zu-byte message", n - 5, mlen);
        return;
    }
    deliver(c, PN_OK, GRPC_OK, "OK", b + 5, mlen);
}

/* ---- nghttp2 callbacks (never free the session, never send) --------------- */

static void kick(struct pn_coreapi *api)
{
    if (!api->closing)
        event_active(api->kick, EV_TIMEOUT, 0);
}

static ssize_t on_send(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *ud)
{
    struct pn_coreapi *api = ud;
    struct evbuffer *out = bufferevent_get_output(api->bev);
    if (evbuffer_get_length(out) >= COREAPI_OUT_HIGH)
        return NGHTTP2_ERR_WOULDBLOCK;
    if (evbuffer_add(out, data, len) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    return (ssize_t)len;
}

static ssize_t read_body(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t len,
                         uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    struct call *c = src->ptr;
    size_t n = c->req_len - c->req_off;
    if (n > len)
        n = len;
    memcpy(buf, c->req + c->req_off, n);
    c->req_off += n;
    if (c->req_off == c->req_len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* grpc-message is percent-encoded (gRPC over HTTP/2 spec); a malformed
 * escape is kept literally. Returns a new string. */
static char *percent_decode(const uint8_t *v, size_t n)
{
    char *out = pn_malloc(n + 1);
    pn_percent_decode((const char *)v, n, out, false);
    return out;
}

static bool header_is(const uint8_t *name, size_t len, const char *want)
{
    return len == strlen(want) && memcmp(name, want, len) == 0;
}

/* Parses a small non-negative decimal; -1 when it is not one. */
static int parse_code(const uint8_t *v, size_t n)
{
    if (n == 0 || n > 6)
        return -1;
    int x = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return -1;
        x = x * 10 + (v[i] - '0');
    }
    return x;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags, void *ud)
{
    if (frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    struct call *c = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
    if (!c || c->done)
        return 0;
    if (header_is(name, namelen, ":status")) {
        int st = parse_code(value, valuelen);
        c->http_status = st > 0 ? st : 999;
    } else if (header_is(name, namelen, "grpc-status")) {
        int st = parse_code(value, valuelen);
        c->grpc_status = st >= 0 ? st : GRPC_UNKNOWN;
    } else if (header_is(name, namelen, "grpc-message")) {
        free(c->grpc_message);
        c->grpc_message = percent_decode(value, valuelen);
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t stream_id, const uint8_t *data,
                         size_t len, void *ud)
{
    struct call *c = nghttp2_session_get_stream_user_data(s, stream_id);
    if (!c || c->done)
        return 0;
    if (pn_buf_append(&c->body, data, len) != PN_OK) {
        pn_buf_free(&c->body);
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_CANCEL);
        deliver_err(c, PN_ERR_TOOBIG, GRPC_RESOURCE_EXHAUSTED, "reply larger than %zu bytes",
                    c->api->max_reply);
        kick(c->api);
        return 0;
    }
    /* Once the prefix announces the size, grow the buffer once. */
    if (c->body.len >= 5 && c->body.len - len < 5) {
        const uint8_t *b = c->body.data;
        size_t mlen = (size_t)b[1] << 24 | (size_t)b[2] << 16 | (size_t)b[3] << 8 | b[4];
        if (mlen <= c->api->max_reply && mlen + 5 > c->body.len)
            pn_buf_reserve(&c->body, mlen + 5 - c->body.len);
    }
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *ud)
{
    struct pn_coreapi *api = ud;
    if (frame->hd.type == NGHTTP2_GOAWAY) {
        /* Streams above last_stream_id close with REFUSED_STREAM and are
         * requeued; the rest finish here, then pump() reconnects. */
        api->draining = true;
    }
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code, void *ud)
{
    struct pn_coreapi *api = ud;
    struct call *c = nghttp2_session_get_stream_user_data(s, stream_id);
    if (!c || c->where != ON_INFLIGHT)
        return 0;
    list_remove(&api->inflight, c);
    c->where = ON_NONE;
    if (!c->done && error_code == NGHTTP2_REFUSED_STREAM && c->http_status == 0) {
        /* The core never processed it: safe to send again. */
        call_reset_response(c);
        c->stream_id = 0;
        c->req_off = 0;
        c->where = ON_QUEUE;
        list_push_front(&api->queue, c);
        kick(api);
        return 0;
    }
    finish_stream(c, error_code);
    call_free(c);
    return 0;
}

/* ---- the connection ------------------------------------------------------ */

/* Deletes the session and closes the socket, then fails the calls that were
 * on it. When the connection never came up (fail_queue) the waiting calls
 * fail too, so a dead core does not hold them until their timeouts; after a
 * loss the waiting calls get a fresh connection instead. */
static void conn_close(struct pn_coreapi *api, bool fail_queue, int rv, int grpc_code,
                       const char *why)
{
    struct call_list lost = list_take(&api->inflight);
    struct call_list waiting = {0};
    if (fail_queue)
        waiting = list_take(&api->queue);
    if (api->sess) {
        nghttp2_session_del(api->sess);
        api->sess = NULL;
    }
    if (api->bev) {
        bufferevent_free(api->bev);
        api->bev = NULL;
    }
    api->connected = false;
    api->draining = false;
    if (lost.n || waiting.n)
        pn_log_debug("coreapi %s: %s (%zu in flight, %zu waiting failed)", api->authority, why,
                     lost.n, waiting.n);
    struct call_list *lists[] = {&lost, &waiting};
    for (size_t i = 0; i < 2; i++) {
        struct call *c;
        while ((c = lists[i]->head)) {
            list_remove(lists[i], c);
            c->where = ON_NONE;
            deliver(c, rv, grpc_code, why, NULL, 0);
            call_free(c);
        }
    }
    if (api->queue.n)
        kick(api);
}

static void pump(struct pn_coreapi *api);

static void on_read(struct bufferevent *bev, void *ctx)
{
    struct pn_coreapi *api = ctx;
    struct evbuffer *in = bufferevent_get_input(bev);
    while (evbuffer_get_length(in) > 0) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        ssize_t n = nghttp2_session_mem_recv(api->sess, v.iov_base, v.iov_len);
        if (n < 0) {
            char why[128];
            snprintf(why, sizeof why, "HTTP/2 error from core: %s", nghttp2_strerror((int)n));
            conn_close(api, false, PN_ERR_IO, GRPC_UNAVAILABLE, why);
            return;
        }
        evbuffer_drain(in, (size_t)n);
    }
    pump(api);
}

static void on_write(struct bufferevent *bev, void *ctx)
{
    pump(ctx);
}

static void on_event(struct bufferevent *bev, short what, void *ctx)
{
    struct pn_coreapi *api = ctx;
    if (what & BEV_EVENT_CONNECTED) {
        api->connected = true;
        pump(api);
        return;
    }
    if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)))
        return;
    char why[160];
    int err = EVUTIL_SOCKET_ERROR();
    if (!api->connected) {
        snprintf(why, sizeof why, "cannot connect to core API %s: %s", api->authority,
                 err ? strerror(err) : "connection failed");
        conn_close(api, true, PN_ERR_IO, GRPC_UNAVAILABLE, why);
    } else {
        snprintf(why, sizeof why, "connection to core API %s lost: %s", api->authority,
                 (what & BEV_EVENT_EOF) ? "closed by core"
                 : err                  ? strerror(err)
                                        : "error");
        conn_close(api, false, PN_ERR_IO, GRPC_UNAVAILABLE, why);
    }
}

/* Starts a TCP connect and an HTTP/2 session whose preface and SETTINGS are
 * queued at once, so requests can be submitted before the connect completes.
 * Returns PN_OK or PN_ERR_IO (with the waiting calls failed). */
static int conn_open(struct pn_coreapi *api)
{
    char why[160];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, sizeof why, "socket: %s", strerror(errno));
        goto fail;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    api->bev = bufferevent_socket_new(api->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!api->bev) {
        close(fd);
        snprintf(why, sizeof why, "bufferevent_socket_new failed");
        goto fail;
    }
    bufferevent_setcb(api->bev, on_read, on_write, on_event, api);

    nghttp2_session_callbacks *cbs;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        abort();
    nghttp2_session_callbacks_set_send_callback(cbs, on_send);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    int rv = nghttp2_session_client_new(&api->sess, cbs, api);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0)
        abort(); /* only NGHTTP2_ERR_NOMEM: the node's OOM policy */
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, COREAPI_STREAM_WINDOW},
    };
    nghttp2_submit_settings(api->sess, NGHTTP2_FLAG_NONE, iv, sizeof iv / sizeof iv[0]);
    nghttp2_session_set_local_window_size(api->sess, NGHTTP2_FLAG_NONE, 0, COREAPI_CONN_WINDOW);

    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(api->port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bufferevent_socket_connect(api->bev, (struct sockaddr *)&sin, sizeof sin) != 0) {
        int err = EVUTIL_SOCKET_ERROR();
        snprintf(why, sizeof why, "cannot connect to core API %s: %s", api->authority,
                 err ? strerror(err) : "connect failed");
        goto fail;
    }
    bufferevent_enable(api->bev, EV_READ | EV_WRITE);
    api->connected = false;
    api->draining = false;
    return PN_OK;
fail:
    conn_close(api, true, PN_ERR_IO, GRPC_UNAVAILABLE, why);
    return PN_ERR_IO;
}

/* Formats a grpc-timeout value (at most 8 digits, per the gRPC spec). */
static void format_timeout(uint64_t ms, char *out, size_t outlen)
{
    if (ms == 0)
        ms = 1;
    if (ms <= 99999999)
        snprintf(out, outlen, "%" PRIu64 "m", ms);
    else
        snprintf(out, outlen, "%" PRIu64 "S", (ms + 999) / 1000);
}

#define NV_CONST(n, v)                                                                             \
    {                                                                                              \
        (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1,                              \
            NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE                           \
    }
#define NV_VAR(n, v)                                                                               \
    {                                                                                              \
        (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NO_COPY_NAME     \
    }

/* Moves the head of the queue onto the session. Returns false when the
 * session can take no more streams. */
static bool submit_one(struct pn_coreapi *api)
{
    struct call *c = api->queue.head;
    char tmo[24];
    nghttp2_nv nva[8] = {
        NV_CONST(":method", "POST"),
        NV_CONST(":scheme", "http"),
        NV_VAR(":path", c->path),
        NV_VAR(":authority", api->authority),
        NV_CONST("content-type", "application/grpc"),
        NV_CONST("te", "trailers"),
        NV_CONST("user-agent", "proxynode"),
    };
    size_t nvlen = 7;
    if (c->deadline_ms) {
        uint64_t now = pn_now_ms();
        format_timeout(c->deadline_ms > now ? c->deadline_ms - now : 1, tmo, sizeof tmo);
        nva[nvlen++] = (nghttp2_nv)NV_VAR("grpc-timeout", tmo);
    }
    nghttp2_data_provider prd = {.source.ptr = c, .read_callback = read_body};
    int32_t id = nghttp2_submit_request(api->sess, NULL, nva, nvlen, &prd, c);
    if (id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE) {
        /* 2^30 streams used: finish this connection, continue on a new one. */
        api->draining = true;
        return false;
    }
    list_remove(&api->queue, c);
    if (id < 0) {
        c->where = ON_NONE;
        deliver_err(c, PN_ERR_IO, GRPC_INTERNAL, "cannot submit request: %s", nghttp2_strerror(id));
        call_free(c);
        return true;
    }
    c->stream_id = id;
    c->where = ON_INFLIGHT;
    list_push_back(&api->inflight, c);
    return true;
}

/* The one place that connects, submits waiting calls and writes frames;
 * runs from libevent callbacks only. */
static void pump(struct pn_coreapi *api)
{
    if (api->closing)
        return;
    if (api->sess && !nghttp2_session_want_read(api->sess) &&
        !nghttp2_session_want_write(api->sess)) {
        /* The session is over (GOAWAY drained, or a fatal error sent). */
        conn_close(api, false, PN_ERR_IO, GRPC_UNAVAILABLE, "HTTP/2 session with core ended");
    }
    if (api->sess && api->draining && api->inflight.n == 0)
        conn_close(api, false, PN_ERR_IO, GRPC_UNAVAILABLE, "HTTP/2 session with core ended");
    if (!api->sess) {
        if (!api->queue.n || conn_open(api) != PN_OK)
            return;
    }
    if (!api->draining) {
        uint32_t max =
            nghttp2_session_get_remote_settings(api->sess, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
        while (api->queue.head && api->inflight.n < max)
            if (!submit_one(api))
                break;
    }
    int rv = nghttp2_session_send(api->sess);
    if (rv != 0) {
        char why[128];
        snprintf(why, sizeof why, "HTTP/2 send: %s", nghttp2_strerror(rv));
        conn_close(api, false, PN_ERR_IO, GRPC_UNAVAILABLE, why);
    }
}

static void on_kick(evutil_socket_t fd, short what, void *arg)
{
    pump(arg);
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct call *c = arg;
    struct pn_coreapi *api = c->api;
    if (c->where == ON_QUEUE) {
        list_remove(&api->queue, c);
        c->where = ON_NONE;
        deliver_err(c, PN_ERR_TIMEOUT, GRPC_DEADLINE_EXCEEDED, "no reply from core in time");
        call_free(c);
        return;
    }
    /* In flight: cancel the stream; the call is freed when it closes. */
    nghttp2_submit_rst_stream(api->sess, NGHTTP2_FLAG_NONE, c->stream_id, NGHTTP2_CANCEL);
    deliver_err(c, PN_ERR_TIMEOUT, GRPC_DEADLINE_EXCEEDED, "no reply from core in time");
    pump(api);
}

/* ---- public API ------------------------------------------------------------ */

struct pn_coreapi *pn_coreapi_new(struct event_base *base, uint16_t port, enum pn_core_kind kind)
{
    struct pn_coreapi *api = pn_new(struct pn_coreapi);
    api->base = base;
    api->port = port;
    api->kind = kind;
    api->max_reply = COREAPI_MAX_REPLY;
    snprintf(api->authority, sizeof api->authority, "127.0.0.1:%u", (unsigned)port);
    api->kick = event_new(base, -1, 0, on_kick, api);
    if (!api->kick)
        abort();
    return api;
}

void pn_coreapi_free(struct pn_coreapi *api)
{
    if (!api)
        return;
    api->closing = true;
    struct call_list lost = list_take(&api->inflight);
    struct call_list waiting = list_take(&api->queue);
    if (api->sess)
        nghttp2_session_del(api->sess);
    if (api->bev)
        bufferevent_free(api->bev);
    api->sess = NULL;
    api->bev = NULL;
    struct call_list *lists[] = {&lost, &waiting};
    for (size_t i = 0; i < 2; i++) {
        struct call *c;
        while ((c = lists[i]->head)) {
            list_remove(lists[i], c);
            deliver(c, PN_ERR_CLOSED, GRPC_CANCELLED, "core API client closed", NULL, 0);
            call_free(c);
        }
    }
    event_free(api->kick);
    free(api);
}

size_t pn_coreapi_pending(const struct pn_coreapi *api)
{
    return api->npending;
}

/* Queues a call whose framed request (prefix + message) the call steals. */
static int start_call(struct pn_coreapi *api, const char *path, uint8_t *framed, size_t framed_len,
                      unsigned timeout_ms, enum reply_kind kind, void (*cb)(void), void *arg)
{
    if (!api || api->closing || !path || path[0] != '/' || !cb) {
        free(framed);
        return PN_ERR_INVAL;
    }
    struct call *c = pn_new(struct call);
    if (snprintf(c->path, sizeof c->path, "%s", path) >= (int)sizeof c->path) {
        free(c);
        free(framed);
        return PN_ERR_INVAL;
    }
    c->api = api;
    c->req = framed;
    c->req_len = framed_len;
    c->kind = kind;
    switch (kind) {
    case REPLY_RAW:
        c->cb.raw = (pn_coreapi_cb)cb;
        break;
    case REPLY_STATS:
        c->cb.stats = (pn_coreapi_stats_cb)cb;
        break;
    case REPLY_SYS:
        c->cb.sys = (pn_coreapi_sys_cb)cb;
        break;
    case REPLY_ONLINE:
        c->cb.online = (pn_coreapi_online_cb)cb;
        break;
    case REPLY_IPLIST:
        c->cb.iplist = (pn_coreapi_iplist_cb)cb;
        break;
    }
    c->arg = arg;
    call_reset_response(c);
    if (timeout_ms) {
        c->deadline_ms = pn_now_ms() + timeout_ms;
        c->timer = evtimer_new(api->base, on_timeout, c);
        if (!c->timer)
            abort();
        struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        evtimer_add(c->timer, &tv);
    }
    c->where = ON_QUEUE;
    list_push_back(&api->queue, c);
    api->npending++;
    kick(api);
    return PN_OK;
}

/* A packed message behind a 5-byte gRPC prefix, in a new buffer. */
static uint8_t *frame_message(const ProtobufCMessage *m, size_t *framed_len)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *b = pn_malloc(n + 5);
    b[0] = 0;
    b[1] = (uint8_t)(n >> 24);
    b[2] = (uint8_t)(n >> 16);
    b[3] = (uint8_t)(n >> 8);
    b[4] = (uint8_t)n;
    protobuf_c_message_pack(m, b + 5);
    *framed_len = n + 5;
    return b;
}

/* A packed message as TypedMessage value bytes (caller frees data). */
static ProtobufCBinaryData pack_value(const ProtobufCMessage *m)
{
    ProtobufCBinaryData v;
    v.len = protobuf_c_message_get_packed_size(m);
    v.data = pn_malloc(v.len ? v.len : 1);
    protobuf_c_message_pack(m, v.data);
    return v;
}

int pn_coreapi_call(struct pn_coreapi *api, const char *path, const uint8_t *req, size_t len,
                    unsigned timeout_ms, pn_coreapi_cb cb, void *arg)
{
    if (len > UINT32_MAX || (len && !req))
        return PN_ERR_INVAL;
    uint8_t *b = pn_malloc(len + 5);
    b[0] = 0;
    b[1] = (uint8_t)(len >> 24);
    b[2] = (uint8_t)(len >> 16);
    b[3] = (uint8_t)(len >> 8);
    b[4] = (uint8_t)len;
    if (len)
        memcpy(b + 5, req, len);
    return start_call(api, path, b, len + 5, timeout_ms, REPLY_RAW, (void (*)(void))cb, arg);
}

static char *str_or_empty(const char *s)
{
    return (char *)(s ? s : protobuf_c_empty_string);
}

/* Encodes the account for this core as TypedMessage type + value; value.data
 * is allocated. Returns PN_OK or PN_ERR_INVAL (missing field, or a protocol or
 * cipher the core lacks). */
static int encode_account(enum pn_core_kind kind, const struct pn_core_account *a, char *type,
                          size_t typelen, ProtobufCBinaryData *value)
{
    switch (a->proto) {
    case PN_CORE_PROTO_VMESS: {
        if (!a->id)
            return PN_ERR_INVAL;
        Pncore__VmessAccount m = PNCORE__VMESS_ACCOUNT__INIT;
        m.id = (char *)a->id; /* alter_id stays 0: AEAD, not serialized */
        pn_dialect_type(kind, "proxy.vmess.Account", type, typelen);
        *value = pack_value(&m.base);
        return PN_OK;
    }
    case PN_CORE_PROTO_VLESS: {
        if (!a->id)
            return PN_ERR_INVAL;
        Pncore__VlessAccount m = PNCORE__VLESS_ACCOUNT__INIT;
        m.id = (char *)a->id;
        m.flow = str_or_empty(a->flow);
        pn_dialect_type(kind, "proxy.vless.Account", type, typelen);
        *value = pack_value(&m.base);
        return PN_OK;
    }
    case PN_CORE_PROTO_TROJAN: {
        if (!a->password)
            return PN_ERR_INVAL;
        Pncore__TrojanAccount m = PNCORE__TROJAN_ACCOUNT__INIT;
        m.password = (char *)a->password;
        pn_dialect_type(kind, "proxy.trojan.Account", type, typelen);
        *value = pack_value(&m.base);
        return PN_OK;
    }
    case PN_CORE_PROTO_SHADOWSOCKS: {
        if (!a->password || !a->method)
            return PN_ERR_INVAL;
        int cipher = pn_dialect_ss_cipher(kind, a->method);
        if (cipher < 0)
            return PN_ERR_INVAL;
        Pncore__ShadowsocksAccount m = PNCORE__SHADOWSOCKS_ACCOUNT__INIT;
        m.password = (char *)a->password;
        m.cipher_type = cipher;
        pn_dialect_type(kind, "proxy.shadowsocks.Account", type, typelen);
        *value = pack_value(&m.base);
        return PN_OK;
    }
    case PN_CORE_PROTO_SS2022: {
        if (!a->key || kind != PN_CORE_XRAY)
            return PN_ERR_INVAL;
        Pncore__Shadowsocks2022Account m = PNCORE__SHADOWSOCKS2022_ACCOUNT__INIT;
        m.key = (char *)a->key;
        pn_dialect_type(kind, "proxy.shadowsocks_2022.Account", type, typelen);
        *value = pack_value(&m.base);
        return PN_OK;
    }
    case PN_CORE_PROTO_HYSTERIA: {
        if (!a->auth || kind != PN_CORE_XRAY)
            return PN_ERR_INVAL;
        Pncore__HysteriaAccount m = PNCORE__HYSTERIA_ACCOUNT__INIT;
        m.auth = (char *)a->auth;
        pn_dialect_type(kind, "proxy.hysteria.account.Account", type, typelen);
        *value = pack_value(&m.base);
        return PN_OK;
    }
    }
    return PN_ERR_INVAL;
}

/* AlterInboundRequest{tag, TypedMessage{op_type, op}} framed for sending. */
static uint8_t *frame_alter(enum pn_core_kind kind, const char *tag, const char *op_suffix,
                            const ProtobufCMessage *op, size_t *framed_len)
{
    char op_type[96];
    pn_dialect_type(kind, op_suffix, op_type, sizeof op_type);
    Pncore__TypedMessage tm = PNCORE__TYPED_MESSAGE__INIT;
    tm.type = op_type;
    tm.value = pack_value(op);
    Pncore__AlterInboundRequest req = PNCORE__ALTER_INBOUND_REQUEST__INIT;
    req.tag = (char *)tag;
    req.operation = &tm;
    uint8_t *b = frame_message(&req.base, framed_len);
    free(tm.value.data);
    return b;
}

/* The framed AddUser request (split out so the unit test can compare bytes).
 * Returns NULL when the account cannot be encoded for this core. */
static uint8_t *encode_add_user(enum pn_core_kind kind, const char *tag, const char *email,
                                uint32_t level, const struct pn_core_account *acct,
                                size_t *framed_len)
{
    char acct_type[96];
    Pncore__TypedMessage account = PNCORE__TYPED_MESSAGE__INIT;
    if (encode_account(kind, acct, acct_type, sizeof acct_type, &account.value) != PN_OK)
        return NULL;
    account.type = acct_type;
    Pncore__User user = PNCORE__USER__INIT;
    user.level = level;
    user.email = (char *)email;
    user.account = &account;
    Pncore__AddUserOperation op = PNCORE__ADD_USER_OPERATION__INIT;
    op.user = &user;
    uint8_t *b =
        frame_alter(kind, tag, "app.proxyman.command.AddUserOperation", &op.base, framed_len);
    free(account.value.data);
    return b;
}

static const char *handler_path(struct pn_coreapi *api, const char *method, char *out,
                                size_t outlen)
{
    return pn_dialect_path(api->kind, PN_SVC_HANDLER, method, out, outlen);
}

static const char *stats_path(struct pn_coreapi *api, const char *method, char *out, size_t outlen)
{
    return pn_dialect_path(api->kind, PN_SVC_STATS, method, out, outlen);
}

int pn_coreapi_add_user(struct pn_coreapi *api, const char *tag, const char *email, uint32_t level,
                        const struct pn_core_account *acct, unsigned timeout_ms, pn_coreapi_cb cb,
                        void *arg)
{
    if (!api || !tag || !email || !acct || !cb)
        return PN_ERR_INVAL;
    size_t n;
    uint8_t *b = encode_add_user(api->kind, tag, email, level, acct, &n);
    if (!b)
        return PN_ERR_INVAL;
    char path[128];
    return start_call(api, handler_path(api, "AlterInbound", path, sizeof path), b, n, timeout_ms,
                      REPLY_RAW, (void (*)(void))cb, arg);
}

int pn_coreapi_remove_user(struct pn_coreapi *api, const char *tag, const char *email,
                           unsigned timeout_ms, pn_coreapi_cb cb, void *arg)
{
    if (!api || !tag || !email || !cb)
        return PN_ERR_INVAL;
    Pncore__RemoveUserOperation op = PNCORE__REMOVE_USER_OPERATION__INIT;
    op.email = (char *)email;
    size_t n;
    uint8_t *b =
        frame_alter(api->kind, tag, "app.proxyman.command.RemoveUserOperation", &op.base, &n);
    char path[128];
    return start_call(api, handler_path(api, "AlterInbound", path, sizeof path), b, n, timeout_ms,
                      REPLY_RAW, (void (*)(void))cb, arg);
}

int pn_coreapi_remove_inbound(struct pn_coreapi *api, const char *tag, unsigned timeout_ms,
                              pn_coreapi_cb cb, void *arg)
{
    if (!api || !tag || !cb)
        return PN_ERR_INVAL;
    Pncore__RemoveInboundRequest req = PNCORE__REMOVE_INBOUND_REQUEST__INIT;
    req.tag = (char *)tag;
    size_t n;
    uint8_t *b = frame_message(&req.base, &n);
    char path[128];
    return start_call(api, handler_path(api, "RemoveInbound", path, sizeof path), b, n, timeout_ms,
                      REPLY_RAW, (void (*)(void))cb, arg);
}

void *pn_coreapi_take_reply(struct pn_coreapi *api)
{
    struct call *c = api->delivering;
    if (!c)
        return NULL;
    void *p = c->body.data;
    pn_buf_init(&c->body, 0);
    return p;
}

int pn_coreapi_query_stats(struct pn_coreapi *api, const char *pattern, bool reset,
                           unsigned timeout_ms, pn_coreapi_stats_cb cb, void *arg)
{
    if (!api || !cb)
        return PN_ERR_INVAL;
    Pncore__QueryStatsRequest req = PNCORE__QUERY_STATS_REQUEST__INIT;
    req.pattern = str_or_empty(pattern);
    req.reset = reset;
    size_t n;
    uint8_t *b = frame_message(&req.base, &n);
    char path[128];
    return start_call(api, stats_path(api, "QueryStats", path, sizeof path), b, n, timeout_ms,
                      REPLY_STATS, (void (*)(void))cb, arg);
}

int pn_coreapi_sys_stats(struct pn_coreapi *api, unsigned timeout_ms, pn_coreapi_sys_cb cb,
                         void *arg)
{
    if (!api || !cb)
        return PN_ERR_INVAL;
    Pncore__SysStatsRequest req = PNCORE__SYS_STATS_REQUEST__INIT;
    size_t n;
    uint8_t *b = frame_message(&req.base, &n);
    char path[128];
    return start_call(api, stats_path(api, "GetSysStats", path, sizeof path), b, n, timeout_ms,
                      REPLY_SYS, (void (*)(void))cb, arg);
}

/* GetStatsRequest{name} to one of the Xray online-stats methods. */
static int start_online(struct pn_coreapi *api, const char *method, const char *name,
                        unsigned timeout_ms, enum reply_kind kind, void (*cb)(void), void *arg)
{
    if (!api || !name || !cb)
        return PN_ERR_INVAL;
    Pncore__GetStatsRequest req = PNCORE__GET_STATS_REQUEST__INIT;
    req.name = (char *)name;
    size_t n;
    uint8_t *b = frame_message(&req.base, &n);
    char path[128];
    return start_call(api, stats_path(api, method, path, sizeof path), b, n, timeout_ms, kind, cb,
                      arg);
}

int pn_coreapi_stats_online(struct pn_coreapi *api, const char *name, unsigned timeout_ms,
                            pn_coreapi_online_cb cb, void *arg)
{
    return start_online(api, "GetStatsOnline", name, timeout_ms, REPLY_ONLINE, (void (*)(void))cb,
                        arg);
}

int pn_coreapi_stats_online_iplist(struct pn_coreapi *api, const char *name, unsigned timeout_ms,
                                   pn_coreapi_iplist_cb cb, void *arg)
{
    return start_online(api, "GetStatsOnlineIpList", name, timeout_ms, REPLY_IPLIST,
                        (void (*)(void))cb, arg);
}
