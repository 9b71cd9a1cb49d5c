/* The PasarGuard API front without a running node: the chunked-sync
 * framing parser (spec §6.3), stat name parsing and the kind check (§12.1),
 * Service__User → pn_user with presence (§5.1), the core-error → gRPC code
 * → HTTP status map (§7.1), and, through a fake REST transport and a real
 * backend with no core, the route/guard/Start error paths and the log
 * stream (backlog, batching, backpressure with drops, end at session end,
 * client close). Legacy session mode (spec §4, §5.3): the REST and gRPC
 * session checks in the reference's order with its codes and texts, Go's
 * uuid.Parse error texts, the session's lifetime (Start replaces it, Stop
 * closes it, keep-alive alone does not), and long-poll logs (at most
 * MAX_LOG_PER_REQUEST lines, no line twice across requests, 204 on
 * timeout, answers at session end, client close). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../../../src/api/pasarguard.c"

static const char *const KEY = "5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77";

/* ---- chunk frames ------------------------------------------------------------ */

static void put_uvarint(struct pn_buf *b, uint64_t v)
{
    while (v >= 0x80) {
        uint8_t c = (uint8_t)(v | 0x80);
        pn_buf_append(b, &c, 1);
        v >>= 7;
    }
    uint8_t c = (uint8_t)v;
    pn_buf_append(b, &c, 1);
}

/* Appends one frame: a UsersChunk of users with the given emails. */
static void frame(struct pn_buf *b, const char *const *emails, size_t n, uint64_t index, bool last)
{
    Service__User *u = n ? calloc(n, sizeof *u) : NULL;
    Service__User **up = n ? calloc(n, sizeof *up) : NULL;
    for (size_t i = 0; i < n; i++) {
        service__user__init(&u[i]);
        u[i].email = (char *)emails[i];
        up[i] = &u[i];
    }
    Service__UsersChunk c = SERVICE__USERS_CHUNK__INIT;
    c.n_users = n;
    c.users = up;
    c.index = index;
    c.last = last;
    size_t len = service__users_chunk__get_packed_size(&c);
    uint8_t *buf = malloc(len + 1);
    service__users_chunk__pack(&c, buf);
    put_uvarint(b, len);
    pn_buf_append(b, buf, len);
    free(buf);
    free(up);
    free(u);
}

static void free_users(struct pn_user **users, size_t n)
{
    for (size_t i = 0; i < n; i++)
        pn_user_free(users[i]);
    free(users);
}

/* Parses b and checks the emails in order. */
static void expect_users(struct pn_buf *b, const char *const *want, size_t nwant)
{
    struct pn_user **users = NULL;
    size_t n = 0;
    char err[256] = "";
    int rv = pn_pasarguard_parse_chunks(b->data, b->len, &users, &n, err, sizeof err);
    if (rv != PN_OK)
        fail_msg("parse failed: %s", err);
    assert_int_equal(n, nwant);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(users[i]->email, want[i]);
    free_users(users, n);
}

static void expect_error(const uint8_t *body, size_t len, const char *want)
{
    struct pn_user **users = (struct pn_user **)0x1;
    size_t n = 77;
    char err[256] = "";
    assert_int_equal(pn_pasarguard_parse_chunks(body, len, &users, &n, err, sizeof err),
                     PN_ERR_INVAL);
    assert_string_equal(err, want);
    assert_ptr_equal(users, (struct pn_user **)0x1); /* untouched on error */
    assert_int_equal(n, 77);
}

static void test_chunks_in_order(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"1", "2"}, 2, 0, false);
    frame(&b, (const char *[]){"3", "4"}, 2, 1, false);
    frame(&b, (const char *[]){"5"}, 1, 2, true);
    expect_users(&b, (const char *[]){"1", "2", "3", "4", "5"}, 5);
    pn_buf_free(&b);
}

static void test_chunks_out_of_order_and_same_index(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"c"}, 1, 2, false);
    frame(&b, (const char *[]){"b1"}, 1, 1, false);
    frame(&b, (const char *[]){"a"}, 1, 0, false);
    frame(&b, (const char *[]){"b2"}, 1, 1, false); /* same bucket, after b1 */
    frame(&b, (const char *[]){"z"}, 1, 9, false);  /* past last: not joined */
    frame(&b, (const char *[]){"d"}, 1, 3, true);
    expect_users(&b, (const char *[]){"a", "b1", "b2", "c", "d"}, 5);
    pn_buf_free(&b);
}

static void test_chunks_last_may_arrive_early(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"x"}, 1, 0, false);
    frame(&b, (const char *[]){"y"}, 1, 1, true);
    frame(&b, (const char *[]){"late"}, 1, 2, false); /* after last: never read */
    expect_users(&b, (const char *[]){"x", "y"}, 2);
    pn_buf_free(&b);
}

static void test_chunks_empty_middle_chunk_counts(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"x"}, 1, 0, false);
    frame(&b, NULL, 0, 1, false);
    frame(&b, (const char *[]){"y"}, 1, 2, true);
    expect_users(&b, (const char *[]){"x", "y"}, 2);
    pn_buf_free(&b);
}

static void test_chunks_trailing_bytes_ignored(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"only"}, 1, 0, true);
    pn_buf_append(&b, "\xff\xff\xff garbage", 11);
    expect_users(&b, (const char *[]){"only"}, 1);
    pn_buf_free(&b);
}

static void test_chunks_zero_length_frames_skipped(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    put_uvarint(&b, 0);
    frame(&b, (const char *[]){"a"}, 1, 0, false);
    put_uvarint(&b, 0);
    put_uvarint(&b, 0);
    frame(&b, (const char *[]){"b"}, 1, 1, true);
    expect_users(&b, (const char *[]){"a", "b"}, 2);
    pn_buf_free(&b);
}

static void test_chunks_missing_last(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"a"}, 1, 0, false);
    frame(&b, (const char *[]){"b"}, 1, 1, false);
    expect_error(b.data, b.len, "missing final chunk indicator");
    expect_error(NULL, 0, "missing final chunk indicator"); /* empty body */
    pn_buf_free(&b);
}

static void test_chunks_gap(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"a"}, 1, 0, false);
    frame(&b, (const char *[]){"c"}, 1, 2, true);
    expect_error(b.data, b.len, "missing chunk index 1");
    pn_buf_free(&b);

    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"c"}, 1, 1, true);
    expect_error(b.data, b.len, "missing chunk index 0");
    pn_buf_free(&b);

    pn_buf_init(&b, 0);
    frame(&b, (const char *[]){"a"}, 1, 0, false);
    frame(&b, (const char *[]){"z"}, 1, UINT64_MAX, true);
    expect_error(b.data, b.len, "missing chunk index 1");
    pn_buf_free(&b);
}

