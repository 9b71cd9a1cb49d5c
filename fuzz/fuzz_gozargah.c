/* fuzz_gozargah: the PasarGuard front in the gozargah profile's legacy
 * session mode (spec pasarguard.md §4) behind a real connection over a
 * bufferevent pair: HTTP/1.1 requests (net/http1.c), or HTTP/2 frames after
 * the client preface (net/h2.c, gRPC through net/grpc.c), from a peer whose
 * client certificate counts as verified. Every request meets the session
 * check first: REST `Authorization` (two space-separated parts, a UUID, the
 * IP that called Start) with the legacy error table, gRPC `authorization`
 * metadata (`Bearer <id>`, Go's uuid errors), Start by mTLS alone (REST
 * checks run at the headers, as the node wires them, and again with the
 * body); then the routes or methods, the guard, Start's protobuf decode and
 * its config build, GetBaseInfo with the session id.
 *
 * A session opens only when a Start succeeds, which needs a real core. The
 * backends here have none: one has no core path (Start is refused at once,
 * as without XRAY_EXECUTABLE_PATH), the other a path that does not exist
 * (the version probe fails once at start-up without a process; a Start
 * builds the config, queues and fails from the loop with `failed to start
 * xray: no usable core binary`). So the session is put in place directly,
 * with the fixed id FZ_GZ_SESSION the seeds carry (api/pasarguard.c is
 * included for that, as fuzz_proto_msgs does). The front is made anew for
 * each input; calls that need a started core stop at the guard.
 *
 * Input: two option bytes, then the bytes the client sends.
 *   opt[0] bit  0    a session is open (FZ_GZ_SESSION)
 *          bit  1    ... opened from another IP than the peer's
 *          bit  2    the client certificate is not verified
 *          bit  3    HTTP/2: the input is frames after the preface
 *          bits 4-5  write size: all at once, 1, 9 or 300 bytes per round
 *          bit  6    BEV_OPT_DEFER_CALLBACKS on the pair
 *          bit  7    the backend has no core path at all
 *   opt[1] bits 0-1  the end: connection destroyed with the client still
 *                    there, client gone (EOF), graceful shutdown, or 2 ms of
 *                    timers first
 *          bit  2    the connection is destroyed as soon as the first REST
 *                    request reached the front (before any other event runs),
 *                    so a request waiting for the backend sees its connection
 *                    go
 * Over HTTP/1.1 what the server writes must parse as HTTP/1.1 responses
 * (unless the input mentions HEAD, as in fuzz_http1). */
#include "../src/api/pasarguard.c"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <http_parser.h>

#include "common.h"
#include "net/h2.h"
#include "net/http1.h"

/* The session id the seeds carry when opt[0] bit 0 opens a session. */
#define FZ_GZ_SESSION "c4ca4238-a0b9-4382-8dcc-509a6f75849b"
/* A core path that does not exist. */
#define FZ_NO_CORE "/nonexistent/proxynode-fuzz/xray"

static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static bool cut, cut_now; /* opt[1] bit 2; the first request reached the front */

/* The front's REST entry point; with `cut`, the loop stops right after it. */
static void on_request(struct pn_req *req, void *arg)
{
    pn_pasarguard_rest(req, arg);
    if (cut) {
        cut_now = true;
        event_base_loopbreak(fz_world()->base);
    }
}

/* The backend whose core path does not exist, made once. */
static struct pn_backend *no_core_backend(struct event_base *base)
{
    static struct pn_backend *b;
    if (!b) {
        struct pn_backend_opts bo = {.base = base, .core_path = FZ_NO_CORE, .log_buffer_size = 16};
        b = pn_backend_new(&bo);
    }
    return b;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t pieces[4] = {SIZE_MAX, 1, 9, 300};
    struct fz_world *w = fz_world();
    struct fz_in in = {data, size};
    uint8_t o0 = fz_u8(&in), o1 = fz_u8(&in);
    bool h2 = o0 & 8;
    cut = o1 & 4;
    cut_now = false;

    struct pn_pasarguard_opts po = {
        .backend = (o0 & 0x80) ? w->backend : no_core_backend(w->base),
        .node_version = "fuzz",
        .base = w->base,
        .session_mode = true,
    };
    struct pn_pasarguard *pg = pn_pasarguard_new(&po);
    struct pn_peer peer = {.ip = "127.0.0.1",
                           .port = 40000,
                           .client_cert_verified = !(o0 & 4),
                           .alpn = h2 ? "h2" : "http/1.1"};
    if (o0 & 1) {
        if (pn_uuid_parse(FZ_GZ_SESSION, strlen(FZ_GZ_SESSION), &pg->sess.id) != PN_OK)
            abort();
        pg->sess.active = true;
        snprintf(pg->sess.ip, sizeof pg->sess.ip, "%s", (o0 & 2) ? "198.51.100.9" : peer.ip);
    }

    struct pn_http_server srv;
    fz_server_init(&srv, FZ_PG, false, false);
    srv.on_head = pn_pasarguard_rest_head; /* as src/app/app.c wires it */
    srv.on_request = on_request;
    srv.arg = pg;
    srv.grpc = pn_pasarguard_grpc(pg);
    size_t piece = pieces[(o0 >> 4) & 3];
    int opts = BEV_OPT_CLOSE_ON_FREE | ((o0 & 0x40) ? BEV_OPT_DEFER_CALLBACKS : 0);

    struct bufferevent *pair[2], *cli;
    if (bufferevent_pair_new(w->base, opts, pair) < 0)
        abort();
    cli = pair[1];
    struct fz_reader rd;
    fz_reader_attach(&rd, cli, "fuzz_gozargah", NULL, !h2 && !memmem(in.p, in.n, "HEAD", 4),
                     NULL);
    bufferevent_enable(cli, EV_READ | EV_WRITE);

    /* As the listener hands a connection over: HTTP/2 with the sniffed
     * preface in the input already, HTTP/1.1 with the first piece. */
    struct pn_conn_set set = {0};
    bufferevent_enable(pair[0], EV_READ);
    if (h2) {
        bufferevent_write(cli, preface, sizeof preface - 1);
        pn_h2_conn_new(pair[0], &srv, &peer, &set);
    } else {
        size_t first = in.n < piece ? in.n : piece;
        bufferevent_write(cli, in.p, first);
        in.p += first;
        in.n -= first;
        pn_http1_conn_new(pair[0], &srv, &peer, &set);
    }
    fz_spin_until(w->base, &cut_now);

    fz_feed(w->base, cli, &in, piece, &cut_now);

    fz_end(w->base, &set, &cli, cut_now ? 0 : o1 & 3);
    if (pg->logs || pg->sess.polls) {
        fprintf(stderr, "fuzz_gozargah: log streams outlived their connection\n");
        abort();
    }
    if (cli)
        bufferevent_free(cli);
    pn_pasarguard_free(pg);
    return 0;
}
