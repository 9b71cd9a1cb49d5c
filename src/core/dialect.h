/* What differs between the two supported cores (spec/cores.md §11): which
 * core a binary is and its version (from the first line of its version
 * output), gRPC service paths, TypedMessage type strings, shadowsocks cipher
 * enums, and version-gated features. Everything else in core/ asks here
 * instead of testing the kind itself. */
#ifndef PN_CORE_DIALECT_H
#define PN_CORE_DIALECT_H

#include <stdbool.h>
#include <stddef.h>

enum pn_core_kind { PN_CORE_UNKNOWN = 0, PN_CORE_XRAY, PN_CORE_V2RAY };

struct pn_core_version {
    enum pn_core_kind kind;
    int major, minor, patch;
    char text[32]; /* "4.34.0" */
};

/* Applies `^(Xray|V2Ray) (\d+)\.(\d+)\.(\d+)` to the first line of text.
 * Returns PN_OK or PN_ERR_INVAL. */
int pn_core_parse_version(const char *text, struct pn_core_version *out);
const char *pn_core_kind_name(enum pn_core_kind kind);

enum pn_core_service {
    PN_SVC_HANDLER, /* app.proxyman.command.HandlerService */
    PN_SVC_STATS,   /* app.stats.command.StatsService */
    PN_SVC_LOGGER,  /* app.log.command.LoggerService */
};

/* "/xray.app.stats.command.StatsService/QueryStats" or the v2ray form, into
 * out. Returns out. */
char *pn_dialect_path(enum pn_core_kind kind, enum pn_core_service svc, const char *method,
                      char *out, size_t outlen);
/* A TypedMessage type string: suffix "proxy.vless.Account" becomes
 * "xray.proxy.vless.Account" or "v2ray.core.proxy.vless.Account". */
char *pn_dialect_type(enum pn_core_kind kind, const char *suffix, char *out, size_t outlen);
/* The core's shadowsocks CipherType for a method name (the -ietf- aliases
 * included, case-insensitive), or -1 when this core has no such cipher. */
int pn_dialect_ss_cipher(enum pn_core_kind kind, const char *method);
/* Feature gates (cores.md §4) on the probed version. */
bool pn_dialect_has_online_stats(const struct pn_core_version *v);   /* GetStatsOnline */
bool pn_dialect_has_online_iplist(const struct pn_core_version *v);  /* GetStatsOnlineIpList */
bool pn_dialect_multi_user_ss(const struct pn_core_version *v);      /* shadowsocks AddUser */
/* Whether the shadowsocks `none`/`plain` cipher still exists (Xray removed it
 * in v26.7.11; v2ray 4.34 has it). */
bool pn_dialect_has_ss_none(const struct pn_core_version *v);

#endif
