"""One Read of a whole blob feeding a long sequential pass over a remote store.

Over a remote store (``BlobCapabilities.calls_are_remote``) every chunk fetched alone is one
call, and a call costs both ends far more than the bytes it carries (figures in
bench/ANALYSIS.md). The protocol has no ranged read, so such a stream always starts at byte 0:
``WholeBlobReads`` starts one only for a pass that began at 0 and has gone on long enough to
be worth reading its start again (``WHOLE_READ_AFTER``); until then, and whenever the stream
cannot answer, reads go chunk by chunk (chunkreads.py).

The stream runs ahead of the reader by at most ``window`` bytes and claims the chunks it is
about to deliver (``InFlight.claim``), so reads of them wait for it instead of fetching them
alone. Every chunk cut from it is checked against its digest in the chunk map, in the pump
thread, before anyone sees it (``BlobService.read_chunks``). Whatever
ends the stream early (an error, a reader that jumps away or stops reading for
``IDLE_SECONDS``) gives its claims back, and reads fetch those chunks one by one again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import trio

from tvixfs.fs.bridge import Bridge
from tvixfs.fs.chunkcache import ChunkCache
from tvixfs.fs.chunkmap import ChunkMap
from tvixfs.fs.chunkreads import RUN_BYTES, ChunkReads
from tvixfs.fs.inflight import InFlight
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.errors import StoreError
from tvixfs.services.regroup import grouped_by_size

log = logging.getLogger(__name__)

# A reader that has not moved for this long is gone (its handle closed, or it stalled).
IDLE_SECONDS = 5.0
# A pass that started at byte 0 and has read this far in order switches to one read of the
# whole blob, if WHOLE_READ_REST bytes or more remain: that read fetches the first part again,
# and saves a call per chunk on the rest. One full kernel read (1 MiB) is enough: the chunks
# fetched one by one before the switch cost both processes more than the start read again
# (figures: bench/ANALYSIS.md). A program that peeks at a header never gets that far; one that
# stops or jumps after the switch stops the stream within ``window`` bytes.
WHOLE_READ_AFTER = 1 << 20
WHOLE_READ_REST = 16 << 20


class WholeBlobStream:
    """One whole-blob Read ahead of one reader, delivering chunks into the reader's cache."""

    def __init__(
        self,
        bridge: Bridge,
        blobs: BlobService,
        digest: bytes,
        chunks: Sequence[ChunkMeta],
        starts: Sequence[int],
        *,
        inflight: InFlight[bytes, bytes],
        wanted: Callable[[bytes], bool],
        deliver: Callable[[ChunkMeta, bytes], None],
        position: Callable[[], int],
        window: int,
        batch_bytes: int,
    ) -> None:
        self._bridge = bridge
        self._blobs = blobs
        self._digest = digest
        self._chunks = chunks
        self._starts = starts
        self._inflight = inflight
        self._wanted = wanted  # whether a chunk is still missing from the cache
        self._deliver = deliver
        self._position = position  # where the reader's last read ended
        self._furthest = 0  # the furthest the reader got (its reads may end out of order)
        self._window = window
        self._batch_bytes = batch_bytes
        self._scope = trio.CancelScope()
        self._moved = trio.Event()
        self._next = 0  # index of the next chunk the stream delivers
        self._claim_next = 0  # chunks below this index were considered for a claim
        self._claimed: set[bytes] = set()

    def moved(self) -> None:
        """The reader went on: claim what it will read next, and let the stream run on."""
        if self._scope.cancel_called:
            return
        self._claim_ahead()
        self._moved.set()

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        def source() -> Iterator[list[bytes]]:
            """Runs in the pump thread: the checked chunks in batches of about ``batch_bytes``
            (one hop to the event loop per batch, not per chunk)."""
            return grouped_by_size(
                self._blobs.read_chunks(self._digest, self._chunks), self._batch_bytes, len
            )

        with self._scope:
            try:
                async with self._bridge.stream(source) as batches:
                    async for batch in batches:
                        for data in batch:
                            self._deliver_next(data)
                        self._claim_ahead()
                        if not await self._reader_near():
                            log.debug("blob %s: reader idle, stream stopped", self._digest.hex())
                            return
            except StoreError as e:
                log.debug("whole read of blob %s ended early: %s", self._digest.hex(), e)
            except Exception:
                # A bug here must not end the mount: reads fetch chunk by chunk again.
                log.exception("whole read of blob %s failed", self._digest.hex())
            finally:
                for digest in self._claimed:
                    self._inflight.abandon(digest)
                self._claimed.clear()

    def _deliver_next(self, data: bytes) -> None:
        """Hand on the next chunk if it is claimed, or else still wanted ahead of the reader."""
        chunk = self._chunks[self._next]
        start = self._starts[self._next]
        self._next += 1
        if chunk.digest in self._claimed:
            self._claimed.remove(chunk.digest)
            self._deliver(chunk, data)
            self._inflight.resolve(chunk.digest, data)
        elif (
            start + chunk.size > self._reader_position()
            and self._wanted(chunk.digest)
            and chunk.digest not in self._inflight
        ):
            self._deliver(chunk, data)

    def _reader_position(self) -> int:
        self._furthest = max(self._furthest, self._position())
        return self._furthest

    def _stream_position(self) -> int:
        return self._starts[self._next] if self._next < len(self._chunks) else self._starts[-1]

    def _claim_ahead(self) -> None:
        """Claim the missing chunks of the ``window`` bytes ahead of the reader.

        While the stream reads the start of the blob again, reads ahead of it wait for it
        rather than fetching their chunks one by one. The stream only stops to wait for the
        reader beyond that window, so it never holds a claim while it waits: a reader that
        went away (or another one of the same file) never waits for a stream that stopped.
        """
        position = self._reader_position()
        until = position + self._window
        index = max(self._claim_next, self._next)
        while index < len(self._chunks) and self._starts[index] < until:
            chunk = self._chunks[index]
            ahead = self._starts[index] + chunk.size > position
            if ahead and self._wanted(chunk.digest) and self._inflight.claim(chunk.digest):
                self._claimed.add(chunk.digest)
            index += 1
        self._claim_next = index

    async def _reader_near(self) -> bool:
        """Wait until the reader is within ``window`` bytes; False if it stopped moving."""
        while self._stream_position() > self._reader_position() + self._window:
            self._moved = trio.Event()
            with trio.move_on_after(IDLE_SECONDS):
                await self._moved.wait()
                continue
            return False
        return True


