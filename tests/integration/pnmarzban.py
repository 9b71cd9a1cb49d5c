"""Helpers for the Marzban-node drop-in tests (spec/marzban.md): the panel's
PKI (its self-signed X.509 v1 client certificate, made like the panel makes
it, and a node certificate with CN/SAN Gozargah), MzNode (proxynode in the
marzban profile), MzPanel (the panel's REST client: the server certificate
read with ssl.get_server_certificate and pinned as the CA, hostname check
off, the panel certificate as the client certificate), the panel's
xray_config, the core's own gRPC API reached over the injected TLS API
inbound (grpcio with target name Gozargah, or a raw h2 client bound to a
chosen loopback source address), the /logs WebSocket (asyncio websockets
10.4) and a wrapper core that records its stdin and can print lines before
exec'ing the real v2ray.

Everything is loopback. Nothing is skipped: a missing tool is a failure."""
import asyncio
import base64
import http.client
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time

import pytest

from pnnode import T, V2RAY, Node, NodeExited, free_port, need_module, need_tool
from pncore import user_password, user_uuid

MZ_READY_LINE = "serving REST and WebSocket on"
V2RAY_VERSION = "4.34.0"
SESSION_RE = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
STARTED_ALREADY = "Xray is started already"
MISMATCH = {"detail": "Session ID mismatch."}

VLESS = "VLESS TCP"
VMESS = "VMess TCP"
TROJAN = "Trojan TCP"
PROTOCOL_OF = {VLESS: "vless", VMESS: "vmess", TROJAN: "trojan"}
ALL_TAGS = [VLESS, VMESS, TROJAN]

# v2ray 4.34 service paths and type strings (the real panel uses xray.*).
STATS = "/v2ray.core.app.stats.command.StatsService/"
HANDLER = "/v2ray.core.app.proxyman.command.HandlerService/"
ADD_OP = "v2ray.core.app.proxyman.command.AddUserOperation"
REMOVE_OP = "v2ray.core.app.proxyman.command.RemoveUserOperation"
ACCOUNT = {"vless": "v2ray.core.proxy.vless.Account", "vmess": "v2ray.core.proxy.vmess.Account",
           "trojan": "v2ray.core.proxy.trojan.Account"}


# ---- PKI ---------------------------------------------------------------------------------------

def openssl(*args, input=None):
    p = subprocess.run([need_tool("openssl")] + list(args), capture_output=True, text=True,
                       input=input, timeout=60)
    assert p.returncode == 0, f"openssl {' '.join(args)} failed: {p.stderr}"
    return p.stdout


def make_v1_cert(directory, name, cn="Gozargah", bits=2048):
    """A self-signed X.509 v1 certificate like the panel's (req -new +
    x509 -req -signkey, no extfile). Returns (crt, key)."""
    key = os.path.join(directory, f"{name}.key")
    csr = os.path.join(directory, f"{name}.csr")
    crt = os.path.join(directory, f"{name}.crt")
    openssl("genrsa", "-out", key, str(bits))
    openssl("req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", csr)
    openssl("x509", "-req", "-in", csr, "-signkey", key, "-days", "36500", "-out", crt)
    text = openssl("x509", "-in", crt, "-noout", "-text")
    assert "Version: 1 (0x0)" in text, f"{crt} is not X.509 v1:\n{text}"
    return crt, key


def make_node_cert(directory, name="node", cn="Gozargah", san="DNS:Gozargah"):
    """A v3 self-signed CA certificate with CN and SAN Gozargah (the shape
    proxynode generates), RSA 2048 to keep the tests quick."""
    key = os.path.join(directory, f"{name}.key")
    crt = os.path.join(directory, f"{name}.crt")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
            "-days", "3650", "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign")
    return crt, key


class Pki:
    """panel: the panel's v1 certificate (SSL_CLIENT_CERT_FILE and the
    client certificate); other: a v1 certificate with the same CN not issued
    by the panel's; node: the node's certificate and key."""

    def __init__(self, directory):
        self.dir = directory
        self.panel_crt, self.panel_key = make_v1_cert(directory, "panel")
        self.other_crt, self.other_key = make_v1_cert(directory, "other")
        self.node_crt, self.node_key = make_node_cert(directory)


