"""``--metrics-listen`` of ``mount`` and ``daemon``: the option, and starting what it asks for."""

from __future__ import annotations

from typing import Annotated

import typer

from tvixfs.cli.app import fail
from tvixfs.server.listen import ListenError
from tvixfs.server.metricsendpoint import MetricsEndpoint, serve_metrics
from tvixfs.services.metrics import Metrics

MetricsListenOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics-listen",
        envvar="TVIXFS_METRICS_LISTEN",
        metavar="ADDR",
        help="Serve Prometheus metrics over HTTP on ADDR: PORT (on 127.0.0.1), HOST:PORT or "
        "[IPV6]:PORT. Off by default.",
        show_default=False,
    ),
]


def start_metrics(address: str | None) -> MetricsEndpoint | None:
    """The metrics endpoint ``--metrics-listen`` asks for, serving; fails with one clear line."""
    if address is None:
        return None
    try:
        return serve_metrics(address, Metrics())
    except ListenError as e:
        fail(str(e))
