"""Real ``tvixfs mount`` processes for tests: start, wait for READY=1, stop, always unmount.

Readiness comes from a fake ``NOTIFY_SOCKET`` (a datagram socket the test binds), as systemd
would see it. Whatever happens, teardown leaves no mount behind: the daemon is stopped by
SIGTERM (or killed), and a mount point still listed in /proc/self/mountinfo is lazily
unmounted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpcserver import Daemon
from loghygiene import check_daemon_stderr

from tvixfs.fs.preflight import mount_points
from tvixfs.store.storepath import StorePath

# Real mounts need /dev/fuse and root. The mark is the `fuse` tier's (`pytest -m "not fuse"`);
# conftest.py skips such tests outside CI on a machine without FUSE. In CI (CI set) they run
# regardless, so a CI machine that lost FUSE fails instead of passing.
needs_fuse = pytest.mark.fuse

TVIXFS = [str(Path(sys.executable).with_name("tvixfs"))]  # the console script of this venv
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class Mount:
    process: Daemon  # the mount daemon: its process, notify socket and stderr
    mountpoint: Path

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def stderr(self) -> str:
        return self.process.stderr()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon; its exit code."""
        return self.process.stop(sig)

    def unmount(self) -> int:
        """``umount`` from outside, as an administrator would; the daemon's exit code."""
        subprocess.run(["umount", str(self.mountpoint)], check=True, timeout=STOP_TIMEOUT)
        return self.process.proc.wait(STOP_TIMEOUT)

    def is_mounted(self) -> bool:
        return str(self.mountpoint) in mount_points()


def spawn_mount(
    tvixfs_cmd: Sequence[str],
    tmp: Path,
    store: str,
    extra: Sequence[str] = (),
    *,
    name: str = "mnt",
    env: Mapping[str, str] | None = None,
) -> tuple[Daemon, Path]:
    """Start ``tvixfs mount`` on the directory ``tmp/name`` (short: it holds a socket);
    ``env`` adds to the environment."""
    mountpoint = tmp / name
    mountpoint.mkdir(exist_ok=True)  # a mount point may be mounted again, after its last mount
    notify_path = tmp / f"{name}.notify"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    stderr_path = tmp / f"{name}.stderr"
    args = [*tvixfs_cmd, "mount", "--store", store, *extra, str(mountpoint)]
    environment = {**os.environ, **(env or {}), "NOTIFY_SOCKET": str(notify_path)}
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(args, env=environment, stdin=subprocess.DEVNULL, stderr=stderr)
    return Daemon(proc, notify, stderr_path), mountpoint


def teardown(mount: Mount) -> None:
    proc = mount.process.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if mount.is_mounted():
        subprocess.run(["umount", "-l", str(mount.mountpoint)], check=False)
    mount.process.notify.close()


@contextmanager
def mounted(*spawn_args: Any, **spawn_kwargs: Any) -> Iterator[Mount]:
    """A mount (``spawn_mount``'s arguments) that has sent READY=1; else raises, leaving
    nothing mounted. Torn down on exit; a traceback in its stderr then fails the test
    (tests/loghygiene.py)."""
    mount = Mount(*spawn_mount(*spawn_args, **spawn_kwargs))
    try:
        mount.process.wait_message("READY=1", READY_TIMEOUT)
        yield mount
    finally:
        teardown(mount)
    check_daemon_stderr(mount.stderr(), "tvixfs mount")


def import_tree(store_dir: Path, path: Path, name: str) -> str:
    """``tvixfs import`` ``path`` into the local store at ``store_dir``; its store path basename."""
    args = [*TVIXFS, "import", "--store", f"local://{store_dir}", "--name", name, str(path)]
    printed = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return StorePath.from_absolute(printed.strip()).basename