static void test_chunks_empty_sync(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    frame(&b, NULL, 0, 0, true);
    expect_error(b.data, b.len, "no users received");
    pn_buf_free(&b);
}

static void test_chunks_garbage(void **state)
{
    /* length 3, then bytes that are no protobuf (a truncated varint field) */
    static const uint8_t body[] = {3, 0x08, 0xff, 0xff};
    expect_error(body, sizeof body, "failed to decode chunk: " PROTO_PARSE_ERR);
    /* a wire type that does not exist */
    static const uint8_t body2[] = {2, 0x0f, 0x01};
    expect_error(body2, sizeof body2, "failed to decode chunk: " PROTO_PARSE_ERR);
}

static void test_chunks_bad_length(void **state)
{
    static const uint8_t trunc[] = {0x80};
    expect_error(trunc, sizeof trunc, "failed to read chunk length: unexpected EOF");
    static const uint8_t trunc2[] = {0xff, 0xff, 0xff};
    expect_error(trunc2, sizeof trunc2, "failed to read chunk length: unexpected EOF");
    static const uint8_t over[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02};
    expect_error(over, sizeof over,
                 "failed to read chunk length: binary: varint overflows a 64-bit integer");
    static const uint8_t over11[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                     0xff, 0xff, 0xff, 0xff, 0x01};
    expect_error(over11, sizeof over11,
                 "failed to read chunk length: binary: varint overflows a 64-bit integer");
}

static void test_chunks_short_payload(void **state)
{
    static const uint8_t part[] = {10, 0x0a, 0x00};
    expect_error(part, sizeof part, "failed to read chunk payload: unexpected EOF");
    static const uint8_t none[] = {5};
    expect_error(none, sizeof none, "failed to read chunk payload: EOF");
    static const uint8_t huge[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0};
    expect_error(huge, sizeof huge, "failed to read chunk payload: unexpected EOF");
}

/* ---- stat names ---------------------------------------------------------------- */

static void expect_split(const char *name, const char *kind, const char *n, const char *l,
                         const char *t)
{
    struct name_part parts[3];
    bool ok = split_name(name, strlen(name), kind, strlen(kind), parts);
    if (!n) {
        if (ok)
            fail_msg("%s (kind %s) should be dropped", name, kind);
        return;
    }
    if (!ok)
        fail_msg("%s (kind %s) should parse", name, kind);
    const char *want[3] = {n, l, t};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(parts[i].len, strlen(want[i]));
        assert_memory_equal(parts[i].p, want[i], parts[i].len);
    }
}

static void test_stat_split(void **state)
{
    expect_split("user>>>138>>>traffic>>>uplink", "user", "138", "traffic", "uplink");
    expect_split("outbound>>>direct>>>traffic>>>downlink>>>extra>>>more", "outbound", "direct",
                 "traffic", "downlink");
    expect_split("inbound>>>api>>>traffic>>>uplink", "inbound", "api", "traffic", "uplink");
    /* fewer than 4 parts */
    expect_split("user>>>138>>>traffic", "user", NULL, NULL, NULL);
    expect_split("user", "user", NULL, NULL, NULL);
    expect_split("", "user", NULL, NULL, NULL);
    /* an empty part 1, 2 or 3 */
    expect_split("user>>>>>>traffic>>>uplink", "user", NULL, NULL, NULL);
    expect_split("user>>>1>>>>>>uplink", "user", NULL, NULL, NULL);
    expect_split("user>>>1>>>traffic>>>", "user", NULL, NULL, NULL);
    /* part 0 must be the kind: substring matches of the core are dropped */
    expect_split("user>>>xoutbound>>>traffic>>>uplink", "outbound", NULL, NULL, NULL);
    expect_split("inbound>>>api>>>traffic>>>uplink", "outbound", NULL, NULL, NULL);
    expect_split("outbound>>>direct>>>traffic>>>uplink", "inbound", NULL, NULL, NULL);
    /* separators are cut left to right like Go's strings.Split */
    expect_split("user>>>>a>>>b>>>c", "user", ">a", "b", "c");
}

static void test_pack_stats_filters_kind(void **state)
{
    struct pn_backend_stat items[] = {
        {(char *)"outbound>>>direct>>>traffic>>>uplink", 10},
        {(char *)"user>>>7outbound>>>traffic>>>downlink", 20}, /* email ends in "outbound" */
        {(char *)"outbound>>>block>>>traffic>>>downlink", 30},
        {(char *)"outbound>>>short", 40},
    };
    struct pn_backend_stats s = {items, 4, true};
    bool kept[4];
    size_t len;
    uint8_t *buf = pack_stats(&s, "outbound", kept, &len);
    assert_true(kept[0]);
    assert_false(kept[1]);
    assert_true(kept[2]);
    assert_false(kept[3]);
    Service__StatResponse *r = service__stat_response__unpack(NULL, len, buf);
    assert_non_null(r);
    assert_int_equal(r->n_stats, 2);
    assert_string_equal(r->stats[0]->name, "direct");
    assert_string_equal(r->stats[0]->link, "traffic");
    assert_string_equal(r->stats[0]->type, "uplink");
    assert_int_equal(r->stats[0]->value, 10);
    assert_string_equal(r->stats[1]->name, "block");
    assert_string_equal(r->stats[1]->type, "downlink");
    assert_int_equal(r->stats[1]->value, 30);
    service__stat_response__free_unpacked(r, NULL);
    free(buf);

    struct pn_backend_stats none = {NULL, 0, false};
    buf = pack_stats(&none, "user", kept, &len);
    assert_int_equal(len, 0);
    free(buf);
}

/* ---- users ----------------------------------------------------------------------- */

/* Through the wire, so presence is what a decoder sees. */
static struct pn_user *convert(const Service__User *m)
{
    size_t len = service__user__get_packed_size(m);
    uint8_t *buf = malloc(len + 1);
    service__user__pack(m, buf);
    Service__User *d = service__user__unpack(NULL, len, buf);
    assert_non_null(d);
    struct pn_user *u = user_from_pb(d);
    service__user__free_unpacked(d, NULL);
    free(buf);
    return u;
}

