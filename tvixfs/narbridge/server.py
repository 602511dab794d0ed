"""The HTTP side of the bridge: Nix's binary cache protocol over a Store.

The stdlib ``http.server`` with one thread per connection, at most ``max_connections`` at once
(further connections wait in the listen backlog): the services are synchronous and thread-safe,
bodies are streamed both ways without an event loop in between, and unix sockets come with
``socketserver``. Idle or stalled connections are cut after ``timeout`` seconds.

Routes:
  GET  /nix-cache-info
  HEAD/GET /<hash>.narinfo                   from the PathInfo; NAR at nar/<hash>-<narhash>.nar
  PUT  /<hash>.narinfo                       (--allow-upload) commits an uploaded NAR as a path
  HEAD/GET /nar/<hash>-<narhash>.nar         rendered from the castore, Range supported
  HEAD/PUT /nar/<filehash>.nar[.xz|.zst|.bz2]  (--allow-upload for PUT) an upload
"""

from __future__ import annotations

import logging
import re
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import IO, Any, cast

from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, Node, node_from_proto
from tvixfs.narbridge.pending import PendingTable
from tvixfs.narbridge.signatures import PublicKey, SecretKey, nix_fingerprint, sign
from tvixfs.narbridge.uploads import (
    Limits,
    UploadError,
    parse_upload_narinfo,
    parse_upload_url,
    receive_nar,
    receive_narinfo,
)
from tvixfs.services.base import Store
from tvixfs.services.errors import StoreError
from tvixfs.services.readahead import blobs_read_ahead
from tvixfs.store import nixbase32
from tvixfs.store.nar import ReadBlob, write_nar
from tvixfs.store.narinfo import MAX_NARINFO_BYTES, narinfo_from_pathinfo, render_narinfo
from tvixfs.store.storepath import StorePath

log = logging.getLogger(__name__)

DEFAULT_PRIORITY = 40  # Nix's cache.nixos.org says 40; a local cache usually wants lower (preferred)
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_NAR_SIZE = 16 << 30
_B32 = "[0-9abcdfghijklmnpqrsvwxyz]"
_NARINFO = re.compile(rf"/({_B32}{{32}})\.narinfo")
_SERVED_NAR = re.compile(rf"/nar/({_B32}{{32}})-({_B32}{{52}})\.nar")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass
class Bridge:
    """Everything a request handler needs; shared by all threads."""

    store: Store
    pending: PendingTable
    priority: int = DEFAULT_PRIORITY
    allow_upload: bool = False
    sign_keys: list[SecretKey] = field(default_factory=list)
    trusted_keys: list[PublicKey] = field(default_factory=list)
    limits: Limits = field(default_factory=lambda: Limits(DEFAULT_MAX_NAR_SIZE))


def served_nar_url(store_path: StorePath, nar_sha256: bytes) -> str:
    return f"nar/{store_path.hash_part}-{nixbase32.encode(nar_sha256)}.nar"


