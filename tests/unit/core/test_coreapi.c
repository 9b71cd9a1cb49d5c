/* The core API client against the real Debian v2ray 4.34 (started here on
 * free loopback ports with the cores.md §7 API config), plus loopback fakes
 * for what a healthy core never does: refuse, stay silent, drop the
 * connection, or answer with a broken gRPC reply. The .c is included to
 * reach the AddUser encoder and to lower the reply limit. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../../src/core/coreapi.c"

extern char **environ;

/* ---- the v2ray fixture ---------------------------------------------------- */

static struct {
    pid_t pid;
    uint16_t api, vless, vmess, trojan;
    char conf[64], log[80];
} core;

static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof sin), 0);
    socklen_t len = sizeof sin;
    getsockname(fd, (struct sockaddr *)&sin, &len);
    close(fd);
    return ntohs(sin.sin_port);
}

/* A listening socket nobody accepts on: connects complete (kernel backlog),
 * requests are swallowed, nothing ever answers. */
static int silent_listener(uint16_t *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof sin), 0);
    assert_int_equal(listen(fd, 16), 0);
    socklen_t len = sizeof sin;
    getsockname(fd, (struct sockaddr *)&sin, &len);
    *port = ntohs(sin.sin_port);
    return fd;
}

static bool port_accepts(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = {
        .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bool ok = connect(fd, (struct sockaddr *)&sin, sizeof sin) == 0;
    close(fd);
    return ok;
}

static void print_core_log(void)
{
    FILE *f = fopen(core.log, "r");
    char line[512];
    while (f && fgets(line, sizeof line, f))
        fprintf(stderr, "  v2ray: %s", line);
    if (f)
        fclose(f);
}

static int start_core(void **state)
{
    signal(SIGPIPE, SIG_IGN);
    if (access("/usr/bin/v2ray", X_OK) != 0) {
        fprintf(stderr, "/usr/bin/v2ray missing: apt-get install v2ray\n");
        return -1;
    }
    core.api = free_port();
    core.vless = free_port();
    core.vmess = free_port();
    core.trojan = free_port();
    snprintf(core.conf, sizeof core.conf, "/tmp/pn-capi-XXXXXX");
    int fd = mkstemp(core.conf);
    assert_true(fd >= 0);
    dprintf(fd,
            "{\"log\": {\"loglevel\": \"warning\"},\n"
            " \"api\": {\"tag\": \"api\", \"services\": [\"HandlerService\", \"StatsService\", "
            "\"LoggerService\"]},\n"
            " \"stats\": {},\n"
            " \"policy\": {\"levels\": {\"0\": {\"statsUserUplink\": true, "
            "\"statsUserDownlink\": true}},\n"
            "            \"system\": {\"statsInboundUplink\": true, \"statsInboundDownlink\": "
            "true, \"statsOutboundUplink\": true, \"statsOutboundDownlink\": true}},\n"
            " \"inbounds\": [\n"
            "  {\"tag\": \"api\", \"listen\": \"127.0.0.1\", \"port\": %u, \"protocol\": "
            "\"dokodemo-door\", \"settings\": {\"address\": \"127.0.0.1\"}},\n"
            "  {\"tag\": \"vless-in\", \"listen\": \"127.0.0.1\", \"port\": %u, \"protocol\": "
            "\"vless\", \"settings\": {\"clients\": [], \"decryption\": \"none\"}},\n"
            "  {\"tag\": \"vmess-in\", \"listen\": \"127.0.0.1\", \"port\": %u, \"protocol\": "
            "\"vmess\", \"settings\": {\"clients\": []}},\n"
            "  {\"tag\": \"trojan-in\", \"listen\": \"127.0.0.1\", \"port\": %u, \"protocol\": "
            "\"trojan\", \"settings\": {\"clients\": []}}],\n"
            " \"outbounds\": [{\"tag\": \"direct\", \"protocol\": \"freedom\", \"settings\": "
            "{}}],\n"
            " \"routing\": {\"rules\": [{\"type\": \"field\", \"inboundTag\": [\"api\"], "
            "\"outboundTag\": \"api\"}]}}\n",
            core.api, core.vless, core.vmess, core.trojan);
    close(fd);
    snprintf(core.log, sizeof core.log, "%s.log", core.conf);

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, core.log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    char *argv[] = {"/usr/bin/v2ray", "-config", core.conf, NULL};
    int rv = posix_spawn(&core.pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    assert_int_equal(rv, 0);

    for (int i = 0; i < 500; i++) {
        if (waitpid(core.pid, NULL, WNOHANG) == core.pid) {
            core.pid = 0;
            break;
        }
        if (port_accepts(core.api) && port_accepts(core.vless))
            return 0;
        usleep(10 * 1000);
    }
    fprintf(stderr, "v2ray did not come up:\n");
    print_core_log();
    return -1;
}

static int stop_core(void **state)
{
    if (core.pid > 0) {
        kill(core.pid, SIGTERM);
        waitpid(core.pid, NULL, 0);
        core.pid = 0;
    }
    unlink(core.conf);
    unlink(core.log);
    return 0;
}

/* ---- loop helpers ----------------------------------------------------------- */

struct res {
    int n;
    int rv;
    int grpc_code;
    char msg[256];
    size_t len;
};

static void on_res(const struct pn_coreapi_result *r, void *arg)
{
    struct res *x = arg;
    x->n++;
    x->rv = r->rv;
    x->grpc_code = r->grpc_code;
    x->len = r->len;
    assert_non_null(r->message);
    snprintf(x->msg, sizeof x->msg, "%s", r->message);
}

static uint64_t now_ms(void)
{
    return pn_now_ms();
}

/* Runs the loop until *count reaches want or timeout_ms pass. */
static void run_until(struct event_base *base, const int *count, int want, unsigned timeout_ms)
{
    uint64_t end = now_ms() + timeout_ms;
    struct timeval tick = {0, 20 * 1000};
    while (*count < want && now_ms() < end) {
        event_base_loopexit(base, &tick);
        event_base_dispatch(base);
    }
}

/* Runs the loop for ms regardless. */
static void run_for(struct event_base *base, unsigned ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
}

/* Runs the loop until the client's connection reaches lfd, then accepts it
 * (lfd is blocking: accepting before the client connected would hang). */
static int accept_conn(struct event_base *base, int lfd)
{
    for (int i = 0; i < 300; i++) {
        struct pollfd p = {lfd, POLLIN, 0};
        if (poll(&p, 1, 0) == 1)
            return accept(lfd, NULL, NULL);
        run_for(base, 10);
    }
    fail_msg("the client never connected");
    return -1;
}

/* ---- encoding --------------------------------------------------------------- */

static int unhex(const char *hex, uint8_t *out)
{
    int n = 0;
    while (*hex) {
        while (*hex == ' ')
            hex++;
        if (!*hex)
            break;
        unsigned v;
        sscanf(hex, "%2x", &v);
        out[n++] = (uint8_t)v;
        hex += 2;
    }
    return n;
}

static void test_encode_example(void **state)
{
    /* cores.md §3, measured on v2ray 4.34. */
    uint8_t want[256];
    size_t pos = 0;
    pos += (size_t)unhex("0a 08", want + pos);
    memcpy(want + pos, "vmess-in", 8), pos += 8;
    pos += (size_t)unhex("12 8f 01 0a 30", want + pos);
    memcpy(want + pos, "v2ray.core.app.proxyman.command.AddUserOperation", 48), pos += 48;
    pos += (size_t)unhex("12 5b 0a 59 12 0d", want + pos);
    memcpy(want + pos, "rt-vmess@test", 13), pos += 13;
    pos += (size_t)unhex("1a 48 0a 1e", want + pos);
    memcpy(want + pos, "v2ray.core.proxy.vmess.Account", 30), pos += 30;
    pos += (size_t)unhex("12 26 0a 24", want + pos);
    memcpy(want + pos, "33333333-3333-3333-3333-333333333333", 36), pos += 36;

    struct pn_core_account a = {.proto = PN_CORE_PROTO_VMESS,
                                .id = "33333333-3333-3333-3333-333333333333"};
    size_t n;
    uint8_t *b = encode_add_user(PN_CORE_V2RAY, "vmess-in", "rt-vmess@test", 0, &a, &n);
    assert_non_null(b);
    assert_int_equal(n, pos + 5);
    assert_int_equal(b[0], 0);
    assert_int_equal((b[1] << 24) | (b[2] << 16) | (b[3] << 8) | b[4], pos);
    assert_memory_equal(b + 5, want, pos);
    free(b);

    /* The Xray form: same structure, xray.* strings. */
    b = encode_add_user(PN_CORE_XRAY, "vmess-in", "rt-vmess@test", 0, &a, &n);
    assert_non_null(b);
    assert_non_null(memmem(b, n, "xray.app.proxyman.command.AddUserOperation", 42));
    assert_non_null(memmem(b, n, "\x0a\x18xray.proxy.vmess.Account", 26));
    assert_null(memmem(b, n, "v2ray", 5));
    free(b);

    /* Shadowsocks carries the dialect's cipher number; what a core lacks is
     * refused before any bytes exist. */
    struct pn_core_account ss = {
        .proto = PN_CORE_PROTO_SHADOWSOCKS, .password = "pw", .method = "aes-256-gcm"};
    b = encode_add_user(PN_CORE_XRAY, "ss", "e", 0, &ss, &n);
    assert_non_null(memmem(b, n, "\x0a\x02pw\x10\x06", 6)); /* Xray AES_256_GCM = 6 */
    free(b);
    b = encode_add_user(PN_CORE_V2RAY, "ss", "e", 0, &ss, &n);
    assert_non_null(memmem(b, n, "\x0a\x02pw\x10\x02", 6)); /* v2ray AES_256_GCM = 2 */
    free(b);
    ss.method = "xchacha20-poly1305";
    assert_null(encode_add_user(PN_CORE_V2RAY, "ss", "e", 0, &ss, &n));
    struct pn_core_account k = {.proto = PN_CORE_PROTO_SS2022, .key = "a2V5"};
    assert_null(encode_add_user(PN_CORE_V2RAY, "ss", "e", 0, &k, &n));
    b = encode_add_user(PN_CORE_XRAY, "ss", "e", 0, &k, &n);
    assert_non_null(memmem(b, n, "xray.proxy.shadowsocks_2022.Account", 35));
    free(b);
    struct pn_core_account vl = {.proto = PN_CORE_PROTO_VLESS,
                                 .id = "33333333-3333-3333-3333-333333333333",
                                 .flow = "xtls-rprx-vision"};
    b = encode_add_user(PN_CORE_XRAY, "v", "e", 7, &vl, &n);
    assert_non_null(memmem(b, n, "\x12\x10xtls-rprx-vision", 18));
    assert_non_null(memmem(b, n,
                           "\x08\x07\x12\x01"
                           "e",
                           5)); /* level 7, email */
    free(b);
}

static void test_percent_decode(void **state)
{
    const char *in = "User a%40b already exists.%zz%4";
    char *s = percent_decode((const uint8_t *)in, strlen(in));
    assert_string_equal(s, "User a@b already exists.%zz%4");
    free(s);
}

/* ---- against v2ray ------------------------------------------------------------ */

static struct event_base *g_base;
static struct pn_coreapi *g_api;

static int api_setup(void **state)
{
    g_base = event_base_new();
    g_api = pn_coreapi_new(g_base, core.api, PN_CORE_V2RAY);
    return 0;
}

static int api_teardown(void **state)
{
    pn_coreapi_free(g_api);
    event_base_free(g_base);
    g_api = NULL;
    g_base = NULL;
    return 0;
}

static const struct pn_core_account *acct_vless(const char *id)
{
    static struct pn_core_account a;
    a = (struct pn_core_account){.proto = PN_CORE_PROTO_VLESS, .id = id};
    return &a;
}

static struct res add_user(const char *tag, const char *email, const struct pn_core_account *a)
{
    struct res r = {0};
    assert_int_equal(pn_coreapi_add_user(g_api, tag, email, 0, a, 3000, on_res, &r), PN_OK);
    run_until(g_base, &r.n, 1, 5000);
    assert_int_equal(r.n, 1);
    return r;
}

static struct res remove_user(const char *tag, const char *email)
{
    struct res r = {0};
    assert_int_equal(pn_coreapi_remove_user(g_api, tag, email, 3000, on_res, &r), PN_OK);
    run_until(g_base, &r.n, 1, 5000);
    assert_int_equal(r.n, 1);
    return r;
}

static void test_users(void **state)
{
    struct pn_core_account vm = {.proto = PN_CORE_PROTO_VMESS,
                                 .id = "22222222-2222-2222-2222-222222222222"};
    struct pn_core_account tr = {.proto = PN_CORE_PROTO_TROJAN, .password = "secret-pw"};

    struct res r =
        add_user("vless-in", "u-vless@test", acct_vless("11111111-1111-1111-1111-111111111111"));
    assert_int_equal(r.rv, PN_OK);
    assert_int_equal(r.grpc_code, 0);
    assert_int_equal(r.len, 0); /* AlterInboundResponse{} */
    r = add_user("vmess-in", "u-vmess@test", &vm);
    assert_int_equal(r.rv, PN_OK);
    r = add_user("trojan-in", "u-trojan@test", &tr);
    assert_int_equal(r.rv, PN_OK);

    r = add_user("vless-in", "U-VLESS@test", acct_vless("11111111-1111-1111-1111-111111111112"));
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_int_equal(r.grpc_code, 2); /* v2ray: UNKNOWN for every handler error */
    assert_non_null(strstr(r.msg, "already exists"));

    r = remove_user("vless-in", "nobody@test");
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_non_null(strstr(r.msg, "not found"));

    r = add_user("no-such-tag", "x@test", acct_vless("11111111-1111-1111-1111-111111111113"));
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_non_null(strstr(r.msg, "handler not found"));

    /* Shadowsocks with a cipher v2ray lacks: refused without a call. */
    struct res never = {0};
    struct pn_core_account ss = {
        .proto = PN_CORE_PROTO_SHADOWSOCKS, .password = "pw", .method = "xchacha20-poly1305"};
    assert_int_equal(pn_coreapi_add_user(g_api, "vless-in", "ss@test", 0, &ss, 0, on_res, &never),
                     PN_ERR_INVAL);
    struct pn_core_account hy = {.proto = PN_CORE_PROTO_HYSTERIA, .auth = "x"};
    assert_int_equal(pn_coreapi_add_user(g_api, "vless-in", "hy@test", 0, &hy, 0, on_res, &never),
                     PN_ERR_INVAL);
    assert_int_equal(pn_coreapi_pending(g_api), 0);
    run_for(g_base, 20);
    assert_int_equal(never.n, 0);

    /* A classic cipher is encoded and sent; v2ray's single-user SS answers
     * with its own error (here the inbound is vless, so it is not SS). */
    r = remove_user("vless-in", "u-vless@test");
    assert_int_equal(r.rv, PN_OK);
    r = remove_user("vless-in", "u-vless@test");
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_non_null(strstr(r.msg, "not found"));
    assert_int_equal(pn_coreapi_pending(g_api), 0);
}

struct bulk {
    int n, ok;
    int first_rv;
    char first_msg[200];
};

static void on_bulk(const struct pn_coreapi_result *r, void *arg)
{
    struct bulk *b = arg;
    b->n++;
    if (r->rv == PN_OK) {
        b->ok++;
    } else if (b->first_rv == 0) {
        b->first_rv = r->rv;
        snprintf(b->first_msg, sizeof b->first_msg, "%s", r->message);
    }
}

static void test_bulk_adds(void **state)
{
    enum { N = 5000 };
    struct bulk b = {0};
    uint64_t t0 = now_ms();
    for (int i = 0; i < N; i++) {
        char email[48], id[40];
        snprintf(email, sizeof email, "bulk-%d@test", i);
        snprintf(id, sizeof id, "%08x-0000-4000-8000-%012x", 0xb0000000u + (unsigned)i,
                 (unsigned)i);
        struct pn_core_account a = {.proto = PN_CORE_PROTO_VLESS, .id = id};
        assert_int_equal(pn_coreapi_add_user(g_api, "vless-in", email, 0, &a, 30000, on_bulk, &b),
                         PN_OK);
    }
    assert_int_equal(pn_coreapi_pending(g_api), N);
    run_until(g_base, &b.n, N, 30000);
    uint64_t t1 = now_ms();
    if (b.ok != N)
        fprintf(stderr, "first failure: %d %s\n", b.first_rv, b.first_msg);
    assert_int_equal(b.n, N);
    assert_int_equal(b.ok, N);
    double secs = (double)(t1 - t0) / 1000.0;
    printf("    %d vless AddUser in flight at once: %.3f s, %.0f adds/s\n", N, secs,
           N / (secs > 0 ? secs : 0.001));

    memset(&b, 0, sizeof b);
    t0 = now_ms();
    for (int i = 0; i < N; i++) {
        char email[48];
        snprintf(email, sizeof email, "bulk-%d@test", i);
        assert_int_equal(pn_coreapi_remove_user(g_api, "vless-in", email, 30000, on_bulk, &b),
                         PN_OK);
    }
    run_until(g_base, &b.n, N, 30000);
    t1 = now_ms();
    assert_int_equal(b.ok, N);
    secs = (double)(t1 - t0) / 1000.0;
    printf("    %d vless RemoveUser in flight at once: %.3f s, %.0f removes/s\n", N, secs,
           N / (secs > 0 ? secs : 0.001));
    assert_int_equal(pn_coreapi_pending(g_api), 0);
}

struct stats_res {
    int n;
    int rv;
    char msg[200];
    size_t count;
    char names[64][96];
    int64_t values[64];
    bool api_seen, vless_in_seen;
};

static void on_stats(const struct pn_coreapi_result *r, const struct pn_core_stat *st, size_t n,
                     void *arg)
{
    struct stats_res *x = arg;
    x->n++;
    x->rv = r->rv;
    snprintf(x->msg, sizeof x->msg, "%s", r->message);
    x->count = n;
    x->api_seen = x->vless_in_seen = false;
    for (size_t i = 0; i < n; i++) {
        if (i < 64) {
            snprintf(x->names[i], sizeof x->names[i], "%s", st[i].name);
            x->values[i] = st[i].value;
        }
        if (strncmp(st[i].name, "inbound>>>api>>>traffic>>>", 26) == 0)
            x->api_seen = true;
        if (strcmp(st[i].name, "inbound>>>vless-in>>>traffic>>>uplink") == 0)
            x->vless_in_seen = true;
    }
}

static struct stats_res query(const char *pattern, bool reset)
{
    struct stats_res s = {0};
    assert_int_equal(pn_coreapi_query_stats(g_api, pattern, reset, 3000, on_stats, &s), PN_OK);
    run_until(g_base, &s.n, 1, 5000);
    assert_int_equal(s.n, 1);
    return s;
}

static int64_t stat_value(const struct stats_res *s, const char *name)
{
    for (size_t i = 0; i < s->count && i < 64; i++)
        if (strcmp(s->names[i], name) == 0)
            return s->values[i];
    return -1;
}

/* Sends `hello` through vless-in as the given user to a listener here, and
 * answers `world!`, so the user's counters exist with known payload sizes. */
static void vless_roundtrip(const uint8_t uuid[16])
{
    uint16_t tport;
    int lfd = silent_listener(&tport);
    int cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET,
                              .sin_port = htons(core.vless),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(cfd, (struct sockaddr *)&sin, sizeof sin), 0);
    uint8_t req[64];
    size_t n = 0;
    req[n++] = 0; /* version */
    memcpy(req + n, uuid, 16), n += 16;
    req[n++] = 0; /* addons */
    req[n++] = 1; /* tcp */
    req[n++] = (uint8_t)(tport >> 8);
    req[n++] = (uint8_t)tport;
    req[n++] = 1; /* IPv4 */
    req[n++] = 127, req[n++] = 0, req[n++] = 0, req[n++] = 1;
    memcpy(req + n, "hello", 5), n += 5;
    assert_int_equal(write(cfd, req, n), (ssize_t)n);

    struct pollfd p = {lfd, POLLIN, 0};
    assert_int_equal(poll(&p, 1, 3000), 1);
    int sfd = accept(lfd, NULL, NULL);
    assert_true(sfd >= 0);
    char buf[16] = {0};
    size_t got = 0;
    while (got < 5) {
        p = (struct pollfd){sfd, POLLIN, 0};
        assert_int_equal(poll(&p, 1, 3000), 1);
        ssize_t r = read(sfd, buf + got, 5 - got);
        assert_true(r > 0);
        got += (size_t)r;
    }
    assert_memory_equal(buf, "hello", 5);
    assert_int_equal(write(sfd, "world!", 6), 6);
    close(sfd);
    close(lfd);

    uint8_t resp[16];
    got = 0;
    while (got < 8) {
        p = (struct pollfd){cfd, POLLIN, 0};
        assert_int_equal(poll(&p, 1, 3000), 1);
        ssize_t r = read(cfd, resp + got, 8 - got);
        assert_true(r > 0);
        got += (size_t)r;
    }
    assert_memory_equal(resp, "\0\0world!", 8);
    close(cfd);
}

static void test_query_stats(void **state)
{
    /* A few calls so the API's own dokodemo inbound has counted traffic. */
    struct stats_res s = query("", false);
    s = query("", false);
    assert_int_equal(s.rv, PN_OK);
    assert_true(s.api_seen);
    assert_true(s.vless_in_seen);

    const uint8_t uuid[16] = {0x44, 0x44, 0x44, 0x44, 0x44, 0x44, 0x44, 0x44,
                              0x44, 0x44, 0x44, 0x44, 0x44, 0x44, 0x44, 0x44};
    struct res r =
        add_user("vless-in", "stat@test", acct_vless("44444444-4444-4444-4444-444444444444"));
    assert_int_equal(r.rv, PN_OK);
    s = query("user>>>stat@test>>>", false);
    assert_int_equal(s.rv, PN_OK);
    assert_int_equal(s.count, 0); /* lazy: no counters before traffic */

    vless_roundtrip(uuid);
    s = query("user>>>stat@test>>>", false);
    assert_int_equal(s.rv, PN_OK);
    assert_int_equal(s.count, 2);
    int64_t up = stat_value(&s, "user>>>stat@test>>>traffic>>>uplink");
    int64_t down = stat_value(&s, "user>>>stat@test>>>traffic>>>downlink");
    assert_true(up >= 5);
    assert_true(down >= 6);

    /* reset=true returns the old values and zeroes them. */
    s = query("user>>>stat@test>>>", true);
    assert_int_equal(s.rv, PN_OK);
    assert_int_equal(stat_value(&s, "user>>>stat@test>>>traffic>>>uplink"), up);
    assert_int_equal(stat_value(&s, "user>>>stat@test>>>traffic>>>downlink"), down);
    s = query("user>>>stat@test>>>", false);
    assert_int_equal(s.rv, PN_OK);
    assert_int_equal(s.count, 2);
    assert_int_equal(s.values[0], 0);
    assert_int_equal(s.values[1], 0);
    assert_int_equal(remove_user("vless-in", "stat@test").rv, PN_OK);
}

static void test_reply_limit(void **state)
{
    /* With the limit lowered below the reply, the stream is cancelled and the
     * connection stays usable. */
    g_api->max_reply = 16;
    struct stats_res s = query("", false);
    assert_int_equal(s.rv, PN_ERR_TOOBIG);
    assert_int_equal(s.count, 0);
    g_api->max_reply = COREAPI_MAX_REPLY;
    s = query("", false);
    assert_int_equal(s.rv, PN_OK);
    assert_true(s.count > 2);
}

struct sys_res {
    int n, rv;
    bool have;
    struct pn_core_sys_stats s;
};

static void on_sys(const struct pn_coreapi_result *r, const struct pn_core_sys_stats *s, void *arg)
{
    struct sys_res *x = arg;
    x->n++;
    x->rv = r->rv;
    x->have = s != NULL;
    if (s)
        x->s = *s;
}

static void test_sys_stats(void **state)
{
    struct sys_res x = {0};
    assert_int_equal(pn_coreapi_sys_stats(g_api, 3000, on_sys, &x), PN_OK);
    run_until(g_base, &x.n, 1, 5000);
    assert_int_equal(x.n, 1);
    assert_int_equal(x.rv, PN_OK);
    assert_true(x.have);
    assert_true(x.s.num_goroutine > 0);
    assert_true(x.s.alloc > 0);
    assert_true(x.s.total_alloc >= x.s.alloc);
    assert_true(x.s.sys >= x.s.alloc);
    assert_true(x.s.mallocs >= x.s.frees);
    assert_true(x.s.uptime < 600);
}

struct online_res {
    int n, rv, grpc_code;
    int64_t value;
    char msg[200];
};

static void on_online(const struct pn_coreapi_result *r, int64_t value, void *arg)
{
    struct online_res *x = arg;
    x->n++;
    x->rv = r->rv;
    x->grpc_code = r->grpc_code;
    x->value = value;
    snprintf(x->msg, sizeof x->msg, "%s", r->message);
}

static void on_iplist(const struct pn_coreapi_result *r, const struct pn_core_online_ip *ips,
                      size_t n, void *arg)
{
    struct online_res *x = arg;
    x->n++;
    x->rv = r->rv;
    x->grpc_code = r->grpc_code;
    x->value = (int64_t)n;
    assert_true(ips == NULL || r->rv == PN_OK);
}

static void test_online_unimplemented(void **state)
{
    struct online_res x = {0};
    assert_int_equal(pn_coreapi_stats_online(g_api, "user>>>a@test>>>online", 3000, on_online, &x),
                     PN_OK);
    run_until(g_base, &x.n, 1, 5000);
    assert_int_equal(x.n, 1);
    assert_int_equal(x.rv, PN_ERR_PROTO);
    assert_int_equal(x.grpc_code, 12);
    assert_int_equal(x.value, 0);
    memset(&x, 0, sizeof x);
    assert_int_equal(
        pn_coreapi_stats_online_iplist(g_api, "user>>>a@test>>>online", 3000, on_iplist, &x),
        PN_OK);
    run_until(g_base, &x.n, 1, 5000);
    assert_int_equal(x.rv, PN_ERR_PROTO);
    assert_int_equal(x.grpc_code, 12);
}

static void test_raw_and_remove_inbound(void **state)
{
    /* A raw call: LoggerService.RestartLogger with an empty request. */
    struct res r = {0};
    char path[128];
    pn_dialect_path(PN_CORE_V2RAY, PN_SVC_LOGGER, "RestartLogger", path, sizeof path);
    assert_int_equal(pn_coreapi_call(g_api, path, NULL, 0, 3000, on_res, &r), PN_OK);
    run_until(g_base, &r.n, 1, 5000);
    assert_int_equal(r.rv, PN_OK);
    assert_int_equal(pn_coreapi_call(g_api, "no-slash", NULL, 0, 0, on_res, &r), PN_ERR_INVAL);

    memset(&r, 0, sizeof r);
    assert_int_equal(pn_coreapi_remove_inbound(g_api, "trojan-in", 3000, on_res, &r), PN_OK);
    run_until(g_base, &r.n, 1, 5000);
    assert_int_equal(r.rv, PN_OK);
    struct pn_core_account tr = {.proto = PN_CORE_PROTO_TROJAN, .password = "pw2"};
    r = add_user("trojan-in", "late@test", &tr);
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_non_null(strstr(r.msg, "handler not found"));
}

/* ---- failure paths without a core ---------------------------------------------- */

static void test_closed_port(void **state)
{
    struct event_base *base = event_base_new();
    struct pn_coreapi *api = pn_coreapi_new(base, free_port(), PN_CORE_V2RAY);
    struct res a = {0}, b = {0};
    assert_int_equal(pn_coreapi_remove_user(api, "vless-in", "x@test", 0, on_res, &a), PN_OK);
    assert_int_equal(pn_coreapi_remove_user(api, "vless-in", "y@test", 0, on_res, &b), PN_OK);
    run_until(base, &b.n, 1, 3000);
    assert_int_equal(a.n, 1);
    assert_int_equal(b.n, 1);
    assert_int_equal(a.rv, PN_ERR_IO);
    assert_int_equal(b.rv, PN_ERR_IO);
    assert_non_null(strstr(a.msg, "connect"));
    assert_int_equal(pn_coreapi_pending(api), 0);

    /* The next call tries again (and fails again). */
    memset(&a, 0, sizeof a);
    assert_int_equal(pn_coreapi_remove_user(api, "vless-in", "x@test", 0, on_res, &a), PN_OK);
    run_until(base, &a.n, 1, 3000);
    assert_int_equal(a.n, 1);
    assert_int_equal(a.rv, PN_ERR_IO);
    pn_coreapi_free(api);
    event_base_free(base);
}

static void test_timeout(void **state)
{
    uint16_t port;
    int lfd = silent_listener(&port);
    struct event_base *base = event_base_new();
    struct pn_coreapi *api = pn_coreapi_new(base, port, PN_CORE_V2RAY);
    struct res a = {0}, b = {0};
    uint64_t t0 = now_ms();
    assert_int_equal(pn_coreapi_remove_user(api, "t", "x@test", 200, on_res, &a), PN_OK);
    assert_int_equal(pn_coreapi_remove_user(api, "t", "y@test", 400, on_res, &b), PN_OK);
    run_until(base, &a.n, 1, 3000);
    uint64_t dt = now_ms() - t0;
    assert_int_equal(a.n, 1);
    assert_int_equal(a.rv, PN_ERR_TIMEOUT);
    assert_true(dt >= 190 && dt < 1500);
    assert_int_equal(b.n, 0);
    run_until(base, &b.n, 1, 3000);
    assert_int_equal(b.rv, PN_ERR_TIMEOUT);
    assert_int_equal(pn_coreapi_pending(api), 0);
    run_for(base, 20);
    assert_int_equal(a.n, 1);
    assert_int_equal(b.n, 1);
    /* Both streams were reset (and freed), the connection stays up. */
    assert_int_equal(api->inflight.n, 0);
    assert_non_null(api->sess);
    pn_coreapi_free(api);
    event_base_free(base);
    close(lfd);
}

static void test_connection_lost(void **state)
{
    uint16_t port;
    int lfd = silent_listener(&port);
    struct event_base *base = event_base_new();
    struct pn_coreapi *api = pn_coreapi_new(base, port, PN_CORE_V2RAY);
    for (int round = 0; round < 2; round++) {
        struct res a = {0};
        assert_int_equal(pn_coreapi_remove_user(api, "t", "x@test", 0, on_res, &a), PN_OK);
        int sfd = accept_conn(base, lfd);
        run_for(base, 20);
        assert_int_equal(a.n, 0);
        assert_true(sfd >= 0);
        close(sfd); /* unread request bytes: the client sees a reset */
        run_until(base, &a.n, 1, 3000);
        assert_int_equal(a.n, 1);
        assert_int_equal(a.rv, PN_ERR_IO);
        assert_non_null(strstr(a.msg, "lost"));
    }
    pn_coreapi_free(api);
    event_base_free(base);
    close(lfd);
}

static void test_free_pending(void **state)
{
    uint16_t port;
    int lfd = silent_listener(&port);
    struct event_base *base = event_base_new();

    /* Before the loop ever ran (nothing connected yet). */
    struct pn_coreapi *api = pn_coreapi_new(base, port, PN_CORE_V2RAY);
    struct res r[3] = {{0}};
    for (int i = 0; i < 3; i++)
        assert_int_equal(pn_coreapi_remove_user(api, "t", "x@test", 5000, on_res, &r[i]), PN_OK);
    assert_int_equal(pn_coreapi_pending(api), 3);
    pn_coreapi_free(api);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r[i].n, 1);
        assert_int_equal(r[i].rv, PN_ERR_CLOSED);
    }

    /* With streams in flight on a connected session. */
    api = pn_coreapi_new(base, port, PN_CORE_V2RAY);
    memset(r, 0, sizeof r);
    for (int i = 0; i < 3; i++)
        assert_int_equal(pn_coreapi_remove_user(api, "t", "x@test", 0, on_res, &r[i]), PN_OK);
    run_for(base, 50);
    assert_int_equal(r[0].n, 0);
    assert_int_equal(api->inflight.n, 3);
    pn_coreapi_free(api);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r[i].n, 1);
        assert_int_equal(r[i].rv, PN_ERR_CLOSED);
    }
    run_for(base, 20); /* nothing left to fire */
    for (int i = 0; i < 3; i++)
        assert_int_equal(r[i].n, 1);
    event_base_free(base);
    close(lfd);
}

