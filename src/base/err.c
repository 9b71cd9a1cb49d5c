/* Error names and the caller-buffer helper used everywhere. */
#include "base/err.h"

#include <stdarg.h>
#include <stdio.h>

const char *pn_strerror(int err)
{
    switch (err) {
    case PN_OK: return "success";
    case PN_ERR_INVAL: return "invalid argument";
    case PN_ERR_IO: return "i/o error";
    case PN_ERR_NOTFOUND: return "not found";
    case PN_ERR_TOOBIG: return "too large";
    case PN_ERR_PROTO: return "protocol error";
    case PN_ERR_TIMEOUT: return "timed out";
    case PN_ERR_TLS: return "tls error";
    case PN_ERR_AUTH: return "not authorized";
    case PN_ERR_STATE: return "wrong state";
    case PN_ERR_AGAIN: return "try again";
    case PN_ERR_CLOSED: return "closed";
    }
    return "unknown error";
}

int pn_seterr(char *buf, size_t len, int err, const char *fmt, ...)
{
    if (buf && len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, len, fmt, ap);
        va_end(ap);
    }
    return err;
}
