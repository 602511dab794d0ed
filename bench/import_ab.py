"""Interleaved A/B of `tvixfs import` between commits, and `nix-store --add`, on one tree.

    .venv/bin/python bench/import_ab.py TREE --reps 5 [--cold] \\
        before=/tmp/a after=/tmp/b nix=

Each `NAME=DIR` runs `tvixfs import` with `PYTHONPATH=DIR` (a `git archive COMMIT | tar -x -C DIR`
of the commit to measure); `nix=` runs `nix-store --add` into a chroot store. Samples rotate
the order every repetition; each writes a fresh store under bench/work/import-ab/, all deleted
after the last (see the import figure in figures.py for why). Before each sample the tree is
read whole (warm) or its pages evicted with `POSIX_FADV_DONTNEED` on its own files only
(`--cold`: nobody else's cache is dropped). Prints medians of wall time and of the children's
CPU time (user + system, from getrusage), and the store path each side printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TVIXFS = BENCH.parent / ".venv" / "bin" / "tvixfs"


def _each_file(tree: Path, action: Callable[[int], None]) -> None:
    for directory, _, files in os.walk(tree):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                action(fd)
            finally:
                os.close(fd)


def _evict(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _read(fd: int) -> None:
    while os.read(fd, 1 << 20):
        pass


def _command(name: str, code: str, tree: Path, dest: Path) -> tuple[list[str], dict[str, str]]:
    if name == "nix":
        return ["nix-store", "--store", f"local?root={dest}", "--add", str(tree)], dict(os.environ)
    cmd = [str(TVIXFS), "--quiet", "import", "--store", f"local://{dest}", "--name", tree.name, str(tree)]
    return cmd, dict(os.environ, PYTHONPATH=code)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tree", type=Path)
    p.add_argument("variants", nargs="+", metavar="NAME=DIR", help="code to run (nix= for nix-store --add)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cold", action="store_true", help="evict the tree's pages before each sample")
    args = p.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    scratch = BENCH / "work" / "import-ab"
    subprocess.run(["rm", "-rf", str(scratch)], check=True)
    scratch.mkdir(parents=True)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    printed: dict[str, str] = {}
    sample = 0
    try:
        for rep in range(args.reps):
            names = list(variants)
            names = names[rep % len(names) :] + names[: rep % len(names)]
            for name in names:
                sample += 1
                _each_file(args.tree, _evict if args.cold else _read)
                cmd, env = _command(name, variants[name], args.tree, scratch / f"s{sample}")
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                wall[name].append(time.perf_counter() - start)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if done.returncode != 0:
                    print(f"{name}: exit {done.returncode}: {done.stderr[-600:]}", file=sys.stderr)
                    return 1
                cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
                printed.setdefault(name, done.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(scratch)], check=False)
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    print(f"{'cold' if args.cold else 'warm'} {args.tree}, {args.reps} reps, load {os.getloadavg()}")
    for name in variants:
        w = wall[name]
        print(
            f"{name}: wall {statistics.median(w):.3f} s (min {min(w):.3f}, max {max(w):.3f}), "
            f"cpu {statistics.median(cpu[name]):.3f} s -> {printed[name]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
