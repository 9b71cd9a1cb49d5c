"""The security sweep (issue 6 part 5; SECURITY.md states each promise and
points here). Real binary, real v2ray, real clients, loopback only:

- auth on every call: every REST route and gRPC method of the pasarguard
  profile refuses missing, malformed and wrong keys while a core runs, and
  a refused call changes nothing (test_auth.py covers the same before any
  Start); the gozargah profile refuses every route and method without the
  panel's client certificate, and checks the session on each of them; the
  marzban profile refuses every route without the panel's certificate and
  checks session_id on the routes that take one;
- constant-time key comparison: pn_uuid_equal, as compiled into the binary
  (and from src/base/uuid.c at -O0..-O3/-Os), has no branch on key bytes;
  early-exit and memcmp versions compiled here are rejected by the same
  check, so it can fail;
- TLS: 1.0, 1.1 and weak TLS 1.2 ciphers refused, with a local control
  server proving the client really offered them; 1.2 and 1.3 with the
  defaults accepted; every TLS 1.2 suite the local OpenSSL knows is tried
  and only ECDHE with AES-GCM or ChaCha20-Poly1305 is accepted;
- file modes: state dir, certs dir, key, api_key, GENERATED_CONFIG_PATH and
  its xray.json are 0700/0600 even under umask 000;
- the API key never appears in logs, stdout (but the one generated-key
  line), the core's environment or its generated config;
- size limits on every path: REST bodies over 64 MiB (413) on a guarded and
  an unguarded route over HTTP/1.1 and HTTP/2, gRPC messages over 64 MiB
  (RESOURCE_EXHAUSTED), header blocks over 64 KiB (431), in the gozargah
  profile too, and the marzban profile's PROXYNODE_MAX_BODY."""
import concurrent.futures
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import uuid

import grpc
import pytest

from pnclient import (RPCS, H2Conn, assert_text_error, grpc_error, http1_request, read_response,
                      tls_connect)
from pncore import USERS, VLESS, Site, download_ok, frame, make_user, one_core
from pnmarzban import (MISMATCH, MzNode, MzPanel, ctx_panel, expect_no_http,  # noqa: F401
                       finish_module_node, module_node, mz_config, pki, raw_upgrade)
from pnnode import MAX_MESSAGE, SANITIZE, T, V2RAY, Node, binary, free_port, need_tool
from test_auth import (BAD_KEY_IDS, BAD_KEYS, NIL_KEY, OTHER_KEY, REST_NON_ROUTES,
                       REST_ROUTES, key_forms)
from test_gozargah import SESSION, ClientCerts, GzPanel, gz_env, read
from test_transport import read_big_answer, send_big_body

IA = grpc.StatusCode.INVALID_ARGUMENT
PD = grpc.StatusCode.PERMISSION_DENIED
UN = grpc.StatusCode.UNAUTHENTICATED
FORMAT_TEXT = "invalid api key format: must be a valid UUID"
SERVICE = "/service.NodeService/"
GRPC_METHODS = list(RPCS) + ["NoSuchMethod"]


def near_misses(key):
    """Malformed and wrong keys built from the node's own key: the check must
    not accept a prefix, an extension, a one-digit change or another key's
    forms. (id, header value, http status, grpc code, text)."""
    flip = key[:-1] + ("0" if key[-1] != "0" else "1")
    other_hex = OTHER_KEY.replace("-", "")
    return [
        ("empty", "", 422, IA, FORMAT_TEXT),
        ("key+char", key + "0", 422, IA, FORMAT_TEXT),
        ("key-1char", key[:-1], 422, IA, FORMAT_TEXT),
        ("hex31", key.replace("-", "")[:-1], 422, IA, FORMAT_TEXT),
        ("bearer-in-x-api-key", "Bearer " + key, 422, IA, FORMAT_TEXT),
        ("two-keys", key + "," + key, 422, IA, FORMAT_TEXT),
        ("last-digit", flip, 403, PD, "api key mismatch"),
        ("other-upper", OTHER_KEY.upper(), 403, PD, "api key mismatch"),
        ("other-hex32", other_hex, 403, PD, "api key mismatch"),
        ("other-urn", "urn:uuid:" + OTHER_KEY, 403, PD, "api key mismatch"),
    ]


NEAR_MISS_IDS = [c[0] for c in near_misses(str(uuid.uuid4()))]
BAD_IDS = BAD_KEY_IDS + NEAR_MISS_IDS


def bad_keys(key):
    """BAD_KEYS of test_auth.py plus the near misses, as (value, status, code, text)."""
    return list(BAD_KEYS) + [c[1:] for c in near_misses(key)]


# ---- pasarguard: every call refused with a running core ------------------------------------

@pytest.fixture(scope="module")
def pg(pb, tmp_path_factory):
    """A pasarguard node with a started core serving users 1 and 2."""
    s = Site(tmp_path_factory.mktemp("pg"), pb, tags=[VLESS])
    try:
        s.start(users=[make_user(pb, e, inbounds=[VLESS]) for e in ("1", "2")])
        s.pid0 = s.core()
    except BaseException:
        s.close(check=False)
        raise
    yield s
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


def damaging_body(pb, site, path):
    """What the route would do harm with if the key check let it through."""
    if path == "/start":
        return pb.Backend(type=pb.XRAY, config=json.dumps(site.config()),
                          users=[]).SerializeToString()
    if path == "/users/sync":
        return pb.Users(users=[]).SerializeToString()
    if path == "/user/sync":
        return pb.User(email="1").SerializeToString()
    if path == "/users/sync/chunked":
        return frame(pb.UsersChunk(users=[], index=0, last=True))
    if path.startswith("/stats"):
        return pb.StatRequest(name="", reset=True, type=USERS).SerializeToString()
    return b""


@pytest.mark.parametrize("method,path", REST_ROUTES + REST_NON_ROUTES,
                         ids=[f"{m} {p}" for m, p in REST_ROUTES + REST_NON_ROUTES])
