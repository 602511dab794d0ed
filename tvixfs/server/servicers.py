"""What each RPC does, over any store's services.

Handlers take the request (or request stream) and return the response (or yield the response
stream); they raise service errors, which ``guard.guard`` turns into gRPC statuses. Validation of
what a client sends happens here or in the backend, before anything is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from functools import partial
from typing import Any

from tvixfs.castore.digest import check_digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import Node, node_from_proto
from tvixfs.protos import (
    blobbatch_pb2,
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_directory_pb2,
    rpc_pathinfo_pb2,
)
from tvixfs.server import damage
from tvixfs.server.limits import DEFAULT_READ_AHEAD_STREAMS, HeldBytes, ReadAheadSlots
from tvixfs.services.base import BlobService, DirectoryService, PathInfoService
from tvixfs.services.encodedclosure import EncodedClosures
from tvixfs.services.errors import (
    CorruptDataError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    StoreUnavailableError,
)
from tvixfs.services.readahead import ReadAhead, chunks_read_ahead
from tvixfs.services.regroup import in_messages
from tvixfs.services.wire.grpc_methods import (
    BLOB_PUT,
    BLOB_READ,
    BLOB_READ_MANY,
    BLOB_STAT,
    DIRECTORY_GET,
    DIRECTORY_PUT,
    PATHINFO_CALCULATE_NAR,
    PATHINFO_GET,
    PATHINFO_LIST,
    PATHINFO_PUT,
    Method,
)
from tvixfs.services.wire.messages import (
    PUT_DIRECTORIES_MAX,
    PUT_DIRECTORY_BYTES_MAX,
    READ_MANY_BLOB_MAX,
    READ_MANY_DIGESTS,
)
from tvixfs.store import nixbase32
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import HASH_SIZE

Handlers = dict[Method, Callable[[Any], Any]]

# Bytes per BlobChunk sent by Read: half the 4 MiB a default gRPC client accepts. Each message
# costs grpcio's sync server two thread hand-offs; against 1 MiB, 2 MiB messages save about a
# fifth of the context switches of a big read and some daemon CPU (figures: bench/ANALYSIS.md,
# "Figures behind constants").
READ_MESSAGE_SIZE = 2 << 20

# How a Read stream of a blob of many chunks reads them: by threads shared by all streams, in
# batches of about READ_AHEAD_BATCH bytes, up to READ_AHEAD bytes before they are due. It pays
# for a store on disk, which needs several reads in flight; one thread gains nothing
# (figures: bench/ANALYSIS.md).
READ_AHEAD = 8 << 20
READ_AHEAD_BATCH = 2 << 20
READ_AHEAD_THREADS = 4


# Blobs of one ReadMany read ahead of the one being sent, on the same threads and under the
# same slots (--read-ahead-streams) as Read streams: a cold store on disk then has several
# reads in flight. At most READ_MANY_AHEAD + 1 blobs of READ_MANY_BLOB_MAX held per call.
READ_MANY_AHEAD = 4

# One blob of a ReadMany: its pieces, or the error that fails it alone.
_Whole = list[bytes] | NotFoundError | CorruptDataError


def _taken(reads: ReadAhead[bytes, _Whole]) -> Iterator[_Whole]:
    try:
        while reads.peek() is not None:
            yield reads.take()
    finally:  # the call ended early: reads not started are not needed
        reads.cancel()


class BlobServicer:
    def __init__(
        self,
        blobs: BlobService,
        message_size: int = READ_MESSAGE_SIZE,
        read_ahead: Executor | None = None,
        read_ahead_slots: ReadAheadSlots | None = None,
    ) -> None:
        self._blobs = blobs
        self._message_size = message_size
        # Only a store that checks every chunk it reads, and reads it in this process: over a
        # remote store one stream of the whole blob is far cheaper than a call per chunk. Not
        # a store in memory: no disk to wait for, only hand-offs to pay (bench/ANALYSIS.md).
        can = blobs.capabilities
        local = can.verifies_chunk_reads and not can.calls_are_remote
        self._read_ahead = read_ahead if local and not can.reads_from_memory else None
        self._slots = read_ahead_slots or ReadAheadSlots(DEFAULT_READ_AHEAD_STREAMS)

    def handlers(self) -> Handlers:
        return {
            BLOB_STAT: self.stat,
            BLOB_READ: self.read,
            BLOB_PUT: self.put,
            BLOB_READ_MANY: self.read_many,
        }

    def stat(self, request: rpc_blobstore_pb2.StatBlobRequest) -> rpc_blobstore_pb2.StatBlobResponse:
        digest = check_digest(request.digest, "blob digest")
        chunks = self._blobs.stat(digest, request.send_chunks)
        if chunks is None:
            raise NotFoundError(f"blob {digest.hex()} not found")
        return rpc_blobstore_pb2.StatBlobResponse(
            chunks=[
                rpc_blobstore_pb2.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size)
                for c in (chunks if request.send_chunks else [])
            ]
        )

    def read(self, request: rpc_blobstore_pb2.ReadBlobRequest) -> Iterator[list[memoryview]]:
        """The blob's bytes; each message is the pieces of its ``data`` (see BLOB_READ)."""
        digest = check_digest(request.digest, "blob digest")
        return in_messages(self._pieces(digest), self._message_size)

    def read_many(
        self, request: blobbatch_pb2.ReadManyRequest
    ) -> Iterator[list[bytes] | blobbatch_pb2.ReadManyResponse]:
        """Each blob asked for, whole, in order: the pieces of a message's ``data`` (encoded as
        a Read message is: the field is the same), or a message saying it is missing or damaged.

        A blob fails alone: one damaged chunk file must not fail the other blobs of the call,
        which are mostly other files' (a program start asks for many at once)."""
        if len(request.digests) > READ_MANY_DIGESTS:
            raise InvalidArgumentError(
                f"ReadMany: {len(request.digests)} digests, at most {READ_MANY_DIGESTS}"
            )
        digests = [check_digest(d, f"digest #{i}") for i, d in enumerate(request.digests)]
        for whole in self._wholes(digests):
            if isinstance(whole, NotFoundError):
                yield blobbatch_pb2.ReadManyResponse(missing=True)
            elif isinstance(whole, CorruptDataError):
                damage.report("ReadMany", whole)
                yield blobbatch_pb2.ReadManyResponse(damaged=True)
            else:
                yield whole

    def _wholes(self, digests: list[bytes]) -> Iterator[_Whole]:
        """``_whole`` of each digest, in order; read ahead where the store lets us (``_pieces``)."""
        plain = map(self._whole, digests)
        if self._read_ahead is None or len(digests) < 2:
            return plain
        jobs = ((d, 1, partial(self._whole, d)) for d in digests)
        reads = ReadAhead(jobs, self._read_ahead, READ_MANY_AHEAD)
        return self._slots.pieces(lambda: _taken(reads), lambda: plain)

    def _whole(self, digest: bytes) -> _Whole:
        """A blob's pieces for ReadMany; what reading it raised if that fails this blob alone."""
        pieces: list[bytes] = []
        size = 0
        try:
            for piece in self._blobs.read(digest):
                size += len(piece)
                if size > READ_MANY_BLOB_MAX:
                    raise InvalidArgumentError(
                        f"ReadMany: blob {digest.hex()} has more than {READ_MANY_BLOB_MAX} bytes; "
                        "read it with BlobService.Read"
                    )
                pieces.append(piece)
        except (NotFoundError, CorruptDataError) as e:
            return e
        return pieces

    def _pieces(self, digest: bytes) -> Iterator[bytes]:
        """The blob from its store; its chunks read ahead where the store lets us.

        A stream from the store reads one chunk after the other: cold, every one is a wait
        for the disk, while several reads in flight keep it busy.
        """
        if self._read_ahead is not None:
            chunks = self._blobs.stat(digest, send_chunks=True)
            if chunks is not None and len(chunks) > 1:  # else one chunk, or not a blob (a chunk's digest)
                executor = self._read_ahead
                return self._slots.pieces(
                    lambda: chunks_read_ahead(self._blobs, chunks, executor, READ_AHEAD, READ_AHEAD_BATCH),
                    lambda: self._blobs.read(digest),
                )
        return self._blobs.read(digest)

    def put(self, requests: Iterator[rpc_blobstore_pb2.BlobChunk]) -> rpc_blobstore_pb2.PutBlobResponse:
        return rpc_blobstore_pb2.PutBlobResponse(digest=self._blobs.put(m.data for m in requests))


