"""Directories read back from the embedded store are checked by the hash of their stored
bytes (Directory.from_canonical_bytes), and those received over the network by the hash of
the bytes received where it names them (Directory.from_named_bytes), not by encoding them
again: the same checks, through the store's API and through a real mount."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest
from mounting import TVIXFS, import_tree, mounted, needs_fuse

from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.errors import CorruptDataError

LEAF = Directory(files=(FileNode(b"a", b3digest(b"a"), 1), FileNode(b"b", b3digest(b"bb"), 2, True)))
ROOT = Directory(directories=(DirectoryNode(b"sub", LEAF.digest(), LEAF.size()),))
# Another valid directory, stored in place of LEAF's row in some tests.
OTHER = Directory(files=(FileNode(b"c", b3digest(b"c"), 1),))


def _store_tree(store_dir: Path) -> None:
    store = open_local_store(store_dir)
    try:
        store.directories.put_many([LEAF, ROOT])
    finally:
        store.close()


def _replace_row(store_dir: Path, digest: bytes, data: bytes) -> None:
    with sqlite3.connect(store_dir / "db.sqlite") as conn:
        conn.execute("UPDATE directories SET data = ? WHERE digest = ?", (data, digest))
    conn.close()


def test_digest_of_canonical_bytes_is_the_computed_digest() -> None:
    for directory in (LEAF, ROOT, OTHER, Directory()):
        read = Directory.from_canonical_bytes(directory.to_bytes())
        assert read == directory
        fresh = Directory(directory.directories, directory.files, directory.symlinks)  # digest not known yet
        assert read.digest() == b3digest(directory.to_bytes()) == fresh.digest()


def test_received_directories_are_checked_by_what_they_are() -> None:
    """Over the network (Directory.from_named_bytes): bytes hashing to a digest asked for are
    that directory; any other bytes get their digest computed, so another encoding of the same
    directory still counts as it, and another directory never does."""
    got = Directory.from_named_bytes(LEAF.to_bytes(), {LEAF.digest()})
    assert got == LEAF and got.digest() == LEAF.digest()
    reencoded = Directory.from_named_bytes(LEAF.to_bytes() + b"\x20\x01", {LEAF.digest()})
    assert reencoded == LEAF and reencoded.digest() == LEAF.digest()
    assert Directory.from_named_bytes(OTHER.to_bytes(), {LEAF.digest()}).digest() == OTHER.digest()


def test_store_reads_back_what_was_put(tmp_path: Path) -> None:
    _store_tree(tmp_path)
    store = open_local_store(tmp_path, "never")
    try:
        assert store.directories.get(LEAF.digest()) == LEAF
        assert list(store.directories.get_recursive(ROOT.digest())) == [ROOT, LEAF]
        assert [d.digest() for d in store.directories.get_recursive(ROOT.digest())] == [
            ROOT.digest(),
            LEAF.digest(),
        ]
    finally:
        store.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(OTHER.to_bytes(), id="another-valid-directory"),
        # The same directory, not canonically encoded (an unknown field appended): its bytes
        # hash to another digest, so it is refused as before.
        pytest.param(LEAF.to_bytes() + b"\x20\x01", id="non-canonical-encoding"),
        pytest.param(b"\xff\x01garbage", id="undecodable"),
    ],
)
def test_damaged_row_is_corrupt_data(tmp_path: Path, damage: bytes) -> None:
    _store_tree(tmp_path)
    _replace_row(tmp_path, LEAF.digest(), damage)
    store = open_local_store(tmp_path, "never")
    try:
        with pytest.raises(CorruptDataError, match=LEAF.digest().hex()):
            store.directories.get(LEAF.digest())
        with pytest.raises(CorruptDataError, match=LEAF.digest().hex()):
            list(store.directories.get_recursive(ROOT.digest()))
    finally:
        store.close()


def _tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "lib" / "deep").mkdir(parents=True)
    for i in range(20):
        (tree / "lib" / f"m{i}.py").write_bytes(f"value = {i}\n".encode() * (i + 1))
    (tree / "lib" / "deep" / "x").write_bytes(b"x" * 5000)
    return tree


@needs_fuse
def test_mount_reads_stored_directories(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    tree = _tree(tmp_path)
    name = import_tree(store_dir, tree, "dirs")
    with mounted(TVIXFS, tmp_path, f"local://{store_dir}") as mount:
        root = mount.path(name)
        assert sorted(os.listdir(root / "lib")) == sorted(os.listdir(tree / "lib"))
        for path in (tree / "lib").rglob("*"):
            if path.is_file():
                assert (root / path.relative_to(tree)).read_bytes() == path.read_bytes()


@needs_fuse
@pytest.mark.expect_errors
def test_mount_refuses_a_damaged_directory_row(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    tree = _tree(tmp_path)
    name = import_tree(store_dir, tree, "dirs")
    deep = Directory.of([FileNode(b"x", b3digest(b"x" * 5000), 5000)])
    _replace_row(store_dir, deep.digest(), OTHER.to_bytes())
    with mounted(TVIXFS, tmp_path, f"local://{store_dir}") as mount:
        with pytest.raises(OSError) as raised:
            os.listdir(mount.path(name, "lib", "deep"))
        assert raised.value.errno == errno.EIO
