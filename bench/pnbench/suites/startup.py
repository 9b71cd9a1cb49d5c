"""Start -> API-ready latency with 0, 10k and 100k vless users (quick: 0, 1k,
10k), measured by the client as the duration of the Start call (the node
answers when the core's API answers), next to the core alone started on the
same generated config (exec -> GetSysStats answers). Also the node's VmRSS
and RssAnon with those users loaded (read after each Start)."""
import time

import grpc

from .. import panel, util
from ..corealone import CoreAlone, StartUnavailable, capture_config

GROUP = "Start (core launch) and users in memory"
SETTLE = 0.5


def stop_core(ctx, node, c):
    """Stop on the node (when a core runs), then wait until no core process is left."""
    if node.core_pids():
        try:
            c.unary("Stop", ctx.svc.Empty(), ctx.svc.Empty, timeout=30)
        except grpc.RpcError:
            pass
    util.wait_for(lambda: not node.core_pids(), 15, "the node's core to exit", interval=0.01)


def run(ctx):
    rep, P = ctx.report, ctx.P
    counts = P["start_users"]
    vport = util.free_port()
    cfg = panel.panel_config(vport)
    try:
        for n in counts:
            capture_config(ctx, n, vport)
    except StartUnavailable as e:
        for n in counts:
            rep.unavailable(f"start_{n}", f"Start -> API ready, {n:,} vless users", "ms", str(e),
                            group=GROUP)
        rep.target("start_overhead", "Start overhead over the core's own readiness <= 20 ms",
                   None, 20.0, "<=", "ms", note=str(e))
        return

    node = ctx.node("startup")
    c = ctx.node_client(node)
    overheads = {}
    for n in counts:
        users = panel.Users.make(n)
        runs = P["start_runs"] if n < 100000 else P["start_runs_big"]
        req = panel.backend(ctx.svc, cfg, users)  # serialized once: client cost not timed
        lat, rss, anon = [], [], []
        for _ in range(runs):
            stop_core(ctx, node, c)
            t0 = time.perf_counter()
            r = c.unary("Start", req, ctx.svc.BaseInfoResponse, timeout=300)
            lat.append(time.perf_counter() - t0)
            if not r.started:
                raise RuntimeError(f"Start with {n} users: started=false")
            time.sleep(SETTLE)
            s = util.status(node.pid)
            rss.append(s["VmRSS"])
            anon.append(s["RssAnon"])
        core = []
        for _ in range(runs):
            ca = CoreAlone(ctx, ctx.configs[n])
            core.append(ca.ready_s)
            ca.stop()
        f = rep.figure(f"start_{n}", f"Start -> API ready, {n:,} vless users", "ms",
                       [util.ms(x) for x in lat], group=GROUP, digits=1,
                       reference={"title": "core alone exec->ready",
                                  "runs": [util.ms(x) for x in core]},
                       extra={"request_bytes": len(req)})
        overheads[n] = f.get("over_reference")
        if n:
            rep.figure(f"rss_{n}_users", f"node VmRSS with {n:,} users loaded", "MiB",
                       [util.mib(x) for x in rss], group=GROUP)
            rep.figure(f"anon_{n}_users", f"node RssAnon with {n:,} users loaded", "MiB",
                       [util.mib(x) for x in anon], group=GROUP)
    stop_core(ctx, node, c)
    c.close()
    node.stop()

    known = {k: v for k, v in overheads.items() if v is not None}
    which = max(known, key=known.get) if known else None
    rep.target("start_overhead", "Start overhead over the core's own readiness <= 20 ms "
               f"(worst of {', '.join(f'{k:,}' for k in counts)} users: {which:,})",
               known.get(which), 20.0, "<=", "ms", f"start_{which}")
    big = 100000
    if rep.get(f"anon_{big}_users"):
        rep.target("anon_100k", "RssAnon with 100k users <= 30 MB",
                   rep.get(f"anon_{big}_users")["median"], 30.0, "<=", "MiB", f"anon_{big}_users")
    else:
        top = max(counts)
        rep.target("anon_100k", "RssAnon with 100k users <= 30 MB", None, 30.0, "<=", "MiB",
                   note=f"quick mode: largest measured is {top:,} users "
                        f"({rep.get(f'anon_{top}_users')['median']:.1f} MiB)")
