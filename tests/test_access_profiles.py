"""Access profiles (tvixfs/fs/accessprofile.py, services/cache/accessprofiles.py): a mount
records what a store path read as it started, a later cold mount fetches that ahead; the bytes
stay the same, the fetches are bounded and counted at a real gRPC store, and a bad profile
file is ignored with a warning."""

from __future__ import annotations

import logging
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing
from faultstore import RemoteFaults, spawn_faultstore
from mounting import TVIXFS, Mount, mounted, needs_fuse
from uniquetrees import dump_nar

from tvixfs.castore.digest import b3digest
from tvixfs.fs import accessprofile
from tvixfs.fs.accessprofile import AccessProfiles
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.reader import BlobReader
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import BlobService, ChunkMeta
from tvixfs.services.cache import accessprofiles
from tvixfs.services.cache.accessprofiles import (
    MAGIC,
    RECORD,
    Entry,
    Kind,
    ProfileError,
    ProfileFiles,
    decode,
    encode,
)

T = TypeVar("T")

pytestmark = [needs_fuse, pytest.mark.fuse]

SMALL = 20  # small files per directory
SMALL_SIZE = 10_000
BIG = 3 << 20
CHUNK = 256 << 10  # the store's chunk size, so the big file has a chunk list
BASENAME = "0" * 32 + "-start"
OFF = ["--no-prefetch-siblings"]


def _tree(root: Path) -> Path:
    rng = random.Random(15)
    tree = root / "tree"
    for sub in ("a", "b", "c"):
        (tree / sub).mkdir(parents=True)
        for i in range(SMALL):
            (tree / sub / f"f{i:02}.py").write_bytes(rng.randbytes(SMALL_SIZE))
    (tree / "big.so").write_bytes(rng.randbytes(BIG))
    return tree


@pytest.fixture
def remote(short_tmp: Path) -> Iterator[tuple[RemoteFaults, Path]]:
    tree = _tree(short_tmp / "src")
    with spawn_faultstore(short_tmp, [(dump_nar(tree), BASENAME)], chunk_size=CHUNK) as store:
        yield store, tree


def _stats(store: RemoteFaults) -> int:
    """Blob stats (chunk list requests) the store has answered."""
    return store.stats()["calls"].get("blob.stat", 0)


STARTUP = [f"{sub}/f{i:02}.py" for sub in ("a", "b") for i in range(0, SMALL, 2)]


def _start(mount: Mount, tree: Path) -> None:
    """What the "program" reads as it starts: half the files of a/ and b/, the head of big.so."""
    for rel in STARTUP:
        assert mount.path(BASENAME, rel).read_bytes() == (tree / rel).read_bytes(), rel
    with mount.path(BASENAME, "big.so").open("rb") as f:
        assert f.read(100_000) == (tree / "big.so").read_bytes()[:100_000]


def _record(store: RemoteFaults, tree: Path, tmp: Path, profiles: Path) -> list[Entry]:
    with mounted(TVIXFS, tmp, store.url, [*OFF, "--access-profiles", str(profiles)]) as mount:
        _start(mount, tree)
    profile = ProfileFiles(profiles).load(BASENAME.encode())
    assert profile is not None
    return profile