def test_pg_rest_every_route_refuses_bad_keys_while_started(pg, pb, method, path):
    node = pg.node
    body = damaging_body(pb, pg, path)
    failures = []
    with node.session(key=None) as s:
        for i, (key, status, _code, text) in enumerate(bad_keys(node.key)):
            headers = {"Content-Type": "application/x-protobuf"}
            if key is not None:
                headers["x-api-key"] = key
            r = s.request(method, node.url + path, headers=headers, data=body, timeout=T(10))
            try:
                assert_text_error(r, status, text)
            except AssertionError as e:
                failures.append(f"{BAD_IDS[i]} ({key!r}): {e}")
            # the same key as Authorization: Bearer (x-api-key absent)
            if key:
                h = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
                r = s.request(method, node.url + path, headers=h, data=body, timeout=T(10))
                if r.status_code not in (401, 403, 422):
                    failures.append(f"Bearer {BAD_IDS[i]}: {r.status_code} {r.content[:80]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("method", GRPC_METHODS)
def test_pg_grpc_every_method_refuses_bad_keys_while_started(pg, pb, method):
    node = pg.node
    failures = []
    with node.grpc() as c:
        for i, (key, _status, code, text) in enumerate(bad_keys(node.key)):
            for extra_as_bearer in (False, True):
                if extra_as_bearer and not key:
                    continue
                kw = ({"key": None, "extra": [("authorization", f"Bearer {key}")]}
                      if extra_as_bearer else {"key": key})
                try:
                    if method in RPCS:
                        c.call_any(method, **kw)
                    else:
                        c.unary(SERVICE + method, b"", **kw)
                    failures.append(f"{BAD_IDS[i]}: accepted")
                    continue
                except grpc.RpcError as e:
                    got = (e.code(), e.details())
                if extra_as_bearer:
                    if got[0] not in (UN, IA, PD):
                        failures.append(f"Bearer {BAD_IDS[i]}: {got}")
                elif got != (code, text):
                    failures.append(f"{BAD_IDS[i]} ({key!r}): {got} != {(code, text)}")
    assert not failures, "\n".join(failures)


def test_pg_refused_calls_changed_nothing(pg, pb):
    """After the sweeps above (Stop, Start without users, empty syncs, reset
    reads, all with bad keys): the same core process, both users still
    served, the node still started."""
    assert pg.core() == pg.pid0, "a refused call restarted or replaced the core"
    assert pg.panel.info().started
    c = pg.client({"u1": (VLESS, "1"), "u2": (VLESS, "2")})
    download_ok(c.socks["u1"], pg.url(), pg.size(), "user 1 after the refused calls")
    download_ok(c.socks["u2"], pg.url(), pg.size(), "user 2 after the refused calls")
    c.close()


# ---- gozargah: mTLS on every route and method, then the session ------------------------------

@pytest.fixture(scope="module")
def gzcerts(tmp_path_factory):
    return ClientCerts(str(tmp_path_factory.mktemp("gzseccerts")))


@pytest.fixture(scope="module")
def gzsite(pb, gzcerts, tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("gzsec"), pb, env=gz_env(gzcerts), tags=[VLESS])
    yield s
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


def _no_http(fn):
    """fn must fail in the TLS layer (an exception), never get an HTTP answer."""
    try:
        data = fn()
    except (ssl.SSLError, ConnectionError, OSError):
        return None
    if data and b"HTTP/" in data:
        return f"a handler answered: {data[:120]!r}"
    return None


def raw_request_with_cert(node, cert, request):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(node.cert)
    if cert:
        ctx.load_cert_chain(*cert)
    with socket.create_connection((node.connect_host, node.port), timeout=T(5)) as s:
        with ctx.wrap_socket(s, server_hostname=node.connect_host) as t:
            t.sendall(request)
            return t.recv(4096)


@pytest.mark.parametrize("method,path", REST_ROUTES, ids=[f"{m} {p}" for m, p in REST_ROUTES])
def test_gz_rest_every_route_needs_the_panel_certificate(gzsite, gzcerts, method, path):
    node = gzsite.node
    problems = []
    for name, cert in (("none", None), ("rogue", (gzcerts.rogue_crt, gzcerts.rogue_key))):
        req = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
               f"Authorization: Bearer {uuid.uuid4()}\r\n\r\n").encode()
        why = _no_http(lambda: raw_request_with_cert(node, cert, req))
        if why:
            problems.append(f"{name}: {why}")
    assert not problems, problems


@pytest.mark.parametrize("method", GRPC_METHODS)
def test_gz_grpc_every_method_needs_the_panel_certificate(gzsite, gzcerts, method):
    node = gzsite.node
    with open(node.cert, "rb") as f:
        root = f.read()
    for cert in (None, (gzcerts.rogue_crt, gzcerts.rogue_key)):
        if cert:
            with open(cert[0], "rb") as a, open(cert[1], "rb") as b:
                creds = grpc.ssl_channel_credentials(root_certificates=root,
                                                     private_key=b.read(),
                                                     certificate_chain=a.read())
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=root)
        with grpc.secure_channel(f"127.0.0.1:{node.port}", creds,
                                 options=[("grpc.enable_http_proxy", 0)]) as ch:
            kind = RPCS.get(method, ("unary",))[0]
            path = SERVICE + method
            md = [("authorization", f"Bearer {uuid.uuid4()}")]
            with pytest.raises(grpc.RpcError) as ei:
                if kind == "server_stream":
                    list(ch.unary_stream(path)(b"", metadata=md, timeout=T(5)))
                elif kind == "client_stream":
                    ch.stream_unary(path)(iter([b""]), metadata=md, timeout=T(5))
                else:
                    ch.unary_unary(path)(b"", metadata=md, timeout=T(5))
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, (cert, ei.value)


def test_gz_sighup_replaces_the_trusted_client_certificate(pb, tmp_path):
    """Cutting a panel off: SSL_CLIENT_CERT_FILE replaced by another
    certificate and SIGHUP; new handshakes with the old certificate fail,
    the new one is accepted."""
    import signal
    certs = ClientCerts(str(tmp_path / "certs"))
    trusted = str(tmp_path / "trusted.pem")
    shutil.copyfile(certs.crt, trusted)
    n = Node(str(tmp_path / "node"), env={"API_KEY": None, "SSL_CLIENT_CERT_FILE": trusted})
    n.start()
    try:
        req = b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        old, new = (certs.crt, certs.key), (certs.rogue_crt, certs.rogue_key)
        assert b"HTTP/1.1 425" in raw_request_with_cert(n, old, req)
        assert _no_http(lambda: raw_request_with_cert(n, new, req)) is None
        shutil.copyfile(certs.rogue_crt, trusted + ".new")
        os.replace(trusted + ".new", trusted)
        mark = len(n.stderr())
        n.signal(signal.SIGHUP)
        deadline = time.monotonic() + T(5)
        while "SIGHUP" not in n.stderr()[mark:]:
            assert time.monotonic() < deadline, n.describe()
            time.sleep(0.05)
        assert "reloaded" in n.stderr()[mark:], n.stderr()[mark:]
        assert b"HTTP/1.1 425" in raw_request_with_cert(n, new, req)
        problem = _no_http(lambda: raw_request_with_cert(n, old, req))
        assert problem is None, problem
    finally:
        n.stop(check=True)


