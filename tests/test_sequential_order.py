"""A sequential pass over a big file when the kernel's reads arrive out of order, as they do for
a reader with small buffers (``cat``): one pass, checked bytes, EIO for a damaged chunk."""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import trio
from mounting import TVIXFS, import_tree, mounted, needs_fuse

from tvixfs.castore.nodes import FileNode
from tvixfs.fs import reader as reader_module
from tvixfs.fs import sequential
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.reader import BlobReader
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.base import BlobService, ChunkMeta, Store

KERNEL_READ = 128 * 1024
SIZE = 3 * 1024 * 1024 + 17
CAT_BUFFER = 128 * 1024  # what coreutils' cat reads at a time


class Counted(BlobService):
    """A real blob service that counts the reads of each digest."""

    def __init__(self, inner: BlobService) -> None:
        self.inner = inner
        self.reads: Counter[bytes] = Counter()

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        return self.inner.stat(digest, send_chunks)

    def read(self, digest: bytes) -> Iterator[bytes]:
        self.reads[digest] += 1
        return self.inner.read(digest)

    def put(self, data: Iterable[bytes]) -> bytes:
        return self.inner.put(data)


@pytest.fixture
def small_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 512 KiB and a 2 MiB lag, so that a 3 MiB file behaves like a big one."""
    monkeypatch.setattr(sequential, "BLOCK", 512 * 1024)
    monkeypatch.setattr(sequential, "LAG", 2 * 1024 * 1024)
    monkeypatch.setattr(reader_module, "PASS_MIN", 1024 * 1024)


@pytest.mark.usefixtures("small_passes")
async def test_reads_ahead_of_the_window_and_stragglers_stay_in_one_pass(
    store: Store, background: trio.Nursery
) -> None:
    """The order a cold ``cat`` made the kernel send: the next readahead window (here 1.25 MiB
    past the furthest read, beyond the 1 MiB window) before the rest of the current one."""
    data = os.urandom(SIZE)
    digest = store.blobs.put([data])
    chunks = store.blobs.stat(digest, send_chunks=True)
    assert chunks is not None and len(chunks) > 4
    counted = Counted(store.blobs)
    reader = BlobReader(Bridge(), counted, background, readahead_bytes=1024 * 1024)
    file = await reader.open(FileNode(b"big", digest, SIZE), b"test")
    offsets = list(range(0, SIZE, KERNEL_READ))
    ahead = offsets.index(9 * KERNEL_READ + 1024 * 1024 + 256 * 1024)
    order = offsets[:8] + offsets[ahead : ahead + 2] + offsets[8:ahead] + offsets[ahead + 2 :]
    pieces = {offset: bytes(await reader.read(file, offset, KERNEL_READ)) for offset in order}
    assert b"".join(pieces[o] for o in sorted(pieces)) == data
    assert reader.stats.chunks_fetched == 0  # no read fell back to the chunk cache
    # One pass: each chunk read once by every block it overlaps. The blocks lie on the grid of
    # the first read's end (128 KiB), as the kernel's later reads do.
    phase, block = KERNEL_READ % sequential.KERNEL_READ, sequential.BLOCK
    start = 0
    for chunk in chunks:
        blocks = (start + chunk.size - 1 - phase) // block - (start - phase) // block + 1
        assert counted.reads[chunk.digest] == blocks, (start, chunk.size)
        start += chunk.size


async def test_reads_after_a_half_first_read_each_come_from_one_block(
    store: Store, background: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader with 128 KiB buffers gets a first kernel read of 512 KiB, and every later one
    (1 MiB) 512 KiB off the 1 MiB grid: the blocks follow that phase, so no read waits for two
    blocks or is joined from them."""
    monkeypatch.setattr(sequential, "BLOCK", 2 * 1024 * 1024)
    monkeypatch.setattr(reader_module, "PASS_MIN", 1024 * 1024)
    size = 9 * 1024 * 1024 + 17
    data = os.urandom(size)
    digest = store.blobs.put([data])
    filled: list[tuple[int, int]] = []
    fill = sequential._Source.fill

    def recorded(source: sequential._Source, start: int, end: int, spare: bytearray | None) -> bytearray:
        filled.append((start, end))
        return fill(source, start, end, spare)

    monkeypatch.setattr(sequential._Source, "fill", recorded)
    reader = BlobReader(Bridge(), store.blobs, background, readahead_bytes=1024 * 1024)
    file = await reader.open(FileNode(b"big", digest, size), b"test")
    half = sequential.KERNEL_READ // 2
    reads = [(0, half)] + [(o, sequential.KERNEL_READ) for o in range(half, size, sequential.KERNEL_READ)]
    pieces = [bytes(await reader.read(file, offset, length)) for offset, length in reads]
    assert b"".join(pieces) == data
    assert (0, half) in filled  # the head block, before the phase
    for offset, length in reads:
        end = min(offset + length, size)
        assert any(start <= offset and end <= stop for start, stop in filled), (offset, filled)


def _cat_bytes(path: Path) -> bytes:
    """Read a file as ``cat`` does: ``CAT_BUFFER`` bytes per read call."""
    pieces = []
    fd = os.open(path, os.O_RDONLY)
    try:
        while piece := os.read(fd, CAT_BUFFER):
            pieces.append(piece)
    finally:
        os.close(fd)
    return b"".join(pieces)


def _middle_chunk(store_dir: Path, data: bytes) -> tuple[Path, int]:
    """The file of the chunk in the middle of ``data``'s blob, and where that chunk starts."""
    store = open_local_store(store_dir)
    try:
        digest = store.blobs.put([data])  # already stored: only its digest is wanted
        chunks = store.blobs.stat(digest, send_chunks=True)
    finally:
        store.close()
    assert chunks is not None and len(chunks) > 8
    middle = len(chunks) // 2
    start = sum(c.size for c in chunks[:middle])
    name = chunks[middle].digest.hex()
    return store_dir / "chunks" / name[:2] / name, start


@needs_fuse
@pytest.mark.expect_errors  # each EIO is logged as one ERROR line
def test_a_big_file_read_like_cat_through_a_mount(short_tmp: Path, tmp_path: Path) -> None:
    """40 MiB (a sequential pass) read cold with cat's buffer size: the same bytes; with one
    chunk damaged, EIO where it lies, the right bytes well before it, and the same bytes again
    once it is repaired."""
    tree = tmp_path / "tree"
    tree.mkdir()
    data = os.urandom(40 << 20)
    (tree / "big.bin").write_bytes(data)
    store_dir = short_tmp / "store"
    basename = import_tree(store_dir, tree, "big")
    with mounted(TVIXFS, short_tmp, f"local://{store_dir}") as m:
        assert _cat_bytes(m.path(basename, "big.bin")) == data
    chunk_file, start = _middle_chunk(store_dir, data)
    original = chunk_file.read_bytes()
    chunk_file.write_bytes(original[:10] + bytes([original[10] ^ 1]) + original[11:])
    with mounted(TVIXFS, short_tmp, f"local://{store_dir}", name="mnt2") as m:
        path = m.path(basename, "big.bin")
        with pytest.raises(OSError) as caught:
            _cat_bytes(path)
        assert caught.value.errno == errno.EIO
        # A kernel read may span the damaged chunk and the bytes just before it: stop short.
        before = start - (2 << 20)
        with open(path, "rb") as f:
            assert f.read(before) == data[:before]
        chunk_file.write_bytes(original)
        assert _cat_bytes(path) == data