def test_a_profile_is_recorded_and_replayed(remote: tuple[RemoteFaults, Path], short_tmp: Path) -> None:
    store, tree = remote
    profiles = short_tmp / "profiles"
    profile = _record(store, tree, short_tmp, profiles)
    digests = {c.digest for c in profile}
    # Each file the start read, in the order read; nothing the start did not read.
    small = [b3digest((tree / rel).read_bytes()) for rel in STARTUP]
    assert [c.digest for c in profile[: len(small)]] == small
    unread = {b3digest(p.read_bytes()) for p in tree.rglob("*.py")} - set(small)
    assert not digests & unread
    # And big.so: its chunk list (its open needed it), then the chunks read.
    big = [e for e in profile if e.digest == b3digest((tree / "big.so").read_bytes())]
    assert big == [Entry(Kind.CHUNK_LIST, big[0].digest, BIG)]
    assert profile.index(big[0]) == len(small)
    chunks = [e for e in profile if e.kind == Kind.CHUNK]
    assert len(chunks) > len(small)

    before = store.settled_calls("blob.read")
    stats_before = _stats(store)
    with mounted(TVIXFS, short_tmp, store.url, [*OFF, "--access-profiles", str(profiles)]) as mount:
        # One lookup starts the replay: the profile's chunks and chunk list, each once, and
        # nothing else.
        first = mount.path(BASENAME, STARTUP[0])
        assert first.read_bytes() == (tree / STARTUP[0]).read_bytes()
        replayed = store.settled_calls("blob.read") - before
        assert len(chunks) - 1 <= replayed <= len(chunks)
        listed = _stats(store)
        assert listed - stats_before == 2  # the mount's probe, big.so's chunk list
        # The start now finds every small file it reads cached: no further blob read.
        for rel in STARTUP:
            assert mount.path(BASENAME, rel).read_bytes() == (tree / rel).read_bytes(), rel
        assert store.settled_calls("blob.read") - before == replayed
        _start(mount, tree)
        assert _stats(store) == listed  # big.so's open found its chunk list
        # Files the profile does not name are read as before.
        other = mount.path(BASENAME, "c", "f00.py")
        assert other.read_bytes() == (tree / "c" / "f00.py").read_bytes()
    # What this start read is the new profile: the same files, and the one more.
    again = ProfileFiles(profiles).load(BASENAME.encode())
    assert again is not None
    assert [c.digest for c in again[: len(small)]] == small
    assert b3digest((tree / "c" / "f00.py").read_bytes()) in {c.digest for c in again}


def test_without_a_profile_directory_nothing_is_fetched_ahead(
    remote: tuple[RemoteFaults, Path], short_tmp: Path
) -> None:
    store, tree = remote
    with mounted(TVIXFS, short_tmp, store.url, OFF) as mount:
        assert mount.path(BASENAME, STARTUP[0]).read_bytes() == (tree / STARTUP[0]).read_bytes()
        assert store.settled_calls("blob.read") == 1


def test_a_replay_is_bounded_by_the_chunk_cache(remote: tuple[RemoteFaults, Path], short_tmp: Path) -> None:
    store, tree = remote
    profiles = short_tmp / "profiles"
    _record(store, tree, short_tmp, profiles)
    before = store.settled_calls("blob.read")
    cache = 64 << 10
    args = [*OFF, "--access-profiles", str(profiles), "--cache-size", str(cache)]
    with mounted(TVIXFS, short_tmp, store.url, args) as mount:
        assert mount.path(BASENAME, STARTUP[0]).read_bytes() == (tree / STARTUP[0]).read_bytes()
        assert store.settled_calls("blob.read") - before <= 1 + cache // 2 // SMALL_SIZE
        _start(mount, tree)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign", "empty"])
def test_a_bad_profile_is_ignored_with_a_warning(
    remote: tuple[RemoteFaults, Path], short_tmp: Path, damage: str
) -> None:
    store, tree = remote
    profiles = short_tmp / "profiles"
    data = _record(store, tree, short_tmp, profiles)
    path = profiles / BASENAME
    raw = path.read_bytes()
    bad = {
        "truncated": raw[: len(raw) // 2],
        "flipped": raw[:40] + bytes([raw[40] ^ 1]) + raw[41:],
        "foreign": b"#!/bin/sh\necho hello\n",
        "empty": b"",
    }[damage]
    path.write_bytes(bad)
    before = store.settled_calls("blob.read")
    with mounted(TVIXFS, short_tmp, store.url, [*OFF, "--access-profiles", str(profiles)]) as mount:
        _start(mount, tree)
        assert store.settled_calls("blob.read") - before >= len(STARTUP)  # nothing was fetched ahead
        assert "ignored" in mount.stderr()
    # The mount recorded the start again and replaced the bad file.
    again = ProfileFiles(profiles).load(BASENAME.encode())
    assert again is not None
    assert again[: len(STARTUP)] == data[: len(STARTUP)]


def test_a_profile_file_refuses_damage() -> None:
    entries = [Entry(Kind(i % 2), bytes([i]) * 32, i + 1) for i in range(5)]
    data = encode(entries)
    assert decode(data) == entries
    assert decode(encode([])) == []
    foreign = data.replace(MAGIC, b"x" * len(MAGIC))
    body = MAGIC + RECORD.pack(7, b"\1" * 32, 1)
    unknown_kind = body + b3digest(body)
    for bad in (data[:-1], data[: len(MAGIC) + 3], data + b"x", b"", MAGIC, foreign, unknown_kind):
        with pytest.raises(ProfileError):
            decode(bad)


def test_profiles_are_bounded_and_crash_leftovers_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accessprofiles, "PROFILES", 3)
    files = ProfileFiles(tmp_path / "p")
    chunks = [Entry(Kind.CHUNK, b"\1" * 32, 10)]
    names = [f"{i:032}-x".encode() for i in range(5)]
    for name in names:
        files.save(name, chunks)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [n.decode() for n in names[2:]]
    # A writer that crashed before its rename leaves a temporary file, never a half profile.
    (tmp_path / "p" / f"{names[4].decode()}{accessprofiles.TEMP_MARK}123").write_bytes(b"half")
    assert files.load(names[4]) == chunks
    # Names that are no store path basename are neither read nor written.
    files.save(b"../escape", chunks)
    assert files.load(b"../escape") is None
    assert not (tmp_path / "escape").exists()
    (tmp_path / "p" / names[3].decode()).write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        assert files.load(names[3]) is None
    assert "ignored" in caplog.text


