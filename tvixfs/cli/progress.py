"""Progress of long imports on one rewritten stderr line: files, bytes and rate.

Shown only when stderr is a terminal, and only for work that lasts longer than ``AFTER``, so
scripts, logs and quick imports see nothing.
"""

from __future__ import annotations

import sys
import time
from typing import IO

# Progress appears only for imports that take longer than this, then at this interval.
AFTER = 1.0
EVERY = 0.2


class Progress:
    """Call with the files and bytes done so far; ``clear`` when the work ends."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._start = time.monotonic()
        self._last = 0.0
        self._shown = False

    @classmethod
    def on_terminal(cls, label: str) -> Progress | None:
        """A Progress if stderr is a terminal, else None (print nothing)."""
        return cls(label) if sys.stderr.isatty() else None

    def __call__(self, files: int | None, nbytes: int) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        if elapsed < AFTER or now - self._last < EVERY:
            return
        self._last = now
        self._shown = True
        counted = f"{files} files, " if files is not None else ""
        rate = nbytes / elapsed / 2**20
        sys.stderr.write(f"\r\x1b[K{self._label}: {counted}{nbytes / 2**20:.1f} MiB, {rate:.1f} MiB/s")
        sys.stderr.flush()

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class CountingReader:
    """A binary stream that reports the bytes read through it (a NAR has no file count ahead)."""

    def __init__(self, stream: IO[bytes], progress: Progress) -> None:
        self._stream = stream
        self._progress = progress
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._read += len(data)
        self._progress(None, self._read)
        return data
