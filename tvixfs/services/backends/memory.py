"""``memory://``: a store in process memory, for tests and demos. Thread-safe, lost at exit."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator

from tvixfs.castore.digest import check_digest, new_hasher
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import (
    BlobService,
    ChunkMeta,
    DirectoryService,
    PathInfoService,
    Store,
)
from tvixfs.services.checks import check_closure, check_pathinfo, settle_put
from tvixfs.services.errors import NotFoundError
from tvixfs.services.narhash import store_nar_hash

READ_PIECE = 1 << 20


class MemoryBlobService(BlobService):
    def __init__(self) -> None:
        self._blobs: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        check_digest(digest)
        return [] if digest in self._blobs else None

    def read(self, digest: bytes) -> Iterator[bytes]:
        check_digest(digest)
        data = self._blobs.get(digest)
        if data is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        return (data[i : i + READ_PIECE] for i in range(0, max(len(data), 1), READ_PIECE))

    def put(self, data: Iterable[bytes]) -> bytes:
        hasher = new_hasher()
        parts = []
        for piece in data:
            hasher.update(piece)
            parts.append(bytes(piece))
        digest: bytes = hasher.digest()
        with self._lock:
            self._blobs.setdefault(digest, b"".join(parts))
        return digest


class MemoryDirectoryService(DirectoryService):
    def __init__(self) -> None:
        self._dirs: dict[bytes, Directory] = {}
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> Directory | None:
        check_digest(digest)
        return self._dirs.get(digest)

    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        root = self.get(digest)
        if root is None:
            raise NotFoundError(f"directory {digest.hex()} not found")
        return self._walk(root)

    def _walk(self, root: Directory) -> Iterator[Directory]:
        seen: set[bytes] = set()
        queue = deque([root])
        while queue:
            directory = queue.popleft()
            yield directory
            for child in directory.directories:
                if child.digest not in seen:
                    seen.add(child.digest)
                    found = self._dirs.get(child.digest)
                    if found is None:
                        raise NotFoundError(f"directory {child.digest.hex()} not found")
                    queue.append(found)

    def put_many(self, directories: Iterable[Directory]) -> bytes:
        with self._lock:
            batch = check_closure(directories, lambda d: d in self._dirs)
            self._dirs.update(batch)
        return next(reversed(batch))


class MemoryPathInfoService(PathInfoService):
    def __init__(self, blobs: BlobService, directories: DirectoryService) -> None:
        self._blobs = blobs
        self._directories = directories
        self._infos: dict[bytes, pathinfo_pb2.PathInfo] = {}
        self._lock = threading.Lock()

    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        return self._infos.get(output_hash)

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        store_path = check_pathinfo(info, self._blobs, self._directories)
        with self._lock:
            stored = settle_put(store_path, self._infos.get(store_path.digest), info)
            if stored is not None:
                self._infos[store_path.digest] = stored
            return self._infos[store_path.digest]

    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        return iter(list(self._infos.values()))

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return store_nar_hash(node, self._blobs, self._directories)


def open_memory_store() -> Store:
    blobs = MemoryBlobService()
    directories = MemoryDirectoryService()
    return Store(blobs, directories, MemoryPathInfoService(blobs, directories))
