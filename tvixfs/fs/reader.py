"""File contents: open a file, choose once how it is read, answer the kernel's reads.

At open the file's chunk map is learned (chunkmap.py: once per blob, cached by entries) and
one read strategy chosen for the handle, from the file and what the store declares
(``BlobCapabilities``):

- chunk by chunk through the mount's verified chunk cache (chunkreads.py, chunkcache.py): the
  default, and what the others fall back to;
- over a remote store, a file of several chunks: a long pass from its start switches to one
  whole-blob stream feeding the cache (wholeblob.py);
- over a store read in this process, a file of ``PASS_MIN`` or more: a sequential pass reads
  aligned blocks that answer the kernel's reads uncopied, bypassing the cache (sequential.py).

Every byte handed to the kernel has been checked against the digest it was read by; a read
that cannot be answered with checked bytes fails with EIO (see chunkcache.py). A mount with trusted keys also
proves each chunk list makes up its blob, one whole-blob read at first open (chunkproof.py).
"""

from __future__ import annotations

from typing import cast

import trio
from cachetools import LRUCache

from tvixfs import defaults
from tvixfs.castore.nodes import FileNode
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.chunkcache import DEFAULT_CACHE_BYTES, ChunkCache, ReaderStats
from tvixfs.fs.chunkmap import ChunkMap, check_covers, fetch_chunk_map, without_list
from tvixfs.fs.chunkproof import prove_chunk_list
from tvixfs.fs.chunkreads import ChunkReads
from tvixfs.fs.inflight import InFlight
from tvixfs.fs.sequential import Passes, PassReads
from tvixfs.fs.wholeblob import WholeBlobReads
from tvixfs.services.base import BlobService

__all__ = ["DEFAULT_CACHE_BYTES", "BlobReader", "OpenFile", "ReaderStats"]

READAHEAD_BYTES = 4 << 20
CHUNK_MAP_CHUNKS = 1 << 20  # chunk list entries kept, over all cached chunk maps
# Files of a local store of this size or more are read by sequential passes (sequential.py);
# smaller ones, whose chunks other files and handles may share, go through the cache.
PASS_MIN = 16 << 20


class OpenFile:
    """One open file handle: the file, where it was reached from, and how it is read."""

    __slots__ = ("node", "origin", "reads")

    def __init__(self, node: FileNode, origin: bytes, reads: ChunkReads) -> None:
        self.node = node
        self.origin = origin
        self.reads = reads


class BlobReader:
    def __init__(
        self,
        bridge: Bridge,
        blobs: BlobService,
        background: trio.Nursery,
        cache_bytes: int = defaults.CACHE_BYTES,
        readahead_bytes: int = READAHEAD_BYTES,
        *,
        prove_chunk_lists: bool = False,
    ) -> None:
        """``prove_chunk_lists``: serve no byte of a chunked blob before its chunk list has been
        proven to make up the blob (chunkproof.py); the mount's trusted-keys mode."""
        self._bridge = bridge
        self._prove = prove_chunk_lists
        self._blobs = blobs
        self._chunks = ChunkCache(bridge, blobs, background, cache_bytes, readahead_bytes)
        self._maps: LRUCache[bytes, ChunkMap] = LRUCache(CHUNK_MAP_CHUNKS, getsizeof=ChunkMap.entries)
        self._maps_inflight: InFlight[bytes, ChunkMap] = InFlight()
        self._streaming: set[bytes] = set()  # blobs a whole-blob stream is reading
        self._passes = Passes()

    @property
    def stats(self) -> ReaderStats:
        return self._chunks.stats

    @property
    def chunk_cache(self) -> ChunkCache:
        return self._chunks

    @property
    def cached_bytes(self) -> int:
        return int(self._chunks.cache.currsize)

    async def open(self, node: FileNode, origin: bytes) -> OpenFile:
        """Learn the chunk map of a file (once per blob); EIO-worthy errors surface here."""
        chunk_map = without_list(node)
        if chunk_map is None:
            chunk_map = self._maps.get(node.digest)
            if chunk_map is None:
                chunk_map = await self._maps_inflight.run(node.digest, lambda: self._fetch_map(node))
            check_covers(chunk_map, node)
        return OpenFile(node, origin, self._strategy(node, chunk_map))

    async def map_ahead(self, digest: bytes, size: int) -> None:
        """Learn a file's chunk map before an open needs it (access profiles), on the threads
        for fetches ahead (``ChunkCache.ahead``). It is kept only if it covers ``size``, and
        an open checks it against its own file as always."""
        if digest not in self._maps:
            node = FileNode(b"", digest, size)
            await self._maps_inflight.run(digest, lambda: self._fetch_map(node, self._chunks.ahead))

    async def _fetch_map(self, node: FileNode, bridge: Bridge | None = None) -> ChunkMap:
        bridge = bridge or self._bridge
        chunk_map = await bridge.call(fetch_chunk_map, self._blobs, node)
        if self._prove and chunk_map.listed and chunk_map.size == node.size:
            await bridge.call(prove_chunk_list, self._blobs, node, chunk_map.chunks)
        if chunk_map.size == node.size:
            self._maps[node.digest] = chunk_map
        return chunk_map

    def _strategy(self, node: FileNode, chunk_map: ChunkMap) -> ChunkReads:
        """How this handle reads the file, chosen once (see the module docstring)."""

        def forget_map() -> None:
            self._maps.pop(node.digest, None)

        if len(chunk_map.chunks) >= 2:
            if self._blobs.capabilities.calls_are_remote:
                return WholeBlobReads(self._chunks, chunk_map, forget_map, node.digest, self._streaming)
            if chunk_map.size >= PASS_MIN:
                return PassReads(self._chunks, chunk_map, forget_map, self._passes)
        return ChunkReads(self._chunks, chunk_map, forget_map)

    async def read(self, file: OpenFile, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the file (fewer at its end).

        Often a memoryview rather than ``bytes`` (typed as bytes for pyfuse3's signature; it
        replies from any contiguous buffer), so that the bytes are not copied once more.
        """
        end = min(offset + size, file.reads.chunk_map.size)
        if offset >= end:
            return b""
        return cast("bytes", await file.reads.read(offset, end))
