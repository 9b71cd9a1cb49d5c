/* The bounded buffer: growth, the maximum, consume. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "base/buf.h"
#include "base/err.h"

static void test_append_and_max(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 10);
    assert_int_equal(pn_buf_append_str(&b, "hello"), PN_OK);
    assert_int_equal(pn_buf_append_str(&b, "world"), PN_OK);
    assert_int_equal(b.len, 10);
    assert_int_equal(pn_buf_append(&b, "!", 1), PN_ERR_TOOBIG);
    assert_int_equal(b.len, 10);
    assert_memory_equal(b.data, "helloworld", 10);
    assert_null(pn_buf_reserve(&b, 1));
    pn_buf_free(&b);
}

static void test_growth_unbounded(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 0);
    for (int i = 0; i < 10000; i++)
        assert_int_equal(pn_buf_printf(&b, "%d,", i % 10), PN_OK);
    assert_int_equal(b.len, 20000);
    assert_int_equal(b.data[b.len], '\0');
    pn_buf_consume(&b, 19998);
    assert_int_equal(b.len, 2);
    assert_string_equal((char *)b.data, "9,");
    pn_buf_consume(&b, 100);
    assert_int_equal(b.len, 0);
    pn_buf_reset(&b);
    pn_buf_free(&b);
}

static void test_overflow_guard(void **state)
{
    struct pn_buf b;
    pn_buf_init(&b, 16);
    assert_null(pn_buf_reserve(&b, (size_t)-1));
    pn_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_append_and_max),
        cmocka_unit_test(test_growth_unbounded),
        cmocka_unit_test(test_overflow_guard),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
