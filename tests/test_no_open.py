"""Files opened by the kernel without asking (fs/noopen.py), where pyfuse3 and the kernel can.

With the patched pyfuse3 (scripts/install.sh) reading files sends no OPEN and no RELEASE,
only LOOKUP and READ; with a stock one they are sent as before. Either way every byte is
right, and two readers of one file at once (each with its own position) both get it whole.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mounting import TVIXFS, import_tree, mounted, needs_fuse
from test_metrics import metrics_url, requests, scrape

from tvixfs.fs.noopen import PYFUSE3_OFFERS_NO_OPEN


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@needs_fuse
def test_reads_need_no_open_requests(sample_tree: Path, short_tmp: Path) -> None:
    store_dir = short_tmp / "store"
    name = import_tree(store_dir, sample_tree, "sample")
    with mounted(TVIXFS, short_tmp, f"local://{store_dir}", ["--metrics-listen", "127.0.0.1:0"]) as mount:
        url = metrics_url(mount.stderr())
        # Two readers of one large file at once (cold), one from its start, one from its end.
        large = (sample_tree / "large.bin").read_bytes()
        piece = 100_003
        got: dict[str, bytes] = {}

        def forwards() -> None:
            got["forwards"] = mount.path(name, "large.bin").read_bytes()

        def backwards() -> None:
            with mount.path(name, "large.bin").open("rb", buffering=0) as f:
                offsets = range(0, len(large), piece)
                pieces = {o: os.pread(f.fileno(), piece, o) for o in reversed(offsets)}
            got["backwards"] = b"".join(pieces[o] for o in offsets)

        readers = [threading.Thread(target=forwards), threading.Thread(target=backwards)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        assert got == {"forwards": large, "backwards": large}
        files = _files(sample_tree)
        for path in files:
            assert mount.path(name, str(path.relative_to(sample_tree))).read_bytes() == path.read_bytes()
        samples = scrape(url)
        assert requests(samples, "read") >= len(files)
        if PYFUSE3_OFFERS_NO_OPEN:
            assert requests(samples, "open") == requests(samples, "release") == 0
        else:
            assert requests(samples, "open") >= len(files)
