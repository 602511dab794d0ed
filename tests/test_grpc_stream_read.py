"""A big file read front to back through a real mount of a real ``tvixfs daemon`` (issue 18).

Such a pass switches to one Read stream of the whole blob after its first kernel read
(wholeblob.py); the daemon sends it in READ_MESSAGE_SIZE messages. What a user would check:
the bytes are the file's, the store was asked for the blob once rather than chunk by chunk
(the mount's own call counters), and a damaged chunk makes the read fail with EIO, never
with other bytes, while the rest of the mount keeps working.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpcserver import running_daemon
from mounting import TVIXFS, Mount, import_tree, mounted, needs_fuse
from test_metrics import metrics_url, scrape

from tvixfs.fs import wholeblob
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.memoryfs import in_memory
from tvixfs.services.base import ChunkMeta
from tvixfs.store.storepath import StorePath

pytestmark = needs_fuse

SIZE = 24 << 20  # enough for the whole-blob stream: 1 MiB read, 16 MiB or more left
KERNEL_READ = 1 << 20


@pytest.fixture(params=["disk", "memory"])
def store_parent(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Path]:
    """Where the store lives: on disk the daemon reads chunk files ahead on threads, on tmpfs
    inline (``BlobCapabilities.reads_from_memory``); both paths must serve the same bytes."""
    if request.param == "disk":
        yield short_tmp
        return
    if not in_memory(Path("/dev/shm")):
        pytest.skip("/dev/shm is not tmpfs here")
    with tempfile.TemporaryDirectory(prefix="tvx", dir="/dev/shm") as parent:
        yield Path(parent)


@pytest.fixture
def big_store(store_parent: Path, tmp_path: Path) -> tuple[Path, str, bytes, list[ChunkMeta]]:
    """A local store holding one big random file; (store dir, basename, bytes, chunks)."""
    assert SIZE >= wholeblob.WHOLE_READ_AFTER + wholeblob.WHOLE_READ_REST + KERNEL_READ
    data = os.urandom(SIZE)
    (tmp_path / "big.bin").write_bytes(data)
    store_dir = store_parent / "store"
    basename = import_tree(store_dir, tmp_path / "big.bin", "big")
    store = open_local_store(store_dir)
    try:
        assert store.blobs.capabilities.reads_from_memory == in_memory(store_parent)
        info = store.pathinfos.get(StorePath.from_basename(basename).digest)
        assert info is not None and info.node.HasField("file")
        chunks = store.blobs.stat(info.node.file.digest, send_chunks=True)
    finally:
        store.close()
    assert chunks is not None and len(chunks) > 40, "the file should span many chunks"
    return store_dir, basename, data, chunks


@pytest.fixture
def served_mount(
    big_store: tuple[Path, str, bytes, list[ChunkMeta]], short_tmp: Path
) -> Iterator[tuple[Mount, str]]:
    """A mount of a daemon serving the big store over loopback TCP, with its metrics URL."""
    store_dir = big_store[0]
    with (
        running_daemon(TVIXFS, short_tmp, store=f"local://{store_dir}", listen=["127.0.0.1:0"]) as daemon,
        mounted(TVIXFS, short_tmp, daemon.url, ["--metrics-listen", "127.0.0.1:0"]) as mount,
    ):
        yield mount, metrics_url(mount.stderr())


def _read_in_order(path: Path) -> bytes:
    pieces = []
    with path.open("rb", buffering=0) as f:
        while piece := f.read(KERNEL_READ):
            pieces.append(piece)
    return b"".join(pieces)


def test_a_pass_reads_the_blob_in_one_stream(
    served_mount: tuple[Mount, str], big_store: tuple[Path, str, bytes, list[ChunkMeta]]
) -> None:
    mount, url = served_mount
    _, basename, data, chunks = big_store
    assert _read_in_order(mount.path(basename)) == data
    samples = scrape(url)
    assert samples["tvixfs_store_call_seconds_count{method=read_chunks,service=blob}"] == 1
    # Chunks fetched alone: at most those of the kernel's reads before the stream answered
    # (its first readahead window), not one call per chunk of the file.
    alone = samples.get("tvixfs_store_call_seconds_count{method=read,service=blob}", 0)
    assert alone < len(chunks) // 4, (alone, len(chunks))


def test_a_damaged_chunk_in_the_stream_fails_with_eio(
    big_store: tuple[Path, str, bytes, list[ChunkMeta]], short_tmp: Path
) -> None:
    store_dir, basename, data, chunks = big_store
    # A chunk well inside the part the stream delivers, past the first kernel reads.
    index = len(chunks) // 2
    start = sum(c.size for c in chunks[:index])
    digest = chunks[index].digest.hex()
    chunk_file = store_dir / "chunks" / digest[:2] / digest
    damaged = bytearray(chunk_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(damaged))
    with (
        running_daemon(TVIXFS, short_tmp, store=f"local://{store_dir}", listen=["127.0.0.1:0"]) as daemon,
        mounted(TVIXFS, short_tmp, daemon.url) as mount,
    ):
        path = mount.path(basename)
        got = bytearray()
        with pytest.raises(OSError) as caught, path.open("rb", buffering=0) as f:
            while piece := f.read(KERNEL_READ):
                got += piece
        assert caught.value.errno == errno.EIO
        assert got == data[: len(got)], "every byte handed out is the file's"
        assert len(got) <= start, "nothing of or past the damaged chunk"
        with path.open("rb") as f:
            assert f.read(4096) == data[:4096], "the file's good start still reads"
