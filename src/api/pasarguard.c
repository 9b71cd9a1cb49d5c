/* PasarGuard node API (see pasarguard.h). Requests pass, in order, the key
 * check (spec §4, §7), the route or method lookup, the backend guard
 * ("backend not initialized" / "core is not started yet"), and then their
 * handler. REST and gRPC share the checks and the handlers; they differ
 * only in how an answer is written (struct reply).
 *
 * In the gozargah profile (legacy session mode, spec §4) the key check is
 * replaced by the session check: Start is authorised by mTLS alone and
 * opens a session (a random UUID and the caller's IP); every other call
 * must carry `Authorization: Bearer <session id>`. REST `GET /logs` may then
 * long-poll (spec §5.3) instead of streaming.
 *
 * This module owns, per request: the decoded protobuf messages (freed
 * before the handler returns; node/ gets its own copies), the state of an
 * answer that waits for the backend (struct pending, with the backend
 * operation it detaches when the client leaves), the state of the gRPC
 * client streams (struct user_stream), the log streams (struct
 * log_stream: a log-ring subscriber and a backend listener each) and the
 * long polls (struct long_poll). Per node it owns the panel session of
 * session mode (struct session) with its log cursor. */
#include "api/pasarguard.h"

#include <event2/event.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/err.h"
#include "base/log.h"
#include "node/backend.h"
#include "node/users.h"
#include "service.pb-c.h"

#define MAX_MESSAGE (64u * 1024 * 1024)
/* A log stream stops reading the ring while this much output waits in its
 * transport; the ring then drops the reader's oldest lines, never blocks. */
#define LOG_HIGH_WATER ((size_t)256 * 1024)
/* REST log lines are written in batches of about this size (one chunk). */
#define LOG_BATCH ((size_t)64 * 1024)
/* Open log streams, node-wide. Each may hold LOG_HIGH_WATER + LOG_BATCH in
 * its transport, so this bounds what readers that stop reading can pin
 * (~20 MiB); a panel opens one. */
#define MAX_LOG_STREAMS 64

/* Go's protobuf has a text for a message it cannot parse; protobuf-c has
 * none, so the panels see the reference node's text. */
#define PROTO_PARSE_ERR "proto: cannot parse invalid wire-format data"
#define GRPC_UNMARSHAL_ERR "grpc: error unmarshalling request: " PROTO_PARSE_ERR

/* Long-poll logs (spec §5.3): the longest a request waits for a line, and
 * the reference's MAX_LOG_PER_REQUEST default. */
#define LONG_POLL_WAIT_MS 60000
#define LONG_POLL_MAX_DEFAULT 1000

struct log_stream;
struct long_poll;

/* The panel session of legacy session mode (spec §4): opened by a
 * successful Start, replaced by the next one, closed when the backend's
 * session ends with no core (Stop, or keep-alive expiry with
 * PROXYNODE_KEEPALIVE_STOPS_CORE). Keep-alive expiry alone leaves it open,
 * as it leaves the core and users alone (DESIGN "Keep-alive").
 *
 * The long-poll log cursor belongs to the session, not to a request:
 * successive long polls of one panel continue where the previous answer
 * stopped, so no line is delivered twice and none is skipped while the
 * panel is between two requests (up to the ring's size). It is created by
 * the session's first long poll with the whole ring as backlog, like any
 * new log reader, and dropped with the session, so a new Start begins a
 * new cursor. Concurrent long polls of one session share it and split the
 * lines, oldest request first. */
struct session {
    bool active;
    struct pn_uuid id;
    char ip[INET6_ADDRSTRLEN]; /* the REST caller IP that called Start */
    struct pn_log_sub *cursor; /* long-poll logs; NULL until the first */
    uint64_t dropped, dropped_logged;
    struct long_poll *polls, *polls_tail; /* waiting, oldest first */
};

struct pn_pasarguard {
    struct pn_uuid api_key;
    struct pn_backend *backend;
    char *node_version;
    struct event_base *base;
    struct pn_grpc_service grpc;
    struct log_stream *logs; /* open log streams */
    size_t nlogs;
    /* legacy session mode */
    bool session_mode;
    bool long_poll_always; /* MAX_LOG_PER_REQUEST was set */
    size_t max_log;
    struct session sess;
    struct pn_backend_listener sess_listener;
    struct event *sess_wake; /* new lines for the long polls; NULL: no loop */
};

/* ---- shared checks ------------------------------------------------------ */

/* An error as both protocols spell it. */
struct api_error {
    int http_status;
    enum pn_grpc_code grpc_code;
    const char *text;
};

static const struct api_error err_key_missing = {401, PN_GRPC_UNAUTHENTICATED,
                                                 "missing x-api-key header"};
static const struct api_error err_key_format = {422, PN_GRPC_INVALID_ARGUMENT,
                                                "invalid api key format: must be a valid UUID"};
static const struct api_error err_key_mismatch = {403, PN_GRPC_PERMISSION_DENIED,
                                                  "api key mismatch"};
static const struct api_error err_no_backend = {500, PN_GRPC_UNAVAILABLE,
                                                "backend not initialized"};
static const struct api_error err_not_started = {503, PN_GRPC_UNAVAILABLE,
                                                 "core is not started yet"};

/* Checks the key: `x-api-key`, or `Authorization: Bearer <key>` only when
 * x-api-key is absent (spec §4). Order: missing, not a UUID, mismatch.
 * Returns NULL when the caller is authorised. */
static const struct api_error *check_key(const struct pn_pasarguard *pg, const char *x_api_key,
                                         const char *authorization)
{
    const char *key = x_api_key;
    if (!key && authorization && strncasecmp(authorization, "Bearer ", 7) == 0)
        key = authorization + 7;
    if (!key)
        return &err_key_missing;
    while (*key == ' ')
        key++;
    size_t len = strlen(key);
    while (len && key[len - 1] == ' ')
        len--;
    struct pn_uuid got;
    if (pn_uuid_parse(key, len, &got) < 0)
        return &err_key_format;
    if (!pn_uuid_equal(&got, &pg->api_key))
        return &err_key_mismatch;
    return NULL;
}

/* ---- legacy session mode: the session check (spec §4) -------------------- */

/* REST, in the order the checks run. */
static const struct api_error err_rest_no_session = {425, PN_GRPC_UNAUTHENTICATED,
                                                     "please connect first"};
static const struct api_error err_rest_bad_ip = {403, PN_GRPC_PERMISSION_DENIED,
                                                 "IP address is not valid"};
static const struct api_error err_rest_no_header = {401, PN_GRPC_UNAUTHENTICATED,
                                                    "please connect first"};
static const struct api_error err_rest_format = {401, PN_GRPC_UNAUTHENTICATED,
                                                 "invalid Authorization header format"};
static const struct api_error err_rest_not_uuid = {422, PN_GRPC_INVALID_ARGUMENT,
                                                   "please send valid uuid"};
static const struct api_error err_rest_mismatch = {403, PN_GRPC_PERMISSION_DENIED,
                                                   "session id mismatch."};
/* gRPC. The reference's `missing metadata` cannot happen here (as in
 * grpc-go, a call always has its metadata), so it has no entry. */
static const struct api_error err_grpc_no_session = {401, PN_GRPC_UNAUTHENTICATED,
                                                     "please connect first"};
static const struct api_error err_grpc_no_header = {401, PN_GRPC_UNAUTHENTICATED,
                                                    "missing authorization header"};
static const struct api_error err_grpc_format = {400, PN_GRPC_INVALID_ARGUMENT,
                                                 "invalid authorization header format"};
/* The text is `invalid session ID: <Go's uuid.Parse error>`, built per call. */
static const struct api_error err_grpc_bad_id = {400, PN_GRPC_INVALID_ARGUMENT,
                                                 "invalid session ID"};
static const struct api_error err_grpc_mismatch = {403, PN_GRPC_PERMISSION_DENIED,
                                                   "session ID mismatch"};
/* Defence in depth: the TLS layer already refuses a handshake without a
 * verified client certificate, so no panel ever sees this. */
static const struct api_error err_no_client_cert = {401, PN_GRPC_UNAUTHENTICATED,
                                                    "client certificate required"};

/* Go's strings.Split(h, " ") has exactly two parts: exactly one space. */
static const char *split_two(const char *h)
{
    const char *sp = strchr(h, ' ');
    return sp && !strchr(sp + 1, ' ') ? sp + 1 : NULL;
}

/* Go's %q of a short ASCII string, for the urn prefix error. */
static void go_quote(const char *s, size_t len, char *out, size_t outlen)
{
    size_t k = 0;
    out[k++] = '"';
    for (size_t i = 0; i < len && k + 6 < outlen; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            k += (size_t)snprintf(out + k, outlen - k, "\\%c", c);
        else if (c >= 0x20 && c < 0x7f)
            out[k++] = (char)c;
        else
            k += (size_t)snprintf(out + k, outlen - k, "\\x%02x", c);
    }
    out[k++] = '"';
    out[k] = '\0';
}

/* The error google/uuid's Parse gives for a string pn_uuid_parse refused
 * (the gRPC text is `invalid session ID: <this>`). */
static void go_uuid_error(const char *s, size_t len, char *out, size_t outlen)
{
    if (len == 45 && strncasecmp(s, "urn:uuid:", 9) != 0) {
        char q[64];
        go_quote(s, 9, q, sizeof q);
        snprintf(out, outlen, "invalid urn prefix: %s", q);
    } else if (len == 36 || len == 38 || len == 45 || len == 32) {
        snprintf(out, outlen, "invalid UUID format");
    } else {
        snprintf(out, outlen, "invalid UUID length: %zu", len);
    }
}

/* The REST session check, in the reference's order: a session exists, the
 * caller has the IP that called Start, the header is present, it has two
 * space-separated parts (the first is not looked at), the second is a
 * UUID, and it is the session's. NULL when the call may proceed. */
static const struct api_error *check_session_rest(const struct session *s, const char *ip,
                                                  const char *authorization)
{
    if (!s->active)
        return &err_rest_no_session;
    if (!ip || strcmp(ip, s->ip) != 0)
        return &err_rest_bad_ip;
    if (!authorization || !*authorization)
        return &err_rest_no_header;
    const char *id = split_two(authorization);
    if (!id)
        return &err_rest_format;
    struct pn_uuid got;
    if (pn_uuid_parse(id, strlen(id), &got) < 0)
        return &err_rest_not_uuid;
    if (!pn_uuid_equal(&got, &s->id))
        return &err_rest_mismatch;
    return NULL;
}

/* The gRPC session check: a session exists, the `authorization` metadata
 * is present, it is the literal `Bearer`, one space and a UUID, and the
 * UUID is the session's. For err_grpc_bad_id, detail gets the full text;
 * otherwise it is left alone. NULL when the call may proceed. */
