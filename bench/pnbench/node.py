"""The node under test: a proxynode process on a free loopback port, in its
own temporary directory, with a random API key, a state directory (so it
generates its certificate there) and /usr/bin/v2ray as its core. Also
generates the Python protobuf modules from proto/ (service.proto and the
core API subset) into a temporary directory."""
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from . import util

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V2RAY = "/usr/bin/v2ray"
READY_LINE = "serving gRPC and REST on"
MZ_READY_LINE = "serving REST and WebSocket on"  # the Marzban profile's ready line


def load_protos(proto_dir=None, tmp=None):
    """Returns (service_pb2, core_api_pb2), generated with protoc from proto_dir."""
    proto_dir = os.path.abspath(proto_dir or os.path.join(REPO, "proto"))
    out = tempfile.mkdtemp(prefix="pnbench-pb-", dir=tmp)
    protoc = shutil.which("protoc")
    if not protoc:
        raise RuntimeError("protoc not found: apt-get install protobuf-compiler")
    p = subprocess.run([protoc, f"--proto_path={proto_dir}", f"--python_out={out}",
                        os.path.join(proto_dir, "service.proto"),
                        os.path.join(proto_dir, "xray", "core_api.proto")],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"protoc failed: {p.stderr}")
    sys.path.insert(0, out)
    try:
        svc = importlib.import_module("service_pb2")
        core = importlib.import_module("xray.core_api_pb2")
    finally:
        sys.path.remove(out)
    return svc, core


def base_env():
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


class Node:
    """One proxynode process. start() waits for the ready line and an accepting port."""

    ready_line = READY_LINE

    def __init__(self, binary, workdir, env=None, core=V2RAY):
        self.binary = binary
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.key = str(uuid.uuid4())
        self.state_dir = os.path.join(workdir, "state")
        self.gen_dir = os.path.join(workdir, "generated")
        self.env = base_env()
        self.env.update({
            "PROXYNODE_PROFILE": "pasarguard",
            "API_KEY": self.key,
            "NODE_HOST": "127.0.0.1",
            "PROXYNODE_STATE_DIR": self.state_dir,
            "XRAY_EXECUTABLE_PATH": core,
            "GENERATED_CONFIG_PATH": self.gen_dir,
        })
        self.env.update(env or {})
        self.port = None
        self.proc = None
        self.log_path = os.path.join(workdir, "node.log")

    @property
    def cert(self):
        return os.path.join(self.state_dir, "certs", "ssl_cert.pem")

    @property
    def keyfile(self):
        return os.path.join(self.state_dir, "certs", "ssl_key.pem")

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def spawn(self):
        self.port = util.free_port()
        self.env["SERVICE_PORT"] = str(self.port)
        with open(self.log_path, "ab") as log:
            self.proc = util.spawn([self.binary, "run"], env=self.env, cwd=self.workdir,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self.proc

    def start(self, timeout=15.0):
        off = len(self.log())
        self.spawn()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxynode exited with {self.proc.returncode}:\n"
                                   + self.log()[-3000:])
            return self.ready_line in self.log()[off:] and util.accepting(self.port)

        util.wait_for(ready, timeout, "proxynode to listen", interval=0.005)
        return self

    def stop(self):
        rc = util.stop(self.proc, grace=8.0)
        return rc

    def core_pids(self):
        return [p for p in util.children(self.pid) if util.alive(p)]

    def core_pid(self):
        """The one running core (None when there is none)."""
        ps = [p for p in self.core_pids() if util.exe_name(p) in ("v2ray", "xray")]
        return ps[0] if len(ps) == 1 else None


class MzNode(Node):
    """proxynode in the Marzban profile (spec/marzban.md): mTLS on SERVICE_PORT
    with env["SSL_CLIENT_CERT_FILE"] (the panel's certificate, required) as
    the trust anchor; its own certificate and key at <workdir>/ssl/ unless env
    names others (generated there when missing); the core's API inbound on
    127.0.0.1 and a free XRAY_API_PORT. No API key, no state directory."""

    ready_line = MZ_READY_LINE

    def __init__(self, binary, workdir, env=None, core=V2RAY):
        super().__init__(binary, workdir, core=core)
        self.key = None
        ssl_dir = os.path.join(workdir, "ssl")
        self.env = base_env()
        self.env.update({
            "PROXYNODE_PROFILE": "marzban",
            "SERVICE_HOST": "127.0.0.1",
            "SSL_CERT_FILE": os.path.join(ssl_dir, "ssl_cert.pem"),
            "SSL_KEY_FILE": os.path.join(ssl_dir, "ssl_key.pem"),
            "XRAY_API_HOST": "127.0.0.1",
            "XRAY_API_PORT": str(util.free_port()),
            "XRAY_EXECUTABLE_PATH": core,
            "GENERATED_CONFIG_PATH": self.gen_dir,
        })
        self.env.update(env or {})
        if not self.env.get("SSL_CLIENT_CERT_FILE"):
            raise ValueError("MzNode needs env SSL_CLIENT_CERT_FILE (the panel's certificate)")

    @property
    def cert(self):
        return self.env["SSL_CERT_FILE"]

    @property
    def keyfile(self):
        return self.env["SSL_KEY_FILE"]

    @property
    def api_port(self):
        return int(self.env["XRAY_API_PORT"])


def exec_to_accepting(binary, workdir, env, timeout=5.0, cls=None):
    """Spawns the node (a `cls`, default Node) and measures exec -> first
    accepted TCP connection on its port, polling with non-blocking connects;
    returns (seconds, node) with the node still running (the caller stops it)."""
    n = (cls or Node)(binary, workdir, env=env)
    port = util.free_port()
    n.port = port
    n.env["SERVICE_PORT"] = str(port)
    log = open(n.log_path, "ab")
    t0 = time.perf_counter()
    n.proc = util.spawn([binary, "run"], env=n.env, cwd=workdir, stdin=subprocess.DEVNULL,
                        stdout=log, stderr=log)
    log.close()
    deadline = t0 + timeout
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect(("127.0.0.1", port))
            t = time.perf_counter() - t0
            s.close()
            return t, n
        except ConnectionRefusedError:
            s.close()
        if time.perf_counter() > deadline or n.proc.poll() is not None:
            n.stop()
            raise RuntimeError("proxynode never accepted:\n" + n.log()[-2000:])
        time.sleep(0.0002)

