"""Listings of store paths cached by the kernel (fs/dircache.py), where pyfuse3 can ask for it.

With the patched pyfuse3 (scripts/install.sh), a warm walk sends no readdir at all; with a
stock one it sends them as before. Either way the listings are right, and the mount root's
listing (``--list-root``), which grows as paths are added, is never cached.
"""

from __future__ import annotations

import os
from pathlib import Path

from mounting import TVIXFS, import_tree, mounted, needs_fuse
from test_metrics import metrics_url, requests, scrape

from tvixfs.fs.dircache import KERNEL_CACHES_READDIR


def _listing(root: Path) -> list[tuple[str, list[str], list[str]]]:
    return sorted((os.path.relpath(p, root), sorted(d), sorted(f)) for p, d, f in os.walk(root))


@needs_fuse
def test_a_warm_walk_reads_listings_from_the_kernel(sample_tree: Path, short_tmp: Path) -> None:
    store_dir = short_tmp / "store"
    name = import_tree(store_dir, sample_tree, "sample")
    extra = ["--metrics-listen", "127.0.0.1:0"]
    with mounted(TVIXFS, short_tmp, f"local://{store_dir}", extra) as mount:
        url = metrics_url(mount.stderr())
        expected = _listing(sample_tree)
        assert _listing(mount.path(name)) == expected
        before = scrape(url)
        assert _listing(mount.path(name)) == expected
        after = scrape(url)
        warm_readdirs = requests(after, "readdir") - requests(before, "readdir")
        if KERNEL_CACHES_READDIR:
            assert warm_readdirs == 0
        else:
            assert warm_readdirs >= len(expected)
        assert requests(after, "opendir") - requests(before, "opendir") >= len(expected)


@needs_fuse
def test_the_root_listing_is_never_cached(sample_tree: Path, tmp_path: Path, short_tmp: Path) -> None:
    store_dir = short_tmp / "store"
    first = import_tree(store_dir, sample_tree, "first")
    with mounted(TVIXFS, short_tmp, f"local://{store_dir}", ["--list-root"]) as mount:
        assert os.listdir(mount.mountpoint) == [first]
        (tmp_path / "second").write_text("added while mounted\n")
        second = import_tree(store_dir, tmp_path / "second", "second")
        assert sorted(os.listdir(mount.mountpoint)) == sorted([first, second])
