"""``grpc+http://`` and ``grpc+unix://``: a remote tvix/snix store, verified on receipt.

The server is not trusted: every blob and chunk is checked against its BLAKE3 digest before a
byte of it is handed on, every Directory against the digest it was asked for, a recursive Get
against the closure it claims to be, and every PathInfo against the rules and the requested
hash. Whatever fails raises CorruptDataError. Synchronous and thread-safe like every backend.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import chain
from typing import Any

import grpc

from tvixfs.castore.closure import ClosureError, RootFirst
from tvixfs.castore.digest import b3digest, check_digest, new_hasher
from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import Node, node_to_proto
from tvixfs.protos import blobbatch_pb2, pathinfo_pb2, rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2
from tvixfs.services.backends.grpc_channel import Connection, first_message, receive
from tvixfs.services.base import (
    BlobCapabilities,
    BlobService,
    ChunkMeta,
    DirectoryService,
    PathInfoService,
    Store,
    read_outcome,
)
from tvixfs.services.chunkcheck import verified
from tvixfs.services.clientconfig import ClientConfig
from tvixfs.services.errors import (
    CorruptDataError,
    InvalidArgumentError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)
from tvixfs.services.regroup import exact_pieces
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
    UNDECODABLE,
    encode_blob_chunk,
)
from tvixfs.services.wire.messages import READ_MANY_BLOB_MAX, READ_MANY_DIGESTS
from tvixfs.store import nixbase32
from tvixfs.store.pathinfo import SHA256_SIZE, validate_pathinfo
from tvixfs.store.storepath import HASH_SIZE, StorePath

log = logging.getLogger(__name__)

# A blob is read in one stream and buffered until verified; past this size we ask for its chunk
# list instead, so that a big blob streams chunk by verified chunk.
WHOLE_READ_LIMIT = 8 << 20
# Bytes per BlobChunk we send: below the 4 MiB receive limit of a default gRPC server.
PUT_MESSAGE = 1 << 20
# Reads at once of the chunks of one read_many that are not asked for in one call.
EACH_CALLS = 16


class GrpcBlobService(BlobService):
    # The server is not trusted: see the module docstring.
    # Everything received is hashed here: nothing a server sends is taken on its word.
    capabilities = BlobCapabilities(
        verifies_chunk_reads=True, verifies_every_read=True, calls_are_remote=True, reads_many=True
    )

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # Whether the server has BlobBatchService; found out by the first read_many.
        self._batches = True
        self._pool: ThreadPoolExecutor | None = None  # for _read_each, made on first use
        self._pool_lock = threading.Lock()

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        check_digest(digest)
        request = rpc_blobstore_pb2.StatBlobRequest(digest=digest, send_chunks=send_chunks)
        what = f"stat blob {digest.hex()}"
        try:
            response: rpc_blobstore_pb2.StatBlobResponse = self._conn.call(
                BLOB_STAT, lambda f: f(request, timeout=self._conn.config.timeout), what
            )
        except NotFoundError:
            return None
        chunks = []
        for i, chunk in enumerate(response.chunks):
            if len(chunk.digest) != len(digest):
                raise CorruptDataError(f"{what}: chunk {i} has a {len(chunk.digest)}-byte digest")
            chunks.append(ChunkMeta(chunk.digest, chunk.size))
        return chunks

    def read(self, digest: bytes) -> Iterator[bytes]:
        check_digest(digest)
        return self._read(digest)

    def read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        """One ReadMany call of tvixfs's BlobBatchService where the server has it (tvixfs
        daemon does); each chunk read alone where it has not. Each answer is checked against its
        chunk's digest and size, as ``read`` checks, and handed on as it arrives.

        Each gRPC call costs each side about 0.3 ms of CPU whatever its size, and the fixed cost
        of calls, not bytes, is what a program start over a near store spends its time on.
        """
        for chunk in chunks:
            check_digest(chunk.digest)
        return self._read_many(chunks)

    def _read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        small = [i for i, c in enumerate(chunks) if c.size <= READ_MANY_BLOB_MAX]
        if not self._batches or len(small) < 2:
            small = []
        for start in range(0, len(small), READ_MANY_DIGESTS):
            group = small[start : start + READ_MANY_DIGESTS]
            answers = self._read_batch([chunks[i] for i in group])
            if answers is None:  # no BlobBatchService: these too one by one, below
                small = small[:start]
                break
            answered = 0  # answers come in the order asked
            try:
                for i, outcome in answers:
                    yield group[i], outcome
                    answered += 1
            except StoreUnavailableError:
                raise
            except StoreError as e:
                # The call failed part way for the call's sake (a daemon that predates the
                # ``damaged`` answer fails it at a damaged blob, a confused server): the
                # chunks it did not answer are other files' and are read alone.
                rest = group[answered:]
                log.info("%s; reading the %d chunks it did not answer one by one", e, len(rest))
                for i, outcome in self._read_each([chunks[j] for j in rest]):
                    yield rest[i], outcome
        batched = set(small)
        alone = [i for i in range(len(chunks)) if i not in batched]
        for i, outcome in self._read_each([chunks[i] for i in alone]):
            yield alone[i], outcome

    def _read_each(self, chunks: list[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        """Each chunk with its own Read, up to ``EACH_CALLS`` at once: against a server without
        BlobBatchService a batch then still costs one round trip, not one per chunk."""
        if len(chunks) < 2:
            yield from BlobService.read_many(self, chunks)
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(EACH_CALLS, thread_name_prefix="grpc-read-each")
            pool = self._pool
        reads = {pool.submit(read_outcome, self, chunk): i for i, chunk in enumerate(chunks)}
        try:
            for read in as_completed(reads):
                yield reads[read], read.result()
        finally:
            for read in reads:
                read.cancel()

    def _read_batch(self, chunks: list[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]] | None:
        """One ReadMany, its answers as they arrive; None if the server has no BlobBatchService."""
        request = blobbatch_pb2.ReadManyRequest(digests=[c.digest for c in chunks])

        def invoke(method: Any) -> tuple[Any, Any] | None:
            try:
                return first_message(method(request, timeout=self._conn.config.stream_timeout))
            except grpc.RpcError as e:
                if isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.UNIMPLEMENTED:
                    return None
                raise

        what = f"read {len(chunks)} chunks from {chunks[0].digest.hex()}"
        opened = self._conn.call(BLOB_READ_MANY, invoke, what)
        if opened is None:
            log.info("%s has no BlobBatchService: reading chunks one call each", self._conn.target)
            self._batches = False
            return None
        first, call = opened
        return _batch_answers(chunks, chain([] if first is None else [first], receive(call, what)), what)

    def _read(self, digest: bytes) -> Iterator[bytes]:
        what = f"read blob {digest.hex()}"
        request = rpc_blobstore_pb2.ReadBlobRequest(digest=digest)
        parts, rest = self._conn.call(
            BLOB_READ,
            lambda f: _receive_up_to(f(request, timeout=self._conn.config.stream_timeout), WHOLE_READ_LIMIT),
            what,
        )
        if rest is not None:
            chunks = self.stat(digest, send_chunks=True)
            if chunks and (len(chunks) > 1 or chunks[0].digest != digest):
                yield from self._read_chunked(digest, chunks, chain(parts, receive(rest, what)))
                return
            parts.extend(receive(rest, what))
        data = b"".join(parts)  # the messages' data are views: one copy, into one piece
        if b3digest(data) != digest:
            raise CorruptDataError(f"{what}: the server sent bytes with another BLAKE3 digest")
        yield data

    def read_chunks(self, digest: bytes, chunks: Sequence[ChunkMeta]) -> Iterator[bytes]:
        """The blob in one Read stream, cut into ``chunks``, each checked against its digest
        before it is yielded.

        For a caller that holds the blob's chunk list already (a mount's chunk map): no Stat
        first, and each byte is hashed once. The whole blob is not hashed as ``read`` does:
        that check could only fail after the last chunk, when the caller has used them all,
        so such a caller relies on its chunk list (fs/chunkmap.py says why that is the known limit).
        """
        check_digest(digest)
        return self._read_chunks(digest, chunks)

    def _read_chunks(self, digest: bytes, chunks: Sequence[ChunkMeta]) -> Iterator[bytes]:
        what = f"read blob {digest.hex()}"
        request = rpc_blobstore_pb2.ReadBlobRequest(digest=digest)
        first, call = self._conn.call(
            BLOB_READ,
            lambda f: first_message(f(request, timeout=self._conn.config.stream_timeout)),
            what,
        )
        yield from self._checked(digest, chunks, chain([] if first is None else [first], receive(call, what)))

    def _checked(
        self, digest: bytes, chunks: Sequence[ChunkMeta], received: Iterable[bytes | memoryview]
    ) -> Iterator[bytes]:
        """``received`` cut into ``chunks``, each checked against its digest before it is yielded."""
        what = f"read blob {digest.hex()}"
        pieces = exact_pieces(received, [c.size for c in chunks], what)
        for meta, data in zip(chunks, pieces, strict=True):
            yield verified(data, meta.digest, meta.size, what)

    def _read_chunked(
        self, digest: bytes, chunks: list[ChunkMeta], received: Iterable[bytes | memoryview]
    ) -> Iterator[bytes]:
        """Stream a big blob, each chunk verified against the chunk list before it is yielded.

        The bytes come from the one Read stream of the whole blob (no call per chunk); if that
        stream breaks, the remaining chunks are fetched by their own digests, with retries.
        """
        hasher = new_hasher()
        done = 0
        try:
            for data in self._checked(digest, chunks, received):
                yield data
                hasher.update(data)
                done += 1
        except StoreUnavailableError as e:
            log.info("%s; fetching its %d remaining chunks one by one", e, len(chunks) - done)
            for meta in chunks[done:]:
                data = self._fetch_chunk(digest, meta)
                yield data
                hasher.update(data)
        if hasher.digest() != digest:
            # Every chunk matched its own digest, but the chunk list describes another blob.
            raise CorruptDataError(f"read blob {digest.hex()}: its chunk list describes other bytes")

    def _fetch_chunk(self, blob: bytes, meta: ChunkMeta) -> bytes:
        request = rpc_blobstore_pb2.ReadBlobRequest(digest=meta.digest)
        data: bytes = self._conn.call(
            BLOB_READ,
            lambda f: b"".join(f(request, timeout=self._conn.config.timeout)),
            f"read chunk {meta.digest.hex()} of blob {blob.hex()}",
        )
        return verified(data, meta.digest, meta.size, f"read blob {blob.hex()}")

    def put(self, data: Iterable[bytes]) -> bytes:
        hasher = new_hasher()
        failure: list[Exception] = []

        def messages() -> Iterator[bytes]:
            try:
                for piece in data:
                    hasher.update(piece)
                    for i in range(0, len(piece), PUT_MESSAGE):
                        yield encode_blob_chunk([piece[i : i + PUT_MESSAGE]])
            except Exception as e:
                # Not the end of the stream, which would store a truncated blob: see UNDECODABLE.
                failure.append(e)
                yield UNDECODABLE

        def invoke(method: Any) -> rpc_blobstore_pb2.PutBlobResponse:
            try:
                response: rpc_blobstore_pb2.PutBlobResponse = method(
                    messages(), timeout=self._conn.config.stream_timeout
                )
            except grpc.RpcError:
                if failure:
                    raise failure[0] from None
                raise
            return response

        response = self._conn.call(BLOB_PUT, invoke, "put blob", idempotent=False)
        if failure:
            raise failure[0]
        expected: bytes = hasher.digest()
        if response.digest != expected:
            raise CorruptDataError(
                f"put blob: the server answered digest {response.digest.hex()}, expected {expected.hex()}"
            )
        return expected

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        self._conn.close()


def _batch_answers(
    chunks: list[ChunkMeta], answers: Iterable[blobbatch_pb2.ReadManyResponse], what: str
) -> Iterator[tuple[int, bytes | Exception]]:
    """The ReadMany answers, one per chunk in order, each checked; CorruptDataError for the
    chunks left when the server answers fewer or more."""
    count = 0
    for answer in answers:
        if count == len(chunks):
            raise CorruptDataError(f"{what}: the server answered more than asked")
        chunk = chunks[count]
        about = f"read chunk {chunk.digest.hex()}"
        outcome: bytes | Exception = NotFoundError(f"{about}: not found")
        if answer.damaged:
            outcome = CorruptDataError(f"{about}: the server's copy is damaged")
        elif not answer.missing:
            try:
                outcome = verified(answer.data, chunk.digest, chunk.size, about)
            except CorruptDataError as e:
                outcome = e
        yield count, outcome
        count += 1
    if count < len(chunks):
        raise CorruptDataError(f"{what}: the server answered {count} of them")


def _receive_up_to(call: Any, limit: int) -> tuple[list[bytes | memoryview], Any]:
    """Receive a Read stream; stop after ``limit`` bytes and hand back the unread rest."""
    parts: list[bytes | memoryview] = []
    size = 0
    for data in call:
        parts.append(data)
        size += len(data)
        if size > limit:
            return parts, call
    return parts, None


class GrpcDirectoryService(DirectoryService):
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get(self, digest: bytes) -> Directory | None:
        check_digest(digest)
        what = f"get directory {digest.hex()}"
        request = rpc_directory_pb2.GetDirectoryRequest(digest=digest)
        try:
            messages: list[bytes] = self._conn.call(
                DIRECTORY_GET, lambda f: list(f(request, timeout=self._conn.config.timeout)), what
            )
        except NotFoundError:
            return None
        if len(messages) != 1:
            raise CorruptDataError(f"{what}: the server sent {len(messages)} directories, not one")
        directory = _directory(messages[0], what, {digest})
        if directory.digest() != digest:
            raise CorruptDataError(f"{what}: the server sent a directory with another digest")
        return directory

    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        check_digest(digest)
        return self._get_recursive(digest)

    def _get_recursive(self, digest: bytes) -> Iterator[Directory]:
        what = f"get directory {digest.hex()} recursively"
        request = rpc_directory_pb2.GetDirectoryRequest(digest=digest, recursive=True)
        first, call = self._conn.call(
            DIRECTORY_GET,
            lambda f: first_message(f(request, timeout=self._conn.config.stream_timeout)),
            what,
        )
        if first is None:
            raise CorruptDataError(f"{what}: the server sent no directory")
        order = RootFirst(digest)
        for message in chain([first], receive(call, what)):
            directory = _directory(message, what, order.awaited)
            try:
                order.admit(directory)
            except ClosureError as e:
                raise CorruptDataError(f"{what}: the server sent {e}") from None
            yield directory
        if order.unfinished:
            raise CorruptDataError(
                f"{what}: the stream ended without {order.unfinished} referenced directories"
            )

    def put_many(self, directories: Iterable[Directory]) -> bytes:
        batch = [d.to_proto() for d in directories]
        # Materialized, so the stream can be sent again after UNAVAILABLE (Put is idempotent).
        response: rpc_directory_pb2.PutDirectoryResponse = self._conn.call(
            DIRECTORY_PUT,
            lambda f: f(iter(batch), timeout=self._conn.config.stream_timeout),
            "put directories",
        )
        if batch:
            root = b3digest(batch[-1].SerializeToString(deterministic=True))
            if response.root_digest != root:
                raise CorruptDataError(
                    f"put directories: the server answered root {response.root_digest.hex()}, "
                    f"expected {root.hex()}"
                )
        return response.root_digest

    def close(self) -> None:
        self._conn.close()


def _directory(message: bytes, what: str, names: Container[bytes]) -> Directory:
    try:
        return Directory.from_named_bytes(message, names)
    except ValidationError as e:
        raise CorruptDataError(f"{what}: the server sent an invalid directory: {e}") from None


class GrpcPathInfoService(PathInfoService):
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        if len(output_hash) != HASH_SIZE:
            raise InvalidArgumentError(f"output hash: expected {HASH_SIZE} bytes, got {len(output_hash)}")
        what = f"get path info {nixbase32.encode(output_hash)}"
        request = rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=output_hash)
        try:
            info: pathinfo_pb2.PathInfo = self._conn.call(
                PATHINFO_GET, lambda f: f(request, timeout=self._conn.config.timeout), what
            )
        except NotFoundError:
            return None
        if _store_path(info, what).digest != output_hash:
            raise CorruptDataError(f"{what}: the server answered with another store path")
        return info

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        try:
            store_path, _ = validate_pathinfo(info)
        except ValidationError as e:
            raise InvalidArgumentError(f"invalid PathInfo: {e}") from None
        what = f"put path info {store_path}"
        answer: pathinfo_pb2.PathInfo = self._conn.call(
            PATHINFO_PUT, lambda f: f(info, timeout=self._conn.config.timeout), what
        )
        if _store_path(answer, what) != store_path:
            raise CorruptDataError(f"{what}: the server answered with another store path")
        return answer

    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        return self._list()

    def _list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        what = "list path infos"
        request = rpc_pathinfo_pb2.ListPathInfoRequest()
        first, call = self._conn.call(
            PATHINFO_LIST,
            lambda f: first_message(f(request, timeout=self._conn.config.stream_timeout)),
            what,
        )
        if first is None:
            return
        for info in chain([first], receive(call, what)):
            # One bad entry must not hide every other store path from a listing: skip it, loudly.
            try:
                _store_path(info, what)
            except CorruptDataError as e:
                log.warning("%s; skipping that entry", e)
                continue
            yield info

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        what = f"calculate NAR of {node.name!r}"
        request = node_to_proto(node)
        response: rpc_pathinfo_pb2.CalculateNARResponse = self._conn.call(
            PATHINFO_CALCULATE_NAR, lambda f: f(request, timeout=self._conn.config.stream_timeout), what
        )
        if len(response.nar_sha256) != SHA256_SIZE:
            raise CorruptDataError(f"{what}: the server sent a {len(response.nar_sha256)}-byte sha256")
        return response.nar_size, response.nar_sha256

    def close(self) -> None:
        self._conn.close()


def _store_path(info: pathinfo_pb2.PathInfo, what: str) -> StorePath:
    try:
        store_path, _ = validate_pathinfo(info)
    except ValidationError as e:
        raise CorruptDataError(f"{what}: the server sent an invalid PathInfo: {e}") from None
    return store_path


def open_grpc_store(
    target: str, config: ClientConfig | None = None, credentials: grpc.ChannelCredentials | None = None
) -> Store:
    """The three services of the store at ``target`` (``host:port`` or ``unix:/abs/path``).

    They share one channel, which connects on first use: opening never blocks, and an
    unreachable store shows as StoreUnavailableError on the first call.
    """
    conn = Connection(target, config or ClientConfig(), credentials)
    return Store(
        GrpcBlobService(conn), GrpcDirectoryService(conn), GrpcPathInfoService(conn), breakers=(conn.breaker,)
    )


__all__ = ["ClientConfig", "open_grpc_store"]
