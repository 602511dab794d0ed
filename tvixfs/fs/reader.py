"""File contents: a blob's chunk map, verified chunk fetches, a byte-bounded cache, readahead.

A read of ``(offset, size)`` is mapped onto the chunks of the blob (``stat(send_chunks)``; a
blob without a chunk list is one chunk, itself, and so is a small file, whose chunk list is not
worth a round trip). Each chunk is fetched by its own digest and checked against it before any
byte of it is used: by the store, where it promises to (``BlobService.verifies_reads``: the
embedded store hashes each chunk file it reads, the gRPC client all it receives), else here in
the worker thread, so each byte is hashed once. A corrupt or missing chunk fails that read with
EIO, never returns wrong bytes, and is never cached, so a later read asks the store again.
Concurrent reads of one chunk (parallel readers, the kernel's own readahead, ours) share one
fetch. Each open file keeps the last chunk it used, so a blob larger than the cache (a store
that does not chunk) is still fetched once per open, not once per kernel read.

Sequential access keeps ``READAHEAD_BYTES`` ahead of the reader fetched, in runs of
consecutive chunks (one worker thread call per ``RUN_BYTES``, not per chunk); over a remote
store a long pass from the start switches to one read of the whole blob (wholeblob.py). The
chunks such a pass has read past leave the cache at once (``_release_behind``). A sequential
pass over a file of ``PASS_MIN`` or more of a local store bypasses the chunks and the cache:
it is read in aligned blocks that answer the kernel's reads uncopied (sequential.py).

Known limit: the chunk list itself is not verified. Its sizes must add up to the file size and
every chunk must match its own digest, but a store that lists genuine chunks in the wrong order
(or chunks of another blob of the same size) is not caught, since only hashing the whole blob
(or a bao outboard, which the protocol reserves but nobody sends) ties a chunk list to the blob
digest, and doing that on first open would fetch every byte of a file before its first read.
"""

from __future__ import annotations

import bisect
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import trio
from cachetools import LRUCache, TTLCache

from tvixfs import defaults
from tvixfs.castore.digest import DIGEST_SIZE, EMPTY_DIGEST, new_hasher
from tvixfs.castore.nodes import FileNode
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.inflight import InFlight
from tvixfs.fs.sequential import SequentialPass
from tvixfs.fs.wholeblob import WholeBlobStream
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.errors import CorruptDataError, NotFoundError, StoreUnavailableError

log = logging.getLogger(__name__)

READAHEAD_BYTES = 4 << 20
# Chunks fetched ahead by one worker thread call. A hop costs the event loop ~0.1-0.5 ms, about
# what reading and hashing an average chunk (256 KiB) costs the worker: a cold 256 MiB read
# took ~24 000 context switches with a hop per chunk, ~7 500 in runs.
RUN_BYTES = 2 << 20
# A read starting this close to where the previous one ended counts as sequential: the kernel
# sends its readahead as several concurrent requests, which arrive slightly out of order.
SEQUENTIAL_SLACK = 1 << 20
CHUNK_MAP_CHUNKS = 1 << 20  # chunk list entries kept, over all cached chunk maps
# Chunks up to this size are fetched by one thread call (measured: cold sequential reads of a
# local store went from ~220 to ~395 MiB/s against streaming them piece by piece). Larger
# ones, i.e. whole blobs of a store that does not chunk, are streamed: the deadline then
# applies to each piece, not to the whole blob, and the fetch stops when its reader goes away.
STREAM_ABOVE = 16 << 20
# Over a remote store (``remote_reads``), a pass that started at byte 0 and has read this far
# in order switches to one read of the whole blob (wholeblob.py), if WHOLE_READ_REST bytes or
# more remain: that read fetches the first part again, and saves a call per chunk on the rest.
# (A program that only peeks at the start of a big file never gets that far.)
WHOLE_READ_AFTER = 8 << 20
WHOLE_READ_REST = 16 << 20
# Sequential passes over files of a local store of PASS_MIN or more: at most MAX_PASSES at
# once (each holds up to ~40 MiB of blocks, sequential.py); beyond that, and for smaller
# files, whose chunks other files and handles may share, reads go chunk by chunk through the
# cache. A pass unused for PASS_IDLE seconds gives its place to a new one.
PASS_MIN = 16 << 20
MAX_PASSES = 4
PASS_IDLE = 5.0
# Files up to this size are read as one blob without asking for their chunk list: one round
# trip per small file instead of two (the embedded store cuts chunks of 64 KiB to 1 MiB).
WHOLE_BLOB_MAX = 1 << 20
# A chunk whose fetch waited UNAVAILABLE_SLOW or longer and then found the store hung or
# unreachable fails again at once for UNAVAILABLE_MEMORY instead of asking the store again:
# the kernel retries a failed readahead read straight away (for the page its reader waits on),
# which cost a `cat` of such a file two deadlines. A failure that came fast is not remembered.
UNAVAILABLE_SLOW = 1.0
UNAVAILABLE_MEMORY = 1.0
UNAVAILABLE_CHUNKS = 4096


