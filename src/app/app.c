/* The node's wiring and event loop (see app.h). */
#include "app/app.h"

#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api/pasarguard.h"
#include "base/err.h"
#include "base/log.h"
#include "base/time.h"
#include "net/listener.h"
#include "net/tls.h"
#include "node/backend.h"

/* DESIGN.md: exit within 2 s when no core runs, 6 s otherwise. */
#define SHUTDOWN_GRACE_MS 1500
#define SHUTDOWN_GRACE_CORE_MS 5500

struct app {
    struct pn_config *cfg;
    struct event_base *base;
    struct pn_tls *tls;
    struct pn_backend *backend;
    struct pn_pasarguard *pg;
    struct pn_http_server srv;
    struct pn_listener *listener;
    struct event *ev_term, *ev_int, *ev_hup, *ev_stop_tick;
    uint64_t stop_deadline;
    bool backend_down;
};

/* Runs every 50 ms once stopping: ends the loop when the last connection
 * has finished, or at the grace deadline. */
static void stop_tick(evutil_socket_t fd, short what, void *arg)
{
    struct app *a = arg;
    if ((pn_listener_conn_count(a->listener) == 0 && a->backend_down) ||
        pn_now_ms() >= a->stop_deadline)
        event_base_loopbreak(a->base);
}

static void backend_down(void *arg)
{
    struct app *a = arg;
    a->backend_down = true;
}

