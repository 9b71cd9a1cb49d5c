/* gRPC server calls on top of the HTTP/2 streams of h2.c. This module owns
 * struct pn_grpc_call: it builds one when a gRPC request's headers arrive,
 * runs the service's intercept hook and the method lookup, cuts the request
 * DATA into length-prefixed messages for the handler, answers with response
 * headers, prefixed messages and grpc-status trailers (or a trailers-only
 * HEADERS frame for early answers), and enforces the message size limit and
 * grpc-timeout deadlines. It also holds the wire helpers grpc.h exposes for
 * tests and fuzzing (decoder, prefix, timeout parser, grpc-message encoding,
 * code→HTTP table).
 *
 * A call is freed in exactly two places: when it is finished (by the handler
 * or by this module) and when h2.c reports its stream gone. When a finish
 * happens while this module is still using the call further up the stack
 * (inside the decoder or intercept), the free is deferred until that use
 * ends (call->busy). */
#include "net/grpc.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"
#include "net/h2_internal.h"

#define GRPC_DEFAULT_MAX_MESSAGE ((size_t)64 << 20)

struct pn_grpc_call {
    struct pn__h2_stream *stream; /* NULL once the call left its stream */
    const struct pn_grpc_service *svc;
    const struct pn_grpc_method *m; /* NULL for unknown paths */
    char *path;
    const struct pn_http_header *md; /* borrowed from the stream */
    size_t nmd;
    const struct pn_peer *peer;
    void *data;
    struct pn_grpc_decoder dec;
    struct event *deadline;
    void (*on_writable)(struct pn_grpc_call *call);
    int busy;          /* frames of this module using the call */
    bool dispatched;   /* intercept passed, the handler owns the call */
    bool delivered;    /* unary / server-stream: the request was handed over */
    bool headers_sent; /* response HEADERS submitted */
    bool finished;     /* answered (or gone); nothing more reaches the handler */
    bool cancelling;   /* inside on_cancel: a finish from the handler is ignored */
};

/* ---- framing helpers ----------------------------------------------------- */

void pn_grpc_decoder_init(struct pn_grpc_decoder *d, size_t max)
{
    memset(d, 0, sizeof *d);
    d->max = max;
}

void pn_grpc_decoder_free(struct pn_grpc_decoder *d)
{
    free(d->msg);
    d->msg = NULL;
    d->hdr_have = d->msg_len = d->msg_have = 0;
}

bool pn_grpc_decoder_idle(const struct pn_grpc_decoder *d)
{
    return d->hdr_have == 0;
}

/* The message buffer grows in powers of two up to the declared length, so a
 * peer that declares 64 MiB and sends little does not make the node hold
 * 64 MiB. The capacity is derived from msg_have, so the decoder needs no
 * extra field. */
static size_t decoder_cap(const struct pn_grpc_decoder *d, size_t have)
{
    if (have == 0)
        return 0;
    size_t cap = 4096;
    while (cap < have && cap < d->msg_len)
        cap *= 2;
    return cap < d->msg_len ? cap : d->msg_len;
}

