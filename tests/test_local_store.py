"""The embedded store on disk: dedup, persistence, corruption, concurrency, and kill -9."""

from __future__ import annotations

import os
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import store_writer
from conftest import make_sample_tree

from tvixfs.castore.chunking import MAX_CHUNK, MIN_CHUNK
from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode, node_from_proto, node_to_proto
from tvixfs.maintenance.fsck import FsckResult, fsck_local_store
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends import localdb
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.localdb import NotAStoreError
from tvixfs.services.base import Store
from tvixfs.services.errors import (
    CorruptDataError,
    FailedPreconditionError,
    StoreUnavailableError,
)
from tvixfs.store import nixbase32
from tvixfs.store.storepath import StorePath

WRITER = Path(store_writer.__file__)
HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[Store]:
    opened = open_local_store(store_dir)
    try:
        yield opened
    finally:
        opened.close()


def chunk_files(store_dir: Path) -> set[str]:
    return {p.name for p in (store_dir / "chunks").glob("*/*") if HEX64.fullmatch(p.name)}


def fsck(store_dir: Path) -> tuple[FsckResult, list[str]]:
    lines: list[str] = []
    return fsck_local_store(store_dir, lines.append, check_contents=True), lines


def test_new_store_is_private_and_laid_out(store: Store, store_dir: Path) -> None:
    assert (store_dir / "db.sqlite").is_file()
    assert store_dir.stat().st_mode & 0o777 == 0o700
    assert list((store_dir / "chunks").iterdir()) == []  # fan-outs come with the first writes


def test_identical_data_is_stored_once(store: Store, store_dir: Path) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest = store.blobs.put([data])
    files = chunk_files(store_dir)
    assert store.blobs.put([data[:1000], data[1000:]]) == digest
    assert chunk_files(store_dir) == files
    # An edit in the middle costs the chunks around it, not every chunk after it.
    edited = data[:2_000_000] + b"inserted" + data[2_000_000:]
    store.blobs.put([edited])
    assert len(chunk_files(store_dir) - files) <= 2
    assert b"".join(store.blobs.read(b3digest(edited))) == edited


def test_large_blob_is_chunked_small_blob_is_its_own_chunk(store: Store, store_dir: Path) -> None:
    data = os.urandom(5 * 1024 * 1024)
    digest = store.blobs.put([data])
    chunks = store.blobs.stat(digest, send_chunks=True)
    assert chunks is not None and len(chunks) > 1
    assert all(MIN_CHUNK <= c.size <= MAX_CHUNK for c in chunks[:-1])
    assert b"".join(b"".join(store.blobs.read(c.digest)) for c in chunks) == data
    assert store.blobs.stat(chunks[0].digest) is None, "a chunk is readable, not a blob of its own"
    small = store.blobs.put([b"small"])
    assert store.blobs.stat(small, send_chunks=True) == []
    assert small.hex() in chunk_files(store_dir)


def test_store_persists_across_reopen_and_close_is_idempotent(store_dir: Path) -> None:
    store = open_local_store(store_dir)
    blob = store.blobs.put([b"persistent"])
    leaf = Directory(files=(FileNode(b"f", blob, 10),))
    root = Directory(directories=(DirectoryNode(b"d", leaf.digest(), leaf.size()),))
    store.directories.put_many([leaf, root])
    path = store_writer.store_path(7)
    info = pathinfo_pb2.PathInfo(
        node=node_to_proto(DirectoryNode(path.basename.encode(), root.digest(), root.size()))
    )
    store.pathinfos.put(info)
    for _ in range(3):
        store.close()
    with pytest.raises(StoreUnavailableError):
        store.blobs.stat(blob)
    reopened = open_local_store(store_dir)
    try:
        assert b"".join(reopened.blobs.read(blob)) == b"persistent"
        assert list(reopened.directories.get_recursive(root.digest())) == [root, leaf]
        assert reopened.pathinfos.get(path.digest) == info
    finally:
        reopened.close()