/* Canned server frames: an empty SETTINGS, then one HEADERS frame
 * (END_STREAM) on stream 1 carrying hpack. Returns the length. */
static size_t canned_frames(uint8_t *out, const uint8_t *hpack, size_t hlen)
{
    size_t n = 0;
    const uint8_t settings[9] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
    memcpy(out, settings, 9), n += 9;
    out[n++] = 0, out[n++] = 0, out[n++] = (uint8_t)hlen;
    out[n++] = 1;    /* HEADERS */
    out[n++] = 0x05; /* END_STREAM | END_HEADERS */
    out[n++] = 0, out[n++] = 0, out[n++] = 0, out[n++] = 1;
    memcpy(out + n, hpack, hlen), n += hlen;
    return n;
}

/* A fake "core" that answers the first stream with canned frames. */
static struct res canned_reply(const uint8_t *hpack, size_t hlen)
{
    uint16_t port;
    int lfd = silent_listener(&port);
    struct event_base *base = event_base_new();
    struct pn_coreapi *api = pn_coreapi_new(base, port, PN_CORE_V2RAY);
    struct res r = {0};
    assert_int_equal(pn_coreapi_remove_user(api, "t", "x@test", 3000, on_res, &r), PN_OK);
    int sfd = accept_conn(base, lfd);
    assert_true(sfd >= 0);
    uint8_t out[256];
    size_t n = canned_frames(out, hpack, hlen);
    assert_int_equal(write(sfd, out, n), (ssize_t)n);
    run_until(base, &r.n, 1, 3000);
    assert_int_equal(r.n, 1);
    pn_coreapi_free(api);
    event_base_free(base);
    close(sfd);
    close(lfd);
    return r;
}

