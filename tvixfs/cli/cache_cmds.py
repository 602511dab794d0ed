"""``tvixfs cache stats|clear|fsck DIR``, and the ``--disk-cache`` options of mount and daemon."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from tvixfs.cli.app import app, fail
from tvixfs.maintenance.cachefsck import check_cache
from tvixfs.services.base import Store
from tvixfs.services.cache.diskcache import INDEX_NAME, DiskCache, with_disk_cache
from tvixfs.services.errors import StoreUnavailableError
from tvixfs.services.url import default_store_url
from tvixfs.systemd import Notifier

log = logging.getLogger(__name__)

DiskCacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--disk-cache",
        envvar="TVIXFS_DISK_CACHE",
        help="Keep what a remote store sends in this directory (verified, bounded, shared by "
        "several processes) and serve from it, also while the store is unreachable. Not used "
        "for local:// and memory:// stores.",
        show_default=False,
    ),
]
DiskCacheSizeOpt = Annotated[
    str,
    typer.Option(
        "--disk-cache-size",
        envvar="TVIXFS_DISK_CACHE_SIZE",
        help="Most the disk cache may hold, e.g. 500M, 10G.",
    ),
]

cache_app = typer.Typer(help="Inspect, check or empty a disk cache directory.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

CacheDirArg = Annotated[Path, typer.Argument(help="The --disk-cache directory.", show_default=False)]


def disk_cached(
    store: Store, directory: Path | None, size: int, urls: tuple[str | None, ...]
) -> tuple[Store, DiskCache | None]:
    """``store`` behind the disk cache in ``directory`` if one is given and any of the store's
    ``urls`` (None: the default) is remote; else as it is. Fails with one clear line."""
    if directory is None:
        return store, None
    if not any((url or default_store_url()).startswith("grpc+") for url in urls):
        log.info("not using the disk cache %s: the store is not remote", directory)
        return store, None
    try:
        cached, cache = with_disk_cache(store, directory, size)
    except Exception as e:  # sqlite3 errors, OSError: either way the directory is unusable
        store.close()
        fail(f"cannot open the disk cache {directory}: {e}")
    cache.state.on_change = Notifier().status  # going offline and back shows in STATUS= at once
    return cached, cache


def probe_or_offline(store: Store, cache: DiskCache | None, probe: Callable[[Store], None]) -> None:
    """``probe(store)``; an unreachable store is no error when the disk cache holds data."""
    try:
        probe(store)
    except StoreUnavailableError as e:
        if cache is None or not cache.holds_data():
            raise
        log.warning("starting offline: %s; serving what the disk cache holds", e)


def _open_existing(directory: Path) -> DiskCache:
    if not (directory / INDEX_NAME).is_file():
        fail(f"{directory} is not a tvixfs disk cache (no {INDEX_NAME})")
    try:
        return DiskCache(directory, size=1 << 62)
    except Exception as e:
        fail(f"cannot open the disk cache {directory}: {e}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@cache_app.command()
def stats(directory: CacheDirArg) -> None:
    """Size and entries of a disk cache, and the hit ratio of each process using it."""
    cache = _open_existing(directory)
    try:
        found = cache.index.stats()
    finally:
        cache.close()
    print(f"size: {_mib(found.bytes)} ({found.bytes} bytes)")
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(found.entries.items())) or "none"
    print(f"entries: {sum(found.entries.values())} ({kinds})")
    for user in found.users:
        ratio = "n/a" if user.hit_ratio is None else f"{100 * user.hit_ratio:.1f}%"
        state = "offline" if user.offline else "online"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(user.started))
        print(
            f"process {user.pid} (since {since}, limit {_mib(user.quota)}, store {state}): "
            f"{user.hits} hits, {user.misses} misses, hit ratio {ratio}"
        )
    if not found.users:
        print("no process is using it")


@cache_app.command()
def clear(directory: CacheDirArg) -> None:
    """Remove every entry of a disk cache (a mount using it fetches them again)."""
    cache = _open_existing(directory)
    try:
        removed = cache.index.clear()
    finally:
        cache.close()
    print(f"removed {removed} entries")


@cache_app.command()
def fsck(directory: CacheDirArg) -> None:
    """Verify every entry of a disk cache against its digest; drop damaged entries and stray files.

    Exit status: 0 clean, 1 problems found (and dropped), 2 not a cache.
    """
    if not (directory / INDEX_NAME).is_file():
        fail(f"{directory} is not a tvixfs disk cache (no {INDEX_NAME})", code=2)
    try:
        result = check_cache(directory, report=print)
    except Exception as e:
        fail(f"cannot check {directory}: {e}", code=2)
    print(result.summary())
    if not result.clean:
        raise typer.Exit(1)
