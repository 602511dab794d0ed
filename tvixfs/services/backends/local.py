"""``local://PATH``: the embedded store, SQLite metadata plus content-addressed chunk files.

Layout under PATH (created 0700 on first use, as it may hold private store paths)::

    db.sqlite            directories, path infos, blob chunk lists, NAR cache (localdb.py)
    chunks/ab/abcd...    one file per chunk, named by its BLAKE3 digest (chunkfiles.py)
    gc.lock, gc.waiting  what keeps ``tvixfs gc`` and writers apart (gcguard.py)

Crash safety comes from ordering, not from a journal of our own: a chunk is written to a
temporary name in its final directory and renamed; a blob put then records its row as pending,
and every commit first makes all pending chunk files durable with one barrier and commits
their rows with it (group commit: localdb.py explains why that is safe across kill -9 and OS
crashes). A path info is only committed once its whole tree is present, so a killed import
leaves either nothing or a complete path, plus what it stored so far: temporary files, blobs
and directories nothing refers to (``tvixfs fsck`` counts them, ``tvixfs gc`` frees them).

Nothing holds a database connection while a caller consumes a stream, so slow readers never
block writers or each other.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Concatenate, Literal, ParamSpec, Protocol, TypeVar

from tvixfs.castore.chunking import chunk_stream
from tvixfs.castore.digest import DIGEST_SIZE, b3digest, check_digest, new_hasher
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvixfs.protos import castore_pb2, pathinfo_pb2
from tvixfs.services.backends.chunkfiles import ChunkFiles
from tvixfs.services.backends.localdb import DB_NAME, LocalBackend, pack_chunks, unpack_chunks
from tvixfs.services.backends.memoryfs import in_memory
from tvixfs.services.base import (
    BlobCapabilities,
    BlobService,
    ChunkMeta,
    DirectoryService,
    ForkedWriter,
    PathInfoService,
    Store,
)
from tvixfs.services.checks import check_closure, check_pathinfo, settle_put
from tvixfs.services.errors import CorruptDataError, FailedPreconditionError, NotFoundError
from tvixfs.services.narhash import store_nar_hash
from tvixfs.store.pathinfo import validate_pathinfo

_LIST_PAGE = 256
_QUERY_BATCH = 500  # digests per IN (...) query, well below SQLite's limit on parameters

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _OnBackend(Protocol):
    _backend: LocalBackend


_S = TypeVar("_S", bound=_OnBackend)


def _guarded(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """A write method run as one write: gc waits until what it relies on is committed (gcguard.py)."""

    @functools.wraps(method)
    def guarded(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._backend.writing():
            return method(self, *args, **kwargs)

    return guarded


class LocalBlobService(BlobService):
    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend
        self._chunks = backend.chunks
        # Chunk files are hashed as read.
        self.capabilities = BlobCapabilities(
            verifies_chunk_reads=True, reads_from_memory=in_memory(backend.chunks.root)
        )

    def _chunk_list(self, digest: bytes) -> list[ChunkMeta] | None:
        packed = self._backend.pending_chunks(digest)
        if packed is None:
            row = self._backend.fetch_one("SELECT chunks FROM blobs WHERE digest = ?", (digest,))
            packed = None if row is None else bytes(row[0])
        return None if packed is None else unpack_chunks(packed)

    def first_absent(self, digests: Iterable[bytes]) -> bytes | None:
        """The first of ``digests`` that ``stat`` would not find, asked in a few queries.

        A path info's check covers every file of its tree: one query per blob took ~0.15 s
        for a tree of 8 000 files.
        """
        unknown = [d for d in digests if self._backend.pending_chunks(d) is None]
        for start in range(0, len(unknown), _QUERY_BATCH):
            batch = unknown[start : start + _QUERY_BATCH]
            with self._backend.connection() as conn:
                found = {
                    bytes(row[0])
                    for row in conn.execute(
                        f"SELECT digest FROM blobs WHERE digest IN ({', '.join('?' * len(batch))})", batch
                    )
                }
            absent = next((d for d in batch if d not in found), None)
            if absent is not None:
                return absent
        return None

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        """Present means put by this process or committed; a bare chunk file may be a leftover."""
        check_digest(digest)
        chunks = self._chunk_list(digest)
        if chunks is None:
            return None
        return chunks if send_chunks and len(chunks) > 1 else []

    def read(self, digest: bytes) -> Iterator[bytes]:
        check_digest(digest)
        # A chunk file first: the mount reads chunks by digest, and a one-chunk blob is its
        # chunk. Read at once: opening it is how to learn whether it is there.
        whole = self._chunks.read_if_present(digest)
        if whole is not None:
            return iter((whole,))
        chunks = self._chunk_list(digest)
        if chunks is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        return (self._chunks.read(c.digest, c.size) for c in chunks)

    def read_resident(self, digest: bytes, size: int) -> bytes | None:
        # Only a chunk file's bytes (a one-chunk blob is its chunk): a blob of several is
        # read the ordinary way.
        return self._chunks.read_resident(digest, size) if len(digest) == DIGEST_SIZE else None

    def read_into(self, digest: bytes, views: Sequence[memoryview]) -> None:
        check_digest(digest)
        if not self._chunks.read_into(digest, views):  # not one chunk: a blob of several, or none
            super().read_into(digest, views)

    @_guarded
    def put(self, data: Iterable[bytes]) -> bytes:
        """Chunk, hash and write; the blob's row is committed by the backend's next commit."""
        self._backend.check_writable()
        digest, size, packed = write_blob(self._chunks, data)
        self._backend.add_blob(digest, size, packed)
        return digest

    def forked_writer(self) -> ForkedWriter:
        """An import's worker processes write chunk files with ``write_blob`` themselves."""
        files = self._chunks
        return ForkedWriter(
            lambda data: write_blob(files, data), self.add_written, self.writing, self.gc_waiting
        )

    def writing(self) -> AbstractContextManager[None]:
        """Around writes by other processes (an import's workers): keeps gc out meanwhile."""
        return self._backend.writing()

    def gc_waiting(self) -> bool:
        """Whether a gc waits: a long ``writing`` should end, once its work is recorded."""
        return self._backend.gc_waiting()

    def add_written(self, digest: bytes, size: int, packed_chunks: bytes) -> None:
        """A blob whose chunk files ``write_blob`` wrote elsewhere, as if put here.

        The next commit's barrier (syncfs) makes them durable, whichever process wrote them.
        """
        self._backend.add_blob(digest, size, packed_chunks)

    def close(self) -> None:
        self._backend.close()


