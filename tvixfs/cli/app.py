"""The typer application and what every command shares: store options, logging, error exits."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer

from tvixfs.castore.errors import ValidationError
from tvixfs.services.base import Store
from tvixfs.services.errors import StoreError
from tvixfs.services.url import open_store

app = typer.Typer(
    name="tvixfs",
    help="Mount a Nix store read-only over FUSE, lazily, from a tvix-protocol store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("tvixfs")

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="TVIXFS_STORE",
        help="Store URL: local:///path (default: the embedded store), memory://, "
        "grpc+http://host:port, grpc+https://host:port[?ca=FILE&cert=FILE&key=FILE], "
        "grpc+unix:///path.sock, s3://bucket/prefix?endpoint=URL.",
        show_default=False,
    ),
]
BlobAddrOpt = Annotated[str | None, typer.Option("--blob-service-addr", help="Override the BlobService URL.")]
DirAddrOpt = Annotated[
    str | None,
    typer.Option("--directory-service-addr", help="Override the DirectoryService URL."),
]
PathInfoAddrOpt = Annotated[
    str | None,
    typer.Option("--path-info-service-addr", help="Override the PathInfoService URL."),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with one clear line on stderr."""
    print(f"tvixfs: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause (bad input, missing data, dead store) into one line."""
    try:
        yield
    except (StoreError, ValidationError, OSError) as e:
        fail(str(e) or type(e).__name__)


def open_store_or_fail(
    store: str | None,
    blob: str | None = None,
    directory: str | None = None,
    pathinfo: str | None = None,
) -> Store:
    try:
        return open_store(store, blob, directory, pathinfo)
    except (StoreError, ValidationError, OSError) as e:
        fail(f"cannot open store: {e}")


@app.callback()
def configure(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