@dataclass(frozen=True, slots=True)
class ChunkMap:
    """Where each chunk of a blob starts; ``chunks`` cover ``[0, size)`` in order."""

    chunks: tuple[ChunkMeta, ...]
    starts: tuple[int, ...]
    size: int
    # The store's chunk list (each chunk read by the digest it listed), rather than the whole
    # blob taken as one chunk: see BlobService.verifies_reads.
    listed: bool = False

    @classmethod
    def of(cls, chunks: list[ChunkMeta], listed: bool = False) -> ChunkMap:
        starts = []
        offset = 0
        for chunk in chunks:
            starts.append(offset)
            offset += chunk.size
        return cls(tuple(chunks), tuple(starts), offset, listed)

    def covering(self, start: int, end: int) -> range:
        """Indices of the chunks holding bytes ``[start, end)``, for ``0 <= start < end <= size``."""
        return range(bisect.bisect_right(self.starts, start) - 1, bisect.bisect_left(self.starts, end))


def _chunk_map_size(chunk_map: ChunkMap) -> int:
    return len(chunk_map.chunks) + 1


class OpenFile:
    """One open file handle: where it is read, and the chunk it used last."""

    __slots__ = (
        "chunk_map",
        "last_end",
        "node",
        "origin",
        "pass_start",
        "pinned",
        "released",
        "scheduled",
        "sequential_pass",
        "whole_read",
        "whole_read_started",
    )

    def __init__(self, node: FileNode, chunk_map: ChunkMap, origin: bytes) -> None:
        self.node = node
        self.chunk_map = chunk_map
        self.origin = origin
        self.last_end = 0  # where the previous read ended
        self.scheduled = 0  # in this sequential run, chunks below this index were read ahead
        self.released = 0  # in this sequential run, chunks below this index left the cache
        self.pass_start = 0  # where this sequential run began
        self.whole_read: WholeBlobStream | None = None
        self.whole_read_started = False  # at most one whole-blob read per handle
        self.pinned: tuple[int, bytes] | None = None
        self.sequential_pass: SequentialPass | None = None


def _verified(blobs: BlobService, chunk: ChunkMeta, check: bool) -> Iterator[bytes]:
    """Runs in a worker thread: the pieces of one chunk; raises at the end unless they check out.

    The bytes are hashed here if ``check``: unless the store checks them itself (see
    ``_must_check``), so that no byte is used before someone has verified it.
    """
    hasher = new_hasher() if check else None
    received = 0
    for piece in blobs.read(chunk.digest):
        received += len(piece)
        if received > chunk.size:
            raise CorruptDataError(f"chunk {chunk.digest.hex()}: more than {chunk.size} bytes")
        if hasher is not None:
            hasher.update(piece)
        yield piece
    if received != chunk.size:
        raise CorruptDataError(f"chunk {chunk.digest.hex()}: {received} bytes, expected {chunk.size}")
    if hasher is not None and hasher.digest() != chunk.digest:
        raise CorruptDataError(f"chunk {chunk.digest.hex()}: content does not match its digest")