# What all directory Put streams together may hold at once: a directory costs its wire size
# four times (parsed, as measured) and 512 bytes besides. Beyond it a stream fails UNAVAILABLE,
# which a client retries (tvixfs's does).
PUT_DIRECTORIES_HELD = 1 << 30
_DIRECTORY_OVERHEAD = 512


class DirectoryServicer:
    def __init__(self, directories: DirectoryService) -> None:
        self._directories = directories
        self._held = HeldBytes(PUT_DIRECTORIES_HELD)

    def handlers(self) -> Handlers:
        return {DIRECTORY_GET: self.get, DIRECTORY_PUT: self.put}

    def get(self, request: rpc_directory_pb2.GetDirectoryRequest) -> Iterator[castore_pb2.Directory | bytes]:
        """The directory, or its closure; each message a Directory or its encoding (see
        DIRECTORY_GET)."""
        if request.WhichOneof("by_what") != "digest":
            raise InvalidArgumentError("GetDirectoryRequest: no digest given")
        digest = check_digest(request.digest, "directory digest")
        if request.recursive and isinstance(self._directories, EncodedClosures):
            yield from self._directories.get_recursive_encoded(digest)
            return
        if request.recursive:
            for directory in self._directories.get_recursive(digest):
                yield directory.to_proto()
            return
        found = self._directories.get(digest)
        if found is None:
            raise NotFoundError(f"directory {digest.hex()} not found")
        yield found.to_proto()

    def put(self, requests: Iterator[castore_pb2.Directory]) -> rpc_directory_pb2.PutDirectoryResponse:
        # The whole stream is validated before the backend sees any of it: the backend's
        # put_many is atomic, so a stream that fails anywhere stores nothing.
        batch = []
        size = held = 0
        try:
            for i, message in enumerate(requests):
                wire = message.ByteSize()
                size += wire
                if i >= PUT_DIRECTORIES_MAX or size > PUT_DIRECTORY_BYTES_MAX:
                    raise InvalidArgumentError(
                        f"DirectoryService/Put: more than {PUT_DIRECTORIES_MAX} directories or "
                        f"{PUT_DIRECTORY_BYTES_MAX >> 20} MiB in one stream"
                    )
                cost = 4 * wire + _DIRECTORY_OVERHEAD
                if not self._held.take(cost):
                    raise StoreUnavailableError(
                        "DirectoryService/Put: the server holds as many directory uploads as it "
                        f"may at once ({self._held.limit >> 20} MiB); retry later"
                    )
                held += cost
                try:
                    batch.append(Directory.from_proto(message))
                except ValidationError as e:
                    raise InvalidArgumentError(f"directory #{i} of the stream: {e}") from None
            return rpc_directory_pb2.PutDirectoryResponse(root_digest=self._directories.put_many(batch))
        finally:
            self._held.give(held)


