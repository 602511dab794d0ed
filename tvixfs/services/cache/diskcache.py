"""A persistent, bounded disk cache in front of any store, which also serves while it is offline.

Everything a store answers is immutable once it exists (content is addressed by its digest, a
path info once stored never changes), so whatever the cache holds is served without asking the
store, and a positive entry never expires. Negative answers are not kept: a path that appears
later is seen on the next lookup.

Layout of DIR: ``chunks/<2 hex>/<hex>`` holds blobs and chunks by BLAKE3 digest (written whole
before they get their name, see chunkfiles.py); ``index.sqlite`` holds the rest (directories,
chunk lists, path infos) and the size and last use of everything (cacheindex.py). What is read
back is checked again: a chunk against its digest, a directory against its digest, a path info
against its rules and store path hash. A damaged entry is dropped and fetched again, or, while
the store is unreachable, the read fails (EIO) rather than returning wrong bytes.

The usage stays below the size given plus a slack (see README): the SQLite index and its WAL,
and files evicted while a reader still has them open. When an insert would pass the size, the
least recently used entries go until half of it is used (as CernVM-FS does); an object larger
than half the size is served but not kept.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from tvixfs.castore.digest import b3digest, check_digest, new_hasher
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.chunkfiles import TEMP_MARK, ChunkFiles
from tvixfs.services.base import (
    BlobCapabilities,
    BlobService,
    ChunkMeta,
    DirectoryService,
    PathInfoService,
    Store,
)
from tvixfs.services.cache.cacheindex import (
    CHUNK,
    CHUNK_LIST,
    DIRECTORY,
    PATH_INFO,
    ROW_OVERHEAD,
    STALE_AFTER,
    CacheIndex,
)
from tvixfs.services.cache.cachewriter import BATCH_BYTES, Batch, CacheWriter
from tvixfs.services.cache.offline import OnlineState
from tvixfs.services.chunkcheck import verified
from tvixfs.services.errors import CorruptDataError, NotFoundError, StoreUnavailableError
from tvixfs.services.narhash import store_nar_hash
from tvixfs.store.pathinfo import validate_pathinfo

log = logging.getLogger(__name__)

DEFAULT_SIZE = 10 << 30
INDEX_NAME = "index.sqlite"
CHUNKS_NAME = "chunks"
# A blob read whole from the store is kept only up to this size: it is held in memory until
# verified. Bigger blobs are cached by their chunks when the store lists them.
MAX_WHOLE_OBJECT = 64 << 20
NOT_CACHED = "the store is unreachable and the disk cache does not hold it"
_CHUNK_META = struct.Struct(">32sQ")

T = TypeVar("T")


class DiskCache:
    """The files and index of one cache directory, shared by the three service wrappers."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.files = ChunkFiles(directory / CHUNKS_NAME)
        if not self.files.root.is_dir():
            self.files.create_layout()
        self.index = CacheIndex(directory / INDEX_NAME, size, self._remove_file)
        self.state = OnlineState()
        # Batches well below half the size, so that one always fits after an eviction.
        self.writer = CacheWriter(self._put_objects, batch_bytes=min(BATCH_BYTES, size // 8))
        self._closed = False
        sweep_temporary_files(self.files, STALE_AFTER)

    def _remove_file(self, digest: bytes) -> None:
        self.files.path(digest).unlink(missing_ok=True)

    def holds_data(self) -> bool:
        return self.index.usage() > 0

    # -- chunks and blobs (files) ---------------------------------------------------------

    def get_object(self, digest: bytes) -> bytes | None:
        """The verified bytes of a cached blob or chunk; None if absent or damaged (dropped)."""
        found = self.index.lookup(CHUNK, digest)
        if found is None:
            return self.writer.get(digest)
        try:
            data = self.files.read(digest, found[0])
        except CorruptDataError as e:
            if self.files.path(digest).exists():
                log.warning("disk cache: dropping a damaged entry: %s", e)
            self.index.drop(CHUNK, digest)
            return None
        return data

    def put_object(self, digest: bytes, data: bytes) -> None:
        """Keep verified bytes (the caller checked them against ``digest``), in the background."""
        self.writer.submit(digest, data)

    def _put_objects(self, batch: Batch) -> None:
        """Runs in the writer thread: rows first, then files, then the rows marked ready."""
        sizes = {digest: len(data) for digest, data in batch}
        reserved = set(self.index.reserve_chunks(list(sizes.items())))
        written = []
        try:
            for digest, data in batch:
                if digest in reserved:
                    self.files.write(digest, memoryview(data))
                    written.append(digest)
        finally:
            self.index.ready(CHUNK, written)
            for digest in reserved.difference(written):
                self.index.drop(CHUNK, digest)

    # -- small entries (rows) -------------------------------------------------------------

    def get_row(self, kind: str, key: bytes) -> bytes | None:
        found = self.index.lookup(kind, key)
        return None if found is None else found[1]

    def put_row(self, kind: str, key: bytes, data: bytes) -> None:
        self.index.reserve(kind, key, len(data) + ROW_OVERHEAD, data)

    def drop_row(self, kind: str, key: bytes, why: str) -> None:
        log.warning("disk cache: dropping a damaged %s entry %s: %s", kind, key.hex(), why)
        self.index.drop(kind, key)

    # -- the store behind it --------------------------------------------------------------

    def ask(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` to the store, unless it is offline and this is not the time to probe it."""
        if not self.state.may_ask():
            raise StoreUnavailableError(
                f"{what}: the store is unreachable and the disk cache does not hold it"
            )
        try:
            result = call()
        except StoreUnavailableError as e:
            self.went_offline(e)
            raise
        self.came_back()
        return result

    def ask_stream(self, stream: Iterable[T]) -> Iterator[T]:
        """``stream`` from the store, noting whether it broke for unavailability or ended."""
        try:
            yield from stream
        except StoreUnavailableError as e:
            self.went_offline(e)
            raise
        self.came_back()

    def went_offline(self, error: BaseException) -> None:
        self.state.failed(error)
        self.index.offline = True

    def came_back(self) -> None:
        if self.state.offline:
            self.state.answered()
            self.index.offline = False

    def count(self, hit: bool) -> None:
        self.index.count(hit)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.close()
            self.index.close()


def sweep_temporary_files(files: ChunkFiles, older_than: float) -> int:
    """Remove temporary files a killed writer left (older than ``older_than`` s, so that a
    live writer in another process keeps its own); the number removed."""
    cutoff = time.time() - older_than
    removed = 0
    for directory in files.layout():
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if TEMP_MARK in name:
                path = directory / name
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
    return removed


def encode_chunks(chunks: Sequence[ChunkMeta]) -> bytes:
    return b"".join(_CHUNK_META.pack(c.digest, c.size) for c in chunks)


def decode_chunks(data: bytes) -> list[ChunkMeta]:
    if len(data) % _CHUNK_META.size:
        raise ValidationError(f"chunk list of {len(data)} bytes")
    return [ChunkMeta(d, s) for d, s in _CHUNK_META.iter_unpack(data)]


def directory_from(data: bytes, digest: bytes) -> Directory:
    if b3digest(data) != digest:
        raise ValidationError("does not match its digest")
    return Directory.from_bytes(data)


def pathinfo_from(data: bytes, output_hash: bytes) -> pathinfo_pb2.PathInfo:
    """A cached path info, checked as one from the wire is; ValidationError if damaged."""
    try:
        info = pathinfo_pb2.PathInfo.FromString(data)
    except Exception as e:  # protobuf's DecodeError is not part of its typed API
        raise ValidationError(f"undecodable PathInfo: {e}") from None
    store_path, _ = validate_pathinfo(info)
    if store_path.digest != output_hash:
        raise ValidationError("stored under another store path hash")
    return info


class CachedBlobService(BlobService):
    """Blobs and chunks: from disk when cached (verified), else from the store (then kept)."""

    # A miss is a call to the store; a hit costs a file read either way.
    # Hits are checked as they are read from disk, misses before they are kept.
    capabilities = BlobCapabilities(
        verifies_chunk_reads=True, verifies_every_read=True, calls_are_remote=True
    )

    def __init__(self, inner: BlobService, cache: DiskCache) -> None:
        self._inner = inner
        self._cache = cache
        # Misses go to the store together where it can answer many at once.
        self.capabilities = replace(self.capabilities, reads_many=inner.capabilities.reads_many)

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        check_digest(digest)
        listed = self._cached_chunks(digest)
        if listed is None:
            listed = self._cache.ask(f"stat blob {digest.hex()}", lambda: self._inner.stat(digest, True))
            if listed is None:
                return None
            self._cache.put_row(CHUNK_LIST, digest, encode_chunks(listed))
        return listed if send_chunks else []

    def _cached_chunks(self, digest: bytes) -> list[ChunkMeta] | None:
        data = self._cache.get_row(CHUNK_LIST, digest)
        if data is not None:
            try:
                return decode_chunks(data)
            except ValidationError as e:
                self._cache.drop_row(CHUNK_LIST, digest, str(e))
        # A blob held whole is present, and needs no chunk list.
        return [] if self._cache.index.lookup(CHUNK, digest) is not None else None

    def read(self, digest: bytes) -> Iterator[bytes]:
        check_digest(digest)
        return self._read(digest)

    def _read(self, digest: bytes) -> Iterator[bytes]:
        data = self._cache.get_object(digest)
        if data is not None:
            self._cache.count(hit=True)
            yield data
            return
        self._cache.count(hit=False)
        if not self._cache.state.may_ask():
            raise StoreUnavailableError(f"read blob {digest.hex()}: {NOT_CACHED}")
        hasher = new_hasher()
        kept: list[bytes] | None = []
        held = 0
        for piece in self._cache.ask_stream(self._inner.read(digest)):
            hasher.update(piece)
            held += len(piece)
            if kept is not None:
                kept = kept if held <= MAX_WHOLE_OBJECT else None
                if kept is not None:
                    kept.append(bytes(piece))
            yield piece
        if hasher.digest() != digest:
            raise CorruptDataError(f"read blob {digest.hex()}: the store sent bytes with another digest")
        if kept is not None:
            self._cache.put_object(digest, b"".join(kept))

    def read_chunks(self, digest: bytes, chunks: Sequence[ChunkMeta]) -> Iterator[bytes]:
        """The blob cut into ``chunks``, each verified: from disk if all are cached, else in one
        stream from the store (each chunk then kept)."""
        check_digest(digest)
        return self._read_chunks(digest, chunks)

    def _read_chunks(self, digest: bytes, chunks: Sequence[ChunkMeta]) -> Iterator[bytes]:
        sent = 0
        for chunk in chunks:
            data = self._cache.get_object(chunk.digest)
            if data is None:
                break
            self._cache.count(hit=True)
            sent += 1
            yield data
        if sent == len(chunks):
            return
        rest = chunks[sent:]
        if sent:
            for chunk in rest:  # chunk by chunk, each from disk or from the store
                yield self._read_chunk(chunk)
            return
        if not self._cache.state.may_ask():
            raise StoreUnavailableError(f"read blob {digest.hex()}: {NOT_CACHED}")
        # read_chunks checks every chunk against its digest before it yields it.
        for chunk, data in zip(
            chunks, self._cache.ask_stream(self._inner.read_chunks(digest, chunks)), strict=True
        ):
            self._cache.count(hit=False)
            self._cache.put_object(chunk.digest, data)
            yield data

    def read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        """From disk those cached, the others in one ``read_many`` of the store (each checked
        against its digest, then kept)."""
        for chunk in chunks:
            check_digest(chunk.digest)
        return self._read_many(chunks)

    def _read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        missed: list[int] = []
        for i, chunk in enumerate(chunks):
            data = self._cache.get_object(chunk.digest)
            self._cache.count(hit=data is not None)
            if data is None:
                missed.append(i)
            else:
                yield i, data
        if not missed:
            return
        wanted = [chunks[i] for i in missed]
        if not self._cache.state.may_ask():
            raise StoreUnavailableError(
                f"read {len(wanted)} chunks from {wanted[0].digest.hex()}: {NOT_CACHED}"
            )
        for i, got in self._cache.ask_stream(self._inner.read_many(wanted)):
            yield missed[i], got if isinstance(got, Exception) else self._kept(wanted[i], got)

    def _kept(self, chunk: ChunkMeta, data: bytes) -> bytes | Exception:
        """``data`` kept on disk if it is ``chunk``; else the error, and nothing kept.

        Hashed here unless the store did (a gRPC store hashes what it receives): a replay
        chunk would otherwise be hashed by the client, here, and by the mount."""
        if not self._inner.capabilities.verifies_every_read:
            try:
                verified(data, chunk.digest, chunk.size, f"read chunk {chunk.digest.hex()}")
            except CorruptDataError as e:
                return e
        self._cache.put_object(chunk.digest, data)
        return data

    def _read_chunk(self, chunk: ChunkMeta) -> bytes:
        data = b"".join(self._read(chunk.digest))
        if len(data) != chunk.size:
            raise CorruptDataError(f"chunk {chunk.digest.hex()}: {len(data)} bytes, expected {chunk.size}")
        return data

    def put(self, data: Iterable[bytes]) -> bytes:
        return self._cache.ask("put blob", lambda: self._inner.put(data))

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._cache.close()


class CachedDirectoryService(DirectoryService):
    def __init__(self, inner: DirectoryService, cache: DiskCache) -> None:
        self._inner = inner
        self._cache = cache

    def _cached(self, digest: bytes) -> Directory | None:
        data = self._cache.get_row(DIRECTORY, digest)
        if data is None:
            return None
        try:
            return directory_from(data, digest)
        except ValidationError as e:
            self._cache.drop_row(DIRECTORY, digest, str(e))
            return None

    def _keep(self, directory: Directory) -> None:
        data = directory.to_bytes()
        self._cache.put_row(DIRECTORY, b3digest(data), data)

    def get(self, digest: bytes) -> Directory | None:
        check_digest(digest)
        found = self._cached(digest)
        if found is None:
            found = self._cache.ask(f"get directory {digest.hex()}", lambda: self._inner.get(digest))
            if found is not None:
                self._keep(found)
        return found

    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        check_digest(digest)
        cached = self._cached_closure(digest)
        if cached is not None:
            return iter(cached)
        return self._fetch_recursive(digest)

    def _cached_closure(self, digest: bytes) -> list[Directory] | None:
        """The whole closure from the cache, breadth-first, or None if any of it is missing."""
        closure: list[Directory] = []
        seen = {digest}
        queue = deque([digest])
        while queue:
            found = self._cached(queue.popleft())
            if found is None:
                return None
            closure.append(found)
            for child in found.directories:
                if child.digest not in seen:
                    seen.add(child.digest)
                    queue.append(child.digest)
        return closure

    def _fetch_recursive(self, digest: bytes) -> Iterator[Directory]:
        what = f"get directory {digest.hex()} recursively"
        stream = self._cache.ask(what, lambda: self._inner.get_recursive(digest))
        for directory in self._cache.ask_stream(stream):
            self._keep(directory)
            yield directory

    def put_many(self, directories: Iterable[Directory]) -> bytes:
        return self._cache.ask("put directories", lambda: self._inner.put_many(directories))

    def close(self) -> None:
        self._inner.close()


class CachedPathInfoService(PathInfoService):
    """Path infos by store path hash; positive answers kept for good, negative ones never."""

    def __init__(
        self, inner: PathInfoService, cache: DiskCache, blobs: BlobService, dirs: DirectoryService
    ) -> None:
        self._inner = inner
        self._cache = cache
        self._blobs = blobs
        self._dirs = dirs

    def _cached(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        data = self._cache.get_row(PATH_INFO, output_hash)
        if data is None:
            return None
        try:
            return pathinfo_from(data, output_hash)
        except ValidationError as e:
            self._cache.drop_row(PATH_INFO, output_hash, str(e))
            return None

    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        found = self._cached(output_hash)
        if found is not None:
            return found
        info = self._cache.ask(f"get path info {output_hash.hex()}", lambda: self._inner.get(output_hash))
        if info is not None:
            self._cache.put_row(PATH_INFO, output_hash, info.SerializeToString(deterministic=True))
        return info

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        return self._cache.ask("put path info", lambda: self._inner.put(info))

    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        return self._cache.ask_stream(self._cache.ask("list path infos", self._inner.list))

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """Asked of the store; rendered from the cache while the store is unreachable."""
        try:
            return self._cache.ask("calculate NAR", lambda: self._inner.calculate_nar(node))
        except StoreUnavailableError:
            try:
                return store_nar_hash(node, self._blobs, self._dirs)
            except NotFoundError as e:
                raise StoreUnavailableError(f"calculate NAR: {e}") from None

    def close(self) -> None:
        self._inner.close()


def with_disk_cache(store: Store, directory: Path, size: int = DEFAULT_SIZE) -> tuple[Store, DiskCache]:
    """``store`` behind a disk cache in ``directory``; the cache, for its state and stats."""
    cache = DiskCache(directory, size)
    blobs = CachedBlobService(store.blobs, cache)
    dirs = CachedDirectoryService(store.directories, cache)
    return Store(blobs, dirs, CachedPathInfoService(store.pathinfos, cache, blobs, dirs)), cache