@contextmanager
def rendered_nar(store: Store, node: Node) -> Iterator[Iterator[bytes]]:
    """The NAR of ``node`` in pieces; a directory tree is fetched in one request first."""
    directories: dict[bytes, Directory] = {}
    if isinstance(node, DirectoryNode):
        directories = {d.digest(): d for d in store.directories.get_recursive(node.digest)}
    reads: AbstractContextManager[ReadBlob] = (
        blobs_read_ahead(node, directories.__getitem__, store.blobs.read)
        if store.blobs.capabilities.calls_are_remote
        else nullcontext(store.blobs.read)
    )
    with reads as read_blob:
        yield write_nar(node, directories.__getitem__, read_blob)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tvixfs-nar-bridge"
    server: _Serving  # type: ignore[assignment]  # always one of ours

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.timeout_seconds)

    @property
    def bridge(self) -> Bridge:
        return self.server.bridge

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- responses -----------------------------------------------------------------------

    def _reply(
        self, status: int, body: bytes = b"", content_type: str = "text/plain", **headers: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        # A miss is how Nix asks what is there: routine; a refusal is news; a failure is ours.
        log.log(
            logging.DEBUG if status == 404 else logging.ERROR if status >= 500 else logging.INFO,
            "%s %s: %d %s",
            self.command,
            self.path,
            status,
            message,
        )
        self._reply(status, (message + "\n").encode())

    def _guarded(self, action: Any) -> None:
        try:
            action()
        except UploadError as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except StoreError as e:
            log.error("%s %s: %s", self.command, self.path, e)  # noqa: TRY400 (the message says it all)
            self._error(502, f"store error: {e}")
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            self.close_connection = True
            self._error(500, "internal error")

    # --- methods ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_HEAD(self) -> None:
        self._guarded(self._get)

    def do_PUT(self) -> None:
        self._guarded(self._put)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/nix-cache-info":
            info = f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {self.bridge.priority}\n"
            return self._reply(200, info.encode())
        if match := _NARINFO.fullmatch(path):
            return self._get_narinfo(match.group(1))
        if match := _SERVED_NAR.fullmatch(path):
            return self._get_nar(match.group(1), match.group(2))
        if self.command == "HEAD" and (target := parse_upload_url(path)) is not None:
            found = self.bridge.pending.get(target[0]) is not None
            return self._reply(200) if found else self._error(404, "no such upload")
        self._error(404, "not found")

    def _lookup(self, hash_part: str) -> tuple[StorePath, Any] | None:
        info = self.bridge.store.pathinfos.get(nixbase32.decode(hash_part))
        if info is None or not info.HasField("narinfo"):  # without a NAR hash Nix cannot use it
            return None
        node = node_from_proto(info.node)
        return StorePath.from_basename(node.name), info

    def _get_narinfo(self, hash_part: str) -> None:
        found = self._lookup(hash_part)
        if found is None:
            return self._error(404, "no such path")
        store_path, info = found
        narinfo = narinfo_from_pathinfo(info, store_path, served_nar_url(store_path, info.narinfo.nar_sha256))
        if self.bridge.sign_keys:
            fingerprint = nix_fingerprint(
                store_path, narinfo.nar_sha256, narinfo.nar_size, narinfo.references
            )
            names = {s.name for s in narinfo.signatures}
            narinfo.signatures += [sign(k, fingerprint) for k in self.bridge.sign_keys if k.name not in names]
        self._reply(200, render_narinfo(narinfo).encode(), "text/x-nix-narinfo")

    def _get_nar(self, hash_part: str, nar_hash: str) -> None:
        found = self._lookup(hash_part)
        if found is None or nixbase32.encode(found[1].narinfo.nar_sha256) != nar_hash:
            return self._error(404, "no such NAR")
        info = found[1]
        size: int = info.narinfo.nar_size
        start, end = 0, size  # [start, end)
        status = 200
        if (spec := self.headers.get("Range")) is not None:
            match = _RANGE.fullmatch(spec.strip())
            if match is not None and (match.group(1) or match.group(2)):
                first, last = match.group(1), match.group(2)
                if first:
                    start, end = int(first), min(size, int(last) + 1) if last else size
                else:
                    start, end = max(0, size - int(last)), size
                if start >= end:
                    return self._reply(416, Content_Range=f"bytes */{size}")
                status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/x-nix-nar")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", IMMUTABLE)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        self._send_nar(node_from_proto(info.node), start, end)

    def _send_nar(self, node: Node, start: int, end: int) -> None:
        at = 0
        try:
            with rendered_nar(self.bridge.store, node) as pieces:
                for piece in pieces:
                    lo, hi = max(start - at, 0), min(end - at, len(piece))
                    at += len(piece)
                    if lo < hi:
                        self.wfile.write(piece[lo:hi])
                    if at >= end:
                        break
        except (StoreError, ValidationError) as e:
            # Headers are out: the only honest signal left is a connection cut short.
            log.error("%s: NAR rendering failed after %d bytes: %s", self.path, at, e)  # noqa: TRY400
            self.close_connection = True
            return
        if at < end:
            log.error("%s: NAR rendered to %d bytes, its PathInfo says more", self.path, at)
            self.close_connection = True

    def _body_length(self, limit: int) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise UploadError(411, "send the body with Content-Length, not chunked")
        text = self.headers.get("Content-Length")
        if text is None or not text.isdigit():
            self.close_connection = True
            raise UploadError(411, "Content-Length required")
        length = int(text)
        if length > limit:
            self.close_connection = True  # the body is not read: the connection cannot go on
            raise UploadError(413, f"body of {length} bytes exceeds the limit of {limit}")
        return length

    def _put(self) -> None:
        if not self.bridge.allow_upload:
            self.close_connection = True
            raise UploadError(403, "uploads are not allowed (start the bridge with --allow-upload)")
        path = self.path.split("?", 1)[0]
        if path == "/nix-cache-info":
            length = self._body_length(MAX_NARINFO_BYTES)
            self.rfile.read(length)
            return self._reply(204)  # ours is fixed; Nix writes one only when it finds none
        if match := _NARINFO.fullmatch(path):
            length = self._body_length(MAX_NARINFO_BYTES)
            data = self.rfile.read(length)
            if len(data) != length:
                raise UploadError(400, "narinfo upload truncated")
            info = parse_upload_narinfo(data)
            bridge = self.bridge
            receive_narinfo(
                bridge.store,
                pending=bridge.pending,
                url_hash=match.group(1),
                info=info,
                trusted=bridge.trusted_keys,
            )
            log.info("stored %s", info.store_path)
            return self._reply(201)
        if (target := parse_upload_url(path)) is not None:
            length = self._body_length(self.bridge.limits.max_nar_size)
            try:
                receive_nar(
                    self.bridge.store,
                    pending=self.bridge.pending,
                    file_sha256=target[0],
                    compression=target[1],
                    body=cast(IO[bytes], self.rfile),
                    length=length,
                    limits=self.bridge.limits,
                )
            except UploadError:
                self.close_connection = True  # the rest of a refused body may still be coming
                raise
            return self._reply(201)
        self.close_connection = True
        raise UploadError(404, "not a narinfo or NAR upload URL")


