/* The Marzban-node REST API and /logs WebSocket (see marzban.h, spec
 * marzban.md §2-§4). This module owns the single panel session (its id,
 * the client IP the core's API rule is locked to), the requests waiting
 * for a core operation (`struct call`), and the open log streams
 * (`struct stream`, one log-ring subscriber and one WebSocket each). The
 * core itself is node/mzcore.h, which serialises /start, /restart and
 * /stop; `/` and /ping answer from state at once and never wait on it.
 *
 * Every answer is compact JSON with Content-Type application/json and a
 * JSON object as body. Validation follows FastAPI + pydantic 2 as the
 * reference runs it with its custom handler (one key per field, the
 * message without pydantic's URL suffix), and runs before the session
 * check. Body-level problems, which FastAPI keys by position or "body",
 * are keyed "body" here:
 *   empty body              {"detail":{"body":"Field required"}}
 *   not JSON                {"detail":{"body":"JSON decode error"}}
 *   JSON but not an object  {"detail":{"body":"Input should be a valid
 *                            dictionary or object to extract fields from"}} */
#include "api/marzban.h"

#include <event2/event.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"
#include "base/text.h"
#include "base/time.h"
#include "base/utf8.h"
#include "base/uuid.h"
#include "net/ws.h"
#include "node/logring.h"
#include "node/mzcore.h"

#define LOG_BACKLOG 100           /* lines a new subscriber gets first (§4) */
#define WS_HIGH_WATER (64 * 1024) /* stop reading the ring while this much is queued */
#define QUERY_VALUE_MAX 256

/* A request waiting for a core operation. */
struct call {
    struct pn_marzban *front;
    struct pn_req *req;
    struct pn_mzcore_op *op;
    int fail_status;     /* the status of a failed operation (503 start, 500 stop) */
    bool session_answer; /* /connect: the answer carries session_id */
    char sid[PN_UUID_STRLEN + 1];
    struct call *prev, *next;
};

/* One /logs subscriber. interval > 0: batches of `\n`-ended lines at most
 * every interval; < 0: one `\n`-ended line per frame; 0: one line per
 * frame without newline. */
struct stream {
    struct pn_marzban *front; /* NULL once the front is gone */
    struct pn_ws *ws;
    struct pn_log_sub *sub;
    double interval;
    bool sent_any;
    uint64_t last_sent_ms;
    struct event *ev;
    bool closing;
    struct stream *prev, *next;
};

struct pn_marzban {
    struct pn_marzban_opts o;
    bool connected;
    struct pn_uuid session;
    char client_ip[INET6_ADDRSTRLEN];
    struct call *calls;
    struct stream *streams;
};

/* ---- JSON answers -------------------------------------------------------------- */

/* A JSON string of arbitrary bytes: invalid UTF-8 becomes U+FFFD. */
static json_t *jstr(const char *s)
{
    size_t n = strlen(s);
    if (pn_utf8_valid(s, n))
        return json_stringn(s, n);
    char *clean = pn_malloc(3 * n + 1);
    size_t m = pn_utf8_sanitize(s, n, clean);
    json_t *j = json_stringn(clean, m);
    free(clean);
    return j;
}

/* Answers body (stolen) as compact JSON. */
static void respond_json(struct pn_req *req, int status, json_t *body)
{
    static const struct pn_http_header hdrs[] = {{"Content-Type", "application/json"}};
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (!text) {
        static const char oops[] = "{\"detail\":\"cannot encode the answer\"}";
        pn_req_respond(req, 500, hdrs, 1, oops, sizeof oops - 1);
        return;
    }
    pn_req_respond(req, status, hdrs, 1, text, strlen(text));
    free(text);
}

static void respond_detail(struct pn_req *req, int status, const char *text)
{
    json_t *body = json_object();
    json_object_set_new(body, "detail", jstr(text));
    respond_json(req, status, body);
}

/* {"connected":bool,"started":bool,"core_version":"x.y.z"|null} */
static json_t *base_body(const struct pn_marzban *f)
{
    const char *v = pn_mzcore_version(f->o.core);
    json_t *body = json_object();
    json_object_set_new(body, "connected", json_boolean(f->connected));
    json_object_set_new(body, "started", json_boolean(pn_mzcore_started(f->o.core)));
    json_object_set_new(body, "core_version", v && *v ? jstr(v) : json_null());
    return body;
}

