/* The Marzban core session against the real /usr/bin/v2ray: start and
 * readiness through the node's own loopback API inbound, "started
 * already", identical and changed restarts (handover: new pid, old one
 * gone), queued restarts where the latest config wins, stop, a config
 * v2ray refuses (503 detail = its last line), a missing binary, the 3 s
 * cap (shortened here) in both wait modes, crash restarts with and
 * without supervision, the log ring, shutdown, and 25 restarts leaving one
 * core and no zombies. mzcore.c is included for its internals (the active
 * generation's pid, the cap). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../../src/node/mzcore.c"
#include "base/time.h"
#include "net/tls.h"

#define V2RAY "/usr/bin/v2ray"

struct env {
    struct event_base *base;
    struct event *tick;
    struct pn_mzcore *mz;
    struct pn_mzcore_opts o;
    char dir[64], cert[128], key[128], script[128];
    uint16_t api_port;
    int ncrash;
    bool shut;
};

struct res {
    bool done;
    int rv;
    char detail[2048];
    uint64_t at;
};

/* ---- helpers -------------------------------------------------------------------- */

static void noop(evutil_socket_t fd, short what, void *arg) {}

static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static bool can_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {
        .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bool ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

static void on_crash_cb(void *arg)
{
    struct env *e = arg;
    e->ncrash++;
}

static void res_cb(int rv, const char *detail, void *arg)
{
    struct res *r = arg;
    assert_false(r->done);
    r->done = true;
    r->rv = rv;
    snprintf(r->detail, sizeof r->detail, "%s", detail ? detail : "");
    r->at = pn_now_ms();
}

static bool run_until_done(struct env *e, const bool *flag, int ms)
{
    uint64_t end = pn_now_ms() + (uint64_t)ms;
    while (!*flag) {
        if (pn_now_ms() >= end)
            return false;
        event_base_loop(e->base, EVLOOP_ONCE);
    }
    return true;
}

static void run_for(struct env *e, int ms)
{
    uint64_t end = pn_now_ms() + (uint64_t)ms;
    while (pn_now_ms() < end)
        event_base_loop(e->base, EVLOOP_ONCE);
}

static void wait_res(struct env *e, struct res *r, int ms)
{
    if (!run_until_done(e, &r->done, ms))
        fail_msg("no answer within %d ms", ms);
}

/* A v2ray config with one socks inbound on a free port. direct_first:
 * freedom is the default outbound, as in panel configs; otherwise
 * blackhole is. (v2ray accepts on its inbounds a moment before its API
 * outbound exists; an API poll landing there goes to the default
 * outbound, and freedom retries its dial of 127.0.0.1:0 for about 1 s,
 * which delays the supervisor's readiness. Blackhole closes at once.) */
static uint16_t last_port; /* the inbound port of the last config made */

static char *config_out(const char *tag, bool direct_first)
{
    last_port = free_port();
    return pn_asprintf("{\"log\":{\"loglevel\":\"warning\"},\"inbounds\":[{\"tag\":\"%s\","
                       "\"listen\":\"127.0.0.1\",\"port\":%u,\"protocol\":\"socks\","
                       "\"settings\":{\"auth\":\"noauth\"}}],\"outbounds\":[%s]}",
                       tag, last_port,
                       direct_first ? "{\"protocol\":\"freedom\",\"tag\":\"direct\"},"
                                      "{\"protocol\":\"blackhole\",\"tag\":\"block\"}"
                                    : "{\"protocol\":\"blackhole\",\"tag\":\"block\"},"
                                      "{\"protocol\":\"freedom\",\"tag\":\"direct\"}");
}

static char *config(const char *tag)
{
    return config_out(tag, false);
}

static void make_env(struct env *e, const char *core)
{
    e->base = event_base_new();
    e->tick = event_new(e->base, -1, EV_PERSIST, noop, NULL);
    struct timeval tv = {0, 20000};
    event_add(e->tick, &tv);
    snprintf(e->dir, sizeof e->dir, "/tmp/pn-mzcore-XXXXXX");
    assert_non_null(mkdtemp(e->dir));
    snprintf(e->cert, sizeof e->cert, "%s/cert.pem", e->dir);
    snprintf(e->key, sizeof e->key, "%s/key.pem", e->dir);
    static const char *const names[] = {"Gozargah"};
    struct pn_cert_opts co = {.cn = "Gozargah", .names = names, .nnames = 1, .days = 1};
    char err[256];
    if (pn_tls_generate_cert(e->cert, e->key, &co, err, sizeof err) != PN_OK)
        fail_msg("cert: %s", err);
    e->api_port = free_port();
    e->o = (struct pn_mzcore_opts){
        .base = e->base,
        .core_path = core,
        .assets = "/usr/share/v2ray",
        .api_host = "127.0.0.1",
        .api_port = e->api_port,
        .cert_file = e->cert,
        .key_file = e->key,
        .start_timeout_ms = 10000,
        .supervise = true,
        .on_crash = on_crash_cb,
        .arg = e,
    };
}

static void require_v2ray(void)
{
    if (access(V2RAY, X_OK) != 0)
        fail_msg(V2RAY " missing: apt-get install v2ray");
}

static int setup(void **state)
{
    require_v2ray();
    struct env *e = calloc(1, sizeof *e);
    make_env(e, V2RAY);
    *state = e;
    return 0;
}

static void rm_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static int teardown(void **state)
{
    struct env *e = *state;
    pn_mzcore_free(e->mz);
    event_free(e->tick);
    event_base_free(e->base);
    rm_dir(e->dir);
    free(e);
    start_cap_ms = 3000;
    return 0;
}

static void new_core(struct env *e)
{
    e->mz = pn_mzcore_new(&e->o);
}

static pid_t active_pid(struct env *e)
{
    struct pn_core_gen *g = e->mz->sup ? pn_supervisor_active(e->mz->sup) : NULL;
    return g ? pn_core_gen_pid(g) : 0;
}

/* The state letter of pid in /proc (0 when gone). */
static char proc_state(pid_t pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *fp = fopen(path, "r");
    if (!fp)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, fp);
    fclose(fp);
    buf[n] = '\0';
    char *rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' ? rp[2] : 0;
}

