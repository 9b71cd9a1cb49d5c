/* Host statistics for GetSystemStats, from /proc: memory total/used, CPU
 * count, CPU usage over the last sampling window, rx/tx bytes per second
 * summed over non-loopback interfaces. pn_sysstats_sample is called on the
 * node's periodic timer (every ~2 s); reads return the latest sample. */
#ifndef PN_NODE_SYSSTATS_H
#define PN_NODE_SYSSTATS_H

#include <stdint.h>

struct pn_sysstats {
    uint64_t mem_total, mem_used; /* bytes; used = total - MemAvailable */
    uint64_t cpu_cores;
    double cpu_usage; /* percent 0..100 over the window */
    uint64_t rx_bps, tx_bps;
};

struct pn_sysstats_sampler;
struct pn_sysstats_sampler *pn_sysstats_new(void);
void pn_sysstats_free(struct pn_sysstats_sampler *s);
/* Takes a sample; the first one only sets the baseline for rates. */
void pn_sysstats_sample(struct pn_sysstats_sampler *s);
void pn_sysstats_get(const struct pn_sysstats_sampler *s, struct pn_sysstats *out);

/* For tests: parse /proc-formatted text instead of the real files. */
void pn_sysstats_sample_from(struct pn_sysstats_sampler *s, const char *stat, const char *meminfo,
                             const char *netdev, uint64_t now_ms);

#endif