@pytest.fixture(scope="session")
def pki():
    d = tempfile.mkdtemp(prefix="pn-mz-pki-")
    yield Pki(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def capb():
    """core_api_pb2 compiled from proto/xray/core_api.proto."""
    need_tool("protoc")
    need_module("google.protobuf")
    from fake_xray import compile_proto, load_pb
    d = tempfile.mkdtemp(prefix="pn-mz-pb-")
    yield load_pb(compile_proto(d))
    shutil.rmtree(d, ignore_errors=True)


# ---- the node ----------------------------------------------------------------------------------

class MzNode(Node):
    """proxynode in the marzban profile: SSL_CLIENT_CERT_FILE = the panel's
    certificate, its own certificate copied into <workdir>/ssl (unless
    own_cert is False: then the paths point at a missing directory and the
    node generates them), XRAY_API_PORT a free port. profile=None: rely on
    auto detection (SSL_CLIENT_CERT_FILE + SERVICE_HOST)."""

    def __init__(self, workdir, pki, env=None, profile="marzban", host="127.0.0.1",
                 api_host="127.0.0.1", api_port=None, core=V2RAY, own_cert=True):
        os.makedirs(workdir, exist_ok=True)
        ssl_dir = os.path.join(workdir, "ssl")
        cert = os.path.join(ssl_dir, "ssl_cert.pem")
        key = os.path.join(ssl_dir, "ssl_key.pem")
        if own_cert:
            os.makedirs(ssl_dir, exist_ok=True)
            shutil.copyfile(pki.node_crt, cert)
            shutil.copyfile(pki.node_key, key)
            os.chmod(key, 0o600)
        self.api_port = api_port or free_port()
        self.api_host = api_host
        self.pki = pki
        e = {"API_KEY": None, "NODE_HOST": None, "PROXYNODE_STATE_DIR": None,
             "PROXYNODE_PROFILE": profile, "SERVICE_HOST": host,
             "SSL_CLIENT_CERT_FILE": pki.panel_crt, "SSL_CERT_FILE": cert, "SSL_KEY_FILE": key,
             "XRAY_API_HOST": api_host, "XRAY_API_PORT": str(self.api_port)}
        e.update(env or {})
        super().__init__(workdir, env=e, key=None, host=host, state=False, core=core)

    def wait_ready(self, timeout=None):
        deadline = time.monotonic() + (timeout or T(15))
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.exit_status = rc
                raise NodeExited(f"proxynode exited with {rc} before listening\n"
                                 + self.describe())
            if MZ_READY_LINE in self.stderr()[getattr(self, "_log_offset", 0):]:
                try:
                    with socket.create_connection((self.connect_host, self.port), timeout=1):
                        return
                except OSError:
                    pass
            time.sleep(0.02)
        self.kill()
        self.exit_status = "killed (never ready)"
        raise AssertionError(f"proxynode (marzban) not ready after {timeout or T(15)} s (no "
                             f"{MZ_READY_LINE!r} line)\n" + self.describe())

    def core_pids(self):
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [pid for pid, st in all_children(self.proc.pid) if st != "Z"]

    def zombies(self):
        if self.proc is None:
            return []
        return [pid for pid, st in all_children(self.proc.pid) if st == "Z"]

    def one_core(self, timeout=None, other_than=None):
        """Waits for exactly one core child (different from other_than)."""
        deadline = time.monotonic() + (timeout or T(5))
        while True:
            pids = self.core_pids()
            if len(pids) == 1 and pids[0] != other_than:
                return pids[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"expected exactly one core child of {self.proc.pid}"
                                     f"{' other than ' + str(other_than) if other_than else ''}"
                                     f", have {pids}\n" + self.describe())
            time.sleep(0.02)

    def no_core(self, timeout=None):
        deadline = time.monotonic() + (timeout or T(6))
        while self.core_pids():
            if time.monotonic() > deadline:
                raise AssertionError(f"core still running: {self.core_pids()}\n"
                                     + self.describe())
            time.sleep(0.02)


def all_children(pid):
    """[(child pid, state letter)] of pid, zombies included."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rfind(")") + 2:].split()
        if int(rest[1]) == pid:
            out.append((int(d), rest[0]))
    return out


def proc_cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")[:-1]]


def proc_environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    return dict(i.split("=", 1) if "=" in i else (i, None) for i in items)


# ---- the panel's REST client -------------------------------------------------------------------

def _no_hostname_adapter():
    requests = need_module("requests")
    import urllib3

    class SANIgnoringAdapter(requests.adapters.HTTPAdapter):
        """What the panel mounts: the pinned certificate is the CA, no
        hostname check."""

        def init_poolmanager(self, connections, maxsize, block=False, **kw):
            self.poolmanager = urllib3.PoolManager(num_pools=connections, maxsize=maxsize,
                                                   block=block, assert_hostname=False)
    return SANIgnoringAdapter()


class MzPanel:
    """One panel talking to one node, as Marzban 0.8.4's ReSTXRayNode does."""

    def __init__(self, node, pki=None, name="panel"):
        self.node = node
        self.pki = pki or node.pki
        self.sid = None
        self.ca = os.path.join(node.workdir, f"{name}-{id(self)}-server.pem")
        self._http = None

    @property
    def base(self):
        return f"https://{self.node.connect_host}:{self.node.port}"

    def read_cert(self, timeout=None):
        pem = ssl.get_server_certificate((self.node.connect_host, self.node.port),
                                         timeout=timeout or T(5))
        with open(self.ca, "w") as f:
            f.write(pem)
        return pem

    def http(self):
        if self._http is None:
            if not os.path.exists(self.ca):
                self.read_cert()
            requests = need_module("requests")
            s = requests.Session()
            s.trust_env = False
            s.mount("https://", _no_hostname_adapter())
            s.verify = self.ca
            s.cert = (self.pki.panel_crt, self.pki.panel_key)
            self._http = s
        return self._http

    def close(self):
        if self._http is not None:
            self._http.close()
            self._http = None

    def post(self, path, body="default", timeout=None, **fields):
        """POSTs JSON {"session_id": <current>, **fields} (body="default"),
        a given dict/list, raw bytes/str, or nothing (body=None)."""
        kw = {}
        if body == "default":
            kw["json"] = dict({"session_id": self.sid}, **fields)
        elif isinstance(body, (dict, list)):
            kw["json"] = body
        elif body is not None:
            kw["data"] = body
            kw["headers"] = {"Content-Type": "application/json"}
        return self.http().post(self.base + path, timeout=timeout or T(10), **kw)

    def connect(self):
        r = self.post("/connect", body={"session_id": None}, timeout=T(3))
        assert r.status_code == 200, f"/connect: {r.status_code} {r.text}"
        self.sid = r.json()["session_id"]
        return r

    def disconnect(self):
        return self.post("/disconnect", timeout=T(3))

    def ping(self, sid="current"):
        return self.post("/ping", session_id=self.sid if sid == "current" else sid,
                         timeout=T(3))

    def info(self):
        return self.post("/", timeout=T(3))

    def start(self, config, path="/start", timeout=None):
        cfg = config if isinstance(config, str) else json.dumps(config)
        return self.post(path, config=cfg, timeout=timeout or T(10))

    def restart(self, config, timeout=None):
        return self.start(config, "/restart", timeout)

    def stop(self):
        return self.post("/stop", timeout=T(5))

    def start_ok(self, config, path="/start"):
        t0 = time.monotonic()
        r = self.start(config, path)
        took = time.monotonic() - t0
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}\n" + self.node.describe()
        assert r.json()["started"] is True, r.text
        return r, took


