/* Tests for net/tls.c: the shape of the generated certificate (checked by
 * parsing it back and by a strict X.509 verification with the certificate
 * as the only trust anchor), file handling (modes, atomic writes, parent
 * directories, ensure_cert), context loading and reload errors, the ALPN
 * choice, and real handshakes over a socketpair. The .c is included to
 * reach the static ALPN callback and name helpers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../../../src/net/tls.c"

#include <dirent.h>
#include <ftw.h>
#include <sys/socket.h>

#include <openssl/core_names.h>

struct fixture {
    char dir[64];
};

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int setup(void **state)
{
    struct fixture *f = pn_new(struct fixture);
    snprintf(f->dir, sizeof(f->dir), "/tmp/pn_test_tls_XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    ERR_clear_error();
    return 0;
}

static char *path_in(void **state, const char *name)
{
    struct fixture *f = *state;
    return pn_asprintf("%s/%s", f->dir, name);
}

static mode_t current_umask(void)
{
    mode_t m = umask(022);
    umask(m);
    return m;
}

static X509 *read_cert(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    X509 *x = PEM_read_X509(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(x);
    return x;
}

static EVP_PKEY *read_key(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    EVP_PKEY *k = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(k);
    return k;
}

static char *slurp(const char *path, size_t *len)
{
    char *buf = NULL;
    char err[256];
    assert_int_equal(read_small_file(path, &buf, len, err, sizeof(err)), PN_OK);
    return buf;
}

static void spit(const char *path, const char *data)
{
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(data, fp);
    fclose(fp);
}

static const char *const test_names[] = {"localhost", "127.0.0.1", "::1",   "example.test",
                                         "",          "LOCALHOST", "0:0::1"};

static void gen(const char *cert, const char *key, const char *cn)
{
    char err[512] = "";
    struct pn_cert_opts o = {.cn = cn, .names = test_names, .nnames = 7};
    int rv = pn_tls_generate_cert(cert, key, &o, err, sizeof(err));
    if (rv != PN_OK)
        fail_msg("generate: %s", err);
}

/* --- certificate shape ------------------------------------------------- */

