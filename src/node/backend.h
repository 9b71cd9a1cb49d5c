/* The node's backend: the core it runs for a panel, protocol-free (api/
 * translates). It owns the panel session (Start/Stop/keep-alive), the
 * user set and its sync to the running core through the core API (a diff:
 * no restart for user changes), the counter ledger (banked every few
 * seconds and before planned restarts, so counters survive restarts), the
 * log ring every reader subscribes to, host statistics, and the core's
 * identity probed at start-up (so GetBaseInfo answers before any Start).
 *
 * Asynchronous operations report through a callback exactly once, unless
 * the caller detaches first (pn_backend_op_detach): the operation still
 * completes (a Start finishes even if the panel left) but no callback runs.
 * A function that fails synchronously never calls its callback. */
#ifndef PN_NODE_BACKEND_H
#define PN_NODE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/coreapi.h"
#include "node/logring.h"
#include "node/sysstats.h"
#include "node/users.h"

struct event_base;
struct pn_backend;
struct pn_backend_op;
struct pn_backend_wait;

struct pn_backend_opts {
    struct event_base *base;
    const char *core_path;          /* NULL: no core found */
    const char *assets;             /* XRAY_ASSETS_PATH */
    unsigned start_timeout_ms;      /* PROXYNODE_START_TIMEOUT */
    unsigned bank_interval_ms;      /* PROXYNODE_STATS_BANK_INTERVAL */
    size_t log_buffer_size;         /* LOG_BUFFER_SIZE */
    unsigned startup_tail;          /* STARTUP_LOG_TAIL_SIZE */
    bool keepalive_stops_core;      /* PROXYNODE_KEEPALIVE_STOPS_CORE */
    bool debug;                     /* echo core lines; write the generated config */
    const char *generated_config_path;
    unsigned drain_ms;              /* handover drain bound (0 = 60 s) */
};

struct pn_backend *pn_backend_new(const struct pn_backend_opts *opts);
/* Kills the core at once (node exit); pending callbacks do not run. */
void pn_backend_free(struct pn_backend *b);
/* Graceful node stop: banks nothing more, stops the core (SIGTERM, up to
 * 5 s), then cb. */
void pn_backend_shutdown(struct pn_backend *b, void (*cb)(void *arg), void *arg);

/* ---- identity ---------------------------------------------------------- */

/* The configured core's version ("4.34.0"; "" when there is no usable
 * core), or NULL while the start-up probe still runs. */
const char *pn_backend_core_version(const struct pn_backend *b);
typedef void (*pn_backend_version_cb)(const char *version, void *arg);
/* Runs cb once the probe ends, unless the returned wait is cancelled. Only
 * while pn_backend_core_version is NULL. */
struct pn_backend_wait *pn_backend_on_version(struct pn_backend *b, pn_backend_version_cb cb,
                                              void *arg);
void pn_backend_wait_cancel(struct pn_backend_wait *w);

/* ---- state and guard ---------------------------------------------------- */

enum pn_backend_state {
    PN_BACKEND_NONE,       /* no panel session: never started, or stopped */
    PN_BACKEND_STARTING,   /* first Start in progress */
    PN_BACKEND_RUNNING,    /* a core serves */
    PN_BACKEND_RESTARTING, /* the core crashed; the node restarts it */
};
enum pn_backend_state pn_backend_state(const struct pn_backend *b);
/* true when a core is started and serving (GetBaseInfo.started). */
bool pn_backend_started(const struct pn_backend *b);
/* The guard of calls that need a started core: NULL when RUNNING, else
 * "backend not initialized" (NONE) or "core is not started yet". */
const char *pn_backend_guard(const struct pn_backend *b);

/* Marks panel activity (keep-alive). Open streams count as activity while
 * they are open: bracket them with stream_begin/stream_end. */
void pn_backend_touch(struct pn_backend *b);
void pn_backend_stream_begin(struct pn_backend *b);
void pn_backend_stream_end(struct pn_backend *b);

void pn_backend_op_detach(struct pn_backend_op *op);

/* Generic completion: rv PN_OK, or an error with a panel-facing text. */
typedef void (*pn_backend_done_cb)(int rv, const char *err, void *arg);

/* ---- lifecycle ------------------------------------------------------------ */

struct pn_backend_start_req {
    const char *config; /* Backend.config JSON */
    size_t config_len;
    struct pn_userset *users; /* stolen */
    const char *const *exclude;
    size_t nexclude;
    uint64_t keep_alive_s; /* 0 = off */
};
/* Start (or take over): builds the config (a bad config fails at once with
 * PN_ERR_INVAL and the JSON error text, leaving any running core alone),
 * brings up a new core generation and hands over from the old one.
 * Errors: PN_ERR_INVAL (config), PN_ERR_STATE (no core binary),
 * PN_ERR_PROTO / PN_ERR_TIMEOUT (the core failed: `failed to start xray:
 * …`), PN_ERR_IO. */
int pn_backend_start(struct pn_backend *b, const struct pn_backend_start_req *req,
                     pn_backend_done_cb cb, void *arg, struct pn_backend_op **op, char *err,
                     size_t errlen);
