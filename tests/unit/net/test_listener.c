/* Listener tests over real loopback TCP: a TLS listener with a generated
 * certificate runs its event loop in a second thread while the test probes
 * it with blocking sockets, as the Marzban panel does (a plaintext
 * `HEAD / HTTP/1.0` that must see data or an empty read, never a reset;
 * marzban spec 1.4), and with an OpenSSL client for HTTP and WebSocket. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <ftw.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/time.h"
#include "net/listener.h"
#include "net/tls.h"
#include "net/ws.h"

struct fx {
    char dir[64];
    struct event_base *base;
    struct event *tick;
    struct pn_http_server srv;
    struct pn_tls *tls;
    struct pn_listener *l;
    uint16_t port;
    pthread_t thread;
    atomic_bool stop;
    atomic_int nreq;
    atomic_int nws_close;
    atomic_bool want_shutdown; /* the loop thread calls pn_listener_shutdown */
    atomic_size_t conn_count;  /* published by the loop thread */
};

/* ---- the server side (runs in the loop thread) ------------------------------ */

static void ws_closed(struct pn_ws *ws, void *arg)
{
    (void)ws;
    struct fx *f = arg;
    atomic_fetch_add(&f->nws_close, 1);
}

static void on_request(struct pn_req *req, void *arg)
{
    struct fx *f = arg;
    atomic_fetch_add(&f->nreq, 1);
    if (strcmp(req->path, "/ws") == 0) {
        static const struct pn_ws_cbs cbs = {ws_closed, NULL};
        struct pn_ws *ws = pn_ws_accept(req, &cbs, f);
        if (ws) {
            pn_ws_send_text(ws, "hi", 2);
            pn_ws_close(ws, 1000, "done");
        }
        return;
    }
    pn_req_respond_text(req, 200, "ok");
}

/* Runs in the loop thread every 5 ms: the test thread's requests. */
static void tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct fx *f = arg;
    if (atomic_exchange(&f->want_shutdown, false))
        pn_listener_shutdown(f->l);
    atomic_store(&f->conn_count, pn_listener_conn_count(f->l));
}

static void *loop_main(void *arg)
{
    struct fx *f = arg;
    while (!atomic_load(&f->stop))
        event_base_loop(f->base, EVLOOP_ONCE);
    return NULL;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static struct fx *fx_start(unsigned handshake_timeout_ms)
{
    struct fx *f = pn_new(struct fx);
    snprintf(f->dir, sizeof f->dir, "/tmp/pn_test_listener_XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    char *cert = pn_asprintf("%s/cert.pem", f->dir);
    char *key = pn_asprintf("%s/key.pem", f->dir);
    static const char *const names[] = {"127.0.0.1"};
    struct pn_cert_opts co = {.cn = "Gozargah", .names = names, .nnames = 1};
    char err[256] = "";
    if (pn_tls_generate_cert(cert, key, &co, err, sizeof err) != PN_OK)
        fail_msg("generate: %s", err);
    struct pn_tls_opts to = {.cert_file = cert, .key_file = key};
    if (pn_tls_new(&to, &f->tls, err, sizeof err) != PN_OK)
        fail_msg("tls: %s", err);
    free(cert);
    free(key);

    f->base = event_base_new();
    f->tick = event_new(f->base, -1, EV_PERSIST, tick, f);
    struct timeval tv = {0, 5000};
    event_add(f->tick, &tv);
    f->srv.base = f->base;
    f->srv.on_request = on_request;
    f->srv.arg = f;
    f->srv.max_body = 1 << 20;
    f->srv.max_header = 8192;
    f->srv.idle_timeout_ms = 5000;
    f->srv.header_timeout_ms = 5000;
    struct pn_listener_opts lo = {.host = "127.0.0.1",
                                  .tls = f->tls,
                                  .srv = &f->srv,
                                  .handshake_timeout_ms = handshake_timeout_ms};
    if (pn_listener_new(&lo, &f->l, err, sizeof err) != PN_OK)
        fail_msg("listen: %s", err);
    f->port = pn_listener_port(f->l);
    assert_int_equal(pthread_create(&f->thread, NULL, loop_main, f), 0);
    return f;
}

static void fx_stop(struct fx *f)
{
    atomic_store(&f->stop, true);
    pthread_join(f->thread, NULL);
    pn_listener_free(f->l);
    event_free(f->tick);
    event_base_free(f->base);
    pn_tls_free(f->tls);
    nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
}

/* ---- the client side (the test thread) ---------------------------------------- */

static int connect_to(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    return fd;
}

struct probe_result {
    int err;     /* errno of a failed recv, 0 when it ended with EOF */
    size_t got;  /* bytes before EOF (a TLS alert) */
    uint64_t ms; /* from the send to EOF */
};

/* Sends data and reads until EOF or an error, as the panel's probe does. */
static struct probe_result probe_fd(int fd, const void *data, size_t len)
{
    struct probe_result r = {0};
    uint64_t t0 = pn_now_ms();
    if (len)
        assert_int_equal(send(fd, data, len, MSG_NOSIGNAL), (ssize_t)len);
    char buf[4096];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n > 0) {
            r.got += (size_t)n;
            continue;
        }
        if (n < 0)
            r.err = errno;
        break;
    }
    r.ms = pn_now_ms() - t0;
    return r;
}

