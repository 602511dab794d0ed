"""BLAKE3 digests, the addresses of everything in the castore."""

from __future__ import annotations

import base64

import blake3

from tvixfs.castore.errors import ValidationError

DIGEST_SIZE = 32

# BLAKE3 of no bytes: the empty blob, and also the empty Directory (its encoding is empty).
EMPTY_DIGEST = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")

# blake3's own threads pay off only on large inputs; below this they cost more than they save.
_MULTITHREAD_MIN = 1 << 20


_threads = True


def b3digest(data: bytes | memoryview) -> bytes:
    """BLAKE3 of ``data``; large inputs are hashed on all cores (the GIL is released)."""
    if _threads and len(data) >= _MULTITHREAD_MIN:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


def without_threads() -> None:
    """For a forked child: hash on this thread only from now on.

    blake3's thread pool lives in the process that first used it; a child forked after that
    inherits the pool's bookkeeping but none of its threads, and would wait on them forever.
    """
    global _threads  # noqa: PLW0603  (one switch for the whole process, flipped once)
    _threads = False


def new_hasher() -> blake3.blake3:
    """An incremental BLAKE3 hasher, for data that arrives in pieces."""
    return blake3.blake3()


def check_digest(digest: bytes, what: str = "digest") -> bytes:
    """Return ``digest`` if it has the length of a BLAKE3 digest, else raise."""
    if len(digest) != DIGEST_SIZE:
        raise ValidationError(f"{what}: expected {DIGEST_SIZE} bytes, got {len(digest)}")
    return digest


def format_digest(digest: bytes) -> str:
    """The human and xattr form, ``b3:`` + standard padded base64 (as tvix prints it)."""
    return "b3:" + base64.b64encode(digest).decode()
