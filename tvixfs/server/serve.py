"""The server's lifecycle: bind every address, READY, wait for a signal, drain, exit.

``start_server`` is also what tests and benchmarks use to serve a store in process.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health

from tvixfs.server.handlers import add_store_services
from tvixfs.server.limits import StreamGate, StreamLimits
from tvixfs.server.listen import bind, parse_listen
from tvixfs.server.reflection import add_health, add_reflection
from tvixfs.server.servicers import READ_AHEAD_THREADS, READ_MESSAGE_SIZE
from tvixfs.services.base import Store
from tvixfs.services.tls import ServerTLS
from tvixfs.services.wire.grpc_methods import PREFIXES
from tvixfs.services.wire.messages import MAX_MESSAGE
from tvixfs.systemd import Notifier, watchdog_interval

log = logging.getLogger(__name__)

# Each open stream holds a worker thread (grpcio's sync server), and a client reading a blob
# keeps several chunk streams open at once.
DEFAULT_THREADS = 64
DEFAULT_GRACE = 10.0

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Tolerate the keepalive pings of clients that keep long streams open.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Find clients that vanished while holding a stream.
    ("grpc.keepalive_time_ms", 120_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


@dataclass
class RunningServer:
    server: grpc.Server
    addresses: list[str]  # as bound: a TCP port 0 replaced by the port chosen
    health: health.HealthServicer
    read_ahead: ThreadPoolExecutor
    gate: StreamGate

    def stop(self, grace: float | None) -> None:
        """Refuse new calls, let calls in flight finish for up to ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.gate.close()
        # Calls are over; a read still running ends on its own (a chunk, shortly).
        self.read_ahead.shutdown(wait=False, cancel_futures=True)


def start_server(
    store: Store,
    listen: Sequence[str],
    threads: int = DEFAULT_THREADS,
    read_message_size: int = READ_MESSAGE_SIZE,
    prefixes: Sequence[str] = PREFIXES,
    *,
    limits: StreamLimits | None = None,
    tls: ServerTLS | None = None,
) -> RunningServer:
    """Serve ``store`` on every address of ``listen``; raises ListenError before serving any.

    ``limits`` bound the streaming calls (default: ``StreamLimits.for_threads(threads)``). With
    ``tls``, TCP addresses speak TLS (mutual TLS if it names a client CA).
    """
    addresses = [parse_listen(text) for text in listen]
    gate = StreamGate(limits or StreamLimits.for_threads(threads))
    credentials = tls.credentials() if tls is not None else None
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tvixfs-grpc"),
        options=SERVER_OPTIONS,
    )
    read_ahead = ThreadPoolExecutor(max_workers=READ_AHEAD_THREADS, thread_name_prefix="tvixfs-read-ahead")
    names = add_store_services(server, store, read_message_size, prefixes, read_ahead, gate=gate)
    servicer = add_health(server, names, gate)
    add_reflection(server, names, gate)
    try:
        bound = [bind(server, address, credentials) for address in addresses]
    except BaseException:
        server.stop(None)
        read_ahead.shutdown()
        gate.close()
        raise
    server.start()
    return RunningServer(server, bound, servicer, read_ahead, gate)


def run_daemon(
    store: Store,
    listen: Sequence[str],
    threads: int = DEFAULT_THREADS,
    grace: float = DEFAULT_GRACE,
    limits: StreamLimits | None = None,
    *,
    tls: ServerTLS | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish calls in flight (at most ``grace`` s)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    # Before serving: a signal that arrives during startup must still end in a clean stop.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    running = start_server(store, listen, threads, limits=limits, tls=tls)
    notifier = Notifier()
    status = "serving on " + " ".join(running.addresses)
    log.info("%s", status)
    log.info("%s", running.gate.limits.describe(threads))
    notifier.ready(status)
    interval = watchdog_interval()
    while not stop.wait(interval):
        notifier.watchdog()
    notifier.stopping()
    log.info("stopping: letting calls in flight finish (at most %.0f s)", grace)
    running.stop(grace)
    log.info("stopped")
