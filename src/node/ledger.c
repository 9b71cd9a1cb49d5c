/* The counter ledger (see ledger.h): a hash map from stat name to a
 * positive int64, sized for the node's worst case (100k users x 2 counters
 * plus inbounds and outbounds). It owns one allocation per entry, holding
 * the value and the name inline, and one slot array. The map is open
 * addressing with linear probing and backward-shift deletion, so there are
 * no tombstones and a removal leaves the table as if the entry had never
 * been there. Each slot caches 32 bits of the hash, so a probe only
 * touches an entry's memory when the hashes agree, and the mark of the
 * last merge that met the entry (pn_ledger_get_mark), so a scan for the
 * entries a merge did not meet reads only the slot array.
 *
 * An entry exists only while its value is above zero: a value is traffic
 * banked and not yet delivered, and "nothing banked" is the same as "no
 * entry". So adding 0 to an absent name creates nothing, and a sum or a
 * take that reaches 0 or below removes the entry (below 0 is a caller bug,
 * clamped rather than kept as debt). */
#include "node/ledger.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"

#define MIN_SLOTS 16

struct entry {
    int64_t value;
    size_t len;
    char name[]; /* NUL-terminated, len bytes before the NUL */
};

/* The slot keeps the low 32 bits of the hash (the home slot comes from
 * them, so tables stay below 2^32 slots) and the merge mark, so that
 * neither a probe past other entries nor a scan for unmarked entries has
 * to touch the entries themselves. */
struct slot {
    uint32_t hash;
    uint32_t mark;   /* the last merge that met this entry (pn_ledger_get_mark) */
    struct entry *e; /* NULL: empty */
};

struct pn_ledger {
    struct slot *slots;
    size_t mask; /* slot count - 1; the slot count is a power of two */
    size_t count;
};

/* QueryStats matching: pattern is a substring of name ("" matches all).
 * The common patterns ("user>>>", "outbound>>>") are prefixes, so the
 * substring search runs only for names that do not start with them. */
static bool matches(const char *name, size_t len, const char *pattern, size_t plen)
{
    if (!plen)
        return true;
    if (len < plen)
        return false;
    return memcmp(name, pattern, plen) == 0 || memmem(name + 1, len - 1, pattern, plen);
}

/* Eight bytes at a time (a multiply and a shift per word), then a 64-bit
 * finaliser so that the low bits (the slot index) depend on every byte:
 * stat names share long prefixes and differ in a few digits in the middle.
 * A merge of 200k counters hashes every name once, so this is on the hot
 * path: the last partial word is read as the 8 bytes ending the name
 * (shifted) rather than copied byte by byte. */
