"""Core log streaming (spec/pasarguard.md §6.4, §13, §17 #6, §18 cases 35-36;
DESIGN "Every log reader gets every line"): two concurrent REST /logs
readers each get every line, as line + "\\n" with no SSE framing; cancelling
one gRPC GetLogs stream does not affect the others. The lines are the real
v2ray access-log lines of real traffic."""
import socket
import ssl
import threading
import time

import grpc
import pytest

from pnclient import tls_connect
from pncore import VLESS, Site, download_ok, make_user, wait_for
from pnnode import T


@pytest.fixture(scope="module")
def site(pb, tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("logs"), pb)
    s.start(["1", "2"])
    yield s
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


class RestReader:
    """GET /logs over HTTP/1.1 on a raw TLS socket, read in a thread with a
    short poll so the test can stop it (closing a requests stream from
    another thread blocks on the SSL object while the reader is in read)."""

    def __init__(self, site):
        self.sock = tls_connect(site.node)
        self.sock.sendall(f"GET /logs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"x-api-key: {site.node.key}\r\n\r\n".encode())
        self.buf = b""
        self.eof = False
        self.stop = threading.Event()
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        wait_for(lambda: b"\r\n\r\n" in self.buf or self.eof, T(10), "the /logs headers")
        head = self.buf.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
        self.status = int(head[0].split()[1])
        self.headers = {k.strip().lower(): v.strip()
                        for k, v in (h.split(":", 1) for h in head[1:] if ":" in h)}

    def run(self):
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except OSError:
                break
            if not data:
                break
            self.buf += data
        self.eof = True

    @property
    def raw(self):
        """The de-chunked body received so far."""
        rest = self.buf.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.buf else b""
        out = b""
        while True:
            i = rest.find(b"\r\n")
            if i < 0:
                return out
            n = int(rest[:i].split(b";")[0], 16)
            if n == 0 or len(rest) < i + 2 + n + 2:
                return out
            out += rest[i + 2:i + 2 + n]
            assert rest[i + 2 + n:i + 4 + n] == b"\r\n", "bad chunk framing"
            rest = rest[i + 4 + n:]

    def lines(self):
        return self.raw.decode(errors="replace").split("\n")

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


class GrpcReader:
    def __init__(self, site):
        pb = site.pb
        f = site.panel.client.channel.unary_stream(
            "/service.NodeService/GetLogs", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.Log.FromString)
        self.call = f(pb.Empty(), metadata=site.panel.client.metadata())
        self.lines = []
        self.code = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            for m in self.call:
                self.lines.append(m.detail)
        except grpc.RpcError as e:
            self.code = e.code()

    def cancel(self):
        self.call.cancel()


def traffic(site, pb, emails):
    """Adds the users and downloads once as each: one access line per user."""
    site.panel.sync_user(*[make_user(pb, e, inbounds=[VLESS]) for e in emails])
    c = site.client({e: (VLESS, e) for e in emails})
    for e in emails:
        download_ok(c.socks[e], site.url(), site.size(), f"user {e}")
    c.close()


def access_lines(lines, emails):
    return [ln for ln in lines if "accepted" in ln and any(ln.endswith(f"email: {e}")
                                                           for e in emails)]


def test_two_rest_readers_get_every_line(site, pb):
    """Case 35: two concurrent /logs readers each get every line, each line
    followed by "\\n", no `data:`, no blank separators."""
    a = RestReader(site)
    b = RestReader(site)
    try:
        for r in (a, b):
            assert r.status == 200, r.buf[:500]
            assert r.headers["content-type"].startswith("text/event-stream"), r.headers
            assert r.headers.get("cache-control") == "no-cache", r.headers
            assert r.headers.get("transfer-encoding") == "chunked", r.headers
        emails = ["la1", "la2", "la3"]
        traffic(site, pb, emails)
        for r in (a, b):
            wait_for(lambda: len(access_lines(r.lines(), emails)) >= 3, T(10),
                     "three access lines on a /logs reader")
        time.sleep(0.3)
        la, lb = access_lines(a.lines(), emails), access_lines(b.lines(), emails)
        assert la == lb, f"the readers got different lines:\n{la}\n{lb}"
        assert sorted(ln.rsplit(" ", 1)[1] for ln in la) == emails, la
        for r in (a, b):
            text = r.raw.decode(errors="replace")
            assert "data:" not in text and "\n\n" not in text and "\r" not in text, text[-2000:]
            assert text.endswith("\n"), text[-200:]
            # the readers also saw the core's start-up lines (the backlog)
            assert "started" in text, text[:2000]
        # the stream keeps going: a later line reaches both
        traffic(site, pb, ["la4"])
        for r in (a, b):
            wait_for(lambda: access_lines(r.lines(), ["la4"]), T(10), "a later line")
    finally:
        a.close()
        b.close()
    site.panel.backend_stats()


def test_cancel_one_grpc_stream(site, pb):
    """Case 36: cancelling one GetLogs stream leaves the others (gRPC and
    REST) receiving every new line."""
    x = GrpcReader(site)
    y = GrpcReader(site)
    z = RestReader(site)
    try:
        wait_for(lambda: x.lines and y.lines, T(10), "the backlog on both gRPC streams")
        x.cancel()
        x.thread.join(T(5))
        assert x.code == grpc.StatusCode.CANCELLED, x.code
        emails = ["lm1", "lm2"]
        traffic(site, pb, emails)
        wait_for(lambda: len(access_lines(y.lines, emails)) == 2, T(10),
                 "the remaining gRPC stream to get both lines")
        wait_for(lambda: len(access_lines(z.lines(), emails)) == 2, T(10),
                 "the REST reader to get both lines")
        assert access_lines(y.lines, emails) == access_lines(z.lines(), emails)
        assert all(not ln.endswith("\n") for ln in y.lines), "Log.detail carries a newline"
        assert y.code is None, y.code
        # a new stream after the cancel works as well
        w = GrpcReader(site)
        try:
            traffic(site, pb, ["lm3"])
            wait_for(lambda: access_lines(w.lines, ["lm3"]) and access_lines(y.lines, ["lm3"]),
                     T(10), "the new line on the new and the old stream")
        finally:
            w.cancel()
    finally:
        y.cancel()
        z.close()
    site.panel.backend_stats()


def test_log_streams_are_capped(site, pb):
    """At most 64 log streams are open node-wide (each may hold ~320 KiB for
    a reader that stops reading): the 65th GetLogs gets RESOURCE_EXHAUSTED,
    a 65th GET /logs 503, both with `too many log streams (64 open)`; once
    one closes a new stream is accepted, and other calls go on meanwhile."""
    readers = [GrpcReader(site) for _ in range(64)]
    try:
        wait_for(lambda: all(r.lines for r in readers), T(15), "64 streams with their backlog")
        extra = GrpcReader(site)
        extra.thread.join(T(10))
        assert extra.code == grpc.StatusCode.RESOURCE_EXHAUSTED, extra.code
        assert extra.call.details() == "too many log streams (64 open)", extra.call.details()
        rest = RestReader(site)
        try:
            wait_for(lambda: rest.eof or b"\r\n0\r\n" in rest.buf or
                     rest.buf.endswith(b"open)\n"), T(10), "the REST refusal")
            assert rest.status == 503, rest.buf
            assert rest.buf.endswith(b"too many log streams (64 open)\n"), rest.buf
        finally:
            rest.close()
        site.panel.backend_stats()
        readers.pop().cancel()
        again = GrpcReader(site)
        readers.append(again)
        wait_for(lambda: again.lines, T(10), "a new stream once one closed")
        assert again.code is None, again.code
    finally:
        for r in readers:
            r.cancel()
        for r in readers:
            r.thread.join(T(5))