def ctx_panel(pki, verify_ca=None, tls_max=None, cert="panel"):
    """An SSL client context: the panel's (or another) client certificate,
    optionally pinned CA (no hostname check), optional max TLS version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if verify_ca:
        ctx.load_verify_locations(verify_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert == "panel":
        ctx.load_cert_chain(pki.panel_crt, pki.panel_key)
    elif cert == "other":
        ctx.load_cert_chain(pki.other_crt, pki.other_key)
    if tls_max:
        ctx.maximum_version = tls_max
    return ctx


def raw_post(node, pki, path, body=b"", source=None, headers=None, timeout=None, host=None):
    """One POST over http.client from a chosen source address (to host, by
    default the node's). Returns (status, headers dict (lowercase), body)."""
    ctx = ctx_panel(pki)
    c = http.client.HTTPSConnection(host or node.connect_host, node.port, context=ctx,
                                    timeout=timeout or T(10),
                                    source_address=(source, 0) if source else None)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request("POST", path, body=data, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


# ---- the panel's xray_config -------------------------------------------------------------------

def email(i, name):
    return f"{i}.{name}"


def client_entry(proto, mail):
    if proto == "vless":
        return {"id": user_uuid(mail), "flow": "", "email": mail}
    if proto == "vmess":
        return {"id": user_uuid(mail), "email": mail}
    if proto == "trojan":
        return {"password": user_password(mail), "email": mail}
    raise ValueError(proto)


def mz_config(ports, users=(), *, loglevel="warning", extra_inbounds=(), extra_rules=(),
              api_port=62051, remark=None, inbound_first=()):
    """A Marzban 0.8.4-style xray_config (dict): the panel's own API inbound
    at index 0 and API rule at rules[0] (the node replaces both), api, stats,
    forced policies, vless/vmess/trojan inbounds on loopback ports with the
    users inline ("<id>.<username>" emails), DIRECT/BLOCK outbounds and
    CIDR rules (no geoip.dat with v2ray; loopback stays reachable)."""
    inbounds = [{"listen": "0.0.0.0", "port": api_port, "protocol": "dokodemo-door",
                 "settings": {"address": "127.0.0.1"}, "tag": "API_INBOUND"}]
    inbounds.extend(inbound_first)
    for tag, port in ports.items():
        proto = PROTOCOL_OF[tag]
        settings = {"clients": [client_entry(proto, u) for u in users]}
        if proto == "vless":
            settings["decryption"] = "none"
        inbounds.append({"tag": tag, "listen": "127.0.0.1", "port": port, "protocol": proto,
                         "settings": settings,
                         "streamSettings": {"network": "tcp", "security": "none"},
                         "sniffing": {"enabled": True, "destOverride": ["http", "tls"]}})
    inbounds.extend(extra_inbounds)
    cfg = {
        "log": {"loglevel": loglevel},
        "routing": {"rules": [
            {"inboundTag": ["API_INBOUND"], "source": ["127.0.0.1"], "outboundTag": "API",
             "type": "field"},
            {"ip": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"], "outboundTag": "BLOCK",
             "type": "field"},
            *extra_rules]},
        "inbounds": inbounds,
        "outbounds": [{"protocol": "freedom", "tag": "DIRECT"},
                      {"protocol": "blackhole", "tag": "BLOCK"}],
        "api": {"services": ["HandlerService", "StatsService", "LoggerService"], "tag": "API"},
        "stats": {},
        "policy": {"levels": {"0": {"statsUserUplink": True, "statsUserDownlink": True}},
                   "system": {"statsInboundDownlink": False, "statsInboundUplink": False,
                              "statsOutboundDownlink": True, "statsOutboundUplink": True}},
    }
    if remark is not None:
        cfg["remark"] = remark
    return cfg


def poke_inbound(tag, target_port, port=None):
    """A dokodemo-door inbound whose every TCP connection writes one access
    line (with the client's source port) to the core's stdout."""
    return {"tag": tag, "listen": "127.0.0.1", "port": port or free_port(),
            "protocol": "dokodemo-door",
            "settings": {"address": "127.0.0.1", "port": target_port, "network": "tcp"}}


def poke(port, target_port):
    """Opens one connection to a poke inbound (whose target is target_port)
    and closes it once the first answer byte came (so the core dispatched,
    and logged, it). Returns the text the access line carries:
    "127.0.0.1:<source port> accepted tcp:127.0.0.1:<target port>"."""
    with socket.create_connection(("127.0.0.1", port), timeout=T(3)) as s:
        src = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(T(3))
        assert s.recv(1), "the poke inbound closed without an answer"
    return f"127.0.0.1:{src} accepted tcp:127.0.0.1:{target_port}"


# ---- the core's API over the injected TLS inbound ----------------------------------------------

def api_channel(node, name="Gozargah", host="127.0.0.1"):
    grpc = need_module("grpc")
    with open(node.cert, "rb") as f:
        root = f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.secure_channel(f"{host}:{node.api_port}", creds,
                               options=[("grpc.ssl_target_name_override", name),
                                        ("grpc.enable_http_proxy", 0)])


def api_call(channel, path, req, resp_cls, timeout=None):
    f = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=resp_cls.FromString)
    return f(req, timeout=timeout or T(5))


def sys_stats(node, capb, name="Gozargah"):
    ch = api_channel(node, name)
    try:
        return api_call(ch, STATS + "GetSysStats", capb.SysStatsRequest(),
                        capb.SysStatsResponse)
    finally:
        ch.close()


def query_stats(node, capb, pattern, reset=False):
    ch = api_channel(node)
    try:
        r = api_call(ch, STATS + "QueryStats", capb.QueryStatsRequest(pattern=pattern,
                                                                     reset=reset),
                     capb.QueryStatsResponse)
        return {s.name: s.value for s in r.stat}
    finally:
        ch.close()


def typed(capb, type_, msg):
    return capb.TypedMessage(type=type_, value=msg.SerializeToString())


def account_for(capb, proto, mail):
    if proto == "vless":
        return typed(capb, ACCOUNT[proto], capb.VlessAccount(id=user_uuid(mail), flow="",
                                                             encryption="none"))
    if proto == "vmess":
        return typed(capb, ACCOUNT[proto], capb.VmessAccount(
            id=user_uuid(mail), alter_id=0, security_settings=capb.SecurityConfig(type=0)))
    if proto == "trojan":
        return typed(capb, ACCOUNT[proto], capb.TrojanAccount(password=user_password(mail)))
    raise ValueError(proto)


def add_user(node, capb, tag, mail, level=0):
    """AlterInbound AddUserOperation the way the panel sends it."""
    op = capb.AddUserOperation(user=capb.User(level=level, email=mail,
                                              account=account_for(capb, PROTOCOL_OF[tag],
                                                                  mail)))
    ch = api_channel(node)
    try:
        return api_call(ch, HANDLER + "AlterInbound",
                        capb.AlterInboundRequest(tag=tag, operation=typed(capb, ADD_OP, op)),
                        capb.AlterInboundResponse, timeout=T(30))
    finally:
        ch.close()


def remove_user(node, capb, tag, mail):
    op = capb.RemoveUserOperation(email=mail)
    ch = api_channel(node)
    try:
        return api_call(ch, HANDLER + "AlterInbound",
                        capb.AlterInboundRequest(tag=tag, operation=typed(capb, REMOVE_OP, op)),
                        capb.AlterInboundResponse, timeout=T(30))
    finally:
        ch.close()


def h2_grpc(port, path, req, cafile, source=None, name="Gozargah", host="127.0.0.1",
            timeout=None):
    """One unary gRPC call with python h2 over a TLS socket bound to
    `source` (grpcio cannot choose a source address). Returns (grpc-status,
    message bytes); raises ConnectionError when the peer closes or resets
    before answering, TimeoutError when nothing comes."""
    h2c = need_module("h2.connection")
    h2cfg = need_module("h2.config")
    h2e = need_module("h2.events")
    timeout = timeout or T(3)
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(timeout)
    try:
        if source:
            raw.bind((source, 0))
        raw.connect((host, port))
        s = ctx.wrap_socket(raw, server_hostname=name)
    except (ssl.SSLError, OSError) as e:
        raw.close()
        raise ConnectionError(f"TLS to {host}:{port} from {source}: {e}")
    try:
        conn = h2c.H2Connection(h2cfg.H2Configuration(client_side=True,
                                                      header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":path", path),
                                (":authority", name), ("content-type", "application/grpc"),
                                ("te", "trailers")])
        data = req.SerializeToString() if hasattr(req, "SerializeToString") else req
        conn.send_data(sid, b"\0" + struct.pack(">I", len(data)) + data, end_stream=True)
        s.sendall(conn.data_to_send())
        body, headers = b"", {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, ssl.SSLError) as e:
                raise ConnectionError(f"peer reset: {e}")
            except socket.timeout:
                break
            if not chunk:
                raise ConnectionError("closed by peer")
            for ev in conn.receive_data(chunk):
                if isinstance(ev, (h2e.ResponseReceived, h2e.TrailersReceived)):
                    headers.update(dict(ev.headers))
                elif isinstance(ev, h2e.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2e.StreamEnded):
                    return int(headers.get("grpc-status", "-1")), body[5:]
                elif isinstance(ev, (h2e.StreamReset, h2e.ConnectionTerminated)):
                    raise ConnectionError(repr(ev))
            out = conn.data_to_send()
            if out:
                s.sendall(out)
        raise TimeoutError(f"no gRPC answer from {host}:{port} (source {source})")
    finally:
        s.close()


