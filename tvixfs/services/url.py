"""Store URLs: the one place that turns ``--store`` and the per-service flags into services."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tvixfs.services.base import Store
from tvixfs.services.clientconfig import ClientConfig

if TYPE_CHECKING:  # local.py imports sqlite: only when a local store is opened
    from tvixfs.services.local import Creation
from tvixfs.services.errors import StoreError

SCHEMES = ("local", "memory", "grpc+http", "grpc+unix")
_FORMS = "local:///path, memory://, grpc+http://host:port, grpc+unix:///path.sock"


class StoreURLError(StoreError, ValueError):
    """A URL that names no store tvixfs can open; the message says what is accepted."""


def default_store_url() -> str:
    """The embedded store: ``/var/lib/tvixfs`` for root, else under ``$XDG_DATA_HOME``."""
    if os.geteuid() == 0:
        return "local:///var/lib/tvixfs"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"local://{Path(data_home) / 'tvixfs'}"


@dataclass(frozen=True)
class StoreURL:
    scheme: str
    path: str = ""  # local: directory; grpc+unix: socket path
    host: str = ""  # grpc+http: host:port as grpcio takes it

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        if not url:
            raise StoreURLError(f"empty store URL: expected one of {_FORMS}")
        try:
            parts = urlsplit(url)
        except ValueError as e:  # e.g. an unclosed IPv6 bracket
            raise StoreURLError(f"malformed store URL {url!r}: {e}") from None
        scheme = parts.scheme
        if scheme not in SCHEMES:
            raise StoreURLError(f"unknown store URL {url!r}: expected one of {_FORMS}")
        if parts.query or parts.fragment:
            # No store takes parameters yet; a silently ignored one would be a surprise.
            extra = "?" + parts.query if parts.query else "#" + parts.fragment
            raise StoreURLError(f"store URL {url!r}: unknown parameters {extra!r}")
        if scheme == "memory":
            if parts.netloc or parts.path:
                raise StoreURLError(f"memory store URL takes no host or path: {url!r} (use memory://)")
            return cls(scheme)
        if scheme == "local":
            path = parts.netloc + parts.path if parts.netloc else parts.path
            if not path.startswith("/"):
                raise StoreURLError(f"local store URL needs an absolute path: {url!r}")
            return cls(scheme, path=path)
        if scheme == "grpc+unix":
            if parts.netloc or not parts.path.startswith("/"):
                raise StoreURLError(f"grpc+unix URL needs an absolute socket path: {url!r}")
            return cls(scheme, path=parts.path)
        try:
            port = parts.port
        except ValueError as e:  # a port that is not a number, or out of range
            raise StoreURLError(f"grpc+http URL {url!r}: {e}") from None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise StoreURLError(f"grpc+http URL needs host:port: {url!r}")
        return cls(scheme, host=parts.netloc)


def open_url(url: StoreURL, create: Creation = "always", config: ClientConfig | None = None) -> Store:
    """Open all three services of one URL; whether a missing local store is created: ``create``.

    ``config`` sets the deadlines of a gRPC client (default: ClientConfig's).
    """
    if url.scheme == "memory":
        from tvixfs.services.memory import open_memory_store

        return open_memory_store()
    if url.scheme == "local":
        from tvixfs.services.local import open_local_store

        return open_local_store(Path(url.path), create=create)
    from tvixfs.services.grpc import open_grpc_store

    target = f"unix:{url.path}" if url.scheme == "grpc+unix" else url.host
    return open_grpc_store(target, config)


def open_store(
    store: str | None = None,
    blob_service_addr: str | None = None,
    directory_service_addr: str | None = None,
    path_info_service_addr: str | None = None,
    *,
    create: Creation = "always",
    config: ClientConfig | None = None,
) -> Store:
    """One store from ``--store`` plus per-service overrides; each distinct URL opened once.

    None means the default (the embedded store, or ``--store`` for an override); an empty
    string is an error, not the default. Commands that only read pass ``create="never"``, so
    that a mistyped local path is refused instead of becoming a new store.
    """
    base = default_store_url() if store is None else store
    urls = [
        StoreURL.parse(base if u is None else u)
        for u in (blob_service_addr, directory_service_addr, path_info_service_addr)
    ]
    opened: dict[StoreURL, Store] = {}
    try:
        for url in urls:
            if url not in opened:
                opened[url] = open_url(url, create, config)
    except BaseException:
        for done in opened.values():
            done.close()
        raise
    breakers = tuple(dict.fromkeys(b for s in opened.values() for b in s.breakers))
    return Store(
        opened[urls[0]].blobs, opened[urls[1]].directories, opened[urls[2]].pathinfos, breakers=breakers
    )
