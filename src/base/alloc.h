/* The node's one OOM policy: allocation never returns NULL. On failure the
 * process prints a message and aborts (systemd restarts a daemon), so no
 * caller carries an untested NULL path. */
#ifndef PN_BASE_ALLOC_H
#define PN_BASE_ALLOC_H

#include <stddef.h>

void *pn_malloc(size_t n);
void *pn_calloc(size_t count, size_t size);
void *pn_realloc(void *p, size_t n);
char *pn_strdup(const char *s);
char *pn_strndup(const char *s, size_t n);
/* printf into a newly allocated string; caller frees. */
char *pn_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define pn_new(type) ((type *)pn_calloc(1, sizeof(type)))

#endif
