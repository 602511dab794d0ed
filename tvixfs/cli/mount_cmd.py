"""``tvixfs mount``: serve a store as a read-only Nix store over FUSE, in the foreground."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from tvixfs import defaults
from tvixfs.allocator import tune_malloc
from tvixfs.castore.errors import ValidationError
from tvixfs.cli.app import StoreOptions, app, describe, fail, log, store_options
from tvixfs.cli.cache_cmds import DiskCacheOpt, DiskCacheSizeOpt, disk_cached, probe_or_offline
from tvixfs.cli.metrics_opts import MetricsListenOpt, start_metrics
from tvixfs.errors import UserError
from tvixfs.fs.mount import MountConfig, run_mount
from tvixfs.fs.ops import FsOptions
from tvixfs.fs.preflight import check_fuse_device, check_mountpoint, probe_store
from tvixfs.services.cache.accessprofiles import PROFILES_NAME
from tvixfs.services.cache.cachemetrics import watch_disk_cache
from tvixfs.services.meteredstore import metered
from tvixfs.services.s3url import redacted
from tvixfs.services.trust import load_public_keys
from tvixfs.services.url import default_store_url, tls_problem

_SIZE = re.compile(r"(\d+)([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``512KiB``, ``1048576``: bytes, with binary (1024) multiples."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional K, M, G or T")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _profiles_directory(given: Path | None, disk_cache: Path | None) -> Path | None:
    """Where access profiles are kept: as given, else beside the disk cache in use, if any."""
    directory = given if given is not None else None if disk_cache is None else disk_cache / PROFILES_NAME
    if directory is not None and directory.exists() and not directory.is_dir():
        fail(f"--access-profiles: {directory} is not a directory")
    return None if directory is None else directory.absolute()


@app.command()
@store_options()
def mount(
    mountpoint: Annotated[
        Path, typer.Argument(help="An empty directory to mount on.", show_default=False, metavar="MOUNTPOINT")
    ],
    *,
    where: StoreOptions,
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
    ] = defaults.CACHE_SIZE,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="Concurrent requests to the store.")
    ] = defaults.THREADS,
    max_inodes: Annotated[
        int,
        typer.Option(
            "--max-inodes",
            min=1,
            help="Inodes the kernel may hold before the least recently used are dropped.",
        ),
    ] = defaults.MAX_INODES,
    directory_cache: Annotated[
        int,
        typer.Option("--directory-cache", min=1, help="Directory entries kept in memory (all directories)."),
    ] = defaults.DIRECTORY_CACHE_ENTRIES,
    deadline: Annotated[
        float,
        typer.Option(
            "--deadline",
            min=0.001,
            help="Seconds a request may wait on the store before it fails with EIO.",
        ),
    ] = defaults.DEADLINE,
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
    access_profiles: Annotated[
        Path | None,
        typer.Option(
            "--access-profiles",
            help="Directory of access profiles: what each store path read as it started, "
            "fetched ahead on its next cold start (default: profiles/ in --disk-cache).",
            show_default=False,
        ),
    ] = None,
    debug_fuse: Annotated[
        bool, typer.Option("--debug-fuse", help="Log every FUSE request (libfuse debug output).")
    ] = False,
    disk_cache: DiskCacheOpt = None,
    disk_cache_size: DiskCacheSizeOpt = defaults.DISK_CACHE_SIZE,
    trusted_public_key: Annotated[
        list[str] | None,
        typer.Option(
            "--trusted-public-key",
            help="Show only store paths signed by this key, NAME:BASE64 (repeatable).",
            show_default=False,
        ),
    ] = None,
    trusted_public_keys_file: Annotated[
        list[str] | None,
        typer.Option(
            "--trusted-public-keys-file",
            help="A file of trusted public keys, NAME:BASE64 separated by whitespace (repeatable).",
            show_default=False,
        ),
    ] = None,
    verify_nar_hash: Annotated[
        bool,
        typer.Option(
            "--verify-nar-hash",
            help="Also show paths with only a Nix signature by a trusted key, once their NAR "
            "hash is checked (reads each such path once, at its first lookup).",
        ),
    ] = False,
    metrics_listen: MetricsListenOpt = None,
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
    if cache_bytes == 0:
        fail("--cache-size 0: the chunk cache needs room for at least one chunk")
    try:
        disk_bytes = parse_size(disk_cache_size)
    except ValueError as e:
        fail(f"--disk-cache-size: {e}")
    try:
        trusted_keys = load_public_keys(trusted_public_key, trusted_public_keys_file)
    except ValidationError as e:
        fail(str(e))
    if verify_nar_hash and not trusted_keys:
        fail("--verify-nar-hash needs --trusted-public-key or --trusted-public-keys-file")
    check_fuse_device()
    absolute = check_mountpoint(mountpoint)
    endpoint = start_metrics(metrics_listen)
    metrics = None if endpoint is None else endpoint.metrics
    opened = where.open_store(create="never")
    if metrics is not None:
        opened = metered(opened, metrics)
    urls = (where.store, where.blob_service_addr, where.directory_service_addr, where.path_info_service_addr)
    opened, cache = disk_cached(opened, disk_cache, disk_bytes, urls)
    if metrics is not None and cache is not None:
        watch_disk_cache(metrics, cache)
    try:
        try:
            probe_or_offline(opened, cache, probe_store)
        except (UserError, OSError) as e:
            fail(f"cannot reach the store: {tls_problem(*urls) or describe(e)}")
        options = FsOptions(
            list_root=list_root,
            show_xattr=show_xattr,
            cache_bytes=cache_bytes,
            threads=threads,
            max_inodes=max_inodes,
            directory_cache_entries=directory_cache,
            prefetch_references=prefetch_references,
            trusted_keys=trusted_keys,
            verify_nar_hash=verify_nar_hash,
            deadline=deadline,
            prefetch_siblings=prefetch_siblings,
            access_profiles=_profiles_directory(access_profiles, None if cache is None else disk_cache),
        )
        if trusted_keys:
            log.info("showing only store paths signed by: %s", ", ".join(sorted(trusted_keys)))
        else:
            log.info("signatures are not checked: every store path in the store is shown")
        config = MountConfig(
            absolute,
            options,
            allow_other=allow_other,
            debug_fuse=debug_fuse,
            status_note=None if cache is None else cache.state.describe,
            metrics=metrics,
        )
        run_mount(opened, config, redacted(where.store or default_store_url()))
    finally:
        opened.close()
