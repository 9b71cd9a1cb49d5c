/* The Marzban REST front and /logs stream. REST through a fake pn_req
 * transport on a real mzcore: with no core (acceptance cases 8-13, 18, the
 * validation wordings, 404/405, the transports' errors) and with a fake
 * core script that answers `-version` like v2ray 4.34 and otherwise runs
 * the real /usr/bin/v2ray (cases 15, 17, /connect keeping or stopping the
 * core, / and /ping answering during a restart, a client that leaves).
 * /logs through the real HTTP/1.1 server and ws.c over a socketpair: the
 * refusals before the upgrade (500 / 403 with Content-Length 0 and
 * Connection: close), the backlog of the last 100 lines, one frame per
 * line, interval batches, and the close codes on a session change (1000)
 * and node stop (1001). marzban.c is included for its static parsers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../../src/api/marzban.c"
#include "base/buf.h"
#include "net/http1.h"
#include "net/tls.h"

#define V2RAY "/usr/bin/v2ray"

/* ---- a fake REST transport ----------------------------------------------------- */

struct fake_req {
    struct pn_req req;
    struct pn_peer peer;
    struct pn_http_header hdrs[4];
    int status; /* 0: not answered */
    char ctype[64];
    bool conn_close;
    struct pn_buf body;
    char bodystr[4096];
    uint64_t answered_at;
};

static int f_respond(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                     size_t nhdrs, const void *body, size_t len)
{
    struct fake_req *f = (struct fake_req *)req;
    assert_int_equal(f->status, 0);
    f->status = status;
    for (size_t i = 0; i < nhdrs; i++) {
        if (!strcasecmp(hdrs[i].name, "content-type"))
            snprintf(f->ctype, sizeof f->ctype, "%s", hdrs[i].value);
        if (!strcasecmp(hdrs[i].name, "connection") && !strcasecmp(hdrs[i].value, "close"))
            f->conn_close = true;
    }
    if (len)
        pn_buf_append(&f->body, body, len);
    size_t n = len < sizeof f->bodystr - 1 ? len : sizeof f->bodystr - 1;
    if (n)
        memcpy(f->bodystr, body, n);
    f->bodystr[n] = '\0';
    f->answered_at = pn_now_ms();
    return PN_OK;
}

static const struct pn_req_ops fake_ops = {f_respond, NULL, NULL, NULL, NULL, NULL};

static struct fake_req *fake_new(const char *method, const char *path, const char *query,
                                 const char *body)
{
    struct fake_req *f = calloc(1, sizeof *f);
    pn_buf_init(&f->body, 0);
    snprintf(f->peer.ip, sizeof f->peer.ip, "127.0.0.1");
    f->req.method = method;
    f->req.path = path;
    f->req.query = query ? query : "";
    f->req.headers = f->hdrs;
    f->req.body = (const uint8_t *)body;
    f->req.body_len = body ? strlen(body) : 0;
    f->req.http_version = 11;
    f->req.peer = &f->peer;
    f->req.ops = &fake_ops;
    return f;
}

static void fake_header(struct fake_req *f, const char *name, const char *value)
{
    f->hdrs[f->req.nheaders++] = (struct pn_http_header){name, value};
}

static void fake_free(struct fake_req *f)
{
    pn_buf_free(&f->body);
    free(f);
}

/* ---- the environment ------------------------------------------------------------- */

struct env {
    struct event_base *base;
    struct event *tick;
    struct pn_mzcore *core;
    struct pn_marzban *front;
    char dir[64], cert[128], key[128], script[160];
    char sid[64];
    /* /logs over a real connection */
    struct pn_http_server srv;
    struct pn_conn_set set;
    struct bufferevent *cli;
    struct evbuffer *got;
    bool cli_eof;
};

static void noop(evutil_socket_t fd, short what, void *arg) {}

static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static void run_for(struct env *e, int ms)
{
    uint64_t end = pn_now_ms() + (uint64_t)ms;
    while (pn_now_ms() < end)
        event_base_loop(e->base, EVLOOP_ONCE);
}

