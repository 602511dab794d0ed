"""The mount's view of path infos (``services/rootnodes.py``): validated root nodes with their
NAR facts and references, and the signature policy applied per store path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tvixfs.castore.nodes import Node
from tvixfs.importers.ingest import ingest_path
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import Store
from tvixfs.services.narhash import store_nar_hash
from tvixfs.services.rootnodes import RootNodes
from tvixfs.services.trust import with_trust
from tvixfs.store import nixsig
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.signing import nix_fingerprint

KEY = nixsig.SecretKey("test-1", os.urandom(32))
OTHER = nixsig.SecretKey("test-1", os.urandom(32))  # the same name, another key
TRUSTED = {KEY.name: KEY.public}


def _tree(tmp_path: Path, text: bytes) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "file").write_bytes(text)
    return tree


def _imported(store: Store, tmp_path: Path, text: bytes = b"hello\n") -> pathinfo_pb2.PathInfo:
    return ingest_path(store, str(_tree(tmp_path, text)), "tree")


def test_a_stored_path_gives_its_validated_root(tmp_path: Path) -> None:
    store = open_memory_store()
    info = _imported(store, tmp_path)
    store_path, node = validate_pathinfo(info)
    root, untrusted = RootNodes(store.pathinfos).get(store_path.digest)
    assert root is not None and untrusted is None
    assert (root.store_path, root.node, root.name) == (store_path, node, node.name)
    assert (root.nar_size, root.nar_sha256) == (info.narinfo.nar_size, info.narinfo.nar_sha256)
    assert root.references == ()
    assert RootNodes(store.pathinfos).get(bytes(20)) == (None, None)
    listed = [entry for entry, _ in RootNodes(store.pathinfos).list()]
    assert listed == [root]


def test_only_paths_signed_by_a_trusted_key_are_trusted(tmp_path: Path) -> None:
    store = open_memory_store()
    unsigned, _ = validate_pathinfo(_imported(store, tmp_path, b"unsigned\n"))
    signed, _ = validate_pathinfo(_imported(with_trust(store, KEY), tmp_path, b"signed\n"))
    by_other, _ = validate_pathinfo(_imported(with_trust(store, OTHER), tmp_path, b"other\n"))
    nodes = RootNodes(store.pathinfos, trusted_keys=TRUSTED)
    assert nodes.get(signed.digest)[1] is None
    assert nodes.get(unsigned.digest)[1] is not None
    assert nodes.get(by_other.digest)[1] is not None
    untrusted = {entry.store_path: why for entry, why in nodes.list() if not isinstance(entry, Exception)}
    assert untrusted[signed] is None
    assert untrusted[unsigned] is not None and untrusted[by_other] is not None


@pytest.mark.parametrize("renders_right", [True, False])
def test_a_nix_signature_counts_once_the_tree_renders_to_its_nar(tmp_path: Path, renders_right: bool) -> None:
    store = open_memory_store()
    info = _imported(store, tmp_path)
    nix_signed = pathinfo_pb2.PathInfo()
    nix_signed.CopyFrom(info)
    nix_signed.narinfo.signatures.add(name=KEY.name, data=KEY.sign(nix_fingerprint(info)))
    store.pathinfos.put(nix_signed)
    store_path, _ = validate_pathinfo(info)
    checked: list[Node] = []

    def nar_check(node: Node) -> tuple[int, bytes]:
        checked.append(node)
        size, sha256 = store_nar_hash(node, store.blobs, store.directories)
        return (size, sha256) if renders_right else (size + 1, sha256)

    assert RootNodes(store.pathinfos, trusted_keys=TRUSTED).get(store_path.digest)[1] is not None
    root, untrusted = RootNodes(store.pathinfos, trusted_keys=TRUSTED, nar_check=nar_check).get(
        store_path.digest
    )
    assert root is not None and checked == [root.node]
    assert (untrusted is None) == renders_right
