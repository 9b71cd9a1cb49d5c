/* Shared parts of the libFuzzer targets: reading option bytes from the
 * input, running a test event loop until nothing is left to do, and the
 * server side the transport targets (fuzz_http1, fuzz_h2, fuzz_ws) put
 * behind a real connection: a REST handler that answers at once, later, as
 * a stream or never, a small gRPC echo service with the same habits, and
 * the PasarGuard API on a backend without a core. */
#ifndef PN_FUZZ_COMMON_H
#define PN_FUZZ_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <http_parser.h>

#include "net/grpc.h"
#include "net/http.h"

struct bufferevent;

/* The API key the PasarGuard front expects; the seeds carry it. */
#define FZ_API_KEY "5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77"

/* A cursor over the fuzzer's input. Reads past the end yield zeros. */
struct fz_in {
    const uint8_t *p;
    size_t n;
};

uint8_t fz_u8(struct fz_in *in);
uint16_t fz_u16(struct fz_in *in);

/* How the REST handler answers (the mode of a server; FZ_MIXED picks one
 * per request from the path). */
enum fz_mode {
    FZ_ECHO,   /* at once, with what it saw */
    FZ_LATER,  /* from an event of the next loop round */
    FZ_STREAM, /* a streamed answer, partly from the next round */
    FZ_HOLD,   /* never: the request ends with the connection (on_close) */
    FZ_PG,     /* the PasarGuard REST front */
    FZ_MIXED,
    FZ_NMODES
};

/* The process-wide test world: one event_base, a backend with no core and
 * the PasarGuard front on it, built on first use and kept for the whole
 * run (the fuzzer calls the target millions of times). Logging is quiet
 * unless FUZZ_VERBOSE is set. */
struct fz_world {
    struct event_base *base;
    struct pn_backend *backend;
    struct pn_pasarguard *pg;
};
struct fz_world *fz_world(void);

/* FUZZ_VERBOSE is set: targets say more (what the server wrote, logs). */
bool fz_verbose(void);

/* Runs the loop without blocking until no event is active (bounded). */
void fz_spin(struct event_base *base);
/* The same, stopping early once *stop is true (a target cutting the
 * connection at a chosen point). */
void fz_spin_until(struct event_base *base, const bool *stop);
/* Lets about 2 ms pass through the loop, so the shortest timers fire. */
void fz_wait_2ms(struct event_base *base);

/* Fills srv for a server whose REST requests go to the mode's handler and
 * whose gRPC calls go to the echo service (echo_grpc) or to PasarGuard.
 * Limits are small so a fuzzer reaches them: 8 KiB of header, 64 KiB of
 * body; timeouts are long (they never fire within one input). */
void fz_server_init(struct pn_http_server *srv, enum fz_mode mode, bool echo_grpc,
                    bool custom_errors);

/* Writes the rest of the input into cli, piece bytes per loop round (the
 * rest at once after 512 rounds), spinning after each; stops early once
 * *stop is true (stop may be NULL). */
void fz_feed(struct event_base *base, struct bufferevent *cli, struct fz_in *in, size_t piece,
             const bool *stop);

/* Ends an input's connection the way how (0-3) picks: left to the
 * teardown (destroyed with the client still there), the client gone (the
 * server sees EOF; *cli is freed and set NULL), a graceful shutdown, or
 * 2 ms of timers first. Then fz_teardown(set). */
void fz_end(struct event_base *base, struct pn_conn_set *set, struct bufferevent **cli,
            unsigned how);

/* The client end of an HTTP/1.1 connection: what the server writes back
 * must parse as responses or the run aborts naming target. settings adds
 * checks of its own (NULL: syntax only; the parser's data is the reader,
 * user is the target's). Checking stops at an upgrade (another protocol
 * follows) and is off when check is false (answers to HEAD carry a
 * Content-Length and no body, which a response parser cannot know). */
struct fz_reader {
    http_parser parser;
    const http_parser_settings *settings;
    const char *target;
    bool check;
    void *user;
};
/* Sets r up and makes it bev's read and event callbacks. */
void fz_reader_attach(struct fz_reader *r, struct bufferevent *bev, const char *target,
                      const http_parser_settings *settings, bool check, void *user);

/* Ends every connection of set and every request or call still held by the
 * handlers, then spins until the frees ran. Call at the end of each input. */
void fz_teardown(struct pn_conn_set *set);

#endif
