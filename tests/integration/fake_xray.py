"""A FAKE Xray core for the integration tests: Xray behaviour from source, not
verified against a real Xray (spec/cores.md §12 "Fake, clearly labelled").

No Xray is packaged for Debian, so the Xray-only parts of the node (xray.*
service paths and type strings, online stats and IP lists, multi-user
shadowsocks with Xray's cipher enum, SS-2022 accounts, vision flow,
NOT_FOUND codes) are tested against this stand-in. It is a grpcio server
built from the project's own proto/xray/core_api.proto (compiled with
protoc at test time), serving

  xray.app.proxyman.command.HandlerService  AlterInbound (Add/RemoveUser),
                                            RemoveInbound, GetInboundUsers,
                                            GetInboundUsersCount
  xray.app.stats.command.StatsService       GetStats, QueryStats, GetSysStats,
                                            GetStatsOnline, GetStatsOnlineIpList
  xray.app.log.command.LoggerService        RestartLogger

under both the xray.* and the v2ray.core.* service names (Xray registers
both since v1.1.3), plus a test-only control service (/fake.Control/Set and
/fake.Control/Dump, JSON bodies) that seeds counters and online IPs and
returns what was recorded. Every request is recorded (path + decoded
message, TypedMessage type strings and account fields included) both in
memory and in <dir>/record.jsonl.

Two ways to run it:
  * as the node's core: make_fake_core(dir) writes <dir>/xray, an executable
    that answers `-version` like Xray 26.7.28 and, with `-config stdin:`,
    reads the config, finds the API_INBOUND port and execs this module with
    --port <api port> (so the node's supervisor, readiness probe and API
    client drive it);
  * directly: python3 fake_xray.py --dir D --config C [--port N].
"""
import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time

XRAY_VERSION_LINE = "Xray 26.7.28 (Xray, Penetrates Everything.) Custom (go1.24 linux/amd64)"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Xray's shadowsocks CipherType (cores.md §3), for readable assertions.
XRAY_SS_CIPHER = {"aes-128-gcm": 5, "aes-256-gcm": 6, "chacha20-poly1305": 7,
                  "chacha20-ietf-poly1305": 7, "xchacha20-poly1305": 8,
                  "xchacha20-ietf-poly1305": 8}

# Account type string -> core_api.proto message name.
ACCOUNT_TYPES = {
    "xray.proxy.vmess.Account": "VmessAccount",
    "xray.proxy.vless.Account": "VlessAccount",
    "xray.proxy.trojan.Account": "TrojanAccount",
    "xray.proxy.shadowsocks.Account": "ShadowsocksAccount",
    "xray.proxy.shadowsocks_2022.Account": "Shadowsocks2022Account",
    "xray.proxy.hysteria.account.Account": "HysteriaAccount",
}
# Which account type each inbound protocol takes.
PROTOCOL_ACCOUNT = {
    "vmess": "xray.proxy.vmess.Account",
    "vless": "xray.proxy.vless.Account",
    "trojan": "xray.proxy.trojan.Account",
    "shadowsocks": "xray.proxy.shadowsocks.Account",
    "hysteria": "xray.proxy.hysteria.account.Account",
}
ADD_OP = "xray.app.proxyman.command.AddUserOperation"
REMOVE_OP = "xray.app.proxyman.command.RemoveUserOperation"


def compile_proto(out_dir, proto_dir=None):
    """core_api_pb2 from proto/xray/core_api.proto into out_dir."""
    proto_dir = proto_dir or os.path.join(
        os.path.abspath(os.environ.get("PN_PROTO_DIR") or os.path.join(REPO, "proto")), "xray")
    os.makedirs(out_dir, exist_ok=True)
    p = subprocess.run(["protoc", f"--proto_path={proto_dir}", f"--python_out={out_dir}",
                        os.path.join(proto_dir, "core_api.proto")], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"protoc failed for core_api.proto: {p.stderr}")
    return out_dir


def load_pb(pb_dir):
    if pb_dir not in sys.path:
        sys.path.insert(0, pb_dir)
    import core_api_pb2  # noqa: E402
    return core_api_pb2


# ---- the fake core executable -----------------------------------------------------------------

