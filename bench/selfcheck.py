"""`run.py --self-check`: the harness's moving parts on a tiny real tree, in a few seconds.

Import, a tvixfs mount, a passthrough_ll mount, reads compared byte for byte with the source
and a timed walk: if any of these rots, the smoke test (tests/test_bench_smoke.py) fails long
before someone needs the full benchmark.
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

from baselines import build_passthrough_ll
from context import WORK, import_tree
from measure import drop_caches, read_file, run_quiet, timed
from procs import passthrough_mount, tvixfs_mount
from trees import count_entries

TINY_SOURCE = Path("/usr/share/doc/libfuse3-dev/examples")


def _same_tree(a: Path, b: Path) -> None:
    """Every file of a has the same bytes under b (read through the mount under test)."""
    for p in sorted(a.rglob("*")):
        q = b / p.relative_to(a)
        if p.is_file() and not filecmp.cmp(p, q, shallow=False):
            raise AssertionError(f"{q} differs from {p}")
    if count_entries(a) != count_entries(b):
        raise AssertionError(f"{b} has {count_entries(b)} entries, {a} has {count_entries(a)}")


def self_check() -> None:
    binary = build_passthrough_ll(WORK / "bin")
    tmp = Path(tempfile.mkdtemp(prefix="tvxbench-check-", dir="/tmp"))
    try:
        src = shutil.copytree(TINY_SOURCE, tmp / "src")
        store = f"local://{tmp / 'store'}"
        store_path = import_tree(store, src, "bench-self-check")
        drop_caches()
        with tvixfs_mount(store, tmp / "mnt", tmp / "mount.log"):
            root = tmp / "mnt" / store_path
            took = timed(lambda: run_quiet(["find", root, "-ls"]))
            _same_tree(src, root)
            read_file(root / "passthrough_ll.c")
        print(f"tvixfs: import, mount, walk ({took * 1000:.1f} ms), byte-for-byte reads: ok")
        with passthrough_mount(binary, src, tmp / "pt", tmp / "pt.log"):
            _same_tree(src, tmp / "pt")
        print("passthrough_ll: build, mount, byte-for-byte reads: ok")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
