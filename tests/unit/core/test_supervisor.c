/* The core supervisor against the real /usr/bin/v2ray (start, bad config,
 * handover, crash restarts, stop, free) and small /bin/sh scripts standing
 * in for cores that print a failure line, never open their API, or echo
 * what they were given. The .c is included to reach count_conns. */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <event2/event.h>

#include "../../../src/core/supervisor.c"

#define V2RAY "/usr/bin/v2ray"
#define ASSETS "/tmp/pn-sup-assets"

struct ctx {
    struct event_base *base;
    struct pn_supervisor *sup;
    struct pn_supervisor_opts opts;
    uint16_t vless_port;
    const char *config; /* a fixed config instead of the v2ray one */
    size_t big;         /* > 0: a config of this many bytes */
    bool build_fails;
    int builds;
    int data_freed;
    /* the last start */
    int starts_done, start_rv;
    char start_err[8192];
    struct pn_core_gen *start_gen;
    /* a second start's result, for superseding */
    int other_done, other_rv;
    char other_err[256];
    /* callbacks */
    int retired;
    uint64_t retired_id;
    int before_stop;
    uint64_t before_stop_ids[8];
    bool async_done; /* before_stop finishes through a GetSysStats */
    int crashes;
    unsigned delays[16];
    char crash_detail[1024];
    bool restarting_in_crash;
    int restarted;
    struct pn_core_gen *restarted_gen;
    int stopped;
    pid_t line_pid; /* the pid that printed the last line */
    char lines[16][256];
    size_t line_lens[16];
    int nlines;
    int removed_rv; /* on_retire's RemoveInbound result, 1 = pending */
};

static struct ctx *C;

static void free_data(void *p)
{
    C->data_freed++;
    free(p);
}

static char *build_config(struct pn_core_gen *gen, uint16_t api_port, size_t *len, char *err,
                          size_t errlen, void *arg)
{
    struct ctx *c = arg;
    c->builds++;
    if (c->build_fails) {
        snprintf(err, errlen, "no inbounds to run");
        return NULL;
    }
    pn_core_gen_set_data(gen, strdup("owner data"), free_data);
    char *s;
    if (c->big) {
        s = malloc(c->big + 1);
        memset(s, 'x', c->big);
        s[c->big] = '\0';
    } else if (c->config) {
        s = strdup(c->config);
    } else {
        s = pn_asprintf(
            "{\"log\":{\"loglevel\":\"warning\"},"
            "\"api\":{\"tag\":\"api\",\"services\":[\"HandlerService\",\"StatsService\","
            "\"LoggerService\"]},\"stats\":{},"
            "\"policy\":{\"levels\":{\"0\":{\"statsUserUplink\":true,\"statsUserDownlink\":true}},"
            "\"system\":{\"statsInboundUplink\":true,\"statsInboundDownlink\":true}},"
            "\"inbounds\":[{\"tag\":\"api\",\"listen\":\"127.0.0.1\",\"port\":%u,"
            "\"protocol\":\"dokodemo-door\",\"settings\":{\"address\":\"127.0.0.1\"}},"
            "{\"tag\":\"vless-in\",\"listen\":\"127.0.0.1\",\"port\":%u,\"protocol\":\"vless\","
            "\"settings\":{\"decryption\":\"none\",\"clients\":[{\"id\":"
            "\"b831381d-6324-4d53-ad4f-8cda48b30811\",\"email\":\"a@x\"}]}}],"
            "\"outbounds\":[{\"tag\":\"direct\",\"protocol\":\"freedom\"}],"
            "\"routing\":{\"rules\":[{\"type\":\"field\",\"inboundTag\":[\"api\"],"
            "\"outboundTag\":\"api\"}]}}",
            api_port, c->vless_port);
    }
    *len = strlen(s);
    return s;
}

