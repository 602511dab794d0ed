"""What the mount's fetch latency (ChunkCache.latency, which gates sibling prefetch) is made of:
fetches of small chunks only, whose time is the store's round trip, not a transfer."""

from __future__ import annotations

import random

import trio
from faultstore import Fault, serve_faults

from tvixfs.fs.bridge import Bridge
from tvixfs.fs.chunkcache import LATENCY_CHUNK_MAX, ChunkCache
from tvixfs.services.backends.grpc import open_grpc_store
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import ChunkMeta

# Every Read message waits this long: no fetch, big or small, is faster.
SLOW = Fault("slow", methods=("blob.read",), delay=0.02, piece=1 << 20)


def test_only_small_fetches_are_timed() -> None:
    rng = random.Random(15)
    store = open_memory_store()
    big, small = rng.randbytes(LATENCY_CHUNK_MAX + 1), rng.randbytes(LATENCY_CHUNK_MAX // 8)
    chunks = {
        name: ChunkMeta(store.blobs.put([data]), len(data)) for name, data in (("big", big), ("small", small))
    }

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            cache = ChunkCache(Bridge(), remote.blobs, nursery, 1 << 20, 0)
            assert await cache.get(chunks["big"], check=True) == big
            assert cache.latency.seconds == 0.0  # the big chunk's fetch says nothing of the store
            assert await cache.get(chunks["small"], check=True) == small
            assert cache.latency.seconds > 0.0

    with serve_faults(store) as faults:
        faults.set(SLOW)
        remote = open_grpc_store(faults.target)
        try:
            trio.run(main)
            assert faults.stats()["calls"]["blob.read"] == 2
        finally:
            remote.close()