class LocalDirectoryService(DirectoryService):
    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend

    def _stored(self, digest: bytes) -> bool:
        return self._backend.fetch_one("SELECT 1 FROM directories WHERE digest = ?", (digest,)) is not None

    def get(self, digest: bytes) -> Directory | None:
        check_digest(digest)
        with self._backend.connection() as conn:
            return _load_directory(conn, digest)

    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        """The whole closure read in one snapshot, so a concurrent writer never tears it."""
        check_digest(digest)
        with self._backend.connection() as conn:
            conn.execute("BEGIN")
            try:
                closure = _load_closure(conn, digest)
            finally:
                conn.execute("COMMIT")
        return iter(closure)

    def get_recursive_encoded(self, digest: bytes) -> list[bytes]:
        """The closure as stored (services/encodedclosure.py), read in one snapshot like
        ``get_recursive``. Rows hold the canonical encoding ``put_many`` wrote, after it had
        validated the directory: the digest check proves a row is still that."""
        check_digest(digest)
        with self._backend.connection() as conn:
            conn.execute("BEGIN")
            try:
                return _load_closure_encoded(conn, digest)
            finally:
                conn.execute("COMMIT")

    @_guarded
    def put_many(self, directories: Iterable[Directory]) -> bytes:
        # Checked before the write transaction: the stream may come from a slow client, and
        # stored directories are never removed (except by fsck --repair, run offline).
        batch = check_closure(directories, self._stored)
        with self._backend.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO directories VALUES (?, ?)",
                ((digest, d.to_bytes()) for digest, d in batch.items()),
            )
            self._backend.pin(conn, batch)
        return next(reversed(batch))

    def close(self) -> None:
        self._backend.close()


