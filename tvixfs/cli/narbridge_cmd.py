"""``tvixfs nar-bridge``: serve a store as a Nix HTTP binary cache, and let Nix push into it."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from tvixfs.castore.errors import ValidationError
from tvixfs.cli.app import StoreOptions, app, fail, store_options
from tvixfs.cli.metrics_opts import MetricsListenOpt, start_metrics
from tvixfs.narbridge.pending import PendingTable
from tvixfs.narbridge.server import Bridge, BridgeServer, make_server
from tvixfs.narbridge.uploads import Limits
from tvixfs.server.listen import (
    UNIX_SOCKET_MODE,
    ListenAddress,
    ListenError,
    parse_listen,
    remove_stale_socket,
    warn_if_exposed,
)
from tvixfs.services.meteredstore import metered
from tvixfs.services.url import StoreURL, default_store_url
from tvixfs.store.nixsig import parse_public_keys, parse_secret_key
from tvixfs.systemd import Notifier

log = logging.getLogger("tvixfs")

DEFAULT_LISTEN = "127.0.0.1:9000"
PENDING_FILE = "nar-bridge-pending.sqlite"


def _pending_path(store: str | None, given: Path | None) -> Path:
    """Next to an embedded store; elsewhere in the state directory (systemd's, or the user's)."""
    if given is not None:
        return given
    url = StoreURL.parse(store or default_store_url())
    if url.scheme == "local":
        return Path(url.path) / PENDING_FILE
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not state:
        home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        state = "/var/lib/tvixfs-nar-bridge" if os.geteuid() == 0 else str(Path(home) / "tvixfs")
    return Path(state) / PENDING_FILE


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        fail(f"cannot read {what} {path}: {e.strerror or e}")


@app.command("nar-bridge")
@store_options()
def nar_bridge(
    *,
    where: StoreOptions,
    listen: Annotated[
        str, typer.Option(help="HOST:PORT, [IPV6]:PORT or unix:/abs/path.sock (mode 0660).")
    ] = DEFAULT_LISTEN,
    allow_upload: Annotated[
        bool, typer.Option("--allow-upload", help="Accept PUTs (nix copy --to); off: read only.")
    ] = False,
    sign_key: Annotated[
        Path | None,
        typer.Option(
            "--sign-key", help="Nix secret key file: sign every narinfo served.", show_default=False
        ),
    ] = None,
    trusted_public_key: Annotated[
        list[str] | None,
        typer.Option(
            "--trusted-public-key",
            help="NAME:BASE64 Nix public key (repeatable): uploads need a valid signature by one (else 403).",
            show_default=False,
        ),
    ] = None,
    priority: Annotated[int, typer.Option(help="Priority in nix-cache-info (lower is preferred).")] = 40,
    pending_db: Annotated[
        Path | None,
        typer.Option(
            help="SQLite file pairing uploaded NARs with their narinfo. Default: in a local:// "
            "store's directory, else in the state directory.",
            show_default=False,
        ),
    ] = None,
    max_nar_size: Annotated[
        int, typer.Option(help="Largest upload, and largest NAR it may decompress to, in bytes.", min=1)
    ] = 16 << 30,
    max_connections: Annotated[int, typer.Option(help="Connections served at once.", min=1)] = 32,
    timeout: Annotated[float, typer.Option(help="Seconds a connection may stall.", min=1)] = 60.0,
    metrics_listen: MetricsListenOpt = None,
) -> None:
    """Serve a store as a Nix HTTP binary cache (substituter), and accept `nix copy --to` uploads.

    NARs are rendered from the castore on the fly (Compression: none); uploads may be
    uncompressed, xz, zstd or bzip2.
    """
    try:
        address = parse_listen(listen)
        sign_keys = [parse_secret_key(_read(sign_key, "signing key"))] if sign_key is not None else []
        trusted = parse_public_keys(trusted_public_key or [])
    except (ListenError, ValidationError) as e:
        fail(str(e))
    pending_path = _pending_path(where.store, pending_db)
    endpoint = start_metrics(metrics_listen)
    opened = where.open_store(create="always" if allow_upload else "in-existing-directory")
    if endpoint is not None:
        opened = metered(opened, endpoint.metrics)
    try:
        pending = PendingTable(pending_path)
    except (sqlite3.Error, OSError) as e:
        opened.close()
        fail(f"cannot open {pending_path}: {e}")
    bridge = Bridge(
        opened,
        pending,
        priority=priority,
        allow_upload=allow_upload,
        sign_keys=sign_keys,
        trusted_keys=trusted,
        limits=Limits(max_nar_size, spool_dir=pending_path.parent),
    )
    try:
        server, serving_on = _listen(bridge, address, max_connections, timeout)
    except (ListenError, OSError) as e:
        pending.close()
        opened.close()
        fail(f"cannot listen on {listen}: {e}")
    _serve(server, serving_on, allow_upload)
    pending.close()
    opened.close()


def _listen(
    bridge: Bridge, address: ListenAddress, max_connections: int, timeout: float
) -> tuple[BridgeServer, str]:
    """Bound and listening; a unix socket is never wider than 0660, a stale one replaced."""
    if address.path is None:
        warn_if_exposed(address)
        server = make_server(
            bridge, host=address.host, port=address.port, max_connections=max_connections, timeout=timeout
        )
        port = server.server_address[1]  # type: ignore[index]  # TCP: (host, port)
        host = f"[{address.host}]" if ":" in address.host else address.host
        return server, f"{host}:{port}"
    remove_stale_socket(address.path)
    address.path.parent.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o777 & ~UNIX_SOCKET_MODE)
    try:
        server = make_server(bridge, unix_path=address.path, max_connections=max_connections, timeout=timeout)
    finally:
        os.umask(old)
    return server, f"unix:{address.path}"


def _serve(server: BridgeServer, where: str, allow_upload: bool) -> None:
    """Until SIGTERM or SIGINT; requests in flight are cut when the process exits."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        threading.Thread(target=server.stop, daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    notifier = Notifier()
    log.info("nar-bridge serving on %s (uploads %s)", where, "allowed" if allow_upload else "off")
    notifier.ready(f"serving on {where}")
    try:
        server.serve_forever()
    finally:
        notifier.stopping()
        server.server_close()
