"""The Marzban config rewrite as the core receives it (spec/marzban.md §7,
§13 cases 22-28): a wrapper core records its stdin (the node's rewritten
config) and then execs the real v2ray 4.34 on it, so every config here is
also accepted by a real core. The node may add its own loopback API
inbound (tag PN_NODE_API) and rule (node/mzconf.h); they are checked for
shape and then set aside; everything else must equal a reference
rewrite computed here from §7."""
import copy
import json

import pytest

from pnmarzban import (VLESS, MzPanel, WrapperCore, finish_module_node,  # noqa: F401
                       module_node, mz_config, pki, raw_post)
from pnnode import T, free_port

INTERNAL = "PN_NODE_API"
API_SERVICES = {"services": ["HandlerService", "StatsService", "LoggerService"], "tag": "API"}


def reference_rewrite(cfg, node, peer, inbounds=None):
    """spec §7 steps 2-9, for comparing values (key order checked apart)."""
    out = copy.deepcopy(cfg)
    ibs = [ib for ib in out.get("inbounds", [])
           if not (ib.get("protocol") == "dokodemo-door" and ib.get("tag") == "API_INBOUND")]
    if inbounds is not None:
        ibs = [ib for ib in ibs if ib.get("tag") in inbounds]
    api_tag = (cfg.get("api") or {}).get("tag")
    routing = out.get("routing")
    if api_tag is not None and isinstance(routing, dict) and "rules" in routing:
        routing["rules"] = [r for r in routing["rules"] if r.get("outboundTag") != api_tag]
    out["api"] = copy.deepcopy(API_SERVICES)
    out["stats"] = {}
    ibs.insert(0, {"listen": node.api_host, "port": node.api_port, "protocol": "dokodemo-door",
                   "settings": {"address": "127.0.0.1"},
                   "streamSettings": {"security": "tls", "tlsSettings": {"certificates": [
                       {"certificateFile": node.cert, "keyFile": node.keyfile}]}},
                   "tag": "API_INBOUND"})
    out["inbounds"] = ibs
    if not isinstance(out.get("routing"), dict):
        out["routing"] = {}
    out["routing"].setdefault("rules", []).insert(
        0, {"inboundTag": ["API_INBOUND"], "source": ["127.0.0.1", peer],
            "outboundTag": "API", "type": "field"})
    log = out.get("log")
    if isinstance(log, dict) and log.get("logLevel") in ("none", "error"):
        log["logLevel"] = "warning"
    return out


def set_aside_internal(got):
    """Removes the node's own loopback API inbound and rule after checking
    their shape; returns a copy."""
    got = copy.deepcopy(got)
    internal = [ib for ib in got.get("inbounds", []) if ib.get("tag") == INTERNAL]
    assert len(internal) <= 1, internal
    if internal:
        ib = internal[0]
        assert ib.get("listen") == "127.0.0.1" and ib.get("protocol") == "dokodemo-door" \
            and "streamSettings" not in ib, ib
        got["inbounds"] = [x for x in got["inbounds"] if x.get("tag") != INTERNAL]
        rules = got["routing"]["rules"]
        assert rules[1] == {"type": "field", "inboundTag": [INTERNAL], "source": ["127.0.0.1"],
                            "outboundTag": "API"}, rules[:3]
        got["routing"]["rules"] = rules[:1] + rules[2:]
    return got


def assert_key_order(src, got, where="top level"):
    """Keys present in the input keep their relative order."""
    kept = [k for k in got if k in src]
    assert kept == [k for k in src if k in got], f"{where}: key order {list(got)} vs {list(src)}"


class ConfSite:
    def __init__(self, node, core):
        self.node, self.core = node, core
        self.panel = MzPanel(node)

    def apply(self, cfg_text_or_dict, path="/restart"):
        """Sends a config (dict or exact JSON text) and returns the core's
        stdin, parsed."""
        self.panel.connect()
        before = len(self.core.invocations())
        r = self.panel.start(cfg_text_or_dict, path)
        assert r.status_code == 200 and r.json()["started"], \
            f"{r.status_code} {r.text}\n" + self.node.describe()
        inv = self.core.invocations()
        assert len(inv) == before + 1, f"expected one new core launch, got {inv[before:]}"
        assert inv[-1]["argv"] == ["-config", "stdin:"], inv[-1]["argv"]
        return self.core.last()


