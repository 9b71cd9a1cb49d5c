/* HTTP/1.1 server connections (http-parser): keep-alive, request bodies on
 * any method (Content-Length or chunked), streamed chunked answers, header
 * and body limits, idle and slow-client timeouts. Requests are handed to
 * srv->on_request as struct pn_req (net/http.h). */
#ifndef PN_NET_HTTP1_H
#define PN_NET_HTTP1_H

#include "net/http.h"

/* Takes over bev (TLS or plain; BEV_OPT_CLOSE_ON_FREE) whose input buffer may
 * already hold the first bytes, which are processed at once. The connection
 * frees itself when it closes. Never fails. */
struct pn_conn *pn_http1_conn_new(struct bufferevent *bev, const struct pn_http_server *srv,
                                  const struct pn_peer *peer, struct pn_conn_set *set);

#endif
