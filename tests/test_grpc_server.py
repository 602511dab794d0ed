"""The gRPC server as a client sees it: status codes, stream shapes, names, lifecycle.

Semantics are checked against an in-process server with the plain generated stubs (no tvixfs
client logic in between); the lifecycle against a real ``tvixfs daemon`` subprocess.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpcserver import DaemonError, running_daemon, start_daemon

from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode, SymlinkNode, node_to_proto
from tvixfs.importers.ingest import ingest_path
from tvixfs.protos import (
    blobbatch_pb2,
    blobbatch_pb2_grpc,
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
    rpc_pathinfo_pb2,
    rpc_pathinfo_pb2_grpc,
)
from tvixfs.server import servicers
from tvixfs.server.damage import CLIENT_DETAIL
from tvixfs.server.listen import ListenError, parse_listen, warn_if_exposed
from tvixfs.server.serve import RunningServer, start_server
from tvixfs.server.servicers import READ_MESSAGE_SIZE
from tvixfs.services.backends.grpc import ClientConfig, open_grpc_store
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.memory import MemoryBlobService, open_memory_store
from tvixfs.services.base import ChunkMeta, Store
from tvixfs.services.readahead import chunks_read_ahead
from tvixfs.services.regroup import in_messages
from tvixfs.services.wire.messages import READ_MANY_BLOB_MAX, READ_MANY_DIGESTS
from tvixfs.store.nar import nar_hash
from tvixfs.store.storepath import StorePath

pytestmark = pytest.mark.timeout(120)

Code = grpc.StatusCode


class Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.blobs = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
        self.dirs = rpc_directory_pb2_grpc.DirectoryServiceStub(channel)
        self.infos = rpc_pathinfo_pb2_grpc.PathInfoServiceStub(channel)


@pytest.fixture
def memory() -> Store:
    return open_memory_store()


@pytest.fixture
def server(memory: Store) -> Iterator[RunningServer]:
    running = start_server(memory, ["[::1]:0"], threads=8)
    yield running
    running.stop(None)


@pytest.fixture
def stubs(server: RunningServer) -> Iterator[Stubs]:
    with grpc.insecure_channel(server.addresses[0]) as channel:
        yield Stubs(channel)


def expect(code: grpc.StatusCode, thunk: object) -> str:
    """Run ``thunk`` (a callable or a stream); assert it fails with ``code``; return details."""
    with pytest.raises(grpc.RpcError) as caught:
        result = thunk() if callable(thunk) else thunk
        if isinstance(result, Iterator):
            list(result)
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() == code, error.details()
    details = error.details() or ""
    assert "Traceback" not in details
    return details


def blob_chunks(data: bytes, size: int) -> Iterator[rpc_blobstore_pb2.BlobChunk]:
    for i in range(0, len(data), size):
        yield rpc_blobstore_pb2.BlobChunk(data=data[i : i + size])


# --- blobs -------------------------------------------------------------------------------------


def test_blob_put_read_stat(stubs: Stubs) -> None:
    data = os.urandom(3 * READ_MESSAGE_SIZE + 12345)
    answer = stubs.blobs.Put(blob_chunks(data, 100_000))
    assert answer.digest == b3digest(data)
    messages = [m.data for m in stubs.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=answer.digest))]
    assert b"".join(messages) == data
    assert all(len(m) == READ_MESSAGE_SIZE for m in messages[:-1]), "full-size messages, not 4 KiB"
    response = stubs.blobs.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=answer.digest, send_chunks=True))
    assert list(response.chunks) == [], "the memory store does not chunk"


def test_blob_errors(stubs: Stubs) -> None:
    absent = bytes(32)
    expect(Code.NOT_FOUND, lambda: stubs.blobs.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=absent)))
    expect(Code.NOT_FOUND, stubs.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=absent)))
    short = bytes(31)
    assert "31" in expect(
        Code.INVALID_ARGUMENT, lambda: stubs.blobs.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=short))
    )
    expect(Code.INVALID_ARGUMENT, stubs.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=short)))


def test_chunked_blob_of_a_local_store(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Read by chunk digest and by blob digest (its chunks read ahead); a damaged chunk file is
    DATA_LOSS, whichever way it is read: the client is not told the server's paths, and the
    server's log names the file once, however often it is asked for."""
    local = open_local_store(short_tmp / "store")
    running = start_server(local, [f"unix:{short_tmp / 's.sock'}"], threads=8)
    try:
        with grpc.insecure_channel(running.addresses[0]) as channel:
            stubs = Stubs(channel)
            data = os.urandom(5 << 20)
            digest = stubs.blobs.Put(blob_chunks(data, 1 << 20)).digest
            chunks = stubs.blobs.Stat(
                rpc_blobstore_pb2.StatBlobRequest(digest=digest, send_chunks=True)
            ).chunks
            assert len(chunks) > 1
            hasher = hashlib.sha256()
            for chunk in chunks:
                read = rpc_blobstore_pb2.ReadBlobRequest(digest=chunk.digest)
                part = b"".join(m.data for m in stubs.blobs.Read(read))
                assert (b3digest(part), len(part)) == (chunk.digest, chunk.size)
                hasher.update(part)
            assert hasher.digest() == hashlib.sha256(data).digest()
            whole = [m.data for m in stubs.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest))]
            assert hashlib.sha256(b"".join(whole)).digest() == hashlib.sha256(data).digest()
            assert all(len(m) == READ_MESSAGE_SIZE for m in whole[:-1])

            damaged = chunks[len(chunks) // 2].digest
            path = short_tmp / "store" / "chunks" / damaged.hex()[:2] / damaged.hex()
            content = bytearray(path.read_bytes())
            content[0] ^= 1
            path.write_bytes(content)
            with caplog.at_level(logging.WARNING, logger="tvixfs.server.damage"):
                for target in (digest, damaged, digest, damaged):
                    details = expect(
                        Code.DATA_LOSS, stubs.blobs.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=target))
                    )
                    assert details == CLIENT_DETAIL
            assert [str(path) in r.getMessage() for r in caplog.records] == [True]
    finally:
        running.stop(None)
        local.close()


