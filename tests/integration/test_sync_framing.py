"""User-sync framing on a real core (spec/pasarguard.md §6.3, §7, §11, §18
cases 19-21; DESIGN "Small rules"): REST chunked sync frames and every
framing error, gRPC SyncUsersChunked answering after `last` without a
client half-close, its framing errors, REST /user/sync and /users/sync,
and `email is required`. Whether users were applied is checked with real
traffic; a chunked sync that fails applies nothing."""
import threading

import grpc
import pytest

from pnclient import assert_text_error
from pncore import (TROJAN, VLESS, Site, download_ok, download_refused, frame, make_user,
                    varint)
from pnnode import T


@pytest.fixture(scope="module")
def site(pb, tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("sync"), pb)
    s.start(["1", "2"])
    yield s
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


def vless_users(pb, *emails):
    return [make_user(pb, e, inbounds=[VLESS, TROJAN], present=("vless", "trojan"))
            for e in emails]


def put_chunked(site, frames):
    """PUT /users/sync/chunked with Transfer-Encoding: chunked, one HTTP
    chunk per frame (as the Python client sends it)."""
    return site.panel.rest("PUT", "/users/sync/chunked", body=(f for f in list(frames)))


def assert_400_prefix(r, prefix):
    assert r.status_code == 400 and r.text.startswith(prefix) and r.text.endswith("\n"), \
        (r.status_code, r.text)
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8", dict(r.headers)


def test_rest_chunked_sync_applies_all_frames(site, pb):
    """Case 19: frames 0, 1, 2 (last) → 200 with an empty body; every user
    of every frame is applied."""
    site.start(["1", "2"])
    frames = [frame(pb.UsersChunk(users=vless_users(pb, "c0"), index=0)),
              frame(pb.UsersChunk(users=vless_users(pb, "c1a", "c1b"), index=1)),
              frame(pb.UsersChunk(users=vless_users(pb, "c2"), index=2, last=True))]
    r = put_chunked(site, frames)
    assert (r.status_code, r.content) == (200, b""), (r.status_code, r.text)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    c = site.client({e: (VLESS, e) for e in ("c0", "c1b", "c2")})
    for e in ("c0", "c1b", "c2"):
        download_ok(c.socks[e], site.url(), site.size(), f"user {e} from the chunked sync")


def test_rest_chunked_sync_framing_tolerance(site, pb):
    """Zero-length frames are skipped and bytes after the `last` frame are
    ignored (spec §6.3 server loop)."""
    site.start(["1", "2"])
    body = [b"\x00", frame(pb.UsersChunk(users=vless_users(pb, "z0"), index=0, last=True)),
            b"trailing junk \xff\xff"]
    r = put_chunked(site, body)
    assert (r.status_code, r.content) == (200, b""), (r.status_code, r.text)
    c = site.client({"z0": (VLESS, "z0")})
    download_ok(c.socks["z0"], site.url(), site.size(), "user z0")


def _bad_cases(pb):
    u = vless_users(pb, "bad0")
    return [
        ("no-last", [frame(pb.UsersChunk(users=u, index=0)),
                     frame(pb.UsersChunk(users=vless_users(pb, "bad1"), index=1))],
         "missing final chunk indicator", True),
        ("gap", [frame(pb.UsersChunk(users=u, index=0)),
                 frame(pb.UsersChunk(users=vless_users(pb, "bad2"), index=2, last=True))],
         "missing chunk index 1", True),
        ("empty", [frame(pb.UsersChunk(index=0, last=True))], "no users received", True),
        ("garbage", [frame(b"\x0a\x10abc")], "failed to decode chunk: ", False),
        ("bad-varint", [b"\x80"], "failed to read chunk length: ", False),
        ("short-payload", [varint(100) + b"abc"], "failed to read chunk payload: ", False),
    ]


@pytest.mark.parametrize("case", range(6),
                         ids=["no-last", "gap", "empty", "garbage", "bad-varint",
                              "short-payload"])
def test_rest_chunked_sync_errors(site, pb, case):
    """Case 19: framing errors → 400 with the reference texts; nothing is
    applied (DESIGN: a chunked sync without `last` applies nothing)."""
    name, frames, text, exact = _bad_cases(pb)[case]
    r = put_chunked(site, frames)
    if exact:
        assert_text_error(r, 400, text)
    else:
        assert_400_prefix(r, text)
    if name in ("no-last", "gap"):
        c = site.client({"bad0": (VLESS, "bad0")})
        download_refused(c.socks["bad0"], site.url(), f"user of a failed chunked sync ({name})")
    site.panel.backend_stats()


