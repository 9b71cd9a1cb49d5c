/* The node's configuration (see config.h). One static table, `vars`, holds
 * every environment variable the node reads: its type, default (per profile,
 * and under PROXYNODE_STATE_DIR), range or choices, help, which profiles read
 * it, whether it is secret, and where its parsed value lives in struct
 * pn_config. The same table drives validation (pn_config_load), `proxynode
 * --help` (pn_config_print_help) and `proxynode check` (pn_config_print).
 * This module also owns the choice of profile, the lookup of the core
 * executable and the API key file kept in the state directory. */
#include "app/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/env.h"
#include "base/err.h"

#define MIB (1024LL * 1024)
#define GIB (1024LL * MIB)
#define PN_DEFAULT_XRAY "/usr/local/bin/xray"
/* The fixed body limit of the pasarguard and gozargah profiles (gRPC's). */
#define PN_GRPC_MAX_BODY ((size_t)(64 * MIB))

enum var_type {
    VT_STRING,
    VT_PATH,
    VT_PORT,
    VT_INT,
    VT_BOOL,
    VT_UUID,
    VT_IP,
    VT_ENUM,
    VT_SIZE,
    VT_LIST,
};

static const char *const type_names[] = {
    [VT_STRING] = "string", [VT_PATH] = "path", [VT_PORT] = "port", [VT_INT] = "int",
    [VT_BOOL] = "bool",     [VT_UUID] = "uuid", [VT_IP] = "ip",     [VT_ENUM] = "enum",
    [VT_SIZE] = "size",     [VT_LIST] = "list",
};

#define P_PG (1u << PN_PROFILE_PASARGUARD)
#define P_GZ (1u << PN_PROFILE_GOZARGAH)
#define P_MZ (1u << PN_PROFILE_MARZBAN)
#define P_ALL (P_PG | P_GZ | P_MZ)

/* Never printed: `check` shows ******** instead. */
#define F_SECRET 1u
/* Stored only when the active profile is one of the variable's profiles;
 * otherwise validated and dropped (NODE_HOST and SERVICE_HOST share a field). */
#define F_OWN_PROFILES 2u
/* Accepted and validated, but nothing reads it. */
#define F_UNUSED 4u

/* Offsets are stored plus one so that 0 means "no field". */
#define FIELD(f) (offsetof(struct pn_config, f) + 1)

struct cfg_var {
    const char *name;
    enum var_type type;
    const char *def;            /* default text; NULL: unset */
    const char *def_gozargah;   /* the gozargah profile's default, when it differs */
    const char *def_marzban;    /* the marzban profile's default, when it differs */
    const char *state_def;      /* default relative to PROXYNODE_STATE_DIR, when set */
    long long min, max;         /* port, int, size */
    const char *const *choices; /* enum, NULL-terminated */
    unsigned profiles;
    unsigned flags;
    size_t field;     /* FIELD(x) or 0 */
    size_t set_field; /* FIELD(bool x_set) or 0: true when the variable was given */
    const char *help;
};

static const char *const protocol_choices[] = {"grpc", "rest", NULL};
static const char *const start_wait_choices[] = {"ready", "fixed", NULL};
static const char *const restart_identical_choices[] = {"skip", "restart", NULL};
static const char *const profile_choices[] = {"auto", "pasarguard", "gozargah", "marzban", NULL};

/* The order here is the order of --help and check. Kept out of clang-format,
 * which would put every field of every entry on its own line. */
