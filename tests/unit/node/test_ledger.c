/* The counter ledger: add/get/take, removal at zero and clamping, a
 * node-sized map (200k names) with removals in the middle of probe runs,
 * and the core's plain-substring pattern semantics. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "node/ledger.h"

struct tally {
    size_t n;
    int64_t sum;
};

static void count_cb(const char *name, int64_t value, void *arg)
{
    struct tally *t = arg;
    assert_non_null(name);
    t->n++;
    t->sum += value;
}

static struct tally scan(const struct pn_ledger *l, const char *pattern)
{
    struct tally t = {0, 0};
    pn_ledger_foreach(l, pattern, count_cb, &t);
    return t;
}

static void test_add_get_take(void **state)
{
    struct pn_ledger *l = pn_ledger_new();
    const char *up = "user>>>138>>>traffic>>>uplink";

    assert_int_equal(pn_ledger_get(l, up), 0);
    pn_ledger_add(l, up, 100);
    pn_ledger_add(l, up, 50);
    assert_int_equal(pn_ledger_get(l, up), 150);
    assert_int_equal(pn_ledger_count(l), 1);

    pn_ledger_take(l, up, 40);
    assert_int_equal(pn_ledger_get(l, up), 110);
    assert_int_equal(pn_ledger_count(l), 1);

    /* Taking exactly what is banked removes the entry. */
    pn_ledger_take(l, up, 110);
    assert_int_equal(pn_ledger_get(l, up), 0);
    assert_int_equal(pn_ledger_count(l), 0);
    assert_int_equal(scan(l, "").n, 0);

    /* Adding nothing banks nothing. */
    pn_ledger_add(l, up, 0);
    assert_int_equal(pn_ledger_count(l), 0);

    /* The empty name is a name like any other. */
    pn_ledger_add(l, "", 7);
    assert_int_equal(pn_ledger_get(l, ""), 7);
    pn_ledger_take(l, "", 7);
    assert_int_equal(pn_ledger_count(l), 0);
    pn_ledger_free(l);
}

static void test_clamp(void **state)
{
    struct pn_ledger *l = pn_ledger_new();
    pn_ledger_add(l, "a", 10);
    pn_ledger_add(l, "b", 10);

    pn_ledger_take(l, "a", 25); /* more than banked: clamp and remove */
    assert_int_equal(pn_ledger_get(l, "a"), 0);
    assert_int_equal(pn_ledger_count(l), 1);

    pn_ledger_take(l, "missing", 5); /* absent: nothing happens */
    assert_int_equal(pn_ledger_count(l), 1);

    pn_ledger_take(l, "b", 0);
    pn_ledger_take(l, "b", -3); /* nothing delivered: unchanged */
    assert_int_equal(pn_ledger_get(l, "b"), 10);

    pn_ledger_add(l, "b", -30); /* a sum below 0 also removes */
    assert_int_equal(pn_ledger_get(l, "b"), 0);
    assert_int_equal(pn_ledger_count(l), 0);

    pn_ledger_add(l, "c", -5); /* no debt is recorded */
    assert_int_equal(pn_ledger_count(l), 0);

    pn_ledger_add(l, "big", INT64_MAX);
    pn_ledger_add(l, "big", 5); /* saturates rather than wrapping */
    assert_true(pn_ledger_get(l, "big") == INT64_MAX);
    pn_ledger_free(l);
}

static void test_substring(void **state)
{
    struct pn_ledger *l = pn_ledger_new();
    pn_ledger_add(l, "outbound>>>direct>>>traffic>>>uplink", 1);
    pn_ledger_add(l, "outbound>>>direct>>>traffic>>>downlink", 2);
    pn_ledger_add(l, "user>>>xoutbound>>>traffic>>>uplink", 4); /* contains "outbound>>>" */
    pn_ledger_add(l, "user>>>outboundx>>>traffic>>>uplink", 8); /* does not */
    pn_ledger_add(l, "inbound>>>api>>>traffic>>>uplink", 16);
    pn_ledger_add(l, "outbound", 32); /* shorter than the pattern */

    struct tally t = scan(l, "outbound>>>");
    assert_int_equal(t.n, 3);
    assert_int_equal(t.sum, 1 + 2 + 4);

    t = scan(l, "user>>>");
    assert_int_equal(t.n, 2);
    assert_int_equal(t.sum, 12);

    t = scan(l, "inbound>>>");
    assert_int_equal(t.n, 1);
    assert_int_equal(t.sum, 16);

    t = scan(l, "downlink"); /* a suffix */
    assert_int_equal(t.n, 1);
    assert_int_equal(t.sum, 2);

    t = scan(l, "user>>>outboundx>>>traffic>>>uplink"); /* the whole name */
    assert_int_equal(t.n, 1);
    assert_int_equal(t.sum, 8);

    assert_int_equal(scan(l, "user>>>outboundx>>>traffic>>>uplinkk").n, 0);
    assert_int_equal(scan(l, "").n, 6);
    assert_int_equal(scan(l, NULL).n, 6);
    pn_ledger_free(l);
}

