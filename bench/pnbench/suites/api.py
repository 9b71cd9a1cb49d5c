"""API throughput on an idle node (no core needed): gRPC GetBaseInfo with
h2load (10 connections x 10 streams), REST GET /info with wrk (keep-alive),
new TLS connections per second (tlsrate.c: full handshakes, one request,
Connection: close), the node's CPU seconds per 10k requests for each, and
RSS growth over a long run of API requests."""
import json
import os
import re
import subprocess

from .. import util

GROUP = "API throughput"


def _h2load(node, n, datafile, conns=10, streams=10, timeout=300):
    url = f"https://127.0.0.1:{node.port}/service.NodeService/GetBaseInfo"
    p = subprocess.run(["h2load", "-n", str(n), "-c", str(conns), "-m", str(streams), "-t", "1",
                        "-H", "content-type: application/grpc", "-H", "te: trailers",
                        "-H", f"x-api-key: {node.key}", "-d", datafile, url],
                       capture_output=True, text=True, timeout=timeout)
    out = p.stdout
    m = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    r = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    c = re.search(r"status codes: (\d+) 2xx", out)
    if not (m and r and c):
        raise RuntimeError(f"h2load output not understood (exit {p.returncode}):\n{out}\n"
                           f"{p.stderr}")
    return {"rps": float(m.group(3)), "succeeded": int(r.group(2)), "ok_2xx": int(c.group(1)),
            "total": int(r.group(1))}


def _wrk(node, seconds, extra=(), conns=10, timeout=None):
    url = f"https://127.0.0.1:{node.port}/info"
    p = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-H",
                        f"x-api-key: {node.key}"] + list(extra) + [url],
                       capture_output=True, text=True, timeout=timeout or seconds + 30)
    out = p.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not (m and n):
        raise RuntimeError(f"wrk output not understood (exit {p.returncode}):\n{out}\n{p.stderr}")
    return {"rps": float(m.group(1)), "requests": int(n.group(1)),
            "non2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(int(x) for x in errs.groups()) if errs else 0}


def _tlsrate(ctx, node, seconds, threads=2):
    p = subprocess.run([ctx.tools["tlsrate"], str(node.port), str(seconds), str(threads), "/info",
                        node.key], capture_output=True, text=True, timeout=seconds + 30)
    if p.returncode != 0:
        raise RuntimeError(f"tlsrate failed: {p.stderr}")
    return json.loads(p.stdout)


def run(ctx):
    rep, P = ctx.report, ctx.P
    node = ctx.node("api")
    datafile = os.path.join(ctx.tmp, "empty.grpc")
    with open(datafile, "wb") as f:
        f.write(b"\0\0\0\0\0")  # one gRPC message: uncompressed, length 0 (Empty)
    # the request must really succeed (h2load cannot see gRPC trailers)
    c = ctx.node_client(node)
    info = c.unary("GetBaseInfo", ctx.svc.Empty(), ctx.svc.BaseInfoResponse)
    c.close()
    rep.notes.append(f"GetBaseInfo answered node_version={info.node_version!r} "
                     f"core_version={info.core_version!r} before the h2load runs")

    # warm-up (first connections, allocator arenas)
    _h2load(node, 5000, datafile)
    _wrk(node, 1)

    # -- gRPC GetBaseInfo, h2load
    rps, cpu, fails = [], [], 0
    for _ in range(P["h2load_runs"]):
        c0 = util.cpu_seconds(node.pid)
        r = _h2load(node, P["h2load_n"], datafile)
        c1 = util.cpu_seconds(node.pid)
        fails += r["total"] - r["ok_2xx"]
        rps.append(r["rps"])
        cpu.append((c1 - c0) / r["total"] * 10000)
    rep.figure("grpc_getbaseinfo_rps", "gRPC GetBaseInfo req/s (h2load 10 conn x 10 streams)",
               "req/s", rps, group=GROUP, digits=0,
               extra={"requests_per_run": P["h2load_n"], "failed_requests": fails})
    rep.figure("grpc_getbaseinfo_cpu", "  node CPU per 10k GetBaseInfo", "cpu s", cpu,
               group=GROUP, digits=3)
    rep.target("grpc_rps", "gRPC GetBaseInfo >= 30,000 req/s", rep.get("grpc_getbaseinfo_rps")[
        "median"], 30000, ">=", "req/s", "grpc_getbaseinfo_rps")

    # -- REST /info, wrk keep-alive
    rps, cpu, bad = [], [], 0
    for _ in range(P["wrk_runs"]):
        c0 = util.cpu_seconds(node.pid)
        r = _wrk(node, P["wrk_secs"])
        c1 = util.cpu_seconds(node.pid)
        bad += r["non2xx"] + r["socket_errors"]
        rps.append(r["rps"])
        cpu.append((c1 - c0) / r["requests"] * 10000)
    rep.figure("rest_info_rps", "REST GET /info req/s (wrk 10 conn keep-alive)", "req/s", rps,
               group=GROUP, digits=0, extra={"seconds_per_run": P["wrk_secs"],
                                             "bad_responses": bad})
    rep.figure("rest_info_cpu", "  node CPU per 10k GET /info", "cpu s", cpu, group=GROUP,
               digits=3)
    rep.target("rest_rps", "REST /info >= 20,000 req/s", rep.get("rest_info_rps")["median"],
               20000, ">=", "req/s", "rest_info_rps")

    # -- new TLS connections per second
    rate, cpu, failed, reused = [], [], 0, 0
    for _ in range(P["tls_runs"]):
        c0 = util.cpu_seconds(node.pid)
        r = _tlsrate(ctx, node, P["tls_secs"])
        c1 = util.cpu_seconds(node.pid)
        failed += r["failed"]
        reused += r["reused"]
        rate.append(r["ok"] / r["seconds"])
        cpu.append((c1 - c0) / max(1, r["ok"]) * 10000)
    rep.figure("tls_new_conn_rate", "new TLS connections/s (full handshake + GET /info)",
               "conn/s", rate, group=GROUP, digits=0,
               extra={"failed": failed, "resumed": reused, "client_threads": 2,
                      "tls": "client default (TLS 1.3, X25519, ECDSA P-256 certificate)"})
    rep.figure("tls_new_conn_cpu", "  node CPU per 10k new TLS connections", "cpu s", cpu,
               group=GROUP, digits=3)
    rep.target("tls_rate", "new TLS connections >= 1,000/s", rep.get("tls_new_conn_rate")[
        "median"], 1000, ">=", "conn/s", "tls_new_conn_rate")

    # -- RSS growth over many API requests (after the warm-up above)
    n = P["growth_requests"]
    s0 = util.status(node.pid)
    done = 0
    while done < n:
        k = min(200000, n - done)
        _h2load(node, k, datafile)
        done += k
    s1 = util.status(node.pid)
    growth = util.mib(s1["VmRSS"] - s0["VmRSS"])
    rep.figure("rss_growth_api", f"RSS growth over {n:,} gRPC requests", "MiB", [growth],
               group=GROUP, digits=3,
               extra={"requests": n, "rss_before_mib": util.mib(s0["VmRSS"]),
                      "rss_after_mib": util.mib(s1["VmRSS"]),
                      "rss_anon_growth_mib": util.mib(s1["RssAnon"] - s0["RssAnon"])})
    rep.target("rss_growth", f"RSS growth <= 1 MB over {n:,} API requests"
               + ("" if n >= 1000000 else " (quick: target is for 1M)"), growth, 1.0, "<=",
               "MiB", "rss_growth_api")
    node.stop()
