"""Start, take-over, Stop and keep-alive on a real core (spec/pasarguard.md
§8, §18 cases 11-15; DESIGN "Core process", "Keep-alive", "Counters"):
the real /usr/bin/v2ray behind the node, real traffic through a second
v2ray, and the core processes checked in /proc."""
import json
import os
import re
import socket
import time

import grpc
import pytest

from pnclient import assert_text_error
from pncore import (ALL_TAGS, SS, USERS, VLESS, VMESS, TROJAN, Panel, Site, alive, assert_user_counts,
                    cmdline, core_pids, download_ok, download_refused, panel_config, reset_all,
                    wait_for)
from pnnode import NODE_VERSION, T, V2RAY_VERSION, free_port


def version_tuple(v):
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", v)
    assert m, f"not a plain version: {v!r}"
    return tuple(int(x) for x in m.groups())


@pytest.fixture(scope="module")
def site(pb, tmp_path_factory):
    # Counters are banked only before planned restarts here (not every 10 s),
    # so the planned-restart test really checks the pre-restart banking.
    s = Site(tmp_path_factory.mktemp("lifecycle"), pb,
             env={"PROXYNODE_STATS_BANK_INTERVAL": "3600"})
    yield s
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


def test_start_two_users(site):
    """Case 11: started=true, a x.y.z core version, node_version >= 0.2.0; the
    core runs as the node's child and both users pass traffic."""
    r = site.start(["1", "2"])
    assert r.started is True
    assert re.fullmatch(r"\d+\.\d+\.\d+", r.core_version), r.core_version
    assert r.core_version == V2RAY_VERSION
    assert version_tuple(r.node_version) >= (0, 2, 0) and r.node_version == NODE_VERSION
    info = site.panel.info()
    assert (info.started, info.core_version) == (True, V2RAY_VERSION)
    rest = site.panel.rest("GET", "/info")
    assert rest.status_code == 200 and site.pb.BaseInfoResponse.FromString(rest.content).started
    pid = site.core()
    assert "v2ray" in cmdline(pid), cmdline(pid)
    c = site.client({"v": (VLESS, "1"), "m": (VMESS, "2")})
    download_ok(c.socks["v"], site.url(), site.size(), "vless user 1")
    download_ok(c.socks["m"], site.url(), site.size(), "vmess user 2")


def test_start_bad_protobuf(site):
    """An undecodable Backend → INVALID_ARGUMENT; the running core is untouched."""
    site.start(["1", "2"])
    pid = site.core()
    code, details = site.panel.error(site.panel.call, "Start", b"\x12\x10abc")
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert core_pids(site.node) == [pid]
    assert site.panel.info().started


def test_start_bad_json_keeps_core(site):
    """A config that is not JSON: the error names line and column, and the
    core already running keeps serving (spec §17 #8, DESIGN "Core process")."""
    site.start(["1", "2"])
    pid = site.core()
    bad = '{\n  "inbounds": [\n    {"tag": "x", }\n  ]\n}'
    code, details = site.panel.error(site.panel.start, bad, site.users(["1"]))
    assert code == grpc.StatusCode.UNKNOWN, (code, details)
    assert re.search(r"line 3\D+column \d+", details), details
    assert core_pids(site.node) == [pid]
    info = site.panel.info()
    assert info.started, "a bad config must not stop the running core"
    c = site.client({"v": (VLESS, "1")})
    download_ok(c.socks["v"], site.url(), site.size(), "after a bad config")
    site.panel.backend_stats()


def test_start_core_rejects_config(site):
    """Case 12: a config the core itself refuses → Unknown with the core's
    error line; no new core process remains and the old one keeps serving."""
    site.start(["1", "2"])
    pid = site.core()
    cfg = site.config()
    cfg["outbounds"].append({"protocol": "nosuchproto", "tag": "WEIRD"})
    code, details = site.panel.error(site.panel.start, cfg, site.users(["1", "2"]))
    assert code == grpc.StatusCode.UNKNOWN, (code, details)
    assert "nosuchproto" in details, f"the core's error line is missing: {details!r}"
    assert ("failed to start xray" in details
            or "xray process stopped before API became ready" in details), details
    assert core_pids(site.node) == [pid], \
        f"after a failed Start the node runs {core_pids(site.node)}, expected only {pid}"
    assert site.panel.info().started
    site.panel.backend_stats()
    c = site.client({"t": (TROJAN, "2")})
    download_ok(c.socks["t"], site.url(), site.size(), "old core after a failed Start")


