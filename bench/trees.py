"""Workload trees, built once from real data on this machine and cached under bench/work/trees.

Each tree is built under a temporary name and renamed into place, so an existing tree is a
complete one. The sources are copied, not used in place: another process upgrading a package
must not change a tree between the tvixfs import and the baseline's copy of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

LIB_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/lib"))
FILES_PER_DIR = 999  # plus the directory itself: 1000 entries per directory


def _cached(path: Path, build: Callable[[Path], object]) -> Path:
    if not path.exists():
        tmp = path.with_name(path.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        build(tmp)
        tmp.rename(path)
    return path


def count_entries(root: Path) -> int:
    """Files, directories and symlinks below root (root itself not counted), like `find | wc -l` - 1."""
    total = 0
    for _, dirs, files in os.walk(root):
        total += len(dirs) + len(files)
    return total


def _big_binaries() -> list[Path]:
    """Shared libraries of this machine, largest first: real machine code, not zeros."""
    found: dict[tuple[int, int], Path] = {}
    for lib in LIB_DIRS:
        if not lib.is_dir():
            continue
        for p in lib.iterdir():
            if ".so" in p.name and p.is_file() and not p.is_symlink():
                st = p.stat()
                found.setdefault((st.st_dev, st.st_ino), p)
    return sorted(found.values(), key=lambda p: p.stat().st_size, reverse=True)


def big_file_tree(trees: Path, size_mib: int) -> Path:
    """A directory holding one file of exactly size_mib MiB: real binaries concatenated."""

    def build(dest: Path) -> None:
        dest.mkdir()
        remaining = size_mib << 20
        with (dest / "big.bin").open("wb") as out:
            while remaining:
                for src in _big_binaries():
                    with src.open("rb") as f:
                        data = f.read(remaining)
                    out.write(data)
                    remaining -= len(data)
                    if not remaining:
                        break

    return _cached(trees / f"big-{size_mib}m", build)


def python_tree(trees: Path) -> Path:
    """A copy of the Python installation running this harness, minus its site-packages.

    That is the standard library, the interpreter and libpython: thousands of real files, and a
    program that can run from the mount.
    """
    prefix = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = prefix / "lib" / version / "site-packages"

    def build(dest: Path) -> None:
        def ignore(directory: str, names: list[str]) -> list[str]:
            return ["site-packages"] if Path(directory) == site.parent else []

        shutil.copytree(prefix, dest, symlinks=True, ignore=ignore)
        (dest / "lib" / version / "site-packages").mkdir()
        _store_bytecode(dest, dest / "lib" / version)

    tree = _cached(trees / f"python-{sys.version.split()[0]}-mtime1", build)
    if not (tree / "bin" / "python3").exists():
        raise RuntimeError(f"{prefix} has no bin/python3: cannot build the program-run workload")
    return tree


def _mtime_one(tree: Path) -> None:
    for directory, dirs, files in os.walk(tree):
        for name in [*dirs, *files]:
            os.utime(Path(directory) / name, (1, 1), follow_symlinks=False)


def _store_bytecode(tree: Path, stdlib: Path) -> None:
    """Make the tree what a Nix store holds: every mtime 1, and bytecode compiled against it.

    A store path's files all have mtime 1, and Nix's Python compiles its bytecode so that it
    is valid there. A copy with the installation's own mtimes would have bytecode that is
    valid on passthrough_ll (which shows those mtimes) and stale on tvixfs (mtime 1): there
    Python would read every source file and compile it again on each start.
    """
    _mtime_one(tree)
    compile_all = [sys.executable, "-m", "compileall", "-qq", "-f", "-j", "0"]
    subprocess.run([*compile_all, "--invalidation-mode", "timestamp", str(stdlib)], check=False)
    _mtime_one(tree)


def walk_tree(trees: Path, source: Path, total: int, part_max: int) -> Path:
    """At least `total` entries of real directories from source (e.g. /usr/share), in parts.

    The tree is `part0/`, `part1/`, ... each holding whole top-level directories of source
    and at most part_max entries. The baseline serves each part with its own passthrough_ll:
    it keeps one open file descriptor per inode the kernel knows, and the hard limit on open
    files here (20000, not raisable without CAP_SYS_RESOURCE) is below the walk's size.
    """
    sizes = sorted(
        ((count_entries(d) + 1, d) for d in source.iterdir() if d.is_dir() and not d.is_symlink()),
        reverse=True,
    )
    parts: list[list[Path]] = []
    filled: list[int] = []
    for size, d in sizes:
        if sum(filled) >= total:
            break
        if size > part_max:
            continue
        i = min(range(len(filled)), key=filled.__getitem__, default=-1)
        if i < 0 or filled[i] + size > part_max:
            parts.append([])
            filled.append(0)
            i = len(parts) - 1
        parts[i].append(d)
        filled[i] += size
    if sum(filled) < total:
        raise RuntimeError(f"{source} has fewer than {total} entries in directories of <= {part_max}")

    def build(dest: Path) -> None:
        for i, part in enumerate(parts):
            for d in part:
                shutil.copytree(d, dest / f"part{i}" / d.name, symlinks=True)

    return _cached(trees / f"walk-{total}", build)


def many_tree(trees: Path, per_half: int) -> Path:
    """Two halves `a/` and `b/` of per_half small, distinct entries each (dirs of 1000).

    Walking `a` then `b` through one mount gives the daemon's memory after per_half and after
    2 * per_half entries: the growth between them is what the cache limits must bound.
    """

    def build(dest: Path) -> None:
        for half in ("a", "b"):
            made = 0
            d = 0
            while made < per_half:
                sub = dest / half / f"d{d:04}"
                sub.mkdir(parents=True)
                made += 1
                for i in range(min(FILES_PER_DIR, per_half - made)):
                    (sub / f"f{i:03}").write_text(f"{half}/{d}/{i}\n")
                    made += 1
                d += 1

    return _cached(trees / f"many-{per_half}x2", build)


def elf_tree(trees: Path, program: Path) -> Path:
    """A dynamically linked program and its whole `ldd` closure, laid out as a store path.

    ``bin/<program>``, and ``lib/`` holding every shared library it needs and the dynamic
    loader, all with mtime 1. Run as ``lib/<loader> --library-path lib bin/<program>``, the
    libraries come from the tree, not from the machine. ``lib/sasl2`` is empty: pointed at by
    SASL_PATH, Cyrus SASL (in curl's closure) loads no plugins from the machine.
    """
    listed = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=True).stdout
    libs: dict[str, Path] = {}
    for line in listed.splitlines():
        words = line.split()
        if "=>" in words and len(words) >= 3 and words[2].startswith("/"):
            libs[words[0]] = Path(words[2])
        elif words and words[0].startswith("/") and "ld-linux" in words[0]:
            libs[Path(words[0]).name] = Path(words[0])

    def build(dest: Path) -> None:
        (dest / "bin").mkdir(parents=True)
        (dest / "lib" / "sasl2").mkdir(parents=True)
        shutil.copy2(program.resolve(), dest / "bin" / program.name)
        for name, path in libs.items():
            shutil.copy2(path.resolve(), dest / "lib" / name)
        _mtime_one(dest)

    return _cached(trees / f"elf-{program.name}-{len(libs)}libs-mtime1", build)


def elf_loader(tree: Path) -> Path:
    """The dynamic loader in an ``elf_tree``."""
    found = sorted((tree / "lib").glob("ld-linux*"))
    if not found:
        raise RuntimeError(f"{tree} holds no dynamic loader")
    return found[0]
