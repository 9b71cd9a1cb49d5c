/* The Marzban config rewrite (see mzconf.h, spec/marzban.md §7): the
 * panel's Xray config text in, the text the core runs out. It owns nothing
 * beyond one call: a scan of the input, an optional copy of it with number
 * placeholders, the jansson tree and the output text.
 *
 * jansson keeps key order and integers that fit in 64 bits, but it cannot
 * hold larger integers and prints reals with %.17g (1.10 would come back
 * as 1.1000000000000001). So before parsing, every number token that is
 * not a plain int64 integer (fractions, exponents, big integers, -0) is
 * replaced by a string placeholder "<C><L>NNUM_<index><C>", where C is a
 * control character and L a letter such that no string of the input holds
 * the pair C,L. After the rewrite the tree is printed (compact, UTF-8 kept
 * raw) and every placeholder, which jansson prints as "\u00XX<L>NNUM_...",
 * is replaced by the original number text. Since no input string holds C
 * followed by L, the printed text can hold that sequence only where a
 * placeholder stands, so a string in the config can never be mistaken for
 * a number. */
#include "node/mzconf.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/json.h"
#include "base/text.h"
#include "base/err.h"
#include "base/utf8.h"

#define DECODE_PREFIX "Failed to decode config: "
#define API_INBOUND_TAG "API_INBOUND"
#define API_OUTBOUND_TAG "API"
/* jansson refuses deeper documents ("maximum parsing depth reached"); the
 * scanner stops substituting there, so the error positions stay exact. */
#define MAX_DEPTH 2048
/* The placeholder word after the letter L; with "_" and at least one digit
 * the printed placeholder is longer than the 20 characters jansson quotes
 * as error context, so a placeholder never shows up in an error text. */
#define PH_WORD "NNUM_"

/* One number token of the input that jansson cannot keep exactly. */
struct numtok {
    size_t off, len;   /* in the input */
    size_t moff, mlen; /* its placeholder in the substituted text */
};

/* What the scan of the input found. */
struct scan {
    struct numtok *v;
    size_t n, cap;
    /* pair[c] bit l: a string holds control character c followed by the
     * letter 'A' + l, either case (conservative: L is always upper case). */
    uint32_t pair[32];
};

/* ---- small helpers ------------------------------------------------------ */

