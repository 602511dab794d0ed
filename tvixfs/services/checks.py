"""Rules every backend enforces on writes, written once so that they agree exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tvixfs.castore.closure import ClosureError, LeavesFirst
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import BlobService, DirectoryService
from tvixfs.services.errors import FailedPreconditionError, InvalidArgumentError, PathExistsError
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import StorePath


def check_closure(
    directories: Iterable[Directory], stored: Callable[[bytes], bool]
) -> dict[bytes, Directory]:
    """Check a Put stream: leaves first, each child sent before or already ``stored``.

    Returns the batch keyed by digest, in arrival order (root last). Raises before the caller
    stores anything, so a rejected stream leaves no trace.
    """
    batch: dict[bytes, Directory] = {}
    order = LeavesFirst(stored)
    for directory in directories:
        try:  # nodes built in process skip the wire checks: run them, as a server would
            Directory.from_proto(directory.to_proto())
        except ValidationError as e:
            raise InvalidArgumentError(f"invalid directory: {e}") from None
        try:
            batch[order.admit(directory)] = directory
        except ClosureError as e:
            raise FailedPreconditionError(str(e)) from None
    if not batch:
        raise InvalidArgumentError("no directories sent")
    return batch


def check_pathinfo(
    info: pathinfo_pb2.PathInfo, blobs: BlobService, directories: DirectoryService
) -> StorePath:
    """Validate a PathInfo and check that its root content is present."""
    try:
        store_path, node = validate_pathinfo(info)
    except ValidationError as e:
        raise InvalidArgumentError(f"invalid PathInfo: {e}") from None
    if isinstance(node, DirectoryNode) and directories.get(node.digest) is None:
        raise FailedPreconditionError(f"{store_path}: root directory {node.digest.hex()} is not in the store")
    if isinstance(node, FileNode) and blobs.stat(node.digest) is None:
        raise FailedPreconditionError(f"{store_path}: root blob {node.digest.hex()} is not in the store")
    return store_path


def settle_put(
    store_path: StorePath, existing: pathinfo_pb2.PathInfo | None, new: pathinfo_pb2.PathInfo
) -> pathinfo_pb2.PathInfo | None:
    """What a put of ``new`` stores when ``existing`` is there: None when nothing changes.

    A store path is immutable, as in Nix: a second put of the same content is a no-op, except
    that signatures it brings are added (as ``nix store sign`` adds them to a valid path); a put
    of other content under the same path is refused. Content is the root node, the references
    and the NAR facts; deriver and content address are provenance, kept from the first put
    that had them.
    """
    if existing is None:
        return new
    if _content(existing) != _content(new):
        raise PathExistsError(
            f"{store_path} is already in the store with other content; a store path is never replaced"
        )
    known = {(s.name, s.data) for s in existing.narinfo.signatures}
    added = [s for s in new.narinfo.signatures if (s.name, s.data) not in known]
    provenance = [
        field
        for field in ("deriver", "ca")
        if not existing.narinfo.HasField(field) and new.narinfo.HasField(field)
    ]
    if not added and not provenance:
        return None
    merged = pathinfo_pb2.PathInfo()
    merged.CopyFrom(existing)
    merged.narinfo.signatures.extend(added)
    for field in provenance:
        getattr(merged.narinfo, field).CopyFrom(getattr(new.narinfo, field))
    return merged


def _content(info: pathinfo_pb2.PathInfo) -> tuple[bytes, list[bytes], int, bytes]:
    """What a path is: its tree and its references, and the NAR facts that follow from them.

    Signatures, deriver and content address say where it came from and may be added later.
    """
    return (
        info.node.SerializeToString(deterministic=True),
        sorted(info.references),
        info.narinfo.nar_size,
        info.narinfo.nar_sha256,
    )