// clang-format off
static const struct cfg_var vars[] = {
    {.name = "PROXYNODE_PROFILE", .type = VT_ENUM, .def = "auto", .choices = profile_choices,
     .profiles = P_ALL,
     .help = "Which panel this node serves. auto picks: API_KEY set -> pasarguard; else "
             "SSL_CLIENT_CERT_FILE set together with a Marzban-only variable (SERVICE_HOST, "
             "XRAY_API_HOST, XRAY_API_PORT, INBOUNDS) -> marzban; else SSL_CLIENT_CERT_FILE or "
             "MAX_LOG_PER_REQUEST set -> gozargah; else the node refuses to start."},
    {.name = "SERVICE_PORT", .type = VT_PORT, .def = "62050", .min = 1, .max = 65535,
     .profiles = P_ALL, .field = FIELD(service_port),
     .help = "TCP port of the node's one TLS listener."},
    {.name = "NODE_HOST", .type = VT_IP, .def = "0.0.0.0", .profiles = P_PG | P_GZ,
     .flags = F_OWN_PROFILES, .field = FIELD(node_host),
     .help = "Listen address: an IPv4 or IPv6 literal (host names are refused)."},
    {.name = "SERVICE_HOST", .type = VT_IP, .def = "0.0.0.0", .profiles = P_MZ,
     .flags = F_OWN_PROFILES, .field = FIELD(node_host),
     .help = "Listen address in the marzban profile: an IPv4 or IPv6 literal."},
    {.name = "SERVICE_PROTOCOL", .type = VT_ENUM, .def = "grpc", .def_marzban = "rest",
     .choices = protocol_choices, .profiles = P_ALL, .field = FIELD(service_protocol),
     .help = "Accepted for compatibility only: gRPC and REST are always both served on the "
             "port (the marzban profile serves REST and WebSocket)."},
    {.name = "API_KEY", .type = VT_UUID, .profiles = P_PG, .flags = F_SECRET,
     .field = FIELD(api_key), .set_field = FIELD(api_key_set),
     .help = "The key the PasarGuard panel sends, a UUID in any common form. Required in the "
             "pasarguard profile, unless PROXYNODE_STATE_DIR is set: then a key is generated "
             "once into <state>/api_key and printed."},
    {.name = "SSL_CERT_FILE", .type = VT_PATH, .def = "/var/lib/pg-node/certs/ssl_cert.pem",
     .def_gozargah = "/var/lib/gozargah-node/certs/ssl_cert.pem",
     .def_marzban = "/var/lib/marzban-node/ssl_cert.pem", .state_def = "certs/ssl_cert.pem",
     .profiles = P_ALL, .field = FIELD(ssl_cert_file),
     .help = "The node's TLS certificate (PEM)."},
    {.name = "SSL_KEY_FILE", .type = VT_PATH, .def = "/var/lib/pg-node/certs/ssl_key.pem",
     .def_gozargah = "/var/lib/gozargah-node/certs/ssl_key.pem",
     .def_marzban = "/var/lib/marzban-node/ssl_key.pem", .state_def = "certs/ssl_key.pem",
     .profiles = P_ALL, .field = FIELD(ssl_key_file),
     .help = "The private key of SSL_CERT_FILE (PEM)."},
    {.name = "SSL_CLIENT_CERT_FILE", .type = VT_PATH, .profiles = P_GZ | P_MZ,
     .field = FIELD(ssl_client_cert_file),
     .help = "The panel's certificate (PEM), trusted to verify the panel's client certificate "
             "(mutual TLS). Required in the gozargah and marzban profiles."},
    {.name = "PROXYNODE_CERT_NAMES", .type = VT_LIST, .profiles = P_ALL,
     .field = FIELD(cert_names),
     .help = "Extra subjectAltName entries (DNS names or IP addresses) for a generated "
             "certificate, comma-separated."},
    {.name = "XRAY_EXECUTABLE_PATH", .type = VT_PATH, .def = PN_DEFAULT_XRAY, .profiles = P_ALL,
     .field = FIELD(xray_executable_path),
     .help = "The core executable. Unset: " PN_DEFAULT_XRAY ", else xray or v2ray found on "
             "PATH. A set path that is not executable leaves the node without a core; it "
             "still starts and reports an empty core version."},
    {.name = "XRAY_ASSETS_PATH", .type = VT_PATH, .def = "/usr/local/share/xray",
     .profiles = P_ALL, .field = FIELD(xray_assets_path),
     .help = "Directory of geoip.dat and geosite.dat, given to the core as XRAY_LOCATION_ASSET "
             "and V2RAY_LOCATION_ASSET."},
    {.name = "GENERATED_CONFIG_PATH", .type = VT_PATH, .def = "/var/lib/pg-node/generated/",
     .state_def = "generated/", .profiles = P_PG | P_GZ, .field = FIELD(generated_config_path),
     .help = "Directory where the core's config is written when DEBUG is on."},
    {.name = "DEBUG", .type = VT_BOOL, .def = "false", .profiles = P_ALL, .field = FIELD(debug),
     .help = "Verbose logging; also echoes the core's output lines into the node log."},
    {.name = "LOG_BUFFER_SIZE", .type = VT_INT, .def = "10000", .min = 1, .max = 10000000,
     .profiles = P_PG | P_GZ, .field = FIELD(log_buffer_size),
     .help = "Core log lines kept for a new log reader."},
    {.name = "STARTUP_LOG_TAIL_SIZE", .type = VT_INT, .def = "200", .min = 1, .max = 1000000,
     .profiles = P_PG | P_GZ, .field = FIELD(startup_log_tail_size),
     .help = "Core log lines quoted in the error when the core fails to start."},
    {.name = "STATS_UPDATE_INTERVAL_SECONDS", .type = VT_INT, .def = "10", .min = 1,
     .max = 86400, .profiles = P_PG, .flags = F_UNUSED,
     .help = "WireGuard only: validated but unused, WireGuard backends are not supported."},
    {.name = "STATS_CLEANUP_INTERVAL_SECONDS", .type = VT_INT, .def = "300", .min = 1,
     .max = 86400, .profiles = P_PG, .flags = F_UNUSED,
     .help = "WireGuard only: validated but unused, WireGuard backends are not supported."},
    {.name = "MAX_LOG_PER_REQUEST", .type = VT_INT, .def = "1000", .min = 1, .max = 1000000,
     .profiles = P_GZ, .field = FIELD(max_log_per_request),
     .set_field = FIELD(max_log_per_request_set),
     .help = "Legacy Gozargah: most log lines per long-poll request. When set, log requests "
             "are answered in the long-poll form."},
    {.name = "XRAY_API_HOST", .type = VT_IP, .def = "0.0.0.0", .profiles = P_MZ,
     .field = FIELD(xray_api_host),
     .help = "Listen address of the core's API inbound, which the Marzban panel calls "
             "directly."},
    {.name = "XRAY_API_PORT", .type = VT_PORT, .def = "62051", .min = 1, .max = 65535,
     .profiles = P_MZ, .field = FIELD(xray_api_port),
     .help = "Port of that API inbound; must equal the node's API port in the panel."},
    {.name = "INBOUNDS", .type = VT_LIST, .profiles = P_MZ, .field = FIELD(inbounds),
     .help = "Inbound tags to keep from the panel's config, comma-separated; empty keeps all."},
    {.name = "PROXYNODE_STATE_DIR", .type = VT_PATH, .profiles = P_ALL,
     .field = FIELD(state_dir),
     .help = "Directory for what the node creates: certs/ (certificate and key), api_key "
             "(pasarguard) and generated/. Changes the defaults of SSL_CERT_FILE, SSL_KEY_FILE "
             "and GENERATED_CONFIG_PATH."},
    {.name = "PROXYNODE_KEEPALIVE_STOPS_CORE", .type = VT_BOOL, .def = "false",
     .profiles = P_PG | P_GZ, .field = FIELD(keepalive_stops_core),
     .help = "When the panel's keep-alive expires, stop the core as the reference node does. "
             "Default: the session is only marked idle."},
    {.name = "PROXYNODE_STATS_BANK_INTERVAL", .type = VT_INT, .def = "10", .min = 1, .max = 3600,
     .profiles = P_PG | P_GZ, .field = FIELD(stats_bank_interval),
     .help = "Seconds between reads of the core's counters into the node's ledger; a core crash "
             "loses at most this long of traffic counts."},
    {.name = "PROXYNODE_START_TIMEOUT", .type = VT_INT, .def = "60", .min = 1, .max = 3600,
     .profiles = P_ALL, .field = FIELD(start_timeout),
     .help = "Seconds a launched core has to become ready."},
    {.name = "PROXYNODE_MAX_BODY", .type = VT_SIZE, .def = "268435456", .min = 1024,
     .max = 4 * GIB, .profiles = P_MZ, .flags = F_OWN_PROFILES, .field = FIELD(max_body),
     .help = "Largest request body in the marzban profile, in bytes (a K, M or G suffix means "
             "KiB, MiB, GiB). The pasarguard and gozargah profiles use 64 MiB."},
    {.name = "PROXYNODE_HTTP_IDLE_TIMEOUT", .type = VT_INT, .def = "60", .min = 1, .max = 3600,
     .profiles = P_ALL, .field = FIELD(http_idle_timeout),
     .help = "Seconds an HTTP connection with no open request or stream stays open (the "
             "Marzban reference node used 5, shorter than the panel's 10 s poll), and how "
             "long a request body may pause before its connection (HTTP/1.1) or stream "
             "(HTTP/2) is closed."},
    {.name = "PROXYNODE_START_WAIT", .type = VT_ENUM, .def = "ready",
     .choices = start_wait_choices, .profiles = P_MZ, .field = FIELD(start_wait),
     .help = "When /start and /restart answer: as soon as the core is ready (ready), or after "
             "a fixed 3 s like the reference node (fixed)."},
    {.name = "PROXYNODE_CONNECT_STOPS_CORE", .type = VT_BOOL, .def = "false", .profiles = P_MZ,
     .field = FIELD(connect_stops_core),
     .help = "/connect and /disconnect stop a running core as the reference node does. "
             "Default: the core keeps serving users across panel reconnects."},
    {.name = "PROXYNODE_RESTART_IDENTICAL", .type = VT_ENUM, .def = "skip",
     .choices = restart_identical_choices, .profiles = P_MZ, .field = FIELD(restart_identical),
     .help = "A /restart whose rewritten config equals the running one: answered without "
             "restarting (skip), or restarted like the reference node (restart)."},
    {.name = "PROXYNODE_SUPERVISE", .type = VT_BOOL, .def = "true", .profiles = P_MZ,
     .field = FIELD(supervise),
     .help = "Restart a crashed core with the last config (and invalidate the panel session so "
             "the panel pushes a fresh one). false: leave it stopped like the reference node."},
};
// clang-format on

