"""Coalescing of identical concurrent fetches: the first caller fetches, the others wait for it.

The kernel sends many requests for the same thing at once (parallel readers of one chunk,
readahead overlapping a read, a shell and its child looking up the same store path); each
would otherwise become its own round trip to the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# ``settle(key, outcome)`` of ``InFlight.run_many``.
Settle = Callable[[K, V | Exception], bool]


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

    def __len__(self) -> int:
        return len(self._pending)

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

    def claim(self, key: K) -> bool:
        """Take on fetching ``key`` unless someone already is; True if the caller now must.

        A claim ends with ``resolve`` or ``abandon``; until then every ``run`` for the key
        waits for it.
        """
        if key in self._pending:
            return False
        self._pending[key] = _Pending()
        return True

    def resolve(self, key: K, outcome: V | Exception) -> None:
        """End a claim: its waiters get the value, or the exception raised."""
        pending = self._pending.pop(key)
        if isinstance(outcome, Exception):
            pending.error = outcome
        else:
            pending.result = (outcome,)
        pending.done.set()

    def abandon(self, key: K) -> None:
        """End a claim without an outcome: one of its waiters fetches instead."""
        self._pending.pop(key).done.set()

    async def run_many(
        self, keys: Sequence[K], fetch: Callable[[list[K], Settle[K, V]], Awaitable[None]]
    ) -> dict[K, V | Exception]:
        """Fetch, in one ``fetch`` call, those of ``keys`` that nobody is fetching yet.

        ``fetch`` gets the claimed keys in order and a ``settle(key, outcome)`` to call, on the
        event loop, as soon as each key's value (or the exception that failed only that key)
        is known: the callers of ``run`` waiting for that key get it then, not when the whole
        call ends. ``settle`` says whether it settled the key (False once it was, or once
        ``run_many`` has ended: a late answer changes nothing). If ``fetch`` raises, the keys it
        did not settle fail with that exception (or, if it was cancelled, are left to one of
        their waiters); keys still open when it returns fail as unanswered. Keys already being
        fetched are left to their fetcher. Returns the outcomes of the claimed keys.
        """
        claimed = [key for key in dict.fromkeys(keys) if self.claim(key)]
        outcomes: dict[K, V | Exception] = {}
        open_keys = set(claimed)

        def settle(key: K, outcome: V | Exception) -> bool:
            if key not in open_keys:
                return False
            open_keys.remove(key)
            outcomes[key] = outcome
            self.resolve(key, outcome)
            return True

        if not claimed:
            return outcomes
        try:
            await fetch(claimed, settle)
        except Exception as e:
            for key in claimed:
                settle(key, e)
            raise
        except BaseException:
            for key in open_keys:
                self.abandon(key)
            open_keys.clear()
            raise
        for key in claimed:
            settle(key, LookupError(f"the fetch of {len(claimed)} gave no outcome for {key!r}"))
        return outcomes
