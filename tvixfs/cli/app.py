"""The typer application and what every command shares: store options, logging, error exits.

Adding a command: put it in the module of its area (``store_cmds``, ``mount_cmd``,
``daemon_cmd``, ``fsck_cmd``, or a new ``<area>_cmd.py`` imported in ``cli/__init__.py``)::

    @app.command("frobnicate")
    @store_options()                      # adds --store and the three per-service overrides
    def frobnicate(path: ..., *, where: StoreOptions, limit: Annotated[int, typer.Option(...)] = 3):
        with where.open() as store:       # where.open(create="never") if it only reads
            ...

Errors: raise a ``tvixfs.errors.UserError`` subclass (StoreError, ValidationError, ...) or call
``fail()``; ``run()`` prints it as one ``tvixfs: error:`` line with its exit status. Never catch
errors only to print them. Defaults shown in ``--help`` come from ``tvixfs.defaults``; read
environment variables here, in the CLI, never below it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from tvixfs.errors import UserError
from tvixfs.services import breaker
from tvixfs.services.base import Store
from tvixfs.services.clientconfig import ClientConfig
from tvixfs.services.url import open_store

if TYPE_CHECKING:
    from tvixfs.services.local import Creation

app = typer.Typer(
    name="tvixfs",
    help="Mount a Nix store read-only over FUSE, lazily, from a tvix-protocol store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Option names are never cut at 80 columns (rich would ellipsize them in its table).
    rich_markup_mode=None,
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


class CommandError(UserError):
    """A refusal decided by the command line itself (bad option value, nothing to do)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with one clear line on stderr."""
    raise CommandError(message, code)


def describe(error: BaseException) -> str:
    """One line for an error: its message, or for an OSError what failed and on which file."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error) or type(error).__name__


def run() -> None:
    """Run the app: the one place where user errors become one line on stderr and an exit status."""
    try:
        app()
    except UserError as e:
        print(f"tvixfs: error: {describe(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        print(f"tvixfs: error: {describe(e)}", file=sys.stderr)
        sys.exit(1)


def client_config() -> ClientConfig:
    """Deadlines of the gRPC client: defaults, or ``TVIXFS_GRPC_TIMEOUT`` / ``..._STREAM_TIMEOUT``."""
    defaults = ClientConfig()
    return ClientConfig(
        timeout=_env_seconds("TVIXFS_GRPC_TIMEOUT", defaults.timeout),
        stream_timeout=_env_seconds("TVIXFS_GRPC_STREAM_TIMEOUT", defaults.stream_timeout),
    )


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        fail(f"{name}={value!r}: not a number of seconds")
    if seconds <= 0:
        fail(f"{name}={value!r}: must be more than 0 seconds")
    return seconds


def refuse_empty_store_variable(store: str | None, code: int = 1) -> None:
    """click takes an empty ``$TVIXFS_STORE`` for an unset one; it is a mistake, not the default."""
    if store is None and os.environ.get("TVIXFS_STORE") == "":
        fail("TVIXFS_STORE is set but empty: unset it for the default store, or name one", code)


@dataclass(frozen=True)
class StoreOptions:
    """``--store`` and the per-service overrides, as a command received them."""

    store: str | None = None
    blob_service_addr: str | None = None
    directory_service_addr: str | None = None
    path_info_service_addr: str | None = None

    def open_store(self, create: Creation = "always") -> Store:
        """The store; ``create="never"`` for commands that only read (see ``open_store``)."""
        refuse_empty_store_variable(self.store)
        try:
            return open_store(
                self.store,
                self.blob_service_addr,
                self.directory_service_addr,
                self.path_info_service_addr,
                create=create,
                config=client_config(),
            )
        except (UserError, OSError) as e:
            fail(f"cannot open store: {describe(e)}")

    @contextmanager
    def open(self, create: Creation = "always") -> Iterator[Store]:
        """``open_store`` for the length of a ``with`` block, for a command that runs once.

        Such a command reports a dead store in its one error line: the circuit breaker's
        state changes, which a long-running mount or daemon logs, would only repeat it.
        """
        breaker.log.setLevel(logging.ERROR)
        opened = self.open_store(create)
        try:
            yield opened
        finally:
            opened.close()


_STORE_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
    for name, annotation in (
        ("store", StoreOpt),
        ("blob_service_addr", BlobAddrOpt),
        ("directory_service_addr", DirAddrOpt),
        ("path_info_service_addr", PathInfoAddrOpt),
    )
]


def store_options() -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the four store options; it receives them as ``where: StoreOptions``.

    Declared once here, so every command spells and documents them alike.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        kept = [p for name, p in signature.parameters.items() if name != "where"]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            where = StoreOptions(**{p.name: kwargs.pop(p.name) for p in _STORE_PARAMETERS})
            command(*args, where=where, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=[*kept, *_STORE_PARAMETERS])  # type: ignore[attr-defined]
        return wrapper

    return decorate


@app.callback()
def configure(
    verbose: Annotated[
        int,
        typer.Option("--verbose", "-v", count=True, help="More log output (repeatable).", show_default=False),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
