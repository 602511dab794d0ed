"""PathInfo validation: the one gate every PathInfo passes, from the wire or from an import."""

from __future__ import annotations

from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import Node, node_from_proto
from tvixfs.protos import pathinfo_pb2
from tvixfs.store.contentaddress import content_address_path
from tvixfs.store.nixtext import format_ca
from tvixfs.store.storepath import HASH_SIZE, StorePath, check_name

SHA256_SIZE = 32
SIGNATURE_SIZE = 64


def validate_pathinfo(info: pathinfo_pb2.PathInfo) -> tuple[StorePath, Node]:
    """Check every rule of a PathInfo; returns its store path and validated root node."""
    if not info.HasField("node"):
        raise ValidationError("PathInfo has no root node")
    node = node_from_proto(info.node)
    try:
        store_path = StorePath.from_basename(node.name)
    except ValidationError as e:
        raise ValidationError(f"root node name is not a store path basename: {e}") from None
    for i, ref in enumerate(info.references):
        if len(ref) != HASH_SIZE:
            raise ValidationError(f"reference {i}: expected {HASH_SIZE} bytes, got {len(ref)}")
    if info.HasField("narinfo"):
        _validate_narinfo(info.narinfo, list(info.references))
        if info.narinfo.HasField("ca"):
            _check_content_address(info.narinfo, store_path)
    return store_path, node


def _check_content_address(narinfo: pathinfo_pb2.NARInfo, store_path: StorePath) -> None:
    """A content-addressed path must be the one its address gives (see ``contentaddress``)."""
    ca = narinfo.ca
    expected = content_address_path(ca, store_path.name, list(narinfo.reference_names), store_path.basename)
    if expected != store_path:
        raise ValidationError(f"its content address {format_ca(ca)} gives {expected}, not {store_path}")
    if ca.type == pathinfo_pb2.NARInfo.CA.NAR_SHA256 and ca.digest != narinfo.nar_sha256:
        raise ValidationError(f"its content address {format_ca(ca)} is not its NAR hash")


def _validate_narinfo(narinfo: pathinfo_pb2.NARInfo, references: list[bytes]) -> None:
    if len(narinfo.nar_sha256) != SHA256_SIZE:
        raise ValidationError(f"nar_sha256: expected {SHA256_SIZE} bytes, got {len(narinfo.nar_sha256)}")
    names = list(narinfo.reference_names)
    if len(names) != len(references):
        raise ValidationError(f"{len(references)} references but {len(names)} reference_names")
    for i, (name, ref) in enumerate(zip(names, references, strict=True)):
        try:
            path = StorePath.from_basename(name)
        except ValidationError as e:
            raise ValidationError(f"reference_names[{i}]: {e}") from None
        if path.digest != ref:
            raise ValidationError(f"reference_names[{i}] {name!r} does not match references[{i}]")
    for i, sig in enumerate(narinfo.signatures):
        if len(sig.data) != SIGNATURE_SIZE:
            raise ValidationError(
                f"signature {i} ({sig.name!r}): expected {SIGNATURE_SIZE} bytes, got {len(sig.data)}"
            )
    if narinfo.HasField("deriver"):
        d = narinfo.deriver
        if len(d.digest) != HASH_SIZE:
            raise ValidationError(f"deriver digest: expected {HASH_SIZE} bytes, got {len(d.digest)}")
        try:
            check_name(d.name)
        except ValidationError as e:
            raise ValidationError(f"deriver: {e}") from None