static void test_user_presence(void **state)
{
    Service__Vless vless = SERVICE__VLESS__INIT;
    vless.id = (char *)"0d4b2f9e-5c1a-4e0b-9f6d-2b8e7c3a1f00";
    Service__Trojan trojan = SERVICE__TROJAN__INIT; /* present, empty password */
    Service__Shadowsocks ss = SERVICE__SHADOWSOCKS__INIT;
    ss.password = (char *)"pw";
    ss.method = (char *)"aes-128-gcm";
    Service__Proxy proxy = SERVICE__PROXY__INIT;
    proxy.vless = &vless;
    proxy.trojan = &trojan;
    proxy.shadowsocks = &ss;
    Service__User m = SERVICE__USER__INIT;
    m.email = (char *)"138";
    m.proxies = &proxy;
    char *tags[] = {(char *)"VLESS TCP", (char *)"Trojan"};
    m.inbounds = tags;
    m.n_inbounds = 2;

    struct pn_user *u = convert(&m);
    assert_string_equal(u->email, "138");
    assert_false(u->has_vmess);
    assert_null(u->vmess_id);
    assert_true(u->has_vless);
    assert_string_equal(u->vless_id, vless.id);
    assert_string_equal(u->vless_flow, "");
    assert_true(u->has_trojan);
    assert_string_equal(u->trojan_password, "");
    assert_true(u->has_ss);
    assert_string_equal(u->ss_password, "pw");
    assert_string_equal(u->ss_method, "aes-128-gcm");
    assert_false(u->has_hysteria);
    assert_null(u->hysteria_auth);
    assert_int_equal(u->ninbounds, 2);
    assert_string_equal(u->inbounds[0], "VLESS TCP");
    assert_string_equal(u->inbounds[1], "Trojan");
    pn_user_free(u);

    /* no Proxy at all, no inbounds */
    Service__User bare = SERVICE__USER__INIT;
    bare.email = (char *)"9";
    u = convert(&bare);
    assert_string_equal(u->email, "9");
    assert_false(u->has_vmess || u->has_vless || u->has_trojan || u->has_ss || u->has_hysteria);
    assert_int_equal(u->ninbounds, 0);
    pn_user_free(u);

    /* vmess and hysteria present */
    Service__Vmess vmess = SERVICE__VMESS__INIT;
    vmess.id = (char *)"id";
    Service__Hysteria hy = SERVICE__HYSTERIA__INIT;
    hy.auth = (char *)"secret";
    Service__Proxy p2 = SERVICE__PROXY__INIT;
    p2.vmess = &vmess;
    p2.hysteria = &hy;
    bare.proxies = &p2;
    u = convert(&bare);
    assert_true(u->has_vmess);
    assert_string_equal(u->vmess_id, "id");
    assert_true(u->has_hysteria);
    assert_string_equal(u->hysteria_auth, "secret");
    assert_false(u->has_vless || u->has_trojan || u->has_ss);
    pn_user_free(u);
}

/* ---- core errors → gRPC code → HTTP status ---------------------------------------- */

static void test_core_error_map(void **state)
{
    struct {
        int rv, code;
        const char *err;
        enum pn_grpc_code want;
        int status;
    } cases[] = {
        {PN_ERR_PROTO, 14, "connection refused", PN_GRPC_UNAVAILABLE, 503},
        {PN_ERR_PROTO, 4, "context deadline exceeded", PN_GRPC_DEADLINE_EXCEEDED, 504},
        {PN_ERR_PROTO, 2, "user>>>138>>>online not found.", PN_GRPC_NOT_FOUND, 404},
        {PN_ERR_NOTFOUND, 5, "user>>>1>>>online not found.", PN_GRPC_NOT_FOUND, 404},
        {PN_ERR_PROTO, 2, "not found. but more", PN_GRPC_UNKNOWN, 500},
        {PN_ERR_PROTO, 3, "bad", PN_GRPC_INVALID_ARGUMENT, 400},
        {PN_ERR_PROTO, 11, "range", PN_GRPC_OUT_OF_RANGE, 400},
        {PN_ERR_PROTO, 1, "cancelled", PN_GRPC_CANCELLED, 499},
        {PN_ERR_PROTO, 6, "exists", PN_GRPC_ALREADY_EXISTS, 409},
        {PN_ERR_PROTO, 10, "aborted", PN_GRPC_ABORTED, 409},
        {PN_ERR_PROTO, 7, "denied", PN_GRPC_PERMISSION_DENIED, 403},
        {PN_ERR_PROTO, 16, "who", PN_GRPC_UNAUTHENTICATED, 401},
        {PN_ERR_PROTO, 9, "precondition", PN_GRPC_FAILED_PRECONDITION, 412},
        {PN_ERR_PROTO, 8, "exhausted", PN_GRPC_RESOURCE_EXHAUSTED, 429},
        {PN_ERR_PROTO, 12, "unimplemented", PN_GRPC_UNIMPLEMENTED, 501},
        {PN_ERR_PROTO, 13, "internal", PN_GRPC_INTERNAL, 500},
        {PN_ERR_PROTO, 15, "data loss", PN_GRPC_DATA_LOSS, 500},
        {PN_ERR_PROTO, 99, "odd code", PN_GRPC_UNKNOWN, 500},
        {PN_ERR_TIMEOUT, 0, "timeout", PN_GRPC_DEADLINE_EXCEEDED, 504},
        {PN_ERR_IO, 0, "connect: refused", PN_GRPC_UNAVAILABLE, 503},
        {PN_ERR_INVAL, 0, NULL, PN_GRPC_UNKNOWN, 500},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        enum pn_grpc_code c = core_error_code(cases[i].rv, cases[i].code, cases[i].err);
        if (c != cases[i].want || pn_grpc_code_to_http(c) != cases[i].status)
            fail_msg("case %zu (%s): code %d status %d, want %d %d", i,
                     cases[i].err ? cases[i].err : "NULL", c, pn_grpc_code_to_http(c),
                     cases[i].want, cases[i].status);
    }
}

/* ---- a fake REST transport ---------------------------------------------------------- */

struct fake_req {
    struct pn_req req;
    struct pn_peer peer;
    struct pn_http_header hdrs[4];
    int status; /* 0: not answered */
    char ctype[64], cache[64];
    bool has_connection;
    struct pn_buf body;
    bool streaming, ended;
    size_t pending; /* what stream_pending reports */
    int writes;
};

static void copy_headers(struct fake_req *f, const struct pn_http_header *h, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(h[i].name, "content-type") == 0)
            snprintf(f->ctype, sizeof f->ctype, "%s", h[i].value);
        if (strcasecmp(h[i].name, "cache-control") == 0)
            snprintf(f->cache, sizeof f->cache, "%s", h[i].value);
        if (strcasecmp(h[i].name, "connection") == 0)
            f->has_connection = true;
    }
}

static int f_respond(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                     size_t nhdrs, const void *body, size_t len)
{
    struct fake_req *f = (struct fake_req *)req;
    assert_int_equal(f->status, 0);
    f->status = status;
    copy_headers(f, hdrs, nhdrs);
    pn_buf_append(&f->body, body, len);
    return PN_OK;
}

static int f_stream_start(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                          size_t nhdrs)
{
    struct fake_req *f = (struct fake_req *)req;
    assert_int_equal(f->status, 0);
    f->status = status;
    f->streaming = true;
    copy_headers(f, hdrs, nhdrs);
    return PN_OK;
}

