"""Store URL parsing: every accepted form, and a clear error for everything else."""

from __future__ import annotations

import pytest

from tvixfs.protos import castore_pb2, pathinfo_pb2
from tvixfs.services.url import StoreURL, StoreURLError, default_store_url, open_store


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memory://", StoreURL("memory")),
        ("local:///var/lib/tvixfs", StoreURL("local", path="/var/lib/tvixfs")),
        ("grpc+http://[::1]:8000", StoreURL("grpc+http", host="[::1]:8000")),
        ("grpc+http://cache.example:8000", StoreURL("grpc+http", host="cache.example:8000")),
        ("grpc+unix:///run/tvixfs/daemon.sock", StoreURL("grpc+unix", path="/run/tvixfs/daemon.sock")),
    ],
)
def test_accepted(url: str, expected: StoreURL) -> None:
    assert StoreURL.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://bucket", "unknown store URL"),
        ("s3://ab", "bucket name"),
        ("s3://bucket?aws_access_key_id=x", "unknown s3:// option"),
        ("/var/lib/tvixfs", "unknown store URL"),
        ("local://relative", "absolute path"),
        ("grpc+http://host", "host:port"),
        ("grpc+unix://relative.sock", "absolute socket path"),
        ("", "empty store URL"),
        ("grpc+http://127.0.0.1:99999", "out of range"),
        ("grpc+http://[::1:8000", "malformed store URL"),
        ("grpc+http://[::1]:8000/x", "host:port"),
        ("memory:///foo", "takes no host or path"),
        ("memory://x", "takes no host or path"),
        ("local:///srv/store?readonly=1", "unknown parameters"),
        ("local:///srv/store#x", "unknown parameters"),
    ],
)
def test_rejected(url: str, message: str) -> None:
    with pytest.raises(StoreURLError, match=message):
        StoreURL.parse(url)


def test_default_is_embedded_store() -> None:
    assert default_store_url().startswith("local:///")


def test_per_service_overrides_share_one_store_per_url() -> None:
    # Same URL for every service: one memory store, so the path info service sees the blob
    # that the blob service stored and accepts a PathInfo rooted at it.
    store = open_store("memory://", blob_service_addr="memory://")
    digest = store.blobs.put([b"#!/bin/sh\n"])
    name = b"00bgd045z0d4icpbc2yyz4gx48ak44la-script"
    info = pathinfo_pb2.PathInfo(
        node=castore_pb2.Node(file=castore_pb2.FileNode(name=name, digest=digest, size=10))
    )
    assert store.pathinfos.put(info) == info


def test_empty_is_not_the_default() -> None:
    with pytest.raises(StoreURLError, match="empty store URL"):
        open_store("")
    with pytest.raises(StoreURLError, match="empty store URL"):
        open_store("memory://", blob_service_addr="")