int pn_grpc_decoder_feed(struct pn_grpc_decoder *d, const uint8_t *data, size_t len,
                         void (*on_msg)(void *arg, const uint8_t *msg, size_t len), void *arg,
                         uint64_t *too_big)
{
    size_t off = 0;
    for (;;) {
        if (d->hdr_have < 5) {
            if (off == len)
                break;
            size_t n = 5 - d->hdr_have;
            if (n > len - off)
                n = len - off;
            memcpy(d->hdr + d->hdr_have, data + off, n);
            d->hdr_have += n;
            off += n;
            if (d->hdr_have < 5)
                break;
            if (d->hdr[0] != 0)
                return PN_ERR_PROTO; /* compressed (or undefined flags) */
            uint64_t mlen = (uint64_t)d->hdr[1] << 24 | (uint64_t)d->hdr[2] << 16 |
                            (uint64_t)d->hdr[3] << 8 | d->hdr[4];
            if (mlen > d->max) {
                if (too_big)
                    *too_big = mlen;
                return PN_ERR_TOOBIG;
            }
            d->msg_len = (size_t)mlen;
            d->msg_have = 0;
        }
        size_t n = d->msg_len - d->msg_have;
        if (n > len - off)
            n = len - off;
        if (n > 0) {
            size_t old_cap = decoder_cap(d, d->msg_have);
            size_t new_cap = decoder_cap(d, d->msg_have + n);
            if (new_cap != old_cap)
                d->msg = pn_realloc(d->msg, new_cap);
            memcpy(d->msg + d->msg_have, data + off, n);
            d->msg_have += n;
            off += n;
        }
        if (d->msg_have < d->msg_len)
            break;
        static const uint8_t empty[1];
        uint8_t *msg = d->msg;
        size_t mlen = d->msg_len;
        d->msg = NULL;
        d->hdr_have = d->msg_len = d->msg_have = 0;
        on_msg(arg, msg ? msg : empty, mlen);
        free(msg);
    }
    return PN_OK;
}

void pn_grpc_frame_header(uint8_t out[5], size_t len)
{
    out[0] = 0;
    out[1] = (uint8_t)(len >> 24);
    out[2] = (uint8_t)(len >> 16);
    out[3] = (uint8_t)(len >> 8);
    out[4] = (uint8_t)len;
}

/* grpc-timeout is 1-8 ASCII digits and one unit letter (PROTOCOL-HTTP2.md).
 * Sub-millisecond remainders round up so a short deadline never becomes 0. */
bool pn_grpc_parse_timeout(const char *v, uint64_t *ms)
{
    if (!v)
        return false;
    size_t n = strlen(v);
    if (n < 2 || n > 9)
        return false;
    uint64_t x = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return false;
        x = x * 10 + (uint64_t)(v[i] - '0');
    }
    switch (v[n - 1]) {
    case 'H':
        x *= 3600000;
        break;
    case 'M':
        x *= 60000;
        break;
    case 'S':
        x *= 1000;
        break;
    case 'm':
        break;
    case 'u':
        x = (x + 999) / 1000;
        break;
    case 'n':
        x = (x + 999999) / 1000000;
        break;
    default:
        return false;
    }
    *ms = x;
    return true;
}

char *pn_grpc_encode_message(const char *msg)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)msg; *p; p++)
        n += (*p < 0x20 || *p > 0x7e || *p == '%') ? 3 : 1;
    char *out = pn_malloc(n + 1), *o = out;
    for (const unsigned char *p = (const unsigned char *)msg; *p; p++) {
        if (*p < 0x20 || *p > 0x7e || *p == '%') {
            *o++ = '%';
            *o++ = hex[*p >> 4];
            *o++ = hex[*p & 15];
        } else {
            *o++ = (char)*p;
        }
    }
    *o = '\0';
    return out;
}

int pn_grpc_code_to_http(enum pn_grpc_code code)
{
    switch (code) {
    case PN_GRPC_OK:
        return 200;
    case PN_GRPC_CANCELLED:
        return 499;
    case PN_GRPC_INVALID_ARGUMENT:
    case PN_GRPC_OUT_OF_RANGE:
        return 400;
    case PN_GRPC_UNAUTHENTICATED:
        return 401;
    case PN_GRPC_PERMISSION_DENIED:
        return 403;
    case PN_GRPC_NOT_FOUND:
        return 404;
    case PN_GRPC_ALREADY_EXISTS:
    case PN_GRPC_ABORTED:
        return 409;
    case PN_GRPC_FAILED_PRECONDITION:
        return 412;
    case PN_GRPC_RESOURCE_EXHAUSTED:
        return 429;
    case PN_GRPC_UNIMPLEMENTED:
        return 501;
    case PN_GRPC_UNAVAILABLE:
        return 503;
    case PN_GRPC_DEADLINE_EXCEEDED:
        return 504;
    default:
        return 500;
    }
}

