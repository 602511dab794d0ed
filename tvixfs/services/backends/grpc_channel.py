"""One gRPC channel to a store: deadlines, retries, error mapping and the tvix/snix names.

Every call of the gRPC client goes through ``Connection.call``, so that no call lacks a deadline,
every idempotent call survives a restarting server, a store that stopped answering fails
further calls at once (``breaker.py``), and every failure surfaces as a service error rather
than a ``grpc.RpcError``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.experimental
from google.protobuf.message import Message

from tvixfs.protos import rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2
from tvixfs.services.breaker import CircuitBreaker
from tvixfs.services.clientconfig import ClientConfig
from tvixfs.services.errors import StoreError, StoreUnavailableError
from tvixfs.services.wire.grpc_errors import retryable, rpc_error
from tvixfs.services.wire.grpc_methods import (
    BLOB_SERVICE,
    BLOB_STAT,
    DIRECTORY_GET,
    DIRECTORY_SERVICE,
    PATHINFO_GET,
    PATHINFO_SERVICE,
    PREFIXES,
    Method,
)
from tvixfs.services.wire.messages import MAX_MESSAGE

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bytes a server may send on one stream before the client has taken them: covers 20 ms at
# 6 Gbit/s. What the client holds unread is bounded by it, per stream in flight.
STREAM_WINDOW = 16 << 20

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Detect a dead peer during long streams; no pings while idle, which servers punish.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # grpc's default reconnect backoff starts at 1 s and grows to 120 s; calls fail fast while
    # it runs. Capped at 1 s, below the ~1.5 s that ClientConfig's retries wait in all, a
    # restarted daemon is found again by the retries of the first call after it is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Server streams are received by the thread that iterates them, not handed over message
    # by message from grpc's channel spin thread.
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    # Flow control: each stream may have this much in flight from the start, instead of windows
    # that grpc's bandwidth probe grows from 64 KiB over the first round trips of a connection.
    # A mount's first seconds are what its programs wait for: 18 MiB in 6 ReadMany calls over a
    # fresh 20 ms link took 70-145 ms with the probe, 74-91 ms with these (bench/ANALYSIS.md).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
]

# The cheapest call of each service that changes nothing: it decides which names the server
# speaks before a Put, whose one-shot request stream cannot be sent twice.
_PROBES: dict[str, tuple[Method, Message]] = {
    BLOB_SERVICE: (BLOB_STAT, rpc_blobstore_pb2.StatBlobRequest(digest=bytes(32))),
    DIRECTORY_SERVICE: (DIRECTORY_GET, rpc_directory_pb2.GetDirectoryRequest(digest=bytes(32))),
    PATHINFO_SERVICE: (PATHINFO_GET, rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=bytes(20))),
}


# Outcomes that say nothing about which names the server speaks.
_UNSETTLED = (
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    None,
)
# Outcomes that mean the store did not answer at all: what opens the circuit breaker.
_SILENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Connection:
    """A channel shared by the three services of one address. Thread-safe."""

    def __init__(
        self, target: str, config: ClientConfig, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        """``credentials``: TLS (grpc+https); None for a plaintext channel."""
        self.target = target
        self.config = config
        self._channel = (
            grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        )
        self._callables: dict[tuple[Method, str], Any] = {}
        # Which prefix each service answered to; absent until a call settles it.
        self._prefix: dict[str, str] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.breaker = CircuitBreaker(target, self._answers)

    def _callable(self, method: Method, prefix: str) -> Any:
        key = (method, prefix)
        found = self._callables.get(key)
        if found is None:
            if method.client_streaming:
                make = self._channel.stream_unary
            elif method.server_streaming:
                make = self._channel.unary_stream  # type: ignore[assignment]
            else:
                make = self._channel.unary_unary  # type: ignore[assignment]
            found = make(
                method.path(prefix),
                request_serializer=method.encode_request or method.request.SerializeToString,
                response_deserializer=method.decode_response or method.response.FromString,
            )
            with self._lock:
                self._callables[key] = found
        return found

    def call(
        self,
        method: Method,
        invoke: Callable[[Any], T],
        what: str,
        idempotent: bool = True,
    ) -> T:
        """``invoke`` the method's multicallable; retry UNAVAILABLE (or a stream the server
        refused for its limits) if ``idempotent``.

        ``invoke`` must include everything that may be repeated: for a server stream that is
        receiving its first message, so a stream that fails before any data is retried.
        """
        if self._closed:
            raise StoreUnavailableError(f"{what}: the connection to {self.target} is closed")
        if not idempotent:
            self._settle_prefix(method.service)
        decided = self._prefix.get(method.service)
        prefix = decided or method.prefixes[0]
        delay = self.config.backoff
        attempt = 1
        while True:
            self.breaker.check(what)
            try:
                result = invoke(self._callable(method, prefix))
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if code not in _SILENT:
                    self.breaker.succeeded()
                if (
                    code is grpc.StatusCode.UNIMPLEMENTED
                    and decided is None
                    and prefix != method.prefixes[-1]
                ):
                    log.debug(
                        "%s: %s is not served, trying the next prefix", self.target, method.path(prefix)
                    )
                    prefix = method.prefixes[method.prefixes.index(prefix) + 1]
                    continue
                if code not in _UNSETTLED:
                    self._prefix.setdefault(method.service, prefix)
                details = e.details() if isinstance(e, grpc.Call) else None
                if retryable(code, details) and idempotent and attempt < self.config.attempts:
                    log.debug("%s: %s unavailable, retry %d in %.2fs", self.target, what, attempt, delay)
                    time.sleep(delay * random.uniform(0.8, 1.2))
                    delay *= 2
                    attempt += 1
                    continue
                if code in _SILENT:
                    self.breaker.failed()
                raise rpc_error(e, what) from None
            self.breaker.succeeded()
            self._prefix.setdefault(method.service, prefix)
            return result

    def _answers(self) -> bool:
        """The circuit breaker's probe: does the store answer a cheap call at all?"""
        method, request = _PROBES[BLOB_SERVICE]
        prefix = self._prefix.get(method.service, PREFIXES[0])
        try:
            _drain(self._callable(method, prefix)(request, timeout=self.config.timeout))
        except grpc.RpcError as e:
            return isinstance(e, grpc.Call) and e.code() not in _SILENT
        except ValueError:  # the channel was closed meanwhile
            return False
        return True

    def _settle_prefix(self, service: str) -> None:
        if service in self._prefix:
            return
        method, request = _PROBES[service]
        # NOT_FOUND is the expected answer; what matters is which names answered.
        with contextlib.suppress(StoreError):
            self.call(method, lambda f: _drain(f(request, timeout=self.config.timeout)), "probe")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.breaker.close()
        self._channel.close()


def _drain(result: Any) -> None:
    """Wait for a unary response or a whole stream (the probes only need the status)."""
    if isinstance(result, Iterator):
        for _ in result:
            pass


def first_message(call: Any) -> tuple[Any, Any]:
    """Receive the first message of a server stream (None if it ended at once)."""
    return next(call, None), call


def receive(call: Any, what: str) -> Iterator[Any]:
    """The remaining messages of a server stream, failures as service errors.

    Cancels the call when the consumer stops early, so the server stops sending.
    """
    try:
        yield from call
    except grpc.RpcError as e:
        raise rpc_error(e, what) from None
    finally:
        call.cancel()
