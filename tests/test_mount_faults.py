"""A store that dies, hangs, stalls or lies, seen through a real mount.

Each fault costs the request it hits one error (EIO; ENOENT where the store path is not
there), within the client's deadline and never a caller stuck for good; while that request
waits, the rest of the mount keeps answering; the daemon logs one line naming the store path
and what went wrong; and once the store is honest again the same operation succeeds on the
same mount. (That lies never turn into wrong bytes is tests/test_mount.py's; every fault kind
with its timings under the default deadlines is in bench/FAULTS.md, by bench/faults.py.)
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultstore import Fault, RemoteFaults, spawn_faultstore
from mounting import TVIXFS, Mount, mounted, needs_fuse
from uniquetrees import CHUNK, dump_nar, read_bounded, unique_tree

from tvixfs.fs.chunkcache import UNAVAILABLE_MEMORY

pytestmark = [needs_fuse, pytest.mark.slow]

# The gRPC deadlines of the mounts under test (the defaults, 30 s and 600 s, are in FAULTS.md).
DEADLINE = 5
# A request still waiting after this is hung, however loaded the machine: a hang detector.
HUNG = 60.0


@dataclass(frozen=True)
class Case:
    fault: Fault
    op: str  # "lookup", "listdir" or "read <file>"
    error: int | None  # what the operation gets; None: it succeeds
    logged: str | None  # the error class the daemon's log line names; None: no ERROR line


CASES = {
    "blackhole": Case(Fault("blackhole"), "lookup", errno.EIO, "StoreUnavailableError"),
    "refuse": Case(Fault("refuse"), "lookup", errno.EIO, "StoreUnavailableError"),
    "hang-pathinfo": Case(
        Fault("hang", methods=("pathinfo.get",)), "lookup", errno.EIO, "StoreUnavailableError"
    ),
    "hang-directory": Case(
        Fault("hang", methods=("directory.get",)), "listdir", errno.EIO, "StoreUnavailableError"
    ),
    "hang-stat": Case(
        Fault("hang", methods=("blob.stat",)), "read large.bin", errno.EIO, "StoreUnavailableError"
    ),
    "hang-read": Case(
        Fault("hang", methods=("blob.read",)), "read doc/small.txt", errno.EIO, "StoreUnavailableError"
    ),
    "reset": Case(
        Fault("reset", methods=("blob.read",), after=100),
        "read large.bin",
        errno.EIO,
        "StoreUnavailableError",
    ),
    "slow": Case(
        Fault("slow", methods=("blob.read",), delay=0.005, piece=16384), "read large.bin", None, None
    ),
    "wrong-directory": Case(Fault("wrong_directory"), "listdir", errno.EIO, "CorruptDataError"),
    "corrupt-chunk": Case(
        Fault("corrupt", methods=("blob.read",), after=5), "read large.bin", errno.EIO, "CorruptDataError"
    ),
    "absurd-size": Case(
        Fault("absurd_size", methods=("blob.stat",)), "read large.bin", errno.EIO, "CorruptDataError"
    ),
    "other-name": Case(Fault("pathinfo_name"), "lookup", errno.ENOENT, None),
}
# Faults that leave PathInfo and Directory calls alone: a store path nobody touched yet must
# still be looked up and listed while they hold a blob request.
BLOB_ONLY = {
    name
    for name, c in CASES.items()
    if c.fault.methods and set(c.fault.methods) <= {"blob.read", "blob.stat"}
}


@dataclass
class Rig:
    store: RemoteFaults
    mount: Mount
    sources: dict[str, Path]  # basename -> source tree
    paths: dict[str, tuple[str, str]]  # case -> (its store path, a spare one)
    control: str  # a store path walked before any fault

    def run(self, op: str, basename: str) -> None:
        """The operation through the mount; AssertionError on a wrong answer."""
        source = self.sources[basename]
        where = self.mount.path(basename)
        if op == "lookup":
            assert stat.S_ISDIR(os.stat(where).st_mode), f"{where} is not a directory"
        elif op == "listdir":
            assert sorted(os.listdir(where)) == sorted(os.listdir(source)), f"wrong listing of {where}"
        else:
            name = op.removeprefix("read ")
            want = (source / name).read_bytes()
            assert read_bounded(where / name, len(want) + 1) == want, f"wrong bytes from {where / name}"

    def fired(self) -> int:
        return sum(self.store.stats()["fired"].values())


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="tvx", dir="/tmp"))
    try:
        trees = [(unique_tree(root / "control", 1), "control")]
        for i, name in enumerate(CASES):
            trees += [
                (unique_tree(root / f"c{i}", 100 + i), name),
                (unique_tree(root / f"s{i}", 200 + i), "spare"),
            ]
        nars = [(dump_nar(tree), name) for tree, name in trees]
        env = {"TVIXFS_GRPC_TIMEOUT": str(DEADLINE), "TVIXFS_GRPC_STREAM_TIMEOUT": str(DEADLINE)}
        with (
            spawn_faultstore(root, nars, chunk_size=CHUNK) as store,
            mounted(TVIXFS, root, store.url, env=env) as mount,
        ):
            sources = {basename: tree for basename, (tree, _) in zip(store.paths, trees, strict=True)}
            paths = {name: (store.paths[1 + 2 * i], store.paths[2 + 2 * i]) for i, name in enumerate(CASES)}
            rig = Rig(store, mount, sources, paths, store.paths[0])
            rig.run("listdir", rig.control)
            rig.run("read sub/deeper/leaf", rig.control)
            yield rig
            assert mount.process.proc.poll() is None, "the mount daemon died"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _errno_of(fn: Callable[[], None]) -> int | None:
    try:
        fn()
    except OSError as e:
        return e.errno
    return None


def _wait_for_strike(rig: Rig, fault: Fault, before: int, pending: Future[int | None]) -> None:
    """Until the fault has struck a request (or the operation is over): then it is in flight.

    A listener fault strikes no request the store would see: the request is on its way now.
    """
    if fault.kind in ("blackhole", "refuse"):
        return
    for _ in range(200):
        if pending.done() or rig.fired() > before:
            return
        time.sleep(0.02)


def _rest_of_mount(rig: Rig, name: str) -> None:
    control = rig.mount.path(rig.control)
    rig.run("listdir", rig.control)  # answered by the daemon from its cache
    assert os.readlink(control / "link") == "doc/small.txt"
    rig.run("read sub/deeper/leaf", rig.control)  # open is a request; the bytes are cached
    if name in BLOB_ONLY:
        rig.run("listdir", rig.paths[name][1])  # needs the store's PathInfo and Directory services


def _healed(rig: Rig, case: Case, basename: str) -> None:
    """The same operation succeeds on the same mount, once a negative entry has expired (and
    a chunk the store hung on is no longer remembered as unavailable)."""
    deadline = time.monotonic() + HUNG
    remembered = time.monotonic() + UNAVAILABLE_MEMORY + 1
    while (
        (error := _errno_of(lambda: rig.run(case.op, basename))) == errno.ENOENT
        or (error == errno.EIO and time.monotonic() < remembered)
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert error is None, os.strerror(error)


@pytest.mark.parametrize("name", list(CASES))
def test_a_fault_costs_one_error_and_heals(rig: Rig, name: str) -> None:
    case = CASES[name]
    basename, _ = rig.paths[name]
    if case.op != "lookup":
        os.stat(rig.mount.path(basename))
    if case.op.startswith("read "):
        os.stat(rig.mount.path(basename, case.op.removeprefix("read ")))
    log_start = len(rig.mount.stderr())
    before = rig.fired()
    rig.store.set(case.fault)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_errno_of, lambda: rig.run(case.op, basename))
            _wait_for_strike(rig, case.fault, before, pending)
            _rest_of_mount(rig, name)
            answered_meanwhile = not pending.done()
            error = pending.result(timeout=HUNG)
    finally:
        rig.store.clear()
    assert error == case.error, os.strerror(error) if error else "succeeded"
    if case.fault.kind in ("hang", "blackhole"):
        assert answered_meanwhile, "the rest of the mount waited for the stuck request"
    errors = [line for line in rig.mount.stderr()[log_start:].splitlines() if " ERROR " in line]
    if case.logged is None:
        assert not errors
    else:
        assert errors
        assert all(f"store path {basename}: {case.logged}: " in line for line in errors), errors
    _healed(rig, case, basename)


def test_hung_blob_reads_do_not_starve_lookups(short_tmp: Path) -> None:
    readers = 20  # more reads than the bridge has threads; each holds one while it hangs
    trees = [unique_tree(short_tmp / f"t{i}", 300 + i, large=1) for i in range(readers + 1)]
    env = {"TVIXFS_GRPC_TIMEOUT": str(DEADLINE), "TVIXFS_GRPC_STREAM_TIMEOUT": str(20 * DEADLINE)}
    with (
        spawn_faultstore(short_tmp, [(dump_nar(t), f"t{i}") for i, t in enumerate(trees)]) as store,
        mounted(TVIXFS, short_tmp, store.url, env=env) as m,
    ):
        *busy, spare = store.paths
        for basename in busy:
            os.stat(m.path(basename, "doc", "small.txt"))
        store.set(Fault("hang", methods=("blob.read",)))
        with ThreadPoolExecutor(readers + 1) as pool:
            try:
                reads = [
                    pool.submit(_errno_of, lambda b=b: m.path(b, "doc", "small.txt").read_bytes() and None)
                    for b in busy
                ]
                for _ in range(500):
                    if store.stats()["fired"].get("hang", 0) >= 16:
                        break
                    time.sleep(0.02)
                lookup = pool.submit(_errno_of, lambda: os.listdir(m.path(spare)) and None)
                # It needs no blob: it may take as long as its own call to the store, give or take.
                wait([lookup], timeout=3 * DEADLINE)
                answered = lookup.done()
            finally:
                store.clear()
            for read in reads:
                read.result(timeout=HUNG)
        assert answered, "a lookup of another store path waited behind hung blob reads"
        assert lookup.result() is None
