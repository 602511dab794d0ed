"""Timing, medians and the kernel knobs a cold measurement needs.

The machine is shared and noisy: every figure is a list of samples, reported by its median
with the spread next to it, never a single run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

READ_BLOCK = 1 << 20


@dataclass
class Samples:
    """Repeated measurements of one quantity (seconds, bytes, ...)."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def n(self) -> int:
        return len(self.values)

    def spread(self) -> tuple[float, float]:
        return min(self.values), max(self.values)


def timed(action: Callable[[], object]) -> float:
    """Wall-clock seconds of one call: the user waits on the wall clock, not on CPU time."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def read_file(path: Path) -> int:
    """Read a file front to back in 1 MiB blocks, as `cat` would; returns the byte count."""
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    total = 0
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


def run_quiet(argv: Sequence[str | os.PathLike[str]], **kwargs: object) -> None:
    """Run a workload command; its output is discarded but a failure is an error, not a sample."""
    proc = subprocess.run(
        [os.fspath(a) for a in argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.decode()[-500:]}"
        )


def drop_caches() -> None:
    """Evict clean page cache, dentries and inodes machine-wide (root only).

    No `sync` first: only clean pages matter for our reads, and syncing other people's dirty
    data on a shared machine would add their I/O to our timings.
    """
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, its exited threads included (/proc/PID/stat).

    Less disturbed by the machine's other load than wall time; resolution one clock tick.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_rss(pid: int) -> int:
    """Resident set size of a process in bytes, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition that has no event to wait on (a mount appearing), with a bound."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def read_ahead_kb(mountpoint: Path) -> int:
    """The kernel readahead window of the mount's backing device (a FUSE mount has its own)."""
    dev = os.stat(mountpoint).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text())


def is_mountpoint(path: Path) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ")[4] == target for line in f)