/* Stop: banks the counters, stops the core, ends the session. */
int pn_backend_stop(struct pn_backend *b, pn_backend_done_cb cb, void *arg,
                    struct pn_backend_op **op);

/* ---- users ------------------------------------------------------------------- */

/* SyncUser: one user's add / change / removal (inbounds empty = remove
 * everywhere), applied through the core API; unchanged users cost nothing.
 * err on failure: `failed to update user: …` style per-user texts. */
int pn_backend_sync_user(struct pn_backend *b, struct pn_user *u, pn_backend_done_cb cb,
                         void *arg, struct pn_backend_op **op);
/* SyncUsers: replace the whole set (stolen) by applying the diff. */
int pn_backend_sync_users(struct pn_backend *b, struct pn_userset *all, pn_backend_done_cb cb,
                          void *arg, struct pn_backend_op **op);
/* SyncUsersChunked: add, replace or remove only the listed users (stolen
 * array of stolen users). */
int pn_backend_sync_some(struct pn_backend *b, struct pn_user **users, size_t n,
                         pn_backend_done_cb cb, void *arg, struct pn_backend_op **op);
size_t pn_backend_user_count(const struct pn_backend *b);

/* ---- stats ------------------------------------------------------------------- */

struct pn_backend_stat {
    char *name; /* full stat name: user>>>138>>>traffic>>>uplink */
    int64_t value;
};
struct pn_backend_stats {
    struct pn_backend_stat *items;
    size_t n;
    bool reset; /* the values must be taken from the ledger once delivered */
};
/* Frees an answer pn_backend_query_stats made (with its item names, which
 * it keeps in a few large blocks rather than one allocation each). */
void pn_backend_stats_free(struct pn_backend_stats *s);

/* Counters whose name contains pattern (QueryStats semantics), ledger plus
 * core. With reset, the core's counters are banked (read with reset) first
 * and the answer comes from the ledger; the caller then calls
 * pn_backend_stats_delivered once the reply went out, and only then are
 * those amounts removed, so a reply that never arrives loses nothing. */
typedef void (*pn_backend_stats_cb)(int rv, int grpc_code, const char *err,
                                    struct pn_backend_stats *stats, void *arg);
int pn_backend_query_stats(struct pn_backend *b, const char *pattern, bool reset,
                           pn_backend_stats_cb cb, void *arg, struct pn_backend_op **op);
void pn_backend_stats_delivered(struct pn_backend *b, const struct pn_backend_stats *s);

/* Core GetSysStats (health). err `failed to get sys stats: <core error>`. */
typedef void (*pn_backend_sys_cb)(int rv, int grpc_code, const char *err,
                                  const struct pn_core_sys_stats *s, void *arg);
int pn_backend_core_sys_stats(struct pn_backend *b, pn_backend_sys_cb cb, void *arg,
                              struct pn_backend_op **op);

/* Xray online stats for an email: count of online IPs / the IP list.
 * NotFound (grpc 5) with `user>>><email>>>>online not found.` when the core
 * has no online stats or the user is absent. */
typedef void (*pn_backend_online_cb)(int rv, int grpc_code, const char *err, int64_t value,
                                     const struct pn_core_online_ip *ips, size_t nips,
                                     void *arg);
int pn_backend_online(struct pn_backend *b, const char *email, bool ip_list,
                      pn_backend_online_cb cb, void *arg, struct pn_backend_op **op);

/* Outbound latencies from the core's observatory (Xray's metrics endpoint
 * /debug/vars), one per outbound, filtered by tag when name is non-empty,
 * sorted by tag, blackhole/dns/loopback outbounds left out. Empty without a
 * core, metrics or observatory (always on v2ray), and when the endpoint
 * cannot be read (logged): never an error. */
struct pn_backend_latency {
    const char *tag;
    bool alive;
    int64_t delay, last_seen_time, last_try_time;
};
typedef void (*pn_backend_latency_cb)(const struct pn_backend_latency *items, size_t n,
                                      void *arg);
int pn_backend_latency(struct pn_backend *b, const char *name, pn_backend_latency_cb cb,
                       void *arg, struct pn_backend_op **op);

/* Host statistics (latest sample) and the core's uptime in seconds. */
void pn_backend_system_stats(const struct pn_backend *b, struct pn_sysstats *out,
                             uint64_t *core_uptime_s);

/* ---- logs ----------------------------------------------------------------------- */

/* The ring of core lines (LOG_BUFFER_SIZE). */
struct pn_logring *pn_backend_logs(struct pn_backend *b);
/* Listeners told when the panel session ends (Stop, a new Start, keep-alive
 * stop), so log streams can end cleanly. */
struct pn_backend_listener {
    void (*on_session_end)(struct pn_backend_listener *l);
    struct pn_backend_listener *prev, *next; /* the backend's */
};
void pn_backend_listen(struct pn_backend *b, struct pn_backend_listener *l);
void pn_backend_unlisten(struct pn_backend *b, struct pn_backend_listener *l);

#endif
