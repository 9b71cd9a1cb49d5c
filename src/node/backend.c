/* The backend (see backend.h). Holds the core version probe's result and
 * the callers waiting for it. */
#include "node/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"
#include "core/probe.h"

#define PROBE_TIMEOUT_MS 5000

struct pn_backend_wait {
    struct pn_backend *b;
    struct pn_backend_wait *prev, *next;
    pn_backend_version_cb cb;
    void *arg;
};

struct pn_backend {
    struct pn_core_probe *probe; /* non-NULL while the probe runs */
    bool version_known;
    char version[32];
    struct pn_backend_wait *waits;
};

static void wait_unlink(struct pn_backend_wait *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        w->b->waits = w->next;
    if (w->next)
        w->next->prev = w->prev;
}

static void on_probe(int rv, const struct pn_core_version *ver, const char *detail, void *arg)
{
    struct pn_backend *b = arg;
    b->probe = NULL;
    b->version_known = true;
    if (rv == PN_OK) {
        snprintf(b->version, sizeof b->version, "%s", ver->text);
        pn_log_info("core: %s", detail);
    } else {
        b->version[0] = '\0';
        pn_log_warn("core version probe failed: %s", detail);
    }
    /* Callbacks may add or cancel waits: detach the list first. */
    struct pn_backend_wait *w = b->waits;
    b->waits = NULL;
    while (w) {
        struct pn_backend_wait *next = w->next;
        w->cb(b->version, w->arg);
        free(w);
        w = next;
    }
}

struct pn_backend *pn_backend_new(struct event_base *base, const char *core_path)
{
    struct pn_backend *b = pn_new(struct pn_backend);
    if (!core_path) {
        b->version_known = true;
        return b;
    }
    char err[256];
    if (pn_core_probe_start(base, core_path, PROBE_TIMEOUT_MS, on_probe, b, &b->probe, err,
                            sizeof err) < 0) {
        pn_log_warn("core version probe: %s", err);
        b->version_known = true;
    }
    return b;
}

void pn_backend_free(struct pn_backend *b)
{
    if (!b)
        return;
    pn_core_probe_cancel(b->probe);
    while (b->waits) {
        struct pn_backend_wait *w = b->waits;
        b->waits = w->next;
        free(w);
    }
    free(b);
}

bool pn_backend_started(const struct pn_backend *b)
{
    (void)b;
    return false; /* no Start path yet: the core lifecycle is the next issue */
}

const char *pn_backend_core_version(const struct pn_backend *b)
{
    return b->version_known ? b->version : NULL;
}

struct pn_backend_wait *pn_backend_on_version(struct pn_backend *b, pn_backend_version_cb cb,
                                              void *arg)
{
    struct pn_backend_wait *w = pn_new(struct pn_backend_wait);
    w->b = b;
    w->cb = cb;
    w->arg = arg;
    w->next = b->waits;
    if (b->waits)
        b->waits->prev = w;
    b->waits = w;
    return w;
}

void pn_backend_wait_cancel(struct pn_backend_wait *w)
{
    if (!w)
        return;
    wait_unlink(w);
    free(w);
}
