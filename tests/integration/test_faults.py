"""Fault tests (issue 6 part 2; DESIGN "Core process", "Small rules"): what
the node does when things go wrong around it, with the real /usr/bin/v2ray
behind it and real clients in front.

- the core: a missing binary (at start-up, and removed while a core runs),
  a core that exits at start (a config v2ray rejects, a wrapper script that
  refuses on demand, an inbound port already in use), a core killed ten
  times in ten seconds (backoff, no restart storm, service back after);
- the panel: SyncUser and SyncUsersChunked streams aborted in the middle
  (what was applied stays consistent and is logged; a chunked sync without
  `last` applies nothing, over gRPC and REST);
- peers: 1000 connections abandoned mid-handshake, a burst of connects
  (the listen backlog), slowloris headers and bodies over HTTP/1.1 and
  HTTP/2 (an unauthenticated slow body must not hold a connection), TLS
  inside TLS ("TLS to the plaintext side": the HTTP layer behind TLS) and
  plaintext to the TLS port, garbage after a valid request, and an HTTP/2
  peer that opens log streams without reading (flow-control stall) while
  the core logs hard: the node's memory stays bounded and it keeps serving.

Every loop is bounded in count and time; every socket and process is
closed or stopped by the test (the fixtures check that the node exits 0)."""
import json
import os
import re
import resource
import select
import signal
import socket
import ssl
import struct
import subprocess
import time

import grpc
import pytest

from pnclient import H2Conn, read_until_closed, tls_connect
from pncore import (VLESS, Panel, Site, cmdline, curl, download_ok, download_refused, frame,
                    make_user, panel_config, wait_for)
import pnnode
from pnnode import SANITIZE, T, V2RAY, free_port, need_tool

SERVICE = "/service.NodeService/"
MIB = 1 << 20
# The binary runs under a wrapper such as valgrind (make memcheck): its
# process holds the wrapper's own memory and descriptors too.
WRAPPED = bool(getattr(pnnode, "WRAPPER", None))
# Memory limits grow under ASan (redzones, a small quarantine) and wrappers.
MEM_SCALE = 3 if WRAPPED else 2 if SANITIZE else 1


# ---- small helpers -----------------------------------------------------------------------------

def vless_user(pb, email):
    return make_user(pb, email, inbounds=[VLESS], present=("vless",))


def grpc_msg(m):
    """One gRPC length-prefixed message (uncompressed)."""
    b = m if isinstance(m, (bytes, bytearray)) else m.SerializeToString()
    return b"\0" + struct.pack(">I", len(b)) + b


def proc_status(pid, field):
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing for pid {pid}")


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def direct_children(pid):
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def client_hello():
    """The bytes of a real TLS ClientHello (Python's ssl, memory BIOs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="127.0.0.1")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert len(hello) > 100 and hello[0] == 0x16, hello[:16]
    return hello


def pump(c, seconds):
    """Feeds what the node sends on an H2Conn into its state machine for up
    to `seconds` (settings, window updates); returns the events."""
    evs = []
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            c.sock.settimeout(left)
            data = c.sock.recv(65536)
            if not data:
                evs.append("EOF")
                break
            evs += c.conn.receive_data(data)
            c.flush()
    except (socket.timeout, TimeoutError, ssl.SSLWantReadError):
        pass
    except OSError as e:
        evs.append(e)
    return evs


def grpc_headers(path, key):
    h = [(":method", "POST"), (":path", path), (":scheme", "https"),
         (":authority", "127.0.0.1"), ("content-type", "application/grpc"), ("te", "trailers")]
    if key:
        h.append(("x-api-key", key))
    return h


def send_stream_data(c, sid, data):
    """Sends data on a stream in frames the peer's settings allow (no end)."""
    step = c.conn.max_outbound_frame_size
    for i in range(0, len(data), step):
        c.conn.send_data(sid, data[i:i + step])
    c.flush()


def base_info_ok(node, pb, budget):
    """GetBaseInfo over a fresh gRPC channel and GET /info over a fresh REST
    connection, each answered within `budget` seconds; returns the slowest."""
    t0 = time.monotonic()
    with node.grpc() as c:
        info = c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse, timeout=budget)
    t1 = time.monotonic()
    assert info.node_version, info
    with node.session() as s:
        r = s.get(node.url + "/info", timeout=budget)
    t2 = time.monotonic()
    assert r.status_code == 200, (r.status_code, r.content)
    slowest = max(t1 - t0, t2 - t1)
    assert slowest < budget, f"a real client waited {slowest:.2f} s (budget {budget} s)"
    return slowest


def log_since(node, offset):
    return node.stderr()[offset:]


# ---- fixtures --------------------------------------------------------------------------------

WRAPPER = """#!/bin/sh
# A core for the fault tests: /usr/bin/v2ray, except that while the file
# {flag} exists a launch prints a line on stdout and stderr and exits 3
# without reading its config (the version probe always works).
case "$1" in -version|version|--version) exec {v2ray} "$@" ;; esac
if [ -e '{flag}' ]; then
  echo "fault-test: refusing to start (flag file present)"
  echo "fault-test: refusing to start (stderr)" >&2
  exit 3
fi
exec {v2ray} "$@"
"""


