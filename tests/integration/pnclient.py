"""Client helpers for the integration suite: a generic gRPC client (no
generated stubs: channel.unary_unary with explicit serializers), raw TLS
sockets with chosen ALPN, a raw HTTP/1.1 exchange, and the assertions for
the node's plain-text REST errors (Go http.Error style)."""
import http.client
import io
import select
import socket
import ssl
import time

try:
    import grpc
except ImportError as e:  # fail with a hint, never skip
    raise ImportError(f"{e}: install python3-grpcio (apt-get install python3-grpcio)")

from pnnode import T

SERVICE = "/service.NodeService/"

# Every rpc of service.proto: name -> (kind, request message, response message).
RPCS = {
    "Start": ("unary", "Backend", "BaseInfoResponse"),
    "Stop": ("unary", "Empty", "Empty"),
    "GetBaseInfo": ("unary", "Empty", "BaseInfoResponse"),
    "GetLogs": ("server_stream", "Empty", "Log"),
    "GetSystemStats": ("unary", "Empty", "SystemStatsResponse"),
    "GetBackendStats": ("unary", "Empty", "BackendStatsResponse"),
    "GetStats": ("unary", "StatRequest", "StatResponse"),
    "GetOutboundsLatency": ("unary", "LatencyRequest", "LatencyResponse"),
    "GetUserOnlineStats": ("unary", "StatRequest", "OnlineStatResponse"),
    "GetUserOnlineIpListStats": ("unary", "StatRequest", "StatsOnlineIpListResponse"),
    "SyncUser": ("client_stream", "User", "Empty"),
    "SyncUsers": ("unary", "Users", "Empty"),
    "SyncUsersChunked": ("client_stream", "UsersChunk", "Empty"),
    "GetOutboundsStats": ("unary", "StatRequest", "StatResponse"),
    "GetOutboundStats": ("unary", "StatRequest", "StatResponse"),
    "GetInboundsStats": ("unary", "StatRequest", "StatResponse"),
    "GetInboundStats": ("unary", "StatRequest", "StatResponse"),
    "GetUsersStats": ("unary", "StatRequest", "StatResponse"),
    "GetUserStats": ("unary", "StatRequest", "StatResponse"),
}


def _ser(m):
    return m if isinstance(m, (bytes, bytearray)) else m.SerializeToString()


def _raw(b):
    return b


class GrpcClient:
    """A TLS channel to the node that trusts only the node's certificate and
    dials 127.0.0.1 (so the IP SAN is checked). grpcio offers ALPN h2."""

    def __init__(self, node, pb=None, cert=None, target=None, options=()):
        with open(cert or node.cert, "rb") as f:
            root = f.read()
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        h = node.connect_host
        target = target or (f"[{h}]:{node.port}" if ":" in h else f"{h}:{node.port}")
        self.node = node
        opts = [("grpc.enable_http_proxy", 0)] + list(options)
        self.channel = grpc.secure_channel(target, creds, options=opts)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def metadata(self, key="own", extra=()):
        md = []
        if key == "own":
            key = self.node.key
        if key is not None:
            md.append(("x-api-key", key))
        md.extend(extra)
        return md

    def unary(self, method, request=b"", response=None, key="own", extra=(), timeout=None):
        """Calls a unary rpc; request is a message or raw bytes; response is
        a message class or None for raw bytes. Raises grpc.RpcError."""
        f = self.channel.unary_unary(SERVICE + method if not method.startswith("/") else method,
                                     request_serializer=_ser,
                                     response_deserializer=(response.FromString if response
                                                            else _raw))
        return f(request, metadata=self.metadata(key, extra), timeout=timeout or T(10))

    def unary_future(self, method, request=b"", response=None, key="own", timeout=None):
        f = self.channel.unary_unary(SERVICE + method, request_serializer=_ser,
                                     response_deserializer=(response.FromString if response
                                                            else _raw))
        return f.future(request, metadata=self.metadata(key), timeout=timeout or T(20))

    def server_stream(self, method, request=b"", key="own", extra=(), timeout=None):
        f = self.channel.unary_stream(SERVICE + method, request_serializer=_ser,
                                      response_deserializer=_raw)
        return list(f(request, metadata=self.metadata(key, extra), timeout=timeout or T(10)))

    def client_stream(self, method, requests=(), key="own", extra=(), timeout=None):
        f = self.channel.stream_unary(SERVICE + method, request_serializer=_ser,
                                      response_deserializer=_raw)
        return f(iter(list(requests)), metadata=self.metadata(key, extra),
                 timeout=timeout or T(10))

    def call_any(self, method, key="own", extra=(), timeout=None):
        """Calls any rpc of RPCS with an empty request, in its own kind."""
        kind = RPCS[method][0] if method in RPCS else "unary"
        if kind == "server_stream":
            return self.server_stream(method, key=key, extra=extra, timeout=timeout)
        if kind == "client_stream":
            return self.client_stream(method, [b""], key=key, extra=extra, timeout=timeout)
        return self.unary(method, key=key, extra=extra, timeout=timeout)


def grpc_error(fn, *a, **kw):
    """Runs fn expecting a grpc.RpcError; returns (code, details)."""
    try:
        r = fn(*a, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError(f"expected a gRPC error, got a response: {r!r}")


# ---- raw TLS ---------------------------------------------------------------------------------

def client_context(cafile=None, alpn=None, strict=False, verify=True):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(cafile)
        if strict:
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def tls_connect(node, alpn=None, cafile=None, server_hostname=None, host=None, verify=True,
                ctx=None, timeout=None):
    """A TLS socket to the node (trusting its cert), ALPN as given."""
    ctx = ctx or client_context(cafile or node.cert, alpn, verify=verify)
    host = host or node.connect_host
    raw = socket.create_connection((host, node.port), timeout=timeout or T(10))
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname or host)
    except Exception:
        raw.close()
        raise


