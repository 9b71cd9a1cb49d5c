/* gRPC on top of HTTP/2: a method table, length-prefixed messages, status
 * and message trailers (trailers-only for early errors), unary,
 * server-streaming and client-streaming calls, the message size limit and
 * grpc-timeout deadlines. The HTTP/2 side lives in h2.c; this header is what
 * the API layer uses.
 *
 * Call lifetime: a call is created when a request's headers arrive. The
 * service's intercept hook sees it first (auth), then the method's handlers.
 * The handler finishes it with pn_grpc_call_finish; after that, or after
 * on_cancel returned, the call is gone. on_cancel fires only for calls the
 * handler has not finished: client reset, connection closed, deadline passed
 * (the library then answers DEADLINE_EXCEEDED itself), node shutdown. */
#ifndef PN_NET_GRPC_H
#define PN_NET_GRPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "net/http.h"

enum pn_grpc_code {
    PN_GRPC_OK = 0,
    PN_GRPC_CANCELLED = 1,
    PN_GRPC_UNKNOWN = 2,
    PN_GRPC_INVALID_ARGUMENT = 3,
    PN_GRPC_DEADLINE_EXCEEDED = 4,
    PN_GRPC_NOT_FOUND = 5,
    PN_GRPC_ALREADY_EXISTS = 6,
    PN_GRPC_PERMISSION_DENIED = 7,
    PN_GRPC_RESOURCE_EXHAUSTED = 8,
    PN_GRPC_FAILED_PRECONDITION = 9,
    PN_GRPC_ABORTED = 10,
    PN_GRPC_OUT_OF_RANGE = 11,
    PN_GRPC_UNIMPLEMENTED = 12,
    PN_GRPC_INTERNAL = 13,
    PN_GRPC_UNAVAILABLE = 14,
    PN_GRPC_DATA_LOSS = 15,
    PN_GRPC_UNAUTHENTICATED = 16,
};

enum pn_grpc_kind {
    PN_GRPC_UNARY,         /* one request → one response */
    PN_GRPC_SERVER_STREAM, /* one request → many responses */
    PN_GRPC_CLIENT_STREAM, /* many requests → one response */
};

struct pn_grpc_call;

struct pn_grpc_method {
    const char *path; /* "/service.NodeService/GetBaseInfo" */
    enum pn_grpc_kind kind;
    /* Unary and server-streaming: called once with the request message as
     * soon as it is complete (without waiting for the client's half-close);
     * a call half-closed with no message gets an empty one. Client
     * streaming: called for every message. */
    void (*on_message)(struct pn_grpc_call *call, const uint8_t *msg, size_t len);
    /* Client streaming only: the client half-closed. */
    void (*on_end)(struct pn_grpc_call *call);
    /* The call ended before the handler finished it (see above). Optional. */
    void (*on_cancel)(struct pn_grpc_call *call);
};

struct pn_grpc_service {
    const struct pn_grpc_method *methods;
    size_t nmethods;
    /* Runs when a call's headers arrived, before any handler. Returns true
     * to proceed; to refuse, it calls pn_grpc_call_finish (trailers-only)
     * and returns false. Optional. Unknown paths are refused after
     * intercept with UNIMPLEMENTED in grpc-go's words: `unknown service
     * <svc>` or `unknown method <m> for service <svc>`. */
    bool (*intercept)(struct pn_grpc_call *call, const struct pn_grpc_method *m);
    void *arg;          /* pn_grpc_call_service_arg() */
    size_t max_message; /* RESOURCE_EXHAUSTED past this (64 MiB) */
};

/* --- per-call accessors --- */
const char *pn_grpc_call_path(const struct pn_grpc_call *call);
/* The method table entry the call was dispatched to (NULL for unknown
 * paths, which never reach a handler). */
const struct pn_grpc_method *pn_grpc_call_method(const struct pn_grpc_call *call);
/* First value of a request header / metadata key (lower-case); NULL if none. */
const char *pn_grpc_call_metadata(const struct pn_grpc_call *call, const char *key);
const struct pn_peer *pn_grpc_call_peer(const struct pn_grpc_call *call);
void *pn_grpc_call_service_arg(const struct pn_grpc_call *call);
void pn_grpc_call_set_data(struct pn_grpc_call *call, void *data);
void *pn_grpc_call_data(const struct pn_grpc_call *call);

/* Sends one response message (the response headers go first, once).
 * Returns PN_OK, or PN_ERR_CLOSED when the call is already gone. Queued
 * without limit: check pn_grpc_call_pending for backpressure and use
 * pn_grpc_call_set_on_writable. */
int pn_grpc_call_send(struct pn_grpc_call *call, const uint8_t *msg, size_t len);
size_t pn_grpc_call_pending(const struct pn_grpc_call *call);
void pn_grpc_call_set_on_writable(struct pn_grpc_call *call,
                                  void (*cb)(struct pn_grpc_call *call));
/* Ends the call with trailers grpc-status / grpc-message (percent-encoded);
 * message may be NULL. The call is freed when this returns. */
void pn_grpc_call_finish(struct pn_grpc_call *call, enum pn_grpc_code code, const char *message);

/* --- framing, exposed for tests and fuzzing --- */

/* Incremental decoder for the length-prefixed message stream of one call. */
struct pn_grpc_decoder {
    uint8_t hdr[5];
    size_t hdr_have;
    uint8_t *msg;
    size_t msg_len, msg_have;
    size_t max;
};
void pn_grpc_decoder_init(struct pn_grpc_decoder *d, size_t max);
void pn_grpc_decoder_free(struct pn_grpc_decoder *d);
/* Feeds bytes; calls on_msg for each complete message (msg is only valid
 * during the callback). Returns PN_OK; PN_ERR_TOOBIG with the size in
 * *too_big when a message exceeds max; PN_ERR_PROTO for a compressed
 * message (we never advertise compression). Stops at the first error. */
int pn_grpc_decoder_feed(struct pn_grpc_decoder *d, const uint8_t *data, size_t len,
                         void (*on_msg)(void *arg, const uint8_t *msg, size_t len), void *arg,
                         uint64_t *too_big);
/* true when no partial message is buffered. */
bool pn_grpc_decoder_idle(const struct pn_grpc_decoder *d);
/* Writes the 5-byte prefix for a message of len bytes. */
void pn_grpc_frame_header(uint8_t out[5], size_t len);
/* Parses a grpc-timeout value ("100m", "5S", ...) into milliseconds;
 * returns false when malformed. */
bool pn_grpc_parse_timeout(const char *v, uint64_t *ms);
/* Percent-encodes a grpc-message value; caller frees. */
char *pn_grpc_encode_message(const char *msg);
/* The HTTP status the panels' clients map a gRPC code to (spec §7.1). */
int pn_grpc_code_to_http(enum pn_grpc_code code);

#endif
