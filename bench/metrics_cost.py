"""What ``--metrics-listen`` costs on the hot paths: the same mount with metrics off and on.

    .venv/bin/python bench/metrics_cost.py [--reps 7] [--big-mib 128]

Runs as root (it mounts). A tree (this Python's standard library, a few thousand entries,
plus one file of ``--big-mib`` MiB of real machine code) is imported into an embedded store.
Each repetition mounts it afresh once with metrics off and once on (the order alternating
between repetitions) and times, on that mount:

- ``cold walk``: the first ``find -ls`` of the tree (lookups, readdirplus, store reads);
- ``warm walk``: the median of five more ``find -ls`` (opendir/readdir only: the kernel keeps
  entries and attributes, not listings);
- ``cold read``: ``cat`` of the big file (chunk cache empty; the store's files in the page cache);
- ``daemon CPU``: the mount process's user + system CPU time over ten more warm walks: what the
  accounting costs, less blurred by the other load of the machine than the wall times.

The endpoint is scraped once per mount after the timings, so that its cost is not in them.
Prints medians and minima over the repetitions and the ratios on/off (1.00: no cost) to stdout and
appends them to ``bench/METRICS.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

from mounting import TVIXFS, Mount, import_tree, mounted  # noqa: E402
from trees import big_file_tree, count_entries  # noqa: E402

OUT = BENCH / "METRICS.md"
FIGURES = ("cold walk", "warm walk", "cold read", "daemon CPU, 10 warm walks")
TICK = os.sysconf("SC_CLK_TCK")


def _timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _cpu(pid: int) -> float:
    """User plus system CPU seconds of a process (less disturbed by other load than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _sample(mount: Mount, tree: str, big: str) -> dict[str, float]:
    root = str(mount.path(tree))
    found = {"cold walk": _timed(["find", root, "-ls"])}
    found["warm walk"] = statistics.median(_timed(["find", root, "-ls"]) for _ in range(5))
    found["cold read"] = _timed(["cat", str(mount.path(big, "big.bin"))])
    pid = mount.process.proc.pid
    before = _cpu(pid)
    for _ in range(10):
        _timed(["find", root, "-ls"])
    found["daemon CPU, 10 warm walks"] = _cpu(pid) - before
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--big-mib", type=int, default=128)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tvxmc", dir="/tmp"))
    try:
        stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        source = tmp / "stdlib"
        shutil.copytree(stdlib, source, symlinks=True, ignore=shutil.ignore_patterns("site-packages"))
        store = tmp / "store"
        tree = import_tree(store, source, "stdlib")
        big = import_tree(store, big_file_tree(tmp / "trees", args.big_mib), "big")
        samples: dict[str, dict[str, list[float]]] = {m: {f: [] for f in FIGURES} for m in ("off", "on")}
        for rep in range(args.reps):
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                extra = ["--metrics-listen", "127.0.0.1:0"] if mode == "on" else []
                with mounted(TVIXFS, tmp, f"local://{store}", extra) as mount:
                    for figure, seconds in _sample(mount, tree, big).items():
                        samples[mode][figure].append(seconds)
                    if mode == "on":
                        url = re.search(r"metrics on (http://\S+)", mount.stderr())
                        assert url, mount.stderr()
                        with urllib.request.urlopen(url.group(1), timeout=30) as answer:
                            assert b"tvixfs_fuse_request_seconds_count" in answer.read()
            print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
        lines = [
            f"## {time.strftime('%Y-%m-%d %H:%M')} UTC, {args.reps} reps, "
            f"{count_entries(source)} entries, {args.big_mib} MiB file, load {_load()}",
            "",
            "| figure | off: median (min) s | on: median (min) s | on/off, medians | on/off, minima |",
            "| --- | --- | --- | --- | --- |",
        ]
        for figure in FIGURES:
            off, on = samples["off"][figure], samples["on"][figure]
            off_median, on_median = statistics.median(off), statistics.median(on)
            lines.append(
                f"| {figure} | {off_median:.3f} ({min(off):.3f}) | {on_median:.3f} ({min(on):.3f}) "
                f"| {on_median / off_median:.3f} | {min(on) / min(off):.3f} |"
            )
        text = "\n".join(lines) + "\n"
        print(text)
        with OUT.open("a") as out:
            out.write(text + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


if __name__ == "__main__":
    main()
