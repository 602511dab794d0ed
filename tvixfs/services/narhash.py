"""The NAR hash of a node, rendered from a store's services (what CalculateNAR answers)."""

from __future__ import annotations

from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import Node
from tvixfs.services.base import BlobService, DirectoryService
from tvixfs.services.errors import NotFoundError
from tvixfs.store.nar import nar_hash


def store_nar_hash(node: Node, blobs: BlobService, directories: DirectoryService) -> tuple[int, bytes]:
    """(size, sha256) of the NAR of ``node``, rendered from the store without holding it."""

    def get_directory(digest: bytes) -> Directory:
        found = directories.get(digest)
        if found is None:
            raise NotFoundError(f"directory {digest.hex()} not found")
        return found

    return nar_hash(node, get_directory, blobs.read)