GZ_REST_SESSION_ROUTES = [r for r in REST_ROUTES if r[1] != "/start"]
GZ_GRPC_SESSION_METHODS = [m for m in GRPC_METHODS if m != "Start"]


def gz_grpc_error(gz, method, auth, extra=()):
    md = gz.metadata(auth) + list(extra)
    kind = RPCS.get(method, ("unary",))[0]
    path = SERVICE + method
    try:
        if kind == "server_stream":
            list(gz.channel.unary_stream(path)(b"", metadata=md, timeout=T(10)))
        elif kind == "client_stream":
            gz.channel.stream_unary(path)(iter([b""]), metadata=md, timeout=T(10))
        else:
            gz.channel.unary_unary(path)(b"", metadata=md, timeout=T(10))
    except grpc.RpcError as e:
        return e.code(), e.details()
    return "accepted", None


def test_gz_every_call_checks_the_session(gzsite, gzcerts, pb):
    """With the panel's certificate: before any Start every call but Start
    is refused with `please connect first`; after a Start every call but
    Start checks the Authorization header (missing, malformed, not a UUID,
    another session, the session id sent as x-api-key instead). A refused
    Stop or sync changes nothing."""
    gz = GzPanel(gzsite, gzcerts)
    problems = []
    try:
        users = [make_user(pb, "1", inbounds=[VLESS])]
        # no session yet (a fresh node)
        for method, path in GZ_REST_SESSION_ROUTES:
            r = gz.rest(method, path, auth=None)
            if (r.status_code, r.content) != (425, b"please connect first\n"):
                problems.append(f"no session REST {method} {path}: {r.status_code} {r.content!r}")
        for method in GZ_GRPC_SESSION_METHODS:
            got = gz_grpc_error(gz, method, None)
            if got != (UN, "please connect first"):
                problems.append(f"no session gRPC {method}: {got}")

        gz.start(gzsite.config(), users)
        pid = one_core(gzsite.node)
        sid = gz.sid
        rest_cases = [
            (None, {}, 401, "please connect first"),
            ("Bearer", {}, 401, "invalid Authorization header format"),
            ("Bearer not-a-uuid", {}, 422, "please send valid uuid"),
            (f"Bearer {sid[:-1]}", {}, 422, "please send valid uuid"),
            (f"Bearer {uuid.uuid4()}", {}, 403, "session id mismatch."),
            (None, {"x-api-key": sid}, 401, "please connect first"),
        ]
        grpc_cases = [
            (None, (), (UN, "missing authorization header")),
            (sid, (), (IA, "invalid authorization header format")),
            ("Bearer nope", (), (IA, "invalid session ID: invalid UUID length: 4")),
            (f"Bearer {uuid.uuid4()}", (), (PD, "session ID mismatch")),
            (None, [("x-api-key", sid)], (UN, "missing authorization header")),
        ]
        for method, path in GZ_REST_SESSION_ROUTES:
            body = damaging_body(pb, gzsite, path)
            for auth, headers, status, text in rest_cases:
                r = gz.rest(method, path, body, auth=auth, headers=headers)
                if (r.status_code, r.content) != (status, (text + "\n").encode()):
                    problems.append(f"REST {method} {path} auth={auth!r} {headers}: "
                                    f"{r.status_code} {r.content!r}, want {status} {text!r}")
        for method in GZ_GRPC_SESSION_METHODS:
            for auth, extra, want in grpc_cases:
                got = gz_grpc_error(gz, method, auth, extra)
                if got != want:
                    problems.append(f"gRPC {method} auth={auth!r} {extra}: {got}, want {want}")
        assert not problems, "\n".join(problems)

        # nothing changed: the same core, user 1 served, the session valid
        assert one_core(gzsite.node) == pid, "a refused call replaced the core"
        info = gz.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse, auth=SESSION)
        assert info.started and info.session_id == sid
        c = gzsite.client({"u1": (VLESS, "1")})
        download_ok(c.socks["u1"], gzsite.url(), gzsite.size(), "user 1 after refused calls")
        c.close()
    finally:
        gz.close()


# ---- marzban: mTLS on every route, session_id where it is taken ------------------------------

MZ_ROUTES = ["/", "/connect", "/disconnect", "/ping", "/start", "/stop", "/restart"]


@pytest.fixture(scope="module")
def mzsec(pki, tmp_path_factory):
    n = module_node(tmp_path_factory, pki, "mzsec")
    yield n
    finish_module_node(n)


def mz_post_with(node, pki, path, cert, body=b"{}"):
    import http.client
    ctx = ctx_panel(pki, cert=cert)
    c = http.client.HTTPSConnection(node.connect_host, node.port, context=ctx, timeout=T(5))
    try:
        c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


@pytest.mark.parametrize("path", MZ_ROUTES + ["/logs"])
def test_mz_every_route_needs_the_panel_certificate(mzsec, pki, path):
    """No client certificate, or one the panel's certificate did not issue:
    no HTTP answer on any route (the WebSocket upgrade included)."""
    body = json.dumps({"session_id": str(uuid.uuid4()), "config": "{}"}).encode()
    for cert in (None, "other"):
        if path == "/logs":
            expect_no_http(lambda: raw_upgrade(mzsec, f"session_id={uuid.uuid4()}", cert=cert))
        else:
            expect_no_http(lambda: mz_post_with(mzsec, pki, path, cert, body))