static void test_generate_shape(void **state)
{
    char *cert = path_in(state, "cert.pem"), *key = path_in(state, "key.pem");
    gen(cert, key, "proxynode-test");
    X509 *x = read_cert(cert);

    assert_int_equal(X509_get_version(x), 2);
    assert_int_equal(X509_get_signature_nid(x), NID_ecdsa_with_SHA256);

    BIGNUM *serial = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
    assert_non_null(serial);
    assert_false(BN_is_negative(serial));
    assert_int_equal(BN_num_bits(serial), 159);
    BN_free(serial);

    char cn[128];
    assert_true(
        X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn)) > 0);
    assert_string_equal(cn, "proxynode-test");
    assert_int_equal(X509_NAME_cmp(X509_get_subject_name(x), X509_get_issuer_name(x)), 0);

    int day = 0, sec = 0;
    assert_true(ASN1_TIME_diff(&day, &sec, X509_get0_notBefore(x), NULL));
    assert_int_equal(day, 0);
    assert_in_range(sec, 3590, 3700);
    assert_true(ASN1_TIME_diff(&day, &sec, NULL, X509_get0_notAfter(x)));
    assert_in_range(day, 3649, 3650);

    int crit = -1;
    BASIC_CONSTRAINTS *bc = X509_get_ext_d2i(x, NID_basic_constraints, &crit, NULL);
    assert_non_null(bc);
    assert_true(bc->ca);
    assert_null(bc->pathlen);
    assert_int_equal(crit, 1);
    BASIC_CONSTRAINTS_free(bc);

    ASN1_BIT_STRING *ku = X509_get_ext_d2i(x, NID_key_usage, &crit, NULL);
    assert_non_null(ku);
    assert_int_equal(crit, 1);
    ASN1_BIT_STRING_free(ku);
    assert_int_equal(X509_get_key_usage(x), KU_DIGITAL_SIGNATURE | KU_KEY_CERT_SIGN);

    const ASN1_OCTET_STRING *ski = X509_get0_subject_key_id(x);
    const ASN1_OCTET_STRING *aki = X509_get0_authority_key_id(x);
    assert_non_null(ski);
    assert_non_null(aki);
    assert_int_equal(ASN1_STRING_length(ski), 20);
    assert_int_equal(ASN1_OCTET_STRING_cmp(ski, aki), 0);

    /* SAN: exactly the four distinct names, in order, empty and repeats dropped. */
    GENERAL_NAMES *san = X509_get_ext_d2i(x, NID_subject_alt_name, &crit, NULL);
    assert_non_null(san);
    assert_int_equal(crit, 0);
    assert_int_equal(sk_GENERAL_NAME_num(san), 4);
    static const unsigned char v4[4] = {127, 0, 0, 1};
    static const unsigned char v6[16] = {[15] = 1};
    const GENERAL_NAME *g = sk_GENERAL_NAME_value(san, 0);
    assert_int_equal(g->type, GEN_DNS);
    assert_string_equal((const char *)ASN1_STRING_get0_data(g->d.dNSName), "localhost");
    g = sk_GENERAL_NAME_value(san, 1);
    assert_int_equal(g->type, GEN_IPADD);
    assert_int_equal(ASN1_STRING_length(g->d.iPAddress), 4);
    assert_memory_equal(ASN1_STRING_get0_data(g->d.iPAddress), v4, 4);
    g = sk_GENERAL_NAME_value(san, 2);
    assert_int_equal(g->type, GEN_IPADD);
    assert_int_equal(ASN1_STRING_length(g->d.iPAddress), 16);
    assert_memory_equal(ASN1_STRING_get0_data(g->d.iPAddress), v6, 16);
    g = sk_GENERAL_NAME_value(san, 3);
    assert_int_equal(g->type, GEN_DNS);
    assert_string_equal((const char *)ASN1_STRING_get0_data(g->d.dNSName), "example.test");
    GENERAL_NAMES_free(san);

    /* The key: EC P-256, matching the certificate, file mode 0600. */
    EVP_PKEY *pub = X509_get0_pubkey(x);
    assert_int_equal(EVP_PKEY_get_base_id(pub), EVP_PKEY_EC);
    char group[64];
    assert_true(EVP_PKEY_get_utf8_string_param(pub, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                               sizeof(group), NULL));
    assert_string_equal(group, "prime256v1");
    assert_int_equal(X509_verify(x, pub), 1);
    EVP_PKEY *priv = read_key(key);
    assert_int_equal(X509_check_private_key(x, priv), 1);
    EVP_PKEY_free(priv);

    struct stat st;
    assert_int_equal(stat(key, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(stat(cert, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0644 & ~current_umask());

    /* A second certificate gets a different serial. */
    char *cert2 = path_in(state, "cert2.pem"), *key2 = path_in(state, "key2.pem");
    gen(cert2, key2, "proxynode-test");
    X509 *y = read_cert(cert2);
    assert_int_not_equal(ASN1_INTEGER_cmp(X509_get0_serialNumber(x), X509_get0_serialNumber(y)), 0);
    X509_free(y);
    X509_free(x);
    free(cert2);
    free(key2);
    free(cert);
    free(key);
}

/* What Python >= 3.13 and Go do with the certificate the panel stores: the
 * only trust anchor, strict RFC 5280 checks, TLS server purpose, host or IP
 * matching against the SAN. */
static int strict_verify(X509 *x, const char *host, const char *ip)
{
    X509_STORE *store = X509_STORE_new();
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    assert_int_equal(X509_STORE_add_cert(store, x), 1);
    assert_int_equal(X509_STORE_CTX_init(ctx, store, x, NULL), 1);
    X509_VERIFY_PARAM *param = X509_STORE_CTX_get0_param(ctx);
    X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_X509_STRICT);
    X509_VERIFY_PARAM_set_purpose(param, X509_PURPOSE_SSL_SERVER);
    if (host)
        X509_VERIFY_PARAM_set1_host(param, host, 0);
    if (ip)
        X509_VERIFY_PARAM_set1_ip_asc(param, ip);
    int ok = X509_verify_cert(ctx);
    int e = X509_STORE_CTX_get_error(ctx);
    if (ok != 1 && !host && !ip)
        print_error("verify: %s\n", X509_verify_cert_error_string(e));
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    ERR_clear_error();
    return ok == 1 ? X509_V_OK : e;
}

static void test_generate_strict_verify(void **state)
{
    char *cert = path_in(state, "cert.pem"), *key = path_in(state, "key.pem");
    gen(cert, key, "node");
    X509 *x = read_cert(cert);

    assert_int_equal(strict_verify(x, NULL, NULL), X509_V_OK);
    assert_int_equal(strict_verify(x, "localhost", NULL), X509_V_OK);
    assert_int_equal(strict_verify(x, NULL, "127.0.0.1"), X509_V_OK);
    assert_int_equal(strict_verify(x, NULL, "::1"), X509_V_OK);
    assert_int_equal(strict_verify(x, NULL, "10.9.9.9"), X509_V_ERR_IP_ADDRESS_MISMATCH);
    assert_int_equal(strict_verify(x, "other.test", NULL), X509_V_ERR_HOSTNAME_MISMATCH);

    assert_int_equal(X509_check_host(x, "localhost", 0, 0, NULL), 1);
    assert_int_equal(X509_check_host(x, "example.test", 0, 0, NULL), 1);
    assert_int_equal(X509_check_ip_asc(x, "127.0.0.1", 0), 1);
    assert_int_equal(X509_check_ip_asc(x, "::1", 0), 1);
    assert_int_equal(X509_check_ip_asc(x, "10.9.9.9", 0), 0);
    /* The CN is not a SAN entry and must not match on its own. */
    assert_int_equal(X509_check_host(x, "node", 0, X509_CHECK_FLAG_NEVER_CHECK_SUBJECT, NULL), 0);
    X509_free(x);
    free(cert);
    free(key);
}

static bool dir_has_tmp(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    bool found = false;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (strstr(de->d_name, ".tmp."))
            found = true;
    closedir(d);
    return found;
}

static void test_generate_parents_and_errors(void **state)
{
    struct fixture *f = *state;
    char *cert = path_in(state, "a/b/cert.pem"), *key = path_in(state, "k/key.pem");
    struct pn_cert_opts o = {.cn = "x", .names = test_names, .nnames = 4, .days = 30};
    char err[512] = "";
    assert_int_equal(pn_tls_generate_cert(cert, key, &o, err, sizeof(err)), PN_OK);

    mode_t want = 0700 & ~current_umask();
    struct stat st;
    char *a = path_in(state, "a"), *ab = path_in(state, "a/b"), *k = path_in(state, "k");
    assert_int_equal(stat(a, &st), 0);
    assert_int_equal(st.st_mode & 0777, want);
    assert_int_equal(stat(ab, &st), 0);
    assert_int_equal(st.st_mode & 0777, want);
    assert_int_equal(stat(k, &st), 0);
    assert_int_equal(st.st_mode & 0777, want);
    assert_false(dir_has_tmp(ab));
    assert_false(dir_has_tmp(k));
    assert_false(dir_has_tmp(f->dir));

    X509 *x = read_cert(cert);
    int day = 0, sec = 0;
    assert_true(ASN1_TIME_diff(&day, &sec, NULL, X509_get0_notAfter(x)));
    assert_in_range(day, 29, 30);
    X509_free(x);

    /* A name that is neither an IP nor a DNS name: error, nothing written. */
    char *cert2 = path_in(state, "c2.pem"), *key2 = path_in(state, "k2.pem");
    static const char *const bad[] = {"localhost", "bad name"};
    struct pn_cert_opts ob = {.cn = "x", .names = bad, .nnames = 2};
    assert_int_equal(pn_tls_generate_cert(cert2, key2, &ob, err, sizeof(err)), PN_ERR_TLS);
    assert_non_null(strstr(err, "bad name"));
    assert_int_equal(access(cert2, F_OK), -1);
    assert_int_equal(access(key2, F_OK), -1);
    assert_false(dir_has_tmp(f->dir));

    /* A parent that is a file, not a directory. */
    char *under_file = path_in(state, "a/b/cert.pem/x/cert.pem");
    assert_int_equal(pn_tls_generate_cert(under_file, key2, &o, err, sizeof(err)), PN_ERR_IO);
    assert_non_null(strstr(err, "a/b/cert.pem"));

    free(under_file);
    free(cert2);
    free(key2);
    free(a);
    free(ab);
    free(k);
    free(cert);
    free(key);
}

static void test_ensure_cert(void **state)
{
    char *cert = path_in(state, "c/cert.pem"), *key = path_in(state, "c/key.pem");
    struct pn_cert_opts o = {.cn = "n", .names = test_names, .nnames = 4};
    char err[512] = "";
    bool generated = false;

    assert_int_equal(pn_tls_ensure_cert(cert, key, &o, &generated, err, sizeof(err)), PN_OK);
    assert_true(generated);
    size_t clen, klen;
    char *c1 = slurp(cert, &clen), *k1 = slurp(key, &klen);
    struct stat st1, st2;
    assert_int_equal(stat(cert, &st1), 0);

    assert_int_equal(pn_tls_ensure_cert(cert, key, &o, &generated, err, sizeof(err)), PN_OK);
    assert_false(generated);
    size_t clen2, klen2;
    char *c2 = slurp(cert, &clen2), *k2 = slurp(key, &klen2);
    assert_int_equal(stat(cert, &st2), 0);
    assert_int_equal(clen, clen2);
    assert_int_equal(klen, klen2);
    assert_memory_equal(c1, c2, clen);
    assert_memory_equal(k1, k2, klen);
    assert_int_equal(st1.st_ino, st2.st_ino);
    assert_int_equal(st1.st_mtim.tv_sec, st2.st_mtim.tv_sec);
    assert_int_equal(st1.st_mtim.tv_nsec, st2.st_mtim.tv_nsec);

    /* Key gone, certificate still there: an error naming the key. */
    assert_int_equal(unlink(key), 0);
    generated = true;
    assert_int_equal(pn_tls_ensure_cert(cert, key, &o, &generated, err, sizeof(err)), PN_ERR_INVAL);
    assert_false(generated);
    assert_non_null(strstr(err, key));
    assert_int_equal(access(key, F_OK), -1);

    /* Certificate gone, key there: an error naming the certificate. */
    spit(key, k1);
    assert_int_equal(unlink(cert), 0);
    assert_int_equal(pn_tls_ensure_cert(cert, key, &o, &generated, err, sizeof(err)), PN_ERR_INVAL);
    assert_false(generated);
    assert_true(strncmp(err, cert, strlen(cert)) == 0);
    assert_int_equal(access(cert, F_OK), -1);

    free(c1);
    free(c2);
    free_secret(k1, klen);
    free_secret(k2, klen2);
    free(cert);
    free(key);
}

static size_t count_equal(char **v, size_t n, const char *s)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i], s) == 0)
            c++;
    return c;
}