static const struct api_error *check_session_grpc(const struct session *s,
                                                  const char *authorization, char *detail,
                                                  size_t detaillen)
{
    if (!s->active)
        return &err_grpc_no_session;
    if (!authorization)
        return &err_grpc_no_header;
    const char *id = split_two(authorization);
    if (!id || (size_t)(id - authorization) != 7 || strncmp(authorization, "Bearer", 6) != 0)
        return &err_grpc_format;
    struct pn_uuid got;
    size_t len = strlen(id);
    if (pn_uuid_parse(id, len, &got) < 0) {
        char why[96];
        go_uuid_error(id, len, why, sizeof why);
        snprintf(detail, detaillen, "%s: %s", err_grpc_bad_id.text, why);
        return &err_grpc_bad_id;
    }
    if (!pn_uuid_equal(&got, &s->id))
        return &err_grpc_mismatch;
    return NULL;
}

/* The guard of calls that need a started core (spec §7): NULL when a core
 * serves. Without a panel session the panel must Start again (REST 500);
 * while a core starts or restarts it must wait (503). gRPC: UNAVAILABLE. */
static const struct api_error *check_backend(const struct pn_pasarguard *pg)
{
    if (!pn_backend_guard(pg->backend))
        return NULL;
    return pn_backend_state(pg->backend) == PN_BACKEND_NONE ? &err_no_backend : &err_not_started;
}

/* ---- answers: the one place REST and gRPC differ ------------------------ */

/* Where an answer goes: exactly one of the two is set. */
struct reply {
    struct pn_req *req;
    struct pn_grpc_call *call;
};

static const struct pn_http_header protobuf_hdr[] = {
    {"Content-Type", "application/x-protobuf"},
};

/* A successful answer: REST 200 application/x-protobuf, gRPC one message
 * and status OK. A call answered successfully refreshes keep-alive (spec
 * §8). Returns PN_OK when the answer was handed to the transport, else
 * PN_ERR_CLOSED (the peer is gone). */
static int reply_bytes(struct pn_pasarguard *pg, struct reply r, const uint8_t *buf, size_t len)
{
    int rv;
    if (r.req) {
        rv = pn_req_respond(r.req, 200, protobuf_hdr, 1, buf, len);
    } else {
        rv = pn_grpc_call_send(r.call, buf, len);
        pn_grpc_call_finish(r.call, rv == PN_OK ? PN_GRPC_OK : PN_GRPC_UNAVAILABLE, NULL);
    }
    if (rv == PN_OK)
        pn_backend_touch(pg->backend);
    return rv;
}

static int reply_msg(struct pn_pasarguard *pg, struct reply r, const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = len ? pn_malloc(len) : NULL;
    if (len)
        protobuf_c_message_pack(m, buf);
    int rv = reply_bytes(pg, r, buf, len);
    free(buf);
    return rv;
}

/* The 0-byte answer of Stop, the syncs and an empty LatencyResponse. */
static int reply_empty(struct pn_pasarguard *pg, struct reply r)
{
    return reply_bytes(pg, r, NULL, 0);
}

/* An error: REST plain text (Go http.Error style), gRPC status + message. */
static void reply_error(struct reply r, int http_status, enum pn_grpc_code code, const char *text)
{
    if (r.req)
        pn_req_respond_text(r.req, http_status, text);
    else
        pn_grpc_call_finish(r.call, code, text);
}

static void reply_api_error(struct reply r, const struct api_error *e)
{
    reply_error(r, e->http_status, e->grpc_code, e->text);
}

/* A request message that does not decode. REST routes have their own
 * texts for some messages (rest_text); gRPC always answers like grpc-go. */
static void reply_decode_error(struct reply r, const char *rest_text)
{
    reply_error(r, 400, PN_GRPC_INVALID_ARGUMENT, r.req ? rest_text : GRPC_UNMARSHAL_ERR);
}

/* The gRPC code of a failed core call (spec §7.1): a text ending in
 * `not found.` is NotFound; else the core's own code; else one derived
 * from how the call failed (no answer at all). */
static enum pn_grpc_code core_error_code(int rv, int grpc_code, const char *err)
{
    static const char suffix[] = "not found.";
    size_t n = err ? strlen(err) : 0;
    if (n >= sizeof suffix - 1 && strcmp(err + n - (sizeof suffix - 1), suffix) == 0)
        return PN_GRPC_NOT_FOUND;
    if (grpc_code > PN_GRPC_OK && grpc_code <= PN_GRPC_UNAUTHENTICATED)
        return (enum pn_grpc_code)grpc_code;
    switch (rv) {
    case PN_ERR_TIMEOUT:
        return PN_GRPC_DEADLINE_EXCEEDED;
    case PN_ERR_IO:
    case PN_ERR_CLOSED:
    case PN_ERR_STATE:
        return PN_GRPC_UNAVAILABLE;
    default:
        return PN_GRPC_UNKNOWN;
    }
}

/* A core error as is: its code for gRPC, that code mapped for REST. */
static void reply_core_error(struct reply r, int rv, int grpc_code, const char *err)
{
    enum pn_grpc_code code = core_error_code(rv, grpc_code, err);
    reply_error(r, pn_grpc_code_to_http(code), code, err && *err ? err : pn_strerror(rv));
}

/* A backend call that failed before it started: the guard's answer when
 * the core went away in between, else the error's name. */
static void reply_refused(struct pn_pasarguard *pg, struct reply r, int rv, int http_status,
                          enum pn_grpc_code code)
{
    const struct api_error *e = check_backend(pg);
    if (e)
        reply_api_error(r, e);
    else
        reply_error(r, http_status, code, pn_strerror(rv));
}

/* ---- messages → node/ ------------------------------------------------------ */

static char *dup_str(const char *s)
{
    return pn_strdup(s ? s : "");
}

/* A panel user as node/ holds it. Presence of each Proxy sub-message
 * decides eligibility (spec §5.1, §10), so it is kept as has_*. */
static struct pn_user *user_from_pb(const Service__User *m)
{
    struct pn_user *u = pn_user_new(m->email ? m->email : "");
    const Service__Proxy *p = m->proxies;
    if (p && p->vmess) {
        u->has_vmess = true;
        u->vmess_id = dup_str(p->vmess->id);
    }
    if (p && p->vless) {
        u->has_vless = true;
        u->vless_id = dup_str(p->vless->id);
        u->vless_flow = dup_str(p->vless->flow);
    }
    if (p && p->trojan) {
        u->has_trojan = true;
        u->trojan_password = dup_str(p->trojan->password);
    }
    if (p && p->shadowsocks) {
        u->has_ss = true;
        u->ss_password = dup_str(p->shadowsocks->password);
        u->ss_method = dup_str(p->shadowsocks->method);
    }
    if (p && p->hysteria) {
        u->has_hysteria = true;
        u->hysteria_auth = dup_str(p->hysteria->auth);
    }
    for (size_t i = 0; i < m->n_inbounds; i++)
        pn_user_add_inbound(u, m->inbounds[i] ? m->inbounds[i] : "");
    return u;
}

/* The full user set of Start and SyncUsers (a later duplicate email
 * replaces an earlier one). */
static struct pn_userset *userset_from_pb(Service__User *const *users, size_t n)
{
    struct pn_userset *set = pn_userset_new();
    for (size_t i = 0; i < n; i++)
        pn_userset_put(set, user_from_pb(users[i]));
    return set;
}

/* ---- chunked sync: buckets by index (spec §6.3, §11) ---------------------- */

struct chunk {
    uint64_t index;
    size_t seq; /* arrival order, kept within a bucket */
    struct pn_user **users;
    size_t n;
};

struct chunkset {
    struct chunk *v;
    size_t n, cap;
    bool have_last;
    uint64_t last; /* index of the first chunk with last=true */
};

static void chunkset_add(struct chunkset *cs, const Service__UsersChunk *m)
{
    if (cs->n == cs->cap) {
        cs->cap = cs->cap ? cs->cap * 2 : 8;
        cs->v = pn_realloc(cs->v, cs->cap * sizeof *cs->v);
    }
    struct chunk *c = &cs->v[cs->n];
    c->index = m->index;
    c->seq = cs->n;
    c->n = m->n_users;
    c->users = m->n_users ? pn_malloc(m->n_users * sizeof *c->users) : NULL;
    for (size_t i = 0; i < m->n_users; i++)
        c->users[i] = user_from_pb(m->users[i]);
    cs->n++;
    if (m->last && !cs->have_last) {
        cs->have_last = true;
        cs->last = m->index;
    }
}

static void chunkset_free(struct chunkset *cs)
{
    for (size_t i = 0; i < cs->n; i++) {
        for (size_t j = 0; j < cs->v[i].n; j++)
            pn_user_free(cs->v[i].users[j]);
        free(cs->v[i].users);
    }
    free(cs->v);
    memset(cs, 0, sizeof *cs);
}

static int chunk_cmp(const void *a, const void *b)
{
    const struct chunk *x = a, *y = b;
    if (x->index != y->index)
        return x->index < y->index ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Joins buckets 0..last in order and moves their users into a new array
 * (buckets past last are left for chunkset_free). Every index up to last
 * must have arrived, an empty chunk counting as arrived. Errors
 * (PN_ERR_INVAL): `missing final chunk indicator`, `missing chunk index N`,
 * `no users received`. */
static int chunkset_join(struct chunkset *cs, struct pn_user ***users, size_t *n, char *err,
                         size_t errlen)
{
    if (!cs->have_last)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "missing final chunk indicator");
    qsort(cs->v, cs->n, sizeof *cs->v, chunk_cmp);
    uint64_t next = 0; /* the next index the join needs */
    bool reached = false;
    size_t total = 0, end = 0;
    for (; end < cs->n; end++) {
        const struct chunk *c = &cs->v[end];
        if (c->index > cs->last)
            break;
        if (end > 0 && c->index == cs->v[end - 1].index) {
            total += c->n; /* the same bucket as the chunk before */
            continue;
        }
        if (c->index != next)
            break;
        if (c->index == cs->last)
            reached = true;
        else
            next++;
        total += c->n;
    }
    if (!reached)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "missing chunk index %llu",
                         (unsigned long long)next);
    if (total == 0)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "no users received");
    struct pn_user **out = pn_malloc(total * sizeof *out);
    size_t k = 0;
    for (size_t i = 0; i < end; i++) {
        struct chunk *c = &cs->v[i];
        if (c->n)
            memcpy(out + k, c->users, c->n * sizeof *out);
        k += c->n;
        free(c->users);
        c->users = NULL;
        c->n = 0;
    }
    *users = out;
    *n = total;
    return PN_OK;
}

