"""Access profiles on disk: what a store path's start needed, in the order first needed.

A profile is a list of entries: chunks read (digest and size), and files of several chunks
opened, whose chunk list the open needed (digest and size of the whole file). One file per
store path, named by the store path's basename, in a directory of its own (the mount's
``--access-profiles``, by default ``profiles/`` of its ``--disk-cache``). It names content,
never holds it: clearing or evicting the disk cache leaves the profiles, and a profile copied to
another machine tells that machine's mount what to fetch ahead on its first cold start.

Format: ``MAGIC``, then one ``RECORD`` (kind, digest, size) per entry, then the BLAKE3 digest
of everything before it. Written to a temporary name, synced and renamed, so a crash leaves the
old profile or the new one; one that does not check out (truncated, damaged, foreign) is
ignored with a warning. Bounded: at most ``MAX_ENTRIES`` entries, chunks of ``MAX_BYTES``
together, per profile; ``PROFILES`` profiles per directory (the least recently written go
first).

Blocking file I/O: called from worker threads.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from tvixfs.castore.digest import DIGEST_SIZE, b3digest
from tvixfs.castore.errors import ValidationError
from tvixfs.services.base import ChunkMeta
from tvixfs.store.storepath import StorePath

log = logging.getLogger(__name__)

PROFILES_NAME = "profiles"  # the directory of profiles in a --disk-cache directory
MAGIC = b"tvixfs access profile 2\n"
RECORD = struct.Struct(f">B{DIGEST_SIZE}sQ")
MAX_ENTRIES = 4096
MAX_BYTES = 64 << 20
PROFILES = 1024
TEMP_MARK = ".tmp-"
# A temporary file this old is a crashed writer's, removed by the next write.
STALE_TEMP = 3600.0


class ProfileError(ValueError):
    """A profile file that does not check out."""


class Kind(IntEnum):
    CHUNK = 0  # a chunk read: fetched ahead
    CHUNK_LIST = 1  # a file of several chunks opened: its chunk list fetched ahead


@dataclass(frozen=True, slots=True)
class Entry:
    kind: Kind
    digest: bytes
    size: int

    @property
    def chunk(self) -> ChunkMeta:
        return ChunkMeta(self.digest, self.size)


def encode(entries: Sequence[Entry]) -> bytes:
    body = MAGIC + b"".join(RECORD.pack(e.kind, e.digest, e.size) for e in entries)
    return body + b3digest(body)


def decode(data: bytes) -> list[Entry]:
    """The entries of a profile file's bytes; ProfileError unless they check out."""
    if not data.startswith(MAGIC):
        raise ProfileError("not an access profile")
    body, digest = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
    records = len(body) - len(MAGIC)
    if records < 0 or records % RECORD.size or b3digest(body) != digest:
        raise ProfileError("truncated or damaged")
    if records // RECORD.size > MAX_ENTRIES:
        raise ProfileError(f"more than {MAX_ENTRIES} entries")
    kinds = set(Kind)
    entries: list[Entry] = []
    for kind, digest, size in RECORD.iter_unpack(body[len(MAGIC) :]):
        if kind not in kinds:
            raise ProfileError(f"unknown entry kind {kind}")
        entries.append(Entry(Kind(kind), digest, size))
    if sum(e.size for e in entries if e.kind == Kind.CHUNK) > MAX_BYTES:
        raise ProfileError(f"more than {MAX_BYTES} bytes of chunks")
    return entries


def file_name(store_path: bytes) -> str | None:
    """The profile file's name for a store path basename; None for one that is not valid."""
    try:
        return StorePath.from_basename(store_path).basename
    except (ValidationError, UnicodeDecodeError):
        return None


class ProfileFiles:
    """The profiles of one directory (created on the first write)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, store_path: bytes) -> list[Entry] | None:
        """The store path's profile, or None if it has none or a bad one (logged)."""
        name = file_name(store_path)
        if name is None:
            return None
        path = self.directory / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("access profile %s not read: %s", path, e)
            return None
        try:
            return decode(data)
        except ProfileError as e:
            log.warning("access profile %s ignored: %s", path, e)
            return None

    def save(self, store_path: bytes, entries: Sequence[Entry]) -> None:
        """Replace the store path's profile; a failure is logged, never raised."""
        name = file_name(store_path)
        if name is None or not entries:
            return
        temp = self.directory / f"{name}{TEMP_MARK}{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with temp.open("wb") as f:
                f.write(encode(entries[:MAX_ENTRIES]))
                f.flush()
                os.fsync(f.fileno())
            temp.replace(self.directory / name)
            self._trim()
        except OSError as e:
            log.warning("access profile of %s not written to %s: %s", name, self.directory, e)
            temp.unlink(missing_ok=True)

    def _trim(self) -> None:
        """Keep at most PROFILES profiles; drop crashed writers' temporary files."""
        now = time.time()
        profiles: list[tuple[float, Path]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    modified = entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if TEMP_MARK in entry.name:
                    if now - modified > STALE_TEMP:
                        Path(entry.path).unlink(missing_ok=True)
                    continue
                profiles.append((modified, Path(entry.path)))
        profiles.sort()
        for _, path in profiles[: max(len(profiles) - PROFILES, 0)]:
            path.unlink(missing_ok=True)
