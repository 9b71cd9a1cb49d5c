/* TLS for the node's listeners. This module owns the server SSL_CTX (built
 * from the operator's PEM files, swapped whole on reload so live connections
 * keep the context they started with), the ALPN choice between "h2" and
 * "http/1.1", optional client-certificate verification for the legacy mTLS
 * mode, and the self-signed certificate the node generates for itself when
 * the operator supplies none: an ECDSA P-256 key and an X.509 v3 certificate
 * shaped so that strict verifiers (Python >= 3.13, Go) accept it as its own
 * trust anchor. Every OpenSSL failure is turned into "<path>: <problem>:
 * <OpenSSL reason>" in the caller's buffer, and the thread's OpenSSL error
 * queue is left empty so no stale error confuses a later SSL_get_error(). */
#include "net/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <limits.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "base/alloc.h"
#include "base/err.h"
#include "base/log.h"

/* PEM files larger than this are not certificates or keys. */
#define PN_TLS_MAX_FILE (1024 * 1024)
/* Validity beyond a century is a typo, and would overflow the day count. */
#define PN_TLS_MAX_DAYS 36500u
#define PN_TLS_DEFAULT_DAYS 3650u
/* TLS 1.2 suites: forward secrecy and AEAD only. TLS 1.3 suites are all strong. */
#define PN_TLS_CIPHERS "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

struct pn_tls {
    char *cert_file;
    char *key_file;
    char *client_ca_file; /* NULL = no client certificates */
    bool alpn_h2;
    SSL_CTX *ctx; /* one reference is ours; each SSL made from it holds another */
};

/* The ALPN callback's argument: its address means "h2 allowed", NULL means
 * HTTP/1.1 only. A static marker rather than the pn_tls itself, so a context
 * that outlives its pn_tls (through a live SSL) never points at freed memory. */
static const char pn_tls_h2_marker = 1;

/* Formats "<fmt>: <OpenSSL reason>" into err, takes the reason from the
 * oldest queued error (the most specific one, e.g. "no start line" before
 * "PEM lib"), empties the queue and returns code. */
static int tls_fail(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int tls_fail(char *err, size_t errlen, int code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    const char *data = NULL;
    int flags = 0;
    unsigned long e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags);
    if (e == 0) {
        ERR_clear_error();
        return pn_seterr(err, errlen, code, "%s", msg);
    }
    char reason[256];
    const char *r = ERR_reason_error_string(e);
    if (r)
        snprintf(reason, sizeof(reason), "%s", r);
    else
        ERR_error_string_n(e, reason, sizeof(reason));
    if (data && *data && (flags & ERR_TXT_STRING))
        code = pn_seterr(err, errlen, code, "%s: %s (%s)", msg, reason, data);
    else
        code = pn_seterr(err, errlen, code, "%s: %s", msg, reason);
    ERR_clear_error(); /* data points into the queue: clear only after use */
    return code;
}

/* Refuses every passphrase prompt: an encrypted key must fail to load, not
 * make a daemon wait for a terminal. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

/* Reads a whole (small) file into memory so that "cannot read" (PN_ERR_IO)
 * and "cannot parse" (PN_ERR_TLS) are told apart reliably. *out is also
 * NUL-terminated; the caller frees it, cleansing a key buffer first. */
static int read_small_file(const char *path, char **out, size_t *outlen, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", path, strerror(errno));
    int rv = PN_OK;
    char *buf = NULL;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", path, strerror(EISDIR));
        goto out;
    }
    size_t cap = 4096, len = 0;
    buf = pn_malloc(cap);
    for (;;) {
        if (len == cap) {
            if (cap >= PN_TLS_MAX_FILE) {
                rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: larger than %d bytes", path,
                               PN_TLS_MAX_FILE);
                goto out;
            }
            char *nb = pn_malloc(cap * 2);
            memcpy(nb, buf, len);
            OPENSSL_cleanse(buf, cap);
            free(buf);
            buf = nb;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", path, strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    buf[len] = '\0'; /* room is left: the last read found it free */
    *out = buf;
    *outlen = len;
    buf = NULL;
out:
    if (buf) {
        OPENSSL_cleanse(buf, cap);
        free(buf);
    }
    close(fd);
    return rv;
}