class WholeBlobReads(ChunkReads):
    """A file of a remote store: chunk by chunk, until a long pass from its start switches to
    one whole-blob stream feeding the cache (at most one per handle, and per blob at once)."""

    def __init__(
        self,
        chunks: ChunkCache,
        chunk_map: ChunkMap,
        forget_map: Callable[[], None],
        digest: bytes,
        streaming: set[bytes],
    ) -> None:
        super().__init__(chunks, chunk_map, forget_map)
        self._digest = digest
        self._streaming = streaming  # the blobs a stream of the mount is reading
        self._stream: WholeBlobStream | None = None
        self._started = False

    def _ahead(self, first: int, end: int) -> None:
        self._stream_ahead(end)
        if self._stream is None:
            super()._ahead(first, end)

    def _jumped(self) -> None:
        if self._stream is not None:
            self._stream.stop()

    def _stream_ahead(self, end: int) -> None:
        """Start the stream once the pass is long enough; tell a running one the reader moved."""
        if self._stream is not None:
            self._stream.moved()
            return
        chunk_map = self.chunk_map
        if (
            self._started
            or self.pass_start != 0
            or end < WHOLE_READ_AFTER
            or chunk_map.size - end < WHOLE_READ_REST
            or self._digest in self._streaming
        ):
            return
        self._started = True
        chunks = self._chunks
        stream = self._stream = WholeBlobStream(
            chunks.bridge,
            chunks.blobs,
            self._digest,
            chunk_map.chunks,
            chunk_map.starts,
            inflight=chunks.inflight,
            wanted=chunks.wanted,
            deliver=chunks.fetched,
            position=lambda: self.last_end,
            window=chunks.readahead,
            batch_bytes=RUN_BYTES,
        )
        self._streaming.add(self._digest)
        chunks.background.start_soon(self._run, stream)
        stream.moved()

    async def _run(self, stream: WholeBlobStream) -> None:
        try:
            await stream.run()
        finally:
            self._stream = None
            self._streaming.discard(self._digest)
