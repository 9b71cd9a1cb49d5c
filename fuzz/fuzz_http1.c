/* fuzz_http1: bytes from a peer into a real HTTP/1.1 server connection
 * (net/http1.c) over a bufferevent pair, with the handler of common.c
 * answering at once, later, as a stream, never, or through the PasarGuard
 * REST front (routes, key check, guard, Start's protobuf decode).
 *
 * Input: two option bytes, then the bytes the client sends.
 *   opt[0] bits 0-2  handler mode (enum fz_mode, modulo)
 *          bit  3    custom error answers (srv->respond_error)
 *          bits 4-5  write size: all at once, 1, 7 or 300 bytes per loop round
 *          bit  6    BEV_OPT_DEFER_CALLBACKS on the pair
 *   opt[1] bits 0-1  the end: connection destroyed with the client still
 *                    there, client gone (EOF), graceful shutdown, or 2 ms of
 *                    timers first
 * What the server writes back must parse as HTTP/1.1 responses (checked
 * with http-parser unless the input mentions HEAD, whose answers carry a
 * Content-Length and no body, which a response parser cannot know). */
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <http_parser.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "net/http1.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t pieces[4] = {SIZE_MAX, 1, 7, 300};
    struct fz_world *w = fz_world();
    struct fz_in in = {data, size};
    uint8_t o0 = fz_u8(&in), o1 = fz_u8(&in);

    struct pn_http_server srv;
    fz_server_init(&srv, (enum fz_mode)((o0 & 7) % FZ_NMODES), true, o0 & 0x08);
    size_t piece = pieces[(o0 >> 4) & 3];
    int opts = BEV_OPT_CLOSE_ON_FREE | ((o0 & 0x40) ? BEV_OPT_DEFER_CALLBACKS : 0);

    struct bufferevent *pair[2], *cli;
    if (bufferevent_pair_new(w->base, opts, pair) < 0)
        abort();
    cli = pair[1];
    struct fz_reader rd;
    fz_reader_attach(&rd, cli, "fuzz_http1", NULL, !memmem(in.p, in.n, "HEAD", 4), NULL);
    bufferevent_enable(cli, EV_READ | EV_WRITE);

    struct pn_conn_set set = {0};
    struct pn_peer peer = {.ip = "127.0.0.1", .port = 40000, .alpn = "http/1.1"};
    /* The listener hands over a bufferevent whose input may already hold the
     * first bytes: give it the first piece that way. */
    size_t first = in.n < piece ? in.n : piece;
    bufferevent_enable(pair[0], EV_READ); /* so the pair moves the bytes over now */
    bufferevent_write(cli, in.p, first);
    in.p += first;
    in.n -= first;
    pn_http1_conn_new(pair[0], &srv, &peer, &set);
    fz_spin(w->base);

    fz_feed(w->base, cli, &in, piece, NULL);

    fz_end(w->base, &set, &cli, o1 & 3);
    if (cli)
        bufferevent_free(cli);
    return 0;
}