def test_second_start_takes_over(site):
    """Case 13: another client's Start takes over: the new config serves, the
    old core is retired and stopped, and the first client still talks to the
    node."""
    site.start(["1", "2"])
    old = site.core()
    old_ports = dict(site.ports)
    new_ports = {t: free_port() for t in ALL_TAGS}
    other = Panel(site.node, site.pb)
    try:
        r = other.start(panel_config(new_ports), site.users(["1", "2", "3"]))
        assert r.started
        site.ports = new_ports
        new = wait_for(lambda: (lambda p: p if len(p) == 1 and p[0] != old else None)(
            core_pids(site.node)), T(10), "the old core to be replaced by one new core")[0]
        site.seen_cores.add(new)
        assert not alive(old)
        c = site.client({"v": (VLESS, "3"), "m": (VMESS, "1")})
        download_ok(c.socks["v"], site.url(), site.size(), "user 3 on the new config")
        download_ok(c.socks["m"], site.url(), site.size(), "user 1 on the new config")
        for tag, port in old_ports.items():
            wait_for(lambda: not _accepts(port), T(5), f"old port of {tag} to close")
        assert site.panel.info().started  # the first client is still served
        other.stats(USERS)
    finally:
        other.close()


def _accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_planned_restart_keeps_counters(site):
    """DESIGN "Counters": a Start with the same config, and one with a changed
    config (a new core generation), while counters are unbanked: nothing is
    lost and nothing is counted twice."""
    site.start(["1", "2"])
    reset_all(site.panel)
    size = site.size()
    c = site.client({"v": (VLESS, "1")})
    download_ok(c.socks["v"], site.url(), size, "before the restarts")
    site.panel.settled_traffic("1", size)
    site.start(["1", "2"])  # identical Start
    download_ok(c.socks["v"], site.url(), size, "after an identical Start")
    site.panel.settled_traffic("1", 2 * size)
    old = site.core()
    cfg = site.config()
    cfg["routing"]["rules"].append({"type": "field", "domain": ["domain:other.example"],
                                    "outboundTag": "BLOCK"})
    site.start(["1", "2"], config=cfg)  # changed: a new core generation
    st = site.panel.stats(USERS, reset=True)
    assert_user_counts(st, "1", 2 * size, slack=4096, what="after a config change")
    wait_for(lambda: not alive(old), T(10), "the old core generation to stop")
    new = site.core()
    assert new != old
    st = site.panel.stats(USERS, reset=True)
    assert all(v == 0 for v in st.values()), f"counted twice after the old core stopped: {st}"
    download_ok(c.socks["v"], site.url(), size, "on the new generation")
    site.panel.settled_traffic("1", size)
    st = site.panel.stats(USERS, reset=True)
    assert_user_counts(st, "1", size, what="on the new generation")


