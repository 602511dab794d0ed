"""The disk cache wrapper in process, around a memory store: what is kept, for how long, how big."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from backends import in_order
from conftest import make_sample_tree

from tvixfs.castore.digest import b3digest
from tvixfs.importers.ingest import ingest_path
from tvixfs.maintenance.cachefsck import check_cache
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import BlobService, ChunkMeta, Store
from tvixfs.services.cache.cacheindex import CHUNK, STALE_AFTER, CacheIndex
from tvixfs.services.cache.diskcache import DiskCache, with_disk_cache
from tvixfs.services.errors import CorruptDataError, NotFoundError, StoreUnavailableError
from tvixfs.store.storepath import StorePath


class Switchable:
    """Makes every call of a store's services raise StoreUnavailableError while ``down``."""

    def __init__(self, store: Store) -> None:
        self.down = False
        self.calls = 0
        for service in (store.blobs, store.directories, store.pathinfos):
            for name in ("get", "get_recursive", "stat", "read", "list", "calculate_nar"):
                if hasattr(service, name):
                    setattr(service, name, self._guard(getattr(service, name)))

    def _guard(self, method):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.down:
                raise StoreUnavailableError("switched off")
            return method(*args, **kwargs)

        return call


@pytest.fixture
def inner() -> Iterator[Store]:
    store = open_memory_store()
    yield store
    store.close()


def _usage(directory: Path) -> int:
    index = CacheIndex(directory / "index.sqlite", 1 << 30, lambda _: None)
    try:
        return index.usage()
    finally:
        index.close()


def _blob(store: Store, data: bytes) -> bytes:
    return store.blobs.put([data])


def test_negative_path_info_is_not_kept(inner: Store, tmp_path: Path) -> None:
    cached, cache = with_disk_cache(inner, tmp_path / "c")
    tree = make_sample_tree(tmp_path / "t")
    path = StorePath.from_basename(ingest_path(open_memory_store(), tree, "later").node.directory.name)
    assert cached.pathinfos.get(path.digest) is None
    ingest_path(inner, tree, "later")
    info = cached.pathinfos.get(path.digest)  # appeared after a negative answer: seen at once
    assert info is not None
    switch = Switchable(inner)
    switch.down = True
    assert cached.pathinfos.get(path.digest) == info  # a positive answer is kept for good
    cache.close()


def test_blobs_dirs_and_infos_are_served_from_disk_after_reopening(inner: Store, tmp_path: Path) -> None:
    tree = make_sample_tree(tmp_path / "t")
    path = StorePath.from_basename(ingest_path(inner, tree, "sample").node.directory.name)
    cached, cache = with_disk_cache(inner, tmp_path / "c")
    info = cached.pathinfos.get(path.digest)
    assert info is not None
    root = info.node.directory.digest
    closure = list(cached.directories.get_recursive(root))
    contents = {}
    for directory in closure:
        for file in directory.files:
            contents[file.digest] = b"".join(cached.blobs.read(file.digest))
    cache.close()
    switch = Switchable(inner)
    switch.down = True
    again, cache = with_disk_cache(inner, tmp_path / "c")
    assert again.pathinfos.get(path.digest) == info
    assert list(again.directories.get_recursive(root)) == closure
    for digest, data in contents.items():
        assert again.blobs.stat(digest) == []
        assert b"".join(again.blobs.read(digest)) == data
    assert switch.calls == 0
    with pytest.raises(StoreUnavailableError):
        again.pathinfos.get(b"\x03" * 20)
    started = time.monotonic()
    for _ in range(100):  # offline: refused at once, one probe per retry interval
        with pytest.raises(StoreUnavailableError):
            b"".join(again.blobs.read(b3digest(b"never stored")))
    assert time.monotonic() - started < 1
    assert switch.calls == 1
    cache.close()


def test_eviction_cleans_to_half_and_big_objects_are_not_kept(inner: Store, tmp_path: Path) -> None:
    blobs = [_blob(inner, os.urandom(100_000) + bytes([i])) for i in range(30)]
    for digest in blobs:  # one at a time: closing waits for the background writer
        cached, cache = with_disk_cache(inner, tmp_path / "c", size=1 << 20)
        b"".join(cached.blobs.read(digest))
        cache.close()
        assert _usage(tmp_path / "c") <= 1 << 20
    cached, cache = with_disk_cache(inner, tmp_path / "c", size=1 << 20)
    kept = [d for d in blobs if cache.index.lookup(CHUNK, d) is not None]
    assert blobs[-1] in kept and blobs[0] not in kept  # least recently used went first
    big = _blob(inner, os.urandom(600_000))
    assert len(b"".join(cached.blobs.read(big))) == 600_000
    cache.close()
    cached, cache = with_disk_cache(inner, tmp_path / "c", size=1 << 20)
    assert cache.index.lookup(CHUNK, big) is None
    files = sum(p.stat().st_size for p in (tmp_path / "c" / "chunks").glob("*/*"))
    assert files == sum(s for k, _, s, _, _ in cache.index.rows() if k == CHUNK)
    cache.close()


def test_rows_left_by_a_dead_writer_are_swept_and_accounting_is_right(inner: Store, tmp_path: Path) -> None:
    cached, cache = with_disk_cache(inner, tmp_path / "c")
    digest = _blob(inner, b"x" * 5000)
    b"".join(cached.blobs.read(digest))
    # A writer that died between reserving its row and writing its file, long ago.
    assert cache.index.reserve_chunks([(b3digest(b"lost"), 7000)])
    cache.close()
    db = sqlite3.connect(tmp_path / "c" / "index.sqlite")
    db.execute("UPDATE entries SET atime = atime - ? WHERE ready = 0", (2 * STALE_AFTER,))
    db.commit()
    db.close()
    reopened = DiskCache(tmp_path / "c", 1 << 30)
    assert reopened.index.usage() == 5000
    reopened.close()
    assert check_cache(tmp_path / "c", report=print).clean


