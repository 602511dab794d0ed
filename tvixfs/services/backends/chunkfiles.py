"""Chunk bytes of the embedded store: one file per chunk, named by its BLAKE3 digest (hex).

Files get their final name only once written whole: a file written unnamed (``O_TMPFILE``)
is linked there, or, where that is not supported, a temporary file (``TEMP_MARK`` in its name)
is renamed within its directory. So a killed writer leaves at most a temporary file, never a
partial file under a digest's name. They are not fsynced one by one: ``sync`` makes
everything written so far durable at once, and the store commits nothing that refers to a
chunk before that (localdb.py). Every read checks the bytes against the name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, cast

from tvixfs.castore.digest import b3digest, new_hasher
from tvixfs.services.backends.resident import open_resident
from tvixfs.services.errors import CorruptDataError

TEMP_MARK = ".tmp-"
_T = TypeVar("_T")
# Chunk files are written unnamed and then linked (see _unnamed_file) where /proc is there,
# until the store's file system refuses.
_UNNAMED_FILES = os.path.isdir("/proc/self/fd")
# linux/fs.h: the inode flags ioctls (an int despite the "long" in their definition).
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


class ChunkFiles:
    """Chunk bytes in files named by their digest; every read is verified against the name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_name = os.fspath(root)  # writes build paths as str: pathlib costs ~20 us a chunk
        self._unnamed = _UNNAMED_FILES

    def layout(self) -> list[Path]:
        """The 256 fan-out directories, by the first byte of the digest."""
        return [self.root / f"{i:02x}" for i in range(256)]

    def create_layout(self) -> None:
        """The root and all 256 fan-out directories, for readers that list them all."""
        self.create_root()
        for directory in self.layout():
            directory.mkdir(exist_ok=True)
        fsync_dir(self.root)

    def create_root(self) -> None:
        """The root only: ``write`` makes a fan-out directory when it first needs it.

        Making all 256 up front (with ``_spread_subdirectories``, each in its own block group)
        took 0.03-0.3 s of every new store's start, before its first file; an import of a few
        files needs few of them. A directory made by a write becomes durable with the chunk
        file in it, at the next ``sync`` (syncfs covers both).
        """
        self.root.mkdir(exist_ok=True)
        _spread_subdirectories(self.root)
        fsync_dir(self.root)
        fsync_dir(self.root.parent)

    def path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name

    def write(self, digest: bytes, data: memoryview) -> None:
        """Store a chunk under its digest's name; durable only after the next ``sync``.

        An existing file is compared with ``data`` rather than trusted: after an OS crash a
        file that was named but never synced may come back empty or partly written, and
        committing a blob that relies on it would lose data. A mismatch is replaced, which
        also heals a damaged file. A match is kept, and the caller's next ``sync`` covers it
        even if another process wrote it and has not synced yet.
        """
        name = digest.hex()
        directory = f"{self._root_name}/{name[:2]}"
        final = f"{directory}/{name}"
        fd = _in_fan_out(directory, _unnamed_file) if self._unnamed else None
        self._unnamed = fd is not None
        if fd is not None:
            try:
                _write_all(fd, data)
                if _link_new(fd, final) or _holds(final, data):
                    return
            finally:
                os.close(fd)
        elif _holds(final, data):
            return
        # No unnamed files here, or the file found under the name is damaged: replaced whole.
        temp = f"{final}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}"
        fd = _in_fan_out(
            directory, lambda _: os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        )
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(temp, final)

    def sync(self) -> None:
        """Make every chunk file written so far durable, names included: one barrier for all.

        ``syncfs`` of the store's file system costs about what one fsync does, where an fsync
        per chunk file and per directory cost ~0.6 ms per small file. It also covers files
        written by other processes, so a chunk found already present is covered too.
        """
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)

    def read(self, digest: bytes, expected_size: int | None = None) -> bytes:
        """The verified bytes of one chunk; CorruptDataError if missing or damaged."""
        data = self.read_if_present(digest, expected_size)
        if data is None:
            raise CorruptDataError(f"chunk {digest.hex()} is missing from {self.root}")
        return data

    def read_if_present(self, digest: bytes, expected_size: int | None = None) -> bytes | None:
        """The verified bytes of one chunk, or None if there is no such file; CorruptDataError
        if damaged. Asking by opening it, not by a stat first: one lookup of its name in the
        fan-out directory, not two."""
        name = digest.hex()
        try:
            fd = os.open(f"{self._root_name}/{name[:2]}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return self._verified(fd, digest, expected_size)

    def read_resident(self, digest: bytes, size: int) -> bytes | None:
        """The verified bytes of one chunk if reading them cannot wait on a disk (resident.py);
        else None, also if it is missing or damaged: ``read`` then says what is wrong. Cheap
        enough for an event loop with chunks of some tens of KiB."""
        name = digest.hex()
        fd = open_resident(f"{self._root_name}/{name[:2]}/{name}", size)
        if fd is None:
            return None
        try:
            return self._verified(fd, digest, size)
        except CorruptDataError:
            return None

    def _verified(self, fd: int, digest: bytes, expected_size: int | None) -> bytes:
        """Read the chunk file open on ``fd`` (and close it); CorruptDataError if damaged."""
        try:
            # One byte more than expected, so that a longer file shows as damaged.
            data = _read_up_to(fd, (os.fstat(fd).st_size if expected_size is None else expected_size) + 1)
        finally:
            os.close(fd)
        if (expected_size is not None and len(data) != expected_size) or b3digest(data) != digest:
            raise CorruptDataError(f"chunk file {self.path(digest)} does not match its digest")
        return data

    def read_into(self, digest: bytes, views: Sequence[memoryview]) -> bool:
        """Fill ``views`` with the chunk's bytes and verify them there; False if no such file.

        Straight into the caller's memory (one ``readv``, no bytes object in between), for
        readers that assemble several chunks into one buffer. CorruptDataError unless the
        file holds exactly as many bytes as the views together, with this digest.
        """
        name = digest.hex()
        try:
            fd = os.open(f"{self._root_name}/{name[:2]}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        size = sum(len(v) for v in views)
        try:
            # One byte more than expected, so that a longer file shows as damaged.
            filled = _readv_full(fd, [*views, memoryview(bytearray(1))], size)
        finally:
            os.close(fd)
        hasher = new_hasher()
        for view in views:
            hasher.update(view)
        if filled != size or hasher.digest() != digest:
            raise CorruptDataError(f"chunk file {self.path(digest)} does not match its digest")
        return True


def _readv_full(fd: int, views: Sequence[memoryview], expected: int) -> int:
    """Bytes read into ``views`` in order, until they are full or the file ends.

    A read that stops exactly at ``expected`` bytes is taken as the end of the file, as a
    read of a regular file returns less than asked only there: one system call per chunk,
    not two. (Where a file system returned less for another reason, a longer file would go
    unnoticed, but its first ``expected`` bytes are still checked against the digest.)
    """
    total = 0
    pending = [v for v in views if v]
    while pending and (n := os.readv(fd, pending)):
        total += n
        if total == expected:
            break
        while pending and n >= len(pending[0]):
            n -= len(pending.pop(0))
        if n:
            pending[0] = pending[0][n:]
    return total


def _read_up_to(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes, fewer only at the end of the file; plain ``os.read`` calls, as a
    buffered file object costs more than the read itself for a chunk in the page cache."""
    data = os.read(fd, limit)
    if not data or len(data) == limit:
        return data
    parts = [data]
    received = len(data)
    while received < limit and (more := os.read(fd, limit - received)):
        parts.append(more)
        received += len(more)
    return b"".join(parts)


def _spread_subdirectories(path: Path) -> None:
    """Ask ext2/3/4 to place the subdirectories of ``path`` in different block groups.

    The "top of directory hierarchy" flag (``chattr +T``) makes the fan-out directories, and
    so the chunk files inside them, spread over the disk as top-level directories are, rather
    than all packed next to their parent. Where that parent's area holds many just-deleted
    inodes (ext4 without a journal skips those for 30 s, scanning past each one on every
    create), creating chunk files there cost ~0.3 ms each here; spread, ~0.05 ms. Other file
    systems refuse the flag: it is only a hint, so any error is ignored.
    """
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flags = bytearray(4)
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
            value = int.from_bytes(flags, sys.byteorder) | _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, value.to_bytes(4, sys.byteorder))
        finally:
            os.close(fd)


def _unnamed_file(directory: str) -> int | None:
    """A new file with no name yet in ``directory`` (``O_TMPFILE``), or None where unsupported.

    Written first and then linked under its final name, it needs no temporary name, rename or
    prior existence check (the link fails if the name exists), and a killed writer leaves
    nothing behind. About 3.5 us of CPU less per chunk file than a temporary name and rename.
    """
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError as e:  # EOPNOTSUPP: not on this file system; EISDIR, EINVAL: older kernels
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        return None


def _in_fan_out(directory: str, create: Callable[[str], _T]) -> _T:
    """``create(directory)``, making the fan-out ``directory`` first if it is not there yet.

    Only the fan-out directory: a store whose chunk root is gone fails the write (fsck
    reports it). Writers in other processes may make the same directory at once: either wins.
    """
    try:
        return create(directory)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory)
        return create(directory)


def _link_new(fd: int, path: str) -> bool:
    """Give the unnamed file ``fd`` the name ``path``; False if that name exists already.

    linkat(2) with AT_SYMLINK_FOLLOW through /proc (needs no privilege, unlike AT_EMPTY_PATH):
    CPython uses linkat, not link, only when given a directory fd, which an absolute path
    ignores.
    """
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=_root_fd(), follow_symlinks=True)
    except FileExistsError:
        return False
    return True


@functools.cache
def _root_fd() -> int:
    return os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _write_all(fd: int, data: memoryview) -> None:
    view = data
    while view:
        view = view[os.write(fd, view) :]


def _holds(path: str, data: memoryview) -> bool:
    """Whether the file at ``path`` exists with exactly ``data`` as its content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        # bytes == bytes is a memcmp; bytes == memoryview compares byte by byte, ~6x slower.
        return os.fstat(fd).st_size == len(data) and os.read(fd, len(data) + 1) == bytes(data)
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs`` (the os module has none), or None where libc lacks it."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except AttributeError:
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return cast("Callable[[int], int]", syncfs)


def _syncfs(fd: int) -> None:
    syncfs = _libc_syncfs()
    if syncfs is None:
        os.sync()
    elif syncfs(fd) != 0:
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, f"syncfs: {os.strerror(err)}")
        os.sync()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