static void make_env(struct env *e, bool with_core, bool connect_stops)
{
    e->base = event_base_new();
    e->tick = event_new(e->base, -1, EV_PERSIST, noop, NULL);
    struct timeval tv = {0, 10000};
    event_add(e->tick, &tv);
    snprintf(e->dir, sizeof e->dir, "/tmp/pn-marzban-XXXXXX");
    assert_non_null(mkdtemp(e->dir));
    snprintf(e->cert, sizeof e->cert, "%s/cert.pem", e->dir);
    snprintf(e->key, sizeof e->key, "%s/key.pem", e->dir);
    struct pn_mzcore_opts mo = {
        .base = e->base,
        .assets = "/usr/share/v2ray",
        .api_host = "127.0.0.1",
        .api_port = free_port(),
        .cert_file = e->cert,
        .key_file = e->key,
        .start_timeout_ms = 10000,
        .supervise = true,
    };
    if (with_core) {
        if (access(V2RAY, X_OK) != 0)
            fail_msg(V2RAY " missing: apt-get install v2ray");
        static const char *const names[] = {"Gozargah"};
        struct pn_cert_opts co = {.cn = "Gozargah", .names = names, .nnames = 1, .days = 1};
        char err[256];
        if (pn_tls_generate_cert(e->cert, e->key, &co, err, sizeof err) != PN_OK)
            fail_msg("cert: %s", err);
        /* the fake core: v2ray's version line, then the real v2ray */
        snprintf(e->script, sizeof e->script, "%s/xray", e->dir);
        FILE *fp = fopen(e->script, "w");
        assert_non_null(fp);
        fputs("#!/bin/sh\nif [ \"$1\" = -version ]; then echo 'V2Ray 4.34.0 (user)'; exit 0; "
              "fi\nexec " V2RAY " \"$@\"\n",
              fp);
        fclose(fp);
        chmod(e->script, 0755);
        mo.core_path = e->script;
    }
    e->core = pn_mzcore_new(&mo);
    struct pn_marzban_opts fo = {
        .base = e->base, .core = e->core, .connect_stops_core = connect_stops};
    e->front = pn_marzban_new(&fo);
    if (with_core) {
        uint64_t end = pn_now_ms() + 5000;
        while (!pn_mzcore_version(e->core) && pn_now_ms() < end)
            event_base_loop(e->base, EVLOOP_ONCE);
    }
    e->srv = (struct pn_http_server){
        .base = e->base,
        .on_request = pn_marzban_rest,
        .arg = e->front,
        .max_body = 1 << 20,
        .max_header = 8192,
        .idle_timeout_ms = 5000,
        .header_timeout_ms = 5000,
        .respond_error = pn_marzban_respond_error,
    };
    e->got = evbuffer_new();
}

static int setup_nocore(void **state)
{
    struct env *e = calloc(1, sizeof *e);
    setenv("XRAY_EXECUTABLE_PATH", "/opt/none/xray", 1);
    make_env(e, false, false);
    *state = e;
    return 0;
}

static int setup_core(void **state)
{
    struct env *e = calloc(1, sizeof *e);
    make_env(e, true, false);
    *state = e;
    return 0;
}

static int setup_core_stops(void **state)
{
    struct env *e = calloc(1, sizeof *e);
    make_env(e, true, true);
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    struct env *e = *state;
    if (e->cli)
        bufferevent_free(e->cli);
    while (e->set.head)
        e->set.head->ops->destroy(e->set.head);
    pn_marzban_free(e->front);
    pn_mzcore_free(e->core);
    evbuffer_free(e->got);
    event_free(e->tick);
    event_base_free(e->base);
    unlink(e->cert);
    unlink(e->key);
    if (e->script[0])
        unlink(e->script);
    rmdir(e->dir);
    free(e);
    unsetenv("XRAY_EXECUTABLE_PATH");
    return 0;
}

/* Runs a request to its answer (caller frees). */
static struct fake_req *rest_wait(struct env *e, const char *method, const char *path,
                                  const char *body, int ms)
{
    struct fake_req *f = fake_new(method, path, NULL, body);
    pn_marzban_rest(&f->req, e->front);
    uint64_t end = pn_now_ms() + (uint64_t)ms;
    while (!f->status && pn_now_ms() < end)
        event_base_loop(e->base, EVLOOP_ONCE);
    if (!f->status)
        fail_msg("%s %s: no answer within %d ms", method, path, ms);
    return f;
}

static struct fake_req *rest(struct env *e, const char *method, const char *path, const char *body)
{
    return rest_wait(e, method, path, body, 1000);
}

/* Checks status and exact JSON body, then frees. */
static void expect(struct fake_req *f, int status, const char *body)
{
    assert_int_equal(f->status, status);
    assert_string_equal(f->ctype, "application/json");
    assert_string_equal(f->bodystr, body);
    fake_free(f);
}

static void call_expect(struct env *e, const char *method, const char *path, const char *body,
                        int status, const char *want)
{
    expect(rest(e, method, path, body), status, want);
}

/* /connect; keeps the session id in e->sid. */
static void do_connect(struct env *e)
{
    struct fake_req *f = rest_wait(e, "POST", "/connect", "{\"session_id\":null}", 8000);
    assert_int_equal(f->status, 200);
    json_error_t je;
    json_t *j = json_loads(f->bodystr, 0, &je);
    assert_non_null(j);
    const char *sid = json_string_value(json_object_get(j, "session_id"));
    assert_non_null(sid);
    snprintf(e->sid, sizeof e->sid, "%s", sid);
    assert_true(json_is_true(json_object_get(j, "connected")));
    json_decref(j);
    fake_free(f);
}

static char *with_session(const char *sid, const char *rest_of_body)
{
    return pn_asprintf("{\"session_id\":\"%s\"%s}", sid, rest_of_body ? rest_of_body : "");
}

static bool is_uuid4_lower(const char *s)
{
    if (strlen(s) != 36)
        return false;
    for (int i = 0; i < 36; i++) {
        char c = s[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return false;
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return false;
        }
    }
    return s[14] == '4' && strchr("89ab", s[19]);
}

/* ---- REST, no core -------------------------------------------------------------- */

static void test_root(void **state)
{
    struct env *e = *state;
    call_expect(e, "POST", "/", NULL, 200,
                "{\"connected\":false,\"started\":false,\"core_version\":null}");
    call_expect(e, "POST", "/", "garbage", 200,
                "{\"connected\":false,\"started\":false,\"core_version\":null}");
}

