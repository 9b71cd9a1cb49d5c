/* The core's log lines for every reader: one ring of the last N lines with
 * sequence numbers, and subscribers that each read at their own pace with
 * their own cursor, so every reader gets every line (fan-out) and a new
 * reader first gets the backlog. A reader that falls more than N lines
 * behind loses its oldest lines (counted) and never blocks the node. */
#ifndef PN_NODE_LOGRING_H
#define PN_NODE_LOGRING_H

#include <stddef.h>
#include <stdint.h>

struct pn_logring;
struct pn_log_sub;

struct pn_logring *pn_logring_new(size_t capacity);
/* Frees the ring; subscribers must be freed first. */
void pn_logring_free(struct pn_logring *r);
/* Appends a copy of the line (no newline) and notifies waiting subscribers. */
void pn_logring_push(struct pn_logring *r, const char *line, size_t len);
size_t pn_logring_count(const struct pn_logring *r);

/* A reader that starts with the last `backlog` lines (capped at what the
 * ring holds). notify runs after a push when the reader had caught up
 * (it was waiting); it may read. */
struct pn_log_sub *pn_log_sub_new(struct pn_logring *r, size_t backlog,
                                  void (*notify)(struct pn_log_sub *s, void *arg), void *arg);
void pn_log_sub_free(struct pn_log_sub *s);
/* The next line (valid until the next push), or NULL when caught up.
 * *dropped (may be NULL) gets the number of lines skipped because the
 * reader fell behind. */
const char *pn_log_sub_next(struct pn_log_sub *s, size_t *len, uint64_t *dropped);

#endif
