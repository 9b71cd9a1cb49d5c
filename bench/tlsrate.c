/* HTTPS request load against the node, T threads until the deadline.
 *
 * Default mode (new connections): each thread loops over TCP connect, a full
 * TLS handshake (no session cache, no tickets, so never a resumption), one
 * HTTP/1.1 request with `Connection: close`, read the answer until the node
 * closes, free.
 *
 * -K (keep-alive): each thread opens one connection and sends requests on it
 * back to back (one in flight per connection), reading each answer by its
 * Content-Length; a failed connection is replaced by a new one.
 *
 * run.py compiles it (cc tlsrate.c -lssl -lcrypto -lpthread).
 * Usage: tlsrate [-K] [-c CERT -k KEY] [-b BODY] PORT SECONDS THREADS PATH [API_KEY]
 *   -c/-k  client certificate and key (PEM), for mTLS (the Marzban profile)
 *   -b     send POST with this body (Content-Type: application/json), not GET
 *   API_KEY  sent as x-api-key when given and not empty
 * Prints one JSON line:
 * {"ok":N,"failed":N,"reused":N,"connections":N,"seconds":S}
 * ok/failed count requests (a 200 answer is ok); connections counts the
 * TLS handshakes that completed. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static SSL_CTX *ctx;
static int port;
static int keepalive;
static double deadline;
static char *request;
static size_t request_len;

struct counts {
    long ok, failed, reused, conns;
};

struct conn {
    int fd;
    SSL *ssl;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void conn_close(struct conn *k)
{
    if (k->ssl) {
        SSL_shutdown(k->ssl);
        SSL_free(k->ssl);
    }
    if (k->fd >= 0)
        close(k->fd);
    k->ssl = NULL;
    k->fd = -1;
}

/* TCP connect and a full handshake: 1 on success (k is open), 0 otherwise. */
static int conn_open(struct conn *k, struct counts *c)
{
    k->ssl = NULL;
    k->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (k->fd < 0)
        return 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one_ = 1;
    struct timeval tv = {.tv_sec = 5};
    setsockopt(k->fd, IPPROTO_TCP, TCP_NODELAY, &one_, sizeof one_);
    setsockopt(k->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(k->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(k->fd, (struct sockaddr *)&a, sizeof a) < 0) {
        conn_close(k);
        return 0;
    }
    k->ssl = SSL_new(ctx);
    SSL_set_fd(k->ssl, k->fd);
    SSL_set_tlsext_host_name(k->ssl, "localhost");
    if (SSL_connect(k->ssl) != 1) {
        ERR_clear_error();
        conn_close(k);
        return 0;
    }
    c->conns++;
    if (SSL_session_reused(k->ssl))
        c->reused++;
    return 1;
}

static int send_request(struct conn *k)
{
    return SSL_write(k->ssl, request, (int)request_len) == (int)request_len;
}

/* Reads one answer by its Content-Length (keep-alive): 1 on a 200 answer,
 * 0 on another status, -1 when the connection is unusable. */
static int read_answer(struct conn *k)
{
    char buf[16384];
    size_t got = 0;
    char *end = NULL;
    while (!end) {
        if (got == sizeof buf - 1)
            return -1;
        int n = SSL_read(k->ssl, buf + got, (int)(sizeof buf - 1 - got));
        if (n <= 0)
            return -1;
        got += (size_t)n;
        buf[got] = '\0';
        end = strstr(buf, "\r\n\r\n");
    }
    size_t head = (size_t)(end - buf) + 4;
    long clen = -1;
    for (char *p = strstr(buf, "\r\n"); p && p < end; p = strstr(p + 2, "\r\n")) {
        if (strncasecmp(p + 2, "content-length:", 15) == 0)
            clen = strtol(p + 17, NULL, 10);
    }
    if (clen < 0)
        return -1; /* every answer of the node carries one */
    size_t body = got - head;
    while (body < (size_t)clen) {
        int n = SSL_read(k->ssl, buf, sizeof buf);
        if (n <= 0)
            return -1;
        body += (size_t)n;
    }
    if (body != (size_t)clen)
        return -1; /* more than one answer: the client never pipelines */
    return strncmp(buf, "HTTP/1.1 200", 12) == 0;
}

/* One new connection, one request, read to EOF: 1 on a 200 answer. */
static int one_close(struct counts *c)
{
    struct conn k;
    int ok = 0;
    if (!conn_open(&k, c))
        return 0;
    if (send_request(&k)) {
        char buf[4096];
        size_t got = 0;
        int n;
        char head[16] = {0};
        while ((n = SSL_read(k.ssl, buf, sizeof buf)) > 0) {
            if (got < sizeof head - 1) {
                size_t m = sizeof head - 1 - got;
                memcpy(head + got, buf, (size_t)n < m ? (size_t)n : m);
            }
            got += (size_t)n;
        }
        ok = strncmp(head, "HTTP/1.1 200", 12) == 0;
    }
    ERR_clear_error();
    conn_close(&k);
    return ok;
}

static void *worker(void *arg)
{
    struct counts *c = arg;
    if (!keepalive) {
        while (now() < deadline) {
            if (one_close(c))
                c->ok++;
            else
                c->failed++;
        }
        return NULL;
    }
    struct conn k = {.fd = -1, .ssl = NULL};
    while (now() < deadline) {
        if (!k.ssl && !conn_open(&k, c)) {
            c->failed++;
            continue;
        }
        int r = send_request(&k) ? read_answer(&k) : -1;
        if (r == 1)
            c->ok++;
        else
            c->failed++;
        if (r < 0) {
            ERR_clear_error();
            conn_close(&k);
        }
    }
    conn_close(&k);
    return NULL;
}

static int usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [-K] [-c CERT -k KEY] [-b BODY] PORT SECONDS THREADS PATH [API_KEY]\n",
            argv0);
    return 2;
}