class WrappedCore:
    """An executable script in a temp dir that runs v2ray, or refuses while
    a flag file exists; it can also be moved away (binary missing)."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "xray")
        self.flag = os.path.join(directory, "refuse")
        with open(self.path, "w") as f:
            f.write(WRAPPER.format(flag=self.flag, v2ray=V2RAY))
        os.chmod(self.path, 0o755)

    def refuse(self, on):
        if on:
            open(self.flag, "w").close()
        elif os.path.exists(self.flag):
            os.unlink(self.flag)


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory):
    return WrappedCore(str(tmp_path_factory.mktemp("core")))


@pytest.fixture(scope="module")
def wsite(pb, tmp_path_factory, wrapped):
    """One node whose core is the wrapper script (runs v2ray)."""
    s = Site(tmp_path_factory.mktemp("faults"), pb, core=wrapped.path)
    yield s
    wrapped.refuse(False)
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


# ---- the core ----------------------------------------------------------------------------------

def test_start_with_missing_core_binary(make_node, pb):
    """XRAY_EXECUTABLE_PATH names no file: Start fails with a text that says
    so (gRPC Unknown, REST 503); the node stays up, reports not started, and
    has no child process."""
    n = make_node(core="/nonexistent/dir/xray")
    panel = Panel(n, pb)
    try:
        cfg = panel_config({VLESS: free_port()})
        users = [vless_user(pb, "m1")]
        code, details = panel.error(panel.start, cfg, users)
        assert code == grpc.StatusCode.UNKNOWN, (code, details)
        assert details.startswith("failed to start xray") and (
            "no core binary" in details or "/nonexistent/dir/xray" in details), details
        r = panel.rest("POST", "/start", pb.Backend(type=pb.XRAY, config=json.dumps(cfg),
                                                    users=users))
        assert r.status_code == 503 and r.text.startswith("failed to start xray"), \
            (r.status_code, r.text)
        assert n.alive(), n.describe()
        info = panel.info()
        assert not info.started and info.core_version == "", info
        kids = direct_children(n.proc.pid)
        assert kids == [], f"children after a failed Start: {[cmdline(p) for p in kids]}"
    finally:
        panel.close()


def test_first_start_with_a_config_the_core_rejects(make_node, pb):
    """No core yet, and the first Start carries a config v2ray refuses: the
    error carries the core's line, the node stays up with no core and no
    child, and a good Start afterwards works."""
    n = make_node()
    panel = Panel(n, pb)
    try:
        ports = {VLESS: free_port()}
        bad = panel_config(ports)
        bad["outbounds"].append({"protocol": "nosuchproto", "tag": "WEIRD"})
        code, details = panel.error(panel.start, bad, [vless_user(pb, "r1")])
        assert code == grpc.StatusCode.UNKNOWN, (code, details)
        assert "nosuchproto" in details, f"the core's line is missing: {details!r}"
        assert n.alive(), n.describe()
        assert not panel.info().started
        kids = direct_children(n.proc.pid)
        assert kids == [], f"children after a failed Start: {[cmdline(p) for p in kids]}"
        assert panel.start(panel_config(ports), [vless_user(pb, "r1")]).started
        assert panel.info().started
    finally:
        panel.close()


def test_core_binary_removed_keeps_previous_core(wsite, wrapped, pb):
    """The core binary disappears while a core runs (a package upgrade gone
    wrong): a Start that needs a new core fails with a clear text and the
    running core keeps serving its users."""
    wsite.start(["b1"], config=wsite.config())
    pid = wsite.core()
    moved = wrapped.path + ".away"
    os.rename(wrapped.path, moved)
    try:
        cfg = wsite.config()
        cfg["inbounds"].append({"tag": "EXTRA", "listen": "127.0.0.1", "port": free_port(),
                                "protocol": "dokodemo-door",
                                "settings": {"address": "127.0.0.1", "port": 9}})
        code, details = wsite.panel.error(wsite.panel.start, cfg, wsite.users(["b1", "b2"]))
        assert code == grpc.StatusCode.UNKNOWN, (code, details)
        assert wrapped.path in details and "no such file" in details.lower(), \
            f"the error does not say what is missing: {details!r}"
    finally:
        os.rename(moved, wrapped.path)
    assert wsite.note_cores() == [pid], \
        f"the running core changed after a failed Start: {wsite.note_cores()} (was {pid})"
    assert wsite.panel.info().started
    wsite.panel.backend_stats()
    c = wsite.client({"b1": (VLESS, "b1")})
    download_ok(c.socks["b1"], wsite.url(), wsite.size(), "the old core after a failed Start")


def test_core_exits_at_start(wsite, wrapped, pb):
    """A core that exits at once without reading its config: Start fails
    with the core's own line in the text, the node survives (no SIGPIPE
    death), no new core process remains, the previous core still serves;
    and once the core starts again, so does a Start."""
    wsite.start(["e1"])
    pid = wsite.core()
    cfg = wsite.config()
    cfg["inbounds"].append({"tag": "EXTRA", "listen": "127.0.0.1", "port": free_port(),
                            "protocol": "dokodemo-door",
                            "settings": {"address": "127.0.0.1", "port": 9}})
    wrapped.refuse(True)
    try:
        for attempt in range(2):  # twice: a failed start leaves nothing behind to trip on
            code, details = wsite.panel.error(wsite.panel.start, cfg, wsite.users(["e1", "e2"]))
            assert code == grpc.StatusCode.UNKNOWN, (code, details)
            assert "fault-test: refusing to start" in details, \
                f"the core's line is missing from the error: {details!r}"
            assert wsite.node.alive(), wsite.node.describe()
            assert wsite.note_cores() == [pid], (wsite.note_cores(), pid)
    finally:
        wrapped.refuse(False)
    assert wsite.panel.info().started
    c = wsite.client({"e1": (VLESS, "e1"), "e2": (VLESS, "e2")})
    download_ok(c.socks["e1"], wsite.url(), wsite.size(), "the old core after failed Starts")
    download_refused(c.socks["e2"], wsite.url(), "a user of the failed Start")
    r = wsite.panel.start(cfg, wsite.users(["e1", "e2"]))
    assert r.started
    download_ok(c.socks["e2"], wsite.url(), wsite.size(), "after the core starts again")


def test_core_exits_at_start_port_in_use(wsite, pb):
    """The core exits because an inbound port is taken: the error carries
    the core's `failed to listen`-style line, the old core keeps serving."""
    wsite.start(["p1"])
    pid = wsite.core()
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        cfg = wsite.config()
        cfg["inbounds"].append({"tag": "TAKEN", "listen": "127.0.0.1",
                                "port": holder.getsockname()[1], "protocol": "dokodemo-door",
                                "settings": {"address": "127.0.0.1", "port": 9}})
        code, details = wsite.panel.error(wsite.panel.start, cfg, wsite.users(["p1"]))
        assert code == grpc.StatusCode.UNKNOWN, (code, details)
        assert "address already in use" in details.lower() or "failed to listen" in \
            details.lower(), details
    finally:
        holder.close()
    assert wsite.note_cores() == [pid], (wsite.note_cores(), pid)
    c = wsite.client({"p1": (VLESS, "p1")})
    download_ok(c.socks["p1"], wsite.url(), wsite.size(), "the old core after a port clash")


