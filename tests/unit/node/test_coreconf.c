/* The core config builder against a realistic PasarGuard panel config
 * (tests/data/coreconf): every §9 rule (kept keys, API inbound and rule,
 * geoip:private, the malformed-domain guard, observatory, policy, log),
 * every §10 client shape on Xray and v2ray 4.34, the §17 fixes (empty
 * secrets and unknown methods skipped and logged without secrets), the §18
 * cases 18 and 30-34, JSON and shape errors, agreement between the config
 * path and pn_coreconf_account, a real `v2ray -test` of the v2ray output,
 * and the time to build 100k users (printed, not asserted). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <jansson.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/err.h"
#include "node/coreconf.h"

#ifndef PN_TEST_DATA
#define PN_TEST_DATA "tests/data"
#endif

static const struct pn_core_version xray = {PN_CORE_XRAY, 25, 10, 15, "25.10.15"};
static const struct pn_core_version xray_new = {PN_CORE_XRAY, 26, 7, 11, "26.7.11"};
static const struct pn_core_version v2ray = {PN_CORE_V2RAY, 4, 34, 0, "4.34.0"};

#define API_PORT 23456
#define METRICS_PORT 23457

static const char *const private_cidrs[] = {
    "0.0.0.0/8",     "10.0.0.0/8",   "100.64.0.0/10",  "127.0.0.0/8",   "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",   "::/128",       "::1/128",        "fc00::/7",      "fe80::/10",
};

/* ---- helpers ---- */

