/* A client of one core's gRPC API (HandlerService, StatsService) over
 * cleartext HTTP/2 (h2c) to its loopback API port. One TCP connection,
 * many calls in flight (HTTP/2 multiplexing) so bulk user changes are not
 * one round trip each; the connection is (re)opened on demand. Replies may
 * be huge (QueryStats with 100k users is ~8 MB): the receive limit is
 * 512 MiB so a reset=true read is never lost to a size limit (cores.md
 * "Data-loss trap").
 *
 * Callbacks: every call that returned PN_OK gets its callback exactly once:
 * with the reply, with an error (connect failure, timeout, gRPC status), or
 * with PN_ERR_CLOSED when the client is freed first. A call that failed to
 * start returns an error and its callback never runs. Callbacks may start
 * new calls, but must not free the client. */
#ifndef PN_CORE_COREAPI_H
#define PN_CORE_COREAPI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/dialect.h"

struct event_base;
struct pn_coreapi;

/* A user's account for one inbound protocol, protocol-free for node/. The
 * strings are borrowed for the duration of the call that takes it. */
enum pn_core_proto {
    PN_CORE_PROTO_VMESS,
    PN_CORE_PROTO_VLESS,
    PN_CORE_PROTO_TROJAN,
    PN_CORE_PROTO_SHADOWSOCKS,  /* classic AEAD; method → dialect cipher enum */
    PN_CORE_PROTO_SS2022,       /* key = base64 PSK */
    PN_CORE_PROTO_HYSTERIA,
};

struct pn_core_account {
    enum pn_core_proto proto;
    const char *id;       /* vmess, vless: canonical UUID */
    const char *flow;     /* vless */
    const char *password; /* trojan, shadowsocks */
    const char *method;   /* shadowsocks */
    const char *key;      /* ss2022 */
    const char *auth;     /* hysteria */
};

/* The outcome of one call. rv: PN_OK (status OK, reply in body), PN_ERR_PROTO
 * (the core answered a non-OK gRPC status: grpc_code and message hold it),
 * PN_ERR_IO (cannot connect / connection lost), PN_ERR_TIMEOUT, PN_ERR_TOOBIG,
 * PN_ERR_CLOSED (client freed). message is always a readable text. */
struct pn_coreapi_result {
    int rv;
    int grpc_code;
    const char *message;
    const uint8_t *body; /* the reply message (without the 5-byte prefix) */
    size_t len;
};
typedef void (*pn_coreapi_cb)(const struct pn_coreapi_result *r, void *arg);

struct pn_coreapi *pn_coreapi_new(struct event_base *base, uint16_t port,
                                  enum pn_core_kind kind);
/* Fails every pending call with PN_ERR_CLOSED, then frees. */
void pn_coreapi_free(struct pn_coreapi *api);
size_t pn_coreapi_pending(const struct pn_coreapi *api);

/* A raw unary call: path as built by pn_dialect_path, request bytes (a
 * serialized message). timeout_ms 0 = none. Returns PN_OK or PN_ERR_INVAL. */
int pn_coreapi_call(struct pn_coreapi *api, const char *path, const uint8_t *req, size_t len,
                    unsigned timeout_ms, pn_coreapi_cb cb, void *arg);

/* HandlerService.AlterInbound with AddUserOperation / RemoveUserOperation.
 * Returns PN_OK, or PN_ERR_INVAL when the account cannot be encoded for this
 * core (e.g. a cipher it lacks). */
int pn_coreapi_add_user(struct pn_coreapi *api, const char *tag, const char *email,
                        uint32_t level, const struct pn_core_account *acct, unsigned timeout_ms,
                        pn_coreapi_cb cb, void *arg);
int pn_coreapi_remove_user(struct pn_coreapi *api, const char *tag, const char *email,
                           unsigned timeout_ms, pn_coreapi_cb cb, void *arg);
/* HandlerService.RemoveInbound (hot handover: the old generation stops
 * accepting on that inbound). */
int pn_coreapi_remove_inbound(struct pn_coreapi *api, const char *tag, unsigned timeout_ms,
                              pn_coreapi_cb cb, void *arg);

/* StatsService.QueryStats: the decoded counters. name is NUL-terminated
 * and len is strlen(name); the names live in the reply buffer (r->body,
 * where they are NUL-terminated in place) and are valid only during the
 * callback. */
struct pn_core_stat {
    const char *name;
    int64_t value;
    size_t len;
};
typedef void (*pn_coreapi_stats_cb)(const struct pn_coreapi_result *r,
                                    const struct pn_core_stat *stats, size_t n, void *arg);
int pn_coreapi_query_stats(struct pn_coreapi *api, const char *pattern, bool reset,
                           unsigned timeout_ms, pn_coreapi_stats_cb cb, void *arg);
/* Inside a QueryStats callback with stats: takes the reply buffer the
 * names point into, so they stay valid after the callback (a merge of 200k
 * counters need not copy them); the caller frees it with free(). NULL
 * anywhere else. */
void *pn_coreapi_take_reply(struct pn_coreapi *api);

/* StatsService.GetSysStats: decoded. */
struct pn_core_sys_stats {
    uint32_t num_goroutine, num_gc;
    uint64_t alloc, total_alloc, sys, mallocs, frees, live_objects, pause_total_ns;
    uint32_t uptime;
};
typedef void (*pn_coreapi_sys_cb)(const struct pn_coreapi_result *r,
                                  const struct pn_core_sys_stats *s, void *arg);
int pn_coreapi_sys_stats(struct pn_coreapi *api, unsigned timeout_ms, pn_coreapi_sys_cb cb,
                         void *arg);

/* Xray only: StatsService.GetStatsOnline (value = online IP count) and
 * GetStatsOnlineIpList (ip → last seen unix seconds), for the stat name
 * `user>>><email>>>>online`. */
typedef void (*pn_coreapi_online_cb)(const struct pn_coreapi_result *r, int64_t value,
                                     void *arg);
int pn_coreapi_stats_online(struct pn_coreapi *api, const char *name, unsigned timeout_ms,
                            pn_coreapi_online_cb cb, void *arg);
struct pn_core_online_ip {
    const char *ip;
    int64_t last_seen;
};
typedef void (*pn_coreapi_iplist_cb)(const struct pn_coreapi_result *r,
                                     const struct pn_core_online_ip *ips, size_t n, void *arg);
int pn_coreapi_stats_online_iplist(struct pn_coreapi *api, const char *name,
                                   unsigned timeout_ms, pn_coreapi_iplist_cb cb, void *arg);

#endif
