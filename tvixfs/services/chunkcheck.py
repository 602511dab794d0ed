"""Checking bytes against the chunk (or blob) digest they were read by: one implementation.

Every path that hands on content it did not hash itself (a chunk fetched by a mount, a whole
blob cut into its chunks, a block read into a buffer, bytes from a remote server) checks it
here, so the rule exists once: exactly ``size`` bytes whose BLAKE3 digest is ``digest``,
else CorruptDataError, raised before the caller uses any of them.
"""

from __future__ import annotations

from tvixfs.castore.digest import b3digest, new_hasher
from tvixfs.services.errors import CorruptDataError


class ChunkCheck:
    """The running check of one chunk whose bytes arrive in pieces.

    ``update`` fails as soon as there are too many bytes; ``done`` fails unless the count and
    (with ``hash``) the digest match. ``hash=False`` counts only: for a store that promised
    to hash what it reads itself (``BlobCapabilities.verifies_chunk_reads``).
    """

    __slots__ = ("_digest", "_hasher", "_received", "_size", "_what")

    def __init__(self, digest: bytes, size: int, what: str, *, hash: bool = True) -> None:
        self._digest = digest
        self._size = size
        self._what = what
        self._received = 0
        self._hasher = new_hasher() if hash else None

    def update(self, piece: bytes | bytearray | memoryview) -> None:
        self._received += len(piece)
        if self._received > self._size:
            raise CorruptDataError(f"{self._what}: chunk {self._digest.hex()}: more than {self._size} bytes")
        if self._hasher is not None:
            self._hasher.update(piece)

    def done(self) -> None:
        if self._received != self._size:
            raise CorruptDataError(
                f"{self._what}: chunk {self._digest.hex()}: {self._received} bytes, expected {self._size}"
            )
        if self._hasher is not None and self._hasher.digest() != self._digest:
            raise CorruptDataError(
                f"{self._what}: chunk {self._digest.hex()}: content does not match its digest"
            )


def verified(data: bytes, digest: bytes, size: int, what: str) -> bytes:
    """``data`` if it is the chunk ``digest`` of ``size`` bytes, else CorruptDataError.

    For bytes held whole: hashed in one call, on several cores if large (``b3digest``).
    """
    if len(data) != size or b3digest(data) != digest:
        raise CorruptDataError(f"{what}: chunk {digest.hex()}: content does not match its digest")
    return data
