"""What trusted keys cost a mount (issue 14): cold walk, cold read of a big file and a first
program run, over gRPC from `tvixfs daemon`, with and without `--trusted-public-key`.

The trees are bench/'s (the Python installation, a big file), imported with `--sign-key`.
With keys, each store path costs one ed25519 check at its first lookup, and each chunked file
(over 1 MiB) is read whole once at its first open to prove its chunk list (fs/chunkproof.py).

    python bench/trust.py [--reps 3] [--big-mib 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from context import WORK
from figures import PROGRAM, _python_env
from measure import drop_caches, read_file, run_quiet, timed
from procs import TVIXFS, tvixfs_daemon, tvixfs_mount
from trees import big_file_tree, python_tree


def _import(store: str, tree: Path, key: Path) -> str:
    argv = [str(TVIXFS), "import", "--store", store, "--sign-key", str(key), str(tree)]
    return Path(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()).name


def _read_all(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                read_file(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--big-mib", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tvixfs-trust-"))
    try:
        _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> None:
    trees = WORK / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    python, big = python_tree(trees), big_file_tree(trees, args.big_mib)
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "bench-1", work / "sk", work / "pk"], check=True
    )
    store = f"local://{work / 'store'}"
    python_path, big_path = _import(store, python, work / "sk"), _import(store, big, work / "sk")
    key = (work / "pk").read_text().strip()
    modes = {"no keys": [], "trusted key": ["--trusted-public-key", key]}
    samples: dict[tuple[str, str], list[float]] = {}

    def measure(mode: str, what: str, action: Callable[[Path], object]) -> None:
        with (
            tvixfs_daemon(store, work / "daemon.log") as daemon,
            tvixfs_mount(daemon.url, work / "mnt", work / "mount.log", daemon, modes[mode]),
        ):
            drop_caches()
            samples.setdefault((what, mode), []).append(timed(lambda: action(work / "mnt")))

    workloads: dict[str, Callable[[Path], object]] = {
        "cold walk (find -ls + read every file), Python tree": lambda m: (
            run_quiet(["find", m / python_path, "-ls"]),
            _read_all(m / python_path),
        ),
        f"cold read, {args.big_mib} MiB file": lambda m: read_file(m / big_path / "big.bin"),
        f"first program run (python3 -I -c '{PROGRAM}')": lambda m: run_quiet(
            [m / python_path / "bin" / "python3", "-I", "-c", PROGRAM], env=_python_env(m / python_path)
        ),
    }
    for _ in range(args.reps):
        for what, action in workloads.items():
            for mode in modes:
                measure(mode, what, action)
    print(f"{'workload':60} {'no keys':>10} {'trusted':>10}  (median of {args.reps}, s)")
    for what in workloads:
        plain, keyed = (statistics.median(samples[(what, m)]) for m in modes)
        print(f"{what:60} {plain:10.3f} {keyed:10.3f}")


if __name__ == "__main__":
    main()
