"""The HTTP endpoint of ``--metrics-listen``: prometheus-client's server, on one address only.

``ADDR`` is ``HOST:PORT``, ``[IPV6]:PORT``, or a bare ``PORT``, which means 127.0.0.1: off
unless asked for, and on loopback unless a host is named. Naming a host that is not loopback
is allowed (a fleet's Prometheus scrapes from elsewhere) and logged as a warning: the endpoint
has no authentication, and the metrics tell how the mount is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import start_http_server

from tvixfs.server.listen import ListenAddress, ListenError, parse_listen
from tvixfs.services.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


def parse_metrics_address(text: str) -> ListenAddress:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``; ListenError says what is wrong."""
    if text.isdigit():
        text = f"{DEFAULT_HOST}:{text}"
    address = parse_listen(text)
    if address.path is not None:
        raise ListenError(f"--metrics-listen takes HOST:PORT or PORT, not a unix socket: {text!r}")
    return address


@dataclass(frozen=True)
class MetricsEndpoint:
    """Served until the process ends (the server's thread is a daemon thread)."""

    metrics: Metrics
    url: str


def serve_metrics(text: str, metrics: Metrics) -> MetricsEndpoint:
    """Serve ``metrics`` at ``http://ADDR/metrics`` (any path answers) from a thread."""
    address = parse_metrics_address(text)
    try:
        server, _ = start_http_server(address.port, address.host, registry=metrics.registry)
    except OSError as e:
        raise ListenError(f"--metrics-listen: cannot listen on {address.text}: {e.strerror or e}") from None
    host = f"[{address.host}]" if ":" in address.host else address.host
    url = f"http://{host}:{server.server_port}/metrics"
    if not address.loopback:
        log.warning("metrics served on %s, which is not a loopback address, without authentication", url)
    log.info("metrics on %s", url)
    metrics.url = url
    return MetricsEndpoint(metrics, url)
