/* The PasarGuard / Gozargah node API (spec/pasarguard.md): the REST routes
 * and the gRPC method table of service.NodeService on the shared port, the
 * x-api-key check in front of both, and the translation of protobuf
 * messages to node/ calls. */
#ifndef PN_API_PASARGUARD_H
#define PN_API_PASARGUARD_H

#include <stddef.h>
#include <stdint.h>

#include "base/uuid.h"
#include "net/grpc.h"
#include "net/http.h"

struct event_base;
struct pn_backend;
struct pn_pasarguard;
struct pn_user;

struct pn_pasarguard_opts {
    struct pn_uuid api_key;     /* copied */
    struct pn_backend *backend; /* borrowed; must outlive pg */
    const char *node_version;   /* borrowed, e.g. PN_VERSION */
    /* The loop log streams defer their writes to, so a burst of core lines
     * becomes one write and no transport I/O runs inside a log-ring push or
     * a backend listener. NULL: log streams write from those callbacks. */
    struct event_base *base;
    /* gozargah profile, legacy session mode (spec pasarguard.md §4): Start
     * is authorised by mTLS alone and creates a session; every other call
     * needs `Authorization: Bearer <session_id>` (REST also from the IP that
     * called Start). The API key is not used. A successful Start replaces
     * the session; Stop (the backend left with no core) ends it; keep-alive
     * expiry alone does not. Every connection must also carry a verified
     * client certificate (the TLS context enforces it; checked again here).
     * Errors: spec §4's REST and gRPC tables. */
    bool session_mode;
    /* Session mode only: REST GET /logs long-polls (spec §5.3, pre-2025
     * form) with at most this many lines (<= 0: 1000): always when
     * long_poll_logs (MAX_LOG_PER_REQUEST set in the environment), else only
     * for requests with Accept: application/x-protobuf. The read position
     * is one cursor per session (starting with the ring's backlog, reset by
     * a new Start), so successive long polls never repeat a line. gRPC
     * GetLogs always streams. */
    long max_log_per_request;
    bool long_poll_logs;
};

struct pn_pasarguard *pn_pasarguard_new(const struct pn_pasarguard_opts *opts);
/* Ends open log streams cleanly (REST: end of the chunked body; gRPC:
 * status OK), then frees. Other requests in flight keep a pointer to pg:
 * free it after the listeners' connections are gone. */
void pn_pasarguard_free(struct pn_pasarguard *pg);

/* Ends every open log stream cleanly. Log streams never end by themselves
 * (no heartbeat, spec §6.4), so a graceful node stop calls this first to let
 * the listener's connections finish at once. */
void pn_pasarguard_end_streams(struct pn_pasarguard *pg);

/* The gRPC service to put in struct pn_http_server.grpc. */
const struct pn_grpc_service *pn_pasarguard_grpc(const struct pn_pasarguard *pg);
/* The REST entry point for struct pn_http_server.on_request (arg = pg). */
void pn_pasarguard_rest(struct pn_req *req, void *arg);
/* For struct pn_http_server.on_head: refuses a request whose key (or
 * session) is wrong before its body is read; on_request checks again. */
void pn_pasarguard_rest_head(struct pn_req *req, void *arg);

/* The body of `PUT /users/sync/chunked` (spec §6.3): uvarint-framed
 * UsersChunk messages, bucketed by index, up to the first chunk with
 * last=true (trailing bytes ignored), joined in index order. On success
 * *users is a new array of new users (caller frees each with pn_user_free,
 * then the array) and *n > 0. Errors: PN_ERR_INVAL with the §6.3 text in
 * err (`failed to read chunk length: …`, `failed to read chunk payload: …`,
 * `failed to decode chunk: …`, `missing final chunk indicator`, `missing
 * chunk index N`, `no users received`); *users and *n are then untouched. */
int pn_pasarguard_parse_chunks(const uint8_t *body, size_t len, struct pn_user ***users, size_t *n,
                               char *err, size_t errlen);

#endif
