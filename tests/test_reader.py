"""The file content reader on its own: batched fetches, whole-blob streams over a remote store,
and the coalescing of concurrent fetches they rely on. Real stores, no kernel."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from tvixfs.castore.nodes import FileNode
from tvixfs.fs import chunkcache, sequential, wholeblob
from tvixfs.fs import reader as reader_module
from tvixfs.fs.bridge import Bridge, Handover
from tvixfs.fs.inflight import InFlight, Settle
from tvixfs.fs.reader import BlobReader
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import BlobCapabilities, BlobService, ChunkMeta, Store
from tvixfs.services.errors import CorruptDataError, StoreUnavailableError

KERNEL_READ = 128 * 1024
SIZE = 3 * 1024 * 1024 + 17


class Watched(BlobService):
    """A real blob service seen through a window: counts reads, can damage a blob's bytes."""

    def __init__(self, inner: BlobService) -> None:
        self.inner = inner
        self.reads: Counter[bytes] = Counter()
        self.damage: dict[bytes, int] = {}  # digest -> offset of a byte flipped when read

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        return self.inner.stat(digest, send_chunks)

    def read(self, digest: bytes) -> Iterator[bytes]:
        self.reads[digest] += 1
        data = b"".join(self.inner.read(digest))
        at = self.damage.get(digest)
        if at is not None:
            data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
        return iter([data[i : i + 100_000] for i in range(0, len(data), 100_000)])

    def put(self, data: Iterable[bytes]) -> bytes:
        return self.inner.put(data)


class RemoteLike(Watched):
    capabilities = BlobCapabilities(calls_are_remote=True)


