"""User sync on a running core: SyncUsers replacing 10k users with 10% and
100% of them changed (time, operations per second where one add or one
remove is one operation, and whether the core was restarted: its pid must
not change), the SyncUser stream's throughput (users/s), next to the core's
own AddUser/RemoveUser cost measured directly on a core alone with the same
generated config (sequential calls on one channel, and 64 calls in flight)."""
import time

from .. import clients, panel, traffic, util
from ..corealone import CoreAlone, StartUnavailable, capture_config, start_node_backend

GROUP = "user sync (no core restart)"
WINDOW = 64  # calls in flight for the core's pipelined reference


def core_ops(core_client, ops, window=WINDOW, timeout=300):
    """Runs serialized AlterInbound requests with `window` in flight; returns
    (seconds, failures)."""
    path = core_client.d.handler("AlterInbound")
    t0 = time.perf_counter()
    deadline = t0 + timeout
    pending, fails, i = [], 0, 0
    while i < len(ops) or pending:
        while i < len(ops) and len(pending) < window:
            pending.append(core_client.future(path, ops[i]))
            i += 1
        f = pending.pop(0)
        try:
            f.result(timeout=max(1, deadline - time.perf_counter()))
        except Exception:
            fails += 1
    return time.perf_counter() - t0, fails


def core_seq(core_client, ops, timeout=300):
    path = core_client.d.handler("AlterInbound")
    t0 = time.perf_counter()
    fails = 0
    for op in ops:
        try:
            core_client.call(path, op, timeout=30)
        except Exception:
            fails += 1
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError("core AddUser run exceeded its time bound")
    return time.perf_counter() - t0, fails


def diff_ops(cc, old, new):
    """The AlterInbound requests that turn user set old into new (removes, then adds)."""
    o, n = dict(old.pairs), dict(new.pairs)
    rm = [cc.remove_user_request(panel.VLESS_TAG, e) for e in o if e not in n or n[e] != o[e]]
    add = [cc.add_user_request(panel.VLESS_TAG, e, u) for e, u in new.pairs
           if e not in o or o[e] != u]
    return rm + add


def core_api_port(node, pid, vless_port):
    """The core's API port: the one it listens on besides the user inbound."""
    ports = util.wait_for(lambda: util.listening_ports(pid) - {vless_port}, 5,
                          "the core's API port")
    if len(ports) != 1:
        raise RuntimeError(f"cannot tell the core's API port among {sorted(ports)}")
    return ports.pop()


def verify_applied(ctx, api_port, vless_port, old, new, k=3):
    """A sync really changed the core: k added users get counters from one raw
    VLESS connection each; k removed users do not. Returns True/False."""
    o, n = dict(old.pairs), dict(new.pairs)
    added = [(e, u) for e, u in new.pairs if e not in o][:k]
    # the last removed users: never touched by an earlier check (counters
    # survive removal, cores.md §5, so a touched user would look present)
    removed = [(e, u) for e, u in old.pairs if e not in n][-k:]
    if not added and not removed:
        return True
    traffic.touch_users(vless_port, [u for _, u in added + removed], timeout=20)
    cc = clients.CoreClient(api_port, ctx.cpb, ctx.xray)
    try:
        names = {s.name for s in cc.query_stats("user>>>", raw=False).stat}
    finally:
        cc.close()
    ok_add = all(f"user>>>{e}>>>traffic>>>uplink" in names for e, _ in added)
    ok_rm = not any(f"user>>>{e}>>>traffic>>>uplink" in names for e, _ in removed)
    return ok_add and ok_rm


