"""A/B of code versions on the program-start workloads (issue 15).

`.venv/bin/python bench/code_ab.py NAME=TREE [NAME=TREE ...] [--reps N] [--actions cat python elf]
[--links embedded loopback wan] [--profiles]`

As root, after bench/run.py has built its trees and stores once. Each TREE is a checkout of
tvixfs (e.g. `git archive main | tar -x -C /tmp/base`) that the mount, and over a link the
daemon, run from (their PYTHONPATH); all read the same stores, so only code that keeps the
store format can be compared. ``--links``: the embedded store, `tvixfs daemon` over loopback,
or the daemon behind bench/latency.py's 20 ms link (bench/startup.py). ``--profiles``: replay
profiles recorded by one earlier start, as bench/run.py's program-start figures do. Samples
rotate between the versions and passthrough_ll, each on a fresh mount with dropped caches, so
load on a shared machine hits all alike. Besides wall time it reports the mount's CPU time
(utime + stime from /proc), which moves far less with load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from context import QUICK, Context, context
from measure import Samples, drop_caches, timed
from procs import passthrough_mount
from startup import mount_over, recorded_profiles, workload

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """Seconds of CPU the process has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _tvixfs(ctx: Context, tree: Path, action: str, link: str, extra: tuple[str, ...]) -> tuple[float, float]:
    """(wall seconds, mount CPU seconds) of one cold sample."""
    os.environ["PYTHONPATH"] = str(tree)
    work = workload(ctx, action)
    with mount_over(ctx, work, link, extra) as (root, pid):
        drop_caches()
        before = _cpu(pid)
        wall = timed(lambda: work.run(root))
        return wall, _cpu(pid) - before


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
    p.add_argument("--links", nargs="+", default=["embedded"], choices=["embedded", "loopback", "wan"])
    p.add_argument("--profiles", action="store_true", help="replay recorded access profiles")
    args = p.parse_args()
    versions = [(name, Path(tree).resolve()) for name, _, tree in (v.partition("=") for v in args.versions)]
    with context(QUICK) as ctx:
        extra = {a: recorded_profiles(ctx, a) if args.profiles else () for a in args.actions}
        wall: dict[tuple[str, str, str], Samples] = {}
        cpu: dict[tuple[str, str, str], Samples] = {}
        for rep in range(args.reps):
            for action in args.actions:
                runs = [(link, name, tree) for link in args.links for name, tree in versions]
                runs.append(("-", "passthrough_ll", None))
                k = rep % len(runs)
                for link, name, tree in runs[k:] + runs[:k]:
                    w = wall.setdefault((action, link, name), Samples())
                    if tree is None:
                        _passthrough(ctx, action, w)
                        line = f"{action} {name}: {w.values[-1]:.3f} s"
                    else:
                        c = cpu.setdefault((action, link, name), Samples())
                        seconds, used = _tvixfs(ctx, tree, action, link, extra[action])
                        w.add(seconds)
                        c.add(used)
                        line = f"{action} {link} {name}: {w.values[-1]:.3f} s, mount CPU {c.values[-1]:.2f} s"
                    print(line, file=sys.stderr, flush=True)
        print("| workload | link | version | wall (median) | passthrough_ll / it | mount CPU (median) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for action in args.actions:
            theirs = wall[action, "-", "passthrough_ll"].median
            for link in args.links:
                for name, _ in versions:
                    w = wall[action, link, name].median
                    c = cpu[action, link, name].median
                    print(f"| {action} | {link} | {name} | {w:.3f} s | {theirs / w:.2f} | {c:.2f} s |")
            print(f"| {action} | - | passthrough_ll | {theirs:.3f} s | 1.00 | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
