"""``s3://``: all three services on S3-compatible object storage, in tvix-store's layout.

The objects and their encodings are in ``s3layout``; this module moves them. The bucket is
the only state, so any number of processes (mounts, ``tvixfs daemon``s, importers) can share
one: objects are content-addressed and written HEAD-then-PUT, never overwritten, and an import
writes chunks, then the blob object, then the directory tree, then the path info, so a path is
visible only once everything under it is there. An import that dies leaves only unreferenced
objects (``tvixfs fsck`` counts them). The S3 client is obstore (the Rust ``object_store``
crate tvix uses; chosen by measurement, bench/ANALYSIS.md): its calls block without holding
the GIL, so the services stay synchronous and thread-safe like every other backend.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

import obstore
from cachetools import LRUCache
from obstore.exceptions import NotFoundError as ObjectNotFound
from obstore.store import S3Store

from tvixfs.castore.chunking import chunk_stream
from tvixfs.castore.digest import EMPTY_DIGEST, b3digest, check_digest, new_hasher
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.services import s3layout
from tvixfs.services.base import (
    BlobCapabilities,
    BlobService,
    ChunkMeta,
    DirectoryService,
    PathInfoService,
    Store,
)
from tvixfs.services.checks import check_closure, check_pathinfo, settle_put
from tvixfs.services.errors import (
    CorruptDataError,
    NotFoundError,
    StoreUnavailableError,
)
from tvixfs.services.narhash import store_nar_hash
from tvixfs.services.s3url import S3Location
from tvixfs.store.pathinfo import validate_pathinfo

# Requests in flight at once for one blob's chunks (reads ahead, and puts).
WINDOW = 8
# Worker threads for those requests, shared by every blob of the store.
THREADS = 32
# A request that gets no answer fails after this; a dead endpoint is retried for at most
# RETRY_FOR, so that a read through a mount fails (EIO) well within the mount's own deadline.
TIMEOUT = "30s"
CONNECT_TIMEOUT = "5s"
RETRIES = 2
RETRY_FOR = timedelta(seconds=10)
# Directories (counted by entries) of recently read trees kept, so that ``get`` of a
# subdirectory (NAR rendering, ``tvixfs ls``) works although only roots are addressable.
SUBTREE_CACHE_ENTRIES = 1 << 16

T = TypeVar("T")


class S3Objects:
    """The bucket under the prefix as get / put-if-absent / list, with obstore's errors turned
    into the services' (absent: None; anything else: StoreUnavailableError)."""

    def __init__(self, location: S3Location) -> None:
        self.location = location
        config = {
            k: v
            for k, v in location.settings
            if k in ("endpoint", "region", "access_key_id", "secret_access_key")
        }
        token = location.setting("session_token")
        if token:
            config["session_token"] = token
        config.setdefault("region", "us-east-1")
        hosted = location.setting("virtual_hosted_style_request")
        self._store = S3Store(
            location.bucket,
            prefix=location.prefix or None,
            config=config,  # type: ignore[arg-type]  # a TypedDict built from pairs
            virtual_hosted_style_request=hosted == "true",
            client_options={
                "allow_http": location.setting("allow_http") == "true",
                "timeout": TIMEOUT,
                "connect_timeout": CONNECT_TIMEOUT,
            },
            retry_config={"max_retries": RETRIES, "retry_timeout": RETRY_FOR},
        )

    def _fail(self, key: str, error: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self.location.describe()}/{key}: {type(error).__name__}: {error}")

    def get(self, key: str) -> bytes | None:
        try:
            return obstore.get(self._store, key).bytes().to_bytes()
        except (ObjectNotFound, FileNotFoundError):  # obstore raises the latter for a 404
            return None
        except Exception as e:
            raise self._fail(key, e) from None

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self._store, key)
            return True
        except (ObjectNotFound, FileNotFoundError):  # obstore raises the latter for a 404
            return False
        except Exception as e:
            raise self._fail(key, e) from None

    def put_new(self, key: str, data: bytes) -> None:
        """HEAD then PUT, as tvix does: an object that exists is never written again."""
        if self.exists(key):
            return
        try:
            obstore.put(self._store, key, data)
        except Exception as e:
            raise self._fail(key, e) from None

    def put_over(self, key: str, data: bytes) -> None:
        """PUT whatever is there: only for a path info gaining signatures."""
        try:
            obstore.put(self._store, key, data)
        except Exception as e:
            raise self._fail(key, e) from None

    def keys(self, prefix: str) -> Iterator[str]:
        try:
            for page in obstore.list(self._store, prefix):
                for meta in page:
                    yield meta["path"]
        except Exception as e:
            raise self._fail(prefix, e) from None

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, key)
        except Exception as e:
            raise self._fail(key, e) from None


