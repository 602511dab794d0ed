"""Checks run before mounting, so that a mount that cannot work fails with one clear line
instead of a libfuse message, a dead mount, or a daemon that reports ready and then hangs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tvixfs.castore.digest import EMPTY_DIGEST
from tvixfs.services.base import Store

FUSE_DEVICE = "/dev/fuse"
MOUNTINFO = "/proc/self/mountinfo"


class MountError(Exception):
    """Mounting cannot start or did not come up; the message is the whole story for a user."""


def check_fuse_device() -> None:
    try:
        mode = os.stat(FUSE_DEVICE).st_mode
    except FileNotFoundError:
        raise MountError(
            f"{FUSE_DEVICE} is missing: load the fuse kernel module (modprobe fuse), "
            "or give the container the device"
        ) from None
    if not stat.S_ISCHR(mode):
        raise MountError(f"{FUSE_DEVICE} is not a character device")


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def mount_points() -> set[str]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return {_unescape_mountinfo(line.split(" ")[4]) for line in f if line.strip()}


def check_mountpoint(path: Path) -> Path:
    """The absolute mount point, if it is an existing directory that nothing is mounted on."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mount point {path} does not exist") from None
    except OSError as e:
        raise MountError(
            f"mount point {path} is unusable ({e.strerror}); if it is a dead FUSE mount, run: umount {path}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {path} is not a directory")
    absolute = Path(os.path.realpath(path))
    if str(absolute) in mount_points():
        raise MountError(f"mount point {absolute} is busy: something is mounted there already")
    return absolute


def probe_store(store: Store) -> None:
    """One cheap request to each service: an unreachable store fails here, before READY.

    The answers do not matter (the empty directory and blob may well be absent); only that
    each service gives one. Raises the service's error (StoreUnavailableError when unreachable).
    """
    store.pathinfos.get(bytes(20))
    store.directories.get(EMPTY_DIGEST)
    store.blobs.stat(EMPTY_DIGEST)
