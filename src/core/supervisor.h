/* Runs a backend's core as generations of processes (spec/cores.md "Hot
 * handover", DESIGN.md "Core process"). A generation is one core process:
 * spawned with `<exe> -config stdin:` in its own session with
 * PR_SET_PDEATHSIG, its config written to stdin, XRAY_LOCATION_ASSET and
 * V2RAY_LOCATION_ASSET set, stdout/stderr split into lines, watched through
 * a pidfd and always reaped. Ready = its API answers GetSysStats (polled
 * every 75 ms) before the start deadline; a failure marker line (spec
 * pasarguard.md §14) or an exit before that fails the start.
 *
 * Start brings up a new generation next to the active one (cores bind with
 * SO_REUSEPORT, so both accept); when the new one is ready it becomes
 * active and the old one is retired: on_retire lets the owner remove the
 * old one's user-facing inbounds, then after the drain time (or as soon as
 * it holds no client connection) before_stop lets the owner bank its
 * counters and it is stopped (SIGTERM, 5 s, SIGKILL). A failed start kills
 * and reaps the new process; the active one keeps serving.
 *
 * When the active generation dies unexpectedly, the supervisor restarts it
 * with backoff (100 ms doubling to 10 s; reset after 60 s healthy), building
 * a fresh config (so the current users are in it), until stopped. */
#ifndef PN_CORE_SUPERVISOR_H
#define PN_CORE_SUPERVISOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "core/dialect.h"

struct event_base;
struct pn_coreapi;
struct pn_supervisor;
struct pn_core_gen;

/* Accessors for a generation (valid until it exited and on_* returned). */
struct pn_coreapi *pn_core_gen_api(const struct pn_core_gen *gen); /* its API client */
uint16_t pn_core_gen_api_port(const struct pn_core_gen *gen);
pid_t pn_core_gen_pid(const struct pn_core_gen *gen);
uint64_t pn_core_gen_id(const struct pn_core_gen *gen);         /* 1, 2, 3 ... */
uint64_t pn_core_gen_started_ms(const struct pn_core_gen *gen); /* monotonic, at ready */
/* Opaque owner data per generation (e.g. the config it was built from). */
void pn_core_gen_set_data(struct pn_core_gen *gen, void *data, void (*free_data)(void *));
void *pn_core_gen_data(const struct pn_core_gen *gen);

struct pn_supervisor_opts {
    struct event_base *base;
    const char *exe;    /* copied */
    const char *assets; /* copied */
    enum pn_core_kind kind;
    unsigned start_timeout_ms; /* readiness deadline (PROXYNODE_START_TIMEOUT) */
    unsigned drain_ms;         /* longest a retired generation keeps serving (default 60 s) */
    unsigned startup_tail;     /* lines kept for error texts (STARTUP_LOG_TAIL_SIZE) */
    /* Builds the config of a new generation whose API listens on 127.0.0.1:
     * api_port. Called for every spawn (start and crash restarts). Returns a
     * malloc'd text (the supervisor frees it) or NULL with err filled; gen
     * is the new generation, for pn_core_gen_set_data. */
    char *(*build_config)(struct pn_core_gen *gen, uint16_t api_port, size_t *len, char *err,
                          size_t errlen, void *arg);
    /* Every line a core writes (no newline; lines over 16 KiB are cut). */
    void (*on_line)(const struct pn_core_gen *gen, const char *line, size_t len, void *arg);
    /* A generation is being retired after a handover: typically remove its
     * user-facing inbounds so it stops accepting. Optional. */
    void (*on_retire)(struct pn_core_gen *gen, void *arg);
    /* A generation is about to be stopped on purpose: last chance to read its
     * counters. Call done(gen) when finished (possibly before returning).
     * Optional. */
    void (*before_stop)(struct pn_core_gen *gen, void (*done)(struct pn_core_gen *gen),
                        void *arg);
    /* The active generation died unexpectedly (detail = exit status and last
     * line); a restart follows in delay_ms. Optional. */
    void (*on_crash)(const char *detail, unsigned delay_ms, void *arg);
    /* A crash restart is ready and active. Optional. */
    void (*on_restarted)(struct pn_core_gen *gen, void *arg);
    void *arg;
};

struct pn_supervisor *pn_supervisor_new(const struct pn_supervisor_opts *opts);
/* Kills (SIGKILL) and reaps every process at once; no callbacks run. */
void pn_supervisor_free(struct pn_supervisor *sup);

/* Starts a new generation as described above. cb runs exactly once unless
 * the supervisor is freed first: rv PN_OK with the now-active gen, or an
 * error (PN_ERR_INVAL: build_config failed; PN_ERR_IO: cannot spawn;
 * PN_ERR_PROTO: the core failed: err holds `failed to start xray: <line>`
 * or `xray process stopped before API became ready; recent xray logs:\n…`;
 * PN_ERR_TIMEOUT). A start while another start is pending fails that one
 * with PN_ERR_STATE (`start superseded`) and kills its process. */
typedef void (*pn_supervisor_start_cb)(int rv, const char *err, struct pn_core_gen *gen,
                                       void *arg);
int pn_supervisor_start(struct pn_supervisor *sup, pn_supervisor_start_cb cb, void *arg);

/* Stops every generation (before_stop for each, then SIGTERM, SIGKILL
 * after 5 s) and cancels restarts. cb (optional) runs when all are reaped. */
void pn_supervisor_stop(struct pn_supervisor *sup, void (*cb)(void *arg), void *arg);

/* The active generation (ready and serving), or NULL: none started, stopped,
 * or restarting after a crash. */
struct pn_core_gen *pn_supervisor_active(const struct pn_supervisor *sup);
/* true between a crash and the restart being ready. */
bool pn_supervisor_restarting(const struct pn_supervisor *sup);
/* Every live generation (active and retiring), for banking counters. */
size_t pn_supervisor_gens(const struct pn_supervisor *sup, struct pn_core_gen **out, size_t max);

#endif
