"""The ``metrics-cost`` figure: the mount's CPU time with ``--metrics-listen`` on / off.

bench/metrics_cost.py is the older stand-alone A/B of wall times; this figure runs in
bench/run.py on the run's trees.

Each repetition mounts the run's store afresh twice, once with metrics off and once on (the
order alternating), and runs the same workloads on each mount, measuring the mount process's
user + system CPU time (/proc/PID/stat) over each:

- ``cold read``: `cat` of the big file (looked up untimed);
- ``small files``: one `cat` of the first .pyc files of the Python tree, cold;
- ``cold walk``: the first `find -ls` of the walk tree;
- ``warm walk``: three more `find -ls` (opendir/readdir: the kernel keeps entries, not
  listings).

CPU time, not wall time: on the shared machine wall times move 10-30 % between runs, CPU time
far less, and the accounting's cost is CPU. The endpoint is scraped once per mount after the
workloads (outside them), to check that the metrics were on and counted.
"""

from __future__ import annotations

import os
import re
import statistics
import urllib.request
from collections.abc import Callable
from pathlib import Path

from context import Context
from measure import Samples, cpu_seconds, run_quiet
from procs import tvixfs_mount
from report import Figure
from startup import small_file_list

WORKLOADS = ("cold read", "small files", "cold walk", "warm walk")
WARM_WALKS = 3
TARGET = 1.03


def _workloads(ctx: Context, mnt: Path) -> dict[str, Callable[[], None]]:
    big = mnt / ctx.paths["big"] / "big.bin"
    python = mnt / ctx.paths["python"]
    walk = mnt / ctx.paths["walk"]

    def cold_read() -> None:
        os.stat(big)
        run_quiet(["cat", big])

    def warm_walk() -> None:
        for _ in range(WARM_WALKS):
            run_quiet(["find", walk, "-ls"])

    small = [python / f for f in small_file_list(ctx.trees["python"])]
    return {
        "cold read": cold_read,
        "small files": lambda: run_quiet(["cat", *small]),
        "cold walk": lambda: run_quiet(["find", walk, "-ls"]),
        "warm walk": warm_walk,
    }


def _scrape(log: Path) -> None:
    """The endpoint the mount announced last in its log answers with request counters."""
    urls = re.findall(r"metrics on (http://\S+)", log.read_text(errors="replace"))
    if not urls:
        raise RuntimeError(f"no metrics endpoint announced in {log}")
    with urllib.request.urlopen(urls[-1], timeout=30) as answer:
        if b"tvixfs_fuse_request_seconds_count" not in answer.read():
            raise RuntimeError(f"{urls[-1]} has no FUSE request counters")


def _sample(ctx: Context, on: bool, cpu: dict[str, Samples]) -> None:
    log = ctx.log("mount-metrics" if on else "mount")
    extra = ["--metrics-listen", "127.0.0.1:0"] if on else []
    mnt = ctx.mountpoint()
    with tvixfs_mount(ctx.store_url, mnt, log, extra=extra) as proc:
        for name, workload in _workloads(ctx, mnt).items():
            before = cpu_seconds(proc.pid)
            workload()
            cpu[name].add(cpu_seconds(proc.pid) - before)
        if on:
            _scrape(log)


def metrics_cost(ctx: Context) -> list[Figure]:
    """The goal is on the sum over the workloads; each workload's own ratio is context."""
    total = Figure("mount CPU with --metrics-listen, all workloads", "metrics off", "s", "lower", TARGET)
    parts = {
        name: Figure(f"mount CPU with --metrics-listen, {name}", "metrics off", "s", "lower", None)
        for name in WORKLOADS
    }
    paired: list[float] = []
    for i in range(ctx.config.metrics_reps):
        sums: dict[bool, float] = {}
        for on in [True, False] if i % 2 else [False, True]:
            cpu = {name: Samples() for name in WORKLOADS}
            _sample(ctx, on, cpu)
            for name, f in parts.items():
                (f.tvixfs if on else f.baseline).add(cpu[name].values[0])
            sums[on] = sum(s.values[0] for s in cpu.values())
            (total.tvixfs if on else total.baseline).add(sums[on])
        paired.append(sums[True] / sums[False])
    total.note = (
        f"user + system CPU seconds of the mount process over {', '.join(WORKLOADS)} "
        f"({WARM_WALKS} warm walks); a fresh mount per sample; median of the per-repetition "
        f"ratios on/off {statistics.median(paired):.3f}"
    )
    return [total, *parts.values()]
