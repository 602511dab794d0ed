"""The gRPC client against a hostile store: every fault becomes a clear error, never wrong
bytes, never a hang, and the same client works again once the store is honest.

The client runs with short deadlines so that a hang costs seconds; the test timeout is the
bound that proves "never a hang".
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

import pytest
from backends import in_order
from faultstore import Fault, FaultStore, Sample, put_sample, serve_faults
from loghygiene import ExpectedErrors

from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import SymlinkNode
from tvixfs.protos import castore_pb2, pathinfo_pb2
from tvixfs.services.backends.grpc import ClientConfig, open_grpc_store
from tvixfs.services.base import ChunkMeta, Store
from tvixfs.services.errors import (
    CorruptDataError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)

pytestmark = pytest.mark.timeout(60)

CONFIG = ClientConfig(timeout=1.5, stream_timeout=3.0, attempts=3, backoff=0.05)
CHUNK = 1 << 20
BIG = 9 * CHUNK + 17  # above the size the client reads whole: it streams chunk by chunk
MEDIUM = 300_000  # read whole, in several messages


class Blobs:
    def __init__(self, sample: Sample, medium: bytes) -> None:
        self.content = {**sample.blobs, b3digest(medium): medium}
        self.big = sample.big
        self.medium = b3digest(medium)


@pytest.fixture
def faults() -> Iterator[FaultStore]:
    with serve_faults(chunk_size=CHUNK) as store:
        yield store


@pytest.fixture
def sample(faults: FaultStore) -> Sample:
    return put_sample(faults.store, big_size=BIG)


@pytest.fixture
def blobs(faults: FaultStore, sample: Sample) -> Blobs:
    medium = random.Random(1).randbytes(MEDIUM)
    faults.store.blobs.put([medium])
    return Blobs(sample, medium)


@pytest.fixture
def client(faults: FaultStore) -> Iterator[Store]:
    store = open_grpc_store(faults.target, CONFIG)
    yield store
    store.close()


def read_until_error(store: Store, digest: bytes) -> tuple[bytes, StoreError | None]:
    """Everything the client yielded, and the error that ended it (None: it completed)."""
    got = bytearray()
    try:
        for piece in store.blobs.read(digest):
            got += piece
    except StoreError as e:
        return bytes(got), e
    return bytes(got), None


BLOB_FAULTS: list[tuple[Fault, type[StoreError]]] = [
    (Fault("corrupt", after=MEDIUM // 2), CorruptDataError),
    (Fault("truncate", after=100), CorruptDataError),
    (Fault("extra_bytes"), CorruptDataError),
    (Fault("reset", after=1000), StoreUnavailableError),
    (Fault("hang", after=1000), StoreUnavailableError),
    (Fault("slow", piece=1), StoreUnavailableError),
    (Fault("refuse"), StoreUnavailableError),
    (Fault("blackhole"), StoreUnavailableError),
    (Fault("error", code="DATA_LOSS"), CorruptDataError),
    (Fault("error", code="UNAVAILABLE"), StoreUnavailableError),
    (Fault("error", code="INTERNAL"), StoreError),
]
CHUNK_FAULTS: list[tuple[Fault, tuple[type[StoreError], ...]]] = [
    (Fault("chunk_sizes"), (CorruptDataError,)),
    (Fault("chunk_swap"), (CorruptDataError,)),
    (Fault("absurd_size"), (CorruptDataError,)),
    # The list names chunks the store does not have: absent or corrupt, both say "lost".
    (Fault("chunk_digests"), (CorruptDataError, NotFoundError)),
]


@pytest.mark.parametrize("which", ["medium", "big"])
@pytest.mark.parametrize(("fault", "error"), BLOB_FAULTS, ids=lambda x: getattr(x, "kind", ""))
def test_blob_faults(
    *, faults: FaultStore, client: Store, blobs: Blobs, which: str, fault: Fault, error: type[StoreError]
) -> None:
    digest = getattr(blobs, which)
    truth = blobs.content[digest]
    faults.set(fault)
    got, raised = read_until_error(client, digest)
    assert isinstance(raised, error), raised
    assert truth.startswith(got), "the client yielded bytes the blob does not have"
    assert back(faults, lambda: b"".join(client.blobs.read(digest))) == truth


@pytest.mark.parametrize(("fault", "errors"), CHUNK_FAULTS, ids=lambda x: getattr(x, "kind", ""))
def test_chunk_list_lies(
    faults: FaultStore, client: Store, blobs: Blobs, fault: Fault, errors: tuple[type[StoreError], ...]
) -> None:
    truth = blobs.content[blobs.big]
    faults.set(fault)
    got, raised = read_until_error(client, blobs.big)
    assert isinstance(raised, errors), raised
    if fault.kind != "chunk_swap":
        # A swapped list of genuine chunks is only caught by the whole-blob digest at the end,
        # after the chunks went out: a property of chunk lists without verified streaming.
        assert truth.startswith(got)
    faults.clear()
    assert b"".join(client.blobs.read(blobs.big)) == truth


def test_empty_and_small_blobs(faults: FaultStore, client: Store, blobs: Blobs) -> None:
    for digest, content in blobs.content.items():
        if len(content) < 100:
            assert b"".join(client.blobs.read(digest)) == content
    faults.set(Fault("extra_bytes"))
    for digest, content in blobs.content.items():
        if len(content) < 100:
            with pytest.raises(CorruptDataError):
                b"".join(client.blobs.read(digest))


@pytest.mark.parametrize("after", [1000, BIG - CHUNK // 2])
def test_broken_blob_stream_is_resumed(faults: FaultStore, client: Store, blobs: Blobs, after: int) -> None:
    """A blob stream that breaks once, early or late, and a chunk read that fails once: the
    caller sees neither."""
    chunks = client.blobs.stat(blobs.big, send_chunks=True)
    assert chunks is not None and len(chunks) == 10
    faults.set(
        Fault("reset", digest=blobs.big, after=after, times=1),
        Fault("reset", digest=chunks[-1].digest, after=10, times=1),
    )
    assert b"".join(client.blobs.read(blobs.big)) == blobs.content[blobs.big]
    assert faults.stats()["fired"]["reset"] >= 1


def test_failed_upload_stores_nothing(
    faults: FaultStore, client: Store, expected_errors: ExpectedErrors
) -> None:
    """The client ends the stream with a message no server can parse (UNDECODABLE), not a cancel
    that grpcio's sync server can take for the stream's end; stock grpcio logs the parse error."""
    expected_errors("Exception deserializing message")

    def pieces() -> Iterator[bytes]:
        yield b"the first half"
        raise OSError("the source file went away")

    with pytest.raises(OSError, match="went away"):
        client.blobs.put(pieces())
    assert not faults.store.blobs.has(b3digest(b"the first half"))


def test_scoped_blob_fault_spares_other_blobs(faults: FaultStore, client: Store, blobs: Blobs) -> None:
    faults.set(Fault("corrupt", digest=blobs.medium))
    assert b"".join(client.blobs.read(blobs.big)) == blobs.content[blobs.big]
    with pytest.raises(CorruptDataError):
        b"".join(client.blobs.read(blobs.medium))


def test_transient_resets_are_retried(faults: FaultStore, client: Store, blobs: Blobs) -> None:
    """Fewer failures in a row than the client's attempts: the caller never sees them."""
    faults.set(Fault("reset", after=1000, times=CONFIG.attempts - 1))
    assert b"".join(client.blobs.read(blobs.medium)) == blobs.content[blobs.medium]
    assert faults.stats()["fired"] == {"reset": CONFIG.attempts - 1}


