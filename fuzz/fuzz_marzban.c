/* fuzz_marzban: bytes from a peer into a real HTTP/1.1 server connection
 * (net/http1.c over a bufferevent pair) served by the Marzban front
 * (api/marzban.c) with its core session (node/mzcore.c) as the marzban
 * profile wires them (src/app/app.c): the routes, the JSON bodies of /ping,
 * /start, /stop and /restart (session_id as a UUID, config as a JSON
 * string holding the panel's config, which goes through the mzconf
 * rewrite), /connect and /disconnect, and the /logs WebSocket (query
 * parsing, session and interval checks, the stream of the log ring).
 *
 * The core session has no core executable (core_path NULL, as when none
 * is found): a /start or /restart that passes every check is answered from
 * the next loop round with 503 `xray executable not found: …` and /stop
 * completes at once, so no process is ever started and every input is
 * deterministic. The front and the core session are made anew for each
 * input. Their session can be opened beforehand with the fixed id
 * FZ_MZ_SESSION (api/marzban.c is included for that, as fuzz_proto_msgs
 * includes api/pasarguard.c), so the seeds get past the session check;
 * a /connect in the input replaces it with a random one.
 *
 * Input: two option bytes, then the bytes the client sends.
 *   opt[0] bit  0    a session is open (FZ_MZ_SESSION, from the peer's IP)
 *          bit  1    PROXYNODE_CONNECT_STOPS_CORE
 *          bits 2-3  write size: all at once, 1, 7 or 300 bytes per round
 *          bit  4    BEV_OPT_DEFER_CALLBACKS on the pair
 *          bit  5    the log ring holds a few lines already (the backlog)
 *          bit  6    the peer is an IPv6 address (the rewrite's rule source)
 *          bit  7    an INBOUNDS filter
 *   opt[1] bits 0-1  the end: connection destroyed with the client still
 *                    there, client gone (EOF), graceful shutdown, or 2 ms of
 *                    timers first
 *          bits 2-3  before the end: nothing, the core crashed (the session
 *                    is invalidated), the node stops (streams end), or new
 *                    core lines reach the open streams
 *          bit  4    the connection is destroyed as soon as the first request
 *                    reached the front (before any other event runs), so a
 *                    request waiting for the core sees its connection go
 * What the server writes must parse as HTTP/1.1 responses (unless the input
 * mentions HEAD, as in fuzz_http1) up to a 101 upgrade, and every response
 * body must be a JSON object (spec marzban.md "Must get right" 15). Every
 * waiting request and open stream of the front must be gone once its
 * connection is. */
#include "../src/api/marzban.c"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <http_parser.h>
#include <stdarg.h>
#include <unistd.h>

#include "common.h"
#include "net/http1.h"

/* The session id the seeds carry when opt[0] bit 0 opens a session. */
#define FZ_MZ_SESSION "8f14e45f-ceea-467f-a0e6-1b3c2d4e5f60"
#define MAX_BODY_KEPT (1024 * 1024)

/* ---- a quiet node log ------------------------------------------------------ */

/* Every /start that passes its checks logs `Failed to start core: …` at
 * error level; at hundreds of inputs a second that would flood the run's
 * log. These replace base/log.c for this target (the linker then takes
 * nothing from log.o): lines are still formatted, so bad arguments still
 * show under the sanitizers, but written only with FUZZ_VERBOSE. */
static enum pn_log_level fz_level = PN_LOG_INFO;

void pn_log_set_level(enum pn_log_level level)
{
    fz_level = level;
}

enum pn_log_level pn_log_get_level(void)
{
    return fz_level;
}