@pytest.fixture(scope="module")
def conf(pki, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mzconf-core"))
    core = WrapperCore(d)
    n = module_node(tmp_path_factory, pki, "mzconf", api_host="127.0.0.1", core=core.path)
    s = ConfSite(n, core)
    yield s
    s.panel.close()
    finish_module_node(n)


def check(site, cfg, peer="127.0.0.1", inbounds=None):
    got = site.apply(cfg)
    want = reference_rewrite(cfg, site.node, peer, inbounds)
    assert_key_order(cfg, got)
    plain = set_aside_internal(got)
    assert plain == want, "rewritten config differs:\n" + json.dumps(
        {"got": plain, "want": want}, indent=1)[:6000]
    return got


# ---- cases -------------------------------------------------------------------------------------

def test_panel_config_rewrite_case22(conf):
    cfg = mz_config(conf.node.ports, ["1.alice", "2.bob"])
    got = check(conf, cfg)
    ib = got["inbounds"][0]
    assert ib["tag"] == "API_INBOUND" and ib["listen"] == "127.0.0.1" \
        and ib["port"] == conf.node.api_port, ib
    certs = ib["streamSettings"]["tlsSettings"]["certificates"]
    assert certs == [{"certificateFile": conf.node.env["SSL_CERT_FILE"],
                      "keyFile": conf.node.env["SSL_KEY_FILE"]}], certs
    assert got["routing"]["rules"][0] == {"inboundTag": ["API_INBOUND"],
                                          "source": ["127.0.0.1", "127.0.0.1"],
                                          "outboundTag": "API", "type": "field"}
    assert [x["tag"] for x in got["inbounds"] if x["tag"] == "API_INBOUND"] == ["API_INBOUND"]
    assert got["policy"] == cfg["policy"] and got["api"] == API_SERVICES and got["stats"] == {}


def test_adjacent_api_items_all_removed_case23(conf):
    cfg = mz_config(conf.node.ports, ["1.alice"])
    second = dict(cfg["inbounds"][0], port=62052)
    cfg["inbounds"].insert(1, second)
    keep = {"tag": "API_LIKE", "listen": "127.0.0.1", "port": free_port(),
            "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1", "port": 9}}
    cfg["inbounds"].append(keep)  # same protocol, another tag: kept
    rules = cfg["routing"]["rules"]
    rules.insert(1, {"inboundTag": ["API_INBOUND"], "outboundTag": "API", "type": "field"})
    rules.append({"inboundTag": ["API_LIKE"], "outboundTag": "DIRECT", "type": "field"})
    got = check(conf, cfg)
    assert sum(1 for x in got["inbounds"] if x["tag"] == "API_INBOUND") == 1
    assert sum(1 for r in got["routing"]["rules"] if r.get("outboundTag") == "API"
               and r.get("inboundTag") == ["API_INBOUND"]) == 1
    assert any(x["tag"] == "API_LIKE" for x in got["inbounds"])


def test_routing_missing_or_partial_case24(conf):
    cfg = mz_config(conf.node.ports, ["1.alice"])
    del cfg["routing"]
    cfg["log"]["loglevel"] = "warning"
    got = check(conf, cfg)
    assert set(set_aside_internal(got)["routing"]) == {"rules"}
    cfg2 = mz_config(conf.node.ports, ["1.alice", "5.eve"])
    cfg2["routing"] = {"domainStrategy": "IPIfNonMatch"}
    got = check(conf, cfg2)
    assert got["routing"]["domainStrategy"] == "IPIfNonMatch"


def test_loglevel_case26(conf):
    cfg = mz_config(conf.node.ports, ["1.alice"])
    cfg["log"] = {"logLevel": "error"}
    got = check(conf, cfg)
    assert got["log"] == {"logLevel": "warning"}, got["log"]
    cfg = mz_config(conf.node.ports, ["1.alice", "6.frank"])
    cfg["log"] = {"loglevel": "error"}
    got = check(conf, cfg)
    assert got["log"] == {"loglevel": "error"}, got["log"]


