"""Small store paths whose every file is unique, for tests (and bench/faults.py) that must not
be answered from a cache: the mount daemon shares inodes and caches content by digest, so a
file equal to one read earlier would never reach the store under test."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

CHUNK = 256 * 1024  # the chunk size the fault store is started with by these tests


def unique_tree(root: Path, seed: int, large: int = 6 * CHUNK) -> Path:
    """doc/small.txt (a whole-blob read), large.bin (several chunks), a deeper file, a link."""
    rng = random.Random(seed)
    (root / "doc").mkdir(parents=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "doc" / "small.txt").write_text(f"tree {seed}\n" * 50)
    (root / "sub" / "deeper" / "leaf").write_text(f"leaf of {seed}\n")
    (root / "large.bin").write_bytes(rng.randbytes(large + seed))
    (root / "link").symlink_to("doc/small.txt")
    return root


def dump_nar(tree: Path) -> Path:
    """``nix-store --dump`` of ``tree`` into a file beside it."""
    nar = tree.with_suffix(".nar")
    with nar.open("wb") as out:
        subprocess.run(["nix-store", "--dump", tree], stdout=out, check=True)
    return nar


def read_bounded(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes, in 1 MiB reads (a lying store may claim 2**63 bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        got = 0
        while got < limit and (piece := os.read(fd, min(1 << 20, limit - got))):
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)
    finally:
        os.close(fd)
