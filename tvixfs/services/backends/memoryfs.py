"""Whether a directory lives on a file system held in memory (tmpfs, ramfs).

Reads of such files never wait for a disk, so work that only hides disk latency (reading
chunk files ahead on threads) costs thread hand-offs and CPU there for nothing. The os module
has no ``statfs``; the file system's type comes from libc's.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

# linux/magic.h
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_IN_MEMORY = frozenset({TMPFS_MAGIC, RAMFS_MAGIC})

# struct statfs is 120 bytes on 64-bit Linux, its first field the type (a C long); room to spare.
_STATFS_SIZE = 256


@functools.cache
def _libc_statfs() -> Callable[[bytes, ctypes.Array[ctypes.c_char]], int] | None:
    try:
        statfs = ctypes.CDLL(None, use_errno=True).statfs
    except AttributeError:
        return None
    statfs.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    statfs.restype = ctypes.c_int
    return cast("Callable[[bytes, ctypes.Array[ctypes.c_char]], int]", statfs)


def filesystem_type(path: Path) -> int | None:
    """The ``f_type`` of the file system holding ``path``; None where it cannot be asked."""
    statfs = _libc_statfs()
    if statfs is None:
        return None
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    if statfs(os.fsencode(path), buffer) != 0:
        return None
    return ctypes.c_ulong.from_buffer(buffer).value & 0xFFFFFFFF


def in_memory(path: Path) -> bool:
    """True if ``path`` is on tmpfs or ramfs; False if on anything else or unknown."""
    return filesystem_type(path) in _IN_MEMORY