# ---- /logs -------------------------------------------------------------------------------------

def ws_ssl(pki):
    """The panel's log client: no verification, the panel's certificate."""
    return ctx_panel(pki)


async def ws_open(node, query):
    websockets = need_module("websockets")
    uri = f"wss://{node.connect_host}:{node.port}/logs" + (f"?{query}" if query else "")
    return await websockets.connect(uri, ssl=ws_ssl(node.pki), open_timeout=T(5),
                                    ping_interval=None, compression=None, max_size=None,
                                    close_timeout=1, max_queue=None)


async def ws_frames(ws, duration, until=None):
    """Receives frames for `duration` s (or until `until(frames)` is true):
    [(monotonic time, text)]; stops early when the peer closes."""
    wsx = need_module("websockets.exceptions")
    out = []
    deadline = time.monotonic() + duration
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (until and until(out)):
            return out
        try:
            msg = await asyncio.wait_for(ws.recv(), left)
        except asyncio.TimeoutError:
            return out
        except wsx.ConnectionClosed:
            return out
        out.append((time.monotonic(), msg))


def raw_upgrade(node, query, cert="panel", timeout=None):
    """A /logs upgrade request on a raw TLS socket. Returns (status, headers
    (lowercase), body, saw_eof_after) without decoding frames."""
    ctx = ctx_panel(node.pki, cert=cert)
    raw = socket.create_connection((node.connect_host, node.port), timeout=timeout or T(5))
    s = ctx.wrap_socket(raw)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/logs" + (f"?{query}" if query is not None else "")
        s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n"
                   f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = s.recv(65536)
            if not d:
                break
            buf += d
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, v in (h.split(":", 1) for h in lines[1:] if ":" in h)}
        n = int(headers.get("content-length", "0") or 0)
        while len(rest) < n:
            d = s.recv(65536)
            if not d:
                break
            rest += d
        eof = False
        if status != 101:
            s.settimeout(T(2))
            try:
                while True:
                    d = s.recv(65536)
                    if not d:
                        eof = True
                        break
                    rest += d
            except (socket.timeout, OSError):
                pass
        return status, headers, rest, eof
    finally:
        s.close()


