/* The core config builder (see coreconf.h): panel config JSON + users +
 * internal ports → the JSON the core runs, following spec/pasarguard.md §9
 * and §10 with proxynode's §17 fixes (empty secrets and unknown shadowsocks
 * methods are skipped and logged, never turned into open accounts) and the
 * v2ray 4.34 differences of spec/cores.md §7. It owns nothing beyond one
 * call: the parsed tree, the generated text and the inbound descriptions it
 * returns. The rule deciding whether a user gets an account in an inbound
 * (qualify()) is shared by the config path and pn_coreconf_account(), so
 * the users written at start and the users added later through the core
 * API can never disagree. */
#include "node/coreconf.h"

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/json.h"
#include "base/err.h"
#include "base/log.h"
#include "base/uuid.h"

#define API_OUTBOUND_TAG "API"
#define GUARD_RULE_TAG "PG_NODE_MALFORMED_DOMAIN_GUARD"

/* §9.1 */
static const char *const kept_top_keys[] = {
    "log",     "routing", "dns",     "inbounds", "outbounds",   "policy",           "api",
    "metrics", "stats",   "reverse", "fakeDns",  "observatory", "burstObservatory",
};
static const char *const kept_inbound_keys[] = {
    "tag", "listen", "port", "protocol", "settings", "streamSettings", "sniffing", "allocate",
};
/* §9.4: what geoip:private stands for, since Debian's v2ray has no geoip.dat. */
static const char *const private_cidrs[] = {
    "0.0.0.0/8",     "10.0.0.0/8",   "100.64.0.0/10",  "127.0.0.0/8",   "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",   "::/128",       "::1/128",        "fc00::/7",      "fe80::/10",
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* Why a user listed on an inbound got no account there. SKIP_SILENT covers
 * the normal cases (sub-message absent, a protocol without users); the
 * others are the ones §17 asks to log. */
enum skip {
    SKIP_SILENT = 0,
    SKIP_BAD_ID,
    SKIP_EMPTY_SECRET,
    SKIP_BAD_METHOD,
    SKIP_BAD_UTF8,
    SKIP_NREASONS,
};
static const char *const skip_text[SKIP_NREASONS] = {
    [SKIP_SILENT] = "not applicable",
    [SKIP_BAD_ID] = "invalid UUID",
    [SKIP_EMPTY_SECRET] = "empty password/auth",
    [SKIP_BAD_METHOD] = "unsupported shadowsocks method",
    [SKIP_BAD_UTF8] = "secret is not valid UTF-8",
};

/* ---- small helpers ------------------------------------------------------ */

/* A string member, "" when absent or not a string. */
static const char *jstr(const json_t *obj, const char *key)
{
    const char *s = json_string_value(json_object_get(obj, key));
    return s ? s : "";
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Strict UTF-8 (no overlongs, no surrogates, ≤ U+10FFFF): jansson refuses
 * anything else, and so does the core's protobuf decoder. */
static bool utf8_valid(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        size_t n;
        unsigned min;
        if (c < 0x80) {
            p++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            n = 1, min = 0x80, c &= 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            n = 2, min = 0x800, c &= 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            n = 3, min = 0x10000, c &= 0x07;
        } else {
            return false;
        }
        for (size_t i = 1; i <= n; i++) {
            if ((p[i] & 0xc0) != 0x80)
                return false;
            c = c << 6 | (p[i] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
            return false;
        p += n + 1;
    }
    return true;
}

static void lower_copy(char *out, const char *s, size_t outlen)
{
    size_t i = 0;
    for (; s[i] && i + 1 < outlen; i++)
        out[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] - 'A' + 'a') : s[i];
    out[i] = '\0';
}

/* ---- the per-user rules (§10 with §17 rows 10-11) -------------------------- */

/* A UUID in any accepted form → lower-case canonical text in out. */
static bool canonical_uuid(const char *id, char *out)
{
    struct pn_uuid uuid;
    if (!id || pn_uuid_parse(id, strlen(id), &uuid) != PN_OK)
        return false;
    pn_uuid_format(&uuid, out);
    return true;
}

/* Whether s is standard, padded base64 of exactly n bytes (Go's
 * base64.StdEncoding, which the reference uses to accept a ready key). */
static bool is_base64_of(const char *s, size_t n)
{
    size_t enc = 4 * ((n + 2) / 3), pads = (3 - n % 3) % 3;
    if (strlen(s) != enc)
        return false;
    for (size_t i = 0; i < enc; i++) {
        char c = s[i];
        if (i >= enc - pads) {
            if (c != '=')
                return false;
        } else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                     c == '+' || c == '/')) {
            return false;
        }
    }
    return true;
}

/* The SS-2022 user key (§10): a ready base64 key of the method's length is
 * kept, anything else becomes base64(SHA-256(password)[:len]). out holds
 * at least 45 bytes. */
static void ss2022_key(const char *method, const char *password, char *out)
{
    size_t keylen = ends_with(method, "aes-128-gcm") ? 16 : 32;
    if (is_base64_of(password, keylen)) {
        memcpy(out, password, strlen(password) + 1);
        return;
    }
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    if (!EVP_Digest(password, strlen(password), digest, &dlen, EVP_sha256(), NULL)) {
        fprintf(stderr, "proxynode: SHA-256 unavailable\n");
        abort();
    }
    EVP_EncodeBlock((unsigned char *)out, digest, (int)keylen);
}