static size_t index_of(char **v, size_t n, const char *s)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i], s) == 0)
            return i;
    fail_msg("%s not among the default names", s);
    return n;
}

static void test_default_names(void **state)
{
    (void)state;
    size_t n = 0;
    char **v = pn_tls_default_names(" extra.test , ,localhost,\t10.0.0.1 ,EXTRA.test,::1", &n);
    assert_true(n >= 5);
    assert_string_equal(v[0], "localhost");
    assert_string_equal(v[1], "127.0.0.1");
    assert_string_equal(v[2], "::1");
    assert_int_equal(count_equal(v, n, "extra.test"), 1);
    assert_int_equal(count_equal(v, n, "EXTRA.test"), 0);
    assert_int_equal(count_equal(v, n, "10.0.0.1"), 1);
    assert_int_equal(count_equal(v, n, "localhost"), 1);
    assert_true(index_of(v, n, "extra.test") < index_of(v, n, "10.0.0.1"));
    for (size_t i = 0; i < n; i++) {
        assert_true(v[i][0] != '\0');
        assert_true(v[i][0] != ' ');
        assert_null(strchr(v[i], ','));
        assert_true(strncasecmp(v[i], "fe80:", 5) != 0);
        for (size_t j = i + 1; j < n; j++)
            assert_false(names_equal(v[i], v[j]));
    }
    /* Every IPv4 address of an up interface is listed. */
    struct ifaddrs *ifs = NULL;
    assert_int_equal(getifaddrs(&ifs), 0);
    for (struct ifaddrs *ifa = ifs; ifa; ifa = ifa->ifa_next) {
        if (!ifa->ifa_addr || !(ifa->ifa_flags & IFF_UP) || ifa->ifa_addr->sa_family != AF_INET)
            continue;
        char buf[INET_ADDRSTRLEN];
        const struct sockaddr_in *sin = (const struct sockaddr_in *)(void *)ifa->ifa_addr;
        assert_non_null(inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf)));
        assert_int_equal(count_equal(v, n, buf), 1);
    }
    freeifaddrs(ifs);

    char host[HOST_NAME_MAX + 1];
    if (gethostname(host, sizeof(host)) == 0 && dns_name_ok(host))
        assert_true(index_of(v, n, host) < index_of(v, n, "extra.test") ||
                    strcasecmp(host, "extra.test") == 0);
    pn_tls_free_names(v, n);

    v = pn_tls_default_names(NULL, &n);
    assert_true(n >= 3);
    pn_tls_free_names(v, n);
}

