"""One process's Prometheus metrics (``--metrics-listen``), all named ``tvixfs_``.

Built to cost next to nothing where requests are many. Most numbers are not counted for the
metrics at all: they are read, when a scraper asks, from counters the daemon keeps anyway (the
inode table, the chunk cache, the disk cache), through callbacks registered with ``gauge`` and
``counter``. FUSE requests, tens of thousands in a walk, are timed into ``LatencyTable`` rows:
plain lists of ints owned by the event loop, two list operations per request and no lock
(prometheus-client's own Histogram takes a lock per observation); a scrape, from the HTTP
thread, reads them as they are (a request counted a moment late is no error in a metric).
Store calls, each of which costs far more than its accounting, use prometheus-client's
thread-safe metrics directly (services/meteredstore.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

PREFIX = "tvixfs_"
# Upper bounds (seconds) of the latency buckets: a FUSE request answered from memory takes
# tens of microseconds, one that waits for a remote store up to its deadline.
LATENCY_BOUNDS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BUCKET_LABELS = [repr(b) for b in LATENCY_BOUNDS] + ["+Inf"]


class LatencyRow:
    """Counts and total time of one kind of request, for the event loop's use only."""

    __slots__ = ("buckets", "failures", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)  # not cumulative; the last is +Inf
        self.seconds = 0.0
        self.failures = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.seconds += seconds

    @property
    def count(self) -> int:
        return sum(self.buckets)


class LatencyTable:
    """``LatencyRow`` by label value (e.g. FUSE operation), exported as one histogram."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.rows: dict[str, LatencyRow] = {}

    def row(self, value: str) -> LatencyRow:
        """The row for ``value``; callers keep it, so that a request does not look it up."""
        return self.rows.setdefault(value, LatencyRow())

    def collect(self) -> Iterator[Metric]:
        if not self.rows:
            return  # nothing was timed here (the daemon has no FUSE requests)
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        failures = CounterMetricFamily(
            self.name.removesuffix("_seconds") + "_failures",
            f"{self.documentation} Failed with EIO.",
            labels=[self.label],
        )
        for value, row in list(self.rows.items()):
            counts = list(row.buckets)
            cumulative = 0
            buckets = []
            for label, n in zip(_BUCKET_LABELS, counts, strict=True):
                cumulative += n
                buckets.append((label, float(cumulative)))
            histogram.add_metric([value], buckets, row.seconds)
            failures.add_metric([value], row.failures)
        yield histogram
        yield failures


class Metrics:
    """The registry of one process, what it exports, and the values ``status`` shows."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.url: str | None = None  # where they are served, once they are
        self._callbacks = _Callbacks()
        self.registry.register(self._callbacks)
        ProcessCollector(namespace="tvixfs", registry=self.registry)
        self.fuse = LatencyTable(
            PREFIX + "fuse_request_seconds", "FUSE requests by operation, and their latency.", "op"
        )
        self.registry.register(_TableCollector(self.fuse))
        # Bytes a mount answered reads with; exported by the mount (fs/mountmetrics.py).
        self.fuse_served = _Count()
        self.store_seconds = Histogram(
            PREFIX + "store_call_seconds",
            "Calls to the store by service and method, and their latency (streams: until the last piece).",
            ["service", "method"],
            buckets=LATENCY_BOUNDS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            PREFIX + "store_call_errors",
            "Store calls that raised, by service, method and error.",
            ["service", "method", "error"],
            registry=self.registry,
        )
        self.store_fetched = Counter(
            PREFIX + "store_fetched_bytes",
            "Blob bytes the store delivered.",
            registry=self.registry,
        )
        self.store_in_flight = Gauge(
            PREFIX + "store_calls_in_flight",
            "Store calls (and streams) started and not yet finished.",
            registry=self.registry,
        )
        self._reachable: list[Callable[[], bool | None]] = []
        self.gauge(
            "store_reachable",
            "1 if the store answers, 0 if it is unreachable (offline, breaker open, last call UNAVAILABLE).",
            self.store_reachable,
        )

    # -- values read at scrape time ---------------------------------------------------------

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export ``tvixfs_<name>``, the value ``read()`` returns when scraped (from another
        thread: it must only read)."""
        self._callbacks.gauges.append((PREFIX + name, documentation, read))

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export ``tvixfs_<name>_total``, a count kept elsewhere that only grows."""
        self._callbacks.counters.append((PREFIX + name, documentation, read))

    def reachability(self, source: Callable[[], bool | None]) -> None:
        """Add a judge of the store's reachability: True, False, or None (no opinion)."""
        self._reachable.append(source)

    def store_reachable(self) -> float:
        """0 if any source finds the store unreachable, else 1."""
        return 0.0 if any(source() is False for source in self._reachable) else 1.0


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def get(self) -> float:
        return float(self.value)


class _Callbacks(Collector):
    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Callable[[], float]]] = []
        self.counters: list[tuple[str, str, Callable[[], float]]] = []

    def collect(self) -> Iterator[Metric]:
        for name, documentation, read in self.gauges:
            yield GaugeMetricFamily(name, documentation, value=read())
        for name, documentation, read in self.counters:
            yield CounterMetricFamily(name, documentation, value=read())


class _TableCollector(Collector):
    def __init__(self, table: LatencyTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Metric]:
        return self.table.collect()