def test_profiles_live_beside_the_disk_cache_and_outlive_clearing_it(
    remote: tuple[RemoteFaults, Path], short_tmp: Path
) -> None:
    """The case a profile is for: the blobs are gone from the disk cache, the profile is not."""
    store, tree = remote
    cache = short_tmp / "cache"
    args = [*OFF, "--disk-cache", str(cache)]
    with mounted(TVIXFS, short_tmp, store.url, args) as mount:
        _start(mount, tree)
    profile = ProfileFiles(cache / accessprofiles.PROFILES_NAME).load(BASENAME.encode())
    assert profile is not None
    clear = [*TVIXFS, "cache", "clear", str(cache)]
    cleared = subprocess.run(clear, check=False, capture_output=True, text=True)
    assert cleared.returncode == 0, cleared.stderr
    before = store.settled_calls("blob.read")
    with mounted(TVIXFS, short_tmp, store.url, args) as mount:
        assert mount.path(BASENAME, STARTUP[0]).read_bytes() == (tree / STARTUP[0]).read_bytes()
        replayed = store.settled_calls("blob.read") - before
        chunks = [e for e in profile if e.kind == Kind.CHUNK]
        assert len(chunks) - 1 <= replayed <= len(chunks)
        # The start finds every small file it reads cached: no further blob read.
        for rel in STARTUP:
            assert mount.path(BASENAME, rel).read_bytes() == (tree / rel).read_bytes(), rel
        assert store.settled_calls("blob.read") - before == replayed
        _start(mount, tree)


def test_a_walk_records_a_bounded_number_of_store_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, over a memory store: store paths entered while ``RECORDINGS`` are being
    recorded start nothing, and are recorded when entered again once there is room."""
    monkeypatch.setattr(accessprofile, "WINDOW", 0.5)

    async def main() -> None:
        store = open_memory_store()
        names = [f"{i:032}-p".encode() for i in range(accessprofile.RECORDINGS + 5)]
        async with trio.open_nursery() as nursery:
            profiles = AccessProfiles(ProfileFiles(tmp_path), BlobReader(Bridge(), store.blobs, nursery))
            for name in names:
                profiles.entered(name)
            await trio.testing.wait_all_tasks_blocked()
            assert len(nursery.child_tasks) == accessprofile.RECORDINGS
            with trio.fail_after(30):  # a hang detector only
                while nursery.child_tasks:  # their windows end
                    await trio.sleep(0.05)
            profiles.entered(names[0])  # recorded already
            profiles.entered(names[-1])  # turned away before
            await trio.testing.wait_all_tasks_blocked()
            assert len(nursery.child_tasks) == 1
            nursery.cancel_scope.cancel()

    trio.run(main)


class DistantBlobs(BlobService):
    """A memory store's blobs, each call taking ``delay`` (in its worker thread) as over a
    network; counts the most calls under way at once. With ``reads_many``, it answers many
    chunks in one call, as a gRPC store with tvixfs's BlobBatchService does."""

    def __init__(self, inner: BlobService, delay: float, reads_many: bool = False) -> None:
        self.inner = inner
        self.delay = delay
        self.capabilities = replace(inner.capabilities, calls_are_remote=True, reads_many=reads_many)
        self._lock = threading.Lock()
        self._running = 0
        self.most = 0
        self.reads = 0
        self.batches: list[int] = []

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        return self.inner.stat(digest, send_chunks)

    def read(self, digest: bytes) -> Iterator[bytes]:
        with self._lock:
            self.reads += 1
        return iter([self._call(lambda: b"".join(self.inner.read(digest)))])

    def read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        with self._lock:
            self.batches.append(len(chunks))
        return iter(self._call(lambda: list(self.inner.read_many(chunks))))

    def _call(self, answer: Callable[[], T]) -> T:
        with self._lock:
            self._running += 1
            self.most = max(self.most, self._running)
        try:
            time.sleep(self.delay)
            return answer()
        finally:
            with self._lock:
                self._running -= 1

    def put(self, data: Iterable[bytes]) -> bytes:
        return self.inner.put(data)


