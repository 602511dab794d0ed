"""Chunk bytes of the embedded store: one file per chunk, named by its BLAKE3 digest (hex).

Files reach their final name only after an fsync, by a rename within their own directory, so
a file under a digest's name is complete; what a killed writer leaves is a temporary file
(``TEMP_MARK`` in its name). Every read checks the bytes against the name.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tvixfs.castore.digest import b3digest
from tvixfs.services.errors import CorruptDataError

TEMP_MARK = ".tmp-"


class ChunkFiles:
    """Chunk bytes in files named by their digest; every read is verified against the name."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def layout(self) -> list[Path]:
        """The 256 fan-out directories, by the first byte of the digest."""
        return [self.root / f"{i:02x}" for i in range(256)]

    def create_layout(self) -> None:
        """Made once, with the store, so that writers never race on mkdir."""
        self.root.mkdir(exist_ok=True)
        for directory in self.layout():
            directory.mkdir(exist_ok=True)
        fsync_dir(self.root)
        fsync_dir(self.root.parent)

    def path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name

    def size(self, digest: bytes) -> int | None:
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def write(self, digest: bytes, data: memoryview) -> Path | None:
        """Store a chunk unless its file exists; returns the directory to fsync, if written.

        An existing file is trusted to be complete, because files only ever reach their final
        name after an fsync; a damaged one is found by fsck (and by every read).
        """
        final = self.path(digest)
        if final.exists():
            return None
        temp = final.with_name(f"{final.name}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = data
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
        return final.parent

    def read(self, digest: bytes, expected_size: int | None = None) -> bytes:
        """The verified bytes of one chunk; CorruptDataError if missing or damaged."""
        path = self.path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read() if expected_size is None else f.read(expected_size + 1)
        except FileNotFoundError:
            raise CorruptDataError(f"chunk {digest.hex()} is missing from {self.root}") from None
        if (expected_size is not None and len(data) != expected_size) or b3digest(data) != digest:
            raise CorruptDataError(f"chunk file {path} does not match its digest")
        return data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
