"""The gRPC client (services/backends/grpc.py) against tvixfs's own server: big blobs, errors as service
errors, restarts, snix-only servers, concurrency.

A server that lies is tests/test_fault_client.py's subject; the shared contract of all backends
(grpc over tcp and unix included) is tests/test_contract.py's.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from backends import in_order
from grpcserver import running_daemon

from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode
from tvixfs.importers.ingest import ingest_path
from tvixfs.protos import blobbatch_pb2, pathinfo_pb2, rpc_blobstore_pb2
from tvixfs.server.serve import RunningServer, start_server
from tvixfs.server.servicers import BlobServicer
from tvixfs.services.backends.grpc import WHOLE_READ_LIMIT, ClientConfig, GrpcBlobService, open_grpc_store
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import ChunkMeta, Store
from tvixfs.services.cache.diskcache import with_disk_cache
from tvixfs.services.errors import (
    CorruptDataError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    StoreUnavailableError,
)
from tvixfs.services.readahead import blobs_read_ahead
from tvixfs.services.wire.grpc_methods import Method, decode_blob_chunk, encode_blob_chunk
from tvixfs.services.wire.messages import READ_MANY_BLOB_MAX
from tvixfs.store.nar import write_nar
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import StorePath

pytestmark = pytest.mark.timeout(120)

QUICK = ClientConfig(timeout=5.0, stream_timeout=20.0, attempts=3, backoff=0.05)


def serve(store: Store, listen: str, prefixes: tuple[str, ...] = ("tvix", "snix")) -> RunningServer:
    return start_server(store, [listen], threads=16, prefixes=prefixes)


@pytest.fixture
def local_served(short_tmp: Path) -> Iterator[tuple[Store, Store]]:
    """(the local store behind a server, a gRPC client of that server)."""
    backend = open_local_store(short_tmp / "store")
    running = serve(backend, f"unix:{short_tmp / 's.sock'}")
    client = open_grpc_store(running.addresses[0], QUICK)
    yield backend, client
    client.close()
    running.stop(None)
    backend.close()


def test_big_blobs_stream_verified(local_served: tuple[Store, Store]) -> None:
    """Above the whole-read limit: a chunked blob streams chunk by chunk, an unchunked one whole."""
    backend, client = local_served
    data = os.urandom(2 * WHOLE_READ_LIMIT + 4321)
    digest = client.blobs.put(data[i : i + 3_000_000] for i in range(0, len(data), 3_000_000))
    assert digest == b3digest(data)
    chunks = client.blobs.stat(digest, send_chunks=True)
    assert chunks is not None
    assert len(chunks) > 1
    assert sum(c.size for c in chunks) == len(data)
    pieces = list(client.blobs.read(digest))
    assert b"".join(pieces) == data
    assert len(pieces) == len(chunks), "one verified piece per chunk"
    assert b"".join(client.blobs.read(chunks[3].digest)) == b"".join(backend.blobs.read(chunks[3].digest))

    memory = open_memory_store()
    unchunked = serve(memory, "[::1]:0")
    try:
        other = open_grpc_store(unchunked.addresses[0], QUICK)
        assert b"".join(other.blobs.read(other.blobs.put([data]))) == data
        other.close()
    finally:
        unchunked.stop(None)


def test_read_chunks_checks_each_chunk_against_the_list_given(local_served: tuple[Store, Store]) -> None:
    """The mount's whole-blob stream: one Read cut at the chunk map it holds, no Stat, each chunk
    checked before it is handed on; a list that does not describe the blob fails at the lie."""
    _, client = local_served
    blobs = client.blobs
    assert isinstance(blobs, GrpcBlobService)
    data = os.urandom(3 << 20)
    digest = blobs.put([data])
    chunks = blobs.stat(digest, send_chunks=True)
    assert chunks is not None and len(chunks) > 2
    pieces = list(blobs.read_chunks(digest, chunks))
    assert [b3digest(p) for p in pieces] == [c.digest for c in chunks]
    assert b3digest(b"".join(pieces)) == digest

    lying = [chunks[0], ChunkMeta(b3digest(b"other"), chunks[1].size), *chunks[2:]]
    received = blobs.read_chunks(digest, lying)
    assert b3digest(next(received)) == chunks[0].digest
    with pytest.raises(CorruptDataError):
        next(received)
    short = [*chunks[:-1], ChunkMeta(chunks[-1].digest, chunks[-1].size - 1)]
    with pytest.raises(CorruptDataError):
        list(blobs.read_chunks(digest, short))


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300_000, 1 << 20])
def test_read_messages_are_blob_chunks_on_the_wire(size: int) -> None:
    """The hand-made Read messages are what protobuf makes and parses; others parse as usual."""
    data = os.urandom(size)
    parts = [data[: size // 3], data[size // 3 :]]
    assert rpc_blobstore_pb2.BlobChunk.FromString(encode_blob_chunk(parts)).data == data
    wire = rpc_blobstore_pb2.BlobChunk(data=data).SerializeToString()
    assert bytes(decode_blob_chunk(wire)) == data
    # Another encoder may split a field in two (the last one wins) or add unknown fields.
    twice = rpc_blobstore_pb2.BlobChunk(data=b"x").SerializeToString() + wire
    assert bytes(decode_blob_chunk(twice)) == (data or b"x")
    assert bytes(decode_blob_chunk(wire + b"\x10\x01")) == data


def test_nar_read_ahead_gives_the_same_nar(local_served: tuple[Store, Store], tmp_path: Path) -> None:
    """export-nar over gRPC reads the next small files in threads: same bytes, in order,
    duplicates, big and empty files included."""
    backend, client = local_served
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(60):
        (tree / f"f{i:02}").write_bytes(os.urandom(i * 997) if i % 7 else b"same")
    (tree / "big").write_bytes(os.urandom(3 << 20))
    (tree / "empty").write_bytes(b"")
    _, node = validate_pathinfo(ingest_path(backend, str(tree), "tree"))
    assert isinstance(node, DirectoryNode)
    directories = {d.digest(): d for d in backend.directories.get_recursive(node.digest)}
    local = b"".join(write_nar(node, directories.__getitem__, backend.blobs.read))
    with blobs_read_ahead(node, directories.__getitem__, client.blobs.read, files=4, small=64 << 10) as read:
        remote = b"".join(write_nar(node, directories.__getitem__, read))
    assert b3digest(remote) == b3digest(local)


def test_errors_are_service_errors(local_served: tuple[Store, Store]) -> None:
    _, client = local_served
    absent = bytes(32)
    assert client.blobs.stat(absent) is None
    assert client.directories.get(absent) is None
    assert client.pathinfos.get(bytes(20)) is None
    reading = client.blobs.read(absent)
    with pytest.raises(NotFoundError):
        next(reading)
    with pytest.raises(NotFoundError):
        next(client.directories.get_recursive(absent))
    dangling = Directory(directories=(DirectoryNode(b"d", absent, 1),))
    with pytest.raises(FailedPreconditionError):
        client.directories.put_many([dangling])
    with pytest.raises(InvalidArgumentError):
        client.pathinfos.get(bytes(19))
    path = StorePath(bytes(range(20)), "missing")
    node = FileNode(path.basename.encode(), b3digest(b"never stored"), 12)
    info = pathinfo_pb2.PathInfo(node={"file": node.to_proto()})
    with pytest.raises(FailedPreconditionError):
        client.pathinfos.put(info)
    info.node.file.name = b"no-hash"
    with pytest.raises(InvalidArgumentError):
        client.pathinfos.put(info)


def test_failing_put_stores_nothing_and_raises_the_cause(local_served: tuple[Store, Store]) -> None:
    backend, client = local_served

    def pieces() -> Iterator[bytes]:
        yield b"first part, "
        raise OSError("disk read failed")

    with pytest.raises(OSError, match="disk read failed"):
        client.blobs.put(pieces())
    assert backend.blobs.stat(b3digest(b"first part, ")) is None, "no truncated blob stored"


def test_unreachable_store_is_unavailable(short_tmp: Path) -> None:
    client = open_grpc_store(f"unix:{short_tmp / 'nobody.sock'}", QUICK)
    with pytest.raises(StoreUnavailableError):
        client.pathinfos.get(bytes(20))
    with pytest.raises(StoreUnavailableError):
        client.blobs.put([b"x"])
    client.close()
    client.close()  # idempotent


def test_client_survives_a_daemon_restart(tvixfs_cmd: list[str], short_tmp: Path, sample_tree: Path) -> None:
    sock = short_tmp / "d.sock"
    store_url = f"local://{short_tmp / 'store'}"
    (short_tmp / "store").mkdir()  # the daemon makes a store only in a directory that exists
    with running_daemon(tvixfs_cmd, short_tmp, store=store_url, listen=[f"unix:{sock}"]) as daemon:
        client = open_grpc_store(f"unix:{sock}", QUICK)
        info = ingest_path(client, sample_tree, "sample")
        assert daemon.stop() == 0
    with running_daemon(tvixfs_cmd, short_tmp, store=store_url, listen=[f"unix:{sock}"]):
        assert client.pathinfos.get(StorePath.from_basename(info.node.directory.name).digest) == info
        root = info.node.directory.digest
        assert next(client.directories.get_recursive(root)).digest() == root
    client.close()


def test_snix_only_server(short_tmp: Path) -> None:
    """A server that only speaks the snix names: the client finds them, even for a first Put."""
    memory = open_memory_store()
    running = serve(memory, f"unix:{short_tmp / 'snix.sock'}", prefixes=("snix",))
    try:
        client = open_grpc_store(running.addresses[0], QUICK)
        digest = client.blobs.put([b"spoken in snix"])
        assert b"".join(memory.blobs.read(digest)) == b"spoken in snix"
        leaf = Directory(files=(FileNode(b"f", digest, 14),))
        assert client.directories.put_many([leaf]) == leaf.digest()
        assert client.directories.get(leaf.digest()) == leaf
        assert client.pathinfos.get(bytes(20)) is None
        client.close()
    finally:
        running.stop(None)


def test_one_client_many_threads(local_served: tuple[Store, Store]) -> None:
    _, client = local_served
    blobs = [os.urandom(n) for n in (0, 1, 1000, 300_000, 2_000_000) for _ in range(4)]
    digests = [client.blobs.put([b]) for b in blobs]
    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(lambda d: b"".join(client.blobs.read(d)), digests))
    assert read == blobs


@pytest.mark.nix
def test_cli_import_and_export_nar_through_a_daemon(
    tvixfs_cmd: list[str], short_tmp: Path, sample_tree: Path
) -> None:
    """`tvixfs import` / `export-nar` against a remote store give what Nix gives."""
    (short_tmp / "store").mkdir()
    with running_daemon(tvixfs_cmd, short_tmp, store=f"local://{short_tmp / 'store'}") as daemon:
        imported = subprocess.run(
            [*tvixfs_cmd, "import", "--store", daemon.url, str(sample_tree)],
            check=True,
            capture_output=True,
            text=True,
        )
        store_path = imported.stdout.strip()
        assert store_path.startswith("/nix/store/") and store_path.endswith("-sample")
        exported = subprocess.run(
            [*tvixfs_cmd, "export-nar", "--store", daemon.url, store_path], check=True, capture_output=True
        )
    dump = subprocess.run(["nix-store", "--dump", str(sample_tree)], check=True, capture_output=True)
    assert exported.stdout == dump.stdout


def _calls_by_method(client: Store, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The calls ``client``'s blob service makes from now on, by method name."""
    conn = client.blobs._conn  # type: ignore[attr-defined]
    calls: Counter[str] = Counter()
    call = conn.call

    def counted(method: Method, *args: Any, **kwargs: Any) -> Any:
        calls[method.name] += 1
        return call(method, *args, **kwargs)

    monkeypatch.setattr(conn, "call", counted)
    return calls


