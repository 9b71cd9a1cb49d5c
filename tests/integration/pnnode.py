"""The node under test: locating the binary, free ports, a minimal
environment, and the Node class that runs proxynode in a temp directory on
its own port and stops it with SIGTERM (then SIGKILL), checking for a clean
exit.

Environment (set by CMake's ctest entries):
  PROXYNODE_BIN  the binary under test (default: <repo>/build/proxynode)
  PN_PROTO_DIR   the directory holding service.proto (default: <repo>/proto)
  PN_SANITIZE    ON when the binary is built with ASan+UBSan: timeouts x3
  PN_WRAPPER     a command prefix for every run of the binary, split like a
                 shell would (make memcheck: "valgrind --error-exitcode=99 ...").
                 Timeouts x PN_WRAPPER_SCALE (default 5), and a node whose
                 output carries a valgrind error report fails its stop check.

Nothing is skipped: a missing tool or module is a test failure that says
what to install.
"""
import atexit
import importlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

SANITIZE = os.environ.get("PN_SANITIZE", "OFF").upper() in ("ON", "1", "TRUE", "YES")
WRAPPER = shlex.split(os.environ.get("PN_WRAPPER", ""))
WRAPPER_SCALE = int(os.environ.get("PN_WRAPPER_SCALE", "5")) if WRAPPER else 1
SCALE = (3 if SANITIZE else 1) * WRAPPER_SCALE
V2RAY = "/usr/bin/v2ray"
V2RAY_VERSION = "4.34.0"
NODE_VERSION = "0.2.0"
MAX_MESSAGE = 64 * 1024 * 1024
READY_LINE = "serving gRPC and REST on"

# Debian package that provides each tool / module, for the failure message.
INSTALL_HINTS = {
    "protoc": "protobuf-compiler",
    "openssl": "openssl",
    "curl": "curl",
    "v2ray": "v2ray",
    "h2load": "nghttp2-client",
    "grpc": "python3-grpcio",
    "google.protobuf": "python3-protobuf",
    "requests": "python3-requests",
    "h2": "python3-h2",
    "websockets": "python3-websockets",
    "objdump": "binutils",
    "gcc": "gcc",
    "valgrind": "valgrind",
}


def T(seconds):
    """A timeout scaled for sanitizer builds."""
    return seconds * SCALE


def need_tool(name, path=None):
    """Returns the tool's path or fails (never skips) with an install hint."""
    found = path if path and os.access(path, os.X_OK) else shutil.which(name)
    if not found:
        pytest.fail(f"required tool '{name}' not found: install it with "
                    f"'apt-get install {INSTALL_HINTS.get(name, name)}' "
                    f"(or run scripts/deps.sh test)", pytrace=False)
    return found


def need_module(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"python module '{name}' missing for {sys.executable} ({e}): install "
                    f"'apt-get install {INSTALL_HINTS.get(name, name)}'", pytrace=False)


def binary():
    path = os.environ.get("PROXYNODE_BIN") or os.path.join(REPO, "build", "proxynode")
    path = os.path.abspath(path)
    if not os.access(path, os.X_OK):
        pytest.fail(f"proxynode binary not found or not executable: {path} "
                    f"(build it with 'make build', or set PROXYNODE_BIN)", pytrace=False)
    return path


def free_port(host="127.0.0.1"):
    """A port the kernel just handed out (bind port 0), released again."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def new_key():
    return str(uuid.uuid4())


def base_env():
    """A minimal environment: nothing from the runner's environment leaks into
    the node's configuration except PATH and the sanitizer options."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    for k, v in os.environ.items():
        if k.startswith(("ASAN_", "UBSAN_", "LSAN_")):
            env[k] = v
    return env


SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "SUMMARY: UndefinedBehaviorSanitizer")


# Under valgrind -q every "==pid== " line is part of an error report, except
# these notes about the client program that are not errors.
VALGRIND_LINE = re.compile(r"^==\d+== ?(.*)$", re.M)
VALGRIND_BENIGN = ("Warning: set address range perms", "Warning: noted but unhandled ioctl",
                   "Warning: invalid file descriptor", "   This could cause spurious",
                   "   See README_MISSING_SYSCALL", "   with no size/direction hints")


def valgrind_report(text):
    """The valgrind error lines in a node's output ('' when none)."""
    lines = [m.group(0) for m in VALGRIND_LINE.finditer(text)
             if m.group(1).strip() and not m.group(1).startswith(VALGRIND_BENIGN)]
    return "\n".join(lines)


def assert_no_sanitizer_report(text, what="proxynode"):
    for m in SANITIZER_MARKERS:
        assert m not in text, f"{what} reported a sanitizer error ({m!r}):\n{text[-6000:]}"
    if WRAPPER:
        report = valgrind_report(text)
        assert not report, f"{what} reported valgrind errors:\n{report[-8000:]}"


def command(args):
    """The argv that runs the binary with args (behind PN_WRAPPER, if set)."""
    return WRAPPER + [binary()] + list(args)


def run_cli(args, env, cwd, timeout=None):
    """Runs the binary to completion (check, version, --help, failing run)."""
    p = subprocess.run(command(args), env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout or T(15))
    assert_no_sanitizer_report(p.stdout + p.stderr, f"proxynode {' '.join(args)}")
    return p


# ---- the node under test ---------------------------------------------------------------------

_NODES = []  # every Node started in this session, for failure reports
_CURRENT_TEST = [None]  # set by conftest's hooks


@atexit.register
def _kill_leftover_nodes():
    """A fixture that failed before its teardown could leave a node running
    after pytest exits: kill those (valgrind-wrapped ones included)."""
    for n in _NODES:
        n.kill()


