"""Start-up and idle memory: exec -> the port accepts connections (repeated
runs, each a fresh process), and for each run the node's VmRSS, RssAnon and
VmHWM once it idles, next to the floor: a bare process that only creates an
OpenSSL 3 TLS server context with the same certificate and key (floor.c),
measured in the same run. Also: which shared libraries the idle node maps
(a push-mode node must not map libcurl)."""
import os
import subprocess
import time

from .. import util
from ..node import exec_to_accepting

GROUP = "start-up and idle memory"
SETTLE = 0.5  # seconds idle before reading memory


def floor_sample(ctx, cert, key):
    p = util.spawn([ctx.tools["floor"], cert, key], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"floor process failed: {p.stderr.read()}")
        time.sleep(SETTLE)
        return util.status(p.pid)
    finally:
        util.stop(p)


def run(ctx):
    rep, P = ctx.report, ctx.P
    # A first node generates the certificate (not timed) and gives the env to reuse.
    first = ctx.node("mem0")
    env = {k: v for k, v in first.env.items() if k not in ("SERVICE_PORT",)}
    cert, key = first.cert, first.keyfile
    first.stop()

    times, rss, anon, hwm, libs = [], [], [], [], set()
    fl_rss, fl_anon, fl_hwm = [], [], []
    for i in range(P["exec_runs"]):
        t, n = exec_to_accepting(ctx.binary, os.path.join(ctx.tmp, f"mem{i + 1}"), env)
        ctx.nodes.append(n)
        times.append(t)
        util.wait_for(lambda: "serving gRPC and REST" in n.log(), 5, "the ready line")
        time.sleep(SETTLE)
        s = util.status(n.pid)
        rss.append(s["VmRSS"])
        anon.append(s["RssAnon"])
        hwm.append(s["VmHWM"])
        libs.update(util.mapped_libs(n.pid))
        n.stop()
        ctx.nodes.remove(n)
        if i < 5 or i % 4 == 0:  # the floor, interleaved with the node's runs
            f = floor_sample(ctx, cert, key)
            fl_rss.append(f["VmRSS"])
            fl_anon.append(f["RssAnon"])
            fl_hwm.append(f["VmHWM"])

    rep.figure("exec_to_accepting", "exec -> port accepting connections", "ms",
               [util.ms(t) for t in times], group=GROUP,
               note="Python fork+exec included; poll: non-blocking connect every 0.2 ms")
    rep.target("exec_accept", "exec -> accepting <= 15 ms",
               rep.get("exec_to_accepting")["median"], 15.0, "<=", "ms", "exec_to_accepting")

    floor = {"title": "floor (SSL_CTX + cert)", "runs": [util.mib(x) for x in fl_rss]}
    f_rss = rep.figure("idle_rss", "idle node VmRSS", "MiB", [util.mib(x) for x in rss],
                       group=GROUP, reference=floor, digits=2)
    rep.figure("idle_rss_anon", "idle node RssAnon (private)", "MiB",
               [util.mib(x) for x in anon], group=GROUP, digits=2,
               reference={"title": "floor RssAnon", "runs": [util.mib(x) for x in fl_anon]})
    rep.figure("idle_hwm", "idle node VmHWM (peak RSS)", "MiB", [util.mib(x) for x in hwm],
               group=GROUP, digits=2,
               reference={"title": "floor VmHWM", "runs": [util.mib(x) for x in fl_hwm]})
    rep.target("idle_vs_floor", "idle VmRSS within 2 MB of the floor",
               f_rss.get("over_reference"), 2.0, "<=", "MiB", "idle_rss")
    rep.target("idle_anon", "idle RssAnon <= 2 MB", rep.get("idle_rss_anon")["median"], 2.0,
               "<=", "MiB", "idle_rss_anon")
    curl = sorted(x for x in libs if x.startswith("libcurl"))
    rep.figure("idle_libcurl_mapped", "libcurl mapped in the push-mode node (count)", "libs",
               [len(curl)], group=GROUP, digits=0,
               extra={"mapped_libraries": sorted(libs)})
    rep.target("no_libcurl", "push-mode node does not map libcurl", len(curl), 0, "==", "libs",
               "idle_libcurl_mapped", note=", ".join(curl) if curl else "not mapped")
