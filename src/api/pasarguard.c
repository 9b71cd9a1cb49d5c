/* PasarGuard node API (see pasarguard.h). Requests pass, in order, the key
 * check (spec §4, §7), the route or method lookup, the backend guard
 * ("backend not initialized" / "core is not started yet"), and then their
 * handler. REST and gRPC share the checks and differ only in how an answer
 * is written. */
#include "api/pasarguard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"
#include "node/backend.h"
#include "service.pb-c.h"

#define MAX_MESSAGE (64u * 1024 * 1024)

struct pn_pasarguard {
    struct pn_uuid api_key;
    struct pn_backend *backend;
    char *node_version;
    struct pn_grpc_service grpc;
};

/* ---- shared checks ------------------------------------------------------ */

/* An error as both protocols spell it. */
struct api_error {
    int http_status;
    enum pn_grpc_code grpc_code;
    const char *text;
};

static const struct api_error err_key_missing = {401, PN_GRPC_UNAUTHENTICATED,
                                                 "missing x-api-key header"};
static const struct api_error err_key_format = {422, PN_GRPC_INVALID_ARGUMENT,
                                                "invalid api key format: must be a valid UUID"};
static const struct api_error err_key_mismatch = {403, PN_GRPC_PERMISSION_DENIED,
                                                  "api key mismatch"};
static const struct api_error err_no_backend = {500, PN_GRPC_UNAVAILABLE,
                                                "backend not initialized"};

/* Checks the key: `x-api-key`, or `Authorization: Bearer <key>` only when
 * x-api-key is absent (spec §4). Order: missing, not a UUID, mismatch.
 * Returns NULL when the caller is authorised. */
static const struct api_error *check_key(const struct pn_pasarguard *pg, const char *x_api_key,
                                         const char *authorization)
{
    const char *key = x_api_key;
    if (!key && authorization && strncasecmp(authorization, "Bearer ", 7) == 0)
        key = authorization + 7;
    if (!key)
        return &err_key_missing;
    while (*key == ' ')
        key++;
    size_t len = strlen(key);
    while (len && key[len - 1] == ' ')
        len--;
    struct pn_uuid got;
    if (pn_uuid_parse(key, len, &got) < 0)
        return &err_key_format;
    if (!pn_uuid_equal(&got, &pg->api_key))
        return &err_key_mismatch;
    return NULL;
}

/* The guard of routes that need a started core. */
static const struct api_error *check_backend(const struct pn_pasarguard *pg)
{
    if (!pn_backend_started(pg->backend))
        return &err_no_backend;
    return NULL;
}

/* Packs a BaseInfoResponse into a new buffer; caller frees. */
static uint8_t *pack_base_info(const struct pn_pasarguard *pg, const char *core_version,
                               size_t *len)
{
    Service__BaseInfoResponse r = SERVICE__BASE_INFO_RESPONSE__INIT;
    r.started = pn_backend_started(pg->backend);
    r.core_version = (char *)core_version;
    r.node_version = pg->node_version;
    *len = service__base_info_response__get_packed_size(&r);
    uint8_t *buf = pn_malloc(*len);
    service__base_info_response__pack(&r, buf);
    return buf;
}

/* ---- REST ---------------------------------------------------------------- */

static const struct pn_http_header protobuf_hdr[] = {
    {"Content-Type", "application/x-protobuf"},
};

static void rest_error(struct pn_req *req, const struct api_error *e)
{
    pn_req_respond_text(req, e->http_status, e->text);
}

static void rest_protobuf(struct pn_req *req, const uint8_t *body, size_t len)
{
    pn_req_respond(req, 200, protobuf_hdr, 1, body, len);
}

static void rest_info_answer(struct pn_req *req, const char *version)
{
    struct pn_pasarguard *pg = req->srv->arg;
    size_t len;
    uint8_t *buf = pack_base_info(pg, version, &len);
    rest_protobuf(req, buf, len);
    free(buf);
}

static void rest_info_version_ready(const char *version, void *arg)
{
    rest_info_answer(arg, version);
}