/* True when v is the string s exactly (a NUL inside v never matches). */
static bool str_is(const json_t *v, const char *s)
{
    size_t n = strlen(s);
    return json_is_string(v) && json_string_length(v) == n &&
           memcmp(json_string_value(v), s, n) == 0;
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* ---- scanning the input ------------------------------------------------- */

/* Whether p[0..n) is a JSON number (RFC 8259 grammar); *plain tells whether
 * it is an integer without fraction or exponent. */
static bool num_valid(const char *p, size_t n, bool *plain)
{
    size_t i = 0;
    if (i < n && p[i] == '-')
        i++;
    if (i >= n)
        return false;
    if (p[i] == '0')
        i++;
    else if (p[i] >= '1' && p[i] <= '9')
        while (i < n && is_digit(p[i]))
            i++;
    else
        return false;
    *plain = i == n;
    if (i < n && p[i] == '.') {
        i++;
        if (i >= n || !is_digit(p[i]))
            return false;
        while (i < n && is_digit(p[i]))
            i++;
    }
    if (i < n && (p[i] == 'e' || p[i] == 'E')) {
        i++;
        if (i < n && (p[i] == '+' || p[i] == '-'))
            i++;
        if (i >= n || !is_digit(p[i]))
            return false;
        while (i < n && is_digit(p[i]))
            i++;
    }
    return i == n;
}

/* Whether a plain integer token survives jansson unchanged: it fits in a
 * long long and is not -0 (which jansson would print as 0). */
static bool int_exact(const char *p, size_t n)
{
    bool neg = p[0] == '-';
    const char *d = p + neg;
    size_t nd = n - neg;
    if (neg && nd == 1 && d[0] == '0')
        return false;
    if (nd != 19)
        return nd < 19;
    return memcmp(d, neg ? "9223372036854775808" : "9223372036854775807", 19) <= 0;
}

static void scan_push(struct scan *sc, size_t off, size_t len)
{
    if (sc->n == sc->cap) {
        sc->cap = sc->cap ? 2 * sc->cap : 64;
        sc->v = pn_realloc(sc->v, sc->cap * sizeof *sc->v);
    }
    sc->v[sc->n++] = (struct numtok){.off = off, .len = len};
}

/* Notes that a string holds unit `cur` right after unit `prev` (decoded
 * code units; -1 for none): only a control character followed by an ASCII
 * letter matters for the placeholder choice. */
static void note_pair(struct scan *sc, long prev, long cur)
{
    if (prev < 0 || prev >= 32)
        return;
    if (cur >= 'A' && cur <= 'Z')
        sc->pair[prev] |= 1u << (cur - 'A');
    else if (cur >= 'a' && cur <= 'z')
        sc->pair[prev] |= 1u << (cur - 'a');
}

/* Skips the string starting at s[i] == '"' and returns the index after its
 * closing quote (or len), decoding escapes just enough to note which
 * control characters are followed by which letters. Malformed strings are
 * left for jansson to reject. */
static size_t scan_string(const char *s, size_t len, size_t i, struct scan *sc)
{
    long prev = -1;
    for (i++; i < len; i++) {
        long cur = (unsigned char)s[i];
        if (s[i] == '"')
            return i + 1;
        if (s[i] == '\\' && i + 1 < len) {
            char e = s[++i];
            switch (e) {
            case 'b':
                cur = '\b';
                break;
            case 'f':
                cur = '\f';
                break;
            case 'n':
                cur = '\n';
                break;
            case 'r':
                cur = '\r';
                break;
            case 't':
                cur = '\t';
                break;
            case 'u':
                cur = 0;
                for (int k = 1; k <= 4; k++) {
                    int h = i + k < len ? pn_hex_digit(s[i + k]) : -1;
                    if (h < 0) {
                        cur = -1;
                        break;
                    }
                    cur = cur * 16 + h;
                }
                if (cur >= 0)
                    i += 4;
                break;
            default:
                cur = (unsigned char)e;
                break;
            }
        }
        note_pair(sc, prev, cur);
        prev = cur;
    }
    return len;
}

/* One pass over the input outside strings: records every number token in a
 * value position (after ':' or '[', or after ',' inside an array) that
 * jansson would not print back as written. Tokens elsewhere, or malformed
 * ones, are left alone so that jansson rejects exactly what it would have
 * rejected in the original text; a placeholder never makes an invalid
 * document valid. */
static void scan_input(const char *s, size_t len, struct scan *sc)
{
    char stack[MAX_DEPTH + 1];
    size_t depth = 0;
    char prev = 0; /* the last significant character outside strings */
    size_t i = 0;
    while (i < len) {
        char c = s[i];
        if (c == '"') {
            i = scan_string(s, len, i, sc);
            prev = '"';
            continue;
        }
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
            i++;
            continue;
        }
        if (c == '[' || c == '{') {
            if (depth == MAX_DEPTH) {
                sc->n = 0; /* jansson refuses it: no positions to map */
                return;
            }
            stack[depth++] = c;
        } else if ((c == ']' || c == '}') && depth > 0) {
            depth--;
        } else if (c == '-' || is_digit(c)) {
            size_t j = i;
            while (j < len && (is_digit(s[j]) || s[j] == '-' || s[j] == '+' || s[j] == '.' ||
                               s[j] == 'e' || s[j] == 'E'))
                j++;
            bool value_pos =
                prev == ':' || prev == '[' || (prev == ',' && depth > 0 && stack[depth - 1] == '[');
            bool plain = false;
            if (value_pos && num_valid(s + i, j - i, &plain) && !(plain && int_exact(s + i, j - i)))
                scan_push(sc, i, j - i);
            prev = '0';
            i = j;
            continue;
        }
        prev = c;
        i++;
    }
}