static void test_methods_and_paths(void **state)
{
    struct env *e = *state;
    call_expect(e, "GET", "/", NULL, 405, "{\"detail\":\"Method Not Allowed\"}");
    call_expect(e, "PUT", "/connect", NULL, 405, "{\"detail\":\"Method Not Allowed\"}");
    call_expect(e, "GET", "/ping", NULL, 405, "{\"detail\":\"Method Not Allowed\"}");
    call_expect(e, "POST", "/nope", NULL, 404, "{\"detail\":\"Not Found\"}");
    call_expect(e, "POST", "/connect/", NULL, 404, "{\"detail\":\"Not Found\"}");
    call_expect(e, "GET", "/logs", NULL, 404, "{\"detail\":\"Not Found\"}");
    call_expect(e, "POST", "/logs", NULL, 404, "{\"detail\":\"Not Found\"}");
}

static void test_respond_error(void **state)
{
    (void)state;
    struct fake_req *f = fake_new("POST", "/", NULL, NULL);
    pn_marzban_respond_error(&f->req, 413, "request body too large");
    expect(f, 413, "{\"detail\":\"request body too large\"}");
    f = fake_new("POST", "/", NULL, NULL);
    pn_marzban_respond_error(&f->req, 431, "request header fields too large");
    expect(f, 431, "{\"detail\":\"request header fields too large\"}");
    f = fake_new("POST", "/", NULL, NULL);
    pn_marzban_respond_error(&f->req, 400, "bad request");
    expect(f, 400, "{\"detail\":\"bad request\"}");
    f = fake_new("POST", "/", NULL, NULL);
    pn_marzban_respond_error(&f->req, 404, "not found");
    expect(f, 404, "{\"detail\":\"Not Found\"}");
}

static void test_connect_and_sessions(void **state)
{
    struct env *e = *state;
    do_connect(e);
    assert_true(is_uuid4_lower(e->sid));
    char old[64];
    snprintf(old, sizeof old, "%s", e->sid);
    call_expect(e, "POST", "/", NULL, 200,
                "{\"connected\":true,\"started\":false,\"core_version\":null}");
    do_connect(e); /* takes over */
    assert_true(is_uuid4_lower(e->sid));
    assert_string_not_equal(old, e->sid);

    char *b = with_session(old, NULL);
    call_expect(e, "POST", "/ping", b, 403, "{\"detail\":\"Session ID mismatch.\"}");
    free(b);
    b = with_session(e->sid, NULL);
    call_expect(e, "POST", "/ping", b, 200, "{}");
    free(b);

    /* the same id, uppercase, unhyphenated, braced, urn */
    char up[64], bare[64], braced[80], urn[80];
    size_t k = 0;
    for (size_t i = 0; e->sid[i]; i++) {
        up[i] = (char)toupper((unsigned char)e->sid[i]);
        up[i + 1] = '\0';
        if (e->sid[i] != '-')
            bare[k++] = e->sid[i];
    }
    bare[k] = '\0';
    snprintf(braced, sizeof braced, "{%s}", e->sid);
    snprintf(urn, sizeof urn, "urn:uuid:%s", e->sid);
    const char *forms[] = {up, bare, braced, urn};
    for (size_t i = 0; i < 4; i++) {
        b = with_session(forms[i], NULL);
        call_expect(e, "POST", "/ping", b, 200, "{}");
        free(b);
    }
    /* extra fields are ignored */
    b = with_session(e->sid, ",\"x\":[1,2]");
    call_expect(e, "POST", "/ping", b, 200, "{}");
    free(b);
}

static void test_disconnect(void **state)
{
    struct env *e = *state;
    do_connect(e);
    call_expect(e, "POST", "/disconnect", NULL, 200,
                "{\"connected\":false,\"started\":false,\"core_version\":null}");
    char *b = with_session(e->sid, NULL);
    call_expect(e, "POST", "/ping", b, 403, "{\"detail\":\"Session ID mismatch.\"}");
    free(b);
    /* no session at all: still a mismatch */
    call_expect(e, "POST", "/disconnect", "{}", 200,
                "{\"connected\":false,\"started\":false,\"core_version\":null}");
}

static void test_validation(void **state)
{
    struct env *e = *state;
    call_expect(e, "POST", "/ping", "{}", 422, "{\"detail\":{\"session_id\":\"Field required\"}}");
    call_expect(e, "POST", "/ping", "{\"session_id\":null}", 422,
                "{\"detail\":{\"session_id\":\"Field required\"}}");
    call_expect(e, "POST", "/ping", "{\"session_id\":\"zzz\"}", 422,
                "{\"detail\":{\"session_id\":\"Input should be a valid UUID\"}}");
    call_expect(e, "POST", "/ping", "{\"session_id\":5}", 422,
                "{\"detail\":{\"session_id\":\"Input should be a valid UUID\"}}");
    call_expect(e, "POST", "/ping", NULL, 422, "{\"detail\":{\"body\":\"Field required\"}}");
    call_expect(e, "POST", "/ping", "not json", 422,
                "{\"detail\":{\"body\":\"JSON decode error\"}}");
    call_expect(e, "POST", "/stop", "[]", 422,
                "{\"detail\":{\"body\":\"Input should be a valid dictionary or object to extract "
                "fields from\"}}");
    call_expect(e, "POST", "/stop", "{}", 422, "{\"detail\":{\"session_id\":\"Field required\"}}");
    /* validation before the session check (case 12) */
    call_expect(e, "POST", "/start", "{\"session_id\":\"5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77\"}",
                422, "{\"detail\":{\"config\":\"Field required\"}}");
    call_expect(e, "POST", "/restart", "{}", 422,
                "{\"detail\":{\"session_id\":\"Field required\",\"config\":\"Field required\"}}");
    call_expect(e, "POST", "/start",
                "{\"session_id\":\"5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77\",\"config\":{}}", 422,
                "{\"detail\":{\"config\":\"Input should be a valid string\"}}");
    /* a wrong session with a well-formed body */
    call_expect(e, "POST", "/start",
                "{\"session_id\":\"5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77\",\"config\":\"{\"}", 403,
                "{\"detail\":\"Session ID mismatch.\"}");
    call_expect(e, "POST", "/stop", "{\"session_id\":\"5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77\"}",
                403, "{\"detail\":\"Session ID mismatch.\"}");
}

