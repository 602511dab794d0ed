"""``tvixfs fsck``: what a user sees for each kind of damage, and that repair lets re-import finish."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, node_from_proto
from tvixfs.importers.ingest import ingest_path
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.local import open_local_store


def run_fsck(cmd: list[str], store_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmd, "fsck", "--store", f"local://{store_dir}", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def ingest(store_dir: Path, tree: Path) -> pathinfo_pb2.PathInfo:
    store = open_local_store(store_dir)
    try:
        return ingest_path(store, tree, "sample")
    finally:
        store.close()


def directory_at(store_dir: Path, info: pathinfo_pb2.PathInfo, *names: bytes) -> Directory:
    store = open_local_store(store_dir)
    try:
        root = node_from_proto(info.node)
        assert isinstance(root, DirectoryNode)
        directory = store.directories.get(root.digest)
        for name in names:
            assert directory is not None
            child = next(d for d in directory.directories if d.name == name)
            directory = store.directories.get(child.digest)
        assert directory is not None
        return directory
    finally:
        store.close()


def blob_of(store_dir: Path, info: pathinfo_pb2.PathInfo, name: bytes) -> bytes:
    return next(f.digest for f in directory_at(store_dir, info).files if f.name == name)


def chunk_path(store_dir: Path, digest: bytes) -> Path:
    """Where the chunk's file is, its fan-out directory made (a store makes it on first use)."""
    fan_out = store_dir / "chunks" / digest.hex()[:2]
    fan_out.mkdir(exist_ok=True)
    return fan_out / digest.hex()


