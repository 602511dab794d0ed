"""NAR render and parse against real Nix: byte-identical to ``nix-store --dump``, hashes as
``nix-hash`` computes them, and every kind of malformed NAR rejected with a clear reason."""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nixchroot import nix_dump, run

from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import Store
from tvixfs.store import nar, nixbase32
from tvixfs.store.nar import NARError, nar_hash, read_nar, write_nar


def parse_into(store: Store, data: bytes, name: bytes = b"x") -> nar.NarContents:
    contents = read_nar(io.BytesIO(data), name, store.blobs.put)
    if contents.directories:
        store.directories.put_many(contents.directories)
    return contents


def get_directory(store: Store) -> Callable[[bytes], Directory]:
    def get(digest: bytes) -> Directory:
        found = store.directories.get(digest)
        assert found is not None
        return found

    return get


def render(store: Store, node: Node) -> bytes:
    return b"".join(write_nar(node, get_directory(store), store.blobs.read))


def entries_of(sample_tree: Path) -> list[Path]:
    """The tree, each kind of root: directory, plain file, executable, symlinks, empty ones."""
    return [
        sample_tree,
        sample_tree / "share" / "doc" / "README",
        sample_tree / "bin" / "hello",
        sample_tree / "link-to-readme",
        sample_tree / "dangling",
        sample_tree / "empty-file",
        sample_tree / "empty-dir",
        sample_tree / "large.bin",
    ]


@pytest.mark.nix
def test_round_trip_is_byte_identical_to_nix(sample_tree: Path) -> None:
    for path in entries_of(sample_tree):
        dump = nix_dump(path)
        store = open_memory_store()
        contents = parse_into(store, dump)
        assert contents.nar_size == len(dump), path
        assert contents.nar_sha256 == hashlib.sha256(dump).digest(), path
        assert render(store, contents.root) == dump, path


@pytest.mark.nix
def test_nar_hash_equals_nix_hash(sample_tree: Path) -> None:
    store = open_memory_store()
    root = parse_into(store, nix_dump(sample_tree)).root
    size, sha256 = nar_hash(root, get_directory(store), store.blobs.read)
    expected = run("nix-hash", "--type", "sha256", "--base32", sample_tree).strip()
    assert nixbase32.encode(sha256) == expected
    assert size == len(nix_dump(sample_tree))


@pytest.mark.nix
def test_parsed_tree_matches_the_files(sample_tree: Path) -> None:
    store = open_memory_store()
    root = parse_into(store, nix_dump(sample_tree), b"root").root
    assert isinstance(root, DirectoryNode)
    assert root.name == b"root"
    top = {n.name: n for n in get_directory(store)(root.digest)}
    hello = top[b"bin"]
    assert isinstance(hello, DirectoryNode)
    (script,) = get_directory(store)(hello.digest).entries()
    assert isinstance(script, FileNode)
    assert script.executable
    assert b"".join(store.blobs.read(script.digest)) == (sample_tree / "bin" / "hello").read_bytes()
    large = top[b"large.bin"]
    assert isinstance(large, FileNode)
    assert not large.executable
    assert large.digest == b3digest((sample_tree / "large.bin").read_bytes())
    assert top[b"dangling"] == SymlinkNode(b"dangling", b"does/not/exist")
    assert top[b"non-utf8-\xff\xfe"].name == b"non-utf8-\xff\xfe"


@pytest.mark.nix
def test_directories_come_leaves_first(sample_tree: Path) -> None:
    contents = read_nar(io.BytesIO(nix_dump(sample_tree)), b"x", open_memory_store().blobs.put)
    seen: set[bytes] = set()
    for directory in contents.directories:
        assert all(child.digest in seen for child in directory.directories)
        seen.add(directory.digest())
    assert isinstance(contents.root, DirectoryNode)
    assert contents.directories[-1].digest() == contents.root.digest
    assert len(seen) == len(contents.directories)  # each once


@pytest.mark.nix
def test_many_small_files_render_in_few_pieces(tmp_path: Path) -> None:
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(3000):
        (tree / f"f{i:05d}").write_bytes(b"x" * (i % 7))
    dump = nix_dump(tree)
    store = open_memory_store()
    root = parse_into(store, dump).root
    pieces = list(write_nar(root, get_directory(store), store.blobs.read))
    assert b"".join(pieces) == dump
    assert len(pieces) <= len(dump) // nar.PIECE + 1
    assert all(len(p) >= nar.PIECE for p in pieces[:-1])


def _deep_tree(store: Store, depth: int) -> DirectoryNode:
    leaf = store.blobs.put([b"bottom\n"])
    directory = Directory(files=(FileNode(b"f", leaf, 7),))
    chain = [directory]
    for _ in range(depth):
        node = DirectoryNode(b"d", directory.digest(), directory.size())
        directory = Directory(directories=(node,))
        chain.append(directory)
    store.directories.put_many(chain)
    return DirectoryNode(b"root", directory.digest(), directory.size())


def test_depth_is_not_limited_by_recursion() -> None:
    store = open_memory_store()
    root = _deep_tree(store, 3000)
    data = render(store, root)
    again = open_memory_store()
    contents = parse_into(again, data, b"root")
    assert contents.root == root
    assert render(again, contents.root) == data


