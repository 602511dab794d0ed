"""Issue 18: an embedded store's chunk fan-out directories are made by the first write into them.

A new store starts with an empty chunk root (no 256 mkdirs before the first file); a put
makes the directory its chunk needs, the bytes read back after a reopen, and fsck and gc
take a store with most fan-outs absent as healthy.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tvixfs.castore.digest import b3digest
from tvixfs.importers.ingest import ingest_path
from tvixfs.services.backends.chunkfiles import ChunkFiles
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.errors import StoreError


def _tool(cmd: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, check=False)


def test_new_store_has_only_the_fan_outs_its_writes_needed(tmp_path: Path, tvixfs_cmd: list[str]) -> None:
    store_dir = tmp_path / "store"
    open_local_store(store_dir).close()
    assert list((store_dir / "chunks").iterdir()) == []

    data = b"a blob of its own\n" * 100
    store = open_local_store(store_dir)
    try:
        digest = store.blobs.put((data,))
    finally:
        store.close()
    assert digest == b3digest(data)
    assert sorted(p.name for p in (store_dir / "chunks").iterdir()) == [digest.hex()[:2]]

    reopened = open_local_store(store_dir, create="never")
    try:
        assert b"".join(reopened.blobs.read(digest)) == data
    finally:
        reopened.close()
    fsck = _tool(tvixfs_cmd, "fsck", "--store", f"local://{store_dir}")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    gc = _tool(tvixfs_cmd, "gc", "--store", f"local://{store_dir}")
    assert gc.returncode == 0, gc.stderr
    assert os.listdir(store_dir / "chunks" / digest.hex()[:2]) == []  # no path info held the blob


def test_an_import_makes_what_it_needs(tmp_path: Path, sample_tree: Path, tvixfs_cmd: list[str]) -> None:
    store_dir = tmp_path / "store"
    store = open_local_store(store_dir)
    try:
        info = ingest_path(store, sample_tree, "sample")
    finally:
        store.close()
    made = {p.name for p in (store_dir / "chunks").iterdir()}
    assert 0 < len(made) < 256
    assert all(len(os.listdir(store_dir / "chunks" / name)) > 0 for name in made)
    fsck = _tool(tvixfs_cmd, "fsck", "--store", f"local://{store_dir}", "--check-contents")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    shown = _tool(
        tvixfs_cmd,
        "cat",
        "--store",
        f"local://{store_dir}",
        f"/nix/store/{info.node.directory.name.decode()}/bin/hello",
    )
    assert shown.stdout == "#!/bin/sh\necho hello from tvixfs\n"


def test_a_fan_out_made_by_another_writer_is_used(tmp_path: Path) -> None:
    """Two writers (processes of one import, or two imports) may reach a new fan-out at once."""
    first, second = ChunkFiles(tmp_path / "chunks"), ChunkFiles(tmp_path / "chunks")
    first.create_root()
    data = b"same chunk"
    digest = b3digest(data)
    first.write(digest, memoryview(data))
    second.write(digest, memoryview(data))  # its directory and file exist already
    other = b"another chunk with the same first byte?"
    second.write(b3digest(other), memoryview(other))
    assert first.read(digest) == data and first.read(b3digest(other)) == other


def test_a_missing_chunk_root_fails_the_write(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = open_local_store(store_dir)
    try:
        (store_dir / "chunks").rmdir()
        with pytest.raises((OSError, StoreError)):
            store.blobs.put((b"nowhere to go",))
    finally:
        store.close()
    assert not (store_dir / "chunks").exists()
