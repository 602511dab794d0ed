"""Trusted keys through a real mount: only store paths whose root node a trusted key signed appear.

Keys are made by Nix; paths are signed by ``tvixfs import --sign-key``. A path that is unsigned,
signed by another key, carries a signature copied from another path, or whose root node a man in
the middle swapped for another path's, must not be visible, and nothing of it may be served.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_sample_tree
from faultstore import Fault, serve_faults
from grpcserver import running_daemon
from mitmproxy import MitmProxy
from mounting import TVIXFS, mounted, needs_fuse
from nixchroot import make_closure, run

from tvixfs.protos import pathinfo_pb2
from tvixfs.services.ingest import ingest_path
from tvixfs.services.local import open_local_store
from tvixfs.services.memory import open_memory_store
from tvixfs.services.trust import load_secret_key, with_trust
from tvixfs.store.storepath import StorePath

pytestmark = needs_fuse


@dataclass(frozen=True)
class Signed:
    store: Path
    key1: str  # public keys, NAME:BASE64
    key2: str
    good: str  # basenames: signed by key1
    other: str  # signed by key2
    plain: str  # unsigned
    copied: str  # unsigned, with good's signatures copied onto it
    tree: Path  # the source of `good`


def _keypair(base: Path, name: str) -> tuple[Path, str]:
    secret, public = base / f"{name}.sec", base / f"{name}.pub"
    run("nix-store", "--generate-binary-cache-key", name, secret, public)
    return secret, public.read_text().strip()


def _import(store: Path, tree: Path, name: str, key: Path | None) -> str:
    sign = ["--sign-key", str(key)] if key is not None else []
    args = [*TVIXFS, "import", "--store", f"local://{store}", "--name", name, *sign, str(tree)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return StorePath.from_absolute(out.strip()).basename


def _tree(base: Path, name: str, text: str) -> Path:
    tree = base / name
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "run").write_text(f"#!/bin/sh\necho {text}\n")
    (tree / "bin" / "run").chmod(0o755)
    (tree / "data").write_bytes(os.urandom(200_000))
    return tree


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    base = tmp_path_factory.mktemp("trust")
    store = base / "store"
    sk1, pk1 = _keypair(base, "one-1")
    sk2, pk2 = _keypair(base, "two-1")
    good_tree = _tree(base, "good", "good")
    good = _import(store, good_tree, "good", sk1)
    other = _import(store, _tree(base, "other", "other"), "other", sk2)
    plain = _import(store, _tree(base, "plain", "plain"), "plain", None)
    copied = _import(store, _tree(base, "copied", "copied"), "copied", None)
    opened = open_local_store(store)
    try:
        source = opened.pathinfos.get(StorePath.from_basename(good).digest)
        target = opened.pathinfos.get(StorePath.from_basename(copied).digest)
        assert source is not None and target is not None
        target.narinfo.signatures.extend(source.narinfo.signatures)
        opened.pathinfos.put(target)
    finally:
        opened.close()
    return Signed(store, pk1, pk2, good, other, plain, copied, good_tree)


def _visible(root: Path, name: str) -> bool:
    try:
        os.lstat(root / name)
    except FileNotFoundError:
        return False
    return True


def _refusals(stderr: str) -> list[str]:
    return [line.split("not showing ", 1)[1] for line in stderr.splitlines() if "not showing " in line]


def test_only_paths_signed_by_a_trusted_key_appear(signed: Signed, short_tmp: Path) -> None:
    store = f"local://{signed.store}"
    with mounted(TVIXFS, short_tmp, store, ["--trusted-public-key", signed.key1, "--list-root"]) as mount:
        root = mount.mountpoint
        assert (root / signed.good / "data").read_bytes() == (signed.tree / "data").read_bytes()
        ran = subprocess.run([root / signed.good / "bin" / "run"], capture_output=True, text=True, check=True)
        assert ran.stdout == "good\n"
        for name in (signed.other, signed.plain, signed.copied):
            assert not _visible(root, name), name
            with pytest.raises(OSError) as e:
                (root / name / "data").read_bytes()
            assert e.value.errno == errno.ENOENT
        assert sorted(os.listdir(root)) == [signed.good]
        stderr = mount.stderr()
    assert "signatures are not checked" not in stderr
    refusals = _refusals(stderr)
    # One line per refused path, whatever the number of lookups, naming the path and why.
    assert sorted(refusals) == sorted(
        [
            f"/nix/store/{signed.other}: no tvixfs root signature by a trusted key (signed by two-1)",
            f"/nix/store/{signed.plain}: no tvixfs root signature",
            f"/nix/store/{signed.copied}: the tvixfs root signature by one-1 does not match this path info",
        ]
    )


def test_several_keys_from_a_file(signed: Signed, short_tmp: Path, tmp_path: Path) -> None:
    keys = tmp_path / "trusted"
    keys.write_text(f"# rotation: both keys for now\n{signed.key1}\n{signed.key2}\n")
    store = f"local://{signed.store}"
    with mounted(TVIXFS, short_tmp, store, ["--trusted-public-keys-file", str(keys)]) as mount:
        assert _visible(mount.mountpoint, signed.good) and _visible(mount.mountpoint, signed.other)
        assert not _visible(mount.mountpoint, signed.plain)
        assert "showing only store paths signed by: one-1, two-1" in mount.stderr()


def test_without_keys_everything_appears_and_one_line_says_so(signed: Signed, short_tmp: Path) -> None:
    with mounted(TVIXFS, short_tmp, f"local://{signed.store}") as mount:
        assert all(_visible(mount.mountpoint, n) for n in (signed.good, signed.plain, signed.copied))
        assert mount.stderr().count("signatures are not checked") == 1


def test_bad_trusted_keys_are_one_line_before_mounting(signed: Signed, short_tmp: Path) -> None:
    for extra, message in (
        (["--trusted-public-key", "one-1:AAAA"], "invalid public key"),
        (["--trusted-public-keys-file", "/nonexistent/keys"], "cannot read public keys /nonexistent/keys"),
        (["--verify-nar-hash"], "--verify-nar-hash needs --trusted-public-key or --trusted-public-keys-file"),
    ):
        mountpoint = short_tmp / "bad"
        mountpoint.mkdir(exist_ok=True)
        args = [*TVIXFS, "mount", "--store", f"local://{signed.store}", *extra, str(mountpoint)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 1
        assert done.stderr.splitlines() == [f"tvixfs: error: {done.stderr.split('error: ', 1)[1].strip()}"]
        assert message in done.stderr


@pytest.mark.parametrize("swap", [False, True])
def test_a_man_in_the_middle_cannot_swap_a_root_node(
    signed: Signed, short_tmp: Path, tmp_path: Path, tvixfs_cmd: list[str], swap: bool
) -> None:
    opened = open_local_store(signed.store)
    try:
        donor = opened.pathinfos.get(StorePath.from_basename(signed.other).digest)
    finally:
        opened.close()
    assert donor is not None
    donor_node = donor.node.directory

    def rewrite(info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        if swap and info.node.directory.name == signed.good.encode():
            # The other path's tree under the victim's name, the victim's signatures kept.
            info.node.directory.digest = donor_node.digest
            info.node.directory.size = donor_node.size
        return info

    with (
        running_daemon(tvixfs_cmd, tmp_path, f"local://{signed.store}") as daemon,
        MitmProxy(daemon.tcp, rewrite) as proxy,
        mounted(TVIXFS, short_tmp, proxy.url, ["--trusted-public-key", signed.key1]) as mount,
    ):
        path = mount.mountpoint / signed.good
        if not swap:
            assert (path / "data").read_bytes() == (signed.tree / "data").read_bytes()
            return
        assert not _visible(mount.mountpoint, signed.good)
        with pytest.raises(FileNotFoundError):
            (path / "bin" / "run").read_bytes()
        assert _refusals(mount.stderr()) == [
            f"/nix/store/{signed.good}: the tvixfs root signature by one-1 does not match this path info"
        ]


def test_a_reordered_chunk_list_is_detected_with_trusted_keys(short_tmp: Path, tmp_path: Path) -> None:
    """The strict xfail of test_mount.py, passing in this mode: the store lists a file's genuine
    chunks in reverse order; with trusted keys no byte of it is served until the list is proven."""
    secret, public = _keypair(tmp_path, "one-1")
    tree = make_sample_tree(tmp_path / "tree")
    store = open_memory_store()
    info = ingest_path(with_trust(store, load_secret_key(secret)), tree, "tree")
    name = StorePath.from_basename(info.node.directory.name).basename
    with (
        serve_faults(store, chunk_size=256 * 1024) as faults,
        mounted(TVIXFS, short_tmp, faults.url, ["--trusted-public-key", public]) as mount,
    ):
        faults.set(Fault("chunk_swap"))
        with pytest.raises(OSError) as e:
            mount.path(name, "large.bin").read_bytes()
        assert e.value.errno == errno.EIO
        assert faults.stats()["fired"]["chunk_swap"] > 0
        faults.clear()
        assert mount.path(name, "large.bin").read_bytes() == (tree / "large.bin").read_bytes()
        assert "chunk 0 of its list is not this part of the blob" in mount.stderr()


@pytest.mark.parametrize("swap", [False, True])
def test_verify_nar_hash_admits_paths_with_only_a_nix_signature(
    tmp_path: Path, short_tmp: Path, tvixfs_cmd: list[str], swap: bool
) -> None:
    closure = make_closure(tmp_path / "nix")
    nix_key = (tmp_path / "nix" / "work" / "key.pub").read_text().strip()
    store = tmp_path / "store"
    args = [
        *TVIXFS,
        "import-nix",
        "--store",
        f"local://{store}",
        "--nix-store",
        closure.uri,
        "-r",
        closure.built,
    ]
    subprocess.run(args, check=True, capture_output=True)
    built, text = (StorePath.from_absolute(p).basename for p in (closure.built, closure.text))
    opened = open_local_store(store)
    try:
        donor = opened.pathinfos.get(StorePath.from_basename(text).digest)
    finally:
        opened.close()
    assert donor is not None

    def rewrite(info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        if swap and info.node.file.name == built.encode():
            info.node.file.digest, info.node.file.size = donor.node.file.digest, donor.node.file.size
        return info

    trusted = ["--trusted-public-key", nix_key]
    with (
        running_daemon(tvixfs_cmd, tmp_path, f"local://{store}") as daemon,
        MitmProxy(daemon.tcp, rewrite) as proxy,
    ):
        # Nix's signature alone does not cover the root node: not shown without --verify-nar-hash.
        with mounted(TVIXFS, short_tmp, proxy.url, trusted) as mount:
            assert not _visible(mount.mountpoint, built)
        with mounted(TVIXFS, short_tmp, proxy.url, [*trusted, "--verify-nar-hash"]) as mount:
            if swap:
                assert not _visible(mount.mountpoint, built)
                assert _refusals(mount.stderr()) == [
                    f"/nix/store/{built}: its tree does not render to the NAR hash and size its Nix "
                    "signature covers"
                ]
            else:
                content = (mount.mountpoint / built).read_text()
                assert content.startswith("/nix/store/") and content.endswith("\n")
                assert "NAR hash verified against its Nix signature" in mount.stderr()
