/* The node's wiring and event loop (see app.h): per profile, the
 * certificate, the TLS context, the API front and the core behind it, all
 * on one listener; then the signals. pasarguard and gozargah share the
 * PasarGuard front and backend (gozargah adds mTLS and session auth);
 * marzban has its own front and core session. */
#include "app/app.h"

#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api/marzban.h"
#include "api/pasarguard.h"
#include "base/err.h"
#include "base/log.h"
#include "base/time.h"
#include "net/listener.h"
#include "net/tls.h"
#include "node/backend.h"
#include "node/mzcore.h"

/* DESIGN.md: exit within 2 s when no core runs, 6 s otherwise. */
#define SHUTDOWN_GRACE_MS 1500
#define SHUTDOWN_GRACE_CORE_MS 5500

struct app {
    struct pn_config *cfg;
    struct event_base *base;
    struct pn_tls *tls;
    /* pasarguard, gozargah */
    struct pn_backend *backend;
    struct pn_pasarguard *pg;
    /* marzban */
    struct pn_mzcore *mzcore;
    struct pn_marzban *mzapi;
    char **inbounds; /* INBOUNDS split */
    size_t ninbounds;

    struct pn_http_server srv;
    struct pn_listener *listener;
    struct event *ev_term, *ev_int, *ev_hup, *ev_stop_tick;
    uint64_t stop_deadline;
    bool core_down;
};

/* Runs every 50 ms once stopping: ends the loop when the last connection
 * has finished and the core is down, or at the grace deadline. */
static void stop_tick(evutil_socket_t fd, short what, void *arg)
{
    struct app *a = arg;
    if ((pn_listener_conn_count(a->listener) == 0 && a->core_down) ||
        pn_now_ms() >= a->stop_deadline)
        event_base_loopbreak(a->base);
}

