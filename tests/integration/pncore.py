"""Helpers for the tests that run a real core behind the node (spec/cores.md
§12): a PasarGuard-style panel config and users, a Panel wrapper that
drives the node over gRPC/REST like the panel does, a loopback HTTP file
server, a client-side v2ray (socks inbounds → one outbound per protocol
under test) and curl through it, and process checks for the node's core.

All addresses are loopback. Everything started here is stopped by the
fixtures in core_fixtures.py (or the caller's `with`)."""
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid

import grpc

from pnnode import T, V2RAY, free_port, need_tool

# Panel-style inbound tags (the panel lets operators name them freely).
VMESS = "VMess TCP"
VLESS = "VLESS TCP"
TROJAN = "Trojan TCP"
SS = "Shadowsocks TCP"
PROTOCOL_OF = {VMESS: "vmess", VLESS: "vless", TROJAN: "trojan", SS: "shadowsocks"}
ALL_TAGS = [VMESS, VLESS, TROJAN, SS]
SS_METHOD = "chacha20-ietf-poly1305"

# StatType
OUTBOUNDS, OUTBOUND, INBOUNDS, INBOUND, USERS, USER = range(6)

NS = uuid.UUID("6f0c1b7e-1a4f-4a53-9c43-6b1d2f0a9e11")


def user_uuid(email):
    return str(uuid.uuid5(NS, "user-" + email))


def user_password(email):
    return "pw-" + email


# ---- panel config and users ----------------------------------------------------------------