static void free_secret(char *buf, size_t len)
{
    if (!buf)
        return;
    OPENSSL_cleanse(buf, len);
    free(buf);
}

/* True when the last queued error only says the PEM input ran out, which is
 * how a loop over the certificates of a file ends. */
static bool pem_at_end(void)
{
    unsigned long e = ERR_peek_last_error();
    return e == 0 || (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE);
}

/* Installs the leaf certificate and any chain certificates that follow it. */
static int load_cert_chain(SSL_CTX *ctx, const char *path, const char *pem, size_t len, char *err,
                           size_t errlen)
{
    int rv = PN_OK;
    X509 *x = NULL;
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (!bio)
        return tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot read certificate", path);

    x = PEM_read_bio_X509_AUX(bio, NULL, no_passphrase, NULL);
    if (!x) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot read certificate", path);
        goto out;
    }
    if (SSL_CTX_use_certificate(ctx, x) != 1) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: certificate rejected", path);
        goto out;
    }
    X509_free(x);
    x = NULL;

    while ((x = PEM_read_bio_X509(bio, NULL, no_passphrase, NULL)) != NULL) {
        if (SSL_CTX_add0_chain_cert(ctx, x) != 1) {
            rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: chain certificate rejected", path);
            goto out;
        }
        x = NULL; /* the context owns it now */
    }
    if (!pem_at_end()) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot read chain certificate", path);
        goto out;
    }
    ERR_clear_error();
out:
    X509_free(x);
    BIO_free(bio);
    return rv;
}

/* Installs the private key. A key that parses but does not fit the
 * certificate is reported as a mismatch naming both files. */
static int load_key(SSL_CTX *ctx, const char *path, const char *cert_path, const char *pem,
                    size_t len, char *err, size_t errlen)
{
    int rv = PN_OK;
    EVP_PKEY *pkey = NULL;
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (!bio)
        return tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot read private key", path);

    pkey = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    if (!pkey) {
        /* OpenSSL's reasons here ("unsupported", "bad decrypt") say little;
         * name the two usual mistakes plainly. */
        if (memmem(pem, len, "ENCRYPTED", 9))
            rv = pn_seterr(err, errlen, PN_ERR_TLS, "%s: encrypted private keys are not supported",
                           path);
        else if (!memmem(pem, len, "-----BEGIN ", 11))
            rv = pn_seterr(err, errlen, PN_ERR_TLS, "%s: no PEM private key found", path);
        else
            rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot read private key", path);
        ERR_clear_error();
        goto out;
    }
    if (SSL_CTX_use_PrivateKey(ctx, pkey) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: private key does not match certificate %s",
                      path, cert_path);
        goto out;
    }
out:
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    return rv;
}

/* Makes every certificate in the CA file a trust anchor for client
 * certificates and advertises their subjects in the CertificateRequest.
 * Partial chains are allowed so that a listed certificate is trusted even
 * when it is not self-signed: the file is the operator's pin list. */
static int load_client_cas(SSL_CTX *ctx, const char *path, const char *pem, size_t len, char *err,
                           size_t errlen)
{
    int rv = PN_OK;
    X509 *x = NULL;
    size_t count = 0;
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (!bio)
        return tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot read CA certificates", path);

    while ((x = PEM_read_bio_X509_AUX(bio, NULL, no_passphrase, NULL)) != NULL) {
        if (X509_STORE_add_cert(store, x) != 1 || SSL_CTX_add_client_CA(ctx, x) != 1) {
            rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: CA certificate rejected", path);
            goto out;
        }
        X509_free(x);
        x = NULL;
        count++;
    }
    if (!pem_at_end()) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot read CA certificate", path);
        goto out;
    }
    ERR_clear_error();
    if (count == 0) {
        rv = pn_seterr(err, errlen, PN_ERR_TLS, "%s: no certificate found", path);
        goto out;
    }
    X509_STORE_set_flags(store, X509_V_FLAG_PARTIAL_CHAIN);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