@pytest.fixture
def small_stream_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams for a 3 MiB file: after 256 KiB read in order, with at least 512 KiB left."""
    monkeypatch.setattr(wholeblob, "WHOLE_READ_AFTER", 256 * 1024)
    monkeypatch.setattr(wholeblob, "WHOLE_READ_REST", 512 * 1024)


async def _read_in_order(reader: BlobReader, node: FileNode) -> bytes:
    file = await reader.open(node, b"test")
    pieces = []
    for offset in range(0, node.size, KERNEL_READ):
        pieces.append(await reader.read(file, offset, KERNEL_READ))
    return b"".join(pieces)


def _big_file(store: Store) -> tuple[FileNode, bytes, list[ChunkMeta]]:
    data = os.urandom(SIZE)
    digest = store.blobs.put([data])
    chunks = store.blobs.stat(digest, send_chunks=True)
    assert chunks is not None and len(chunks) > 4, "the file should span several chunks"
    return FileNode(b"big", digest, SIZE), data, chunks


@pytest.mark.usefixtures("small_stream_thresholds")
async def test_a_long_pass_over_a_remote_store_reads_the_blob_once(
    store: Store, background: trio.Nursery
) -> None:
    node, data, chunks = _big_file(store)
    remote = RemoteLike(store.blobs)
    reader = BlobReader(Bridge(), remote, background, readahead_bytes=256 * 1024)
    assert await _read_in_order(reader, node) == data
    assert remote.reads[node.digest] == 1
    # Only the chunks of the first few reads, before the stream started, were fetched alone.
    alone = sum(remote.reads[c.digest] for c in chunks)
    assert alone < len(chunks) // 2, (alone, len(chunks))


@pytest.mark.usefixtures("small_stream_thresholds")
async def test_a_damaged_stream_never_shows_its_bytes(store: Store, background: trio.Nursery) -> None:
    node, data, chunks = _big_file(store)
    remote = RemoteLike(store.blobs)
    remote.damage[node.digest] = SIZE - chunks[-1].size - 10  # in the chunk before the last
    reader = BlobReader(Bridge(), remote, background, readahead_bytes=256 * 1024)
    # The stream stops at the damaged chunk; that one and the rest are fetched alone, intact.
    assert await _read_in_order(reader, node) == data
    assert remote.reads[node.digest] == 1
    assert remote.reads[chunks[-2].digest] == 1
    assert remote.reads[chunks[-1].digest] == 1


async def test_a_local_store_is_read_in_runs_each_chunk_once(store: Store, background: trio.Nursery) -> None:
    node, data, chunks = _big_file(store)
    watched = Watched(store.blobs)
    reader = BlobReader(Bridge(), watched, background)
    assert await _read_in_order(reader, node) == data
    assert watched.reads[node.digest] == 0
    assert all(watched.reads[c.digest] == 1 for c in chunks), watched.reads
    assert reader.stats.chunks_fetched == len(chunks)


class Batching(RemoteLike):
    """A remote-like store that records the size of each ``read_many`` asked of it."""

    def __init__(self, inner: BlobService, reads_many: bool) -> None:
        super().__init__(inner)
        self.capabilities = BlobCapabilities(calls_are_remote=True, reads_many=reads_many)
        self.batches: list[int] = []

    def read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        self.batches.append(len(chunks))
        return super().read_many(chunks)


@pytest.mark.parametrize("reads_many", [True, False])
async def test_readahead_over_a_remote_store_asks_for_each_run_in_one_call(
    store: Store, background: trio.Nursery, reads_many: bool
) -> None:
    """A run read ahead is one ``read_many`` (one ReadMany over gRPC), not a call per chunk;
    over a remote store that answers a chunk per call, it is a call per chunk, all at once."""
    node, data, chunks = _big_file(store)  # too short for a whole-blob stream
    remote = Batching(store.blobs, reads_many)
    reader = BlobReader(Bridge(), remote, background, readahead_bytes=1024 * 1024)
    assert await _read_in_order(reader, node) == data
    assert all(remote.reads[c.digest] == 1 for c in chunks)
    if reads_many:  # most chunks came in batches, far fewer batches than chunks
        assert sum(remote.batches) >= len(chunks) // 2, (remote.batches, len(chunks))
        assert len(remote.batches) <= len(chunks) // 2, (remote.batches, len(chunks))
    else:
        assert remote.batches == []


async def test_claims_hand_their_outcome_to_waiters_or_let_them_fetch() -> None:
    inflight: InFlight[str, int] = InFlight()
    fetched: list[str] = []

    async def fetch(key: str) -> int:
        fetched.append(key)
        return len(key)

    results: dict[str, int] = {}

    async def wait_for(key: str) -> None:
        results[key] = await inflight.run(key, lambda: fetch(key))

    assert inflight.claim("resolved") and inflight.claim("abandoned")
    assert not inflight.claim("resolved")  # somebody is fetching it already
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for, "resolved")
        nursery.start_soon(wait_for, "abandoned")
        await trio.testing.wait_all_tasks_blocked()
        inflight.resolve("resolved", 42)
        inflight.abandon("abandoned")
    assert results == {"resolved": 42, "abandoned": 9}
    assert fetched == ["abandoned"]  # the waiter of the abandoned claim fetched it itself


async def test_a_batch_fetch_fails_each_key_on_its_own() -> None:
    inflight: InFlight[str, int] = InFlight()
    broken = ValueError("broken")

    async def fetch_many(keys: list[str], settle: Settle[str, int]) -> None:
        await trio.sleep(0.01)
        for key in keys:
            settle(key, broken if key == "bad" else len(key))

    async def fetch_again() -> int:
        raise AssertionError("a key of the batch was fetched again")

    outcomes: dict[str, int | Exception] = {}

    async def wait_for(key: str) -> None:
        try:
            outcomes[key] = await inflight.run(key, fetch_again)
        except ValueError as e:
            outcomes[key] = e

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inflight.run_many, ["good", "bad", "good"], fetch_many)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait_for, "good")
        nursery.start_soon(wait_for, "bad")
    assert outcomes == {"good": 4, "bad": broken}


async def test_each_key_of_a_batch_is_handed_on_when_settled_and_none_is_left_waiting() -> None:
    """A waiter gets its key while the batch is still being fetched; a key the fetch never
    settles fails its waiters rather than hanging them; a settle after the end changes nothing."""
    inflight: InFlight[str, int] = InFlight()
    waiting, first_taken = trio.Event(), trio.Event()
    settles: list[Settle[str, int]] = []
    waited: dict[str, int | Exception] = {}

    async def fetch_many(keys: list[str], settle: Settle[str, int]) -> None:
        settles.append(settle)
        await waiting.wait()
        assert settle("first", 1) and not settle("first", 2)
        await first_taken.wait()  # set by the waiter for "first": the batch is not over yet

    async def wait_for(key: str) -> None:
        try:
            waited[key] = await inflight.run(key, _never)
        except LookupError as e:
            waited[key] = e
        if key == "first":
            first_taken.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inflight.run_many, ["first", "forgotten"], fetch_many)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait_for, "first")
            nursery.start_soon(wait_for, "forgotten")
            await trio.testing.wait_all_tasks_blocked()
            waiting.set()
    assert waited["first"] == 1
    assert isinstance(waited["forgotten"], LookupError)
    assert not settles[0]("forgotten", 3)
    assert len(inflight) == 0


@pytest.mark.expect_errors
async def test_a_handover_that_fails_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """An exception from a callback of ``run_sync_soon`` would end ``trio.run``, the mount
    with it; ``Handover`` logs it instead."""

    def take(items: list[int]) -> None:
        raise ValueError(f"cannot take {items}")

    handover = Handover(take)
    await trio.to_thread.run_sync(handover.put, 7)  # taken before the call's completion
    assert "handing 1 items to the event loop failed" in caplog.text
    assert "cannot take [7]" in caplog.text


class _HeldBatches(BlobService):
    """A store answering many chunks in one call, which holds the call open after its first
    answer until ``release`` is set."""

    capabilities = BlobCapabilities(calls_are_remote=True, reads_many=True)

    def __init__(self, inner: BlobService) -> None:
        self.inner = inner
        self.release = threading.Event()

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        return self.inner.stat(digest, send_chunks)

    def read(self, digest: bytes) -> Iterator[bytes]:
        return self.inner.read(digest)

    def read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        for i, answer in self.inner.read_many(chunks):
            yield i, answer
            assert self.release.wait(10), "the test never let the call end"

    def put(self, data: Iterable[bytes]) -> bytes:
        return self.inner.put(data)


async def test_a_chunk_of_a_batch_reaches_its_reader_before_the_batch_ends(store: Store) -> None:
    """Over a far store a batch of 16 chunks can take a while; a read waiting for its first
    must not wait for the rest."""
    contents = [os.urandom(1000) for _ in range(3)]
    chunks = [ChunkMeta(store.blobs.put([c]), len(c)) for c in contents]
    held = _HeldBatches(store.blobs)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            cache = chunkcache.ChunkCache(Bridge(), held, nursery, 1 << 20, 0)
            nursery.start_soon(cache.fetch_run, chunks, True)
            await trio.testing.wait_all_tasks_blocked()
            assert await cache.get(chunks[0], True) == contents[0]
            assert cache.busy(chunks[1].digest) and cache.wanted(chunks[1].digest), "still coming"
            held.release.set()
    assert [await cache.get(c, True) for c in chunks] == contents
    assert cache.stats.chunks_fetched == 3


async def _never() -> int:
    raise AssertionError("fetched although a batch had claimed it")


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes in blocks of 512 KiB, so that a 3 MiB file spans several, with chunks across
    their boundaries."""
    monkeypatch.setattr(sequential, "BLOCK", 512 * 1024)
    monkeypatch.setattr(reader_module, "PASS_MIN", 1024 * 1024)