static void test_config_decode_errors(void **state)
{
    struct env *e = *state;
    do_connect(e);
    char *b = with_session(e->sid, ",\"config\":\"{\"");
    struct fake_req *f = rest(e, "POST", "/start", b);
    free(b);
    assert_int_equal(f->status, 422);
    json_t *j = json_loads(f->bodystr, 0, NULL);
    const char *msg = json_string_value(json_object_get(json_object_get(j, "detail"), "config"));
    assert_non_null(msg);
    assert_true(!strncmp(msg, "Failed to decode config: ", 25));
    json_decref(j);
    fake_free(f);

    b = with_session(e->sid, ",\"config\":\"[]\"");
    call_expect(e, "POST", "/restart", b, 422,
                "{\"detail\":{\"config\":\"Failed to decode config: the config must be a JSON "
                "object\"}}");
    free(b);
}

static void test_start_without_core(void **state)
{
    struct env *e = *state;
    do_connect(e);
    char *b = with_session(e->sid, ",\"config\":\"{}\"");
    call_expect(e, "POST", "/start", b, 503,
                "{\"detail\":\"xray executable not found: /opt/none/xray\"}");
    call_expect(e, "POST", "/restart", b, 503,
                "{\"detail\":\"xray executable not found: /opt/none/xray\"}");
    free(b);
    b = with_session(e->sid, NULL);
    call_expect(e, "POST", "/stop", b, 200,
                "{\"connected\":true,\"started\":false,\"core_version\":null}");
    free(b);
}

/* ---- REST with the fake core script ----------------------------------------------------- */

static char *panel_config(void)
{
    /* the panel's own API inbound and rule, as Marzban sends them */
    char *inner = pn_asprintf(
        "{\"log\":{\"loglevel\":\"warning\"},\"inbounds\":[{\"listen\":\"127.0.0.1\","
        "\"port\":%u,\"protocol\":\"dokodemo-door\",\"settings\":{\"address\":\"127.0.0.1\"},"
        "\"tag\":\"API_INBOUND\"},{\"tag\":\"socks-in\",\"listen\":\"127.0.0.1\",\"port\":%u,"
        "\"protocol\":\"socks\",\"settings\":{\"auth\":\"noauth\"}}],\"outbounds\":[{\"protocol\":"
        "\"blackhole\",\"tag\":\"block\"},{\"protocol\":\"freedom\",\"tag\":\"direct\"}],"
        "\"routing\":{\"rules\":[{\"inboundTag\":[\"API_INBOUND\"],\"outboundTag\":\"API\","
        "\"type\":\"field\"}]},\"api\":{\"services\":[\"HandlerService\"],\"tag\":\"API\"}}",
        free_port(), free_port());
    json_t *s = json_string(inner);
    char *enc = json_dumps(s, JSON_ENCODE_ANY);
    json_decref(s);
    free(inner);
    return enc; /* a JSON string literal */
}

static char *start_body(const char *sid, const char *cfg)
{
    return pn_asprintf("{\"session_id\":\"%s\",\"config\":%s}", sid, cfg);
}

static void test_version_in_base_body(void **state)
{
    struct env *e = *state;
    call_expect(e, "POST", "/", NULL, 200,
                "{\"connected\":false,\"started\":false,\"core_version\":\"4.34.0\"}");
}