def test_core_killed_10_times_in_10_s_backs_off(pb, tmp_path):
    """SIGKILL every core the node spawns, for 10 s or 10 kills: the node
    waits 100 ms, 200 ms, 400 ms ... between attempts (no restart storm: at
    most 8 spawns in the window), logs each delay, and brings the core back
    with its users once the killing stops."""
    s = Site(tmp_path, pb)
    try:
        s.start(["k1"])
        npid = s.node.proc.pid
        off = len(s.node.stderr())
        seen, kills = {}, []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10.0 and len(kills) < 10:
            for p in direct_children(npid):
                if p in seen:
                    continue
                cl = cmdline(p)
                if "-config" not in cl:  # not exec'd yet (or the version probe)
                    continue
                seen[p] = time.monotonic() - t0
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                kills.append((p, round(time.monotonic() - t0, 3)))
            time.sleep(0.005)
        window = [k for k in kills if k[1] <= 10.0]
        assert len(window) <= 8, f"restart storm: {len(window)} cores spawned in 10 s: {kills}"
        assert len(kills) >= 5, f"too few restarts to see a backoff: {kills}"

        # the service comes back on its own
        wait_for(lambda: [p for p in direct_children(npid)
                          if p not in seen and "-config" in cmdline(p)], 10 + T(15),
                 "the node to spawn a core again after the kills")
        wait_for(lambda: _backend_ok(s), T(10), "GetBackendStats after the restart")
        pid = s.core()
        assert pid not in seen, "the last killed core is still counted as running"
        delays = [int(x) for x in re.findall(r"restarting in (\d+) ms",
                                             log_since(s.node, off))]
        want = [min(100 << i, 10000) for i in range(len(delays))]
        assert delays == want, f"backoff delays {delays}, expected {want}; kills {kills}"
        assert len(delays) == len(kills), (delays, kills)
        # each respawn came no sooner than its delay after the kill before it
        for i in range(1, len(kills)):
            gap = kills[i][1] - kills[i - 1][1]
            assert gap >= delays[i - 1] / 1000 * 0.9, \
                f"spawn {i} came {gap:.3f} s after kill {i - 1}, delay was {delays[i - 1]} ms"
        c = s.client({"k1": (VLESS, "k1")})
        download_ok(c.socks["k1"], s.url(), s.size(), "user k1 after the kills")
        assert s.node.alive()
    finally:
        s.close()


def _backend_ok(site):
    try:
        site.panel.backend_stats()
        return True
    except grpc.RpcError:
        return False


# ---- the panel's streams aborted ---------------------------------------------------------------

ABORT_LOG = re.compile(r"SyncUser[^\n]*(ended early|abort|cancel|reset|incomplete)", re.I)


