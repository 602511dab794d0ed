"""Warm walk with listings cached by the kernel (patched pyfuse3) against without (stock).

    .venv/bin/python bench/dircache.py --other-pyfuse3 DIR [--reps 9]

DIR holds another build of pyfuse3 (e.g. ``pip install --no-deps --target DIR pyfuse3``
for a stock one when the venv's is patched, or the reverse); one of the two must be patched.
Same tree and timings as ``bench/metrics_cost.py`` (this Python's standard library imported into
an embedded store, a fresh mount per sample, the two builds interleaved); the warm walk is the
median of five ``find -ls`` after the first. Prints medians and minima, appends to
``bench/METRICS.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

from metrics_cost import OUT, _timed  # noqa: E402
from mounting import TVIXFS, import_tree, mounted  # noqa: E402
from trees import count_entries  # noqa: E402

PROBE = "import pyfuse3; print(hasattr(pyfuse3.FileInfo, 'cache_readdir'))"


def _caches(env: dict[str, str]) -> bool:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--other-pyfuse3", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    here = os.environ.get("PYTHONPATH", "")
    builds = {
        "venv": dict(os.environ),
        "other": {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.other_pyfuse3), here]))},
    }
    names = {mode: "cached" if _caches(env) else "not cached" for mode, env in builds.items()}
    if sorted(names.values()) != ["cached", "not cached"]:
        sys.exit(f"one build must be patched and the other not: {names}")
    tmp = Path(tempfile.mkdtemp(prefix="tvxrd", dir="/tmp"))
    try:
        stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        source = tmp / "stdlib"
        shutil.copytree(stdlib, source, symlinks=True, ignore=shutil.ignore_patterns("site-packages"))
        store = tmp / "store"
        tree = import_tree(store, source, "stdlib")
        warm: dict[str, list[float]] = {names[mode]: [] for mode in builds}
        for rep in range(args.reps):
            for mode in ("venv", "other") if rep % 2 == 0 else ("other", "venv"):
                with mounted(TVIXFS, tmp, f"local://{store}", env=builds[mode]) as mount:
                    root = str(mount.path(tree))
                    _timed(["find", root, "-ls"])
                    warm[names[mode]].append(
                        statistics.median(_timed(["find", root, "-ls"]) for _ in range(5))
                    )
        cached, uncached = warm["cached"], warm["not cached"]
        text = (
            f"## kernel readdir cache, {time.strftime('%Y-%m-%d %H:%M')} UTC, {args.reps} reps, "
            f"{count_entries(source)} entries, load {Path('/proc/loadavg').read_text().split()[0]}\n\n"
            "| warm walk | median s | min s |\n| --- | --- | --- |\n"
            f"| not cached (stock pyfuse3) | {statistics.median(uncached):.4f} | {min(uncached):.4f} |\n"
            f"| cached (patched pyfuse3) | {statistics.median(cached):.4f} | {min(cached):.4f} |\n"
            f"| cached / not cached | {statistics.median(cached) / statistics.median(uncached):.3f} "
            f"| {min(cached) / min(uncached):.3f} |\n"
        )
        print(text)
        with OUT.open("a") as out:
            out.write(text + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