/* Picks the placeholder's control character and letter: a pair no input
 * string holds. Control characters jansson prints in short form (\b, \t,
 * \n, \f, \r) are skipped, since the output is searched for "\u00XX". */
static bool pick_marker(const struct scan *sc, int *ctl, char *letter)
{
    for (int c = 0x1f; c >= 0x01; c--) {
        if (c == '\b' || c == '\t' || c == '\n' || c == '\f' || c == '\r')
            continue;
        for (int l = 'P' - 'A'; l < 'P' - 'A' + 26; l++) {
            int k = l % 26;
            if (!(sc->pair[c] & (1u << k))) {
                *ctl = c;
                *letter = (char)('A' + k);
                return true;
            }
        }
    }
    return false;
}

/* The placeholder for token idx as JSON text: "\u00XX" L NNUM_ idx "\u00XX"
 * with quotes. jansson prints the parsed string back in exactly this form
 * (upper-case hex). Returns its length (buf may be NULL to measure). */
static size_t placeholder(char *buf, size_t cap, int ctl, char letter, size_t idx)
{
    return (size_t)snprintf(buf, cap, "\"\\u%04X%c" PH_WORD "%zu\\u%04X\"", ctl, letter, idx, ctl);
}

/* Builds the input with every recorded token replaced by its placeholder,
 * noting where each placeholder landed (for error positions). */
static char *substitute(const char *s, size_t len, struct scan *sc, int ctl, char letter,
                        size_t *outlen)
{
    size_t cap = len + 1;
    for (size_t k = 0; k < sc->n; k++) { /* cap still counts token k: no wrap */
        cap += placeholder(NULL, 0, ctl, letter, k);
        cap -= sc->v[k].len;
    }
    char *m = pn_malloc(cap);
    size_t o = 0, from = 0;
    for (size_t k = 0; k < sc->n; k++) {
        struct numtok *t = &sc->v[k];
        memcpy(m + o, s + from, t->off - from);
        o += t->off - from;
        t->moff = o;
        t->mlen = placeholder(m + o, cap - o, ctl, letter, k);
        o += t->mlen;
        from = t->off + t->len;
    }
    memcpy(m + o, s + from, len - from);
    o += len - from;
    m[o] = '\0';
    *outlen = o;
    return m;
}

/* ---- errors ------------------------------------------------------------- */

/* The 422 text for a jansson error. jansson's position is a byte offset in
 * the text it parsed; with placeholders it is mapped back to the input and
 * the line and column (counted like jansson: characters, 1-based lines)
 * are recomputed there. */
static int decode_error(const char *s, size_t len, const struct scan *sc, const json_error_t *je,
                        char *err, size_t errlen)
{
    int line = je->line, col = je->column;
    if (sc->n > 0 && je->position >= 0) {
        size_t pos = (size_t)je->position, orig = pos;
        size_t lo = 0, hi = sc->n; /* the last placeholder starting before pos */
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (sc->v[mid].moff < pos)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo > 0) {
            const struct numtok *t = &sc->v[lo - 1];
            if (pos >= t->moff + t->mlen)
                orig = pos - (t->moff + t->mlen) + (t->off + t->len);
            else
                orig = t->off + t->len;
        }
        if (orig > len)
            orig = len;
        line = 1;
        col = 0;
        for (size_t i = 0; i < orig; i++) {
            unsigned char b = (unsigned char)s[i];
            if (b == '\n') {
                line++;
                col = 0;
            } else if ((b & 0xC0) != 0x80) {
                col++;
            }
        }
    }
    return pn_seterr(err, errlen, PN_ERR_INVAL, DECODE_PREFIX "%s at line %d column %d", je->text,
                     line, col);
}

/* ---- the rewrite -------------------------------------------------------- */

/* Gets root[key] as a container of the wanted type, creating it in place
 * when missing or null; NULL when it holds something else. */
