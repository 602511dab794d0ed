"""``tvixfs daemon``: serve a store to other machines over gRPC (tvix and snix names)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tvixfs.allocator import tune_malloc
from tvixfs.cli.app import StoreOptions, app, fail, store_options
from tvixfs.server.listen import DEFAULT_LISTEN, parse_listen
from tvixfs.server.serve import DEFAULT_GRACE, DEFAULT_THREADS, run_daemon
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
    threads: Annotated[int, typer.Option(help="Worker threads; each open stream holds one.", min=1)] = (
        DEFAULT_THREADS
    ),
    grace: Annotated[
        float, typer.Option(help="Seconds calls in flight may take to finish after SIGTERM.", min=0)
    ] = DEFAULT_GRACE,
) -> None:
    """Serve a store's BlobService, DirectoryService and PathInfoService over gRPC.

    Unauthenticated and unencrypted: listen on loopback or a unix socket unless the network is trusted.

    Also serves gRPC health and reflection; runs as a systemd Type=notify service.
    """
    tune_malloc()
    addresses = listen or [DEFAULT_LISTEN]
    refuse_serving_itself(where, addresses)
    opened = where.open_store(create="in-existing-directory")
    try:
        run_daemon(opened, addresses, threads, grace)
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