class Node:
    """One proxynode process in its own temp directory (its cwd, so no stray
    .env is read), on its own port, with stdout and stderr captured to files."""

    def __init__(self, workdir, env=None, key="random", host="127.0.0.1", port=None,
                 state=True, core=V2RAY, args=("run",)):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.host = host
        self.port = port
        self.fixed_port = port is not None
        self.key = new_key() if key == "random" else key
        self.state_dir = os.path.join(workdir, "state") if state else None
        self.args = list(args)
        self.env = base_env()
        if self.key:
            self.env["API_KEY"] = self.key
        self.env["NODE_HOST"] = host
        if self.state_dir:
            self.env["PROXYNODE_STATE_DIR"] = self.state_dir
        if core:
            if core == V2RAY:
                need_tool("v2ray", V2RAY)
            self.env["XRAY_EXECUTABLE_PATH"] = core
        if env:
            for k, v in env.items():
                if v is None:
                    self.env.pop(k, None)
                else:
                    self.env[k] = v
        self.proc = None
        self.stdout_path = os.path.join(workdir, "node.stdout")
        self.stderr_path = os.path.join(workdir, "node.stderr")
        self.started_at = None
        self.exit_status = None
        self.test_ids = set()
        _NODES.append(self)

    # -- files
    @property
    def cert(self):
        return self.env.get("SSL_CERT_FILE") or os.path.join(self.state_dir, "certs",
                                                             "ssl_cert.pem")

    @property
    def keyfile(self):
        return self.env.get("SSL_KEY_FILE") or os.path.join(self.state_dir, "certs",
                                                            "ssl_key.pem")

    def stdout(self):
        try:
            with open(self.stdout_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stderr(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def describe(self):
        return (f"node {self.host}:{self.port} in {self.workdir} (exit {self.exit_status})\n"
                f"--- stdout ---\n{self.stdout()[-3000:]}\n"
                f"--- stderr ---\n{self.stderr()[-8000:]}")

    @property
    def addr(self):
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def url(self):
        h = "[::1]" if self.host == "::" else ("127.0.0.1" if self.host == "0.0.0.0" else self.addr)
        return f"https://{h}:{self.port}"

    @property
    def connect_host(self):
        if self.host == "::":
            return "::1"
        if self.host == "0.0.0.0":
            return "127.0.0.1"
        return self.host

    # -- lifecycle
    def spawn(self):
        """Starts the process without waiting for readiness."""
        if not self.fixed_port:
            self.port = free_port(self.connect_host)
        self.env["SERVICE_PORT"] = str(self.port)
        out = open(self.stdout_path, "ab")
        err = open(self.stderr_path, "ab")
        try:
            self.proc = subprocess.Popen(command(self.args), env=self.env, cwd=self.workdir,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        finally:
            out.close()
            err.close()
        self.exit_status = None
        self.started_at = time.monotonic()
        if _CURRENT_TEST[0]:
            self.test_ids.add(_CURRENT_TEST[0])
        return self

    def start(self, timeout=None):
        """Starts and waits until the ready line is logged and the port accepts.
        Retries with a new port when another test grabbed the one we picked."""
        for attempt in range(3):
            self._log_offset = len(self.stderr())
            self.spawn()
            try:
                self.wait_ready(timeout)
                return self
            except NodeExited:
                if (not self.fixed_port and attempt < 2
                        and "in use" in self.stderr()[self._log_offset:].lower()):
                    continue
                raise
        return self

    def wait_ready(self, timeout=None):
        deadline = time.monotonic() + (timeout or T(10))
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.exit_status = rc
                raise NodeExited(f"proxynode exited with {rc} before listening\n"
                                 + self.describe())
            if READY_LINE in self.stderr()[getattr(self, "_log_offset", 0):]:
                try:
                    with socket.create_connection((self.connect_host, self.port), timeout=1):
                        return
                except OSError:
                    pass
            time.sleep(0.02)
        self.kill()
        self.exit_status = "killed (never ready)"
        raise AssertionError(f"proxynode not ready after {timeout or T(10)} s\n" + self.describe())

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, check=True):
        """SIGTERM, then SIGKILL after 5 s. With check, asserts exit status 0
        and no sanitizer report. Returns (status, seconds to exit)."""
        if self.proc is None:
            return None, 0.0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(T(5))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_status = "killed (no exit within 5 s of SIGTERM)"
                if check:
                    raise AssertionError("proxynode did not exit within 5 s of SIGTERM\n"
                                         + self.describe())
                return None, time.monotonic() - t0
        took = time.monotonic() - t0
        self.exit_status = self.proc.returncode
        if check:
            self.check_clean()
        return self.proc.returncode, took

    def check_clean(self):
        if WRAPPER and self.proc.returncode != 0:
            report = valgrind_report(self.stderr())
            raise AssertionError(f"proxynode under {WRAPPER[0]} exited with "
                                 f"{self.proc.returncode} (99: valgrind errors or definite "
                                 f"leaks)\n--- valgrind report ---\n{report[-12000:]}\n"
                                 + self.describe())
        assert self.proc.returncode == 0, (f"proxynode exited with {self.proc.returncode}\n"
                                           + self.describe())
        assert_no_sanitizer_report(self.stderr() + self.stdout())

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    # -- clients
    def session(self, key="own", verify=None):
        """A requests.Session trusting only the node's certificate."""
        requests = need_module("requests")
        s = requests.Session()
        s.trust_env = False  # no proxies from the environment: loopback only
        s.verify = verify or self.cert
        if key == "own":
            key = self.key
        if key is not None:
            s.headers["x-api-key"] = key
        return s

    def grpc(self, **kw):
        from pnclient import GrpcClient
        return GrpcClient(self, **kw)


class NodeExited(AssertionError):
    pass