out:
    X509_free(x);
    BIO_free(bio);
    return rv;
}

/* The server's ALPN choice for one port that serves gRPC and REST: "h2"
 * when allowed and offered, else "http/1.1" when offered, else nothing. It
 * never fails the handshake: a client that offers neither still gets TLS
 * and the listener sniffs what it speaks. arg is &pn_tls_h2_marker or NULL. */
static int pn_tls_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                              const unsigned char *in, unsigned int inlen, void *arg)
{
    static const unsigned char h2[] = "h2";
    static const unsigned char http11[] = "http/1.1";
    bool allow_h2 = arg != NULL, has_h2 = false, has_http11 = false;
    (void)ssl;

    for (unsigned int i = 0; i < inlen;) {
        unsigned int n = in[i++];
        if (n == 0 || n > inlen - i)
            return SSL_TLSEXT_ERR_NOACK; /* malformed list: choose nothing */
        if (n == 2 && memcmp(in + i, h2, 2) == 0)
            has_h2 = true;
        else if (n == 8 && memcmp(in + i, http11, 8) == 0)
            has_http11 = true;
        i += n;
    }
    if (allow_h2 && has_h2) {
        *out = h2;
        *outlen = 2;
        return SSL_TLSEXT_ERR_OK;
    }
    if (has_http11) {
        *out = http11;
        *outlen = 8;
        return SSL_TLSEXT_ERR_OK;
    }
    return SSL_TLSEXT_ERR_NOACK;
}

/* Builds a complete server context from the files named in tls. Used by
 * both pn_tls_new and pn_tls_reload, so a reload checks exactly what a
 * start checks. On success *out holds the only reference. */
static int build_ctx(const struct pn_tls *tls, SSL_CTX **out, char *err, size_t errlen)
{
    static const unsigned char sid_ctx[] = "proxynode";
    SSL_CTX *ctx = NULL;
    char *cert = NULL, *key = NULL, *ca = NULL;
    size_t cert_len = 0, key_len = 0, ca_len = 0;
    int rv;

    ERR_clear_error();
    rv = read_small_file(tls->cert_file, &cert, &cert_len, err, errlen);
    if (rv < 0)
        goto out;
    rv = read_small_file(tls->key_file, &key, &key_len, err, errlen);
    if (rv < 0)
        goto out;
    if (tls->client_ca_file) {
        rv = read_small_file(tls->client_ca_file, &ca, &ca_len, err, errlen);
        if (rv < 0)
            goto out;
    }

    ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot create TLS context", tls->cert_file);
        goto out;
    }
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, 0) != 1 ||
        SSL_CTX_set_cipher_list(ctx, PN_TLS_CIPHERS) != 1 ||
        SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1) != 1) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot configure TLS context", tls->cert_file);
        goto out;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_NO_COMPRESSION | SSL_OP_NO_TICKET);
    /* No resumption: panels hold long-lived connections and their clients
     * never resume, so session tickets (two per TLS 1.3 handshake, each
     * carrying the client certificate under mTLS) and a session cache only
     * cost CPU and memory: ~20% of a new mTLS connection's server time. */
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    SSL_CTX_set_alpn_select_cb(ctx, pn_tls_alpn_select,
                               tls->alpn_h2 ? (void *)&pn_tls_h2_marker : NULL);

    rv = load_cert_chain(ctx, tls->cert_file, cert, cert_len, err, errlen);
    if (rv < 0)
        goto out;
    rv = load_key(ctx, tls->key_file, tls->cert_file, key, key_len, err, errlen);
    if (rv < 0)
        goto out;
    if (ca) {
        rv = load_client_cas(ctx, tls->client_ca_file, ca, ca_len, err, errlen);
        if (rv < 0)
            goto out;
    }
    *out = ctx;
    ctx = NULL;
out:
    SSL_CTX_free(ctx);
    free(cert);
    free_secret(key, key_len);
    free(ca);
    ERR_clear_error();
    return rv;
}