def test_system_backend_latency(site):
    """GetSystemStats fields are sane, GetBackendStats copies the core's
    runtime numbers, GetOutboundsLatency is an empty list on v2ray."""
    t0 = time.monotonic()
    site.start(["1", "2"])
    s = wait_for(lambda: (lambda x: x if x.mem_total else None)(site.panel.system_stats()),
                 T(5), "a system stats sample")
    with open("/proc/meminfo") as f:
        mem_total = int(re.search(r"MemTotal:\s+(\d+) kB", f.read()).group(1)) * 1024
    assert 0.5 * mem_total <= s.mem_total <= 1.5 * mem_total, (s.mem_total, mem_total)
    assert 0 < s.mem_used <= s.mem_total, s
    assert s.cpu_cores in (os.cpu_count(), len(os.sched_getaffinity(0))), s
    assert 0.0 <= s.cpu_usage <= 100.0, s
    assert s.uptime <= time.monotonic() - t0 + 3, s
    r = site.panel.rest("GET", "/stats/system")
    assert r.status_code == 200, r.text
    assert site.pb.SystemStatsResponse.FromString(r.content).mem_total > 0
    b = site.panel.backend_stats()
    assert b.num_goroutine > 0 and b.alloc > 0 and b.sys >= b.alloc and b.mallocs >= b.frees, b
    assert b.uptime <= time.monotonic() - t0 + 3, b
    r = site.panel.rest("GET", "/stats/backend")
    assert r.status_code == 200, r.text
    assert site.pb.BackendStatsResponse.FromString(r.content).num_goroutine > 0
    lat = site.panel.call("GetOutboundsLatency", site.pb.LatencyRequest(),
                          site.pb.LatencyResponse)
    assert list(lat.latencies) == []
    r = site.panel.rest("GET", "/stats/latency")
    assert r.status_code == 200 and r.content == b"", (r.status_code, r.content)


def test_stop(site):
    """Case 14: Stop → Empty; the core is gone; guarded calls give
    `backend not initialized`; a new Start works."""
    site.start(["1", "2"])
    pid = site.core()
    c = site.client({"v": (VLESS, "1")})
    assert site.panel.stop() == site.pb.Empty()
    wait_for(lambda: not alive(pid), T(7), "the core to stop")
    assert core_pids(site.node) == []
    code, details = site.panel.error(site.panel.stats, USERS)
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "backend not initialized")
    code, details = site.panel.error(site.panel.stop)
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "backend not initialized")
    assert_text_error(site.panel.rest("GET", "/stats/backend"), 500, "backend not initialized")
    assert_text_error(site.panel.rest("PUT", "/stop"), 500, "backend not initialized")
    assert site.panel.info().started is False
    download_refused(c.socks["v"], site.url(), "after Stop")
    site.start(["1", "2"])
    download_ok(c.socks["v"], site.url(), site.size(), "after a new Start")
    # REST stop works too
    r = site.panel.rest("PUT", "/stop")
    assert (r.status_code, r.content) == (200, b""), (r.status_code, r.text)
    assert r.headers.get("Content-Type") == "application/x-protobuf"
    wait_for(lambda: core_pids(site.node) == [], T(7), "the core to stop after REST /stop")
    site.start(["1", "2"])


def test_keepalive_expiry_keeps_core(site):
    """Case 15 (shortened: keep_alive=2, 5 s of silence): the session expires,
    the core keeps running and users keep passing traffic; the next Start
    works."""
    site.start(["1", "2"], keep_alive=2)
    pid = site.core()
    c = site.client({"v": (VLESS, "1"), "t": (TROJAN, "2")})
    log_from = len(site.node.stderr())
    time.sleep(5)  # no panel call at all (reading the node's log file is not one)
    wait_for(lambda: re.search(r"keep-alive.*expired|expired.*keep-alive",
                               site.node.stderr()[log_from:], re.I),
             T(6), "the node to log the keep-alive expiry (else this test proves nothing)",
             interval=0.2)
    assert alive(pid) and core_pids(site.node) == [pid]
    download_ok(c.socks["v"], site.url(), site.size(), "after keep-alive expiry")
    download_ok(c.socks["t"], site.url(), site.size(), "after keep-alive expiry")
    assert site.panel.info().started
    site.panel.stats(USERS)
    site.start(["1", "2"])


def test_keepalive_stops_core_when_asked(pb, tmp_path):
    """PROXYNODE_KEEPALIVE_STOPS_CORE=true restores the reference behaviour:
    expiry stops the core and the guard says `backend not initialized`."""
    s = Site(tmp_path, pb, env={"PROXYNODE_KEEPALIVE_STOPS_CORE": "true"})
    try:
        s.start(["1"], keep_alive=2)
        pid = s.core()
        wait_for(lambda: not alive(pid), T(12), "the core to stop on keep-alive expiry",
                 interval=0.2)
        code, details = s.panel.error(s.panel.stats, USERS)
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "backend not initialized")
        s.start(["1"])
    finally:
        s.close()


