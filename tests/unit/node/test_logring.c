/* The log ring: fan-out to every subscriber, backlog for new ones, drop
 * counting for slow ones, notify only for waiting subscribers, freeing
 * (and pushing) from inside a notify, capacity 1, and long lines. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "node/logring.h"

static void push_str(struct pn_logring *r, const char *s)
{
    pn_logring_push(r, s, strlen(s));
}

static void push_num(struct pn_logring *r, int i)
{
    char buf[32];
    snprintf(buf, sizeof buf, "line %d", i);
    push_str(r, buf);
}

/* Asserts the next line is "line <i>" and returns *dropped's increase. */
static uint64_t expect_num(struct pn_log_sub *s, int i)
{
    char want[32];
    snprintf(want, sizeof want, "line %d", i);
    size_t len = 0;
    uint64_t dropped = 0;
    const char *got = pn_log_sub_next(s, &len, &dropped);
    assert_non_null(got);
    assert_string_equal(got, want);
    assert_int_equal(len, strlen(want));
    return dropped;
}

static void expect_end(struct pn_log_sub *s)
{
    uint64_t dropped = 0;
    assert_null(pn_log_sub_next(s, NULL, &dropped));
    assert_int_equal(dropped, 0);
}

static void test_fanout(void **state)
{
    struct pn_logring *r = pn_logring_new(100);
    struct pn_log_sub *a = pn_log_sub_new(r, 0, NULL, NULL);
    struct pn_log_sub *b = pn_log_sub_new(r, 0, NULL, NULL);
    expect_end(a);
    for (int i = 0; i < 10; i++)
        push_num(r, i);
    /* a reads as lines come; b reads everything at the end. */
    for (int i = 0; i < 5; i++)
        assert_int_equal(expect_num(a, i), 0);
    for (int i = 10; i < 20; i++)
        push_num(r, i);
    for (int i = 5; i < 20; i++)
        assert_int_equal(expect_num(a, i), 0);
    for (int i = 0; i < 20; i++)
        assert_int_equal(expect_num(b, i), 0);
    expect_end(a);
    expect_end(b);
    assert_int_equal(pn_logring_count(r), 20);
    pn_log_sub_free(a);
    pn_log_sub_free(b);
    pn_logring_free(r);
}

static void test_backlog(void **state)
{
    struct pn_logring *r = pn_logring_new(100);
    for (int i = 0; i < 10; i++)
        push_num(r, i);
    struct pn_log_sub *s3 = pn_log_sub_new(r, 3, NULL, NULL);
    struct pn_log_sub *all = pn_log_sub_new(r, 1000, NULL, NULL);
    struct pn_log_sub *none = pn_log_sub_new(r, 0, NULL, NULL);
    for (int i = 7; i < 10; i++)
        expect_num(s3, i);
    expect_end(s3);
    for (int i = 0; i < 10; i++)
        expect_num(all, i);
    expect_end(all);
    expect_end(none);
    push_num(r, 10);
    expect_num(s3, 10);
    expect_num(all, 10);
    expect_num(none, 10);
    pn_log_sub_free(s3);
    pn_log_sub_free(all);
    pn_log_sub_free(none);
    pn_logring_free(r);
}

static void test_slow_reader(void **state)
{
    struct pn_logring *r = pn_logring_new(4);
    struct pn_log_sub *slow = pn_log_sub_new(r, 0, NULL, NULL);
    struct pn_log_sub *fast = pn_log_sub_new(r, 0, NULL, NULL);
    for (int i = 0; i < 10; i++) {
        push_num(r, i);
        expect_num(fast, i);
    }
    assert_int_equal(pn_logring_count(r), 4);
    /* 10 pushed, 4 held: the slow reader lost lines 0..5. */
    assert_int_equal(expect_num(slow, 6), 6);
    assert_int_equal(expect_num(slow, 7), 0);
    push_num(r, 10);
    push_num(r, 11);
    push_num(r, 12); /* drops 8 (9..12 held), slow is at 8 */
    assert_int_equal(expect_num(slow, 9), 1);
    for (int i = 10; i < 13; i++)
        assert_int_equal(expect_num(slow, i), 0);
    expect_end(slow);
    /* dropped is optional and accumulates */
    for (int i = 13; i < 20; i++)
        push_num(r, i);
    assert_non_null(pn_log_sub_next(slow, NULL, NULL));
    uint64_t dropped = 100;
    assert_non_null(pn_log_sub_next(slow, NULL, &dropped));
    assert_int_equal(dropped, 100);
    pn_log_sub_free(slow);
    pn_log_sub_free(fast);
    pn_logring_free(r);
}

struct reader {
    int notified;
    int read;
    bool read_on_notify;
    bool free_self;
    struct pn_log_sub *sub;
    struct pn_log_sub **victim; /* freed (and cleared) on notify */
    struct pn_logring *push_into;
};