def test_read_ahead_keeps_order_and_cancels_what_an_early_end_leaves() -> None:
    blobs = MemoryBlobService()
    pieces = [os.urandom(n) for n in (5, 1, 7, 3, 4)]
    chunks = [ChunkMeta(blobs.put([p]), len(p)) for p in pieces]
    started: list[bytes] = []
    second_started, go_on = threading.Event(), threading.Event()

    class Recording(MemoryBlobService):
        def read(self, digest: bytes) -> Iterator[bytes]:
            started.append(digest)
            if len(started) == 2:
                second_started.set()
                go_on.wait(10)
            return blobs.read(digest)

    with ThreadPoolExecutor(1) as executor:
        for ahead, batch in ((6, 1), (10, 6), (1, 1 << 20)):
            assert list(chunks_read_ahead(blobs, chunks, executor, ahead, batch)) == pieces
        # One chunk per batch, every batch queued at once.
        stream = chunks_read_ahead(Recording(), chunks, executor, 1 << 20, 1)
        assert next(stream) == pieces[0]
        assert second_started.wait(10)
        stream.close()
        go_on.set()
    assert started == [chunks[0].digest, chunks[1].digest], "the reads not started were cancelled"


@pytest.mark.parametrize(
    ("sizes", "size"),
    [
        ([], 4),
        ([0], 4),
        ([3], 4),
        ([4, 4], 4),
        ([1, 1, 1, 1, 1], 4),
        ([10], 4),
        ([3, 10, 1, 2], 4),
        ([2, 2, 2], 4),
    ],
)
def test_in_messages_keeps_bytes_and_bounds_messages(sizes: list[int], size: int) -> None:
    pieces = [os.urandom(n) for n in sizes]
    out = [b"".join(parts) for parts in in_messages(pieces, size)]
    assert b"".join(out) == b"".join(pieces)
    assert all(len(m) == size for m in out[:-1])
    assert all(0 < len(m) <= size for m in out)


# --- directories -------------------------------------------------------------------------------


def diamond() -> list[Directory]:
    """leaf <- (left, right) <- root: the leaf is reachable twice, leaves first."""
    blob = b3digest(b"x")
    leaf = Directory(files=(FileNode(b"x", blob, 1),))
    left = Directory(directories=(DirectoryNode(b"leaf", leaf.digest(), leaf.size()),))
    right = Directory(
        directories=(DirectoryNode(b"again", leaf.digest(), leaf.size()),),
        symlinks=(SymlinkNode(b"s", b"t"),),
    )
    root = Directory(
        directories=(
            DirectoryNode(b"a", left.digest(), left.size()),
            DirectoryNode(b"b", right.digest(), right.size()),
        )
    )
    return [leaf, left, right, root]


