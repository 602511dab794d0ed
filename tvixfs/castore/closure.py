"""The order rules of a directory closure sent as a stream: one implementation for all.

A closure travels in one of two orders. Root first (a recursive Get): every directory after
the root must be one that a directory before it refers to, and arrive once. Leaves first (a
Put): every directory may refer only to directories sent before it or already stored. Pure:
the callers decide what a broken rule means (corrupt data from a server, a rejected Put).
"""

from __future__ import annotations

from collections.abc import Callable, Set

from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError


class ClosureError(ValidationError):
    """A directory stream breaks the order rule of its closure."""


class RootFirst:
    """Checks a root-first stream directory by directory; ``unfinished`` at its end."""

    __slots__ = ("_received", "_wanted")

    def __init__(self, root: bytes) -> None:
        self._wanted = {root}  # referred to by a directory received, not received yet
        self._received: set[bytes] = set()

    def admit(self, directory: Directory) -> bytes:
        """The directory's digest, if it may come next; else ClosureError."""
        digest = directory.digest()
        if digest not in self._wanted:
            reason = "twice" if digest in self._received else "before any directory referred to it"
            raise ClosureError(f"directory {digest.hex()} arrived {reason}")
        self._wanted.discard(digest)
        self._received.add(digest)
        self._wanted.update(d.digest for d in directory.directories if d.digest not in self._received)
        return digest

    @property
    def unfinished(self) -> int:
        """How many directories referred to have not arrived (0 once the closure is whole)."""
        return len(self._wanted)

    @property
    def awaited(self) -> Set[bytes]:
        """The digests any directory arriving next may have."""
        return self._wanted


class LeavesFirst:
    """Checks a leaves-first stream: each child sent before its parent or already ``stored``."""

    __slots__ = ("_sent", "_stored")

    def __init__(self, stored: Callable[[bytes], bool]) -> None:
        self._stored = stored
        self._sent: set[bytes] = set()

    def admit(self, directory: Directory) -> bytes:
        """The directory's digest, if its children are known; else ClosureError."""
        for child in directory.directories:
            if child.digest not in self._sent and not self._stored(child.digest):
                raise ClosureError(
                    f"directory {child.name!r} refers to {child.digest.hex()}, "
                    "which was neither sent before it nor stored"
                )
        digest = directory.digest()
        self._sent.add(digest)
        return digest
