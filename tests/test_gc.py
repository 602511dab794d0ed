"""``tvixfs gc`` and ``tvixfs delete``: leftovers of killed imports are counted and freed, while
imports and mounts running meanwhile lose nothing."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from grpcserver import running_daemon
from mounting import TVIXFS, mounted, needs_fuse
from nixchroot import nix_dump

from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import FileNode
from tvixfs.services.backends.local import open_local_store

_FSCK_LEFTOVERS = re.compile(r"(\d+) unreferenced blobs, (\d+) unreferenced directories")
_GC = re.compile(r"^(freed|would free) (\d+) blobs, (\d+) directories, (\d+) chunk files \((\S+) MiB\)$")
NAR_PATH = f"/nix/store/{'1' * 32}-nar-tree"


def tvixfs(store_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*TVIXFS, *args, "--store", f"local://{store_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def export_nar(store_dir: Path, path: str) -> bytes:
    argv = [*TVIXFS, "export-nar", "--store", f"local://{store_dir}", path]
    return subprocess.run(argv, check=True, capture_output=True, timeout=300).stdout


def make_big_tree(root: Path, files: int, size: int) -> Path:
    """Many files of random bytes: an import of it takes a few seconds here."""
    for i in range(files):
        directory = root / f"d{i % 16:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i:05d}").write_bytes(os.urandom(size))
    return root


def pathinfo_rows(store_dir: Path) -> int:
    db = sqlite3.connect(store_dir / "db.sqlite", timeout=30)
    try:
        return int(db.execute("SELECT count(*) FROM pathinfos").fetchone()[0])
    finally:
        db.close()


def blob_rows(store_dir: Path) -> int:
    db = sqlite3.connect(store_dir / "db.sqlite", timeout=30)
    try:
        return int(db.execute("SELECT count(*) FROM blobs").fetchone()[0])
    finally:
        db.close()


def chunk_bytes(store_dir: Path) -> int:
    return sum(p.stat().st_size for p in (store_dir / "chunks").rglob("*") if p.is_file())


def gc_line(result: subprocess.CompletedProcess[str]) -> tuple[str, int, int, int, float]:
    found = _GC.match(result.stdout.strip())
    assert found, result.stdout
    verb, blobs, dirs, chunks, mib = found.groups()
    return verb, int(blobs), int(dirs), int(chunks), float(mib)


def leave_unreferenced_directory(store_dir: Path) -> None:
    """A blob and a directory put and never named by a path info, by a writer that is gone
    (as a daemon's client that died between its uploads would leave them)."""
    store = open_local_store(store_dir)
    try:
        data = os.urandom(1000)
        digest = store.blobs.put([data])
        store.directories.put(Directory(files=(FileNode(b"orphan", digest, len(data), False),)))
    finally:
        store.close()


def kill_import_midway(store_dir: Path, tree: Path) -> None:
    """Start ``tvixfs import``, ``kill -9`` it once it has committed some blobs.

    Blobs are committed at least every second (localdb FLUSH_AFTER) and with the path info at
    the end: the tree must take the import several seconds, or the first rows seen are the last.
    """
    before = blob_rows(store_dir)
    paths_before = pathinfo_rows(store_dir)
    proc = subprocess.Popen(
        [*TVIXFS, "import", "--store", f"local://{store_dir}", str(tree)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while blob_rows(store_dir) < before + 200:
            assert proc.poll() is None, "the import finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert pathinfo_rows(store_dir) == paths_before, "the import completed before it could be killed"


def test_killed_import_leftovers_are_counted_listed_and_freed(tmp_path: Path, sample_tree: Path) -> None:
    store_dir = tmp_path / "store"
    live = tvixfs(store_dir, "import", str(sample_tree)).stdout.strip()
    kill_import_midway(store_dir, make_big_tree(tmp_path / "big", 12000, 32 << 10))
    leave_unreferenced_directory(store_dir)

    fsck = tvixfs(store_dir, "fsck")  # leftovers are no problems: exit 0
    found = _FSCK_LEFTOVERS.search(fsck.stdout)
    assert found, fsck.stdout
    leftover_blobs, leftover_dirs = int(found[1]), int(found[2])
    assert leftover_blobs > 200 and leftover_dirs == 1
    assert " 0 problems;" in fsck.stdout

    size_before = chunk_bytes(store_dir)
    planned = gc_line(tvixfs(store_dir, "gc", "--dry-run"))
    assert planned[:3] == ("would free", leftover_blobs, 1)
    assert planned[3] >= leftover_blobs and planned[4] > 1
    assert chunk_bytes(store_dir) == size_before  # a dry run removes nothing
    assert blob_rows(store_dir) > leftover_blobs

    freed = gc_line(tvixfs(store_dir, "gc"))
    assert freed == ("freed", *planned[1:])
    size_after = chunk_bytes(store_dir)
    assert size_before - size_after >= planned[4] * 2**20 * 0.99
    assert size_after >= (sample_tree / "large.bin").stat().st_size

    after = tvixfs(store_dir, "fsck", "--check-contents").stdout
    assert after.strip().endswith(
        "0 problems; 0 unreferenced chunk files, 0 temporary files; "
        "0 unreferenced blobs, 0 unreferenced directories (tvixfs gc would free 0.0 MiB)"
    ), after
    assert tvixfs(store_dir, "ls").stdout.split() == [live]
    assert export_nar(store_dir, live) == nix_dump(sample_tree)
    assert gc_line(tvixfs(store_dir, "gc"))[1:4] == (0, 0, 0)


def test_gc_during_imports_keeps_their_data(tmp_path: Path, sample_tree: Path) -> None:
    """gc, run again and again while a tree import (chunk worker processes) and a NAR import
    (puts committed in several transactions) go on, frees none of what they wrote."""
    store_dir = tmp_path / "store"
    live = tvixfs(store_dir, "import", str(sample_tree)).stdout.strip()
    kill_import_midway(store_dir, make_big_tree(tmp_path / "killed", 12000, 32 << 10))
    tree = make_big_tree(tmp_path / "tree", 3000, 8 << 10)
    nar_tree = make_big_tree(tmp_path / "nar-tree", 3000, 8 << 10)
    nar_file = tmp_path / "tree.nar"
    nar_file.write_bytes(nix_dump(nar_tree))

    importers = [
        subprocess.Popen(
            [*TVIXFS, "import", "--store", f"local://{store_dir}", str(tree)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen(
            [*TVIXFS, "import-nar", "--store", f"local://{store_dir}", "--path", NAR_PATH, str(nar_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    collections = 0
    while any(p.poll() is None for p in importers):
        gc_line(tvixfs(store_dir, "gc"))
        collections += 1
    outputs = [p.communicate() for p in importers]
    assert [p.returncode for p in importers] == [0, 0], outputs
    assert collections >= 2
    imported = outputs[0][0].strip()

    gc_line(tvixfs(store_dir, "gc"))
    fsck = tvixfs(store_dir, "fsck", "--check-contents").stdout
    assert (
        " 3 path infos: 0 problems; " in fsck and "; 0 unreferenced blobs, 0 unreferenced directories" in fsck
    )
    assert export_nar(store_dir, imported) == nix_dump(tree)
    assert export_nar(store_dir, NAR_PATH) == nar_file.read_bytes()
    assert export_nar(store_dir, live) == nix_dump(sample_tree)


def test_gc_during_an_import_through_the_daemon(short_tmp: Path) -> None:
    """A client of ``tvixfs daemon`` uploads blobs, then directories, then the path info, in
    separate calls: gc runs between them (the daemon's pins keep the uploads)."""
    store_dir = short_tmp / "store"
    tree = make_big_tree(short_tmp / "tree", 3000, 8 << 10)
    socket = short_tmp / "d.sock"
    with running_daemon(TVIXFS, short_tmp, f"local://{store_dir}", [f"unix:{socket}"]):
        importer = subprocess.Popen(
            [*TVIXFS, "import", "--store", f"grpc+unix://{socket}", str(tree)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        collections = 0
        while importer.poll() is None:
            gc_line(tvixfs(store_dir, "gc"))
            collections += 1
        out, err = importer.communicate()
        assert importer.returncode == 0, err
        assert collections >= 2
    assert export_nar(store_dir, out.strip()) == nix_dump(tree)
    fsck = tvixfs(store_dir, "fsck").stdout
    assert (
        " 1 path infos: 0 problems; " in fsck and "; 0 unreferenced blobs, 0 unreferenced directories" in fsck
    )


@needs_fuse
def test_gc_while_a_mount_reads(short_tmp: Path, sample_tree: Path) -> None:
    store_dir = short_tmp / "store"
    live = tvixfs(store_dir, "import", str(sample_tree)).stdout.strip()
    files = [p for p in sample_tree.rglob("*") if p.is_file() and not p.is_symlink()]
    expected = {p.relative_to(sample_tree): p.read_bytes() for p in files}
    reads = 0
    mismatches: list[str] = []
    stop = threading.Event()

    with mounted(TVIXFS, short_tmp, f"local://{store_dir}") as mount:
        root = mount.path(os.path.basename(live))

        def read_all() -> None:
            nonlocal reads
            while not stop.is_set():
                for relative, data in expected.items():
                    if (root / relative).read_bytes() != data:
                        mismatches.append(str(relative))
                    reads += 1

        reader = threading.Thread(target=read_all)
        reader.start()
        try:
            for _ in range(5):
                for _ in range(20):
                    leave_unreferenced_directory(store_dir)
                assert gc_line(tvixfs(store_dir, "gc"))[1:3] == (20, 20)
        finally:
            stop.set()
            reader.join()
    assert mismatches == []
    assert reads >= len(expected)


def test_delete_refuses_live_references_and_gc_frees_deleted_paths(tmp_path: Path, sample_tree: Path) -> None:
    store_dir = tmp_path / "store"
    base = tvixfs(store_dir, "import", str(sample_tree)).stdout.strip()
    small = tmp_path / "small"
    small.mkdir()
    (small / "uses-base").write_text(f"{base}/bin/hello\n")
    nar = tmp_path / "small.nar"
    nar.write_bytes(nix_dump(small))
    user = tvixfs(store_dir, "import-nar", str(nar), "--path", NAR_PATH, "--reference", base).stdout.strip()

    refused = tvixfs(store_dir, "delete", base, check=False)
    assert refused.returncode == 1
    assert refused.stderr == f"tvixfs: error: cannot delete {base}: still referenced by {user}\n"
    absent = f"/nix/store/{'2' * 32}-absent"
    refused = tvixfs(store_dir, "delete", user, absent, check=False)
    assert (refused.returncode, refused.stderr) == (
        1,
        f"tvixfs: error: cannot delete {absent}: not in the store\n",
    )
    assert sorted(tvixfs(store_dir, "ls").stdout.split()) == sorted([base, user])  # all or nothing

    assert tvixfs(store_dir, "delete", user).stdout == f"deleted {user}\n"
    assert export_nar(store_dir, base) == nix_dump(sample_tree)
    assert tvixfs(store_dir, "delete", base).stdout == f"deleted {base}\n"
    assert tvixfs(store_dir, "ls").stdout == ""
    freed = gc_line(tvixfs(store_dir, "gc"))
    assert freed[1] > 5 and freed[2] > 5
    assert not any(p.is_file() for p in (store_dir / "chunks").rglob("*"))
    assert tvixfs(store_dir, "fsck").stdout.startswith("checked 0 chunk files, 0 blobs, 0 directories")


@pytest.mark.parametrize("command", [["gc"], ["gc", "--dry-run"], ["delete", NAR_PATH]])
@pytest.mark.parametrize("url", ["memory://", "grpc+http://127.0.0.1:9"])
def test_other_stores_are_refused_in_one_line(command: list[str], url: str) -> None:
    result = subprocess.run([*TVIXFS, *command, "--store", url], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("tvixfs: error: ") and "embedded store only" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_gc_of_a_missing_store_creates_none(tmp_path: Path) -> None:
    result = tvixfs(tmp_path / "typo", "gc", check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "typo").exists()


def test_uploads_of_a_live_writer_are_kept_until_it_ends(tmp_path: Path) -> None:
    """What a writer put and committed, without a path info yet (a daemon's client between its
    uploads), survives gc while that writer lives: its pins are roots; after it ends, it goes."""
    store_dir = tmp_path / "store"
    store = open_local_store(store_dir)
    try:
        data = os.urandom(5000)
        digest = store.blobs.put([data])
        store.directories.put(Directory(files=(FileNode(b"f", digest, len(data), False),)))
        assert gc_line(tvixfs(store_dir, "gc"))[1:4] == (0, 0, 0)
        assert b"".join(store.blobs.read(digest)) == data
    finally:
        store.close()
    assert gc_line(tvixfs(store_dir, "gc"))[1:4] == (1, 1, 1)


def test_damage_that_hides_live_data_stops_gc(tmp_path: Path, sample_tree: Path) -> None:
    """An undecodable path info may name anything: gc removes nothing rather than guess."""
    store_dir = tmp_path / "store"
    tvixfs(store_dir, "import", str(sample_tree))
    leave_unreferenced_directory(store_dir)
    db = sqlite3.connect(store_dir / "db.sqlite")
    with db:
        db.execute("UPDATE pathinfos SET data = ?", (b"\x0a\x05broken",))
    db.close()
    before = chunk_bytes(store_dir)
    for args in (["gc"], ["gc", "--dry-run"]):
        result = tvixfs(store_dir, *args, check=False)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert (
            "is undecodable, so what is live cannot be told: nothing removed; run tvixfs fsck"
            in result.stderr
        )
    assert chunk_bytes(store_dir) == before
