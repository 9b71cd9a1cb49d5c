/* base/json: pn_json_quote prints a string exactly as jansson does. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "base/buf.h"
#include "base/json.h"

static void check_same(const char *s)
{
    json_t *j = json_string(s);
    assert_non_null(j);
    char *want = json_dumps(j, JSON_ENCODE_ANY | JSON_COMPACT);
    struct pn_buf b;
    pn_buf_init(&b, 0);
    pn_json_quote(&b, s);
    assert_int_equal(b.len, strlen(want));
    assert_memory_equal(b.data, want, b.len);
    pn_buf_free(&b);
    free(want);
    json_decref(j);
}

static void test_quote_matches_jansson(void **state)
{
    (void)state;
    check_same("");
    check_same("plain");
    check_same("q\"uo\\te/slash");
    check_same("\b\f\n\r\t");
    check_same("\xc3\xa9t\xc3\xa9 \xe2\x80\xa8 \xf0\x9f\x98\x80 \x7f");
    char every[128];
    for (int i = 1; i < 128; i++)
        every[i - 1] = (char)i;
    every[127] = '\0';
    check_same(every);
    for (int i = 1; i < 32; i++) {
        char one[4] = {'a', (char)i, 'z', 0};
        check_same(one);
        char lone[2] = {(char)i, 0};
        check_same(lone);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quote_matches_jansson),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
