"""Everything the figures share: sizes per mode, where things live, the imported stores.

Layout: workload trees and imported stores are cached under bench/work/ (gitignored); each run
gets a directory under /tmp with its own tmpfs (`ram/`) holding the embedded store the mounts
read and the baseline's copies of the same trees, so both sides read from RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trees
from baselines import build_passthrough_ll
from procs import TVIXFS, tmpfs

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work"
# Imported stores are cached here; TVIXFS_BENCH_STORES gives a run its own cache, so people
# changing the store format's sources can benchmark side by side without rebuilding each other's.
STORES = Path(os.environ.get("TVIXFS_BENCH_STORES") or WORK / "stores")
# The embedded store's format follows these files: a cached store is rebuilt when they change.
STORE_SOURCES = (
    "tvixfs/services/backends/local.py",
    "tvixfs/importers/ingest.py",
    "tvixfs/castore",
    "tvixfs/store",
)


@dataclass(frozen=True)
class Config:
    big_mib: int
    many_per_half: int
    cold_reps: int
    warm_reps: int
    walk_reps: int
    program_reps: int
    rss_reps: int
    import_reps: int
    walk_entries: int = 24_000
    ram_size: str = "6g"


FULL = Config(
    big_mib=256, many_per_half=100_000, cold_reps=9, warm_reps=15, walk_reps=7,
    program_reps=5, rss_reps=3, import_reps=5,
)  # fmt: skip
QUICK = Config(
    big_mib=64, many_per_half=5_000, cold_reps=3, warm_reps=5, walk_reps=2,
    program_reps=2, rss_reps=1, import_reps=2,
)  # fmt: skip


def store_fingerprint() -> str:
    h = hashlib.sha256()
    for name in STORE_SOURCES:
        p = REPO / name
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            if f.exists():
                h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def import_tree(store_url: str, tree: Path, name: str) -> str:
    """`tvixfs import`; returns the store path's basename (`<hash>-<name>`)."""
    out = subprocess.run(
        [str(TVIXFS), "--quiet", "import", "--store", store_url, "--name", name, str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"tvixfs import {tree} exited {out.returncode}: {out.stderr[-800:]}")
    return Path(out.stdout.strip().splitlines()[-1]).name


@dataclass(frozen=True)
class CachedStore:
    path: Path
    paths: dict[str, str]  # tree name -> store path basename
    notes: list[str]


def cached_store(kind: str, sources: dict[str, Path]) -> CachedStore:
    """An embedded store holding `sources` (name -> tree), imported once per store format.

    Built under a temporary name and renamed, like the trees; the import times are reported
    as notes (the import figure measures import speed on its own).
    """
    # The trees' directory names say what they hold (a tree built differently gets a new
    # name): a store of other trees is stale too.
    trees_key = hashlib.sha256("\0".join(sorted(t.name for t in sources.values())).encode()).hexdigest()[:8]
    path = STORES / f"{kind}-{store_fingerprint()}-{trees_key}"
    index = path.with_suffix(".json")
    notes: list[str] = []
    if not index.exists():
        for stale in path.parent.glob(f"{kind}-*"):  # older store formats: never read again
            if ".building" in stale.name:  # maybe another run's, still importing
                continue
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        tmp = path.with_name(f"{path.name}.building-{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, tree in sources.items():
            print(
                f"   importing {name} into {path.name} (once per store format)", file=sys.stderr, flush=True
            )
            start = time.perf_counter()
            paths[name] = import_tree(f"local://{tmp}", tree, name)
            took = time.perf_counter() - start
            n = trees.count_entries(tree)
            notes.append(f"setup: imported {name} ({n} entr{'y' if n == 1 else 'ies'}) in {took:.1f} s")
        if path.exists():  # another run finished the same store first
            shutil.rmtree(tmp)
        else:
            tmp.rename(path)
        index.write_text(json.dumps(paths))
    return CachedStore(path, json.loads(index.read_text()), notes)


@dataclass
class Context:
    config: Config
    run: Path
    ram: Path
    passthrough: Path
    store_url: str = ""
    paths: dict[str, str] = field(default_factory=dict)
    trees: dict[str, Path] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)  # baseline copies on tmpfs
    notes: list[str] = field(default_factory=list)
    _mounts: int = 0

    def mountpoint(self) -> Path:
        self._mounts += 1
        return self.run / f"m{self._mounts}"

    def log(self, name: str) -> Path:
        return self.run / f"{name}.log"

    def entries(self, tree: str) -> int:
        """Entries a walk of the tree's root sees, the root included (like `find | wc -l`)."""
        return trees.count_entries(self.trees[tree]) + 1


def main_trees(config: Config) -> dict[str, Path]:
    work = WORK / "trees"
    return {
        "big": trees.big_file_tree(work, config.big_mib),
        "walk": trees.walk_tree(work, Path("/usr/share"), config.walk_entries, 12_000),
        "python": trees.python_tree(work),
    }


@contextmanager
def context(config: Config) -> Iterator[Context]:
    """Build or reuse trees and stores, then stage them on a private tmpfs for this run."""
    binary = build_passthrough_ll(WORK / "bin")
    tree_map = main_trees(config)
    store = cached_store(f"main-{config.big_mib}m", tree_map)
    with ExitStack() as stack:
        run = Path(tempfile.mkdtemp(prefix="tvxbench-", dir="/tmp"))
        stack.callback(shutil.rmtree, run, True)
        ram = stack.enter_context(tmpfs(run / "ram", config.ram_size))
        ctx = Context(config, run, ram, binary, trees=tree_map, notes=list(store.notes))
        shutil.copytree(store.path, ram / "store", symlinks=True)
        ctx.store_url = f"local://{ram / 'store'}"
        ctx.paths = store.paths
        for name in ("big", "walk", "python"):
            ctx.sources[name] = shutil.copytree(tree_map[name], ram / "src" / name, symlinks=True)
        yield ctx
