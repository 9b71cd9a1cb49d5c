/* UUID parsing in every form Go's google/uuid accepts, refusal of bad input,
 * equality, nil, formatting and the version 4 bits of random UUIDs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>

#include "base/err.h"
#include "base/uuid.h"

static const uint8_t want_bytes[16] = {0x12, 0x3e, 0x45, 0x67, 0xe8, 0x9b, 0x12, 0xd3,
                                       0xa4, 0x56, 0x42, 0x66, 0x14, 0x17, 0x40, 0x00};

static int parse(const char *s, struct pn_uuid *u)
{
    return pn_uuid_parse(s, strlen(s), u);
}

static void test_forms(void **state)
{
    (void)state;
    static const char *const forms[] = {
        "123e4567-e89b-12d3-a456-426614174000",
        "123E4567-E89B-12D3-A456-426614174000",
        "123e4567e89b12d3a456426614174000",
        "123E4567E89B12D3A456426614174000",
        "{123e4567-e89b-12d3-a456-426614174000}",
        "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
        "URN:UUID:123E4567-e89b-12d3-a456-426614174000",
    };
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        struct pn_uuid u;
        memset(&u, 0xff, sizeof u);
        assert_int_equal(parse(forms[i], &u), PN_OK);
        assert_memory_equal(u.b, want_bytes, 16);
    }
}

static void test_bad(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "abc",
        "123e4567-e89b-12d3-a456-42661417400",    /* 35 */
        "123e4567-e89b-12d3-a456-4266141740000",  /* 37 */
        "123e4567e89b12d3a45642661417400",        /* 31 hex */
        "123e4567e89b12d3a4564266141740000",      /* 33 hex */
        "123e4567-e89b-12d3-a456-42661417400g",   /* non-hex */
        "g23e4567e89b12d3a456426614174000",       /* non-hex, bare */
        "123e4567+e89b-12d3-a456-426614174000",   /* wrong separator */
        "123e4567-e89b-12d3-a456_426614174000",   /* wrong separator */
        "123e456-7e89b-12d3-a456-426614174000",   /* dash moved */
        "{123e4567-e89b-12d3-a456-426614174000",  /* 37, open brace */
        "(123e4567-e89b-12d3-a456-426614174000)", /* wrong brackets */
        "urn:uuix:123e4567-e89b-12d3-a456-426614174000",
        "urn:uuid:123e4567e89b12d3a456426614174000",
        " 123e4567-e89b-12d3-a456-42661417400",
        "123e4567-e89b-12d3-a456-4266141740 0",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct pn_uuid u;
        assert_int_equal(parse(bad[i], &u), PN_ERR_INVAL);
    }
}

static void test_length_is_respected(void **state)
{
    (void)state;
    /* The length argument, not the NUL, ends the input. */
    const char *s = "123e4567-e89b-12d3-a456-426614174000trailing";
    struct pn_uuid u;
    assert_int_equal(pn_uuid_parse(s, 36, &u), PN_OK);
    assert_memory_equal(u.b, want_bytes, 16);
    assert_int_equal(pn_uuid_parse(s, 35, &u), PN_ERR_INVAL);
}

static void test_equal_nil(void **state)
{
    (void)state;
    struct pn_uuid a, b, nil;
    memset(&nil, 0, sizeof nil);
    assert_int_equal(parse("123e4567-e89b-12d3-a456-426614174000", &a), PN_OK);
    assert_int_equal(parse("123E4567E89B12D3A456426614174000", &b), PN_OK);
    assert_true(pn_uuid_equal(&a, &b));
    b.b[15] ^= 1;
    assert_false(pn_uuid_equal(&a, &b));
    b.b[15] ^= 1;
    b.b[0] ^= 0x80;
    assert_false(pn_uuid_equal(&a, &b));
    assert_false(pn_uuid_is_nil(&a));
    assert_true(pn_uuid_is_nil(&nil));
    struct pn_uuid z;
    assert_int_equal(parse("00000000-0000-0000-0000-000000000000", &z), PN_OK);
    assert_true(pn_uuid_is_nil(&z));
    z.b[7] = 1;
    assert_false(pn_uuid_is_nil(&z));
}

static void test_format(void **state)
{
    (void)state;
    struct pn_uuid u;
    char out[PN_UUID_STRLEN + 1];
    memset(out, 'x', sizeof out);
    assert_int_equal(parse("{123E4567-E89B-12D3-A456-426614174000}", &u), PN_OK);
    pn_uuid_format(&u, out);
    assert_string_equal(out, "123e4567-e89b-12d3-a456-426614174000");
    struct pn_uuid back;
    assert_int_equal(parse(out, &back), PN_OK);
    assert_true(pn_uuid_equal(&u, &back));
}

static void test_random_v4(void **state)
{
    (void)state;
    struct pn_uuid prev;
    memset(&prev, 0, sizeof prev);
    for (int i = 0; i < 64; i++) {
        struct pn_uuid u;
        assert_int_equal(pn_uuid_random(&u), PN_OK);
        assert_int_equal(u.b[6] >> 4, 4);      /* version 4 */
        assert_int_equal(u.b[8] & 0xc0, 0x80); /* RFC 4122 variant */
        assert_false(pn_uuid_is_nil(&u));
        assert_false(pn_uuid_equal(&u, &prev));
        char s[PN_UUID_STRLEN + 1];
        pn_uuid_format(&u, s);
        assert_int_equal(strlen(s), PN_UUID_STRLEN);
        assert_int_equal(s[14], '4');
        assert_non_null(strchr("89ab", s[19]));
        prev = u;
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forms),
        cmocka_unit_test(test_bad),
        cmocka_unit_test(test_length_is_respected),
        cmocka_unit_test(test_equal_nil),
        cmocka_unit_test(test_format),
        cmocka_unit_test(test_random_v4),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
