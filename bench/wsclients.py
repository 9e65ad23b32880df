#!/usr/bin/env python3
"""WebSocket clients that hold sessions and reconnect when closed, as apps
do; for bench/rebalance.py. Standard library only.

    wsclients.py --port P --sessions N [--connect-rate R] [--jitter S]

Opens N sessions to 127.0.0.1:P (R new sessions a second at most, so the
start is no storm), keeps them open, and reconnects a session whenever it
ends (a Close frame or EOF), after a random pause of up to S seconds. Every
0.5 s prints one JSON line: seconds since start, cumulative connects (101
received), closes by ringlb (Close frames) and other ends, failed attempts,
and sessions open now. Runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import struct
import sys
import time


class Stats:
    def __init__(self):
        self.connects = 0
        self.close_frames = 0
        self.codes: dict[int, int] = {}
        self.eofs = 0
        self.failed = 0
        self.open = 0


def request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def close_reply(code: int) -> bytes:
    mask = os.urandom(4)
    payload = struct.pack("!H", code)
    return bytes([0x88, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def session(port: int, st: Stats, jitter: float):
    while True:
        opened = False
        w = None
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(request(port))
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError("no 101")
            st.connects += 1
            st.open += 1
            opened = True
            while True:
                b0, b1 = await r.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await r.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", await r.readexactly(8))[0]
                payload = await r.readexactly(n)
                if b0 & 0x0F == 8:
                    code = struct.unpack("!H", payload[:2])[0] if n >= 2 else 1005
                    st.close_frames += 1
                    st.codes[code] = st.codes.get(code, 0) + 1
                    w.write(close_reply(code))
                    await w.drain()
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            if opened:
                st.eofs += 1
            else:
                st.failed += 1
        finally:
            if opened:
                st.open -= 1
            if w is not None:
                w.close()
        await asyncio.sleep(random.uniform(0.0, jitter) if jitter > 0 else 0)


async def main(args):
    st = Stats()
    t0 = time.monotonic()

    async def report():
        while True:
            print(json.dumps({"t": round(time.monotonic() - t0, 3), "connects": st.connects,
                              "close_frames": st.close_frames, "codes": st.codes, "eofs": st.eofs,
                              "failed": st.failed, "open": st.open}), flush=True)
            await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(report())]
    gap = 1.0 / args.connect_rate
    for _ in range(args.sessions):
        tasks.append(asyncio.create_task(session(args.port, st, args.jitter)))
        await asyncio.sleep(gap)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, required=True)
    p.add_argument("--connect-rate", type=float, default=1000.0)
    p.add_argument("--jitter", type=float, default=0.1)
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