def _passing_reader(blobs: BlobService, background: trio.Nursery) -> BlobReader:
    """A reader that reads the 3 MiB file in passes."""
    return BlobReader(Bridge(), blobs, background, readahead_bytes=1024 * 1024)


@pytest.mark.usefixtures("small_blocks")
async def test_a_pass_over_a_local_store_reads_blocks_not_chunks(
    store: Store, background: trio.Nursery
) -> None:
    node, data, chunks = _big_file(store)
    watched = Watched(store.blobs)
    reader = _passing_reader(watched, background)
    file = await reader.open(node, b"test")
    # The kernel's readahead arrives out of order: still one pass, each chunk read once by
    # every block it overlaps.
    offsets = list(range(0, SIZE, KERNEL_READ))
    for i in range(0, len(offsets) - 1, 4):
        offsets[i], offsets[i + 1] = offsets[i + 1], offsets[i]
    pieces = {offset: bytes(await reader.read(file, offset, KERNEL_READ)) for offset in offsets}
    assert b"".join(pieces[o] for o in sorted(pieces)) == data
    assert reader.stats.chunks_fetched == 0  # nothing went through the chunk cache
    phase = (offsets[0] + KERNEL_READ) % sequential.KERNEL_READ  # the pass's block grid
    block = sequential.BLOCK
    start = 0
    for chunk in chunks:
        blocks = (start + chunk.size - 1 - phase) // block - (start - phase) // block + 1
        assert watched.reads[chunk.digest] == blocks, (start, chunk.size)
        start += chunk.size


