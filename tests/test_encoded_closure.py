"""A recursive directory Get served from the stored encodings (services/encodedclosure.py):
the same directories in the same order as the parsed path, checked, over a real server."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tvixfs.castore.nodes import node_from_proto
from tvixfs.importers.ingest import ingest_path
from tvixfs.protos import castore_pb2, rpc_directory_pb2, rpc_directory_pb2_grpc
from tvixfs.server.serve import start_server
from tvixfs.services.backends.grpc import open_grpc_store
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.localdb import DB_NAME
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import Store
from tvixfs.services.encodedclosure import EncodedClosures
from tvixfs.services.errors import CorruptDataError, NotFoundError
from tvixfs.services.meteredstore import metered
from tvixfs.services.metrics import Metrics


def _tree(root: Path) -> Path:
    """Directories nested three deep, two of them identical (one stored directory, two refs)."""
    rng = random.Random(15)
    tree = root / "tree"
    for sub in ("a/b/c", "a/d", "e", "same1/x", "same2/x"):
        (tree / sub).mkdir(parents=True)
    for sub in ("a", "a/b", "a/b/c", "a/d", "e"):
        (tree / sub / "f").write_bytes(rng.randbytes(rng.randrange(1, 5000)))
    for same in ("same1", "same2"):
        (tree / same / "x" / "g").write_bytes(b"same")
    return tree


@pytest.fixture
def stored(short_tmp: Path) -> Iterator[tuple[Store, bytes]]:
    store = open_local_store(short_tmp / "store")
    try:
        info = ingest_path(store, str(_tree(short_tmp)), "tree")
        yield store, node_from_proto(info.node).digest
    finally:
        store.close()


def test_the_same_closure_as_parsed(stored: tuple[Store, bytes]) -> None:
    store, root = stored
    assert isinstance(store.directories, EncodedClosures)
    parsed = [d.to_bytes() for d in store.directories.get_recursive(root)]
    assert store.directories.get_recursive_encoded(root) == parsed
    assert len(parsed) == 8  # tree, a, a/b, a/b/c, a/d, e, same*, x (stored once)


def test_over_a_real_server(stored: tuple[Store, bytes], short_tmp: Path) -> None:
    """The tvixfs client and a plain stub both get the closure root first, as stored."""
    store, root = stored
    running = start_server(store, [f"unix:{short_tmp / 's.sock'}"], threads=8)
    remote = open_grpc_store(running.addresses[0])
    try:
        assert list(remote.directories.get_recursive(root)) == list(store.directories.get_recursive(root))
        with grpc.insecure_channel(running.addresses[0]) as channel:
            stub = rpc_directory_pb2_grpc.DirectoryServiceStub(channel)
            request = rpc_directory_pb2.GetDirectoryRequest(digest=root, recursive=True)
            received = [m.SerializeToString(deterministic=True) for m in stub.Get(request)]
        assert received == store.directories.get_recursive_encoded(root)
    finally:
        remote.close()
        running.stop(None)


def test_offered_through_the_metrics_wrapper(stored: tuple[Store, bytes]) -> None:
    """A daemon with --metrics-listen serves its store through ``metered``: still encoded, and
    counted as the recursive Get it is; a store without it stays without it."""
    store, root = stored
    metrics = Metrics()
    wrapped = metered(store, metrics).directories
    assert isinstance(wrapped, EncodedClosures)
    assert wrapped.get_recursive_encoded(root) == store.directories.get_recursive_encoded(root)
    counted = metrics.registry.get_sample_value(
        "tvixfs_store_call_seconds_count", {"service": "directory", "method": "get_recursive"}
    )
    assert counted == 1
    assert not isinstance(metered(open_memory_store(), Metrics()).directories, EncodedClosures)


def _stored_rows(store_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(store_dir / DB_NAME)


def test_a_damaged_or_missing_directory_is_corrupt_data(stored: tuple[Store, bytes], short_tmp: Path) -> None:
    store, root = stored
    assert isinstance(store.directories, EncodedClosures)
    with pytest.raises(NotFoundError):
        store.directories.get_recursive_encoded(bytes(32))
    child = castore_pb2.Directory.FromString(store.directories.get_recursive_encoded(root)[0]).directories[0]
    with _stored_rows(short_tmp / "store") as db:
        (data,) = db.execute("SELECT data FROM directories WHERE digest = ?", (child.digest,)).fetchone()
        db.execute("UPDATE directories SET data = ? WHERE digest = ?", (bytes(data) + b"\x00", child.digest))
    db.close()
    with pytest.raises(CorruptDataError, match="does not match its digest"):
        store.directories.get_recursive_encoded(root)
    with _stored_rows(short_tmp / "store") as db:
        db.execute("DELETE FROM directories WHERE digest = ?", (child.digest,))
    db.close()
    with pytest.raises(CorruptDataError, match="lacks subdirectory"):
        store.directories.get_recursive_encoded(root)