static int f_stream_write(struct pn_req *req, const void *data, size_t len)
{
    struct fake_req *f = (struct fake_req *)req;
    assert_true(f->streaming);
    assert_false(f->ended);
    f->writes++;
    pn_buf_append(&f->body, data, len);
    return PN_OK;
}

static int f_stream_end(struct pn_req *req)
{
    struct fake_req *f = (struct fake_req *)req;
    assert_true(f->streaming);
    f->ended = true;
    return PN_OK;
}

static size_t f_stream_pending(const struct pn_req *req)
{
    return ((const struct fake_req *)req)->pending;
}

static const struct pn_req_ops fake_ops = {f_respond,    f_stream_start,   f_stream_write,
                                           f_stream_end, f_stream_pending, NULL};

static struct fake_req *fake_new(const char *method, const char *path, const char *key,
                                 const void *body, size_t len)
{
    struct fake_req *f = calloc(1, sizeof *f);
    pn_buf_init(&f->body, 0);
    size_t nh = 0;
    if (key)
        f->hdrs[nh++] = (struct pn_http_header){"x-api-key", key};
    f->req.method = method;
    f->req.path = path;
    f->req.query = "";
    f->req.headers = f->hdrs;
    f->req.nheaders = nh;
    f->req.body = body;
    f->req.body_len = len;
    f->req.http_version = 11;
    f->req.peer = &f->peer;
    f->req.ops = &fake_ops;
    return f;
}

static void fake_free(struct fake_req *f)
{
    pn_buf_free(&f->body);
    free(f);
}

struct env {
    struct event_base *base;
    struct pn_backend *b;
    struct pn_pasarguard *pg;
};

static int env_new(void **state, size_t ring)
{
    struct env *e = calloc(1, sizeof *e);
    e->base = event_base_new();
    struct pn_backend_opts bo = {.base = e->base, .core_path = NULL, .log_buffer_size = ring};
    e->b = pn_backend_new(&bo);
    struct pn_pasarguard_opts po = {.backend = e->b, .node_version = "0.2.0", .base = e->base};
    assert_int_equal(pn_uuid_parse(KEY, strlen(KEY), &po.api_key), PN_OK);
    e->pg = pn_pasarguard_new(&po);
    *state = e;
    return 0;
}

static int env_setup(void **state)
{
    return env_new(state, 4);
}

/* The gozargah profile: session mode, MAX_LOG_PER_REQUEST = 3 set or not. */
static int env_new_session(void **state, bool long_poll_always)
{
    struct env *e = calloc(1, sizeof *e);
    e->base = event_base_new();
    struct pn_backend_opts bo = {.base = e->base, .core_path = NULL, .log_buffer_size = 16};
    e->b = pn_backend_new(&bo);
    struct pn_pasarguard_opts po = {.backend = e->b,
                                    .node_version = "0.2.0",
                                    .base = e->base,
                                    .session_mode = true,
                                    .max_log_per_request = 3,
                                    .long_poll_logs = long_poll_always};
    e->pg = pn_pasarguard_new(&po);
    *state = e;
    return 0;
}

static int env_setup_session(void **state)
{
    return env_new_session(state, false);
}

static int env_setup_session_poll(void **state)
{
    return env_new_session(state, true);
}

static int env_setup_ring16(void **state)
{
    return env_new(state, 16);
}

static int env_teardown(void **state)
{
    struct env *e = *state;
    pn_pasarguard_free(e->pg);
    pn_backend_free(e->b);
    event_base_free(e->base);
    free(e);
    return 0;
}

static void spin(struct env *e)
{
    for (int i = 0; i < 8; i++)
        event_base_loop(e->base, EVLOOP_NONBLOCK);
}

/* Runs a REST request to its answer and returns it (caller frees). */
static struct fake_req *rest(struct env *e, const char *method, const char *path, const char *key,
                             const void *body, size_t len)
{
    struct fake_req *f = fake_new(method, path, key, body, len);
    pn_pasarguard_rest(&f->req, e->pg);
    spin(e);
    return f;
}

static void expect_text(struct fake_req *f, int status, const char *text)
{
    assert_int_equal(f->status, status);
    assert_string_equal(f->ctype, "text/plain; charset=utf-8");
    char want[512];
    snprintf(want, sizeof want, "%s\n", text);
    assert_int_equal(f->body.len, strlen(want));
    assert_memory_equal(f->body.data, want, f->body.len);
    fake_free(f);
}

static void test_rest_routes_and_guard(void **state)
{
    struct env *e = *state;
    expect_text(rest(e, "GET", "/info", NULL, NULL, 0), 401, "missing x-api-key header");
    expect_text(rest(e, "GET", "/nope", "zzz", NULL, 0), 422,
                "invalid api key format: must be a valid UUID");
    expect_text(rest(e, "GET", "/nope", KEY, NULL, 0), 404, "404 page not found");
    expect_text(rest(e, "GET", "/stats", KEY, NULL, 0), 500, "backend not initialized");
    expect_text(rest(e, "GET", "/logs", KEY, NULL, 0), 500, "backend not initialized");
    expect_text(rest(e, "PUT", "/users/sync/chunked", KEY, "\x00", 1), 500,
                "backend not initialized");

    struct fake_req *f = rest(e, "POST", "/info", KEY, NULL, 0);
    assert_int_equal(f->status, 405);
    assert_int_equal(f->body.len, 0);
    fake_free(f);

    f = rest(e, "GET", "/info", KEY, NULL, 0);
    assert_int_equal(f->status, 200);
    assert_string_equal(f->ctype, "application/x-protobuf");
    Service__BaseInfoResponse *info =
        service__base_info_response__unpack(NULL, f->body.len, f->body.data);
    assert_non_null(info);
    assert_false(info->started);
    assert_string_equal(info->core_version, ""); /* no core configured */
    assert_string_equal(info->node_version, "0.2.0");
    service__base_info_response__free_unpacked(info, NULL);
    fake_free(f);

    /* latency needs no core: an empty LatencyResponse is 0 bytes */
    f = rest(e, "GET", "/stats/latency", KEY, NULL, 0);
    assert_int_equal(f->status, 200);
    assert_string_equal(f->ctype, "application/x-protobuf");
    assert_int_equal(f->body.len, 0);
    fake_free(f);
    expect_text(rest(e, "GET", "/stats/latency", KEY, "\xff", 1), 400, PROTO_PARSE_ERR);
}