def test_mz_session_checks_on_every_session_route(mzsec, pki):
    """/ping, /start, /stop, /restart and /logs: missing, malformed, wrong
    and stale session ids are refused; a refused /stop, /start or /restart
    changes nothing. /, /connect and /disconnect take no session by design
    (mTLS is their only gate)."""
    p = MzPanel(mzsec, name="sec")
    stale = MzPanel(mzsec, name="stale")
    problems = []
    try:
        ports = {VLESS: free_port()}
        stale.connect()
        p.connect()
        p.start_ok(mz_config(ports, ["1.a"]))
        pid = mzsec.one_core()
        cfg = json.dumps(mz_config(ports, []))
        for route in ("/ping", "/start", "/stop", "/restart"):
            extra = {"config": cfg} if route in ("/start", "/restart") else {}
            cases = [
                ({**extra}, 422, None),                                       # missing
                ({"session_id": None, **extra}, 422, None),                   # null
                ({"session_id": "zzz", **extra}, 422, None),                  # not a UUID
                ({"session_id": p.sid[:-1], **extra}, 422, None),             # truncated
                ({"session_id": str(uuid.uuid4()), **extra}, 403, MISMATCH),  # wrong
                ({"session_id": stale.sid, **extra}, 403, MISMATCH),          # stale
            ]
            for body, status, detail in cases:
                r = p.post(route, body=body)
                if r.status_code != status or (detail and r.json() != detail):
                    problems.append(f"{route} {body.get('session_id', '<absent>')!r}: "
                                    f"{r.status_code} {r.text[:200]}")
        for query, status in [("", 500), ("session_id=zzz", 403),
                              (f"session_id={uuid.uuid4()}", 403),
                              (f"session_id={stale.sid}", 403)]:
            got = raw_upgrade(mzsec, query)[0]
            if got != status:
                problems.append(f"/logs?{query}: HTTP {got}, want {status}")
        assert not problems, "\n".join(problems)
        assert mzsec.one_core() == pid, "a refused call restarted the core"
        r = p.ping()
        assert (r.status_code, r.content) == (200, b"{}"), r.text
        assert p.info().json()["started"] is True
    finally:
        p.close()
        stale.close()


# ---- constant-time key comparison ----------------------------------------------------------

FLAG_SETTERS = ("cmp", "test", "add", "sub", "and", "or", "xor", "inc", "dec", "neg", "shl",
                "shr", "sar", "bt", "ucomi", "comi")


def disassemble(obj, func="pn_uuid_equal"):
    """[(address, mnemonic, operands)] of func in obj (objdump, AT&T)."""
    objdump = need_tool("objdump", "/usr/bin/objdump")
    p = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--disassemble={func}", obj],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    m = re.search(rf"<{func}>:\n(.*?)(?:\n\n|\Z)", p.stdout, re.S)
    assert m, f"{func} not found in {obj}"
    out = []
    for line in m.group(1).splitlines():
        parts = line.strip().split(None, 2)
        if len(parts) >= 2 and parts[0].endswith(":"):
            out.append((int(parts[0][:-1], 16), parts[1], parts[2] if len(parts) > 2 else ""))
    assert out, f"empty disassembly of {func} in {obj}"
    return out


def branch_problems(insns):
    """Why the compiled comparison could depend on the bytes compared (empty
    when it cannot): a call (memcmp), more than one return (an early exit),
    or a conditional jump whose flags do not come from comparing the loop
    counter with 15 or 16, or that jumps forward (out of the loop)."""
    problems = []
    if sum(1 for _, mn, _ in insns if mn.startswith("ret")) != 1:
        problems.append("more than one return")
    for addr, mn, ops in insns:
        if mn.startswith("call") or (mn.startswith("jmp") and "<pn_uuid_equal" not in ops):
            problems.append(f"{addr:x}: {mn} {ops} (leaves the function)")
    for i, (addr, mn, ops) in enumerate(insns):
        if not mn.startswith("j") or mn.startswith("jmp"):
            continue
        setter = next(((a, m, o) for a, m, o in reversed(insns[:i])
                       if m.startswith(FLAG_SETTERS)), None)
        target = re.match(r"([0-9a-f]+)", ops)
        backward = target is not None and int(target.group(1), 16) < addr
        loop_bound = (setter is not None and setter[1].startswith("cmp")
                      and re.match(r"\$0x(f|10),", setter[2]) is not None)
        if not (loop_bound and backward):
            problems.append(f"{addr:x}: {mn} {ops} after {setter}")
    return problems


BAD_EQUAL = {
    "early-exit": """
bool pn_uuid_equal(const struct pn_uuid *a, const struct pn_uuid *b)
{
    for (int i = 0; i < 16; i++)
        if (a->b[i] != b->b[i])
            return false;
    return true;
}""",
    "memcmp": """
bool pn_uuid_equal(const struct pn_uuid *a, const struct pn_uuid *b)
{
    return memcmp(a->b, b->b, 16) == 0;
}""",
}


def compile_obj(src_path, opt, out_dir):
    gcc = need_tool("gcc")
    obj = os.path.join(out_dir, f"{os.path.basename(src_path)}{opt}.o")
    p = subprocess.run([gcc, "-std=c11", "-D_GNU_SOURCE", f"-I{REPO_SRC}", opt,
                        "-c", src_path, "-o", obj], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return obj


REPO_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "src")
OPTS = ["-O0", "-O1", "-O2", "-O3", "-Os"]


def test_key_comparison_has_no_data_dependent_branch_in_the_binary():
    """The shipped binary (any non-sanitizer build: the Release/RelWithDebInfo
    one, or make memcheck's Debug one). Sanitizer builds add shadow-memory
    branches, so for them the same check runs on uuid.c compiled as the
    build would without instrumentation (next test)."""
    if SANITIZE:
        # Not a skip: the check runs on uninstrumented compiles in the next
        # test; instrumentation branches are not data-dependent on the key.
        obj = compile_obj(os.path.join(REPO_SRC, "base", "uuid.c"), "-O0", tempfile.mkdtemp())
    else:
        obj = binary()
    insns = disassemble(obj)
    assert not branch_problems(insns), (obj, branch_problems(insns), insns)


@pytest.mark.parametrize("opt", OPTS)
def test_key_comparison_source_is_constant_time_at_every_optimisation(tmp_path, opt):
    obj = compile_obj(os.path.join(REPO_SRC, "base", "uuid.c"), opt, str(tmp_path))
    insns = disassemble(obj)
    assert not branch_problems(insns), (opt, branch_problems(insns), insns)


# gcc inlines a 16-byte memcmp branch-free from -O2 on: not a leak there.
LEAKY = [("early-exit", o) for o in OPTS] + [("memcmp", o) for o in ("-O0", "-O1", "-Os")]


@pytest.mark.parametrize("variant,opt", LEAKY, ids=[f"{v}{o}" for v, o in LEAKY])
def test_key_comparison_check_rejects_leaky_versions(tmp_path, variant, opt):
    """The negative control: the check above fails for an early-exit loop
    and for a memcmp call, so a regression in uuid.c would be caught."""
    src = tmp_path / f"{variant}.c"
    src.write_text("#include <stdbool.h>\n#include <stdint.h>\n#include <string.h>\n"
                   "struct pn_uuid { uint8_t b[16]; };\n" + BAD_EQUAL[variant] + "\n")
    insns = disassemble(compile_obj(str(src), opt, str(tmp_path)))
    assert branch_problems(insns), f"{variant} {opt} passed the check: {insns}"