/* A shadowsocks method this core accepts, lower-cased into out; false for
 * unknown ones and for `none` on a core that dropped it (§17 row 11: never
 * fall back to an unencrypted cipher). */
static bool ss_method_ok(const char *method, const struct pn_core_version *core, char *out,
                         size_t outlen)
{
    enum pn_core_kind kind = core->kind == PN_CORE_V2RAY ? PN_CORE_V2RAY : PN_CORE_XRAY;
    if (!method || !*method || strlen(method) >= outlen || pn_dialect_ss_cipher(kind, method) < 0)
        return false;
    lower_copy(out, method, outlen);
    if ((strcmp(out, "none") == 0 || strcmp(out, "plain") == 0) && !pn_dialect_has_ss_none(core))
        return false;
    return true;
}

static const char *nz(const char *s)
{
    return s ? s : "";
}

/* The one eligibility rule for a user on an inbound it lists, shared by the
 * config path and pn_coreconf_account. Fills acct as the config file wants
 * it (vless flow = the user's own; the API path applies the inbound's flow
 * afterwards). Returns false with *why set when there is no account. */
static bool qualify(const struct pn_inbound_info *in, const struct pn_user *u,
                    const struct pn_core_version *core, struct pn_core_account *acct, char *scratch,
                    enum skip *why)
{
    bool v2ray = core->kind == PN_CORE_V2RAY;
    memset(acct, 0, sizeof *acct);
    *why = SKIP_SILENT;
    const char *secret = NULL;
    switch (in->kind) {
    case PN_IN_VMESS:
    case PN_IN_VLESS: {
        bool vmess = in->kind == PN_IN_VMESS;
        if (!(vmess ? u->has_vmess : u->has_vless))
            return false;
        if (!canonical_uuid(vmess ? u->vmess_id : u->vless_id, scratch)) {
            *why = SKIP_BAD_ID;
            return false;
        }
        acct->proto = vmess ? PN_CORE_PROTO_VMESS : PN_CORE_PROTO_VLESS;
        acct->id = scratch;
        if (!vmess) {
            /* v2ray has no server-side flow (cores.md §3). */
            acct->flow = v2ray ? "" : nz(u->vless_flow);
            if (!utf8_valid(acct->flow)) {
                *why = SKIP_BAD_UTF8;
                return false;
            }
        }
        return true;
    }
    case PN_IN_TROJAN:
        if (!u->has_trojan)
            return false;
        acct->proto = PN_CORE_PROTO_TROJAN;
        secret = acct->password = nz(u->trojan_password);
        break;
    case PN_IN_SHADOWSOCKS:
    case PN_IN_SS_SINGLE:
        if (!u->has_ss)
            return false;
        acct->proto = PN_CORE_PROTO_SHADOWSOCKS;
        secret = acct->password = nz(u->ss_password);
        if (!*secret)
            break;
        /* The user's method from the panel, else the inbound's. */
        if (!ss_method_ok(u->ss_method && *u->ss_method ? u->ss_method : in->ss_method, core,
                          scratch, PN_COREACCT_SCRATCH)) {
            *why = SKIP_BAD_METHOD;
            return false;
        }
        acct->method = scratch;
        break;
    case PN_IN_SS2022:
        if (!u->has_ss)
            return false;
        acct->proto = PN_CORE_PROTO_SS2022;
        secret = nz(u->ss_password);
        if (*secret) {
            ss2022_key(in->ss_method, secret, scratch);
            acct->key = scratch;
        }
        break;
    case PN_IN_HYSTERIA:
        if (!u->has_hysteria)
            return false;
        acct->proto = PN_CORE_PROTO_HYSTERIA;
        secret = acct->auth = nz(u->hysteria_auth);
        break;
    case PN_IN_OTHER:
        return false;
    }
    if (!*secret) {
        *why = SKIP_EMPTY_SECRET;
        return false;
    }
    if (!utf8_valid(secret)) {
        *why = SKIP_BAD_UTF8;
        return false;
    }
    return true;
}

bool pn_coreconf_account(const struct pn_inbound_info *in, const struct pn_user *u,
                         const struct pn_core_version *core, struct pn_core_account *acct,
                         char *scratch, size_t scratchlen)
{
    memset(acct, 0, sizeof *acct);
    if (in->excluded || in->kind == PN_IN_OTHER || !pn_user_has_inbound(u, in->tag))
        return false;
    if (scratchlen < PN_COREACCT_SCRATCH) {
        pn_log_error("coreconf: account scratch of %zu bytes is too small", scratchlen);
        return false;
    }
    if (!utf8_valid(u->email)) {
        pn_log_warn("user with a non-UTF-8 email not added to inbound %s", in->tag);
        return false;
    }
    enum skip why;
    if (!qualify(in, u, core, acct, scratch, &why)) {
        if (why != SKIP_SILENT)
            pn_log_warn("user %s not added to inbound %s: %s", u->email, in->tag, skip_text[why]);
        return false;
    }
    /* §10: the panel puts the flow on the inbound; Xray applies it as a
     * default only when loading a config, so API-added users need it here. */
    if (acct->proto == PN_CORE_PROTO_VLESS && core->kind != PN_CORE_V2RAY && in->flow && *in->flow)
        acct->flow = in->flow;
    return true;
}

