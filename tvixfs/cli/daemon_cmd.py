"""``tvixfs daemon``: serve a store to other machines over gRPC (tvix and snix names)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tvixfs import defaults
from tvixfs.allocator import tune_malloc
from tvixfs.castore.errors import ValidationError
from tvixfs.cli.app import StoreOptions, app, fail, store_options
from tvixfs.cli.cache_cmds import DiskCacheOpt, DiskCacheSizeOpt, disk_cached
from tvixfs.cli.metrics_opts import MetricsListenOpt, start_metrics
from tvixfs.cli.mount_cmd import parse_size
from tvixfs.server.limits import (
    DEFAULT_READ_AHEAD_STREAMS,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    DEFAULT_STREAM_TIMEOUT,
    LimitsError,
    StreamLimits,
)
from tvixfs.server.listen import DEFAULT_LISTEN, parse_listen
from tvixfs.server.serve import DEFAULT_GRACE, DEFAULT_THREADS, run_daemon
from tvixfs.services.cache.cachemetrics import watch_disk_cache
from tvixfs.services.meteredstore import metered
from tvixfs.services.tls import ServerTLS
from tvixfs.services.trust import load_secret_key, with_trust
from tvixfs.services.url import StoreURL

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
@store_options()
def daemon(
    *,
    where: StoreOptions,
    listen: ListenOpt = None,
    threads: Annotated[
        int, typer.Option(help="Worker threads; each open stream holds one.", min=2)
    ] = DEFAULT_THREADS,
    max_streams: Annotated[
        int | None,
        typer.Option(
            help="Streaming calls open at once, all clients together; must be below --threads, so "
            "unary calls always find a thread. Over it a stream is refused (RESOURCE_EXHAUSTED). "
            "Default: 3/4 of --threads.",
            min=1,
            show_default=False,
        ),
    ] = None,
    max_streams_per_client: Annotated[
        int | None,
        typer.Option(
            help="Streaming calls open at once on one connection. Default: 3/4 of --max-streams.",
            min=1,
            show_default=False,
        ),
    ] = None,
    stream_idle_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client may leave a stream without reading (or sending) before it is cancelled."
        ),
    ] = DEFAULT_STREAM_IDLE_TIMEOUT,
    stream_timeout: Annotated[
        float, typer.Option(help="Seconds a stream may stay open before it is ended.")
    ] = DEFAULT_STREAM_TIMEOUT,
    read_ahead_streams: Annotated[
        int,
        typer.Option(
            help="Read streams (and ReadMany calls) that may read ahead of their client at once "
            "(8 MiB each, 4 blobs for ReadMany); 0 turns read-ahead off."
        ),
    ] = DEFAULT_READ_AHEAD_STREAMS,
    grace: Annotated[
        float, typer.Option(help="Seconds calls in flight may take to finish after SIGTERM.", min=0)
    ] = DEFAULT_GRACE,
    disk_cache: DiskCacheOpt = None,
    disk_cache_size: DiskCacheSizeOpt = defaults.DISK_CACHE_SIZE,
    sign_key: Annotated[
        str | None,
        typer.Option(
            "--sign-key", help="Sign path infos put through the daemon with this Nix secret key file."
        ),
    ] = None,
    tls_cert: Annotated[
        str | None, typer.Option("--tls-cert", help="Serve TCP addresses over TLS with this PEM certificate.")
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option("--tls-key", help="The PEM private key of --tls-cert.")
    ] = None,
    tls_client_ca: Annotated[
        str | None,
        typer.Option(
            "--tls-client-ca", help="Require client certificates signed by this PEM CA (mutual TLS)."
        ),
    ] = None,
    metrics_listen: MetricsListenOpt = None,
) -> None:
    """Serve a store's BlobService, DirectoryService and PathInfoService over gRPC.

    Without --tls-cert, unauthenticated and unencrypted: listen on loopback or a unix socket unless
    the network is trusted; with --tls-client-ca, only clients with a certificate it signed get in.

    Also serves gRPC health and reflection; runs as a systemd Type=notify service.
    """
    try:
        limits = StreamLimits.for_threads(
            threads,
            max_streams,
            max_streams_per_client,
            idle_timeout=stream_idle_timeout,
            stream_timeout=stream_timeout,
            read_ahead_streams=read_ahead_streams,
        )
    except LimitsError as e:
        fail(str(e))
    tune_malloc()
    try:
        disk_bytes = parse_size(disk_cache_size)
    except ValueError as e:
        fail(f"--disk-cache-size: {e}")
    try:
        key = load_secret_key(sign_key) if sign_key is not None else None
    except ValidationError as e:
        fail(str(e))
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        fail("--tls-client-ca needs --tls-cert and --tls-key")
    tls = ServerTLS(tls_cert, tls_key, tls_client_ca or "") if tls_cert and tls_key else None
    addresses = listen or [DEFAULT_LISTEN]
    refuse_serving_itself(where, addresses)
    endpoint = start_metrics(metrics_listen)
    opened = where.open_store(create="in-existing-directory")
    if endpoint is not None:
        opened = metered(opened, endpoint.metrics)
    urls = (where.store, where.blob_service_addr, where.directory_service_addr, where.path_info_service_addr)
    opened, cache = disk_cached(opened, disk_cache, disk_bytes, urls)
    if endpoint is not None and cache is not None:
        watch_disk_cache(endpoint.metrics, cache)
    try:
        run_daemon(with_trust(opened, key), addresses, threads, grace, limits, tls=tls)
    finally:
        opened.close()


_WILDCARDS = {"0.0.0.0", "::"}


def refuse_serving_itself(where: StoreOptions, listen: list[str]) -> None:
    """Refuse a store URL that is one of our own listen addresses.

    Such a daemon would forward every request to itself, recursively, until its threads are
    exhausted and its clients hang. Same unix socket, or same port on the same, a wildcard or
    two loopback hosts.
    """
    urls = [where.store, where.blob_service_addr, where.directory_service_addr, where.path_info_service_addr]
    remote = [u for u in (StoreURL.parse(url) for url in urls if url) if u.scheme.startswith("grpc+")]
    for address in (parse_listen(text) for text in listen):
        for url in remote:
            if url.scheme == "grpc+unix":
                own = address.path
                same = own is not None and os.path.realpath(url.path) == os.path.realpath(own)
            else:
                target = parse_listen(url.host)
                same = (
                    address.path is None
                    and address.port == target.port
                    and (
                        address.host == target.host
                        or address.host in _WILDCARDS
                        or (address.loopback and target.loopback)
                    )
                )
            if same:
                store = f"{url.scheme}://{url.path or url.host}"
                fail(f"the store {store} is this daemon's own --listen {address.text}: it would call itself")
