"""Clients: the node's gRPC API over TLS (grpcio, no generated stubs), the
core's own gRPC API on its loopback API port (plain HTTP/2), and a raw
HTTP/2 GetSysStats probe (python-h2 over a fresh TCP connection per try)
for timing a core's readiness without grpcio's reconnect backoff."""
import socket
import time

import grpc

SERVICE = "/service.NodeService/"
BIG = 512 << 20


def _raw(b):
    return b


def _ser(m):
    return m if isinstance(m, (bytes, bytearray)) else m.SerializeToString()


class NodeClient:
    """A TLS channel to the node trusting only its certificate."""

    def __init__(self, node):
        with open(node.cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        self.node = node
        self.md = [("x-api-key", node.key)]
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{node.port}", creds,
            options=[("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", BIG),
                     ("grpc.max_send_message_length", BIG)])

    def close(self):
        self.channel.close()

    def unary(self, method, request=b"", response=None, timeout=60):
        """request: message or bytes; response: message class or None (raw bytes)."""
        f = self.channel.unary_unary(SERVICE + method, request_serializer=_ser,
                                     response_deserializer=response.FromString if response
                                     else _raw)
        return f(request, metadata=self.md, timeout=timeout)

    def client_stream(self, method, requests, timeout=120):
        f = self.channel.stream_unary(SERVICE + method, request_serializer=_ser,
                                      response_deserializer=_raw)
        return f(iter(requests), metadata=self.md, timeout=timeout)

    def server_stream(self, method, request=b"", timeout=60):
        f = self.channel.unary_stream(SERVICE + method, request_serializer=_ser,
                                      response_deserializer=_raw)
        return f(request, metadata=self.md, timeout=timeout)


class Dialect:
    """Service path and type-string prefixes of the running core (cores.md §2)."""

    def __init__(self, xray):
        self.path = "/xray.app." if xray else "/v2ray.core.app."
        self.type = "xray." if xray else "v2ray.core."

    def stats(self, m):
        return f"{self.path}stats.command.StatsService/{m}"

    def handler(self, m):
        return f"{self.path}proxyman.command.HandlerService/{m}"


class CoreClient:
    """The core's own API on 127.0.0.1:<port> (plain HTTP/2)."""

    def __init__(self, port, cpb, xray=False):
        self.cpb = cpb
        self.d = Dialect(xray)
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", BIG),
                     ("grpc.max_send_message_length", BIG)])

    def close(self):
        self.channel.close()

    def call(self, path, request, response=None, timeout=60):
        f = self.channel.unary_unary(path, request_serializer=_ser,
                                     response_deserializer=response.FromString if response
                                     else _raw)
        return f(request, timeout=timeout)

    def future(self, path, request, timeout=60):
        f = self.channel.unary_unary(path, request_serializer=_ser, response_deserializer=_raw)
        return f.future(request, timeout=timeout)

    def query_stats(self, pattern, reset=False, raw=True):
        req = self.cpb.QueryStatsRequest(pattern=pattern, reset=reset)
        return self.call(self.d.stats("QueryStats"), req,
                         None if raw else self.cpb.QueryStatsResponse)

    def sys_stats(self):
        return self.call(self.d.stats("GetSysStats"), self.cpb.SysStatsRequest(),
                         self.cpb.SysStatsResponse, timeout=5)

    def add_user_request(self, tag, email, uid):
        c = self.cpb
        acct = c.VlessAccount(id=uid)
        user = c.User(level=0, email=email,
                      account=c.TypedMessage(type=self.d.type + "proxy.vless.Account",
                                             value=acct.SerializeToString()))
        op = c.AddUserOperation(user=user)
        return c.AlterInboundRequest(tag=tag, operation=c.TypedMessage(
            type=self.d.type + "app.proxyman.command.AddUserOperation",
            value=op.SerializeToString())).SerializeToString()

    def remove_user_request(self, tag, email):
        c = self.cpb
        op = c.RemoveUserOperation(email=email)
        return c.AlterInboundRequest(tag=tag, operation=c.TypedMessage(
            type=self.d.type + "app.proxyman.command.RemoveUserOperation",
            value=op.SerializeToString())).SerializeToString()


def h2c_sys_stats_once(port, dialect, timeout=1.0):
    """One GetSysStats over a new plain HTTP/2 connection. True when the core
    answered grpc-status 0; False on refusal, reset or error."""
    import h2.config
    import h2.connection
    import h2.events
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return False
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                             (":authority", f"127.0.0.1:{port}"),
                             (":path", dialect.stats("GetSysStats")),
                             ("content-type", "application/grpc"), ("te", "trailers")])
        c.send_data(sid, b"\0\0\0\0\0", end_stream=True)
        s.sendall(c.data_to_send())
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            data = s.recv(65536)
            if not data:
                return False
            for ev in c.receive_data(data):
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for k, v in ev.headers:
                        if k in (b"grpc-status", "grpc-status"):
                            status = v
                if isinstance(ev, h2.events.StreamEnded):
                    return status in (b"0", "0")
                if isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    return False
            out = c.data_to_send()
            if out:
                s.sendall(out)
        return False
    except (OSError, Exception):
        return False
    finally:
        s.close()
