"""The pure model against the public vectors and every validation rule of PROTOCOL.md."""

from __future__ import annotations

import blake3
import pytest

from tvixfs.castore.digest import EMPTY_DIGEST, b3digest, check_digest, format_digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import (
    DirectoryNode,
    FileNode,
    SymlinkNode,
    node_from_proto,
    node_to_proto,
    rename,
)
from tvixfs.protos import castore_pb2, pathinfo_pb2
from tvixfs.store import nixbase32
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import STORE_DIR, StorePath, compress_hash


def split_store_path(path: str) -> tuple[StorePath, str]:
    """``/nix/store/<hash>-<name>/sub/path`` (or the basename form) -> (store path, subpath)."""
    rest = path.removeprefix(STORE_DIR + "/").strip("/")
    base, _, sub = rest.partition("/")
    return StorePath.from_basename(base), sub


D = b3digest(b"some blob")
HELLO_PATH = "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432"


def test_blake3_vectors() -> None:
    assert b3digest(b"") == EMPTY_DIGEST
    assert b3digest(b"Hello World!").hex() == (
        "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"
    )
    big = bytes(range(256)) * 8192  # above the multithreading threshold: same digest
    assert b3digest(big) == blake3.blake3(big).digest()


def test_directory_digest_vectors() -> None:
    assert Directory().digest() == EMPTY_DIGEST
    keep = Directory(files=(FileNode(b".keep", EMPTY_DIGEST, 0),))
    assert keep.digest().hex() == "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"


def test_directory_digest_ignores_unknown_fields() -> None:
    keep = Directory(files=(FileNode(b".keep", EMPTY_DIGEST, 0),))
    # Field 15, varint 1: unknown to the schema; the canonical form drops it.
    wire = keep.to_bytes() + b"\x78\x01"
    assert Directory.from_bytes(wire).digest() == keep.digest()


def test_check_digest_and_format() -> None:
    assert check_digest(D) == D
    with pytest.raises(ValidationError, match="expected 32 bytes, got 31"):
        check_digest(D[:31])
    assert format_digest(EMPTY_DIGEST) == "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI="


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (b"", "empty name"),
        (b".", "invalid name"),
        (b"..", "invalid name"),
        (b"a/b", "'/' or NUL"),
        (b"a\0b", "'/' or NUL"),
        (b"x" * 256, "longer than 255"),
    ],
)
def test_invalid_names_rejected(name: bytes, reason: str) -> None:
    msg = castore_pb2.Directory(files=[castore_pb2.FileNode(name=name, digest=D, size=1)])
    with pytest.raises(ValidationError, match=reason):
        Directory.from_proto(msg)


def test_name_limits_accepted() -> None:
    Directory.from_proto(
        castore_pb2.Directory(files=[castore_pb2.FileNode(name=b"x" * 255, digest=D, size=1)])
    )
    Directory.from_proto(
        castore_pb2.Directory(files=[castore_pb2.FileNode(name=b"\xff\xfe...", digest=D, size=1)])
    )


@pytest.mark.parametrize(
    ("target", "reason"),
    [(b"", "empty symlink target"), (b"a\0", "NUL"), (b"x" * 4096, "longer than 4095")],
)
def test_invalid_symlink_targets(target: bytes, reason: str) -> None:
    msg = castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name=b"l", target=target)])
    with pytest.raises(ValidationError, match=reason):
        Directory.from_proto(msg)


def test_digest_lengths_checked() -> None:
    for msg in (
        castore_pb2.Directory(directories=[castore_pb2.DirectoryNode(name=b"d", digest=b"x")]),
        castore_pb2.Directory(files=[castore_pb2.FileNode(name=b"f", digest=D + b"!")]),
    ):
        with pytest.raises(ValidationError, match="expected 32 bytes"):
            Directory.from_proto(msg)


