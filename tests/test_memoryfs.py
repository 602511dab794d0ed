"""``memoryfs``: the file system type of a store's directory, as ``stat -f`` reports it, and
what the daemon does with it (no read-ahead threads for a store in memory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tvixfs.protos import rpc_blobstore_pb2
from tvixfs.server.servicers import BlobServicer
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.memoryfs import TMPFS_MAGIC, filesystem_type, in_memory

T = TypeVar("T")


def _stat_f(path: Path) -> int:
    done = subprocess.run(["stat", "-f", "-c", "%t", str(path)], check=True, capture_output=True, text=True)
    return int(done.stdout, 16)


@pytest.mark.parametrize("path", ["/", "/dev/shm", "/proc"])
def test_type_is_what_stat_f_says(path: str) -> None:
    assert filesystem_type(Path(path)) == _stat_f(Path(path))


def test_tmpfs_is_in_memory(tmp_path: Path) -> None:
    if _stat_f(Path("/dev/shm")) != TMPFS_MAGIC:
        pytest.skip("/dev/shm is not tmpfs here")
    assert in_memory(Path("/dev/shm"))
    assert in_memory(tmp_path) == (_stat_f(tmp_path) == TMPFS_MAGIC)


def test_a_missing_path_is_not_in_memory(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path / "absent") is None
    assert not in_memory(tmp_path / "absent")


class _CountingPool(ThreadPoolExecutor):
    """A real pool that counts the jobs it is given."""

    def __init__(self) -> None:
        super().__init__(2)
        self.jobs = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("where", ["disk", "memory"])
def test_read_stream_reads_ahead_only_from_disk(where: str, tmp_path: Path) -> None:
    """A Read of a many-chunk blob: chunk files on disk are read ahead on the pool, a store on
    tmpfs reads them inline; the bytes are the same either way."""
    if where == "memory" and not in_memory(Path("/dev/shm")):
        pytest.skip("/dev/shm is not tmpfs here")
    if where == "disk" and in_memory(tmp_path):
        pytest.skip("the temporary directory is on tmpfs here")
    parent = Path(tempfile.mkdtemp(dir="/dev/shm")) if where == "memory" else tmp_path
    data = os.urandom(6 << 20)
    store = open_local_store(parent / "store")
    try:
        digest = store.blobs.put([data])
        chunks = store.blobs.stat(digest, send_chunks=True)
        assert chunks is not None and len(chunks) > 4
        with _CountingPool() as pool:
            servicer = BlobServicer(store.blobs, read_ahead=pool)
            messages = servicer.read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest))
            assert b"".join(b"".join(parts) for parts in messages) == data
        assert (pool.jobs > 0) == (where == "disk"), pool.jobs
    finally:
        store.close()
        if where == "memory":
            shutil.rmtree(parent)
