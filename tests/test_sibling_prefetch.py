"""Sibling prefetch (tvixfs/fs/siblings.py) through real mounts: the bytes are the same, and
what is fetched ahead is bounded, of the opened file's kind, and counted at the store."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from faultstore import Fault, RemoteFaults, spawn_faultstore
from mounting import TVIXFS, Mount, import_tree, mounted, needs_fuse
from uniquetrees import dump_nar

from tvixfs.castore.digest import b3digest
from tvixfs.castore.nodes import FileNode
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.chunkcache import ChunkCache
from tvixfs.fs.siblings import BATCH_FILES, DIRECTORY_BUDGET, FAR_FETCH, SLOW_FETCH, SiblingPrefetch
from tvixfs.services.backends.memory import open_memory_store

pytestmark = [needs_fuse, pytest.mark.fuse]

KIND = ".cpython-311.pyc"
OTHER = ".cpython-311.opt-1.pyc"
MANY = 150  # more small files of one kind than one batch takes
BIG_SMALL = 200 << 10  # small files whose batches the byte bounds cut short


def _write(path: Path, size: int, rng: random.Random) -> None:
    path.write_bytes(rng.randbytes(size))


def _tree(root: Path) -> Path:
    """``many/``: MANY tiny files of one kind, as many of another; ``heavy/``: 200 KiB ones;
    ``mixed/``: a bit of everything (a chunked big file, an empty one, a subdirectory)."""
    rng = random.Random(15)
    tree = root / "tree"
    for sub in ("many", "heavy", "mixed/sub"):
        (tree / sub).mkdir(parents=True)
    for i in range(MANY):
        _write(tree / "many" / f"m{i:03}{KIND}", rng.randrange(1, 9000), rng)
        _write(tree / "many" / f"m{i:03}{OTHER}", rng.randrange(1, 9000), rng)
    for i in range(100):
        _write(tree / "heavy" / f"h{i:03}{KIND}", BIG_SMALL, rng)
    _write(tree / "mixed" / "big.so", 3 << 20, rng)
    _write(tree / "mixed" / "a.so", 70000, rng)
    _write(tree / "mixed" / "b.so", 300 << 10, rng)  # above SMALL_MAX: never fetched ahead
    (tree / "mixed" / "empty.so").write_bytes(b"")
    _write(tree / "mixed" / "sub" / "c.so", 5, rng)
    (tree / "mixed" / "link").symlink_to("a.so")
    return tree


# A store far enough away for fetching ahead to pay (siblings.SLOW_FETCH), in one message.
FAR = Fault("slow", methods=("blob.read",), delay=2 * SLOW_FETCH, piece=1 << 20)


@pytest.fixture
def remote(short_tmp: Path) -> Iterator[tuple[RemoteFaults, Path]]:
    tree = _tree(short_tmp / "src")
    with spawn_faultstore(short_tmp, [(dump_nar(tree), "pyc")]) as store:
        store.set(FAR)
        yield store, tree


def _files(tree: Path) -> list[Path]:
    return sorted(p.relative_to(tree) for p in tree.rglob("*") if p.is_file() and not p.is_symlink())


def measure(mount: Mount, basename: str, tree: Path) -> int:
    """Read ``mixed/sub/c.so`` (small, alone of its kind in its directory): the one fetch that
    times the store (no prefetch starts before one has). Returns the Reads that cost."""
    assert mount.path(basename, "mixed", "sub", "c.so").read_bytes() == (tree / "mixed/sub/c.so").read_bytes()
    return 1


def _read_all_same(mount: Mount, basename: str, tree: Path) -> None:
    for rel in _files(tree):
        assert mount.path(basename, str(rel)).read_bytes() == (tree / rel).read_bytes(), rel


def test_bytes_identical_over_grpc(remote: tuple[RemoteFaults, Path], short_tmp: Path) -> None:
    store, tree = remote
    with mounted(TVIXFS, short_tmp, store.url) as mount:
        _read_all_same(mount, store.paths[0], tree)
        # Every file read once: prefetch fetched nothing twice, and nothing but files.
        assert store.settled_calls("blob.read") <= len({(tree / f).read_bytes() for f in _files(tree)})


def test_bytes_identical_over_the_embedded_store(short_tmp: Path) -> None:
    tree = _tree(short_tmp / "src")
    store_dir = short_tmp / "store"
    basename = import_tree(store_dir, tree, "pyc")
    with mounted(TVIXFS, short_tmp, f"local://{store_dir}") as mount:
        # A local store answers faster than SLOW_FETCH: nothing is fetched ahead here.
        files = _files(tree)
        random.Random(1).shuffle(files)
        for rel in files:
            assert mount.path(basename, str(rel)).read_bytes() == (tree / rel).read_bytes(), rel


def test_one_cold_open_fetches_one_batch_of_its_kind(
    remote: tuple[RemoteFaults, Path], short_tmp: Path
) -> None:
    store, tree = remote
    basename = store.paths[0]
    with mounted(TVIXFS, short_tmp, store.url) as mount:
        timed = measure(mount, basename, tree)
        first = mount.path(basename, "many", f"m000{KIND}")
        assert first.read_bytes() == (tree / "many" / f"m000{KIND}").read_bytes()
        after_one = store.settled_calls("blob.read")
        assert after_one == timed + 1 + BATCH_FILES
        # The batch was the files of its kind that follow it: reading them asks nothing more.
        for i in range(1, 1 + BATCH_FILES):
            name = f"m{i:03}{KIND}"
            assert mount.path(basename, "many", name).read_bytes() == (tree / "many" / name).read_bytes()
        assert store.settled_calls("blob.read") == after_one
        # A file of another kind was not fetched ahead.
        other = mount.path(basename, "many", f"m001{OTHER}")
        assert other.read_bytes() == (tree / "many" / f"m001{OTHER}").read_bytes()
        assert store.settled_calls("blob.read") > after_one


@pytest.mark.parametrize("far", [False, True])
def test_fetching_ahead_is_bounded_per_directory(
    remote: tuple[RemoteFaults, Path], short_tmp: Path, far: bool
) -> None:
    """DIRECTORY_BUDGET per directory; twice that from a store whose fetches take FAR_FETCH."""
    store, tree = remote
    if far:
        store.set(Fault("slow", methods=("blob.read",), delay=3 * FAR_FETCH, piece=1 << 20))
    basename = store.paths[0]
    opened = range(0, 100, 20)
    with mounted(TVIXFS, short_tmp, store.url) as mount:
        timed = measure(mount, basename, tree)  # before the first 200 KiB file's open
        for i in opened:
            name = f"h{i:03}{KIND}"
            assert mount.path(basename, "heavy", name).read_bytes() == (tree / "heavy" / name).read_bytes()
        ahead = store.settled_calls("blob.read") - len(opened) - timed
    # The near store's fetches may take FAR_FETCH too on a loaded machine: then it is doubled.
    assert (DIRECTORY_BUDGET // BIG_SMALL if far else 0) < ahead <= 2 * DIRECTORY_BUDGET // BIG_SMALL


def test_only_a_slow_store_gets_files_fetched_ahead() -> None:
    """In process, over a memory store: below SLOW_FETCH a cold open starts nothing."""

    async def main() -> None:
        store = open_memory_store()
        nodes = []
        for i in range(10):
            data = f"module {i}".encode()
            nodes.append(FileNode(f"m{i}{KIND}".encode(), store.blobs.put([data]), len(data)))
        async with trio.open_nursery() as nursery:
            chunks = ChunkCache(Bridge(), store.blobs, nursery, 1 << 20, 0)
            prefetch = SiblingPrefetch(chunks)
            chunks.latency.seconds = SLOW_FETCH / 2
            prefetch.opened(nodes[0], b"dir", nodes)
            await trio.testing.wait_all_tasks_blocked()
            assert not any(chunks.busy(n.digest) for n in nodes)
            chunks.latency.seconds = SLOW_FETCH
            prefetch.opened(nodes[0], b"dir", nodes)
            with trio.fail_after(30):  # a hang detector only
                while not all(chunks.busy(n.digest) for n in nodes[1:]):
                    await trio.sleep(0.01)
            assert not chunks.busy(nodes[0].digest)  # the opened file is its own read's business

    trio.run(main)


def test_off_switch(remote: tuple[RemoteFaults, Path], short_tmp: Path) -> None:
    store, tree = remote
    with mounted(TVIXFS, short_tmp, store.url, ["--no-prefetch-siblings"]) as mount:
        timed = measure(mount, store.paths[0], tree)
        name = f"m000{KIND}"
        assert mount.path(store.paths[0], "many", name).read_bytes() == (tree / "many" / name).read_bytes()
        assert store.settled_calls("blob.read") == timed + 1


def test_a_corrupt_prefetch_is_not_kept(remote: tuple[RemoteFaults, Path], short_tmp: Path) -> None:
    """A sibling whose prefetch got wrong bytes is not cached: its read asks again (no
    error: a failed prefetch is left to the read)."""
    store, tree = remote
    sibling = tree / "many" / f"m001{KIND}"
    store.set(FAR, Fault("corrupt", digest=b3digest(sibling.read_bytes()), methods=("blob.read",), times=1))
    with mounted(TVIXFS, short_tmp, store.url) as mount:
        measure(mount, store.paths[0], tree)
        name = f"m000{KIND}"
        assert mount.path(store.paths[0], "many", name).read_bytes() == (tree / "many" / name).read_bytes()
        after_batch = store.settled_calls("blob.read")
        assert store.stats()["fired"].get("corrupt", 0) == 1
        assert mount.path(store.paths[0], "many", sibling.name).read_bytes() == sibling.read_bytes()
        # Its own read, and (a cold open again) the next batch, of the files after the first.
        assert store.settled_calls("blob.read") == after_batch + 1 + BATCH_FILES
