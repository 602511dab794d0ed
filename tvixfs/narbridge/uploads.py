"""What a ``PUT`` does: a NAR file into the castore, then a narinfo into a PathInfo.

A NAR upload is first spooled to a temporary file while its sha256 is taken, because the file
hash in its name must be checked before anything reaches the store; then it is decompressed
and parsed into blobs and directories (``read_nar_blobs``), with the decompressed size capped
(a decompression bomb stops at the cap), and recorded in the pending table. The narinfo PUT
checks the narinfo against that record and the store, then commits the PathInfo. Every refusal
is an ``UploadError`` carrying the HTTP status the client gets; nothing is visible in the store
before the PathInfo is committed.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import zstandard

from tvixfs.castore.errors import ValidationError
from tvixfs.narbridge.pending import PendingNar, PendingTable
from tvixfs.narbridge.signatures import PublicKey, nix_fingerprint, verify
from tvixfs.services.base import Store
from tvixfs.services.errors import StoreError
from tvixfs.services.ingest import commit_stored, read_nar_blobs
from tvixfs.store import nixbase32
from tvixfs.store.narinfo import NarInfo, parse_narinfo, pathinfo_narinfo
from tvixfs.store.nixtext import format_hash

# Upload file name extension -> the narinfo ``Compression`` Nix writes for it.
COMPRESSIONS = {"": "none", ".xz": "xz", ".zst": "zstd", ".bz2": "bzip2"}
_SPOOL_PIECE = 1 << 20
_UPLOAD_NAR = re.compile(r"/?nar/([0-9abcdfghijklmnpqrsvwxyz]{52})\.nar(\.xz|\.zst|\.bz2)?")
_NAR_NAME = b"nar"  # the root's name until the narinfo names the store path


class UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_nar_size: int  # bytes of an upload as sent, and again of the NAR it decompresses to
    # Uploads are spooled here, not to /tmp (often a small tmpfs): the pending table's directory.
    spool_dir: Path | None = None


class _Capped(io.RawIOBase):
    """A stream that fails once more than ``cap`` bytes were read from it."""

    def __init__(self, stream: IO[bytes], cap: int) -> None:
        self._stream = stream
        self._left = cap
        self._cap = cap

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(min(len(buffer), self._left + 1))
        if len(data) > self._left:
            raise UploadError(413, f"the NAR decompresses to more than {self._cap} bytes")
        self._left -= len(data)
        buffer[: len(data)] = data
        return len(data)


@contextmanager
def _decompressed(spool: IO[bytes], compression: str) -> Iterator[IO[bytes]]:
    if compression == "none":
        yield spool
    elif compression == "xz":
        with lzma.LZMAFile(spool) as xz:
            yield cast(IO[bytes], xz)
    elif compression == "bzip2":
        with bz2.BZ2File(spool) as b:
            yield cast(IO[bytes], b)
    else:
        with zstandard.ZstdDecompressor().stream_reader(spool, read_across_frames=True, closefd=False) as z:
            yield cast(IO[bytes], z)


def _spool(body: IO[bytes], length: int, into: IO[bytes]) -> bytes:
    """Copy exactly ``length`` bytes of ``body``; their sha256. 400 if the client sent fewer."""
    sha = hashlib.sha256()
    left = length
    while left:
        piece = body.read(min(left, _SPOOL_PIECE))
        if not piece:
            raise UploadError(400, f"upload truncated: {length - left} of {length} bytes arrived")
        sha.update(piece)
        into.write(piece)
        left -= len(piece)
    return sha.digest()


def receive_nar(
    store: Store,
    *,
    pending: PendingTable,
    file_sha256: bytes,
    compression: str,
    body: IO[bytes],
    length: int,
    limits: Limits,
) -> None:
    """Check, decompress and ingest one uploaded NAR file; record it for its narinfo."""
    if length > limits.max_nar_size:
        raise UploadError(413, f"upload of {length} bytes exceeds the limit of {limits.max_nar_size}")
    with tempfile.TemporaryFile(prefix="tvixfs-nar-upload-", dir=limits.spool_dir) as spool:
        got = _spool(body, length, spool)
        if got != file_sha256:
            raise UploadError(
                400, f"the file has hash {format_hash(got)}, its name says {format_hash(file_sha256)}"
            )
        spool.seek(0)
        try:
            with _decompressed(spool, compression) as stream:
                capped = cast(
                    IO[bytes], io.BufferedReader(_Capped(stream, limits.max_nar_size), _SPOOL_PIECE)
                )
                contents = read_nar_blobs(store, capped, _NAR_NAME)
        except OSError as e:
            if e.errno is not None:  # the spool or the store, not the data (bz2 says OSError too)
                raise UploadError(500, f"cannot store the upload: {e}") from None
            raise UploadError(400, f"cannot decompress the {compression} upload: {e}") from None
        except (lzma.LZMAError, EOFError, zstandard.ZstdError) as e:
            raise UploadError(400, f"cannot decompress the {compression} upload: {e}") from None
        except ValidationError as e:
            raise UploadError(400, f"not a valid NAR: {e}") from None
    if contents.directories:
        store.directories.put_many(contents.directories)
    pending.add(PendingNar(file_sha256, length, contents.nar_sha256, contents.nar_size, contents.root))


def parse_upload_url(url: str) -> tuple[bytes, str] | None:
    """``nar/<filehash>.nar[.ext]`` (leading slash or not) -> (file sha256, compression), or None."""
    match = _UPLOAD_NAR.fullmatch(url)
    if match is None:
        return None
    return nixbase32.decode(match.group(1)), COMPRESSIONS[match.group(2) or ""]


def parse_upload_narinfo(data: bytes) -> NarInfo:
    try:
        return parse_narinfo(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UploadError(400, "narinfo is not UTF-8 text") from None
    except ValidationError as e:
        raise UploadError(400, str(e)) from None


def receive_narinfo(
    store: Store,
    *,
    pending: PendingTable,
    url_hash: str,
    info: NarInfo,
    trusted: list[PublicKey],
) -> None:
    """Turn a narinfo and its earlier NAR upload into a PathInfo, or refuse with a status."""
    path = info.store_path
    if path.hash_part != url_hash:
        raise UploadError(400, f"narinfo for {path} uploaded as {url_hash}.narinfo")
    fingerprint = nix_fingerprint(path, info.nar_sha256, info.nar_size, info.references)
    if trusted and not verify(trusted, fingerprint, info.signatures):
        raise UploadError(403, f"{path}: no valid signature by a trusted key")
    target = parse_upload_url(info.url)
    if target is None:
        raise UploadError(
            400, f"narinfo URL {info.url!r} is not a NAR upload of this cache (nar/<hash>.nar...)"
        )
    file_sha256, compression = target
    if info.compression != compression:
        raise UploadError(
            400, f"narinfo says Compression: {info.compression}, its URL {info.url!r} a {compression} file"
        )
    if info.file_sha256 is not None and info.file_sha256 != file_sha256:
        raise UploadError(400, "narinfo FileHash differs from the hash in its URL")
    nar = pending.get(file_sha256)
    if nar is None:
        raise UploadError(400, f"no upload of {info.url} (or it expired): PUT the NAR first")
    if (nar.nar_sha256, nar.nar_size) != (info.nar_sha256, info.nar_size):
        raise UploadError(
            400,
            f"{path}: the uploaded NAR has {format_hash(nar.nar_sha256)} ({nar.nar_size} bytes), "
            f"the narinfo says {format_hash(info.nar_sha256)} ({info.nar_size} bytes)",
        )
    if info.file_size is not None and info.file_size != nar.file_size:
        raise UploadError(400, f"narinfo FileSize {info.file_size}, upload was {nar.file_size} bytes")
    missing = [r for r in info.references if r != path and store.pathinfos.get(r.digest) is None]
    if missing:
        # Refused so that a store's closures stay complete: Nix uploads references first.
        names = " ".join(r.basename for r in missing[:5])
        raise UploadError(400, f"{path} refers to paths this store lacks: {names}")
    existing = store.pathinfos.get(path.digest)
    if existing is not None:
        if existing.narinfo.nar_sha256 == info.nar_sha256:
            return  # the same path again: stored paths are immutable, and this one matches
        raise UploadError(409, f"{path} is already stored with a different NAR hash")
    try:
        commit_stored(store, path, nar.root, pathinfo_narinfo(info), info.references)
    except ValidationError as e:
        raise UploadError(400, str(e)) from None
    except StoreError as e:
        raise UploadError(500, f"cannot store {path}: {e}") from None