def _open_sync_user(site):
    c = H2Conn(site.node)
    pump(c, 0.2)  # the node's settings: a 16 MiB window
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, grpc_headers(SERVICE + "SyncUser", site.node.key))
    c.flush()
    return c, sid


def test_sync_user_stream_aborted_mid_message(wsite, pb):
    """Three whole users and half of a fourth, then RST_STREAM: the three are
    applied, the half is not, the users from Start still serve, and the
    node logs that the stream was cut short."""
    wsite.start(["s1"])
    off = len(wsite.node.stderr())
    c, sid = _open_sync_user(wsite)
    try:
        data = b"".join(grpc_msg(vless_user(pb, f"a{i}")) for i in range(3))
        half = grpc_msg(vless_user(pb, "a3"))
        send_stream_data(c, sid, data + half[:len(half) // 2])
        # all three applied before the abort: wait until the node has them
        cl = wsite.client({e: (VLESS, e) for e in ("a0", "a1", "a2", "a3", "s1")})
        wait_for(lambda: curl(cl.socks["a2"], wsite.url(), max_time=T(3))[1] == 200, T(10),
                 "user a2 of the open SyncUser stream to be applied")
        c.conn.reset_stream(sid)
        c.flush()
    finally:
        time.sleep(0.2)
        c.close()
    for e in ("a0", "a1", "a2", "s1"):
        download_ok(cl.socks[e], wsite.url(), wsite.size(), f"user {e} after the abort")
    download_refused(cl.socks["a3"], wsite.url(), "the half-sent user a3")
    wait_for(lambda: ABORT_LOG.search(log_since(wsite.node, off)), T(3),
             "a log line saying the SyncUser stream was aborted (DESIGN: 'An aborted SyncUser "
             "stream keeps what was applied (logged)'); the node logged:\n"
             + log_since(wsite.node, off)[-2000:])
    wsite.panel.backend_stats()


def test_sync_user_stream_aborted_with_queue(wsite, pb):
    """2000 users in one burst, then RST_STREAM at once: the node applies a
    prefix in order, logs how many queued users it did not apply, and that
    count matches what the core serves (the last applied user passes, the
    first dropped one does not)."""
    wsite.start(["s1"])
    off = len(wsite.node.stderr())
    n = 2000
    c, sid = _open_sync_user(wsite)
    try:
        send_stream_data(c, sid, b"".join(grpc_msg(vless_user(pb, f"q{i}")) for i in range(n)))
        c.conn.reset_stream(sid)
        c.flush()
        time.sleep(0.2)
    finally:
        c.close()
    m = wait_for(lambda: re.search(r"(\d+) queued users not applied",
                                   log_since(wsite.node, off)), T(10),
                 "the log line counting the users the aborted stream did not apply")
    applied = n - int(m.group(1))
    assert 0 <= applied <= n
    names = {"first": "q0", "last_applied": f"q{applied - 1}", "dropped": f"q{applied}",
             "s1": "s1"}
    if applied == 0:
        del names["first"], names["last_applied"]
    cl = wsite.client({k: (VLESS, e) for k, e in names.items()})
    for k in ("first", "last_applied", "s1"):
        if k in names:
            download_ok(cl.socks[k], wsite.url(), wsite.size(), f"{names[k]} ({k})")
    if applied < n:
        download_refused(cl.socks["dropped"], wsite.url(), f"{names['dropped']} (not applied)")
    wsite.panel.backend_stats()


def test_sync_users_chunked_aborted_applies_nothing(wsite, pb):
    """gRPC SyncUsersChunked with chunks 0 and 1 and no `last`, then
    RST_STREAM; and REST /users/sync/chunked cut off mid-body: nothing of
    either is applied, the users from Start still serve, and a complete
    chunked sync afterwards works."""
    wsite.start(["c1"])
    c = H2Conn(wsite.node)
    pump(c, 0.2)
    try:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, grpc_headers(SERVICE + "SyncUsersChunked", wsite.node.key))
        send_stream_data(c, sid, grpc_msg(pb.UsersChunk(users=[vless_user(pb, "x0")], index=0))
                         + grpc_msg(pb.UsersChunk(users=[vless_user(pb, "x1")], index=1)))
        time.sleep(0.5)
        c.conn.reset_stream(sid)
        c.flush()
        time.sleep(0.2)
    finally:
        c.close()
    # REST: a chunked body with one whole frame, half a second, then the socket closes
    s = tls_connect(wsite.node, alpn=["http/1.1"])
    try:
        f0 = frame(pb.UsersChunk(users=[vless_user(pb, "y0")], index=0))
        f1 = frame(pb.UsersChunk(users=[vless_user(pb, "y1")], index=1, last=True))
        part = f1[:len(f1) // 2]
        s.sendall(b"PUT /users/sync/chunked HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"x-api-key: " + wsite.node.key.encode() + b"\r\n"
                  b"Content-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"%x\r\n" % len(f0) + f0 + b"\r\n" + b"%x\r\n" % len(f1) + part)
        time.sleep(0.5)
    finally:
        s.close()
    time.sleep(0.3)
    cl = wsite.client({e: (VLESS, e) for e in ("x0", "x1", "y0", "y1", "c1", "z0")})
    for e in ("x0", "x1", "y0", "y1"):
        download_refused(cl.socks[e], wsite.url(), f"user {e} of an aborted chunked sync")
    download_ok(cl.socks["c1"], wsite.url(), wsite.size(), "user c1 from Start")
    wsite.panel.sync_chunked([pb.UsersChunk(users=[vless_user(pb, "z0")], index=0, last=True)])
    download_ok(cl.socks["z0"], wsite.url(), wsite.size(), "a complete chunked sync after")


# ---- peers: handshakes, slowloris, wrong protocols -------------------------------------------

def _raise_own_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= need, f"this test needs {need} file descriptors (ulimit -n is {soft})"


def test_1000_abandoned_handshakes(make_node, pb):
    """1000 TCP connections each send half a ClientHello and stall; the node
    (at the common default of 1024 descriptors) answers a real gRPC and REST
    client within a second meanwhile, and gives the descriptors back once
    the peers go."""
    _raise_own_nofile(1200)
    n = make_node()
    pid = n.proc.pid
    if not WRAPPED:  # a wrapper (valgrind) reserves descriptors at the top of the limit
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, hard))
    base_info_ok(n, pb, T(1))  # warm: the version probe has run
    fds0 = fd_count(pid)
    half = client_hello()[:200]
    socks = []
    try:
        for i in range(1000):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(T(5))
            s.connect((n.connect_host, n.port))
            s.sendall(half)
            socks.append(s)
        wait_for(lambda: fd_count(pid) >= fds0 + 950, T(10),
                 f"the node to accept the stalled connections (fds {fd_count(pid)})")
        for _ in range(3):
            base_info_ok(n, pb, T(1))
        assert n.alive()
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: fd_count(pid) <= fds0 + 5, T(10),
             f"the node to close the abandoned connections (fds {fd_count(pid)}, was {fds0})")
    base_info_ok(n, pb, T(1))


