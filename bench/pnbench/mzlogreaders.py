"""Marzban /logs subscribers for the marzban suite, run as their own process:
N WebSocket streams to wss://127.0.0.1:PORT/logs?session_id=SID[&interval=I]
(python3-websockets, one asyncio loop) with the panel's client certificate
and no server verification, as the panel's log viewer connects. Each
subscriber keeps every line it receives (a frame with an interval holds
several `\\n`-ended lines) with its arrival time (CLOCK_MONOTONIC, shared
with the parent). Prints "ready" once every stream is open. The parent
writes T0 (the monotonic time its generator started) to stdin once the
generator has finished; a subscriber then reads on until its stream has
been quiet for QUIET s (+ the interval), or MAX_SECONDS after "ready" at
the latest. Prints one JSON line: per subscriber the lines that arrived
after T0, how many of them are access lines (" accepted ": one per proxied
connection), the time of the last one, the frames, and how many of the
lines any subscriber got after T0 it lacks.

  python3 -m pnbench.mzlogreaders PORT SID CERT KEY MAX_SECONDS N [INTERVAL]"""
import asyncio
import collections
import json
import ssl
import sys
import time

import websockets
import websockets.exceptions

QUIET = 1.0


class Sub:
    def __init__(self):
        self.lines = []  # (arrival time, text)
        self.frames = 0
        self.closed = None
        self.ws = None


async def _open(uri, ctx):
    return await websockets.connect(uri, ssl=ctx, open_timeout=10, ping_interval=None,
                                    compression=None, max_size=None, max_queue=None,
                                    close_timeout=1)


async def _read(sub, t_end, interval, done):
    batched = bool(interval)
    quiet = QUIET + (interval or 0)
    last = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= t_end or (done.is_set() and now - last >= quiet):
            return
        try:
            msg = await asyncio.wait_for(sub.ws.recv(), min(0.2, t_end - now))
        except asyncio.TimeoutError:
            continue
        except websockets.exceptions.ConnectionClosed as e:
            sub.closed = f"{e.code} {e.reason}"
            return
        now = last = time.monotonic()
        sub.frames += 1
        if batched:
            for line in msg.split("\n")[:-1]:
                sub.lines.append((now, line))
        else:
            sub.lines.append((now, msg))


async def _main(port, sid, cert, key, secs, n, interval):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    uri = f"wss://127.0.0.1:{port}/logs?session_id={sid}"
    if interval:
        uri += f"&interval={interval}"
    subs = [Sub() for _ in range(n)]
    for s in subs:
        s.ws = await _open(uri, ctx)
    print("ready", flush=True)
    t_end = time.monotonic() + secs
    done = asyncio.Event()
    t0 = []

    async def wait_t0():
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip():  # EOF: the parent is gone
            t0.append(float(line))
        done.set()
    waiter = asyncio.ensure_future(wait_t0())
    await asyncio.gather(*(_read(s, t_end, float(interval or 0), done) for s in subs))
    if not t0:
        raise RuntimeError(f"no T0 from the parent within {secs} s")
    await waiter
    for s in subs:
        try:
            await asyncio.wait_for(s.ws.close(), 2)
        except (asyncio.TimeoutError, websockets.exceptions.WebSocketException, OSError):
            pass
    return subs, t0[0]


def main():
    port, sid, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    secs, n = min(float(sys.argv[5]), 300.0), int(sys.argv[6])
    interval = sys.argv[7] if len(sys.argv) > 7 and float(sys.argv[7]) > 0 else None
    try:
        subs, t0 = asyncio.run(_main(port, sid, cert, key, secs, n, interval))
    except Exception as e:  # the parent reports it
        print(f"error: {e.__class__.__name__}: {e}", flush=True)
        return 1
    live = [collections.Counter(text for t, text in s.lines if t >= t0) for s in subs]
    union = collections.Counter()
    for c in live:
        union |= c  # a line repeated k times counts k times
    out = []
    for s, c in zip(subs, live):
        after = [t for t, _ in s.lines if t >= t0]
        out.append({"count": sum(c.values()), "t_last": after[-1] if after else None,
                    "accepted": sum(k for text, k in c.items() if " accepted " in text),
                    "missing": sum((union - c).values()), "frames": s.frames,
                    "closed": s.closed, "all_lines": len(s.lines)})
    print(json.dumps({"subscribers": out, "union": sum(union.values())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