/* An HPACK literal header field without indexing, new name. */
static size_t hpack_lit(uint8_t *p, const char *name, const char *value)
{
    size_t n = 0, nl = strlen(name), vl = strlen(value);
    p[n++] = 0;
    p[n++] = (uint8_t)nl;
    memcpy(p + n, name, nl), n += nl;
    p[n++] = (uint8_t)vl;
    memcpy(p + n, value, vl), n += vl;
    return n;
}

static void test_bad_replies(void **state)
{
    uint8_t h[128];
    h[0] = 0x8d; /* :status 404 (static table) */
    struct res r = canned_reply(h, 1);
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_non_null(strstr(r.msg, "HTTP status 404"));

    h[0] = 0x88; /* :status 200, no grpc-status */
    r = canned_reply(h, 1);
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_string_equal(r.msg, "missing grpc-status");

    /* Trailers-only error reply with a percent-encoded message. */
    size_t n = 0;
    h[n++] = 0x88;
    n += hpack_lit(h + n, "grpc-status", "3");
    n += hpack_lit(h + n, "grpc-message", "User a%40b already exists.%zz");
    r = canned_reply(h, n);
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_int_equal(r.grpc_code, 3);
    assert_string_equal(r.msg, "User a@b already exists.%zz");

    /* grpc-status 0 but no message at all: not a valid unary reply. */
    n = 0;
    h[n++] = 0x88;
    n += hpack_lit(h + n, "grpc-status", "0");
    r = canned_reply(h, n);
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_non_null(strstr(r.msg, "without a message"));
}

