"""Processes killed without warning (``kill -9``): what they leave behind must be harmless.

A mount daemon killed mid-read leaves no mount that hangs its callers: the blocked reader
gets an error at once, the mount point answers (or says ENOTCONN) and is unmounted by
``auto_unmount``, and a new mount on the same mount point works. A ``tvixfs daemon`` killed
while a client uploads leaves its embedded store consistent (fsck finds nothing but
unreferenced chunk files), the client exits non-zero with one line saying why, and the same
import through a restarted daemon completes. A supervisor that stops reading its notify socket
freezes neither daemon.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faultstore import Fault, RemoteFaults, spawn_faultstore
from grpcserver import start_daemon
from mounting import TVIXFS, import_tree, mounted, needs_fuse
from uniquetrees import CHUNK, dump_nar, unique_tree

pytestmark = [needs_fuse, pytest.mark.slow]

# A caller still waiting after this is hung: a hang detector, not a speed requirement.
HUNG = 30.0


def _answer(probe: Callable[[], object]) -> int | None:
    """Run ``probe`` in a thread: None if it succeeded, its errno if it failed; AssertionError
    if it is still blocked after HUNG seconds."""
    outcome: list[int | None] = []

    def run() -> None:
        try:
            probe()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.errno)

    thread = threading.Thread(target=run, daemon=True)  # daemon: a hung probe must not hang pytest
    thread.start()
    thread.join(HUNG)
    assert outcome, f"{probe} still blocked after {HUNG:g} s"
    return outcome[0]


def _wait_for_strike(store: RemoteFaults, kind: str) -> None:
    for _ in range(int(HUNG * 20)):
        if store.stats()["fired"].get(kind):
            return
        time.sleep(0.05)
    raise AssertionError(f"the {kind} fault never struck")


def test_kill_9_of_the_mount_daemon_leaves_no_hanging_mount(short_tmp: Path) -> None:
    tree = unique_tree(short_tmp / "tree", 1)
    with spawn_faultstore(short_tmp, [(dump_nar(tree), "tree")], chunk_size=CHUNK) as store:
        basename = store.paths[0]
        with mounted(TVIXFS, short_tmp, store.url) as m:
            mountpoint = m.mountpoint
            assert m.path(basename, "doc", "small.txt").read_bytes() == (tree / "doc/small.txt").read_bytes()
            store.set(Fault("hang", methods=("blob.read",)))
            reader = subprocess.Popen(["cat", m.path(basename, "large.bin")], stdout=subprocess.DEVNULL)
            try:
                _wait_for_strike(store, "hang")
                m.process.proc.kill()
                assert m.process.proc.wait(HUNG) == -9
                # The reader blocked inside the daemon gets an error, not a hang.
                assert reader.wait(HUNG) != 0
            finally:
                reader.kill()
                reader.wait()
                store.clear()
            # Callers get an answer at once: the mount is gone (auto_unmount), or the kernel
            # says ENOTCONN (fusermount3 lost a race with the kernel; see fs/preflight.py).
            assert _answer(lambda: os.stat(mountpoint)) in (None, errno.ENOTCONN)
            assert _answer(lambda: os.listdir(mountpoint)) in (None, errno.ENOTCONN)
            ls = subprocess.run(["ls", mountpoint], capture_output=True, timeout=HUNG, check=False)
            assert ls.returncode == 0 or b"Transport endpoint is not connected" in ls.stderr
        with mounted(TVIXFS, short_tmp, store.url) as again:
            assert again.mountpoint == mountpoint
            assert again.path(basename, "large.bin").read_bytes() == (tree / "large.bin").read_bytes()


def test_the_next_mount_detaches_a_dead_one(short_tmp: Path, tmp_path: Path) -> None:
    """Without auto_unmount's helper (killed first) a killed daemon surely leaves a dead mount."""
    (tmp_path / "file").write_bytes(b"content\n")
    store = f"local://{short_tmp / 'store'}"
    basename = import_tree(short_tmp / "store", tmp_path / "file", "file")
    with mounted(TVIXFS, short_tmp, store) as m:
        helper = subprocess.run(
            ["pgrep", "-P", str(m.process.proc.pid), "-x", "fusermount3"],
            capture_output=True,
            text=True,
            check=True,
        )
        subprocess.run(["kill", "-9", *helper.stdout.split()], check=True)
        m.process.proc.kill()
        m.process.proc.wait()
        assert _answer(lambda: os.listdir(m.mountpoint)) == errno.ENOTCONN  # stat: from cache
        assert m.is_mounted()
        with mounted(TVIXFS, short_tmp, store) as again:
            assert again.path(basename).read_bytes() == b"content\n"
            assert f"detached a dead tvixfs mount from {m.mountpoint}" in again.stderr()
        assert not m.is_mounted()