/* ---- the build ------------------------------------------------------------ */

/* Per output inbound, while building. */
struct ib {
    json_t *settings;      /* NULL for excluded inbounds */
    bool has_clients;      /* settings.clients is this inbound's placeholder */
    struct pn_buf clients; /* the entries of settings.clients as JSON text */
    size_t last_user; /* 1 + index of the last user placed (catches repeated tags) */
    size_t skipped[SKIP_NREASONS];
    const char *first_skipped[SKIP_NREASONS];
    size_t extra_single; /* users beyond the one a v2ray shadowsocks inbound takes */
};

struct build {
    const struct pn_coreconf_opts *o;
    bool v2ray, xray;
    json_t *root;
    struct pn_coreconf *out;
    struct ib *ibs;          /* parallel to out->inbounds */
    char *blackhole_tag;     /* first blackhole outbound tag in sorted order, or NULL */
    const char **noise_tags; /* blackhole, dns and loopback outbound tags */
    size_t nnoise;
    char *err;
    size_t errlen;
    size_t nibs;    /* entries allocated in ibs */
    char token[48]; /* placeholder prefix for the client lists, see splice_clients */
};

static int bad(struct build *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int bad(struct build *b, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return pn_seterr(b->err, b->errlen, PN_ERR_INVAL, "config: %s", msg);
}

/* A copy of obj with only the keys in list, matched without regard to case
 * and renamed to the listed spelling: the reference and the cores read
 * config keys the way Go's encoding/json does, case-insensitively, so
 * "fakedns" is kept as "fakeDns" rather than silently dropped. A later
 * duplicate replaces an earlier one, in the earlier one's place. */
static json_t *kept_copy(json_t *obj, const char *const *list, size_t n)
{
    json_t *out = pn_json_nn(json_object());
    const char *key;
    json_t *val;
    json_object_foreach(obj, key, val)
    {
        for (size_t i = 0; i < n; i++) {
            if (strcasecmp(key, list[i]) == 0) {
                pn_json_set(out, list[i], json_incref(val));
                break;
            }
        }
    }
    return out;
}

/* Keeps the top-level keys of §9.1, without the Xray-only ones on v2ray
 * (§9, last paragraph). */
static void filter_top(struct build *b)
{
    json_t *kept = kept_copy(b->root, kept_top_keys, NELEM(kept_top_keys));
    if (b->v2ray) {
        json_object_del(kept, "metrics");
        json_object_del(kept, "burstObservatory");
    }
    json_decref(b->root);
    b->root = kept;
}

/* Learns the outbound tags the later steps need: the malformed-domain
 * guard's blackhole target and the tags observatory must not probe. */
static int scan_outbounds(struct build *b)
{
    json_t *outs = json_object_get(b->root, "outbounds");
    if (!outs || json_is_null(outs))
        return PN_OK;
    if (!json_is_array(outs))
        return bad(b, "outbounds must be an array");
    size_t i;
    json_t *ob;
    b->noise_tags = pn_calloc(json_array_size(outs), sizeof *b->noise_tags);
    json_array_foreach(outs, i, ob)
    {
        if (!json_is_object(ob))
            return bad(b, "outbounds[%zu] must be an object", i);
        const char *proto = jstr(ob, "protocol"), *tag = jstr(ob, "tag");
        if (!*tag)
            continue;
        bool blackhole = strcasecmp(proto, "blackhole") == 0;
        if (blackhole || strcasecmp(proto, "dns") == 0 || strcasecmp(proto, "loopback") == 0) {
            b->noise_tags[b->nnoise++] = tag;
            b->out->noise_outbounds =
                pn_realloc(b->out->noise_outbounds,
                           (b->out->nnoise_outbounds + 1) * sizeof *b->out->noise_outbounds);
            b->out->noise_outbounds[b->out->nnoise_outbounds++] = pn_strdup(tag);
        }
        if (blackhole && (!b->blackhole_tag || strcmp(tag, b->blackhole_tag) < 0)) {
            free(b->blackhole_tag);
            b->blackhole_tag = pn_strdup(tag);
        }
    }
    return PN_OK;
}

static enum pn_inbound_kind kind_of(const char *protocol, const char *method, bool v2ray)
{
    if (strcasecmp(protocol, "vmess") == 0)
        return PN_IN_VMESS;
    if (strcasecmp(protocol, "vless") == 0)
        return PN_IN_VLESS;
    if (strcasecmp(protocol, "trojan") == 0)
        return PN_IN_TROJAN;
    if (strcasecmp(protocol, "shadowsocks") == 0) {
        if (v2ray)
            return PN_IN_SS_SINGLE;
        return strncasecmp(method, "2022-blake3", 11) == 0 ? PN_IN_SS2022 : PN_IN_SHADOWSOCKS;
    }
    if (strcasecmp(protocol, "hysteria") == 0 && !v2ray)
        return PN_IN_HYSTERIA;
    return PN_IN_OTHER;
}

static bool is_excluded(const struct build *b, const char *tag)
{
    for (size_t i = 0; i < b->o->nexclude; i++)
        if (b->o->exclude[i] && strcmp(b->o->exclude[i], tag) == 0)
            return true;
    return false;
}

/* §9.1, §9.3, §9.8: drops the panel's API inbound, prepends ours, trims the
 * keys of the other non-excluded inbounds and gives each an empty clients
 * list to fill; describes every inbound. Excluded ones are kept as sent. */
static int build_inbounds(struct build *b)
{
    json_t *ins = json_object_get(b->root, "inbounds");
    if (ins && !json_is_null(ins) && !json_is_array(ins))
        return bad(b, "inbounds must be an array");
    size_t n = ins ? json_array_size(ins) : 0;
    b->out->inbounds = pn_calloc(n ? n : 1, sizeof *b->out->inbounds);
    b->ibs = pn_calloc(n ? n : 1, sizeof *b->ibs);
    b->nibs = n;

    json_t *arr = pn_json_nn(json_array());
    json_t *api = pn_json_nn(json_object());
    pn_json_set(api, "tag", json_string(PN_API_INBOUND_TAG));
    pn_json_set(api, "listen", json_string("127.0.0.1"));
    pn_json_set(api, "port", json_integer(b->o->api_port));
    pn_json_set(api, "protocol", json_string("dokodemo-door"));
    json_t *api_settings = pn_json_nn(json_object());
    pn_json_set(api_settings, "address", json_string("127.0.0.1"));
    pn_json_set(api, "settings", api_settings);
    pn_json_append(arr, api);
    /* From here the new array owns the inbounds; the old one goes at the end. */
    int rv = PN_OK;
    for (size_t i = 0; i < n; i++) {
        json_t *raw = json_array_get(ins, i);
        if (!json_is_object(raw)) {
            rv = bad(b, "inbounds[%zu] must be an object", i);
            break;
        }
        json_t *in = kept_copy(raw, kept_inbound_keys, NELEM(kept_inbound_keys));
        json_t *jtag = json_object_get(in, "tag");
        if (jtag && !json_is_null(jtag) && !json_is_string(jtag)) {
            json_decref(in);
            rv = bad(b, "inbounds[%zu].tag must be a string", i);
            break;
        }
        const char *tag = jstr(in, "tag"); /* shared with raw, so it outlives in */
        if (strcmp(tag, PN_API_INBOUND_TAG) == 0) {
            json_decref(in);
            continue;
        }
        bool excluded = is_excluded(b, tag);
        json_t *settings = json_object_get(in, "settings");
        if (!excluded && settings && !json_is_null(settings) && !json_is_object(settings)) {
            json_decref(in);
            rv = bad(b, "inbounds[%zu].settings must be an object", i);
            break;
        }
        struct pn_inbound_info *info = &b->out->inbounds[b->out->ninbounds];
        struct ib *ib = &b->ibs[b->out->ninbounds];
        b->out->ninbounds++;
        char method[64];
        lower_copy(method, jstr(settings, "method"), sizeof method);
        info->tag = pn_strdup(tag);
        info->excluded = excluded;
        info->kind = kind_of(jstr(in, "protocol"), method, b->v2ray);
        info->flow = pn_strdup(jstr(settings, "flow"));
        info->ss_method = pn_strdup(method);
        if (excluded) {
            /* Exactly as the panel sent it (§9.1). */
            json_decref(in);
            pn_json_append(arr, json_incref(raw));
            continue;
        }
        pn_json_append(arr, in);
        if (!json_is_object(settings)) {
            settings = pn_json_nn(json_object());
            pn_json_set(in, "settings", settings);
        }
        ib->settings = settings;
        if (info->kind == PN_IN_SS_SINGLE) {
            /* Single-user: the user goes into the top level (cores.md §7). */
            json_object_del(settings, "clients");
        } else {
            char ph[64];
            snprintf(ph, sizeof ph, "%s%zu", b->token, b->out->ninbounds - 1);
            pn_json_set(settings, "clients", json_string(ph));
            ib->has_clients = true;
        }
        if (info->kind == PN_IN_VLESS && b->v2ray)
            pn_json_set(settings, "decryption", json_string("none")); /* mandatory on 4.34 */
    }
    if (rv == PN_OK)
        json_object_set_new(b->root, "inbounds", arr);
    else
        json_decref(arr);
    return rv;
}

/* Replaces each geoip:private in rule[key] (an array, or a lone string)
 * with the CIDRs of §9.4. */
static void expand_private(json_t *rule, const char *key)
{
    json_t *v = json_object_get(rule, key);
    if (json_is_string(v)) {
        if (strcasecmp(json_string_value(v), "geoip:private") != 0)
            return;
    } else if (!json_is_array(v)) {
        return;
    }
    json_t *arr = pn_json_nn(json_array());
    size_t n = json_is_array(v) ? json_array_size(v) : 1;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_is_array(v) ? json_array_get(v, i) : v;
        if (json_is_string(e) && strcasecmp(json_string_value(e), "geoip:private") == 0) {
            for (size_t j = 0; j < NELEM(private_cidrs); j++)
                pn_json_append(arr, json_string(private_cidrs[j]));
        } else {
            pn_json_append(arr, json_incref(e));
        }
    }
    pn_json_set(rule, key, arr);
}

