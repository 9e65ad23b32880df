"""A permessage-deflate WebSocket peer for tests/clean_close.rs (Python
`websockets`, which negotiates permessage-deflate by default).

  deflate_peer.py server         echo backend; prints "listening PORT", then
                                 per session "backend-close CODE EXTENSIONS"
  deflate_peer.py client URL N   sends N compressible messages, checks each
                                 echo, prints "ready EXTENSIONS", then waits
                                 (at most 20 s) for the close and prints
                                 "client-close CODE MESSAGES"
"""
import asyncio
import sys

import websockets


def names(ws):
    return ",".join(e.name for e in ws.extensions) or "none"


async def server():
    async def handler(ws, _path=None):
        try:
            async for msg in ws:
                await ws.send(msg)
        except websockets.ConnectionClosed:
            pass
        print(f"backend-close {ws.close_code} {names(ws)}", flush=True)

    async with websockets.serve(handler, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        print(f"listening {port}", flush=True)
        await asyncio.sleep(60)


async def client(url, n):
    async with websockets.connect(url, max_size=None) as ws:
        for i in range(n):
            text = f"message {i} " + "compress me " * 500
            await ws.send(text)
            echo = await asyncio.wait_for(ws.recv(), 10)
            assert echo == text, f"echo {i} differs"
        print(f"ready {names(ws)}", flush=True)
        try:
            await asyncio.wait_for(ws.recv(), 20)
            print("client-close unexpected-message", flush=True)
            return
        except websockets.ConnectionClosed:
            pass
        print(f"client-close {ws.close_code} {n}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(server())
    else:
        asyncio.run(client(sys.argv[2], int(sys.argv[3])))
