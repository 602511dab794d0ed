"""The service contract (PROTOCOL.md, services/base.py), run against every backend in BACKENDS."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from backends import BACKENDS, in_order

from tvixfs.castore.digest import EMPTY_DIGEST, b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, node_from_proto, node_to_proto
from tvixfs.importers.ingest import ingest_path
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import ChunkMeta, Store
from tvixfs.services.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PathExistsError,
)
from tvixfs.store.storepath import StorePath

HELLO = b"Hello World!"
HELLO_DIGEST = bytes.fromhex("5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c")


@pytest.fixture(params=list(BACKENDS))
def store(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Store]:
    with BACKENDS[request.param](short_tmp) as opened:
        yield opened


def file_dir(blob: bytes, size: int, name: bytes = b"f") -> Directory:
    return Directory(files=(FileNode(name, blob, size),))


def store_path(name: str, seed: bytes = b"") -> StorePath:
    return StorePath(hashlib.sha1(name.encode() + seed).digest(), name)


def make_pathinfo(
    store: Store, path: StorePath, node: Node, refs: Sequence[StorePath] = ()
) -> pathinfo_pb2.PathInfo:
    """A PathInfo whose NAR facts are true when the content is there (a daemon checks them)."""
    try:
        nar_size, nar_sha256 = store.pathinfos.calculate_nar(node)
    except NotFoundError:
        nar_size, nar_sha256 = 123, bytes(32)
    named = node_to_proto(node)
    kind = named.WhichOneof("node")
    getattr(named, kind).name = path.basename.encode()
    return pathinfo_pb2.PathInfo(
        node=named,
        references=[r.digest for r in refs],
        narinfo=pathinfo_pb2.NARInfo(
            nar_size=nar_size,
            nar_sha256=nar_sha256,
            reference_names=[r.basename for r in refs],
        ),
    )


# --- blobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [[], [b""], [b"", b"", b""]])
def test_empty_blob(store: Store, pieces: list[bytes]) -> None:
    assert store.blobs.put(pieces) == EMPTY_DIGEST
    assert store.blobs.stat(EMPTY_DIGEST) == []
    assert store.blobs.has(EMPTY_DIGEST)
    assert b"".join(store.blobs.read(EMPTY_DIGEST)) == b""


def test_small_blob_matches_the_public_vector(store: Store) -> None:
    assert store.blobs.put([b"Hello", b" ", b"World!"]) == HELLO_DIGEST
    assert store.blobs.stat(HELLO_DIGEST) == []
    assert store.blobs.stat(HELLO_DIGEST, send_chunks=True) == []
    assert b"".join(store.blobs.read(HELLO_DIGEST)) == HELLO
    assert store.blobs.put([HELLO]) == HELLO_DIGEST, "a second put of the same bytes is a no-op"


def test_large_blob_round_trips_and_its_chunks_are_readable(store: Store) -> None:
    data = os.urandom(5 * 1024 * 1024 + 11)
    pieces = [data[i : i + 70_000] for i in range(0, len(data), 70_000)]
    digest = store.blobs.put(pieces)
    assert digest == b3digest(data)
    assert b"".join(store.blobs.read(digest)) == data
    chunks = store.blobs.stat(digest, send_chunks=True)
    assert chunks is not None
    offset = 0
    for chunk in chunks:  # may be empty: "present, not chunked further"
        assert b"".join(store.blobs.read(chunk.digest)) == data[offset : offset + chunk.size]
        offset += chunk.size
    assert offset in (0, len(data))


def test_read_many_answers_each_chunk_once_and_fails_each_alone(store: Store) -> None:
    """Each chunk's bytes or its own error, whatever the store does underneath (one call, calls
    at once, the disk cache); a missing chunk among them fails alone."""
    contents = [b"one", os.urandom(70_000), b"", os.urandom(300)]
    chunks = [ChunkMeta(store.blobs.put([c]), len(c)) for c in contents]
    absent = ChunkMeta(b3digest(b"never stored"), 12)
    *found, missing = in_order(store.blobs.read_many([*chunks, absent]))
    assert found == contents
    assert isinstance(missing, NotFoundError)
    assert in_order(store.blobs.read_many(chunks[:1])) == contents[:1]
    assert in_order(store.blobs.read_many([])) == []


def test_absent_blob(store: Store) -> None:
    absent = b3digest(b"never stored")
    assert store.blobs.stat(absent) is None
    assert store.blobs.stat(absent, send_chunks=True) is None
    assert not store.blobs.has(absent)
    with pytest.raises(NotFoundError):
        b"".join(store.blobs.read(absent))


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33])
def test_blob_digest_of_wrong_length_is_rejected(store: Store, bad: bytes) -> None:
    with pytest.raises(ValidationError):
        store.blobs.stat(bad)
    with pytest.raises(ValidationError):
        b"".join(store.blobs.read(bad))


# --- directories -------------------------------------------------------------------------------


def test_directory_round_trip(store: Store) -> None:
    blob = store.blobs.put([HELLO])
    directory = Directory(
        files=(FileNode(b"hello", blob, len(HELLO), executable=True),),
        symlinks=(SymlinkNode(b"link", b"hello"),),
    )
    assert store.directories.put(directory) == directory.digest()
    assert store.directories.get(directory.digest()) == directory
    assert store.directories.get(b3digest(b"absent")) is None
    assert list(store.directories.get_recursive(directory.digest())) == [directory]


def test_empty_directory_has_the_empty_digest(store: Store) -> None:
    assert store.directories.put(Directory()) == EMPTY_DIGEST
    assert store.directories.get(EMPTY_DIGEST) == Directory()


def test_get_recursive_is_root_first_breadth_first_each_once(store: Store) -> None:
    shared = file_dir(EMPTY_DIGEST, 0, b"leaf")
    s = DirectoryNode(b"s", shared.digest(), shared.size())
    a = Directory(directories=(s,), files=(FileNode(b"fa", EMPTY_DIGEST, 0),))
    b = Directory(directories=(s,), symlinks=(SymlinkNode(b"lb", b"a"),))
    deeper = Directory(directories=(DirectoryNode(b"t", shared.digest(), shared.size()),))
    root = Directory(
        directories=(
            DirectoryNode(b"a", a.digest(), a.size()),
            DirectoryNode(b"b", b.digest(), b.size()),
            DirectoryNode(b"c", deeper.digest(), deeper.size()),
        )
    )
    assert store.directories.put_many([shared, a, b, deeper, root]) == root.digest()
    assert list(store.directories.get_recursive(root.digest())) == [root, a, b, deeper, shared]


def test_get_recursive_of_absent_root(store: Store) -> None:
    with pytest.raises(NotFoundError):
        list(store.directories.get_recursive(b3digest(b"absent")))


def test_put_many_with_missing_child_stores_nothing(store: Store) -> None:
    leaf = file_dir(EMPTY_DIGEST, 0, b"new-leaf")
    orphan_child = file_dir(EMPTY_DIGEST, 0, b"never-sent")
    parent = Directory(
        directories=(
            DirectoryNode(b"missing", orphan_child.digest(), orphan_child.size()),
            DirectoryNode(b"ok", leaf.digest(), leaf.size()),
        )
    )
    with pytest.raises(FailedPreconditionError):
        store.directories.put_many([leaf, parent])
    assert store.directories.get(leaf.digest()) is None
    assert store.directories.get(parent.digest()) is None


def test_put_many_may_refer_to_directories_already_stored(store: Store) -> None:
    leaf = file_dir(EMPTY_DIGEST, 0)
    store.directories.put(leaf)
    parent = Directory(directories=(DirectoryNode(b"d", leaf.digest(), leaf.size()),))
    assert store.directories.put_many([parent]) == parent.digest()


def test_put_many_of_nothing_is_rejected(store: Store) -> None:
    with pytest.raises(InvalidArgumentError):
        store.directories.put_many([])


@pytest.mark.parametrize(
    "bad",
    [
        Directory(files=(FileNode(b"f", b"\x00" * 31, 1),)),
        Directory(files=(FileNode(b"a/b", EMPTY_DIGEST, 0),)),
        Directory(symlinks=(SymlinkNode(b"..", b"x"),)),
        Directory(symlinks=(SymlinkNode(b"l", b""),)),
    ],
    ids=["short-digest", "slash-in-name", "dotdot", "empty-target"],
)
def test_invalid_directory_is_rejected_and_not_stored(store: Store, bad: Directory) -> None:
    good = file_dir(EMPTY_DIGEST, 0, b"good")
    with pytest.raises(InvalidArgumentError):
        store.directories.put_many([good, bad])
    assert store.directories.get(good.digest()) is None
    assert store.directories.get(bad.digest()) is None


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31])
def test_directory_digest_of_wrong_length_is_rejected(store: Store, bad: bytes) -> None:
    with pytest.raises(ValidationError):
        store.directories.get(bad)


# --- path infos --------------------------------------------------------------------------------


def test_pathinfo_put_get_list(store: Store) -> None:
    blob = store.blobs.put([HELLO])
    directory = file_dir(blob, len(HELLO))
    store.directories.put(directory)
    dep = store_path("dep-1.0")
    infos = [
        make_pathinfo(store, store_path("a-file"), FileNode(b"x", blob, len(HELLO))),
        make_pathinfo(
            store, store_path("a-dir"), DirectoryNode(b"x", directory.digest(), directory.size()), [dep]
        ),
        make_pathinfo(store, store_path("a-link"), SymlinkNode(b"x", b"/nix/store/elsewhere")),
    ]
    for info in infos:
        assert store.pathinfos.put(info) == info
    for info in infos:
        path = StorePath.from_basename(node_from_proto(info.node).name)
        assert store.pathinfos.get(path.digest) == info
    listed = sorted(i.SerializeToString(deterministic=True) for i in store.pathinfos.list())
    assert listed == sorted(i.SerializeToString(deterministic=True) for i in infos)
    assert store.pathinfos.get(store_path("absent").digest) is None


def test_a_stored_path_is_never_replaced(store: Store) -> None:
    path = store_path("immutable")
    first = make_pathinfo(store, path, SymlinkNode(b"x", b"one"))
    store.pathinfos.put(first)
    with pytest.raises(PathExistsError, match="never replaced"):
        store.pathinfos.put(make_pathinfo(store, path, SymlinkNode(b"x", b"two")))
    assert store.pathinfos.put(first) == first, "the same put again is a no-op"
    assert list(store.pathinfos.list()) == [first]


def test_a_second_put_adds_signatures(store: Store) -> None:
    path = store_path("signed-later")
    first = make_pathinfo(store, path, SymlinkNode(b"x", b"target"))
    first.narinfo.signatures.add(name="one-1", data=bytes(64))
    store.pathinfos.put(first)
    second = make_pathinfo(store, path, SymlinkNode(b"x", b"target"))
    second.narinfo.signatures.add(name="two-1", data=b"\x01" * 64)
    stored = store.pathinfos.put(second)
    assert [s.name for s in stored.narinfo.signatures] == ["one-1", "two-1"]
    assert store.pathinfos.get(path.digest) == stored


def test_pathinfo_with_missing_root_content_is_refused(store: Store) -> None:
    missing = file_dir(b3digest(b"nope"), 4)
    for node in (
        DirectoryNode(b"x", missing.digest(), missing.size()),
        FileNode(b"x", b3digest(b"absent blob"), 11),
    ):
        info = make_pathinfo(store, store_path("incomplete"), node)
        with pytest.raises(FailedPreconditionError):
            store.pathinfos.put(info)
    assert list(store.pathinfos.list()) == []


def _wrong_name(info: pathinfo_pb2.PathInfo) -> None:
    info.node.symlink.name = b"not-a-store-path"


def _short_nar_hash(info: pathinfo_pb2.PathInfo) -> None:
    info.narinfo.nar_sha256 = bytes(31)


def _reference_names_mismatch(info: pathinfo_pb2.PathInfo) -> None:
    info.references.append(store_path("other").digest)


def _content_address_of_other_content(info: pathinfo_pb2.PathInfo) -> None:
    """A ``fixed:r:sha256`` address that does not give the path's name."""
    info.narinfo.ca.type = pathinfo_pb2.NARInfo.CA.NAR_SHA256
    info.narinfo.ca.digest = info.narinfo.nar_sha256