#define NVARS (sizeof vars / sizeof vars[0])

/* The default of XRAY_EXECUTABLE_PATH as the core lookup tries it; a
 * variable so that tests can point it elsewhere. */
static const char *core_default_path = PN_DEFAULT_XRAY;

const char *pn_profile_name(enum pn_profile p)
{
    switch (p) {
    case PN_PROFILE_AUTO:
        return "auto";
    case PN_PROFILE_PASARGUARD:
        return "pasarguard";
    case PN_PROFILE_GOZARGAH:
        return "gozargah";
    case PN_PROFILE_MARZBAN:
        return "marzban";
    }
    return "unknown";
}

static const struct cfg_var *find_var(const char *name)
{
    for (size_t i = 0; i < NVARS; i++)
        if (strcmp(vars[i].name, name) == 0)
            return &vars[i];
    return NULL;
}

static bool in_profile(const struct cfg_var *v, enum pn_profile p)
{
    return (v->profiles & (1u << p)) != 0;
}

/* A value as it may appear in an error: at most 64 bytes, control bytes
 * replaced, so a hostile or binary value cannot garble the message. */
static const char *shown(const char *s, char *buf, size_t len)
{
    size_t n = 0, max = len > 4 ? len - 4 : 0;
    for (; *s && n < max && n < 64; s++)
        buf[n++] = (unsigned char)*s < 0x20 || *s == 0x7f ? '?' : *s;
    if (*s && len > 4) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

/* The effective default of v for a profile and state dir, newly allocated;
 * NULL when the variable has none. */
static char *default_text(const struct cfg_var *v, enum pn_profile p, const char *state)
{
    if (state && v->state_def) {
        size_t n = strlen(state);
        return pn_asprintf("%s%s%s", state, n && state[n - 1] == '/' ? "" : "/", v->state_def);
    }
    if (p == PN_PROFILE_GOZARGAH && v->def_gozargah)
        return pn_strdup(v->def_gozargah);
    if (p == PN_PROFILE_MARZBAN && v->def_marzban)
        return pn_strdup(v->def_marzban);
    return v->def ? pn_strdup(v->def) : NULL;
}

union var_value {
    char *s;
    long long i;
    bool b;
    struct pn_uuid u;
};

/* Whole-string decimal, an optional leading '-'. Returns false on anything
 * else; *overflow says the digits were fine but too many. */
static bool parse_decimal(const char *s, long long *out, const char **rest, bool *overflow)
{
    bool neg = *s == '-';
    const char *p = s + neg;
    unsigned long long v = 0;
    *overflow = false;
    if (*p < '0' || *p > '9')
        return false;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > (unsigned long long)LLONG_MAX / 10) {
            *overflow = true;
            v = (unsigned long long)LLONG_MAX;
        } else {
            v = v * 10 + (unsigned long long)(*p - '0');
            if (v > (unsigned long long)LLONG_MAX) {
                *overflow = true;
                v = (unsigned long long)LLONG_MAX;
            }
        }
    }
    *rest = p;
    *out = neg ? -(long long)v : (long long)v;
    return true;
}

