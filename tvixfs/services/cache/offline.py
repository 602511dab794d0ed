"""Whether the store behind a disk cache answers: online, or offline until the next probe.

Offline is entered when the store raises StoreUnavailableError (UNAVAILABLE or a deadline) and
left when a call to it succeeds. While offline, only one call per ``RETRY_INTERVAL`` goes to
the store (the probe); the others are refused at once, so that a lookup of something the cache
does not hold fails fast instead of waiting out a deadline. Each change is logged once and
reported to ``on_change`` (the mount puts it into systemd's STATUS=).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

RETRY_INTERVAL = 2.0  # seconds between probes of an unreachable store


class OnlineState:
    def __init__(self, retry_interval: float = RETRY_INTERVAL) -> None:
        self.retry_interval = retry_interval
        self.on_change: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._offline_since: float | None = None
        self._next_probe = 0.0

    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    def may_ask(self) -> bool:
        """True if a call may go to the store now: online, or this caller is the probe."""
        with self._lock:
            if self._offline_since is None:
                return True
            now = time.monotonic()
            if now < self._next_probe:
                return False
            self._next_probe = now + self.retry_interval
            return True

    def failed(self, reason: BaseException) -> None:
        """The store did not answer."""
        with self._lock:
            self._next_probe = time.monotonic() + self.retry_interval
            if self._offline_since is not None:
                return
            self._offline_since = time.time()
        log.warning("store unreachable (%s): offline, serving what the disk cache holds", reason)
        self._changed()

    def answered(self) -> None:
        """The store answered (any answer but unavailability)."""
        if self._offline_since is None:
            return
        with self._lock:
            since, self._offline_since = self._offline_since, None
        if since is not None:
            log.info("store reachable again after %.0f s: back online", time.time() - since)
            self._changed()

    def describe(self) -> str:
        since = self._offline_since
        if since is None:
            return "store online"
        return (
            "store OFFLINE since "
            + time.strftime("%H:%M:%S", time.localtime(since))
            + ", serving the disk cache"
        )

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.describe())