def test_concurrent_readers_all_fail_cleanly_then_recover(
    faults: FaultStore, client: Store, blobs: Blobs
) -> None:
    digests = [blobs.medium, blobs.big] * 4
    faults.set(Fault("corrupt", methods=("blob.read",)))
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda d: read_until_error(client, d), digests))
    for digest, (got, raised) in zip(digests, outcomes, strict=True):
        assert isinstance(raised, CorruptDataError)
        assert blobs.content[digest].startswith(got)
    faults.clear()
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda d: b"".join(client.blobs.read(d)), digests)) == [
            blobs.content[d] for d in digests
        ]


def test_put_answers_are_verified(faults: FaultStore, client: Store) -> None:
    faults.set(Fault("corrupt", methods=("blob.put", "directory.put")))
    with pytest.raises(CorruptDataError):
        client.blobs.put([b"some bytes"])
    with pytest.raises(CorruptDataError):
        client.directories.put(Directory(symlinks=(SymlinkNode(b"a", b"b"),)))
    faults.set(Fault("hang", methods=("blob.put",)))
    with pytest.raises(StoreUnavailableError):
        client.blobs.put([b"some bytes"])
    faults.clear()
    assert client.blobs.put([b"some bytes"]) == b3digest(b"some bytes")


# -- directories -------------------------------------------------------------------------------

