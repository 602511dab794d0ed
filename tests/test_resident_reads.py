"""Small chunks the embedded store holds in memory are read without a worker thread (issue 15),
and only ever with their right bytes: a damaged, missing or evicted chunk file is left to the
ordinary read, which fails with CorruptDataError (EIO through a mount)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, TypeVarTuple

import pytest
import trio

from tvixfs.castore.digest import b3digest
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.chunkcache import RESIDENT_MAX, ChunkCache
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.backends.resident import open_resident
from tvixfs.services.base import ChunkMeta, Store
from tvixfs.services.errors import CorruptDataError
from tvixfs.services.meteredstore import metered
from tvixfs.services.metrics import Metrics

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def _chunk_file(tmp_path: Path, digest: bytes) -> Path:
    """The chunk file's path; its fan-out directory made, as the store makes it on first write."""
    name = digest.hex()
    fan_out = tmp_path / "store" / "chunks" / name[:2]
    fan_out.mkdir(exist_ok=True)
    return fan_out / name


def _resident_here(tmp_path: Path) -> None:
    """Skip where the kernel cannot say whether a file is in memory (before Linux 6.5)."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    fd = open_resident(str(probe), 1)
    if fd is None:
        pytest.skip("openat2 RESOLVE_CACHED / cachestat not available here")
    os.close(fd)


class CountingBridge(Bridge):
    """A real bridge that counts the calls that took a worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def call(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        self.calls += 1
        return await super().call(fn, *args)


def _get(store: Store, chunk: ChunkMeta) -> tuple[bytes | Exception, int]:
    """One cold ``ChunkCache.get``: its outcome, and how many worker thread calls it made."""
    bridge = CountingBridge()

    async def main() -> bytes | Exception:
        async with trio.open_nursery() as nursery:
            cache = ChunkCache(bridge, store.blobs, nursery, 1 << 20, 0)
            try:
                return await cache.get(chunk, True)
            except CorruptDataError as e:
                return e

    return trio.run(main), bridge.calls


def test_a_chunk_in_memory_is_read_without_a_thread(store: Store, tmp_path: Path) -> None:
    _resident_here(tmp_path)
    data = os.urandom(5000)
    digest = store.blobs.put([data])
    assert store.blobs.read_resident(digest, len(data)) == data
    assert _get(store, ChunkMeta(digest, len(data))) == (data, 0)


def test_a_damaged_chunk_file_is_left_to_the_ordinary_read(store: Store, tmp_path: Path) -> None:
    _resident_here(tmp_path)
    data = os.urandom(5000)
    digest = store.blobs.put([data])
    path = _chunk_file(tmp_path, digest)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off, in memory
    assert store.blobs.read_resident(digest, len(data)) is None
    outcome, calls = _get(store, ChunkMeta(digest, len(data)))
    assert isinstance(outcome, CorruptDataError) and calls == 1
    path.write_bytes(data + b"!")  # longer
    assert store.blobs.read_resident(digest, len(data)) is None
    path.write_bytes(data)
    assert store.blobs.read_resident(digest, len(data) + 1) is None  # not the size asked for
    path.unlink()
    assert store.blobs.read_resident(digest, len(data)) is None
    outcome, calls = _get(store, ChunkMeta(digest, len(data)))
    assert isinstance(outcome, CorruptDataError) and calls == 1


def test_a_chunk_not_in_memory_is_read_by_a_thread(store: Store, tmp_path: Path) -> None:
    _resident_here(tmp_path)
    data = os.urandom(20000)
    digest = store.blobs.put([data])
    path = _chunk_file(tmp_path, digest)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
    finally:
        os.close(fd)
    if open_resident(str(path), len(data)) is not None:
        pytest.skip("this file system keeps the file in memory (tmpfs)")
    assert store.blobs.read_resident(digest, len(data)) is None
    assert _get(store, ChunkMeta(digest, len(data))) == (data, 1)


def test_big_chunks_and_other_stores_take_the_thread(store: Store, tmp_path: Path) -> None:
    _resident_here(tmp_path)
    data = os.urandom(RESIDENT_MAX + 1)
    digest = b3digest(data)
    _chunk_file(tmp_path, digest).write_bytes(data)  # one chunk file, bigger than the bound
    assert _get(store, ChunkMeta(digest, len(data))) == (data, 1)
    memory = open_memory_store()
    small = memory.blobs.put([b"small"])
    assert memory.blobs.read_resident(small, 5) is None
    assert _get(memory, ChunkMeta(small, 5)) == (b"small", 1)


def test_the_metrics_wrapper_passes_resident_reads_on(store: Store, tmp_path: Path) -> None:
    _resident_here(tmp_path)
    data = os.urandom(3000)
    digest = store.blobs.put([data])
    wrapped = metered(store, Metrics())
    assert _get(wrapped, ChunkMeta(digest, len(data))) == (data, 0)
