"""Bounds on streaming calls that no client, broken or hostile, can push the daemon past.

grpcio's sync server runs each call on a worker thread, and a streaming call keeps its thread
for as long as it is open: a Read whose client reads nothing waits, in grpcio, for HTTP/2 flow
control that never opens. Left alone, enough such streams take every thread, and every other
client's calls queue behind them for as long as the streams stay open (forever without a client
deadline). So:

- streaming calls are admitted against two budgets, in total and per connection (``peer``),
  and the total is kept below the worker threads, so unary calls always find a thread; a
  stream over either budget is refused at once with RESOURCE_EXHAUSTED, which a client retries;
- a stream whose client takes nothing (or, for a Put, sends nothing) for ``idle_timeout``, or
  that has been open for ``stream_timeout``, is cancelled by a watchdog thread: the worker
  blocked in grpcio wakes and the stream's generator is closed, which frees what it holds;
- Read streams that read chunks ahead of the client are counted too (``ReadAheadSlots``), so
  the memory of streams nobody reads stays bounded whatever their number.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from tvixfs.server.guard import CancelledStreamError, GrpcHandler
from tvixfs.services.wire.grpc_errors import STREAM_LIMIT

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_STREAM_IDLE_TIMEOUT = 60.0
DEFAULT_STREAM_TIMEOUT = 900.0  # beyond the 600 s the tvixfs client gives a stream itself
# Read-ahead costs its window (servicers.READ_AHEAD, 8 MiB) for each stream that holds a slot.
# bench/daemon_limits_bench.py, default daemon, store on disk, four runs each: a cold read of a
# 256 MiB blob has a median of 125-230 MB/s chunk after chunk, 300-350 MB/s read ahead; 70 unread
# Read streams of a 32 MiB blob (48 admitted) take the daemon from 64 to 210 MB without slots,
# from 76 to 276 MB with 8.
DEFAULT_READ_AHEAD_STREAMS = 8

# The watchdog looks this often (at most once a second, at least 20 times a second).
_TICK_FRACTION = 0.25
_TICK_MIN, _TICK_MAX = 0.05, 1.0


class LimitsError(ValueError):
    """Limits that cannot work together; the message says which option to change."""


def three_quarters(n: int) -> int:
    """The default share: of the threads for streams (the rest stay free for unary calls), and
    of those streams for one connection (the rest stay free for other clients)."""
    return max(1, n - max(1, n // 4))


@dataclass(frozen=True)
class StreamLimits:
    max_streams: int  # streaming calls open at once, all clients together
    max_streams_per_client: int  # ... on one connection
    idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT  # seconds a client may take nothing
    stream_timeout: float = DEFAULT_STREAM_TIMEOUT  # seconds a stream may stay open
    read_ahead_streams: int = DEFAULT_READ_AHEAD_STREAMS  # Read streams reading ahead at once

    @classmethod
    def for_threads(
        cls,
        threads: int,
        max_streams: int | None = None,
        max_streams_per_client: int | None = None,
        *,
        idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
        read_ahead_streams: int = DEFAULT_READ_AHEAD_STREAMS,
    ) -> StreamLimits:
        """Limits for a server of ``threads`` workers; None picks the default, checked against it."""
        total = three_quarters(threads) if max_streams is None else max_streams
        if total >= threads:
            raise LimitsError(
                f"--max-streams {total} must be below --threads {threads}: "
                "streams would take the threads unary calls need"
            )
        per_client = three_quarters(total) if max_streams_per_client is None else max_streams_per_client
        if min(total, per_client) < 1 or min(idle_timeout, stream_timeout) <= 0:
            raise LimitsError("stream limits and timeouts must be positive")
        if read_ahead_streams < 0:
            raise LimitsError("--read-ahead-streams must be 0 (no read-ahead) or more")
        return cls(total, min(per_client, total), idle_timeout, stream_timeout, read_ahead_streams)

    def describe(self, threads: int) -> str:
        return (
            f"limits: {threads} threads, at most {self.max_streams} streams "
            f"({self.max_streams_per_client} per connection), cancelled after {self.idle_timeout:g} s "
            f"without progress or {self.stream_timeout:g} s open, "
            f"{self.read_ahead_streams} reading ahead"
        )


class _Stream:
    """One admitted streaming call, as the watchdog sees it."""

    __slots__ = ("cancelled", "context", "path", "peer", "started", "waiting_since")

    def __init__(self, path: str, peer: str, context: grpc.ServicerContext) -> None:
        self.path = path
        self.peer = peer
        self.context = context
        self.started = time.monotonic()
        # Since when the call waits for its client (to take a message, or to send one); None
        # while the server itself is working.
        self.waiting_since: float | None = None
        self.cancelled = False


class StreamGate:
    """Admits streaming calls within ``limits`` and cancels those that outstay them."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        # Calls of one request whose request has not come yet (``first_request``): they hold a
        # thread as a stream does, so they count in their connection's budget and are watched.
        self._awaiting: set[_Stream] = set()
        self._per_peer: Counter[str] = Counter()
        self._stop = threading.Event()
        tick = min(limits.idle_timeout, limits.stream_timeout) * _TICK_FRACTION
        self._tick = min(max(tick, _TICK_MIN), _TICK_MAX)
        self._watchdog = threading.Thread(target=self._watch, name="tvixfs-stream-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        self._stop.set()
        self._watchdog.join()

    def wrap(
        self, path: str, behaviour: GrpcHandler, client_streaming: bool, server_streaming: bool = True
    ) -> GrpcHandler:
        """``behaviour``, a streaming call (from the client, to it, or both ways), admitted and
        watched."""
        if not server_streaming:

            def receiving(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                stream = self._admit(path, context)
                try:
                    return behaviour(self._received(stream, requests), context)
                except CancelledStreamError as e:  # a handler not under guard() let it through
                    context.abort(grpc.StatusCode.CANCELLED, str(e))
                finally:
                    self._release(stream)

            return receiving

        def sending(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            stream = self._admit(path, context)
            try:
                if client_streaming:
                    request = self._received(stream, request)
                for message in behaviour(request, context):
                    stream.waiting_since = time.monotonic()
                    yield message  # grpcio takes the next one once the client has taken this
                    stream.waiting_since = None
                    self._check_age(stream)
            except CancelledStreamError as e:  # a handler not under guard() let it through
                context.abort(grpc.StatusCode.CANCELLED, str(e))
            finally:
                self._release(stream)

        return sending

    def one_request(self, path: str, behaviour: GrpcHandler) -> GrpcHandler:
        """``behaviour`` of a unary-request method, to be served as a request stream: its one
        request is read by ``first_request``."""

        def one(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behaviour(self.first_request(path, requests, context), context)

        return one

    def first_request(self, path: str, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The one request of a unary-request call, read under watch.

        grpcio reads a unary call's request on a worker thread before any handler runs: a
        client that opens calls and never sends their requests would hold those threads for
        good. So such methods are served as request streams and their request is read here:
        counted in the connection's budget (not in the total: a unary call must always find a
        thread) and cancelled after ``idle_timeout``, as a Put that sends nothing is.
        """
        call = self._admit(path, context, waiting=True)
        call.waiting_since = time.monotonic()
        try:
            return next(requests)
        except (StopIteration, grpc.RpcError):
            if call.cancelled or not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "cancelled before its request came")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request")
            raise AssertionError("unreachable: abort raises") from None
        finally:
            self._release(call)

    def _admit(self, path: str, context: grpc.ServicerContext, waiting: bool = False) -> _Stream:
        peer = context.peer()
        with self._lock:
            total, mine = len(self._streams), self._per_peer[peer]
            if (waiting or total < self.limits.max_streams) and mine < self.limits.max_streams_per_client:
                stream = _Stream(path, peer, context)
                (self._awaiting if waiting else self._streams).add(stream)
                self._per_peer[peer] += 1
                return stream
        if not waiting and total >= self.limits.max_streams:
            why = f"the server has {total} streams open, its limit (--max-streams)"
        else:
            why = f"this connection has {mine} calls open, its limit (--max-streams-per-client)"
        log.info("%s from %s refused: %s", path, peer, why)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{STREAM_LIMIT}: {why}; retry later")
        raise AssertionError("unreachable: abort raises")  # for mypy: abort's stub returns

    def _release(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.discard(stream)
            self._awaiting.discard(stream)
            self._per_peer[stream.peer] -= 1
            if not self._per_peer[stream.peer]:
                del self._per_peer[stream.peer]

    def _received(self, stream: _Stream, requests: Iterator[Any]) -> Iterator[Any]:
        while True:
            stream.waiting_since = time.monotonic()
            try:
                message = next(requests)
            except StopIteration:
                if stream.cancelled:  # the watchdog's cancel, seen as the stream's end
                    raise CancelledStreamError("cancelled by the server before the stream ended") from None
                return
            finally:
                stream.waiting_since = None
            yield message

    def _check_age(self, stream: _Stream) -> None:
        """End a stream past its age limit with a status its client can read."""
        if time.monotonic() - stream.started > self.limits.stream_timeout:
            log.info(
                "%s from %s: open longer than %.0f s, ended",
                stream.path,
                stream.peer,
                self.limits.stream_timeout,
            )
            stream.context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"stream open longer than the server allows "
                f"({self.limits.stream_timeout:g} s, --stream-timeout)",
            )

    def _watch(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                streams = [*self._streams, *self._awaiting]
            for stream in streams:
                why = self._overdue(stream, now)
                if why is not None and not stream.cancelled:
                    stream.cancelled = True
                    log.info("%s from %s cancelled: %s", stream.path, stream.peer, why)
                    stream.context.cancel()  # type: ignore[no-untyped-call]  # unannotated in grpc-stubs

    def _overdue(self, stream: _Stream, now: float) -> str | None:
        waiting = stream.waiting_since
        if waiting is not None and now - waiting > self.limits.idle_timeout:
            return f"its client took nothing for {self.limits.idle_timeout:g} s (--stream-idle-timeout)"
        # Past its age a stream ends itself with DEADLINE_EXCEEDED, a status its client can
        # read, once its current message is taken (or made): it gets a tick for that, or while
        # it waits for a client that is still taking, up to the idle timeout. Cancelled, the
        # client would only see CANCELLED.
        grace = self._tick if waiting is None else self.limits.idle_timeout
        if now - stream.started > self.limits.stream_timeout + grace:
            return f"open longer than {self.limits.stream_timeout:g} s (--stream-timeout)"
        return None


class ReadAheadSlots:
    """How many Read streams (and ReadMany calls) may read ahead of their client at once.

    Each such stream holds up to its read-ahead window in memory while its client is slow or
    gone; the others read one chunk at a time, holding one chunk.
    """

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(slots)

    def pieces(self, ahead: Callable[[], Iterator[T]], plain: Callable[[], Iterator[T]]) -> Iterator[T]:
        """``ahead()`` if a slot is free (held until the stream ends), else ``plain()``."""
        if not self._slots.acquire(blocking=False):
            yield from plain()
            return
        try:
            yield from ahead()
        finally:
            self._slots.release()


class HeldBytes:
    """Memory that calls of one kind hold at once, all together (directory Put streams, held
    whole until they end): ``take`` says whether there is room, ``give`` returns it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self._held + n > self.limit:
                return False
            self._held += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self._held -= n
