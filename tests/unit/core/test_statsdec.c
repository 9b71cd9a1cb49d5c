/* The QueryStatsResponse decoder of coreapi.c (decode_query_stats) against
 * protobuf-c's unpack of the same bytes: hand-made replies (empty names,
 * zero, big and negative values, unknown fields, repeated fields, long and
 * non-minimal varints, names with a NUL inside) and random mutations of
 * them must be accepted or refused alike, and decode to the same stats.
 * The .c is included to reach the static decoder. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../../src/core/coreapi.c"

/* ---- building replies ------------------------------------------------------ */

struct wbuf {
    uint8_t d[8192];
    size_t n;
};

static void w_byte(struct wbuf *w, uint8_t b)
{
    assert_true(w->n < sizeof w->d);
    w->d[w->n++] = b;
}

static void w_varint(struct wbuf *w, uint64_t v)
{
    while (v >= 0x80) {
        w_byte(w, (uint8_t)(v | 0x80));
        v >>= 7;
    }
    w_byte(w, (uint8_t)v);
}

static void w_bytes(struct wbuf *w, const void *p, size_t n)
{
    assert_true(w->n + n <= sizeof w->d);
    memcpy(w->d + w->n, p, n);
    w->n += n;
}

static void w_ld(struct wbuf *w, uint32_t field, const void *p, size_t n)
{
    w_varint(w, (uint64_t)field << 3 | 2);
    w_varint(w, n);
    w_bytes(w, p, n);
}

/* One Stat{name, value} (fields left out when name is NULL / has_value is
 * false), as a field 1 of the outer message. */
static void w_stat(struct wbuf *w, const char *name, size_t nlen, bool has_value, int64_t value)
{
    struct wbuf in = {.n = 0};
    if (name)
        w_ld(&in, 1, name, nlen);
    if (has_value) {
        w_varint(&in, 2 << 3 | 0);
        w_varint(&in, (uint64_t)value);
    }
    w_ld(w, 1, in.d, in.n);
}

/* ---- the comparison ---------------------------------------------------------- */

/* protobuf-c reads a length prefix as 32 bits and adds it to the prefix
 * size in 32 bits: a 5-byte prefix near 2^32 wraps and makes it read out
 * of bounds. Inputs where any position could be read as such a prefix are
 * not given to it. */
static bool pbc_safe(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 5 <= n; i++) {
        if (!(p[i] & 0x80) || !(p[i + 1] & 0x80) || !(p[i + 2] & 0x80) || !(p[i + 3] & 0x80))
            continue;
        uint32_t v = 0;
        for (int k = 0; k < 5; k++)
            v |= (uint32_t)(p[i + k] & 0x7f) << (7 * k);
        if (v >= 0xfffffff0u)
            return false;
    }
    return true;
}

static unsigned g_compared, g_refused;

/* Decodes p[0..n) both ways and checks they agree. */
static void compare(const uint8_t *p, size_t n)
{
    if (!pbc_safe(p, n))
        return;
    Pncore__QueryStatsResponse *m = pncore__query_stats_response__unpack(NULL, n, p);
    uint8_t *copy = malloc(n + 1);
    memcpy(copy, p, n);
    copy[n] = 0xee;
    struct pn_core_stat *st = NULL;
    size_t count = 0;
    bool ok = decode_query_stats(copy, n, &st, &count);
    assert_int_equal(ok, m != NULL);
    g_compared++;
    if (ok) {
        assert_int_equal(count, m->n_stat);
        for (size_t i = 0; i < count; i++) {
            assert_string_equal(st[i].name, m->stat[i]->name);
            assert_int_equal(st[i].len, strlen(m->stat[i]->name));
            assert_true(st[i].value == m->stat[i]->value);
        }
        free(st);
    } else {
        g_refused++;
    }
    pncore__query_stats_response__free_unpacked(m, NULL);
    free(copy);
}

/* The same reply as protobuf-c packs it. */
static void test_packed_by_protobuf_c(void **state)
{
    (void)state;
    static const char *names[] = {"user>>>1>>>traffic>>>uplink", "", "x",
                                  "inbound>>>api>>>traffic>>>downlink"};
    static const int64_t values[] = {0, 1, 127, 128, INT64_MAX, -1, INT64_MIN, 1234567890123};
    Pncore__Stat s[32];
    Pncore__Stat *sp[32];
    size_t k = 0;
    for (size_t i = 0; i < 4; i++)
        for (size_t j = 0; j < 8; j++) {
            pncore__stat__init(&s[k]);
            s[k].name = (char *)names[i];
            s[k].value = values[j];
            sp[k] = &s[k];
            k++;
        }
    Pncore__QueryStatsResponse r = PNCORE__QUERY_STATS_RESPONSE__INIT;
    r.n_stat = k;
    r.stat = sp;
    size_t len = pncore__query_stats_response__get_packed_size(&r);
    uint8_t *buf = malloc(len + 1);
    pncore__query_stats_response__pack(&r, buf);
    struct pn_core_stat *st;
    size_t n;
    assert_true(decode_query_stats(buf, len, &st, &n));
    assert_int_equal(n, k);
    for (size_t i = 0; i < k; i++) {
        assert_string_equal(st[i].name, names[i / 8]);
        assert_int_equal(st[i].len, strlen(names[i / 8]));
        assert_true(st[i].value == values[i % 8]);
    }
    free(st);
    free(buf);
    /* empty reply */
    uint8_t one[1];
    assert_true(decode_query_stats(one, 0, &st, &n));
    assert_int_equal(n, 0);
    free(st);
}

