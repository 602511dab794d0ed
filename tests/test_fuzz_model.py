"""Property tests of the pure model on hostile input: whatever bytes arrive, the only failure is
ValidationError; whatever is accepted survives a round trip unchanged; a NAR that is accepted
is exactly the NAR its parse renders to (so no two NARs parse to the same tree).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import string
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_model import split_store_path

from tvixfs.castore.digest import EMPTY_DIGEST, b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, check_name, rename
from tvixfs.importers.ingest import ingest_nar
from tvixfs.protos import castore_pb2, pathinfo_pb2
from tvixfs.services.backends.memory import MemoryBlobService, MemoryDirectoryService, MemoryPathInfoService
from tvixfs.services.base import Store
from tvixfs.store import nixbase32
from tvixfs.store.nar import nar_hash, read_nar, write_nar
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import StorePath

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

# TVIXFS_FUZZ_SCALE=100 turns this minute-long check into a fuzzing campaign.
SCALE = int(os.environ.get("TVIXFS_FUZZ_SCALE", "1"))
FAST = settings(max_examples=500 * SCALE, deadline=None)
SLOW = settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WITH_NIX = settings(max_examples=40 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- nixbase32 ---------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=64))
@example(bytes.fromhex("8a12321522fd91efbd60ebb2481af88580f61600"))
def test_nixbase32_round_trip(data: bytes) -> None:
    text = nixbase32.encode(data)
    assert len(text) == nixbase32.encoded_len(len(data))
    assert set(text) <= set(nixbase32.ALPHABET)
    assert nixbase32.decode(text) == data


@FAST
@given(st.one_of(st.text(max_size=60), st.text(alphabet=nixbase32.ALPHABET + "eotu", max_size=60)))
def test_nixbase32_decode_garbage(text: str) -> None:
    try:
        data = nixbase32.decode(text)
    except ValidationError:
        return
    assert nixbase32.encode(data) == text, "two texts decode to the same bytes"


# -- store paths -------------------------------------------------------------------------------

NAME_CHARS = string.ascii_letters + string.digits + "+-._?="
valid_names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=211).filter(lambda n: not n.startswith("."))
valid_paths = st.builds(StorePath, st.binary(min_size=20, max_size=20), valid_names)


@FAST
@given(valid_paths)
def test_valid_store_paths_round_trip(path: StorePath) -> None:
    assert StorePath.from_basename(path.basename) == path
    assert StorePath.from_basename(path.basename.encode()) == path
    assert StorePath.from_absolute(path.absolute + "/") == path
    assert split_store_path(path.absolute + "/bin/x") == (path, "bin/x")


def mutate_text(text: str, data: st.DataObject) -> str:
    at = data.draw(st.integers(0, len(text)))
    insert = data.draw(st.text(max_size=3))
    cut = data.draw(st.integers(0, 3))
    return text[:at] + insert + text[at + cut :]


@FAST
@given(st.one_of(st.text(max_size=250), valid_paths.map(lambda p: p.basename)), st.data())
def test_store_path_garbage_is_a_validation_error(text: str, data: st.DataObject) -> None:
    text = mutate_text(text, data) if data.draw(st.booleans()) else text
    for parse in (StorePath.from_basename, StorePath.from_absolute, split_store_path):
        try:
            parsed = parse(text)
        except ValidationError:
            continue
        path = parsed[0] if isinstance(parsed, tuple) else parsed
        assert StorePath.from_basename(path.basename) == path
        assert path.basename in text
    try:
        path = StorePath.from_basename(text.encode("utf-8", "surrogateescape"))
    except ValidationError:
        return
    assert path.basename == text


# -- directories -------------------------------------------------------------------------------

BAD_NAMES = [b"", b".", b"..", b"a/b", b"/", b"a\0", b"x" * 256]
names = st.one_of(st.binary(min_size=1, max_size=12), st.sampled_from([*BAD_NAMES, b"a", b"b"]))
digests = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40))
sizes = st.integers(0, 2**64 - 1)
dir_nodes = st.builds(castore_pb2.DirectoryNode, name=names, digest=digests, size=sizes)
file_nodes = st.builds(castore_pb2.FileNode, name=names, digest=digests, size=sizes, executable=st.booleans())
symlink_nodes = st.builds(
    castore_pb2.SymlinkNode, name=names, target=st.one_of(st.binary(max_size=8), st.just(b"x" * 4096))
)


@st.composite
def directory_messages(draw: st.DrawFn) -> castore_pb2.Directory:
    lists: list[list[Any]] = [draw(st.lists(n, max_size=5)) for n in (dir_nodes, file_nodes, symlink_nodes)]
    if draw(st.booleans()):  # often sorted, so that valid ones are common
        lists = [sorted(nodes, key=lambda n: n.name) for nodes in lists]
    return castore_pb2.Directory(directories=lists[0], files=lists[1], symlinks=lists[2])


@FAST
@given(directory_messages())
def test_directory_from_proto_accepts_only_valid(message: castore_pb2.Directory) -> None:
    try:
        directory = Directory.from_proto(message)
    except ValidationError:
        return
    every: list[Any] = [*message.directories, *message.files, *message.symlinks]
    assert len({n.name for n in every}) == len(every)
    for node in every:
        check_name(node.name)
    # A valid message is canonical already: its digest is the hash of its own encoding.
    assert directory.to_bytes() == message.SerializeToString(deterministic=True)
    assert Directory.from_bytes(directory.to_bytes()) == directory
    assert directory.digest() == b3digest(message.SerializeToString(deterministic=True))
    assert [n.name for n in directory.entries()] == sorted(n.name for n in every)


@FAST
@given(st.binary(max_size=300), st.data())
def test_directory_from_bytes_garbage(data: bytes, draw: st.DataObject) -> None:
    if draw.draw(st.booleans()):  # bytes close to a valid encoding reach deeper
        valid = Directory(
            (DirectoryNode(b"d", EMPTY_DIGEST, 0),),
            (FileNode(b"f", EMPTY_DIGEST, 0, True),),
            (SymlinkNode(b"s", b"t"),),
        ).to_bytes()
        at = draw.draw(st.integers(0, len(valid)))
        data = valid[:at] + data[:4] + valid[at + draw.draw(st.integers(0, 4)) :]
    try:
        directory = Directory.from_bytes(data)
    except ValidationError:
        return
    assert Directory.from_bytes(directory.to_bytes()) == directory
    assert Directory.from_bytes(directory.to_bytes()).digest() == directory.digest()


# -- path infos --------------------------------------------------------------------------------

basenames = st.one_of(valid_paths.map(lambda p: p.basename.encode()), names)
root_nodes = st.one_of(
    st.none(),
    st.builds(castore_pb2.DirectoryNode, name=basenames, digest=digests, size=sizes).map(
        lambda n: castore_pb2.Node(directory=n)
    ),
    st.builds(castore_pb2.FileNode, name=basenames, digest=digests, size=sizes).map(
        lambda n: castore_pb2.Node(file=n)
    ),
    st.builds(castore_pb2.SymlinkNode, name=basenames, target=st.binary(max_size=5)).map(
        lambda n: castore_pb2.Node(symlink=n)
    ),
)
text_basenames = st.one_of(valid_paths.map(lambda p: p.basename), st.text(max_size=40))


@st.composite
def pathinfo_messages(draw: st.DrawFn) -> pathinfo_pb2.PathInfo:
    refs = draw(st.lists(valid_paths, max_size=3))
    info = pathinfo_pb2.PathInfo(references=[r.digest for r in refs])
    if draw(st.booleans()):
        info.references.append(draw(st.binary(max_size=24)))
    node = draw(root_nodes)
    if node is not None:
        info.node.CopyFrom(node)
    if draw(st.booleans()):
        narinfo = info.narinfo
        narinfo.nar_size = draw(sizes)
        narinfo.nar_sha256 = draw(st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40)))
        ref_names = [r.basename for r in refs]
        if draw(st.booleans()):
            ref_names = draw(st.lists(text_basenames, max_size=3))
        narinfo.reference_names.extend(ref_names)
        for _ in range(draw(st.integers(0, 2))):
            narinfo.signatures.add(name=draw(st.text(max_size=10)), data=draw(st.binary(max_size=70)))
        if draw(st.booleans()):
            narinfo.deriver.name = draw(st.one_of(valid_names, st.text(max_size=10)))
            narinfo.deriver.digest = draw(st.binary(max_size=24))
    return info


@FAST
@given(pathinfo_messages())
def test_validate_pathinfo_structured(info: pathinfo_pb2.PathInfo) -> None:
    try:
        store_path, node = validate_pathinfo(info)
    except ValidationError:
        return
    assert node.name == store_path.basename.encode()
    assert all(len(r) == 20 for r in info.references)


@FAST
@given(
    st.one_of(st.binary(max_size=400), pathinfo_messages().map(lambda m: m.SerializeToString())), st.data()
)
def test_validate_pathinfo_from_arbitrary_bytes(data: bytes, draw: st.DataObject) -> None:
    at = draw.draw(st.integers(0, len(data)))
    data = data[:at] + draw.draw(st.binary(max_size=3)) + data[at + draw.draw(st.integers(0, 3)) :]
    info = pathinfo_pb2.PathInfo()
    try:
        info.ParseFromString(data)
    except Exception:  # protobuf's DecodeError: the wire layer's business, not the model's
        return
    with contextlib.suppress(ValidationError):
        validate_pathinfo(info)


# -- NAR ---------------------------------------------------------------------------------------


class Tree:
    """A castore tree in memory: what write_nar reads and read_nar's blobs go to."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {EMPTY_DIGEST: b""}
        self.directories: dict[bytes, Directory] = {}

    def put_blob(self, pieces: Iterable[bytes]) -> bytes:
        data = b"".join(pieces)
        digest = b3digest(data)
        self.blobs[digest] = data
        return digest

    def read_blob(self, digest: bytes) -> list[bytes]:
        return [self.blobs[digest]]

    def get_directory(self, digest: bytes) -> Directory:
        return self.directories[digest]

    def nar(self, node: Node) -> bytes:
        return b"".join(write_nar(node, self.get_directory, self.read_blob))

    def parse(self, nar: bytes) -> Node:
        contents = read_nar(io.BytesIO(nar), b"root", self.put_blob)
        self.directories.update((d.digest(), d) for d in contents.directories)
        assert contents.nar_size == len(nar)
        return contents.root