def _read_verified(blobs: BlobService, chunk: ChunkMeta, check: bool) -> bytes:
    pieces = list(_verified(blobs, chunk, check))
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _read_run(blobs: BlobService, chunks: list[ChunkMeta], check: bool) -> list[bytes | Exception]:
    """Runs in a worker thread: several chunks for one thread hop, each failing on its own."""
    outcomes: list[bytes | Exception] = []
    for chunk in chunks:
        try:
            outcomes.append(_read_verified(blobs, chunk, check))
        except Exception as e:
            outcomes.append(e)
    return outcomes


def _unwrap(outcome: bytes | Exception) -> bytes:
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _chunk_list(blobs: BlobService, node: FileNode) -> ChunkMap:
    chunks = blobs.stat(node.digest, send_chunks=True)
    if chunks is None:
        raise NotFoundError(f"blob {node.digest.hex()} not found")
    if not chunks:
        return ChunkMap.of([ChunkMeta(node.digest, node.size)])
    for chunk in chunks:
        if len(chunk.digest) != DIGEST_SIZE:
            raise CorruptDataError(f"blob {node.digest.hex()}: chunk digest of {len(chunk.digest)} bytes")
    return ChunkMap.of(chunks, listed=True)


@dataclass(slots=True)
class ReaderStats:
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    fetch_failures: int = 0