static json_t *want(json_t *obj, const char *key, bool array)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        v = pn_json_nn(array ? json_array() : json_object());
        pn_json_set(obj, key, v);
        return v;
    }
    return (array ? json_is_array(v) : json_is_object(v)) ? v : NULL;
}

/* Whether inbound `in` stays (§7 step 2): the panel's own API inbound
 * never does; with a filter only listed tags do. */
static bool inbound_kept(const json_t *in, const struct pn_mzconf_opts *o)
{
    const json_t *tag = json_object_get(in, "tag");
    if (str_is(json_object_get(in, "protocol"), "dokodemo-door") && str_is(tag, API_INBOUND_TAG))
        return false;
    if (o->ninbounds == 0)
        return true;
    for (size_t i = 0; i < o->ninbounds; i++)
        if (o->inbounds[i] && str_is(tag, o->inbounds[i]))
            return true;
    return false;
}

/* Replaces obj[key] (an array) by the elements for which keep() holds, in
 * one pass; the key keeps its place. */
static void filter_array(json_t *obj, const char *key, json_t *arr,
                         bool (*keep)(const json_t *v, const void *arg), const void *arg)
{
    json_t *kept = pn_json_nn(json_array());
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v)
    {
        if (keep(v, arg))
            pn_json_append(kept, json_incref(v));
    }
    pn_json_set(obj, key, kept);
}

static bool keep_inbound(const json_t *v, const void *arg)
{
    return inbound_kept(v, arg);
}

/* A rule stays unless its outboundTag equals the input's api.tag (§7.3). */
static bool keep_rule(const json_t *v, const void *arg)
{
    const json_t *tag = json_object_get(v, "outboundTag");
    return !(json_is_string(tag) && json_equal(tag, arg));
}

static json_t *jstring(const char *s)
{
    return pn_json_nn(json_string(s));
}

static json_t *string_list(const char *a, const char *b)
{
    json_t *arr = pn_json_nn(json_array());
    pn_json_append(arr, jstring(a));
    if (b)
        pn_json_append(arr, jstring(b));
    return arr;
}

/* §7 step 7: the TLS API inbound the panel's gRPC client talks to. */
static json_t *api_inbound(const struct pn_mzconf_opts *o)
{
    json_t *in = pn_json_nn(json_object());
    pn_json_set(in, "listen", jstring(o->api_host));
    pn_json_set(in, "port", json_integer(o->api_port));
    pn_json_set(in, "protocol", jstring("dokodemo-door"));
    json_t *settings = pn_json_nn(json_object());
    pn_json_set(settings, "address", jstring("127.0.0.1"));
    pn_json_set(in, "settings", settings);
    json_t *cert = pn_json_nn(json_object());
    pn_json_set(cert, "certificateFile", jstring(o->cert_file));
    pn_json_set(cert, "keyFile", jstring(o->key_file));
    json_t *certs = pn_json_nn(json_array());
    pn_json_append(certs, cert);
    json_t *tls = pn_json_nn(json_object());
    pn_json_set(tls, "certificates", certs);
    json_t *stream = pn_json_nn(json_object());
    pn_json_set(stream, "security", jstring("tls"));
    pn_json_set(stream, "tlsSettings", tls);
    pn_json_set(in, "streamSettings", stream);
    pn_json_set(in, "tag", jstring(API_INBOUND_TAG));
    return in;
}

/* The node's own cleartext loopback API inbound (mzconf.h). */
static json_t *internal_inbound(uint16_t port)
{
    json_t *in = pn_json_nn(json_object());
    pn_json_set(in, "tag", jstring(PN_MZ_INTERNAL_API_TAG));
    pn_json_set(in, "listen", jstring("127.0.0.1"));
    pn_json_set(in, "port", json_integer(port));
    pn_json_set(in, "protocol", jstring("dokodemo-door"));
    json_t *settings = pn_json_nn(json_object());
    pn_json_set(settings, "address", jstring("127.0.0.1"));
    pn_json_set(in, "settings", settings);
    return in;
}

