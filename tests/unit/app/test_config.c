/* The configuration table: defaults per profile and under a state dir, every
 * kind of validation error, the profile truth table, API key forms and the
 * generated key file, the core lookup, and --help / check output. The module
 * is included so tests can point the default core path at a temp dir. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../../src/app/config.c"

#define KEY "123e4567-e89b-12d3-a456-426614174000"

static char tmpdir[64];
static char *saved_path;

static void rm_rf_known(void)
{
    /* Everything a test may create under tmpdir. */
    static const char *const files[] = {
        "state/api_key", "state/nested/deeper/api_key",
        "bin/v2ray",     "bin/xray",
        "bin2/xray",     "bin/notexec",
        "bad/api_key",   "nil/api_key",
    };
    static const char *const dirs[] = {
        "state/nested/deeper", "state/nested", "state", "bin", "bin2", "bad", "nil"};
    char p[256];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", tmpdir, files[i]);
        unlink(p);
    }
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", tmpdir, dirs[i]);
        rmdir(p);
    }
}

static void clean_env(void)
{
    for (size_t i = 0; i < NVARS; i++)
        unsetenv(vars[i].name);
}

static int setup(void **state)
{
    (void)state;
    clean_env();
    setenv("PATH", "/nonexistent-pn-path", 1);
    core_default_path = "/nonexistent-pn/xray";
    rm_rf_known();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    clean_env();
    rm_rf_known();
    return 0;
}

static int group_setup(void **state)
{
    (void)state;
    const char *p = getenv("PATH");
    saved_path = strdup(p ? p : "/usr/bin:/bin");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/pn-cfg-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    rm_rf_known();
    rmdir(tmpdir);
    setenv("PATH", saved_path, 1);
    free(saved_path);
    return 0;
}

/* Loads and expects success. */
static void load_ok(struct pn_config *cfg)
{
    char err[512] = "";
    int rv = pn_config_load(cfg, err, sizeof err);
    if (rv != PN_OK)
        fail_msg("pn_config_load: %s", err);
}

/* Loads and expects exactly msg. */
static void load_fails(const char *msg)
{
    struct pn_config cfg;
    char err[1024] = "";
    assert_int_equal(pn_config_load(&cfg, err, sizeof err), PN_ERR_INVAL);
    assert_string_equal(err, msg);
    /* cfg is freed on failure */
    assert_null(cfg.node_host);
    assert_null(cfg.ssl_cert_file);
}

static void test_defaults_pasarguard(void **state)
{
    (void)state;
    setenv("API_KEY", KEY, 1);
    struct pn_config c;
    load_ok(&c);
    assert_int_equal(c.profile, PN_PROFILE_PASARGUARD);
    assert_string_equal(c.profile_reason, "PROXYNODE_PROFILE=auto and API_KEY is set");
    assert_string_equal(c.node_host, "0.0.0.0");
    assert_int_equal(c.service_port, 62050);
    assert_string_equal(c.service_protocol, "grpc");
    assert_true(c.api_key_set);
    assert_null(c.api_key_file);
    struct pn_uuid k;
    assert_int_equal(pn_uuid_parse(KEY, strlen(KEY), &k), PN_OK);
    assert_true(pn_uuid_equal(&c.api_key, &k));
    assert_string_equal(c.ssl_cert_file, "/var/lib/pg-node/certs/ssl_cert.pem");
    assert_string_equal(c.ssl_key_file, "/var/lib/pg-node/certs/ssl_key.pem");
    assert_null(c.ssl_client_cert_file);
    assert_null(c.cert_names);
    assert_string_equal(c.xray_executable_path, "/usr/local/bin/xray");
    assert_string_equal(c.xray_assets_path, "/usr/local/share/xray");
    assert_string_equal(c.generated_config_path, "/var/lib/pg-node/generated/");
    assert_false(c.debug);
    assert_int_equal(c.log_buffer_size, 10000);
    assert_int_equal(c.startup_log_tail_size, 200);
    assert_int_equal(c.max_log_per_request, 1000);
    assert_false(c.max_log_per_request_set);
    assert_string_equal(c.xray_api_host, "0.0.0.0");
    assert_int_equal(c.xray_api_port, 62051);
    assert_null(c.inbounds);
    assert_null(c.state_dir);
    assert_false(c.keepalive_stops_core);
    assert_int_equal(c.stats_bank_interval, 10);
    assert_int_equal(c.start_timeout, 60);
    assert_int_equal(c.max_body, 67108864);
    pn_config_free(&c);
    assert_null(c.node_host);
    pn_config_free(&c); /* idempotent */
}