# ---- TLS versions and ciphers --------------------------------------------------------------

def openssl_run(*args, input="", timeout=None):
    return subprocess.run([need_tool("openssl")] + list(args), capture_output=True, text=True,
                          input=input, timeout=timeout or T(20))


def rsa_cert(directory, name="rsa"):
    key = os.path.join(directory, f"{name}_key.pem")
    crt = os.path.join(directory, f"{name}_cert.pem")
    p = openssl_run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
                    "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=digitalSignature,keyEncipherment,keyCertSign")
    assert p.returncode == 0, p.stderr
    os.chmod(key, 0o600)
    return crt, key


class TlsTarget:
    """A node to probe: address, the certificate to trust and the client
    certificate to present (marzban)."""

    def __init__(self, node, client=None):
        self.node, self.client = node, client

    @property
    def port(self):
        return self.node.port

    def client_args(self):
        return ["-cert", self.client[0], "-key", self.client[1]] if self.client else []


@pytest.fixture(scope="module", params=["pasarguard-ec", "pasarguard-rsa", "marzban-rsa"])
def tls_target(request, pki, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tls-" + request.param))
    if request.param == "marzban-rsa":
        n = MzNode(os.path.join(d, "node"), pki)
        client = (pki.panel_crt, pki.panel_key)
    else:
        env = {}
        if request.param == "pasarguard-rsa":
            crt, key = rsa_cert(d)
            env = {"SSL_CERT_FILE": crt, "SSL_KEY_FILE": key}
        n = Node(os.path.join(d, "node"), env=env)
        client = None
    n.start()
    yield TlsTarget(n, client)
    assert n.alive(), n.describe()
    n.stop(check=True)


@pytest.fixture(scope="module")
def control_cert(tmp_path_factory):
    return rsa_cert(str(tmp_path_factory.mktemp("tlsctl")), "control")


class ControlServer:
    """openssl s_server with the same flags as the client: proves that the
    client can really negotiate what the node must refuse."""

    def __init__(self, cert, flags):
        for attempt in range(3):  # another test may take the free port first
            self.port = free_port()
            self.proc = subprocess.Popen([need_tool("openssl"), "s_server", "-accept",
                                          str(self.port), "-cert", cert[0], "-key", cert[1]]
                                         + list(flags), stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_listening():
                return
            err = self.proc.communicate()[1].decode(errors="replace")
            assert attempt < 2 and "in use" in err, f"openssl s_server {flags} failed: {err}"

    def _wait_listening(self):
        deadline = time.monotonic() + T(10)
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                if self.proc.poll() is not None:
                    return False
                assert time.monotonic() < deadline, "openssl s_server never listened"
                time.sleep(0.05)

    def close(self):
        self.proc.kill()
        self.proc.wait()


WEAK = [
    ("tls1.0", ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]),
    ("tls1.1", ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
    ("AES128-SHA", ["-tls1_2", "-cipher", "AES128-SHA@SECLEVEL=0"]),
    ("DES-CBC3-SHA", ["-tls1_2", "-cipher", "DES-CBC3-SHA@SECLEVEL=0"]),
    ("RC4", ["-tls1_2", "-cipher", "RC4@SECLEVEL=0"]),
    ("NULL", ["-tls1_2", "-cipher", "NULL@SECLEVEL=0"]),
    ("aNULL", ["-tls1_2", "-cipher", "aNULL@SECLEVEL=0"]),
]


def libssl_of(path):
    p = subprocess.run(["ldd", path], capture_output=True, text=True)
    m = re.search(r"libssl\.so\.\S+ => (\S+)", p.stdout)
    return os.path.realpath(m.group(1)) if m else None


def test_node_and_openssl_tool_share_libssl():
    """The reasoning for ciphers this OpenSSL does not implement (3DES, RC4
    on Debian's OpenSSL 3): the node links the same libssl, so it cannot
    negotiate them either."""
    node_lib, tool_lib = libssl_of(binary()), libssl_of(need_tool("openssl"))
    assert node_lib and node_lib == tool_lib, (node_lib, tool_lib)


@pytest.mark.parametrize("name,flags", WEAK, ids=[w[0] for w in WEAK])
def test_weak_tls_refused(tls_target, control_cert, name, flags):
    """s_client with only the weak version or cipher fails against the node
    after succeeding against a control server. A cipher this libssl does not
    implement at all (3DES and RC4 on Debian's OpenSSL 3) cannot be offered
    by any client here nor negotiated by the node (same libssl, asserted
    above): for those the proof is `openssl ciphers` refusing the name."""
    if not name.startswith("tls1."):
        cipher = flags[flags.index("-cipher") + 1]
        known = openssl_run("ciphers", "-s", "-tls1_2", cipher)
        if known.returncode != 0:
            assert "no cipher match" in known.stderr, known.stderr
            return
    ctl = ControlServer(control_cert, flags)
    try:
        p = openssl_run("s_client", "-connect", f"127.0.0.1:{ctl.port}", *flags)
        assert p.returncode == 0, f"control: s_client {flags} cannot connect at all:\n" \
                                  f"{p.stdout[-1500:]}{p.stderr[-1500:]}"
    finally:
        ctl.close()
    p = openssl_run("s_client", "-connect", f"127.0.0.1:{tls_target.port}", *flags,
                    *tls_target.client_args())
    assert p.returncode != 0, f"node accepted s_client {' '.join(flags)}:\n{p.stdout[-2500:]}"
    assert tls_target.node.alive()


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_modern_tls_with_defaults_accepted(tls_target, flag):
    n = tls_target.node
    p = openssl_run("s_client", "-connect", f"127.0.0.1:{n.port}", flag, "-CAfile", n.cert,
                    "-verify_return_error", *tls_target.client_args())
    assert p.returncode == 0, f"s_client {flag} failed: {p.stdout[-1500:]}{p.stderr[-1500:]}"
    want = "TLSv1.2" if flag == "-tls1_2" else "TLSv1.3"
    assert re.search(rf"(Protocol *: *|New, ){want}", p.stdout), p.stdout[-1500:]


def tls12_suites():
    p = openssl_run("ciphers", "-s", "-tls1_2", "ALL:eNULL:aNULL@SECLEVEL=0")
    assert p.returncode == 0, p.stderr
    return [c for c in p.stdout.strip().split(":") if c]


def test_only_ecdhe_aead_tls12_suites_accepted(tls_target):
    """Every TLS 1.2 suite this OpenSSL knows, offered alone: the node
    accepts only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305."""
    suites = tls12_suites()
    assert len(suites) > 30, suites
    pki_client = tls_target.client

    def try_suite(name):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.set_ciphers(name + "@SECLEVEL=0")
        except ssl.SSLError:
            return name, None
        if pki_client:
            ctx.load_cert_chain(*pki_client)
        try:
            with socket.create_connection(("127.0.0.1", tls_target.port), timeout=T(5)) as raw:
                with ctx.wrap_socket(raw) as s:
                    return name, s.cipher()[0]
        except (ssl.SSLError, OSError):
            return name, None

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = dict(ex.map(try_suite, suites))
    accepted = sorted(n for n, c in results.items() if c)
    assert accepted, "no TLS 1.2 suite accepted at all"
    bad = [n for n in accepted
           if not re.fullmatch(r"ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|"
                               r"CHACHA20-POLY1305)", n)]
    assert not bad, f"weak TLS 1.2 suites accepted: {bad} (all accepted: {accepted})"


# ---- file modes ----------------------------------------------------------------------------

class Umask:
    """Runs the node under umask 000: the modes must come from the node."""

    def __enter__(self):
        self.old = os.umask(0)

    def __exit__(self, *a):
        os.umask(self.old)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_modes(want):
    bad = {p: oct(mode(p)) for p, m in want.items() if not os.path.exists(p) or mode(p) != m}
    missing = [p for p in want if not os.path.exists(p)]
    assert not missing, f"not created: {missing}"
    assert not bad, f"wrong modes (want {[oct(m) for m in want.values()]}): {bad}"


def assert_not_group_writable(path):
    assert not mode(path) & 0o022, f"{path} is group/world writable: {oct(mode(path))}"


@pytest.mark.parametrize("profile", ["pasarguard", "gozargah"])
def test_created_files_are_private(pb, tmp_path, profile):
    """A fresh state dir (generated key, certificate and, for pasarguard,
    API key) and, with DEBUG=true after a Start, GENERATED_CONFIG_PATH and
    its xray.json: directories 0700, secrets and the config 0600, under
    umask 000. No temp file is left next to xray.json."""
    env = {"DEBUG": "true", "PROXYNODE_PROFILE": profile}
    if profile == "pasarguard":
        env["API_KEY"] = None  # generated into the state dir
    else:
        certs = ClientCerts(str(tmp_path / "gzcerts"))
        env.update(gz_env(certs))
    with Umask():
        site = Site(tmp_path / "site", pb, env=env, tags=[VLESS])
    try:
        n = site.node
        state = n.state_dir
        if profile == "pasarguard":
            m = re.search(r"Generated API key \(shown once, stored in .+\): (\S+)", n.stdout())
            assert m, n.stdout()
            n.key = m.group(1)
            site.start(users=[make_user(pb, "1", inbounds=[VLESS])])
        else:
            gz = GzPanel(site, certs)
            gz.start(site.config(), [make_user(pb, "1", inbounds=[VLESS])])
            gz.close()
        one_core(n)
        gen = os.path.join(state, "generated")
        want = {state: 0o700, os.path.join(state, "certs"): 0o700, n.keyfile: 0o600,
                gen: 0o700, os.path.join(gen, "xray.json"): 0o600}
        if profile == "pasarguard":
            want[os.path.join(state, "api_key")] = 0o600
        deadline = time.monotonic() + T(5)
        while not os.path.exists(os.path.join(gen, "xray.json")) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert_modes(want)
        assert_not_group_writable(n.cert)
        leftovers = [f for f in os.listdir(gen) if f != "xray.json"]
        assert not leftovers, leftovers
        for dirpath, dirs, files in os.walk(state):
            for f in dirs + files:
                assert_not_group_writable(os.path.join(dirpath, f))
    finally:
        site.close()


def test_marzban_generated_certificate_is_private(pki, tmp_path):
    """The marzban profile with no certificate files: the missing parent
    directory is created 0700 and the key 0600, under umask 000."""
    n = MzNode(str(tmp_path / "mz"), pki, own_cert=False)
    with Umask():
        n.start()
    try:
        d = str(tmp_path / "mz" / "ssl")
        assert_modes({d: 0o700, os.path.join(d, "ssl_key.pem"): 0o600})
        assert_not_group_writable(os.path.join(d, "ssl_cert.pem"))
    finally:
        n.stop(check=True)


# ---- the API key never in logs -------------------------------------------------------------

def key_texts(key):
    """Every form the key could be logged in, plus the key less its last
    character (catches logging a near-miss or a truncated copy)."""
    k = key.lower()
    h = k.replace("-", "")
    return {k, k.upper(), h, h.upper(), k[:-1], h[:-1]}


def assert_no_key(text, key, where):
    low = text.lower()
    for form in key_texts(key):
        assert form.lower() not in low, f"the API key ({form}) appears in {where}:\n" \
                                        f"{text[max(0, low.find(form.lower()) - 300):][:800]}"


class EnvRecordingCore:
    """XRAY_EXECUTABLE_PATH: records argv and environment of every run (the
    version probe too), then execs the real v2ray."""

    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "xray")
        with open(self.path, "w") as f:
            f.write("#!/bin/sh\n"
                    f"d={directory}\n"
                    'env > "$d/env-$$.txt"\n'
                    'printf "%s\\n" "$@" > "$d/argv-$$.txt"\n'
                    f'exec {V2RAY} "$@"\n')
        os.chmod(self.path, 0o755)

    def records(self):
        out = {}
        for f in sorted(os.listdir(self.dir)):
            if f.startswith(("env-", "argv-")):
                with open(os.path.join(self.dir, f)) as fh:
                    out[f] = fh.read()
        return out


@pytest.mark.parametrize("source", ["generated", "env"])
def test_api_key_never_logged_nor_passed_to_the_core(pb, tmp_path, source):
    """DEBUG=true, a generated key or API_KEY in the environment; a Start,
    every sync kind, stats, logs, REST and gRPC with the key in every
    accepted form, failures with wrong and malformed keys (some containing
    the key): the key appears in no log
    line, in stdout only on the one generated-key line, not in the core's
    argv, environment (the version probe's included) or generated config."""
    core = EnvRecordingCore(str(tmp_path / "core"))
    env = {"DEBUG": "true", "PROXYNODE_PROFILE": "pasarguard"}
    if source == "generated":
        env["API_KEY"] = None
    site = Site(tmp_path / "site", pb, core=core.path, tags=[VLESS], env=env)
    n = site.node
    try:
        if source == "generated":
            m = re.search(r"^Generated API key \(shown once, stored in .+\): (\S+)\n",
                          n.stdout(), re.M)
            assert m, n.stdout()
            n.key = m.group(1)
        key = n.key
        u1, u2 = (make_user(pb, e, inbounds=[VLESS]) for e in ("1", "2"))
        site.start(users=[u1])
        pid = one_core(n)
        p = site.panel
        p.sync_user(u2)
        p.sync_users([u1, u2])
        p.sync_chunked([pb.UsersChunk(users=[u1, u2], index=0, last=True)])
        c = site.client({"u1": (VLESS, "1")})
        download_ok(c.socks["u1"], site.url(), site.size(), "user 1")
        c.close()
        p.stats(USERS)
        p.backend_stats()
        p.system_stats()
        with n.grpc() as g:
            try:
                g.server_stream("GetLogs", pb.Empty(), timeout=1)
            except grpc.RpcError:
                pass
            for form in key_forms(key).values():
                g.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse, key=form)
            g.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse, key=None,
                    extra=[("authorization", f"Bearer {key}")])
            for bad in [c[1] for c in near_misses(key)] + [None, OTHER_KEY, NIL_KEY]:
                grpc_error(g.unary, "GetStats", pb.StatRequest(), key=bad)
        with n.session(key=None) as s:
            for form in key_forms(key).values():
                assert s.get(n.url + "/info", headers={"x-api-key": form},
                             timeout=T(5)).status_code == 200
            r = s.get(n.url + "/stats/backend", headers={"Authorization": f"Bearer {key}"},
                      timeout=T(5))
            assert r.status_code == 200, r.text
            for bad in [c[1] for c in near_misses(key)]:
                s.put(n.url + "/users/sync", headers={"x-api-key": bad},
                      data=pb.Users(users=[u1]).SerializeToString(), timeout=T(5))
                s.get(n.url + "/nope", headers={"Authorization": f"Bearer {bad}"}, timeout=T(5))
            s.put(n.url + "/users/sync", headers={"x-api-key": key},
                  data=b"\xff not protobuf", timeout=T(5))
        with open(f"/proc/{pid}/environ", "rb") as f:
            core_env = f.read().decode(errors="replace")
        with open(os.path.join(n.state_dir, "generated", "xray.json")) as f:
            generated = f.read()
    finally:
        site.close()
    out = n.stdout()
    gen_lines = [ln for ln in out.splitlines() if ln.startswith("Generated API key")]
    assert len(gen_lines) == (source == "generated"), out
    for ln in gen_lines:
        out = out.replace(ln, "")
    assert_no_key(out, key, "stdout (besides the generated-key line)")
    assert "DEBUG" in n.stderr(), "DEBUG=true logged nothing at debug level"
    assert_no_key(n.stderr(), key, "the node's log (stderr)")
    assert_no_key(core_env, key, "the running core's environment")
    assert "API_KEY=" not in core_env, core_env
    assert_no_key(generated, key, "GENERATED_CONFIG_PATH/xray.json")
    recs = core.records()
    assert any(r.strip() == "-version" for f, r in recs.items() if f.startswith("argv-")), recs
    for f, text in recs.items():
        argv = recs.get("argv-" + f.split("-", 1)[1], "?").split()
        assert "API_KEY=" not in text, f"the core run `{' '.join(argv)}` got API_KEY:\n{text}"
        assert_no_key(text, key, f"the core run `{' '.join(argv)}` ({f})")


