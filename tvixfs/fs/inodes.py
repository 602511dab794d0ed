"""The inode table: inode numbers <-> nodes, populated lazily as the kernel looks names up.

Inside store paths, equal content gets one inode: directories by digest, files by digest and
executable bit, symlinks by target (a store full of copies of the same license file costs one
entry). Store path roots get an inode of their own, keyed by basename, because they carry
per-path facts (the store path, its NAR hash) that equal content elsewhere does not have.

An inode lives exactly as long as the kernel references it: every successful lookup and every
entry accepted by readdir (READDIRPLUS) adds one to its count, ``forget`` subtracts, and at
zero it is dropped, so memory follows what the kernel keeps cached. Numbers only grow and are
never reused within a mount, so a number the kernel still holds can never name other content.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import pyfuse3

from tvixfs.castore.nodes import DirectoryNode, FileNode, Node
from tvixfs.fs.roots import StorePathRoot

ROOT_INODE: int = pyfuse3.ROOT_INODE


@dataclass(slots=True, eq=False)
class Inode:
    ino: int
    key: Hashable
    node: Node
    origin: bytes  # basename of the store path it was first reached through; for log lines
    root: StorePathRoot | None = None  # set on the root of a store path
    lookups: int = 0


def _content_key(node: Node) -> Hashable:
    if isinstance(node, DirectoryNode):
        return ("d", node.digest)
    if isinstance(node, FileNode):
        return ("f", node.digest, node.executable)
    return ("l", node.target)


class InodeTable:
    def __init__(self) -> None:
        self._by_ino: dict[int, Inode] = {}
        self._by_key: dict[Hashable, Inode] = {}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def for_root(self, root: StorePathRoot) -> Inode:
        """The inode of a store path root (not yet counted as referenced)."""
        return self._find_or_add(("r", root.name), root.node, root.name, root)

    def for_child(self, node: Node, origin: bytes) -> Inode:
        """The inode of an entry inside a store path (not yet counted as referenced)."""
        return self._find_or_add(_content_key(node), node, origin, None)

    def _find_or_add(self, key: Hashable, node: Node, origin: bytes, root: StorePathRoot | None) -> Inode:
        inode = self._by_key.get(key)
        if inode is None:
            inode = Inode(self._next, key, node, origin, root)
            self._next += 1
            self._by_key[key] = inode
            self._by_ino[inode.ino] = inode
        return inode

    def remember(self, inode: Inode) -> None:
        """The kernel now holds one more reference (a lookup reply or an accepted readdir entry)."""
        inode.lookups += 1

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
            del self._by_key[inode.key]
