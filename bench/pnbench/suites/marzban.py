"""The Marzban profile (spec/marzban.md, issue 4) on loopback with the real
core, next to the reference Python Marzban-node's figures from spec §12
(stated, not measured: that node is not installable here):

- start-up: exec -> SERVICE_PORT accepting (fresh process per run, the
  certificates present), plus one first start that generates them;
- idle memory: VmRSS / RssAnon / VmHWM 0.5 s after the node listens, no
  session;
- REST: POST /ping with the session JSON on keep-alive mTLS connections
  (tlsrate.c -K, one request in flight per connection) and new mTLS
  connections per second (tlsrate.c: full handshake with the panel's
  RSA-4096 v1 client certificate, one /ping, Connection: close; also with an
  ECDSA P-256 client certificate the panel's certificate issued, to show
  the node's side), each with the node's CPU per 10k requests;
- /start -> 200 with a Marzban-style config (VLESS, VMess and Trojan
  inbounds with users inline), /stop between runs, next to the core alone
  on the same config (exec -> its "started" line), and the node's VmRSS
  with the core running;
- /logs: 10 WebSocket subscribers (mzlogreaders.py, python3-websockets,
  its own process) while traffic.py makes the core log at loglevel info, on
  a node of its own with DEBUG=true (its echo counts the core lines it
  read): lines/s per subscriber and in total, the core lines the worst
  subscriber lost (0 = every subscriber got every line), and the same load
  with interval=0.7 as the panel's log viewer asks.

The panel's certificate is made as the panel makes it: RSA 4096, X.509 v1,
CN=Gozargah, sha512, self-signed (openssl CLI). The node generates its own
certificate on its first start (ECDSA P-256, CN/SAN Gozargah)."""
import http.client
import importlib.util
import json
import os
import re
import select
import ssl
import statistics
import subprocess
import sys
import time
import uuid

from .. import util
from ..node import MZ_READY_LINE, MzNode, exec_to_accepting

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
G_MEM = "Marzban profile: start-up and idle memory"
G_REST = "Marzban profile: REST"
G_START = "Marzban profile: /start"
G_LOGS = "Marzban profile: /logs"
SETTLE = 0.5
REF = "reference node (stated, spec §12)"
# The reference Python node on the same kind of 2-core machine (spec/marzban.md §12).
REF_LISTEN_MS = 345.0   # 0.32-0.37 s with certificates present
REF_FIRST_MS = 3900.0   # first start including RSA-4096 key generation
REF_IDLE_MIB = 42.0
REF_RSS_CORE_MIB = 45.2  # 43.7-46.7 MB with Xray running
REF_PING_RPS = 1534.0   # keep-alive, one client
REF_PING_CPU = 4.8      # 0.48 ms CPU per request -> s per 10k
REF_NEWCONN_RPS = 57.0  # new mTLS connection per /ping, RSA-4096
REF_NEWCONN_CPU = 94.0  # 9.4 ms CPU per request -> s per 10k
REF_START_MS = 3000.0   # fixed 3 s wait (3.01-3.06 s observed)

TAGS = {"VLESS TCP": "vless", "VMess TCP": "vmess", "Trojan TCP": "trojan"}


def ref(value):
    return {"title": REF, "runs": [value], "stated": True}


# ---- the panel's PKI and client ---------------------------------------------------------------

