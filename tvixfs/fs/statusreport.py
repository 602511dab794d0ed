"""The text of the mount root's ``user.tvixfs.status``: a mount's key numbers, for a person.

``tvixfs status MOUNTPOINT`` prints it (as ``getfattr -n user.tvixfs.status`` would), like
CernVM-FS's root attributes: no socket, and whoever can see the mount can ask it. What the
mount keeps anyway is always there; request and store call counts only with
``--metrics-listen`` (the mount counts them only then). The text is remade at most once per
``FRESH`` seconds: ``getfattr`` asks for the size, then for the value, and both must agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tvixfs.fs.dircache import KERNEL_CACHES_READDIR
from tvixfs.fs.ops import TvixOperations
from tvixfs.services.breaker import CircuitBreaker
from tvixfs.services.metrics import PREFIX, Metrics

FRESH = 1.0
_LISTINGS = "cached by the kernel" if KERNEL_CACHES_READDIR else "not cached by the kernel (stock pyfuse3)"


class StatusReport:
    def __init__(
        self,
        ops: TvixOperations,
        description: str,
        mountpoint: Path,
        *,
        note: Callable[[], str] | None = None,
        metrics: Metrics | None = None,
        breakers: Sequence[CircuitBreaker] = (),
    ) -> None:
        self._ops = ops
        self._description = description
        self._mountpoint = mountpoint
        self._note = note
        self._metrics = metrics
        self._breakers = breakers
        self._started = time.monotonic()
        self._made = -math.inf
        self._text = b""

    def __call__(self) -> bytes:
        now = time.monotonic()
        if now - self._made >= FRESH:
            self._text = self.render(now).encode()
            self._made = now
        return self._text

    def render(self, now: float) -> str:
        ops = self._ops
        reader = ops.reader
        stats = reader.stats
        lines = [
            f"mount: {self._description} on {self._mountpoint}, up {_duration(now - self._started)}",
        ]
        if self._note is not None:
            lines.append(f"store: {self._note()}")
        for breaker in self._breakers:
            state = "answers" if breaker.reachable else "UNREACHABLE, failing fast"
            lines.append(f"store {breaker.target}: {state}")
        lines += [
            f"inodes: {ops.inode_count}",
            f"open files: {ops.open_files}",
            f"chunk cache: {_mib(reader.cached_bytes)}, {stats.cache_hits} hits, "
            f"{stats.chunks_fetched} chunks fetched ({_mib(stats.bytes_fetched)}), "
            f"{stats.fetch_failures} failed fetches",
            f"failed requests (EIO): {ops.failures}",
            f"directory listings: {_LISTINGS}",
        ]
        metrics = self._metrics
        if metrics is None:
            lines.append("request and store call counts: mount with --metrics-listen")
        else:
            lines += _from_metrics(metrics)
        return "\n".join(lines) + "\n"


def _from_metrics(metrics: Metrics) -> list[str]:
    rows = sorted(metrics.fuse.rows.items(), key=lambda item: -item[1].count)
    requests = ", ".join(
        f"{op} {row.count} (avg {_seconds(row.seconds / row.count)})" for op, row in rows if row.count
    )
    lines = [
        f"metrics: {metrics.url}",
        f"requests: {requests or 'none'}",
        f"bytes served: {_mib(metrics.fuse_served.value)}",
        "store: " + ("reachable" if metrics.store_reachable() else "UNREACHABLE"),
    ]
    calls: dict[str, list[float]] = {}
    values: dict[str, float] = {}
    errors = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if family.name == PREFIX + "store_call_seconds" and sample.name.endswith(("_count", "_sum")):
                key = f"{sample.labels['service']}.{sample.labels['method']}"
                calls.setdefault(key, [0.0, 0.0])[sample.name.endswith("_sum")] = sample.value
            elif family.name == PREFIX + "store_call_errors" and sample.name.endswith("_total"):
                errors += sample.value
            elif not sample.labels:
                values[sample.name] = sample.value
    done = ", ".join(
        f"{key} {count:.0f} (avg {_seconds(total / count)})"
        for key, (count, total) in sorted(calls.items(), key=lambda item: -item[1][0])
        if count
    )
    lines.append(f"store calls: {done or 'none'}; {errors:.0f} errors")
    lines.append(f"store fetched: {_mib(values.get(PREFIX + 'store_fetched_bytes_total', 0))}")
    hits = values.get(PREFIX + "disk_cache_hits_total")
    if hits is not None:
        misses = values.get(PREFIX + "disk_cache_misses_total", 0)
        lines.append(f"disk cache: {hits:.0f} hits, {misses:.0f} misses")
    return lines


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _duration(s: float) -> str:
    s = int(s)
    hours, rest = divmod(s, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"
