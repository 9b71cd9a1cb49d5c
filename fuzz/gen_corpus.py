#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (valid inputs the
fuzzer mutates from). Everything is built by hand here -- protobuf fields,
HPACK literals, HTTP/2 frames -- so the script needs nothing beyond Python.
The option bytes in front of each seed are described at the top of each
fuzz_*.c file. Run it again after changing a target's input format:

    python3 fuzz/gen_corpus.py
"""
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "corpus")
KEY = b"5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77"  # FZ_API_KEY in common.h


def panel(name):
    with open(os.path.join(ROOT, "tests", "data", "coreconf", name), "rb") as f:
        return f.read()


# ---- protobuf (service.proto) ----------------------------------------------

def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def f_bytes(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def f_varint(field, v):
    return varint(field << 3) + varint(v)


def user(email, inbounds=(), vmess=None, vless=None, trojan=None, ss=None, hy=None):
    proxy = b""
    if vmess is not None:
        proxy += f_bytes(1, f_bytes(1, vmess))
    if vless is not None:
        proxy += f_bytes(2, f_bytes(1, vless[0]) + f_bytes(2, vless[1]))
    if trojan is not None:
        proxy += f_bytes(3, f_bytes(1, trojan))
    if ss is not None:
        proxy += f_bytes(4, f_bytes(1, ss[0]) + f_bytes(2, ss[1]))
    if hy is not None:
        proxy += f_bytes(6, f_bytes(1, hy))
    m = f_bytes(1, email) + f_bytes(2, proxy)
    for tag in inbounds:
        m += f_bytes(3, tag)
    return m


UUID = "2d3b3b8e-4c2f-4a4f-9e7d-0b1b2c3d4e5f"
USERS = [
    user("1.alice", ["VMESS TCP", "VLESS TCP REALITY", "TROJAN WS", "SS AES", "vmess-in"],
         vmess=UUID, vless=(UUID, "xtls-rprx-vision"), trojan="pw", ss=("pw", "aes-128-gcm")),
    user("2.bob", ["SS 2022", "HYSTERIA", "vless-in", "ss-in"],
         ss=("AAAAAAAAAAAAAAAAAAAAAA==", "2022-blake3-aes-128-gcm"), hy="auth", vless=(UUID, "")),
    user("3.carol", ["trojan-in"], trojan=""),
]


def backend(config, users=(), keep_alive=60, exclude=(), btype=0):
    m = (f_varint(1, btype) if btype else b"") + f_bytes(2, config)
    for u in users:
        m += f_bytes(3, u)
    if keep_alive:
        m += f_varint(4, keep_alive)
    for tag in exclude:
        m += f_bytes(5, tag)
    return m


def users_msg(users):
    return b"".join(f_bytes(1, u) for u in users)


def chunk(users, index, last):
    m = b"".join(f_bytes(1, u) for u in users)
    if index:
        m += f_varint(2, index)
    if last:
        m += f_varint(3, 1)
    return m


def framed_chunks(chunks):
    return b"".join(varint(len(c)) + c for c in chunks)


def stat_request(name="", reset=False, stype=0):
    m = f_bytes(1, name) if name else b""
    if reset:
        m += f_varint(2, 1)
    if stype:
        m += f_varint(3, stype)
    return m


SMALL_XRAY = (b'{"log":{"loglevel":"warning"},"inbounds":[{"tag":"a","port":1080,'
              b'"protocol":"vless","settings":{"clients":[],"decryption":"none"}},'
              b'{"tag":"b","port":1081,"protocol":"shadowsocks","settings":'
              b'{"method":"2022-blake3-aes-128-gcm","password":"AAAAAAAAAAAAAAAAAAAAAA=="}}],'
              b'"outbounds":[{"protocol":"freedom","tag":"DIRECT"}]}')

# ---- gRPC and HTTP/2 ---------------------------------------------------------

def grpc_frame(msg, flags=0, length=None):
    return bytes([flags]) + struct.pack(">I", len(msg) if length is None else length) + msg


def hpack_int(value, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_str(s):
    if isinstance(s, str):
        s = s.encode()
    return hpack_int(len(s), 7) + s


def hpack(headers):
    """Literal header fields without indexing, new names, no Huffman: the
    easiest form for a fuzzer to mutate."""
    return b"".join(b"\x00" + hpack_str(n) + hpack_str(v) for n, v in headers)


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream) + payload


DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINDOW, CONT = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 1, 4, 1
START = frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0)


def grpc_headers(path, key=KEY, extra=()):
    h = [(":method", "POST"), (":scheme", "http"), (":path", path),
         (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")]
    if key is not None:
        h.append(("x-api-key", key))
    return hpack(h + list(extra))


def grpc_call(stream, path, msgs, key=KEY, extra=(), end=True):
    out = frame(HEADERS, END_HEADERS, stream, grpc_headers(path, key, extra))
    body = b"".join(grpc_frame(m) for m in msgs)
    return out + frame(DATA, END_STREAM if end else 0, stream, body)


def rest_h2(stream, method, path, body=b"", key=KEY, extra=()):
    h = [(":method", method), (":scheme", "https"), (":path", path),
         (":authority", "localhost")]
    if key is not None:
        h.append(("x-api-key", key))
    h += list(extra)
    if body:
        h.append(("content-length", str(len(body))))
        return frame(HEADERS, END_HEADERS, stream, hpack(h)) + frame(DATA, END_STREAM, stream, body)
    return frame(HEADERS, END_HEADERS | END_STREAM, stream, hpack(h))


def svc(name):
    return "/service.NodeService/" + name


# ---- HTTP/1.1 ------------------------------------------------------------------

def h1(method, path, body=b"", key=KEY, extra=(), version="HTTP/1.1"):
    lines = ["%s %s %s" % (method, path, version), "Host: localhost"]
    if key is not None:
        lines.append("x-api-key: " + key.decode())
    lines += ["%s: %s" % kv for kv in extra]
    if body and not any(k.lower() == "transfer-encoding" for k, _ in extra):
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body, size=7):
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n\r\n"


# ---- writing -------------------------------------------------------------------

def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def opt(*bs):
    return bytes(bs)


# fz_mode: 0 echo, 1 later, 2 stream, 3 hold, 4 pasarguard, 5 mixed
ECHO, LATER, STREAM, HOLD, PG, MIXED = range(6)


def gen_http1():
    start = backend(SMALL_XRAY, USERS, exclude=["b"])
    chunks = framed_chunks([chunk(USERS[:1], 0, False), chunk(USERS[1:], 1, True)])
    seeds = {
        "pg_info": (opt(PG, 0), h1("GET", "/info")),
        "pg_info_bearer": (opt(PG, 0), h1("GET", "/info", key=None,
                                          extra=[("Authorization", "Bearer " + KEY.decode())])),
        "pg_no_key": (opt(PG, 0), h1("GET", "/stats", key=None)),
        "pg_bad_key": (opt(PG, 0), h1("GET", "/info", key=b"nope")),
        "pg_start": (opt(PG, 0), h1("POST", "/start", start,
                                    extra=[("Content-Type", "application/x-protobuf")])),
        "pg_start_chunked": (opt(PG | 0x10, 0),
                             h1("POST", "/start", chunked(start, 64),
                                extra=[("Transfer-Encoding", "chunked")])),
        "pg_sync_chunked": (opt(PG, 1), h1("PUT", "/users/sync/chunked", chunks)),
        "pg_routes": (opt(PG, 0), h1("GET", "/stats/latency", stat_request("x")) +
                      h1("PUT", "/info") + h1("GET", "/nope") + h1("PUT", "/stop") +
                      h1("GET", "/stats/user/online", stat_request("1.alice", stype=5))),
        "echo_pipeline": (opt(ECHO, 0), h1("GET", "/a?a=1&b=2", extra=[("X-Test", "v")]) +
                          h1("POST", "/b", b"hello") + h1("GET", "/c", key=None)),
        "later_pipeline": (opt(LATER, 0), h1("GET", "/a") + h1("POST", "/b", b"xyz")),
        "stream": (opt(STREAM, 0), h1("GET", "/events") + h1("GET", "/again")),
        "stream_http10": (opt(STREAM, 0), h1("GET", "/events", version="HTTP/1.0")),
        "hold_eof": (opt(HOLD, 1), h1("GET", "/held")),
        "mixed": (opt(MIXED, 2), h1("GET", "/a") + h1("GET", "/b") + h1("GET", "/c") +
                  h1("GET", "/d") + h1("GET", "/e")),
        "expect_continue": (opt(ECHO, 0), h1("POST", "/up", b"0123456789",
                                             extra=[("Expect", "100-continue")])),
        "http10_keepalive": (opt(ECHO, 0), h1("GET", "/", extra=[("Connection", "keep-alive")],
                                              version="HTTP/1.0") + h1("GET", "/2")),
        "close": (opt(ECHO, 0), h1("GET", "/", extra=[("Connection", "close")]) + h1("GET", "/x")),
        "head": (opt(ECHO, 0), h1("HEAD", "/info") + h1("GET", "/info")),
        "absolute_form": (opt(ECHO, 0), h1("GET", "http://localhost:8080/p/q?a=%20b#frag")),
        "too_big_header": (opt(ECHO | 0x08, 0), h1("GET", "/", extra=[("X-Pad", "a" * 9000)])),
        "too_big_body": (opt(ECHO, 0), b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 70000"
                         b"\r\n\r\nabc"),
        "too_big_chunk": (opt(ECHO | 0x08, 0), b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked"
                          b"\r\n\r\n20000\r\nabc"),
        "chunk_ext_trailer": (opt(ECHO, 0), b"POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                              b"\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"),
        "upgrade": (opt(ECHO, 0), h1("GET", "/logs", extra=[
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")])),
        "garbage": (opt(ECHO | 0x08, 0), b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"),
        "bytewise": (opt(ECHO | 0x10, 3), h1("POST", "/slow", b"body")),
        "deferred_pair": (opt(LATER | 0x40 | 0x20, 2), h1("GET", "/a") + h1("GET", "/b")),
    }
    for name, (o, data) in seeds.items():
        write("fuzz_http1", name, o + data)


def gen_h2():
    start = backend(SMALL_XRAY, USERS)
    sync_users = users_msg(USERS)
    ch = [chunk(USERS[:1], 0, False), chunk(USERS[1:], 1, True)]
    # o0: bits 0-2 REST mode, bit 3 custom errors, bit 4 echo gRPC, bit 5 defer,
    #     bits 6-7 write size; o1: bits 0-1 the end
    E = 0x10
    seeds = {
        "pg_base_info": (opt(PG, 0), START + grpc_call(1, svc("GetBaseInfo"), [b""])),
        "pg_start": (opt(PG, 0), START + grpc_call(1, svc("Start"), [start])),
        "pg_start_v2ray": (opt(PG, 0), START + grpc_call(1, svc("Start"), [
            backend(panel("panel_v2ray.json"), USERS)])),
        "pg_start_bad_type": (opt(PG, 0), START + grpc_call(1, svc("Start"), [
            backend(b"{}", btype=1)])),
        "pg_guarded": (opt(PG, 0), START + grpc_call(1, svc("GetStats"), [stat_request("x")]) +
                       grpc_call(3, svc("SyncUser"), [USERS[0], USERS[1]]) +
                       grpc_call(5, svc("SyncUsers"), [sync_users]) +
                       grpc_call(7, svc("SyncUsersChunked"), ch) +
                       grpc_call(9, svc("GetLogs"), [b""]) +
                       grpc_call(11, svc("Stop"), [b""])),
        "pg_latency": (opt(PG, 0), START + grpc_call(1, svc("GetOutboundsLatency"),
                                                     [f_bytes(1, "DIRECT")])),
        "pg_auth": (opt(PG, 0), START + grpc_call(1, svc("GetBaseInfo"), [b""], key=None) +
                    grpc_call(3, svc("GetBaseInfo"), [b""], key=b"bad") +
                    grpc_call(5, svc("Nope"), [b""]) +
                    grpc_call(7, "/other.Service/X", [b""])),
        "pg_rest": (opt(PG, 0), START + rest_h2(1, "GET", "/info") +
                    rest_h2(3, "POST", "/start", start) +
                    rest_h2(5, "PUT", "/users/sync/chunked", framed_chunks(ch))),
        "echo_unary_plans": (opt(E, 0), START + grpc_call(1, "/fuzz.Echo/Unary", [b"\x00now"]) +
                             grpc_call(3, "/fuzz.Echo/Unary", [b"\x01later"]) +
                             grpc_call(5, "/fuzz.Echo/Unary", [b"\x02\x05bad \xff%text"]) +
                             grpc_call(7, "/fuzz.Echo/Unary", [b"\x03never"])),
        "echo_server_stream": (opt(E, 0), START + grpc_call(1, "/fuzz.Echo/Server", [b"hi"])),
        "echo_client_stream": (opt(E, 0), START + grpc_call(1, "/fuzz.Echo/Client",
                                                            [b"a", b"b", b"c"])),
        "echo_client_refused": (opt(E, 0), START + grpc_call(1, "/fuzz.Echo/Client",
                                                             [b"a", b"\xff", b"c"])),
        "echo_deny": (opt(E, 0), START + grpc_call(1, "/fuzz.Echo/Unary", [b"x"],
                                                   extra=[("x-deny", "1")])),
        "echo_deadline": (opt(E, 3), START + frame(HEADERS, END_HEADERS, 1, grpc_headers(
            "/fuzz.Echo/Unary", extra=[("grpc-timeout", "1m")])) +
            frame(DATA, 0, 1, grpc_frame(b"\x00abc")[:4])),
        "echo_bad_timeout": (opt(E, 0), START + grpc_call(1, "/fuzz.Echo/Unary", [b"\x00"],
                                                          extra=[("grpc-timeout", "12x")])),
        "echo_too_big": (opt(E, 0), START + frame(HEADERS, END_HEADERS, 1,
                                                  grpc_headers("/fuzz.Echo/Unary")) +
                         frame(DATA, 0, 1, grpc_frame(b"abc", length=70000))),
        "echo_compressed": (opt(E, 0), START + frame(HEADERS, END_HEADERS, 1,
                                                     grpc_headers("/fuzz.Echo/Unary")) +
                            frame(DATA, END_STREAM, 1, grpc_frame(b"abc", flags=1))),
        "echo_get_method": (opt(E, 0), START + frame(HEADERS, END_HEADERS | END_STREAM, 1, hpack(
            [(":method", "GET"), (":scheme", "http"), (":path", "/fuzz.Echo/Unary"),
             (":authority", "x"), ("content-type", "application/grpc")]))),
        "echo_rst_held": (opt(E | HOLD, 0), START +
                          grpc_call(1, "/fuzz.Echo/Unary", [b"\x03never"]) +
                          frame(RST, 0, 1, struct.pack(">I", 8))),
        "continuation": (opt(E, 0), START + frame(HEADERS, 0, 1, grpc_headers(
            "/fuzz.Echo/Unary")[:20]) + frame(CONT, END_HEADERS, 1, grpc_headers(
                "/fuzz.Echo/Unary")[20:]) + frame(DATA, END_STREAM, 1, grpc_frame(b"\x00"))),
        "rest_modes": (opt(MIXED, 2), START + rest_h2(1, "GET", "/a") + rest_h2(3, "GET", "/b") +
                       rest_h2(5, "POST", "/c", b"body") + rest_h2(7, "GET", "/d") +
                       rest_h2(9, "GET", "/e?a=1")),
        "rest_too_big": (opt(ECHO | 0x08, 0), START + frame(HEADERS, END_HEADERS, 1, hpack(
            [(":method", "POST"), (":scheme", "http"), (":path", "/up"), (":authority", "x"),
             ("content-length", "100000")])) + frame(DATA, 0, 1, b"x" * 100)),
        "rest_big_header": (opt(ECHO, 0), START + rest_h2(1, "GET", "/", extra=[
            ("x-pad", "p" * 9000)])),
        "control_frames": (opt(STREAM, 1), START + frame(PING, 0, 0, b"12345678") +
                           frame(WINDOW, 0, 0, struct.pack(">I", 1000)) +
                           rest_h2(1, "GET", "/s") + frame(WINDOW, 0, 1, struct.pack(">I", 5)) +
                           frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0))),
        "small_writes": (opt(LATER | 0x40 | 0x20, 2), START + rest_h2(1, "GET", "/a") +
                         grpc_call(3, svc("GetBaseInfo"), [b""])),
    }
    for name, (o, data) in seeds.items():
        write("fuzz_h2", name, o + data)


def gen_grpc_decoder():
    msgs = grpc_frame(b"hello") + grpc_frame(b"") + grpc_frame(b"x" * 300)
    write("fuzz_grpc_decoder", "three_whole", bytes([3]) + msgs)
    write("fuzz_grpc_decoder", "three_split", bytes([3 | (3 << 2)]) +
          struct.pack(">HHH", 2, 7, 100) + msgs)
    write("fuzz_grpc_decoder", "too_big", bytes([1 | (1 << 2)]) + struct.pack(">H", 3) +
          grpc_frame(b"a" * 17))
    write("fuzz_grpc_decoder", "compressed", bytes([2]) + grpc_frame(b"abc", flags=1))
    write("fuzz_grpc_decoder", "timeout", bytes([0]) + b"100m")


def gen_proto_msgs():
    seeds = {
        "backend": (0, backend(SMALL_XRAY, USERS, exclude=["b"])),
        "backend_v2ray": (8, backend(panel("panel_v2ray.json"), USERS, exclude=["ss-in"])),
        "stat": (1, stat_request("1.alice", True, 5)),
        "user": (2, USERS[0]),
        "users": (3, users_msg(USERS + [USERS[0]])),
        "chunk": (4, chunk(USERS, 0, True)),
        "latency": (5, f_bytes(1, "DIRECT")),
    }
    for name, (o, data) in seeds.items():
        write("fuzz_proto_msgs", name, bytes([o]) + data)


def gen_chunks():
    c0, c1, c2 = chunk(USERS[:1], 0, False), chunk(USERS[1:2], 1, False), chunk(USERS[2:], 2, True)
    write("fuzz_chunks", "in_order", framed_chunks([c0, c1, c2]))
    write("fuzz_chunks", "out_of_order", framed_chunks([c2, c0, c1]))
    write("fuzz_chunks", "same_index", framed_chunks([c0, chunk(USERS[1:], 0, False), c1, c2]))
    write("fuzz_chunks", "missing_index", framed_chunks([c0, c2]))
    write("fuzz_chunks", "no_last", framed_chunks([c0, c1]))
    write("fuzz_chunks", "trailing", framed_chunks([chunk(USERS, 0, True)]) + b"\xff\xff")
    write("fuzz_chunks", "empty_frames", b"\x00\x00" + framed_chunks([chunk(USERS, 0, True)]))


def gen_coreconf():
    xray, v2 = panel("panel_xray.json"), panel("panel_v2ray.json")
    # opt: bits 0-1 core (xray, xray 26, v2ray, xray 1.8), bit 2 users, bit 3 exclude,
    #      bit 4 metrics, bit 5 local addresses
    write("fuzz_coreconf", "xray_full", bytes([0 | 4 | 8 | 16 | 32]) + xray)
    write("fuzz_coreconf", "xray_new", bytes([1 | 4]) + xray)
    write("fuzz_coreconf", "xray_old", bytes([3 | 4 | 16]) + xray)
    write("fuzz_coreconf", "v2ray_full", bytes([2 | 4 | 8]) + v2)
    write("fuzz_coreconf", "small_users", bytes([0 | 4]) + SMALL_XRAY)
    write("fuzz_coreconf", "small_v2ray", bytes([2 | 4]) + SMALL_XRAY)
    write("fuzz_coreconf", "routing", bytes([0 | 4]) + (
        b'{"inbounds":[{"tag":"in","protocol":"trojan","port":443,"settings":{}}],'
        b'"routing":{"rules":[{"type":"field","ip":["geoip:private"],"outboundTag":"BLOCK"},'
        b'{"type":"field","domain":["geosite:x","full:a.b","regexp:.*"],"outboundTag":"x"}]},'
        b'"observatory":{"subjectSelector":["a"]},"metrics":{"tag":"m"},'
        b'"outbounds":[{"protocol":"blackhole","tag":"BLOCK"},{"protocol":"dns","tag":"d"}]}'))
    write("fuzz_coreconf", "not_object", bytes([0]) + b'[1,2,"x"]')
    write("fuzz_coreconf", "bad_json", bytes([0]) + b'{"inbounds": [}')


def gen_env():
    write("fuzz_env", "plain", b"API_KEY=5f0b9a52-2b6c-4f3e-9d43-1c1b6f1e2a77\nNODE_HOST=0.0.0.0\n")
    write("fuzz_env", "forms", b"# comment\n\nexport FZ_A=1\nFZ_B = 'single # kept'\n"
          b"FZ_C=\"double \\\"q\\\" \\n \\t \\\\ \\x\" # after\nFZ_D=bare value # cut\r\n"
          b"FZ_E=\nFZ_A=again\n")
    write("fuzz_env", "bad_name", b"1BAD=x\n")
    write("fuzz_env", "no_eq", b"JUSTTEXT\n")
    write("fuzz_env", "unterminated", b"FZ_X=\"open\nFZ_Y='also\n")
    write("fuzz_env", "nul", b"FZ_N=a\x00b\n")


def ws_frame(opcode, payload=b"", fin=True, mask=b"\x11\x22\x33\x44", rsv=0, length=None):
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def gen_ws():
    TEXT, BIN, CLOSE, PING, PONG, CONT_ = 1, 2, 8, 9, 10, 0
    upgrade = (b"GET /logs HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    # opt[0]: bit 0 raw, bits 1-2 write size, bit 3 defer, bit 4 talk, bit 5 server close,
    #         bit 6 shutdown, bit 7 client EOF; opt[1]: close code
    seeds = {
        "text_and_close": (opt(0x10, 0), ws_frame(TEXT, b"hello") +
                           ws_frame(CLOSE, struct.pack(">H", 1000) + b"bye")),
        "ping_pong": (opt(0x10, 0), ws_frame(PING, b"p") + ws_frame(PONG, b"q") +
                      ws_frame(BIN, b"\x00\x01")),
        "fragmented": (opt(0x02, 0), ws_frame(TEXT, b"frag", fin=False) +
                       ws_frame(PING, b"mid") + ws_frame(CONT_, b"ment")),
        "server_closes": (opt(0x30, 1), ws_frame(TEXT, b"x")),
        "server_bad_code": (opt(0x30, 5), ws_frame(TEXT, b"x")),
        "too_big": (opt(0x00, 0), ws_frame(BIN, b"abc", length=70000)),
        "unmasked": (opt(0x00, 0), ws_frame(TEXT, b"plain", mask=None)),
        "bad_utf8": (opt(0x00, 0), ws_frame(TEXT, b"\xff\xfe")),
        "rsv_bits": (opt(0x00, 0), ws_frame(TEXT, b"r", rsv=4)),
        "close_bad_code": (opt(0x00, 0), ws_frame(CLOSE, struct.pack(">H", 1005))),
        "shutdown": (opt(0x50, 0), ws_frame(TEXT, b"a")),
        "eof": (opt(0x88, 0), ws_frame(TEXT, b"a", fin=False)),
        "raw_upgrade_and_frames": (opt(0x01, 0), upgrade + ws_frame(TEXT, b"hi")),
        "raw_not_upgrade": (opt(0x01, 0), b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"),
        "raw_bad_key": (opt(0x01, 0), upgrade.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short")),
        "raw_http10": (opt(0x01, 0), upgrade.replace(b"HTTP/1.1", b"HTTP/1.0")),
        "raw_pipelined": (opt(0x05, 0), b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + upgrade +
                          ws_frame(TEXT, b"after")),
    }
    for name, (o, data) in seeds.items():
        write("fuzz_ws", name, o + data)


def gen_mzconf():
    d = os.path.join(ROOT, "tests", "data", "mzconf")
    # opt: bits 0-1 INBOUNDS filter, bit 2 internal API inbound, bit 3 IPv6 panel
    for i, name in enumerate(sorted(os.listdir(d)) if os.path.isdir(d) else []):
        with open(os.path.join(d, name), "rb") as f:
            data = f.read()
        stem = name.rsplit(".", 1)[0]
        write("fuzz_mzconf", stem, bytes([0]) + data)
        write("fuzz_mzconf", stem + "_filtered", bytes([1 | 4 | 8]) + data)
    write("fuzz_mzconf", "numbers", bytes([2]) + (
        b'{"log":{"loglevel":"none"},"n":[1.10,-0,1e400,123456789012345678901234567890,'
        b'-9223372036854775809,0.1e-5],"s":"\\u0001A\\u001fZ","inbounds":[{"tag":'
        b'"API_INBOUND","port":1},{"tag":"VMESS TCP","port":2.50}],"routing":{"rules":['
        b'{"inboundTag":["API_INBOUND"],"outboundTag":"API"}]}}'))
    write("fuzz_mzconf", "not_object", bytes([0]) + b'["x", 1.5]')
    write("fuzz_mzconf", "bad", bytes([0]) + b'{"a": 1.5e}')


MZ_SESSION = "8f14e45f-ceea-467f-a0e6-1b3c2d4e5f60"  # FZ_MZ_SESSION in fuzz_marzban.c


def mz_config(name):
    """A panel config of tests/data/mzconf with its test placeholders
    (@P1@ ports, @CERT@/@KEY@ PEM lines) filled in, compacted (smaller seeds)."""
    import json
    import re
    with open(os.path.join(ROOT, "tests", "data", "mzconf", name), "r") as f:
        text = f.read()
    text = re.sub(r"@P(\d+)@", lambda m: str(20000 + int(m.group(1))), text)
    text = text.replace("@CERT@", '"-----BEGIN CERTIFICATE-----","MIIB","-----END CERTIFICATE-----"')
    text = text.replace("@KEY@", '"-----BEGIN PRIVATE KEY-----","MIIE","-----END PRIVATE KEY-----"')
    return json.dumps(json.loads(text), separators=(",", ":"))


def mz(path, body=None, sid=MZ_SESSION, extra=(), method="POST", raw=None):
    """A Marzban request as the panel sends it: POST, a JSON body with
    session_id (and config, double-encoded) and Content-Type application/json.
    body None: no body; a dict: session_id added unless present; raw: bytes."""
    import json
    if raw is not None:
        data = raw
    elif body is None:
        data = b""
    else:
        b = dict(body)
        if "session_id" not in b and sid is not None:
            b["session_id"] = sid
        data = json.dumps(b, separators=(",", ":")).encode()
    ex = list(extra)
    if data:
        ex.append(("Content-Type", "application/json"))
    return h1(method, path, data, key=None, extra=ex)


def ws_upgrade(path):
    return h1("GET", path, key=None, extra=[
        ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")])


def gen_marzban():
    import json
    cfg = mz_config("panel_marzban.json")
    small = ('{"log":{"logLevel":"error"},"inbounds":[{"tag":"API_INBOUND","protocol":'
             '"dokodemo-door","port":62051},{"tag":"VMESS TCP","port":1.50,"protocol":"vmess"}],'
             '"routing":{"rules":[{"inboundTag":["API_INBOUND"],"outboundTag":"API"}]},'
             '"api":{"tag":"API"}}')
    # opt[0]: bit 0 session, bit 1 connect stops core, bits 2-3 write size, bit 4 defer,
    #         bit 5 backlog lines, bit 6 IPv6 peer, bit 7 INBOUNDS filter
    # opt[1]: bits 0-1 the end, bits 2-3 invalidate / end streams / live lines,
    #         bit 4 cut the connection at the first request
    S, STOPS, BYTE, B7, B300, DEFER, LINES, V6, FILTER = 1, 2, 4, 8, 12, 0x10, 0x20, 0x40, 0x80
    CRASH, NODE_STOP, LIVE = 4, 8, 12
    seeds = {
        "root": (opt(0, 0), mz("/")),
        "connect_ping": (opt(0, 0), mz("/connect") + mz("/ping", {}) + mz("/disconnect")),
        "takeover_stops": (opt(S | STOPS, 0), mz("/connect") + mz("/ping", {})),
        "disconnect_stops": (opt(S | STOPS, 0), mz("/disconnect", raw=b"{}")),
        "ping": (opt(S, 0), mz("/ping", {})),
        "ping_forms": (opt(S, 0), mz("/ping", sid=MZ_SESSION.upper(), body={}) +
                       mz("/ping", sid=MZ_SESSION.replace("-", ""), body={}) +
                       mz("/ping", sid="{" + MZ_SESSION + "}", body={}) +
                       mz("/ping", sid="urn:uuid:" + MZ_SESSION, body={})),
        "ping_errors": (opt(S, 0), mz("/ping", {"session_id": None}) +
                        mz("/ping", {"session_id": "zzz"}) + mz("/ping", {"session_id": 5}) +
                        mz("/ping", sid="2d3b3b8e-4c2f-4a4f-9e7d-0b1b2c3d4e5f", body={}) +
                        mz("/ping") + mz("/ping", raw=b"{") + mz("/ping", raw=b"[1]") +
                        mz("/ping", raw=b'"s"')),
        "ping_no_session": (opt(0, 0), mz("/ping", {})),
        "start": (opt(S, 0), mz("/start", {"config": cfg})),
        "start_small_v6": (opt(S | V6 | FILTER, 0), mz("/start", {"config": small})),
        "start_v2ray": (opt(S | FILTER, 0), mz("/start", {"config": mz_config("panel_v2ray.json")})),
        "start_errors": (opt(S, 0), mz("/start", {"config": "{"}) + mz("/start", {"config": 5}) +
                         mz("/start", {"config": "[]"}) + mz("/start", {"config": '"x"'}) +
                         mz("/start", {}) + mz("/start", {"session_id": None}) +
                         mz("/start", {"config": "{}"}, sid="2d3b3b8e-4c2f-4a4f-9e7d-0b1b2c3d4e5f")),
        "restart_stop": (opt(S, 0), mz("/restart", {"config": small}) + mz("/stop", {}) +
                         mz("/stop", {}) + mz("/restart", {"config": small})),
        "start_chunked": (opt(S | B300, 0), mz("/start", raw=chunked(json.dumps(
            {"session_id": MZ_SESSION, "config": small}).encode(), 50),
            extra=[("Transfer-Encoding", "chunked")])),
        "start_bytewise": (opt(S | BYTE | DEFER, 3), mz("/start", {"config": small})),
        "start_left": (opt(S | B7, 0x10), mz("/start", {"config": small})),
        "stop_left": (opt(S | STOPS | B7, 0x10 | 1), mz("/connect") + mz("/stop", {})),
        "methods": (opt(S, 0), mz("/", method="GET") + mz("/nope") + mz("/logs") +
                    mz("/ping", {}, method="PUT") + mz("/connect?x=1")),
        "too_big_header": (opt(S, 0), mz("/ping", {}, extra=[("X-Pad", "a" * 9000)])),
        "too_big_body": (opt(S, 0), b"POST /start HTTP/1.1\r\nHost: x\r\nContent-Length: 70000"
                         b"\r\n\r\n{"),
        "garbage": (opt(S, 0), b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"),
        "head_probe": (opt(0, 1), b"HEAD / HTTP/1.0\r\n\r\n"),
        "expect_continue": (opt(S, 0), mz("/ping", {}, extra=[("Expect", "100-continue")])),
        "logs": (opt(S | LINES, 0), ws_upgrade("/logs?session_id=" + MZ_SESSION) +
                 ws_frame(1, b"ignored") + ws_frame(8, struct.pack(">H", 1000))),
        "logs_interval": (opt(S | LINES, LIVE | 3), ws_upgrade(
            "/logs?session_id=" + MZ_SESSION + "&interval=0.7")),
        "logs_negative": (opt(S | LINES, LIVE), ws_upgrade(
            "/logs?interval=-1&session_id=" + MZ_SESSION.replace("-", "").upper())),
        "logs_crash": (opt(S | LINES, CRASH), ws_upgrade(
            "/logs?session_id=urn%3Auuid%3A" + MZ_SESSION + "&interval=")),
        "logs_node_stop": (opt(S | LINES | DEFER, NODE_STOP | 2), ws_upgrade(
            "/logs?session_id={" + MZ_SESSION + "}&interval=+1e-3+")),
        "logs_refused": (opt(S, 0), ws_upgrade("/logs") + ws_upgrade("/logs?session_id=zzz")),
        "logs_refused_iv": (opt(S, 0), ws_upgrade("/logs?session_id=%s&interval=abc" % MZ_SESSION)),
        "logs_refused_11": (opt(S, 0), ws_upgrade("/logs?session_id=%s&interval=11" % MZ_SESSION)),
        "logs_bad_key": (opt(S, 0), ws_upgrade("/logs?session_id=" + MZ_SESSION).replace(
            b"dGhlIHNhbXBsZSBub25jZQ==", b"short")),
    }
    for name, (o, data) in seeds.items():
        write("fuzz_marzban", name, o + data)


GZ_SESSION = "c4ca4238-a0b9-4382-8dcc-509a6f75849b"  # FZ_GZ_SESSION in fuzz_gozargah.c


def gz(method, path, body=b"", auth="Bearer " + GZ_SESSION, extra=()):
    ex = list(extra)
    if auth is not None:
        ex.insert(0, ("Authorization", auth))
    return h1(method, path, body, key=None, extra=ex)


def gen_gozargah():
    start = backend(SMALL_XRAY, USERS, exclude=["b"])
    sid = GZ_SESSION
    # opt[0]: bit 0 session, bit 1 session from another IP, bit 2 unverified client cert,
    #         bit 3 HTTP/2, bits 4-5 write size, bit 6 defer, bit 7 no core path at all
    # opt[1]: bits 0-1 the end, bit 2 cut the connection at the first REST request
    S, OTHER_IP, NO_CERT, H2, DEFER, NO_PATH = 1, 2, 4, 8, 0x40, 0x80
    auth = lambda v: [("authorization", v)]
    seeds = {
        "info": (opt(S, 0), gz("GET", "/info")),
        "info_forms": (opt(S, 0), gz("GET", "/info", auth="x " + sid.upper()) +
                       gz("GET", "/info", auth="Bearer " + sid.replace("-", "")) +
                       gz("GET", "/info", auth="Bearer {" + sid + "}") +
                       gz("GET", "/info", auth="Bearer urn:uuid:" + sid)),
        "errors": (opt(S, 0), gz("GET", "/info", auth=None) + gz("GET", "/info", auth="Bearer") +
                   gz("GET", "/info", auth="Bearer  " + sid) + gz("GET", "/info", auth="Bearer x") +
                   gz("GET", "/info", auth="Bearer 2d3b3b8e-4c2f-4a4f-9e7d-0b1b2c3d4e5f") +
                   gz("GET", "/info", auth="")),
        "no_session": (opt(0, 0), gz("GET", "/info") + gz("GET", "/stats")),
        "other_ip": (opt(S | OTHER_IP, 0), gz("GET", "/info")),
        "no_cert": (opt(S | NO_CERT, 0), gz("POST", "/start", start)),
        "start": (opt(0, 0), gz("POST", "/start", start, auth=None,
                                extra=[("Content-Type", "application/x-protobuf")])),
        "start_no_path": (opt(NO_PATH, 0), gz("POST", "/start", start, auth=None)),
        "start_bad": (opt(S, 0), gz("POST", "/start", b"\xff\xff") +
                      gz("POST", "/start", backend(b"{", USERS)) +
                      gz("POST", "/start", backend(b"{}", btype=1))),
        "start_v2ray": (opt(S, 0), gz("POST", "/start", backend(panel("panel_v2ray.json"), USERS))),
        "routes": (opt(S, 0), gz("GET", "/stats/latency", stat_request("x")) +
                   gz("PUT", "/stop") + gz("GET", "/logs", extra=[("Accept",
                                                                    "application/x-protobuf")]) +
                   gz("GET", "/nope") + gz("POST", "/info") + gz("PUT", "/users/sync") +
                   gz("GET", "/stats/system")),
        "bytewise": (opt(S | 0x10 | DEFER, 3), gz("GET", "/info")),
        "start_left": (opt(0x20, 4), gz("POST", "/start", start, auth=None)),
        "h2_start_left": (opt(H2 | 0x30, 4 | 1), START + rest_h2(1, "POST", "/start", start,
                                                                  key=None)),
        "h2_info": (opt(S | H2, 0), START + grpc_call(
            1, svc("GetBaseInfo"), [b""], key=None, extra=auth("Bearer " + sid))),
        "h2_auth_errors": (opt(S | H2, 0), START +
                           grpc_call(1, svc("GetBaseInfo"), [b""], key=None) +
                           grpc_call(3, svc("GetBaseInfo"), [b""], key=None,
                                     extra=auth("bearer " + sid)) +
                           grpc_call(5, svc("GetBaseInfo"), [b""], key=None,
                                     extra=auth("Bearer x")) +
                           grpc_call(7, svc("GetBaseInfo"), [b""], key=None,
                                     extra=auth("Bearer " + "x" * 45)) +
                           grpc_call(9, svc("GetBaseInfo"), [b""], key=None,
                                     extra=auth("Bearer " + sid.replace("c", "g"))) +
                           grpc_call(11, svc("GetStats"), [stat_request("x")], key=None,
                                     extra=auth("Bearer 2d3b3b8e-4c2f-4a4f-9e7d-0b1b2c3d4e5f")) +
                           grpc_call(13, svc("Nope"), [b""], key=None)),
        "h2_start": (opt(H2, 0), START + grpc_call(1, svc("Start"), [start], key=None)),
        "h2_guarded": (opt(S | H2, 0), START +
                       grpc_call(1, svc("GetStats"), [stat_request("x")], key=None,
                                 extra=auth("Bearer " + sid)) +
                       grpc_call(3, svc("SyncUser"), [USERS[0]], key=None,
                                 extra=auth("Bearer " + sid)) +
                       grpc_call(5, svc("GetOutboundsLatency"), [f_bytes(1, "DIRECT")], key=None,
                                 extra=auth("Bearer " + sid))),
        "h2_rest": (opt(S | H2, 0), START + rest_h2(1, "GET", "/info", key=None,
                                                    extra=auth("Bearer " + sid))),
        "h2_no_session": (opt(H2, 0), START + grpc_call(1, svc("GetBaseInfo"), [b""], key=None,
                                                        extra=auth("Bearer " + sid))),
    }
    for name, (o, data) in seeds.items():
        write("fuzz_gozargah", name, o + data)


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    gen_http1()
    gen_h2()
    gen_grpc_decoder()
    gen_proto_msgs()
    gen_chunks()
    gen_coreconf()
    gen_env()
    gen_ws()
    gen_mzconf()
    gen_marzban()
    gen_gozargah()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print("wrote %s (%d bytes)" % (OUT, total), file=sys.stderr)


if __name__ == "__main__":
    main()
