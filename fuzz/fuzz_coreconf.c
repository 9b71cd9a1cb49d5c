/* fuzz_coreconf: the core config builder (pn_coreconf_build) on arbitrary
 * panel JSON, for Xray (old and new) and v2ray 4.34, with and without a
 * small set of users that covers every protocol and the awkward cases
 * (invalid UUIDs, empty secrets, SS-2022 keys, text that needs escaping,
 * invalid UTF-8). A success must produce JSON that parses again, and every
 * inbound it describes must be found by tag and accept the account query
 * the backend makes for each user.
 *
 * Input: opt[0] (bits 0-1: the core; bit 2: users; bit 3: exclude some
 * inbounds; bit 4: a metrics port (Xray); bit 5: extra local addresses),
 * then the panel's config JSON. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"
#include "node/coreconf.h"
#include "node/users.h"

/* The inbound tags of the configs in tests/data/coreconf and the seeds. */
/* clang-format off */
static const char *const tags[] = {
    "VMESS TCP", "VLESS TCP REALITY", "TROJAN WS", "SS AES", "SS 2022", "SS 2022 256", "HYSTERIA",
    "EXCLUDED VLESS", "vmess-in", "vless-in", "trojan-in", "ss-in", "ss-empty", "a", "b", "c", "in"};
/* clang-format on */

static struct pn_user *mk(const char *email)
{
    struct pn_user *u = pn_user_new(email);
    for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++)
        pn_user_add_inbound(u, tags[i]);
    return u;
}

static void set_all(struct pn_user *u, const char *id, const char *flow, const char *pw,
                    const char *method)
{
    u->has_vmess = u->has_vless = u->has_trojan = u->has_ss = u->has_hysteria = true;
    u->vmess_id = pn_strdup(id);
    u->vless_id = pn_strdup(id);
    u->vless_flow = pn_strdup(flow);
    u->trojan_password = pn_strdup(pw);
    u->ss_password = pn_strdup(pw);
    u->ss_method = pn_strdup(method);
    u->hysteria_auth = pn_strdup(pw);
}

/* Built once: the fuzzer calls the target millions of times. */
static struct pn_userset *users(void)
{
    static struct pn_userset *set;
    if (set)
        return set;
    set = pn_userset_new();
    struct pn_user *u = mk("1.alice");
    set_all(u, "2d3b3b8e-4c2f-4a4f-9e7d-0b1b2c3d4e5f", "xtls-rprx-vision", "s3cret", "aes-128-gcm");
    pn_userset_put(set, u);
    u = mk("2.bob");
    set_all(u, "not-a-uuid", "", "", "2022-blake3-aes-128-gcm");
    pn_userset_put(set, u);
    u = mk("3.carol");
    set_all(u, "2D3B3B8E4C2F4A4F9E7D0B1B2C3D4E5F", "none",
            "AAAAAAAAAAAAAAAAAAAAAA==", "2022-blake3-aes-256-gcm");
    pn_userset_put(set, u);
    u = mk("4.\"quote\\back\"\n\xc3\xa9");
    set_all(u, "00000000-0000-0000-0000-000000000000", "xtls", "p\"w\\", "chacha20-ietf-poly1305");
    pn_userset_put(set, u);
    u = mk("5.bad\xff\xfe utf8");
    set_all(u, "2d3b3b8e-4c2f-4a4f-9e7d-0b1b2c3d4e5f", "\xff", "pw\xc3", "none");
    pn_userset_put(set, u);
    pn_userset_put(set, mk("6.noaccounts"));
    u = pn_user_new("7.notags");
    set_all(u, "2d3b3b8e-4c2f-4a4f-9e7d-0b1b2c3d4e5f", "", "pw", "aes-256-gcm");
    pn_userset_put(set, u);
    return set;
}

struct acct_ctx {
    const struct pn_coreconf *cc;
    const struct pn_core_version *core;
};

static void query_accounts(const struct pn_user *u, void *arg)
{
    struct acct_ctx *ctx = arg;
    for (size_t i = 0; i < ctx->cc->ninbounds; i++) {
        struct pn_core_account acct;
        char scratch[PN_COREACCT_SCRATCH];
        pn_coreconf_account(&ctx->cc->inbounds[i], u, ctx->core, &acct, scratch, sizeof scratch);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const struct pn_core_version cores[4] = {
        {PN_CORE_XRAY, 25, 10, 15, "25.10.15"},
        {PN_CORE_XRAY, 26, 7, 11, "26.7.11"},
        {PN_CORE_V2RAY, 4, 34, 0, "4.34.0"},
        {PN_CORE_XRAY, 1, 8, 4, "1.8.4"},
    };
    static const char *const exclude[] = {"EXCLUDED VLESS", "a", "ss-in"};
    static const char *const addrs[] = {"10.0.0.5", "::1", "2001:db8::7"};
    static bool quiet;
    if (!quiet) {
        quiet = true;
        if (!getenv("FUZZ_VERBOSE"))
            pn_log_set_level(PN_LOG_ERROR);
    }
    if (size < 1)
        return 0;
    uint8_t opt = data[0];
    const struct pn_core_version *core = &cores[opt & 3];
    struct pn_coreconf_opts o = {
        .panel_json = (const char *)data + 1,
        .panel_len = size - 1,
        .exclude = (opt & 8) ? exclude : NULL,
        .nexclude = (opt & 8) ? 3 : 0,
        .core = *core,
        .api_port = 10085,
        .metrics_port = (opt & 16) && core->kind == PN_CORE_XRAY ? 10086 : 0,
        .local_addrs = (opt & 32) ? addrs : NULL,
        .naddrs = (opt & 32) ? 3 : 0,
        .users = (opt & 4) ? users() : NULL,
    };
    struct pn_coreconf cc;
    char err[512] = "";
    if (pn_coreconf_build(&o, &cc, err, sizeof err) != PN_OK) {
        if (!err[0]) {
            fprintf(stderr, "fuzz_coreconf: a failed build gave no reason\n");
            abort();
        }
        return 0;
    }
    if (!cc.json || strlen(cc.json) != cc.json_len) {
        fprintf(stderr, "fuzz_coreconf: json_len does not match the text\n");
        abort();
    }
    json_error_t jerr;
    json_t *root = json_loadb(cc.json, cc.json_len, 0, &jerr);
    if (!root || !json_is_object(root)) {
        fprintf(stderr, "fuzz_coreconf: the built config is not a JSON object: %s\n", jerr.text);
        abort();
    }
    json_decref(root);
    for (size_t i = 0; i < cc.ninbounds; i++) {
        const struct pn_inbound_info *in = pn_coreconf_inbound(&cc, cc.inbounds[i].tag);
        if (!in || strcmp(in->tag, cc.inbounds[i].tag) != 0) {
            fprintf(stderr, "fuzz_coreconf: inbound \"%s\" not found by its tag\n",
                    cc.inbounds[i].tag);
            abort();
        }
    }
    struct acct_ctx ctx = {&cc, core};
    pn_userset_foreach(users(), query_accounts, &ctx);
    pn_coreconf_free(&cc);
    return 0;
}