static void respond_base(const struct pn_marzban *f, struct pn_req *req, const char *sid)
{
    json_t *body = base_body(f);
    if (sid)
        json_object_set_new(body, "session_id", json_string(sid));
    respond_json(req, 200, body);
}

void pn_marzban_respond_error(struct pn_req *req, int status, const char *text)
{
    if (status == 404)
        text = "Not Found";
    else if (status == 405)
        text = "Method Not Allowed";
    respond_detail(req, status, text);
}

/* ---- log streams ------------------------------------------------------------------ */

static void stream_schedule(struct stream *st, uint64_t delay_ms)
{
    if (!st->ev || evtimer_pending(st->ev, NULL))
        return; /* a pending flush time is kept (batches wait for it) */
    struct timeval tv = {(time_t)(delay_ms / 1000), (suseconds_t)(delay_ms % 1000) * 1000};
    evtimer_add(st->ev, &tv);
}

/* Sends what the subscriber has, as far as the socket keeps up. Lines a
 * slow reader does not take in time are dropped by the ring (it holds
 * 10,000; node/mzcore.c). */
static void stream_pump(struct stream *st)
{
    if (st->closing || !st->sub)
        return;
    if (st->interval > 0) {
        uint64_t every = (uint64_t)(st->interval * 1000.0);
        uint64_t now = pn_now_ms();
        if (st->sent_any && now - st->last_sent_ms < every) {
            stream_schedule(st, every - (now - st->last_sent_ms));
            return;
        }
        if (pn_ws_pending(st->ws) >= WS_HIGH_WATER)
            return; /* on_writable resumes */
        char *frame = NULL;
        size_t flen = 0, cap = 0, len;
        const char *line;
        while ((line = pn_log_sub_next(st->sub, &len, NULL))) {
            if (flen + len + 1 > cap) {
                cap = (flen + len + 1) * 2;
                frame = pn_realloc(frame, cap);
            }
            memcpy(frame + flen, line, len);
            flen += len;
            frame[flen++] = '\n';
        }
        if (flen) {
            pn_ws_send_text(st->ws, frame, flen);
            st->sent_any = true;
            st->last_sent_ms = now;
        }
        free(frame);
        return;
    }
    while (pn_ws_pending(st->ws) < WS_HIGH_WATER) {
        size_t len;
        const char *line = pn_log_sub_next(st->sub, &len, NULL);
        if (!line)
            return;
        if (st->interval < 0) {
            char *frame = pn_malloc(len + 1);
            memcpy(frame, line, len);
            frame[len] = '\n';
            pn_ws_send_text(st->ws, frame, len + 1);
            free(frame);
        } else {
            pn_ws_send_text(st->ws, line, len);
        }
    }
}

static void on_stream_ev(evutil_socket_t fd, short what, void *arg)
{
    stream_pump(arg);
}

/* A line arrived for a subscriber that had caught up (this runs inside
 * the core's output handling: send from the loop instead). */
static void on_stream_notify(struct pn_log_sub *s, void *arg)
{
    stream_schedule(arg, 0);
}

static void on_stream_writable(struct pn_ws *ws, void *arg)
{
    stream_schedule(arg, 0);
}

static void stream_unlink(struct stream *st)
{
    struct pn_marzban *f = st->front;
    if (!f)
        return;
    if (st->prev)
        st->prev->next = st->next;
    else
        f->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    st->prev = st->next = NULL;
    st->front = NULL;
}

/* Stops reading the ring (the subscriber must go before the ring). */
static void stream_quiesce(struct stream *st)
{
    pn_log_sub_free(st->sub);
    st->sub = NULL;
    if (st->ev) {
        event_free(st->ev);
        st->ev = NULL;
    }
}

static void on_stream_close(struct pn_ws *ws, void *arg)
{
    struct stream *st = arg;
    stream_unlink(st);
    stream_quiesce(st);
    free(st);
}