static void on_notify(struct pn_log_sub *s, void *arg)
{
    struct reader *rd = arg;
    assert_ptr_equal(s, rd->sub);
    rd->notified++;
    if (rd->victim && *rd->victim) {
        pn_log_sub_free(*rd->victim);
        *rd->victim = NULL;
    }
    if (rd->push_into) {
        struct pn_logring *r = rd->push_into;
        rd->push_into = NULL;
        push_str(r, "nested");
    }
    if (rd->read_on_notify) {
        while (pn_log_sub_next(s, NULL, NULL))
            rd->read++;
    }
    if (rd->free_self) {
        pn_log_sub_free(s);
        rd->sub = NULL;
    }
}

static void test_notify_waiting_only(void **state)
{
    struct pn_logring *r = pn_logring_new(16);
    push_num(r, 0);
    struct reader eager = {.read_on_notify = true};
    struct reader lazy = {0};
    struct reader behind = {0};
    eager.sub = pn_log_sub_new(r, 0, on_notify, &eager);
    lazy.sub = pn_log_sub_new(r, 0, on_notify, &lazy);
    behind.sub = pn_log_sub_new(r, 1, on_notify, &behind); /* has one unread line */

    for (int i = 1; i <= 3; i++)
        push_num(r, i);
    assert_int_equal(eager.notified, 3); /* caught up again after each read */
    assert_int_equal(eager.read, 3);
    assert_int_equal(lazy.notified, 1); /* only the push that found it waiting */
    assert_int_equal(behind.notified, 0);

    /* Reading up to date makes a reader waiting again, even before it has
     * seen NULL. */
    for (int i = 1; i <= 3; i++)
        expect_num(lazy.sub, i);
    for (int i = 0; i <= 3; i++)
        expect_num(behind.sub, i);
    push_num(r, 4);
    assert_int_equal(eager.notified, 4);
    assert_int_equal(lazy.notified, 2);
    assert_int_equal(behind.notified, 1);
    push_num(r, 5);
    assert_int_equal(eager.notified, 5);
    assert_int_equal(lazy.notified, 2);
    assert_int_equal(behind.notified, 1);

    pn_log_sub_free(eager.sub);
    pn_log_sub_free(lazy.sub);
    pn_log_sub_free(behind.sub);
    push_num(r, 6); /* nobody left to notify */
    assert_int_equal(eager.notified, 5);
    pn_logring_free(r);
}

static void test_free_in_notify(void **state)
{
    struct pn_logring *r = pn_logring_new(8);
    struct reader first = {.read_on_notify = true, .free_self = true};
    struct reader killer = {0};
    struct reader victim = {0};
    struct reader last = {.read_on_notify = true};
    /* Notification order is the order they became waiting. */
    first.sub = pn_log_sub_new(r, 0, on_notify, &first);
    killer.sub = pn_log_sub_new(r, 0, on_notify, &killer);
    victim.sub = pn_log_sub_new(r, 0, on_notify, &victim);
    last.sub = pn_log_sub_new(r, 0, on_notify, &last);
    killer.victim = &victim.sub;

    push_num(r, 0);
    assert_int_equal(first.notified, 1);
    assert_int_equal(first.read, 1);
    assert_null(first.sub);
    assert_int_equal(killer.notified, 1);
    assert_null(victim.sub);
    assert_int_equal(victim.notified, 0); /* freed while pending */
    assert_int_equal(last.notified, 1);
    assert_int_equal(last.read, 1);

    push_num(r, 1);
    assert_int_equal(first.notified, 1);
    assert_int_equal(last.notified, 2);
    pn_log_sub_free(killer.sub);
    pn_log_sub_free(last.sub);
    pn_logring_free(r);
}

static void test_push_in_notify(void **state)
{
    struct pn_logring *r = pn_logring_new(8);
    struct reader a = {.read_on_notify = true};
    struct reader b = {.read_on_notify = true};
    a.sub = pn_log_sub_new(r, 0, on_notify, &a);
    b.sub = pn_log_sub_new(r, 0, on_notify, &b);
    a.push_into = r;
    push_num(r, 0);
    /* a pushed before reading, so it reads both lines in its one notify;
     * b is notified once (it was waiting once) and also reads both. */
    assert_int_equal(a.read, 2);
    assert_int_equal(b.read, 2);
    assert_int_equal(b.notified, 1);
    assert_int_equal(pn_logring_count(r), 2);
    push_num(r, 1);
    assert_int_equal(a.read, 3);
    assert_int_equal(b.read, 3);
    pn_log_sub_free(a.sub);
    pn_log_sub_free(b.sub);
    pn_logring_free(r);
}