def test_v2ray_generated_config(pb, tmp_path):
    """Spec §9/§10 and cores.md §7 for v2ray 4.34, read from the config the
    node writes with DEBUG=true: the API inbound and rule, geoip:private
    expanded (Debian's v2ray has no geoip.dat), no Xray-only keys even when
    the panel sends them, vless `decryption: none` without flow, vmess
    alterId 0, the single shadowsocks user at the top level."""
    gen = tmp_path / "generated"
    s = Site(tmp_path / "site", pb, env={"DEBUG": "true", "GENERATED_CONFIG_PATH": str(gen)})
    try:
        panel = s.config(online=True)
        panel["metrics"] = {"tag": "metric", "listen": "127.0.0.1:1"}
        panel["burstObservatory"] = {"subjectSelector": ["DIRECT"]}
        s.start(["2", "1"], config=panel)
        with open(gen / "xray.json") as f:
            cfg = json.load(f)
        ins = {i["tag"]: i for i in cfg["inbounds"]}
        assert cfg["inbounds"][0]["tag"] == "API_INBOUND"
        assert cfg["inbounds"][0]["listen"] == "127.0.0.1"
        assert cfg["inbounds"][0]["protocol"] == "dokodemo-door"
        assert cfg["routing"]["rules"][0]["inboundTag"] == ["API_INBOUND"]
        assert "geoip:" not in json.dumps(cfg).lower()
        for key in ("metrics", "burstObservatory", "transport"):
            assert key not in cfg, key
        assert "statsUserOnline" not in json.dumps(cfg["policy"]), cfg["policy"]
        lvl = cfg["policy"]["levels"]["0"]
        assert lvl["statsUserUplink"] is True and lvl["statsUserDownlink"] is True
        vl = ins[VLESS]["settings"]
        assert vl["decryption"] == "none" and all("flow" not in c for c in vl["clients"]), vl
        assert sorted(c["email"] for c in vl["clients"]) == ["1", "2"]
        vm = ins[VMESS]["settings"]["clients"]
        assert all(c["alterId"] == 0 for c in vm), vm
        ss = ins[SS]["settings"]
        assert "clients" not in ss or ss["clients"] == [], ss
        assert (ss["email"], ss["password"], ss["level"]) == ("1", "pw-1", 0), ss
        assert ss["method"] in ("chacha20-ietf-poly1305", "chacha20-poly1305"), ss
        assert cfg["log"].get("access", "") == "" and cfg["log"].get("error", "") == ""
    finally:
        s.close()


def test_rest_start(site, pb):
    """POST /start (spec §6.1, §7.1): a Backend body starts the core and
    answers a BaseInfoResponse; an undecodable body is 400; a config that is
    not JSON, or that the core refuses, is 503 with the error text, and the
    running core keeps serving."""
    body = pb.Backend(config=json.dumps(site.config()), users=site.users(["1", "2"]))
    r = site.panel.rest("POST", "/start", body, timeout=T(30))
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-protobuf", \
        (r.status_code, r.text)
    info = pb.BaseInfoResponse.FromString(r.content)
    assert (info.started, info.core_version) == (True, V2RAY_VERSION), info
    pid = site.core()
    r = site.panel.rest("POST", "/start", b"\x12\x10abc")
    assert r.status_code == 400 and r.text.endswith("\n"), (r.status_code, r.text)
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    r = site.panel.rest("POST", "/start", pb.Backend(config='{\n  "inbounds": [,]\n}'))
    assert r.status_code == 503 and re.search(r"line 2\D+column \d+", r.text), \
        (r.status_code, r.text)
    cfg = site.config()
    cfg["outbounds"].append({"protocol": "nosuchproto", "tag": "WEIRD"})
    r = site.panel.rest("POST", "/start", pb.Backend(config=json.dumps(cfg)), timeout=T(30))
    assert r.status_code == 503 and "nosuchproto" in r.text, (r.status_code, r.text)
    assert core_pids(site.node) == [pid]
    c = site.client({"v": (VLESS, "2")})
    download_ok(c.socks["v"], site.url(), site.size(), "after failed REST Starts")
