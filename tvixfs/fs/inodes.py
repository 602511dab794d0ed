"""The inode table: inode numbers <-> nodes, populated lazily as the kernel looks names up.

Inside store paths, equal content gets one inode: files by digest and executable bit, symlinks
by target (a store full of copies of the same license file costs one entry). Directories are
the exception: each gets the inode of its place, (parent inode, name), because the kernel
allows a directory only one name. Given one inode under two names, it moves the directory's
entry (and everything cached below it) to whichever name was listed last, so every walk
over both names looked them up again and forgot what was below (in a /usr/share tree with
one directory in five a copy of another, a tenth more requests per walk). Store path roots
get an inode of their own, keyed by basename, because they carry per-path facts (the store
path, its NAR hash) that equal content elsewhere does not have.

An inode lives exactly as long as the kernel references it: every successful lookup and every
entry accepted by readdir (READDIRPLUS) adds one to its count, ``forget`` subtracts, and at
zero it is dropped. Numbers only grow and are never reused within a mount, so a number the
kernel still holds can never name other content.

The kernel sends ``forget`` only under memory pressure, so on a machine with plenty of memory
a walk of a large tree would keep every inode ever handed out. The table therefore has a
limit: once more inodes than that are live, the least recently handed out ones are returned
by ``overflow`` so that the caller asks the kernel to drop their directory entries; the
kernel then forgets them (and, for a directory, everything below it that nothing uses) and
the table shrinks. An inode stays in the table, with its count, until that ``forget``
arrives: nothing is dropped on the daemon's side alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pyfuse3

from tvixfs import defaults
from tvixfs.castore.nodes import DirectoryNode, FileNode, Node
from tvixfs.fs.roots import StorePathRoot

ROOT_INODE: int = pyfuse3.ROOT_INODE

# What an index is keyed by: a digest, a symlink target, a basename, (parent inode, name).
Key = bytes | tuple[int, bytes]

# Once over the limit, evict this fraction of it beyond the excess, so that the scan for
# victims runs once per many lookups rather than on every one.
EVICTION_BATCH = 1 / 16


@dataclass(slots=True, eq=False)
class Inode:
    ino: int
    node: Node
    origin: bytes  # basename of the store path it was first reached through; for log lines
    root: StorePathRoot | None = None  # set on the root of a store path
    lookups: int = 0
    # Where the kernel last got it from (parent inode, entry name): what to invalidate.
    parent: int = 0
    name: bytes = b""
    evicting: bool = False  # the kernel was asked to drop it and has not forgotten it yet


class InodeTable:
    def __init__(self, max_inodes: int = defaults.MAX_INODES) -> None:
        self.max_inodes = max_inodes
        # Insertion order is recency: ``remember`` moves an inode to the end.
        self._by_ino: dict[int, Inode] = {}
        # One index per kind of content instead of a key tuple per inode (a digest alone
        # could name both a file and a directory with the same bytes).
        self._roots: dict[Key, Inode] = {}
        self._directories: dict[Key, Inode] = {}  # by (parent inode, name)
        self._files: dict[Key, Inode] = {}
        self._executables: dict[Key, Inode] = {}
        self._symlinks: dict[Key, Inode] = {}
        self._next = ROOT_INODE + 1
        self._evicting = 0

    def __len__(self) -> int:
        return len(self._by_ino)

    @property
    def evicting(self) -> int:
        """Inodes the kernel was asked to drop and has not forgotten yet."""
        return self._evicting

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def for_root(self, root: StorePathRoot) -> Inode:
        """The inode of a store path root (not yet counted as referenced)."""
        return self._find_or_add(self._roots, root.name, root.node, root.name, root, ROOT_INODE)

    def for_child(self, node: Node, origin: bytes, parent: int) -> Inode:
        """The inode of entry ``node`` of directory ``parent`` inside a store path (not yet
        counted as referenced)."""
        index, key = self._index(node, None, parent)
        found = index.get(key)  # readdir asks once per entry: the common case first, inline
        return found if found is not None else self._find_or_add(index, key, node, origin, None, parent)

    def _index(self, node: Node, root: StorePathRoot | None, parent: int) -> tuple[dict[Key, Inode], Key]:
        if root is not None:
            return self._roots, root.name
        if isinstance(node, FileNode):
            return (self._executables if node.executable else self._files), node.digest
        if isinstance(node, DirectoryNode):
            return self._directories, (parent, node.name)
        return self._symlinks, node.target

    def _find_or_add(  # noqa: PLR0917
        self,
        index: dict[Key, Inode],
        key: Key,
        node: Node,
        origin: bytes,
        root: StorePathRoot | None,
        parent: int,
    ) -> Inode:
        inode = index.get(key)
        if inode is None:
            # Where it was first found: for a directory, also the key to drop it by.
            inode = Inode(self._next, node, origin, root, parent=parent, name=node.name)
            self._next += 1
            index[key] = inode
            self._by_ino[inode.ino] = inode
        return inode

    def remember(self, inode: Inode, parent: int, name: bytes) -> None:
        """The kernel now holds one more reference, as ``name`` in directory ``parent``
        (a lookup reply or an accepted readdir entry)."""
        inode.lookups += 1
        inode.parent = parent
        inode.name = name
        if inode.evicting:  # handed out again: it is in use after all
            inode.evicting = False
            self._evicting -= 1
        del self._by_ino[inode.ino]
        self._by_ino[inode.ino] = inode

    def forget(self, ino: int, count: int) -> None:
        inode = self._by_ino.get(ino)
        if inode is None:
            return
        inode.lookups -= count
        self.discard_unused(inode)

    def discard_unused(self, inode: Inode) -> None:
        """Drop ``inode`` if the kernel holds no reference to it (e.g. readdir did not take it)."""
        if inode.lookups <= 0 and self._by_ino.get(inode.ino) is inode:
            del self._by_ino[inode.ino]
            index, key = self._index(inode.node, inode.root, inode.parent)
            del index[key]
            if inode.evicting:
                self._evicting -= 1

    def overflow(self) -> list[Inode]:
        """Inodes to ask the kernel to drop: the least recently handed out, once over the limit.

        Each is marked, so it is not returned again unless the kernel takes it again first.
        One the kernel keeps anyway (an open file, a current directory, another name for the
        same content) stays marked and no longer counts against the limit. An inode whose
        parent directory is dropped in the same batch is marked but not returned: dropping a
        directory's entry makes the kernel drop everything below it that is not in use, so
        its own request would only cost a round through the kernel for nothing.
        """
        excess = len(self._by_ino) - self._evicting - self.max_inodes
        if excess <= 0:
            return []
        wanted = excess + int(self.max_inodes * EVICTION_BATCH)
        candidates = (inode for inode in self._by_ino.values() if not inode.evicting)
        victims = list(itertools.islice(candidates, wanted))
        for inode in victims:
            inode.evicting = True
        self._evicting += len(victims)
        batch = {inode.ino for inode in victims}
        return [inode for inode in victims if inode.parent not in batch]
