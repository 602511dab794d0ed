"""Log lines that a client or a program can cause over and over: each told once a while.

A mount's failed read, a daemon's damaged blob: the operator needs each one, once. But a
program retrying a read that fails, or a client asking for a damaged blob in a loop, would
otherwise write the log at its own request rate (and journald would drop the rest of the
service's lines with them). So each distinct line is logged at most once per ``REPEAT_AFTER``
seconds, then with the count of the times it came up meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cachetools import LRUCache

REPEAT_AFTER = 60.0
# Distinct lines remembered; beyond that the least recent may be logged again early.
REMEMBERED = 1024


class RepeatedLog:
    """``emit`` logs each distinct text at most once per ``repeat_after`` seconds.

    Safe to call from several threads at once (grpcio's handler threads).
    """

    def __init__(
        self,
        log: logging.Logger,
        level: int,
        repeat_after: float = REPEAT_AFTER,
        remembered: int = REMEMBERED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._level = level
        self._repeat_after = repeat_after
        self._clock = clock
        self._lock = threading.Lock()
        # Text -> [when it was last logged, times it came up since].
        self._seen: LRUCache[str, list[float]] = LRUCache(maxsize=remembered)

    def emit(self, text: str) -> None:
        now = self._clock()
        with self._lock:
            seen = self._seen.get(text)
            if seen is not None and now - seen[0] < self._repeat_after:
                seen[1] += 1
                return
            again = 0 if seen is None else int(seen[1])
            self._seen[text] = [now, 0]
        if again:
            self._log.log(self._level, "%s (%d times more since it was last logged)", text, again)
        else:
            self._log.log(self._level, "%s", text)