int pn_tls_new(const struct pn_tls_opts *opts, struct pn_tls **out, char *err, size_t errlen)
{
    if (!opts || !opts->cert_file || !opts->key_file || !out)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "TLS needs a certificate and a key file");
    struct pn_tls *tls = pn_new(struct pn_tls);
    tls->cert_file = pn_strdup(opts->cert_file);
    tls->key_file = pn_strdup(opts->key_file);
    tls->client_ca_file = opts->client_ca_file ? pn_strdup(opts->client_ca_file) : NULL;
    tls->alpn_h2 = opts->alpn_h2;
    int rv = build_ctx(tls, &tls->ctx, err, errlen);
    if (rv < 0) {
        pn_tls_free(tls);
        return rv;
    }
    *out = tls;
    return PN_OK;
}

/* Swaps in a freshly built context. Dropping our reference to the old one
 * frees it only once the last SSL made from it is gone (OpenSSL counts
 * them), so connections in flight keep their certificate and settings. */
int pn_tls_reload(struct pn_tls *tls, char *err, size_t errlen)
{
    SSL_CTX *fresh = NULL;
    int rv = build_ctx(tls, &fresh, err, errlen);
    if (rv < 0)
        return rv;
    SSL_CTX_free(tls->ctx);
    tls->ctx = fresh;
    return PN_OK;
}

/* SSL_new fails only when memory runs out, so this follows the node's OOM
 * policy (alloc.h) and aborts rather than handing NULL to the listener. */
SSL *pn_tls_ssl_new(struct pn_tls *tls)
{
    SSL *ssl = SSL_new(tls->ctx);
    if (!ssl) {
        char reason[256];
        ERR_error_string_n(ERR_get_error(), reason, sizeof(reason));
        fprintf(stderr, "proxynode: SSL_new failed: %s\n", reason);
        abort();
    }
    return ssl;
}

void pn_tls_free(struct pn_tls *tls)
{
    if (!tls)
        return;
    SSL_CTX_free(tls->ctx);
    free(tls->cert_file);
    free(tls->key_file);
    free(tls->client_ca_file);
    free(tls);
}

/* --- names ------------------------------------------------------------- */

/* Parses an IPv4 or IPv6 literal into bytes; returns the address length
 * (4 or 16), or 0 when s is not an IP literal. */
static size_t ip_parse(const char *s, unsigned char out[16])
{
    if (inet_pton(AF_INET, s, out) == 1)
        return 4;
    if (inet_pton(AF_INET6, s, out) == 1)
        return 16;
    return 0;
}

/* Two names denote the same SAN entry: equal addresses for IP literals
 * ("::1" and "0::1"), case-insensitive equality for DNS names. */
static bool names_equal(const char *a, const char *b)
{
    unsigned char ba[16], bb[16];
    size_t la = ip_parse(a, ba), lb = ip_parse(b, bb);
    if (la || lb)
        return la == lb && memcmp(ba, bb, la) == 0;
    return strcasecmp(a, b) == 0;
}

/* A DNS SAN must be IA5 and should look like a host name; this refuses
 * what would produce a certificate no client can match (spaces, control
 * characters, non-ASCII, zone ids like "fe80::1%eth0"). Wildcards and
 * underscores pass: they are the operator's business. */
static bool dns_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 253)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.' || c == '_' || c == '*'))
            return false;
    }
    return true;
}

/* Appends a copy of s[0..len) unless it is empty or already listed. */
static void names_add(char ***v, size_t *n, size_t *cap, const char *s, size_t len)
{
    if (len == 0)
        return;
    char *copy = pn_strndup(s, len);
    for (size_t i = 0; i < *n; i++) {
        if (names_equal((*v)[i], copy)) {
            free(copy);
            return;
        }
    }
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 8;
        *v = pn_realloc(*v, *cap * sizeof(**v));
    }
    (*v)[(*n)++] = copy;
}

/* Every address this host can be dialed at, so that a panel given any of
 * them finds it in the SAN. IPv6 link-local addresses are left out: they
 * need a zone id, which a URL and a SAN cannot carry. */
