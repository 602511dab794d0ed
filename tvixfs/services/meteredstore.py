"""A store wrapper that times every call into ``Metrics``: the one place store calls are counted.

Wrapped around the store as opened (inside the disk cache), so the figures are those of the
store itself: for a remote store, its round trips. A call that returns an iterator is timed
until the iterator ends (its last piece, its error, or its abandonment). Each outcome also
says whether the store is reachable: UNAVAILABLE (or a deadline) means no, any other answer,
errors included, means yes; the ``store_reachable`` gauge reads that, and the state of the
store's circuit breakers (services/breaker.py), which fail calls fast while it is down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import ParamSpec, TypeVar

from prometheus_client import Histogram

from tvixfs.castore.directory import Directory
from tvixfs.castore.nodes import Node
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.base import (
    BlobService,
    ChunkMeta,
    DirectoryService,
    ForkedWriter,
    PathInfoService,
    Store,
)
from tvixfs.services.breaker import CircuitBreaker
from tvixfs.services.encodedclosure import EncodedClosures
from tvixfs.services.errors import StoreUnavailableError
from tvixfs.services.metrics import Metrics

P = ParamSpec("P")
T = TypeVar("T")


class _Meter:
    """The metrics of one service; ``reachable`` is what its last outcome said."""

    def __init__(self, metrics: Metrics, service: str) -> None:
        self._metrics = metrics
        self._service = service
        self._seconds: dict[str, Histogram] = {}
        self.reachable: bool | None = None
        metrics.reachability(lambda: self.reachable)

    def _histogram(self, method: str) -> Histogram:
        found = self._seconds.get(method)
        if found is None:
            found = self._seconds[method] = self._metrics.store_seconds.labels(self._service, method)
        return found

    def _ended(self, method: str, started: float, error: Exception | None) -> None:
        self._metrics.store_in_flight.dec()
        self._histogram(method).observe(time.perf_counter() - started)
        if error is None:
            self.reachable = True
            return
        self.reachable = not isinstance(error, StoreUnavailableError)
        self._metrics.store_errors.labels(self._service, method, type(error).__name__).inc()

    def call(self, method: str, function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        self._metrics.store_in_flight.inc()
        started = time.perf_counter()
        try:
            result = function(*args, **kwargs)
        except Exception as e:
            self._ended(method, started, e)
            raise
        self._ended(method, started, None)
        return result

    def stream(
        self, method: str, pieces: Callable[[], Iterator[T]], size: Callable[[T], int] | None
    ) -> Iterator[T]:
        """``pieces()``'s items, timed from the first ``next`` to the end; with ``size``, the
        sizes of the pieces count as fetched bytes."""
        self._metrics.store_in_flight.inc()
        started = time.perf_counter()
        error: Exception | None = None
        fetched = 0
        try:
            for piece in pieces():
                if size is not None:
                    fetched += size(piece)
                yield piece
        except Exception as e:
            error = e
            raise
        finally:
            if fetched:
                self._metrics.store_fetched.inc(fetched)
            self._ended(method, started, error)


class MeteredBlobService(BlobService):
    def __init__(self, inner: BlobService, metrics: Metrics) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self._meter = _Meter(metrics, "blob")
        self._fetched = metrics.store_fetched

    def stat(self, digest: bytes, send_chunks: bool = False) -> list[ChunkMeta] | None:
        return self._meter.call("stat", self.inner.stat, digest, send_chunks)

    def read(self, digest: bytes) -> Iterator[bytes]:
        return self._meter.stream("read", lambda: self.inner.read(digest), len)

    def read_chunks(self, digest: bytes, chunks: Sequence[ChunkMeta]) -> Iterator[bytes]:
        return self._meter.stream("read_chunks", lambda: self.inner.read_chunks(digest, chunks), len)

    def read_many(self, chunks: Sequence[ChunkMeta]) -> Iterator[tuple[int, bytes | Exception]]:
        return self._meter.stream("read_many", lambda: self.inner.read_many(chunks), _answered_bytes)

    def read_into(self, digest: bytes, views: Sequence[memoryview]) -> None:
        self._meter.call("read_into", self.inner.read_into, digest, views)
        self._fetched.inc(sum(len(view) for view in views))

    def put(self, data: Iterable[bytes]) -> bytes:
        return self._meter.call("put", self.inner.put, data)

    def read_resident(self, digest: bytes, size: int) -> bytes | None:
        data = self._meter.call("read_resident", self.inner.read_resident, digest, size)
        if data is not None:
            self._fetched.inc(len(data))
        return data

    def has(self, digest: bytes) -> bool:
        return self._meter.call("has", self.inner.has, digest)

    def forked_writer(self) -> ForkedWriter | None:
        return None  # forked writers would bypass the accounting

    def close(self) -> None:
        self.inner.close()


class MeteredDirectoryService(DirectoryService):
    def __init__(self, inner: DirectoryService, metrics: Metrics) -> None:
        self.inner = inner
        self._meter = _Meter(metrics, "directory")

    def get(self, digest: bytes) -> Directory | None:
        return self._meter.call("get", self.inner.get, digest)

    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        return self._meter.stream("get_recursive", lambda: self.inner.get_recursive(digest), None)

    def put_many(self, directories: Iterable[Directory]) -> bytes:
        return self._meter.call("put_many", self.inner.put_many, directories)

    def put(self, directory: Directory) -> bytes:
        return self._meter.call("put", self.inner.put, directory)

    def close(self) -> None:
        self.inner.close()


class MeteredEncodedDirectoryService(MeteredDirectoryService):
    """The same, over a store that offers its closures encoded (encodedclosure.py): the
    server keeps using them with metrics on."""

    def __init__(self, inner: DirectoryService, encoded: EncodedClosures, metrics: Metrics) -> None:
        super().__init__(inner, metrics)
        self._encoded = encoded  # ``inner`` itself

    def get_recursive_encoded(self, digest: bytes) -> list[bytes]:
        return self._meter.call("get_recursive", self._encoded.get_recursive_encoded, digest)


def _metered_directories(inner: DirectoryService, metrics: Metrics) -> MeteredDirectoryService:
    if isinstance(inner, EncodedClosures):
        return MeteredEncodedDirectoryService(inner, inner, metrics)
    return MeteredDirectoryService(inner, metrics)


class MeteredPathInfoService(PathInfoService):
    def __init__(self, inner: PathInfoService, metrics: Metrics) -> None:
        self.inner = inner
        self._meter = _Meter(metrics, "pathinfo")

    def get(self, output_hash: bytes) -> pathinfo_pb2.PathInfo | None:
        return self._meter.call("get", self.inner.get, output_hash)

    def put(self, info: pathinfo_pb2.PathInfo) -> pathinfo_pb2.PathInfo:
        return self._meter.call("put", self.inner.put, info)

    def list(self) -> Iterator[pathinfo_pb2.PathInfo]:
        return self._meter.stream("list", self.inner.list, None)

    def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        return self._meter.call("calculate_nar", self.inner.calculate_nar, node)

    def close(self) -> None:
        self.inner.close()


def _judged_by(breaker: CircuitBreaker) -> Callable[[], bool]:
    return lambda: breaker.reachable


def metered(store: Store, metrics: Metrics) -> Store:
    """``store`` with every call of its three services counted and timed in ``metrics``; its
    circuit breakers (a gRPC store's) also judge whether it is reachable."""
    for breaker in store.breakers:
        metrics.reachability(_judged_by(breaker))
    return replace(
        store,
        blobs=MeteredBlobService(store.blobs, metrics),
        directories=_metered_directories(store.directories, metrics),
        pathinfos=MeteredPathInfoService(store.pathinfos, metrics),
    )


def _answered_bytes(answer: tuple[int, bytes | Exception]) -> int:
    outcome = answer[1]
    return 0 if isinstance(outcome, Exception) else len(outcome)
