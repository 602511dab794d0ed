"""Many readers at once through a real mount: right bytes, no deadlock, bounded resources.

64 reader threads share thousands of small files and one hot large file, all cold, for a few
seconds. Every byte read must be right, every reader must finish, the mount daemon's open
file descriptors and memory must stay within its cache limits, and the store (a fault store
without faults, which counts the calls it gets) must have been asked for each blob and each
chunk exactly once however many readers wanted it at the same moment. An external ``umount``
or a SIGTERM in the middle of such a load ends the daemon with exit status 0, and the
readers get errors, never a hang.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultstore import RemoteFaults, spawn_faultstore
from mounting import TVIXFS, Mount, mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.slow]

READERS = 64
FILES = 2400
PER_DIR = 100
HOT_SIZE = 16 << 20
CHUNK = 256 * 1024  # the fault store's chunk size: the hot file is 64 chunks
CACHE = 64 << 20  # the mount's --cache-size: holds every blob of the tree
LOAD_SECONDS = 3.0
HUNG = 120.0  # a reader or daemon still busy after this is stuck: a hang detector only
# Reader errors that mean "the mount is gone", as opposed to wrong data or a failing store.
GONE = {errno.ENOENT, errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}


@dataclass(frozen=True)
class Corpus:
    store: RemoteFaults
    basename: str
    files: list[str]  # relative paths of the small files
    digests: dict[str, bytes]  # relative path -> sha256 of its content (hot file included)
    hot: bytes  # the hot file's content
    blobs: int  # distinct non-empty small-file contents


def _build_tree(root: Path) -> tuple[list[str], dict[str, bytes], bytes]:
    rng = random.Random(42)
    files = []
    digests = {}
    for i in range(FILES):
        relative = f"d{i // PER_DIR:02}/f{i:04}"
        data = f"file {i}\n".encode() * rng.randrange(1, 2000)
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(relative)
        digests[relative] = hashlib.sha256(data).digest()
    hot = rng.randbytes(HOT_SIZE)
    (root / "hot.bin").write_bytes(hot)
    digests["hot.bin"] = hashlib.sha256(hot).digest()
    return files, digests, hot


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    root = Path(tempfile.mkdtemp(prefix="tvx", dir="/tmp"))
    try:
        files, digests, hot = _build_tree(root / "tree")
        nar = root / "tree.nar"
        with nar.open("wb") as out:
            subprocess.run(["nix-store", "--dump", root / "tree"], stdout=out, check=True)
        shutil.rmtree(root / "tree")
        with spawn_faultstore(root, [(nar, "load")], chunk_size=CHUNK) as store:
            blobs = len({d for name, d in digests.items() if name != "hot.bin"})
            yield Corpus(store, store.paths[0], files, digests, hot, blobs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _usage(pid: int) -> tuple[int, int]:
    """Open file descriptors and resident bytes of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return fds, rss_kib * 1024


