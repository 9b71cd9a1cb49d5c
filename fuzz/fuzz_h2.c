/* fuzz_h2: bytes from a peer, after the client connection preface, into a
 * real HTTP/2 server connection (net/h2.c on nghttp2) over a bufferevent
 * pair. gRPC streams reach net/grpc.c (framing, size limit, deadlines,
 * trailers) and then either the PasarGuard service, whose every request
 * message decodes here (with no core, most calls stop at the guard; Start,
 * GetBaseInfo and GetOutboundsLatency decode), or the echo service of
 * common.c, which answers later, streams, fails with peer text or never
 * answers. Other streams are REST requests for the handler of common.c.
 *
 * Input: two option bytes, then the frames the client sends.
 *   opt[0] bits 0-2  REST handler mode (enum fz_mode, modulo)
 *          bit  3    custom error answers
 *          bit  4    gRPC goes to the echo service instead of PasarGuard
 *          bit  5    BEV_OPT_DEFER_CALLBACKS on the pair
 *          bits 6-7  write size: all at once, 9, 64 or 1000 bytes per round
 *   opt[1] bits 0-1  the end: destroyed, client gone, graceful shutdown
 *                    (GOAWAY), or 2 ms of timers first (grpc-timeout) */
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "net/h2.h"

static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static void cli_read(struct bufferevent *bev, void *arg)
{
    (void)arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    if (fz_verbose()) { /* what the server wrote, for reading a crash input */
        size_t n = evbuffer_get_length(in);
        const unsigned char *p = evbuffer_pullup(in, -1);
        fprintf(stderr, "server wrote %zu:", n);
        for (size_t i = 0; i < n && i < 200; i++)
            fprintf(stderr, " %02x", p[i]);
        fprintf(stderr, "\n");
    }
    evbuffer_drain(in, evbuffer_get_length(in));
}

static void cli_event(struct bufferevent *bev, short what, void *arg)
{
    (void)what;
    cli_read(bev, arg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t pieces[4] = {SIZE_MAX, 9, 64, 1000};
    struct fz_world *w = fz_world();
    struct fz_in in = {data, size};
    uint8_t o0 = fz_u8(&in), o1 = fz_u8(&in);

    struct pn_http_server srv;
    fz_server_init(&srv, (enum fz_mode)((o0 & 7) % FZ_NMODES), o0 & 0x10, o0 & 0x08);
    int opts = BEV_OPT_CLOSE_ON_FREE | ((o0 & 0x20) ? BEV_OPT_DEFER_CALLBACKS : 0);
    size_t piece = pieces[o0 >> 6];

    struct bufferevent *pair[2];
    if (bufferevent_pair_new(w->base, opts, pair) < 0)
        abort();
    struct bufferevent *cli = pair[1];
    bufferevent_setcb(cli, cli_read, NULL, cli_event, NULL);
    bufferevent_enable(cli, EV_READ | EV_WRITE);

    /* As the listener does: the sniffed preface is already in the input. */
    struct pn_conn_set set = {0};
    struct pn_peer peer = {.ip = "127.0.0.1", .port = 40000, .alpn = "h2"};
    bufferevent_enable(pair[0], EV_READ); /* so the pair moves the bytes over now */
    bufferevent_write(cli, preface, sizeof preface - 1);
    pn_h2_conn_new(pair[0], &srv, &peer, &set);
    fz_spin(w->base);

    fz_feed(w->base, cli, &in, piece, NULL);

    fz_end(w->base, &set, &cli, o1 & 3);
    if (cli)
        bufferevent_free(cli);
    return 0;
}