static int parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"true", "1", "yes", "on"};
    static const char *const no[] = {"false", "0", "no", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return PN_OK;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return PN_OK;
        }
    }
    return PN_ERR_INVAL;
}

/* Parses text as v's type into *out (strings newly allocated). Returns PN_OK
 * or PN_ERR_INVAL with `<VAR>: <problem>` in err. */
static int parse_value(const struct cfg_var *v, const char *text, union var_value *out, char *err,
                       size_t errlen)
{
    char sb[80];
    memset(out, 0, sizeof *out);
    switch (v->type) {
    case VT_STRING:
    case VT_LIST:
        out->s = pn_strdup(text);
        return PN_OK;
    case VT_PATH:
        if (strlen(text) >= PATH_MAX)
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s: the path is longer than %d bytes",
                             v->name, PATH_MAX - 1);
        out->s = pn_strdup(text);
        return PN_OK;
    case VT_IP: {
        unsigned char addr[16];
        if (inet_pton(AF_INET, text, addr) != 1 && inet_pton(AF_INET6, text, addr) != 1)
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s: \"%s\" is not an IPv4 or IPv6 address",
                             v->name, shown(text, sb, sizeof sb));
        out->s = pn_strdup(text);
        return PN_OK;
    }
    case VT_ENUM: {
        char list[128] = "";
        for (const char *const *c = v->choices; *c; c++) {
            if (strcasecmp(text, *c) == 0) {
                out->s = pn_strdup(*c);
                return PN_OK;
            }
            if (c != v->choices)
                strncat(list, ", ", sizeof list - strlen(list) - 1);
            strncat(list, *c, sizeof list - strlen(list) - 1);
        }
        return pn_seterr(err, errlen, PN_ERR_INVAL, "%s: \"%s\" is not one of %s", v->name,
                         shown(text, sb, sizeof sb), list);
    }
    case VT_BOOL:
        if (parse_bool(text, &out->b) < 0)
            return pn_seterr(err, errlen, PN_ERR_INVAL,
                             "%s: \"%s\" is not a boolean (use true/false, 1/0, yes/no, on/off)",
                             v->name, shown(text, sb, sizeof sb));
        return PN_OK;
    case VT_PORT:
    case VT_INT:
    case VT_SIZE: {
        const char *rest = NULL;
        bool overflow = false;
        long long n = 0;
        bool ok = parse_decimal(text, &n, &rest, &overflow);
        if (ok && v->type == VT_SIZE && *rest) {
            long long mult = 0;
            switch (*rest) {
            case 'k':
            case 'K':
                mult = 1024;
                break;
            case 'm':
            case 'M':
                mult = MIB;
                break;
            case 'g':
            case 'G':
                mult = GIB;
                break;
            }
            if (mult && rest[1] == '\0') {
                rest++;
                if (n > LLONG_MAX / mult || n < LLONG_MIN / mult)
                    overflow = true;
                else if (!overflow)
                    n *= mult;
            }
        }
        if (!ok || *rest != '\0')
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s: \"%s\" is not a decimal %s", v->name,
                             shown(text, sb, sizeof sb),
                             v->type == VT_SIZE ? "size (bytes, or with a K, M or G suffix)"
                                                : "integer");
        if (overflow || n < v->min || n > v->max)
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s: \"%s\" is out of range %lld..%lld",
                             v->name, shown(text, sb, sizeof sb), v->min, v->max);
        out->i = n;
        return PN_OK;
    }
    case VT_UUID:
        if (pn_uuid_parse(text, strlen(text), &out->u) < 0)
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s: \"%s\" is not a valid UUID", v->name,
                             shown(text, sb, sizeof sb));
        if (pn_uuid_is_nil(&out->u))
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s: the all-zero UUID is not allowed",
                             v->name);
        return PN_OK;
    }
    return pn_seterr(err, errlen, PN_ERR_INVAL, "%s: unknown type", v->name);
}

static bool is_string_type(enum var_type t)
{
    return t == VT_STRING || t == VT_PATH || t == VT_IP || t == VT_ENUM || t == VT_LIST;
}

