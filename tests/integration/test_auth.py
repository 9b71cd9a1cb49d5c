"""The key check on every REST route and every gRPC method (spec §4, §6.1,
§7, §18 cases 6-8), and the backend guard before any Start (case 10)."""
import uuid

import grpc
import pytest

from pnclient import RPCS, assert_text_error, grpc_error, read_response, tls_connect
from pnnode import NODE_VERSION, T, V2RAY_VERSION

# Every REST route as implemented in src/api/pasarguard.c (method, path).
REST_ROUTES = [
    ("GET", "/info"),
    ("PUT", "/stop"),
    ("GET", "/logs"),
    ("GET", "/stats"),
    ("GET", "/stats/"),
    ("GET", "/stats/latency"),
    ("GET", "/stats/user/online"),
    ("GET", "/stats/user/online_ip"),
    ("GET", "/stats/backend"),
    ("GET", "/stats/system"),
    ("GET", "/stats/outbounds"),
    ("GET", "/stats/outbound"),
    ("GET", "/stats/inbounds"),
    ("GET", "/stats/inbound"),
    ("GET", "/stats/users"),
    ("GET", "/stats/user"),
    ("PUT", "/user/sync"),
    ("PUT", "/users/sync"),
    ("POST", "/users/sync"),
    ("PUT", "/users/sync/chunked"),
    ("POST", "/start"),
]
# Not routes: an unknown path and wrong methods. Without a key they are 401 too.
REST_NON_ROUTES = [
    ("GET", "/no/such/route"),
    ("GET", "/"),
    ("POST", "/info"),
    ("DELETE", "/stats"),
    ("GET", "/stop"),
    ("GET", "/users/sync"),
]
# Guarded routes ("key + core", spec §6.1) answer the guard before any Start.
# /stats/latency is not among them: DESIGN "Small rules" (and spec §5.2) say
# latency without a core is an empty list (tested at the end of this file).
REST_GUARDED = [r for r in REST_ROUTES if r[1] not in ("/info", "/start", "/stats/latency")]
GRPC_GUARDED = [m for m in RPCS if m not in ("Start", "GetBaseInfo", "GetOutboundsLatency")]
GRPC_UNKNOWN = ["/service.NodeService/NoSuchMethod", "/other.Service/GetBaseInfo"]

OTHER_KEY = str(uuid.uuid4())
NIL_KEY = "00000000-0000-0000-0000-000000000000"
BAD_KEYS = [
    # (header value or None, http status, grpc code, text)
    (None, 401, grpc.StatusCode.UNAUTHENTICATED, "missing x-api-key header"),
    ("not-a-uuid", 422, grpc.StatusCode.INVALID_ARGUMENT,
     "invalid api key format: must be a valid UUID"),
    (OTHER_KEY, 403, grpc.StatusCode.PERMISSION_DENIED, "api key mismatch"),
    (NIL_KEY, 403, grpc.StatusCode.PERMISSION_DENIED, "api key mismatch"),
]
BAD_KEY_IDS = ["missing", "not-uuid", "other-uuid", "nil-uuid"]


def rest(node, method, path, headers=None, body=b"", key="own"):
    with node.session(key=key) as s:
        return s.request(method, node.url + path, headers=headers or {}, data=body,
                         timeout=T(10))


def grpc_call(node, method, key="own", extra=()):
    """Calls by rpc name or full path; returns (code, details)."""
    with node.grpc() as c:
        try:
            if method.startswith("/"):
                c.unary(method, b"", key=key, extra=extra)
            else:
                c.call_any(method, key=key, extra=extra)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, None


def check_info(pb, body):
    m = pb.BaseInfoResponse.FromString(body)
    assert (m.started, m.core_version, m.node_version) == (False, V2RAY_VERSION, NODE_VERSION)


# ---- REST: every route x every bad key ---------------------------------------------------------

@pytest.mark.parametrize("key,status,code,text", BAD_KEYS, ids=BAD_KEY_IDS)
@pytest.mark.parametrize("method,path", REST_ROUTES + REST_NON_ROUTES,
                         ids=[f"{m} {p}" for m, p in REST_ROUTES + REST_NON_ROUTES])
def test_rest_bad_key(node, method, path, key, status, code, text):
    r = rest(node, method, path, key=key)
    assert_text_error(r, status, text)


