"""Stats reads on a real core (spec/pasarguard.md §5.3, §6.2, §7, §12, §18
cases 17, 26-28): GetStats input errors, the REST body forms, the legacy
per-type rpcs and routes, stat name splitting (a user whose email ends in
"outbound" is not an outbound), online stats on a core without them, and
bad protobuf."""
import grpc
import pytest

from pnclient import assert_text_error
from pncore import (INBOUND, INBOUNDS, OUTBOUND, OUTBOUNDS, USER, USERS, VLESS, Site,
                    download_ok, parse_stats)


@pytest.fixture(scope="module")
def site(pb, tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("stats"), pb)
    s.start(["1", "2", "xoutbound"])
    c = s.client({"v1": (VLESS, "1"), "vx": (VLESS, "xoutbound")})
    download_ok(c.socks["v1"], s.url(), s.size(), "user 1")
    download_ok(c.socks["vx"], s.url(), s.size(), "user xoutbound")
    s.panel.settled_traffic("xoutbound", s.size())
    yield s
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


ERRORS = [
    (OUTBOUND, "", "tag required"),
    (INBOUND, "", "tag required"),
    (USER, "", "email required"),
    (9, "", "not implemented stat type"),
]


@pytest.mark.parametrize("type_,name,text", ERRORS, ids=["outbound", "inbound", "user", "type9"])
def test_get_stats_errors(site, pb, type_, name, text):
    """Case 26: gRPC Unknown / REST 500 with the reference texts."""
    code, details = site.panel.error(site.panel.call, "GetStats",
                                     pb.StatRequest(type=type_, name=name), pb.StatResponse)
    assert (code, details) == (grpc.StatusCode.UNKNOWN, text)
    r = site.panel.rest("GET", "/stats", pb.StatRequest(type=type_, name=name))
    assert_text_error(r, 500, text)


def test_rest_stats_body_forms(site, pb):
    """Case 17: GET /stats with a StatRequest body (type=4, reset) returns a
    StatResponse; with no body it acts as Outbounds, reset=false."""
    r = site.panel.rest("GET", "/stats", pb.StatRequest(type=USERS, reset=False))
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-protobuf"
    st = parse_stats(pb.StatResponse.FromString(r.content))
    assert st.get(("1", "traffic", "downlink"), 0) >= site.size(), st
    for path in ("/stats", "/stats/"):
        a = site.panel.rest("GET", path)
        assert a.status_code == 200, a.text
        got = parse_stats(pb.StatResponse.FromString(a.content))
        assert got and all(link == "traffic" for (_, link, _) in got), got
        assert got.get(("DIRECT", "traffic", "downlink"), 0) >= 2 * site.size(), got
        # no body = reset=false: a second read still sees the same bytes
        b = parse_stats(pb.StatResponse.FromString(site.panel.rest("GET", path).content))
        assert b[("DIRECT", "traffic", "downlink")] >= got[("DIRECT", "traffic", "downlink")]


def test_legacy_stat_rpcs_and_routes(site, pb):
    """Spec §5.3: the six legacy rpcs and routes equal GetStats of their type."""
    legacy = [("GetOutboundsStats", "/stats/outbounds", OUTBOUNDS, ""),
              ("GetOutboundStats", "/stats/outbound", OUTBOUND, "DIRECT"),
              ("GetInboundsStats", "/stats/inbounds", INBOUNDS, ""),
              ("GetInboundStats", "/stats/inbound", INBOUND, VLESS),
              ("GetUsersStats", "/stats/users", USERS, ""),
              ("GetUserStats", "/stats/user", USER, "1")]
    for rpc, path, type_, name in legacy:
        want = set(site.panel.stats(type_, name))
        assert want, (rpc, "no stats at all")
        got = parse_stats(site.panel.call(rpc, pb.StatRequest(name=name), pb.StatResponse))
        assert set(got) == want, (rpc, got, want)
        r = site.panel.rest("GET", path, pb.StatRequest(name=name))
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert set(parse_stats(pb.StatResponse.FromString(r.content))) == want, path
    code, details = site.panel.error(site.panel.call, "GetUserStats", pb.StatRequest(),
                                     pb.StatResponse)
    assert (code, details) == (grpc.StatusCode.UNKNOWN, "email required")


def test_stat_names_split_and_kind_checked(site, pb):
    """Case 28: names split as name/link/type; a user whose email ends in
    "outbound" is a user, never an outbound."""
    users = site.panel.stats(USERS)
    assert users.get(("xoutbound", "traffic", "downlink"), 0) >= site.size(), users
    outs = site.panel.stats(OUTBOUNDS)
    assert outs and not any(n == "xoutbound" for (n, _, _) in outs), outs
    assert all(t in ("uplink", "downlink") and link == "traffic" for (_, link, t) in outs), outs
    one = site.panel.stats(OUTBOUND, "DIRECT")
    assert set(n for n, _, _ in one) == {"DIRECT"}, one
    ins = site.panel.stats(INBOUNDS)
    assert any(n == VLESS for (n, _, _) in ins), ins
    assert not any(n in ("1", "xoutbound") for (n, _, _) in ins), ins
    u = site.panel.stats(USER, "1")
    assert set(u) <= {("1", "traffic", "uplink"), ("1", "traffic", "downlink")}, u


def test_reset_only_what_is_read(site, pb):
    """A reset read of one user leaves the others' counters alone."""
    site.panel.settled_traffic("1", site.size())
    before = site.panel.user_traffic("xoutbound")
    one = site.panel.stats(USER, "1", reset=True)
    assert one[("1", "traffic", "downlink")] >= site.size()
    assert site.panel.user_traffic("1") == (0, 0)
    assert site.panel.user_traffic("xoutbound") == before


def test_online_stats_unavailable_on_v2ray(site, pb):
    """Case 27: v2ray has no online stats: NotFound / 404 carrying
    `user>>><email>>>>online not found.`; an empty name → `email required`."""
    for rpc, path in (("GetUserOnlineStats", "/stats/user/online"),
                      ("GetUserOnlineIpListStats", "/stats/user/online_ip")):
        for email in ("1", "999"):
            code, details = site.panel.error(site.panel.call, rpc, pb.StatRequest(name=email))
            assert code == grpc.StatusCode.NOT_FOUND, (rpc, code, details)
            assert f"user>>>{email}>>>online not found." in details, details
            r = site.panel.rest("GET", path, pb.StatRequest(name=email))
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert f"user>>>{email}>>>online not found." in r.text, r.text
        code, details = site.panel.error(site.panel.call, rpc, pb.StatRequest(name=""))
        assert details == "email required", (rpc, code, details)
        r = site.panel.rest("GET", path, pb.StatRequest(name=""))
        assert r.status_code == 500 and r.text == "email required\n", (r.status_code, r.text)


def test_bad_protobuf_bodies(site, pb):
    """Undecodable request bodies: REST 400, gRPC INVALID_ARGUMENT; the node
    keeps serving."""
    junk = b"\x0a\x10abc"
    for rpc in ("GetStats", "GetUserOnlineStats", "SyncUsers"):
        code, details = site.panel.error(site.panel.call, rpc, junk)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, code, details)
    r = site.panel.rest("GET", "/stats", junk)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    for path in ("/user/sync", "/users/sync"):
        assert_text_error(site.panel.rest("PUT", path, junk), 400, "Failed to decode user")
    site.panel.stats(USERS)
    site.panel.backend_stats()
