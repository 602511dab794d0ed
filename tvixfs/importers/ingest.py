"""Imports into a store: real trees (the way ``nix-store --add`` does) and NAR streams.

Order is what makes an import crash-safe: blobs first, then directories (leaves first), and
the PathInfo last, so a store path becomes visible only once everything below it is stored.
A killed import leaves at most unreferenced blobs and directories.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO

from tvixfs.castore.digest import b3digest, new_hasher
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import FileNode, Node, SymlinkNode, node_to_proto, rename
from tvixfs.importers.chunkworkers import ChunkWorkers, WorkerError
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import BlobService, ForkedWriter, Store
from tvixfs.services.errors import CorruptDataError, FailedPreconditionError, StoreError
from tvixfs.store import nar
from tvixfs.store.nixtext import format_hash
from tvixfs.store.storepath import StorePath, check_name, source_store_path

# Files up to this size are read whole: put by a worker thread ahead of the NAR hash (remote
# stores), or by the importing thread when the chunk workers are busy; larger ones are
# streamed in READ_PIECE pieces.
WHOLE_FILE_MAX = 4 << 20
READ_PIECE = 1 << 20
# How far the workers may run ahead of the NAR hash: bounds memory and open work.
AHEAD_BYTES = 64 << 20
AHEAD_ENTRIES = 2048
# How far ahead of its reads an import into an embedded store asks the kernel to read files
# (``_prefetched``): a tree not in the page cache is then read while earlier files are hashed.
PREFETCH_BYTES = 16 << 20
PREFETCH_ENTRIES = 256
# Puts to a remote store mostly wait for the network: more workers than cores pay.
WORKERS = 8
# Processes that write chunk files for an import into an embedded store (chunkworkers.py),
# started once an import has this many files or bytes (forking one has a cost). One, as the
# importing process takes files itself whenever it is ahead (figures: bench/ANALYSIS.md).
CHUNK_WORKERS = 1
PARALLEL_FILES = 64
PARALLEL_BYTES = 16 << 20
# How often an import with chunk workers looks whether a gc waits for it to make way.
GC_CHECK_EVERY = 0.5

Progress = Callable[[int, int], None]
"""Called after each file with (files imported, bytes imported) so far."""


class IngestError(StoreError):
    """A tree that cannot be imported as it is: unsupported file type, changed while read."""


@dataclass(frozen=True, slots=True)
class _Open:
    name: bytes


@dataclass(frozen=True, slots=True)
class _Close:
    pass


@dataclass(frozen=True, slots=True)
class _File:
    name: bytes
    path: bytes
    size: int
    executable: bool


@dataclass(frozen=True, slots=True)
class _Link:
    name: bytes
    target: bytes


_Event = _Open | _Close | _File | _Link


def _classify(name: bytes, path: bytes, st: os.stat_result) -> _Event:
    if stat.S_ISDIR(st.st_mode):
        return _Open(name)
    if stat.S_ISREG(st.st_mode):
        # Nix looks at the owner's execute bit only.
        return _File(name, path, st.st_size, bool(st.st_mode & stat.S_IXUSR))
    if stat.S_ISLNK(st.st_mode):
        return _Link(name, os.readlink(path))
    raise IngestError(f"{os.fsdecode(path)}: unsupported file type (not a file, directory or symlink)")


def _sorted_entries(path: bytes) -> Iterator[os.DirEntry[bytes]]:
    with os.scandir(path) as it:
        return iter(sorted(it, key=lambda e: e.name))


def _walk(path: bytes) -> Iterator[_Event]:
    """The tree at ``path`` in NAR order (depth first, names sorted bytewise), lstat only."""
    root = _classify(b"", path, os.lstat(path))
    yield root
    if not isinstance(root, _Open):
        return
    stack = [_sorted_entries(path)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            yield _Close()
            continue
        event = _classify(entry.name, entry.path, entry.stat(follow_symlinks=False))
        yield event
        if isinstance(event, _Open):
            stack.append(_sorted_entries(entry.path))


def _read_pieces(path: bytes, size: int, piece: int) -> Iterator[bytes]:
    """The bytes of a file, checked against the size the walk saw."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        seen = 0
        while data := os.read(fd, want := min(piece, size - seen + 1)):
            seen += len(data)
            if seen > size:
                break
            yield data
            # A short read of a regular file ends at its end: no read of nothing to confirm it.
            if seen == size and len(data) < want:
                break
    finally:
        os.close(fd)
    if seen != size:
        raise IngestError(f"{os.fsdecode(path)}: changed while being imported ({size} -> {seen} bytes)")


