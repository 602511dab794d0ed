"""Kernel knobs of one FUSE connection that pyfuse3 cannot set through mount options.

libfuse rejects ``max_readahead``/``max_background`` as mount options and ``max_read`` breaks
pyfuse3's init, but root may raise them in sysfs once the mount exists: the readahead window
of the connection's backing device, and how many requests the kernel keeps in flight to the
daemon at once (the daemon serves them concurrently, and a remote store has latency to hide).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

READ_AHEAD_KB = 4096
MAX_BACKGROUND = 64


def _write(path: str, value: int) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as e:
        log.debug("cannot set %s: %s", path, e)
    else:
        log.debug("set %s = %d", path, value)


def tune_connection(
    device: int, read_ahead_kb: int = READ_AHEAD_KB, max_background: int = MAX_BACKGROUND
) -> None:
    """Raise readahead and background requests for the FUSE mount on ``device`` (root only)."""
    if os.geteuid() != 0:
        return
    major, minor = os.major(device), os.minor(device)
    _write(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb", read_ahead_kb)
    # FUSE mounts use anonymous devices (major 0): the connection directory is the minor.
    connection = f"/sys/fs/fuse/connections/{minor}"
    _write(f"{connection}/max_background", max_background)
    _write(f"{connection}/congestion_threshold", max_background * 3 // 4)