/* Hand-made replies, including what protobuf-c would never write. */
static size_t make_cases(struct wbuf *cases, size_t max)
{
    size_t k = 0;
    struct wbuf *w;
#define NEXT() (assert_true(k < max), w = &cases[k++], w->n = 0)
    NEXT(); /* plain */
    w_stat(w, "user>>>a>>>traffic>>>uplink", 27, true, 42);
    w_stat(w, "user>>>b>>>traffic>>>downlink", 29, true, 0);
    NEXT(); /* no name, no value, empty name, zero written explicitly */
    w_stat(w, NULL, 0, false, 0);
    w_stat(w, "", 0, true, 0);
    w_stat(w, "n", 1, false, 0);
    NEXT(); /* big and negative values */
    w_stat(w, "a", 1, true, INT64_MAX);
    w_stat(w, "b", 1, true, INT64_MIN);
    w_stat(w, "c", 1, true, -1);
    NEXT(); /* a NUL inside a name */
    w_stat(w, "ab\0cd", 5, true, 7);
    w_stat(w, "\0", 1, true, 8);
    NEXT(); /* a long name (2-byte lengths) */
    {
        char big[300];
        memset(big, 'q', sizeof big);
        w_stat(w, big, sizeof big, true, 3);
    }
    NEXT(); /* name and value twice: the last wins */
    {
        struct wbuf in = {.n = 0};
        w_ld(&in, 1, "first", 5);
        w_varint(&in, 2 << 3);
        w_varint(&in, 5);
        w_ld(&in, 1, "second", 6);
        w_varint(&in, 2 << 3);
        w_varint(&in, 6);
        w_ld(w, 1, in.d, in.n);
    }
    NEXT(); /* unknown fields of every wire type, both levels */
    {
        struct wbuf in = {.n = 0};
        w_varint(&in, 7 << 3 | 0);
        w_varint(&in, 300);
        w_varint(&in, 8 << 3 | 1);
        w_bytes(&in, "12345678", 8);
        w_ld(&in, 9, "zz", 2);
        w_varint(&in, 10 << 3 | 5);
        w_bytes(&in, "1234", 4);
        w_ld(&in, 1, "nm", 2);
        w_varint(&in, 2 << 3);
        w_varint(&in, 9);
        w_ld(w, 1, in.d, in.n);
        w_varint(w, 3 << 3 | 0);
        w_varint(w, 1);
        w_ld(w, 4, "xyz", 3);
        w_varint(w, 5 << 3 | 1);
        w_bytes(w, "abcdefgh", 8);
        w_varint(w, 6 << 3 | 5);
        w_bytes(w, "abcd", 4);
        w_varint(w, 1000 << 3 | 2);
        w_varint(w, 0);
    }
    NEXT(); /* non-minimal tag and length varints, a 10-byte value */
    {
        struct wbuf in = {.n = 0};
        w_bytes(&in, "\x8a\x00", 2);     /* field 1, ld, as 2 bytes */
        w_bytes(&in, "\x83\x80\x00", 3); /* length 3, as 3 bytes */
        w_bytes(&in, "abc", 3);
        w_byte(&in, 0x10);
        w_bytes(&in, "\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", 10);
        w_bytes(w, "\x8a\x80\x80\x00", 4);
        w_varint(w, in.n);
        w_bytes(w, in.d, in.n);
    }
    NEXT(); /* wrong wire types for known fields */
    w_varint(w, 1 << 3 | 0);
    w_varint(w, 5);
    NEXT();
    {
        struct wbuf in = {.n = 0};
        w_varint(&in, 1 << 3 | 0);
        w_varint(&in, 5);
        w_ld(w, 1, in.d, in.n);
    }
    NEXT();
    {
        struct wbuf in = {.n = 0};
        w_ld(&in, 2, "v", 1);
        w_ld(w, 1, in.d, in.n);
    }
    NEXT(); /* tag 0, groups, wire types 6 and 7 */
    w_bytes(w, "\x00\x01", 2);
    NEXT();
    w_bytes(w, "\x0b\x0c", 2);
    NEXT();
    w_bytes(w, "\x0e\x00", 2);
    NEXT();
    w_bytes(w, "\x0f\x00", 2);
    NEXT(); /* truncated: length past the end, unterminated varints */
    w_bytes(w,
            "\x0a\x05"
            "ab",
            4);
    NEXT();
    w_bytes(w, "\x18\xff\xff", 3);
    NEXT();
    w_bytes(w, "\x0a\x80", 2);
    NEXT();
    w_bytes(w, "\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 12); /* 11-byte varint */
    NEXT();
    w_bytes(w, "\x88", 1);
    NEXT(); /* a 6-byte tag */
    w_bytes(w, "\x88\x80\x80\x80\x80\x00", 6);
    return k;
#undef NEXT
}

static void test_cases_agree(void **state)
{
    (void)state;
    static struct wbuf cases[64];
    size_t k = make_cases(cases, 64);
    for (size_t i = 0; i < k; i++) {
        compare(cases[i].d, cases[i].n);
        /* every truncation as well */
        for (size_t cut = 0; cut < cases[i].n; cut++)
            compare(cases[i].d, cut);
    }
    assert_true(g_refused > 0);
}

static uint64_t rng = 0x243f6a8885a308d3ULL;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

/* Random mutations of the hand-made replies. */
static void test_mutations_agree(void **state)
{
    (void)state;
    static struct wbuf cases[64];
    size_t k = make_cases(cases, 64);
    static const uint8_t interesting[] = {0x00, 0x01, 0x02, 0x05, 0x08, 0x0a, 0x0d, 0x10, 0x12,
                                          0x15, 0x18, 0x1a, 0x7f, 0x80, 0x81, 0xff, 0x09, 0x0b};
    unsigned before = g_compared;
    for (int iter = 0; iter < 20000; iter++) {
        struct wbuf w = cases[rnd() % k];
        int nmut = 1 + (int)(rnd() % 4);
        for (int m = 0; m < nmut; m++) {
            uint32_t op = rnd() % 4;
            uint8_t b = rnd() % 2 ? interesting[rnd() % sizeof interesting] : (uint8_t)rnd();
            if (op == 0 && w.n) {
                w.d[rnd() % w.n] = b;
            } else if (op == 1 && w.n < sizeof w.d) {
                size_t at = w.n ? rnd() % (w.n + 1) : 0;
                memmove(w.d + at + 1, w.d + at, w.n - at);
                w.d[at] = b;
                w.n++;
            } else if (op == 2 && w.n) {
                size_t at = rnd() % w.n;
                memmove(w.d + at, w.d + at + 1, w.n - at - 1);
                w.n--;
            } else if (w.n) {
                w.n = rnd() % w.n;
            }
        }
        compare(w.d, w.n);
    }
    assert_true(g_compared - before > 15000);
}

/* A reply of many stats, the last name ending the buffer. */
static void test_many(void **state)
{
    (void)state;
    size_t cap = 1 << 20;
    uint8_t *buf = malloc(cap + 1);
    size_t n = 0;
    for (int i = 0; i < 20000; i++) {
        char name[64];
        int l = snprintf(name, sizeof name, "user>>>%d>>>traffic>>>%s", i,
                         i % 2 ? "uplink" : "downlink");
        uint8_t in[80];
        size_t il = 0;
        in[il++] = 0x10;
        uint64_t v = (uint64_t)i * 1000003u;
        while (v >= 0x80) {
            in[il++] = (uint8_t)(v | 0x80);
            v >>= 7;
        }
        in[il++] = (uint8_t)v;
        in[il++] = 0x0a; /* the name last, so the reply ends with it */
        in[il++] = (uint8_t)l;
        memcpy(in + il, name, (size_t)l);
        il += (size_t)l;
        buf[n++] = 0x0a;
        buf[n++] = (uint8_t)il;
        memcpy(buf + n, in, il);
        n += il;
    }
    buf[n] = 0x55;
    struct pn_core_stat *st;
    size_t count;
    assert_true(decode_query_stats(buf, n, &st, &count));
    assert_int_equal(count, 20000);
    for (int i = 0; i < 20000; i += 997) {
        char name[64];
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>%s", i, i % 2 ? "uplink" : "downlink");
        assert_string_equal(st[i].name, name);
        assert_int_equal(st[i].len, strlen(name));
        assert_true(st[i].value == (int64_t)i * 1000003);
    }
    assert_int_equal(buf[n], 0); /* the last name was cut in the spare byte */
    free(st);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_packed_by_protobuf_c),
        cmocka_unit_test(test_cases_agree),
        cmocka_unit_test(test_mutations_agree),
        cmocka_unit_test(test_many),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