/* --- contexts ---------------------------------------------------------- */

static void test_new_errors(void **state)
{
    char *cert = path_in(state, "cert.pem"), *key = path_in(state, "key.pem");
    char *cert2 = path_in(state, "cert2.pem"), *key2 = path_in(state, "key2.pem");
    char *missing = path_in(state, "nope.pem"), *junk = path_in(state, "junk.pem");
    char *enc = path_in(state, "enc.key");
    struct fixture *f = *state;
    gen(cert, key, "a");
    gen(cert2, key2, "b");
    spit(junk, "not a pem file\n");
    char err[512] = "";
    struct pn_tls *tls = NULL;

    struct pn_tls_opts o = {.cert_file = cert, .key_file = key, .alpn_h2 = true};
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_OK);
    assert_non_null(tls);
    assert_int_equal(ERR_peek_error(), 0);
    pn_tls_free(tls);
    tls = NULL;

    o.cert_file = missing;
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_IO);
    assert_null(tls);
    assert_true(strncmp(err, missing, strlen(missing)) == 0);
    assert_non_null(strstr(err, "No such file"));

    o.cert_file = cert;
    o.key_file = missing;
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_IO);
    assert_true(strncmp(err, missing, strlen(missing)) == 0);

    o.key_file = f->dir; /* a directory */
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_IO);

    o.key_file = key2; /* another key of the same type */
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_TLS);
    assert_true(strncmp(err, key2, strlen(key2)) == 0);
    assert_non_null(strstr(err, "does not match"));
    assert_non_null(strstr(err, "mismatch")); /* OpenSSL's reason is kept */

    o.key_file = cert; /* a certificate where the key should be */
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_TLS);
    assert_non_null(strstr(err, "private key"));

    o.key_file = junk;
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_TLS);
    assert_non_null(strstr(err, "no PEM private key"));

    /* An encrypted key must fail, never prompt for a passphrase. */
    EVP_PKEY *pk = read_key(key);
    FILE *fp = fopen(enc, "w");
    assert_non_null(fp);
    assert_int_equal(PEM_write_PrivateKey(fp, pk, EVP_aes_256_cbc(), NULL, 0, NULL, "secret"), 1);
    fclose(fp);
    EVP_PKEY_free(pk);
    o.key_file = enc;
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_TLS);
    assert_true(strncmp(err, enc, strlen(enc)) == 0);
    assert_non_null(strstr(err, "encrypted"));

    o.key_file = key;
    o.cert_file = junk;
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_TLS);
    assert_true(strncmp(err, junk, strlen(junk)) == 0);
    assert_non_null(strstr(err, "no start line"));

    o.cert_file = cert;
    o.client_ca_file = junk;
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_TLS);
    assert_true(strncmp(err, junk, strlen(junk)) == 0);
    o.client_ca_file = missing;
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_ERR_IO);
    assert_null(tls);
    assert_int_equal(ERR_peek_error(), 0);

    free(cert);
    free(key);
    free(cert2);
    free(key2);
    free(missing);
    free(junk);
    free(enc);
}

