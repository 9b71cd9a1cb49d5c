/* The core as a Marzban panel drives it (spec/marzban.md §3.2, §8,
 * DESIGN.md "Decisions → Marzban start and restart"): one supervised core
 * generation at a time, started from the panel's config (rewritten by
 * node/mzconf.h at every spawn, with the node's own loopback API inbound
 * for readiness), control operations serialised (/start, /restart, /stop;
 * concurrent /restarts queue and the latest config wins), answers when the
 * core is ready (or `fixed`: after 3 s like the reference), 503 with the
 * new process's last non-empty line when it dies, an identical /restart
 * answered without restarting, and a crash restarted with the last config
 * (the owner is told, to invalidate the panel session). The node never
 * reads the core's counters here: the panel reads them on the core's API.
 * Core stdout/stderr lines go into a 100-line ring (the /logs backlog). */
#ifndef PN_NODE_MZCORE_H
#define PN_NODE_MZCORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "node/logring.h"

struct event_base;
struct pn_mzcore;
struct pn_mzcore_op;

struct pn_mzcore_opts {
    struct event_base *base;
    const char *core_path;   /* NULL: none found (start answers 503) */
    const char *assets;
    const char *api_host;    /* XRAY_API_HOST */
    uint16_t api_port;       /* XRAY_API_PORT */
    const char *cert_file, *key_file;
    const char *const *inbounds; /* INBOUNDS filter */
    size_t ninbounds;
    unsigned start_timeout_ms;   /* readiness deadline when waiting for ready */
    bool start_wait_fixed;       /* PROXYNODE_START_WAIT=fixed: answer after 3 s */
    bool restart_identical;      /* PROXYNODE_RESTART_IDENTICAL=restart */
    bool supervise;              /* PROXYNODE_SUPERVISE (default on) */
    bool debug;                  /* echo core lines as `DEBUG: <line>` */
    /* The core crashed and was restarted (or is being): the panel session
     * must be invalidated. Optional. */
    void (*on_crash)(void *arg);
    void *arg;
};

struct pn_mzcore *pn_mzcore_new(const struct pn_mzcore_opts *opts);
/* Kills the core at once (SIGKILL, reaped); no callbacks. */
void pn_mzcore_free(struct pn_mzcore *mz);
/* Graceful: SIGTERM, ≤ 5 s, SIGKILL; cb when reaped. */
void pn_mzcore_shutdown(struct pn_mzcore *mz, void (*cb)(void *arg), void *arg);

/* "1.8.24" / "4.34.0"; "" when no version could be read (JSON null); NULL
 * while the start-up probe runs. */
const char *pn_mzcore_version(const struct pn_mzcore *mz);
/* Spawned and not exited (the "started" of the base body). */
bool pn_mzcore_started(const struct pn_mzcore *mz);
/* The log ring (100 lines). */
struct pn_logring *pn_mzcore_logs(struct pn_mzcore *mz);

/* Completion: rv PN_OK, or an error with the 503 detail (`Xray is started
 * already`, the core's last line, `xray executable not found: <path>`). */
typedef void (*pn_mzcore_cb)(int rv, const char *detail, void *arg);

/* Checks a panel config as /start and /restart must before anything else
 * (spec marzban.md §3.2): PN_OK, or PN_ERR_INVAL with err holding
 * `Failed to decode config: …` (pn_mzconf_rewrite with the peer and the
 * node's real options). The rewrite is kept for the next pn_mzcore_start or
 * pn_mzcore_restart of the same config and peer, so a large config is not
 * rewritten again to compare it with the running one. */
int pn_mzcore_check_config(struct pn_mzcore *mz, const char *config, size_t len,
                           const char *peer_ip, char *err, size_t errlen);

/* /start: PN_ERR_STATE with `Xray is started already` synchronously when a
 * core runs (or is starting); else the config (panel JSON text, validated
 * by the caller with pn_mzcore_check_config) and peer IP are taken and cb runs
 * when the core is ready or failed. */
int pn_mzcore_start(struct pn_mzcore *mz, const char *config, size_t len, const char *peer_ip,
                    pn_mzcore_cb cb, void *arg, struct pn_mzcore_op **op, char *err,
                    size_t errlen);
/* /restart: stop + start, queued behind other control operations; an
 * identical config (after rewriting) while the core runs answers OK
 * without restarting unless restart_identical. When stopped: just starts. */
int pn_mzcore_restart(struct pn_mzcore *mz, const char *config, size_t len, const char *peer_ip,
                      pn_mzcore_cb cb, void *arg, struct pn_mzcore_op **op);
/* /stop (idempotent) and the reference's stop on /connect, /disconnect. */
int pn_mzcore_stop(struct pn_mzcore *mz, pn_mzcore_cb cb, void *arg, struct pn_mzcore_op **op);
/* The caller left: the operation completes without calling back. */
void pn_mzcore_op_detach(struct pn_mzcore_op *op);

#endif