class BlobReader:
    def __init__(
        self,
        bridge: Bridge,
        blobs: BlobService,
        background: trio.Nursery,
        cache_bytes: int = defaults.CACHE_BYTES,
        readahead_bytes: int = READAHEAD_BYTES,
    ) -> None:
        self._bridge = bridge
        self._blobs = blobs
        self._background = background
        self._readahead = readahead_bytes
        self._cache: LRUCache[bytes, bytes] = LRUCache(cache_bytes, getsizeof=len)
        self._maps: LRUCache[bytes, ChunkMap] = LRUCache(CHUNK_MAP_CHUNKS, getsizeof=_chunk_map_size)
        self._chunks_inflight: InFlight[bytes, bytes] = InFlight()
        self._unavailable: TTLCache[bytes, StoreUnavailableError] = TTLCache(
            UNAVAILABLE_CHUNKS, UNAVAILABLE_MEMORY
        )
        self._maps_inflight: InFlight[bytes, ChunkMap] = InFlight()
        self._whole_reads: set[bytes] = set()  # blobs a whole-blob stream is reading
        self._passes: weakref.WeakSet[SequentialPass] = weakref.WeakSet()  # of open handles
        self.stats = ReaderStats()

    @property
    def cached_bytes(self) -> int:
        return int(self._cache.currsize)

    async def open(self, node: FileNode, origin: bytes) -> OpenFile:
        """Learn the chunk map of a file (once per blob); EIO-worthy errors surface here."""
        if node.size == 0:
            if node.digest != EMPTY_DIGEST:
                raise CorruptDataError(f"empty file with digest {node.digest.hex()}")
            return OpenFile(node, ChunkMap.of([]), origin)
        if node.size <= WHOLE_BLOB_MAX:
            return OpenFile(node, ChunkMap.of([ChunkMeta(node.digest, node.size)]), origin)
        chunk_map = self._maps.get(node.digest)
        if chunk_map is None:
            chunk_map = await self._maps_inflight.run(node.digest, lambda: self._fetch_map(node))
        if chunk_map.size != node.size:
            raise CorruptDataError(
                f"blob {node.digest.hex()}: chunks add up to {chunk_map.size} bytes, the file has {node.size}"
            )
        return OpenFile(node, chunk_map, origin)

    async def _fetch_map(self, node: FileNode) -> ChunkMap:
        chunk_map = await self._bridge.call(_chunk_list, self._blobs, node)
        if chunk_map.size == node.size:
            self._maps[node.digest] = chunk_map
        return chunk_map

    async def read(self, file: OpenFile, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the file (fewer at its end).

        Often a memoryview rather than ``bytes`` (typed as bytes for pyfuse3's signature; it
        replies from any contiguous buffer), so that the bytes are not copied once more.
        """
        chunk_map = file.chunk_map
        end = min(offset + size, chunk_map.size)
        if offset >= end:
            return b""
        sequential = abs(offset - file.last_end) <= SEQUENTIAL_SLACK
        passing = file.sequential_pass
        if passing is not None and not passing.holds(offset):
            passing = file.sequential_pass = None
        if passing is None and sequential and self._may_pass(chunk_map):
            passing = file.sequential_pass = SequentialPass(
                self._bridge,
                self._blobs,
                chunk_map,
                check=self._must_check(chunk_map),
                background=self._background,
                window=self._readahead,
                offset=offset,
            )
            self._passes.add(passing)
        if passing is not None:
            file.last_end = end
            data = await passing.read(offset, end)
            if data is not None:
                return cast("bytes", data)
            sequential = False  # a block failed: fetch its chunks alone, no readahead
        return cast("bytes", await self._read_chunks(file, offset, end, sequential))

    def _may_pass(self, chunk_map: ChunkMap) -> bool:
        """Whether a sequential pass over this file reads it in blocks (sequential.py): a file
        of PASS_MIN or more of a local store (over a remote one a whole-blob stream does it,
        wholeblob.py), if fewer than MAX_PASSES are open or one has been idle for PASS_IDLE."""
        if self._blobs.remote_reads or len(chunk_map.chunks) < 2 or chunk_map.size < PASS_MIN:
            return False
        if len(self._passes) < MAX_PASSES:
            return True
        idlest = min(self._passes, key=lambda p: p.last_used)
        if trio.current_time() - idlest.last_used < PASS_IDLE:
            return False
        idlest.close()
        self._passes.discard(idlest)
        return True

    async def _read_chunks(
        self, file: OpenFile, offset: int, end: int, sequential: bool
    ) -> bytes | memoryview:
        chunk_map = file.chunk_map
        indices = chunk_map.covering(offset, end)
        releasing = self._releasing(chunk_map)
        file.last_end = end
        if sequential:
            self._read_whole_ahead(file, end)
            if file.whole_read is None:
                self._read_ahead(file, indices[-1] + 1, end)
            if releasing:
                self._release_behind(file, offset - SEQUENTIAL_SLACK)
        else:
            file.scheduled = 0
            file.released = indices[0]
            file.pass_start = offset
            if file.whole_read is not None:
                file.whole_read.stop()
        fetched: dict[bytes, bytes | Exception] = {}
        if len(indices) > 1:
            # The chunks of this read that nobody has or is fetching: one thread hop for all.
            fetched = await self._fetch_run(
                [chunk_map.chunks[i] for i in indices], self._must_check(chunk_map)
            )
        pieces: list[bytes | memoryview] = []
        for index in indices:
            data = await self._chunk(file, index, fetched)
            start = chunk_map.starts[index]
            low, high = max(offset - start, 0), min(end - start, len(data))
            pieces.append(data if low == 0 and high == len(data) else memoryview(data)[low:high])
            if releasing and index < file.released:
                # A late read (the kernel's are concurrent) behind chunks already released:
                # what it fetched again must not stay either.
                self._cache.pop(chunk_map.chunks[index].digest, None)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_ahead(self, file: OpenFile, first: int, end: int) -> None:
        """Keep the chunks up to ``readahead`` bytes past ``end`` fetched or being fetched.

        New runs are started only once less than half of that lies ahead, so that each start
        covers half the window: runs of several chunks rather than one per kernel read.
        """
        chunk_map = file.chunk_map
        check = self._must_check(chunk_map)
        index = max(first, file.scheduled)
        count = len(chunk_map.chunks)
        if index >= count or chunk_map.starts[index] >= end + self._readahead // 2:
            return
        until = end + self._readahead
        run: list[ChunkMeta] = []
        run_bytes = 0
        while index < count and chunk_map.starts[index] < until:
            chunk = chunk_map.chunks[index]
            index += 1
            if chunk.digest in self._cache or chunk.digest in self._chunks_inflight:
                continue
            if chunk.size > STREAM_ABOVE:
                self._background.start_soon(self._fetch_ahead, [chunk], check)
                continue
            run.append(chunk)
            run_bytes += chunk.size
            if run_bytes >= RUN_BYTES:
                self._background.start_soon(self._fetch_ahead, run, check)
                run, run_bytes = [], 0
        if run:
            self._background.start_soon(self._fetch_ahead, run, check)
        file.scheduled = index

    def _read_whole_ahead(self, file: OpenFile, end: int) -> None:
        """Feed a long sequential pass over a remote store from one whole-blob read."""
        if file.whole_read is not None:
            file.whole_read.moved()
            return
        chunk_map = file.chunk_map
        if (
            not self._blobs.remote_reads
            or file.whole_read_started
            or file.pass_start != 0
            or end < WHOLE_READ_AFTER
            or chunk_map.size - end < WHOLE_READ_REST
            or len(chunk_map.chunks) < 2
            or file.node.digest in self._whole_reads
        ):
            return
        file.whole_read_started = True
        file.whole_read = WholeBlobStream(
            self._bridge,
            self._blobs,
            file.node.digest,
            chunk_map.chunks,
            chunk_map.starts,
            inflight=self._chunks_inflight,
            wanted=lambda digest: digest not in self._cache,
            deliver=self._fetched,
            position=lambda: file.last_end,
            window=self._readahead,
            batch_bytes=RUN_BYTES,
        )
        self._whole_reads.add(file.node.digest)
        self._background.start_soon(self._run_whole_read, file, file.whole_read)
        file.whole_read.moved()

    async def _run_whole_read(self, file: OpenFile, stream: WholeBlobStream) -> None:
        try:
            await stream.run()
        finally:
            file.whole_read = None
            self._whole_reads.discard(file.node.digest)

    def _releasing(self, chunk_map: ChunkMap) -> bool:
        """Whether a pass over this file drops what it has read from the cache: a file that
        would fill a good part of it. Smaller files stay, for the other readers of them."""
        return chunk_map.size > self._cache.maxsize // 4

    def _release_behind(self, file: OpenFile, before: int) -> None:
        """Drop the chunks a sequential pass over a big file has read past from the cache.

        The kernel keeps their pages (``keep_cache``), so a copy here would only double the
        memory a big file takes and push every other file's chunks out of the cache. It also
        lets a long read reuse the memory of the chunks it is done with rather than fault in
        fresh pages, which costs more than reading the bytes (measured: 256 MiB of chunks kept
        took ~320 ms of CPU to read, ~200 ms with the memory reused; a mount's RSS after a
        cold 256 MiB read went from ~330 MiB to ~80 MiB).
        """
        chunks, starts = file.chunk_map.chunks, file.chunk_map.starts
        index = file.released
        while index < len(chunks) and starts[index] + chunks[index].size <= before:
            self._cache.pop(chunks[index].digest, None)
            index += 1
        file.released = index

    async def _chunk(self, file: OpenFile, index: int, fetched: dict[bytes, bytes | Exception]) -> bytes:
        pinned = file.pinned
        if pinned is not None and pinned[0] == index:
            return pinned[1]
        chunk = file.chunk_map.chunks[index]
        outcome = fetched.get(chunk.digest)
        if outcome is None:
            outcome = self._cache.get(chunk.digest)
        try:
            if outcome is None:
                check = self._must_check(file.chunk_map)
                data = await self._chunks_inflight.run(chunk.digest, lambda: self._fetch(chunk, check))
            else:
                data = _unwrap(outcome)
        except Exception:
            # The chunk list may be what is wrong (chunks that exist nowhere): the next
            # open asks the store for it again.
            self._maps.pop(file.node.digest, None)
            raise
        file.pinned = (index, data)
        return data

    async def _stream_verified(self, chunk: ChunkMeta, check: bool) -> bytes:
        pieces: list[bytes] = []
        async with self._bridge.stream(lambda: _verified(self._blobs, chunk, check)) as stream:
            async for piece in stream:
                pieces.append(piece)
        return b"".join(pieces)

    async def _fetch_ahead(self, chunks: list[ChunkMeta], check: bool) -> None:
        try:
            if len(chunks) == 1:
                chunk = chunks[0]
                await self._chunks_inflight.run(chunk.digest, lambda: self._fetch(chunk, check))
            else:
                await self._fetch_run(chunks, check)
        except Exception as e:
            # The read that needs these chunks fetches them again and reports the error.
            log.debug("readahead of %d chunks from %s failed: %s", len(chunks), chunks[0].digest.hex(), e)

    async def _fetch_run(self, chunks: list[ChunkMeta], check: bool) -> dict[bytes, bytes | Exception]:
        """Fetch those of ``chunks`` that are neither cached nor being fetched, in one call."""
        wanted = {
            c.digest: c
            for c in chunks
            if c.size <= STREAM_ABOVE and c.digest not in self._cache and c.digest not in self._unavailable
        }

        async def fetch(digests: list[bytes]) -> list[bytes | Exception]:
            run = [wanted[d] for d in digests]
            started = trio.current_time()
            try:
                outcomes = await self._bridge.call(_read_run, self._blobs, run, check)
            except Exception as e:
                for chunk in run:
                    self._fetched(chunk, e, started)
                raise
            for chunk, outcome in zip(run, outcomes, strict=True):
                self._fetched(chunk, outcome, started)
            return outcomes

        return await self._chunks_inflight.run_many(list(wanted), fetch)

    def _must_check(self, chunk_map: ChunkMap) -> bool:
        """Whether fetched chunks of this map need hashing here: unless the store checks
        them, which it promises only for the chunks of its own chunk lists."""
        return not (chunk_map.listed and self._blobs.verifies_reads)

    async def _fetch(self, chunk: ChunkMeta, check: bool) -> bytes:
        if chunk.digest in self._cache:  # fetched while this task waited to start
            return self._cache[chunk.digest]
        if (unavailable := self._unavailable.get(chunk.digest)) is not None:
            raise unavailable
        started = trio.current_time()
        try:
            if chunk.size <= STREAM_ABOVE:
                data = await self._bridge.call(_read_verified, self._blobs, chunk, check)
            else:
                data = await self._stream_verified(chunk, check)
        except Exception as e:
            self._fetched(chunk, e, started)
            raise
        self._fetched(chunk, data)
        return data

    def _fetched(self, chunk: ChunkMeta, outcome: bytes | Exception, started: float | None = None) -> None:
        """Account for (and cache) a fetch's outcome; ``started``: when this fetch began, if it
        was one of ours rather than a whole-blob stream's."""
        if isinstance(outcome, Exception):
            self.stats.fetch_failures += 1
            if (
                isinstance(outcome, StoreUnavailableError)
                and started is not None
                and trio.current_time() - started >= UNAVAILABLE_SLOW
            ):
                self._unavailable[chunk.digest] = outcome
            return
        self.stats.chunks_fetched += 1
        self.stats.bytes_fetched += len(outcome)
        if len(outcome) <= self._cache.maxsize:
            self._cache[chunk.digest] = outcome
