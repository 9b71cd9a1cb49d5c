"""One TLS port, every client (spec §2, §18 cases 1-4, 9): gRPC with ALPN h2,
the Python REST client's "offer h2, speak HTTP/1.1", clients without ALPN,
curl over HTTP/2 and HTTP/1.1, concurrency, size limits and bad clients."""
import concurrent.futures
import socket
import ssl
import subprocess
import time

import grpc
import pytest

from pnclient import (H2Conn, app_data_ready, assert_silent, assert_text_error, grpc_error, http1_request,
                      read_response, read_until_closed, tls_connect)
from pnnode import MAX_MESSAGE, NODE_VERSION, T, V2RAY_VERSION, need_module, need_tool


def check_base_info(pb, raw_or_msg, core_version=V2RAY_VERSION):
    if isinstance(raw_or_msg, (bytes, bytearray)):
        m = pb.BaseInfoResponse.FromString(bytes(raw_or_msg))
    else:
        m = raw_or_msg
    assert (m.started, m.core_version, m.node_version) == (False, core_version, NODE_VERSION), m
    assert (m.session_id, m.extra) == ("", ""), m


# ---- case 1 and 9: GetBaseInfo over gRPC and GET /info over HTTP/1.1 ---------------------------

def test_grpc_get_base_info(node, pb):
    with node.grpc() as c:
        r = c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse)
    check_base_info(pb, r)


def test_rest_info_http11_with_requests(node, pb):
    requests = need_module("requests")
    with node.session() as s:
        r = s.get(node.url + "/info", timeout=T(10))
    assert r.status_code == 200, (r.status_code, r.content)
    assert r.raw.version == 11
    assert r.headers.get("Content-Type") == "application/x-protobuf", dict(r.headers)
    check_base_info(pb, r.content)
    assert requests  # the module is the client under test


def test_info_without_core_binary(make_node, pb):
    """XRAY_EXECUTABLE_PATH pointing to a missing file: core_version ""."""
    n = make_node(core="/nonexistent/dir/xray")
    with n.grpc() as c:
        check_base_info(pb, c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse), "")
    with n.session() as s:
        r = s.get(n.url + "/info", timeout=T(10))
    assert r.status_code == 200, (r.status_code, r.content)
    check_base_info(pb, r.content, "")


# ---- case 2 and 3: ALPN h2 but HTTP/1.1; no ALPN ------------------------------------------------

def test_alpn_h2_only_client_speaking_http11(node, pb):
    """The Python REST client: offers only h2, speaks HTTP/1.1. The node
    selects h2, writes nothing first, and answers HTTP/1.1."""
    s = tls_connect(node, alpn=["h2"])
    try:
        assert s.selected_alpn_protocol() == "h2"
        assert_silent(s, 0.3)
        r = http1_request(s, "GET", "/info", {"x-api-key": node.key})
        assert r.version == 11 and r.status == 200, (r.version, r.status, r.data)
        assert r.getheader("Content-Type") == "application/x-protobuf", r.getheaders()
        assert int(r.getheader("Content-Length")) == len(r.data)
        check_base_info(pb, r.data)
        # keep-alive: a second request on the same connection
        r = http1_request(s, "GET", "/info", {"x-api-key": node.key.upper()})
        assert r.status == 200, (r.status, r.data)
        check_base_info(pb, r.data)
    finally:
        s.close()


def test_no_alpn_client_uses_http11(node, pb):
    s = tls_connect(node, alpn=None)
    try:
        assert s.selected_alpn_protocol() is None
        assert_silent(s, 0.3)
        r = http1_request(s, "GET", "/info", {"x-api-key": node.key})
        assert r.version == 11 and r.status == 200, (r.status, r.data)
        check_base_info(pb, r.data)
    finally:
        s.close()


def test_alpn_http11_only_selected(node, pb):
    s = tls_connect(node, alpn=["http/1.1"])
    try:
        assert s.selected_alpn_protocol() == "http/1.1"
        r = http1_request(s, "GET", "/info", {"x-api-key": node.key})
        assert r.status == 200, (r.status, r.data)
        check_base_info(pb, r.data)
    finally:
        s.close()


def test_alpn_prefers_h2(node):
    s = tls_connect(node, alpn=["http/1.1", "h2"])
    try:
        assert s.selected_alpn_protocol() == "h2"
    finally:
        s.close()


# ---- case 4: curl over HTTP/2 and HTTP/1.1 -----------------------------------------------------

