/* System stats: /proc fixtures two seconds apart give exact CPU percent,
 * memory and per-second rates; loopback is excluded; counters that go
 * down (wrap, vanished or recreated interfaces) count as 0; and a real
 * sample on this machine is plausible. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <unistd.h>

#include "node/sysstats.h"

#define NETDEV_HEAD                                                                                \
    "Inter-|   Receive                                                |  Transmit\n"               \
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs "     \
    "drop fifo colls carrier compressed\n"

static const char stat1[] = "cpu  100 0 50 800 50 0 0 0 0 0\n"
                            "cpu0 50 0 25 400 25 0 0 0 0 0\n"
                            "intr 12345 0 0\n";
/* +150 user +50 system +200 idle +100 iowait: total +500, idle 300, busy 200 */
static const char stat2[] = "cpu  250 0 100 1000 150 0 0 0 0 0\n"
                            "cpu0 125 0 50 550 25 0 0 0 0 0\n";

static const char meminfo[] = "MemTotal:        2048000 kB\n"
                              "MemFree:          512000 kB\n"
                              "MemAvailable:    1024000 kB\n"
                              "Buffers:           10000 kB\n";

static const char netdev1[] = NETDEV_HEAD
    "    lo: 1000000     100    0    0    0     0          0         0  1000000     100    0    0 "
    "   0     0       0          0\n"
    "  eth0:    1000      10    0    0    0     0          0         0     2000      20    0    0 "
    "   0     0       0          0\n"
    "   wg0:     500       5    0    0    0     0          0         0        0       0    0    0 "
    "   0     0       0          0\n";

static const char netdev2[] = NETDEV_HEAD
    "    lo: 9000000000  100    0    0    0     0          0         0 9000000000 100    0    0 "
    "   0     0       0          0\n"
    "  eth0:  201000      10    0    0    0     0          0         0   402000      20    0    0 "
    "   0     0       0          0\n"
    "   wg0:    2500       5    0    0    0     0          0         0     1000       0    0    0 "
    "   0     0       0          0\n";

/* eth0 reset to small numbers, wg0 gone, eth1 new with large counters,
 * and the old no-space-after-colon format. */
static const char netdev3[] = NETDEV_HEAD
    "  eth0:100      10    0    0    0     0          0         0      100      20    0    0 "
    "   0     0       0          0\n"
    "  eth1: 99999999999 5  0    0    0     0          0         0 99999999999 0    0    0 "
    "   0     0       0          0\n";

static void test_two_samples(void **state)
{
    struct pn_sysstats_sampler *s = pn_sysstats_new();
    struct pn_sysstats st;

    pn_sysstats_sample_from(s, stat1, meminfo, netdev1, 10000);
    pn_sysstats_get(s, &st);
    assert_int_equal(st.mem_total, 2048000ULL * 1024);
    assert_int_equal(st.mem_used, 1024000ULL * 1024);
    assert_true(st.cpu_cores >= 1);
    assert_int_equal(st.cpu_cores, (uint64_t)sysconf(_SC_NPROCESSORS_ONLN));
    /* The first sample is only the baseline for rates. */
    assert_true(st.cpu_usage == 0.0);
    assert_int_equal(st.rx_bps, 0);
    assert_int_equal(st.tx_bps, 0);

    pn_sysstats_sample_from(s, stat2, meminfo, netdev2, 12000);
    pn_sysstats_get(s, &st);
    assert_true(st.cpu_usage == 40.0);
    /* eth0 +200000/+400000, wg0 +2000/+1000 over 2 s; lo ignored */
    assert_int_equal(st.rx_bps, 101000);
    assert_int_equal(st.tx_bps, 200500);

    /* Counters going down and interfaces (dis)appearing give 0, not 2^64. */
    pn_sysstats_sample_from(s, stat2, meminfo, netdev3, 14000);
    pn_sysstats_get(s, &st);
    assert_int_equal(st.rx_bps, 0);
    assert_int_equal(st.tx_bps, 0);
    assert_true(st.cpu_usage == 40.0); /* no CPU time passed: kept */

    /* And from the new baseline, rates resume (eth0 +1000/+3000 in 1 s). */
    static const char netdev4[] =
        NETDEV_HEAD "  eth0:    1100      10    0    0    0     0          0         0     3100 "
                    "     20    0    0    0     0       0          0\n"
                    "  eth1: 99999999999 5  0    0    0     0          0         0 99999999999 0 "
                    "   0    0    0     0       0          0\n";
    pn_sysstats_sample_from(s, stat2, meminfo, netdev4, 15000);
    pn_sysstats_get(s, &st);
    assert_int_equal(st.rx_bps, 1000);
    assert_int_equal(st.tx_bps, 3000);
    pn_sysstats_free(s);
}

static void test_cpu_edges(void **state)
{
    struct pn_sysstats_sampler *s = pn_sysstats_new();
    struct pn_sysstats st;
    /* iowait stepping backwards: idle delta clamps at 0 -> 100% busy */
    pn_sysstats_sample_from(s, "cpu  100 0 0 100 50 0 0 0\n", NULL, NULL, 0);
    pn_sysstats_sample_from(s, "cpu  300 0 0 100 0 0 0 0\n", NULL, NULL, 2000);
    pn_sysstats_get(s, &st);
    assert_true(st.cpu_usage == 100.0);
    /* all idle, counting irq softirq steal in the total */
    pn_sysstats_sample_from(s, "cpu  300 0 0 400 0 0 0 0\n", NULL, NULL, 4000);
    pn_sysstats_get(s, &st);
    assert_true(st.cpu_usage == 0.0);
    pn_sysstats_sample_from(s, "cpu  300 0 0 700 0 100 100 100\n", NULL, NULL, 6000);
    pn_sysstats_get(s, &st);
    assert_true(st.cpu_usage == 50.0);
    /* garbage leaves the last value and restarts the baseline */
    pn_sysstats_sample_from(s, "nothing here\n", "junk\n", NETDEV_HEAD, 8000);
    pn_sysstats_get(s, &st);
    assert_true(st.cpu_usage == 50.0);
    assert_int_equal(st.mem_total, 0);
    assert_int_equal(st.rx_bps, 0);
    pn_sysstats_free(s);
}

static void test_meminfo_fallback(void **state)
{
    struct pn_sysstats_sampler *s = pn_sysstats_new();
    struct pn_sysstats st;
    /* No MemAvailable (kernel < 3.14): MemFree + Buffers + Cached. */
    pn_sysstats_sample_from(s, NULL,
                            "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\n"
                            "Cached: 250 kB\nSwapCached: 999 kB\n",
                            NULL, 0);
    pn_sysstats_get(s, &st);
    assert_int_equal(st.mem_total, 1000 * 1024);
    assert_int_equal(st.mem_used, 600 * 1024);
    pn_sysstats_free(s);
}

static void test_real_sample(void **state)
{
    struct pn_sysstats_sampler *s = pn_sysstats_new();
    struct pn_sysstats st;
    pn_sysstats_sample(s);
    usleep(50 * 1000);
    pn_sysstats_sample(s);
    pn_sysstats_get(s, &st);
    assert_true(st.mem_total > 0);
    assert_true(st.mem_used <= st.mem_total);
    assert_true(st.cpu_cores >= 1);
    assert_true(st.cpu_usage >= 0.0 && st.cpu_usage <= 100.0);
    pn_sysstats_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_samples),
        cmocka_unit_test(test_cpu_edges),
        cmocka_unit_test(test_meminfo_fallback),
        cmocka_unit_test(test_real_sample),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
