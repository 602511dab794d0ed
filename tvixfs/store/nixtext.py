"""Nix's text forms of hashes, content addresses and signatures, both ways.

Nix prints a hash as ``<algo>:<nixbase32>`` (narinfo files, ``nix-store -q --hash``), as SRI
``<algo>-<base64>`` (``nix path-info --json`` since 2.4), and accepts hex too; the encoding is
told apart by length. Content addresses are ``fixed:r:<algo>:<hash>`` (a NAR hash),
``fixed:<algo>:<hash>`` (a flat file hash) and ``text:sha256:<hash>``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

from tvixfs.castore.errors import ValidationError
from tvixfs.protos import pathinfo_pb2
from tvixfs.store import nixbase32

HASH_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}

_CA = pathinfo_pb2.NARInfo.CA
# (method prefix, algorithm) <-> CA.Hash, as Nix spells the method in a ``ca`` field.
_CA_KINDS: dict[tuple[str, str], _CA.Hash.ValueType] = {
    ("fixed:r", "sha256"): _CA.NAR_SHA256,
    ("fixed:r", "sha1"): _CA.NAR_SHA1,
    ("fixed:r", "sha512"): _CA.NAR_SHA512,
    ("fixed:r", "md5"): _CA.NAR_MD5,
    ("text", "sha256"): _CA.TEXT_SHA256,
    ("fixed", "sha1"): _CA.FLAT_SHA1,
    ("fixed", "md5"): _CA.FLAT_MD5,
    ("fixed", "sha256"): _CA.FLAT_SHA256,
    ("fixed", "sha512"): _CA.FLAT_SHA512,
}
_CA_NAMES = {kind: key for key, kind in _CA_KINDS.items()}


def decode_hash(algo: str, text: str) -> bytes:
    """A digest of ``algo`` written in hex, nixbase32 or base64 (told apart by length)."""
    size = HASH_SIZES.get(algo)
    if size is None:
        raise ValidationError(f"unknown hash algorithm {algo!r}")
    try:
        if len(text) == 2 * size:
            return bytes.fromhex(text)
        if len(text) == nixbase32.encoded_len(size):
            return nixbase32.decode(text)
        if len(text) == 4 * ((size + 2) // 3):
            digest = base64.b64decode(text, validate=True)
            if len(digest) == size:
                return digest
    except (ValueError, binascii.Error):
        pass
    raise ValidationError(f"invalid {algo} hash {text!r}")


def parse_hash(text: str, algo: str = "sha256") -> bytes:
    """``<algo>:<digest>`` or SRI ``<algo>-<base64>``; the algorithm must be ``algo``."""
    for sep in (":", "-"):
        prefix, found, rest = text.partition(sep)
        if found and prefix == algo:
            return decode_hash(algo, rest)
    raise ValidationError(f"expected a {algo} hash, got {text!r}")


def format_hash(digest: bytes, algo: str = "sha256") -> str:
    """``<algo>:<nixbase32>``: the form of narinfo files and ``nix-store -q --hash``."""
    return f"{algo}:{nixbase32.encode(digest)}"


def format_sri(digest: bytes, algo: str = "sha256") -> str:
    """``<algo>-<base64>``: the form ``nix path-info --json`` prints (Nix 2.4 and later)."""
    return f"{algo}-{base64.b64encode(digest).decode()}"


def parse_ca(text: str) -> pathinfo_pb2.NARInfo.CA:
    """A Nix content address (``fixed:r:sha256:…``, ``fixed:sha1:…``, ``text:sha256:…``)."""
    method, _, rest = text.rpartition(":")
    method, _, algo = method.rpartition(":")
    kind = _CA_KINDS.get((method, algo))
    if kind is None:
        raise ValidationError(f"unsupported content address {text!r}")
    return _CA(type=kind, digest=decode_hash(algo, rest))


def ca_method(ca: pathinfo_pb2.NARInfo.CA) -> tuple[str, str]:
    """(method, algorithm) of a content address: ``("fixed:r", "sha256")``, ``("text", "sha256")``, ..."""
    return _CA_NAMES[ca.type]


def format_ca(ca: pathinfo_pb2.NARInfo.CA) -> str:
    method, algo = ca_method(ca)
    return f"{method}:{algo}:{nixbase32.encode(ca.digest)}"


def parse_signature(text: str) -> pathinfo_pb2.NARInfo.Signature:
    """``<key name>:<base64 of the 64-byte ed25519 signature>``."""
    name, found, data = text.partition(":")
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error:
        raw = b""
    if not found or not name or len(raw) != 64:
        raise ValidationError(f"invalid signature {text!r}: expected <key name>:<base64 of 64 bytes>")
    return pathinfo_pb2.NARInfo.Signature(name=name, data=raw)


def format_signature(sig: pathinfo_pb2.NARInfo.Signature) -> str:
    return f"{sig.name}:{base64.b64encode(sig.data).decode()}"


def signatures_narinfo(texts: Iterable[str]) -> pathinfo_pb2.NARInfo:
    """A NARInfo holding only these signatures (each ``parse_signature``'d): what an importer is
    told about a path before it reads the NAR."""
    return pathinfo_pb2.NARInfo(signatures=[parse_signature(text) for text in texts])
