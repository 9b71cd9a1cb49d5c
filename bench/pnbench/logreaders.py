"""GetLogs readers for the log benchmark, run as their own process:
N gRPC GetLogs streams to the node over TLS + HTTP/2 (python-h2 on raw
sockets, one selector loop), each counting the gRPC messages (one per log
line) it receives. Prints "ready" once every stream has its response
headers, then after `seconds` one JSON line: per reader the cumulative
message count sampled over time (CLOCK_MONOTONIC, shared with the parent).

  python3 -m pnbench.logreaders PORT API_KEY SECONDS N"""
import json
import selectors
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events


class Reader:
    def __init__(self, port, key):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 << 20)
        self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.sid, [
            (":method", "POST"), (":scheme", "https"), (":authority", f"127.0.0.1:{port}"),
            (":path", "/service.NodeService/GetLogs"), ("content-type", "application/grpc"),
            ("te", "trailers"), ("x-api-key", key)])
        self.conn.send_data(self.sid, b"\0\0\0\0\0", end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.count = 0
        self.headers = False
        self.ended = False
        self.samples = []

    def on_readable(self):
        while True:
            try:
                data = self.sock.recv(262144)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            if not data:
                self.ended = True
                break
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.headers = True
                elif isinstance(ev, h2.events.DataReceived):
                    self.buf += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset,
                                     h2.events.ConnectionTerminated)):
                    self.ended = True
            self._parse()
            out = self.conn.data_to_send()
            if out:
                self.sock.setblocking(True)
                self.sock.sendall(out)
                self.sock.setblocking(False)

    def _parse(self):
        b, i, n = self.buf, 0, len(self.buf)
        while n - i >= 5:
            ln = int.from_bytes(b[i + 1:i + 5], "big")
            if n - i < 5 + ln:
                break
            i += 5 + ln
            self.count += 1
        if i:
            del b[:i]


def main():
    port, key, secs, n = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    secs = min(secs, 300.0)
    readers = [Reader(port, key) for _ in range(n)]
    sel = selectors.DefaultSelector()
    for r in readers:
        sel.register(r.sock, selectors.EVENT_READ, r)
    deadline = time.monotonic() + 10
    announced = False
    t_end = time.monotonic() + secs
    last_sample = 0.0
    while time.monotonic() < t_end:
        for key_, _ in sel.select(timeout=0.05):
            key_.data.on_readable()
        now = time.monotonic()
        if not announced and all(r.headers for r in readers):
            print("ready", flush=True)
            announced = True
        if not announced and now > deadline:
            print("error: GetLogs streams got no response headers in 10 s", flush=True)
            return 1
        if now - last_sample >= 0.01:
            last_sample = now
            for r in readers:
                if not r.samples or r.samples[-1][1] != r.count:
                    r.samples.append((now, r.count))
        if all(r.ended for r in readers):
            break
    for r in readers:
        r.sock.close()
    print(json.dumps({"readers": [{"count": r.count, "samples": r.samples, "ended": r.ended}
                                  for r in readers]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