/* §7 step 8: the API inbound is reachable from loopback and the panel. */
static json_t *api_rule(const char *peer)
{
    json_t *r = pn_json_nn(json_object());
    pn_json_set(r, "inboundTag", string_list(API_INBOUND_TAG, NULL));
    pn_json_set(r, "source", string_list("127.0.0.1", peer && *peer ? peer : NULL));
    pn_json_set(r, "outboundTag", jstring(API_OUTBOUND_TAG));
    pn_json_set(r, "type", jstring("field"));
    return r;
}

static json_t *internal_rule(void)
{
    json_t *r = pn_json_nn(json_object());
    pn_json_set(r, "type", jstring("field"));
    pn_json_set(r, "inboundTag", string_list(PN_MZ_INTERNAL_API_TAG, NULL));
    pn_json_set(r, "source", string_list("127.0.0.1", NULL));
    pn_json_set(r, "outboundTag", jstring(API_OUTBOUND_TAG));
    return r;
}

/* §7 steps 2-9 on the parsed config. Fails only when `inbounds`,
 * `routing` or `routing.rules` holds something of the wrong type. */
static int rewrite(json_t *root, const struct pn_mzconf_opts *o, char *err, size_t errlen)
{
    json_t *inbounds = want(root, "inbounds", true);
    if (!inbounds)
        return pn_seterr(err, errlen, PN_ERR_INVAL, DECODE_PREFIX "\"inbounds\" must be an array");
    json_t *routing = want(root, "routing", false);
    if (!routing)
        return pn_seterr(err, errlen, PN_ERR_INVAL, DECODE_PREFIX "\"routing\" must be an object");
    json_t *rules = want(routing, "rules", true);
    if (!rules)
        return pn_seterr(err, errlen, PN_ERR_INVAL,
                         DECODE_PREFIX "\"routing.rules\" must be an array");

    filter_array(root, "inbounds", inbounds, keep_inbound, o);
    json_t *api_tag = json_object_get(json_object_get(root, "api"), "tag");
    if (json_is_string(api_tag))
        filter_array(routing, "rules", rules, keep_rule, api_tag);
    /* Both arrays were replaced; api_tag dies with the old `api` below. */
    inbounds = json_object_get(root, "inbounds");
    rules = json_object_get(routing, "rules");

    json_t *api = pn_json_nn(json_object());
    json_t *services = pn_json_nn(json_array());
    pn_json_append(services, jstring("HandlerService"));
    pn_json_append(services, jstring("StatsService"));
    pn_json_append(services, jstring("LoggerService"));
    pn_json_set(api, "services", services);
    pn_json_set(api, "tag", jstring(API_OUTBOUND_TAG));
    pn_json_set(root, "api", api);
    pn_json_set(root, "stats", pn_json_nn(json_object()));

    pn_json_insert(inbounds, 0, api_inbound(o));
    pn_json_insert(rules, 0, api_rule(o->peer_ip));
    if (o->internal_api_port != 0) {
        pn_json_insert(inbounds, 1, internal_inbound(o->internal_api_port));
        pn_json_insert(rules, 1, internal_rule());
    }

    json_t *log = json_object_get(root, "log");
    json_t *level = json_object_get(log, "logLevel");
    if (str_is(level, "none") || str_is(level, "error"))
        pn_json_set(log, "logLevel", jstring("warning"));
    return PN_OK;
}

/* ---- output ------------------------------------------------------------- */

/* Copies the printed tree into a new buffer, putting each placeholder's
 * original number text back. The search steps from backslash to backslash
 * with memchr (memmem would do, but sanitizers check its whole haystack on
 * every call, which makes a 50 MB config quadratic under ASan). */