# ---- a wrapper core ----------------------------------------------------------------------------

WRAPPER = r'''#!/usr/bin/python3
# Test wrapper around /usr/bin/v2ray (not a core of its own): records its
# argv, environment and stdin (the node's rewritten config), optionally
# prints lines to stdout/stderr, then execs v2ray on the recorded file.
import json, os, sys, time
DIR = {dir!r}
V2RAY = {v2ray!r}
args = sys.argv[1:]
if "-config" not in args:
    os.execv(V2RAY, [V2RAY] + args)
try:
    with open(os.path.join(DIR, "control.json")) as f:
        ctl = json.load(f)
except FileNotFoundError:
    ctl = {{}}
data = sys.stdin.buffer.read()
path = os.path.join(DIR, "stdin-%d.json" % os.getpid())
with open(path, "wb") as f:
    f.write(data)
with open(os.path.join(DIR, "last.tmp"), "wb") as f:
    f.write(data)
os.replace(os.path.join(DIR, "last.tmp"), os.path.join(DIR, "last.json"))
with open(os.path.join(DIR, "invocations.jsonl"), "a") as f:
    f.write(json.dumps({{"pid": os.getpid(), "argv": args, "env": dict(os.environ),
                        "path": path, "t": time.time()}}) + "\n")
if ctl.get("stdout_raw_b64"):
    import base64
    sys.stdout.buffer.write(base64.b64decode(ctl["stdout_raw_b64"]))
    sys.stdout.buffer.flush()
for i in range(ctl.get("stdout_lines", 0)):
    sys.stdout.write("%s%04d\n" % (ctl.get("prefix", "wrapper-line-"), i + 1))
sys.stdout.flush()
n = ctl.get("stderr_bytes", 0)
if n:
    line = "x" * 90
    i = 0
    out = sys.stderr.buffer
    while n > 0:
        b = ("stderr-flood-%07d %s\n" % (i, line)).encode()
        out.write(b)
        n -= len(b)
        i += 1
    out.write(b"stderr-flood-end\n")
    out.flush()
if ctl.get("sleep"):
    time.sleep(ctl["sleep"])
os.execv(V2RAY, [V2RAY, "-config", path])
'''