def test_read_many_asks_for_small_chunks_in_one_call(
    local_served: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tvixfs daemon has BlobBatchService: the small chunks come in one ReadMany, each checked;
    one too large for a message is read with Read; a missing one fails alone."""
    _, client = local_served
    small = [b"a", os.urandom(5000), os.urandom(200_000)]
    large = os.urandom(READ_MANY_BLOB_MAX + 1)
    chunks = [ChunkMeta(client.blobs.put([d]), len(d)) for d in [*small, large]]
    chunks.append(ChunkMeta(bytes(32), 7))
    calls = _calls_by_method(client, monkeypatch)
    *found, missing = in_order(client.blobs.read_many(chunks))
    assert found == [*small, large]
    assert isinstance(missing, NotFoundError)
    assert calls == {"ReadMany": 1, "Read": 1}


def _batch_with_a_damaged_blob(
    served: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> tuple[Exception, Counter[str]]:
    """read_many of five small blobs of which the second's chunk file on the server's disk is
    damaged: the others must arrive intact. What it raised for the second, and the calls made."""
    backend, client = served
    contents = [os.urandom(3000 + i) for i in range(5)]
    chunks = [ChunkMeta(client.blobs.put([d]), len(d)) for d in contents]
    with open(backend.blobs._chunks.path(chunks[1].digest), "r+b") as f:  # type: ignore[attr-defined]
        f.write(b"X")
    calls = _calls_by_method(client, monkeypatch)
    outcomes = in_order(client.blobs.read_many(chunks))
    assert [outcomes[i] for i in (0, 2, 3, 4)] == [contents[i] for i in (0, 2, 3, 4)]
    assert isinstance(outcomes[1], CorruptDataError)
    return outcomes[1], calls


@pytest.mark.expect_errors
def test_a_damaged_blob_fails_alone_in_a_batch(
    local_served: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blobs of a ReadMany are mostly other files': one damaged chunk file on the daemon's
    disk is answered as damaged, and the rest of the call goes on."""
    error, calls = _batch_with_a_damaged_blob(local_served, monkeypatch)
    assert "damaged" in str(error)
    assert calls == {"ReadMany": 1}


@pytest.mark.expect_errors
def test_a_batch_that_fails_part_way_is_finished_one_by_one(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon from before the ``damaged`` answer ends the whole call at a damaged blob (with
    DATA_LOSS): the client reads the chunks it did not answer alone, and only the damaged one
    fails."""
    answer = BlobServicer.read_many

    def old_daemon(self: BlobServicer, request: blobbatch_pb2.ReadManyRequest) -> Iterator[Any]:
        for message in answer(self, request):
            if isinstance(message, blobbatch_pb2.ReadManyResponse) and message.damaged:
                raise CorruptDataError("chunk file does not match its digest")
            yield message

    monkeypatch.setattr(BlobServicer, "read_many", old_daemon)
    backend = open_local_store(short_tmp / "store")
    running = serve(backend, f"unix:{short_tmp / 's.sock'}")
    client = open_grpc_store(running.addresses[0], QUICK)
    try:
        _, calls = _batch_with_a_damaged_blob((backend, client), monkeypatch)
    finally:
        client.close()
        running.stop(None)
        backend.close()
    assert calls == {"ReadMany": 1, "Read": 4}  # the damaged blob and the three after it


class _LyingBatches:
    """A server whose ReadMany answers the second blob asked for with other bytes."""

    def __init__(self, contents: dict[bytes, bytes]) -> None:
        self.contents = contents

    def read_many(
        self, request: blobbatch_pb2.ReadManyRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        for i, digest in enumerate(request.digests):
            data = self.contents[digest]
            yield blobbatch_pb2.ReadManyResponse(data=data[::-1] if i == 1 else data)


@pytest.mark.parametrize("disk_cache", [False, True])
def test_read_many_never_hands_on_bytes_that_do_not_match(short_tmp: Path, disk_cache: bool) -> None:
    """The client checks every answer (so a disk cache in front of it keeps only what matched,
    without hashing it again, and a mount's replay need not either: verifies_every_read)."""
    contents = {b3digest(d): d for d in (b"first", b"second chunk", b"third")}
    server = grpc.server(ThreadPoolExecutor(2))
    handler = grpc.unary_stream_rpc_method_handler(
        _LyingBatches(contents).read_many,
        request_deserializer=blobbatch_pb2.ReadManyRequest.FromString,
        response_serializer=blobbatch_pb2.ReadManyResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tvixfs.ext.v1.BlobBatchService", {"ReadMany": handler}),)
    )
    server.add_insecure_port(f"unix:{short_tmp / 'liar.sock'}")
    server.start()
    client = open_grpc_store(f"unix:{short_tmp / 'liar.sock'}", QUICK)
    assert client.blobs.capabilities.verifies_every_read
    store = client
    if disk_cache:
        store, cache = with_disk_cache(client, short_tmp / "cache")
        assert store.blobs.capabilities.verifies_every_read
    chunks = [ChunkMeta(d, len(c)) for d, c in contents.items()]
    try:
        outcomes = in_order(store.blobs.read_many(chunks))
        if disk_cache:
            assert [cache.get_object(c.digest) for c in chunks] == [b"first", None, b"third"]
    finally:
        store.close()
        server.stop(None)
    assert outcomes[0] == b"first" and outcomes[2] == b"third"
    assert isinstance(outcomes[1], CorruptDataError)
