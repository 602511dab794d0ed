"""Coalescing of identical concurrent fetches: the first caller fetches, the others wait for it.

The kernel sends many requests for the same thing at once (parallel readers of one chunk,
readahead overlapping a read, a shell and its child looking up the same store path); each
would otherwise become its own round trip to the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Pending(Generic[V]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: tuple[V] | None = None  # a tuple, so that None can be a result
        self.error: Exception | None = None


class InFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._pending: dict[K, _Pending[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._pending

    async def run(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        """The result of ``fetch()``, shared with every concurrent caller for the same key.

        A failure is shared too (no request retries what just failed). If the fetching task is
        cancelled (its request was interrupted), one of the waiters fetches instead.
        """
        while (pending := self._pending.get(key)) is not None:
            await pending.done.wait()
            if pending.result is not None:
                return pending.result[0]
            if pending.error is not None:
                raise pending.error
        pending = _Pending()
        self._pending[key] = pending
        try:
            value = await fetch()
        except Exception as e:
            pending.error = e
            raise
        else:
            pending.result = (value,)
            return value
        finally:
            del self._pending[key]
            pending.done.set()