@pytest.mark.usefixtures("small_blocks")
async def test_a_damaged_chunk_file_fails_only_the_reads_that_need_it(
    store: Store, tmp_path: Path, background: trio.Nursery
) -> None:
    node, data, chunks = _big_file(store)
    damaged = chunks[len(chunks) // 2]
    path = tmp_path / "store" / "chunks" / damaged.digest.hex()[:2] / damaged.digest.hex()
    original = path.read_bytes()
    path.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    start = sum(c.size for c in chunks[: len(chunks) // 2])
    reader = _passing_reader(store.blobs, background)
    file = await reader.open(node, b"test")
    for offset in range(0, SIZE, KERNEL_READ):
        if offset < start + damaged.size and start < offset + KERNEL_READ:
            with pytest.raises(CorruptDataError):
                await reader.read(file, offset, KERNEL_READ)
        else:
            got = await reader.read(file, offset, KERNEL_READ)
            assert bytes(got) == data[offset : offset + KERNEL_READ], offset
    path.write_bytes(original)  # healed: the next pass asks the store again
    assert await _read_in_order(reader, node) == data


def test_read_into_takes_only_a_chunk_of_exactly_its_size(store: Store, tmp_path: Path) -> None:
    _, data, chunks = _big_file(store)
    chunk = chunks[0]
    path = tmp_path / "store" / "chunks" / chunk.digest.hex()[:2] / chunk.digest.hex()
    buffer = bytearray(chunk.size)
    store.blobs.read_into(chunk.digest, [memoryview(buffer)[:10], memoryview(buffer)[10:]])
    assert bytes(buffer) == data[: chunk.size]
    for wrong in (data[: chunk.size] + b"x", data[: chunk.size - 1]):
        path.write_bytes(wrong)
        with pytest.raises(CorruptDataError):
            store.blobs.read_into(chunk.digest, [memoryview(bytearray(chunk.size))])


class Hanging(Watched):
    """A store whose reads hang until released (then fail): a store that stopped answering."""

    def __init__(self, inner: BlobService) -> None:
        super().__init__(inner)
        self.released = threading.Event()

    def read(self, digest: bytes) -> Iterator[bytes]:
        self.reads[digest] += 1
        self.released.wait(60)
        raise StoreUnavailableError("released at the end of the test")


async def test_a_chunk_the_store_did_not_answer_for_fails_at_once_for_a_moment(
    store: Store, background: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunkcache, "UNAVAILABLE_MEMORY", 0.5)
    monkeypatch.setattr(chunkcache, "UNAVAILABLE_SLOW", 0.2)
    data = os.urandom(100_000)
    node = FileNode(b"small", store.blobs.put([data]), len(data))
    hanging = Hanging(store.blobs)
    reader = BlobReader(Bridge(deadline=0.3), hanging, background)
    try:
        file = await reader.open(node, b"test")
        for _ in range(2):  # the kernel's readahead read, then its retry of the same page
            start = trio.current_time()
            with pytest.raises(StoreUnavailableError):
                await reader.read(file, 0, KERNEL_READ)
            took = trio.current_time() - start
        assert hanging.reads[node.digest] == 1, "the retry must not wait for the store again"
        assert took < 0.2
        await trio.sleep(0.5)
        with pytest.raises(StoreUnavailableError):  # later, the store is asked again
            await reader.read(file, 0, KERNEL_READ)
        assert hanging.reads[node.digest] == 2
        await trio.sleep(0.5)
        hanging.released.set()  # now failing at once: such failures are not remembered
        for reads in (3, 4):
            with pytest.raises(StoreUnavailableError):
                await reader.read(file, 0, KERNEL_READ)
            assert hanging.reads[node.digest] == reads
    finally:
        hanging.released.set()


class ListedWrongly(Watched):
    """A store whose chunk list for ``blob`` is ``listed``: genuine chunks, sizes of its own."""

    def __init__(self, inner: BlobService, blob: bytes, listed: list[ChunkMeta]) -> None:
        super().__init__(inner)
        self.blob, self.listed = blob, listed

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        return self.listed if digest == self.blob else self.inner.stat(digest, send_chunks)


@pytest.mark.parametrize("warm", [False, True])
async def test_a_cached_chunk_listed_with_another_size_is_refused(
    store: Store, background: trio.Nursery, warm: bool
) -> None:
    """Chunks are cached and shared by digest alone: a chunk list giving a cached chunk another
    size fails the read, as it does when the chunk is fetched, rather than shifting the file."""
    small, big = os.urandom(100_000), os.urandom(1_200_000)
    small_digest, big_digest = store.blobs.put([small]), store.blobs.put([big])
    claimed = b"\x07" * 32  # a blob listed as small's bytes, said to be 10 000, then big's
    blobs = ListedWrongly(
        store.blobs, claimed, [ChunkMeta(small_digest, 10_000), ChunkMeta(big_digest, len(big))]
    )
    reader = BlobReader(Bridge(), blobs, background)
    if warm:  # an honest file of the same bytes was read first
        honest = FileNode(b"honest", small_digest, len(small))
        assert await reader.read(await reader.open(honest, b"test"), 0, len(small)) == small
    lying = await reader.open(FileNode(b"lying", claimed, 10_000 + len(big)), b"test")
    with pytest.raises(CorruptDataError):
        await reader.read(lying, 0, 20_000)


async def test_a_reader_is_not_held_up_by_a_fetch_ahead_waiting_for_a_thread(
    background: trio.Nursery,
) -> None:
    """A run for the threads that fetch ahead (sibling prefetch, a profile replay) claims its
    chunks only once it has a thread: queued behind busy ones, it must not make a reader of one
    of its chunks wait (and fail at the deadline) while the readers' own threads are free."""
    blobs = open_memory_store().blobs
    data = [os.urandom(1000) for _ in range(2)]
    chunks = [ChunkMeta(blobs.put([d]), len(d)) for d in data]
    cache = chunkcache.ChunkCache(Bridge(deadline=0.5), blobs, background, 1 << 20, 0)
    cache.ahead = Bridge(1, deadline=0.5)
    release = threading.Event()

    async def busy() -> None:  # the one thread for fetches ahead, held by a slow call
        with trio.move_on_after(5):
            await trio.to_thread.run_sync(release.wait, 5, limiter=cache.ahead.limiter)

    async def ahead() -> None:
        with contextlib.suppress(StoreUnavailableError):
            await cache.fetch_run(chunks, True, bridge=cache.ahead)

    background.start_soon(busy)
    await trio.testing.wait_all_tasks_blocked()
    background.start_soon(ahead)
    await trio.testing.wait_all_tasks_blocked()
    try:
        assert await cache.get(chunks[0], True) == data[0]
    finally:
        release.set()


async def test_a_reserved_thread_slot_is_given_back_once() -> None:
    bridge = Bridge(1, deadline=0.5)
    unused = await bridge.reserve()
    unused.give_back()
    unused.give_back()
    used = await bridge.reserve()
    assert await bridge.call(len, b"abc", slot=used) == 3
    used.give_back()  # its thread gave it back already
    assert bridge.limiter.borrowed_tokens == 0
    held = await bridge.reserve()
    with pytest.raises(StoreUnavailableError):  # no thread free: an error at the deadline
        await bridge.reserve()
    held.give_back()


async def test_a_warm_run_waits_for_no_thread(background: trio.Nursery) -> None:
    """``fetch_run`` of chunks all cached (a warm read spanning chunks) reserves no thread: with
    every thread held by a store that does not answer, it still answers at once."""
    blobs = open_memory_store().blobs
    data = [os.urandom(1000) for _ in range(2)]
    chunks = [ChunkMeta(blobs.put([d]), len(d)) for d in data]
    cache = chunkcache.ChunkCache(Bridge(1, deadline=0.5), blobs, background, 1 << 20, 0)
    await cache.fetch_run(chunks, True)
    release = threading.Event()

    async def hung() -> None:
        with trio.move_on_after(5):
            await trio.to_thread.run_sync(release.wait, 5, limiter=cache.bridge.limiter)

    background.start_soon(hung)
    await trio.testing.wait_all_tasks_blocked()
    try:
        with trio.fail_after(0.2):
            assert await cache.fetch_run(chunks, True) == {}
    finally:
        release.set()