static void test_start_started_already_restart_stop(void **state)
{
    struct env *e = *state;
    do_connect(e);
    char *cfg = panel_config(), *cfg2 = panel_config();
    char *b = start_body(e->sid, cfg);
    struct fake_req *f = rest_wait(e, "POST", "/start", b, 4000);
    expect(f, 200, "{\"connected\":true,\"started\":true,\"core_version\":\"4.34.0\"}");

    /* case 15: a second start, at once */
    uint64_t t0 = pn_now_ms();
    f = fake_new("POST", "/start", NULL, b);
    pn_marzban_rest(&f->req, e->front);
    assert_true(pn_now_ms() - t0 < 100);
    expect(f, 503, "{\"detail\":\"Xray is started already\"}");

    /* / and /ping answer at once while a restart runs (case 19) */
    char *b2 = start_body(e->sid, cfg2);
    struct fake_req *r = fake_new("POST", "/restart", NULL, b2);
    pn_marzban_rest(&r->req, e->front);
    assert_int_equal(r->status, 0);
    char *pb = with_session(e->sid, NULL);
    for (int i = 0; i < 5; i++) {
        f = fake_new("POST", "/ping", NULL, pb);
        pn_marzban_rest(&f->req, e->front);
        expect(f, 200, "{}");
        f = fake_new("POST", "/", NULL, NULL);
        pn_marzban_rest(&f->req, e->front);
        expect(f, 200, "{\"connected\":true,\"started\":true,\"core_version\":\"4.34.0\"}");
    }
    uint64_t end = pn_now_ms() + 4000;
    while (!r->status && pn_now_ms() < end)
        event_base_loop(e->base, EVLOOP_ONCE);
    expect(r, 200, "{\"connected\":true,\"started\":true,\"core_version\":\"4.34.0\"}");

    /* a new /connect keeps the core (case 34) */
    do_connect(e);
    call_expect(e, "POST", "/", NULL, 200,
                "{\"connected\":true,\"started\":true,\"core_version\":\"4.34.0\"}");
    free(pb);
    pb = with_session(e->sid, NULL);

    /* case 17: /stop twice */
    f = rest_wait(e, "POST", "/stop", pb, 8000);
    expect(f, 200, "{\"connected\":true,\"started\":false,\"core_version\":\"4.34.0\"}");
    f = rest_wait(e, "POST", "/stop", pb, 8000);
    expect(f, 200, "{\"connected\":true,\"started\":false,\"core_version\":\"4.34.0\"}");

    /* case 17: /restart while stopped starts */
    free(b2);
    b2 = start_body(e->sid, cfg2);
    f = rest_wait(e, "POST", "/restart", b2, 4000);
    expect(f, 200, "{\"connected\":true,\"started\":true,\"core_version\":\"4.34.0\"}");

    /* /disconnect keeps the core too */
    call_expect(e, "POST", "/disconnect", NULL, 200,
                "{\"connected\":false,\"started\":true,\"core_version\":\"4.34.0\"}");
    free(pb);
    free(b);
    free(b2);
    free(cfg);
    free(cfg2);
}

static void test_rejected_config_detail(void **state)
{
    struct env *e = *state;
    do_connect(e);
    json_t *s = json_string("{\"inbounds\":[{\"protocol\":\"nonsense\",\"port\":1}]}");
    char *cfg = json_dumps(s, JSON_ENCODE_ANY);
    json_decref(s);
    char *b = start_body(e->sid, cfg);
    struct fake_req *f = rest_wait(e, "POST", "/start", b, 4000);
    assert_int_equal(f->status, 503);
    assert_non_null(strstr(f->bodystr, "unknown config id: nonsense"));
    assert_true(!strncmp(f->bodystr, "{\"detail\":\"", 11));
    fake_free(f);
    free(b);
    free(cfg);
}

static void test_connect_stops_core(void **state)
{
    struct env *e = *state;
    do_connect(e);
    char *cfg = panel_config();
    char *b = start_body(e->sid, cfg);
    struct fake_req *f = rest_wait(e, "POST", "/start", b, 4000);
    expect(f, 200, "{\"connected\":true,\"started\":true,\"core_version\":\"4.34.0\"}");
    do_connect(e); /* PROXYNODE_CONNECT_STOPS_CORE: the reference's stop */
    call_expect(e, "POST", "/", NULL, 200,
                "{\"connected\":true,\"started\":false,\"core_version\":\"4.34.0\"}");
    free(b);
    b = start_body(e->sid, cfg);
    f = rest_wait(e, "POST", "/start", b, 4000);
    expect(f, 200, "{\"connected\":true,\"started\":true,\"core_version\":\"4.34.0\"}");
    f = rest_wait(e, "POST", "/disconnect", NULL, 8000);
    expect(f, 200, "{\"connected\":false,\"started\":false,\"core_version\":\"4.34.0\"}");
    free(b);
    free(cfg);
}

/* A client that leaves while its /start runs: nothing is answered to it,
 * and the core still starts. */
static void test_client_leaves(void **state)
{
    struct env *e = *state;
    do_connect(e);
    char *cfg = panel_config();
    char *b = start_body(e->sid, cfg);
    struct fake_req *f = fake_new("POST", "/start", NULL, b);
    pn_marzban_rest(&f->req, e->front);
    assert_int_equal(f->status, 0);
    assert_non_null(f->req.on_close);
    f->req.on_close(&f->req, f->req.cb_arg);
    fake_free(f);
    uint64_t end = pn_now_ms() + 4000;
    while (!pn_mzcore_started(e->core) && pn_now_ms() < end)
        event_base_loop(e->base, EVLOOP_ONCE);
    run_for(e, 200);
    assert_true(pn_mzcore_started(e->core));
    /* and a front freed with a pending request detaches it */
    char *pb = with_session(e->sid, NULL);
    f = fake_new("POST", "/stop", NULL, pb);
    pn_marzban_rest(&f->req, e->front);
    pn_marzban_free(e->front);
    e->front = NULL;
    run_for(e, 300);
    assert_int_equal(f->status, 0);
    fake_free(f);
    free(pb);
    free(b);
    free(cfg);
}

/* ---- /logs: the parsers ---------------------------------------------------------------- */