DIRECTORY_FAULTS: list[tuple[Fault, type[StoreError]]] = [
    (Fault("wrong_directory"), CorruptDataError),
    (Fault("bad_name", name=b".."), CorruptDataError),
    (Fault("bad_name", name=b"."), CorruptDataError),
    (Fault("bad_name", name=b"a/b"), CorruptDataError),
    (Fault("bad_name", name=b"a\0b"), CorruptDataError),
    (Fault("bad_name", name=b""), CorruptDataError),
    (Fault("bad_name", name=b"x" * 256), CorruptDataError),
    (Fault("duplicate_name"), CorruptDataError),
    (Fault("unsorted"), CorruptDataError),
    (Fault("absurd_size"), CorruptDataError),
    (Fault("dir_unreferenced"), CorruptDataError),
    (Fault("reset"), StoreUnavailableError),
    (Fault("hang"), StoreUnavailableError),
    (Fault("slow", delay=10), StoreUnavailableError),
    (Fault("error", code="DATA_LOSS"), CorruptDataError),
]
RECURSIVE_FAULTS: list[tuple[Fault, type[StoreError]]] = [
    # The same faults striking the second message (the root's child), past the first check.
    *((f if f.kind == "slow" else replace(f, after=1), e) for f, e in DIRECTORY_FAULTS),
    (Fault("dir_order"), CorruptDataError),
    (Fault("dir_duplicate", after=1), CorruptDataError),
    (Fault("dir_duplicate", after=0), CorruptDataError),
    (Fault("truncate", after=2), CorruptDataError),
    (Fault("truncate", after=0), CorruptDataError),
    (Fault("hang", after=2), StoreUnavailableError),
    (Fault("reset", after=3), StoreUnavailableError),
]


def fault_id(x: object) -> str:
    if isinstance(x, Fault):
        return f"{x.kind}-{x.after}-{x.name!r}" if x.kind == "bad_name" else f"{x.kind}-{x.after}"
    return ""


@pytest.mark.parametrize(("fault", "error"), DIRECTORY_FAULTS, ids=fault_id)
def test_get_directory_faults(
    faults: FaultStore, client: Store, sample: Sample, fault: Fault, error: type[StoreError]
) -> None:
    faults.set(fault)
    with pytest.raises(error):
        client.directories.get(sample.directories[1])
    faults.clear()
    got = client.directories.get(sample.directories[1])
    assert got is not None and got.digest() == sample.directories[1]


@pytest.mark.parametrize(("fault", "error"), RECURSIVE_FAULTS, ids=fault_id)
def test_get_recursive_faults(
    faults: FaultStore, client: Store, sample: Sample, fault: Fault, error: type[StoreError]
) -> None:
    faults.set(fault)
    received: list[bytes] = []
    with pytest.raises(error):
        received.extend(d.digest() for d in client.directories.get_recursive(sample.directories[0]))
    assert set(received) <= set(sample.directories), "the client yielded a directory not in the tree"
    faults.clear()
    assert [d.digest() for d in client.directories.get_recursive(sample.directories[0])] == sample.directories


def test_transient_directory_failure_is_retried(faults: FaultStore, client: Store, sample: Sample) -> None:
    faults.set(Fault("reset", times=CONFIG.attempts - 1))
    assert [d.digest() for d in client.directories.get_recursive(sample.directories[0])] == sample.directories


def test_hostile_directories_with_matching_digests(faults: FaultStore, client: Store) -> None:
    """Content whose digests all match: only validating each Directory can catch it."""
    for bad in (b"..", b"a/b", b"a\0b"):
        evil = castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name=bad, target=b"/etc/passwd")])
        child = faults.put_raw_directory(evil)
        parent = faults.put_raw_directory(
            castore_pb2.Directory(directories=[castore_pb2.DirectoryNode(name=b"sub", digest=child, size=1)])
        )
        with pytest.raises(CorruptDataError):
            client.directories.get(child)
        with pytest.raises(CorruptDataError):
            list(client.directories.get_recursive(parent))
    dangling = faults.put_raw_directory(
        castore_pb2.Directory(
            directories=[castore_pb2.DirectoryNode(name=b"gone", digest=b3digest(b"nowhere"), size=1)]
        )
    )
    with pytest.raises((NotFoundError, CorruptDataError)):
        list(client.directories.get_recursive(dangling))


# -- path infos ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault("pathinfo_hash"), CorruptDataError),
        (Fault("pathinfo_no_node"), CorruptDataError),
        (Fault("reset"), StoreUnavailableError),
        (Fault("hang"), StoreUnavailableError),
        (Fault("refuse"), StoreUnavailableError),
        (Fault("blackhole"), StoreUnavailableError),
        (Fault("error", code="DATA_LOSS"), CorruptDataError),
    ],
    ids=fault_id,
)
def test_pathinfo_faults(
    faults: FaultStore, client: Store, sample: Sample, fault: Fault, error: type[StoreError]
) -> None:
    faults.set(fault)
    with pytest.raises(error):
        client.pathinfos.get(sample.path.digest)
    info = back(faults, lambda: client.pathinfos.get(sample.path.digest))
    assert info is not None and info.node.directory.name == sample.path.basename.encode()


def test_pathinfo_lies_the_client_cannot_see(faults: FaultStore, client: Store, sample: Sample) -> None:
    """A request carries only the hash: a wrong name with the right hash, or an absurd size,
    pass the client; the caller that knows the name (the FUSE root lookup) must check it."""
    faults.set(Fault("pathinfo_name"), Fault("absurd_size"))
    info = client.pathinfos.get(sample.file_path.digest)
    assert info is not None
    assert info.node.file.name != sample.file_path.basename.encode()
    assert info.node.file.size == 2**63


