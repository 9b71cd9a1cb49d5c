"""Xray-only behaviour against a FAKE Xray.

    fake Xray: behaviour from source, not verified against a real Xray.

No Xray is packaged for Debian, so these tests put fake_xray.py behind the
node as its core (an `xray` executable answering -version like Xray 26.7.28
and serving a gRPC API built from proto/xray/core_api.proto on the
API_INBOUND port). They check that the node sends the right bytes on the
xray.* paths and handles the documented replies (spec/cores.md §1-§6, §12;
spec/pasarguard.md §9, §10, §12, §18 cases 27, 28, 30-34): type strings,
vision flow from the inbound for API-added users, Xray's shadowsocks cipher
enum, SS-2022 keys, multi-user shadowsocks, online stats and IP lists,
NOT_FOUND codes, stat name parsing, GetSysStats copied 1:1, a failing core
start, excluded inbounds. They cannot prove that Xray behaves as documented.
"""
import base64
import hashlib
import json
import os
import subprocess
import time
import uuid

import grpc
import pytest

import fake_xray
from fake_xray import FakeCoreDir, make_fake_core, ss2022_key
from pncore import OUTBOUNDS, USERS, Site, alive, core_pids, make_user, wait_for
from pnnode import T, free_port

XVERSION = "26.7.28"
VLESS, VMESS, TROJAN, SS = "VLESS TCP", "VMess TCP", "Trojan TCP", "Shadowsocks TCP"
SS22, SS22_256, SOCKS = "SS2022 128", "SS2022 256", "SOCKS IN"
SERVER_PSK_16 = base64.b64encode(b"k" * 16).decode()
SERVER_PSK_32 = base64.b64encode(b"K" * 32).decode()
USER_TAGS = [VLESS, VMESS, TROJAN, SS, SS22, SS22_256]
CIDRS = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
         "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
         "240.0.0.0/4", "::/128", "::1/128", "fc00::/7", "fe80::/10"]
ADD_OP = "xray.app.proxyman.command.AddUserOperation"
REMOVE_OP = "xray.app.proxyman.command.RemoveUserOperation"
ALTER = "/xray.app.proxyman.command.HandlerService/AlterInbound"