static void test_rest_start_errors(void **state)
{
    struct env *e = *state;
    expect_text(rest(e, "POST", "/start", KEY, "\n\005ab", 4), 400, PROTO_PARSE_ERR);

    Service__Backend m = SERVICE__BACKEND__INIT;
    m.type = SERVICE__BACKEND_TYPE__WIREGUARD;
    m.config = (char *)"{}";
    uint8_t buf[256];
    size_t len = service__backend__pack(&m, buf);
    expect_text(rest(e, "POST", "/start", KEY, buf, len), 503, "invalid backend type");

    /* no core binary: refused at once, the users given are not leaked */
    Service__User u = SERVICE__USER__INIT;
    u.email = (char *)"1";
    Service__User *up[] = {&u};
    m.type = SERVICE__BACKEND_TYPE__XRAY;
    m.users = up;
    m.n_users = 1;
    len = service__backend__pack(&m, buf);
    struct fake_req *f = rest(e, "POST", "/start", KEY, buf, len);
    assert_int_equal(f->status, 503);
    assert_true(f->body.len > 0 && strncmp((char *)f->body.data, "failed to start xray:", 21) == 0);
    fake_free(f);
}

/* ---- log streams ------------------------------------------------------------------------- */

static void push(struct env *e, const char *line)
{
    pn_logring_push(pn_backend_logs(e->b), line, strlen(line));
}

static void expect_body(struct fake_req *f, const char *want)
{
    if (f->body.len != strlen(want) || memcmp(f->body.data, want, f->body.len) != 0)
        fail_msg("body %.*s, want %s", (int)f->body.len, (char *)f->body.data, want);
}

static void stop_cb(int rv, const char *err, void *arg)
{
    *(int *)arg = rv == PN_OK ? 1 : -1;
}

static void test_logs_stream(void **state)
{
    struct env *e = *state;
    push(e, "a");
    push(e, "b");
    push(e, "c");
    struct fake_req *f = fake_new("GET", "/logs", KEY, NULL, 0);
    h_logs(e->pg, (struct reply){.req = &f->req}, NULL, 0);
    assert_int_equal(f->status, 200);
    assert_string_equal(f->ctype, "text/event-stream");
    assert_string_equal(f->cache, "no-cache");
    assert_true(f->has_connection);
    spin(e);
    expect_body(f, "a\nb\nc\n"); /* the backlog, in one write */
    assert_int_equal(f->writes, 1);

    push(e, "d");
    push(e, "");
    spin(e);
    expect_body(f, "a\nb\nc\nd\n\n");

    /* backpressure: nothing is written, the ring drops the oldest lines */
    f->pending = LOG_HIGH_WATER;
    for (int i = 0; i < 10; i++) {
        char line[16];
        snprintf(line, sizeof line, "x%d", i);
        push(e, line);
    }
    spin(e);
    expect_body(f, "a\nb\nc\nd\n\n");
    f->pending = 0;
    f->req.on_writable(&f->req, f->req.cb_arg);
    spin(e);
    expect_body(f, "a\nb\nc\nd\n\nx6\nx7\nx8\nx9\n"); /* ring of 4 */
    assert_false(f->ended);

    /* a second reader that goes away: freed, the first unaffected */
    struct fake_req *g = fake_new("GET", "/logs", KEY, NULL, 0);
    g->req.http_version = 20;
    h_logs(e->pg, (struct reply){.req = &g->req}, NULL, 0);
    assert_false(g->has_connection); /* HTTP/2 forbids Connection */
    spin(e);
    expect_body(g, "x6\nx7\nx8\nx9\n");
    g->req.on_close(&g->req, g->req.cb_arg);
    fake_free(g);
    push(e, "y");
    spin(e);
    expect_body(f, "a\nb\nc\nd\n\nx6\nx7\nx8\nx9\ny\n");

    /* the session ends (Stop): the stream ends cleanly after its lines */
    int stopped = 0;
    assert_int_equal(pn_backend_stop(e->b, stop_cb, &stopped, NULL), PN_OK);
    push(e, "z");
    spin(e);
    assert_int_equal(stopped, 1);
    assert_true(f->ended);
    expect_body(f, "a\nb\nc\nd\n\nx6\nx7\nx8\nx9\ny\nz\n");
    assert_null(e->pg->logs);
    fake_free(f);
}

static void test_logs_end_when_blocked_and_on_free(void **state)
{
    struct env *e = *state;
    struct fake_req *f = fake_new("GET", "/logs", KEY, NULL, 0);
    h_logs(e->pg, (struct reply){.req = &f->req}, NULL, 0);
    spin(e);
    f->pending = LOG_HIGH_WATER + 1;
    push(e, "late");
    int stopped = 0;
    assert_int_equal(pn_backend_stop(e->b, stop_cb, &stopped, NULL), PN_OK);
    spin(e);
    assert_true(f->ended); /* a blocked reader is not kept open by its backlog */
    fake_free(f);

    /* pn_pasarguard_free ends what is still open */
    f = fake_new("GET", "/logs", KEY, NULL, 0);
    h_logs(e->pg, (struct reply){.req = &f->req}, NULL, 0);
    spin(e);
    assert_non_null(e->pg->logs);
    pn_pasarguard_free(e->pg);
    e->pg = NULL;
    assert_true(f->ended);
    fake_free(f);
}

/* A write stops once it holds LOG_BATCH bytes, so one chunk never holds
 * the whole ring. */
static void test_logs_batches(void **state)
{
    struct env *e = *state;
    struct fake_req *f = fake_new("GET", "/logs", KEY, NULL, 0);
    h_logs(e->pg, (struct reply){.req = &f->req}, NULL, 0);
    spin(e);
    char line[16385]; /* the ring's longest line */
    memset(line, 'q', sizeof line - 1);
    line[sizeof line - 1] = '\0';
    for (int i = 0; i < 5; i++)
        push(e, line);
    spin(e);
    assert_int_equal(f->body.len, 5 * 16385);
    assert_int_equal(f->writes, 2); /* 4 lines pass LOG_BATCH, the 5th goes next */
    f->req.on_close(&f->req, f->req.cb_arg);
    fake_free(f);
}

/* ---- legacy session mode: the checks ---------------------------------------------- */

static const char *const SID = "0f6c2a4e-8d1b-4c7a-9e3f-5a6b7c8d9e0f";
/* A well-formed id that is not the session's (the API key, too). */
#define OTHER_BEARER "Bearer 5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77"

static struct session test_session(void)
{
    struct session s;
    memset(&s, 0, sizeof s);
    s.active = true;
    assert_int_equal(pn_uuid_parse(SID, strlen(SID), &s.id), PN_OK);
    snprintf(s.ip, sizeof s.ip, "127.0.0.1");
    return s;
}

static void expect_rest_check(const struct session *s, const char *ip, const char *auth, int status,
                              const char *text)
{
    const struct api_error *e = check_session_rest(s, ip, auth);
    if (!text) {
        if (e)
            fail_msg("ip %s auth %s: refused %d %s", ip, auth ? auth : "NULL", e->http_status,
                     e->text);
        return;
    }
    if (!e)
        fail_msg("ip %s auth %s: accepted, want %d %s", ip, auth ? auth : "NULL", status, text);
    assert_int_equal(e->http_status, status);
    assert_string_equal(e->text, text);
}

