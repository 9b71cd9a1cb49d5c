/* pack_stats (the hand-written StatResponse encoder of pasarguard.c)
 * against protobuf-c: for the same counters, the bytes must be exactly
 * what service__stat_response__pack writes for the Stats a strstr-based
 * split (the encoder's former implementation) makes, and the same counters
 * must be left out. The .c is included to reach the static encoder. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../../src/api/pasarguard.c"

/* The reference split: `kind>>>name>>>link>>>type[>>>…]` cut with strstr
 * on a copy. NULL when the stat is not returned. */
static char *ref_split(const char *full, const char *kind, char *parts[3])
{
    char *copy = strdup(full);
    char *seg[4];
    size_t n = 0;
    char *p = copy;
    while (n < 4) {
        seg[n++] = p;
        char *sep = strstr(p, ">>>");
        if (!sep)
            break;
        *sep = '\0';
        p = sep + 3;
    }
    if (n < 4 || (kind && strcmp(seg[0], kind) != 0) || !*seg[1] || !*seg[2] || !*seg[3]) {
        free(copy);
        return NULL;
    }
    parts[0] = seg[1];
    parts[1] = seg[2];
    parts[2] = seg[3];
    return copy;
}

/* protobuf-c's packing of what ref_split keeps. */
static uint8_t *ref_pack(const struct pn_backend_stats *s, const char *kind, bool *kept,
                         size_t *len)
{
    Service__Stat *st = calloc(s->n + 1, sizeof *st);
    Service__Stat **sp = calloc(s->n + 1, sizeof *sp);
    char **copies = calloc(s->n + 1, sizeof *copies);
    size_t k = 0;
    for (size_t i = 0; i < s->n; i++) {
        char *parts[3];
        copies[i] = ref_split(s->items[i].name, kind, parts);
        kept[i] = copies[i] != NULL;
        if (!kept[i])
            continue;
        service__stat__init(&st[k]);
        st[k].name = parts[0];
        st[k].link = parts[1];
        st[k].type = parts[2];
        st[k].value = s->items[i].value;
        sp[k] = &st[k];
        k++;
    }
    Service__StatResponse resp = SERVICE__STAT_RESPONSE__INIT;
    resp.n_stats = k;
    resp.stats = sp;
    *len = service__stat_response__get_packed_size(&resp);
    uint8_t *buf = malloc(*len + 1);
    service__stat_response__pack(&resp, buf);
    for (size_t i = 0; i < s->n; i++)
        free(copies[i]);
    free(copies);
    free(sp);
    free(st);
    return buf;
}

static void expect_same(struct pn_backend_stat *items, size_t n, const char *kind)
{
    struct pn_backend_stats s = {items, n, false};
    bool *kept = calloc(n + 1, sizeof *kept);
    bool *rkept = calloc(n + 1, sizeof *rkept);
    size_t len, rlen;
    uint8_t *buf = pack_stats(&s, kind, kept, &len);
    uint8_t *ref = ref_pack(&s, kind, rkept, &rlen);
    assert_int_equal(len, rlen);
    assert_memory_equal(buf, ref, len);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(kept[i], rkept[i]);
    free(buf);
    free(ref);
    free(kept);
    free(rkept);
}

static void test_fixed_cases(void **state)
{
    (void)state;
    static char long_email[20000];
    memset(long_email, 'e', sizeof long_email - 1);
    char *long_name = malloc(sizeof long_email + 64);
    snprintf(long_name, sizeof long_email + 64, "user>>>%s>>>traffic>>>uplink", long_email);
    char mid_name[400];
    snprintf(mid_name, sizeof mid_name, "user>>>%.200s>>>traffic>>>downlink", long_email);
    struct pn_backend_stat items[] = {
        {(char *)"user>>>1>>>traffic>>>uplink", 10},
        {(char *)"user>>>1>>>traffic>>>downlink", 0},
        {(char *)"user>>>a@b.c>>>traffic>>>uplink", INT64_MAX},
        {(char *)"user>>>a@b.c>>>traffic>>>downlink", -1},
        {(char *)"user>>>x>>>traffic>>>uplink", INT64_MIN},
        {(char *)"user>>>x>>>traffic>>>uplink", 127},
        {(char *)"user>>>x>>>traffic>>>uplink", 128},
        {(char *)"user>>>x>>>traffic>>>uplink", 16384},
        {(char *)"user>>>x>>>traffic>>>uplink", (int64_t)1 << 35},
        {(char *)"", 5},
        {(char *)"user", 5},
        {(char *)"user>>>", 5},
        {(char *)"user>>>a>>>b", 5},
        {(char *)"user>>>a>>>b>>>", 5},
        {(char *)"user>>>>>>b>>>c", 5},
        {(char *)"user>>>a>>>>>>c", 5},
        {(char *)"user>>>>a>>>b>>>c", 5},
        {(char *)"user>>>a>>>b>>>c>>>d>>>e", 5},
        {(char *)"user>>>a>>>b>>>c>>>", 5},
        {(char *)"user>>>a>>b>>>c>>>d", 5},
        {(char *)"user>>>a>>>>b>>>c", 5},
        {(char *)"user>>>a>>>b>>>>c", 5},
        {(char *)"user>>>a>>>b>>>c>", 5},
        {(char *)"users>>>a>>>b>>>c", 5},
        {(char *)"use>>>a>>>b>>>c", 5},
        {(char *)"xuser>>>a>>>b>>>c", 5},
        {(char *)"inbound>>>api>>>traffic>>>uplink", 5},
        {(char *)"outbound>>>direct>>>traffic>>>uplink", 5},
        {(char *)"user>>>7outbound>>>traffic>>>downlink", 20},
        {(char *)">>>>>>>>>>>>", 5},
        {(char *)">>>a>>>b>>>c", 5},
        {mid_name, 300},
        {long_name, 301},
    };
    size_t n = sizeof items / sizeof items[0];
    expect_same(items, n, "user");
    expect_same(items, n, "outbound");
    expect_same(items, n, "inbound");
    expect_same(items, n, "");
    expect_same(items, n, NULL);
    expect_same(items, 0, "user");
    free(long_name);
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

/* Random names over a small alphabet, so separators, near-separators and
 * empty parts are common. */
static void test_random_names(void **state)
{
    (void)state;
    static const char *starts[] = {"user>>>", "inbound>>>", "outbound>>>", "", "use", ">>>"};
    static const char alpha[] = {'a', 'b', '>', '>', '>', 'u'};
    enum { N = 4000 };
    struct pn_backend_stat *items = calloc(N, sizeof *items);
    for (size_t i = 0; i < N; i++) {
        char buf[96];
        size_t l = (size_t)snprintf(buf, sizeof buf, "%s", starts[rnd() % 6]);
        size_t extra = rnd() % 2 ? rnd() % 24 : rnd() % 70; /* around 64 bytes too */
        for (size_t j = 0; j < extra; j++)
            buf[l++] = alpha[rnd() % sizeof alpha];
        buf[l] = '\0';
        items[i].name = strdup(buf);
        uint64_t v = (uint64_t)rnd() << 32 | rnd();
        items[i].value = (int64_t)(v >> (rnd() % 64));
        if (rnd() % 5 == 0)
            items[i].value = 0;
    }
    expect_same(items, N, "user");
    expect_same(items, N, "inbound");
    expect_same(items, N, "");
    for (size_t i = 0; i < N; i++)
        free(items[i].name);
    free(items);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixed_cases),
        cmocka_unit_test(test_random_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