class _Serving(socketserver.ThreadingMixIn):
    """Thread per connection, at most ``max_connections`` at once."""

    daemon_threads = True
    allow_reuse_address = True
    bridge: Bridge
    timeout_seconds: float
    slots: threading.BoundedSemaphore
    stopping: threading.Event

    def stop(self) -> None:
        """From another thread: end ``serve_forever`` even while every slot is taken."""
        self.stopping.set()
        self.shutdown()  # type: ignore[attr-defined]

    def process_request(self, request: Any, client_address: Any) -> None:
        # Waiting here holds up the accept loop (the backlog queues), but never a stop.
        while not self.slots.acquire(timeout=0.2):
            if self.stopping.is_set():
                self.shutdown_request(request)  # type: ignore[attr-defined]
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _TCPServing(_Serving, HTTPServer):
    pass


class _TCP6Serving(_TCPServing):
    address_family = socket.AF_INET6


class _UnixServing(_Serving, socketserver.UnixStreamServer):
    pass


BridgeServer = _TCPServing | _UnixServing


def make_server(
    bridge: Bridge,
    *,
    host: str = "",
    port: int = 0,
    unix_path: Path | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    timeout: float = DEFAULT_TIMEOUT,
) -> BridgeServer:
    """Bound and listening; ``serve_forever`` runs it, ``shutdown`` stops it from another thread."""
    server: _TCPServing | _UnixServing
    if unix_path is not None:
        server = _UnixServing(str(unix_path), _Handler, bind_and_activate=False)
    elif ":" in host:
        server = _TCP6Serving((host, port), _Handler, bind_and_activate=False)
    else:
        server = _TCPServing((host, port), _Handler, bind_and_activate=False)
    server.bridge = bridge
    server.timeout_seconds = timeout
    server.slots = threading.BoundedSemaphore(max_connections)
    server.stopping = threading.Event()
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    return server