CORE_SCRIPT = r'''#!/usr/bin/python3
# FAKE Xray core for proxynode's integration tests (not a real Xray).
import json, os, sys, time
DIR = {dir!r}
FAKE = {fake!r}
args = sys.argv[1:]
with open(os.path.join(DIR, "invocations.jsonl"), "a") as f:
    f.write(json.dumps({{"pid": os.getpid(), "argv": args, "t": time.time()}}) + "\n")
if not args or args[0] in ("-version", "version", "--version"):
    print({version!r})
    print("A unified platform for anti-censorship.")
    sys.exit(0)
if args and args[0] == "run":
    args = args[1:]
test = "-test" in args
src = None
for i, a in enumerate(args):
    if a in ("-c", "-config", "--config") and i + 1 < len(args):
        src = args[i + 1]
    elif a.startswith(("-c=", "-config=")):
        src = a.split("=", 1)[1]
print({version!r}, flush=True)
print("A unified platform for anti-censorship.", flush=True)
if src in (None, "stdin:", "stdin"):
    text = sys.stdin.read()
else:
    with open(src) as f:
        text = f.read()
try:
    cfg = json.loads(text)
except ValueError as e:
    print("Failed to start: main: failed to load config files: [stdin:] > infra/conf/serial: "
          "failed to decode config: " + str(e), flush=True)
    sys.exit(23)
fail = os.path.join(DIR, "fail-start")
if os.path.exists(fail):
    with open(fail) as f:
        print(f.read().strip(), flush=True)
    sys.exit(23)
if test:
    print("Configuration OK.", flush=True)
    sys.exit(0)
port = None
for ib in cfg.get("inbounds") or []:
    if ib.get("tag") == "API_INBOUND":
        port = ib.get("port")
if port is None:
    print("Failed to start: fake xray: no API_INBOUND inbound in the config", flush=True)
    sys.exit(23)
path = os.path.join(DIR, "config-%d.json" % os.getpid())
with open(path, "w") as f:
    f.write(text)
os.execv(sys.executable, [sys.executable, FAKE, "--dir", DIR, "--config", path,
                          "--port", str(port)])
'''


def make_fake_core(directory, proto_dir=None):
    """Writes <directory>/xray (the fake core executable) and the generated
    protobuf module; returns the executable's path."""
    os.makedirs(directory, exist_ok=True)
    compile_proto(os.path.join(directory, "pb"), proto_dir)
    path = os.path.join(directory, "xray")
    with open(path, "w") as f:
        f.write(CORE_SCRIPT.format(dir=os.path.abspath(directory),
                                   fake=os.path.abspath(__file__), version=XRAY_VERSION_LINE))
    os.chmod(path, 0o755)
    return path