/* §9.4-9.5: the panel's API and guard rules out, ours first (API rule, then
 * the malformed-domain guard when a blackhole exists), geoip:private
 * expanded everywhere else. */
static int build_routing(struct build *b)
{
    json_t *routing = json_object_get(b->root, "routing");
    if (!routing || json_is_null(routing)) {
        routing = pn_json_nn(json_object());
        pn_json_set(b->root, "routing", routing);
    } else if (!json_is_object(routing)) {
        return bad(b, "routing must be an object");
    }
    json_t *rules = json_object_get(routing, "rules");
    if (rules && !json_is_null(rules) && !json_is_array(rules))
        return bad(b, "routing.rules must be an array");
    size_t n = json_array_size(rules);
    for (size_t i = 0; i < n; i++)
        if (!json_is_object(json_array_get(rules, i)))
            return bad(b, "routing.rules[%zu] must be an object", i);

    json_t *out = pn_json_nn(json_array());
    json_t *api = pn_json_nn(json_object());
    pn_json_set(api, "type", json_string("field"));
    json_t *tags = pn_json_nn(json_array());
    pn_json_append(tags, json_string(PN_API_INBOUND_TAG));
    pn_json_set(api, "inboundTag", tags);
    json_t *src = pn_json_nn(json_array());
    pn_json_append(src, json_string("127.0.0.1"));
    pn_json_append(src, json_string("::1"));
    for (size_t i = 0; i < b->o->naddrs; i++) {
        const char *a = b->o->local_addrs[i];
        if (!a || !*a || !utf8_valid(a) || strcmp(a, "127.0.0.1") == 0 || strcmp(a, "::1") == 0)
            continue;
        pn_json_append(src, json_string(a));
    }
    pn_json_set(api, "source", src);
    pn_json_set(api, "outboundTag", json_string(API_OUTBOUND_TAG));
    pn_json_append(out, api);

    if (b->blackhole_tag) {
        json_t *guard = pn_json_nn(json_object());
        pn_json_set(guard, "type", json_string("field"));
        pn_json_set(guard, "ruleTag", json_string(GUARD_RULE_TAG));
        json_t *dom = pn_json_nn(json_array());
        pn_json_append(dom, json_string("regexp:^.{254,}$"));
        pn_json_append(dom, json_string("regexp:(^|\\.)[^.]{64,}(\\.|$)"));
        pn_json_set(guard, "domain", dom);
        pn_json_set(guard, "outboundTag", json_string(b->blackhole_tag));
        pn_json_append(out, guard);
    }

    for (size_t i = 0; i < n; i++) {
        json_t *r = json_array_get(rules, i);
        if (strcmp(jstr(r, "outboundTag"), API_OUTBOUND_TAG) == 0 ||
            strcmp(jstr(r, "ruleTag"), GUARD_RULE_TAG) == 0)
            continue;
        expand_private(r, "ip");
        expand_private(r, "source");
        pn_json_append(out, json_incref(r));
    }
    pn_json_set(routing, "rules", out);
    return PN_OK;
}

