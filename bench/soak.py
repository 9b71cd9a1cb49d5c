#!/usr/bin/python3
"""The soak (issue 6 part 3): one node with a started /usr/bin/v2ray core and
users, under a steady mixed load for SECONDS (default 600; CI runs 60):

- 20 pollers, each once a second: GetStats (users) and GetBackendStats,
  10 over gRPC (one channel each) and 10 over REST (one keep-alive HTTP/1.1
  connection each);
- a panel thread: SyncUser every 3 s (adding and removing a user in turn,
  gRPC and REST /user/sync alternately);
- 5 GetLogs streams reading everything;
- a thread that opens a new TLS connection every second (ALPN h2 and
  http/1.1 in turn) and asks for /info on it;
- real core traffic: raw VLESS connections for 20 users every 2 s, so the
  counters move and the core writes log lines.

It counts requests and failures, samples the node's VmRSS and open file
descriptors after a warm-up and at the end (same load), checks for zombie
children of the node, checks that the core was never restarted, and that
the node exits 0 on SIGTERM. Prints one JSON summary and exits non-zero on
any failed request or a growth beyond the tolerance (RSS +5 MiB, fds +10).

  /usr/bin/python3 bench/soak.py [--bin build/proxynode] [--seconds 600]

Loopback only; every loop is bounded by the duration; every process it
starts is stopped on exit (also on Ctrl-C / SIGTERM)."""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import grpc  # noqa: E402

from pnbench import clients, panel, traffic, util  # noqa: E402
from pnbench import node as nodemod  # noqa: E402

REPO = os.path.dirname(HERE)
MIB = 1 << 20
USERS_TYPE = 4  # StatType USERS
RSS_TOLERANCE = 5 * MIB
FD_TOLERANCE = 10
CALL_TIMEOUT = 10.0
LOADS = ("grpc", "rest", "sync", "logs", "tls", "traffic")
PRIME_CALLS = 1000
PREFILL_CONNECTIONS = 6000


# ---- bookkeeping -------------------------------------------------------------------------------

class Tally:
    """Requests and failures per kind, thread-safe, with the first failures
    kept as text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}
        self.failures = {}
        self.samples = []

    def ok(self, kind, n=1):
        with self.lock:
            self.requests[kind] = self.requests.get(kind, 0) + n

    def fail(self, kind, what):
        with self.lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1
            self.failures[kind] = self.failures.get(kind, 0) + 1
            if len(self.samples) < 20:
                self.samples.append(f"{time.strftime('%H:%M:%S')} {kind}: {what}")

    def total(self, d):
        with self.lock:
            return sum(d.values())


def proc_stat(pid):
    """(state, ppid) of pid, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None


def zombies_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and st[0] == "Z" and st[1] == pid:
                out.append(int(d))
    return out