def _load_directory(conn: sqlite3.Connection, digest: bytes) -> Directory | None:
    row = conn.execute("SELECT data FROM directories WHERE digest = ?", (digest,)).fetchone()
    if row is None:
        return None
    # Rows hold the canonical encoding (put_many writes ``to_bytes``, fsck checks it), so the
    # stored bytes' hash is the directory's digest: checked without encoding it again.
    try:
        directory = Directory.from_canonical_bytes(bytes(row[0]))
    except ValidationError as e:
        raise CorruptDataError(f"stored directory {digest.hex()} is invalid: {e}") from None
    if directory.digest() != digest:
        raise CorruptDataError(f"stored directory {digest.hex()} does not match its digest")
    return directory


def _load_closure(conn: sqlite3.Connection, root: bytes) -> list[Directory]:
    first = _load_directory(conn, root)
    if first is None:
        raise NotFoundError(f"directory {root.hex()} not found")
    closure = [first]
    seen = {root}
    queue = deque([first])
    while queue:
        for child in queue.popleft().directories:
            if child.digest in seen:
                continue
            seen.add(child.digest)
            found = _load_directory(conn, child.digest)
            if found is None:
                raise CorruptDataError(
                    f"stored directory tree {root.hex()} lacks subdirectory {child.digest.hex()}"
                )
            closure.append(found)
            queue.append(found)
    return closure


