"""The backends the service contract suite (tests/test_contract.py) runs against.

``BACKENDS`` maps a backend's name (the pytest id) to a factory: called with a fresh, short
temporary directory (fit for unix sockets) that it may use as it likes, it returns a context
manager that yields an open, empty ``Store`` and closes it (and whatever serves it) on exit.
To run the whole contract against another backend, add one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from s3server import shared_moto

from tvixfs.server.serve import start_server
from tvixfs.services.backends.grpc import open_grpc_store
from tvixfs.services.backends.local import open_local_store
from tvixfs.services.backends.memory import open_memory_store
from tvixfs.services.base import Store
from tvixfs.services.meteredstore import metered
from tvixfs.services.metrics import Metrics
from tvixfs.services.url import StoreURL, open_url

BackendFactory = Callable[[Path], AbstractContextManager[Store]]


def in_order(answers: Iterable[tuple[int, bytes | Exception]]) -> list[bytes | Exception]:
    """``BlobService.read_many``'s answers (index, outcome; in any order) by index, checking
    that each index from 0 up is answered exactly once."""
    by_index: dict[int, bytes | Exception] = {}
    for index, outcome in answers:
        assert index not in by_index, f"chunk {index} answered twice"
        by_index[index] = outcome
    assert sorted(by_index) == list(range(len(by_index))), f"answers for {sorted(by_index)}"
    return [by_index[i] for i in range(len(by_index))]


@contextmanager
def memory_backend(tmp: Path) -> Iterator[Store]:
    store = open_memory_store()
    try:
        yield store
    finally:
        store.close()


@contextmanager
def local_backend(tmp: Path) -> Iterator[Store]:
    store = open_local_store(tmp / "store")
    try:
        yield store
    finally:
        store.close()


@contextmanager
def _served(tmp: Path, inner: BackendFactory, listen: str) -> Iterator[Store]:
    """``inner`` served by an in-process tvixfs gRPC server, seen through the gRPC client."""
    with inner(tmp) as served:
        running = start_server(served, [listen], threads=16)
        client = open_grpc_store(running.addresses[0])
        try:
            yield client
        finally:
            client.close()
            running.stop(None)


@contextmanager
def s3_backend(tmp: Path) -> Iterator[Store]:
    """A fresh bucket on the test process's moto S3 server (tests/s3server.py)."""
    server = shared_moto()
    store = open_url(StoreURL.parse(server.url(server.new_bucket(), "store")))
    try:
        yield store
    finally:
        store.close()


def grpc_http_backend(tmp: Path) -> AbstractContextManager[Store]:
    return _served(tmp, memory_backend, "[::1]:0")


def grpc_unix_backend(tmp: Path) -> AbstractContextManager[Store]:
    return _served(tmp, local_backend, f"unix:{tmp / 'store.sock'}")


@contextmanager
def metered_backend(tmp: Path) -> Iterator[Store]:
    """The embedded store behind the metrics wrapper (--metrics-listen): it must be invisible."""
    with local_backend(tmp) as store:
        yield metered(store, Metrics())


BACKENDS: dict[str, BackendFactory] = {
    "memory": memory_backend,
    "local": local_backend,
    "grpc+http": grpc_http_backend,
    "grpc+unix": grpc_unix_backend,
    "metered": metered_backend,
    "s3": s3_backend,
}
