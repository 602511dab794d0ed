"""Fail fast while a remote store is down: a circuit breaker for the gRPC client.

Without it every request to a dead daemon pays the client's retries (~1.5 s) before it fails, so
``find -exec cat`` over thousands of uncached files takes hours to report EIO. After
``threshold`` calls in a row failed for unavailability, the breaker opens: calls fail at once
with StoreUnavailableError. A background thread probes the store after a short wait that
doubles on each failed probe (``first_wait`` up to ``max_wait``); the first probe that gets any
answer closes the breaker again, so a restarted store is used again without any request having
to be sacrificed. Each change of state is logged once and reported to the watchers, which is
what a mount shows in systemd's STATUS= (and what an offline mode can build on).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tvixfs.services.errors import StoreUnavailableError

log = logging.getLogger(__name__)

THRESHOLD = 3
FIRST_WAIT = 1.0
MAX_WAIT = 30.0

Watcher = Callable[[bool], None]


class CircuitBreaker:
    """Reachability of one store address, as its calls and probes find it. Thread-safe.

    ``probe`` is a cheap call that must bypass the breaker; it returns whether the store answered
    (any answer counts, even an error status: only silence means the store is down).
    """

    def __init__(
        self,
        target: str,
        probe: Callable[[], bool],
        *,
        threshold: int = THRESHOLD,
        first_wait: float = FIRST_WAIT,
        max_wait: float = MAX_WAIT,
    ) -> None:
        self.target = target
        self._probe = probe
        self._threshold = threshold
        self._first_wait = first_wait
        self._max_wait = max_wait
        self._lock = threading.Lock()
        self._failures = 0  # calls in a row that found the store unavailable
        self._reachable = True
        self._watchers: list[Watcher] = []
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    @property
    def reachable(self) -> bool:
        """False while calls fail fast."""
        return self._reachable

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher(reachable)`` on each change of state, from whichever thread made it."""
        with self._lock:
            self._watchers.append(watcher)

    def check(self, what: str) -> None:
        """Raise at once if the store is known to be down."""
        if not self._reachable:
            raise StoreUnavailableError(f"{what}: store {self.target} is unreachable (failing fast)")

    def succeeded(self) -> None:
        """The store answered a call (with data or with an error status)."""
        self._failures = 0

    def failed(self) -> None:
        """A call found the store unavailable (after its retries)."""
        with self._lock:
            self._failures += 1
            if not self._reachable or self._failures < self._threshold or self._stop.is_set():
                return
            self._reachable = False
            self._prober = threading.Thread(target=self._probe_until_back, name="store-probe", daemon=True)
            self._prober.start()
        log.warning("store %s unreachable: failing fast", self.target)
        self._tell(False)

    def _probe_until_back(self) -> None:
        wait = self._first_wait
        while not self._stop.wait(wait):
            if self._probe():
                with self._lock:
                    self._failures = 0
                    self._reachable = True
                    self._prober = None
                log.info("store %s reachable again", self.target)
                self._tell(True)
                return
            wait = min(wait * 2, self._max_wait)

    def _tell(self, reachable: bool) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(reachable)
            except Exception:  # a watcher's bug must not break the client
                log.exception("store state watcher failed")

    def close(self) -> None:
        """Stop probing (the connection is closing); a probe under way ends with its deadline."""
        self._stop.set()