def _openssl(*args):
    p = subprocess.run(["openssl"] + list(args), capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {p.stderr}")
    return p.stdout


class Pki:
    """panel: the panel's own v1 certificate (RSA 4096, sha512, CN=Gozargah),
    used as SSL_CLIENT_CERT_FILE and as the client certificate. ec: an
    ECDSA P-256 client certificate issued by the panel's (chains to it)."""

    def __init__(self, d):
        os.makedirs(d, exist_ok=True)
        self.panel_key = os.path.join(d, "panel.key")
        self.panel_crt = os.path.join(d, "panel.crt")
        csr = os.path.join(d, "panel.csr")
        _openssl("genrsa", "-out", self.panel_key, "4096")
        _openssl("req", "-new", "-key", self.panel_key, "-subj", "/CN=Gozargah", "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-signkey", self.panel_key, "-days", "36500",
                 "-sha512", "-out", self.panel_crt)
        self.ec_key = os.path.join(d, "ec.key")
        self.ec_crt = os.path.join(d, "ec.crt")
        ec_csr = os.path.join(d, "ec.csr")
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", self.ec_key)
        _openssl("req", "-new", "-key", self.ec_key, "-subj", "/CN=panel-ec", "-out", ec_csr)
        _openssl("x509", "-req", "-in", ec_csr, "-CA", self.panel_crt, "-CAkey",
                 self.panel_key, "-set_serial", "2", "-days", "3650", "-out", self.ec_crt)


class Panel:
    """The panel's REST client on one keep-alive mTLS connection: the
    node's certificate pinned (no hostname check), the panel's client
    certificate, JSON bodies with the current session_id."""

    def __init__(self, node, pki):
        self.node = node
        self.sid = None
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.load_verify_locations(node.cert)
        self.ctx.load_cert_chain(pki.panel_crt, pki.panel_key)
        self.conn = None

    def post(self, path, body=None, timeout=30):
        """Returns (status, parsed body, seconds)."""
        data = json.dumps(body if body is not None else {"session_id": self.sid}).encode()
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection("127.0.0.1", self.node.port,
                                                        context=self.ctx, timeout=timeout)
                self.conn.connect()
            self.conn.timeout = timeout
            self.conn.sock.settimeout(timeout)
            t0 = time.perf_counter()
            try:
                self.conn.request("POST", path, body=data,
                                  headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                raw = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()  # a connection the node closed while idle: once more on a new one
                if attempt:
                    raise
                continue
            took = time.perf_counter() - t0
            return r.status, (json.loads(raw) if raw else None), took

    def connect(self):
        st, body, _ = self.post("/connect", {"session_id": None})
        if st != 200:
            raise RuntimeError(f"/connect answered {st} {body}")
        self.sid = body["session_id"]
        return body

    def start(self, config):
        body = {"session_id": self.sid, "config": json.dumps(config)}
        return self.post("/start", body, timeout=60)

    def stop(self):
        """Returns the seconds /stop took."""
        st, body, took = self.post("/stop")
        if st != 200:
            raise RuntimeError(f"/stop answered {st} {body}")
        return took

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---- configs ----------------------------------------------------------------------------------

def user_uuid(mail):
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "pnbench-mz-" + mail))


def mz_config(ports, users, loglevel="warning", sniffing=True):
    """A Marzban 0.8.4-style xray_config: the panel's API inbound and rule
    (the node replaces both), api, stats, the panel's policy, and one
    inbound per tag in `ports` with every user inline (emails "<id>.<name>").
    sniffing=False for the log generator: v2ray's sniffer waits for a
    payload it can recognise, which would throttle the connections."""
    inbounds = [{"listen": "0.0.0.0", "port": 62051, "protocol": "dokodemo-door",
                 "settings": {"address": "127.0.0.1"}, "tag": "API_INBOUND"}]
    for tag, port in ports.items():
        proto = TAGS[tag]
        if proto == "trojan":
            clients = [{"password": "pw-" + m, "email": m} for m in users]
        else:
            clients = [{"id": user_uuid(m), "email": m} for m in users]
        settings = {"clients": clients}
        if proto == "vless":
            settings["decryption"] = "none"
        inbounds.append({"tag": tag, "listen": "127.0.0.1", "port": port, "protocol": proto,
                         "settings": settings,
                         "streamSettings": {"network": "tcp", "security": "none"},
                         "sniffing": {"enabled": sniffing, "destOverride": ["http", "tls"]}})
    return {
        "log": {"loglevel": loglevel},
        "routing": {"rules": [
            {"inboundTag": ["API_INBOUND"], "source": ["127.0.0.1"], "outboundTag": "API",
             "type": "field"},
            {"ip": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"], "outboundTag": "BLOCK",
             "type": "field"}]},
        "inbounds": inbounds,
        "outbounds": [{"protocol": "freedom", "tag": "DIRECT"},
                      {"protocol": "blackhole", "tag": "BLOCK"}],
        "api": {"services": ["HandlerService", "StatsService", "LoggerService"], "tag": "API"},
        "stats": {},
        "policy": {"levels": {"0": {"statsUserUplink": True, "statsUserDownlink": True}},
                   "system": {"statsInboundDownlink": False, "statsInboundUplink": False,
                              "statsOutboundDownlink": True, "statsOutboundUplink": True}},
    }