/* ---- accessors ----------------------------------------------------------- */

const char *pn_grpc_call_path(const struct pn_grpc_call *call)
{
    return call->path;
}

const struct pn_grpc_method *pn_grpc_call_method(const struct pn_grpc_call *call)
{
    return call->m;
}

const char *pn_grpc_call_metadata(const struct pn_grpc_call *call, const char *key)
{
    for (size_t i = 0; i < call->nmd; i++)
        if (strcasecmp(call->md[i].name, key) == 0)
            return call->md[i].value;
    return NULL;
}

const struct pn_peer *pn_grpc_call_peer(const struct pn_grpc_call *call)
{
    return call->peer;
}

void *pn_grpc_call_service_arg(const struct pn_grpc_call *call)
{
    return call->svc ? call->svc->arg : NULL;
}

void pn_grpc_call_set_data(struct pn_grpc_call *call, void *data)
{
    call->data = data;
}

void *pn_grpc_call_data(const struct pn_grpc_call *call)
{
    return call->data;
}

/* ---- call lifetime ------------------------------------------------------- */

static void call_free(struct pn_grpc_call *call)
{
    if (call->deadline)
        event_free(call->deadline);
    pn_grpc_decoder_free(&call->dec);
    free(call->path);
    free(call);
}

/* Frees a finished call unless a frame further up still uses it. */
static void call_release(struct pn_grpc_call *call)
{
    if (call->finished && call->busy == 0)
        call_free(call);
}

/* Answers the call and detaches it from its stream: trailers-only when no
 * response HEADERS went out yet, else trailers after the queued messages.
 * http_status is only used for trailers-only answers. The call memory is
 * released by the caller (call_release) or right here when nothing holds it. */
static void call_end(struct pn_grpc_call *call, int http_status, enum pn_grpc_code code,
                     const char *message)
{
    if (call->finished)
        return;
    call->finished = true;
    if (call->deadline)
        event_del(call->deadline);
    struct pn__h2_stream *s = call->stream;
    call->stream = NULL;
    if (s) {
        char status[16], codebuf[16];
        snprintf(status, sizeof status, "%d", http_status);
        snprintf(codebuf, sizeof codebuf, "%d", (int)code);
        char *enc = message && *message ? pn_grpc_encode_message(message) : NULL;
        struct pn_http_header h[5];
        size_t n = 0;
        if (!call->headers_sent) {
            h[n++] = (struct pn_http_header){":status", status};
            h[n++] = (struct pn_http_header){"content-type", "application/grpc"};
        }
        h[n++] = (struct pn_http_header){"grpc-status", codebuf};
        if (enc)
            h[n++] = (struct pn_http_header){"grpc-message", enc};
        pn__h2_stream_set_call(s, NULL);
        if (!call->headers_sent)
            pn__h2_stream_headers(s, h, n, true);
        else
            pn__h2_stream_end(s, h, n);
        free(enc);
        /* may free s (and other finished streams); nothing here touches s after */
        pn__h2_stream_flush(s);
    }
    if (call->busy == 0)
        call_free(call);
}

void pn_grpc_call_finish(struct pn_grpc_call *call, enum pn_grpc_code code, const char *message)
{
    if (call->cancelling || call->finished)
        return;
    call_end(call, 200, code, message);
}

int pn_grpc_call_send(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    if (call->finished || !call->stream)
        return PN_ERR_CLOSED;
    if (!call->headers_sent) {
        static const struct pn_http_header h[] = {
            {":status", "200"},
            {"content-type", "application/grpc"},
        };
        if (pn__h2_stream_headers(call->stream, h, 2, false) < 0)
            return PN_ERR_CLOSED;
        call->headers_sent = true;
    }
    uint8_t prefix[5];
    pn_grpc_frame_header(prefix, len);
    pn__h2_stream_write(call->stream, prefix, sizeof prefix);
    if (len)
        pn__h2_stream_write(call->stream, msg, len);
    pn__h2_stream_flush(call->stream);
    return PN_OK;
}