def test_damaged_chunk_raises_and_never_yields_wrong_bytes(store: Store, store_dir: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    digest = store.blobs.put([data])
    chunks = store.blobs.stat(digest, send_chunks=True)
    assert chunks is not None and len(chunks) > 2
    damaged = store_dir / "chunks" / chunks[1].digest.hex()[:2] / chunks[1].digest.hex()
    raw = bytearray(damaged.read_bytes())
    raw[100] ^= 1
    damaged.write_bytes(raw)
    received = b""
    with pytest.raises(CorruptDataError):
        for piece in store.blobs.read(digest):
            received += piece
    assert received == data[: chunks[0].size]
    with pytest.raises(CorruptDataError):
        b"".join(store.blobs.read(chunks[1].digest))
    store.close()  # commits the blob: fsck sees committed rows only
    result, lines = fsck(store_dir)
    assert result.problems == 2
    assert any(chunks[1].digest.hex() in line and "damaged" in line for line in lines)
    assert any(line.startswith(f"blob {digest.hex()}") for line in lines)


def test_missing_chunk_file_is_corrupt_data(store: Store, store_dir: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = store.blobs.put([data])
    chunks = store.blobs.stat(digest, send_chunks=True)
    assert chunks
    (store_dir / "chunks" / chunks[-1].digest.hex()[:2] / chunks[-1].digest.hex()).unlink()
    with pytest.raises(CorruptDataError):
        b"".join(store.blobs.read(digest))


def test_pathinfo_is_refused_until_its_whole_tree_is_present(store: Store) -> None:
    absent = FileNode(b"deep-file", b3digest(b"not yet"), 7)
    leaf = Directory(files=(absent,))
    root = Directory(directories=(DirectoryNode(b"d", leaf.digest(), leaf.size()),))
    store.directories.put_many([leaf, root])
    path = store_writer.store_path(1)
    info = pathinfo_pb2.PathInfo(
        node=node_to_proto(DirectoryNode(path.basename.encode(), root.digest(), root.size()))
    )
    with pytest.raises(FailedPreconditionError, match=absent.digest.hex()):
        store.pathinfos.put(info)
    store.blobs.put([b"not yet"])
    store.pathinfos.put(info)
    assert store.pathinfos.get(path.digest) == info


def test_what_is_not_a_store_is_refused(tmp_path: Path) -> None:
    busy = tmp_path / "home"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(NotAStoreError, match="not empty"):
        open_local_store(busy)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises((NotAStoreError, StoreUnavailableError)):
        open_local_store(file)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "db.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(NotAStoreError):
        open_local_store(garbage)
    with pytest.raises(StoreUnavailableError, match="cannot create"):
        open_local_store(Path("/proc/tvixfs-store"))
    assert (busy / "notes.txt").read_text() == "mine"


def test_store_killed_while_being_created_is_completed_on_open(store_dir: Path) -> None:
    (store_dir / "chunks" / "00").mkdir(parents=True)
    sqlite3.connect(store_dir / "db.sqlite").close()  # an empty database: no schema committed
    result, lines = fsck(store_dir)
    assert (result.problems, lines) == (0, [])
    store = open_local_store(store_dir)
    try:
        assert b"".join(store.blobs.read(store.blobs.put([b"works"]))) == b"works"
    finally:
        store.close()


def test_store_of_a_newer_schema_is_refused(store_dir: Path) -> None:
    open_local_store(store_dir).close()
    with sqlite3.connect(store_dir / "db.sqlite") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(NotAStoreError, match="version 99"):
        open_local_store(store_dir)


def test_concurrent_readers_and_writers_across_two_opens(store_dir: Path) -> None:
    first = open_local_store(store_dir)
    second = open_local_store(store_dir)
    blobs = {b3digest(d): d for d in (os.urandom(n * 97_000) for n in range(1, 9))}
    errors: list[BaseException] = []

    def work(store: Store, offset: int) -> None:
        try:
            for k in range(20):
                for digest, data in list(blobs.items())[offset::2]:
                    assert store.blobs.put([data]) == digest
                    assert b"".join(store.blobs.read(digest)) == data
                directory = Directory(files=(FileNode(b"n%d-%d" % (offset, k), b3digest(b""), 0),))
                store.blobs.put([b""])
                store.directories.put(directory)
                assert store.directories.get(directory.digest()) == directory
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s, i % 2)) for i, s in enumerate([first, second] * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.close()
    second.close()
    assert errors == []
    result, lines = fsck(store_dir)
    assert (result.problems, lines) == (0, [])


# --- group commit: puts are pending until a commit makes them durable -----------------------------


@pytest.fixture
def no_background_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Puts stay pending until a commit: the flusher would otherwise commit them within 1 s."""
    monkeypatch.setattr(localdb, "FLUSH_AFTER", 3600.0)


@pytest.mark.usefixtures("no_background_flush")
def test_put_blob_is_pending_until_the_next_commit(store: Store, store_dir: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    digest = store.blobs.put([data])
    other = open_local_store(store_dir)  # what another process sees
    try:
        assert store.blobs.stat(digest, send_chunks=True), "this process sees its put at once"
        assert b"".join(store.blobs.read(digest)) == data
        assert other.blobs.stat(digest) is None, "not committed yet"
        leaf = Directory(files=(FileNode(b"f", digest, len(data)),))
        store.directories.put(leaf)
        assert other.blobs.stat(digest, send_chunks=True) == store.blobs.stat(digest, send_chunks=True)
        assert other.directories.get(leaf.digest()) == leaf
        later = store.blobs.put([b"put last, committed by close"])
        assert other.blobs.stat(later) is None
        store.close()
        assert b"".join(other.blobs.read(later)) == b"put last, committed by close"
    finally:
        other.close()


def test_pending_blobs_are_committed_in_the_background(
    store: Store, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without any other commit, a put becomes visible (and durable) to others soon after."""
    monkeypatch.setattr(localdb, "FLUSH_AFTER", 0.05)
    digest = store.blobs.put([b"acknowledged by a daemon, then nothing else happens"])
    other = open_local_store(store_dir)
    try:
        deadline = time.monotonic() + 30
        while other.blobs.stat(digest) is None:
            assert time.monotonic() < deadline, "the flusher never committed the put"
            time.sleep(0.01)
    finally:
        other.close()


@pytest.mark.usefixtures("no_background_flush")
def test_pathinfo_commits_its_pending_blobs_with_it(store: Store, store_dir: Path) -> None:
    blob = store.blobs.put([b"only pending so far"])
    other = open_local_store(store_dir)
    try:
        leaf = Directory(files=(FileNode(b"f", blob, 19),))
        # A directory stored by another open (process) does not commit this one's blob ...
        other.directories.put(leaf)
        assert other.blobs.stat(blob) is None
        path = store_writer.store_path(3)
        info = pathinfo_pb2.PathInfo(
            node=node_to_proto(DirectoryNode(path.basename.encode(), leaf.digest(), leaf.size()))
        )
        # ... so there the path info is refused, here the blob is committed along with it.
        with pytest.raises(FailedPreconditionError, match=blob.hex()):
            other.pathinfos.put(info)
        store.pathinfos.put(info)
        assert other.pathinfos.get(path.digest) == info
        assert b"".join(other.blobs.read(blob)) == b"only pending so far"
    finally:
        other.close()


def test_put_never_trusts_a_chunk_file_it_did_not_commit(store: Store, store_dir: Path) -> None:
    """After an OS crash, a chunk file renamed but never synced may be empty or hold garbage:
    a later put of the same bytes rewrites it instead of committing a blob that relies on it."""
    empty_one, garbage_one = os.urandom(5000), os.urandom(7000)
    for data, leftover in ((empty_one, b""), (garbage_one, os.urandom(len(garbage_one)))):
        digest = b3digest(data)
        path = store_dir / "chunks" / digest.hex()[:2] / digest.hex()
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(leftover)
        assert store.blobs.put([data]) == digest
        assert path.read_bytes() == data
        assert b"".join(store.blobs.read(digest)) == data
    store.close()
    result, lines = fsck(store_dir)
    assert (result.problems, result.blobs, lines) == (0, 2, [])


def test_kill_9_before_any_commit_leaves_only_unreferenced_chunks(store_dir: Path) -> None:
    """A writer killed with puts pending: none of them is in the store, nothing is damaged."""
    writer = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "from tvixfs.services.backends import localdb\n"
        "from tvixfs.services.backends.local import open_local_store\n"
        "localdb.FLUSH_AFTER = 3600.0\n"
        "store = open_local_store(Path(sys.argv[1]))\n"
        "for i in range(50):\n"
        "    store.blobs.put([os.urandom(i * 20_000)])\n"
        "print('put', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer, str(store_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "put\n"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    result, lines = fsck(store_dir)
    assert (result.problems, lines, result.blobs) == (0, [], 0)
    assert result.orphan_chunks > 50
    assert assert_consistent(store_dir) == 0


# --- kill -9 -----------------------------------------------------------------------------------


def wait_for_lines(proc: subprocess.Popen[str], count: int, timeout: float = 120) -> None:
    """Read ``count`` progress lines from the writer, failing if it stalls or exits first."""
    assert proc.stdout is not None
    for _ in range(count):
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"the writer printed nothing for {timeout} s"
        line = proc.stdout.readline()
        assert line.startswith("wrote "), f"writer ended early: {line!r}, exit {proc.poll()}"


def chunk_file_count(store_dir: Path) -> int:
    return sum(len(os.listdir(d)) for d in (store_dir / "chunks").glob("??"))


def wait_until_writing_chunks(proc: subprocess.Popen[bytes], store_dir: Path, timeout: float = 60) -> None:
    """Until ``proc`` adds a chunk file to ``store_dir`` (it is importing), checked every 2 ms.

    Chunk files are not fsynced one by one, so each is open for microseconds only: a new file
    in the store is what shows that the import is writing. An import that finds every chunk
    already stored (the previous kill came after its last one) may end first, successfully.
    """
    before = chunk_file_count(store_dir)
    deadline = time.monotonic() + timeout
    while chunk_file_count(store_dir) <= before:
        if proc.poll() is not None:
            assert proc.returncode == 0, f"exited with {proc.returncode} before writing any chunk"
            return
        assert time.monotonic() < deadline, f"no chunk file was written within {timeout} s"
        time.sleep(0.002)


def assert_consistent(store_dir: Path) -> int:
    """The store opens, fsck finds no damage, every path info present has all its content."""
    store = open_local_store(store_dir)
    result, lines = fsck(store_dir)
    assert (result.problems, lines) == (0, [])
    try:
        infos = list(store.pathinfos.list())
        for info in infos:
            root = node_from_proto(info.node)
            assert isinstance(root, DirectoryNode)
            for directory in store.directories.get_recursive(root.digest):
                for file in directory.files:
                    assert b3digest(b"".join(store.blobs.read(file.digest))) == file.digest
        return len(infos)
    finally:
        store.close()


# (path infos the writer reports before the kill, then how long until the kill): the delays
# only vary where the kill lands (opening the store, mid chunk file, between commits); no
# assertion depends on where that is.
KILLS = [(0, 0.2), (1, 0.0), (1, 0.003), (2, 0.007), (1, 0.011), (1, 0.017), (3, 0.005), (1, 0.023)]


def test_kill_9_mid_write_never_leaves_a_broken_store(store_dir: Path) -> None:
    count = 30
    command = [sys.executable, str(WRITER), str(store_dir), str(count)]
    present = 0
    for progress, delay in KILLS:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            wait_for_lines(proc, progress)
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait(timeout=60)
        now = assert_consistent(store_dir)
        assert now >= present + progress
        present = now
    assert present < count, "the writer should still have work left"
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=300)
    assert assert_consistent(store_dir) == count
    store = open_local_store(store_dir)
    try:
        for i in range(count):
            info = store.pathinfos.get(store_writer.store_path(i).digest)
            assert info is not None
            assert node_from_proto(info.node) == store_writer.item_tree(i)[1]
    finally:
        store.close()
    lines: list[str] = []
    repaired = fsck_local_store(store_dir, lines.append, repair=True)
    assert (repaired.problems, lines) == (0, [])
    clean, _ = fsck(store_dir)
    assert (clean.orphan_chunks, clean.temp_files, clean.pathinfos) == (0, 0, count)