static void core_down(void *arg)
{
    struct app *a = arg;
    a->core_down = true;
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
    bool core;
    /* Log streams never end by themselves: end them so connections finish. */
    if (a->pg) {
        core = pn_backend_state(a->backend) != PN_BACKEND_NONE;
        pn_pasarguard_end_streams(a->pg);
        pn_listener_shutdown(a->listener);
        pn_backend_shutdown(a->backend, core_down, a);
    } else {
        core = pn_mzcore_started(a->mzcore);
        pn_marzban_end_streams(a->mzapi);
        pn_listener_shutdown(a->listener);
        pn_mzcore_shutdown(a->mzcore, core_down, a);
    }
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

/* Makes sure a certificate exists, generating a self-signed one when the
 * operator has none: for PasarGuard/Gozargah with every address the panel
 * may dial; for Marzban with the name `Gozargah` its gRPC client checks,
 * generated when either file is missing (spec marzban.md §1.3). */
static int prepare_certificate(const struct pn_config *cfg)
{
    bool marzban = cfg->profile == PN_PROFILE_MARZBAN;
    size_t n = 0;
    static const char *const gozargah[] = {"Gozargah"};
    char **names = marzban ? NULL : pn_tls_default_names(cfg->cert_names, &n);
    struct pn_cert_opts co = {.cn = marzban ? "Gozargah" : "proxynode",
                              .names = marzban ? gozargah : (const char *const *)names,
                              .nnames = marzban ? 1 : n,
                              .days = marzban ? 36500 : 3650};
    bool generated = false;
    char err[512];
    int rv;
    if (marzban && (access(cfg->ssl_cert_file, F_OK) != 0 || access(cfg->ssl_key_file, F_OK) != 0)) {
        rv = pn_tls_generate_cert(cfg->ssl_cert_file, cfg->ssl_key_file, &co, err, sizeof err);
        generated = rv == PN_OK;
    } else {
        rv = pn_tls_ensure_cert(cfg->ssl_cert_file, cfg->ssl_key_file, &co, &generated, err,
                                sizeof err);
    }
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

/* The client certificate file mTLS needs (gozargah, marzban), with the
 * reference node's texts, but a non-zero exit. */
static int check_client_cert(const struct pn_config *cfg)
{
    if (cfg->profile == PN_PROFILE_PASARGUARD)
        return PN_OK;
    if (!cfg->ssl_client_cert_file || !*cfg->ssl_client_cert_file) {
        pn_log_error("SSL_CLIENT_CERT_FILE is required for rest service.");
        return PN_ERR_INVAL;
    }
    if (access(cfg->ssl_client_cert_file, R_OK) != 0) {
        pn_log_error("Client's certificate file specified on SSL_CLIENT_CERT_FILE is missing "
                     "(%s)",
                     cfg->ssl_client_cert_file);
        return PN_ERR_INVAL;
    }
    return PN_OK;
}

static void wire_pasarguard(struct app *a)
{
    struct pn_config *cfg = a->cfg;
    struct pn_backend_opts bo = {
        .base = a->base,
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
    a->backend = pn_backend_new(&bo);
    struct pn_pasarguard_opts po = {
        .base = a->base,
        .api_key = cfg->api_key,
        .backend = a->backend,
        .node_version = PN_VERSION,
        .session_mode = cfg->profile == PN_PROFILE_GOZARGAH,
        .max_log_per_request = cfg->max_log_per_request,
        .long_poll_logs = cfg->max_log_per_request_set,
    };
    a->pg = pn_pasarguard_new(&po);
    a->srv.on_request = pn_pasarguard_rest;
    a->srv.on_head = pn_pasarguard_rest_head;
    a->srv.arg = a->pg;
    a->srv.grpc = pn_pasarguard_grpc(a->pg);
    a->srv.allow_h2 = true;
}

static void split_inbounds(struct app *a, const char *csv)
{
    if (!csv)
        return;
    char *copy = strdup(csv), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        while (*t == ' ' || *t == '\t')
            t++;
        size_t n = strlen(t);
        while (n && (t[n - 1] == ' ' || t[n - 1] == '\t'))
            t[--n] = '\0';
        if (!n)
            continue;
        a->inbounds = realloc(a->inbounds, (a->ninbounds + 1) * sizeof *a->inbounds);
        a->inbounds[a->ninbounds++] = strdup(t);
    }
    free(copy);
}

static void on_mz_crash(void *arg)
{
    struct app *a = arg;
    if (a->mzapi)
        pn_marzban_invalidate_session(a->mzapi);
}

static void wire_marzban(struct app *a)
{
    struct pn_config *cfg = a->cfg;
    split_inbounds(a, cfg->inbounds);
    struct pn_mzcore_opts mo = {
        .base = a->base,
        .core_path = cfg->core_path,
        .assets = cfg->xray_assets_path,
        .api_host = cfg->xray_api_host,
        .api_port = cfg->xray_api_port,
        .cert_file = cfg->ssl_cert_file,
        .key_file = cfg->ssl_key_file,
        .inbounds = (const char *const *)a->inbounds,
        .ninbounds = a->ninbounds,
        .start_timeout_ms = (unsigned)cfg->start_timeout * 1000,
        .start_wait_fixed = !strcmp(cfg->start_wait, "fixed"),
        .restart_identical = !strcmp(cfg->restart_identical, "restart"),
        .supervise = cfg->supervise,
        .debug = cfg->debug,
        .on_crash = on_mz_crash,
        .arg = a,
    };
    a->mzcore = pn_mzcore_new(&mo);
    struct pn_marzban_opts zo = {
        .base = a->base,
        .core = a->mzcore,
        .connect_stops_core = cfg->connect_stops_core,
    };
    a->mzapi = pn_marzban_new(&zo);
    a->srv.on_request = pn_marzban_rest;
    a->srv.arg = a->mzapi;
    a->srv.respond_error = pn_marzban_respond_error;
    a->srv.allow_h2 = false; /* REST and WebSocket over HTTP/1.1 only */
}

int pn_app_run(struct pn_config *cfg)
{
    struct app a = {.cfg = cfg};
    char err[512];
    int status = 1;
    bool marzban = cfg->profile == PN_PROFILE_MARZBAN;

    pn_log_set_level(cfg->debug ? PN_LOG_DEBUG : PN_LOG_INFO);
    if (pn_config_ensure_api_key(cfg, stdout, err, sizeof err) < 0) {
        pn_log_error("%s", err);
        return 1;
    }
    fflush(stdout);
    if (check_client_cert(cfg) < 0 || prepare_certificate(cfg) < 0)
        return 1;

    struct pn_tls_opts to = {
        .cert_file = cfg->ssl_cert_file,
        .key_file = cfg->ssl_key_file,
        .client_ca_file = cfg->profile == PN_PROFILE_PASARGUARD ? NULL : cfg->ssl_client_cert_file,
        .alpn_h2 = !marzban,
    };
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
    a.srv = (struct pn_http_server){
        .base = a.base,
        .max_body = cfg->max_body,
        .max_header = 64 * 1024,
        .idle_timeout_ms = (unsigned)cfg->http_idle_timeout * 1000,
        .header_timeout_ms = 10000,
    };
    if (marzban)
        wire_marzban(&a);
    else
        wire_pasarguard(&a);
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

    pn_log_info("proxynode %s (%s profile) serving %s on %s port %u", PN_VERSION,
                pn_profile_name(cfg->profile),
                marzban ? "REST and WebSocket" : "gRPC and REST", cfg->node_host,
                pn_listener_port(a.listener));
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
    pn_marzban_free(a.mzapi);
    pn_mzcore_free(a.mzcore);
    for (size_t i = 0; i < a.ninbounds; i++)
        free(a.inbounds[i]);
    free(a.inbounds);
    event_base_free(a.base);
out_tls:
    pn_tls_free(a.tls);
    return status;
}
