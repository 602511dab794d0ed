"""Fixtures shared by every test area: real trees, short temp dirs, the installed CLI."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from tvixfs.services.backends.local import open_local_store
from tvixfs.services.base import Store

BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
pytest_plugins = ["loghygiene"]  # unexpected ERROR records or daemon tracebacks fail a test


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of the `fuse` tier (mounting.needs_fuse) need /dev/fuse and root."""
    if os.environ.get("CI") or (os.path.exists("/dev/fuse") and os.geteuid() == 0):
        return
    skip = pytest.mark.skip(reason="real mounts need /dev/fuse and root")
    for item in items:
        if item.get_closest_marker("fuse"):
            item.add_marker(skip)


@pytest.fixture
def tvixfs_cmd() -> list[str]:
    """The installed console script (falls back to ``python -m``-free PATH lookup)."""
    exe = BIN / "tvixfs"
    found = str(exe) if exe.exists() else shutil.which("tvixfs")
    assert found, "tvixfs is not installed: run scripts/install.sh --test"
    return [found]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An embedded store under ``tmp_path``; a test file needing another kind defines its own."""
    opened = open_local_store(tmp_path / "store")
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
async def background() -> AsyncIterator[trio.Nursery]:
    """A nursery for background tasks, cancelled when the test ends."""
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: unix socket addresses are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tvx", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_sample_tree(root: Path, large_size: int = 3 * 1024 * 1024 + 17) -> Path:
    """A tree with every kind of entry Nix distinguishes, and names that trip parsers."""
    root.mkdir(parents=True)
    (root / "bin").mkdir()
    script = root / "bin" / "hello"
    script.write_text("#!/bin/sh\necho hello from tvixfs\n")
    script.chmod(0o755)
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / "share" / "doc").mkdir(parents=True)
    (root / "share" / "doc" / "README").write_text("read me\n" * 100)
    deep = root / "deep"
    for i in range(20):
        deep = deep / f"level{i}"
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("deep\n")
    (root / os.fsdecode(b"non-utf8-\xff\xfe")).write_bytes(b"latin1 name\n")
    (root / "unicode-\u00e9\u4e2d").write_text("unicode name\n")
    (root / "link-to-readme").symlink_to("share/doc/README")
    (root / "dangling").symlink_to("does/not/exist")
    (root / "abs-link").symlink_to("/etc/hostname")
    (root / "large.bin").write_bytes(os.urandom(large_size))
    (root / "repetitive.bin").write_bytes(b"0123456789abcdef" * 300_000)
    return root


@pytest.fixture
def sample_tree(tmp_path: Path) -> Path:
    return make_sample_tree(tmp_path / "sample")