def test_grpc_chunked_replies_after_last_without_half_close(site, pb):
    """Case 20: the reply comes after the `last` chunk while the client keeps
    its side of the stream open."""
    site.start(["1", "2"])
    release = threading.Event()
    chunks = [pb.UsersChunk(users=vless_users(pb, "g0"), index=0),
              pb.UsersChunk(users=vless_users(pb, "g1"), index=1, last=True)]

    def requests():
        yield from chunks
        release.wait(T(30))  # no half-close until the reply arrived

    f = site.panel.client.channel.stream_unary(
        "/service.NodeService/SyncUsersChunked", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.Empty.FromString)
    fut = f.future(requests(), metadata=site.panel.client.metadata(), timeout=T(40))
    try:
        try:
            reply = fut.result(timeout=T(8))
        except grpc.FutureTimeoutError:
            raise AssertionError("no reply after the `last` chunk without a half-close")
        assert reply == pb.Empty()
    finally:
        release.set()
        if not fut.done():
            fut.cancel()
    c = site.client({"g0": (VLESS, "g0"), "g1": (TROJAN, "g1")})
    download_ok(c.socks["g0"], site.url(), site.size(), "user g0 (chunk 0)")
    download_ok(c.socks["g1"], site.url(), site.size(), "user g1 (chunk 1)")


@pytest.mark.parametrize("case", range(3), ids=["no-last", "gap", "empty"])
def test_grpc_chunked_errors(site, pb, case):
    """Spec §7.2: InvalidArgument with the framing texts."""
    u = vless_users(pb, "e0")
    chunks = [
        [pb.UsersChunk(users=u, index=0)],
        [pb.UsersChunk(users=u, index=0),
         pb.UsersChunk(users=vless_users(pb, "e2"), index=2, last=True)],
        [pb.UsersChunk(index=0, last=True)],
    ][case]
    text = ["missing final chunk indicator", "missing chunk index 1", "no users received"][case]
    code, details = site.panel.error(site.panel.sync_chunked, chunks)
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, text)
    if case < 2:
        c = site.client({"e0": (VLESS, "e0")})
        download_refused(c.socks["e0"], site.url(), "user of a failed chunked sync")


def test_rest_user_sync(site, pb):
    """PUT /user/sync applies one user (200, empty body); an empty email is
    `email is required` (400); gRPC SyncUser says the same with Unknown."""
    site.start(["1", "2"])
    r = site.panel.rest("PUT", "/user/sync", vless_users(pb, "r1")[0])
    assert (r.status_code, r.content) == (200, b""), (r.status_code, r.text)
    c = site.client({"r1": (VLESS, "r1"), "r2": (VLESS, "r2")})
    download_ok(c.socks["r1"], site.url(), site.size(), "user r1 from /user/sync")
    assert_text_error(site.panel.rest("PUT", "/user/sync", make_user(pb, "")), 400,
                      "email is required")
    code, details = site.panel.error(site.panel.sync_user, make_user(pb, ""))
    assert (code, details) == (grpc.StatusCode.UNKNOWN, "email is required")
    # remove through REST
    r = site.panel.rest("PUT", "/user/sync", make_user(pb, "r1", inbounds=[]))
    assert r.status_code == 200, r.text
    download_refused(c.socks["r1"], site.url(), "user r1 removed through /user/sync")
    # /users/sync replaces the set, with PUT and with POST (Gozargah client)
    for method, email in (("PUT", "r2"), ("POST", "r3")):
        users = pb.Users(users=[make_user(pb, "1"), make_user(pb, email)])
        r = site.panel.rest(method, "/users/sync", users)
        assert (r.status_code, r.content) == (200, b""), (method, r.status_code, r.text)
    c2 = site.client({"r2": (VLESS, "r2"), "r3": (VLESS, "r3"), "u2": (VLESS, "2")})
    download_refused(c2.socks["r2"], site.url(), "user r2 replaced by the POST sync")
    download_ok(c2.socks["r3"], site.url(), site.size(), "user r3 from POST /users/sync")
    download_refused(c2.socks["u2"], site.url(), "user 2, not in the replacing set")
