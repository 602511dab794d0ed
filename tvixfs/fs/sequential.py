"""A long sequential pass over a big file of a local store, read in aligned blocks.

The chunk path (chunkreads.py) fetches chunks into the cache and joins the pieces of each kernel
read into one reply: for a cold 256 MiB read that join copied every byte once more on the
event loop thread, which also replies to the kernel, and the per-chunk bookkeeping (cache,
claims, one result per chunk) ran there too. Here a worker thread reads whole ``BLOCK``-sized,
``BLOCK``-aligned stretches of the file straight into one buffer each (``read_into``: one
copy, from the chunk file into the buffer) and verifies every chunk they touch, whole, before
the buffer is used; the kernel's reads (1 MiB during readahead, all at the phase of the
pass's first read, which the block grid follows) are then answered with slices of it,
uncopied. A chunk that crosses a block boundary is read and
hashed by both blocks: ~5 % more bytes hashed, all of it off the event loop (handing the
crossing chunk's end on to the next block instead saved nothing measurable).

The pass keeps ``window`` bytes ahead of the reader read or being read, drops each block once
the reader has had all of it (or is ``LAG`` past it), and reuses the buffers of dropped
blocks: it holds blocks covering at most ``LAG + window`` bytes plus two, and ``SPARE_BLOCKS``
spare buffers (~56 MiB with the defaults). The kernel's reads arrive out of order, and a
reader with small buffers (``cat``: 128 KiB) makes it send the next readahead window before
the rest of the current one: reads 7 MiB behind or ahead of the furthest so far, with a 4 MiB
window, in a cold 256 MiB ``cat``. Every read within ``LAG`` of the furthest belongs to the
pass and is answered from its block (chunk by chunk if that was dropped already). When such
a read ended the pass instead, a new one read the same blocks again: ~25 passes and twice the
daemon CPU for one ``cat``. Nothing of it enters the chunk cache: the kernel
keeps the pages (``keep_cache``), and a long file would only push other files' chunks out. A
block that fails (a damaged or missing chunk, a store
timeout) answers nothing: the reads that need it go the chunk path, which fetches the chunks
again and reports the error there (EIO), so a later read still asks the store.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import trio

from tvixfs.fs.bridge import Bridge
from tvixfs.fs.chunkcache import ChunkCache
from tvixfs.fs.chunkmap import ChunkMap
from tvixfs.fs.chunkreads import ChunkReads
from tvixfs.services.base import BlobService
from tvixfs.services.chunkcheck import ChunkCheck

log = logging.getLogger(__name__)

# Bytes per worker thread call (a multiple of the kernel's largest read, KERNEL_READ, so that
# its reads, on the grid of the pass, never straddle two buffers; figures in bench/ANALYSIS.md).
BLOCK = 8 << 20
SPARE_BLOCKS = 2
# At most MAX_PASSES passes at once (each holds up to ~40 MiB of blocks); beyond that, reads
# go chunk by chunk through the cache. A pass unused for PASS_IDLE seconds gives its place
# to a new one.
MAX_PASSES = 4
PASS_IDLE = 5.0
# How far from the furthest read a read still belongs to the pass (see the module docstring);
# at least the kernel's readahead window (fs/tuning.py) twice over.
LAG = 16 << 20
# The kernel's largest read (FUSE max_pages 256): it cuts each readahead window into reads of
# this size from the window's start, so they share the phase of the first read's end.
KERNEL_READ = 1 << 20


@dataclass(frozen=True, slots=True)
class _Source:
    blobs: BlobService
    chunk_map: ChunkMap
    check: bool  # whether the chunks need hashing here (see chunkreads.ChunkReads)

    def fill(self, start: int, end: int, spare: bytearray | None) -> bytearray:
        """Runs in a worker thread: bytes ``[start, end)`` of the file, in ``spare`` if given.

        Each chunk touched is read and checked whole; its bytes outside the range go to a
        scratch buffer. Every byte of the block is written, so a used buffer will do.
        """
        block = bytearray(end - start) if spare is None else spare
        view = memoryview(block)
        chunk_map = self.chunk_map
        for index in chunk_map.covering(start, end):
            chunk, low = chunk_map.chunks[index], chunk_map.starts[index]
            high = low + chunk.size
            views = [view[max(low, start) - start : min(high, end) - start]]
            if low < start:
                views.insert(0, memoryview(bytearray(start - low)))
            if high > end:
                views.append(memoryview(bytearray(high - end)))
            self.blobs.read_into(chunk.digest, views)
            if self.check:
                checking = ChunkCheck(chunk.digest, chunk.size, f"block at {start}")
                for part in views:
                    checking.update(part)
                checking.done()
        return block


class _Block:
    __slots__ = ("data", "done", "served")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytearray | None = None  # None once done: the block failed
        self.served = 0  # bytes of it the reader has had


class SequentialPass:
    """The blocks of one handle's sequential pass from ``offset`` on."""

    def __init__(
        self,
        bridge: Bridge,
        blobs: BlobService,
        chunk_map: ChunkMap,
        *,
        check: bool,
        background: trio.Nursery,
        window: int,
        offset: int,
        first_end: int,
    ) -> None:
        self._bridge = bridge
        self._source = _Source(blobs, chunk_map, check)
        self._size = chunk_map.size
        self._background = background
        self._window = window
        self._blocks: dict[int, _Block] = {}
        self._served: list[int] = []  # blocks read in full, to drop at the next read
        self._spare: list[bytearray] = []  # buffers of dropped blocks, newest last
        # Blocks start at phase + k * BLOCK (block -1 is the head before the phase): a reader
        # with small buffers (cat: 128 KiB) gets a first readahead of 512 KiB, and every
        # later kernel read is 512 KiB off the 1 MiB grid; on a grid of the same phase no read
        # straddles two blocks (waiting for both, and joined by a copy).
        self._phase = first_end % min(KERNEL_READ, BLOCK)
        self._furthest = offset  # where the furthest read so far ended
        self._kept = self._index(offset)  # the blocks below this one were dropped
        self._next = self._kept  # the first block not started yet
        self._closed = False
        self.last_used = trio.current_time()

    def holds(self, offset: int) -> bool:
        """Whether a read at ``offset`` belongs to this pass rather than a jump elsewhere.

        The kernel sends a readahead window as concurrent requests that arrive out of order:
        a read up to ``LAG`` behind or ahead of the furthest one is still part of the pass.
        """
        return not self._closed and abs(offset - self._furthest) <= LAG

    def close(self) -> None:
        """Drop every block; from now on the pass holds no read."""
        self._closed = True
        self._blocks.clear()
        self._spare.clear()

    async def read(self, offset: int, end: int) -> bytes | memoryview | None:
        """Bytes ``[offset, end)``, or None if a block they need failed or was dropped."""
        self.last_used = trio.current_time()
        self._furthest = max(self._furthest, end)
        self._drop_behind()
        self._start_blocks(self._furthest + self._window)
        pieces: list[memoryview] = []
        for index in range(self._index(offset), self._index(end - 1) + 1):
            block = self._blocks.get(index)
            if block is None:  # dropped already: read again, long after the others
                return None
            await block.done.wait()
            if block.data is None:
                return None
            base = self._start(index)
            low, high = max(offset, base) - base, min(end - base, len(block.data))
            pieces.append(memoryview(block.data)[low:high])
            block.served += high - low
            if block.served >= len(block.data):
                self._served.append(index)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _drop_behind(self) -> None:
        """Drop the blocks read in full, and any left behind by more than ``LAG``."""
        for index in self._served:
            self._drop(index)
        self._served.clear()
        while self._kept < self._index(self._furthest - LAG):
            self._drop(self._kept)
            self._kept += 1

    def _drop(self, index: int) -> None:
        """Forget a block; keep its buffer (the newest ``SPARE_BLOCKS``) for a later one.

        Reusing buffers saves zeroing and faulting in fresh memory for every block (with one
        ``readv`` per chunk, ~300 -> ~280 ms of CPU for a cold 256 MiB read).
        """
        block = self._blocks.pop(index, None)
        if block is None or block.data is None:
            return
        data, block.data = block.data, None
        if len(data) == BLOCK:
            self._spare.append(data)
            del self._spare[:-SPARE_BLOCKS]

    def _reusable(self) -> bytearray | None:
        """A spare buffer no read refers to any more, taken from the spares.

        Checked here, when a block starts, not when the block was dropped: with many reads in
        flight (``cat``'s doubled readahead window) the last replies from a block often had
        not gone out yet when it was dropped: a check then put ~15 of the 33 blocks of a cold
        256 MiB ``cat`` in fresh, zeroed buffers (memset and page faults ~8 % of the daemon's
        CPU), now 5-10, mostly at the pass's start. A buffer's reference count
        (CPython's, exact) is the list's and the argument's, unless a view of it is still
        held by a read whose reply has not gone out (pyfuse3 replies as the handler returns).
        """
        for i in range(len(self._spare)):
            if sys.getrefcount(self._spare[i]) == 2:
                return self._spare.pop(i)
        return None

    def _start_blocks(self, until: int) -> None:
        until = min(until, self._size)
        while self._start(self._next) < until:
            block = _Block()
            self._blocks[self._next] = block
            self._background.start_soon(self._read_block, self._next, block)
            self._next += 1

    def _index(self, offset: int) -> int:
        """The block holding byte ``offset`` (-1: the head before the phase)."""
        return (offset - self._phase) // BLOCK

    def _start(self, index: int) -> int:
        return max(0, self._phase + index * BLOCK)

    async def _read_block(self, index: int, block: _Block) -> None:
        start = self._start(index)
        end = min(self._start(index + 1), self._size)
        spare = self._reusable() if end - start == BLOCK else None
        try:
            block.data = await self._bridge.call(self._source.fill, start, end, spare)
        except Exception as e:
            log.debug("block at %d failed, its reads go chunk by chunk: %s", start, e)
        finally:
            block.done.set()