def _load(blobs: BlobService, file: _File) -> tuple[bytes, bytes]:
    """Read a small file whole and put it: (digest, bytes); runs on a worker thread."""
    data = b"".join(_read_pieces(file.path, file.size, WHOLE_FILE_MAX + 1))
    return blobs.put((data,)), data


_Loaded = Future[tuple[bytes, bytes]]


def _ahead(
    events: Iterator[_Event], pool: ThreadPoolExecutor | None, blobs: BlobService
) -> Iterator[tuple[_Event, _Loaded | None]]:
    """The walk in order, small files already submitted to the workers, within a bounded window.

    Without a pool every file is left to the caller.
    """
    if pool is None:
        yield from ((event, None) for event in events)
        return
    window: deque[tuple[_Event, _Loaded | None, int]] = deque()
    ahead_bytes = 0
    while True:
        while ahead_bytes < AHEAD_BYTES and len(window) < AHEAD_ENTRIES:
            event = next(events, None)
            if event is None:
                break
            if isinstance(event, _File) and event.size <= WHOLE_FILE_MAX:
                window.append((event, pool.submit(_load, blobs, event), event.size))
                ahead_bytes += event.size
            else:
                window.append((event, None, 0))
        if not window:
            return
        event, future, size = window.popleft()
        ahead_bytes -= size
        yield event, future


def _prefetched(events: Iterator[_Event]) -> Iterator[_Event]:
    """The walk in order, each file's first ``PREFETCH_BYTES`` asked for (``POSIX_FADV_WILLNEED``)
    up to ``PREFETCH_BYTES`` and ``PREFETCH_ENTRIES`` before its turn.

    The importing thread reads files one after another and waits for each read from disk; the
    kernel reads the files asked for meanwhile, several at once.
    """
    window: deque[_Event] = deque()
    ahead = 0
    for event in events:
        window.append(event)
        if isinstance(event, _File) and event.size:
            _will_need(event.path, event.size)
            ahead += event.size
        while ahead > PREFETCH_BYTES or len(window) > PREFETCH_ENTRIES:
            done = window.popleft()
            if isinstance(done, _File):
                ahead -= done.size
            yield done
    yield from window


