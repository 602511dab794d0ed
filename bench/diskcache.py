"""What the disk cache costs on a cold read, and what it saves after a remount.

    .venv/bin/python bench/diskcache.py [--files 48] [--reps 5]

Runs as root (it mounts). A tree of ``--files`` files of 1 MiB of random bytes is served by a
fault store (``tests/faultstore.py``, honest, its own process, on a unix socket, chunk lists
of 256 KiB) and imported into an embedded store. Each repetition, in turn:

- ``off``: a fresh mount over gRPC without a disk cache reads every file;
- ``cold``: a fresh mount over gRPC with an empty disk cache reads every file;
- ``warm``: a fresh mount over gRPC with that (now full) disk cache reads every file, and the
  fault store counts the blob reads it served meanwhile;
- ``local``: a fresh mount of the embedded store (``local://``) reads every file.

Page caches are not dropped (both the cache's and the embedded store's files stay in memory).
Medians of the repetitions; writes ``bench/DISKCACHE.md`` and prints the same.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from faultstore import spawn_faultstore  # noqa: E402
from mounting import TVIXFS, Mount, import_tree, mounted  # noqa: E402
from uniquetrees import dump_nar  # noqa: E402

OUT = Path(__file__).resolve().parent / "DISKCACHE.md"
CHUNK = 256 * 1024


def _walk(mount: Mount, name: str, files: list[str]) -> float:
    started = time.perf_counter()
    for relative in files:
        with open(mount.path(name, relative), "rb") as f:
            while f.read(1 << 20):
                pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tvxdc", dir="/tmp"))
    try:
        tree = tmp / "tree"
        tree.mkdir()
        files = [f"f{i}" for i in range(args.files)]
        for relative in files:
            (tree / relative).write_bytes(os.urandom(1 << 20))
        local_name = import_tree(tmp / "store", tree, "tree")
        samples: dict[str, list[float]] = {"off": [], "cold": [], "warm": [], "local": []}
        warm_reads: list[int] = []
        with spawn_faultstore(tmp, nars=[(dump_nar(tree), "tree")], chunk_size=CHUNK) as faults:
            name = faults.paths[0]
            assert name == local_name
            cache = ["--disk-cache", str(tmp / "cache")]
            for _ in range(args.reps):
                with mounted(TVIXFS, tmp, faults.url) as mount:
                    samples["off"].append(_walk(mount, name, files))
                shutil.rmtree(tmp / "cache", ignore_errors=True)
                with mounted(TVIXFS, tmp, faults.url, cache) as mount:
                    samples["cold"].append(_walk(mount, name, files))
                before = faults.stats()["calls"].get("blob.read", 0)
                with mounted(TVIXFS, tmp, faults.url, cache) as mount:
                    samples["warm"].append(_walk(mount, name, files))
                warm_reads.append(faults.stats()["calls"].get("blob.read", 0) - before)
                with mounted(TVIXFS, tmp, f"local://{tmp / 'store'}") as mount:
                    samples["local"].append(_walk(mount, name, files))
        median = {k: statistics.median(v) for k, v in samples.items()}
        lines = [
            "# Disk cache figures (bench/diskcache.py)",
            "",
            f"{args.files} files of 1 MiB, {args.reps} repetitions, medians; fault store over a unix socket.",
            "",
            "| figure | ratio | target | tvixfs | baseline |",
            "| --- | --- | --- | --- | --- |",
            f"| cold read, cache on / off | {median['cold'] / median['off']:.2f} | <= 1.05 "
            f"| {median['cold']:.3f} s | {median['off']:.3f} s |",
            f"| read after remount, warm cache / local:// | {median['warm'] / median['local']:.2f} | <= 1.1 "
            f"| {median['warm']:.3f} s | {median['local']:.3f} s |",
            f"| blob reads on the store after remount | {max(warm_reads)} | 0 | | |",
            "",
            "Samples (s): "
            + "; ".join(f"{k} " + " ".join(f"{x:.3f}" for x in v) for k, v in samples.items()),
            "",
        ]
        text = "\n".join(lines)
        OUT.write_text(text)
        print(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