def curl(node, tmp_path, *args, path="/info", key="own"):
    exe = need_tool("curl")
    body = tmp_path / "body.bin"
    hdrs = tmp_path / "headers.txt"
    cmd = [exe, "-sS", "--noproxy", "*", "--cacert", node.cert, "-o", str(body), "-D", str(hdrs),
           "-w", "%{http_version} %{http_code}", "--max-time", str(T(10))]
    if key == "own":
        key = node.key
    if key is not None:
        cmd += ["-H", f"x-api-key: {key}"]
    cmd += list(args) + [node.url + path]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=T(20))
    assert p.returncode == 0, f"curl failed ({p.returncode}): {p.stderr}"
    version, code = p.stdout.split()
    headers = {}
    for line in hdrs.read_text(errors="replace").splitlines()[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return version, int(code), headers, body.read_bytes()


@pytest.mark.parametrize("flag,want", [("--http2", "2"), ("--http1.1", "1.1")])
def test_curl_info(node, pb, tmp_path, flag, want):
    version, code, headers, body = curl(node, tmp_path, flag)
    assert (version, code) == (want, 200), (version, code, body)
    assert headers.get("content-type") == "application/x-protobuf", headers
    assert "grpc-status" not in headers, headers
    check_base_info(pb, body)


@pytest.mark.parametrize("flag,want", [("--http2", "2"), ("--http1.1", "1.1")])
def test_curl_errors_are_rest_errors(node, tmp_path, flag, want):
    version, code, headers, body = curl(node, tmp_path, flag, key=None)
    assert (version, code, body) == (want, 401, b"missing x-api-key header\n")
    assert headers.get("content-type") == "text/plain; charset=utf-8", headers
    assert headers.get("x-content-type-options") == "nosniff", headers
    version, code, headers, body = curl(node, tmp_path, flag, path="/no/such/route")
    assert (version, code, body) == (want, 404, b"404 page not found\n")
    version, code, headers, body = curl(node, tmp_path, flag, "-X", "PUT",
                                        "-H", "Content-Type: application/x-protobuf",
                                        "--data-binary", "", path="/stats/backend")
    assert (version, code, body) == (want, 405, b"")


def test_rest_over_h2_with_protobuf_body(node, pb):
    """REST over HTTP/2 (python-h2): not gRPC even with a protobuf body; a
    gRPC content-type on the same connection goes to gRPC."""
    c = H2Conn(node)
    try:
        r = c.request("GET", "/info", [("x-api-key", node.key),
                                       ("content-type", "application/x-protobuf")],
                      body=b"")
        assert r["status"] == 200, r
        assert r["headers"].get("content-type") == "application/x-protobuf", r
        assert "grpc-status" not in r["headers"] and not r["trailers"], r
        check_base_info(pb, r["body"])
        # a guarded route with a body, over h2
        body = pb.StatRequest(name="x", reset=True, type=pb.UsersStat).SerializeToString()
        r = c.request("GET", "/stats", [("x-api-key", node.key),
                                        ("content-type", "application/x-protobuf")], body=body)
        assert (r["status"], r["body"]) == (500, b"backend not initialized\n"), r
        # gRPC framing on the same connection
        r = c.request("POST", "/service.NodeService/GetBaseInfo",
                      [("content-type", "application/grpc"), ("te", "trailers"),
                       ("x-api-key", node.key)], body=b"\x00\x00\x00\x00\x00")
        assert r["status"] == 200, r
        assert r["headers"].get("content-type", "").startswith("application/grpc"), r
        status = r["trailers"].get("grpc-status", r["headers"].get("grpc-status"))
        assert status == "0", r
        assert r["body"][:1] == b"\x00"
        n = int.from_bytes(r["body"][1:5], "big")
        check_base_info(pb, r["body"][5:5 + n])
    finally:
        c.close()


# ---- case: 100 concurrent calls on one channel -------------------------------------------------

def test_100_concurrent_grpc_calls_one_channel(node, pb):
    with node.grpc() as c:
        futs = [c.unary_future("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse)
                for _ in range(100)]
        results = [f.result(timeout=T(30)) for f in futs]
    assert len(results) == 100
    for r in results:
        check_base_info(pb, r)


def test_concurrent_rest_clients(node, pb):
    def one(_):
        with node.session() as s:
            r = s.get(node.url + "/info", timeout=T(10))
            return r.status_code, r.content

    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        results = list(ex.map(one, range(40)))
    for code, body in results:
        assert code == 200, (code, body)
        check_base_info(pb, body)


# ---- size limits ----------------------------------------------------------------------------------

def send_big_body(s, head, total, chunked=False, chunk=1 << 20):
    """Sends the request head, then the body in pieces, stopping as soon as
    the node answers (or stops reading). Returns (body bytes sent, bytes of
    the answer already read)."""
    s.sendall(head)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        got = app_data_ready(s)
        if got:
            return 0, got
        time.sleep(0.02)
    sent = 0
    s.settimeout(T(5))
    piece = b"\x0a" * chunk
    try:
        while sent < total:
            n = min(chunk, total - sent)
            data = piece[:n]
            if chunked:
                data = f"{n:x}\r\n".encode() + data + b"\r\n"
            s.sendall(data)
            sent += n
            got = app_data_ready(s)
            if got:
                return sent, got
        if chunked:
            s.sendall(b"0\r\n\r\n")
    except (socket.timeout, TimeoutError, BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass
    return sent, b""


def read_big_answer(s, method, got):
    s.settimeout(T(20))
    if got == b"\0EOF":
        raise AssertionError("the node closed the connection without an answer")
    return read_response(s, method, prefix=got)


def test_rest_body_over_64mib_content_length(node):
    s = tls_connect(node, alpn=["h2"])
    try:
        head = (f"PUT /users/sync HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {node.key}\r\n"
                f"Content-Type: application/x-protobuf\r\n"
                f"Content-Length: {MAX_MESSAGE + 1}\r\n\r\n").encode()
        sent, got = send_big_body(s, head, MAX_MESSAGE + 1)
        r = read_big_answer(s, "PUT", got)
        assert_text_error(r, 413, "request body too large")
    finally:
        s.close()
    assert node.alive()


def test_rest_body_over_64mib_chunked(node):
    s = tls_connect(node, alpn=None)
    try:
        head = (f"PUT /users/sync HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {node.key}\r\n"
                f"Transfer-Encoding: chunked\r\n\r\n").encode()
        sent, got = send_big_body(s, head, MAX_MESSAGE + (1 << 20), chunked=True)
        r = read_big_answer(s, "PUT", got)
        assert_text_error(r, 413, "request body too large")
    finally:
        s.close()
    assert node.alive()


def test_rest_body_of_exactly_64mib_is_accepted(node):
    """The limit is inclusive: 64 MiB reaches the route (its guard answers)."""
    s = tls_connect(node, alpn=None)
    try:
        head = (f"PUT /users/sync HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {node.key}\r\n"
                f"Content-Length: {MAX_MESSAGE}\r\n\r\n").encode()
        sent, got = send_big_body(s, head, MAX_MESSAGE)
        r = read_big_answer(s, "PUT", got)
        assert sent == MAX_MESSAGE, f"node answered after {sent} bytes: {r.status} {r.data!r}"
        assert_text_error(r, 500, "backend not initialized")
    finally:
        s.close()


def test_rest_body_over_64mib_over_h2(node):
    """REST over HTTP/2 has the same limit: 413 (the stream may then be reset,
    the connection stays usable)."""
    c = H2Conn(node, timeout=T(20))
    try:
        r = c.request("PUT", "/users/sync", [("x-api-key", node.key),
                                             ("content-type", "application/x-protobuf")],
                      body=b"\x0a" * (MAX_MESSAGE + 1), timeout=T(20))
        assert (r["status"], r["body"]) == (413, b"request body too large\n"), \
            {k: v for k, v in r.items() if k != "body"} | {"body": r["body"][:200]}
        assert r["headers"].get("content-type") == "text/plain; charset=utf-8", r["headers"]
        r = c.request("GET", "/info", [("x-api-key", node.key)])
        assert r["status"] == 200, r
    finally:
        c.close()


def test_grpc_message_over_64mib(node, pb):
    payload = b"\x00" * (MAX_MESSAGE + 1)
    with node.grpc(options=[("grpc.max_send_message_length", -1),
                            ("grpc.max_receive_message_length", -1)]) as c:
        code, details = grpc_error(c.unary, "GetBaseInfo", payload, timeout=T(30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert details == (f"grpc: received message larger than max "
                           f"({MAX_MESSAGE + 1} vs. {MAX_MESSAGE})"), details
        # the connection and the node still work
        check_base_info(pb, c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse))


def test_grpc_message_of_exactly_64mib_is_accepted(node, pb):
    """An Empty carrying one unknown 64 MiB field: skipped, the call answers."""
    n = MAX_MESSAGE - 1 - 4  # tag byte + 4-byte varint length
    length = bytes([(n & 0x7f) | 0x80, ((n >> 7) & 0x7f) | 0x80, ((n >> 14) & 0x7f) | 0x80,
                    (n >> 21) & 0x7f])
    payload = b"\x7a" + length + b"a" * n  # field 15, wire type 2
    assert len(payload) == MAX_MESSAGE
    assert pb.Empty.FromString(payload) is not None
    with node.grpc(options=[("grpc.max_send_message_length", -1)]) as c:
        r = c.unary("GetBaseInfo", payload, pb.BaseInfoResponse, timeout=T(30))
    check_base_info(pb, r)


def test_header_over_64kib(node, pb):
    s = tls_connect(node, alpn=None)
    try:
        r = http1_request(s, "GET", "/info", {"x-api-key": node.key, "X-Big": "a" * 70000})
        assert_text_error(r, 431, "request header fields too large")
    finally:
        s.close()
    # a large but allowed header block is fine
    s = tls_connect(node, alpn=None)
    try:
        r = http1_request(s, "GET", "/info", {"x-api-key": node.key, "X-Big": "a" * 30000})
        assert r.status == 200, (r.status, r.data)
        check_base_info(pb, r.data)
    finally:
        s.close()


# ---- robustness ------------------------------------------------------------------------------------

def assert_open(sock):
    """The peer has neither written nor closed."""
    sock.setblocking(False)
    try:
        data = sock.recv(1)
        raise AssertionError(f"connection got {data!r} (b'' = closed)")
    except (ssl.SSLWantReadError, BlockingIOError):
        pass
    finally:
        sock.setblocking(True)


def test_bad_clients_do_not_block_real_clients(node, pb):
    socks = []
    try:
        # half a request line, then silence
        stall = tls_connect(node, alpn=["h2"])
        stall.sendall(b"GET /inf")
        socks.append(stall)
        # TCP only, never starts TLS
        pre_tls = socket.create_connection((node.connect_host, node.port), timeout=T(5))
        socks.append(pre_tls)
        # a plaintext HTTP client on the TLS port
        plain = socket.create_connection((node.connect_host, node.port), timeout=T(5))
        plain.sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: " +
                      node.key.encode() + b"\r\n\r\n")
        socks.append(plain)
        # garbage after TLS, with and without ALPN h2
        garbage = []
        for alpn in (None, ["h2"]):
            g = tls_connect(node, alpn=alpn)
            g.sendall(b"\xff\xfe\x00\x01 garbage \x7f\r\n\r\n")
            garbage.append(g)
            socks.append(g)

        # a real client meanwhile
        t0 = time.monotonic()
        with node.session() as s, node.grpc() as c:
            for _ in range(10):
                r = s.get(node.url + "/info", timeout=T(3))
                assert r.status_code == 200, (r.status_code, r.content)
                check_base_info(pb, r.content)
                check_base_info(pb, c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse,
                                            timeout=T(3)))
        assert time.monotonic() - t0 < T(5)

        for g in garbage:
            data, closed = read_until_closed(g, T(5))
            assert data.startswith(b"HTTP/1.1 400"), data
            assert b"bad request" in data.lower(), data
            assert closed, f"connection not closed after the 400: {data!r}"
        data, closed = read_until_closed(plain, T(5))
        assert closed, f"plaintext client not disconnected: {data!r}"
        assert b"HTTP/1.1 200" not in data, data
        assert_open(stall)
    finally:
        for s in socks:
            s.close()
    assert node.alive(), node.describe()
    with node.session() as s:
        r = s.get(node.url + "/info", timeout=T(5))
        assert r.status_code == 200


def test_stalled_clients_are_closed_after_10s(node, pb):
    """DESIGN: 10 s per header block; the TLS handshake has the same bound."""
    stall = tls_connect(node, alpn=None)
    pre_tls = socket.create_connection((node.connect_host, node.port), timeout=T(5))
    t0 = time.monotonic()
    try:
        stall.sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(1)
        assert_open(stall)
        pre_tls.setblocking(False)
        try:
            assert pre_tls.recv(1) != b"", "pre-TLS connection closed at once"
        except BlockingIOError:
            pass
        pre_tls.setblocking(True)
        # the node keeps serving meanwhile
        with node.grpc() as c:
            check_base_info(pb, c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse))
        limit = 10 + T(4)
        data, closed = read_until_closed(stall, t0 + limit - time.monotonic())
        took = time.monotonic() - t0
        assert closed, f"stalled request still open after {took:.1f} s"
        assert took >= 8, f"closed after only {took:.1f} s"
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
        data, closed = read_until_closed(pre_tls, max(0.5, t0 + limit - time.monotonic()))
        assert closed, "a TCP client that never starts TLS is still connected"
    finally:
        stall.close()
        pre_tls.close()
    assert node.alive()