class PathInfoServicer:
    def __init__(self, pathinfos: PathInfoService) -> None:
        self._pathinfos = pathinfos

    def handlers(self) -> Handlers:
        return {
            PATHINFO_GET: self.get,
            PATHINFO_PUT: self.put,
            PATHINFO_LIST: self.list,
            PATHINFO_CALCULATE_NAR: self.calculate_nar,
        }

    def get(self, request: rpc_pathinfo_pb2.GetPathInfoRequest) -> pathinfo_pb2.PathInfo:
        if request.WhichOneof("by_what") != "by_output_hash":
            raise InvalidArgumentError("GetPathInfoRequest: no by_output_hash given")
        output_hash = request.by_output_hash
        if len(output_hash) != HASH_SIZE:
            raise InvalidArgumentError(f"by_output_hash: expected {HASH_SIZE} bytes, got {len(output_hash)}")
        info = self._pathinfos.get(output_hash)
        if info is None:
            raise NotFoundError(f"no path info for {nixbase32.encode(output_hash)}")
        return info

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        """A client's NAR facts are claims: the NAR of the stored content must have them.

        Nix's daemon hashes every NAR it is given for the same reason. It costs one rendering
        of the path, from the store the client has just filled.
        """
        try:
            _, node = validate_pathinfo(info)
        except ValidationError as e:
            raise InvalidArgumentError(f"invalid PathInfo: {e}") from None
        if info.HasField("narinfo"):
            try:
                size, sha256 = self._pathinfos.calculate_nar(node)
            except NotFoundError as e:
                raise FailedPreconditionError(
                    f"{node.name.decode(errors='replace')}: its content is not in the store: {e}"
                ) from None
            if (size, sha256) != (info.narinfo.nar_size, info.narinfo.nar_sha256):
                name = node.name.decode(errors="replace")
                raise InvalidArgumentError(
                    f"{name}: the NAR of its content has {size} bytes and sha256 {sha256.hex()}, "
                    "not what its narinfo says; not stored"
                )
        return self._pathinfos.put(info)

    def list(self, request: rpc_pathinfo_pb2.ListPathInfoRequest) -> Iterator[pathinfo_pb2.PathInfo]:
        return self._pathinfos.list()

    def calculate_nar(self, request: castore_pb2.Node) -> rpc_pathinfo_pb2.CalculateNARResponse:
        size, sha256 = self._pathinfos.calculate_nar(_anonymous_node(request))
        return rpc_pathinfo_pb2.CalculateNARResponse(nar_size=size, nar_sha256=sha256)


def _anonymous_node(message: castore_pb2.Node) -> Node:
    """A root node whose name may be empty: a NAR does not contain the root's name."""
    kind = message.WhichOneof("node")
    if kind is not None and not getattr(message, kind).name:
        named = castore_pb2.Node()
        named.CopyFrom(message)
        getattr(named, kind).name = b"root"
        message = named
    return node_from_proto(message)
