"""Run a real ``tvixfs nar-bridge`` in a subprocess for tests, ready when it says READY=1.

Like tests/grpcserver.py: a fake ``NOTIFY_SOCKET`` tells readiness, the bridge listens on port 0
and its READY status names the address chosen.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from grpcserver import Daemon
from loghygiene import check_daemon_stderr

from tvixfs.store import nixbase32


@contextmanager
def running_bridge(
    tvixfs_cmd: Sequence[str], tmp: Path, store: str, extra: Sequence[str] = ()
) -> Iterator[Daemon]:
    if store.startswith("local://"):  # as systemd's StateDirectory= would make it
        Path(store.removeprefix("local://")).mkdir(parents=True, exist_ok=True)
    notify_path = tmp / f"bridge-notify-{len(list(tmp.glob('bridge-notify-*')))}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    stderr_path = notify_path.with_suffix(".stderr")
    args = [*tvixfs_cmd, "nar-bridge", "--store", store, "--listen", "127.0.0.1:0", *extra]
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stderr=stderr)
    bridge = Daemon(proc, notify, stderr_path)
    try:
        ready = bridge.wait_message("READY=1")
        status = next(line for line in ready.splitlines() if line.startswith("STATUS="))
        bridge.addresses = [status.removeprefix("STATUS=serving on ")]
        yield bridge
    finally:
        if proc.poll() is None:
            bridge.stop()
        notify.close()
    check_daemon_stderr(bridge.stderr(), "tvixfs nar-bridge")


def url(bridge: Daemon) -> str:
    return f"http://{bridge.addresses[0]}"


def request(
    bridge: Daemon, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    host, _, port = bridge.addresses[0].rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def b32(data: bytes) -> str:
    return nixbase32.encode(data)
