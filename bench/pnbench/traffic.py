"""Raw VLESS connections (cores.md §12) to make the core create a user's
counters: header = version 0, 16-byte UUID, addons length 0, command 1 (TCP),
port (big-endian), address type 1, IPv4. One selector loop runs many
non-blocking client sockets and a loopback sink (the connections' target:
accepts, writes one byte, closes), bounded in count and time. Also a log-line
generator (__main__) for the GetLogs benchmark."""
import selectors
import socket
import struct
import time
import uuid

LINGER0 = struct.pack("ii", 1, 0)


def vless_header(uid, port, ip="127.0.0.1"):
    return (b"\0" + uuid.UUID(uid).bytes + b"\0\x01" + struct.pack(">H", port) + b"\x01"
            + socket.inet_aton(ip))


def touch_users(inbound_port, uids, concurrency=256, timeout=120.0, wait=True):
    """Opens one VLESS connection per uid to the inbound; the core dispatches
    it to the sink, the sink answers one byte and closes, the core relays its
    response header (so the user's counters exist), and the client resets the
    connection. A connection the core refuses (unknown user) ends with EOF or
    a reset. Returns (done, seconds). The core registers a user's counters
    when it dispatches that user's first connection."""
    sel = selectors.DefaultSelector()
    sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sink.bind(("127.0.0.1", 0))
    sink.listen(4096)
    sink.setblocking(False)
    sink_port = sink.getsockname()[1]
    sel.register(sink, selectors.EVENT_READ, "sink")
    todo = list(uids)
    todo.reverse()
    inflight = {}
    done = 0
    t0 = time.monotonic()
    deadline = t0 + timeout

    def finish(s):
        sel.unregister(s)
        s.close()
        del inflight[s]

    try:
        while (todo or inflight) and time.monotonic() < deadline:
            while todo and len(inflight) < concurrency:
                uid = todo.pop()
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
                try:
                    s.connect(("127.0.0.1", inbound_port))
                except BlockingIOError:
                    pass
                inflight[s] = [uid, False, time.monotonic()]
                sel.register(s, selectors.EVENT_WRITE, "client")
            for key, ev in sel.select(timeout=0.2):
                s = key.fileobj
                if key.data == "sink":
                    for _ in range(256):
                        try:
                            a, _ = s.accept()
                        except (BlockingIOError, OSError):
                            break
                        try:  # a graceful close: a reset could discard the byte
                            a.send(b"x")
                        except OSError:
                            pass
                        a.close()
                    continue
                st = inflight.get(s)
                if st is None:
                    continue
                if not st[1]:
                    try:
                        s.send(vless_header(st[0], sink_port) + b"ping")
                        st[1] = True
                        st[2] = time.monotonic()
                        sel.modify(s, selectors.EVENT_READ, "client")
                    except OSError:
                        finish(s)
                        todo.append(st[0])  # connect failed: retry
                    continue
                try:
                    s.recv(4096)  # the response header, EOF or a reset: either way, done
                except OSError:
                    pass
                finish(s)
                done += 1
            now = time.monotonic()
            for s, st in list(inflight.items()):  # bounded: a held connection is given up
                if now - st[2] > 5.0:
                    finish(s)
                    done += 1
    finally:
        for s in list(inflight):
            sel.unregister(s)
            s.close()
        sel.close()
        sink.close()
    return done, time.monotonic() - t0


def _generate(port, uids, seconds):
    """Log lines for the GetLogs benchmark: connections for `seconds`."""
    total = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        d, _ = touch_users(port, uids, concurrency=64, timeout=max(0.1, t_end - time.monotonic()))
        total += d
    return total


if __name__ == "__main__":
    import sys
    p, secs = int(sys.argv[1]), float(sys.argv[2])
    ids = sys.argv[3].split(",")
    n = _generate(p, ids, min(secs, 120.0))
    print(n, flush=True)
