"""A file's chunk map: where each chunk of its blob starts, and the checks it must pass.

A blob without a chunk list is one chunk, itself, and so is a small file, whose chunk list
is not worth a round trip (``WHOLE_BLOB_MAX``). Each chunk is later fetched by its own digest
and checked against it; what can be checked of the list itself is checked here, at open.

Known limit: the chunk list itself is not verified. Its sizes must add up to the file size
and every chunk must match its own digest, but a store that lists genuine chunks in the
wrong order (or chunks of another blob of the same size) is not caught, since only hashing
the whole blob (or a bao outboard, which the protocol reserves but nobody sends) ties a chunk
list to the blob digest, and doing that on first open would fetch every byte of a file
before its first read. A mount with trusted keys pays that price (chunkproof.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tvixfs.castore.digest import DIGEST_SIZE, EMPTY_DIGEST
from tvixfs.castore.nodes import FileNode
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.errors import CorruptDataError, NotFoundError

# Files up to this size are read as one blob without asking for their chunk list: one round
# trip per small file instead of two (the embedded store cuts chunks of 64 KiB to 1 MiB).
WHOLE_BLOB_MAX = 1 << 20


@dataclass(frozen=True, slots=True)
class ChunkMap:
    """Where each chunk of a blob starts; ``chunks`` cover ``[0, size)`` in order."""

    chunks: tuple[ChunkMeta, ...]
    starts: tuple[int, ...]
    size: int
    # The store's chunk list (each chunk read by the digest it listed), rather than the whole
    # blob taken as one chunk: see BlobCapabilities.verifies_chunk_reads.
    listed: bool = False

    @classmethod
    def of(cls, chunks: list[ChunkMeta], listed: bool = False) -> ChunkMap:
        starts = []
        offset = 0
        for chunk in chunks:
            starts.append(offset)
            offset += chunk.size
        return cls(tuple(chunks), tuple(starts), offset, listed)

    def covering(self, start: int, end: int) -> range:
        """Indices of the chunks holding bytes ``[start, end)``, for ``0 <= start < end <= size``."""
        return range(bisect.bisect_right(self.starts, start) - 1, bisect.bisect_left(self.starts, end))

    def entries(self) -> int:
        """Its weight in a cache of chunk maps bounded by chunk list entries."""
        return len(self.chunks) + 1


def without_list(node: FileNode) -> ChunkMap | None:
    """The map of a file that needs no chunk list (empty, or small), else None."""
    if node.size == 0:
        if node.digest != EMPTY_DIGEST:
            raise CorruptDataError(f"empty file with digest {node.digest.hex()}")
        return ChunkMap.of([])
    if node.size <= WHOLE_BLOB_MAX:
        return ChunkMap.of([ChunkMeta(node.digest, node.size)])
    return None


def fetch_chunk_map(blobs: BlobService, node: FileNode) -> ChunkMap:
    """Runs in a worker thread: the blob's chunk list from the store, its digests checked."""
    chunks = blobs.stat(node.digest, send_chunks=True)
    if chunks is None:
        raise NotFoundError(f"blob {node.digest.hex()} not found")
    if not chunks:
        return ChunkMap.of([ChunkMeta(node.digest, node.size)])
    for chunk in chunks:
        if len(chunk.digest) != DIGEST_SIZE:
            raise CorruptDataError(f"blob {node.digest.hex()}: chunk digest of {len(chunk.digest)} bytes")
    return ChunkMap.of(chunks, listed=True)


def check_covers(chunk_map: ChunkMap, node: FileNode) -> ChunkMap:
    """The map, if its chunks add up to the file's size; else CorruptDataError."""
    if chunk_map.size != node.size:
        raise CorruptDataError(
            f"blob {node.digest.hex()}: chunks add up to {chunk_map.size} bytes, the file has {node.size}"
        )
    return chunk_map