def _file_store(content: bytes, claimed: int) -> tuple[Store, FileNode]:
    store = open_memory_store()
    return store, FileNode(b"f", store.blobs.put([content]), claimed)


@pytest.mark.parametrize(("content", "claimed"), [(b"12345", 3), (b"12345", 9)])
def test_render_refuses_a_file_of_the_wrong_size(content: bytes, claimed: int) -> None:
    store, node = _file_store(content, claimed)
    out = bytearray()
    with pytest.raises(NARError, match=r"the node says|longer than its size"):
        for piece in write_nar(node, get_directory(store), store.blobs.read):
            out += piece
    header = nar.MAGIC + nar.file_open(claimed, False)
    assert len(out) <= len(header) + claimed  # nothing beyond the declared size ever left


# --- malformed NARs --------------------------------------------------------------------------


def s(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def entry(name: bytes, node: bytes) -> bytes:
    return s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")


def regular(data: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(data) + s(b")")


def directory(*entries: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"directory") + b"".join(entries) + s(b")")


def archive(node: bytes) -> bytes:
    return s(b"nix-archive-1") + node


@pytest.mark.nix
def test_hand_built_nar_matches_nix(tmp_path: Path) -> None:
    """The builders below are right: they reproduce what Nix writes, so the cases test one rule."""
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a").write_bytes(b"hello")
    (tree / "b").write_bytes(b"")
    assert archive(directory(entry(b"a", regular(b"hello")), entry(b"b", regular(b"")))) == nix_dump(tree)


GOOD = archive(directory(entry(b"a", regular(b"hello")), entry(b"b", regular(b"world"))))

MALFORMED = {
    "bad magic": (s(b"nix-archive-2") + regular(b""), "bad magic"),
    "not a NAR at all": (b"hello world, not a NAR", "truncated|bad magic|at most"),
    "empty": (b"", "truncated"),
    "unknown type": (archive(s(b"(") + s(b"type") + s(b"fifo") + s(b")")), "got b'fifo'"),
    "unknown entry keyword": (archive(directory(s(b"entri"))), "got b'entri'"),
    "non-zero padding": (
        archive(
            s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + struct.pack("<Q", 1) + b"x\1" + b"\0" * 6
        ),
        "non-zero padding",
    ),
    "unsorted": (archive(directory(entry(b"b", regular(b"")), entry(b"a", regular(b"")))), "not sorted"),
    "duplicate": (
        archive(directory(entry(b"a", regular(b"")), entry(b"a", regular(b"")))),
        "not sorted or dup",
    ),
    "dot name": (archive(directory(entry(b".", regular(b"")))), "invalid entry name"),
    "dotdot name": (archive(directory(entry(b"..", regular(b"")))), "invalid entry name"),
    "slash in name": (archive(directory(entry(b"a/b", regular(b"")))), "invalid entry name"),
    "NUL in name": (archive(directory(entry(b"a\0b", regular(b"")))), "invalid entry name"),
    "empty name": (archive(directory(entry(b"", regular(b"")))), "invalid entry name"),
    "long name": (archive(directory(entry(b"x" * 256, regular(b"")))), "at most 255"),
    "empty symlink target": (
        archive(s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(b"") + s(b")")),
        "empty symlink target",
    ),
    "executable with a value": (
        archive(s(b"(") + s(b"type") + s(b"regular") + s(b"executable") + s(b"yes") + s(b"contents")),
        "always empty",
    ),
    "absurd keyword length": (s(b"nix-archive-1") + struct.pack("<Q", 1 << 40), "got a string of"),
    "absurd file size": (
        archive(s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + struct.pack("<Q", 1 << 63)),
        "implausible size",
    ),
    "file shorter than declared": (
        archive(s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + struct.pack("<Q", 100) + b"short"),
        "truncated",
    ),
    "missing close": (GOOD[: -len(s(b")"))], "truncated"),
    "trailing garbage": (GOOD + b"\0" * 8, "trailing data"),
    "trailing NAR": (GOOD + GOOD, "trailing data"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_nar_rejected(case: str) -> None:
    data, reason = MALFORMED[case]
    with pytest.raises(NARError, match=reason):
        read_nar(io.BytesIO(data), b"x", open_memory_store().blobs.put)


def _damaged(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[:i]  # truncated
        yield data[:i] + bytes([data[i] ^ 0x41]) + data[i + 1 :]  # one byte changed


@pytest.mark.nix
def test_any_damage_is_a_clean_error_or_a_valid_nar(tmp_path: Path) -> None:
    """No damage to a real NAR crashes the parser: each is NARError or parses as some valid NAR."""
    tree = tmp_path / "small"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "run").write_bytes(b"#!/bin/sh\n")
    (tree / "sub" / "run").chmod(0o755)
    (tree / "data").write_bytes(b"0123456789")
    (tree / "link").symlink_to("sub/run")
    for data in _damaged(nix_dump(tree)):
        try:
            contents = read_nar(io.BytesIO(data), b"x", open_memory_store().blobs.put)
        except NARError:
            continue
        assert contents.nar_size == len(data)
