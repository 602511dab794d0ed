"""Proof that a blob's chunk list is the blob: the listed chunks, in order, make up its bytes.

Each chunk is checked against its own digest when it is read, but a store may list genuine
chunks in the wrong order (or chunks of another blob of the same size) and pass every such
check. When the mount trusts only signed store paths, the signature covers the file's blob
digest, and the chunk list must be tied to it before any byte is served. This reads the blob
once, whole (one call, not one per chunk: over gRPC 2.5 times faster for a big file), checks
it against the blob digest, and cuts it where the list says, checking each piece against the
digest listed for it. (A bao outboard would prove the list without reading the blob; no store
sends one.)
"""

from __future__ import annotations

from collections.abc import Sequence

from tvixfs.castore.digest import new_hasher
from tvixfs.castore.nodes import FileNode
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.errors import CorruptDataError


def prove_chunk_list(blobs: BlobService, node: FileNode, chunks: Sequence[ChunkMeta]) -> None:
    """Runs in a worker thread; CorruptDataError unless ``chunks`` make up ``node``'s blob."""
    what = f"blob {node.digest.hex()}"
    whole = new_hasher()
    index = 0  # the chunk being cut
    piece_hasher = new_hasher()
    left = chunks[0].size if chunks else 0  # bytes of chunk ``index`` still to come

    def finish_empty() -> None:
        """Check listed chunks that are complete before their first byte (size 0)."""
        nonlocal index, piece_hasher, left
        while index < len(chunks) and left == 0:
            if piece_hasher.digest() != chunks[index].digest:
                raise CorruptDataError(f"{what}: chunk {index} of its list is not this part of the blob")
            index += 1
            piece_hasher = new_hasher()
            left = chunks[index].size if index < len(chunks) else 0

    finish_empty()
    for data in blobs.read(node.digest):
        whole.update(data)
        view = memoryview(data)
        while view:
            if index == len(chunks):
                raise CorruptDataError(f"{what}: longer than its chunk list")
            part = view[:left]
            piece_hasher.update(part)
            left -= len(part)
            view = view[len(part) :]
            finish_empty()
    if index != len(chunks):
        raise CorruptDataError(f"{what}: shorter than its chunk list")
    if whole.digest() != node.digest:
        raise CorruptDataError(f"{what}: content does not match its digest")