class FakeCoreDir:
    """The test side of a fake core directory: records, configs, control."""

    def __init__(self, directory):
        self.dir = os.path.abspath(directory)

    def records(self):
        try:
            with open(os.path.join(self.dir, "record.jsonl")) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def calls(self, method=None):
        """Recorded requests, optionally only those whose path ends in /method."""
        return [r for r in self.records() if method is None or r["path"].endswith("/" + method)]

    def invocations(self):
        try:
            with open(os.path.join(self.dir, "invocations.jsonl")) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def current(self):
        """{"pid", "port", "config"} of the last fake server that served."""
        try:
            with open(os.path.join(self.dir, "current.json")) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def config(self):
        cur = self.current()
        with open(cur["config"]) as f:
            return json.load(f)

    def set_fail_start(self, line):
        path = os.path.join(self.dir, "fail-start")
        if line is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            with open(path, "w") as f:
                f.write(line)

    def control(self, method, body, port=None):
        import grpc
        port = port or self.current()["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}",
                                   options=[("grpc.enable_http_proxy", 0)]) as ch:
            f = ch.unary_unary(f"/fake.Control/{method}", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
            return json.loads(f(json.dumps(body).encode(), timeout=5) or b"null")

    def set(self, stats=None, online=None, add_stats=None):
        """Seeds counters ({name: value}), adds to counters, or sets online IP
        maps ({email: {ip: last_seen}}) in the running fake."""
        return self.control("Set", {"stats": stats or {}, "add_stats": add_stats or {},
                                    "online": online or {}})

    def dump(self):
        return self.control("Dump", {})


# ---- the fake server ----------------------------------------------------------------------------

class FakeXray:
    def __init__(self, pb, cfg, record_path):
        from google.protobuf import json_format
        self.pb = pb
        self.json_format = json_format
        self.cfg = cfg
        self.lock = threading.Lock()
        self.record_path = record_path
        self.record_file = open(record_path, "a") if record_path else None
        self.started = time.time()
        self.stats = {}
        self.online = {}
        self.records = []
        # inbound tag -> {"protocol", "settings", "users": {lower email: record}}
        self.inbounds = {}
        for ib in cfg.get("inbounds") or []:
            tag = ib.get("tag")
            if not tag or tag == "API_INBOUND":
                continue
            settings = ib.get("settings") or {}
            users = {}
            for c in settings.get("clients") or []:
                email = c.get("email", "")
                users[email.lower()] = {"email": email, "level": c.get("level", 0),
                                        "account_type": "config", "account": c}
            self.inbounds[tag] = {"protocol": ib.get("protocol"), "settings": settings,
                                  "users": users}
        levels = ((cfg.get("policy") or {}).get("levels") or {})
        self.online_enabled = bool((levels.get("0") or {}).get("statsUserOnline"))

    # -- recording
    def record(self, path, msg, extra=None):
        entry = {"t": time.time(), "path": path}
        if msg is not None:
            entry["req"] = self.to_dict(msg)
        if extra:
            entry.update(extra)
        with self.lock:
            self.records.append(entry)
            if self.record_file:
                self.record_file.write(json.dumps(entry) + "\n")
                self.record_file.flush()
        return entry

    def to_dict(self, msg):
        return self.json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                              including_default_value_fields=True)

    def decode_account(self, typed):
        name = ACCOUNT_TYPES.get(typed.type)
        if name is None:
            return None
        return getattr(self.pb, name).FromString(typed.value)

    # -- errors
    @staticmethod
    def fail(context, code, text):
        import grpc
        context.abort(getattr(grpc.StatusCode, code), text)

    # -- HandlerService
    def alter_inbound(self, req, context, path):
        pb = self.pb
        op_type = req.operation.type
        extra = {"tag": req.tag, "op_type": op_type}
        if op_type == ADD_OP:
            op = pb.AddUserOperation.FromString(req.operation.value)
            acct_type = op.user.account.type
            acct = self.decode_account(op.user.account)
            extra["op"] = {"email": op.user.email, "level": op.user.level,
                           "account_type": acct_type,
                           "account": self.to_dict(acct) if acct is not None else None}
        elif op_type == REMOVE_OP:
            op = pb.RemoveUserOperation.FromString(req.operation.value)
            extra["op"] = {"email": op.email}
        else:
            self.record(path, req, extra)
            self.fail(context, "UNKNOWN", f"Serial: Unknown type: {op_type}")
        self.record(path, req, extra)
        with self.lock:
            ib = self.inbounds.get(req.tag)
            if ib is None:
                self.fail(context, "UNKNOWN",
                          f"app/proxyman/command: failed to get handler: {req.tag} > "
                          f"app/proxyman/inbound: handler not found: {req.tag}")
            proto = ib["protocol"]
            if proto not in PROTOCOL_ACCOUNT:
                self.fail(context, "UNKNOWN", "app/proxyman/command: proxy is not a UserManager")
            if op_type == ADD_OP:
                want = PROTOCOL_ACCOUNT[proto]
                if proto == "shadowsocks" and str(ib["settings"].get("method", "")).lower() \
                        .startswith("2022-blake3"):
                    want = "xray.proxy.shadowsocks_2022.Account"
                if acct_type != want:
                    self.fail(context, "UNKNOWN",
                              f"fake xray: account type {acct_type!r} does not fit a {proto} "
                              f"inbound (wants {want!r})")
                email = op.user.email
                if email.lower() in ib["users"]:
                    self.fail(context, "UNKNOWN",
                              f"proxy/{proto}: User {email} already exists.")
                ib["users"][email.lower()] = {"email": email, "level": op.user.level,
                                              "account_type": acct_type,
                                              "account": extra["op"]["account"]}
            else:
                email = op.email
                if not email:
                    self.fail(context, "UNKNOWN", f"proxy/{proto}: Email must not be empty.")
                if email.lower() not in ib["users"]:
                    self.fail(context, "UNKNOWN", f"proxy/{proto}: User {email} not found.")
                del ib["users"][email.lower()]
        return pb.AlterInboundResponse()

    def remove_inbound(self, req, context, path):
        self.record(path, req)
        with self.lock:
            if self.inbounds.pop(req.tag, None) is None:
                self.fail(context, "UNKNOWN", f"app/proxyman/inbound: handler not found: {req.tag}")
        return self.pb.RemoveInboundResponse()

    def inbound_users(self, req, context, path, count=False):
        self.record(path, req)
        pb = self.pb
        with self.lock:
            ib = self.inbounds.get(req.tag)
            if ib is None:
                self.fail(context, "UNKNOWN", f"app/proxyman/inbound: handler not found: {req.tag}")
            users = [u for k, u in sorted(ib["users"].items())
                     if not req.email or k == req.email.lower()]
        if count:
            return pb.GetInboundUsersCountResponse(count=len(users))
        return pb.GetInboundUserResponse(users=[pb.User(level=u["level"], email=u["email"])
                                                for u in users])

    # -- StatsService
    def get_stats(self, req, context, path):
        self.record(path, req)
        with self.lock:
            if req.name not in self.stats:
                self.fail(context, "NOT_FOUND", f"app/stats/command: {req.name} not found.")
            v = self.stats[req.name]
            if req.reset:
                self.stats[req.name] = 0
        return self.pb.GetStatsResponse(stat=self.pb.Stat(name=req.name, value=v))

    def query_stats(self, req, context, path):
        self.record(path, req)
        out = []
        with self.lock:
            for name in sorted(self.stats):
                if req.pattern in name:
                    out.append(self.pb.Stat(name=name, value=self.stats[name]))
                    if req.reset:
                        self.stats[name] = 0
        return self.pb.QueryStatsResponse(stat=out)

    def sys_stats(self, req, context, path):
        self.record(path, req)
        return self.pb.SysStatsResponse(NumGoroutine=42, NumGC=3, Alloc=4 << 20,
                                        TotalAlloc=9 << 20, Sys=20 << 20, Mallocs=1000,
                                        Frees=900, LiveObjects=100, PauseTotalNs=12345,
                                        Uptime=int(time.time() - self.started))

    def _online(self, req, context):
        name = req.name
        parts = name.split(">>>")
        email = parts[1] if len(parts) == 3 and parts[0] == "user" and parts[2] == "online" \
            else None
        with self.lock:
            ips = self.online.get(email) if (email is not None and self.online_enabled) else None
            if not ips:
                self.fail(context, "NOT_FOUND", f"app/stats/command: {name} not found.")
            return dict(ips)

    def stats_online(self, req, context, path):
        self.record(path, req)
        ips = self._online(req, context)
        return self.pb.GetStatsResponse(stat=self.pb.Stat(name=req.name, value=len(ips)))

    def stats_online_iplist(self, req, context, path):
        self.record(path, req)
        ips = self._online(req, context)
        return self.pb.GetStatsOnlineIpListResponse(name=req.name, ips=ips)

    def restart_logger(self, req, context, path):
        self.record(path, None)
        return b""

    # -- control (test only)
    def control_set(self, req, context, path):
        body = json.loads(req or b"{}")
        with self.lock:
            self.stats.update({k: int(v) for k, v in body.get("stats", {}).items()})
            for k, v in body.get("add_stats", {}).items():
                self.stats[k] = self.stats.get(k, 0) + int(v)
            for email, ips in body.get("online", {}).items():
                if ips:
                    self.online[email] = {ip: int(t) for ip, t in ips.items()}
                else:
                    self.online.pop(email, None)
        return b"{}"

    def control_dump(self, req, context, path):
        with self.lock:
            return json.dumps({"stats": self.stats, "online": self.online,
                               "inbounds": {t: {"protocol": ib["protocol"],
                                                "users": sorted(u["email"]
                                                                for u in ib["users"].values())}
                                            for t, ib in self.inbounds.items()},
                               "online_enabled": self.online_enabled}).encode()

    # -- wiring
    def handlers(self):
        import grpc
        pb = self.pb

        def h(fn, req_cls, path, resp_raw=False):
            def call(req, context):
                return fn(req, context, path)
            return grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=req_cls.FromString if req_cls else (lambda b: b),
                response_serializer=(lambda b: b) if resp_raw else (lambda m: m.SerializeToString()))

        out = []
        for prefix in ("xray", "v2ray.core"):
            hs = f"{prefix}.app.proxyman.command.HandlerService"
            ss = f"{prefix}.app.stats.command.StatsService"
            ls = f"{prefix}.app.log.command.LoggerService"
            out.append(grpc.method_handlers_generic_handler(hs, {
                "AlterInbound": h(self.alter_inbound, pb.AlterInboundRequest,
                                  f"/{hs}/AlterInbound"),
                "RemoveInbound": h(self.remove_inbound, pb.RemoveInboundRequest,
                                   f"/{hs}/RemoveInbound"),
                "GetInboundUsers": h(self.inbound_users, pb.GetInboundUserRequest,
                                     f"/{hs}/GetInboundUsers"),
                "GetInboundUsersCount": h(lambda r, c, p: self.inbound_users(r, c, p, True),
                                          pb.GetInboundUserRequest,
                                          f"/{hs}/GetInboundUsersCount"),
            }))
            out.append(grpc.method_handlers_generic_handler(ss, {
                "GetStats": h(self.get_stats, pb.GetStatsRequest, f"/{ss}/GetStats"),
                "QueryStats": h(self.query_stats, pb.QueryStatsRequest, f"/{ss}/QueryStats"),
                "GetSysStats": h(self.sys_stats, pb.SysStatsRequest, f"/{ss}/GetSysStats"),
                "GetStatsOnline": h(self.stats_online, pb.GetStatsRequest,
                                    f"/{ss}/GetStatsOnline"),
                "GetStatsOnlineIpList": h(self.stats_online_iplist, pb.GetStatsRequest,
                                          f"/{ss}/GetStatsOnlineIpList"),
            }))
            out.append(grpc.method_handlers_generic_handler(ls, {
                "RestartLogger": h(self.restart_logger, None, f"/{ls}/RestartLogger",
                                   resp_raw=True),
            }))
        out.append(grpc.method_handlers_generic_handler("fake.Control", {
            "Set": h(self.control_set, None, "/fake.Control/Set", resp_raw=True),
            "Dump": h(self.control_dump, None, "/fake.Control/Dump", resp_raw=True),
        }))
        return out


