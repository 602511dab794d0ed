"""Small files read cold through a real mount of the embedded store (issue 15): lookups fetch
only the directories they look in, chunk files are read without a stat first, and what a
damaged store holds still fails with EIO, never wrong bytes."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from mounting import TVIXFS, import_tree, mounted, needs_fuse

from tvixfs.castore.digest import b3digest

pytestmark = [needs_fuse, pytest.mark.fuse]

SIZES = (1, 100, 4096, 4097, 17000, 65535, 70000, 300 << 10)


def _tree(root: Path) -> Path:
    """Small files of several sizes (one chunk, and a few of several) in nested directories."""
    rng = random.Random(1515)
    tree = root / "tree"
    for depth, sub in enumerate(("a", "a/b", "a/b/c", "d")):
        (tree / sub).mkdir(parents=True)
        for i, size in enumerate(SIZES):
            (tree / sub / f"f{depth}-{i}.pyc").write_bytes(rng.randbytes(size))
    (tree / "empty").write_bytes(b"")
    return tree


def _chunk_file(store_dir: Path, data: bytes) -> Path:
    digest = b3digest(data).hex()
    return store_dir / "chunks" / digest[:2] / digest


def _files(tree: Path) -> list[Path]:
    return sorted(p.relative_to(tree) for p in tree.rglob("*") if p.is_file())


def test_cold_reads_give_the_same_bytes(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    tree = _tree(tmp_path)
    name = import_tree(store_dir, tree, "small")
    with mounted(TVIXFS, tmp_path, f"local://{store_dir}") as mount:
        root = mount.path(name)
        # Deepest first: each lookup finds its directories one at a time, before any listing.
        for rel in sorted(_files(tree), key=lambda p: -len(p.parts)):
            assert (root / rel).read_bytes() == (tree / rel).read_bytes(), rel
        # And a walk afterwards, which lists what the lookups fetched one by one.
        seen = sorted(Path(d, f).relative_to(root) for d, _, fs in os.walk(root) for f in fs)
        assert seen == _files(tree)


@pytest.mark.expect_errors  # each EIO is logged as one ERROR line
def test_a_damaged_chunk_file_fails_with_eio(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    tree = _tree(tmp_path)
    name = import_tree(store_dir, tree, "small")
    damaged = Path("a/b/f1-4.pyc")
    original = (tree / damaged).read_bytes()
    chunk = _chunk_file(store_dir, original)
    chunk.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit off
    missing = Path("d/f3-3.pyc")
    _chunk_file(store_dir, (tree / missing).read_bytes()).unlink()
    with mounted(TVIXFS, tmp_path, f"local://{store_dir}") as mount:
        for rel in (damaged, missing):
            with pytest.raises(OSError) as raised:
                mount.path(name, str(rel)).read_bytes()
            assert raised.value.errno == errno.EIO, rel
        # Its neighbours still read, with their own bytes.
        for rel in (Path("a/b/f1-3.pyc"), Path("d/f3-4.pyc")):
            assert mount.path(name, str(rel)).read_bytes() == (tree / rel).read_bytes()
