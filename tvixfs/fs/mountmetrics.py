"""What a mount exports besides its requests: gauges and counts read from its own state.

Read when scraped, from the metrics server's thread: only lengths and ints the event loop
keeps anyway, so the mount counts nothing extra for them.
"""

from __future__ import annotations

from tvixfs.fs.ops import TvixOperations
from tvixfs.fs.requestmetrics import instrument
from tvixfs.services.metrics import Metrics


def watch_mount(ops: TvixOperations, metrics: Metrics) -> None:
    """Time ``ops``'s requests and export its inodes, open files and chunk cache."""
    instrument(ops, metrics)
    reader = ops.reader
    stats = reader.stats
    metrics.counter(
        "fuse_served_bytes", "Bytes the mount answered read requests with.", metrics.fuse_served.get
    )
    metrics.gauge("inodes", "Inodes the kernel holds (looked up and not forgotten).", lambda: ops.inode_count)
    metrics.gauge(
        "open_files",
        "Files open on the mount (those the kernel opened by itself: read lately).",
        lambda: ops.open_files,
    )
    metrics.gauge("chunk_cache_bytes", "Bytes in the memory chunk cache.", lambda: reader.cached_bytes)
    metrics.counter(
        "chunk_cache_hits", "Chunks a read found in the memory chunk cache.", lambda: stats.cache_hits
    )
    metrics.counter(
        "chunk_cache_misses",
        "Chunks fetched into the memory chunk cache (for a read or ahead of one).",
        lambda: stats.chunks_fetched,
    )
    metrics.counter("chunk_fetch_failures", "Chunk fetches that failed.", lambda: stats.fetch_failures)
