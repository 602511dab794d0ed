"""Worker processes that turn files into chunk files, for an import into an embedded store.

Why processes: in one process the import is CPU bound and holds the GIL for most of it
(threads only added hand-offs), so on the 2 cores here a second process is the only way to
run its two halves at once. The importing process reads each file for the NAR hash (and
BLAKE3, which gives the blob's digest), workers read it again, cut, hash and write its chunk
files, and send back the digest and chunk list, which the importing process checks against
its own digest (a file changed between the two reads fails the import) and records. When
the workers are behind, the importing process writes small files itself (``ready``), so
neither core idles while the other has work.

Workers are forked, hold no database connection and write only chunk files, whose
durability the importing process's next commit barrier (syncfs) covers. They die with it
(PR_SET_PDEATHSIG), ignore Ctrl-C (the importing process stops them), and stop when their
pipe closes, so none outlives an import.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tvixfs.castore.digest import without_threads
from tvixfs.services.errors import StoreError

if TYPE_CHECKING:  # multiprocessing costs ~30 ms to import: only an import that forks loads it
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

# Files per message, and the bytes of file contents they may stand for: few messages (each
# costs a pickle and two system calls), yet small enough that both processes stay busy.
BATCH_FILES = 64
BATCH_BYTES = 16 << 20
# Batches a worker may have queued: enough to never starve it. Their messages together stay
# below what a socket buffers (IN_FLIGHT * BATCH_PATHS, ~64 KiB of ~200 KiB), so sending never
# waits on a worker, which may itself be waiting to send a large reply (the chunk lists of
# a huge file): neither side ever waits on the other at once.
IN_FLIGHT = 4
BATCH_PATHS = 16 << 10
# What one file adds to a message besides its path: size, digest, pickle framing.
_ENTRY_EXTRA = 64
# The most one file adds (a path that the importer could open is shorter than PATH_MAX).
_ENTRY_MAX = 4096 + _ENTRY_EXTRA
_PR_SET_PDEATHSIG = 1

Written = tuple[bytes, int, bytes]
"""A blob written by a worker: (digest, size, packed chunk list)."""
WriteFile = Callable[[bytes, int], Written]
"""What a worker does with one file: (path, size as the walk saw it) -> what it wrote."""


class WorkerError(StoreError):
    """A worker could not write a file's chunks (its message says why), or died."""


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    conn: Connection
    sent: deque[list[tuple[bytes, int, bytes]]] = field(default_factory=deque)


class ChunkWorkers:
    """Hands files to ``count`` forked workers in batches; ``drain`` checks what they wrote.

    ``record`` is called in the importing process for every blob written, once its digest
    matched the one the importer expected.
    """

    def __init__(self, count: int, write: WriteFile, record: Callable[[bytes, int, bytes], None]) -> None:
        self._record = record
        self._batch: list[tuple[bytes, int, bytes]] = []
        self._batch_bytes = self._batch_paths = 0
        self._next = 0
        self._workers: list[_Worker] = []
        import multiprocessing

        context = multiprocessing.get_context("fork")
        try:
            for _ in range(count):
                ours, theirs = context.Pipe()
                others = [w.conn for w in self._workers] + [ours]
                process = context.Process(
                    target=_serve, args=(theirs, others, write), name="tvixfs-chunks", daemon=True
                )
                process.start()
                theirs.close()
                self._workers.append(_Worker(process, ours))
        except BaseException:
            self.close()
            raise

    def submit(self, path: bytes, size: int, digest: bytes) -> None:
        """Have a worker write the file at ``path``, whose bytes have ``digest``."""
        self._batch.append((path, size, digest))
        self._batch_bytes += size
        self._batch_paths += len(path) + _ENTRY_EXTRA
        if (
            len(self._batch) >= BATCH_FILES
            or self._batch_bytes >= BATCH_BYTES
            or self._batch_paths > BATCH_PATHS - _ENTRY_MAX
        ):
            self._send()

    def ready(self) -> bool:
        """Whether a file submitted now will not make the importer wait for a worker."""
        worker = self._workers[self._next]
        if len(worker.sent) < IN_FLIGHT or len(self._batch) + 1 < BATCH_FILES:
            return True
        if worker.conn.poll():
            self._receive(worker)
            return True
        return False

    def drain(self) -> None:
        """Wait until every file submitted so far is written and recorded."""
        if self._batch:
            self._send()
        for worker in self._workers:
            while worker.sent:
                self._receive(worker)

    def _send(self) -> None:
        worker = self._workers[self._next]
        self._next = (self._next + 1) % len(self._workers)
        if len(worker.sent) >= IN_FLIGHT:
            self._receive(worker)
        worker.conn.send(self._batch)
        worker.sent.append(self._batch)
        self._batch = []
        self._batch_bytes = self._batch_paths = 0

    def _receive(self, worker: _Worker) -> None:
        try:
            reply = worker.conn.recv()
        except (EOFError, OSError):
            raise WorkerError(f"chunk writer process {worker.process.pid} died") from None
        if isinstance(reply, str):
            raise WorkerError(reply)
        for (path, size, expected), (digest, written, packed) in zip(
            worker.sent.popleft(), reply, strict=True
        ):
            if digest != expected or written != size:
                raise WorkerError(f"{path.decode(errors='replace')}: changed while being imported")
            self._record(digest, written, packed)

    def close(self) -> None:
        """Stop the workers (what they were given may be left unwritten) and reap them."""
        for worker in self._workers:
            worker.conn.close()  # a worker stops when its pipe closes
        for worker in self._workers:
            worker.process.join(5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


def _serve(conn: Connection, others: list[Connection], write: WriteFile) -> None:
    """A worker's loop: batches in, what was written (or the first error's message) out."""
    without_threads()  # the importer's blake3 threads did not come along with the fork
    for other in others:
        other.close()  # the importer's ends: its exit must end this worker's reads
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):  # the importer closed the pipe (with replies unread: a reset)
            return
        try:
            reply: list[Written] | str = [write(path, size) for path, size, _ in batch]
        except OSError as e:  # worded as the importer words its own
            where = "" if e.filename is None else f" {os.fsdecode(e.filename)}"
            reply = f"cannot import{where}: {e.strerror or e}"
        except StoreError as e:
            reply = str(e)
        try:
            conn.send(reply)
        except OSError:  # the importer is gone
            return