static void names_add_interfaces(char ***v, size_t *n, size_t *cap)
{
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs) < 0) {
        pn_log_warn("tls: getifaddrs: %s; certificate names will lack interface addresses",
                    strerror(errno));
        return;
    }
    for (struct ifaddrs *ifa = ifs; ifa; ifa = ifa->ifa_next) {
        if (!ifa->ifa_addr || !(ifa->ifa_flags & IFF_UP))
            continue;
        char buf[INET6_ADDRSTRLEN];
        const char *s = NULL;
        if (ifa->ifa_addr->sa_family == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)(void *)ifa->ifa_addr;
            s = inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf));
        } else if (ifa->ifa_addr->sa_family == AF_INET6) {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)(void *)ifa->ifa_addr;
            if (IN6_IS_ADDR_LINKLOCAL(&sin6->sin6_addr))
                continue;
            s = inet_ntop(AF_INET6, &sin6->sin6_addr, buf, sizeof(buf));
        }
        if (s)
            names_add(v, n, cap, s, strlen(s));
    }
    freeifaddrs(ifs);
}

char **pn_tls_default_names(const char *extra_csv, size_t *n)
{
    char **v = NULL;
    size_t cap = 0;
    *n = 0;
    names_add(&v, n, &cap, "localhost", strlen("localhost"));
    names_add(&v, n, &cap, "127.0.0.1", strlen("127.0.0.1"));
    names_add(&v, n, &cap, "::1", strlen("::1"));
    names_add_interfaces(&v, n, &cap);

    char host[HOST_NAME_MAX + 1];
    if (gethostname(host, sizeof(host)) == 0) {
        host[sizeof(host) - 1] = '\0';
        if (dns_name_ok(host) || ip_parse(host, (unsigned char[16]){0}))
            names_add(&v, n, &cap, host, strlen(host));
    }

    for (const char *p = extra_csv; p && *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *s = p;
        while (len > 0 && (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')) {
            s++;
            len--;
        }
        while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '\n' ||
                           s[len - 1] == '\r'))
            len--;
        names_add(&v, n, &cap, s, len);
        if (!end)
            break;
        p = end + 1;
    }
    return v;
}

void pn_tls_free_names(char **names, size_t n)
{
    if (!names)
        return;
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

/* --- certificate generation -------------------------------------------- */

/* Adds one extension from its decoded form (X509_add1_ext_i2d encodes it). */
static int add_ext(X509 *x, int nid, void *value, bool critical, const char *path, char *err,
                   size_t errlen)
{
    if (X509_add1_ext_i2d(x, nid, value, critical ? 1 : 0, X509V3_ADD_REPLACE) != 1)
        return tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot add extension %s", path,
                        OBJ_nid2sn(nid));
    return PN_OK;
}

/* Builds the subjectAltName: IP entries for IPv4/IPv6 literals, DNS entries
 * for everything else, skipping empty names and repeats. No names means no
 * extension (an empty SAN is invalid). */
static int add_san(X509 *x, const struct pn_cert_opts *opts, const char *path, char *err,
                   size_t errlen)
{
    int rv = PN_OK;
    GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
    GENERAL_NAME *gn = NULL;
    if (!gens)
        return tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot build subjectAltName", path);

    for (size_t i = 0; i < opts->nnames; i++) {
        const char *name = opts->names[i];
        if (!name || !*name)
            continue;
        bool dup = false;
        for (size_t j = 0; j < i && !dup; j++)
            dup = opts->names[j] && names_equal(opts->names[j], name);
        if (dup)
            continue;

        unsigned char ip[16];
        size_t iplen = ip_parse(name, ip);
        if (!iplen && !dns_name_ok(name)) {
            rv = pn_seterr(err, errlen, PN_ERR_TLS,
                           "%s: \"%s\" is neither an IP address nor a "
                           "DNS name",
                           path, name);
            goto out;
        }
        ASN1_STRING *s = iplen ? ASN1_OCTET_STRING_new() : ASN1_IA5STRING_new();
        gn = GENERAL_NAME_new();
        if (!s || !gn ||
            ASN1_STRING_set(s, iplen ? (const void *)ip : (const void *)name,
                            iplen ? (int)iplen : (int)strlen(name)) != 1) {
            ASN1_STRING_free(s);
            rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot build subjectAltName", path);
            goto out;
        }
        GENERAL_NAME_set0_value(gn, iplen ? GEN_IPADD : GEN_DNS, s);
        if (!sk_GENERAL_NAME_push(gens, gn)) {
            rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot build subjectAltName", path);
            goto out;
        }
        gn = NULL;
    }
    if (sk_GENERAL_NAME_num(gens) > 0)
        rv = add_ext(x, NID_subject_alt_name, gens, false, path, err, errlen);
out:
    GENERAL_NAME_free(gn);
    GENERAL_NAMES_free(gens);
    return rv;
}