def test_directory_put_and_get(stubs: Stubs) -> None:
    leaf, left, right, root = diamond()
    answer = stubs.dirs.Put(iter([d.to_proto() for d in (leaf, left, right, root)]))
    assert answer.root_digest == root.digest()
    request = rpc_directory_pb2.GetDirectoryRequest(digest=root.digest(), recursive=True)
    got = [Directory.from_proto(m) for m in stubs.dirs.Get(request)]
    assert got == [root, left, right, leaf], "root first, breadth-first, the shared leaf once"
    single = list(stubs.dirs.Get(rpc_directory_pb2.GetDirectoryRequest(digest=left.digest())))
    assert [Directory.from_proto(m) for m in single] == [left]


def test_directory_put_stores_nothing_of_a_failing_stream(stubs: Stubs) -> None:
    leaf, left, _right, root = diamond()
    unsorted = castore_pb2.Directory(
        files=[
            castore_pb2.FileNode(name=b"b", digest=bytes(32)),
            castore_pb2.FileNode(name=b"a", digest=bytes(32)),
        ]
    )
    details = expect(Code.INVALID_ARGUMENT, lambda: stubs.dirs.Put(iter([leaf.to_proto(), unsorted])))
    assert "#1" in details
    # The root refers to ``right``, which is neither sent nor stored.
    expect(Code.FAILED_PRECONDITION, lambda: stubs.dirs.Put(iter([d.to_proto() for d in (leaf, left, root)])))
    expect(Code.INVALID_ARGUMENT, lambda: stubs.dirs.Put(iter([])))
    for d in (leaf, left):
        expect(Code.NOT_FOUND, stubs.dirs.Get(rpc_directory_pb2.GetDirectoryRequest(digest=d.digest())))