static void on_line(const struct pn_core_gen *gen, const char *line, size_t len, void *arg)
{
    struct ctx *c = arg;
    c->line_pid = pn_core_gen_pid(gen);
    if (c->nlines < 16) {
        snprintf(c->lines[c->nlines], sizeof c->lines[0], "%.*s", (int)len, line);
        c->line_lens[c->nlines++] = len;
    }
}

static void on_removed(const struct pn_coreapi_result *r, void *arg)
{
    ((struct ctx *)arg)->removed_rv = r->rv;
}

static void on_retire(struct pn_core_gen *gen, void *arg)
{
    struct ctx *c = arg;
    c->retired++;
    c->retired_id = pn_core_gen_id(gen);
    c->removed_rv = 1;
    assert_int_equal(
        pn_coreapi_remove_inbound(pn_core_gen_api(gen), "vless-in", 2000, on_removed, c), PN_OK);
}

struct pending_done {
    struct pn_core_gen *gen;
    void (*done)(struct pn_core_gen *);
};

static void done_after_stats(const struct pn_coreapi_result *r, const struct pn_core_sys_stats *s,
                             void *arg)
{
    struct pending_done *pd = arg;
    pd->done(pd->gen); /* from inside the generation's own API callback */
    free(pd);
}

static void before_stop(struct pn_core_gen *gen, void (*done)(struct pn_core_gen *), void *arg)
{
    struct ctx *c = arg;
    if (c->before_stop < 8)
        c->before_stop_ids[c->before_stop] = pn_core_gen_id(gen);
    c->before_stop++;
    if (c->async_done) {
        struct pending_done *pd = malloc(sizeof *pd);
        pd->gen = gen;
        pd->done = done;
        assert_int_equal(pn_coreapi_sys_stats(pn_core_gen_api(gen), 1000, done_after_stats, pd),
                         PN_OK);
    } else {
        done(gen);
    }
}

static void on_crash(const char *detail, unsigned delay_ms, void *arg)
{
    struct ctx *c = arg;
    if (c->crashes < 16)
        c->delays[c->crashes] = delay_ms;
    c->crashes++;
    snprintf(c->crash_detail, sizeof c->crash_detail, "%s", detail);
    c->restarting_in_crash = pn_supervisor_restarting(c->sup) && !pn_supervisor_active(c->sup);
}

static void on_restarted(struct pn_core_gen *gen, void *arg)
{
    struct ctx *c = arg;
    c->restarted++;
    c->restarted_gen = gen;
}

static void on_start(int rv, const char *err, struct pn_core_gen *gen, void *arg)
{
    struct ctx *c = arg;
    c->starts_done++;
    c->start_rv = rv;
    snprintf(c->start_err, sizeof c->start_err, "%s", err ? err : "");
    c->start_gen = gen;
    if (rv == PN_OK)
        assert_ptr_equal(pn_supervisor_active(c->sup), gen);
    else
        assert_null(gen);
}

static void on_other_start(int rv, const char *err, struct pn_core_gen *gen, void *arg)
{
    struct ctx *c = arg;
    c->other_done++;
    c->other_rv = rv;
    snprintf(c->other_err, sizeof c->other_err, "%s", err ? err : "");
}

static void on_stopped(void *arg)
{
    ((struct ctx *)arg)->stopped++;
}

static uint16_t free_port(void)
{
    char err[100];
    uint16_t port = 0;
    assert_int_equal(pick_port(&port, err, sizeof err), PN_OK);
    return port;
}

static void new_sup(struct ctx *c, const char *exe, unsigned start_timeout_ms, unsigned drain_ms)
{
    c->opts = (struct pn_supervisor_opts){
        .base = c->base,
        .exe = exe,
        .assets = ASSETS,
        .kind = PN_CORE_V2RAY,
        .start_timeout_ms = start_timeout_ms,
        .drain_ms = drain_ms,
        .startup_tail = 20,
        .build_config = build_config,
        .on_line = on_line,
        .on_retire = on_retire,
        .before_stop = before_stop,
        .on_crash = on_crash,
        .on_restarted = on_restarted,
        .arg = c,
    };
    c->sup = pn_supervisor_new(&c->opts);
}