/* Fills in everything but the signature. The extensions are built from
 * their structures rather than from config strings: OpenSSL 3 silently
 * drops "authorityKeyIdentifier=keyid" on self-signed certificates, and
 * strict verifiers want AKI = SKI. */
static int fill_cert(X509 *x, EVP_PKEY *pkey, const struct pn_cert_opts *opts, const char *path,
                     char *err, size_t errlen)
{
    int rv = PN_OK;
    BIGNUM *bn = NULL;
    X509_NAME *name = NULL;
    BASIC_CONSTRAINTS *bc = NULL;
    ASN1_BIT_STRING *ku = NULL;
    ASN1_OCTET_STRING *ski = NULL;
    AUTHORITY_KEYID *aki = NULL;
    const char *cn = opts->cn && *opts->cn ? opts->cn : "proxynode";
    unsigned days = opts->days ? opts->days : PN_TLS_DEFAULT_DAYS;

    if (days > PN_TLS_MAX_DAYS) {
        rv = pn_seterr(err, errlen, PN_ERR_TLS, "%s: validity of %u days is over %u", path, days,
                       PN_TLS_MAX_DAYS);
        goto out;
    }
    if (X509_set_version(x, X509_VERSION_3) != 1) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot set version", path);
        goto out;
    }

    /* 20 random octets with the top bit clear and the next one set: a
     * positive serial of exactly 159 bits, inside RFC 5280's 20-octet cap. */
    unsigned char serial[20];
    if (RAND_bytes(serial, sizeof(serial)) != 1) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: no randomness for the serial", path);
        goto out;
    }
    serial[0] = (unsigned char)((serial[0] & 0x7f) | 0x40);
    bn = BN_bin2bn(serial, sizeof(serial), NULL);
    if (!bn || !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x))) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot set serial", path);
        goto out;
    }

    name = X509_NAME_new();
    if (!name || X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn,
                                            -1, -1, 0) != 1) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: bad common name \"%s\"", path, cn);
        goto out;
    }
    if (X509_set_subject_name(x, name) != 1 || X509_set_issuer_name(x, name) != 1 ||
        !X509_gmtime_adj(X509_getm_notBefore(x), -3600) ||
        !X509_time_adj_ex(X509_getm_notAfter(x), (int)days, 0, NULL) ||
        X509_set_pubkey(x, pkey) != 1) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot fill certificate", path);
        goto out;
    }

    bc = BASIC_CONSTRAINTS_new();
    if (!bc) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot build basicConstraints", path);
        goto out;
    }
    bc->ca = 0xff;
    rv = add_ext(x, NID_basic_constraints, bc, true, path, err, errlen);
    if (rv < 0)
        goto out;

    ku = ASN1_BIT_STRING_new();
    if (!ku || ASN1_BIT_STRING_set_bit(ku, 0, 1) != 1 || /* digitalSignature */
        ASN1_BIT_STRING_set_bit(ku, 5, 1) != 1) {        /* keyCertSign */
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot build keyUsage", path);
        goto out;
    }
    rv = add_ext(x, NID_key_usage, ku, true, path, err, errlen);
    if (rv < 0)
        goto out;

    /* RFC 5280 4.2.1.2 method 1: SHA-1 of the subjectPublicKey bits. */
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    ski = ASN1_OCTET_STRING_new();
    aki = AUTHORITY_KEYID_new();
    if (!ski || !aki || X509_pubkey_digest(x, EVP_sha1(), md, &mdlen) != 1 ||
        ASN1_OCTET_STRING_set(ski, md, (int)mdlen) != 1 ||
        !(aki->keyid = ASN1_OCTET_STRING_dup(ski))) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot compute key identifier", path);
        goto out;
    }
    rv = add_ext(x, NID_subject_key_identifier, ski, false, path, err, errlen);
    if (rv < 0)
        goto out;
    rv = add_ext(x, NID_authority_key_identifier, aki, false, path, err, errlen);
    if (rv < 0)
        goto out;

    rv = add_san(x, opts, path, err, errlen);
