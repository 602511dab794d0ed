"""The object layout of an ``s3://`` store, byte-compatible with tvix-store's object-store backends.

Pure encoding and decoding (no I/O), so that the layout can be checked byte for byte and shared
by the services, fsck and the tests. Under the store's PREFIX:

- ``chunks/b3/<hex d[0:2]>/<hex d>``: zstd (default level) of a chunk's bytes, ``d`` the BLAKE3
  of the uncompressed bytes. A blob that is a single chunk lives here too, under its own digest.
- ``blobs/b3/<hex d[0:2]>/<hex d>``: a protobuf ``StatBlobResponse`` (chunk list, empty ``bao``),
  not compressed; its chunk list is empty when the blob is one chunk.
- ``dirs/b3/<hex d[0:2]>/<hex d>``: one object per **root** directory: a zstd stream of frames,
  each a 4-byte big-endian length and a protobuf ``Directory``, root first, then breadth-first,
  each digest once. A directory that is no tree's root is not addressable.
- ``pathinfos/<nixbase32 of the 20-byte store path hash>``: one protobuf ``PathInfo`` (tvixfs's
  own: tvix has no object-store path info service). Listing this prefix lists the store.

Everything read back is verified here: a chunk's digest and size, every directory's digest
and its place in the tree, and no decompression may run past its limit (a zstd "bomb").
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator

import zstandard

from tvixfs.castore.digest import b3digest, check_digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.protos import castore_pb2, rpc_blobstore_pb2
from tvixfs.services.base import ChunkMeta
from tvixfs.services.errors import CorruptDataError
from tvixfs.store import nixbase32

# FastCDC sizes tvix-store cuts blobs with; matching them makes the two dedup against each other.
MIN_CHUNK = 128 * 1024
AVG_CHUNK = 256 * 1024
MAX_CHUNK = 512 * 1024
# A directory message larger than this is refused as corrupt (tvix's gRPC limit is 4 MiB too).
MAX_DIRECTORY_MESSAGE = 4 * 1024 * 1024

CHUNKS, BLOBS, DIRS, PATHINFOS = "chunks/b3/", "blobs/b3/", "dirs/b3/", "pathinfos/"
_LENGTH = struct.Struct(">I")


def _sharded(kind: str, digest: bytes) -> str:
    check_digest(digest)
    return f"{kind}{digest[:2].hex()}/{digest.hex()}"


def chunk_key(digest: bytes) -> str:
    return _sharded(CHUNKS, digest)


def blob_key(digest: bytes) -> str:
    return _sharded(BLOBS, digest)


def dir_key(digest: bytes) -> str:
    return _sharded(DIRS, digest)


def pathinfo_key(output_hash: bytes) -> str:
    return PATHINFOS + nixbase32.encode(output_hash)


def digest_of_key(key: str) -> bytes | None:
    """The digest a ``chunks/``, ``blobs/`` or ``dirs/`` key names, None if it names none."""
    name = key.rsplit("/", 1)[-1]
    try:
        digest = bytes.fromhex(name)
    except ValueError:
        return None
    return digest if len(digest) == 32 and name == digest.hex() else None


def encode_chunk(data: bytes | memoryview) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _inflate(data: bytes, limit: int, what: str) -> bytes:
    """zstd-decompress at most ``limit`` bytes; more, or a broken stream, is corrupt data."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as r:
            out = r.read(limit + 1)
    except zstandard.ZstdError as e:
        raise CorruptDataError(f"{what}: not a valid zstd stream ({e})") from None
    if len(out) > limit:
        raise CorruptDataError(f"{what}: inflates past {limit} bytes (a zstd bomb or a wrong size)")
    return out


def decode_chunk(data: bytes, digest: bytes, size: int | None = None) -> bytes:
    """The plaintext of a chunk object, checked against its digest (and its listed size)."""
    limit = MAX_CHUNK if size is None else size
    plain = _inflate(data, limit, f"chunk {digest.hex()}")
    if size is not None and len(plain) != size:
        raise CorruptDataError(f"chunk {digest.hex()}: {len(plain)} bytes, listed as {size}")
    if b3digest(plain) != digest:
        raise CorruptDataError(f"chunk {digest.hex()}: content does not match its digest")
    return plain