static void test_session_rest_checks(void **state)
{
    struct session none;
    memset(&none, 0, sizeof none);
    struct session s = test_session();
    char good[64], upper[64], urn[80], hex[40];
    snprintf(good, sizeof good, "Bearer %s", SID);

    /* no session: 425 before anything else, even a wrong IP and no header */
    expect_rest_check(&none, "127.0.0.2", NULL, 425, "please connect first");
    expect_rest_check(&none, "127.0.0.1", good, 425, "please connect first");
    /* the IP comes before the header */
    expect_rest_check(&s, "127.0.0.2", NULL, 403, "IP address is not valid");
    expect_rest_check(&s, "127.0.0.2", good, 403, "IP address is not valid");
    expect_rest_check(&s, "", good, 403, "IP address is not valid");
    /* header missing or empty: 401 please connect first */
    expect_rest_check(&s, "127.0.0.1", NULL, 401, "please connect first");
    expect_rest_check(&s, "127.0.0.1", "", 401, "please connect first");
    /* not exactly two space-separated parts */
    expect_rest_check(&s, "127.0.0.1", "Bearer", 401, "invalid Authorization header format");
    expect_rest_check(&s, "127.0.0.1", SID, 401, "invalid Authorization header format");
    char two_spaces[80];
    snprintf(two_spaces, sizeof two_spaces, "Bearer  %s", SID);
    expect_rest_check(&s, "127.0.0.1", two_spaces, 401, "invalid Authorization header format");
    expect_rest_check(&s, "127.0.0.1", "Bearer a b", 401, "invalid Authorization header format");
    /* two parts, the second not a UUID */
    expect_rest_check(&s, "127.0.0.1", "Bearer ", 422, "please send valid uuid");
    expect_rest_check(&s, "127.0.0.1", "Bearer nope", 422, "please send valid uuid");
    /* a UUID, not the session's */
    expect_rest_check(&s, "127.0.0.1", OTHER_BEARER, 403, "session id mismatch.");
    /* accepted: REST does not look at the first part; the UUID forms Go takes */
    expect_rest_check(&s, "127.0.0.1", good, 0, NULL);
    snprintf(upper, sizeof upper, "Token %s", "0F6C2A4E-8D1B-4C7A-9E3F-5A6B7C8D9E0F");
    expect_rest_check(&s, "127.0.0.1", upper, 0, NULL);
    snprintf(urn, sizeof urn, "bearer urn:uuid:%s", SID);
    expect_rest_check(&s, "127.0.0.1", urn, 0, NULL);
    snprintf(hex, sizeof hex, "x 0f6c2a4e8d1b4c7a9e3f5a6b7c8d9e0f");
    expect_rest_check(&s, "127.0.0.1", hex, 0, NULL);
}

static void expect_grpc_check(const struct session *s, const char *auth, enum pn_grpc_code code,
                              const char *text)
{
    char detail[160] = "";
    const struct api_error *e = check_session_grpc(s, auth, detail, sizeof detail);
    if (!text) {
        if (e)
            fail_msg("auth %s: refused %d %s", auth ? auth : "NULL", e->grpc_code, e->text);
        return;
    }
    if (!e)
        fail_msg("auth %s: accepted, want %d %s", auth ? auth : "NULL", code, text);
    assert_int_equal(e->grpc_code, code);
    assert_string_equal(detail[0] ? detail : e->text, text);
}

static void test_session_grpc_checks(void **state)
{
    struct session none;
    memset(&none, 0, sizeof none);
    struct session s = test_session();
    char good[64], lower[64], other[64];
    snprintf(good, sizeof good, "Bearer %s", SID);

    expect_grpc_check(&none, NULL, PN_GRPC_UNAUTHENTICATED, "please connect first");
    expect_grpc_check(&none, good, PN_GRPC_UNAUTHENTICATED, "please connect first");
    expect_grpc_check(&s, NULL, PN_GRPC_UNAUTHENTICATED, "missing authorization header");
    /* gRPC wants the literal word Bearer, one space, the id */
    expect_grpc_check(&s, "", PN_GRPC_INVALID_ARGUMENT, "invalid authorization header format");
    expect_grpc_check(&s, SID, PN_GRPC_INVALID_ARGUMENT, "invalid authorization header format");
    snprintf(lower, sizeof lower, "bearer %s", SID);
    expect_grpc_check(&s, lower, PN_GRPC_INVALID_ARGUMENT, "invalid authorization header format");
    snprintf(other, sizeof other, "Token %s", SID);
    expect_grpc_check(&s, other, PN_GRPC_INVALID_ARGUMENT, "invalid authorization header format");
    expect_grpc_check(&s, "Bearerx y", PN_GRPC_INVALID_ARGUMENT,
                      "invalid authorization header format");
    expect_grpc_check(&s, "Bearer a b", PN_GRPC_INVALID_ARGUMENT,
                      "invalid authorization header format");
    /* not a UUID: Go's uuid.Parse texts */
    expect_grpc_check(&s, "Bearer nope", PN_GRPC_INVALID_ARGUMENT,
                      "invalid session ID: invalid UUID length: 4");
    expect_grpc_check(&s, "Bearer ", PN_GRPC_INVALID_ARGUMENT,
                      "invalid session ID: invalid UUID length: 0");
    expect_grpc_check(&s, "Bearer 0f6c2a4e-8d1b-4c7a-9e3f-5a6b7c8d9e0g", PN_GRPC_INVALID_ARGUMENT,
                      "invalid session ID: invalid UUID format");
    expect_grpc_check(&s, "Bearer 0f6c2a4e_8d1b-4c7a-9e3f-5a6b7c8d9e0f", PN_GRPC_INVALID_ARGUMENT,
                      "invalid session ID: invalid UUID format");
    expect_grpc_check(&s, "Bearer 0f6c2a4e8d1b4c7a9e3f5a6b7c8d9e0z", PN_GRPC_INVALID_ARGUMENT,
                      "invalid session ID: invalid UUID format");
    expect_grpc_check(&s, "Bearer urn:uuix:0f6c2a4e-8d1b-4c7a-9e3f-5a6b7c8d9e0f",
                      PN_GRPC_INVALID_ARGUMENT,
                      "invalid session ID: invalid urn prefix: \"urn:uuix:\"");
    expect_grpc_check(&s, OTHER_BEARER, PN_GRPC_PERMISSION_DENIED, "session ID mismatch");
    expect_grpc_check(&s, good, 0, NULL);
    snprintf(other, sizeof other, "Bearer %s", "0F6C2A4E-8D1B-4C7A-9E3F-5A6B7C8D9E0F");
    expect_grpc_check(&s, other, 0, NULL);
}