static void rest_info_closed(struct pn_req *req, void *arg)
{
    pn_backend_wait_cancel(req->user);
}

/* GET /info: answers at once, or when the start-up version probe ends. */
static void rest_info(struct pn_pasarguard *pg, struct pn_req *req)
{
    const char *version = pn_backend_core_version(pg->backend);
    if (version) {
        rest_info_answer(req, version);
        return;
    }
    req->user = pn_backend_on_version(pg->backend, rest_info_version_ready, req);
    pn_req_set_callbacks(req, rest_info_closed, NULL, NULL);
}

struct route {
    const char *path;
    const char *methods[2];
    bool guard;                                            /* needs a started core */
    void (*handler)(struct pn_pasarguard *, struct pn_req *); /* NULL: served by the guard */
};

/* Spec §6.1. The guarded routes answer through the guard until a core is
 * started; the core lifecycle that starts one comes with the next issue. */
static const struct route routes[] = {
    {"/info", {"GET"}, false, rest_info},
    {"/stop", {"PUT"}, true, NULL},
    {"/logs", {"GET"}, true, NULL},
    {"/stats", {"GET"}, true, NULL},
    {"/stats/", {"GET"}, true, NULL},
    {"/stats/latency", {"GET"}, true, NULL},
    {"/stats/user/online", {"GET"}, true, NULL},
    {"/stats/user/online_ip", {"GET"}, true, NULL},
    {"/stats/backend", {"GET"}, true, NULL},
    {"/stats/system", {"GET"}, true, NULL},
    {"/stats/outbounds", {"GET"}, true, NULL},
    {"/stats/outbound", {"GET"}, true, NULL},
    {"/stats/inbounds", {"GET"}, true, NULL},
    {"/stats/inbound", {"GET"}, true, NULL},
    {"/stats/users", {"GET"}, true, NULL},
    {"/stats/user", {"GET"}, true, NULL},
    {"/user/sync", {"PUT"}, true, NULL},
    {"/users/sync", {"PUT", "POST"}, true, NULL},
    {"/users/sync/chunked", {"PUT"}, true, NULL},
};

static bool method_allowed(const struct route *r, const char *method)
{
    for (size_t i = 0; i < 2 && r->methods[i]; i++)
        if (strcmp(r->methods[i], method) == 0 ||
            (strcmp(method, "HEAD") == 0 && strcmp(r->methods[i], "GET") == 0))
            return true;
    return false;
}

void pn_pasarguard_rest(struct pn_req *req, void *arg)
{
    struct pn_pasarguard *pg = arg;
    const struct api_error *e =
        check_key(pg, pn_req_header(req, "x-api-key"), pn_req_header(req, "authorization"));
    if (e) {
        rest_error(req, e);
        return;
    }
    const struct route *r = NULL;
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (strcmp(routes[i].path, req->path) == 0)
            r = &routes[i];
    if (!r) {
        pn_req_respond_text(req, 404, "404 page not found");
        return;
    }
    if (!method_allowed(r, req->method)) {
        pn_req_respond(req, 405, NULL, 0, NULL, 0);
        return;
    }
    e = r->guard ? check_backend(pg) : NULL;
    if (e || !r->handler) {
        rest_error(req, e ? e : &err_no_backend);
        return;
    }
    r->handler(pg, req);
}

/* ---- gRPC ---------------------------------------------------------------- */

static void grpc_base_info_answer(struct pn_grpc_call *call, const char *version)
{
    struct pn_pasarguard *pg = pn_grpc_call_service_arg(call);
    size_t len;
    uint8_t *buf = pack_base_info(pg, version, &len);
    pn_grpc_call_send(call, buf, len);
    free(buf);
    pn_grpc_call_finish(call, PN_GRPC_OK, NULL);
}

static void grpc_base_info_version_ready(const char *version, void *arg)
{
    grpc_base_info_answer(arg, version);
}

static void grpc_base_info(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct pn_pasarguard *pg = pn_grpc_call_service_arg(call);
    const char *version = pn_backend_core_version(pg->backend);
    if (version) {
        grpc_base_info_answer(call, version);
        return;
    }
    pn_grpc_call_set_data(call,
                          pn_backend_on_version(pg->backend, grpc_base_info_version_ready, call));
}