def run(ctx):
    rep, P = ctx.report, ctx.P
    S, K = P["sync_users"], P["stream_users"]
    vport = util.free_port()
    cfg = panel.panel_config(vport)
    node = ctx.node("sync")
    c = ctx.node_client(node)
    base = panel.Users.make(S)
    try:
        start_node_backend(ctx, c, cfg, base)
    except StartUnavailable as e:
        for fid, t in (("sync_10pct", "SyncUsers replacing 10k users, 10% changed"),
                       ("sync_100pct", "SyncUsers replacing 10k users, 100% changed"),
                       ("syncuser_stream", "SyncUser stream throughput")):
            rep.unavailable(fid, t, "s", str(e), group=GROUP)
        rep.target("sync_10k", "SyncUsers replacing 10k users <= 2 s, no core restart", None,
                   2.0, "<=", "s", note=str(e))
        return
    core0 = node.core_pid()
    if core0 is None:
        raise RuntimeError(f"expected one core process under the node, found {node.core_pids()}")
    api_port = core_api_port(node, core0, vport)
    restarts = 0
    checks = []
    results = {}
    cur = base
    seed = 100
    for frac, fid in ((0.10, "sync_10pct"), (1.0, "sync_100pct")):
        times, opsps, ref = [], [], []
        for _ in range(P["sync_runs"]):
            seed += 1
            new = cur.changed(frac, seed) if frac < 1 else panel.Users.make(S, seed)
            nops = 2 * int(S * frac)
            req = ctx.svc.Users(users=new.pb(ctx.svc)).SerializeToString()
            t0 = time.perf_counter()
            c.unary("SyncUsers", req, None, timeout=300)
            dt = time.perf_counter() - t0
            times.append(dt)
            opsps.append(nops / dt)
            if node.core_pid() != core0:
                restarts += 1
                core0 = node.core_pid()
                api_port = core_api_port(node, core0, vport)
            checks.append(verify_applied(ctx, api_port, vport, cur, new))
            cur = new
        results[fid] = (times, opsps)

    # SyncUser stream: K new users, each message one user (adds)
    stream_users = panel.Users.make(K, seed=900).pb(ctx.svc)
    msgs = [u.SerializeToString() for u in stream_users]
    t0 = time.perf_counter()
    c.client_stream("SyncUser", msgs, timeout=600)
    stream_s = time.perf_counter() - t0
    if node.core_pid() != core0:
        restarts += 1
    c.close()
    node.stop()

    # The core's own cost, on a core alone with the same generated config (S users).
    gen = capture_config(ctx, S, vport)
    ref = {}
    for frac, fid in ((0.10, "sync_10pct"), (1.0, "sync_100pct")):
        ref[fid] = []
        for r in range(P["sync_runs"]):
            ca = CoreAlone(ctx, gen)
            cc = clients.CoreClient(ca.api_port, ctx.cpb, ctx.xray)
            new = base.changed(frac, 500 + r) if frac < 1 else panel.Users.make(S, 600 + r)
            secs, fails = core_ops(cc, diff_ops(cc, base, new))
            ref[fid].append(secs)
            cc.close()
            ca.stop()
    ca = CoreAlone(ctx, gen)
    cc = clients.CoreClient(ca.api_port, ctx.cpb, ctx.xray)
    adds = [cc.add_user_request(panel.VLESS_TAG, e, u) for e, u in
            panel.Users.make(K, seed=700).pairs]
    seq_s, seq_fail = core_seq(cc, adds)
    adds2 = [cc.add_user_request(panel.VLESS_TAG, e, u) for e, u in
             panel.Users.make(K, seed=701).pairs]
    pipe_s, pipe_fail = core_ops(cc, adds2)
    cc.close()
    ca.stop()

    for frac, fid in ((0.10, "sync_10pct"), (1.0, "sync_100pct")):
        times, opsps = results[fid]
        pct = int(frac * 100)
        rep.figure(fid, f"SyncUsers replacing {S:,} users, {pct}% changed", "s", times,
                   group=GROUP, digits=3,
                   reference={"title": f"core API, same {2 * int(S * frac):,} ops, {WINDOW} "
                                       "in flight", "runs": ref[fid]},
                   extra={"operations": 2 * int(S * frac)})
        rep.figure(fid + "_ops", f"  SyncUsers {pct}% changed: operations/s", "ops/s", opsps,
                   group=GROUP, digits=0)
    rep.figure("syncuser_stream", f"SyncUser stream, {K:,} new users: users/s", "users/s",
               [K / stream_s], group=GROUP, digits=0,
               reference={"title": "core AddUser, sequential", "runs": [K / seq_s]},
               extra={"seconds": stream_s})
    rep.figure("core_adduser_seq", "  core AddUser direct, sequential: per call", "ms",
               [seq_s / K * 1000], group=GROUP, digits=3, extra={"failures": seq_fail})
    rep.figure("core_adduser_pipelined", f"  core AddUser direct, {WINDOW} in flight: users/s",
               "users/s", [K / pipe_s], group=GROUP, digits=0, extra={"failures": pipe_fail})
    rep.figure("sync_verified", "syncs verified on the core (added users count, removed "
               "refused)", "ok", [sum(checks)], group=GROUP, digits=0,
               extra={"checked": len(checks)})
    rep.figure("sync_core_restarts", "core restarts during the syncs", "count", [restarts],
               group=GROUP, digits=0)
    worst = max(rep.get("sync_10pct")["max"], rep.get("sync_100pct")["max"])
    rep.target("sync_10k", f"SyncUsers replacing {S:,} users <= 2 s (slowest run, 10% and 100% "
               "changed)", worst, 2.0, "<=", "s", "sync_100pct")
    rep.target("sync_applied", "every sync verified on the core", sum(checks), len(checks), "==",
               "syncs", "sync_verified")
    rep.target("sync_no_restart", "no core restart during user syncs", restarts, 0, "==",
               "restarts", "sync_core_restarts")