class Passes:
    """The passes of a mount's open handles: at most ``MAX_PASSES`` hold blocks at once."""

    def __init__(self) -> None:
        self._open: weakref.WeakSet[SequentialPass] = weakref.WeakSet()

    def admit(self) -> bool:
        """Whether a new pass may start: fewer than MAX_PASSES are open, or the idlest of them
        has been idle for PASS_IDLE (it is closed to make room)."""
        if len(self._open) < MAX_PASSES:
            return True
        idlest = min(self._open, key=lambda p: p.last_used)
        if trio.current_time() - idlest.last_used < PASS_IDLE:
            return False
        idlest.close()
        self._open.discard(idlest)
        return True

    def add(self, passing: SequentialPass) -> None:
        self._open.add(passing)


class PassReads(ChunkReads):
    """A big file of a local store: sequential reads from a pass of aligned blocks, the rest
    (jumps, failed blocks, a pass refused for want of room) chunk by chunk."""

    def __init__(
        self, chunks: ChunkCache, chunk_map: ChunkMap, forget_map: Callable[[], None], passes: Passes
    ) -> None:
        super().__init__(chunks, chunk_map, forget_map)
        self._passes = passes
        self._pass: SequentialPass | None = None

    async def read(self, offset: int, end: int) -> bytes | memoryview:
        sequential = self.sequential(offset)
        passing = self._pass
        if passing is not None and not passing.holds(offset):
            passing = self._pass = None
        if passing is None and sequential and self._passes.admit():
            chunks = self._chunks
            passing = self._pass = SequentialPass(
                chunks.bridge,
                chunks.blobs,
                self.chunk_map,
                check=self._check,
                background=chunks.background,
                window=chunks.readahead,
                offset=offset,
                first_end=end,
            )
            self._passes.add(passing)
        if passing is not None:
            self.last_end = end
            data = await passing.read(offset, end)
            if data is not None:
                return data
            sequential = False  # a block failed: fetch its chunks alone, no readahead
        return await self.read_chunks(offset, end, sequential)
