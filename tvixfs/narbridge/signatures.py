"""Nix's ed25519 narinfo signatures: key files, the fingerprint Nix signs, signing and checking.

Key formats are those of ``nix-store --generate-binary-cache-key``: a secret key is
``name:base64(seed ‖ public key)`` (64 bytes, libsodium's layout), a public key
``name:base64(32 bytes)``, a signature ``name:base64(64 bytes)``; a signature is checked with the
key of the same name. (A stand-in until tvixfs/store/nixsig.py, which owns this, is merged.)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tvixfs.castore.errors import ValidationError
from tvixfs.protos import pathinfo_pb2
from tvixfs.store.nixtext import format_hash
from tvixfs.store.storepath import StorePath


@dataclass(frozen=True)
class SecretKey:
    name: str
    key: Ed25519PrivateKey


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: Ed25519PublicKey


def _split(text: str, size: int, what: str) -> tuple[str, bytes]:
    name, sep, data = text.strip().partition(":")
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error:
        raw = b""
    if not sep or not name or len(raw) != size:
        raise ValidationError(f"invalid Nix {what}: expected <name>:<base64 of {size} bytes>")
    return name, raw


def parse_secret_key(text: str) -> SecretKey:
    name, raw = _split(text, 64, "secret key")
    key = Ed25519PrivateKey.from_private_bytes(raw[:32])
    if key.public_key().public_bytes_raw() != raw[32:]:
        raise ValidationError(f"invalid Nix secret key {name!r}: its public half does not match its seed")
    return SecretKey(name, key)


def parse_public_key(text: str) -> PublicKey:
    name, raw = _split(text, 32, "public key")
    return PublicKey(name, Ed25519PublicKey.from_public_bytes(raw))


def nix_fingerprint(
    store_path: StorePath, nar_sha256: bytes, nar_size: int, references: Iterable[StorePath]
) -> bytes:
    """What Nix signs: ``1;<path>;sha256:<nixbase32>;<size>;<sorted absolute references, comma-joined>``."""
    refs = ",".join(sorted(r.absolute for r in references))
    return f"1;{store_path.absolute};{format_hash(nar_sha256)};{nar_size};{refs}".encode()


def sign(key: SecretKey, fingerprint: bytes) -> pathinfo_pb2.NARInfo.Signature:
    return pathinfo_pb2.NARInfo.Signature(name=key.name, data=key.key.sign(fingerprint))


def verify(
    keys: Iterable[PublicKey], fingerprint: bytes, signatures: Iterable[pathinfo_pb2.NARInfo.Signature]
) -> bool:
    """True if one of ``signatures`` is valid under the key of its name among ``keys``."""
    by_name = {k.name: k for k in keys}
    for sig in signatures:
        key = by_name.get(sig.name)
        if key is None:
            continue
        try:
            key.key.verify(sig.data, fingerprint)
        except InvalidSignature:
            continue
        return True
    return False
