"""FUSE request accounting for ``--metrics-listen``: every handler of one mount, timed in one place.

pyfuse3 looks each handler up on the operations object for every request, so timing wrappers
set on the instance stand in front of the class's handlers (and their ``_guarded`` error
handling) for that mount only. Without metrics nothing is wrapped and requests pay nothing;
with them, a request pays one more coroutine frame, two clock reads and a bucket increment
(``LatencyRow``). Only the event loop runs these, so the rows need no lock.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3

from tvixfs.fs.ops import TvixOperations
from tvixfs.services.metrics import LatencyRow, Metrics

# Every request a read-only mount answers; those that would write fail at once (EROFS).
TIMED = (
    "lookup",
    "forget",
    "getattr",
    "readlink",
    "access",
    "statfs",
    "opendir",
    "readdir",
    "releasedir",
    "open",
    "read",
    "release",
    "getxattr",
    "listxattr",
)

Handler = Callable[..., Awaitable[Any]]


def instrument(ops: TvixOperations, metrics: Metrics) -> None:
    """Time every request ``ops`` answers into ``metrics.fuse``; count bytes read."""
    for name in TIMED:
        handler: Handler = getattr(ops, name)
        row = metrics.fuse.row(name)
        setattr(ops, name, _timed_read(handler, row, metrics) if name == "read" else _timed(handler, row))


def _timed(handler: Handler, row: LatencyRow) -> Handler:
    clock = time.perf_counter

    async def timed(*args: Any) -> Any:
        started = clock()
        try:
            return await handler(*args)
        except pyfuse3.FUSEError as e:
            if e.errno == errno.EIO:
                row.failures += 1
            raise
        finally:
            row.observe(clock() - started)

    return timed


def _timed_read(handler: Handler, row: LatencyRow, metrics: Metrics) -> Handler:
    clock = time.perf_counter
    served = metrics.fuse_served

    async def timed(*args: Any) -> Any:
        started = clock()
        try:
            data = await handler(*args)
        except pyfuse3.FUSEError as e:
            if e.errno == errno.EIO:
                row.failures += 1
            raise
        finally:
            row.observe(clock() - started)
        served.value += len(data)
        return data

    return timed