/* Closes every open stream with code (1000 on a session change, 1001 when
 * the node stops); each is freed by its on_close. */
static void close_streams(struct pn_marzban *f, uint16_t code)
{
    for (struct stream *st = f->streams; st; st = st->next) {
        if (st->closing)
            continue;
        st->closing = true;
        stream_quiesce(st);
        pn_ws_close(st->ws, code, "");
    }
}

void pn_marzban_end_streams(struct pn_marzban *mz)
{
    close_streams(mz, 1001);
}

/* ---- session ------------------------------------------------------------------- */

static void session_clear(struct pn_marzban *f)
{
    f->connected = false;
    memset(&f->session, 0, sizeof f->session);
    f->client_ip[0] = '\0';
}

void pn_marzban_invalidate_session(struct pn_marzban *mz)
{
    if (mz->connected)
        pn_log_warn("the panel session is invalidated (the core crashed); the panel must "
                    "connect again");
    session_clear(mz);
    close_streams(mz, 1000);
}

/* The forms Python's uuid.UUID() takes in the /logs query: those of
 * pn_uuid_parse, and any placement of hyphens around 32 hex digits. */
static bool parse_query_uuid(const char *s, struct pn_uuid *out)
{
    size_t n = strlen(s);
    if (pn_uuid_parse(s, n, out) == PN_OK)
        return true;
    if (!strncmp(s, "urn:", 4))
        s += 4;
    if (!strncmp(s, "uuid:", 5))
        s += 5;
    char hex[33];
    size_t k = 0;
    for (const char *p = s; *p; p++) {
        if (*p == '-' || *p == '{' || *p == '}')
            continue;
        if (k == 32)
            return false;
        hex[k++] = *p;
    }
    hex[k] = '\0';
    return k == 32 && pn_uuid_parse(hex, 32, out) == PN_OK;
}

static bool session_matches(const struct pn_marzban *f, const struct pn_uuid *sid)
{
    return f->connected && pn_uuid_equal(&f->session, sid);
}

/* ---- request bodies ----------------------------------------------------------- */

/* The JSON body of /ping, /start, /stop and /restart. */
struct body {
    json_t *root;
    struct pn_uuid sid;
    const char *config; /* borrowed from root */
    size_t config_len;
};

/* Decodes and validates a body like the reference's pydantic models
 * (session_id: UUID, config: str); answers 422 and returns false on any
 * problem, with every field's message. */
