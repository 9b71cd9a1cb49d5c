/* Version-line parsing for both cores (spec/cores.md §8: one regex). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "base/err.h"
#include "core/dialect.h"

static void test_v2ray_debian(void **state)
{
    struct pn_core_version v;
    assert_int_equal(pn_core_parse_version("V2Ray 4.34.0 (user) 20230518-074445 (go1.19.8 "
                                           "linux/amd64)\nA unified platform for anti-censorship.",
                                           &v),
                     PN_OK);
    assert_int_equal(v.kind, PN_CORE_V2RAY);
    assert_int_equal(v.major, 4);
    assert_int_equal(v.minor, 34);
    assert_int_equal(v.patch, 0);
    assert_string_equal(v.text, "4.34.0");
}

static void test_xray_date_version(void **state)
{
    struct pn_core_version v;
    assert_int_equal(
        pn_core_parse_version("Xray 26.7.28 (Xray, Penetrates Everything.) Custom (go1.24)", &v),
        PN_OK);
    assert_int_equal(v.kind, PN_CORE_XRAY);
    assert_string_equal(v.text, "26.7.28");
    assert_string_equal(pn_core_kind_name(v.kind), "xray");
}

static void test_rejects(void **state)
{
    struct pn_core_version v;
    const char *bad[] = {"",          "xray 1.8.0",  "Xray1.8.0",   "Xray 1.8",
                         "Xray 1..0", "V2Ray a.b.c", "Usage: v2ray", "Xray 99999999999.1.1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(pn_core_parse_version(bad[i], &v), PN_ERR_INVAL);
        assert_int_equal(v.kind, PN_CORE_UNKNOWN);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_v2ray_debian),
        cmocka_unit_test(test_xray_date_version),
        cmocka_unit_test(test_rejects),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