/* §9.6: observatories must not probe outbounds that never answer. */
static int clean_observatory(struct build *b, const char *name)
{
    json_t *obs = json_object_get(b->root, name);
    if (!obs || json_is_null(obs))
        return PN_OK;
    if (!json_is_object(obs))
        return bad(b, "%s must be an object", name);
    if (b->xray)
        b->out->has_observatory = true;
    json_t *sel = json_object_get(obs, "subjectSelector");
    if (!json_is_array(sel))
        return PN_OK;
    for (size_t i = json_array_size(sel); i-- > 0;) {
        const char *s = json_string_value(json_array_get(sel, i));
        for (size_t j = 0; s && j < b->nnoise; j++) {
            if (strcmp(s, b->noise_tags[j]) == 0) {
                json_array_remove(sel, i);
                break;
            }
        }
    }
    return PN_OK;
}

/* Returns obj[key], created as {} when absent or null; NULL when it holds
 * something other than an object. */
static json_t *child_object(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        v = pn_json_nn(json_object());
        pn_json_set(obj, key, v);
    }
    return json_is_object(v) ? v : NULL;
}

/* §9.7: per-user counters at level 0, outbound counters, and inbound
 * counters only where the panel asked for a system policy. */
static int build_policy(struct build *b)
{
    json_t *pol = json_object_get(b->root, "policy");
    bool had_system = json_is_object(json_object_get(pol, "system"));
    if (!(pol = child_object(b->root, "policy")))
        return bad(b, "policy must be an object");
    json_t *levels = child_object(pol, "levels");
    if (!levels)
        return bad(b, "policy.levels must be an object");
    json_t *l0 = child_object(levels, "0");
    if (!l0)
        return bad(b, "policy.levels.0 must be an object");
    pn_json_set(l0, "statsUserUplink", json_true());
    pn_json_set(l0, "statsUserDownlink", json_true());
    if (b->v2ray) {
        const char *key;
        json_t *lv;
        json_object_foreach(levels, key, lv)
        {
            if (json_is_object(lv))
                json_object_del(lv, "statsUserOnline");
        }
    }
    b->out->stats_user_online = b->xray && json_is_true(json_object_get(l0, "statsUserOnline"));
    json_t *sys = child_object(pol, "system");
    if (!sys)
        return bad(b, "policy.system must be an object");
    if (had_system) {
        pn_json_set(sys, "statsInboundUplink", json_true());
        pn_json_set(sys, "statsInboundDownlink", json_true());
    }
    pn_json_set(sys, "statsOutboundUplink", json_true());
    pn_json_set(sys, "statsOutboundDownlink", json_true());
    return PN_OK;
}