class WrapperCore:
    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "xray")
        with open(self.path, "w") as f:
            f.write(WRAPPER.format(dir=directory, v2ray=V2RAY))
        os.chmod(self.path, 0o755)

    def control(self, **ctl):
        with open(os.path.join(self.dir, "control.json"), "w") as f:
            json.dump(ctl, f)

    def last_text(self):
        with open(os.path.join(self.dir, "last.json"), "rb") as f:
            return f.read().decode()

    def last(self):
        return json.loads(self.last_text())

    def invocations(self):
        try:
            with open(os.path.join(self.dir, "invocations.jsonl")) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def make_mz(tmp_path, pki):
    """Factory: make_mz(env={...}, ...) -> started MzNode; stopped (and
    checked for a clean exit) at teardown unless the test stopped it."""
    nodes = []

    def factory(start=True, name=None, **kw):
        n = MzNode(str(tmp_path / (name or f"mz{len(nodes)}")), pki, **kw)
        nodes.append(n)
        if start:
            n.start()
        return n

    yield factory
    errors = []
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            try:
                n.stop(check=True)
            except AssertionError as e:
                errors.append(str(e))
        elif n.proc is not None and n.exit_status is None:
            n.exit_status = n.proc.returncode
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


def module_node(tmp_path_factory, pki, name, **kw):
    """A started MzNode for a test module, with .ports for ALL_TAGS."""
    from pnnode import binary
    binary()
    need_tool("v2ray", V2RAY)
    n = MzNode(str(tmp_path_factory.mktemp(name)), pki, **kw)
    n.ports = {t: free_port() for t in ALL_TAGS}
    n.start()
    return n


