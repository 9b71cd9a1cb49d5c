/* Host statistics from /proc (see sysstats.h). The sampler owns the latest
 * sample and the previous raw counters (CPU jiffies, per-interface byte
 * counts) that rates are computed against. Parsing works on text so that
 * tests can feed fixtures; the real sample only reads the three files.
 *
 * Network rates are computed per interface and then summed, so an
 * interface that appears, vanishes or has its counters reset (a wrap, a
 * driver reload, a veth recreated under the same name) contributes 0 for
 * that window instead of a huge or negative number. */
#include "node/sysstats.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/time.h"

/* /proc/net/dev grows with the interface count (about 130 bytes each);
 * a host with thousands of veths still fits. */
#define MAX_PROC_FILE (4u << 20)

struct iface {
    char name[32];
    uint64_t rx, tx;
};

struct pn_sysstats_sampler {
    struct pn_sysstats cur;
    bool have_cpu;
    uint64_t cpu_total, cpu_idle;
    bool have_net;
    uint64_t net_ms;
    struct iface *ifs;
    size_t nifs;
};

/* Reads an unsigned decimal after optional blanks, saturating instead of
 * overflowing; false if there is no number at *p. */
static bool next_u64(const char **p, const char *end, uint64_t *out)
{
    const char *s = *p;
    while (s < end && (*s == ' ' || *s == '\t'))
        s++;
    if (s >= end || *s < '0' || *s > '9')
        return false;
    uint64_t v = 0;
    for (; s < end && *s >= '0' && *s <= '9'; s++) {
        if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, *s - '0', &v))
            v = UINT64_MAX;
    }
    *out = v;
    *p = s;
    return true;
}

static const char *line_end(const char *s)
{
    const char *nl = strchr(s, '\n');
    return nl ? nl : s + strlen(s);
}

/* The aggregate "cpu" line: user nice system idle iowait irq softirq
 * steal. guest and guest_nice are already inside user and nice, so they
 * are not added again. Idle time is idle + iowait. */
static bool parse_stat(const char *text, uint64_t *total, uint64_t *idle)
{
    for (const char *s = text; *s;) {
        const char *end = line_end(s);
        if (end - s > 4 && memcmp(s, "cpu ", 4) == 0) {
            uint64_t f[8] = {0};
            const char *p = s + 4;
            int n = 0;
            while (n < 8 && next_u64(&p, end, &f[n]))
                n++;
            if (n < 4)
                return false;
            *total = 0;
            for (int i = 0; i < 8; i++)
                *total += f[i];
            *idle = f[3] + f[4];
            return true;
        }
        s = *end ? end + 1 : end;
    }
    return false;
}

/* MemTotal and MemAvailable in kB, turned into bytes. Kernels before 3.14
 * have no MemAvailable; MemFree + Buffers + Cached approximates it. */
static bool parse_meminfo(const char *text, uint64_t *total, uint64_t *used)
{
    enum { TOTAL, AVAIL, FREE, BUFFERS, CACHED, NKEYS };
    static const char *const keys[NKEYS] = {
        "MemTotal:", "MemAvailable:", "MemFree:", "Buffers:", "Cached:"};
    uint64_t v[NKEYS] = {0};
    bool seen[NKEYS] = {false};
    for (const char *s = text; *s;) {
        const char *end = line_end(s);
        for (int k = 0; k < NKEYS; k++) {
            size_t kl = strlen(keys[k]);
            if ((size_t)(end - s) > kl && memcmp(s, keys[k], kl) == 0) {
                const char *p = s + kl;
                seen[k] = next_u64(&p, end, &v[k]);
                break;
            }
        }
        s = *end ? end + 1 : end;
    }
    if (!seen[TOTAL])
        return false;
    uint64_t avail = seen[AVAIL] ? v[AVAIL] : v[FREE] + v[BUFFERS] + v[CACHED];
    *total = v[TOTAL] * 1024;
    *used = avail < v[TOTAL] ? (v[TOTAL] - avail) * 1024 : 0;
    return true;
}

/* Every "name: rx_bytes ... (8 receive fields) tx_bytes ..." line except
 * the loopback. The two header lines have no colon. Returns the number of
 * interfaces, with *out (caller frees) holding them. */
static size_t parse_netdev(const char *text, struct iface **out)
{
    size_t n = 0, cap = 0;
    struct iface *ifs = NULL;
    for (const char *s = text; *s;) {
        const char *end = line_end(s);
        const char *colon = memchr(s, ':', (size_t)(end - s));
        if (colon) {
            const char *name = s;
            while (name < colon && (*name == ' ' || *name == '\t'))
                name++;
            size_t nlen = (size_t)(colon - name);
            uint64_t f[9];
            const char *p = colon + 1;
            int k = 0;
            while (k < 9 && next_u64(&p, end, &f[k]))
                k++;
            bool lo = nlen == 2 && memcmp(name, "lo", 2) == 0;
            if (k == 9 && nlen > 0 && nlen < sizeof ifs->name && !lo) {
                if (n == cap) {
                    cap = cap ? cap * 2 : 8;
                    ifs = pn_realloc(ifs, cap * sizeof *ifs);
                }
                memcpy(ifs[n].name, name, nlen);
                ifs[n].name[nlen] = '\0';
                ifs[n].rx = f[0];
                ifs[n].tx = f[8];
                n++;
            }
        }
        s = *end ? end + 1 : end;
    }
    *out = ifs;
    return n;
}

