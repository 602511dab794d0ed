"""Nix's signing scheme: ed25519 keys as ``name:base64`` text and the fingerprint Nix signs.

Pure functions over text and bytes, so every producer and checker of signatures (importers,
the mount, a narinfo bridge) shares one implementation of Nix's formats:

- secret key ``name:base64(seed(32) || public(32))``, as ``nix-store --generate-binary-cache-key``
  writes it (libsodium's layout);
- public key ``name:base64(public(32))``;
- signature ``name:base64(ed25519 signature(64))``, verified with the public key of that name;
- fingerprint ``1;<store path>;sha256:<nixbase32 nar hash>;<nar size>;<sorted refs, comma-joined>``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tvixfs.castore.errors import ValidationError
from tvixfs.store import nixbase32

SEED_SIZE = 32
PUBLIC_SIZE = 32
SIGNATURE_SIZE = 64


@dataclass(frozen=True, slots=True)
class PublicKey:
    name: str
    key: bytes  # 32 bytes

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"


@dataclass(frozen=True, slots=True)
class SecretKey:
    name: str
    seed: bytes  # 32 bytes; the public half is derived, not trusted from the file

    @property
    def public(self) -> PublicKey:
        raw = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return PublicKey(self.name, raw.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte ed25519 signature of ``message``."""
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(message)


def _split(text: str, what: str, sizes: tuple[int, ...]) -> tuple[str, bytes]:
    name, found, data = text.strip().partition(":")
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error:
        raw = b""
    if not found or not name or len(raw) not in sizes:
        expected = " or ".join(str(s) for s in sizes)
        raise ValidationError(f"invalid {what}: expected <key name>:<base64 of {expected} bytes>")
    return name, raw


def parse_public_key(text: str) -> PublicKey:
    """``name:base64(32 bytes)``, as ``trusted-public-keys`` holds them."""
    name, raw = _split(text, "public key", (PUBLIC_SIZE,))
    return PublicKey(name, raw)


def parse_secret_key(text: str) -> SecretKey:
    """``name:base64(64 bytes)`` (seed then public key); the two halves must belong together."""
    name, raw = _split(text, "secret key", (SEED_SIZE + PUBLIC_SIZE,))
    key = SecretKey(name, raw[:SEED_SIZE])
    if key.public.key != raw[SEED_SIZE:]:
        raise ValidationError(f"invalid secret key {name!r}: its public half does not match its seed")
    return key


def parse_public_keys(lines: Iterable[str]) -> dict[str, PublicKey]:
    """Keys by name, from text items (blank ones and ``#`` comments skipped); a name twice is an error."""
    keys: dict[str, PublicKey] = {}
    for line in lines:
        for word in line.split("#", 1)[0].split():
            key = parse_public_key(word)
            if key.name in keys and keys[key.name] != key:
                raise ValidationError(f"two different public keys are named {key.name!r}")
            keys[key.name] = key
    return keys


def fingerprint(store_path: str, nar_sha256: bytes, nar_size: int, references: Iterable[str]) -> bytes:
    """What Nix signs for a store path; ``store_path`` and ``references`` are absolute paths."""
    if nar_size <= 0:
        raise ValidationError(f"{store_path}: a NAR size of {nar_size} cannot be signed")
    if len(nar_sha256) != 32:
        raise ValidationError(f"{store_path}: a NAR sha256 has 32 bytes, not {len(nar_sha256)}")
    refs = ",".join(sorted(references))
    return f"1;{store_path};sha256:{nixbase32.encode(nar_sha256)};{nar_size};{refs}".encode()


def verify(
    keys: Mapping[str, PublicKey], signatures: Iterable[tuple[str, bytes]], message: bytes
) -> str | None:
    """The name of the first trusted key whose signature of ``message`` is valid, or None.

    Signatures by keys not in ``keys`` are ignored, as Nix does.
    """
    for name, data in signatures:
        key = keys.get(name)
        if key is not None and len(data) == SIGNATURE_SIZE and key.verify(data, message):
            return name
    return None