def assert_silent(sock, seconds=0.3):
    """Asserts no application data arrives for `seconds` (TLS 1.3 session
    tickets may arrive: they are records, not data)."""
    sock.setblocking(False)
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([sock], [], [], left)
            if r:
                try:
                    data = sock.recv(4096)
                except ssl.SSLWantReadError:
                    continue
                raise AssertionError(f"server wrote first or closed: {data!r}")
        try:
            data = sock.recv(4096)
            raise AssertionError(f"server wrote first: {data!r}")
        except ssl.SSLWantReadError:
            pass
    finally:
        sock.setblocking(True)


def http1_request(sock, method, path, headers=None, body=b"", host="127.0.0.1"):
    """Sends one HTTP/1.1 request on sock and parses the answer.
    Returns an http.client.HTTPResponse whose body was read into .data."""
    hdrs = {"Host": host}
    if body or method in ("PUT", "POST"):
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})
    req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    sock.sendall(req.encode() + b"\r\n" + body)
    return read_response(sock, method)


class _Prefixed(io.RawIOBase):
    """A socket reader that first returns bytes already taken off the socket."""

    def __init__(self, sock, prefix):
        self.sock, self.prefix = sock, prefix

    def readable(self):
        return True

    def readinto(self, b):
        if self.prefix:
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        return self.sock.recv_into(b)


class PrefixedSock:
    def __init__(self, sock, prefix):
        self.sock, self.prefix = sock, prefix

    def makefile(self, mode="rb", *a, **kw):
        return io.BufferedReader(_Prefixed(self.sock, self.prefix))


def app_data_ready(sock):
    """Whether the peer sent application data (not just TLS records such as
    session tickets), without blocking. Returns the bytes read ('' if none)."""
    if not sock.pending() and not select.select([sock], [], [], 0)[0]:
        return b""
    sock.setblocking(False)
    try:
        return sock.recv(65536) or b"\0EOF"
    except (ssl.SSLWantReadError, BlockingIOError):
        return b""
    finally:
        sock.setblocking(True)


def read_response(sock, method="GET", prefix=b""):
    if prefix:
        sock = PrefixedSock(sock, prefix)
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    resp.data = resp.read()
    return resp


def assert_text_error(resp, status, text):
    """A Go http.Error-style answer: status, text/plain; charset=utf-8,
    X-Content-Type-Options: nosniff, body = text + newline. Works with
    requests responses and http.client responses."""
    code = getattr(resp, "status_code", None) or resp.status
    body = resp.content if hasattr(resp, "content") else resp.data
    ctype = resp.headers.get("Content-Type")
    assert (code, body) == (status, (text + "\n").encode()), \
        f"expected {status} {text!r}+newline, got {code} {body!r}"
    assert ctype == "text/plain; charset=utf-8", f"Content-Type {ctype!r}"
    assert resp.headers.get("X-Content-Type-Options") == "nosniff", dict(resp.headers)


def read_until_closed(sock, timeout):
    """Reads until EOF/reset; returns (data, closed)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except (socket.timeout, TimeoutError):
        return data, False
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
        return data, True
    return data, False


# ---- HTTP/2 with python-h2 (REST over h2, raw gRPC framing, held connections) ---------------

class H2Conn:
    """A client HTTP/2 connection over TLS with ALPN h2, driven by hand."""

    def __init__(self, node, timeout=None):
        import h2.config
        import h2.connection
        self.sock = tls_connect(node, alpn=["h2"], timeout=timeout)
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.goaway = None
        self.results = {}

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def request(self, method, path, headers=(), body=b"", authority="127.0.0.1",
                timeout=None):
        """One request; returns dict(status, headers, body, trailers, reset,
        sent). The body is sent as flow control allows; sending stops early
        when the node answers or resets the stream."""
        sid = self.conn.get_next_available_stream_id()
        res = {"status": None, "headers": {}, "body": b"", "trailers": {}, "reset": None,
               "ended": False, "sent": 0}
        self.results[sid] = res
        hdrs = [(":method", method), (":path", path), (":scheme", "https"),
                (":authority", authority)] + list(headers)
        self.conn.send_headers(sid, hdrs, end_stream=not body)
        self.flush()
        view = memoryview(body)
        while view and not res["ended"] and res["status"] is None:
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self._read_once(timeout)
                continue
            n = min(window, len(view))
            self.conn.send_data(sid, bytes(view[:n]), end_stream=(n == len(view)))
            view = view[n:]
            res["sent"] += n
            self.flush()
        while not res["ended"]:
            self._read_once(timeout)
        return res

    def _read_once(self, timeout):
        import h2.events
        self.sock.settimeout(timeout or T(10))
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the node")
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            res = self.results.get(getattr(ev, "stream_id", None))
            if res is None:
                continue
            if isinstance(ev, h2.events.ResponseReceived):
                res["headers"] = dict(ev.headers)
                res["status"] = int(res["headers"][":status"])
            elif isinstance(ev, h2.events.DataReceived):
                res["body"] += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                res["trailers"] = dict(ev.headers)
            elif isinstance(ev, h2.events.StreamReset):
                res["reset"] = ev.error_code
                res["ended"] = True
            elif isinstance(ev, h2.events.StreamEnded):
                res["ended"] = True
        self.flush()