# ---- size limits ---------------------------------------------------------------------------

def send_body_h1(node, method, path, headers, total, chunked=False):
    """Streams a body of `total` bytes on HTTP/1.1 and returns the answer as
    soon as the node gives one (before the whole body when it refuses)."""
    s = tls_connect(node, alpn=["http/1.1"])
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items())
        head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n"
        sent, got = send_big_body(s, (head + "\r\n").encode(), total, chunked=chunked)
        return read_big_answer(s, method, got), sent
    finally:
        s.close()


LIMIT_CASES = [
    # (id, method, path, with key, transport); guarded routes on a started node
    ("unguarded-start-h1", "POST", "/start", True, "h1"),
    ("unguarded-start-h1-chunked", "POST", "/start", True, "h1-chunked"),
    ("unguarded-start-h2", "POST", "/start", True, "h2"),
    ("guarded-stats-h1-chunked", "GET", "/stats", True, "h1-chunked"),
    ("guarded-users-sync-h1", "PUT", "/users/sync", True, "h1"),
    ("guarded-user-sync-h2", "PUT", "/user/sync", True, "h2"),
    ("no-key-start-h1", "POST", "/start", False, "h1"),
    ("no-key-users-sync-h2", "PUT", "/users/sync", False, "h2"),
]


@pytest.mark.parametrize("case", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_rest_body_over_64mib_is_413(request, case):
    """test_transport.py covers PUT /users/sync before any Start; here an
    unguarded route, guarded ones past their guard (a core runs) and calls
    without a key (refused by either check, never served)."""
    _id, method, path, with_key, transport = case
    node = request.getfixturevalue("pg").node if _id.startswith("guarded") \
        else request.getfixturevalue("node")
    headers = {"Content-Type": "application/x-protobuf"}
    if with_key:
        headers["x-api-key"] = node.key
    total = MAX_MESSAGE + 1
    if transport.startswith("h1"):
        r, _sent = send_body_h1(node, method, path, headers, total,
                                chunked=transport == "h1-chunked")
        status, body = r.status, r.data
    else:
        c = H2Conn(node, timeout=T(20))
        try:
            res = c.request(method, path, list(headers.items()), body=b"\x0a" * total,
                            timeout=T(20))
            status, body = res["status"], res["body"]
            after = c.request("GET", "/info", [("x-api-key", node.key)])
            assert after["status"] == 200, "the h2 connection is unusable after the 413"
        finally:
            c.close()
    if with_key:
        assert (status, body) == (413, b"request body too large\n"), (status, body[:200])
    else:
        assert status in (401, 413), (status, body[:200])
    assert node.alive()


@pytest.mark.parametrize("method,with_key", [("Start", True), ("SyncUsers", True),
                                             ("Start", False)],
                         ids=["Start", "SyncUsers-started", "Start-no-key"])
def test_grpc_message_over_64mib_is_resource_exhausted(request, pb, method, with_key):
    """Start (unguarded), SyncUsers past its guard (a core runs; before a
    Start the guard answers at the headers, test_auth.py), and no key."""
    node = request.getfixturevalue("pg").node if method == "SyncUsers" \
        else request.getfixturevalue("node")
    payload = b"\x00" * (MAX_MESSAGE + 1)
    with node.grpc(options=[("grpc.max_send_message_length", -1)]) as c:
        code, details = grpc_error(c.unary, method, payload, key="own" if with_key else None,
                                   timeout=T(30))
        if with_key:
            assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"grpc: received message larger than max "
                                       f"({MAX_MESSAGE + 1} vs. {MAX_MESSAGE})"), details
        else:
            assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, UN), (code, details)
        assert c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse).node_version