def sample(pid):
    return {"t": time.monotonic(), "rss": util.status(pid)["VmRSS"],
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# ---- the load ----------------------------------------------------------------------------------

def paced(stop, period, offset, fn):
    """Runs fn() every `period` seconds from `offset` until stop is set."""
    nxt = time.monotonic() + offset
    while not stop.is_set():
        delay = nxt - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        fn()
        nxt += period
        if nxt < time.monotonic() - period:  # fell far behind: do not burst to catch up
            nxt = time.monotonic()


class Warmup:
    """Counts the load parts still filling their bounded buffers; the start
    sample is taken once none is left (and the warm-up time has passed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.left = 0

    def add(self):
        with self.lock:
            self.left += 1

    def done(self):
        with self.lock:
            self.left -= 1

    def ready(self):
        with self.lock:
            return self.left <= 0


def prime(c, svc, tally, stop):
    """PRIME_CALLS quick GetBaseInfo calls on a gRPC channel: nghttp2 keeps
    up to SETTINGS_MAX_CONCURRENT_STREAMS (1000 in the node) closed streams
    per connection (~300 bytes each), so a connection's memory only levels
    off after that many streams. Done in the warm-up so the steady state is
    what the RSS figures compare."""
    for _ in range(PRIME_CALLS):
        if stop.is_set():
            return
        try:
            c.unary("GetBaseInfo", svc.Empty(), svc.BaseInfoResponse, timeout=CALL_TIMEOUT)
            tally.ok("grpc GetBaseInfo (warm-up)")
        except grpc.RpcError as e:
            tally.fail("grpc GetBaseInfo (warm-up)", f"{e.code()} {e.details()}")


def grpc_poller(stop, n, svc, tally, warmup):
    c = clients.NodeClient(n)
    req = svc.StatRequest(type=USERS_TYPE)
    try:
        prime(c, svc, tally, stop)
    finally:
        warmup.done()

    def once():
        for kind, method, body, resp in (
                ("grpc GetStats", "GetStats", req, svc.StatResponse),
                ("grpc GetBackendStats", "GetBackendStats", svc.Empty(),
                 svc.BackendStatsResponse)):
            try:
                c.unary(method, body, resp, timeout=CALL_TIMEOUT)
                tally.ok(kind)
            except grpc.RpcError as e:
                tally.fail(kind, f"{e.code()} {e.details()}")
    try:
        paced(stop, 1.0, random.random(), once)
    finally:
        c.close()


def tls_context(n, alpn=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(n.cert)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


class Rest:
    """One keep-alive HTTP/1.1 connection to the node (reopened after an
    error, which counts as a failure of the request that saw it)."""

    def __init__(self, n):
        self.n = n
        self.ctx = tls_context(n)
        self.conn = None

    def call(self, method, path, body=b""):
        if self.conn is None:
            self.conn = http.client.HTTPSConnection("127.0.0.1", self.n.port, context=self.ctx,
                                                    timeout=CALL_TIMEOUT)
        h = {"x-api-key": self.n.key, "Content-Type": "application/x-protobuf"}
        try:
            self.conn.request(method, path, body=body, headers=h)
            r = self.conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {r.status} {data[:200]!r}")
        return data

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def rest_poller(stop, n, svc, tally):
    rest = Rest(n)
    body = svc.StatRequest(type=USERS_TYPE).SerializeToString()

    def once():
        for kind, path, b in (("rest /stats", "/stats", body),
                              ("rest /stats/backend", "/stats/backend", b"")):
            try:
                rest.call("GET", path, b)
                tally.ok(kind)
            except Exception as e:  # every error is a failed request
                tally.fail(kind, repr(e))
    try:
        paced(stop, 1.0, random.random(), once)
    finally:
        rest.close()


def syncer(stop, n, svc, tally, port_user, warmup):
    """SyncUser every 3 s: user `soak-extra` added, then removed, in turn;
    gRPC and REST alternately."""
    c = clients.NodeClient(n)
    rest = Rest(n)
    try:
        prime(c, svc, tally, stop)
    finally:
        warmup.done()
    state = {"i": 0}

    def once():
        i = state["i"]
        state["i"] += 1
        p = svc.Proxy()
        p.vless.id = port_user
        user = svc.User(email="soak-extra", proxies=p,
                        inbounds=[panel.VLESS_TAG] if i % 2 == 0 else [])
        if i % 4 < 2:
            try:
                c.client_stream("SyncUser", [user], timeout=CALL_TIMEOUT)
                tally.ok("grpc SyncUser")
            except grpc.RpcError as e:
                tally.fail("grpc SyncUser", f"{e.code()} {e.details()}")
        else:
            try:
                rest.call("PUT", "/user/sync", user.SerializeToString())
                tally.ok("rest /user/sync")
            except Exception as e:
                tally.fail("rest /user/sync", repr(e))
    try:
        paced(stop, 3.0, 0.5, once)
    finally:
        c.close()
        rest.close()


def log_reader(stop, n, tally, idx, lines, calls, seconds):
    """One GetLogs stream, read until the soak ends; the stream ending (or
    failing) before that is a failure."""
    c = clients.NodeClient(n)
    try:
        call = c.server_stream("GetLogs", b"", timeout=seconds + 120)
        calls.append(call)
        tally.ok("grpc GetLogs")
        for _ in call:
            lines[idx] += 1
            if stop.is_set():
                break
        if not stop.is_set():
            tally.fail("grpc GetLogs", "the stream ended before the soak did")
    except grpc.RpcError as e:
        if not (stop.is_set() and e.code() == grpc.StatusCode.CANCELLED):
            tally.fail("grpc GetLogs", f"{e.code()} {e.details()}")
    finally:
        c.close()


def reconnector(stop, n, svc, tally):
    """A new TLS connection every second, ALPN h2 and http/1.1 in turn,
    GET /info over HTTP/1.1 on it (the node serves HTTP/1.1 after h2 ALPN
    too, as the panel's Python client needs), then closed."""
    ctxs = [tls_context(n, ["h2"]), tls_context(n, ["http/1.1"])]
    state = {"i": 0}
    req = (f"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {n.key}\r\n"
           f"Connection: close\r\n\r\n").encode()

    def once():
        ctx = ctxs[state["i"] % 2]
        state["i"] += 1
        kind = "tls connect + /info"
        try:
            raw = socket.create_connection(("127.0.0.1", n.port), timeout=CALL_TIMEOUT)
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(req)
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"answer {data[:80]!r}")
            body = data.split(b"\r\n\r\n", 1)[1]
            info = svc.BaseInfoResponse.FromString(body)
            if not info.started:
                raise RuntimeError(f"/info says the core is not started: {info}")
            tally.ok(kind)
        except Exception as e:
            tally.fail(kind, repr(e))
    paced(stop, 1.0, 0.25, once)


def core_traffic(stop, port, uids, tally, warmup):
    """Raw VLESS connections for 20 users every 2 s (counters and log lines).
    First a burst of PREFILL_CONNECTIONS, whose log lines (2-3 each at
    level info) fill the node's log ring (LOG_BUFFER_SIZE, 10000 lines) in
    the warm-up, so the ring's memory is full before the start sample."""
    try:
        done, _ = traffic.touch_users(port, list(uids) * (PREFILL_CONNECTIONS // len(uids)),
                                      concurrency=128, timeout=60.0)
        tally.ok("core connections (not node requests)", done)
    finally:
        warmup.done()

    def once():
        done, _ = traffic.touch_users(port, uids, concurrency=20, timeout=5.0)
        tally.ok("core connections (not node requests)", done)
    paced(stop, 2.0, 0.75, once)


# ---- the run -----------------------------------------------------------------------------------

def run(args):
    seconds = max(10.0, float(args.seconds))
    warm = min(30.0, max(5.0, seconds * 0.15))
    tmp = tempfile.mkdtemp(prefix="pnsoak-")
    svc, _ = nodemod.load_protos(os.path.join(REPO, "proto"), tmp)
    env = dict(kv.split("=", 1) for kv in args.env)
    n = nodemod.Node(os.path.abspath(args.bin), os.path.join(tmp, "node"), env=env,
                     core=args.core)
    n.start()
    tally = Tally()
    problems = []
    vless_port = util.free_port()
    users = panel.Users.make(args.users)
    cfg = panel.panel_config(vless_port, loglevel="info")
    c = clients.NodeClient(n)
    c.unary("Start", panel.backend(svc, cfg, users), svc.BaseInfoResponse, timeout=60)
    c.close()
    core0 = util.wait_for(n.core_pid, 10, "the core process")

    stop = threading.Event()
    threads, log_calls = [], []
    lines = [0] * 5

    warmup = Warmup()

    def spawn(fn, *a, warms=False):
        if warms:
            warmup.add()
            a = a + (warmup,)
        t = threading.Thread(target=fn, args=a, daemon=True)
        t.start()
        threads.append(t)

    load = set(args.load.split(","))
    for i in range(20):
        if "grpc" in load and i % 2 == 0:
            spawn(grpc_poller, stop, n, svc, tally, warms=True)
        if "rest" in load and i % 2 == 1:
            spawn(rest_poller, stop, n, svc, tally)
    if "sync" in load:
        spawn(syncer, stop, n, svc, tally, panel.user_id(99, 0), warms=True)
    if "logs" in load:
        for i in range(5):
            spawn(log_reader, stop, n, tally, i, lines, log_calls, seconds)
    if "tls" in load:
        spawn(reconnector, stop, n, svc, tally)
    if "traffic" in load:
        spawn(core_traffic, stop, vless_port, [u for _, u in users.pairs[:20]], tally,
              warms=True)

    t0 = time.monotonic()
    series, zombies, core_changes = [], set(), []
    start_sample, warm_end, last = None, None, -5.0
    while True:
        now = time.monotonic() - t0
        if now >= seconds or n.proc.poll() is not None:
            break
        if start_sample is None and now >= warm and warmup.ready():
            start_sample = sample(n.pid)
            warm_end = now
        if now - last >= 5.0:
            last = now
            s = sample(n.pid)
            series.append({"t": round(now, 1), "rss_mib": round(s["rss"] / MIB, 2),
                           "fds": s["fds"]})
            zombies.update(zombies_of(n.pid))
            cur = n.core_pid()
            if cur != core0 and cur not in core_changes:
                core_changes.append(cur)
        time.sleep(min(1.0, max(0.05, seconds - now)))
    alive = n.proc.poll() is None
    end_sample = sample(n.pid) if alive else None
    zombies.update(zombies_of(n.pid) if alive else [])

    stop.set()
    for call in log_calls:
        call.cancel()
    for t in threads:
        t.join(timeout=CALL_TIMEOUT + 5)
    stuck = [t.name for t in threads if t.is_alive()]
    rc = util.stop(n.proc, grace=10.0)
    core_left = util.alive(core0)

    req_total = tally.total(tally.requests) - tally.requests.get(
        "core connections (not node requests)", 0)
    fail_total = tally.total(tally.failures)
    if not alive:
        problems.append(f"the node died during the soak (exit {n.proc.returncode})")
    if fail_total:
        problems.append(f"{fail_total} failed requests")
    rss_growth = fd_growth = None
    if start_sample and end_sample:
        rss_growth = end_sample["rss"] - start_sample["rss"]
        fd_growth = end_sample["fds"] - start_sample["fds"]
        if rss_growth > RSS_TOLERANCE:
            problems.append(f"VmRSS grew {rss_growth / MIB:.2f} MiB after the warm-up "
                            f"(tolerance {RSS_TOLERANCE / MIB:.0f} MiB)")
        if fd_growth > FD_TOLERANCE:
            problems.append(f"open fds grew by {fd_growth} after the warm-up "
                            f"(tolerance {FD_TOLERANCE})")
    elif alive:
        problems.append(f"the warm-up did not finish within {seconds} s")
    if zombies:
        problems.append(f"zombie children of the node: {sorted(zombies)}")
    if core_changes:
        problems.append(f"the core was restarted during the soak: {core0} -> {core_changes}")
    if "logs" in load and sum(lines) == 0:
        problems.append("the log streams received no line")
    if stuck:
        problems.append(f"load threads did not stop: {stuck}")
    if rc != 0:
        problems.append(f"the node exited with {rc} on SIGTERM")
    if core_left:
        problems.append(f"the core {core0} outlived the node")

    summary = {
        "seconds": seconds, "warmup_seconds": warm_end and round(warm_end, 1),
        "binary": os.path.abspath(args.bin),
        "load": sorted(load), "node_env": env,
        "requests": req_total, "failures": fail_total,
        "requests_by_kind": dict(sorted(tally.requests.items())),
        "failures_by_kind": dict(sorted(tally.failures.items())),
        "failure_samples": tally.samples,
        "log_lines_per_stream": lines,
        "rss": {"start_mib": start_sample and round(start_sample["rss"] / MIB, 2),
                "end_mib": end_sample and round(end_sample["rss"] / MIB, 2),
                "growth_mib": rss_growth is not None and round(rss_growth / MIB, 2),
                "max_mib": max((x["rss_mib"] for x in series), default=None),
                "tolerance_mib": RSS_TOLERANCE / MIB},
        "fds": {"start": start_sample and start_sample["fds"],
                "end": end_sample and end_sample["fds"], "growth": fd_growth,
                "max": max((x["fds"] for x in series), default=None),
                "tolerance": FD_TOLERANCE},
        "zombies": sorted(zombies), "core_pid": core0, "core_restarts": core_changes,
        "node_exit": rc, "series": series if args.series else None,
        "ok": not problems, "problems": problems,
    }
    if problems:
        summary["node_log_tail"] = n.log()[-3000:]
    shutil.rmtree(tmp, ignore_errors=True)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(REPO, "build", "proxynode"))
    ap.add_argument("--core", default=nodemod.V2RAY)
    ap.add_argument("--seconds", type=float,
                    default=float(os.environ.get("SOAK_SECONDS") or 600))
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--series", action="store_true", help="include the 5 s samples")
    ap.add_argument("--load", default=",".join(LOADS),
                    help=f"comma-separated parts of the load to run (default all: "
                         f"{','.join(LOADS)}); for finding which part makes a figure move")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="an extra environment variable for the node (repeatable)")
    args = ap.parse_args()
    for path, hint in ((args.bin, "build it with 'make build'"),
                       (args.core, "apt-get install v2ray")):
        if not os.access(path, os.X_OK):
            print(f"soak: {path} not found or not executable ({hint})", file=sys.stderr)
            return 2

    def on_signal(sig, frame):
        util.stop_all()
        sys.exit(128 + sig)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        summary = run(args)
    except KeyboardInterrupt:
        util.stop_all()
        return 130
    except Exception:
        traceback.print_exc()
        util.stop_all()
        return 1
    finally:
        util.stop_all()
    print(json.dumps(summary, indent=2))
    s = summary
    print(f"soak: {s['requests']} requests, {s['failures']} failed; VmRSS "
          f"{s['rss']['start_mib']} -> {s['rss']['end_mib']} MiB; fds {s['fds']['start']} -> "
          f"{s['fds']['end']}; zombies {len(s['zombies'])}: "
          f"{'OK' if s['ok'] else 'FAILED: ' + '; '.join(s['problems'])}", file=sys.stderr)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
