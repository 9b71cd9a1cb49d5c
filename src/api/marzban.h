/* The Marzban-node REST API and /logs WebSocket (spec/marzban.md): the
 * single panel session (/connect, /disconnect, session_id checks), the
 * routes and their exact JSON bodies and FastAPI-style errors, the
 * validation answers, and the log stream. The core is node/mzcore.h. */
#ifndef PN_API_MARZBAN_H
#define PN_API_MARZBAN_H

#include <stdbool.h>

#include "net/http.h"

struct event_base;
struct pn_mzcore;
struct pn_marzban;

struct pn_marzban_opts {
    struct event_base *base;
    struct pn_mzcore *core;    /* borrowed; must outlive the front */
    bool connect_stops_core;   /* PROXYNODE_CONNECT_STOPS_CORE */
};

struct pn_marzban *pn_marzban_new(const struct pn_marzban_opts *opts);
void pn_marzban_free(struct pn_marzban *mz);
/* The REST entry point for struct pn_http_server.on_request (arg = front). */
void pn_marzban_rest(struct pn_req *req, void *arg);
/* The transports' own errors (400/404/405/413/431) as `{"detail": ...}`,
 * for struct pn_http_server.respond_error. */
void pn_marzban_respond_error(struct pn_req *req, int status, const char *text);
/* The core crashed: invalidate the session (the panel reconnects and
 * pushes a fresh config); open /logs streams close with 1000. */
void pn_marzban_invalidate_session(struct pn_marzban *mz);
/* Ends open /logs streams (node stop). */
void pn_marzban_end_streams(struct pn_marzban *mz);

#endif