def execute(store_dir: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(store_dir / "db.sqlite")
    with db:
        assert db.execute(sql, args).rowcount == 1
    db.close()


def large_chunks(store_dir: Path, info: pathinfo_pb2.PathInfo) -> list[bytes]:
    store = open_local_store(store_dir)
    try:
        chunks = store.blobs.stat(blob_of(store_dir, info, b"large.bin"), send_chunks=True)
        assert chunks
        return [c.digest for c in chunks]
    finally:
        store.close()


def damage_chunk(store_dir: Path, info: pathinfo_pb2.PathInfo) -> None:
    path = chunk_path(store_dir, large_chunks(store_dir, info)[1])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(data)


def remove_chunk(store_dir: Path, info: pathinfo_pb2.PathInfo) -> None:
    chunk_path(store_dir, large_chunks(store_dir, info)[0]).unlink()


def remove_blob(store_dir: Path, info: pathinfo_pb2.PathInfo) -> None:
    execute(store_dir, "DELETE FROM blobs WHERE digest = ?", blob_of(store_dir, info, b"empty-file"))


def garble_directory(store_dir: Path, info: pathinfo_pb2.PathInfo) -> None:
    doc = directory_at(store_dir, info, b"share", b"doc")
    execute(store_dir, "UPDATE directories SET data = ? WHERE digest = ?", b"\xff\x01garbage", doc.digest())


def remove_directory(store_dir: Path, info: pathinfo_pb2.PathInfo) -> None:
    bin_dir = directory_at(store_dir, info, b"bin")
    execute(store_dir, "DELETE FROM directories WHERE digest = ?", bin_dir.digest())


def garble_pathinfo(store_dir: Path, info: pathinfo_pb2.PathInfo) -> None:
    execute(store_dir, "UPDATE pathinfos SET data = ?", b"\x0a\x05broken")


@pytest.mark.parametrize(
    "damage",
    [damage_chunk, remove_chunk, remove_blob, garble_directory, remove_directory, garble_pathinfo],
)
def test_damage_is_reported_and_repair_lets_reimport_complete(
    tvixfs_cmd: list[str],
    tmp_path: Path,
    sample_tree: Path,
    damage: Callable[[Path, pathinfo_pb2.PathInfo], None],
) -> None:
    store_dir = tmp_path / "store"
    info = ingest(store_dir, sample_tree)
    name = node_from_proto(info.node).name.decode()
    clean = run_fsck(tvixfs_cmd, store_dir, "--check-contents")
    assert (clean.returncode, clean.stderr) == (0, "")
    assert clean.stdout.startswith("checked ") and " 0 problems;" in clean.stdout

    damage(store_dir, info)
    found = run_fsck(tvixfs_cmd, store_dir)
    assert found.returncode == 1, found.stdout + found.stderr
    *problems, summary = found.stdout.splitlines()
    assert f" {len(problems)} problem" in summary
    assert problems[-1].startswith("path info ")
    assert name in problems[-1] or damage is garble_pathinfo

    repaired = run_fsck(tvixfs_cmd, store_dir, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "(repaired)" in repaired.stdout
    after = run_fsck(tvixfs_cmd, store_dir)
    assert after.returncode == 0, after.stdout
    assert "0 problems; 0 unreferenced chunk files, 0 temporary files" in after.stdout

    store = open_local_store(store_dir)
    try:
        assert list(store.pathinfos.list()) == []
    finally:
        store.close()
    assert ingest(store_dir, sample_tree) == info
    final = run_fsck(tvixfs_cmd, store_dir, "--check-contents")
    assert final.returncode == 0, final.stdout
    assert " 1 path infos: 0 problems" in final.stdout
    store = open_local_store(store_dir)
    try:
        large = blob_of(store_dir, info, b"large.bin")
        assert b"".join(store.blobs.read(large)) == (sample_tree / "large.bin").read_bytes()
    finally:
        store.close()


def test_wrong_nar_hash_is_found_by_check_contents(
    tvixfs_cmd: list[str], tmp_path: Path, sample_tree: Path
) -> None:
    store_dir = tmp_path / "store"
    info = ingest(store_dir, sample_tree)
    info.narinfo.ClearField("ca")  # else the record contradicts itself, which plain fsck sees
    info.narinfo.nar_sha256 = bytes(32)
    execute(store_dir, "UPDATE pathinfos SET data = ?", info.SerializeToString())
    assert run_fsck(tvixfs_cmd, store_dir).returncode == 0
    checked = run_fsck(tvixfs_cmd, store_dir, "--check-contents")
    assert checked.returncode == 1
    assert "NAR is " in checked.stdout.splitlines()[0]


def test_leftovers_are_counted_and_removed_stray_files_are_problems(
    tvixfs_cmd: list[str], tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    open_local_store(store_dir).close()
    orphan = b"chunk data no blob refers to"
    chunk_path(store_dir, b3digest(orphan)).write_bytes(orphan)
    temp = chunk_path(store_dir, b3digest(b"x")).with_name(b3digest(b"x").hex() + ".tmp-123-456")
    temp.write_bytes(b"half written")
    leftovers = run_fsck(tvixfs_cmd, store_dir)
    assert leftovers.returncode == 0
    assert "1 unreferenced chunk files, 1 temporary files;" in leftovers.stdout

    (store_dir / "chunks" / "00").mkdir(exist_ok=True)
    (store_dir / "chunks" / "01").mkdir(exist_ok=True)
    stray = store_dir / "chunks" / "00" / "README"
    stray.write_text("not mine")
    stray_dir = store_dir / "chunks" / "01" / "sub"
    stray_dir.mkdir()
    found = run_fsck(tvixfs_cmd, store_dir)
    assert found.returncode == 1
    assert found.stdout.splitlines()[:2] == [
        f"stray file {stray}: not a chunk of this store",
        f"stray file {stray_dir}: not a chunk of this store",
    ]

    repaired = run_fsck(tvixfs_cmd, store_dir, "--repair")
    assert repaired.returncode == 0
    assert "(removed)" in repaired.stdout
    assert not any(p.exists() for p in (stray, stray_dir, temp, chunk_path(store_dir, b3digest(orphan))))
    after = run_fsck(tvixfs_cmd, store_dir).stdout
    assert "0 problems; 0 unreferenced chunk files, 0 temporary files;" in after


@pytest.mark.parametrize("url", ["memory://", "local:///proc/no-store-here", "bogus://x"])
def test_what_cannot_be_checked_exits_2(tvixfs_cmd: list[str], url: str) -> None:
    result = subprocess.run(
        [*tvixfs_cmd, "fsck", "--store", url], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.startswith("tvixfs: error: ")
    assert len(result.stderr.splitlines()) == 1


def test_missing_chunk_root_is_found_and_recreated(tvixfs_cmd: list[str], tmp_path: Path) -> None:
    """Fan-out directories come with the first write into them; the chunk root must be there."""
    store_dir = tmp_path / "store"
    open_local_store(store_dir).close()
    (store_dir / "chunks").rmdir()
    found = run_fsck(tvixfs_cmd, store_dir)
    assert found.returncode == 1
    assert found.stdout.startswith("chunk directory missing")
    assert run_fsck(tvixfs_cmd, store_dir, "--repair").returncode == 0
    assert (store_dir / "chunks" / "ff").is_dir()
    assert run_fsck(tvixfs_cmd, store_dir).returncode == 0