static int setup(void **state)
{
    struct ctx *c = calloc(1, sizeof *c);
    c->base = event_base_new();
    c->vless_port = free_port();
    C = c;
    *state = c;
    alarm(20); /* a hung test fails instead of blocking the suite */
    return 0;
}

static int teardown(void **state)
{
    struct ctx *c = *state;
    pn_supervisor_free(c->sup);
    event_base_free(c->base);
    free(c);
    alarm(0);
    return 0;
}

static bool ge(const int *counter, int want)
{
    return *counter >= want;
}

/* Runs the loop until *counter reaches want; fails after ms. */
static void run_until(struct ctx *c, const int *counter, int want, unsigned ms)
{
    uint64_t end = pn_now_ms() + ms;
    while (!ge(counter, want)) {
        if (pn_now_ms() > end)
            fail_msg("timed out waiting (%d of %d)", *counter, want);
        event_base_loop(c->base, EVLOOP_ONCE);
    }
}

/* Runs the loop for ms. */
static void run_for(struct ctx *c, unsigned ms)
{
    struct timeval tv = ms_tv(ms);
    event_base_loopexit(c->base, &tv);
    event_base_dispatch(c->base);
}

/* True when pid is neither running nor a zombie of ours. */
static bool gone(pid_t pid)
{
    return pid > 0 && kill(pid, 0) < 0 && errno == ESRCH && waitpid(pid, NULL, WNOHANG) < 0 &&
           errno == ECHILD;
}

static char *script(const char *body)
{
    char *path = strdup("/tmp/pn-sup-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    dprintf(fd, "#!/bin/sh\n%s\n", body);
    close(fd);
    chmod(path, 0700);
    return path;
}

static void start(struct ctx *c)
{
    assert_int_equal(pn_supervisor_start(c->sup, on_start, c), PN_OK);
}

static void sys_ok(const struct pn_coreapi_result *r, const struct pn_core_sys_stats *s, void *arg)
{
    int *res = arg;
    *res = r->rv == PN_OK ? 1 : -1;
}

/* Whether a generation's API answers GetSysStats. */
static bool api_answers(struct ctx *c, struct pn_core_gen *gen)
{
    int res = 0;
    assert_int_equal(pn_coreapi_sys_stats(pn_core_gen_api(gen), 1000, sys_ok, &res), PN_OK);
    uint64_t end = pn_now_ms() + 2000;
    while (res == 0 && pn_now_ms() < end)
        event_base_loop(c->base, EVLOOP_ONCE);
    return res == 1;
}

static void require_v2ray(void)
{
    if (access(V2RAY, X_OK) != 0)
        fail_msg(V2RAY " missing: apt-get install v2ray");
}

static void test_start_ready(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 300);
    uint64_t t0 = pn_now_ms();
    start(c);
    assert_int_equal(c->starts_done, 0); /* never from inside start */
    run_until(c, &c->starts_done, 1, 3000);
    assert_int_equal(c->start_rv, PN_OK);
    assert_true(pn_now_ms() - t0 < 2000);

    struct pn_core_gen *g = pn_supervisor_active(c->sup);
    assert_non_null(g);
    assert_ptr_equal(g, c->start_gen);
    assert_int_equal(pn_core_gen_id(g), 1);
    assert_true(pn_core_gen_started_ms(g) >= t0);
    assert_string_equal(pn_core_gen_data(g), "owner data");
    assert_false(pn_supervisor_restarting(c->sup));
    struct pn_core_gen *all[4];
    assert_int_equal(pn_supervisor_gens(c->sup, all, 4), 1);
    assert_ptr_equal(all[0], g);

    pid_t pid = pn_core_gen_pid(g);
    assert_int_equal(getsid(pid), pid); /* its own session */
    char path[64], env[65536];
    snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    size_t n = fread(env, 1, sizeof env - 1, fp);
    fclose(fp);
    env[n] = '\0';
    bool xray = false, v2ray = false;
    for (char *p = env; p < env + n; p += strlen(p) + 1) {
        xray |= strcmp(p, "XRAY_LOCATION_ASSET=" ASSETS) == 0;
        v2ray |= strcmp(p, "V2RAY_LOCATION_ASSET=" ASSETS) == 0;
    }
    assert_true(xray && v2ray);
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    fp = fopen(path, "r");
    n = fread(env, 1, sizeof env - 1, fp);
    fclose(fp);
    assert_int_equal(n, sizeof V2RAY "\0-config\0stdin:");
    assert_memory_equal(env, V2RAY "\0-config\0stdin:", n);
    assert_true(api_answers(c, g));

    pn_supervisor_stop(c->sup, on_stopped, c);
    assert_null(pn_supervisor_active(c->sup));
    run_until(c, &c->stopped, 1, 3000);
    assert_int_equal(c->before_stop, 1);
    assert_int_equal(c->before_stop_ids[0], 1);
    assert_int_equal(c->data_freed, 1);
    assert_true(gone(pid));
    assert_int_equal(pn_supervisor_gens(c->sup, all, 4), 0);
    run_for(c, 100);
    assert_int_equal(c->stopped, 1);
    assert_int_equal(c->crashes, 0);
}

