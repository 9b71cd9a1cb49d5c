"""The Marzban /logs WebSocket (spec/marzban.md §4, §8, §13 cases 33 and
35-39) with the asyncio websockets client (10.4) as the panel's log viewer
uses it: the panel's client certificate, no server verification. Live lines
are v2ray's own access-log lines: each connection to a dokodemo-door
"poke" inbound writes one line naming the client's source port. A wrapper
core (pnmarzban.WrapperCore) prints extra stdout/stderr before exec'ing
the real v2ray where a test needs many or odd lines."""
import asyncio
import base64
import os
import signal
import socket
import time
import uuid

import pytest

from pncore import FileServer
from pnmarzban import (MzPanel, WrapperCore, finish_module_node, module_node,  # noqa: F401
                       mz_config, need_module, pki, poke, poke_inbound, raw_upgrade, ws_frames,
                       ws_open)
from pnnode import T, free_port

websockets = need_module("websockets")
need_module("websockets.exceptions")


class LogSite:
    def __init__(self, node, core, files):
        self.node, self.core, self.files = node, core, files
        self.poke_port = None
        self.panel = MzPanel(node)
        self.gen = 0

    def config(self, gen=None):
        self.poke_port = self.poke_port or free_port()
        cfg = mz_config({}, [], extra_inbounds=[poke_inbound("POKE", self.files.port,
                                                             self.poke_port)])
        cfg["x_generation"] = self.gen if gen is None else gen
        return cfg

    def ensure(self, fresh=False, **control):
        """Connected, core running; fresh (or control given): a new core
        generation with the wrapper's control applied."""
        self.core.control(**control)
        self.panel.connect()
        if fresh or control:
            self.gen += 1
        r = self.panel.restart(self.config())
        assert r.status_code == 200 and r.json()["started"], \
            f"{r.status_code} {r.text}\n" + self.node.describe()
        self.core.control()
        return self.panel.sid

    def poke(self):
        return poke(self.poke_port, self.files.port)


@pytest.fixture(scope="module")
def lg(pki, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mzlogs"))
    core = WrapperCore(os.path.join(d, "core"))
    files = FileServer(os.path.join(d, "www"), {"small": 100})
    n = module_node(tmp_path_factory, pki, "mzlogs", core=core.path)
    s = LogSite(n, core, files)
    yield s
    s.panel.close()
    files.close()
    finish_module_node(n)


def run(coro):
    return asyncio.run(coro)


async def in_thread(fn, *a):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *a)


def texts(frames):
    return [f for _, f in frames]


# ---- case 37: rejections before the upgrade ----------------------------------------------------

def test_rejections_are_http_case37(lg):
    sid = lg.ensure()
    status, headers, body, _ = raw_upgrade(lg.node, "")
    assert status == 500, (status, headers, body)
    status, headers, body, _ = raw_upgrade(lg.node, None)
    assert status == 500, (status, headers, body)
    for q in ("session_id=zzz", f"session_id={uuid.uuid4()}", f"session_id={sid}&interval=abc",
              f"session_id={sid}&interval=11", f"session_id={sid}&interval=10.5"):
        status, headers, body, eof = raw_upgrade(lg.node, q)
        assert status == 403, (q, status, headers, body)
        assert headers.get("content-length") == "0" and body == b"", (q, headers, body)
        assert headers.get("connection", "").lower() == "close", (q, headers)
        assert eof, f"{q}: connection not closed after the 403"
    for q in (f"session_id={sid}", f"session_id={sid}&interval=0", f"session_id={sid}&interval=",
              f"session_id={sid}&interval=10", f"session_id={sid}&interval=-1",
              f"session_id={sid.upper()}&interval=0.7"):
        status, headers, body, _ = raw_upgrade(lg.node, q)
        assert status == 101, (q, status, headers, body)
        assert headers.get("upgrade", "").lower() == "websocket", headers
        assert "sec-websocket-extensions" not in headers and \
            "sec-websocket-protocol" not in headers, headers
    # the client certificate is needed here too
    try:
        status = raw_upgrade(lg.node, f"session_id={sid}", cert=None)[0]
    except (OSError, IndexError, ValueError):
        status = None
    assert status != 101, "upgrade without a client certificate"