static char *restore(const char *dump, size_t dlen, const char *input, const struct scan *sc,
                     int ctl, char letter, size_t *outlen)
{
    size_t extra = 0;
    for (size_t k = 0; k < sc->n; k++)
        extra += sc->v[k].len;
    char *out = pn_malloc(dlen + extra + 1);
    char head[16], tail[16];
    int hn = snprintf(head, sizeof head, "\\u%04X%c" PH_WORD, ctl, letter);
    int tn = snprintf(tail, sizeof tail, "\\u%04X\"", ctl);
    size_t o = 0, i = 0, from = 0;
    while (sc->n > 0 && i < dlen) {
        const char *b = memchr(dump + i, '\\', dlen - i);
        if (!b)
            break;
        size_t at = (size_t)(b - dump);
        i = at + 2; /* an escape is never shorter; "\\" must not match twice */
        if (at == 0 || dump[at - 1] != '"' || dlen - at < (size_t)hn ||
            memcmp(b, head, (size_t)hn) != 0)
            continue;
        size_t q = at + (size_t)hn, idx = 0;
        bool ok = q < dlen && is_digit(dump[q]);
        while (ok && q < dlen && is_digit(dump[q]) && idx <= sc->n)
            idx = idx * 10 + (size_t)(dump[q++] - '0');
        ok = ok && idx < sc->n && dlen - q >= (size_t)tn && memcmp(dump + q, tail, tn) == 0;
        if (!ok) /* cannot happen (see the top of the file): left as is */
            continue;
        memcpy(out + o, dump + from, at - 1 - from);
        o += at - 1 - from;
        memcpy(out + o, input + sc->v[idx].off, sc->v[idx].len);
        o += sc->v[idx].len;
        from = i = q + (size_t)tn;
    }
    memcpy(out + o, dump + from, dlen - from);
    o += dlen - from;
    out[o] = '\0';
    *outlen = o;
    return out;
}

/* Checks the caller's strings: they go into JSON strings verbatim. */
static int check_opts(const struct pn_mzconf_opts *o, char *err, size_t errlen)
{
    const char *const names[] = {"XRAY_API_HOST", "SSL_CERT_FILE", "SSL_KEY_FILE", "peer IP"};
    const char *const vals[] = {o->api_host, o->cert_file, o->key_file,
                                o->peer_ip ? o->peer_ip : ""};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        if (!vals[i])
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s is not set", names[i]);
        if (!pn_utf8_valid(vals[i], strlen(vals[i])))
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s is not valid UTF-8", names[i]);
    }
    if (!o->config && o->len > 0)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "no config text");
    return PN_OK;
}

int pn_mzconf_rewrite(const struct pn_mzconf_opts *o, char **out, size_t *outlen, char *err,
                      size_t errlen)
{
    struct scan sc = {0};
    char *subst = NULL, *dump = NULL;
    json_t *root = NULL;
    int ctl = 0;
    char letter = 0;
    *out = NULL;
    if (outlen)
        *outlen = 0;

    int rv = check_opts(o, err, errlen);
    if (rv < 0)
        goto out;
    const char *text = o->config ? o->config : "";
    size_t len = o->len, plen = len;
    const char *parse = text;

    scan_input(text, len, &sc);
    if (sc.n > 0) {
        if (!pick_marker(&sc, &ctl, &letter)) {
            rv = pn_seterr(err, errlen, PN_ERR_INVAL,
                           DECODE_PREFIX "its strings use every control character escape");
            goto out;
        }
        subst = substitute(text, len, &sc, ctl, letter, &plen);
        parse = subst;
    }

    json_error_t je;
    root = json_loadb(parse, plen, JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
    free(subst); /* as large as the config; only sc's offsets are needed now */
    subst = NULL;
    if (!root) {
        rv = decode_error(text, len, &sc, &je, err, errlen);
        goto out;
    }
    if (!json_is_object(root)) {
        rv = pn_seterr(err, errlen, PN_ERR_INVAL, DECODE_PREFIX "the config must be a JSON object");
        goto out;
    }
    rv = rewrite(root, o, err, errlen);
    if (rv < 0)
        goto out;

    dump = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!dump)
        pn_json_nn(NULL);
    size_t n;
    *out = restore(dump, strlen(dump), text, &sc, ctl, letter, &n);
    if (outlen)
        *outlen = n;
    rv = PN_OK;

out:
    free(dump);
    json_decref(root);
    free(subst);
    free(sc.v);
    return rv;
}
