"""Checking a disk cache directory: every entry against its digest or rules, files against rows.

A cache holds nothing that cannot be fetched again, so what is wrong is dropped, not repaired:
a damaged entry, a file no row accounts for, a usage counter that disagrees with the rows.
Entries being written right now (not ready) are left alone, so it is safe beside a mount.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tvixfs.castore.errors import ValidationError
from tvixfs.services.backends.chunkfiles import TEMP_MARK
from tvixfs.services.cache.cacheindex import CHUNK, CHUNK_LIST, DIRECTORY, PATH_INFO
from tvixfs.services.cache.diskcache import DiskCache, decode_chunks, directory_from, pathinfo_from
from tvixfs.services.errors import CorruptDataError


@dataclass
class CacheCheck:
    entries: int = 0
    dropped: int = 0
    orphans: int = 0

    @property
    def clean(self) -> bool:
        return not (self.dropped or self.orphans)

    def summary(self) -> str:
        return (
            f"{self.entries} entries checked, {self.dropped} damaged dropped, "
            f"{self.orphans} stray files removed"
        )


def _check_row(cache: DiskCache, kind: str, key: bytes, size: int, data: bytes | None) -> None:
    """Raises CorruptDataError or ValidationError if the entry is not what its key says."""
    if kind == CHUNK:
        cache.files.read(key, size)
    elif data is None:
        raise ValidationError("no data")
    elif kind == DIRECTORY:
        directory_from(data, key)
    elif kind == CHUNK_LIST:
        decode_chunks(data)
    elif kind == PATH_INFO:
        pathinfo_from(data, key)
    else:
        raise ValidationError(f"unknown kind {kind!r}")


def check_cache(directory: Path, report: Callable[[str], None]) -> CacheCheck:
    """Check (and clean) the cache in ``directory``; ``report`` gets one line per problem."""
    if not (directory / "index.sqlite").is_file():
        raise FileNotFoundError(f"{directory} is not a tvixfs disk cache (no index.sqlite)")
    cache = DiskCache(directory, size=1 << 62)
    result = CacheCheck()
    try:
        known: set[bytes] = set()
        for kind, key, size, ready, data in cache.index.rows():
            if kind == CHUNK:
                known.add(key)
            if not ready:
                continue
            result.entries += 1
            try:
                _check_row(cache, kind, key, size, data)
            except (CorruptDataError, ValidationError) as e:
                report(f"damaged {kind} entry {key.hex()}: {e}; dropped")
                cache.index.drop(kind, key)
                result.dropped += 1
        for fan_out in cache.files.layout():
            for name in os.listdir(fan_out):
                if TEMP_MARK in name:
                    continue  # a writer's, or swept once old (DiskCache's open)
                try:
                    digest = bytes.fromhex(name)
                except ValueError:
                    digest = b""
                if digest not in known:
                    report(f"stray file {fan_out / name}: no index entry; removed")
                    (fan_out / name).unlink(missing_ok=True)
                    result.orphans += 1
        recorded, actual = cache.index.recount()
        if recorded != actual:
            report(f"usage counter said {recorded} bytes, the entries add up to {actual}; corrected")
    finally:
        cache.close()
    return result