def as_node_runs_it(cfg, cert, key):
    """cfg as the node hands it to the core (spec §7, as observed through a
    recording wrapper): the panel's API inbound and rules replaced by the
    TLS API_INBOUND (the node's certificate) and the node's own loopback
    API inbound PN_NODE_API, each with its rule; api and stats overwritten.
    Ports are given fresh by the caller."""
    c = json.loads(json.dumps(cfg))
    api_tag = (c.get("api") or {}).get("tag")
    c["inbounds"] = [ib for ib in c["inbounds"] if not (
        ib.get("protocol") == "dokodemo-door" and ib.get("tag") == "API_INBOUND")]
    rules = [r for r in c["routing"]["rules"] if api_tag is None or r.get("outboundTag") != api_tag]
    c["api"] = {"services": ["HandlerService", "StatsService", "LoggerService"], "tag": "API"}
    c["stats"] = {}
    c["inbounds"][0:0] = [
        {"listen": "127.0.0.1", "port": 0, "protocol": "dokodemo-door",
         "settings": {"address": "127.0.0.1"},
         "streamSettings": {"security": "tls", "tlsSettings": {"certificates": [
             {"certificateFile": cert, "keyFile": key}]}}, "tag": "API_INBOUND"},
        {"tag": "PN_NODE_API", "listen": "127.0.0.1", "port": 0, "protocol": "dokodemo-door",
         "settings": {"address": "127.0.0.1"}}]
    rules[0:0] = [{"inboundTag": ["API_INBOUND"], "source": ["127.0.0.1", "127.0.0.1"],
                   "outboundTag": "API", "type": "field"},
                  {"type": "field", "inboundTag": ["PN_NODE_API"], "source": ["127.0.0.1"],
                   "outboundTag": "API"}]
    c["routing"]["rules"] = rules
    return c


def users(n):
    return [f"{i}.user{i}" for i in range(1, n + 1)]


# ---- helpers ----------------------------------------------------------------------------------

def _tlsrate(ctx, node, seconds, threads, body, cert, key, keepalive):
    args = [ctx.tools["tlsrate"]] + (["-K"] if keepalive else []) + [
        "-c", cert, "-k", key, "-b", json.dumps(body), str(node.port), str(seconds),
        str(threads), "/ping"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"tlsrate failed ({p.returncode}): {p.stderr}")
    return json.loads(p.stdout)


def _no_core(node, timeout=15):
    util.wait_for(lambda: not node.core_pids(), timeout, "the node's core to exit",
                  interval=0.005)


def _core_alone_started(ctx, config, timeout=30.0):
    """The core alone on `config` with fresh ports: exec -> its "started"
    line on stdout (v2ray prints "V2Ray 4.34.0 started"). Returns seconds."""
    cfg = json.loads(json.dumps(config))
    for ib, port in zip(cfg["inbounds"], util.free_ports(len(cfg["inbounds"]))):
        ib["port"] = port
        ib["listen"] = "127.0.0.1"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "XRAY_LOCATION_ASSET": "/usr/local/share/xray",
           "V2RAY_LOCATION_ASSET": "/usr/local/share/xray"}
    data = json.dumps(cfg).encode()
    t0 = time.perf_counter()
    p = util.spawn([ctx.core, "-config", "stdin:"], stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        p.stdin.write(data)
        p.stdin.close()
        buf = b""
        deadline = t0 + timeout
        while b" started" not in buf:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise RuntimeError(f"core alone not started within {timeout} s: {buf[-500:]!r}")
            r, _, _ = select.select([p.stdout], [], [], left)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"core alone exited: {buf[-1000:]!r}")
                buf += chunk
        return time.perf_counter() - t0
    finally:
        util.stop(p)