/* --- ALPN callback ------------------------------------------------------ */

static int alpn(bool h2, const unsigned char *in, unsigned inlen, char *sel)
{
    const unsigned char *out = NULL;
    unsigned char outlen = 0;
    int rv =
        pn_tls_alpn_select(NULL, &out, &outlen, in, inlen, h2 ? (void *)&pn_tls_h2_marker : NULL);
    sel[0] = '\0';
    if (rv == SSL_TLSEXT_ERR_OK) {
        memcpy(sel, out, outlen);
        sel[outlen] = '\0';
    }
    return rv;
}

#define PROTOS(s) (const unsigned char *)(s), (unsigned)(sizeof(s) - 1)

static void test_alpn_callback(void **state)
{
    (void)state;
    char sel[256];
    assert_int_equal(alpn(true, PROTOS("\x02h2\x08http/1.1"), sel), SSL_TLSEXT_ERR_OK);
    assert_string_equal(sel, "h2");
    assert_int_equal(alpn(true, PROTOS("\x08http/1.1\x02h2"), sel), SSL_TLSEXT_ERR_OK);
    assert_string_equal(sel, "h2");
    assert_int_equal(alpn(true, PROTOS("\x08http/1.1"), sel), SSL_TLSEXT_ERR_OK);
    assert_string_equal(sel, "http/1.1");
    assert_int_equal(alpn(true, PROTOS("\x02h2"), sel), SSL_TLSEXT_ERR_OK);
    assert_string_equal(sel, "h2");
    assert_int_equal(alpn(true, PROTOS(""), sel), SSL_TLSEXT_ERR_NOACK);
    assert_int_equal(alpn(true,
                          PROTOS("\x03"
                                 "foo"),
                          sel),
                     SSL_TLSEXT_ERR_NOACK);
    assert_int_equal(alpn(true,
                          PROTOS("\x03"
                                 "foo\x08http/1.1"),
                          sel),
                     SSL_TLSEXT_ERR_OK);
    assert_string_equal(sel, "http/1.1");
    assert_int_equal(alpn(true, PROTOS("\x02h3\x02h1"), sel), SSL_TLSEXT_ERR_NOACK);
    /* Malformed: a length running past the end, a zero length. */
    assert_int_equal(alpn(true, PROTOS("\x09http/1.1"), sel), SSL_TLSEXT_ERR_NOACK);
    assert_int_equal(alpn(true, PROTOS("\x00\x02h2"), sel), SSL_TLSEXT_ERR_NOACK);

    assert_int_equal(alpn(false, PROTOS("\x02h2\x08http/1.1"), sel), SSL_TLSEXT_ERR_OK);
    assert_string_equal(sel, "http/1.1");
    assert_int_equal(alpn(false, PROTOS("\x02h2"), sel), SSL_TLSEXT_ERR_NOACK);
    assert_int_equal(alpn(false, PROTOS("\x08http/1.1"), sel), SSL_TLSEXT_ERR_OK);
    assert_string_equal(sel, "http/1.1");
    assert_int_equal(alpn(false, PROTOS(""), sel), SSL_TLSEXT_ERR_NOACK);
}

/* --- handshakes --------------------------------------------------------- */

struct hs {
    bool c_ok, s_ok, c_fail, s_fail;
    int s_reason; /* OpenSSL reason of the server's failure */
};

/* Drives both ends of a handshake over a non-blocking socketpair in one
 * thread until each side has finished or failed. */
static struct hs handshake_open(SSL *c, SSL *s, int sv[2])
{
    struct hs r = {0};
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    SSL_set_fd(c, sv[0]);
    SSL_set_fd(s, sv[1]);
    SSL_set_connect_state(c);
    SSL_set_accept_state(s);
    ERR_clear_error();
    for (int i = 0; i < 100 && !((r.c_ok || r.c_fail) && (r.s_ok || r.s_fail)); i++) {
        if (!r.c_ok && !r.c_fail) {
            int rv = SSL_do_handshake(c);
            int e = rv == 1 ? SSL_ERROR_NONE : SSL_get_error(c, rv);
            if (rv == 1)
                r.c_ok = true;
            else if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                r.c_fail = true;
            ERR_clear_error();
        }
        if (!r.s_ok && !r.s_fail) {
            int rv = SSL_do_handshake(s);
            int e = rv == 1 ? SSL_ERROR_NONE : SSL_get_error(s, rv);
            if (rv == 1) {
                r.s_ok = true;
            } else if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                r.s_fail = true;
                r.s_reason = ERR_GET_REASON(ERR_peek_error());
            }
            ERR_clear_error();
        }
    }
    return r;
}

