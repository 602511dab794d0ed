"""A writer that the crash tests kill with SIGKILL: ``python store_writer.py STORE_DIR COUNT``.

It imports COUNT deterministic store paths (blobs, then directories, then the path info, the
order every importer uses) into the local store at STORE_DIR, skipping those already present,
and prints ``wrote I`` after each path info it committed. Rerun after a kill, it completes.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from tvixfs.castore.digest import EMPTY_DIGEST, b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode, SymlinkNode, node_to_proto
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.base import Store
from tvixfs.store.storepath import StorePath

SHARED = b"the same file in every path\n" * 4000


def store_path(i: int) -> StorePath:
    return StorePath(b3digest(b"item %d" % i)[:20], f"item-{i}")


def item_files(i: int) -> dict[bytes, bytes]:
    """The files of item ``i``: one spanning several chunks, a shared one, a few small ones."""
    rng = random.Random(i)
    files = {b"big": rng.randbytes(rng.randrange(300_000, 2_500_000)), b"shared": SHARED}
    for n in range(6):
        files[b"small-%d" % n] = rng.randbytes(rng.randrange(0, 5000))
    return files


def item_tree(i: int) -> tuple[list[Directory], DirectoryNode]:
    """Directories leaves first and the root node (named by the store path) of item ``i``."""
    files = item_files(i)
    common = Directory(files=(FileNode(b"empty", EMPTY_DIGEST, 0),))
    sub = Directory(
        directories=(DirectoryNode(b"common", common.digest(), common.size()),),
        files=tuple(FileNode(n, b3digest(d), len(d)) for n, d in sorted(files.items()) if n.startswith(b"s")),
    )
    root = Directory(
        directories=(DirectoryNode(b"sub", sub.digest(), sub.size()),),
        files=(FileNode(b"big", b3digest(files[b"big"]), len(files[b"big"]), executable=True),),
        symlinks=(SymlinkNode(b"link", b"sub/shared"),),
    )
    node = DirectoryNode(store_path(i).basename.encode(), root.digest(), root.size())
    return [common, sub, root], node


def write_item(store: Store, i: int) -> None:
    for data in [b"", *item_files(i).values()]:
        store.blobs.put([data[k : k + 65536] for k in range(0, len(data), 65536)])
    directories, node = item_tree(i)
    store.directories.put_many(directories)
    nar_size, nar_sha256 = store.pathinfos.calculate_nar(node)
    store.pathinfos.put(
        pathinfo_pb2.PathInfo(
            node=node_to_proto(node),
            narinfo=pathinfo_pb2.NARInfo(nar_size=nar_size, nar_sha256=nar_sha256),
        )
    )


def main(store_dir: str, count: str) -> None:
    store = open_local_store(Path(store_dir))
    try:
        for i in range(int(count)):
            if store.pathinfos.get(store_path(i).digest) is None:
                write_item(store, i)
                print(f"wrote {i}", flush=True)
    finally:
        store.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