static void test_bad_config(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 300);
    /* Valid JSON that v2ray refuses: `main: failed to read config files`, exit 23. */
    c->config = "{\"inbounds\":[{\"protocol\":\"nonsense\",\"port\":1}]}";
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    assert_int_equal(c->start_rv, PN_ERR_PROTO);
    const char *head = "xray process stopped before API became ready; recent xray logs:\n";
    assert_memory_equal(c->start_err, head, strlen(head));
    assert_non_null(strstr(c->start_err, "\nmain: failed to read config files"));
    assert_non_null(strstr(c->start_err, "unknown config id: nonsense"));
    assert_true(gone(c->line_pid));
    assert_null(pn_supervisor_active(c->sup));
    assert_int_equal(c->data_freed, 1);

    /* Broken JSON: v2ray panics (a marker line) and exits at once; the exit wins. */
    c->config = "{bad";
    start(c);
    run_until(c, &c->starts_done, 2, 3000);
    assert_int_equal(c->start_rv, PN_ERR_PROTO);
    assert_memory_equal(c->start_err, head, strlen(head));
    assert_non_null(strstr(c->start_err, "\npanic: "));
    assert_true(gone(c->line_pid));
    assert_int_equal(c->crashes, 0);
    assert_int_equal(c->before_stop, 0);
}

static void test_marker_line(void **state)
{
    struct ctx *c = *state;
    char *s = script("echo '127.0.0.1:1 rejected  proxy/vless/encoding: invalid request user id'\n"
                     "echo 'Failed to listen on 1.2.3.4:443'\n"
                     "exec sleep 30");
    new_sup(c, s, 5000, 300);
    uint64_t t0 = pn_now_ms();
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    unlink(s);
    free(s);
    assert_int_equal(c->start_rv, PN_ERR_PROTO);
    assert_string_equal(c->start_err, "failed to start xray: Failed to listen on 1.2.3.4:443");
    assert_true(pn_now_ms() - t0 < 1000);
    assert_true(gone(c->line_pid));
    assert_null(pn_supervisor_active(c->sup));
}

