"""Checks run before mounting, so that a mount that cannot work fails with one clear line
instead of a libfuse message, a dead mount, or a daemon that reports ready and then hangs."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import threading
from pathlib import Path

from tvixfs.castore.digest import EMPTY_DIGEST
from tvixfs.errors import UserError
from tvixfs.services.base import Store

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
FS_TYPE = "tvixfs"  # the subtype (and fsname) of every tvixfs mount: "fuse.tvixfs" in mountinfo
MOUNTINFO = "/proc/self/mountinfo"
PROBE_TIMEOUT = 5.0  # seconds a live tvixfs mount has to answer whether it is dead


class MountError(UserError):
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


def mount_types() -> dict[str, str]:
    """Mount point -> file system type of what is mounted there (the topmost mount)."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        lines = [line.split(" ") for line in f if line.strip()]
    # Fields: ... 4 mount point ... then optional fields, "-", file system type, source, options.
    return {_unescape_mountinfo(fields[4]): fields[fields.index("-") + 1] for fields in lines}


def mount_points() -> set[str]:
    return set(mount_types())


def _is_dead(mountpoint: str) -> bool:
    """Whether the FUSE daemon behind ``mountpoint`` is gone: opening it fails with ENOTCONN
    (``stat`` may still succeed, from the kernel's attribute cache). A daemon that does not
    answer within PROBE_TIMEOUT counts as alive (busy), and the probe thread is left behind."""
    failed: list[int | None] = []

    def probe() -> None:
        try:
            os.close(os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:
            failed.append(e.errno)

    thread = threading.Thread(target=probe, name="dead-mount-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT)
    return failed == [errno.ENOTCONN]


def _detach_dead_mount(mountpoint: str) -> bool:
    """Lazily unmount a tvixfs mount whose daemon died; True if there was one.

    ``auto_unmount`` usually does this, but fusermount3 unmounts only if opening the mount
    point fails with ENOTCONN; when the daemon is killed outright its open request may be in
    flight as the kernel tears the connection down and fail with ECONNABORTED instead (seen
    in about one kill in three under load). The dead mount then stays, and would keep every
    later mount, a restart included, off the mount point.
    """
    if mount_types().get(mountpoint) != f"fuse.{FS_TYPE}" or not _is_dead(mountpoint):
        return False
    done = subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], capture_output=True, check=False)
    if done.returncode == 0:
        log.warning("detached a dead tvixfs mount from %s: its daemon died", mountpoint)
    return done.returncode == 0


_KERNEL_TREES = ("/proc", "/sys", "/dev")


def check_mountpoint(path: Path) -> Path:
    """The absolute mount point, if it is an existing directory that nothing is mounted on
    (a dead tvixfs mount there is detached first)."""
    absolute = Path(os.path.realpath(path))
    for kernel in _KERNEL_TREES:
        if absolute.is_relative_to(kernel):
            # The daemon itself reads files there (/proc/sys/fs/pipe-max-size, ...): it would
            # wait on its own mount.
            raise MountError(f"mount point {absolute} is under {kernel}, which the kernel owns")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"mount point {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN and _detach_dead_mount(os.path.realpath(path)):
            return check_mountpoint(path)
        raise MountError(
            f"mount point {path} is unusable ({e.strerror}); if it is a dead FUSE mount, run: umount {path}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {path} is not a directory")
    if str(absolute) in mount_points():
        if _detach_dead_mount(str(absolute)):
            return check_mountpoint(path)
        raise MountError(f"mount point {absolute} is busy: something is mounted there already")
    with os.scandir(absolute) as entries:
        if any(entries):
            log.warning("mount point %s is not empty: its contents are hidden while mounted", absolute)
    return absolute


def probe_store(store: Store) -> None:
    """One cheap request to each service: an unreachable store fails here, before READY.

    The answers do not matter (the empty directory and blob may well be absent); only that
    each service gives one. Raises the service's error (StoreUnavailableError when unreachable).
    """
    store.pathinfos.get(bytes(20))
    store.directories.get(EMPTY_DIGEST)
    store.blobs.stat(EMPTY_DIGEST)
