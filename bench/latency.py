"""A TCP proxy that delays every byte by a fixed time in each direction, keeping order.

This kernel has no ``tc netem``, so wide-area latency is emulated in user space: bytes read
from one side are held until ``delay`` has passed since they arrived, then written to the
other side. Bandwidth is not limited; a request/response pair costs two delays, one round
trip. Run it inside the network namespace of the daemon it fronts:

    python bench/latency.py --listen 127.0.0.1:8001 --to 127.0.0.1:8000 --delay-ms 10

It prints ``ready`` on stdout once listening and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import deque

PIECE = 256 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each piece written ``delay`` after it was read."""
    queue: deque[tuple[float, bytes]] = deque()
    arrived = asyncio.Event()
    done = False

    async def read() -> None:
        nonlocal done
        try:
            while data := await reader.read(PIECE):
                queue.append((time.monotonic() + delay, data))
                arrived.set()
        finally:
            done = True
            arrived.set()

    async def write() -> None:
        while True:
            while not queue:
                if done:
                    return
                arrived.clear()
                await arrived.wait()
            due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, delay))

    server = await asyncio.start_server(handle, *listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, type=_address, help="HOST:PORT to accept on")
    p.add_argument("--to", required=True, type=_address, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="added delay in each direction")
    args = p.parse_args()
    try:
        asyncio.run(_serve(args.listen, args.to, args.delay_ms / 1000))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
