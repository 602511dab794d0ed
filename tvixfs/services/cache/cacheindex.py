"""The SQLite index of a disk cache: what it holds, how big, when last used, and who uses it.

Every entry has a row: a chunk's row says where its file is (by digest) and how big it is; a
small entry (directory, chunk list, path info) keeps its bytes in the row itself. The total
size is kept in one counter row, updated in the same transaction as the rows, so the usage is
known at open without walking the directory.

Crash safety rests on one order: a chunk's row is inserted (``ready = 0``) before its file is
written and marked ready after the rename; an evicted row is deleted only after its file. So
the counter may overstate what is on disk after a crash, never understate it: a row whose file
is missing is dropped when read, and rows left not ready by a dead writer are swept at open.

Several processes may share one index (WAL mode, every change in one ``BEGIN IMMEDIATE``
transaction). Access times are batched in memory and written every ``FLUSH_INTERVAL`` seconds.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Seconds a row may stay not ready before a later open takes its writer for dead.
STALE_AFTER = 600.0
# Seconds between writes of batched access times and hit counters.
FLUSH_INTERVAL = 2.0
# Bytes a small entry's row is charged for on top of its data.
ROW_OVERHEAD = 64
EVICT_BATCH = 256
BUSY_TIMEOUT_MS = 30_000
WAL_LIMIT = 1 << 20

CHUNK = "chunk"  # kinds of entries; only chunks have files
DIRECTORY = "dir"
CHUNK_LIST = "list"
PATH_INFO = "info"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT NOT NULL,
    key BLOB NOT NULL,
    size INTEGER NOT NULL,
    atime REAL NOT NULL,
    ready INTEGER NOT NULL,
    data BLOB,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (ready, atime);
CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO usage VALUES (0, 0);
CREATE TABLE IF NOT EXISTS users (
    pid INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    updated REAL NOT NULL,
    hits INTEGER NOT NULL,
    misses INTEGER NOT NULL,
    offline INTEGER NOT NULL,
    quota INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class UserStats:
    """One process using the cache, as it last reported itself."""

    pid: int
    started: float
    updated: float
    hits: int
    misses: int
    offline: bool
    quota: int

    @property
    def hit_ratio(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


@dataclass(frozen=True)
class IndexStats:
    bytes: int
    entries: dict[str, int]
    users: list[UserStats]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheIndex:
    """Thread-safe (one connection behind a lock); ``remove_file(key)`` deletes a chunk file."""

    def __init__(self, path: Path, limit: int, remove_file: Callable[[bytes], None]) -> None:
        self.limit = limit
        self._remove_file = remove_file
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        # The WAL is checkpointed every ~4 MiB (1000 pages); truncated back to this afterwards,
        # so that it stays part of the documented slack rather than its high-water mark.
        self._db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        self._db.executescript(_SCHEMA)
        self._touched: dict[tuple[str, bytes], float] = {}
        self._last_flush = time.monotonic()
        self.hits = 0
        self.misses = 0
        self.offline = False
        self._started = time.time()
        self._registered = False
        self._sweep()

    # -- transactions ---------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _add_usage(self, delta: int) -> None:
        self._db.execute("UPDATE usage SET bytes = bytes + ? WHERE id = 0", (delta,))

    def usage(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT bytes FROM usage WHERE id = 0").fetchone()
        return int(row[0])

    def _sweep(self) -> None:
        """Drop rows a dead writer left not ready, and rows of processes that are gone."""
        cutoff = time.time() - STALE_AFTER
        with self._lock, self._transaction():
            stale = self._db.execute(
                "SELECT kind, key, size FROM entries WHERE ready = 0 AND atime < ?", (cutoff,)
            ).fetchall()
            self._delete(stale)
            users = [pid for (pid,) in self._db.execute("SELECT pid FROM users")]
            for pid in users:
                if not _alive(pid):
                    self._db.execute("DELETE FROM users WHERE pid = ?", (pid,))

    def _delete(self, rows: list[tuple[str, bytes, int]]) -> None:
        """Inside a transaction: files first, then rows (see the module docstring)."""
        for kind, key, size in rows:
            if kind == CHUNK:
                self._remove_file(key)
            self._db.execute("DELETE FROM entries WHERE kind = ? AND key = ?", (kind, key))
            self._add_usage(-size)

    # -- entries --------------------------------------------------------------------------

    def lookup(self, kind: str, key: bytes) -> tuple[int, bytes | None] | None:
        """(size, data) of a ready entry, or None; counts as a use for the LRU."""
        with self._lock:
            row = self._db.execute(
                "SELECT size, data FROM entries WHERE kind = ? AND key = ? AND ready = 1", (kind, key)
            ).fetchone()
            if row is not None:
                self._touched[(kind, key)] = time.time()
            self._maybe_flush()
        return None if row is None else (int(row[0]), row[1])

    def reserve(self, kind: str, key: bytes, size: int, data: bytes) -> bool:
        """Insert a small entry (its bytes in the row); False if present or too large to keep."""
        if size > self.limit // 2:
            return False
        with self._lock, self._transaction():
            if self._has(kind, key):
                return False
            self._make_room(size)
            self._db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, 1, ?)", (kind, key, size, time.time(), data)
            )
            self._add_usage(size)
        return True

    def reserve_chunks(self, chunks: list[tuple[bytes, int]]) -> list[bytes]:
        """Insert rows, not ready, for the chunks not present yet, as many as fit in half the
        limit; the digests reserved. The caller writes their files, then calls ``ready``."""
        with self._lock, self._transaction():
            fresh: list[tuple[bytes, int]] = []
            total = 0
            for key, size in chunks:
                if total + size > self.limit // 2:
                    continue
                if self._db.execute(
                    "SELECT 1 FROM entries WHERE kind = ? AND key = ?", (CHUNK, key)
                ).fetchone():
                    continue
                fresh.append((key, size))
                total += size
            if fresh:
                self._make_room(total)
                now = time.time()
                self._db.executemany(
                    "INSERT INTO entries VALUES (?, ?, ?, ?, 0, NULL)",
                    [(CHUNK, key, size, now) for key, size in fresh],
                )
                self._add_usage(total)
        return [key for key, _ in fresh]

    def _has(self, kind: str, key: bytes) -> bool:
        query = "SELECT 1 FROM entries WHERE kind = ? AND key = ?"
        return self._db.execute(query, (kind, key)).fetchone() is not None

    def _make_room(self, size: int) -> None:
        """Inside a transaction: if ``size`` more would pass the limit, evict down to half."""
        self._flush_touched()
        used = int(self._db.execute("SELECT bytes FROM usage WHERE id = 0").fetchone()[0])
        if used + size > self.limit:
            self._evict_to(self.limit // 2 - size)

    def _evict_to(self, target: int) -> None:
        """Inside a transaction: remove least recently used ready entries until usage <= target."""
        while True:
            used = int(self._db.execute("SELECT bytes FROM usage WHERE id = 0").fetchone()[0])
            if used <= target:
                return
            rows = self._db.execute(
                "SELECT kind, key, size FROM entries WHERE ready = 1 ORDER BY atime LIMIT ?", (EVICT_BATCH,)
            ).fetchall()
            if not rows:
                return
            freed = 0
            batch = []
            for row in rows:
                batch.append(row)
                freed += row[2]
                if used - freed <= target:
                    break
            self._delete(batch)

    def ready(self, kind: str, keys: list[bytes]) -> None:
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE entries SET ready = 1 WHERE kind = ? AND key = ?", [(kind, key) for key in keys]
            )

    def drop(self, kind: str, key: bytes) -> None:
        """Remove an entry (its file too) that turned out missing or damaged."""
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT kind, key, size FROM entries WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
            if row is not None:
                self._delete([row])
            self._touched.pop((kind, key), None)

    def rows(self) -> list[tuple[str, bytes, int, bool, bytes | None]]:
        """Every entry: (kind, key, size, ready, data), for fsck."""
        with self._lock:
            return [
                (kind, key, size, bool(ready), data)
                for kind, key, size, ready, data in self._db.execute(
                    "SELECT kind, key, size, ready, data FROM entries"
                )
            ]

    def recount(self) -> tuple[int, int]:
        """Set the usage counter to the sum of the rows; (recorded, actual) before the fix."""
        with self._lock, self._transaction():
            recorded = int(self._db.execute("SELECT bytes FROM usage WHERE id = 0").fetchone()[0])
            actual = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0])
            self._db.execute("UPDATE usage SET bytes = ? WHERE id = 0", (actual,))
        return recorded, actual

    def clear(self) -> int:
        """Remove every entry; the number removed."""
        with self._lock, self._transaction():
            rows = self._db.execute("SELECT kind, key, size FROM entries").fetchall()
            self._delete(rows)
            self._db.execute("UPDATE usage SET bytes = 0 WHERE id = 0")
        return len(rows)

    # -- usage reports --------------------------------------------------------------------

    def count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= FLUSH_INTERVAL:
            with self._transaction():
                self._flush_touched()

    def _flush_touched(self) -> None:
        """Inside a transaction: write batched access times and this process's counters."""
        self._last_flush = time.monotonic()
        touched, self._touched = self._touched, {}
        self._db.executemany(
            "UPDATE entries SET atime = MAX(atime, ?) WHERE kind = ? AND key = ?",
            [(t, kind, key) for (kind, key), t in touched.items()],
        )
        if self._registered or self.hits or self.misses:
            self._registered = True
            self._db.execute(
                "INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    os.getpid(),
                    self._started,
                    time.time(),
                    self.hits,
                    self.misses,
                    int(self.offline),
                    self.limit,
                ),
            )

    def flush(self) -> None:
        with self._lock, self._transaction():
            self._flush_touched()

    def stats(self) -> IndexStats:
        with self._lock:
            used = int(self._db.execute("SELECT bytes FROM usage WHERE id = 0").fetchone()[0])
            entries = dict(self._db.execute("SELECT kind, COUNT(*) FROM entries GROUP BY kind").fetchall())
            users = [UserStats(*row) for row in self._db.execute("SELECT * FROM users ORDER BY pid")]
        return IndexStats(used, entries, [u for u in users if _alive(u.pid)])

    def close(self) -> None:
        with self._lock:
            with self._transaction():
                self._flush_touched()
                if self._registered:
                    self._db.execute("DELETE FROM users WHERE pid = ?", (os.getpid(),))
            self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception): the write lock up front,
    so two processes never both read the usage and then both add to it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