def _in_order(
    pool: ThreadPoolExecutor, fn: Callable[[ChunkMeta], T], items: Iterable[ChunkMeta]
) -> Iterator[T]:
    """``fn`` of each item, in order, with up to WINDOW of them running ahead."""
    pending: deque[Future[T]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= WINDOW:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


class S3BlobService(BlobService):
    # Every chunk is checked against its digest before it is yielded; every call is an HTTP request.
    capabilities = BlobCapabilities(verifies_chunk_reads=True, calls_are_remote=True)

    def __init__(self, objects: S3Objects, pool: ThreadPoolExecutor) -> None:
        self._objects = objects
        self._pool = pool

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        check_digest(digest)
        if digest == EMPTY_DIGEST or self._objects.exists(s3layout.chunk_key(digest)):
            return []
        data = self._objects.get(s3layout.blob_key(digest))
        return None if data is None else s3layout.decode_blob(data, digest)

    def read(self, digest: bytes) -> Iterator[bytes]:
        check_digest(digest)
        return self._read(digest)

    def _read(self, digest: bytes) -> Iterator[bytes]:
        if digest == EMPTY_DIGEST:  # as tvix: the empty blob needs no request
            yield b""
            return
        data = self._objects.get(s3layout.chunk_key(digest))
        if data is not None:
            yield s3layout.decode_chunk(data, digest)
            return
        listed = self._objects.get(s3layout.blob_key(digest))
        if listed is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        hasher = new_hasher()
        for plain in _in_order(self._pool, self._chunk, s3layout.decode_blob(listed, digest)):
            hasher.update(plain)
            yield plain
        if hasher.digest() != digest:
            raise CorruptDataError(f"blob {digest.hex()}: its chunks do not make up the blob")

    def _chunk(self, chunk: ChunkMeta) -> bytes:
        data = self._objects.get(s3layout.chunk_key(chunk.digest))
        if data is None:
            raise CorruptDataError(f"chunk {chunk.digest.hex()} is listed but not in the store")
        return s3layout.decode_chunk(data, chunk.digest, chunk.size)

    def put(self, data: Iterable[bytes]) -> bytes:
        hasher = new_hasher()
        chunks: list[ChunkMeta] = []
        pending: deque[Future[None]] = deque()
        sizes = (s3layout.MIN_CHUNK, s3layout.AVG_CHUNK, s3layout.MAX_CHUNK)
        for view in chunk_stream(data, sizes):
            hasher.update(view)
            chunk = ChunkMeta(b3digest(view), len(view))
            chunks.append(chunk)
            pending.append(self._pool.submit(self._put_chunk, chunk.digest, bytes(view)))
            while len(pending) > WINDOW:
                pending.popleft().result()
        for future in pending:
            future.result()
        digest: bytes = hasher.digest()
        # One chunk: its object is the blob's (same digest); the blob object lists nothing.
        self._objects.put_new(
            s3layout.blob_key(digest), s3layout.encode_blob(chunks if len(chunks) > 1 else [])
        )
        return digest

    def _put_chunk(self, digest: bytes, plain: bytes) -> None:
        self._objects.put_new(s3layout.chunk_key(digest), s3layout.encode_chunk(plain))


def _size(directory: Directory) -> int:
    return len(directory) + 1


class S3DirectoryService(DirectoryService):
    """Only roots are addressable (tvix's layout): ``get`` of a subdirectory answers from the
    trees read recently, else None; ``get_recursive`` works for roots only."""

    def __init__(self, objects: S3Objects) -> None:
        self._objects = objects
        self._recent: LRUCache[bytes, Directory] = LRUCache(SUBTREE_CACHE_ENTRIES, getsizeof=_size)
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> Directory | None:
        check_digest(digest)
        with self._lock:
            found = self._recent.get(digest)
        if found is not None:
            return found
        data = self._objects.get(s3layout.dir_key(digest))
        if data is None:
            return None
        tree = list(s3layout.decode_tree(data, digest))
        self._remember(tree)
        return tree[0]

    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        check_digest(digest)
        return self._tree(digest)

    def _tree(self, digest: bytes) -> Iterator[Directory]:
        data = self._objects.get(s3layout.dir_key(digest))
        if data is None:
            raise NotFoundError(f"directory {digest.hex()} not found (only roots are addressable)")
        yield from s3layout.decode_tree(data, digest)

    def _remember(self, tree: list[Directory]) -> None:
        with self._lock:
            for directory in reversed(tree):  # leaves first: they go first too
                if _size(directory) <= self._recent.maxsize:
                    self._recent[directory.digest()] = directory

    def put_many(self, directories: Iterable[Directory]) -> bytes:
        known: dict[bytes, Directory] = {}

        def stored(digest: bytes) -> bool:
            # A child sent in an earlier put is the root of its own object: take its tree in.
            data = self._objects.get(s3layout.dir_key(digest))
            if data is None:
                return False
            known.update((d.digest(), d) for d in s3layout.decode_tree(data, digest))
            return True

        batch = check_closure(directories, stored)
        referenced = {child.digest for d in batch.values() for child in d.directories}
        everything = {**known, **batch}
        for digest, directory in batch.items():
            if digest not in referenced:  # a root of this batch: one object for its tree
                tree = s3layout.tree_order(directory, everything)
                self._objects.put_new(s3layout.dir_key(digest), s3layout.encode_tree(tree))
        return next(reversed(batch))


class S3PathInfoService(PathInfoService):
    """One PathInfo object per store path hash (``pathinfos/<nixbase32>``); never replaced by a
    different one: a store path, once stored, is immutable."""

    def __init__(
        self, objects: S3Objects, pool: ThreadPoolExecutor, blobs: BlobService, directories: DirectoryService
    ) -> None:
        self._objects = objects
        self._pool = pool
        self._blobs = blobs
        self._directories = directories

    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        key = s3layout.pathinfo_key(output_hash)
        data = self._objects.get(key)
        if data is None:
            return None
        info = self._decode(key, data)
        if validate_pathinfo(info)[0].digest != output_hash:
            raise CorruptDataError(f"{key}: holds the PathInfo of another store path")
        return info

    @staticmethod
    def _decode(key: str, data: bytes) -> pathinfo_pb2.PathInfo:
        info = pathinfo_pb2.PathInfo()
        try:
            info.ParseFromString(data)
            validate_pathinfo(info)
        except Exception:  # protobuf's DecodeError or a ValidationError
            raise CorruptDataError(f"{key}: not a valid PathInfo") from None
        return info

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        """Immutable as in every backend (``settle_put``); only added signatures rewrite the
        object, which is ours (tvix has no object-store path infos)."""
        store_path = check_pathinfo(info, self._blobs, self._directories)
        existing = self.get(store_path.digest)
        stored = settle_put(store_path, existing, info)
        if stored is None:
            assert existing is not None
            return existing
        data = stored.SerializeToString(deterministic=True)
        key = s3layout.pathinfo_key(store_path.digest)
        if existing is None:
            self._objects.put_new(key, data)
        else:
            self._objects.put_over(key, data)
        return stored

    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        keys = list(self._objects.keys(s3layout.PATHINFOS))

        def fetch(key: str) -> pathinfo_pb2.PathInfo | None:
            data = self._objects.get(key)
            return None if data is None else self._decode(key, data)

        for info in self._pool.map(fetch, keys):
            if info is not None:
                yield info

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return store_nar_hash(node, self._blobs, self._directories)


class _S3Store(Store):
    def __init__(self, objects: S3Objects) -> None:
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="s3")
        blobs = S3BlobService(objects, self._pool)
        directories = S3DirectoryService(objects)
        super().__init__(blobs, directories, S3PathInfoService(objects, self._pool, blobs, directories))
        self.objects = objects

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def open_s3_store(location: S3Location) -> Store:
    return _S3Store(S3Objects(location))
