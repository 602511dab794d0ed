"""A mount with ``--disk-cache``, through real mounts: restart, outages, damage, crashes.

The store is a fault store in another process (which counts the calls it serves) or a real
``tvixfs daemon``; "down" is a store that does not listen at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_sample_tree
from faultstore import Fault, RemoteFaults, spawn_faultstore
from grpcserver import running_daemon
from loghygiene import ExpectedErrors
from mounting import TVIXFS, Mount, import_tree, mounted, needs_fuse, spawn_mount, teardown
from uniquetrees import dump_nar, unique_tree

from tvixfs.services.offline import RETRY_INTERVAL

pytestmark = [needs_fuse, pytest.mark.slow]

CHUNK = 64 * 1024  # chunk lists the fault store offers: large files are many cache entries
READ_FIRST = ["large.bin", "bin/hello", "share/doc/README", "link-to-readme"]
NEVER_READ = "repetitive.bin"
FAIL_FAST = 5.0  # seconds a lookup or read of something not cached may take while offline


@dataclass
class Served:
    faults: RemoteFaults
    tree: Path
    name: str
    cache: Path


@pytest.fixture
def served(short_tmp: Path) -> Iterator[Served]:
    tree = make_sample_tree(short_tmp / "sample")
    with spawn_faultstore(short_tmp, nars=[(dump_nar(tree), "sample")], chunk_size=CHUNK) as faults:
        yield Served(faults, tree, faults.paths[0], short_tmp / "cache")


def _cached_mount(served: Served, tmp: Path, *extra: str, name: str = "mnt") -> Mount:
    return mounted(TVIXFS, tmp, served.faults.url, ["--disk-cache", str(served.cache), *extra], name=name)


def _read(mount: Mount, served: Served, relative: str) -> bytes:
    data = mount.path(served.name, relative).read_bytes()
    assert data == (served.tree / relative).read_bytes(), relative
    return data


def _cache_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TVIXFS, "cache", *args], capture_output=True, text=True, timeout=60, check=False)


def test_remount_serves_what_was_read_without_a_blob_read(served: Served, short_tmp: Path) -> None:
    with _cached_mount(served, short_tmp) as mount:
        for relative in READ_FIRST:
            _read(mount, served, relative)
    before = served.faults.stats()["calls"]
    assert before["blob.read"] > 1
    with _cached_mount(served, short_tmp) as mount:
        for relative in READ_FIRST:
            _read(mount, served, relative)
        assert sorted(os.listdir(mount.path(served.name))) == sorted(os.listdir(served.tree))
    after = served.faults.stats()["calls"]
    for method in ("blob.read", "blob.stat", "directory.get"):
        assert after.get(method, 0) == before.get(method, 0), method


def test_offline_start_serves_the_cache_and_comes_back_without_remount(
    served: Served, short_tmp: Path, expected_errors: ExpectedErrors
) -> None:
    expected_errors("StoreUnavailableError")
    with _cached_mount(served, short_tmp) as mount:
        for relative in READ_FIRST:
            _read(mount, served, relative)
    served.faults.set(Fault("refuse"))  # the store does not listen: as if stopped
    with _cached_mount(served, short_tmp) as mount:
        ready = next(m for m in mount.process.messages if "READY=1" in m)
        assert "OFFLINE" in ready
        for relative in READ_FIRST:
            _read(mount, served, relative)
        started = time.monotonic()
        with pytest.raises(OSError):
            mount.path(served.name, NEVER_READ).read_bytes()
        with pytest.raises(OSError):  # a store path the cache never saw
            os.stat(mount.path("0" * 32 + "-absent"))
        assert time.monotonic() - started < 2 * FAIL_FAST
        served.faults.clear()
        time.sleep(RETRY_INTERVAL + 0.5)
        _read(mount, served, NEVER_READ)  # online again, on the same mount
        assert "STATUS=store online" in mount.process.wait_message("STATUS=store online", 10)
    log = mount.stderr()
    assert log.count("starting offline") == 1
    assert log.count("offline, serving what the disk cache holds") == 1
    assert log.count("back online") == 1


def test_mount_without_a_cache_still_refuses_an_unreachable_store(served: Served, short_tmp: Path) -> None:
    served.faults.set(Fault("refuse"))
    args = [*TVIXFS, "mount", "--store", served.faults.url, "--disk-cache", str(served.cache)]
    (short_tmp / "empty").mkdir()
    done = subprocess.run(
        [*args, str(short_tmp / "empty")], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("tvixfs: error: cannot reach the store")


def test_daemon_restart_offline_and_back(short_tmp: Path, expected_errors: ExpectedErrors) -> None:
    """Against a real ``tvixfs daemon``: stopped, then started again on the same socket."""
    expected_errors("StoreUnavailableError")
    tree = unique_tree(short_tmp / "tree", seed=13)
    store = short_tmp / "store"
    name = import_tree(store, tree, "tree")
    sock = short_tmp / "d.sock"
    url = f"grpc+unix://{sock}"
    cache = ["--disk-cache", str(short_tmp / "cache")]
    with (
        running_daemon(TVIXFS, short_tmp, store=f"local://{store}", listen=[f"unix:{sock}"]),
        mounted(TVIXFS, short_tmp, url, cache) as mount,
    ):
        first = mount.path(name, "large.bin").read_bytes()
    with mounted(TVIXFS, short_tmp, url, cache) as mount:
        assert mount.path(name, "large.bin").read_bytes() == first == (tree / "large.bin").read_bytes()
        with pytest.raises(OSError):
            mount.path(name, "doc", "small.txt").read_bytes()
        with running_daemon(TVIXFS, short_tmp, store=f"local://{store}", listen=[f"unix:{sock}"]):
            time.sleep(RETRY_INTERVAL + 0.5)
            small = mount.path(name, "doc", "small.txt").read_bytes()
            assert small == (tree / "doc" / "small.txt").read_bytes()


def _chunk_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "chunks").glob("*/*") if p.is_file()]


def test_a_damaged_cache_file_is_refetched_online_and_eio_offline(
    served: Served, short_tmp: Path, expected_errors: ExpectedErrors
) -> None:
    expected_errors("CorruptDataError", "StoreUnavailableError")
    with _cached_mount(served, short_tmp) as mount:
        _read(mount, served, "share/doc/README")  # one blob, one chunk file
    (victim,) = _chunk_files(served.cache)
    original = victim.read_bytes()

    def flip() -> None:
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))

    flip()
    with _cached_mount(served, short_tmp) as mount:
        _read(mount, served, "share/doc/README")
    assert "dropping a damaged entry" in mount.stderr()
    assert victim.read_bytes() == original  # fetched again and kept again
    flip()
    served.faults.set(Fault("refuse"))
    with _cached_mount(served, short_tmp) as mount, pytest.raises(OSError):
        mount.path(served.name, "share/doc/README").read_bytes()
    done = _cache_cli("fsck", str(served.cache))
    assert done.returncode == 0, done.stdout  # the damaged entry was dropped when read


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


# The README's slack: the SQLite index and its write-ahead log, besides the limit.
INDEX_SLACK = 8 << 20


def test_quota_holds_while_walking_more_than_fits(short_tmp: Path) -> None:
    trees = [unique_tree(short_tmp / f"t{i}", seed=i, large=24 * CHUNK) for i in range(6)]
    nars = [(dump_nar(tree), f"t{i}") for i, tree in enumerate(trees)]
    limit = 4 << 20  # the trees hold about 9 MiB
    cache = short_tmp / "cache"
    with spawn_faultstore(short_tmp, nars=nars, chunk_size=CHUNK) as faults:
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(_du(cache))
                time.sleep(0.02)

        extra = ["--disk-cache", str(cache), "--disk-cache-size", "4M"]
        with mounted(TVIXFS, short_tmp, faults.url, extra) as mount:
            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                for _ in range(2):
                    for tree, name in zip(trees, faults.paths, strict=True):
                        data = mount.path(name, "large.bin").read_bytes()
                        assert data == (tree / "large.bin").read_bytes()
            finally:
                done.set()
                sampler.join()
    chunk_bytes = sum(p.stat().st_size for p in _chunk_files(cache))
    assert chunk_bytes <= limit
    assert max(samples) <= limit + INDEX_SLACK, max(samples)
    stats = _cache_cli("stats", str(cache))
    assert stats.returncode == 0
    assert _cache_cli("fsck", str(cache)).returncode == 0


def test_kill_during_a_cold_read_leaves_a_usable_cache(short_tmp: Path) -> None:
    trees = [unique_tree(short_tmp / f"t{i}", seed=100 + i, large=40 * CHUNK) for i in range(4)]
    nars = [(dump_nar(tree), f"t{i}") for i, tree in enumerate(trees)]
    cache = short_tmp / "cache"
    with spawn_faultstore(short_tmp, nars=nars, chunk_size=CHUNK) as faults:
        faults.set(Fault("slow", methods=("blob.read",), delay=0.002, piece=16 * 1024))
        process, mountpoint = spawn_mount(TVIXFS, short_tmp, faults.url, ["--disk-cache", str(cache)])
        mount = Mount(process, mountpoint)
        try:
            mount.process.wait_message("READY=1")

            def cat(name: str) -> None:
                with contextlib.suppress(OSError):  # the daemon is killed under it
                    mount.path(name, "large.bin").read_bytes()

            readers = [threading.Thread(target=cat, args=(n,)) for n in faults.paths]
            for reader in readers:
                reader.start()
            time.sleep(1.0)
            mount.process.proc.send_signal(signal.SIGKILL)
            mount.process.proc.wait(30)
        finally:
            teardown(mount)
            for reader in readers:
                reader.join(60)
        faults.clear()
        checked = _cache_cli("fsck", str(cache))
        assert checked.returncode == 0, checked.stdout
        with mounted(TVIXFS, short_tmp, faults.url, ["--disk-cache", str(cache)], name="again") as again:
            for tree, name in zip(trees, faults.paths, strict=True):
                assert again.path(name, "large.bin").read_bytes() == (tree / "large.bin").read_bytes()
    assert _cache_cli("fsck", str(cache)).returncode == 0


def test_two_mounts_share_one_cache_directory(served: Served, short_tmp: Path) -> None:
    files = [*READ_FIRST, NEVER_READ, "empty-file", "unicode-\u00e9\u4e2d"]
    with _cached_mount(served, short_tmp, name="a") as a, _cached_mount(served, short_tmp, name="b") as b:
        errors: list[BaseException] = []

        def walk(mount: Mount, order: list[str]) -> None:
            try:
                for _ in range(3):
                    for relative in order:
                        _read(mount, served, relative)
            except BaseException as e:
                errors.append(e)

        threads = [
            threading.Thread(target=walk, args=(a, files)),
            threading.Thread(target=walk, args=(b, files[::-1])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors
        time.sleep(2.5)  # counters are written every FLUSH_INTERVAL
        _read(a, served, "bin/hello")
        _read(b, served, "bin/hello")
        stats = _cache_cli("stats", str(served.cache)).stdout
        assert stats.count("hit ratio") == 2, stats
    assert _cache_cli("fsck", str(served.cache)).returncode == 0
    cleared = _cache_cli("clear", str(served.cache))
    assert cleared.returncode == 0
    assert _cache_cli("stats", str(served.cache)).stdout.startswith("size: 0.0 MiB")
    assert not _chunk_files(served.cache)


def test_daemon_caches_a_far_store_and_serves_it_while_it_is_down(
    served: Served, short_tmp: Path, expected_errors: ExpectedErrors
) -> None:
    expected_errors("StoreUnavailableError")
    extra = ["--disk-cache", str(served.cache), "--disk-cache-size", "64M"]
    sock = short_tmp / "near.sock"
    with running_daemon(TVIXFS, short_tmp, store=served.faults.url, listen=[f"unix:{sock}"], extra=extra):
        with mounted(TVIXFS, short_tmp, f"grpc+unix://{sock}") as mount:
            _read(mount, served, "large.bin")
        reads = served.faults.stats()["calls"]["blob.read"]
        # A new mount (its own memory empty) started while the far store is up, read after it fell.
        with mounted(TVIXFS, short_tmp, f"grpc+unix://{sock}", name="again") as mount:
            served.faults.set(Fault("refuse"))
            _read(mount, served, "large.bin")
    served.faults.clear()
    assert served.faults.stats()["calls"]["blob.read"] == reads
