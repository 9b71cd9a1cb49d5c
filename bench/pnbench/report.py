"""Figures, targets and output: each figure keeps its raw runs and a
median / min / max summary, optionally next to a reference figure (the
OpenSSL floor, the core alone) and a target with pass/fail. The document is
JSON; the table is for people."""
import datetime
import json
import os
import platform
import re
import shutil
import subprocess

from . import util


class Report:
    def __init__(self, quick):
        self.quick = quick
        self.figures = []
        self.targets = []
        self.notes = []

    # -- figures
    def figure(self, fid, title, unit, runs, *, group, reference=None, note=None, extra=None,
               digits=2):
        """runs: list of numbers (one per repetition). reference: dict(title, runs) or None."""
        f = {"id": fid, "group": group, "title": title, "unit": unit, "runs": list(runs),
             **util.summary(runs), "digits": digits}
        if reference is not None:
            r = dict(reference)
            r.update(util.summary(r.get("runs", [])))
            f["reference"] = r
            if f["median"] is not None and r["median"]:
                f["ratio_to_reference"] = f["median"] / r["median"]
                f["over_reference"] = f["median"] - r["median"]
        if note:
            f["note"] = note
        if extra:
            f.update(extra)
        f["status"] = "measured" if f["n"] else "unavailable"
        self.figures.append(f)
        return f

    def unavailable(self, fid, title, unit, reason, *, group):
        f = {"id": fid, "group": group, "title": title, "unit": unit, "runs": [], "median": None,
             "min": None, "max": None, "n": 0, "status": "unavailable", "note": reason}
        self.figures.append(f)
        return f

    def get(self, fid):
        for f in self.figures:
            if f["id"] == fid:
                return f
        return None

    # -- targets
    def target(self, tid, text, value, limit, op="<=", unit="", figure=None, note=None):
        """Records a target. value None -> pass None (not measured)."""
        if value is None or limit is None:
            ok = None
        elif op == "<=":
            ok = value <= limit
        elif op == ">=":
            ok = value >= limit
        elif op == "==":
            ok = value == limit
        else:
            raise ValueError(op)
        t = {"id": tid, "text": text, "value": value, "limit": limit, "op": op, "unit": unit,
             "pass": ok, "figure": figure}
        if note:
            t["note"] = note
        self.targets.append(t)
        return t

    # -- output
    def document(self, meta):
        d = dict(meta)
        d["quick"] = self.quick
        d["figures"] = [{k: v for k, v in f.items() if k != "digits"} for f in self.figures]
        d["targets"] = self.targets
        d["targets_summary"] = {
            "pass": sum(1 for t in self.targets if t["pass"] is True),
            "fail": sum(1 for t in self.targets if t["pass"] is False),
            "unavailable": sum(1 for t in self.targets if t["pass"] is None)}
        d["notes"] = self.notes
        return d

    def table(self, meta):
        out = []
        m = meta["machine"]
        out.append(f"proxynode benchmarks — {meta['date']} — commit {meta['commit']}"
                   f"{' (dirty tree)' if meta.get('dirty') else ''}"
                   f"{' — QUICK mode' if self.quick else ''}")
        out.append(f"machine: {m['cpu_model']}, {m['cores']} cores, {m['mem_total_mib']} MiB; "
                   f"kernel {m['kernel']}")
        v = meta["versions"]
        out.append("versions: " + ", ".join(f"{k} {v[k]}" for k in v))
        out.append("")
        w = 60
        out.append(f"{'figure':<{w}} {'median':>11} {'min':>10} {'max':>10}  {'unit':<8} "
                   f"reference")
        group = None
        for f in self.figures:
            if f["group"] != group:
                group = f["group"]
                out.append(f"--- {group}")
            d = f.get("digits", 2)

            def fmt(x):
                return "—" if x is None else f"{x:.{d}f}"
            ref = ""
            if "reference" in f:
                r = f["reference"]
                ref = f"{r['title']}: {fmt(r['median'])}"
                if f.get("ratio_to_reference") is not None:
                    ref += f" (×{f['ratio_to_reference']:.2f}, {f['over_reference']:+.{d}f})"
            if f["status"] == "unavailable":
                ref = "unavailable: " + f.get("note", "")
            out.append(f"{f['title'][:w]:<{w}} {fmt(f['median']):>11} {fmt(f['min']):>10} "
                       f"{fmt(f['max']):>10}  {f['unit']:<8} {ref}")
        out.append("")
        out.append("targets (2-core reference machine):")
        for t in self.targets:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
            val = "—" if t["value"] is None else (f"{t['value']:.2f}" if isinstance(
                t["value"], float) else str(t["value"]))
            lim = "—" if t["limit"] is None else (f"{t['limit']:.2f}" if isinstance(
                t["limit"], float) else str(t["limit"]))
            out.append(f"  [{mark}] {t['text']}: {val} {t['op']} {lim} {t['unit']}"
                       + (f"  ({t['note']})" if t.get("note") else ""))
        for n in self.notes:
            out.append("note: " + n)
        return "\n".join(out)


# ---- machine and versions -------------------------------------------------------------------

def _first_line(args, timeout=10):
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except Exception as e:  # a missing tool is reported, not fatal
        return f"unknown ({e.__class__.__name__})"


def _dpkg(pkg):
    try:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                           text=True, timeout=10)
        return p.stdout.strip() or "not installed"
    except Exception:
        return "unknown"


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) // 1024
    return {"cpu_model": model, "cores": os.cpu_count(), "mem_total_mib": total,
            "kernel": platform.release(), "arch": platform.machine()}


def versions(binary, core):
    import grpc
    node_v = _first_line([binary, "version"])
    core_v = _first_line([core, "-version"])
    return {
        "proxynode": node_v,
        "core": core_v,
        "openssl": _first_line(["openssl", "version"]),
        "libevent": _dpkg("libevent-2.1-7"),
        "nghttp2": _dpkg("libnghttp2-14"),
        "h2load": _first_line(["h2load", "--version"]),
        "wrk": re.sub(r"\s+Copyright.*", "", _first_line(["wrk", "--version"])),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cc": _first_line(["cc", "--version"]),
    }


def git_info(repo):
    def git(*a):
        try:
            return subprocess.run(["git", "-C", repo] + list(a), capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "src", "proto",
                     "CMakeLists.txt"))
    return commit, dirty


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def have(tool):
    return shutil.which(tool) is not None
