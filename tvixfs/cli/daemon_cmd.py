"""``tvixfs daemon``: serve a store to other machines over gRPC (tvix and snix names)."""

from __future__ import annotations

from typing import Annotated

import typer

from tvixfs.allocator import tune_malloc
from tvixfs.cli.app import (
    BlobAddrOpt,
    DirAddrOpt,
    PathInfoAddrOpt,
    StoreOpt,
    app,
    fail,
    open_store_or_fail,
)
from tvixfs.cli.cache_cmds import DiskCacheOpt, DiskCacheSizeOpt, disk_cached
from tvixfs.cli.metrics_opts import MetricsListenOpt, start_metrics
from tvixfs.cli.mount_cmd import parse_size
from tvixfs.server.listen import DEFAULT_LISTEN, ListenError
from tvixfs.server.serve import DEFAULT_GRACE, DEFAULT_THREADS, run_daemon
from tvixfs.services.cachemetrics import watch_disk_cache
from tvixfs.services.meteredstore import metered

ListenOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--listen",
        help=f"Address to serve on: HOST:PORT, [IPV6]:PORT or unix:/abs/path.sock (mode 0660). "
        f"Repeat for several. Default: {DEFAULT_LISTEN}.",
        show_default=False,
    ),
]


@app.command()
def daemon(
    *,
    store: StoreOpt = None,
    blob_service_addr: BlobAddrOpt = None,
    directory_service_addr: DirAddrOpt = None,
    path_info_service_addr: PathInfoAddrOpt = None,
    listen: ListenOpt = None,
    threads: Annotated[int, typer.Option(help="Worker threads; each open stream holds one.", min=1)] = (
        DEFAULT_THREADS
    ),
    grace: Annotated[
        float, typer.Option(help="Seconds calls in flight may take to finish after SIGTERM.", min=0)
    ] = DEFAULT_GRACE,
    disk_cache: DiskCacheOpt = None,
    disk_cache_size: DiskCacheSizeOpt = "10G",
    metrics_listen: MetricsListenOpt = None,
) -> None:
    """Serve a store's BlobService, DirectoryService and PathInfoService over gRPC.

    Unauthenticated and unencrypted: listen on loopback or a unix socket unless the network is trusted.

    Also serves gRPC health and reflection; runs as a systemd Type=notify service.
    """
    tune_malloc()
    try:
        disk_bytes = parse_size(disk_cache_size)
    except ValueError as e:
        fail(f"--disk-cache-size: {e}")
    endpoint = start_metrics(metrics_listen)
    opened = open_store_or_fail(store, blob_service_addr, directory_service_addr, path_info_service_addr)
    if endpoint is not None:
        opened = metered(opened, endpoint.metrics)
    urls = (store, blob_service_addr, directory_service_addr, path_info_service_addr)
    opened, cache = disk_cached(opened, disk_cache, disk_bytes, urls)
    if endpoint is not None and cache is not None:
        watch_disk_cache(endpoint.metrics, cache)
    try:
        run_daemon(opened, listen or [DEFAULT_LISTEN], threads, grace)
    except ListenError as e:
        fail(str(e))
    finally:
        opened.close()
