"""A PathInfo in the shape ``nix path-info --json`` prints, for ``tvixfs info``."""

from __future__ import annotations

from typing import Any

from tvixfs.protos import pathinfo_pb2
from tvixfs.store.nixtext import format_ca, format_signature, format_sri
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import STORE_DIR, StorePath


def pathinfo_json(info: pathinfo_pb2.PathInfo) -> dict[str, Any]:
    """The fields Nix prints (path, narHash, narSize, references, and ca, deriver, signatures
    when known); ValidationError if the record breaks a rule."""
    store_path, _ = validate_pathinfo(info)
    narinfo = info.narinfo
    out: dict[str, Any] = {
        "path": str(store_path),
        "narHash": format_sri(narinfo.nar_sha256),
        "narSize": narinfo.nar_size,
        "references": sorted(f"{STORE_DIR}/{name}" for name in narinfo.reference_names),
    }
    if narinfo.HasField("ca"):
        out["ca"] = format_ca(narinfo.ca)
    if narinfo.HasField("deriver"):
        out["deriver"] = str(StorePath(narinfo.deriver.digest, narinfo.deriver.name))
    if narinfo.signatures:
        out["signatures"] = [format_signature(s) for s in narinfo.signatures]
    return out
