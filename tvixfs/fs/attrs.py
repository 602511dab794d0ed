"""Attributes as a real ``/nix/store`` shows them, and how long the kernel may cache them.

Nix normalises what a store path can express: mode 0444 or 0555 for files, 0555 for
directories, owner root, mtime 1 (the epoch plus one second). Symlinks are 0777 as on any
Linux file system. Nothing inside a store path ever changes, so the kernel may keep entries,
attributes and even negative entries (a name that is not there) practically forever; only the
mount root changes, when paths are added, so its negative entries expire quickly.
"""

from __future__ import annotations

import stat

import pyfuse3

from tvixfs.castore.nodes import DirectoryNode, FileNode, Node

FOREVER = 1e9  # seconds; the kernel takes it (about 31 years)
ONE_SECOND_NS = 1_000_000_000
BLOCK_SIZE = 4096
_FILE = stat.S_IFREG | 0o444
_EXECUTABLE = stat.S_IFREG | 0o555
_DIRECTORY = stat.S_IFDIR | 0o555
_SYMLINK = stat.S_IFLNK | 0o777


def _base(ino: int, timeout: float) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = ino
    attrs.generation = 0
    attrs.entry_timeout = timeout
    attrs.attr_timeout = timeout
    attrs.st_uid = 0
    attrs.st_gid = 0
    attrs.st_rdev = 0
    attrs.st_blksize = BLOCK_SIZE
    attrs.st_atime_ns = ONE_SECOND_NS
    attrs.st_mtime_ns = ONE_SECOND_NS
    attrs.st_ctime_ns = ONE_SECOND_NS
    return attrs


def entry_attributes() -> pyfuse3.EntryAttributes:
    """What every entry of a store path shares; ``node_attributes`` fills in the rest."""
    return _base(0, FOREVER)


def node_attributes(
    ino: int, node: Node, subdirectories: int | None, into: pyfuse3.EntryAttributes | None = None
) -> pyfuse3.EntryAttributes:
    """Attributes of an entry of a store path (or its root).

    ``subdirectories`` gives a directory its true link count (2 + subdirectories); when the
    listing is not known yet the count is 1, the value Linux file systems use for "not
    counted", which makes ``find`` and ``fts`` skip their link-count shortcut instead of
    trusting a wrong number.

    ``into`` (from ``entry_attributes``) is filled in place instead of a new object: readdir
    copies each entry's attributes into its reply at once, so one object serves a listing.
    """
    attrs = _base(ino, FOREVER) if into is None else into
    attrs.st_ino = ino
    nlink = 1
    if isinstance(node, FileNode):
        mode = _EXECUTABLE if node.executable else _FILE
        size = node.size
    elif isinstance(node, DirectoryNode):
        mode = _DIRECTORY
        if subdirectories is not None:
            nlink = 2 + subdirectories
        size = 0
    else:
        mode = _SYMLINK
        size = len(node.target)
    attrs.st_mode = mode
    attrs.st_nlink = nlink
    attrs.st_size = size
    attrs.st_blocks = (size + 511) // 512
    return attrs


def mount_root_attributes(ino: int, timeout: float) -> pyfuse3.EntryAttributes:
    """The directory holding every store path; its link count is not counted (see above)."""
    attrs = _base(ino, timeout)
    attrs.st_mode = _DIRECTORY
    attrs.st_nlink = 1
    attrs.st_size = 0
    attrs.st_blocks = 0
    return attrs


def negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """'No such entry', cached by the kernel for ``timeout`` seconds (``st_ino`` 0)."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 0
    attrs.entry_timeout = timeout
    attrs.attr_timeout = timeout
    return attrs