static void test_go_quote(void **state)
{
    char q[64];
    go_quote("a\"b\\c\n\x01", 7, q, sizeof q);
    assert_string_equal(q, "\"a\\\"b\\\\c\\x0a\\x01\"");
}

/* ---- legacy session mode: REST through the fake transport ----------------------------- */

/* A request from ip with a verified client certificate and, when auth is
 * not NULL, an Authorization header (and Accept when accept is not NULL). */
static struct fake_req *sreq_new(const char *method, const char *path, const char *ip,
                                 const char *auth, const char *accept)
{
    struct fake_req *f = fake_new(method, path, NULL, NULL, 0);
    size_t nh = 0;
    if (auth)
        f->hdrs[nh++] = (struct pn_http_header){"authorization", auth};
    if (accept)
        f->hdrs[nh++] = (struct pn_http_header){"accept", accept};
    f->req.nheaders = nh;
    snprintf(f->peer.ip, sizeof f->peer.ip, "%s", ip);
    f->peer.client_cert_verified = true;
    return f;
}

static struct fake_req *srest(struct env *e, const char *method, const char *path, const char *ip,
                              const char *auth)
{
    struct fake_req *f = sreq_new(method, path, ip, auth, NULL);
    pn_pasarguard_rest(&f->req, e->pg);
    spin(e);
    return f;
}

static void bearer(struct env *e, char *out, size_t outlen)
{
    char sid[PN_UUID_STRLEN + 1];
    pn_uuid_format(&e->pg->sess.id, sid);
    snprintf(out, outlen, "Bearer %s", sid);
}

static void test_session_rest_flow(void **state)
{
    struct env *e = *state;
    char auth[64];

    /* without a verified client certificate nothing passes, Start included */
    struct fake_req *f = fake_new("POST", "/start", NULL, NULL, 0);
    pn_pasarguard_rest(&f->req, e->pg);
    expect_text(f, 401, "client certificate required");

    /* no session: every call but Start, unknown paths too */
    expect_text(srest(e, "GET", "/info", "127.0.0.1", NULL), 425, "please connect first");
    expect_text(srest(e, "GET", "/nope", "127.0.0.1", NULL), 425, "please connect first");
    expect_text(srest(e, "GET", "/info", "127.0.0.1", OTHER_BEARER), 425, "please connect first");
    /* the API key means nothing in session mode */
    expect_text(rest(e, "GET", "/info", KEY, NULL, 0), 401, "client certificate required");

    /* Start needs no session: it reaches its handler (no core here) */
    f = srest(e, "POST", "/start", "127.0.0.1", NULL);
    assert_int_equal(f->status, 503);
    assert_true(strncmp((char *)f->body.data, "failed to start xray:", 21) == 0);
    fake_free(f);
    f = srest(e, "GET", "/start", "127.0.0.1", NULL);
    assert_int_equal(f->status, 405);
    fake_free(f);
    assert_false(e->pg->sess.active); /* a failed Start opens no session */

    /* a session as a successful Start opens it */
    assert_int_equal(session_begin(e->pg, "127.0.0.1"), PN_OK);
    bearer(e, auth, sizeof auth);
    f = srest(e, "GET", "/info", "127.0.0.1", auth);
    assert_int_equal(f->status, 200);
    Service__BaseInfoResponse *info =
        service__base_info_response__unpack(NULL, f->body.len, f->body.data);
    assert_non_null(info);
    assert_string_equal(info->session_id, auth + 7);
    assert_string_equal(info->extra, "");
    service__base_info_response__free_unpacked(info, NULL);
    fake_free(f);
    expect_text(srest(e, "GET", "/info", "127.0.0.2", auth), 403, "IP address is not valid");
    expect_text(srest(e, "GET", "/info", "127.0.0.1", NULL), 401, "please connect first");
    expect_text(srest(e, "GET", "/info", "127.0.0.1", "Bearer"), 401,
                "invalid Authorization header format");
    expect_text(srest(e, "GET", "/info", "127.0.0.1", "Bearer x"), 422, "please send valid uuid");
    expect_text(srest(e, "GET", "/info", "127.0.0.1", OTHER_BEARER), 403, "session id mismatch.");
    /* after the session check: routes and guard as usual */
    expect_text(srest(e, "GET", "/nope", "127.0.0.1", auth), 404, "404 page not found");
    expect_text(srest(e, "GET", "/stats", "127.0.0.1", auth), 500, "backend not initialized");

    /* a new Start replaces the session: the old id is refused */
    char old[64];
    snprintf(old, sizeof old, "%s", auth);
    assert_int_equal(session_begin(e->pg, "127.0.0.2"), PN_OK);
    bearer(e, auth, sizeof auth);
    assert_string_not_equal(auth, old);
    expect_text(srest(e, "GET", "/info", "127.0.0.2", old), 403, "session id mismatch.");
    expect_text(srest(e, "GET", "/info", "127.0.0.1", auth), 403, "IP address is not valid");
    f = srest(e, "GET", "/info", "127.0.0.2", auth);
    assert_int_equal(f->status, 200);
    fake_free(f);

    /* Stop (the backend's session ends with no core): the session closes */
    int stopped = 0;
    assert_int_equal(pn_backend_stop(e->b, stop_cb, &stopped, NULL), PN_OK);
    spin(e);
    assert_int_equal(stopped, 1);
    expect_text(srest(e, "GET", "/info", "127.0.0.2", auth), 425, "please connect first");
    /* ... and the listener is back for the next session */
    assert_int_equal(session_begin(e->pg, "127.0.0.1"), PN_OK);
    stopped = 0;
    assert_int_equal(pn_backend_stop(e->b, stop_cb, &stopped, NULL), PN_OK);
    spin(e);
    assert_false(e->pg->sess.active);
}

/* ---- long-poll logs ------------------------------------------------------------------------ */