def _big_tree(root: Path) -> Path:
    """About 64 MiB in 256 files: long enough an upload to be killed in the middle."""
    for d in range(8):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(32):
            (root / f"d{d}" / f"f{f}").write_bytes(os.urandom(256 * 1024))
    return root


def _chunk_files(store_dir: Path) -> int:
    chunks = store_dir / "chunks"
    return sum(len(files) for _, _, files in os.walk(chunks)) if chunks.is_dir() else 0


def _fsck(store_dir: Path, *extra: str) -> str:
    """fsck's summary; fails unless it exits 0 (consistent: leftovers are not problems)."""
    result = subprocess.run(
        [*TVIXFS, "fsck", "--store", f"local://{store_dir}", *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()[-1]


def test_kill_9_of_the_grpc_daemon_during_an_upload(short_tmp: Path) -> None:
    tree = _big_tree(short_tmp / "big")
    store_dir = short_tmp / "store"
    store_dir.mkdir()  # the daemon makes a store only in a directory that exists
    daemon = start_daemon(TVIXFS, short_tmp, store=f"local://{store_dir}")
    try:
        upload = subprocess.Popen(
            [*TVIXFS, "import", "--store", daemon.url, str(tree)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(int(HUNG * 100)):
            if _chunk_files(store_dir) >= 16 or upload.poll() is not None:
                break
            time.sleep(0.01)
        assert upload.poll() is None, "the upload ended before the daemon could be killed"
        daemon.proc.kill()
        daemon.proc.wait()
        out, err = upload.communicate(timeout=HUNG)
    finally:
        daemon.stop()
        daemon.notify.close()
    assert upload.returncode != 0
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvixfs: error: "), err
    assert "Traceback" not in err
    summary = _fsck(store_dir)
    assert " 0 problems;" in summary and "0 path infos" in summary, summary
    restarted = start_daemon(TVIXFS, short_tmp, store=f"local://{store_dir}")
    try:
        again = subprocess.run(
            [*TVIXFS, "import", "--store", restarted.url, str(tree)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        assert restarted.stop() == 0
        restarted.notify.close()
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith("-big")
    summary = _fsck(store_dir, "--check-contents")
    assert " 0 problems;" in summary and "1 path infos" in summary, summary


def test_an_unread_notify_socket_freezes_neither_daemon(
    short_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ping every 10 ms fills the notify socket's queue (10 datagrams) at once when nobody
    reads it after READY=1: both daemons must keep serving and stop on SIGTERM."""
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    (tmp_path / "file").write_bytes(b"content\n")
    store_dir = short_tmp / "store"
    basename = import_tree(store_dir, tmp_path / "file", "file")
    with mounted(TVIXFS, short_tmp, f"local://{store_dir}") as m:
        time.sleep(1)  # a hundred pings nobody reads
        assert _answer(lambda: m.path(basename).read_bytes()) is None
        assert m.stop() == 0
    daemon = start_daemon(TVIXFS, short_tmp, store=f"local://{store_dir}")
    try:
        time.sleep(1)
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        daemon.notify.close()
