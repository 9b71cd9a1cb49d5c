"""The core API the Marzban panel calls directly (spec/marzban.md must-get-
right 5-7, §7 steps 7-8, §13 cases 7 and 20) and real traffic through the
real v2ray 4.34: the injected TLS API inbound answers StatsService with the
name Gozargah from 127.0.0.1 and from the /connect peer, not from another
source or under another name; a user added over that port with
AlterInbound carries traffic and is counted; an identical /restart keeps an
open download alive; a ~20 MB config with 200k users reaches the core.
v2ray service paths and type strings are used (the real panel calls the
xray.* names, which need Xray)."""
import json
import os
import time

import grpc
import pytest

from pncore import FileServer, V2rayClient, curl_bg, download_ok, download_refused, outbound_for
from pnmarzban import (ALL_TAGS, PROTOCOL_OF, STATS, TROJAN, VLESS, MzPanel,  # noqa: F401
                       add_user, api_call, api_channel, capb, client_entry, finish_module_node,
                       h2_grpc, module_node, mz_config, pki, query_stats, raw_post, remove_user,
                       sys_stats, SlowServer)
from pnnode import SANITIZE, T

BIG = 4 << 20  # served by SlowServer at ~1.3 MB/s: ~3.2 s
ALICE = "1.alice"
BOB = "9.bob"


class ApiSite:
    def __init__(self, node, files, client, panel):
        self.node, self.files, self.client, self.panel = node, files, client, panel

    def config(self, users=(ALICE,)):
        return mz_config(self.node.ports, users)

    def ensure(self):
        """A session from 127.0.0.1 and the base config running."""
        self.panel.connect()
        r = self.panel.start(self.config())
        if r.status_code == 503 and r.json().get("detail") == "Xray is started already":
            r = self.panel.restart(self.config())
        assert r.status_code == 200 and r.json()["started"], r.text
        return self.node.one_core()


@pytest.fixture(scope="module")
def site(pki, tmp_path_factory):
    n = module_node(tmp_path_factory, pki, "mzapi", host="0.0.0.0", api_host="0.0.0.0")
    d = str(tmp_path_factory.mktemp("mzapi-www"))
    files = FileServer(os.path.join(d, "www"), {"f1m": 1 << 20})
    slow = SlowServer(BIG, interval=0.05 * (3 if SANITIZE else 1))
    routes = {}
    for who in (ALICE, BOB):
        for tag in ALL_TAGS:
            routes[(who, tag)] = outbound_for(PROTOCOL_OF[tag], n.ports[tag], who)
    names = {f"{w}|{t}": ob for (w, t), ob in routes.items()}
    client = V2rayClient(os.path.join(d, "client"), names)
    panel = MzPanel(n)
    s = ApiSite(n, files, client, panel)
    s.slow = slow
    yield s
    slow.close()
    client.close()
    files.close()
    panel.close()
    finish_module_node(n)


def socks(site, who, tag):
    return site.client.socks[f"{who}|{tag}"]


def sys_stats_h2(site, capb, source):
    status, msg = h2_grpc(site.node.api_port, STATS + "GetSysStats", capb.SysStatsRequest(),
                          site.node.cert, source=source)
    assert status == 0, f"GetSysStats from {source}: grpc-status {status}"
    return capb.SysStatsResponse.FromString(msg)


def assert_refused_from(site, capb, source):
    try:
        status, msg = h2_grpc(site.node.api_port, STATS + "GetSysStats",
                              capb.SysStatsRequest(), site.node.cert, source=source,
                              timeout=T(2))
    except (ConnectionError, TimeoutError):
        return
    assert status != 0, f"the API port answered GetSysStats from {source}: {msg!r}"


# ---- case 7 ------------------------------------------------------------------------------------

def test_api_port_name_gozargah_case7(site, capb):
    site.ensure()
    st = sys_stats(site.node, capb)
    assert st.NumGoroutine > 0 and st.Alloc > 0, st
    r = query_stats(site.node, capb, "outbound>>>")
    assert isinstance(r, dict)
    ch = api_channel(site.node, name="x")
    try:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=T(2))
        with pytest.raises(grpc.RpcError):
            api_call(ch, STATS + "GetSysStats", capb.SysStatsRequest(), capb.SysStatsResponse,
                     timeout=T(2))
    finally:
        ch.close()


def test_api_port_locked_by_source_case7(site, capb):
    site.ensure()
    assert sys_stats_h2(site, capb, "127.0.0.1").NumGoroutine > 0
    assert_refused_from(site, capb, "127.0.0.2")


def test_api_port_allows_the_connect_peer(site, capb):
    """/connect from 127.0.0.3: after the (re)start the rule's source is
    ["127.0.0.1","127.0.0.3"]: 127.0.0.3 is served, 127.0.0.2 still not."""
    pid = site.ensure()
    status, _, body = raw_post(site.node, site.node.pki, "/connect", {"session_id": None},
                               source="127.0.0.3")
    assert status == 200, body
    sid = json.loads(body)["session_id"]
    status, _, body = raw_post(site.node, site.node.pki, "/restart",
                               {"session_id": sid, "config": json.dumps(site.config())},
                               source="127.0.0.3")
    assert status == 200 and json.loads(body)["started"], body
    assert site.node.one_core(other_than=pid), "the peer changed: the config is not identical"
    assert sys_stats_h2(site, capb, "127.0.0.3").NumGoroutine > 0
    assert sys_stats_h2(site, capb, "127.0.0.1").NumGoroutine > 0
    assert_refused_from(site, capb, "127.0.0.2")
    site.ensure()
    assert_refused_from(site, capb, "127.0.0.3")


# ---- users and traffic -------------------------------------------------------------------------

