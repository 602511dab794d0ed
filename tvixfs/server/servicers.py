"""What each RPC does, over any store's services.

Handlers take the request (or request stream) and return the response (or yield the response
stream); they raise service errors, which ``status.guard`` turns into gRPC statuses. Validation of
what a client sends happens here or in the backend, before anything is stored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from tvixfs.castore.digest import check_digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import Node, node_from_proto
from tvixfs.protos import castore_pb2, pathinfo_pb2, rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2
from tvixfs.server.limits import DEFAULT_READ_AHEAD_STREAMS, ReadAheadSlots
from tvixfs.services.base import BlobService, ChunkMeta, DirectoryService, PathInfoService
from tvixfs.services.errors import CorruptDataError, InvalidArgumentError, NotFoundError
from tvixfs.services.grpc_methods import (
    BLOB_PUT,
    BLOB_READ,
    BLOB_STAT,
    DIRECTORY_GET,
    DIRECTORY_PUT,
    PATHINFO_CALCULATE_NAR,
    PATHINFO_GET,
    PATHINFO_LIST,
    PATHINFO_PUT,
    Method,
)
from tvixfs.store import nixbase32
from tvixfs.store.storepath import HASH_SIZE

Handlers = dict[Method, Callable[[Any], Any]]

# Bytes per BlobChunk sent by Read. Measured with bench/grpc_bench.py (raw stream over loopback,
# 2 busy cores, ranges over runs): 64 KiB 260-620 MiB/s, 256 KiB 500-810, 1 MiB 650-1090,
# 2 MiB 620-1220, 3 MiB 250-630. 1 MiB is as fast as any and a quarter of the 4 MiB a default
# gRPC client accepts.
READ_MESSAGE_SIZE = 1 << 20

# How a Read stream of a blob of many chunks reads them: by threads shared by all streams, in
# batches of about READ_AHEAD_BATCH bytes, up to READ_AHEAD bytes before they are due. A mount
# reading a 256 MiB blob (858 chunk files) cold over loopback, 6-7 interleaved reps: store on
# disk, chunk after chunk 1.11-1.39 s, read ahead 0.88-0.99 s, the same daemon CPU; a store in
# memory (tmpfs) gains nothing, and costs the daemon 0.41 -> 0.46 s of CPU (0.51 s with a hand-over
# between threads per chunk). One thread gains nothing: the disk needs several reads in flight
# (cat of the chunk files, cold: 0.47 s one at a time, 0.22 s four at a time).
READ_AHEAD = 8 << 20
READ_AHEAD_BATCH = 2 << 20
READ_AHEAD_THREADS = 4


def rechunk(pieces: Iterable[bytes], size: int) -> Iterator[list[memoryview]]:
    """The same bytes grouped into messages of ``size`` (the last may be shorter).

    Each message is the list of views of the pieces it is made of: nothing is copied here,
    the encoder (``encode_blob_chunk``) copies each byte once, into the message sent.
    """
    parts: list[memoryview] = []
    held = 0
    for piece in pieces:
        view = memoryview(piece)
        while held + len(view) >= size:
            take = size - held
            parts.append(view[:take])
            yield parts
            parts, held = [], 0
            view = view[take:]
        if view:
            parts.append(view)
            held += len(view)
    if parts:
        yield parts


def read_ahead(
    blobs: BlobService, chunks: list[ChunkMeta], executor: Executor, ahead: int, batch: int
) -> Iterator[bytes]:
    """The chunks' bytes in order, read by ``executor`` in batches of about ``batch`` bytes, up
    to ``ahead`` bytes before they are due.

    Each chunk is read by its own digest, so the store checks it as it checks any read.
    """

    def fetch(metas: list[ChunkMeta]) -> list[bytes]:
        out = []
        for meta in metas:
            data = b"".join(blobs.read(meta.digest))
            if len(data) != meta.size:
                raise CorruptDataError(
                    f"chunk {meta.digest.hex()}: {len(data)} bytes, its blob lists {meta.size}"
                )
            out.append(data)
        return out

    pending: deque[tuple[Future[list[bytes]], int]] = deque()
    held = 0
    try:
        for metas in _batches(chunks, batch):
            size = sum(meta.size for meta in metas)
            pending.append((executor.submit(fetch, metas), size))
            held += size
            while held >= ahead:
                future, size = pending.popleft()
                held -= size
                yield from future.result()
        while pending:
            yield from pending.popleft()[0].result()
    finally:
        for future, _ in pending:  # the stream ended early: reads not started are not needed
            future.cancel()


def _batches(chunks: list[ChunkMeta], size: int) -> Iterator[list[ChunkMeta]]:
    """Consecutive chunks in groups of at least ``size`` bytes (the last may be smaller)."""
    batch: list[ChunkMeta] = []
    held = 0
    for meta in chunks:
        batch.append(meta)
        held += meta.size
        if held >= size:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


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
        # remote store one stream of the whole blob is far cheaper than a call per chunk.
        local = blobs.verifies_reads and not blobs.remote_reads
        self._read_ahead = read_ahead if local else None
        self._slots = read_ahead_slots or ReadAheadSlots(DEFAULT_READ_AHEAD_STREAMS)

    def handlers(self) -> Handlers:
        return {BLOB_STAT: self.stat, BLOB_READ: self.read, BLOB_PUT: self.put}

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
        return rechunk(self._pieces(digest), self._message_size)

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
                    lambda: read_ahead(self._blobs, chunks, executor, READ_AHEAD, READ_AHEAD_BATCH),
                    lambda: self._blobs.read(digest),
                )
        return self._blobs.read(digest)

    def put(self, requests: Iterator[rpc_blobstore_pb2.BlobChunk]) -> rpc_blobstore_pb2.PutBlobResponse:
        return rpc_blobstore_pb2.PutBlobResponse(digest=self._blobs.put(m.data for m in requests))


class DirectoryServicer:
    def __init__(self, directories: DirectoryService) -> None:
        self._directories = directories

    def handlers(self) -> Handlers:
        return {DIRECTORY_GET: self.get, DIRECTORY_PUT: self.put}

    def get(self, request: rpc_directory_pb2.GetDirectoryRequest) -> Iterator[castore_pb2.Directory]:
        if request.WhichOneof("by_what") != "digest":
            raise InvalidArgumentError("GetDirectoryRequest: no digest given")
        digest = check_digest(request.digest, "directory digest")
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
        for i, message in enumerate(requests):
            try:
                batch.append(Directory.from_proto(message))
            except ValidationError as e:
                raise InvalidArgumentError(f"directory #{i} of the stream: {e}") from None
        return rpc_directory_pb2.PutDirectoryResponse(root_digest=self._directories.put_many(batch))


class PathInfoServicer:
    def __init__(self, pathinfos: PathInfoService) -> None:
        self._pathinfos = pathinfos

    def handlers(self) -> Handlers:
        return {
            PATHINFO_GET: self.get,
            PATHINFO_PUT: self._pathinfos.put,
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
