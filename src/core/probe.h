/* The core version probe: runs `<exe> -version` (stdin from /dev/null, 5 s
 * deadline; both Xray and v2ray 4.34 accept the flag) without blocking the
 * event loop, and reports the parsed version. GetBaseInfo answers from it
 * before any core was started. */
#ifndef PN_CORE_PROBE_H
#define PN_CORE_PROBE_H

#include <stddef.h>

#include "core/dialect.h"

struct event_base;
struct pn_core_probe;

/* Called exactly once unless the probe is cancelled first: rv is PN_OK with
 * *ver filled, PN_ERR_IO (could not run), PN_ERR_TIMEOUT or PN_ERR_INVAL (no
 * version line); detail is a human-readable reason. */
typedef void (*pn_core_probe_cb)(int rv, const struct pn_core_version *ver, const char *detail,
                                 void *arg);

/* Starts the probe. If starting fails the callback is never called and the
 * error is returned (PN_ERR_IO with detail in err). */
int pn_core_probe_start(struct event_base *base, const char *exe, unsigned timeout_ms,
                        pn_core_probe_cb cb, void *arg, struct pn_core_probe **out, char *err,
                        size_t errlen);
/* Kills and reaps the child if still running; the callback is not called. */
void pn_core_probe_cancel(struct pn_core_probe *p);

#endif
