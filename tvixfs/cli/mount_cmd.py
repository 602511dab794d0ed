"""``tvixfs mount``: serve a store as a read-only Nix store over FUSE, in the foreground."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from tvixfs.allocator import tune_malloc
from tvixfs.castore.errors import ValidationError
from tvixfs.cli.app import (
    BlobAddrOpt,
    DirAddrOpt,
    PathInfoAddrOpt,
    StoreOpt,
    app,
    fail,
    open_store_or_fail,
)
from tvixfs.cli.cache_cmds import DiskCacheOpt, DiskCacheSizeOpt, disk_cached, probe_or_offline
from tvixfs.fs.bridge import DEFAULT_THREADS
from tvixfs.fs.directories import CACHE_ENTRIES
from tvixfs.fs.inodes import DEFAULT_MAX_INODES
from tvixfs.fs.mount import MountConfig, run_mount
from tvixfs.fs.ops import FsOptions
from tvixfs.fs.preflight import MountError, check_fuse_device, check_mountpoint, probe_store
from tvixfs.services.errors import StoreError
from tvixfs.services.url import default_store_url

_SIZE = re.compile(r"(\d+)([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``512KiB``, ``1048576``: bytes, with binary (1024) multiples."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional K, M, G or T")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


@app.command()
def mount(
    mountpoint: Annotated[Path, typer.Argument(help="An empty directory to mount on.", show_default=False)],
    *,
    store: StoreOpt = None,
    blob_service_addr: BlobAddrOpt = None,
    directory_service_addr: DirAddrOpt = None,
    path_info_service_addr: PathInfoAddrOpt = None,
    list_root: Annotated[
        bool, typer.Option("--list-root", help="Let readdir of the mount root list every store path.")
    ] = False,
    allow_other: Annotated[
        bool, typer.Option("--allow-other", help="Let users other than the mounting one in.")
    ] = False,
    show_xattr: Annotated[
        bool,
        typer.Option(
            "--show-xattr/--no-show-xattr",
            help="Expose digests, store path and NAR hash as user.* extended attributes.",
        ),
    ] = True,
    cache_size: Annotated[
        str, typer.Option("--cache-size", help="Memory for file content chunks, e.g. 256M, 1G.")
    ] = "256M",
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="Concurrent requests to the store.")
    ] = DEFAULT_THREADS,
    max_inodes: Annotated[
        int,
        typer.Option(
            "--max-inodes",
            min=1,
            help="Inodes the kernel may hold before the least recently used are dropped.",
        ),
    ] = DEFAULT_MAX_INODES,
    directory_cache: Annotated[
        int,
        typer.Option("--directory-cache", min=1, help="Directory entries kept in memory (all directories)."),
    ] = CACHE_ENTRIES,
    prefetch_references: Annotated[
        bool,
        typer.Option(
            "--prefetch-references/--no-prefetch-references",
            help="On the first lookup of a store path, fetch the path infos of its references.",
        ),
    ] = True,
    prefetch_siblings: Annotated[
        bool,
        typer.Option(
            "--prefetch-siblings/--no-prefetch-siblings",
            help="When a small file is opened cold, fetch the small files of its kind next to it.",
        ),
    ] = True,
    debug_fuse: Annotated[
        bool, typer.Option("--debug-fuse", help="Log every FUSE request (libfuse debug output).")
    ] = False,
    disk_cache: DiskCacheOpt = None,
    disk_cache_size: DiskCacheSizeOpt = "10G",
) -> None:
    """Mount a store read-only on MOUNTPOINT and serve it until unmounted or stopped.

    Runs in the foreground; a systemd Type=notify service (READY=1 once the mount answers).
    SIGINT/SIGTERM or an external umount end it with exit status 0.
    """
    tune_malloc()
    try:
        cache_bytes = parse_size(cache_size)
    except ValueError as e:
        fail(f"--cache-size: {e}")
    try:
        disk_bytes = parse_size(disk_cache_size)
    except ValueError as e:
        fail(f"--disk-cache-size: {e}")
    try:
        check_fuse_device()
        absolute = check_mountpoint(mountpoint)
    except MountError as e:
        fail(str(e))
    opened = open_store_or_fail(store, blob_service_addr, directory_service_addr, path_info_service_addr)
    urls = (store, blob_service_addr, directory_service_addr, path_info_service_addr)
    opened, cache = disk_cached(opened, disk_cache, disk_bytes, urls)
    try:
        try:
            probe_or_offline(opened, cache, probe_store)
        except (StoreError, ValidationError, OSError) as e:
            fail(f"cannot reach the store: {e}")
        options = FsOptions(
            list_root=list_root,
            show_xattr=show_xattr,
            cache_bytes=cache_bytes,
            threads=threads,
            max_inodes=max_inodes,
            directory_cache_entries=directory_cache,
            prefetch_references=prefetch_references,
            prefetch_siblings=prefetch_siblings,
        )
        config = MountConfig(
            absolute,
            options,
            allow_other=allow_other,
            debug_fuse=debug_fuse,
            status_note=None if cache is None else cache.state.describe,
        )
        try:
            run_mount(opened, config, store or default_store_url())
        except MountError as e:
            fail(str(e))
    finally:
        opened.close()