@pytest.mark.nix
def test_kill_9_of_tvixfs_import_then_reimport(tvixfs_cmd: list[str], tmp_path: Path) -> None:
    tree = make_sample_tree(tmp_path / "tree")
    for i in range(40):
        (tree / f"big-{i:02d}.bin").write_bytes(os.urandom(1_500_000))
    (tree / "many").mkdir()
    for i in range(300):
        (tree / "many" / f"f{i:03d}").write_bytes(os.urandom(i * 37))
    store_dir = tmp_path / "store"
    command = [*tvixfs_cmd, "import", str(tree), "--name", "big-tree", "--store", f"local://{store_dir}"]
    # Writing this tree's chunks takes ~0.3-1 s here: these delays, counted from the first new
    # chunk written, land the kill early, mid-way or late; the store must be sound in every case.
    for delay in (0.0, 0.05, 0.15, 0.3):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_writing_chunks(proc, store_dir)
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait(timeout=60)
        assert_consistent(store_dir)
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    assert assert_consistent(store_dir) == 1
    store = open_local_store(store_dir)
    try:
        (info,) = store.pathinfos.list()
    finally:
        store.close()
    assert done.stdout.strip() == StorePath.from_basename(node_from_proto(info.node).name).absolute
    nix_hash = subprocess.run(
        ["nix-hash", "--type", "sha256", "--base32", str(tree)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert nixbase32.encode(info.narinfo.nar_sha256) == nix_hash
