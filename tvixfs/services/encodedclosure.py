"""A directory closure as the bytes a store holds: what a server sends, without parsing.

A recursive Get of a store path's tree is answered with every directory in it (a Python
installation: ~300, a big closure thousands). Built as Directory objects and encoded again for
the wire, that cost the daemon ~150 ms of CPU per tree, before the mount could list anything;
sent as the canonical bytes the store keeps, each checked against its digest, ~7 ms. A store
that keeps them offers ``get_recursive_encoded``; the server uses it where it is there.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class EncodedClosures(Protocol):
    def get_recursive_encoded(self, digest: bytes) -> list[bytes]:
        """The closure of directory ``digest`` as encoded Directory messages, root first and
        each after a directory that refers to it (the order of ``get_recursive``); each
        checked against its digest. NotFoundError if the root is absent, CorruptDataError if a
        stored directory is missing or does not match its digest."""
        ...