def test_numbers_and_unicode_survive_case27(conf):
    cfg = mz_config(conf.node.ports, ["1.alice"])
    remark = "Ünïcødé – 中文 🚀"
    cfg["inbounds"][1]["remark"] = remark
    cfg["x_big"] = "@BIG@"
    cfg["x_list"] = ["@F1@", "@F2@", -0.0]
    text = json.dumps(cfg, ensure_ascii=False)
    text = text.replace('"@BIG@"', "12345678901234567890").replace('"@F1@"', "1.50") \
        .replace('"@F2@"', "1e-7")
    got = conf.apply(text)
    raw = conf.core.last_text()
    assert "12345678901234567890" in raw, raw[:2000]
    assert "1.50" in raw and "1e-7" in raw, "numbers not passed through as written"
    assert got["x_big"] == 12345678901234567890
    assert [x["remark"] for x in got["inbounds"] if x.get("tag") == VLESS] == [remark]
    want = reference_rewrite(json.loads(text), conf.node, "127.0.0.1")
    assert set_aside_internal(got) == want


@pytest.fixture(scope="module")
def conf6(pki, tmp_path_factory):
    """A dual-stack node (SERVICE_HOST ::) with INBOUNDS=' a ,b'."""
    d = str(tmp_path_factory.mktemp("mzconf6-core"))
    core = WrapperCore(d)
    n = module_node(tmp_path_factory, pki, "mzconf6", host="::", api_host="0.0.0.0",
                    core=core.path, env={"INBOUNDS": " a ,b"})
    s = ConfSite(n, core)
    yield s
    finish_module_node(n)


def small_inbound(tag):
    return {"tag": tag, "listen": "127.0.0.1", "port": free_port(), "protocol": "dokodemo-door",
            "settings": {"address": "127.0.0.1", "port": 9, "network": "tcp"}}


def test_inbounds_filter_and_mapped_peer_case25_28(conf6):
    """INBOUNDS=' a ,b' keeps a, b and the API inbound; a /connect over IPv4
    to the :: listener from 127.0.0.3 (peer ::ffff:127.0.0.3) puts 127.0.0.3
    into the rule."""
    node = conf6.node
    cfg = mz_config({}, [], inbound_first=[small_inbound("c"), small_inbound("a")],
                    extra_inbounds=[small_inbound("b"), small_inbound("d")])
    status, _, body = raw_post(node, node.pki, "/connect", {"session_id": None},
                               source="127.0.0.3", host="127.0.0.1")
    assert status == 200, body
    sid = json.loads(body)["session_id"]
    before = len(conf6.core.invocations())
    status, _, body = raw_post(node, node.pki, "/start",
                               {"session_id": sid, "config": json.dumps(cfg)},
                               source="127.0.0.3", host="127.0.0.1")
    assert status == 200, body.decode(errors="replace") + "\n" + node.describe()
    assert len(conf6.core.invocations()) == before + 1
    got = conf6.core.last()
    assert got["routing"]["rules"][0]["source"] == ["127.0.0.1", "127.0.0.3"], \
        got["routing"]["rules"][0]
    tags = [x["tag"] for x in got["inbounds"] if x["tag"] != INTERNAL]
    assert tags == ["API_INBOUND", "a", "b"], tags
    want = reference_rewrite(cfg, node, "127.0.0.3", inbounds={"a", "b"})
    assert set_aside_internal(got) == want


def test_concurrent_restarts_latest_wins(conf):
    """Concurrent /restarts queue and the latest config wins (spec §3.2)."""
    import threading
    import time
    conf.panel.connect()
    cfgs = [mz_config(conf.node.ports, ["1.alice", f"{70 + i}.q{i}"]) for i in range(3)]
    res = [None] * 3

    def send(i):
        q = MzPanel(conf.node, name=f"q{i}")
        q.sid, q.ca = conf.panel.sid, conf.panel.ca
        res[i] = q.restart(cfgs[i])
        q.close()
    threads = []
    for i in range(3):
        th = threading.Thread(target=send, args=(i,))
        th.start()
        threads.append(th)
        time.sleep(0.02)
    for th in threads:
        th.join(T(20))
    for i, r in enumerate(res):
        assert r is not None and r.status_code == 200 and r.json()["started"], (i, r and r.text)
    conf.node.one_core(timeout=T(10))
    got = conf.core.last()
    want = reference_rewrite(cfgs[2], conf.node, "127.0.0.1")
    assert set_aside_internal(got) == want, "the last config sent is not the one running"