static void test_timeout(void **state)
{
    struct ctx *c = *state;
    char *s = script("echo '127.0.0.1:1 rejected  proxy/vless/encoding: invalid request user id'\n"
                     "echo 'app/proxyman/inbound: connection ends > failed to open connection'\n"
                     "exec sleep 30");
    new_sup(c, s, 600, 300);
    uint64_t t0 = pn_now_ms();
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    unlink(s);
    free(s);
    assert_int_equal(c->start_rv, PN_ERR_TIMEOUT);
    assert_string_equal(c->start_err, "xray did not become ready within 0.6 s");
    assert_true(pn_now_ms() - t0 >= 550); /* libevent uses a coarse clock */
    assert_int_equal(c->nlines, 2);
    assert_true(gone(c->line_pid));
}

/* What the child gets: arguments, only the asset variables as its
 * environment (nothing of the node's, such as API_KEY), the whole config on
 * stdin (3 MB, written through the loop), output lines split at 64 KiB with
 * nothing lost, \r stripped, a last line without newline. */
static void test_child_view(void **state)
{
    struct ctx *c = *state;
    char *s = script("echo \"args $*\"\n"
                     "echo \"env $XRAY_LOCATION_ASSET $V2RAY_LOCATION_ASSET ${API_KEY:-none}\"\n"
                     "echo \"stdin $(wc -c)\"\n"
                     "head -c 70000 /dev/zero | tr '\\0' a; echo\n"
                     "printf 'crlf\\r\\n'\n"
                     "printf 'last'\n"
                     "exec sleep 30 <&-");
    c->big = 3 * 1000 * 1000;
    setenv("XRAY_LOCATION_ASSET", "/elsewhere", 1);
    setenv("API_KEY", "3b8f9f3a-2c55-4d4e-9c9e-3f2b1a0c7d11", 1);
    new_sup(c, s, 1500, 300);
    start(c);
    run_until(c, &c->starts_done, 1, 4000);
    unsetenv("XRAY_LOCATION_ASSET");
    unsetenv("API_KEY");
    unlink(s);
    free(s);
    assert_int_equal(c->start_rv, PN_ERR_TIMEOUT);
    assert_int_equal(c->nlines, 6);
    assert_string_equal(c->lines[0], "args -config stdin:");
    assert_string_equal(c->lines[1], "env " ASSETS " " ASSETS " none");
    assert_string_equal(c->lines[2], "stdin 3000000");
    assert_int_equal(c->line_lens[3], LINE_MAX_LEN);
    assert_int_equal(c->line_lens[4], 70000 - LINE_MAX_LEN);
    assert_string_equal(c->lines[5], "crlf");
    assert_true(gone(c->line_pid));
}

static void test_spawn_errors(void **state)
{
    struct ctx *c = *state;
    new_sup(c, "/nonexistent/xray", 1000, 300);
    start(c);
    run_until(c, &c->starts_done, 1, 1000);
    assert_int_equal(c->start_rv, PN_ERR_IO);
    assert_non_null(strstr(c->start_err, "No such file or directory"));
    c->build_fails = true;
    start(c);
    run_until(c, &c->starts_done, 2, 1000);
    assert_int_equal(c->start_rv, PN_ERR_INVAL);
    assert_string_equal(c->start_err, "no inbounds to run");
    assert_int_equal(c->data_freed, 1);
}

static void test_handover(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 300);
    c->async_done = true;
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    assert_int_equal(c->start_rv, PN_OK);
    struct pn_core_gen *g1 = c->start_gen;
    pid_t pid1 = pn_core_gen_pid(g1);

    start(c);
    run_until(c, &c->starts_done, 2, 3000);
    assert_int_equal(c->start_rv, PN_OK);
    struct pn_core_gen *g2 = c->start_gen;
    assert_ptr_equal(pn_supervisor_active(c->sup), g2);
    assert_int_equal(pn_core_gen_id(g2), 2);
    assert_int_not_equal(pn_core_gen_api_port(g2), pn_core_gen_api_port(g1));
    assert_int_equal(c->retired, 1);
    assert_int_equal(c->retired_id, 1);
    struct pn_core_gen *all[4];
    assert_int_equal(pn_supervisor_gens(c->sup, all, 4), 2);

    /* Drain (300 ms), before_stop (async), SIGTERM, reap. */
    run_until(c, &c->data_freed, 1, 3000);
    assert_int_equal(c->removed_rv, PN_OK);
    assert_int_equal(c->before_stop, 1);
    assert_int_equal(c->before_stop_ids[0], 1);
    assert_true(gone(pid1));
    assert_int_equal(pn_supervisor_gens(c->sup, all, 4), 1);
    assert_true(api_answers(c, g2));
    assert_int_equal(c->crashes, 0);
}