def xray_config(online=True, trojan_static=False):
    """A PasarGuard-style config for an Xray node (the fake binds none of
    these ports; they only need to be distinct)."""
    def ib(tag, proto, settings):
        return {"tag": tag, "listen": "127.0.0.1", "port": free_port(), "protocol": proto,
                "settings": settings, "streamSettings": {"network": "tcp", "security": "none"}}
    trojan = {"clients": []}
    if trojan_static:
        trojan = {"clients": [{"password": "static-secret", "email": "static@x"}],
                  "fallbacks": []}
    levels = {"0": {"statsUserOnline": True}} if online else {"0": {"connIdle": 300}}
    return {
        "log": {"loglevel": "warning", "access": "/var/log/xray/access.log"},
        "api": {"services": ["HandlerService", "StatsService", "LoggerService"], "tag": "API"},
        "stats": {},
        "policy": {"levels": levels, "system": {"statsOutboundUplink": True,
                                                "statsOutboundDownlink": True}},
        "inbounds": [
            {"tag": "API_INBOUND", "listen": "127.0.0.1", "port": 62051,
             "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}},
            ib(VLESS, "vless", {"clients": [], "decryption": "none", "flow": "xtls-rprx-vision"}),
            ib(VMESS, "vmess", {"clients": []}),
            ib(TROJAN, "trojan", trojan),
            ib(SS, "shadowsocks", {"clients": [], "network": "tcp,udp"}),
            ib(SS22, "shadowsocks", {"clients": [], "method": "2022-blake3-aes-128-gcm",
                                     "password": SERVER_PSK_16, "network": "tcp,udp"}),
            ib(SS22_256, "shadowsocks", {"clients": [], "method": "2022-blake3-aes-256-gcm",
                                         "password": SERVER_PSK_32, "network": "tcp,udp"}),
            ib(SOCKS, "socks", {"auth": "noauth", "udp": False}),
        ],
        "outbounds": [{"protocol": "freedom", "tag": "DIRECT"},
                      {"protocol": "blackhole", "tag": "BLOCK"}],
        "routing": {"rules": [
            {"type": "field", "inboundTag": ["API_INBOUND"], "outboundTag": "API"},
            {"type": "field", "ip": ["geoip:private"], "outboundTag": "BLOCK"},
            {"type": "field", "source": ["GeoIP:Private"], "outboundTag": "DIRECT"},
        ]},
        "transport": {},
    }


def xuser(pb, email, tags=USER_TAGS, **kw):
    return make_user(pb, email, inbounds=tags, **kw)


@pytest.fixture(scope="module")
def fake(pb, tmp_path_factory):
    """(site, fake dir): a node whose core is the fake Xray."""
    d = tmp_path_factory.mktemp("xray")
    exe = make_fake_core(str(d / "fakecore"))
    s = Site(d, pb, core=exe, tags=(), env={"PROXYNODE_STATS_BANK_INTERVAL": "1"})
    fd = FakeCoreDir(str(d / "fakecore"))
    yield s, fd
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


def start(site, fd, users=("1", "2"), **kw):
    cfg = kw.pop("config", None) or xray_config()
    us = [u if not isinstance(u, str) else xuser(site.pb, u) for u in users]
    r = site.panel.start(cfg, us, **kw)
    assert r.started and r.core_version == XVERSION, r
    site.note_cores()
    cur = wait_for(fd.current, T(5), "the fake to serve")
    # a previous generation is retired and stopped (it holds no connection)
    wait_for(lambda: core_pids(site.node) == [cur["pid"]], T(10),
             f"the node to run only the fake core {cur['pid']} (has {core_pids(site.node)})")
    return cur


def adds(fd, since, email=None):
    """AddUser operations recorded after index `since`: {(tag, email): op}."""
    out = {}
    for r in fd.records()[since:]:
        if r["path"].endswith("/AlterInbound") and r.get("op_type") == ADD_OP:
            if email is None or r["op"]["email"] == email:
                out[(r["tag"], r["op"]["email"])] = r
    return out


# ---- the fake on its own ---------------------------------------------------------------------

def test_fake_itself(tmp_path):
    """fake Xray: behaviour from source, not verified against a real Xray.
    Checks the fake's own rules before trusting it: version line, stdin
    config, duplicate / unknown users, NOT_FOUND for unknown online users,
    both service name prefixes, UNIMPLEMENTED for other services."""
    exe = make_fake_core(str(tmp_path / "core"))
    out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=10).stdout
    assert out.splitlines()[0] == fake_xray.XRAY_VERSION_LINE
    port = free_port()
    cfg = {"inbounds": [{"tag": "API_INBOUND", "port": port, "protocol": "dokodemo-door"},
                        {"tag": "v", "protocol": "vless",
                         "settings": {"clients": [{"email": "a", "id": "x"}]}}],
           "policy": {"levels": {"0": {"statsUserOnline": True}}}}
    p = subprocess.Popen([exe, "-config", "stdin:"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        p.stdin.write(json.dumps(cfg))
        p.stdin.close()
        fd = FakeCoreDir(str(tmp_path / "core"))
        wait_for(fd.current, 10, "the fake to serve")
        assert "Xray 26.7.28 started" in p.stdout.readline() + p.stdout.readline() + \
            p.stdout.readline()
        pbm = fake_xray.load_pb(str(tmp_path / "core" / "pb"))
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])

        def call(path, req, resp):
            return ch.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=resp.FromString)(req, timeout=5)

        def alter(prefix, op_type, op):
            req = pbm.AlterInboundRequest(tag="v", operation=pbm.TypedMessage(
                type=op_type, value=op.SerializeToString()))
            return call(f"/{prefix}.app.proxyman.command.HandlerService/AlterInbound", req,
                        pbm.AlterInboundResponse)

        acct = pbm.TypedMessage(type="xray.proxy.vless.Account",
                                value=pbm.VlessAccount(id="u").SerializeToString())
        add = pbm.AddUserOperation(user=pbm.User(email="A", account=acct))
        with pytest.raises(grpc.RpcError) as e:
            alter("xray", ADD_OP, add)
        assert "User A already exists." in e.value.details()
        add.user.email = "b"
        alter("v2ray.core", ADD_OP, add)
        with pytest.raises(grpc.RpcError) as e:
            alter("xray", REMOVE_OP, pbm.RemoveUserOperation(email="zz"))
        assert "User zz not found." in e.value.details()
        alter("xray", REMOVE_OP, pbm.RemoveUserOperation(email="B"))
        with pytest.raises(grpc.RpcError) as e:
            call("/xray.app.stats.command.StatsService/GetStatsOnline",
                 pbm.GetStatsRequest(name="user>>>a>>>online"), pbm.GetStatsResponse)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details().endswith("user>>>a>>>online not found.")
        fd.set(online={"a": {"127.0.0.2": 5}})
        r = call("/xray.app.stats.command.StatsService/GetStatsOnline",
                 pbm.GetStatsRequest(name="user>>>a>>>online"), pbm.GetStatsResponse)
        assert r.stat.value == 1
        with pytest.raises(grpc.RpcError) as e:
            call("/xray.app.router.command.RoutingService/ListRule", pbm.SysStatsRequest(),
                 pbm.SysStatsResponse)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert fd.dump()["inbounds"]["v"]["users"] == ["a"]
        paths = [r["path"] for r in fd.records()]
        assert "/v2ray.core.app.proxyman.command.HandlerService/AlterInbound" in paths
        ch.close()
    finally:
        p.kill()
        p.wait()