static bool pid_gone(pid_t pid)
{
    return proc_state(pid) == 0;
}

/* Our children: how many live and how many zombies. */
static void count_children(int *live, int *zombies)
{
    *live = *zombies = 0;
    DIR *d = opendir("/proc");
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        char path[300], buf[512];
        snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
        FILE *fp = fopen(path, "r");
        if (!fp)
            continue;
        size_t n = fread(buf, 1, sizeof buf - 1, fp);
        fclose(fp);
        buf[n] = '\0';
        char *rp = strrchr(buf, ')');
        char st;
        int ppid;
        if (!rp || sscanf(rp + 2, "%c %d", &st, &ppid) != 2 || ppid != getpid())
            continue;
        if (st == 'Z')
            (*zombies)++;
        else
            (*live)++;
    }
    closedir(d);
}

/* Runs until no supervisor start is pending (an answer may come from the
 * core's "started" line before the supervisor's API poll makes the new
 * generation active). */
static void settle(struct env *e)
{
    uint64_t end = pn_now_ms() + 4000;
    while (e->mz->launches && pn_now_ms() < end)
        run_for(e, 10);
    assert_null(e->mz->launches);
}

static void start_ok(struct env *e, const char *cfg)
{
    struct res r = {0};
    char err[256] = "";
    uint64_t t0 = pn_now_ms();
    assert_int_equal(
        pn_mzcore_start(e->mz, cfg, strlen(cfg), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    assert_false(r.done); /* never called back from inside the call */
    wait_res(e, &r, 5000);
    if (r.rv != PN_OK)
        fail_msg("start failed: %s", r.detail);
    assert_true(r.at - t0 < 2500);
    assert_true(pn_mzcore_started(e->mz));
    settle(e);
    assert_true(active_pid(e) > 0);
}

static void restart_ok(struct env *e, const char *cfg)
{
    struct res r = {0};
    assert_int_equal(pn_mzcore_restart(e->mz, cfg, strlen(cfg), "127.0.0.1", res_cb, &r, NULL),
                     PN_OK);
    wait_res(e, &r, 5000);
    if (r.rv != PN_OK)
        fail_msg("restart failed: %s", r.detail);
    settle(e);
}

static void stop_ok(struct env *e)
{
    struct res r = {0};
    assert_int_equal(pn_mzcore_stop(e->mz, res_cb, &r, NULL), PN_OK);
    wait_res(e, &r, 8000);
    assert_int_equal(r.rv, PN_OK);
    assert_false(pn_mzcore_started(e->mz));
}

static bool wait_gone(struct env *e, pid_t pid, int ms)
{
    uint64_t end = pn_now_ms() + (uint64_t)ms;
    while (!pid_gone(pid)) {
        if (pn_now_ms() >= end)
            return false;
        run_for(e, 20);
    }
    return true;
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_version_probe(void **state)
{
    struct env *e = *state;
    new_core(e);
    assert_null(pn_mzcore_version(e->mz)); /* the probe runs */
    assert_false(pn_mzcore_started(e->mz));
    uint64_t end = pn_now_ms() + 5000;
    while (!pn_mzcore_version(e->mz) && pn_now_ms() < end)
        event_base_loop(e->base, EVLOOP_ONCE);
    assert_string_equal(pn_mzcore_version(e->mz), "4.34.0");
}

static void test_start_restart_stop(void **state)
{
    struct env *e = *state;
    new_core(e);
    char *a = config_out("a", true);
    uint16_t a_port = last_port;
    char *b = config_out("b", true);

    start_ok(e, a);
    pid_t p1 = active_pid(e);
    assert_string_equal(pn_mzcore_version(e->mz), "4.34.0");

    /* a second start: refused at once */
    struct res r = {0};
    char err[256] = "";
    uint64_t t0 = pn_now_ms();
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_ERR_STATE);
    assert_string_equal(err, "Xray is started already");
    assert_true(pn_now_ms() - t0 < 100);
    run_for(e, 50);
    assert_false(r.done);

    /* identical restart: answered without a new process */
    t0 = pn_now_ms();
    restart_ok(e, a);
    assert_true(pn_now_ms() - t0 < 100);
    assert_int_equal(active_pid(e), p1);

    /* the same config with other whitespace is identical too */
    char *a2 = pn_asprintf(" %s\n", a);
    restart_ok(e, a2);
    assert_int_equal(active_pid(e), p1);

    /* a changed config: a new core, the old one goes; when the answer
     * comes the old one no longer accepts (its inbounds were removed) */
    assert_true(can_connect(a_port));
    restart_ok(e, b);
    pid_t p2 = active_pid(e);
    assert_true(p2 > 0 && p2 != p1);
    assert_true(pn_mzcore_started(e->mz));
    assert_false(can_connect(a_port));
    if (!wait_gone(e, p1, 4000))
        fail_msg("the old core %d is still there", (int)p1);

    /* a changed peer is a change too */
    struct res r2 = {0};
    assert_int_equal(pn_mzcore_restart(e->mz, b, strlen(b), "10.0.0.5", res_cb, &r2, NULL), PN_OK);
    wait_res(e, &r2, 5000);
    assert_int_equal(r2.rv, PN_OK);
    settle(e);
    pid_t p3 = active_pid(e);
    assert_true(p3 != p2);

    stop_ok(e);
    assert_true(wait_gone(e, p3, 1000));
    assert_true(wait_gone(e, p2, 4000));
    stop_ok(e); /* idempotent */
    free(a);
    free(a2);
    free(b);
}

static void test_restart_identical_restart_mode(void **state)
{
    struct env *e = *state;
    e->o.restart_identical = true;
    new_core(e);
    char *a = config("a");
    start_ok(e, a);
    pid_t p1 = active_pid(e);
    restart_ok(e, a);
    assert_true(active_pid(e) != p1);
    free(a);
}

static void test_restart_when_stopped_starts(void **state)
{
    struct env *e = *state;
    new_core(e);
    char *a = config("a");
    restart_ok(e, a);
    assert_true(pn_mzcore_started(e->mz));
    assert_true(active_pid(e) > 0);
    free(a);
}

/* v2ray 4.34 refusing the config prints its "[Info] ... Reading config"
 * line through an asynchronous logger and the error with a plain print, so
 * on a loaded machine the Info line can come last: either is "the last
 * line it printed". */
static bool v2ray_last_line(const char *detail)
{
    return strstr(detail, "unknown config id: nonsense") != NULL ||
           strstr(detail, "Reading config: stdin:") != NULL;
}

static void test_bad_config_detail(void **state)
{
    struct env *e = *state;
    new_core(e);
    const char *bad = "{\"inbounds\":[{\"protocol\":\"nonsense\",\"port\":1}]}";
    struct res r = {0};
    char err[256];
    assert_int_equal(
        pn_mzcore_start(e->mz, bad, strlen(bad), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    wait_res(e, &r, 5000);
    assert_int_equal(r.rv, PN_ERR_PROTO);
    /* the last line v2ray printed, nothing else */
    assert_true(v2ray_last_line(r.detail));
    assert_null(strchr(r.detail, '\n'));
    assert_false(pn_mzcore_started(e->mz));

    /* a good start afterwards works, and a refused restart keeps it */
    char *a = config("a");
    start_ok(e, a);
    pid_t p1 = active_pid(e);
    struct res r2 = {0};
    assert_int_equal(pn_mzcore_restart(e->mz, bad, strlen(bad), "127.0.0.1", res_cb, &r2, NULL),
                     PN_OK);
    wait_res(e, &r2, 5000);
    assert_int_equal(r2.rv, PN_ERR_PROTO);
    assert_true(v2ray_last_line(r2.detail));
    assert_int_equal(active_pid(e), p1);
    assert_true(pn_mzcore_started(e->mz));
    free(a);
}

static void test_missing_binary(void **state)
{
    struct env *e = *state;
    e->o.core_path = "/nonexistent/xray";
    new_core(e);
    char *a = config("a");
    struct res r = {0};
    char err[256];
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    wait_res(e, &r, 2000);
    assert_true(r.rv < 0);
    assert_string_equal(r.detail, "xray executable not found: /nonexistent/xray");
    run_for(e, 50);
    assert_string_equal(pn_mzcore_version(e->mz), "");
    pn_mzcore_free(e->mz);

    /* no core found at all */
    e->o.core_path = NULL;
    setenv("XRAY_EXECUTABLE_PATH", "/opt/none/xray", 1);
    new_core(e);
    assert_string_equal(pn_mzcore_version(e->mz), "");
    struct res r2 = {0};
    assert_int_equal(pn_mzcore_restart(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r2, NULL), PN_OK);
    wait_res(e, &r2, 2000);
    assert_string_equal(r2.detail, "xray executable not found: /opt/none/xray");
    unsetenv("XRAY_EXECUTABLE_PATH");
    stop_ok(e);
    free(a);
}

/* Restarts that queue behind a running one fold into the newest: every
 * caller gets its outcome and the newest config runs. */
static void test_queued_restarts_latest_wins(void **state)
{
    struct env *e = *state;
    new_core(e);
    char *cfg[5];
    for (int i = 0; i < 5; i++)
        cfg[i] = config(i == 4 ? "last" : "x");
    start_ok(e, cfg[0]);
    struct res r[5] = {0};
    struct pn_mzcore_op *ops[5];
    for (int i = 1; i < 5; i++) {
        assert_int_equal(
            pn_mzcore_restart(e->mz, cfg[i], strlen(cfg[i]), "127.0.0.1", res_cb, &r[i], &ops[i]),
            PN_OK);
        if (i == 1) { /* let the first one start running */
            event_base_loop(e->base, EVLOOP_NONBLOCK);
            assert_true(ops[1]->running);
        }
    }
    pn_mzcore_op_detach(ops[2]); /* this caller left: no callback */
    wait_res(e, &r[4], 8000);
    run_for(e, 20);
    settle(e);
    for (int i = 1; i < 5; i++) {
        if (i == 2) {
            assert_false(r[i].done);
            continue;
        }
        assert_true(r[i].done);
        assert_int_equal(r[i].rv, PN_OK);
    }
    struct spec *running = pn_core_gen_data(pn_supervisor_active(e->mz->sup));
    assert_string_equal(running->config, cfg[4]);
    /* 1 start + the first restart + the folded one */
    assert_int_equal(pn_core_gen_id(pn_supervisor_active(e->mz->sup)), 3);
    for (int i = 0; i < 5; i++)
        free(cfg[i]);
}

static void test_25_restarts_one_core(void **state)
{
    struct env *e = *state;
    new_core(e);
    char *a = config("a");
    start_ok(e, a);
    free(a);
    for (int i = 0; i < 25; i++) {
        char tag[16];
        snprintf(tag, sizeof tag, "t%d", i);
        char *c = config(tag);
        restart_ok(e, c);
        free(c);
    }
    pid_t last = active_pid(e);
    /* the retired cores stop at their next drain check */
    int live = 0, zombies = 0;
    uint64_t end = pn_now_ms() + 4000;
    do {
        run_for(e, 50);
        count_children(&live, &zombies);
    } while ((live != 1 || zombies != 0) && pn_now_ms() < end); /* reaped on the next event */
    assert_int_equal(live, 1);
    assert_int_equal(zombies, 0);
    assert_int_equal(active_pid(e), last);
    stop_ok(e);
    assert_true(wait_gone(e, last, 1000));
    count_children(&live, &zombies);
    assert_int_equal(live, 0);
    assert_int_equal(zombies, 0);
}

static bool ring_has(struct pn_mzcore *mz, const char *needle)
{
    struct pn_log_sub *s = pn_log_sub_new(pn_mzcore_logs(mz), 100, NULL, NULL);
    const char *line;
    size_t len;
    bool found = false;
    while ((line = pn_log_sub_next(s, &len, NULL)))
        found |= strstr(line, needle) != NULL;
    pn_log_sub_free(s);
    return found;
}

static bool ring_has_exact(struct pn_mzcore *mz, const char *want)
{
    struct pn_log_sub *s = pn_log_sub_new(pn_mzcore_logs(mz), 100, NULL, NULL);
    const char *line;
    size_t len;
    bool found = false;
    while ((line = pn_log_sub_next(s, &len, NULL)))
        found |= len == strlen(want) && !memcmp(line, want, len);
    pn_log_sub_free(s);
    return found;
}

/* A line longer than the ring's limit goes in as pieces that join up. */
static void test_ring_pieces(void **state)
{
    struct env *e = *state;
    new_core(e);
    size_t n = 140000;
    char *line = malloc(n + 1);
    for (size_t i = 0; i < n; i += 2) { /* "é" repeated: pieces must not split it */
        line[i] = (char)0xc3;
        line[i + 1] = (char)0xa9;
    }
    line[n] = '\0';
    line[0] = 'x'; /* shift the characters so a cut at 65536 would split one */
    line[1] = ' ';
    ring_push(e->mz, line, n);
    struct pn_log_sub *s = pn_log_sub_new(pn_mzcore_logs(e->mz), 100, NULL, NULL);
    const char *piece;
    size_t len, total = 0;
    int pieces = 0;
    while ((piece = pn_log_sub_next(s, &len, NULL))) {
        assert_true(len <= RING_PIECE);
        assert_true(pn_utf8_valid(piece, len));
        assert_memory_equal(piece, line + total, len);
        total += len;
        pieces++;
    }
    assert_int_equal(total, n);
    assert_int_equal(pieces, 3);
    pn_log_sub_free(s);
    free(line);
}

static void test_log_ring(void **state)
{
    struct env *e = *state;
    new_core(e);
    char *a = config("a");
    start_ok(e, a);
    run_for(e, 100);
    assert_true(ring_has(e->mz, "V2Ray 4.34.0 started"));
    assert_true(pn_logring_count(pn_mzcore_logs(e->mz)) <= 100);
    free(a);
}

/* A fake core that ignores its config and prints given lines. */
static void write_script(struct env *e, const char *body)
{
    snprintf(e->script, sizeof e->script, "%s/core.sh", e->dir);
    FILE *fp = fopen(e->script, "w");
    assert_non_null(fp);
    fprintf(
        fp,
        "#!/bin/sh\nif [ \"$1\" = -version ]; then echo 'V2Ray 4.34.0 (user)'; exit 0; fi\n%s\n",
        body);
    fclose(fp);
    chmod(e->script, 0755);
    e->o.core_path = e->script;
}

static void test_detail_last_nonempty_line_and_status(void **state)
{
    struct env *e = *state;
    write_script(e,
                 "cat >/dev/null; printf '  first\\n\\tbad \\377 byte  \\n\\n   \\n' >&2; exit 3");
    new_core(e);
    char *a = config("a");
    struct res r = {0};
    char err[256];
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    wait_res(e, &r, 5000);
    assert_true(r.rv < 0);
    assert_string_equal(r.detail, "bad \xef\xbf\xbd byte"); /* stderr, stripped, cleaned */
    assert_true(ring_has_exact(e->mz, "first"));
    assert_true(ring_has_exact(e->mz, "")); /* empty lines are kept */
    pn_mzcore_free(e->mz);

    write_script(e, "cat >/dev/null; exit 7");
    new_core(e);
    struct res r2 = {0};
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r2, NULL, err, sizeof err),
        PN_OK);
    wait_res(e, &r2, 5000);
    assert_true(r2.rv < 0);
    assert_true(!strcmp(r2.detail, "xray exited with status 7") ||
                !strcmp(r2.detail, "xray exited before it was ready"));
    free(a);
}

/* A core slower than the cap: answered as started at the cap, and the
 * start goes on to become active. */
static void test_cap_answers_slow_start(void **state)
{
    struct env *e = *state;
    write_script(e, "sleep 1; exec " V2RAY " \"$@\"");
    start_cap_ms = 200;
    new_core(e);
    char *a = config("a");
    struct res r = {0};
    char err[256];
    uint64_t t0 = pn_now_ms();
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    wait_res(e, &r, 5000);
    assert_int_equal(r.rv, PN_OK);
    if (!(r.at - t0 >= 190 && r.at - t0 < 900)) /* timers may fire a ms early */
        fail_msg("answered after %llu ms (%d %s)", (unsigned long long)(r.at - t0), r.rv, r.detail);
    assert_true(pn_mzcore_started(e->mz));
    assert_int_equal(active_pid(e), 0); /* not ready yet */
    /* a second /start is still refused */
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_ERR_STATE);
    uint64_t end = pn_now_ms() + 5000;
    while (!active_pid(e) && pn_now_ms() < end)
        run_for(e, 20);
    assert_true(active_pid(e) > 0);
    assert_true(e->mz->cur != NULL);
    free(a);
}

/* A core that printed its "started" line but never became the supervisor's
 * active one (its API never answers here): an identical /restart keeps it,
 * and when it dies it is brought up again and the owner is told. */
static void test_dies_before_takeover(void **state)
{
    struct env *e = *state;
    write_script(e, "echo '2024/01/02 10:00:00 [Warning] v2ray.com/core: V2Ray 4.34.0 started'; "
                    "exec sleep 30");
    new_core(e);
    char *a = config("a"), *b = config("b");
    struct res r = {0};
    char err[256];
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    wait_res(e, &r, 2000);
    assert_int_equal(r.rv, PN_OK);
    assert_true(pn_mzcore_started(e->mz));
    assert_int_equal(active_pid(e), 0);
    int live, zombies;
    count_children(&live, &zombies);
    assert_int_equal(live, 1);

    /* identical: at once, the same process */
    uint64_t t0 = pn_now_ms();
    struct res r2 = {0};
    assert_int_equal(pn_mzcore_restart(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r2, NULL), PN_OK);
    wait_res(e, &r2, 2000);
    assert_int_equal(r2.rv, PN_OK);
    assert_true(pn_now_ms() - t0 < 100);
    count_children(&live, &zombies);
    assert_int_equal(live, 1);

    /* it dies: brought up again (100 ms backoff), the owner told once */
    pid_t pid = 0;
    DIR *d = opendir("/proc");
    struct dirent *de;
    while ((de = readdir(d)) && !pid) {
        char path[300], buf[512];
        snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
        FILE *fp = fopen(path, "r");
        if (!fp)
            continue;
        size_t n = fread(buf, 1, sizeof buf - 1, fp);
        fclose(fp);
        buf[n] = '\0';
        char *rp = strrchr(buf, ')');
        int ppid;
        if (rp && sscanf(rp + 4, "%d", &ppid) == 1 && ppid == getpid())
            pid = atoi(de->d_name);
    }
    closedir(d);
    assert_true(pid > 0);
    kill(pid, SIGKILL);
    run_for(e, 50);
    assert_int_equal(e->ncrash, 1);
    assert_true(pn_mzcore_started(e->mz));
    uint64_t end = pn_now_ms() + 2000;
    do {
        run_for(e, 20);
        count_children(&live, &zombies);
    } while (live != 1 && pn_now_ms() < end);
    assert_int_equal(live, 1);
    assert_int_equal(e->ncrash, 1);

    /* a changed restart replaces it; a stop ends everything */
    struct res r3 = {0};
    assert_int_equal(pn_mzcore_restart(e->mz, b, strlen(b), "127.0.0.1", res_cb, &r3, NULL), PN_OK);
    wait_res(e, &r3, 2000);
    assert_int_equal(r3.rv, PN_OK);
    stop_ok(e);
    end = pn_now_ms() + 2000;
    do {
        run_for(e, 20);
        count_children(&live, &zombies);
    } while (live + zombies && pn_now_ms() < end);
    assert_int_equal(live + zombies, 0);
    free(a);
    free(b);
}

/* An identical /restart while the same config is still starting (its
 * start answered at the cap) waits for that start instead of a new one. */
static void test_identical_restart_joins_pending_start(void **state)
{
    struct env *e = *state;
    write_script(e, "sleep 0.5; exec " V2RAY " \"$@\"");
    start_cap_ms = 100;
    new_core(e);
    char *a = config("a");
    struct res r = {0}, r2 = {0};
    char err[256];
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    wait_res(e, &r, 2000);
    assert_int_equal(r.rv, PN_OK);
    start_cap_ms = 3000;
    assert_int_equal(pn_mzcore_restart(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r2, NULL), PN_OK);
    wait_res(e, &r2, 3000);
    assert_int_equal(r2.rv, PN_OK);
    settle(e);
    assert_int_equal(pn_core_gen_id(pn_supervisor_active(e->mz->sup)), 1);
    free(a);
}

static void test_fixed_wait(void **state)
{
    struct env *e = *state;
    e->o.start_wait_fixed = true;
    start_cap_ms = 800;
    new_core(e);
    char *a = config("a"), *b = config("b");
    struct res r = {0};
    char err[256];
    uint64_t t0 = pn_now_ms();
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    wait_res(e, &r, 5000);
    assert_int_equal(r.rv, PN_OK);
    assert_true(r.at - t0 >= 790);
    assert_true(active_pid(e) > 0);
    /* a failure is answered at once, not after the wait */
    const char *bad = "{\"inbounds\":[{\"protocol\":\"nonsense\",\"port\":1}]}";
    struct res r2 = {0};
    t0 = pn_now_ms();
    assert_int_equal(pn_mzcore_restart(e->mz, bad, strlen(bad), "127.0.0.1", res_cb, &r2, NULL),
                     PN_OK);
    wait_res(e, &r2, 5000);
    assert_true(r2.rv < 0);
    assert_true(r2.at - t0 < 700);
    /* an identical restart is answered at once */
    t0 = pn_now_ms();
    restart_ok(e, a);
    assert_true(pn_now_ms() - t0 < 100);
    restart_ok(e, b);
    free(a);
    free(b);
}

static void test_crash_restarts_and_tells(void **state)
{
    struct env *e = *state;
    new_core(e);
    char *a = config("a");
    start_ok(e, a);
    pid_t p1 = active_pid(e);
    kill(p1, SIGKILL);
    uint64_t end = pn_now_ms() + 3000;
    while ((active_pid(e) == 0 || active_pid(e) == p1) && pn_now_ms() < end)
        run_for(e, 20);
    assert_true(active_pid(e) > 0 && active_pid(e) != p1);
    assert_int_equal(e->ncrash, 1);
    assert_true(pn_mzcore_started(e->mz));
    /* the restarted core runs the same config: a restart with it is identical */
    pid_t p2 = active_pid(e);
    restart_ok(e, a);
    assert_int_equal(active_pid(e), p2);
    free(a);
}

/* Restarts after a crash that keep failing tell the owner once. */
static void test_failing_crash_restarts_tell_once(void **state)
{
    struct env *e = *state;
    char flag[160], body[400];
    snprintf(flag, sizeof flag, "%s/broken", e->dir);
    snprintf(body, sizeof body, "if [ -e %s ]; then echo broken; exit 1; fi; exec " V2RAY " \"$@\"",
             flag);
    write_script(e, body);
    new_core(e);
    char *a = config("a");
    start_ok(e, a);
    FILE *fp = fopen(flag, "w");
    fclose(fp);
    kill(active_pid(e), SIGKILL);
    run_for(e, 900); /* restarts at +100, +300, +700 ms fail */
    assert_int_equal(e->ncrash, 1);
    assert_true(pn_mzcore_started(e->mz)); /* restarting */
    unlink(flag);
    uint64_t end = pn_now_ms() + 3000;
    while (!active_pid(e) && pn_now_ms() < end)
        run_for(e, 20);
    assert_true(active_pid(e) > 0);
    kill(active_pid(e), SIGKILL); /* a new crash is told again */
    run_for(e, 50);
    assert_int_equal(e->ncrash, 2);
    free(a);
}

static void test_crash_without_supervision(void **state)
{
    struct env *e = *state;
    e->o.supervise = false;
    new_core(e);
    char *a = config("a");
    start_ok(e, a);
    pid_t p1 = active_pid(e);
    kill(p1, SIGKILL);
    run_for(e, 600);
    assert_int_equal(active_pid(e), 0);
    assert_false(pn_mzcore_started(e->mz));
    assert_int_equal(e->ncrash, 0);
    int live, zombies;
    count_children(&live, &zombies);
    assert_int_equal(live + zombies, 0);
    /* /start works again */
    start_ok(e, a);
    free(a);
}

static void on_shut(void *arg)
{
    struct env *e = arg;
    e->shut = true;
}

static void test_shutdown(void **state)
{
    struct env *e = *state;
    new_core(e);
    char *a = config("a"), *b = config("b");
    start_ok(e, a);
    pid_t p1 = active_pid(e);
    struct res r = {0}, r2 = {0};
    assert_int_equal(pn_mzcore_restart(e->mz, b, strlen(b), "127.0.0.1", res_cb, &r, NULL), PN_OK);
    assert_int_equal(pn_mzcore_restart(e->mz, a, strlen(a), "1.2.3.4", res_cb, &r2, NULL), PN_OK);
    pn_mzcore_shutdown(e->mz, on_shut, e);
    assert_true(run_until_done(e, &e->shut, 7000));
    assert_true(r.done && r2.done);
    assert_true(r.rv < 0 && r2.rv < 0);
    assert_true(pid_gone(p1));
    assert_false(pn_mzcore_started(e->mz));
    char err[256];
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_ERR_STATE);
    free(a);
    free(b);
}