# ---- the parts --------------------------------------------------------------------------------

def _startup(ctx, pki):
    rep, P = ctx.report, ctx.P
    # First start: no certificate files, the node generates them (one sample).
    t_first, first = exec_to_accepting(ctx.binary, os.path.join(ctx.tmp, "mz0"),
                                       {"SSL_CLIENT_CERT_FILE": pki.panel_crt}, cls=MzNode,
                                       timeout=30.0)
    ctx.nodes.append(first)
    util.wait_for(lambda: MZ_READY_LINE in first.log(), 10, "the Marzban ready line")
    env = {k: v for k, v in first.env.items() if k != "SERVICE_PORT"}
    first.stop()
    ctx.nodes.remove(first)

    times, rss, anon, hwm, threads = [], [], [], [], []
    for i in range(P["mz_exec_runs"]):
        t, n = exec_to_accepting(ctx.binary, os.path.join(ctx.tmp, f"mz{i + 1}"), env,
                                 cls=MzNode)
        ctx.nodes.append(n)
        times.append(t)
        util.wait_for(lambda: MZ_READY_LINE in n.log(), 5, "the Marzban ready line")
        time.sleep(SETTLE)
        s = util.status(n.pid)
        rss.append(s["VmRSS"])
        anon.append(s["RssAnon"])
        hwm.append(s["VmHWM"])
        threads.append(len(os.listdir(f"/proc/{n.pid}/task")))
        n.stop()
        ctx.nodes.remove(n)

    rep.figure("mz_exec_to_accepting", "exec -> SERVICE_PORT accepting (certificates present)",
               "ms", [util.ms(t) for t in times], group=G_MEM, reference=ref(REF_LISTEN_MS),
               note="Python fork+exec included; poll: non-blocking connect every 0.2 ms")
    rep.figure("mz_first_start", "  first start, generating its certificate (1 run)", "ms",
               [util.ms(t_first)], group=G_MEM, reference=ref(REF_FIRST_MS),
               note="proxynode generates ECDSA P-256; the reference generates RSA 4096")
    rep.figure("mz_idle_rss", "idle node VmRSS (no session)", "MiB", [util.mib(x) for x in rss],
               group=G_MEM, reference=ref(REF_IDLE_MIB), extra={"threads": threads})
    rep.figure("mz_idle_rss_anon", "idle node RssAnon (private)", "MiB",
               [util.mib(x) for x in anon], group=G_MEM)
    rep.figure("mz_idle_hwm", "idle node VmHWM (peak RSS)", "MiB", [util.mib(x) for x in hwm],
               group=G_MEM)
    rep.target("mz_idle", "Marzban idle VmRSS below the reference node's ~42 MB",
               rep.get("mz_idle_rss")["median"], REF_IDLE_MIB, "<=", "MiB", "mz_idle_rss")
    return env