static void test_parse_interval(void **state)
{
    (void)state;
    double d;
    assert_true(parse_interval("", &d) && d == 0);
    assert_true(parse_interval("0.7", &d) && d == 0.7);
    assert_true(parse_interval(" 1 ", &d) && d == 1);
    assert_true(parse_interval("10", &d) && d == 10);
    assert_true(parse_interval("1e-1", &d) && d == 0.1);
    assert_true(parse_interval("0", &d) && d == 0);
    assert_true(parse_interval("-0.5", &d) && d == -0.5);
    assert_true(parse_interval("-inf", &d) && d < 0);
    assert_false(parse_interval("10.01", &d));
    assert_false(parse_interval("11", &d));
    assert_false(parse_interval("inf", &d));
    assert_false(parse_interval("nan", &d));
    assert_false(parse_interval("abc", &d));
    assert_false(parse_interval("0x1", &d));
    assert_false(parse_interval(" ", &d));
    assert_false(parse_interval("1 2", &d));
}

static void test_query_value(void **state)
{
    (void)state;
    char v[16];
    bool too_long;
    assert_true(query_value("a=1&session_id=x%2Dy+z&b", "session_id", v, sizeof v, &too_long));
    assert_string_equal(v, "x-y z");
    assert_false(too_long);
    assert_true(query_value("interval=1&interval=2", "interval", v, sizeof v, &too_long));
    assert_string_equal(v, "2"); /* the last one, like Starlette */
    assert_true(query_value("interval", "interval", v, sizeof v, &too_long));
    assert_string_equal(v, "");
    assert_false(query_value("intervals=1", "interval", v, sizeof v, &too_long));
    assert_false(query_value("", "session_id", v, sizeof v, &too_long));
    assert_true(query_value("s=0123456789abcdefXYZ", "s", v, sizeof v, &too_long));
    assert_true(too_long);
    struct pn_uuid u, w;
    assert_true(parse_query_uuid("5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77", &u));
    assert_true(parse_query_uuid("5f0b9a522b6c-4f3e-9d431c1b6f1e2a77", &w));
    assert_true(pn_uuid_equal(&u, &w));
    assert_true(parse_query_uuid("urn:uuid:5F0B9A52-2B6C-4F3E-9D43-1C1B6F1E2A77", &w));
    assert_true(pn_uuid_equal(&u, &w));
    assert_false(parse_query_uuid("zzz", &w));
    assert_false(parse_query_uuid("", &w));
    assert_false(parse_query_uuid("5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a7", &w));
}

/* Through the fake transport: the refusal carries Connection: close and no
 * body; a request without Upgrade is a plain 404. */
static void test_logs_refusal_headers(void **state)
{
    struct env *e = *state;
    struct fake_req *f = fake_new("GET", "/logs", "interval=1", NULL);
    fake_header(f, "upgrade", "websocket");
    pn_marzban_rest(&f->req, e->front);
    assert_int_equal(f->status, 500);
    assert_true(f->conn_close);
    assert_int_equal(f->body.len, 0);
    fake_free(f);
    f = fake_new("GET", "/logs", "session_id=1", NULL);
    fake_header(f, "upgrade", "WebSocket");
    pn_marzban_rest(&f->req, e->front);
    assert_int_equal(f->status, 403);
    assert_true(f->conn_close);
    assert_int_equal(f->body.len, 0);
    fake_free(f);
    f = fake_new("GET", "/logs", "session_id=1", NULL);
    fake_header(f, "upgrade", "h2c");
    pn_marzban_rest(&f->req, e->front);
    expect(f, 404, "{\"detail\":\"Not Found\"}");
}

/* ---- /logs over the real HTTP/1.1 server and ws.c ------------------------------------- */

static void cli_read(struct bufferevent *bev, void *arg)
{
    struct env *e = arg;
    evbuffer_add_buffer(e->got, bufferevent_get_input(bev));
}

static void cli_event(struct bufferevent *bev, short what, void *arg)
{
    struct env *e = arg;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        evbuffer_add_buffer(e->got, bufferevent_get_input(bev));
        e->cli_eof = true;
    }
}

