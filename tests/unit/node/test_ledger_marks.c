/* The ledger's merge marks (pn_ledger_get_mark by length,
 * pn_ledger_foreach_unmarked), checked against plain scans while entries
 * come and go and the table grows and shrinks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "node/ledger.h"

static void count_cb(const char *name, int64_t value, void *arg)
{
    (void)name;
    (void)value;
    (*(size_t *)arg)++;
}

static size_t scan_count(const struct pn_ledger *l, const char *pattern)
{
    size_t n = 0;
    pn_ledger_foreach(l, pattern, count_cb, &n);
    return n;
}

static size_t unmarked_count(const struct pn_ledger *l, const char *pattern, uint32_t mark)
{
    size_t n = 0;
    pn_ledger_foreach_unmarked(l, pattern, mark, count_cb, &n);
    return n;
}

static void name_of(char *buf, size_t len, const char *kind, int i, bool up)
{
    snprintf(buf, len, "%s>>>%d>>>traffic>>>%s", kind, i, up ? "uplink" : "downlink");
}

/* Lookups by length (the core's reply is not NUL-terminated per name)
 * stamp what they find; the unmarked scan visits exactly the rest. */
static void test_get_mark_by_length(void **state)
{
    (void)state;
    struct pn_ledger *l = pn_ledger_new();
    enum { N = 5000 };
    char name[64];
    for (int i = 0; i < N; i++) {
        name_of(name, sizeof name, "user", i, i % 2);
        pn_ledger_add(l, name, i + 1);
    }
    pn_ledger_add(l, "inbound>>>api>>>traffic>>>uplink", 3);
    for (int i = 0; i < 2 * N; i += 2) {
        name_of(name, sizeof name, "user", i, i % 2);
        size_t len = strlen(name);
        name[len] = 'X'; /* garbage after the name */
        assert_int_equal(pn_ledger_get_mark(l, name, len, 77), i < N ? i + 1 : 0);
    }
    assert_int_equal(unmarked_count(l, "user>>>", 77), N / 2);
    assert_int_equal(unmarked_count(l, "", 77), N / 2 + 1);
    assert_int_equal(scan_count(l, ""), N + 1);
    /* a new mark: everything is unmet again */
    assert_int_equal(unmarked_count(l, "", 78), N + 1);
    pn_ledger_free(l);
}

/* Marks survive the moves of a growing table and of removals. */
static void test_marks_survive_moves(void **state)
{
    (void)state;
    struct pn_ledger *l = pn_ledger_new();
    char name[64];
    for (int i = 0; i < 100; i++) {
        name_of(name, sizeof name, "user", i, true);
        pn_ledger_add(l, name, 1);
        assert_int_equal(pn_ledger_get_mark(l, name, strlen(name), 5), 1);
    }
    for (int i = 100; i < 3000; i++) { /* grows several times */
        name_of(name, sizeof name, "user", i, true);
        pn_ledger_add(l, name, 1);
    }
    assert_int_equal(unmarked_count(l, "", 5), 2900);
    for (int i = 100; i < 2990; i++) { /* shrinks, shifting entries back */
        name_of(name, sizeof name, "user", i, true);
        pn_ledger_take(l, name, 1);
    }
    assert_int_equal(pn_ledger_count(l), 110);
    assert_int_equal(unmarked_count(l, "", 5), 10);
    pn_ledger_free(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_get_mark_by_length),
        cmocka_unit_test(test_marks_survive_moves),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