/* Moves a parsed value into its field of cfg (strings change hands). */
static void store_value(const struct cfg_var *v, union var_value *val, struct pn_config *cfg)
{
    char *f = (char *)cfg + (v->field - 1);
    switch (v->type) {
    case VT_PORT:
        *(uint16_t *)(void *)f = (uint16_t)val->i;
        break;
    case VT_INT:
        *(long *)(void *)f = (long)val->i;
        break;
    case VT_SIZE:
        *(size_t *)(void *)f = (size_t)val->i;
        break;
    case VT_BOOL:
        *(bool *)(void *)f = val->b;
        break;
    case VT_UUID:
        *(struct pn_uuid *)(void *)f = val->u;
        break;
    default:
        free(*(char **)(void *)f);
        *(char **)(void *)f = val->s;
        val->s = NULL;
        break;
    }
}

/* Applies DESIGN.md "Decisions", Profiles: an explicit PROXYNODE_PROFILE
 * wins, `auto` goes by which variables are set. */
static int resolve_profile(struct pn_config *cfg, char *err, size_t errlen)
{
    const struct cfg_var *pv = find_var("PROXYNODE_PROFILE");
    const char *raw = pn_env_get(pv->name);
    union var_value val;
    int rv = parse_value(pv, raw ? raw : pv->def, &val, err, errlen);
    if (rv < 0)
        return rv;
    bool is_auto = strcmp(val.s, "auto") == 0;
    if (!is_auto) {
        for (enum pn_profile p = PN_PROFILE_PASARGUARD; p <= PN_PROFILE_MARZBAN; p++)
            if (strcmp(val.s, pn_profile_name(p)) == 0)
                cfg->profile = p;
        snprintf(cfg->profile_reason, sizeof cfg->profile_reason, "PROXYNODE_PROFILE=%s", val.s);
        free(val.s);
        return PN_OK;
    }
    free(val.s);

    if (pn_env_get("API_KEY")) {
        cfg->profile = PN_PROFILE_PASARGUARD;
        snprintf(cfg->profile_reason, sizeof cfg->profile_reason,
                 "PROXYNODE_PROFILE=auto and API_KEY is set");
        return PN_OK;
    }
    bool client_cert = pn_env_get("SSL_CLIENT_CERT_FILE") != NULL;
    static const char *const marzban_only[] = {"SERVICE_HOST", "XRAY_API_HOST", "XRAY_API_PORT",
                                               "INBOUNDS"};
    char present[80] = "";
    for (size_t i = 0; i < sizeof marzban_only / sizeof marzban_only[0]; i++) {
        if (!pn_env_get(marzban_only[i]))
            continue;
        if (present[0])
            strncat(present, ", ", sizeof present - strlen(present) - 1);
        strncat(present, marzban_only[i], sizeof present - strlen(present) - 1);
    }
    if (client_cert && present[0]) {
        cfg->profile = PN_PROFILE_MARZBAN;
        snprintf(cfg->profile_reason, sizeof cfg->profile_reason,
                 "PROXYNODE_PROFILE=auto, SSL_CLIENT_CERT_FILE is set and Marzban-only %s",
                 present);
        return PN_OK;
    }
    if (client_cert || pn_env_get("MAX_LOG_PER_REQUEST")) {
        cfg->profile = PN_PROFILE_GOZARGAH;
        snprintf(cfg->profile_reason, sizeof cfg->profile_reason,
                 "PROXYNODE_PROFILE=auto and %s is set",
                 client_cert ? "SSL_CLIENT_CERT_FILE" : "MAX_LOG_PER_REQUEST");
        return PN_OK;
    }
    return pn_seterr(err, errlen, PN_ERR_INVAL,
                     "PROXYNODE_PROFILE: cannot choose a profile: set API_KEY for a PasarGuard "
                     "panel (pasarguard); SSL_CLIENT_CERT_FILE and one of SERVICE_HOST, "
                     "XRAY_API_HOST, XRAY_API_PORT, INBOUNDS for a Marzban panel (marzban); "
                     "SSL_CLIENT_CERT_FILE or MAX_LOG_PER_REQUEST for a legacy Gozargah panel "
                     "(gozargah); or set PROXYNODE_PROFILE to pasarguard, gozargah or marzban");
}

/* An executable regular file, as exec would run it. */
static bool is_exec_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* The first executable regular file called name in $PATH (empty entries
 * skipped: they would mean the working directory). Newly allocated or NULL. */
static char *search_path(const char *name)
{
    const char *path = getenv("PATH");
    if (!path)
        path = "/usr/local/bin:/usr/bin:/bin";
    while (*path) {
        const char *colon = strchr(path, ':');
        size_t n = colon ? (size_t)(colon - path) : strlen(path);
        if (n > 0) {
            char *cand = pn_asprintf("%.*s/%s", (int)n, path, name);
            if (is_exec_file(cand))
                return cand;
            free(cand);
        }
        path += n;
        if (*path == ':')
            path++;
    }
    return NULL;
}

/* Chooses cfg->core_path. A missing core is not an error: the node still
 * serves and reports an empty core version. */
