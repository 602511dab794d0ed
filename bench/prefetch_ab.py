"""A/B of fetching ahead (issue 15): the program-start workloads with and without it.

`.venv/bin/python bench/prefetch_ab.py [--reps N] [--links embedded loopback wan]
[--actions cat python elf] [--off siblings|profiles]` (as root, after bench/run.py has built
its trees and stores once). `--off siblings` compares with `--no-prefetch-siblings`;
`--off profiles` compares mounts replaying access profiles (recorded by one earlier start in
this run, bench/startup.py) with mounts without any. Samples alternate between the two
settings, so load on a shared machine hits both alike. Bytes fetched are the `first-run`
figure's business (bench/run.py).
"""

from __future__ import annotations

import argparse
import sys

from context import QUICK, context
from measure import Samples
from startup import _over, recorded_profiles

OFF = ("--no-prefetch-siblings",)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--links", nargs="+", default=["embedded", "loopback", "wan"])
    p.add_argument("--actions", nargs="+", default=["cat", "python"], choices=["cat", "python", "elf"])
    p.add_argument("--off", choices=["siblings", "profiles"], default="siblings")
    args = p.parse_args()
    with context(QUICK) as ctx:
        results: dict[tuple[str, str, str], Samples] = {}
        for rep in range(args.reps):
            for action in args.actions:
                for link in args.links:
                    if args.off == "siblings":
                        order = [("on", ()), ("off", OFF)]
                    else:
                        order = [("on", recorded_profiles(ctx, action)), ("off", ())]
                    for name, extra in order[rep % 2 :] + order[: rep % 2]:
                        samples = results.setdefault((action, link, name), Samples())
                        _over(ctx, samples, action, link, extra)
                        line = f"{action} {link} {name}: {samples.values[-1]:.3f} s"
                        print(line, file=sys.stderr, flush=True)
        print(f"| workload | link | {args.off} on (median) | off (median) | on/off |")
        print("| --- | --- | --- | --- | --- |")
        for action in args.actions:
            for link in args.links:
                on = results[action, link, "on"].median
                off = results[action, link, "off"].median
                print(f"| {action} | {link} | {on:.3f} s | {off:.3f} s | {on / off:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