@pytest.mark.parametrize("far", [False, True], ids=["near", "far"])
def test_a_replay_asks_a_far_store_for_more_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, far: bool
) -> None:
    """In process: a replay's first fetch goes alone and times the store; a near one then gets
    a few calls at a time (more would only cost CPU), a far one many (each hides a round trip)."""
    delay = 0.03  # each read: long enough for the calls under way to overlap
    monkeypatch.setattr(accessprofile, "SLOW_CALL", delay / 2 if far else 10.0)

    async def main() -> None:
        store = open_memory_store()
        rng = random.Random(7)
        entries = []
        for _ in range(3 * accessprofile.CALLS):
            data = rng.randbytes(1000)
            entries.append(Entry(Kind.CHUNK, store.blobs.put([data]), len(data)))
        name = "1" * 32 + "-far"
        ProfileFiles(tmp_path).save(name.encode(), entries)
        blobs = DistantBlobs(store.blobs, delay)
        async with trio.open_nursery() as nursery:
            profiles = AccessProfiles(ProfileFiles(tmp_path), BlobReader(Bridge(), blobs, nursery))
            profiles.entered(name.encode())
            with trio.fail_after(30):  # a hang detector only
                while blobs.reads < len(entries):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        if far:  # not all CALLS for sure: a worker thread may start late on a busy machine
            assert accessprofile.CALLS // 2 < blobs.most <= accessprofile.CALLS
        else:
            assert blobs.most == accessprofile.NEAR_CALLS

    trio.run(main)


def test_a_profile_directory_that_is_a_file_is_one_clear_error(short_tmp: Path) -> None:
    (short_tmp / "file").write_bytes(b"x")
    mountpoint = short_tmp / "mnt"
    mountpoint.mkdir()
    argv = [
        *TVIXFS,
        "mount",
        "--store",
        "memory://",
        "--access-profiles",
        str(short_tmp / "file"),
        str(mountpoint),
    ]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"tvixfs: error: --access-profiles: {short_tmp / 'file'} is not a directory"
    ]


@pytest.mark.parametrize("slow_lookup", [False, True], ids=["quick lookup", "slow lookup"])
def test_a_replay_from_a_store_that_reads_many_asks_in_batches(tmp_path: Path, slow_lookup: bool) -> None:
    """In process: the first fetch alone (it times the store), then the chunks ``BATCH`` to a
    call. After a lookup that took a far store's round trip there is no first fetch alone:
    full batches, several calls at once from the start."""

    async def main() -> None:
        store = open_memory_store()
        rng = random.Random(8)
        entries = []
        for _ in range(3 * accessprofile.BATCH + 5):
            data = rng.randbytes(1000)
            entries.append(Entry(Kind.CHUNK, store.blobs.put([data]), len(data)))
        name = "2" * 32 + "-batched"
        ProfileFiles(tmp_path).save(name.encode(), entries)
        blobs = DistantBlobs(store.blobs, 0.05 if slow_lookup else 0.01, reads_many=True)
        async with trio.open_nursery() as nursery:
            reader = BlobReader(Bridge(), blobs, nursery)
            profiles = AccessProfiles(ProfileFiles(tmp_path), reader)
            profiles.entered(name.encode(), accessprofile.SLOW_LOOKUP if slow_lookup else 0.0)
            with trio.fail_after(30):  # a hang detector only
                while not all(e.digest in reader.chunk_cache.cache for e in entries):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        first = 5 if slow_lookup else 4  # what is left after full batches, or after one alone
        assert blobs.reads == (0 if slow_lookup else 1)
        assert sorted(blobs.batches) == [first] + [accessprofile.BATCH] * 3  # in whatever order they ran
        if slow_lookup:
            assert blobs.most > 1, "the calls overlap from the first"

    trio.run(main)
