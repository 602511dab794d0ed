"""Uploaded NARs waiting for their narinfo: a small SQLite table with an expiry.

Nix uploads a path in two requests: the NAR (named by the hash of the file as sent, maybe
compressed), then the narinfo that names the store path and points at that file. The NAR is
ingested into the castore as it arrives; its root node is kept here, keyed by the file hash,
until the narinfo turns it into a PathInfo.

Why a file and not the store: the tvix protocol has no mutable, deletable record. A castore
blob cannot be found by a key the narinfo knows, and a PathInfo would show up as a store path
in every mount and could never expire. So the table lives next to the store: for an embedded
store inside its directory (every bridge on that store shares it, and it survives restarts);
for other stores in a file the bridges are given (``--pending-db``), which bridges behind one
load balancer must share (e.g. on a shared file system) or pin each client to one bridge.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tvixfs.castore.nodes import Node, node_from_proto, node_to_proto
from tvixfs.protos import castore_pb2

# Nix sends the narinfo right after the NAR; a day leaves room for retries and slow clients.
DEFAULT_EXPIRY = 24 * 3600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_nar (
    file_sha256 BLOB PRIMARY KEY,
    file_size INTEGER NOT NULL,
    nar_sha256 BLOB NOT NULL,
    nar_size INTEGER NOT NULL,
    root BLOB NOT NULL,
    expires REAL NOT NULL
)
"""


@dataclass(frozen=True)
class PendingNar:
    file_sha256: bytes
    file_size: int
    nar_sha256: bytes
    nar_size: int
    root: Node  # named as the NAR parser names a root (empty); renamed when it becomes a path


class PendingTable:
    """Thread-safe; several processes may share the file (SQLite WAL, busy timeout)."""

    def __init__(self, path: Path, expiry: float = DEFAULT_EXPIRY) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._expiry = expiry
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def add(self, nar: PendingNar) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM pending_nar WHERE expires < ?", (now,))
            self._db.execute(
                "INSERT OR REPLACE INTO pending_nar VALUES (?, ?, ?, ?, ?, ?)",
                (
                    nar.file_sha256,
                    nar.file_size,
                    nar.nar_sha256,
                    nar.nar_size,
                    node_to_proto(nar.root).SerializeToString(),
                    now + self._expiry,
                ),
            )

    def get(self, file_sha256: bytes) -> PendingNar | None:
        """The unexpired upload with this file hash, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT file_size, nar_sha256, nar_size, root FROM pending_nar "
                "WHERE file_sha256 = ? AND expires >= ?",
                (file_sha256, time.time()),
            ).fetchone()
        if row is None:
            return None
        root = node_from_proto(castore_pb2.Node.FromString(row[3]))
        return PendingNar(file_sha256, row[0], row[1], row[2], root)

    def close(self) -> None:
        with self._lock:
            self._db.close()
