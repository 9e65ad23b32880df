#!/usr/bin/env python3
"""A slow stand-in for `ringlb-load` (same CLI and JSON contract), used only to
test the harness plumbing without the Rust tool:

    python3 bench/run.py --bin-dir bench/dev --quick ...

(bench/dev/ringlb-load is a wrapper script that runs this file.) Its numbers
mean nothing: it is pure-Python asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import resource
import struct
import sys
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def parse_dur(s: str) -> float:
    m = re.fullmatch(r"([\d.]+)(ms|s|m)?", s)
    v = float(m.group(1))
    return v / 1000 if m.group(2) == "ms" else v * 60 if m.group(2) == "m" else v


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(KiB|MiB|B)?", str(s))
    return int(m.group(1)) * {"KiB": 1024, "MiB": 1 << 20}.get(m.group(2) or "B", 1)


async def read_frame(r: asyncio.StreamReader):
    h = await r.readexactly(2)
    op = h[0] & 0x0F
    ln = h[1] & 0x7F
    masked = h[1] & 0x80
    if ln == 126:
        ln = struct.unpack("!H", await r.readexactly(2))[0]
    elif ln == 127:
        ln = struct.unpack("!Q", await r.readexactly(8))[0]
    mask = await r.readexactly(4) if masked else None
    data = await r.readexactly(ln)
    if mask:
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data)) if ln < 4096 else _unmask(data, mask)
    return op, data


def _unmask(data, mask):
    n = len(data)
    m = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ m).to_bytes(n, "big")


def frame(op: int, data: bytes, mask: bool) -> bytes:
    n = len(data)
    b0 = 0x80 | op
    mbit = 0x80 if mask else 0
    if n < 126:
        h = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        h = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        h = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask:
        k = b"\x00\x00\x00\x00"  # zero mask: valid, and XOR is a no-op
        return h + k + data
    return h + data


# ----------------------------------------------------------------- echo

async def echo_conn(r, w):
    try:
        req = await r.readuntil(b"\r\n\r\n")
        key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", req).group(1)
        acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
        while True:
            op, data = await read_frame(r)
            if op == 8:
                w.write(frame(8, data[:2], False))
                await w.drain()
                break
            if op == 9:
                w.write(frame(10, data, False))
            elif op in (1, 2):
                w.write(frame(op, data, False))
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError, AttributeError, asyncio.LimitOverrunError):
        pass
    finally:
        w.close()


async def echo_main(a):
    servers = []
    for addr in a.listen:
        host, port = addr.rsplit(":", 1)
        s = await asyncio.start_server(echo_conn, host, int(port), backlog=4096, limit=1 << 22)
        servers.append(s)
        print(f"listening {host}:{s.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


# ----------------------------------------------------------------- client

class Stats:
    def __init__(self):
        self.lat = []
        self.hs = []
        self.messages = 0
        self.bytes = 0
        self.errors = {}
        self.opened = self.failed = 0

    def err(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def connect(url, st: Stats):
    m = re.match(r"ws://([^:/]+):(\d+)(/.*)?", url)
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection(m.group(1), int(m.group(2)), limit=1 << 22)
    key = base64.b64encode(os.urandom(16))
    w.write(b"GET " + (m.group(3) or "/").encode() + b" HTTP/1.1\r\nHost: " + m.group(1).encode() +
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
    resp = await r.readuntil(b"\r\n\r\n")
    if b" 101 " not in resp.split(b"\r\n", 1)[0]:
        w.close()
        raise ConnectionError("handshake status " + resp.split(b"\r\n", 1)[0].decode())
    st.hs.append((time.perf_counter() - t0) * 1e6)
    st.opened += 1
    return r, w


async def close(r, w):
    try:
        w.write(frame(8, b"\x03\xe8", True))
        await w.drain()
        await asyncio.wait_for(read_frame(r), 2)
    except Exception:
        pass
    w.close()


def pct(v, p):
    if not v:
        return 0
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p / 100))]


def latsum(v):
    if not v:
        return {"count": 0, "mean": 0, "p50": 0, "p90": 0, "p99": 0, "p999": 0, "max": 0}
    return {"count": len(v), "mean": sum(v) / len(v), "p50": pct(v, 50), "p90": pct(v, 90),
            "p99": pct(v, 99), "p999": pct(v, 99.9), "max": max(v)}


async def client_main(a):
    st = Stats()
    mode = a.mode
    start = time.perf_counter()
    measure_start = start
    if mode in ("pingpong", "bulk", "rate"):
        size = parse_size(a.size)
        payload = b"x" * size
        warm = parse_dur(a.warmup) if getattr(a, "warmup", None) else 0
        dur = parse_dur(a.duration)
        t_meas = start + warm
        t_end = t_meas + dur
        measure_start = t_meas

        async def one(i):
            try:
                r, w = await connect(a.url, st)
            except Exception as e:
                st.failed += 1
                st.err(type(e).__name__)
                return
            interval = a.connections / a.rate if mode == "rate" else 0
            nxt = time.perf_counter()
            try:
                while True:
                    now = time.perf_counter()
                    if now >= t_end:
                        break
                    if interval:
                        if now < nxt:
                            await asyncio.sleep(nxt - now)
                        sched = nxt
                        nxt += interval
                    else:
                        sched = time.perf_counter()
                    w.write(frame(2, payload, True))
                    got = 0
                    while got < size:
                        op, d = await read_frame(r)
                        got += len(d)
                    done = time.perf_counter()
                    if sched >= t_meas and done <= t_end:
                        st.messages += 1
                        st.bytes += 2 * size
                        st.lat.append((done - sched) * 1e6)
                await close(r, w)
            except Exception as e:
                st.err(type(e).__name__)
        await asyncio.gather(*(one(i) for i in range(a.connections)))
        elapsed = dur
    elif mode == "http":
        m = re.match(r"http://([^:/]+):(\d+)(/.*)?", a.url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
        req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        warm = parse_dur(a.warmup)
        dur = parse_dur(a.duration)
        t_meas = start + warm
        t_end = t_meas + dur
        st.codes, st.reconnects = {}, 0

        async def one(i):
            first = True
            while time.perf_counter() < t_end:
                try:
                    r, w = await asyncio.open_connection(host, port, limit=1 << 22)
                except Exception as e:
                    if first:
                        st.failed += 1
                    st.err(type(e).__name__)
                    return
                st.hs.append(0.0)
                if first:
                    st.opened += 1
                else:
                    st.reconnects += 1
                first = False
                try:
                    while time.perf_counter() < t_end:
                        t0 = time.perf_counter()
                        w.write(req)
                        head = await r.readuntil(b"\r\n\r\n")
                        code = int(head.split(b" ", 2)[1])
                        ln = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                        body = await r.readexactly(ln)
                        done = time.perf_counter()
                        if t_meas <= done <= t_end:
                            st.messages += 1
                            st.bytes += len(body)
                            st.lat.append((done - t0) * 1e6)
                            st.codes[str(code)] = st.codes.get(str(code), 0) + 1
                        if a.expect_length is not None and len(body) != int(a.expect_length):
                            st.err("body_length")
                        if re.search(rb"(?i)connection:\s*close", head):
                            break
                except Exception as e:
                    st.err(type(e).__name__)
                    w.close()
                    return
                w.close()
            st.alive = getattr(st, "alive", 0) + 1
        await asyncio.gather(*(one(i) for i in range(a.connections)))
        elapsed = dur
    elif mode == "handshake":
        todo = list(range(a.total))

        async def worker():
            while todo:
                todo.pop()
                try:
                    r, w = await connect(a.url, st)
                    await close(r, w)
                except Exception as e:
                    st.failed += 1
                    st.err(type(e).__name__)
        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        elapsed = time.perf_counter() - start
    elif mode == "idle":
        conns = []
        sem = asyncio.Semaphore(200)

        async def op():
            async with sem:
                try:
                    conns.append(await connect(a.url, st))
                except Exception as e:
                    st.failed += 1
                    st.err(type(e).__name__)
        await asyncio.gather(*(op() for _ in range(a.connections)))
        print(f"opened {len(conns)}", file=sys.stderr, flush=True)
        await asyncio.sleep(parse_dur(a.hold))
        alive = 0
        for r, w in conns:
            try:
                w.write(frame(2, b"ping", True))
                await asyncio.wait_for(read_frame(r), 5)
                alive += 1
            except Exception as e:
                st.err(type(e).__name__)
        st.alive = alive
        for r, w in conns:
            w.close()
        elapsed = time.perf_counter() - start
    ru = resource.getrusage(resource.RUSAGE_SELF)
    errs = sum(st.errors.values())
    res = {
        "tool": "fake_load.py", "mode": mode, "params": {k: v for k, v in vars(a).items() if k != "func"},
        "elapsed_s": elapsed, "messages": st.messages, "msgs_per_s": st.messages / elapsed if elapsed else 0,
        "bytes": st.bytes, "mb_per_s": st.bytes / elapsed / 1e6 if elapsed else 0,
        "latency_us": latsum(st.lat) if st.lat else None,
        "handshakes": len(st.hs), "handshakes_per_s": len(st.hs) / elapsed if elapsed else 0,
        "handshake_latency_us": latsum(st.hs) if st.hs else None,
        "connections": {"requested": getattr(a, "connections", getattr(a, "total", 0)), "opened": st.opened,
                        "failed": st.failed, "alive": getattr(st, "alive", None)},
        "errors": st.errors, "error_total": errs,
        "cpu_s": {"user": ru.ru_utime, "sys": ru.ru_stime},
    }
    if mode == "http":
        res.update({"requests": st.messages, "requests_per_s": res["msgs_per_s"],
                    "status_codes": st.codes, "reconnects": st.reconnects,
                    "server_closes": {"announced": st.reconnects, "unannounced": 0}})
    with open(a.json, "w") as f:
        json.dump(res, f)
    if getattr(a, "hist", None) and st.lat:
        with open(a.hist, "w") as f:
            f.write("kind,percentile,latency_us,count_at_or_below\n")
            for p in (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99):
                f.write(f"roundtrip,{p},{pct(st.lat, p)},0\n")
    return 1 if errs else 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--listen", action="append", required=True)
    for name in ("pingpong", "rate", "bulk"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--connections", type=int, default=10)
        p.add_argument("--size", default="64")
        p.add_argument("--duration", default="10s")
        p.add_argument("--warmup", default="0s")
        p.add_argument("--json", required=True)
        p.add_argument("--hist")
        p.add_argument("--binary", action="store_true")
        if name == "rate":
            p.add_argument("--rate", type=float, required=True)
    h = sub.add_parser("handshake")
    h.add_argument("--url", required=True)
    h.add_argument("--total", type=int, default=1000)
    h.add_argument("--concurrency", type=int, default=10)
    h.add_argument("--json", required=True)
    h = sub.add_parser("http")
    h.add_argument("--url", required=True)
    h.add_argument("--connections", type=int, default=10)
    h.add_argument("--duration", default="10s")
    h.add_argument("--warmup", default="0s")
    h.add_argument("--expect-length")
    h.add_argument("--json", required=True)
    h.add_argument("--hist")
    i = sub.add_parser("idle")
    i.add_argument("--url", required=True)
    i.add_argument("--connections", type=int, default=100)
    i.add_argument("--hold", default="10s")
    i.add_argument("--json", required=True)
    i.add_argument("--procs", type=int, default=1)
    a = ap.parse_args()
    if a.mode == "echo":
        asyncio.run(echo_main(a))
        return 0
    return asyncio.run(client_main(a))


if __name__ == "__main__":
    sys.exit(main())
