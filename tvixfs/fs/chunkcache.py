"""Verified chunk fetches into a byte-bounded cache, shared by every open file of a mount.

Each chunk is fetched by its own digest and checked against it before any byte of it is used:
by the store, where it promises to (``BlobCapabilities.verifies_chunk_reads``: the embedded
store hashes each chunk file it reads, the gRPC client all it receives), else here in the
worker thread, so each byte is hashed once. A corrupt or missing chunk fails that read with
EIO, never returns wrong bytes, and is never cached, so a later read asks the store again.
Concurrent fetches of one chunk (parallel readers, the kernel's readahead, ours, a whole-blob
stream's claims) share one fetch (``InFlight``). Several chunks are fetched in one worker
thread call where a read or a readahead run needs them (``fetch_run``). A small chunk that the
store holds in memory (the page cache, for the embedded store) is read on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio
from cachetools import LRUCache, TTLCache

from tvixfs.fs.bridge import Bridge, Handover
from tvixfs.fs.inflight import InFlight, Settle
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.chunkcheck import ChunkCheck
from tvixfs.services.errors import CorruptDataError, StoreUnavailableError

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 256 << 20
# Chunks up to this size are fetched by one thread call; larger ones, i.e. whole blobs of a
# store that does not chunk, are streamed: the deadline then applies to each piece, not to
# the whole blob, and the fetch stops when its reader goes away. (Figures: bench/ANALYSIS.md.)
STREAM_ABOVE = 16 << 20
# A chunk whose fetch waited UNAVAILABLE_SLOW or longer and then found the store hung or
# unreachable fails again at once for UNAVAILABLE_MEMORY instead of asking the store again:
# the kernel retries a failed readahead read straight away (for the page its reader waits on),
# which cost a `cat` of such a file two deadlines. A failure that came fast is not remembered.
UNAVAILABLE_SLOW = 1.0
UNAVAILABLE_MEMORY = 1.0
UNAVAILABLE_CHUNKS = 4096
# Threads fetching chunks ahead of any reader (sibling prefetch, access profiles), together. They
# are a budget of their own, so a reader's own fetch never waits for a thread behind them; and
# many, because over a remote store each chunk is one round trip (figures: bench/ANALYSIS.md).
AHEAD_CALLS = 32
# Chunks up to this size are read on the event loop where the store has them in memory
# (``BlobService.read_resident``): reading and hashing them costs less than the thread hop.
RESIDENT_MAX = 128 << 10
# Only fetches of chunks up to this size, made while no other chunk was being fetched, are
# timed for ``ChunkCache.latency``: a bigger one times its transfer more than the round trip,
# and one beside others (a prefetch batch, the kernel's readahead) times their queue. Not
# less: a program that opens only libraries of 64-256 KiB must still get the store timed
# (figures: bench/ANALYSIS.md).
LONE_MAX = 256 << 10


def _verified(blobs: BlobService, chunk: ChunkMeta, check: bool) -> Iterator[bytes]:
    """Runs in a worker thread: the pieces of one chunk; raises at the end unless they check
    out (hashed here if ``check``, else only counted: the store hashed them)."""
    checking = ChunkCheck(chunk.digest, chunk.size, "read", hash=check)
    for piece in blobs.read(chunk.digest):
        checking.update(piece)
        yield piece
    checking.done()


def _read_verified(blobs: BlobService, chunk: ChunkMeta, check: bool) -> bytes:
    pieces = list(_verified(blobs, chunk, check))
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def sized(chunk: ChunkMeta, data: bytes) -> bytes:
    """``data`` if it has the size ``chunk`` says. Chunks are cached and their fetches shared
    by digest alone, and a fetch checks the size its own asker gave: a chunk list that gives a
    known digest another size (a confused or lying store) must fail here, not shift every byte
    of the file after it."""
    if len(data) != chunk.size:
        raise CorruptDataError(f"chunk {chunk.digest.hex()} has {len(data)} bytes, listed as {chunk.size}")
    return data


def _read_run(
    blobs: BlobService,
    chunks: list[ChunkMeta],
    check: bool,
    arrived: Callable[[tuple[int, bytes | Exception]], None],
) -> None:
    """Runs in a worker thread: several chunks for one thread hop (and one call, where the store
    answers many at once), each handed to ``arrived`` with its index as soon as it is known,
    each failing on its own."""
    if len(chunks) > 1 and blobs.capabilities.reads_many:
        answered = set()
        for i, answer in blobs.read_many(chunks):
            answered.add(i)
            arrived((i, answer if isinstance(answer, Exception) else _checked(chunks[i], answer, check)))
        if len(answered) < len(chunks):
            raise CorruptDataError(f"the store answered {len(answered)} of {len(chunks)} chunks")
        return
    for i, chunk in enumerate(chunks):
        try:
            outcome: bytes | Exception = _read_verified(blobs, chunk, check)
        except Exception as e:
            outcome = e
        arrived((i, outcome))


def _checked(chunk: ChunkMeta, data: bytes, check: bool) -> bytes | Exception:
    """``data`` if it is ``chunk`` (hashed here if ``check``, else only counted), else the error."""
    checking = ChunkCheck(chunk.digest, chunk.size, "read", hash=check)
    try:
        checking.update(data)
        checking.done()
    except Exception as e:
        return e
    return data


@dataclass(slots=True)
class Latency:
    """A moving average of the seconds single-chunk fetches took (the recent ones weigh most);
    0 until the first, which is taken as it is: nothing is presumed about a store."""

    seconds: float = 0.0
    weight: float = 0.25
    samples: int = 0

    def add(self, seconds: float) -> None:
        self.samples += 1
        self.seconds += (seconds - self.seconds) * (self.weight if self.samples > 1 else 1.0)


@dataclass(slots=True)
class ReaderStats:
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    fetch_failures: int = 0
    # Chunks a read found in the cache (the misses are the chunks fetched).
    cache_hits: int = 0


class ChunkCache:
    """The mount's cache of verified chunks, and the fetches that fill it."""

    def __init__(
        self,
        bridge: Bridge,
        blobs: BlobService,
        background: trio.Nursery,
        cache_bytes: int,
        readahead_bytes: int,
    ) -> None:
        self.bridge = bridge
        self.blobs = blobs
        self.background = background
        self.readahead = readahead_bytes
        self.cache: LRUCache[bytes, bytes] = LRUCache(cache_bytes, getsizeof=len)
        self.inflight: InFlight[bytes, bytes] = InFlight()
        self._unavailable: TTLCache[bytes, StoreUnavailableError] = TTLCache(
            UNAVAILABLE_CHUNKS, UNAVAILABLE_MEMORY
        )
        self.stats = ReaderStats()
        # How long a read waits for a small chunk fetched alone (``LONE_MAX``): the round trip
        # that fetching ahead can hide.
        self.latency = Latency()
        self.ahead = Bridge(AHEAD_CALLS, bridge.deadline)

    @property
    def check_unlisted(self) -> bool:
        """Whether chunks fetched by digests no chunk list of the store named (an access
        profile's, a small file's whole blob) must be hashed here: unless the store checks
        every read against the digest asked for (``verifies_every_read``)."""
        return not self.blobs.capabilities.verifies_every_read

    def wanted(self, digest: bytes) -> bool:
        """Whether a chunk is missing from the cache."""
        return digest not in self.cache

    def busy(self, digest: bytes) -> bool:
        """Whether a chunk is cached or being fetched."""
        return digest in self.cache or digest in self.inflight

    async def get(self, chunk: ChunkMeta, check: bool) -> bytes:
        """The chunk from the cache, or fetched (sharing a fetch under way)."""
        data = self.cache.get(chunk.digest)
        if data is not None:
            self.stats.cache_hits += 1
            return sized(chunk, data)
        if chunk.size <= RESIDENT_MAX and chunk.digest not in self.inflight:
            # Small and in memory already: read here, without the hop to a worker thread.
            data = self.blobs.read_resident(chunk.digest, chunk.size)
            if data is not None:
                self.fetched(chunk, data)
                return data
        return sized(chunk, await self.inflight.run(chunk.digest, lambda: self._fetch(chunk, check)))

    def start_ahead(self, chunks: list[ChunkMeta], check: bool) -> None:
        """Fetch ``chunks`` in the background; a failure is left to the read that needs them.

        A run is one ``read_many``. Over a remote store that answers many chunks at once
        (``reads_many``: gRPC, one ReadMany whose chunks are handed on as they arrive) that is
        one call: a call per chunk cost the mount ~0.3 ms of CPU each, and the run in one call
        took the curl start over loopback gRPC from 0.186 to 0.140 s (bench/ANALYSIS.md). Over
        one that answers a chunk per call, each is a round trip: a call per chunk, all at once
        (as the bridge's threads allow), not one after the other in one thread.
        """
        can = self.blobs.capabilities
        if len(chunks) > 1 and can.calls_are_remote and not can.reads_many:
            for chunk in chunks:
                self.background.start_soon(self._fetch_ahead, [chunk], check)
            return
        self.background.start_soon(self._fetch_ahead, chunks, check)

    async def _fetch_ahead(self, chunks: list[ChunkMeta], check: bool) -> None:
        try:
            if len(chunks) == 1:
                chunk = chunks[0]
                await self.inflight.run(chunk.digest, lambda: self._fetch(chunk, check))
            else:
                await self.fetch_run(chunks, check)
        except Exception as e:
            # The read that needs these chunks fetches them again and reports the error.
            log.debug("readahead of %d chunks from %s failed: %s", len(chunks), chunks[0].digest.hex(), e)

    async def fetch_run(
        self, chunks: list[ChunkMeta], check: bool, bridge: Bridge | None = None
    ) -> dict[bytes, bytes | Exception]:
        """Fetch those of ``chunks`` that are neither cached nor being fetched, in one call
        (through ``bridge``, by default the readers' own).

        The chunks are claimed only once a thread is there to fetch them: a run queued for one
        of the threads for fetches ahead must not hold up a reader that needs one of its
        chunks, and whose own threads are free.
        """
        if not any(self._to_fetch(c) and c.digest not in self.inflight for c in chunks):
            return {}  # a warm read waits for no thread
        bridge = bridge or self.bridge
        slot = await bridge.reserve()
        try:
            wanted = {c.digest: c for c in chunks if self._to_fetch(c)}

            async def fetch(digests: list[bytes], settle: Settle[bytes, bytes]) -> None:
                run = [wanted[d] for d in digests]
                started = trio.current_time()

                def deliver(answers: list[tuple[int, bytes | Exception]]) -> None:
                    for i, outcome in answers:
                        if settle(digests[i], outcome):
                            self.fetched(run[i], outcome, started)

                arrived = Handover(deliver)
                try:
                    await bridge.call(_read_run, self.blobs, run, check, arrived.put, slot=slot)
                except Exception as e:
                    deliver([(i, e) for i in range(len(run))])
                    raise

            return await self.inflight.run_many(list(wanted), fetch)
        finally:
            slot.give_back()

    def _to_fetch(self, chunk: ChunkMeta) -> bool:
        """Whether ``fetch_run`` should fetch ``chunk``: neither cached nor failed just now, and
        small enough for one read (larger ones stream)."""
        digest = chunk.digest
        return chunk.size <= STREAM_ABOVE and digest not in self.cache and digest not in self._unavailable

    async def _stream_verified(self, chunk: ChunkMeta, check: bool) -> bytes:
        pieces: list[bytes] = []
        async with self.bridge.stream(lambda: _verified(self.blobs, chunk, check)) as stream:
            async for piece in stream:
                pieces.append(piece)
        return b"".join(pieces)

    async def _fetch(self, chunk: ChunkMeta, check: bool) -> bytes:
        if chunk.digest in self.cache:  # fetched while this task waited to start
            return self.cache[chunk.digest]
        if (unavailable := self._unavailable.get(chunk.digest)) is not None:
            raise unavailable
        started = trio.current_time()
        lone = chunk.size <= LONE_MAX and len(self.inflight) <= 1  # only this fetch's own entry
        try:
            if chunk.size <= STREAM_ABOVE:
                data = await self.bridge.call(_read_verified, self.blobs, chunk, check)
            else:
                data = await self._stream_verified(chunk, check)
        except Exception as e:
            self.fetched(chunk, e, started)
            raise
        self.fetched(chunk, data)
        if lone and len(self.inflight) <= 1:
            self.latency.add(trio.current_time() - started)
        return data

    def fetched(self, chunk: ChunkMeta, outcome: bytes | Exception, started: float | None = None) -> None:
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
        if len(outcome) <= self.cache.maxsize:
            self.cache[chunk.digest] = outcome