/* §9.3 api/stats/metrics and §9.9 log. */
static int build_services(struct build *b)
{
    json_t *api = pn_json_nn(json_object());
    pn_json_set(api, "tag", json_string(API_OUTBOUND_TAG));
    json_t *svcs = pn_json_nn(json_array());
    pn_json_append(svcs, json_string("HandlerService"));
    pn_json_append(svcs, json_string("LoggerService"));
    pn_json_append(svcs, json_string("StatsService"));
    pn_json_set(api, "services", svcs);
    pn_json_set(b->root, "api", api);
    pn_json_set(b->root, "stats", json_object());
    if (b->xray && b->o->metrics_port) {
        json_t *m = pn_json_nn(json_object());
        char listen[32];
        snprintf(listen, sizeof listen, "127.0.0.1:%u", (unsigned)b->o->metrics_port);
        pn_json_set(m, "tag", json_string("metric"));
        pn_json_set(m, "listen", json_string(listen));
        pn_json_set(b->root, "metrics", m);
        b->out->metrics_port = b->o->metrics_port;
    } else {
        json_object_del(b->root, "metrics");
    }

    json_t *log = json_object_get(b->root, "log");
    if (!log || json_is_null(log)) {
        log = pn_json_nn(json_object());
        pn_json_set(log, "loglevel", json_string("info"));
        pn_json_set(b->root, "log", log);
    } else if (!json_is_object(log)) {
        return bad(b, "log must be an object");
    } else {
        /* The core logs to stdout; the node files the lines itself. */
        if (json_object_get(log, "access"))
            pn_json_set(log, "access", json_string(""));
        if (json_object_get(log, "error"))
            pn_json_set(log, "error", json_string(""));
    }
    return PN_OK;
}

/* ---- users into inbounds ---------------------------------------------------- */

struct tag_ref {
    const char *tag;
    size_t idx;
};

static int cmp_tag_ref(const void *a, const void *b)
{
    const struct tag_ref *x = a, *y = b;
    int c = strcmp(x->tag, y->tag);
    return c ? c : (x->idx > y->idx) - (x->idx < y->idx);
}

static int cmp_user_email(const void *a, const void *b)
{
    return strcmp((*(const struct pn_user *const *)a)->email,
                  (*(const struct pn_user *const *)b)->email);
}

struct collect {
    const struct pn_user **v;
    size_t n;
};

static void collect_user(const struct pn_user *u, void *arg)
{
    struct collect *c = arg;
    c->v[c->n++] = u;
}

/* One settings.clients entry (§10 table, cores.md §7 for v2ray), appended
 * to the inbound's list as the JSON text jansson would print for it.
 * Strings were checked for UTF-8 by qualify(). */
static void client_entry(const struct build *b, struct pn_buf *t, const struct pn_user *u,
                         const struct pn_core_account *a)
{
    pn_buf_append_str(t, t->len ? ",{\"email\":" : "{\"email\":");
    pn_json_quote(t, u->email);
    pn_buf_append_str(t, ",\"level\":0");
    switch (a->proto) {
    case PN_CORE_PROTO_VMESS:
        pn_buf_append_str(t, ",\"id\":");
        pn_json_quote(t, a->id);
        if (b->v2ray)
            pn_buf_append_str(t, ",\"alterId\":0");
        break;
    case PN_CORE_PROTO_VLESS:
        pn_buf_append_str(t, ",\"id\":");
        pn_json_quote(t, a->id);
        if (!b->v2ray) {
            pn_buf_append_str(t, ",\"flow\":");
            pn_json_quote(t, a->flow);
        }
        break;
    case PN_CORE_PROTO_TROJAN:
        pn_buf_append_str(t, ",\"password\":");
        pn_json_quote(t, a->password);
        break;
    case PN_CORE_PROTO_SHADOWSOCKS:
        pn_buf_append_str(t, ",\"password\":");
        pn_json_quote(t, a->password);
        pn_buf_append_str(t, ",\"method\":");
        pn_json_quote(t, a->method);
        break;
    case PN_CORE_PROTO_SS2022:
        pn_buf_append_str(t, ",\"password\":");
        pn_json_quote(t, a->key);
        break;
    case PN_CORE_PROTO_HYSTERIA:
        pn_buf_append_str(t, ",\"auth\":");
        pn_json_quote(t, a->auth);
        break;
    }
    pn_buf_append(t, "}", 1);
}

