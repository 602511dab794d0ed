"""The one way from the trio event loop to the synchronous, thread-safe store services.

pyfuse3 awaits every handler inline on one thread, so a blocking service call would stall all
kernel requests. Every call therefore runs in a worker thread, under one CapacityLimiter (so a
slow store cannot spawn unbounded threads) and under a deadline. A thread cannot be killed, so
a call that misses its deadline is abandoned: the request fails with StoreUnavailableError at
once and the thread finishes (and frees its limiter slot) in the background.

Server streams (blob reads, recursive directory gets, path info listings) are pumped by one
thread into a trio memory channel, at most ``STREAM_BUFFER`` items ahead of the consumer: the
consumer sees items as they arrive, the deadline applies to each item rather than to the
whole stream (a large blob that keeps flowing is not cut off), and leaving early makes the
thread stop and close the service's iterator (a gRPC client cancels its call there). The
thread does not wait for the loop to take each item, only for room: it goes on receiving and
checking the next one while the loop is busy replying to the kernel.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar, TypeVarTuple, cast

import trio

from tvixfs import defaults
from tvixfs.services.errors import StoreUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

STREAM_BUFFER = 4


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


class _End:
    pass


_END = _End()


class _Room:
    """Backpressure for one pump: a slot per item handed over and not yet received."""

    def __init__(self) -> None:
        self._slots = threading.Semaphore(STREAM_BUFFER)
        self.closed = False

    def wait(self) -> bool:
        """In the pump thread: wait for a free slot; False once the consumer has left."""
        self._slots.acquire()
        return not self.closed

    def freed(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self.closed = True
        self._slots.release()  # wakes a pump waiting for room


class Stream(Generic[T]):
    """The receiving end of a pumped stream; iterate it with ``async for``."""

    def __init__(
        self, receive: trio.MemoryReceiveChannel[T | _Failed | _End], room: _Room, deadline: float
    ) -> None:
        self._receive = receive
        self._room = room
        self._deadline = deadline
        self._done = False

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        with trio.move_on_after(self._deadline) as scope:
            item = await self._receive.receive()
        if scope.cancelled_caught:
            raise StoreUnavailableError(f"store sent nothing for {self._deadline:g} s")
        if isinstance(item, _End):
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        self._room.freed()
        return item


class Handover(Generic[T]):
    """Items a worker thread hands to the event loop as it makes them, while its call runs.

    Each turn of the loop takes all that arrived since the last, so a fast producer costs a
    wake-up of the loop per batch, not per item. Everything put before the call returns is
    taken before its caller resumes: the loop runs its callbacks in order, and the call's own
    completion is queued after them.
    """

    def __init__(self, take: Callable[[list[T]], None]) -> None:
        self._take = take
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._items: list[T] = []

    def put(self, item: T) -> None:
        """In the worker thread."""
        with self._lock:
            self._items.append(item)
            if len(self._items) > 1:  # a take is queued already
                return
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        try:
            self._take(items)
        except Exception:  # raised here, it would end trio.run and with it the mount
            log.exception("handing %d items to the event loop failed", len(items))


class Slot:
    """A worker thread's place in a bridge, taken before the work it is for is known.

    Passed to ``Bridge.call``, it stands in for the bridge's limiter (trio takes any object
    with ``acquire_on_behalf_of``/``release_on_behalf_of``): the thread keeps it until it
    ends, even abandoned, as with the limiter itself. Not passed to a call, ``give_back``
    returns it.
    """

    def __init__(self, limiter: trio.CapacityLimiter, borrower: object) -> None:
        self._limiter = limiter
        self._borrower = borrower
        self._used = False
        self._returned = False

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        assert not self._used, "a slot serves one call"
        self._used = True

    def release_on_behalf_of(self, borrower: object) -> None:
        self._return()

    def give_back(self) -> None:
        """Return the slot unless a call has it (that call's thread returns it when it ends)."""
        if not self._used:
            self._return()

    def _return(self) -> None:
        if not self._returned:
            self._returned = True
            self._limiter.release_on_behalf_of(self._borrower)


class Bridge:
    def __init__(self, threads: int = defaults.THREADS, deadline: float = defaults.DEADLINE) -> None:
        self.limiter = trio.CapacityLimiter(threads)
        self.deadline = deadline

    async def call(self, fn: Callable[[*Ts], T], *args: *Ts, slot: Slot | None = None) -> T:
        """``fn(*args)`` in a worker thread (in ``slot``, if one was reserved); StoreUnavailableError
        if it misses the deadline."""
        with trio.move_on_after(self.deadline):
            # trio takes a "CapacityLimiter-like object"; its annotation names only the class.
            limiter = self.limiter if slot is None else cast(trio.CapacityLimiter, slot)
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)
        name = getattr(fn, "__qualname__", repr(fn))
        raise StoreUnavailableError(f"the store did not answer within {self.deadline:g} s ({name})")

    async def reserve(self) -> Slot:
        """A thread's place, waited for up to the deadline (StoreUnavailableError beyond: the
        threads are all held by calls to a store that does not answer)."""
        borrower = object()
        with trio.move_on_after(self.deadline):
            await self.limiter.acquire_on_behalf_of(borrower)
            return Slot(self.limiter, borrower)
        raise StoreUnavailableError(f"no thread free for the store within {self.deadline:g} s")

    @asynccontextmanager
    async def stream(self, source: Callable[[], Iterable[T]]) -> AsyncIterator[Stream[T]]:
        """Iterate ``source()`` in a worker thread; the body receives its items in order.

        An exception raised by the source is raised by the ``async for`` after the items
        before it. Leaving the body early stops the thread at its next item.
        """
        # Room for every item the pump may have handed over, and its last word.
        send, receive = trio.open_memory_channel[T | _Failed | _End](STREAM_BUFFER + 1)
        room = _Room()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_pump, source, send, room)
                try:
                    with receive:
                        yield Stream(receive, room, self.deadline)
                finally:
                    room.close()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The pump never raises, so the group holds what the body raised, and perhaps the
            # Cancelled of a scope around it cancelled meanwhile: hand the body's exception on
            # as it is (a caller's ``except Exception`` would miss a group, and one logging
            # "ExceptionGroup" would hide what went wrong). The scope cancels again at its
            # next checkpoint.
            errors = group.split(trio.Cancelled)[1] or group
            if len(errors.exceptions) == 1:
                raise errors.exceptions[0] from None
            raise

    async def _run_pump(
        self,
        source: Callable[[], Iterable[T]],
        send: trio.MemorySendChannel[T | _Failed | _End],
        room: _Room,
    ) -> None:
        def take(items: list[T | _Failed | _End]) -> None:
            try:
                for item in items:
                    send.send_nowait(item)  # never full: the pump waits for room first
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                room.close()  # the consumer left

        pump = partial(_pump, source, Handover(take), room)
        await trio.to_thread.run_sync(pump, limiter=self.limiter, abandon_on_cancel=True)


def _pump(source: Callable[[], Iterable[T]], handover: Handover[T | _Failed | _End], room: _Room) -> None:
    iterator: Iterator[T] | None = None
    try:
        iterator = iter(source())
        for item in iterator:
            if not room.wait():
                return
            handover.put(item)
        handover.put(_END)
    except Exception as e:
        handover.put(_Failed(e))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