static bool parse_body(struct pn_req *req, bool want_config, struct body *b)
{
    memset(b, 0, sizeof *b);
    json_t *errors = json_object();
    if (req->body_len == 0) {
        json_object_set_new(errors, "body", json_string("Field required"));
    } else {
        json_error_t je;
        b->root = json_loadb((const char *)req->body, req->body_len,
                             JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
        if (!b->root) {
            json_object_set_new(errors, "body", json_string("JSON decode error"));
        } else if (!json_is_object(b->root)) {
            json_object_set_new(
                errors, "body",
                json_string("Input should be a valid dictionary or object to extract fields from"));
        } else {
            json_t *sid = json_object_get(b->root, "session_id");
            if (!sid || json_is_null(sid))
                json_object_set_new(errors, "session_id", json_string("Field required"));
            else if (!json_is_string(sid) ||
                     pn_uuid_parse(json_string_value(sid), json_string_length(sid), &b->sid) !=
                         PN_OK)
                json_object_set_new(errors, "session_id",
                                    json_string("Input should be a valid UUID"));
            if (want_config) {
                json_t *c = json_object_get(b->root, "config");
                if (!c || json_is_null(c)) {
                    json_object_set_new(errors, "config", json_string("Field required"));
                } else if (!json_is_string(c)) {
                    json_object_set_new(errors, "config",
                                        json_string("Input should be a valid string"));
                } else {
                    b->config = json_string_value(c);
                    b->config_len = json_string_length(c);
                }
            }
        }
    }
    if (json_object_size(errors) == 0) {
        json_decref(errors);
        return true;
    }
    json_t *answer = json_object();
    json_object_set_new(answer, "detail", errors);
    respond_json(req, 422, answer);
    json_decref(b->root);
    b->root = NULL;
    return false;
}

/* 403 unless the body's session is the current one. */
static bool check_session(const struct pn_marzban *f, struct pn_req *req, const struct body *b)
{
    if (session_matches(f, &b->sid))
        return true;
    respond_detail(req, 403, "Session ID mismatch.");
    return false;
}

/* Whether the panel's config decodes (422 `Failed to decode config: …`
 * otherwise); mzcore keeps the rewrite for the start that follows. */
static bool check_config(const struct pn_marzban *f, struct pn_req *req, const struct body *b)
{
    char err[1024];
    if (pn_mzcore_check_config(f->o.core, b->config, b->config_len, f->client_ip, err,
                               sizeof err) == PN_OK)
        return true;
    json_t *detail = json_object();
    json_object_set_new(detail, "config", jstr(err));
    json_t *answer = json_object();
    json_object_set_new(answer, "detail", detail);
    respond_json(req, 422, answer);
    return false;
}

/* ---- requests waiting for the core ------------------------------------------------ */

static void call_unlink(struct call *c)
{
    struct pn_marzban *f = c->front;
    if (c->prev)
        c->prev->next = c->next;
    else
        f->calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
}

static void on_call_closed(struct pn_req *req, void *arg)
{
    struct call *c = arg;
    pn_mzcore_op_detach(c->op);
    call_unlink(c);
    free(c);
}

static struct call *call_new(struct pn_marzban *f, struct pn_req *req, int fail_status)
{
    struct call *c = pn_new(struct call);
    c->front = f;
    c->req = req;
    c->fail_status = fail_status;
    c->next = f->calls;
    if (f->calls)
        f->calls->prev = c;
    f->calls = c;
    pn_req_set_callbacks(req, on_call_closed, NULL, c);
    return c;
}

static void call_forget(struct call *c)
{
    pn_req_set_callbacks(c->req, NULL, NULL, NULL);
    call_unlink(c);
    free(c);
}

/* The core operation ended: the base body, or its error as `detail`.
 * /connect and /disconnect answer the base body either way. */
static void on_call_done(int rv, const char *detail, void *arg)
{
    struct call *c = arg;
    struct pn_req *req = c->req;
    struct pn_marzban *f = c->front;
    bool session = c->session_answer;
    char sid[sizeof c->sid];
    memcpy(sid, c->sid, sizeof sid);
    int fail = c->fail_status;
    c->op = NULL;
    call_forget(c);
    if (rv < 0 && fail)
        respond_detail(req, fail, detail ? detail : pn_strerror(rv));
    else
        respond_base(f, req, session ? sid : NULL);
}

/* ---- routes -------------------------------------------------------------------------- */

static void route_root(struct pn_marzban *f, struct pn_req *req)
{
    respond_base(f, req, NULL);
}

/* With PROXYNODE_CONNECT_STOPS_CORE the core is stopped like the
 * reference (by a /connect that takes over a session, and by /disconnect)
 * before the answer, whose `started` reflects the stop. */
static void stop_then_answer(struct pn_marzban *f, struct pn_req *req, const char *sid)
{
    struct call *c = call_new(f, req, 0);
    if (sid) {
        c->session_answer = true;
        snprintf(c->sid, sizeof c->sid, "%s", sid);
    }
    pn_mzcore_stop(f->o.core, on_call_done, c, &c->op);
}

static void route_connect(struct pn_marzban *f, struct pn_req *req)
{
    struct pn_uuid u;
    if (pn_uuid_random(&u) != PN_OK) {
        respond_detail(req, 500, "cannot generate a session id");
        return;
    }
    const char *ip = req->peer ? req->peer->ip : "";
    bool took_over = f->connected;
    if (took_over)
        pn_log_warn("New connection from %s, Core control access was taken away from previous "
                    "client.",
                    ip);
    close_streams(f, 1000);
    f->connected = true;
    f->session = u;
    snprintf(f->client_ip, sizeof f->client_ip, "%s", ip);
    pn_log_info("%s connected", ip); /* the reference logs the id too; ids stay out of logs */
    char sid[PN_UUID_STRLEN + 1];
    pn_uuid_format(&u, sid);
    if (took_over && f->o.connect_stops_core) {
        stop_then_answer(f, req, sid);
        return;
    }
    respond_base(f, req, sid);
}

static void route_disconnect(struct pn_marzban *f, struct pn_req *req)
{
    if (f->connected)
        pn_log_info("%s disconnected", f->client_ip);
    session_clear(f);
    close_streams(f, 1000);
    if (f->o.connect_stops_core) {
        stop_then_answer(f, req, NULL);
        return;
    }
    respond_base(f, req, NULL);
}

static void route_ping(struct pn_marzban *f, struct pn_req *req)
{
    struct body b;
    if (!parse_body(req, false, &b))
        return;
    if (check_session(f, req, &b))
        respond_json(req, 200, json_object());
    json_decref(b.root);
}

static void route_start(struct pn_marzban *f, struct pn_req *req, bool restart)
{
    struct body b;
    if (!parse_body(req, true, &b))
        return;
    if (!check_session(f, req, &b) || !check_config(f, req, &b)) {
        json_decref(b.root);
        return;
    }
    struct call *c = call_new(f, req, 503);
    if (restart) {
        pn_mzcore_restart(f->o.core, b.config, b.config_len, f->client_ip, on_call_done, c, &c->op);
    } else {
        char err[256];
        if (pn_mzcore_start(f->o.core, b.config, b.config_len, f->client_ip, on_call_done, c,
                            &c->op, err, sizeof err) != PN_OK) {
            pn_log_error("Failed to start core: %s", err);
            call_forget(c);
            respond_detail(req, 503, err);
        }
    }
    json_decref(b.root);
}

static void route_start_only(struct pn_marzban *f, struct pn_req *req)
{
    route_start(f, req, false);
}

static void route_restart(struct pn_marzban *f, struct pn_req *req)
{
    route_start(f, req, true);
}

static void route_stop(struct pn_marzban *f, struct pn_req *req)
{
    struct body b;
    if (!parse_body(req, false, &b))
        return;
    if (check_session(f, req, &b)) {
        struct call *c = call_new(f, req, 500);
        pn_mzcore_stop(f->o.core, on_call_done, c, &c->op);
    }
    json_decref(b.root);
}

/* ---- /logs ------------------------------------------------------------------------------ */

/* The value of the last `name` parameter of the query, URL-decoded as
 * Starlette's query_params does ('+' is a space). Returns false when
 * absent; *too_long when it did not fit out. */
static bool query_value(const char *query, const char *name, char *out, size_t outlen,
                        bool *too_long)
{
    size_t nlen = strlen(name);
    bool found = false;
    const char *p = query ? query : "";
    while (*p) {
        const char *end = strchr(p, '&');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len >= nlen && !strncmp(p, name, nlen) && (len == nlen || p[nlen] == '=')) {
            found = true;
            *too_long = false;
            size_t k = 0;
            for (size_t i = len == nlen ? len : nlen + 1; i < len; i++) {
                char ch = p[i];
                if (ch == '+') {
                    ch = ' ';
                } else if (ch == '%' && i + 2 < len && pn_hex_digit(p[i + 1]) >= 0 &&
                           pn_hex_digit(p[i + 2]) >= 0) {
                    ch = (char)(pn_hex_digit(p[i + 1]) * 16 + pn_hex_digit(p[i + 2]));
                    i += 2;
                }
                if (k + 1 >= outlen) {
                    *too_long = true;
                    break;
                }
                out[k++] = ch;
            }
            out[k] = '\0';
        }
        if (!end)
            break;
        p = end + 1;
    }
    return found;
}

