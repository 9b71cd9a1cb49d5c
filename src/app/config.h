/* The node's configuration: one typed table (environment variable, type,
 * default, range, help, secret) drives parsing, validation, `proxynode
 * --help` and `proxynode check`. Values come from the environment, after a
 * `.env` in the working directory was loaded (base/env.h). Invalid values are
 * refused with the variable named, never coerced. The profile
 * (pasarguard | gozargah | marzban) is chosen here by the rules of
 * DESIGN.md "Decisions". */
#ifndef PN_APP_CONFIG_H
#define PN_APP_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "base/uuid.h"

enum pn_profile {
    PN_PROFILE_AUTO = 0, /* only before resolution */
    PN_PROFILE_PASARGUARD,
    PN_PROFILE_GOZARGAH,
    PN_PROFILE_MARZBAN,
};

struct pn_config {
    /* profile */
    enum pn_profile profile;
    char profile_reason[200]; /* e.g. "PROXYNODE_PROFILE=auto and API_KEY is set" */

    /* listener */
    char *node_host;          /* NODE_HOST (PasarGuard) / SERVICE_HOST (Marzban): IP literal */
    uint16_t service_port;    /* SERVICE_PORT, default 62050 */
    char *service_protocol;   /* SERVICE_PROTOCOL: "grpc" | "rest" (both are always served) */

    /* auth */
    struct pn_uuid api_key;   /* API_KEY parsed */
    bool api_key_set;
    char *api_key_file;       /* <state>/api_key when the key comes from the state dir */

    /* TLS */
    char *ssl_cert_file, *ssl_key_file;
    char *ssl_client_cert_file; /* SSL_CLIENT_CERT_FILE (gozargah, marzban) */
    char *cert_names;           /* PROXYNODE_CERT_NAMES: extra SAN entries, comma-separated */

    /* core */
    char *xray_executable_path; /* as configured (or the default) */
    char *core_path;            /* resolved executable, NULL when none was found */
    char core_path_reason[200]; /* how core_path was chosen, for `check` */
    char *xray_assets_path;
    char *generated_config_path;

    /* logging and buffers */
    bool debug;
    long log_buffer_size;       /* LOG_BUFFER_SIZE >= 1 */
    long startup_log_tail_size; /* STARTUP_LOG_TAIL_SIZE >= 1 */

    /* other profiles' variables, validated and kept for their issues */
    long max_log_per_request;   /* MAX_LOG_PER_REQUEST (gozargah) */
    bool max_log_per_request_set;
    char *xray_api_host;        /* XRAY_API_HOST (marzban) */
    uint16_t xray_api_port;     /* XRAY_API_PORT (marzban) */
    char *inbounds;             /* INBOUNDS (marzban), comma-separated tags */

    /* proxynode's own */
    char *state_dir;            /* PROXYNODE_STATE_DIR: where make run keeps cert and key */
    bool keepalive_stops_core;  /* PROXYNODE_KEEPALIVE_STOPS_CORE */
    long stats_bank_interval;   /* PROXYNODE_STATS_BANK_INTERVAL seconds */
    long start_timeout;         /* PROXYNODE_START_TIMEOUT seconds */
    size_t max_body;            /* 64 MiB (pasarguard, gozargah); PROXYNODE_MAX_BODY (marzban) */
    long http_idle_timeout;     /* PROXYNODE_HTTP_IDLE_TIMEOUT seconds (60) */
    char *start_wait;           /* PROXYNODE_START_WAIT: "ready" | "fixed" (marzban) */
    bool connect_stops_core;    /* PROXYNODE_CONNECT_STOPS_CORE (marzban) */
    char *restart_identical;    /* PROXYNODE_RESTART_IDENTICAL: "skip" | "restart" (marzban) */
    bool supervise;             /* PROXYNODE_SUPERVISE (marzban; default true) */
};

/* Reads and validates every variable from the environment into cfg (which
 * it initialises), and resolves the profile and the core path. Returns
 * PN_OK, or PN_ERR_INVAL with `<VAR>: <problem>` in err (cfg is then freed).
 * Does not create files. */
int pn_config_load(struct pn_config *cfg, char *err, size_t errlen);

/* pasarguard profile with no API_KEY but a state dir: reads <state>/api_key,
 * or creates it (random UUID, mode 0600, directory 0700) and prints the new
 * key once to out. A no-op when API_KEY is set. Returns PN_OK, PN_ERR_INVAL
 * (no key and no state dir, or a bad key file) or PN_ERR_IO. */
int pn_config_ensure_api_key(struct pn_config *cfg, FILE *out, char *err, size_t errlen);

void pn_config_free(struct pn_config *cfg);

/* `proxynode --help`: every variable with type, default, range and help. */
void pn_config_print_help(FILE *out);
/* `proxynode check`: the profile and why, then each effective value, with
 * secrets masked, and which core will run. */
void pn_config_print(const struct pn_config *cfg, FILE *out);

const char *pn_profile_name(enum pn_profile p);

#endif