def _listen_backlog(port):
    """The accept-queue limit of the listener on port (ss: Send-Q of LISTEN)."""
    p = subprocess.run([need_tool("ss"), "-ltnH", f"sport = :{port}"], capture_output=True,
                       text=True, timeout=10)
    rows = [r.split() for r in p.stdout.splitlines() if r.strip()]
    assert rows, f"no listener on port {port}: {p.stdout!r} {p.stderr!r}"
    return int(rows[0][2])


def test_connect_burst_not_dropped(make_node):
    """The listener asks for a backlog of 1024, and gets it: a burst of 500
    non-blocking connects all complete at once, none waits for a SYN
    retransmit (1 s) because the accept queue overflowed."""
    n = make_node()
    backlog = _listen_backlog(n.port)
    socks, slow = [], []
    try:
        t0 = time.monotonic()
        for i in range(500):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            socks.append(s)
            try:
                s.connect((n.connect_host, n.port))
            except BlockingIOError:
                pass
        pending = set(socks)
        deadline = time.monotonic() + T(3)
        while pending and time.monotonic() < deadline:
            _, w, _ = select.select([], list(pending)[:500], [], 0.05)
            for s in w:
                pending.discard(s)
                if time.monotonic() - t0 > 0.5:
                    slow.append(round(time.monotonic() - t0, 2))
        slow += ["never"] * len(pending)
    finally:
        for s in socks:
            s.close()
    assert backlog >= 1024, f"the listen backlog is {backlog}, not the 1024 listener.c asks for"
    assert not slow, f"{len(slow)} of 500 connects waited for a SYN retransmit: {slow[:10]}"


