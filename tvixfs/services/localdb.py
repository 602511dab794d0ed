"""The embedded store's database: one SQLite file (WAL) and the store directory around it.

Thread safety: connections come from a small pool (one per concurrent caller, never shared
while in use); writers are serialized in process by a lock and across processes by SQLite's
``BEGIN IMMEDIATE`` with a busy timeout. SQLite runs with ``synchronous=NORMAL``: a power loss
may forget the last commits, never reorder them before the chunk files they name (those are
fsynced before the commit).
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tvixfs.services.base import ChunkMeta
from tvixfs.services.chunkfiles import ChunkFiles
from tvixfs.services.errors import CorruptDataError, StoreError, StoreUnavailableError

SCHEMA_VERSION = 1
STORE_KIND = "tvixfs-local-store"
DB_NAME = "db.sqlite"
CHUNKS_DIR = "chunks"

# Long enough to outlast any single transaction of ours (they are short: one blob's chunk
# list, one directory batch), short enough that a wedged peer is reported, not waited on.
BUSY_TIMEOUT_MS = 30_000
# Idle connections kept open: as many as the FUSE bridge and the gRPC server run threads,
# so that steady concurrent reads never reconnect.
_IDLE_CONNECTIONS = 32
_CHUNK_ENTRY = struct.Struct(">32sQ")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE blobs (
    digest BLOB PRIMARY KEY, size INTEGER NOT NULL, chunks BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE directories (digest BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE pathinfos (hash BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE nar_cache (
    node BLOB PRIMARY KEY, nar_size INTEGER NOT NULL, nar_sha256 BLOB NOT NULL
) WITHOUT ROWID;
"""


class NotAStoreError(StoreError):
    """PATH exists but is not a tvixfs store (or one this version cannot read)."""


def pack_chunks(chunks: Iterable[ChunkMeta]) -> bytes:
    """A blob's chunk list as stored: 32-byte digest + big-endian u64 size per chunk."""
    return b"".join(_CHUNK_ENTRY.pack(c.digest, c.size) for c in chunks)


def unpack_chunks(packed: bytes) -> list[ChunkMeta]:
    if len(packed) % _CHUNK_ENTRY.size:
        raise CorruptDataError(f"chunk list of {len(packed)} bytes is not a whole number of entries")
    return [ChunkMeta(d, s) for d, s in _CHUNK_ENTRY.iter_unpack(packed)]


class LocalBackend:
    """One open store directory: the connection pool and the chunk files, shared by services."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = path
        self.chunks = ChunkFiles(path / CHUNKS_DIR)
        self._idle: deque[sqlite3.Connection] = deque()
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        if not (path / DB_NAME).exists():
            if not create:
                raise NotAStoreError(f"{path}: no tvixfs store here (no {DB_NAME})")
            self._prepare_directory()
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreUnavailableError(f"store directory {path} is not writable")
        self._open_schema()

    def _prepare_directory(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailableError(f"cannot create store directory {self.path}: {e}") from None
        if not self.path.is_dir():
            raise NotAStoreError(f"{self.path}: not a directory")
        if any(p.name != CHUNKS_DIR for p in self.path.iterdir()):
            raise NotAStoreError(
                f"{self.path}: not empty and not a tvixfs store (no {DB_NAME}); refusing to use it"
            )
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreUnavailableError(f"store directory {self.path} is not writable")

    def _open_schema(self) -> None:
        """Check the store's kind and version; a database with no tables yet gets the schema.

        The schema is created in one transaction, so a crash during creation leaves a database
        with no tables, which the next open completes.
        """
        with self.transaction() as conn:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                self.chunks.create_layout()
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("kind", STORE_KIND), ("schema_version", str(SCHEMA_VERSION))],
                )
            try:
                rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.Error as e:
                raise NotAStoreError(f"{self.path}: not a tvixfs store: {e}") from None
        if rows.get("kind") != STORE_KIND:
            raise NotAStoreError(f"{self.path}: {DB_NAME} is not a tvixfs store database")
        version = int(rows.get("schema_version", "0"))
        if version != SCHEMA_VERSION:
            raise NotAStoreError(
                f"{self.path}: store schema version {version}, this tvixfs reads {SCHEMA_VERSION}"
            )

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path / DB_NAME,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            raise NotAStoreError(f"{self.path}: cannot open {DB_NAME}: {e}") from None
        return conn

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for this caller alone, returned to the pool afterwards."""
        with self._pool_lock:
            if self._closed:
                raise StoreUnavailableError(f"local store {self.path} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        except sqlite3.Error as e:
            raise StoreUnavailableError(f"local store {self.path}: {e}") from e
        finally:
            with self._pool_lock:
                keep = not self._closed and len(self._idle) < _IDLE_CONNECTIONS
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        with self._write_lock, self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def fetch_one(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        with self.connection() as conn:
            row: tuple[Any, ...] | None = conn.execute(sql, args).fetchone()
            return row

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
        for conn in idle:
            conn.close()
