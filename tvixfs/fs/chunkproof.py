"""Proof that a blob's chunk list is the blob: the listed chunks, in order, hash to its digest.

Each chunk is checked against its own digest when it is read, but a store may list genuine
chunks in the wrong order (or chunks of another blob of the same size) and pass every such
check. When the mount trusts only signed store paths, the signature covers the file's blob
digest, and the chunk list must be tied to it before any byte is served: this reads every
chunk once, in order, checking each against its own digest and all of them together against
the blob's. (A bao outboard would prove it without reading the blob; no store sends one.)
"""

from __future__ import annotations

from collections.abc import Sequence

from tvixfs.castore.digest import new_hasher
from tvixfs.castore.nodes import FileNode
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.errors import CorruptDataError


def prove_chunk_list(blobs: BlobService, node: FileNode, chunks: Sequence[ChunkMeta]) -> None:
    """Runs in a worker thread; CorruptDataError unless ``chunks`` make up ``node``'s blob."""
    whole = new_hasher()
    for chunk in chunks:
        one = new_hasher()
        received = 0
        for piece in blobs.read(chunk.digest):
            received += len(piece)
            if received > chunk.size:
                raise CorruptDataError(f"chunk {chunk.digest.hex()}: more than {chunk.size} bytes")
            one.update(piece)
            whole.update(piece)
        if received != chunk.size or one.digest() != chunk.digest:
            raise CorruptDataError(f"chunk {chunk.digest.hex()}: content does not match its digest")
    if whole.digest() != node.digest:
        raise CorruptDataError(
            f"blob {node.digest.hex()}: its chunk list does not make up the blob "
            "(chunks reordered or replaced)"
        )
