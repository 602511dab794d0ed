"""The processes a figure needs: tvixfs mounts and daemons, passthrough_ll mounts, tmpfs.

Each is a context manager that starts the process, waits until it is usable (READY=1 on a
private NOTIFY_SOCKET for tvixfs, the mount appearing for passthrough_ll), and tears it down
by pid. A tvixfs daemon runs in its own network namespace so that the loopback counters of
that namespace count its traffic and nobody else's, and its port cannot collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from measure import is_mountpoint, wait_for

TVIXFS = Path(sys.executable).parent / "tvixfs"
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
DAEMON_PORT = 8000


@dataclass(frozen=True)
class Proc:
    pid: int
    log: Path


@dataclass(frozen=True)
class Daemon(Proc):
    url: str

    def netns(self) -> list[str]:
        """Prefix that runs a command inside this daemon's network namespace."""
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--"]

    def loopback_bytes(self) -> int:
        """Bytes sent over the namespace's loopback so far, both directions, all headers."""
        for line in Path(f"/proc/{self.pid}/net/dev").read_text().splitlines():
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])  # transmit bytes; on lo every byte is sent once
        raise RuntimeError("no loopback device in the daemon's namespace")


class StartError(RuntimeError):
    pass


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-1500:]
    except OSError:
        return ""


@contextmanager
def _notify_socket() -> Iterator[tuple[socket.socket, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="tvxb", dir="/tmp"))
    path = str(tmp / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Block until the child sends READY=1; fail early if it exits first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        sock.settimeout(0.2)
        try:
            message = sock.recv(4096)
        except TimeoutError:
            if proc.poll() is not None:
                raise StartError(f"exited {proc.returncode} before READY:\n{_tail(log)}") from None
            continue
        if b"READY=1" in message.split(b"\n"):
            return
    raise StartError(f"no READY=1 within {READY_TIMEOUT:.0f}s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen[bytes], mountpoint: Path | None = None) -> None:
    """SIGTERM by pid, wait; SIGKILL and a lazy unmount only if that fails."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if mountpoint is not None and is_mountpoint(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@contextmanager
def _notified(argv: Sequence[str], log: Path, mountpoint: Path | None) -> Iterator[int]:
    with _notify_socket() as (sock, path), log.open("ab") as out:
        env = dict(os.environ, NOTIFY_SOCKET=path)
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env)
        try:
            _wait_ready(sock, proc, log)
            yield proc.pid
        finally:
            _stop(proc, mountpoint)


@contextmanager
def tvixfs_mount(
    store_url: str, mountpoint: Path, log: Path, daemon: Daemon | None = None, extra: Sequence[str] = ()
) -> Iterator[Proc]:
    """`tvixfs mount` in the foreground (``extra``: more options); over gRPC it joins the
    daemon's network namespace."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    prefix = daemon.netns() if daemon else []
    argv = [*prefix, str(TVIXFS), "mount", "--store", store_url, *extra, str(mountpoint)]
    with _notified(argv, log, mountpoint) as pid:
        yield Proc(pid, log)


@contextmanager
def tvixfs_daemon(store_url: str, log: Path, unix: Path | None = None) -> Iterator[Daemon]:
    """`tvixfs daemon` on 127.0.0.1 (or the unix socket ``unix``) inside a fresh network
    namespace with only loopback up."""
    listen = f"127.0.0.1:{DAEMON_PORT}" if unix is None else f"unix:{unix}"
    url = f"grpc+http://{listen}" if unix is None else f"grpc+unix://{unix}"
    argv = [
        "unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        str(TVIXFS), "daemon", "--listen", listen, "--store", store_url,
    ]  # fmt: skip
    with _notified(argv, log, None) as pid:
        yield Daemon(pid, log, url)


@contextmanager
def passthrough_mount(
    binary: Path, source: Path, mountpoint: Path, log: Path, cache: str = "auto"
) -> Iterator[Proc]:
    """libfuse's passthrough_ll, multi-threaded, read-only.

    `cache=auto` is its default (1 s entry/attr timeouts, page cache dropped on open);
    `cache=always` gives it what tvixfs has by design for immutable trees (long timeouts,
    keep_cache) and also kernel-cached directory listings, which pyfuse3 cannot ask for.
    It holds an open file descriptor per inode the kernel knows (see trees.walk_tree).
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    options = f"source={source},cache={cache},ro"
    argv = [str(binary), "-f", "-o", options, str(mountpoint)]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
        try:
            wait_for(
                lambda: is_mountpoint(mountpoint) or proc.poll() is not None,
                READY_TIMEOUT,
                "passthrough_ll mount",
            )
            if proc.poll() is not None:
                raise StartError(f"passthrough_ll exited {proc.returncode}:\n{_tail(log)}")
            yield Proc(proc.pid, log)
        finally:
            _stop(proc, mountpoint)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A private tmpfs: RAM-backed like the baseline's source, and gone at the end."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