static void on_stop_signal(evutil_socket_t sig, short what, void *arg)
{
    struct app *a = arg;
    if (a->ev_stop_tick) {
        pn_log_info("second stop signal: exiting now");
        event_base_loopbreak(a->base);
        return;
    }
    pn_log_info("received %s: stopping", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    bool core = pn_backend_state(a->backend) != PN_BACKEND_NONE;
    pn_pasarguard_end_streams(a->pg); /* log streams never end by themselves */
    pn_listener_shutdown(a->listener);
    pn_backend_shutdown(a->backend, backend_down, a);
    a->stop_deadline = pn_now_ms() + (core ? SHUTDOWN_GRACE_CORE_MS : SHUTDOWN_GRACE_MS);
    a->ev_stop_tick = event_new(a->base, -1, EV_PERSIST, stop_tick, a);
    struct timeval tv = {0, 50000};
    event_add(a->ev_stop_tick, &tv);
    stop_tick(-1, 0, a);
}

static void on_hup(evutil_socket_t sig, short what, void *arg)
{
    struct app *a = arg;
    char err[512];
    if (pn_tls_reload(a->tls, err, sizeof err) < 0)
        pn_log_error("SIGHUP: certificate reload failed, keeping the old one: %s", err);
    else
        pn_log_info("SIGHUP: certificate and key reloaded");
}

/* Makes sure a certificate exists, generating the self-signed one the
 * panel will be given when the operator has none. */
static int prepare_certificate(const struct pn_config *cfg)
{
    size_t n;
    char **names = pn_tls_default_names(cfg->cert_names, &n);
    struct pn_cert_opts co = {.cn = "proxynode", .names = (const char *const *)names,
                              .nnames = n, .days = 3650};
    bool generated = false;
    char err[512];
    int rv = pn_tls_ensure_cert(cfg->ssl_cert_file, cfg->ssl_key_file, &co, &generated, err,
                                sizeof err);
    pn_tls_free_names(names, n);
    if (rv < 0) {
        pn_log_error("certificate: %s", err);
        if (access(cfg->ssl_cert_file, F_OK) == 0 && access(cfg->ssl_key_file, F_OK) != 0)
            pn_log_error("hint: SSL_CERT_FILE is also OpenSSL's name for a CA bundle; if %s is "
                         "one, set SSL_CERT_FILE and SSL_KEY_FILE to the node's own certificate "
                         "and key (both absent: a self-signed pair is generated)",
                         cfg->ssl_cert_file);
        return rv;
    }
    if (generated)
        pn_log_info("generated a self-signed certificate at %s (paste it into the panel)",
                    cfg->ssl_cert_file);
    return PN_OK;
}

int pn_app_run(struct pn_config *cfg)
{
    struct app a = {.cfg = cfg};
    char err[512];
    int status = 1;

    pn_log_set_level(cfg->debug ? PN_LOG_DEBUG : PN_LOG_INFO);
    if (cfg->profile != PN_PROFILE_PASARGUARD) {
        pn_log_error("the %s profile is not available in this version; use "
                     "PROXYNODE_PROFILE=pasarguard with API_KEY",
                     pn_profile_name(cfg->profile));
        return 1;
    }
    if (pn_config_ensure_api_key(cfg, stdout, err, sizeof err) < 0) {
        pn_log_error("%s", err);
        return 1;
    }
    fflush(stdout);
    if (prepare_certificate(cfg) < 0)
        return 1;

    struct pn_tls_opts to = {.cert_file = cfg->ssl_cert_file,
                             .key_file = cfg->ssl_key_file,
                             .alpn_h2 = true};
    if (pn_tls_new(&to, &a.tls, err, sizeof err) < 0) {
        pn_log_error("TLS: %s", err);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    a.base = event_base_new();
    if (!a.base) {
        pn_log_error("cannot create the event loop");
        goto out_tls;
    }
    struct pn_backend_opts bo = {
        .base = a.base,
        .core_path = cfg->core_path,
        .assets = cfg->xray_assets_path,
        .start_timeout_ms = (unsigned)cfg->start_timeout * 1000,
        .bank_interval_ms = (unsigned)cfg->stats_bank_interval * 1000,
        .log_buffer_size = (size_t)cfg->log_buffer_size,
        .startup_tail = (unsigned)cfg->startup_log_tail_size,
        .keepalive_stops_core = cfg->keepalive_stops_core,
        .debug = cfg->debug,
        .generated_config_path = cfg->generated_config_path,
    };
    a.backend = pn_backend_new(&bo);
    struct pn_pasarguard_opts po = {.base = a.base,
                                    .api_key = cfg->api_key,
                                    .backend = a.backend,
                                    .node_version = PN_VERSION};
    a.pg = pn_pasarguard_new(&po);
    a.srv = (struct pn_http_server){
        .base = a.base,
        .on_request = pn_pasarguard_rest,
        .arg = a.pg,
        .grpc = pn_pasarguard_grpc(a.pg),
        .allow_h2 = true,
        .max_body = cfg->max_body,
        .max_header = 64 * 1024,
        .idle_timeout_ms = 60000,
        .header_timeout_ms = 10000,
    };
    struct pn_listener_opts lo = {.host = cfg->node_host,
                                  .port = cfg->service_port,
                                  .tls = a.tls,
                                  .srv = &a.srv,
                                  .handshake_timeout_ms = 10000};
    if (pn_listener_new(&lo, &a.listener, err, sizeof err) < 0) {
        pn_log_error("%s", err);
        goto out_api;
    }
    a.ev_term = evsignal_new(a.base, SIGTERM, on_stop_signal, &a);
    a.ev_int = evsignal_new(a.base, SIGINT, on_stop_signal, &a);
    a.ev_hup = evsignal_new(a.base, SIGHUP, on_hup, &a);
    event_add(a.ev_term, NULL);
    event_add(a.ev_int, NULL);
    event_add(a.ev_hup, NULL);

    pn_log_info("proxynode %s (%s profile) serving gRPC and REST on %s port %u", PN_VERSION,
                pn_profile_name(cfg->profile), cfg->node_host, pn_listener_port(a.listener));
    event_base_dispatch(a.base);
    pn_log_info("stopped");
    status = 0;

    event_free(a.ev_term);
    event_free(a.ev_int);
    event_free(a.ev_hup);
    if (a.ev_stop_tick)
        event_free(a.ev_stop_tick);
    pn_listener_free(a.listener);
out_api:
    pn_pasarguard_free(a.pg);
    pn_backend_free(a.backend);
    event_base_free(a.base);
out_tls:
    pn_tls_free(a.tls);
    return status;
}
