"""Damaged data in the store, as the server reports it: to its operator, and to its clients.

The operator needs to know which chunk file or row is damaged, once: a client that keeps asking
for a damaged blob (a mount retrying a read, a program started over and over) must not write the
daemon's log at its request rate. So each distinct damage is logged at most once per
``REPEAT_AFTER`` seconds, with the count of the times it was met meanwhile.

A client needs to know only that the server's copy is damaged: it knows what it asked for. The
error's own text (a chunk file's path on the server's disk) stays in the server's log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cachetools import LRUCache

log = logging.getLogger(__name__)

# What a client is told instead of the error's text.
CLIENT_DETAIL = "the server's copy is damaged (its log says where)"

REPEAT_AFTER = 60.0
# Distinct damages remembered; beyond that the least recent may be logged again early.
REMEMBERED = 1024


class DamageLog:
    """Warnings about damaged data, each distinct one at most once per ``repeat_after`` seconds.

    Safe to call from grpcio's handler threads at once.
    """

    def __init__(
        self,
        repeat_after: float = REPEAT_AFTER,
        remembered: int = REMEMBERED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repeat_after = repeat_after
        self._clock = clock
        self._lock = threading.Lock()
        # Error text -> [when it was last logged, times met since then].
        self._seen: LRUCache[str, list[float]] = LRUCache(maxsize=remembered)

    def report(self, where: str, error: Exception) -> None:
        text = str(error)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(text)
            if seen is not None and now - seen[0] < self._repeat_after:
                seen[1] += 1
                return
            again = 0 if seen is None else int(seen[1])
            self._seen[text] = [now, 0]
        if again:
            log.warning("%s: %s (met %d times more since it was last logged)", where, text, again)
        else:
            log.warning("%s: %s", where, text)


# The server's one log of damage: the same damage met by different handlers is one damage.
DAMAGE = DamageLog()