entry_names = st.binary(min_size=1, max_size=16).filter(lambda n: n not in (b".", b"..") and b"/" not in n)
entry_names = entry_names.filter(lambda n: b"\0" not in n)
# (kind, payload): files are (contents, executable), symlinks targets, directories {name: child}
trees = st.recursive(
    st.one_of(
        st.tuples(st.just("file"), st.tuples(st.binary(max_size=40), st.booleans())),
        st.tuples(st.just("symlink"), st.binary(min_size=1, max_size=30).filter(lambda t: b"\0" not in t)),
    ),
    lambda children: st.tuples(st.just("dir"), st.dictionaries(entry_names, children, max_size=5)),
    max_leaves=20,
)


def build(tree: Tree, name: bytes, spec: tuple[str, Any]) -> Node:
    kind, payload = spec
    if kind == "file":
        data, executable = payload
        return FileNode(name, tree.put_blob([data]), len(data), executable)
    if kind == "symlink":
        return SymlinkNode(name, payload)
    directory = Directory.of([build(tree, n, child) for n, child in payload.items()])
    tree.directories[directory.digest()] = directory
    return DirectoryNode(name, directory.digest(), directory.size())


def materialize(path: bytes, spec: tuple[str, Any]) -> None:
    kind, payload = spec
    if kind == "file":
        data, executable = payload
        Path(os.fsdecode(path)).write_bytes(data)
        os.chmod(path, 0o755 if executable else 0o644)
    elif kind == "symlink":
        os.symlink(payload, path)
    else:
        os.mkdir(path)
        for name, child in payload.items():
            materialize(os.path.join(path, name), child)