def _will_need(path: bytes, size: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return  # the file's own read reports what is wrong
    try:
        os.posix_fadvise(fd, 0, min(size, PREFETCH_BYTES), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


class _NarHasher:
    """sha256 and size of NAR bytes, small writes gathered so hashlib sees few large updates."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._buf = bytearray(nar.MAGIC)
        self.size = 0

    def write(self, data: bytes) -> None:
        if len(data) >= nar.PIECE:
            self._flush()
            self._sha.update(data)
            self.size += len(data)
            return
        self._buf += data
        if len(self._buf) >= nar.PIECE:
            self._flush()

    def _flush(self) -> None:
        self._sha.update(self._buf)
        self.size += len(self._buf)
        self._buf.clear()

    def digest(self) -> bytes:
        self._flush()
        return self._sha.digest()


def ingest_path(
    store: Store, path: str | bytes, name: str, progress: Progress | None = None
) -> pathinfo_pb2.PathInfo:
    """Import a file, directory or symlink as ``nix-store --add`` would; returns its PathInfo.

    The importing thread feeds every file's bytes, in NAR order, to the NAR sha256 (the store
    path depends on it); how blobs are put depends on the store (``_import_tree``).
    """
    check_name(name)
    hasher = _NarHasher()
    tree = nar.TreeBuilder()
    try:
        root = _import_tree(store, os.fsencode(path), hasher, tree, progress)
    except OSError as e:
        where = os.fsdecode(e.filename) if e.filename is not None else os.fsdecode(path)
        raise IngestError(f"cannot import {where}: {e.strerror or e}") from None
    nar_sha256 = hasher.digest()
    store_path = source_store_path(nar_sha256, name)
    narinfo = pathinfo_pb2.NARInfo(
        nar_size=hasher.size,
        nar_sha256=nar_sha256,
        ca=pathinfo_pb2.NARInfo.CA(type=pathinfo_pb2.NARInfo.CA.NAR_SHA256, digest=nar_sha256),
    )
    directories = list(tree.directories.values())
    return _commit(store, store_path, root, directories=directories, narinfo=narinfo, references=())


def _import_tree(
    store: Store, path: bytes, hasher: _NarHasher, tree: nar.TreeBuilder, progress: Progress | None
) -> Node:
    """Put every blob of the tree, build its directories in ``tree``; returns the root node.

    A remote store (``calls_are_remote``: its calls go to another process) gets worker threads,
    as its puts wait for the network. A put into an embedded store is CPU work, most of it
    holding the GIL: threads only turned it into contention (the GIL changed hands on every
    syscall: an import of a Python install, 8 300 entries, took 1.8-2.2 s of CPU with 8 or 2
    threads against 1.1-1.3 s inline, and no less time). Its chunk files are written by
    worker processes instead (chunkworkers.py), once the tree proves big enough to pay for
    starting one; until then, and into other stores, files are put inline.
    """
    files = imported = 0
    pool = (
        ThreadPoolExecutor(WORKERS, thread_name_prefix="tvixfs-ingest")
        if store.blobs.capabilities.calls_are_remote
        else None
    )
    forked = store.blobs.forked_writer()
    workers: ChunkWorkers | None = None
    held = ExitStack()  # keeps gc out while workers write chunks not recorded here yet (gcguard.py)
    gc_check = 0.0
    try:
        walk = _walk(path) if pool is not None else _prefetched(_walk(path))
        for event, loaded in _ahead(walk, pool, store.blobs):
            node: Node | None = None
            if tree.depth and not isinstance(event, _Close):
                hasher.write(nar.entry_open(event.name))
            if isinstance(event, _Open):
                hasher.write(nar.DIRECTORY_OPEN)
                tree.open_directory(event.name)
            elif isinstance(event, _Close):
                hasher.write(nar.DIRECTORY_CLOSE)
                node = tree.close_directory()
            elif isinstance(event, _Link):
                hasher.write(nar.symlink(event.target))
                node = SymlinkNode(event.name, event.target)
            else:
                if (
                    forked is not None
                    and workers is None
                    and (files >= PARALLEL_FILES or imported + event.size >= PARALLEL_BYTES)
                ):
                    held.enter_context(forked.holding())
                    workers = _chunk_workers(forked)
                node = _import_file(event, loaded, workers, store.blobs, hasher)
                if forked is not None and workers is not None and time.monotonic() >= gc_check:
                    gc_check = _make_way_for_gc(forked, workers, held)
                files += 1
                imported += event.size
                if progress is not None:
                    progress(files, imported)
            if node is None:
                continue
            if not tree.depth:
                if workers is not None:
                    workers.drain()
                return node
            hasher.write(nar.ENTRY_CLOSE)
            tree.add(node)
    except WorkerError as e:
        raise IngestError(str(e)) from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if workers is not None:
            workers.close()
        held.close()
    raise AssertionError("a walk always ends with its root")


def _import_file(
    file: _File, loaded: _Loaded | None, workers: ChunkWorkers | None, blobs: BlobService, hasher: _NarHasher
) -> FileNode:
    """The file's NAR bytes into ``hasher``; its blob put by whichever way the import uses."""
    hasher.write(nar.file_open(file.size, file.executable))
    if loaded is not None:
        digest, data = loaded.result()
        hasher.write(data)
    elif workers is None:
        digest = blobs.put(_hashed(_read_pieces(file.path, file.size, READ_PIECE), hasher))
    elif file.size > WHOLE_FILE_MAX:
        digest = _digest(_hashed(_read_pieces(file.path, file.size, READ_PIECE), hasher))
        workers.submit(file.path, file.size, digest)
    else:
        pieces = list(_hashed(_read_pieces(file.path, file.size, READ_PIECE), hasher))
        if workers.ready():
            digest = _digest(pieces)
            workers.submit(file.path, file.size, digest)
        else:  # rather than wait for the workers, write it here: both cores stay busy
            digest = blobs.put(pieces)
    hasher.write(nar.file_close(file.size))
    return FileNode(file.name, digest, file.size, file.executable)


def _make_way_for_gc(forked: ForkedWriter, workers: ChunkWorkers, held: ExitStack) -> float:
    """If a gc waits, let it run once the workers' files are recorded; when to look again.

    An import with workers holds the gc lock throughout (``held``), so that gc never sees
    chunk files written but not recorded yet: without this, gc would wait for the import.
    """
    if forked.collector_waiting():
        workers.drain()
        held.close()  # commits, and gives way to gc
        held.enter_context(forked.holding())
    return time.monotonic() + GC_CHECK_EVERY


def _chunk_workers(forked: ForkedWriter) -> ChunkWorkers:
    write = forked.write
    return ChunkWorkers(
        CHUNK_WORKERS, lambda path, size: write(_read_pieces(path, size, READ_PIECE)), forked.record
    )


def _digest(pieces: Iterable[bytes]) -> bytes:
    """The BLAKE3 digest of the pieces together: the digest of the blob they make."""
    rest = iter(pieces)
    first = next(rest, b"")
    second = next(rest, None)
    if second is None:
        return b3digest(first)
    hasher = new_hasher()
    hasher.update(first)
    hasher.update(second)
    for piece in rest:
        hasher.update(piece)
    return hasher.digest()


def _hashed(pieces: Iterable[bytes], hasher: _NarHasher) -> Iterator[bytes]:
    for piece in pieces:
        hasher.write(piece)
        yield piece


class _BackgroundPuts:
    """Small blobs are put by workers while the NAR is parsed on; large ones stream inline.

    A small blob's digest is computed here (BLAKE3 costs little next to a store's put), so the
    parser goes on at once; ``wait`` returns once every put is done, before anything may refer
    to the blobs.
    """

    def __init__(self, blobs: BlobService, pool: ThreadPoolExecutor) -> None:
        self._blobs = blobs
        self._pool = pool
        self._pending: deque[tuple[Future[bytes], bytes, int]] = deque()
        self._pending_bytes = 0

    def put(self, pieces: Iterable[bytes]) -> bytes:
        rest = iter(pieces)
        head: list[bytes] = []
        size = 0
        for piece in rest:
            head.append(piece)
            size += len(piece)
            if size > WHOLE_FILE_MAX:
                return self._blobs.put(itertools.chain(head, rest))
        data = b"".join(head)
        digest = b3digest(data)
        self._pending.append((self._pool.submit(self._blobs.put, (data,)), digest, size))
        self._pending_bytes += size
        while self._pending_bytes > AHEAD_BYTES or len(self._pending) > AHEAD_ENTRIES:
            self._settle_oldest()
        return digest

    def _settle_oldest(self) -> None:
        future, digest, size = self._pending.popleft()
        self._pending_bytes -= size
        stored = future.result()
        if stored != digest:
            raise CorruptDataError(f"blob store stored {stored.hex()} for data with digest {digest.hex()}")

    def wait(self) -> None:
        while self._pending:
            self._settle_oldest()


def ingest_nar(
    store: Store,
    stream: IO[bytes],
    store_path: StorePath,
    references: Sequence[StorePath] = (),
    narinfo: pathinfo_pb2.NARInfo | None = None,
) -> pathinfo_pb2.PathInfo:
    """Import the NAR read from ``stream`` as ``store_path``; returns its PathInfo.

    ``narinfo`` carries what the source knows (signatures, deriver, ca); a nar_size or
    nar_sha256 set in it is an expectation: on a mismatch nothing is committed. Worker
    threads put blobs only into a remote store, as in ``_import_tree``: for the NAR of a
    Python install (8 300 entries) into an embedded store they cost 2.2 s of CPU against
    1.7 s inline, and 2.1 s against 1.8 s of time.
    """
    _check_references(store, store_path, references)
    contents = read_nar_blobs(store, stream, store_path.basename.encode())
    info = pathinfo_pb2.NARInfo()
    if narinfo is not None:
        info.CopyFrom(narinfo)
        if narinfo.nar_sha256 and narinfo.nar_sha256 != contents.nar_sha256:
            raise CorruptDataError(
                f"{store_path}: the NAR has hash {format_hash(contents.nar_sha256)}, "
                f"expected {format_hash(narinfo.nar_sha256)}; not imported"
            )
        if narinfo.nar_size and narinfo.nar_size != contents.nar_size:
            raise CorruptDataError(
                f"{store_path}: the NAR has {contents.nar_size} bytes, "
                f"expected {narinfo.nar_size}; not imported"
            )
    info.nar_size = contents.nar_size
    info.nar_sha256 = contents.nar_sha256
    return _commit(
        store,
        store_path,
        contents.root,
        directories=contents.directories,
        narinfo=info,
        references=references,
    )


def _check_references(store: Store, store_path: StorePath, references: Sequence[StorePath]) -> None:
    """Nix accepts a path only when what it refers to is valid: a closure is never incomplete."""
    for ref in references:
        if ref != store_path and store.pathinfos.get(ref.digest) is None:
            raise FailedPreconditionError(
                f"{store_path}: its reference {ref} is not in the store; import that first "
                "(import-nix --recursive imports a whole closure)"
            )


def read_nar_blobs(store: Store, stream: IO[bytes], name: bytes) -> nar.NarContents:
    """Parse a NAR, putting its blobs; its directories are returned, not yet stored."""
    if not store.blobs.capabilities.calls_are_remote:
        return nar.read_nar(stream, name, store.blobs.put)
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="tvixfs-ingest")
    try:
        puts = _BackgroundPuts(store.blobs, pool)
        contents = nar.read_nar(stream, name, puts.put)
        puts.wait()
        return contents
    finally:
        pool.shutdown(cancel_futures=True)


def commit_stored(
    store: Store,
    store_path: StorePath,
    root: Node,
    narinfo: pathinfo_pb2.NARInfo,
    references: Sequence[StorePath],
) -> pathinfo_pb2.PathInfo:
    """The PathInfo for content whose blobs and directories are already stored."""
    return _commit(store, store_path, root, directories=[], narinfo=narinfo, references=references)


def _commit(
    store: Store,
    store_path: StorePath,
    root: Node,
    *,
    directories: list[Directory],
    narinfo: pathinfo_pb2.NARInfo,
    references: Sequence[StorePath],
) -> pathinfo_pb2.PathInfo:
    """Directories (leaves first), then the PathInfo: the path appears only when complete."""
    if directories:
        store.directories.put_many(directories)
    refs = sorted(set(references), key=lambda r: r.basename)
    del narinfo.reference_names[:]
    narinfo.reference_names.extend(r.basename for r in refs)
    info = pathinfo_pb2.PathInfo(
        node=node_to_proto(rename(root, store_path.basename.encode())),
        references=[r.digest for r in refs],
        narinfo=narinfo,
    )
    return store.pathinfos.put(info)
