"""What a disk cache exports to ``--metrics-listen``: its hits, misses, size and online state."""

from __future__ import annotations

from tvixfs.services.cache.diskcache import DiskCache
from tvixfs.services.metrics import Metrics


def watch_disk_cache(metrics: Metrics, cache: DiskCache) -> None:
    index = cache.index
    metrics.counter("disk_cache_hits", "Lookups the disk cache answered.", lambda: index.hits)
    metrics.counter(
        "disk_cache_misses", "Lookups the disk cache passed on to the store.", lambda: index.misses
    )
    metrics.gauge("disk_cache_bytes", "Bytes the disk cache holds (all processes sharing it).", index.usage)
    metrics.reachability(lambda: not cache.state.offline)