static void test_values_parsed(void **state)
{
    (void)state;
    setenv("API_KEY", KEY, 1);
    setenv("SERVICE_PORT", "443", 1);
    setenv("NODE_HOST", "::1", 1);
    setenv("SERVICE_PROTOCOL", "REST", 1);
    setenv("DEBUG", "Yes", 1);
    setenv("LOG_BUFFER_SIZE", "1", 1);
    setenv("PROXYNODE_KEEPALIVE_STOPS_CORE", "ON", 1);
    setenv("PROXYNODE_STATS_BANK_INTERVAL", "3600", 1);
    setenv("PROXYNODE_START_TIMEOUT", "1", 1);
    setenv("PROXYNODE_CERT_NAMES", "node.example,10.0.0.1", 1);
    setenv("MAX_LOG_PER_REQUEST", "5", 1);
    setenv("INBOUNDS", " a ,b", 1);
    struct pn_config c;
    load_ok(&c);
    assert_int_equal(c.profile, PN_PROFILE_PASARGUARD);
    assert_int_equal(c.service_port, 443);
    assert_string_equal(c.node_host, "::1");
    assert_string_equal(c.service_protocol, "rest");
    assert_true(c.debug);
    assert_int_equal(c.log_buffer_size, 1);
    assert_true(c.keepalive_stops_core);
    assert_int_equal(c.stats_bank_interval, 3600);
    assert_int_equal(c.start_timeout, 1);
    assert_string_equal(c.cert_names, "node.example,10.0.0.1");
    assert_int_equal(c.max_log_per_request, 5);
    assert_true(c.max_log_per_request_set);
    assert_string_equal(c.inbounds, " a ,b");
    pn_config_free(&c);
}

static void test_bools(void **state)
{
    (void)state;
    static const char *const yes[] = {"true", "TRUE", "1", "yes", "YeS", "on", "On"};
    static const char *const no[] = {"false", "False", "0", "no", "NO", "off", "OFF"};
    setenv("API_KEY", KEY, 1);
    for (size_t i = 0; i < 7; i++) {
        struct pn_config c;
        setenv("DEBUG", yes[i], 1);
        load_ok(&c);
        assert_true(c.debug);
        pn_config_free(&c);
        setenv("DEBUG", no[i], 1);
        load_ok(&c);
        assert_false(c.debug);
        pn_config_free(&c);
    }
    static const char *const bad[] = {"2", "y", "n", "truee", "enabled", " true", "-1"};
    for (size_t i = 0; i < 7; i++) {
        char want[160];
        setenv("DEBUG", bad[i], 1);
        snprintf(want, sizeof want,
                 "DEBUG: \"%s\" is not a boolean (use true/false, 1/0, yes/no, on/off)", bad[i]);
        load_fails(want);
    }
}

struct bad_case {
    const char *var, *value, *msg;
};

