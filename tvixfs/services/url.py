"""Store URLs: the one place that turns ``--store`` and the per-service flags into services."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from tvixfs.services.base import Store
from tvixfs.services.clientconfig import ClientConfig

if TYPE_CHECKING:  # local.py imports sqlite, tls.py ssl (~25 ms): only when such a store is used
    from tvixfs.services.backends.local import Creation
    from tvixfs.services.tls import ClientTLS
from tvixfs.services.errors import StoreError
from tvixfs.services.s3url import SCHEMES as S3_SCHEMES
from tvixfs.services.s3url import S3URLError, parse_s3_url

SCHEMES = ("local", "memory", "grpc+http", "grpc+https", "grpc+unix", *S3_SCHEMES)
_FORMS = (
    "local:///path, memory://, grpc+http://host:port, grpc+https://host:port, "
    "grpc+unix:///path.sock, s3://bucket/prefix"
)
_TLS_OPTIONS = ("ca", "cert", "key")


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
    path: str = ""  # local: directory; grpc+unix: socket path; s3: the whole URL
    host: str = ""  # grpc+http(s): host:port as grpcio takes it
    tls: ClientTLS | None = None  # grpc+https

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
        if scheme in S3_SCHEMES:
            try:
                parse_s3_url(url)
            except S3URLError as e:
                raise StoreURLError(str(e)) from None
            return cls(scheme, path=url)
        if parts.fragment:
            raise StoreURLError(f"store URL {url!r}: unknown parameters {'#' + parts.fragment!r}")
        if parts.query and scheme == "grpc+http" and set(parse_qs(parts.query)) <= set(_TLS_OPTIONS):
            raise StoreURLError(f"options (?{parts.query}) need TLS: grpc+https:// instead of {url!r}")
        if parts.query and scheme != "grpc+https":
            # No such store takes parameters; a silently ignored one would be a surprise.
            raise StoreURLError(f"store URL {url!r}: unknown parameters {'?' + parts.query!r}")
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
            raise StoreURLError(f"{scheme} URL {url!r}: {e}") from None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise StoreURLError(f"{scheme} URL needs host:port: {url!r}")
        if scheme == "grpc+https":
            return cls(scheme, host=parts.netloc, tls=_client_tls(url, parts.query))
        return cls(scheme, host=parts.netloc)


def _client_tls(url: str, query: str) -> ClientTLS:
    """``?ca=FILE&cert=FILE&key=FILE``, each at most once; a certificate needs its key."""
    options = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(options) - set(_TLS_OPTIONS))
    if unknown:
        raise StoreURLError(f"unknown option {unknown[0]!r} in {url!r}: expected ca=, cert=, key=")
    values = {}
    for name, given in options.items():
        if len(given) != 1 or not given[0]:
            raise StoreURLError(f"option {name!r} needs exactly one file in {url!r}")
        values[name] = given[0]
    if ("cert" in values) != ("key" in values):
        raise StoreURLError(f"a client certificate needs both cert= and key=: {url!r}")
    from tvixfs.services.tls import ClientTLS

    return ClientTLS(**values)


def open_url(url: StoreURL, create: Creation = "always", config: ClientConfig | None = None) -> Store:
    """Open all three services of one URL; whether a missing local store is created: ``create``.

    ``config`` sets the deadlines of a gRPC client (default: ClientConfig's).
    """
    if url.scheme == "memory":
        from tvixfs.services.backends.memory import open_memory_store

        return open_memory_store()
    if url.scheme == "local":
        from tvixfs.services.backends.local import open_local_store

        return open_local_store(Path(url.path), create=create)
    if url.scheme in S3_SCHEMES:
        from tvixfs.services.backends.s3 import open_s3_store

        return open_s3_store(parse_s3_url(url.path))
    from tvixfs.services.backends.grpc import open_grpc_store

    target = f"unix:{url.path}" if url.scheme == "grpc+unix" else url.host
    return open_grpc_store(target, config, url.tls.credentials() if url.tls is not None else None)


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


def tls_problem(*urls: str | None) -> str | None:
    """For a store that cannot be reached: what is wrong with the TLS of one of its
    ``grpc+https://`` URLs (``URL: reason``), or None if TLS is not the problem."""
    from tvixfs.services.tls import handshake_problem

    for text in dict.fromkeys(u for u in urls if u):
        try:
            url = StoreURL.parse(text)
        except StoreURLError:
            continue
        if url.tls is not None and (problem := handshake_problem(url.host, url.tls)) is not None:
            return f"{text}: {problem}"
    return None