/* Go's binary.ReadUvarint on the body: 1 with the value, 0 on a clean end
 * (no byte left), -1 when the body ends inside the varint, -2 when it
 * overflows 64 bits. */
static int read_uvarint(const uint8_t *p, size_t len, size_t *off, uint64_t *out)
{
    uint64_t x = 0;
    unsigned shift = 0;
    for (int i = 0; i < 10; i++) {
        if (*off == len)
            return i > 0 ? -1 : 0;
        uint8_t b = p[(*off)++];
        if (b < 0x80) {
            if (i == 9 && b > 1)
                return -2;
            *out = x | (uint64_t)b << shift;
            return 1;
        }
        x |= (uint64_t)(b & 0x7f) << shift;
        shift += 7;
    }
    return -2;
}

int pn_pasarguard_parse_chunks(const uint8_t *body, size_t len, struct pn_user ***users, size_t *n,
                               char *err, size_t errlen)
{
    static const uint8_t empty[1];
    struct chunkset cs = {0};
    size_t off = 0;
    int rv;
    if (!body)
        body = empty;
    while (!cs.have_last) {
        uint64_t flen = 0;
        int vr = read_uvarint(body, len, &off, &flen);
        if (vr == 0)
            break;
        if (vr < 0) {
            rv = pn_seterr(err, errlen, PN_ERR_INVAL, "failed to read chunk length: %s",
                           vr == -1 ? "unexpected EOF"
                                    : "binary: varint overflows a 64-bit integer");
            goto out;
        }
        if (flen == 0)
            continue;
        if (flen > len - off) {
            /* io.ReadFull: EOF when nothing was read, else unexpected EOF */
            rv = pn_seterr(err, errlen, PN_ERR_INVAL, "failed to read chunk payload: %s",
                           off == len ? "EOF" : "unexpected EOF");
            goto out;
        }
        Service__UsersChunk *m = service__users_chunk__unpack(NULL, (size_t)flen, body + off);
        off += (size_t)flen;
        if (!m) {
            rv =
                pn_seterr(err, errlen, PN_ERR_INVAL, "failed to decode chunk: %s", PROTO_PARSE_ERR);
            goto out;
        }
        chunkset_add(&cs, m);
        service__users_chunk__free_unpacked(m, NULL);
    }
    rv = chunkset_join(&cs, users, n, err, errlen);
out:
    chunkset_free(&cs);
    return rv;
}

/* ---- stats names (spec §12.1) ---------------------------------------------- */

/* The first ">>>" in [p, end), or NULL. */
static const char *find_sep(const char *p, const char *end)
{
    while (end - p >= 3) {
        const char *q = memchr(p, '>', (size_t)(end - p - 2));
        if (!q)
            return NULL;
        if (q[1] == '>' && q[2] == '>')
            return q;
        p = q + 1;
    }
    return NULL;
}

/* A part of a stat name, where it lies in the name. */
struct name_part {
    const char *p;
    size_t len;
};

/* Splits the name full[0..len) `kind>>>name>>>link>>>type[>>>…]` where it
 * lies: parts[0..2] = name, link, type. false (the stat is not returned)
 * when it has fewer than 4 parts, an empty part 1-3, or part 0 differs from
 * kind (the core matches patterns as substrings: `outbound>>>` also matches
 * a user whose email ends in "outbound"). Separators are found left to
 * right, like Go's strings.Split; part 3 ends at the next separator. */
static bool split_name(const char *full, size_t len, const char *kind, size_t klen,
                       struct name_part parts[3])
{
    const char *end = full + len;
    const char *s0 = find_sep(full, end);
    const char *s1 = s0 ? find_sep(s0 + 3, end) : NULL;
    const char *s2 = s1 ? find_sep(s1 + 3, end) : NULL;
    if (!s2)
        return false;
    const char *s3 = find_sep(s2 + 3, end);
    if (!s3)
        s3 = end;
    if (kind && ((size_t)(s0 - full) != klen || memcmp(full, kind, klen) != 0))
        return false;
    parts[0] = (struct name_part){s0 + 3, (size_t)(s1 - (s0 + 3))};
    parts[1] = (struct name_part){s1 + 3, (size_t)(s2 - (s1 + 3))};
    parts[2] = (struct name_part){s2 + 3, (size_t)(s3 - (s2 + 3))};
    return parts[0].len && parts[1].len && parts[2].len;
}