out:
    AUTHORITY_KEYID_free(aki);
    ASN1_OCTET_STRING_free(ski);
    ASN1_BIT_STRING_free(ku);
    BASIC_CONSTRAINTS_free(bc);
    X509_NAME_free(name);
    BN_free(bn);
    return rv;
}

/* Creates the missing directories leading to path, each with mode 0700
 * (the state directory holds the private key). */
static int make_parents(const char *path, char *err, size_t errlen)
{
    int rv = PN_OK;
    char *dir = pn_strdup(path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        goto out;
    *slash = '\0';
    for (char *p = dir + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        if (mkdir(dir, 0700) < 0) {
            struct stat st;
            int e = errno;
            if (e != EEXIST) {
                rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: cannot create directory: %s", dir,
                               strerror(e));
                goto out;
            }
            if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
                rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", dir, strerror(ENOTDIR));
                goto out;
            }
        }
        *p = saved;
        if (saved == '\0')
            break;
    }
out:
    free(dir);
    return rv;
}

/* Writes data to "<path>.tmp.<pid>" created with mode (never widened
 * later) and fsyncs it; the caller renames it into place. *tmp_out is set
 * as soon as the file exists, so the caller can unlink it on any failure. */
static int write_tmp(const char *path, const char *data, size_t len, mode_t mode, char **tmp_out,
                     char *err, size_t errlen)
{
    char *tmp = pn_asprintf("%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0 && errno == EEXIST) {
        /* Left by an earlier process that had our pid and died mid-write. */
        unlink(tmp);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    }
    if (fd < 0) {
        int rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", tmp, strerror(errno));
        free(tmp);
        return rv;
    }
    *tmp_out = tmp;
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(fd, data + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", tmp, strerror(errno));
            close(fd);
            return rv;
        }
        off += (size_t)n;
    }
    if (fsync(fd) < 0) {
        int rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: fsync: %s", tmp, strerror(errno));
        close(fd);
        return rv;
    }
    if (close(fd) < 0)
        return pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", tmp, strerror(errno));
    return PN_OK;
}

/* Makes a rename durable. Best effort: some file systems refuse to fsync
 * a directory, and the files themselves are already on disk. */
static void sync_parent(const char *path)
{
    char *dir = pn_strdup(path);
    char *slash = strrchr(dir, '/');
    const char *d = ".";
    if (slash) {
        slash[slash == dir ? 1 : 0] = '\0';
        d = dir;
    }
    int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(dir);
}

/* Puts the key and the certificate in place, each atomically. The key goes
 * first: a crash between the two renames leaves a key without a
 * certificate, which pn_tls_ensure_cert reports instead of guessing. */
static int write_pair(const char *cert_file, const char *cert, size_t cert_len,
                      const char *key_file, const char *key, size_t key_len, char *err,
                      size_t errlen)
{
    char *key_tmp = NULL, *cert_tmp = NULL;
    int rv = make_parents(key_file, err, errlen);
    if (rv < 0)
        goto out;
    rv = make_parents(cert_file, err, errlen);
    if (rv < 0)
        goto out;
    rv = write_tmp(key_file, key, key_len, 0600, &key_tmp, err, errlen);
    if (rv < 0)
        goto out;
    rv = write_tmp(cert_file, cert, cert_len, 0644, &cert_tmp, err, errlen);
    if (rv < 0)
        goto out;
    if (rename(key_tmp, key_file) < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", key_file, strerror(errno));
        goto out;
    }
    free(key_tmp);
    key_tmp = NULL;
    if (rename(cert_tmp, cert_file) < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", cert_file, strerror(errno));
        goto out;
    }
    free(cert_tmp);
    cert_tmp = NULL;
    sync_parent(key_file);
    sync_parent(cert_file);
out:
    if (key_tmp) {
        unlink(key_tmp);
        free(key_tmp);
    }
    if (cert_tmp) {
        unlink(cert_tmp);
        free(cert_tmp);
    }
    return rv;
}

