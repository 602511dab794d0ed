"""Directory listings behind DirectoryNode digests, fetched once and kept in a bounded cache.

On a miss the whole subtree is asked for in one recursive Get (one round trip fills a store
path's tree when it is first entered), unless the parent says the subtree is large compared
with the cache, or the caller asks for the one directory only (a lookup over a store in this
process), in which case only the one directory is fetched. Every directory of a recursive
answer must have been referred to by one received before it; the digest that keys the cache
is computed from the directory itself (in the pump thread, off the event loop), so a store
cannot make one directory appear under another's digest.

A store may address only roots (tvix's object-store layout, ``s3://``, or a tvix-store serving
one): a Get of a subdirectory is NotFound there. So each cached directory remembers the digest
it was fetched through (a store path's root, usually), and a subdirectory that was evicted and
is then NotFound is fetched again through that root.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass

from cachetools import LRUCache

from tvixfs import defaults
from tvixfs.castore.closure import ClosureError, RootFirst
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, Node
from tvixfs.fs.bridge import Bridge
from tvixfs.fs.inflight import InFlight
from tvixfs.services.base import DirectoryService
from tvixfs.services.errors import CorruptDataError, NotFoundError

# Directories of a recursive Get handed from the pump thread to the event loop at once: a hop
# per directory cost more than checking it (a 2 000-directory tree took ~2 000 hops).
BATCH = 256
# Directories whose root is remembered, at least (a tiny listing cache still finds its roots).
ROOTS_MIN = 1 << 12


@dataclass(frozen=True, slots=True)
class Listing:
    """One directory, ready for lookup (by name) and readdir (sorted).

    Names are found by bisection in the sorted names rather than through a dict: a dict
    entry per name would cost a fifth of what the cache holds per entry.
    """

    entries: tuple[Node, ...]
    names: tuple[bytes, ...]
    subdirectories: int

    @classmethod
    def of(cls, directory: Directory) -> Listing:
        entries = tuple(directory.entries())
        return cls(entries, tuple(node.name for node in entries), len(directory.directories))

    def find(self, name: bytes) -> Node | None:
        i = bisect_left(self.names, name)
        if i < len(self.names) and self.names[i] == name:
            return self.entries[i]
        return None


def _listing_size(listing: Listing) -> int:
    return len(listing.entries) + 1


def _checked_tree(service: DirectoryService, root: bytes) -> Iterator[list[tuple[bytes, Listing]]]:
    """Runs in the pump thread: digest, check and index each directory of a recursive Get;
    hands them on in batches."""
    order = RootFirst(root)
    batch: list[tuple[bytes, Listing]] = []
    for directory in service.get_recursive(root):
        try:
            digest = order.admit(directory)
        except ClosureError as e:
            raise CorruptDataError(f"recursive get of {root.hex()}: {e}") from None
        batch.append((digest, Listing.of(directory)))
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _checked_one(service: DirectoryService, digest: bytes) -> Listing:
    directory = service.get(digest)
    if directory is None:
        raise NotFoundError(f"directory {digest.hex()} not found")
    if directory.digest() != digest:
        raise CorruptDataError(f"store returned another directory for {digest.hex()}")
    return Listing.of(directory)


class Directories:
    def __init__(
        self, bridge: Bridge, service: DirectoryService, entries: int = defaults.DIRECTORY_CACHE_ENTRIES
    ) -> None:
        self._bridge = bridge
        self._service = service
        self._cache: LRUCache[bytes, Listing] = LRUCache(entries, getsizeof=_listing_size)
        self._inflight: InFlight[bytes, Listing] = InFlight()
        # Directory digest -> the digest it was fetched through; 64 bytes an entry, bounded.
        self._roots: LRUCache[bytes, bytes] = LRUCache(max(entries, ROOTS_MIN))

    def peek(self, digest: bytes) -> Listing | None:
        """The listing if it is cached, without asking the store."""
        return self._cache.get(digest)

    async def get(self, node: DirectoryNode, subtree: bool = True) -> Listing:
        """The listing; on a miss with ``subtree``, its whole subtree is fetched with it.

        Without ``subtree`` only this directory is: where a call is cheap (a store read in
        this process), a lookup fetches just the directory it looks in, and the subtree waits
        for an ``opendir`` (a walk, which wants it). A program starting looks up files in a
        few tens of directories of a tree of hundreds: loading and checking all of them held
        up its first lookup by about 100 ms (figures in bench/ANALYSIS.md).
        """
        found = self._cache.get(node.digest)
        if found is not None:
            return found
        return await self._inflight.run(node.digest, lambda: self._fetch(node, subtree))

    async def _fetch(self, node: DirectoryNode, recursive: bool) -> Listing:
        root = self._roots.get(node.digest, node.digest)
        try:
            return await self._fetch_direct(node, root, recursive)
        except NotFoundError:
            if root == node.digest:
                raise
        # A store that addresses roots only: the whole tree again, through its root.
        received = dict(await self._fetch_tree(root, root))
        wanted = received.get(node.digest)
        if wanted is None:
            raise NotFoundError(f"directory {node.digest.hex()} not found under root {root.hex()}")
        # The subtree asked for is what a walk needs next: cached last, so evicted last.
        subtree, at = [(node.digest, wanted)], 0
        while at < len(subtree) and len(subtree) < self._cache.maxsize:
            for entry in subtree[at][1].entries:
                if isinstance(entry, DirectoryNode) and entry.digest in received:
                    subtree.append((entry.digest, received[entry.digest]))
            at += 1
        for digest, listing in reversed(subtree):
            self._store(digest, listing, root)
        return wanted

    async def _fetch_direct(self, node: DirectoryNode, root: bytes, recursive: bool) -> Listing:
        # ``size`` is advisory (tvix and snix write other values), good enough to choose.
        if not recursive or node.size > self._cache.maxsize // 4:
            listing = await self._bridge.call(_checked_one, self._service, node.digest)
            self._store(node.digest, listing, root)
            return listing
        return (await self._fetch_tree(node.digest, root))[0][1]

    async def _fetch_tree(self, digest: bytes, root: bytes) -> list[tuple[bytes, Listing]]:
        """The tree under ``digest`` (recursive Get), cached, each remembered as under ``root``."""
        received: list[tuple[bytes, Listing]] = []
        async with self._bridge.stream(lambda: _checked_tree(self._service, digest)) as tree:
            async for batch in tree:
                received.extend(batch)
        if not received:
            raise CorruptDataError(f"recursive get of {digest.hex()} returned nothing")
        # Leaves first, so that the LRU cache evicts the deepest directories first.
        for child, listing in reversed(received):
            self._store(child, listing, root)
        return received

    def _store(self, digest: bytes, listing: Listing, root: bytes) -> None:
        if _listing_size(listing) <= self._cache.maxsize:
            self._cache[digest] = listing
        if digest != root:
            self._roots[digest] = root
        if listing.subdirectories:  # so that a subdirectory fetched alone is found again too
            for node in listing.entries:
                if isinstance(node, DirectoryNode):
                    self._roots[node.digest] = root
