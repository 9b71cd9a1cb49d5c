/* The node's counter ledger: traffic read (and reset) out of the core,
 * kept by stat name (`user>>>138>>>traffic>>>uplink`) until a panel has
 * been given it. Banking into it every few seconds and before every
 * planned restart is what lets counters survive core restarts; taking from
 * it only what a reply actually delivered is what keeps reset=true reads
 * from losing traffic. */
#ifndef PN_NODE_LEDGER_H
#define PN_NODE_LEDGER_H

#include <stddef.h>
#include <stdint.h>

struct pn_ledger;

struct pn_ledger *pn_ledger_new(void);
void pn_ledger_free(struct pn_ledger *l);
/* Adds delta to name (creating it). */
void pn_ledger_add(struct pn_ledger *l, const char *name, int64_t delta);
int64_t pn_ledger_get(const struct pn_ledger *l, const char *name);
/* Subtracts value from name, removing it when it reaches 0 (what a reset
 * read delivered). */
void pn_ledger_take(struct pn_ledger *l, const char *name, int64_t value);
/* Calls fn for every entry whose name contains pattern (substring, like
 * the core's QueryStats; "" matches all). fn must not change the ledger. */
void pn_ledger_foreach(const struct pn_ledger *l, const char *pattern,
                       void (*fn)(const char *name, int64_t value, void *arg), void *arg);
size_t pn_ledger_count(const struct pn_ledger *l);
/* Merging a core reply with the ledger without a second table: look each
 * core name up with a mark (non-zero, new per merge), then visit the
 * entries matching pattern that the merge did not meet. name is len bytes
 * (a NUL after it is not needed); the mark lives in the slot array, so the
 * unmarked scan reads the entries of unmet names only. */
int64_t pn_ledger_get_mark(struct pn_ledger *l, const char *name, size_t len, uint32_t mark);
void pn_ledger_foreach_unmarked(const struct pn_ledger *l, const char *pattern, uint32_t mark,
                                void (*fn)(const char *name, int64_t value, void *arg),
                                void *arg);

#endif