static uint64_t hash_name(const char *s, size_t len)
{
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (len * 0xff51afd7ed558ccdULL);
    uint64_t w;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ULL;
        h ^= h >> 29;
    }
    if (i < len) {
        if (len >= 8) {
            memcpy(&w, s + len - 8, 8);
            w >>= 8 * (8 - (len - i));
        } else {
            w = 0;
            for (size_t k = 0; k < len; k++)
                w |= (uint64_t)(unsigned char)s[k] << (8 * k);
        }
        h = (h ^ w) * 0xbf58476d1ce4e5b9ULL;
        h ^= h >> 29;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* Returns the slot index holding name, or the empty slot where it would
 * go. The table always has at least one empty slot (load <= 0.75). */
static size_t find_slot(const struct pn_ledger *l, const char *name, size_t len, uint64_t h)
{
    uint32_t h32 = (uint32_t)h;
    size_t i = (size_t)h32 & l->mask;
    for (;;) {
        const struct slot *sl = &l->slots[i];
        if (!sl->e)
            return i;
        if (sl->hash == h32 && sl->e->len == len && memcmp(sl->e->name, name, len) == 0)
            return i;
        i = (i + 1) & l->mask;
    }
}

/* Moves every entry into a new slot array of nslots (a power of two large
 * enough for count at load <= 0.75). */
static void rehash(struct pn_ledger *l, size_t nslots)
{
    struct slot *old = l->slots;
    size_t old_n = l->mask + 1;
    l->slots = pn_calloc(nslots, sizeof *l->slots);
    l->mask = nslots - 1;
    for (size_t i = 0; i < old_n; i++) {
        if (!old[i].e)
            continue;
        size_t j = (size_t)old[i].hash & l->mask;
        while (l->slots[j].e)
            j = (j + 1) & l->mask;
        l->slots[j] = old[i];
    }
    free(old);
}

/* Empties slot i and shifts later members of its probe run back, so that
 * every remaining entry stays reachable from its home slot without
 * tombstones. */
static void remove_slot(struct pn_ledger *l, size_t i)
{
    free(l->slots[i].e);
    l->slots[i].e = NULL;
    l->count--;
    size_t j = i;
    for (;;) {
        j = (j + 1) & l->mask;
        if (!l->slots[j].e)
            break;
        size_t home = (size_t)l->slots[j].hash & l->mask;
        /* The entry at j may move to the hole at i only if its home slot is
         * not cyclically inside (i, j]. */
        bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (stays)
            continue;
        l->slots[i] = l->slots[j];
        l->slots[j].e = NULL;
        i = j;
    }
    /* Give memory back after a large burst has been delivered, with enough
     * hysteresis (shrink below 1/8, grow above 3/4) that a steady count
     * never flips between sizes. */
    size_t n = l->mask + 1;
    if (n > MIN_SLOTS && l->count < n / 8)
        rehash(l, n / 2);
}

struct pn_ledger *pn_ledger_new(void)
{
    struct pn_ledger *l = pn_new(struct pn_ledger);
    l->slots = pn_calloc(MIN_SLOTS, sizeof *l->slots);
    l->mask = MIN_SLOTS - 1;
    return l;
}

void pn_ledger_free(struct pn_ledger *l)
{
    if (!l)
        return;
    for (size_t i = 0; i <= l->mask; i++)
        free(l->slots[i].e);
    free(l->slots);
    free(l);
}

/* Adds delta, creating the entry for a positive sum and removing it when
 * the sum is 0 or less (see the top of the file). Saturates instead of
 * overflowing. */
void pn_ledger_add(struct pn_ledger *l, const char *name, int64_t delta)
{
    size_t len = strlen(name);
    uint64_t h = hash_name(name, len);
    size_t i = find_slot(l, name, len, h);
    struct entry *e = l->slots[i].e;
    if (e) {
        int64_t v;
        if (__builtin_add_overflow(e->value, delta, &v))
            v = delta > 0 ? INT64_MAX : 0;
        if (v <= 0)
            remove_slot(l, i);
        else
            e->value = v;
        return;
    }
    if (delta <= 0)
        return;
    if ((l->count + 1) * 4 > (l->mask + 1) * 3) {
        rehash(l, (l->mask + 1) * 2);
        i = find_slot(l, name, len, h);
    }
    e = pn_malloc(sizeof *e + len + 1);
    e->value = delta;
    e->len = len;
    memcpy(e->name, name, len + 1);
    l->slots[i].hash = (uint32_t)h;
    l->slots[i].mark = 0;
    l->slots[i].e = e;
    l->count++;
}

int64_t pn_ledger_get(const struct pn_ledger *l, const char *name)
{
    size_t len = strlen(name);
    const struct entry *e = l->slots[find_slot(l, name, len, hash_name(name, len))].e;
    return e ? e->value : 0;
}

/* Subtracts what a reply delivered. Taking more than is banked (or from
 * an absent name) is a caller bug; it clamps at 0 rather than going
 * negative. A value <= 0 delivers nothing and changes nothing. */
void pn_ledger_take(struct pn_ledger *l, const char *name, int64_t value)
{
    if (value <= 0)
        return;
    size_t len = strlen(name);
    size_t i = find_slot(l, name, len, hash_name(name, len));
    struct entry *e = l->slots[i].e;
    if (!e)
        return;
    if (e->value <= value)
        remove_slot(l, i);
    else
        e->value -= value;
}

int64_t pn_ledger_get_mark(struct pn_ledger *l, const char *name, size_t len, uint32_t mark)
{
    struct slot *sl = &l->slots[find_slot(l, name, len, hash_name(name, len))];
    if (!sl->e)
        return 0;
    sl->mark = mark;
    return sl->e->value;
}

/* A linear scan like the core's own QueryStats (see matches()). Nothing
 * is allocated. skip_mark != 0 leaves out the entries stamped with it. */
static void foreach_matching(const struct pn_ledger *l, const char *pattern, uint32_t skip_mark,
                             void (*fn)(const char *name, int64_t value, void *arg), void *arg)
{
    size_t plen = pattern ? strlen(pattern) : 0;
    for (size_t i = 0; i <= l->mask; i++) {
        const struct entry *e = l->slots[i].e;
        if (!e || (skip_mark && l->slots[i].mark == skip_mark))
            continue;
        if (matches(e->name, e->len, pattern, plen))
            fn(e->name, e->value, arg);
    }
}

void pn_ledger_foreach(const struct pn_ledger *l, const char *pattern,
                       void (*fn)(const char *name, int64_t value, void *arg), void *arg)
{
    foreach_matching(l, pattern, 0, fn, arg);
}

void pn_ledger_foreach_unmarked(const struct pn_ledger *l, const char *pattern, uint32_t mark,
                                void (*fn)(const char *name, int64_t value, void *arg), void *arg)
{
    foreach_matching(l, pattern, mark, fn, arg);
}

size_t pn_ledger_count(const struct pn_ledger *l)
{
    return l->count;
}
