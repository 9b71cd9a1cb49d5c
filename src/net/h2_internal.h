/* Private glue between the HTTP/2 connection (h2.c) and the gRPC call
 * machinery (grpc.c). Nothing outside src/net/h2.c and src/net/grpc.c may
 * include this header.
 *
 * Ownership: h2.c owns streams; a stream carrying gRPC points at its call
 * (pn__h2_stream_set_call). grpc.c owns calls; a call is freed by grpc.c
 * when the handler finishes it or when h2.c reports the stream closed. */
#ifndef PN_NET_H2_INTERNAL_H
#define PN_NET_H2_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "net/grpc.h"
#include "net/http.h"

struct pn__h2_stream;

/* ---- h2.c → grpc.c ---------------------------------------------------- */

/* A stream's header block is complete and its content-type is gRPC. Builds
 * the call, attaches it to the stream, runs intercept and the method lookup.
 * The call may already be finished (and detached) when this returns.
 * hdrs (regular headers, lower-case) live as long as the stream. */
void pn__grpc_call_begin(struct pn__h2_stream *s, const struct pn_http_server *srv,
                         const char *method, const char *path, const struct pn_http_header *hdrs,
                         size_t nhdrs, const struct pn_peer *peer);
/* Request DATA for the call. The call may be finished when this returns. */
void pn__grpc_call_data(struct pn_grpc_call *call, const uint8_t *data, size_t len);
/* The client half-closed the stream. */
void pn__grpc_call_half_close(struct pn_grpc_call *call);
/* The stream is gone (reset, connection closed) and the handler has not
 * finished the call: on_cancel fires and the call is freed. */
void pn__grpc_call_stream_closed(struct pn_grpc_call *call);
/* The stream's queued output dropped under 64 KiB after being above it. */
void pn__grpc_call_writable(struct pn_grpc_call *call);

/* ---- grpc.c → h2.c ---------------------------------------------------- */

void pn__h2_stream_set_call(struct pn__h2_stream *s, struct pn_grpc_call *call);
struct event_base *pn__h2_stream_base(const struct pn__h2_stream *s);
/* Submits response HEADERS. With end_stream the HEADERS frame ends the
 * stream (trailers-only answers); otherwise DATA follows from the queue fed
 * by pn__h2_stream_write and closed by pn__h2_stream_end. Names must be
 * lower-case. Returns PN_OK or PN_ERR_CLOSED. */
int pn__h2_stream_headers(struct pn__h2_stream *s, const struct pn_http_header *hdrs, size_t nhdrs,
                          bool end_stream);
/* Queues body bytes (copied). Like pn__h2_stream_headers and
 * pn__h2_stream_end it only queues: pn__h2_stream_flush sends. */
int pn__h2_stream_write(struct pn__h2_stream *s, const void *data, size_t len);
/* Ends the body; trailers (may be none) follow the last DATA frame. */
int pn__h2_stream_end(struct pn__h2_stream *s, const struct pn_http_header *trailers,
                      size_t ntrailers);
/* Bytes queued on the stream and not yet handed to nghttp2. A write that
 * leaves 64 KiB or more queued arms pn__grpc_call_writable. */
size_t pn__h2_stream_pending(const struct pn__h2_stream *s);
/* Asks for pn__grpc_call_writable at the next turn of the loop at which the
 * queue is under 64 KiB (at once if it already is). */
void pn__h2_stream_want_writable(struct pn__h2_stream *s);
/* Sends what the connection has queued, unless h2.c is on the stack (it
 * then sends when it unwinds). May free s when its answer is complete and
 * the stream closes: callers must not touch s afterwards. */
void pn__h2_stream_flush(struct pn__h2_stream *s);

#endif