def _rest(ctx, pki, node, panel):
    rep, P = ctx.report, ctx.P
    body = {"session_id": panel.sid}
    st, b, _ = panel.post("/ping")
    if (st, b) != (200, {}):
        raise RuntimeError(f"/ping answered {st} {b}")
    conns = P["mz_ping_conns"]
    _tlsrate(ctx, node, 0.5, conns, body, pki.panel_crt, pki.panel_key, True)  # warm-up

    rps, cpu, bad = [], [], 0
    s0 = util.status(node.pid)
    for _ in range(P["mz_ping_runs"]):
        c0 = util.cpu_seconds(node.pid)
        r = _tlsrate(ctx, node, P["mz_ping_secs"], conns, body, pki.panel_crt, pki.panel_key,
                     True)
        c1 = util.cpu_seconds(node.pid)
        bad += r["failed"]
        rps.append(r["ok"] / r["seconds"])
        cpu.append((c1 - c0) / max(1, r["ok"]) * 10000)
    s1 = util.status(node.pid)
    rep.figure("mz_ping_rps", f"POST /ping req/s, keep-alive mTLS ({conns} conn)", "req/s", rps,
               group=G_REST, digits=0, reference=ref(REF_PING_RPS),
               extra={"seconds_per_run": P["mz_ping_secs"], "connections": conns,
                      "failed_requests": bad,
                      "rss_growth_mib": util.mib(s1["VmRSS"] - s0["VmRSS"])},
               note="reference: one client; here one request in flight per connection")
    rep.figure("mz_ping_cpu", "  node CPU per 10k /ping (keep-alive)", "cpu s", cpu,
               group=G_REST, digits=3, reference=ref(REF_PING_CPU))

    for fid, title, crt, key, runs, reference, ref_cpu in (
            ("mz_newconn", "new mTLS connections/s (RSA-4096 v1 panel cert, /ping)",
             pki.panel_crt, pki.panel_key, P["mz_tls_runs"], ref(REF_NEWCONN_RPS),
             ref(REF_NEWCONN_CPU)),
            ("mz_newconn_ec", "new mTLS connections/s (ECDSA P-256 client cert)",
             pki.ec_crt, pki.ec_key, 1, None, None)):
        rate, cpu, failed, reused = [], [], 0, 0
        for _ in range(runs):
            c0 = util.cpu_seconds(node.pid)
            r = _tlsrate(ctx, node, P["mz_tls_secs"], 2, body, crt, key, False)
            c1 = util.cpu_seconds(node.pid)
            failed += r["failed"]
            reused += r["reused"]
            rate.append(r["ok"] / r["seconds"])
            cpu.append((c1 - c0) / max(1, r["ok"]) * 10000)
        rep.figure(fid, title, "conn/s", rate, group=G_REST, digits=0, reference=reference,
                   extra={"failed": failed, "resumed": reused, "client_threads": 2,
                          "tls": "TLS 1.3, X25519, the node's ECDSA P-256 certificate"})
        rep.figure(fid + "_cpu", "  node CPU per 10k new mTLS connections", "cpu s", cpu,
                   group=G_REST, digits=3, reference=ref_cpu)


def _start(ctx, node, panel):
    rep, P = ctx.report, ctx.P
    ports = dict(zip(TAGS, util.free_ports(len(TAGS))))
    nu = P["mz_start_users"]
    cfg = mz_config(ports, users(nu))
    lat, rss, anon, stops = [], [], [], []
    for _ in range(P["mz_start_runs"]):
        st, b, took = panel.start(cfg)
        if st != 200 or not b.get("started"):
            raise RuntimeError(f"/start answered {st} {b}\n{node.log()[-2000:]}")
        lat.append(took)
        time.sleep(SETTLE)
        s = util.status(node.pid)
        rss.append(s["VmRSS"])
        anon.append(s["RssAnon"])
        stops.append(util.ms(panel.stop()))
        _no_core(node)
    alone = as_node_runs_it(cfg, node.cert, node.keyfile)
    core = [_core_alone_started(ctx, alone) for _ in range(P["mz_start_runs"])]
    f = rep.figure("mz_start", f"/start -> 200 ({len(TAGS)} inbounds x {nu} users)", "ms",
                   [util.ms(x) for x in lat], group=G_START,
                   reference={"title": "core alone, same config: exec -> started",
                              "runs": [util.ms(x) for x in core]},
                   extra={"config_bytes": len(json.dumps(cfg)),
                          "reference_node_ms": REF_START_MS, "stop_ms": stops},
                   note="the node answers once the core is ready; /stop between runs")
    rep.figure("mz_start_vs_reference", "  /start, against the reference node's fixed wait",
               "ms", f["runs"], group=G_START, reference=ref(REF_START_MS))
    rep.figure("mz_rss_core", "node VmRSS with the core running", "MiB",
               [util.mib(x) for x in rss], group=G_START, reference=ref(REF_RSS_CORE_MIB))
    rep.figure("mz_anon_core", "node RssAnon with the core running", "MiB",
               [util.mib(x) for x in anon], group=G_START)
    rep.target("mz_start", "Marzban /start faster than the reference node's fixed 3 s",
               f["median"], REF_START_MS, "<=", "ms", "mz_start")


