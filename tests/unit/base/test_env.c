/* .env loading: the accepted syntax, the environment winning over the file,
 * all-or-nothing on errors, and the line numbers in error messages. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/env.h"
#include "base/err.h"

static char tmpdir[64];
static char path[128];

static const char *const names[] = {"PN_T_A",   "PN_T_B",   "PN_T_C",   "PN_T_D",     "PN_T_E",
                                    "PN_T_F",   "PN_T_G",   "PN_T_H",   "PN_T_I",     "PN_T_J",
                                    "PN_T_K",   "PN_T_DUP", "PN_T_ENV", "PN_T_EMPTY", "PN_T_CRLF",
                                    "lower_ok", "_under"};

static void write_file(const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int setup(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        unsetenv(names[i]);
    return 0;
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/pn-env-XXXXXX");
    if (!mkdtemp(tmpdir))
        return -1;
    snprintf(path, sizeof path, "%s/.env", tmpdir);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    unlink(path);
    rmdir(tmpdir);
    return 0;
}

static void test_syntax(void **state)
{
    (void)state;
    write_file("# a comment\n"
               "\n"
               "   \t\n"
               "PN_T_A=plain\n"
               "export PN_T_B=exported\n"
               "PN_T_C = spaced value   # trailing comment\n"
               "PN_T_D='single # not a comment \\n literal'\n"
               "PN_T_E=\"line1\\nline2\\ttab \\\\ \\\" quote\" # comment\n"
               "PN_T_F=a#b\n"
               "PN_T_G=\n"
               "  # indented comment\n"
               "PN_T_H=\"\"\n"
               "PN_T_I=\"unknown \\q escape\"\n"
               "PN_T_CRLF=crlf\r\n"
               "lower_ok=1\n"
               "_under=2\n"
               "PN_T_J=no newline at end");
    char err[256] = "";
    assert_int_equal(pn_env_load_file(path, err, sizeof err), PN_OK);
    assert_string_equal(getenv("PN_T_A"), "plain");
    assert_string_equal(getenv("PN_T_B"), "exported");
    assert_string_equal(getenv("PN_T_C"), "spaced value");
    assert_string_equal(getenv("PN_T_D"), "single # not a comment \\n literal");
    assert_string_equal(getenv("PN_T_E"), "line1\nline2\ttab \\ \" quote");
    assert_string_equal(getenv("PN_T_F"), "a#b");
    assert_string_equal(getenv("PN_T_G"), "");
    assert_null(pn_env_get("PN_T_G"));
    assert_string_equal(getenv("PN_T_H"), "");
    assert_string_equal(getenv("PN_T_I"), "unknown \\q escape");
    assert_string_equal(getenv("PN_T_CRLF"), "crlf");
    assert_string_equal(getenv("lower_ok"), "1");
    assert_string_equal(getenv("_under"), "2");
    assert_string_equal(getenv("PN_T_J"), "no newline at end");
}

static void test_env_wins(void **state)
{
    (void)state;
    setenv("PN_T_ENV", "from-env", 1);
    setenv("PN_T_EMPTY", "", 1);
    write_file("PN_T_ENV=from-file\nPN_T_EMPTY=filled\nPN_T_DUP=first\nPN_T_DUP=last\n");
    char err[256] = "";
    assert_int_equal(pn_env_load_file(path, err, sizeof err), PN_OK);
    assert_string_equal(getenv("PN_T_ENV"), "from-env");
    /* An empty value counts as unset, so the file fills it. */
    assert_string_equal(getenv("PN_T_EMPTY"), "filled");
    /* Within the file, the last definition wins. */
    assert_string_equal(getenv("PN_T_DUP"), "last");
}

static void expect_error(const char *text, const char *msg)
{
    write_file(text);
    char err[256] = "";
    assert_int_equal(pn_env_load_file(path, err, sizeof err), PN_ERR_INVAL);
    char want[256];
    snprintf(want, sizeof want, "%s:%s", path, msg);
    assert_string_equal(err, want);
    /* All or nothing: the valid first line was not applied. */
    assert_null(getenv("PN_T_A"));
}

static void test_errors_set_nothing(void **state)
{
    (void)state;
    expect_error("PN_T_A=1\n# c\nPN_T_B=\"open\n", "3: unterminated double quote");
    expect_error("PN_T_A=1\nPN_T_B='open\n", "2: unterminated single quote");
    expect_error("PN_T_A=1\n\n\njust words\n", "4: missing '=' (expected NAME=value)");
    expect_error("PN_T_A=1\n1BAD=x\n",
                 "2: bad variable name \"1BAD\" (letters, digits and '_', not starting with a "
                 "digit)");
    expect_error("PN_T_A=1\nBAD-NAME=x\n",
                 "2: bad variable name \"BAD-NAME\" (letters, digits and '_', not starting with "
                 "a digit)");
    expect_error("PN_T_A=1\n=x\n",
                 "2: bad variable name \"\" (letters, digits and '_', not starting with a "
                 "digit)");
    expect_error("PN_T_A=1\nPN_T_B=\"x\" junk\n", "2: unexpected text after the closing quote");
    expect_error("PN_T_A=1\r\nexport\r\n", "2: missing '=' (expected NAME=value)");
}

static void test_not_found(void **state)
{
    (void)state;
    char err[256] = "";
    assert_int_equal(pn_env_load_file("/nonexistent/pn/.env", err, sizeof err), PN_ERR_NOTFOUND);
}

static void test_too_big(void **state)
{
    (void)state;
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("PN_T_A=1\n", f);
    for (int i = 0; i < 1024 * 1024 / 30 + 2; i++)
        fputs("# padding padding padding pad\n", f);
    fclose(f);
    char err[256] = "";
    assert_int_equal(pn_env_load_file(path, err, sizeof err), PN_ERR_INVAL);
    assert_non_null(strstr(err, "larger than 1 MiB"));
    assert_null(getenv("PN_T_A"));
}

static void test_nul_byte(void **state)
{
    (void)state;
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fwrite("PN_T_A=1\nPN_T_B=x\0y\n", 1, 21, f);
    fclose(f);
    char err[256] = "";
    assert_int_equal(pn_env_load_file(path, err, sizeof err), PN_ERR_INVAL);
    char want[256];
    snprintf(want, sizeof want, "%s:2: NUL byte in line", path);
    assert_string_equal(err, want);
}

static void test_env_get(void **state)
{
    (void)state;
    assert_null(pn_env_get("PN_T_A"));
    setenv("PN_T_A", "", 1);
    assert_null(pn_env_get("PN_T_A"));
    setenv("PN_T_A", "v", 1);
    assert_string_equal(pn_env_get("PN_T_A"), "v");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_syntax, setup),
        cmocka_unit_test_setup(test_env_wins, setup),
        cmocka_unit_test_setup(test_errors_set_nothing, setup),
        cmocka_unit_test_setup(test_not_found, setup),
        cmocka_unit_test_setup(test_too_big, setup),
        cmocka_unit_test_setup(test_nul_byte, setup),
        cmocka_unit_test_setup(test_env_get, setup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
