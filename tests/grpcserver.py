"""Run a real ``tvixfs daemon`` in a subprocess for tests, ready when it says READY=1.

Readiness comes from a fake ``NOTIFY_SOCKET`` (a datagram socket we bind), exactly as systemd
would see it; the daemon listens on port 0 and its READY status line names the port chosen, so
there is no race for a free port.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loghygiene import check_daemon_stderr

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class DaemonError(Exception):
    """The daemon exited or stayed silent before READY=1; the message holds its stderr."""


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    notify: socket.socket
    stderr_path: Path
    addresses: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def tcp(self) -> str:
        """The first TCP address, as grpcio takes it (``[::1]:PORT``)."""
        return next(a for a in self.addresses if not a.startswith("unix:"))

    @property
    def url(self) -> str:
        return f"grpc+http://{self.tcp}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_message(self, prefix: str, timeout: float = READY_TIMEOUT) -> str:
        """The next notify message containing a line that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.proc.poll() is not None and not select.select([self.notify], [], [], 0)[0]:
                raise DaemonError(f"daemon exited {self.proc.returncode}:\n{self.stderr()}")
            if not select.select([self.notify], [], [], min(left, 0.5))[0]:
                continue
            message = self.notify.recv(4096).decode()
            self.messages.append(message)
            if any(line.startswith(prefix) for line in message.splitlines()):
                return message
        raise DaemonError(f"no {prefix} within {timeout}s:\n{self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(STOP_TIMEOUT)


def start_daemon(
    tvixfs_cmd: Sequence[str],
    tmp: Path,
    store: str = "memory://",
    listen: Sequence[str] = ("[::1]:0",),
    extra: Sequence[str] = (),
) -> Daemon:
    """Start the daemon; returns once it sent READY=1 (raises DaemonError otherwise).

    A local store's directory is made first, as systemd's StateDirectory= makes it: the daemon
    creates a store only in a directory that exists.
    """
    if store.startswith("local://"):
        Path(store.removeprefix("local://")).mkdir(parents=True, exist_ok=True)
    notify_path = tmp / f"notify-{len(list(tmp.glob('notify-*')))}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    stderr_path = notify_path.with_suffix(".stderr")
    args = [*tvixfs_cmd, "daemon", "--store", store, *(f"--listen={a}" for a in listen), *extra]
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stderr=stderr)
    daemon = Daemon(proc, notify, stderr_path)
    try:
        ready = daemon.wait_message("READY=1")
    except BaseException:
        _kill(daemon)
        raise
    status = next(line for line in ready.splitlines() if line.startswith("STATUS="))
    daemon.addresses = status.removeprefix("STATUS=serving on ").split()
    return daemon


@contextmanager
def running_daemon(
    tvixfs_cmd: Sequence[str],
    tmp: Path,
    store: str = "memory://",
    listen: Sequence[str] = ("[::1]:0",),
    extra: Sequence[str] = (),
) -> Iterator[Daemon]:
    daemon = start_daemon(tvixfs_cmd, tmp, store, listen, extra)
    try:
        yield daemon
    finally:
        _kill(daemon)
    check_daemon_stderr(daemon.stderr(), "tvixfs daemon")


def _kill(daemon: Daemon) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    daemon.notify.close()