class Load:
    """READERS threads: each reads its share of the small files, with a random piece of the
    hot file before each, then random files again until ``seconds`` have passed. A reader
    stops at its first error, which is counted; wrong bytes are recorded, never tolerated."""

    def __init__(self, mount: Mount, corpus: Corpus, seconds: float) -> None:
        self._mount = mount
        self._corpus = corpus
        self._seconds = seconds
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: Counter[int] = Counter()
        self.wrong: list[str] = []
        self.files_read = 0
        self._threads = [threading.Thread(target=self._reader, args=(k,)) for k in range(READERS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None:
            self.stop.set()  # the test failed: end the load early
        self.join()

    def join(self) -> None:
        """Wait for every reader; AssertionError naming how many are stuck."""
        deadline = time.monotonic() + HUNG
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in self._threads)
        assert not stuck, f"{stuck} readers still blocked after {HUNG:g} s"

    def wait_for(self, files: int) -> None:
        for _ in range(int(HUNG * 20)):
            if self.files_read >= files or self.errors or not any(t.is_alive() for t in self._threads):
                return
            time.sleep(0.05)

    def _check(self, name: str, ok: bool) -> None:
        if not ok:
            with self._lock:
                self.wrong.append(name)

    def _read_hot(self, rng: random.Random) -> None:
        offset = rng.randrange(HOT_SIZE)
        size = rng.randrange(1, 1 << 20)
        with open(self._mount.path(self._corpus.basename, "hot.bin"), "rb") as f:
            f.seek(offset)
            data = f.read(size)
        self._check(f"hot.bin@{offset}", data == self._corpus.hot[offset : offset + size])

    def _reader(self, k: int) -> None:
        rng = random.Random(k)
        corpus = self._corpus
        queue = corpus.files[k::READERS]
        start = time.monotonic()
        try:
            while not self.stop.is_set() and (queue or time.monotonic() - start < self._seconds):
                self._read_hot(rng)
                name = queue.pop() if queue else rng.choice(corpus.files)
                data = self._mount.path(corpus.basename, name).read_bytes()
                self._check(name, hashlib.sha256(data).digest() == corpus.digests[name])
                with self._lock:
                    self.files_read += 1
        except OSError as e:
            with self._lock:
                self.errors[e.errno or 0] += 1


def _calls(store: RemoteFaults) -> Counter[str]:
    return Counter(store.stats()["calls"])


@pytest.mark.nix
def test_many_readers_get_right_bytes_each_chunk_fetched_once(corpus: Corpus, short_tmp: Path) -> None:
    with mounted(TVIXFS, short_tmp, corpus.store.url, ["--cache-size", str(CACHE)]) as m:
        os.stat(m.path(corpus.basename))
        calls_before = _calls(corpus.store)
        fds_before, rss_before = _usage(m.process.proc.pid)
        with Load(m, corpus, LOAD_SECONDS) as load:
            pass
        assert not load.wrong, f"wrong bytes from {load.wrong[:5]}"
        assert not load.errors, {errno.errorcode[e]: n for e, n in load.errors.items()}
        assert load.files_read >= FILES
        calls = _calls(corpus.store) - calls_before
        # Each small file is one blob read whole; the hot file is read chunk by chunk.
        assert calls["blob.read"] == corpus.blobs + HOT_SIZE // CHUNK, calls
        assert calls["blob.stat"] == 1, calls  # the hot file's chunk list, once
        assert calls["directory.get"] <= FILES // PER_DIR + 1, calls
        fds_after, rss_after = _usage(m.process.proc.pid)
        assert fds_after <= fds_before + 8, (fds_before, fds_after)
        # Loose: the chunk cache is bounded; the rest (inodes, listings, threads) is small.
        assert rss_after - rss_before <= CACHE + (64 << 20), (rss_before, rss_after)
        assert m.process.proc.poll() is None


STOPS: dict[str, Callable[[Mount], None]] = {
    # A busy mount cannot be unmounted outright (EBUSY): an administrator detaches it.
    "umount": lambda m: subprocess.run(["umount", "--lazy", str(m.mountpoint)], check=True, timeout=HUNG),
    "sigterm": lambda m: m.process.proc.send_signal(signal.SIGTERM),
}


@pytest.mark.nix
@pytest.mark.parametrize("how", list(STOPS))
def test_stopping_under_load_exits_0_and_readers_get_errors(
    corpus: Corpus, short_tmp: Path, how: str
) -> None:
    with mounted(TVIXFS, short_tmp, corpus.store.url, name=how) as m:
        with Load(m, corpus, HUNG) as load:
            load.wait_for(FILES // 8)
            assert not load.errors and load.files_read, "the load did not get going"
            STOPS[how](m)
            assert m.process.proc.wait(HUNG) == 0
            load.join()
        assert not load.wrong, f"wrong bytes from {load.wrong[:5]}"
        # Every reader ran until the mount went away, and learned it from an error.
        assert sum(load.errors.values()) == READERS
        assert set(load.errors) <= GONE, {errno.errorcode[e]: n for e, n in load.errors.items()}
        assert not m.is_mounted()
