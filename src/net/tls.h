/* TLS for the node's listeners (OpenSSL 3): the server context with ALPN
 * selection and optional client-certificate verification, reload on SIGHUP
 * without touching live connections, and generation of the self-signed
 * X.509 v3 certificate the node uses when the operator supplies none. */
#ifndef PN_NET_TLS_H
#define PN_NET_TLS_H

#include <stdbool.h>
#include <stddef.h>

typedef struct ssl_st SSL;

struct pn_tls_opts {
    const char *cert_file;      /* PEM certificate (chain) */
    const char *key_file;       /* PEM private key */
    const char *client_ca_file; /* mTLS: verify client certificates against these; NULL = none */
    bool alpn_h2;               /* select "h2" when offered, else "http/1.1";
                                   false: "http/1.1" if offered, never "h2" */
};

struct pn_tls;

/* Loads the certificate and key into a new server context: TLS 1.2 minimum,
 * TLS 1.3 on, strong ciphers only. Returns PN_OK, PN_ERR_IO (unreadable
 * file) or PN_ERR_TLS (bad PEM, key does not match) with detail in err. */
int pn_tls_new(const struct pn_tls_opts *opts, struct pn_tls **out, char *err, size_t errlen);
/* Re-reads the files into a fresh context used by new connections; live
 * connections keep theirs. On failure the old context stays. */
int pn_tls_reload(struct pn_tls *tls, char *err, size_t errlen);
/* A new server-side SSL object for one accepted connection. */
SSL *pn_tls_ssl_new(struct pn_tls *tls);
void pn_tls_free(struct pn_tls *tls);

struct pn_cert_opts {
    const char *cn;                /* subject CN */
    const char *const *names;      /* SAN entries: IP literals become IP SANs, others DNS */
    size_t nnames;
    unsigned days;                 /* validity, 3650 by default when 0 */
};

/* Generates an ECDSA P-256 key and a self-signed X.509 v3 certificate
 * (positive random serial, SKI, AKI = SKI, basicConstraints critical CA:TRUE,
 * keyUsage digitalSignature+keyCertSign, SAN) and writes both atomically
 * (temp file, fsync, rename), the key with mode 0600. Parent directories are
 * created with mode 0700. Returns PN_OK, PN_ERR_IO or PN_ERR_TLS. */
int pn_tls_generate_cert(const char *cert_file, const char *key_file,
                         const struct pn_cert_opts *opts, char *err, size_t errlen);

/* Generates the pair only when neither file exists (*generated = true).
 * One file present without the other is an error (PN_ERR_INVAL). */
int pn_tls_ensure_cert(const char *cert_file, const char *key_file,
                       const struct pn_cert_opts *opts, bool *generated, char *err,
                       size_t errlen);

/* The names a generated certificate should carry: localhost, 127.0.0.1,
 * ::1, every address of every up interface, the host name, then the
 * comma-separated extra names. Caller frees with pn_tls_free_names. */
char **pn_tls_default_names(const char *extra_csv, size_t *n);
void pn_tls_free_names(char **names, size_t n);

#endif
