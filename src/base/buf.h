/* A growable byte buffer with a hard maximum, for anything a peer can make
 * grow (bodies, messages, header blocks). Appending past the maximum fails
 * with PN_ERR_TOOBIG and leaves the buffer unchanged. */
#ifndef PN_BASE_BUF_H
#define PN_BASE_BUF_H

#include <stddef.h>
#include <stdint.h>

struct pn_buf {
    uint8_t *data;
    size_t len;
    size_t cap;
    size_t max; /* 0 = no limit (only for data the node itself produces) */
};

void pn_buf_init(struct pn_buf *b, size_t max);
/* Returns PN_OK or PN_ERR_TOOBIG. */
int pn_buf_append(struct pn_buf *b, const void *data, size_t len);
int pn_buf_append_str(struct pn_buf *b, const char *s);
int pn_buf_printf(struct pn_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Makes room for n more bytes and returns a pointer to them (len unchanged);
 * NULL when that would pass the maximum. */
uint8_t *pn_buf_reserve(struct pn_buf *b, size_t n);
/* Drops the first n bytes. */
void pn_buf_consume(struct pn_buf *b, size_t n);
void pn_buf_reset(struct pn_buf *b);
void pn_buf_free(struct pn_buf *b);

#endif