def _readline(p, timeout):
    r, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if r else ""


# A core line as the DEBUG node echoes it: "<node time> DEBUG <v2ray's own timestamp> ...".
CORE_LINE = re.compile(rb"^\S+ DEBUG \d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", re.M)


def _core_lines_since(node, offset):
    """Core lines the node read (its DEBUG echo in its log) after `offset`."""
    with open(node.log_path, "rb") as f:
        f.seek(offset)
        return len(CORE_LINE.findall(f.read()))


def _logs_run(ctx, pki, node, panel, vport, uids, secs, nsub, interval=None):
    """One run: nsub subscribers (each first gets the backlog), then the
    generator for `secs`; the subscribers read until their streams are
    quiet. Counts what arrived after the generator started, next to the core
    lines the node read meanwhile."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": BENCH_DIR}
    rd = util.spawn([sys.executable, "-m", "pnbench.mzlogreaders", str(node.port), panel.sid,
                     pki.panel_crt, pki.panel_key, str(secs * 5 + 10), str(nsub)]
                    + ([str(interval)] if interval else []),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                    cwd=BENCH_DIR)
    try:
        line = _readline(rd, 20)
        if line.strip() != "ready":
            raise RuntimeError(f"/logs subscribers not ready: {line!r}")
        time.sleep(max(SETTLE, 1.5 * (interval or 0)))  # the backlog arrives before we count
        off = os.path.getsize(node.log_path)
        c0 = util.cpu_seconds(node.pid)
        t0 = time.monotonic()
        gen = util.spawn([sys.executable, "-m", "pnbench.traffic", str(vport), str(secs), uids],
                         stdout=subprocess.PIPE, text=True, env=env, cwd=BENCH_DIR)
        out, _ = gen.communicate(timeout=secs + 60)
        util.stop(gen)
        rd_out, _ = rd.communicate(input=f"{t0}\n", timeout=secs * 5 + 30)
        c1 = util.cpu_seconds(node.pid)
    finally:
        util.stop(rd)
    produced = _core_lines_since(node, off)
    last = rd_out.strip().splitlines()[-1] if rd_out.strip() else ""
    if not last.startswith("{"):
        raise RuntimeError(f"/logs subscribers failed: {rd_out[-2000:]!r}")
    subs = json.loads(last)["subscribers"]
    closed = [s["closed"] for s in subs if s["closed"]]
    if closed:
        raise RuntimeError(f"/logs streams closed early: {closed}")
    lines = [s["count"] for s in subs]
    t_last = max([s["t_last"] for s in subs if s["t_last"]] or [t0 + 1e-6])
    rates = sorted(s["count"] / max(1e-6, (s["t_last"] or t0) - t0) for s in subs)
    return {"per_sub": rates[len(rates) // 2], "total": sum(lines) / max(1e-6, t_last - t0),
            "lost": max(produced - n for n in lines), "lines": lines, "produced": produced,
            "cpu": (c1 - c0) / max(1, sum(lines)) * 10000, "conns": int(out.strip() or 0),
            "frames": [s["frames"] for s in subs], "seconds": t_last - t0}


def _logs(ctx, pki, env):
    """On a node of its own with DEBUG=true: its echo of every core line in
    its log counts the lines it read from the core (the truth the
    subscribers' counts are checked against; v2ray itself drops log lines
    when its 16-line log queue is full, so the generator's connections
    cannot serve as the count)."""
    rep, P = ctx.report, ctx.P
    nsub, secs = P["mz_logs_readers"], P["mz_logs_secs"]
    node = ctx.mz_node("mzlogs", dict(env, DEBUG="true"))
    panel = Panel(node, pki)
    try:
        panel.connect()
        vport = util.free_port()
        names = users(256)
        st, b, _ = panel.start(mz_config({"VLESS TCP": vport}, names, loglevel="info",
                                         sniffing=False))
        if st != 200:
            raise RuntimeError(f"/start (logs) answered {st} {b}")
        uids = ",".join(user_uuid(m) for m in names)
        runs = [_logs_run(ctx, pki, node, panel, vport, uids, secs, nsub)
                for _ in range(P["mz_logs_runs"])]
        # The panel's log viewer: interval=0.7 (batches, at most one frame per 0.7 s).
        pv = _logs_run(ctx, pki, node, panel, vport, uids, secs, nsub, interval=0.7)
        panel.stop()
        _no_core(node)
    finally:
        panel.close()
    node.stop()

    rep.figure("mz_logs_sub_rate", f"/logs lines/s per subscriber ({nsub} subscribers)",
               "lines/s", [r["per_sub"] for r in runs], group=G_LOGS, digits=0,
               extra={"generator_seconds": secs,
                      "generator_connections": [r["conns"] for r in runs],
                      "delivery_seconds": [r["seconds"] for r in runs],
                      "interval": "none (one line per frame)"},
               note="from the generator's start to each subscriber's last line; bounded by "
                    "the Python subscribers (one process), which lag the core")
    rep.figure("mz_logs_total_rate", f"/logs lines/s delivered, all {nsub} subscribers",
               "lines/s", [r["total"] for r in runs], group=G_LOGS, digits=0)
    rep.figure("mz_logs_lost", "  core lines the worst subscriber lost (0 = all got all)",
               "lines", [r["lost"] for r in runs], group=G_LOGS, digits=0,
               extra={"core_lines": [r["produced"] for r in runs],
                      "lines_per_subscriber": [r["lines"] for r in runs]},
               note="a subscriber more than 100 lines behind loses its oldest lines, by design "
                    "(spec §4); core lines = the node's DEBUG echo")
    rep.figure("mz_logs_cpu", "  node CPU per 10k delivered lines (incl. DEBUG echo)", "cpu s",
               [r["cpu"] for r in runs], group=G_LOGS, digits=3)
    # interval=0.7: each flush takes at most the 100 lines the subscriber's ring
    # holds, so a subscriber gets <= 100 lines per 0.7 s (the reference's cap too).
    rep.figure("mz_logs_panel_rate", "  with interval=0.7 (the panel's viewer): per subscriber",
               "lines/s", [pv["per_sub"]], group=G_LOGS, digits=0,
               extra={"lines_per_subscriber": pv["lines"], "frames": pv["frames"],
                      "core_lines": pv["produced"],
                      "delivered_share": (statistics.median(pv["lines"]) / pv["produced"]
                                          if pv["produced"] else None)},
               note="<= 100 lines per 0.7 s per subscriber by design (spec §4)")


def run(ctx):
    if importlib.util.find_spec("websockets") is None:  # the subscribers' process needs it
        raise RuntimeError("python3-websockets missing: apt-get install python3-websockets")
    pki = Pki(os.path.join(ctx.tmp, "mzpki"))
    env = _startup(ctx, pki)
    node = ctx.mz_node("mzapi", env)
    panel = Panel(node, pki)
    try:
        panel.connect()
        _rest(ctx, pki, node, panel)
        _start(ctx, node, panel)
    finally:
        panel.close()
    node.stop()
    _logs(ctx, pki, env)
