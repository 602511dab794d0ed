"""Rules every backend enforces on writes, written once so that they agree exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tvixfs.castore.closure import ClosureError, LeavesFirst
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import BlobService, DirectoryService
from tvixfs.services.errors import FailedPreconditionError, InvalidArgumentError
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