def test_websockets_client_sees_403_and_500(lg):
    lg.ensure()

    async def go():
        for q, want in (("session_id=zzz", 403), ("", 500)):
            with pytest.raises(websockets.exceptions.InvalidStatusCode) as ei:
                await ws_open(lg.node, q)
            assert ei.value.status_code == want, (q, ei.value)
    run(go())


# ---- case 36: one line per frame ---------------------------------------------------------------

def test_no_interval_one_line_per_frame_case36(lg):
    sid = lg.ensure(fresh=True, stdout_lines=3, prefix="plain-")

    async def go():
        ws = await ws_open(lg.node, f"session_id={sid}")
        try:
            backlog = texts(await ws_frames(ws, 0.5))
            assert all("\n" not in f for f in backlog), backlog
            for i in (1, 2, 3):
                assert f"plain-{i:04d}" in backlog, backlog
            assert any(("V2Ray 4.34.0 started" in f) for f in backlog), backlog
            idx = [backlog.index(f"plain-{i:04d}") for i in (1, 2, 3)]
            assert idx == sorted(idx) and idx[2] - idx[0] == 2, backlog
            t0 = time.monotonic()
            marker = await in_thread(lg.poke)
            live = await ws_frames(ws, T(2), until=lambda fr: any(marker in f for _, f in fr))
            hit = [(t, f) for t, f in live if marker in f]
            assert hit, f"live line {marker!r} never came: {texts(live)}"
            assert "\n" not in hit[0][1] and hit[0][1] == hit[0][1].strip(), hit
            assert hit[0][0] - t0 < T(0.5), f"live line after {hit[0][0] - t0:.3f} s"
        finally:
            await ws.close()
    run(go())


def test_lines_stripped_and_valid_utf8(lg):
    raw = b"  padded line \t\r\nbad-\xff\xfe-bytes\n\n"
    sid = lg.ensure(fresh=True, stdout_raw_b64=base64.b64encode(raw).decode())

    async def go():
        ws = await ws_open(lg.node, f"session_id={sid}")
        try:
            backlog = texts(await ws_frames(ws, 0.5))
        finally:
            await ws.close()
        padded = [f for f in backlog if "padded line" in f]
        assert padded == ["padded line"], f"lines must be stripped on both sides: {padded}"
        i = backlog.index(padded[0])
        bad = backlog[i + 1]
        assert bad.startswith("bad-") and bad.endswith("-bytes") and "\ufffd" in bad, backlog
        assert backlog[i + 2] == "", f"an empty line is kept as an empty frame: {backlog}"
    run(go())


def test_long_line_split(lg):
    line = "L" * (100 << 10)
    sid = lg.ensure(fresh=True, stdout_raw_b64=base64.b64encode(
        b"before-long\n" + line.encode() + b"\nafter-long\n").decode())

    async def go():
        ws = await ws_open(lg.node, f"session_id={sid}")
        try:
            return texts(await ws_frames(ws, 0.5))
        finally:
            await ws.close()
    backlog = run(go())
    i, j = backlog.index("before-long"), backlog.index("after-long")
    parts = backlog[i + 1:j]
    assert len(parts) >= 2 and all(len(x.encode()) <= 64 << 10 for x in parts), \
        [len(x) for x in parts]
    assert "".join(parts) == line


# ---- case 35: with interval --------------------------------------------------------------------

