"""Store paths: ``/nix/store/<32 chars nixbase32>-<name>``, parsing and computing."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from tvixfs.castore.errors import ValidationError
from tvixfs.store import nixbase32

STORE_DIR = "/nix/store"
HASH_SIZE = 20
HASH_CHARS = 32
MAX_NAME = 211
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")


def check_name(name: str) -> str:
    """Return ``name`` if Nix accepts it as the name part of a store path, else raise why."""
    if not name:
        raise ValidationError("empty store path name")
    if len(name) > MAX_NAME:
        raise ValidationError(f"store path name longer than {MAX_NAME} characters")
    if name.startswith("."):
        raise ValidationError(f"store path name must not start with '.': {name!r}")
    if not _NAME_RE.fullmatch(name):
        raise ValidationError(f"store path name has characters outside A-Za-z0-9+-._?=: {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class StorePath:
    digest: bytes  # the 20-byte hash
    name: str

    @classmethod
    def from_basename(cls, basename: str | bytes) -> StorePath:
        """Parse ``<hash>-<name>``; raises ValidationError with the reason."""
        if isinstance(basename, bytes):
            try:
                basename = basename.decode("ascii")
            except UnicodeDecodeError:
                raise ValidationError(f"store path {basename!r} is not ASCII") from None
        if len(basename) < HASH_CHARS + 2 or basename[HASH_CHARS] != "-":
            raise ValidationError(f"not a store path basename: {basename!r}")
        digest = nixbase32.decode(basename[:HASH_CHARS])
        return cls(digest, check_name(basename[HASH_CHARS + 1 :]))

    @classmethod
    def from_absolute(cls, path: str) -> StorePath:
        """Parse ``/nix/store/<hash>-<name>`` (a trailing slash is tolerated)."""
        prefix = STORE_DIR + "/"
        if not path.startswith(prefix):
            raise ValidationError(f"not in {STORE_DIR}: {path!r}")
        rest = path[len(prefix) :].rstrip("/")
        if "/" in rest:
            raise ValidationError(f"not a store path (has a subpath): {path!r}")
        return cls.from_basename(rest)

    @property
    def hash_part(self) -> str:
        return nixbase32.encode(self.digest)

    @property
    def basename(self) -> str:
        return f"{self.hash_part}-{self.name}"

    @property
    def absolute(self) -> str:
        return f"{STORE_DIR}/{self.basename}"

    def __str__(self) -> str:
        return self.absolute


def compress_hash(digest: bytes, size: int = HASH_SIZE) -> bytes:
    """Nix's hash compression: XOR-fold a digest down to ``size`` bytes."""
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


def make_store_path(kind: str, inner_digest_hex: str, name: str, algo: str = "sha256") -> StorePath:
    """Nix's makeStorePath: ``<kind>:<algo>:<hex>:/nix/store:<name>``, sha256, folded to 20 bytes."""
    check_name(name)
    fingerprint = f"{kind}:{algo}:{inner_digest_hex}:{STORE_DIR}:{name}"
    return StorePath(compress_hash(hashlib.sha256(fingerprint.encode()).digest()), name)


def source_store_path(nar_sha256: bytes, name: str, references: list[str] | None = None) -> StorePath:
    """The path ``nix-store --add`` gives a tree: recursive sha256, type "source"."""
    kind = "source"
    for ref in sorted(references or []):
        kind += ":" + ref
    return make_store_path(kind, nar_sha256.hex(), name)