/* GOAWAY(last_stream_id 0) refuses the unprocessed stream: the call is sent
 * again on a new connection and answered there, once. */
static void test_goaway_requeue(void **state)
{
    uint16_t port;
    int lfd = silent_listener(&port);
    struct event_base *base = event_base_new();
    struct pn_coreapi *api = pn_coreapi_new(base, port, PN_CORE_V2RAY);
    struct res r = {0};
    assert_int_equal(pn_coreapi_remove_user(api, "t", "x@test", 3000, on_res, &r), PN_OK);
    int s1 = accept_conn(base, lfd);
    assert_true(s1 >= 0);
    const uint8_t goaway[] = {0, 0, 0, 4, 0, 0, 0, 0, 0, /* SETTINGS */
                              0, 0, 8, 7, 0, 0, 0, 0, 0, /* GOAWAY */
                              0, 0, 0, 0, 0, 0, 0, 0};   /* last 0, NO_ERROR */
    assert_int_equal(write(s1, goaway, sizeof goaway), (ssize_t)sizeof goaway);
    int s2 = accept_conn(base, lfd);
    assert_int_equal(r.n, 0);
    assert_int_equal(pn_coreapi_pending(api), 1);
    assert_true(s2 >= 0);
    uint8_t h[64], out[128];
    size_t hn = 0;
    h[hn++] = 0x88;
    hn += hpack_lit(h + hn, "grpc-status", "5");
    hn += hpack_lit(h + hn, "grpc-message", "second connection");
    size_t n = canned_frames(out, h, hn);
    assert_int_equal(write(s2, out, n), (ssize_t)n);
    run_until(base, &r.n, 1, 3000);
    assert_int_equal(r.n, 1);
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_int_equal(r.grpc_code, 5);
    assert_string_equal(r.msg, "second connection");
    run_for(base, 20);
    assert_int_equal(r.n, 1);
    pn_coreapi_free(api);
    event_base_free(base);
    close(s1);
    close(s2);
    close(lfd);
}