static struct hs handshake(SSL *c, SSL *s)
{
    int sv[2];
    struct hs r = handshake_open(c, s, sv);
    /* SSL_set_fd wraps the descriptors in socket BIOs that do not close them. */
    close(sv[0]);
    close(sv[1]);
    return r;
}

/* A client context that trusts only trust_file, strictly, like the panel. */
static SSL_CTX *client_ctx(const char *trust_file)
{
    SSL_CTX *c = SSL_CTX_new(TLS_client_method());
    assert_non_null(c);
    if (trust_file) {
        assert_int_equal(SSL_CTX_load_verify_locations(c, trust_file, NULL), 1);
        SSL_CTX_set_verify(c, SSL_VERIFY_PEER, NULL);
        X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(c), X509_V_FLAG_X509_STRICT);
    }
    return c;
}

static SSL *client_ssl(SSL_CTX *cctx, const unsigned char *protos, unsigned plen)
{
    SSL *c = SSL_new(cctx);
    assert_non_null(c);
    assert_int_equal(SSL_set1_host(c, "localhost"), 1);
    if (plen)
        assert_int_equal(SSL_set_alpn_protos(c, protos, plen), 0); /* 0 is success */
    return c;
}

static void selected(SSL *ssl, char *out)
{
    const unsigned char *p = NULL;
    unsigned len = 0;
    SSL_get0_alpn_selected(ssl, &p, &len);
    memcpy(out, p ? (const char *)p : "", len);
    out[len] = '\0';
}

/* One handshake with ALPN offer protos; returns what both sides agreed on
 * (asserting they agree), "" for no ALPN. */
static void alpn_handshake(struct pn_tls *tls, const char *trust, const unsigned char *protos,
                           unsigned plen, char *out)
{
    SSL_CTX *cctx = client_ctx(trust);
    SSL *c = client_ssl(cctx, protos, plen);
    SSL *s = pn_tls_ssl_new(tls);
    struct hs r = handshake(c, s);
    assert_true(r.c_ok);
    assert_true(r.s_ok);
    assert_int_equal(SSL_get_verify_result(c), X509_V_OK);
    assert_int_equal(SSL_version(s), TLS1_3_VERSION);
    char cs[256];
    selected(c, cs);
    selected(s, out);
    assert_string_equal(cs, out);
    SSL_free(c);
    SSL_free(s);
    SSL_CTX_free(cctx);
}

static void test_handshake_alpn(void **state)
{
    char *cert = path_in(state, "cert.pem"), *key = path_in(state, "key.pem");
    gen(cert, key, "node");
    char err[512] = "", sel[256];
    struct pn_tls *tls = NULL;
    struct pn_tls_opts o = {.cert_file = cert, .key_file = key, .alpn_h2 = true};
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_OK);

    alpn_handshake(tls, cert, PROTOS("\x02h2\x08http/1.1"), sel);
    assert_string_equal(sel, "h2");
    alpn_handshake(tls, cert, PROTOS("\x08http/1.1"), sel);
    assert_string_equal(sel, "http/1.1");
    alpn_handshake(tls, cert, PROTOS("\x02h2"), sel);
    assert_string_equal(sel, "h2");
    alpn_handshake(tls, cert,
                   PROTOS("\x03"
                          "foo"),
                   sel);
    assert_string_equal(sel, "");
    alpn_handshake(tls, cert, NULL, 0, sel);
    assert_string_equal(sel, "");
    pn_tls_free(tls);

    o.alpn_h2 = false;
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_OK);
    alpn_handshake(tls, cert, PROTOS("\x02h2\x08http/1.1"), sel);
    assert_string_equal(sel, "http/1.1");
    alpn_handshake(tls, cert, PROTOS("\x02h2"), sel);
    assert_string_equal(sel, "");
    pn_tls_free(tls);
    free(cert);
    free(key);
}

/* A client limited to [min, max] and to ciphers (NULL = defaults), with
 * security level 0 so that it really offers what it is given. */
static struct hs versioned_handshake(struct pn_tls *tls, int min, int max, const char *ciphers)
{
    SSL_CTX *cctx = client_ctx(NULL);
    SSL_CTX_set_security_level(cctx, 0);
    assert_int_equal(SSL_CTX_set_min_proto_version(cctx, min), 1);
    assert_int_equal(SSL_CTX_set_max_proto_version(cctx, max), 1);
    if (ciphers)
        assert_int_equal(SSL_CTX_set_cipher_list(cctx, ciphers), 1);
    SSL *c = client_ssl(cctx, PROTOS("\x02h2"));
    SSL *s = pn_tls_ssl_new(tls);
    struct hs r = handshake(c, s);
    if (r.s_ok) {
        assert_int_equal(SSL_version(s), max);
        if (max == TLS1_2_VERSION)
            assert_true(SSL_CIPHER_is_aead(SSL_get_current_cipher(s)));
    }
    SSL_free(c);
    SSL_free(s);
    SSL_CTX_free(cctx);
    return r;
}

