/* Core identification from version output (see dialect.h). Parsed by hand
 * rather than with regex.h: the pattern is fixed and tiny. */
#include "core/dialect.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

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
