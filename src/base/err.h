/* One error vocabulary for the whole node: negative codes, 0 is success.
 * Functions that can fail return int (0 or a negative pn_err) and, where a
 * human needs detail, write it into a buffer the caller supplies. */
#ifndef PN_BASE_ERR_H
#define PN_BASE_ERR_H

#include <stddef.h>

enum pn_err {
    PN_OK = 0,
    PN_ERR_INVAL = -1,    /* bad input: a value, a message, a request */
    PN_ERR_IO = -2,       /* a system call failed; errno-style detail in the buffer */
    PN_ERR_NOTFOUND = -3, /* no such file, route, method, user */
    PN_ERR_TOOBIG = -4,   /* over a size limit */
    PN_ERR_PROTO = -5,    /* a peer broke a protocol */
    PN_ERR_TIMEOUT = -6,
    PN_ERR_TLS = -7,
    PN_ERR_AUTH = -8,
    PN_ERR_STATE = -9,   /* not possible in the current state */
    PN_ERR_AGAIN = -10,  /* would block / try later */
    PN_ERR_CLOSED = -11, /* the peer or object is gone */
};

/* A short English name for an error code ("invalid argument", ...). */
const char *pn_strerror(int err);

/* Formats detail into buf (always NUL-terminated when len > 0) and returns
 * err, so callers can write `return pn_seterr(buf, len, PN_ERR_INVAL, ...)`.
 * buf may be NULL. */
int pn_seterr(char *buf, size_t len, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