static int call_in_callback_done;
static void on_chain(const struct pn_coreapi_result *r, void *arg)
{
    struct res *x = arg;
    on_res(r, x);
    /* Callbacks may start new calls. */
    if (x->n == 1 && call_in_callback_done == 0) {
        call_in_callback_done = 1;
        assert_int_equal(pn_coreapi_remove_user(g_api, "vless-in", "chain@test", 3000, on_chain, x),
                         PN_OK);
    }
}

static void test_call_from_callback(void **state)
{
    struct res r = {0};
    assert_int_equal(pn_coreapi_remove_user(g_api, "vless-in", "chain@test", 3000, on_chain, &r),
                     PN_OK);
    run_until(g_base, &r.n, 2, 5000);
    assert_int_equal(r.n, 2);
    assert_int_equal(r.rv, PN_ERR_PROTO);
    assert_non_null(strstr(r.msg, "not found"));
}

int main(void)
{
    const struct CMUnitTest offline[] = {
        cmocka_unit_test(test_encode_example),  cmocka_unit_test(test_percent_decode),
        cmocka_unit_test(test_closed_port),     cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_connection_lost), cmocka_unit_test(test_free_pending),
        cmocka_unit_test(test_bad_replies),     cmocka_unit_test(test_goaway_requeue),
    };
    const struct CMUnitTest with_core[] = {
        cmocka_unit_test_setup_teardown(test_users, api_setup, api_teardown),
        cmocka_unit_test_setup_teardown(test_bulk_adds, api_setup, api_teardown),
        cmocka_unit_test_setup_teardown(test_query_stats, api_setup, api_teardown),
        cmocka_unit_test_setup_teardown(test_reply_limit, api_setup, api_teardown),
        cmocka_unit_test_setup_teardown(test_sys_stats, api_setup, api_teardown),
        cmocka_unit_test_setup_teardown(test_online_unimplemented, api_setup, api_teardown),
        cmocka_unit_test_setup_teardown(test_call_from_callback, api_setup, api_teardown),
        cmocka_unit_test_setup_teardown(test_raw_and_remove_inbound, api_setup, api_teardown),
    };
    signal(SIGPIPE, SIG_IGN);
    int failed = cmocka_run_group_tests_name("coreapi offline", offline, NULL, NULL);
    failed += cmocka_run_group_tests_name("coreapi v2ray", with_core, start_core, stop_core);
    return failed;
}