def panel_config(ports, *, ss_method=None, vless_flow=None, online=False, extra_inbounds=(),
                 api_inbound=True, loglevel="warning", policy=None, blackhole=True):
    """A realistic PasarGuard-style config (dict). ports: tag -> port for the
    tags of ALL_TAGS to include (others may come through extra_inbounds)."""
    inbounds = []
    if api_inbound:
        # The panel's default config carries its own API inbound and rule;
        # the node must replace them with its own (spec §9 step 3).
        inbounds.append({"tag": "API_INBOUND", "listen": "127.0.0.1", "port": 62051,
                         "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}})
    sniff = {"enabled": True, "destOverride": ["http", "tls"]}
    for tag, port in ports.items():
        proto = PROTOCOL_OF[tag]
        settings = {"clients": []}
        if proto == "vless":
            settings["decryption"] = "none"
            if vless_flow is not None:
                settings["flow"] = vless_flow
        if proto == "shadowsocks":
            settings["network"] = "tcp,udp"
            if ss_method:
                settings["method"] = ss_method
        inbounds.append({"tag": tag, "listen": "127.0.0.1", "port": port, "protocol": proto,
                         "settings": settings, "streamSettings": {"network": "tcp",
                                                                  "security": "none"},
                         "sniffing": sniff})
    inbounds.extend(extra_inbounds)
    outbounds = [{"protocol": "freedom", "tag": "DIRECT"}]
    if blackhole:
        outbounds.append({"protocol": "blackhole", "tag": "BLOCK"})
    rules = [{"type": "field", "inboundTag": ["API_INBOUND"], "outboundTag": "API"},
             {"type": "field", "ip": ["geoip:private"], "outboundTag": "DIRECT"}]
    if blackhole:
        rules += [{"type": "field", "domain": ["domain:blocked.example"], "outboundTag": "BLOCK"},
                  {"type": "field", "protocol": ["bittorrent"], "outboundTag": "BLOCK"}]
    levels = {"0": {"handshake": 4, "connIdle": 300}}
    if online:
        levels["0"]["statsUserOnline"] = True
    cfg = {
        "log": {"loglevel": loglevel, "access": "", "error": ""},
        "api": {"services": ["HandlerService", "StatsService", "LoggerService"], "tag": "API"},
        "stats": {},
        "policy": policy if policy is not None else {
            "levels": levels,
            "system": {"statsInboundUplink": True, "statsInboundDownlink": True,
                       "statsOutboundUplink": True, "statsOutboundDownlink": True}},
        "inbounds": inbounds,
        "outbounds": outbounds,
        "routing": {"domainStrategy": "AsIs", "rules": rules},
        "transport": {"tcpSettings": {}},  # a key the node drops (spec §9 step 1)
    }
    return cfg


def make_user(pb, email, inbounds=ALL_TAGS, *, uid=None, password=None, ss_method=SS_METHOD,
              flow="", present=("vmess", "vless", "trojan", "shadowsocks", "wireguard",
                                "hysteria")):
    """A pb.User like the panel sends: every Proxy sub-message present
    (empty ones included) unless left out of `present`."""
    uid = uid or user_uuid(email)
    password = user_password(email) if password is None else password
    p = pb.Proxy()
    if "vmess" in present:
        p.vmess.id = uid
    if "vless" in present:
        p.vless.id = uid
        p.vless.flow = flow
    if "trojan" in present:
        p.trojan.password = password
    if "shadowsocks" in present:
        p.shadowsocks.password = password
        p.shadowsocks.method = ss_method
    if "wireguard" in present:
        p.wireguard.SetInParent()
    if "hysteria" in present:
        p.hysteria.SetInParent()
    return pb.User(email=email, proxies=p, inbounds=list(inbounds))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def frame(msg):
    """One chunked-sync frame: uvarint length + bytes."""
    data = msg if isinstance(msg, (bytes, bytearray)) else msg.SerializeToString()
    return varint(len(data)) + data


# ---- the panel ----------------------------------------------------------------------------

def parse_stats(resp):
    """StatResponse -> {(name, link, type): value}."""
    return {(s.name, s.link, s.type): s.value for s in resp.stats}


class Panel:
    """Drives one node like the PasarGuard panel: gRPC by default, REST
    through .rest(). Keeps one channel open."""

    def __init__(self, node, pb):
        self.node, self.pb = node, pb
        self.client = node.grpc(options=[("grpc.max_receive_message_length", 256 << 20),
                                         ("grpc.max_send_message_length", 256 << 20)])
        self.config = None
        self.users = []

    def close(self):
        self.client.close()

    # -- calls
    def call(self, method, request=b"", response=None, timeout=None):
        return self.client.unary(method, request, response, timeout=timeout or T(20))

    def start(self, config, users=(), keep_alive=0, exclude=(), timeout=None):
        self.config = config
        self.users = list(users)
        cfg = config if isinstance(config, str) else json.dumps(config, indent=2)
        req = self.pb.Backend(type=self.pb.XRAY, config=cfg, users=list(users),
                              keep_alive=keep_alive, exclude_inbounds=list(exclude))
        return self.call("Start", req, self.pb.BaseInfoResponse, timeout=timeout or T(30))

    def info(self):
        return self.call("GetBaseInfo", self.pb.Empty(), self.pb.BaseInfoResponse)

    def stop(self):
        return self.call("Stop", self.pb.Empty(), self.pb.Empty)

    def stats(self, type_, name="", reset=False):
        r = self.call("GetStats", self.pb.StatRequest(name=name, reset=reset, type=type_),
                      self.pb.StatResponse)
        return parse_stats(r)

    def user_traffic(self, email, reset=False):
        """(uplink, downlink) of one user (0 when absent)."""
        st = self.stats(USER, email, reset)
        return (st.get((email, "traffic", "uplink"), 0), st.get((email, "traffic", "downlink"), 0))

    def backend_stats(self):
        return self.call("GetBackendStats", self.pb.Empty(), self.pb.BackendStatsResponse)

    def system_stats(self):
        return self.call("GetSystemStats", self.pb.Empty(), self.pb.SystemStatsResponse)

    def sync_user(self, *users, timeout=None):
        f = self.client.channel.stream_unary("/service.NodeService/SyncUser",
                                             request_serializer=lambda m: m.SerializeToString(),
                                             response_deserializer=self.pb.Empty.FromString)
        return f(iter(list(users)), metadata=self.client.metadata(), timeout=timeout or T(30))

    def sync_users(self, users, timeout=None):
        return self.call("SyncUsers", self.pb.Users(users=list(users)), self.pb.Empty,
                         timeout=timeout or T(60))

    def sync_chunked(self, chunks, timeout=None):
        f = self.client.channel.stream_unary("/service.NodeService/SyncUsersChunked",
                                             request_serializer=lambda m: m.SerializeToString(),
                                             response_deserializer=self.pb.Empty.FromString)
        return f(iter(list(chunks)), metadata=self.client.metadata(), timeout=timeout or T(60))

    def rest(self, method, path, body=b"", headers=None, stream=False, timeout=None):
        s = self.node.session()
        data = body.SerializeToString() if hasattr(body, "SerializeToString") else body
        h = {"Content-Type": "application/x-protobuf"}
        h.update(headers or {})
        r = s.request(method, self.node.url + path, data=data, headers=h, stream=stream,
                      timeout=timeout or T(20))
        if not stream:
            s.close()
        return r

    def error(self, fn, *a, **kw):
        try:
            r = fn(*a, **kw)
        except grpc.RpcError as e:
            return e.code(), e.details()
        raise AssertionError(f"expected a gRPC error, got {r!r}")

    # -- waiting for counters
    def settled_traffic(self, email, at_least=0, timeout=None):
        """Reads a user's counters (without reset) until downlink >= at_least
        and two reads 0.3 s apart agree; returns (up, down)."""
        deadline = time.monotonic() + (timeout or T(10))
        last = None
        while True:
            cur = self.user_traffic(email)
            if cur == last and cur[1] >= at_least:
                return cur
            if time.monotonic() > deadline:
                raise AssertionError(f"user {email}: counters did not settle at >= {at_least} "
                                     f"downlink bytes: last {cur}")
            last = cur
            time.sleep(0.3)


# ---- HTTP file server ------------------------------------------------------------------------

class FileServer:
    """python's http.server in a thread on 127.0.0.1, serving generated files
    of known sizes (name -> size). Records each request path."""

    def __init__(self, directory, files):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.sizes = {}
        for name, size in files.items():
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                left = size
                block = os.urandom(1 << 20)
                while left:
                    n = min(left, len(block))
                    f.write(block[:n])
                    left -= n
            self.sizes[name] = size
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=outer.dir, **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append((self.client_address, self.path))
                try:
                    super().do_GET()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- the client-side v2ray and curl -------------------------------------------------------------

def outbound_for(protocol, port, email, *, uid=None, password=None, ss_method="chacha20-poly1305"):
    """A client outbound of `protocol` to the node's core inbound on `port`
    with user `email`'s credentials."""
    uid = uid or user_uuid(email)
    password = user_password(email) if password is None else password
    if protocol == "vmess":
        s = {"vnext": [{"address": "127.0.0.1", "port": port,
                        "users": [{"id": uid, "alterId": 0, "security": "aes-128-gcm"}]}]}
    elif protocol == "vless":
        s = {"vnext": [{"address": "127.0.0.1", "port": port,
                        "users": [{"id": uid, "encryption": "none"}]}]}
    elif protocol == "trojan":
        s = {"servers": [{"address": "127.0.0.1", "port": port, "password": password}]}
    elif protocol == "shadowsocks":
        s = {"servers": [{"address": "127.0.0.1", "port": port, "method": ss_method,
                          "password": password}]}
    else:
        raise ValueError(protocol)
    return {"protocol": protocol, "settings": s}


class V2rayClient:
    """A second /usr/bin/v2ray acting as the user's client: one socks inbound
    per route, routed to one outbound each. routes: name -> outbound dict
    (from outbound_for). .socks[name] is the socks port."""

    def __init__(self, directory, routes):
        need_tool("v2ray", V2RAY)
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.socks = {}
        inbounds, outbounds, rules = [], [], []
        for i, (name, ob) in enumerate(routes.items()):
            port = free_port()
            self.socks[name] = port
            inbounds.append({"tag": f"in{i}", "listen": "127.0.0.1", "port": port,
                             "protocol": "socks", "settings": {"auth": "noauth", "udp": False}})
            ob = dict(ob, tag=f"out{i}")
            outbounds.append(ob)
            rules.append({"type": "field", "inboundTag": [f"in{i}"], "outboundTag": f"out{i}"})
        cfg = {"log": {"loglevel": "warning"}, "inbounds": inbounds, "outbounds": outbounds,
               "routing": {"rules": rules}}
        self.config_path = os.path.join(directory, "client.json")
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=1)
        self.log_path = os.path.join(directory, "client.log")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([V2RAY, "-config", self.config_path],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + T(10)
        for port in self.socks.values():
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"client v2ray exited {self.proc.returncode}:\n"
                                         + self.log())
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError("client v2ray socks port never opened\n" + self.log())
                    time.sleep(0.02)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except FileNotFoundError:
            return ""

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def curl_env():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    return env  # no *_proxy variables: loopback only


def curl_args(socks_port, url, *, limit_rate=None, max_time=None, out=os.devnull):
    args = [need_tool("curl"), "-sS", "--socks5-hostname", f"127.0.0.1:{socks_port}",
            "-o", out, "-w", "%{http_code} %{size_download}", "--max-time",
            str(max_time or T(20))]
    if limit_rate:
        args += ["--limit-rate", str(limit_rate)]
    return args + [url]


def curl(socks_port, url, **kw):
    """Downloads url through the socks port. Returns (rc, http_code, bytes, stderr)."""
    p = subprocess.run(curl_args(socks_port, url, **kw), capture_output=True, text=True,
                       env=curl_env(), timeout=(kw.get("max_time") or T(20)) + 10)
    code, size = parse_curl_out(p.stdout)
    return p.returncode, code, size, p.stderr


def curl_bg(socks_port, url, **kw):
    """Starts a download in the background; .wait() → (rc, code, bytes, stderr)."""
    p = subprocess.Popen(curl_args(socks_port, url, **kw), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=curl_env())

    class Bg:
        proc = p

        def wait(self, timeout=None):
            out, err = p.communicate(timeout=timeout or T(60))
            code, size = parse_curl_out(out)
            return p.returncode, code, size, err

        def running(self):
            return p.poll() is None

        def kill(self):
            if p.poll() is None:
                p.kill()
                p.communicate()
    return Bg()


def parse_curl_out(out):
    m = re.search(r"(\d+) (\d+)", out or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def download_ok(socks_port, url, size, what=""):
    rc, code, got, err = curl(socks_port, url)
    assert (rc, code, got) == (0, 200, size), \
        f"download {what} via socks {socks_port} failed: curl rc {rc}, HTTP {code}, " \
        f"{got}/{size} bytes, {err.strip()}"


def download_refused(socks_port, url, what="", max_time=None):
    rc, code, got, err = curl(socks_port, url, max_time=max_time or T(5))
    assert rc != 0 and code != 200, \
        f"download {what} should have been refused, got curl rc {rc}, HTTP {code}, {got} bytes"


# ---- processes -------------------------------------------------------------------------------

def children(pid):
    """PIDs whose parent is pid (from /proc)."""
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
        if rest[0] != "Z" and int(rest[1]) == pid:
            out.append(int(d))
    return out


def alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rfind(")") + 2] != "Z"


def exists(pid):
    """True while pid exists at all (a zombie too: not reaped yet)."""
    return os.path.exists(f"/proc/{pid}")


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def core_pids(node):
    """The node's core processes (its children)."""
    if node.proc is None or node.proc.poll() is not None:
        return []
    return children(node.proc.pid)


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def one_core(node, timeout=None):
    """Waits until the node has exactly one core child; returns its pid."""
    pids = wait_for(lambda: (lambda p: p if len(p) == 1 else None)(core_pids(node)),
                    timeout or T(10), f"exactly one core process of node pid {node.proc.pid} "
                    f"(have {core_pids(node)})")
    return pids[0]


def stray_processes(marker):
    """PIDs (not zombies) whose command line contains marker (a temp path)."""
    p = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split() if int(x) != os.getpid() and alive(int(x))]


def kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- a node with a core, a panel, a file server and clients --------------------------------------

class Site:
    """One node under test with its panel, a file server, the core's inbound
    ports and the client v2rays started for it. close() stops everything and
    checks that no core or client process is left."""

    def __init__(self, workdir, pb, env=None, core=V2RAY, tags=ALL_TAGS, files=None,
                 fileserver=None):
        self.dir = str(workdir)
        self.pb = pb
        from pnnode import Node
        self.node = Node(os.path.join(self.dir, "node"), env=env, core=core)
        self.node.start()
        self.panel = Panel(self.node, pb)
        self.ports = {t: free_port() for t in tags}
        self.own_files = fileserver is None
        self.files = fileserver or FileServer(os.path.join(self.dir, "www"),
                                              files or {"f1m": 1 << 20})
        self.clients = []
        self.seen_cores = set()
        self.nclient = 0

    # -- panel shortcuts
    def config(self, **kw):
        return panel_config(self.ports, **kw)

    def users(self, emails, **kw):
        return [make_user(self.pb, e, **kw) for e in emails]

    def start(self, users=("1", "2"), config=None, **kw):
        us = [u if not isinstance(u, str) else make_user(self.pb, u) for u in users]
        r = self.panel.start(config if config is not None else self.config(), us, **kw)
        assert r.started, r
        self.note_cores()
        return r

    def note_cores(self):
        pids = core_pids(self.node)
        self.seen_cores.update(pids)
        return pids

    def core(self):
        pid = one_core(self.node)
        self.seen_cores.add(pid)
        return pid

    # -- traffic
    def client(self, routes):
        """routes: name -> (tag, email) or an outbound dict."""
        obs = {}
        for name, r in routes.items():
            if isinstance(r, tuple):
                tag, email = r[0], r[1]
                kw = r[2] if len(r) > 2 else {}
                obs[name] = outbound_for(PROTOCOL_OF[tag], self.ports[tag], email, **kw)
            else:
                obs[name] = r
        self.nclient += 1
        c = V2rayClient(os.path.join(self.dir, f"client{self.nclient}"), obs)
        self.clients.append(c)
        return c

    def url(self, name="f1m"):
        return self.files.url(name)

    def size(self, name="f1m"):
        return self.files.sizes[name]

    # -- teardown
    def close(self, check=True):
        for c in self.clients:
            c.close()
        self.panel.close()
        errors = []
        if self.node.proc is not None and self.node.proc.poll() is None:
            self.note_cores()
            try:
                self.node.stop(check=check)
            except AssertionError as e:
                errors.append(str(e))
        if self.own_files:
            self.files.close()
        left = [p for p in self.seen_cores if alive(p)]
        if left:
            kill_pids(left)
            errors.append(f"core processes left after the node stopped: {left}")
        strays = stray_processes(self.dir)
        if strays:
            desc = [(p, cmdline(p)) for p in strays]
            kill_pids(strays)
            errors.append(f"stray processes under {self.dir}: {desc}")
        if errors and check:
            raise AssertionError("\n".join(errors))


def reset_all(panel):
    """Zeroes every user counter (a reset read)."""
    panel.stats(USERS, reset=True)


def assert_user_counts(st, email, size, slack=2048, what=""):
    up = st.get((email, "traffic", "uplink"), 0)
    down = st.get((email, "traffic", "downlink"), 0)
    assert size <= down <= size + slack and 0 < up < 2048, \
        f"{what}: user {email} counted up {up} / down {down}, expected down in " \
        f"[{size}, {size + slack}] and 0 < up < 2048; all stats: {st}"
    return up, down