static void resolve_core(struct pn_config *cfg)
{
    const char *set = pn_env_get("XRAY_EXECUTABLE_PATH");
    char *reason = cfg->core_path_reason;
    size_t rlen = sizeof cfg->core_path_reason;
    if (set) {
        if (!strchr(set, '/')) {
            cfg->core_path = search_path(set);
            if (cfg->core_path)
                snprintf(reason, rlen, "XRAY_EXECUTABLE_PATH=%s, found on PATH", set);
            else
                snprintf(reason, rlen, "XRAY_EXECUTABLE_PATH=%s is not on PATH; no core", set);
            return;
        }
        if (is_exec_file(set)) {
            cfg->core_path = pn_strdup(set);
            snprintf(reason, rlen, "XRAY_EXECUTABLE_PATH is set");
        } else {
            snprintf(reason, rlen, "XRAY_EXECUTABLE_PATH=%s is not an executable file; no core",
                     set);
        }
        return;
    }
    if (is_exec_file(core_default_path)) {
        cfg->core_path = pn_strdup(core_default_path);
        snprintf(reason, rlen, "the default XRAY_EXECUTABLE_PATH");
        return;
    }
    static const char *const names[] = {"xray", "v2ray"};
    for (size_t i = 0; i < 2; i++) {
        cfg->core_path = search_path(names[i]);
        if (cfg->core_path) {
            snprintf(reason, rlen, "%s is missing; %s found on PATH", core_default_path, names[i]);
            return;
        }
    }
    snprintf(reason, rlen, "no core found: install Xray at %s or Debian's v2ray",
             core_default_path);
}

int pn_config_load(struct pn_config *cfg, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof *cfg);
    int rv = resolve_profile(cfg, err, errlen);
    if (rv < 0)
        goto fail;

    const char *state = pn_env_get("PROXYNODE_STATE_DIR");
    for (size_t i = 0; i < NVARS; i++) {
        const struct cfg_var *v = &vars[i];
        const char *raw = pn_env_get(v->name);
        char *def = raw ? NULL : default_text(v, cfg->profile, state);
        const char *text = raw ? raw : def;
        if (!text)
            continue;
        union var_value val;
        rv = parse_value(v, text, &val, err, errlen);
        free(def);
        if (rv < 0)
            goto fail;
        bool keep = v->field && (!(v->flags & F_OWN_PROFILES) || in_profile(v, cfg->profile));
        if (keep) {
            store_value(v, &val, cfg);
            if (v->set_field && raw)
                *((bool *)(void *)((char *)cfg + (v->set_field - 1))) = true;
        } else if (is_string_type(v->type)) {
            free(val.s);
        }
    }

    switch (cfg->profile) {
    case PN_PROFILE_PASARGUARD:
        if (!cfg->api_key_set) {
            if (!cfg->state_dir) {
                rv = pn_seterr(err, errlen, PN_ERR_INVAL,
                               "API_KEY: required in the pasarguard profile (set it, or set "
                               "PROXYNODE_STATE_DIR to generate one)");
                goto fail;
            }
            size_t n = strlen(cfg->state_dir);
            cfg->api_key_file =
                pn_asprintf("%s%sapi_key", cfg->state_dir, cfg->state_dir[n - 1] == '/' ? "" : "/");
        }
        cfg->max_body = PN_GRPC_MAX_BODY;
        break;
    case PN_PROFILE_GOZARGAH:
    case PN_PROFILE_MARZBAN:
        if (!cfg->ssl_client_cert_file) {
            /* The Marzban reference node's own words, which operators search for. */
            rv = pn_seterr(err, errlen, PN_ERR_INVAL,
                           "SSL_CLIENT_CERT_FILE is required for rest service. (the %s profile "
                           "verifies the panel's client certificate against it)",
                           pn_profile_name(cfg->profile));
            goto fail;
        }
        if (cfg->profile == PN_PROFILE_GOZARGAH)
            cfg->max_body = PN_GRPC_MAX_BODY;
        break;
    case PN_PROFILE_AUTO:
        break;
    }

    resolve_core(cfg);
    return PN_OK;

fail:
    pn_config_free(cfg);
    return rv;
}

void pn_config_free(struct pn_config *cfg)
{
    char **strs[] = {
        &cfg->node_host,
        &cfg->service_protocol,
        &cfg->api_key_file,
        &cfg->ssl_cert_file,
        &cfg->ssl_key_file,
        &cfg->ssl_client_cert_file,
        &cfg->cert_names,
        &cfg->xray_executable_path,
        &cfg->core_path,
        &cfg->xray_assets_path,
        &cfg->generated_config_path,
        &cfg->xray_api_host,
        &cfg->inbounds,
        &cfg->state_dir,
        &cfg->start_wait,
        &cfg->restart_identical,
    };
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
        free(*strs[i]);
    memset(cfg, 0, sizeof *cfg);
}

/* Reads an existing key file. PN_ERR_NOTFOUND when it does not exist. */
static int read_key_file(const char *path, struct pn_uuid *key, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return pn_seterr(err, errlen, e == ENOENT ? PN_ERR_NOTFOUND : PN_ERR_IO, "%s: %s", path,
                         strerror(e));
    }
    char buf[128];
    size_t n = 0;
    int rv = PN_OK;
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", path, strerror(errno));
            goto out;
        }
        if (r == 0 || (n += (size_t)r) == sizeof buf - 1)
            break;
    }
    buf[n] = '\0';
    char *s = buf, *e = buf + n;
    while (s < e && (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r'))
        s++;
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r'))
        e--;
    if (n == sizeof buf - 1 || pn_uuid_parse(s, (size_t)(e - s), key) < 0 || pn_uuid_is_nil(key)) {
        rv = pn_seterr(err, errlen, PN_ERR_INVAL,
                       "%s: does not hold a valid API key (a non-zero UUID); fix it, or delete it "
                       "to generate a new key",
                       path);
    }
out:
    close(fd);
    return rv;
}

/* mkdir -p with mode 0700 for the parts it creates. */
static int make_dirs(const char *dir, char *err, size_t errlen)
{
    char *p = pn_strdup(dir);
    int rv = PN_OK;
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != '\0')
            continue;
        char c = *s;
        *s = '\0';
        if (mkdir(p, 0700) < 0 && errno != EEXIST) {
            rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", p, strerror(errno));
            break;
        }
        *s = c;
        if (c == '\0')
            break;
    }
    free(p);
    return rv;
}

