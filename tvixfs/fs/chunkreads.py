"""Reading a file chunk by chunk through the mount's chunk cache: the default strategy.

A read of ``(offset, size)`` is mapped onto the chunks of the file's map and each chunk comes
from the cache or is fetched (chunkcache.py). Sequential access keeps ``readahead`` bytes
ahead of the reader fetched, in runs of consecutive chunks (one worker thread call per
``RUN_BYTES``, not per chunk). A pass over a file that would fill a good part of the cache
drops the chunks it has read past (``_release_behind``). Each handle keeps the last chunk it
used, so a blob larger than the cache (a store that does not chunk) is still fetched once
per open, not once per kernel read.

The other strategies (wholeblob.py, sequential.py) build on this one: it is what they fall
back to for reads they cannot answer.
"""

from __future__ import annotations

from collections.abc import Callable

from tvixfs.fs.chunkcache import STREAM_ABOVE, ChunkCache, sized
from tvixfs.fs.chunkmap import ChunkMap
from tvixfs.services.base import ChunkMeta

# Chunks fetched ahead by one worker thread call (a hop costs the event loop about what
# reading and hashing an average chunk costs the worker; figures in bench/ANALYSIS.md).
RUN_BYTES = 2 << 20
# A read starting this close to where the previous one ended counts as sequential: the kernel
# sends its readahead as several concurrent requests, which arrive slightly out of order.
SEQUENTIAL_SLACK = 1 << 20


class ChunkReads:
    """One open file read chunk by chunk: where it is read, and the chunk it used last."""

    def __init__(self, chunks: ChunkCache, chunk_map: ChunkMap, forget_map: Callable[[], None]) -> None:
        self._chunks = chunks
        self.chunk_map = chunk_map
        # Whether fetched chunks need hashing here: unless the store checks them, which it
        # promises only for the chunks of its own chunk lists.
        self._check = not (chunk_map.listed and chunks.blobs.capabilities.verifies_chunk_reads)
        self._forget_map = forget_map  # the chunk list may be what is wrong: ask again next open
        self.last_end = 0  # where the previous read ended
        self._scheduled = 0  # in this sequential run, chunks below this index were read ahead
        self._released = 0  # in this sequential run, chunks below this index left the cache
        self.pass_start = 0  # where this sequential run began
        self._pinned: tuple[int, bytes] | None = None

    def sequential(self, offset: int) -> bool:
        return abs(offset - self.last_end) <= SEQUENTIAL_SLACK

    async def read(self, offset: int, end: int) -> bytes | memoryview:
        """Bytes ``[offset, end)``, for ``0 <= offset < end <= size``."""
        return await self.read_chunks(offset, end, self.sequential(offset))

    async def read_chunks(self, offset: int, end: int, sequential: bool) -> bytes | memoryview:
        chunk_map = self.chunk_map
        indices = chunk_map.covering(offset, end)
        releasing = self._releasing()
        self.last_end = end
        if sequential:
            self._ahead(indices[-1] + 1, end)
            if releasing:
                self._release_behind(offset - SEQUENTIAL_SLACK)
        else:
            self._scheduled = 0
            self._released = indices[0]
            self.pass_start = offset
            self._jumped()
        fetched: dict[bytes, bytes | Exception] = {}
        if len(indices) > 1:
            # The chunks of this read that nobody has or is fetching: one thread hop for all.
            fetched = await self._chunks.fetch_run([chunk_map.chunks[i] for i in indices], self._check)
        pieces: list[bytes | memoryview] = []
        for index in indices:
            data = await self._chunk(index, fetched)
            start = chunk_map.starts[index]
            low, high = max(offset - start, 0), min(end - start, len(data))
            pieces.append(data if low == 0 and high == len(data) else memoryview(data)[low:high])
            if releasing and index < self._released:
                # A late read (the kernel's are concurrent) behind chunks already released:
                # what it fetched again must not stay either.
                self._chunks.cache.pop(chunk_map.chunks[index].digest, None)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _ahead(self, first: int, end: int) -> None:
        """A sequential read ended at ``end``: keep what follows coming (chunk ``first`` on)."""
        self._read_ahead(first, end)

    def _jumped(self) -> None:
        """A read went elsewhere than where the previous one ended."""

    def _read_ahead(self, first: int, end: int) -> None:
        """Keep the chunks up to ``readahead`` bytes past ``end`` fetched or being fetched.

        New runs are started only once less than half of that lies ahead, so that each start
        covers half the window: runs of several chunks rather than one per kernel read.
        """
        chunk_map = self.chunk_map
        window = self._chunks.readahead
        index = max(first, self._scheduled)
        count = len(chunk_map.chunks)
        if index >= count or chunk_map.starts[index] >= end + window // 2:
            return
        until = end + window
        run: list[ChunkMeta] = []
        run_bytes = 0
        while index < count and chunk_map.starts[index] < until:
            chunk = chunk_map.chunks[index]
            index += 1
            if self._chunks.busy(chunk.digest):
                continue
            if chunk.size > STREAM_ABOVE:
                self._chunks.start_ahead([chunk], self._check)
                continue
            run.append(chunk)
            run_bytes += chunk.size
            if run_bytes >= RUN_BYTES:
                self._chunks.start_ahead(run, self._check)
                run, run_bytes = [], 0
        if run:
            self._chunks.start_ahead(run, self._check)
        self._scheduled = index

    def _releasing(self) -> bool:
        """Whether a pass over this file drops what it has read from the cache: a file that
        would fill a good part of it. Smaller files stay, for the other readers of them."""
        return self.chunk_map.size > self._chunks.cache.maxsize // 4

    def _release_behind(self, before: int) -> None:
        """Drop the chunks a sequential pass over a big file has read past from the cache.

        The kernel keeps their pages (``keep_cache``), so a copy here would only double the
        memory a big file takes and push every other file's chunks out of the cache. It also
        lets a long read reuse the memory of the chunks it is done with rather than fault in
        fresh pages, which costs more than reading the bytes (figures in bench/ANALYSIS.md).
        """
        chunks, starts = self.chunk_map.chunks, self.chunk_map.starts
        index = self._released
        while index < len(chunks) and starts[index] + chunks[index].size <= before:
            self._chunks.cache.pop(chunks[index].digest, None)
            index += 1
        self._released = index

    async def _chunk(self, index: int, fetched: dict[bytes, bytes | Exception]) -> bytes:
        pinned = self._pinned
        if pinned is not None and pinned[0] == index:
            return pinned[1]
        chunk = self.chunk_map.chunks[index]
        outcome = fetched.get(chunk.digest)
        try:
            data = await self._chunks.get(chunk, self._check) if outcome is None else _unwrap(chunk, outcome)
        except Exception:
            self._forget_map()
            raise
        self._pinned = (index, data)
        return data


def _unwrap(chunk: ChunkMeta, outcome: bytes | Exception) -> bytes:
    if isinstance(outcome, Exception):
        raise outcome
    return sized(chunk, outcome)
