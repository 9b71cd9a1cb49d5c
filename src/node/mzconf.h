/* The Marzban config rewrite (spec/marzban.md §7): pure, no I/O. The
 * panel's Xray config (already decoded from its double-encoded string)
 * gets the panel's API inbound and API rules removed (every match), the
 * INBOUNDS filter applied, `api` and `stats` overwritten, the TLS
 * dokodemo-door API_INBOUND on XRAY_API_HOST:XRAY_API_PORT with the node's
 * certificate inserted first, the rule locking it to 127.0.0.1 and the
 * panel's IP inserted first, `log.logLevel` none/error raised to warning;
 * everything else kept, in the original key order, numbers exactly as
 * written (even past 64 bits) and non-ASCII text intact. Optionally the
 * node's own cleartext loopback API inbound (for readiness and health
 * checks) is added too. */
#ifndef PN_NODE_MZCONF_H
#define PN_NODE_MZCONF_H

#include <stddef.h>
#include <stdint.h>

#define PN_MZ_INTERNAL_API_TAG "PN_NODE_API"

struct pn_mzconf_opts {
    const char *config; /* the panel's config JSON text */
    size_t len;
    const char *api_host;  /* XRAY_API_HOST */
    uint16_t api_port;     /* XRAY_API_PORT */
    const char *cert_file; /* SSL_CERT_FILE */
    const char *key_file;  /* SSL_KEY_FILE */
    const char *peer_ip;   /* the IP that called /connect (IPv4-mapped shown as IPv4) */
    const char *const *inbounds; /* INBOUNDS filter; n = 0: keep all */
    size_t ninbounds;
    /* != 0: also add {"tag":"PN_NODE_API","listen":"127.0.0.1","port":p,
     * "protocol":"dokodemo-door","settings":{"address":"127.0.0.1"}} and a
     * rule {"type":"field","inboundTag":["PN_NODE_API"],"source":
     * ["127.0.0.1"],"outboundTag":"API"} right after the panel's rule. */
    uint16_t internal_api_port;
};

/* Returns PN_OK with a malloc'd NUL-terminated text in *out, or
 * PN_ERR_INVAL with err holding `Failed to decode config: <parser
 * message>` (not JSON) or `Failed to decode config: the config must be a
 * JSON object` — the texts go into the 422 body's detail.config. */
int pn_mzconf_rewrite(const struct pn_mzconf_opts *o, char **out, size_t *outlen, char *err,
                      size_t errlen);

#endif