/* Writes a new key file atomically: a 0600 temporary file, fsync, rename,
 * then fsync of the directory, so a crash leaves either no file or a whole
 * one. */
static int write_key_file(const char *dir, const char *path, const struct pn_uuid *key, char *err,
                          size_t errlen)
{
    int rv = make_dirs(dir, err, errlen);
    if (rv < 0)
        return rv;
    char text[PN_UUID_STRLEN + 2];
    pn_uuid_format(key, text);
    strcat(text, "\n");
    char *tmp = pn_asprintf("%s.tmp.%ld", path, (long)getpid());
    unlink(tmp);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", tmp, strerror(errno));
        goto out_tmp;
    }
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", tmp, strerror(errno));
            goto out_fd;
        }
        off += (size_t)w;
    }
    if (fsync(fd) < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: fsync: %s", tmp, strerror(errno));
        goto out_fd;
    }
    if (close(fd) < 0) {
        fd = -1;
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: close: %s", tmp, strerror(errno));
        goto out_unlink;
    }
    fd = -1;
    if (rename(tmp, path) < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: rename: %s", path, strerror(errno));
        goto out_unlink;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd); /* best effort: the file itself is already durable */
        close(dfd);
    }
    free(tmp);
    return PN_OK;

out_fd:
    close(fd);
out_unlink:
    unlink(tmp);
out_tmp:
    free(tmp);
    return rv;
}

int pn_config_ensure_api_key(struct pn_config *cfg, FILE *out, char *err, size_t errlen)
{
    if (cfg->api_key_set || cfg->profile != PN_PROFILE_PASARGUARD)
        return PN_OK;
    if (!cfg->api_key_file || !cfg->state_dir)
        return pn_seterr(err, errlen, PN_ERR_INVAL,
                         "API_KEY: required in the pasarguard profile (set it, or set "
                         "PROXYNODE_STATE_DIR to generate one)");
    struct pn_uuid key;
    int rv = read_key_file(cfg->api_key_file, &key, err, errlen);
    if (rv == PN_ERR_NOTFOUND) {
        rv = pn_uuid_random(&key);
        if (rv < 0)
            return pn_seterr(err, errlen, rv, "API_KEY: cannot generate a random key: %s",
                             strerror(errno));
        rv = write_key_file(cfg->state_dir, cfg->api_key_file, &key, err, errlen);
        if (rv < 0)
            return rv;
        char text[PN_UUID_STRLEN + 1];
        pn_uuid_format(&key, text);
        fprintf(out, "Generated API key (shown once, stored in %s): %s\n", cfg->api_key_file, text);
        fprintf(out, "Paste this key into the panel's settings for this node (API key); the "
                     "node reads it from that file from now on.\n");
        fflush(out);
    } else if (rv < 0) {
        return rv;
    }
    cfg->api_key = key;
    cfg->api_key_set = true;
    return PN_OK;
}

/* ---- --help and check ---------------------------------------------------- */

static void profiles_text(unsigned mask, char *buf, size_t len)
{
    if (mask == P_ALL) {
        snprintf(buf, len, "all");
        return;
    }
    buf[0] = '\0';
    for (enum pn_profile p = PN_PROFILE_PASARGUARD; p <= PN_PROFILE_MARZBAN; p++) {
        if (!(mask & (1u << p)))
            continue;
        if (buf[0])
            strncat(buf, ",", len - strlen(buf) - 1);
        strncat(buf, pn_profile_name(p), len - strlen(buf) - 1);
    }
}

static void range_text(const struct cfg_var *v, char *buf, size_t len)
{
    switch (v->type) {
    case VT_PORT:
    case VT_INT:
    case VT_SIZE:
        snprintf(buf, len, "%lld..%lld", v->min, v->max);
        break;
    case VT_BOOL:
        snprintf(buf, len, "true|false");
        break;
    case VT_ENUM:
        buf[0] = '\0';
        for (const char *const *c = v->choices; *c; c++) {
            if (c != v->choices)
                strncat(buf, "|", len - strlen(buf) - 1);
            strncat(buf, *c, len - strlen(buf) - 1);
        }
        break;
    default:
        snprintf(buf, len, "-");
        break;
    }
}

/* Prints text word-wrapped to 100 columns with the given indent. */
static void print_wrapped(FILE *out, int indent, const char *text)
{
    const int width = 100;
    int col = 0;
    const char *p = text;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        int wl = (int)strcspn(p, " ");
        if (col > indent && col + 1 + wl > width) {
            fputc('\n', out);
            col = 0;
        }
        if (col == 0) {
            fprintf(out, "%*s", indent, "");
            col = indent;
        } else {
            fputc(' ', out);
            col++;
        }
        fprintf(out, "%.*s", wl, p);
        col += wl;
        p += wl;
    }
    if (col)
        fputc('\n', out);
}