/* The node's worst case: 100k users with two counters each, plus a few
 * inbounds and outbounds; then half the names taken away (removals in the
 * middle of probe runs must leave every other name reachable), then all. */
static void test_large(void **state)
{
    enum { USERS = 100000 };
    struct pn_ledger *l = pn_ledger_new();
    char name[96];
    for (int i = 0; i < USERS; i++) {
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>uplink", i);
        pn_ledger_add(l, name, i + 1);
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>downlink", i);
        pn_ledger_add(l, name, 2 * (int64_t)i + 1);
    }
    for (int i = 0; i < 10; i++) {
        snprintf(name, sizeof name, "outbound>>>out%d>>>traffic>>>uplink", i);
        pn_ledger_add(l, name, 1);
        snprintf(name, sizeof name, "inbound>>>in%d>>>traffic>>>uplink", i);
        pn_ledger_add(l, name, 1);
    }
    assert_int_equal(pn_ledger_count(l), 2 * USERS + 20);
    assert_int_equal(scan(l, "user>>>").n, 2 * USERS);
    assert_int_equal(scan(l, "outbound>>>").n, 10);
    assert_int_equal(scan(l, "").n, 2 * USERS + 20);
    assert_int_equal(scan(l, ">>>downlink").n, USERS);
    assert_int_equal(scan(l, "user>>>4242>>>").n, 2);

    /* Banking again adds to what is there. */
    pn_ledger_add(l, "user>>>7>>>traffic>>>uplink", 1000);
    assert_int_equal(pn_ledger_get(l, "user>>>7>>>traffic>>>uplink"), 1008);
    pn_ledger_take(l, "user>>>7>>>traffic>>>uplink", 1000);

    for (int i = 0; i < USERS; i += 2) {
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>uplink", i);
        pn_ledger_take(l, name, i + 1);
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>downlink", i);
        pn_ledger_take(l, name, INT64_MAX);
    }
    assert_int_equal(pn_ledger_count(l), USERS + 20);
    for (int i = 0; i < USERS; i++) {
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>uplink", i);
        int64_t up = pn_ledger_get(l, name);
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>downlink", i);
        int64_t down = pn_ledger_get(l, name);
        if (i % 2 == 0) {
            assert_int_equal(up, 0);
            assert_int_equal(down, 0);
        } else {
            assert_int_equal(up, i + 1);
            assert_int_equal(down, 2 * (int64_t)i + 1);
        }
    }
    assert_int_equal(scan(l, "user>>>").n, USERS);

    for (int i = 1; i < USERS; i += 2) {
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>uplink", i);
        pn_ledger_take(l, name, i + 1);
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>downlink", i);
        pn_ledger_take(l, name, 2 * (int64_t)i + 1);
    }
    assert_int_equal(pn_ledger_count(l), 20);
    assert_int_equal(scan(l, "user>>>").n, 0);
    assert_int_equal(pn_ledger_get(l, "outbound>>>out3>>>traffic>>>uplink"), 1);
    assert_int_equal(pn_ledger_get(l, "inbound>>>in9>>>traffic>>>uplink"), 1);

    /* Refill after the shrink. */
    for (int i = 0; i < 1000; i++) {
        snprintf(name, sizeof name, "user>>>%d>>>traffic>>>uplink", i);
        pn_ledger_add(l, name, 3);
    }
    assert_int_equal(scan(l, "user>>>").sum, 3000);
    pn_ledger_free(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_add_get_take),
        cmocka_unit_test(test_clamp),
        cmocka_unit_test(test_substring),
        cmocka_unit_test(test_large),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
