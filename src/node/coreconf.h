/* The core config builder: pure, no I/O. It turns the panel's config JSON,
 * the users and the node's internal ports into the JSON the core runs, as
 * spec/pasarguard.md §9 and §10 describe (kept keys, API inbound on
 * loopback and its routing rule first, api/stats/policy, geoip:private
 * expanded to CIDRs, the malformed-domain guard, observatory cleanup,
 * excluded inbounds untouched, users → inbound clients per protocol), with
 * the per-core differences of spec/cores.md (v2ray 4.34: no Xray-only keys,
 * vless `decryption: none` and no flow, vmess alterId 0, single-user
 * shadowsocks). It also describes each inbound so the backend can apply
 * user changes through the core API with the same eligibility rules. */
#ifndef PN_NODE_CORECONF_H
#define PN_NODE_CORECONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/coreapi.h"
#include "core/dialect.h"
#include "node/users.h"

#define PN_API_INBOUND_TAG "API_INBOUND"

enum pn_inbound_kind {
    PN_IN_OTHER = 0, /* no users (dokodemo-door, socks, http, ...) */
    PN_IN_VMESS,
    PN_IN_VLESS,
    PN_IN_TROJAN,
    PN_IN_SHADOWSOCKS,    /* classic AEAD, multi-user (Xray) */
    PN_IN_SS2022,         /* 2022-blake3-*, multi-user (Xray) */
    PN_IN_SS_SINGLE,      /* v2ray 4.34 shadowsocks: one user in the top level */
    PN_IN_HYSTERIA,
};

struct pn_inbound_info {
    char *tag;
    enum pn_inbound_kind kind;
    bool excluded;   /* in exclude_inbounds: never touched, never targeted */
    char *flow;      /* vless settings.flow ("" when none): replaces API users' flow */
    char *ss_method; /* shadowsocks settings.method, lower-case ("" when none) */
    char *single_email; /* PN_IN_SS_SINGLE: the user placed in it, or NULL */
};

struct pn_coreconf {
    char *json; /* the generated config, NUL-terminated */
    size_t json_len;
    struct pn_inbound_info *inbounds;
    size_t ninbounds;
    bool has_observatory;    /* observatory or burstObservatory present (Xray) */
    bool stats_user_online;  /* policy level 0 has statsUserOnline (Xray) */
    uint16_t metrics_port;   /* 0 when no metrics listener */
    char **noise_outbounds;  /* blackhole, dns and loopback outbound tags: no latency */
    size_t nnoise_outbounds;
};

struct pn_coreconf_opts {
    const char *panel_json; /* Backend.config */
    size_t panel_len;
    const char *const *exclude; /* exclude_inbounds */
    size_t nexclude;
    struct pn_core_version core; /* kind and version of the core */
    uint16_t api_port;
    uint16_t metrics_port;     /* 0 = none (always 0 on v2ray) */
    const char *const *local_addrs; /* sources allowed on the API rule besides 127.0.0.1, ::1 */
    size_t naddrs;
    const struct pn_userset *users; /* may be NULL */
};

/* Builds the config. Returns PN_OK, or PN_ERR_INVAL with err holding e.g.
 * `invalid config JSON: line 3 column 14: ...` or `config: inbounds must
 * be an array`. Warnings (skipped users, unsupported methods) are logged. */
int pn_coreconf_build(const struct pn_coreconf_opts *opts, struct pn_coreconf *out, char *err,
                      size_t errlen);
void pn_coreconf_free(struct pn_coreconf *c);

/* The inbound with this tag, or NULL. */
const struct pn_inbound_info *pn_coreconf_inbound(const struct pn_coreconf *c, const char *tag);

/* Whether user u goes into inbound in (spec §10: listed tag, not excluded,
 * the protocol's sub-message present and yielding an account), and its
 * account for the core API. String fields of acct point into u, into in,
 * or into scratch (the SS-2022 derived key, the canonical UUID). An
 * API-added vless user gets the inbound's flow when that is non-empty.
 * scratch must hold at least PN_COREACCT_SCRATCH bytes (else false).
 * Skips that §17 says to log (empty secret, invalid UUID, unknown method)
 * are logged as warnings, without secrets.
 * PN_IN_SS_SINGLE: true when u would qualify for the inbound's one slot,
 * with a PN_CORE_PROTO_SHADOWSOCKS account; v2ray cannot AddUser it, so the
 * caller compares with single_email and applies a change by a handover.
 * In the built config, "first qualifying user" means the lowest email in
 * byte order (user clients are emitted in that order too, so the output is
 * deterministic); with no qualifying user the inbound gets a random
 * password nobody holds. */
#define PN_COREACCT_SCRATCH 64
bool pn_coreconf_account(const struct pn_inbound_info *in, const struct pn_user *u,
                         const struct pn_core_version *core, struct pn_core_account *acct,
                         char *scratch, size_t scratchlen);

#endif