static void test_handshake_versions_and_ciphers(void **state)
{
    char *cert = path_in(state, "cert.pem"), *key = path_in(state, "key.pem");
    gen(cert, key, "node");
    char err[512] = "";
    struct pn_tls *tls = NULL;
    struct pn_tls_opts o = {.cert_file = cert, .key_file = key, .alpn_h2 = true};
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_OK);

    struct hs r = versioned_handshake(tls, TLS1_2_VERSION, TLS1_2_VERSION, NULL);
    assert_true(r.c_ok && r.s_ok);
    r = versioned_handshake(tls, TLS1_2_VERSION, TLS1_3_VERSION, NULL);
    assert_true(r.c_ok && r.s_ok);

    /* The server must see the old ClientHello and refuse it (s_fail), not
     * the client give up on its own. */
    r = versioned_handshake(tls, TLS1_VERSION, TLS1_1_VERSION, "ALL:@SECLEVEL=0");
    assert_true(r.s_fail);
    assert_false(r.c_ok);
    assert_true(r.s_reason == SSL_R_UNSUPPORTED_PROTOCOL || r.s_reason == SSL_R_VERSION_TOO_LOW);
    r = versioned_handshake(tls, TLS1_VERSION, TLS1_VERSION, "ALL:@SECLEVEL=0");
    assert_true(r.s_fail);
    assert_false(r.c_ok);

    /* A client asking to renegotiate a TLS 1.2 session is refused. */
    SSL_CTX *cctx = client_ctx(NULL);
    assert_int_equal(SSL_CTX_set_max_proto_version(cctx, TLS1_2_VERSION), 1);
    SSL *c = client_ssl(cctx, NULL, 0);
    SSL *s = pn_tls_ssl_new(tls);
    int sv[2];
    r = handshake_open(c, s, sv);
    assert_true(r.c_ok && r.s_ok);
    assert_int_equal(SSL_renegotiate(c), 1);
    bool renegotiated = false, refused = false;
    for (int i = 0; i < 20 && !renegotiated && !refused; i++) {
        int rv = SSL_do_handshake(c);
        int e = rv == 1 ? SSL_ERROR_NONE : SSL_get_error(c, rv);
        if (rv == 1 && !SSL_renegotiate_pending(c))
            renegotiated = true;
        else if (rv != 1 && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
            refused = true;
        char b[16];
        SSL_read(s, b, sizeof(b)); /* lets the server see the new ClientHello */
        ERR_clear_error();
    }
    assert_false(renegotiated);
    assert_true(refused);
    close(sv[0]);
    close(sv[1]);
    SSL_free(c);
    SSL_free(s);
    SSL_CTX_free(cctx);

    /* TLS 1.2 with CBC or without forward secrecy: no shared cipher. */
    r = versioned_handshake(tls, TLS1_2_VERSION, TLS1_2_VERSION, "ECDHE-ECDSA-AES128-SHA");
    assert_true(r.s_fail);
    assert_int_equal(r.s_reason, SSL_R_NO_SHARED_CIPHER);
    r = versioned_handshake(tls, TLS1_2_VERSION, TLS1_2_VERSION,
                            "ECDHE-ECDSA-AES256-SHA384:AES128-GCM-SHA256");
    assert_true(r.s_fail);
    assert_int_equal(r.s_reason, SSL_R_NO_SHARED_CIPHER);

    pn_tls_free(tls);
    free(cert);
    free(key);
}

static void test_mtls(void **state)
{
    char *cert = path_in(state, "srv.pem"), *key = path_in(state, "srv.key");
    char *ccert = path_in(state, "cli.pem"), *ckey = path_in(state, "cli.key");
    char *ocert = path_in(state, "other.pem"), *okey = path_in(state, "other.key");
    char *cas = path_in(state, "cas.pem");
    gen(cert, key, "node");
    gen(ccert, ckey, "panel");
    gen(ocert, okey, "stranger");
    /* Two certificates in the CA file; the client's is the second. */
    size_t l1, l2;
    char *p1 = slurp(cert, &l1), *p2 = slurp(ccert, &l2);
    char *both = pn_asprintf("%.*s%.*s", (int)l1, p1, (int)l2, p2);
    spit(cas, both);
    free(both);
    free(p1);
    free(p2);

    char err[512] = "";
    struct pn_tls *tls = NULL;
    struct pn_tls_opts o = {
        .cert_file = cert, .key_file = key, .client_ca_file = cas, .alpn_h2 = true};
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_OK);

    const char *client_certs[][2] = {{ccert, ckey}, {NULL, NULL}, {ocert, okey}};
    for (int i = 0; i < 3; i++) {
        SSL_CTX *cctx = client_ctx(cert);
        if (client_certs[i][0]) {
            assert_int_equal(
                SSL_CTX_use_certificate_file(cctx, client_certs[i][0], SSL_FILETYPE_PEM), 1);
            assert_int_equal(
                SSL_CTX_use_PrivateKey_file(cctx, client_certs[i][1], SSL_FILETYPE_PEM), 1);
        }
        SSL *c = client_ssl(cctx, PROTOS("\x02h2"));
        SSL *s = pn_tls_ssl_new(tls);
        struct hs r = handshake(c, s);
        if (i == 0) {
            assert_true(r.c_ok && r.s_ok);
            assert_int_equal(SSL_get_verify_result(s), X509_V_OK);
            X509 *peer = SSL_get1_peer_certificate(s);
            assert_non_null(peer);
            char cn[64];
            X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, cn, sizeof(cn));
            assert_string_equal(cn, "panel");
            X509_free(peer);
        } else {
            assert_true(r.s_fail);
            assert_false(r.s_ok);
        }
        SSL_free(c);
        SSL_free(s);
        SSL_CTX_free(cctx);
    }
    pn_tls_free(tls);
    free(cert);
    free(key);
    free(ccert);
    free(ckey);
    free(ocert);
    free(okey);
    free(cas);
}