int pn_tls_generate_cert(const char *cert_file, const char *key_file,
                         const struct pn_cert_opts *opts, char *err, size_t errlen)
{
    int rv = PN_OK;
    EVP_PKEY *pkey = NULL;
    X509 *x = NULL;
    BIO *kbio = NULL, *cbio = NULL;
    char *kdata = NULL, *cdata = NULL;
    long klen, clen;

    if (!cert_file || !key_file || !opts)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "certificate and key paths are required");
    if (strcmp(cert_file, key_file) == 0)
        return pn_seterr(err, errlen, PN_ERR_INVAL,
                         "%s: certificate and key must be different files", cert_file);
    ERR_clear_error();

    pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (!pkey) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot generate an EC P-256 key", key_file);
        goto out;
    }
    x = X509_new();
    if (!x) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot create certificate", cert_file);
        goto out;
    }
    rv = fill_cert(x, pkey, opts, cert_file, err, errlen);
    if (rv < 0)
        goto out;
    if (X509_sign(x, pkey, EVP_sha256()) <= 0) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot sign certificate", cert_file);
        goto out;
    }

    /* Secure-heap memory for the key's PEM: cleansed when freed. */
    kbio = BIO_new(BIO_s_secmem());
    cbio = BIO_new(BIO_s_mem());
    if (!kbio || !cbio || PEM_write_bio_PrivateKey(kbio, pkey, NULL, NULL, 0, NULL, NULL) != 1 ||
        PEM_write_bio_X509(cbio, x) != 1) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot encode PEM", cert_file);
        goto out;
    }
    klen = BIO_get_mem_data(kbio, &kdata);
    clen = BIO_get_mem_data(cbio, &cdata);
    if (klen <= 0 || clen <= 0) {
        rv = tls_fail(err, errlen, PN_ERR_TLS, "%s: cannot encode PEM", cert_file);
        goto out;
    }
    rv = write_pair(cert_file, cdata, (size_t)clen, key_file, kdata, (size_t)klen, err, errlen);
out:
    BIO_free(cbio);
    BIO_free(kbio);
    X509_free(x);
    EVP_PKEY_free(pkey);
    ERR_clear_error();
    return rv;
}

/* Whether path exists: 1 yes, 0 no, or a negative error when it cannot be
 * told (e.g. a directory on the way is unreadable). */
static int file_exists(const char *path, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) == 0)
        return 1;
    if (errno == ENOENT)
        return 0;
    return pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", path, strerror(errno));
}

int pn_tls_ensure_cert(const char *cert_file, const char *key_file, const struct pn_cert_opts *opts,
                       bool *generated, char *err, size_t errlen)
{
    *generated = false;
    if (!cert_file || !key_file)
        return pn_seterr(err, errlen, PN_ERR_INVAL, "certificate and key paths are required");
    int have_cert = file_exists(cert_file, err, errlen);
    if (have_cert < 0)
        return have_cert;
    int have_key = file_exists(key_file, err, errlen);
    if (have_key < 0)
        return have_key;
    if (have_cert && have_key)
        return PN_OK;
    if (have_cert)
        return pn_seterr(err, errlen, PN_ERR_INVAL,
                         "%s: no such file, but certificate %s exists (supply both or neither)",
                         key_file, cert_file);
    if (have_key)
        return pn_seterr(err, errlen, PN_ERR_INVAL,
                         "%s: no such file, but key %s exists (supply both or neither)", cert_file,
                         key_file);
    int rv = pn_tls_generate_cert(cert_file, key_file, opts, err, errlen);
    if (rv < 0)
        return rv;
    *generated = true;
    return PN_OK;
}