def test_a_directory_put_stream_is_bounded(stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server holds a Put stream whole until it ends: beyond its bounds, in directories or
    in bytes, the stream fails (and stores nothing) rather than growing the server's memory."""
    monkeypatch.setattr(servicers, "PUT_DIRECTORIES_MAX", 100)
    monkeypatch.setattr(servicers, "PUT_DIRECTORY_BYTES_MAX", 4096)
    empty = castore_pb2.Directory()
    assert stubs.dirs.Put(iter([empty] * 100)).root_digest == Directory.from_proto(empty).digest()
    assert "100 directories" in expect(Code.INVALID_ARGUMENT, lambda: stubs.dirs.Put(iter([empty] * 101)))
    big = castore_pb2.Directory(
        files=[castore_pb2.FileNode(name=b"%04d" % i, digest=bytes(32)) for i in range(100)]
    )
    expect(Code.INVALID_ARGUMENT, lambda: stubs.dirs.Put(iter([big])))
    expect(
        Code.NOT_FOUND,
        stubs.dirs.Get(rpc_directory_pb2.GetDirectoryRequest(digest=Directory.from_proto(big).digest())),
    )


def test_directory_put_streams_together_hold_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond what all directory Put streams may hold at once a stream fails UNAVAILABLE (a
    client tries again later), and what it held is given back."""
    monkeypatch.setattr(servicers, "PUT_DIRECTORIES_HELD", 10 * 512)  # 10 empty directories
    running = start_server(open_memory_store(), ["[::1]:0"], threads=8)
    try:
        with grpc.insecure_channel(running.addresses[0]) as channel:
            put = Stubs(channel).dirs.Put
            empty = castore_pb2.Directory()
            assert "retry later" in expect(Code.UNAVAILABLE, lambda: put(iter([empty] * 11)))
            for _ in range(3):  # nothing stays held: by the failed stream, or by these
                assert put(iter([empty] * 10)).root_digest == Directory.from_proto(empty).digest()
    finally:
        running.stop(None)


def test_directory_get_errors(stubs: Stubs) -> None:
    expect(Code.INVALID_ARGUMENT, stubs.dirs.Get(rpc_directory_pb2.GetDirectoryRequest()))
    expect(Code.INVALID_ARGUMENT, stubs.dirs.Get(rpc_directory_pb2.GetDirectoryRequest(digest=b"12")))
    for recursive in (False, True):
        request = rpc_directory_pb2.GetDirectoryRequest(digest=bytes(32), recursive=recursive)
        expect(Code.NOT_FOUND, stubs.dirs.Get(request))


def test_undecodable_request_is_invalid_argument(stubs: Stubs) -> None:
    raw = stubs.channel.stream_unary("/tvix.castore.v1.DirectoryService/Put")
    expect(Code.INVALID_ARGUMENT, lambda: raw(iter([b"\xff\xff\xff"])))


# --- path infos --------------------------------------------------------------------------------


def make_info(path: StorePath, node: FileNode, content: bytes = b"") -> pathinfo_pb2.PathInfo:
    """A PathInfo with the true NAR facts of a file holding ``content``."""
    size, sha256 = nar_hash(node, {}.__getitem__, lambda _: iter([content]))
    named = node_to_proto(FileNode(path.basename.encode(), node.digest, node.size))
    narinfo = pathinfo_pb2.NARInfo(nar_size=size, nar_sha256=sha256)
    return pathinfo_pb2.PathInfo(node=named, narinfo=narinfo)


def test_pathinfo_put_get_list(stubs: Stubs, memory: Store) -> None:
    digest = memory.blobs.put([b"hi"])
    path = StorePath(hashlib.sha1(b"p").digest(), "hello-1.0")
    info = make_info(path, FileNode(b"x", digest, 2), b"hi")
    assert stubs.infos.Put(info) == info
    assert stubs.infos.Get(rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=path.digest)) == info
    assert list(stubs.infos.List(rpc_pathinfo_pb2.ListPathInfoRequest())) == [info]
    absent = rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=bytes(20))
    expect(Code.NOT_FOUND, lambda: stubs.infos.Get(absent))
    short = rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=bytes(19))
    expect(Code.INVALID_ARGUMENT, lambda: stubs.infos.Get(short))
    expect(Code.INVALID_ARGUMENT, lambda: stubs.infos.Get(rpc_pathinfo_pb2.GetPathInfoRequest()))


def test_pathinfo_put_is_validated(stubs: Stubs) -> None:
    path = StorePath(hashlib.sha1(b"q").digest(), "q")
    missing = make_info(path, FileNode(b"x", b3digest(b"never put"), 9), b"never put")
    expect(Code.FAILED_PRECONDITION, lambda: stubs.infos.Put(missing))
    bad_name = pathinfo_pb2.PathInfo()
    bad_name.CopyFrom(missing)
    bad_name.node.file.name = b"not-a-store-path"
    expect(Code.INVALID_ARGUMENT, lambda: stubs.infos.Put(bad_name))
    expect(Code.INVALID_ARGUMENT, lambda: stubs.infos.Put(pathinfo_pb2.PathInfo()))
    assert list(stubs.infos.List(rpc_pathinfo_pb2.ListPathInfoRequest())) == []


def test_pathinfo_put_with_false_nar_facts_is_refused(stubs: Stubs, memory: Store) -> None:
    """A client's narHash is a claim the daemon checks against the content, as nix-daemon does."""
    digest = memory.blobs.put([b"hi"])
    path = StorePath(hashlib.sha1(b"liar").digest(), "liar")
    info = make_info(path, FileNode(b"x", digest, 2), b"ho")
    expect(Code.INVALID_ARGUMENT, lambda: stubs.infos.Put(info))
    assert list(stubs.infos.List(rpc_pathinfo_pb2.ListPathInfoRequest())) == []


@pytest.mark.nix
def test_calculate_nar_matches_nix(stubs: Stubs, memory: Store, sample_tree: Path) -> None:
    info = ingest_path(memory, sample_tree, "sample")
    dump = subprocess.run(["nix-store", "--dump", str(sample_tree)], check=True, capture_output=True).stdout
    expected = (len(dump), hashlib.sha256(dump).digest())
    answer = stubs.infos.CalculateNAR(info.node)
    assert (answer.nar_size, answer.nar_sha256) == expected
    anonymous = castore_pb2.Node()
    anonymous.CopyFrom(info.node)
    anonymous.directory.name = b""
    answer = stubs.infos.CalculateNAR(anonymous)
    assert (answer.nar_size, answer.nar_sha256) == expected, "the root's name is not part of a NAR"
    expect(Code.INVALID_ARGUMENT, lambda: stubs.infos.CalculateNAR(castore_pb2.Node()))


# --- names, health, errors ---------------------------------------------------------------------


def test_snix_names_answer_the_same_bytes(stubs: Stubs, memory: Store) -> None:
    digest = memory.blobs.put([b"same"])
    request = rpc_blobstore_pb2.StatBlobRequest(digest=digest).SerializeToString()
    read = rpc_blobstore_pb2.ReadBlobRequest(digest=digest).SerializeToString()
    answers = {}
    for prefix in ("tvix", "snix"):
        stat_call = stubs.channel.unary_unary(f"/{prefix}.castore.v1.BlobService/Stat")
        read_call = stubs.channel.unary_stream(f"/{prefix}.castore.v1.BlobService/Read")
        answers[prefix] = (stat_call(request), list(read_call(read)))
    assert answers["tvix"] == answers["snix"]
    missing = rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=bytes(20)).SerializeToString()
    raw = stubs.channel.unary_unary("/snix.store.v1.PathInfoService/Get")
    expect(Code.NOT_FOUND, lambda: raw(missing))


