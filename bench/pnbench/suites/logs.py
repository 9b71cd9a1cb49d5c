"""GetLogs fan-out: 10 concurrent gRPC GetLogs readers (logreaders.py, its
own process) while a generator process (traffic.py) makes the core log:
raw VLESS connections at loglevel "info" give several core lines each.
Figures: lines per second delivered to each reader and in total, how many
lines the slowest reader missed (a reader more than LOG_BUFFER_SIZE lines
behind loses its oldest lines, by design), and the node's CPU per 10k
delivered lines."""
import json
import os
import select
import subprocess
import sys
import time

from .. import panel, util
from ..corealone import StartUnavailable, start_node_backend

GROUP = "GetLogs"
BENCH_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readline(p, timeout):
    r, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if r else ""


def _count_at(samples, t):
    c = 0
    for ts, n in samples:
        if ts > t:
            break
        c = n
    return c


def run(ctx):
    rep, P = ctx.report, ctx.P
    nread, secs = P["logs_readers"], P["logs_secs"]
    vport = util.free_port()
    node = ctx.node("logs")
    c = ctx.node_client(node)
    users = panel.Users.make(256, seed=42)
    try:
        start_node_backend(ctx, c, panel.panel_config(vport, loglevel="info"), users)
    except StartUnavailable as e:
        rep.unavailable("logs_reader_rate", "GetLogs lines/s per reader", "lines/s", str(e),
                        group=GROUP)
        return
    c.close()
    uids = ",".join(u for _, u in users.pairs)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": BENCH_DIR}
    per_reader, total, missed, cpu, per_conn, counts = [], [], [], [], [], []
    for _ in range(P["logs_runs"]):
        rd = util.spawn([sys.executable, "-m", "pnbench.logreaders", str(node.port), node.key,
                         str(secs + 8), str(nread)], stdout=subprocess.PIPE, text=True, env=env,
                        cwd=BENCH_DIR)
        line = _readline(rd, 15)
        if line.strip() != "ready":
            util.stop(rd)
            raise RuntimeError(f"GetLogs readers not ready: {line!r}")
        time.sleep(0.5)  # the backlog (LOG_BUFFER_SIZE lines) arrives before we count
        c0 = util.cpu_seconds(node.pid)
        t0 = time.monotonic()
        gen = util.spawn([sys.executable, "-m", "pnbench.traffic", str(vport), str(secs), uids],
                         stdout=subprocess.PIPE, text=True, env=env, cwd=BENCH_DIR)
        out, _ = gen.communicate(timeout=secs + 60)
        util.stop(gen)
        conns = int(out.strip() or 0)
        rd_out, _ = rd.communicate(timeout=secs + 60)
        util.stop(rd)
        c1 = util.cpu_seconds(node.pid)
        res = json.loads(rd_out.strip().splitlines()[-1])["readers"]
        lines, rates = [], []
        t_last = t0
        for r in res:
            n = r["count"] - _count_at(r["samples"], t0)
            tl = r["samples"][-1][0] if r["samples"] else t0
            t_last = max(t_last, tl)
            lines.append(n)
            rates.append(n / max(1e-6, tl - t0))
        per_reader.append(sorted(rates)[len(rates) // 2])
        total.append(sum(lines) / max(1e-6, t_last - t0))
        missed.append(max(lines) - min(lines))
        counts.append(lines)
        cpu.append((c1 - c0) / max(1, sum(lines)) * 10000)
        per_conn.append(max(lines) / max(1, conns))
    rep.figure("logs_reader_rate", f"GetLogs lines/s per reader ({nread} readers)", "lines/s",
               per_reader, group=GROUP, digits=0,
               extra={"generator_seconds": secs, "core_lines_per_connection": per_conn},
               note="bounded by what the core produces from the generator's connections")
    rep.figure("logs_total_rate", f"GetLogs lines/s delivered, all {nread} readers", "lines/s",
               total, group=GROUP, digits=0)
    rep.figure("logs_missed", "  lines the slowest reader missed (ring overrun)", "lines",
               missed, group=GROUP, digits=0, extra={"lines_per_reader": counts},
               note="a reader more than LOG_BUFFER_SIZE lines behind loses its oldest lines "
                    "(by design); 0 = every reader got every line")
    rep.figure("logs_cpu", "  node CPU per 10k delivered lines", "cpu s", cpu, group=GROUP,
               digits=3)
    node.stop()
