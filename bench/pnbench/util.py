"""Small shared pieces: bounded waiting, free ports, /proc readings,
statistics over repeated runs, and the registry of processes this harness
started (stopped by pid on exit, never by name)."""
import os
import signal
import socket
import statistics
import subprocess
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
HZ = os.sysconf("SC_CLK_TCK")

# ---- processes we own ------------------------------------------------------------------------

PROCS = []  # every subprocess.Popen started by the harness


def spawn(args, **kw):
    """subprocess.Popen, registered for clean-up."""
    p = subprocess.Popen(args, **kw)
    PROCS.append(p)
    return p


def stop(p, grace=5.0):
    """SIGTERM, wait up to `grace` s, then SIGKILL; always reaps. Returns the exit status."""
    if p is None:
        return None
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        except ProcessLookupError:
            pass
    if p in PROCS:
        PROCS.remove(p)
    return p.returncode


def stop_all():
    """Stops every registered process still running (run.py calls this on exit)."""
    for p in list(PROCS):
        try:
            stop(p, grace=3.0)
        except Exception:  # clean-up must go on
            pass


def children(pid):
    """Direct children of pid, from /proc/<pid>/task/*/children."""
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def exe_name(pid):
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


# ---- waiting ---------------------------------------------------------------------------------

class Timeout(Exception):
    pass


def wait_for(pred, timeout, what, interval=0.01):
    """Polls pred() until it returns a truthy value (returned) or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n, host="127.0.0.1"):
    """n distinct free ports (held open together while choosing)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def accepting(port, host="127.0.0.1", timeout=0.2):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---- /proc ------------------------------------------------------------------------------------

def status(pid):
    """/proc/<pid>/status memory fields in bytes (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize", "VmData"):
                out[k] = int(v.split()[0]) * 1024
    return out


def cpu_seconds(pid):
    """utime + stime of pid in seconds (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def mapped_libs(pid):
    """Basenames of the shared objects mapped into pid."""
    libs = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and ".so" in parts[5]:
                libs.add(os.path.basename(parts[5].strip()))
    return sorted(libs)


def listening_ports(pid):
    """TCP ports pid listens on (IPv4 and IPv6), from its socket inodes and /proc/net/tcp*."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if t.startswith("socket:["):
                inodes.add(t[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p[3] == "0A" and p[9] in inodes:  # LISTEN
                        ports.add(int(p[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


# ---- statistics ------------------------------------------------------------------------------

def summary(values):
    """median / min / max / n of a list of numbers (None values dropped)."""
    vs = [v for v in values if v is not None]
    if not vs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}


def mib(b):
    return None if b is None else b / (1024 * 1024)


def ms(s):
    return None if s is None else s * 1000.0
