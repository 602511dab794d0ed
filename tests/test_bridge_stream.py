"""``Bridge.stream``: a server stream pumped by a worker thread into the event loop.

Real threads and a real trio loop; the sources are plain generators, so each test can watch
what the pump thread did and when.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import trio

from tvixfs.fs.bridge import STREAM_BUFFER, Bridge
from tvixfs.services.errors import StoreUnavailableError


class Source:
    """Counts the items the pump took, and whether the iterator was closed."""

    def __init__(self, count: int, fail_after: int | None = None, stall_after: int | None = None) -> None:
        self.count = count
        self.fail_after = fail_after
        self.stall_after = stall_after
        self.taken = 0
        self.closed = threading.Event()
        self.gate: threading.Event | None = None  # if set: waited for after the first item
        self.reach = 0  # ``reached`` is set once this many items were taken
        self.reached = threading.Event()

    def __call__(self) -> Iterator[int]:
        try:
            for i in range(self.count):
                if i == self.fail_after:
                    raise ValueError(f"broken at {i}")
                if i == self.stall_after:
                    self.closed.wait(5)
                if i == 1 and self.gate is not None:
                    self.gate.wait(5)
                self.taken += 1
                if self.taken == self.reach:
                    self.reached.set()
                yield i
        finally:
            self.closed.set()


async def test_items_arrive_in_order_then_the_end() -> None:
    source = Source(50)
    async with Bridge().stream(source) as stream:
        assert [item async for item in stream] == list(range(50))
    assert source.closed.is_set()


async def test_a_failing_source_raises_after_the_items_before_it() -> None:
    got: list[int] = []
    with pytest.raises(ValueError, match="broken at 7"):
        async with Bridge().stream(Source(50, fail_after=7)) as stream:
            async for item in stream:
                got.append(item)
    assert got == list(range(7))


async def test_the_pump_runs_ahead_while_the_loop_is_busy_but_only_so_far() -> None:
    # The loop is blocked (as by a long reply to the kernel) right after the first item: the
    # pump goes on taking items meanwhile, without waiting for a turn of the loop, and stops
    # once STREAM_BUFFER of them wait for the consumer.
    source = Source(100)
    source.gate = threading.Event()
    source.reach = 1 + STREAM_BUFFER + 1  # handed over, plus the one waiting for room
    async with Bridge().stream(source) as stream:
        assert await stream.__anext__() == 0
        source.gate.set()  # the pump goes on only now, while the event loop is blocked in
        assert source.reached.wait(5), source.taken  # this wait, which takes no turn
        await trio.sleep(0.2)
        assert source.taken == source.reach  # nothing was received: no more room
        rest = [item async for item in stream]
    assert rest == list(range(1, 100))


async def test_leaving_early_closes_the_source() -> None:
    source = Source(10_000)
    async with Bridge().stream(source) as stream:
        async for item in stream:
            if item == 3:
                break
    # The pump stops at its next item and closes the iterator (a gRPC call is cancelled there).
    assert await trio.to_thread.run_sync(source.closed.wait, 5)
    assert source.taken < 3 + STREAM_BUFFER + 3


async def test_a_source_that_stops_sending_misses_the_deadline() -> None:
    source = Source(10, stall_after=2)
    got: list[int] = []
    with pytest.raises(StoreUnavailableError, match="sent nothing"):
        async with Bridge(deadline=0.3).stream(source) as stream:
            async for item in stream:
                got.append(item)
    assert got == [0, 1]
    source.closed.set()  # lets the stalled pump thread finish


async def test_the_body_s_error_stays_itself_when_a_scope_around_is_cancelled_at_once() -> None:
    """The body fails while the pump runs and an enclosing scope is cancelled: the nursery holds
    both, and the body's error must come out as itself, not as an ExceptionGroup that every
    ``except Exception`` of the mount would miss."""
    with pytest.raises(ValueError, match="the body failed"), trio.CancelScope() as outer:
        async with Bridge().stream(lambda: iter(range(100))) as stream:
            await stream.__anext__()
            outer.cancel()
            raise ValueError("the body failed")