def test_pathinfo_list_reset_mid_stream(faults: FaultStore, client: Store, sample: Sample) -> None:
    faults.set(Fault("reset", after=1, methods=("pathinfo.list",)))
    with pytest.raises(StoreUnavailableError):
        list(client.pathinfos.list())
    faults.clear()
    assert len(list(client.pathinfos.list())) == 2


def test_pathinfo_absent_is_none_not_an_error(faults: FaultStore, client: Store) -> None:
    faults.set(Fault("error", code="NOT_FOUND"))
    assert client.pathinfos.get(bytes(20)) is None
    assert client.directories.get(bytes(32)) is None
    assert client.blobs.stat(bytes(32)) is None
    with pytest.raises(NotFoundError):
        b"".join(client.blobs.read(bytes(32)))


# -- a store that goes away and comes back -----------------------------------------------------


T = TypeVar("T")


def back(faults: FaultStore, call: Callable[[], T], tries: int = 10) -> T:
    """clear(), then ``call`` until the store is reachable again (at most ``tries`` times).

    After a listener outage (refuse, blackhole) of a few seconds the channel is in a reconnect
    backoff of up to 2 s, longer than the client's retries (about 0.7 s), so the first calls
    after the store is back may still fail (reported to the client's author).
    """
    faults.clear()
    for _ in range(tries - 1):
        try:
            return call()
        except StoreUnavailableError:
            time.sleep(0.3)
    return call()


def test_refused_store_comes_back(faults: FaultStore, client: Store, sample: Sample) -> None:
    assert client.pathinfos.get(sample.path.digest) is not None
    faults.set(Fault("refuse"))
    with pytest.raises(StoreUnavailableError):
        client.pathinfos.get(sample.path.digest)
    assert back(faults, lambda: client.pathinfos.get(sample.path.digest)) is not None


def test_hung_call_completes_after_clear(faults: FaultStore, sample: Sample) -> None:
    patient = open_grpc_store(faults.target, ClientConfig(timeout=30, stream_timeout=30))
    try:
        faults.set(Fault("hang", methods=("pathinfo.get",)))
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(patient.pathinfos.get, sample.path.digest)
            wait_until(lambda: faults.stats()["fired"].get("hang", 0) >= 1)
            assert not pending.done()
            faults.clear()
            info = pending.result(timeout=30)
        assert isinstance(info, pathinfo_pb2.PathInfo)
    finally:
        patient.close()


def wait_until(condition: Callable[[], bool], tries: int = 500) -> None:
    """Poll ``condition`` every 10 ms, at most ``tries`` times (the fault store has no events)."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def test_pathinfo_list_skips_an_invalid_entry(
    faults: FaultStore, client: Store, sample: Sample, caplog: pytest.LogCaptureFixture
) -> None:
    """One invalid PathInfo must not hide the valid ones (the mount lists the root from this)."""
    faults.put_raw_pathinfo(bytes(20), pathinfo_pb2.PathInfo())
    with caplog.at_level(logging.WARNING, logger="tvixfs.services.backends.grpc"):
        listed = list(client.pathinfos.list())
    assert len(listed) == 2
    assert "invalid PathInfo" in caplog.text


def test_read_many_reads_one_by_one_from_a_server_without_batches(
    faults: FaultStore, client: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The fault store serves the tvix services only, as tvix-store does: the first ReadMany is
    UNIMPLEMENTED, said once, and every chunk is read with its own Read from then on."""
    contents = [b"small one", b"small two", random.Random(2).randbytes(40_000)]
    chunks = [ChunkMeta(faults.store.blobs.put([c]), len(c)) for c in contents]
    with caplog.at_level(logging.INFO):
        assert in_order(client.blobs.read_many(chunks)) == contents
        assert in_order(client.blobs.read_many(chunks[::-1])) == contents[::-1]
    assert caplog.text.count("has no BlobBatchService") == 1
    assert faults.stats()["calls"].get("blob.read", 0) == 2 * len(chunks)


def test_without_batches_the_chunks_of_one_read_many_are_read_at_once(
    faults: FaultStore, client: Store
) -> None:
    """Each its own Read, but not one after the other: a batch costs one round trip there too."""
    contents = [random.Random(i).randbytes(1000) for i in range(6)]
    chunks = [ChunkMeta(faults.store.blobs.put([c]), len(c)) for c in contents]
    faults.set(Fault("slow", delay=0.3, piece=1 << 20, methods=("blob.read",)))
    assert in_order(client.blobs.read_many(chunks)) == contents
    assert faults.stats()["most"]["blob.read"] > 1