void pn_log(enum pn_log_level level, const char *fmt, ...)
{
    if (level > fz_level)
        return;
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (!fz_verbose() || n < 0)
        return;
    size_t len = (size_t)n < sizeof line - 1 ? (size_t)n : sizeof line - 2;
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

/* ---- the client ------------------------------------------------------------ */

/* What the reader keeps of the current answer's body (fz_reader.user). */
struct kept_body {
    char *data;
    size_t len;
    bool over;
};

static int resp_begin(http_parser *p)
{
    struct kept_body *b = ((struct fz_reader *)p->data)->user;
    b->len = 0;
    b->over = false;
    return 0;
}

static int resp_body(http_parser *p, const char *at, size_t len)
{
    struct kept_body *b = ((struct fz_reader *)p->data)->user;
    if (b->over || b->len + len > MAX_BODY_KEPT) {
        b->over = true;
        return 0;
    }
    memcpy(b->data + b->len, at, len);
    b->len += len;
    return 0;
}

static int resp_complete(http_parser *p)
{
    struct kept_body *b = ((struct fz_reader *)p->data)->user;
    if (!b->len || b->over)
        return 0;
    json_error_t je;
    json_t *j = json_loadb(b->data, b->len, 0, &je);
    bool ok = json_is_object(j);
    json_decref(j);
    if (!ok) {
        fprintf(stderr, "fuzz_marzban: a %u answer whose body is not a JSON object: %.*s\n",
                p->status_code, (int)(b->len > 300 ? 300 : b->len), b->data);
        abort();
    }
    return 0;
}

static const http_parser_settings resp_settings = {
    .on_message_begin = resp_begin,
    .on_body = resp_body,
    .on_message_complete = resp_complete,
};

/* ---- the server ------------------------------------------------------------ */

static bool cut, cut_now; /* opt[1] bit 4; the first request reached the front */

/* The front's entry point; with `cut`, the loop stops right after it. */
static void on_request(struct pn_req *req, void *arg)
{
    pn_marzban_rest(req, arg);
    if (cut) {
        cut_now = true;
        event_base_loopbreak(fz_world()->base);
    }
}

/* ---- the input ------------------------------------------------------------- */

static void push_lines(struct pn_mzcore *core, const char *const *lines, size_t n)
{
    for (size_t i = 0; i < n; i++)
        pn_logring_push(pn_mzcore_logs(core), lines[i], strlen(lines[i]));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t pieces[4] = {SIZE_MAX, 1, 7, 300};
    static const char *const filter[] = {"VLESS TCP REALITY", "VMESS TCP"};
    static const char *const backlog[] = {
        "Xray 1.8.24 (Xray, Penetrates Everything.) 3f0bb2d (go1.22.5 linux/amd64)", "",
        "2025/01/09 12:00:00 [Warning] core: Xray 1.8.24 started"};
    static const char *const live[] = {"2025/01/09 12:00:01 accepted tcp:1.1.1.1:443",
                                       "ü live line"};
    static char *body_buf;
    if (!body_buf)
        body_buf = pn_malloc(MAX_BODY_KEPT);
    struct fz_world *w = fz_world();
    struct fz_in in = {data, size};
    uint8_t o0 = fz_u8(&in), o1 = fz_u8(&in);
    cut = o1 & 0x10;
    cut_now = false;

    struct pn_mzcore_opts mo = {
        .base = w->base,
        .core_path = NULL,
        .api_host = "0.0.0.0",
        .api_port = 62051,
        .cert_file = "/var/lib/marzban-node/ssl_cert.pem",
        .key_file = "/var/lib/marzban-node/ssl_key.pem",
        .inbounds = (o0 & 0x80) ? filter : NULL,
        .ninbounds = (o0 & 0x80) ? 2 : 0,
        .start_timeout_ms = 60000,
        .supervise = true,
    };
    struct pn_mzcore *core = pn_mzcore_new(&mo);
    struct pn_marzban_opts zo = {.base = w->base, .core = core, .connect_stops_core = o0 & 2};
    struct pn_marzban *front = pn_marzban_new(&zo);

    struct pn_peer peer = {.port = 40000, .alpn = ""};
    snprintf(peer.ip, sizeof peer.ip, "%s", (o0 & 0x40) ? "2001:db8::7" : "127.0.0.1");
    if (o0 & 1) {
        if (pn_uuid_parse(FZ_MZ_SESSION, strlen(FZ_MZ_SESSION), &front->session) != PN_OK)
            abort();
        front->connected = true;
        snprintf(front->client_ip, sizeof front->client_ip, "%s", peer.ip);
    }
    if (o0 & 0x20)
        push_lines(core, backlog, sizeof backlog / sizeof backlog[0]);

    struct pn_http_server srv;
    fz_server_init(&srv, FZ_ECHO, true, false);
    srv.on_request = on_request;
    srv.arg = front;
    srv.respond_error = pn_marzban_respond_error;
    srv.grpc = NULL;
    srv.allow_h2 = false;
    size_t piece = pieces[(o0 >> 2) & 3];
    int opts = BEV_OPT_CLOSE_ON_FREE | ((o0 & 0x10) ? BEV_OPT_DEFER_CALLBACKS : 0);

    struct bufferevent *pair[2], *cli;
    if (bufferevent_pair_new(w->base, opts, pair) < 0)
        abort();
    cli = pair[1];
    struct kept_body body = {.data = body_buf};
    struct fz_reader rd;
    fz_reader_attach(&rd, cli, "fuzz_marzban", &resp_settings, !memmem(in.p, in.n, "HEAD", 4),
                     &body);
    bufferevent_enable(cli, EV_READ | EV_WRITE);

    struct pn_conn_set set = {0};
    /* As the listener hands it over: the first bytes may be in already. */
    size_t first = in.n < piece ? in.n : piece;
    bufferevent_enable(pair[0], EV_READ);
    bufferevent_write(cli, in.p, first);
    in.p += first;
    in.n -= first;
    pn_http1_conn_new(pair[0], &srv, &peer, &set);
    fz_spin_until(w->base, &cut_now);

    fz_feed(w->base, cli, &in, piece, &cut_now);

    switch (cut_now ? 0 : (o1 >> 2) & 3) {
    case 0:
        break;
    case 1:
        pn_marzban_invalidate_session(front);
        break;
    case 2:
        pn_marzban_end_streams(front);
        break;
    case 3:
        push_lines(core, live, sizeof live / sizeof live[0]);
        break;
    }
    fz_spin_until(w->base, &cut_now);

    fz_end(w->base, &set, &cli, cut_now ? 0 : o1 & 3);
    if (front->calls || front->streams) {
        fprintf(stderr, "fuzz_marzban: %s outlived their connection\n",
                front->calls ? "requests waiting for the core" : "/logs streams");
        abort();
    }
    if (cli)
        bufferevent_free(cli);
    pn_marzban_free(front);
    pn_mzcore_free(core);
    return 0;
}