@SLOW
@given(trees)
def test_nar_round_trip(spec: tuple[str, Any]) -> None:
    tree = Tree()
    node = build(tree, b"root", spec)
    nar = tree.nar(node)
    assert tree.parse(nar) == node
    assert nar_hash(node, tree.get_directory, tree.read_blob)[0] == len(nar)


@pytest.mark.nix
@WITH_NIX
@given(trees)
def test_nar_matches_nix(spec: tuple[str, Any]) -> None:
    """Rendered NARs are byte for byte what Nix dumps of the same tree on disk."""
    tree = Tree()
    node = build(tree, b"root", spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(os.fsencode(tmp), b"root")
        materialize(path, spec)
        nix = subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True).stdout
    assert tree.nar(node) == nix


def nar_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


@functools.cache
def small_real_nar() -> bytes:
    """``nix-store --dump`` of a small tree with every kind of node (dumped once)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(os.fsencode(tmp), b"t")
        materialize(
            root,
            (
                "dir",
                {
                    b"bin": ("dir", {b"run": ("file", (b"#!/bin/sh\necho hi\n", True))}),
                    b"empty": ("file", (b"", False)),
                    b"empty-dir": ("dir", {}),
                    b"link": ("symlink", b"bin/run"),
                    b"text\xff": ("file", (b"0123456789abcdef" * 5, False)),
                },
            ),
        )
        return subprocess.run(["nix-store", "--dump", root], capture_output=True, check=True).stdout


@st.composite
def mutated_nars(draw: st.DrawFn) -> bytes:
    nar = bytearray(small_real_nar())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(nar)))
        how = draw(st.sampled_from(["flip", "flip", "cut", "insert", "truncate", "length", "duplicate"]))
        if how == "flip" and at < len(nar):
            nar[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del nar[at : at + draw(st.integers(1, 16))]
        elif how == "insert":
            nar[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "truncate":
            del nar[at:]
        elif how == "length":  # rewrite an 8-byte aligned word: lengths are where parsers break
            word = at - at % 8
            nar[word : word + 8] = struct.pack(
                "<Q", draw(st.sampled_from([0, 1, 7, 8, 2**31, 2**63, 2**64 - 1]))
            )
        elif how == "duplicate":
            nar[at:at] = nar[at : at + draw(st.integers(1, 64))]
    return bytes(nar)


KEYWORDS = [b"nix-archive-1", b"(", b")", b"type", b"regular", b"executable", b"contents"]
KEYWORDS += [b"symlink", b"target", b"directory", b"entry", b"name", b"node", b""]


def split_strings(nar: bytes) -> list[bytes]:
    """A valid NAR as the strings it is made of (file contents are framed strings too)."""
    out = []
    at = 0
    while at < len(nar):
        (n,) = struct.unpack_from("<Q", nar, at)
        out.append(nar[at + 8 : at + 8 + n])
        at += 8 + n + (-n % 8)
    return out


@st.composite
def token_nars(draw: st.DrawFn) -> bytes:
    """Valid NARs of random trees with whole strings dropped, repeated, swapped or replaced:
    well framed, so the damage reaches the grammar instead of the framing."""
    tree = Tree()
    strings = split_strings(tree.nar(build(tree, b"x", draw(trees))))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(strings) - 1))
        how = draw(st.sampled_from(["drop", "repeat", "swap", "keyword", "bytes"]))
        if how == "drop":
            del strings[at]
        elif how == "repeat":
            strings.insert(at, strings[at])
        elif how == "swap":
            other = draw(st.integers(0, len(strings) - 1))
            strings[at], strings[other] = strings[other], strings[at]
        elif how == "keyword":
            strings[at] = draw(st.sampled_from(KEYWORDS))
        else:
            strings[at] = draw(st.binary(max_size=12))
        if not strings:
            break
    return b"".join(nar_string(t) for t in strings)


class CountingDirectories(MemoryDirectoryService):
    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put_many(self, directories: Iterable[Directory]) -> bytes:
        self.puts += 1
        return super().put_many(directories)


def check_nar(nar: bytes) -> None:
    """Rejected with ValidationError and nothing but blobs stored, or accepted and canonical."""
    blobs = MemoryBlobService()
    directories = CountingDirectories()
    store = Store(blobs, directories, MemoryPathInfoService(blobs, directories))
    path = StorePath(bytes(20), "fuzz")
    try:
        ingest_nar(store, io.BytesIO(nar), path)
    except ValidationError:
        assert directories.puts == 0
        assert list(store.pathinfos.list()) == []
        return
    assert store.pathinfos.get(path.digest) is not None
    tree = Tree()
    root = tree.parse(nar)
    assert tree.nar(rename(root, b"x")) == nar, "an accepted NAR is not the rendering of its parse"


@pytest.mark.nix
def test_real_nar_is_accepted() -> None:
    check_nar(small_real_nar())


@pytest.mark.nix
@SLOW
@given(st.one_of(mutated_nars(), token_nars(), st.binary(max_size=200)))
def test_nar_reader_on_hostile_bytes(nar: bytes) -> None:
    check_nar(nar)