/* The LogList in f's body as "a,b,c". */
static void expect_loglist(struct fake_req *f, int status, const char *want)
{
    assert_int_equal(f->status, status);
    assert_string_equal(f->ctype, "application/x-protobuf");
    Service__LogList *m = service__log_list__unpack(NULL, f->body.len, f->body.data);
    assert_non_null(m);
    char got[512] = "";
    for (size_t i = 0; i < m->n_logs; i++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%s", i ? "," : "", m->logs[i]);
    service__log_list__free_unpacked(m, NULL);
    if (strcmp(got, want) != 0)
        fail_msg("LogList %s, want %s", got, want);
}

static struct fake_req *poll_start(struct env *e, const char *accept)
{
    char auth[64];
    bearer(e, auth, sizeof auth);
    struct fake_req *f = sreq_new("GET", "/logs", "127.0.0.1", NULL, accept);
    h_logs(e->pg, (struct reply){.req = &f->req}, NULL, 0);
    return f;
}

static void test_long_poll(void **state)
{
    struct env *e = *state;
    assert_int_equal(session_begin(e->pg, "127.0.0.1"), PN_OK);
    push(e, "a");
    push(e, "b");
    push(e, "c");
    push(e, "d");
    push(e, "");

    /* the backlog, at most MAX_LOG_PER_REQUEST (3) lines, at once */
    struct fake_req *f = poll_start(e, NULL);
    expect_loglist(f, 200, "a,b,c");
    fake_free(f);
    /* the next request continues where that one stopped (an empty line too) */
    f = poll_start(e, NULL);
    expect_loglist(f, 200, "d,");
    fake_free(f);

    /* caught up: the request waits, and a new line answers it */
    f = poll_start(e, NULL);
    spin(e);
    assert_int_equal(f->status, 0);
    push(e, "e");
    push(e, "f");
    spin(e);
    expect_loglist(f, 200, "e,f");
    fake_free(f);

    /* two waiting requests split the lines, the older first, none twice */
    struct fake_req *g1 = poll_start(e, NULL), *g2 = poll_start(e, NULL);
    for (const char *l = "ghijk"; *l; l++) {
        char line[2] = {*l, 0};
        push(e, line);
    }
    spin(e);
    expect_loglist(g1, 200, "g,h,i");
    expect_loglist(g2, 200, "j,k");
    fake_free(g1);
    fake_free(g2);

    /* 60 s without a line: 204 and an empty LogList */
    f = poll_start(e, NULL);
    spin(e);
    assert_int_equal(f->status, 0);
    struct long_poll *lp = e->pg->sess.polls;
    assert_non_null(lp);
    poll_timeout(-1, EV_TIMEOUT, lp);
    assert_int_equal(f->status, 204);
    assert_int_equal(f->body.len, 0);
    fake_free(f);

    /* a client that leaves: freed, its lines stay for the next request */
    f = poll_start(e, NULL);
    f->req.on_close(&f->req, f->req.cb_arg);
    fake_free(f);
    assert_null(e->pg->sess.polls);
    push(e, "l");
    f = poll_start(e, NULL);
    expect_loglist(f, 200, "l");
    fake_free(f);

    /* a new Start: waiting requests are answered, the new session's cursor
     * starts again from the ring's backlog */
    f = poll_start(e, NULL);
    assert_int_equal(session_begin(e->pg, "127.0.0.1"), PN_OK);
    assert_int_equal(f->status, 204);
    fake_free(f);
    f = poll_start(e, NULL);
    expect_loglist(f, 200, "a,b,c");
    fake_free(f);

    /* Stop: a waiting request is answered */
    f = poll_start(e, NULL);
    expect_loglist(f, 200, "d,,e");
    fake_free(f);
    for (int i = 0; i < 3; i++)
        fake_free(poll_start(e, NULL)); /* drain f..l (answered at once) */
    f = poll_start(e, NULL);
    assert_int_equal(f->status, 0);
    int stopped = 0;
    assert_int_equal(pn_backend_stop(e->b, stop_cb, &stopped, NULL), PN_OK);
    spin(e);
    assert_int_equal(f->status, 204);
    fake_free(f);

    /* the node stops with a request waiting: answered, not left open */
    assert_int_equal(session_begin(e->pg, "127.0.0.1"), PN_OK);
    for (int i = 0; i < 5; i++)
        fake_free(poll_start(e, NULL)); /* drain the backlog of 13 lines */
    f = poll_start(e, NULL);
    assert_int_equal(f->status, 0);
    pn_pasarguard_end_streams(e->pg);
    assert_int_equal(f->status, 204);
    fake_free(f);
}

/* Without MAX_LOG_PER_REQUEST in the environment, /logs streams unless the
 * client asks for protobuf. */
static void test_long_poll_selection(void **state)
{
    struct env *e = *state;
    assert_int_equal(session_begin(e->pg, "127.0.0.1"), PN_OK);
    push(e, "a");
    struct fake_req *f = poll_start(e, "*/*");
    assert_int_equal(f->status, 200);
    assert_string_equal(f->ctype, "text/event-stream");
    spin(e);
    expect_body(f, "a\n");
    f->req.on_close(&f->req, f->req.cb_arg);
    fake_free(f);
    f = poll_start(e, "text/plain, Application/X-Protobuf");
    expect_loglist(f, 200, "a");
    fake_free(f);

    /* the pasarguard profile never long-polls */
    e->pg->session_mode = false;
    f = poll_start(e, "application/x-protobuf");
    assert_string_equal(f->ctype, "text/event-stream");
    f->req.on_close(&f->req, f->req.cb_arg);
    fake_free(f);
    e->pg->session_mode = true;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunks_in_order),
        cmocka_unit_test(test_chunks_out_of_order_and_same_index),
        cmocka_unit_test(test_chunks_last_may_arrive_early),
        cmocka_unit_test(test_chunks_empty_middle_chunk_counts),
        cmocka_unit_test(test_chunks_trailing_bytes_ignored),
        cmocka_unit_test(test_chunks_zero_length_frames_skipped),
        cmocka_unit_test(test_chunks_missing_last),
        cmocka_unit_test(test_chunks_gap),
        cmocka_unit_test(test_chunks_empty_sync),
        cmocka_unit_test(test_chunks_garbage),
        cmocka_unit_test(test_chunks_bad_length),
        cmocka_unit_test(test_chunks_short_payload),
        cmocka_unit_test(test_stat_split),
        cmocka_unit_test(test_pack_stats_filters_kind),
        cmocka_unit_test(test_user_presence),
        cmocka_unit_test(test_core_error_map),
        cmocka_unit_test_setup_teardown(test_rest_routes_and_guard, env_setup, env_teardown),
        cmocka_unit_test_setup_teardown(test_rest_start_errors, env_setup, env_teardown),
        cmocka_unit_test_setup_teardown(test_logs_stream, env_setup, env_teardown),
        cmocka_unit_test_setup_teardown(test_logs_end_when_blocked_and_on_free, env_setup,
                                        env_teardown),
        cmocka_unit_test_setup_teardown(test_logs_batches, env_setup_ring16, env_teardown),
        cmocka_unit_test(test_session_rest_checks),
        cmocka_unit_test(test_session_grpc_checks),
        cmocka_unit_test(test_go_quote),
        cmocka_unit_test_setup_teardown(test_session_rest_flow, env_setup_session, env_teardown),
        cmocka_unit_test_setup_teardown(test_long_poll, env_setup_session_poll, env_teardown),
        cmocka_unit_test_setup_teardown(test_long_poll_selection, env_setup_session, env_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
