/* The PasarGuard / Gozargah node API (spec/pasarguard.md): the REST routes
 * and the gRPC method table of service.NodeService on the shared port, the
 * x-api-key check in front of both, and the translation of protobuf
 * messages to node/ calls. */
#ifndef PN_API_PASARGUARD_H
#define PN_API_PASARGUARD_H

#include "base/uuid.h"
#include "net/grpc.h"
#include "net/http.h"

struct pn_backend;
struct pn_pasarguard;

struct pn_pasarguard_opts {
    struct pn_uuid api_key;     /* copied */
    struct pn_backend *backend; /* borrowed */
    const char *node_version;   /* borrowed, e.g. PN_VERSION */
};

struct pn_pasarguard *pn_pasarguard_new(const struct pn_pasarguard_opts *opts);
void pn_pasarguard_free(struct pn_pasarguard *pg);

/* The gRPC service to put in struct pn_http_server.grpc. */
const struct pn_grpc_service *pn_pasarguard_grpc(const struct pn_pasarguard *pg);
/* The REST entry point for struct pn_http_server.on_request (arg = pg). */
void pn_pasarguard_rest(struct pn_req *req, void *arg);

#endif
