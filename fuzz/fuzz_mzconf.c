/* fuzz_mzconf: the Marzban config rewrite (pn_mzconf_rewrite) on arbitrary
 * panel JSON: the number placeholders, the API inbound and rule removal and
 * insertion, the INBOUNDS filter, the log level. A success must give a
 * NUL-terminated text of the reported length that the rewrite accepts
 * again. And, without the node's own API inbound, the rewrite must be
 * idempotent from its second pass on: the first pass removes the panel's
 * API rules only when the input names an api.tag (spec marzban.md §7.3),
 * but its output always does, so later passes remove exactly what the pass
 * before inserted and insert it again.
 *
 * Input: opt[0] (bits 0-1: the INBOUNDS filter: none, one tag, two tags, a
 * tag no config has; bit 2: the node's internal API inbound; bit 3: an IPv6
 * panel address), then the config JSON. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/err.h"
#include "base/log.h"
#include "node/mzconf.h"

static void fail(const char *what, const char *detail)
{
    fprintf(stderr, "fuzz_mzconf: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const filters[4][2] = {
        {NULL, NULL}, {"VLESS TCP REALITY", NULL}, {"VMESS TCP", "Shadowsocks TCP"}, {"x", NULL}};
    static const size_t nfilter[4] = {0, 1, 2, 1};
    static bool quiet;
    if (!quiet) {
        quiet = true;
        if (!getenv("FUZZ_VERBOSE"))
            pn_log_set_level(PN_LOG_ERROR);
    }
    if (size < 1)
        return 0;
    uint8_t opt = data[0];
    struct pn_mzconf_opts o = {
        .config = (const char *)data + 1,
        .len = size - 1,
        .api_host = "0.0.0.0",
        .api_port = 62051,
        .cert_file = "/var/lib/marzban-node/ssl_cert.pem",
        .key_file = "/var/lib/marzban-node/ssl_key.pem",
        .peer_ip = (opt & 8) ? "2001:db8::1" : "203.0.113.7",
        .inbounds = filters[opt & 3],
        .ninbounds = nfilter[opt & 3],
        .internal_api_port = (opt & 4) ? 62052 : 0,
    };
    char *out = NULL;
    size_t outlen = 0;
    char err[512] = "";
    if (pn_mzconf_rewrite(&o, &out, &outlen, err, sizeof err) != PN_OK) {
        if (strncmp(err, "Failed to decode config: ", 25) != 0)
            fail("an error without the panel's prefix", err);
        if (out)
            fail("an error left an output", NULL);
        return 0;
    }
    if (!out || strlen(out) != outlen)
        fail("the output length is wrong", NULL);
    char *second = NULL, *third = NULL;
    size_t len2 = 0, len3 = 0;
    o.config = out;
    o.len = outlen;
    if (pn_mzconf_rewrite(&o, &second, &len2, err, sizeof err) != PN_OK)
        fail("the rewrite refuses its own output", err);
    if (!o.internal_api_port) {
        o.config = second;
        o.len = len2;
        if (pn_mzconf_rewrite(&o, &third, &len3, err, sizeof err) != PN_OK)
            fail("the rewrite refuses its own output", err);
        if (len3 != len2 || memcmp(second, third, len2) != 0) {
            fprintf(stderr, "second: %s\nthird:  %s\n", second, third);
            fail("a third rewrite changed the output", NULL);
        }
    }
    free(third);
    free(second);
    free(out);
    return 0;
}