/* The client lists are written as text, not as jansson objects (building
 * and printing 100k of those took most of a large Start): each list's
 * settings.clients holds the string "<token><inbound index>" until the tree
 * is printed, and here each printed placeholder becomes `[entries]`. The
 * token carries 128 random bits, so no string of the panel's can be taken
 * for one. Returns the final text (malloc'd). */
static char *splice_clients(const struct build *b, const char *text, size_t *len)
{
    size_t tlen = strlen(text), toklen = strlen(b->token), extra = 0;
    for (size_t i = 0; i < b->out->ninbounds; i++)
        extra += b->ibs[i].clients.len + 2;
    struct pn_buf out;
    pn_buf_init(&out, 0);
    pn_buf_reserve(&out, tlen + extra);
    const char *p = text, *end = text + tlen;
    const char *hit;
    while ((hit = memmem(p, (size_t)(end - p), b->token, toklen)) != NULL) {
        /* hit is inside the quotes: `"<token><digits>"` */
        char *after;
        unsigned long idx = strtoul(hit + toklen, &after, 10);
        if (hit == p || hit[-1] != '"' || *after != '"' || idx >= b->out->ninbounds ||
            !b->ibs[idx].has_clients) {
            pn_buf_append(&out, p, (size_t)(hit + toklen - p));
            p = hit + toklen;
            continue;
        }
        pn_buf_append(&out, p, (size_t)(hit - 1 - p));
        pn_buf_append(&out, "[", 1);
        pn_buf_append(&out, b->ibs[idx].clients.data, b->ibs[idx].clients.len);
        pn_buf_append(&out, "]", 1);
        p = after + 1;
    }
    pn_buf_append(&out, p, (size_t)(end - p));
    *len = out.len;
    return (char *)out.data;
}

/* A v2ray shadowsocks inbound with no qualifying user still needs a
 * password to load; one nobody knows keeps it closed. */
static int lock_single(struct build *b, size_t idx)
{
    struct ib *ib = &b->ibs[idx];
    unsigned char raw[32];
    char pw[48];
    if (RAND_bytes(raw, sizeof raw) != 1)
        return pn_seterr(b->err, b->errlen, PN_ERR_IO, "config: no random bytes for a password");
    EVP_EncodeBlock((unsigned char *)pw, raw, sizeof raw);
    char method[64];
    if (!ss_method_ok(b->out->inbounds[idx].ss_method, &b->o->core, method, sizeof method))
        snprintf(method, sizeof method, "aes-256-gcm");
    pn_json_set(ib->settings, "method", json_string(method));
    pn_json_set(ib->settings, "password", json_string(pw));
    json_object_del(ib->settings, "email");
    pn_log_info("inbound %s: no user for this single-user shadowsocks inbound; closed with a "
                "random password",
                b->out->inbounds[idx].tag);
    return PN_OK;
}

/* §10: every user into every inbound it lists and qualifies for. Users go
 * in email order so the output does not depend on the set's hash layout;
 * tags are looked up in a sorted index, so the cost is O(users × tags ×
 * log inbounds). */
static int place_users(struct build *b)
{
    const struct pn_userset *set = b->o->users;
    size_t nin = b->out->ninbounds;
    struct tag_ref *refs = pn_calloc(nin ? nin : 1, sizeof *refs);
    size_t nrefs = 0;
    for (size_t i = 0; i < nin; i++) {
        const struct pn_inbound_info *in = &b->out->inbounds[i];
        if (!in->excluded && in->kind != PN_IN_OTHER && *in->tag)
            refs[nrefs++] = (struct tag_ref){in->tag, i};
    }
    qsort(refs, nrefs, sizeof *refs, cmp_tag_ref);

    size_t nusers = set ? pn_userset_count(set) : 0;
    struct collect users = {pn_calloc(nusers ? nusers : 1, sizeof *users.v), 0};
    if (set)
        pn_userset_foreach(set, collect_user, &users);
    qsort(users.v, users.n, sizeof *users.v, cmp_user_email);

    size_t bad_email = 0;
    char scratch[PN_COREACCT_SCRATCH];
    for (size_t ui = 0; ui < users.n && nrefs; ui++) {
        const struct pn_user *u = users.v[ui];
        if (!utf8_valid(u->email)) {
            bad_email++;
            continue;
        }
        for (size_t t = 0; t < u->ninbounds; t++) {
            /* lower bound of the tag in refs */
            size_t lo = 0, hi = nrefs;
            while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (strcmp(refs[mid].tag, u->inbounds[t]) < 0)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            for (; lo < nrefs && strcmp(refs[lo].tag, u->inbounds[t]) == 0; lo++) {
                size_t idx = refs[lo].idx;
                struct ib *ib = &b->ibs[idx];
                struct pn_inbound_info *in = &b->out->inbounds[idx];
                if (ib->last_user == ui + 1)
                    continue;
                ib->last_user = ui + 1;
                struct pn_core_account acct;
                enum skip why;
                if (!qualify(in, u, &b->o->core, &acct, scratch, &why)) {
                    if (why != SKIP_SILENT && ib->skipped[why]++ == 0)
                        ib->first_skipped[why] = u->email;
                    continue;
                }
                if (in->kind != PN_IN_SS_SINGLE) {
                    client_entry(b, &ib->clients, u, &acct);
                    continue;
                }
                if (in->single_email) {
                    ib->extra_single++;
                    continue;
                }
                in->single_email = pn_strdup(u->email);
                pn_json_set(ib->settings, "method", json_string_nocheck(acct.method));
                pn_json_set(ib->settings, "password", json_string_nocheck(acct.password));
                pn_json_set(ib->settings, "email", json_string_nocheck(u->email));
                pn_json_set(ib->settings, "level", json_integer(0));
            }
        }
    }
    free(users.v);
    free(refs);

    if (bad_email)
        pn_log_warn("%zu user(s) with a non-UTF-8 email skipped", bad_email);
    for (size_t i = 0; i < nin; i++) {
        struct ib *ib = &b->ibs[i];
        const struct pn_inbound_info *in = &b->out->inbounds[i];
        for (int r = 1; r < SKIP_NREASONS; r++)
            if (ib->skipped[r])
                pn_log_warn("inbound %s: %zu user(s) skipped: %s (first: %s)", in->tag,
                            ib->skipped[r], skip_text[r], ib->first_skipped[r]);
        if (ib->extra_single)
            pn_log_warn("inbound %s: v2ray shadowsocks takes one user (%s); %zu other user(s) "
                        "skipped",
                        in->tag, in->single_email, ib->extra_single);
        if (in->kind == PN_IN_SS_SINGLE && !in->excluded && !in->single_email) {
            int rv = lock_single(b, i);
            if (rv != PN_OK)
                return rv;
        }
    }
    return PN_OK;
}

