/* The node's TLS port: accepts TCP, runs the TLS handshake (bounded in
 * time), then sniffs the first bytes without writing anything: the HTTP/2
 * preface goes to h2.c, anything else to http1.c. Owns every connection it
 * accepted, for shutdown. */
#ifndef PN_NET_LISTENER_H
#define PN_NET_LISTENER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "net/http.h"

struct pn_tls;

struct pn_listener_opts {
    const char *host;            /* IPv4 or IPv6 literal */
    uint16_t port;               /* 0 = any free port */
    struct pn_tls *tls;          /* borrowed */
    const struct pn_http_server *srv; /* borrowed */
    unsigned handshake_timeout_ms;    /* 10 s */
};

struct pn_listener;

/* Binds and starts accepting. Returns PN_OK or PN_ERR_IO with detail. */
int pn_listener_new(const struct pn_listener_opts *opts, struct pn_listener **out, char *err,
                    size_t errlen);
uint16_t pn_listener_port(const struct pn_listener *l);
/* Stops accepting and asks every connection to finish gracefully. */
void pn_listener_shutdown(struct pn_listener *l);
size_t pn_listener_conn_count(const struct pn_listener *l);
/* Closes everything at once. */
void pn_listener_free(struct pn_listener *l);

#endif