def _load_closure_encoded(conn: sqlite3.Connection, root: bytes) -> list[bytes]:
    closure: list[bytes] = []
    seen = {root}
    queue = deque([root])
    while queue:
        digest = queue.popleft()
        row = conn.execute("SELECT data FROM directories WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            if digest == root:
                raise NotFoundError(f"directory {root.hex()} not found")
            raise CorruptDataError(f"stored directory tree {root.hex()} lacks subdirectory {digest.hex()}")
        data = bytes(row[0])
        if b3digest(data) != digest:
            raise CorruptDataError(f"stored directory {digest.hex()} does not match its digest")
        closure.append(data)
        # Only the children's digests are needed; the directory was validated when stored.
        for child in castore_pb2.Directory.FromString(data).directories:
            if child.digest not in seen:
                seen.add(child.digest)
                queue.append(child.digest)
    return closure


class LocalPathInfoService(PathInfoService):
    def __init__(
        self, backend: LocalBackend, blobs: LocalBlobService, directories: LocalDirectoryService
    ) -> None:
        self._backend = backend
        self._blobs = blobs
        self._directories = directories

    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        row = self._backend.fetch_one("SELECT data FROM pathinfos WHERE hash = ?", (output_hash,))
        return None if row is None else _parse_pathinfo(bytes(row[0]))

    @_guarded
    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        store_path = check_pathinfo(info, self._blobs, self._directories)
        _, node = validate_pathinfo(info)
        self._check_complete(node, store_path.basename)
        with self._backend.transaction() as conn:  # BEGIN IMMEDIATE: no other writer in between
            row = conn.execute("SELECT data FROM pathinfos WHERE hash = ?", (store_path.digest,)).fetchone()
            existing = None if row is None else _parse_pathinfo(bytes(row[0]))
            stored = settle_put(store_path, existing, info)
            if stored is None:
                assert existing is not None
                return existing
            conn.execute(
                "INSERT OR REPLACE INTO pathinfos VALUES (?, ?)",
                (store_path.digest, stored.SerializeToString(deterministic=True)),
            )
        return stored

    def _check_complete(self, node: Node, name: str) -> None:
        """Refuse a path info whose tree is not wholly present: a crash must never leave one."""
        files: list[bytes] = [node.digest] if isinstance(node, FileNode) else []
        if isinstance(node, DirectoryNode):
            for directory in self._directories.get_recursive(node.digest):
                files.extend(f.digest for f in directory.files)
        absent = self._blobs.first_absent(dict.fromkeys(files))
        if absent is not None:
            raise FailedPreconditionError(f"{name}: blob {absent.hex()} of its tree is not in the store")

    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        """Paged by key, so no connection is held while the caller consumes the stream."""
        after = b""
        while True:
            with self._backend.connection() as conn:
                rows = conn.execute(
                    "SELECT hash, data FROM pathinfos WHERE hash > ? ORDER BY hash LIMIT ?",
                    (after, _LIST_PAGE),
                ).fetchall()
            for key, data in rows:
                yield _parse_pathinfo(bytes(data))
                after = bytes(key)
            if len(rows) < _LIST_PAGE:
                return

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """Cached per content (not name): rendering a large tree's NAR is the slow part."""
        if isinstance(node, SymlinkNode):
            return store_nar_hash(node, self._blobs, self._directories)
        key = nar_cache_key(node)
        row = self._backend.fetch_one("SELECT nar_size, nar_sha256 FROM nar_cache WHERE node = ?", (key,))
        present = (
            self._blobs.has(node.digest)
            if isinstance(node, FileNode)
            else self._directories.get(node.digest) is not None
        )
        if row is not None and present:
            return int(row[0]), bytes(row[1])
        size, sha256 = store_nar_hash(node, self._blobs, self._directories)
        with self._backend.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO nar_cache VALUES (?, ?, ?)", (key, size, sha256))
        return size, sha256

    def close(self) -> None:
        self._backend.close()


def write_blob(files: ChunkFiles, data: Iterable[bytes]) -> tuple[bytes, int, bytes]:
    """Chunk, hash and write a blob's chunk files: (digest, size, packed chunk list).

    Chunks are written by the caller's thread: unsynced writes only copy into the page
    cache, and handing them to writer threads cost more CPU than it saved in time (a 45 MB
    file: 0.13 s of CPU with threads, 0.10 s inline, the same 0.1 s wall). A blob of one
    chunk (most files) has that chunk's digest, so its bytes are hashed once.
    """
    whole = new_hasher()
    chunks: list[ChunkMeta] = []
    first: memoryview | None = None
    for chunk in chunk_stream(data):
        digest = b3digest(chunk)
        files.write(digest, chunk)
        chunks.append(ChunkMeta(digest, len(chunk)))
        if len(chunks) == 1:
            first = chunk
            continue
        if first is not None:
            whole.update(first)
            first = None
        whole.update(chunk)
    blob: bytes = chunks[0].digest if len(chunks) == 1 else whole.digest()
    return blob, sum(c.size for c in chunks), pack_chunks(chunks)


def nar_cache_key(node: DirectoryNode | FileNode) -> bytes:
    """What a node's NAR depends on: its kind, executable bit and digest, not its name."""
    if isinstance(node, DirectoryNode):
        return b"d" + node.digest
    return (b"x" if node.executable else b"f") + node.digest


def _parse_pathinfo(data: bytes) -> pathinfo_pb2.PathInfo:
    info = pathinfo_pb2.PathInfo()
    try:
        info.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError is not part of its typed API
        raise CorruptDataError(f"stored path info is undecodable: {e}") from None
    return info


# When opening may create a store where there is none (see open_local_store).
Creation = Literal["always", "never", "in-existing-directory"]


def open_local_store(path: Path, create: Creation = "always") -> Store:
    """Open the embedded store at ``path``; a missing one is created as ``create`` says.

    ``"never"`` (the commands that only read) refuses a path with no store, so that a typo
    does not become a new empty store; ``"in-existing-directory"`` (the daemon) creates one
    only in a directory that exists, as systemd's StateDirectory= makes it. Unless it may
    always create, a store whose directory is not writable, as on a snapshot or read-only
    media, is opened read-only instead of refused.
    """
    may_create = create == "always" or (create == "in-existing-directory" and path.is_dir())
    read_only = create != "always" and (path / DB_NAME).exists() and not os.access(path, os.W_OK | os.X_OK)
    backend = LocalBackend(path, create=may_create, read_only=read_only)
    blobs = LocalBlobService(backend)
    directories = LocalDirectoryService(backend)
    return Store(blobs, directories, LocalPathInfoService(backend, blobs, directories))