static void grpc_base_info_cancel(struct pn_grpc_call *call)
{
    pn_backend_wait_cancel(pn_grpc_call_data(call));
}

/* Methods whose handler is reached only with a started core: until then
 * the guard in intercept answers. */
static void grpc_guarded(struct pn_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct pn_pasarguard *pg = pn_grpc_call_service_arg(call);
    const struct api_error *e = check_backend(pg);
    pn_grpc_call_finish(call, e ? e->grpc_code : PN_GRPC_UNAVAILABLE,
                        e ? e->text : "core is not started yet");
}

static void grpc_guarded_end(struct pn_grpc_call *call)
{
    grpc_guarded(call, NULL, 0);
}

#define NODE_RPC(name) "/service.NodeService/" name
#define GUARDED(name, kind) {NODE_RPC(name), kind, grpc_guarded, grpc_guarded_end, NULL}

static const struct pn_grpc_method methods[] = {
    {NODE_RPC("GetBaseInfo"), PN_GRPC_UNARY, grpc_base_info, NULL, grpc_base_info_cancel},
    GUARDED("Stop", PN_GRPC_UNARY),
    GUARDED("GetLogs", PN_GRPC_SERVER_STREAM),
    GUARDED("GetSystemStats", PN_GRPC_UNARY),
    GUARDED("GetBackendStats", PN_GRPC_UNARY),
    GUARDED("GetStats", PN_GRPC_UNARY),
    GUARDED("GetOutboundsLatency", PN_GRPC_UNARY),
    GUARDED("GetUserOnlineStats", PN_GRPC_UNARY),
    GUARDED("GetUserOnlineIpListStats", PN_GRPC_UNARY),
    GUARDED("SyncUser", PN_GRPC_CLIENT_STREAM),
    GUARDED("SyncUsers", PN_GRPC_UNARY),
    GUARDED("SyncUsersChunked", PN_GRPC_CLIENT_STREAM),
    GUARDED("GetOutboundsStats", PN_GRPC_UNARY),
    GUARDED("GetOutboundStats", PN_GRPC_UNARY),
    GUARDED("GetInboundsStats", PN_GRPC_UNARY),
    GUARDED("GetInboundStats", PN_GRPC_UNARY),
    GUARDED("GetUsersStats", PN_GRPC_UNARY),
    GUARDED("GetUserStats", PN_GRPC_UNARY),
};

/* Auth before anything else, unknown methods included (spec §7.2). */
static bool grpc_intercept(struct pn_grpc_call *call, const struct pn_grpc_method *m)
{
    struct pn_pasarguard *pg = pn_grpc_call_service_arg(call);
    const struct api_error *e = check_key(pg, pn_grpc_call_metadata(call, "x-api-key"),
                                          pn_grpc_call_metadata(call, "authorization"));
    if (!e && m && m->on_message == grpc_guarded)
        e = check_backend(pg);
    if (e) {
        pn_grpc_call_finish(call, e->grpc_code, e->text);
        return false;
    }
    return true;
}

/* ---- lifecycle ------------------------------------------------------------ */

struct pn_pasarguard *pn_pasarguard_new(const struct pn_pasarguard_opts *opts)
{
    struct pn_pasarguard *pg = pn_new(struct pn_pasarguard);
    pg->api_key = opts->api_key;
    pg->backend = opts->backend;
    pg->node_version = pn_strdup(opts->node_version);
    pg->grpc.methods = methods;
    pg->grpc.nmethods = sizeof methods / sizeof methods[0];
    pg->grpc.intercept = grpc_intercept;
    pg->grpc.arg = pg;
    pg->grpc.max_message = MAX_MESSAGE;
    return pg;
}

void pn_pasarguard_free(struct pn_pasarguard *pg)
{
    if (!pg)
        return;
    free(pg->node_version);
    free(pg);
}

const struct pn_grpc_service *pn_pasarguard_grpc(const struct pn_pasarguard *pg)
{
    return &pg->grpc;
}