@pytest.mark.parametrize("transport", ["h1", "h2"])
@pytest.mark.parametrize("path,with_key", [("/info", True), ("/users/sync", True),
                                           ("/info", False)],
                         ids=["info", "guarded", "no-key"])
def test_header_block_over_64kib_is_431(node, transport, path, with_key):
    headers = {"X-Big": "a" * 70000}
    if with_key:
        headers["x-api-key"] = node.key
    if transport == "h1":
        s = tls_connect(node, alpn=None)
        try:
            r = http1_request(s, "GET", path, headers)
        finally:
            s.close()
        assert_text_error(r, 431, "request header fields too large")
    else:
        c = H2Conn(node)
        try:
            res = c.request("GET", path, [(k.lower(), v) for k, v in headers.items()])
        finally:
            c.close()
        assert (res["status"], res["body"]) == (431, b"request header fields too large\n"), \
            {k: v for k, v in res.items() if k != "body"}


def test_grpc_metadata_over_64kib_is_refused(node):
    """A gRPC request whose header block exceeds 64 KiB (raw h2: grpcio caps
    metadata itself): refused with 431 before any handler runs."""
    c = H2Conn(node)
    try:
        res = c.request("POST", SERVICE + "GetBaseInfo",
                        [("content-type", "application/grpc"), ("te", "trailers"),
                         ("x-api-key", node.key), ("x-big", "a" * 70000)],
                        body=b"\0\0\0\0\0")
    finally:
        c.close()
    assert res["status"] == 431 or res["reset"] is not None, res
    assert res["headers"].get("grpc-status", res["trailers"].get("grpc-status")) != "0", res


