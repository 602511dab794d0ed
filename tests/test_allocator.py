"""glibc malloc tuning (tvixfs/allocator.py): it takes effect, and both daemons apply it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from grpcserver import running_daemon

from tvixfs.allocator import glibc_version

# Run in a fresh interpreter: where an 8 MiB buffer lands, on the heap or in a mapping of its
# own. glibc's default threshold (128 KiB, sliding up only after the first such buffer is
# freed) maps it separately; tuned, it comes from the heap, whose freed memory is reused.
_WHERE = """
import sys
from tvixfs.allocator import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc() is True
buffer = bytes(8 << 20)
address = id(buffer)
for line in open("/proc/self/maps"):
    span, *rest = line.split()
    low, high = (int(x, 16) for x in span.split("-"))
    if low <= address < high:
        print(rest[-1] if len(rest) == 5 else "anonymous")
"""


pytestmark = pytest.mark.skipif(glibc_version() is None, reason="mallopt is glibc's")


def _where(mode: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", _WHERE, mode], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_tuned_buffers_come_from_the_reused_heap() -> None:
    assert _where("default") == "anonymous"
    assert _where("tuned") == "[heap]"


def test_daemon_tunes_malloc_at_startup(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    with running_daemon([*tvixfs_cmd, "-v"], short_tmp) as daemon:
        pass
    assert "malloc tuned (glibc" in daemon.stderr()
