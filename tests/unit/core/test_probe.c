/* The version probe against real programs: the Debian v2ray when present,
 * scripts that print a version, print nothing, or hang past the deadline. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <event2/event.h>

#include "base/err.h"
#include "core/probe.h"

struct result {
    int done;
    int rv;
    struct pn_core_version ver;
    char detail[200];
};

static void on_done(int rv, const struct pn_core_version *ver, const char *detail, void *arg)
{
    struct result *r = arg;
    r->done++;
    r->rv = rv;
    if (ver)
        r->ver = *ver;
    snprintf(r->detail, sizeof r->detail, "%s", detail);
}

static char *script(const char *body)
{
    static char path[64];
    snprintf(path, sizeof path, "/tmp/pn-probe-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    dprintf(fd, "#!/bin/sh\n%s\n", body);
    close(fd);
    chmod(path, 0700);
    return path;
}

static struct result run_probe(const char *exe, unsigned timeout_ms)
{
    struct event_base *base = event_base_new();
    struct result r = {0};
    char err[200];
    struct pn_core_probe *p;
    assert_int_equal(pn_core_probe_start(base, exe, timeout_ms, on_done, &r, &p, err, sizeof err),
                     PN_OK);
    event_base_dispatch(base);
    event_base_free(base);
    assert_int_equal(r.done, 1);
    return r;
}

static void test_fake_xray(void **state)
{
    char *s = script("[ \"$1\" = -version ] && echo 'Xray 25.1.30 (Xray, Penetrates "
                     "Everything.) abc1234 (go1.23 linux/amd64)'");
    struct result r = run_probe(s, 5000);
    unlink(s);
    assert_int_equal(r.rv, PN_OK);
    assert_int_equal(r.ver.kind, PN_CORE_XRAY);
    assert_string_equal(r.ver.text, "25.1.30");
}

static void test_real_v2ray(void **state)
{
    if (access("/usr/bin/v2ray", X_OK) != 0)
        fail_msg("/usr/bin/v2ray missing: apt-get install v2ray");
    struct result r = run_probe("/usr/bin/v2ray", 5000);
    assert_int_equal(r.rv, PN_OK);
    assert_int_equal(r.ver.kind, PN_CORE_V2RAY);
    assert_string_equal(r.ver.text, "4.34.0");
}

static void test_no_version_line(void **state)
{
    char *s = script("echo 'something else'; exit 3");
    struct result r = run_probe(s, 5000);
    unlink(s);
    assert_int_equal(r.rv, PN_ERR_INVAL);
    assert_non_null(strstr(r.detail, "exit status 3"));
}

static void test_timeout_kills(void **state)
{
    char *s = script("exec sleep 30");
    struct result r = run_probe(s, 200);
    unlink(s);
    assert_int_equal(r.rv, PN_ERR_TIMEOUT);
}

static void test_missing_binary(void **state)
{
    struct event_base *base = event_base_new();
    struct result r = {0};
    char err[200];
    struct pn_core_probe *p;
    assert_int_equal(pn_core_probe_start(base, "/nonexistent/xray", 1000, on_done, &r, &p, err,
                                         sizeof err),
                     PN_ERR_IO);
    assert_int_equal(r.done, 0);
    event_base_free(base);
}

static void test_cancel(void **state)
{
    char *s = script("exec sleep 30");
    struct event_base *base = event_base_new();
    struct result r = {0};
    char err[200];
    struct pn_core_probe *p;
    assert_int_equal(pn_core_probe_start(base, s, 5000, on_done, &r, &p, err, sizeof err), PN_OK);
    pn_core_probe_cancel(p);
    event_base_free(base);
    unlink(s);
    assert_int_equal(r.done, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fake_xray),    cmocka_unit_test(test_real_v2ray),
        cmocka_unit_test(test_no_version_line), cmocka_unit_test(test_timeout_kills),
        cmocka_unit_test(test_missing_binary), cmocka_unit_test(test_cancel),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