static void check_served(SSL *s, X509 *want)
{
    X509 *x = SSL_get_certificate(s);
    assert_non_null(x);
    assert_int_equal(X509_cmp(x, want), 0);
}

static void test_reload(void **state)
{
    char *cert = path_in(state, "cert.pem"), *key = path_in(state, "key.pem");
    char *old_cert = path_in(state, "old.pem"), *old_key = path_in(state, "old.key");
    gen(cert, key, "first");
    size_t cl, kl;
    char *c = slurp(cert, &cl), *k = slurp(key, &kl);
    spit(old_cert, c);
    spit(old_key, k);
    X509 *first = read_cert(cert);

    char err[512] = "";
    struct pn_tls *tls = NULL;
    struct pn_tls_opts o = {.cert_file = cert, .key_file = key, .alpn_h2 = true};
    assert_int_equal(pn_tls_new(&o, &tls, err, sizeof(err)), PN_OK);
    SSL *s_old = pn_tls_ssl_new(tls);
    SSL_CTX *ctx_old = SSL_get_SSL_CTX(s_old);

    /* A broken key: the reload fails and the old context stays. */
    spit(key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    err[0] = '\0';
    assert_int_equal(pn_tls_reload(tls, err, sizeof(err)), PN_ERR_TLS);
    assert_true(strncmp(err, key, strlen(key)) == 0);
    SSL *s = pn_tls_ssl_new(tls);
    assert_ptr_equal(SSL_get_SSL_CTX(s), ctx_old);
    check_served(s, first);
    SSL_free(s);

    /* A missing certificate: the same. */
    assert_int_equal(unlink(cert), 0);
    assert_int_equal(pn_tls_reload(tls, err, sizeof(err)), PN_ERR_IO);
    assert_true(strncmp(err, cert, strlen(cert)) == 0);
    s = pn_tls_ssl_new(tls);
    assert_ptr_equal(SSL_get_SSL_CTX(s), ctx_old);
    SSL_free(s);

    /* A new pair: new connections get it. */
    gen(cert, key, "second");
    X509 *second = read_cert(cert);
    assert_int_equal(pn_tls_reload(tls, err, sizeof(err)), PN_OK);
    SSL *s_new = pn_tls_ssl_new(tls);
    assert_ptr_not_equal(SSL_get_SSL_CTX(s_new), ctx_old);
    check_served(s_new, second);
    check_served(s_old, first);

    /* Both connections outlive the pn_tls and still complete handshakes,
     * each with its own certificate. */
    pn_tls_free(tls);
    SSL_CTX *cctx = client_ctx(old_cert);
    SSL *cl_ssl = client_ssl(cctx, PROTOS("\x02h2"));
    struct hs r = handshake(cl_ssl, s_old);
    assert_true(r.c_ok && r.s_ok);
    SSL_free(cl_ssl);
    SSL_CTX_free(cctx);
    cctx = client_ctx(cert);
    cl_ssl = client_ssl(cctx, PROTOS("\x02h2"));
    r = handshake(cl_ssl, s_new);
    assert_true(r.c_ok && r.s_ok);
    char sel[16];
    selected(s_new, sel);
    assert_string_equal(sel, "h2");
    SSL_free(cl_ssl);
    SSL_CTX_free(cctx);

    SSL_free(s_old);
    SSL_free(s_new);
    X509_free(first);
    X509_free(second);
    free(c);
    free_secret(k, kl);
    free(cert);
    free(key);
    free(old_cert);
    free(old_key);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_generate_shape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_generate_strict_verify, setup, teardown),
        cmocka_unit_test_setup_teardown(test_generate_parents_and_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ensure_cert, setup, teardown),
        cmocka_unit_test_setup_teardown(test_default_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_new_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_alpn_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_handshake_alpn, setup, teardown),
        cmocka_unit_test_setup_teardown(test_handshake_versions_and_ciphers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mtls, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reload, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
