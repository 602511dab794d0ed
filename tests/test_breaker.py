"""Issue 11 item 4: with the store down, requests fail at once instead of each paying the
client's retries, and the client finds the store again by itself once it is back.

Real daemons on a unix socket (so a restart reuses the address) and a real mount; no mocks.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path

import pytest
from grpcserver import Daemon, start_daemon
from mounting import TVIXFS, mounted, needs_fuse

from tvixfs.services.clientconfig import ClientConfig
from tvixfs.services.errors import StoreUnavailableError
from tvixfs.services.url import open_store

FILES = 300
# Generous: without the breaker 300 files cost 300 x ~1.5 s of retries (7.5 minutes).
BOUND = 90.0
RECOVERY = 90.0  # the probe waits at most 30 s between tries


def _wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def _serve(short_tmp: Path, store: str, sock: Path) -> Daemon:
    sock.unlink(missing_ok=True)
    return start_daemon(TVIXFS, short_tmp, store, listen=(f"unix:{sock}",))


def test_client_fails_fast_then_recovers(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock = short_tmp / "store.sock"
    daemon = _serve(short_tmp, "memory://", sock)
    client = open_store(f"grpc+unix://{sock}", config=ClientConfig(timeout=5, attempts=3, backoff=0.05))
    states: list[bool] = []
    (breaker,) = client.breakers
    breaker.watch(states.append)
    try:
        digest = client.blobs.put([b"before the outage"])
        daemon.stop(signal.SIGKILL)
        caplog.set_level(logging.INFO, "tvixfs.services.breaker")
        failures = 0
        for _ in range(50):
            with pytest.raises(StoreUnavailableError) as raised:
                client.blobs.stat(digest)
            failures += "failing fast" in str(raised.value)
        assert failures >= 45  # only the first few paid the retries
        assert states == [False] and not breaker.reachable
        daemon = _serve(short_tmp, "memory://", sock)
        assert _wait_until(lambda: breaker.reachable, RECOVERY), "the breaker never closed again"
        assert states == [False, True]
        assert client.blobs.stat(digest) is None  # a new, empty memory store answers
        messages = [r.getMessage() for r in caplog.records if r.name == "tvixfs.services.breaker"]
        assert len([m for m in messages if "failing fast" in m]) == 1
        assert len([m for m in messages if "reachable again" in m]) == 1
    finally:
        client.close()
        daemon.stop()
        daemon.notify.close()


@needs_fuse
def test_mount_fails_fast_while_the_daemon_is_down(short_tmp: Path, tmp_path: Path) -> None:
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(FILES):
        (tree / f"f{i:03}").write_text(f"file {i}\n")
    store_dir = short_tmp / "store"
    done = os.popen(f"{TVIXFS[0]} import --store local://{store_dir} {tree}").read()
    name = Path(done.strip()).name
    sock = short_tmp / "store.sock"
    daemon = _serve(short_tmp, f"local://{store_dir}", sock)
    try:
        with mounted(TVIXFS, short_tmp, f"grpc+unix://{sock}") as mount:
            files = sorted(mount.path(name).iterdir())  # the tree is known; no content read yet
            assert len(files) == FILES
            daemon.stop(signal.SIGKILL)
            daemon.notify.close()
            started = time.monotonic()
            errors = 0
            for file in files:
                try:
                    file.read_bytes()
                except OSError as e:
                    assert e.errno == errno.EIO
                    errors += 1
            elapsed = time.monotonic() - started
            assert errors == FILES
            assert elapsed < BOUND, elapsed
            mount.process.wait_message("STATUS=store", 10)
            assert "unreachable: failing fast" in mount.process.messages[-1]
            daemon = _serve(short_tmp, f"local://{store_dir}", sock)

            def readable() -> bool:
                try:
                    return files[-1].read_bytes() == f"file {FILES - 1}\n".encode()
                except OSError:
                    return False

            assert _wait_until(readable, RECOVERY), mount.stderr()
            assert all(f.read_bytes() == f"file {int(f.name[1:])}\n".encode() for f in files)
            stderr = mount.stderr()
            assert stderr.count("unreachable: failing fast") == 1
            assert stderr.count("reachable again") == 1
    finally:
        daemon.stop()
        daemon.notify.close()
