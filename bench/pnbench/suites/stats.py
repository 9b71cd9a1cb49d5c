"""GetStats UsersStat with 10k and 100k users (quick: 1k and 10k), next to a
direct QueryStats("user>>>") on the node's own core (same counters, same
moment, alternated run by run). Counters exist only after a user's first
connection (cores.md §5), so every user first gets one raw VLESS connection
(traffic.py). Both replies are timed as raw bytes (no client-side decoding).
Node CPU per GetStats is read from /proc."""
import time

from .. import clients, panel, traffic, util
from ..corealone import StartUnavailable, start_node_backend
from .sync import core_api_port

GROUP = "stats"


def run(ctx):
    rep, P = ctx.report, ctx.P
    for n in P["stats_users"]:
        vport = util.free_port()
        # A long bank interval would hide the ledger's merge cost; the default
        # (10 s) is what a node runs with, so it is kept.
        node = ctx.node(f"stats{n}")
        c = ctx.node_client(node)
        users = panel.Users.make(n)
        try:
            start_node_backend(ctx, c, panel.panel_config(vport), users)
        except StartUnavailable as e:
            rep.unavailable(f"getstats_{n}", f"GetStats UsersStat, {n:,} users", "ms", str(e),
                            group=GROUP)
            node.stop()
            continue
        pid = node.core_pid()
        api = core_api_port(node, pid, vport)
        cc = clients.CoreClient(api, ctx.cpb, ctx.xray)
        budget = 240 if not ctx.quick else 30
        done, secs = traffic.touch_users(vport, [u for _, u in users.pairs], timeout=budget)
        counters = len(clients_stats(cc))
        rate = done / secs if secs else None
        req = ctx.svc.StatRequest(type=ctx.svc.UsersStat, reset=False).SerializeToString()
        node_t, core_t, node_bytes, core_bytes = [], [], 0, 0
        cpu0 = util.cpu_seconds(node.pid)
        for _ in range(P["stats_runs"]):
            t0 = time.perf_counter()
            b = c.unary("GetStats", req, None, timeout=120)
            node_t.append(time.perf_counter() - t0)
            node_bytes = len(b)
            t0 = time.perf_counter()
            b = cc.query_stats("user>>>", reset=False)
            core_t.append(time.perf_counter() - t0)
            core_bytes = len(b)
        node_cpu = (util.cpu_seconds(node.pid) - cpu0) / P["stats_runs"]
        stats_n = len(ctx.svc.StatResponse.FromString(
            c.unary("GetStats", req, None, timeout=120)).stats)
        f = rep.figure(f"getstats_{n}", f"GetStats UsersStat, {n:,} users", "ms",
                       [util.ms(x) for x in node_t], group=GROUP, digits=1,
                       reference={"title": "core QueryStats direct",
                                  "runs": [util.ms(x) for x in core_t]},
                       extra={"counters_in_core": counters, "stats_in_reply": stats_n,
                              "reply_bytes": node_bytes, "core_reply_bytes": core_bytes,
                              "users_touched": done, "touch_rate_per_s": rate},
                       note=None if counters >= 2 * n else
                       f"only {counters:,} counters exist ({done:,} of {n:,} users touched in "
                       f"the time bound): measured with the counters that exist")
        rep.figure(f"getstats_{n}_cpu", f"  node CPU per GetStats, {n:,} users (mean)",
                   "cpu ms", [util.ms(node_cpu)], group=GROUP, digits=1,
                   note="/proc ticks are 10 ms: mean over the runs (stats bank included)")
        cc.close()
        c.close()
        node.stop()
    big = max(P["stats_users"])
    f = rep.get(f"getstats_{big}")
    rep.target("getstats_ratio", f"GetStats with {big:,} users <= 1.3x the core's QueryStats"
               + ("" if big >= 100000 else " (quick: target is for 100k)"),
               f.get("ratio_to_reference") if f else None, 1.3, "<=", "x", f"getstats_{big}")


def clients_stats(cc):
    """The user counters the core has now."""
    return [s for s in cc.query_stats("user>>>", raw=False).stat]
