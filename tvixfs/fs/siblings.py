"""Small files fetched ahead with their siblings, where a store is slow to answer.

A program starting (an interpreter importing modules, a loader mapping libraries) opens
small files one after the other, mostly from a few directories, and reads each whole. Read
one by one, each costs a worker thread hop over the embedded store (two wake-ups of a busy
event loop) and a round trip over a remote one, and the reader waits for each in turn.

So when a small file is opened and its blob is neither cached nor being fetched, the small
files of the same kind next to it in its directory (same name suffix: ``.cpython-311.pyc``
with ``.cpython-311.pyc``, not with ``.opt-1.pyc``) are fetched in the background into the
mount's chunk cache, following the opened one in name order: a worker call per few files
over a local store, a few concurrent calls over a remote one (pipelined on its one HTTP/2
connection). A later open of one of them finds it cached, or waits for the fetch under way
rather than starting its own (``InFlight``).

Only where it hides a wait: while a small file fetched alone takes ``SLOW_FETCH`` or longer on
average (a remote store far away). Nothing is presumed before the first such fetch: presumed
slow, a near store's first cold opens started a storm of batches whose calls then made every
fetch beside them look slow too, and it was never measured fast (figures: bench/ANALYSIS.md).
Where the store is far, the first cold open costs one round trip without files fetched ahead.
Bounded: at most ``BATCH_FILES`` files and ``BATCH_BYTES`` per miss, files of at most
``SMALL_MAX``, ``DIRECTORY_BUDGET`` bytes per directory over the life of the mount (so a
program that reads three modules of a big directory does not fetch it all; twice that where a
fetch takes ``FAR_FETCH`` or longer, since there each miss costs more than the bytes), and
``RUNNING`` batches at once (further misses start none, their files are read as before).
Fetches are verified like every other (chunkcache.py); a failure is left to the read that
needs the file.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import chain, islice

import trio
from cachetools import LRUCache

from tvixfs.castore.nodes import FileNode, Node
from tvixfs.fs.chunkcache import ChunkCache
from tvixfs.fs.chunkmap import WHOLE_BLOB_MAX
from tvixfs.services.base import ChunkMeta

log = logging.getLogger(__name__)

# Files up to this size are fetched with their siblings (whole, as one chunk: chunkmap.py).
SMALL_MAX = 256 << 10
assert SMALL_MAX <= WHOLE_BLOB_MAX
BATCH_FILES = 64
BATCH_BYTES = 2 << 20
# Bytes fetched ahead per directory, over the life of the mount.
DIRECTORY_BUDGET = 4 << 20
DIRECTORIES = 4096  # directories whose spent budget is remembered
SCAN_ENTRIES = 2048  # entries of a directory looked at per cold open
# Batches running at once, and worker calls of all of them at once: over a remote store
# each file is its own call (one round trip; in one call they would follow each other), or
# ``MANY_RUN`` files one call where the store answers many at once (``reads_many``: one round
# trip for all); over a local one ``LOCAL_RUN`` files are one call, one after the other. The
# calls run on the threads of ``ChunkCache.ahead`` (shared with access profiles), not on the
# readers' own.
RUNNING = 4
REMOTE_CALLS = 8
LOCAL_RUN = 4
MANY_RUN = 4
# Only while a file fetched alone keeps its reader waiting this long on average: a fast store
# (the embedded one, or gRPC on this machine) gains nothing from files fetched ahead, whose
# reading and hashing compete with the program for the CPU (figures: bench/ANALYSIS.md).
SLOW_FETCH = 0.005
# Where a file fetched alone takes this long (a store across a WAN), a directory's budget is
# doubled: there each miss costs more than the bytes fetched ahead cost the CPU; a nearer store
# keeps the smaller budget (figures: bench/ANALYSIS.md).
FAR_FETCH = 0.015


def kind(name: bytes) -> bytes:
    """What a file name says about its kind: everything from its first dot (b"" if none)."""
    dot = name.find(b".", 1)  # a leading dot is part of the name
    return name[dot:] if dot > 0 else b""


def _name(node: Node) -> bytes:
    return node.name


def is_small(node: Node) -> bool:
    return isinstance(node, FileNode) and 0 < node.size <= SMALL_MAX


class SiblingPrefetch:
    """Fetches the small siblings of small files opened cold, in the background."""

    def __init__(self, chunks: ChunkCache) -> None:
        self._chunks = chunks
        self._spent: LRUCache[bytes, int] = LRUCache(DIRECTORIES)
        self._running = 0
        self._remote = chunks.blobs.capabilities.calls_are_remote
        self._many = chunks.blobs.capabilities.reads_many

    def opened(self, node: FileNode, directory: bytes, entries: Sequence[Node]) -> None:
        """``node`` was opened from the directory with digest ``directory`` and ``entries``
        (sorted by name); never waits."""
        if (
            not is_small(node)
            or self._chunks.busy(node.digest)
            or self._running >= RUNNING
            or self._chunks.latency.seconds < SLOW_FETCH
        ):
            return
        spent = self._spent.get(directory, 0)
        budget = DIRECTORY_BUDGET * (2 if self._chunks.latency.seconds >= FAR_FETCH else 1)
        batch = self._batch(node, entries, min(budget - spent, BATCH_BYTES))
        if not batch:
            return
        self._spent[directory] = spent + sum(chunk.size for chunk in batch)
        self._running += 1
        self._chunks.background.start_soon(self._fetch, batch)

    def _batch(self, node: FileNode, entries: Sequence[Node], budget: int) -> list[ChunkMeta]:
        """The small files of ``node``'s kind after it in ``entries`` (then those before it),
        neither cached nor being fetched, within the bounds."""
        wanted = kind(node.name)
        # Entries are sorted by name: start after the opened one.
        start = bisect_right(entries, node.name, key=_name)
        following = chain(islice(entries, start, None), islice(entries, start))
        batch: list[ChunkMeta] = []
        seen = {node.digest}
        spent = 0
        for entry in islice(following, SCAN_ENTRIES):
            if len(batch) >= BATCH_FILES:
                break
            if not is_small(entry) or kind(entry.name) != wanted:
                continue
            assert isinstance(entry, FileNode)
            if entry.digest in seen or self._chunks.busy(entry.digest):
                continue
            if spent + entry.size > budget:
                break
            seen.add(entry.digest)
            batch.append(ChunkMeta(entry.digest, entry.size))
            spent += entry.size
        return batch

    async def _fetch(self, batch: list[ChunkMeta]) -> None:
        """Fetch the batch in order, a run at a time, so that each file is ready (and its
        waiting reader released) as soon as its own run is, not when the batch is."""
        size = (MANY_RUN if self._many else 1) if self._remote else LOCAL_RUN
        runs = iter([batch[i : i + size] for i in range(0, len(batch), size)])
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(REMOTE_CALLS if self._remote else 1):
                    nursery.start_soon(self._fetch_runs, runs)
        finally:
            self._running -= 1

    async def _fetch_runs(self, runs: Iterator[list[ChunkMeta]]) -> None:
        for run in runs:
            try:
                # Whole small blobs carry no chunk list the store vouched for.
                await self._chunks.fetch_run(run, self._chunks.check_unlisted, bridge=self._chunks.ahead)
            except Exception as e:
                log.debug("fetching %d small files ahead failed: %s", len(run), e)