def finish_module_node(n):
    assert n.alive(), "the module's node died during the tests\n" + n.describe()
    n.stop(check=True)


def quiesce(node):
    """Leaves the node with a fresh session and the core stopped."""
    p = MzPanel(node, name="quiesce")
    try:
        p.connect()
        r = p.stop()
        assert r.status_code == 200, r.text
        node.no_core()
    finally:
        p.close()


def expect_no_http(fn):
    """fn() must not produce an HTTP response (TLS/transport failure)."""
    requests = need_module("requests")
    try:
        r = fn()
    except (OSError, ssl.SSLError, http.client.HTTPException,
            requests.exceptions.RequestException) as e:
        return e
    raise AssertionError(f"expected no HTTP response, got {getattr(r, 'status_code', r)!r}")


class SlowServer:
    """An HTTP/1.0 server on 127.0.0.1 that sends `size` bytes in `chunk`
    pieces every `interval` s, whatever the client (curl's --limit-rate is
    bursty in 7.88). .url is its address; .served counts full responses."""

    def __init__(self, size, chunk=64 << 10, interval=0.05):
        import threading
        self.size, self.chunk, self.interval = size, chunk, interval
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/slow"
        self.served = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.settimeout(10)
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = c.recv(4096)
                if not d:
                    return
                buf += d
            c.sendall(f"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: {self.size}\r\n\r\n".encode())
            block = os.urandom(self.chunk)
            left = self.size
            while left > 0:
                n = min(left, self.chunk)
                c.sendall(block[:n])
                left -= n
                if left:
                    time.sleep(self.interval)
            self.served += 1
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.closed = True
        self.sock.close()