/* Free while operations are pending: no callbacks, nothing left. */
static void test_free_while_busy(void **state)
{
    struct env *e = *state;
    new_core(e);
    char *a = config("a"), *b = config("b");
    struct res r = {0}, r2 = {0}, r3 = {0};
    char err[256];
    assert_int_equal(
        pn_mzcore_start(e->mz, a, strlen(a), "127.0.0.1", res_cb, &r, NULL, err, sizeof err),
        PN_OK);
    assert_int_equal(pn_mzcore_restart(e->mz, b, strlen(b), "127.0.0.1", res_cb, &r2, NULL), PN_OK);
    assert_int_equal(pn_mzcore_stop(e->mz, res_cb, &r3, NULL), PN_OK);
    event_base_loop(e->base, EVLOOP_NONBLOCK); /* the start runs (its probe) */
    assert_true(e->mz->queue && e->mz->queue->running);
    pn_mzcore_free(e->mz);
    e->mz = NULL;
    run_for(e, 50);
    assert_false(r.done || r2.done || r3.done);
    int live, zombies;
    count_children(&live, &zombies);
    assert_int_equal(live + zombies, 0);
    free(a);
    free(b);
}

static void expect_tags(const char *config, const char *const *want, size_t n)
{
    struct tag_list tl;
    inbound_tags(config, strlen(config), &tl);
    if (tl.n != n)
        fail_msg("%s: %zu tags, want %zu", config, tl.n, n);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(tl.v[i], want[i]);
    tag_list_free(&tl);
}

