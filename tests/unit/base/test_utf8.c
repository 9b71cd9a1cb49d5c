/* UTF-8 validation and sanitizing of core log lines. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "base/utf8.h"

static void test_valid(void **state)
{
    const char *ok[] = {"", "plain ascii", "caf\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80",
                        "\xf4\x8f\xbf\xbf"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        assert_true(pn_utf8_valid(ok[i], strlen(ok[i])));
    const char *bad[] = {"\xff", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                         "\xc3", "abc\x80"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_false(pn_utf8_valid(bad[i], strlen(bad[i])));
}

static void test_sanitize(void **state)
{
    char out[64];
    size_t n = pn_utf8_sanitize("a\xffz\xc3\xa9\xc3", 6, out);
    assert_int_equal(n, 1 + 3 + 1 + 2 + 3);
    assert_memory_equal(out, "a\xef\xbf\xbdz\xc3\xa9\xef\xbf\xbd", n);
    assert_true(pn_utf8_valid(out, n));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_sanitize),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