static void expect_fin(const struct probe_result *r, uint64_t max_ms)
{
    if (r->err)
        fail_msg("recv failed: %s after %llu ms", strerror(r->err), (unsigned long long)r->ms);
    if (r->ms > max_ms)
        fail_msg("EOF after %llu ms", (unsigned long long)r->ms);
}

/* After our FIN the server must still be draining, not closed: more data
 * from the client then draws no reset (which would fail the second send
 * with EPIPE; recv keeps returning the EOF either way). */
static void expect_still_draining(int fd)
{
    assert_int_equal(send(fd, "more bytes", 10, MSG_NOSIGNAL), 10);
    usleep(30 * 1000);
    if (send(fd, "and more", 8, MSG_NOSIGNAL) != 8)
        fail_msg("second send after the FIN: %s", strerror(errno));
    usleep(10 * 1000);
    char b[64];
    ssize_t n = recv(fd, b, sizeof b, MSG_DONTWAIT);
    if (n < 0)
        fail_msg("after more data: %s", strerror(errno));
    assert_int_equal(n, 0);
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_head_probe_200_times(void **state)
{
    (void)state;
    struct fx *f = fx_start(0);
    static const char head[] = "HEAD / HTTP/1.0\r\n\r\n";
    uint64_t worst = 0;
    for (int i = 0; i < 200; i++) {
        int fd = connect_to(f->port);
        struct probe_result r = probe_fd(fd, head, sizeof head - 1);
        expect_fin(&r, 200);
        if (r.ms > worst)
            worst = r.ms;
        if (i % 50 == 0)
            expect_still_draining(fd);
        close(fd);
    }
    assert_true(worst <= 200);
    fx_stop(f);
}

static void test_garbage_and_wrong_version(void **state)
{
    (void)state;
    struct fx *f = fx_start(0);
    static const char *const probes[] = {
        "hello there, this is not TLS\r\n\r\n",
        "\x16\x09\x09\x00\x05hello",         /* a record with a bad version */
        "\x15\x03\x01\x00\x02\x02\x28",      /* the client's fatal alert */
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n", /* plain HTTP */
    };
    static const size_t lens[] = {32, 10, 7, 27};
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        int fd = connect_to(f->port);
        struct probe_result r = probe_fd(fd, probes[i], lens[i]);
        expect_fin(&r, 200);
        close(fd);
    }
    fx_stop(f);
}

static void test_handshake_timeout_fin(void **state)
{
    (void)state;
    struct fx *f = fx_start(150);
    int fd = connect_to(f->port);
    /* a record header cut short: the handshake waits, then times out */
    struct probe_result r = probe_fd(fd, "\x16\x03\x01\x00", 4);
    expect_fin(&r, 1000);
    assert_true(r.ms >= 100);
    expect_still_draining(fd);
    close(fd);
    /* silent client */
    fd = connect_to(f->port);
    r = probe_fd(fd, NULL, 0);
    expect_fin(&r, 1000);
    close(fd);
    fx_stop(f);
}

/* A TLS client (no verification: the test only checks the transport). */
static SSL *tls_connect(SSL_CTX **ctx, int fd)
{
    *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = SSL_new(*ctx);
    SSL_set_fd(ssl, fd);
    assert_int_equal(SSL_connect(ssl), 1);
    return ssl;
}