size_t pn_grpc_call_pending(const struct pn_grpc_call *call)
{
    return call->stream ? pn__h2_stream_pending(call->stream) : 0;
}

void pn_grpc_call_set_on_writable(struct pn_grpc_call *call, void (*cb)(struct pn_grpc_call *call))
{
    call->on_writable = cb;
    if (cb && call->stream && !call->finished)
        pn__h2_stream_want_writable(call->stream);
}

/* ---- call machinery (h2.c side) ------------------------------------------ */

/* The deadline from grpc-timeout passed before the handler finished: the
 * handler is told first, then the client gets DEADLINE_EXCEEDED. */
static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    struct pn_grpc_call *call = arg;
    (void)fd;
    (void)what;
    if (call->finished)
        return;
    call->busy++;
    if (call->dispatched && call->m && call->m->on_cancel) {
        call->cancelling = true;
        call->m->on_cancel(call);
        call->cancelling = false;
    }
    call_end(call, 200, PN_GRPC_DEADLINE_EXCEEDED, "context deadline exceeded");
    call->busy--;
    call_release(call);
}

static const struct pn_grpc_method *find_method(const struct pn_grpc_service *svc, const char *path)
{
    if (!svc)
        return NULL;
    for (size_t i = 0; i < svc->nmethods; i++)
        if (strcmp(svc->methods[i].path, path) == 0)
            return &svc->methods[i];
    return NULL;
}

/* grpc-go's texts for a path it cannot route, so clients see the same
 * answer from proxynode as from the reference node. */
static void refuse_unknown(struct pn_grpc_call *call)
{
    const char *path = call->path;
    const char *slash = path[0] == '/' ? strchr(path + 1, '/') : NULL;
    char *msg;
    if (!slash || slash[1] == '\0') {
        msg = pn_asprintf("malformed method name: \"%s\"", path);
    } else {
        size_t svclen = (size_t)(slash - path); /* "/service.X" */
        bool known = false;
        for (size_t i = 0; call->svc && i < call->svc->nmethods; i++) {
            const char *mp = call->svc->methods[i].path;
            if (strncmp(mp, path, svclen + 1) == 0)
                known = true;
        }
        if (known)
            msg = pn_asprintf("unknown method %s for service %.*s", slash + 1, (int)svclen - 1,
                              path + 1);
        else
            msg = pn_asprintf("unknown service %.*s", (int)svclen - 1, path + 1);
    }
    call_end(call, 200, PN_GRPC_UNIMPLEMENTED, msg);
    free(msg);
}

void pn__grpc_call_begin(struct pn__h2_stream *s, const struct pn_http_server *srv,
                         const char *method, const char *path, const struct pn_http_header *hdrs,
                         size_t nhdrs, const struct pn_peer *peer)
{
    struct pn_grpc_call *call = pn_new(struct pn_grpc_call);
    call->stream = s;
    call->svc = srv->grpc;
    call->path = pn_strdup(path ? path : "");
    call->md = hdrs;
    call->nmd = nhdrs;
    call->peer = peer;
    size_t max =
        call->svc && call->svc->max_message ? call->svc->max_message : GRPC_DEFAULT_MAX_MESSAGE;
    pn_grpc_decoder_init(&call->dec, max);
    pn__h2_stream_set_call(s, call);
    call->busy++;

    if (!method || strcmp(method, "POST") != 0) {
        char *msg = pn_asprintf("invalid gRPC request method \"%s\"", method ? method : "");
        call_end(call, 405, PN_GRPC_INTERNAL, msg);
        free(msg);
        goto out;
    }
    const char *tmo = pn_grpc_call_metadata(call, "grpc-timeout");
    if (tmo) {
        uint64_t ms;
        if (!pn_grpc_parse_timeout(tmo, &ms)) {
            char *msg = pn_asprintf("malformed grpc-timeout: %s", tmo);
            call_end(call, 200, PN_GRPC_INTERNAL, msg);
            free(msg);
            goto out;
        }
        struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (long)(ms % 1000) * 1000};
        call->deadline = evtimer_new(pn__h2_stream_base(s), deadline_cb, call);
        evtimer_add(call->deadline, &tv);
    }
    call->m = find_method(call->svc, call->path);
    if (call->svc && call->svc->intercept && !call->svc->intercept(call, call->m)) {
        if (!call->finished) /* intercept refused without answering */
            call_end(call, 200, PN_GRPC_INTERNAL, "request refused");
        goto out;
    }
    if (call->finished)
        goto out;
    if (!call->m) {
        refuse_unknown(call);
        goto out;
    }
    call->dispatched = true;
