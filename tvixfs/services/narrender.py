"""The NAR of a node, rendered piece by piece from a store: ``export-nar`` and nar-bridge's NARs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, Node
from tvixfs.services.base import Store
from tvixfs.services.readahead import blobs_read_ahead
from tvixfs.store.nar import ReadBlob, write_nar


@contextmanager
def rendered_nar(store: Store, node: Node) -> Iterator[Iterator[bytes]]:
    """The NAR of ``node`` in pieces, never held whole.

    A directory tree is fetched in one recursive request first (one round trip, not one per
    directory); over a remote store blobs are read ahead, since a round trip per file would
    dominate a tree of small files. Leaving the context stops the read-ahead."""
    directories: dict[bytes, Directory] = {}
    if isinstance(node, DirectoryNode):
        directories = {d.digest(): d for d in store.directories.get_recursive(node.digest)}
    reads: AbstractContextManager[ReadBlob] = (
        blobs_read_ahead(node, directories.__getitem__, store.blobs.read)
        if store.blobs.capabilities.calls_are_remote
        else nullcontext(store.blobs.read)
    )
    with reads as read_blob:
        yield write_nar(node, directories.__getitem__, read_blob)