def test_interval_frames_case35(lg):
    sid = lg.ensure(fresh=True, stdout_lines=5, prefix="iv-")

    async def go():
        t_open0 = time.monotonic()
        ws = await ws_open(lg.node, f"session_id={sid}&interval=0.7")
        t_open = time.monotonic()
        pokes = []

        async def poker():
            for delay in (1.1, 0.4, 1.0):
                await asyncio.sleep(delay)
                t = time.monotonic()
                pokes.append((t, await in_thread(lg.poke)))
        task = asyncio.ensure_future(poker())
        try:
            frames = await ws_frames(ws, 4.2)
        finally:
            await task
            await ws.close()
        return t_open0, t_open, frames, pokes
    t_open0, t_open, frames, pokes = run(go())
    assert frames, "no frames"
    assert frames[0][0] - t_open < T(0.1), f"first frame after {frames[0][0] - t_open:.3f} s"
    for t, f in frames:
        assert f and f.endswith("\n"), f"frame not newline-terminated: {f!r}"
    gaps = [b[0] - a[0] for a, b in zip(frames, frames[1:])]
    assert all(g >= 0.65 for g in gaps), f"frames closer than 0.7 s: {gaps}"
    lines = [x for _, f in frames for x in f[:-1].split("\n")]
    assert [x for x in lines if x.startswith("iv-")] == [f"iv-{i:04d}" for i in range(1, 6)], \
        lines
    for t_poke, marker in pokes:
        got = [(t, f) for t, f in frames if marker in f and t >= t_poke]
        assert got, f"live line {marker!r} not received: {[f for _, f in frames]}"
        assert got[0][0] - t_poke <= T(1.0), f"latency {got[0][0] - t_poke:.3f} s for {marker}"
        assert len(got) == 1 and got[0][1].count(marker) == 1, got


# ---- a burst larger than the backlog reaches every subscriber --------------------------------------

def test_burst_reaches_every_subscriber(lg):
    """3000 lines arriving in one read of the core's output (far more than
    the 100-line backlog) reach every subscriber, each line once and in
    order: two without interval, one with the panel's interval=0.7."""
    sid = lg.ensure(fresh=True)
    prefix = f"burst-{uuid.uuid4().hex[:8]}-"
    want = [f"{prefix}{i:04d}" for i in range(1, 3001)]
    queries = [f"session_id={sid}", f"session_id={sid}", f"session_id={sid}&interval=0.7"]

    def lines_of(i, frames):
        if i < 2:
            return [f for _, f in frames]
        return [x for _, f in frames for x in f[:-1].split("\n")]

    async def go():
        subs = [await ws_open(lg.node, q) for q in queries]
        got = [[] for _ in subs]
        stop = asyncio.Event()

        async def reader(i):
            while not stop.is_set():
                got[i].extend(await ws_frames(subs[i], 0.2))
        tasks = [asyncio.ensure_future(reader(i)) for i in range(len(subs))]
        await asyncio.sleep(0.3)
        lg.core.control(stdout_lines=3000, prefix=prefix)
        lg.gen += 1
        r = await in_thread(lg.panel.restart, lg.config())
        lg.core.control()
        assert r.status_code == 200 and r.json()["started"], r.text
        deadline = time.monotonic() + T(10)
        while time.monotonic() < deadline and \
                not all(want[-1] in lines_of(i, g) for i, g in enumerate(got)):
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        for ws in subs:
            await ws.close()
        return got
    got = run(go())
    for i, frames in enumerate(got):
        burst = [x for x in lines_of(i, frames) if x.startswith(prefix)]
        missing = sorted(set(want) - set(burst))
        assert burst == want, f"subscriber {i} ({queries[i]}): {len(burst)} burst lines, " \
            f"{len(missing)} missing (first {missing[:3]})"


# ---- case 38: backlog = the last 100 lines -----------------------------------------------------