def test_a_missing_file_is_a_miss_and_its_row_is_dropped(inner: Store, tmp_path: Path) -> None:
    cached, cache = with_disk_cache(inner, tmp_path / "c")
    digest = _blob(inner, b"y" * 3000)
    b"".join(cached.blobs.read(digest))
    cache.close()
    cached, cache = with_disk_cache(inner, tmp_path / "c")
    cache.files.path(digest).unlink()
    assert b"".join(cached.blobs.read(digest)) == b"y" * 3000  # fetched again
    cache.close()
    assert cache.files.path(digest).exists()
    assert _usage(tmp_path / "c") == 3000


def test_two_processes_worth_of_writers_keep_one_account(inner: Store, tmp_path: Path) -> None:
    """Two caches on one directory (as two processes would have), writing at once."""
    blobs = [_blob(inner, os.urandom(20_000) + bytes([i])) for i in range(60)]
    first, cache_a = with_disk_cache(inner, tmp_path / "c", size=600_000)
    second, cache_b = with_disk_cache(inner, tmp_path / "c", size=600_000)

    def read(store: Store, order: list[bytes]) -> None:
        for digest in order:
            assert b"".join(store.blobs.read(digest))

    threads = [
        threading.Thread(target=read, args=(first, blobs)),
        threading.Thread(target=read, args=(second, blobs[::-1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache_a.close()
    cache_b.close()
    index = CacheIndex(tmp_path / "c" / "index.sqlite", 600_000, lambda _: None)
    recorded, actual = index.recount()
    index.close()
    assert recorded == actual <= 600_000
    assert check_cache(tmp_path / "c", report=print).clean


def test_pathinfo_put_passes_through(inner: Store, tmp_path: Path) -> None:
    cached, cache = with_disk_cache(inner, tmp_path / "c")
    with pytest.raises(Exception, match="root node"):
        cached.pathinfos.put(pathinfo_pb2.PathInfo())
    cache.close()


def test_cache_commands_refuse_a_directory_that_is_no_cache(tmp_path: Path, tvixfs_cmd: list[str]) -> None:
    for command, code in (("stats", 1), ("clear", 1), ("fsck", 2)):
        done = subprocess.run(
            [*tvixfs_cmd, "cache", command, str(tmp_path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == code
        assert done.stderr == f"tvixfs: error: {tmp_path} is not a tvixfs disk cache (no index.sqlite)\n"


def test_cache_fsck_drops_a_damaged_entry_and_a_stray_file(inner: Store, tmp_path: Path) -> None:
    cached, cache = with_disk_cache(inner, tmp_path / "c")
    good, bad = _blob(inner, b"good" * 1000), _blob(inner, b"bad" * 1000)
    b"".join(cached.blobs.read(good))
    b"".join(cached.blobs.read(bad))
    cache.close()
    path = cache.files.path(bad)
    path.write_bytes(b"BAD" + path.read_bytes()[3:])
    stray = cache.files.path(b3digest(b"stray"))
    stray.write_bytes(b"stray")
    lines: list[str] = []
    result = check_cache(tmp_path / "c", report=lines.append)
    assert (result.dropped, result.orphans) == (1, 1)
    assert len(lines) == 2
    assert not path.exists() and not stray.exists()
    assert check_cache(tmp_path / "c", report=lines.append).clean
    assert _usage(tmp_path / "c") == 4000


class Batching(BlobService):
    """A store's blobs, answering many chunks in one call (as a gRPC store whose server has
    BlobBatchService); counts the chunks each call asked for, and lies about ``lie_about``."""

    def __init__(self, inner: BlobService) -> None:
        self.inner = inner
        self.capabilities = replace(inner.capabilities, reads_many=True)
        self.asked: list[int] = []
        self.lie_about = b""

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        return self.inner.stat(digest, send_chunks)

    def read(self, digest: bytes) -> Iterator[bytes]:
        return self.inner.read(digest)

    def read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        self.asked.append(len(chunks))
        for i, answer in self.inner.read_many(chunks):
            lie = chunks[i].digest == self.lie_about and not isinstance(answer, Exception)
            yield i, bytes(chunks[i].size) if lie else answer

    def put(self, data: Iterable[bytes]) -> bytes:
        return self.inner.put(data)


def test_misses_of_many_chunks_go_to_the_store_together_and_are_checked(inner: Store, tmp_path: Path) -> None:
    contents = [b"first", b"second", b"third", b"fourth"]
    chunks = [ChunkMeta(_blob(inner, c), len(c)) for c in contents]
    batching = Batching(inner.blobs)
    cached, cache = with_disk_cache(Store(batching, inner.directories, inner.pathinfos), tmp_path / "c")
    try:
        assert cached.blobs.capabilities.reads_many
        assert b"".join(cached.blobs.read(chunks[0].digest)) == b"first"  # now on disk
        batching.lie_about = chunks[3].digest
        *found, lied, missing = in_order(cached.blobs.read_many([*chunks, ChunkMeta(b3digest(b"absent"), 6)]))
        assert found == contents[:3]
        assert isinstance(lied, CorruptDataError)
        assert isinstance(missing, NotFoundError)
        assert batching.asked == [4], "the three not on disk, and the absent one, in one call"
        assert in_order(cached.blobs.read_many(chunks[:3])) == contents[:3]
        assert batching.asked == [4], "all three on disk now"
        batching.lie_about = b""
        assert in_order(cached.blobs.read_many(chunks[2:])) == contents[2:]
        assert batching.asked == [4, 1], "the chunk that did not match was not kept"
    finally:
        cache.close()