static void test_capacity_one(void **state)
{
    struct pn_logring *r = pn_logring_new(1);
    struct pn_log_sub *s = pn_log_sub_new(r, 5, NULL, NULL);
    expect_end(s);
    push_num(r, 0);
    push_num(r, 1);
    assert_int_equal(pn_logring_count(r), 1);
    assert_int_equal(expect_num(s, 1), 1);
    expect_end(s);
    struct pn_log_sub *late = pn_log_sub_new(r, 5, NULL, NULL);
    expect_num(late, 1);
    expect_end(late);
    push_num(r, 2);
    assert_int_equal(expect_num(s, 2), 0);
    pn_log_sub_free(s);
    pn_log_sub_free(late);
    pn_logring_free(r);

    /* capacity 0 behaves as 1 */
    r = pn_logring_new(0);
    s = pn_log_sub_new(r, 0, NULL, NULL);
    push_num(r, 7);
    expect_num(s, 7);
    pn_log_sub_free(s);
    pn_logring_free(r);
}

static void test_long_and_odd_lines(void **state)
{
    enum { LIMIT = 65536 };
    struct pn_logring *r = pn_logring_new(4);
    struct pn_log_sub *s = pn_log_sub_new(r, 0, NULL, NULL);
    size_t big = LIMIT + 4000;
    char *line = malloc(big);
    memset(line, 'a', big);
    pn_logring_push(r, line, big);
    size_t len = 0;
    const char *got = pn_log_sub_next(s, &len, NULL);
    assert_int_equal(len, LIMIT);
    assert_int_equal(strlen(got), LIMIT);
    assert_int_equal(got[LIMIT - 1], 'a');

    /* A two-byte character across the cut is left out whole. */
    memcpy(line + LIMIT - 1, "\xc3\xa9", 2);
    pn_logring_push(r, line, big);
    got = pn_log_sub_next(s, &len, NULL);
    assert_int_equal(len, LIMIT - 1);
    /* ... and a line of exactly the limit is kept whole. */
    memcpy(line + LIMIT - 2, "\xc3\xa9", 2);
    pn_logring_push(r, line, LIMIT);
    got = pn_log_sub_next(s, &len, NULL);
    assert_int_equal(len, LIMIT);
    assert_memory_equal(got + LIMIT - 2, "\xc3\xa9", 2);
    free(line);

    /* Lines are copied: the caller's buffer may change afterwards. */
    char tmp[] = "copy me";
    pn_logring_push(r, tmp, 4);
    tmp[0] = 'X';
    pn_logring_push(r, "", 0);
    got = pn_log_sub_next(s, &len, NULL);
    assert_string_equal(got, "copy");
    got = pn_log_sub_next(s, &len, NULL);
    assert_string_equal(got, "");
    assert_int_equal(len, 0);
    expect_end(s);
    pn_log_sub_free(s);
    pn_logring_free(r);
}

/* However many slots the ring has, it holds at most 32 MiB of text: long
 * lines push the oldest ones out, counted as dropped for slow readers. */
static void test_byte_budget(void **state)
{
    enum { LIMIT = 65536 };
    struct pn_logring *r = pn_logring_new(10000);
    struct pn_log_sub *s = pn_log_sub_new(r, 0, NULL, NULL);
    char *line = malloc(LIMIT);
    memset(line, 'b', LIMIT);
    for (int i = 0; i < 1000; i++) /* 64 MiB offered */
        pn_logring_push(r, line, LIMIT);
    free(line);
    assert_int_equal(pn_logring_count(r), 512); /* 32 MiB / 64 KiB */
    uint64_t dropped = 0;
    size_t len, n = 0;
    while (pn_log_sub_next(s, &len, &dropped))
        n++;
    assert_int_equal(n, 512);
    assert_int_equal(dropped, 488);
    pn_log_sub_free(s);
    pn_logring_free(r);
}

static void test_ring_freed_first(void **state)
{
    struct pn_logring *r = pn_logring_new(4);
    struct reader rd = {0};
    rd.sub = pn_log_sub_new(r, 0, on_notify, &rd);
    push_num(r, 0);
    pn_logring_free(r); /* a caller bug, but it must not leave the sub dangling */
    assert_null(pn_log_sub_next(rd.sub, NULL, NULL));
    pn_log_sub_free(rd.sub);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fanout),           cmocka_unit_test(test_backlog),
        cmocka_unit_test(test_slow_reader),      cmocka_unit_test(test_notify_waiting_only),
        cmocka_unit_test(test_free_in_notify),   cmocka_unit_test(test_push_in_notify),
        cmocka_unit_test(test_capacity_one),     cmocka_unit_test(test_long_and_odd_lines),
        cmocka_unit_test(test_byte_budget),
        cmocka_unit_test(test_ring_freed_first),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