/* Python's float() on the interval (surrounding blanks allowed, no hex);
 * NaN is refused too, since the reference would then never send. Returns
 * false when invalid or over 10; *iv = 0 means "no interval". */
static bool parse_interval(const char *v, double *iv)
{
    *iv = 0;
    if (!*v)
        return true; /* empty: no interval */
    while (*v == ' ' || (*v >= '\t' && *v <= '\r'))
        v++;
    if (!*v || strpbrk(v, "xX_"))
        return false;
    char *end;
    double d = strtod(v, &end);
    if (end == v)
        return false;
    while (*end == ' ' || (*end >= '\t' && *end <= '\r'))
        end++;
    if (*end || isnan(d) || d > 10)
        return false;
    *iv = d;
    return true;
}

static bool is_websocket(const struct pn_req *req)
{
    const char *up = pn_req_header(req, "upgrade");
    return up && strcasestr(up, "websocket");
}

/* A refused /logs upgrade: an HTTP answer before the upgrade, empty and
 * closing the connection (spec §4). */
static void refuse_upgrade(struct pn_req *req, int status)
{
    static const struct pn_http_header hdrs[] = {{"Connection", "close"}};
    pn_req_respond(req, status, hdrs, 1, NULL, 0);
}

static void route_logs(struct pn_marzban *f, struct pn_req *req)
{
    char sid[QUERY_VALUE_MAX], ivs[QUERY_VALUE_MAX];
    bool long_sid = false, long_iv = false;
    if (!query_value(req->query, "session_id", sid, sizeof sid, &long_sid)) {
        refuse_upgrade(req, 500); /* the reference's uncaught TypeError */
        return;
    }
    struct pn_uuid u;
    if (long_sid || !parse_query_uuid(sid, &u) || !session_matches(f, &u)) {
        refuse_upgrade(req, 403);
        return;
    }
    double interval = 0;
    if (query_value(req->query, "interval", ivs, sizeof ivs, &long_iv) &&
        (long_iv || !parse_interval(ivs, &interval))) {
        refuse_upgrade(req, 403);
        return;
    }
    struct stream *st = pn_new(struct stream);
    st->interval = interval;
    static const struct pn_ws_cbs cbs = {on_stream_close, on_stream_writable};
    st->ws = pn_ws_accept(req, &cbs, st);
    if (!st->ws) {
        free(st); /* answered 400 by pn_ws_accept */
        return;
    }
    st->front = f;
    st->next = f->streams;
    if (f->streams)
        f->streams->prev = st;
    f->streams = st;
    st->ev = evtimer_new(f->o.base, on_stream_ev, st);
    st->sub = pn_log_sub_new(pn_mzcore_logs(f->o.core), LOG_BACKLOG, on_stream_notify, st);
    stream_schedule(st, 0);
}

