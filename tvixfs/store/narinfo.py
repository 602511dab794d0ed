"""Nix's ``.narinfo`` text (HTTP binary caches), parsed strictly and rendered the way Nix writes it.

A narinfo is ``Key: value`` lines: StorePath, URL, Compression, FileHash, FileSize, NarHash,
NarSize, References (base names, space-separated), Deriver (a base name), Sig (repeatable), CA.
Nix ignores keys it does not know, and so does this parser; a known key with a bad value, a
repeated single-valued key or a missing required one is an error, as the bridge must refuse
rather than store a half-understood path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvixfs.castore.errors import ValidationError
from tvixfs.protos import pathinfo_pb2
from tvixfs.store.nixtext import (
    format_ca,
    format_hash,
    format_signature,
    parse_ca,
    parse_hash,
    parse_signature,
)
from tvixfs.store.storepath import StorePath

# Far above any real narinfo (thousands of references still fit); bounds what a client can send.
MAX_NARINFO_BYTES = 1 << 20
_REQUIRED = ("StorePath", "URL", "NarHash", "NarSize")
_SINGLE = {"StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize", "References"}
_SINGLE |= {"Deriver", "CA", "System"}


@dataclass
class NarInfo:
    store_path: StorePath
    url: str
    nar_sha256: bytes
    nar_size: int
    compression: str = "bzip2"  # Nix's default when the line is missing
    file_sha256: bytes | None = None
    file_size: int | None = None
    references: list[StorePath] = field(default_factory=list)
    deriver: StorePath | None = None
    signatures: list[pathinfo_pb2.NARInfo.Signature] = field(default_factory=list)
    ca: pathinfo_pb2.NARInfo.CA | None = None


def _size(key: str, text: str) -> int:
    if not text.isdigit() or len(text) > 20:
        raise ValidationError(f"narinfo {key}: not a size: {text!r}")
    value = int(text)
    if value >= 1 << 64:
        raise ValidationError(f"narinfo {key}: too large: {text}")
    return value


def parse_narinfo(text: str) -> NarInfo:
    """The narinfo in ``text``; ValidationError naming the first thing wrong."""
    if len(text) > MAX_NARINFO_BYTES:
        raise ValidationError(f"narinfo longer than {MAX_NARINFO_BYTES} bytes")
    fields: dict[str, str] = {}
    sigs: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            key, sep, value = line.partition(":")  # Nix accepts "Key:" with an empty value
        if not sep or not key or " " in key:
            raise ValidationError(f"narinfo line {number}: expected 'Key: value', got {line[:80]!r}")
        if key == "Sig":
            sigs.append(value)
        elif key in _SINGLE:
            if key in fields:
                raise ValidationError(f"narinfo: {key} given twice")
            fields[key] = value
    missing = [k for k in _REQUIRED if not fields.get(k)]
    if missing:
        raise ValidationError(f"narinfo lacks {', '.join(missing)}")
    info = NarInfo(
        store_path=StorePath.from_absolute(fields["StorePath"]),
        url=fields["URL"],
        nar_sha256=parse_hash(fields["NarHash"]),
        nar_size=_size("NarSize", fields["NarSize"]),
        signatures=[parse_signature(s) for s in sigs],
    )
    if info.nar_size == 0:
        raise ValidationError("narinfo NarSize: 0 (no NAR is empty)")
    if "Compression" in fields:
        info.compression = fields["Compression"]
    if fields.get("FileHash"):
        info.file_sha256 = parse_hash(fields["FileHash"])
    if fields.get("FileSize"):
        info.file_size = _size("FileSize", fields["FileSize"])
    info.references = [StorePath.from_basename(r) for r in fields.get("References", "").split()]
    if len(set(info.references)) != len(info.references):
        raise ValidationError("narinfo References: a path listed twice")
    if fields.get("Deriver"):
        info.deriver = StorePath.from_basename(fields["Deriver"])
    if fields.get("CA"):
        info.ca = parse_ca(fields["CA"])
    return info


def render_narinfo(info: NarInfo) -> str:
    """The narinfo text, in the order and form Nix writes (``NarInfo::to_string``)."""
    lines = [
        f"StorePath: {info.store_path.absolute}",
        f"URL: {info.url}",
        f"Compression: {info.compression}",
    ]
    if info.file_sha256 is not None:
        lines.append(f"FileHash: {format_hash(info.file_sha256)}")
    if info.file_size is not None:
        lines.append(f"FileSize: {info.file_size}")
    lines.append(f"NarHash: {format_hash(info.nar_sha256)}")
    lines.append(f"NarSize: {info.nar_size}")
    lines.append(f"References: {' '.join(sorted(r.basename for r in info.references))}")
    if info.deriver is not None:
        lines.append(f"Deriver: {info.deriver.basename}")
    lines.extend(f"Sig: {format_signature(s)}" for s in info.signatures)
    if info.ca is not None:
        lines.append(f"CA: {format_ca(info.ca)}")
    return "\n".join(lines) + "\n"


def narinfo_from_pathinfo(info: pathinfo_pb2.PathInfo, store_path: StorePath, url: str) -> NarInfo:
    """What a cache serves for a stored path: its NAR uncompressed at ``url``."""
    narinfo = info.narinfo
    return NarInfo(
        store_path=store_path,
        url=url,
        nar_sha256=narinfo.nar_sha256,
        nar_size=narinfo.nar_size,
        compression="none",
        references=[StorePath.from_basename(n) for n in narinfo.reference_names],
        deriver=(
            StorePath(narinfo.deriver.digest, narinfo.deriver.name) if narinfo.HasField("deriver") else None
        ),
        signatures=list(narinfo.signatures),
        ca=narinfo.ca if narinfo.HasField("ca") else None,
    )


def pathinfo_narinfo(info: NarInfo) -> pathinfo_pb2.NARInfo:
    """The PathInfo's ``narinfo`` for what a client uploaded (references set by the caller)."""
    out = pathinfo_pb2.NARInfo(nar_size=info.nar_size, nar_sha256=info.nar_sha256, signatures=info.signatures)
    if info.deriver is not None:
        out.deriver.CopyFrom(pathinfo_pb2.StorePath(name=info.deriver.name, digest=info.deriver.digest))
    if info.ca is not None:
        out.ca.CopyFrom(info.ca)
    return out
