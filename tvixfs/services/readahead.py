"""Reading ahead on worker threads, results in order: one pool for every consumer.

A consumer that will need a known sequence of reads (the chunks of a blob a Read stream
sends, the small files a NAR writer reaches next) has them run by an executor ahead of
time, up to a budget, and takes the results in order. What it never takes (its stream ended
early) is cancelled if not started. Store-agnostic: each job reads through the services'
interfaces, so the store checks what it reads as for any read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Generic, TypeVar

from tvixfs.castore.nodes import Node
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.chunkcheck import ChunkCheck
from tvixfs.services.regroup import grouped_by_size
from tvixfs.store.nar import GetDirectory, ReadBlob, files_in_order

K = TypeVar("K")
T = TypeVar("T")


class ReadAhead(Generic[K, T]):
    """Runs ``jobs`` (key, cost, function; keys not None) on ``executor`` in order, at most ``budget`` cost
    ahead of the consumer, who takes their results in the same order."""

    def __init__(
        self, jobs: Iterable[tuple[K, int, Callable[[], T]]], executor: Executor, budget: int
    ) -> None:
        self._jobs = iter(jobs)
        self._executor = executor
        self._budget = budget
        self._pending: deque[tuple[K, int, Future[T]]] = deque()
        self._held = 0

    def peek(self) -> K | None:
        """The key of the next result (None once all are taken), having started what fits."""
        while self._held < self._budget:
            job = next(self._jobs, None)
            if job is None:
                break
            key, cost, run = job
            self._pending.append((key, cost, self._executor.submit(run)))
            self._held += cost
        return self._pending[0][0] if self._pending else None

    def take(self) -> T:
        """The next result, waiting for it; raises what its job raised."""
        self.peek()
        _, cost, future = self._pending.popleft()
        self._held -= cost
        return future.result()

    def cancel(self) -> None:
        """Cancel the jobs not started; the ones running finish, unheard."""
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._held = 0


def chunks_read_ahead(
    blobs: BlobService, chunks: list[ChunkMeta], executor: Executor, ahead: int, batch: int
) -> Iterator[bytes]:
    """The chunks' bytes in order, read by ``executor`` in batches of about ``batch`` bytes, up
    to ``ahead`` bytes before they are due.

    Each chunk is read by its own digest, so the store checks it as it checks any read; its
    length is checked here, as the chunk list gives it.
    """

    def fetch(metas: list[ChunkMeta]) -> list[bytes]:
        out = []
        for meta in metas:
            check = ChunkCheck(meta.digest, meta.size, "read ahead", hash=False)
            pieces = list(blobs.read(meta.digest))
            for piece in pieces:
                check.update(piece)
            check.done()
            out.append(b"".join(pieces))
        return out

    jobs = (
        (i, sum(m.size for m in metas), lambda metas=metas: fetch(metas))
        for i, metas in enumerate(grouped_by_size(chunks, batch, lambda m: m.size))
    )
    reads = ReadAhead(jobs, executor, ahead)
    try:
        while reads.peek() is not None:
            yield from reads.take()
    finally:  # the stream ended early: reads not started are not needed
        reads.cancel()


@contextmanager
def blobs_read_ahead(
    node: Node, get_directory: GetDirectory, read_blob: ReadBlob, files: int = 16, small: int = 1 << 20
) -> Iterator[ReadBlob]:
    """A ``read_blob`` for ``write_nar(node, ...)`` that has the blobs of the next ``files``
    small files (up to ``small`` bytes each) read by threads while the NAR is written.

    For a store where each read is a round trip (gRPC): a tree of thousands of small files
    then costs a few round trips of latency rather than one per file. Memory stays below
    ``files * small``; bigger files are read when the NAR gets to them, as before. A failed
    read raises when the NAR reaches that file, as it would without read-ahead.
    """
    ahead_files = (f for f in files_in_order(node, get_directory) if 0 < f.size <= small)
    jobs = ((f.digest, 1, lambda d=f.digest: b"".join(read_blob(d))) for f in ahead_files)
    with ThreadPoolExecutor(files, thread_name_prefix="nar-read-ahead") as pool:
        ahead = ReadAhead(jobs, pool, files)

        def read(digest: bytes) -> Iterable[bytes]:
            if ahead.peek() == digest:
                return [ahead.take()]
            return read_blob(digest)

        try:
            yield read
        finally:
            ahead.cancel()