static void test_inbound_tags(void **state)
{
    (void)state;
    expect_tags("{\"log\":{\"tag\":\"no\"},\"inbounds\":[{\"port\":1,\"tag\":\"a\"},"
                "{\"settings\":{\"clients\":[{\"tag\":\"nested\",\"x\":\"}]{[\\\"\"}]},"
                "\"tag\":\"b\"},{\"tag\":\"c\\\"d\\u00e9\"},7,\"s\",[1,{\"tag\":\"no\"}],"
                "{\"tag\":5},{}],\"routing\":{\"rules\":[]}}",
                (const char *[]){"a", "b", "c\"d\xc3\xa9"}, 3);
    expect_tags(" { \"inbounds\" : [ { \"tag\" : \"sp\" } ] } ", (const char *[]){"sp"}, 1);
    expect_tags("{\"outbounds\":[{\"tag\":\"o\"}]}", NULL, 0);
    expect_tags("{\"inbounds\":{\"tag\":\"x\"}}", NULL, 0);
    expect_tags("[]", NULL, 0);
    expect_tags("", NULL, 0);
    /* cut input: the tags found so far */
    expect_tags("{\"inbounds\":[{\"tag\":\"a\"},{\"tag\":\"b", (const char *[]){"a"}, 1);
    expect_tags("{\"inbounds\":[{\"tag\":\"a\"},{\"x\":[[[", (const char *[]){"a"}, 1);
}