def test_sorting_and_uniqueness() -> None:
    unsorted = castore_pb2.Directory(
        files=[
            castore_pb2.FileNode(name=b"b", digest=D, size=1),
            castore_pb2.FileNode(name=b"a", digest=D, size=1),
        ]
    )
    with pytest.raises(ValidationError, match="not sorted"):
        Directory.from_proto(unsorted)
    duplicate_in_list = castore_pb2.Directory(
        files=[
            castore_pb2.FileNode(name=b"a", digest=D, size=1),
            castore_pb2.FileNode(name=b"a", digest=D, size=1),
        ]
    )
    with pytest.raises(ValidationError, match="not sorted by name or duplicated"):
        Directory.from_proto(duplicate_in_list)
    across_lists = castore_pb2.Directory(
        directories=[castore_pb2.DirectoryNode(name=b"a", digest=EMPTY_DIGEST)],
        symlinks=[castore_pb2.SymlinkNode(name=b"a", target=b"t")],
    )
    with pytest.raises(ValidationError, match="duplicate name b'a' across"):
        Directory.from_proto(across_lists)
    # Sorting is bytewise, not by code point or locale.
    Directory.from_proto(
        castore_pb2.Directory(
            files=[
                castore_pb2.FileNode(name=b"Z", digest=D, size=1),
                castore_pb2.FileNode(name=b"a", digest=D, size=1),
                castore_pb2.FileNode(name=b"\xc3\xa9", digest=D, size=1),
            ]
        )
    )


def test_undecodable_directory() -> None:
    with pytest.raises(ValidationError, match="undecodable"):
        Directory.from_bytes(b"\x0a\xff")


def test_directory_of_entries_and_size() -> None:
    sub = DirectoryNode(b"sub", EMPTY_DIGEST, 0)
    f = FileNode(b"a", D, 9, executable=True)
    link = SymlinkNode(b"z", b"a")
    directory = Directory.of([link, f, sub])
    assert [n.name for n in directory.entries()] == [b"a", b"sub", b"z"]
    assert directory.size() == 3
    assert Directory.from_bytes(directory.to_bytes()) == directory


def test_node_round_trip_and_rename() -> None:
    for node in (
        DirectoryNode(b"d", EMPTY_DIGEST, 0),
        FileNode(b"f", D, 9, True),
        SymlinkNode(b"s", b"/target"),
    ):
        assert node_from_proto(node_to_proto(node)) == node
        assert rename(node, b"other").name == b"other"
    with pytest.raises(ValidationError, match="none of"):
        node_from_proto(castore_pb2.Node())


def test_nixbase32_vector_and_errors() -> None:
    raw = bytes.fromhex("8a12321522fd91efbd60ebb2481af88580f61600")
    assert nixbase32.encode(raw) == "00bgd045z0d4icpbc2yyz4gx48ak44la"
    assert nixbase32.decode("00bgd045z0d4icpbc2yyz4gx48ak44la") == raw
    assert nixbase32.encode(b"") == ""
    with pytest.raises(ValidationError, match="character 'e'"):
        nixbase32.decode("00bgd045z0d4icpbc2yyz4gx48ak44le")
    with pytest.raises(ValidationError, match="length"):
        nixbase32.decode("0")
    # 32 chars carry 160 bits: exactly 20 bytes, so the top character is limited.
    with pytest.raises(ValidationError, match="bits set beyond"):
        nixbase32.decode("z" * 52)


def test_store_path_parsing() -> None:
    path = StorePath.from_basename(HELLO_PATH)
    assert path.name == "net-tools-1.60_p20170221182432"
    assert path.digest.hex() == "8a12321522fd91efbd60ebb2481af88580f61600"
    assert path.absolute == "/nix/store/" + HELLO_PATH
    assert StorePath.from_absolute("/nix/store/" + HELLO_PATH + "/") == path
    assert split_store_path(f"/nix/store/{HELLO_PATH}/bin/ls") == (path, "bin/ls")