int pn_coreconf_build(const struct pn_coreconf_opts *opts, struct pn_coreconf *out, char *err,
                      size_t errlen)
{
    memset(out, 0, sizeof *out);
    json_error_t jerr;
    json_t *root = json_loadb(opts->panel_json ? opts->panel_json : "",
                              opts->panel_json ? opts->panel_len : 0, JSON_DECODE_ANY, &jerr);
    if (!root)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "invalid config JSON: line %d column %d: %s",
                         jerr.line, jerr.column, jerr.text);
    struct build b = {
        .o = opts,
        .v2ray = opts->core.kind == PN_CORE_V2RAY,
        .xray = opts->core.kind == PN_CORE_XRAY,
        .root = root,
        .out = out,
        .err = err,
        .errlen = errlen,
    };
    int rv;
    unsigned char rnd[16];
    if (RAND_bytes(rnd, sizeof rnd) != 1) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "config: no random bytes");
        goto fail;
    }
    char hexs[2 * sizeof rnd + 1];
    for (size_t i = 0; i < sizeof rnd; i++)
        snprintf(hexs + 2 * i, 3, "%02x", rnd[i]);
    snprintf(b.token, sizeof b.token, "pn-clients-%s-", hexs);
    if (!json_is_object(b.root)) {
        rv = bad(&b, "top level must be an object");
        goto fail;
    }
    filter_top(&b);
    if ((rv = scan_outbounds(&b)) != PN_OK || (rv = build_inbounds(&b)) != PN_OK ||
        (rv = build_routing(&b)) != PN_OK || (rv = clean_observatory(&b, "observatory")) != PN_OK ||
        (rv = clean_observatory(&b, "burstObservatory")) != PN_OK ||
        (rv = build_policy(&b)) != PN_OK || (rv = build_services(&b)) != PN_OK ||
        (rv = place_users(&b)) != PN_OK)
        goto fail;

    char *text = json_dumps(b.root, JSON_COMPACT);
    if (!text)
        pn_json_nn(NULL);
    out->json = splice_clients(&b, text, &out->json_len);
    free(text);
    rv = PN_OK;
    goto done;
fail:
    pn_coreconf_free(out);
done:
    json_decref(b.root); /* filter_top may have replaced the parsed root */
    for (size_t i = 0; i < b.nibs; i++)
        pn_buf_free(&b.ibs[i].clients);
    free(b.ibs);
    free(b.noise_tags);
    free(b.blackhole_tag);
    return rv;
}

void pn_coreconf_free(struct pn_coreconf *c)
{
    if (!c)
        return;
    free(c->json);
    for (size_t i = 0; i < c->ninbounds; i++) {
        free(c->inbounds[i].tag);
        free(c->inbounds[i].flow);
        free(c->inbounds[i].ss_method);
        free(c->inbounds[i].single_email);
    }
    free(c->inbounds);
    for (size_t i = 0; i < c->nnoise_outbounds; i++)
        free(c->noise_outbounds[i]);
    free(c->noise_outbounds);
    memset(c, 0, sizeof *c);
}

const struct pn_inbound_info *pn_coreconf_inbound(const struct pn_coreconf *c, const char *tag)
{
    for (size_t i = 0; i < c->ninbounds; i++)
        if (strcmp(c->inbounds[i].tag, tag) == 0)
            return &c->inbounds[i];
    return NULL;
}
