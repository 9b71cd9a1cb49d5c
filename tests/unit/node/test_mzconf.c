/* The Marzban config rewrite (spec/marzban.md §7) against a Marzban
 * 0.8-style panel config (tests/data/mzconf): acceptance cases 22-28 of
 * §13, every removal (adjacent matches, §10 row 8), routing kept when rules
 * are missing (§10 row 9), the node's own loopback API inbound, numbers
 * and non-ASCII text byte-exact, placeholder collisions, decode errors and
 * their positions, a 50 MB config (time printed, not asserted), and a real
 * `v2ray -test` of the output. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <jansson.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/err.h"
#include "node/mzconf.h"

#ifndef PN_TEST_DATA
#define PN_TEST_DATA "tests/data"
#endif

#define PREFIX "Failed to decode config: "
#define API_INBOUND_AT(host, port, cert, key)                                                      \
    "{\"listen\":\"" host "\",\"port\":" port ",\"protocol\":\"dokodemo-door\",\"settings\":"      \
    "{\"address\":\"127.0.0.1\"},\"streamSettings\":{\"security\":\"tls\",\"tlsSettings\":"        \
    "{\"certificates\":[{\"certificateFile\":\"" cert "\",\"keyFile\":\"" key "\"}]}},"            \
    "\"tag\":\"API_INBOUND\"}"
#define CERT "/var/lib/marzban-node/ssl_cert.pem"
#define KEY "/var/lib/marzban-node/ssl_key.pem"
/* What the tests' default options produce. */
#define API_IN API_INBOUND_AT("0.0.0.0", "62051", CERT, KEY)
#define API_RULE_FOR(peer)                                                                         \
    "{\"inboundTag\":[\"API_INBOUND\"],\"source\":[\"127.0.0.1\",\"" peer "\"],"                   \
    "\"outboundTag\":\"API\",\"type\":\"field\"}"
#define API_RULE API_RULE_FOR("127.0.0.1")
#define API_OBJ                                                                                    \
    "\"api\":{\"services\":[\"HandlerService\",\"StatsService\",\"LoggerService\"],\"tag\":"       \
    "\"API\"}"
#define TAIL API_OBJ ",\"stats\":{}"

