/* The node's user set (see users.h). It owns every struct pn_user put into
 * it and keeps them in an open-addressing hash table keyed by the email's
 * exact bytes (64-bit FNV-1a, linear probing, backward-shift deletion so no
 * tombstones accumulate, grown at 3/4 load). Lookups, inserts and removals
 * are O(1) on average, so diffing 100k users against the running set costs
 * a few milliseconds. Inbound tags are interned (see tag_get). */
#include "node/users.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"

struct slot {
    uint64_t hash;
    struct pn_user *user; /* NULL = empty */
};

struct pn_userset {
    struct slot *slots;
    size_t cap; /* a power of two */
    size_t count;
};

#define MIN_CAP 16

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Inbound tags: every user lists the same few, so each distinct tag is
 * kept once, reference-counted, and users point at it (a private copy per
 * user and tag cost ~3 MiB at 100k users). The table is process-wide; the
 * node runs on one thread. */
struct tag {
    struct tag *next; /* bucket chain */
    size_t refs;
    char s[];
};

#define TAG_BUCKETS 64
static struct tag *tags[TAG_BUCKETS];

static const char *tag_get(const char *s)
{
    struct tag **head = &tags[fnv1a(s) % TAG_BUCKETS];
    for (struct tag *t = *head; t; t = t->next)
        if (strcmp(t->s, s) == 0) {
            t->refs++;
            return t->s;
        }
    size_t len = strlen(s);
    struct tag *t = pn_malloc(sizeof *t + len + 1);
    memcpy(t->s, s, len + 1);
    t->refs = 1;
    t->next = *head;
    *head = t;
    return t->s;
}

static void tag_put(const char *s)
{
    struct tag *t = (struct tag *)(void *)(s - offsetof(struct tag, s));
    if (--t->refs > 0)
        return;
    struct tag **pp = &tags[fnv1a(s) % TAG_BUCKETS];
    while (*pp != t)
        pp = &(*pp)->next;
    *pp = t->next;
    free(t);
}

static char *dup_or_null(const char *s)
{
    return s ? pn_strdup(s) : NULL;
}

struct pn_user *pn_user_new(const char *email)
{
    struct pn_user *u = pn_new(struct pn_user);
    u->email = pn_strdup(email ? email : "");
    return u;
}

struct pn_user *pn_user_clone(const struct pn_user *u)
{
    struct pn_user *c = pn_user_new(u->email);
    c->has_vmess = u->has_vmess;
    c->has_vless = u->has_vless;
    c->has_trojan = u->has_trojan;
    c->has_ss = u->has_ss;
    c->has_hysteria = u->has_hysteria;
    c->vmess_id = dup_or_null(u->vmess_id);
    c->vless_id = dup_or_null(u->vless_id);
    c->vless_flow = dup_or_null(u->vless_flow);
    c->trojan_password = dup_or_null(u->trojan_password);
    c->ss_password = dup_or_null(u->ss_password);
    c->ss_method = dup_or_null(u->ss_method);
    c->hysteria_auth = dup_or_null(u->hysteria_auth);
    if (u->ninbounds) {
        c->inbounds = pn_malloc(u->ninbounds * sizeof *c->inbounds);
        for (size_t i = 0; i < u->ninbounds; i++)
            c->inbounds[i] = tag_get(u->inbounds[i]);
        c->ninbounds = u->ninbounds;
    }
    return c;
}

void pn_user_clear_inbounds(struct pn_user *u)
{
    for (size_t i = 0; i < u->ninbounds; i++)
        tag_put(u->inbounds[i]);
    free(u->inbounds);
    u->inbounds = NULL;
    u->ninbounds = 0;
}

void pn_user_free(struct pn_user *u)
{
    if (!u)
        return;
    free(u->email);
    free(u->vmess_id);
    free(u->vless_id);
    free(u->vless_flow);
    free(u->trojan_password);
    free(u->ss_password);
    free(u->ss_method);
    free(u->hysteria_auth);
    pn_user_clear_inbounds(u);
    free(u);
}

bool pn_user_has_inbound(const struct pn_user *u, const char *tag)
{
    for (size_t i = 0; i < u->ninbounds; i++)
        if (strcmp(u->inbounds[i], tag) == 0)
            return true;
    return false;
}

/* The list has no capacity field, so it grows to the next power of two
 * whenever its length reaches one: amortised O(1) appends. A tag already
 * listed is not added twice (the list is a set). */
void pn_user_add_inbound(struct pn_user *u, const char *tag)
{
    if (pn_user_has_inbound(u, tag))
        return;
    size_t n = u->ninbounds;
    if (n == 0 || (n & (n - 1)) == 0)
        u->inbounds = pn_realloc(u->inbounds, (n ? 2 * n : 1) * sizeof *u->inbounds);
    u->inbounds[n] = tag_get(tag);
    u->ninbounds = n + 1;
}

/* Absent and empty strings are the same value: presence is carried by the
 * has_* flags, and protobuf cannot tell an empty string from a missing one. */
static bool str_eq(const char *a, const char *b)
{
    return strcmp(a ? a : "", b ? b : "") == 0;
}

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorts a copy of the tags and drops duplicates; returns the distinct count. */
static size_t sorted_set(const char **list, size_t n, const char **out)
{
    if (n == 0)
        return 0;
    memcpy(out, list, n * sizeof *list);
    qsort(out, n, sizeof *out, cmp_str_ptr);
    size_t m = 1;
    for (size_t i = 1; i < n; i++)
        if (strcmp(out[i], out[m - 1]) != 0)
            out[m++] = out[i];
    return m;
}