static void test_validation_errors(void **state)
{
    (void)state;
    static const struct bad_case cases[] = {
        {"SERVICE_PORT", "70000", "SERVICE_PORT: \"70000\" is out of range 1..65535"},
        {"SERVICE_PORT", "0", "SERVICE_PORT: \"0\" is out of range 1..65535"},
        {"SERVICE_PORT", "-1", "SERVICE_PORT: \"-1\" is out of range 1..65535"},
        {"SERVICE_PORT", "80a", "SERVICE_PORT: \"80a\" is not a decimal integer"},
        {"SERVICE_PORT", " 80", "SERVICE_PORT: \" 80\" is not a decimal integer"},
        {"SERVICE_PORT", "+80", "SERVICE_PORT: \"+80\" is not a decimal integer"},
        {"SERVICE_PORT", "0x50", "SERVICE_PORT: \"0x50\" is not a decimal integer"},
        {"SERVICE_PORT", "99999999999999999999999",
         "SERVICE_PORT: \"99999999999999999999999\" is out of range 1..65535"},
        {"NODE_HOST", "localhost", "NODE_HOST: \"localhost\" is not an IPv4 or IPv6 address"},
        {"NODE_HOST", "1.2.3", "NODE_HOST: \"1.2.3\" is not an IPv4 or IPv6 address"},
        {"NODE_HOST", "[::1]", "NODE_HOST: \"[::1]\" is not an IPv4 or IPv6 address"},
        {"NODE_HOST", "bad\nhost", "NODE_HOST: \"bad?host\" is not an IPv4 or IPv6 address"},
        {"SERVICE_HOST", "example.com",
         "SERVICE_HOST: \"example.com\" is not an IPv4 or IPv6 address"},
        {"XRAY_API_HOST", "x", "XRAY_API_HOST: \"x\" is not an IPv4 or IPv6 address"},
        {"API_KEY", "abc", "API_KEY: \"abc\" is not a valid UUID"},
        {"API_KEY", "00000000-0000-0000-0000-000000000000",
         "API_KEY: the all-zero UUID is not allowed"},
        {"API_KEY", "00000000000000000000000000000000",
         "API_KEY: the all-zero UUID is not allowed"},
        {"SERVICE_PROTOCOL", "rpyc", "SERVICE_PROTOCOL: \"rpyc\" is not one of grpc, rest"},
        {"PROXYNODE_PROFILE", "bogus",
         "PROXYNODE_PROFILE: \"bogus\" is not one of auto, pasarguard, gozargah, marzban"},
        {"LOG_BUFFER_SIZE", "0", "LOG_BUFFER_SIZE: \"0\" is out of range 1..10000000"},
        {"LOG_BUFFER_SIZE", "-5", "LOG_BUFFER_SIZE: \"-5\" is out of range 1..10000000"},
        {"STARTUP_LOG_TAIL_SIZE", "0", "STARTUP_LOG_TAIL_SIZE: \"0\" is out of range 1..1000000"},
        {"STATS_UPDATE_INTERVAL_SECONDS", "x",
         "STATS_UPDATE_INTERVAL_SECONDS: \"x\" is not a decimal integer"},
        {"STATS_CLEANUP_INTERVAL_SECONDS", "0",
         "STATS_CLEANUP_INTERVAL_SECONDS: \"0\" is out of range 1..86400"},
        {"MAX_LOG_PER_REQUEST", "0", "MAX_LOG_PER_REQUEST: \"0\" is out of range 1..1000000"},
        {"XRAY_API_PORT", "65536", "XRAY_API_PORT: \"65536\" is out of range 1..65535"},
        {"PROXYNODE_STATS_BANK_INTERVAL", "3601",
         "PROXYNODE_STATS_BANK_INTERVAL: \"3601\" is out of range 1..3600"},
        {"PROXYNODE_START_TIMEOUT", "0", "PROXYNODE_START_TIMEOUT: \"0\" is out of range 1..3600"},
        {"PROXYNODE_KEEPALIVE_STOPS_CORE", "sometimes",
         "PROXYNODE_KEEPALIVE_STOPS_CORE: \"sometimes\" is not a boolean (use true/false, 1/0, "
         "yes/no, on/off)"},
        {"PROXYNODE_MAX_BODY", "100",
         "PROXYNODE_MAX_BODY: \"100\" is out of range 1024..4294967296"},
        {"PROXYNODE_MAX_BODY", "5G", "PROXYNODE_MAX_BODY: \"5G\" is out of range 1024..4294967296"},
        {"PROXYNODE_MAX_BODY", "10X",
         "PROXYNODE_MAX_BODY: \"10X\" is not a decimal size (bytes, or with a K, M or G suffix)"},
        {"PROXYNODE_MAX_BODY", "10MB",
         "PROXYNODE_MAX_BODY: \"10MB\" is not a decimal size (bytes, or with a K, M or G "
         "suffix)"},
        {"PROXYNODE_MAX_BODY", "M",
         "PROXYNODE_MAX_BODY: \"M\" is not a decimal size (bytes, or with a K, M or G suffix)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        clean_env();
        /* A valid pasarguard setup, so the one bad value is the only problem
         * (unless the case is about API_KEY itself). */
        setenv("API_KEY", KEY, 1);
        setenv(cases[i].var, cases[i].value, 1);
        load_fails(cases[i].msg);
    }
    /* A long value is cut in the message. */
    clean_env();
    setenv("API_KEY", KEY, 1);
    char longv[200];
    memset(longv, 'a', sizeof longv - 1);
    longv[sizeof longv - 1] = '\0';
    setenv("NODE_HOST", longv, 1);
    struct pn_config c;
    char err[512];
    assert_int_equal(pn_config_load(&c, err, sizeof err), PN_ERR_INVAL);
    assert_non_null(strstr(err, "aaa...\" is not an IPv4"));
    assert_true(strlen(err) < 140);
}

static void test_sizes_and_marzban(void **state)
{
    (void)state;
    setenv("SSL_CLIENT_CERT_FILE", "/etc/panel.pem", 1);
    setenv("SERVICE_HOST", "127.0.0.1", 1);
    setenv("NODE_HOST", "10.0.0.1", 1); /* validated, not used by marzban */
    struct pn_config c;
    load_ok(&c);
    assert_int_equal(c.profile, PN_PROFILE_MARZBAN);
    assert_string_equal(c.profile_reason, "PROXYNODE_PROFILE=auto, SSL_CLIENT_CERT_FILE is set "
                                          "and Marzban-only SERVICE_HOST");
    assert_string_equal(c.node_host, "127.0.0.1");
    assert_int_equal(c.service_port, 62050);
    assert_string_equal(c.service_protocol, "rest");
    assert_string_equal(c.ssl_cert_file, "/var/lib/marzban-node/ssl_cert.pem");
    assert_string_equal(c.ssl_key_file, "/var/lib/marzban-node/ssl_key.pem");
    assert_string_equal(c.ssl_client_cert_file, "/etc/panel.pem");
    assert_int_equal(c.max_body, 268435456);
    assert_int_equal(c.xray_api_port, 62051);
    pn_config_free(&c);

    static const struct {
        const char *text;
        size_t want;
    } sizes[] = {{"1024", 1024},        {"64M", 67108864},     {"2k", 2048},
                 {"4G", 4294967296ULL}, {"4g", 4294967296ULL}, {"1m", 1048576}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        setenv("PROXYNODE_MAX_BODY", sizes[i].text, 1);
        load_ok(&c);
        assert_int_equal(c.max_body, sizes[i].want);
        pn_config_free(&c);
    }

    /* SERVICE_HOST unset in marzban: its default, not NODE_HOST. */
    unsetenv("SERVICE_HOST");
    setenv("PROXYNODE_PROFILE", "marzban", 1);
    load_ok(&c);
    assert_string_equal(c.node_host, "0.0.0.0");
    assert_string_equal(c.profile_reason, "PROXYNODE_PROFILE=marzban");
    pn_config_free(&c);

    /* The marzban profile without the panel's certificate. */
    unsetenv("SSL_CLIENT_CERT_FILE");
    load_fails("SSL_CLIENT_CERT_FILE is required for rest service. (the marzban profile "
               "verifies the panel's client certificate against it)");
}

static void test_gozargah(void **state)
{
    (void)state;
    setenv("SSL_CLIENT_CERT_FILE", "/etc/panel.pem", 1);
    setenv("PROXYNODE_MAX_BODY", "2048", 1); /* not used outside marzban */
    struct pn_config c;
    load_ok(&c);
    assert_int_equal(c.profile, PN_PROFILE_GOZARGAH);
    assert_string_equal(c.profile_reason, "PROXYNODE_PROFILE=auto and SSL_CLIENT_CERT_FILE is set");
    assert_string_equal(c.ssl_cert_file, "/var/lib/gozargah-node/certs/ssl_cert.pem");
    assert_string_equal(c.ssl_key_file, "/var/lib/gozargah-node/certs/ssl_key.pem");
    assert_string_equal(c.service_protocol, "grpc");
    assert_int_equal(c.max_body, 67108864);
    assert_false(c.api_key_set);
    pn_config_free(&c);

    clean_env();
    setenv("PROXYNODE_PROFILE", "gozargah", 1);
    load_fails("SSL_CLIENT_CERT_FILE is required for rest service. (the gozargah profile "
               "verifies the panel's client certificate against it)");
}

/* One row of the auto-selection truth table. */
static void expect_profile(enum pn_profile want, const char *reason)
{
    struct pn_config c;
    load_ok(&c);
    assert_string_equal(pn_profile_name(c.profile), pn_profile_name(want));
    assert_string_equal(c.profile_reason, reason);
    pn_config_free(&c);
}

static const char refusal[] =
    "PROXYNODE_PROFILE: cannot choose a profile: set API_KEY for a PasarGuard panel "
    "(pasarguard); SSL_CLIENT_CERT_FILE and one of SERVICE_HOST, XRAY_API_HOST, XRAY_API_PORT, "
    "INBOUNDS for a Marzban panel (marzban); SSL_CLIENT_CERT_FILE or MAX_LOG_PER_REQUEST for a "
    "legacy Gozargah panel (gozargah); or set PROXYNODE_PROFILE to pasarguard, gozargah or "
    "marzban";

static void test_profile_truth_table(void **state)
{
    (void)state;
    /* Nothing set: refused, with the three choices explained. */
    load_fails(refusal);
    setenv("PROXYNODE_PROFILE", "auto", 1);
    load_fails(refusal);
    /* Empty values count as unset. */
    setenv("PROXYNODE_PROFILE", "", 1);
    setenv("API_KEY", "", 1);
    setenv("SSL_CLIENT_CERT_FILE", "", 1);
    setenv("MAX_LOG_PER_REQUEST", "", 1);
    setenv("SERVICE_HOST", "", 1);
    load_fails(refusal);

    /* Marzban-only variables alone select nothing. */
    setenv("INBOUNDS", "a", 1);
    setenv("XRAY_API_PORT", "1234", 1);
    load_fails(refusal);

    /* Rule 1: API_KEY wins over everything else. */
    setenv("API_KEY", KEY, 1);
    setenv("SSL_CLIENT_CERT_FILE", "/p.pem", 1);
    setenv("MAX_LOG_PER_REQUEST", "10", 1);
    expect_profile(PN_PROFILE_PASARGUARD, "PROXYNODE_PROFILE=auto and API_KEY is set");

    /* Rule 2: client cert + any Marzban-only variable. */
    unsetenv("API_KEY");
    expect_profile(PN_PROFILE_MARZBAN, "PROXYNODE_PROFILE=auto, SSL_CLIENT_CERT_FILE is set and "
                                       "Marzban-only XRAY_API_PORT, INBOUNDS");
    static const char *const mz_only[] = {"SERVICE_HOST", "XRAY_API_HOST", "XRAY_API_PORT",
                                          "INBOUNDS"};
    static const char *const mz_val[] = {"127.0.0.1", "127.0.0.1", "62051", "x"};
    for (size_t i = 0; i < 4; i++) {
        clean_env();
        setenv("SSL_CLIENT_CERT_FILE", "/p.pem", 1);
        setenv(mz_only[i], mz_val[i], 1);
        char reason[200];
        snprintf(reason, sizeof reason,
                 "PROXYNODE_PROFILE=auto, SSL_CLIENT_CERT_FILE is set and Marzban-only %s",
                 mz_only[i]);
        expect_profile(PN_PROFILE_MARZBAN, reason);
    }

    /* Rule 3: client cert alone, or MAX_LOG_PER_REQUEST. */
    clean_env();
    setenv("SSL_CLIENT_CERT_FILE", "/p.pem", 1);
    setenv("SERVICE_HOST", "", 1);
    expect_profile(PN_PROFILE_GOZARGAH, "PROXYNODE_PROFILE=auto and SSL_CLIENT_CERT_FILE is set");
    clean_env();
    setenv("MAX_LOG_PER_REQUEST", "100", 1);
    /* Selected, but the gozargah profile still needs the client cert. */
    load_fails("SSL_CLIENT_CERT_FILE is required for rest service. (the gozargah profile "
               "verifies the panel's client certificate against it)");
    setenv("SSL_CLIENT_CERT_FILE", "/p.pem", 1);
    expect_profile(PN_PROFILE_GOZARGAH, "PROXYNODE_PROFILE=auto and SSL_CLIENT_CERT_FILE is set");

    /* Explicit profiles win over the rules, in any case. */
    clean_env();
    setenv("API_KEY", KEY, 1);
    setenv("SSL_CLIENT_CERT_FILE", "/p.pem", 1);
    setenv("PROXYNODE_PROFILE", "Gozargah", 1);
    expect_profile(PN_PROFILE_GOZARGAH, "PROXYNODE_PROFILE=gozargah");
    setenv("PROXYNODE_PROFILE", "marzban", 1);
    expect_profile(PN_PROFILE_MARZBAN, "PROXYNODE_PROFILE=marzban");
    clean_env();
    setenv("SSL_CLIENT_CERT_FILE", "/p.pem", 1);
    setenv("INBOUNDS", "a", 1);
    setenv("PROXYNODE_PROFILE", "pasarguard", 1);
    load_fails("API_KEY: required in the pasarguard profile (set it, or set PROXYNODE_STATE_DIR "
               "to generate one)");
    setenv("API_KEY", KEY, 1);
    expect_profile(PN_PROFILE_PASARGUARD, "PROXYNODE_PROFILE=pasarguard");
}

static void test_api_key_forms(void **state)
{
    (void)state;
    static const char *const ok[] = {
        "123E4567-E89B-12D3-A456-426614174000",
        "123e4567e89b12d3a456426614174000",
        "{123e4567-e89b-12d3-a456-426614174000}",
        "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
    };
    struct pn_uuid want;
    assert_int_equal(pn_uuid_parse(KEY, strlen(KEY), &want), PN_OK);
    for (size_t i = 0; i < 4; i++) {
        struct pn_config c;
        setenv("API_KEY", ok[i], 1);
        load_ok(&c);
        assert_true(c.api_key_set);
        assert_true(pn_uuid_equal(&c.api_key, &want));
        pn_config_free(&c);
    }
    setenv("API_KEY", "123e4567-e89b-12d3-a456-42661417400g", 1);
    load_fails("API_KEY: \"123e4567-e89b-12d3-a456-42661417400g\" is not a valid UUID");
    setenv("API_KEY", "{00000000-0000-0000-0000-000000000000}", 1);
    load_fails("API_KEY: the all-zero UUID is not allowed");
}

static void test_state_dir_defaults(void **state)
{
    (void)state;
    char sd[128], want[256];
    snprintf(sd, sizeof sd, "%s/state", tmpdir);
    setenv("PROXYNODE_PROFILE", "pasarguard", 1);
    setenv("PROXYNODE_STATE_DIR", sd, 1);
    struct pn_config c;
    load_ok(&c);
    assert_string_equal(c.state_dir, sd);
    snprintf(want, sizeof want, "%s/certs/ssl_cert.pem", sd);
    assert_string_equal(c.ssl_cert_file, want);
    snprintf(want, sizeof want, "%s/certs/ssl_key.pem", sd);
    assert_string_equal(c.ssl_key_file, want);
    snprintf(want, sizeof want, "%s/generated/", sd);
    assert_string_equal(c.generated_config_path, want);
    snprintf(want, sizeof want, "%s/api_key", sd);
    assert_string_equal(c.api_key_file, want);
    assert_false(c.api_key_set);
    pn_config_free(&c);

    /* A trailing slash does not double; explicit values still win. */
    snprintf(sd, sizeof sd, "%s/state/", tmpdir);
    setenv("PROXYNODE_STATE_DIR", sd, 1);
    setenv("SSL_CERT_FILE", "/etc/my.pem", 1);
    setenv("GENERATED_CONFIG_PATH", "/tmp/gen", 1);
    load_ok(&c);
    assert_string_equal(c.ssl_cert_file, "/etc/my.pem");
    snprintf(want, sizeof want, "%sapi_key", sd);
    assert_string_equal(c.api_key_file, want);
    snprintf(want, sizeof want, "%scerts/ssl_key.pem", sd);
    assert_string_equal(c.ssl_key_file, want);
    assert_string_equal(c.generated_config_path, "/tmp/gen");
    pn_config_free(&c);

    /* The state dir also wins over the marzban profile's cert defaults. */
    clean_env();
    setenv("PROXYNODE_STATE_DIR", "/srv/pn", 1);
    setenv("SSL_CLIENT_CERT_FILE", "/p.pem", 1);
    setenv("INBOUNDS", "x", 1);
    load_ok(&c);
    assert_int_equal(c.profile, PN_PROFILE_MARZBAN);
    assert_string_equal(c.ssl_cert_file, "/srv/pn/certs/ssl_cert.pem");
    assert_null(c.api_key_file);
    pn_config_free(&c);
}

static char *capture_ensure(struct pn_config *c, int *rv, char *err, size_t errlen)
{
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    assert_non_null(out);
    *rv = pn_config_ensure_api_key(c, out, err, errlen);
    fclose(out);
    return text;
}

static void test_ensure_api_key(void **state)
{
    (void)state;
    char sd[128], keyfile[160];
    snprintf(sd, sizeof sd, "%s/state/nested/deeper", tmpdir);
    snprintf(keyfile, sizeof keyfile, "%s/api_key", sd);
    setenv("PROXYNODE_PROFILE", "pasarguard", 1);
    setenv("PROXYNODE_STATE_DIR", sd, 1);

    struct pn_config c;
    char err[512] = "";
    int rv;
    load_ok(&c);
    char *printed = capture_ensure(&c, &rv, err, sizeof err);
    assert_int_equal(rv, PN_OK);
    assert_true(c.api_key_set);
    char key[PN_UUID_STRLEN + 1];
    pn_uuid_format(&c.api_key, key);
    char want[512];
    snprintf(want, sizeof want,
             "Generated API key (shown once, stored in %s): %s\n"
             "Paste this key into the panel's settings for this node (API key); the node reads "
             "it from that file from now on.\n",
             keyfile, key);
    assert_string_equal(printed, want);
    free(printed);

    /* 0600 file, 0700 directory, holding the key. */
    struct stat st;
    assert_int_equal(stat(keyfile, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(stat(sd, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0700);
    FILE *f = fopen(keyfile, "r");
    assert_non_null(f);
    char line[128] = "";
    assert_non_null(fgets(line, sizeof line, f));
    fclose(f);
    line[strcspn(line, "\n")] = '\0';
    assert_string_equal(line, key);

    /* Calling again on the same config: a no-op. */
    printed = capture_ensure(&c, &rv, err, sizeof err);
    assert_int_equal(rv, PN_OK);
    assert_string_equal(printed, "");
    free(printed);
    struct pn_uuid first = c.api_key;
    pn_config_free(&c);

    /* A new process: reads the same key and prints nothing. */
    load_ok(&c);
    assert_false(c.api_key_set);
    printed = capture_ensure(&c, &rv, err, sizeof err);
    assert_int_equal(rv, PN_OK);
    assert_string_equal(printed, "");
    free(printed);
    assert_true(c.api_key_set);
    assert_true(pn_uuid_equal(&c.api_key, &first));

    /* check shows the key masked, never in clear. */
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    pn_config_print(&c, out);
    fclose(out);
    assert_null(strstr(text, key));
    assert_non_null(strstr(text, "API_KEY=******** (from "));
    free(text);
    pn_config_free(&c);

    /* A key file with surrounding whitespace and upper case is fine. */
    f = fopen(keyfile, "w");
    assert_non_null(f);
    fprintf(f, "  \n 123E4567-E89B-12D3-A456-426614174000 \r\n\n");
    fclose(f);
    load_ok(&c);
    printed = capture_ensure(&c, &rv, err, sizeof err);
    assert_int_equal(rv, PN_OK);
    assert_string_equal(printed, "");
    free(printed);
    struct pn_uuid k;
    assert_int_equal(pn_uuid_parse(KEY, strlen(KEY), &k), PN_OK);
    assert_true(pn_uuid_equal(&c.api_key, &k));
    pn_config_free(&c);

    /* An explicit API_KEY makes it a no-op: no file read or written. */
    unlink(keyfile);
    setenv("API_KEY", KEY, 1);
    load_ok(&c);
    assert_null(c.api_key_file);
    printed = capture_ensure(&c, &rv, err, sizeof err);
    assert_int_equal(rv, PN_OK);
    assert_string_equal(printed, "");
    free(printed);
    assert_int_equal(access(keyfile, F_OK), -1);
    pn_config_free(&c);
}

static void test_bad_key_file(void **state)
{
    (void)state;
    static const struct {
        const char *dir, *content;
    } bad[] = {{"bad", "not-a-uuid\n"}, {"nil", "00000000-0000-0000-0000-000000000000\n"}};
    for (size_t i = 0; i < 2; i++) {
        char sd[128], keyfile[160];
        snprintf(sd, sizeof sd, "%s/%s", tmpdir, bad[i].dir);
        snprintf(keyfile, sizeof keyfile, "%s/api_key", sd);
        assert_int_equal(mkdir(sd, 0700), 0);
        FILE *f = fopen(keyfile, "w");
        assert_non_null(f);
        fputs(bad[i].content, f);
        fclose(f);
        setenv("PROXYNODE_PROFILE", "pasarguard", 1);
        setenv("PROXYNODE_STATE_DIR", sd, 1);
        struct pn_config c;
        load_ok(&c);
        char err[512] = "";
        int rv;
        char *printed = capture_ensure(&c, &rv, err, sizeof err);
        assert_int_equal(rv, PN_ERR_INVAL);
        assert_string_equal(printed, "");
        free(printed);
        char want[512];
        snprintf(want, sizeof want,
                 "%s: does not hold a valid API key (a non-zero UUID); fix it, or delete it to "
                 "generate a new key",
                 keyfile);
        assert_string_equal(err, want);
        assert_false(c.api_key_set);
        pn_config_free(&c);
    }
}

static void make_exec(const char *rel, mode_t mode)
{
    char p[256];
    snprintf(p, sizeof p, "%s/%s", tmpdir, rel);
    char d[256];
    snprintf(d, sizeof d, "%s", p);
    *strrchr(d, '/') = '\0';
    mkdir(d, 0700);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs("#!/bin/sh\nexit 0\n", f);
    fclose(f);
    assert_int_equal(chmod(p, mode), 0);
}

static void test_core_path(void **state)
{
    (void)state;
    char bin[128], bin2[128], pathvar[300], want[256];
    snprintf(bin, sizeof bin, "%s/bin", tmpdir);
    snprintf(bin2, sizeof bin2, "%s/bin2", tmpdir);
    setenv("API_KEY", KEY, 1);

    /* Nothing anywhere. */
    struct pn_config c;
    load_ok(&c);
    assert_null(c.core_path);
    assert_string_equal(c.core_path_reason,
                        "no core found: install Xray at /nonexistent-pn/xray or Debian's v2ray");
    pn_config_free(&c);

    /* A fake v2ray on PATH (an empty PATH entry and a missing dir are skipped). */
    make_exec("bin/v2ray", 0755);
    make_exec("bin/notexec", 0644);
    snprintf(pathvar, sizeof pathvar, "::/nonexistent-pn:%s", bin);
    setenv("PATH", pathvar, 1);
    load_ok(&c);
    snprintf(want, sizeof want, "%s/v2ray", bin);
    assert_string_equal(c.core_path, want);
    assert_string_equal(c.core_path_reason, "/nonexistent-pn/xray is missing; v2ray found on PATH");
    pn_config_free(&c);

    /* A non-executable xray earlier on PATH is skipped; an executable one wins over v2ray. */
    make_exec("bin2/xray", 0644);
    snprintf(pathvar, sizeof pathvar, "%s:%s", bin2, bin);
    setenv("PATH", pathvar, 1);
    load_ok(&c);
    snprintf(want, sizeof want, "%s/v2ray", bin);
    assert_string_equal(c.core_path, want);
    pn_config_free(&c);
    make_exec("bin/xray", 0755);
    load_ok(&c);
    snprintf(want, sizeof want, "%s/xray", bin);
    assert_string_equal(c.core_path, want);
    assert_string_equal(c.core_path_reason, "/nonexistent-pn/xray is missing; xray found on PATH");
    pn_config_free(&c);

    /* The default path, when executable, comes first. */
    snprintf(want, sizeof want, "%s/v2ray", bin);
    core_default_path = want;
    load_ok(&c);
    assert_string_equal(c.core_path, want);
    assert_string_equal(c.core_path_reason, "the default XRAY_EXECUTABLE_PATH");
    pn_config_free(&c);

    /* Explicit and missing: no core, not an error. */
    setenv("XRAY_EXECUTABLE_PATH", "/nonexistent-pn/bin/xray", 1);
    load_ok(&c);
    assert_null(c.core_path);
    assert_string_equal(c.xray_executable_path, "/nonexistent-pn/bin/xray");
    assert_string_equal(c.core_path_reason,
                        "XRAY_EXECUTABLE_PATH=/nonexistent-pn/bin/xray is not an executable file; "
                        "no core");
    pn_config_free(&c);

    /* Explicit and not executable. */
    snprintf(want, sizeof want, "%s/notexec", bin);
    setenv("XRAY_EXECUTABLE_PATH", want, 1);
    load_ok(&c);
    assert_null(c.core_path);
    pn_config_free(&c);

    /* Explicit and fine. */
    snprintf(want, sizeof want, "%s/v2ray", bin);
    setenv("XRAY_EXECUTABLE_PATH", want, 1);
    load_ok(&c);
    assert_string_equal(c.core_path, want);
    assert_string_equal(c.core_path_reason, "XRAY_EXECUTABLE_PATH is set");
    pn_config_free(&c);

    /* A bare name is looked up on PATH. */
    setenv("XRAY_EXECUTABLE_PATH", "v2ray", 1);
    load_ok(&c);
    assert_string_equal(c.core_path, want);
    assert_string_equal(c.core_path_reason, "XRAY_EXECUTABLE_PATH=v2ray, found on PATH");
    pn_config_free(&c);
}

static bool starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static void test_help(void **state)
{
    (void)state;
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    assert_non_null(out);
    pn_config_print_help(out);
    fclose(out);
    assert_true(starts_with(text, "Usage: proxynode [run|check|version] [--help]\n"));
    for (size_t i = 0; i < NVARS; i++) {
        char needle[64];
        snprintf(needle, sizeof needle, "\n  %s ", vars[i].name);
        if (!strstr(text, needle))
            fail_msg("--help lacks %s", vars[i].name);
    }
    assert_non_null(strstr(text, "62050"));
    assert_non_null(strstr(text, "1..65535"));
    assert_non_null(strstr(text, "grpc|rest"));
    assert_non_null(strstr(text, "auto|pasarguard|gozargah|marzban"));
    assert_non_null(strstr(text, "/var/lib/marzban-node/ssl_cert.pem"));
    assert_non_null(strstr(text, "<state>/certs/ssl_cert.pem"));
    assert_non_null(strstr(text, "Secret: never printed."));
    /* Columns line up: every variable row has its type at the same column. */
    char *row = strstr(text, "\n  SERVICE_PORT ");
    char *row2 = strstr(text, "\n  DEBUG ");
    assert_non_null(row);
    assert_non_null(row2);
    assert_int_equal(strstr(row, "port") - row, strstr(row2, "bool") - row2);
    /* No line is longer than 100 columns. */
    for (char *p = text; *p;) {
        size_t n = strcspn(p, "\n");
        if (n > 100)
            fail_msg("long help line: %.*s", (int)n, p);
        p += n + (p[n] == '\n');
    }
    free(text);
}

static void test_print(void **state)
{
    (void)state;
    setenv("API_KEY", KEY, 1);
    setenv("SERVICE_PORT", "443", 1);
    setenv("NODE_HOST", "127.0.0.1", 1);
    struct pn_config c;
    load_ok(&c);
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    pn_config_print(&c, out);
    fclose(out);
    assert_true(
        starts_with(text, "profile: pasarguard (PROXYNODE_PROFILE=auto and API_KEY is set)\n"));
    assert_null(strstr(text, KEY));
    assert_null(strstr(text, "123e4567"));
    assert_non_null(strstr(text, "\nAPI_KEY=********\n"));
    assert_non_null(strstr(text, "\nSERVICE_PORT=443\n"));
    assert_non_null(strstr(text, "\nNODE_HOST=127.0.0.1\n"));
    assert_non_null(strstr(text, "\nLOG_BUFFER_SIZE=10000 (default)\n"));
    assert_non_null(strstr(text, "\nDEBUG=false (default)\n"));
    assert_non_null(strstr(text, "\nSSL_CLIENT_CERT_FILE= (unset) [not used by the pasarguard "
                                 "profile]\n"));
    assert_non_null(strstr(text, "\nSERVICE_HOST=0.0.0.0 (default) [not used by the pasarguard "
                                 "profile]\n"));
    assert_non_null(strstr(text, "\nSTATS_UPDATE_INTERVAL_SECONDS=10 (default) [unused: "
                                 "WireGuard is not supported]\n"));
    assert_non_null(strstr(text, "\nmax body: 67108864 bytes\n"));
    assert_non_null(strstr(text, "\ncore: none (no core found: "));
    free(text);
    pn_config_free(&c);
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_defaults_pasarguard),
        T(test_values_parsed),
        T(test_bools),
        T(test_validation_errors),
        T(test_sizes_and_marzban),
        T(test_gozargah),
        T(test_profile_truth_table),
        T(test_api_key_forms),
        T(test_state_dir_defaults),
        T(test_ensure_api_key),
        T(test_bad_key_file),
        T(test_core_path),
        T(test_help),
        T(test_print),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