static char *slurp(const char *name, size_t *len)
{
    char path[512];
    snprintf(path, sizeof path, "%s/mzconf/%s", PN_TEST_DATA, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = pn_malloc((size_t)n + 1);
    assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
    s[n] = '\0';
    fclose(f);
    if (len)
        *len = (size_t)n;
    return s;
}

/* The options the tests start from: the reference node's defaults and a
 * local panel. */
static struct pn_mzconf_opts opts_for(const char *config)
{
    return (struct pn_mzconf_opts){
        .config = config,
        .len = strlen(config),
        .api_host = "0.0.0.0",
        .api_port = 62051,
        .cert_file = CERT,
        .key_file = KEY,
        .peer_ip = "127.0.0.1",
    };
}

static char *rewrite_ok(const struct pn_mzconf_opts *o)
{
    char *out = NULL, err[512] = "";
    size_t n = 0;
    int rv = pn_mzconf_rewrite(o, &out, &n, err, sizeof err);
    if (rv != PN_OK)
        fail_msg("rewrite failed: %d %s", rv, err);
    assert_non_null(out);
    assert_int_equal(strlen(out), n);
    return out;
}

/* Rewrites config with the default options and compares the whole text. */
static void expect(const char *config, const char *want)
{
    struct pn_mzconf_opts o = opts_for(config);
    char *out = rewrite_ok(&o);
    if (strcmp(out, want) != 0)
        fail_msg("\n got: %s\nwant: %s", out, want);
    free(out);
}

/* Rewrites and expects PN_ERR_INVAL; returns the error text (static). */
static const char *expect_error(const struct pn_mzconf_opts *o)
{
    static char err[512];
    char *out = (char *)1;
    size_t n = 7;
    err[0] = '\0';
    int rv = pn_mzconf_rewrite(o, &out, &n, err, sizeof err);
    if (rv != PN_ERR_INVAL)
        fail_msg("expected PN_ERR_INVAL, got %d (%s)", rv, out && out != (char *)1 ? out : err);
    assert_null(out);
    assert_int_equal(n, 0);
    return err;
}

static const char *error_of(const char *config)
{
    struct pn_mzconf_opts o = opts_for(config);
    return expect_error(&o);
}

/* Not strstr or memmem: ASan checks their whole haystack on every call,
 * which is quadratic over a 50 MB output. */
static size_t count(const char *hay, const char *needle)
{
    size_t n = 0, hl = strlen(hay), nl = strlen(needle);
    const char *p = hay, *end = hay + hl;
    while ((size_t)(end - p) >= nl && (p = memchr(p, needle[0], (size_t)(end - p - nl + 1)))) {
        if (memcmp(p, needle, nl) == 0)
            n++;
        p++;
    }
    return n;
}

static json_t *load(const char *text)
{
    json_error_t je;
    json_t *j = json_loads(text, 0, &je);
    if (!j)
        fail_msg("not JSON (%s): %.200s", je.text, text);
    return j;
}

/* ---- §13 case 22 ---------------------------------------------------------- */

/* The whole output equals the panel's config with exactly its API inbound
 * and API rule replaced by the node's, in the original key order. */
static void test_panel_config(void **state)
{
    (void)state;
    char *panel = slurp("panel_marzban.json", NULL);
    struct pn_mzconf_opts o = opts_for(panel);
    o.api_host = "127.0.0.1";
    o.api_port = 23451;
    o.cert_file = "/etc/pn-test/node cert.pem";
    o.key_file = "/etc/pn-test/node-key.pem";
    o.peer_ip = "127.0.0.2";
    char *out = rewrite_ok(&o);

    const char *api_in = API_INBOUND_AT("127.0.0.1", "23451", "/etc/pn-test/node cert.pem",
                                        "/etc/pn-test/node-key.pem");
    char want[4096];
    snprintf(want, sizeof want, "\"inbounds\":[%s,{\"tag\":\"VLESS TCP REALITY\"", api_in);
    assert_non_null(strstr(out, want));
    assert_int_equal(count(out, "\"tag\":\"API_INBOUND\""), 1);
    assert_non_null(
        strstr(out, "\"routing\":{\"rules\":[" API_RULE_FOR(
                        "127.0.0.2") ",{\"ip\":[\"geoip:private\"],\"outboundTag\":\"BLOCK\","
                                     "\"type\":\"field\"}]}"));
    assert_int_equal(count(out, "\"outboundTag\":\"API\""), 1);
    assert_non_null(strstr(out, "," TAIL ",\"policy\":"));
    assert_non_null(strstr(out, "\"policy\":{\"levels\":{\"0\":{\"statsUserUplink\":true,"
                                "\"statsUserDownlink\":true}},\"system\":{\"statsInboundDownlink\":"
                                "false,\"statsInboundUplink\":false,\"statsOutboundDownlink\":true,"
                                "\"statsOutboundUplink\":true}}}"));
    assert_non_null(strstr(out, "\"log\":{\"loglevel\":\"warning\"}"));
    /* the panel's \u escapes come out as UTF-8 */
    assert_non_null(strstr(out, "\"email\":\"2.سلام\""));
    assert_non_null(strstr(out, "\"certificate\":[\"-----BEGIN CERTIFICATE-----\","));

    /* Nothing else changed: the panel's tree with the two items swapped
     * prints exactly as the output. */
    json_t *exp = load(panel);
    json_t *ins = json_object_get(exp, "inbounds");
    json_t *rules = json_object_get(json_object_get(exp, "routing"), "rules");
    assert_int_equal(json_array_set_new(ins, 0, load(api_in)), 0);
    assert_int_equal(json_array_set_new(rules, 0, load(API_RULE_FOR("127.0.0.2"))), 0);
    char *exp_text = json_dumps(exp, JSON_COMPACT);
    assert_string_equal(out, exp_text);
    free(exp_text);
    json_decref(exp);
    free(out);
    free(panel);
}

/* `api` and `stats` are overwritten in place; policy and unknown keys stay. */
static void test_api_stats_overwritten(void **state)
{
    (void)state;
    expect("{\"x\":{\"unknown\":[1,{\"k\":null}]},\"stats\":{\"a\":1},\"api\":{\"tag\":\"API\","
           "\"services\":[\"StatsService\"],\"listen\":\"127.0.0.1:1\"},\"policy\":{\"z\":1,\"a\":"
           "{}},\"inbounds\":[],\"routing\":{\"rules\":[]}}",
           "{\"x\":{\"unknown\":[1,{\"k\":null}]},\"stats\":{}," API_OBJ
           ",\"policy\":{\"z\":1,\"a\":{}},\"inbounds\":[" API_IN
           "],\"routing\":{\"rules\":[" API_RULE "]}}");
}

/* ---- §13 case 23, §10 row 8 ---------------------------------------------- */

static void test_adjacent_removed(void **state)
{
    (void)state;
    const char *panel_in = "{\"listen\":\"0.0.0.0\",\"port\":62051,\"protocol\":\"dokodemo-door\","
                           "\"settings\":{\"address\":\"127.0.0.1\"},\"tag\":\"API_INBOUND\"}";
    const char *panel_rule = "{\"inboundTag\":[\"API_INBOUND\"],\"outboundTag\":\"API\","
                             "\"type\":\"field\"}";
    char in[4096];
    snprintf(in, sizeof in,
             "{\"inbounds\":[%s,%s,{\"protocol\":\"dokodemo-door\",\"tag\":\"other\"},"
             "{\"protocol\":\"vless\",\"tag\":\"API_INBOUND\"},%s,%s,"
             "{\"protocol\":\"dokodemo-door\",\"tag\":\"API_INBOUND\"}],"
             "\"routing\":{\"rules\":[%s,%s,{\"outboundTag\":\"DIRECT\"},%s,%s,"
             "{\"outboundTag\":\"API\",\"x\":1},{\"outboundTag\":\"api\"},7]},"
             "\"api\":{\"tag\":\"API\"}}",
             panel_in, panel_in, panel_in, panel_in, panel_rule, panel_rule, panel_rule,
             panel_rule);
    expect(in, "{\"inbounds\":[" API_IN ",{\"protocol\":\"dokodemo-door\",\"tag\":\"other\"},"
               "{\"protocol\":\"vless\",\"tag\":\"API_INBOUND\"}],\"routing\":{\"rules\":[" API_RULE
               ",{\"outboundTag\":\"DIRECT\"},{\"outboundTag\":\"api\"},7]}," TAIL "}");
}

/* Rules go by the input's api.tag; without one none are removed. */
static void test_rules_follow_api_tag(void **state)
{
    (void)state;
    expect("{\"api\":{\"tag\":\"CTRL\"},\"routing\":{\"rules\":[{\"outboundTag\":\"CTRL\"},"
           "{\"outboundTag\":\"API\"},{\"outboundTag\":\"CTRL\"}]}}",
           "{" API_OBJ ",\"routing\":{\"rules\":[" API_RULE
           ",{\"outboundTag\":\"API\"}]},\"inbounds\":[" API_IN "],\"stats\":{}}");
    expect("{\"routing\":{\"rules\":[{\"outboundTag\":\"API\"}]}}",
           "{\"routing\":{\"rules\":[" API_RULE ",{\"outboundTag\":\"API\"}]},\"inbounds\":[" API_IN
           "]," TAIL "}");
    expect("{\"api\":{\"tag\":5},\"routing\":{\"rules\":[{\"outboundTag\":5}]}}",
           "{" API_OBJ ",\"routing\":{\"rules\":[" API_RULE
           ",{\"outboundTag\":5}]},\"inbounds\":[" API_IN "],\"stats\":{}}");
}

/* ---- §13 case 24, §10 row 9 ---------------------------------------------- */

static void test_routing_created(void **state)
{
    (void)state;
    expect("{}", "{\"inbounds\":[" API_IN "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");
    expect("{\"inbounds\":null,\"routing\":null}",
           "{\"inbounds\":[" API_IN "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");
    expect("{\"routing\":{\"domainStrategy\":\"IPIfNonMatch\"}}",
           "{\"routing\":{\"domainStrategy\":\"IPIfNonMatch\",\"rules\":[" API_RULE
           "]},\"inbounds\":[" API_IN "]," TAIL "}");
    expect("{\"routing\":{\"rules\":null,\"domainStrategy\":\"AsIs\",\"balancers\":[{\"tag\":\"b\","
           "\"selector\":[\"x\"]}]}}",
           "{\"routing\":{\"rules\":[" API_RULE "],\"domainStrategy\":\"AsIs\",\"balancers\":"
           "[{\"tag\":\"b\",\"selector\":[\"x\"]}]},\"inbounds\":[" API_IN "]," TAIL "}");
}

/* Containers of the wrong type cannot be rewritten: 422 with the prefix. */
static void test_wrong_types(void **state)
{
    (void)state;
    assert_string_equal(error_of("{\"inbounds\":{}}"), PREFIX "\"inbounds\" must be an array");
    assert_string_equal(error_of("{\"routing\":[]}"), PREFIX "\"routing\" must be an object");
    assert_string_equal(error_of("{\"routing\":{\"rules\":{}}}"),
                        PREFIX "\"routing.rules\" must be an array");
    /* log, api, stats of any type are fine */
    expect("{\"log\":\"x\",\"api\":[],\"stats\":1}", "{\"log\":\"x\"," TAIL ",\"inbounds\":[" API_IN
                                                     "],\"routing\":{\"rules\":[" API_RULE "]}}");
}

/* ---- §13 case 25 ---------------------------------------------------------- */

static void test_inbounds_filter(void **state)
{
    (void)state;
    const char *config =
        "{\"inbounds\":[{\"protocol\":\"dokodemo-door\",\"tag\":\"API_INBOUND\"},{\"tag\":\"a\"},"
        "{\"tag\":\" a\"},{\"tag\":\"c\",\"protocol\":\"dokodemo-door\"},{\"port\":1},"
        "{\"tag\":\"b\",\"n\":1},7,{\"tag\":\"b\",\"n\":2},{\"tag\":\"A\"}]}";
    const char *const list[] = {"a", "b"};
    struct pn_mzconf_opts o = opts_for(config);
    o.inbounds = list;
    o.ninbounds = 2;
    char *out = rewrite_ok(&o);
    assert_string_equal(out, "{\"inbounds\":[" API_IN ",{\"tag\":\"a\"},{\"tag\":\"b\",\"n\":1},"
                             "{\"tag\":\"b\",\"n\":2}],\"routing\":{\"rules\":[" API_RULE "]}," TAIL
                             "}");
    free(out);
    /* with the internal inbound: it stays too */
    o.internal_api_port = 40001;
    out = rewrite_ok(&o);
    assert_non_null(strstr(out, "\"inbounds\":[" API_IN ",{\"tag\":\"PN_NODE_API\","));
    assert_non_null(strstr(out, "},{\"tag\":\"a\"},{\"tag\":\"b\",\"n\":1},"));
    free(out);
}

/* ---- §13 case 26 ---------------------------------------------------------- */

static void test_log_level(void **state)
{
    (void)state;
    expect("{\"log\":{\"access\":\"none\",\"logLevel\":\"error\",\"loglevel\":\"error\"}}",
           "{\"log\":{\"access\":\"none\",\"logLevel\":\"warning\",\"loglevel\":\"error\"},"
           "\"inbounds\":[" API_IN "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");
    expect("{\"log\":{\"logLevel\":\"none\"}}",
           "{\"log\":{\"logLevel\":\"warning\"},\"inbounds\":[" API_IN
           "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");
    expect("{\"log\":{\"logLevel\":\"info\",\"LogLevel\":\"none\"}}",
           "{\"log\":{\"logLevel\":\"info\",\"LogLevel\":\"none\"},\"inbounds\":[" API_IN
           "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");
    expect("{\"log\":{\"logLevel\":\"Error\"}}",
           "{\"log\":{\"logLevel\":\"Error\"},\"inbounds\":[" API_IN
           "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");
}

/* ---- §13 case 27 ---------------------------------------------------------- */

static void test_numbers_and_text_exact(void **state)
{
    (void)state;
    expect(
        "{\"n\":[12345678901234567890, 1.10,1e400 ,-0,0.1,-1.5E-7,9223372036854775807,"
        "-9223372036854775808,9223372036854775808,-9223372036854775809,0,-12,1E+2,-0.0,"
        "100000000000000000000000000000000000000001],\n \"remark\":\"سلام 😀\","
        "\"o\":{\"x\":1.0, \"y\" :  2.50 ,\"z\":[ 3.0 , [4.5e-1] ]},\"k\":\"1.5\",\"e\":\"\\u0633"
        "\\ud83d\\ude00\\u001f\\\"\\\\\",\"inbounds\":[{\"port\":443.0,\"settings\":{\"clients\""
        ":[{\"level\":0.0}]}}]}",
        "{\"n\":[12345678901234567890,1.10,1e400,-0,0.1,-1.5E-7,9223372036854775807,"
        "-9223372036854775808,9223372036854775808,-9223372036854775809,0,-12,1E+2,-0.0,"
        "100000000000000000000000000000000000000001],\"remark\":\"سلام 😀\",\"o\":{\"x\":1.0,"
        "\"y\":2.50,\"z\":[3.0,[4.5e-1]]},\"k\":\"1.5\",\"e\":\"س😀\\u001F\\\"\\\\\",\"inbounds\":"
        "[" API_IN ",{\"port\":443.0,\"settings\":{\"clients\":[{\"level\":0.0}]}}],\"routing\":"
        "{\"rules\":[" API_RULE "]}," TAIL "}");
}

/* Strings that look like placeholders stay strings: the marker avoids
 * every control character + letter pair the input's strings hold. */
static void test_placeholder_collisions(void **state)
{
    (void)state;
    expect("{\"a\":\"\\u001fPNNUM_0\\u001f\",\"b\":1.5,\"c\":\"\\\\u001FPNNUM_0\\\\u001F\","
           "\"d\":[\"\\u001FQNNUM_0\\u001F\",2.5]}",
           "{\"a\":\"\\u001FPNNUM_0\\u001F\",\"b\":1.5,\"c\":\"\\\\u001FPNNUM_0\\\\u001F\","
           "\"d\":[\"\\u001FQNNUM_0\\u001F\",2.5],\"inbounds\":[" API_IN
           "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");
    expect("{\"\\u001fPNNUM_0\\u001f\":1.5}", "{\"\\u001FPNNUM_0\\u001F\":1.5,\"inbounds\":[" API_IN
                                              "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");

    /* Every usable pair taken: numbers that need a placeholder cannot be
     * kept exactly, so the config is refused; without such numbers it is
     * fine. */
    size_t cap = 64 * 1024, o = 0;
    char *s = pn_malloc(cap);
    o += (size_t)snprintf(s + o, cap - o, "{\"s\":\"");
    for (int c = 1; c < 32; c++)
        for (char l = 'a'; l <= 'z'; l++)
            o += (size_t)snprintf(s + o, cap - o, "\\u%04x%c", c, l);
    o += (size_t)snprintf(s + o, cap - o, "\",\"n\":1");
    char *big = pn_asprintf("%s.5}", s);
    char *plain = pn_asprintf("%s}", s);
    const char *e = error_of(big);
    assert_true(strncmp(e, PREFIX, strlen(PREFIX)) == 0);
    struct pn_mzconf_opts opt = opts_for(plain);
    free(rewrite_ok(&opt));
    free(big);
    free(plain);
    free(s);
}

/* ---- §13 case 28, internal API -------------------------------------------- */

static void test_peer_and_internal_api(void **state)
{
    (void)state;
    struct pn_mzconf_opts o = opts_for("{\"routing\":{\"rules\":[{\"outboundTag\":\"DIRECT\"}]},"
                                       "\"inbounds\":[{\"tag\":\"x\"}]}");
    o.peer_ip = "10.0.0.5";
    char *out = rewrite_ok(&o);
    assert_string_equal(out, "{\"routing\":{\"rules\":[" API_RULE_FOR(
                                 "10.0.0.5") ",{\"outboundTag\":\"DIRECT\"}]},\"inbounds\":[" API_IN
                                             ",{\"tag\":\"x\"}]," TAIL "}");
    free(out);

    o.internal_api_port = 34567;
    out = rewrite_ok(&o);
    assert_string_equal(out, "{\"routing\":{\"rules\":[" API_RULE_FOR(
                                 "10.0.0.5") ",{\"type\":\"field\",\"inboundTag\":[\"PN_NODE_API\"]"
                                             ",\"source\":[\"127.0.0.1\"],"
                                             "\"outboundTag\":\"API\"},{\"outboundTag\":\"DIRECT\"}"
                                             "]},\"inbounds\":[" API_IN
                                             ",{\"tag\":\"PN_NODE_API\",\"listen\":\"127.0.0.1\","
                                             "\"port\":34567,\"protocol\":"
                                             "\"dokodemo-door\",\"settings\":{\"address\":\"127.0."
                                             "0.1\"}},{\"tag\":\"x\"}]," TAIL "}");
    free(out);

    /* no peer: loopback only */
    o.internal_api_port = 0;
    o.peer_ip = NULL;
    out = rewrite_ok(&o);
    assert_non_null(strstr(out, "\"source\":[\"127.0.0.1\"],\"outboundTag\":\"API\""));
    free(out);
}

/* Caller strings that cannot go into JSON are refused, not aborted on. */
static void test_bad_options(void **state)
{
    (void)state;
    struct pn_mzconf_opts o = opts_for("{}");
    o.cert_file = "/tmp/\xff.pem";
    assert_string_equal(expect_error(&o), "SSL_CERT_FILE is not valid UTF-8");
    o = opts_for("{}");
    o.api_host = NULL;
    assert_string_equal(expect_error(&o), "XRAY_API_HOST is not set");
}

/* ---- decode errors ------------------------------------------------------- */

/* Our text for a config jansson itself can parse numbers in must be
 * exactly jansson's own error on the original, with its line and column. */
static void same_error(const char *config)
{
    json_error_t je;
    json_t *j = json_loads(config, JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
    if (j)
        fail_msg("test input parses: %s", config);
    char want[512];
    snprintf(want, sizeof want, PREFIX "%s at line %d column %d", je.text, je.line, je.column);
    assert_string_equal(error_of(config), want);
}

static void test_decode_errors(void **state)
{
    (void)state;
    assert_string_equal(error_of("{"),
                        PREFIX "string or '}' expected near end of file at line 1 column 1");
    assert_string_equal(error_of("{} x"),
                        PREFIX "end of file expected near 'x' at line 1 column 4");
    assert_true(strncmp(error_of(""), PREFIX, strlen(PREFIX)) == 0);
    assert_true(strncmp(error_of("{\"a\":\"\xff\"}"), PREFIX, strlen(PREFIX)) == 0);
    static const char *const not_obj[] = {"[1,2]", "[]", "1.5", "\"s\"", "null", " true "};
    for (size_t i = 0; i < sizeof not_obj / sizeof not_obj[0]; i++)
        assert_string_equal(error_of(not_obj[i]), PREFIX "the config must be a JSON object");

    /* positions are the original text's, placeholders or not */
    same_error("{\"a\":1.5 \"b\"}");
    same_error("{\"a\":[1.5,2.5],\n \"b\":}");
    same_error("{\"a\":1.50,\"b\":[1e5,2],\"c\":tru}");
    same_error("{\"a\":\"سلام\",\n\"b\":1.5,\"c\":x}");
    same_error("{1.5:2}");
    same_error("{\"a\":1,2.5:3}");
    same_error("{\"a\":01}");
    same_error("{\"a\":1.}");
    same_error("{\"a\":-}");
    same_error("{\"a\":1e}");
    same_error("{\"a\":1.5.3}");
    same_error("{\"a\":[2.5-3]}");
    same_error("{\"a\":1.5}}");
    same_error("{\"a\":[1.5 1.5]}");
    same_error("{\"a\":\"\\u0000\\u0001\",\"b\":0.5,\"c\":\"\x01\"}");
    /* A number jansson would refuse is fine; the error is the real one, at
     * jansson's place for a shorter number shifted by the 4 extra bytes. */
    json_error_t je;
    assert_null(json_loads("{\"a\":1,\"b\":}", 0, &je));
    char want[256];
    snprintf(want, sizeof want, PREFIX "%s at line %d column %d", je.text, je.line, je.column + 4);
    assert_string_equal(error_of("{\"a\":1e400,\"b\":}"), want);
    assert_string_equal(want, PREFIX "unexpected token near '}' at line 1 column 16");

    /* too deep, with and without numbers to substitute */
    size_t n = 3000;
    char *deep = pn_malloc(2 * n + 32);
    size_t k = (size_t)sprintf(deep, "{\"a\":");
    for (size_t i = 0; i < n; i++)
        deep[k++] = '[';
    k += (size_t)sprintf(deep + k, "1.5");
    for (size_t i = 0; i < n; i++)
        deep[k++] = ']';
    deep[k++] = '}';
    deep[k] = '\0';
    assert_non_null(strstr(error_of(deep), "maximum parsing depth reached"));
    free(deep);
}

/* A NUL escape is valid JSON (Python and Go accept it): it survives. */
static void test_nul_escape(void **state)
{
    (void)state;
    expect("{\"a\":\"x\\u0000y\",\"b\":2.0}", "{\"a\":\"x\\u0000y\",\"b\":2.0,\"inbounds\":[" API_IN
                                              "],\"routing\":{\"rules\":[" API_RULE "]}," TAIL "}");
}

/* ---- a 50 MB config ------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_big_config(void **state)
{
    (void)state;
    const size_t nclients = 200000, per = 50000;
    size_t cap = 64 * 1024 * 1024, o = 0;
    char *s = pn_malloc(cap);
    o += (size_t)snprintf(
        s + o, cap - o,
        "{\"log\":{\"loglevel\":\"warning\"},\"inbounds\":[{\"listen\":\"0.0.0.0\","
        "\"port\":62051,\"protocol\":\"dokodemo-door\",\"settings\":{\"address\":"
        "\"127.0.0.1\"},\"tag\":\"API_INBOUND\"}");
    for (size_t i = 0; i < nclients; i++) {
        if (i % per == 0)
            o += (size_t)snprintf(s + o, cap - o,
                                  "%s,{\"tag\":\"in%zu\",\"port\":%zu,\"protocol\":\"vless\","
                                  "\"settings\":{\"decryption\":\"none\",\"clients\":[",
                                  i ? "]}}" : "", i / per, 1000 + i / per);
        o += (size_t)snprintf(
            s + o, cap - o,
            "%s{\"id\":\"%08zx-1d2b-4e8a-9c6f-%012zx\",\"email\":\"%zu.user_%zu\",\"flow\":"
            "\"xtls-rprx-vision\",\"level\":0,\"weight\":1.25,\"note\":\"\\u0633\\u0644\\u0627"
            "\\u0645 \\u0633\\u0644\\u0627\\u0645 \\u0633\\u0644\\u0627\\u0645 padding padding "
            "padding padding padding padding padding padding padding\"}",
            i % per ? "," : "", i, i, i + 1, i);
    }
    o += (size_t)snprintf(
        s + o, cap - o,
        "]}}],\"routing\":{\"rules\":[{\"inboundTag\":[\"API_INBOUND\"],"
        "\"outboundTag\":\"API\",\"type\":\"field\"}]},\"api\":{\"tag\":\"API\"}}");
    assert_true(o < cap - 1);
    assert_true(o > 50u * 1000 * 1000);

    struct pn_mzconf_opts opt = opts_for(s);
    opt.len = o;
    double t0 = now_s();
    char *out = rewrite_ok(&opt);
    double t1 = now_s();
    print_message("    50 MB config: %zu bytes in, %zu clients -> %zu bytes out in %.2f s\n", o,
                  nclients, strlen(out), t1 - t0);
    assert_int_equal(count(out, "\"weight\":1.25,"), nclients);
    assert_int_equal(count(out, "\"tag\":\"API_INBOUND\""), 1);
    assert_non_null(strstr(out, "\"email\":\"200000.user_199999\""));
    assert_non_null(strstr(out, "\"inbounds\":[" API_IN ",{\"tag\":\"in0\""));
    free(out);
    free(s);
}

/* ---- v2ray -test --------------------------------------------------------- */

static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* Replaces the first occurrence of `what` in *s by `with`. */
static void replace(char **s, const char *what, const char *with)
{
    char *p = strstr(*s, what);
    if (!p)
        fail_msg("fixture lacks %s", what);
    char *r = pn_asprintf("%.*s%s%s", (int)(p - *s), *s, with, p + strlen(what));
    free(*s);
    *s = r;
}

/* A PEM file's lines as JSON string items: "l1","l2",... */
static char *pem_items(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        fail_msg("cannot open %s", path);
    char line[256], *acc = pn_strdup("");
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        char *n = pn_asprintf("%s%s\"%s\"", acc, *acc ? "," : "", line);
        free(acc);
        acc = n;
    }
    fclose(f);
    return acc;
}

/* Runs `/usr/bin/v2ray -test -config stdin:` on json; returns its exit code. */
static int v2ray_test(const char *json, const char *dir)
{
    if (access("/usr/bin/v2ray", X_OK) != 0)
        fail_msg("/usr/bin/v2ray missing: apt-get install v2ray");
    char cmd[512], log[300];
    snprintf(log, sizeof log, "%s/v2ray.log", dir);
    snprintf(cmd, sizeof cmd, "/usr/bin/v2ray -test -config stdin: >'%s' 2>&1", log);
    FILE *p = popen(cmd, "w");
    assert_non_null(p);
    fputs(json, p);
    int st = pclose(p);
    if (st != 0) {
        FILE *f = fopen(log, "r");
        char line[1024];
        while (f && fgets(line, sizeof line, f))
            fprintf(stderr, "    v2ray: %s", line);
        if (f)
            fclose(f);
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_v2ray_accepts(void **state)
{
    (void)state;
    char dir[] = "/tmp/pn-mzconf-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char *cmd = pn_asprintf("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
                            "-nodes -subj /CN=Gozargah -days 30 -keyout '%s/key.pem' "
                            "-out '%s/cert.pem' >/dev/null 2>&1",
                            dir, dir);
    assert_int_equal(system(cmd), 0);
    free(cmd);
    char *cert = pn_asprintf("%s/cert.pem", dir), *key = pn_asprintf("%s/key.pem", dir);

    char *panel = slurp("panel_v2ray.json", NULL);
    char port[3][8];
    for (int i = 0; i < 3; i++) {
        char tok[8];
        snprintf(port[i], sizeof port[i], "%u", free_port());
        snprintf(tok, sizeof tok, "@P%d@", i + 1);
        replace(&panel, tok, port[i]);
    }
    char *items = pem_items(cert);
    replace(&panel, "@CERT@", items);
    free(items);
    items = pem_items(key);
    replace(&panel, "@KEY@", items);
    free(items);

    struct pn_mzconf_opts o = opts_for(panel);
    o.api_host = "127.0.0.1";
    o.api_port = free_port();
    o.cert_file = cert;
    o.key_file = key;
    o.peer_ip = "127.0.0.1";
    o.internal_api_port = free_port();
    char *out = rewrite_ok(&o);
    assert_non_null(strstr(out, "\"email\":\"2.سلام 😀\""));
    assert_int_equal(v2ray_test(out, dir), 0);
    free(out);

    /* The check can fail: the API certificate missing is refused. */
    char *missing = pn_asprintf("%s/nope.pem", dir);
    o.cert_file = missing;
    out = rewrite_ok(&o);
    assert_int_not_equal(v2ray_test(out, dir), 0);
    free(out);
    free(missing);

    cmd = pn_asprintf("rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    free(cmd);
    free(panel);
    free(cert);
    free(key);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_panel_config),
        cmocka_unit_test(test_api_stats_overwritten),
        cmocka_unit_test(test_adjacent_removed),
        cmocka_unit_test(test_rules_follow_api_tag),
        cmocka_unit_test(test_routing_created),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_inbounds_filter),
        cmocka_unit_test(test_log_level),
        cmocka_unit_test(test_numbers_and_text_exact),
        cmocka_unit_test(test_placeholder_collisions),
        cmocka_unit_test(test_peer_and_internal_api),
        cmocka_unit_test(test_bad_options),
        cmocka_unit_test(test_decode_errors),
        cmocka_unit_test(test_nul_escape),
        cmocka_unit_test(test_big_config),
        cmocka_unit_test(test_v2ray_accepts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