static void cli_connect(struct env *e)
{
    int fds[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    evutil_make_socket_nonblocking(fds[0]);
    evutil_make_socket_nonblocking(fds[1]);
    struct bufferevent *sb = bufferevent_socket_new(e->base, fds[0], BEV_OPT_CLOSE_ON_FREE);
    e->cli = bufferevent_socket_new(e->base, fds[1], BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(e->cli, cli_read, NULL, cli_event, e);
    bufferevent_enable(e->cli, EV_READ | EV_WRITE);
    struct pn_peer peer = {.ip = "127.0.0.1", .port = 40001, .alpn = "http/1.1"};
    assert_non_null(pn_http1_conn_new(sb, &e->srv, &peer, &e->set));
    e->cli_eof = false;
    evbuffer_drain(e->got, evbuffer_get_length(e->got));
}

static void cli_close(struct env *e)
{
    bufferevent_free(e->cli);
    e->cli = NULL;
}

static void send_logs_request(struct env *e, const char *query)
{
    cli_connect(e);
    char req[1024];
    snprintf(req, sizeof req,
             "GET /logs?%s HTTP/1.1\r\nHost: node\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n",
             query);
    bufferevent_write(e->cli, req, strlen(req));
}

/* The text of what arrived so far (NUL-terminated copy). */
static char *got_text(struct env *e)
{
    size_t n = evbuffer_get_length(e->got);
    char *s = malloc(n + 1);
    evbuffer_copyout(e->got, s, n);
    s[n] = '\0';
    return s;
}

/* A refused upgrade: the whole answer, then EOF. */
static void expect_refusal(struct env *e, const char *query, int status)
{
    send_logs_request(e, query);
    uint64_t end = pn_now_ms() + 3000;
    while (!e->cli_eof && pn_now_ms() < end)
        event_base_loop(e->base, EVLOOP_ONCE);
    assert_true(e->cli_eof);
    char *s = got_text(e);
    char head[64];
    snprintf(head, sizeof head, "HTTP/1.1 %d ", status);
    if (strncmp(s, head, strlen(head)))
        fail_msg("%s: got %s", query, s);
    assert_non_null(strcasestr(s, "\r\nContent-Length: 0\r\n"));
    assert_non_null(strcasestr(s, "\r\nConnection: close\r\n"));
    assert_non_null(strstr(s, "\r\n\r\n"));
    assert_string_equal(strstr(s, "\r\n\r\n"), "\r\n\r\n"); /* no body */
    free(s);
    cli_close(e);
}

static void test_logs_refusals(void **state)
{
    struct env *e = *state;
    do_connect(e);
    char q[256];
    expect_refusal(e, "interval=0.7", 500);
    expect_refusal(e, "session_id=zzz", 403);
    expect_refusal(e, "session_id=", 403);
    expect_refusal(e, "session_id=5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77", 403);
    snprintf(q, sizeof q, "session_id=%s&interval=abc", e->sid);
    expect_refusal(e, q, 403);
    snprintf(q, sizeof q, "session_id=%s&interval=11", e->sid);
    expect_refusal(e, q, 403);
    call_expect(e, "POST", "/disconnect", NULL, 200,
                "{\"connected\":false,\"started\":false,\"core_version\":null}");
    snprintf(q, sizeof q, "session_id=%s", e->sid);
    expect_refusal(e, q, 403); /* no session */
}

struct frame {
    int opcode;
    char *data;
    size_t len;
};

/* Takes one complete server frame off e->got (false when incomplete). */
static bool take_frame(struct env *e, struct frame *fr)
{
    size_t avail = evbuffer_get_length(e->got);
    if (avail < 2)
        return false;
    uint8_t h[10];
    evbuffer_copyout(e->got, h, avail < 10 ? avail : 10);
    assert_true(h[0] & 0x80);         /* FIN */
    assert_int_equal(h[1] & 0x80, 0); /* server frames are not masked */
    size_t len = h[1] & 0x7f, hl = 2;
    if (len == 126) {
        if (avail < 4)
            return false;
        len = (size_t)h[2] << 8 | h[3];
        hl = 4;
    } else if (len == 127) {
        if (avail < 10)
            return false;
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | h[2 + i];
        hl = 10;
    }
    if (avail < hl + len)
        return false;
    evbuffer_drain(e->got, hl);
    fr->opcode = h[0] & 0x0f;
    fr->data = malloc(len + 1);
    evbuffer_remove(e->got, fr->data, len);
    fr->data[len] = '\0';
    fr->len = len;
    return true;
}

/* Waits for the next data frame (pings skipped). */
static bool next_frame(struct env *e, struct frame *fr, int ms)
{
    uint64_t end = pn_now_ms() + (uint64_t)ms;
    for (;;) {
        while (take_frame(e, fr)) {
            if (fr->opcode != 0x9)
                return true;
            free(fr->data);
        }
        if (pn_now_ms() >= end)
            return false;
        event_base_loop(e->base, EVLOOP_ONCE);
    }
}

/* Opens a stream: the 101 is consumed. */
static void open_stream(struct env *e, const char *extra)
{
    char q[256];
    snprintf(q, sizeof q, "session_id=%s%s", e->sid, extra ? extra : "");
    send_logs_request(e, q);
    uint64_t end = pn_now_ms() + 2000;
    struct evbuffer_ptr p;
    for (;;) {
        p = evbuffer_search(e->got, "\r\n\r\n", 4, NULL);
        if (p.pos >= 0 || pn_now_ms() >= end)
            break;
        event_base_loop(e->base, EVLOOP_ONCE);
    }
    assert_true(p.pos >= 0);
    char *s = got_text(e);
    assert_true(!strncmp(s, "HTTP/1.1 101 ", 13));
    free(s);
    evbuffer_drain(e->got, (size_t)p.pos + 4);
}

static void push(struct env *e, const char *line)
{
    pn_logring_push(pn_mzcore_logs(e->core), line, strlen(line));
}

static void expect_close(struct env *e, int code, int ms)
{
    struct frame fr;
    uint64_t t0 = pn_now_ms();
    assert_true(next_frame(e, &fr, ms));
    assert_int_equal(fr.opcode, 0x8);
    assert_true(fr.len >= 2);
    assert_int_equal(((uint8_t)fr.data[0]) << 8 | (uint8_t)fr.data[1], code);
    assert_true(pn_now_ms() - t0 <= (uint64_t)ms);
    free(fr.data);
}

static void test_logs_backlog_and_lines(void **state)
{
    struct env *e = *state;
    do_connect(e);
    for (int i = 0; i < 150; i++) {
        char l[32];
        snprintf(l, sizeof l, "line %d", i);
        push(e, l);
    }
    open_stream(e, "&interval=0");
    struct frame fr;
    for (int i = 50; i < 150; i++) { /* case 38: exactly the last 100 */
        char want[32];
        snprintf(want, sizeof want, "line %d", i);
        assert_true(next_frame(e, &fr, 1000));
        assert_int_equal(fr.opcode, 0x1);
        assert_string_equal(fr.data, want);
        free(fr.data);
    }
    push(e, "live");
    push(e, "");
    push(e, "caf\xc3\xa9");
    assert_true(next_frame(e, &fr, 1000));
    assert_string_equal(fr.data, "live");
    free(fr.data);
    assert_true(next_frame(e, &fr, 1000));
    assert_int_equal(fr.opcode, 0x1);
    assert_int_equal(fr.len, 0); /* empty line, empty frame */
    free(fr.data);
    assert_true(next_frame(e, &fr, 1000));
    assert_string_equal(fr.data, "caf\xc3\xa9");
    free(fr.data);

    /* case 39: a new /connect closes the stream with 1000 within 0.3 s */
    struct fake_req *f = fake_new("POST", "/connect", NULL, NULL);
    pn_marzban_rest(&f->req, e->front);
    assert_int_equal(f->status, 200);
    fake_free(f);
    expect_close(e, 1000, 300);
}

static void test_logs_interval_batches(void **state)
{
    struct env *e = *state;
    do_connect(e);
    push(e, "a");
    push(e, "b");
    uint64_t t0 = pn_now_ms();
    open_stream(e, "&interval=0.3");
    struct frame fr;
    assert_true(next_frame(e, &fr, 1000));
    uint64_t first = pn_now_ms();
    assert_true(first - t0 < 100); /* case 35: the first frame at once */
    assert_string_equal(fr.data, "a\nb\n");
    free(fr.data);
    push(e, "c");
    run_for(e, 50);
    push(e, "d");
    assert_true(next_frame(e, &fr, 1000));
    uint64_t second = pn_now_ms();
    assert_true(second - first >= 290);
    assert_true(second - first < 600);
    assert_string_equal(fr.data, "c\nd\n");
    free(fr.data);
    /* quiet: nothing is sent */
    assert_false(next_frame(e, &fr, 400));
    push(e, "e"); /* the interval passed: at once */
    t0 = pn_now_ms();
    assert_true(next_frame(e, &fr, 1000));
    assert_true(pn_now_ms() - t0 < 100);
    assert_string_equal(fr.data, "e\n");
    free(fr.data);

    /* the node stops: 1001 */
    pn_marzban_end_streams(e->front);
    expect_close(e, 1001, 300);
}

static void test_logs_negative_interval_and_two_readers(void **state)
{
    struct env *e = *state;
    do_connect(e);
    push(e, "x");
    open_stream(e, "&interval=-1");
    struct frame fr;
    assert_true(next_frame(e, &fr, 1000));
    assert_string_equal(fr.data, "x\n");
    free(fr.data);
    push(e, "y");
    assert_true(next_frame(e, &fr, 1000));
    assert_string_equal(fr.data, "y\n");
    free(fr.data);
    /* the session ends: /disconnect closes with 1000 */
    struct fake_req *f = fake_new("POST", "/disconnect", NULL, NULL);
    pn_marzban_rest(&f->req, e->front);
    fake_free(f);
    expect_close(e, 1000, 300);
    cli_close(e);
    run_for(e, 50);
    assert_null(e->front->streams);
}

static void test_logs_invalidate_and_client_gone(void **state)
{
    struct env *e = *state;
    do_connect(e);
    open_stream(e, NULL);
    push(e, "p");
    struct frame fr;
    assert_true(next_frame(e, &fr, 1000));
    assert_string_equal(fr.data, "p");
    free(fr.data);
    pn_marzban_invalidate_session(e->front);
    expect_close(e, 1000, 300);
    cli_close(e);
    call_expect(e, "POST", "/", NULL, 200,
                "{\"connected\":false,\"started\":false,\"core_version\":null}");
    /* a client that vanishes without a close frame */
    run_for(e, 50);
    do_connect(e);
    open_stream(e, NULL);
    assert_non_null(e->front->streams);
    cli_close(e);
    uint64_t end = pn_now_ms() + 2000;
    while (e->front->streams && pn_now_ms() < end)
        event_base_loop(e->base, EVLOOP_ONCE);
    assert_null(e->front->streams);
    push(e, "after"); /* nobody left to notify */
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_root, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_methods_and_paths, setup_nocore, teardown),
        cmocka_unit_test(test_respond_error),
        cmocka_unit_test_setup_teardown(test_connect_and_sessions, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_disconnect, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_validation, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_config_decode_errors, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_start_without_core, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_version_in_base_body, setup_core, teardown),
        cmocka_unit_test_setup_teardown(test_start_started_already_restart_stop, setup_core,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_rejected_config_detail, setup_core, teardown),
        cmocka_unit_test_setup_teardown(test_connect_stops_core, setup_core_stops, teardown),
        cmocka_unit_test_setup_teardown(test_client_leaves, setup_core, teardown),
        cmocka_unit_test(test_parse_interval),
        cmocka_unit_test(test_query_value),
        cmocka_unit_test_setup_teardown(test_logs_refusal_headers, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_logs_refusals, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_logs_backlog_and_lines, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_logs_interval_batches, setup_nocore, teardown),
        cmocka_unit_test_setup_teardown(test_logs_negative_interval_and_two_readers, setup_nocore,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_logs_invalidate_and_client_gone, setup_nocore,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
