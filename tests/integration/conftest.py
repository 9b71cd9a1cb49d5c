"""Shared fixtures for the integration suite: they start the real proxynode
binary on free loopback ports in temporary directories and talk to it with
real clients (grpcio, requests, python ssl, curl, openssl).

Environment (set by CMake's ctest entries):
  PROXYNODE_BIN  the binary under test (default: <repo>/build/proxynode)
  PN_PROTO_DIR   the directory holding service.proto (default: <repo>/proto)
  PN_SANITIZE    ON when the binary is built with ASan+UBSan: timeouts x3

Nothing is skipped: a missing tool or module is a test failure that says
what to install. Helpers live in pnnode.py (the process) and pnclient.py
(clients).
"""
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from pnnode import (REPO, V2RAY, Node, _CURRENT_TEST, _NODES, binary, need_module,  # noqa: E402
                    need_tool)

# The test clients must be importable by this interpreter: fail the whole run
# with an install hint rather than skipping anything.
_missing = []
for _mod, _pkg in [("grpc", "python3-grpcio"), ("google.protobuf", "python3-protobuf"),
                   ("requests", "python3-requests"), ("h2", "python3-h2")]:
    try:
        importlib.import_module(_mod)
    except ImportError:
        _missing.append(_pkg)
if _missing:
    raise ImportError(f"{sys.executable} lacks test clients: apt-get install {' '.join(_missing)} "
                      f"(or scripts/deps.sh test); run the suite with /usr/bin/python3")


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pb():
    """service_pb2 generated from PN_PROTO_DIR with protoc into a temp dir."""
    protoc = need_tool("protoc")
    need_module("google.protobuf")
    proto_dir = os.path.abspath(os.environ.get("PN_PROTO_DIR") or os.path.join(REPO, "proto"))
    src = os.path.join(proto_dir, "service.proto")
    if not os.path.exists(src):
        pytest.fail(f"service.proto not found in {proto_dir} (set PN_PROTO_DIR)", pytrace=False)
    out = tempfile.mkdtemp(prefix="pn-pb-")
    p = subprocess.run([protoc, f"--proto_path={proto_dir}", f"--python_out={out}", src],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"protoc failed: {p.stderr}"
    sys.path.insert(0, out)
    try:
        mod = importlib.import_module("service_pb2")
    finally:
        sys.path.remove(out)
    yield mod
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def make_node(tmp_path):
    """Factory: make_node(env={...}, ...) -> started Node; stopped (and checked
    for a clean exit) at teardown unless the test stopped it already."""
    nodes = []

    def factory(start=True, name=None, **kw):
        n = Node(str(tmp_path / (name or f"node{len(nodes)}")), **kw)
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


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One node per test module: a random API key, a generated certificate in
    its state dir, v2ray as the configured core. Checked for a clean exit."""
    binary()
    need_tool("v2ray", V2RAY)
    n = Node(str(tmp_path_factory.mktemp("node")))
    n.start()
    yield n
    assert n.alive(), "the module's node died during the tests\n" + n.describe()
    n.stop(check=True)


# ---- failure reports: show the node's output --------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _CURRENT_TEST[0] = item.nodeid
    yield
    _CURRENT_TEST[0] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    for n in _NODES:
        if n.alive():
            n.test_ids.add(item.nodeid)
    if rep.failed:
        for n in _NODES:
            if item.nodeid in n.test_ids:
                rep.sections.append((f"proxynode {n.workdir}", n.describe()))
