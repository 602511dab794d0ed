"""The embedded store's database: one SQLite file (WAL) and the store directory around it.

Thread safety: connections come from a small pool (one per concurrent caller, never shared
while in use); writers are serialized in process by a lock and across processes by SQLite's
``BEGIN IMMEDIATE`` with a busy timeout.

Durability by group commit. A blob put writes its chunk files (not synced) and records the
blob's row as *pending*, in this process's memory: this backend's stat and read see it at
once, other processes once it is committed; if the process dies first, it is lost as if the
put had never returned. Every write transaction starts by making the pending blobs durable: one barrier
(``ChunkFiles.sync``: syncfs of the store's file system) and then their rows, inserted in the
same transaction as what the caller writes. So whatever a commit refers to was put before it
and is on disk before the commit is, whether the commit is a path info, a directory or just
blob rows (a flusher thread commits those once enough is pending or ``FLUSH_AFTER`` seconds
after a put, and ``close`` commits the rest). One barrier per commit instead of two fsyncs
per chunk file made importing many small files ~4x faster. Why it holds across crashes:

- kill -9: pending rows vanish with the process; the chunk files they would have named stay as
  unreferenced files (fsck counts them, ``--repair`` removes them). Committed rows were only
  committed after the barrier.
- OS crash or power loss: chunk files written since the last barrier may come back empty or
  damaged, but no committed row names them: the barrier precedes the commit, and SQLite
  (``synchronous=NORMAL``, WAL) may lose the last commits but never applies them out of order.
  A later put of the same chunk compares the file's bytes before relying on it
  (``ChunkFiles.write``), so a damaged leftover is rewritten, not trusted.
- Another process may have written a chunk this one finds present but not yet synced it: the
  barrier is file-system wide, so it covers that file too.

A path info is refused unless its whole tree is present (local.py), so a visible path info
implies complete, durable content.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tvixfs.services.backends.chunkfiles import ChunkFiles
from tvixfs.services.backends.gcguard import WriteGuard, create_pin_tables, this_process
from tvixfs.services.base import ChunkMeta
from tvixfs.services.errors import (
    CorruptDataError,
    FailedPreconditionError,
    StoreError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)

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
# When the flusher thread commits pending blobs without waiting for a commit: FLUSH_AFTER
# seconds after a put, which bounds what a daemon's acknowledged puts can lose to a kill, or
# sooner once this much is pending. Either way the disk writes while an import goes on, and
# the barrier at its end has little left: with the import's chunks written by a second
# process (ingest.py), a barrier every 64 MiB took the last one from ~0.16 s to ~0.01 s for
# 280 MiB, and the import from ~0.85 to ~0.70 s; in one process (before) it bought nothing.
FLUSH_BLOBS = 20_000
FLUSH_BYTES = 64 << 20
FLUSH_AFTER = 1.0

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

    def __init__(self, path: Path, create: bool = True, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.chunks = ChunkFiles(path / CHUNKS_DIR)
        self._idle: deque[sqlite3.Connection] = deque()
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        # Blob rows put but not yet committed: digest -> (size, packed chunk list).
        self._pending: dict[bytes, tuple[int, bytes]] = {}
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        self._flush_wanted = threading.Condition(self._pending_lock)
        self._flusher: threading.Thread | None = None
        self._stopping = False
        self._guard = WriteGuard(path, self._nothing_pending, self._commit_pending)
        self._session: int | None = None  # this process's gc session (gcguard.py), once it pins
        if not (path / DB_NAME).exists():
            if not create:
                raise NotAStoreError(f"{path}: no tvixfs store here (no {DB_NAME})")
            self._prepare_directory()
        if read_only:
            self._check_schema()
            return
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
                self.chunks.create_root()
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("kind", STORE_KIND), ("schema_version", str(SCHEMA_VERSION))],
                )
            rows = self._meta(conn)
        self._check_meta(rows)

    def _check_schema(self) -> None:
        """``_open_schema`` for a store opened read-only: check, never create."""
        with self.connection() as conn:
            self._check_meta(self._meta(conn))

    def _meta(self, conn: sqlite3.Connection) -> dict[str, str]:
        try:
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as e:
            raise NotAStoreError(f"{self.path}: not a tvixfs store: {e}") from None

    def _check_meta(self, rows: dict[str, str]) -> None:
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
                self._read_only_uri() if self.read_only else self.path / DB_NAME,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
                uri=self.read_only,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not self.read_only:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            raise NotAStoreError(f"{self.path}: cannot open {DB_NAME}: {e}") from None
        return conn

    def _read_only_uri(self) -> str:
        """A read-only database URI; ``immutable`` where SQLite could not read WAL otherwise.

        A WAL reader needs to create (or write) the ``-shm`` file, which a directory on
        read-only media does not allow. With no ``-wal`` content left (the store was closed
        cleanly, as a snapshot or read-only medium normally is), the database file alone is
        the whole store, and ``immutable=1`` reads it without any lock or shared memory.
        """
        db = self.path / DB_NAME
        wal = db.with_name(DB_NAME + "-wal")
        settled = not wal.exists() or wal.stat().st_size == 0
        immutable = settled and not os.access(self.path, os.W_OK)
        return f"{db.as_uri()}?mode=ro{'&immutable=1' if immutable else ''}"

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

    def add_blob(self, digest: bytes, size: int, packed_chunks: bytes) -> None:
        """Record a put blob whose chunk files are written; committed by the next transaction."""
        with self._pending_lock:
            if self._closed or self._stopping:
                raise StoreUnavailableError(f"local store {self.path} is closed")
            if digest in self._pending:
                return
            self._pending[digest] = (size, packed_chunks)
            self._pending_bytes += size
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="tvixfs-flush", daemon=True)
                self._flusher.start()
            if len(self._pending) == 1 or self._flush_due():
                self._flush_wanted.notify()

    def _nothing_pending(self) -> bool:
        with self._pending_lock:
            return not self._pending

    def _commit_pending(self) -> None:
        with self.transaction():
            pass

    def gc_waiting(self) -> bool:
        return self._guard.gc_waiting()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around a write: keeps gc out until what it puts is committed and pinned (gcguard.py)."""
        self.check_writable()  # before the lock file: read-only media cannot take one
        self._guard.enter()
        try:
            yield
        finally:
            self._guard.leave()

    def pin(self, conn: sqlite3.Connection, digests: Iterable[bytes]) -> None:
        """Pin ``digests`` for this process's session, in the caller's write transaction."""
        if self._session is None:
            create_pin_tables(conn)
            self._session = conn.execute(
                "INSERT INTO gc_sessions (owner) VALUES (?)", (this_process(),)
            ).lastrowid
        now = time.time()
        conn.executemany(
            "INSERT OR REPLACE INTO gc_pins VALUES (?, ?, ?)", ((self._session, d, now) for d in digests)
        )

    def pending_chunks(self, digest: bytes) -> bytes | None:
        """The packed chunk list of a blob put through this backend and not yet committed."""
        with self._pending_lock:
            found = self._pending.get(digest)
        return None if found is None else found[1]

    def _flush_due(self) -> bool:
        return len(self._pending) >= FLUSH_BLOBS or self._pending_bytes >= FLUSH_BYTES

    def _flush_loop(self) -> None:
        """Commit pending blobs in the background: when enough is pending, or after FLUSH_AFTER.

        Puts never wait for the barrier; a commit that comes while this one runs waits for it
        and then commits only what was put since.
        """
        while True:
            with self._pending_lock:
                self._flush_wanted.wait_for(lambda: self._stopping or bool(self._pending))
                self._flush_wanted.wait_for(lambda: self._stopping or self._flush_due(), FLUSH_AFTER)
                if self._stopping:
                    return
                if not self._pending:  # a commit in the meantime took them
                    continue
            try:
                with self.transaction():
                    pass
            except StoreError as e:  # the next commit retries, and reports it to its caller
                log.warning("cannot commit the blobs put to %s yet: %s", self.path, e)
                with self._pending_lock:
                    self._flush_wanted.wait_for(lambda: self._stopping, FLUSH_AFTER)

    def check_writable(self) -> None:
        """Refuse a write to a store opened read-only, before anything is written."""
        if self.read_only:
            raise FailedPreconditionError(
                f"local store {self.path} is read-only (its directory is not writable)"
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, all of it committed or none; it commits pending blobs first.

        The barrier comes before ``BEGIN IMMEDIATE``, so other processes' writers are not held
        up while the disk catches up.
        """
        self.check_writable()
        with self._write_lock:
            with self._pending_lock:
                pending = list(self._pending.items())
            if pending:
                try:
                    self.chunks.sync()
                except OSError as e:
                    raise StoreUnavailableError(f"cannot make chunk files in {self.path} durable: {e}") from e
            session = self._session
            with self.connection() as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if pending:  # not before the schema exists: the first transaction makes it
                        conn.executemany(
                            "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)",
                            [(digest, size, packed) for digest, (size, packed) in pending],
                        )
                        self.pin(conn, (digest for digest, _ in pending))
                    yield conn
                except BaseException:
                    self._session = session  # a session made in this transaction is gone with it
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            with self._pending_lock:
                for digest, _ in pending:
                    if (committed := self._pending.pop(digest, None)) is not None:
                        self._pending_bytes -= committed[0]
        self._guard.release_if_idle()

    def fetch_one(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        with self.connection() as conn:
            row: tuple[Any, ...] | None = conn.execute(sql, args).fetchone()
            return row

    def _end_session(self) -> None:
        """Drop this process's pins: what it wrote is referenced by now, or garbage."""
        if self._session is None:
            return
        try:
            with self.transaction() as conn:
                conn.execute("DELETE FROM gc_pins WHERE session = ?", (self._session,))
                conn.execute("DELETE FROM gc_sessions WHERE id = ?", (self._session,))
        except StoreError as e:  # gc drops them once this process is gone
            log.warning("cannot drop the gc pins of this process from %s: %s", self.path, e)
        self._session = None

    def close(self) -> None:
        """Commits what is pending; the first call does it, later calls do nothing."""
        with self._pending_lock:
            self._stopping = True
            self._flush_wanted.notify_all()
            flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.join()
        try:
            with self._pending_lock:
                pending = bool(self._pending) and not self._closed
            if pending:  # a reader (a mount) closes without taking the write lock
                with self.transaction():
                    pass
            self._end_session()
        finally:
            with self._pending_lock, self._pool_lock:
                self._closed = True
                self._pending.clear()
                self._pending_bytes = 0
                idle, self._idle = list(self._idle), deque()
            for conn in idle:
                conn.close()