def test_backlog_is_last_100_case38(lg):
    sid = lg.ensure(fresh=True)

    async def go():
        a = await ws_open(lg.node, f"session_id={sid}")
        af = []
        stop = asyncio.Event()

        async def reader():
            while not stop.is_set():
                af.extend(await ws_frames(a, 0.2))
        rtask = asyncio.ensure_future(reader())
        await asyncio.sleep(0.3)

        def pokes():
            out = []
            for _ in range(150):
                out.append(lg.poke())
                time.sleep(0.003)
            return out
        n0 = len(af)  # the backlog (older lines, maybe with reused ports) came by now
        markers = await in_thread(pokes)
        assert len(set(markers)) == len(markers), "a source port was reused"
        deadline = time.monotonic() + T(3)
        while not any(markers[-1] in f for _, f in af) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        n_a = len(af)
        b = await ws_open(lg.node, f"session_id={sid}")
        bf = texts(await ws_frames(b, 0.6))
        stop.set()
        await rtask
        await a.close()
        await b.close()
        return markers, texts(af), n_a, bf, n0
    markers, af, n_a, bf, n0 = run(go())
    for m in markers:
        assert sum(m in f for f in af[n0:]) == 1, f"reader A missed or doubled {m}"
    assert len(bf) >= 100, f"new subscriber got {len(bf)} frames"
    match = [k for k in range(max(n_a, 100), len(af) + 1) if af[k - 100:k] == bf[:100]]
    assert match, "the new subscriber's first 100 lines are not the last 100 lines:\n" \
        f"B[:5]={bf[:5]}\nA[n-100:n-95]={af[n_a - 100:n_a - 95]}"
    k = match[0]
    assert bf[100:] == af[k:k + len(bf) - 100], "live lines after the backlog differ"
    backlog = bf[:100]
    assert any(markers[-1] in f for f in backlog)
    assert not any(m in f for m in markers[:50] for f in backlog), "older lines in the backlog"


# ---- case 39: session change ends the stream ----------------------------------------------------

@pytest.mark.parametrize("how", ["connect", "disconnect"])
def test_session_change_closes_1000_case39(lg, how):
    sid = lg.ensure()

    async def go():
        ws = await ws_open(lg.node, f"session_id={sid}&interval=0.7")
        await ws_frames(ws, 0.3)
        other = MzPanel(lg.node, name="other")
        other.read_cert()
        other.http()
        fn = other.connect if how == "connect" else \
            (lambda: other.post("/disconnect", body=None, timeout=T(3)))
        r = await in_thread(fn)
        t_resp = time.monotonic()
        assert r.status_code == 200
        t_close = None
        try:
            while True:
                await asyncio.wait_for(ws.recv(), T(2))
        except websockets.exceptions.ConnectionClosed:
            t_close = time.monotonic()
        except asyncio.TimeoutError:
            pass
        other.close()
        return ws.close_code, t_resp, t_close
    code, t_resp, t_close = run(go())
    assert t_close is not None, f"stream still open 2 s after /{how}"
    assert code == 1000, f"close code {code}"
    assert t_close - t_resp <= T(0.3), f"closed {t_close - t_resp:.3f} s after /{how}"


def test_core_crash_closes_stream_and_session(lg):
    sid = lg.ensure()
    pid = lg.node.one_core()

    async def go():
        ws = await ws_open(lg.node, f"session_id={sid}")
        await ws_frames(ws, 0.3)
        os.kill(pid, signal.SIGKILL)
        try:
            while True:
                await asyncio.wait_for(ws.recv(), T(3))
        except websockets.exceptions.ConnectionClosed:
            return ws.close_code
        except asyncio.TimeoutError:
            return None
    assert run(go()) == 1000
    lg.node.one_core(timeout=T(2), other_than=pid)
    assert lg.panel.ping().status_code == 403
    status = raw_upgrade(lg.node, f"session_id={sid}")[0]
    assert status == 403


# ---- case 33: a chatty stderr ------------------------------------------------------------------

def test_stderr_flood_does_not_stall_case33(lg):
    t0 = time.monotonic()
    sid = lg.ensure(fresh=True, stderr_bytes=10 << 20)
    took = time.monotonic() - t0
    assert took < T(10), f"/restart with 10 MB on stderr took {took:.1f} s"
    assert lg.node.alive()

    async def go():
        ws = await ws_open(lg.node, f"session_id={sid}")
        try:
            return texts(await ws_frames(ws, 0.5))
        finally:
            await ws.close()
    backlog = run(go())
    assert len(backlog) == 100, len(backlog)
    assert "stderr-flood-end" in backlog, backlog[-10:]
    flood = [f for f in backlog if f.startswith("stderr-flood-")]
    assert len(flood) > 50, backlog[:5]
    i = backlog.index("stderr-flood-end")
    assert any("V2Ray 4.34.0 started" in f for f in backlog[i:]), backlog[i:]
    # still responsive
    r = lg.panel.ping()
    assert r.status_code == 200, r.text
    socket.create_connection(("127.0.0.1", lg.poke_port), timeout=T(2)).close()