/* The rewrite made by check_config is the one a restart compares with. */
static void test_check_config_reused(void **state)
{
    struct env *e = *state;
    new_core(e);
    char err[256] = "";
    assert_int_equal(pn_mzcore_check_config(e->mz, "{", 1, "1.2.3.4", err, sizeof err),
                     PN_ERR_INVAL);
    assert_true(!strncmp(err, "Failed to decode config: ", 25));
    assert_null(e->mz->checked);
    char *a = config("a");
    assert_int_equal(pn_mzcore_check_config(e->mz, a, strlen(a), "1.2.3.4", err, sizeof err),
                     PN_OK);
    struct spec *checked = e->mz->checked;
    assert_non_null(checked);
    assert_non_null(checked->ident);
    assert_non_null(strstr(checked->ident, "\"API_INBOUND\""));
    assert_null(strstr(checked->ident, PN_MZ_INTERNAL_API_TAG));
    struct res r = {0};
    struct pn_mzcore_op *op;
    assert_int_equal(pn_mzcore_restart(e->mz, a, strlen(a), "1.2.3.4", res_cb, &r, &op), PN_OK);
    assert_ptr_equal(op->spec, checked);
    assert_null(e->mz->checked);
    /* another peer: a new copy */
    assert_int_equal(pn_mzcore_check_config(e->mz, a, strlen(a), "1.2.3.4", err, sizeof err),
                     PN_OK);
    struct res r2 = {0};
    assert_int_equal(pn_mzcore_restart(e->mz, a, strlen(a), "5.6.7.8", res_cb, &r2, &op), PN_OK);
    assert_false(op->spec->ident_tried);
    wait_res(e, &r2, 5000);
    assert_int_equal(r2.rv, PN_OK);
    assert_true(r.done);
    free(a);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inbound_tags),
        cmocka_unit_test_setup_teardown(test_check_config_reused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_version_probe, setup, teardown),
        cmocka_unit_test_setup_teardown(test_start_restart_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_identical_restart_mode, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_when_stopped_starts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_config_detail, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_binary, setup, teardown),
        cmocka_unit_test_setup_teardown(test_queued_restarts_latest_wins, setup, teardown),
        cmocka_unit_test_setup_teardown(test_25_restarts_one_core, setup, teardown),
        cmocka_unit_test_setup_teardown(test_log_ring, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ring_pieces, setup, teardown),
        cmocka_unit_test_setup_teardown(test_detail_last_nonempty_line_and_status, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cap_answers_slow_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dies_before_takeover, setup, teardown),
        cmocka_unit_test_setup_teardown(test_identical_restart_joins_pending_start, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_fixed_wait, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_restarts_and_tells, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failing_crash_restarts_tell_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_without_supervision, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shutdown, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_while_busy, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