def test_config_users_carry_traffic(site, capb):
    site.ensure()
    size = site.files.sizes["f1m"]
    before = query_stats(site.node, capb, f"user>>>{ALICE}>>>traffic>>>downlink").get(
        f"user>>>{ALICE}>>>traffic>>>downlink", 0)
    for tag in ALL_TAGS:
        download_ok(socks(site, ALICE, tag), site.files.url("f1m"), size, f"{ALICE} {tag}")
    for tag in (VLESS, TROJAN):  # (vmess drains bad clients for seconds)
        download_refused(socks(site, BOB, tag), site.files.url("f1m"), f"{BOB} {tag}")
    name = f"user>>>{ALICE}>>>traffic>>>downlink"
    deadline = time.monotonic() + T(5)
    while True:
        got = query_stats(site.node, capb, name).get(name, 0) - before
        if got >= 3 * size or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 3 * size <= got < 3 * size + 64 * 1024, f"{name}: {got}, want ~{3 * size}"


def test_user_added_over_api_carries_traffic(site, capb):
    site.ensure()
    size = site.files.sizes["f1m"]
    for tag in ALL_TAGS:
        add_user(site.node, capb, tag, BOB)
    for tag in ALL_TAGS:
        download_ok(socks(site, BOB, tag), site.files.url("f1m"), size, f"added {BOB} {tag}")
    name = f"user>>>{BOB}>>>traffic>>>downlink"
    deadline = time.monotonic() + T(5)
    while True:
        got = query_stats(site.node, capb, name).get(name, 0)
        if got >= 3 * size or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 3 * size <= got < 3 * size + 64 * 1024, f"{name}: {got}"
    remove_user(site.node, capb, VLESS, BOB)
    download_refused(socks(site, BOB, VLESS), site.files.url("f1m"), f"removed {BOB}")
    download_ok(socks(site, BOB, TROJAN), site.files.url("f1m"), size, f"{BOB} trojan kept")


def test_identical_restart_keeps_download_alive(site):
    """A throttled download through the core while the panel sends an
    identical /restart: answered at once, same core, the download completes
    in full."""
    pid = site.ensure()
    size = BIG
    bg = curl_bg(socks(site, ALICE, VLESS), site.slow.url, max_time=T(60))
    time.sleep(1.0)
    assert bg.running(), f"the download ended before the /restart: {bg.wait(T(5))}"
    site.panel.connect()  # the panel's reconnect: /connect, /start → 503, /restart
    r = site.panel.start(site.config())
    assert (r.status_code, r.json()["detail"]) == (503, "Xray is started already"), r.text
    t0 = time.monotonic()
    r = site.panel.restart(site.config())
    took = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["started"], r.text
    assert took < T(1.0), f"identical /restart took {took:.3f} s"
    assert bg.running(), "the download ended during the identical /restart"
    rc, code, got, err = bg.wait(T(30))
    assert (rc, code, got) == (0, 200, size), (rc, code, got, err)
    assert site.node.one_core() == pid


def test_changed_restart_keeps_download_alive(site):
    """A changed config is applied by a hot handover (DESIGN, cores.md): the
    open download finishes in full on the old core, new connections use the
    new one."""
    pid = site.ensure()
    size = BIG
    bg = curl_bg(socks(site, ALICE, VLESS), site.slow.url, max_time=T(60))
    time.sleep(1.0)
    assert bg.running(), f"the download ended before the /restart: {bg.wait(T(5))}"
    r = site.panel.restart(site.config((ALICE, "4.dave")))
    assert r.status_code == 200 and r.json()["started"], r.text
    new = [p for p in site.node.core_pids() if p != pid]
    assert len(new) == 1, site.node.core_pids()
    download_ok(socks(site, ALICE, TROJAN), site.files.url("f1m"), site.files.sizes["f1m"],
                "a new connection after the handover")
    rc, code, got, err = bg.wait(T(60))
    assert (rc, code, got) == (0, 200, size), (rc, code, got, err)
    site.node.one_core(timeout=T(10))
    assert site.node.one_core() == new[0]


# ---- case 20: a big config ---------------------------------------------------------------------

def test_big_config_reaches_core_case20(site, capb, tmp_path):
    """~200k users inline (a ~20 MB body, double-encoded): the core starts
    and both the first and the last user of the list pass traffic."""
    site.ensure()
    n = 200_000
    users = [f"{i}.user{i:06d}" for i in range(1, n + 1)]
    cfg = mz_config({VLESS: site.node.ports[VLESS]}, [])
    vless = [ib for ib in cfg["inbounds"] if ib["tag"] == VLESS][0]
    vless["settings"]["clients"] = [client_entry("vless", u) for u in users]
    text = json.dumps(cfg)
    body_len = len(json.dumps({"session_id": site.panel.sid, "config": text}))
    assert body_len > 18 << 20, body_len
    t0 = time.monotonic()
    r = site.panel.restart(text, timeout=T(30))
    took = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["started"], \
        f"{r.status_code} {r.text[:500]} after {took:.1f} s\n" + site.node.describe()
    assert took < T(10), f"/restart with {body_len} bytes took {took:.1f} s (panel timeout 10 s)"
    site.node.one_core()
    c = V2rayClient(str(tmp_path / "bigclient"),
                    {u: outbound_for("vless", site.node.ports[VLESS], u)
                     for u in (users[0], users[-1])})
    try:
        for u in (users[0], users[-1]):
            download_ok(c.socks[u], site.files.url("f1m"), site.files.sizes["f1m"], u)
    finally:
        c.close()
    name = f"user>>>{users[-1]}>>>traffic>>>downlink"
    assert query_stats(site.node, capb, name).get(name, 0) >= site.files.sizes["f1m"]