# ---- the node in front of the fake -----------------------------------------------------------

def test_version_and_start(fake):
    """fake Xray: behaviour from source, not verified against a real Xray.
    GetBaseInfo reports the Xray version before Start; Start launches the
    fake with `-config stdin:` and reaches readiness over xray.* paths."""
    site, fd = fake
    info = site.panel.info()
    assert (info.started, info.core_version) == (False, XVERSION)
    start(site, fd)
    inv = fd.invocations()
    assert any(i["argv"][:1] in (["-version"], ["version"]) for i in inv), inv
    assert any("stdin:" in i["argv"] for i in inv), inv
    paths = {r["path"] for r in fd.records()}
    assert "/xray.app.stats.command.StatsService/GetSysStats" in paths, paths
    assert not any(p.startswith("/v2ray.core.") for p in paths), paths


def test_generated_config(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    Case 33 and spec §9/§10 for Xray: the node's API inbound first on
    127.0.0.1 and its rule first, geoip:private expanded (any case, ip and
    source), one malformed-domain guard rule, statsUserOnline kept, user
    stats on, transport dropped, logs to stdout, clients per protocol
    (vless flow as the user sent it, SS-2022 derived keys, classic
    shadowsocks method per user), [] for inbounds without users."""
    site, fd = fake
    users = [xuser(pb, "1", uid=str(uuid.uuid4()).upper()),
             xuser(pb, "2", password="hello", ss_method="aes-256-gcm")]
    cur = start(site, fd, users)
    cfg = fd.config()
    ins = cfg["inbounds"]
    assert ins[0]["tag"] == "API_INBOUND" and ins[0]["listen"] == "127.0.0.1"
    assert ins[0]["port"] == cur["port"] and ins[0]["port"] != 62051
    assert [i["tag"] for i in ins].count("API_INBOUND") == 1
    rules = cfg["routing"]["rules"]
    assert rules[0]["inboundTag"] == ["API_INBOUND"] and rules[0]["outboundTag"] == "API", rules
    assert "127.0.0.1" in rules[0]["source"] and "::1" in rules[0]["source"], rules[0]
    assert sum(1 for r in rules if r.get("outboundTag") == "API") == 1, rules
    guards = [r for r in rules if r.get("ruleTag") == "PG_NODE_MALFORMED_DOMAIN_GUARD"]
    assert len(guards) == 1 and guards[0]["outboundTag"] == "BLOCK", rules
    assert guards[0]["domain"] == ["regexp:^.{254,}$", "regexp:(^|\\.)[^.]{64,}(\\.|$)"]
    text = json.dumps(rules).lower()
    assert "geoip:private" not in text, rules
    ip_rule = [r for r in rules if r.get("outboundTag") == "BLOCK" and "ip" in r][0]
    src_rule = [r for r in rules if r.get("outboundTag") == "DIRECT" and "source" in r][0]
    assert ip_rule["ip"] == CIDRS and src_rule["source"] == CIDRS, (ip_rule, src_rule)
    lvl = cfg["policy"]["levels"]["0"]
    assert lvl.get("statsUserUplink") is True and lvl.get("statsUserDownlink") is True, lvl
    assert lvl.get("statsUserOnline") is True, lvl
    assert cfg["policy"]["system"]["statsOutboundUplink"] is True
    assert "transport" not in cfg and cfg.get("stats") == {}
    assert cfg["log"].get("access", "") == "" and cfg["log"].get("error", "") == "", cfg["log"]
    by_tag = {i["tag"]: i for i in ins}
    u1 = users[0].proxies.vless.id.lower()
    vl = sorted(by_tag[VLESS]["settings"]["clients"], key=lambda c: c["email"])
    assert vl[0] == {"email": "1", "level": 0, "id": u1, "flow": ""}, vl
    vm = sorted(by_tag[VMESS]["settings"]["clients"], key=lambda c: c["email"])
    assert {k: vm[0][k] for k in ("email", "level", "id")} == {"email": "1", "level": 0, "id": u1}
    ss = {c["email"]: c for c in by_tag[SS]["settings"]["clients"]}
    assert ss["2"]["method"] == "aes-256-gcm" and ss["2"]["password"] == "hello", ss
    assert ss["1"]["method"] == "chacha20-ietf-poly1305", ss
    s22 = {c["email"]: c for c in by_tag[SS22]["settings"]["clients"]}
    assert s22["2"]["password"] == ss2022_key("hello", "2022-blake3-aes-128-gcm"), s22
    assert "method" not in s22["2"], s22
    s256 = {c["email"]: c for c in by_tag[SS22_256]["settings"]["clients"]}
    assert s256["2"]["password"] == ss2022_key("hello", "2022-blake3-aes-256-gcm"), s256
    assert by_tag[SS22]["settings"]["password"] == SERVER_PSK_16
    assert by_tag[SOCKS]["settings"].get("clients") == [], by_tag[SOCKS]
    tr = {c["email"] for c in by_tag[TROJAN]["settings"]["clients"]}
    assert tr == {"1", "2"}, tr


def test_sync_user_xray_accounts(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    Cases 30/31: SyncUser sends AlterInbound on the xray.* path with xray.*
    type strings; the vless account takes the inbound's vision flow; vmess
    id canonical lower-case; SS-2022 accounts carry the derived key; the
    socks inbound is never targeted."""
    site, fd = fake
    start(site, fd)
    since = len(fd.records())
    uid = str(uuid.uuid4()).upper()
    assert site.panel.sync_user(xuser(pb, "10", uid=uid, password="raw-pw",
                                      ss_method="aes-128-gcm")) == pb.Empty()
    got = adds(fd, since, "10")
    assert set(t for t, _ in got) == set(USER_TAGS), sorted(got)
    for (tag, _), r in got.items():
        assert r["path"] == ALTER, r
        assert r["op"]["level"] == 0
    acct = {t: got[(t, "10")]["op"] for t in USER_TAGS}
    assert acct[VLESS]["account_type"] == "xray.proxy.vless.Account"
    assert acct[VLESS]["account"]["id"] == uid.lower()
    assert acct[VLESS]["account"]["flow"] == "xtls-rprx-vision", acct[VLESS]
    assert acct[VMESS]["account_type"] == "xray.proxy.vmess.Account"
    assert acct[VMESS]["account"]["id"] == uid.lower()
    assert acct[VMESS]["account"]["alter_id"] == 0
    assert acct[TROJAN]["account_type"] == "xray.proxy.trojan.Account"
    assert acct[TROJAN]["account"]["password"] == "raw-pw"
    assert acct[SS]["account_type"] == "xray.proxy.shadowsocks.Account"
    assert (acct[SS]["account"]["password"], acct[SS]["account"]["cipher_type"]) == ("raw-pw", 5)
    for tag, method in ((SS22, "2022-blake3-aes-128-gcm"), (SS22_256, "2022-blake3-aes-256-gcm")):
        assert acct[tag]["account_type"] == "xray.proxy.shadowsocks_2022.Account", acct[tag]
        assert acct[tag]["account"]["key"] == ss2022_key("raw-pw", method), acct[tag]
    dump = fd.dump()
    assert all("10" in dump["inbounds"][t]["users"] for t in USER_TAGS), dump
    assert not any(r.get("tag") == SOCKS for r in fd.records()[since:])
    # an unchanged user costs nothing (spec §17 #13)
    since = len(fd.records())
    site.panel.sync_user(xuser(pb, "10", uid=uid, password="raw-pw", ss_method="aes-128-gcm"))
    assert not [r for r in fd.records()[since:] if r["path"].endswith("/AlterInbound")], \
        fd.records()[since:]
    # removal: RemoveUserOperation on every inbound that held the user
    since = len(fd.records())
    site.panel.sync_user(xuser(pb, "10", tags=[]))
    removed = {r["tag"] for r in fd.records()[since:]
               if r.get("op_type") == REMOVE_OP and r["op"]["email"] == "10"}
    assert removed >= set(USER_TAGS) and SOCKS not in removed, removed
    assert not any("10" in v["users"] for v in fd.dump()["inbounds"].values())


def test_shadowsocks_cipher_enum_and_ss2022_keys(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    Multi-user shadowsocks with Xray's CipherType (aes-128-gcm 5,
    aes-256-gcm 6, chacha20(-ietf)-poly1305 7); an unsupported method and
    `none` (gone since Xray 26.7.11) are rejected for that inbound, not
    turned into none (case 32); SS-2022: a base64 key of the right length
    is kept, anything else is derived with SHA-256 (case 31)."""
    site, fd = fake
    start(site, fd)
    since = len(fd.records())
    cases = {"21": "aes-128-gcm", "22": "aes-256-gcm", "23": "chacha20-ietf-poly1305",
             "24": "chacha20-poly1305", "25": "rc4-md5", "26": "none"}
    users = [xuser(pb, e, tags=[SS], ss_method=m) for e, m in cases.items()]
    assert site.panel.sync_user(*users) == pb.Empty()
    got = adds(fd, since)
    ciphers = {e: got[(SS, e)]["op"]["account"]["cipher_type"] for (_, e) in got}
    assert ciphers == {"21": 5, "22": 6, "23": 7, "24": 7}, ciphers
    assert set(fd.dump()["inbounds"][SS]["users"]) >= {"21", "22", "23", "24"}
    assert not {"25", "26"} & set(fd.dump()["inbounds"][SS]["users"])

    key16 = base64.b64encode(os.urandom(16)).decode()
    key32 = base64.b64encode(os.urandom(32)).decode()
    since = len(fd.records())
    site.panel.sync_user(xuser(pb, "27", tags=[SS22, SS22_256], password=key16),
                         xuser(pb, "28", tags=[SS22, SS22_256], password=key32))
    got = adds(fd, since)
    keys = {(t, e): r["op"]["account"]["key"] for (t, e), r in got.items()}
    sha = hashlib.sha256
    assert keys[(SS22, "27")] == key16  # right length for aes-128: kept
    assert keys[(SS22_256, "27")] == base64.b64encode(sha(key16.encode()).digest()).decode()
    assert keys[(SS22, "28")] == base64.b64encode(sha(key32.encode()).digest()[:16]).decode()
    assert keys[(SS22_256, "28")] == key32  # right length for aes-256: kept


def test_online_stats_and_ip_list(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    GetUserOnlineStats / GetUserOnlineIpListStats (gRPC and REST) ask the
    core for `user>>><email>>>>online` and answer name = email; an unknown
    user is NotFound / 404 with `user>>><email>>>>online not found.`
    (case 27)."""
    site, fd = fake
    start(site, fd)
    now = int(time.time())
    fd.set(online={"1": {"127.0.0.2": now - 3, "10.1.2.3": now}})
    r = site.panel.call("GetUserOnlineStats", pb.StatRequest(name="1"), pb.OnlineStatResponse)
    assert (r.name, r.value) == ("1", 2), r
    r = site.panel.call("GetUserOnlineIpListStats", pb.StatRequest(name="1"),
                        pb.StatsOnlineIpListResponse)
    assert r.name == "1" and dict(r.ips) == {"127.0.0.2": now - 3, "10.1.2.3": now}, r
    rest = site.panel.rest("GET", "/stats/user/online", pb.StatRequest(name="1"))
    assert rest.status_code == 200, rest.text
    assert pb.OnlineStatResponse.FromString(rest.content).value == 2
    rest = site.panel.rest("GET", "/stats/user/online_ip", pb.StatRequest(name="1"))
    assert rest.status_code == 200, rest.text
    assert dict(pb.StatsOnlineIpListResponse.FromString(rest.content).ips)["10.1.2.3"] == now
    names = [r["req"]["name"] for r in fd.records()
             if r["path"] in ("/xray.app.stats.command.StatsService/GetStatsOnline",
                              "/xray.app.stats.command.StatsService/GetStatsOnlineIpList")]
    assert names and set(names) == {"user>>>1>>>online"}, names
    for rpc, path in (("GetUserOnlineStats", "/stats/user/online"),
                      ("GetUserOnlineIpListStats", "/stats/user/online_ip")):
        code, details = site.panel.error(site.panel.call, rpc, pb.StatRequest(name="99"))
        assert code == grpc.StatusCode.NOT_FOUND, (rpc, code, details)
        assert "user>>>99>>>online not found." in details, details
        rest = site.panel.rest("GET", path, pb.StatRequest(name="99"))
        assert rest.status_code == 404 and "user>>>99>>>online not found." in rest.text, \
            (rest.status_code, rest.text)


def test_online_stats_off_is_not_found(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    Without statsUserOnline in the policy, online stats are NotFound."""
    site, fd = fake
    start(site, fd, config=xray_config(online=False))
    fd.set(online={"1": {"127.0.0.2": int(time.time())}})
    code, details = site.panel.error(site.panel.call, "GetUserOnlineStats",
                                     pb.StatRequest(name="1"))
    assert code == grpc.StatusCode.NOT_FOUND and "user>>>1>>>online not found." in details, \
        (code, details)


def test_stat_names_parsed_and_reset(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    Case 28: names with fewer than 4 parts or an empty part 1-3 are dropped,
    extra parts ignored, `outbound>>>` inside a user name is not an outbound;
    a reset read returns the values once and leaves other kinds alone."""
    site, fd = fake
    start(site, fd)
    site.panel.stats(USERS, reset=True)
    site.panel.stats(OUTBOUNDS, reset=True)
    fd.set(stats={
        "user>>>1>>>traffic>>>uplink": 100,
        "user>>>1>>>traffic>>>downlink": 2000,
        "user>>>bad": 5,
        "user>>>>>>traffic>>>uplink": 7,
        "user>>>2>>>>>>uplink": 8,
        "user>>>2>>>traffic>>>": 9,
        "user>>>3>>>traffic>>>downlink>>>extra": 11,
        "user>>>xoutbound>>>traffic>>>uplink": 13,
        "outbound>>>DIRECT>>>traffic>>>downlink": 500,
        "inbound>>>VLESS TCP>>>traffic>>>downlink": 600,
    })
    want_users = {("1", "traffic", "uplink"): 100, ("1", "traffic", "downlink"): 2000,
                  ("3", "traffic", "downlink"): 11, ("xoutbound", "traffic", "uplink"): 13}
    assert site.panel.stats(USERS) == want_users
    assert site.panel.stats(OUTBOUNDS) == {("DIRECT", "traffic", "downlink"): 500}
    assert site.panel.stats(USERS, reset=True) == want_users
    assert all(v == 0 for v in site.panel.stats(USERS).values())
    assert site.panel.stats(OUTBOUNDS) == {("DIRECT", "traffic", "downlink"): 500}
    fd.set(add_stats={"user>>>1>>>traffic>>>downlink": 42})
    assert site.panel.user_traffic("1", reset=True) == (0, 42)
    queries = [r for r in fd.records() if r["path"].endswith("/QueryStats")]
    assert queries and all(r["path"].startswith("/xray.") for r in queries)


def test_backend_stats_copied(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    GetBackendStats copies the core's GetSysStats 1:1."""
    site, fd = fake
    start(site, fd)
    b = site.panel.backend_stats()
    assert (b.num_goroutine, b.num_gc, b.alloc, b.total_alloc, b.sys, b.mallocs, b.frees,
            b.live_objects, b.pause_total_ns) == (42, 3, 4 << 20, 9 << 20, 20 << 20, 1000, 900,
                                                  100, 12345), b
    assert b.uptime <= 30


def test_failed_start_keeps_running_core(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    A core that fails at start-up: Start fails with its line, no new core
    process remains, the running one keeps serving."""
    site, fd = fake
    cur = start(site, fd)
    line = "Failed to start: app/proxyman/inbound: failed to listen TCP on 443 > permission denied"
    fd.set_fail_start(line)
    try:
        code, details = site.panel.error(site.panel.start, xray_config(), [xuser(pb, "1")])
    finally:
        fd.set_fail_start(None)
    assert code == grpc.StatusCode.UNKNOWN, (code, details)
    assert "failed to listen TCP on 443" in details, details
    assert core_pids(site.node) == [cur["pid"]] and alive(cur["pid"])
    assert site.panel.info().started
    site.panel.backend_stats()
    assert fd.current()["pid"] == cur["pid"]


def test_excluded_inbounds_untouched(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    Case 34: an excluded inbound comes out unchanged and no API call
    targets it."""
    site, fd = fake
    panel_cfg = xray_config(trojan_static=True)
    start(site, fd, config=panel_cfg, exclude=[TROJAN])
    cfg = fd.config()
    tr = [i for i in cfg["inbounds"] if i["tag"] == TROJAN][0]
    want = [i for i in panel_cfg["inbounds"] if i["tag"] == TROJAN][0]
    assert tr == want, (tr, want)
    since = len(fd.records())
    site.panel.sync_user(xuser(pb, "50"), xuser(pb, "1", tags=[]))
    targeted = {r.get("tag") for r in fd.records()[since:] if r["path"].endswith("AlterInbound")}
    assert TROJAN not in targeted and VLESS in targeted, targeted


def test_second_start_replaces_fake_core(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    A Start with a changed config brings up a new core generation and
    retires the old one (RemoveInbound of its user inbounds, then stop)."""
    site, fd = fake
    old = start(site, fd)
    cfg = xray_config()
    cfg["routing"]["rules"].append({"type": "field", "domain": ["domain:x.example"],
                                    "outboundTag": "BLOCK"})
    since = len(fd.records())
    r = site.panel.start(cfg, [xuser(pb, "1")])
    assert r.started
    wait_for(lambda: not alive(old["pid"]), T(10), "the old fake core to stop")
    new = fd.current()
    assert new["pid"] != old["pid"] and core_pids(site.node) == [new["pid"]]
    site.panel.backend_stats()
    removed = [r for r in fd.records()[since:] if r["path"].endswith("/RemoveInbound")]
    assert all(r["path"].startswith("/xray.") for r in removed), removed


def test_core_crash_restart_replays_users(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    kill -9 of the core: while the node restarts it (the fake takes ~0.2 s
    to serve) GetBackendStats says `core is not started yet` (case 29); the
    restarted core's config carries the users added at runtime, and the
    counters banked before the crash are still answered."""
    import signal
    site, fd = fake
    cur = start(site, fd)
    site.panel.sync_user(xuser(pb, "60", password="p60", ss_method="aes-128-gcm"))
    site.panel.stats(USERS, reset=True)
    fd.set(stats={"user>>>60>>>traffic>>>downlink": 777})
    assert site.panel.user_traffic("60") == (0, 777)
    time.sleep(2.5)  # a bank (every 1 s here) has moved the 777 into the node's ledger
    os.kill(cur["pid"], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{cur['pid']}"), T(5), "the node to reap the core",
             interval=0.002)
    code, details = site.panel.error(site.panel.backend_stats)
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "core is not started yet")
    rest = site.panel.rest("GET", "/stats/backend")
    assert (rest.status_code, rest.text) == (503, "core is not started yet\n"), \
        (rest.status_code, rest.text)
    new = wait_for(lambda: (lambda c: c if c and c["pid"] != cur["pid"] else None)(fd.current()),
                   T(15), "the restarted fake core")
    wait_for(lambda: _ok(site.panel.backend_stats), T(10), "the restarted core to answer")
    assert core_pids(site.node) == [new["pid"]]
    cfg = fd.config()
    for tag in USER_TAGS:
        ib = [i for i in cfg["inbounds"] if i["tag"] == tag][0]
        assert "60" in {c["email"] for c in ib["settings"]["clients"]}, (tag, ib)
    ss = [c for i in cfg["inbounds"] if i["tag"] == SS for c in i["settings"]["clients"]
          if c["email"] == "60"][0]
    assert (ss["password"], ss["method"]) == ("p60", "aes-128-gcm"), ss
    assert "60" in fd.dump()["inbounds"][VLESS]["users"]
    assert site.panel.user_traffic("60", reset=True) == (0, 777)
    assert site.panel.user_traffic("60") == (0, 0)


def test_outbound_latency_from_observatory(fake, pb):
    """fake Xray: behaviour from source, not verified against a real Xray.
    GetOutboundsLatency reads the observatory from the core's metrics
    endpoint (spec §12.4): one Latency per outbound, sorted by tag, the
    blackhole outbound left out, link = tag, source "xray-observatory",
    filtered by name; empty without an observatory."""
    site, fd = fake
    cfg = xray_config()
    start(site, fd, config=cfg)
    assert not list(site.panel.call("GetOutboundsLatency", pb.LatencyRequest(),
                                    pb.LatencyResponse).latencies), "no observatory: empty"
    cfg = xray_config()
    cfg["outbounds"].insert(0, {"protocol": "vless", "tag": "PROXY-B", "settings": {}})
    cfg["outbounds"].insert(0, {"protocol": "vless", "tag": "PROXY-A", "settings": {}})
    cfg["observatory"] = {"subjectSelector": ["PROXY", "BLOCK"], "probeInterval": "1m"}
    start(site, fd, config=cfg)
    obs = {"PROXY-B": {"alive": False, "delay": 99999999, "outbound_tag": "PROXY-B",
                       "last_seen_time": 0, "last_try_time": 1700000100},
           "BLOCK": {"alive": True, "delay": 1, "outbound_tag": "BLOCK",
                     "last_seen_time": 1700000000, "last_try_time": 1700000000},
           "PROXY-A": {"alive": True, "delay": 120, "outbound_tag": "PROXY-A",
                       "last_seen_time": 1700000050, "last_try_time": 1700000060}}
    with open(os.path.join(fd.dir, "observatory.json"), "w") as f:
        json.dump(obs, f)
    try:
        got = site.panel.call("GetOutboundsLatency", pb.LatencyRequest(),
                              pb.LatencyResponse).latencies
        assert [(x.name, x.link, x.alive, x.delay, x.last_seen_time, x.last_try_time, x.source)
                for x in got] == [
            ("PROXY-A", "PROXY-A", True, 120, 1700000050, 1700000060, "xray-observatory"),
            ("PROXY-B", "PROXY-B", False, 99999999, 0, 1700000100, "xray-observatory")], got
        one = site.panel.call("GetOutboundsLatency", pb.LatencyRequest(name="PROXY-B"),
                              pb.LatencyResponse).latencies
        assert [x.name for x in one] == ["PROXY-B"], one
        r = site.panel.rest("GET", "/stats/latency", pb.LatencyRequest().SerializeToString())
        assert r.status_code == 200, (r.status_code, r.content)
        assert [x.name for x in pb.LatencyResponse.FromString(r.content).latencies] == \
            ["PROXY-A", "PROXY-B"]
    finally:
        os.unlink(os.path.join(fd.dir, "observatory.json"))


def _ok(fn):
    try:
        fn()
        return True
    except grpc.RpcError:
        return False
