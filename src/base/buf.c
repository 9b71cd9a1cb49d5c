/* Bounded growable buffer (see buf.h). */
#include "base/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/err.h"

void pn_buf_init(struct pn_buf *b, size_t max)
{
    memset(b, 0, sizeof *b);
    b->max = max;
}

uint8_t *pn_buf_reserve(struct pn_buf *b, size_t n)
{
    if (b->max && (n > b->max || b->len > b->max - n))
        return NULL;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        if (b->max && cap > b->max)
            cap = b->max;
        b->data = pn_realloc(b->data, cap + 1); /* +1 keeps room for a NUL */
        b->cap = cap;
    }
    return b->data + b->len;
}

int pn_buf_append(struct pn_buf *b, const void *data, size_t len)
{
    uint8_t *p = pn_buf_reserve(b, len);
    if (!p)
        return PN_ERR_TOOBIG;
    if (len)
        memcpy(p, data, len);
    b->len += len;
    b->data[b->len] = '\0';
    return PN_OK;
}

int pn_buf_append_str(struct pn_buf *b, const char *s)
{
    return pn_buf_append(b, s, strlen(s));
}

int pn_buf_printf(struct pn_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return PN_ERR_INVAL;
    uint8_t *p = pn_buf_reserve(b, (size_t)n + 1);
    if (!p)
        return PN_ERR_TOOBIG;
    va_start(ap, fmt);
    vsnprintf((char *)p, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return PN_OK;
}

void pn_buf_consume(struct pn_buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->data, b->data + n, b->len - n);
        b->len -= n;
    }
    if (b->data)
        b->data[b->len] = '\0';
}

void pn_buf_reset(struct pn_buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void pn_buf_free(struct pn_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
