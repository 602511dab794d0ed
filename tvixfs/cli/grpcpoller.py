"""Which of grpc's two I/O engines the serving commands use, chosen before grpc is imported.

grpcio 1.85 moves socket I/O to the threads of its EventEngine: every call hands its bytes to
one of those threads and waits to be woken with the answer. A program start over gRPC is a
few hundred small Reads one after the other, each a few kB, so these hand-offs (and, on a busy
machine, the wait for a core each time a thread wakes) are much of what a call costs. The older
iomgr engine polls the socket in the thread that waits on the call: on loopback a small Read
costs the client 300 -> 210 us of CPU and the server 370 -> 290 us (bench/ANALYSIS.md, issue 15).

grpc reads ``GRPC_EXPERIMENTS`` once, when it is imported; a value the user set wins. Only the
serving commands (``mount``, ``daemon``, ``nar-bridge``) ask for it: the importers fork worker
processes, and stay on grpc's default engine.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# grpc core experiment names: the client's and the server's sockets back on iomgr.
IOMGR_EXPERIMENTS = "-event_engine_client"


def poll_in_caller(environ: MutableMapping[str, str] = os.environ) -> None:
    """Ask grpc for the engine that polls in the calling thread, unless the user chose."""
    environ.setdefault("GRPC_EXPERIMENTS", IOMGR_EXPERIMENTS)