int main(int argc, char **argv)
{
    const char *cert = NULL, *key = NULL, *body = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "Kc:k:b:")) != -1) {
        switch (opt) {
        case 'K':
            keepalive = 1;
            break;
        case 'c':
            cert = optarg;
            break;
        case 'k':
            key = optarg;
            break;
        case 'b':
            body = optarg;
            break;
        default:
            return usage(argv[0]);
        }
    }
    int npos = argc - optind;
    if ((npos != 4 && npos != 5) || (!cert != !key))
        return usage(argv[0]);
    char **pos = argv + optind;
    port = atoi(pos[0]);
    double secs = atof(pos[1]);
    int threads = atoi(pos[2]);
    const char *path = pos[3], *apikey = npos == 5 ? pos[4] : "";
    if (port <= 0 || port > 65535 || secs <= 0 || secs > 600 || threads < 1 || threads > 64)
        return usage(argv[0]);

    size_t cap = strlen(path) + strlen(apikey) + (body ? strlen(body) : 0) + 256;
    request = malloc(cap);
    int len = snprintf(request, cap, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n", body ? "POST" : "GET",
                       path);
    if (*apikey)
        len += snprintf(request + len, cap - (size_t)len, "x-api-key: %s\r\n", apikey);
    if (!keepalive)
        len += snprintf(request + len, cap - (size_t)len, "Connection: close\r\n");
    if (body)
        len += snprintf(request + len, cap - (size_t)len,
                        "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                        strlen(body), body);
    else
        len += snprintf(request + len, cap - (size_t)len, "\r\n");
    request_len = (size_t)len;

    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    static const unsigned char alpn[] = "\x08http/1.1";
    SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn - 1);
    if (cert && (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
                 SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
                 SSL_CTX_check_private_key(ctx) != 1)) {
        fprintf(stderr, "cannot load the client certificate %s / key %s\n", cert, key);
        ERR_print_errors_fp(stderr);
        SSL_CTX_free(ctx);
        free(request);
        return 1;
    }
    pthread_t *t = calloc((size_t)threads, sizeof *t);
    struct counts *c = calloc((size_t)threads, sizeof *c);
    double t0 = now();
    deadline = t0 + secs;
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, worker, &c[i]);
    struct counts sum = {0};
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        sum.ok += c[i].ok;
        sum.failed += c[i].failed;
        sum.reused += c[i].reused;
        sum.conns += c[i].conns;
    }
    printf("{\"ok\":%ld,\"failed\":%ld,\"reused\":%ld,\"connections\":%ld,\"seconds\":%.6f}\n",
           sum.ok, sum.failed, sum.reused, sum.conns, now() - t0);
    free(t);
    free(c);
    free(request);
    SSL_CTX_free(ctx);
    return 0;
}
