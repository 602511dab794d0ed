"""``tvixfs status MOUNTPOINT``: a running mount's key numbers, read from its root's xattr."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from tvixfs.cli.app import app, fail
from tvixfs.fs.preflight import FS_TYPE, mount_types


@app.command()
def status(
    mountpoint: Annotated[
        Path, typer.Argument(help="A tvixfs mount point.", show_default=False, metavar="MOUNTPOINT")
    ],
) -> None:
    """Print a mount's uptime, store state, inodes, caches and failures (and, with
    --metrics-listen, its requests and store calls): the root's user.tvixfs.status attribute."""
    # Imported here: the FUSE modules would slow every other command's start.
    from tvixfs.fs.xattrs import STATUS

    absolute = os.path.realpath(mountpoint)
    if mount_types().get(absolute) != f"fuse.{FS_TYPE}":
        fail(f"{mountpoint} is not a tvixfs mount point")
    try:
        text = os.getxattr(absolute, STATUS)
    except OSError as e:
        if e.errno in {errno.ENODATA, errno.ENOTSUP}:
            fail(f"{mountpoint} does not report its status (mounted with --no-show-xattr?)")
        fail(f"cannot read the status of {mountpoint}: {e.strerror}")
    sys.stdout.write(text.decode(errors="replace"))