/* Reads until the peer closes; returns what came. */
static char *tls_read_all(SSL *ssl, size_t *len, bool *clean)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 1024 > cap)
            buf = realloc(buf, cap *= 2);
        int k = SSL_read(ssl, buf + n, (int)(cap - n - 1));
        if (k > 0) {
            n += (size_t)k;
            continue;
        }
        *clean = SSL_get_error(ssl, k) == SSL_ERROR_ZERO_RETURN;
        break;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

static void test_tls_http_connection_close(void **state)
{
    (void)state;
    struct fx *f = fx_start(0);
    int fd = connect_to(f->port);
    SSL_CTX *ctx;
    SSL *ssl = tls_connect(&ctx, fd);
    static const char req[] = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_int_equal(SSL_write(ssl, req, sizeof req - 1), (int)sizeof req - 1);
    size_t len;
    bool clean = false;
    char *resp = tls_read_all(ssl, &len, &clean);
    assert_non_null(strstr(resp, "HTTP/1.1 200 OK\r\n"));
    assert_non_null(strstr(resp, "\r\n\r\nok\n"));
    assert_true(clean); /* close_notify before the FIN */
    free(resp);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    ERR_clear_error();
    fx_stop(f);
}

static void test_tls_websocket(void **state)
{
    (void)state;
    struct fx *f = fx_start(0);
    int fd = connect_to(f->port);
    SSL_CTX *ctx;
    SSL *ssl = tls_connect(&ctx, fd);
    static const char req[] = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    assert_int_equal(SSL_write(ssl, req, sizeof req - 1), (int)sizeof req - 1);
    /* 101, a text frame "hi", then close 1000 "done"; answer the close */
    char buf[1024];
    size_t n = 0;
    const char *end = NULL;
    while (!end || (size_t)(buf + n - (end + 4)) < 4 + 8) {
        int k = SSL_read(ssl, buf + n, (int)(sizeof buf - n - 1));
        assert_true(k > 0);
        n += (size_t)k;
        buf[n] = '\0';
        end = strstr(buf, "\r\n\r\n");
    }
    assert_memory_equal(buf, "HTTP/1.1 101 Switching Protocols\r\n", 34);
    assert_non_null(strstr(buf, "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    const unsigned char *fr = (const unsigned char *)end + 4;
    assert_memory_equal(fr, "\x81\x02hi", 4);
    assert_memory_equal(fr + 4, "\x88\x06\x03\xe8\x64\x6f\x6e\x65", 8);
    static const unsigned char close_frame[] = {0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe8 ^ 2};
    assert_int_equal(SSL_write(ssl, close_frame, sizeof close_frame), (int)sizeof close_frame);
    size_t len;
    bool clean = false;
    char *rest = tls_read_all(ssl, &len, &clean);
    assert_int_equal(len, 0);
    assert_true(clean);
    free(rest);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    ERR_clear_error();
    for (int i = 0; i < 100 && atomic_load(&f->nws_close) == 0; i++)
        usleep(10 * 1000);
    assert_int_equal(atomic_load(&f->nws_close), 1);
    fx_stop(f);
}

static void test_shutdown_pending_fin(void **state)
{
    (void)state;
    struct fx *f = fx_start(0);
    int fd = connect_to(f->port);
    for (int i = 0; i < 100 && atomic_load(&f->conn_count) == 0; i++)
        usleep(5 * 1000);
    assert_int_equal(atomic_load(&f->conn_count), 1);
    atomic_store(&f->want_shutdown, true);
    struct probe_result r = probe_fd(fd, NULL, 0);
    expect_fin(&r, 200);
    expect_still_draining(fd);
    close(fd);
    for (int i = 0; i < 100 && atomic_load(&f->conn_count) > 0; i++)
        usleep(5 * 1000);
    assert_int_equal(atomic_load(&f->conn_count), 0); /* the drain saw our EOF */
    fx_stop(f);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_head_probe_200_times),
        cmocka_unit_test(test_garbage_and_wrong_version),
        cmocka_unit_test(test_handshake_timeout_fin),
        cmocka_unit_test(test_tls_http_connection_close),
        cmocka_unit_test(test_tls_websocket),
        cmocka_unit_test(test_shutdown_pending_fin),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
