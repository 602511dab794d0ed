"""The three service interfaces every backend implements.

They are synchronous and thread-safe: the gRPC server calls them from worker threads and the
FUSE daemon reaches them through its trio bridge. Data is validated model objects
(``Directory``, ``Node``) or wire ``PathInfo`` messages that passed ``validate_pathinfo``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.breaker import CircuitBreaker
from tvixfs.services.chunkcheck import verified
from tvixfs.services.regroup import exact_pieces, fill


class ChunkMeta(NamedTuple):
    digest: bytes
    size: int


@dataclass(frozen=True, slots=True)
class BlobCapabilities:
    """What a blob service promises beyond its interface, declared once on the service.

    Every field is False by default: a new backend, or a wrapper around another one, is then
    treated with the most care (its reads hashed again, read chunk by chunk, written inline)
    until it states otherwise, e.g. ``capabilities = BlobCapabilities(calls_are_remote=True)``
    on the class, or ``replace(inner.capabilities, ...)`` in a wrapper's ``__init__``.
    """

    # ``read`` of a chunk, by the digest ``stat(send_chunks=True)`` lists it under, checks
    # what it yields: iterating to the end raises CorruptDataError unless everything yielded
    # is exactly the bytes whose BLAKE3 digest was asked for. A consumer may then skip
    # hashing those bytes again.
    verifies_chunk_reads: bool = False
    # Beyond that: ``read`` (iterated to its end) and every answer of ``read_many`` are checked
    # against the digest and size asked for, whatever the digest names (a chunk, a whole blob,
    # a digest from an access profile rather than from the store's own lists). A consumer may
    # then skip hashing any of them again.
    verifies_every_read: bool = False
    # Every call goes to another process (a remote store), whose fixed cost far exceeds that
    # of the bytes: a consumer reading most of a blob in order does better with one read of
    # the whole blob than with one per chunk, and puts are worth running in parallel threads
    # (they wait for the network, not for the CPU).
    calls_are_remote: bool = False
    # Reads never wait for a disk (the store's files are in memory, on tmpfs): reading ahead
    # on other threads would hide no latency and cost a thread hand-off per batch.
    reads_from_memory: bool = False
    # ``read_many`` answers many chunks in one call (a gRPC store whose server has tvixfs's
    # BlobBatchService): a consumer fetching several small chunks at once asks for them together.
    reads_many: bool = False


def read_outcome(blobs: BlobService, chunk: ChunkMeta) -> bytes | Exception:
    """A chunk's bytes, or what reading it raised: one answer of ``read_many``."""
    try:
        return b"".join(blobs.read(chunk.digest))
    except Exception as e:
        return e


@dataclass(frozen=True, slots=True)
class ForkedWriter:
    """How worker processes forked by an importer write blobs straight into a store."""

    # Runs in the worker: chunk and write the bytes, return (digest, size, packed chunk list).
    write: Callable[[Iterable[bytes]], tuple[bytes, int, bytes]]
    # Runs in the importing process for each blob a worker wrote: record it as if put here.
    record: Callable[[bytes, int, bytes], None]
    # Held while workers write what is not recorded yet: keeps a garbage collector out.
    holding: Callable[[], AbstractContextManager[None]]
    # Whether a collector waits: the importer should record its work and let go a moment.
    collector_waiting: Callable[[], bool]


class BlobService(ABC):
    capabilities: BlobCapabilities = BlobCapabilities()

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

    def read_into(self, digest: bytes, views: Sequence[memoryview]) -> None:
        """Fill ``views`` in order with the bytes of ``read(digest)``, checked as ``read`` checks.

        CorruptDataError if the blob is shorter or longer than the views together. A store
        that can read into memory directly overrides this, saving a copy of every byte.
        """
        fill(self.read(digest), views, f"blob {digest.hex()}")

    def read_chunks(self, digest: bytes, chunks: Sequence[ChunkMeta]) -> Iterator[bytes]:
        """The blob cut at its chunk list ``chunks``, each chunk checked against its digest
        before it is yielded; CorruptDataError at the first that fails.

        For a caller that holds the chunk list already (a mount's chunk map). A store that
        can do it cheaper (one stream, no second Stat, each byte hashed once) overrides it.
        """
        what = f"blob {digest.hex()}"
        for chunk, data in zip(
            chunks, exact_pieces(self.read(digest), [c.size for c in chunks], what), strict=True
        ):
            yield verified(data, chunk.digest, chunk.size, what)

    def read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        """Each chunk's index in ``chunks`` with its bytes (checked as ``read`` checks them) or
        what reading it raised, as each is ready, in any order.

        Lazy: nothing is asked before the first ``next``. Handed on one by one, so that a
        reader waiting for one chunk of a large call gets it when it arrives, not when the call
        ends. If the iteration itself raises, the chunks not yet answered failed with that.
        A store that answers many in one call overrides this (``capabilities.reads_many``);
        here the chunks are read one by one.
        """
        for i, chunk in enumerate(chunks):
            yield i, read_outcome(self, chunk)

    def read_resident(self, digest: bytes, size: int) -> bytes | None:
        """The bytes of a chunk (or blob) of ``size`` bytes, checked against ``digest``, if
        the store can hand them over at once, without waiting on a disk or a network; else
        None, and the caller reads them the ordinary way, which reports any error.

        Safe to call from an event loop: the mount asks this first for small chunks, saving
        the hop to a worker thread. A store whose bytes may be in the page cache (the
        embedded store's chunk files) overrides it.
        """
        return None

    def forked_writer(self) -> ForkedWriter | None:
        """How forked processes can write into this store themselves, if they can (an
        embedded store's chunk files); None: every blob goes through ``put``."""
        return None

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