@pytest.mark.parametrize("key,status,code,text", BAD_KEYS, ids=BAD_KEY_IDS)
def test_rest_bad_key_as_bearer(node, key, status, code, text):
    """Authorization: Bearer <key> with no x-api-key: same parse and texts."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    for method, path in [("GET", "/info"), ("GET", "/stats/backend"), ("PUT", "/users/sync")]:
        assert_text_error(rest(node, method, path, headers, key=None), status, text)


# ---- REST: accepted key forms and precedence -------------------------------------------------------

def key_forms(key):
    return {
        "lower": key.lower(),
        "upper": key.upper(),
        "hex32": key.replace("-", ""),
        "hex32-upper": key.replace("-", "").upper(),
        "braces": "{" + key + "}",
        "urn": "urn:uuid:" + key,
    }


@pytest.mark.parametrize("form", ["lower", "upper", "hex32", "hex32-upper", "braces", "urn"])
def test_rest_key_forms_accepted(node, pb, form):
    r = rest(node, "GET", "/info", key=key_forms(node.key)[form])
    assert r.status_code == 200, (r.status_code, r.content)
    assert r.headers["Content-Type"] == "application/x-protobuf"
    check_info(pb, r.content)


def test_rest_bearer_accepted_when_x_api_key_absent(node, pb):
    r = rest(node, "GET", "/info", {"Authorization": f"Bearer {node.key.upper()}"}, key=None)
    assert r.status_code == 200, (r.status_code, r.content)
    check_info(pb, r.content)
    r = rest(node, "GET", "/stats/backend", {"Authorization": f"Bearer {node.key}"}, key=None)
    assert_text_error(r, 500, "backend not initialized")


def test_rest_x_api_key_wins_over_bearer(node, pb):
    right = {"Authorization": f"Bearer {node.key}"}
    assert_text_error(rest(node, "GET", "/info", right, key=OTHER_KEY), 403, "api key mismatch")
    assert_text_error(rest(node, "GET", "/info", right, key="not-a-uuid"), 422,
                      "invalid api key format: must be a valid UUID")
    r = rest(node, "GET", "/info", {"Authorization": f"Bearer {OTHER_KEY}"})
    assert r.status_code == 200, (r.status_code, r.content)
    check_info(pb, r.content)


def test_rest_authorization_not_bearer_is_missing_key(node):
    r = rest(node, "GET", "/info", {"Authorization": f"Basic {node.key}"}, key=None)
    assert_text_error(r, 401, "missing x-api-key header")


def test_rest_first_x_api_key_wins(node, pb):
    s = tls_connect(node)
    try:
        sock_req = (f"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {node.key}\r\n"
                    f"x-api-key: {OTHER_KEY}\r\n\r\n").encode()
        s.sendall(sock_req)
        r = read_response(s)
        assert r.status == 200, (r.status, r.data)
        check_info(pb, r.data)
        s.sendall((f"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {OTHER_KEY}\r\n"
                   f"x-api-key: {node.key}\r\n\r\n").encode())
        assert_text_error(read_response(s), 403, "api key mismatch")
    finally:
        s.close()


# ---- REST: unknown path and wrong method, with a valid key -------------------------------------------

@pytest.mark.parametrize("path", ["/no/such/route", "/", "/info/", "/stats/nope", "/start/"])
def test_rest_unknown_path_404(node, path):
    assert_text_error(rest(node, "GET", path), 404, "404 page not found")


@pytest.mark.parametrize("method,path", [("POST", "/info"), ("PUT", "/info"), ("DELETE", "/stats"),
                                         ("GET", "/stop"), ("POST", "/stop"),
                                         ("GET", "/user/sync"), ("GET", "/users/sync"),
                                         ("DELETE", "/users/sync/chunked"),
                                         ("PUT", "/stats/backend")])
def test_rest_wrong_method_405(node, method, path):
    r = rest(node, method, path)
    assert r.status_code == 405, (r.status_code, r.content)
    assert r.content == b"", r.content


# ---- REST: the guard -------------------------------------------------------------------------------

def guarded_body(pb, path):
    if path.startswith("/stats"):
        return pb.StatRequest(name="1", reset=True, type=pb.UsersStat).SerializeToString()
    if path == "/user/sync":
        return pb.User(email="1", proxies=pb.Proxy(vless=pb.Vless(id=str(uuid.uuid4())))) \
            .SerializeToString()
    if path == "/users/sync":
        return pb.Users(users=[pb.User(email="1")]).SerializeToString()
    if path == "/users/sync/chunked":
        chunk = pb.UsersChunk(users=[pb.User(email="1")], index=0, last=True).SerializeToString()
        return bytes([len(chunk)]) + chunk
    return b""


@pytest.mark.parametrize("method,path", REST_GUARDED,
                         ids=[f"{m} {p}" for m, p in REST_GUARDED])
@pytest.mark.parametrize("with_body", [False, True], ids=["no-body", "body"])
def test_rest_guarded_backend_not_initialized(node, pb, method, path, with_body):
    body = guarded_body(pb, path) if with_body else b""
    headers = {"Content-Type": "application/x-protobuf"} if with_body else {}
    assert_text_error(rest(node, method, path, headers, body), 500, "backend not initialized")


# ---- gRPC: every method x every bad key --------------------------------------------------------------

@pytest.mark.parametrize("key,status,code,text", BAD_KEYS, ids=BAD_KEY_IDS)
@pytest.mark.parametrize("method", list(RPCS) + GRPC_UNKNOWN)
def test_grpc_bad_key(node, method, key, status, code, text):
    assert grpc_call(node, method, key=key) == (code, text)


@pytest.mark.parametrize("key,status,code,text", BAD_KEYS, ids=BAD_KEY_IDS)
@pytest.mark.parametrize("method", ["GetBaseInfo", "GetStats", "SyncUser"])
def test_grpc_bad_key_as_bearer(node, method, key, status, code, text):
    extra = () if key is None else [("authorization", f"Bearer {key}")]
    assert grpc_call(node, method, key=None, extra=extra) == (code, text)


@pytest.mark.parametrize("form", ["lower", "upper", "hex32", "hex32-upper", "braces", "urn"])
def test_grpc_key_forms_accepted(node, pb, form):
    with node.grpc() as c:
        r = c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse,
                    key=key_forms(node.key)[form])
    assert (r.started, r.core_version, r.node_version) == (False, V2RAY_VERSION, NODE_VERSION)


def test_grpc_bearer_and_precedence(node, pb):
    with node.grpc() as c:
        r = c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse, key=None,
                    extra=[("authorization", f"Bearer {node.key}")])
        assert r.node_version == NODE_VERSION
        assert grpc_error(c.unary, "GetBaseInfo", key=OTHER_KEY,
                          extra=[("authorization", f"Bearer {node.key}")]) == \
            (grpc.StatusCode.PERMISSION_DENIED, "api key mismatch")
        r = c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse,
                    extra=[("authorization", f"Bearer {OTHER_KEY}")])
        assert r.node_version == NODE_VERSION


def test_grpc_first_metadata_value_wins(node, pb):
    with node.grpc() as c:
        r = c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse,
                    extra=[("x-api-key", OTHER_KEY)])
        assert r.node_version == NODE_VERSION
        assert grpc_error(c.unary, "GetBaseInfo", key=OTHER_KEY,
                          extra=[("x-api-key", node.key)]) == \
            (grpc.StatusCode.PERMISSION_DENIED, "api key mismatch")


@pytest.mark.parametrize("method", GRPC_UNKNOWN)
def test_grpc_unknown_method_with_key_unimplemented(node, method):
    code, details = grpc_call(node, method)
    assert code == grpc.StatusCode.UNIMPLEMENTED, (code, details)


# ---- gRPC: the guard ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", GRPC_GUARDED)
def test_grpc_guarded_backend_not_initialized(node, method):
    assert grpc_call(node, method) == (grpc.StatusCode.UNAVAILABLE, "backend not initialized")


def test_grpc_guarded_with_real_messages(node, pb):
    with node.grpc() as c:
        for method, msg in [("GetStats", pb.StatRequest(name="1", reset=True, type=pb.UsersStat)),
                            ("SyncUsers", pb.Users(users=[pb.User(email="1")])),
                            ("GetUserOnlineStats", pb.StatRequest(name="1"))]:
            assert grpc_error(c.unary, method, msg) == \
                (grpc.StatusCode.UNAVAILABLE, "backend not initialized"), method
        assert grpc_error(c.client_stream, "SyncUsersChunked",
                          [pb.UsersChunk(users=[pb.User(email="1")], index=0, last=True)]) == \
            (grpc.StatusCode.UNAVAILABLE, "backend not initialized")
        assert grpc_error(c.client_stream, "SyncUser", [pb.User(email="1"), pb.User(email="2")]) \
            == (grpc.StatusCode.UNAVAILABLE, "backend not initialized")
        assert grpc_error(c.server_stream, "GetLogs", pb.Empty()) == \
            (grpc.StatusCode.UNAVAILABLE, "backend not initialized")


# ---- latency without a core: an empty list (DESIGN "Small rules", spec §5.2) ---------------------

def test_grpc_outbounds_latency_without_core_is_empty(node, pb):
    with node.grpc() as c:
        r = c.unary("GetOutboundsLatency", pb.LatencyRequest(), pb.LatencyResponse)
        assert list(r.latencies) == []
        r = c.unary("GetOutboundsLatency", pb.LatencyRequest(name="direct"), pb.LatencyResponse)
        assert list(r.latencies) == []


def test_rest_stats_latency_without_core_is_empty(node, pb):
    r = rest(node, "GET", "/stats/latency")
    assert r.status_code == 200, (r.status_code, r.content)
    assert r.headers["Content-Type"] == "application/x-protobuf"
    assert list(pb.LatencyResponse.FromString(r.content).latencies) == []