def _unknown_handler(fake):
    """Records calls to paths nobody serves (then UNIMPLEMENTED like grpc-go)."""
    import grpc

    class Unknown(grpc.GenericRpcHandler):
        def service(self, details):
            path = details.method

            def call(req, context):
                fake.record(path, None, {"unknown": True, "raw_len": len(req)})
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown service {path}")
            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=lambda b: b,
                                                       response_serializer=lambda b: b)
    return Unknown()


def serve_metrics(cfg, directory):
    """Xray's expvar endpoint, as far as the node reads it: GET /debug/vars
    on the config's metrics.listen answers {"observatory": ...} with what a
    test wrote into <dir>/observatory.json ({} when absent)."""
    listen = (cfg.get("metrics") or {}).get("listen")
    if not listen:
        return
    import http.server
    import threading
    host, port = listen.rsplit(":", 1)

    class Vars(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/debug/vars":
                self.send_error(404)
                return
            try:
                with open(os.path.join(directory, "observatory.json")) as f:
                    obs = json.load(f)
            except FileNotFoundError:
                obs = {}
            body = json.dumps({"cmdline": ["xray"], "observatory": obs}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer((host, int(port)), Vars)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()


def serve(args):
    from concurrent import futures
    import grpc
    directory = os.path.abspath(args.dir)
    pb = load_pb(args.pb or os.path.join(directory, "pb"))
    with open(args.config) as f:
        cfg = json.load(f)
    port = args.port
    if port is None:
        for ib in cfg.get("inbounds") or []:
            if ib.get("tag") == "API_INBOUND":
                port = ib.get("port")
    fake = FakeXray(pb, cfg, os.path.join(directory, "record.jsonl"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         handlers=fake.handlers(),
                         options=[("grpc.max_receive_message_length", 512 << 20),
                                  ("grpc.max_send_message_length", 512 << 20),
                                  ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([_unknown_handler(fake)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if not bound:
        print(f"Failed to start: fake xray: failed to listen on 127.0.0.1:{port}", flush=True)
        sys.exit(23)
    # Recorded before the API answers: the node may call this core ready
    # (and a test then look it up) as soon as the first call succeeds.
    cur = os.path.join(directory, "current.json")
    with open(cur + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "port": bound, "config": os.path.abspath(args.config)}, f)
    os.replace(cur + ".tmp", cur)
    serve_metrics(cfg, directory)
    server.start()
    ts = time.strftime("%Y/%m/%d %H:%M:%S")
    print(f"{ts}.000000 [Warning] core: Xray 26.7.28 started", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    signal.signal(signal.SIGINT, lambda *a: os._exit(0))
    while True:
        time.sleep(3600)


def main():
    ap = argparse.ArgumentParser(description="FAKE Xray API server (tests only)")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--port", type=int)
    ap.add_argument("--pb")
    serve(ap.parse_args())


def ss2022_key(password, method):
    """The node's SS-2022 key rule (spec §10), for expected values."""
    import hashlib
    n = 16 if method.endswith("aes-128-gcm") else 32
    try:
        raw = base64.b64decode(password, validate=True)
        if len(raw) == n:
            return password
    except ValueError:
        pass
    return base64.b64encode(hashlib.sha256(password.encode()).digest()[:n]).decode()


if __name__ == "__main__":
    main()
