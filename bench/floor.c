/* The memory floor for proxynode's idle figures: a bare process that only
 * creates an OpenSSL 3 TLS server context holding the node's certificate and
 * key, then waits. run.py compiles it (cc floor.c -lssl -lcrypto), reads its
 * VmRSS / RssAnon / VmHWM from /proc and compares the idle node with it.
 * Usage: floor CERT KEY — prints "ready" once the context is loaded and sleeps
 * until a signal ends it. */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s CERT KEY\n", argv[0]);
        return 2;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, argv[1]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[2], SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    /* Bounded: the harness stops it with SIGTERM; never outlive an hour. */
    alarm(3600);
    for (;;)
        pause();
}