static size_t varint_size(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static uint8_t *put_varint(uint8_t *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

static uint8_t *put_string(uint8_t *p, uint8_t key, const struct name_part *s)
{
    *p++ = key;
    p = put_varint(p, s->len);
    memcpy(p, s->p, s->len);
    return p + s->len;
}

/* Packs the StatResponse for the counters whose names parse for kind;
 * kept[i] tells which made it in. Caller frees the buffer.
 *
 * With 200k counters this is on the hot path of GetStats, so the message
 * is written by hand, byte for byte what protobuf-c packs (the unit tests
 * compare the two): StatResponse{stats 1: Stat{name 1, type 2, link 3,
 * value 4}}, the strings copied straight from the parts of each name,
 * proto3 defaults (value 0) left out. */
static uint8_t *pack_stats(const struct pn_backend_stats *s, const char *kind, bool *kept,
                           size_t *len)
{
    size_t klen = kind ? strlen(kind) : 0;
    size_t cap = s->n * 48 + 16, off = 0;
    uint8_t *buf = pn_malloc(cap);
    for (size_t i = 0; i < s->n; i++) {
        const struct pn_backend_stat *it = &s->items[i];
        struct name_part np[3];
        kept[i] = split_name(it->name, strlen(it->name), kind, klen, np);
        if (!kept[i])
            continue;
        uint64_t v = (uint64_t)it->value;
        size_t inner = 3 + varint_size(np[0].len) + np[0].len + varint_size(np[2].len) + np[2].len +
                       varint_size(np[1].len) + np[1].len + (v ? 1 + varint_size(v) : 0);
        size_t need = 1 + varint_size(inner) + inner;
        if (cap - off < need) {
            cap = cap * 2 > off + need ? cap * 2 : off + need;
            buf = pn_realloc(buf, cap);
        }
        uint8_t *p = buf + off;
        *p++ = 0x0a; /* stats, length-delimited */
        p = put_varint(p, inner);
        p = put_string(p, 0x0a, &np[0]); /* name */
        p = put_string(p, 0x12, &np[2]); /* type */
        p = put_string(p, 0x1a, &np[1]); /* link */
        if (v) {
            *p++ = 0x20; /* value, varint */
            p = put_varint(p, v);
        }
        off = (size_t)(p - buf);
    }
    *len = off;
    return buf;
}

/* ---- answers that wait for the backend ------------------------------------ */

/* One request waiting for a backend callback. The client leaving (REST
 * on_close, gRPC on_cancel) detaches the operation, which still completes
 * (a Start finishes even if the panel left) without calling back. */
struct pending {
    struct pn_pasarguard *pg;
    struct reply r;
    struct pn_backend_op *op;     /* in flight */
    struct pn_backend_wait *wait; /* GetBaseInfo before the version probe ended */
    const char *kind;             /* GetStats: the kind stat names must carry */
    char *email;                  /* online stats */
    bool ip_list;                 /* online stats: the IP list form */
    bool in_call;                 /* inside the backend call that takes p */
    bool done;                    /* answered while in_call: free after it */
};

static void pending_free(struct pending *p)
{
    free(p->email);
    free(p);
}

static void pending_abort(struct pending *p)
{
    if (p->op)
        pn_backend_op_detach(p->op);
    if (p->wait)
        pn_backend_wait_cancel(p->wait);
    pending_free(p);
}

static void pending_req_closed(struct pn_req *req, void *arg)
{
    pending_abort(arg);
}

static void pending_grpc_cancel(struct pn_grpc_call *call)
{
    struct pending *p = pn_grpc_call_data(call);
    pn_grpc_call_set_data(call, NULL);
    if (p)
        pending_abort(p);
}

static struct pending *pending_new(struct pn_pasarguard *pg, struct reply r)
{
    struct pending *p = pn_new(struct pending);
    p->pg = pg;
    p->r = r;
    if (r.req)
        pn_req_set_callbacks(r.req, pending_req_closed, NULL, p);
    else
        pn_grpc_call_set_data(r.call, p);
    return p;
}

/* The callback answered: the request is gone. A callback that ran inside
 * the backend call leaves the free to the caller (pending_launched). */
static void pending_complete(struct pending *p)
{
    p->op = NULL;
    p->wait = NULL;
    if (p->in_call)
        p->done = true;
    else
        pending_free(p);
}

/* After the backend call that took p returned rv: a synchronous failure
 * is answered here (http_status / code as the handler's failures); a
 * callback that already ran frees p now. */
static void pending_launched(struct pending *p, int rv, int http_status, enum pn_grpc_code code)
{
    p->in_call = false;
    if (rv < 0) {
        p->op = NULL;
        reply_refused(p->pg, p->r, rv, http_status, code);
        pending_free(p);
    } else if (p->done) {
        pending_free(p);
    }
}

/* ---- GetBaseInfo, Start, Stop ---------------------------------------------- */

/* BaseInfoResponse; in session mode it also carries the session id (field
 * 4; `extra`, field 5, stays empty), as the reference's Start and
 * GetBaseInfo do. */
static void info_answer(struct pn_pasarguard *pg, struct reply r, bool started,
                        const char *core_version)
{
    Service__BaseInfoResponse m = SERVICE__BASE_INFO_RESPONSE__INIT;
    char sid[PN_UUID_STRLEN + 1];
    m.started = started;
    m.core_version = (char *)(core_version ? core_version : "");
    m.node_version = pg->node_version;
    if (pg->session_mode && pg->sess.active) {
        pn_uuid_format(&pg->sess.id, sid);
        m.session_id = sid;
    }
    reply_msg(pg, r, &m.base);
}

static void info_version_ready(const char *version, void *arg)
{
    struct pending *p = arg;
    info_answer(p->pg, p->r, pn_backend_started(p->pg->backend), version);
    pending_complete(p);
}

/* GetBaseInfo: answers at once, or when the start-up version probe ends
 * (DESIGN "Small rules": the configured core's version before any Start). */
static void h_info(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    const char *version = pn_backend_core_version(pg->backend);
    if (version) {
        info_answer(pg, r, pn_backend_started(pg->backend), version);
        return;
    }
    struct pending *p = pending_new(pg, r);
    p->wait = pn_backend_on_version(pg->backend, info_version_ready, p);
}

static int session_begin(struct pn_pasarguard *pg, const char *ip);

/* The address a call came from ("" when the transport has none). */
static const char *reply_ip(struct reply r)
{
    const struct pn_peer *peer = r.req ? r.req->peer : pn_grpc_call_peer(r.call);
    return peer ? peer->ip : "";
}

/* A Start that succeeded opens a new session in session mode (the old one
 * is refused from now on); one that failed leaves the old session, like
 * the old core, in place. */
static void start_done(int rv, const char *err, void *arg)
{
    struct pending *p = arg;
    if (rv < 0)
        reply_error(p->r, 503, PN_GRPC_UNKNOWN, err && *err ? err : pn_strerror(rv));
    else if (p->pg->session_mode && session_begin(p->pg, reply_ip(p->r)) < 0)
        reply_error(p->r, 503, PN_GRPC_UNKNOWN, "failed to create a session id");
    else
        info_answer(p->pg, p->r, true, pn_backend_core_version(p->pg->backend));
    pending_complete(p);
}

/* Start (spec §8): decode the Backend, refuse other backend types, hand
 * config, users, keep-alive and excluded inbounds to the backend, which
 * takes over from any running session. */
static void h_start(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    Service__Backend *m = service__backend__unpack(NULL, len, body);
    if (!m) {
        reply_decode_error(r, PROTO_PARSE_ERR);
        return;
    }
    if (m->type != SERVICE__BACKEND_TYPE__XRAY) {
        reply_error(r, 503, PN_GRPC_UNKNOWN, "invalid backend type");
        goto out;
    }
    struct pn_backend_start_req sr = {
        .config = m->config ? m->config : "",
        .config_len = m->config ? strlen(m->config) : 0,
        .users = userset_from_pb(m->users, m->n_users),
        .exclude = (const char *const *)m->exclude_inbounds,
        .nexclude = m->n_exclude_inbounds,
        .keep_alive_s = m->keep_alive,
    };
    struct pending *p = pending_new(pg, r);
    char err[4096] = "";
    p->in_call = true;
    int rv = pn_backend_start(pg->backend, &sr, start_done, p, &p->op, err, sizeof err);
    p->in_call = false;
    if (rv < 0) {
        reply_error(r, 503, PN_GRPC_UNKNOWN, err[0] ? err : pn_strerror(rv));
        pending_free(p);
    } else if (p->done) {
        pending_free(p);
    }
out:
    service__backend__free_unpacked(m, NULL);
}

static void done_empty_or_500(int rv, const char *err, void *arg)
{
    struct pending *p = arg;
    if (rv < 0)
        reply_error(p->r, 500, PN_GRPC_UNKNOWN, err && *err ? err : pn_strerror(rv));
    else
        reply_empty(p->pg, p->r);
    pending_complete(p);
}

/* Stop: ends the session; the request body is ignored. */
static void h_stop(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    struct pending *p = pending_new(pg, r);
    p->in_call = true;
    int rv = pn_backend_stop(pg->backend, done_empty_or_500, p, &p->op);
    pending_launched(p, rv, 500, PN_GRPC_UNKNOWN);
}

/* ---- stats ---------------------------------------------------------------- */

static void h_system_stats(struct pn_pasarguard *pg, struct reply r, const uint8_t *body,
                           size_t len)
{
    struct pn_sysstats s;
    uint64_t uptime = 0;
    memset(&s, 0, sizeof s);
    pn_backend_system_stats(pg->backend, &s, &uptime);
    Service__SystemStatsResponse m = SERVICE__SYSTEM_STATS_RESPONSE__INIT;
    m.mem_total = s.mem_total;
    m.mem_used = s.mem_used;
    m.cpu_cores = s.cpu_cores;
    m.cpu_usage = s.cpu_usage;
    m.incoming_bandwidth_speed = s.rx_bps;
    m.outgoing_bandwidth_speed = s.tx_bps;
    m.uptime = uptime;
    reply_msg(pg, r, &m.base);
}

static void backend_stats_done(int rv, int grpc_code, const char *err,
                               const struct pn_core_sys_stats *s, void *arg)
{
    struct pending *p = arg;
    if (rv < 0 || !s) {
        reply_core_error(p->r, rv < 0 ? rv : PN_ERR_PROTO, grpc_code, err);
    } else {
        Service__BackendStatsResponse m = SERVICE__BACKEND_STATS_RESPONSE__INIT;
        m.num_goroutine = s->num_goroutine;
        m.num_gc = s->num_gc;
        m.alloc = s->alloc;
        m.total_alloc = s->total_alloc;
        m.sys = s->sys;
        m.mallocs = s->mallocs;
        m.frees = s->frees;
        m.live_objects = s->live_objects;
        m.pause_total_ns = s->pause_total_ns;
        m.uptime = s->uptime;
        reply_msg(p->pg, p->r, &m.base);
    }
    pending_complete(p);
}

/* GetBackendStats: the core's GetSysStats 1:1; the panel's health probe. */
static void h_backend_stats(struct pn_pasarguard *pg, struct reply r, const uint8_t *body,
                            size_t len)
{
    struct pending *p = pending_new(pg, r);
    p->in_call = true;
    int rv = pn_backend_core_sys_stats(pg->backend, backend_stats_done, p, &p->op);
    if (rv < 0 && !check_backend(pg)) {
        /* no core generation to ask: the panel must wait, not Start again */
        char *text = pn_asprintf("failed to get sys stats: %s", pn_strerror(rv));
        reply_error(r, 503, PN_GRPC_UNAVAILABLE, text);
        free(text);
        pending_free(p);
        return;
    }
    pending_launched(p, rv, 500, PN_GRPC_UNKNOWN);
}

static void stats_done(int rv, int grpc_code, const char *err, struct pn_backend_stats *s,
                       void *arg)
{
    struct pending *p = arg;
    struct pn_backend *b = p->pg->backend;
    if (rv < 0 || !s) {
        reply_core_error(p->r, rv < 0 ? rv : PN_ERR_PROTO, grpc_code, err);
        goto out;
    }
    bool *kept = pn_calloc(s->n ? s->n : 1, sizeof *kept);
    size_t len;
    uint8_t *buf = pack_stats(s, p->kind, kept, &len);
    int sent = reply_bytes(p->pg, p->r, buf, len);
    free(buf);
    /* Only what the reply carried leaves the ledger: a counter matched by
     * substring but dropped by the kind check stays for its own kind. */
    if (sent == PN_OK && s->reset) {
        struct pn_backend_stats d = {.items = NULL, .n = 0, .reset = true};
        d.items = pn_calloc(s->n ? s->n : 1, sizeof *d.items);
        for (size_t i = 0; i < s->n; i++)
            if (kept[i])
                d.items[d.n++] = s->items[i];
        pn_backend_stats_delivered(b, d.n == s->n ? s : &d);
        free(d.items);
    }
    free(kept);
out:
    if (s)
        pn_backend_stats_free(s);
    pending_complete(p);
}

#define STAT_TYPE_FROM_REQUEST (-1)

/* GetStats (spec §12.1): StatType → kind and QueryStats pattern. forced is
 * the type of a legacy per-type rpc or route (§5.3), else the request's. */
static void stats_run(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len,
                      int forced)
{
    Service__StatRequest *m = service__stat_request__unpack(NULL, len, body);
    if (!m) {
        reply_decode_error(r, PROTO_PARSE_ERR);
        return;
    }
    int type = forced != STAT_TYPE_FROM_REQUEST ? forced : (int)m->type;
    const char *kind = NULL, *missing = NULL;
    switch (type) {
    case SERVICE__STAT_TYPE__Outbounds:
        kind = "outbound";
        break;
    case SERVICE__STAT_TYPE__Outbound:
        kind = "outbound";
        missing = "tag required";
        break;
    case SERVICE__STAT_TYPE__Inbounds:
        kind = "inbound";
        break;
    case SERVICE__STAT_TYPE__Inbound:
        kind = "inbound";
        missing = "tag required";
        break;
    case SERVICE__STAT_TYPE__UsersStat:
        kind = "user";
        break;
    case SERVICE__STAT_TYPE__UserStat:
        kind = "user";
        missing = "email required";
        break;
    default:
        reply_error(r, 500, PN_GRPC_UNKNOWN, "not implemented stat type");
        goto out;
    }
    const char *name = m->name ? m->name : "";
    if (missing && !*name) {
        reply_error(r, 500, PN_GRPC_UNKNOWN, missing);
        goto out;
    }
    char *pattern = missing ? pn_asprintf("%s>>>%s>>>", kind, name) : pn_asprintf("%s>>>", kind);
    struct pending *p = pending_new(pg, r);
    p->kind = kind;
    p->in_call = true;
    int rv = pn_backend_query_stats(pg->backend, pattern, m->reset, stats_done, p, &p->op);
    pending_launched(p, rv, 500, PN_GRPC_UNKNOWN);
    free(pattern);
out:
    service__stat_request__free_unpacked(m, NULL);
}

static void h_stats(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    stats_run(pg, r, body, len, STAT_TYPE_FROM_REQUEST);
}

static void h_stats_outbounds(struct pn_pasarguard *pg, struct reply r, const uint8_t *body,
                              size_t len)
{
    stats_run(pg, r, body, len, SERVICE__STAT_TYPE__Outbounds);
}

static void h_stats_outbound(struct pn_pasarguard *pg, struct reply r, const uint8_t *body,
                             size_t len)
{
    stats_run(pg, r, body, len, SERVICE__STAT_TYPE__Outbound);
}

static void h_stats_inbounds(struct pn_pasarguard *pg, struct reply r, const uint8_t *body,
                             size_t len)
{
    stats_run(pg, r, body, len, SERVICE__STAT_TYPE__Inbounds);
}

static void h_stats_inbound(struct pn_pasarguard *pg, struct reply r, const uint8_t *body,
                            size_t len)
{
    stats_run(pg, r, body, len, SERVICE__STAT_TYPE__Inbound);
}

static void h_stats_users(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    stats_run(pg, r, body, len, SERVICE__STAT_TYPE__UsersStat);
}

static void h_stats_user(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    stats_run(pg, r, body, len, SERVICE__STAT_TYPE__UserStat);
}

static void online_done(int rv, int grpc_code, const char *err, int64_t value,
                        const struct pn_core_online_ip *ips, size_t nips, void *arg)
{
    struct pending *p = arg;
    if (rv < 0) {
        reply_core_error(p->r, rv, grpc_code, err);
    } else if (p->ip_list) {
        Service__StatsOnlineIpListResponse m = SERVICE__STATS_ONLINE_IP_LIST_RESPONSE__INIT;
        Service__StatsOnlineIpListResponse__IpsEntry *e = nips ? pn_calloc(nips, sizeof *e) : NULL;
        Service__StatsOnlineIpListResponse__IpsEntry **ep =
            nips ? pn_calloc(nips, sizeof *ep) : NULL;
        for (size_t i = 0; i < nips; i++) {
            service__stats_online_ip_list_response__ips_entry__init(&e[i]);
            e[i].key = (char *)(ips[i].ip ? ips[i].ip : "");
            e[i].value = ips[i].last_seen;
            ep[i] = &e[i];
        }
        m.name = p->email;
        m.n_ips = nips;
        m.ips = ep;
        reply_msg(p->pg, p->r, &m.base);
        free(ep);
        free(e);
    } else {
        Service__OnlineStatResponse m = SERVICE__ONLINE_STAT_RESPONSE__INIT;
        m.name = p->email;
        m.value = value;
        reply_msg(p->pg, p->r, &m.base);
    }
    pending_complete(p);
}

/* GetUserOnlineStats / GetUserOnlineIpListStats (spec §12.2). */
static void online_run(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len,
                       bool ip_list)
{
    Service__StatRequest *m = service__stat_request__unpack(NULL, len, body);
    if (!m) {
        reply_decode_error(r, PROTO_PARSE_ERR);
        return;
    }
    if (!m->name || !*m->name) {
        reply_error(r, 500, PN_GRPC_UNKNOWN, "email required");
        goto out;
    }
    struct pending *p = pending_new(pg, r);
    p->email = pn_strdup(m->name);
    p->ip_list = ip_list;
    p->in_call = true;
    int rv = pn_backend_online(pg->backend, p->email, ip_list, online_done, p, &p->op);
    pending_launched(p, rv, 500, PN_GRPC_UNKNOWN);
out:
    service__stat_request__free_unpacked(m, NULL);
}

static void h_online(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    online_run(pg, r, body, len, false);
}

static void h_online_ip(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    online_run(pg, r, body, len, true);
}

static void latency_done(const struct pn_backend_latency *items, size_t n, void *arg)
{
    struct pending *p = arg;
    Service__LatencyResponse m = SERVICE__LATENCY_RESPONSE__INIT;
    Service__Latency *lat = pn_calloc(n ? n : 1, sizeof *lat);
    Service__Latency **ptrs = pn_calloc(n ? n : 1, sizeof *ptrs);
    for (size_t i = 0; i < n; i++) {
        service__latency__init(&lat[i]);
        lat[i].name = (char *)items[i].tag;
        lat[i].link = (char *)items[i].tag;
        lat[i].alive = items[i].alive;
        lat[i].delay = items[i].delay;
        lat[i].last_seen_time = items[i].last_seen_time;
        lat[i].last_try_time = items[i].last_try_time;
        lat[i].source = "xray-observatory";
        ptrs[i] = &lat[i];
    }
    m.latencies = ptrs;
    m.n_latencies = n;
    reply_msg(p->pg, p->r, &m.base);
    free(ptrs);
    free(lat);
    pending_complete(p);
}

/* GetOutboundsLatency (spec §12.4): the core's observatory through the
 * backend; an empty list without a core, metrics or observatory (DESIGN
 * "Small rules"), so no guard. The request must still decode. */
static void h_latency(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    Service__LatencyRequest *m = service__latency_request__unpack(NULL, len, body);
    if (!m) {
        reply_decode_error(r, PROTO_PARSE_ERR);
        return;
    }
    struct pending *p = pending_new(pg, r);
    p->in_call = true;
    int rv = pn_backend_latency(pg->backend, m->name, latency_done, p, &p->op);
    pending_launched(p, rv, 500, PN_GRPC_UNKNOWN);
    service__latency_request__free_unpacked(m, NULL);
}

/* ---- user syncs (unary forms) ---------------------------------------------- */

static void sync_done(int rv, const char *err, void *arg)
{
    struct pending *p = arg;
    if (rv < 0)
        reply_error(p->r, 500, PN_GRPC_INTERNAL, err && *err ? err : pn_strerror(rv));
    else
        reply_empty(p->pg, p->r);
    pending_complete(p);
}

/* PUT /user/sync: one user per request (the gRPC form is a stream). */
static void h_user_sync(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    Service__User *m = service__user__unpack(NULL, len, body);
    if (!m) {
        reply_decode_error(r, "Failed to decode user");
        return;
    }
    if (!m->email || !*m->email) {
        reply_error(r, 400, PN_GRPC_UNKNOWN, "email is required");
        goto out;
    }
    struct pending *p = pending_new(pg, r);
    p->in_call = true;
    int rv = pn_backend_sync_user(pg->backend, user_from_pb(m), sync_done, p, &p->op);
    pending_launched(p, rv, 500, PN_GRPC_INTERNAL);
out:
    service__user__free_unpacked(m, NULL);
}

/* SyncUsers: the full set, applied by the backend as a diff. */
static void h_users_sync(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    Service__Users *m = service__users__unpack(NULL, len, body);
    if (!m) {
        reply_decode_error(r, "Failed to decode user");
        return;
    }
    struct pn_userset *set = userset_from_pb(m->users, m->n_users);
    service__users__free_unpacked(m, NULL);
    struct pending *p = pending_new(pg, r);
    p->in_call = true;
    int rv = pn_backend_sync_users(pg->backend, set, sync_done, p, &p->op);
    pending_launched(p, rv, 500, PN_GRPC_INTERNAL);
}

/* PUT /users/sync/chunked: the framed body (spec §6.3), all errors 400. */
static void h_users_sync_chunked(struct pn_pasarguard *pg, struct reply r, const uint8_t *body,
                                 size_t len)
{
    struct pn_user **users = NULL;
    size_t n = 0;
    char err[256];
    if (pn_pasarguard_parse_chunks(body, len, &users, &n, err, sizeof err) < 0) {
        reply_error(r, 400, PN_GRPC_INVALID_ARGUMENT, err);
        return;
    }
    struct pending *p = pending_new(pg, r);
    p->in_call = true;
    int rv = pn_backend_sync_some(pg->backend, users, n, sync_done, p, &p->op);
    pending_launched(p, rv, 500, PN_GRPC_INTERNAL);
}

/* ---- log streams (GetLogs, GET /logs) -------------------------------------- */

static bool wants_long_poll(const struct pn_pasarguard *pg, const struct pn_req *req);
static void h_logs_poll(struct pn_pasarguard *pg, struct pn_req *req);

/* A reader of the backend's log ring that forwards lines to one client:
 * REST lines as `line\n` in a chunked text/event-stream body, gRPC one
 * Log{detail} message per line. It starts with the whole ring as backlog.
 * Wake-ups (a new line, the transport drained, the session ended) only
 * schedule `wake`; the writing happens from the loop, so bursts of lines
 * are batched and no transport I/O runs inside the ring or the backend.
 * While LOG_HIGH_WATER bytes wait in the transport the reader stops
 * reading; the ring then drops its oldest lines (counted in dropped), the
 * node never blocks and never buffers more than that per reader. */
struct log_stream {
    struct pn_pasarguard *pg;
    struct reply r;
    struct pn_log_sub *sub;
    struct pn_backend_listener listener;
    struct event *wake; /* NULL: no loop given, work from the callbacks */
    struct pn_buf out;  /* one batch of REST lines, or one gRPC message */
    uint64_t dropped, dropped_logged;
    bool session_over;              /* end once the queued lines are written */
    struct log_stream *prev, *next; /* pg->logs */
};

static void logs_free(struct log_stream *ls)
{
    struct pn_pasarguard *pg = ls->pg;
    if (ls->prev)
        ls->prev->next = ls->next;
    else
        pg->logs = ls->next;
    if (ls->next)
        ls->next->prev = ls->prev;
    pg->nlogs--;
    pn_backend_unlisten(pg->backend, &ls->listener);
    pn_log_sub_free(ls->sub);
    if (ls->wake)
        event_free(ls->wake);
    pn_buf_free(&ls->out);
    pn_backend_stream_end(pg->backend);
    free(ls);
}

/* A clean end: REST ends the chunked body, gRPC finishes with OK. */
static void logs_end(struct log_stream *ls)
{
    int rv = PN_OK;
    if (ls->r.req)
        rv = pn_req_stream_end(ls->r.req);
    else
        pn_grpc_call_finish(ls->r.call, PN_GRPC_OK, NULL);
    if (rv == PN_OK)
        pn_backend_touch(ls->pg->backend);
    logs_free(ls);
}

static size_t logs_pending(const struct log_stream *ls)
{
    return ls->r.req ? pn_req_stream_pending(ls->r.req) : pn_grpc_call_pending(ls->r.call);
}

/* Log{detail = line}, encoded by hand so the line's bytes go out as the
 * ring holds them (field 1, length-delimited; an empty line is the empty
 * message, as proto3 omits default values). */
static void logs_encode(struct pn_buf *out, const char *line, size_t len)
{
    pn_buf_reset(out);
    if (len == 0)
        return;
    uint8_t hdr[11];
    size_t n = 0;
    hdr[n++] = 0x0a;
    uint64_t v = len;
    while (v >= 0x80) {
        hdr[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    hdr[n++] = (uint8_t)v;
    pn_buf_append(out, hdr, n);
    pn_buf_append(out, line, len);
}

/* Writes lines until the reader caught up or the transport holds
 * LOG_HIGH_WATER bytes (on_writable resumes), then ends the stream if the
 * session is over. A failed write means the peer is gone: its on_close /
 * on_cancel frees the stream. */
static void logs_pump(struct log_stream *ls)
{
    const char *line;
    size_t len;
    for (;;) {
        if (logs_pending(ls) >= LOG_HIGH_WATER) {
            if (ls->session_over)
                logs_end(ls); /* what is queued still goes out first */
            return;
        }
        if (ls->r.req) {
            pn_buf_reset(&ls->out);
            while (ls->out.len < LOG_BATCH &&
                   (line = pn_log_sub_next(ls->sub, &len, &ls->dropped))) {
                pn_buf_append(&ls->out, line, len);
                pn_buf_append(&ls->out, "\n", 1);
            }
            if (ls->out.len == 0)
                break;
            if (pn_req_stream_write(ls->r.req, ls->out.data, ls->out.len) < 0)
                return;
        } else {
            line = pn_log_sub_next(ls->sub, &len, &ls->dropped);
            if (!line)
                break;
            logs_encode(&ls->out, line, len);
            if (pn_grpc_call_send(ls->r.call, ls->out.data, ls->out.len) < 0)
                return;
        }
    }
    if (ls->dropped != ls->dropped_logged) {
        pn_log_debug("log stream: %llu lines dropped for a slow reader",
                     (unsigned long long)(ls->dropped - ls->dropped_logged));
        ls->dropped_logged = ls->dropped;
    }
    if (ls->session_over)
        logs_end(ls);
}

static void logs_wake_cb(evutil_socket_t fd, short what, void *arg)
{
    logs_pump(arg);
}

static void logs_wake(struct log_stream *ls)
{
    if (ls->wake)
        event_active(ls->wake, EV_TIMEOUT, 1);
    else
        logs_pump(ls);
}

static void logs_notify(struct pn_log_sub *s, void *arg)
{
    logs_wake(arg);
}

static void logs_session_end(struct pn_backend_listener *l)
{
    struct log_stream *ls =
        (struct log_stream *)((char *)l - offsetof(struct log_stream, listener));
    ls->session_over = true;
    logs_wake(ls);
}

static void logs_req_closed(struct pn_req *req, void *arg)
{
    logs_free(arg);
}

static void logs_req_writable(struct pn_req *req, void *arg)
{
    logs_wake(arg);
}

static void logs_grpc_writable(struct pn_grpc_call *call)
{
    struct log_stream *ls = pn_grpc_call_data(call);
    if (ls)
        logs_wake(ls);
}

static void logs_grpc_cancel(struct pn_grpc_call *call)
{
    struct log_stream *ls = pn_grpc_call_data(call);
    pn_grpc_call_set_data(call, NULL);
    if (ls)
        logs_free(ls);
}

/* GetLogs / GET /logs (spec §6.4, §13): subscribes with the whole ring as
 * backlog and counts as panel activity while open (spec §17 row 14). */
static void h_logs(struct pn_pasarguard *pg, struct reply r, const uint8_t *body, size_t len)
{
    if (r.req && wants_long_poll(pg, r.req)) {
        h_logs_poll(pg, r.req);
        return;
    }
    if (pg->nlogs >= MAX_LOG_STREAMS) {
        char text[64];
        snprintf(text, sizeof text, "too many log streams (%d open)", MAX_LOG_STREAMS);
        reply_error(r, 503, PN_GRPC_RESOURCE_EXHAUSTED, text);
        return;
    }
    if (r.req) {
        const struct pn_http_header hdrs[] = {
            {"Content-Type", "text/event-stream"},
            {"Cache-Control", "no-cache"},
            {"Connection", "keep-alive"}, /* HTTP/1.1 only: HTTP/2 forbids it */
        };
        if (pn_req_stream_start(r.req, 200, hdrs, r.req->http_version >= 20 ? 2 : 3) < 0)
            return;
    }
    struct log_stream *ls = pn_new(struct log_stream);
    ls->pg = pg;
    ls->r = r;
    pn_buf_init(&ls->out, 0);
    if (pg->base)
        ls->wake = event_new(pg->base, -1, 0, logs_wake_cb, ls);
    ls->next = pg->logs;
    if (pg->logs)
        pg->logs->prev = ls;
    pg->logs = ls;
    pg->nlogs++;
    if (r.req) {
        pn_req_set_callbacks(r.req, logs_req_closed, logs_req_writable, ls);
    } else {
        pn_grpc_call_set_data(r.call, ls);
        pn_grpc_call_set_on_writable(r.call, logs_grpc_writable);
    }
    pn_backend_stream_begin(pg->backend);
    ls->listener.on_session_end = logs_session_end;
    pn_backend_listen(pg->backend, &ls->listener);
    ls->sub = pn_log_sub_new(pn_backend_logs(pg->backend), SIZE_MAX, logs_notify, ls);
    logs_wake(ls);
}

/* ---- long-poll logs (legacy session mode, spec §5.3) ------------------------ */

/* One REST `GET /logs` in the pre-2025 form: it waits for lines on the
 * session's cursor and answers once with a LogList of at most max_log
 * lines: 200 as soon as it holds a line and the cursor has caught up (or
 * the maximum is reached), 204 with an empty LogList after 60 s. Instead
 * of the reference's 100 ms polling it is woken by new lines, batched
 * through the loop. A client that leaves first frees it; the reference's
 * 408 would have no one to read it. While waiting it counts as panel
 * activity, like the streams. */
struct long_poll {
    struct pn_pasarguard *pg;
    struct pn_req *req;
    struct event *timer;
    struct long_poll *prev, *next; /* pg->sess.polls */
};

static void poll_free(struct long_poll *lp)
{
    struct session *s = &lp->pg->sess;
    if (lp->prev)
        lp->prev->next = lp->next;
    else
        s->polls = lp->next;
    if (lp->next)
        lp->next->prev = lp->prev;
    else
        s->polls_tail = lp->prev;
    if (lp->timer)
        event_free(lp->timer);
    pn_backend_stream_end(lp->pg->backend);
    free(lp);
}

/* Appends one `repeated string logs = 1` entry (every entry is written,
 * an empty line too). */
static void loglist_add(struct pn_buf *out, const char *line, size_t len)
{
    uint8_t hdr[11];
    size_t n = 0;
    hdr[n++] = 0x0a;
    uint64_t v = len;
    while (v >= 0x80) {
        hdr[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    hdr[n++] = (uint8_t)v;
    pn_buf_append(out, hdr, n);
    pn_buf_append(out, line, len);
}

/* Takes up to max_log lines off the session's cursor and answers with
 * them. Without a line it answers only when final (timeout, session end,
 * node stop): 204 and an empty LogList. Returns true when lp answered
 * (and is freed). */
static bool poll_answer(struct long_poll *lp, bool final)
{
    struct pn_pasarguard *pg = lp->pg;
    struct session *s = &pg->sess;
    struct pn_buf out;
    size_t n = 0, len;
    const char *line;
    pn_buf_init(&out, 0);
    while (s->cursor && n < pg->max_log && (line = pn_log_sub_next(s->cursor, &len, &s->dropped))) {
        loglist_add(&out, line, len);
        n++;
    }
    if (s->dropped != s->dropped_logged) {
        pn_log_debug("long-poll logs: %llu lines dropped while the panel was away",
                     (unsigned long long)(s->dropped - s->dropped_logged));
        s->dropped_logged = s->dropped;
    }
    if (n == 0 && !final) {
        pn_buf_free(&out);
        return false;
    }
    if (pn_req_respond(lp->req, n ? 200 : 204, protobuf_hdr, 1, out.data, out.len) == PN_OK)
        pn_backend_touch(pg->backend);
    pn_buf_free(&out);
    poll_free(lp);
    return true;
}

/* Hands new lines to the waiting polls, oldest first, until the cursor
 * has caught up. */
static void polls_pump(struct pn_pasarguard *pg)
{
    while (pg->sess.polls && poll_answer(pg->sess.polls, false))
        ;
}

/* Answers every waiting poll with what it can still take (node stop,
 * session end). */
static void polls_finish(struct pn_pasarguard *pg)
{
    while (pg->sess.polls)
        poll_answer(pg->sess.polls, true);
}

static void polls_wake_cb(evutil_socket_t fd, short what, void *arg)
{
    polls_pump(arg);
}

static void polls_notify(struct pn_log_sub *sub, void *arg)
{
    struct pn_pasarguard *pg = arg;
    if (pg->sess_wake)
        event_active(pg->sess_wake, EV_TIMEOUT, 1);
    else
        polls_pump(pg);
}

static void poll_timeout(evutil_socket_t fd, short what, void *arg)
{
    poll_answer(arg, true);
}

static void poll_req_closed(struct pn_req *req, void *arg)
{
    poll_free(arg);
}

/* GET /logs, long-poll form. The session check already passed, so a
 * session is open. */
static void h_logs_poll(struct pn_pasarguard *pg, struct pn_req *req)
{
    struct session *s = &pg->sess;
    if (!s->cursor)
        s->cursor = pn_log_sub_new(pn_backend_logs(pg->backend), SIZE_MAX, polls_notify, pg);
    struct long_poll *lp = pn_new(struct long_poll);
    lp->pg = pg;
    lp->req = req;
    lp->prev = s->polls_tail;
    if (s->polls_tail)
        s->polls_tail->next = lp;
    else
        s->polls = lp;
    s->polls_tail = lp;
    pn_backend_stream_begin(pg->backend);
    pn_req_set_callbacks(req, poll_req_closed, NULL, lp);
    if (pg->base) {
        lp->timer = evtimer_new(pg->base, poll_timeout, lp);
        struct timeval tv = {LONG_POLL_WAIT_MS / 1000, (LONG_POLL_WAIT_MS % 1000) * 1000};
        evtimer_add(lp->timer, &tv);
    }
    polls_pump(pg);
}

/* Whether a REST GET /logs gets the long-poll form: only in session mode,
 * when MAX_LOG_PER_REQUEST was set or the client asks for protobuf. */
static bool wants_long_poll(const struct pn_pasarguard *pg, const struct pn_req *req)
{
    if (!pg->session_mode)
        return false;
    if (pg->long_poll_always)
        return true;
    const char *accept = pn_req_header(req, "accept");
    return accept && strcasestr(accept, "application/x-protobuf") != NULL;
}

/* ---- the session's lifetime ------------------------------------------------- */

/* Closes the session: waiting polls get what they can still take, the log
 * cursor goes. Calls from then on are refused with `please connect first`. */
static void session_end(struct pn_pasarguard *pg)
{
    struct session *s = &pg->sess;
    polls_finish(pg);
    if (s->cursor)
        pn_log_sub_free(s->cursor);
    memset(s, 0, sizeof *s);
}

/* Opens a new session for the caller at ip, replacing any open one. Returns
 * PN_OK, or PN_ERR_IO when the OS gave no random bytes (no session then). */
static int session_begin(struct pn_pasarguard *pg, const char *ip)
{
    struct pn_uuid id;
    session_end(pg);
    int rv = pn_uuid_random(&id);
    if (rv < 0) {
        pn_log_error("session: %s", pn_strerror(rv));
        return rv;
    }
    pg->sess.active = true;
    pg->sess.id = id;
    snprintf(pg->sess.ip, sizeof pg->sess.ip, "%s", ip ? ip : "");
    pn_log_info("panel session opened from %s", pg->sess.ip);
    return PN_OK;
}

/* The backend's panel session ended: with no core left (Stop, keep-alive
 * with PROXYNODE_KEEPALIVE_STOPS_CORE) the session closes, as the
 * reference's disconnect forgets it; a Start taking over leaves it to
 * start_done to replace. Listens again for the next end. */
static void session_backend_end(struct pn_backend_listener *l)
{
    struct pn_pasarguard *pg =
        (struct pn_pasarguard *)((char *)l - offsetof(struct pn_pasarguard, sess_listener));
    pn_backend_listen(pg->backend, l);
    if (pn_backend_state(pg->backend) == PN_BACKEND_NONE && pg->sess.active) {
        pn_log_info("panel session closed");
        session_end(pg);
    }
}

/* REST auth in session mode: a verified client certificate; then, except
 * for /start (mTLS alone), the session check. An accepted call refreshes
 * keep-alive. */
static const struct api_error *rest_session_auth(struct pn_pasarguard *pg, struct pn_req *req)
{
    if (!req->peer || !req->peer->client_cert_verified)
        return &err_no_client_cert;
    if (strcmp(req->path, "/start") == 0)
        return NULL;
    const struct api_error *e =
        check_session_rest(&pg->sess, req->peer->ip, pn_req_header(req, "authorization"));
    if (!e)
        pn_backend_touch(pg->backend);
    return e;
}

/* ---- gRPC client streams: SyncUser, SyncUsersChunked ----------------------- */

/* One SyncUser or SyncUsersChunked call. SyncUser applies users one at a
 * time in arrival order (a user changed twice in one stream ends in its
 * last state) and answers Empty once the client half-closed and the queue
 * is empty; an aborted stream keeps what was applied. SyncUsersChunked
 * collects chunks until last=true, then applies and answers without
 * waiting for the half-close (spec §11). Open streams count as activity. */
struct user_stream {
    struct pn_pasarguard *pg;
    struct pn_grpc_call *call;
    struct pn_backend_op *op;
    struct pn_user **queue; /* SyncUser: not yet handed to the backend */
    size_t qhead, qlen, qcap;
    struct chunkset chunks; /* SyncUsersChunked */
    bool eof;               /* SyncUser: client half-closed; chunked: last chunk seen */
    bool busy;              /* a backend operation is in flight */
    bool pumping;           /* inside su_pump */
    bool finished;          /* answered or cancelled: the call is gone */
    bool abort_logged;      /* the client's abort was logged with its counts */
    int depth;              /* frames using the stream: free deferred */
};

static struct user_stream *us_get(struct pn_grpc_call *call)
{
    struct user_stream *st = pn_grpc_call_data(call);
    if (st)
        return st;
    st = pn_new(struct user_stream);
    st->pg = pn_grpc_call_service_arg(call);
    st->call = call;
    pn_grpc_call_set_data(call, st);
    pn_backend_stream_begin(st->pg->backend);
    return st;
}

static void us_release(struct user_stream *st)
{
    if (!st->finished || st->depth > 0)
        return;
    size_t left = st->qlen - st->qhead;
    if (left && !st->abort_logged)
        pn_log_warn("SyncUser stream ended early: %zu queued users not applied", left);
    for (size_t i = st->qhead; i < st->qlen; i++)
        pn_user_free(st->queue[i]);
    free(st->queue);
    chunkset_free(&st->chunks);
    pn_backend_stream_end(st->pg->backend);
    free(st);
}

/* Answers the call (OK: an Empty message). An operation still in flight is
 * detached: what it applies stays applied. */
static void us_finish(struct user_stream *st, enum pn_grpc_code code, const char *text)
{
    if (st->finished)
        return;
    st->finished = true;
    if (st->op)
        pn_backend_op_detach(st->op);
    st->op = NULL;
    st->busy = false;
    if (code == PN_GRPC_OK) {
        if (pn_grpc_call_send(st->call, NULL, 0) == PN_OK)
            pn_backend_touch(st->pg->backend);
        else
            code = PN_GRPC_UNAVAILABLE;
    }
    pn_grpc_call_set_data(st->call, NULL);
    pn_grpc_call_finish(st->call, code, text);
    st->call = NULL;
}

/* A backend call that failed before it started (code: the apply error's). */
static void us_refused(struct user_stream *st, int rv, const char *prefix)
{
    const struct api_error *e = check_backend(st->pg);
    if (e) {
        us_finish(st, e->grpc_code, e->text);
        return;
    }
    char *text = pn_asprintf("%s%s", prefix, pn_strerror(rv));
    us_finish(st, PN_GRPC_INTERNAL, text);
    free(text);
}

static void us_cancel(struct pn_grpc_call *call)
{
    struct user_stream *st = pn_grpc_call_data(call);
    pn_grpc_call_set_data(call, NULL);
    if (!st)
        return;
    /* DESIGN "Decisions": an aborted stream keeps what was applied, logged. */
    const char *rpc = strrchr(pn_grpc_call_path(call), '/');
    pn_log_warn("%s stream aborted by the client: %zu users applied or in flight, %zu queued "
                "users not applied (a chunked sync before its last chunk applies nothing)",
                rpc ? rpc + 1 : "sync", st->qhead, st->qlen - st->qhead);
    st->abort_logged = true;
    if (st->op)
        pn_backend_op_detach(st->op);
    st->op = NULL;
    st->busy = false;
    st->finished = true;
    st->call = NULL;
    us_release(st);
}

static void su_pump(struct user_stream *st);

static void su_done(int rv, const char *err, void *arg)
{
    struct user_stream *st = arg;
    st->busy = false;
    st->op = NULL;
    if (rv < 0) {
        us_finish(st, PN_GRPC_INTERNAL, err && *err ? err : pn_strerror(rv));
        us_release(st);
        return;
    }
    su_pump(st); /* inside su_pump's own call: its loop goes on */
}

/* Hands the queued users to the backend one at a time. A loop, not
 * recursion, so a backend that completes at once costs no stack. */
static void su_pump(struct user_stream *st)
{
    if (st->pumping)
        return;
    st->pumping = true;
    st->depth++;
    while (!st->finished && !st->busy) {
        if (st->qhead == st->qlen) {
            if (st->eof)
                us_finish(st, PN_GRPC_OK, NULL);
            break;
        }
        struct pn_user *u = st->queue[st->qhead++];
        struct pn_backend_op *op = NULL;
        st->busy = true;
        int rv = pn_backend_sync_user(st->pg->backend, u, su_done, st, &op);
        if (rv < 0) {
            st->busy = false;
            us_refused(st, rv, "failed to update user: ");
            break;
        }
        if (st->busy)
            st->op = op;
    }
    st->pumping = false;
    st->depth--;
    us_release(st);
}

static void su_message(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct user_stream *st = us_get(call);
    if (st->finished)
        return;
    Service__User *m = service__user__unpack(NULL, len, msg);
    if (!m) {
        us_finish(st, PN_GRPC_INVALID_ARGUMENT, GRPC_UNMARSHAL_ERR);
        us_release(st);
        return;
    }
    if (!m->email || !*m->email) {
        us_finish(st, PN_GRPC_UNKNOWN, "email is required");
    } else {
        if (st->qlen == st->qcap) {
            if (st->qhead > 0) { /* reuse the consumed front */
                memmove(st->queue, st->queue + st->qhead,
                        (st->qlen - st->qhead) * sizeof *st->queue);
                st->qlen -= st->qhead;
                st->qhead = 0;
            }
            if (st->qlen == st->qcap) {
                st->qcap = st->qcap ? st->qcap * 2 : 16;
                st->queue = pn_realloc(st->queue, st->qcap * sizeof *st->queue);
            }
        }
        st->queue[st->qlen++] = user_from_pb(m);
    }
    service__user__free_unpacked(m, NULL);
    if (st->finished)
        us_release(st);
    else
        su_pump(st);
}

static void su_end(struct pn_grpc_call *call)
{
    struct user_stream *st = us_get(call);
    st->eof = true;
    su_pump(st);
}

static void sc_done(int rv, const char *err, void *arg)
{
    struct user_stream *st = arg;
    st->busy = false;
    st->op = NULL;
    if (rv < 0) {
        const char *e = err && *err ? err : pn_strerror(rv);
        static const char prefix[] = "failed to update users";
        char *text = strncmp(e, prefix, sizeof prefix - 1) == 0 ? pn_strdup(e)
                                                                : pn_asprintf("%s: %s", prefix, e);
        us_finish(st, PN_GRPC_INTERNAL, text);
        free(text);
    } else {
        us_finish(st, PN_GRPC_OK, NULL);
    }
    us_release(st);
}

static void sc_message(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct user_stream *st = us_get(call);
    if (st->finished || st->eof)
        return; /* after the last chunk nothing more is read */
    Service__UsersChunk *m = service__users_chunk__unpack(NULL, len, msg);
    if (!m) {
        us_finish(st, PN_GRPC_INTERNAL, "failed to receive chunk: " PROTO_PARSE_ERR);
        us_release(st);
        return;
    }
    chunkset_add(&st->chunks, m);
    bool last = m->last;
    service__users_chunk__free_unpacked(m, NULL);
    if (!last)
        return;
    st->eof = true;
    struct pn_user **users = NULL;
    size_t n = 0;
    char err[256];
    int rv = chunkset_join(&st->chunks, &users, &n, err, sizeof err);
    chunkset_free(&st->chunks);
    if (rv < 0) {
        us_finish(st, PN_GRPC_INVALID_ARGUMENT, err);
        us_release(st);
        return;
    }
    struct pn_backend_op *op = NULL;
    st->busy = true;
    st->depth++;
    rv = pn_backend_sync_some(st->pg->backend, users, n, sc_done, st, &op);
    st->depth--;
    if (rv < 0) {
        st->busy = false;
        us_refused(st, rv, "failed to update users: ");
    } else if (st->busy) {
        st->op = op;
    }
    us_release(st);
}

static void sc_end(struct pn_grpc_call *call)
{
    struct user_stream *st = us_get(call);
    if (st->finished || st->eof)
        return; /* the answer follows the apply, not the half-close */
    us_finish(st, PN_GRPC_INVALID_ARGUMENT, "missing final chunk indicator");
    us_release(st);
}

/* ---- REST ---------------------------------------------------------------- */

/* A handler shared by both protocols: body is the request message. */
typedef void (*handler_fn)(struct pn_pasarguard *pg, struct reply r, const uint8_t *body,
                           size_t len);

struct route {
    const char *path;
    const char *methods[2];
    bool guard; /* needs a started core */
    handler_fn handler;
};

/* Spec §6.1 and the legacy per-type stats routes (§5.3). Latency needs no
 * started core (DESIGN "Small rules": an empty list without one). */
static const struct route routes[] = {
    {"/start", {"POST"}, false, h_start},
    {"/info", {"GET"}, false, h_info},
    {"/stop", {"PUT"}, true, h_stop},
    {"/logs", {"GET"}, true, h_logs},
    {"/stats", {"GET"}, true, h_stats},
    {"/stats/", {"GET"}, true, h_stats},
    {"/stats/latency", {"GET"}, false, h_latency},
    {"/stats/user/online", {"GET"}, true, h_online},
    {"/stats/user/online_ip", {"GET"}, true, h_online_ip},
    {"/stats/backend", {"GET"}, true, h_backend_stats},
    {"/stats/system", {"GET"}, true, h_system_stats},
    {"/stats/outbounds", {"GET"}, true, h_stats_outbounds},
    {"/stats/outbound", {"GET"}, true, h_stats_outbound},
    {"/stats/inbounds", {"GET"}, true, h_stats_inbounds},
    {"/stats/inbound", {"GET"}, true, h_stats_inbound},
    {"/stats/users", {"GET"}, true, h_stats_users},
    {"/stats/user", {"GET"}, true, h_stats_user},
    {"/user/sync", {"PUT"}, true, h_user_sync},
    {"/users/sync", {"PUT", "POST"}, true, h_users_sync},
    {"/users/sync/chunked", {"PUT"}, true, h_users_sync_chunked},
};

static bool method_allowed(const struct route *r, const char *method)
{
    for (size_t i = 0; i < 2 && r->methods[i]; i++)
        if (strcmp(r->methods[i], method) == 0 ||
            (strcmp(method, "HEAD") == 0 && strcmp(r->methods[i], "GET") == 0))
            return true;
    return false;
}

/* Answers a REST request that fails authentication; true when it did. */
static bool rest_refuse(struct pn_pasarguard *pg, struct pn_req *req)
{
    const struct api_error *e = pg->session_mode ? rest_session_auth(pg, req)
                                                 : check_key(pg, pn_req_header(req, "x-api-key"),
                                                             pn_req_header(req, "authorization"));
    if (e)
        pn_req_respond_text(req, e->http_status, e->text);
    return e != NULL;
}

void pn_pasarguard_rest_head(struct pn_req *req, void *arg)
{
    rest_refuse(arg, req);
}

void pn_pasarguard_rest(struct pn_req *req, void *arg)
{
    static const uint8_t empty[1];
    struct pn_pasarguard *pg = arg;
    if (rest_refuse(pg, req))
        return;
    const struct api_error *e;
    const struct route *r = NULL;
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (strcmp(routes[i].path, req->path) == 0)
            r = &routes[i];
    if (!r) {
        pn_req_respond_text(req, 404, "404 page not found");
        return;
    }
    if (!method_allowed(r, req->method)) {
        pn_req_respond(req, 405, NULL, 0, NULL, 0);
        return;
    }
    e = r->guard ? check_backend(pg) : NULL;
    if (e) {
        pn_req_respond_text(req, e->http_status, e->text);
        return;
    }
    r->handler(pg, (struct reply){.req = req}, req->body ? req->body : empty, req->body_len);
}

/* ---- gRPC ---------------------------------------------------------------- */

enum {
    RPC_START,
    RPC_STOP,
    RPC_GET_BASE_INFO,
    RPC_GET_LOGS,
    RPC_GET_SYSTEM_STATS,
    RPC_GET_BACKEND_STATS,
    RPC_GET_STATS,
    RPC_GET_OUTBOUNDS_LATENCY,
    RPC_GET_USER_ONLINE_STATS,
    RPC_GET_USER_ONLINE_IP_LIST_STATS,
    RPC_SYNC_USER,
    RPC_SYNC_USERS,
    RPC_SYNC_USERS_CHUNKED,
    RPC_GET_OUTBOUNDS_STATS,
    RPC_GET_OUTBOUND_STATS,
    RPC_GET_INBOUNDS_STATS,
    RPC_GET_INBOUND_STATS,
    RPC_GET_USERS_STATS,
    RPC_GET_USER_STATS,
    RPC_COUNT
};

/* What each method runs and whether it needs a started core (spec §5.2).
 * The client streams have their own handlers in the method table. */
struct rpc_impl {
    bool guard;
    handler_fn handler;
};

static const struct rpc_impl impls[RPC_COUNT] = {
    [RPC_START] = {false, h_start},
    [RPC_STOP] = {true, h_stop},
    [RPC_GET_BASE_INFO] = {false, h_info},
    [RPC_GET_LOGS] = {true, h_logs},
    [RPC_GET_SYSTEM_STATS] = {true, h_system_stats},
    [RPC_GET_BACKEND_STATS] = {true, h_backend_stats},
    [RPC_GET_STATS] = {true, h_stats},
    [RPC_GET_OUTBOUNDS_LATENCY] = {false, h_latency},
    [RPC_GET_USER_ONLINE_STATS] = {true, h_online},
    [RPC_GET_USER_ONLINE_IP_LIST_STATS] = {true, h_online_ip},
    [RPC_SYNC_USER] = {true, NULL},
    [RPC_SYNC_USERS] = {true, h_users_sync},
    [RPC_SYNC_USERS_CHUNKED] = {true, NULL},
    [RPC_GET_OUTBOUNDS_STATS] = {true, h_stats_outbounds},
    [RPC_GET_OUTBOUND_STATS] = {true, h_stats_outbound},
    [RPC_GET_INBOUNDS_STATS] = {true, h_stats_inbounds},
    [RPC_GET_INBOUND_STATS] = {true, h_stats_inbound},
    [RPC_GET_USERS_STATS] = {true, h_stats_users},
    [RPC_GET_USER_STATS] = {true, h_stats_user},
};

static void grpc_unary(struct pn_grpc_call *call, const uint8_t *msg, size_t len);

#define NODE_RPC(name) "/service.NodeService/" name
#define UNARY(name)                                                                                \
    {                                                                                              \
        NODE_RPC(name), PN_GRPC_UNARY, grpc_unary, NULL, pending_grpc_cancel                       \
    }

static const struct pn_grpc_method methods[RPC_COUNT] = {
    [RPC_START] = UNARY("Start"),
    [RPC_STOP] = UNARY("Stop"),
    [RPC_GET_BASE_INFO] = UNARY("GetBaseInfo"),
    [RPC_GET_LOGS] = {NODE_RPC("GetLogs"), PN_GRPC_SERVER_STREAM, grpc_unary, NULL,
                      logs_grpc_cancel},
    [RPC_GET_SYSTEM_STATS] = UNARY("GetSystemStats"),
    [RPC_GET_BACKEND_STATS] = UNARY("GetBackendStats"),
    [RPC_GET_STATS] = UNARY("GetStats"),
    [RPC_GET_OUTBOUNDS_LATENCY] = UNARY("GetOutboundsLatency"),
    [RPC_GET_USER_ONLINE_STATS] = UNARY("GetUserOnlineStats"),
    [RPC_GET_USER_ONLINE_IP_LIST_STATS] = UNARY("GetUserOnlineIpListStats"),
    [RPC_SYNC_USER] = {NODE_RPC("SyncUser"), PN_GRPC_CLIENT_STREAM, su_message, su_end, us_cancel},
    [RPC_SYNC_USERS] = UNARY("SyncUsers"),
    [RPC_SYNC_USERS_CHUNKED] = {NODE_RPC("SyncUsersChunked"), PN_GRPC_CLIENT_STREAM, sc_message,
                                sc_end, us_cancel},
    [RPC_GET_OUTBOUNDS_STATS] = UNARY("GetOutboundsStats"),
    [RPC_GET_OUTBOUND_STATS] = UNARY("GetOutboundStats"),
    [RPC_GET_INBOUNDS_STATS] = UNARY("GetInboundsStats"),
    [RPC_GET_INBOUND_STATS] = UNARY("GetInboundStats"),
    [RPC_GET_USERS_STATS] = UNARY("GetUsersStats"),
    [RPC_GET_USER_STATS] = UNARY("GetUserStats"),
};

/* Unary and server-streaming methods: the shared handler of the method's
 * table row (every such row has one). */
static void grpc_unary(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct pn_pasarguard *pg = pn_grpc_call_service_arg(call);
    size_t i = (size_t)(pn_grpc_call_method(call) - methods);
    impls[i].handler(pg, (struct reply){.call = call}, msg, len);
}

/* gRPC auth in session mode: a verified client certificate; then, except
 * for Start (mTLS alone), the session check. An accepted call refreshes
 * keep-alive. */
static const struct api_error *grpc_session_auth(struct pn_pasarguard *pg,
                                                 struct pn_grpc_call *call,
                                                 const struct pn_grpc_method *m, char *detail,
                                                 size_t detaillen)
{
    const struct pn_peer *peer = pn_grpc_call_peer(call);
    if (!peer || !peer->client_cert_verified)
        return &err_no_client_cert;
    if (m == &methods[RPC_START])
        return NULL;
    const struct api_error *e = check_session_grpc(
        &pg->sess, pn_grpc_call_metadata(call, "authorization"), detail, detaillen);
    if (!e)
        pn_backend_touch(pg->backend);
    return e;
}

/* Auth before anything else, unknown methods included (spec §7.2); then
 * the guard of methods that need a started core. */
static bool grpc_intercept(struct pn_grpc_call *call, const struct pn_grpc_method *m)
{
    struct pn_pasarguard *pg = pn_grpc_call_service_arg(call);
    char detail[160] = "";
    const struct api_error *e = pg->session_mode
                                    ? grpc_session_auth(pg, call, m, detail, sizeof detail)
                                    : check_key(pg, pn_grpc_call_metadata(call, "x-api-key"),
                                                pn_grpc_call_metadata(call, "authorization"));
    if (!e && m && impls[m - methods].guard)
        e = check_backend(pg);
    if (e) {
        pn_grpc_call_finish(call, e->grpc_code, detail[0] ? detail : e->text);
        return false;
    }
    return true;
}

/* ---- lifecycle ------------------------------------------------------------ */

struct pn_pasarguard *pn_pasarguard_new(const struct pn_pasarguard_opts *opts)
{
    struct pn_pasarguard *pg = pn_new(struct pn_pasarguard);
    pg->api_key = opts->api_key;
    pg->backend = opts->backend;
    pg->node_version = pn_strdup(opts->node_version ? opts->node_version : "");
    pg->base = opts->base;
    pg->grpc.methods = methods;
    pg->grpc.nmethods = RPC_COUNT;
    pg->grpc.intercept = grpc_intercept;
    pg->grpc.arg = pg;
    pg->grpc.max_message = MAX_MESSAGE;
    pg->session_mode = opts->session_mode;
    pg->long_poll_always = opts->long_poll_logs;
    pg->max_log =
        opts->max_log_per_request > 0 ? (size_t)opts->max_log_per_request : LONG_POLL_MAX_DEFAULT;
    if (pg->session_mode) {
        pg->sess_listener.on_session_end = session_backend_end;
        pn_backend_listen(pg->backend, &pg->sess_listener);
        if (pg->base)
            pg->sess_wake = event_new(pg->base, -1, 0, polls_wake_cb, pg);
    }
    return pg;
}

void pn_pasarguard_end_streams(struct pn_pasarguard *pg)
{
    while (pg->logs)
        logs_end(pg->logs);
    polls_finish(pg);
}

void pn_pasarguard_free(struct pn_pasarguard *pg)
{
    if (!pg)
        return;
    pn_pasarguard_end_streams(pg);
    session_end(pg);
    if (pg->session_mode)
        pn_backend_unlisten(pg->backend, &pg->sess_listener);
    if (pg->sess_wake)
        event_free(pg->sess_wake);
    free(pg->node_version);
    free(pg);
}

const struct pn_grpc_service *pn_pasarguard_grpc(const struct pn_pasarguard *pg)
{
    return &pg->grpc;
}