def _no_node(info: pathinfo_pb2.PathInfo) -> None:
    info.ClearField("node")


def _short_signature(info: pathinfo_pb2.PathInfo) -> None:
    info.narinfo.signatures.add(name="cache.example.org-1", data=bytes(63))


@pytest.mark.parametrize(
    "breakage",
    [
        _wrong_name,
        _short_nar_hash,
        _reference_names_mismatch,
        _content_address_of_other_content,
        _no_node,
        _short_signature,
    ],
)
def test_invalid_pathinfo_is_refused(store: Store, breakage: Callable[[pathinfo_pb2.PathInfo], None]) -> None:
    info = make_pathinfo(store, store_path("broken"), SymlinkNode(b"x", b"target"))
    breakage(info)
    with pytest.raises(InvalidArgumentError):
        store.pathinfos.put(info)
    assert list(store.pathinfos.list()) == []


def nix_dump_hash(path: Path) -> tuple[int, bytes]:
    nar = subprocess.run(["nix-store", "--dump", str(path)], check=True, capture_output=True).stdout
    return len(nar), hashlib.sha256(nar).digest()


@pytest.mark.nix
def test_calculate_nar_matches_nix_store_dump(store: Store, sample_tree: Path) -> None:
    info = ingest_path(store, sample_tree, "sample")
    node = node_from_proto(info.node)
    expected = nix_dump_hash(sample_tree)
    assert store.pathinfos.calculate_nar(node) == expected
    assert store.pathinfos.calculate_nar(node) == expected, "a second (perhaps cached) answer agrees"
    assert (info.narinfo.nar_size, info.narinfo.nar_sha256) == expected


@pytest.mark.nix
def test_calculate_nar_of_a_file_and_a_symlink(store: Store, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_bytes(b"#!/bin/sh\nexit 0\n")
    link = tmp_path / "link"
    link.symlink_to("some/where")
    blob = store.blobs.put([plain.read_bytes()])
    size = plain.stat().st_size
    assert store.pathinfos.calculate_nar(FileNode(b"s", blob, size, True)) == nix_dump_hash(script)
    assert store.pathinfos.calculate_nar(FileNode(b"p", blob, size)) == nix_dump_hash(plain)
    assert store.pathinfos.calculate_nar(SymlinkNode(b"l", b"some/where")) == nix_dump_hash(link)