/* ---- dispatch ---------------------------------------------------------------------------- */

static const struct route {
    const char *path;
    void (*fn)(struct pn_marzban *f, struct pn_req *req);
} routes[] = {
    {"/", route_root},           {"/connect", route_connect},  {"/disconnect", route_disconnect},
    {"/ping", route_ping},       {"/start", route_start_only}, {"/stop", route_stop},
    {"/restart", route_restart},
};

void pn_marzban_rest(struct pn_req *req, void *arg)
{
    struct pn_marzban *f = arg;
    if (!strcmp(req->path, "/logs")) {
        if (is_websocket(req))
            route_logs(f, req);
        else
            respond_detail(req, 404, "Not Found");
        return;
    }
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
        if (strcmp(req->path, routes[i].path))
            continue;
        if (strcmp(req->method, "POST"))
            respond_detail(req, 405, "Method Not Allowed");
        else
            routes[i].fn(f, req);
        return;
    }
    respond_detail(req, 404, "Not Found");
}

/* ---- lifecycle ------------------------------------------------------------------------------- */

struct pn_marzban *pn_marzban_new(const struct pn_marzban_opts *opts)
{
    struct pn_marzban *f = pn_new(struct pn_marzban);
    f->o = *opts;
    return f;
}

void pn_marzban_free(struct pn_marzban *mz)
{
    if (!mz)
        return;
    while (mz->calls) {
        struct call *c = mz->calls;
        pn_mzcore_op_detach(c->op);
        call_forget(c);
    }
    /* Streams still open (their connections outlive the front): they stop
     * reading the ring now and free themselves when they close. */
    while (mz->streams) {
        struct stream *st = mz->streams;
        bool was_closing = st->closing;
        st->closing = true;
        stream_quiesce(st);
        stream_unlink(st);
        if (!was_closing)
            pn_ws_close(st->ws, 1001, "");
    }
    free(mz);
}
