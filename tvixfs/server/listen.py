"""Listen addresses: ``host:port`` or ``unix:/abs/path``, parsed, checked and bound."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from tvixfs.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "[::1]:8000"
UNIX_SOCKET_MODE = 0o660
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes including the terminating NUL


class ListenError(UserError):
    """An address that cannot be served; the message says what to change."""


@dataclass(frozen=True)
class ListenAddress:
    text: str  # as the user wrote it
    host: str = ""  # TCP: host without brackets
    port: int = 0
    path: Path | None = None  # unix socket

    @property
    def loopback(self) -> bool:
        if self.path is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: whatever it resolves to may be reachable from outside

    def grpc_address(self, port: int | None = None) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port if port is None else port}"


def parse_listen(text: str) -> ListenAddress:
    if text.startswith("unix:"):
        raw = text.removeprefix("unix:")
        path = Path(raw.removeprefix("//"))  # unix:///abs is the URL form of unix:/abs
        if not path.is_absolute():
            raise ListenError(f"unix socket address needs an absolute path: {text!r}")
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise ListenError(f"unix socket path longer than {_MAX_UNIX_PATH} bytes: {text!r}")
        return ListenAddress(text, path=path)
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError as e:
        raise ListenError(f"bad listen address {text!r}: {e}") from None
    if not parts.hostname or port is None or parts.path or parts.username:
        raise ListenError(f"listen address must be HOST:PORT, [IPV6]:PORT or unix:/path, not {text!r}")
    return ListenAddress(text, host=parts.hostname, port=port)


def bind(server: grpc.Server, address: ListenAddress, tls: grpc.ServerCredentials | None = None) -> str:
    """Add ``address`` to ``server``; returns it as bound (with the port chosen for port 0).

    ``tls`` applies to TCP addresses; unix sockets are guarded by their file mode instead.
    """
    if address.path is not None:
        return _bind_unix(server, address.path)
    if tls is None:
        warn_if_exposed(address)
    try:
        port = (
            server.add_insecure_port(address.grpc_address())
            if tls is None
            else server.add_secure_port(address.grpc_address(), tls)
        )
    except RuntimeError as e:
        raise ListenError(f"cannot listen on {address.text}: {e}") from None
    return address.grpc_address(port)


def warn_if_exposed(address: ListenAddress) -> None:
    if not address.loopback:
        log.warning(
            "LISTENING ON %s, WHICH IS NOT A LOOPBACK ADDRESS: the store is served without "
            "authentication or encryption, and anyone who can reach this address can read it "
            "and write to it. Restrict access with a firewall, or listen on a unix socket.",
            address.text,
        )


def _bind_unix(server: grpc.Server, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_socket(path)
    # The socket must never exist with wider permissions than 0660, not even for a moment.
    old_umask = os.umask(0o777 & ~UNIX_SOCKET_MODE)
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as e:
        raise ListenError(f"cannot listen on unix:{path}: {e}") from None
    finally:
        os.umask(old_umask)
    path.chmod(UNIX_SOCKET_MODE)
    return f"unix:{path}"


def remove_stale_socket(path: Path) -> None:
    """Unlink a socket left by a daemon that died; refuse to touch a live one or a file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"cannot listen on unix:{path}: it exists and is not a socket")
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as probe:
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno != errno.ECONNREFUSED:
                raise ListenError(f"cannot listen on unix:{path}: {e}") from None
        else:
            raise ListenError(f"cannot listen on unix:{path}: another process is serving it")
    log.info("removing stale socket %s", path)
    path.unlink()