/* drain_ms is long, but the old core holds no client connection: the
 * connection check stops it within about a second. */
static void test_drain_idle(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 10000);
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    pid_t pid1 = pn_core_gen_pid(c->start_gen);
    start(c);
    run_until(c, &c->starts_done, 2, 3000);
    assert_int_equal(c->start_rv, PN_OK);
    uint64_t t0 = pn_now_ms();
    run_until(c, &c->data_freed, 1, 3000);
    assert_true(pn_now_ms() - t0 < 2500);
    assert_int_equal(c->before_stop, 1);
    assert_true(gone(pid1));
}

static void test_failed_second_start(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 300);
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    struct pn_core_gen *g1 = c->start_gen;

    c->config = "{\"inbounds\":[{\"protocol\":\"nonsense\",\"port\":1}]}";
    start(c);
    run_until(c, &c->starts_done, 2, 3000);
    assert_int_equal(c->start_rv, PN_ERR_PROTO);
    assert_true(gone(c->line_pid));

    c->build_fails = true;
    start(c);
    run_until(c, &c->starts_done, 3, 3000);
    assert_int_equal(c->start_rv, PN_ERR_INVAL);

    assert_ptr_equal(pn_supervisor_active(c->sup), g1);
    assert_int_equal(c->retired, 0);
    assert_int_equal(c->before_stop, 0);
    struct pn_core_gen *all[4];
    assert_int_equal(pn_supervisor_gens(c->sup, all, 4), 1);
    assert_true(api_answers(c, g1));
    assert_int_equal(kill(pn_core_gen_pid(g1), 0), 0);
}

static void test_superseded(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 300);
    assert_int_equal(pn_supervisor_start(c->sup, on_other_start, c), PN_OK);
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    assert_int_equal(c->other_done, 1);
    assert_int_equal(c->other_rv, PN_ERR_STATE);
    assert_string_equal(c->other_err, "start superseded");
    assert_int_equal(c->start_rv, PN_OK);
    assert_int_equal(pn_core_gen_id(c->start_gen), 2);
    assert_int_equal(c->data_freed, 1);
    assert_int_equal(c->retired, 0);
}

static void test_crash_restart(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 300);
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    pid_t pid = pn_core_gen_pid(c->start_gen);
    int builds = c->builds;

    for (int i = 0; i < 5; i++) {
        assert_int_equal(kill(pid, SIGKILL), 0);
        run_until(c, &c->crashes, i + 1, 3000);
        assert_true(c->restarting_in_crash);
        assert_non_null(strstr(c->crash_detail, "killed by signal 9"));
        run_until(c, &c->restarted, i + 1, 5000);
        assert_false(pn_supervisor_restarting(c->sup));
        struct pn_core_gen *g = pn_supervisor_active(c->sup);
        assert_ptr_equal(g, c->restarted_gen);
        assert_int_equal(c->builds, builds + i + 1);
        assert_true(gone(pid));
        assert_int_not_equal(pn_core_gen_pid(g), pid);
        pid = pn_core_gen_pid(g);
    }
    unsigned want[] = {100, 200, 400, 800, 1600};
    for (int i = 0; i < 5; i++)
        assert_int_equal(c->delays[i], want[i]);
    assert_int_equal(c->before_stop, 0);
    assert_int_equal(c->retired, 0);
    assert_true(api_answers(c, pn_supervisor_active(c->sup)));
}