/* Bytes per second for a delta over ms milliseconds, without overflowing
 * the multiplication for absurd deltas. */
static uint64_t per_second(uint64_t delta, uint64_t ms)
{
    if (delta <= UINT64_MAX / 1000)
        return delta * 1000 / ms;
    return delta / ms * 1000;
}

/* Sums the growth of each interface that was also in the previous sample
 * (looked up at the same position first, which is the usual case). */
static void net_rates(struct pn_sysstats_sampler *s, const struct iface *ifs, size_t n, uint64_t ms)
{
    uint64_t rx = 0, tx = 0;
    for (size_t i = 0; i < n; i++) {
        const struct iface *old = NULL;
        if (i < s->nifs && strcmp(s->ifs[i].name, ifs[i].name) == 0) {
            old = &s->ifs[i];
        } else {
            for (size_t j = 0; j < s->nifs && !old; j++)
                if (strcmp(s->ifs[j].name, ifs[i].name) == 0)
                    old = &s->ifs[j];
        }
        if (!old)
            continue;
        if (ifs[i].rx > old->rx)
            rx += ifs[i].rx - old->rx;
        if (ifs[i].tx > old->tx)
            tx += ifs[i].tx - old->tx;
    }
    s->cur.rx_bps = per_second(rx, ms);
    s->cur.tx_bps = per_second(tx, ms);
}

static uint64_t online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (uint64_t)n : 1;
}

struct pn_sysstats_sampler *pn_sysstats_new(void)
{
    struct pn_sysstats_sampler *s = pn_new(struct pn_sysstats_sampler);
    s->cur.cpu_cores = online_cpus();
    return s;
}

void pn_sysstats_free(struct pn_sysstats_sampler *s)
{
    if (!s)
        return;
    free(s->ifs);
    free(s);
}

/* One sampling step over /proc-formatted text; any of the texts may be
 * NULL (file unreadable), which leaves that part of the sample as it was
 * and restarts its rate baseline. */
void pn_sysstats_sample_from(struct pn_sysstats_sampler *s, const char *stat, const char *meminfo,
                             const char *netdev, uint64_t now_ms)
{
    s->cur.cpu_cores = online_cpus();

    uint64_t mt, mu;
    if (meminfo && parse_meminfo(meminfo, &mt, &mu)) {
        s->cur.mem_total = mt;
        s->cur.mem_used = mu;
    }

    uint64_t total, idle;
    if (stat && parse_stat(stat, &total, &idle)) {
        if (s->have_cpu && total > s->cpu_total) {
            uint64_t dt = total - s->cpu_total;
            /* iowait is known to step backwards on some kernels */
            uint64_t di = idle > s->cpu_idle ? idle - s->cpu_idle : 0;
            if (di > dt)
                di = dt;
            s->cur.cpu_usage = 100.0 * (double)(dt - di) / (double)dt;
        }
        s->have_cpu = true;
        s->cpu_total = total;
        s->cpu_idle = idle;
    } else {
        s->have_cpu = false;
    }

    if (netdev) {
        struct iface *ifs;
        size_t n = parse_netdev(netdev, &ifs);
        if (s->have_net && now_ms > s->net_ms)
            net_rates(s, ifs, n, now_ms - s->net_ms);
        free(s->ifs);
        s->ifs = ifs;
        s->nifs = n;
        s->net_ms = now_ms;
        s->have_net = true;
    } else {
        s->have_net = false;
        s->cur.rx_bps = s->cur.tx_bps = 0;
    }
}

/* Reads a whole /proc file (their sizes are not known in advance and
 * st_size is 0) into a NUL-terminated buffer the caller frees; NULL if it
 * cannot be read. */
static char *read_proc(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = pn_malloc(cap);
    for (;;) {
        if (cap - len < 2) {
            if (cap >= MAX_PROC_FILE) {
                /* Keep the whole lines that fit: a cut number would make
                 * the next window's delta wrong. */
                char *nl = memrchr(buf, '\n', len);
                len = nl ? (size_t)(nl - buf) + 1 : 0;
                break;
            }
            cap *= 2;
            buf = pn_realloc(buf, cap);
        }
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            free(buf);
            close(fd);
            return NULL;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = '\0';
    return buf;
}

void pn_sysstats_sample(struct pn_sysstats_sampler *s)
{
    char *stat = read_proc("/proc/stat");
    char *meminfo = read_proc("/proc/meminfo");
    char *netdev = read_proc("/proc/net/dev");
    pn_sysstats_sample_from(s, stat, meminfo, netdev, pn_now_ms());
    free(stat);
    free(meminfo);
    free(netdev);
}

void pn_sysstats_get(const struct pn_sysstats_sampler *s, struct pn_sysstats *out)
{
    *out = s->cur;
}