def _h2_raw_frame(ftype, flags, sid, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", sid) + payload


def test_slowloris_headers(make_node, pb):
    """Header blocks that trickle in, over HTTP/1.1 (a header line every
    0.5 s) and HTTP/2 (HEADERS without END_HEADERS, then a CONTINUATION
    frame every 1.5 s, fewer than nghttp2's CONTINUATION cap): each
    connection is closed about 10 s after its block began (DESIGN: 10 s per
    header block), however steadily it trickles; real clients are served
    within a second all along."""
    import hpack
    n = make_node()
    conns = []  # [kind, sock, next piece, every n-th tick]
    for i in range(4):
        s = tls_connect(n, alpn=["http/1.1"])
        s.sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        conns.append(["h1", s, (lambda k=i: f"X-Slow-{k}: {'a' * 8}\r\n".encode()), 1])
    for i in range(4):
        c = H2Conn(n)
        pump(c, 0.1)
        block = hpack.Encoder().encode(grpc_headers("/info", n.key) + [
            (f"x-pad-{j}", "p" * 40) for j in range(40)])
        c.sock.sendall(_h2_raw_frame(1, 0, 1, block[:8]))  # HEADERS, no END_HEADERS
        rest = [block[8:]]

        def piece(rest=rest):
            chunk, rest[0] = rest[0][:4], rest[0][4:]
            assert chunk, "the header block ran out before the node closed the connection"
            return _h2_raw_frame(9, 0, 1, chunk)  # CONTINUATION, no END_HEADERS
        conns.append(["h2", c.sock, piece, 3])
    t0 = time.monotonic()
    closed_at = {}
    tick = 0
    try:
        while len(closed_at) < len(conns) and time.monotonic() - t0 < 10 + T(5):
            tick += 1
            for idx, (kind, s, piece, every) in enumerate(conns):
                if idx in closed_at or tick % every:
                    continue
                try:
                    s.sendall(piece())
                except (OSError, ssl.SSLError):
                    closed_at[idx] = time.monotonic() - t0
            if tick % 4 == 0:
                base_info_ok(n, pb, T(1))
            time.sleep(0.5)
        for idx, (kind, s, piece, every) in enumerate(conns):
            if idx not in closed_at:
                data, closed = read_until_closed(s, 0.5)
                if closed:
                    closed_at[idx] = time.monotonic() - t0
    finally:
        for c in conns:
            c[1].close()
    open_ = [conns[i][0] for i in range(len(conns)) if i not in closed_at]
    assert not open_, f"trickling header blocks still open after {time.monotonic() - t0:.1f} " \
                      f"s: {open_}"
    for idx, at in closed_at.items():
        assert 8 <= at <= 10 + T(4), f"{conns[idx][0]} connection closed after {at:.1f} s"
    base_info_ok(n, pb, T(1))


def _slow_body_h1(n, key, length=4096):
    s = tls_connect(n, alpn=["http/1.1"])
    head = "PUT /user/sync HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if key:
        head += f"x-api-key: {key}\r\n"
    head += f"Content-Type: application/x-protobuf\r\nContent-Length: {length}\r\n\r\n"
    s.sendall(head.encode())
    return s


def _slow_body_h2(n, key):
    c = H2Conn(n)
    pump(c, 0.1)
    sid = c.conn.get_next_available_stream_id()
    h = [(":method", "PUT"), (":path", "/user/sync"), (":scheme", "https"),
         (":authority", "127.0.0.1"), ("content-type", "application/x-protobuf"),
         ("content-length", "4096")]
    if key:
        h.append(("x-api-key", key))
    c.conn.send_headers(sid, h)
    c.flush()
    return c, sid


def test_slowloris_bodies_do_not_block_clients(make_node, pb):
    """40 authenticated requests whose bodies arrive one byte every 0.5 s
    (20 over HTTP/1.1, 20 over HTTP/2) do not slow real clients and are not
    cut; a body that stops arriving is cut after the idle timeout (3 s here):
    the HTTP/1.1 connection is closed, the HTTP/2 stream reset (CANCEL)."""
    import h2.events
    n = make_node(env={"PROXYNODE_HTTP_IDLE_TIMEOUT": "3"})
    h1 = [_slow_body_h1(n, n.key) for _ in range(20)]
    h2s = [_slow_body_h2(n, n.key) for _ in range(20)]
    stalled = _slow_body_h1(n, n.key)
    stalled.sendall(b"\x0a")
    stalled2, sid2 = _slow_body_h2(n, n.key)
    stalled2.conn.send_data(sid2, b"\x0a")
    stalled2.flush()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 5:
            for s in h1:
                s.sendall(b"\x0a")
            for c, sid in h2s:
                c.conn.send_data(sid, b"\x0a")
                c.flush()
            base_info_ok(n, pb, T(1))
            time.sleep(0.5)
        data, closed = read_until_closed(stalled, 0.1)
        assert closed, "an HTTP/1.1 body that stopped arriving is still open after " \
                       f"{time.monotonic() - t0:.1f} s (idle timeout 3 s)"
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
        resets = [ev for ev in pump(stalled2, 0.5) if isinstance(ev, h2.events.StreamReset)]
        assert [(ev.stream_id, ev.error_code) for ev in resets] == [(sid2, 8)], \
            f"a stalled HTTP/2 body was not reset after the idle timeout: {resets}"
        for c, sid in h2s:
            cut = [ev for ev in pump(c, 0.05) if isinstance(ev, h2.events.StreamReset)]
            assert not cut, f"a trickled HTTP/2 body that keeps arriving was cut: {cut}"
    finally:
        for s in h1 + [stalled]:
            s.close()
        for c, _ in h2s + [(stalled2, sid2)]:
            c.close()
    assert n.alive()
    base_info_ok(n, pb, T(1))


@pytest.mark.parametrize("proto,how", [("h1", "stall"), ("h1", "trickle"),
                                       ("h2", "stall"), ("h2", "trickle")])
def test_unauthenticated_slow_body_is_not_held(make_node, proto, how):
    """A REST request without an API key whose body is slow (never sent, or
    one byte every 0.5 s) must not hold its connection: the node answers 401
    (or closes) within the idle timeout (3 s here) + 2 s, without waiting
    for the body. gRPC already answers Unauthenticated at the headers."""
    n = make_node(env={"PROXYNODE_HTTP_IDLE_TIMEOUT": "3"})
    limit = 3 + T(2)
    t0 = time.monotonic()
    answered = None
    if proto == "h1":
        s = _slow_body_h1(n, None)
        s.setblocking(False)
        got = b""
        try:
            while time.monotonic() - t0 < limit + 1:
                if how == "trickle":
                    try:
                        s.sendall(b"\x0a")
                    except (OSError, ssl.SSLError):
                        answered = "closed"
                        break
                time.sleep(0.5)
                try:
                    chunk = s.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except OSError:
                    answered = "closed"
                    break
                if not chunk:
                    answered = "closed"
                    break
                got += chunk
                if b"\r\n\r\n" in got:
                    answered = got.split(b"\r\n", 1)[0].decode(errors="replace")
                    break
        finally:
            s.close()
        if answered and answered.startswith("HTTP/1.1"):
            assert answered.startswith("HTTP/1.1 401"), answered
    else:
        import h2.events
        c, sid = _slow_body_h2(n, None)
        try:
            while time.monotonic() - t0 < limit + 1 and answered is None:
                if how == "trickle":
                    try:
                        c.conn.send_data(sid, b"\x0a")
                        c.flush()
                    except Exception:
                        answered = "closed"
                        break
                for ev in pump(c, 0.5):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        answered = dict(ev.headers)[":status"]
                    elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        answered = answered or type(ev).__name__
                    elif ev == "EOF" or isinstance(ev, Exception):
                        answered = answered or "closed"
        finally:
            c.close()
        if answered and answered.isdigit():
            assert answered == "401", answered
    took = time.monotonic() - t0
    assert answered is not None and took <= limit + 0.6, \
        f"unauthenticated {proto} request with a {how} body still held after {took:.1f} s " \
        "(no answer, not closed): the node reads the whole body before checking the key"
    assert n.alive()


def test_tls_inside_tls_and_plaintext_to_tls(node, pb):
    """A ClientHello sent as application data (TLS to the plaintext HTTP
    side, with and without ALPN h2) gets `400 bad request` and a close;
    plaintext HTTP/1.1 and the HTTP/2 preface sent to the TLS port get no
    HTTP answer and a clean close (FIN, no reset); the node serves on."""
    hello = client_hello()
    for alpn in (None, ["h2"], ["http/1.1"]):
        s = tls_connect(node, alpn=alpn)
        try:
            s.sendall(hello)
            data, closed = read_until_closed(s, T(5))
        finally:
            s.close()
        assert data.startswith(b"HTTP/1.1 400") and data.endswith(b"bad request\n"), (alpn, data)
        assert closed, f"TLS-in-TLS connection (ALPN {alpn}) left open"
    plain = [b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: " + node.key.encode()
             + b"\r\n\r\n",
             b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
             b"\x00" * 64, b"SSH-2.0-OpenSSH_9.2\r\n"]
    for payload in plain:
        s = socket.create_connection((node.connect_host, node.port), timeout=T(5))
        try:
            s.sendall(payload)
            s.settimeout(T(5))
            data, reset = b"", False
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                reset = True
        finally:
            s.close()
        assert b"HTTP/" not in data, (payload[:20], data)
        assert not reset, f"plaintext {payload[:20]!r} was answered with a TCP reset, not a FIN"
        if data:
            assert data[0] == 0x15, f"not a TLS alert: {data[:16]!r}"
    base_info_ok(node, pb, T(1))


def test_garbage_after_valid_request(node, pb):
    """HTTP/1.1: a valid request then garbage on the same connection → the
    200 answer, then `400 bad request` and a close. HTTP/2: a valid request,
    then bytes that are no frame → GOAWAY with an error and a close. gRPC:
    a valid GetBaseInfo then a garbage frame on the same connection → the
    call succeeds, then GOAWAY. A new client is served after each."""
    s = tls_connect(node, alpn=["http/1.1"])
    try:
        s.sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: " + node.key.encode()
                  + b"\r\n\r\n\xff\xfe\x00\x01 garbage \x7f\r\n\r\n")
        data, closed = read_until_closed(s, T(5))
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert data.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400" in data, data[-300:]
    assert data.endswith(b"bad request\n") and closed, data[-300:]
    base_info_ok(node, pb, T(1))

    import h2.events
    for what in ("rest", "grpc"):
        c = H2Conn(node)
        try:
            if what == "rest":
                r = c.request("GET", "/info", headers=[("x-api-key", node.key)])
                assert r["status"] == 200, r
            else:
                sid = c.conn.get_next_available_stream_id()
                c.conn.send_headers(sid, grpc_headers(SERVICE + "GetBaseInfo", node.key))
                c.conn.send_data(sid, grpc_msg(b""), end_stream=True)
                c.flush()
                evs = []
                deadline = time.monotonic() + T(5)
                while not any(isinstance(e, h2.events.StreamEnded) for e in evs) and \
                        time.monotonic() < deadline:
                    evs += pump(c, 0.2)
                trailers = [dict(e.headers) for e in evs
                            if isinstance(e, h2.events.TrailersReceived)]
                assert trailers and trailers[0].get("grpc-status") == "0", evs
            c.sock.sendall(b"\xff" * 64)
            evs = pump(c, T(5))
        finally:
            c.close()
        goaway = [e for e in evs if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway and goaway[0].error_code != 0, f"{what}: no GOAWAY with an error: {evs}"
        assert "EOF" in evs or any(isinstance(e, OSError) for e in evs), \
            f"{what}: connection not closed after the GOAWAY: {evs}"
        base_info_ok(node, pb, T(1))


# ---- HTTP/2 flow-control stall ----------------------------------------------------------------

def _stalled_h2(node, streams, window, key, big_conn_window):
    """A connection opening `streams` GetLogs streams, announcing an initial
    stream window of `window`, and never reading from its socket."""
    import h2.config
    import h2.connection
    import h2.settings
    sock = tls_connect(node, alpn=["h2"])
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding="utf-8"))
    conn.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
    conn.initiate_connection()
    if big_conn_window:
        conn.increment_flow_control_window(2 ** 31 - 1 - 65535)
    for _ in range(streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, grpc_headers(SERVICE + "GetLogs", key))
        conn.send_data(sid, grpc_msg(b""), end_stream=True)
    sock.sendall(conn.data_to_send())
    return sock