out:
    call->busy--;
    call_release(call);
}

static void on_decoded(void *arg, const uint8_t *msg, size_t len)
{
    struct pn_grpc_call *call = arg;
    if (call->finished)
        return;
    if (call->m->kind == PN_GRPC_CLIENT_STREAM) {
        call->m->on_message(call, msg, len);
        return;
    }
    if (call->delivered)
        return; /* a unary request carries one message; extras are ignored */
    call->delivered = true;
    call->m->on_message(call, msg, len);
}

void pn__grpc_call_data(struct pn_grpc_call *call, const uint8_t *data, size_t len)
{
    if (call->finished || !call->dispatched)
        return;
    if (call->m->kind != PN_GRPC_CLIENT_STREAM && call->delivered)
        return; /* the one request message is in; later bytes are ignored */
    uint64_t too_big = 0;
    call->busy++;
    int rv = pn_grpc_decoder_feed(&call->dec, data, len, on_decoded, call, &too_big);
    if (!call->finished && rv == PN_ERR_TOOBIG) {
        char *msg = pn_asprintf("grpc: received message larger than max (%llu vs. %zu)",
                                (unsigned long long)too_big, call->dec.max);
        if (call->m->on_cancel) {
            call->cancelling = true;
            call->m->on_cancel(call);
            call->cancelling = false;
        }
        call_end(call, 200, PN_GRPC_RESOURCE_EXHAUSTED, msg);
        free(msg);
    } else if (!call->finished && rv == PN_ERR_PROTO) {
        if (call->m->on_cancel) {
            call->cancelling = true;
            call->m->on_cancel(call);
            call->cancelling = false;
        }
        call_end(call, 200, PN_GRPC_INTERNAL,
                 "grpc: compressed flag set with identity or empty encoding");
    }
    call->busy--;
    call_release(call);
}

void pn__grpc_call_half_close(struct pn_grpc_call *call)
{
    if (call->finished || !call->dispatched)
        return;
    call->busy++;
    if (!pn_grpc_decoder_idle(&call->dec)) {
        if (call->m->on_cancel) {
            call->cancelling = true;
            call->m->on_cancel(call);
            call->cancelling = false;
        }
        call_end(call, 200, PN_GRPC_INTERNAL, "grpc: stream ended inside a message");
    } else if (call->m->kind == PN_GRPC_CLIENT_STREAM) {
        if (call->m->on_end)
            call->m->on_end(call);
    } else if (!call->delivered) {
        static const uint8_t empty[1];
        call->delivered = true;
        call->m->on_message(call, empty, 0);
    }
    call->busy--;
    call_release(call);
}

void pn__grpc_call_stream_closed(struct pn_grpc_call *call)
{
    call->stream = NULL;
    if (call->finished)
        return; /* cannot happen: finished calls are detached */
    if (call->deadline)
        event_del(call->deadline);
    if (call->dispatched && call->m->on_cancel) {
        call->busy++;
        call->cancelling = true;
        call->m->on_cancel(call);
        call->cancelling = false;
        call->busy--;
    }
    call->finished = true;
    call_release(call);
}

void pn__grpc_call_writable(struct pn_grpc_call *call)
{
    if (!call->finished && call->dispatched && call->on_writable)
        call->on_writable(call);
}
