#!/usr/bin/python3
"""proxynode benchmarks (issue 5): one entry point, `make bench` (or
`make bench QUICK=1`). Runs every figure on loopback against the optimized
binary and a real /usr/bin/v2ray, writes a JSON document to
bench/results/latest.json (or --out) and prints a readable table.

  /usr/bin/python3 bench/run.py [--quick] [--bin build-bench/proxynode]
                                [--only memory,startup,sync,stats,api,logs,marzban]
                                [--out FILE] [--json]

Every loop is bounded in count and time; every process started here is
stopped on exit (also on Ctrl-C / SIGTERM)."""
import argparse
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from pnbench import clients, report, util  # noqa: E402
from pnbench import node as nodemod  # noqa: E402

REPO = os.path.dirname(HERE)
SUITES = ["memory", "startup", "sync", "stats", "api", "logs", "marzban"]

# Repetitions and sizes per mode. QUICK keeps the whole run under 2 minutes
# on the 2-core reference machine (CI runs it so the code cannot rot).
PARAMS = {
    "full": {
        "exec_runs": 20, "start_users": [0, 10000, 100000], "start_runs": 5,
        "start_runs_big": 3, "sync_users": 10000, "sync_runs": 3, "stream_users": 10000,
        "stats_users": [10000, 100000], "stats_runs": 7, "h2load_n": 200000, "h2load_runs": 5,
        "wrk_secs": 10, "wrk_runs": 5, "tls_secs": 5, "tls_runs": 3,
        "growth_requests": 1000000, "logs_secs": 5, "logs_runs": 3, "logs_readers": 10,
        "mz_exec_runs": 20, "mz_ping_secs": 5, "mz_ping_runs": 3, "mz_ping_conns": 4,
        "mz_tls_secs": 5, "mz_tls_runs": 3, "mz_start_runs": 10, "mz_start_users": 100,
        "mz_logs_secs": 5, "mz_logs_runs": 3, "mz_logs_readers": 10,
    },
    "quick": {
        "exec_runs": 8, "start_users": [0, 1000, 10000], "start_runs": 3,
        "start_runs_big": 2, "sync_users": 10000, "sync_runs": 1, "stream_users": 2000,
        "stats_users": [1000, 10000], "stats_runs": 3, "h2load_n": 30000, "h2load_runs": 2,
        "wrk_secs": 2, "wrk_runs": 2, "tls_secs": 2, "tls_runs": 1,
        "growth_requests": 100000, "logs_secs": 2, "logs_runs": 1, "logs_readers": 10,
        "mz_exec_runs": 8, "mz_ping_secs": 2, "mz_ping_runs": 2, "mz_ping_conns": 4,
        "mz_tls_secs": 2, "mz_tls_runs": 1, "mz_start_runs": 4, "mz_start_users": 100,
        "mz_logs_secs": 2, "mz_logs_runs": 1, "mz_logs_readers": 10,
    },
}


class Ctx:
    """What every suite gets: the binary, the protobuf modules, the mode's
    parameters, the report, a temp dir, and factories that register what they
    start so it is stopped whatever happens."""

    def __init__(self, args):
        self.binary = os.path.abspath(args.bin)
        self.core = args.core
        self.quick = args.quick
        self.P = PARAMS["quick" if args.quick else "full"]
        self.report = report.Report(args.quick)
        self.tmp = tempfile.mkdtemp(prefix="pnbench-")
        self.svc, self.cpb = nodemod.load_protos(os.path.join(REPO, "proto"), self.tmp)
        self.nodes = []
        self.configs = {}  # user count -> the node's generated core config (dict)
        self.tools = {}
        self.xray = "xray" in os.path.basename(self.core).lower()

    def node(self, name, env=None, start=True):
        n = nodemod.Node(self.binary, os.path.join(self.tmp, name), env=env, core=self.core)
        self.nodes.append(n)
        if start:
            n.start()
        return n

    def mz_node(self, name, env, start=True):
        """A Marzban-profile node (env must carry SSL_CLIENT_CERT_FILE)."""
        n = nodemod.MzNode(self.binary, os.path.join(self.tmp, name), env=env, core=self.core)
        self.nodes.append(n)
        if start:
            n.start()
        return n

    def node_client(self, n):
        return clients.NodeClient(n)

    def build_tools(self):
        """Compiles the C helpers (floor, tlsrate) with cc ... -lssl -lcrypto."""
        for name, libs in (("floor", ["-lssl", "-lcrypto"]),
                           ("tlsrate", ["-lssl", "-lcrypto", "-lpthread"])):
            out = os.path.join(self.tmp, name)
            p = subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", out,
                                os.path.join(HERE, name + ".c")] + libs,
                               capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"cc {name}.c failed:\n{p.stderr}")
            self.tools[name] = out

    def cleanup(self):
        for n in self.nodes:
            try:
                n.stop()
            except Exception:
                pass
        util.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI mode: fewer runs, smaller counts")
    ap.add_argument("--bin", default=os.path.join(REPO, "build-bench", "proxynode"))
    ap.add_argument("--core", default="/usr/bin/v2ray")
    ap.add_argument("--only", default=",".join(SUITES), help="comma-separated suites")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    ap.add_argument("--json", action="store_true", help="also print the JSON document to stdout")
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"no binary at {args.bin}: build it with `make bench` (build-bench/)")
    if not os.access(args.core, os.X_OK):
        sys.exit(f"no core at {args.core}: apt-get install v2ray (scripts/deps.sh bench)")
    for tool, pkg in (("h2load", "nghttp2-client"), ("wrk", "wrk"), ("cc", "gcc"),
                      ("protoc", "protobuf-compiler")):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install {pkg} (scripts/deps.sh bench)")
    only = [s for s in args.only.split(",") if s]
    for s in only:
        if s not in SUITES:
            sys.exit(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")

    signal.signal(signal.SIGTERM, _on_term)
    commit, dirty = report.git_info(REPO)  # read before the runs: the tree may move meanwhile
    ctx = Ctx(args)
    t_start = time.monotonic()
    timings = {}
    failed = []
    try:
        ctx.build_tools()
        for s in SUITES:
            if s not in only:
                continue
            mod = importlib.import_module(f"pnbench.suites.{s}")
            t0 = time.monotonic()
            print(f"[bench] {s} …", file=sys.stderr, flush=True)
            try:
                mod.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one suite failing must not lose the others' figures
                failed.append(s)
                ctx.report.notes.append(f"suite {s} failed: {e.__class__.__name__}: {e}")
                traceback.print_exc()
            finally:
                for n in ctx.nodes:  # a suite's nodes never outlive it
                    n.stop()
                ctx.nodes.clear()
                util.stop_all()
            timings[s] = round(time.monotonic() - t0, 1)
    except KeyboardInterrupt:
        print("[bench] interrupted: stopping everything", file=sys.stderr)
        ctx.cleanup()
        sys.exit(130)
    finally:
        ctx.cleanup()

    meta = {"schema": 1, "date": report.now(), "commit": commit, "dirty": dirty,
            "machine": report.machine(), "versions": report.versions(args.bin, args.core),
            "binary": args.bin, "mode": "quick" if args.quick else "full",
            "suite_seconds": timings, "total_seconds": round(time.monotonic() - t_start, 1),
            "failed_suites": failed}
    doc = ctx.report.document(meta)
    report.write_json(args.out, doc)
    print(ctx.report.table(meta))
    print(f"\nJSON: {args.out} ({doc['total_seconds']} s)")
    if args.json:
        import json
        print(json.dumps(doc, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
