"""TLS for the gRPC transport: client credentials of ``grpc+https://`` URLs, server credentials
of ``tvixfs daemon --tls-cert``, and one-line reasons for a failed handshake.

PEM files are read when the store is opened, so a missing or unreadable file is a startup
error naming the file, not a handshake failure later. grpc reports every failed handshake as
"failed to connect", often naming another address of the host; ``handshake_problem`` repeats
the handshake with Python's ssl module, which says what went wrong.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tvixfs.services.errors import StoreError

if TYPE_CHECKING:  # grpc is imported only by commands that connect (start-up time)
    import grpc

# Seconds to wait for the server's first bytes after the handshake: a server that refuses
# the client certificate closes the connection instead.
_FIRST_BYTES = 2.0


class TLSConfigError(StoreError):
    """A certificate or key file that cannot be used; the message names it."""


@dataclass(frozen=True)
class ClientTLS:
    """``grpc+https://HOST:PORT?ca=FILE&cert=FILE&key=FILE``: empty means not given."""

    ca: str = ""  # PEM roots to trust instead of the system's
    cert: str = ""  # PEM client certificate chain (mutual TLS)
    key: str = ""  # its PEM private key

    def credentials(self) -> grpc.ChannelCredentials:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA certificate") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )


@dataclass(frozen=True)
class ServerTLS:
    cert: str
    key: str
    client_ca: str = ""  # with it, clients must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        import grpc

        pair = (_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))
        if not self.client_ca:
            return grpc.ssl_server_credentials([pair])
        roots = _read(self.client_ca, "client CA certificate")
        return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=True)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{what} {path} is not a PEM file")
    return data


def handshake_problem(target: str, tls: ClientTLS, timeout: float = 10.0) -> str | None:
    """Why a TLS connection to ``target`` (``host:port``) fails, in a few words; None if it
    works or fails for a reason other than TLS (grpc's own error says enough then)."""
    parts = urlsplit(f"//{target}")
    host, port = parts.hostname or "", parts.port or 443
    expired = _expired(tls.cert) if tls.cert else None
    context = ssl.create_default_context(cafile=tls.ca or None)
    context.set_alpn_protocols(["h2"])
    try:
        if tls.cert:
            context.load_cert_chain(tls.cert, tls.key)
        with (
            socket.create_connection((host, port), timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as conn,
        ):
            conn.settimeout(_FIRST_BYTES)
            try:
                if conn.recv(1):
                    return None
            except TimeoutError:
                return None
    except ssl.SSLCertVerificationError as e:
        return _server_certificate(e, host, tls)
    except ssl.SSLError as e:
        if e.reason == "WRONG_VERSION_NUMBER":
            return "the server does not speak TLS (grpc+http:// instead?)"
        return f"TLS handshake failed: {e.reason or e}"
    except OSError:
        return None
    # Handshake done, then the server hung up: it did not accept this client.
    if not tls.cert:
        return "the server requires a client certificate (add ?cert=FILE&key=FILE)"
    if expired is not None:
        return f"the server refused the client certificate {tls.cert}: it expired on {expired}"
    return f"the server refused the client certificate {tls.cert} (not signed by a CA it trusts?)"


def _server_certificate(e: ssl.SSLCertVerificationError, host: str, tls: ClientTLS) -> str:
    message = str(e.verify_message).rstrip(".")
    if e.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return f"hostname mismatch: the server's certificate is not valid for {host!r}"
    if e.verify_code in (2, 19, 20, 21):  # issuer unknown, self-signed chain
        hint = f"not signed by the CA in {tls.ca}" if tls.ca else "unknown CA (a private CA? add ?ca=FILE)"
        return f"the server's certificate is not trusted: {hint}"
    return f"the server's certificate is not trusted: {message}"


def _expired(cert: str) -> str | None:
    """The date the client certificate expired, if it has."""
    from cryptography import x509

    try:
        loaded = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError):
        return None
    end = loaded.not_valid_after_utc
    return end.date().isoformat() if end < datetime.now(UTC) else None