static char *slurp(const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/coreconf/%s", PN_TEST_DATA, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = pn_malloc((size_t)n + 1);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static struct pn_user *user(const char *email)
{
    return pn_user_new(email);
}

static void set_vmess(struct pn_user *u, const char *id)
{
    u->has_vmess = true;
    u->vmess_id = pn_strdup(id);
}

static void set_vless(struct pn_user *u, const char *id, const char *flow)
{
    u->has_vless = true;
    u->vless_id = pn_strdup(id);
    u->vless_flow = pn_strdup(flow);
}

static void set_trojan(struct pn_user *u, const char *pw)
{
    u->has_trojan = true;
    u->trojan_password = pn_strdup(pw);
}

static void set_ss(struct pn_user *u, const char *pw, const char *method)
{
    u->has_ss = true;
    u->ss_password = pn_strdup(pw);
    u->ss_method = pn_strdup(method);
}

static void set_hy(struct pn_user *u, const char *auth)
{
    u->has_hysteria = true;
    u->hysteria_auth = pn_strdup(auth);
}

static void add_all(struct pn_user *u, const char *const *tags)
{
    for (; *tags; tags++)
        pn_user_add_inbound(u, *tags);
}

struct built {
    struct pn_coreconf cc;
    json_t *root;
};

static void build_ok(const char *panel, const struct pn_core_version *core,
                     const char *const *exclude, size_t nexclude, const struct pn_userset *users,
                     struct built *b)
{
    static const char *const addrs[] = {"10.0.0.5", "::1", "2001:db8::7"};
    struct pn_coreconf_opts o = {
        .panel_json = panel,
        .panel_len = strlen(panel),
        .exclude = exclude,
        .nexclude = nexclude,
        .core = *core,
        .api_port = API_PORT,
        .metrics_port = METRICS_PORT,
        .local_addrs = addrs,
        .naddrs = 3,
        .users = users,
    };
    char err[512] = "";
    int rv = pn_coreconf_build(&o, &b->cc, err, sizeof err);
    if (rv != PN_OK)
        fail_msg("build failed: %s", err);
    assert_int_equal(strlen(b->cc.json), b->cc.json_len);
    json_error_t jerr;
    b->root = json_loads(b->cc.json, 0, &jerr);
    if (!b->root)
        fail_msg("output is not JSON: %s", jerr.text);
}

static void built_free(struct built *b)
{
    json_decref(b->root);
    pn_coreconf_free(&b->cc);
}

static int build_err(const char *panel, char *err, size_t errlen)
{
    struct pn_coreconf_opts o = {
        .panel_json = panel, .panel_len = strlen(panel), .core = xray, .api_port = API_PORT};
    struct pn_coreconf cc;
    memset(&cc, 0x5a, sizeof cc);
    int rv = pn_coreconf_build(&o, &cc, err, errlen);
    assert_null(cc.json);
    assert_int_equal(cc.ninbounds, 0);
    pn_coreconf_free(&cc);
    return rv;
}

static json_t *inbound(const json_t *root, const char *tag)
{
    size_t i;
    json_t *in;
    json_array_foreach(json_object_get(root, "inbounds"), i, in)
    {
        if (strcmp(json_string_value(json_object_get(in, "tag")), tag) == 0)
            return in;
    }
    fail_msg("no inbound %s", tag);
    return NULL;
}

static json_t *clients(const json_t *root, const char *tag)
{
    json_t *c = json_object_get(json_object_get(inbound(root, tag), "settings"), "clients");
    assert_true(json_is_array(c));
    return c;
}

static json_t *client(const json_t *root, const char *tag, const char *email)
{
    size_t i;
    json_t *c;
    json_array_foreach(clients(root, tag), i, c)
    {
        if (strcmp(json_string_value(json_object_get(c, "email")), email) == 0)
            return c;
    }
    return NULL;
}

static const char *sget(const json_t *obj, const char *key)
{
    const char *s = json_string_value(json_object_get(obj, key));
    if (!s)
        fail_msg("no string %s", key);
    return s;
}

/* The object's keys, comma-joined in order. */
static void keys_of(const json_t *obj, char *out, size_t outlen)
{
    const char *key;
    json_t *v;
    out[0] = '\0';
    json_object_foreach((json_t *)obj, key, v)
    {
        if (out[0])
            strncat(out, ",", outlen - strlen(out) - 1);
        strncat(out, key, outlen - strlen(out) - 1);
    }
}

static void assert_keys(const json_t *obj, const char *want)
{
    char got[512];
    keys_of(obj, got, sizeof got);
    assert_string_equal(got, want);
}

/* An array of strings equal to want[0..n). */
static void assert_strings(const json_t *arr, const char *const *want, size_t n)
{
    assert_true(json_is_array(arr));
    assert_int_equal(json_array_size(arr), n);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(json_string_value(json_array_get(arr, i)), want[i]);
}

/* Captures what the logger writes to stderr while fn runs. */
struct capture {
    int saved;
    FILE *f;
};

static void capture_start(struct capture *c)
{
    fflush(stderr);
    c->f = tmpfile();
    assert_non_null(c->f);
    c->saved = dup(STDERR_FILENO);
    dup2(fileno(c->f), STDERR_FILENO);
}

static char *capture_end(struct capture *c)
{
    dup2(c->saved, STDERR_FILENO);
    close(c->saved);
    long n = ftell(c->f);
    char *text = pn_malloc((size_t)n + 1);
    rewind(c->f);
    size_t got = fread(text, 1, (size_t)n, c->f);
    text[got] = '\0';
    fclose(c->f);
    fputs(text, stderr); /* keep it visible */
    return text;
}

static const char *const all_xray_tags[] = {
    "VMESS TCP",      "VLESS TCP REALITY", "TROJAN WS",   "SS AES",
    "SS 2022",        "SS 2022 256",       "HYSTERIA",    "SOCKS LOCAL",
    "EXCLUDED VLESS", "EXCLUDED DOKODEMO", "nonexistent", NULL};
static const char *const xray_excluded[] = {"EXCLUDED VLESS", "EXCLUDED DOKODEMO"};

/* The users of the Xray fixture test. */
static struct pn_userset *xray_users(void)
{
    struct pn_userset *s = pn_userset_new();
    /* 1: everything valid */
    struct pn_user *u = user("1");
    set_vmess(u, "0B8C7A52-1234-4ABC-8DEF-0123456789AB");
    set_vless(u, "{5a2d0d5e-9c39-4a39-8f6a-3ff5a8a3c4d1}", "");
    set_trojan(u, "trojan-secret-1");
    set_ss(u, "ss-secret-1", "");
    set_hy(u, "hy-secret-1");
    add_all(u, all_xray_tags);
    pn_userset_put(s, u);
    /* 2: bad vmess id, vless with its own flow, empty trojan password, own ss method */
    u = user("2.bob");
    set_vmess(u, "not-a-uuid");
    set_vless(u, "6f2c9f0e-1111-4222-8333-944445555666", "xtls-rprx-vision");
    set_trojan(u, "");
    set_ss(u, "ss-secret-2", "AES-128-GCM");
    add_all(u, all_xray_tags);
    pn_userset_put(s, u);
    /* 3: no trojan sub-message; unknown ss method; raw 2022 password; empty hysteria */
    u = user("3");
    set_vless(u, "7f2c9f0e-1111-4222-8333-944445555666", "");
    set_ss(u, "raw-password", "rc4-md5");
    set_hy(u, "");
    add_all(u, all_xray_tags);
    pn_userset_put(s, u);
    /* 4: a ready 16-byte base64 key; listed only on some inbounds */
    u = user("4");
    set_trojan(u, "trojan-secret-4");
    set_ss(u, "ABEiM0RVZneImaq7zN3u/w==", "");
    pn_user_add_inbound(u, "SS 2022");
    pn_user_add_inbound(u, "SS 2022 256");
    pn_user_add_inbound(u, "HYSTERIA"); /* listed but no hysteria sub-message */
    pn_userset_put(s, u);
    /* 5: a tag listed twice (as the panel may send it) lands once */
    u = user("5");
    set_trojan(u, "trojan-secret-5");
    pn_user_add_inbound(u, "TROJAN WS");
    pn_user_add_inbound(u, "TROJAN WS");
    pn_userset_put(s, u);
    return s;
}

/* base64(SHA-256(pw)[:n]) computed independently of the builder. */
static void derived_key(const char *pw, size_t n, char *out)
{
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int dl;
    assert_true(EVP_Digest(pw, strlen(pw), d, &dl, EVP_sha256(), NULL));
    EVP_EncodeBlock((unsigned char *)out, d, (int)n);
}

/* ---- Xray: §9 ---- */

static void test_xray_config(void **state)
{
    (void)state;
    char *panel = slurp("panel_xray.json");
    struct pn_userset *users = xray_users();
    struct built b;
    build_ok(panel, &xray, xray_excluded, 2, users, &b);
    json_t *r = b.root;

    /* §9.1: kept top-level keys only, new ones appended */
    assert_keys(r, "log,inbounds,outbounds,routing,dns,observatory,burstObservatory,policy,api,"
                   "stats,reverse,metrics");
    /* §9.3 */
    json_t *ins = json_object_get(r, "inbounds");
    json_t *api_in = json_array_get(ins, 0);
    json_t *want_api =
        json_pack("{s:s,s:s,s:i,s:s,s:{s:s}}", "tag", "API_INBOUND", "listen", "127.0.0.1", "port",
                  API_PORT, "protocol", "dokodemo-door", "settings", "address", "127.0.0.1");
    assert_true(json_equal(api_in, want_api));
    json_decref(want_api);
    size_t i, napi = 0;
    json_t *in;
    json_array_foreach(ins, i, in)
    {
        napi += strcmp(sget(in, "tag"), "API_INBOUND") == 0;
    }
    assert_int_equal(napi, 1);
    assert_int_equal(json_array_size(ins), 11); /* API + 10 panel inbounds */
    json_t *want = json_pack("{s:s,s:[s,s,s]}", "tag", "API", "services", "HandlerService",
                             "LoggerService", "StatsService");
    assert_true(json_equal(json_object_get(r, "api"), want));
    json_decref(want);
    assert_keys(json_object_get(r, "stats"), "");
    want = json_pack("{s:s,s:s}", "tag", "metric", "listen", "127.0.0.1:23457");
    assert_true(json_equal(json_object_get(r, "metrics"), want));
    json_decref(want);

    /* §9.1 inbound keys: domainOverride dropped where not excluded */
    assert_keys(inbound(r, "VMESS TCP"),
                "tag,listen,port,protocol,settings,streamSettings,sniffing");

    /* §9.4, §9.5, §18 #33 */
    json_t *rules = json_object_get(json_object_get(r, "routing"), "rules");
    assert_string_equal(sget(json_object_get(r, "routing"), "domainStrategy"), "IPIfNonMatch");
    assert_int_equal(json_array_size(rules), 5);
    json_t *api_rule = json_array_get(rules, 0);
    assert_keys(api_rule, "type,inboundTag,source,outboundTag");
    const char *api_tags[] = {"API_INBOUND"};
    assert_strings(json_object_get(api_rule, "inboundTag"), api_tags, 1);
    const char *src[] = {"127.0.0.1", "::1", "10.0.0.5", "2001:db8::7"};
    assert_strings(json_object_get(api_rule, "source"), src, 4);
    assert_string_equal(sget(api_rule, "outboundTag"), "API");
    json_t *guard = json_array_get(rules, 1);
    assert_string_equal(sget(guard, "ruleTag"), "PG_NODE_MALFORMED_DOMAIN_GUARD");
    assert_string_equal(sget(guard, "outboundTag"), "ADS"); /* first blackhole in sorted order */
    const char *dom[] = {"regexp:^.{254,}$", "regexp:(^|\\.)[^.]{64,}(\\.|$)"};
    assert_strings(json_object_get(guard, "domain"), dom, 2);
    size_t nguard = 0, napirule = 0;
    json_t *rule;
    json_array_foreach(rules, i, rule)
    {
        nguard += json_object_get(rule, "ruleTag") &&
                  strcmp(sget(rule, "ruleTag"), "PG_NODE_MALFORMED_DOMAIN_GUARD") == 0;
        napirule += strcmp(sget(rule, "outboundTag"), "API") == 0;
    }
    assert_int_equal(nguard, 1);
    assert_int_equal(napirule, 1);
    const char *ip_want[16];
    memcpy(ip_want, private_cidrs, sizeof private_cidrs);
    ip_want[15] = "8.8.8.8";
    assert_strings(json_object_get(json_array_get(rules, 2), "ip"), ip_want, 16);
    assert_strings(json_object_get(json_array_get(rules, 3), "source"), private_cidrs, 15);
    assert_string_equal(sget(json_array_get(rules, 3), "port"), "53");
    assert_string_equal(sget(json_array_get(rules, 4), "outboundTag"), "BLOCK");
    assert_null(strcasestr(b.cc.json, "geoip:private"));

    /* §9.6 */
    const char *obs[] = {"DIRECT", "WARP"};
    assert_strings(json_object_get(json_object_get(r, "observatory"), "subjectSelector"), obs, 2);
    const char *bobs[] = {"DIRECT"};
    assert_strings(json_object_get(json_object_get(r, "burstObservatory"), "subjectSelector"), bobs,
                   1);
    assert_true(b.cc.has_observatory);

    /* §9.7: level 0 counters, statsUserOnline kept, system created without inbound stats */
    json_t *pol = json_object_get(r, "policy");
    json_t *l0 = json_object_get(json_object_get(pol, "levels"), "0");
    assert_true(json_is_true(json_object_get(l0, "statsUserUplink")));
    assert_true(json_is_true(json_object_get(l0, "statsUserDownlink")));
    assert_true(json_is_true(json_object_get(l0, "statsUserOnline")));
    assert_int_equal(json_integer_value(json_object_get(l0, "handshake")), 4);
    assert_keys(json_object_get(pol, "system"), "statsOutboundUplink,statsOutboundDownlink");
    assert_true(
        json_is_true(json_object_get(json_object_get(pol, "system"), "statsOutboundUplink")));
    assert_true(b.cc.stats_user_online);
    assert_int_equal(b.cc.metrics_port, METRICS_PORT);

    /* §9.9 */
    json_t *log = json_object_get(r, "log");
    assert_string_equal(sget(log, "access"), "");
    assert_string_equal(sget(log, "error"), "");
    assert_string_equal(sget(log, "loglevel"), "warning");
    assert_true(json_is_false(json_object_get(log, "dnsLog")));

    /* outbounds untouched */
    json_t *panel_root = json_loads(panel, 0, NULL);
    assert_true(
        json_equal(json_object_get(r, "outbounds"), json_object_get(panel_root, "outbounds")));

    /* §18 #34: excluded inbounds come out exactly as sent (keys, clients, order) */
    for (int k = 0; k < 2; k++) {
        json_t *orig = NULL;
        json_array_foreach(json_object_get(panel_root, "inbounds"), i, in)
        {
            if (strcmp(sget(in, "tag"), xray_excluded[k]) == 0)
                orig = in;
        }
        assert_non_null(orig);
        json_t *got = inbound(r, xray_excluded[k]);
        assert_true(json_equal(got, orig));
        char kg[512], ko[512];
        keys_of(got, kg, sizeof kg);
        keys_of(orig, ko, sizeof ko);
        assert_string_equal(kg, ko);
    }
    assert_null(client(r, "EXCLUDED VLESS", "1"));
    assert_non_null(client(r, "EXCLUDED VLESS", "keep@me"));
    json_decref(panel_root);

    /* inbound descriptions, in output order without the API inbound */
    static const struct {
        const char *tag;
        enum pn_inbound_kind kind;
        bool excluded;
        const char *flow, *method;
    } want_info[] = {
        {"VMESS TCP", PN_IN_VMESS, false, "", ""},
        {"VLESS TCP REALITY", PN_IN_VLESS, false, "xtls-rprx-vision", ""},
        {"TROJAN WS", PN_IN_TROJAN, false, "", ""},
        {"SS AES", PN_IN_SHADOWSOCKS, false, "", "aes-256-gcm"},
        {"SS 2022", PN_IN_SS2022, false, "", "2022-blake3-aes-128-gcm"},
        {"SS 2022 256", PN_IN_SS2022, false, "", "2022-blake3-aes-256-gcm"},
        {"HYSTERIA", PN_IN_HYSTERIA, false, "", ""},
        {"SOCKS LOCAL", PN_IN_OTHER, false, "", ""},
        {"EXCLUDED VLESS", PN_IN_VLESS, true, "", ""},
        {"EXCLUDED DOKODEMO", PN_IN_OTHER, true, "", ""},
    };
    assert_int_equal(b.cc.ninbounds, 10);
    for (size_t k = 0; k < 10; k++) {
        const struct pn_inbound_info *ii = &b.cc.inbounds[k];
        assert_string_equal(ii->tag, want_info[k].tag);
        assert_int_equal(ii->kind, want_info[k].kind);
        assert_int_equal(ii->excluded, want_info[k].excluded);
        assert_string_equal(ii->flow, want_info[k].flow);
        assert_string_equal(ii->ss_method, want_info[k].method);
        assert_null(ii->single_email);
        assert_ptr_equal(pn_coreconf_inbound(&b.cc, ii->tag), ii);
    }
    assert_null(pn_coreconf_inbound(&b.cc, "API_INBOUND"));
    assert_null(pn_coreconf_inbound(&b.cc, "nonexistent"));

    built_free(&b);
    pn_userset_free(users);
    free(panel);
}

/* ---- Xray: §10 client entries ---- */

static void test_xray_clients(void **state)
{
    (void)state;
    char *panel = slurp("panel_xray.json");
    struct pn_userset *users = xray_users();
    struct built b;
    struct capture cap;
    capture_start(&cap);
    build_ok(panel, &xray, xray_excluded, 2, users, &b);
    char *log = capture_end(&cap);
    json_t *r = b.root;
    json_t *c;

    /* vmess: canonical lower-case id; invalid id skipped; the panel's stale client gone */
    assert_int_equal(json_array_size(clients(r, "VMESS TCP")), 1);
    c = client(r, "VMESS TCP", "1");
    assert_keys(c, "email,level,id");
    assert_int_equal(json_integer_value(json_object_get(c, "level")), 0);
    assert_string_equal(sget(c, "id"), "0b8c7a52-1234-4abc-8def-0123456789ab");
    assert_null(client(r, "VMESS TCP", "stale"));

    /* vless: flow always present, the user's own in the file (§10) */
    assert_int_equal(json_array_size(clients(r, "VLESS TCP REALITY")), 3);
    c = client(r, "VLESS TCP REALITY", "1");
    assert_keys(c, "email,level,id,flow");
    assert_string_equal(sget(c, "id"), "5a2d0d5e-9c39-4a39-8f6a-3ff5a8a3c4d1");
    assert_string_equal(sget(c, "flow"), "");
    assert_string_equal(sget(client(r, "VLESS TCP REALITY", "2.bob"), "flow"), "xtls-rprx-vision");
    assert_string_equal(sget(json_object_get(inbound(r, "VLESS TCP REALITY"), "settings"), "flow"),
                        "xtls-rprx-vision");
    /* clients come in email order */
    assert_string_equal(sget(json_array_get(clients(r, "VLESS TCP REALITY"), 0), "email"), "1");
    assert_string_equal(sget(json_array_get(clients(r, "VLESS TCP REALITY"), 2), "email"), "3");

    /* trojan (§18 #18): present+password in; absent out; empty skipped (§17 #10); dup tag once */
    c = client(r, "TROJAN WS", "1");
    assert_keys(c, "email,level,password");
    assert_string_equal(sget(c, "password"), "trojan-secret-1");
    assert_null(client(r, "TROJAN WS", "2.bob"));
    assert_null(client(r, "TROJAN WS", "3"));
    assert_null(client(r, "TROJAN WS", "4")); /* not listed */
    assert_non_null(client(r, "TROJAN WS", "5"));
    assert_int_equal(json_array_size(clients(r, "TROJAN WS")), 2);

    /* classic shadowsocks: inbound method when the user has none, user's own otherwise,
     * unknown methods rejected (§17 #11, §18 #32) */
    c = client(r, "SS AES", "1");
    assert_keys(c, "email,level,password,method");
    assert_string_equal(sget(c, "password"), "ss-secret-1");
    assert_string_equal(sget(c, "method"), "aes-256-gcm");
    assert_string_equal(sget(client(r, "SS AES", "2.bob"), "method"), "aes-128-gcm");
    assert_null(client(r, "SS AES", "3"));
    assert_null(strstr(b.cc.json, "\"method\":\"none\"")); /* never turned into none */

    /* SS-2022 (§18 #31) */
    char k16[64], k32[64];
    derived_key("raw-password", 16, k16);
    derived_key("raw-password", 32, k32);
    assert_int_equal(strlen(k16), 24);
    assert_int_equal(strlen(k32), 44);
    c = client(r, "SS 2022", "3");
    assert_keys(c, "email,level,password");
    assert_string_equal(sget(c, "password"), k16);
    assert_string_equal(sget(client(r, "SS 2022 256", "3"), "password"), k32);
    /* a fixed vector, independent of OpenSSL: python3 hashlib + base64 */
    assert_string_equal(k32, "cCnp7RD+kp+AwxoLnlcg6NzjFcO5wk3FcztEIjLRDJM=");
    assert_string_equal(sget(client(r, "SS 2022", "4"), "password"), "ABEiM0RVZneImaq7zN3u/w==");
    derived_key("ABEiM0RVZneImaq7zN3u/w==", 32, k32); /* wrong length for -256: derived */
    assert_string_equal(sget(client(r, "SS 2022 256", "4"), "password"), k32);
    /* the derived key decodes to the key length */
    unsigned char raw[64];
    assert_int_equal(EVP_DecodeBlock(raw, (const unsigned char *)k16, 24), 18); /* 16 + 2 pad */
    /* server PSK untouched */
    assert_string_equal(sget(json_object_get(inbound(r, "SS 2022"), "settings"), "password"),
                        "AAAAAAAAAAAAAAAAAAAAAA==");

    /* hysteria: auth; empty auth skipped; absent sub-message silent */
    c = client(r, "HYSTERIA", "1");
    assert_keys(c, "email,level,auth");
    assert_string_equal(sget(c, "auth"), "hy-secret-1");
    assert_int_equal(json_array_size(clients(r, "HYSTERIA")), 1);

    /* non-user protocols get clients [] too (§9.8) */
    assert_int_equal(json_array_size(clients(r, "SOCKS LOCAL")), 0);
    assert_string_equal(sget(json_object_get(inbound(r, "SOCKS LOCAL"), "settings"), "auth"),
                        "noauth");

    /* warnings: per inbound, with emails, never secrets */
    assert_non_null(
        strstr(log, "inbound VMESS TCP: 1 user(s) skipped: invalid UUID (first: 2.bob)"));
    assert_non_null(strstr(log, "inbound TROJAN WS: 1 user(s) skipped: empty password/auth"));
    assert_non_null(strstr(log, "inbound SS AES: 1 user(s) skipped: unsupported shadowsocks method "
                                "(first: 3)"));
    assert_non_null(strstr(log, "inbound HYSTERIA: 1 user(s) skipped: empty password/auth"));
    assert_null(strstr(log, "secret"));
    assert_null(strstr(log, "not-a-uuid"));
    assert_null(strstr(log, "raw-password"));
    free(log);

    built_free(&b);
    pn_userset_free(users);
    free(panel);
}

/* The config path and pn_coreconf_account share one rule: whatever the API
 * path would add is exactly what the file holds (except the vless flow,
 * which the API path takes from the inbound: §18 #30). */
static void test_account_agrees(void **state)
{
    (void)state;
    char *panel = slurp("panel_xray.json");
    struct pn_userset *users = xray_users();
    struct built b;
    build_ok(panel, &xray, xray_excluded, 2, users, &b);
    const char *emails[] = {"1", "2.bob", "3", "4", "5"};
    char scratch[PN_COREACCT_SCRATCH];
    for (size_t k = 0; k < b.cc.ninbounds; k++) {
        const struct pn_inbound_info *in = &b.cc.inbounds[k];
        for (size_t e = 0; e < 5; e++) {
            const struct pn_user *u = pn_userset_get(users, emails[e]);
            struct pn_core_account a;
            bool ok = pn_coreconf_account(in, u, &xray, &a, scratch, sizeof scratch);
            if (in->excluded) {
                assert_false(ok);
                continue;
            }
            json_t *c = in->kind == PN_IN_OTHER ? NULL : client(b.root, in->tag, u->email);
            assert_int_equal(ok, c != NULL);
            if (!ok)
                continue;
            switch (a.proto) {
            case PN_CORE_PROTO_VMESS:
                assert_int_equal(in->kind, PN_IN_VMESS);
                assert_string_equal(a.id, sget(c, "id"));
                break;
            case PN_CORE_PROTO_VLESS:
                assert_string_equal(a.id, sget(c, "id"));
                /* §18 #30: the inbound's flow wins for API-added users */
                assert_string_equal(a.flow, "xtls-rprx-vision");
                break;
            case PN_CORE_PROTO_TROJAN:
                assert_string_equal(a.password, sget(c, "password"));
                break;
            case PN_CORE_PROTO_SHADOWSOCKS:
                assert_string_equal(a.password, sget(c, "password"));
                assert_string_equal(a.method, sget(c, "method"));
                break;
            case PN_CORE_PROTO_SS2022:
                assert_string_equal(a.key, sget(c, "password"));
                break;
            case PN_CORE_PROTO_HYSTERIA:
                assert_string_equal(a.auth, sget(c, "auth"));
                break;
            }
        }
    }
    /* a too-small scratch is refused, not overrun */
    struct pn_core_account a;
    assert_false(pn_coreconf_account(pn_coreconf_inbound(&b.cc, "VMESS TCP"),
                                     pn_userset_get(users, "1"), &xray, &a, scratch, 16));
    built_free(&b);
    pn_userset_free(users);
    free(panel);
}

/* §18 #30 without a configured flow: the user's own flow is kept; on v2ray
 * no flow at all. */
static void test_flow_api(void **state)
{
    (void)state;
    struct pn_inbound_info in = {.tag = "V", .kind = PN_IN_VLESS, .flow = "", .ss_method = ""};
    struct pn_user *u = user("e");
    set_vless(u, "6F2C9F0E-1111-4222-8333-944445555666", "xtls-rprx-vision");
    pn_user_add_inbound(u, "V");
    struct pn_core_account a;
    char scratch[PN_COREACCT_SCRATCH];
    assert_true(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    assert_int_equal(a.proto, PN_CORE_PROTO_VLESS);
    assert_string_equal(a.id, "6f2c9f0e-1111-4222-8333-944445555666");
    assert_string_equal(a.flow, "xtls-rprx-vision");
    in.flow = "xtls-rprx-vision-udp443";
    assert_true(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    assert_string_equal(a.flow, "xtls-rprx-vision-udp443");
    assert_true(pn_coreconf_account(&in, u, &v2ray, &a, scratch, sizeof scratch));
    assert_string_equal(a.flow, "");
    /* not listed, excluded, absent */
    in.tag = "W";
    assert_false(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    in.tag = "V";
    in.excluded = true;
    assert_false(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    in.excluded = false;
    u->has_vless = false;
    assert_false(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    pn_user_free(u);
}

/* §17 #11, §18 #32, and `none` after Xray 26.7.11. */
static void test_ss_methods(void **state)
{
    (void)state;
    struct pn_inbound_info in = {
        .tag = "S", .kind = PN_IN_SHADOWSOCKS, .flow = "", .ss_method = "chacha20-poly1305"};
    struct pn_user *u = user("e");
    set_ss(u, "pw", "");
    pn_user_add_inbound(u, "S");
    struct pn_core_account a;
    char scratch[PN_COREACCT_SCRATCH];
    static const struct {
        const char *method;
        const struct pn_core_version *core;
        const char *want; /* NULL = rejected */
    } cases[] = {
        {"", &xray, "chacha20-poly1305"},
        {"aes-128-gcm", &xray, "aes-128-gcm"},
        {"AES-256-GCM", &xray, "aes-256-gcm"},
        {"chacha20-ietf-poly1305", &xray, "chacha20-ietf-poly1305"},
        {"xchacha20-ietf-poly1305", &xray, "xchacha20-ietf-poly1305"},
        {"none", &xray, "none"},
        {"none", &xray_new, NULL},
        {"plain", &xray_new, NULL},
        {"rc4-md5", &xray, NULL},
        {"aes-256-cfb", &xray, NULL},
        {"2022-blake3-aes-128-gcm", &xray, NULL},
        {"xchacha20-poly1305", &v2ray, NULL},
        {"none", &v2ray, "none"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        free(u->ss_method);
        u->ss_method = pn_strdup(cases[i].method);
        in.kind = cases[i].core->kind == PN_CORE_V2RAY ? PN_IN_SS_SINGLE : PN_IN_SHADOWSOCKS;
        bool ok = pn_coreconf_account(&in, u, cases[i].core, &a, scratch, sizeof scratch);
        if (!cases[i].want) {
            assert_false(ok);
            continue;
        }
        assert_true(ok);
        assert_int_equal(a.proto, PN_CORE_PROTO_SHADOWSOCKS);
        assert_string_equal(a.method, cases[i].want);
        assert_string_equal(a.password, "pw");
    }
    /* the inbound's method unknown and the user's empty: rejected */
    free(u->ss_method);
    u->ss_method = pn_strdup("");
    in.kind = PN_IN_SHADOWSOCKS;
    in.ss_method = "";
    assert_false(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    in.ss_method = "salsa20";
    assert_false(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    pn_user_free(u);
}

/* §18 #31 on the API path, including the key length rules. */
static void test_ss2022_key(void **state)
{
    (void)state;
    char method[64];
    struct pn_inbound_info in = {.tag = "S", .kind = PN_IN_SS2022, .flow = "", .ss_method = method};
    struct pn_user *u = user("e");
    pn_user_add_inbound(u, "S");
    struct pn_core_account a;
    char scratch[PN_COREACCT_SCRATCH], want[64];
    static const struct {
        const char *method, *password;
        size_t keylen;
        bool kept;
    } cases[] = {
        {"2022-blake3-aes-128-gcm", "hunter2", 16, false},
        {"2022-blake3-aes-128-gcm", "ABEiM0RVZneImaq7zN3u/w==", 16, true},
        {"2022-blake3-aes-128-gcm", "ABEiM0RVZneImaq7zN3u/w", 16, false},   /* unpadded */
        {"2022-blake3-aes-128-gcm", "ABEiM0RVZneImaq7zN3u/w=A", 16, false}, /* bad padding */
        {"2022-blake3-aes-128-gcm", "ABEiM0RVZneImaq7zN3u-w==", 16, false}, /* URL alphabet */
        {"2022-blake3-aes-256-gcm", "ABEiM0RVZneImaq7zN3u/w==", 32, false},
        {"2022-blake3-aes-256-gcm", "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=", 32, true},
        {"2022-blake3-chacha20-poly1305", "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=", 32, true},
        {"2022-blake3-chacha20-poly1305", "x", 32, false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(method, sizeof method, "%s", cases[i].method);
        set_ss(u, cases[i].password, "");
        assert_true(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
        assert_int_equal(a.proto, PN_CORE_PROTO_SS2022);
        if (cases[i].kept) {
            assert_string_equal(a.key, cases[i].password);
        } else {
            derived_key(cases[i].password, cases[i].keylen, want);
            assert_string_equal(a.key, want);
        }
        free(u->ss_password);
        free(u->ss_method);
    }
    /* empty password: skipped */
    set_ss(u, "", "");
    assert_false(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    pn_user_free(u);
}

/* §17 #10 on the API path: empty secrets are skipped and logged without
 * anything secret; non-UTF-8 secrets are refused. */
static void test_empty_secrets(void **state)
{
    (void)state;
    struct pn_user *u = user("42");
    set_trojan(u, "");
    set_ss(u, "", "aes-128-gcm");
    set_hy(u, "");
    pn_user_add_inbound(u, "T");
    struct pn_core_account a;
    char scratch[PN_COREACCT_SCRATCH];
    enum pn_inbound_kind kinds[] = {PN_IN_TROJAN, PN_IN_SHADOWSOCKS, PN_IN_SS2022, PN_IN_HYSTERIA};
    struct capture cap;
    capture_start(&cap);
    for (size_t i = 0; i < 4; i++) {
        struct pn_inbound_info in = {
            .tag = "T", .kind = kinds[i], .flow = "", .ss_method = "2022-blake3-aes-128-gcm"};
        if (kinds[i] == PN_IN_SHADOWSOCKS)
            in.ss_method = "aes-128-gcm";
        assert_false(pn_coreconf_account(&in, u, &xray, &a, scratch, sizeof scratch));
    }
    char *log = capture_end(&cap);
    assert_non_null(strstr(log, "user 42 not added to inbound T: empty password/auth"));
    free(log);
    /* invalid UTF-8 in a secret */
    free(u->trojan_password);
    u->trojan_password = pn_strdup("ab\xff");
    struct pn_inbound_info tin = {.tag = "T", .kind = PN_IN_TROJAN, .flow = "", .ss_method = ""};
    assert_false(pn_coreconf_account(&tin, u, &xray, &a, scratch, sizeof scratch));
    free(u->trojan_password);
    u->trojan_password = pn_strdup("p\xc3\xa4ss");
    assert_true(pn_coreconf_account(&tin, u, &xray, &a, scratch, sizeof scratch));
    pn_user_free(u);
}

/* §18 #33: no blackhole → no guard; routing, log and policy created when
 * absent; metrics only with a port; system present → inbound stats on. */
static void test_minimal_config(void **state)
{
    (void)state;
    const char *panel = "{\"inbounds\":[{\"tag\":\"in\",\"port\":1,\"protocol\":\"vless\","
                        "\"settings\":{\"decryption\":\"none\"}}],"
                        "\"outbounds\":[{\"protocol\":\"freedom\"},{\"protocol\":\"blackhole\"}],"
                        "\"policy\":{\"system\":{\"statsInboundUplink\":false}},"
                        "\"routing\":{\"rules\":[{\"type\":\"field\",\"outboundTag\":\"API\"}]}}";
    struct pn_coreconf_opts o = {
        .panel_json = panel, .panel_len = strlen(panel), .core = xray, .api_port = 1000};
    struct pn_coreconf cc;
    char err[256];
    assert_int_equal(pn_coreconf_build(&o, &cc, err, sizeof err), PN_OK);
    json_t *r = json_loads(cc.json, 0, NULL);
    assert_non_null(r);
    json_t *rules = json_object_get(json_object_get(r, "routing"), "rules");
    assert_int_equal(json_array_size(rules), 1); /* API rule only: the blackhole has no tag */
    const char *src[] = {"127.0.0.1", "::1"};
    assert_strings(json_object_get(json_array_get(rules, 0), "source"), src, 2);
    assert_null(json_object_get(r, "metrics"));
    assert_int_equal(cc.metrics_port, 0);
    assert_false(cc.has_observatory);
    assert_false(cc.stats_user_online);
    json_t *want = json_pack("{s:s}", "loglevel", "info");
    assert_true(json_equal(json_object_get(r, "log"), want));
    json_decref(want);
    json_t *sys = json_object_get(json_object_get(r, "policy"), "system");
    assert_keys(sys, "statsInboundUplink,statsInboundDownlink,statsOutboundUplink,"
                     "statsOutboundDownlink");
    assert_true(json_is_true(json_object_get(sys, "statsInboundUplink")));
    assert_int_equal(json_array_size(clients(r, "in")), 0);
    json_decref(r);
    pn_coreconf_free(&cc);

    /* keys match case-insensitively, as Go's encoding/json reads them */
    panel = "{\"FakeDNS\":[{\"ipPool\":\"198.18.0.0/15\"}],\"Transport\":{},"
            "\"inbounds\":[{\"Tag\":\"a\",\"PROTOCOL\":\"vmess\",\"StreamSettings\":{},"
            "\"Fallbacks\":[]}]}";
    o.panel_json = panel;
    o.panel_len = strlen(panel);
    assert_int_equal(pn_coreconf_build(&o, &cc, err, sizeof err), PN_OK);
    r = json_loads(cc.json, 0, NULL);
    assert_non_null(json_object_get(r, "fakeDns"));
    assert_null(json_object_get(r, "Transport"));
    assert_keys(json_array_get(json_object_get(r, "inbounds"), 1),
                "tag,protocol,streamSettings,settings");
    assert_int_equal(cc.inbounds[0].kind, PN_IN_VMESS);
    json_decref(r);
    pn_coreconf_free(&cc);

    /* an empty object gets everything it needs */
    o.panel_json = "{}";
    o.panel_len = 2;
    assert_int_equal(pn_coreconf_build(&o, &cc, err, sizeof err), PN_OK);
    r = json_loads(cc.json, 0, NULL);
    assert_keys(r, "inbounds,routing,policy,api,stats,log");
    assert_int_equal(json_array_size(json_object_get(r, "inbounds")), 1);
    assert_int_equal(cc.ninbounds, 0);
    json_decref(r);
    pn_coreconf_free(&cc);
}

/* Client lists are spliced into the printed tree as text: emails with
 * quotes, backslashes, control characters and non-ASCII survive the round
 * trip; a panel string that looks like the placeholder prefix stays as it
 * is; lists of several inbounds land in their own inbounds. */
static void test_clients_as_text(void **state)
{
    (void)state;
    const char *panel = "{\"inbounds\":[{\"tag\":\"a\",\"protocol\":\"vless\",\"settings\":{}},"
                        "{\"tag\":\"pn-clients-0\",\"protocol\":\"trojan\",\"settings\":{}},"
                        "{\"tag\":\"c\",\"protocol\":\"vless\"}],"
                        "\"dns\":{\"hosts\":{\"pn-clients-1\":\"pn-clients-2\"}}}";
    static const char *const emails[] = {"plain", "q\"uo\\te", "ctl\x01\x1f\t\n", "\xc3\xa9t\xc3\xa9"};
    struct pn_userset *users = pn_userset_new();
    for (size_t i = 0; i < 4; i++) {
        struct pn_user *u = user(emails[i]);
        set_vless(u, "5a2d0d5e-9c39-4a39-8f6a-3ff5a8a3c4d1", "");
        u->has_trojan = true;
        u->trojan_password = pn_strdup(emails[i]);
        pn_user_add_inbound(u, "a");
        pn_user_add_inbound(u, "pn-clients-0");
        if (i == 0)
            pn_user_add_inbound(u, "c");
        pn_userset_put(users, u);
    }
    struct pn_coreconf_opts o = {.panel_json = panel,
                                 .panel_len = strlen(panel),
                                 .core = xray,
                                 .api_port = 1000,
                                 .users = users};
    struct pn_coreconf cc;
    char err[256];
    assert_int_equal(pn_coreconf_build(&o, &cc, err, sizeof err), PN_OK);
    assert_int_equal(strlen(cc.json), cc.json_len);
    json_t *r = json_loads(cc.json, 0, NULL);
    assert_non_null(r);
    assert_int_equal(json_array_size(clients(r, "a")), 4);
    assert_int_equal(json_array_size(clients(r, "pn-clients-0")), 4);
    assert_int_equal(json_array_size(clients(r, "c")), 1);
    for (size_t i = 0; i < 4; i++) {
        json_t *c = client(r, "a", emails[i]);
        assert_non_null(c);
        assert_keys(c, "email,level,id,flow");
        assert_string_equal(sget(client(r, "pn-clients-0", emails[i]), "password"), emails[i]);
    }
    json_t *hosts = json_object_get(json_object_get(r, "dns"), "hosts");
    assert_string_equal(sget(hosts, "pn-clients-1"), "pn-clients-2");
    /* the text is what jansson prints for the same tree */
    char *again = json_dumps(r, JSON_COMPACT);
    assert_string_equal(again, cc.json);
    free(again);
    json_decref(r);
    pn_coreconf_free(&cc);
    pn_userset_free(users);
}

static void test_invalid_json(void **state)
{
    (void)state;
    char err[256];
    assert_int_equal(build_err("{\"inbounds\": [}", err, sizeof err), PN_ERR_INVAL);
    assert_non_null(strstr(err, "invalid config JSON: line 1 column "));
    assert_int_equal(build_err("{\n  \"log\": {},\n  \"inbounds\": ]\n}", err, sizeof err),
                     PN_ERR_INVAL);
    assert_non_null(strstr(err, "invalid config JSON: line 3 column "));
    assert_int_equal(build_err("", err, sizeof err), PN_ERR_INVAL);
    assert_non_null(strstr(err, "invalid config JSON: line 1"));
    /* duplicate keys are allowed (the last wins) */
    struct built b;
    build_ok("{\"log\":1,\"log\":{\"loglevel\":\"debug\"}}", &xray, NULL, 0, NULL, &b);
    assert_string_equal(sget(json_object_get(b.root, "log"), "loglevel"), "debug");
    built_free(&b);

    static const struct {
        const char *json, *want;
    } shapes[] = {
        {"[]", "config: top level must be an object"},
        {"\"x\"", "config: top level must be an object"},
        {"{\"inbounds\":{}}", "config: inbounds must be an array"},
        {"{\"inbounds\":[1]}", "config: inbounds[0] must be an object"},
        {"{\"inbounds\":[{\"tag\":5}]}", "config: inbounds[0].tag must be a string"},
        {"{\"inbounds\":[{\"tag\":\"a\",\"settings\":[]}]}",
         "config: inbounds[0].settings must be an object"},
        {"{\"outbounds\":\"x\"}", "config: outbounds must be an array"},
        {"{\"outbounds\":[[]]}", "config: outbounds[0] must be an object"},
        {"{\"routing\":[]}", "config: routing must be an object"},
        {"{\"routing\":{\"rules\":{}}}", "config: routing.rules must be an array"},
        {"{\"routing\":{\"rules\":[{},2]}}", "config: routing.rules[1] must be an object"},
        {"{\"policy\":1}", "config: policy must be an object"},
        {"{\"policy\":{\"levels\":[]}}", "config: policy.levels must be an object"},
        {"{\"policy\":{\"levels\":{\"0\":true}}}", "config: policy.levels.0 must be an object"},
        {"{\"policy\":{\"system\":1}}", "config: policy.system must be an object"},
        {"{\"log\":\"x\"}", "config: log must be an object"},
        {"{\"observatory\":[]}", "config: observatory must be an object"},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        err[0] = '\0';
        assert_int_equal(build_err(shapes[i].json, err, sizeof err), PN_ERR_INVAL);
        assert_string_equal(err, shapes[i].want);
    }
    /* an excluded inbound's settings are not inspected */
    const char *panel = "{\"inbounds\":[{\"tag\":\"x\",\"settings\":[1]}]}";
    const char *ex[] = {"x"};
    struct pn_coreconf_opts o = {.panel_json = panel,
                                 .panel_len = strlen(panel),
                                 .exclude = ex,
                                 .nexclude = 1,
                                 .core = xray,
                                 .api_port = 1};
    struct pn_coreconf cc;
    assert_int_equal(pn_coreconf_build(&o, &cc, err, sizeof err), PN_OK);
    assert_non_null(strstr(cc.json, "{\"tag\":\"x\",\"settings\":[1]}"));
    pn_coreconf_free(&cc);
}

/* ---- v2ray 4.34 ---- */

static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    socklen_t len = sizeof sa;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

/* Runs `/usr/bin/v2ray -test -config stdin:` on json; returns its exit code. */
static int v2ray_test(const char *json)
{
    if (access("/usr/bin/v2ray", X_OK) != 0)
        fail_msg("/usr/bin/v2ray missing: apt-get install v2ray");
    char out[] = "/tmp/pn_test_coreconf_XXXXXX";
    int fd = mkstemp(out);
    assert_true(fd >= 0);
    close(fd);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "/usr/bin/v2ray -test -config stdin: >%s 2>&1", out);
    FILE *p = popen(cmd, "w");
    assert_non_null(p);
    fputs(json, p);
    int st = pclose(p);
    assert_true(WIFEXITED(st));
    if (WEXITSTATUS(st) != 0) {
        FILE *f = fopen(out, "r");
        char line[512];
        while (f && fgets(line, sizeof line, f))
            fprintf(stderr, "v2ray: %s", line);
        if (f)
            fclose(f);
    }
    unlink(out);
    return WEXITSTATUS(st);
}

static void test_v2ray(void **state)
{
    (void)state;
    /* the fixture with free loopback ports */
    char *text = slurp("panel_v2ray.json");
    json_t *pj = json_loads(text, 0, NULL);
    free(text);
    assert_non_null(pj);
    size_t i;
    json_t *in;
    json_array_foreach(json_object_get(pj, "inbounds"), i, in)
    {
        json_object_set_new(in, "port", json_integer(free_port()));
    }
    char *panel = json_dumps(pj, 0);
    json_decref(pj);

    const char *tags[] = {"vmess-in", "vless-in", "trojan-in", "ss-in", NULL};
    struct pn_userset *users = pn_userset_new();
    struct pn_user *u = user("20");
    set_vmess(u, "A1B2C3D4-0000-4000-8000-000000000001");
    set_vless(u, "a1b2c3d4-0000-4000-8000-000000000002", "xtls-rprx-vision");
    set_trojan(u, "t20");
    set_ss(u, "s20", "");
    add_all(u, tags);
    pn_userset_put(users, u);
    u = user("100"); /* "100" < "20": takes the single shadowsocks slot */
    set_vless(u, "a1b2c3d4-0000-4000-8000-000000000003", "");
    set_ss(u, "s100", "AES-128-GCM");
    add_all(u, tags);
    pn_userset_put(users, u);
    u = user("099"); /* xchacha is not a v2ray cipher: not eligible, though it sorts first */
    set_ss(u, "s99", "xchacha20-poly1305");
    add_all(u, tags);
    pn_userset_put(users, u);

    struct built b;
    struct capture cap;
    capture_start(&cap);
    build_ok(panel, &v2ray, NULL, 0, users, &b);
    char *log = capture_end(&cap);
    json_t *r = b.root;

    assert_null(json_object_get(r, "metrics"));
    assert_null(json_object_get(r, "burstObservatory"));
    assert_non_null(json_object_get(r, "observatory"));
    assert_int_equal(b.cc.metrics_port, 0);
    assert_false(b.cc.has_observatory);
    assert_false(b.cc.stats_user_online);
    assert_null(strstr(b.cc.json, "statsUserOnline"));
    json_t *pol = json_object_get(r, "policy");
    assert_int_equal(json_integer_value(json_object_get(
                         json_object_get(json_object_get(pol, "levels"), "1"), "handshake")),
                     4);
    json_t *sys = json_object_get(pol, "system");
    assert_true(json_is_true(json_object_get(sys, "statsInboundUplink")));
    assert_true(json_is_true(json_object_get(sys, "statsInboundDownlink")));
    assert_true(json_is_true(json_object_get(sys, "statsOutboundUplink")));

    json_t *c = client(r, "vmess-in", "20");
    assert_keys(c, "email,level,id,alterId");
    assert_string_equal(sget(c, "id"), "a1b2c3d4-0000-4000-8000-000000000001");
    assert_int_equal(json_integer_value(json_object_get(c, "alterId")), 0);
    c = client(r, "vless-in", "20");
    assert_keys(c, "email,level,id");
    assert_string_equal(sget(json_object_get(inbound(r, "vless-in"), "settings"), "decryption"),
                        "none");
    assert_int_equal(json_array_size(clients(r, "vless-in")), 2);
    assert_keys(client(r, "trojan-in", "20"), "email,level,password");

    /* single-user shadowsocks */
    json_t *ss = json_object_get(inbound(r, "ss-in"), "settings");
    assert_null(json_object_get(ss, "clients"));
    assert_string_equal(sget(ss, "method"), "aes-128-gcm");
    assert_string_equal(sget(ss, "password"), "s100");
    assert_string_equal(sget(ss, "email"), "100");
    assert_int_equal(json_integer_value(json_object_get(ss, "level")), 0);
    assert_string_equal(sget(ss, "network"), "tcp,udp");
    const struct pn_inbound_info *ii = pn_coreconf_inbound(&b.cc, "ss-in");
    assert_int_equal(ii->kind, PN_IN_SS_SINGLE);
    assert_string_equal(ii->single_email, "100");
    assert_non_null(strstr(log, "inbound ss-in: v2ray shadowsocks takes one user (100); 1 other"));
    assert_non_null(strstr(log, "unsupported shadowsocks method (first: 099)"));
    free(log);
    /* ss-empty: nobody placed, closed with a random password */
    json_t *se = json_object_get(inbound(r, "ss-empty"), "settings");
    assert_int_equal(strlen(sget(se, "password")), 44);
    assert_string_equal(sget(se, "method"), "aes-128-gcm");
    assert_null(json_object_get(se, "email"));
    assert_null(pn_coreconf_inbound(&b.cc, "ss-empty")->single_email);
    /* non-user protocols */
    assert_int_equal(json_array_size(clients(r, "socks-in")), 0);
    assert_int_equal(json_array_size(clients(r, "http-in")), 0);
    /* geoip:private as CIDRs (no geoip.dat on Debian) */
    assert_null(strcasestr(b.cc.json, "geoip:"));
    json_t *rules = json_object_get(json_object_get(r, "routing"), "rules");
    assert_string_equal(sget(json_array_get(rules, 1), "ruleTag"),
                        "PG_NODE_MALFORMED_DOMAIN_GUARD");
    assert_string_equal(sget(json_array_get(rules, 1), "outboundTag"), "block");

    /* the API path: SS_SINGLE qualification as for the file */
    char scratch[PN_COREACCT_SCRATCH];
    struct pn_core_account a;
    assert_true(
        pn_coreconf_account(ii, pn_userset_get(users, "20"), &v2ray, &a, scratch, sizeof scratch));
    assert_int_equal(a.proto, PN_CORE_PROTO_SHADOWSOCKS);
    assert_false(
        pn_coreconf_account(ii, pn_userset_get(users, "099"), &v2ray, &a, scratch, sizeof scratch));

    /* the real core accepts it */
    assert_int_equal(v2ray_test(b.cc.json), 0);
    /* and the check can fail: vless without decryption is refused by 4.34 */
    assert_int_not_equal(
        v2ray_test("{\"inbounds\":[{\"port\":1,\"listen\":\"127.0.0.1\",\"protocol\":\"vless\","
                   "\"settings\":{\"clients\":[]}}]}"),
        0);

    built_free(&b);
    pn_userset_free(users);
    free(panel);
}

/* 100k vless users: built and checked, time printed (bench/ measures). */
static void test_100k(void **state)
{
    (void)state;
    enum { N = 100000 };
    char *panel = slurp("panel_xray.json");
    struct pn_userset *users = pn_userset_new();
    char email[32], id[40];
    for (int i = 0; i < N; i++) {
        snprintf(email, sizeof email, "%d", i);
        snprintf(id, sizeof id, "%08x-0000-4000-8000-%012x", i, i);
        struct pn_user *u = user(email);
        set_vless(u, id, "");
        pn_user_add_inbound(u, "VLESS TCP REALITY");
        pn_userset_put(users, u);
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct pn_coreconf_opts o = {.panel_json = panel,
                                 .panel_len = strlen(panel),
                                 .core = xray,
                                 .api_port = API_PORT,
                                 .users = users};
    struct pn_coreconf cc;
    char err[256];
    assert_int_equal(pn_coreconf_build(&o, &cc, err, sizeof err), PN_OK);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("# 100k vless users: build %.1f ms, %zu bytes\n",
           (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6,
           cc.json_len);
    json_t *r = json_loads(cc.json, 0, NULL);
    assert_non_null(r);
    json_t *cl = clients(r, "VLESS TCP REALITY");
    assert_int_equal(json_array_size(cl), N);
    assert_string_equal(sget(json_array_get(cl, 0), "email"), "0");
    json_decref(r);
    pn_coreconf_free(&cc);
    pn_userset_free(users);
    free(panel);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_xray_config),    cmocka_unit_test(test_xray_clients),
        cmocka_unit_test(test_account_agrees), cmocka_unit_test(test_flow_api),
        cmocka_unit_test(test_ss_methods),     cmocka_unit_test(test_ss2022_key),
        cmocka_unit_test(test_empty_secrets),  cmocka_unit_test(test_minimal_config),
        cmocka_unit_test(test_clients_as_text),
        cmocka_unit_test(test_invalid_json),   cmocka_unit_test(test_v2ray),
        cmocka_unit_test(test_100k),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