def _log_noise(port, count, seconds):
    """`count` TCP connections to a dokodemo-door inbound whose target is
    closed: the core logs several lines for each (debug level)."""
    deadline = time.monotonic() + seconds
    made = 0
    while made < count and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            pass
        made += 1
    return made


def test_h2_flow_control_stall_bounded_memory(pb, tmp_path):
    """The core logs hard (debug level, thousands of lines) while 60 GetLogs
    streams (of the 64 allowed) sit on HTTP/2 connections that never read:
    25 with an initial window of 0, 25 with huge windows on a connection
    whose socket is never read, plus 10 single-stream connections never read. The node's VmRSS
    grows by less than 64 MiB overall and does not grow with more log
    volume; a second client is served and a new log reader gets lines.
    Under ASan the allocator's quarantine is kept small for this node, or
    freed buffers would count as growth."""
    env = None
    if SANITIZE:
        env = {"ASAN_OPTIONS": (os.environ.get("ASAN_OPTIONS", "") +
                                ":quarantine_size_mb=4:thread_local_quarantine_size_kb=64")}
    wsite = Site(tmp_path, pb, env=env)
    try:
        _flow_control_stall(wsite, pb)
    finally:
        wsite.close()


def _flow_control_stall(wsite, pb):
    noise = free_port()
    cfg = wsite.config(loglevel="debug", extra_inbounds=[{
        "tag": "NOISE", "listen": "127.0.0.1", "port": noise, "protocol": "dokodemo-door",
        "settings": {"address": "127.0.0.1", "port": free_port(), "network": "tcp"}}])
    wsite.start(["f1"], config=cfg)
    pid = wsite.node.proc.pid
    _log_noise(noise, 4000, T(20))  # fill the ring (10000 lines) first
    time.sleep(1.5)
    rss0 = proc_status(pid, "VmRSS")
    socks = []
    try:
        # 60 of the 64 log streams the node allows (test_logs.py checks the cap)
        socks.append(_stalled_h2(wsite.node, 25, 0, wsite.node.key, False))
        socks.append(_stalled_h2(wsite.node, 25, 2 ** 31 - 1, wsite.node.key, True))
        for _ in range(10):
            socks.append(_stalled_h2(wsite.node, 1, 2 ** 31 - 1, wsite.node.key, True))
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        time.sleep(1.5)
        rss1 = proc_status(pid, "VmRSS")
        _log_noise(noise, 6000, T(20))  # the whole ring turns over again
        time.sleep(2)
        rss2 = proc_status(pid, "VmRSS")
        limit = 64 * MIB * MEM_SCALE
        print(f"flow-control stall: VmRSS {rss0 / MIB:.1f} -> {rss1 / MIB:.1f} (60 stalled "
              f"streams) -> {rss2 / MIB:.1f} MiB (more log volume)")
        assert rss2 - rss0 < limit, \
            f"VmRSS grew {(rss2 - rss0) / MIB:.1f} MiB with 60 stalled log streams " \
            f"({rss0 / MIB:.1f} -> {rss1 / MIB:.1f} -> {rss2 / MIB:.1f} MiB)"
        assert rss2 - rss1 < 16 * MIB * MEM_SCALE, \
            f"VmRSS grows with the log volume while streams stall: {rss1 / MIB:.1f} -> " \
            f"{rss2 / MIB:.1f} MiB"
        # a second client meanwhile
        base_info_ok(wsite.node, pb, T(1))
        got = []
        f = wsite.panel.client.channel.unary_stream(
            SERVICE + "GetLogs", request_serializer=lambda m: m, response_deserializer=bytes)
        it = f(b"", metadata=wsite.panel.client.metadata(), timeout=T(10))
        try:
            for m in it:
                got.append(m)
                if len(got) >= 1000:
                    break
        finally:
            it.cancel()
        assert len(got) >= 1000, f"a new log reader got {len(got)} lines"
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    assert wsite.node.alive(), wsite.node.describe()
    wsite.panel.backend_stats()