void pn_config_print_help(FILE *out)
{
    fprintf(out, "Usage: proxynode [run|check|version] [--help]\n\n"
                 "  run      start the node (the default)\n"
                 "  check    validate the configuration, print it and exit\n"
                 "  version  print the version and exit\n"
                 "  --help   print this help and exit\n\n");
    print_wrapped(out, 0,
                  "Configuration comes from environment variables. A .env file in the working "
                  "directory is read first; variables already set in the environment win over "
                  "it. An empty value counts as unset. Invalid values are refused, never "
                  "corrected.");
    fprintf(out, "\nVariables:\n");

    /* Name, type and default in aligned columns; under each, the help, the
     * accepted values and the profiles that read the variable. */
    int wn = 4, wt = 4;
    for (size_t i = 0; i < NVARS; i++) {
        int n = (int)strlen(vars[i].name), t = (int)strlen(type_names[vars[i].type]);
        wn = n > wn ? n : wn;
        wt = t > wt ? t : wt;
    }
    fprintf(out, "  %-*s  %-*s  %s\n", wn, "NAME", wt, "TYPE", "DEFAULT");
    char rb[96], pb[64];
    for (size_t i = 0; i < NVARS; i++) {
        const struct cfg_var *v = &vars[i];
        range_text(v, rb, sizeof rb);
        profiles_text(v->profiles, pb, sizeof pb);
        fprintf(out, "\n  %-*s  %-*s  %s\n", wn, v->name, wt, type_names[v->type],
                v->def ? v->def : "(unset)");
        print_wrapped(out, 6, v->help);
        char *extra = pn_asprintf(
            "%s%s%sProfiles: %s.%s%s%s%s%s%s%s%s%s%s", rb[0] != '-' ? "Values: " : "",
            rb[0] != '-' ? rb : "", rb[0] != '-' ? ". " : "", pb,
            v->def_gozargah ? " Default in gozargah: " : "", v->def_gozargah ? v->def_gozargah : "",
            v->def_gozargah ? "." : "", v->def_marzban ? " Default in marzban: " : "",
            v->def_marzban ? v->def_marzban : "", v->def_marzban ? "." : "",
            v->state_def ? " With PROXYNODE_STATE_DIR: <state>/" : "",
            v->state_def ? v->state_def : "", v->state_def ? "." : "",
            (v->flags & F_SECRET) ? " Secret: never printed." : "");
        print_wrapped(out, 6, extra);
        free(extra);
    }
}

/* The effective value of v as check shows it, newly allocated; NULL when
 * unset. */
static char *effective_text(const struct cfg_var *v, const struct pn_config *cfg)
{
    bool stored = v->field && (!(v->flags & F_OWN_PROFILES) || in_profile(v, cfg->profile));
    if (v->flags & F_SECRET) {
        bool set =
            v->set_field && *(const bool *)(const void *)((const char *)cfg + (v->set_field - 1));
        return set ? pn_strdup("********") : NULL;
    }
    if (!stored) {
        const char *raw = pn_env_get(v->name);
        if (raw)
            return pn_strdup(raw);
        return default_text(v, cfg->profile, cfg->state_dir);
    }
    const char *f = (const char *)cfg + (v->field - 1);
    switch (v->type) {
    case VT_PORT:
        return pn_asprintf("%u", (unsigned)*(const uint16_t *)(const void *)f);
    case VT_INT:
        return pn_asprintf("%ld", *(const long *)(const void *)f);
    case VT_SIZE:
        return pn_asprintf("%zu", *(const size_t *)(const void *)f);
    case VT_BOOL:
        return pn_strdup(*(const bool *)(const void *)f ? "true" : "false");
    case VT_UUID:
        return NULL; /* only API_KEY, which is secret */
    default: {
        const char *s = *(char *const *)(const void *)f;
        return s ? pn_strdup(s) : NULL;
    }
    }
}

void pn_config_print(const struct pn_config *cfg, FILE *out)
{
    fprintf(out, "profile: %s (%s)\n", pn_profile_name(cfg->profile), cfg->profile_reason);
    for (size_t i = 0; i < NVARS; i++) {
        const struct cfg_var *v = &vars[i];
        char *val = effective_text(v, cfg);
        bool given = pn_env_get(v->name) != NULL;
        const char *note = "";
        char *extra = NULL;
        if ((v->flags & F_SECRET) && !given && val && cfg->api_key_file)
            note = extra = pn_asprintf(" (from %s)", cfg->api_key_file);
        else if ((v->flags & F_SECRET) && !val && cfg->api_key_file)
            note = extra =
                pn_asprintf(" (unset; read from or generated into %s)", cfg->api_key_file);
        else if (!val)
            note = " (unset)";
        else if (!given)
            note = " (default)";
        fprintf(out, "%s=%s%s", v->name, val ? val : "", note);
        if (v->flags & F_UNUSED)
            fprintf(out, " [unused: WireGuard is not supported]");
        else if (!in_profile(v, cfg->profile))
            fprintf(out, " [not used by the %s profile]", pn_profile_name(cfg->profile));
        fputc('\n', out);
        free(val);
        free(extra);
    }
    fprintf(out, "max body: %zu bytes\n", cfg->max_body);
    if (cfg->core_path)
        fprintf(out, "core: %s (%s)\n", cfg->core_path, cfg->core_path_reason);
    else
        fprintf(out, "core: none (%s)\n", cfg->core_path_reason);
}
