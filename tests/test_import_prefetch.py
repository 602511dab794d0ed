"""Issue 18: an import into an embedded store asks the kernel to read files ahead of its reads.

The walk runs a bounded window ahead of the importing thread and issues
``POSIX_FADV_WILLNEED`` for each file in it (``ingest._prefetched``), so that a tree not in
the page cache is read from disk while earlier files are hashed. What must hold: the events
come out exactly as the walk made them, each file is asked for once, before its turn and
never further ahead than the window, and the import still gives what Nix gives.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from nixchroot import nix_add, nix_hash_text, nix_path_info

from tvixfs.importers import ingest
from tvixfs.services.backends.local import open_local_store
from tvixfs.store.nixtext import format_hash
from tvixfs.store.pathinfo import validate_pathinfo

WINDOW_BYTES = 64 << 10
WINDOW_ENTRIES = 16


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """More entries and bytes than the (shrunk) window: small, empty and large files, links."""
    root = tmp_path / "tree"
    for d in range(4):
        sub = root / f"dir{d}"
        sub.mkdir(parents=True)
        for i in range(30):
            (sub / f"f{i:02}").write_bytes(os.urandom(i * 97))
        (sub / "link").symlink_to("f01")
    (root / "big").write_bytes(os.urandom(3 * WINDOW_BYTES + 5))
    (root / "empty").write_bytes(b"")
    return root


@pytest.fixture
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "PREFETCH_BYTES", WINDOW_BYTES)
    monkeypatch.setattr(ingest, "PREFETCH_ENTRIES", WINDOW_ENTRIES)


@pytest.mark.usefixtures("small_window")
def test_prefetch_keeps_the_walk_and_asks_for_each_file_once_ahead(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[bytes, int]] = []
    real_open, real_fadvise = os.open, os.posix_fadvise
    names: dict[int, bytes] = {}

    def opening(path: bytes, flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        names[fd] = path
        return fd

    def advising(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED and offset == 0
        asked.append((names[fd], length))
        real_fadvise(fd, offset, length, advice)

    walked = list(ingest._walk(os.fsencode(tree)))
    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "posix_fadvise", advising)
    out = []
    for event in ingest._prefetched(ingest._walk(os.fsencode(tree))):
        yielded = sum(1 for e in out if isinstance(e, ingest._File) and e.size)
        if isinstance(event, ingest._File) and event.size:
            assert event.path in [path for path, _ in asked]  # before its turn
        assert len(asked) <= yielded + 1 + WINDOW_ENTRIES  # and never further ahead than the window
        out.append(event)
    assert out == walked
    files = [e for e in walked if isinstance(e, ingest._File) and e.size]
    assert [path for path, _ in asked] == [f.path for f in files]
    assert [length for _, length in asked] == [min(f.size, WINDOW_BYTES) for f in files]


@pytest.mark.nix
@pytest.mark.usefixtures("small_window")
def test_import_with_prefetch_is_what_nix_makes(tree: Path, tmp_path: Path) -> None:
    store = open_local_store(tmp_path / "store")
    try:
        info = ingest.ingest_path(store, tree, "tree")
    finally:
        store.close()
    expected = nix_add(tmp_path / "nix", tree)
    assert str(validate_pathinfo(info)[0]) == expected
    nix = nix_path_info(tmp_path / "nix", [expected])[expected]
    assert info.narinfo.nar_size == nix["narSize"]
    assert format_hash(info.narinfo.nar_sha256) == nix_hash_text(nix["narHash"])


def test_a_file_gone_before_its_turn_is_reported_by_its_read(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk saw the file, it is gone when the window reaches it: prefetch passes over it,
    the file's own read reports it in one clear error, and no store path is made."""
    gone = tree / "dir1" / "f07"
    walk = ingest._walk

    def walk_then_delete(path: bytes) -> Iterator[ingest._Event]:
        for event in walk(path):
            if isinstance(event, ingest._File) and event.path == os.fsencode(gone):
                gone.unlink()  # after the walk's lstat, before the prefetch's open
            yield event

    monkeypatch.setattr(ingest, "_walk", walk_then_delete)
    store = open_local_store(tmp_path / "store")
    try:
        with pytest.raises(ingest.IngestError, match=f"cannot import {gone}: No such file"):
            ingest.ingest_path(store, tree, "tree")
        assert list(store.pathinfos.list()) == []
    finally:
        store.close()
