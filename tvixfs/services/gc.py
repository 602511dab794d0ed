"""Garbage collection of the embedded store: mark from path infos and pins, sweep the rest.

Live data is what a path info's root node reaches (its directory closure, the files' blobs
and their chunks) plus what a live writer has pinned (gcguard.py). Everything else is
garbage: blobs and directories of killed imports or deleted paths, and chunk files no kept
blob lists. The sweep removes rows first, in one transaction, then files: a crash in between
leaves only chunk files nothing refers to, which the next gc removes.

gc holds the gc lock exclusively while it marks and sweeps, so no put is between writing a
chunk file and committing its blob, and writers wait until it is done. Readers (mounts) are
never blocked: they only read what path infos reach, which stays.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tvixfs.castore.directory import Directory
from tvixfs.castore.errors import ValidationError
from tvixfs.castore.nodes import DirectoryNode, FileNode, node_from_proto
from tvixfs.protos import pathinfo_pb2
from tvixfs.services.chunkfiles import TEMP_MARK, ChunkFiles
from tvixfs.services.errors import CorruptDataError, StoreError
from tvixfs.services.gcguard import PIN_LEASE, has_pin_tables, lock_exclusive, owner_alive
from tvixfs.services.localdb import LocalBackend, unpack_chunks
from tvixfs.store.pathinfo import validate_pathinfo
from tvixfs.store.storepath import StorePath

_DELETE_BATCH = 500


@dataclass
class GcPlan:
    """What a sweep removes now: rows by digest, chunk files by path, and their bytes."""

    blobs: list[bytes] = field(default_factory=list)
    directories: list[bytes] = field(default_factory=list)
    chunk_files: list[Path] = field(default_factory=list)
    chunk_bytes: int = 0
    dead_sessions: list[int] = field(default_factory=list)
    # Damage that hides what is live (an undecodable path info, directory or chunk list):
    # gc then removes nothing, fsck reports it.
    damage: list[str] = field(default_factory=list)

    def counts(self) -> str:
        return (
            f"{len(self.blobs)} blobs, {len(self.directories)} directories, "
            f"{len(self.chunk_files)} chunk files ({_mib(self.chunk_bytes)})"
        )


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def plan_collection(backend: LocalBackend) -> GcPlan:
    """Mark and find the garbage, changing nothing; exact only while the gc lock is held."""
    damage: list[str] = []
    with backend.connection() as conn:
        conn.execute("BEGIN")  # one snapshot of all tables
        try:
            roots, dead = _roots(conn, damage)
            blob_rows = {bytes(d): bytes(c) for d, c in conn.execute("SELECT digest, chunks FROM blobs")}
            dir_rows = {bytes(d): bytes(v) for d, v in conn.execute("SELECT digest, data FROM directories")}
        finally:
            conn.execute("COMMIT")
    live_dirs, live_blobs = _mark(roots, dir_rows, damage)
    plan = GcPlan(
        blobs=[d for d in blob_rows if d not in live_blobs],
        directories=[d for d in dir_rows if d not in live_dirs],
        dead_sessions=dead,
        damage=damage,
    )
    # A blob of one chunk is that chunk: kept by its digest even if its row is gone (damage).
    live_chunks = set(live_blobs)
    for digest in live_blobs:
        try:
            live_chunks.update(c.digest for c in unpack_chunks(blob_rows.get(digest, b"")))
        except CorruptDataError:
            damage.append(f"the chunk list of blob {digest.hex()} is damaged")
    for path, size in _chunk_files(backend.chunks, live_chunks):
        plan.chunk_files.append(path)
        plan.chunk_bytes += size
    return plan


def _roots(conn: sqlite3.Connection, damage: list[str]) -> tuple[set[bytes], list[int]]:
    """Digests every path info's root node names, and live sessions' fresh pins; dead sessions."""
    roots: set[bytes] = set()
    for key, data in conn.execute("SELECT hash, data FROM pathinfos"):
        info = pathinfo_pb2.PathInfo()
        try:
            info.ParseFromString(bytes(data))
            node = node_from_proto(info.node)
        except Exception:  # protobuf's DecodeError is not part of its typed API
            damage.append(f"path info {bytes(key).hex()} is undecodable")
            continue
        if isinstance(node, DirectoryNode | FileNode):
            roots.add(node.digest)
    dead: list[int] = []
    if has_pin_tables(conn):
        fresh = time.time() - PIN_LEASE
        for session, owner in conn.execute("SELECT id, owner FROM gc_sessions").fetchall():
            if not owner_alive(owner):
                dead.append(session)
                continue
            roots.update(
                bytes(d)
                for (d,) in conn.execute(
                    "SELECT digest FROM gc_pins WHERE session = ? AND time >= ?", (session, fresh)
                )
            )
    return roots, dead


def _mark(
    roots: set[bytes], dir_rows: dict[bytes, bytes], damage: list[str]
) -> tuple[set[bytes], set[bytes]]:
    """Directories and blobs reachable from ``roots`` (a root may name either)."""
    live_dirs: set[bytes] = set()
    live_blobs = set(roots)
    stack = [d for d in roots if d in dir_rows]
    while stack:
        digest = stack.pop()
        if digest in live_dirs:
            continue
        live_dirs.add(digest)
        try:
            directory = Directory.from_bytes(dir_rows[digest])
        except ValidationError:
            damage.append(f"directory {digest.hex()} is undecodable")
            continue
        live_blobs.update(f.digest for f in directory.files)
        stack.extend(d.digest for d in directory.directories if d.digest in dir_rows)
    return live_dirs, live_blobs


def _chunk_files(chunks: ChunkFiles, live: set[bytes]) -> Iterable[tuple[Path, int]]:
    """Chunk files no live blob lists, and temporary files, with their sizes."""
    for directory in chunks.layout():
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.name
            if TEMP_MARK not in name:
                if len(name) != 64 or name[:2] != directory.name:
                    continue  # not ours: fsck reports stray files, gc leaves them
                try:
                    if bytes.fromhex(name) in live:
                        continue
                except ValueError:
                    continue
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            yield Path(entry.path), size


def collect_garbage(path: Path, dry_run: bool, waiting: Callable[[], None]) -> GcPlan:
    """Sweep the store at ``path`` (or only plan it, with ``dry_run``); returns what went."""
    backend = LocalBackend(path, create=False)
    try:
        lock = lock_exclusive(path, waiting)
        try:
            plan = plan_collection(backend)
            if plan.damage:
                more = f" (and {len(plan.damage) - 1} more)" if len(plan.damage) > 1 else ""
                raise CorruptDataError(
                    f"{plan.damage[0]}{more}, so what is live cannot be told: nothing removed; "
                    "run tvixfs fsck"
                )
            if not dry_run:
                _sweep(backend, plan)
        finally:
            os.close(lock)
    finally:
        backend.close()
    return plan


def _sweep(backend: LocalBackend, plan: GcPlan) -> None:
    with backend.transaction() as conn:
        for table, digests in (("blobs", plan.blobs), ("directories", plan.directories)):
            for start in range(0, len(digests), _DELETE_BATCH):
                batch = digests[start : start + _DELETE_BATCH]
                conn.execute(f"DELETE FROM {table} WHERE digest IN ({', '.join('?' * len(batch))})", batch)
        gone = {*plan.blobs, *plan.directories}
        conn.executemany(
            "DELETE FROM nar_cache WHERE node = ?",
            [(node,) for (node,) in conn.execute("SELECT node FROM nar_cache") if bytes(node)[1:] in gone],
        )
        if has_pin_tables(conn):  # expired pins count no more: rows a daemon would pile up
            conn.execute("DELETE FROM gc_pins WHERE time < ?", (time.time() - PIN_LEASE,))
        if plan.dead_sessions:
            conn.executemany("DELETE FROM gc_pins WHERE session = ?", [(s,) for s in plan.dead_sessions])
            conn.executemany("DELETE FROM gc_sessions WHERE id = ?", [(s,) for s in plan.dead_sessions])
    for chunk in plan.chunk_files:
        chunk.unlink(missing_ok=True)


class DeleteRefusedError(StoreError):
    """Some paths of a delete cannot go; ``reasons`` has one line for each, nothing was deleted."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def delete_paths(path: Path, store_paths: Iterable[StorePath]) -> list[StorePath]:
    """Remove the path infos of ``store_paths``, all or none; their data goes at the next gc.

    As ``nix-store --delete``, refused for a path that another path refers to, unless that
    one is deleted too (a path's reference to itself does not count), and for a path not in
    the store. One transaction: a concurrent import cannot add a referrer halfway.
    """
    wanted = list(dict.fromkeys(store_paths))
    digests = {p.digest for p in wanted}
    backend = LocalBackend(path, create=False)
    try:
        with backend.transaction() as conn:
            present: set[StorePath] = set()
            referrers: dict[bytes, list[StorePath]] = {}
            for key, data in conn.execute("SELECT hash, data FROM pathinfos").fetchall():
                info = pathinfo_pb2.PathInfo()
                try:
                    info.ParseFromString(bytes(data))
                    referrer, _ = validate_pathinfo(info)
                except Exception as e:  # protobuf's DecodeError is not part of its typed API
                    raise CorruptDataError(f"stored path info {bytes(key).hex()} is invalid: {e}") from None
                present.add(referrer)
                for ref in info.references:
                    if ref != referrer.digest and referrer.digest not in digests:
                        referrers.setdefault(bytes(ref), []).append(referrer)
            reasons = []
            for store_path in wanted:
                if store_path not in present:
                    reasons.append(f"cannot delete {store_path}: not in the store")
                elif by := referrers.get(store_path.digest):
                    reasons.append(
                        f"cannot delete {store_path}: still referenced by {min(by, key=str)}"
                        + (f" (and {len(by) - 1} more)" if len(by) > 1 else "")
                    )
            if reasons:
                raise DeleteRefusedError(reasons)
            conn.executemany("DELETE FROM pathinfos WHERE hash = ?", [(d,) for d in digests])
    finally:
        backend.close()
    return wanted