@pytest.mark.parametrize(
    "bad",
    [
        "00bgd045z0d4icpbc2yyz4gx48ak44la",  # no name
        "00bgd045z0d4icpbc2yyz4gx48ak44la-",  # empty name
        "00bgd045z0d4icpbc2yyz4gx48ak44la-.hidden",
        "00bgd045z0d4icpbc2yyz4gx48ak44la-a b",
        "00bgd045z0d4icpbc2yyz4gx48ak44la-" + "x" * 212,
        "00bgd045z0d4icpbc2yyz4gx48ak44le-name",  # 'e' is not nixbase32
        "00bgd045z0d4icpbc2yyz4gx48ak44l-name",  # 31 chars
        "00bgd045z0d4icpbc2yyz4gx48ak44la_name",
    ],
)
def test_invalid_store_paths(bad: str) -> None:
    with pytest.raises(ValidationError):
        StorePath.from_basename(bad)


def test_store_path_rejects_non_ascii_and_foreign_dirs() -> None:
    with pytest.raises(ValidationError, match="ASCII"):
        StorePath.from_basename(b"\xff" * 40)
    with pytest.raises(ValidationError, match="not in /nix/store"):
        StorePath.from_absolute("/gnu/store/" + HELLO_PATH)
    with pytest.raises(ValidationError, match="subpath"):
        StorePath.from_absolute(f"/nix/store/{HELLO_PATH}/bin")


def test_compress_hash() -> None:
    digest = bytes(range(32))
    folded = [digest[i] ^ (digest[i + 20] if i + 20 < 32 else 0) for i in range(20)]
    assert compress_hash(digest) == bytes(folded)


def _pathinfo(
    reference_names: tuple[str, ...] = (HELLO_PATH,),
    signatures: tuple[pathinfo_pb2.NARInfo.Signature, ...] = (),
) -> pathinfo_pb2.PathInfo:
    return pathinfo_pb2.PathInfo(
        node=castore_pb2.Node(
            directory=castore_pb2.DirectoryNode(name=HELLO_PATH.encode(), digest=EMPTY_DIGEST)
        ),
        references=[StorePath.from_basename(HELLO_PATH).digest],
        narinfo=pathinfo_pb2.NARInfo(
            nar_size=120,
            nar_sha256=bytes(32),
            reference_names=reference_names,
            signatures=signatures,
        ),
    )


def test_valid_pathinfo() -> None:
    path, node = validate_pathinfo(_pathinfo())
    assert path.basename == HELLO_PATH
    assert isinstance(node, DirectoryNode)


def test_pathinfo_rules() -> None:
    with pytest.raises(ValidationError, match="no root node"):
        validate_pathinfo(pathinfo_pb2.PathInfo())
    bad_name = _pathinfo()
    bad_name.node.directory.name = b"not-a-store-path"
    with pytest.raises(ValidationError, match="not a store path basename"):
        validate_pathinfo(bad_name)
    short_ref = _pathinfo()
    short_ref.references[0] = b"x" * 19
    with pytest.raises(ValidationError, match="reference 0: expected 20 bytes"):
        validate_pathinfo(short_ref)
    with pytest.raises(ValidationError, match="1 references but 0 reference_names"):
        validate_pathinfo(_pathinfo(reference_names=()))
    other = "11bgd045z0d4icpbc2yyz4gx48ak44la-other"
    with pytest.raises(ValidationError, match="does not match references"):
        validate_pathinfo(_pathinfo(reference_names=(other,)))
    bad_sha = _pathinfo()
    bad_sha.narinfo.nar_sha256 = b"x" * 31
    with pytest.raises(ValidationError, match="nar_sha256: expected 32 bytes"):
        validate_pathinfo(bad_sha)
    sig = pathinfo_pb2.NARInfo.Signature(name="cache.example.org-1", data=b"s" * 63)
    with pytest.raises(ValidationError, match="signature 0"):
        validate_pathinfo(_pathinfo(signatures=(sig,)))
    bad_deriver = _pathinfo()
    bad_deriver.narinfo.deriver.name = "x.drv"
    bad_deriver.narinfo.deriver.digest = b"d" * 20
    validate_pathinfo(bad_deriver)
    bad_deriver.narinfo.deriver.name = ".drv"
    with pytest.raises(ValidationError, match="deriver"):
        validate_pathinfo(bad_deriver)
