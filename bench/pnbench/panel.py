"""What a PasarGuard panel sends: a realistic core config with one VLESS
inbound (plus the panel's own API inbound, which the node replaces) and
vless-only users. Users are generated deterministically from a seed so a
"changed" set differs from the original in exactly the chosen users."""
import json
import uuid

VLESS_TAG = "VLESS TCP"


def panel_config(vless_port, loglevel="warning"):
    return {
        "log": {"loglevel": loglevel, "access": "", "error": ""},
        "api": {"services": ["HandlerService", "StatsService", "LoggerService"], "tag": "API"},
        "stats": {},
        "policy": {"levels": {"0": {"handshake": 4, "connIdle": 300}},
                   "system": {"statsInboundUplink": True, "statsInboundDownlink": True,
                              "statsOutboundUplink": True, "statsOutboundDownlink": True}},
        "inbounds": [
            {"tag": "API_INBOUND", "listen": "127.0.0.1", "port": 62051,
             "protocol": "dokodemo-door", "settings": {"address": "127.0.0.1"}},
            {"tag": VLESS_TAG, "listen": "127.0.0.1", "port": vless_port, "protocol": "vless",
             "settings": {"clients": [], "decryption": "none"},
             "streamSettings": {"network": "tcp", "security": "none"}},
        ],
        "outbounds": [{"protocol": "freedom", "tag": "DIRECT"},
                      {"protocol": "blackhole", "tag": "BLOCK"}],
        "routing": {"domainStrategy": "AsIs", "rules": [
            {"type": "field", "inboundTag": ["API_INBOUND"], "outboundTag": "API"},
            {"type": "field", "ip": ["geoip:private"], "outboundTag": "DIRECT"}]},
    }


def user_id(seed, i):
    """A deterministic UUID for user i of generation `seed`."""
    return str(uuid.UUID(int=(0x5EED << 112) | (seed << 64) | i))


def email(seed, i):
    return f"{i}.u{seed}x{i}"


class Users:
    """A list of (email, uuid) pairs, convertible to protobuf messages."""

    def __init__(self, pairs):
        self.pairs = list(pairs)

    @classmethod
    def make(cls, n, seed=1):
        return cls((email(seed, i), user_id(seed, i)) for i in range(n))

    def changed(self, fraction, seed):
        """A copy where the first `fraction` of users are replaced by new users
        (new emails and ids): a replacing sync then removes and adds that many."""
        k = int(len(self.pairs) * fraction)
        return Users([(email(seed, i), user_id(seed, i)) for i in range(k)] + self.pairs[k:])

    def pb(self, pb):
        out = []
        for e, u in self.pairs:
            p = pb.Proxy()
            p.vless.id = u
            p.vless.flow = ""
            out.append(pb.User(email=e, proxies=p, inbounds=[VLESS_TAG]))
        return out

    def __len__(self):
        return len(self.pairs)


def backend(pb, config, users, keep_alive=0):
    """A serialized Backend (Start request)."""
    return pb.Backend(type=pb.XRAY, config=json.dumps(config), users=users.pb(pb),
                      keep_alive=keep_alive).SerializeToString()
