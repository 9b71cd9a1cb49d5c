/* Core identification from version output (see dialect.h). Parsed by hand
 * rather than with regex.h: the pattern is fixed and tiny. */
#include "core/dialect.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "base/err.h"

/* Reads 1+ decimal digits into *v; returns the position after them or NULL. */
static const char *read_num(const char *p, int *v)
{
    long n = 0;
    const char *start = p;
    while (*p >= '0' && *p <= '9') {
        n = n * 10 + (*p - '0');
        if (n > INT_MAX / 10)
            return NULL;
        p++;
    }
    if (p == start)
        return NULL;
    *v = (int)n;
    return p;
}

int pn_core_parse_version(const char *text, struct pn_core_version *out)
{
    memset(out, 0, sizeof *out);
    const char *p;
    if (strncmp(text, "Xray ", 5) == 0) {
        out->kind = PN_CORE_XRAY;
        p = text + 5;
    } else if (strncmp(text, "V2Ray ", 6) == 0) {
        out->kind = PN_CORE_V2RAY;
        p = text + 6;
    } else {
        return PN_ERR_INVAL;
    }
    if (!(p = read_num(p, &out->major)) || *p++ != '.' || !(p = read_num(p, &out->minor)) ||
        *p++ != '.' || !(p = read_num(p, &out->patch))) {
        out->kind = PN_CORE_UNKNOWN;
        return PN_ERR_INVAL;
    }
    snprintf(out->text, sizeof out->text, "%d.%d.%d", out->major, out->minor, out->patch);
    return PN_OK;
}

const char *pn_core_kind_name(enum pn_core_kind kind)
{
    switch (kind) {
    case PN_CORE_XRAY: return "xray";
    case PN_CORE_V2RAY: return "v2ray";
    case PN_CORE_UNKNOWN: break;
    }
    return "unknown";
}

char *pn_dialect_path(enum pn_core_kind kind, enum pn_core_service svc, const char *method,
                      char *out, size_t outlen)
{
    static const char *const names[] = {
        [PN_SVC_HANDLER] = "app.proxyman.command.HandlerService",
        [PN_SVC_STATS] = "app.stats.command.StatsService",
        [PN_SVC_LOGGER] = "app.log.command.LoggerService",
    };
    snprintf(out, outlen, "/%s%s/%s", kind == PN_CORE_V2RAY ? "v2ray.core." : "xray.",
             names[svc], method);
    return out;
}

char *pn_dialect_type(enum pn_core_kind kind, const char *suffix, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s%s", kind == PN_CORE_V2RAY ? "v2ray.core." : "xray.", suffix);
    return out;
}

int pn_dialect_ss_cipher(enum pn_core_kind kind, const char *method)
{
    /* cores.md §3: the enums are incompatible between the cores. */
    static const struct {
        const char *name;
        int xray, v2ray;
    } ciphers[] = {
        {"aes-128-gcm", 5, 1},
        {"aes-256-gcm", 6, 2},
        {"chacha20-poly1305", 7, 3},
        {"chacha20-ietf-poly1305", 7, 3},
        {"xchacha20-poly1305", 8, -1},
        {"xchacha20-ietf-poly1305", 8, -1},
        {"none", 9, 4},
        {"plain", 9, 4},
    };
    for (size_t i = 0; i < sizeof ciphers / sizeof ciphers[0]; i++)
        if (strcasecmp(method, ciphers[i].name) == 0)
            return kind == PN_CORE_V2RAY ? ciphers[i].v2ray : ciphers[i].xray;
    return -1;
}

/* Xray's versions are comparable as (major, minor, patch) across its 1.x
 * and date-based (YY.M.D) schemes, since 24 > 1. */
static bool xray_at_least(const struct pn_core_version *v, int major, int minor, int patch)
{
    if (v->kind != PN_CORE_XRAY)
        return false;
    if (v->major != major)
        return v->major > major;
    if (v->minor != minor)
        return v->minor > minor;
    return v->patch >= patch;
}

bool pn_dialect_has_online_stats(const struct pn_core_version *v)
{
    return xray_at_least(v, 24, 11, 5);
}

bool pn_dialect_has_online_iplist(const struct pn_core_version *v)
{
    return xray_at_least(v, 25, 2, 18);
}

bool pn_dialect_multi_user_ss(const struct pn_core_version *v)
{
    return v->kind == PN_CORE_XRAY;
}

bool pn_dialect_has_ss_none(const struct pn_core_version *v)
{
    if (v->kind == PN_CORE_V2RAY)
        return true;
    return v->kind == PN_CORE_XRAY && !xray_at_least(v, 26, 7, 11);
}
