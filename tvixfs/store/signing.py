"""Signatures over PathInfos: Nix's, and the tvixfs one that binds a store path to its root node.

Nix's fingerprint covers the NAR hash, but a mount never hashes NARs: it trusts the PathInfo's
root node and checks every byte below it by the castore digest chain. So tvixfs signs a second
fingerprint that adds the root node; with it the signature covers every byte the mount serves,
and checking it costs one ed25519 verification per store path, nothing per file.

Both signatures travel in ``narinfo.signatures``, the field every tvix-protocol store keeps. The
tvixfs one is named ``tvixfs-root.<key name>``: Nix (and tvix) look signatures up by key name,
find no key of that name and skip it, so a narinfo carrying it stays valid everywhere. The exact
formats are in docs/SIGNATURES.md.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.store import nixsig
from tvixfs.store.nixsig import PublicKey, SecretKey
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import STORE_DIR

ROOT_PREFIX = "tvixfs-root."
ROOT_VERSION = "tvixfs-root-1"


def nix_fingerprint(info: pathinfo_pb2.PathInfo) -> bytes:
    """Nix's fingerprint of a (valid) PathInfo: needs its narinfo."""
    store_path, _ = validate_pathinfo(info)
    if not info.HasField("narinfo"):
        raise ValidationError(f"{store_path}: no narinfo (NAR hash and size) to sign")
    narinfo = info.narinfo
    refs = (f"{STORE_DIR}/{name}" for name in narinfo.reference_names)
    return nixsig.fingerprint(str(store_path), narinfo.nar_sha256, narinfo.nar_size, refs)


def node_descriptor(node: Node) -> str:
    """The root node's type and content, without its name (the store path already names it)."""
    if isinstance(node, DirectoryNode):
        return f"directory:{node.digest.hex()}:{node.size}"
    if isinstance(node, FileNode):
        return f"file:{node.digest.hex()}:{node.size}:{'x' if node.executable else '-'}"
    return f"symlink:{base64.b64encode(node.target).decode()}"


def root_fingerprint(info: pathinfo_pb2.PathInfo) -> bytes:
    """``tvixfs-root-1;<Nix's fingerprint>;<root node descriptor>``."""
    _, node = validate_pathinfo(info)
    return f"{ROOT_VERSION};".encode() + nix_fingerprint(info) + f";{node_descriptor(node)}".encode()


def sign_pathinfo(info: pathinfo_pb2.PathInfo, key: SecretKey) -> pathinfo_pb2.PathInfo:
    """A copy of ``info`` with Nix's signature and the tvixfs root signature by ``key`` (replacing
    earlier ones of the same names)."""
    nix_message = nix_fingerprint(info)
    root_message = root_fingerprint(info)
    signed = pathinfo_pb2.PathInfo()
    signed.CopyFrom(info)
    ours = {key.name, ROOT_PREFIX + key.name}
    kept = [s for s in signed.narinfo.signatures if s.name not in ours]
    del signed.narinfo.signatures[:]
    signed.narinfo.signatures.extend(kept)
    signed.narinfo.signatures.add(name=key.name, data=key.sign(nix_message))
    signed.narinfo.signatures.add(name=ROOT_PREFIX + key.name, data=key.sign(root_message))
    return signed


def check_root_signature(info: pathinfo_pb2.PathInfo, keys: Mapping[str, PublicKey]) -> str | None:
    """None if a trusted key signed this store path with this root node; else why not."""
    try:
        message = root_fingerprint(info)
    except ValidationError as e:
        return str(e)
    ours = [
        (s.name.removeprefix(ROOT_PREFIX), s.data)
        for s in info.narinfo.signatures
        if s.name.startswith(ROOT_PREFIX)
    ]
    if nixsig.verify(keys, ours, message) is not None:
        return None
    return _why(ours, keys, "tvixfs root signature")


def check_nix_signature(info: pathinfo_pb2.PathInfo, keys: Mapping[str, PublicKey]) -> str | None:
    """None if a trusted key made a valid Nix signature of this path info (``require-sigs``)."""
    try:
        message = nix_fingerprint(info)
    except ValidationError as e:
        return str(e)
    sigs = [(s.name, s.data) for s in info.narinfo.signatures if not s.name.startswith(ROOT_PREFIX)]
    if nixsig.verify(keys, sigs, message) is not None:
        return None
    return _why(sigs, keys, "signature")


def _why(sigs: list[tuple[str, bytes]], keys: Mapping[str, PublicKey], what: str) -> str:
    trusted = sorted({name for name, _ in sigs if name in keys})
    if trusted:
        return f"the {what} by {', '.join(trusted)} does not match this path info"
    if sigs:
        return f"no {what} by a trusted key (signed by {', '.join(sorted({n for n, _ in sigs}))})"
    return f"no {what}"
