"""The three service interfaces every backend implements.

They are synchronous and thread-safe: the gRPC server calls them from worker threads and the
FUSE daemon reaches them through its trio bridge. Data is validated model objects
(``Directory``, ``Node``) or wire ``PathInfo`` messages that passed ``validate_pathinfo``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.breaker import CircuitBreaker
from tvixfs.services.errors import CorruptDataError


class ChunkMeta(NamedTuple):
    digest: bytes
    size: int


class BlobService(ABC):
    # True if ``read`` of a chunk, by the digest ``stat(send_chunks=True)`` lists it under,
    # checks what it yields: iterating to the end raises CorruptDataError unless everything
    # yielded is exactly the bytes whose BLAKE3 digest was asked for. A consumer may then skip
    # hashing those bytes again. False by default, so a new backend or a wrapper around a
    # verifying one is checked until it says otherwise.
    verifies_reads: ClassVar[bool] = False
    # True if every ``read`` is a call to another process (a remote store), whose fixed cost
    # far exceeds that of the bytes: a consumer reading most of a blob in order then does
    # better with one read of the whole blob than with one read per chunk.
    remote_reads: ClassVar[bool] = False

    @abstractmethod
    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        """None if absent; else the chunk list (empty: present, not chunked further)."""

    @abstractmethod
    def read(self, digest: bytes) -> Iterator[bytes]:
        """The bytes of a blob, or of a chunk by its own digest, in pieces.

        Raises NotFoundError (on the first ``next``) if absent. Backends that fetch from
        elsewhere verify what they yield: a corrupt blob raises CorruptDataError, never
        yields wrong bytes past the point of detection.
        """

    @abstractmethod
    def put(self, data: Iterable[bytes]) -> bytes:
        """Store the concatenation of ``data``; returns its BLAKE3 digest."""

    def has(self, digest: bytes) -> bool:
        return self.stat(digest) is not None

    def read_all(self, digest: bytes) -> bytes:
        return b"".join(self.read(digest))

    def read_into(self, digest: bytes, views: Sequence[memoryview]) -> None:
        """Fill ``views`` in order with the bytes of ``read(digest)``, checked as ``read`` checks.

        CorruptDataError if the blob is shorter or longer than the views together. A store
        that can read into memory directly overrides this, saving a copy of every byte.
        """
        index, at = 0, 0  # the view being filled, and how much of it is
        for piece in self.read(digest):
            source = memoryview(piece)
            while source:
                if index == len(views):
                    raise CorruptDataError(f"blob {digest.hex()}: longer than expected")
                target = views[index]
                n = min(len(source), len(target) - at)
                target[at : at + n] = source[:n]
                source, at = source[n:], at + n
                if at == len(target):
                    index, at = index + 1, 0
        if sum(len(v) for v in views[index:]) > at:
            raise CorruptDataError(f"blob {digest.hex()}: shorter than expected")

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release connections or files."""


class DirectoryService(ABC):
    @abstractmethod
    def get(self, digest: bytes) -> Directory | None:
        """One directory, or None if absent."""

    @abstractmethod
    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        """The root first, then every descendant breadth-first, each digest once.

        Raises NotFoundError if the root is absent.
        """

    @abstractmethod
    def put_many(self, directories: Iterable[Directory]) -> bytes:
        """Store a closure, leaves first and root last; returns the root digest.

        Every directory must refer only to directories sent before it or already stored;
        otherwise FailedPreconditionError and nothing of the batch is stored.
        """

    def put(self, directory: Directory) -> bytes:
        return self.put_many([directory])

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release connections or files."""


class PathInfoService(ABC):
    @abstractmethod
    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        """The PathInfo whose store path hash is ``output_hash`` (20 bytes), or None."""

    @abstractmethod
    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        """Validate and store; the root node's content must already be present."""

    @abstractmethod
    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        """Every PathInfo, in no promised order."""

    @abstractmethod
    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """(nar_size, nar_sha256) of the NAR that ``node`` renders to."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release connections or files."""


@dataclass
class Store:
    """The three services of one store, as the CLI, the server and the FUSE daemon use them."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService
    # Whether the remote stores behind these services answer (none for an embedded store).
    breakers: tuple[CircuitBreaker, ...] = ()

    def close(self) -> None:
        for service in (self.pathinfos, self.directories, self.blobs):
            service.close()
