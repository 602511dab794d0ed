"""A/B of code versions on the embedded program-start workloads (issue 15).

`.venv/bin/python bench/code_ab.py NAME=TREE [NAME=TREE ...] [--reps N] [--actions cat python elf]`
(as root, after bench/run.py has built its trees and stores once). Each TREE is a checkout of
tvixfs (e.g. `git archive main | tar -x -C /tmp/base`) that the mount runs from (its
PYTHONPATH); all read the same stores, so only code that keeps the store format can be
compared. Samples rotate between the versions and passthrough_ll, each on a fresh mount with
dropped caches, so load on a shared machine hits all alike. Besides wall time it reports the
mount's CPU time (utime + stime from /proc), which moves far less with load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from context import QUICK, Context, context
from measure import Samples, drop_caches, timed
from procs import passthrough_mount, tvixfs_mount
from startup import workload

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """Seconds of CPU the process has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _tvixfs(ctx: Context, tree: Path, action: str, wall: Samples, cpu: Samples) -> None:
    mnt = ctx.mountpoint()
    os.environ["PYTHONPATH"] = str(tree)
    work = workload(ctx, action)
    with tvixfs_mount(work.store_url, mnt, ctx.log("mount")) as proc:
        drop_caches()
        before = _cpu(proc.pid)
        wall.add(timed(lambda: work.run(mnt / work.basename)))
        cpu.add(_cpu(proc.pid) - before)


def _passthrough(ctx: Context, action: str, wall: Samples) -> None:
    mnt = ctx.mountpoint()
    work = workload(ctx, action)
    with passthrough_mount(ctx.passthrough, work.source, mnt, ctx.log("passthrough"), "always"):
        drop_caches()
        wall.add(timed(lambda: work.run(mnt)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("versions", nargs="+", metavar="NAME=TREE")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--actions", nargs="+", default=["cat", "python"], choices=["cat", "python", "elf"])
    args = p.parse_args()
    versions = [(name, Path(tree).resolve()) for name, _, tree in (v.partition("=") for v in args.versions)]
    with context(QUICK) as ctx:
        wall: dict[tuple[str, str], Samples] = {}
        cpu: dict[tuple[str, str], Samples] = {}
        for rep in range(args.reps):
            for action in args.actions:
                order = [*versions, ("passthrough_ll", None)]
                k = rep % len(order)
                for name, tree in order[k:] + order[:k]:
                    w = wall.setdefault((action, name), Samples())
                    if tree is None:
                        _passthrough(ctx, action, w)
                        line = f"{action} {name}: {w.values[-1]:.3f} s"
                    else:
                        c = cpu.setdefault((action, name), Samples())
                        _tvixfs(ctx, tree, action, w, c)
                        line = f"{action} {name}: {w.values[-1]:.3f} s, mount CPU {c.values[-1]:.2f} s"
                    print(line, file=sys.stderr, flush=True)
        print("| workload | version | wall (median) | passthrough_ll / it | mount CPU (median) |")
        print("| --- | --- | --- | --- | --- |")
        for action in args.actions:
            theirs = wall[action, "passthrough_ll"].median
            for name, _ in versions:
                w = wall[action, name].median
                c = cpu[action, name].median
                print(f"| {action} | {name} | {w:.3f} s | {theirs / w:.2f} | {c:.2f} s |")
            print(f"| {action} | passthrough_ll | {theirs:.3f} s | 1.00 | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
