"""Reading a file only if that cannot wait on a disk: its name and its bytes already in memory.

A mount answers each cold read of a small file from a worker thread, because opening and
reading a chunk file may wait on the disk. The hop to the thread and back costs more than the
read itself (about 130 us of CPU against 40; figures in bench/ANALYSIS.md), and most small
files a program opens are in the page cache already. Two Linux system calls tell beforehand
whether the work can wait on anything: ``openat2`` with ``RESOLVE_CACHED`` opens a path only if
every component is in the dentry cache (else EAGAIN, no I/O), and ``cachestat`` (Linux 6.5)
counts the pages of a file that are in memory. Where either is missing (older kernels, other
architectures' numbers, seccomp), ``open_resident`` answers None and callers take the thread.

A page evicted between the count and the read makes that one read wait on the disk, as any
read would; for the small files this is meant for, that is one page fault's wait.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# The generic system call numbers (the same on x86_64 and aarch64).
_SYSCALLS = {"x86_64": (437, 451), "aarch64": (437, 451)}
_RESOLVE_CACHED = 0x20
_PAGE = os.sysconf("SC_PAGESIZE")


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


class _Range(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _CacheStat(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    )


class _Calls:
    """The two system calls, or ``usable`` False once one turned out to be missing."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        self.usable = numbers is not None
        self._openat2, self._cachestat = numbers or (0, 0)
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long
        self._how = _OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
        self._whole = _Range(0, 0)  # len 0: to the end of the file

    def open_cached(self, path: bytes) -> int | None:
        """A descriptor for ``path`` if opening it needs no I/O; None otherwise."""
        fd = int(
            self._syscall(
                ctypes.c_long(self._openat2),
                ctypes.c_int(-100),  # AT_FDCWD
                ctypes.c_char_p(path),
                ctypes.byref(self._how),
                ctypes.c_size_t(ctypes.sizeof(self._how)),
            )
        )
        if fd < 0:
            self._check(ctypes.get_errno())
            return None
        return fd

    def pages_cached(self, fd: int) -> int | None:
        stat = _CacheStat()
        rc = int(
            self._syscall(
                ctypes.c_long(self._cachestat),
                ctypes.c_uint(fd),
                ctypes.byref(self._whole),
                ctypes.byref(stat),
                ctypes.c_uint(0),
            )
        )
        if rc < 0:
            self._check(ctypes.get_errno())
            return None
        return int(stat.nr_cache)

    def _check(self, err: int) -> None:
        # Missing calls (or a sandbox refusing them): stop trying. Anything else (EAGAIN: not
        # cached; ENOENT) is an answer for this one file.
        if err in {errno.ENOSYS, errno.EPERM}:
            self.usable = False


_calls = _Calls()


def open_resident(path: str, size: int) -> int | None:
    """A descriptor open on ``path`` if its first ``size`` bytes can be read without waiting
    on a disk (name and pages in memory); None otherwise, including when the file is missing.
    The caller closes it."""
    if not _calls.usable or size <= 0:
        return None
    fd = _calls.open_cached(os.fsencode(path))
    if fd is None:
        return None
    cached = _calls.pages_cached(fd)
    if cached is not None and cached >= (size + _PAGE - 1) // _PAGE:
        return fd
    os.close(fd)
    return None
