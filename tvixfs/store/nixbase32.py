"""Nix's base-32: its own alphabet, and the bytes read from the last one backwards."""

from __future__ import annotations

from tvixfs.castore.errors import ValidationError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}


def encoded_len(n: int) -> int:
    return (n * 8 - 1) // 5 + 1 if n else 0


def encode(data: bytes) -> str:
    """Encode as Nix does: character i (from the end) holds bits 5i..5i+4 of ``data`` read LSB-first."""
    value = int.from_bytes(data, "little")
    n = encoded_len(len(data))
    return "".join(ALPHABET[(value >> (5 * i)) & 0x1F] for i in range(n - 1, -1, -1))


def decode(text: str) -> bytes:
    """Inverse of ``encode``; rejects foreign characters and non-zero padding bits."""
    n = len(text) * 5 // 8
    if encoded_len(n) != len(text):
        raise ValidationError(f"invalid nixbase32 length {len(text)}")
    value = 0
    for i, c in enumerate(reversed(text)):
        digit = _VALUE.get(c)
        if digit is None:
            raise ValidationError(f"invalid nixbase32 character {c!r} in {text!r}")
        value |= digit << (5 * i)
    if value >> (8 * n):
        raise ValidationError(f"nixbase32 {text!r} has bits set beyond {n} bytes")
    return value.to_bytes(n, "little")