def test_health_is_serving(stubs: Stubs) -> None:
    health = health_pb2_grpc.HealthStub(stubs.channel)
    for service in ("", "tvix.castore.v1.BlobService", "snix.store.v1.PathInfoService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


class BrokenBlobs(MemoryBlobService):
    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        raise ZeroDivisionError("a bug in the backend")


@pytest.mark.expect_errors  # the server logs the bug, with its traceback
def test_backend_bug_is_internal_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    memory = open_memory_store()
    broken = Store(BrokenBlobs(), memory.directories, memory.pathinfos)
    running = start_server(broken, ["[::1]:0"], threads=4)
    try:
        with grpc.insecure_channel(running.addresses[0]) as channel, caplog.at_level(logging.ERROR):
            stub = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
            details = expect(
                Code.INTERNAL, lambda: stub.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=bytes(32)))
            )
    finally:
        running.stop(None)
    assert "ZeroDivisionError" in details
    assert len(details) < 300
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1, "logged once, with its traceback, on the server"


def test_unavailable_backend_is_unavailable(short_tmp: Path) -> None:
    """A daemon in front of a dead store answers UNAVAILABLE, so clients retry or report it."""
    dead = open_grpc_store(f"unix:{short_tmp / 'nobody.sock'}", ClientConfig(timeout=2, attempts=1))
    running = start_server(dead, ["[::1]:0"], threads=4)
    try:
        with grpc.insecure_channel(running.addresses[0]) as channel:
            stub = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
            expect(Code.UNAVAILABLE, lambda: stub.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=bytes(32))))
    finally:
        running.stop(None)
        dead.close()


# --- listen addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("[::1]:8000", True),
        ("127.0.0.1:0", True),
        ("localhost:8000", True),
        ("unix:/run/tvixfs/daemon.sock", True),
        ("unix:///run/tvixfs/daemon.sock", True),
        ("0.0.0.0:8000", False),
        ("[::]:8000", False),
        ("192.168.1.2:8000", False),
        ("cache.example.org:8000", False),
    ],
)
def test_listen_addresses(text: str, loopback: bool, caplog: pytest.LogCaptureFixture) -> None:
    address = parse_listen(text)
    assert address.loopback is loopback
    with caplog.at_level(logging.WARNING):
        warn_if_exposed(address)
    assert ("NOT A LOOPBACK" in caplog.text) is not loopback


@pytest.mark.parametrize("text", ["8000", "[::1]", "host:port", "unix:relative.sock", "unix:/" + "x" * 120])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ListenError):
        parse_listen(text)


# --- the daemon --------------------------------------------------------------------------------


def test_daemon_serves_tcp_and_unix_then_stops_cleanly(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    sock = short_tmp / "run" / "daemon.sock"
    daemon = start_daemon(tvixfs_cmd, short_tmp, listen=["[::1]:0", f"unix:{sock}"])
    try:
        assert daemon.addresses[1] == f"unix:{sock}"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        over_tcp = open_grpc_store(daemon.tcp)
        over_unix = open_grpc_store(f"unix:{sock}")
        digest = over_tcp.blobs.put([b"one store, two addresses"])
        assert b"".join(over_unix.blobs.read(digest)) == b"one store, two addresses"
        over_tcp.close()
        over_unix.close()
        assert daemon.stop() == 0
        daemon.wait_message("STOPPING=1", timeout=5)
        assert not sock.exists()
    finally:
        daemon.stop()
        daemon.notify.close()


def test_sigterm_lets_a_call_in_flight_finish(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    data = os.urandom(48 << 20)
    with running_daemon(tvixfs_cmd, short_tmp) as daemon, grpc.insecure_channel(daemon.tcp) as channel:
        stub = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
        digest = stub.Put(blob_chunks(data, 1 << 20)).digest
        stream = stub.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest))
        first = next(stream).data
        daemon.proc.terminate()
        daemon.wait_message("STOPPING=1")
        rest = b"".join(m.data for m in stream)
        assert first + rest == data
        assert daemon.proc.wait(30) == 0