def encode_blob(chunks: Iterable[ChunkMeta]) -> bytes:
    msg = rpc_blobstore_pb2.StatBlobResponse(
        chunks=[rpc_blobstore_pb2.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size) for c in chunks]
    )
    return msg.SerializeToString(deterministic=True)


def decode_blob(data: bytes, digest: bytes) -> list[ChunkMeta]:
    msg = rpc_blobstore_pb2.StatBlobResponse()
    try:
        msg.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError, whose module path is not stable
        raise CorruptDataError(f"blob {digest.hex()}: not a StatBlobResponse") from None
    chunks = []
    for c in msg.chunks:
        if len(c.digest) != 32 or c.size > MAX_CHUNK * 64:
            raise CorruptDataError(f"blob {digest.hex()}: invalid chunk entry")
        chunks.append(ChunkMeta(bytes(c.digest), c.size))
    return chunks


def tree_order(root: Directory, batch: dict[bytes, Directory]) -> list[Directory]:
    """The tree under ``root``, root first then breadth-first, each digest once: the order a
    directory stream holds. Every descendant must be in ``batch``."""
    order, seen, at = [root], {root.digest()}, 0
    while at < len(order):
        for child in order[at].directories:
            if child.digest not in seen:
                seen.add(child.digest)
                order.append(batch[child.digest])
        at += 1
    return order


def encode_tree(directories: Iterable[Directory]) -> bytes:
    """A directory stream: zstd of length-prefixed Directory messages, in the order given."""
    compressor = zstandard.ZstdCompressor().compressobj()
    parts = []
    for directory in directories:
        message = directory.to_bytes()
        parts.append(compressor.compress(_LENGTH.pack(len(message)) + message))
    parts.append(compressor.flush())
    return b"".join(parts)


def decode_tree(data: bytes, root: bytes) -> Iterator[Directory]:
    """The directories of a stream, each checked: the first is ``root``, each later one is
    referred to by one before it and comes once, and the stream holds the whole tree."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        expected, seen = {root}, set()
        while True:
            head = _read_exact(reader, _LENGTH.size)
            if not head:
                break
            if len(head) < _LENGTH.size:
                raise CorruptDataError(f"directory stream {root.hex()}: truncated")
            (length,) = _LENGTH.unpack(head)
            if length > MAX_DIRECTORY_MESSAGE:
                raise CorruptDataError(f"directory stream {root.hex()}: a {length}-byte message")
            message = _read_exact(reader, length)
            if len(message) < length:
                raise CorruptDataError(f"directory stream {root.hex()}: truncated")
            directory = _parse_directory(message, root)
            digest = b3digest(message)
            if digest not in expected or digest in seen:
                raise CorruptDataError(
                    f"directory stream {root.hex()}: directory {digest.hex()} is not in the tree"
                )
            seen.add(digest)
            expected.update(child.digest for child in directory.directories)
            yield directory
    except zstandard.ZstdError as e:
        raise CorruptDataError(f"directory stream {root.hex()}: not a valid zstd stream ({e})") from None
    if expected != seen:
        raise CorruptDataError(f"directory stream {root.hex()}: truncated (directories missing)")


def _read_exact(reader: zstandard.ZstdDecompressionReader, size: int) -> bytes:
    """``size`` bytes, fewer only at the end of the stream."""
    parts, got = [], 0
    while got < size:
        part = reader.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _parse_directory(message: bytes, root: bytes) -> Directory:
    msg = castore_pb2.Directory()
    try:
        msg.ParseFromString(message)
        directory = Directory.from_proto(msg)
    except ValidationError as e:
        raise CorruptDataError(f"directory stream {root.hex()}: invalid directory ({e})") from None
    except Exception:  # protobuf's DecodeError
        raise CorruptDataError(f"directory stream {root.hex()}: undecodable directory") from None
    if directory.to_bytes() != message:
        # The digest is that of the canonical encoding; a non-canonical one would verify wrongly.
        raise CorruptDataError(f"directory stream {root.hex()}: non-canonical directory encoding")
    return directory
