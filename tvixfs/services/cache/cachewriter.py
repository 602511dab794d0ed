"""Writes verified chunks into a disk cache from one background thread, in batches.

Keeping a chunk costs a file write and index rows; done in the reading thread it would make a
cold read slower than without the cache (measured: about twice as slow over gRPC). So readers
only hand the bytes over, and this thread keeps them a batch at a time (one transaction to
reserve, one to commit, per batch). What waits here is bounded (``MAX_PENDING`` bytes);
beyond that a chunk is not kept, which costs a later fetch, never correctness. Until written,
a pending chunk is served from memory. ``close`` writes what is pending; a crash loses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_PENDING = 64 << 20
BATCH_BYTES = 8 << 20

Batch = list[tuple[bytes, bytes]]


class CacheWriter:
    def __init__(
        self, write: Callable[[Batch], None], max_pending: int = MAX_PENDING, batch_bytes: int = BATCH_BYTES
    ) -> None:
        self._write = write
        self._max_pending = max_pending
        self._batch_bytes = batch_bytes
        self._pending: dict[bytes, bytes] = {}
        self._held = 0
        self._writing: dict[bytes, bytes] = {}
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def submit(self, digest: bytes, data: bytes) -> bool:
        """Queue a verified chunk; False if the queue is full (it is then not kept)."""
        with self._lock:
            if self._closing or digest in self._pending or digest in self._writing:
                return not self._closing
            if self._held + len(data) > self._max_pending:
                return False
            self._pending[digest] = data
            self._held += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="disk-cache-writer", daemon=True)
                self._thread.start()
            self._lock.notify()
        return True

    def get(self, digest: bytes) -> bytes | None:
        """A chunk submitted and not yet written."""
        with self._lock:
            return self._pending.get(digest) or self._writing.get(digest)

    def _take(self) -> Batch | None:
        with self._lock:
            while not self._pending:
                if self._closing:
                    return None
                self._lock.wait()
            batch: Batch = []
            size = 0
            for digest in list(self._pending):
                data = self._pending.pop(digest)
                self._writing[digest] = data
                batch.append((digest, data))
                size += len(data)
                if size >= self._batch_bytes:
                    break
            self._held -= size
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._write(batch)
            except Exception as e:  # a full disk, a broken index: the cache is optional
                log.warning("disk cache: could not keep %d chunks: %s", len(batch), e)
            finally:
                with self._lock:
                    for digest, _ in batch:
                        self._writing.pop(digest, None)

    def close(self) -> None:
        """Write what is pending, then stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
