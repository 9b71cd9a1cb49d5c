/* New TLS connections per second against the node: T threads, each in a loop
 * until the deadline: TCP connect, a full TLS handshake (no session cache,
 * no tickets, so never a resumption), one HTTP/1.1 request with
 * `Connection: close`, read the answer until the node closes, free. run.py
 * compiles it (cc tlsrate.c -lssl -lcrypto -lpthread).
 * Usage: tlsrate PORT SECONDS THREADS PATH API_KEY
 * Prints one JSON line: {"ok":N,"failed":N,"reused":N,"seconds":S}. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static SSL_CTX *ctx;
static int port;
static double deadline;
static char request[512];

struct counts {
    long ok, failed, reused;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One connection: returns 1 on a 200 answer, 0 otherwise. */
static int one(struct counts *c)
{
    int ok = 0, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one_ = 1;
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one_, sizeof one_);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, "localhost");
    if (SSL_connect(ssl) == 1) {
        if (SSL_session_reused(ssl))
            c->reused++;
        if (SSL_write(ssl, request, (int)strlen(request)) > 0) {
            char buf[4096];
            size_t got = 0;
            int n;
            char head[16] = {0};
            while ((n = SSL_read(ssl, buf, sizeof buf)) > 0) {
                if (got < sizeof head - 1) {
                    size_t k = sizeof head - 1 - got;
                    memcpy(head + got, buf, (size_t)n < k ? (size_t)n : k);
                }
                got += (size_t)n;
            }
            ok = strncmp(head, "HTTP/1.1 200", 12) == 0;
        }
        SSL_shutdown(ssl);
    }
    SSL_free(ssl);
    close(fd);
    return ok;
}

static void *worker(void *arg)
{
    struct counts *c = arg;
    while (now() < deadline) {
        if (one(c))
            c->ok++;
        else
            c->failed++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s PORT SECONDS THREADS PATH API_KEY\n", argv[0]);
        return 2;
    }
    port = atoi(argv[1]);
    double secs = atof(argv[2]);
    int threads = atoi(argv[3]);
    if (port <= 0 || secs <= 0 || secs > 600 || threads < 1 || threads > 64)
        return 2;
    snprintf(request, sizeof request,
             "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: %s\r\nConnection: close\r\n\r\n",
             argv[4], argv[5]);
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    static const unsigned char alpn[] = "\x08http/1.1";
    SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn - 1);
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
    }
    printf("{\"ok\":%ld,\"failed\":%ld,\"reused\":%ld,\"seconds\":%.6f}\n", sum.ok, sum.failed,
           sum.reused, now() - t0);
    free(t);
    free(c);
    SSL_CTX_free(ctx);
    return 0;
}
