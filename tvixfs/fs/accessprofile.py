"""Access profiles: a store path's start-up reads recorded once, fetched ahead the next time.

A program starting reads the same files of its store path each time, one after the other: over
a remote store, one round trip each, which sibling prefetch (siblings.py) hides only within a
directory and only after the first miss there. So, as Nydus's prefetch lists do, the mount
records which chunks were read in the first ``WINDOW`` seconds after a store path's first
lookup (reads as the kernel sends them, whether the chunks were cached or not), and which files
of several chunks were read (their open needs the chunk list, one more round trip), and keeps
them as the store path's profile (services/cache/accessprofiles.py). On a later mount, the
first lookup of that store path starts fetching the profile's chunks into the chunk cache and
its chunk lists into the reader's, in the order first needed, several calls at a time
(pipelined on a gRPC store's one connection): the program then finds most of its opens and
reads cached or under way instead of waiting a round trip each.

How many at a time follows the store: if the store path's own lookup took ``SLOW_LOOKUP`` or
longer, the store is far and the replay starts ``CALLS`` at a time. Otherwise (a near store, or
a lookup answered from a cache) the first fetch goes alone, and if it took that long the rest go
``CALLS`` at a time, else ``NEAR_CALLS``. Over a near store a few keep up, and more only cost
CPU: each gRPC call in flight is a client thread contending for the GIL (curl's start over
loopback: 0.17 s of mount CPU with 32 at once, 0.11 s with 4; bench/ANALYSIS.md).

Where it pays: a remote store (over a local one the chunks are a disk read away), and a mount
whose disk cache does not hold the blobs yet (a cleared or evicted cache, a new machine given
the profiles of another). Bounded: by the profile's own bounds; ``RECORDINGS`` store paths
recorded and ``REPLAYS`` replayed at once (a walk looking up many store paths starts no
more); ``1 / CHUNK_CACHE_SHARE`` of the chunk cache
per replay (it must not push out what it fetched); and the threads for fetches ahead
(``ChunkCache.ahead``, shared with sibling prefetch, apart from the readers' own, so a reader's
fetch never waits for a thread behind them). Chunks are hashed like any other fetch; a failed
one is left to the read that needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import trio
from cachetools import LRUCache

from tvixfs.fs.reader import BlobReader, OpenFile
from tvixfs.services.cache.accessprofiles import MAX_BYTES, MAX_ENTRIES, Entry, Kind, ProfileFiles

log = logging.getLogger(__name__)

WINDOW = 10.0  # seconds after a store path's first lookup whose reads make its profile
CALLS = 32  # calls at once of a replay from a far store (chunkcache.AHEAD_CALLS)
NEAR_CALLS = 4  # ... from a near one
# Chunks per call, where the store answers many in one (``BlobCapabilities.reads_many``): the
# fixed cost of a call, not its bytes, is what a replay over a near store spends its CPU on.
BATCH = 16
SLOW_CALL = 0.005  # a first fetch taking this long makes the store far
# A store path's lookup taking this long makes the store far. A lookup is more than a fetch (a
# thread hop, the path info's checks): 2-7 ms over loopback here, 23-27 ms over a 20 ms link.
SLOW_LOOKUP = 0.010
REPLAYS = 2  # replays at once; a store path entered while they run gets none
CHUNK_CACHE_SHARE = 2  # a replay fetches at most 1/this of the chunk cache
STORE_PATHS = 4096  # store paths remembered as already entered in this mount
# Store paths recorded at once: a walk looking up thousands within WINDOW starts no more (one
# entered while this many are recording is neither recorded nor replayed, until entered again).
RECORDINGS = 64


class _Recording:
    __slots__ = ("bytes", "entries")

    def __init__(self) -> None:
        self.entries: dict[tuple[Kind, bytes], Entry] = {}  # in the order first needed
        self.bytes = 0  # of the chunks

    def add(self, entry: Entry) -> bool:
        """Record ``entry`` unless it is recorded already; False once the profile is full."""
        key = (entry.kind, entry.digest)
        if key in self.entries:
            return True
        size = entry.size if entry.kind == Kind.CHUNK else 0
        if len(self.entries) >= MAX_ENTRIES or self.bytes + size > MAX_BYTES:
            return False
        self.entries[key] = entry
        self.bytes += size
        return True


class AccessProfiles:
    """Records the start-up reads of each store path and replays its profile on a cold mount."""

    def __init__(self, files: ProfileFiles, reader: BlobReader) -> None:
        self._files = files
        self._reader = reader
        self._chunks = reader.chunk_cache
        self._entered: LRUCache[bytes, bool] = LRUCache(STORE_PATHS)
        self._recording: dict[bytes, _Recording] = {}
        self._replays = 0

    def entered(self, store_path: bytes, lookup_seconds: float = 0.0) -> None:
        """``store_path`` was looked up, in ``lookup_seconds``; the first time, start its replay
        and recording. Never waits.

        A lookup that took ``SLOW_LOOKUP`` or longer asked a far store: its replay then need not
        spend a round trip timing the store with a first fetch alone (20 ms over a 20 ms link,
        of a program start of ~200 ms)."""
        if store_path in self._entered or len(self._recording) >= RECORDINGS:
            return
        self._entered[store_path] = True
        self._recording[store_path] = _Recording()
        self._chunks.background.start_soon(self._run, store_path, lookup_seconds >= SLOW_LOOKUP)

    def read(self, file: OpenFile, offset: int, size: int) -> None:
        """The kernel read ``[offset, offset + size)`` of an open file."""
        recording = self._recording.get(file.origin)
        if recording is None:
            return
        chunk_map = file.reads.chunk_map
        end = min(offset + size, chunk_map.size)
        if offset >= end:
            return
        if chunk_map.listed and not recording.add(Entry(Kind.CHUNK_LIST, file.node.digest, file.node.size)):
            return
        for index in chunk_map.covering(offset, end):
            chunk = chunk_map.chunks[index]
            if not recording.add(Entry(Kind.CHUNK, chunk.digest, chunk.size)):
                return

    async def _run(self, store_path: bytes, far: bool) -> None:
        profile: list[Entry] | None = None
        try:
            try:
                profile = await self._chunks.ahead.call(self._files.load, store_path)
            except Exception as e:  # the deadline of the threads for fetches ahead: all busy that long
                log.warning("access profile of %s not loaded: %s", store_path.decode(errors="replace"), e)
            if profile and self._chunks.blobs.capabilities.calls_are_remote and self._replays < REPLAYS:
                self._replays += 1
                self._chunks.background.start_soon(self._replay, profile, far)
            await trio.sleep(WINDOW)
        finally:
            recording = self._recording.pop(store_path)
            entries = list(recording.entries.values())
            if entries and entries != profile:
                # Also when the mount is ending (cancelled): the write is small and local. Not
                # through a bridge: shielded, it must not queue behind store calls to a dead
                # store, and it has no deadline to miss (``save`` never raises).
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._files.save, store_path, entries)

    async def _replay(self, profile: list[Entry], far: bool) -> None:
        budget = self._chunks.cache.maxsize // CHUNK_CACHE_SHARE
        wanted: list[Entry] = []
        for entry in profile:
            if entry.kind == Kind.CHUNK:
                if entry.size > budget:
                    break
                budget -= entry.size
                if self._chunks.busy(entry.digest):
                    continue
            wanted.append(entry)
        size = BATCH if self._chunks.blobs.capabilities.reads_many else 1
        try:
            async with trio.open_nursery() as nursery:
                _Replay(self, _batches(wanted, size, first_alone=not far), nursery, far).start()
        finally:
            self._replays -= 1

    async def fetch(self, batch: list[Entry]) -> bool:
        """Fetch a batch (see ``_batches``) unless all of it is under way already: whether
        anything was fetched."""
        try:
            if batch[0].kind == Kind.CHUNK_LIST:
                await self._reader.map_ahead(batch[0].digest, batch[0].size)
                return True
            chunks = [e.chunk for e in batch if not self._chunks.busy(e.digest)]
            if not chunks:
                return False
            # A profile is no store's word on the chunks.
            await self._chunks.fetch_run(chunks, self._chunks.check_unlisted, bridge=self._chunks.ahead)
        except Exception as e:
            log.debug("fetching %s of an access profile failed: %s", batch[0], e)
        return True


def _batches(entries: list[Entry], size: int, first_alone: bool) -> Iterator[list[Entry]]:
    """``entries`` in order, as fetches: each chunk list alone and up to ``size`` chunks
    together; with ``first_alone`` the first alone too (its fetch times the store)."""
    batch: list[Entry] = []
    limit = 1 if first_alone else size
    for entry in entries:
        if entry.kind == Kind.CHUNK_LIST and batch:
            yield batch
            batch = []
        batch.append(entry)
        if entry.kind == Kind.CHUNK_LIST or len(batch) == limit:
            yield batch
            batch = []
            limit = size
    if batch:
        yield batch


class _Replay:
    """The calls of one replay, taking the profile's batches in turn: one until a fetch has
    been timed, then as many as the store's distance asks for; all of those from the start
    where the lookup showed the store far (see the module docstring)."""

    def __init__(
        self,
        profiles: AccessProfiles,
        batches: Iterator[list[Entry]],
        nursery: trio.Nursery,
        far: bool,
    ) -> None:
        self._profiles = profiles
        self._batches = batches
        self._nursery = nursery
        self._timed = far  # known far already: no fetch needs timing

    def start(self) -> None:
        for _ in range(CALLS if self._timed else 1):
            self._nursery.start_soon(self._run)

    async def _run(self) -> None:
        for batch in self._batches:
            started = trio.current_time()
            if await self._profiles.fetch(batch) and not self._timed:
                self._timed = True
                far = trio.current_time() - started >= SLOW_CALL
                for _ in range((CALLS if far else NEAR_CALLS) - 1):
                    self._nursery.start_soon(self._run)