def test_gozargah_limits(gzsite, gzcerts):
    """The gozargah profile has the same limits behind mTLS: 413 on REST,
    RESOURCE_EXHAUSTED on gRPC (Start needs no session), 431 on headers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(gzsite.node.cert)
    ctx.load_cert_chain(gzcerts.crt, gzcerts.key)
    for path, total, extra, want in [
            ("/start", MAX_MESSAGE + 1, "", (413, b"request body too large\n")),
            ("/info", 0, "X-Big: " + "a" * 70000 + "\r\n",
             (431, b"request header fields too large\n"))]:
        raw = socket.create_connection(("127.0.0.1", gzsite.node.port), timeout=T(20))
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        try:
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
                    f"Content-Length: {total}\r\n\r\n").encode()
            if total:
                _sent, got = send_big_body(s, head, total)
                r = read_big_answer(s, "POST", got)
            else:
                s.sendall(head)
                r = read_response(s, "POST")
            assert (r.status, r.data) == want, (path, r.status, r.data[:200])
        finally:
            s.close()
    ch = grpc.secure_channel(
        f"127.0.0.1:{gzsite.node.port}",
        grpc.ssl_channel_credentials(root_certificates=read(gzsite.node.cert),
                                     private_key=read(gzcerts.key),
                                     certificate_chain=read(gzcerts.crt)),
        options=[("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", -1)])
    try:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(SERVICE + "Start")(b"\x00" * (MAX_MESSAGE + 1), timeout=T(30))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
    finally:
        ch.close()
    assert gzsite.node.alive()


def mz_raw(node, pki, path, head_extra="", body_total=0, chunked=False):
    ctx = ctx_panel(pki)
    raw = socket.create_connection((node.connect_host, node.port), timeout=T(20))
    s = ctx.wrap_socket(raw)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"{head_extra}")
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else \
            f"Content-Length: {body_total}\r\n\r\n"
        if body_total:
            _sent, got = send_big_body(s, head.encode(), body_total, chunked=chunked)
            return read_big_answer(s, "POST", got)
        s.sendall(head.encode())
        return read_response(s, "POST")
    finally:
        s.close()


def test_marzban_default_max_body_is_256mib(mzsec, pki):
    """Default PROXYNODE_MAX_BODY: a declared 256 MiB + 1 body is refused
    with a JSON 413 before it is sent; a header block over 64 KiB gets 431."""
    r = mz_raw(mzsec, pki, "/ping", body_total=(256 << 20) + 1)
    assert r.status == 413 and isinstance(json.loads(r.data).get("detail"), str), \
        (r.status, r.data[:200])
    r = mz_raw(mzsec, pki, "/ping", head_extra="X-Big: " + "a" * 70000 + "\r\n")
    assert r.status == 431, (r.status, r.data[:200])
    assert mzsec.alive()


def test_marzban_max_body_setting(pki, tmp_path):
    """PROXYNODE_MAX_BODY=1M: exactly 1 MiB of JSON is served, one byte more
    is 413 (declared or chunked), on a session route and on /."""
    n = MzNode(str(tmp_path / "mz"), pki, env={"PROXYNODE_MAX_BODY": "1M"})
    n.start()
    try:
        p = MzPanel(n)
        p.connect()
        limit = 1 << 20
        prefix = json.dumps({"session_id": p.sid, "pad": ""})[:-2]
        exact = (prefix + "x" * (limit - len(prefix) - 2) + '"}').encode()
        assert len(exact) == limit
        r = p.post("/ping", body=exact)
        assert (r.status_code, r.content) == (200, b"{}"), (r.status_code, r.text[:200])
        for path in ("/ping", "/"):
            for chunked in (False, True):
                r = mz_raw(n, pki, path, body_total=limit + 1, chunked=chunked)
                assert r.status == 413 and isinstance(json.loads(r.data).get("detail"), str), \
                    (path, chunked, r.status, r.data[:200])
        r = p.ping()
        assert r.status_code == 200, r.text
        p.close()
    finally:
        n.stop(check=True)
