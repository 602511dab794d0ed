"""Zero-message opens: files opened by the kernel without asking the daemon.

Each small file a program reads cost LOOKUP, OPEN, READ and RELEASE, and most of a request's
cost is pyfuse3's own loop, not the handler. What a handle holds here (where the file is
being read, the chunk used last) may as well belong to the inode: a store path never changes
and every open is read-only. So the kernel may open files by itself (``FUSE_NO_OPEN_SUPPORT``):
reads then name the inode, not a handle, the cached pages are kept as with ``keep_cache``, and
a small file costs a LOOKUP and a READ. Readers of one file at once share its state: that can
only blur the guess of whether reads are sequential, never what a read returns.

Stock pyfuse3 (3.5) cannot say so. ``scripts/pyfuse3-no-open.patch``, applied when
``scripts/install.sh`` builds pyfuse3, adds ``Operations.no_open`` (written to go upstream):
pyfuse3 then answers OPEN itself with ENOSYS, which the kernel takes as "open without
asking from now on", and hands ``read`` the inode number. It sets the attribute back to
False at mount if the kernel cannot, and open and release are used as before.
"""

from __future__ import annotations

import pyfuse3

from tvixfs.fs.reader import OpenFile

# A plain class attribute of the patched Operations; absent from a stock build.
PYFUSE3_OFFERS_NO_OPEN = hasattr(pyfuse3.Operations, "no_open")

# The state of reading each file is kept per inode from its first read until the kernel
# forgets the inode, as a handle's is kept until its release; without releases, a bound. It
# holds at most what a handle would: the chunk used last (all of a blob that is one chunk
# larger than the cache), a sequential pass's blocks. So each is weighed by its file's size,
# clamped: tens of thousands of small files, or four large ones, at once.
STATE_BYTES = 256 << 20
_LIGHTEST = 4 << 10


def state_weight(file: OpenFile) -> int:
    return min(max(file.node.size, _LIGHTEST), STATE_BYTES // 4)