/* A crash restart that fails (the config went bad) retries with a longer
 * delay; a stop ends the retries. */
static void test_restart_fails(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 300);
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    c->build_fails = true;
    kill(pn_core_gen_pid(c->start_gen), SIGKILL);
    run_until(c, &c->crashes, 3, 3000);
    assert_int_equal(c->delays[0], 100);
    assert_int_equal(c->delays[1], 200);
    assert_int_equal(c->delays[2], 400);
    assert_non_null(strstr(c->crash_detail, "restart failed: no inbounds to run"));
    assert_true(pn_supervisor_restarting(c->sup));
    pn_supervisor_stop(c->sup, on_stopped, c);
    run_until(c, &c->stopped, 1, 1000);
    assert_false(pn_supervisor_restarting(c->sup));
    run_for(c, 600);
    assert_int_equal(c->crashes, 3);
}

static void test_stop_all(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 10000);
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    pid_t pid1 = pn_core_gen_pid(c->start_gen);
    start(c);
    run_until(c, &c->starts_done, 2, 3000);
    pid_t pid2 = pn_core_gen_pid(c->start_gen);
    assert_int_equal(c->retired, 1);
    /* A third start is pending when the stop comes. */
    start(c);
    pn_supervisor_stop(c->sup, on_stopped, c);
    run_until(c, &c->stopped, 1, 3000);
    assert_int_equal(c->starts_done, 3);
    assert_int_equal(c->start_rv, PN_ERR_STATE);
    assert_string_equal(c->start_err, "core stopped");
    assert_int_equal(c->before_stop, 2);
    assert_true(gone(pid1));
    assert_true(gone(pid2));
    assert_int_equal(c->data_freed, 3);
    assert_null(pn_supervisor_active(c->sup));
    run_for(c, 100);
    assert_int_equal(c->stopped, 1);

    /* Stopping with nothing running still answers, once. */
    pn_supervisor_stop(c->sup, on_stopped, c);
    run_until(c, &c->stopped, 2, 1000);
    /* And it can start again. */
    start(c);
    run_until(c, &c->starts_done, 4, 3000);
    assert_int_equal(c->start_rv, PN_OK);
}

static void test_free_running(void **state)
{
    struct ctx *c = *state;
    require_v2ray();
    new_sup(c, V2RAY, 5000, 300);
    start(c);
    run_until(c, &c->starts_done, 1, 3000);
    pid_t pid = pn_core_gen_pid(c->start_gen);
    start(c); /* pending too */
    pn_supervisor_free(c->sup);
    c->sup = NULL;
    assert_true(gone(pid));
    assert_int_equal(c->before_stop, 0);
    assert_int_equal(c->starts_done, 1);
    assert_int_equal(c->data_freed, 2);
    run_for(c, 100);
}

static void test_count_conns(void **state)
{
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof sa;
    assert_int_equal(bind(l, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(l, 4), 0);
    assert_int_equal(getsockname(l, (struct sockaddr *)&sa, &sl), 0);
    uint16_t port = ntohs(sa.sin_port);
    int base = count_conns(getpid(), port);
    assert_true(base >= 0);
    int cl = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_int_equal(connect(cl, (struct sockaddr *)&sa, sizeof sa), 0);
    int a = accept(l, NULL, NULL);
    assert_true(a >= 0);
    assert_int_equal(count_conns(getpid(), 0), base + 2);
    assert_int_equal(count_conns(getpid(), port), base);
    close(a);
    close(cl);
    close(l);
    assert_int_equal(count_conns(999999999, 0), -1);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_start_ready, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_config, setup, teardown),
        cmocka_unit_test_setup_teardown(test_marker_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_child_view, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spawn_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_handover, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drain_idle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_second_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_superseded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_fails, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_all, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_running, setup, teardown),
        cmocka_unit_test(test_count_conns),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