/* Order-insensitive set equality of two tag lists. Small lists (the usual
 * case: a few inbounds per user) are compared by mutual containment without
 * allocating; large ones are sorted. */
static bool inbounds_equal(const struct pn_user *a, const struct pn_user *b)
{
    if (a->ninbounds * b->ninbounds <= 256) {
        for (size_t i = 0; i < a->ninbounds; i++)
            if (!pn_user_has_inbound(b, a->inbounds[i]))
                return false;
        for (size_t i = 0; i < b->ninbounds; i++)
            if (!pn_user_has_inbound(a, b->inbounds[i]))
                return false;
        return true;
    }
    const char **sa = pn_malloc((a->ninbounds + b->ninbounds) * sizeof *sa);
    const char **sb = sa + a->ninbounds;
    size_t na = sorted_set(a->inbounds, a->ninbounds, sa);
    size_t nb = sorted_set(b->inbounds, b->ninbounds, sb);
    bool eq = na == nb;
    for (size_t i = 0; eq && i < na; i++)
        eq = strcmp(sa[i], sb[i]) == 0;
    free(sa);
    return eq;
}

bool pn_user_equal(const struct pn_user *a, const struct pn_user *b)
{
    return strcmp(a->email, b->email) == 0 && a->has_vmess == b->has_vmess &&
           a->has_vless == b->has_vless && a->has_trojan == b->has_trojan &&
           a->has_ss == b->has_ss && a->has_hysteria == b->has_hysteria &&
           str_eq(a->vmess_id, b->vmess_id) && str_eq(a->vless_id, b->vless_id) &&
           str_eq(a->vless_flow, b->vless_flow) && str_eq(a->trojan_password, b->trojan_password) &&
           str_eq(a->ss_password, b->ss_password) && str_eq(a->ss_method, b->ss_method) &&
           str_eq(a->hysteria_auth, b->hysteria_auth) && inbounds_equal(a, b);
}

struct pn_userset *pn_userset_new(void)
{
    struct pn_userset *s = pn_new(struct pn_userset);
    s->cap = MIN_CAP;
    s->slots = pn_calloc(s->cap, sizeof *s->slots);
    return s;
}

void pn_userset_free(struct pn_userset *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->cap; i++)
        pn_user_free(s->slots[i].user);
    free(s->slots);
    free(s);
}

size_t pn_userset_count(const struct pn_userset *s)
{
    return s->count;
}

/* The slot holding email, or the empty slot where it would go. */
static size_t find_slot(const struct pn_userset *s, const char *email, uint64_t h)
{
    size_t mask = s->cap - 1;
    size_t i = (size_t)h & mask;
    while (s->slots[i].user) {
        if (s->slots[i].hash == h && strcmp(s->slots[i].user->email, email) == 0)
            return i;
        i = (i + 1) & mask;
    }
    return i;
}

static void grow(struct pn_userset *s)
{
    struct slot *old = s->slots;
    size_t oldcap = s->cap;
    s->cap *= 2;
    s->slots = pn_calloc(s->cap, sizeof *s->slots);
    size_t mask = s->cap - 1;
    for (size_t i = 0; i < oldcap; i++) {
        if (!old[i].user)
            continue;
        size_t j = (size_t)old[i].hash & mask;
        while (s->slots[j].user)
            j = (j + 1) & mask;
        s->slots[j] = old[i];
    }
    free(old);
}

const struct pn_user *pn_userset_get(const struct pn_userset *s, const char *email)
{
    size_t i = find_slot(s, email, fnv1a(email));
    return s->slots[i].user;
}

void pn_userset_put(struct pn_userset *s, struct pn_user *u)
{
    uint64_t h = fnv1a(u->email);
    size_t i = find_slot(s, u->email, h);
    if (s->slots[i].user) {
        pn_user_free(s->slots[i].user);
        s->slots[i].user = u;
        return;
    }
    if ((s->count + 1) * 4 > s->cap * 3) {
        grow(s);
        i = find_slot(s, u->email, h);
    }
    s->slots[i].hash = h;
    s->slots[i].user = u;
    s->count++;
}

/* Backward-shift deletion: entries after the hole that could live in it
 * move back, so probe chains never cross an empty slot. */
bool pn_userset_remove(struct pn_userset *s, const char *email)
{
    size_t i = find_slot(s, email, fnv1a(email));
    if (!s->slots[i].user)
        return false;
    pn_user_free(s->slots[i].user);
    s->slots[i].user = NULL;
    s->count--;
    size_t mask = s->cap - 1;
    size_t hole = i;
    for (size_t j = (i + 1) & mask; s->slots[j].user; j = (j + 1) & mask) {
        size_t home = (size_t)s->slots[j].hash & mask;
        /* j may move to the hole unless its home lies cyclically in (hole, j]. */
        bool home_between = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (home_between)
            continue;
        s->slots[hole] = s->slots[j];
        s->slots[j].user = NULL;
        hole = j;
    }
    return true;
}

void pn_userset_foreach(const struct pn_userset *s, void (*fn)(const struct pn_user *u, void *arg),
                        void *arg)
{
    for (size_t i = 0; i < s->cap; i++)
        if (s->slots[i].user)
            fn(s->slots[i].user, arg);
}

struct pn_userset *pn_userset_clone(const struct pn_userset *s)
{
    struct pn_userset *c = pn_new(struct pn_userset);
    c->cap = s->cap;
    c->count = s->count;
    c->slots = pn_calloc(c->cap, sizeof *c->slots);
    for (size_t i = 0; i < s->cap; i++) {
        if (!s->slots[i].user)
            continue;
        c->slots[i].hash = s->slots[i].hash;
        c->slots[i].user = pn_user_clone(s->slots[i].user);
    }
    return c;
}
