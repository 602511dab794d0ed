"""The shared mechanisms every path uses (services/regroup.py, services/chunkcheck.py,
services/readahead.py, castore/closure.py), each checked against a plain restatement of
what it must do, over many inputs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvixfs.castore.closure import ClosureError, LeavesFirst, RootFirst
from tvixfs.castore.digest import b3digest
from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import DirectoryNode, FileNode
from tvixfs.services.chunkcheck import ChunkCheck, verified
from tvixfs.services.errors import CorruptDataError
from tvixfs.services.readahead import ReadAhead
from tvixfs.services.regroup import exact_pieces, fill, grouped_by_size, regroup

sizes_lists = st.lists(st.integers(0, 50), max_size=12)


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at = [], 0
    for size in sizes:
        out.append(data[at : at + size])
        at += size
    return out


@given(st.binary(max_size=300), sizes_lists, sizes_lists)
def test_exact_pieces_cuts_at_the_sizes_or_raises(data: bytes, arrive: list[int], want: list[int]) -> None:
    arrive_total = sum(arrive)
    pieces = _cut((data * 3)[:arrive_total].ljust(arrive_total, b"x"), arrive)
    joined = b"".join(pieces)
    if sum(want) == len(joined):
        assert list(exact_pieces(pieces, want, "t")) == _cut(joined, want)
    else:
        with pytest.raises(CorruptDataError, match=r"^t: "):
            list(exact_pieces(pieces, want, "t"))


def test_a_piece_of_the_wanted_size_passes_uncopied() -> None:
    piece = b"abcdef"
    assert next(exact_pieces([piece], [6], "t")) is piece


@given(sizes_lists, st.integers(1, 20))
def test_messages_keep_bytes_and_bounds(arrive: list[int], size: int) -> None:
    pieces = [bytes([i]) * n for i, n in enumerate(arrive)]
    out = [b"".join(g) for g in regroup(pieces, iter(lambda: size, None), exact=False)]
    assert b"".join(out) == b"".join(pieces)
    assert all(len(m) == size for m in out[:-1]) and all(0 < len(m) <= size for m in out)


@given(sizes_lists, sizes_lists)
def test_fill_copies_exactly_or_raises(arrive: list[int], views: list[int]) -> None:
    pieces = [bytes([i + 1]) * n for i, n in enumerate(arrive)]
    buffer = bytearray(sum(views))
    targets, at = [], 0
    for n in views:
        targets.append(memoryview(buffer)[at : at + n])
        at += n
    if sum(arrive) == sum(views):
        fill(pieces, targets, "t")
        assert bytes(buffer) == b"".join(pieces)
    else:
        with pytest.raises(CorruptDataError):
            fill(pieces, targets, "t")


@given(st.lists(st.integers(0, 9), max_size=20), st.integers(1, 30))
def test_grouped_by_size_keeps_order_and_groups(items: list[int], size: int) -> None:
    groups = list(grouped_by_size(items, size, lambda n: n))
    assert [n for g in groups for n in g] == items
    assert all(sum(g) >= size for g in groups[:-1])


@pytest.mark.parametrize("hash_it", [True, False])
def test_chunk_check(hash_it: bool) -> None:
    data = b"some chunk of bytes"
    digest = b3digest(data)
    good = ChunkCheck(digest, len(data), "t", hash=hash_it)
    for i in range(0, len(data), 4):
        good.update(data[i : i + 4])
    good.done()
    with pytest.raises(CorruptDataError, match="more than"):
        ChunkCheck(digest, len(data), "t", hash=hash_it).update(data + b"!")
    short = ChunkCheck(digest, len(data), "t", hash=hash_it)
    short.update(data[:-1])
    with pytest.raises(CorruptDataError, match="expected"):
        short.done()
    flipped = ChunkCheck(digest, len(data), "t", hash=hash_it)
    flipped.update(data.upper())
    if hash_it:
        with pytest.raises(CorruptDataError, match="does not match"):
            flipped.done()
    else:
        flipped.done()  # counted only: the store hashed it
    assert verified(data, digest, len(data), "t") is data
    with pytest.raises(CorruptDataError):
        verified(data.upper(), digest, len(data), "t")


def _tree() -> tuple[Directory, Directory, Directory]:
    leaf = Directory(files=[FileNode(b"f", b3digest(b"x"), 1)])
    middle = Directory(directories=[DirectoryNode(b"leaf", leaf.digest(), leaf.size())])
    root = Directory(
        directories=[
            DirectoryNode(b"a", middle.digest(), middle.size()),
            DirectoryNode(b"b", leaf.digest(), leaf.size()),
        ]
    )
    return root, middle, leaf


def test_root_first_order() -> None:
    root, middle, leaf = _tree()
    order = RootFirst(root.digest())
    for directory in (root, middle, leaf):
        order.admit(directory)
    assert order.unfinished == 0
    with pytest.raises(ClosureError, match="twice"):
        order.admit(leaf)
    early = RootFirst(root.digest())
    with pytest.raises(ClosureError, match="before any directory referred to it"):
        early.admit(leaf)
    cut_short = RootFirst(root.digest())
    cut_short.admit(root)
    assert cut_short.unfinished == 2


def test_leaves_first_order() -> None:
    root, middle, leaf = _tree()
    order = LeavesFirst(lambda digest: False)
    for directory in (leaf, middle, root):
        order.admit(directory)
    with pytest.raises(ClosureError, match="neither sent before it nor stored"):
        LeavesFirst(lambda digest: False).admit(middle)
    LeavesFirst(lambda digest: digest == leaf.digest()).admit(middle)  # stored already


def test_read_ahead_runs_within_budget_in_order_and_cancels_the_rest() -> None:
    started: list[int] = []
    gate = threading.Event()

    def job(i: int) -> int:
        started.append(i)
        if i == 0:
            assert gate.wait(10)
        return i * i

    with ThreadPoolExecutor(1) as executor:
        ahead = ReadAhead(((i, 2, lambda i=i: job(i)) for i in range(10)), executor, 5)
        assert ahead.peek() == 0  # three jobs of cost 2 queued: 6 >= 5
        gate.set()
        assert [ahead.take() for _ in range(4)] == [0, 1, 4, 9]
        ahead.cancel()
    assert max(started) <= 5, "no job beyond the budget ahead of the last taken was started"
