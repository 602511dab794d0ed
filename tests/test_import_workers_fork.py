"""An import's forked chunk workers must not wait on the importer's BLAKE3 threads.

blake3 hashes inputs of 1 MiB and more on a thread pool. A process that used it (any import
that hashed one big chunk inline) and then forked its chunk workers handed them the pool's
bookkeeping without its threads: a worker hashing a 1 MiB chunk waited forever, and the
import hung. Data without cut points (zeros) makes every chunk 1 MiB.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from pathlib import Path
from tvixfs.castore.digest import b3digest
from tvixfs.importers.ingest import ingest_path
from tvixfs.services.backends.local import open_local_store

b3digest(bytes(2 << 20))  # this process's blake3 thread pool starts
base = Path(sys.argv[1])
store = open_local_store(base / "store")
try:
    print(ingest_path(store, str(base / "tree"), "zeros").node.directory.name.decode())
finally:
    store.close()
"""


def test_workers_forked_after_threaded_hashing_finish(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "zeros").write_bytes(bytes(40 << 20))  # big enough for workers, all 1 MiB chunks
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("-zeros")