def test_daemon_startup_errors_exit_before_ready(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    with pytest.raises(DaemonError) as bad:
        start_daemon(tvixfs_cmd, short_tmp, listen=["nonsense"])
    assert "tvixfs: error: listen address must be HOST:PORT" in str(bad.value)
    with pytest.raises(DaemonError) as bad_store:
        start_daemon(tvixfs_cmd, short_tmp, store="bogus://x")
    assert "unknown store URL" in str(bad_store.value)


def test_stale_socket_is_replaced_live_one_refused(tvixfs_cmd: list[str], short_tmp: Path) -> None:
    sock = short_tmp / "d.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(sock))
    leftover.close()  # the file stays: what a killed daemon leaves behind
    with running_daemon(tvixfs_cmd, short_tmp, listen=[f"unix:{sock}"]):
        with pytest.raises(DaemonError) as second:
            start_daemon(tvixfs_cmd, short_tmp, listen=[f"unix:{sock}"])
        assert "another process is serving it" in str(second.value)
        client = open_grpc_store(f"unix:{sock}")
        assert client.blobs.stat(bytes(32)) is None
        client.close()


@pytest.mark.expect_errors
@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_read_many_answers_each_blob_whole_in_order_and_refuses_too_much(
    short_tmp: Path, on_disk: bool
) -> None:
    """tvixfs's BlobBatchService, through a stub generated from its .proto, as any client sees it.
    A store on disk reads the blobs of a call ahead on threads; a damaged one fails alone."""
    store = open_local_store(short_tmp / "store") if on_disk else open_memory_store()
    running = start_server(store, [f"unix:{short_tmp / 's.sock'}"], threads=8)
    try:
        with grpc.insecure_channel(running.addresses[0]) as channel:
            _read_many_contract(blobbatch_pb2_grpc.BlobBatchServiceStub(channel), store, short_tmp / "store")
    finally:
        running.stop(None)
        store.close()


def _read_many_contract(batch: blobbatch_pb2_grpc.BlobBatchServiceStub, store: Store, root: Path) -> None:
    contents = [b"", b"one", os.urandom(70_000), os.urandom(5000)]
    digests = [store.blobs.put([c]) for c in contents]
    asked = [digests[2], bytes(32), digests[0], digests[1]]
    answers = list(batch.ReadMany(blobbatch_pb2.ReadManyRequest(digests=asked)))
    assert [(a.data, a.missing, a.damaged) for a in answers] == [
        (contents[2], False, False),
        (b"", True, False),
        (b"", False, False),
        (b"one", False, False),
    ]
    too_many = blobbatch_pb2.ReadManyRequest(digests=[digests[1]] * (READ_MANY_DIGESTS + 1))
    assert "at most" in expect(Code.INVALID_ARGUMENT, batch.ReadMany(too_many))
    short = blobbatch_pb2.ReadManyRequest(digests=[digests[1], b"\x01" * 31])
    expect(Code.INVALID_ARGUMENT, batch.ReadMany(short))
    large = store.blobs.put([os.urandom(READ_MANY_BLOB_MAX + 1)])
    details = expect(Code.INVALID_ARGUMENT, batch.ReadMany(blobbatch_pb2.ReadManyRequest(digests=[large])))
    assert "read it with BlobService.Read" in details
    chunk_file = root / "chunks" / digests[2].hex()[:2] / digests[2].hex()
    if chunk_file.exists():  # a store on disk: damage one blob's file
        chunk_file.write_bytes(bytes([chunk_file.read_bytes()[0] ^ 1]) + chunk_file.read_bytes()[1:])
        answers = list(batch.ReadMany(blobbatch_pb2.ReadManyRequest(digests=digests[1:])))
        assert [(a.data, a.missing, a.damaged) for a in answers] == [
            (b"one", False, False),
            (b"", False, True),
            (contents[3], False, False),
        ]
