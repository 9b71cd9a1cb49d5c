/* The node's backend: the core it runs for the panel. This module will own
 * the core's lifecycle (start, stop, sync); today it owns the core's
 * identity: which binary is configured and what version it reports, probed
 * once at start-up without blocking the loop, so GetBaseInfo can answer
 * before any Start. Protocol-free: api/ translates. */
#ifndef PN_NODE_BACKEND_H
#define PN_NODE_BACKEND_H

#include <stdbool.h>

struct event_base;
struct pn_backend;
struct pn_backend_wait;

/* core_path may be NULL (no core found): the version is then "". */
struct pn_backend *pn_backend_new(struct event_base *base, const char *core_path);
void pn_backend_free(struct pn_backend *b);

/* Whether a core was started for a panel (Start). */
bool pn_backend_started(const struct pn_backend *b);

/* The configured core's version ("4.34.0"; "" when there is no usable
 * core), or NULL while the start-up probe still runs. */
const char *pn_backend_core_version(const struct pn_backend *b);

/* Runs cb once the probe ends (cb gets the version as above), unless the
 * returned wait is cancelled first. Only valid while the version is NULL. */
typedef void (*pn_backend_version_cb)(const char *version, void *arg);
struct pn_backend_wait *pn_backend_on_version(struct pn_backend *b, pn_backend_version_cb cb,
                                              void *arg);
void pn_backend_wait_cancel(struct pn_backend_wait *w);

#endif
