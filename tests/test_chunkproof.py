"""The chunk-list proof of the trusted-keys mode, on a memory store: an honest list passes,
every list that does not make up the blob fails."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from tvixfs.castore.digest import b3digest
from tvixfs.castore.nodes import FileNode
from tvixfs.fs.chunkproof import prove_chunk_list
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.errors import CorruptDataError
from tvixfs.services.memory import open_memory_store

DATA = random.Random(3).randbytes(100_000)
CUTS = [0, 30_000, 30_000, 64_000, 100_000]  # one empty chunk in the middle


def _setup() -> tuple[BlobService, FileNode, list[ChunkMeta]]:
    blobs = open_memory_store().blobs
    digest = blobs.put([DATA])
    chunks = [ChunkMeta(b3digest(DATA[a:b]), b - a) for a, b in itertools.pairwise(CUTS)]
    return blobs, FileNode(b"f", digest, len(DATA)), chunks


def test_an_honest_chunk_list_is_proven() -> None:
    blobs, node, chunks = _setup()
    prove_chunk_list(blobs, node, chunks)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c[::-1], "is not this part of the blob"),
        (lambda c: [c[2], c[1], c[0], c[3]], "is not this part of the blob"),
        (lambda c: [ChunkMeta(b3digest(b"y"), c[0].size), *c[1:]], "is not this part of the blob"),
        (lambda c: c[:-1], "longer than its chunk list"),
        (lambda c: [*c, ChunkMeta(b3digest(b"x"), 1)], "shorter than its chunk list"),
        (lambda c: [*c[:-1], ChunkMeta(c[-1].digest, c[-1].size + 1)], "shorter than its chunk list"),
    ],
)
def test_a_list_that_is_not_the_blob_fails(
    edit: Callable[[list[ChunkMeta]], list[ChunkMeta]], message: str
) -> None:
    blobs, node, chunks = _setup()
    with pytest.raises(CorruptDataError, match=message):
        prove_chunk_list(blobs, node, edit(chunks))
