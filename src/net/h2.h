/* HTTP/2 server connections (nghttp2 1.52). Requests whose content-type
 * starts with application/grpc go to the gRPC layer (net/grpc.h); all others
 * are REST requests handed to srv->on_request as struct pn_req. The server
 * sends nothing before the client's preface; GOAWAY on shutdown. */
#ifndef PN_NET_H2_H
#define PN_NET_H2_H

#include "net/http.h"

/* Takes over bev whose input buffer already holds (the start of) the client
 * connection preface. The connection frees itself when it closes. */
struct pn_conn *pn_h2_conn_new(struct bufferevent *bev, const struct pn_http_server *srv,
                               const struct pn_peer *peer, struct pn_conn_set *set);

#endif
